"""Dataset fingerprint: what ``kmedtl init`` measures before it writes a recipe.

nnU-Net's planning step in miniature.  :func:`fingerprint` reads a source the way every
stage does (:func:`~kmedtl.data.sources.index_folder` or
:func:`~kmedtl.data.sources.read_manifest`), then measures, with kmedtl's own machinery:

- **layout**: class folders, split folders (``Training/<class>/``) or a CSV manifest
  (its label / path / patient columns found by name: ``class``, ``diagnosis``, ``dx`` ...
  are read as the label, ``lesion_id``, ``subject_id`` ... as the patient), DICOM or not;
- **classes** and their image counts, the source's own split, **patients** (manifest
  ``patient_id``, else DICOM PatientID, kept in memory and only counted);
- **colour or grey, from the pixels**: up to ``sample`` images (seeded, spread over the
  classes) are decoded at 96x96 and scored by the mean of ``|R - G| + |G - B|`` on the
  0-255 scale (:func:`channel_difference`), so a grey picture saved as RGB counts as grey;
- **geometry and encoding from the headers** (:func:`~kmedtl.data.shortcuts.read_properties`,
  no pixels decoded): width, height, short side, aspect ratio, format, colour mode, bit
  depth, DICOM Modality;
- **duplicates and shortcuts** from :func:`~kmedtl.data.audit.audit`: exact, near and
  similar-content groups, label conflicts, and which file properties predict the class
  (``shortcuts.flagged``).

The result is a JSON-able dict (``kmedtl init --json`` writes it).  Nothing in it names a
patient.

Example::

    >>> fp = fingerprint("ham10000-200px/MANIFEST.csv")          # doctest: +SKIP
    >>> fp["colour"]["colour"], fp["geometry"]["short_side"]["median"]  # doctest: +SKIP
    (True, 150.0)
"""

from __future__ import annotations

import csv
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np

from kmedtl.data.audit import audit, dicom_patients
from kmedtl.data.decode import load_image
from kmedtl.data.options import ImageOptions
from kmedtl.data.shortcuts import read_properties
from kmedtl.data.sources import MANIFEST_COLUMNS, index_folder, read_manifest
from kmedtl.errors import DataError, ManifestError

#: Mean ``|R - G| + |G - B|`` (0-255 scale, per pixel, averaged over the sampled images)
#: above which a dataset is colour.  Measured: brain-tumour MRI (RGB JPEGs of grey scans)
#: 0.0, Kermany OCT (grey JPEGs) 0.0, a grey picture saved as an RGB JPEG < 1 (chroma
#: rounding), HAM10000 dermatoscopy 59.6 (the least colourful of its 64 sampled images:
#: 22.3).  3.0 sits far from both.
COLOUR_THRESHOLD = 3.0
#: Images decoded for the colour measurement (at most).
COLOUR_SAMPLE = 64
#: The side the colour sample is decoded at (stretched: no padding bands to dilute it).
COLOUR_SIZE = 96

#: CSV column names read as each manifest field when the CSV has no column of kmedtl's own
#: name (matched case-insensitively, first match wins).
COLUMN_ALIASES = {
    "path": ("path", "file", "filename", "file_name", "image", "image_path", "filepath",
             "img"),
    "label": ("label", "class", "diagnosis", "dx", "target", "category", "finding",
              "class_name", "y"),
    "patient_id": ("patient_id", "patient", "patientid", "subject_id", "subject",
                   "lesion_id", "case_id", "case", "participant_id", "study_id"),
    "split": ("split", "fold", "subset", "partition"),
}


def guess_columns(header: list[str]) -> dict[str, str]:
    """``{kmedtl field: CSV column}`` for the fields whose column is *not* named as kmedtl
    names it (what ``data.columns`` must say); fields already named so are left out."""
    lower = {h.strip().lower(): h.strip() for h in header}
    out = {}
    for field, aliases in COLUMN_ALIASES.items():
        if field in header:
            continue
        for alias in aliases:
            col = lower.get(alias)
            if col is not None and col not in out.values() and col not in MANIFEST_COLUMNS:
                out[field] = col
                break
    return out


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return [c.strip() for c in next(csv.reader(fh), [])]


def open_source(source, hierarchy=None, columns: dict | None = None):
    """``(index, layout)`` for a folder tree or a CSV manifest.

    ``layout`` holds ``kind`` (``folder``/``manifest``), ``path`` (absolute), ``columns``
    (the manifest's ``data.columns`` mapping, guessed by :func:`guess_columns` unless
    given) and ``split_folders`` (the split names a folder tree is divided into).
    """
    path = Path(source).expanduser().resolve()
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".tsv", ".txt"):
            raise ManifestError(f"{path}: give a folder of class folders or a CSV manifest "
                                "(path,label[,patient_id,split]); this file is neither")
        header = _csv_header(path)
        columns = dict(columns) if columns is not None else guess_columns(header)
        index = read_manifest(path, hierarchy, columns=columns)
        return index, {"kind": "manifest", "path": str(path), "columns": columns,
                       "header": header, "split_folders": []}
    if not path.is_dir():
        raise DataError(str(path), "no such folder or manifest file", kind="missing_folder")
    index = index_folder(path, hierarchy, unlabelled=False)
    splits = sorted({s.split for s in index.samples if s.split})
    return index, {"kind": "folder", "path": str(path), "columns": {},
                   "split_folders": splits}


def channel_difference(image: np.ndarray) -> float:
    """Mean ``|R - G| + |G - B|`` of a uint8 RGB image (0 for a grey one)."""
    im = image.astype(np.int16)
    if im.ndim != 3 or im.shape[-1] != 3:
        return 0.0
    return float(np.mean(np.abs(im[..., 0] - im[..., 1]) + np.abs(im[..., 1] - im[..., 2])))


def _spread_sample(samples, n: int, seed: int):
    """Up to ``n`` samples, seeded, taken round-robin over the classes."""
    by_class: dict = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_class.items(), key=lambda kv: str(kv[0]))]
    out = []
    while len(out) < n and any(pools):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop())
    return out


def measure_colour(samples, n: int = COLOUR_SAMPLE, seed: int = 0,
                   threshold: float = COLOUR_THRESHOLD) -> dict:
    """Decode up to ``n`` images and judge colour from their pixels (module docstring)."""
    opts = ImageOptions(size=(COLOUR_SIZE, COLOUR_SIZE), channels=3, resize="stretch")
    values, failed = [], 0
    for s in _spread_sample(samples, n, seed):
        try:
            values.append(channel_difference(load_image(s.path, opts, s.frame).image))
        except DataError:
            failed += 1  # the audit reports it with its reason
    mean = float(np.mean(values)) if values else 0.0
    return {"colour": mean > threshold, "mean_channel_difference": round(mean, 2),
            "min": round(float(np.min(values)), 2) if values else None,
            "max": round(float(np.max(values)), 2) if values else None,
            "colour_images": int(sum(v > threshold for v in values)),
            "n": len(values), "undecodable": failed, "threshold": threshold}


def _quantiles(values) -> dict:
    a = np.asarray(values, dtype=float)
    if not a.size:
        return {}
    q = np.percentile(a, [0, 10, 50, 90, 100])
    return {"min": float(q[0]), "p10": float(q[1]), "median": float(q[2]),
            "p90": float(q[3]), "max": float(q[4])}


def header_statistics(samples) -> dict:
    """Geometry and encoding from every file's header (one row per file)."""
    props, unreadable = [], 0
    for path in sorted({s.path for s in samples}):
        try:
            props.append(read_properties(path))
        except DataError:
            unreadable += 1
    w = [p["width"] for p in props]
    h = [p["height"] for p in props]
    aspect = [p["aspect_ratio"] for p in props]
    elongation = [max(a, 1 / a) for a in aspect]
    sizes = Counter(f"{p['width']}x{p['height']}" for p in props)

    def count(key):
        return dict(Counter(str(p[key]) for p in props if key in p).most_common())

    return {
        "geometry": {"files": len(props), "unreadable": unreadable,
                     "width": _quantiles(w), "height": _quantiles(h),
                     "short_side": _quantiles([min(a, b) for a, b in zip(w, h)]),
                     "aspect_ratio": _quantiles(aspect), "elongation": _quantiles(elongation),
                     "distinct_sizes": len(sizes),
                     "common_sizes": dict(sizes.most_common(3))},
        "encoding": {"format": count("format"), "mode": count("mode"),
                     "channels": count("channels"), "bit_depth": count("bit_depth"),
                     "modality": count("modality"), "photometric": count("photometric")},
    }


def fingerprint(source, *, hierarchy=None, columns: dict | None = None,
                sample: int = COLOUR_SAMPLE, seed: int = 0, cache_dir=None, workers=None,
                progress=None) -> dict:
    """Fingerprint a labelled source (folder tree or manifest; see the module docstring).

    ``hierarchy`` (a :class:`~kmedtl.hierarchy.Hierarchy`) maps raw labels to its leaves
    (classes are then its leaves; labels outside it are skipped and counted);
    ``cache_dir`` keeps the audit's decoded images for the first run's audit.
    """
    index, layout = open_source(source, hierarchy, columns)
    if not index.samples:
        kinds = Counter(s.kind for s in index.skipped)
        raise DataError(layout["path"], "no usable image found (skipped: "
                        f"{dict(kinds) or 'nothing to read'}); kmedtl init needs class "
                        "folders (ROOT/<class>/<image>) or a manifest (path,label[,patient_id])",
                        kind="no_usable_image")
    if any(s.label is None for s in index.samples):
        raise DataError(layout["path"], "the images carry no labels; kmedtl init needs class "
                        "folders (ROOT/<class>/<image>) or a manifest with a label column",
                        kind="no_label")
    headers = header_statistics(index.samples)
    colour = measure_colour(index.samples, sample, seed)
    is_dicom = "DICOM" in headers["encoding"]["format"]
    patients = dicom_patients(index) if is_dicom else {}
    options = ImageOptions(size=(64, 64), channels=3 if colour["colour"] else 1)
    report = audit(index, options, cache_dir=cache_dir, workers=workers, progress=progress,
                   patients=patients, hierarchy=hierarchy)
    used = report["_internal"]["index"]
    ids = {s.id: s.patient_id for s in used.samples if s.patient_id}
    ids.update({k: v for k, v in patients.items() if k in {s.id for s in used.samples}})
    summary, sim = report["summary"], report.get("similarity", {})
    shortcuts = report.get("shortcuts", {})
    by_split = report["counts"]["by_split"]
    return {
        "source": layout["path"],
        "layout": {"kind": layout["kind"], "dicom": is_dicom, "columns": layout["columns"],
                   "split_folders": layout["split_folders"],
                   "manifest_beside": _manifest_beside(layout)},
        "counts": {k: report["counts"][k] for k in ("read", "used", "skipped", "samples")},
        "classes": report["counts"]["by_class"],
        "splits": {k: sum(v.values()) for k, v in by_split.items()}
        if set(by_split) != {"all"} else {},
        "split_classes": by_split if set(by_split) != {"all"} else {},
        "patients": {"images_with_id": len(ids), "distinct": len(set(ids.values())),
                     "all_images": bool(used.samples) and len(ids) == len(used.samples),
                     "from": ("manifest" if layout["kind"] == "manifest"
                              and any(s.patient_id for s in used.samples)
                              else "dicom" if patients else None)},
        "colour": colour,
        **headers,
        "duplicates": {"exact_groups": summary["duplicate_groups"],
                       "exact_files": summary["duplicate_files"],
                       "near_groups": summary["near_duplicate_groups"],
                       "similar_groups": summary["similar_groups"],
                       "largest_similar_group": summary["largest_similar_group"],
                       "similar_threshold": sim.get("threshold"),
                       "similarity_warning": sim.get("warning"),
                       "label_conflicts": summary["label_conflicts"]},
        "shortcuts": {"flagged": list(shortcuts.get("flagged", [])),
                      "combined": bool(shortcuts.get("combined", {}).get("flagged")),
                      "skipped": shortcuts.get("skipped"),
                      "chance": (1.0 / len(shortcuts["classes"])
                                 if shortcuts.get("classes") else None),
                      "balanced_accuracy": {
                          n: shortcuts["properties"][n]["balanced_accuracy"]
                          for n in shortcuts.get("flagged", [])}},
        "skipped_by_kind": summary["skipped_by_kind"],
        "ignored_by_kind": summary["ignored_by_kind"],
    }


def _manifest_beside(layout: dict) -> str | None:
    """A folder tree's own CSV manifest with a patient column (the patient ids a folder
    index cannot see), e.g. HAM10000's ``MANIFEST.csv`` with lesion ids."""
    if layout["kind"] != "folder":
        return None
    try:
        csvs = sorted(p for p in Path(layout["path"]).iterdir()
                      if p.is_file() and p.suffix.lower() == ".csv")
    except OSError:
        return None
    for p in csvs:
        try:
            header = _csv_header(p)
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        mapped = {**{c: c for c in header if c in MANIFEST_COLUMNS}, **guess_columns(header)}
        if {"path", "label", "patient_id"} <= set(mapped):
            return os.fspath(p)
    return None


__all__ = ["COLOUR_THRESHOLD", "channel_difference", "fingerprint", "guess_columns",
           "header_statistics", "measure_colour", "open_source"]
