"""Schedules (values at chosen steps), losses and metrics against reference formulas."""

import keras
import numpy as np
import pytest
from test_training_helpers import arrays, flat_model

from kmedtl.training import (
    CohenKappa,
    OffsetSchedule,
    OneCycle,
    OneCycleMomentum,
    SmoothedSparseCategoricalCrossentropy,
    SparseAUC,
    Trainer,
    make_schedule,
    train_section,
)
from kmedtl.training.schedules import ExponentialSweep, schedule_value


def _v(schedule, step):
    return schedule_value(schedule, step)


def approx(value, rel=1e-5, abs=1e-9):
    return pytest.approx(value, rel=rel, abs=abs)  # float32 schedules


def test_one_cycle_values_at_chosen_steps():
    s = OneCycle(max_lr=0.01, total_steps=101, pct_start=0.3, div_factor=25,
                 final_div_factor=1e4)
    assert _v(s, 0) == approx(0.01 / 25)
    assert _v(s, 30) == approx(0.01)  # peak at pct_start of the steps
    assert _v(s, 15) == approx(0.01 / 25 + (0.01 - 0.01 / 25) / 2, rel=1e-4)  # cos mid
    assert _v(s, 100) == approx(0.01 / 25 / 1e4, rel=1e-3)
    assert _v(s, 500) == approx(_v(s, 100))  # clamps after the cycle
    values = [_v(s, i) for i in range(101)]
    assert np.all(np.diff(values[:31]) > 0) and np.all(np.diff(values[30:]) < 0)


def test_one_cycle_momentum_is_the_inverse_cycle():
    m = OneCycleMomentum(total_steps=101, high=0.95, low=0.85, pct_start=0.3)
    assert _v(m, 0) == approx(0.95)
    assert _v(m, 30) == approx(0.85)
    assert _v(m, 100) == approx(0.95)


def test_offset_and_sweep():
    s = OneCycle(0.01, 100)
    assert _v(OffsetSchedule(s, 40), 5) == approx(_v(s, 45))
    sweep = ExponentialSweep(1e-6, 1.0, 7)
    assert [_v(sweep, i) for i in range(7)] == approx([10.0 ** k for k in range(-6, 1)],
                                                            rel=1e-4)


def test_configured_cosine_and_step_schedules():
    cfg = train_section({"schedule": "cosine", "warmup_epochs": 1})
    s = make_schedule(cfg, 0.1, total_steps=110, steps_per_epoch=10)
    assert isinstance(s, keras.optimizers.schedules.CosineDecay)
    assert _v(s, 10) == approx(0.1)  # end of warm-up
    assert _v(s, 60) == approx(0.05, rel=1e-3)  # half-way down
    assert _v(s, 110) == approx(0.0, abs=1e-6)
    cfg = train_section({"schedule": "step", "step_every": 2, "step_factor": 0.5})
    s = make_schedule(cfg, 0.1, total_steps=60, steps_per_epoch=10)
    assert [_v(s, i) for i in (0, 19, 21, 41)] == approx([0.1, 0.1, 0.05, 0.025])
    assert make_schedule(train_section({}), 0.1, 60, 10) == 0.1


@pytest.mark.slow
def test_trainer_logs_the_one_cycle_learning_rate_per_epoch():
    x, y = arrays(16)
    r = Trainer(flat_model(), epochs=4, batch_size=8, schedule="one_cycle", learning_rate=0.01,
                jit_compile=False, verbose=0).fit((x, y))
    s = OneCycle(0.01, 4 * 2)
    # logged at epoch end: the optimizer's step is then 2, 4, 6, 8
    assert r.history["learning_rate"] == pytest.approx([_v(s, k) for k in (2, 4, 6, 8)],
                                                       rel=1e-4)


def test_label_smoothing_matches_keras_on_one_hot_and_masks():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=6).astype("float32")
    y = np.array([0, 1, 2, 2, 1, 0])
    ours = SmoothedSparseCategoricalCrossentropy(0.2)(y, p)
    ref = keras.losses.CategoricalCrossentropy(label_smoothing=0.2)(np.eye(3)[y], p)
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    y_masked = np.array([0, -1, 2, -1, 1, 0])
    keep = y_masked >= 0
    ours = SmoothedSparseCategoricalCrossentropy(0.2)(y_masked, p)
    ref = keras.losses.CategoricalCrossentropy(label_smoothing=0.2)(np.eye(3)[y[keep]], p[keep])
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_sparse_auc_is_macro_ovr_auroc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = np.arange(60) % 3
    p = rng.dirichlet(np.ones(3), size=60) + 0.6 * np.eye(3)[y]
    p = (p / p.sum(1, keepdims=True)).astype("float32")
    m = SparseAUC(3, num_thresholds=2000)
    m.update_state(y[:30], p[:30])
    m.update_state(np.concatenate([y[30:], [-1, -1]]),
                   np.concatenate([p[30:], np.eye(3, dtype="float32")[:2]]))  # ignored rows
    expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert float(m.result()) == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_cohen_kappa_matches_sklearn(weights):
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 80)
    pred = np.where(rng.random(80) < 0.6, y, rng.integers(0, 4, 80))
    m = CohenKappa(4, weights=weights)
    m.update_state(y[:50], np.eye(4)[pred[:50]])
    m.update_state(y[50:], np.eye(4)[pred[50:]])
    assert float(m.result()) == pytest.approx(cohen_kappa_score(y, pred, weights=weights),
                                              abs=1e-5)
    m.reset_state()
    assert float(m.result()) == pytest.approx(1.0)  # empty matrix: no disagreement
