"""The DICOM-manifest pipeline (``pipelines/dicom_manifest.yaml``) end to end on real
brain-tumour images wrapped as MR Secondary Capture files, several per patient."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from kmedtl.pipeline import run_pipeline
from kmedtl.pipeline.make_dicom_demo import SC_SOP_CLASS, make_dicom_demo

pytestmark = pytest.mark.slow

PIPELINE = "pipelines/dicom_manifest.yaml"
PATIENTS_PER_CLASS, IMAGES_PER_PATIENT = 4, 3
N = 4 * PATIENTS_PER_CLASS * IMAGES_PER_PATIENT


def overrides(tmp):
    return {"data": {"image": {"size": 32}, "cache_dir": str(tmp / "cache"), "workers": 1},
            # the shipped backbone (ImageNet EfficientNet-Lite0), smoke-sized
            "train": {"epochs": 2, "batch_size": 8, "verbose": 0, "tensorboard": False},
            "output_dir": str(tmp / "runs"),
            "pipeline": {"evaluate": {"n_boot": 50, "n_gradcam": 2, "n_examples": 2},
                         "export": {"formats": ["savedmodel", "tflite"],
                                    "tflite_variants": ["float32"],
                                    "representative_samples": 8},
                         "push": {"root": str(tmp / "saved_models")}}}


@pytest.fixture(scope="module")
def dicom_demo(datasets_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dicom_pipeline")
    manifest = make_dicom_demo(tmp / "dicom", datasets_dir / "brain-tumor-mri",
                               patients_per_class=PATIENTS_PER_CLASS,
                               images_per_patient=IMAGES_PER_PATIENT, size=96)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KMEDTL_DICOM_DIR", str(tmp / "dicom"))
        res = run_pipeline(PIPELINE, until="evaluate", overrides=overrides(tmp))
        yield tmp, manifest, res


def test_demo_files_are_mr_secondary_captures_with_patients(dicom_demo):
    import pydicom

    _, manifest, _ = dicom_demo
    rows = list(csv.DictReader(open(manifest)))
    assert len(rows) == N and len({r["patient_id"] for r in rows}) == 4 * PATIENTS_PER_CLASS
    ds = pydicom.dcmread(manifest.parent / rows[0]["path"])
    assert ds.SOPClassUID == SC_SOP_CLASS and ds.Modality == "MR"
    assert ds.PatientID == rows[0]["patient_id"] and ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.pixel_array.dtype == np.uint8 and max(ds.pixel_array.shape) == 96


def test_dicom_pipeline_groups_patients_and_evaluates(dicom_demo):
    tmp, manifest, res = dicom_demo
    run = tmp / "runs" / "dicom_manifest"
    assert res.ran == ["audit", "split", "train", "evaluate"]
    s = res.summary
    assert s["status"] == "stopped after evaluate"
    assert s["data"]["counts"] == {"read": N, "used": N, "skipped": 0, "samples": N}
    assert s["split"]["patients"] == 4 * PATIENTS_PER_CLASS
    assert s["split"]["cross_split"]["patients"] == 0
    # check it independently: the split file against the manifest's patients
    patient = {os.path.normpath(manifest.parent / r["path"]): r["patient_id"]
               for r in csv.DictReader(open(manifest))}
    split = json.loads((run / "data" / "splits.json").read_text())
    parts_of: dict = {}
    for part, ids in split["folds"][0].items():
        for i in ids:
            parts_of.setdefault(patient[os.path.normpath(os.path.join(split["root"], i))],
                                set()).add(part)
    assert all(len(p) == 1 for p in parts_of.values())
    assert {p for ps in parts_of.values() for p in ps} == {"train", "val", "test"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_test"] == s["split"]["sizes"]["test"] > 0
    assert metrics["bootstrap"]["unit"] == "patient"
    # no patient ID in anything the run wrote
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".html", ".yaml", ".csv"):
            assert "DEMO-" not in path.read_text(errors="replace"), path


def test_dicom_pipeline_exports_and_pushes_reusing_earlier_stages(dicom_demo, monkeypatch):
    tmp, _, _ = dicom_demo
    monkeypatch.setenv("KMEDTL_DICOM_DIR", str(tmp / "dicom"))
    res = run_pipeline(PIPELINE, overrides=overrides(tmp))
    assert res.skipped == ["audit", "split", "train", "evaluate"]
    assert res.ran == ["export", "push"] and res.summary["status"] == "complete"
    assert res.summary["export"]["verified"] and res.summary["push"]["pushed"]
    assert (tmp / "saved_models" / "dicom_manifest").is_dir()
