"""The study reads a manifest dataset (the OCT set, label column ``class``) and keeps every
patient on one side of its fixed test split."""

import csv

import pytest
import yaml

from kmedtl.study.config import load_study
from kmedtl.study.data import load_split

OCT = "kermany-oct2017-test"


@pytest.mark.slow
def test_oct_study_split_is_patient_grouped(datasets_dir, tmp_path):
    root = datasets_dir / OCT
    study = {
        "name": "oct_probe",
        "data": {"root": str(root), "manifest": "MANIFEST.csv", "columns": {"label": "class"},
                 "hierarchy": {"NORMAL": None, "disease": {"CNV": None, "DME": None,
                                                           "DRUSEN": None}},
                 "image_size": 32, "channels": 1, "cache_dir": str(tmp_path / "cache"),
                 "test": "holdout", "test_fraction": 0.2},
        "grid": {"sizes": [25], "seeds": [0]},
        "train": {"backbone": "cbr_tiny", "model": "flat", "epochs": 1},
        "arms": [{"name": "a"}, {"name": "b", "model": "hierarchical"}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    split = load_split(load_study(path)[0].data)
    assert split.summary["train_total"] + split.summary["test_total"] >= 990
    assert sorted(split.summary["test_per_class"]) == ["CNV", "DME", "DRUSEN", "NORMAL"]
    patient = {}
    with open(root / "MANIFEST.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            patient[str(root / row["path"])] = row["patient_id"]
    train = {patient[split.ids[r]] for r in split.train_rows}
    test = {patient[split.ids[r]] for r in split.test_rows}
    assert train and test and not train & test


def test_a_recipe_with_imagenet_weights_builds_a_pretrained_backbone():
    """Study arms take `weights: imagenet` from their recipe (a pretrain entry still wins)."""
    import numpy as np

    from kmedtl.models import backbone
    from kmedtl.study.training import _with_weights, train_section_for
    from kmedtl.training.build import build_training_backbone

    ref = np.asarray(backbone("efficientnet_lite0", weights="imagenet",
                              input_shape=(32, 32, 3)).get_layer("top_conv").kernel)
    tc = train_section_for({"backbone": "efficientnet_lite0", "weights": "imagenet",
                            "epochs": 1}, 25, 0)
    got = np.asarray(build_training_backbone(_with_weights(tc, None), (32, 32, 3))
                     .get_layer("top_conv").kernel)
    np.testing.assert_array_equal(got, ref)
    assert _with_weights(tc, "pre.weights.h5").weights == "pre.weights.h5"  # the entry wins
    scratch = train_section_for({"backbone": "efficientnet_lite0", "epochs": 1}, 25, 0)
    rnd = np.asarray(build_training_backbone(scratch, (32, 32, 3)).get_layer("top_conv").kernel)
    assert np.abs(rnd - ref).max() > 0.01


def _tables(text):  # every table row, minus lines with a generation time stamp
    import re

    return [ln for ln in text.splitlines() if ln.startswith("|")
            and not re.search(r"\d{4}-\d\d-\d\d", ln)]


def _verdict_text(text):  # the verdict paragraphs and "found" lines, which tables miss
    return [ln for ln in text.splitlines() if ln.startswith(("**", "- **"))]


STUDIES = {"oct": "pipelines/study_imagenet_oct.yaml",
           "brain": "pipelines/study_imagenet_brain.yaml"}


@pytest.mark.parametrize("ds", sorted(STUDIES))
@pytest.mark.slow
def test_committed_cells_regenerate_each_dataset_report(ds, datasets_dir, tmp_path):
    """RESULTS_imagenet_<ds>.md is generated from the committed cells, without training."""
    import subprocess
    import sys

    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, "-m", "kmedtl.study", STUDIES[ds], "--out",
         f"pipelines/study_imagenet_{ds}", "--report-only", "--no-plots", "--results", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    committed = open(f"pipelines/RESULTS_imagenet_{ds}.md").read()
    assert _tables(out.read_text()) == _tables(committed)
    assert _verdict_text(out.read_text()) == _verdict_text(committed)
    assert "Holm" in committed and "| Holm p |" in committed


@pytest.mark.slow
def test_committed_cells_regenerate_the_cross_dataset_summary(datasets_dir, tmp_path):
    from kmedtl.study.summary import main

    out = tmp_path / "RESULTS.md"
    assert main(["--out", str(out)] + [f"{y}=pipelines/study_imagenet_{d}"
                                       for d, y in sorted(STUDIES.items(), reverse=True)]) == 0
    committed = open("pipelines/RESULTS.md").read()
    assert _tables(out.read_text()) == _tables(committed)
    assert _verdict_text(out.read_text()) == _verdict_text(committed)
    assert "Holm" in committed and "Holm p" in committed
    assert "| kermany-oct2017-test |" in committed and "| brain-tumor-mri |" in committed
