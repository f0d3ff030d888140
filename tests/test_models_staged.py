"""The staged (level-wise) hierarchical scheme with out-of-fold stacking."""

from __future__ import annotations

import numpy as np
import pytest
from models_helpers import deep_hierarchy, images, tumour_hierarchy

from kmedtl.errors import ModelError
from kmedtl.models import StagedHierarchicalClassifier, backbone

RAW = ["no_tumor", "glioma_tumor", "meningioma_tumor", "pituitary_tumor"]


def tiny():
    return backbone("cbr_tiny", input_shape=(32, 32, 1))


class Recorder:
    """A fit_fn that trains nothing and records who would have been trained on what."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, x, y, *, name, fold, indices):
        self.calls.append({"name": name, "fold": fold, "indices": np.asarray(indices).copy(),
                           "y": np.asarray(y).copy(), "n": len(x)})


def test_hierarchy_transfer_copies_the_parent_backbone():
    staged = StagedHierarchicalClassifier(tumour_hierarchy(), tiny)
    level1 = staged.build_node_model("root")
    level2 = staged.build_node_model("tumor", parent_model=level1)
    for a, b in zip(level1.backbone.get_weights(), level2.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert level2.output_shape == (None, 3) and level1.output_shape == (None, 2)
    fresh = staged.build_node_model("tumor")  # "pretrained" start: from backbone_fn()
    assert not np.allclose(fresh.backbone.get_weights()[0], level1.backbone.get_weights()[0])


@pytest.mark.slow
def test_out_of_fold_confidences_never_come_from_a_model_trained_on_the_sample():
    h = tumour_hierarchy()
    rec = Recorder()
    staged = StagedHierarchicalClassifier(h, tiny, n_folds=3, seed=7, fit_fn=rec)
    labels = RAW * 6
    x = images(len(labels))
    staged.fit(x, labels)
    enc = h.encode(labels)
    for call in rec.calls:
        target = enc[f"node:{call['name']}"]
        assert (target[call["indices"]] >= 0).all()  # a node model sees its subtree only
        np.testing.assert_array_equal(call["y"], target[call["indices"]])
        if call["fold"] is not None:
            held_out = np.flatnonzero(staged.oof_fold_ == call["fold"])
            assert not set(held_out) & set(call["indices"].tolist())
    assert {c["name"] for c in rec.calls} == {"root", "tumor"}
    assert sorted({c["fold"] for c in rec.calls if c["fold"] is not None}) == [0, 1, 2]
    for k, train in enumerate(staged.fold_train_indices_):
        assert not set(train) & set(np.flatnonzero(staged.oof_fold_ == k))
    final_root = [c for c in rec.calls if c["fold"] is None and c["name"] == "root"][0]
    assert final_root["n"] == len(labels)
    assert (staged.oof_fold_ >= 0).all()
    # the split is reproducible
    again = StagedHierarchicalClassifier(h, tiny, n_folds=3, seed=7, fit_fn=Recorder())
    again.fit(x, labels)
    np.testing.assert_array_equal(again.oof_fold_, staged.oof_fold_)


@pytest.mark.slow
def test_trained_staged_model_predicts_distributions_and_exports_to_keras():
    h = tumour_hierarchy()
    staged = StagedHierarchicalClassifier(h, tiny, n_folds=2, fit_kwargs={"epochs": 1})
    labels = RAW * 3
    x = images(len(labels))
    staged.fit(x, labels)
    p = staged.predict_proba(x)
    assert p.shape == (len(labels), 4)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert staged.oof_features_.shape == (len(labels), 5)
    assert staged.feature_names[:2] == ["root:normal", "root:tumor"]
    exported = staged.to_keras()
    out = exported.predict(x, verbose=0)
    np.testing.assert_allclose(out["leaf"], p, atol=1e-5)
    np.testing.assert_allclose(out["tumor"], staged.predict_nodes(x)["tumor"], atol=1e-6)


@pytest.mark.slow
def test_deeper_trees_recurse_with_hierarchy_transfer():
    h = deep_hierarchy()
    staged = StagedHierarchicalClassifier(h, tiny, n_folds=2, fit_fn=Recorder())
    labels = list(h.leaves) * 3
    staged.fit(images(len(labels)), labels)
    assert set(staged.models_) == {"root", "lesion", "malignant"}
    # nothing was trained, so every level holds the root model's backbone weights
    root = staged.models_["root"].backbone.get_weights()
    for node in ("lesion", "malignant"):
        for a, b in zip(root, staged.models_[node].backbone.get_weights()):
            np.testing.assert_array_equal(a, b)
    p = staged.predict_proba(images(4))
    assert p.shape == (4, 4)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)


def test_pluggable_meta_estimator_and_its_limits():
    from sklearn.ensemble import RandomForestClassifier

    h = tumour_hierarchy()
    staged = StagedHierarchicalClassifier(
        h, tiny, n_folds=2, fit_fn=Recorder(),
        meta_estimator=RandomForestClassifier(n_estimators=5, random_state=0),
    )
    labels = RAW * 3
    staged.fit(images(len(labels)), np.array([h.leaf_index(r) for r in labels]))
    np.testing.assert_allclose(staged.predict_proba(images(2)).sum(axis=1), 1.0)
    with pytest.raises(ModelError, match="linear meta-estimator"):
        staged.to_keras()
    with pytest.raises(ModelError, match="predict_proba"):
        StagedHierarchicalClassifier(h, tiny, meta_estimator=object())


def test_bad_arguments_name_the_allowed_values():
    with pytest.raises(ModelError, match="hierarchy"):
        StagedHierarchicalClassifier(tumour_hierarchy(), tiny, transfer="imagenet")
    with pytest.raises(ModelError, match="backbone_fn"):
        StagedHierarchicalClassifier(tumour_hierarchy(), "resnet50")
    with pytest.raises(ModelError, match="not fitted"):
        StagedHierarchicalClassifier(tumour_hierarchy(), tiny).predict_proba(images(1))
