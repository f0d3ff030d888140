"""Several image types per case: late fusion and stacking."""

from __future__ import annotations

import numpy as np
import pytest
from models_helpers import images, tumour_hierarchy

from kmedtl.errors import ModelError
from kmedtl.models import MultiInputClassifier, StackedMultiInputClassifier, backbone

RAW = ["no_tumor", "glioma_tumor", "meningioma_tumor", "pituitary_tumor"]


def tiny():
    return backbone("cbr_tiny", input_shape=(32, 32, 1))


def two_types(n=4):
    return {"t1": images(n, seed=1), "flair": images(n, seed=2)}


def test_inputs_are_named_after_image_types_and_fused_features_feed_the_head():
    model = MultiInputClassifier({"t1": tiny(), "flair": tiny()}, 3)
    assert sorted(t.name for t in model.inputs) == ["flair", "t1"]
    assert model.get_layer("fused_features").output.shape == (None, 1024)
    p = model.predict(two_types(), verbose=0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert model.preprocessing == {"t1": "unit", "flair": "unit"}


def test_shared_backbone_has_one_set_of_weights():
    separate = MultiInputClassifier({"t1": tiny(), "flair": tiny()}, 3)
    shared = MultiInputClassifier(tiny(), 3, input_names=["t1", "flair"])
    bb_params = tiny().count_params()
    assert separate.count_params() - shared.count_params() == bb_params
    x = two_types()
    x["flair"] = x["t1"]  # same image through the same backbone: same features
    feats = shared.get_layer("fused_features").output
    import keras

    f = np.asarray(keras.Model(shared.inputs, feats)(x))
    np.testing.assert_allclose(f[:, :512], f[:, 512:], rtol=1e-6)


@pytest.mark.slow
def test_hierarchical_average_fusion_fits_and_sums_to_one():
    h = tumour_hierarchy()
    model = MultiInputClassifier({"t1": tiny(), "flair": tiny()}, h, head="hierarchical",
                                 fusion="average")
    model.compile()
    hist = model.fit(two_types(8), model.targets(RAW * 2), epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    out = model.predict(two_types(), verbose=0)
    assert set(out) == {"leaf", "root", "tumor"}
    np.testing.assert_allclose(out["leaf"].sum(axis=1), 1.0, rtol=1e-5)


def test_multi_input_arguments_are_checked():
    with pytest.raises(ModelError, match="input_names"):
        MultiInputClassifier(tiny(), 3)
    with pytest.raises(ModelError, match="fusion"):
        MultiInputClassifier({"t1": tiny()}, 3, fusion="max")
    with pytest.raises(ModelError, match="Hierarchy"):
        MultiInputClassifier({"t1": tiny()}, 3, head="hierarchical")


def test_stacked_per_input_models_use_out_of_fold_confidences():
    h = tumour_hierarchy()
    seen = []

    def fit_fn(model, x, y, *, name, fold, indices):
        seen.append((name, fold, set(indices.tolist())))

    stack = StackedMultiInputClassifier({"t1": tiny, "flair": tiny}, h, n_folds=2,
                                        fit_fn=fit_fn)
    x = two_types(8)
    stack.fit(x, RAW * 2)
    for _name, fold, train in seen:
        if fold is not None:
            assert not train & set(np.flatnonzero(stack.oof_fold_ == fold).tolist())
    assert {s[0] for s in seen} == {"t1", "flair"}
    p = stack.predict_proba(x)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    exported = stack.to_keras()
    np.testing.assert_allclose(exported.predict(x, verbose=0)["leaf"], p, atol=1e-5)
    with pytest.raises(ModelError, match="keys"):
        stack.predict_proba({"t1": x["t1"]})
