"""Request builders and a small client for TF Serving's REST and gRPC APIs.

REST (``POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict``), as TF Serving
documents it:

- encoded images to ``serving_default``, row format, binary values as ``{"b64": ...}``::

    {"signature_name": "serving_default", "instances": [{"b64": "iVBORw0..."}]}

- pixels to ``predict_pixels``, columnar format::

    {"signature_name": "predict_pixels", "inputs": {"pixels": [[[[0.0], ...]]]}}

gRPC: ``tensorflow_serving.apis.predict_pb2.PredictRequest`` with ``model_spec.name``,
``model_spec.signature_name``, ``model_spec.version`` or ``version_label`` and
``inputs["image_bytes"]`` (DT_STRING, [N]) or ``inputs["pixels"]`` (DT_FLOAT,
[N, H, W, C]) sent to ``PredictionService/Predict``.

Example::

    >>> body = rest_request([b"\\x89PNG..."])
    >>> body["signature_name"], list(body["instances"][0])
    ('serving_default', ['b64'])
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf

from kmedtl.data.decode import load_image
from kmedtl.data.pipeline import normalize
from kmedtl.errors import ServingError

BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "pixels"
_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def is_raster(data: bytes) -> bool:
    """True for PNG/JPEG bytes (what ``serving_default`` decodes in-graph)."""
    return data.startswith(_RASTER_MAGIC)


def load_pixels(files, options, normalization: str = "unit") -> np.ndarray:
    """Files (PNG/JPEG/DICOM) -> float32 [N, H, W, C] exactly as training saw them.

    Uses :func:`kmedtl.data.decode.load_image` (DICOM rescale/windowing/frames from
    ``options``), 8-bit quantisation, ``/ 255`` and ``normalization``.
    """
    imgs = [load_image(f, options).image.astype(np.float32) / np.float32(255.0) for f in files]
    if not imgs:
        raise ServingError("no input files given")
    return np.asarray(normalize(np.stack(imgs), normalization), np.float32)


# ----------------------------------------------------------------------------- REST
def rest_request(images=None, *, pixels=None, signature_name: str | None = None) -> dict:
    """The REST ``:predict`` body for encoded images (row format, ``b64``) or pixels
    (columnar ``inputs``)."""
    if (images is None) == (pixels is None):
        raise ServingError("rest_request: pass either images (encoded bytes) or pixels")
    if images is not None:
        return {"signature_name": signature_name or "serving_default",
                "instances": [{"b64": base64.b64encode(bytes(b)).decode("ascii")}
                              for b in images]}
    px = np.asarray(pixels, np.float32)
    if px.ndim != 4:
        raise ServingError(f"pixels: expected [N, H, W, C], got shape {list(px.shape)}")
    return {"signature_name": signature_name or "predict_pixels",
            "inputs": {PIXELS_INPUT: px.tolist()}}


def parse_rest_response(body: dict) -> dict[str, np.ndarray]:
    """``{"predictions": [...]}`` (row) or ``{"outputs": {...}}`` (columnar) -> arrays."""
    if "error" in body:
        raise ServingError(f"server error: {body['error']}")
    if "outputs" in body:
        cols = body["outputs"]
    elif "predictions" in body:
        rows = body["predictions"]
        if rows and isinstance(rows[0], dict):
            cols = {k: [r[k] for r in rows] for k in rows[0]}
        else:
            raise ServingError("REST response: predictions are not named outputs")
    else:
        raise ServingError(f"REST response has neither 'predictions' nor 'outputs': "
                           f"{sorted(body)}")
    out = {}
    for k, v in cols.items():
        out[k] = np.array(v, dtype=object) if k == "label" else np.asarray(v)
    return out


# ----------------------------------------------------------------------------- gRPC
def grpc_request(model_name: str, images=None, *, pixels=None,
                 signature_name: str | None = None, version: int | None = None,
                 version_label: str | None = None):
    """A ``PredictRequest`` for encoded images (``image_bytes``) or pixels (``pixels``)."""
    # lazy: tensorflow-serving-api is an optional extra (pip install 'kmedtl[export]')
    from tensorflow_serving.apis import predict_pb2

    if (images is None) == (pixels is None):
        raise ServingError("grpc_request: pass either images (encoded bytes) or pixels")
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model_name
    if version is not None:
        req.model_spec.version.value = int(version)
    elif version_label:
        req.model_spec.version_label = version_label
    if images is not None:
        req.model_spec.signature_name = signature_name or "serving_default"
        blobs = [bytes(b) for b in images]
        req.inputs[BYTES_INPUT].CopyFrom(tf.make_tensor_proto(blobs, dtype=tf.string,
                                                              shape=[len(blobs)]))
    else:
        req.model_spec.signature_name = signature_name or "predict_pixels"
        px = np.asarray(pixels, np.float32)
        req.inputs[PIXELS_INPUT].CopyFrom(tf.make_tensor_proto(px, dtype=tf.float32,
                                                               shape=list(px.shape)))
    return req


def parse_grpc_response(resp) -> dict[str, np.ndarray]:
    out = {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}
    if "label" in out:
        out["label"] = np.array([s.decode() if isinstance(s, bytes) else s
                                 for s in out["label"]], dtype=object)
    return out


# ----------------------------------------------------------------------------- client
_URL_RE = re.compile(r"^/(?:v1/models/)?(?P<name>[^/:]+)"
                     r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?/?$")


def parse_server_url(url: str) -> dict:
    """``http://host:8501/v1/models/NAME[/versions/N|/labels/L]`` or
    ``grpc://host:8500/NAME[/versions/N|/labels/L]`` -> its parts."""
    u = urlparse(url)
    if u.scheme not in ("http", "https", "grpc"):
        raise ServingError(f"--server {url}: use http(s)://HOST:8501/v1/models/NAME (REST) "
                           "or grpc://HOST:8500/NAME (gRPC)")
    m = _URL_RE.match(u.path or "")
    if not u.netloc or not m:
        raise ServingError(f"--server {url}: the URL must name the model: "
                           "http(s)://HOST:8501/v1/models/NAME or grpc://HOST:8500/NAME, e.g. "
                           "http://localhost:8501/v1/models/brain_tumor or "
                           "grpc://localhost:8500/brain_tumor[/labels/stable]")
    return {"protocol": "grpc" if u.scheme == "grpc" else "rest", "scheme": u.scheme,
            "host": u.netloc, "name": m["name"],
            "version": int(m["version"]) if m["version"] else None, "label": m["label"]}


class ServingClient:
    """Send files to a TF Serving model and get the named outputs back.

    PNG/JPEG bytes go to ``serving_default``; DICOM (or any file when ``info`` is given
    and ``pixels=True``) is decoded here with the run's options and sent to
    ``predict_pixels``.  ``info`` is a :class:`kmedtl.export.predictors.ModelInfo`
    (needed for DICOM; read it with ``find_metadata(export_dir)``).
    """

    def __init__(self, url: str, info=None, timeout: float = 30.0):
        self.url = url
        self.parts = parse_server_url(url)
        self.info = info
        self.timeout = timeout

    @property
    def rest_url(self) -> str:
        p = self.parts
        path = f"/v1/models/{p['name']}"
        if p["version"] is not None:
            path += f"/versions/{p['version']}"
        elif p["label"]:
            path += f"/labels/{p['label']}"
        return f"{p['scheme']}://{p['host']}{path}:predict"

    def _rest(self, body: dict) -> dict[str, np.ndarray]:
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.rest_url, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                answer = json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:1000]
            raise ServingError(f"{self.rest_url}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServingError(f"{self.rest_url}: cannot reach the server ({exc}); is TF "
                               "Serving running (serving/docker-compose.yml)?") from None
        return parse_rest_response(answer)

    def _grpc(self, request) -> dict[str, np.ndarray]:
        # lazy: grpcio comes with the export extra (pip install 'kmedtl[export]')
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc  # lazy: as above

        with grpc.insecure_channel(self.parts["host"]) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            try:
                resp = stub.Predict(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                raise ServingError(f"grpc://{self.parts['host']}: {exc.code().name}: "
                                   f"{exc.details()}") from None
        return parse_grpc_response(resp)

    def predict_images(self, images) -> dict[str, np.ndarray]:
        """Encoded PNG/JPEG bytes -> ``serving_default``."""
        p = self.parts
        if p["protocol"] == "rest":
            return self._rest(rest_request(images))
        return self._grpc(grpc_request(p["name"], images, version=p["version"],
                                       version_label=p["label"]))

    def predict_pixels(self, pixels) -> dict[str, np.ndarray]:
        """Preprocessed pixels -> ``predict_pixels``."""
        p = self.parts
        if p["protocol"] == "rest":
            return self._rest(rest_request(pixels=pixels))
        return self._grpc(grpc_request(p["name"], pixels=pixels, version=p["version"],
                                       version_label=p["label"]))

    def predict_files(self, files) -> dict[str, np.ndarray]:
        """PNG/JPEG as bytes, DICOM as pixels (one request per kind), in file order."""
        blobs = [Path(f).read_bytes() for f in files]
        raster = [i for i, b in enumerate(blobs) if is_raster(b)]
        other = [i for i, b in enumerate(blobs) if not is_raster(b)]
        parts = []
        if raster:
            parts.append((raster, self.predict_images([blobs[i] for i in raster])))
        if other:
            if self.info is None:
                raise ServingError(
                    f"{files[other[0]]}: not PNG/JPEG, so it is decoded client-side (DICOM) "
                    "and needs the model's preprocessing options: pass --metadata "
                    "EXPORT_DIR (its export.json) or the run folder")
            px = load_pixels([files[i] for i in other], self.info.options,
                             self.info.normalization)
            parts.append((other, self.predict_pixels(px)))
        return merge_in_order(parts, len(files))


def merge_in_order(parts, n: int) -> dict[str, np.ndarray]:
    """Outputs of several requests (``[(indices, outputs)]``) back in file order."""
    if len(parts) == 1:
        return parts[0][1]
    out = {}
    for idx, res in parts:
        for k, v in res.items():
            if k not in out:
                out[k] = np.empty((n, *np.asarray(v).shape[1:]), dtype=np.asarray(v).dtype)
            out[k][idx] = v
    return out
