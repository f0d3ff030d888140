"""The parallel decode pass behind ``kmedtl data cache`` and ``kmedtl data audit``.

Each sample is read once in a worker process: its bytes are hashed (SHA-256, the cache
key and the exact-duplicate key), decoded, preprocessed, perceptually hashed (near
duplicates), reduced to a 32x32 thumbnail (similar content) and, when a cache folder is
given, written to the cache.  Workers are *spawned* processes that never import
TensorFlow, so they start in well under a second.

A file that fails is returned as a failure with its reason; the pass never stops on one
bad file.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from kmedtl.data import decode, hashing
from kmedtl.data.options import ImageOptions
from kmedtl.errors import DataError

#: Tests set KMEDTL_TEST_CRASH_MARKER so a worker aborts on matching paths, standing in
#: for a codec that segfaults on a corrupt file.
_CRASH_MARKER = os.environ.get("KMEDTL_TEST_CRASH_MARKER", "")


@dataclass(frozen=True)
class Task:
    path: str
    frame: int | None
    options: ImageOptions
    cache_folder: str | None = None
    phash: bool = True


@dataclass
class Result:
    path: str
    frame: int | None
    ok: bool
    digest: str | None = None
    phash: int | None = None
    cache_file: str | None = None
    from_cache: bool = False
    meta: dict | None = None
    error_kind: str | None = None
    error_reason: str | None = None
    thumb: bytes | None = None  # hashing.thumbnail of the hashed rendering (with phash)


def entry_name(digest: str, frame: int | None) -> str:
    return digest if frame is None else f"{digest}_f{frame}"


def cache_file_for(folder: str, digest: str, frame: int | None) -> str:
    name = entry_name(digest, frame)
    return os.path.join(folder, name[:2], name + ".u8")


def process(task: Task) -> Result:
    """Work for one sample; never raises for a bad file."""
    if _CRASH_MARKER and _CRASH_MARKER in task.path:  # fault injection for tests only
        os.abort()
    try:
        data = decode.read_bytes(task.path, task.options.max_file_bytes)
        digest = hashing.content_digest(data)
        target = None
        if task.cache_folder is not None:
            target = cache_file_for(task.cache_folder, digest, task.frame)
            # an entry of the wrong size is decoded again (kmedtl.data.cache checks the rest)
            fits = os.path.isfile(target) and \
                os.path.getsize(target) == int(np.prod(task.options.shape))
            if fits and not task.phash:
                return Result(task.path, task.frame, True, digest, cache_file=target,
                              from_cache=True)
            if fits:
                img = np.fromfile(target, dtype=np.uint8).reshape(task.options.shape)
                return Result(task.path, task.frame, True, digest, hashing.perceptual_hash(img),
                              target, True, thumb=hashing.thumbnail(img))
        raw, meta = decode.decode_bytes(data, task.path, task.options, frame=task.frame,
                                        summary=False)
        del data
        img = decode.preprocess(raw, task.options)
        ph = hashing.perceptual_hash(img) if task.phash else None
        thumb = hashing.thumbnail(img) if task.phash else None
        if target is not None:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.{os.getpid()}.tmp"
            img.tofile(tmp)
            os.replace(tmp, target)  # atomic: readers never see a partial entry
        small = {k: meta[k] for k in ("source", "window_source", "Modality", "n_frames",
                                      "warning") if k in meta}
        small["native_shape"] = list(raw.shape)
        return Result(task.path, task.frame, True, digest, ph, target, False, small,
                      thumb=thumb)
    except DataError as err:
        return Result(task.path, task.frame, False, error_kind=err.kind, error_reason=err.reason)
    except MemoryError:
        return Result(task.path, task.frame, False, error_kind="too_large",
                      error_reason="ran out of memory decoding this image")
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - one unexpected failure must not stop the
        # pass (BaseException: a Rust extension's panic is not an Exception and cannot be
        # pickled back from a worker)
        return Result(task.path, task.frame, False, error_kind="unexpected",
                      error_reason=f"unexpected {type(exc).__name__}: {exc}")


#: glibc ``mallopt`` parameters (malloc.h) and the values cache workers use.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
WORKER_MMAP_THRESHOLD = 32 << 20
WORKER_TRIM_THRESHOLD = 128 << 20


def tune_allocator() -> bool:
    """Keep a worker's freed image buffers in its heap (glibc only); True when applied.

    Each file allocates a few buffers of 0.25-4 MB (file bytes, decoded pixels, float32
    planes).  glibc serves such sizes with a fresh ``mmap`` and returns them with
    ``munmap``, or trims them off the heap top, so every file faults its pages in again:
    about 600 page faults per 512x512 16-bit slice (in one worker without writes here:
    2.5 ms per file with glibc's defaults, 1.55 ms tuned).
    Raising the mmap threshold to 32 MiB and the trim threshold to 128 MiB keeps those
    pages mapped between files (peak RSS unchanged; images over 32 MiB still use mmap).
    Pixels are unaffected: only where memory comes from changes.  Called in worker
    processes only (it would change the caller's process for good).
    ``KMEDTL_WORKER_MALLOC=default`` leaves glibc's defaults (to compare, or as an escape
    hatch).
    """
    if not sys.platform.startswith("linux") or \
            os.environ.get("KMEDTL_WORKER_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc, not musl  # noqa: B018
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


#: ``prctl`` option (linux/prctl.h): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> str:
    """Make this worker process end when ``parent_pid`` (the pool's owner) is gone.

    A pool worker blocks on its task pipe, which it holds both ends of, so a parent
    killed with ``kill -9`` would leave it waiting for ever.  On Linux the kernel sends
    SIGKILL when the parent dies (``PR_SET_PDEATHSIG``); elsewhere a daemon thread polls
    ``getppid`` every half second.  A parent that died before this ran is noticed at once.
    (The kernel ties the signal to the parent *thread* that started the worker: the pool
    lives and ends inside one :func:`run` call of that thread, so that is the same.)
    Returns how (``"pdeathsig"``, ``"poll"``).
    """
    how = "poll"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                how = "pdeathsig"
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # died before the death signal was armed
        os._exit(1)
    if how == "poll":
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="kmedtl-parent-watch", daemon=True).start()
    return how


def _worker_init(parent_pid: int | None = None):
    if parent_pid is not None:
        die_with_parent(parent_pid)
    tune_allocator()


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


def run(tasks: list[Task], workers: int | None = None, progress: bool | None = None,
        desc: str = "decode") -> list[Result]:
    """Process ``tasks`` in ``workers`` spawned processes; results in task order.

    A worker killed by a crashing decoder (a segfault in a codec on a corrupt file) does
    not stop the pass: the pool is rebuilt, the task that crashed is identified by running
    it alone, reported as ``worker_crashed``, and the rest continue.
    """
    workers = default_workers() if workers is None else max(1, int(workers))
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _bar(len(tasks), desc, progress)
    try:
        if workers == 1 or len(tasks) < 8:
            out = []
            for t in tasks:
                out.append(process(t))
                bar.update(1)
            return out
        out: list[Result] = []
        while len(out) < len(tasks):
            rest = tasks[len(out):]
            try:
                for r in _pool_map(rest, workers, max(1, min(32, len(rest) // (workers * 8)))):
                    out.append(r)
                    bar.update(1)
            except BrokenProcessPool:
                suspect = tasks[len(out)]
                try:
                    (r,) = list(_pool_map([suspect], 1, 1))
                except BrokenProcessPool:
                    r = Result(suspect.path, suspect.frame, False, error_kind="worker_crashed",
                               error_reason="decoding this file crashed the worker process "
                               "(corrupt data or a codec bug); check or remove the file")
                out.append(r)
                bar.update(1)
        return out
    finally:
        bar.close()


def _pool_map(tasks, workers, chunk):
    """Yield ``process`` results from a fresh spawned pool (workers start without __main__)."""
    with detached_main():
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))
        try:
            results = pool.map(process, tasks, chunksize=chunk)  # submits (and spawns) now
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    with pool:
        yield from results


@contextlib.contextmanager
def detached_main():
    """Start spawned workers without re-running the caller's ``__main__``.

    ``process`` lives in this importable module, so workers never need the main script.
    Without this, a user script lacking an ``if __name__ == "__main__"`` guard would
    re-execute in every worker (and the pool would respawn crashing workers forever).
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__.pop(k) for k in ("__file__", "__spec__")
             if main is not None and k in main.__dict__}
    if main is not None and "__spec__" in saved:
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def _bar(total, desc, enabled):
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)
