"""BatchNorm recalibration after training (``train.recalibrate_bn``, on by default).

Keras' ``BatchNormalization`` keeps moving statistics with momentum 0.99: each step moves
them 1% toward the current batch.  A small-data run makes only a few hundred steps, so at
the end the statistics still hold a sizeable share of their initial values (mean 0,
variance 1) and lag behind the weights, which changed fast.  The inference-mode model can
then be far worse than the training-mode one: the study (``kmedtl.study``) measured a
from-scratch CBR network at N = 100 images per class, 15 epochs, that predicted one class
for every image (test accuracy 0.11-0.25) while its training accuracy was 0.998.

The cure, as in stochastic weight averaging's ``update_bn``: after training, set each
*trainable* BatchNorm layer's moving mean and variance to the average of its batch
statistics over the training images, by forward passes in training mode with the momentum
set so that the moving value becomes the running average.  Frozen BatchNorm layers (linear
probe, frozen stages) keep their statistics.  Only ``keras`` is used.
"""

from __future__ import annotations

import logging

import keras
import numpy as np

from kmedtl.models.weights import leaf_layers

log = logging.getLogger("kmedtl.training")


def trainable_batchnorms(model) -> list:
    """The model's BatchNormalization layers whose statistics training changes."""
    return [la for la in leaf_layers(model)
            if isinstance(la, keras.layers.BatchNormalization) and la.trainable]


def _batches(data, batch_size: int, max_batches: int | None):
    if isinstance(data, tuple):  # (x[, y[, w]]) arrays
        data = data[0]
    if isinstance(data, np.ndarray):
        for i, start in enumerate(range(0, len(data), batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield data[start:start + batch_size]
        return
    for i, batch in enumerate(data):  # a tf.data dataset or any iterable of batches
        if max_batches is not None and i >= max_batches:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def recalibrate_batchnorm(model, data, *, batch_size: int = 64,
                          max_batches: int | None = None) -> int:
    """Set the moving mean/variance of every trainable BatchNorm layer of ``model`` to the
    average of its batch statistics over ``data``; returns how many layers changed.

    ``data``: images as an array, an ``(x, y[, w])`` tuple, or a ``tf.data`` dataset (or
    any iterable) of ``x`` or ``(x, y[, w])`` batches; ``max_batches`` caps a repeating
    dataset.  The weights are untouched.

    Example::

        >>> import keras, numpy as np
        >>> inp = keras.Input((8, 8, 1))
        >>> bn = keras.layers.BatchNormalization()
        >>> model = keras.Model(inp, bn(keras.layers.Conv2D(2, 3)(inp)))
        >>> x = 5 + np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype("float32")
        >>> recalibrate_batchnorm(model, x, batch_size=8)
        1
        >>> bool(abs(float(bn.moving_mean.numpy().mean())) > 0.1)  # no longer the initial 0
        True
    """
    bns = trainable_batchnorms(model)
    if not bns:
        return 0
    saved = [la.momentum for la in bns]
    seen = 0
    try:
        for k, x in enumerate(_batches(data, batch_size, max_batches)):
            for la in bns:  # moving = moving * k/(k+1) + batch/(k+1): the running mean
                la.momentum = k / (k + 1.0)
            model(x, training=True)
            seen += 1
    finally:
        for la, m in zip(bns, saved):
            la.momentum = m
    if not seen:
        log.warning("recalibrate_batchnorm: no batches in the data; statistics unchanged")
        return 0
    log.info("recalibrated %d BatchNorm layer(s) over %d batch(es)", len(bns), seen)
    return len(bns)
