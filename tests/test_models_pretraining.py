"""Same-domain pretraining (supervised and contrastive) and transfer into new models."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from models_helpers import images, tumour_hierarchy

from kmedtl.models import (
    ContrastivePretrainer,
    HierarchicalClassifier,
    backbone,
    nt_xent,
    pretrain_backbone,
    save_backbone,
)


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_pretrained_backbone_transfers_into_a_truncated_target(tmp_path, suffix):
    source = backbone("cbr_small", input_shape=(32, 32, 1))
    x, y = images(8), np.arange(8) % 2
    result = pretrain_backbone(source, x, y, classes=["lung", "heart"],
                               path=tmp_path / f"src{suffix}", fit_kwargs={"epochs": 1})
    assert result.path.exists() and np.isfinite(result.history.history["loss"][0])
    target = backbone("cbr_small", weights=result.path, cut="block3_pool",
                      input_shape=(32, 32, 1))
    assert target.output_shape == (None, 4, 4, 128)
    for name in ("block1_conv", "block3_bn"):
        for a, b in zip(target.get_layer(name).get_weights(),
                        source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    model = HierarchicalClassifier(target, tumour_hierarchy())
    assert model.backbone is target


def test_grey_source_transfers_into_rgb_target_is_refused(tmp_path):
    path = save_backbone(backbone("cbr_tiny", input_shape=(32, 32, 1)), tmp_path / "g.keras")
    from kmedtl.errors import ModelError

    with pytest.raises(ModelError, match="channel"):
        backbone("cbr_tiny", weights=path, input_shape=(32, 32, 3))


def _nt_xent_reference(a, b, t):
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T / t
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        others = np.delete(sim[i], i)
        total += -(sim[i, j] - np.log(np.exp(others).sum()))
    return total / (2 * n)


def test_nt_xent_matches_a_direct_implementation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    got = float(nt_xent(a.astype("float32"), b.astype("float32"), 0.5))
    assert got == pytest.approx(_nt_xent_reference(a, b, 0.5), rel=1e-4)
    aligned = float(nt_xent(a.astype("float32"), (a + 0.01).astype("float32"), 0.5))
    assert aligned < got  # matching views are rewarded


@pytest.mark.slow
def test_contrastive_pretraining_learns_from_unlabelled_images(tmp_path):
    bb = backbone("cbr_tiny", input_shape=(32, 32, 1))
    pre = ContrastivePretrainer(bb, projection_dim=16, hidden_dim=32)
    before = bb.get_layer("block1_conv").get_weights()[0].copy()
    pre.compile(optimizer=keras.optimizers.Adam(1e-2))
    hist = pre.fit(images(8), epochs=1, batch_size=4, verbose=0)  # no labels
    assert np.isfinite(hist.history["loss"][0])
    assert not np.allclose(before, bb.get_layer("block1_conv").get_weights()[0])
    z = pre.predict(images(2), verbose=0)
    np.testing.assert_allclose(z[:, :16], z[:, 16:], rtol=1e-5)  # no augmentation at inference
    path = save_backbone(pre, tmp_path / "ssl.weights.h5")
    target = backbone("cbr_tiny", weights=path, input_shape=(32, 32, 1))
    np.testing.assert_array_equal(target.get_layer("block1_conv").kernel, bb.get_layer(
        "block1_conv").kernel)
