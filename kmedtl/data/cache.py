"""The decoded-image cache: each image decoded once, keyed by content and parameters.

Layout: ``<cache_dir>/<options.key()>/<sha[:2]>/<sha>[_f<frame>].u8`` holds the
preprocessed image as raw uint8 bytes of ``options.shape`` (no header: ``tf.data`` reads
it with ``tf.io.decode_raw``).  The folder name is a digest of every preprocessing
parameter and each file name the SHA-256 of the source file, so a changed file or a
changed parameter rebuilds exactly what changed, and no file name carries anything from a
DICOM header.  ``index.json`` remembers (path, size, mtime) -> digest so an unchanged
dataset is re-validated without re-reading its files, and keeps perceptual hashes and
32x32 thumbnails (base64) for the audit.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field

from kmedtl.data import scan
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import DatasetIndex, Sample, Skipped


@dataclass
class CacheResult:
    """Where each sample's image lives, what failed, and how much work was done."""

    folder: str
    files: dict[str, str]  # sample id -> cache file
    skipped: list[Skipped] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)  # sample id -> sha256
    phashes: dict[str, int] = field(default_factory=dict)  # sample id -> phash
    thumbs: dict[str, bytes] = field(default_factory=dict)  # sample id -> thumbnail
    decoded: int = 0
    reused: int = 0

    def summary(self) -> dict:
        return {"folder": self.folder, "cached": len(self.files), "decoded": self.decoded,
                "reused": self.reused, "skipped": len(self.skipped)}


def cache_folder(cache_dir, options: ImageOptions) -> str:
    return os.path.join(os.fspath(cache_dir), options.key())


def _load_index(folder):
    path = os.path.join(folder, "index.json")
    try:
        with open(path) as fh:
            data = json.load(fh)
        thumbs = {k: base64.b64decode(v) for k, v in data.get("thumb", {}).items()}
        return data.get("files", {}), data.get("phash", {}), thumbs
    except (OSError, ValueError):
        return {}, {}, {}


def _save_index(folder, options, files, phashes, thumbs):
    path = os.path.join(folder, "index.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"options": {"size": options.size, "channels": options.channels,
                               "resize": options.resize, "window": options.window,
                               "frames": options.frames, "key": options.key()},
                   "files": files, "phash": phashes,
                   "thumb": {k: base64.b64encode(v).decode("ascii")
                             for k, v in thumbs.items()}}, fh)
    os.replace(tmp, path)


def build_cache(index: DatasetIndex | list[Sample], options: ImageOptions, cache_dir,
                workers: int | None = None, progress: bool | None = None,
                phash: bool = True) -> CacheResult:
    """Decode every sample not yet cached, in a process pool; reuse the rest.

    Extra images of multi-input samples are cached too (keyed by their path).
    """
    plan = plan_build(index, options, cache_dir, phash)
    results = scan.run(plan.tasks, workers, progress, desc="cache")
    return finish_build(plan, results)


@dataclass
class BuildPlan:
    """What a cache build must decode (``tasks``, one per ``pending`` sample) and what it
    reuses (already in ``result``); shared by the process-pool and the Beam builds."""

    options: ImageOptions
    result: CacheResult
    tasks: list
    pending: list
    known_files: dict
    known_phash: dict
    known_thumb: dict


def plan_build(index: DatasetIndex | list[Sample], options: ImageOptions, cache_dir,
               phash: bool = True) -> BuildPlan:
    """Reuse what the cache's ``index.json`` vouches for; list the rest as ``scan.Task``."""
    samples = index.samples if isinstance(index, DatasetIndex) else list(index)
    extras = {path: Sample(path, s.label) for s in samples for _, path in s.extra}
    samples = samples + [x for p, x in extras.items() if p not in {s.id for s in samples}]
    folder = cache_folder(cache_dir, options)
    os.makedirs(folder, exist_ok=True)
    known_files, known_phash, known_thumb = _load_index(folder)
    result = CacheResult(folder=folder, files={})
    tasks, pending = [], []
    for s in samples:
        hit = _fast_hit(s, known_files, known_phash, known_thumb, folder, phash)
        if hit is not None:
            digest, target = hit
            result.files[s.id] = target
            result.digests[s.id] = digest
            name = scan.entry_name(digest, s.frame)
            if name in known_phash:
                result.phashes[s.id] = known_phash[name]
            if name in known_thumb:
                result.thumbs[s.id] = known_thumb[name]
            result.reused += 1
            continue
        tasks.append(scan.Task(s.path, s.frame, options, folder, phash))
        pending.append(s)
    return BuildPlan(options, result, tasks, pending, known_files, known_phash, known_thumb)


def finish_build(plan: BuildPlan, results) -> CacheResult:
    """Record the ``scan.Result`` of each pending sample (in task order); save the index."""
    result, known_files, known_phash = plan.result, plan.known_files, plan.known_phash
    known_thumb = plan.known_thumb
    for s, r in zip(plan.pending, results, strict=True):
        if not r.ok:
            result.skipped.append(Skipped(r.path, r.error_reason, r.error_kind, "decode"))
            continue
        result.files[s.id] = r.cache_file
        result.digests[s.id] = r.digest
        if r.phash is not None:
            result.phashes[s.id] = r.phash
            known_phash[scan.entry_name(r.digest, s.frame)] = r.phash
        if r.thumb is not None:
            result.thumbs[s.id] = r.thumb
            known_thumb[scan.entry_name(r.digest, s.frame)] = r.thumb
        if r.from_cache:
            result.reused += 1
        else:
            result.decoded += 1
        try:
            st = os.stat(s.path)
            known_files[s.path] = [st.st_size, st.st_mtime_ns, r.digest]
        except OSError:
            pass
    _save_index(result.folder, plan.options, known_files, known_phash, known_thumb)
    return result


def _fast_hit(s: Sample, known_files, known_phash, known_thumb, folder, want_phash):
    entry = known_files.get(s.path)
    if not entry:
        return None
    try:
        st = os.stat(s.path)
    except OSError:
        return None
    size, mtime, digest = entry
    if (st.st_size, st.st_mtime_ns) != (size, mtime):
        return None
    target = scan.cache_file_for(folder, digest, s.frame)
    if not os.path.exists(target):
        return None
    name = scan.entry_name(digest, s.frame)
    if want_phash and (name not in known_phash or name not in known_thumb):
        return None  # an index from before thumbnails: the cached pixels give both
    return digest, target
