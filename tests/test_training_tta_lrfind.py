"""Test-time augmentation and the learning-rate finder."""

import json

import keras
import numpy as np
import pytest
from test_training_helpers import arrays, flat_model, hier_model, write_config

from kmedtl.errors import ConfigError
from kmedtl.evaluation.tta import predict_tta
from kmedtl.training import lr_find


def test_tta_averages_the_flipped_views_per_output():
    x, _ = arrays(10)
    model = flat_model(3)
    p = predict_tta(model, x, n=2, flips="horizontal", batch_size=4)
    ref = (model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(p, ref, atol=1e-6)
    assert not np.allclose(p, model.predict(x, verbose=0), atol=1e-6)  # the flip mattered
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    h = hier_model()
    out = predict_tta(h, x, n=4, flips="horizontal_and_vertical")
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    for key in ("leaf", "root", "tumor"):
        ref = np.mean([h.predict(v, verbose=0)[key] for v in views], axis=0)
        np.testing.assert_allclose(out[key], ref, atol=1e-6)


def test_tta_on_a_dataset_with_random_augmentation_views():
    import tensorflow as tf  # test-only: a tf.data source

    x, y = arrays(8)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    model = flat_model(2)
    p = predict_tta(model, ds, n=3, flips="horizontal",
                    augment=keras.layers.RandomRotation(0.1, seed=1))
    assert p.shape == (8, 2) and np.allclose(p.sum(1), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match="augment"):
        predict_tta(model, x, n=3, flips="horizontal")


@pytest.mark.slow
def test_lr_finder_sweeps_exponentially_suggests_and_restores_weights(tmp_path):
    x, y = arrays(64)
    model = flat_model(2)
    before = model.get_weights()
    res = lr_find(model, (x, y), start_lr=1e-5, end_lr=10.0, steps=60, batch_size=8,
                  jit_compile=False, optimizer="sgd")
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    ratios = res.lrs[1:] / res.lrs[:-1]
    assert np.allclose(ratios, ratios[0], rtol=1e-3) and res.lrs[0] == pytest.approx(1e-5)
    assert res.lrs[0] <= res.suggestion <= res.lrs[-1]
    assert res.min10 == pytest.approx(res.lrs[np.nanargmin(res.smoothed)] / 10)
    png = res.plot(tmp_path / "lr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.slow
def test_lr_finder_stops_when_the_loss_diverges():
    x, y = arrays(32)
    res = lr_find(flat_model(2), (x, y), start_lr=1e-3, end_lr=1e6, steps=100, batch_size=8,
                  jit_compile=False, optimizer="sgd")
    assert res.stopped_early and len(res.lrs) < 100


@pytest.mark.slow
def test_lr_find_cli_writes_png_and_json(tmp_path, capsys):
    from kmedtl.training.cli import build_parser

    cfg = write_config(tmp_path, train={"model": "flat"})
    out = tmp_path / "plots" / "lr.png"
    args = build_parser().parse_args(["lr-find", str(cfg), "--out", str(out), "--steps", "12"])
    assert args.func(args) == 0
    assert out.is_file() and "suggested learning rate" in capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["steps"] <= 12 and data["suggestion"] > 0
