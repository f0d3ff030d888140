"""Transfusion weight scaling ("Mean Var" initialisation).

Raghu et al. 2019 (arXiv:1902.07208, "Mean Var Init") show that part of the benefit of ImageNet
pretraining is *feature independent*: re-initialising every weight tensor with i.i.d.
normal values that have the pretrained tensor's mean and variance keeps much of the
convergence speed-up.  :func:`transfusion_scale` does exactly that, per weight tensor.

* learned tensors (kernels, biases, BN ``gamma``/``beta``, LayerNorm, ...) are redrawn
  from ``N(mean, std**2)`` of the pretrained values (a constant tensor stays constant),
  whether or not the layer is currently frozen;
* BatchNorm moving statistics are reset to their fresh-model values (mean 0, variance 1):
  statistics of the pretrained activations mean nothing for the new random weights;
* ``keras.layers.Normalization`` constants (EfficientNet's input normalisation) are data
  preprocessing, not learned features, and are kept.

Example::

    >>> from kmedtl.models import backbone, transfusion_scale
    >>> bb = backbone("cbr_tiny", input_shape=(32, 32, 1))
    >>> bb = transfusion_scale(bb, seed=0)  # in place; returns the model
"""

from __future__ import annotations

import keras
import numpy as np

from kmedtl.models.weights import leaf_layers


def transfusion_scale(model: keras.Model, seed: int | None = None) -> keras.Model:
    """Re-initialise ``model`` in place with per-tensor moment-matched normal weights.

    Returns ``model``.  Reproducible for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.Normalization):
            continue
        bn_stats = set()
        if isinstance(layer, keras.layers.BatchNormalization):
            bn_stats = {id(layer.moving_mean), id(layer.moving_variance)}
        for var in layer.weights:
            value = np.asarray(keras.ops.convert_to_numpy(var))
            if not np.issubdtype(value.dtype, np.floating):
                continue  # counters, random-seed states
            if id(var) in bn_stats:
                fill = 0.0 if var is layer.moving_mean else 1.0
                var.assign(np.full(value.shape, fill, dtype=value.dtype))
            else:
                draw = rng.normal(value.mean(), value.std(), size=value.shape)
                var.assign(draw.astype(value.dtype))
    return model
