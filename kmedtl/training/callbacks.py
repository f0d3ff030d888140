"""Small Keras callbacks the trainer adds next to Keras' own.

Checkpointing, early stopping, LR reduction, backup/restore, TensorBoard and CSV logging
are Keras' callbacks; these fill the gaps:

- :class:`LearningRateLogger` puts the current ``learning_rate`` into the epoch logs (so
  ``history.csv`` and TensorBoard record it whatever the schedule; Keras only logs it
  from ``ReduceLROnPlateau``);
- :class:`MonitorGuard` fails after the first epoch with the available log keys when the
  monitored metric does not exist (Keras' callbacks would only warn, every epoch, and
  then never save a checkpoint);
- :class:`EpochTimer` records wall time per epoch;
- :class:`RunState` writes ``backup/state.json`` (completed phases, best monitored value)
  so an interrupted multi-phase run resumes in the right phase with the right best.
"""

from __future__ import annotations

import json
import math
import os
import time

import keras
from keras import ops

from kmedtl.errors import ConfigError
from kmedtl.jsonio import atomic_write


def current_learning_rate(optimizer) -> float:
    """The learning rate the optimizer uses at its current step, as a float."""
    return float(ops.convert_to_numpy(optimizer.learning_rate))


class LearningRateLogger(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.model.optimizer is not None:
            logs["learning_rate"] = current_learning_rate(self.model.optimizer)


class MonitorGuard(keras.callbacks.Callback):
    def __init__(self, monitor: str, field: str = "train.monitor"):
        super().__init__()
        self.monitor = monitor
        self.field = field

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            raise ConfigError(
                f"{self.field}: {self.monitor!r} is not logged by this model; logged keys: "
                f"{sorted(logs)} (short names: loss, accuracy, auc, kappa)")


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._t0 = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self._t0 is not None:
            self.seconds.append(time.perf_counter() - self._t0)


class BatchCounter(keras.callbacks.Callback):
    """Counts finished training batches (the XLA fallback only retries before the first)."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


class RunState(keras.callbacks.Callback):
    """``state.json``: ``{"completed_phases", "phase", "epoch", "best"}``, written atomically
    after every epoch (and by the trainer after every phase)."""

    def __init__(self, path, phase: int, completed: int, checkpoint=None):
        super().__init__()
        self.path = str(path)
        self.phase = phase
        self.completed = completed
        self.checkpoint = checkpoint

    def on_epoch_end(self, epoch, logs=None):
        best = getattr(self.checkpoint, "best", None)
        write_state(self.path, completed_phases=self.completed, phase=self.phase,
                    epoch=epoch + 1, best=best)


def write_state(path, **state) -> None:
    best = state.get("best")
    if best is not None and not math.isfinite(float(best)):
        state["best"] = None
    elif best is not None:
        state["best"] = float(best)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    atomic_write(path, lambda fh: json.dump(state, fh))


def read_state(path) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None
