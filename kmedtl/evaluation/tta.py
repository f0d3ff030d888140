"""Test-time augmentation: average a model's probabilities over transformed copies.

Example::

    >>> import numpy as np
    >>> from kmedtl.models import FlatClassifier, backbone
    >>> model = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 3)
    >>> p = predict_tta(model, np.random.rand(4, 32, 32, 1).astype("float32"), n=2)
    >>> p.shape, bool(np.allclose(p.sum(axis=1), 1.0, atol=1e-5))
    ((4, 3), True)
"""

from __future__ import annotations

import numpy as np
from keras import ops

from kmedtl.errors import ConfigError

FLIPS = {
    None: [()],
    "none": [()],
    "horizontal": [(), (2,)],
    "vertical": [(), (1,)],
    "horizontal_and_vertical": [(), (2,), (1,), (1, 2)],
    "both": [(), (2,), (1,), (1, 2)],
}


def _flip(x, axes):
    for axis in axes:
        x = ops.flip(x, axis=axis)
    return x


def _images_of(batch):
    """``x`` from a dataset element (``x`` or ``(x, y[, w])``)."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _batches(data, batch_size):
    if isinstance(data, np.ndarray) or (isinstance(data, dict) and all(
            isinstance(v, np.ndarray) for v in data.values())):
        n = len(data) if isinstance(data, np.ndarray) else len(next(iter(data.values())))
        for i in range(0, n, batch_size):
            if isinstance(data, dict):
                yield {k: v[i:i + batch_size] for k, v in data.items()}
            else:
                yield data[i:i + batch_size]
        return
    for batch in data:
        yield _images_of(batch)


def predict_tta(model, data, n: int = 2, flips: str | None = "horizontal", augment=None,
                batch_size: int = 32):
    """Mean predicted probabilities over ``n`` views of every image.

    Args:
        model: a Keras model (single output, or a dict of outputs such as a
            ``HierarchicalClassifier``: each output is averaged separately).
        data: images ``(N, H, W, C)`` (or a dict of image arrays), or an un-shuffled
            ``tf.data`` dataset / iterable of batches ``x`` or ``(x, y, ...)``.
        n: number of views; the first are deterministic flips (identity first), the rest
            random draws of ``augment``.
        flips: ``"horizontal"``, ``"vertical"``, ``"horizontal_and_vertical"`` or ``None``.
        augment: a callable (Keras layer, e.g. ``keras.layers.RandomRotation(0.05)``, or a
            list of them) applied with ``training=True`` for views beyond the flips.

    Returns probabilities in input order: an array, or a dict of arrays per output.
    """
    if flips not in FLIPS:
        raise ConfigError(f"predict_tta: flips={flips!r} is not one of {list(FLIPS)}")
    if n < 1:
        raise ConfigError(f"predict_tta: n={n} must be >= 1")
    views = FLIPS[flips][:n]
    if n > len(views) and augment is None:
        raise ConfigError(f"predict_tta: n={n} views but flips={flips!r} gives only "
                          f"{len(views)}; pass augment=... (a Keras augmentation layer) or "
                          f"lower n")
    layers = list(augment) if isinstance(augment, (list, tuple)) else \
        ([augment] if augment is not None else [])

    def view(x, k):
        if k < len(views):
            f = lambda v: _flip(v, views[k])
        else:
            def f(v):
                for layer in layers:
                    v = layer(v, training=True)
                return ops.cast(v, "float32")
        return {kk: f(v) for kk, v in x.items()} if isinstance(x, dict) else f(x)

    chunks = []
    for x in _batches(data, batch_size):
        total = None
        for k in range(n):
            out = model.predict_on_batch(view(x, k))
            out = {kk: np.asarray(v, "float64") for kk, v in out.items()} \
                if isinstance(out, dict) else np.asarray(out, "float64")
            total = out if total is None else (
                {kk: total[kk] + out[kk] for kk in out} if isinstance(out, dict) else total + out)
        chunks.append({kk: v / n for kk, v in total.items()} if isinstance(total, dict)
                      else total / n)
    if not chunks:
        raise ConfigError("predict_tta: no data")
    if isinstance(chunks[0], dict):
        return {k: np.concatenate([c[k] for c in chunks]).astype("float32") for k in chunks[0]}
    return np.concatenate(chunks).astype("float32")


def flip_views(flips: str | None) -> int:
    """How many deterministic views ``flips`` gives."""
    return len(FLIPS[flips])

