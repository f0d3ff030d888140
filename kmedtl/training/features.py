"""Feature caching for frozen-backbone (linear-probe) training.

When the backbone is frozen, its output for an image never changes, so computing it every
epoch of every trial is waste.  :func:`split_at_features` cuts a kmedtl classifier at its
(parameter-free) global pooling layer into an **extractor** (images -> pooled features)
and a **head** (features -> the model's outputs); both share their layers with the model,
so training the head trains the model's head.  :class:`FeatureCache` computes the
extractor's output once per *(backbone architecture and weights, cut point, pooling,
data)* -- keyed by a digest of all four -- and keeps it in memory and, with
``directory``, on disk (``<digest>.npy``), so a later search or process reuses it.

Frozen means inference mode: BatchNorm uses its moving statistics (Keras 3 runs a
non-trainable BatchNormalization in inference mode), exactly as in a linear-probe ``fit``
of the whole model.  Cached features are of the un-augmented images, so augmentation does
not apply to cached trials.

Example::

    >>> import numpy as np
    >>> from kmedtl.models import FlatClassifier, backbone
    >>> model = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 2)
    >>> extractor, head = split_at_features(model)
    >>> cache = FeatureCache()
    >>> x = np.random.rand(4, 32, 32, 1).astype("float32")
    >>> cache.features(extractor, x).shape, cache.misses, cache.features(extractor, x) is not None
    ((4, 512), 1, True)
    >>> cache.hits
    1
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import keras
import numpy as np

from kmedtl.errors import ConfigError
from kmedtl.training.freezing import find_backbone

log = logging.getLogger("kmedtl.training")

_VOLATILE = {"trainable", "frozen", "name"}


def split_at_features(model, pool_name: str = "pool"):
    """``(extractor, head)`` sharing layers with ``model`` (see the module docstring)."""
    if find_backbone(model) is None:
        raise ConfigError(f"feature cache: model {model.name!r} has no .backbone (use a kmedtl "
                          "FlatClassifier or HierarchicalClassifier)")
    try:
        pool = model.get_layer(pool_name)
    except ValueError:
        pool = None
    if pool is None or pool.weights:
        raise ConfigError(f"feature cache: model {model.name!r} has no parameter-free layer "
                          f"{pool_name!r} after its backbone to cut at")
    features = pool.output
    extractor = keras.Model(model.inputs, features, name=f"{model.name}_features")
    head = keras.Model(features, model.output, name=f"{model.name}_head")  # dict kept
    return extractor, head


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def model_digest(model) -> str:
    """Digest of a model's architecture (names and trainable flags ignored) and weights."""
    h = hashlib.blake2b(digest_size=16)
    bb = find_backbone(model)
    config = {"model": _strip(model.get_config()),
              "backbone": _strip(bb.get_config()) if bb is not None else None}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for w in model.weights:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return h.hexdigest()


def array_digest(x) -> str:
    h = hashlib.blake2b(digest_size=16)
    arrays = [x[k] for k in sorted(x)] if isinstance(x, dict) else [x]
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class FeatureCache:
    """Extractor outputs keyed by digest; in memory, and on disk under ``directory``.

    ``hits``/``misses`` count lookups (for tests and benchmarks).
    """

    def __init__(self, directory=None, batch_size: int = 32):
        self.directory = Path(directory) if directory else None
        self.batch_size = batch_size
        self._memory: dict[str, np.ndarray] = {}
        self._digests: dict[int, tuple] = {}
        self._models: dict[int, tuple] = {}
        self.hits = 0
        self.misses = 0

    def _data_key(self, x) -> str:
        memo = self._digests.get(id(x))
        if memo is not None and memo[0] is x:
            return memo[1]
        key = array_digest(x)
        self._digests[id(x)] = (x, key)
        return key

    def _model_key(self, extractor) -> str:
        # hashing every weight costs ~0.1 s per 25M parameters: once per extractor object
        memo = self._models.get(id(extractor))
        if memo is not None and memo[0] is extractor:
            return memo[1]
        key = model_digest(extractor)
        self._models = {id(extractor): (extractor, key)}  # keep only the latest alive
        return key

    def key(self, extractor, x, data_key: str | None = None) -> str:
        return f"{self._model_key(extractor)[:20]}-{(data_key or self._data_key(x))[:20]}"

    def features(self, extractor, x, data_key: str | None = None) -> np.ndarray:
        """``extractor.predict(x)`` as float32, computed once per key."""
        key = self.key(extractor, x, data_key)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.directory / f"{key}.npy" if self.directory else None
        if path is not None and path.exists():
            feats = np.load(path)
            self.hits += 1
            self._memory[key] = feats
            return feats
        self.misses += 1
        feats = np.asarray(extractor.predict(x, batch_size=self.batch_size, verbose=0),
                           dtype="float32")
        self._memory[key] = feats
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, feats)
            os.replace(tmp, path)
        log.info("feature cache: computed %s features %s", key, feats.shape)
        return feats

    def clear(self) -> None:
        self._memory.clear()
        self._digests.clear()
        self._models.clear()


def materialise(data):
    """``(x, y)`` NumPy arrays from ``(x, y)`` or an iterable of batches ``(x, y[, w])``."""
    if isinstance(data, tuple):
        return data[0], data[1]
    xs, ys = [], []
    for batch in data:
        xs.append(keras.ops.convert_to_numpy(batch[0]) if not isinstance(batch[0], dict) else
                  {k: keras.ops.convert_to_numpy(v) for k, v in batch[0].items()})
        y = batch[1]
        ys.append({k: keras.ops.convert_to_numpy(v) for k, v in y.items()}
                  if isinstance(y, dict) else keras.ops.convert_to_numpy(y))
    if not xs:
        raise ConfigError("materialise: the dataset is empty")

    def cat(parts):
        if isinstance(parts[0], dict):
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return np.concatenate(parts)

    return cat(xs), cat(ys)
