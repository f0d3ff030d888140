"""Acquisition-shift augmentation (``augment.gamma``, ``invert``, ``blur``, ``noise``)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kmedtl.config import load_config
from kmedtl.data.augment import Augmentation
from kmedtl.errors import ConfigError


def _phantom(n=64):
    """A black background, a grey head (0.3) and a bright centre (0.8)."""
    x = np.zeros((n, 32, 32, 1), np.float32)
    x[:, 8:24, 8:24] = 0.3
    x[:, 12:20, 12:20] = 0.8
    return x


def _apply(aug, x):
    out, _ = aug.apply_batch(tf.constant(x), tf.zeros(len(x)))
    return out.numpy()


def test_all_zero_is_the_identity():
    x = _phantom(4)
    assert np.array_equal(Augmentation(flip=None).acquisition(tf.constant(x)).numpy(), x)


def test_invert_swaps_contrast_inside_the_head_and_keeps_the_background():
    x = _phantom()
    y = _apply(Augmentation(flip=None, invert=1.0), x)
    assert np.all(y[:, 0, 0] == 0)  # background stays black
    np.testing.assert_allclose(y[:, 16, 16, 0], 1.05 - 0.8, atol=1e-6)  # bright -> dark
    np.testing.assert_allclose(y[:, 10, 10, 0], 1.05 - 0.3, atol=1e-6)  # grey -> bright
    half = _apply(Augmentation(flip=None, invert=0.5, seed=0), x)
    inverted = np.isclose(half[:, 16, 16, 0], 0.25)
    assert 10 < inverted.sum() < 54  # about half of 64 images


def test_gamma_and_noise_vary_per_image_and_stay_in_range():
    x = _phantom()
    g = _apply(Augmentation(flip=None, gamma=0.4, seed=1), x)
    centre = g[:, 16, 16, 0]
    assert centre.std() > 0.02  # one gamma per image, not one per batch
    assert np.all(g[:, 0, 0] == 0) and g.min() >= 0 and g.max() <= 1
    # x ** exp(u), u in [-0.4, 0.4]
    assert centre.min() >= 0.8 ** np.exp(0.4) - 1e-5 and centre.max() <= 0.8 ** np.exp(-0.4) + 1e-5
    n = _apply(Augmentation(flip=None, noise=0.05, seed=2), x)
    assert 0 < np.abs(n - x).mean() < 0.05 and n.min() >= 0 and n.max() <= 1


def test_blur_smooths_edges():
    x = _phantom(8)
    y = _apply(Augmentation(flip=None, blur=2.0, seed=3), x)
    edge = lambda a: np.abs(np.diff(a, axis=2)).max(axis=(1, 2, 3))  # noqa: E731
    assert np.all(edge(y) <= edge(x) + 1e-6) and edge(y).mean() < edge(x).mean()


def test_config_fields_validated_and_left_out_at_zero():
    base = {"name": "t", "data": {"source": "folder", "root": "."}}
    cfg = load_config({**base, "augment": {"gamma": 0.4, "invert": 0.3, "blur": 1.0,
                                           "noise": 0.03}})
    aug = cfg.augmentation(seed=0)
    assert (aug.gamma, aug.invert, aug.blur, aug.noise) == (0.4, 0.3, 1.0, 0.03)
    dumped = load_config(base).model_dump(mode="json")["augment"]
    assert not {"gamma", "invert", "blur", "noise"} & set(dumped)  # old fingerprints hold
    with pytest.raises(ConfigError, match="invert"):
        load_config({**base, "augment": {"invert": 1.5}})
    with pytest.raises(ConfigError, match="augment.noise"):
        Augmentation(noise=-1)
