"""``data.columns``: a dataset's own manifest is read as it is (the OCT set's MANIFEST.csv
names its label column ``class``), with clear errors for a wrong mapping."""

import csv

import pytest
from helpers import smooth_image, write_image

from kmedtl.config import load_config
from kmedtl.data.prepare import load_index
from kmedtl.data.sources import read_manifest
from kmedtl.errors import ConfigError, ManifestError

OCT = "kermany-oct2017-test"


def test_real_oct_manifest_maps_class_and_patient_columns(datasets_dir):
    manifest = datasets_dir / OCT / "MANIFEST.csv"
    if not manifest.is_file():
        pytest.fail(f"{manifest} missing: the OCT dataset is part of the shared datasets")
    index = read_manifest(manifest, columns={"label": "class"})
    assert index.counts()["read"] == 1000 and len(index.samples) == 1000
    assert {s.label for s in index.samples} == {"NORMAL", "CNV", "DME", "DRUSEN"}
    patients = {s.patient_id for s in index.samples}
    assert len(patients) == 633 and None not in patients
    # without the mapping the manifest has no label column: an error naming the header
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['label'\].*'class'"):
        read_manifest(manifest)


def test_column_mapping_renames_and_checks(tmp_path):
    rows = []
    for k, label in enumerate(["cat_a", "cat_b", "cat_a"]):
        path = write_image(tmp_path / f"img{k}.png", smooth_image(k))
        rows.append({"file": path.name, "diagnosis": label, "subject": f"P{k % 2}",
                     "label": "ignored"})
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    index = read_manifest(manifest, columns={"path": "file", "label": "diagnosis",
                                             "patient_id": "subject"})
    assert [(s.label, s.patient_id) for s in index.samples] == [
        ("cat_a", "P0"), ("cat_b", "P1"), ("cat_a", "P0")]
    with pytest.raises(ManifestError, match=r"data.columns.label: .*no column 'dx'"):
        read_manifest(manifest, columns={"label": "dx"})
    with pytest.raises(ManifestError, match=r"data.columns: \['lable'\] are not manifest"):
        read_manifest(manifest, columns={"lable": "diagnosis"})
    cfg = load_config({"data": {"source": "manifest", "manifest": str(manifest),
                                "columns": {"path": "file", "label": "diagnosis"}}})
    index, hierarchy = load_index(cfg)
    assert hierarchy.leaves == ("cat_a", "cat_b") and len(index.samples) == 3
    with pytest.raises(ConfigError, match="data.columns"):
        load_config({"data": {"source": "manifest", "manifest": str(manifest),
                              "columns": ["label"]}})
