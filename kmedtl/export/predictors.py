"""One interface over every format: ``.keras``, SavedModel folder, ``.tflite``, ``.onnx``.

:func:`load_predictor` returns a :class:`Predictor` whose :meth:`~Predictor.predict_pixels`
gives the same named outputs for every format (``leaf``, ``calibrated``, ``level_<k>``,
``node_<parent>``, ``label``, ``label_index``, ``confidence``) and whose
:meth:`~Predictor.predict_files` reads PNG/JPEG/DICOM files with the run's preprocessing.
The label tree, image options, normalisation and temperature come from the export's
metadata (``kmedtl.json`` in the SavedModel's ``assets.extra/``, or ``export.json`` next
to/above a ``.tflite``/``.onnx`` file) or, for ``.keras``, from the run folder's
``config.yaml`` and ``calibration.json``.

Example::

    >>> p = load_predictor("runs/demo/export/tflite/model_int8.tflite")  # doctest: +SKIP
    >>> p.predict_files(["scan.dcm", "slice.jpg"])["label"]              # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmedtl.export.errors import ExportError
from kmedtl.export.model import postprocess, raw_outputs

METADATA_FILE = "kmedtl.json"
EXPORT_FILE = "export.json"


@dataclass
class ModelInfo:
    """How to feed and name a model: the metadata every exported format carries."""

    hierarchy: object
    options: object
    normalization: str = "unit"
    temperature: float = 1.0
    name: str = "model"

    def to_dict(self) -> dict:
        from dataclasses import asdict

        opts = asdict(self.options)
        opts.pop("extra", None)
        return {"name": self.name, "hierarchy": self.hierarchy.to_config(),
                "leaves": list(self.hierarchy.leaves), "image": opts,
                "input_shape": list(self.options.shape), "normalization": self.normalization,
                "temperature": self.temperature}

    @classmethod
    def from_dict(cls, d: dict) -> ModelInfo:
        from kmedtl.data.options import ImageOptions
        from kmedtl.hierarchy import Hierarchy

        img = dict(d["image"])
        for key in ("size", "percentiles"):
            if key in img:
                img[key] = tuple(img[key])
        if isinstance(img.get("window"), list):
            img["window"] = tuple(img["window"])
        return cls(Hierarchy(d["hierarchy"]), ImageOptions(**img), d.get("normalization", "unit"),
                   float(d.get("temperature") or 1.0), d.get("name", "model"))


def find_metadata(path) -> ModelInfo:
    """The :class:`ModelInfo` for an exported model file or folder (or a ``.keras``)."""
    return _find_metadata(path)[0]


def _find_metadata(path):
    """``(ModelInfo, RunFolder or None)``: the run folder when the metadata came from the
    ``.keras`` file's run folder (its model is then loaded at most once)."""
    path = Path(path)
    candidates = []
    if path.is_dir():
        candidates.append(path / "assets.extra" / METADATA_FILE)
    for parent in list(path.parents)[:3]:
        candidates.append(parent / EXPORT_FILE)
    for c in candidates:
        if c.is_file():
            d = json.loads(c.read_text())
            return ModelInfo.from_dict(d.get("model", d)), None
    folder = _keras_run_folder(path)
    if folder is not None:
        return keras_model_info(folder), folder
    raise ExportError(f"{path}: no kmedtl metadata found (looked for "
                      f"{', '.join(str(c) for c in candidates)}); predict on a model written "
                      "by kmedtl export, or on model.keras inside its run folder")


def _keras_run_folder(path):
    """The :class:`~kmedtl.run_folder.RunFolder` a ``.keras`` file sits in (None if not)."""
    from kmedtl.run_folder import RunFolder

    path = Path(path)
    if path.suffix != ".keras":
        return None
    folder = RunFolder(path.parent, error=ExportError, model=path)
    return folder if folder.has_config else None


def keras_model_info(folder) -> ModelInfo:
    """:class:`ModelInfo` of a run folder's Keras model: the folder's label tree
    (:attr:`~kmedtl.run_folder.RunFolder.hierarchy`), image options, temperature and name;
    normalisation ``"unit"`` (kmedtl models normalise inside the graph)."""
    h = folder.hierarchy
    if h is None:
        raise ExportError(f"{folder.path}: no label tree in the model, config.yaml, data or "
                          "audit.json")
    return ModelInfo(h, folder.image_options, "unit", folder.temperature, folder.config.name)


class Predictor:
    """Base class: subclasses implement :meth:`raw` (pixels -> raw outputs)."""

    kind = "?"

    def __init__(self, path, info: ModelInfo):
        self.path = Path(path)
        self.info = info

    def raw(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def predict_pixels(self, pixels) -> dict[str, np.ndarray]:
        """Named outputs for preprocessed pixels (float32 [N, H, W, C])."""
        pixels = np.asarray(pixels, np.float32)
        shape = tuple(self.info.options.shape)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != shape:
            want = ", ".join(map(str, shape))
            raise ExportError(f"{self.path}: pixels must have shape [N, {want}], got "
                              f"{list(pixels.shape)}")
        return postprocess(self.raw(pixels), self.info.hierarchy, self.info.temperature)

    def load_pixels(self, files) -> np.ndarray:
        """Read files (PNG/JPEG/DICOM) with the run's preprocessing -> model pixels."""
        from kmedtl.serving.client import load_pixels

        return load_pixels(files, self.info.options, self.info.normalization)

    def predict_files(self, files) -> dict[str, np.ndarray]:
        return self.predict_pixels(self.load_pixels(files))


class KerasPredictor(Predictor):
    kind = "keras"

    def __init__(self, path, info, model=None):
        super().__init__(path, info)
        from kmedtl.run_folder import load_model

        self.model = model if model is not None else load_model(path, ExportError)

    def raw(self, pixels):  # Keras' compiled predict step (no eager per-call overhead)
        return raw_outputs(self.model.predict_on_batch(pixels))


class SavedModelPredictor(Predictor):
    """Calls the ``predict_pixels`` signature (and ``serving_default`` for encoded bytes)."""

    kind = "savedmodel"

    def __init__(self, path, info):
        super().__init__(path, info)
        import tensorflow as tf

        self.module = tf.saved_model.load(str(path))
        if "predict_pixels" not in self.module.signatures:
            raise ExportError(f"{path}: the SavedModel has no 'predict_pixels' signature "
                              f"(has {list(self.module.signatures)}); re-export it")

    def _named(self, out) -> dict[str, np.ndarray]:
        res = {k: v.numpy() for k, v in out.items()}
        res["label"] = np.array([s.decode() for s in res["label"]], dtype=object)
        return res

    def raw(self, pixels):
        out = self.predict_pixels(pixels)
        h = self.info.hierarchy
        raw = {"leaf": out["leaf"]}
        raw.update({h.node_output_name(p): out[h.exported_node_name(p)] for p in h.parents
                    if h.exported_node_name(p) in out})
        return raw

    def predict_pixels(self, pixels):
        import tensorflow as tf

        fn = self.module.signatures["predict_pixels"]
        return self._named(fn(pixels=tf.constant(np.asarray(pixels, np.float32))))

    def predict_bytes(self, blobs) -> dict[str, np.ndarray]:
        """Encoded PNG/JPEG bytes through ``serving_default`` (in-graph preprocessing)."""
        import tensorflow as tf

        fn = self.module.signatures["serving_default"]
        return self._named(fn(image_bytes=tf.constant(list(blobs), tf.string)))


class TFLitePredictor(Predictor):
    kind = "tflite"

    def __init__(self, path, info, num_threads: int | None = None):
        super().__init__(path, info)
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        sigs = self.interpreter.get_signature_list()
        self.signature = "serving_default" if "serving_default" in sigs else next(iter(sigs))
        self.runner = self.interpreter.get_signature_runner(self.signature)
        self.input_name = sigs[self.signature]["inputs"][0]

    def raw(self, pixels):
        out = self.runner(**{self.input_name: np.asarray(pixels, np.float32)})
        return {k: np.asarray(v, np.float32) for k, v in out.items()}


class OnnxPredictor(Predictor):
    kind = "onnx"

    def __init__(self, path, info, num_threads: int | None = None):
        super().__init__(path, info)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def raw(self, pixels):
        outs = self.session.run(None, {self.input_name: np.asarray(pixels, np.float32)})
        return {n.split(":")[0]: np.asarray(v, np.float32) for n, v in zip(self.output_names, outs)}


def load_predictor(path, info: ModelInfo | None = None, **kwargs) -> Predictor:
    """A :class:`Predictor` for ``path`` (SavedModel folder, ``.tflite``, ``.onnx``,
    ``.keras``); ``info`` defaults to :func:`find_metadata`."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: model not found")
    folder = None
    if info is None:
        info, folder = _find_metadata(path)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ExportError(f"{path}: a folder but not a SavedModel (no saved_model.pb)")
        return SavedModelPredictor(path, info)
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        return TFLitePredictor(path, info, **kwargs)
    if suffix == ".onnx":
        return OnnxPredictor(path, info, **kwargs)
    if suffix == ".keras":  # a run folder's model is loaded once (metadata and predictions)
        return KerasPredictor(path, info, model=folder.model if folder is not None else None)
    raise ExportError(f"{path}: unknown model format {suffix!r}; expected a SavedModel folder, "
                      ".tflite, .onnx or .keras")
