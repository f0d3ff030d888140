"""kmedtl's digests live in one place (kmedtl.jsonio), and their values never change: stage
records hold `digest` values, and every study cell key holds the split fingerprint
(`digest_items`), so a changed value would orphan committed records and cells
(pipelines/study_*/cells/)."""

from __future__ import annotations

from kmedtl import jsonio
from kmedtl.pipeline import records
from kmedtl.study import data as study_data


def test_the_study_split_fingerprint_keeps_its_value():
    items = [64, 1, "near", 6, "source", 0.2, 0, "Training/glioma/a.png",
             "Testing/normal/b.png", "|", 1]
    # computed by the study's own _digest before it moved to kmedtl.jsonio
    assert jsonio.digest_items(items) == "a25417b037e614cd"
    assert study_data.digest_items is jsonio.digest_items


def test_the_stage_digest_keeps_its_value_and_the_old_name():
    obj = {"stage": "train", "v": [1, 2.5, None], "p": "x"}
    assert jsonio.digest(obj) == ("034b69fcdae2081fe09278ee7652ba3389c4b0baf65e55836a2c64bb54"
                                  "dde6c8")
    assert records.digest is jsonio.digest and records.canonical is jsonio.canonical
