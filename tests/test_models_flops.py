"""Analytic FLOP counting used by the truncation benchmark."""

from __future__ import annotations

import keras
import pytest

from kmedtl.models import MultiInputClassifier, backbone, count_flops


def test_conv_dense_and_depthwise_flops_follow_the_formulas():
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3),                     # 6*6*4 outputs x 27 MACs
        keras.layers.DepthwiseConv2D(3, padding="same"),  # 6*6*4 x 9
        keras.layers.Conv2D(8, 1, groups=2),            # 6*6*8 x 2
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5),                          # 8 x 5
    ])
    assert count_flops(model) == 2 * (6 * 6 * 4 * 27 + 6 * 6 * 4 * 9 + 6 * 6 * 8 * 2 + 8 * 5)


def test_resnet50_flops_match_the_published_figure():
    # ~3.9 GMACs for the 224 px convolutional part (He et al. 2016 report 3.8e9 FLOPs = MACs)
    gflops = count_flops(backbone("resnet50", input_shape=(224, 224, 3))) / 1e9
    assert gflops == pytest.approx(7.7, abs=0.3)


def test_truncation_cuts_flops_and_shared_backbones_count_per_call():
    full = count_flops(backbone("cbr_tiny", input_shape=(32, 32, 1)))
    cut = count_flops(backbone("cbr_tiny", cut="block2_pool", input_shape=(32, 32, 1)))
    assert 0 < cut < full
    shared = MultiInputClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 3,
                                  input_names=["a", "b"])
    assert count_flops(shared) == 2 * full + 2 * 1024 * 3
