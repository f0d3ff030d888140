"""The fit loop: run folder, resume after a kill, early stopping, XLA fallback, precision,
monitor errors, and MirroredStrategy over two logical CPUs (in a subprocess)."""

import csv
import json
import logging

import keras
import numpy as np
import pytest
from test_training_helpers import (
    RecordTrainable,
    StopAfter,
    arrays,
    flat_model,
    hier_model,
    hier_targets,
    run_python,
)

from kmedtl.errors import ConfigError
from kmedtl.models.precision import model_precision, resolve_jit_compile
from kmedtl.training import Trainer, build_model, resolve_precision, train_section

FAST = {"batch_size": 8, "jit_compile": False, "verbose": 0, "tensorboard": False}


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_run_folder_and_model_that_loads_in_a_fresh_process(tmp_path):
    x, y = arrays(16, size=32)
    keras.utils.set_random_seed(0)
    model = flat_model(family="cbr_tiny")
    run = tmp_path / "run"
    result = Trainer(model, run_dir=run, epochs=2, monitor="accuracy", tensorboard=True,
                     **{k: v for k, v in FAST.items() if k != "tensorboard"}).fit(
        (x, y), (x, y), eval_train=(x, y), extra_metrics={"n_train": 16})
    for name in ("model.keras", "history.csv", "train_metrics.json", "checkpoints/best.weights.h5",
                 "checkpoints/last.weights.h5"):
        assert (run / name).is_file(), name
    assert (run / "backup").is_dir() and not any((run / "backup").iterdir())  # run complete
    assert any((run / "logs").rglob("events.out.tfevents*"))
    rows = _rows(run / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert {"loss", "val_accuracy", "val_auc", "val_kappa", "learning_rate"} <= set(rows[0])
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["monitor"] == "val_accuracy" and metrics["mode"] == "max"
    assert metrics["epochs"] == [0, 1] and metrics["n_train"] == 16
    assert metrics["best_epoch"] == result.best_epoch
    assert set(metrics["val_metrics"]) >= {"accuracy", "auc", "kappa", "loss"}
    assert metrics["timings"]["fit_seconds"] > 0 and metrics["train_metrics"]
    expected = model.predict(x[:4], verbose=0)
    np.save(tmp_path / "x.npy", x[:4])
    out = run_python(f"""
        import json, numpy as np, keras
        import kmedtl.models  # registers kmedtl's layers; nothing from kmedtl.training
        m = keras.saving.load_model({str(run / "model.keras")!r})
        import sys
        assert "kmedtl.training" not in sys.modules
        print(json.dumps(m.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0).tolist()))
    """)
    np.testing.assert_allclose(np.array(json.loads(out.strip().splitlines()[-1])), expected,
                               atol=1e-5)


@pytest.mark.slow
def test_killed_run_resumes_and_the_epoch_count_continues(tmp_path):
    x, y = arrays(24)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(flat_model(), run_dir=run, epochs=4, callbacks=[StopAfter(epoch=2, batches=2)],
                **FAST).fit((x, y), (x, y))
    assert (run / "backup" / "state.json").is_file()
    assert [int(r["epoch"]) for r in _rows(run / "history.csv")] == [0, 1]
    seen = []

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    result = Trainer(flat_model(seed=5), run_dir=run, epochs=4, callbacks=[Epochs()],
                     **FAST).fit((x, y), (x, y))
    assert seen == [2, 3]  # continues where the backup stopped, not from 0
    assert result.resumed_from_epoch == 2 and result.epochs == [0, 1, 2, 3]
    assert [int(r["epoch"]) for r in _rows(run / "history.csv")] == [0, 1, 2, 3]
    assert not (run / "backup" / "state.json").exists()


@pytest.mark.slow
def test_killed_gradual_run_resumes_in_the_right_phase(tmp_path):
    x, y = arrays(24)
    run = tmp_path / "run"
    cfg = dict(FAST, strategy="gradual", unfreeze_at=[0.25, 0.5, 0.75], epochs=4)
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(flat_model(), run_dir=run, callbacks=[StopAfter(epoch=2)], **cfg).fit(
            (x, y), (x, y))
    rec = RecordTrainable(["block1_conv", "block2_conv", "block3_conv"])
    result = Trainer(flat_model(seed=3), run_dir=run, callbacks=[rec], **cfg).fit((x, y), (x, y))
    assert sorted(rec.by_epoch) == [2, 3]
    assert rec.by_epoch[2] == {"block2_conv", "block3_conv"}
    assert rec.by_epoch[3] == {"block1_conv", "block2_conv", "block3_conv"}
    assert result.epochs == [0, 1, 2, 3]


def test_early_stopping_ends_the_whole_run():
    x, y = arrays(16)
    # no learning, no shuffling: the training loss repeats exactly, so nothing improves
    result = Trainer(flat_model(), epochs=6, learning_rate=1e-12, early_stopping=1,
                     monitor="loss", strategy="gradual", unfreeze_at=[0.5], **FAST).fit(
        (x, y), shuffle=False)
    assert result.stopped_early and result.epochs == [0, 1]
    assert len(result.phases) == 2  # the second phase never ran


def test_reduce_lr_on_plateau_lowers_the_logged_learning_rate():
    x, y = arrays(16)
    result = Trainer(flat_model(), epochs=3, learning_rate=1e-9, reduce_lr=1,
                     reduce_lr_factor=0.5, monitor="loss", **FAST).fit((x, y), shuffle=False)
    # logged: the rate in force during each epoch; halved after the first flat epoch
    assert result.history["learning_rate"] == pytest.approx([1e-9, 1e-9, 5e-10], rel=1e-3)


@pytest.mark.slow
def test_deterministic_runs_repeat_exactly_in_a_fresh_process():
    out = run_python("""
        import json, numpy as np
        from test_training_helpers import arrays, flat_model
        from kmedtl.training import Trainer
        x, y = arrays(16)
        runs = []
        for _ in range(2):
            model = flat_model(seed=0, dropout=0.3)
            r = Trainer(model, epochs=2, batch_size=8, verbose=0, deterministic=True,
                        seed=4).fit((x, y))
            runs.append(model.get_weights())
        same = all(np.array_equal(a, b) for a, b in zip(*runs))
        print(json.dumps({"same": same, "jit": r.jit_compile}))
    """)
    res = json.loads(out.strip().splitlines()[-1])
    assert res == {"same": True, "jit": False}  # Keras turns XLA off under op determinism


def test_monitor_that_is_not_logged_is_a_clear_error():
    x, y = arrays(16)
    with pytest.raises(ConfigError) as e:
        Trainer(flat_model(), epochs=1, monitor="f1", **FAST).fit((x, y), (x, y))
    assert "train.monitor" in str(e.value) and "val_auc" in str(e.value)


@pytest.mark.slow
def test_hierarchical_training_with_smoothing_and_leaf_loss():
    x, leaf = arrays(24, n_classes=3)
    y = hier_targets(leaf)
    result = Trainer(hier_model(), epochs=1, label_smoothing=0.1, leaf_loss_weight=0.5,
                     monitor="auc", **FAST).fit((x, y), (x, y))
    assert result.monitor == "val_leaf_auc" and result.mode == "max"
    assert {"val_root_loss", "val_tumor_loss", "val_leaf_loss", "val_leaf_kappa"} <= \
        set(result.history)
    with pytest.raises(ConfigError, match="balance='weights'"):
        Trainer(hier_model(), epochs=1, **FAST).fit((x, y), class_weight={0: 1.0})


@pytest.mark.slow
def test_class_weight_for_flat_models_changes_the_loss():
    x, y = arrays(16)
    losses = []
    for cw in (None, {0: 1.0, 1: 5.0}):
        r = Trainer(flat_model(), epochs=1, learning_rate=1e-9, **FAST).fit(
            (x, y), class_weight=cw, shuffle=False)
        losses.append(r.history["loss"][0])
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


class _HostOp(keras.layers.Layer):
    """A layer XLA cannot compile (a host-side NumPy call)."""

    def call(self, x):
        import tensorflow as tf  # test-only: an op with no XLA kernel

        y = tf.numpy_function(lambda a: a, [x], tf.float32)
        y.set_shape(x.shape)
        return y


def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU: asked of TensorFlow itself, not of the kmedtl code
    under test (which asks Keras)."""
    import tensorflow as tf  # test-only: the oracle for the device-dependent defaults

    return bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.slow
def test_xla_auto_is_off_on_cpu_on_when_asked_and_falls_back_with_a_warning(caplog):
    from tensorflow.python.framework.config import is_op_determinism_enabled

    assert not is_op_determinism_enabled(), "an earlier test leaked op determinism"
    x, y = arrays(16)
    # "auto" (the default): no XLA on a CPU-only TensorFlow (it is slower there), XLA on
    # a GPU
    assert resolve_jit_compile("auto") is gpu_visible()
    result = Trainer(flat_model(), epochs=1, batch_size=8, verbose=0).fit((x, y))
    assert result.jit_compile is gpu_visible()
    result = Trainer(flat_model(), epochs=1, batch_size=8, verbose=0,
                     jit_compile=True).fit((x, y))
    assert result.jit_compile is True
    inp = keras.Input((32, 32, 1))
    bad = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="leaf")(
        keras.layers.GlobalAveragePooling2D()(_HostOp()(keras.layers.Conv2D(4, 3)(inp)))))
    with caplog.at_level(logging.WARNING, logger="kmedtl.training"), \
            pytest.warns(RuntimeWarning, match="XLA"):
        result = Trainer(bad, epochs=2, batch_size=8, verbose=0, jit_compile=True).fit((x, y))
    assert result.jit_compile is False and result.epochs == [0, 1]
    assert any("XLA compilation failed" in r.message for r in caplog.records)


@pytest.mark.slow
def test_precision_auto_is_float32_on_cpu_and_mixed_bfloat16_builds_and_trains():
    # "auto": float32 on CPU (float16 is emulated there), mixed_float16 on a GPU
    assert resolve_precision("auto") == ("mixed_float16" if gpu_visible() else "float32")
    from test_training_helpers import TINY, hierarchy

    cfg = train_section({"backbone": TINY, "model": "flat", "precision": "mixed_bfloat16"})
    model = build_model(cfg, hierarchy(), (32, 32, 1))
    assert keras.config.dtype_policy().name == "float32"  # global policy restored
    assert model_precision(model) == "mixed_bfloat16"
    assert model.output.dtype == "float32"  # heads stay float32
    x, y = arrays(16, n_classes=3)
    result = Trainer(model, epochs=1, **FAST).fit((x, y))
    assert result.precision == "mixed_bfloat16" and np.isfinite(result.history["loss"][0])
    # float16: Keras wraps the (discriminative) optimizer in a LossScaleOptimizer
    cfg = train_section(cfg, precision="mixed_float16")
    model = build_model(cfg, hierarchy(), (32, 32, 1))
    result = Trainer(model, epochs=1, lr_multipliers=[0.1, 0.5, 1.0], **FAST).fit((x, y))
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    assert type(model.optimizer.inner_optimizer).__name__ == "DiscriminativeOptimizer"
    assert result.precision == "mixed_float16" and np.isfinite(result.history["loss"][0])


@pytest.mark.slow
def test_mirrored_strategy_over_two_logical_cpus_matches_one_device():
    # No BatchNorm in this model: per-replica batch statistics would differ by design.
    out = run_python("""
        import json, numpy as np, keras
        from kmedtl.training.distribute import split_cpu, get_strategy, strategy_scope
        devices = split_cpu(2)  # before TensorFlow initialises its devices
        from test_training_helpers import arrays
        from kmedtl.training import Trainer
        x, y = arrays(32)
        cfg = dict(epochs=2, batch_size=8, jit_compile=False, verbose=0, optimizer="adam",
                   learning_rate=0.01, lr_multipliers=[0.1, 0.5, 1.0], schedule="one_cycle")
        def train(strategy):
            with strategy_scope(strategy):
                keras.utils.set_random_seed(0)
                inp = keras.Input((32, 32, 1))
                h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
                h = keras.layers.Conv2D(8, 3, activation="relu", name="c2")(h)
                h = keras.layers.GlobalAveragePooling2D()(h)
                model = keras.Model(inp, keras.layers.Dense(2, activation="softmax",
                                                            name="leaf")(h))
            Trainer(model, distribution=strategy, **cfg).fit((x, y), shuffle=False)
            return model
        strategy = get_strategy("mirrored", devices)
        mirrored = train(strategy)
        single = train(None)
        diff = max(float(np.abs(a - b).max()) for a, b in
                   zip(mirrored.get_weights(), single.get_weights()))
        print(json.dumps({"replicas": strategy.num_replicas_in_sync, "devices": devices,
                          "diff": diff, "opt": type(mirrored.optimizer).__name__}))
    """, timeout=300)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["replicas"] == 2 and len(res["devices"]) == 2
    assert res["opt"] == "DiscriminativeOptimizer"
    assert res["diff"] < 1e-5


class SlowEpochEnd(keras.callbacks.Callback):
    """Stands for a slow checkpoint/backup write at the end of each epoch."""

    def on_epoch_end(self, epoch, logs=None):
        import time

        time.sleep(0.4)


def test_epoch_timings_include_the_writes_at_each_epoch_end(tmp_path):
    """train_metrics' epoch seconds and images/s span the end-of-epoch callbacks
    (checkpoints, backups, logs), not only the batches: before, the timer stopped
    before them and overstated the train stage's speed."""
    x, y = arrays(16)
    result = Trainer(flat_model(), epochs=3, batch_size=8, jit_compile=False, verbose=0,
                     run_dir=tmp_path / "run", callbacks=[SlowEpochEnd()]).fit((x, y), (x, y))
    t = result.timings
    assert t["median_epoch_seconds"] >= 0.4
    assert t["images_per_second"] <= 16 / 0.4  # (3 epochs: the median is a traced one)
    saved = json.loads((tmp_path / "run" / "train_metrics.json").read_text())["timings"]
    assert saved["median_epoch_seconds"] == t["median_epoch_seconds"]
