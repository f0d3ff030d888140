"""The study's cells on a Dask cluster: ``python -m kmedtl.study STUDY.yaml --executor dask
--scheduler HOST:PORT`` (or ``StudyRunner.run(executor=DaskExecutor("HOST:PORT"))``).

What runs where
---------------
- **This process** plans the grid (the same plan, keys and order as a local run), sends
  each cell to the cluster as one Dask task whose key is ``kmedtl-study-cell-<cell key>``,
  and writes every result itself through :meth:`StudyRunner.finish_cell` -- the code path
  of a local run -- so ``cells/<key>.json`` is the local run's file (timings, hardware and
  the finishing time aside) and a cell is written and counted once, whatever Dask retried.
  At most one cell more than there are workers is in flight, in plan order, so
  ``--max-minutes`` still means "start no new cell after this".
- **A Dask worker process** trains its cells one at a time in a child process of its own:
  the ``_Workers`` pool of a local run, replaced after every ``--cells-per-process``
  cells, which loads the split once from the study's data and cache folders (the worker
  must see them at the same paths) and checks its fingerprint against this process's.
  The child runs :meth:`StudyRunner.run_cell` into a private temporary folder; the task
  returns what it wrote and removes it.  Never in the Dask worker's own threads (see
  :func:`_worker_pool` for why): start workers with ``--nthreads 1`` and as many
  ``--nworkers`` as a machine has room for.
- **Pretraining** (an arm with ``init: <pretrain entry>``): as in a local run, the first
  cell that needs a pretrained backbone pretrains it; the other cells that need it wait
  for that cell's task and get the weights from it.  The weights and their record come
  back here and are written to ``pretrain/`` as a local run writes them.  Weights already
  in ``pretrain/`` (``--resume``) are sent from here (task ``kmedtl-study-pretrain-<key>``).
  So the output folder need not be on a filesystem the workers share; the dataset and its
  cache folder must be.

A worker lost in a cell (killed, its machine gone) loses nothing written: the scheduler
runs the task again on another worker (up to ``distributed.scheduler.allowed-failures``
times, default 3; a task that raised outside the cell's own error handling gets
``retries`` more tries), and when it gives up the cell gets ``cells/<key>.error.json``
naming the cause, to be retried by the next ``--resume``.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing as mp
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

from kmedtl.errors import BackendUnavailableError, ConfigError, KmedtlError
from kmedtl.jsonio import atomic_write
from kmedtl.study.runner import (
    CELLS_PER_PROCESS,
    Cell,
    StudyRunner,
    _key,
    _outcome,
    _Workers,
    _write_json,
)

DASK_INSTALL = "pip install 'kmedtl[dask]' (or pip install 'dask[distributed]')"

try:
    from dask.distributed import Client, KilledWorker, as_completed, get_worker
except ImportError as _exc:
    raise BackendUnavailableError(
        f"--executor dask needs dask.distributed ({_exc}): {DASK_INSTALL}") from None

log = logging.getLogger("kmedtl.study")

#: Seconds to wait for the scheduler to answer, and then for its first worker.
CONNECT_TIMEOUT = 30.0
#: Extra tries of a task that raised outside a cell's own error handling (e.g. a worker
#: that could not load the split); a lost worker's task is rerun by the scheduler anyway.
RETRIES = 2


def scheduler_address(scheduler) -> str:
    """``HOST:PORT`` -> ``tcp://HOST:PORT`` (an address with a scheme is kept)."""
    text = str(scheduler or "").strip()
    if not text:
        raise ConfigError("--scheduler: empty address; give HOST:PORT of a running "
                          "`dask scheduler` (e.g. 10.0.0.5:8786)")
    return text if "://" in text else f"tcp://{text}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def connect(address: str, timeout: float = CONNECT_TIMEOUT):
    """A ``Client`` of the scheduler at ``address`` that has at least one worker; else a
    one-line :class:`KmedtlError` naming the address and the fix."""
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise KmedtlError(
            f"cannot reach the Dask scheduler at {address} ({_first_line(exc)}): start one "
            "there with `dask scheduler`, or fix --scheduler HOST:PORT") from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError):
        client.close()
        raise KmedtlError(
            f"the Dask scheduler at {address} has no workers after {timeout:g} s: start some "
            f"with `dask worker {address} --nthreads 1` (each needs kmedtl installed and the "
            "study's data at the same paths)") from None
    return client


class DaskExecutor:
    """``StudyRunner.run(executor=DaskExecutor("HOST:PORT"))``: the cells on the Dask
    cluster whose scheduler is at that address."""

    def __init__(self, scheduler: str, *, cells_per_process: int = CELLS_PER_PROCESS,
                 timeout: float | None = None, retries: int = RETRIES):
        self.address = scheduler_address(scheduler)
        self.k = int(cells_per_process)
        self.timeout = CONNECT_TIMEOUT if timeout is None else timeout
        self.retries = retries

    def open(self, runner: StudyRunner) -> _DaskCells:
        return _DaskCells(runner, connect(self.address, self.timeout), self.address,
                          self.retries, self.k)


class _DaskCells:
    """The pool :meth:`StudyRunner.run` drives (the shape of its ``_InProcess``)."""

    started = 0  # this run starts no worker process; the cluster's own are listed

    def __init__(self, runner: StudyRunner, client, address: str, retries: int,
                 k: int = CELLS_PER_PROCESS):
        self.runner, self.client, self.address, self.retries = runner, client, address, retries
        self.cells_per_process = k
        self.k = k if k > 0 else 2**31  # 0: one child process for a worker's whole life
        self.died = 0
        self.peak = 0.0
        self.used: set[str] = set()
        self.pretrains: dict = {}  # pretrain key -> future of its payload
        self.inflight: dict = {}  # Dask key -> (Cell, future)
        self.ac = None

    # -- what the parent sends
    def _args(self):
        r = self.runner
        token = _key([s.model_dump(mode="json") for s in r.studies])
        return r.studies, r.split.fingerprint, token, self.k

    def _pretrain(self, c: Cell):
        """(the future ``c`` waits for, whether ``c`` pretrains its backbone itself): the
        weights in ``pretrain/`` sent from here when there; else the first cell that needs
        them pretrains them (as in a local run) and the others wait for that cell."""
        if c.init == "scratch":
            return None, False
        if c.pretrain_key in self.pretrains:
            return self.pretrains[c.pretrain_key], False
        path, meta = self.runner.pretrain_paths(c.pretrain_key)
        if path.exists() and meta.exists():
            payload = {"key": c.pretrain_key, "weights": path.read_bytes(),
                       "meta": json.loads(meta.read_text())}
            self.pretrains[c.pretrain_key] = self.client.submit(
                _given, payload, key=f"kmedtl-study-pretrain-{c.pretrain_key}", pure=False)
            return self.pretrains[c.pretrain_key], False
        return None, True  # run_all records this cell's future in self.pretrains

    def _write_pretrain(self, payload: dict, worker) -> None:
        """The weights a cell pretrained, written to ``pretrain/`` as a local run does."""
        _place(self.runner, payload, record_path=True)
        meta = payload["meta"]
        log.info("pretrained %s on %s in %.0f s", meta.get("name"), worker,
                 meta.get("seconds") or 0)

    # -- the loop
    def run_all(self, todo: list[Cell], deadline, max_minutes, stopped: list):
        """Send the cells in plan order, at most one more than there are worker processes
        at a time; yield each cell's outcome as it is written."""
        studies, fp, token, k = self._args()
        self.ac = as_completed(loop=self.client.loop)
        cells = self.inflight
        pending = deque(todo)
        n = 0
        while pending or cells:
            window = len(self.client.scheduler_info(n_workers=-1)["workers"]) + 1
            while pending and len(cells) < window:
                if deadline and time.perf_counter() > deadline:
                    stopped.extend(c.key for c in pending)
                    log.info("time budget of %.0f min spent: %d cell(s) left for --resume",
                             max_minutes, len(stopped))
                    pending.clear()
                    break
                c = pending.popleft()
                n += 1
                log.info("[%d/%d] %s/%s N=%s seed=%d (to dask)", n, len(todo), c.study, c.arm,
                         c.n, c.seed)
                dep, pretrains = self._pretrain(c)
                fut = self.client.submit(_dask_cell, studies, fp, token, k, c, dep,
                                         pretrains, key=f"kmedtl-study-cell-{c.key}",
                                         retries=self.retries, pure=False)
                if pretrains:
                    self.pretrains[c.pretrain_key] = fut
                cells[fut.key] = (c, fut)
                self.ac.add(fut)
            if not cells:
                break
            fut = next(self.ac)
            c, _ = cells.pop(fut.key)
            yield self._finish(c, fut)

    def _finish(self, c: Cell, fut) -> dict:
        try:
            result = fut.result()
        except KilledWorker as exc:
            self.died += 1
            message = (f"WorkerDied: the Dask workers running this cell died or were lost "
                       f"each time it ran ({_first_line(exc)}) -- most likely out of memory "
                       "(see the workers' logs; lower the arm's batch_size/image_size or give "
                       "the workers more memory), then run again with --resume to retry it.")
            result = {"error": message, "traceback": None,
                      "outcome": {**_outcome(c, False, message), "pid": None, "rss_mb": None,
                                  "peak_rss_mb": None}}
        except Exception as exc:
            lines = [x for x in str(exc).splitlines() if x.strip()]
            why = _first_line(exc) + (f" ... {lines[-1].strip()[:300]}" if len(lines) > 1
                                      else "")
            raise KmedtlError(f"a Dask worker could not run cell {c.study}/{c.arm} N={c.n} "
                              f"seed={c.seed}: {why}") from exc
        if result.get("pretrained") is not None:
            self._write_pretrain(result["pretrained"], result["outcome"].get("worker"))
        out = self.runner.finish_cell(c, result)
        if out.get("worker"):
            self.used.add(out["worker"])
        self.peak = max(self.peak, out.get("peak_rss_mb") or 0.0)
        return out

    def memory(self) -> dict:
        return {"mode": f"dask scheduler {self.address}",
                "cells_per_process": self.cells_per_process,
                "dask_workers": sorted(self.used), "dask_retries": self.retries}

    def close(self, kill: bool = False) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if kill:
                futures = [*self.pretrains.values(), *(f for _, f in self.inflight.values())]
                if futures:
                    client.cancel(futures)
        finally:
            client.close()


# ---------------------------------------------------------------------------- on a worker
_POOL: dict = {}  # token -> the _Workers pool of this Dask worker process (the latest study)
_LOCK = threading.Lock()  # one cell at a time per Dask worker process


def _worker_pool(studies, fingerprint: str, token: str, k: int) -> _Workers:
    """This Dask worker's pool for these studies: a spawned child process that trains the
    cells (replaced after every ``k``), started on the first cell.

    Why not train in the Dask worker's own thread: Keras draws the seeds of layers built
    without one (``SeedGenerator()``) from Python's global ``random``, which the worker's
    event loop thread also draws from (comm back-off, heartbeat jitter, peer choice), so a
    cell's weights there depended on timing (measured: the final loss of one cell varied
    0.83-0.93 between runs).  The child's main thread is alone with Keras, as in a local
    run, and memory a cell keeps goes back to the system when the child is replaced."""
    pool = _POOL.get(token)
    if pool is not None:
        return pool
    for old in _POOL.values():
        old.close()
    _POOL.clear()
    out = tempfile.mkdtemp(prefix="kmedtl-study-dask-")  # cell and weight files in transit
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    (Path(out) / "cells").mkdir()
    runner = StudyRunner(studies, out)
    # The child loads the split and checks it against the parent's fingerprint; this
    # process needs only that fingerprint.
    runner.split = SimpleNamespace(fingerprint=fingerprint)
    # A Dask nanny starts its worker as a daemon process, which multiprocessing forbids to
    # have children (distributed.worker.daemon); the child exits on its own when this
    # process goes (its pipe closes), so a daemon's guarantee is kept.
    mp.current_process().daemon = False
    _POOL[token] = pool = _Workers(runner, k)
    return pool


def _given(payload: dict) -> dict:
    """Weights sent from the parent's ``pretrain/`` (a task, so that a lost copy is sent
    again rather than lost)."""
    return {"pretrained": payload}


def _dask_cell(studies, fingerprint: str, token: str, k: int, c: Cell, dep,
               pretrains: bool) -> dict:
    """Train one cell in this worker's child process (:meth:`StudyRunner.run_cell`, into a
    private folder); return what it wrote, which the parent writes with
    :meth:`StudyRunner.finish_cell`.  ``dep``: the result of the task that pretrained the
    cell's backbone (its ``pretrained`` weights), or None.  ``pretrains``: this cell is
    the first to need its backbone, so return the weights it pretrained too."""
    with _LOCK:
        pool = _worker_pool(studies, fingerprint, token, k)
        runner = pool.runner
        if dep is not None and dep.get("pretrained") is not None:
            _place(runner, dep["pretrained"])
        outcome = pool.run(c)
        path = runner.cell_path(c.key)
        err = path.with_suffix(".error.json")
        if path.exists():
            result = {"row": json.loads(path.read_text()), "outcome": outcome}
            path.unlink()
        else:
            record = json.loads(err.read_text())
            result = {"error": record["error"], "traceback": record.get("traceback"),
                      "record": record, "outcome": outcome}
        err.unlink(missing_ok=True)
        if pretrains:
            weights, meta = runner.pretrain_paths(c.pretrain_key)
            if weights.exists() and meta.exists():
                result["pretrained"] = {"key": c.pretrain_key, "weights": weights.read_bytes(),
                                        "meta": json.loads(meta.read_text())}
        result["outcome"]["worker"] = get_worker().address
        return result


def _place(runner: StudyRunner, payload: dict, *, record_path: bool = False) -> None:
    """Put pretrained weights where :meth:`StudyRunner._pretrained` finds them (atomically);
    ``record_path``: the record says where they are, as a local run's does."""
    path, meta = runner.pretrain_paths(payload["key"])
    if path.exists() and meta.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(payload["weights"]), binary=True)
    _write_json(meta, {**payload["meta"], "path": str(path)} if record_path
                else payload["meta"])
