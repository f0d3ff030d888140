"""``train.model: multi_input`` from a pipeline YAML: named inputs from the manifest
through ``kmedtl run`` (audit, split, train, evaluate, export) and ``kmedtl predict``.

A plumbing test, not a dataset: no multi-sequence data ships offline, so the test writes a
manifest that pairs two *different* real JPEGs of the same class from
``$KMEDTL_DATASETS/brain-tumor-mri`` as the two "image types" of one case (column ``t1``,
the main image, named by ``data.columns: {path: t1}``; column ``t2``, listed in
``data.extra_columns``).  They are not two sequences of one patient, so nothing here says
anything about multi-input accuracy; it checks that the inputs keep their names from the
CSV to the model, the evaluation, the SavedModel/TFLite/ONNX signatures and ``predict``,
that parity holds, and that a missing column, a missing or unreadable file and an input
name the model does not have are clear errors (with counts that reconcile).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from kmedtl.cli import main as kmedtl_main

CLASSES = ("no_tumor", "glioma_tumor", "pituitary_tumor")
TREE = {"no_tumor": None, "tumor": {"glioma_tumor": None, "pituitary_tumor": None}}
PER_CLASS = 12  # cases per class (two images each)
SIZE = 32


def _images(datasets_dir: Path, cls: str, n: int) -> list[Path]:
    files = sorted((datasets_dir / "brain-tumor-mri" / "Training" / cls).glob("*.jpg"))
    if len(files) < n:
        pytest.skip(f"brain-tumor-mri/Training/{cls} has {len(files)} JPEGs, need {n}")
    return files[:n]


def write_manifest(datasets_dir: Path, out: Path, per_class: int = PER_CLASS) -> Path:
    """``t1,t2,label,patient_id``: each case pairs two different JPEGs of one class."""
    rows = ["t1,t2,label,patient_id"]
    for cls in CLASSES:
        files = _images(datasets_dir, cls, 2 * per_class)
        for i in range(per_class):
            rows.append(f"{files[2 * i]},{files[2 * i + 1]},{cls},{cls}-{i:03d}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n")
    return out


def pipeline(tmp: Path, manifest: Path, *, train=None, data=None, stages=None) -> dict:
    return {
        "name": "multi",
        "data": {"source": "manifest", "manifest": str(manifest),
                 "columns": {"path": "t1"}, "extra_columns": ["t2"], "hierarchy": TREE,
                 "image": {"size": SIZE, "channels": 1}, "cache_dir": str(tmp / "cache"),
                 "workers": 1, **(data or {})},
        "split": {"method": "holdout", "val": 0.2, "test": 0.25, "dedupe": "exact"},
        "augment": {"flip": "horizontal"},
        "train": {"model": "multi_input", "backbone": "cbr_tiny", "epochs": 2,
                  "strategy": "fine_tune", "batch_size": 8, "jit_compile": False,
                  "verbose": 0, "tensorboard": False,
                  "multi_input": {"fusion": "concat", "head": "hierarchical",
                                  "shared_backbone": True}, **(train or {})},
        "output_dir": str(tmp / "runs"),
        "pipeline": {"stages": stages or ["audit", "split", "train", "evaluate", "export"],
                     "evaluate": {"n_boot": 20, "n_gradcam": 0, "n_examples": 2},
                     "export": {"formats": ["savedmodel", "tflite", "onnx"],
                                "tflite_variants": ["float32"]}},
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_config(cfg: dict) -> dict:
    """The run config of a pipeline (what ``kmedtl train`` / ``data audit`` read)."""
    return {k: v for k, v in cfg.items() if k != "pipeline"}


@pytest.fixture(scope="module")
def multi_run(datasets_dir, tmp_path_factory):
    """One ``kmedtl run`` of a multi-input pipeline through export (shared by the tests)."""
    tmp = tmp_path_factory.mktemp("multi")
    manifest = write_manifest(datasets_dir, tmp / "cases.csv")
    path = write_yaml(tmp / "multi.yaml", pipeline(tmp, manifest))
    assert kmedtl_main(["run", str(path)]) == 0
    return tmp / "runs" / "multi", manifest, tmp


@pytest.mark.slow
def test_run_trains_evaluates_and_exports_named_inputs(multi_run):
    import tensorflow as tf

    from kmedtl.run_folder import RunFolder

    run, _, _ = multi_run
    rf = RunFolder(run)
    assert rf.input_names == ["t1", "t2"] and rf.data_inputs == ["t1", "t2"]
    assert type(rf.model).__name__ == "MultiInputClassifier"
    assert rf.input_shape == (SIZE, SIZE, 1)
    tm = rf.train_metrics
    assert tm["model"] == "multi_input" and tm["inputs"] == ["t1", "t2"]
    assert tm["multi_input"] == {"fusion": "concat", "head": "hierarchical",
                                 "shared_backbone": True}
    assert [p["name"] for p in tm["phases"]] == ["head", "all"]  # strategy fine_tune
    # evaluated: every test case predicted, none skipped
    metrics = json.loads((run / "metrics.json").read_text())
    n_test = len(rf.splits().folds[0].test)
    assert metrics["test"]["n"] == n_test > 0 and metrics["test"]["skipped"] == []
    assert (run / "report.html").is_file() and (run / "predictions.csv").is_file()
    # exported: every format takes one input per image type, named after it
    export = json.loads((run / "export" / "export.json").read_text())
    assert export["verified"] is True, export["failures"]
    assert export["model"]["inputs"] == ["t1", "t2"]
    for sig in ("serving_default", "predict_pixels"):
        assert sorted(export["signatures"][sig]["inputs"]) == ["t1", "t2"]
    for fmt in ("savedmodel", "tflite_float32", "onnx"):
        assert export["formats"][fmt]["parity"]["passed"], (fmt, export["formats"][fmt])
    # serving_default decodes the JPEG bytes of both inputs in-graph
    pre = export["preprocessing"]
    assert pre["n"] == n_test and pre["max_abs_prob_diff"] < 1e-2, pre
    sm = tf.saved_model.load(str(run / "export" / "savedmodel"))
    for sig in ("serving_default", "predict_pixels"):
        _, kwargs = sm.signatures[sig].structured_input_signature
        assert sorted(kwargs) == ["t1", "t2"], (sig, kwargs)
    from ai_edge_litert.interpreter import Interpreter

    lite = Interpreter(model_path=str(run / "export" / "tflite" / "model_float32.tflite"))
    assert sorted(lite.get_signature_list()["serving_default"]["inputs"]) == ["t1", "t2"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(run / "export" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    assert sorted(i.name.split(":")[0] for i in sess.get_inputs()) == ["t1", "t2"]


@pytest.mark.slow
def test_every_format_predicts_named_inputs_alike(multi_run):
    from kmedtl.export.errors import ExportError
    from kmedtl.export.predictors import load_predictor

    run, _, _ = multi_run
    rf_samples = _test_cases(run)
    files = {"t1": [s["t1"] for s in rf_samples], "t2": [s["t2"] for s in rf_samples]}
    keras_p = load_predictor(run / "model.keras")
    ref = keras_p.predict_files(files)
    for path in (run / "export" / "savedmodel", run / "export" / "model.onnx",
                 run / "export" / "tflite" / "model_float32.tflite"):
        p = load_predictor(path)
        assert p.inputs == ["t1", "t2"]
        got = p.predict_files(files)
        np.testing.assert_allclose(got["leaf"], ref["leaf"], atol=1e-3, err_msg=str(path))
        assert list(got["label"]) == list(ref["label"])
        with pytest.raises(ExportError, match=r"one input per image type \['t1', 't2'\]"):
            p.predict_pixels(np.zeros((1, SIZE, SIZE, 1), np.float32))
    sm = load_predictor(run / "export" / "savedmodel")
    blobs = {n: [Path(f).read_bytes() for f in fs] for n, fs in files.items()}
    by_bytes = sm.predict_bytes(blobs)
    np.testing.assert_allclose(by_bytes["leaf"], ref["leaf"], atol=1e-2)
    # the two inputs are not interchangeable: the model sees which image is which
    swapped = keras_p.predict_files({"t1": files["t2"], "t2": files["t1"]})
    assert not np.allclose(swapped["leaf"], ref["leaf"])


def _test_cases(run: Path) -> list[dict]:
    from kmedtl.run_folder import RunFolder

    rf = RunFolder(run)
    return [{"t1": s.path, **dict(s.extra)} for s in rf.split_samples("test")]


@pytest.mark.slow
def test_predict_cli_takes_one_named_argument_per_case(multi_run, capsys):
    run, _, _ = multi_run
    cases = _test_cases(run)[:2]
    args = [f"t1={c['t1']},t2={c['t2']}" for c in cases]
    capsys.readouterr()
    assert kmedtl_main(["predict", str(run / "export" / "savedmodel"), *args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == args and all(r["label"] in CLASSES for r in rows)
    # a bare file, an unknown input name: one error line each, the good case still runs
    code = kmedtl_main(["predict", str(run / "export" / "model.onnx"), args[0],
                        cases[1]["t1"], f"t1={cases[1]['t1']},flair={cases[1]['t2']}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "give each case as t1=FILE,t2=FILE" in err
    assert "'flair' is not an input of the model; its inputs are ['t1', 't2']" in err


@pytest.mark.slow
def test_evaluate_on_data_naming_other_inputs_is_a_clear_error(multi_run, capsys):
    run, manifest, tmp = multi_run
    other = tmp / "other.csv"
    other.write_text(manifest.read_text().replace("t1,t2,", "t1,flair,", 1))
    test_cfg = write_yaml(tmp / "other.yaml", {"data": {
        "source": "manifest", "manifest": str(other), "columns": {"path": "t1"},
        "extra_columns": ["flair"]}})
    assert kmedtl_main(["evaluate", str(run), "--test", str(test_cfg), "--n-boot", "10",
                        "--gradcam", "0"]) == 2
    err = capsys.readouterr().err
    assert "the model's inputs are ['t1', 't2'] but the data gives ['t1', 'flair']" in err
    assert "missing ['t2']" in err and "data.extra_columns" in err
    # a CSV is read with the run's own image columns: one without t2 names it and the fix
    assert kmedtl_main(["evaluate", str(run), "--test", str(other), "--n-boot", "10",
                        "--gradcam", "0"]) == 2
    err = capsys.readouterr().err
    assert "other.csv" in err and "['t2'] not in the CSV header" in err
    assert "data.extra_columns" in err


def test_missing_and_unreadable_images_are_skipped_by_case_and_reconcile(datasets_dir,
                                                                         tmp_path, capsys):
    manifest = write_manifest(datasets_dir, tmp_path / "cases.csv", per_class=3)
    lines = manifest.read_text().splitlines()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    t1, t2, label, pid = lines[2].split(",")
    lines[2] = f"{t1},{tmp_path / 'nowhere.jpg'},{label},{pid}"  # CSV line 3: missing t2
    t1, t2, label, pid = lines[5].split(",")
    lines[5] = f"{t1},{bad},{label},{pid}"  # CSV line 6: unreadable t2
    t1, t2, label, pid = lines[7].split(",")
    lines[7] = f"{t1},,{label},{pid}"  # CSV line 8: empty t2
    manifest.write_text("\n".join(lines) + "\n")
    cfg = write_yaml(tmp_path / "cfg.yaml", run_config(pipeline(tmp_path, manifest)))
    out = tmp_path / "audit.json"
    assert kmedtl_main(["data", "audit", str(cfg), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    c = report["counts"]
    assert (c["read"], c["used"], c["skipped"]) == (9, 6, 3)
    assert c["read"] == c["used"] + c["skipped"]
    reasons = sorted(s["reason"] for s in report["skipped"])
    assert any("cases.csv:3: image column 't2':" in r and "nowhere.jpg does not exist" in r
               and "fix the path in the CSV" in r for r in reasons), reasons
    assert any("cases.csv:6: image column 't2' (input 't2'):" in r and "whole case" in r
               for r in reasons), reasons
    assert any("cases.csv:8: image column 't2' is empty" in r for r in reasons), reasons
    capsys.readouterr()
    assert kmedtl_main(["data", "audit", str(cfg), "--strict"]) == 1


@pytest.mark.parametrize("change, message", [
    ({"data": {"extra_columns": ["t3"]}},
     r"cases.csv: data.extra_columns: extra image column\(s\) \['t3'\] not in the CSV header"),
    ({"data": {"extra_columns": []}},
     r"'multi_input' needs several images per case.*data.extra_columns"),
    ({"train": {"model": "hierarchical"}},
     r"'hierarchical' takes one image per case, but the data has 2 image inputs "
     r"\['t1', 't2'\].*train.model: multi_input"),
    ({"data": {"columns": {"path": "t1"}, "extra_columns": ["t 2"]}},
     r"data.extra_columns: column 't 2' names a model input.*rename the column"),
    ({"train": {"multi_input": {"fusion": "sum"}}},
     r"train.multi_input.fusion: Input should be 'concat' or 'average'"),
])
def test_config_errors_name_the_field_and_the_fix(datasets_dir, tmp_path, capsys, change,
                                                   message):
    import re

    manifest = write_manifest(datasets_dir, tmp_path / "cases.csv", per_class=2)
    if "t 2" in str(change):
        manifest.write_text(manifest.read_text().replace("t1,t2,", "t1,t 2,", 1))
    cfg = pipeline(tmp_path, manifest)
    for section, values in change.items():
        cfg[section] = {**cfg[section], **values}
    path = write_yaml(tmp_path / "cfg.yaml", run_config(cfg))
    capsys.readouterr()
    assert kmedtl_main(["train", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(message, err), err


@pytest.mark.slow
def test_average_fusion_flat_head_one_backbone_per_input(datasets_dir, tmp_path):
    """The other YAML choices build and train (one epoch, linear probe: both backbones
    frozen, the two heads train) through the normal Trainer."""
    from kmedtl.run_folder import RunFolder

    manifest = write_manifest(datasets_dir, tmp_path / "cases.csv", per_class=4)
    cfg = pipeline(tmp_path, manifest, stages=["audit", "split", "train"], train={
        "epochs": 1, "strategy": "linear_probe",
        "multi_input": {"fusion": "average", "head": "flat", "shared_backbone": False}})
    cfg["split"] = {"method": "holdout", "val": 0.25, "test": 0.25, "dedupe": "none"}
    cfg["data"]["hierarchy"] = None
    path = write_yaml(tmp_path / "avg.yaml", cfg)
    assert kmedtl_main(["run", str(path)]) == 0
    model = RunFolder(tmp_path / "runs" / "multi").model
    assert model.input_names == ["t1", "t2"] and model.fusion == "average"
    assert model.head == "flat" and model.shared_backbone is None
    assert sorted(model.backbones) == ["t1", "t2"]
    assert model.output_shape == (None, len(CLASSES))
    phases = RunFolder(tmp_path / "runs" / "multi").train_metrics["phases"]
    assert [p["name"] for p in phases] == ["linear_probe"], phases
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


@pytest.mark.parametrize("shared", [True, False])
def test_freezing_strategies_see_every_backbone(shared):
    """linear_probe / fine_tune / freeze / lr multipliers work on the backbone(s) of a
    multi-input model with a hierarchical head (no head is mistaken for backbone)."""
    from kmedtl.hierarchy import Hierarchy
    from kmedtl.models import MultiInputClassifier, backbone
    from kmedtl.training.freezing import (
        freeze_backbone,
        freeze_first,
        head_layers,
        layer_groups,
        model_backbones,
    )

    def bb():
        return backbone("cbr_tiny", input_shape=(SIZE, SIZE, 1))

    h = Hierarchy(TREE)
    model = (MultiInputClassifier(bb(), h, input_names=["t1", "t2"], head="hierarchical")
             if shared else
             MultiInputClassifier({"t1": bb(), "t2": bb()}, h, head="hierarchical"))
    bbs = model_backbones(model)
    assert len(bbs) == (1 if shared else 2)
    heads = {la.name for la in head_layers(model)}
    assert {"root", "tumor"} <= heads and not heads & {b.name for b in bbs}
    groups = layer_groups(model, 3)
    assert groups[-1].name == "head" and len(groups) == 3
    in_backbones = {id(w) for b in bbs for w in b.weights}
    assert all(id(w) in in_backbones for g in groups[:-1] for w in g.weights)
    assert sum(len(g.weights) for g in groups[:-1]) == len(in_backbones)
    freeze_backbone(model)
    assert all(not b.trainable for b in bbs)
    assert {w.path for w in model.trainable_weights} == {
        w.path for la in head_layers(model) for w in la.weights}
    frozen = freeze_first(model, 2)
    assert len(frozen) == 2 * len(bbs) and all(b.trainable for b in bbs)


def test_push_warmup_requests_name_every_input(tmp_path):
    """What a push writes for TF Serving warms both signatures with the named inputs."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from kmedtl.export.push import write_warmup

    path = write_warmup(tmp_path / "tf_serving_warmup_requests", "multi", (SIZE, SIZE, 1),
                        ["t1", "t2"])
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(str(path))]
    first, second = (lg.predict_log.request for lg in logs)
    assert first.model_spec.signature_name == "serving_default"
    assert sorted(first.inputs) == ["t1", "t2"]
    assert tf.make_ndarray(first.inputs["t2"])[0].startswith(b"\x89PNG")
    assert second.model_spec.signature_name == "predict_pixels"
    assert sorted(second.inputs) == ["t1", "t2"]
    assert tf.make_ndarray(second.inputs["t1"]).shape == (1, SIZE, SIZE, 1)
