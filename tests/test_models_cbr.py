"""From-scratch families (CBR, parallel ResNet) and Transfusion weight scaling."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from models_helpers import images, randomise_batchnorm

from kmedtl.errors import ModelError
from kmedtl.models import CBR_CONFIGS, FlatClassifier, backbone, transfusion_scale
from kmedtl.models.parallel_resnet import parallel_resnet

# Raghu et al. 2019 (arXiv:1902.07208): channels and kernel size of each CBR network.
PAPER = {
    "cbr_larget": ((32, 64, 128, 256, 512), 7),
    "cbr_largew": ((64, 128, 256, 512), 7),
    "cbr_small": ((32, 64, 128, 256), 7),
    "cbr_tiny": ((64, 128, 256, 512), 5),
}


def test_cbr_configs_are_the_papers():
    assert CBR_CONFIGS == PAPER


@pytest.mark.parametrize("name", sorted(PAPER))
def test_cbr_is_conv_bn_relu_then_3x3_stride2_pool(name):
    filters, k = PAPER[name]
    bb = backbone(name, input_shape=(32, 32, 1))
    convs = [la for la in bb.layers if isinstance(la, keras.layers.Conv2D)]
    pools = [la for la in bb.layers if isinstance(la, keras.layers.MaxPooling2D)]
    assert [c.filters for c in convs] == list(filters)
    assert all(c.kernel_size == (k, k) and c.strides == (1, 1) for c in convs)
    assert all(p.pool_size == (3, 3) and p.strides == (2, 2) for p in pools)
    kinds = [type(la).__name__ for la in bb.layers[2:]]
    assert kinds == ["Conv2D", "BatchNormalization", "ReLU", "MaxPooling2D"] * len(filters)
    # conv weights (no bias: BN follows) + BN (4 per channel)
    cins = (1, *filters[:-1])
    expected = sum(k * k * ci * co + 4 * co for ci, co in zip(cins, filters))
    assert bb.count_params() == expected
    assert bb.output_shape == (None, 32 // 2 ** len(filters) or 1, 32 // 2 ** len(filters) or 1,
                               filters[-1])


def test_cbr_network_ends_with_global_average_pooling_under_a_head():
    model = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 2)
    assert isinstance(model.get_layer("pool"), keras.layers.GlobalAveragePooling2D)


def test_parallel_resnet_has_parallel_kernels_residuals_and_bn():
    bb = backbone("parallel_resnet", input_shape=(32, 32, 1))
    for k in (1, 3, 5, 7):
        assert bb.get_layer(f"block2_conv{k}x{k}").kernel_size == (k, k)
    concat = bb.get_layer("block2_concat")
    assert len(concat._inbound_nodes[0].input_tensors) == 4
    assert isinstance(bb.get_layer("block1_add"), keras.layers.Add)
    assert isinstance(bb.get_layer("block2_bn1"), keras.layers.BatchNormalization)
    assert bb.output_shape == (None, 4, 4, 256)


def test_parallel_resnet_checks_its_widths():
    with pytest.raises(ModelError, match="divisible"):
        parallel_resnet(input_shape=(32, 32, 1), filters=(30, 60))


# ---------------------------------------------------------------------------- Transfusion
@pytest.fixture()
def pretrained_like():
    """A CBR network whose tensors have distinct non-zero means and spreads."""
    bb = backbone("cbr_small", input_shape=(32, 32, 1))
    rng = np.random.default_rng(0)
    for i, var in enumerate(bb.trainable_weights):
        var.assign(rng.normal(0.1 * (i + 1), 0.02 * (i + 1), var.shape).astype("float32"))
    randomise_batchnorm(bb)
    return bb


def test_transfusion_scale_matches_each_tensors_moments(pretrained_like):
    before = {v.path: np.asarray(v) for v in pretrained_like.trainable_weights}
    transfusion_scale(pretrained_like, seed=1)
    for var in pretrained_like.trainable_weights:
        old, new = before[var.path], np.asarray(var)
        assert not np.allclose(old, new)  # re-drawn ...
        tol = 4 / np.sqrt(old.size)  # ... with the same mean and std (sampling error)
        assert abs(new.mean() - old.mean()) <= tol * old.std() + 1e-7
        assert abs(new.std() / old.std() - 1) <= max(tol, 0.05)
    bn = pretrained_like.get_layer("block1_bn")
    np.testing.assert_array_equal(bn.moving_mean, 0.0)
    np.testing.assert_array_equal(bn.moving_variance, 1.0)


def test_transfusion_scale_is_reproducible_and_seed_dependent(pretrained_like):
    clone = keras.models.clone_model(pretrained_like)
    clone.set_weights(pretrained_like.get_weights())
    a = transfusion_scale(pretrained_like, seed=3).get_weights()
    b = transfusion_scale(clone, seed=3).get_weights()
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = transfusion_scale(clone, seed=4).get_weights()
    assert not np.allclose(a[0], c[0])
    out = pretrained_like(images(2, 32, 1))
    assert np.all(np.isfinite(np.asarray(out)))
