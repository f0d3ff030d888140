"""Two layouts a new user misreads, said out loud: a hierarchy leaf that merges several
class folders (a list is one leaf's raw labels), and a top folder named like a split
(``Test/``) that ``split.method: source`` cannot use."""

from __future__ import annotations

import logging

import pytest
from test_training_helpers import write_images

from kmedtl.config import load_config
from kmedtl.data.audit import audit, format_summary, public
from kmedtl.data.options import ImageOptions
from kmedtl.data.prepare import prepare
from kmedtl.data.sources import index_folder, split_folders
from kmedtl.errors import ConfigError
from kmedtl.hierarchy import Hierarchy


def _tree(root, labels, n=3):
    from PIL import Image

    for k, label in enumerate(labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (16, 16), 40 * k + 10 * i).save(root / label / f"{i}.png")
    return root


def test_a_leaf_merging_class_folders_is_warned_and_recorded(tmp_path, caplog):
    root = _tree(tmp_path / "wounds", ["BG", "N", "torn"])
    h = Hierarchy({"intact": ["BG", "N"], "torn": None})
    with caplog.at_level(logging.WARNING, logger="kmedtl.data"):
        index = index_folder(root, h)
    assert len(index.warnings) == 1
    msg = index.warnings[0]
    for text in ("leaf 'intact'", "['BG', 'N']", "ONE class", "intact: [BG, N]",
                 "intact: {BG: [BG], N: [N]}"):
        assert text in msg, text
    assert [r.getMessage() for r in caplog.records if "intact" in r.getMessage()] == [msg]
    assert {s.label for s in index.samples} == {"BG", "N", "torn"}  # data unchanged
    report = audit(index, ImageOptions(size=16), workers=1, progress=False)
    assert public(report)["warnings"] == [msg]
    assert "warning: " + msg in format_summary(report)
    # the spelling the warning suggests makes two leaves, and no warning
    index = index_folder(root, Hierarchy({"intact": {"BG": ["BG"], "N": ["N"]},
                                          "torn": None}))
    assert index.warnings == []
    # a leaf with one folder each is the ordinary case
    assert index_folder(root, Hierarchy({"bg": ["BG"], "n": ["N"], "torn": None})
                        ).warnings == []


def _source_cfg(root):
    return load_config({"data": {"root": str(root), "cache_dir": None, "workers": 1,
                                 "image": {"size": 16}},
                        "split": {"method": "source", "dedupe": "none"}})


def test_a_lone_test_folder_read_as_a_split_is_explained(tmp_path):
    root = tmp_path / "data"
    _tree(root / "Test", ["benign", "malignant"], n=4)
    assert split_folders(index_folder(root)) == {
        "Test": {"split": "test", "images": 8, "classes": {"benign": 4, "malignant": 4}}}
    with pytest.raises(ConfigError) as err:
        prepare(_source_cfg(root), progress=False)
    msg = str(err.value)
    for text in ("split.method: source", "no training images",
                 "Test/ (read as test: 8 images; classes benign 4, malignant 4)",
                 "named like splits", "<root>/Training/<class>/",
                 "split.method: holdout", str(root / "Test")):
        assert text in msg, text
    assert "independent groups" not in msg
    # the way out the message names: holdout ignores split folders
    cfg = load_config({"data": {"root": str(root), "cache_dir": None, "workers": 1,
                                "image": {"size": 16}},
                       "split": {"method": "holdout", "val": 0.25, "test": 0.25,
                                 "dedupe": "none"}})
    prep = prepare(cfg, progress=False)
    assert len(prep.splits.folds[0].train) > 0


def test_source_split_without_split_folders_or_a_test_folder(tmp_path):
    flat = write_images(tmp_path / "flat", per_class=3)
    with pytest.raises(ConfigError, match=r"no test images: .*no split of its own"):
        prepare(_source_cfg(flat), progress=False)
    only_train = tmp_path / "only_train"
    _tree(only_train / "Training", ["a", "b"])
    with pytest.raises(ConfigError) as err:
        prepare(_source_cfg(only_train), progress=False)
    assert "no test images" in str(err.value)
    assert "Training/ (read as train: 6 images; classes a 3, b 3)" in str(err.value)
