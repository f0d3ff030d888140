"""Streaming Keras metrics on integer targets: macro AUROC and Cohen's kappa.

``keras.metrics.AUC`` wants targets shaped like the predictions; :class:`SparseAUC`
one-hots integer targets and computes the macro one-vs-rest AUROC (``multi_label=True``
over the classes, Keras' own threshold approximation).  Keras has no kappa, so
:class:`CohenKappa` accumulates a confusion matrix and computes (optionally linear or
quadratic weighted) kappa from it.  Both ignore rows whose target is ``-1`` (hierarchy
heads that do not apply), so they are usable as tuner objectives on any output.

Example::

    >>> import numpy as np
    >>> k = CohenKappa(3)
    >>> k.update_state(np.array([0, 1, 2, 2]), np.eye(3)[[0, 1, 2, 1]])
    >>> round(float(k.result()), 4)
    0.6364
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

KAPPA_WEIGHTS = (None, "linear", "quadratic")


def class_indices(y_true):
    """Integer targets as they are; soft ``(N, K)`` ones (MixUp/CutMix training batches)
    as their argmax, ``-1`` where the row is all zero (the head does not apply)."""
    if len(y_true.shape) >= 2 and y_true.shape[-1] is not None and int(y_true.shape[-1]) > 1:
        y = ops.cast(ops.argmax(y_true, axis=-1), "int32")
        return ops.where(ops.sum(y_true, axis=-1) > 0, y, -ops.ones_like(y))
    return y_true


@keras.saving.register_keras_serializable(package="kmedtl")
class Accuracy(keras.metrics.SparseCategoricalAccuracy):
    """Keras' sparse accuracy that also takes soft targets (their argmax)."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(class_indices(ops.convert_to_tensor(y_true)), y_pred,
                                    sample_weight=sample_weight)


def _valid_rows(y_true, sample_weight, ignore_index):
    y_true = class_indices(ops.convert_to_tensor(y_true))
    y = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    valid = ops.not_equal(y, ignore_index)
    w = ops.cast(valid, "float32")
    if sample_weight is not None:
        w = w * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
    return ops.where(valid, y, ops.zeros_like(y)), w


@keras.saving.register_keras_serializable(package="kmedtl")
class SparseAUC(keras.metrics.AUC):
    """Macro one-vs-rest ROC AUC for integer targets and (N, K) probabilities."""

    def __init__(self, num_classes, num_thresholds=200, ignore_index=-1, name="auc",
                 dtype=None):
        super().__init__(num_thresholds=num_thresholds, curve="ROC", multi_label=True,
                         num_labels=int(num_classes), name=name, dtype=dtype)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y, w = _valid_rows(y_true, sample_weight, self.ignore_index)
        onehot = ops.one_hot(y, self.num_classes)
        w = ops.broadcast_to(ops.expand_dims(w, -1), ops.shape(onehot))
        return super().update_state(onehot, ops.cast(y_pred, "float32"), sample_weight=w)

    def get_config(self):
        return {"num_classes": self.num_classes, "num_thresholds": self.num_thresholds,
                "ignore_index": self.ignore_index, "name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="kmedtl")
class CohenKappa(keras.metrics.Metric):
    """Cohen's kappa of ``argmax(y_pred)`` against integer targets.

    Args:
        num_classes: K.
        weights: ``None`` (plain kappa), ``"linear"`` or ``"quadratic"`` (ordinal classes).
    """

    def __init__(self, num_classes, weights=None, ignore_index=-1, name="kappa", dtype=None):
        super().__init__(name=name, dtype=dtype)
        if weights not in KAPPA_WEIGHTS:
            raise ValueError(f"weights={weights!r} is not one of {list(KAPPA_WEIGHTS)}")
        self.num_classes = int(num_classes)
        self.weights_mode = weights
        self.ignore_index = int(ignore_index)
        self._direction = "up"
        self.confusion = self.add_variable(shape=(self.num_classes, self.num_classes),
                                           initializer="zeros", name="confusion",
                                           dtype="float32")
        i, j = np.meshgrid(np.arange(self.num_classes), np.arange(self.num_classes),
                           indexing="ij")
        d = np.abs(i - j) / max(self.num_classes - 1, 1)
        self._w = {None: (i != j).astype("float32"), "linear": d.astype("float32"),
                   "quadratic": (d ** 2).astype("float32")}[weights]

    def update_state(self, y_true, y_pred, sample_weight=None):
        y, w = _valid_rows(y_true, sample_weight, self.ignore_index)
        pred = ops.argmax(ops.reshape(y_pred, (-1, self.num_classes)), axis=-1)
        t = ops.one_hot(y, self.num_classes) * ops.expand_dims(w, -1)
        p = ops.one_hot(pred, self.num_classes)
        self.confusion.assign_add(ops.matmul(ops.transpose(t), p))

    def result(self):
        cm = ops.convert_to_tensor(self.confusion)
        total = ops.sum(cm)
        expected = ops.outer(ops.sum(cm, axis=1), ops.sum(cm, axis=0))
        expected = ops.divide_no_nan(expected, total)
        w = ops.convert_to_tensor(self._w)
        return 1.0 - ops.divide_no_nan(ops.sum(w * cm), ops.sum(w * expected))

    def reset_state(self):
        self.confusion.assign(ops.zeros((self.num_classes, self.num_classes), "float32"))

    def get_config(self):
        return {"num_classes": self.num_classes, "weights": self.weights_mode,
                "ignore_index": self.ignore_index, "name": self.name, "dtype": self.dtype}


def default_metrics(num_classes: int) -> list:
    """Leaf-level metrics every kmedtl training logs: accuracy, macro AUROC, kappa."""
    return [Accuracy(name="accuracy"),
            SparseAUC(num_classes, name="auc"), CohenKappa(num_classes, name="kappa")]


#: short metric names whose larger value is better (everything else: smaller is better)
MAXIMISED = ("accuracy", "auc", "kappa", "precision", "recall", "f1")


def infer_mode(monitor: str) -> str:
    """``"max"`` for accuracy/AUC/kappa-like names, ``"min"`` for losses and errors."""
    name = monitor.lower()
    if any(k in name for k in ("loss", "error", "crossentropy", "mse", "mae")):
        return "min"
    if any(k in name for k in MAXIMISED):
        return "max"
    return "min"


def resolve_monitor(monitor: str, multi_output: bool, validation: bool = True) -> str:
    """A Keras log key from a short name: ``auc`` -> ``val_auc`` (flat) or ``val_leaf_auc``
    (hierarchical); ``loss`` -> ``val_loss``; full keys pass through.  Without validation
    data the ``val_`` prefix is dropped."""
    key = monitor
    short = not key.startswith("val_") and key not in ("loss",) and "_" not in key
    if short and multi_output:
        key = f"leaf_{key}"
    if validation and not key.startswith("val_"):
        key = f"val_{key}"
    if not validation and key.startswith("val_"):
        key = key[4:]
    return key
