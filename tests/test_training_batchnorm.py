"""train.recalibrate_bn: BatchNorm statistics match the training data after a short run."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from test_training_helpers import arrays, flat_model

from kmedtl.training import Trainer
from kmedtl.training.batchnorm import recalibrate_batchnorm, trainable_batchnorms

pytestmark = pytest.mark.slow  # every test trains a model (about 5 s each)

FAST = {"batch_size": 8, "jit_compile": False, "verbose": 0, "tensorboard": False}


def _first_bn_gap(model, x):
    """|moving mean - actual mean| of the first trainable BN layer's inputs, averaged."""
    bn = trainable_batchnorms(model)[0]
    # inputs of that layer, computed by the model's own graph
    inner = model.backbone
    feed = keras.Model(inner.inputs, inner.get_layer(bn.name).input)
    acts = keras.ops.convert_to_numpy(feed(x, training=False))
    actual = acts.reshape(-1, acts.shape[-1]).mean(axis=0)
    return float(np.abs(keras.ops.convert_to_numpy(bn.moving_mean) - actual).mean())


def test_short_run_leaves_stale_statistics_and_recalibration_fixes_them():
    x, y = arrays(32)
    x = x * 40.0 + 10.0  # activations far from the initial (0, 1) statistics
    stale = flat_model()
    Trainer(stale, epochs=1, recalibrate_bn=False, **FAST).fit((x, y))
    fixed = flat_model()
    Trainer(fixed, epochs=1, **FAST).fit((x, y))  # recalibrate_bn defaults to on
    gap_stale, gap_fixed = _first_bn_gap(stale, x), _first_bn_gap(fixed, x)
    assert gap_stale > 1.0, gap_stale  # 4 steps at momentum 0.99: still near 0
    assert gap_fixed < 1e-2 * gap_stale, (gap_fixed, gap_stale)


def test_frozen_batchnorm_keeps_its_statistics_and_weights_are_untouched():
    x, _ = arrays(16)
    model = flat_model()
    bns = trainable_batchnorms(model)
    frozen, live = bns[0], bns[-1]
    frozen.trainable = False
    before = [keras.ops.convert_to_numpy(v).copy() for v in frozen.weights]
    kernels = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    n = recalibrate_batchnorm(model, x * 10.0, batch_size=4)
    assert n == len(bns) - 1 and frozen not in trainable_batchnorms(model)
    for b, v in zip(before, frozen.weights):
        np.testing.assert_array_equal(b, keras.ops.convert_to_numpy(v))
    for k, w in zip(kernels, model.trainable_weights):
        np.testing.assert_array_equal(k, keras.ops.convert_to_numpy(w))
    assert float(np.abs(keras.ops.convert_to_numpy(live.moving_variance) - 1).max()) > 0
    assert live.momentum == 0.99  # restored


def test_recalibration_is_the_running_average_over_batches():
    inp = keras.Input((4,))
    bn = keras.layers.BatchNormalization()
    model = keras.Model(inp, bn(inp))
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(40, 4)).astype("float32")
    recalibrate_batchnorm(model, x, batch_size=10)
    expected = np.mean([x[i:i + 10].mean(axis=0) for i in range(0, 40, 10)], axis=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), expected,
                               rtol=1e-5)
