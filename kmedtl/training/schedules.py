"""Learning-rate (and momentum) schedules.

Cosine and step decay are Keras' own (``keras.optimizers.schedules.CosineDecay`` with its
linear warm-up, ``PiecewiseConstantDecay``); :func:`make_schedule` builds them from the
``train`` config.  Keras has no one-cycle policy, so :class:`OneCycle` is written here
(Smith & Topin 2018, in fastai's form: cosine warm-up from ``max_lr / div_factor`` to
``max_lr`` over ``pct_start`` of the steps, then cosine annealing to
``max_lr / div_factor / final_div_factor``); :class:`OneCycleMomentum` is the matching
inverse cycle for ``beta_1`` / momentum, applied in-graph by
:class:`~kmedtl.training.optimizers.DiscriminativeOptimizer`.

All schedules are pure ``keras.ops`` functions of the optimizer step, registered with
``keras.saving.register_keras_serializable(package="kmedtl")``.

Example::

    >>> s = OneCycle(max_lr=1e-2, total_steps=100)
    >>> round(float(s(0)), 6), round(float(s(25)), 6)
    (0.0004, 0.01)
"""

from __future__ import annotations

import math

import keras
from keras import ops

from kmedtl.errors import ConfigError

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule


def _cos_anneal(start, end, frac):
    """Cosine interpolation from ``start`` (frac 0) to ``end`` (frac 1)."""
    return end + (start - end) * 0.5 * (1.0 + ops.cos(math.pi * frac))


class _Cycle:
    """Shared two-phase cosine shape: ``start -> peak`` then ``peak -> end``."""

    def _value(self, step, start, peak, end):
        step = ops.cast(step, "float32")
        total = float(max(self.total_steps - 1, 1))
        warm = max(float(self.pct_start) * total, 1.0)
        step = ops.minimum(step, total)
        up = _cos_anneal(start, peak, ops.clip(step / warm, 0.0, 1.0))
        down = _cos_anneal(peak, end, ops.clip((step - warm) / max(total - warm, 1.0), 0.0, 1.0))
        return ops.where(step <= warm, up, down)


@keras.saving.register_keras_serializable(package="kmedtl")
class OneCycle(_Cycle, LearningRateSchedule):
    """One-cycle learning rate over ``total_steps`` optimizer steps.

    Args:
        max_lr: the peak learning rate.
        total_steps: steps of the whole cycle (epochs x steps per epoch).
        pct_start: fraction of the steps spent warming up.
        div_factor: start at ``max_lr / div_factor``.
        final_div_factor: end at ``max_lr / div_factor / final_div_factor``.
    """

    def __init__(self, max_lr, total_steps, pct_start=0.25, div_factor=25.0,
                 final_div_factor=1e4, name="one_cycle"):
        if total_steps < 1:
            raise ConfigError(f"OneCycle: total_steps must be >= 1, got {total_steps}")
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        self.name = name

    def __call__(self, step):
        start = self.max_lr / self.div_factor
        return self._value(step, start, self.max_lr, start / self.final_div_factor)

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps,
                "pct_start": self.pct_start, "div_factor": self.div_factor,
                "final_div_factor": self.final_div_factor, "name": self.name}


@keras.saving.register_keras_serializable(package="kmedtl")
class OneCycleMomentum(_Cycle, LearningRateSchedule):
    """The momentum half of one-cycle: ``high -> low`` while the LR warms up, then back.

    A schedule of the step like a learning-rate schedule; give it to
    :class:`~kmedtl.training.optimizers.DiscriminativeOptimizer` (``momentum=``), which
    sets the inner optimizer's ``beta_1`` (Adam family) or ``momentum`` (SGD) to its value
    at every step, inside the compiled train step.
    """

    def __init__(self, total_steps, high=0.95, low=0.85, pct_start=0.25,
                 name="one_cycle_momentum"):
        self.total_steps = int(total_steps)
        self.high = float(high)
        self.low = float(low)
        self.pct_start = float(pct_start)
        self.name = name

    def __call__(self, step):
        return self._value(step, self.high, self.low, self.high)

    def get_config(self):
        return {"total_steps": self.total_steps, "high": self.high, "low": self.low,
                "pct_start": self.pct_start, "name": self.name}


@keras.saving.register_keras_serializable(package="kmedtl")
class OffsetSchedule(LearningRateSchedule):
    """``schedule(step + offset)``: continue a run-long schedule in a later training phase
    (each phase has a fresh optimizer whose step count starts at 0)."""

    def __init__(self, schedule, offset=0, name="offset"):
        self.schedule = schedule
        self.offset = int(offset)
        self.name = name

    def __call__(self, step):
        return self.schedule(ops.add(ops.cast(step, "float32"), float(self.offset)))

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule),
                "offset": self.offset, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="kmedtl")
class ExponentialSweep(LearningRateSchedule):
    """``start * (end / start) ** (step / (steps - 1))``: the LR finder's sweep."""

    def __init__(self, start_lr, end_lr, steps, name="exponential_sweep"):
        if not 0 < start_lr < end_lr:
            raise ConfigError(f"lr_find: need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
        self.start_lr = float(start_lr)
        self.end_lr = float(end_lr)
        self.steps = int(steps)
        self.name = name

    def __call__(self, step):
        frac = ops.cast(step, "float32") / float(max(self.steps - 1, 1))
        return self.start_lr * ops.power(self.end_lr / self.start_lr, frac)

    def get_config(self):
        return {"start_lr": self.start_lr, "end_lr": self.end_lr, "steps": self.steps,
                "name": self.name}


def make_schedule(cfg, learning_rate: float, total_steps: int, steps_per_epoch: int):
    """The configured LR schedule (a float for ``constant``) over ``total_steps``.

    ``cfg`` is a :class:`~kmedtl.training.config.TrainSection`.
    """
    kind = cfg.schedule
    lr = float(learning_rate)
    if kind == "constant":
        return lr
    if kind == "one_cycle":
        oc = cfg.one_cycle
        return OneCycle(lr, total_steps, oc.pct_start, oc.div_factor, oc.final_div_factor)
    if kind == "cosine":
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        warmup = min(warmup, max(total_steps - 1, 0))
        if warmup:
            # CosineDecay warms up linearly from initial_learning_rate to warmup_target
            return keras.optimizers.schedules.CosineDecay(
                lr / 100.0, max(total_steps - warmup, 1), alpha=0.0, warmup_target=lr,
                warmup_steps=warmup)
        return keras.optimizers.schedules.CosineDecay(lr, max(total_steps, 1), alpha=0.0)
    if kind == "step":
        every = cfg.step_every * steps_per_epoch
        bounds = list(range(every, total_steps, every))
        values = [lr * cfg.step_factor ** i for i in range(len(bounds) + 1)]
        if not bounds:
            return lr
        return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, values)
    raise ConfigError(f"train.schedule: {kind!r} is not one of "
                      "['constant', 'one_cycle', 'cosine', 'step']")


def momentum_schedule(cfg, total_steps: int):
    """The one-cycle momentum cycle when ``train.schedule`` is ``one_cycle`` (else None)."""
    if cfg.schedule != "one_cycle" or cfg.one_cycle.momentum is None:
        return None
    high, low = cfg.one_cycle.momentum
    return OneCycleMomentum(total_steps, high, low, cfg.one_cycle.pct_start)


def schedule_value(schedule, step) -> float:
    """A schedule (or float) evaluated at ``step``, as a Python float."""
    if callable(schedule):
        return float(ops.convert_to_numpy(schedule(step)))
    return float(schedule)
