"""Mixed precision: resolve ``train.precision`` and build models under that policy.

``auto`` is ``mixed_float16`` when an accelerator (GPU) is visible to Keras and
``float32`` on CPU (float16 matmuls are emulated and slow on CPUs).  The policy must be in
force when a model is *built* (Keras layers take their dtype policy at construction), so
:func:`precision_policy` is a context manager used around model construction; kmedtl
heads always compute in float32, so probabilities and losses stay float32.  Under
``mixed_float16`` ``Model.compile`` wraps the optimizer in a ``LossScaleOptimizer`` by
itself.

It lives in :mod:`kmedtl.models` because a model's dtype policy is a property of the model:
training builds under it and export reads it back (:func:`model_precision`).
"""

from __future__ import annotations

import contextlib

import keras

from kmedtl.errors import ConfigError

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")


def accelerator_available() -> bool:
    """True when the Keras backend sees a GPU (TensorFlow or JAX)."""
    try:
        return any(d.lower().startswith(("gpu", "cuda")) for d in keras.distribution.list_devices())
    except Exception:  # a backend without keras.distribution support: assume CPU
        return False


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision: {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "auto":
        return "mixed_float16" if accelerator_available() else "float32"
    return precision


def resolve_jit_compile(value) -> bool:
    """``train.jit_compile``: ``True``/``False``, or ``"auto"`` (the default): XLA where it
    pays, i.e. on the JAX backend and on a GPU/TPU; off on a CPU-only TensorFlow, where
    ``benchmarks/training.py`` measured an XLA train step of ResNet50 at 0.11x the speed of
    the plain one (Keras' own ``jit_compile="auto"`` also turns XLA off on CPU-only TF)."""
    if value != "auto":
        return bool(value)
    if keras.backend.backend() == "jax":
        return True
    try:
        devices = keras.distribution.list_devices()
    except Exception:  # a backend without keras.distribution support: assume CPU
        return False
    return any(not d.lower().startswith("cpu") for d in devices)


@contextlib.contextmanager
def precision_policy(precision: str):
    """Build models under ``precision`` (restores the previous global policy after)."""
    resolved = resolve_precision(precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(resolved)
    try:
        yield resolved
    finally:
        keras.config.set_dtype_policy(previous)


def model_precision(model) -> str:
    """The policy the model's first weighted layer was built with (``float32`` if none);
    kmedtl heads are always float32, so this reads the backbone's."""

    def walk(layer):
        for sub in getattr(layer, "layers", []):
            yield sub
            yield from walk(sub)

    for layer in walk(model):
        if layer.weights and not getattr(layer, "layers", None):
            return layer.dtype_policy.name
    return "float32"
