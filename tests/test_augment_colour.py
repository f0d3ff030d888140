"""Colour jitter in ``augment:`` (``saturation``, ``hue``): Keras 3's RandomSaturation and
RandomHue with torchvision-style strengths, on colour input only."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kmedtl.config import AugmentSection, Config, load_config
from kmedtl.data.augment import Augmentation
from kmedtl.errors import ConfigError


def _batch(channels: int = 3) -> tf.Tensor:
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 0.9, (8, 16, 16, channels)).astype("float32")
    return tf.constant(x)


def test_saturation_and_hue_change_colour_and_stay_in_range():
    aug = Augmentation(flip=None, saturation=0.5, hue=0.1, seed=1)
    assert [type(x).__name__ for x in aug.layers()] == ["RandomSaturation", "RandomHue"]
    x = _batch()
    y, _ = aug.apply_batch(x, tf.zeros(8))
    y = y.numpy()
    assert y.shape == x.shape and y.min() >= 0.0 and y.max() <= 1.0
    assert np.abs(y - x.numpy()).mean() > 1e-3  # colours moved
    # brightness (HSV value) is left alone by both
    np.testing.assert_allclose(y.max(-1), x.numpy().max(-1), atol=2e-3)


def test_saturation_range_matches_torchvision():
    # Keras samples f and scales saturation by f / (1 - f): [1 - s, 1 + s] for s = 0.2
    layer = Augmentation(flip=None, saturation=0.2).layers()[0]
    lo, hi = layer.factor
    assert lo / (1 - lo) == pytest.approx(0.8) and hi / (1 - hi) == pytest.approx(1.2)


def test_colour_jitter_on_grey_input_names_the_field():
    aug = Augmentation(flip=None, hue=0.05)
    with pytest.raises(ConfigError, match=r"augment.hue: colour jitter needs colour input.*"
                                          r"data.image.channels: 3"):
        aug.apply_batch(_batch(1), tf.zeros(8))
    Augmentation(flip="horizontal").apply_batch(_batch(1), tf.zeros(8))  # no jitter: fine


@pytest.mark.parametrize("field, value", [("saturation", 1.0), ("hue", 0.6),
                                          ("saturation", -0.1)])
def test_out_of_range_strengths_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=f"augment.{field}"):
        load_config({"data": {"root": "/x"}, "augment": {field: value}})
    with pytest.raises(ConfigError, match=f"augment.{field}"):
        Augmentation(**{field: value})


def test_unset_colour_fields_leave_dumps_as_before():
    # configs (and stage fingerprints) of runs made before these fields are unchanged
    assert "saturation" not in AugmentSection().model_dump()
    assert "hue" not in Config().model_dump(mode="json")["augment"]
    dumped = AugmentSection(saturation=0.1, hue=0.02).model_dump()
    assert dumped["saturation"] == 0.1 and dumped["hue"] == 0.02
    cfg = Config.model_validate({"augment": {"saturation": 0.1}})
    assert cfg.augmentation(seed=0).saturation == 0.1
