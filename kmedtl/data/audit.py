"""Dataset audit: counts, undecodable files, exact and near duplicates, patient overlap.

The report (a JSON-able dict) has these keys:

- ``counts``: ``read``/``used``/``skipped``/``samples`` (read = used + skipped),
  ``by_class`` and ``by_split`` (split -> class -> samples).
- ``skipped``: ``[{path, reason, kind, stage}]`` for every entry that could not be used.
- ``duplicate_groups``: lists of paths with byte-identical content (SHA-256).
- ``cross_split_duplicate_groups``: those groups that span more than one split.
- ``near_duplicate_groups`` / ``cross_split_near_duplicate_groups``: groups linked by a
  perceptual hash (DCT pHash) within ``near_threshold`` bits that are not all identical.
- ``label_conflicts``: duplicate or near-duplicate groups whose members carry different
  labels.
- ``patient_overlap``: patients found in more than one split, as salted pseudonyms (a
  fresh random salt per report, so nothing links back to a real ID).
- ``summary``: group counts, ``skipped_by_kind`` (every skip has a kind) and
  ``ignored_by_kind`` (the subset that is metadata/hidden/documentation, not data).

An unlabelled index (a folder of files without class folders, e.g. a PACS export) is
audited the same way without label statistics: ``counts.labelled`` is false and
``by_class``/``label_conflicts`` are empty.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter, defaultdict
from dataclasses import replace

from kmedtl.data import dicom, scan
from kmedtl.data.cache import build_cache
from kmedtl.data.decode import looks_like_dicom
from kmedtl.data.hashing import hamming_pairs
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import DatasetIndex, Skipped
from kmedtl.data.splits import _UnionFind
from kmedtl.errors import DataError

DEFAULT_NEAR_THRESHOLD = 2


def scan_index(index: DatasetIndex, options: ImageOptions, cache_dir=None, workers=None,
               progress=None):
    """Decode every sample once; returns (digests, phashes, skipped) keyed by sample id."""
    if cache_dir is not None:
        res = build_cache(index, options, cache_dir, workers, progress, phash=True)
        return res.digests, res.phashes, res.skipped
    tasks = [scan.Task(s.path, s.frame, options, None, True) for s in index.samples]
    # further images of multi-input samples are decoded too (not hashed: duplicates and
    # the split go by the main image), so an unreadable one drops its case here
    ids = {s.id for s in index.samples}
    extras = sorted({p for s in index.samples for _, p in s.extra} - ids)
    tasks += [scan.Task(p, None, options, None, False) for p in extras]
    digests, phashes, skipped = {}, {}, []
    results = scan.run(tasks, workers, progress, desc="audit")
    for s, r in zip(index.samples, results):
        if r.ok:
            digests[s.id], phashes[s.id] = r.digest, r.phash
        else:
            skipped.append(Skipped(r.path, r.error_reason, r.error_kind, "decode"))
    for r in results[len(index.samples):]:
        if not r.ok:
            skipped.append(Skipped(r.path, r.error_reason, r.error_kind, "decode"))
    return digests, phashes, skipped


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
          runner: str = "process", beam_options=None) -> dict:
    """Audit a dataset index. ``splits`` (sample id -> split name) defaults to the split
    the source gave each sample (folder layout or manifest column).  Duplicates are found
    at :data:`HASH_SIZE` whatever ``options.size`` is (see :func:`hash_options`).
    ``runner="beam"`` does the per-file work and the duplicate grouping as Apache Beam jobs
    (:mod:`kmedtl.data.beam`, ``beam_options``: standard Beam pipeline flags)."""
    options = options or ImageOptions()
    if runner not in ("process", "beam"):
        raise ValueError(f"runner={runner!r}: use 'process' or 'beam'")
    if runner == "beam":
        # lazy: Apache Beam, an optional extra (pip install 'kmedtl[beam]'), runner="beam" only
        from kmedtl.data import beam

        digests, phashes, skipped = beam.scan_index_beam(
            index, hash_options(options), cache_dir, beam_options, workers=workers)
    else:
        digests, phashes, skipped = scan_index(index, hash_options(options), cache_dir,
                                               workers, progress)
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

        g = beam.duplicate_groups(digests, phashes, path_of, near_threshold, beam_options)
        exact, near, near_pairs = g.exact, g.near, [tuple(p) for p in g.near_pairs]
    else:
        exact, near, near_pairs = _duplicate_groups(digests, phashes, path_of,
                                                    near_threshold)

    def crosses(group):
        return len({split_of.get(x) for x in group}) > 1

    def as_paths(group):
        return [rel(path_of[x]) + (f"#{x.rsplit('#', 1)[1]}" if "#" in x else "") for x in group]

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
        "label_conflicts": sorted(conflicts),
        "patient_overlap": _patient_overlap(used, split_of, patients),
        "params": {"near_threshold": near_threshold, "hash": "sha256 + 64-bit DCT pHash",
                   "image_options": options.key(), "root": index.root},
    }
    report["summary"] = {
        "duplicate_groups": len(report["duplicate_groups"]),
        "duplicate_files": sum(len(g) for g in report["duplicate_groups"]),
        "cross_split_duplicate_groups": len(report["cross_split_duplicate_groups"]),
        "near_duplicate_groups": len(report["near_duplicate_groups"]),
        "cross_split_near_duplicate_groups": len(report["cross_split_near_duplicate_groups"]),
        "label_conflicts": len(report["label_conflicts"]),
        "patients_in_several_splits": report["patient_overlap"]["count"],
        "patients_with_id": report["patient_overlap"]["patients_with_id"],
        "skipped_by_kind": dict(Counter(x["kind"] for x in report["skipped"]).most_common()),
        "ignored_by_kind": dict(Counter(x.kind for x in used.skipped if x.ignored
                                        ).most_common()),
    }
    # Kept for callers that build leakage-free splits from the same pass (not serialised).
    report["_internal"] = {"digests": digests, "near_pairs": near_pairs,
                           "index": used}
    return report


def _patient_overlap(index: DatasetIndex, split_of, patients):
    patients = dict(patients or {})
    for s in index.samples:
        if s.patient_id:
            patients.setdefault(s.id, s.patient_id)
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
            with open(s.path, "rb") as fh:
                head = fh.read(132)
            if not looks_like_dicom(s.path, head):
                continue
            ds = dicom.read_dataset(s.path, s.path, stop_before_pixels=True)
        except (DataError, OSError):
            continue
        pid = dicom.patient_key(ds)
        if pid:
            out[s.id] = pid
    return out


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
    else:
        lines.append("unlabelled (no class folders): no label statistics")
    lines += [
        f"exact duplicate groups: {s['duplicate_groups']} ({s['duplicate_files']} files), "
        f"across splits: {s['cross_split_duplicate_groups']}",
        f"near-duplicate groups: {s['near_duplicate_groups']}, across splits: "
        f"{s['cross_split_near_duplicate_groups']}",
    ]
    patients = (f"patients with an ID: {s.get('patients_with_id', 0)}; in several splits: "
                f"{s['patients_in_several_splits']}")
    lines.append(f"label conflicts: {s['label_conflicts']}; {patients}" if labelled else patients)
    kinds = Counter(x["kind"] for x in report["skipped"])
    ignored = s.get("ignored_by_kind", {})
    problems = {k: v for k, v in kinds.items() if k not in ignored}
    if problems:
        lines.append("skipped by reason: " + ", ".join(
            f"{k} {v}" for k, v in sorted(problems.items(), key=lambda kv: (-kv[1], kv[0]))))
    if ignored:
        lines.append("skipped, not data (metadata, hidden files, documentation): " + ", ".join(
            f"{k} {v}" for k, v in ignored.items()))
    return "\n".join(lines)


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
