"""The grid runner: arms x N per class x seeds, one JSON row per finished cell.

Layout of the output folder (default ``runs/study``)::

    runs/study/
      split.json              the duplicate-free split: counts, test labels, fingerprint
      pretrain/<key>.weights.h5, <key>.json   same-domain pretrained backbones
      cells/<key>.json        one finished cell: arm recipe, N, seed, test-set metrics with
                              bootstrap CIs, test probabilities, timings
      cells/<key>.error.json  a cell that raised (retried on the next run)
      status.json             planned / done / not-run cells of the last run, and its
                              memory (worker processes, peak RSS, RSS after each cell)
      log.txt                 (when started with nohup ... > log.txt)

A cell's key is a digest of everything that determines its result (split fingerprint,
resolved training recipe, initialisation incl. the pretraining recipe and pool, N, seed),
so identical cells of different comparisons are trained once and shared, and a rerun with
``--resume`` skips every cell already in ``cells/``.  Cells run in the order N (small
first), seed, comparison, arm, so a run stopped by its time budget leaves complete,
paired columns for the smaller N.

Cells in worker processes (``--cells-per-process K``, default 8)
-----------------------------------------------------------------
A long study used to train every cell in one process, and that process grows by a few
hundred MB per cell even with ``keras.utils.clear_session(free_memory=True)`` (TensorFlow
and the allocator keep what a fine-tune touched: a 160 px EfficientNet-Lite0 study was
OOM-killed at 17 GB RSS after 31 cells).  So :meth:`StudyRunner.run` trains the cells in a
*worker* process that is replaced by a fresh one after every K cells: the memory a worker
gathers goes back to the system when it exits.  Each worker (started with ``spawn``, never
``fork``: the parent has TensorFlow's threads running) builds its own ``StudyRunner`` from
the same study configs and output folder, loads the split once (from the on-disk cache),
and runs each cell it is sent through :meth:`StudyRunner.run_cell` -- the same function the
in-process mode (K = 0) calls, so both write identical cell and error files.  The worker's
log records are sent back to the parent and logged there, so the log reads as before.

A worker that dies in a cell (killed by the kernel's OOM killer, a segfault) does not end
the study: the cell gets ``cells/<key>.error.json`` naming the exit signal and the remedy
(a lower ``--cells-per-process``), a fresh worker is started and the study goes on; the
failed cell is retried on the next ``--resume``.  ``status.json`` records the mode, the
workers started and lost, the peak RSS of the parent and of the workers, and each cell's
RSS after it ran (``memory``).  K = 0 trains in the calling process as before (cheapest for
tiny studies and debugging; its memory grows over the run).

Cells on a Dask cluster (``--executor dask --scheduler HOST:PORT``)
--------------------------------------------------------------------
:mod:`kmedtl.study.dask_executor` sends each cell to a Dask worker, which trains it in a
worker process of its own as above (into a private folder) and returns what it wrote; this
process writes every file of the output folder (:meth:`StudyRunner.finish_cell`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import platform
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from logging.handlers import QueueHandler
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kmedtl.data.scan import detached_main
from kmedtl.errors import ConfigError, KmedtlError
from kmedtl.jsonio import atomic_write
from kmedtl.study import training as study_training  # looked up per call (patchable there)
from kmedtl.study.config import StudyConfig
from kmedtl.study.data import load_split
from kmedtl.study.stats import cell_metrics

try:
    import resource
except ImportError:  # Windows
    resource = None

log = logging.getLogger("kmedtl.study")

# Cells per worker process of ``StudyRunner.run`` (``--cells-per-process``), from
# benchmarks/study_memory.py (benchmarks/README.md, "Study memory"): in one process RSS
# grew by ~160 MB per tiny 64 px Lite0 cell there and by ~450 MB per real 160 px cell
# (OOM-killed at 17 GB after 31 cells), while starting a worker (spawn, import TensorFlow,
# load the cached 160 px split) takes ~15 s on two loaded cores against 20-500 s per real
# cell.  With 8, a worker stays within a few GB for ~3% more run time.
CELLS_PER_PROCESS = 8


def _str_keys(obj):
    if isinstance(obj, dict):
        return {str(k): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_str_keys(v) for v in obj]
    return obj


def _key(obj) -> str:
    text = json.dumps(_str_keys(obj), sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda fh: json.dump(data, fh, indent=1, default=_default))


def _default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


@dataclass
class Cell:
    study: str
    arm: str
    n: object
    seed: int
    key: str
    recipe: dict
    init: str
    pretrain_key: str | None = None
    n_folds: int = 2
    skip_reason: str | None = None  # not applicable (never run)
    shared_with: list = field(default_factory=list)


def hardware() -> dict:
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "backend": keras.backend.backend(),
            "gpus": len(tf.config.list_physical_devices("GPU"))}


class StudyRunner:
    """Plan and run the cells of one or more studies (comparisons) on one shared split."""

    def __init__(self, studies: list[StudyConfig], out="runs/study"):
        if not studies:
            raise ConfigError("give at least one study file")
        d0 = studies[0].data.model_dump()
        for s in studies[1:]:
            if s.data.model_dump() != d0:
                raise ConfigError(f"{s.source}: data: differs from {studies[0].source}; "
                                  "studies run together must share one split")
        self.studies = studies
        self.out = Path(out)
        self.split = None
        self._other: dict = {}  # other datasets' splits (cross-domain pretraining), by spec

    # ------------------------------------------------------------------ planning
    def load(self, write: bool = True):
        """Load the split once (``write``: also write ``split.json``; a worker process
        loads the split its parent has already written)."""
        if self.split is None:
            self.split = load_split(self.studies[0].data)
            if not write:
                return self.split
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / "split.json", {
                "kind": "kmedtl-study-split", "fingerprint": self.split.fingerprint,
                "summary": self.split.summary, "leaves": list(self.split.hierarchy.leaves),
                "y_test": self.split.y_test.tolist(),
                "test_ids": [os.path.relpath(self.split.ids[i], self.studies[0].data.root)
                             for i in self.split.test_rows]})
        return self.split

    def _pool(self, spec=None, seed: int | None = None):
        sizes = {str(n): n for s in self.studies for n in s.grid.sizes}
        if spec is not None and spec.pool == "per_seed":
            seeds = [seed]
        else:
            seeds = sorted({x for s in self.studies for x in s.grid.seeds})
        return self.split.pretrain_pool(list(sizes.values()), seeds)

    def pretrain_key(self, study: StudyConfig, name: str, seed: int) -> str:
        spec_obj = study.pretrain[name]
        spec = spec_obj.model_dump()
        if spec["pool"] == "shared":  # keys of shared pools predate the field
            del spec["pool"]
        if spec["weights"] is None:  # keys of specs without it predate the field
            del spec["weights"]
        del spec["data"]  # an absolute path: the other split's fingerprint stands for it
        spec["backbone"] = spec["backbone"] or study.train.get("backbone", "cbr_small")
        if spec_obj.weights == "imagenet":  # trained with the study's recipe
            spec["recipe"] = {k: v for k, v in study.train.items() if k != "epochs"}
        if spec_obj.data is not None:  # another dataset: all of its images
            other = self.other_split(spec_obj.data)
            return _key({"fp": self.split.fingerprint, "spec": spec,
                         "other_fp": other.fingerprint,
                         "other_leaves": list(other.hierarchy.leaves)})
        pool = self._pool(spec_obj, seed)
        # Image paths relative to the data root, as in the split's fingerprint: the key
        # must not depend on where this machine keeps the datasets.
        ids = [os.path.relpath(self.split.ids[i], study.data.root) for i in pool]
        return _key({"fp": self.split.fingerprint, "spec": spec,
                     "pool": ids[:: max(1, len(pool) // 500)], "pool_n": len(pool)})

    def other_split(self, data):
        """The split of another dataset (cross-domain pretraining), loaded once."""
        k = json.dumps(data.model_dump(), sort_keys=True)
        if k not in self._other:
            self._other[k] = load_split(data)
        return self._other[k]

    def _cell_key(self, recipe: dict, n, seed: int, pkey, arm) -> str:
        """The digest of what determines a cell's result.  ``train.epochs`` enters as the
        epoch count of this N, so adding an N to the grid (a new ``{N: epochs}`` entry)
        keeps every finished cell.  Cells finished under the first scheme (the whole epochs
        mapping in the digest) are still found: that key is used while its file exists and
        the new one's does not."""
        def ident(r):
            d = {"fp": self.split.fingerprint, "recipe": r, "n": str(n), "seed": seed,
                 "init": pkey or "scratch"}
            if r.get("model") == "staged":
                d["n_folds"] = arm.n_folds
            return _key(d)

        legacy = ident(recipe)
        if not isinstance(recipe.get("epochs"), dict):
            return legacy
        try:
            resolved = {**recipe, "epochs": study_training.epochs_for(recipe["epochs"], n)}
        except KeyError:
            return legacy  # reported when the cell runs
        key = ident(resolved)
        if not self.done(key) and self.done(legacy):
            return legacy
        return key

    def plan(self) -> list[Cell]:
        """Every cell of every study, deduplicated by key, in run order."""
        self.load()
        order = {}
        for s in self.studies:
            for n in s.grid.sizes:
                order.setdefault(str(n), (1e9 if n == "all" else int(n)))
        cells: dict[str, Cell] = {}
        planned = []
        for si, s in enumerate(self.studies):
            for ai, arm in enumerate(s.arms):
                recipe = s.recipe_of(arm)
                for n in s.sizes_of(arm):
                    for seed in s.grid.seeds:
                        pkey = (self.pretrain_key(s, arm.init, seed) if arm.init != "scratch"
                                else None)
                        skip = None
                        if arm.init != "scratch" and n == "all":
                            skip = ("not applicable: with N = all every training image is "
                                    "in the fine-tuning set, none is left to pretrain on")
                        k = self._cell_key(recipe, n, seed, pkey, arm)
                        c = Cell(s.name, arm.name, n, int(seed), k, recipe, arm.init, pkey,
                                 arm.n_folds, skip)
                        planned.append(((order[str(n)], seed, si, ai), c))
        planned.sort(key=lambda t: t[0])
        out = []
        for _, c in planned:
            if c.key in cells:
                cells[c.key].shared_with.append((c.study, c.arm))
                continue
            cells[c.key] = c
            out.append(c)
        self.cells = out
        self.all_planned = [c for _, c in planned]
        return out

    # ------------------------------------------------------------------ files
    def cell_path(self, key: str) -> Path:
        return self.out / "cells" / f"{key}.json"

    def pretrain_paths(self, key: str) -> tuple[Path, Path]:
        """``pretrain/<key>.weights.h5`` and its record ``pretrain/<key>.json``."""
        path = self.out / "pretrain" / f"{key}.weights.h5"
        return path, path.with_suffix("").with_suffix(".json")

    def done(self, key: str) -> bool:
        return self.cell_path(key).exists()

    def read_cell(self, key: str) -> dict | None:
        p = self.cell_path(key)
        if not p.exists():
            return None
        with open(p) as fh:
            return json.load(fh)

    # ------------------------------------------------------------------ running
    def _pretrained(self, cell: Cell, study: StudyConfig) -> str:
        path, meta = self.pretrain_paths(cell.pretrain_key)
        if path.exists() and meta.exists():
            return str(path)
        spec = study.pretrain[cell.init]
        if spec.data is not None:
            source = self.other_split(spec.data)
            pool = np.arange(len(source.ids))  # every image of the other dataset
        else:
            source = self.split
            pool = self._pool(spec, cell.seed)
        if len(pool) < 2 * spec.batch_size:
            raise ConfigError(f"pretrain.{cell.init}: only {len(pool)} training images lie "
                              "outside every small subset; lower grid.sizes or batch_size")
        log.info("pretraining %s (%s%s) on %d images%s", cell.init, spec.method,
                 f", from {spec.data.root}" if spec.data is not None else "", len(pool),
                 f" (capped at {spec.max_images})" if spec.max_images else "")
        info = study_training.pretrain(source, spec, pool, path,
                                       study.train.get("backbone", "cbr_small"),
                                       recipe=study.train if spec.weights == "imagenet"
                                       else None)
        if spec.data is not None:
            info["data_root"] = os.path.relpath(spec.data.root, study.data.root)
        info.update(name=cell.init, study=study.name, key=cell.pretrain_key, pool=spec.pool,
                    seed=cell.seed if spec.pool == "per_seed" else None)
        _write_json(meta, info)
        log.info("pretrained %s in %.0f s", cell.init, info["seconds"])
        return str(path)


    def hardware(self) -> dict:
        """:func:`hardware`, once per runner (every cell row carries it)."""
        if getattr(self, "_hw", None) is None:
            self._hw = hardware()
        return self._hw

    def run_cell(self, c: Cell) -> dict:
        """Train one cell and write ``cells/<key>.json`` (``<key>.error.json`` if it raised).

        The one per-cell code path: :meth:`run` calls it in its own process (K = 0) and every
        worker process calls it for each cell it is sent (a Dask worker's too, into a private
        folder; the Dask executor then writes the result here with :meth:`finish_cell`).  Returns
        a short, picklable outcome: ``{"key", "ok", "error", "pid", "rss_mb",
        "peak_rss_mb"}`` (the training process's RSS after the cell and its peak RSS so far,
        in MB)."""
        return self.finish_cell(c, self.compute_cell(c))

    def compute_cell(self, c: Cell) -> dict:
        """Train one cell and write nothing: ``{"row": <the cell's JSON>, "outcome": ...}``,
        or ``{"error", "traceback", "outcome"}`` if it raised (pretraining included)."""
        split = self.load() if self.split is None else self.split
        study = {s.name: s for s in self.studies}[c.study]
        try:
            weights = self._pretrained(c, study) if c.init != "scratch" else None
            info = study_training.train_cell(
                split, c.recipe, c.n, c.seed, weights=weights, n_folds=c.n_folds,
                recalibrate=c.recipe.get("recalibrate_bn", True))
            probs = info.pop("probs")
            metrics = cell_metrics(split.y_test, probs, study.evaluation.n_boot,
                                   study.evaluation.alpha, seed=c.seed)
        except Exception as exc:  # one failing cell must not end the study
            error = f"{type(exc).__name__}: {exc}"
            return {"error": error, "traceback": traceback.format_exc(),
                    "outcome": _outcome(c, False, error)}
        row = {"kind": "kmedtl-study-cell", "version": 1, "key": c.key,
               "study": c.study, "arm": c.arm, "shared_with": c.shared_with,
               "n": c.n, "seed": c.seed, "init": c.init, "pretrain_key": c.pretrain_key,
               "recipe": c.recipe, **info, "metrics": metrics,
               "probs": np.round(probs, 6).tolist(),
               "fingerprint": split.fingerprint, "hardware": self.hardware(),
               "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
        return {"row": row, "outcome": _outcome(c, True)}

    def finish_cell(self, c: Cell, result: dict) -> dict:
        """Write what :meth:`compute_cell` returned: ``cells/<key>.json``, or
        ``<key>.error.json`` (retried on the next run; a ``record`` in ``result`` is written
        as it is, e.g. a worker's death); log it; return its outcome."""
        err = self.cell_path(c.key).with_suffix(".error.json")
        if "row" not in result:
            log.error("cell %s/%s N=%s seed=%d failed: %s", c.study, c.arm, c.n, c.seed,
                      result["error"].split(": ", 1)[-1])
            _write_json(err, result.get("record") or {
                "key": c.key, "study": c.study, "arm": c.arm, "n": c.n, "seed": c.seed,
                "error": result["error"], "traceback": result["traceback"]})
            return result["outcome"]
        err.unlink(missing_ok=True)
        row = result["row"]
        _write_json(self.cell_path(c.key), row)
        study = {s.name: s for s in self.studies}[c.study]
        m = row["metrics"][study.evaluation.primary]
        log.info("    %s = %.3f (%.3f-%.3f) in %.0f s", study.evaluation.primary,
                 m["value"], m["ci_low"] or float("nan"), m["ci_high"] or float("nan"),
                 row["seconds"])
        return result["outcome"]

    def run(self, resume: bool = False, overwrite: bool = False,
            max_minutes: float | None = None, cells_per_process: int = CELLS_PER_PROCESS,
            worker_init=None, executor=None) -> dict:
        """Train every planned cell not yet done; returns the status dict (also written to
        ``status.json``).

        ``cells_per_process`` (K): with K > 0 the cells train in a spawned worker process
        that is replaced by a fresh one after every K cells, and a worker that dies costs
        only the cell it was training (see the module docstring); K = 0 trains them in this
        process.  ``worker_init``: a picklable callable (a module-level function, or a
        ``functools.partial`` of one) that each worker calls once, after loading the split
        and before its first cell -- e.g. to set thread counts; the tests use it to make a
        worker die.  Not called with K = 0.

        ``executor``: instead of this machine's worker processes, an object whose
        ``open(runner)`` returns a pool of the same shape as :class:`_InProcess` (``run_all``,
        ``close``, ``started``, ``died``, ``peak``, ``memory()``), e.g.
        :class:`kmedtl.study.dask_executor.DaskExecutor` (cells on a Dask cluster); it is
        opened before planning, so an unreachable cluster fails at once.
        ``cells_per_process`` and ``worker_init`` do not apply to it."""
        try:
            k = int(cells_per_process)
        except (TypeError, ValueError):
            k = -1
        if k < 0 or k != cells_per_process:
            raise ConfigError(f"cells_per_process must be an integer >= 0 (0: every cell in "
                              f"this process), got {cells_per_process!r}")
        remote = executor.open(self) if executor is not None else None
        try:
            return self._run(resume, overwrite, max_minutes, k, worker_init, remote)
        finally:
            if remote is not None:
                remote.close(kill=True)  # no-op after a normal end

    def _run(self, resume, overwrite, max_minutes, k, worker_init, remote) -> dict:
        cells = self.plan()
        runnable = [c for c in cells if c.skip_reason is None]
        finished = [c for c in runnable if self.done(c.key)]
        if finished and not (resume or overwrite):
            raise ConfigError(f"{self.out}: already holds {len(finished)} finished cell(s) of "
                              "these studies; pass --resume to skip them or --overwrite to "
                              "train them again")
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        budgets = [s.budget_minutes for s in self.studies if s.budget_minutes]
        if max_minutes is None and budgets:
            max_minutes = min(budgets)
        t_start = time.perf_counter()
        deadline = t_start + 60 * max_minutes if max_minutes else None
        hw = self.hardware()
        ran, failed, stopped, rows = 0, 0, [], []
        todo = [c for c in runnable if overwrite or not self.done(c.key)]
        log.info("%d cells planned (%d unique, %d not applicable), %d to run",
                 len(self.all_planned), len(cells), len(cells) - len(runnable), len(todo))
        pool = (remote if remote is not None else
                _Workers(self, k, worker_init) if k and todo else _InProcess(self))
        try:
            for res in pool.run_all(todo, deadline, max_minutes, stopped):
                ran, failed = ran + res["ok"], failed + (not res["ok"])
                rows.append({k_: res.get(k_) for k_ in ("key", "pid", "rss_mb", "peak_rss_mb")}
                            | ({"worker": res["worker"]} if "worker" in res else {}))
        except BaseException:
            pool.close(kill=True)
            raise
        pool.close()
        memory = {
            "mode": ("in-process" if k == 0 else
                     f"worker processes, a fresh one every {k} cell(s)"),
            "cells_per_process": k, "workers_started": pool.started,
            "workers_died": pool.died,
            # peak RSS: this process; its finished child processes (the workers, and any
            # other child, e.g. a decoding pool) from getrusage(RUSAGE_CHILDREN); and the
            # largest peak a worker reported after a cell
            "peak_rss_mb": {"parent": _peak_rss_mb(), "children": _peak_rss_mb(children=True),
                            "workers_reported": pool.peak or None},
            "cells": rows, **pool.memory()}
        status = {"kind": "kmedtl-study-status", "studies": [s.source for s in self.studies],
                  "planned_unique": len(cells), "not_applicable": len(cells) - len(runnable),
                  "ran_now": ran, "failed_now": failed,
                  "done": sum(self.done(c.key) for c in runnable),
                  "stopped_by_budget": len(stopped), "max_minutes": max_minutes,
                  "wall_seconds": round(time.perf_counter() - t_start, 1),
                  "hardware": hw, "memory": memory,
                  "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
        _write_json(self.out / "status.json", status)
        return status


# ---------------------------------------------------------------------------- memory
def _rss_mb() -> float | None:
    """This process's resident set size now, in MB (None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _peak_rss_mb(children: bool = False) -> float | None:
    """Peak RSS in MB of this process, or of its terminated and waited-for children."""
    if resource is None:
        return None
    ru = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB elsewhere
    return round(ru.ru_maxrss / scale, 1)


def _outcome(c: Cell, ok: bool, error: str | None = None) -> dict:
    return {"key": c.key, "ok": ok, "error": error, "pid": os.getpid(), "rss_mb": _rss_mb(),
            "peak_rss_mb": _peak_rss_mb()}


# ---------------------------------------------------------------------------- workers
class _Serial:
    """Cells one after another, in plan order (:class:`_InProcess`, :class:`_Workers`)."""

    def run_all(self, todo: list[Cell], deadline, max_minutes, stopped: list):
        """The outcome of each cell of ``todo``; the keys of cells not started by the time
        budget's ``deadline`` go to ``stopped``."""
        for i, c in enumerate(todo):
            if deadline and time.perf_counter() > deadline:
                stopped.extend(x.key for x in todo[i:])
                log.info("time budget of %.0f min spent: %d cell(s) left for --resume",
                         max_minutes, len(stopped))
                return
            log.info("[%d/%d] %s/%s N=%s seed=%d", i + 1, len(todo), c.study, c.arm, c.n,
                     c.seed)
            yield self.run(c)

    def memory(self) -> dict:
        """Extra ``status.json`` memory fields of this mode."""
        return {}


class _InProcess(_Serial):
    """K = 0: every cell in the calling process."""

    started = died = 0
    peak = None

    def __init__(self, runner: StudyRunner):
        self.runner = runner

    def run(self, c: Cell) -> dict:
        return self.runner.run_cell(c)

    def close(self, kill: bool = False) -> None:
        pass


def _exit_cause(code) -> tuple[str, str | None]:
    """(``"was killed by signal 9 (SIGKILL)"`` or ``"exited with status 3"``, signal name)."""
    if code is None:
        return "stopped answering", None
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by signal {-code} ({name})", name
    return f"exited with status {code}", None


class _Workers(_Serial):
    """The cells of :meth:`StudyRunner.run` in a spawned worker process that is replaced by
    a fresh one after every ``k`` cells.

    Written out instead of ``concurrent.futures.ProcessPoolExecutor(max_workers=1,
    max_tasks_per_child=k)`` because the pool hides three things a study needs: the exit
    status of a worker that died (BrokenProcessPool does not say which signal killed it;
    the cell's error file must, to tell an OOM kill from a crash); the worker's log records
    in order with the cell's result (here one pipe carries both, so a cell's lines are
    logged before the next cell's); and a fresh channel per worker (a worker killed while
    holding a shared queue's lock would leave it locked for the next one).  One duplex
    pipe per worker: the parent closes the worker's end after the start, so a dead worker
    reads as end-of-file at once.
    """

    def __init__(self, runner: StudyRunner, k: int, worker_init=None):
        self.runner, self.k, self.worker_init = runner, k, worker_init
        self.proc = self.conn = None
        self.cells_here = 0  # cells the current worker has finished
        self.started = self.died = 0
        self.peak = 0.0

    # -- lifetime
    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that runs TensorFlow
        here, there = ctx.Pipe(duplex=True)
        levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
                  if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET}
        levels[""] = logging.root.level
        proc = ctx.Process(target=_worker_main, name=f"kmedtl-study-worker-{self.started + 1}",
                           args=(there, self.runner.studies, str(self.runner.out),
                                 self.runner.split.fingerprint, levels, self.worker_init))
        t0 = time.perf_counter()
        with detached_main():  # the worker imports this module, never the caller's script
            proc.start()
        there.close()
        self.proc, self.conn, self.cells_here = proc, here, 0
        self.started += 1
        for kind, payload in self._messages():
            if kind == "ready":
                log.debug("study worker %d (pid %d) ready in %.1f s", self.started, proc.pid,
                          time.perf_counter() - t0)
                return
            if kind == "fatal":
                self._reap()
                raise KmedtlError(f"the study's worker process failed to start:\n{payload}")
        cause, _ = _exit_cause(self._reap())
        raise KmedtlError(f"the study's worker process {cause} while starting (loading the "
                          "split); run with --cells-per-process 0 to see the error in "
                          "this process")

    def _reap(self, timeout: float = 30.0):
        """Wait for the worker to end (kill it if it does not); its exit code."""
        proc, self.proc = self.proc, None
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if proc is None:
            return None
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        code = proc.exitcode
        if code is not None:
            proc.close()
        return code

    def close(self, kill: bool = False) -> None:
        """Let the worker exit (``kill``: at once, e.g. on Ctrl-C or an error)."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self._reap(timeout=1.0 if kill else 60.0)

    # -- messages
    def _messages(self):
        """The worker's messages other than log records, which are logged here as they
        come (the parent's handlers and format); ends when the worker is gone."""
        while True:
            try:
                if not self.conn.poll(2.0):
                    if self.proc.is_alive():
                        continue
                    if not self.conn.poll(0):
                        return
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                return
            if kind == "log":
                logging.getLogger(payload.name).handle(payload)
            else:
                yield kind, payload

    def run(self, c: Cell) -> dict:
        if self.proc is not None and not self.proc.is_alive():  # died between cells
            code = self._reap()
            self.died += 1
            log.warning("the study worker %s between cells; starting a fresh one",
                        _exit_cause(code)[0])
        if self.proc is None:
            self._start()
        pid = self.proc.pid
        try:
            self.conn.send(("cell", c))
        except OSError:
            pass  # died just now: reported below
        for kind, payload in self._messages():
            if kind == "done":
                self.cells_here += 1
                self.peak = max(self.peak, payload.get("peak_rss_mb") or 0.0)
                if self.cells_here >= self.k:
                    self.close()  # recycle: the next cell gets a fresh process
                return payload
        return self._died(c, pid)

    def _died(self, c: Cell, pid: int) -> dict:
        """The worker died in cell ``c``: write the cell's error file, count it, go on."""
        before = self.cells_here
        code = self._reap()
        self.died += 1
        cause, sig = _exit_cause(code)
        if sig == "SIGKILL":
            cause += (" -- most likely the kernel's out-of-memory killer (see dmesg / "
                      "journalctl -k)")
        if before == 0:
            fix = ("It was the first cell of a fresh worker, so this cell alone needs more "
                   f"memory than was free and a lower --cells-per-process (now {self.k}) "
                   "cannot help: free memory or lower its batch_size/image_size")
        else:
            fix = (f"It was cell {before + 1} of its worker: lower --cells-per-process (now "
                   f"{self.k}; 1 gives every cell a fresh process) or free memory")
        message = (f"WorkerDied: the worker process (pid {pid}) {cause} while training this "
                   f"cell. {fix}, then run again with --resume to retry it.")
        log.error("cell %s/%s N=%s seed=%d failed: %s", c.study, c.arm, c.n, c.seed, message)
        err = self.runner.cell_path(c.key).with_suffix(".error.json")
        _write_json(err, {"key": c.key, "study": c.study, "arm": c.arm, "n": c.n,
                          "seed": c.seed, "error": message, "exit_code": code, "signal": sig,
                          "worker_pid": pid, "cells_per_process": self.k,
                          "cells_before_in_worker": before, "traceback": None})
        return {"key": c.key, "ok": False, "error": message, "pid": pid, "rss_mb": None,
                "peak_rss_mb": None}


class _PipeSender:
    """The worker's end of the pipe: whole messages from any thread (log records can come
    from TensorFlow's threads), and a ``put_nowait`` for :class:`logging.handlers.QueueHandler`."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.RLock()

    def send(self, msg) -> None:
        with self.lock:
            self.conn.send(msg)

    def put_nowait(self, record) -> None:
        self.send(("log", record))


def _worker_main(conn, studies, out, fingerprint, levels, worker_init) -> None:
    """A worker process: load the split, then run the cells it is sent with
    :meth:`StudyRunner.run_cell` until told to stop (``None``) or the parent is gone.

    The parent sends each planned :class:`Cell` itself (key, recipe, init, ...), not a key
    to look up in a plan of the worker's own: the parent's plan is the one the run reports,
    and planning again would only repeat the pretraining-pool and key computations."""
    sender = _PipeSender(conn)
    handler = QueueHandler(sender)
    starting = [True]  # the parent has logged the split already: only errors while loading
    handler.addFilter(lambda r: not starting[0] or r.levelno >= logging.ERROR)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    try:
        runner = StudyRunner(studies, out)
        runner.load(write=False)
        if runner.split.fingerprint != fingerprint:
            raise ConfigError(f"the worker's split ({runner.split.fingerprint}) differs from "
                              f"the parent's ({fingerprint}): did the dataset change?")
        runner.hardware()
        if worker_init is not None:
            worker_init()
        starting[0] = False
        sender.send(("ready", os.getpid()))
    except BaseException:
        sender.send(("fatal", traceback.format_exc()))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if msg is None:
            break
        sender.send(("done", runner.run_cell(msg[1])))
    # Told to stop: every cell file is written and every log record sent, so skip the
    # interpreter's teardown, which with TensorFlow loaded takes seconds per worker.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
