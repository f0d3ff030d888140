"""Dataset audit: counts, exact and near duplicates across splits, label conflicts,
patient overlap; and the same audit on the real brain-tumour MRI set."""

import hashlib
import json
import os
import time
from collections import Counter, defaultdict

import pytest
from helpers import brain_tumor_hierarchy, encode_image, smooth_image, write_image

from kmedtl.data.audit import audit, format_summary, public
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import index_folder, read_manifest

OPTS = ImageOptions(size=64)


@pytest.fixture
def planted(tmp_path):
    """Training/Testing tree with planted problems:

    - ``a``: byte-identical copy in Testing (cross-split exact duplicate),
    - ``b``: re-encoded as JPEG in Testing (cross-split near duplicate),
    - ``c``: byte-identical copy within Training (exact duplicate, same split),
    - ``d``: byte-identical copy in Testing under another class (label conflict),
    - plus distinct images and one undecodable file.
    """
    root = tmp_path / "brain"
    tr, te = root / "Training", root / "Testing"
    images = {name: smooth_image(seed) for seed, name in enumerate("abcdefgh")}
    for name in "abcd":
        write_image(tr / "no_tumor" / f"{name}.png", images[name])
    for name in "ef":
        write_image(tr / "glioma_tumor" / f"{name}.png", images[name])
    for name in "gh":
        write_image(te / "glioma_tumor" / f"{name}.png", images[name])
    (te / "no_tumor").mkdir(parents=True)
    (te / "no_tumor" / "a_copy.png").write_bytes((tr / "no_tumor" / "a.png").read_bytes())
    (te / "no_tumor" / "b_reencoded.jpg").write_bytes(
        encode_image(images["b"], "JPEG", quality=95))
    (tr / "no_tumor" / "c_dup.png").write_bytes((tr / "no_tumor" / "c.png").read_bytes())
    (te / "glioma_tumor" / "d_copy.png").write_bytes((tr / "no_tumor" / "d.png").read_bytes())
    (te / "glioma_tumor" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


def test_audit_finds_planted_duplicates_in_the_right_keys(planted, tmp_path):
    index = index_folder(planted, brain_tumor_hierarchy(), OPTS)
    report = audit(index, OPTS, cache_dir=tmp_path / "cache", workers=1, progress=False)
    c = report["counts"]
    assert (c["read"], c["used"], c["skipped"]) == (13, 12, 1)
    assert c["by_split"] == {"test": {"glioma_tumor": 3, "no_tumor": 2},
                             "train": {"glioma_tumor": 2, "no_tumor": 5}}
    assert [s["path"] for s in report["skipped"]] == ["Testing/glioma_tumor/broken.jpg"]

    a = ["Testing/no_tumor/a_copy.png", "Training/no_tumor/a.png"]
    b = ["Testing/no_tumor/b_reencoded.jpg", "Training/no_tumor/b.png"]
    cc = ["Training/no_tumor/c.png", "Training/no_tumor/c_dup.png"]
    d = ["Testing/glioma_tumor/d_copy.png", "Training/no_tumor/d.png"]
    assert report["duplicate_groups"] == sorted([a, cc, d])
    assert report["cross_split_duplicate_groups"] == sorted([a, d])
    assert report["near_duplicate_groups"] == [b]
    assert report["cross_split_near_duplicate_groups"] == [b]
    assert report["label_conflicts"] == [d]
    assert report["summary"] == {
        "duplicate_groups": 3, "duplicate_files": 6, "cross_split_duplicate_groups": 2,
        "near_duplicate_groups": 1, "cross_split_near_duplicate_groups": 1,
        "label_conflicts": 1, "patients_in_several_splits": 0, "patients_with_id": 0,
        "skipped_by_kind": {"corrupt_image": 1}, "ignored_by_kind": {},
        # the planted copies are already exact/near groups; none is left for similarity
        "similar_groups": 0, "cross_split_similar_groups": 0, "largest_similar_group": 2,
        "shortcuts_flagged": []}
    # What gets written: JSON-able, without the in-memory helpers.
    out = public(report)
    assert "_internal" not in out
    assert json.loads(json.dumps(out))["summary"] == report["summary"]
    text = format_summary(report)
    assert "read 13 = used 12 + skipped 1" in text
    assert "across splits: 2" in text
    # per-class counts on the console, not only in --json: overall and per split
    lines = text.splitlines()
    assert "by class: glioma_tumor 5, no_tumor 7" in lines
    assert "by class in test: glioma_tumor 3, no_tumor 2" in lines
    assert "by class in train: glioma_tumor 2, no_tumor 5" in lines


def test_audit_without_cache_and_with_given_splits(planted):
    index = index_folder(planted, None, OPTS)
    # Put every file on one side: nothing can cross.
    splits = {s.id: "train" for s in index.samples}
    report = audit(index, OPTS, splits=splits, workers=1, progress=False)
    assert report["summary"]["duplicate_groups"] == 3
    assert report["cross_split_duplicate_groups"] == []
    text = format_summary(report)  # one split: the class counts once, no per-split lines
    assert "by class: glioma_tumor 5, no_tumor 7" in text.splitlines()
    assert "by class in " not in text
    assert report["cross_split_near_duplicate_groups"] == []
    # A stricter near-duplicate threshold (-1 disables it) finds none.
    none = audit(index, OPTS, workers=1, near_threshold=-1, progress=False)
    assert none["near_duplicate_groups"] == [] and none["summary"]["duplicate_groups"] == 3


def test_patient_overlap_is_reported_with_pseudonyms_only(tmp_path):
    root = tmp_path / "ds"
    rows = ["path,label,patient_id,split"]
    for i, (pid, split) in enumerate([("MRN-0001", "train"), ("MRN-0001", "test"),
                                      ("MRN-0002", "train"), ("MRN-0003", "test")]):
        write_image(root / f"img{i}.png", smooth_image(40 + i))
        rows.append(f"img{i}.png,no_tumor,{pid},{split}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    index = read_manifest(root / "m.csv", None, OPTS)
    report = audit(index, OPTS, workers=1, progress=False)
    overlap = report["patient_overlap"]
    assert overlap["count"] == 1 and overlap["patients_with_id"] == 3
    assert overlap["pseudonyms"][0]["splits"] == ["test", "train"]
    text = json.dumps(public(report))
    assert "MRN-000" not in text
    again = audit(index, OPTS, workers=1, progress=False)["patient_overlap"]
    assert again["pseudonyms"][0]["patient"] != overlap["pseudonyms"][0]["patient"]


# ---------------------------------------------------------------------------- real data
README_COUNTS = {
    "Training": {"glioma_tumor": 826, "meningioma_tumor": 822, "no_tumor": 395,
                 "pituitary_tumor": 827},
    "Testing": {"glioma_tumor": 100, "meningioma_tumor": 115, "no_tumor": 105,
                "pituitary_tumor": 74},
}


def independent_cross_split_groups(root):
    """Byte-identical groups spanning Training and Testing, computed with hashlib."""
    by_sha, by_md5 = defaultdict(list), defaultdict(list)
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, root)
            if os.sep not in rel:  # README.md
                continue
            data = open(path, "rb").read()
            by_sha[hashlib.sha256(data).hexdigest()].append(rel)
            by_md5[hashlib.md5(data).hexdigest()].append(rel)
    groups = sorted(sorted(g) for g in by_sha.values() if len(g) > 1)
    # Two independent hashes agree on the partition (no collision games).
    assert groups == sorted(sorted(g) for g in by_md5.values() if len(g) > 1)
    cross = [g for g in groups if len({p.split(os.sep)[0] for p in g}) > 1]
    return groups, cross


@pytest.mark.integration
@pytest.mark.slow
def test_brain_tumor_audit_matches_independent_hashes(datasets_dir, tmp_path):
    root = datasets_dir / "brain-tumor-mri"
    start = time.perf_counter()
    options = ImageOptions(size=64)
    index = index_folder(root, brain_tumor_hierarchy(), options)
    counts = index.counts()
    # every file under the root is read: the dataset's README.md is skipped as documentation
    assert counts == {"read": 3265, "used": 3264, "skipped": 1, "samples": 3264}
    assert [(os.path.basename(s.path), s.kind) for s in index.skipped] == [
        ("README.md", "documentation")]
    index.check_strict(True)  # documentation never fails strict mode
    per_split = Counter((s.split, s.label) for s in index.samples)
    for folder, split in (("Training", "train"), ("Testing", "test")):
        for label, n in README_COUNTS[folder].items():
            assert per_split[(split, label)] == n, (folder, label)
    assert sum(README_COUNTS["Training"].values()) == 2870
    assert sum(README_COUNTS["Testing"].values()) == 394

    report = audit(index, options, cache_dir=tmp_path / "cache", workers=2, progress=False)
    c = report["counts"]
    assert c["read"] == c["used"] + c["skipped"] == 3265 and c["used"] == 3264
    groups, cross = independent_cross_split_groups(root)
    assert cross, "the README promises duplicates across Training/Testing"
    assert report["cross_split_duplicate_groups"] == cross
    # Every exact group whose files all decoded is found, not only the cross-split ones.
    skipped = {s["path"] for s in report["skipped"] if s["kind"] != "documentation"}
    assert report["duplicate_groups"] == [
        g for g in groups if len([p for p in g if p not in skipped]) > 1]
    if not skipped:
        assert c["by_split"] == {"test": README_COUNTS["Testing"],
                                 "train": README_COUNTS["Training"]}
    # The README: no duplicate pair carries conflicting labels.
    exact_conflicts = [g for g in report["label_conflicts"] if g in report["duplicate_groups"]]
    assert exact_conflicts == []
    assert time.perf_counter() - start < 120
