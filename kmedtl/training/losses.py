"""The per-head classification loss: masked cross-entropy on integer *or* soft targets,
label-smoothed when asked.

kmedtl's targets are class indices (``-1`` where a hierarchy head does not apply), except
on training batches mixed by MixUp/CutMix, which carry soft targets: one float
distribution per row and output (:func:`kmedtl.data.pipeline.soft_targets`), whose mass is
below 1 (0: not applicable) where only part of the mix lies under a conditional head.  A
fit sees both (mixed training batches, integer validation batches) through the same loss,
so :class:`MaskedCrossentropy` takes either, told apart by shape: ``(N,)``/``(N, 1)`` are
indices, ``(N, K)`` with ``K > 1`` are distributions.

- integer targets: exactly :class:`kmedtl.models.MaskedSparseCategoricalCrossentropy`
  (``-1`` rows get zero loss and zero gradient; the mean is over the applicable rows);
- soft targets ``t``: the row loss is ``sum_k t_k * -log p_k`` (``mass * CE(t / mass)``),
  and the mean is over the applicable *mass* ``sum(t)`` of the batch, which is the
  applicable-row count when the targets are hard one-hots.

Keras' label smoothing lives in ``CategoricalCrossentropy`` and needs one-hot targets:
:class:`SmoothedSparseCategoricalCrossentropy` one-hots integer targets in-graph and
applies Keras' ``categorical_crossentropy(..., label_smoothing=...)`` (to the renormalised
distribution, for soft targets).

Example::

    >>> import numpy as np
    >>> loss = SmoothedSparseCategoricalCrossentropy(label_smoothing=0.1)
    >>> p = np.array([[0.9, 0.1], [0.5, 0.5]], "float32")
    >>> round(float(loss(np.array([0, -1]), p)), 4)  # row 1 ignored
    0.2152
    >>> soft = MaskedCrossentropy()
    >>> round(float(soft(np.array([[0.7, 0.3], [0.0, 0.0]], "float32"), p)), 4)
    0.7645
"""

from __future__ import annotations

import keras
from keras import ops

from kmedtl.models.hierarchical import MaskedSparseCategoricalCrossentropy


def is_soft(y_true) -> bool:
    """Whether ``y_true`` holds distributions ``(..., K)``, ``K > 1``, rather than class
    indices (decided on the static shape, so inside a traced graph too)."""
    shape = getattr(y_true, "shape", None)
    return shape is not None and len(shape) >= 2 and shape[-1] is not None and \
        int(shape[-1]) > 1


@keras.saving.register_keras_serializable(package="kmedtl")
class MaskedCrossentropy(MaskedSparseCategoricalCrossentropy):
    """:class:`~kmedtl.models.MaskedSparseCategoricalCrossentropy` that also takes soft
    (MixUp/CutMix-mixed) targets; see the module docstring for the soft rule."""

    label_smoothing = 0.0

    def __init__(self, from_logits=False, ignore_index=-1, reduction="sum_over_batch_size",
                 name="masked_crossentropy", dtype=None):
        super().__init__(from_logits=from_logits, ignore_index=ignore_index,
                         reduction=reduction, name=name, dtype=dtype)

    def _valid(self, y_true):
        if not is_soft(y_true):
            return super()._valid(y_true)
        # the row's applicable mass: the parent's __call__ weights the row losses by it and
        # (mean reductions) divides by its sum, as it does with the 0/1 applicability
        mass = ops.sum(ops.cast(y_true, "float32"), axis=-1)
        return y_true, ops.reshape(mass, (-1,))

    def _soft_call(self, y_true, y_pred):
        k = int(y_pred.shape[-1])
        t = ops.reshape(ops.cast(y_true, y_pred.dtype), (-1, k))
        mass = ops.sum(t, axis=-1, keepdims=True)
        ce = keras.losses.categorical_crossentropy(
            ops.divide_no_nan(t, mass), ops.reshape(y_pred, (-1, k)),
            from_logits=self.from_logits, label_smoothing=self.label_smoothing)
        ce = ops.reshape(ce, (-1,))
        return ops.where(ops.reshape(mass, (-1,)) > 0, ce, ops.zeros_like(ce))

    def call(self, y_true, y_pred):
        if is_soft(y_true):
            return self._soft_call(y_true, y_pred)
        return super().call(y_true, y_pred)


@keras.saving.register_keras_serializable(package="kmedtl")
class SmoothedSparseCategoricalCrossentropy(MaskedCrossentropy):
    """Cross-entropy on integer targets against ``(1 - s) * onehot + s / K``.

    Rows whose target is ``ignore_index`` get zero loss and zero gradient; the mean is
    over the applicable rows (see :class:`~kmedtl.models.MaskedSparseCategoricalCrossentropy`).
    Soft targets are smoothed after renormalising (see :class:`MaskedCrossentropy`).
    """

    def __init__(self, label_smoothing=0.1, from_logits=False, ignore_index=-1,
                 reduction="sum_over_batch_size",
                 name="smoothed_sparse_categorical_crossentropy", dtype=None):
        super().__init__(from_logits=from_logits, ignore_index=ignore_index,
                         reduction=reduction, name=name, dtype=dtype)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        if is_soft(y_true):
            return self._soft_call(y_true, y_pred)
        y_true, valid = self._valid(y_true)
        safe = ops.where(valid, y_true, ops.zeros_like(y_true))
        onehot = ops.one_hot(safe, int(y_pred.shape[-1]), dtype=y_pred.dtype)
        ce = keras.losses.categorical_crossentropy(
            onehot, y_pred, from_logits=self.from_logits, label_smoothing=self.label_smoothing)
        ce = ops.reshape(ce, (-1,))
        return ops.where(valid, ce, ops.zeros_like(ce))

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def classification_loss(label_smoothing: float = 0.0):
    """The per-head loss: masked cross-entropy (integer or soft targets), label-smoothed
    when asked."""
    if label_smoothing:
        return SmoothedSparseCategoricalCrossentropy(label_smoothing)
    return MaskedCrossentropy()
