"""Shortcut audit (``kmedtl.data.shortcuts``): non-content file properties that predict the
label are flagged, with balanced accuracy against a permutation chance bound."""

import json

import numpy as np
import pytest
from helpers import make_dicom, write_image

from kmedtl.data.shortcuts import format_shortcuts, shortcut_audit
from kmedtl.data.sources import Sample, index_folder, read_manifest

OCT = "kermany-oct2017-test"


def _noise(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _png_tree(root, sizes: dict, per_class: int = 12):
    """``root/<class>/<k>.png`` with random content; ``sizes``: class -> (height, width).
    Stored uncompressed, so file size follows the image size only."""
    for label, (h, w) in sizes.items():
        for k in range(per_class):
            write_image(root / label / f"{k}.png", _noise(k, h, w), compress_level=0)
    return root


def _reconciles(report) -> bool:
    c = report["counts"]
    return c["files"] == c["used"] + c["unreadable"] + c["unlabelled"] + c["rare_class"]


def test_size_that_differs_by_class_is_flagged(tmp_path):
    root = _png_tree(tmp_path, {"class_a": (48, 64), "class_b": (64, 48)})
    report = shortcut_audit(index_folder(root).samples)
    assert {"width", "height", "aspect_ratio"} <= set(report["flagged"])
    width = report["properties"]["width"]
    assert width["balanced_accuracy"] == 1.0 and width["chance"] == 0.5
    assert width["chance_p95"] < 1.0
    assert width["by_class"]["class_a"]["median"] == 64
    assert "crop" in width["remedy"]
    assert report["properties"]["format"] == {"skipped": "constant", "distinct": 1,
                                              "value": "PNG"}
    assert report["combined"]["flagged"] and report["n"] == 24 and _reconciles(report)
    lines = format_shortcuts(report)
    assert any(line.startswith("shortcut: width predicts the class (balanced accuracy 1.00, "
                               "chance 0.50") for line in lines)
    json.dumps(report)  # JSON-able


def test_same_sizes_flag_nothing(tmp_path):
    root = _png_tree(tmp_path, {"class_a": (48, 64), "class_b": (48, 64)})
    report = shortcut_audit(index_folder(root).samples)
    assert report["flagged"] == [] and not report["combined"].get("flagged")
    assert report["properties"]["width"]["skipped"] == "constant"
    assert format_shortcuts(report)[0].startswith(
        "no non-content property predicts the label above chance")


def test_label_of_maps_sample_ids_to_classes(tmp_path):
    root = _png_tree(tmp_path, {"class_a": (48, 64), "class_b": (64, 48)})
    samples = index_folder(root).samples
    # relabel by file number instead of folder: the size no longer follows the label
    label_of = {s.id: "even" if int(s.path[-5]) % 2 == 0 else "odd" for s in samples}
    report = shortcut_audit(samples, label_of=label_of)
    assert report["classes"] == ["even", "odd"] and "width" not in report["flagged"]


def test_unreadable_file_is_counted_not_dropped(tmp_path):
    root = _png_tree(tmp_path, {"class_a": (48, 64), "class_b": (64, 48)})
    bad = root / "class_a" / "truncated.png"
    bad.write_bytes((root / "class_a" / "0.png").read_bytes()[:20])  # header cut short
    (root / "class_b" / "empty.png").write_bytes(b"")
    report = shortcut_audit(index_folder(root).samples)
    assert report["unreadable"] == 2 and report["counts"]["files"] == 26
    assert report["n"] == 24 and _reconciles(report)
    by_path = {u["path"]: u for u in report["unreadable_files"]}
    assert str(bad) in by_path and "header" in by_path[str(bad)]["reason"]
    assert any("2 file(s) whose header could not be read" in line
               for line in format_shortcuts(report))


def test_unlabelled_input_is_skipped(tmp_path):
    samples = [Sample(str(write_image(tmp_path / f"{k}.png", _noise(k, 8, 8))), None)
               for k in range(4)]
    report = shortcut_audit(samples)
    assert report["skipped"] == "unlabelled" and report["counts"]["unlabelled"] == 4
    assert format_shortcuts(report) == ["shortcut audit skipped: no labelled files"]


def test_dicom_manufacturer_that_differs_by_class_is_flagged(tmp_path):
    samples = []
    for c, (label, maker) in enumerate((("normal", "AcmeScan"), ("disease", "OtherCo"))):
        for k in range(8):
            ds = make_dicom(_noise(10 * c + k, 16, 16).astype(np.uint16),
                            patient_id=f"PID-{c}{k}", Manufacturer=maker,
                            InstitutionName="General Hospital")
            path = tmp_path / label / f"{k}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            samples.append(Sample(str(path), label, patient_id=f"PID-{c}{k}"))
    report = shortcut_audit(samples)
    assert "manufacturer" in report["flagged"] and report["grouped_by"] == "patient"
    e = report["properties"]["manufacturer"]
    assert e["balanced_accuracy"] == 1.0 and e["by_class"]["normal"]["top"] == [["AcmeScan", 8]]
    assert "site" in e["remedy"]
    assert report["properties"]["institution"]["skipped"] == "constant"
    assert report["properties"]["format"]["value"] == "DICOM"
    text = json.dumps(report)
    assert "PID-" not in text and "Doe" not in text and "19700101" not in text


def _oct_dir(datasets_dir):
    root = datasets_dir / OCT
    if not (root / "MANIFEST.csv").is_file():
        pytest.fail(f"{root} missing: the OCT dataset is part of the shared datasets")
    return root


def test_real_oct_image_size_predicts_the_class(datasets_dir):
    # every OCT image is 512 px wide; the 231 downscaled ones (512x331, 512x165, mostly
    # CNV and DME, re-saved at JPEG quality 90) differ in height, aspect and quantisation
    report = shortcut_audit(index_folder(_oct_dir(datasets_dir)).samples)
    assert report["n"] == 1000 and report["unreadable"] == 0
    assert report["properties"]["width"]["skipped"] == "constant"
    for name in ("height", "aspect_ratio", "jpeg_quant"):
        e = report["properties"][name]
        assert e["flagged"] and e["balanced_accuracy"] > e["chance_p95"] > e["chance"] == 0.25


def test_real_oct_manifest_groups_folds_by_patient(datasets_dir):
    index = read_manifest(_oct_dir(datasets_dir) / "MANIFEST.csv", columns={"label": "class"})
    report = shortcut_audit(index.samples, permutations=10)
    assert report["grouped_by"] == "patient" and "aspect_ratio" in report["flagged"]


def test_real_brain_mri_image_size_predicts_the_class(datasets_dir):
    report = shortcut_audit(index_folder(datasets_dir / "brain-tumor-mri").samples,
                            permutations=10)
    assert report["n"] == 3264 and _reconciles(report)
    assert {"width", "height"} <= set(report["flagged"]) and report["combined"]["flagged"]
    assert report["properties"]["width"]["balanced_accuracy"] > 0.4
