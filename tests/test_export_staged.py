"""A *staged* hierarchical run (``train.model: staged``: one model per label-tree node,
out-of-fold stacking) exports to SavedModel and TFLite float32 with parity to the Keras
model on >= 200 images (augmented copies of the run's test images)."""

from __future__ import annotations

import numpy as np
import pytest
from test_training_helpers import write_config

from kmedtl.config import load_config
from kmedtl.export import export_run, load_predictor
from kmedtl.export.stage import BOUNDS, predict_batched, prob_keys

pytestmark = pytest.mark.slow

N_PARITY = 200


def _augmented(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images from ``x``: flips, 90-degree turns, brightness/contrast and noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = x[i % len(x)]
        img = np.rot90(img, k=int(rng.integers(4)), axes=(0, 1))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = img * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1)
        img = img + rng.normal(0, 0.03, img.shape)
        out.append(np.clip(img, 0.0, 1.0))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    from kmedtl.training import run_training

    tmp = tmp_path_factory.mktemp("staged_export")
    cfg = load_config(write_config(tmp, name="staged", train={
        "model": "staged", "epochs": 1, "staged": {"n_folds": 2}}))
    run_training(cfg)
    return tmp / "runs" / "staged"


def test_staged_model_exports_with_parity_on_200_images(staged_run):
    report = export_run(staged_run, formats=("savedmodel", "tflite"),
                        tflite_variants=("float32",))
    assert report.verified, report.failures
    assert set(report.formats) >= {"keras", "savedmodel", "tflite_float32"}
    out = report.out_dir
    keras_p = load_predictor(staged_run / "model.keras")
    test_x = _test_pixels(staged_run)
    x = _augmented(test_x, N_PARITY)
    assert len(x) >= 200
    ref = predict_batched(keras_p, x)
    assert set(prob_keys(ref)) >= {"leaf"} and ref["leaf"].shape == (len(x), 3)
    assert ref["leaf"].std(axis=0).max() > 1e-3  # the images move the outputs
    top2 = np.sort(ref["leaf"], axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4  # not a near-tie between two leaves
    results = {}
    for name, path in (("savedmodel", out / "savedmodel"),
                       ("tflite_float32", out / "tflite" / "model_float32.tflite")):
        got = predict_batched(load_predictor(path), x)
        keys = [k for k in prob_keys(ref) if k in got]
        assert "leaf" in keys, (name, list(got))
        diff = max(float(np.max(np.abs(ref[k] - got[k]))) for k in keys)
        agree = float(np.mean(ref["label_index"] == got["label_index"]))
        results[name] = (len(x), diff, agree, keys)
        kind, bound = BOUNDS[name]
        assert kind == "max_abs" and diff <= bound, (name, diff)
        assert (ref["label_index"][clear] == got["label_index"][clear]).all(), (name, agree)
    print(f"staged export parity (n, max |dp|, agreement, outputs): {results}")


def _test_pixels(run) -> np.ndarray:
    from kmedtl.export.model import load_run, split_pixels

    x, _, _ = split_pixels(load_run(run), "test")
    assert x is not None and len(x) >= 3
    return x
