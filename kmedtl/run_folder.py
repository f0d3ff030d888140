"""The run folder: the one place that knows its layout and how to read what it holds.

A run folder is what ``kmedtl train`` / ``kmedtl run PIPELINE.yaml`` write and what
evaluation, export, push and predict read::

    runs/<name>/
      config.yaml          the validated run config (data, split, train sections); every
                           path in it absolute (resolved once when the config was loaded:
                           kmedtl.config.READ_PATHS / WRITE_PATHS), so any stage finds the
                           same files from any working directory
      model.keras          the trained model
      splits.json          the split the model was trained on (ids per fold and part)
      train_metrics.json   training summary (``fold``, epochs, timings, ...)
      audit.json           the data audit (counts, duplicates)
      history.csv          per-epoch losses and metrics
      metrics.json, calibration.json, predictions.csv, report.html,
      model_card.md, model_card.json, plots/      (kmedtl evaluate)
      export/              (kmedtl export; export/export.json)
      push.json            (kmedtl export --push)
      checkpoints/, backup/, logs/  (training: best/last weights, resume state, TensorBoard)
      tuning/              (kmedtl tune: best_config.yaml, results, search/, features/)
      lr_find.png, lr_find.json  (kmedtl lr-find)
      data/, stages/, tuning/, pretrain/, backup/  (kmedtl run: the pipeline's own files)
      .kmedtl-lock         the one-writer lock: the PID, host and command of the process
                           writing the folder (kmedtl.ownership; RunFolder.lock)

:class:`RunFolder` gives the path of each artefact (class constants name the files) and
is what training writes through (:meth:`RunFolder.training_paths`,
:meth:`RunFolder.write_config`, :meth:`RunFolder.write_splits`,
:meth:`RunFolder.write_audit`, :meth:`RunFolder.write_train_metrics`,
:meth:`RunFolder.write_history`, :meth:`RunFolder.clear_training`: every write atomic,
a temporary sibling renamed over the file).  It loads each thing once: the config
(through :func:`kmedtl.config.load_config`), the model, the label tree, the image
options, the model's input shape, the split's samples and the JSON artefacts (through
:mod:`kmedtl.jsonio`).

The label tree (:attr:`RunFolder.hierarchy`) follows one rule:

1. the hierarchy the saved model carries (``model.hierarchy`` of ``model.keras``: what
   the model was trained to output, in its output order);
2. else ``config.yaml``'s ``data.hierarchy``;
3. else the label tree of the configured data (the flat tree of the labels found, as
   training derives it when the config has none: :func:`kmedtl.data.prepare.load_index`);
4. else, when the data cannot be indexed, the flat tree of the classes ``audit.json``
   counted; else ``None``.

The model's input shape (:attr:`RunFolder.input_shape`) comes from the model's own input,
checked against the config's image options (:func:`model_input_shape`).  A multi-input
model (``train.model: multi_input``) has one input per image type
(:attr:`RunFolder.input_names`, e.g. ``["t1", "t2"]``), all of that shape; the configured
data names the same inputs (:attr:`RunFolder.data_inputs`: the main image, named by
``data.columns.path`` else ``image``, then ``data.extra_columns``), checked by
:meth:`RunFolder.check_inputs`.

Example::

    >>> rf = RunFolder("runs/demo")                                # doctest: +SKIP
    >>> rf.hierarchy.leaves, rf.input_shape, rf.temperature        # doctest: +SKIP
    (('normal', 'glioma', 'pituitary'), (32, 32, 1), 1.31)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import keras
import yaml

import kmedtl.models  # noqa: F401  (registers kmedtl's serializable classes)
from kmedtl import jsonio
from kmedtl.config import READ_PATHS, load_config, load_yaml
from kmedtl.data.prepare import check_model_inputs, input_names, load_index, primary_input
from kmedtl.data.splits import Splits
from kmedtl.errors import ConfigError, KmedtlError, ModelFileError, UntrustedModelError
from kmedtl.hierarchy import Hierarchy
from kmedtl.ownership import LOCK_FILE, run_lock

log = logging.getLogger("kmedtl")

#: kmedtl.models preprocessing names -> kmedtl.data.pipeline normalisation names.
_NORMALIZATION = {"unit": "unit", "tf": "symmetric", "torch": "imagenet", "caffe": "caffe",
                  "none": "raw255"}


def write_yaml(path, data, *, sort_keys: bool = False) -> str:
    """Write ``data`` to ``path`` atomically as ``yaml.safe_dump(data, sort_keys=...)``."""
    return jsonio.atomic_write(path, lambda fh: yaml.safe_dump(data, fh, sort_keys=sort_keys))


def write_rows(path, rows) -> str:
    """Write ``rows`` (dicts) to ``path`` atomically as CSV: a header of every key in
    first-seen order, then one line per row."""
    def write(fh):
        cols = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)

    return jsonio.atomic_write(path, write, newline="")


def load_model(path, error: type[Exception] = ConfigError, *, safe_mode: bool = True):
    """``keras.saving.load_model`` with kmedtl's layers registered, in Keras' ``safe_mode``
    (a ``Lambda`` layer's Python bytecode is refused: UntrustedModelError, exit 2; only
    ``kmedtl predict --trust-model`` passes ``safe_mode=False``); a file Keras cannot load
    raises ModelFileError (exit 3), not a traceback (issue 21)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{path}: model file not found (the training stage writes "
                    "model.keras into the run folder)")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a .keras file (a zip archive); the file is damaged "
                             "or not a Keras 3 model")
    try:
        return keras.saving.load_model(path, safe_mode=safe_mode)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a bad file
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        if "safe_mode" in text:
            raise UntrustedModelError(
                f"{path}: refused to load this model: Keras safe_mode refuses it ({text}); "
                "if you trust whoever made it, kmedtl predict --trust-model loads it with "
                "safe_mode=False, and its code then runs with your rights") from None
        raise ModelFileError(f"{path}: Keras cannot load this model ({type(exc).__name__}: "
                             f"{text}); the file is damaged or not a Keras 3 model") from None


def leaf_output(output, error: type[Exception] = ConfigError, *, first: bool = False):
    """The leaf-probability output of a model's (symbolic or eager) output structure: the
    ``leaf`` entry of a dict (or its only entry), the first of a list, else the output.
    A dict of several outputs without ``leaf`` raises ``error``, or with ``first`` (the
    Trainer's rule for a model that is not kmedtl's) gives its first entry."""
    if isinstance(output, dict):
        if "leaf" in output:
            return output["leaf"]
        if len(output) == 1 or (first and output):
            return next(iter(output.values()))
        raise error(f"evaluate: the model's outputs are {sorted(output)}; expected a "
                    "'leaf' output (probabilities over the hierarchy's leaves)")
    if isinstance(output, (list, tuple)):
        return output[0]
    return output


def check_temperature(t, where, error: type[Exception] = ConfigError) -> float:
    """The one rule for a fitted temperature (``calibration.json``): a positive number."""
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
        raise error(f"{where}: 'temperature' must be a positive number, got {t!r}; "
                    "rerun kmedtl evaluate")
    return float(t)


def normalization_for(model, default: str = "unit") -> str:
    """The pipeline normalisation a model expects (kmedtl models: ``"unit"``)."""
    pre = getattr(model, "preprocessing", None)
    if isinstance(pre, dict):  # a multi-input model: one per input, all fed alike
        modes = {_NORMALIZATION.get(p, default) for p in pre.values()}
        if len(modes) > 1:
            raise ConfigError(f"model {getattr(model, 'name', '?')!r}: its inputs expect "
                              f"different normalisations {pre}; kmedtl feeds every image "
                              "type through one pipeline normalisation")
        return modes.pop() if modes else default
    return _NORMALIZATION.get(pre, default) if pre is not None else default


def model_input_names(model) -> list[str] | None:
    """The input names of a multi-input model (one per image type, e.g. ``["t1", "t2"]``:
    :class:`~kmedtl.models.MultiInputClassifier`), ``None`` for a single-image model."""
    inputs = getattr(model, "inputs", None)
    if isinstance(inputs, dict):
        names = list(inputs)
    elif isinstance(inputs, (list, tuple)):
        names = [str(getattr(t, "name", "")).split(":")[0] for t in inputs]
    else:
        return None
    declared = getattr(model, "input_names", None)
    if isinstance(declared, (list, tuple)) and len(declared) == len(names) \
            and all(isinstance(n, str) for n in declared):
        names = list(declared)
    return names if len(names) > 1 else None


def model_input_shape(model, options=None, *, error: type[Exception] = ConfigError,
                      where: str = "model", multi: bool = False) -> tuple[int, int, int]:
    """``(height, width, channels)`` of a single-image model's input, from the model.

    With ``options`` (:class:`~kmedtl.data.options.ImageOptions`) every dimension the model
    fixes must equal ``options.shape`` (``error`` otherwise: the config and the model
    disagree on the images); dimensions the model leaves open (``None``) are taken from
    the options.  ``multi`` accepts a multi-input model whose inputs all take images of
    one shape (every image type goes through the same image options) and returns it."""
    shape = model.input_shape
    if isinstance(shape, dict):
        shape = list(shape.values())
    if isinstance(shape, list) and shape and isinstance(shape[0], (list, tuple)):
        if len(shape) != 1 and not multi:
            raise error(f"{where}: the model has {len(shape)} inputs; this needs a model with "
                        "one image input")
        if len({tuple(s) for s in shape}) != 1:
            raise error(f"{where}: the model's inputs take images of different shapes "
                        f"{[tuple(s) for s in shape]}; kmedtl reads every image type with "
                        "the same image options (data.image)")
        shape = shape[0]
    dims = tuple(shape)[1:]
    if len(dims) != 3:
        raise error(f"{where}: the model's input has shape {tuple(shape)}; expected images "
                    "(batch, height, width, channels)")
    if options is not None:
        want = tuple(int(v) for v in options.shape)
        if any(d is not None and int(d) != w for d, w in zip(dims, want)):
            raise error(f"{where}: the model takes images of shape "
                        f"{tuple(None if d is None else int(d) for d in dims)} but the config's "
                        f"image options give {want} (data.image.size / data.image.channels); "
                        "the config.yaml does not belong to this model, or was edited after "
                        "training")
        return tuple(w if d is None else int(d) for d, w in zip(dims, want))
    if any(d is None for d in dims):
        raise error(f"{where}: the model's input shape {dims} leaves dimensions open; give "
                    "the image options")
    return tuple(int(d) for d in dims)


class RunFolder:
    """One run folder (see the module docstring).  ``error`` is the exception class raised
    for a missing or inconsistent artefact (export passes
    :class:`~kmedtl.export.errors.ExportError`); ``model`` overrides the model file
    (default ``model.keras``); ``loaded_model`` is that model when the caller has already
    loaded it.  Everything is read lazily and at most once."""

    CONFIG = "config.yaml"
    MODEL = "model.keras"
    SPLITS = "splits.json"
    TRAIN_METRICS = "train_metrics.json"
    AUDIT = "audit.json"
    HISTORY = "history.csv"
    METRICS = "metrics.json"
    CALIBRATION = "calibration.json"
    PREDICTIONS = "predictions.csv"
    REPORT = "report.html"
    MODEL_CARD_MD = "model_card.md"
    MODEL_CARD_JSON = "model_card.json"
    PLOTS_DIR = "plots"
    EXPORT_DIR = "export"
    PUSH = "push.json"
    DATA_DIR = "data"  # the pipeline's audit/split stage outputs
    STAGES_DIR = "stages"
    # training (kmedtl train / the pipeline's train stage): see training_paths()
    CHECKPOINTS_DIR = "checkpoints"
    BEST_WEIGHTS = "best.weights.h5"  # checkpoints/
    LAST_WEIGHTS = "last.weights.h5"  # checkpoints/
    STAGE_WEIGHTS = "stage_{node}.weights.h5"  # checkpoints/, one per staged node model
    BACKUP_DIR = "backup"
    BACKUP_STATE = "state.json"  # backup/
    PHASE_WEIGHTS = "phase_end.npz"  # backup/
    PHASE_WEIGHTS_TMP = "phase_end.tmp.npz"  # backup/, renamed to PHASE_WEIGHTS
    BACKUP_PHASE = "phase_{index}"  # backup/: BackupAndRestore's folder per phase
    LOGS_DIR = "logs"
    #: what a finished training run leaves (``--overwrite`` removes them first)
    TRAINING_FILES = (CONFIG, SPLITS, AUDIT, MODEL, HISTORY, TRAIN_METRICS)
    TRAINING_DIRS = (CHECKPOINTS_DIR, BACKUP_DIR, LOGS_DIR)
    # kmedtl tune / kmedtl lr-find
    TUNING_DIR = "tuning"
    TUNING_BEST_CONFIG = "best_config.yaml"  # tuning/
    TUNING_FEATURES_DIR = "features"  # tuning/: the default on-disk feature cache
    LR_FIND_PNG = "lr_find.png"  # lr_find.json beside it
    #: the one-writer lock (kmedtl.ownership.run_lock): held while a command writes here
    LOCK = LOCK_FILE

    def __init__(self, path, *, error: type[Exception] = ConfigError, model=None,
                 loaded_model=None):
        self.path = Path(path)
        self.error = error
        self._model_path = Path(model) if model is not None else self.path / self.MODEL
        self._cache: dict = {} if loaded_model is None else {"model": loaded_model}

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def for_config(cls, cfg, run_dir=None, **kwargs) -> RunFolder:
        """The run folder of a config: ``run_dir`` when given, else
        ``<output_dir>/<name>``."""
        return cls(Path(run_dir) if run_dir else Path(cfg.output_dir) / cfg.name, **kwargs)

    # ------------------------------------------------------------------ paths
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def model_path(self) -> Path:
        return self._model_path

    @property
    def splits_path(self) -> Path:
        return self.path / self.SPLITS

    @property
    def train_metrics_path(self) -> Path:
        return self.path / self.TRAIN_METRICS

    @property
    def audit_path(self) -> Path:
        return self.path / self.AUDIT

    @property
    def history_path(self) -> Path:
        return self.path / self.HISTORY

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def calibration_path(self) -> Path:
        return self.path / self.CALIBRATION

    @property
    def export_dir(self) -> Path:
        return self.path / self.EXPORT_DIR

    @property
    def push_path(self) -> Path:
        return self.path / self.PUSH

    @property
    def stages_dir(self) -> Path:
        return self.path / self.STAGES_DIR

    @property
    def pipeline_audit_path(self) -> Path:
        """The pipeline's audit stage output (``data/audit.json``)."""
        return self.path / self.DATA_DIR / self.AUDIT

    @property
    def pipeline_splits_path(self) -> Path:
        """The pipeline's split stage output (``data/splits.json``)."""
        return self.path / self.DATA_DIR / self.SPLITS

    @property
    def pretrain_dir(self) -> Path:
        """The pipeline's pretrain stage output (``backbone.weights.h5``, ``pretrain.json``)."""
        return self.path / "pretrain"

    def write_pipeline_audit(self, report) -> str:
        """Write the audit stage's ``data/audit.json`` (``default=str``)."""
        return self.write_json(f"{self.DATA_DIR}/{self.AUDIT}", report, strict=False,
                               default=str)

    def write_pipeline_splits(self, splits, root=None) -> str:
        """Write the split stage's ``data/splits.json`` (ids relative to ``root``)."""
        path = self.pipeline_splits_path
        path.parent.mkdir(parents=True, exist_ok=True)
        splits.save(str(path), root=root)
        return str(path)

    def write_pretrain_record(self, info) -> str:
        """Write the pretrain stage's ``pretrain/pretrain.json`` (``default=str``)."""
        return self.write_json("pretrain/pretrain.json", info, strict=False, default=str)

    # ------------------------------------------------------------------ training paths
    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS_DIR

    @property
    def backup_dir(self) -> Path:
        return self.path / self.BACKUP_DIR

    @property
    def logs_dir(self) -> Path:
        return self.path / self.LOGS_DIR

    @property
    def backup_state_path(self) -> Path:
        """``backup/state.json``: the resume state of an unfinished run."""
        return self.backup_dir / self.BACKUP_STATE

    @property
    def tuning_dir(self) -> Path:
        return self.path / self.TUNING_DIR

    @property
    def tuning_best_config_path(self) -> Path:
        return self.tuning_dir / self.TUNING_BEST_CONFIG

    @property
    def tuning_features_dir(self) -> Path:
        return self.tuning_dir / self.TUNING_FEATURES_DIR

    @property
    def lr_find_path(self) -> Path:
        """``lr_find.png`` (``lr_find.json`` beside it)."""
        return self.path / self.LR_FIND_PNG

    def stage_weights_path(self, node: str) -> Path:
        """``checkpoints/stage_<node>.weights.h5``: a staged run's node model weights."""
        return self.checkpoints_dir / self.STAGE_WEIGHTS.format(node=node)

    def backup_phase_dir(self, index: int) -> Path:
        """``backup/phase_<index>/``: ``BackupAndRestore``'s folder for phase ``index``."""
        return self.backup_dir / self.BACKUP_PHASE.format(index=int(index))

    @classmethod
    def backup_phase_index(cls, name: str) -> int | None:
        """The phase index of a ``backup/`` entry named as :meth:`backup_phase_dir` names
        it, else ``None``."""
        pattern = re.escape(cls.BACKUP_PHASE).replace(re.escape("{index}"), r"(\d+)")
        m = re.fullmatch(pattern, name)
        return int(m[1]) if m else None

    def training_paths(self, create: bool = False) -> dict[str, Path]:
        """Where the :class:`~kmedtl.training.Trainer` writes: ``best``/``last`` (weights in
        ``checkpoints/``), ``backup_dir``, ``state``, ``phase_weights`` and
        ``phase_weights_tmp`` (in ``backup/``), ``logs_dir``, ``history``, ``model`` and
        ``metrics`` (``train_metrics.json``).  ``create`` makes the three folders."""
        if create:
            for d in (self.checkpoints_dir, self.backup_dir, self.logs_dir):
                d.mkdir(parents=True, exist_ok=True)
        return {"best": self.checkpoints_dir / self.BEST_WEIGHTS,
                "last": self.checkpoints_dir / self.LAST_WEIGHTS,
                "backup_dir": self.backup_dir, "state": self.backup_state_path,
                "phase_weights": self.backup_dir / self.PHASE_WEIGHTS,
                "phase_weights_tmp": self.backup_dir / self.PHASE_WEIGHTS_TMP,
                "logs_dir": self.logs_dir, "history": self.history_path,
                "model": self.path / self.MODEL, "metrics": self.train_metrics_path}

    def training_state(self) -> dict | None:
        """``backup/state.json`` (``None`` when absent or unreadable: nothing to resume)."""
        try:
            with open(self.backup_state_path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    @property
    def training_finished(self) -> bool:
        """Training finished here: ``train_metrics.json`` is written and ``backup/`` holds
        no resume state."""
        return self.train_metrics_path.exists() and self.training_state() is None

    def clear_training(self) -> None:
        """Remove what training writes (:attr:`TRAINING_FILES`, :attr:`TRAINING_DIRS`)."""
        for name in self.TRAINING_FILES:
            (self.path / name).unlink(missing_ok=True)
        for name in self.TRAINING_DIRS:
            shutil.rmtree(self.path / name, ignore_errors=True)
        self._cache.clear()

    def ensure_dir(self, hint: str = "") -> RunFolder:
        """Raise ``error`` when the folder does not exist; returns ``self``."""
        if not self.path.is_dir():
            raise self.error(f"{self.path}: run folder not found" + (f" ({hint})" if hint
                                                                      else ""))
        return self

    def lock(self, command: str = "kmedtl", *, create: bool = True):
        """``with rf.lock("kmedtl train"):`` hold the folder's one-writer lock
        (:func:`kmedtl.ownership.run_lock`): another process that tries to write the folder
        meanwhile stops at once with :class:`~kmedtl.ownership.RunFolderBusyError`, naming
        this process's PID; released however this process ends (``kill -9`` included)."""
        return run_lock(self.path, command, create=create)

    def ensure_files(self, *names: str, hint: str = "rerun the stage that writes it"):
        """Raise ``error`` naming the first of ``names`` the folder lacks."""
        for name in names:
            path = self.model_path if name == self.MODEL else self.path / name
            if not path.is_file():
                raise self.error(f"{path}: not found; {hint}")
        return self

    # ------------------------------------------------------------------ JSON
    def read_json(self, name: str):
        """A JSON artefact of the folder (``None`` when absent); see :mod:`kmedtl.jsonio`."""
        return jsonio.read_json(self.path / name, error=self.error)

    def write_json(self, name: str, data, **kwargs) -> str:
        """Write a JSON artefact atomically (:func:`kmedtl.jsonio.write_json`); ``name`` is
        relative to the folder (``data/audit.json``), its parent made if needed."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return jsonio.write_json(path, data, **kwargs)

    def _forget(self, *keys) -> None:
        for key in keys:
            self._cache.pop(key, None)

    # ------------------------------------------------------------------ writes (atomic)
    def write_config(self, mapping) -> str:
        """Write ``config.yaml`` (``yaml.safe_dump``, keys in the mapping's order)."""
        self._forget("config", "image_options", "hierarchy", "index", "by_id")
        return write_yaml(self.config_path, mapping)

    def write_best_config(self, mapping) -> str:
        """Write ``tuning/best_config.yaml`` (the search's best config, as config.yaml)."""
        self.tuning_dir.mkdir(parents=True, exist_ok=True)
        return write_yaml(self.tuning_best_config_path, mapping)

    def write_splits(self, splits, root=None) -> str:
        """Write ``splits.json`` (:meth:`kmedtl.data.splits.Splits.save`: ids relative to
        ``root``; atomic)."""
        for key in [k for k in self._cache if isinstance(k, tuple) and k[0] == "splits"]:
            self._forget(key)
        self._forget("by_id")
        path = str(self.splits_path)
        splits.save(path, root=root)
        return path

    def write_audit(self, report) -> str:
        """Write ``audit.json`` (the public audit report; ``default=str``)."""
        self._forget("audit", "hierarchy")
        return self.write_json(self.AUDIT, report, strict=False, default=str)

    def write_train_metrics(self, metrics) -> str:
        """Write ``train_metrics.json`` (as given, ``default=str``)."""
        self._forget("train_metrics")
        return self.write_json(self.TRAIN_METRICS, metrics, strict=False, default=str)

    def write_history(self, rows) -> str:
        """Write ``history.csv`` from row dicts (:func:`write_rows`; the Trainer's runs
        append to it through Keras' ``CSVLogger`` instead)."""
        return write_rows(self.history_path, rows)

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def train_metrics(self) -> dict:
        """``train_metrics.json`` (``{}`` when absent)."""
        return self._once("train_metrics", lambda: self.read_json(self.TRAIN_METRICS) or {})

    @property
    def fold(self) -> int:
        """The fold the model was trained on (``train_metrics.json``; 0 when absent)."""
        return int(self.train_metrics.get("fold", 0))

    @property
    def audit(self) -> dict | None:
        return self._once("audit", lambda: self.read_json(self.AUDIT))

    @property
    def metrics(self) -> dict | None:
        return self._once("metrics", lambda: self.read_json(self.METRICS))

    @property
    def calibration(self) -> dict | None:
        return self._once("calibration", lambda: self.read_json(self.CALIBRATION))

    @property
    def temperature(self) -> float:
        """The fitted temperature of ``calibration.json`` (1.0 when there is none),
        checked once (:func:`check_temperature`)."""
        def make():
            calib = self.calibration
            if calib is None:
                return 1.0
            return check_temperature(calib.get("temperature"), self.calibration_path,
                                     self.error)

        return self._once("temperature", make)

    # ------------------------------------------------------------------ config
    @property
    def has_config(self) -> bool:
        return self.config_path.is_file()

    @property
    def config(self):
        """``config.yaml``, loaded and validated once (:func:`kmedtl.config.load_config`).

        kmedtl writes every path absolute; a relative one (a config.yaml written by hand or
        by an older kmedtl) is read against the run folder, and a warning names it when
        nothing is there."""
        def make():
            cfg = load_config(self.config_path)
            self._warn_relative_paths(cfg)
            return cfg

        return self._once("config", make)

    def _warn_relative_paths(self, cfg) -> None:
        try:
            raw = load_yaml(self.config_path.read_text(), str(self.config_path)) or {}
        except (OSError, ConfigError):
            return
        loaded = cfg.model_dump(mode="json")
        for key in READ_PATHS:
            *parents, last = key.split(".")
            node, value = raw, loaded
            for p in parents:
                node = node.get(p) if isinstance(node, dict) else None
                value = value.get(p) if isinstance(value, dict) else None
            given = node.get(last) if isinstance(node, dict) else None
            resolved = value.get(last) if isinstance(value, dict) else None
            if (isinstance(given, str) and isinstance(resolved, str) and resolved != given
                    and not os.path.isabs(os.path.expanduser(given))
                    and "${" not in given and not os.path.exists(resolved)):
                log.warning("%s: %s %r is a relative path, read against the run folder "
                            "(%s), where nothing exists; kmedtl stores paths absolute "
                            "(this config.yaml was written by hand or by an older version): "
                            "give the absolute path in config.yaml", self.config_path, key,
                            given, resolved)

    @property
    def name(self) -> str:
        return self.config.name if self.has_config else self.path.name

    @property
    def image_options(self):
        """The config's :class:`~kmedtl.data.options.ImageOptions`."""
        return self._once("image_options", lambda: self.config.image_options())

    # ------------------------------------------------------------------ model
    @property
    def has_model(self) -> bool:
        return self.model_path.is_file()

    @property
    def model(self):
        """The trained Keras model, loaded once (:func:`load_model`)."""
        return self._once("model", lambda: load_model(self.model_path, self.error))

    @property
    def model_hierarchy(self):
        """The hierarchy the saved model carries, or ``None`` (also without a model file)."""
        if "model" not in self._cache and not self.has_model:
            return None
        h = getattr(self.model, "hierarchy", None)
        return h if isinstance(h, Hierarchy) else None

    @property
    def hierarchy(self):
        """The run's label tree by the rule of the module docstring (``None`` if none)."""
        return self._once("hierarchy", self._resolve_hierarchy)

    def _resolve_hierarchy(self):
        h = self.model_hierarchy
        if h is None and self.has_config:
            h = self.config.hierarchy()
        if h is None and self.has_config:
            try:
                h = self.index()[1]
            except KmedtlError:
                h = None
        if h is None and self.audit:
            by_class = self.audit.get("counts", {}).get("by_class", {})
            h = Hierarchy.flat(sorted(by_class)) if len(by_class) >= 2 else None
        return h

    @property
    def n_leaf_outputs(self) -> int:
        """Number of leaf probabilities the model outputs."""
        return int(leaf_output(self.model.output, self.error).shape[-1])

    def check_outputs(self, hierarchy=None):
        """Raise ``error`` unless the model has one leaf output per leaf of ``hierarchy``
        (default :attr:`hierarchy`); returns the hierarchy."""
        h = self.hierarchy if hierarchy is None else hierarchy
        if h is None:
            raise self.error(f"{self.path}: no label tree in the model, config.yaml "
                             "(data.hierarchy), data or audit.json")
        n_out = self.n_leaf_outputs
        if n_out != len(h.leaves):
            raise self.error(f"{self.model_path}: the model has {n_out} leaf outputs but the "
                             f"label tree {len(h.leaves)} leaves {list(h.leaves)}")
        return h

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` from the model's input, checked against the
        config's image options (:func:`model_input_shape`)."""
        return model_input_shape(self.model, self.image_options, error=self.error,
                                 where=str(self.model_path), multi=True)

    @property
    def input_names(self) -> list[str] | None:
        """The model's inputs, one per image type, for a multi-input model (``None`` for a
        single-image model): :func:`model_input_names`."""
        return model_input_names(self.model)

    @property
    def data_inputs(self) -> list[str]:
        """The image inputs of the configured data (main image first):
        :func:`kmedtl.data.prepare.input_names` of ``config.yaml``'s ``data``."""
        return input_names(self.config.data, check=False)

    @property
    def primary_input(self) -> str:
        """The main image's input name in the configured data (``image`` unless
        ``data.columns.path`` names it)."""
        return primary_input(self.config.data)

    def check_inputs(self, data_inputs=None, where: str | None = None) -> list[str] | None:
        """Raise ``error`` unless the model takes the images the data gives (default: the
        configured data's :attr:`data_inputs`); returns :attr:`input_names`."""
        data_inputs = self.data_inputs if data_inputs is None else list(data_inputs)
        check_model_inputs(self.input_names, data_inputs,
                           where or f"{self.model_path} with {self.config_path}", self.error)
        return self.input_names

    @property
    def normalization(self) -> str:
        """The pipeline normalisation the model expects (:func:`normalization_for`)."""
        return normalization_for(self.model, self.config.data.normalization)

    # ------------------------------------------------------------------ data and splits
    def use_index(self, indexed: tuple) -> None:
        """Take ``(index, hierarchy)`` of the configured data from a caller that built it
        already (``kmedtl run``: one index, one DICOMweb query, per run)."""
        self._cache["index"] = indexed

    def index(self):
        """``(index, hierarchy)`` of the configured data (:func:`load_index`), once."""
        def make():
            return load_index(self.config)

        return self._once("index", make)

    @property
    def has_splits(self) -> bool:
        return self.splits_path.is_file()

    def splits(self, root=None):
        """``splits.json`` (:class:`~kmedtl.data.splits.Splits`; ids resolved against
        ``root``), or ``None`` when the folder has no split file."""
        def make():
            return Splits.load(self.splits_path, root=root) if self.has_splits else None

        return self._once(("splits", None if root is None else str(root)), make)

    def split_samples(self, part: str, fold: int | None = None, *, missing=None) -> list:
        """The samples of the configured data in ``part`` (``train``, ``val``, ``test``) of
        ``fold`` (default :attr:`fold`) of ``splits.json``, in the split file's order;
        ``[]`` without a split file.  Ids no longer in the data are left out and, when
        ``missing`` is a list, appended to it as ``{"path", "reason"}``."""
        if not self.has_splits:
            return []
        index = self.index()[0]
        splits = self.splits(root=index.root)
        fold = self.fold if fold is None else int(fold)
        if not 0 <= fold < len(splits.folds):
            raise self.error(f"fold {fold}: the split file has {len(splits.folds)} fold(s)")
        by_id = self._once("by_id", lambda: {s.id: s for s in index.samples})
        ids = getattr(splits.folds[fold], part)
        if missing is not None:
            missing.extend({"path": i, "reason": "in the split file but not in the data "
                            "(deleted, unreadable or relabelled)"} for i in ids if i not in by_id)
        return [by_id[i] for i in ids if i in by_id]
