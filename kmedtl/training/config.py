"""The run config, typed: :class:`RunConfig` and its ``train:`` section.

:class:`kmedtl.config.Config` keeps ``train`` as a free mapping (the data layer does not
know about training).  :class:`RunConfig` is the config training, tuning and ``kmedtl run``
take: every section validated once, when the file is loaded (:func:`load_run_config`),
``train`` as a :class:`TrainSection`, and the rules that span sections (normalisation,
image size vs backbone) checked there too.  Variants are derived with
:meth:`RunConfig.derive` / :meth:`TrainSection.derive`, which validate again.
:func:`train_section` validates a bare ``train`` mapping (the Python API).
Errors are one :class:`~kmedtl.errors.ConfigError` whose lines name ``train.<field>``, what
was given and what is allowed, worded by :func:`kmedtl.schema.format_validation_error`::

    run.yaml: invalid config:
      train.optimizer: Input should be 'adam', 'adamw', 'sgd', ... (got 'adagrad')
      train.tune.max_trials: Input should be greater than or equal to 1 (got 0)

Example::

    >>> cfg = run_config(Config(train={"backbone": "cbr_tiny", "strategy": "linear_probe"}))
    >>> cfg.train.epochs, cfg.train.optimizer, cfg.train.strategy
    (10, 'adam', 'linear_probe')
    >>> cfg.derive(train={"epochs": 3}).train.epochs  # a variant, validated again
    3
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from kmedtl.config import Config, apply_recipe, load_config
from kmedtl.errors import ConfigError, ModelError
from kmedtl.models.backbones import backbone_names, get_spec
from kmedtl.schema import Strict, validate

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "nadam", "adamax", "lion")
SCHEDULES = ("constant", "one_cycle", "cosine", "step")
STRATEGIES = ("full", "linear_probe", "freeze", "gradual", "fine_tune")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")
MODELS = ("flat", "hierarchical", "staged", "multi_input")
TUNERS = ("random", "hyperband", "bayesian")
DISTRIBUTE = ("none", "mirrored")  # one machine, TensorFlow backend
WEIGHT_SCALINGS = ("none", "transfusion")


class OneCycleSection(Strict):
    """One-cycle shape (Smith 2018; fastai's defaults)."""

    pct_start: float = Field(default=0.25, gt=0.0, lt=1.0)
    div_factor: float = Field(default=25.0, gt=0.0)  # start lr = max lr / div_factor
    final_div_factor: float = Field(default=1e4, gt=0.0)  # end lr = start lr / this
    # (high, low) beta_1 (Adam family) or momentum (SGD/RMSprop); null keeps it constant
    momentum: Union[tuple[float, float], None] = (0.95, 0.85)

    @field_validator("momentum")
    @classmethod
    def _momentum_range(cls, v):
        if v is not None and not all(0.0 <= m < 1.0 for m in v):
            raise ValueError(f"both values must be in [0, 1), got {list(v)}")
        return v


class StagedSection(Strict):
    """The staged hierarchical workflow (``train.model: staged``)."""

    transfer: Literal["hierarchy", "pretrained"] = "hierarchy"
    n_folds: int = Field(default=5, ge=2)


class MultiInputSection(Strict):
    """``train.model: multi_input``: one model over several image types per case (the
    manifest's main image, named by ``data.columns.path`` else ``image``, then
    ``data.extra_columns``), fused late (:class:`kmedtl.models.MultiInputClassifier`)."""

    # concat: pooled features joined under one head; average: one head per input, the
    # probabilities averaged
    fusion: Literal["concat", "average"] = "concat"
    head: Literal["flat", "hierarchical"] = "hierarchical"
    shared_backbone: bool = True  # false: one train.backbone per input


class DistributionSection(Strict):
    """``train.distribution``: training across processes and machines (JAX backend; see
    :mod:`kmedtl.training.data_parallel`).  Process count, id and coordinator come from
    ``kmedtl train --num-processes/--process-id/--coordinator`` or ``$KMEDTL_*``."""

    kind: Literal["data_parallel"]


class TuneSection(Strict):
    """``kmedtl tune``: the KerasTuner search space and the stock tuner that explores it."""

    tuner: Literal[TUNERS] = "random"  # type: ignore[valid-type]
    max_trials: int = Field(default=10, ge=1)
    executions_per_trial: int = Field(default=1, ge=1)
    epochs: int | None = Field(default=None, ge=1)  # per trial; default train.epochs
    objective: str = "auc"  # short metric name or a Keras log key (val_leaf_auc)
    direction: Literal["auto", "min", "max"] = "auto"
    backbones: list[str] | None = None  # default [train.backbone]
    cuts: Union[Literal["stages", "all", "none"], list[str]] = "stages"
    strategies: list[Literal[STRATEGIES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["linear_probe", "fine_tune"], min_length=1)
    learning_rate: tuple[float, float] = (1e-4, 1e-2)  # log-uniform range
    lr_ratios: list[float] = Field(default_factory=lambda: [1.0, 3.0], min_length=1)
    dropout: tuple[float, float] = (0.0, 0.5)
    freeze_stages: tuple[int, int] | None = None  # range for strategy freeze; default all
    hyperband_factor: int = Field(default=3, ge=2)
    bayesian_initial_points: int | None = Field(default=None, ge=1)
    feature_cache: bool = True
    cache_dir: str | None = None  # on-disk feature cache; default <run>/tuning/features
    overwrite: bool = False
    seed: int = 0
    max_consecutive_failed_trials: int = Field(default=3, ge=1)
    max_failed_fraction: float = Field(default=0.5, ge=0.0, le=1.0)

    @field_validator("learning_rate", "dropout")
    @classmethod
    def _ordered(cls, v):
        if v[0] > v[1]:
            raise ValueError(f"give [low, high] with low <= high, got {list(v)}")
        return v

    @field_validator("learning_rate")
    @classmethod
    def _positive(cls, v):
        if v[0] <= 0:
            raise ValueError(f"learning rates must be > 0, got {list(v)}")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v):
        if not (0.0 <= v[0] and v[1] < 1.0):
            raise ValueError(f"dropout must lie in [0, 1), got {list(v)}")
        return v

    @field_validator("lr_ratios")
    @classmethod
    def _ratios(cls, v):
        if any(r < 1.0 for r in v):
            raise ValueError(f"ratios are >= 1 (lr / ratio per lower group), got {v}")
        return v


class TrainSection(Strict):
    """Everything ``kmedtl train`` / :class:`~kmedtl.training.Trainer` needs.

    See ``pipelines/train_*.yaml`` for commented examples.  ``monitor`` and
    ``tune.objective`` take a short metric name (``loss``, ``accuracy``, ``auc``,
    ``kappa``: validation, leaf level) or any Keras log key (``val_root_loss``).
    """

    model: Literal[MODELS] = "hierarchical"  # type: ignore[valid-type]
    backbone: str = "cbr_small"
    weights: str | None = None  # null (random), imagenet, or a weight file
    # "transfusion": redraw every pretrained backbone tensor i.i.d. from N(mean, std) of
    # its pretrained values (Raghu et al. 2019, "Mean Var Init"; BatchNorm statistics
    # reset) when the model is built for training; needs train.weights
    weight_scaling: Literal[WEIGHT_SCALINGS] = "none"  # type: ignore[valid-type]
    cut: str | None = None  # named cut point (TruncatedTL) or layer name
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    pooling: Literal["avg", "max"] = "avg"

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=1)
    steps_per_epoch: int | None = Field(default=None, ge=1)

    optimizer: Literal[OPTIMIZERS] = "adam"  # type: ignore[valid-type]
    learning_rate: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)  # sgd / rmsprop
    clipnorm: float | None = Field(default=None, gt=0.0)
    schedule: Literal[SCHEDULES] = "constant"  # type: ignore[valid-type]
    warmup_epochs: float = Field(default=0.0, ge=0.0)  # cosine: linear warm-up
    step_every: int = Field(default=10, ge=1)  # step: epochs between drops
    step_factor: float = Field(default=0.1, gt=0.0, le=1.0)
    one_cycle: OneCycleSection = Field(default_factory=OneCycleSection)

    strategy: Literal[STRATEGIES] = "full"  # type: ignore[valid-type]
    freeze_below: str | None = None  # strategy freeze: a named cut (frozen up to it)
    freeze_layers: int | None = Field(default=None, ge=0)  # strategy freeze: first K layers
    unfreeze_at: list[float] = Field(default_factory=list)  # strategy gradual
    head_epochs: int = Field(default=1, ge=1)  # strategy fine_tune: head warm-up epochs
    lr_multipliers: list[float] | None = None  # per layer group, input side -> head

    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    recalibrate_bn: bool = True  # BatchNorm statistics re-averaged after training
    freeze_bn: bool = False  # backbone BatchNorm kept in inference mode while fine-tuning
    leaf_loss_weight: float = Field(default=0.0, ge=0.0)  # hierarchical: extra leaf loss
    monitor: str = "loss"
    monitor_mode: Literal["auto", "min", "max"] = "auto"
    early_stopping: int | None = Field(default=None, ge=1)  # patience in epochs
    reduce_lr: int | None = Field(default=None, ge=1)  # ReduceLROnPlateau patience
    reduce_lr_factor: float = Field(default=0.2, gt=0.0, lt=1.0)

    precision: Literal[PRECISIONS] = "auto"  # type: ignore[valid-type]
    jit_compile: Union[bool, Literal["auto"]] = "auto"  # XLA on JAX / GPU, off on CPU-only TF
    seed: int = 0
    deterministic: bool = False
    distribute: Literal[DISTRIBUTE] = "none"  # type: ignore[valid-type]
    distribution: DistributionSection | None = None  # {kind: data_parallel}: JAX, N processes
    backup_every: Union[Literal["epoch"], int] = "epoch"  # or every N batches
    tensorboard: bool = True
    verbose: Union[Literal["auto"], Literal[0, 1, 2]] = "auto"

    staged: StagedSection = Field(default_factory=StagedSection)
    multi_input: MultiInputSection = Field(default_factory=MultiInputSection)
    tune: TuneSection = Field(default_factory=TuneSection)

    def derive(self, label: str = "config", **update) -> TrainSection:
        """A variant of this section (a tune result, a pretrain stage, a study arm): ``update``
        applied, nested sections merged, and every validator run again.  Not pydantic's
        ``model_copy(update=...)``, which skips validation and so would let a variant carry a
        combination the validators refuse (``strategy: fine_tune`` with ``epochs`` no larger
        than ``head_epochs``)."""
        return _validated(self.model_dump(), label, update)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v):
        try:
            return get_spec(v).name
        except Exception:
            raise ValueError(f"{v!r} is not a known backbone; known: {backbone_names()}") from None

    @field_validator("distribute", mode="before")
    @classmethod
    def _no_multi_worker(cls, v):
        if v == "multi_worker":
            raise ValueError("'multi_worker' was removed (every worker wrote the run folder, and "
                             "Keras 3 on TensorFlow cannot run MultiWorkerMirroredStrategy, "
                             "keras-team/keras#20585); train across processes with "
                             "train.distribution: {kind: data_parallel} under KERAS_BACKEND=jax")
        return v

    @field_validator("unfreeze_at")
    @classmethod
    def _fractions(cls, v):
        if any(not 0.0 < f < 1.0 for f in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"epoch fractions must be strictly increasing in (0, 1), got {v}")
        return v

    @field_validator("lr_multipliers")
    @classmethod
    def _multipliers(cls, v):
        if v is not None and (len(v) < 2 or any(m < 0 for m in v)):
            raise ValueError(f"give >= 2 non-negative multipliers (input side -> head), got {v}")
        return v

    @field_validator("backup_every")
    @classmethod
    def _backup(cls, v):
        if not isinstance(v, str) and v < 1:
            raise ValueError(f"'epoch' or a number of batches >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _strategy_fields(self):
        s = self.strategy
        if s == "freeze" and (self.freeze_below is None) == (self.freeze_layers is None):
            raise ValueError("train.strategy 'freeze' needs exactly one of train.freeze_below "
                             "(a named cut) or train.freeze_layers (first K layers)")
        if s != "freeze" and (self.freeze_below is not None or self.freeze_layers is not None):
            raise ValueError(f"train.freeze_below / train.freeze_layers apply to train.strategy "
                             f"'freeze' only (got strategy {s!r})")
        if s == "gradual" and not self.unfreeze_at:
            raise ValueError("train.strategy 'gradual' needs train.unfreeze_at: epoch fractions at "
                             "which the next layer group (head first) is unfrozen, e.g. "
                             "[0.25, 0.5, 0.75]")
        if s != "gradual" and self.unfreeze_at:
            raise ValueError(f"train.unfreeze_at applies to train.strategy 'gradual' only (got "
                             f"strategy {s!r})")
        if self.distribution is not None and self.distribute != "none":
            raise ValueError(f"train.distribute {self.distribute!r} (TensorFlow, one machine) and "
                             "train.distribution (JAX, data_parallel) exclude each other")
        if self.distribution is not None and self.model == "staged":
            raise ValueError("train.distribution: the staged workflow trains one small model "
                             "per node and is not data-parallel; use flat, hierarchical or "
                             "multi_input")
        if self.reduce_lr and self.schedule != "constant":
            raise ValueError(f"train.reduce_lr needs train.schedule 'constant' (the "
                             f"{self.schedule!r} schedule owns the learning rate)")
        if s == "fine_tune" and self.epochs <= self.head_epochs:
            raise ValueError(f"train.strategy 'fine_tune' trains the head for train.head_epochs "
                             f"({self.head_epochs}) then everything: train.epochs must be larger "
                             f"(got {self.epochs})")
        return self


class _Wrapper(Strict):
    train: TrainSection = Field(default_factory=TrainSection)


def train_section(source: Any = None, label: str = "config", **overrides) -> TrainSection:
    """Validate a ``train`` mapping (or a :class:`kmedtl.config.Config`, or a
    :class:`TrainSection`) with ``overrides`` applied; errors name ``train.<field>``."""
    if isinstance(source, RunConfig):
        if not overrides:
            return source.train
        raw = source.train.model_dump()
    elif isinstance(source, Config):
        raw = dict(source.train)
    elif isinstance(source, TrainSection):
        raw = source.model_dump()
    elif source is None:
        raw = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        raise ConfigError(f"{label}: train must be a mapping, got {type(source).__name__}")
    return _validated(apply_recipe(raw, label), label, overrides)


def _validated(raw: dict, label: str, overrides: dict) -> TrainSection:
    """``raw`` with ``overrides`` applied (a mapping merged into a nested section), as a
    validated :class:`TrainSection` whose errors name ``train.<field>``."""
    raw = dict(raw)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return validate(_Wrapper, {"train": raw}, label).train


class RunConfig(Config):
    """The whole run config, typed from end to end: :class:`~kmedtl.config.Config`'s data,
    split and augment sections with ``train`` validated into a :class:`TrainSection`, and
    the rules that span sections checked here, once, when the config is loaded -- before
    any audit, cache or split runs.

    What training, tuning and ``kmedtl run`` take.  A variant (a tune result, a pretrained
    backbone, a study arm, ``--epochs``) is made with :meth:`derive`, never by editing a
    mapping.  The data layer keeps the plain :class:`~kmedtl.config.Config` (it does not
    know about training); :func:`run_config` lifts one into a ``RunConfig``.
    """

    train: TrainSection = Field(default_factory=TrainSection)

    @field_validator("train", mode="before")
    @classmethod
    def _expand_recipe(cls, v):  # replaces Config's: here the recipe feeds the typed section
        if isinstance(v, dict):
            try:
                return apply_recipe(v, "config")
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix("config: train.")) from None
        return v

    @model_validator(mode="after")
    def _across_sections(self):
        if self.data.normalization != "unit":
            raise ValueError(
                f"data.normalization: kmedtl models normalise inside the model and take "
                f"images in [0, 1]; set data.normalization: unit (got "
                f"{self.data.normalization!r})")
        size = self.data.image.size
        smallest = min(size) if isinstance(size, tuple) else size
        names = [self.train.backbone, *(self.train.tune.backbones or [])]
        for name in dict.fromkeys(names):
            try:
                need = get_spec(name).min_size
            except ModelError:  # an unknown tune.backbones entry: the tuner names it
                continue
            if smallest < need:
                where = ("train.backbone" if name == self.train.backbone
                         else "train.tune.backbones")
                raise ValueError(
                    f"data.image.size: {where} {name!r} needs images of at least "
                    f"{need}x{need} pixels (got {size}); set data.image.size: {need} or "
                    "more, or choose another backbone")
        return self

    def derive(self, label: str = "config", *, train: TrainSection | dict | None = None,
               **sections) -> RunConfig:
        """A validated variant of this config.  ``train``: a whole :class:`TrainSection`
        (replaces the section) or a mapping of fields (merged, as
        :meth:`TrainSection.derive`); other keywords replace whole sections.  Every
        validator, the cross-section ones included, runs again."""
        raw = self.model_dump()
        if isinstance(train, TrainSection):
            raw["train"] = train.model_dump()
        elif train:
            raw["train"] = self.train.derive(label, **train).model_dump()
        for key, value in sections.items():
            raw[key] = value.model_dump() if hasattr(value, "model_dump") else value
        return validate(RunConfig, raw, label)


def run_config(source: Any, label: str = "config") -> RunConfig:
    """``source`` as a :class:`RunConfig`: returned as is when it is one, validated from a
    :class:`~kmedtl.config.Config` (its paths are already resolved) or a YAML path
    (:func:`load_run_config`)."""
    if isinstance(source, RunConfig):
        return source
    if isinstance(source, Config):
        return validate(RunConfig, source.model_dump(), label)
    if isinstance(source, (str, Path)):
        return load_run_config(source)
    raise ConfigError(f"{label}: expected a run config (a YAML path or a loaded config), got "
                      f"{type(source).__name__}")


def load_run_config(source, base_dir=None, overrides: dict | None = None) -> RunConfig:
    """:func:`kmedtl.config.load_config` (paths resolved once, ``overrides`` merged) into a
    :class:`RunConfig`: every section, ``train`` included, validated at load."""
    return load_config(source, base_dir, overrides, schema=RunConfig)


def resolved_config(cfg: RunConfig, hierarchy=None) -> dict:
    """The whole run config as written to ``config.yaml``: every default filled in, the
    ``train`` section validated and the label tree inlined (so the run folder is
    self-contained)."""
    out = cfg.model_dump(mode="json")
    if hierarchy is not None:
        out["data"]["hierarchy"] = hierarchy.to_config()
    return out
