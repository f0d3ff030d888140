"""The pipeline's stages: each takes the :class:`Context` and returns a :class:`StageOutput`.

============  =========================================================================
stage         what it does, what it writes (inside the run folder)
============  =========================================================================
audit         index, decode once (filling the image cache), hash, find exact and near
              duplicates and patient overlap: ``data/audit.json``
split         the leakage-free split of ``split:``, checked: no exact duplicate, near
              duplicate (``dedupe: near``) or patient across train/val/test:
              ``data/splits.json``
pretrain      same-domain pretraining of ``train.backbone`` on the images the fold does not
              use (:class:`~kmedtl.pipeline.spec.PretrainSection`):
              ``pretrain/backbone.weights.h5``, ``pretrain/pretrain.json``
tune          the KerasTuner search of ``train.tune`` (:mod:`kmedtl.training.tuning`) on
              the fold: trials fit on its training part and are scored on its validation
              part (never the test part): ``tuning/best_config.yaml`` (the best trial's
              whole config, as ``kmedtl tune`` writes it; the search's provenance is in
              the stage record), ``tuning/results.csv``,
              ``tuning/results.md``, ``tuning/search/`` (KerasTuner's project, so an
              interrupted search resumes), ``tuning/features/`` (feature cache)
train         :func:`kmedtl.training.run_training` into the run folder (its contract:
              ``config.yaml``, ``splits.json``, ``model.keras``, ``train_metrics.json``,
              ...) on the data the pipeline prepared (once per process; a resumed
              pipeline's split must equal ``data/splits.json``); resumes from ``backup/``
              after an interruption; with ``tune`` in the pipeline it trains the train
              section of ``tuning/best_config.yaml``
evaluate      :func:`kmedtl.evaluation.stage.evaluate_run`: ``metrics.json``,
              ``report.html``, ``model_card.md``, ``plots/``
export        ``kmedtl.export.export_run`` (SavedModel / TFLite / ONNX, parity verified)
push          ``kmedtl.export.push_run`` to ``saved_models/<name>/<version>/`` if blessed
============  =========================================================================

Test hook: ``KMEDTL_PIPELINE_FAIL=<stage>`` raises :class:`SimulatedInterruption` when that
stage starts; ``KMEDTL_PIPELINE_FAIL=train@<epoch>`` raises it after the first batch of
that (0-based) training epoch, i.e. a run killed mid-training.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from kmedtl import export
from kmedtl.data import leakage
from kmedtl.data.audit import public
from kmedtl.data.pipeline import make_dataset
from kmedtl.data.prepare import load_index, prepare
from kmedtl.data.splits import Splits
from kmedtl.errors import ConfigError, KmedtlError
from kmedtl.evaluation.stage import evaluate_run
from kmedtl.pipeline.records import Records, digest, file_sha256
from kmedtl.run_folder import RunFolder
from kmedtl.training import tuning
from kmedtl.training.config import load_run_config, resolved_config
from kmedtl.training.features import materialise
from kmedtl.training.pretrain import pretrain
from kmedtl.training.stage import (
    build_backbone,
    check_tunable,
    run_training,
    tune,
)

log = logging.getLogger("kmedtl.pipeline")

FAIL_ENV = "KMEDTL_PIPELINE_FAIL"


class SimulatedInterruption(RuntimeError):
    """Raised by the ``KMEDTL_PIPELINE_FAIL`` test hook."""


class PipelineStageError(KmedtlError):
    """A stage finished but its result is not acceptable (leaking split, unverified export)."""


@dataclass
class StageOutput:
    result: dict  # JSON-able summary of what the stage did (goes into the record)
    outputs: list = field(default_factory=list)  # paths the stage wrote
    token: str | None = None  # default: a fresh random id


@dataclass
class Context:
    pipe: object  # kmedtl.pipeline.spec.Pipeline
    run_dir: Path
    records: Records
    _prepared: object = None
    _index: object = None

    @property
    def cfg(self):
        return self.pipe.config

    @property
    def folder(self) -> RunFolder:
        """The run folder (a fresh view: stages change its files)."""
        return RunFolder(self.run_dir)

    @property
    def spec(self):
        return self.pipe.spec

    def index(self):
        """``(index, hierarchy)`` of the configured data (cheap: no decoding)."""
        if self._index is None:
            self._index = load_index(self.cfg)
        return self._index

    def prepared(self):
        """:func:`kmedtl.data.prepare.prepare` once per process (audit + cache + split), on
        the index :meth:`index` built when it was built first (one DICOMweb query a run)."""
        if self._prepared is None:
            self._prepared = prepare(self.cfg, indexed=self._index)
        return self._prepared

    def fold(self, splits):
        f = self.spec.fold
        if not 0 <= f < len(splits.folds):
            raise ConfigError(f"{self.pipe.label}: pipeline.fold: {f} but the split has "
                              f"{len(splits.folds)} fold(s) (split.method: "
                              f"{self.cfg.split.method})")
        return splits.folds[f]


def fail_hook(stage: str) -> int | None:
    """The ``KMEDTL_PIPELINE_FAIL`` test hook: raise now, or return the epoch to die in."""
    value = os.environ.get(FAIL_ENV, "").strip()
    if not value:
        return None
    name, _, epoch = value.partition("@")
    if name != stage:
        return None
    if epoch:
        return int(epoch)
    raise SimulatedInterruption(f"{FAIL_ENV}={value}: simulated interruption of stage {stage}")


# ------------------------------------------------------------------------------ audit
def stage_audit(ctx: Context) -> StageOutput:
    fail_hook("audit")
    prep = ctx.prepared()
    report = public(prep.report)
    out = Path(ctx.folder.write_pipeline_audit(report))
    c = report["counts"]
    reasons = Counter(s.get("kind") or s.get("reason") for s in report["skipped"])
    result = {"counts": {k: c.get(k) for k in ("read", "used", "skipped", "samples")},
              "reconciled": c.get("read") == (c.get("used") or 0) + (c.get("skipped") or 0),
              "by_class": c.get("by_class"), "by_source_split": c.get("by_split"),
              "skipped_by_kind": dict(reasons), "summary": report.get("summary"),
              "warnings": report.get("warnings") or [],
              "cache": str(prep.cache.folder) if prep.cache is not None else None,
              # cached = decoded + reused + rebuilt (damaged entries decoded again)
              "cache_counts": {k: v for k, v in prep.cache.summary().items() if k != "folder"}
              if prep.cache is not None else None}
    return StageOutput(result, [out])


# ------------------------------------------------------------------------------ split
def stage_split(ctx: Context) -> StageOutput:
    fail_hook("split")
    prep = ctx.prepared()
    splits = prep.splits
    fold = ctx.fold(splits)
    out = Path(ctx.folder.write_pipeline_splits(splits, root=prep.index.root))
    # --- independent leakage check on the fold used downstream (kmedtl.data.leakage)
    internal = prep.report["_internal"]
    cross = leakage.cross_split(fold, internal, prep.index)
    dedupe = ctx.cfg.split.dedupe
    problems = leakage.leaks(cross, dedupe)
    if problems:
        raise PipelineStageError(f"{out}: the split leaks: {'; '.join(problems)} (split.method "
                                 f"{splits.method}, split.dedupe {dedupe}); please report this")
    assign = fold.assignment()
    label_of = {s.id: prep.hierarchy.leaf_of(s.label) for s in prep.index.samples}
    sizes = {p: dict(sorted(Counter(label_of[i] for i in getattr(fold, p)).items()))
             for p in ("train", "val", "test")}
    # in no part and not dropped (e.g. outside an n_per_class subset): dropped images are
    # counted once, under "dropped"
    dropped_ids = {d["id"] for d in splits.dropped}
    unused = sum(1 for x in prep.index.samples if x.id not in assign and x.id not in dropped_ids)
    dropped = Counter(d.get("reason") for d in splits.dropped)
    result = {"method": splits.method, "seed": splits.seed, "fold": ctx.spec.fold,
              "n_folds": len(splits.folds), "dedupe": dedupe,
              "test_with_similar_neighbour": leakage.similar_neighbours(
                  internal["similar_pairs"], fold,
                  linked_from=ctx.cfg.split.similar_threshold),
              "sizes": {p: sum(v.values()) for p, v in sizes.items()}, "by_class": sizes,
              "dropped": len(splits.dropped), "dropped_by_reason": dict(dropped),
              "unused": unused, "patients": cross["patients"],
              "cross_split": {"exact_duplicate_groups": cross["exact_duplicate_groups"],
                              "near_duplicate_pairs": cross["near_duplicate_pairs"],
                              "similar_content_pairs": cross["similar_content_pairs"],
                              "patients": cross["patients_across"]}}
    return StageOutput(result, [out], token=file_sha256(out))


# ------------------------------------------------------------------------------ pretrain
def _pretrained_weights(ctx: Context) -> Path:
    """The backbone the pretrain stage writes and the tune and train stages start from."""
    return ctx.folder.pretrain_dir / "backbone.weights.h5"


def stage_pretrain(ctx: Context) -> StageOutput:
    fail_hook("pretrain")
    t0 = time.perf_counter()
    p = ctx.spec.pretrain
    prep = ctx.prepared()
    fold = ctx.fold(prep.splits)
    tc = ctx.pipe.train  # the train section, validated once by load_pipeline
    seed = tc.seed if p.seed is None else p.seed
    pool = leakage.pretrain_pool(prep, fold, similar=ctx.cfg.split.dedupe == "similar")
    if p.max_images is not None and len(pool) > p.max_images:
        rng = np.random.default_rng(seed)
        pool = [pool[i] for i in sorted(rng.choice(len(pool), p.max_images, replace=False))]
    if len(pool) < p.min_images:
        raise ConfigError(
            f"{ctx.pipe.label}: pipeline.pretrain: only {len(pool)} image(s) lie outside the "
            f"fold's train/val/test parts without duplicating a val/test image (need "
            f"pipeline.pretrain.min_images = {p.min_images}); keep images out of training "
            "with split.n_per_class, or remove 'pretrain' from pipeline.stages")
    keras.utils.set_random_seed(seed)
    ds = make_dataset(pool, prep.hierarchy, prep.options, cache=prep.cache,
                      batch_size=p.batch_size, targets="leaf", normalization="unit",
                      decoder=ctx.cfg.data.decoder)
    x, y = materialise(ds)
    h = prep.hierarchy
    if p.task == "level1":
        level = h.level_matrix(1)
        y = level[np.asarray(y, int)].argmax(1)
        classes = list(h.levels[0])
    else:
        classes = list(h.leaves)
    out_dir = ctx.folder.pretrain_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    path = _pretrained_weights(ctx)
    supervised = p.method == "supervised"
    history = pretrain(x, np.asarray(y) if supervised else None, method=p.method,
                       backbone=build_backbone(tc, prep.options.shape),
                       classes=classes if supervised else None, path=path, epochs=p.epochs,
                       batch_size=p.batch_size, learning_rate=p.learning_rate,
                       dropout=p.dropout, recalibrate=False).history
    counts = Counter(classes[int(i)] for i in y) if p.method == "supervised" else \
        Counter(h.leaves[int(i)] for i in y)
    info = {"method": p.method, "task": p.task if p.method == "supervised" else None,
            "backbone": tc.backbone, "cut": tc.cut, "start_weights": tc.weights,
            "n_images": len(pool), "by_class": dict(sorted(counts.items())),
            "classes": classes if p.method == "supervised" else None,
            "epochs": p.epochs, "history": {k: [float(v) for v in vs]
                                           for k, vs in history.items()},
            "weights": str(path), "seconds": round(time.perf_counter() - t0, 3)}
    ctx.folder.write_pretrain_record(info)
    result = {k: v for k, v in info.items() if k != "history"}
    result["final"] = {k: vs[-1] for k, vs in info["history"].items() if vs}
    return StageOutput(result, [path, out_dir / "pretrain.json"])


# ------------------------------------------------------------------------------ tune
#: The train fields a search trial sets (:meth:`TransferHyperModel.trial_section`).
SEARCHED_FIELDS = ("backbone", "cut", "strategy", "learning_rate", "lr_multipliers",
                   "dropout", "freeze_below", "freeze_layers", "unfreeze_at", "head_epochs")


def read_best(ctx: Context):
    """The :class:`~kmedtl.training.config.RunConfig` of ``tuning/best_config.yaml``,
    validated; a missing or broken file names itself and the remedy."""
    path = ctx.folder.tuning_best_config_path  # the one tuning artefact
    try:
        return load_run_config(path)
    except KmedtlError as exc:
        raise PipelineStageError(
            f"{path}: the train stage of a pipeline with a 'tune' stage trains the search's "
            f"best hyperparameters, but this file is missing or invalid ({exc}); rerun the "
            "search with --force tune") from None


def read_search(ctx: Context) -> dict:
    """What the tune stage's record says the search chose (objective, trial, score,
    hyperparameters, ...): the provenance the train stage and the summary report."""
    rec = ctx.records.read("tune") or {}
    result = rec.get("result") if rec.get("status") == "done" else None
    if not isinstance(result, dict):
        raise PipelineStageError(f"{ctx.records.path('tune')}: the tune stage has no finished "
                                 "record; rerun the search with --force tune")
    return result


def _ids_digest(samples) -> str:
    return digest(sorted(s.id for s in samples))


def _clear_tuning(tdir: Path, keep=("features",)) -> None:
    """Start a search afresh: drop a previous search's files (the feature cache, keyed by
    backbone weights and data, stays)."""
    if not tdir.is_dir():
        return
    for p in tdir.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def stage_tune(ctx: Context, *, resume: bool = False) -> StageOutput:
    """The ``train.tune`` search on the fold's training (fit) and validation (objective)
    parts; ``resume`` continues an interrupted search of the same inputs (KerasTuner
    reloads its oracle from ``tuning/search/``)."""
    fail_hook("tune")
    t0 = time.perf_counter()
    label = ctx.pipe.label
    cfg = train_config(ctx, tuned=False)  # with the pretrained backbone, if any
    tc = cfg.train
    check_tunable(tc)
    if tuning.distributed_role() == "worker":
        raise ConfigError(
            f"{label}: pipeline.stages: the 'tune' stage runs a single-process search, but "
            "KERASTUNER_TUNER_ID / KERASTUNER_ORACLE_IP make this process a KerasTuner "
            "worker; unset them, or run a distributed search with `kmedtl tune`")
    tuning.preflight()
    prep = ctx.prepared()
    fold = ctx.fold(prep.splits)
    f = ctx.spec.fold
    train_samples, val_samples = prep.samples("train", f), prep.samples("val", f)
    if not val_samples:
        raise ConfigError(
            f"{label}: split: the 'tune' stage scores trials on the validation part, but "
            f"fold {f} has none (split.val: {ctx.cfg.split.val}); set split.val > 0 (the test "
            "part is never used for the search), or remove 'tune' from pipeline.stages")
    test_ids = set(fold.test)
    if test_ids & {s.id for s in train_samples + val_samples}:  # never: the split is checked
        raise PipelineStageError(f"{label}: fold {f}: test images in the training or "
                                 "validation part; please report this")
    tdir = ctx.folder.tuning_dir
    if not resume:
        _clear_tuning(tdir)
    tdir.mkdir(parents=True, exist_ok=True)
    # the one tuning operation (kmedtl.training.stage.tune), as `kmedtl tune` runs it
    tuned = tune(cfg, prep, directory=tdir, fold=f, overwrite=not resume,
                 feature_dir=ctx.folder.tuning_features_dir,
                 verbose=0 if tc.verbose == 0 else 1)
    result, rows, final = tuned.result, tuned.result.rows, tuned.section
    statuses = Counter(r["status"] for r in rows)
    chosen = {k: getattr(final, k) for k in SEARCHED_FIELDS
              if k != "head_epochs" or final.strategy == "fine_tune"}
    changed = {k: {"config": getattr(tc, k), "search": v} for k, v in chosen.items()
               if getattr(tc, k) != v}
    doc = {"objective": result.objective, "direction": result.direction,
           "best_trial": tuned.trial_id, "best_score": tuned.score,
           "hyperparameters": tuned.hyperparameters,
           "from_search": chosen, "changed": changed,
           "train": final.model_dump(mode="json"),
           "trial_train": tuned.as_searched.model_dump(mode="json"),
           "search": {"tuner": tc.tune.tuner, "max_trials": tc.tune.max_trials,
                      "trial_epochs": tuned.trial_epochs, "train_epochs": tc.epochs,
                      "trials": len(rows), "by_status": dict(statuses),
                      "resumed": resume},
           "data": {"fold": f, "n_train": len(train_samples), "n_val": len(val_samples),
                    "n_test_held_out": len(fold.test),
                    "train_ids": _ids_digest(train_samples),
                    "val_ids": _ids_digest(val_samples)},
           "seconds": round(time.perf_counter() - t0, 3)}
    # the one tuning artefact: the best trial's whole config, loadable by `kmedtl train`
    # (as `kmedtl tune` writes it); what the search did goes into the stage record
    out = Path(ctx.folder.write_best_config(
        resolved_config(cfg.derive(label, train=final), prep.hierarchy)))
    doc["top"] = [{k: v for k, v in r.items() if k != "error" or v} for r in rows[:5]]
    outputs = [out, *(Path(p) for p in result.files.values())]
    # the token is what training will use: a rerun picking the same section keeps the model
    return StageOutput(doc, outputs, token=digest(doc["train"]))


# ------------------------------------------------------------------------------ train
def train_config(ctx: Context, *, tuned: bool = True):
    """The :class:`~kmedtl.training.config.RunConfig` training sees: the pipeline's, with
    the train section of ``tuning/best_config.yaml`` when the pipeline tunes (and ``tuned``), and
    ``train.weights`` = the pretrained backbone when the pipeline pretrains (derived and
    validated again, never edited in place)."""
    update: dict = {}
    if tuned and "tune" in ctx.spec.stages:
        update.update(read_best(ctx).train.model_dump())
        update["verbose"] = ctx.pipe.train.verbose  # verbosity does not rerun the search
    if "pretrain" in ctx.spec.stages:
        update["weights"] = str(_pretrained_weights(ctx))
    return ctx.cfg.derive(ctx.pipe.label, train=update) if update else ctx.cfg


class _DieAt:
    """Keras callback for the ``train@<epoch>`` test hook."""

    @staticmethod
    def make(epoch: int):
        class DieAt(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.current = -1

            def on_epoch_begin(self, e, logs=None):
                self.current = e

            def on_train_batch_end(self, batch, logs=None):
                if self.current == epoch:
                    raise SimulatedInterruption(
                        f"{FAIL_ENV}=train@{epoch}: simulated interruption in epoch {epoch}")

        return DieAt()


def same_fold(splits: Splits, path: Path, root, fold: int) -> bool:
    """Whether fold ``fold`` of ``splits`` is the one in the split file ``path``.

    Both sides are compared as the file stores them (ids relative to ``root``), so ids
    that are spelled differently but name the same file compare equal."""
    written = Splits.load(path, root=root).stored(root)["folds"]
    return fold < len(written) and splits.stored(root)["folds"][fold] == written[fold]


def stage_train(ctx: Context, *, resume: bool) -> StageOutput:
    die_at = fail_hook("train")
    callbacks = [_DieAt.make(die_at)] if die_at is not None else []
    run = ctx.run_dir
    if not resume:  # a different config's half-finished run must not be resumed
        shutil.rmtree(run / "backup", ignore_errors=True)
    cfg = train_config(ctx)  # the tune and pretrain stages change only its train section
    # Training gets the data this process prepared (once: the split stage's, when it ran
    # here).  A resumed pipeline prepares it afresh, so check it against the split file
    # the split stage wrote before spending any time on training.
    prep = ctx.prepared()
    ctx.fold(prep.splits)  # an out-of-range pipeline.fold is a ConfigError, named
    written = ctx.folder.pipeline_splits_path
    if not same_fold(prep.splits, written, prep.index.root, ctx.spec.fold):
        raise PipelineStageError(f"{written}: the split stage wrote a different split than "
                                 "the data gives now (the data changed while the pipeline "
                                 "ran?); rerun with --force split")
    run_training(cfg, run, overwrite=not resume, label=ctx.pipe.label, callbacks=callbacks,
                 fold=ctx.spec.fold, prepared=prep)
    rf = ctx.folder  # a fresh view: training wrote its files
    m = rf.train_metrics
    keep = ("model", "backbone", "cut", "fold", "n_train", "n_val", "n_test", "monitor",
            "best_epoch", "best_value", "stopped_early", "resumed_from_epoch", "val_metrics",
            "train_metrics", "timings", "jit_compile", "precision", "backend")
    out = {k: m.get(k) for k in keep if k in m}
    out["epochs_run"] = len(m["epochs"]) if isinstance(m.get("epochs"), list) else m.get("epochs")
    out["weights"] = cfg.train.weights
    if "tune" in ctx.spec.stages:  # which hyperparameters came from the search
        best = read_search(ctx)
        tuned = {"source": f"{RunFolder.TUNING_DIR}/{RunFolder.TUNING_BEST_CONFIG}",
                 "objective": best.get("objective"), "best_trial": best.get("best_trial"),
                 "best_score": best.get("best_score"),
                 "hyperparameters": best.get("hyperparameters"),
                 "from_search": best.get("from_search"), "changed": best.get("changed")}
        out["tuned"] = tuned
        m["tuned"] = tuned
        rf.write_train_metrics(m)
    outputs = [rf.model_path, rf.train_metrics_path, rf.config_path, rf.splits_path,
               rf.history_path]
    return StageOutput(out, outputs)


# ------------------------------------------------------------------------------ evaluate
def stage_evaluate(ctx: Context) -> StageOutput:
    fail_hook("evaluate")
    e = ctx.spec.evaluate
    doc = evaluate_run(ctx.run_dir, fold=ctx.spec.fold, indexed=ctx.index(), **e.model_dump())
    binary = doc.get("binary") or {}
    result = {"n_test": doc.get("n_test"), "headline": doc.get("headline"),
              "bootstrap": doc.get("bootstrap"),
              "binary": {k: binary.get(k) for k in ("negative", "auroc", "threshold",
                                                    "at_threshold")} if binary else None,
              "hierarchical": {k: (doc.get("hierarchical") or {}).get(k)
                               for k in ("f1", "inconsistency_rate")}
              if doc.get("hierarchical") else None,
              "leaf_f1": {c: v.get("f1") for c, v in
                          doc["tasks"]["leaf"]["per_class"].items()} if doc.get("tasks") else None,
              "skipped": len(doc.get("test", {}).get("skipped") or []),
              "tta": doc.get("tta")}
    if doc.get("internal_vs_external"):
        ext = doc.get("external") or {}
        result["internal_vs_external"] = [
            {**r, "removed": _removed_text(ext.get(r["set"].split(": ", 1)[-1]))}
            for r in doc["internal_vs_external"]]
        result["external"] = {k: {"source": v["source"], "n": v["n"], "dir": v["dir"],
                                  "removed": v.get("removed_as_training_lookalikes")}
                              for k, v in ext.items()}
    rf = ctx.folder
    outputs = [rf.metrics_path, rf.file(RunFolder.REPORT), rf.file(RunFolder.MODEL_CARD_MD)]
    return StageOutput(result, outputs)


def _removed_text(ext) -> str:
    rm = (ext or {}).get("removed_as_training_lookalikes")
    if not rm:
        return ""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rm["by_reason"].items()))
    return f"{rm['count']} of {rm['of']}" + (f" ({reasons})" if reasons else "")


# ------------------------------------------------------------------------------ export
def _to_dict(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return dict(vars(obj)) if hasattr(obj, "__dict__") else obj


def stage_export(ctx: Context) -> StageOutput:
    fail_hook("export")
    x = ctx.spec.export
    out_dir = os.path.abspath(x.out_dir) if x.out_dir else None
    report = export.export_run(ctx.run_dir, formats=tuple(x.formats), out_dir=out_dir,
                            verify=x.verify, tflite_variants=tuple(x.tflite_variants),
                            opset=x.opset, representative_samples=x.representative_samples,
                            quantized_gate=x.quantized_gate, indexed=ctx.index())
    doc = _to_dict(report)
    verified = bool(getattr(report, "verified", False))
    where = getattr(report, "out_dir", out_dir)
    d = doc if isinstance(doc, dict) else {}
    result = {"verified": verified, "out_dir": str(where) if where else None,
              "formats": _formats(doc), "failures": d.get("failures"),
              "warnings": d.get("warnings") or [],
              "quantized_gate": d.get("quantized_gate", x.quantized_gate),
              "int8_representative": d.get("int8_representative")}
    if not result["formats"]:  # an unfamiliar report layout: keep all of it
        result["report"] = doc
    if x.verify and x.require_verified and not verified:
        report_path = ctx.folder.stages_dir / "export_report.json"
        if where:
            ctx.folder.write_json(f"{RunFolder.STAGES_DIR}/export_report.json", doc, strict=False,
                                  default=str)
        failures = "; ".join(d.get("failures") or []) or "see the report"
        raise PipelineStageError(
            f"{where or ctx.run_dir}: the exported model failed verification: {failures} "
            f"(report: {report_path}). To go on without a verified export, set "
            "pipeline.export.require_verified: false")
    return StageOutput(result, [where] if where else [])


_PARITY_KEYS = ("kind", "max_abs_diff", "agreement", "bound", "passed", "status", "n",
                "n_independent", "ci", "confidence", "gate", "accuracy_delta", "n_accuracy")


def _formats(doc) -> dict:
    """Per exported format: path, size, accuracy and the parity numbers (n compared,
    agreement and its CI for quantised variants, bound, status)."""
    out = {}
    formats = doc.get("formats") if isinstance(doc, dict) else None
    for name, f in (formats or {}).items():
        if not isinstance(f, dict):
            continue
        parity = f.get("parity") if isinstance(f.get("parity"), dict) else None
        out[name] = {"path": f.get("path"), "size_bytes": f.get("size_bytes"),
                     "accuracy": f.get("accuracy"),
                     "parity": {k: parity.get(k) for k in _PARITY_KEYS}
                     if parity else None}
    return out


# ------------------------------------------------------------------------------ push
def stage_push(ctx: Context) -> StageOutput:
    fail_hook("push")
    p = ctx.spec.push
    res = export.push_run(ctx.run_dir, root=os.path.abspath(p.root), name=p.name or ctx.cfg.name,
                       thresholds=p.thresholds, metric=p.metric)
    doc = _to_dict(res)
    path = getattr(res, "path", None)
    result = {"pushed": bool(getattr(res, "pushed", False)),
              "version": getattr(res, "version", None),
              "path": str(path) if path else None, "reason": getattr(res, "reason", None),
              "blessing": _jsonable(getattr(res, "blessing", None))}
    if result["blessing"] is None:
        result["report"] = doc
    outputs = [path] if path and getattr(res, "pushed", False) else []
    return StageOutput(result, outputs)


def _jsonable(obj):
    try:
        json.dumps(obj, default=str)
        return obj
    except (TypeError, ValueError):
        return str(obj)


STAGE_FUNCS = {"audit": stage_audit, "split": stage_split, "pretrain": stage_pretrain,
               "tune": stage_tune, "train": stage_train, "evaluate": stage_evaluate,
               "export": stage_export, "push": stage_push}
