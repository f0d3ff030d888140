"""Labels that match nothing and classes that get nothing are errors (issue 14).

A one-letter typo in the hierarchy YAML (leaf ``[Ss]``, folder ``S``) used to turn 18% of
the images into ``unknown_label`` skips: the audit printed one count line and exited 0,
and ``kmedtl run`` trained and exported a model whose leaf had zero images.  Now a leaf
with no usable image and a label missing from the hierarchy stop ``split``/``train``/
``run`` with one line per problem naming the leaf and the nearest folder names; the audit
prints its report and exits 2; ``data.unknown_labels: skip`` leaves unknown labels out on
purpose, with their counts printed.  Zero usable images is an error everywhere.
"""

import logging

import pytest
import yaml
from helpers import smooth_image, write_image

from kmedtl.cli import main

TYPO = {"actinic": ["AK"], "basal": ["BCC"], "seborrheic": ["Ss"]}  # the folder is 'S'


def photos(root, per_class=(("AK", 4), ("BCC", 4), ("S", 2))):
    seed = 0
    for label, n in per_class:
        for i in range(n):
            seed += 1
            write_image(root / label / f"{label}_{i}.jpg", smooth_image(seed, size=40),
                        quality=92)
    return root


def config(tmp_path, root, hierarchy, **data):
    cfg = {"name": "typo",
           "data": {"root": str(root), "hierarchy": hierarchy, "image": {"size": 32},
                    "cache_dir": str(tmp_path / "cache"), "workers": 1, **data},
           "split": {"method": "holdout", "val": 0.25, "test": 0.25, "dedupe": "exact"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def test_typo_in_a_leaf_stops_split_naming_the_leaf_and_the_folder(tmp_path, capsys):
    root = photos(tmp_path / "photos")
    path, _ = config(tmp_path, root, TYPO)
    rc = main(["data", "split", str(path), "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert not (tmp_path / "s.json").exists()
    first = err.splitlines()[0]
    assert "leaf 'seborrheic'" in first and "'Ss'" in first and "did you mean 'S'?" in first
    assert "Traceback" not in err


def test_typo_stops_kmedtl_run_before_training(tmp_path, capsys):
    root = photos(tmp_path / "photos")
    _, cfg = config(tmp_path, root, TYPO)
    cfg["output_dir"] = str(tmp_path / "runs")
    cfg["train"] = {"backbone": "cbr_tiny", "epochs": 1}
    cfg["pipeline"] = {"stages": ["audit", "split", "train"]}
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump(cfg))
    rc = main(["run", str(pipe)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "leaf 'seborrheic'" in err and "did you mean 'S'?" in err
    assert not (tmp_path / "runs" / "typo" / "model.keras").exists()


def test_audit_prints_the_report_then_fails_on_a_typo(tmp_path, capsys):
    root = photos(tmp_path / "photos")
    hierarchy = tmp_path / "h.yaml"
    hierarchy.write_text(yaml.safe_dump(TYPO))
    rc = main(["data", "audit", str(root), "--hierarchy", str(hierarchy), "--no-cache",
               "--size", "32", "--workers", "1"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "read 10 = used 8 + skipped 2" in out and "unknown_label 2" in out
    assert "did you mean 'S'?" in err
    assert "'S' 2" in err  # the folder label that is not in the hierarchy, with its count


def test_folder_label_missing_from_the_hierarchy_stops_split_unless_skip(tmp_path, capsys,
                                                                        caplog):
    root = photos(tmp_path / "photos", (("AK", 4), ("BCC", 4), ("S", 4), ("extra", 2)))
    tree = {"actinic": ["AK"], "basal": ["BCC"], "seborrheic": ["S"]}
    path, _ = config(tmp_path, root, tree)
    rc = main(["data", "split", str(path), "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'extra' 2" in err and "data.unknown_labels: skip" in err
    # explicit skip: the split is made and the console names what was left out
    path, _ = config(tmp_path, root, tree, unknown_labels="skip")
    with caplog.at_level(logging.WARNING, logger="kmedtl"):
        rc = main(["data", "split", str(path), "--out", str(tmp_path / "s.json")])
    assert rc == 0
    assert "left out 2 file(s)" in caplog.text and "'extra' 2" in caplog.text


def test_zero_usable_images_is_an_error_for_audit_and_split(tmp_path, capsys):
    """Before: the audit exited 0 on 'read 3 = used 0 + skipped 3'."""
    root = tmp_path / "broken"
    for label in ("A", "B"):
        (root / label).mkdir(parents=True)
        (root / label / "x.jpg").write_bytes(b"")
    (root / "A" / "y.png").write_bytes(b"\x89PNG not really")
    rc = main(["data", "audit", str(root), "--no-cache", "--size", "32", "--workers", "1"])
    out, err = capsys.readouterr()
    assert "read 3 = used 0 + skipped 3" in out
    assert rc == 2 and "no usable images" in err and "zero_byte 2" in err
    path, _ = config(tmp_path, root, None)
    assert main(["data", "split", str(path), "--out", str(tmp_path / "s.json")]) == 2
    assert "no usable images" in capsys.readouterr().err


def test_check_labels_suggests_the_nearest_names():
    from kmedtl.data.labels import nearest

    assert nearest(["Ss", "seborrheic"], ["S", "AK", "BCC"])[0] == "S"
    assert nearest(["glioma_tumour"], ["glioma_tumor", "no_tumor"])[0] == "glioma_tumor"
    assert nearest(["x"], ["completely", "different"]) == []


@pytest.mark.parametrize("unknown_labels", ["sometimes", "SKIP"])
def test_unknown_labels_setting_is_validated(tmp_path, unknown_labels, capsys):
    root = photos(tmp_path / "photos")
    path, _ = config(tmp_path, root, TYPO, unknown_labels=unknown_labels)
    assert main(["data", "split", str(path), "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "data.unknown_labels" in err and "'skip'" in err and "unknown field" not in err
