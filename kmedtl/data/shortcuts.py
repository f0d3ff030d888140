"""Shortcut audit: do non-content file properties predict the label?

A model learns whatever separates the classes.  When image size, file format, encoding or
the scanner differ between classes, it can score well without looking at the anatomy and
then fail on data acquired another way.  This module measures, for every cheap per-file
property, how well that property *alone* predicts the label, and flags the ones that do
clearly better than chance.

Properties are read from file headers only, never from decoded pixels:

- PNG/JPEG/TIFF/BMP (Pillow's ``Image.open``, which parses the header and stops):
  ``width``, ``height``, ``aspect_ratio`` (width / height), ``channels``, ``mode``,
  ``bit_depth``, ``format``, ``file_size`` (bytes), ``jpeg_quant`` (mean of the JPEG
  luminance quantisation table: lower means higher quality) and ``dpi``.
- DICOM (``stop_before_pixels``): ``width`` (Columns), ``height`` (Rows),
  ``aspect_ratio``, ``channels`` (SamplesPerPixel), ``bit_depth`` (BitsStored),
  ``format``, ``file_size``, ``photometric``, ``modality``, ``transfer_syntax``,
  ``manufacturer``, ``manufacturer_model``, ``institution``, ``pixel_spacing`` (row
  spacing, mm) and ``body_part``.  No patient attribute is read into the report.

A file whose header cannot be read is counted in ``unreadable`` (and listed with its
reason in ``unreadable_files``), never dropped silently.  A file truncated *after* its
header still has readable properties: the audit's decoding pass reports it.

Example::

    from kmedtl.data import index_folder
    from kmedtl.data.shortcuts import format_shortcuts, shortcut_audit

    report = shortcut_audit(index_folder("kermany-oct2017-test").samples)
    print("\\n".join(format_shortcuts(report)))
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.tree import DecisionTreeClassifier

from kmedtl.data import dicom, raster
from kmedtl.data.decode import check_file, looks_like_dicom
from kmedtl.data.sources import Sample
from kmedtl.errors import DataError

#: Properties compared as numbers (a threshold tree); all others are categories.
NUMERIC = ("width", "height", "aspect_ratio", "channels", "bit_depth", "file_size",
           "jpeg_quant", "pixel_spacing")
#: Report order (properties that no file has are left out).
PROPERTIES = ("width", "height", "aspect_ratio", "channels", "mode", "bit_depth", "format",
              "file_size", "jpeg_quant", "dpi", "photometric", "modality", "transfer_syntax",
              "manufacturer", "manufacturer_model", "institution", "pixel_spacing",
              "body_part")
#: The flag rule: balanced accuracy above the permutation 95th percentile *and* at least
#: this much above chance (1 / number of classes).
MARGIN = 0.05
MISSING = "<none>"

_SIZE = "resize with `crop` or `stretch` instead of `pad`, so black bands don't encode the " \
        "original aspect, or crop every class to one fixed aspect before training; check " \
        "the model's errors by this property"
_ENCODING = "re-encode all classes the same way (one format, bit depth, colour mode and " \
            "quality) before training"
_SITE = "balance classes across scanners or sites, and report results per site"
REMEDIES = {
    "width": _SIZE, "height": _SIZE, "aspect_ratio": _SIZE,
    "channels": _ENCODING, "mode": _ENCODING, "bit_depth": _ENCODING, "format": _ENCODING,
    "jpeg_quant": _ENCODING, "dpi": _ENCODING, "photometric": _ENCODING,
    "transfer_syntax": _ENCODING,
    "file_size": _ENCODING + "; file size also follows image size and content, so check "
                 "whether width/height are flagged too",
    "manufacturer": _SITE, "manufacturer_model": _SITE, "institution": _SITE,
    "pixel_spacing": "resample every class to one pixel spacing; " + _SITE,
    "modality": "train and test on one modality per model, or balance classes across "
                "modalities",
    "body_part": "balance classes across body parts, or train one model per body part",
}
COMBINED_REMEDY = "several properties together predict the class: remove the differences " \
                  "listed above, or balance classes across them"

METHOD = (
    "One row per image file, properties read from headers (no pixels decoded).  For each "
    "property alone (numbers: a depth-3 decision tree on the value; categories: a decision "
    "tree on the one-hot values) and for all of them together (depth-4 tree), the label is "
    "predicted out of fold with stratified {k}-fold cross-validation{grouped} and scored "
    "by balanced accuracy (mean recall over classes; chance = 1 / classes).  Trees weight "
    "classes by inverse frequency.  chance_p95 is the 95th percentile of the same score "
    "over {p} random permutations of the labels (same folds).  A property is flagged when "
    "its balanced accuracy exceeds chance_p95 and chance + {m:.2f}.  Constant properties "
    "are skipped; a value missing for some files (other format) counts as its own value."
)


def shortcut_audit(samples: Iterable[Sample], *,
                   label_of: Mapping[str, str] | Callable[[Sample], str | None] | None = None,
                   folds: int = 5, permutations: int = 30, seed: int = 0,
                   min_per_class: int = 5) -> dict:
    """How well does each non-content file property predict the label?

    ``samples``: :class:`~kmedtl.data.sources.Sample` objects (frames of one file count
    once).  ``label_of`` maps a sample id to its class name (or is a function of the
    sample), e.g. to audit hierarchy leaves; by default ``Sample.label``.  Samples without
    a label are counted in ``counts.unlabelled``.  When the samples carry ``patient_id``,
    the folds keep each patient in one fold (``StratifiedGroupKFold``).  Classes with
    fewer than ``min_per_class`` readable files are left out (``classes_left_out``).

    Returns a JSON-able dict (see :data:`METHOD` for the procedure):
    ``{"properties": {name: {"balanced_accuracy", "chance", "chance_p95", "flagged",
    "distinct", "by_class", "remedy"?} or {"skipped": "constant", "distinct", "value"}},
    "combined": {...}, "flagged": [names], "n", "unreadable", "unreadable_files",
    "counts", "classes", "folds", "grouped_by", "method"}``, or ``{"skipped": reason,
    ...}`` when there is nothing to measure (``"unlabelled"``, ``"one_class"``,
    ``"too_few"``).

    >>> report = shortcut_audit(index.samples)            # doctest: +SKIP
    >>> report["flagged"]                                  # doctest: +SKIP
    ['width', 'height', 'aspect_ratio']
    """
    rows: dict[tuple[str, str], dict] = {}  # (path, label) -> {"group": ...}
    unlabelled: set[str] = set()
    for s in samples:
        label = _label(s, label_of)
        if label is None:
            unlabelled.add(s.path)
            continue
        row = rows.setdefault((s.path, str(label)), {"group": None})
        if getattr(s, "patient_id", None) and row["group"] is None:
            row["group"] = "p:" + str(s.patient_id)
    files = len({p for p, _ in rows} | unlabelled)
    counts = {"files": files, "used": 0, "unreadable": 0, "unlabelled": len(unlabelled),
              "rare_class": 0}
    if not rows:
        return {"skipped": "unlabelled", "counts": counts, "n": 0, "unreadable": 0,
                "flagged": []}

    props_of: dict[str, dict | None] = {}
    unreadable_files = []
    for path in sorted({p for p, _ in rows}):
        try:
            props_of[path] = read_properties(path)
        except DataError as err:
            props_of[path] = None
            unreadable_files.append({"path": err.path, "reason": err.reason, "kind": err.kind})
    table = [(path, label, props_of[path], row["group"])
             for (path, label), row in sorted(rows.items()) if props_of[path] is not None]
    counts["unreadable"] = len(unreadable_files)

    per_class = Counter(label for _, label, _, _ in table)
    rare = sorted(c for c, k in per_class.items() if k < min_per_class)
    table = [r for r in table if r[1] not in rare]
    counts["rare_class"] = sum(per_class[c] for c in rare)
    counts["used"] = len(table)
    classes = sorted({r[1] for r in table})
    base = {"counts": counts, "n": len(table), "unreadable": len(unreadable_files),
            "unreadable_files": unreadable_files, "classes": classes,
            "classes_left_out": {c: per_class[c] for c in rare}, "flagged": []}
    if len(classes) < 2:
        return {"skipped": "one_class" if len(per_class) == 1 else "too_few", **base}

    y = np.array([classes.index(r[1]) for r in table])
    has_groups = any(r[3] for r in table)
    groups = np.array([r[3] or "f:" + r[0] for r in table])
    n_groups = len(set(groups.tolist()))
    k = min(folds, int(np.bincount(y).min()), n_groups)
    if k < 2:
        return {"skipped": "too_few", **base}
    fold_of = _folds(y, groups if has_groups else None, k, seed)
    chance = 1.0 / len(classes)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(y) for _ in range(permutations)]
    leaf = max(2, min(20, len(table) // 100))

    names = [p for p in PROPERTIES if any(p in r[2] for r in table)]
    report_props, features = {}, {}
    for name in names:
        values = [r[2].get(name) for r in table]
        present = [v for v in values if v is not None]
        distinct = len(set(values))
        if distinct == 1:
            report_props[name] = {"skipped": "constant", "distinct": 1,
                                  "value": _jsonable(present[0] if present else None)}
            continue
        x = _encode(name, values)
        features[name] = x
        depth = 3 if name in NUMERIC else None
        entry = _score(x, y, perms, fold_of, k, depth, leaf, seed, chance)
        entry["distinct"] = distinct
        entry["by_class"] = _by_class(name, values, y, classes)
        if entry["flagged"]:
            entry["remedy"] = REMEDIES.get(name, _ENCODING)
        report_props[name] = entry

    if features:
        x_all = np.hstack(list(features.values()))
        combined = _score(x_all, y, perms, fold_of, k, 4, leaf, seed, chance)
        combined["properties"] = list(features)
        if combined["flagged"]:
            combined["remedy"] = COMBINED_REMEDY
    else:
        combined = {"skipped": "constant", "properties": []}
    grouped = " (patients kept within one fold)" if has_groups else ""
    return {
        "properties": report_props,
        "combined": combined,
        **base,
        "flagged": [n for n, e in report_props.items() if e.get("flagged")],
        "folds": k,
        "permutations": permutations,
        "grouped_by": "patient" if has_groups else "file",
        "method": METHOD.format(k=k, grouped=grouped, p=permutations, m=MARGIN),
    }


def format_shortcuts(report: dict) -> list[str]:
    """Short console lines for a :func:`shortcut_audit` report."""
    if "skipped" in report:
        why = {"unlabelled": "no labelled files",
               "one_class": "only one class",
               "too_few": "too few files per class"}.get(report["skipped"], report["skipped"])
        return [f"shortcut audit skipped: {why}"]
    lines = []
    for name in report["flagged"]:
        e = report["properties"][name]
        lines.append(f"shortcut: {name} predicts the class ({_numbers(e)}) -> {e['remedy']}")
    combined = report.get("combined", {})
    if combined.get("flagged"):
        lines.append(f"shortcut: all file properties together predict the class "
                     f"({_numbers(combined)}) -> {combined['remedy']}")
    if not lines:
        lines.append("no non-content property predicts the label above chance "
                     f"({len(report['properties'])} properties, {report['n']} files)")
    if report.get("unreadable"):
        lines.append(f"shortcut audit: {report['unreadable']} file(s) whose header could not "
                     "be read are left out of it (see unreadable_files)")
    if report.get("classes_left_out"):
        left = ", ".join(f"{c} ({k})" for c, k in report["classes_left_out"].items())
        lines.append(f"shortcut audit: classes with too few files left out: {left}")
    return lines


def read_properties(path) -> dict:
    """Header properties of one image file (PNG/JPEG/... or DICOM), without decoding pixels.

    Raises :class:`~kmedtl.errors.DataError` when the header cannot be read.
    """
    path = str(path)
    try:
        check_file(path)  # never opens a FIFO or a device
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(132)
            if size == 0:
                raise DataError(path, "file is empty (0 bytes)", kind="zero_byte")
            if looks_like_dicom(path, head):
                return _dicom_properties(path, size)
            fh.seek(0)
            return _raster_properties(fh, path, size)
    except DataError:
        raise
    except OSError as exc:
        raise DataError(path, f"cannot read the file ({exc.strerror or exc})",
                        kind="unreadable") from None
    except Exception as exc:  # noqa: BLE001 - a damaged header value: one unreadable file
        raise DataError(path, f"corrupt header ({type(exc).__name__}: {exc})",
                        kind="corrupt_header") from None


def _raster_properties(fh, path: str, size: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning: nothing is decoded here
        try:
            img = raster.open_image(fh)  # PNG/JPEG/TIFF/BMP only
        except Image.DecompressionBombError as exc:
            raise DataError(path, f"{exc}; refused", kind="too_large") from None
        except Exception as exc:  # noqa: BLE001 - any header failure is one unreadable file
            raise DataError(path, f"unreadable image header ({type(exc).__name__}: {exc})",
                            kind="corrupt_image") from None
        with img:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise DataError(path, f"image header announces {w}x{h} pixels",
                                kind="corrupt_image")
            props = {"width": w, "height": h, "aspect_ratio": round(w / h, 4),
                     "channels": len(img.getbands()), "mode": img.mode,
                     "bit_depth": _BIT_DEPTH.get(img.mode, 8), "format": img.format or "?",
                     "file_size": size}
            quant = getattr(img, "quantization", None)
            if quant:
                table = quant.get(0, next(iter(quant.values())))
                props["jpeg_quant"] = round(float(np.mean(table)), 2)
            dpi = img.info.get("dpi")
            if dpi:
                props["dpi"] = "x".join(f"{float(d):g}" for d in dpi)
    return props


_BIT_DEPTH = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def _dicom_properties(path: str, size: int) -> dict:
    ds = dicom.read_dataset(path, path, stop_before_pixels=True)
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        rows = cols = 0
    if rows <= 0 or cols <= 0:
        raise DataError(path, "DICOM header has no image size (Rows/Columns)",
                        kind="not_image")
    props = {"width": cols, "height": rows, "aspect_ratio": round(cols / rows, 4),
             "format": "DICOM", "file_size": size}
    for name, keyword in (("channels", "SamplesPerPixel"), ("bit_depth", "BitsStored")):
        v = _number(ds.get(keyword))
        if v is not None:
            props[name] = v
    for name, keyword in (("photometric", "PhotometricInterpretation"),
                          ("modality", "Modality"), ("manufacturer", "Manufacturer"),
                          ("manufacturer_model", "ManufacturerModelName"),
                          ("institution", "InstitutionName"),
                          ("body_part", "BodyPartExamined")):
        v = ds.get(keyword)
        if v is not None and str(v).strip():
            props[name] = str(v).strip()[:64]
    spacing = ds.get("PixelSpacing")
    if spacing is not None:
        try:
            props["pixel_spacing"] = round(float(spacing[0]), 4)
        except (TypeError, ValueError, IndexError):
            pass
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax:
        props["transfer_syntax"] = getattr(tsyntax, "name", None) or str(tsyntax)
    return props


def _number(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return int(v) if v.is_integer() else v


def _label(sample: Sample, label_of) -> str | None:
    if label_of is None:
        return sample.label
    if callable(label_of):
        return label_of(sample)
    return label_of.get(sample.id, sample.label)


def _folds(y, groups, k: int, seed: int) -> np.ndarray:
    """Fold number of every row (stratified; grouped when ``groups`` is given)."""
    fold_of = np.empty(len(y), dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "least populated class has only n members"
        if groups is None:
            splits = StratifiedKFold(k, shuffle=True, random_state=seed).split(y, y)
        else:
            splits = StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(
                y, y, groups)
        for i, (_, test) in enumerate(splits):
            fold_of[test] = i
    return fold_of


def _encode(name: str, values: list) -> np.ndarray:
    """A numeric column (missing -> -1) or one-hot columns of the 30 commonest values."""
    if name in NUMERIC:
        return np.array([-1.0 if v is None else float(v) for v in values])[:, None]
    keys = [MISSING if v is None else str(v) for v in values]
    top = [v for v, _ in Counter(keys).most_common(30)]
    return np.array([[k == t for t in top] for k in keys], dtype=np.float32)


def _balanced_accuracy(y, pred, n_classes: int) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in range(n_classes)]))


def _cv_predict(x, y, fold_of, k, depth, leaf, seed) -> np.ndarray:
    pred = np.empty_like(y)
    for f in range(k):
        test = fold_of == f
        tree = DecisionTreeClassifier(max_depth=depth, min_samples_leaf=leaf,
                                      class_weight="balanced", random_state=seed)
        tree.fit(x[~test], y[~test])
        pred[test] = tree.predict(x[test])
    return pred


def _score(x, y, perms, fold_of, k, depth, leaf, seed, chance) -> dict:
    n_classes = int(y.max()) + 1
    ba = _balanced_accuracy(y, _cv_predict(x, y, fold_of, k, depth, leaf, seed), n_classes)
    null = [_balanced_accuracy(p, _cv_predict(x, p, fold_of, k, depth, leaf, seed), n_classes)
            for p in perms]
    p95 = float(np.percentile(null, 95)) if null else chance
    return {"balanced_accuracy": round(ba, 4), "chance": round(chance, 4),
            "chance_p95": round(p95, 4),
            "flagged": bool(ba > p95 and ba >= chance + MARGIN)}


def _by_class(name: str, values: list, y, classes: list[str]) -> dict:
    out = {}
    few = len(set(values)) <= 10
    for c, cls in enumerate(classes):
        vals = [v for v, t in zip(values, y) if t == c]
        if name in NUMERIC:
            nums = [float(v) for v in vals if v is not None]
            summary = ({"median": _jsonable(float(np.median(nums))),
                        "mean": _jsonable(float(np.mean(nums))),
                        "min": _jsonable(min(nums)), "max": _jsonable(max(nums))}
                       if nums else {})
            if nums and few:  # a handful of values (e.g. 3 image sizes): their counts too
                summary["top"] = [[_jsonable(v), k] for v, k in Counter(nums).most_common(3)]
            if len(nums) < len(vals):
                summary["missing"] = len(vals) - len(nums)
            out[cls] = summary
        else:
            top = Counter(MISSING if v is None else str(v) for v in vals).most_common(3)
            out[cls] = {"top": [[v, k] for v, k in top], "n": len(vals)}
    return out


def _jsonable(v):
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return None
        return int(v) if v.is_integer() else round(v, 4)
    return v


def _numbers(e: dict) -> str:
    return (f"balanced accuracy {e['balanced_accuracy']:.2f}, chance {e['chance']:.2f}, "
            f"permutation 95% {e['chance_p95']:.2f}")
