"""The study YAML (``pipelines/study_*.yaml``), typed.

One file describes one *comparison*: its arms, the grid (N images per class x seeds), the
data and the shared training recipe.  Every arm is a set of ``train.*`` overrides (see
:class:`kmedtl.training.TrainSection`) plus the study's own keys (``init``, ``sizes``,
``n_folds``); cells whose resolved recipe is identical share one result file, so the
``flat`` arm of one comparison and the ``scratch`` arm of another train once.

Example (abridged)::

    name: hierarchy
    title: Flat vs hierarchical vs staged (An et al. 2021)
    grid: {sizes: [25, 50, 100, all], seeds: [0, 1, 2]}
    train: {backbone: cbr_micro, epochs: {25: 30, 50: 20, 100: 15, all: 6}}
    arms:
      - {name: flat, model: flat}
      - {name: hierarchical, model: hierarchical}
      - {name: staged, model: staged, n_folds: 2}
    reference: flat
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from kmedtl.config import expand_env, load_yaml
from kmedtl.errors import ConfigError
from kmedtl.schema import Strict, validate
from kmedtl.study.training import train_section_for

Size = Union[int, Literal["all"]]
METRICS = ("balanced_accuracy", "kappa", "auroc_macro", "f1_macro")


class StudyData(Strict):
    """The dataset and how it is made duplicate-free (see :mod:`kmedtl.study.data`)."""

    root: str  # the dataset folder (a manifest's paths are relative to it)
    manifest: str | None = None  # CSV manifest (relative to root); default: class folders
    columns: dict[str, str] = Field(default_factory=dict)  # manifest field -> CSV column
    hierarchy: Union[str, dict, list]
    image_size: int = Field(default=32, ge=16)
    channels: Literal[1, 3] = 1
    cache_dir: str | None = ".kmedtl_cache"
    dedupe: Literal["exact", "near"] = "near"
    near_threshold: int = Field(default=2, ge=0, le=32)
    test: Literal["source", "holdout"] = "source"  # Testing folder, or a fixed holdout
    test_fraction: float = Field(default=0.15, gt=0.0, lt=1.0)  # test: holdout
    split_seed: int = 0


class Grid(Strict):
    sizes: list[Size] = Field(default_factory=lambda: [25, 50, 100, "all"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v):
        if any(isinstance(s, int) and s < 1 for s in v):
            raise ValueError(f"sizes are images per class >= 1 or 'all', got {v}")
        if len(set(map(str, v))) != len(v):
            raise ValueError(f"sizes repeat: {v}")
        return v


class Pretrain(Strict):
    """Same-domain pretraining on training images outside every small subset."""

    # simclr / rotation: no labels; level1: supervised on a different, coarser label task
    # (the level-1 nodes of the hierarchy, e.g. normal vs tumour) of the pool images
    method: Literal["simclr", "rotation", "level1"] = "simclr"
    backbone: str | None = None  # default: train.backbone
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=64, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0)
    temperature: float = Field(default=0.2, gt=0)  # simclr
    max_images: int | None = Field(default=None, ge=2)  # cap the pool (smoke runs)
    # shared: one backbone on the images outside every finite subset of every seed of the
    # grid (cheap; adding seeds changes the pool, so pretrained cells retrain);
    # per_seed: one backbone per seed, on the images outside that seed's subsets
    pool: Literal["shared", "per_seed"] = "shared"
    seed: int = 0
    # imagenet: start from the backbone's ImageNet weights and train the level-1 model with
    # the study's own train recipe (strategy, frozen BN, discriminative rates, one-cycle) for
    # ``epochs`` -- intermediate same-domain training (Romero et al. 2020) rather than
    # pretraining from random weights
    weights: Literal["imagenet"] | None = None
    # cross-domain: pretrain on every image of another dataset (its own hierarchy's level-1
    # task) instead of this study's pool; image_size and channels must match the study's
    data: StudyData | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.weights == "imagenet" and self.method != "level1":
            raise ValueError("pretrain: weights: imagenet is intermediate supervised training "
                             f"and needs method: level1 (got method: {self.method})")
        if self.data is not None and self.method != "level1":
            raise ValueError("pretrain: data (another dataset) needs method: level1 "
                             f"(got method: {self.method})")
        return self


class Arm(Strict):
    name: str
    label: str | None = None  # shown in tables; default: name
    init: str = "scratch"  # "scratch" or the name of a pretrain entry
    sizes: list[Size] | None = None  # default: grid.sizes
    n_folds: int = Field(default=2, ge=2)  # model: staged (out-of-fold stacking)
    train: dict[str, Any] = Field(default_factory=dict)  # train.* overrides

    @model_validator(mode="before")
    @classmethod
    def _collect(cls, data):
        if not isinstance(data, dict):
            return data
        own = {"name", "label", "init", "sizes", "n_folds", "train"}
        extra = {k: v for k, v in data.items() if k not in own}
        out = {k: v for k, v in data.items() if k in own}
        out["train"] = {**extra, **dict(data.get("train") or {})}
        return out


class Evaluation(Strict):
    n_boot: int = Field(default=1000, ge=10)
    primary: Literal[METRICS] = "balanced_accuracy"  # type: ignore[valid-type]
    alpha: float = Field(default=0.05, gt=0, lt=1)


class Moonshot(Strict):
    """The moonshot ratio of one arm: its metric with ``small`` labels per class divided by
    its metric with ``large`` (default all) labels."""

    arm: str | None = None  # default: the reference arm
    small: Size = 50
    large: Size = "all"


class StudyConfig(Strict):
    name: str
    # what the comparison asks, shared by the same comparison on other datasets (the
    # cross-dataset summary, kmedtl.study.summary, lines them up by topic); default: name
    topic: str | None = None
    title: str = ""
    papers: str = ""
    expectation: str = ""  # hand-written: what the papers lead us to expect
    notes: str = ""  # hand-written design notes shown (labelled as such) under Set-up
    caveats: str = ""  # hand-written limits of this comparison's design, shown after "found"
    data: StudyData
    grid: Grid = Field(default_factory=Grid)
    train: dict[str, Any] = Field(default_factory=dict)  # shared train.* fields
    pretrain: dict[str, Pretrain] = Field(default_factory=dict)
    arms: list[Arm] = Field(min_length=2)
    reference: str | None = None  # paired tests: every arm against this one
    evaluation: Evaluation = Field(default_factory=Evaluation)
    results: str | None = None  # RESULTS.md path, relative to this file
    budget_minutes: float | None = Field(default=None, gt=0)
    moonshot: Moonshot | None = None
    # a benchmarks/models.py JSON (relative to this file): parameters, GFLOPs and CPU
    # images/s of each backbone cut, shown beside the arms' accuracy
    costs: str | None = None
    source: str | None = None  # the YAML file (filled in by load_study)

    @model_validator(mode="after")
    def _check(self):
        self.topic = self.topic or self.name
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: names repeat: {names}")
        ref = self.reference or names[0]
        if ref not in names:
            raise ValueError(f"reference: {ref!r} is not an arm; arms: {names}")
        self.reference = ref
        for name, p in self.pretrain.items():
            if p.data is not None and (p.data.image_size, p.data.channels) != (
                    self.data.image_size, self.data.channels):
                raise ValueError(
                    f"pretrain.{name}.data: {p.data.image_size} px x {p.data.channels} "
                    f"channel(s) differs from data: {self.data.image_size} px x "
                    f"{self.data.channels}; pretrain at the study's image size")
        for a in self.arms:
            if a.init != "scratch" and a.init not in self.pretrain:
                raise ValueError(f"arms.{a.name}.init: {a.init!r} is neither 'scratch' nor a "
                                 f"pretrain entry {sorted(self.pretrain)}")
            for s in a.sizes or []:
                if str(s) not in map(str, self.grid.sizes):
                    raise ValueError(f"arms.{a.name}.sizes: {s!r} is not in grid.sizes")
        if self.moonshot is not None:
            m = self.moonshot
            m.arm = m.arm or ref
            if m.arm not in names:
                raise ValueError(f"moonshot.arm: {m.arm!r} is not an arm; arms: {names}")
            sizes = [str(n) for n in self.sizes_of(self.arm(m.arm))]
            for k in ("small", "large"):
                if str(getattr(m, k)) not in sizes:
                    raise ValueError(f"moonshot.{k}: arm {m.arm!r} does not run N = "
                                     f"{getattr(m, k)}; its sizes: {sizes}")
        return self

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def sizes_of(self, arm: Arm) -> list:
        return list(arm.sizes or self.grid.sizes)

    def recipe_of(self, arm: Arm) -> dict:
        """The arm's training recipe: the shared ``train`` with the arm's fields on top."""
        return {**self.train, **arm.train}


SHARED = ("data", "grid", "train", "pretrain", "evaluation", "results", "budget_minutes")
# (costs and moonshot belong to one comparison)


def load_study(path) -> list[StudyConfig]:
    """Read and validate a study YAML; relative paths resolve against its folder.

    A file holds one comparison (``name``, ``arms`` ... at the top level) or several under
    ``comparisons:``, each inheriting the top-level ``data``, ``grid``, ``train``,
    ``pretrain``, ``evaluation``, ``results`` and ``budget_minutes`` (its own keys win;
    ``train`` and ``pretrain`` are merged key by key).  Returns the list of comparisons.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    raw = load_yaml(path.read_text(), str(path)) or {}  # limits: kmedtl.safe_yaml
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        raw = expand_env(raw, label=str(path))
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    entries = raw.pop("comparisons", None)
    if entries is None:
        entries = [raw]
    else:
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{path}: comparisons: give a list of comparisons")
        unknown = sorted(set(raw) - set(SHARED))
        if unknown:
            raise ConfigError(f"{path}: {unknown}: unknown top-level key(s) beside "
                              f"comparisons:; allowed: {list(SHARED)}")
        merged = []
        for e in entries:
            e = dict(e)
            for k in SHARED:
                if k in raw:
                    if k in ("train", "pretrain") and isinstance(e.get(k), dict):
                        e[k] = {**raw[k], **e[k]}
                    else:
                        e.setdefault(k, raw[k])
            merged.append(e)
        entries = merged
    out = []
    for i, entry in enumerate(entries):
        label = str(path) if len(entries) == 1 else f"{path}: comparisons[{i}]"
        cfg = validate(StudyConfig, entry, label)
        _resolve(cfg, path)
        _check_recipes(cfg, label)
        out.append(cfg)
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: comparison names repeat: {names}")
    return out


def _check_recipes(cfg: StudyConfig, label: str) -> None:
    """Validate every arm's recipe (the shared ``train`` with the arm's fields on top) at
    every N it runs at, when the file loads: a misspelt field (or a YAML flow mapping whose
    unquoted comma split a label) must stop the study before any cell trains, not fail each
    of the arm's cells one by one hours into the run."""
    for j, arm in enumerate(cfg.arms):
        recipe = cfg.recipe_of(arm)
        for n in cfg.sizes_of(arm):
            try:
                train_section_for(recipe, n, 0)
            except (ConfigError, KeyError) as exc:
                msg = exc.args[0] if exc.args else exc
                raise ConfigError(f"{label}: arms[{j}] ({arm.name}), N={n}: {msg}") from None


def _resolve(cfg: StudyConfig, path: Path) -> None:
    base = path.parent
    for d in [p.data for p in cfg.pretrain.values() if p.data is not None]:
        _resolve_data(d, base, path)
    _resolve_data(cfg.data, base, path)
    cfg.source = str(path)
    if cfg.results and not Path(cfg.results).is_absolute():
        cfg.results = str((base / cfg.results).resolve())
    if cfg.costs:
        if not Path(cfg.costs).is_absolute():
            cfg.costs = str((base / cfg.costs).resolve())
        if not Path(cfg.costs).is_file():
            raise ConfigError(f"{path}: costs: {cfg.costs} not found (write it with python "
                              "benchmarks/models.py --families FAMILY --size SIZE --out FILE)")


def _resolve_data(d: StudyData, base: Path, path: Path) -> None:
    if not Path(d.root).is_absolute():
        d.root = str((base / d.root).resolve())
    if isinstance(d.hierarchy, str) and not Path(d.hierarchy).is_absolute():
        d.hierarchy = str((base / d.hierarchy).resolve())
    if not Path(d.root).is_dir():
        raise ConfigError(f"{path}: data.root: {d.root} is not a folder (is KMEDTL_DATASETS "
                          "set to the folder holding the datasets?)")
