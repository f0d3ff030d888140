"""From a config to ready data: index -> audit/cache (one decode pass) -> leakage-free split.

Used by the CLI (``kmedtl data ...``) and by training/pipelines, so every stage sees the
same samples, the same skips and the same split.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from kmedtl.data import splits as splitlib
from kmedtl.data.audit import audit, dicom_patients
from kmedtl.data.cache import CacheResult, build_cache
from kmedtl.data.dicomweb import DicomWebSpec, pull
from kmedtl.data.labels import check_labels
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import DatasetIndex, Sample, index_folder, read_manifest
from kmedtl.errors import ConfigError, DataError
from kmedtl.hierarchy import Hierarchy

log = logging.getLogger("kmedtl.data")


class PrepareConfig(Protocol):
    """What this module reads of a run config (the ``Config`` that ``load_config`` returns).

    ``data`` (source, root, manifest, columns, dicomweb, strict, workers, cache_dir,
    unknown_labels, ...) and ``split`` (method, file, val, test, k, repeats, seed, dedupe,
    near_threshold, n_per_class) are its sections.  A structural type, so the data layer
    does not import the config face above it.
    """

    data: Any
    split: Any

    def hierarchy(self) -> Hierarchy | None: ...

    def image_options(self) -> ImageOptions: ...


@dataclass
class Prepared:
    index: DatasetIndex  # usable samples (undecodable files dropped, listed in skipped)
    hierarchy: Hierarchy
    options: ImageOptions
    report: dict  # the audit report (see kmedtl.data.audit)
    splits: splitlib.Splits
    cache: CacheResult | None

    def samples(self, part: str, fold: int = 0) -> list[Sample]:
        """Samples of ``train``/``val``/``test`` in fold ``fold``."""
        by_id = {s.id: s for s in self.index.samples}
        return [by_id[i] for i in getattr(self.splits.folds[fold], part)]


def load_index(cfg: PrepareConfig, *, allow_unlabelled: bool = False,
               unlabelled: bool | None = None) -> tuple[DatasetIndex, Hierarchy | None]:
    """Index the configured source; without a hierarchy the labels found make a flat one.

    A folder with no class folders is indexed unlabelled (every file a sample with label
    ``None``); that is only allowed for the audit (``allow_unlabelled``), which then gets
    ``None`` for the hierarchy (as it does for a single label).  Anything that needs labels
    gets an error saying so.
    """
    hierarchy = cfg.hierarchy()
    options = cfg.image_options()
    d = cfg.data
    if d.source == "folder":
        index = index_folder(d.root, hierarchy, options, unlabelled=unlabelled)
    elif d.source == "dicomweb":
        result = pull(DicomWebSpec.from_dict(d.dicomweb), hierarchy, options,
                      strict=d.strict)
        log.info("dicomweb: %s", result.summary())
        index = result.index
    else:
        index = read_manifest(d.manifest, hierarchy, options, d.extra_columns,
                              columns=d.columns)
    if not index.labelled:
        if allow_unlabelled:
            return index, None
        raise DataError(
            d.root, "no class folders: the images lie directly in the folder, so they have no "
            "labels; put them in <root>/<class>/ folders (or list them in a CSV manifest "
            "with a label column); `kmedtl data audit` audits unlabelled folders",
            kind="no_labels")
    if hierarchy is None:
        labels = sorted({s.label for s in index.samples if s.label is not None})
        if len(labels) < 2 and allow_unlabelled:
            return index, None  # an audit needs no hierarchy: counts per label still work
        if len(labels) < 2:
            raise DataError(
                source_name(d), f"found {len(labels)} label(s) {labels}: a classifier needs "
                "at least two classes (folders <root>/<class>/ or the manifest's label column)",
                kind="no_labels")
        hierarchy = Hierarchy.flat(labels)
    return index, hierarchy


def source_name(d) -> str:
    """What a message names for the configured source: its folder, manifest or server."""
    return {"folder": d.root, "manifest": d.manifest}.get(d.source) or \
        str((d.dicomweb or {}).get("url"))


def require_usable(report: dict, where: str) -> None:
    """Zero usable images is an error naming the skip reasons (never a silent 0)."""
    c = report["counts"]
    if c["used"]:
        return
    kinds = Counter(s["kind"] for s in report["skipped"])
    why = ", ".join(f"{k} {v}" for k, v in kinds.most_common()) or "no files found"
    raise DataError(where, f"no usable images: read {c['read']} = used 0 + skipped "
                    f"{c['skipped']} ({why}); see the audit's skipped list", kind="no_images")


def prepare(cfg: PrepareConfig, *, workers: int | None = None,
            progress: bool | None = None) -> Prepared:
    index, hierarchy = load_index(cfg)
    options = cfg.image_options()
    workers = workers or cfg.data.workers
    report = audit(index, options, cache_dir=cfg.data.cache_dir, workers=workers,
                   progress=progress, near_threshold=cfg.split.near_threshold,
                   hierarchy=hierarchy)
    used: DatasetIndex = report["_internal"]["index"]
    require_usable(report, source_name(cfg.data))
    used.check_strict(cfg.data.strict)
    for note in check_labels(used, hierarchy, cfg.data.unknown_labels):
        log.warning(note)
    cache = None
    if cfg.data.cache_dir:
        # the audit hashed a 64 px rendering; the training-size cache needs no hashes
        cache = build_cache(used, options, cfg.data.cache_dir, workers, progress=False,
                            phash=False)
    splits = make_splits(cfg, used, hierarchy, report)
    return Prepared(used, hierarchy, options, report, splits, cache)


def make_splits(cfg: PrepareConfig, index: DatasetIndex, hierarchy: Hierarchy, report: dict):
    s = cfg.split
    ids = [x.id for x in index.samples]
    labels = [hierarchy.leaf_of(x.label) for x in index.samples]
    patients = {x.id: x.patient_id for x in index.samples if x.patient_id}
    patients.update(dicom_patients(index))
    digests = report["_internal"]["digests"] if s.dedupe != "none" else None
    near = report["_internal"]["near_pairs"] if s.dedupe == "near" else ()
    groups = splitlib.leakage_groups(ids, patients, digests, near)
    if s.file:
        out = _split_from_file(s.file, index, ids)
    elif s.method == "source":
        out = splitlib.source_split(ids, labels, groups, [x.split for x in index.samples],
                                    s.val, s.seed)
    elif s.method == "holdout":
        out = splitlib.holdout(ids, labels, groups, s.val, s.test, s.seed)
    elif s.method == "kfold":
        out = splitlib.kfold(ids, labels, groups, s.k, s.val, s.seed)
    else:
        out = splitlib.repeated(ids, labels, groups, s.repeats, s.val, s.test, s.seed)
    if s.n_per_class is not None:
        label_of = dict(zip(ids, labels))
        for fold in out.folds:
            fold.train = splitlib.per_class_subset(fold.train, [label_of[i] for i in fold.train],
                                                   s.n_per_class, s.seed)
        out.params["n_per_class"] = s.n_per_class
    problems = splitlib.check_no_leak(out, dict(zip(ids, groups.tolist())))
    if problems and s.file:
        raise ConfigError(f"split.file: {s.file} leaks under this run's leakage groups "
                          f"(split.dedupe {s.dedupe}, near_threshold {s.near_threshold}, "
                          f"patients): {'; '.join(problems[:3])}; make the split with this "
                          "run's settings instead")
    if problems:  # a bug, never a data problem: refuse to hand out a leaking split
        raise AssertionError("leaking split: " + "; ".join(problems[:5]))
    out.params["dedupe"] = s.dedupe
    return out


def _split_from_file(path, index: DatasetIndex, ids: list[str]):
    """A split file made elsewhere, mapped onto this index (ids relative to its root)."""
    if not os.path.isfile(path):
        raise ConfigError(f"split.file: {path}: file not found")
    out = splitlib.Splits.load(path, root=index.root)
    known = set(ids)
    for k, fold in enumerate(out.folds):
        for part in ("train", "val", "test"):
            missing = [i for i in getattr(fold, part) if i not in known]
            if missing:
                raise ConfigError(
                    f"split.file: {path}: fold {k} {part} names {len(missing)} sample(s) this "
                    f"run does not use, e.g. {os.path.relpath(missing[0], index.root or '.')}; "
                    "was it made from the same data (and the same skipped files)?")
    out.params = {**out.params, "file": os.path.basename(path)}
    return out
