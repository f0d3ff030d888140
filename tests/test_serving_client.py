"""The TF Serving client: request bodies exactly as TF Serving documents them, and real
round trips through an in-process REST server and a gRPC ``PredictionService`` server,
both answering from a kmedtl SavedModel (the TF Serving binary itself is not installable
here)."""

from __future__ import annotations

import base64
import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tensorflow as tf
from helpers import encode_image, make_dicom, smooth_image
from test_export_helpers import tiny_context

from kmedtl.export import ServingError
from kmedtl.serving import (
    ServingClient,
    grpc_request,
    parse_rest_response,
    parse_server_url,
    rest_request,
)


def test_rest_body_for_encoded_images_is_tf_servings_b64_row_format():
    body = rest_request([b"\x89PNG-1", b"\xff\xd8\xff-2"])
    assert body == {"signature_name": "serving_default",
                    "instances": [{"b64": base64.b64encode(b"\x89PNG-1").decode()},
                                  {"b64": base64.b64encode(b"\xff\xd8\xff-2").decode()}]}
    json.dumps(body)  # plain JSON


def test_rest_body_for_pixels_is_columnar_inputs():
    px = np.arange(8, dtype=np.float32).reshape(2, 2, 2, 1) / 8
    body = rest_request(pixels=px)
    assert body["signature_name"] == "predict_pixels" and list(body["inputs"]) == ["pixels"]
    np.testing.assert_array_equal(np.array(body["inputs"]["pixels"], np.float32), px)
    with pytest.raises(ServingError, match="N, H, W, C"):
        rest_request(pixels=px[0])
    with pytest.raises(ServingError, match="either"):
        rest_request()


def test_grpc_predict_request_fields():
    req = grpc_request("brain_tumor", [b"a", b"bc"], version_label="canary")
    assert req.model_spec.name == "brain_tumor"
    assert req.model_spec.signature_name == "serving_default"
    assert req.model_spec.version_label == "canary" and not req.model_spec.HasField("version")
    t = req.inputs["image_bytes"]
    assert t.dtype == tf.string.as_datatype_enum and list(t.string_val) == [b"a", b"bc"]
    assert [d.size for d in t.tensor_shape.dim] == [2]
    px = np.zeros((3, 8, 8, 1), np.float32)
    req = grpc_request("brain_tumor", pixels=px, version=7)
    assert req.model_spec.version.value == 7 and req.model_spec.signature_name == "predict_pixels"
    np.testing.assert_array_equal(tf.make_ndarray(req.inputs["pixels"]), px)
    assert req.inputs["pixels"].dtype == tf.float32.as_datatype_enum


@pytest.mark.parametrize("url, parts", [
    ("http://localhost:8501/v1/models/bt", ("rest", "localhost:8501", "bt", None, None)),
    ("https://h:1/v1/models/bt/versions/3", ("rest", "h:1", "bt", 3, None)),
    ("grpc://h:8500/bt/labels/stable", ("grpc", "h:8500", "bt", None, "stable")),
])
def test_server_urls(url, parts):
    p = parse_server_url(url)
    assert (p["protocol"], p["host"], p["name"], p["version"], p["label"]) == parts


@pytest.mark.parametrize("url", ["ftp://h/bt", "http://h:8501/", "localhost:8501"])
def test_bad_server_urls_say_what_a_url_looks_like(url):
    with pytest.raises(ServingError, match="v1/models/NAME"):
        parse_server_url(url)


def test_rest_responses_row_and_columnar():
    rows = {"predictions": [{"leaf": [0.2, 0.8], "label": "b"}, {"leaf": [0.9, 0.1],
                                                                 "label": "a"}]}
    out = parse_rest_response(rows)
    assert out["leaf"].shape == (2, 2) and list(out["label"]) == ["b", "a"]
    cols = parse_rest_response({"outputs": {"leaf": [[0.2, 0.8]], "label": ["b"]}})
    assert cols["leaf"].shape == (1, 2)
    with pytest.raises(ServingError, match="bad input"):
        parse_rest_response({"error": "bad input"})


# ------------------------------------------------------------------ real round trips
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny SavedModel, its metadata, and TF-Serving-like REST and gRPC servers."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from kmedtl.export.predictors import METADATA_FILE, ModelInfo
    from kmedtl.export.savedmodel import write_savedmodel

    base = tmp_path_factory.mktemp("served")
    ctx = tiny_context(temperature=1.5)
    sm_dir = write_savedmodel(ctx, base / "tiny" / "1")
    info = ModelInfo(ctx.hierarchy, ctx.options, "unit", 1.5, "tiny")
    (sm_dir / "assets.extra").mkdir()
    (sm_dir / "assets.extra" / METADATA_FILE).write_text(json.dumps(info.to_dict()))
    sm = tf.saved_model.load(str(sm_dir))
    seen = []

    def run(signature, inputs):
        seen.append(signature)
        out = sm.signatures[signature](**inputs)
        return {k: v.numpy() for k, v in out.items()}

    class Rest(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path.startswith("/v1/models/tiny") and self.path.endswith(":predict")
            try:
                sig = body["signature_name"]
                if "instances" in body:  # row format, single input, b64 values
                    blobs = [base64.b64decode(i["b64"]) for i in body["instances"]]
                    out = run(sig, {"image_bytes": tf.constant(blobs)})
                    rows = [{k: (v[i].decode() if k == "label" else v[i].tolist())
                             for k, v in out.items()} for i in range(len(blobs))]
                    answer, code = {"predictions": rows}, 200
                else:
                    out = run(sig, {k: tf.constant(v, tf.float32)
                                    for k, v in body["inputs"].items()})
                    answer = {"outputs": {k: ([s.decode() for s in v] if k == "label"
                                              else v.tolist()) for k, v in out.items()}}
                    code = 200
            except tf.errors.InvalidArgumentError as exc:
                answer, code = {"error": exc.message}, 400
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    class Grpc(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 - the proto's naming
            assert request.model_spec.name == "tiny"
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            try:
                out = run(request.model_spec.signature_name, inputs)
            except tf.errors.InvalidArgumentError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
            resp = predict_pb2.PredictResponse()
            for k, v in out.items():
                resp.outputs[k].CopyFrom(tf.make_tensor_proto(v))
            return resp

    http = ThreadingHTTPServer(("127.0.0.1", 0), Rest)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Grpc(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    png = base / "slice.png"
    png.write_bytes(encode_image(smooth_image(5, size=50), "PNG"))
    dcm = base / "scan.dcm"
    make_dicom((np.add.outer(np.arange(40), np.arange(40)) * 20).astype(np.uint16)).save_as(
        dcm, enforce_file_format=True)
    yield {"rest": f"http://127.0.0.1:{http.server_address[1]}/v1/models/tiny",
           "grpc": f"grpc://127.0.0.1:{port}/tiny", "sm": sm_dir, "info": info,
           "png": png, "dcm": dcm, "seen": seen}
    http.shutdown()
    server.stop(0)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_client_round_trip_matches_the_local_savedmodel(served, protocol):
    from kmedtl.export.predictors import load_predictor

    files = [served["png"], served["dcm"], served["png"]]
    served["seen"].clear()
    got = ServingClient(served[protocol], info=served["info"]).predict_files(files)
    # PNG went as bytes to serving_default, DICOM as pixels to predict_pixels
    assert sorted(served["seen"]) == ["predict_pixels", "serving_default"]
    local = load_predictor(served["sm"]).predict_files(files)
    assert list(got["label"]) == list(local["label"])
    for k in ("leaf", "calibrated", "level_1", "level_2", "confidence"):
        np.testing.assert_allclose(np.asarray(got[k], np.float64), local[k], atol=1e-5)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_server_side_errors_come_back_readable(served, protocol):
    client = ServingClient(served[protocol])
    with pytest.raises(ServingError, match="not a PNG or JPEG"):
        client.predict_images([b"no image here"])
    with pytest.raises(ServingError, match="not PNG/JPEG.*--metadata"):
        client.predict_files([served["dcm"]])  # DICOM needs the preprocessing options


def test_predict_cli_against_the_server(served, capsys):
    from kmedtl.cli import main

    code = main(["predict", "--server", served["rest"], "--metadata", str(served["sm"]),
                 str(served["png"]), str(served["dcm"])])
    assert code == 0
    text = capsys.readouterr().out
    assert "level 1: normal" in text and "level 2: glioma" in text and "scan.dcm" in text
    assert main(["predict", "--server", "http://127.0.0.1:9/v1/models/tiny",
                 str(served["png"])]) == 2
    assert "cannot reach the server" in capsys.readouterr().err
