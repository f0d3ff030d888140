"""From a config to ready data: index -> audit/cache (one decode pass) -> leakage-free split.

Used by the CLI (``kmedtl data ...``) and by training/pipelines, so every stage sees the
same samples, the same skips and the same split.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from kmedtl.data import splits as splitlib
from kmedtl.data.audit import audit, dicom_patients, training_lookalikes
from kmedtl.data.cache import CacheResult, build_cache
from kmedtl.data.dicomweb import DicomWebSpec, pull
from kmedtl.data.labels import check_labels
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import (
    DatasetIndex,
    Sample,
    check_source_split,
    index_folder,
    read_manifest,
)
from kmedtl.errors import ConfigError, DataError
from kmedtl.hierarchy import Hierarchy

log = logging.getLogger("kmedtl.data")


class PrepareConfig(Protocol):
    """What this module reads of a run config (the ``Config`` that ``load_config`` returns).

    ``data`` (source, root, manifest, columns, dicomweb, strict, workers, cache_dir,
    unknown_labels, ...) and ``split`` (method, file, val, test, k, repeats, seed, dedupe,
    near_threshold, similar_threshold, n_per_class) are its sections.  A structural type,
    so the data layer does not import the config face above it.
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
    seconds: float = 0.0  # wall time prepare() took (train_metrics' prepare_seconds)

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


#: What a model input may be called: it names the SavedModel / TFLite / ONNX input too.
_INPUT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def primary_input(d) -> str:
    """The name of the main image's input (``d`` is the ``data`` section): the CSV column
    that ``data.columns.path`` maps the ``path`` field to (``columns: {path: t1}`` names it
    ``t1``), else ``image``."""
    if d.source == "manifest" and (d.columns or {}).get("path"):
        return d.columns["path"]
    return "image"


def input_names(d, check: bool = True) -> list[str]:
    """The image inputs of the configured data, main image first: ``[primary_input(d),
    *data.extra_columns]``; one name is a single-input source.

    With ``check`` (and more than one input) every name must be a valid model input name
    (a letter, then letters, digits or ``_``: it becomes the exported models' input name)
    and the names distinct; a :class:`ConfigError` says which and how to fix it.
    """
    extra = list(d.extra_columns or ())
    if extra and d.source != "manifest":
        raise ConfigError(f"data.extra_columns: {extra} are CSV columns of a manifest, but "
                          f"data.source is {d.source!r}; multi-input data comes from a "
                          "manifest (data.source: manifest) with one column per image type")
    names = [primary_input(d), *extra]
    if check and len(names) > 1:
        where = source_name(d)
        for name in names:
            if not _INPUT_NAME.fullmatch(name):
                what = ("data.columns.path (the main image's column)" if name == names[0]
                        else "data.extra_columns")
                raise ConfigError(
                    f"{where}: {what}: column {name!r} names a model input and must start "
                    "with a letter and hold only letters, digits and '_' (it becomes the "
                    "input name of the SavedModel, TFLite and ONNX models); rename the "
                    "column in the CSV")
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: inputs {names}: the main image (data.columns.path) "
                              "and data.extra_columns must name different columns")
    return names


def check_model_inputs(model_inputs, data_inputs, where: str,
                       error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` unless the model's input names equal the data's (as sets; the order
    follows the names), naming both and the fix."""
    model_inputs = list(model_inputs or ())
    data_inputs = list(data_inputs)
    if len(model_inputs) <= 1 and len(data_inputs) == 1:
        return
    if set(model_inputs) == set(data_inputs):
        return
    if len(model_inputs) <= 1:
        raise error(f"{where}: the data has {len(data_inputs)} image inputs {data_inputs} "
                    "(data.extra_columns) but the model takes one image; train with "
                    "train.model: multi_input, or drop data.extra_columns")
    missing = [n for n in model_inputs if n not in data_inputs]
    unknown = [n for n in data_inputs if n not in model_inputs]
    raise error(f"{where}: the model's inputs are {model_inputs} but the data gives "
                f"{data_inputs} (main image: data.columns.path, else 'image'; then "
                f"data.extra_columns); missing {missing}, not a model input {unknown}: name "
                "the manifest's image columns as in training (data.columns.path and "
                "data.extra_columns)")


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
            progress: bool | None = None, indexed: tuple | None = None) -> Prepared:
    """Index (unless ``indexed``, the ``(index, hierarchy)`` :func:`load_index` already gave
    for this ``cfg``: ``kmedtl run`` indexes once, so a DICOMweb source is queried once),
    audit, cache and split the configured data."""
    t0 = time.perf_counter()
    index, hierarchy = load_index(cfg) if indexed is None else indexed
    options = cfg.image_options()
    workers = workers or cfg.data.workers
    report = audit(index, options, cache_dir=cfg.data.cache_dir, workers=workers,
                   progress=progress, near_threshold=cfg.split.near_threshold,
                   similar_threshold=cfg.split.similar_threshold,
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
    return Prepared(used, hierarchy, options, report, splits, cache,
                    seconds=time.perf_counter() - t0)


#: A similar-content group over this share of the images makes a split meaningless (it
#: would sit whole in train or whole in test); HAM10000's dermatoscopy photos chain 1,722
#: of 1,759 images at the default threshold.  Tiny test sets are exempt.
CHAIN_ERROR_SHARE = 0.5
CHAIN_MIN_IMAGES = 40


def make_splits(cfg: PrepareConfig, index: DatasetIndex, hierarchy: Hierarchy, report: dict):
    s = cfg.split
    ids = [x.id for x in index.samples]
    labels = [hierarchy.leaf_of(x.label) for x in index.samples]
    patients = {x.id: x.patient_id for x in index.samples if x.patient_id}
    patients.update(dicom_patients(index))
    digests = report["_internal"]["digests"] if s.dedupe != "none" else None
    near = list(report["_internal"]["near_pairs"]) if s.dedupe in ("near", "similar") else []
    if s.dedupe == "similar":
        near += [(a, b) for a, b, _ in report["_internal"]["similar_pairs"]]
    groups = splitlib.leakage_groups(ids, patients, digests, near)
    excluded = _copies_of_excluded(cfg, index, report)
    if excluded:  # kept out of every part, listed in the split file's "dropped"
        keep = [k for k, i in enumerate(ids) if i not in excluded]
        if not keep:
            raise ConfigError(f"split.exclude_copies_of: all {len(ids)} images copy an image "
                              f"of {', '.join(s.exclude_copies_of)}; nothing is left to split")
        index = replace(index, samples=[index.samples[k] for k in keep])
        ids, labels = [ids[k] for k in keep], [labels[k] for k in keep]
        groups = groups[keep]
    if s.dedupe == "similar" and len(ids) >= CHAIN_MIN_IMAGES:
        largest = int(np.bincount(groups).max())
        if largest > CHAIN_ERROR_SHARE * len(ids):
            raise ConfigError(
                f"split.dedupe: similar: one similar-content group holds {largest} of "
                f"{len(ids)} images (thumbnails correlating >= {s.similar_threshold} chain "
                "look-alikes of different patients together), so no stratified split is "
                "possible; raise split.similar_threshold (the audit's 'similarity' section "
                "shows the distribution), group by patient ids (a manifest patient column), "
                "or use split.dedupe: near")
    if s.file:
        out = _split_from_file(s.file, index, ids)
    elif s.method == "source":
        check_source_split(index)  # e.g. a lone Test/ top folder: say what was read as what
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
                          f"similar_threshold {s.similar_threshold}, "
                          f"patients): {'; '.join(problems[:3])}; make the split with this "
                          "run's settings instead")
    if problems:  # a bug, never a data problem: refuse to hand out a leaking split
        raise AssertionError("leaking split: " + "; ".join(problems[:5]))
    out.params["dedupe"] = s.dedupe
    if s.exclude_copies_of:
        out.params["exclude_copies_of"] = [os.path.basename(p) for p in s.exclude_copies_of]
        out.dropped += [{"id": i, "reason": f"{v['reason']} copy of an image in "
                         "split.exclude_copies_of",
                         "match": os.path.join(os.path.basename(os.path.dirname(v["match"])),
                                               os.path.basename(v["match"]))}
                        for i, v in sorted(excluded.items())]
    return out


def _copies_of_excluded(cfg: PrepareConfig, index: DatasetIndex, report: dict) -> dict:
    """Sample id -> match for every image that copies an image of ``split.exclude_copies_of``
    (exact, pHash or similar content, at the split's thresholds)."""
    s = cfg.split
    if not s.exclude_copies_of:
        return {}
    options = cfg.image_options()
    reference = []
    for src in s.exclude_copies_of:
        if os.path.isdir(src):
            reference += index_folder(src, None, options).samples
        elif os.path.isfile(src) and src.endswith(".csv"):
            reference += read_manifest(src, None, options).samples
        else:
            raise ConfigError(f"split.exclude_copies_of: {src}: not a folder or a CSV "
                              "manifest; name the external set's folder or manifest")
    digests, phashes, thumbs = report["_internal"]["hashes"]
    return training_lookalikes(index.samples, reference, options,
                               near_threshold=s.near_threshold,
                               similar_threshold=s.similar_threshold,
                               known=(digests, phashes, thumbs),
                               cache_dir=cfg.data.cache_dir, workers=cfg.data.workers)


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
