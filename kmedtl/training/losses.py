"""Label smoothing for integer (sparse) targets.

Keras' label smoothing lives in ``CategoricalCrossentropy`` and needs one-hot targets;
kmedtl's targets are class indices (``-1`` where a hierarchy head does not apply).
:class:`SmoothedSparseCategoricalCrossentropy` one-hots them in-graph and applies Keras'
``categorical_crossentropy(..., label_smoothing=...)``, with the masking and the
applicable-rows averaging of :class:`kmedtl.models.MaskedSparseCategoricalCrossentropy`.

Example::

    >>> import numpy as np
    >>> loss = SmoothedSparseCategoricalCrossentropy(label_smoothing=0.1)
    >>> p = np.array([[0.9, 0.1], [0.5, 0.5]], "float32")
    >>> round(float(loss(np.array([0, -1]), p)), 4)  # row 1 ignored
    0.2152
"""

from __future__ import annotations

import keras
from keras import ops

from kmedtl.models.hierarchical import MaskedSparseCategoricalCrossentropy


@keras.saving.register_keras_serializable(package="kmedtl")
class SmoothedSparseCategoricalCrossentropy(MaskedSparseCategoricalCrossentropy):
    """Cross-entropy on integer targets against ``(1 - s) * onehot + s / K``.

    Rows whose target is ``ignore_index`` get zero loss and zero gradient; the mean is
    over the applicable rows (see :class:`~kmedtl.models.MaskedSparseCategoricalCrossentropy`).
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
    """The per-head loss: masked sparse cross-entropy, label-smoothed when asked."""
    if label_smoothing:
        return SmoothedSparseCategoricalCrossentropy(label_smoothing)
    return MaskedSparseCategoricalCrossentropy()
