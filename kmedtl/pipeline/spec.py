"""The ``pipeline:`` section of a pipeline YAML, typed, and the loader that splits it off.

A pipeline file is a normal kmedtl run config (:class:`kmedtl.config.Config`: ``name``,
``data``, ``split``, ``augment``, ``train``, ``output_dir``) plus one ``pipeline:``
section.  :class:`kmedtl.config.Config` forbids unknown top-level keys, so
:func:`load_pipeline` takes ``pipeline:`` out of the parsed YAML, validates it here
(:class:`PipelineSection`) and hands the rest to :func:`kmedtl.config.load_config`.

Example::

    >>> spec = PipelineSection.model_validate({"stages": ["audit", "split", "train"]})
    >>> spec.stages, spec.export.verify
    (['audit', 'split', 'train'], True)
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from kmedtl.config import (  # noqa: F401  (parse_set: re-exported for kmedtl.pipeline.cli)
    WRITE_PATHS,
    Config,
    TTAOptions,
    dataset_path,
    load_config,
    load_yaml,
    merge_overrides,
    parse_set,
    resolve_path,
    resolve_paths,
)
from kmedtl.errors import ConfigError
from kmedtl.schema import Strict, validate
from kmedtl.training.config import RunConfig, load_run_config

#: Every stage, in the order they run.
STAGES = ("audit", "split", "pretrain", "tune", "train", "evaluate", "export", "push")
#: What a stage needs to have run before it (in the same pipeline).
REQUIRES = {"split": ("audit",), "pretrain": ("split",), "tune": ("split",), "train": ("split",),
            "evaluate": ("train",), "export": ("train",), "push": ("evaluate", "export")}
DEFAULT_STAGES = ["audit", "split", "train", "evaluate", "export", "push"]
EXPORT_FORMATS = ("savedmodel", "tflite", "onnx")
TFLITE_VARIANTS = ("float32", "float16", "dynamic_int8", "int8")

StageName = Literal[STAGES]  # type: ignore[valid-type]


class PretrainSection(Strict):
    """Same-domain pretraining of ``train.backbone`` on images the fold does not use.

    The pool is every usable image of the data that is in none of the fold's
    train/val/test parts and shares no leakage group (patient, exact or near duplicate)
    with a val or test image -- e.g. the images ``split.n_per_class`` leaves out of a small
    training set.  ``method: supervised`` trains on ``task`` labels (``level1``: the top
    level of the label tree, a different label task; ``leaf``: the leaves);
    ``contrastive`` is SimCLR (no labels).  The saved backbone becomes ``train.weights``.
    """

    method: Literal["supervised", "contrastive"] = "supervised"
    task: Literal["level1", "leaf"] = "level1"
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=32, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0.0)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    min_images: int = Field(default=16, ge=2)
    max_images: int | None = Field(default=None, ge=2)
    seed: int | None = None  # default train.seed


class ExternalSet(Strict):
    """An external test set: another acquisition or site, evaluated beside the internal
    test (``pipeline.evaluate.external``).  ``source``: a class-folder tree, a manifest CSV
    or a config YAML; relative to the pipeline file's folder, ``${VAR}`` expanded (made
    absolute when the pipeline loads).
    ``dedupe`` (default true) leaves out images that are exact, near or similar-content
    copies of training or validation images, and counts them."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # a folder name under external/
    source: str
    dedupe: bool = True

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v):
        if v in (".", ".."):
            raise ValueError(f"{v!r} is not a folder name (external/<name>/ holds its results)")
        return v


class EvaluateSection(Strict):
    """Arguments of :func:`kmedtl.evaluation.stage.evaluate_run`."""

    n_boot: int = Field(default=1000, ge=0)
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    seed: int = 0
    batch_size: int = Field(default=32, ge=1)
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    target_sensitivity: float = Field(default=0.95, gt=0.0, le=1.0)
    negative: str | None = None
    ordered: bool = False
    n_bins: int = Field(default=15, ge=2)
    n_gradcam: int = Field(default=8, ge=0)
    n_examples: int = Field(default=12, ge=0)
    #: test-time augmentation of the test and validation predictions
    #: (:class:`kmedtl.config.TTAOptions`): a mapping (flips, n, rotation, zoom,
    #: seed), a flip mode, true (defaults) or null (off)
    tta: TTAOptions | None = None
    #: external test sets, each reported beside the internal test (ExternalSet)
    external: list[ExternalSet] = Field(default_factory=list)

    @field_validator("tta", mode="before")
    @classmethod
    def _tta_shorthand(cls, v):
        if v is True:
            return {}
        if v is False:
            return None
        if isinstance(v, str):
            return {"flips": v}
        return v


class ExportSection(Strict):
    """Arguments of ``kmedtl.export.export_run``; ``require_verified`` fails the stage (and
    so skips push) when the exported formats do not match the Keras model."""

    formats: list[Literal[EXPORT_FORMATS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(EXPORT_FORMATS), min_length=1)
    verify: bool = True
    require_verified: bool = True
    tflite_variants: list[Literal[TFLITE_VARIANTS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(TFLITE_VARIANTS), min_length=1)
    opset: int | None = Field(default=None, ge=1)
    representative_samples: int = Field(default=100, ge=1)
    #: quantised TFLite variants (dynamic_int8, int8) below their agreement bound: "warn"
    #: (reported with a 95% CI, the run goes on) or "fail" (fails the export when the CI's
    #: upper end is below the bound); see kmedtl.export.stage
    quantized_gate: Literal["warn", "fail"] = "warn"
    #: default: export_run's (inside the run folder); relative to the working directory
    out_dir: str | None = None


class PushSection(Strict):
    """Arguments of ``kmedtl.export.push_run``: ``saved_models/<name>/<version>/`` when the
    blessing ``thresholds`` (metric -> minimum, from ``metrics.json``) hold."""

    root: str = "saved_models"  # relative to the working directory
    name: str | None = None  # default: the config's name
    thresholds: dict[str, float] | None = None
    metric: str = "balanced_accuracy"


class PipelineSection(Strict):
    """``pipeline:``: which stages run, on which fold, with what options."""

    stages: list[StageName] = Field(default_factory=lambda: list(DEFAULT_STAGES),
                                    min_length=1)
    fold: int = Field(default=0, ge=0)
    pretrain: PretrainSection = Field(default_factory=PretrainSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    export: ExportSection = Field(default_factory=ExportSection)
    push: PushSection = Field(default_factory=PushSection)

    @field_validator("stages")
    @classmethod
    def _order(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"a stage is listed twice: {v}")
        order = [s for s in STAGES if s in v]
        if v != order:
            raise ValueError(f"stages run in the order {list(STAGES)}; list them so: {order}")
        return v

    @model_validator(mode="after")
    def _requirements(self):
        for stage in self.stages:
            missing = [r for r in REQUIRES.get(stage, ()) if r not in self.stages]
            if missing:
                raise ValueError(f"pipeline.stages: {stage!r} needs {missing} in the list too "
                                 f"(got {self.stages})")
        return self


@dataclass
class Pipeline:
    """A loaded pipeline: the run config, the pipeline section and where it came from."""

    config: RunConfig  # every section validated once, when the pipeline was loaded
    spec: PipelineSection
    label: str  # the file name (or "pipeline") used in messages

    @property
    def train(self):
        """The validated train section (:class:`kmedtl.training.TrainSection`)."""
        return self.config.train

    def to_dict(self) -> dict:
        out = self.config.model_dump(mode="json")
        out["pipeline"] = self.spec.model_dump(mode="json")
        return out


_DATASET_RE = re.compile(r"^\$\{KMEDTL_DATASETS\}[/\\]+([^/\\]+)")


def _check_dataset(raw: dict, label: str) -> None:
    """A ``data.root`` under ``${KMEDTL_DATASETS}``: say which dataset is missing where."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for key in ("root", "manifest"):
        value = data.get(key)
        m = _DATASET_RE.match(value) if isinstance(value, str) else None
        if m:
            try:
                dataset_path(m.group(1))
            except Exception as exc:  # DatasetNotFoundError: re-raised naming the field
                raise type(exc)(f"{label}: data.{key} ({value}): {exc}") from None


#: The pipeline section's paths (docs/pipelines.md, "Path rules"): external test sets are read
#: (relative to the pipeline file's folder), export and push folders written (relative to
#: the working directory); like the config's (:data:`kmedtl.config.READ_PATHS`), each is
#: made absolute once, when the pipeline loads.
PIPELINE_WRITE_PATHS = ("pipeline.push.root", "pipeline.export.out_dir")


def _resolve_overrides(overrides: dict) -> dict:
    """``--set`` values are typed on the command line: their paths (the config's and the
    pipeline section's) are relative to the working directory."""
    out = resolve_paths(overrides, write=(*WRITE_PATHS, *PIPELINE_WRITE_PATHS))
    ext = ((out.get("pipeline") or {}).get("evaluate") or {}).get("external") \
        if isinstance(out.get("pipeline"), dict) else None
    if isinstance(ext, list):
        for i, e in enumerate(ext):
            if isinstance(e, dict) and isinstance(e.get("source"), str) and e["source"]:
                e["source"] = resolve_path(e["source"], None,
                                           f"pipeline.evaluate.external[{i}].source")
    return out


def load_pipeline(source, overrides: dict | None = None) -> Pipeline:
    """Load a pipeline YAML (path) or mapping; ``overrides`` is merged in first.

    Every path is resolved here, once, and kept absolute (so ``pipeline.yaml`` and the run
    folder's ``config.yaml`` name the same files for every later stage and for a resumed
    run from any working directory): what the run reads (``data.root``,
    ``data.manifest``, ``data.hierarchy``, ``data.dicomweb`` files, ``split.file``,
    ``train.weights``, ``pipeline.evaluate.external[].source``) against the file's folder
    (a mapping: the working directory); what it writes (``output_dir``,
    ``data.cache_dir``, ``train.tune.cache_dir``, ``pipeline.push.root``,
    ``pipeline.export.out_dir``) and ``--set`` values against the working directory.
    ``${VAR}`` is expanded first (:func:`kmedtl.config.resolve_path`).
    """
    if isinstance(source, Pipeline):
        if overrides:
            return load_pipeline(source.to_dict(), overrides)
        return source
    base_dir = None
    if isinstance(source, dict):
        raw, label = copy.deepcopy(source), "pipeline"
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: pipeline file not found")
        raw = load_yaml(path.read_text(), str(path)) or {}  # limits: kmedtl.safe_yaml
        base_dir = path.parent
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections")
    if overrides:
        raw = merge_overrides(raw, _resolve_overrides(overrides))
    pipe_raw = raw.pop("pipeline", None) or {}
    if not isinstance(pipe_raw, dict):
        raise ConfigError(f"{label}: pipeline: must be a mapping (stages, fold, pretrain, "
                          f"evaluate, export, push), got {type(pipe_raw).__name__}")
    spec = validate(PipelineSection, pipe_raw, label, prefix=("pipeline",))
    _check_dataset(raw, label)  # a missing dataset first: it names the variable and folder
    try:
        for ext in spec.evaluate.external:  # read: relative to the pipeline file
            ext.source = resolve_path(ext.source, base_dir,
                                      f"pipeline.evaluate.external.{ext.name}.source")
        spec.push.root = resolve_path(spec.push.root, None, "pipeline.push.root")
        if spec.export.out_dir:
            spec.export.out_dir = resolve_path(spec.export.out_dir, None,
                                               "pipeline.export.out_dir")
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    names = [e.name for e in spec.evaluate.external]
    if len(set(names)) != len(names):
        raise ConfigError(f"{label}: pipeline.evaluate.external: names must differ, got "
                          f"{names}")
    try:
        cfg = load_run_config(raw, base_dir=base_dir)
    except ConfigError as exc:
        msg = str(exc)
        if msg.startswith("config:"):
            msg = label + msg[len("config"):]
        elif not msg.startswith(label):
            msg = f"{label}: {msg}"
        raise ConfigError(msg) from None
    _check_tune(cfg, spec, label)
    return Pipeline(cfg, spec, label)


def _check_tune(cfg: RunConfig, spec: PipelineSection, label: str) -> None:
    """The ``tune`` stage searches ``train.tune`` with one Keras model per trial and scores
    trials on the validation part (never the test part)."""
    if "tune" not in spec.stages:
        return
    if cfg.split.val == 0 and cfg.split.file is None and cfg.split.method != "source":
        raise ConfigError(
            f"{label}: split.val: the 'tune' stage scores its trials on the validation part, "
            "but split.val is 0 (no validation part; the test part is never used for the "
            "search); set split.val > 0, e.g. 0.15, or remove 'tune' from pipeline.stages")
    train = cfg.train
    if train.model in ("staged", "multi_input"):
        raise ConfigError(
            f"{label}: pipeline.stages: the 'tune' stage searches one single-input Keras "
            f"model per trial, but train.model is '{train.model}'; set train.model: flat or "
            "hierarchical, or remove 'tune' from pipeline.stages")


__all__ = ["DEFAULT_STAGES", "EvaluateSection", "ExportSection", "Pipeline", "PipelineSection",
           "PretrainSection", "PushSection", "REQUIRES", "STAGES", "load_pipeline", "parse_set"]

