"""Stage records (``stages/<stage>.json``) and the fingerprints that decide what reruns.

A stage's fingerprint is the SHA-256 of

- the stage's code version (:data:`STAGE_VERSIONS`, bumped when a stage's output changes
  meaning) and kmedtl's version,
- the config values the stage reads (:func:`stage_inputs`; defaults filled in, so writing
  a default out explicitly changes nothing),
- the *tokens* of the stages it depends on.

A stage's token identifies what it produced: the SHA-256 of ``splits.json`` for ``split``
(deterministic, so re-auditing unchanged data leaves training alone), the digest of the
chosen train section for ``tune`` (a rerun search that picks the same hyperparameters leaves
training alone), a fresh random id for every other stage (a retrained model is a different
model, even from the same config).

Upstream tokens enter a fingerprint only for stages listed in ``pipeline.stages``, so adding
a stage (``tune``) to :data:`UPSTREAM` leaves the fingerprints of pipelines without it as
they were.

A record is written as ``running`` when a stage starts and ``done`` (or ``failed`` /
``interrupted``) when it ends, atomically.  A stage is skipped when its record is
``done``, its fingerprint equals the current one and every output it listed still exists
with the recorded size.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import uuid
from pathlib import Path

from kmedtl import __version__
from kmedtl.jsonio import atomic_write, canonical, digest  # digests live in jsonio

RECORD_KIND = "kmedtl-stage"
RECORD_VERSION = 1

#: Bump a stage's number when its outputs change meaning: its records stop matching.
STAGE_VERSIONS = {"audit": 1, "split": 1, "pretrain": 1, "tune": 1, "train": 1,
                  "evaluate": 1, "export": 1, "push": 1}

#: Upstream stages whose tokens enter a stage's fingerprint (when they are in the pipeline).
UPSTREAM = {"audit": (), "split": ("audit",), "pretrain": ("split",),
            "tune": ("split", "pretrain"), "train": ("split", "pretrain", "tune"),
            "evaluate": ("train",), "export": ("train",), "push": ("evaluate", "export")}


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def data_listing(index) -> str:
    """Fingerprint of the data as found on disk: every entry's path, size and mtime (plus
    the manifest file's content), so a changed, added or removed file re-runs the audit."""
    h = hashlib.sha256()
    rows = []
    for s in index.samples:
        try:
            st = os.stat(s.path)
            rows.append((s.id, s.label, s.split, s.frame, st.st_size, st.st_mtime_ns))
        except OSError:
            rows.append((s.id, s.label, s.split, s.frame, None, None))
    for s in index.skipped:
        rows.append((s.path, s.kind))
    h.update(canonical(sorted(rows, key=str)).encode())
    return h.hexdigest()


def stage_inputs(stage: str, pipe, listing: str | None = None) -> dict:
    """The config values ``stage`` depends on (JSON-able, defaults filled in)."""
    cfg = pipe.config.model_dump(mode="json")
    cfg["train"] = pipe.train.model_dump(mode="json")  # validated: defaults filled in
    spec = pipe.spec.model_dump(mode="json")
    # where the cache lives and how many processes decode never change a result
    data = {k: v for k, v in cfg["data"].items() if k not in ("workers", "cache_dir")}
    if stage == "audit":  # balance and normalisation act in the training pipeline only
        audit_data = {k: v for k, v in data.items() if k not in ("balance", "normalization")}
        return {"data": audit_data, "near_threshold": cfg["split"]["near_threshold"],
                "similar_threshold": cfg["split"]["similar_threshold"],
                "listing": listing}
    if stage == "split":
        return {"split": cfg["split"]}
    if stage == "pretrain":
        t = cfg["train"]
        return {"pretrain": spec["pretrain"], "fold": spec["fold"], "data": data,
                "train": {k: t.get(k) for k in ("backbone", "weights", "cut", "seed",
                                                "precision")}}
    if stage in ("train", "tune"):  # verbosity changes no model
        train = {k: v for k, v in cfg["train"].items() if k != "verbose"}
        if train.get("weight_scaling") == "none":  # the fingerprint of runs made before it
            train.pop("weight_scaling")
        if "tune" in spec["stages"]:  # the tune stage always starts a changed search afresh
            train["tune"] = {k: v for k, v in train["tune"].items() if k != "overwrite"}
        if stage == "tune":  # every trial starts from the train section: all of it counts
            return {"train": train, "augment": cfg["augment"], "data": data,
                    "fold": spec["fold"]}
        return {"train": train, "augment": cfg["augment"], "data": data,
                "fold": spec["fold"], "name": cfg["name"]}
    if stage == "evaluate":
        evaluate = dict(spec["evaluate"])
        if evaluate.get("tta") is None:  # off: the fingerprint of runs made before tta
            evaluate.pop("tta", None)
        return {"evaluate": evaluate, "fold": spec["fold"]}
    if stage == "export":
        return {"export": spec["export"]}
    if stage == "push":
        return {"push": spec["push"], "name": cfg["name"]}
    raise KeyError(stage)


def fingerprint(stage: str, inputs: dict, upstream_tokens: dict) -> str:
    return digest({"stage": stage, "stage_version": STAGE_VERSIONS[stage],
                   "kmedtl": __version__, "inputs": inputs, "upstream": upstream_tokens})


def new_token() -> str:
    return uuid.uuid4().hex


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class Records:
    """``<run>/stages/<stage>.json`` read and written atomically."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "stages"

    def path(self, stage: str) -> Path:
        return self.folder / f"{stage}.json"

    def read(self, stage: str) -> dict | None:
        p = self.path(stage)
        if not p.is_file():
            return None
        try:
            with open(p) as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            return None  # a torn or foreign file: the stage simply reruns
        return rec if isinstance(rec, dict) and rec.get("kind") == RECORD_KIND else None

    def write(self, stage: str, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"kind": RECORD_KIND, "version": RECORD_VERSION, "stage": stage, **record}
        p = self.path(stage)
        atomic_write(p, lambda fh: json.dump(record, fh, indent=1, default=str,
                                             allow_nan=False))

    # ---------------------------------------------------------------- outputs
    def describe(self, paths) -> dict:
        """``{path: {"size": bytes}}`` for files, ``{"dir": true}`` for folders; ``path``
        relative to the run folder when inside it, else absolute."""
        out = {}
        for p in paths:
            p = Path(p)
            if not p.exists():
                continue
            key = self.rel(p)
            out[key] = {"dir": True} if p.is_dir() else {"size": p.stat().st_size}
        return out

    def rel(self, p: Path) -> str:
        p = Path(p).resolve()
        try:
            return str(p.relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(p)

    def abs(self, key: str) -> Path:
        p = Path(key)
        return p if p.is_absolute() else self.run_dir / p

    def missing_outputs(self, record: dict) -> list[str]:
        gone = []
        for key, info in (record.get("outputs") or {}).items():
            p = self.abs(key)
            if info.get("dir"):
                if not p.is_dir():
                    gone.append(key)
            elif not p.is_file() or p.stat().st_size != info.get("size"):
                gone.append(key)
        return gone
