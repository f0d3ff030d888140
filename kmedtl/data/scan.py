"""The parallel decode pass behind ``kmedtl data cache`` and ``kmedtl data audit``.

Each sample is read once in a worker process: its bytes are hashed (SHA-256, the cache
key and the exact-duplicate key), decoded, preprocessed, perceptually hashed (near
duplicates) and, when a cache folder is given, written to the cache.  Workers are
*spawned* processes that never import TensorFlow, so they start in well under a second.

A file that fails is returned as a failure with its reason; the pass never stops on one
bad file.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from kmedtl.data.options import ImageOptions


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


def entry_name(digest: str, frame: int | None) -> str:
    return digest if frame is None else f"{digest}_f{frame}"


def cache_file_for(folder: str, digest: str, frame: int | None) -> str:
    name = entry_name(digest, frame)
    return os.path.join(folder, name[:2], name + ".u8")


def process(task: Task) -> Result:
    """Work for one sample; never raises for a bad file."""
    import numpy as np

    from kmedtl.data import decode, hashing
    from kmedtl.errors import DataError

    try:
        data = decode.read_bytes(task.path)
        digest = hashing.content_digest(data)
        target = None
        if task.cache_folder is not None:
            target = cache_file_for(task.cache_folder, digest, task.frame)
            if os.path.exists(target) and not task.phash:
                return Result(task.path, task.frame, True, digest, cache_file=target,
                              from_cache=True)
            if os.path.exists(target):
                img = np.fromfile(target, dtype=np.uint8).reshape(task.options.shape)
                return Result(task.path, task.frame, True, digest, hashing.perceptual_hash(img),
                              target, True)
        raw, meta = decode.decode_bytes(data, task.path, task.options, frame=task.frame,
                                        summary=False)
        del data
        img = decode.preprocess(raw, task.options)
        ph = hashing.perceptual_hash(img) if task.phash else None
        if target is not None:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.{os.getpid()}.tmp"
            img.tofile(tmp)
            os.replace(tmp, target)  # atomic: readers never see a partial entry
        small = {k: meta[k] for k in ("source", "window_source", "Modality", "n_frames")
                 if k in meta}
        small["native_shape"] = list(raw.shape)
        return Result(task.path, task.frame, True, digest, ph, target, False, small)
    except DataError as err:
        return Result(task.path, task.frame, False, error_kind=err.kind, error_reason=err.reason)
    except MemoryError:
        return Result(task.path, task.frame, False, error_kind="too_large",
                      error_reason="ran out of memory decoding this image")
    except Exception as exc:  # noqa: BLE001 - one unexpected failure must not stop the pass
        return Result(task.path, task.frame, False, error_kind="unexpected",
                      error_reason=f"unexpected {type(exc).__name__}: {exc}")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


def run(tasks: list[Task], workers: int | None = None, progress: bool | None = None,
        desc: str = "decode") -> list[Result]:
    """Process ``tasks`` in a pool of ``workers`` spawned processes, results in task order."""
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
        import multiprocessing as mp

        chunk = max(1, min(32, len(tasks) // (workers * 8)))
        ctx = mp.get_context("spawn")
        with _detached_main():
            pool = ctx.Pool(workers)
        with pool:
            out = []
            for r in pool.imap(process, tasks, chunksize=chunk):
                out.append(r)
                bar.update(1)
            return out
    finally:
        bar.close()


@contextlib.contextmanager
def _detached_main():
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
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)
