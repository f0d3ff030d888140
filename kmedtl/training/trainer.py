"""The fit loop: :class:`Trainer` and the one-call :func:`fine_tune`.

:class:`Trainer` compiles and fits a Keras model according to a
:class:`~kmedtl.training.config.TrainSection` (or keyword overrides of it):

- **phases** -- one ``fit`` per phase of the freezing strategy (see
  :mod:`kmedtl.training.freezing`): Keras only picks up ``trainable`` changes at
  ``compile``, so gradual unfreezing recompiles at each boundary, with a fresh optimizer
  whose schedule continues the run-long one (:class:`~kmedtl.training.schedules.OffsetSchedule`);
- **optimizer** -- ``train.optimizer`` with the LR schedule, wrapped in a
  :class:`~kmedtl.training.optimizers.DiscriminativeOptimizer` for per-group multipliers
  and the one-cycle momentum;
- **losses/metrics** -- masked (label-smoothed if asked) cross-entropy per head; leaf
  accuracy, macro AUROC and kappa;
- **XLA** -- ``jit_compile="auto"`` by default: on for JAX and on a GPU/TPU, off on a
  CPU-only TensorFlow (slower there, see ``benchmarks/training.py``); when XLA is on and
  compilation fails before the first batch completes, a warning is logged and the phase
  re-runs without XLA;
- **callbacks** -- Keras' ``ModelCheckpoint`` (best by ``train.monitor``, mode inferred),
  ``EarlyStopping``, ``ReduceLROnPlateau``, ``BackupAndRestore``, ``TensorBoard``,
  ``CSVLogger``, ``TerminateOnNaN`` and progress bars.

With ``run_dir`` it writes ``checkpoints/``, ``backup/``, ``logs/``, ``history.csv``,
``model.keras`` and ``train_metrics.json`` as described in :mod:`kmedtl.training`; a run
killed mid-epoch resumes from its last backup when the same ``Trainer.fit`` is called
again (the epoch count continues; a multi-phase run resumes in the right phase).

Example::

    >>> import numpy as np
    >>> from kmedtl.models import FlatClassifier, backbone
    >>> model = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 2)
    >>> x, y = np.random.rand(16, 32, 32, 1).astype("float32"), np.arange(16) % 2
    >>> result = Trainer(model, epochs=2, batch_size=8, jit_compile=False,
    ...                  verbose=0).fit((x, y), (x, y))
    >>> result.epochs
    [0, 1]
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from kmedtl._quiet import console_stderr_filtered
from kmedtl.errors import ConfigError
from kmedtl.models.precision import model_precision, resolve_jit_compile
from kmedtl.run_folder import RunFolder, leaf_output
from kmedtl.training import callbacks as cb
from kmedtl.training.batchnorm import recalibrate_batchnorm
from kmedtl.training.config import TrainSection, train_section
from kmedtl.training.distribute import enable_determinism, strategy_scope
from kmedtl.training.freezing import (
    freeze_batchnorm,
    group_multipliers,
    layer_groups,
    phase_multipliers,
    plan_phases,
    trainable_summary,
)
from kmedtl.training.losses import classification_loss
from kmedtl.training.metrics import default_metrics, infer_mode, resolve_monitor
from kmedtl.training.optimizers import make_optimizer
from kmedtl.training.schedules import OffsetSchedule, make_schedule, momentum_schedule

log = logging.getLogger("kmedtl.training")

_XLA_ERROR = re.compile(
    r"XLA|xla_|jit_compile|JIT compil|Detected unsupported operations|"
    r"unsupported op|Compilation failure|compile graph", re.IGNORECASE)


@dataclass
class TrainResult:
    """What a :meth:`Trainer.fit` did (also written to ``train_metrics.json``)."""

    history: dict = field(default_factory=dict)  # key -> per-epoch values (all phases)
    epochs: list = field(default_factory=list)  # epoch indices run, resumed ones included
    monitor: str = "val_loss"
    mode: str = "min"
    best_epoch: int | None = None
    best_value: float | None = None
    stopped_early: bool = False
    phases: list = field(default_factory=list)
    jit_compile: bool = True
    precision: str = "float32"
    resumed_from_epoch: int = 0
    timings: dict = field(default_factory=dict)
    train_metrics: dict = field(default_factory=dict)
    val_metrics: dict = field(default_factory=dict)
    run_dir: str | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["history"] = {k: [_num(v) for v in vs] for k, vs in self.history.items()}
        return out


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else None


def _is_multi_output(model) -> bool:
    return isinstance(model.output, dict) and len(model.output) > 1 or \
        isinstance(model.output, (list, tuple)) and len(model.output) > 1


def _length(data) -> int | None:
    if isinstance(data, tuple):
        return len(data[0]) if not isinstance(data[0], dict) else len(next(iter(data[0].values())))
    try:
        return len(data)
    except TypeError:  # infinite / unknown cardinality
        return None


class Trainer:
    """Compile and fit ``model`` as ``train.*`` says.

    Args:
        model: a built Keras model; kmedtl classifiers (``FlatClassifier``,
            ``HierarchicalClassifier``) get their losses and metrics automatically.
        config: a :class:`TrainSection`, a ``train`` mapping or a ``Config``.
        run_dir: write the run folder here (checkpoints, backup, logs, history, model);
            ``None`` keeps everything in memory.
        distribution: a ``tf.distribute`` strategy the model was built under (see
            :mod:`kmedtl.training.distribute`).
        callbacks: extra Keras callbacks for every phase.
        loss, metrics: override the automatic ones (for models that are not kmedtl's).
        **overrides: ``train.*`` fields, e.g. ``epochs=5, strategy="linear_probe"`` (the
            freezing strategy; the distribution strategy is ``distribution=``).
    """

    def __init__(self, model, config=None, *, run_dir=None, distribution=None, callbacks=(),
                 loss=None, metrics=None, loss_weights=None, label: str = "config",
                 **overrides):
        # a validated section is used as it is: the train section is validated once, where
        # the config is loaded, and passed down as this typed object
        self.cfg: TrainSection = (config if isinstance(config, TrainSection) and not overrides
                                  else train_section(config, label, **overrides))
        self.model = model
        self.run_dir = Path(run_dir) if run_dir else None
        # the run folder's layout (file names) is RunFolder's; the Trainer writes through it
        self.folder = RunFolder(self.run_dir) if self.run_dir else None
        self.distribution = distribution
        self.extra_callbacks = list(callbacks)
        self.loss = loss
        self.metrics = metrics
        self.loss_weights = loss_weights
        self.jit_compile = resolve_jit_compile(self.cfg.jit_compile)
        self.multi_output = _is_multi_output(model)
        self.n_classes = int(leaf_output(model.output, first=True).shape[-1])

    # ------------------------------------------------------------------ compile
    def compile_args(self) -> dict:
        """``loss``, ``metrics`` (and ``loss_weights``) for ``model.compile``."""
        s = self.cfg.label_smoothing
        if self.loss is not None:
            out = {"loss": self.loss, "metrics": self.metrics}
            if self.loss_weights is not None:
                out["loss_weights"] = self.loss_weights
            return out
        hierarchy = getattr(self.model, "hierarchy", None)
        if self.multi_output:
            if hierarchy is None:
                raise ConfigError("Trainer: a multi-output model that is not a kmedtl "
                                  "HierarchicalClassifier needs loss= (and metrics=)")
            loss = {hierarchy.node_output_name(p): classification_loss(s)
                    for p in hierarchy.parents}
            out = {"loss": loss,
                   "metrics": self.metrics or {"leaf": default_metrics(self.n_classes)}}
            if self.cfg.leaf_loss_weight:
                loss["leaf"] = classification_loss(s)
                weights = {k: 1.0 for k in loss}
                weights["leaf"] = float(self.cfg.leaf_loss_weight)
                out["loss_weights"] = weights
            return out
        return {"loss": classification_loss(s),
                "metrics": self.metrics or default_metrics(self.n_classes)}

    def compile(self, learning_rate, multipliers=None, momentum=None) -> None:
        """Compile with a fresh optimizer (``learning_rate``: float or schedule)."""
        with strategy_scope(self.distribution):
            optimizer = make_optimizer(self.cfg, learning_rate, multipliers, momentum)
            if model_precision(self.model) == "mixed_float16":
                # Keras only adds loss scaling when the *model's* policy is mixed_float16,
                # which a reloaded kmedtl classifier loses (its config has no dtype)
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            self.model.compile(optimizer=optimizer, jit_compile=self.jit_compile,
                               **self.compile_args())

    # ------------------------------------------------------------------ fit
    def fit(self, train, val=None, *, epochs=None, steps_per_epoch=None, callbacks=(),
            class_weight=None, eval_train=None, extra_metrics: dict | None = None,
            shuffle: bool = True, evaluate: bool = True) -> TrainResult:
        """Train; returns a :class:`TrainResult` (the best weights are loaded at the end).

        ``train``/``val``/``eval_train`` are ``tf.data`` datasets (or anything Keras' ``fit``
        takes as ``x``) or ``(x, y[, sample_weight])`` tuples of arrays.  ``eval_train`` (the
        training set without augmentation) is evaluated at the end for ``train_metrics``.
        ``class_weight`` works for single-output models; for hierarchical ones use
        ``make_dataset(..., balance="weights")``.  ``shuffle`` applies to array inputs
        (datasets shuffle themselves).  ``evaluate=False`` skips the final evaluation
        (``val_metrics``/``train_metrics`` stay empty), e.g. in tuner trials.
        """
        self._tmp = None
        try:
            return self._fit(train, val, epochs, steps_per_epoch, callbacks, class_weight,
                             eval_train, extra_metrics, shuffle, evaluate)
        finally:
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def _fit(self, train, val, epochs, steps_per_epoch, callbacks, class_weight, eval_train,
             extra_metrics, shuffle, evaluate) -> TrainResult:
        cfg = self.cfg
        epochs = int(epochs or cfg.epochs)
        t_start = time.perf_counter()
        if class_weight is not None and self.multi_output:
            raise ConfigError("class_weight: Keras supports it for single-output models only; "
                              "for a hierarchical model build the dataset with "
                              "make_dataset(..., balance='weights') (data.balance: weights)")
        steps_given = steps_per_epoch or cfg.steps_per_epoch
        steps = steps_given
        if steps is None:
            n = _length(train)
            if n is None:
                raise ConfigError("train.steps_per_epoch is required: the training data has no "
                                  "known length (e.g. data.balance: sampling repeats forever)")
            steps = math.ceil(n / cfg.batch_size) if isinstance(train, tuple) else n
        if cfg.deterministic:
            enable_determinism(cfg.seed)
        else:
            keras.utils.set_random_seed(cfg.seed)
        monitor = resolve_monitor(cfg.monitor, self.multi_output, validation=val is not None)
        mode = cfg.monitor_mode if cfg.monitor_mode != "auto" else infer_mode(monitor)
        phases = plan_phases(cfg, self.model, epochs)
        mults = phase_multipliers(cfg)
        groups = layer_groups(self.model, len(mults)) if mults else None
        total = epochs * steps
        run_lr = make_schedule(cfg, cfg.learning_rate, total, steps)
        run_mom = momentum_schedule(cfg, total)

        paths = self._paths()
        state = self._start(paths)
        completed = int(state.get("completed_phases", 0)) if state else 0
        resumed_from = int(state.get("epoch", 0)) if state else 0
        best = state.get("best") if state else None
        if completed and paths and os.path.exists(paths["phase_weights"]):
            self.model.set_weights(list(np.load(paths["phase_weights"]).values()))

        checkpoint = keras.callbacks.ModelCheckpoint(
            str(self._best_path(paths)), monitor=monitor, mode=mode, save_best_only=True,
            save_weights_only=True, verbose=0,
            initial_value_threshold=best if best is not None else None)
        timer = cb.EpochTimer()
        histories, stopped_early, fit_seconds = [], False, 0.0
        first_epoch_seconds = None
        for phase in phases:
            if phase.index < completed:
                continue
            phase.apply(self.model)
            if cfg.freeze_bn:
                freeze_batchnorm(self.model)
            if phase.restart_schedule:
                peak = cfg.learning_rate if phase.index == 0 else cfg.learning_rate / 2
                lr = make_schedule(cfg, peak, phase.epochs * steps, steps)
                mom = momentum_schedule(cfg, phase.epochs * steps)
            else:
                offset = phase.start * steps
                lr = OffsetSchedule(run_lr, offset) if callable(run_lr) and offset else run_lr
                mom = OffsetSchedule(run_mom, offset) if run_mom is not None and offset \
                    else run_mom
            patterns = group_multipliers(groups, mults) if groups else None
            log.info("phase %d (%s): epochs %d-%d, %s", phase.index, phase.name, phase.start,
                     phase.end - 1, trainable_summary(self.model))

            def make_callbacks(phase=phase):
                return self._callbacks(phase, paths, monitor, mode, checkpoint, timer,
                                       completed=phase.index, user=callbacks)

            fit_kwargs = dict(validation_data=val, epochs=phase.end, initial_epoch=phase.start,
                              steps_per_epoch=steps_given, verbose=cfg.verbose,
                              class_weight=class_weight)
            if isinstance(train, tuple):
                fit_kwargs.update(x=train[0], y=train[1], batch_size=cfg.batch_size,
                                  sample_weight=train[2] if len(train) > 2 else None,
                                  shuffle=shuffle)
                if isinstance(val, tuple):
                    fit_kwargs["validation_data"] = val
            else:
                fit_kwargs.update(x=train, shuffle=False)  # datasets shuffle themselves
            t0 = time.perf_counter()
            with console_stderr_filtered():  # native one-time log lines (kmedtl command)
                history = self._fit_phase(
                    lambda lr=lr, p=patterns, m=mom: self.compile(lr, p, m), make_callbacks,
                    fit_kwargs)
            fit_seconds += time.perf_counter() - t0
            if first_epoch_seconds is None and timer.seconds:
                first_epoch_seconds = timer.seconds[0]
            histories.append(history)
            if paths:
                self._end_phase(paths, phase.index + 1, phase.end, checkpoint.best)
            if self.model.stop_training:  # EarlyStopping / TerminateOnNaN: end the run
                stopped_early = True
                break

        result = self._finish(paths, histories, phases, monitor, mode, checkpoint,
                              stopped_early, resumed_from)
        if cfg.recalibrate_bn:
            self._recalibrate(eval_train if eval_train is not None else train, steps)
        result.timings = {
            "total_seconds": round(time.perf_counter() - t_start, 3),
            "fit_seconds": round(fit_seconds, 3),
            "first_epoch_seconds": round(first_epoch_seconds, 3)
            if first_epoch_seconds else None,
            "median_epoch_seconds": round(float(np.median(timer.seconds)), 3)
            if timer.seconds else None,
            "steps_per_epoch": steps,
            "images_per_second": round(steps * cfg.batch_size * len(timer.seconds)
                                       / max(sum(timer.seconds), 1e-9), 2)
            if timer.seconds else None,
        }
        if evaluate:
            result.val_metrics = self._evaluate(val) if val is not None else {}
            result.train_metrics = self._evaluate(eval_train) if eval_train is not None else {}
        if paths:
            self._write_outputs(paths, result, extra_metrics)
        return result

    # ------------------------------------------------------------------ helpers
    def _fit_phase(self, compile_fn, make_callbacks, fit_kwargs):
        compile_fn()
        counter = cb.BatchCounter()
        try:
            return self.model.fit(callbacks=[counter, *make_callbacks()], **fit_kwargs)
        except Exception as exc:  # XLA fallback: only before the first batch finished
            if self.jit_compile is not True or counter.batches or \
                    not _XLA_ERROR.search(f"{type(exc).__name__}: {exc}"):
                raise
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            log.warning("XLA compilation failed (%s: %s); training this model without XLA "
                        "(train.jit_compile: false silences this)", type(exc).__name__, first)
            warnings.warn(f"XLA compilation failed; falling back to jit_compile=False "
                          f"({type(exc).__name__})", RuntimeWarning, stacklevel=2)
            self.jit_compile = False
            compile_fn()
            return self.model.fit(callbacks=make_callbacks(), **fit_kwargs)

    def _paths(self) -> dict | None:
        """:meth:`RunFolder.training_paths` (its folders created); ``None`` without a
        run folder (the best weights then go to a temporary folder)."""
        if self.folder is None:
            self._tmp = tempfile.mkdtemp(prefix="kmedtl_ckpt_")
            return None
        return self.folder.training_paths(create=True)

    def _best_path(self, paths):
        return paths["best"] if paths else Path(self._tmp) / RunFolder.BEST_WEIGHTS

    def _start(self, paths) -> dict | None:
        """Resume state from ``backup/`` or, for a fresh run, clear stale outputs."""
        if paths is None:
            return None
        state = self.folder.training_state()  # backup/state.json
        if state is None:
            for stale in (paths["history"], paths["best"], paths["last"]):
                if stale.exists():
                    stale.unlink()
            shutil.rmtree(paths["backup_dir"], ignore_errors=True)
            paths["backup_dir"].mkdir(parents=True, exist_ok=True)
            return None
        for sub in paths["backup_dir"].iterdir():  # finished phases' leftovers
            index = RunFolder.backup_phase_index(sub.name)
            if index is not None and sub.is_dir() and \
                    index < int(state.get("completed_phases", 0)):
                shutil.rmtree(sub, ignore_errors=True)
        log.info("resuming %s from epoch %s", self.run_dir, state.get("epoch"))
        return state

    def _end_phase(self, paths, completed, epoch, best):
        weights = self.model.get_weights()
        tmp = paths["phase_weights_tmp"]
        np.savez(tmp, *weights)
        os.replace(tmp, paths["phase_weights"])
        cb.write_state(paths["state"], completed_phases=completed, phase=completed,
                       epoch=epoch, best=best)
        shutil.rmtree(self.folder.backup_phase_dir(completed - 1), ignore_errors=True)

    def _callbacks(self, phase, paths, monitor, mode, checkpoint, timer, completed, user):
        cfg = self.cfg
        out = [cb.LearningRateLogger(), cb.MonitorGuard(monitor), checkpoint,
               keras.callbacks.TerminateOnNaN()]
        if cfg.early_stopping:
            out.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=mode,
                                                     patience=cfg.early_stopping))
        if cfg.reduce_lr:
            out.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode,
                                                         patience=cfg.reduce_lr,
                                                         factor=cfg.reduce_lr_factor))
        if paths is not None:
            out.append(keras.callbacks.BackupAndRestore(
                str(self.folder.backup_phase_dir(phase.index)), save_freq=cfg.backup_every,
                delete_checkpoint=False))
            out.append(keras.callbacks.CSVLogger(str(paths["history"]), append=True))
            if cfg.tensorboard:
                out.append(keras.callbacks.TensorBoard(str(paths["logs_dir"])))
            out.append(cb.RunState(paths["state"], phase.index, completed, checkpoint))
        # the timer last: an epoch's time includes its checkpoint, backup and log writes
        return [*out, *self.extra_callbacks, *user, timer]

    def _recalibrate(self, data, steps):
        """train.recalibrate_bn: BatchNorm statistics averaged over the training images
        for the final (best) weights; see :mod:`kmedtl.training.batchnorm`."""
        if self.distribution is not None or keras.distribution.distribution() is not None:
            # (data_parallel: each process sees only its shard of the images)
            log.info("train.recalibrate_bn skipped under a distribution strategy")
            return
        # a dataset: one pass, at most one epoch's worth of batches
        recalibrate_batchnorm(self.model, data, batch_size=self.cfg.batch_size,
                              max_batches=steps)

    def _finish(self, paths, histories, phases, monitor, mode, checkpoint, stopped_early,
                resumed_from) -> TrainResult:
        if paths is not None:
            self.model.save_weights(str(paths["last"]))
            history = read_history(paths["history"])
        else:
            history = {}
            for h in histories:
                history.setdefault("epoch", []).extend(h.epoch)
                for k, v in h.history.items():
                    history.setdefault(k, []).extend(v)
        epochs_run = [int(e) for e in history.get("epoch", [])]
        best_epoch = best_value = None
        values = history.get(monitor)
        if values:
            arr = np.array([np.nan if v is None else float(v) for v in values])
            if np.isfinite(arr).any():
                i = int(np.nanargmin(arr) if mode == "min" else np.nanargmax(arr))
                best_epoch, best_value = epochs_run[i], float(arr[i])
        best_file = self._best_path(paths)
        if os.path.exists(best_file):
            with warnings.catch_warnings():  # an earlier phase's optimizer: skipped
                warnings.filterwarnings("ignore", message=".*Skipping variable loading.*")
                warnings.filterwarnings("ignore", message=".*optimizer.*")
                self.model.load_weights(str(best_file))
        return TrainResult(
            history=history, epochs=epochs_run, monitor=monitor, mode=mode,
            best_epoch=best_epoch, best_value=best_value, stopped_early=stopped_early,
            phases=[p.to_dict() for p in phases],
            jit_compile=bool(getattr(self.model, "jit_compile", self.jit_compile)),
            precision=model_precision(self.model), resumed_from_epoch=resumed_from,
            run_dir=str(self.run_dir) if self.run_dir else None)

    def _evaluate(self, data) -> dict:
        kwargs = {"verbose": 0, "return_dict": True}
        if isinstance(data, tuple):
            out = self.model.evaluate(data[0], data[1], batch_size=self.cfg.batch_size, **kwargs)
        else:
            out = self.model.evaluate(data, **kwargs)
        return {k: _num(v) for k, v in out.items()}

    def _write_outputs(self, paths, result: TrainResult, extra: dict | None):
        save_inference_model(self.model, paths["model"])
        metrics = {"kind": "kmedtl-train-metrics", "version": 1, **(extra or {}),
                   **result.to_json(), "config": self.cfg.model_dump(mode="json")}
        self.folder.write_train_metrics(metrics)
        # the run is complete: nothing left to resume
        shutil.rmtree(paths["backup_dir"], ignore_errors=True)
        paths["backup_dir"].mkdir(exist_ok=True)


def read_history(path) -> dict:
    """``history.csv`` as ``{column: [values]}`` (floats; ``epoch`` as ints)."""
    out: dict[str, list] = {}
    if not os.path.exists(path):
        return out
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                try:
                    val = int(v) if k == "epoch" else float(v)
                except (TypeError, ValueError):
                    val = None
                out.setdefault(k, []).append(val)
    return out


def save_inference_model(model, path) -> Path:
    """Save ``model`` to ``.keras`` without its training state (no optimizer, no compile
    config), so it loads anywhere ``kmedtl.models`` is imported.  Written atomically."""
    path = Path(path)
    try:
        clone = model.__class__.from_config(model.get_config())
        clone.set_weights(model.get_weights())
    except Exception as exc:  # e.g. a model whose config does not rebuild
        raise ConfigError(f"{path}: cannot save a clean copy of {model.name!r}: {exc}") from exc
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    clone.save(tmp)
    os.replace(tmp, path)
    return path


def fine_tune(model, train, val=None, epochs: int = 5, *, head_epochs: int = 1,
              learning_rate: float = 2e-3, lr_multipliers=(1 / 9, 1 / 3, 1.0),
              run_dir=None, callbacks=(), **overrides) -> TrainResult:
    """fastai-style default: ``head_epochs`` with the backbone frozen, then ``epochs`` with
    everything unfrozen at discriminative rates (``lr_multipliers``, input side -> head),
    each phase under its own one-cycle schedule (the second at half the peak rate).

    Every part is usable alone (:class:`Trainer` with ``strategy=...``,
    :class:`~kmedtl.training.DiscriminativeOptimizer`, :class:`~kmedtl.training.OneCycle`).
    ``overrides`` are further ``train.*`` fields (``batch_size``, ``optimizer``, ...).
    """
    cfg = {"strategy": "fine_tune", "schedule": "one_cycle", "epochs": head_epochs + epochs,
           "head_epochs": head_epochs, "learning_rate": learning_rate,
           "lr_multipliers": list(lr_multipliers) if lr_multipliers else None}
    cfg.update(overrides)
    return Trainer(model, cfg, run_dir=run_dir, callbacks=callbacks).fit(train, val)
