"""Hyper-parameter search with KerasTuner: the space is a ``HyperModel``, the tuners stock.

:class:`TransferHyperModel` searches over

- ``backbone``: the families in ``train.tune.backbones``;
- ``cut_<family>``: its truncation point, from the registry's named cuts for that family
  (``train.tune.cuts``: ``stages`` = stage ends, ``all``, ``none`` or a list);
- ``strategy``: linear probe / full / freeze / gradual / fine_tune, with
  ``freeze_fraction`` (freeze depth) and ``unfreeze_start`` (unfreeze schedule) as
  conditional parameters;
- ``learning_rate`` (log-uniform), ``lr_ratio`` (discriminative multipliers
  ``lr/r^2, lr/r, lr``) and head ``dropout``.

``build(hp)`` seeds the RNG before building, so every trial with the same family and cut
starts from the same backbone weights; linear-probe trials then train only the head, on
features computed once and cached (:class:`~kmedtl.training.features.FeatureCache`).
Other trials run the :class:`~kmedtl.training.Trainer` (phases, schedules, multipliers).

:func:`run_search` runs ``RandomSearch``, ``Hyperband`` or ``BayesianOptimization``,
resumes a search with ``overwrite=False`` (KerasTuner reloads its oracle), works in
KerasTuner's chief/worker mode (``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP``,
``KERASTUNER_ORACLE_PORT``; the chief writes the results), raises :class:`TuningError`
with the *first* failed trial's error when every trial, or more than
``max_failed_fraction`` of them, failed, and writes ``results.csv``, ``results.md`` and
``best_config.yaml``.

KerasTuner on the TensorFlow backend imports ``tensorboard`` in every trial; without it
every trial fails.  :func:`preflight` checks that first and says ``pip install
tensorboard``.
"""

from __future__ import annotations

import csv
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
from keras_tuner.src.distribute import utils as kt_distribute  # chief/worker (no public API)

from kmedtl import models  # looked up per call, as kmedtl.models.<name> (patchable there)
from kmedtl.errors import ConfigError, KmedtlError
from kmedtl.training.build import build_model
from kmedtl.training.config import TrainSection, TuneSection
from kmedtl.training.features import FeatureCache, array_digest, materialise, split_at_features
from kmedtl.training.freezing import backbone_layers, freeze_backbone, stage_groups
from kmedtl.training.metrics import infer_mode, resolve_monitor
from kmedtl.training.trainer import Trainer

log = logging.getLogger("kmedtl.training")

TUNER_CLASSES = {"random": kt.RandomSearch, "hyperband": kt.Hyperband,
                 "bayesian": kt.BayesianOptimization}


class TuningError(KmedtlError):
    """A search could not run, or (almost) every trial failed."""


# ---------------------------------------------------------------------------- preflight
def preflight() -> None:
    """Fail early, with the fix, when KerasTuner trials would all fail."""
    if keras.backend.backend() != "tensorflow":
        return
    try:
        importlib.import_module("tensorboard.plugins.hparams.api")
    except ImportError as exc:
        raise TuningError(
            "kmedtl tune: the 'tensorboard' package is missing or broken "
            f"({type(exc).__name__}: {exc}); KerasTuner imports it in every trial on the "
            "TensorFlow backend, so every trial would fail. Fix: pip install tensorboard"
        ) from None


# ---------------------------------------------------------------------------- hypermodel
class _OnModel(keras.callbacks.Callback):
    """Hand a KerasTuner callback the *full* model while only its head trains on cached
    features: the tuner's checkpoint must hold the weights of the model ``build(hp)``
    returns (``tuner.load_model`` rebuilds that and loads them).

    KerasTuner's ``SaveBestEpoch`` writes the whole model at every improvement; with a
    frozen backbone only the head changes, so the best head weights are kept in memory and
    the full model is written once, when training ends (same file, same content).
    """

    def __init__(self, inner, model, head):
        super().__init__()
        self.inner, self.full, self.head = inner, model, head
        self._best = None
        if callable(getattr(inner, "_save_model", None)) and hasattr(inner, "filepath"):
            inner._save_model = self._snapshot

    def _snapshot(self):
        self._best = self.head.get_weights()

    def set_model(self, model):
        self.inner.set_model(self.full)

    def set_params(self, params):
        self.inner.set_params(params)

    def on_train_begin(self, logs=None):
        self.inner.on_train_begin(logs)

    def on_train_end(self, logs=None):
        self.inner.on_train_end(logs)
        if self._best is not None:
            current = self.head.get_weights()
            self.head.set_weights(self._best)
            self.full.save_weights(self.inner.filepath)
            self.head.set_weights(current)
            self._best = None

    def on_epoch_begin(self, epoch, logs=None):
        self.inner.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self.inner.on_epoch_end(epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self.inner.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.inner.on_train_batch_end(batch, logs)


def _history(result) -> keras.callbacks.History:
    h = keras.callbacks.History()
    h.history = {k: [np.nan if v is None else v for v in vs]
                 for k, vs in result.history.items() if k != "epoch"}
    h.epoch = list(result.epochs)
    return h


class TransferHyperModel(kt.HyperModel):
    """The search space of ``train.tune`` around the ``train`` section ``base``.

    Args:
        base: the :class:`TrainSection` every trial starts from.
        hierarchy: the label tree (heads are built from it).
        input_shape: ``(H, W, C)`` of the images.
        plain_train, plain_val: un-augmented, un-shuffled training / validation data
            (datasets or ``(x, y)`` arrays) for the feature cache.
        feature_cache: a :class:`FeatureCache`, or None to train linear probes end to end.
        shuffle: shuffle cached features each epoch.
    """

    def __init__(self, base: TrainSection, hierarchy, input_shape, *, plain_train=None,
                 plain_val=None, feature_cache: FeatureCache | None = None,
                 shuffle: bool = True, name: str = "kmedtl"):
        super().__init__(name=name)
        self.base = base
        self.tune: TuneSection = base.tune
        self.hierarchy = hierarchy
        self.input_shape = tuple(input_shape)
        self.plain = {"train": plain_train, "val": plain_val}
        self.feature_cache = feature_cache
        self.shuffle = shuffle
        self.families = list(self.tune.backbones or [base.backbone])
        self.declaring = False  # True while the tuner explores the space (no model needed)
        self._cut_names: dict[str, list] = {}
        self._arrays: dict[str, tuple] = {}
        for fam in self.families:  # fail early on an unknown family
            base.derive(backbone=fam)

    # -------------------------------------------------------------- space
    def cuts(self, family: str) -> list[str]:
        """Cut names searched for ``family`` (empty: the configured ``train.cut``)."""
        if family in self._cut_names:
            return self._cut_names[family]
        mode = self.tune.cuts
        if mode == "none":
            names = []
        else:
            points = models.cut_points(family, input_shape=self.input_shape)
            known = [p.name for p in points]
            if mode == "stages":
                names = [p.name for p in points if p.kind == "stage"]
            elif mode == "all":
                names = known
            else:
                bad = [c for c in mode if c not in known]
                if bad:
                    raise ConfigError(f"train.tune.cuts: {bad} are not named cuts of {family!r}; "
                                      f"its cuts: {known}")
                names = list(mode)
        self._cut_names[family] = names
        return names

    def space(self, hp) -> dict:
        """Declare the search space on ``hp`` and return this trial's values."""
        t = self.tune
        if len(self.families) > 1:
            family = hp.Choice("backbone", self.families)
        else:
            family = hp.Fixed("backbone", self.families[0])
        cut = self.base.cut
        for fam in self.families:
            names = self.cuts(fam)
            if not names:
                continue
            with hp.conditional_scope("backbone", [fam]):
                value = hp.Choice(f"cut_{fam}", names)
            if fam == family:
                cut = value
        strategies = list(dict.fromkeys(t.strategies))
        strategy = hp.Choice("strategy", strategies) if len(strategies) > 1 else \
            hp.Fixed("strategy", strategies[0])
        freeze_fraction = unfreeze_start = None
        if "freeze" in strategies:
            with hp.conditional_scope("strategy", ["freeze"]):
                freeze_fraction = hp.Choice("freeze_fraction", [0.25, 0.5, 0.75])
        if "gradual" in strategies:
            with hp.conditional_scope("strategy", ["gradual"]):
                unfreeze_start = hp.Choice("unfreeze_start", [0.25, 0.5])
        lo, hi = t.learning_rate
        lr = hp.Float("learning_rate", lo, hi, sampling="log") if lo < hi else \
            hp.Fixed("learning_rate", lo)
        ratio = None
        tuned = [s for s in strategies if s != "linear_probe"]
        if tuned:
            with hp.conditional_scope("strategy", tuned):
                ratios = list(dict.fromkeys(t.lr_ratios))
                ratio = hp.Choice("lr_ratio", ratios) if len(ratios) > 1 else \
                    hp.Fixed("lr_ratio", ratios[0])
        dlo, dhi = t.dropout
        dropout = hp.Float("dropout", dlo, dhi, step=0.1) if dlo < dhi else \
            hp.Fixed("dropout", dlo)
        return {"backbone": family, "cut": cut, "strategy": strategy, "learning_rate": lr,
                "lr_ratio": ratio, "dropout": dropout, "freeze_fraction": freeze_fraction,
                "unfreeze_start": unfreeze_start}

    def trial_section(self, hp, epochs: int | None = None, model=None) -> TrainSection:
        """The :class:`TrainSection` of the trial with hyper-parameters ``hp``."""
        v = self.space(hp)
        epochs = int(epochs or self.tune.epochs or self.base.epochs)
        upd = {"backbone": v["backbone"], "cut": v["cut"], "strategy": v["strategy"],
               "learning_rate": float(v["learning_rate"]), "dropout": round(float(v["dropout"]), 6),
               "epochs": epochs, "freeze_below": None, "freeze_layers": None,
               "unfreeze_at": [], "lr_multipliers": None}
        s = v["strategy"]
        n_stages = len(stage_groups(model)) if model is not None else 2
        groups = min(3, n_stages + 1)
        r = float(v["lr_ratio"] or 1.0)
        if s != "linear_probe" and r > 1.0 and groups >= 2:
            upd["lr_multipliers"] = [r ** -(groups - 1 - i) for i in range(groups)]
        if s == "freeze":
            n_layers = len(backbone_layers(model)) if model is not None else 1
            upd["freeze_layers"] = max(1, int(round(float(v["freeze_fraction"]) * n_layers)))
        if s == "gradual":
            start = float(v["unfreeze_start"])
            points = [start, (1.0 + start) / 2] if groups >= 3 and epochs >= 4 else [start]
            if len(points) == 2 and not upd["lr_multipliers"]:
                upd["lr_multipliers"] = [1.0, 1.0, 1.0]
            if int(round(points[0] * epochs)) < 1 or epochs < 2:
                s = upd["strategy"] = "full"  # too few epochs to unfreeze in steps
            else:
                upd["unfreeze_at"] = points
        if s == "fine_tune":
            if epochs < 2:
                upd["strategy"] = "linear_probe"
                upd["lr_multipliers"] = None
            else:
                upd["head_epochs"] = min(self.base.head_epochs, epochs - 1)
        return self.base.derive(**upd)

    # -------------------------------------------------------------- HyperModel API
    def build(self, hp):
        values = self.space(hp)
        if self.declaring:
            return None
        # Same family + cut -> same initial weights in every trial (and a reusable
        # feature cache for frozen backbones).
        keras.utils.set_random_seed(self.tune.seed)
        cfg = self.base.derive(backbone=values["backbone"], cut=values["cut"],
                               dropout=float(values["dropout"]), strategy="full",
                               freeze_below=None, freeze_layers=None, unfreeze_at=[])
        return build_model(cfg, self.hierarchy, self.input_shape)

    def fit(self, hp, model, *args, **kwargs):
        train = args[0] if args else kwargs.get("x")
        val = kwargs.get("validation_data")
        callbacks = list(kwargs.get("callbacks") or [])
        total = int(kwargs.get("epochs") or self.tune.epochs or self.base.epochs)
        epochs = max(1, total - int(kwargs.get("initial_epoch") or 0))
        cfg = self.trial_section(hp, epochs=epochs, model=model)
        verbose = kwargs.get("verbose", cfg.verbose)
        if cfg.strategy == "linear_probe" and self.feature_cache is not None and \
                self.plain["train"] is not None and self.plain["val"] is not None:
            return self._fit_cached(model, cfg, epochs, callbacks, verbose)
        result = Trainer(model, cfg, callbacks=callbacks, verbose=verbose).fit(
            train, val, epochs=epochs, evaluate=False)
        return _history(result)

    def _data(self, part):
        if part not in self._arrays:
            x, y = materialise(self.plain[part])
            self._arrays[part] = (x, y, array_digest(x))
        return self._arrays[part]

    def _fit_cached(self, model, cfg, epochs, callbacks, verbose):
        extractor, head = split_at_features(model)
        freeze_backbone(model)
        xtr, ytr, ktr = self._data("train")
        xva, yva, kva = self._data("val")
        ftr = self.feature_cache.features(extractor, xtr, ktr)
        fva = self.feature_cache.features(extractor, xva, kva)
        args = Trainer(model, cfg).compile_args()
        head_cfg = cfg.derive(strategy="full", lr_multipliers=None)
        result = Trainer(head, head_cfg, callbacks=[_OnModel(c, model, head) for c in callbacks],
                         loss=args["loss"], metrics=args["metrics"],
                         loss_weights=args.get("loss_weights"), verbose=verbose).fit(
            (ftr, ytr), (fva, yva), epochs=epochs, shuffle=self.shuffle, evaluate=False)
        return _history(result)


# ---------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    role: str  # "single", "chief" or "worker"
    objective: str = ""
    direction: str = ""
    rows: list = field(default_factory=list)
    best_hyperparameters: dict = field(default_factory=dict)
    best_section: TrainSection | None = None
    directory: str = ""
    files: dict = field(default_factory=dict)
    tuner: object = None


def objective_for(tune: TuneSection, multi_output: bool):
    name = resolve_monitor(tune.objective, multi_output, validation=True)
    direction = tune.direction if tune.direction != "auto" else infer_mode(name)
    return kt.Objective(name, direction=direction)


def distributed_role() -> str:
    if not kt_distribute.has_chief_oracle():
        return "single"
    return "chief" if kt_distribute.is_chief_oracle() else "worker"


def make_tuner(hypermodel: TransferHyperModel, objective, directory, project_name="search",
               overwrite=None, epochs=None):
    """The stock KerasTuner tuner of ``train.tune.tuner``."""
    t = hypermodel.tune
    role = distributed_role()
    overwrite = t.overwrite if overwrite is None else overwrite
    if role == "worker":
        overwrite = False  # only the chief may clear the shared project folder
    common = dict(hypermodel=hypermodel, objective=objective, directory=str(directory),
                  project_name=project_name, overwrite=overwrite, seed=t.seed,
                  max_consecutive_failed_trials=t.max_consecutive_failed_trials,
                  executions_per_trial=t.executions_per_trial)
    if t.tuner == "random":
        return kt.RandomSearch(max_trials=t.max_trials, **common)
    if t.tuner == "bayesian":
        return kt.BayesianOptimization(max_trials=t.max_trials,
                                       num_initial_points=t.bayesian_initial_points, **common)
    if t.tuner == "hyperband":
        return kt.Hyperband(max_epochs=int(epochs or t.epochs or hypermodel.base.epochs),
                            factor=t.hyperband_factor, hyperband_iterations=1, **common)
    raise ConfigError(f"train.tune.tuner: {t.tuner!r} is not one of {list(TUNER_CLASSES)}")


def _error_line(message) -> str:
    """The last non-empty line of a traceback: the exception and its message."""
    lines = [ln for ln in str(message or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def check_failures(tuner, max_failed_fraction: float) -> None:
    """Raise :class:`TuningError` with the first failed trial's error when all trials, or
    more than ``max_failed_fraction`` of them, failed."""
    oracle = tuner.oracle
    trials = oracle.trials
    if not trials:
        raise TuningError("kmedtl tune: the search ran no trial")
    order = [t for t in getattr(oracle, "start_order", []) if t in trials] or sorted(trials)
    failed = [trials[t] for t in order if trials[t].status in ("FAILED", "INVALID")]
    finished = [t for t in trials.values() if t.status != "RUNNING"]
    if not failed:
        return
    if len(failed) == len(finished) or len(failed) / max(len(finished), 1) > max_failed_fraction:
        first = failed[0]
        raise TuningError(
            f"kmedtl tune: {len(failed)} of {len(finished)} trials failed "
            f"(train.tune.max_failed_fraction: {max_failed_fraction}); the first failure, trial "
            f"{first.trial_id}: {_error_line(first.message)}\n\nfull error of trial "
            f"{first.trial_id}:\n{first.message}")


def results_table(tuner) -> list[dict]:
    """One row per trial, best first: id, status, score, hyper-parameters, error."""
    rows = []
    direction = tuner.oracle.objective.direction
    for trial in tuner.oracle.trials.values():
        row = {"trial_id": trial.trial_id, "status": trial.status,
               "score": None if trial.score is None else float(trial.score)}
        row.update({k: v for k, v in trial.hyperparameters.values.items()
                    if not k.startswith("tuner/")})
        row["error"] = _error_line(trial.message) if trial.status in ("FAILED", "INVALID") \
            else ""
        rows.append(row)
    sign = -1.0 if direction == "max" else 1.0
    rows.sort(key=lambda r: (r["score"] is None or not np.isfinite(r["score"]),
                             sign * (r["score"] if r["score"] is not None else 0.0),
                             r["trial_id"]))
    return rows


def write_results(rows: list[dict], directory, objective) -> dict:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r if k != "error")) + ["error"]
    csv_path, md_path = directory / "results.csv", directory / "results.md"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "/")

    lines = [f"Search results, objective `{objective.name}` ({objective.direction}), best first.",
             "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return {"csv": str(csv_path), "markdown": str(md_path)}


def run_search(hypermodel: TransferHyperModel, train, val, *, directory, epochs=None,
               project_name="search", verbose=1, objective=None, overwrite=None
               ) -> SearchResult:
    """Run the configured KerasTuner search (see the module docstring)."""
    preflight()
    t = hypermodel.tune
    multi = hypermodel.base.model == "hierarchical"
    objective = objective or objective_for(t, multi)
    epochs = int(epochs or t.epochs or hypermodel.base.epochs)
    role = distributed_role()
    hypermodel.declaring = True
    try:
        tuner = make_tuner(hypermodel, objective, directory, project_name, overwrite, epochs)
    finally:
        hypermodel.declaring = False
    consecutive = None
    try:
        tuner.search(train, validation_data=val, epochs=epochs, verbose=verbose)
    except RuntimeError as exc:
        if "consecutive failures" not in str(exc):
            raise
        consecutive = exc
    result = SearchResult(role=role, objective=objective.name, direction=objective.direction,
                          directory=str(Path(directory) / project_name), tuner=tuner)
    if role == "worker":
        return result
    check_failures(tuner, 0.0 if consecutive is not None else t.max_failed_fraction)
    result.rows = results_table(tuner)
    result.files = write_results(result.rows, directory, objective)
    return result  # the best trial is read from the table by search()


@dataclass
class Tuned:
    """What :func:`search` chose: the first row of ``results.csv`` (best score, ties broken
    by trial id: KerasTuner's own order of tied trials can change when it reloads a
    search), as train sections at the full ``train.epochs`` (``section``: fine-tune head
    epochs and gradual unfreeze points scale with the epochs) and at the trials' epochs
    (``as_searched``).  A KerasTuner worker chooses nothing (``section`` is None)."""

    result: SearchResult
    trial_epochs: int
    trial_id: str | None = None
    score: float | None = None
    hyperparameters: dict = field(default_factory=dict)
    section: TrainSection | None = None
    as_searched: TrainSection | None = None


def search(hypermodel: TransferHyperModel, train, val, *, directory, epochs: int,
           trial_epochs: int | None = None, overwrite=None, verbose=1) -> Tuned:
    """The one search operation ``kmedtl tune``, ``kmedtl run``'s tune stage and the study's
    search arm share: :func:`run_search`, then the best trial read from its results table
    (:class:`Tuned`).  ``epochs``: what the chosen section trains for; ``trial_epochs``:
    each trial's (default ``train.tune.epochs``, else ``train.epochs``)."""
    trial_epochs = int(trial_epochs or hypermodel.tune.epochs or hypermodel.base.epochs)
    result = run_search(hypermodel, train, val, directory=directory, epochs=trial_epochs,
                        verbose=verbose, overwrite=overwrite)
    out = Tuned(result, trial_epochs)
    if result.role == "worker":
        return out
    top = result.rows[0] if result.rows else None
    trials = result.tuner.oracle.trials if result.tuner is not None else {}
    if top is None or top["score"] is None or not np.isfinite(top["score"]) or \
            top["trial_id"] not in trials:
        raise TuningError(f"{directory}: the search found no trial with a finite "
                          f"{result.objective} (see {Path(directory) / 'results.md'})")
    hp = trials[top["trial_id"]].hyperparameters
    model = hypermodel.build(hp)  # freeze depth and groups depend on the model
    out.section = hypermodel.trial_section(hp, epochs=int(epochs), model=model)
    out.as_searched = hypermodel.trial_section(hp, epochs=trial_epochs, model=model)
    del model
    out.trial_id, out.score = top["trial_id"], float(top["score"])
    out.hyperparameters = {k: v for k, v in hp.values.items() if not k.startswith("tuner/")}
    result.best_hyperparameters, result.best_section = out.hyperparameters, out.as_searched
    return out
