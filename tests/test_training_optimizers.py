"""DiscriminativeOptimizer: per-group multipliers scale the *step* (also for Adam, where
scaling gradients would not), the momentum schedule is applied in-graph, and it saves."""

import keras
import numpy as np
import pytest
from test_training_helpers import flat_model

from kmedtl.errors import ConfigError
from kmedtl.training import (
    DiscriminativeOptimizer,
    OneCycleMomentum,
    group_multipliers,
    layer_groups,
)

MULTS = (1 / 9, 1 / 3, 1.0)


def _net(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="low"),
                             keras.layers.Dense(8, name="mid"), keras.layers.Dense(2, name="top")])


def _data():
    rng = np.random.default_rng(0)
    return rng.random((16, 4)).astype("float32"), rng.random((16, 2)).astype("float32")


def _one_step(make_opt, wrap, jit):
    x, y = _data()
    model = _net()
    before = [w.numpy().copy() for w in model.weights]
    opt = make_opt()
    if wrap:
        opt = DiscriminativeOptimizer(opt, multipliers={".*low/.*": MULTS[0],
                                                        ".*mid/.*": MULTS[1]})
    model.compile(optimizer=opt, loss="mse", jit_compile=jit)
    model.train_on_batch(x, y)
    return {w.path.split("/", 1)[1]: w.numpy() - b for w, b in zip(model.weights, before)}


@pytest.mark.parametrize("make_opt", [lambda: keras.optimizers.SGD(0.1),
                                      lambda: keras.optimizers.Adam(1e-2),
                                      lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.05)],
                         ids=["sgd", "adam", "adamw"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager-graph", "xla"])
def test_each_groups_step_is_scaled_by_its_multiplier(make_opt, jit):
    plain = _one_step(make_opt, wrap=False, jit=jit)
    scaled = _one_step(make_opt, wrap=True, jit=jit)
    for path, mult in (("low", MULTS[0]), ("mid", MULTS[1]), ("top", MULTS[2])):
        for var in ("kernel", "bias"):
            d0, d1 = plain[f"{path}/{var}"], scaled[f"{path}/{var}"]
            assert np.abs(d0).min() > 0
            np.testing.assert_allclose(d1, mult * d0, rtol=2e-3, atol=1e-9)


def test_scaling_gradients_would_not_work_for_adam():
    """Sanity check of the premise: Adam's first step ignores the gradient scale."""
    x, y = _data()
    deltas = []
    for scale in (1.0, 1 / 9):
        model = _net()
        before = model.get_weights()
        opt = keras.optimizers.Adam(1e-2)
        import tensorflow as tf  # test-only: an explicit gradient, to scale it

        with tf.GradientTape() as tape:
            loss = keras.ops.mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply([g * scale for g in grads], model.trainable_variables)
        deltas.append(model.get_weights()[0] - before[0])
    np.testing.assert_allclose(deltas[0], deltas[1], rtol=1e-3)


def test_group_multipliers_from_registry_stages():
    model = flat_model(2)
    groups = layer_groups(model, 3)
    assert [g.name for g in groups] == ["block1_pool+block2_pool", "block3_pool", "head"]
    patterns = group_multipliers(groups, MULTS)
    opt = DiscriminativeOptimizer("adam", multipliers=patterns)
    assert opt.multiplier_for("block1_conv/kernel") == pytest.approx(1 / 9)
    assert opt.multiplier_for("block3_bn/gamma") == pytest.approx(1 / 3)
    assert opt.multiplier_for("leaf_logits/kernel") == 1.0
    with pytest.raises(ConfigError, match="3 layer groups"):
        group_multipliers(groups, [1.0, 1.0])
    with pytest.raises(ConfigError, match="only 3 stage"):
        layer_groups(model, 5)


class _Const(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, value):
        self.value = value

    def __call__(self, step):
        return keras.ops.cast(step, "float32") * 0.0 + self.value

    def get_config(self):
        return {"value": self.value}


@pytest.mark.parametrize("wrapped, reference", [
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9),
     lambda: keras.optimizers.SGD(0.1, momentum=0.5)),
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
     lambda: keras.optimizers.SGD(0.1, momentum=0.5, nesterov=True)),
    (lambda: keras.optimizers.Adam(1e-2), lambda: keras.optimizers.Adam(1e-2, beta_1=0.5)),
], ids=["sgd", "sgd-nesterov", "adam"])
def test_momentum_schedule_sets_momentum_in_graph(wrapped, reference):
    x, y = _data()
    a, b = _net(), _net()
    a.compile(optimizer=reference(), loss="mse")
    b.compile(optimizer=DiscriminativeOptimizer(wrapped(), momentum=_Const(0.5)), loss="mse")
    for _ in range(3):
        a.train_on_batch(x, y)
        b.train_on_batch(x, y)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_allclose(wa.numpy(), wb.numpy(), rtol=1e-5, atol=1e-7)
    inner = b.optimizer.inner_optimizer
    assert int(inner.iterations.numpy()) == 3  # Adam's bias correction sees the real step
    assert getattr(inner, "beta_1", 0.9) == 0.9 and getattr(inner, "momentum", 0.9) == 0.9


def test_unschedulable_momentum_is_a_clear_error():
    with pytest.raises(ConfigError, match="beta_1"):
        DiscriminativeOptimizer(keras.optimizers.RMSprop(momentum=0.9),
                                momentum=OneCycleMomentum(10))
    with pytest.raises(ConfigError, match="momentum > 0"):
        DiscriminativeOptimizer(keras.optimizers.SGD(), momentum=OneCycleMomentum(10))


def test_saves_and_loads_with_the_model(tmp_path):
    x, y = _data()
    model = _net()
    model.compile(optimizer=DiscriminativeOptimizer(
        keras.optimizers.Adam(1e-2), multipliers=[(".*low/.*", 0.25)],
        momentum=OneCycleMomentum(20)), loss="mse")
    model.train_on_batch(x, y)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    opt = loaded.optimizer
    assert isinstance(opt, DiscriminativeOptimizer)
    assert opt.multipliers == [(".*low/.*", 0.25)]
    assert isinstance(opt.momentum_schedule, OneCycleMomentum)
    assert isinstance(opt.inner_optimizer, keras.optimizers.Adam)
    # optimizer state (inner Adam moments included) came back
    for v0, v1 in zip(model.optimizer.variables, opt.variables):
        np.testing.assert_allclose(np.asarray(v0), np.asarray(v1))
    loaded.train_on_batch(x, y)  # and keeps training
