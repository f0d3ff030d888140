"""``train.weight_scaling: transfusion`` (Raghu et al. 2019 "Mean Var Init"): the
pretrained backbone is redrawn per tensor from N(mean, std) of its pretrained values when
the model is built for training."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from test_training_helpers import TINY, hierarchy, write_config

from kmedtl.config import load_config
from kmedtl.errors import ConfigError
from kmedtl.models import backbone
from kmedtl.models.weights import leaf_layers
from kmedtl.training.config import train_section
from kmedtl.training.stage import build_model, run_training

SHAPE = (32, 32, 1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A TINY backbone whose every tensor has its own, non-default mean and spread (as a
    pretrained one would), saved as a weight file."""
    rng = np.random.default_rng(7)
    bb = backbone(TINY, input_shape=SHAPE)
    for i, var in enumerate(bb.weights):
        v = np.asarray(var)
        if not np.issubdtype(v.dtype, np.floating):
            continue
        draw = rng.normal(0.1 * (i % 5) - 0.2, 0.05 + 0.02 * i, v.shape)
        if "variance" in var.path:
            draw = np.abs(draw) + 0.5
        var.assign(draw.astype(v.dtype))
    path = tmp_path_factory.mktemp("pre") / "pretrained.weights.h5"
    bb.save_weights(str(path))
    return path


def _build(pretrained, scaling, seed=0):
    tc = train_section({"backbone": TINY, "model": "flat", "weights": str(pretrained),
                        "weight_scaling": scaling, "seed": seed})
    keras.utils.set_random_seed(0)
    return build_model(tc, hierarchy(), SHAPE)


def _backbone_vars(model):
    out = []
    for layer in leaf_layers(model.backbone):
        bn = isinstance(layer, keras.layers.BatchNormalization)
        for var in layer.weights:
            kind = None
            if bn and var is layer.moving_mean:
                kind = "moving_mean"
            elif bn and var is layer.moving_variance:
                kind = "moving_variance"
            out.append((var.path, kind, np.asarray(var, dtype=np.float64)))
    return out


def test_transfusion_matches_each_pretrained_tensors_mean_and_std(pretrained):
    base = _build(pretrained, "none")
    scaled = _build(pretrained, "transfusion")
    again = _build(pretrained, "transfusion")
    other_seed = _build(pretrained, "transfusion", seed=1)
    b, s = _backbone_vars(base), _backbone_vars(scaled)
    assert [p for p, _, _ in b] == [p for p, _, _ in s] and len(b) >= 10
    checked = 0
    for (path, kind, pre), (_, _, new) in zip(b, s):
        if kind == "moving_mean":
            np.testing.assert_array_equal(new, 0.0, err_msg=path)
            continue
        if kind == "moving_variance":
            np.testing.assert_array_equal(new, 1.0, err_msg=path)
            continue
        assert not np.allclose(new, pre), f"{path} was not redrawn"
        n = pre.size
        # mean within 5 standard errors; std within what sampling allows
        assert abs(new.mean() - pre.mean()) <= 5 * pre.std() / np.sqrt(n) + 1e-6, path
        tol = max(0.1, 5 / np.sqrt(2 * n))
        assert abs(new.std() / pre.std() - 1) <= tol, (path, new.std(), pre.std())
        checked += 1
    assert checked >= 6
    # "none" keeps the file's weights; the head is untouched; seeded and reproducible
    for (p, _, x), (_, _, y) in zip(_backbone_vars(again), s):
        np.testing.assert_array_equal(x, y, err_msg=p)
    assert any(not np.allclose(x, y) for (_, k, x), (_, _, y) in
               zip(_backbone_vars(other_seed), s) if k is None)
    def head_of(model):
        inner = {id(w) for w in model.backbone.weights}
        return [w for w in model.weights if id(w) not in inner]

    head, head_s = head_of(base), head_of(scaled)
    assert head and len(head) == len(head_s)
    for x, y in zip(head, head_s):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    fresh = backbone(TINY, weights=str(pretrained), input_shape=SHAPE)
    for x, y in zip(fresh.weights, base.backbone.weights):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_a_config_with_transfusion_trains_and_records_it(tmp_path, pretrained, monkeypatch):
    import kmedtl.models

    calls = []
    real = kmedtl.models.transfusion_scale

    def spy(model, seed=None):
        before = [np.asarray(w).copy() for w in model.weights]
        out = real(model, seed=seed)
        calls.append((seed, sum(not np.allclose(a, np.asarray(w))
                                for a, w in zip(before, model.weights))))
        return out

    monkeypatch.setattr(kmedtl.models, "transfusion_scale", spy)
    cfg = load_config(write_config(tmp_path, name="tf", train={
        "model": "flat", "epochs": 1, "weights": str(pretrained),
        "weight_scaling": "transfusion", "seed": 3}))
    result = run_training(cfg)
    assert calls and calls[0][0] == 3 and calls[0][1] >= 6
    run = tmp_path / "runs" / "tf"
    m = json.loads((run / "train_metrics.json").read_text())
    assert m["weight_scaling"] == "transfusion" and m["weights"] == str(pretrained)
    assert load_config(run / "config.yaml").train["weight_scaling"] == "transfusion"
    assert result.epochs == [0] and np.isfinite(result.history["loss"]).all()


def test_bad_weight_scaling_values_name_the_field(tmp_path, pretrained):
    with pytest.raises(ConfigError) as err:
        train_section({"weight_scaling": "raghu"}, label="run.yaml")
    assert "run.yaml" in str(err.value)
    assert "train.weight_scaling: Input should be 'none' or 'transfusion' (got 'raghu')" \
        in str(err.value)
    with pytest.raises(ConfigError, match="train.weight_scaling: Input should be"):
        train_section({"weight_scaling": True})
    cfg = load_config(write_config(tmp_path, name="noweights", train={
        "model": "flat", "weight_scaling": "transfusion"}))
    with pytest.raises(ConfigError) as err:
        run_training(cfg)
    msg = str(err.value)
    assert "train.weight_scaling: 'transfusion' redraws the pretrained weights" in msg
    assert "set train.weights" in msg
    assert not (tmp_path / "runs" / "noweights").exists()  # refused before anything ran
