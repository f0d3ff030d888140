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
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kmedtl.errors import ConfigError
from kmedtl.ownership import run_lock
from kmedtl.pipeline import records as R
from kmedtl.pipeline.spec import STAGES, Pipeline, load_pipeline
from kmedtl.pipeline.stages import STAGE_FUNCS, Context, SimulatedInterruption
from kmedtl.pipeline.summary import write_summary

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
    tmp = run / "pipeline.yaml.tmp"
    with open(tmp, "w") as fh:
        fh.write(f"# the resolved pipeline ({pipe.label}) as this run folder last ran it\n")
        yaml.safe_dump(pipe.to_dict(), fh, sort_keys=False)
    tmp.replace(run / "pipeline.yaml")
