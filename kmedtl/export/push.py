"""TFX-style push: a blessing gate, then an atomic ``saved_models/<name>/<version>/``.

:func:`push_run` takes the run's export (``<run>/export``; :func:`export_run` is called
when missing) and pushes its SavedModel only when it is *blessed*:

1. the export passed its parity checks (``export.json`` ``verified``; an export older
   than ``model.keras`` is redone);
2. every ``thresholds`` entry (``{metric: minimum}``) is met by the run's ``metrics.json``
   (``headline.<metric>.value``, else ``tasks.leaf.metrics.<metric>.value``, or a dotted
   path such as ``binary.auroc.value``);
3. ``metric`` is not worse than the value recorded by the currently pushed (highest)
   version (higher is better; a version without a record does not block).

The version folder is written under a hidden temporary name and renamed to the next
integer, so a polling TF Serving never sees half a model (it ignores non-numeric
folders; the temporary name carries the pusher's PID, and the next push into the same
place removes the ones an interrupted push left: :mod:`kmedtl.ownership`).  Pushing
holds the run folder's one-writer lock (it writes ``push.json``, and the export when
missing).  ``assets.extra/`` holds ``kmedtl.json`` (label tree and preprocessing),
``export.json``, ``metrics.json``, ``model_card.md``/``.json`` (when the run has them),
``blessing.json`` (the gate's record) and ``tf_serving_warmup_requests`` (PredictionLog
records, one per signature, on a synthetic image: no patient data in the artefact).
Every attempt, pushed or not, is also written to ``<run>/push.json``.

Example::

    >>> push = push_run("runs/demo", thresholds={"balanced_accuracy": 0.6})  # doctest: +SKIP
    >>> push.pushed, push.version, push.reason                               # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from kmedtl.export.errors import PushError
from kmedtl.export.model import read_json
from kmedtl.export.predictors import EXPORT_FILE
from kmedtl.export.stage import export_run
from kmedtl.jsonio import write_json
from kmedtl.ownership import owned_name, remove_stale, run_lock
from kmedtl.run_folder import RunFolder
from kmedtl.serving.client import grpc_request

WARMUP_FILE = "tf_serving_warmup_requests"


@dataclass
class PushReport:
    pushed: bool
    version: int | None
    path: Path | None
    reason: str
    blessing: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": "kmedtl-push", "version": 1, "pushed": self.pushed,
                "model_version": self.version, "path": str(self.path) if self.path else None,
                "reason": self.reason, "blessing": self.blessing}


def metric_value(metrics: dict, metric: str):
    """``metric`` from a ``metrics.json`` body (see the module docstring); None if absent."""
    def dig(obj, parts):
        for p in parts:
            if not isinstance(obj, dict) or p not in obj:
                return None
            obj = obj[p]
        return obj

    for path in ([metric] if "." in metric else
                 [f"headline.{metric}", f"tasks.leaf.metrics.{metric}", metric]):
        v = dig(metrics, path.split("."))
        if isinstance(v, dict):
            v = v.get("value")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def versions(base: Path) -> list[int]:
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def _synthetic_png(shape) -> bytes:
    h, w, c = shape
    ramp = np.add.outer(np.arange(h), np.arange(w)) * 255.0 / max(h + w - 2, 1)
    img = np.repeat(ramp[..., None], c, -1).astype(np.uint8)
    return bytes(tf.io.encode_png(img).numpy())


def _named_request(model_name: str, signature: str, tensors: dict):
    """A ``PredictRequest`` with one named input tensor proto per entry of ``tensors``."""
    from tensorflow_serving.apis import predict_pb2  # lazy: tensorflow-serving-api, an extra

    req = predict_pb2.PredictRequest()
    req.model_spec.name = model_name
    req.model_spec.signature_name = signature
    for name, proto in tensors.items():
        req.inputs[name].CopyFrom(proto)
    return req


def write_warmup(path, model_name: str, shape, inputs=None) -> Path:
    """``tf_serving_warmup_requests``: one PredictionLog per signature (synthetic image;
    a multi-input model: the same image for each of its named ``inputs``)."""
    # lazy: tensorflow-serving-api is an optional extra (kmedtl[export])
    from tensorflow_serving.apis import prediction_log_pb2

    if inputs:
        requests = [_named_request(model_name, "serving_default", {
                        n: tf.make_tensor_proto([_synthetic_png(shape)], dtype=tf.string,
                                                shape=[1]) for n in inputs}),
                    _named_request(model_name, "predict_pixels", {
                        n: tf.make_tensor_proto(np.zeros((1, *shape), np.float32),
                                                dtype=tf.float32, shape=[1, *shape])
                        for n in inputs})]
    else:
        pixels = np.zeros((1, *shape), np.float32)
        requests = [grpc_request(model_name, [_synthetic_png(shape)]),
                    grpc_request(model_name, pixels=pixels)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for req in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=req))
            writer.write(log.SerializeToString())
    return path


def push_run(run_dir, *, root="saved_models", name: str | None = None,
             thresholds: dict | None = None, metric: str = "balanced_accuracy") -> PushReport:
    """Bless and push the run's SavedModel (see the module docstring)."""
    with run_lock(run_dir, "kmedtl push", create=False):
        return _push_locked(run_dir, root, name, thresholds, metric)


def _push_locked(run_dir, root, name, thresholds, metric) -> PushReport:
    rf = RunFolder(run_dir, error=PushError)
    run = rf.path
    if not rf.has_config:
        raise PushError(f"{rf.config_path}: not found; push needs a trained run folder")
    name = name or rf.config.name
    export_dir = rf.export_dir
    export = read_json(export_dir / EXPORT_FILE)
    stale = export is not None and rf.has_model and \
        rf.model_path.stat().st_mtime > (export_dir / EXPORT_FILE).stat().st_mtime
    if export is None or stale or not (export_dir / "savedmodel" / "saved_model.pb").is_file():
        export = export_run(run).to_dict()  # missing, or older than the trained model
    metrics = read_json(rf.metrics_path)
    base = Path(root) / name
    current = versions(base)
    record = None
    if current:
        record = read_json(base / str(current[-1]) / "assets.extra" / "blessing.json")
    checks, blessed = [], True

    def check(what, ok, detail):
        nonlocal blessed
        checks.append({"check": what, "passed": bool(ok), "detail": detail})
        blessed = blessed and bool(ok)

    check("export verified", export.get("verified"),
          "parity within bounds" if export.get("verified") else
          "export.json: verified is false: " + ("; ".join(export["failures"])
                                                if export.get("failures") else
                                                "exported without verification; export "
                                                f"with it: kmedtl export {run}"))
    value = None
    if metrics is None:
        check("evaluation", False, f"{rf.metrics_path}: not found; run kmedtl evaluate "
              f"{run} first")
    else:
        value = metric_value(metrics, metric)
        for m, minimum in (thresholds or {}).items():
            v = metric_value(metrics, m)
            check(f"threshold {m} >= {minimum}", v is not None and v >= float(minimum),
                  f"{m} = {v}" if v is not None else f"metrics.json has no {m!r}")
        base_value = (record or {}).get("metric_value")
        if base_value is None or (record or {}).get("metric") != metric:
            check(f"{metric} not worse than the pushed version", True,
                  "no pushed version with a recorded value" if not current else
                  f"version {current[-1]} has no recorded {metric}")
        else:
            check(f"{metric} not worse than the pushed version",
                  value is not None and value >= float(base_value),
                  f"{metric} = {value} vs {base_value} (version {current[-1]})")
    blessing = {"kind": "kmedtl-blessing", "version": 1, "blessed": blessed,
                "run": str(run), "model": name, "metric": metric, "metric_value": value,
                "thresholds": dict(thresholds or {}),
                "baseline": {"version": current[-1] if current else None,
                             "metric_value": (record or {}).get("metric_value")},
                "checks": checks, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not blessed:
        failed = "; ".join(c["detail"] for c in checks if not c["passed"])
        report = PushReport(False, None, None, f"not blessed: {failed}", blessing)
        write_json(rf.push_path, report.to_dict())
        return report

    base.mkdir(parents=True, exist_ok=True)
    remove_stale(base, ".tmp-", what="push temporary folder")
    tmp = base / owned_name(".tmp-")
    try:
        shutil.copytree(export_dir / "savedmodel", tmp)
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        for f in (RunFolder.METRICS, RunFolder.MODEL_CARD_MD, RunFolder.MODEL_CARD_JSON,
                  RunFolder.CALIBRATION):
            if rf.file(f).is_file():
                shutil.copy2(rf.file(f), extra / f)
        shutil.copy2(export_dir / EXPORT_FILE, extra / EXPORT_FILE)
        shape = tuple(export["model"]["input_shape"])
        write_warmup(extra / WARMUP_FILE, name, shape, export["model"].get("inputs"))
        for _ in range(100):  # another pusher may take a number between listing and rename
            version = (versions(base) or [0])[-1] + 1
            blessing["pushed_version"] = version
            write_json(extra / "blessing.json", blessing)
            final = base / str(version)
            try:
                os.rename(tmp, final)
                break
            except OSError:
                if not final.exists():
                    raise
        else:
            raise PushError(f"{base}: could not claim a free version number")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = PushReport(True, version, final, "blessed: " + "; ".join(
        c["detail"] for c in checks), blessing)
    write_json(rf.push_path, report.to_dict())
    return report
