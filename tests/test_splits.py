"""Leakage-free splits: grouped by patient and duplicate, stratified, reproducible."""

import json
from collections import Counter

import numpy as np
import pytest

from kmedtl.data import splits as S
from kmedtl.errors import ConfigError

N = 300
CLASSES = 3


def make_data(seed=0):
    """300 samples, 3 unbalanced classes, ~120 patients (one label each), with planted
    exact duplicates across patients and one near-duplicate pair."""
    rng = np.random.default_rng(seed)
    ids = [f"/data/img{i:03d}.png" for i in range(N)]
    patient_of = rng.integers(0, 120, N)
    patient_label = rng.choice(CLASSES, 120, p=[0.5, 0.3, 0.2])
    labels = patient_label[patient_of]
    patients = {sid: f"patient{p}" for sid, p in zip(ids, patient_of)}
    digests = {sid: f"sha{i}" for i, sid in enumerate(ids)}
    same_label = [i for i in range(N) if labels[i] == labels[0]]
    for a, b in [(same_label[0], same_label[-1]), (same_label[1], same_label[-2])]:
        digests[ids[b]] = digests[ids[a]]  # byte-identical copies, different patients
    near = [(ids[same_label[2]], ids[same_label[-3]])]
    groups = S.leakage_groups(ids, patients, digests, near)
    return ids, labels, groups, patients, digests, near


def sides(fold):
    out = {}
    for name in ("train", "val", "test"):
        for sid in getattr(fold, name):
            assert sid not in out, f"{sid} in both {out[sid]} and {name}"
            out[sid] = name
    return out


def assert_no_leak(splits, ids, patients, digests, near):
    """Independent check: no patient, no duplicate content, no near pair on two sides."""
    for fold in splits.folds:
        side = sides(fold)
        for key_of in (patients, digests):
            seen = {}
            for sid, key in key_of.items():
                if sid in side:
                    assert seen.setdefault(key, side[sid]) == side[sid], (key, sid)
        for a, b in near:
            if a in side and b in side:
                assert side[a] == side[b]
    groups_by_id = dict(zip(ids, S.leakage_groups(ids, patients, digests, near)))
    assert S.check_no_leak(splits, groups_by_id) == []


def class_share(part, ids, labels):
    pos = {s: i for i, s in enumerate(ids)}
    c = Counter(int(labels[pos[s]]) for s in part)
    return np.array([c[k] / len(part) for k in range(CLASSES)])


# ---------------------------------------------------------------------------- groups
def test_leakage_groups_join_patients_duplicates_and_near_pairs():
    ids = ["a", "b", "c", "d", "e", "f"]
    groups = S.leakage_groups(ids, patients={"a": "p1", "b": "p1", "c": "p2"},
                              digests={"c": "h", "d": "h", "e": "h2"}, near_pairs=[("e", "f")])
    assert groups[0] == groups[1]  # same patient
    assert groups[2] == groups[3]  # same content
    assert groups[4] == groups[5]  # near duplicate
    assert len({groups[0], groups[2], groups[4]}) == 3


def test_check_no_leak_reports_a_straddling_group():
    splits = S.Splits("manual", 0, [S.Fold(["a"], [], ["b"])])
    problems = S.check_no_leak(splits, {"a": 1, "b": 1})
    assert problems == ["fold 0: group 1 in both train and test"]


# ---------------------------------------------------------------------------- methods
def test_holdout_is_leak_free_stratified_and_complete():
    ids, labels, groups, patients, digests, near = make_data()
    sp = S.holdout(ids, labels, groups, val=0.15, test=0.15, seed=0)
    (fold,) = sp.folds
    assert sorted(sides(fold)) == sorted(ids)
    assert_no_leak(sp, ids, patients, digests, near)
    overall = class_share(ids, ids, labels)
    for part, frac in ((fold.train, 0.7), (fold.val, 0.15), (fold.test, 0.15)):
        assert abs(len(part) / N - frac) < 0.07
        assert np.abs(class_share(part, ids, labels) - overall).max() < 0.12


def test_kfold_tests_every_sample_once_without_leaks():
    ids, labels, groups, patients, digests, near = make_data()
    sp = S.kfold(ids, labels, groups, k=5, val=0.15, seed=0)
    assert len(sp.folds) == 5 and sp.method == "kfold"
    tested = Counter(s for f in sp.folds for s in f.test)
    assert sorted(tested) == sorted(ids) and set(tested.values()) == {1}
    for f in sp.folds:
        assert sorted(sides(f)) == sorted(ids) and f.val
    assert_no_leak(sp, ids, patients, digests, near)
    overall = class_share(ids, ids, labels)
    for f in sp.folds:
        assert np.abs(class_share(f.test, ids, labels) - overall).max() < 0.12


def test_repeated_splits_differ_and_none_leaks():
    ids, labels, groups, patients, digests, near = make_data()
    sp = S.repeated(ids, labels, groups, repeats=3, val=0.15, test=0.2, seed=4)
    assert len(sp.folds) == 3
    assert_no_leak(sp, ids, patients, digests, near)
    tests = [frozenset(f.test) for f in sp.folds]
    assert len(set(tests)) == 3
    for f in sp.folds:
        assert abs(len(f.test) / N - 0.2) < 0.07


@pytest.mark.parametrize("method", [
    lambda ids, labels, groups, seed: S.holdout(ids, labels, groups, seed=seed),
    lambda ids, labels, groups, seed: S.kfold(ids, labels, groups, k=4, seed=seed),
    lambda ids, labels, groups, seed: S.repeated(ids, labels, groups, repeats=2, seed=seed),
], ids=["holdout", "kfold", "repeated"])
def test_splits_are_reproducible_from_the_seed(method):
    ids, labels, groups, *_ = make_data()
    a = method(ids, labels, groups, 7)
    b = method(ids, labels, groups, 7)
    c = method(ids, labels, groups, 8)
    assert [f.to_dict() for f in a.folds] == [f.to_dict() for f in b.folds]
    assert [f.to_dict() for f in a.folds] != [f.to_dict() for f in c.folds]
    assert a.seed == 7


def test_split_arguments_are_checked():
    ids, labels, groups, *_ = make_data()
    with pytest.raises(ConfigError, match="val \\+ test < 1"):
        S.holdout(ids, labels, groups, val=0.5, test=0.5)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        S.kfold(ids, labels, groups, k=1)
    few = np.zeros(len(ids), dtype=int)  # everything in one group
    with pytest.raises(ConfigError, match="1 independent groups"):
        S.holdout(ids, labels, few)


# ---------------------------------------------------------------------------- subsets
def test_per_class_subsets_are_nested_and_sized():
    ids, labels, *_ = make_data()
    available = Counter(labels.tolist())
    small = S.per_class_subset(ids, labels, 25, seed=3)
    large = S.per_class_subset(ids, labels, 50, seed=3)
    assert set(small) < set(large)
    pos = {s: i for i, s in enumerate(ids)}
    for subset, n in ((small, 25), (large, 50)):
        got = Counter(int(labels[pos[s]]) for s in subset)
        assert got == {c: min(n, k) for c, k in available.items()}
    assert S.per_class_subset(ids, labels, 25, seed=3) == small
    assert S.per_class_subset(ids, labels, 25, seed=4) != small
    assert S.per_class_subset(ids, labels, None) == ids
    with pytest.raises(ConfigError, match="n_per_class"):
        S.per_class_subset(ids, labels, 0)


# ---------------------------------------------------------------------------- source split
def test_source_split_drops_training_duplicates_of_test_samples():
    ids = [f"/d/{s}{i}.png" for s in ("tr", "te") for i in range(40)]
    labels = np.array([i % 2 for i in range(80)])
    source = ["train"] * 40 + ["test"] * 40
    digests = {sid: sid for sid in ids}
    digests["/d/tr3.png"] = digests["/d/te5.png"]  # a test image copied into training
    digests["/d/tr8.png"] = digests["/d/te5.png"]
    patients = {"/d/tr10.png": "P1", "/d/te11.png": "P1"}  # one patient on both sides
    groups = S.leakage_groups(ids, patients, digests)
    sp = S.source_split(ids, labels, groups, source, val=0.2, seed=0)
    (fold,) = sp.folds
    assert sorted(fold.test) == sorted(ids[40:])  # the given test set is kept whole
    dropped = {d["id"]: d["reason"] for d in sp.dropped}
    assert sorted(dropped) == ["/d/tr10.png", "/d/tr3.png", "/d/tr8.png"]
    assert all("test sample" in r for r in dropped.values())
    assert not set(dropped) & (set(fold.train) | set(fold.val))
    assert len(fold.train) + len(fold.val) == 37 and fold.val
    assert S.check_no_leak(sp, dict(zip(ids, groups))) == []


def test_source_split_with_a_given_validation_split():
    ids = [f"/d/{i}.png" for i in range(30)]
    labels = np.array([i % 2 for i in range(30)])
    source = ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    digests = {sid: sid for sid in ids}
    digests["/d/0.png"] = digests["/d/21.png"]  # training copy of a val image
    groups = S.leakage_groups(ids, None, digests)
    (fold,) = S.source_split(ids, labels, groups, source).folds
    assert fold.val == sorted(ids[20:25]) and fold.test == sorted(ids[25:])
    assert "/d/0.png" not in fold.train and len(fold.train) == 19


# ---------------------------------------------------------------------------- files
def test_save_and_load_round_trip(tmp_path):
    root = str(tmp_path / "data")
    ids = [f"{root}/c{i % 2}/img{i}.png" for i in range(40)]
    labels = np.array([i % 2 for i in range(40)])
    groups = np.arange(40)
    sp = S.holdout(ids, labels, groups, val=0.2, test=0.2, seed=11)
    sp.dropped = [{"id": ids[0], "reason": "duplicate of a test image"}]
    path = tmp_path / "splits.json"
    sp.save(path, root=root)
    saved = json.loads(path.read_text())
    assert saved["kind"] == "kmedtl-splits" and saved["seed"] == 11
    assert all(not s.startswith("/") for f in saved["folds"] for v in f.values() for s in v)
    back = S.Splits.load(path)
    assert back.method == "holdout" and back.seed == 11
    assert back.params == {"val": 0.2, "test": 0.2}
    assert [f.to_dict() for f in back.folds] == [f.to_dict() for f in sp.folds]
    assert back.dropped == sp.dropped
    # The dataset moved: load against the new root.
    moved = S.Splits.load(path, root="/elsewhere")
    assert moved.folds[0].test == [s.replace(root, "/elsewhere") for s in sp.folds[0].test]
    assert moved.dropped[0]["id"] == ids[0].replace(root, "/elsewhere")
    # No root: ids are written as given.
    sp.save(tmp_path / "abs.json")
    assert [f.to_dict() for f in S.Splits.load(tmp_path / "abs.json").folds] == \
        [f.to_dict() for f in sp.folds]


def test_loading_a_file_that_is_not_a_split_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(ConfigError, match="not a kmedtl split file"):
        S.Splits.load(path)


def test_too_few_images_per_class_for_a_fraction_names_the_field_and_the_fix():
    """12 images (3 classes of 4), as a first try on one's own data: the validation part
    (15% of the 70% left) needs a class of at least 5 images.  Before: scikit-learn's
    'n_splits=5 cannot be greater than the number of members in each class' traceback."""
    ids = [f"img{i}" for i in range(12)]
    labels = np.arange(12) % 3
    with pytest.raises(ConfigError, match=r"split\.val: holding out .* needs a class of at "
                                          r"least 5 images; the largest here has 3; use a "
                                          r"smaller split\.val"):
        S.holdout(ids, labels, ids, val=0.15, test=0.3)
    fold = S.holdout(ids, labels, ids, val=0.0, test=0.3).folds[0]  # the remedy it names
    assert sorted(fold.train + fold.val + fold.test) == sorted(ids)
