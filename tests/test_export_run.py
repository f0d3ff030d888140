"""``export_run`` / ``push_run`` / ``kmedtl export`` / ``kmedtl predict`` end to end on a
real run folder (brain-tumour MRI JPEGs, trained, evaluated and exported once per
session by :func:`test_export_helpers.exported_run`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from test_export_helpers import exported_run, jpeg_files

from kmedtl.export import export_run, load_predictor, push_run
from kmedtl.export.stage import BOUNDS, MIN_PARITY_IMAGES


@pytest.fixture(scope="module")
def built(tmp_path_factory, datasets_dir):
    return exported_run(tmp_path_factory, datasets_dir)


def _cli(*argv):
    from kmedtl.cli import main

    return main([str(a) for a in argv])


@pytest.mark.slow
def test_export_writes_every_format_and_passes_parity(built):
    report = built["report"]
    out = report.out_dir
    assert out == built["run"] / "export" and report.verified, report.failures
    assert (out / "savedmodel" / "saved_model.pb").is_file() and (out / "model.onnx").is_file()
    for v in ("float32", "float16", "dynamic_int8", "int8"):
        assert (out / "tflite" / f"model_{v}.tflite").is_file()
    doc = json.loads((out / "export.json").read_text())
    assert doc["kind"] == "kmedtl-export" and doc["verified"] is True
    assert doc["model"]["leaves"] == ["normal", "glioma", "meningioma", "pituitary"]
    assert doc["class_names"]["level_1"] == ["normal", "tumor"]
    assert doc["parity_data"].startswith("test split") and not out.with_name(".export").exists()
    n_test = json.loads((built["run"] / "train_metrics.json").read_text())["n_test"]
    if n_test < MIN_PARITY_IMAGES:  # one disagreement must not flip a verdict
        assert f"+ {MIN_PARITY_IMAGES - n_test} augmented copies" in doc["parity_data"]
    for name, (kind, bound) in BOUNDS.items():
        p = doc["formats"][name]["parity"]
        assert p["n"] == max(n_test, MIN_PARITY_IMAGES) and p["passed"]
        if kind == "max_abs":
            assert p["max_abs_diff"] <= bound
        else:
            assert p["agreement"] >= bound
        assert 0.0 <= doc["formats"][name]["accuracy"] <= 1.0
        assert doc["formats"][name]["size_bytes"] > 0
    # the model is far from chance, so int8 agreement is not trivially met
    assert doc["formats"]["keras"]["accuracy"] >= 0.35
    sizes = {k: doc["formats"][k]["size_bytes"] for k in doc["formats"]}
    assert sizes["tflite_dynamic_int8"] < sizes["tflite_float16"] < sizes["tflite_float32"]
    # serving_default on the files' encoded bytes agrees with the training pipeline
    pre = doc["preprocessing"]
    assert pre["n"] > 0 and pre["agreement"] >= 0.97 and pre["max_abs_prob_diff"] < 1e-2
    assert doc["calibration"]["source"] == "calibration.json"
    temp = json.loads((built["run"] / "calibration.json").read_text())["temperature"]
    assert doc["model"]["temperature"] == pytest.approx(temp)


@pytest.mark.slow
def test_savedmodel_signature_defs_match_what_the_client_sends(built):
    from tensorflow.core.protobuf import saved_model_pb2

    from kmedtl.serving import grpc_request

    sm = built["report"].out_dir / "savedmodel"
    proto = saved_model_pb2.SavedModel.FromString((sm / "saved_model.pb").read_bytes())
    sigs = proto.meta_graphs[0].signature_def
    assert {"serving_default", "predict_pixels"} <= set(sigs)
    image = sigs["serving_default"].inputs["image_bytes"]
    assert image.dtype == tf.string.as_datatype_enum
    assert [d.size for d in image.tensor_shape.dim] == [-1]
    pixels = sigs["predict_pixels"].inputs["pixels"]
    assert pixels.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in pixels.tensor_shape.dim] == [-1, 32, 32, 1]
    outputs = sigs["serving_default"].outputs
    assert set(outputs) == {"leaf", "calibrated", "level_1", "level_2", "node_root",
                            "node_tumor", "label", "label_index", "confidence"}
    assert outputs["label"].dtype == tf.string.as_datatype_enum
    assert [d.size for d in outputs["leaf"].tensor_shape.dim] == [-1, 4]
    req = grpc_request("bt_export", [b"\x89PNG"])
    sent = req.inputs["image_bytes"]
    assert sent.dtype == image.dtype and req.model_spec.signature_name == "serving_default"
    req = grpc_request("bt_export", pixels=np.zeros((2, 32, 32, 1), np.float32))
    assert req.inputs["pixels"].dtype == pixels.dtype
    assert [d.size for d in req.inputs["pixels"].tensor_shape.dim] == [2, 32, 32, 1]


@pytest.mark.slow
def test_every_format_predicts_files_alike(built, datasets_dir):
    out = built["report"].out_dir
    files = jpeg_files(datasets_dir, 8)
    paths = [built["run"] / "model.keras", out / "savedmodel", out / "model.onnx",
             out / "tflite" / "model_float32.tflite"]
    results = [load_predictor(p).predict_files(files) for p in paths]
    ref = results[0]
    np.testing.assert_allclose(ref["leaf"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ref["level_1"].sum(1), 1.0, atol=1e-5)
    for got in results[1:]:
        for k in ("leaf", "calibrated", "level_1", "level_2", "confidence"):
            np.testing.assert_allclose(got[k], ref[k], atol=1e-4, err_msg=k)
        assert list(got["label"]) == list(ref["label"])
    sm = load_predictor(out / "savedmodel")
    by_bytes = sm.predict_bytes([f.read_bytes() for f in files])
    assert list(by_bytes["label"]) == list(ref["label"])
    np.testing.assert_allclose(by_bytes["leaf"], ref["leaf"], atol=1e-2)


@pytest.mark.slow
def test_bad_requests_fail_with_a_clear_message(built, datasets_dir):
    from helpers import png_header_only

    sm = tf.saved_model.load(str(built["report"].out_dir / "savedmodel"))
    serve = sm.signatures["serving_default"]
    good = jpeg_files(datasets_dir, 1)[0].read_bytes()
    cases = {
        b"this is not an image": "not a PNG or JPEG",
        b"": "not a PNG or JPEG",
        b"GIF89a" + b"\x00" * 40: "not a PNG or JPEG",
        png_header_only(60000, 60000): "refused before decoding",
        good[: len(good) // 3]: "truncated JPEG",  # libjpeg alone would pad it with gray
    }
    for blob, message in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            serve(image_bytes=tf.constant([good, blob]))
    # a loaded signature (like TF Serving) feeds any shape; the graph checks it at run time
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"image_bytes \[\] is not compatible with expected shape \[\?\]"):
        serve(image_bytes=tf.constant(good))
    pix = sm.signatures["predict_pixels"]
    for bad in ((1, 48, 48, 1), (32, 32, 1), (1, 32, 32, 3)):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"pixels \[.*\] is not compatible with expected shape "
                                 r"\[\?,32,32,1\]"):
            pix(pixels=tf.zeros(bad))
    with pytest.raises(tf.errors.InvalidArgumentError, match="above the range"):
        pix(pixels=tf.fill((1, 32, 32, 1), 255.0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or inf"):
        pix(pixels=tf.fill((1, 32, 32, 1), float("nan")))


@pytest.mark.slow
def test_predict_cli_prints_per_level_probabilities(built, datasets_dir, tmp_path, capsys):
    from helpers import make_dicom

    out = built["report"].out_dir
    jpeg = jpeg_files(datasets_dir, 1)[0]
    ramp = (np.add.outer(np.arange(64), np.arange(64)) * 30).astype(np.uint16)
    dcm = tmp_path / "scan.dcm"
    make_dicom(ramp).save_as(dcm, enforce_file_format=True)
    for model in (out / "tflite" / "model_int8.tflite", out / "savedmodel",
                  built["run"] / "model.keras", out / "model.onnx"):
        assert _cli("predict", model, jpeg, dcm) == 0
        text = capsys.readouterr().out
        assert f"{jpeg}: " in text and f"{dcm}: " in text and "confidence" in text
        assert "level 1: normal" in text and "tumor" in text and "level 2: glioma" in text
    assert _cli("predict", out / "model.onnx", jpeg, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["label"] in ("normal", "glioma", "meningioma", "pituitary")
    assert abs(sum(rows[0]["leaf"]) - 1.0) < 1e-4
    assert _cli("predict", tmp_path / "nothing.onnx", jpeg) == 2


@pytest.mark.slow
def test_push_blessing_gate_versions_and_assets(built, tmp_path):
    from tensorflow_serving.apis import prediction_log_pb2

    run, root = built["run"], tmp_path / "saved_models"
    metrics = json.loads((run / "metrics.json").read_text())
    bal = metrics["headline"]["balanced_accuracy"]["value"]
    refused = push_run(run, root=root, thresholds={"balanced_accuracy": 0.99})
    assert not refused.pushed and refused.version is None
    assert "balanced_accuracy" in refused.reason and not (root / "bt_export" / "1").exists()
    first = push_run(run, root=root, thresholds={"balanced_accuracy": bal - 0.01})
    assert first.pushed and first.version == 1 and first.path == root / "bt_export" / "1"
    extra = first.path / "assets.extra"
    for f in ("metrics.json", "model_card.md", "model_card.json", "blessing.json",
              "export.json", "kmedtl.json", "tf_serving_warmup_requests"):
        assert (extra / f).is_file(), f
    blessing = json.loads((extra / "blessing.json").read_text())
    assert blessing["blessed"] and blessing["metric_value"] == pytest.approx(bal)
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in
            tf.data.TFRecordDataset(str(extra / "tf_serving_warmup_requests"))]
    assert [lg.predict_log.request.model_spec.signature_name for lg in logs] == \
        ["serving_default", "predict_pixels"]
    # the warmup requests run against the pushed model itself
    sm = tf.saved_model.load(str(first.path))
    for lg in logs:
        req = lg.predict_log.request
        kwargs = {k: tf.make_ndarray(v) for k, v in req.inputs.items()}
        sm.signatures[req.model_spec.signature_name](**kwargs)
    second = push_run(run, root=root)  # equal metric: not worse, pushed as version 2
    assert second.pushed and second.version == 2
    blessing = json.loads((second.path / "assets.extra" / "blessing.json").read_text())
    assert blessing["baseline"] == {"version": 1, "metric_value": pytest.approx(bal)}
    record = json.loads((root / "bt_export" / "2" / "assets.extra" / "blessing.json")
                        .read_text())
    record["metric_value"] = bal + 0.1  # pretend version 2 was better than this run
    (root / "bt_export" / "2" / "assets.extra" / "blessing.json").write_text(
        json.dumps(record))
    worse = push_run(run, root=root)
    assert not worse.pushed and "version 2" in worse.reason
    assert sorted(p.name for p in (root / "bt_export").iterdir()) == ["1", "2"]
    assert json.loads((run / "push.json").read_text())["pushed"] is False


@pytest.mark.slow
def test_export_cli_one_format_to_another_folder(built, tmp_path, capsys):
    out = tmp_path / "onnx_only"
    assert _cli("export", built["run"], "--formats", "onnx", "--out", out, "--opset", 15) == 0
    text = capsys.readouterr().out
    assert "| onnx |" in text and "verified: yes" in text
    doc = json.loads((out / "export.json").read_text())
    assert set(doc["formats"]) == {"keras", "onnx"} and doc["onnx_opset"] == 15


def test_export_errors_name_the_problem(tmp_path):
    from kmedtl.export import ExportError

    with pytest.raises(ExportError, match="run folder not found"):
        export_run(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(ExportError, match="config.yaml: not found"):
        export_run(tmp_path / "run")


@pytest.mark.slow
def test_mixed_precision_run_exports_in_float32(built, tmp_path):
    """A run trained under mixed_float16 (GPU default) exports: the model is rebuilt in
    float32 with the trained weights before conversion."""
    import shutil

    import keras

    from kmedtl.evaluation.stage import load_model

    run = tmp_path / "mixed_run"
    shutil.copytree(built["run"], run, ignore=shutil.ignore_patterns("export", "backup",
                                                                     "checkpoints", "logs"))
    import test_training_helpers as th

    from kmedtl.models import HierarchicalClassifier, backbone

    trained = load_model(run / "model.keras")
    keras.config.set_dtype_policy("mixed_float16")
    try:  # built as kmedtl.training.build_model does under train.precision
        mixed = HierarchicalClassifier(backbone(th.TINY, input_shape=(32, 32, 1)),
                                       trained.hierarchy)
    finally:
        keras.config.set_dtype_policy("float32")
    mixed.set_weights(trained.get_weights())
    mixed.save(run / "model.keras")
    report = export_run(run, formats=("savedmodel", "onnx"))
    assert report.verified and report.to_dict()["source_precision"] == "mixed_float16"
    x = np.random.default_rng(0).random((4, 32, 32, 1)).astype(np.float32)
    got = load_predictor(report.out_dir / "model.onnx").predict_pixels(x)["leaf"]
    np.testing.assert_allclose(got, np.asarray(trained(x)["leaf"]), atol=1e-4)


def test_augmented_copies_are_seeded_flipped_and_keep_their_source():
    from kmedtl.export.stage import augmented_copies

    x = np.random.default_rng(1).uniform(0, 1, (3, 8, 8, 1)).astype("float32")
    a, src = augmented_copies(x, 10, 0.0, 1.0)
    b, _ = augmented_copies(x, 10, 0.0, 1.0)
    assert a.shape == (10, 8, 8, 1) and src.tolist() == [0, 1, 2] * 3 + [0]
    np.testing.assert_array_equal(a, b)  # seeded
    assert a.min() >= 0.0 and a.max() <= 1.0
    # first round: horizontally flipped copies, close to the flipped source
    assert np.abs(a[0] - x[0][:, ::-1]).mean() < 0.06 < np.abs(a[0] - x[0]).mean()
    assert np.abs(a[3] - x[0]).mean() < 0.06  # second round: no flip
    assert np.abs(a[6] - x[0][::-1, ::-1]).mean() < 0.06  # third round: both flips
