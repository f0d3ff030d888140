"""Every model saves to .keras and loads in a fresh process (safe_mode, no custom_objects)."""

from __future__ import annotations

import json
import pickle

import keras
import numpy as np
import pytest
from models_helpers import deep_hierarchy, images, randomise_batchnorm, run_python, tumour_hierarchy

from kmedtl.models import (
    ContrastivePretrainer,
    FlatClassifier,
    HierarchicalClassifier,
    MultiInputClassifier,
    StagedHierarchicalClassifier,
    backbone,
)

RAW = ["no_tumor", "glioma_tumor", "meningioma_tumor", "pituitary_tumor"]


def _no_fit(model, x, y, **_):
    model.compile()


def _models():
    """name -> (model, inputs)."""
    h = tumour_hierarchy()
    x1 = images(3, 32, 1)
    out = {}
    resnet = backbone("resnet50", cut="conv3_block1_out", input_shape=(32, 32, 1))
    for name in ("conv1_conv", "conv1_bn"):
        resnet.get_layer(name).trainable = False
    out["resnet50_cut_grey"] = (resnet, x1)
    for fam in ("convnext_tiny", "mobilenetv3small", "efficientnetv2b0"):
        out[fam] = (backbone(fam, input_shape=(32, 32, 3)), images(3, 32, 3))
    flat = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), h, dropout=0.3)
    flat.compile()
    out["flat"] = (flat, x1)
    deep = HierarchicalClassifier(backbone("parallel_resnet", input_shape=(32, 32, 1)),
                                  deep_hierarchy(), dropout=0.2)
    deep.compile()
    out["hierarchical_deep"] = (deep, x1)
    xs = {"t1": x1, "flair": images(3, 32, 1, seed=5)}
    out["multi_shared_avg"] = (MultiInputClassifier(
        backbone("cbr_tiny", input_shape=(32, 32, 1)), h, input_names=["t1", "flair"],
        head="hierarchical", fusion="average"), xs)
    out["multi_concat"] = (MultiInputClassifier(
        {"t1": backbone("cbr_tiny", input_shape=(32, 32, 1)),
         "flair": backbone("cbr_small", input_shape=(32, 32, 1))}, 3), xs)
    staged = StagedHierarchicalClassifier(
        h, lambda: backbone("cbr_tiny", input_shape=(32, 32, 1)), n_folds=2, fit_fn=_no_fit)
    staged.fit(images(8), RAW * 2)
    out["staged"] = (staged.to_keras(), x1)
    out["contrastive"] = (ContrastivePretrainer(backbone("cbr_tiny", input_shape=(32, 32, 1)),
                                                projection_dim=8, hidden_dim=16), x1)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = HierarchicalClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), h)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    out["mixed_bfloat16"] = (mixed, x1)
    for model, _ in out.values():
        randomise_batchnorm(model, seed=3)
    return out


def _as_dict(pred):
    return {k: np.asarray(v) for k, v in pred.items()} if isinstance(pred, dict) else {
        "out": np.asarray(pred)}


@pytest.mark.slow
def test_every_model_reloads_in_a_fresh_process_with_identical_predictions(tmp_path):
    models = _models()
    expected = {}
    for name, (model, x) in models.items():
        model.save(tmp_path / f"{name}.keras")
        expected[name] = _as_dict(model.predict(x, verbose=0))
        with open(tmp_path / f"{name}.x.pkl", "wb") as f:
            pickle.dump(x, f)
    (tmp_path / "names.json").write_text(json.dumps(sorted(models)))

    run_python(f"""
        import json, pickle
        from pathlib import Path
        import numpy as np
        import keras
        import kmedtl.models  # registers kmedtl's serializable classes
        root = Path({str(tmp_path)!r})
        report = {{}}
        for name in json.loads((root / "names.json").read_text()):
            model = keras.saving.load_model(root / f"{{name}}.keras", safe_mode=True)
            x = pickle.loads((root / f"{{name}}.x.pkl").read_bytes())
            pred = model.predict(x, verbose=0)
            pred = pred if isinstance(pred, dict) else {{"out": pred}}
            np.savez(root / f"{{name}}.loaded.npz", **{{k: np.asarray(v) for k, v in pred.items()}})
            bb = getattr(model, "backbone", model)
            report[name] = {{
                "class": type(model).__name__,
                "frozen": [l.name for l in bb.layers if not l.trainable and l.weights],
                "policy": bb.layers[-1].dtype_policy.name,
                "compiled": bool(getattr(model, "compiled", False)),
            }}
        (root / "report.json").write_text(json.dumps(report))
    """)
    report = json.loads((tmp_path / "report.json").read_text())
    for name in models:
        loaded = dict(np.load(tmp_path / f"{name}.loaded.npz"))
        assert set(loaded) == set(expected[name]), name
        for key in expected[name]:
            np.testing.assert_allclose(loaded[key], expected[name][key], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{name}:{key}")
    assert report["resnet50_cut_grey"]["class"] == "Backbone"
    assert report["resnet50_cut_grey"]["frozen"] == ["conv1_conv", "conv1_bn"]
    assert report["hierarchical_deep"]["class"] == "HierarchicalClassifier"
    assert report["hierarchical_deep"]["compiled"] and report["flat"]["compiled"]
    assert report["mixed_bfloat16"]["policy"] == "mixed_bfloat16"


@pytest.mark.slow
def test_loading_without_importing_kmedtl_says_what_is_missing(tmp_path):
    model = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 2)
    model.save(tmp_path / "m.keras")
    with pytest.raises(AssertionError, match="kmedtl>FlatClassifier|FlatClassifier"):
        run_python(f"import keras; keras.saving.load_model({str(tmp_path / 'm.keras')!r})")
