"""Backbone registry, truncation, ImageNet loading and 1-channel folding."""

from __future__ import annotations

import keras
import keras.src.utils.file_utils as keras_file_utils
import numpy as np
import pytest
from models_helpers import images, randomise_batchnorm

from kmedtl.errors import ModelError
from kmedtl.models import (
    BACKBONES,
    Backbone,
    ImagePreprocessing,
    backbone,
    backbone_names,
    cut_points,
    get_spec,
    save_backbone,
    truncate,
)

REQUIRED = (
    [f"resnet{d}" for d in (50, 101, 152)]
    + [f"resnet{d}v2" for d in (50, 101, 152)]
    + [f"densenet{d}" for d in (121, 169, 201)]
    + [f"efficientnetb{i}" for i in range(8)]
    + [f"efficientnetv2{v}" for v in ("b0", "b1", "b2", "b3", "s", "m", "l")]
    + ["mobilenetv2", "mobilenetv3small", "mobilenetv3large", "vgg16", "vgg19"]
    + ["inceptionv3", "xception"]
    + [f"convnext_{s}" for s in ("tiny", "small", "base", "large", "xlarge")]
    + ["cbr_tiny", "cbr_small", "cbr_larget", "cbr_largew", "parallel_resnet"]
)


def test_registry_lists_every_required_family():
    assert set(REQUIRED) <= set(backbone_names())


@pytest.mark.parametrize(
    "name, mode, min_size",
    [
        ("resnet50", "caffe", 32), ("vgg19", "caffe", 32), ("resnet101v2", "tf", 32),
        ("densenet169", "torch", 32), ("efficientnetb3", "none", 32),
        ("efficientnetv2s", "none", 32), ("mobilenetv2", "tf", 32),
        ("mobilenetv3large", "none", 32), ("inceptionv3", "tf", 75), ("xception", "tf", 71),
        ("convnext_base", "none", 32), ("cbr_tiny", "unit", 32),
    ],
)
def test_registry_entry_knows_preprocessing_and_min_size(name, mode, min_size):
    spec = get_spec(name)
    assert (spec.preprocessing, spec.min_size) == (mode, min_size)


def test_family_names_ignore_case_and_separators():
    assert get_spec("ResNet-50").name == "resnet50"
    assert get_spec("CBR_Tiny").name == "cbr_tiny"
    assert get_spec("ConvNeXtTiny").name == "convnext_tiny"


def test_unknown_family_lists_known_ones():
    with pytest.raises(ModelError) as err:
        backbone("resnet49")
    assert "resnet49" in str(err.value) and "densenet121" in str(err.value)


def test_too_small_input_names_the_minimum():
    with pytest.raises(ModelError, match="75x75"):
        backbone("inceptionv3", input_shape=(64, 64, 3))


def test_imagenet_for_from_scratch_family_is_refused():
    with pytest.raises(ModelError, match="no ImageNet weights"):
        backbone("cbr_tiny", weights="imagenet", input_shape=(32, 32, 1))


# ---------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_in_model_preprocessing_matches_keras_preprocess_input(mode):
    x = images(2, 8, 3)
    expected = keras.applications.imagenet_utils.preprocess_input(x * 255.0, mode=mode)
    got = np.asarray(ImagePreprocessing(mode)(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_backbone_records_its_input_contract():
    assert backbone("vgg16", input_shape=(32, 32, 3)).preprocessing == "unit"
    raw = backbone("vgg16", input_shape=(32, 32, 3), include_preprocessing=False)
    assert raw.preprocessing == "caffe"


# ---------------------------------------------------------------------------- cut points
FAMILY_SAMPLES = [
    ("resnet50", 32), ("resnet50v2", 32), ("densenet121", 32), ("efficientnetb0", 32),
    ("efficientnetv2b0", 32), ("mobilenetv2", 32), ("mobilenetv3small", 32), ("vgg16", 32),
    ("inceptionv3", 75), ("xception", 71), ("convnext_tiny", 32), ("cbr_tiny", 32),
    ("parallel_resnet", 32),
]


@pytest.mark.parametrize("name, size", [  # the three largest builds are slow
    pytest.param(n, s, marks=pytest.mark.slow)
    if n in ("densenet121", "inceptionv3", "efficientnetv2b0") else (n, s)
    for n, s in FAMILY_SAMPLES])
def test_every_family_has_ordered_named_cuts_ending_at_the_full_model(name, size):
    cps = cut_points(name, input_shape=(size, size, 3))
    assert len(cps) >= 4
    params = [c.params for c in cps]
    assert params == sorted(params) and len(set(params)) == len(params)
    assert cps[-1].kind == "stage"
    full = backbone(name, input_shape=(size, size, 3))
    assert cps[-1].params == full.count_params()
    assert cps[-1].output_shape == full.output_shape
    middle = cps[len(cps) // 2]
    cut = backbone(name, input_shape=(size, size, 3), cut=middle.name)
    assert (cut.count_params(), cut.output_shape) == (middle.params, middle.output_shape)


def test_resnet50_cut_names_are_its_blocks():
    names = [c.name for c in cut_points("resnet50", input_shape=(32, 32, 3))]
    expected = (
        ["conv2_block3_out"]
        + [f"conv3_block{i}_out" for i in range(1, 5)]
        + [f"conv4_block{i}_out" for i in range(1, 7)]
        + [f"conv5_block{i}_out" for i in range(1, 4)]
    )
    assert names == expected


@pytest.mark.slow
def test_deeper_variant_gets_its_own_blocks():
    names = [c.name for c in cut_points("resnet101", input_shape=(32, 32, 3))]
    assert "conv4_block23_out" in names and "conv4_block24_out" not in names


def test_densenet121_cuts_are_transitions():
    names = [c.name for c in cut_points("densenet121", input_shape=(32, 32, 3))]
    assert names == ["pool2_pool", "pool3_pool", "pool4_pool", "relu"]


def test_truncated_resnet50_keeps_about_a_quarter_of_the_parameters():
    full = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    cut = backbone("resnet50", cut="conv4_block4_out", input_shape=(32, 32, 3))
    ratio = cut.count_params() / full.count_params()
    assert 0.2 < ratio < 0.35
    assert cut.output_shape == (None, 2, 2, 1024)
    assert cut.layers[-1].name == "conv4_block4_out"


def test_unknown_cut_lists_named_cuts():
    with pytest.raises(ModelError) as err:
        backbone("vgg16", cut="block9_pool", input_shape=(32, 32, 3))
    assert "block9_pool" in str(err.value) and "block3_pool" in str(err.value)


def test_any_layer_name_is_a_cut_and_truncate_works_on_models():
    bb = backbone("resnet50", cut="conv3_block2_1_relu", input_shape=(32, 32, 3))
    assert bb.output_shape == (None, 4, 4, 128)
    full = backbone("vgg16", input_shape=(32, 32, 3))
    sub = truncate(full, "block2_pool")
    assert sub.output_shape == (None, 8, 8, 128)
    assert sub.get_layer("block1_conv1") is full.get_layer("block1_conv1")  # weights shared


def test_xception_layer_names_do_not_depend_on_what_was_built_before():
    first = [c.name for c in cut_points("xception", input_shape=(71, 71, 3))]
    keras.layers.Add()  # consume auto-names, as other models in the process would
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    second = Backbone("xception", input_shape=(71, 71, 3))
    assert [c.name for c in second.named_cuts()] == first
    assert second.get_layer("add_3") is not None


# ---------------------------------------------------------------------------- weights
@pytest.fixture(scope="module")
def fake_resnet50_imagenet(tmp_path_factory):
    """A randomly initialised ResNet50 saved where keras' download would put its weights."""
    model = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    randomise_batchnorm(model, seed=1)
    path = tmp_path_factory.mktemp("weights") / "resnet50_notop.weights.h5"
    model.save_weights(path)
    return model, path


def _patch_download(monkeypatch, path):
    calls = []

    def fake_get_file(fname=None, origin=None, *args, **kwargs):
        calls.append((fname, origin))
        return str(path)

    # keras.applications call keras.src.utils.file_utils.get_file (the module attribute).
    monkeypatch.setattr(keras_file_utils, "get_file", fake_get_file)
    return calls


@pytest.mark.slow
def test_imagenet_weights_come_through_the_keras_download_path(
    monkeypatch, fake_resnet50_imagenet
):
    reference, path = fake_resnet50_imagenet
    calls = _patch_download(monkeypatch, path)
    bb = backbone("resnet50", weights="imagenet", input_shape=(32, 32, 3))
    assert calls and "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in calls[0][1]
    for name in ("conv1_conv", "conv3_block2_2_conv", "conv5_block3_3_bn"):
        for got, want in zip(bb.get_layer(name).get_weights(),
                             reference.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)
    # The in-model caffe preprocessing on [0, 1] equals keras' preprocess_input on 0-255.
    x = images(2, 32, 3)
    stock = reference(keras.applications.resnet50.preprocess_input(x * 255.0))
    np.testing.assert_allclose(bb(x), stock, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_imagenet_weights_fold_into_a_grey_truncated_model(monkeypatch, fake_resnet50_imagenet):
    reference, path = fake_resnet50_imagenet
    _patch_download(monkeypatch, path)
    grey = backbone("resnet50", weights="imagenet", cut="conv1_conv", input_shape=(32, 32, 1))
    assert grey.get_layer("conv1_conv").kernel.shape == (7, 7, 1, 64)
    x = images(2, 32, 1)
    rgb_in = keras.applications.resnet50.preprocess_input(np.repeat(x, 3, -1) * 255.0)
    want = np.asarray(keras.Model(reference.input, reference.get_layer("conv1_conv").output)(
        rgb_in))
    got = np.asarray(grey(x))
    # caffe subtracts a per-channel mean: exact away from the zero-padded border.
    np.testing.assert_allclose(got[:, 2:-2, 2:-2], want[:, 2:-2, 2:-2], rtol=1e-4, atol=1e-3)
    assert not np.allclose(got, want, atol=1e-3)  # the border really is different
    deep = backbone("resnet50", weights="imagenet", cut="conv3_block1_out",
                    input_shape=(32, 32, 1))
    np.testing.assert_array_equal(
        deep.get_layer("conv2_block1_1_conv").kernel,
        reference.get_layer("conv2_block1_1_conv").kernel,
    )


@pytest.mark.slow
def test_imagenet_efficientnet_uses_the_weight_dependent_graph(monkeypatch, tmp_path):
    # keras builds EfficientNet with an extra rescaling for ImageNet weights; kmedtl folds it.
    stock_random = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(32, 32, 3))
    randomise_batchnorm(stock_random, seed=2)
    path = tmp_path / "effb0.weights.h5"
    stock_random.save_weights(path)
    _patch_download(monkeypatch, path)
    stock = keras.applications.EfficientNetB0(
        include_top=False, weights="imagenet", input_shape=(32, 32, 3))
    bb = backbone("efficientnetb0", weights="imagenet", input_shape=(32, 32, 3))
    x = images(2, 32, 3)
    np.testing.assert_allclose(bb(x), stock(x * 255.0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family, size", [
    pytest.param("resnet50v2", 32, marks=pytest.mark.slow), ("mobilenetv2", 32)])
def test_grey_model_equals_rgb_model_on_repeated_grey(tmp_path, family, size):
    """'tf' preprocessing has one offset for all channels: the fold is exact everywhere."""
    rgb = backbone(family, input_shape=(size, size, 3))
    randomise_batchnorm(rgb)
    path = save_backbone(rgb, tmp_path / f"{family}.weights.h5")
    grey = backbone(family, weights=path, input_shape=(size, size, 1))
    conv = next(la for la in grey.layers if isinstance(la, keras.layers.Conv2D))
    assert conv.kernel.shape[-2] == 1  # folded, not a 3-channel copy
    x = images(3, size, 1)
    np.testing.assert_allclose(grey(x), rgb(np.repeat(x, 3, -1)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_grey_fold_handles_builtin_normalisation_from_keras_file(tmp_path):
    rgb = backbone("efficientnetb0", input_shape=(32, 32, 3))
    norm = rgb.get_layer("normalization")
    norm.set_weights([np.array([0.4, 0.5, 0.6], "float32"),
                      np.array([0.05, 0.06, 0.07], "float32"), norm.get_weights()[2]])
    randomise_batchnorm(rgb)
    path = save_backbone(rgb, tmp_path / "effb0.keras")
    grey = backbone("efficientnetb0", weights=path, input_shape=(32, 32, 1), cut="block3b_add")
    x = images(2, 32, 1)
    want = keras.Model(rgb.input, rgb.get_layer("block3b_add").output)(np.repeat(x, 3, -1))
    np.testing.assert_allclose(grey(x), want, rtol=1e-3, atol=1e-4)


def test_weights_of_another_family_are_rejected_with_the_missing_layers(tmp_path):
    path = save_backbone(backbone("cbr_tiny", input_shape=(32, 32, 1), model_name="my_net"),
                         tmp_path / "tiny.weights.h5")
    with pytest.raises(ModelError, match="does not fit"):
        backbone("cbr_larget", weights=path, input_shape=(32, 32, 1))
    with pytest.raises(ModelError, match="no layer 'conv1_conv'"):
        backbone("resnet50", weights=path, input_shape=(32, 32, 3))


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_deeper_sibling_family_weights_are_refused(tmp_path, suffix):
    # cbr_larget's first four blocks have cbr_small's names and shapes, not its meaning.
    path = save_backbone(backbone("cbr_larget", input_shape=(32, 32, 1)),
                         tmp_path / f"larget{suffix}")
    with pytest.raises(ModelError, match="holds a cbr_larget backbone"):
        backbone("cbr_small", weights=path, input_shape=(32, 32, 1))
    assert backbone("cbr_larget", weights=path, cut="block2_pool", input_shape=(32, 32, 1))


def test_backbone_class_refuses_a_weight_dependent_graph():
    with pytest.raises(ModelError, match="kmedtl.models.backbone"):
        Backbone("efficientnetb0", weights="imagenet", input_shape=(32, 32, 3))


def test_unsupported_weights_argument():
    with pytest.raises(ModelError, match="not found"):
        backbone("cbr_tiny", weights="missing.weights.h5", input_shape=(32, 32, 1))
    with pytest.raises(ModelError, match="imagenet"):
        backbone("cbr_tiny", weights=3, input_shape=(32, 32, 1))


def test_registry_covers_all_cut_finders():
    assert all(callable(spec.cuts) for spec in BACKBONES.values())
