"""Run a pipeline end to end, resuming what a previous run left.

:func:`run_pipeline` walks the stages of ``pipeline.stages`` in order.  For each it
computes the fingerprint (:mod:`kmedtl.pipeline.records`) and skips the stage when its record
says ``done`` with the same fingerprint and its outputs are still there; otherwise it
runs it.  Tokens chain the stages, so a stage that reruns makes everything downstream of
it rerun, and nothing upstream.  ``train`` interrupted mid-way (record ``running``,
``failed`` or ``interrupted`` with the same fingerprint, ``backup/state.json`` present)
resumes from the trainer's BackupAndRestore state instead of starting over; ``tune``
likewise continues its KerasTuner search (``tuning/search/oracle.json``).

Every call ends by writing ``summary.md`` and ``summary.json`` (also when a stage fails:
then the summary says which, and the exception propagates).

A call holds the run folder's one-writer lock (:func:`kmedtl.ownership.run_lock`) from
start to end: a second ``kmedtl run`` (or ``train``, ``evaluate``, ``export``) on the same
folder stops at once with :class:`~kmedtl.ownership.RunFolderBusyError` (exit code 2)
naming this process's PID.

:func:`run_folds` (``kmedtl run PIPELINE --folds all``, or ``--folds 0,2``) runs the
pipeline once per cross-validation fold (``split.method: kfold`` or ``repeated``), each in
its own run folder ``<run>/folds/fold_<k>/`` (resumable as any run), up to the
``evaluate`` stage, and writes ``<run>/folds/folds.json``: every fold's metrics and the
mean +- sd of each over the folds (:func:`kmedtl.evaluation.evaluate.summarise_metrics`).
"""

from __future__ import annotations

import copy
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kmedtl.data.splits import Splits
from kmedtl.errors import ConfigError
from kmedtl.evaluation.evaluate import flat_values, summarise_metrics
from kmedtl.evaluation.uncertainty import format_mean_sd
from kmedtl.jsonio import atomic_write, write_json
from kmedtl.ownership import run_lock
from kmedtl.pipeline import records as R
from kmedtl.pipeline.spec import STAGES, Pipeline, load_pipeline
from kmedtl.pipeline.stages import STAGE_FUNCS, Context, SimulatedInterruption
from kmedtl.pipeline.summary import write_summary
from kmedtl.run_folder import RunFolder

log = logging.getLogger("kmedtl.pipeline")

#: Stages that continue an interrupted attempt of the same inputs, and the file (in the run
#: folder) that holds the state they continue from.
_RESUMABLE = {"train": "backup/state.json", "tune": "tuning/search/oracle.json"}


@dataclass
class PipelineResult:
    run_dir: Path
    stages: list  # the stages of this call, in order
    ran: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    resumed: list = field(default_factory=list)  # ran, continuing an interrupted attempt
    records: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def summary_md(self) -> Path:
        return self.run_dir / "summary.md"


def run_folder(pipe: Pipeline, run_dir=None) -> Path:
    return Path(run_dir) if run_dir else Path(pipe.config.output_dir) / pipe.config.name


def _select(pipe: Pipeline, force, until) -> tuple[list, set]:
    stages = list(pipe.spec.stages)
    if until is not None:
        if until not in stages:
            raise ConfigError(f"--until {until}: not a stage of this pipeline; its stages are "
                              f"{stages}")
        stages = stages[:stages.index(until) + 1]
    forced: set = set()
    for name in force or ():
        if name == "all":
            forced.update(stages)
            continue
        if name not in STAGES:
            raise ConfigError(f"--force {name}: unknown stage; stages are {list(STAGES)} or all")
        if name not in pipe.spec.stages:
            raise ConfigError(f"--force {name}: not a stage of this pipeline "
                              f"({pipe.spec.stages})")
        if name in stages:  # the stage and everything after it
            forced.update(stages[stages.index(name):])
    return stages, forced


def run_pipeline(source, *, run_dir=None, force=(), until: str | None = None,
                 overrides: dict | None = None) -> PipelineResult:
    """Run (or resume) a pipeline; see the module docstring.

    Args:
        source: a pipeline YAML path, a mapping, or a loaded
            :class:`~kmedtl.pipeline.spec.Pipeline`.
        run_dir: the run folder (default ``<output_dir>/<name>``).
        force: stage names (or ``"all"``) to rerun with everything after them, even when
            their fingerprints match.
        until: stop after this stage (the summary covers what ran).
        overrides: a nested mapping merged into the YAML before validation (as
            ``kmedtl run --set key=value``).
    """
    pipe = load_pipeline(source, overrides)
    stages, forced = _select(pipe, force, until)
    run = run_folder(pipe, run_dir)
    # one writer per run folder: a second `kmedtl run` (or train/evaluate/export) on it
    # stops here, naming this process (kmedtl.ownership; released however this one ends)
    with run_lock(run, f"kmedtl run {pipe.label}"):
        return _run_locked(pipe, stages, forced, run)


def _run_locked(pipe: Pipeline, stages, forced, run: Path) -> PipelineResult:
    recs = R.Records(run)
    ctx = Context(pipe, run, recs)
    _write_resolved(run, pipe)
    res = PipelineResult(run, stages)
    tokens: dict = {}
    listing = None
    try:
        for stage in stages:
            if stage == "audit":
                index, _ = ctx.index()
                listing = R.data_listing(index)
            inputs = R.stage_inputs(stage, pipe, listing)
            up = {u: tokens[u] for u in R.UPSTREAM[stage] if u in pipe.spec.stages}
            missing_up = [u for u, t in up.items() if t is None]
            if missing_up:  # upstream not run in this call (cannot happen with REQUIRES)
                raise ConfigError(f"stage {stage}: upstream {missing_up} has not run")
            fp = R.fingerprint(stage, inputs, up)
            rec = recs.read(stage)
            reason = _why_run(stage, rec, fp, forced, recs)
            if reason is None:
                log.info("stage %s: up to date (fingerprint %s), skipped", stage, fp[:12])
                tokens[stage] = rec["token"]
                res.skipped.append(stage)
                res.records[stage] = rec
                continue
            resume = (stage in _RESUMABLE and rec is not None and rec.get("fingerprint") == fp
                      and rec.get("status") in ("running", "failed", "interrupted")
                      and (run / _RESUMABLE[stage]).is_file())
            log.info("stage %s: running (%s)", stage, "resuming" if resume else reason)
            res.records[stage] = _run_stage(ctx, stage, fp, up, inputs, rec, reason, resume)
            tokens[stage] = res.records[stage]["token"]
            res.ran.append(stage)
            if resume:
                res.resumed.append(stage)
    except BaseException:
        try:  # say which stage failed; never hide the stage's own error
            res.summary = write_summary(ctx, stages, _with_records(res, recs))
        except Exception as exc:  # pragma: no cover - a summary bug on top of a failure
            log.warning("could not write the summary: %s", exc)
        raise
    res.summary = write_summary(ctx, stages, _with_records(res, recs))
    return res


def _with_records(res: PipelineResult, recs) -> PipelineResult:
    for stage in res.stages:
        if stage not in res.records:
            r = recs.read(stage)
            if r is not None:
                res.records[stage] = r
    return res


def _why_run(stage, rec, fp, forced, recs) -> str | None:
    if stage in forced:
        return "forced"
    if rec is None:
        return "no record"
    if rec.get("status") != "done":
        return f"last attempt {rec.get('status')}"
    if rec.get("fingerprint") != fp:
        return "inputs changed"
    gone = recs.missing_outputs(rec)
    if gone:
        return f"outputs missing or changed: {gone[:3]}"
    return None


def _run_stage(ctx: Context, stage, fp, up, inputs, rec, reason, resume) -> dict:
    recs = ctx.records
    attempts = int(rec.get("attempts", 0)) + 1 if rec and rec.get("fingerprint") == fp else 1
    started = R.now()
    base = {"fingerprint": fp, "upstream": up, "inputs": inputs, "started": started,
            "attempts": attempts, "reason": reason, "resumed": resume}
    recs.write(stage, {**base, "status": "running"})
    t0, c0 = time.perf_counter(), _cpu()
    try:
        fn = STAGE_FUNCS[stage]
        out = fn(ctx, resume=resume) if stage in _RESUMABLE else fn(ctx)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SimulatedInterruption)) \
            else "failed"
        recs.write(stage, {**base, "status": status, "finished": R.now(),
                           "seconds": round(time.perf_counter() - t0, 3),
                           "cpu_seconds": round(_cpu() - c0, 3),
                           "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc(limit=8)})
        raise
    secs = round(time.perf_counter() - t0, 3)
    record = {**base, "status": "done", "finished": R.now(), "seconds": secs,
              "cpu_seconds": round(_cpu() - c0, 3),
              "token": out.token or R.new_token(),
              "outputs": recs.describe(p for p in out.outputs if p),
              "result": out.result}
    recs.write(stage, record)
    return recs.read(stage) or record


def _cpu() -> float:
    """CPU seconds of this process (all threads) and its finished children: on a shared
    machine, wall time / CPU time shows how much the stage waited for cores."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _write_resolved(run: Path, pipe: Pipeline) -> None:
    def write(fh):
        fh.write(f"# the resolved pipeline ({pipe.label}) as this run folder last ran it\n")
        yaml.safe_dump(pipe.to_dict(), fh, sort_keys=False)

    atomic_write(run / "pipeline.yaml", write)


# ---------------------------------------------------------------------------- folds
#: Where :func:`run_folds` writes, inside the pipeline's run folder.
FOLDS_DIR = "folds"
FOLDS_JSON = "folds.json"
#: The last stage a fold runs: export and push ship one model, which a fold's is not.
FOLDS_UNTIL = "evaluate"


@dataclass
class FoldsResult:
    folds_dir: Path  # <run>/folds
    folds: list  # the fold numbers run, in order
    results: dict = field(default_factory=dict)  # fold -> PipelineResult
    aggregate: dict = field(default_factory=dict)  # the body of folds.json

    @property
    def json_path(self) -> Path:
        return self.folds_dir / FOLDS_JSON


def fold_count(pipe: Pipeline) -> int:
    """How many folds the pipeline's split has: ``split.k`` (kfold), ``split.repeats``
    (repeated), the folds of ``split.file``, else 1 (holdout, source)."""
    s = pipe.config.split
    if s.file:
        path = Path(s.file)
        if not path.is_file():
            raise ConfigError(f"split.file: {path}: file not found")
        return len(Splits.load(path).folds)
    return {"kfold": s.k, "repeated": s.repeats}.get(s.method, 1)


def parse_folds(value: str, n: int, label: str = "--folds") -> list[int]:
    """``"all"`` -> ``[0, ..., n-1]``; ``"0,2"`` -> ``[0, 2]`` (each checked against ``n``)."""
    text = str(value).strip()
    if text == "all":
        return list(range(n))
    try:
        folds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"{label} {value}: give 'all' or fold numbers separated by commas, "
                          "e.g. --folds 0,2") from None
    bad = [f for f in folds if not 0 <= f < n]
    if not folds or bad:
        raise ConfigError(f"{label} {value}: the split has {n} fold(s), numbered 0 to {n - 1}"
                          + (f"; {bad} are not among them" if bad else ""))
    if len(set(folds)) != len(folds):
        raise ConfigError(f"{label} {value}: a fold is listed twice")
    return folds


def run_folds(source, folds: str = "all", *, run_dir=None, force=(),
              overrides: dict | None = None) -> FoldsResult:
    """Run the pipeline on each fold in ``folds`` (``"all"`` or ``"0,2"``), each in
    ``<run>/folds/fold_<k>/`` and up to ``evaluate``, then write ``folds.json`` (see the
    module docstring and :func:`aggregate_folds`).  ``run_dir``, ``force`` and
    ``overrides`` are :func:`run_pipeline`'s; finished folds are reused as any run's
    stages are."""
    overrides = copy.deepcopy(overrides or {})
    if not isinstance(overrides.get("pipeline", {}), dict):
        raise ConfigError("--set pipeline=...: with --folds, set pipeline fields one by one "
                          "(--set pipeline.evaluate.n_boot=200)")
    if "fold" in overrides.get("pipeline", {}):
        raise ConfigError("--set pipeline.fold: --folds chooses the folds; drop one of them")
    pipe = load_pipeline(source, overrides)
    n = fold_count(pipe)
    if n < 2:
        raise ConfigError(f"--folds: split.method {pipe.config.split.method!r} makes one fold; "
                          "mean +- sd over folds needs split.method: kfold (split.k) or "
                          "repeated (split.repeats)")
    chosen = parse_folds(folds, n)
    if FOLDS_UNTIL not in pipe.spec.stages:
        raise ConfigError(f"--folds: pipeline.stages {pipe.spec.stages} has no 'evaluate'; "
                          "the folds are compared on their metrics.json, so add it")
    later = [st for st in pipe.spec.stages if STAGES.index(st) > STAGES.index(FOLDS_UNTIL)]
    if later:
        log.warning("--folds: every fold stops after %s; %s not run (they ship one model: "
                    "run without --folds for that)", FOLDS_UNTIL, later)
    folds_dir = run_folder(pipe, run_dir) / FOLDS_DIR
    res = FoldsResult(folds_dir, chosen)
    # one writer of the folds folder (each fold's run folder has its own lock too)
    with run_lock(folds_dir, f"kmedtl run {pipe.label} --folds {folds}"):
        for k in chosen:
            over = copy.deepcopy(overrides)
            over.setdefault("pipeline", {})["fold"] = k
            log.info("--folds: fold %d (%d of %d)", k, chosen.index(k) + 1, len(chosen))
            res.results[k] = run_pipeline(source, run_dir=folds_dir / f"fold_{k}", force=force,
                                          until=FOLDS_UNTIL, overrides=over)
        res.aggregate = aggregate_folds({k: folds_dir / f"fold_{k}" for k in chosen},
                                        label=pipe.label, split=pipe.config.split, n_folds=n)
        write_json(res.json_path, res.aggregate)
    return res


def aggregate_folds(fold_dirs: dict, *, label: str = "pipeline", split=None,
                    n_folds: int | None = None) -> dict:
    """The body of ``folds.json`` from ``{fold: run folder}``: each fold's metrics (every
    interval value of its ``metrics.json``, :func:`~kmedtl.evaluation.evaluate.flat_values`)
    and ``summary``: ``{metric: {"mean", "sd" (sample sd, ddof=1), "n", "values"}}``."""
    rows, docs = [], []
    for k, path in fold_dirs.items():
        doc = RunFolder(path).metrics
        if doc is None:
            raise ConfigError(f"{path}: fold {k} has no metrics.json; rerun it "
                              "(kmedtl run ... --folds) or run its evaluate stage")
        docs.append(doc)
        rows.append({"fold": k, "run_dir": Path(path).name, "n_test": doc.get("n_test"),
                     "metrics": flat_values(doc)})
    out = {"kind": "kmedtl-folds", "version": 1, "pipeline": label,
           "folds": list(fold_dirs), "n_folds": n_folds, "per_fold": rows,
           "summary": summarise_metrics(docs)}
    if split is not None:
        out["split"] = {"method": split.method, "k": split.k, "repeats": split.repeats,
                        "seed": split.seed}
    return out


def format_folds(agg: dict, prefix: str = "headline/") -> str:
    """A plain-text table of the metrics under ``prefix`` (default the headline ones):
    one column per fold, then mean +- sd."""
    names = [m for m in agg["summary"] if m.startswith(prefix)] or list(agg["summary"])
    folds = [r["fold"] for r in agg["per_fold"]]
    head = ["metric", *[f"fold {k}" for k in folds], "mean \u00b1 sd"]
    body = []
    for m in names:
        vals = [r["metrics"].get(m) for r in agg["per_fold"]]
        body.append([m.removeprefix(prefix),
                     *["n/a" if v is None else f"{v:.3f}" for v in vals],
                     format_mean_sd(agg["summary"][m])])
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [head, *body])
