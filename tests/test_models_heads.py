"""Flat and hierarchical heads, the masked loss and the mixed-precision contract."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf  # tests may use TF (GradientTape); kmedtl.models may not
from models_helpers import deep_hierarchy, images, tumour_hierarchy

from kmedtl.errors import ModelError
from kmedtl.models import (
    FlatClassifier,
    HierarchicalClassifier,
    LeafProbabilities,
    MaskedSparseCategoricalCrossentropy,
    backbone,
    hierarchy_targets,
    save_backbone,
)

RAW = ["no_tumor", "glioma_tumor", "meningioma_tumor", "pituitary_tumor"]


def tiny(channels=1):
    return backbone("cbr_tiny", input_shape=(32, 32, channels))


# ---------------------------------------------------------------------------- flat
def test_flat_classifier_gives_leaf_probabilities():
    h = tumour_hierarchy()
    model = FlatClassifier(tiny(), h, dropout=0.2)
    assert model.output_names == ["leaf"] and model.class_names == list(h.leaves)
    p = model.predict(images(3), verbose=0)
    assert p.shape == (3, 4)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert model.preprocessing == "unit"


def test_flat_classifier_accepts_a_class_count_and_rejects_nonsense():
    assert FlatClassifier(tiny(), 5).output_shape == (None, 5)
    with pytest.raises(ModelError, match="at least 2"):
        FlatClassifier(tiny(), 1)
    with pytest.raises(ModelError, match="dropout"):
        FlatClassifier(tiny(), 3, dropout=1.5)
    with pytest.raises(ModelError, match="pooling"):
        FlatClassifier(tiny(), 3, pooling="median")


# ---------------------------------------------------------------------------- leaf layer
def test_leaf_probabilities_are_the_product_along_paths_and_sum_to_one():
    h = deep_hierarchy()
    rng = np.random.default_rng(0)
    heads = [rng.dirichlet(np.ones(len(h.children(p))), size=5).astype("float32")
             for p in h.parents]
    leaf = np.asarray(LeafProbabilities(h)(heads))
    np.testing.assert_allclose(leaf, h.leaf_probabilities(dict(zip(h.parents, heads))),
                               rtol=1e-6)
    np.testing.assert_allclose(leaf.sum(axis=1), 1.0, rtol=1e-6)


def test_hierarchical_outputs_are_named_after_nodes_and_consistent():
    h = tumour_hierarchy()
    model = HierarchicalClassifier(backbone=tiny(), hierarchy=h, dropout=0.1)
    assert sorted(model.output_names) == ["leaf", "root", "tumor"]
    out = model.predict(images(4), verbose=0)
    assert out["root"].shape == (4, 2) and out["tumor"].shape == (4, 3)
    np.testing.assert_allclose(out["leaf"].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["leaf"][:, 0], out["root"][:, 0], rtol=1e-5)  # normal
    np.testing.assert_allclose(out["leaf"][:, 1:], out["root"][:, 1:] * out["tumor"], rtol=1e-5)


def test_hierarchy_targets_map_encode_keys_to_output_names():
    h = tumour_hierarchy()
    y = hierarchy_targets(h, RAW)
    assert set(y) == {"leaf", "root", "tumor"}
    assert y["root"].tolist() == [0, 1, 1, 1]
    assert y["tumor"].tolist() == [-1, 0, 1, 2]
    assert hierarchy_targets(h, h.encode(RAW))["tumor"].tolist() == [-1, 0, 1, 2]
    with pytest.raises(ModelError, match="node:tumor"):
        hierarchy_targets(h, {"leaf": np.zeros(2), "node:root": np.zeros(2)})


def test_node_names_clashing_with_layers_are_refused():
    with pytest.raises(ModelError, match="clash"):
        HierarchicalClassifier(tiny(), {"a": None, "image": {"b": None, "c": None}})


# ---------------------------------------------------------------------------- masked loss
def test_masked_loss_ignores_not_applicable_rows():
    loss = MaskedSparseCategoricalCrossentropy()
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], "float32")
    assert float(loss(np.array([0, -1, 1]), p)) == pytest.approx(
        -(np.log(0.5) + np.log(0.8)) / 2, rel=1e-5)  # mean over the 2 applicable rows
    assert float(loss(np.array([-1, -1, -1]), p)) == 0.0
    per_row = MaskedSparseCategoricalCrossentropy(reduction="none")(np.array([0, -1, 1]), p)
    assert np.asarray(per_row)[1] == 0.0
    weighted = loss(np.array([0, -1, 1]), p, sample_weight=np.array([2.0, 5.0, 0.0]))
    assert float(weighted) == pytest.approx(-2 * np.log(0.5) / 2, rel=1e-5)


def test_subtype_head_gets_zero_gradient_from_a_batch_of_normals():
    h = tumour_hierarchy()
    model = HierarchicalClassifier(tiny(), h)
    model.compile()
    y = hierarchy_targets(h, ["no_tumor"] * 4)
    assert (y["tumor"] == -1).all()
    losses = model.loss  # {"root": masked CE, "tumor": masked CE}
    x = images(4)
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        total = sum(losses[k](y[k], out[k]) for k in losses)
    tumor_w = model.get_layer("tumor_logits").trainable_weights
    root_w = model.get_layer("root_logits").trainable_weights
    grads = tape.gradient(total, tumor_w + root_w)
    for g in grads[: len(tumor_w)]:
        assert g is not None and np.all(np.asarray(g) == 0.0)
    assert any(np.any(np.asarray(g) != 0.0) for g in grads[len(tumor_w):])


@pytest.mark.slow
def test_hierarchical_model_fits_one_epoch_on_random_data():
    h = tumour_hierarchy()
    model = HierarchicalClassifier(tiny(), h)
    model.compile(leaf_loss_weight=0.5)
    before = model.get_layer("tumor_logits").get_weights()[0].copy()
    hist = model.fit(images(8), model.targets(RAW * 2), epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    assert {"root_loss", "tumor_loss", "leaf_accuracy"} <= set(hist.history)
    assert not np.allclose(before, model.get_layer("tumor_logits").get_weights()[0])


@pytest.mark.slow
def test_python_api_with_a_truncated_pretrained_resnet(tmp_path):
    source = backbone("resnet50", input_shape=(32, 32, 3))
    path = save_backbone(source, tmp_path / "resnet50_source.weights.h5")
    h = tumour_hierarchy()
    model = HierarchicalClassifier(
        backbone=backbone("resnet50", weights=path, cut="conv4_block4_out",
                          input_shape=(32, 32, 3)),
        hierarchy=h,
    )
    assert isinstance(model, keras.Model)
    np.testing.assert_array_equal(
        model.backbone.get_layer("conv4_block4_3_conv").kernel,
        source.get_layer("conv4_block4_3_conv").kernel,
    )
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    hist = model.fit(images(4, 32, 3), model.targets(RAW), epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])


# ---------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_heads_compute_and_output_float32_under_mixed_precision(policy):
    h = tumour_hierarchy()
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        bb = tiny()
        model = HierarchicalClassifier(bb, h)
        flat = FlatClassifier(tiny(), 3)
        assert bb.output.dtype == policy.split("_")[1]  # backbone in half precision
        for m in (model, flat):
            for t in m.outputs:
                assert t.dtype == "float32"
        for name in ("root_logits", "tumor_logits", "leaf", "pool"):
            assert model.get_layer(name).compute_dtype == "float32"
        out = model.predict(images(2), verbose=0)
        assert all(v.dtype == np.float32 for v in out.values())
        np.testing.assert_allclose(out["leaf"].sum(axis=1), 1.0, rtol=1e-5)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert keras.mixed_precision.global_policy().name == "float32"
