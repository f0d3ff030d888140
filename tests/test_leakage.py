"""kmedtl.data.leakage: the independent count of what crosses a fold's parts, and which
crossings ``split.dedupe`` promises to prevent (the split stage stops on those)."""

from types import SimpleNamespace

import pytest

from kmedtl.data.leakage import cross_split, leaks, similar_neighbours
from kmedtl.data.splits import Fold


def _sample(sid, patient=None, tmp=None):
    # a path that is not DICOM: the patient comes from the manifest's column only
    path = str(tmp / f"{sid}.png")
    open(path, "wb").close()
    return SimpleNamespace(id=sid, patient_id=patient, path=path)


@pytest.fixture
def fold_and_index(tmp_path):
    fold = Fold(train=["a", "b", "c"], val=["d"], test=["e", "f"])
    index = SimpleNamespace(samples=[
        _sample("a", "P1", tmp_path), _sample("b", "P2", tmp_path),
        _sample("c", None, tmp_path), _sample("d", "P3", tmp_path),
        _sample("e", "P1", tmp_path),  # patient P1 in train and test
        _sample("f", "P4", tmp_path)])
    internal = {
        # a and f share pixels (train/test); b and c too, but both in train
        "digests": {"a": "h1", "f": "h1", "b": "h2", "c": "h2", "d": "h3", "e": "h4"},
        "near_pairs": [("b", "d"), ("a", "c")],  # train/val crosses, train/train does not
        "similar_pairs": [("c", "e", 0.97), ("x", "e", 0.99)],  # x is in no part
    }
    return fold, index, internal


def test_cross_split_counts_each_kind(fold_and_index):
    fold, index, internal = fold_and_index
    c = cross_split(fold, internal, index)
    assert c == {"exact_duplicate_groups": 1, "near_duplicate_pairs": 1,
                 "similar_content_pairs": 1, "patients_across": 1, "patients": 4}


def test_leaks_follow_split_dedupe(fold_and_index):
    fold, index, internal = fold_and_index
    c = cross_split(fold, internal, index)
    assert leaks(c, "none") == ["1 patient(s) span parts"]  # patients: always
    assert leaks(c, "exact") == ["1 exact-duplicate group(s) span parts",
                                 "1 patient(s) span parts"]
    assert len(leaks(c, "near")) == 3 and len(leaks(c, "similar")) == 4
    clean = dict.fromkeys(c, 0)
    assert leaks(clean, "similar") == []


def test_frames_of_one_file_are_not_one_group(fold_and_index):
    """Two frames of one multi-frame file have different pixel digests in general; equal
    digests of *different frames* are not counted as one exact-duplicate group."""
    fold = Fold(train=["m.dcm#0"], val=[], test=["m.dcm#1"])
    index = SimpleNamespace(samples=[])
    internal = {"digests": {"m.dcm#0": "h", "m.dcm#1": "h"}, "near_pairs": [],
                "similar_pairs": []}
    assert cross_split(fold, internal, index)["exact_duplicate_groups"] == 0


def test_similar_neighbours_is_raised_to_the_linked_threshold():
    fold = Fold(train=["a"], val=["b"], test=["c", "d"])
    links = [("a", "c", 0.96), ("d", "b", 0.99), ("c", "d", 1.0)]
    assert similar_neighbours(links, fold) == {"r_min": 0.95, "count": 2, "test": 2,
                                               "share": 1.0}
    out = similar_neighbours(links, fold, r_min=0.9, linked_from=0.98)
    assert out["r_min"] == 0.98 and out["count"] == 1
