"""Dataset audit: counts, undecodable files, exact and near duplicates, patient overlap.

The report (a JSON-able dict) has these keys:

- ``counts``: ``read``/``used``/``skipped``/``samples`` (read = used + skipped),
  ``by_class`` and ``by_split`` (split -> class -> samples).
- ``skipped``: ``[{path, reason, kind, stage}]`` for every entry that could not be used.
- ``duplicate_groups``: lists of paths with byte-identical content (SHA-256).
- ``cross_split_duplicate_groups``: those groups that span more than one split.
- ``near_duplicate_groups`` / ``cross_split_near_duplicate_groups``: groups linked by a
  perceptual hash (DCT pHash) within ``near_threshold`` bits that are not all identical.
- ``similar_groups`` / ``cross_split_similar_groups``: groups of images whose 32x32 grey
  thumbnails correlate at or above ``similar_threshold`` (adjacent slices of one scan,
  re-crops, re-encodes), beyond what the pHash links; ``similarity`` holds the evidence for
  the threshold (see :func:`similarity_evidence`).
- ``label_conflicts``: duplicate or near-duplicate groups whose members carry different
  labels.
- ``shortcuts``: how well non-content properties (width, height, aspect, format, file
  size, DICOM scanner fields...) predict the label on their own, cross-validated against
  chance, with a remedy for each one flagged (:mod:`kmedtl.data.shortcuts`).
- ``patient_overlap``: patients found in more than one split, as salted pseudonyms (a
  fresh random salt per report, so nothing links back to a real ID).
- ``warnings``: what indexing found questionable but not wrong (a hierarchy leaf that
  merges several class folders, :attr:`DatasetIndex.warnings`).
- ``summary``: group counts, ``skipped_by_kind`` (every skip has a kind) and
  ``ignored_by_kind`` (the subset that is metadata/hidden/documentation, not data).

An unlabelled index (a folder of files without class folders, e.g. a PACS export) is
audited the same way without label statistics: ``counts.labelled`` is false and
``by_class``/``label_conflicts`` are empty.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from kmedtl._text import printable
from kmedtl.data import decode, dicom, scan
from kmedtl.data.cache import build_cache
from kmedtl.data.decode import looks_like_dicom
from kmedtl.data.hashing import hamming_pairs, popcount, similar_pairs, thumbnail_matrix
from kmedtl.data.options import ImageOptions
from kmedtl.data.shortcuts import format_shortcuts, shortcut_audit
from kmedtl.data.sources import DatasetIndex, Skipped
from kmedtl.data.splits import _UnionFind
from kmedtl.errors import DataError

DEFAULT_NEAR_THRESHOLD = 2

#: Default correlation at or above which two 32x32 grey thumbnails (of the 64 px audit
#: rendering) are "similar content".  Chosen on brain-tumor-mri/Training (no patient IDs;
#: many adjacent slices): pairs whose thumbnails of the *original* JPEGs correlate >= 0.95
#: score >= 0.937 on this rendering in 99% of cases, and grouping at 0.935 left 0.2-0.5% of
#: a stratified test split with a >= 0.95 neighbour (pHash alone: 42-43%; 0.94: 1.2-2.0%;
#: 0.95: 10-13%) while the largest group held 131 of 2,870 images (0.93: 189, 0.90: 419).
#: On OCT, where
#: patient IDs are known, most pairs this similar are *different* patients (83% at 0.935):
#: a low-resolution correlation links look-alikes, not just one patient's images, so it
#: groups conservatively (safe for leakage, costly only in split freedom) and is a
#: fallback for data without patient IDs.  ``benchmarks/similarity_threshold.py``
#: re-measures all of this; the audit reports the same evidence for each dataset.
DEFAULT_SIMILAR_THRESHOLD = 0.935


def scan_index(index: DatasetIndex, options: ImageOptions, cache_dir=None, workers=None,
               progress=None, warnings_out: dict | None = None):
    """Decode every sample once; returns (digests, phashes, thumbs, skipped), the first
    three keyed by sample id.  ``warnings_out`` (a dict) receives sample id -> decode
    warning (e.g. a DICOM window covering none of the pixels)."""
    warnings_out = {} if warnings_out is None else warnings_out
    if cache_dir is not None:
        res = build_cache(index, options, cache_dir, workers, progress, phash=True)
        warnings_out.update(res.warnings)
        return res.digests, res.phashes, res.thumbs, res.skipped
    tasks = [scan.Task(s.path, s.frame, options, None, True) for s in index.samples]
    # further images of multi-input samples are decoded too (not hashed: duplicates and
    # the split go by the main image), so an unreadable one drops its case here
    ids = {s.id for s in index.samples}
    extras = sorted({p for s in index.samples for _, p in s.extra} - ids)
    tasks += [scan.Task(p, None, options, None, False) for p in extras]
    digests, phashes, thumbs, skipped = {}, {}, {}, []
    results = scan.run(tasks, workers, progress, desc="audit")
    for s, r in zip(index.samples, results):
        if r.ok:
            digests[s.id], phashes[s.id], thumbs[s.id] = r.digest, r.phash, r.thumb
            if (r.meta or {}).get("warning"):
                warnings_out[s.id] = r.meta["warning"]
        else:
            skipped.append(Skipped(r.path, r.error_reason, r.error_kind, "decode"))
    for r in results[len(index.samples):]:
        if not r.ok:
            skipped.append(Skipped(r.path, r.error_reason, r.error_kind, "decode"))
    return digests, phashes, thumbs, skipped


#: Near duplicates are found on a fixed 64x64 rendering of each image (the run's window,
#: channels and resize mode, not its size): the perceptual hash of a 64 px and of a 160 px
#: rendering differ by a bit or two, so with the run's own size two runs of one dataset at
#: different sizes grouped a few pairs differently, and one run's split leaked under the
#: other's groups.  With one hash size every run of a dataset gets the same groups (and
#: the same split for the same seed), so models at any resolution compare on the same
#: test cases.  64 px is what the pHash needs (ImageHash reduces to 32x32) and what the
#: audit counts in the README were measured at.
HASH_SIZE = 64


def hash_options(options: ImageOptions) -> ImageOptions:
    """The options the duplicate hashes are taken with: ``options`` at ``HASH_SIZE``."""
    return replace(options, size=(HASH_SIZE, HASH_SIZE))


def audit(index: DatasetIndex, options: ImageOptions | None = None, *, splits=None,
          cache_dir=None, workers=None, near_threshold: int = DEFAULT_NEAR_THRESHOLD,
          progress=None, patients: dict | None = None, hierarchy=None,
          runner: str = "process", beam_options=None,
          similar_threshold: float = DEFAULT_SIMILAR_THRESHOLD) -> dict:
    """Audit a dataset index. ``splits`` (sample id -> split name) defaults to the split
    the source gave each sample (folder layout or manifest column).  Duplicates are found
    at :data:`HASH_SIZE` whatever ``options.size`` is (see :func:`hash_options`).
    ``runner="beam"`` does the per-file work and the duplicate grouping as Apache Beam jobs
    (:mod:`kmedtl.data.beam`, ``beam_options``: standard Beam pipeline flags)."""
    options = options or ImageOptions()
    if runner not in ("process", "beam"):
        raise ValueError(f"runner={runner!r}: use 'process' or 'beam'")
    image_warnings: dict = {}  # sample id -> decode warning
    if runner == "beam":
        # lazy: Apache Beam, an optional extra (pip install 'kmedtl[beam]'), runner="beam" only
        from kmedtl.data import beam

        digests, phashes, thumbs, skipped = beam.scan_index_beam(
            index, hash_options(options), cache_dir, beam_options, workers=workers)
    else:
        digests, phashes, thumbs, skipped = scan_index(index, hash_options(options),
                                                       cache_dir, workers, progress,
                                                       warnings_out=image_warnings)
    used = index.drop(skipped)
    split_of = dict(splits) if splits else {s.id: (s.split or "all") for s in used.samples}
    label_of = {s.id: s.label for s in used.samples}
    path_of = {s.id: s.path for s in used.samples}
    rel = index.relpath
    labelled = index.labelled

    def cls(s):
        if not labelled:
            return "unlabelled"
        return hierarchy.leaf_of(s.label) if hierarchy else s.label

    by_class = Counter(cls(s) for s in used.samples) if labelled else Counter()
    by_split: dict = defaultdict(Counter)
    for s in used.samples:
        by_split[split_of.get(s.id, "unassigned")][cls(s)] += 1

    if runner == "beam":  # the same groups as below, as Beam transforms (banded pHash)
        from kmedtl.data import beam  # lazy: Apache Beam (pip install 'kmedtl[beam]')

        g = beam.duplicate_groups(digests, phashes, path_of, near_threshold, beam_options,
                                  work_dir=cache_dir)  # shared with a cluster's workers
        exact, near, near_pairs = g.exact, g.near, [tuple(p) for p in g.near_pairs]
    else:
        exact, near, near_pairs = _duplicate_groups(digests, phashes, path_of,
                                                    near_threshold)

    def crosses(group):
        return len({split_of.get(x) for x in group}) > 1

    def as_paths(group):
        return [rel(path_of[x]) + (f"#{x.rsplit('#', 1)[1]}" if "#" in x else "") for x in group]

    # similar content (done in this process on either runner: one matrix product per
    # 1,024 images, no per-file work left to distribute)
    similar, similar_links, evidence = _similar_groups(
        thumbs, path_of, similar_threshold, exact + near,
        patients_of(used, patients), as_paths)
    if labelled:
        evidence["mixed_label_groups"] = sum(len({label_of[x] for x in g}) > 1
                                             for g in similar)

    conflicts = [as_paths(g) for g in exact + near
                 if labelled and len({label_of[x] for x in g}) > 1]
    report = {
        "counts": {**used.counts(), "labelled": labelled,
                   "by_class": dict(sorted(by_class.items())),
                   "by_split": {k: dict(sorted(v.items())) for k, v in sorted(by_split.items())}},
        "skipped": [s.to_dict() | {"path": rel(s.path)} for s in used.skipped],
        "duplicate_groups": sorted(as_paths(g) for g in exact),
        "cross_split_duplicate_groups": sorted(as_paths(g) for g in exact if crosses(g)),
        "near_duplicate_groups": sorted(as_paths(g) for g in near),
        "cross_split_near_duplicate_groups": sorted(as_paths(g) for g in near if crosses(g)),
        "similar_groups": sorted(as_paths(g) for g in similar),
        "cross_split_similar_groups": sorted(as_paths(g) for g in similar if crosses(g)),
        "similarity": evidence,
        "label_conflicts": sorted(conflicts),
        "patient_overlap": _patient_overlap(used, split_of, patients),
        "warnings": list(index.warnings) + _image_warning_lines(image_warnings, used, rel),
        "image_warnings": [{"path": rel(s.path) + (f"#{s.frame}" if s.frame is not None
                                                   else ""), "warning": image_warnings[s.id]}
                           for s in used.samples if s.id in image_warnings],
        # does a non-content property (size, format, scanner...) predict the label?
        "shortcuts": shortcut_audit(used.samples, label_of={s.id: cls(s) for s in used.samples})
        if labelled else {"skipped": "unlabelled"},
        "params": {"near_threshold": near_threshold, "similar_threshold": similar_threshold,
                   "hash": "sha256 + 64-bit DCT pHash + 32x32 grey thumbnail correlation",
                   "image_options": options.key(), "root": index.root},
    }
    report["summary"] = {
        "duplicate_groups": len(report["duplicate_groups"]),
        "duplicate_files": sum(len(g) for g in report["duplicate_groups"]),
        "cross_split_duplicate_groups": len(report["cross_split_duplicate_groups"]),
        "near_duplicate_groups": len(report["near_duplicate_groups"]),
        "cross_split_near_duplicate_groups": len(report["cross_split_near_duplicate_groups"]),
        "similar_groups": len(report["similar_groups"]),
        "cross_split_similar_groups": len(report["cross_split_similar_groups"]),
        "largest_similar_group": evidence["largest_group"],
        "label_conflicts": len(report["label_conflicts"]),
        "shortcuts_flagged": report["shortcuts"].get("flagged", []),
        "patients_in_several_splits": report["patient_overlap"]["count"],
        "patients_with_id": report["patient_overlap"]["patients_with_id"],
        "skipped_by_kind": dict(Counter(x["kind"] for x in report["skipped"]).most_common()),
        "ignored_by_kind": dict(Counter(x.kind for x in used.skipped if x.ignored
                                        ).most_common()),
    }
    # Kept for callers that build leakage-free splits from the same pass (not serialised).
    report["_internal"] = {"digests": digests, "near_pairs": near_pairs,
                           "similar_pairs": similar_links, "index": used,
                           "hashes": (digests, phashes, thumbs)}
    return report


def _image_warning_lines(image_warnings: dict, used: DatasetIndex, rel,
                         shown: int = 5) -> list[str]:
    """The report's warning lines for images used despite a decode warning: the first
    ``shown`` in full, then a count (all are in ``image_warnings``)."""
    lines = [f"{rel(s.path)}{f'#{s.frame}' if s.frame is not None else ''}: "
             f"{image_warnings[s.id]}" for s in used.samples if s.id in image_warnings]
    if len(lines) > shown:
        lines = lines[:shown] + [f"... and {len(lines) - shown} more images used with a "
                                 "decode warning (image_warnings in the JSON report)"]
    return lines


def patients_of(index: DatasetIndex, patients: dict | None) -> dict:
    """Sample id -> patient key: ``patients`` (e.g. from DICOM headers) over the index's
    own patient ids (in memory only)."""
    out = dict(patients or {})
    for s in index.samples:
        if s.patient_id:
            out.setdefault(s.id, s.patient_id)
    return out


def _patient_overlap(index: DatasetIndex, split_of, patients):
    patients = patients_of(index, patients)
    seen = defaultdict(set)
    for sid, pid in patients.items():
        if sid in split_of and pid:
            seen[pid].add(split_of[sid])
    salt = secrets.token_bytes(16)
    overlap = sorted(
        ("patient-" + hashlib.sha256(salt + pid.encode()).hexdigest()[:10], sorted(splits))
        for pid, splits in seen.items() if len(splits) > 1)
    return {"count": len(overlap), "patients_with_id": len(seen),
            "pseudonyms": [{"patient": p, "splits": s} for p, s in overlap]}


def public(report: dict) -> dict:
    """The report without in-memory helpers (what gets written to JSON)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def dicom_patients(index: DatasetIndex) -> dict:
    """PatientID from DICOM headers for samples without one (in memory only)."""
    out = {}
    for s in index.samples:
        if s.patient_id:
            continue
        try:
            head = decode.read_head(s.path)  # regular files only: never blocks on a FIFO
            if not looks_like_dicom(s.path, head):
                continue
            ds = dicom.read_dataset(s.path, s.path, stop_before_pixels=True)
        except (DataError, OSError):
            continue
        pid = dicom.patient_key(ds)
        if pid:
            out[s.id] = pid
    return out


def _class_counts(counts: dict) -> str:
    """``{"glioma": 826, "normal": 395}`` -> ``"glioma 826, normal 395"``."""
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def format_summary(report: dict) -> str:
    c = report["counts"]
    s = report["summary"]
    labelled = c.get("labelled", True)
    lines = [
        f"read {c['read']} = used {c['used']} + skipped {c['skipped']}  ({c['samples']} samples)",
    ]
    if labelled:
        lines.append("by split: " + "; ".join(f"{k}: {sum(v.values())}"
                                              for k, v in c["by_split"].items()))
        lines.append("by class: " + _class_counts(c["by_class"]))
        if len(c["by_split"]) > 1:
            lines += [f"by class in {k}: {_class_counts(v)}" for k, v in c["by_split"].items()]
    else:
        lines.append("unlabelled (no class folders): no label statistics")
    lines += [
        f"exact duplicate groups: {s['duplicate_groups']} ({s['duplicate_files']} files), "
        f"across splits: {s['cross_split_duplicate_groups']}",
        f"near-duplicate groups: {s['near_duplicate_groups']}, across splits: "
        f"{s['cross_split_near_duplicate_groups']}",
    ]
    if "similar_groups" in s:
        ev = report.get("similarity", {})
        line = (f"similar-content groups (thumbnail r >= {ev.get('threshold')}): "
                f"{s['similar_groups']}, across splits: {s['cross_split_similar_groups']}, "
                f"largest: {s['largest_similar_group']} images")
        if ev.get("patient_check"):
            pc = ev["patient_check"]
            line += (f"; {pc['different_patient_pairs']}/{pc['pairs_with_both_ids']} similar "
                     "pairs link different patients")
        lines.append(line)
        if ev.get("warning"):
            lines.append("warning: " + ev["warning"])
    patients = (f"patients with an ID: {s.get('patients_with_id', 0)}; in several splits: "
                f"{s['patients_in_several_splits']}")
    lines.append(f"label conflicts: {s['label_conflicts']}; {patients}" if labelled else patients)
    if labelled and report.get("shortcuts"):
        lines += format_shortcuts(report["shortcuts"])
    kinds = Counter(x["kind"] for x in report["skipped"])
    ignored = s.get("ignored_by_kind", {})
    problems = {k: v for k, v in kinds.items() if k not in ignored}
    if problems:
        lines.append("skipped by reason: " + ", ".join(
            f"{k} {v}" for k, v in sorted(problems.items(), key=lambda kv: (-kv[1], kv[0]))))
    if ignored:
        lines.append("skipped, not data (metadata, hidden files, documentation): " + ", ".join(
            f"{k} {v}" for k, v in ignored.items()))
    lines += ["warning: " + w for w in report.get("warnings") or ()]
    # names from the data (classes, folders) may hold ESC or newlines: escaped line by line
    return "\n".join(printable(line) for line in lines)


def _duplicate_groups(digests, phashes, path_of, near_threshold):
    """``(exact, near, near_pairs)``: sample-id groups and the near links (in memory)."""
    # Exact duplicates: identical file content (frames of one file are not duplicates).
    by_digest = defaultdict(list)
    for sid, d in digests.items():
        if sid in path_of:
            by_digest[(d, sid.rsplit("#", 1)[1] if "#" in sid else None)].append(sid)
    exact = [sorted(v) for v in by_digest.values() if len({path_of[x] for x in v}) > 1]

    # Near duplicates: components of the "pHash within threshold" graph.
    ids = [sid for sid in phashes if sid in path_of]
    pairs = hamming_pairs([phashes[i] for i in ids], near_threshold) if near_threshold >= 0 else []
    uf = _UnionFind(len(ids))
    for a, b in pairs:
        uf.union(a, b)
    comp = defaultdict(list)
    for i, sid in enumerate(ids):
        comp[uf.find(i)].append(sid)
    near = [sorted(v) for v in comp.values()
            if len(v) > 1 and len({digests[x] for x in v}) > 1]
    near_pairs = [(ids[a], ids[b]) for a, b in pairs]
    return exact, near, near_pairs


#: A similar-content group larger than this share of the images (and than
#: CHAIN_WARNING_MIN images, so one scan's slices in a tiny set do not count) is reported
#: as chaining.
CHAIN_WARNING_SHARE = 0.10
CHAIN_WARNING_MIN = 20


def _similar_groups(thumbs, path_of, threshold, known_groups, patients, as_paths):
    """``(groups, links, evidence)`` for similar content: connected components of the
    "thumbnail correlation >= threshold" graph (sample-id groups of two or more that the
    exact and pHash groups do not already hold whole), the links as ``(id, id, r)``, and
    :func:`similarity_evidence`."""
    ids = [sid for sid in thumbs if sid in path_of and thumbs[sid] is not None]
    pairs, nearest, partner = similar_pairs([thumbs[i] for i in ids], threshold)
    uf = _UnionFind(len(ids))
    for a, b, _ in pairs:
        uf.union(a, b)
    comp = defaultdict(list)
    for i, sid in enumerate(ids):
        comp[uf.find(i)].append(sid)
    known = {frozenset(g) for g in known_groups}
    multi = [sorted(v) for v in comp.values() if len(v) > 1]
    groups = [g for g in multi if frozenset(g) not in known]
    links = [(ids[a], ids[b], r) for a, b, r in pairs]
    evidence = similarity_evidence(ids, pairs, nearest, partner, multi, threshold, patients,
                                   as_paths)
    return groups, links, evidence


def similarity_evidence(ids, pairs, nearest, partner, groups, threshold, patients,
                        as_paths) -> dict:
    """What the audit shows to judge the similarity threshold on this dataset.

    - ``nearest``: quantiles and a histogram of each image's highest thumbnail correlation
      with any other image (where the threshold falls in the distribution);
    - ``examples``: the pairs just above and just below the threshold (paths and r), to
      look at (``kmedtl data audit --montage`` draws them);
    - ``group_sizes`` / ``largest_group``: chaining shows as one group holding a large
      share of the images; ``warning`` says so above :data:`CHAIN_WARNING_SHARE`;
    - ``patient_check``: where patient ids are known, the share of similar pairs that link
      two *different* patients (the false-merge rate of the measure on this data).
    """
    n = len(ids)
    finite = nearest[np.isfinite(nearest)] if n else np.array([])
    hist_edges = np.round(np.linspace(0.5, 1.0, 11), 2)
    counts, _ = np.histogram(np.clip(finite, 0.5, 1.0), bins=hist_edges)
    sizes = Counter(len(g) for g in groups)
    largest = max((len(g) for g in groups), default=1 if n else 0)
    ev = {
        "measure": "Pearson correlation of 32x32 grey thumbnails of the 64 px audit rendering",
        "threshold": threshold,
        "images": n,
        "pairs": len(pairs),
        "nearest": {
            "quantiles": {f"q{int(q * 100):02d}": round(float(np.quantile(finite, q)), 4)
                          for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if finite.size else {},
            "share_at_or_above_threshold": round(float(np.mean(finite >= threshold)), 4)
            if finite.size else 0.0,
            "histogram": {"edges": hist_edges.tolist(), "counts": counts.tolist()},
        },
        "groups": len(groups),
        "group_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "largest_group": largest,
        "largest_group_share": round(largest / n, 4) if n else 0.0,
        "examples": _threshold_examples(ids, pairs, nearest, partner, threshold, as_paths),
    }
    if n and largest / n > CHAIN_WARNING_SHARE and largest >= CHAIN_WARNING_MIN:
        ev["warning"] = (f"one similar-content group holds {largest} of {n} images "
                         f"({largest / n:.0%}): the threshold chains unrelated images "
                         "together; raise split.similar_threshold (see the 'similarity' "
                         "evidence in the audit JSON)")
    with_ids = [(a, b) for a, b, _ in pairs if ids[a] in patients and ids[b] in patients]
    if with_ids:
        diff = sum(patients[ids[a]] != patients[ids[b]] for a, b in with_ids)
        ev["patient_check"] = {"pairs_with_both_ids": len(with_ids),
                               "different_patient_pairs": diff,
                               "false_merge_rate": round(diff / len(with_ids), 4)}
    return ev


def _threshold_examples(ids, pairs, nearest, partner, threshold, as_paths, k: int = 6) -> dict:
    """Up to ``k`` pairs just above the threshold and ``k`` nearest-neighbour pairs just
    below it (the ones a person should look at to judge it)."""
    above = sorted(pairs, key=lambda p: p[2])[:k]
    out = {"above": [as_paths([ids[a], ids[b]]) + [round(r, 4)] for a, b, r in above]}
    below, seen = [], set()
    for i in np.argsort(-np.nan_to_num(nearest, nan=-1.0)):
        pair = frozenset((int(i), int(partner[i])))
        if nearest[i] < threshold and pair not in seen:
            seen.add(pair)
            below.append(i)
        if len(below) == k:
            break
    out["below"] = [as_paths([ids[i], ids[partner[i]]]) + [round(float(nearest[i]), 4)]
                    for i in below]
    return out


def similarity_montage(report: dict, path, options: ImageOptions, tile: int = 96) -> None:
    """A PNG of the ``similarity.examples`` pairs: one row per pair, the two images as the
    audit saw them, with the correlation; pairs above the threshold first, then a grey
    divider, then the nearest pairs below it."""
    ex = report.get("similarity", {}).get("examples", {})
    root = report["params"].get("root") or ""
    opts = hash_options(options)
    rows = [("above", p) for p in ex.get("above", [])] + [("below", p) for p in ex.get("below", [])]
    if not rows:
        raise DataError(path, "no image pairs to draw (the audit saw fewer than two images)",
                        kind="empty")
    label_w = 150
    canvas = Image.new("L", (2 * tile + label_w, len(rows) * tile + 4), 0)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for i, (side, (a, b, r)) in enumerate(rows):
        if i and side == "below" and rows[i - 1][0] == "above":
            draw.rectangle([0, y, canvas.width, y + 3], fill=128)
            y += 4
        for j, rel in enumerate((a, b)):
            name, _, frame = rel.partition("#")
            try:
                img = decode.load_image(os.path.join(root, name), opts,
                                        int(frame) if frame else None).image
                a8 = np.asarray(img)
                if a8.dtype != np.uint8:
                    a8 = np.clip(np.rint(a8 * 255.0), 0, 255)
                a8 = np.rint(a8.mean(-1) if a8.ndim == 3 else a8).astype(np.uint8)
                canvas.paste(Image.fromarray(a8).resize((tile, tile)), (j * tile, y))
            except (DataError, OSError):
                draw.text((j * tile + 4, y + 4), "unreadable", fill=255)
        draw.text((2 * tile + 6, y + 6), f"{side} r={r:.3f}", fill=255)
        draw.text((2 * tile + 6, y + 22), os.path.basename(a)[:22], fill=200)
        draw.text((2 * tile + 6, y + 36), os.path.basename(b)[:22], fill=200)
        y += tile
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def training_lookalikes(samples, reference, options: ImageOptions, *,
                        near_threshold: int = DEFAULT_NEAR_THRESHOLD,
                        similar_threshold: float = DEFAULT_SIMILAR_THRESHOLD,
                        workers=None, known=None, cache_dir=None) -> dict[str, dict]:
    """Which of ``samples`` (an external test set) copy an image of ``reference`` (the
    training and validation images): sample id -> ``{"reason": "exact" | "near" |
    "similar", "match": reference path, "r": correlation}``, by the audit's three
    measures at :data:`HASH_SIZE` (first that holds, in that order).  An external set is
    only external without them.  Unreadable images are left to the caller's own pass.
    ``known``: ``(digests, phashes, thumbs)`` of ``samples`` already taken at
    :data:`HASH_SIZE` (an audit's ``_internal["hashes"]``), so they are not decoded again;
    ``cache_dir``: the run's image cache, whose audit entries (hashes and thumbnails at
    :data:`HASH_SIZE`) are reused instead of decoding every reference image again."""
    opts = hash_options(options)
    ext = DatasetIndex(list(samples))
    ref = DatasetIndex(list(reference))
    if known is not None:
        d_ext, p_ext, t_ext = known
    else:
        d_ext, p_ext, t_ext, _ = scan_index(ext, opts, cache_dir, workers, False)
    d_ref, p_ref, t_ref, _ = scan_index(ref, opts, cache_dir, workers, False)
    ref_ids = [s.id for s in ref.samples if s.id in d_ref]
    ext_ids = [s.id for s in ext.samples if s.id in d_ext]
    path_of = {s.id: s.path for s in ref.samples}
    out: dict[str, dict] = {}
    if not ref_ids or not ext_ids:
        return out
    by_digest = {d_ref[i]: i for i in ref_ids}
    ref_pos = {i: j for j, i in enumerate(ref_ids)}
    ph_ref = np.array([p_ref[i] for i in ref_ids], dtype=np.uint64)
    th_ref = thumbnail_matrix([t_ref[i] for i in ref_ids])
    for start in range(0, len(ext_ids), 512):
        chunk = ext_ids[start:start + 512]
        bits = popcount(np.array([p_ext[i] for i in chunk], dtype=np.uint64)[:, None]
                        ^ ph_ref[None, :])
        sim = thumbnail_matrix([t_ext[i] for i in chunk]) @ th_ref.T
        for k, sid in enumerate(chunk):
            j = int(np.argmax(sim[k]))
            r = round(float(sim[k, j]), 4)
            if d_ext[sid] in by_digest:
                m, reason = by_digest[d_ext[sid]], "exact"
            elif near_threshold >= 0 and bits[k].min() <= near_threshold:
                m, reason = ref_ids[int(np.argmin(bits[k]))], "near"
            elif r >= similar_threshold:
                m, reason = ref_ids[j], "similar"
            else:
                continue
            # r: the thumbnail correlation with the match (exact/near: with that image)
            out[sid] = {"reason": reason, "match": path_of[m],
                        "r": r if reason == "similar"
                        else round(float(sim[k, ref_pos[m]]), 4)}
    return out
