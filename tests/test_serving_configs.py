"""``serving/`` deployment files parse with TF Serving's own config messages and agree
with each other and with what ``push_run`` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from kmedtl.serving.protos import BatchingParameters, MonitoringConfig

SERVING = Path(__file__).resolve().parents[1] / "serving"


def _parse(name, message):
    return text_format.Parse((SERVING / name).read_text(), message)


def test_models_config_serves_stable_and_canary_versions():
    cfg = _parse("models.config", model_server_config_pb2.ModelServerConfig())
    (model,) = cfg.model_config_list.config
    assert model.name == "brain_tumor" and model.model_platform == "tensorflow"
    assert model.base_path == f"/models/{model.name}"  # saved_models/<name> in compose
    versions = list(model.model_version_policy.specific.versions)
    assert set(model.version_labels) == {"stable", "canary"}
    assert set(model.version_labels.values()) <= set(versions)
    assert model.version_labels["stable"] != model.version_labels["canary"]


def test_batching_config_is_consistent():
    b = _parse("batching.config", BatchingParameters())
    sizes = list(b.allowed_batch_sizes)
    assert sizes == sorted(sizes) and sizes[-1] == b.max_batch_size.value
    assert b.batch_timeout_micros.value > 0 and b.num_batch_threads.value >= 1


def test_monitoring_config_enables_prometheus():
    m = _parse("monitoring.config", MonitoringConfig())
    assert m.prometheus_config.enable and m.prometheus_config.path.startswith("/")


def test_protos_reject_unknown_fields():
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch_size { value: 8 } max_batch: 3", BatchingParameters())


def test_docker_compose_mounts_and_flags_match_the_files():
    compose = yaml.safe_load((SERVING / "docker-compose.yml").read_text())
    svc = compose["services"]["tf-serving"]
    assert svc["image"].startswith("tensorflow/serving:")
    flags = dict(f.lstrip("-").split("=", 1) for f in svc["command"])
    mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        host = mounts[flags[flag]]
        assert (SERVING / host).resolve().is_file(), flag
    assert flags["enable_batching"] == "true" and flags["enable_model_warmup"] == "true"
    assert flags["allow_version_labels_for_unavailable_models"] == "true"
    assert mounts["/models"] == "../saved_models"
    cfg = _parse("models.config", model_server_config_pb2.ModelServerConfig())
    assert cfg.model_config_list.config[0].base_path.startswith("/models/")
    ports = {p.split(":")[1] for p in svc["ports"]}
    assert ports == {flags["port"], flags["rest_api_port"]}


def test_warmup_file_holds_prediction_logs_for_both_signatures(tmp_path):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from kmedtl.export.push import write_warmup

    path = write_warmup(tmp_path / "tf_serving_warmup_requests", "brain_tumor", (32, 32, 1))
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(str(path))]
    assert [lg.WhichOneof("log_type") for lg in logs] == ["predict_log", "predict_log"]
    first, second = (lg.predict_log.request for lg in logs)
    assert first.model_spec.name == "brain_tumor"
    png = tf.make_ndarray(first.inputs["image_bytes"])
    assert png.shape == (1,) and png[0].startswith(b"\x89PNG")
    assert tf.io.decode_png(png[0]).shape == (32, 32, 1)
    assert tf.make_ndarray(second.inputs["pixels"]).shape == (1, 32, 32, 1)
    assert np.all(tf.make_ndarray(second.inputs["pixels"]) == 0)
