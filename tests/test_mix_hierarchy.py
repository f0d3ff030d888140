"""MixUp and CutMix on flat and hierarchical targets: one draw (partner, lambda, box) for
every image input, every output's target and the sample weight; the losses and metrics take
the mixed (soft) targets; ``kmedtl run`` with ``augment.mixup`` and ``augment.cutmix``."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_pipeline_run import write_pipeline
from test_training_helpers import flat_model

from kmedtl.cli import main as kmedtl_main
from kmedtl.data import ImageOptions, build_cache, index_folder
from kmedtl.data.augment import Augmentation
from kmedtl.data.pipeline import make_dataset, soft_targets, target_widths
from kmedtl.hierarchy import Hierarchy
from kmedtl.models.hierarchical import LeafProbabilities
from kmedtl.training.losses import (
    MaskedCrossentropy,
    SmoothedSparseCategoricalCrossentropy,
    classification_loss,
)
from kmedtl.training.metrics import default_metrics
from kmedtl.training.trainer import Trainer

H = Hierarchy({"normal": ["no_tumor"], "tumor": {"glioma": ["glioma_tumor"],
                                                 "pituitary": ["pituitary_tumor"]}})
OPTS = ImageOptions(size=(16, 16), channels=1)
N = 8  # batch size of the in-graph tests
LEAF = np.array([0, 1, 2, 0, 1, 2, 0, 1])  # normal, glioma, pituitary, ...


def _hier_targets():
    enc = H.encode([H.leaves[i] for i in LEAF])
    return {"leaf": enc["leaf"].astype("int32"), "root": enc["node:root"].astype("int32"),
            "tumor": enc["node:tumor"].astype("int32")}


def _draw(mixer, seed):
    """One mixed batch whose draw can be read back: image ``i`` is 1 in channel ``i`` only
    (the image inputs tell which case each pixel came from), and an identity target
    (row ``i`` = e_i) gives each row's lambda and partner exactly."""
    aug = Augmentation(flip=None, seed=seed)
    marked = np.ascontiguousarray(np.broadcast_to(
        np.eye(N, dtype="float32")[:, None, None, :], (N, 6, 6, N)))
    images = {"image": tf.constant(marked), "other": tf.constant(marked)}
    y = _hier_targets()
    soft = soft_targets({k: tf.constant(v) for k, v in y.items()}, target_widths(H, "hierarchy"))
    flat = tf.nest.flatten(soft)
    weight = tf.constant(np.arange(1, N + 1, dtype="float32")[:, None])
    ident = tf.eye(N)
    out_images, out = aug.mix(images, [*flat, weight, ident], [mixer])
    mixed = tf.nest.pack_sequence_as(soft, out[:len(flat)])
    return ({k: v.numpy() for k, v in out_images.items()},
            {k: v.numpy() for k, v in soft.items()}, {k: v.numpy() for k, v in mixed.items()},
            out[len(flat)].numpy()[:, 0], out[-1].numpy())


def test_soft_targets_one_hot_the_indices_and_zero_the_heads_that_do_not_apply():
    soft = soft_targets({k: tf.constant(v) for k, v in _hier_targets().items()},
                        target_widths(H, "hierarchy"))
    assert {k: tuple(v.shape) for k, v in soft.items()} == {"leaf": (N, 3), "root": (N, 2),
                                                            "tumor": (N, 2)}
    tumor = soft["tumor"].numpy()
    np.testing.assert_array_equal(tumor.sum(1), (LEAF > 0).astype("float32"))  # normal: 0 row
    np.testing.assert_array_equal(soft["leaf"].numpy(), np.eye(3)[LEAF])
    onehot = tf.constant(np.eye(3, dtype="float32")[LEAF])  # float one-hots pass unchanged
    assert soft_targets(onehot, 3) is onehot


@pytest.mark.parametrize("layer", ["mixup", "cutmix"])
def test_every_output_and_input_is_mixed_with_the_same_partner_and_lambda(layer):
    mixer = (keras.layers.MixUp(alpha=0.8, seed=3) if layer == "mixup"
             else keras.layers.CutMix(factor=1.0, seed=3))
    images, before, after, weight, ident = _draw(mixer, seed=3)
    lam = ident[np.arange(N), np.arange(N)]
    ident_off = ident.copy()
    ident_off[np.arange(N), np.arange(N)] = 0
    partner = np.where(ident_off.sum(1) > 0, ident_off.argmax(1), np.arange(N))
    assert np.allclose(ident.sum(1), 1) and ((lam > 0) & (lam <= 1)).all()
    assert (lam < 0.999).any(), "nothing was mixed"
    for name, t in before.items():  # every output: lam * own + (1 - lam) * partner's
        expect = lam[:, None] * t + (1 - lam[:, None]) * t[partner]
        np.testing.assert_allclose(after[name], expect, atol=1e-5, err_msg=name)
    w = np.arange(1, N + 1, dtype="float32")
    np.testing.assert_allclose(weight, lam * w + (1 - lam) * w[partner], atol=1e-4)
    for name, x in images.items():  # both image inputs: the same partner and lambda
        own = x[np.arange(N), :, :, np.arange(N)].mean(axis=(1, 2))
        other = x[np.arange(N), :, :, partner].mean(axis=(1, 2))
        mixed = partner != np.arange(N)
        # MixUp: exactly lambda; CutMix: the pasted box's share of pixels (Keras' lambda is
        # the box's real-valued area, so off by at most a pixel row/column of 6)
        tol = 1e-5 if layer == "mixup" else 2.5 / 6
        np.testing.assert_allclose(own[mixed], lam[mixed], atol=tol, err_msg=name)
        np.testing.assert_allclose(other[mixed], 1 - lam[mixed], atol=tol, err_msg=name)
    np.testing.assert_array_equal(images["image"], images["other"])


def test_mixed_hierarchical_targets_describe_one_mix():
    """Sums and cross-output consistency: the root target is the leaf target summed over
    each subtree, and the tumour head's (unnormalised) target is the leaf target on the
    tumour leaves, its mass the tumour share of the mix."""
    _, _, after, _, _ = _draw(keras.layers.MixUp(alpha=1.0, seed=5), seed=5)
    leaf, root, tumor = after["leaf"], after["root"], after["tumor"]
    np.testing.assert_allclose(leaf.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(root.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(root[:, 0], leaf[:, 0], atol=1e-6)  # normal
    np.testing.assert_allclose(root[:, 1], leaf[:, 1:].sum(1), atol=1e-6)  # tumour
    np.testing.assert_allclose(tumor, leaf[:, 1:], atol=1e-6)
    assert ((tumor.sum(1) > 1e-3) & (tumor.sum(1) < 0.999)).any(), "no partly-tumour row"


def _tree(root, per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("no_tumor", "glioma_tumor", "pituitary_tumor"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(
                root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("targets", ["leaf", "onehot", "hierarchy"])
def test_make_dataset_mixes_flat_and_hierarchical_targets(tmp_path, targets):
    index = index_folder(_tree(tmp_path / "tree"), H)
    cache = build_cache(index, OPTS, tmp_path / "c", workers=1)
    aug = Augmentation(mixup=0.4, cutmix=1.0, seed=1)
    ds = make_dataset(index.samples, H, OPTS, cache=cache, batch_size=6, training=True,
                      targets=targets, augment=aug, balance="weights")
    plain = make_dataset(index.samples, H, OPTS, cache=cache, batch_size=6,
                         targets=targets, balance="weights")
    w_plain = np.concatenate([w.numpy() for _, _, w in plain])
    for x, y, w in ds:
        assert x.shape[1:] == (16, 16, 1) and w.shape == (x.shape[0],)
        assert w_plain.min() - 1e-5 <= w.numpy().min() <= w.numpy().max() <= w_plain.max() + 1e-5
        leaf = (y["leaf"] if targets == "hierarchy" else y).numpy()
        assert leaf.shape == (x.shape[0], 3) and leaf.dtype == np.float32
        np.testing.assert_allclose(leaf.sum(1), 1.0, atol=1e-5)
        if targets == "hierarchy":
            np.testing.assert_allclose(y["root"].numpy()[:, 1], leaf[:, 1:].sum(1), atol=1e-5)
            np.testing.assert_allclose(y["tumor"].numpy(), leaf[:, 1:], atol=1e-5)
    # without mixing, the targets stay integer (validation batches, unchanged behaviour)
    y = next(iter(plain))[1]
    assert (y["leaf"] if targets == "hierarchy" else y).dtype == (
        tf.float32 if targets == "onehot" else tf.int32)


def test_loss_on_soft_targets_weights_each_row_by_its_applicable_mass():
    p = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]], "float32")
    loss = MaskedCrossentropy()
    hard = np.array([0, -1, 1])
    assert float(loss(np.eye(2, dtype="float32")[[0, 1, 1]] * [[1], [0], [1]], p)) == \
        pytest.approx(float(loss(hard, p)), abs=1e-6)  # one-hots (0 row = -1) = indices
    soft = np.array([[0.7, 0.3], [0.0, 0.0], [0.0, 0.4]], "float32")
    ce = -(soft * np.log(p)).sum(1)
    assert float(loss(soft, p)) == pytest.approx(ce.sum() / soft.sum(), rel=1e-5)
    np.testing.assert_allclose(MaskedCrossentropy(reduction="none")(soft, p), ce, rtol=1e-5)
    assert float(loss(np.zeros((3, 2), "float32"), p)) == 0.0  # nothing applies
    smooth = SmoothedSparseCategoricalCrossentropy(0.2)
    t = 0.8 * np.array([[1.0, 0.0]]) + 0.1
    assert float(smooth(np.array([[1.0, 0.0]], "float32"), p[:1])) == pytest.approx(
        float(-(t * np.log(p[:1])).sum()), rel=1e-5)
    assert isinstance(classification_loss(0.0), MaskedCrossentropy)


def test_head_losses_on_mixed_targets_sum_to_the_leaf_cross_entropy():
    """Why a conditional head keeps the mass of its mixed target: summed over the heads, the
    per-row losses equal the cross-entropy of the mixed leaf target under the leaf
    probabilities (the product of the heads along each path)."""
    _, _, after, _, _ = _draw(keras.layers.MixUp(alpha=1.0, seed=7), seed=7)
    rng = np.random.default_rng(0)
    heads = {k: rng.dirichlet(np.ones(2), N).astype("float32") for k in ("root", "tumor")}
    leaf_p = LeafProbabilities(H.to_config())([heads["root"], heads["tumor"]]).numpy()
    per_row = sum(MaskedCrossentropy(reduction="none")(after[k], heads[k]).numpy()
                  for k in heads)
    np.testing.assert_allclose(per_row, -(after["leaf"] * np.log(leaf_p)).sum(1), rtol=1e-5)


def test_training_metrics_take_soft_targets():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], "float32")
    soft = np.array([[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]], "float32")
    for m in default_metrics(2):
        m.update_state(soft, p)
        ref = {"accuracy": 2 / 3}.get(m.name)
        if ref is not None:
            assert float(m.result()) == pytest.approx(ref)
        assert np.isfinite(float(m.result())), m.name


@pytest.mark.slow
def test_flat_model_trains_on_mixed_batches_and_validates_on_integer_ones(tmp_path):
    index = index_folder(_tree(tmp_path / "tree", per_class=2), H)
    opts = ImageOptions(size=(32, 32), channels=1)
    common = dict(hierarchy=H, options=opts, batch_size=6, targets="leaf",
                  cache=build_cache(index, opts, tmp_path / "c", workers=1))
    train = make_dataset(index.samples, training=True,
                         augment=Augmentation(mixup=0.4, cutmix=1.0, seed=0), **common)
    result = Trainer(flat_model(3), epochs=1, jit_compile=False, verbose=0).fit(
        train, make_dataset(index.samples, **common))
    assert np.isfinite(result.history["loss"][0]) and np.isfinite(result.history["val_loss"][0])
    assert 0.0 <= result.history["accuracy"][0] <= 1.0


@pytest.mark.slow
def test_kmedtl_run_trains_with_mixup_and_cutmix(tmp_path, capsys):
    path = write_pipeline(tmp_path, per_class=4, stages=["audit", "split", "train", "evaluate"],
                          augment={"flip": "horizontal", "mixup": 0.4, "cutmix": 1.0},
                          train={"epochs": 1, "batch_size": 6, "model": "hierarchical",
                                 "leaf_loss_weight": 0.5})
    assert kmedtl_main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "pipe"
    tm = json.loads((run / "train_metrics.json").read_text())
    losses = [v for k, v in tm["history"].items() if k.endswith("loss") and "val" not in k]
    assert len(losses) >= 3 and all(np.isfinite(v).all() for v in losses)  # leaf, root, tumor
    assert 0.0 <= tm["history"]["leaf_accuracy"][0] <= 1.0
    assert json.loads((run / "metrics.json").read_text())["n_test"] > 0
    assert "complete" in capsys.readouterr().out
