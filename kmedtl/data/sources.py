"""Where samples come from: folder-per-class trees, CSV manifests, DICOM series folders.

Indexing is cheap (no pixel decoding): it lists entries, maps labels through the
``Hierarchy`` and expands multi-frame DICOMs / series folders into one sample per frame
when asked to.  Every entry it cannot use is recorded in ``DatasetIndex.skipped`` with a
reason, and ``DatasetIndex.counts()`` reconciles: read = used + skipped.

In a folder tree *every* file under the root is read: operating-system and archive
metadata (``__MACOSX/``, AppleDouble ``._*`` files, ``.DS_Store``, ``Thumbs.db``), other
hidden files and documentation beside the data are skipped with their own reason kinds
(``IGNORED_KINDS``).  They are listed by kind in every summary, never decide whether a
folder is a class or a split folder, and never fail strict mode.

Two layouts read differently from what a user may mean, so they are said out loud:

- a hierarchy leaf that merges several class folders (``intact: [BG, N]`` with folders
  ``BG/`` and ``N/``: one class, not two) is logged as a warning and kept in
  ``DatasetIndex.warnings``, which the audit report carries;
- top folders named like splits (``Train/``, ``Test/``, ``Validation/``..., see
  ``SPLIT_NAMES``) are read as the source's own split: :func:`split_folders` lists them
  and :func:`check_source_split` explains a source split that ``split.method: source``
  cannot use (no test part, or no training part).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kmedtl._text import printable
from kmedtl.data import dicom
from kmedtl.data.decode import check_file, looks_like_dicom, read_head
from kmedtl.data.options import ImageOptions
from kmedtl.errors import ConfigError, DataError, ManifestError, StrictModeError

log = logging.getLogger("kmedtl.data")

#: Folder names recognised as split folders in a folder-per-class tree.
SPLIT_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}

#: Skip kinds of files that are not data the user meant: counted in ``read`` and listed by
#: kind, but never an error under ``strict`` (a macOS zip always carries them).
IGNORED_KINDS = frozenset({"macosx_folder", "appledouble", "ds_store", "thumbs_db", "hidden",
                           "documentation"})

_THUMBS = {"thumbs.db": "Windows thumbnail cache", "ehthumbs.db": "Windows thumbnail cache",
           "desktop.ini": "Windows folder settings"}
_DOC_SUFFIXES = (".md", ".txt", ".rst", ".pdf", ".html", ".htm", ".csv", ".tsv", ".json",
                 ".yaml", ".yml", ".xml")
_DOC_STEMS = ("readme", "license", "licence", "notice", "citation", "changelog")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".dic",
                  ".ima", "")


@dataclass(frozen=True)
class Sample:
    """One training example: an image file (one frame of it) and its labels.

    ``patient_id`` stays in memory (split grouping only); ``split`` is the split given by
    the source (folder layout or manifest column), if any.  ``extra`` holds further
    images of the same case for multi-input models as ``((name, path), ...)``.
    """

    path: str
    label: str | None
    patient_id: str | None = None
    split: str | None = None
    frame: int | None = None
    extra: tuple = ()
    entry: str | None = None  # the source entry (manifest row) it came from; default: path

    @property
    def id(self) -> str:
        return self.path if self.frame is None else f"{self.path}#{self.frame}"

    @property
    def entry_key(self) -> str:
        return self.entry or self.path


@dataclass(frozen=True)
class Skipped:
    """An entry that could not be used, and why (``kind`` is a short reason code)."""

    path: str
    reason: str
    kind: str = "data_error"
    stage: str = "index"
    entry: str | None = None
    label: str | None = None  # the raw label, for ``unknown_label`` skips

    @property
    def entry_key(self) -> str:
        return self.entry or self.path

    @property
    def ignored(self) -> bool:
        """OS/archive metadata, hidden files, documentation: not a data problem."""
        return self.kind in IGNORED_KINDS

    def to_dict(self) -> dict:
        d = {"path": self.path, "reason": self.reason, "kind": self.kind, "stage": self.stage}
        if self.label is not None:
            d["label"] = self.label
        return d

    @classmethod
    def from_error(cls, err: DataError, stage: str) -> Skipped:
        return cls(err.path, err.reason, err.kind, stage)


@dataclass
class DatasetIndex:
    """Samples plus what was skipped. ``read`` counts entries (files / manifest rows)."""

    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    read: int = 0
    root: str | None = None
    #: what indexing found questionable but not wrong (e.g. a hierarchy leaf that merges
    #: several class folders); logged once and carried into the audit report
    warnings: list[str] = field(default_factory=list)
    #: what was indexed: "folder" (a class-folder tree), "manifest", or None (other)
    source: str | None = None

    def counts(self) -> dict:
        """Entries (files of a folder tree, rows of a manifest): read = used + skipped.

        An entry is *used* while at least one of its samples (frames, series slices)
        remains, *skipped* otherwise; ``samples`` counts what the model will see.
        """
        used = {s.entry_key for s in self.samples}
        skipped = {s.entry_key for s in self.skipped} - used
        return {"read": self.read, "used": len(used), "skipped": len(skipped),
                "samples": len(self.samples)}

    def drop(self, skipped: list[Skipped]) -> DatasetIndex:
        """A new index without the samples whose files a later pass skipped.

        Each skipped file is recorded once per entry (manifest row) that named it.  A
        multi-input sample goes when any of its images does (an extra image's skip names
        the manifest column it came from).
        """
        bad = {s.path for s in skipped}
        entries: dict[str, list[str]] = {}
        columns: dict[tuple, str] = {}  # (path, entry) -> manifest image column
        for s in self.samples:
            if s.path in bad and s.entry_key not in entries.get(s.path, []):
                entries.setdefault(s.path, []).append(s.entry_key)
            for col, p in s.extra:
                if p in bad and s.entry_key not in entries.get(p, []):
                    entries.setdefault(p, []).append(s.entry_key)
                    columns[(p, s.entry_key)] = col
        extra = []
        for k in skipped:
            for entry in entries.get(k.path, [k.entry]):
                col = columns.get((k.path, entry))
                reason = k.reason if col is None else (
                    f"{entry}: image column {col!r} (input {col!r}): {k.reason}; the whole "
                    "case is left out (every input of a multi-input sample is needed)")
                extra.append(Skipped(k.path, reason, k.kind, k.stage, entry, k.label))
        return DatasetIndex(
            samples=[s for s in self.samples
                     if s.path not in bad and not any(p in bad for _, p in s.extra)],
            skipped=self.skipped + extra,
            read=self.read,
            root=self.root,
            warnings=list(self.warnings),
            source=self.source,
        )

    def problems(self) -> list[Skipped]:
        """Skips that are data problems (everything but ``IGNORED_KINDS``)."""
        return [s for s in self.skipped if not s.ignored]

    def check_strict(self, strict: bool):
        if strict and self.problems():
            raise StrictModeError(self.problems())

    @property
    def labelled(self) -> bool:
        """False for an unlabelled folder (every sample's label is ``None``)."""
        return not self.samples or any(s.label is not None for s in self.samples)

    def relpath(self, path: str) -> str:
        if self.root:
            try:
                return os.path.relpath(path, self.root)
            except ValueError:
                return path
        return path

    def label_counts(self) -> Counter:
        return Counter(s.label for s in self.samples)


def junk_kind(name: str) -> str | None:
    """The skip kind of a file or folder name that is metadata rather than data, or None.

    ``__MACOSX`` (a macOS zip's resource-fork folder), AppleDouble ``._name`` files,
    ``.DS_Store``, ``Thumbs.db``/``desktop.ini`` and any other name starting with ``.``.
    """
    if name == "__MACOSX":
        return "macosx_folder"
    if name.startswith("._"):
        return "appledouble"
    if name == ".DS_Store":
        return "ds_store"
    if name.lower() in _THUMBS:
        return "thumbs_db"
    if name.startswith("."):
        return "hidden"
    return None


def _junk_reason(kind: str, name: str, folder: str | None = None) -> str:
    if folder is not None:
        what = ("inside __MACOSX/, the metadata copy a macOS zip adds; delete that folder"
                if kind == "macosx_folder" else
                f"inside the hidden folder {folder!r}; not part of the dataset")
        return f"{what} (not an image)"
    return {
        "appledouble": f"AppleDouble file: macOS metadata for {name[2:]!r}, not an image "
                       "(unzip with ditto or delete the '._' files)",
        "ds_store": "macOS folder metadata (.DS_Store), not an image",
        "thumbs_db": f"{_THUMBS.get(name.lower(), 'Windows metadata')} ({name}), not an image",
        "hidden": "hidden file (name starts with '.'); rename it if it is an image",
    }[kind]


def _is_documentation(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(_DOC_SUFFIXES) or lower.split(".", 1)[0] in _DOC_STEMS


def _walk_files(folder: Path, skipped: list[Skipped]) -> list[Path]:
    """Files under ``folder`` (recursively, sorted), recording folders that cannot be read.

    Metadata files and everything inside metadata folders (``junk_kind``) are appended to
    ``skipped`` with their kind instead of being returned, so that each one is counted.
    A symlinked sub-folder is followed once: one that leads back into a folder this walk
    has already entered (a loop, or a second link to the same folder) is recorded as a
    ``symlink_loop`` skip instead, so nothing is lost without a trace.
    """
    out = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_record_unreadable(skipped),
                                                followlinks=True):
        here = _folder_key(dirpath)
        if here is not None:
            seen.add(here)
        dirnames.sort()
        keep = []
        for d in dirnames:
            kind = junk_kind(d)
            full = Path(dirpath) / d
            if kind is not None:  # count its files under the folder's kind
                _skip_junk_folder(full, kind, skipped)
                continue
            key = _folder_key(full) if os.path.islink(full) else None
            if key is not None and key in seen:  # every folder above was entered first
                skipped.append(Skipped(
                    str(full), f"symbolic link to a folder already read ({os.path.realpath(full)}"
                    "): followed once only, so its files are counted where they were first "
                    "found", "symlink_loop"))
                continue
            if key is not None:
                seen.add(key)
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            kind = junk_kind(f)
            if kind is None:
                out.append(Path(dirpath) / f)
            else:
                skipped.append(Skipped(str(Path(dirpath) / f), _junk_reason(kind, f), kind))
    return out


def _folder_key(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _walk_all(folder: Path, skipped: list[Skipped]) -> list[Path]:
    """Every file under ``folder``, whatever its name (unreadable folders recorded)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_record_unreadable(skipped)):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return out


def _record_unreadable(skipped: list[Skipped]):
    """``os.walk``'s onerror: an unreadable folder is one entry read and skipped (its files
    are unknown)."""
    def onerror(exc):
        skipped.append(Skipped(str(exc.filename), f"cannot list folder ({exc.strerror}): "
                               "check its permissions", "unreadable_folder"))

    return onerror


def _skip_junk_folder(folder: Path, kind: str, skipped: list[Skipped]) -> None:
    """Every file inside a metadata folder (``__MACOSX``, ``.git`` ...), skipped as ``kind``."""
    for f in _walk_all(folder, skipped):
        skipped.append(Skipped(str(f), _junk_reason(kind, f.name, folder.name), kind))


def _stray_file(p: Path) -> Skipped:
    """A file directly in the root or a split folder: metadata, documentation or an image
    without a class folder."""
    kind = junk_kind(p.name)
    if kind is not None:
        return Skipped(str(p), _junk_reason(kind, p.name), kind)
    if _is_documentation(p.name):
        return Skipped(str(p), "documentation or metadata beside the data, not an image",
                       "documentation")
    return Skipped(str(p), "file is not inside a class folder", "no_label")


def index_folder(root, hierarchy=None, options: ImageOptions | None = None, *,
                 unlabelled: bool | None = None) -> DatasetIndex:
    """Index ``root/<class>/...`` or ``root/<split>/<class>/...`` (split names such as
    ``Training``/``Testing`` are recognised case-insensitively).

    Files below a class folder belong to that class (a series sub-folder is fine).  Every
    file under ``root`` is counted in ``read``: metadata (``__MACOSX/``, ``._*``,
    ``.DS_Store``, ``Thumbs.db``), hidden files and documentation are skipped with their
    own kinds and never change whether the top folders are read as classes or splits.

    ``unlabelled=True`` makes every (non-metadata) file under ``root`` an unlabelled sample
    (label ``None``): what ``kmedtl data audit`` does with a PACS export.  The default
    (``None``) does so when no hierarchy is given and ``root`` holds files but no folders.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(str(root_path), "dataset folder does not exist", kind="missing_folder")
    skipped: list[Skipped] = []
    samples: list[Sample] = []
    try:
        top = sorted(root_path.iterdir())
    except PermissionError:
        raise DataError(str(root_path), "cannot list the dataset folder (permission denied)",
                        kind="unreadable_folder") from None
    top_dirs = [p for p in top if p.is_dir() and junk_kind(p.name) is None]
    top_files = [p for p in top if not p.is_dir()]
    if unlabelled is None:
        unlabelled = (hierarchy is None and not top_dirs and any(
            junk_kind(p.name) is None and not _is_documentation(p.name) for p in top_files))
    for p in top:
        if p.is_dir() and junk_kind(p.name) is not None:
            _skip_junk_folder(p, junk_kind(p.name), skipped)
    if unlabelled:
        for p in top_files:
            if junk_kind(p.name) is not None or _is_documentation(p.name):
                skipped.append(_stray_file(p))
            else:
                samples.append(Sample(str(p), None))
        for d in top_dirs:
            samples.extend(Sample(str(f), None) for f in _walk_files(d, skipped))
        read = len(samples) + len(skipped)
        index = DatasetIndex(samples, skipped, read, root=str(root_path), source="folder")
        return _expand_frames(index, options)
    has_splits = bool(top_dirs) and all(p.name.lower() in SPLIT_NAMES for p in top_dirs)
    layers = ([(SPLIT_NAMES[p.name.lower()], p) for p in top_dirs] if has_splits
              else [(None, root_path)])
    for p in top_files:
        skipped.append(_stray_file(p))
    folder_labels: list[str] = []
    for split, base in layers:
        try:
            entries = sorted(base.iterdir())
        except PermissionError:
            skipped.append(Skipped(str(base), "cannot list folder (permission denied)",
                                   "unreadable_folder"))
            continue
        if has_splits:
            for p in entries:
                if not p.is_dir():
                    skipped.append(_stray_file(p))
                elif junk_kind(p.name) is not None:
                    _skip_junk_folder(p, junk_kind(p.name), skipped)
        class_dirs = [p for p in entries if p.is_dir() and junk_kind(p.name) is None]
        for class_dir in class_dirs:
            label = class_dir.name
            folder_labels.append(label)
            files = _walk_files(class_dir, skipped)
            if hierarchy is not None and label not in hierarchy:
                for f in files:
                    skipped.append(Skipped(str(f), _label_reason(label, hierarchy),
                                           "unknown_label", label=label))
                continue
            samples.extend(Sample(str(f), label, split=split) for f in files)
    read = len(samples) + len(skipped)
    warnings = merged_folder_warnings(hierarchy, folder_labels, root_path)
    index = DatasetIndex(samples, skipped, read, root=str(root_path), warnings=warnings,
                         source="folder")
    return _expand_frames(index, options)


_WARNED: set[str] = set()


def merged_folder_warnings(hierarchy, folder_labels, root) -> list[str]:
    """Warnings for hierarchy leaves that merge several class folders (each folder a class
    in the data, but one leaf in the tree: ``intact: [BG, N]``); each is logged once per
    process and returned for the audit."""
    if hierarchy is None:
        return []
    out = []
    for leaf, raws in hierarchy.merged_leaves(folder_labels).items():
        msg = f"{root}: " + hierarchy.merge_warning(leaf, raws, "class folders")
        out.append(msg)
        if msg not in _WARNED:
            _WARNED.add(msg)
            log.warning("%s", printable(msg))
    return out


def _label_reason(label, hierarchy) -> str:
    return (f"label {label!r} is not in the hierarchy (known: {sorted(hierarchy.raw_labels)}); "
            "add it to the hierarchy YAML or remove these files")


def split_folders(index: DatasetIndex) -> dict[str, dict]:
    """The top folders of a folder-tree index that were read as the source's split
    (``SPLIT_NAMES``): ``{folder name: {"split", "images", "classes": {class: n}}}``, in
    folder order.  Empty for a manifest (its ``split`` column) or a tree without split
    folders."""
    out: dict[str, dict] = {}
    if index.source != "folder" or not index.root:
        return out
    for s in index.samples:
        if s.split is None:
            continue
        rel = os.path.relpath(s.path, index.root)
        folder = rel.split(os.sep, 1)[0]
        if folder.lower() not in SPLIT_NAMES:
            continue
        info = out.setdefault(folder, {"split": s.split, "images": 0, "classes": {}})
        info["images"] += 1
        info["classes"][s.label] = info["classes"].get(s.label, 0) + 1
    return dict(sorted(out.items()))


def check_source_split(index: DatasetIndex, where: str = "split.method: source") -> None:
    """Raise a :class:`ConfigError` that explains a source split ``split.method: source``
    cannot use: no test part, or no training part (e.g. a dataset whose only top folder is
    ``Test/``: read as a split folder, every image becomes a test image).  Names the
    folders read as splits and what each holds, the layout expected and the way out."""
    parts = {s.split or "train" for s in index.samples}
    if not index.samples or ("test" in parts and parts - {"test"}):
        return
    missing = "training" if "test" in parts else "test"
    folders = split_folders(index)
    names = ", ".join(f"{k}/ (read as {v['split']}: {v['images']} images; classes "
                      + ", ".join(f"{c} {n}" for c, n in sorted(v["classes"].items())) + ")"
                      for k, v in folders.items())
    by_manifest = index.source == "manifest" and any(s.split for s in index.samples)
    if folders:
        found = (f"the top folder(s) of {index.root} are named like splits ("
                 f"{'/'.join(sorted(SPLIT_NAMES))}, any case), so they were read as the "
                 f"source's own split, not as classes: {names}")
    elif by_manifest:
        found = "the manifest's split column gives " + ", ".join(
            f"{p} {sum(1 for s in index.samples if (s.split or 'train') == p)}"
            for p in sorted(parts))
    else:
        found = (f"{index.root or 'the data'} comes with no split of its own (no "
                 "Train/Test-style top folders, no manifest split column): every image is "
                 "a training image")
    raise ConfigError(
        f"{where}: the data's own split has no {missing} images: {found}.  "
        "split.method: source keeps a split the data came with; it needs a layout like "
        "<root>/Training/<class>/... and <root>/Testing/<class>/... (or a manifest split "
        "column with train and test rows).  If the folder is not a split: use "
        "split.method: holdout, kfold or repeated (they ignore split folders and make a "
        "grouped split of all images)"
        + (", or point data.root at the folder that holds the class folders (e.g. "
           f"{os.path.join(index.root, next(iter(folders)))}), or rename it"
           if folders and len(folders) == 1 else "") + ".")


#: The manifest columns kmedtl reads; ``columns`` maps them to a CSV's own header names.
MANIFEST_COLUMNS = ("path", "label", "patient_id", "split", "frame")


def read_manifest(path, hierarchy=None, options: ImageOptions | None = None,
                  extra_columns: list[str] | tuple = (), root=None,
                  columns: dict | None = None) -> DatasetIndex:
    """Index a CSV manifest with columns ``path``, ``label`` and ``patient_id``.

    Optional columns: ``split`` (train/val/test), ``frame`` and the image columns named in
    ``extra_columns`` (further image types of the same case).  ``columns`` maps kmedtl's
    names to the CSV's (``{"label": "class"}`` reads the label from a ``class`` column), so
    a dataset's own manifest is read as it is; the CSV's other columns are ignored.
    Relative paths are resolved against ``root`` (default: the manifest's folder).  A path
    may name a DICOM series folder: its slices become frames, ordered by InstanceNumber.
    """
    mpath = Path(path)
    if not mpath.is_file():
        raise ManifestError(f"{mpath}: manifest file not found")
    base = Path(root) if root else mpath.parent
    skipped: list[Skipped] = []
    samples: list[Sample] = []
    with open(mpath, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [c.strip() for c in (reader.fieldnames or [])]
        mapping = _column_mapping(columns, header, mpath)
        # the fields found (kmedtl names), then the CSV's other columns (extra images)
        cols = list(mapping) + [c for c in header if c not in mapping.values()
                                and c not in MANIFEST_COLUMNS]
        required = ("path", "label")
        missing = [c for c in required if c not in cols]
        if missing:
            raise ManifestError(f"{mpath}: missing column(s) {missing}; the header has {cols} "
                                "(required: path, label; recommended: patient_id)")
        absent = [c for c in extra_columns if c not in cols]
        if absent:
            raise ManifestError(
                f"{mpath}: data.extra_columns: extra image column(s) {absent} not in the CSV "
                f"header {header}; add the column(s) to the manifest (one further image of "
                "the case per row), or list only existing columns in data.extra_columns")
        clash = [c for c in extra_columns if c in MANIFEST_COLUMNS or c in mapping.values()]
        if clash:
            raise ManifestError(
                f"{mpath}: data.extra_columns: {clash} are manifest fields (path, label, "
                "patient_id, split, frame, or a column mapped in data.columns), not further "
                "image columns; the main image is the 'path' field, list only the other "
                "image columns")
        if len(set(extra_columns)) != len(extra_columns):
            raise ManifestError(f"{mpath}: data.extra_columns: {list(extra_columns)} names a "
                                "column twice; each image column is one model input")
        rows = list(reader)
    for lineno, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if columns:
            row = {**{k: v for k, v in row.items() if k not in MANIFEST_COLUMNS},
                   **{name: row.get(col, "") for name, col in mapping.items()}}
        where = f"{mpath}:{lineno}"
        rel = row.get("path", "")
        if not rel:
            skipped.append(Skipped(where, "empty path", "bad_row", entry=where))
            continue
        full = str(base / rel) if not os.path.isabs(rel) else rel
        label = row.get("label") or None
        if label is None:
            skipped.append(Skipped(full, f"{where}: empty label", "no_label", entry=where))
            continue
        if hierarchy is not None and label not in hierarchy:
            skipped.append(Skipped(full, _label_reason(label, hierarchy), "unknown_label",
                                   entry=where, label=label))
            continue
        if not os.path.exists(full):
            skipped.append(Skipped(full, f"{where}: path in manifest does not exist",
                                   "missing_file", entry=where))
            continue
        split = row.get("split") or None
        if split is not None:
            split = SPLIT_NAMES.get(split.lower())
            if split is None:
                skipped.append(Skipped(full, f"{where}: split {row['split']!r} is not one of "
                                       "train/val/test", "bad_row", entry=where))
                continue
        frame = None
        if row.get("frame"):
            try:
                frame = int(row["frame"])
            except ValueError:
                skipped.append(Skipped(full, f"{where}: frame {row['frame']!r} is not an integer",
                                       "bad_row", entry=where))
                continue
        extra = []
        for col in extra_columns:
            value = row.get(col, "")
            if not value:
                extra = None
                skipped.append(Skipped(
                    full, f"{where}: image column {col!r} is empty; every row needs one image "
                    f"per input (fill in the {col} path, or remove the row)", "bad_row",
                    entry=where))
                break
            epath = str(base / value) if not os.path.isabs(value) else value
            if not os.path.exists(epath):
                extra = None
                skipped.append(Skipped(
                    epath, f"{where}: image column {col!r}: {epath} does not exist (relative "
                    f"paths are read from {base}); fix the path in the CSV or remove the row",
                    "missing_file", entry=where))
                break
            extra.append((col, epath))
        if extra is None:
            continue
        samples.append(Sample(full, label, row.get("patient_id") or None, split, frame,
                              tuple(extra), entry=where))
    index = DatasetIndex(samples, skipped, read=len(rows), root=str(base), source="manifest")
    return _expand_frames(index, options)


def _column_mapping(columns: dict | None, header: list[str], mpath) -> dict[str, str]:
    """``{kmedtl name: CSV column}``: identity, overridden by ``columns``; checked."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(MANIFEST_COLUMNS))
    if unknown:
        raise ManifestError(f"data.columns: {unknown} are not manifest fields; map any of "
                            f"{list(MANIFEST_COLUMNS)} to a column of {mpath.name}")
    for name, col in columns.items():
        if col not in header:
            raise ManifestError(f"data.columns.{name}: {mpath}: no column {col!r}; the header "
                                f"has {header}")
    return {name: columns.get(name, name) for name in MANIFEST_COLUMNS
            if columns.get(name, name) in header}


def _expand_frames(index: DatasetIndex, options: ImageOptions | None) -> DatasetIndex:
    """Series folders become their slices; with ``frames: all`` every frame is a sample.

    First every file is checked with ``stat`` (nothing is opened): FIFOs, sockets and
    devices (``not_regular_file``) and files over ``data.max_file_bytes``
    (``file_too_large``) are skipped here, before any later pass could open or read them.
    A DICOM announcing more than ``data.max_frames`` frames is skipped under ``frames:
    all`` (``too_many_frames``), not expanded nor truncated.
    """
    options = options if options is not None else ImageOptions()
    mode = options.frames
    out: list[Sample] = []
    skipped = list(index.skipped)
    for s in index.samples:
        if os.path.isdir(s.path):
            try:
                slices = series_slices(s.path, options.max_file_bytes)
            except DataError as err:
                skipped.append(Skipped(err.path, err.reason, err.kind, "index", s.entry))
                continue
            chosen = {"first": slices[:1], "middle": slices[len(slices) // 2:][:1],
                      "all": slices}[mode] if s.frame is None else [slices[s.frame]]
            out.extend(Sample(f, s.label, s.patient_id, s.split, None, s.extra, s.entry_key)
                       for f in chosen)
            continue
        bad = _screen(s, options.max_file_bytes)
        if bad is not None:
            skipped.append(bad)
            continue
        if mode == "all" and s.frame is None and _maybe_dicom(s.path, options.max_file_bytes):
            try:
                ds = dicom.read_dataset(s.path, s.path, stop_before_pixels=True)
                n = dicom.n_frames(ds)
            except DataError:
                n = 1  # the decode pass reports the real problem
            if n > options.max_frames:
                skipped.append(Skipped(
                    s.path, f"header announces {n:,} frames, over data.max_frames = "
                    f"{options.max_frames:,} (frames: all makes one sample per frame); raise "
                    "data.max_frames if the file really has that many, or use frames: "
                    "middle", "too_many_frames", "index", s.entry))
                continue
            if n > 1:
                out.extend(Sample(s.path, s.label, s.patient_id, s.split, i, s.extra, s.entry)
                           for i in range(n))
                continue
        out.append(s)
    return DatasetIndex(out, skipped, index.read, index.root, list(index.warnings),
                        index.source)


def _screen(s: Sample, max_bytes: int) -> Skipped | None:
    """A skip for a sample whose file (or an extra image's) must not be read, else None."""
    for col, path in ((None, s.path), *s.extra):
        try:
            check_file(path, max_bytes)
        except DataError as err:
            if err.kind not in ("not_regular_file", "file_too_large"):
                continue  # missing, unreadable ...: the decode pass reports it as before
            reason = err.reason if col is None else (
                f"{s.entry_key}: image column {col!r} (input {col!r}): {err.reason}; the "
                "whole case is left out (every input of a multi-input sample is needed)")
            return Skipped(path, reason, err.kind, "index", s.entry)
    return None


def _maybe_dicom(path: str, max_bytes: int | None = None) -> bool:
    try:
        head = read_head(path, 132, max_bytes)
    except DataError:
        return False
    return looks_like_dicom(path, head)


def series_slices(folder, max_bytes: int | None = None) -> list[str]:
    """DICOM files of a series folder ordered by InstanceNumber (then file name).

    Only regular files within ``max_bytes`` (``data.max_file_bytes``) are looked at.
    """
    files = [str(p) for p in sorted(Path(folder).iterdir()) if p.is_file()
             and not p.name.startswith(".")]
    keyed = []
    for f in files:
        try:
            check_file(f, max_bytes)
            ds = dicom.read_dataset(f, f, stop_before_pixels=True)
        except DataError:
            continue
        try:
            with dicom.quiet_pydicom():
                inst = int(ds.get("InstanceNumber", 0) or 0)
        except Exception:  # noqa: BLE001 - missing or damaged: order by file name
            inst = 0
        keyed.append((inst, f))
    if not keyed:
        raise DataError(str(folder), "series folder holds no readable DICOM file",
                        kind="empty_series")
    return [f for _, f in sorted(keyed)]
