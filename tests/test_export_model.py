"""Float32 rebuild of mixed-precision models, the named outputs (NumPy and in-graph
alike), and a flat (one-head) model through SavedModel, TFLite and ONNX."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import test_training_helpers as th
from test_export_helpers import random_pixels, tiny_context

from kmedtl.export.model import float32_model, output_names, postprocess, postprocess_tf
from kmedtl.hierarchy import Hierarchy


def _layers(model):
    for layer in model.layers:
        yield layer
        yield from _layers(layer) if hasattr(layer, "layers") else ()


@pytest.mark.parametrize("build", [th.hier_model, th.flat_model], ids=["hierarchical", "flat"])
def test_mixed_precision_model_is_rebuilt_in_float32_with_its_weights(build):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = build()
    finally:
        keras.config.set_dtype_policy("float32")
    assert any(layer.compute_dtype == "float16" for layer in _layers(mixed))
    f32 = float32_model(mixed)
    assert all(layer.compute_dtype == "float32" for layer in _layers(f32) if layer.weights)
    for a, b in zip(mixed.get_weights(), f32.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = random_pixels(4)
    ref, got = mixed(x), f32(x)
    ref = ref["leaf"] if isinstance(ref, dict) else ref
    got = got["leaf"] if isinstance(got, dict) else got
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref, np.float32), atol=1e-2)
    assert keras.config.dtype_policy().name == "float32"  # global policy restored


def test_named_outputs_numpy_and_graph_agree():
    h = Hierarchy(th.TREE)
    rng = np.random.default_rng(0)
    root = rng.dirichlet([1, 1], 5).astype(np.float32)
    tumor = rng.dirichlet([1, 1], 5).astype(np.float32)
    leaf = h.leaf_probabilities({"root": root, "tumor": tumor}).astype(np.float32)
    raw = {"leaf": leaf, "root": root, "tumor": tumor}
    a = postprocess(raw, h, temperature=1.7)
    b = {k: v.numpy() for k, v in postprocess_tf(raw, h, temperature=1.7).items()}
    assert set(a) == set(b) == set(output_names(h, ["root", "tumor"]))
    for k in a:
        if k == "label":
            assert [s.decode() for s in b[k]] == list(a[k])
        else:
            np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
    np.testing.assert_allclose(a["level_1"], root, atol=1e-6)  # level 1 = the root head
    np.testing.assert_allclose(a["calibrated"].sum(1), 1.0, atol=1e-6)
    assert (a["calibrated"].argmax(1) == a["leaf"].argmax(1)).all()
    assert (a["confidence"] < a["leaf"].max(1) + 1e-6).all()  # T > 1 softens


@pytest.mark.slow
def test_flat_model_exports_to_every_format(tmp_path):
    from kmedtl.export.onnx import write_onnx
    from kmedtl.export.predictors import ModelInfo, load_predictor
    from kmedtl.export.savedmodel import write_savedmodel
    from kmedtl.export.stage import parity
    from kmedtl.export.tflite import convert_all
    from kmedtl.models import FlatClassifier, backbone

    ctx = tiny_context()
    keras.utils.set_random_seed(1)
    ctx.model = FlatClassifier(backbone(th.TINY, input_shape=(32, 32, 1)), ctx.hierarchy)
    info = ModelInfo(ctx.hierarchy, ctx.options)
    x = random_pixels(8)
    ref = postprocess({"leaf": np.asarray(ctx.model(x))}, ctx.hierarchy)
    paths = {"savedmodel": write_savedmodel(ctx, tmp_path / "sm"),
             "onnx": write_onnx(ctx, tmp_path / "m.onnx"),
             "tflite_float32": convert_all(ctx, tmp_path, ["float32"])["float32"]}
    for name, path in paths.items():
        got = load_predictor(path, info).predict_pixels(x)
        assert "node_root" not in got and got["level_2"].shape == (8, 3)
        assert parity(ref, got, name)["passed"], name
