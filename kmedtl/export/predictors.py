"""One interface over every format: ``.keras``, SavedModel folder, ``.tflite``, ``.onnx``.

:func:`load_predictor` returns a :class:`Predictor` whose :meth:`~Predictor.predict_pixels`
gives the same named outputs for every format (``leaf``, ``calibrated``, ``level_<k>``,
``node_<parent>``, ``label``, ``label_index``, ``confidence``) and whose
:meth:`~Predictor.predict_files` reads PNG/JPEG/DICOM files with the run's preprocessing.
The label tree, image options, normalisation and temperature come from the export's
metadata (``kmedtl.json`` in the SavedModel's ``assets.extra/``, or ``export.json`` next
to/above a ``.tflite``/``.onnx`` file) or, for ``.keras``, from the run folder's
``config.yaml`` and ``calibration.json``.

A multi-input model (``train.model: multi_input``; ``ModelInfo.inputs``, e.g.
``["t1", "t2"]``) takes its inputs by name in every format: ``predict_pixels({"t1": x1,
"t2": x2})``, ``predict_files({"t1": files1, "t2": files2})`` (the i-th files of every input
are one case) and, for a SavedModel, ``predict_bytes({"t1": blobs1, "t2": blobs2})``.

Example::

    >>> p = load_predictor("runs/demo/export/tflite/model_int8.tflite")  # doctest: +SKIP
    >>> p.predict_files(["scan.dcm", "slice.jpg"])["label"]              # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from kmedtl._quiet import native_output_filtered
from kmedtl.data.options import ImageOptions
from kmedtl.export.errors import ExportError
from kmedtl.export.model import postprocess, raw_outputs
from kmedtl.hierarchy import Hierarchy
from kmedtl.run_folder import RunFolder, load_model
from kmedtl.serving.client import load_pixels

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
    #: the named inputs of a multi-input model, one per image type (None: one image)
    inputs: tuple | None = None

    def to_dict(self) -> dict:
        opts = asdict(self.options)
        opts.pop("extra", None)
        out = {"name": self.name, "hierarchy": self.hierarchy.to_config(),
               "leaves": list(self.hierarchy.leaves), "image": opts,
               "input_shape": list(self.options.shape), "normalization": self.normalization,
               "temperature": self.temperature}
        if self.inputs:
            out["inputs"] = list(self.inputs)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ModelInfo:
        img = dict(d["image"])
        for key in ("size", "percentiles"):
            if key in img:
                img[key] = tuple(img[key])
        if isinstance(img.get("window"), list):
            img["window"] = tuple(img["window"])
        inputs = d.get("inputs")
        return cls(Hierarchy(d["hierarchy"]), ImageOptions(**img), d.get("normalization", "unit"),
                   float(d.get("temperature") or 1.0), d.get("name", "model"),
                   tuple(inputs) if inputs else None)


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
    names = folder.input_names
    return ModelInfo(h, folder.image_options, "unit", folder.temperature, folder.config.name,
                     tuple(names) if names else None)


class Predictor:
    """Base class: subclasses implement :meth:`raw` (pixels -> raw outputs)."""

    kind = "?"

    def __init__(self, path, info: ModelInfo):
        self.path = Path(path)
        self.info = info

    def raw(self, pixels) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @property
    def inputs(self) -> list[str] | None:
        """The named inputs of a multi-input model (``None``: one image)."""
        return list(self.info.inputs) if self.info.inputs else None

    def check_pixels(self, pixels):
        """``pixels`` as float32 arrays of the model's input shape: one array, or for a
        multi-input model a dict with one array per input (the same N each)."""
        shape = tuple(self.info.options.shape)
        want = ", ".join(map(str, shape))
        names = self.inputs
        if names is None:
            if isinstance(pixels, dict):
                raise ExportError(f"{self.path}: the model takes one image input; pass an "
                                  f"array [N, {want}], not a dict {sorted(pixels)}")
            pixels = np.asarray(pixels, np.float32)
            if pixels.ndim != 4 or tuple(pixels.shape[1:]) != shape:
                raise ExportError(f"{self.path}: pixels must have shape [N, {want}], got "
                                  f"{list(pixels.shape)}")
            return pixels
        if not isinstance(pixels, dict) or set(pixels) != set(names):
            got = sorted(pixels) if isinstance(pixels, dict) else "one array"
            raise ExportError(f"{self.path}: the model takes one input per image type "
                              f"{names}; pass a dict {{name: pixels [N, {want}]}} (got {got})")
        out = {}
        for n in names:
            a = np.asarray(pixels[n], np.float32)
            if a.ndim != 4 or tuple(a.shape[1:]) != shape:
                raise ExportError(f"{self.path}: input {n!r} must have shape [N, {want}], got "
                                  f"{list(a.shape)}")
            out[n] = a
        sizes = {n: len(a) for n, a in out.items()}
        if len(set(sizes.values())) != 1:
            raise ExportError(f"{self.path}: every input needs one image per case; got "
                              f"batch sizes {sizes}")
        return out

    def predict_pixels(self, pixels) -> dict[str, np.ndarray]:
        """Named outputs for preprocessed pixels (float32 [N, H, W, C]; a multi-input
        model: ``{input name: pixels}``)."""
        pixels = self.check_pixels(pixels)
        return postprocess(self.raw(pixels), self.info.hierarchy, self.info.temperature)

    def load_pixels(self, files):
        """Read files (PNG/JPEG/DICOM) with the run's preprocessing -> model pixels (a
        multi-input model: ``{input name: files}`` -> ``{input name: pixels}``)."""
        names = self.inputs
        if names is None:
            if isinstance(files, dict):
                raise ExportError(f"{self.path}: the model takes one image input; pass a list "
                                  f"of files, not a dict {sorted(files)}")
            return load_pixels(files, self.info.options, self.info.normalization)
        if not isinstance(files, dict) or set(files) != set(names):
            got = sorted(files) if isinstance(files, dict) else "a list of files"
            raise ExportError(f"{self.path}: the model takes one image per image type "
                              f"{names} and case; pass {{name: [files]}} (got {got}), or on "
                              f"the command line one NAME=FILE,... argument per case, e.g. "
                              f"{','.join(f'{n}=case1_{n}.png' for n in names)}")
        return {n: load_pixels(files[n], self.info.options, self.info.normalization)
                for n in names}

    def predict_files(self, files) -> dict[str, np.ndarray]:
        return self.predict_pixels(self.load_pixels(files))


class KerasPredictor(Predictor):
    kind = "keras"

    def __init__(self, path, info, model=None):
        super().__init__(path, info)
        self.model = model if model is not None else load_model(path, ExportError)

    def raw(self, pixels):  # Keras' compiled predict step (no eager per-call overhead)
        return raw_outputs(self.model.predict_on_batch(pixels))


class SavedModelPredictor(Predictor):
    """Calls the ``predict_pixels`` signature (and ``serving_default`` for encoded bytes)."""

    kind = "savedmodel"

    def __init__(self, path, info):
        super().__init__(path, info)
        self.module = tf.saved_model.load(str(path))
        if "predict_pixels" not in self.module.signatures:
            raise ExportError(f"{path}: the SavedModel has no 'predict_pixels' signature "
                              f"(has {list(self.module.signatures)}); re-export it")

    def _named(self, out) -> dict[str, np.ndarray]:
        res = {k: v.numpy() for k, v in out.items()}
        res["label"] = np.array([s.decode() for s in res["label"]], dtype=object)
        return res

    def raw(self, pixels):
        out = self._signature_pixels(pixels)
        h = self.info.hierarchy
        raw = {"leaf": out["leaf"]}
        raw.update({h.node_output_name(p): out[h.exported_node_name(p)] for p in h.parents
                    if h.exported_node_name(p) in out})
        return raw

    def predict_pixels(self, pixels):
        return self._signature_pixels(self.check_pixels(pixels))

    def _signature_pixels(self, pixels):
        fn = self.module.signatures["predict_pixels"]
        if isinstance(pixels, dict):
            return self._named(fn(**{n: tf.constant(np.asarray(v, np.float32))
                                     for n, v in pixels.items()}))
        return self._named(fn(pixels=tf.constant(np.asarray(pixels, np.float32))))

    def predict_bytes(self, blobs) -> dict[str, np.ndarray]:
        """Encoded PNG/JPEG bytes through ``serving_default`` (in-graph preprocessing); a
        multi-input model takes ``{input name: [bytes, ...]}``."""
        fn = self.module.signatures["serving_default"]
        names = self.inputs
        if names is not None:
            if not isinstance(blobs, dict) or set(blobs) != set(names):
                raise ExportError(f"{self.path}: serving_default takes one input per image "
                                  f"type {names}: pass {{name: [encoded PNG/JPEG bytes]}}")
            return self._named(fn(**{n: tf.constant(list(blobs[n]), tf.string)
                                     for n in names}))
        return self._named(fn(image_bytes=tf.constant(list(blobs), tf.string)))


class TFLitePredictor(Predictor):
    kind = "tflite"

    def __init__(self, path, info, num_threads: int | None = None):
        super().__init__(path, info)
        from ai_edge_litert.interpreter import Interpreter  # lazy: LiteRT, an optional extra

        # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate" from C++ when it
        # first allocates: done here, with that line filtered (kmedtl._quiet)
        with native_output_filtered():
            self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
            self.interpreter.allocate_tensors()
        sigs = self.interpreter.get_signature_list()
        self.signature = "serving_default" if "serving_default" in sigs else next(iter(sigs))
        self.runner = self.interpreter.get_signature_runner(self.signature)
        self.input_names = list(sigs[self.signature]["inputs"])
        self.input_name = self.input_names[0]
        _check_named(self, self.input_names)

    def raw(self, pixels):
        if isinstance(pixels, dict):
            out = self.runner(**{n: np.asarray(v, np.float32) for n, v in pixels.items()})
            return {k: np.asarray(v, np.float32) for k, v in out.items()}
        out = self.runner(**{self.input_name: np.asarray(pixels, np.float32)})
        return {k: np.asarray(v, np.float32) for k, v in out.items()}


class OnnxPredictor(Predictor):
    kind = "onnx"

    def __init__(self, path, info, num_threads: int | None = None):
        super().__init__(path, info)
        import onnxruntime as ort  # lazy: ONNX Runtime, an optional extra

        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        # graph input name -> the model's input name ("t1:0" -> "t1")
        self.feeds = {i.name.split(":")[0]: i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        _check_named(self, list(self.feeds))

    def raw(self, pixels):
        if isinstance(pixels, dict):
            feed = {self.feeds[n]: np.asarray(v, np.float32) for n, v in pixels.items()}
        else:
            feed = {self.input_name: np.asarray(pixels, np.float32)}
        outs = self.session.run(None, feed)
        return {n.split(":")[0]: np.asarray(v, np.float32) for n, v in zip(self.output_names, outs)}


def _check_named(predictor: Predictor, graph_inputs: list[str]) -> None:
    """A multi-input model file must take the metadata's named inputs (and a single-input
    one, one input)."""
    names = predictor.inputs
    if names is None:
        if len(graph_inputs) != 1:
            raise ExportError(f"{predictor.path}: the model file has {len(graph_inputs)} "
                              f"inputs {graph_inputs} but its metadata describes a one-image "
                              "model; re-export it")
        return
    if set(graph_inputs) != set(names):
        raise ExportError(f"{predictor.path}: the model file's inputs {graph_inputs} are not "
                          f"the metadata's image types {names}; re-export it")


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
