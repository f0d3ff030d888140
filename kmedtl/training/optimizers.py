"""Discriminative learning rates for any Keras optimizer.

:class:`DiscriminativeOptimizer` wraps one Keras optimizer (Adam, AdamW, SGD, ...) and
gives every variable group its own learning-rate multiplier: the layers near the input
learn at ``lr/9``, the middle at ``lr/3``, the head at ``lr`` (Howard & Ruder 2018).

Why a wrapper and not ``keras.optimizers.MultiOptimizer`` (one optimizer per group)?
``MultiOptimizer`` hides ``learning_rate`` (it raises), so ``ReduceLROnPlateau``,
``LearningRateScheduler``, LR logging and one shared schedule stop working.  And why not
scale the gradients?  Adam normalises the gradient by its running RMS, so a scaled
gradient gives the *same* step.  The wrapper instead keeps one learning rate (a float or
any schedule) and, in ``update_step``, calls the inner optimizer's ``update_step`` with
``learning_rate * multiplier[variable]``: the step itself is scaled, for every optimizer
whose update is proportional to its learning rate (all Keras optimizers; decoupled weight
decay, e.g. AdamW's, is scaled the same way).

It also applies a momentum schedule (``momentum=``, e.g.
:class:`~kmedtl.training.schedules.OneCycleMomentum`) in-graph: the inner optimizer's
``beta_1`` (Adam family) is set to the schedule's value at the
current step before its update, so no retracing and no host round-trip is needed (a
callback that assigns a Python attribute would be baked into the compiled step).
SGD branches on the Python value of ``momentum``, so for SGD the wrapper applies SGD's
own update rule with the scheduled momentum.

Pure ``keras``/``keras.ops``: works on the TensorFlow and JAX backends, under
``tf.distribute`` strategies (the inner update runs per replica like any optimizer's) and
inside a ``LossScaleOptimizer`` (mixed float16).  Registered as
``kmedtl>DiscriminativeOptimizer``.

Example::

    >>> import keras
    >>> opt = DiscriminativeOptimizer(keras.optimizers.Adam(1e-3),
    ...                               multipliers={"block1_.*": 1 / 9, "block2_.*": 1 / 3})
    >>> opt.multiplier_for("block1_conv/kernel"), opt.multiplier_for("leaf_logits/bias")
    (0.1111111111111111, 1.0)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import keras
from keras import ops

from kmedtl.errors import ConfigError

_APPLY_LEVEL = ("clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor",
                "gradient_accumulation_steps")


def _plain(optimizer) -> keras.optimizers.Optimizer:
    """A fresh copy of ``optimizer`` (a name, a config dict or an instance)."""
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer.__class__.from_config(optimizer.get_config())
    return keras.optimizers.get(optimizer)


@keras.saving.register_keras_serializable(package="kmedtl")
class DiscriminativeOptimizer(keras.optimizers.Optimizer):
    """Per-variable-group learning-rate multipliers (and an optional momentum schedule)
    around any Keras optimizer.

    Args:
        optimizer: the inner optimizer (instance, name or config).  Its update rule,
            hyper-parameters and weight decay are used; its ``learning_rate`` is the
            default for ``learning_rate`` below.
        multipliers: ``{regex: multiplier}`` or a list of ``(regex, multiplier)``; a
            variable takes the first pattern that ``re.fullmatch``-es its ``path``
            (``"block1_conv/kernel"``).  See :func:`kmedtl.training.freezing.group_multipliers`
            to build it from layer groups.
        default_multiplier: for variables no pattern matches.
        learning_rate: float or ``LearningRateSchedule``; default: the inner optimizer's.
        momentum: optional schedule (step -> value) for ``beta_1`` / ``momentum``.

    Gradient clipping, loss scaling and gradient accumulation are applied once, by the
    wrapper (taken from the inner optimizer unless given here).  ``use_ema`` is not
    supported on the inner optimizer.
    """

    def __init__(self, optimizer="adam", multipliers=None, default_multiplier=1.0,
                 learning_rate=None, momentum=None, name="discriminative", **kwargs):
        inner = _plain(optimizer)
        if getattr(inner, "use_ema", False):
            raise ConfigError("DiscriminativeOptimizer: use_ema on the inner optimizer is not "
                              "supported; pass use_ema=True to the wrapper instead")
        for key in _APPLY_LEVEL:  # applied once, by the wrapper
            if kwargs.get(key) is None and getattr(inner, key, None) is not None:
                kwargs[key] = getattr(inner, key)
            if key != "loss_scale_factor":
                setattr(inner, key, None)
        if learning_rate is None:
            learning_rate = inner._learning_rate
            if isinstance(learning_rate, keras.Variable):
                learning_rate = float(ops.convert_to_numpy(learning_rate))
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self._inner = inner
        self._patterns = _patterns(multipliers)
        self.default_multiplier = float(default_multiplier)
        if self.default_multiplier < 0:
            raise ConfigError(f"default_multiplier must be >= 0, got {default_multiplier}")
        self.momentum_schedule = momentum
        self._momentum_attr = _momentum_attribute(inner) if momentum is not None else None
        self._multipliers: list[float] = []

    # ------------------------------------------------------------------ groups
    @property
    def inner_optimizer(self) -> keras.optimizers.Optimizer:
        return self._inner

    @property
    def multipliers(self) -> list[tuple[str, float]]:
        return [(p.pattern, m) for p, m in self._patterns]

    def multiplier_for(self, path: str) -> float:
        for pattern, mult in self._patterns:
            if pattern.fullmatch(path):
                return mult
        return self.default_multiplier

    # ------------------------------------------------------------------ optimizer API
    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._inner.build(variables)
        self._multipliers = [self.multiplier_for(v.path) for v in variables]

    @property
    def variables(self):
        # The inner optimizer's slots are part of this optimizer's state (checkpoints,
        # JAX's stateless apply, BackupAndRestore).
        return self._variables[:] + [v for v in self._inner.variables]

    def apply(self, grads, trainable_variables=None):
        super().apply(grads, trainable_variables)
        # Keep the inner step count (Adam's bias correction) equal to the applied updates.
        self._inner._iterations.assign(ops.cast(self.iterations, self._inner._iterations.dtype))

    def update_step(self, gradient, variable, learning_rate):
        mult = self._multipliers[self._get_variable_index(variable)]
        lr = ops.multiply(ops.cast(learning_rate, variable.dtype), mult)
        inner = self._inner
        wd = inner.weight_decay
        if wd and mult and inner._use_weight_decay(variable):
            # decoupled weight decay, scaled like the step (inner.apply is bypassed)
            self.assign_sub(variable, ops.multiply(variable, ops.cast(wd, variable.dtype) * lr))
        if self.momentum_schedule is None:
            inner.update_step(gradient, variable, lr)
            return
        momentum = ops.cast(self.momentum_schedule(self.iterations), variable.dtype)
        if isinstance(inner, keras.optimizers.SGD):
            self._sgd_step(gradient, variable, lr, momentum)
            return
        attr = self._momentum_attr
        saved = getattr(inner, attr)
        setattr(inner, attr, momentum)
        try:
            inner.update_step(gradient, variable, lr)
        finally:
            setattr(inner, attr, saved)

    def _sgd_step(self, gradient, variable, lr, momentum):
        """keras.optimizers.SGD.update_step with a scheduled (tensor) momentum."""
        inner = self._inner
        gradient = ops.cast(gradient, variable.dtype)
        m = inner.momentums[inner._get_variable_index(variable)]
        step = ops.subtract(ops.multiply(m, momentum), ops.multiply(gradient, lr))
        self.assign(m, step)
        if inner.nesterov:
            self.assign_add(variable, ops.subtract(ops.multiply(m, momentum),
                                                   ops.multiply(gradient, lr)))
        else:
            self.assign_add(variable, m)

    # ------------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        config.update({
            "optimizer": keras.saving.serialize_keras_object(self._inner),
            "multipliers": [[p, m] for p, m in self.multipliers],
            "default_multiplier": self.default_multiplier,
            "momentum": (keras.saving.serialize_keras_object(self.momentum_schedule)
                         if self.momentum_schedule is not None else None),
        })
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["optimizer"] = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom_objects)
        if config.get("momentum") is not None:
            config["momentum"] = keras.saving.deserialize_keras_object(
                config["momentum"], custom_objects=custom_objects)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = keras.saving.deserialize_keras_object(
                config["learning_rate"], custom_objects=custom_objects)
        return cls(**config)


def _patterns(multipliers) -> list[tuple[re.Pattern, float]]:
    if multipliers is None:
        return []
    items = multipliers.items() if isinstance(multipliers, Mapping) else multipliers
    out = []
    for item in items:
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ConfigError(f"multipliers: expected (pattern, multiplier) pairs, got {item!r}")
        pattern, mult = item
        if float(mult) < 0:
            raise ConfigError(f"multipliers: {pattern!r} has a negative multiplier {mult}")
        try:
            out.append((re.compile(pattern), float(mult)))
        except re.error as exc:
            raise ConfigError(f"multipliers: {pattern!r} is not a valid regex: {exc}") from None
    return out


def _momentum_attribute(inner) -> str:
    if isinstance(inner, keras.optimizers.SGD):
        if not inner.momentum:
            raise ConfigError("a momentum schedule needs SGD with momentum > 0 "
                              "(train.momentum), or set train.one_cycle.momentum: null")
        return "momentum"
    if isinstance(getattr(inner, "beta_1", None), (int, float)):
        return "beta_1"
    # RMSprop & co. branch on the Python value of their momentum: not schedulable in-graph
    raise ConfigError(f"{type(inner).__name__} has no beta_1 (Adam family) or SGD momentum to "
                      "schedule; set train.one_cycle.momentum: null or use adam/adamw/sgd/nadam/"
                      "adamax/lion")


def make_optimizer(cfg, learning_rate, multipliers=None, momentum=None):
    """The configured optimizer (``train.optimizer``, ``weight_decay``, ``momentum``,
    ``clipnorm``) with ``learning_rate`` (float or schedule); wrapped in a
    :class:`DiscriminativeOptimizer` when there are group multipliers or a momentum
    schedule."""
    opts = keras.optimizers
    wd = cfg.weight_decay or None
    common = {"clipnorm": cfg.clipnorm}
    name = cfg.optimizer
    if name == "adam":
        opt = opts.Adam(learning_rate, weight_decay=wd, **common)
    elif name == "adamw":
        opt = opts.AdamW(learning_rate, weight_decay=cfg.weight_decay or 0.004, **common)
    elif name == "sgd":
        opt = opts.SGD(learning_rate, momentum=cfg.momentum, weight_decay=wd, **common)
    elif name == "rmsprop":
        opt = opts.RMSprop(learning_rate, momentum=cfg.momentum, weight_decay=wd, **common)
    elif name == "nadam":
        opt = opts.Nadam(learning_rate, weight_decay=wd, **common)
    elif name == "adamax":
        opt = opts.Adamax(learning_rate, weight_decay=wd, **common)
    elif name == "lion":
        opt = opts.Lion(learning_rate, weight_decay=wd, **common)
    else:
        raise ConfigError(f"train.optimizer: {name!r} is not one of "
                          "['adam', 'adamw', 'sgd', 'rmsprop', 'nadam', 'adamax', 'lion']")
    if multipliers or momentum is not None:
        return DiscriminativeOptimizer(opt, multipliers=multipliers, momentum=momentum,
                                       learning_rate=learning_rate)
    return opt
