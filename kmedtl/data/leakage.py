"""An independent check that a split does not leak: what crosses its train/val/test parts.

:mod:`kmedtl.data.splits` groups exact and near duplicates, similar-content images and
patients before it assigns parts; this module re-counts, from the audit's own records,
what still spans parts of one fold, so a bug in the grouping is caught rather than
reported as a good result.  ``kmedtl run``'s split stage counts with :func:`cross_split`
and stops on any of :func:`leaks`, what the configured ``split.dedupe`` promises to
prevent.
"""

from __future__ import annotations

from kmedtl.data import splits as splitlib
from kmedtl.data.audit import dicom_patients

#: Correlation at which the split reports test images with a train/val look-alike.
NEIGHBOUR_REPORT_R = 0.95


def similar_neighbours(links, fold, r_min: float = NEIGHBOUR_REPORT_R,
                       linked_from: float = 0.0) -> dict:
    """How many test images have a train or validation image whose thumbnail correlates
    ``>= r_min`` with theirs (the audit's similarity links; reported whatever
    ``split.dedupe`` is, so a split grouped only by exact or pHash duplicates shows what
    it leaves across).  The audit keeps links from ``linked_from`` (the similarity
    threshold) up, so the count is complete only when ``r_min >= linked_from``; otherwise
    ``r_min`` is raised to it and the record says so."""
    r_min = max(r_min, linked_from)
    test = set(fold.test)
    seen = set(fold.train) | set(fold.val)
    hit = set()
    for a, b, r in links:
        if r >= r_min:
            if a in test and b in seen:
                hit.add(a)
            elif b in test and a in seen:
                hit.add(b)
    return {"r_min": r_min, "count": len(hit), "test": len(test),
            "share": round(len(hit) / len(test), 4) if test else 0.0}


def cross_split(fold, internal: dict, index) -> dict:
    """What spans the parts of ``fold``: exact-duplicate groups (same pixel digest, same
    frame), near-duplicate and similar-content pairs (the audit's ``_internal`` records),
    and patients (a manifest's ``patient_id`` or the DICOM PatientID).  ``patients`` is the
    number of patients the fold holds."""
    assign = fold.assignment()
    by_digest: dict = {}
    for sid, d in internal["digests"].items():
        if sid in assign:
            by_digest.setdefault((d, sid.rsplit("#", 1)[1] if "#" in sid else None),
                                 set()).add(assign[sid])
    patients = {s.id: s.patient_id for s in index.samples if s.patient_id}
    patients.update(dicom_patients(index))
    parts_of: dict = {}
    for sid, pid in patients.items():
        if sid in assign:
            parts_of.setdefault(pid, set()).add(assign[sid])

    def across(pairs):
        return sum(1 for a, b, *_ in pairs if a in assign and b in assign and
                   assign[a] != assign[b])

    return {"exact_duplicate_groups": sum(1 for p in by_digest.values() if len(p) > 1),
            "near_duplicate_pairs": across(internal["near_pairs"]),
            "similar_content_pairs": across(internal["similar_pairs"]),
            "patients_across": sum(1 for p in parts_of.values() if len(p) > 1),
            "patients": len(parts_of)}


def leaks(counts: dict, dedupe: str) -> list[str]:
    """The crossings of :func:`cross_split` that ``split.dedupe`` promises to prevent (a
    patient never crosses, whatever ``dedupe`` says)."""
    problems = []
    if dedupe != "none" and counts["exact_duplicate_groups"]:
        problems.append(f"{counts['exact_duplicate_groups']} exact-duplicate group(s) span parts")
    if dedupe in ("near", "similar") and counts["near_duplicate_pairs"]:
        problems.append(f"{counts['near_duplicate_pairs']} near-duplicate pair(s) span parts")
    if dedupe == "similar" and counts["similar_content_pairs"]:
        problems.append(f"{counts['similar_content_pairs']} similar-content pair(s) span "
                        "parts")
    if counts["patients_across"]:
        problems.append(f"{counts['patients_across']} patient(s) span parts")
    return problems


def pretrain_pool(prep, fold, similar: bool = True) -> list:
    """Of the prepared data ``prep`` (:class:`kmedtl.data.prepare.Prepared`), the samples
    in none of the fold's parts that share no leakage group (patient, exact, near or --
    with ``similar`` -- similar-content duplicate) with a val or test sample, and that the
    split did not drop (e.g. copies of an external set, ``split.exclude_copies_of``:
    pretraining on them would leak the external test)."""
    ids = [s.id for s in prep.index.samples]
    patients = {s.id: s.patient_id for s in prep.index.samples if s.patient_id}
    patients.update(dicom_patients(prep.index))
    internal = prep.report["_internal"]
    links = list(internal["near_pairs"])
    if similar:
        links += [(a, b) for a, b, _ in internal.get("similar_pairs", ())]
    groups = splitlib.leakage_groups(ids, patients, internal["digests"], links)
    group_of = dict(zip(ids, groups.tolist()))
    held_out = {group_of[i] for i in fold.val + fold.test if i in group_of}
    used = set(fold.train) | set(fold.val) | set(fold.test)
    dropped = {d["id"] for d in prep.splits.dropped}
    return [s for s in prep.index.samples
            if s.id not in used and s.id not in dropped and group_of[s.id] not in held_out]
