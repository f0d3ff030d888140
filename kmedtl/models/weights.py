"""Moving weights between backbones: files, name matching and 1-channel folding.

* :func:`save_backbone` writes a backbone (or the ``.backbone`` of a classifier) to
  ``.keras`` or ``.weights.h5``; :func:`kmedtl.models.backbone` with ``weights=<path>``
  reads it back into any family member of the same architecture -- truncated or not,
  1 or 3 channels -- matching layers **by name** (registry backbones have reproducible
  names, see :func:`kmedtl.models.backbones.canonicalise_names`); that reading step,
  :func:`~kmedtl.models.load_backbone_weights`, builds backbones, so it lives in
  :mod:`kmedtl.models.backbones`, above the primitives here.
* :func:`transfer_weights` copies weights model-to-model by layer name and folds the first
  convolution when the input channels or the input normalisation differ.

Folding RGB kernels into a grey model
-------------------------------------
Grey images are *not* repeated three times.  Instead the first convolution of the
1-channel model gets ``K = sum_c W_c * a_c / alpha`` and its bias (or, for a bias-free
convolution, the following BatchNorm's moving mean) absorbs the constant term, where
``x_c = a_c * g + b_c`` is the per-channel affine map from a grey input ``g`` in ``[0, 1]``
to the 3-channel model's first-conv input and ``y = alpha * g + beta`` the 1-channel
model's.  The affine maps are *measured* by running each model's input stage (kmedtl's
``ImagePreprocessing`` plus whatever rescaling/normalisation layers the keras model has)
on constant images, so caffe's BGR flip and mean, torch's mean/std and EfficientNet's
built-in normalisation are all handled the same way.

Exactness: the folded model equals the 3-channel model on ``repeat(g, 3)`` everywhere
when every channel has the same offset in input units (``b_c / a_c == beta / alpha``:
modes ``"tf"``, ``"unit"``, ``"none"`` with a scale-only rescaling, ConvNeXt's stem without
padding).  For per-channel means (``"caffe"``, ``"torch"``) it is exact away from the image
border; in the first convolution's zero-padded border the 3-channel model pads with the
per-channel mean colour and the grey model with the grey mean, a difference of
``|b_c/a_c - beta/alpha|`` (about 0.04 in [0, 1] units for ImageNet means).  The affine
maps are measured in the model's compute dtype, so under a mixed-precision policy the fold
is only as exact as float16/bfloat16.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np

from kmedtl.errors import ModelError

# ---------------------------------------------------------------------------- helpers


def leaf_layers(model) -> list:
    """Every non-container layer of ``model``, nested models flattened, in order."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(leaf_layers(layer))
        else:
            out.append(layer)
    return out


def _weighted(model):
    return [layer for layer in leaf_layers(model) if layer.weights]


def _inbound_input(op):
    """The tensor fed to ``op`` in its (first) call in the enclosing graph."""
    # Layer.input would return a nested model's *own* Input; the inbound node knows the
    # outer tensor.  (Private Keras attribute, stable across Keras 3 releases.)
    return op._inbound_nodes[0].input_tensors[0]


def first_conv(model):
    """``(conv_layer, input_tensor, follower)``: the first convolution of ``model``.

    ``input_tensor`` is the tensor fed to it in ``model``'s graph (for a conv inside a
    nested model, e.g. ConvNeXt's stem, the nested model's input); ``follower`` is the op
    consuming the conv output (to absorb offsets into a BatchNorm) or ``None``.
    """
    for op in model.operations:
        if isinstance(op, keras.Model):
            inner = [la for la in op.layers if la.weights]
            if inner and _is_conv(inner[0]) and inner[0] is op.layers[0]:
                nxt = op.layers[1] if len(op.layers) > 1 else None
                return inner[0], _inbound_input(op), nxt
            if inner:
                break
            continue
        if _is_conv(op):
            nodes = op._outbound_nodes
            return op, _inbound_input(op), nodes[0].operation if len(nodes) == 1 else None
    raise ModelError(f"{model.name}: no convolution found to fold the input channels into")


def _is_conv(layer) -> bool:
    kernel = getattr(layer, "kernel", None)
    return kernel is not None and len(kernel.shape) == 4 and not isinstance(
        layer, keras.layers.DepthwiseConv2D
    )


def input_affine(model, conv_input) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(a, b)`` with ``conv_input = a * g + b`` for a constant grey image ``g``."""
    sub = keras.Model(model.input, conv_input)
    h, w, c = model.input_shape[1:]
    h, w = h or 64, w or 64
    zeros = np.zeros((1, h, w, c), "float32")
    ones = np.ones((1, h, w, c), "float32")
    y0 = np.asarray(keras.ops.convert_to_numpy(sub(zeros, training=False)), "float64")
    y1 = np.asarray(keras.ops.convert_to_numpy(sub(ones, training=False)), "float64")
    i, j = y0.shape[1] // 2, y0.shape[2] // 2  # centre pixel: away from any padding
    return y1[0, i, j] - y0[0, i, j], y0[0, i, j]


# ---------------------------------------------------------------------------- reading files


def read_weight_file(path) -> dict[str, list[np.ndarray]]:
    """``{layer name: [arrays]}`` from a ``.keras`` model or a Keras 3 ``.weights.h5`` file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights={str(path)!r}: file not found")
    name = path.name
    if name.endswith(".keras"):
        model = keras.saving.load_model(path, compile=False)
        out: dict[str, list[np.ndarray]] = {}
        for layer in _weighted(model):
            out.setdefault(layer.name, [np.asarray(w) for w in layer.get_weights()])
        return out
    if name.endswith(".weights.h5"):
        return _read_weights_h5(path)
    raise ModelError(
        f"weights={str(path)!r}: unsupported file type; use a .keras model, a Keras 3 "
        ".weights.h5 file, or a legacy keras.applications .h5 file"
    )


def _read_weights_h5(path) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        def visit(_, obj):
            if isinstance(obj, h5py.Group) and "name" in obj.attrs and len(obj):
                keys = sorted((k for k in obj.keys() if k.isdigit()), key=int)
                if keys:
                    out.setdefault(str(obj.attrs["name"]), [np.asarray(obj[k]) for k in keys])

        f.visititems(visit)
    if not out:
        raise ModelError(
            f"weights={str(path)!r}: no named layer weights found (files written by Keras "
            "older than 3.10 carry no layer names); re-save it with this Keras version"
        )
    return out


def _container_names(path) -> set[str]:
    """Names of the models stored in a weight file (the file's model and nested ones)."""
    path = Path(path)
    if path.name.endswith(".keras"):
        with zipfile.ZipFile(path) as z:
            text = z.read("config.json").decode()
        names = set()

        def walk(obj):
            if isinstance(obj, dict):
                cfg = obj.get("config")
                if isinstance(cfg, dict) and obj.get("class_name") and "name" in cfg and (
                    "family" in cfg or "layers" in cfg or "backbone" in cfg
                ):
                    names.add(str(cfg.get("family", cfg["name"])))
                for v in obj.values():
                    walk(v)
            elif isinstance(obj, list):
                for v in obj:
                    walk(v)

        walk(json.loads(text))
        return names
    names = set()
    with h5py.File(path, "r") as f:
        def visit(name, obj):  # a model's group holds "layers" next to its "vars"
            if isinstance(obj, h5py.Group) and name.endswith("vars") and "name" in obj.attrs \
                    and "layers" in obj.parent:
                names.add(str(obj.attrs["name"]))

        f.visititems(visit)
        if "vars" in f and "name" in f["vars"].attrs:
            names.add(str(f["vars"].attrs["name"]))
    return names


# ---------------------------------------------------------------------------- assignment


def assign_by_name(model, arrays: dict[str, list[np.ndarray]], source: str = "weights"):
    """Set every weighted layer of ``model`` from ``arrays[layer.name]``; shapes must match."""
    missing, mismatched = [], []
    for layer in _weighted(model):
        values = arrays.get(layer.name)
        if values is None:
            missing.append(layer.name)
            continue
        want = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for v in values]
        if want != got:
            mismatched.append(f"{layer.name}: model {want} vs file {got}")
            continue
        layer.set_weights(values)
    if missing or mismatched:
        raise ModelError(
            f"{source}: does not fit backbone {model.name!r}: "
            + (f"{len(missing)} layer(s) missing, e.g. {missing[:5]}; " if missing else "")
            + (f"shape mismatch: {mismatched[:3]}; " if mismatched else "")
            + "the file must come from the same family (save it with save_backbone)"
        )


def _channel_mean(values, channels):
    return [v.mean(axis=-1, keepdims=True) if v.ndim and v.shape[-1] == channels else v
            for v in values]


def transfer_weights(source: keras.Model, target: keras.Model) -> dict:
    """Copy weights from ``source`` to ``target`` by layer name, folding the first conv.

    Every weighted layer of ``target`` must exist in ``source`` (a truncated target takes
    the layers below its cut).  The first convolution is copied as is when the two models
    feed it the same input; otherwise (1 vs 3 channels, different built-in normalisation)
    it is folded as described in the module docstring.  Weighted layers *before* the first
    convolution whose channel axis differs (EfficientNet's ``Normalization``) get the
    channel mean; the fold then compensates exactly.  Returns a small report.
    """
    src_layers = {}
    for layer in _weighted(source):
        src_layers.setdefault(layer.name, layer)
    conv_t, in_t, follow_t = first_conv(target)
    conv_s, in_s, _ = first_conv(source)
    c_src = conv_s.kernel.shape[-2]
    c_dst = conv_t.kernel.shape[-2]
    if c_dst not in (1, c_src):
        raise ModelError(
            f"cannot transfer {c_src}-channel first-layer weights into a {c_dst}-channel "
            f"model {target.name!r}; use input_shape with 1 or {c_src} channels"
        )
    pre_conv = _layers_before(target, in_t)
    report = {"copied": [], "folded": None, "missing": []}
    for layer in _weighted(target):
        if layer is conv_t:
            continue
        src = src_layers.get(layer.name)
        if src is None:
            report["missing"].append(layer.name)
            continue
        values = src.get_weights()
        if id(layer) in pre_conv and c_dst != c_src:
            values = _channel_mean(values, c_src)
        if [tuple(v.shape) for v in values] != [tuple(w.shape) for w in layer.weights]:
            raise ModelError(
                f"layer {layer.name!r}: weights of shapes {[v.shape for v in values]} do not "
                f"fit {[tuple(w.shape) for w in layer.weights]}; source and target must be "
                "the same family"
            )
        layer.set_weights(values)
        report["copied"].append(layer.name)
    if report["missing"]:
        raise ModelError(
            f"source {source.name!r} lacks {len(report['missing'])} layer(s) of target "
            f"{target.name!r}, e.g. {report['missing'][:5]}; is it the same family and cut "
            "at or below the target's cut?"
        )
    a_s, b_s = input_affine(source, in_s)
    a_t, b_t = input_affine(target, in_t)
    if c_dst == c_src and np.allclose(a_s, a_t) and np.allclose(b_s, b_t):
        conv_t.set_weights(conv_s.get_weights())
        report["copied"].append(conv_t.name)
        return report
    _fold(conv_s, conv_t, follow_t, (a_s, b_s), (a_t, b_t))
    report["folded"] = conv_t.name
    return report


def _layers_before(model, tensor) -> set:
    sub = keras.Model(model.input, tensor)
    return {id(la) for la in leaf_layers(sub)}


def _fold(conv_s, conv_t, follower, src_affine, dst_affine):
    (a, b), (alpha, beta) = src_affine, dst_affine
    w = np.asarray(conv_s.get_weights()[0], "float64")  # (kh, kw, C_src, F)
    c_dst = conv_t.kernel.shape[-2]
    alpha = np.broadcast_to(alpha, (c_dst,))
    beta = np.broadcast_to(beta, (c_dst,))
    if np.any(np.abs(alpha) < 1e-12):
        raise ModelError(f"{conv_t.name}: the input stage maps all grey levels to one value")
    if c_dst == 1:
        # x_c = a_c g + b_c = (a_c/alpha) y + (b_c - a_c beta/alpha)
        ratio = a / alpha[0]
        shift = b - a * beta[0] / alpha[0]
        kernel = np.einsum("hwcf,c->hwf", w, ratio)[:, :, None, :]
    else:
        ratio = a / alpha
        shift = b - a * beta / alpha
        kernel = w * ratio[None, None, :, None]
    delta = np.einsum("hwcf,c->f", w, shift)  # constant each output channel loses
    values = [kernel.astype("float32")]
    src_rest = conv_s.get_weights()[1:]
    if conv_t.use_bias:
        values.append((np.asarray(src_rest[0], "float64") + delta).astype("float32"))
        conv_t.set_weights(values)
        return
    conv_t.set_weights(values)
    if np.allclose(delta, 0.0):
        return
    if isinstance(follower, keras.layers.BatchNormalization):
        # Training-mode BN subtracts the batch mean, so a constant offset cancels; at
        # inference the moving mean must move with it.
        mean = np.asarray(keras.ops.convert_to_numpy(follower.moving_mean), "float64")
        follower.moving_mean.assign((mean - delta).astype("float32"))
        return
    raise ModelError(
        f"{conv_t.name}: cannot fold per-channel normalisation offsets into a bias-free "
        "convolution that is not followed by BatchNormalization"
    )


# ---------------------------------------------------------------------------- files API


def save_backbone(model, path) -> Path:
    """Write a backbone (or ``model.backbone`` of a classifier) to ``.keras`` / ``.weights.h5``.

    Example::

        >>> from kmedtl.models import backbone, save_backbone
        >>> bb = backbone("cbr_tiny", input_shape=(32, 32, 1))
        >>> p = save_backbone(bb, "cbr_tiny_source.weights.h5")
        >>> bb2 = backbone("cbr_tiny", weights=p, input_shape=(32, 32, 1))
    """
    bb = getattr(model, "backbone", model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".weights.h5"):
        bb.save_weights(path)
    elif path.name.endswith(".keras"):
        bb.save(path)
    else:
        raise ModelError(f"path={str(path)!r}: use a .keras or .weights.h5 file name")
    return path
