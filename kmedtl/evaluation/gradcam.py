"""Grad-CAM heatmaps (Selvaraju et al., ICCV 2017) for any kmedtl model and backbone.

The target layer is found automatically: the **last layer with a 4-D spatial output inside
the backbone** (the nested ``keras.Model`` a kmedtl classifier keeps as ``model.backbone``,
or the model itself when it is one flat graph), so full and truncated backbones both work.
The model is split at that layer into ``images -> activations A`` and ``A -> outputs``; the
class score is ``log p_c`` of the ``"leaf"`` output (for a hierarchical model: the sum of
the log head probabilities along the leaf's path), and::

    weights_k = mean_{i,j} d score / d A_ijk,     cam = relu(sum_k weights_k A_k)

normalised to ``[0, 1]`` per image and resized (bilinear) to the input size.

Everything is ``keras`` / ``keras.ops``; the one backend-specific step, the gradient, lives
in :func:`value_and_grad` (``tf.GradientTape`` on TensorFlow, ``jax.value_and_grad`` on
JAX, autograd on torch).

Example::

    >>> import numpy as np
    >>> from kmedtl.models import FlatClassifier, backbone
    >>> model = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), ["a", "b"])
    >>> images = np.random.default_rng(0).random((2, 32, 32, 1), dtype="float32")
    >>> cam = GradCAM(model)
    >>> heatmaps, classes, probs = cam(images)     # (N, H, W) in [0, 1]
    >>> cam.layer_name, heatmaps.shape
    ('block4_pool', (2, 32, 32))
    >>> overlay(images[0], heatmaps[0]).shape      # uint8 RGB
    (32, 32, 3)
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import matplotlib
import numpy as np
from keras import ops

from kmedtl.errors import ModelError


# ---------------------------------------------------------------------------- backend
def value_and_grad(fn: Callable, x):
    """``(value, aux), d value / d x`` for ``fn(x) -> (scalar value, aux)``.

    The only backend-specific code of kmedtl.evaluation: each branch is the backend's own
    way to differentiate a function of a tensor.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        # lazy: TensorFlow backend only (its gradient tape); absent under KERAS_BACKEND=jax
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value, aux = fn(x)
        return (value, aux), tape.gradient(value, x)
    if backend == "jax":
        import jax  # lazy: JAX backend only (an optional extra)

        (value, aux), grad = jax.value_and_grad(fn, has_aux=True)(ops.convert_to_tensor(x))
        return (value, aux), grad
    if backend == "torch":
        import torch  # lazy: torch backend only (an optional extra)

        x = ops.convert_to_tensor(x).detach().requires_grad_(True)
        value, aux = fn(x)
        (grad,) = torch.autograd.grad(value, x)
        return (value, aux), grad
    raise ModelError(f"Grad-CAM: no gradient for the {backend!r} Keras backend; use "
                     "tensorflow, jax or torch")


# ---------------------------------------------------------------------------- graph
def _call_tensors(layer, node: int = 0) -> tuple[list, list]:
    """(inputs, outputs) of call ``node`` of ``layer`` -- in the graph it was called in.

    ``Functional.output`` returns the *inner* graph's output for a nested model, so the
    tensors of its call in the outer graph are read off its nodes (Keras' ``Node``).
    """
    nodes = getattr(layer, "_inbound_nodes", None)
    if not nodes or node >= len(nodes):
        raise ModelError(f"Grad-CAM: layer {layer.name!r} was never called in a graph")
    return list(nodes[node].input_tensors), list(nodes[node].output_tensors)


def _spatial(t) -> bool:
    shape = getattr(t, "shape", None)
    if shape is None or len(shape) != 4:
        return False
    h, w = shape[1], shape[2]
    return (h is None or h > 1) or (w is None or w > 1)


def find_backbone(model: keras.Model) -> keras.Model:
    """``model.backbone`` when it is a nested model; else the last nested ``keras.Model``
    layer with a 4-D output; else ``model`` itself (a flat graph)."""
    bb = getattr(model, "backbone", None)
    if isinstance(bb, keras.Model) and bb in model.layers:
        return bb
    for layer in reversed(model.layers):
        if isinstance(layer, keras.Model):
            try:
                _, outs = _call_tensors(layer)
            except ModelError:
                continue
            if len(outs) == 1 and len(outs[0].shape) == 4:
                return layer
    return model


def find_target_layer(model: keras.Model, name: str | None = None):
    """``(container, layer)``: the Grad-CAM layer and the (nested) model holding it.

    ``name`` picks a layer by name (backbone first, then the model); by default the last
    layer with a 4-D spatial output inside the backbone (input and preprocessing layers
    excluded).
    """
    container = find_backbone(model)
    if name is not None:
        for c in (container, model):
            try:
                return c, c.get_layer(name)
            except ValueError:
                continue
        raise ModelError(f"Grad-CAM: no layer named {name!r} in {model.name} or its backbone")
    for layer in reversed(container.layers):
        if isinstance(layer, keras.layers.InputLayer) or "preprocessing" in layer.name:
            continue
        try:
            _, outs = _call_tensors(layer)
        except ModelError:
            continue
        if len(outs) == 1 and _spatial(outs[0]):
            return container, layer
    raise ModelError(
        f"Grad-CAM: no layer with a 4-D spatial output in {container.name}; pass "
        "target_layer=<name of a convolutional layer>")


def _submodel(inputs, outputs, what):
    try:
        return keras.Model(inputs, outputs)
    except ValueError as exc:
        raise ModelError(f"Grad-CAM: cannot split the model at {what}: {exc}; pass "
                         "target_layer= a layer whose output alone feeds the rest") from None


class GradCAM:
    """Grad-CAM for one model (the split at the target layer is built once).

    Args:
        model: a single-input Keras model (kmedtl classifiers included).
        target_layer: a layer name; default :func:`find_target_layer`.
        output: which output to explain when the model returns a dict (default ``"leaf"``).

    Call with images (``(N, H, W, C)``, what the model takes) and optional class indices
    (default: the predicted class) to get ``(heatmaps (N, H, W) in [0, 1], classes,
    probabilities)``.
    """

    def __init__(self, model: keras.Model, target_layer: str | None = None,
                 output: str = "leaf"):
        if len(model.inputs) != 1:
            raise ModelError(f"Grad-CAM: {model.name} has {len(model.inputs)} inputs; only "
                             "single-input models are supported")
        self.model = model
        self.output = output
        container, layer = find_target_layer(model, target_layer)
        self.layer_name = layer.name
        _, (target,) = _call_tensors(layer)
        if container is model:
            to_model = _submodel(model.inputs[0], target, layer.name)
            from_model = _submodel(target, model.output, layer.name)
            self._to = lambda x: to_model(x, training=False)
            self._from = lambda a: from_model(a, training=False)
            return
        inner_to = _submodel(container.inputs[0], target, layer.name)
        inner_out = container.outputs[0]
        inner_from = None if target is inner_out else _submodel(target, inner_out, layer.name)
        # The backbone may have been called in several graphs (a shared backbone): use the
        # call that belongs to this model.
        for node in range(len(container._inbound_nodes)):
            (bb_in,), (bb_out,) = _call_tensors(container, node)
            try:
                post = keras.Model(bb_out, model.output)
                break
            except ValueError:
                continue
        else:
            raise ModelError(f"Grad-CAM: cannot find the call of {container.name} inside "
                             f"{model.name}")
        pre = None if bb_in is model.inputs[0] else _submodel(model.inputs[0], bb_in,
                                                              container.name)

        def to_target(x):
            return inner_to(pre(x) if pre is not None else x, training=False)

        def from_target(a):
            return post(inner_from(a, training=False) if inner_from is not None else a,
                        training=False)

        self._to, self._from = to_target, from_target

    def _probs(self, out):
        if isinstance(out, dict):
            if self.output not in out and len(out) == 1:
                out = {self.output: next(iter(out.values()))}
            if self.output not in out:
                raise ModelError(f"Grad-CAM: output {self.output!r} not in {sorted(out)}")
            out = out[self.output]
        elif isinstance(out, (list, tuple)):
            out = out[0]
        return ops.cast(out, "float32")

    def __call__(self, images, class_index=None, batch_size: int = 16):
        images = np.asarray(images, dtype="float32")
        heat, classes, probs = [], [], []
        for s in range(0, len(images), batch_size):
            h, c, p = self._batch(images[s:s + batch_size],
                                  None if class_index is None else
                                  np.broadcast_to(np.asarray(class_index),
                                                  (len(images),))[s:s + batch_size])
            heat.append(h)
            classes.append(c)
            probs.append(p)
        return np.concatenate(heat), np.concatenate(classes), np.concatenate(probs)

    def _batch(self, x, class_index):
        acts = ops.convert_to_numpy(self._to(x)).astype("float32")
        probs = ops.convert_to_numpy(self._probs(self._from(acts)))
        cls = probs.argmax(1) if class_index is None else np.asarray(class_index, int)
        onehot = np.eye(probs.shape[1], dtype="float32")[cls]

        def score(a):
            p = self._probs(self._from(a))
            logp = ops.log(ops.maximum(p, 1e-12))
            return ops.sum(logp * onehot), p

        _, grads = value_and_grad(score, acts)
        grads = ops.convert_to_numpy(grads).astype("float32")
        weights = grads.mean(axis=(1, 2))  # (N, C)
        cam = np.maximum((acts * weights[:, None, None, :]).sum(-1), 0.0)  # (N, h, w)
        peak = cam.reshape(len(cam), -1).max(1)
        cam = cam / np.where(peak > 0, peak, 1.0)[:, None, None]
        size = x.shape[1:3]
        cam = ops.convert_to_numpy(ops.image.resize(cam[..., None], size,
                                                    interpolation="bilinear"))[..., 0]
        return np.clip(cam, 0.0, 1.0), cls, probs


def grad_cam(model: keras.Model, images, class_index=None, *, target_layer: str | None = None,
             output: str = "leaf", batch_size: int = 16):
    """One-call :class:`GradCAM`: ``(heatmaps, classes, probabilities)``."""
    return GradCAM(model, target_layer, output)(images, class_index, batch_size)


def overlay(image, heatmap, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a ``[0, 1]`` heatmap (colour-mapped) over an image; uint8 ``(H, W, 3)``.

    ``image``: ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``, float in ``[0, 1]`` or uint8.
    """
    img = np.asarray(image)
    img = img.astype("float32") / 255.0 if img.dtype == np.uint8 else img.astype("float32")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    colour = matplotlib.colormaps[cmap](np.clip(np.asarray(heatmap), 0, 1))[..., :3]
    out = (1 - alpha) * np.clip(img, 0, 1) + alpha * colour
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
