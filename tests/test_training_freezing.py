"""Freezing strategies: frozen weights (BatchNorm statistics included) do not move,
unfrozen ones do, and gradual unfreezing happens at the right epoch, head first."""

import keras
import numpy as np
import pytest
from test_training_helpers import RecordTrainable, arrays, flat_model

from kmedtl.errors import ConfigError
from kmedtl.training import (
    Trainer,
    fine_tune,
    layer_groups,
    plan_phases,
    set_trainable,
    train_section,
)
from kmedtl.training.freezing import find_backbone

CONVS = ["block1_conv", "block2_conv", "block3_conv"]


def _randomise_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in find_backbone(model).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.2, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2, layer.moving_variance.shape))


def _weights(model, layer_name):
    return [np.array(w) for w in find_backbone(model).get_layer(layer_name).weights]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def _fit(model, epochs=2, callbacks=(), **cfg):
    x, y = arrays(24)
    cfg = {"batch_size": 8, "learning_rate": 0.05, "jit_compile": False, "verbose": 0, **cfg}
    return Trainer(model, epochs=epochs, callbacks=callbacks, **cfg).fit((x, y), (x, y))


def test_linear_probe_freezes_backbone_and_keeps_batchnorm_in_inference_mode():
    model = flat_model()
    _randomise_bn(model)
    bb = find_backbone(model)
    before = [np.array(w) for w in bb.weights]
    head_before = np.array(model.get_layer("leaf_logits").kernel)
    _fit(model, strategy="linear_probe")
    assert _same(before, [np.array(w) for w in bb.weights])  # BN moving stats included
    assert not np.array_equal(head_before, np.array(model.get_layer("leaf_logits").kernel))
    x, _ = arrays(8)
    np.testing.assert_allclose(np.asarray(bb(x, training=True)), np.asarray(bb(x, training=False)),
                               atol=1e-6)  # frozen BN uses moving statistics even in training


@pytest.mark.slow
def test_full_fine_tuning_moves_everything():
    model = flat_model()
    before = {n: _weights(model, n) for n in CONVS}
    _fit(model)
    assert not any(_same(before[n], _weights(model, n)) for n in CONVS)


@pytest.mark.slow
def test_freeze_below_a_named_cut():
    model = flat_model()
    before = {n: _weights(model, n) for n in ("block1_conv", "block2_bn", "block3_conv")}
    _fit(model, strategy="freeze", freeze_below="block2_pool")
    assert _same(before["block1_conv"], _weights(model, "block1_conv"))
    assert _same(before["block2_bn"], _weights(model, "block2_bn"))
    assert not _same(before["block3_conv"], _weights(model, "block3_conv"))


def test_freeze_below_unknown_cut_names_the_field_and_the_cuts():
    with pytest.raises(ConfigError) as e:
        _fit(flat_model(), strategy="freeze", freeze_below="block9_pool")
    assert "train.freeze_below" in str(e.value) and "block2_pool" in str(e.value)


@pytest.mark.slow
def test_freeze_first_k_layers():
    model = flat_model()
    before = {n: _weights(model, n) for n in ("block1_conv", "block1_bn", "block2_conv")}
    _fit(model, strategy="freeze", freeze_layers=3)  # preprocessing, block1_conv, block1_bn
    assert _same(before["block1_conv"], _weights(model, "block1_conv"))
    assert _same(before["block1_bn"], _weights(model, "block1_bn"))
    assert not _same(before["block2_conv"], _weights(model, "block2_conv"))


class _Snapshot(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.kernels = {}

    def on_epoch_end(self, epoch, logs=None):
        bb = self.model.backbone
        self.kernels[epoch] = {n: np.array(bb.get_layer(n).kernel) for n in CONVS}


@pytest.mark.slow
def test_gradual_unfreezing_happens_at_the_right_epoch_head_first():
    model = flat_model()
    start = {n: np.array(find_backbone(model).get_layer(n).kernel) for n in CONVS}
    rec, snap = RecordTrainable(CONVS), _Snapshot()
    result = _fit(model, epochs=4, strategy="gradual", unfreeze_at=[0.25, 0.5, 0.75],
                  callbacks=[rec, snap])
    assert rec.by_epoch == {0: set(), 1: {"block3_conv"}, 2: {"block2_conv", "block3_conv"},
                            3: set(CONVS)}
    assert [(p["start_epoch"], p["end_epoch"]) for p in result.phases] == [(0, 1), (1, 2),
                                                                          (2, 3), (3, 4)]
    # a group's weights stay put until its unfreezing epoch, then move
    for name, first_trained in (("block3_conv", 1), ("block2_conv", 2), ("block1_conv", 3)):
        for e in range(first_trained):
            np.testing.assert_array_equal(snap.kernels[e][name], start[name])
        assert not np.array_equal(snap.kernels[first_trained][name], start[name])
    assert result.epochs == [0, 1, 2, 3]


@pytest.mark.slow
def test_gradual_with_multipliers_unfreezes_merged_groups():
    model = flat_model()
    rec = RecordTrainable(CONVS)
    _fit(model, epochs=3, strategy="gradual", unfreeze_at=[0.34, 0.67],
         lr_multipliers=[0.1, 0.3, 1.0], callbacks=[rec])
    assert rec.by_epoch == {0: set(), 1: {"block3_conv"}, 2: set(CONVS)}


@pytest.mark.slow
def test_fine_tune_trains_the_head_then_everything_with_discriminative_rates():
    model = flat_model()
    rec = RecordTrainable(CONVS)
    x, y = arrays(24)
    result = fine_tune(model, (x, y), (x, y), epochs=2, head_epochs=1, batch_size=8,
                       jit_compile=False, verbose=0, callbacks=[rec])
    assert rec.by_epoch == {0: set(), 1: set(CONVS), 2: set(CONVS)}
    assert [p["name"] for p in result.phases] == ["head", "all"]
    opt = model.optimizer
    assert opt.multiplier_for("block1_conv/kernel") == pytest.approx(1 / 9)
    assert opt.multiplier_for("block3_conv/kernel") == pytest.approx(1 / 3)
    assert opt.multiplier_for("leaf_logits/kernel") == pytest.approx(1.0)
    assert opt.momentum_schedule is not None  # one-cycle momentum too


def test_plan_errors_name_the_fields():
    model = flat_model()
    cfg = train_section({"strategy": "gradual", "unfreeze_at": [0.2, 0.4, 0.6, 0.8]})
    with pytest.raises(ConfigError, match="only 3 layer group"):
        plan_phases(cfg, model, 10)
    cfg = train_section({"strategy": "gradual", "unfreeze_at": [0.4, 0.45]})
    with pytest.raises(ConfigError, match="train.unfreeze_at"):
        plan_phases(cfg, model, 3)  # both points round to epoch 1


def test_set_trainable_propagates_where_keras_short_circuits():
    model = flat_model()
    bb = find_backbone(model)
    bb.trainable = False
    model.trainable = True  # already True: Keras (TF backend) skips the setter
    n_frozen = len(model.trainable_weights)
    set_trainable(model, True)
    assert len(model.trainable_weights) > n_frozen
    assert len(model.trainable_weights) == sum(len(g.weights) for g in layer_groups(model)) - \
        2 * sum(1 for la in bb.layers if isinstance(la, keras.layers.BatchNormalization))


def test_strategy_registry_matches_the_config_names():
    """The config validates ``train.strategy`` without Keras, against its own tuple; every
    name there is a registered phase class and vice versa."""
    from kmedtl.training.config import STRATEGIES as CONFIG_NAMES
    from kmedtl.training.freezing import STRATEGIES

    assert sorted(STRATEGIES) == sorted(CONFIG_NAMES)


def test_a_new_strategy_is_one_class_and_a_registry_entry():
    from types import SimpleNamespace

    from kmedtl.models import FlatClassifier, backbone
    from kmedtl.training.freezing import (
        STRATEGIES,
        Phase,
        Strategy,
        freeze_backbone,
        phase_multipliers,
        register_strategy,
        unfreeze_all,
    )

    @register_strategy
    class HeadThenAll(Strategy):
        name = "head_then_all_test"
        default_multipliers = (0.5, 1.0)

        def phases(self, cfg, model, epochs):
            return [Phase(0, 0, 1, "head", freeze_backbone), Phase(1, 1, epochs, "all",
                                                                   unfreeze_all)]

    try:
        with pytest.raises(ValueError, match="new, non-empty name"):
            register_strategy(HeadThenAll)
        cfg = SimpleNamespace(strategy="head_then_all_test", lr_multipliers=None)
        m = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 2)
        phases = plan_phases(cfg, m, 3)
        assert [(p.name, p.start, p.end) for p in phases] == [("head", 0, 1), ("all", 1, 3)]
        phases[0].apply(m)
        assert not m.backbone.trainable or not any(w.trainable for w in m.backbone.weights)
        assert phase_multipliers(cfg) == [0.5, 1.0]
    finally:
        STRATEGIES.pop("head_then_all_test", None)
    with pytest.raises(ConfigError, match="head_then_all_test.*is not one of"):
        plan_phases(SimpleNamespace(strategy="head_then_all_test"), None, 3)
