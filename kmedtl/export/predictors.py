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

Untrusted models (issue 21): :func:`load_predictor` checks a SavedModel, TFLite or ONNX
file's ops before it loads it (:mod:`kmedtl.export.trust`; refused:
:class:`~kmedtl.errors.UntrustedModelError`, unless ``trust_model=True``), loads ``.keras``
files in Keras' ``safe_mode``, and checks that the metadata belongs to the model: the
digest it records (``model_sha256``/``formats.*.sha256``), the leaf count against the
model's ``leaf`` output and, for a SavedModel, the leaf order against the names baked into
its graph.  A broken model or mismatched metadata raises
:class:`~kmedtl.errors.ModelFileError` (``kmedtl`` exit 3).

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
from kmedtl.errors import KmedtlError, ModelFileError
from kmedtl.export import trust
from kmedtl.export.errors import ExportError
from kmedtl.export.model import postprocess, raw_outputs
from kmedtl.hierarchy import Hierarchy
from kmedtl.run_folder import RunFolder, leaf_output, load_model
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


def read_metadata(path) -> tuple[ModelInfo, dict]:
    """``(ModelInfo, the JSON document)`` of a ``kmedtl.json`` or ``export.json`` file;
    unreadable or malformed metadata is a :class:`~kmedtl.errors.ModelFileError`."""
    try:
        d = json.loads(Path(path).read_text())
        return ModelInfo.from_dict(d.get("model", d)), d
    except (OSError, ValueError, KeyError, TypeError, AttributeError, KmedtlError) as exc:
        raise ModelFileError(f"{path}: not readable kmedtl model metadata "
                             f"({trust.short_error(exc)}); restore the file written by "
                             "kmedtl export, or re-export the run") from None


def savedmodel_metadata(info: ModelInfo, savedmodel) -> dict:
    """The ``kmedtl.json`` written into a SavedModel's ``assets.extra/``: ``info`` and
    ``model_sha256``, the digest of the SavedModel's files (:func:`trust.model_digest`)
    that :func:`load_predictor` checks."""
    return {**info.to_dict(), "model_sha256": trust.model_digest(savedmodel)}


def _find_metadata(path, trust_model: bool = False):
    """``(ModelInfo, RunFolder or None, JSON document or None, its file or None)``: the
    run folder when the metadata came from the ``.keras`` file's run folder (its model is
    then loaded at most once)."""
    path = Path(path)
    candidates = []
    if path.is_dir():
        candidates.append(path / "assets.extra" / METADATA_FILE)
    for parent in list(path.parents)[:3]:
        candidates.append(parent / EXPORT_FILE)
    for c in candidates:
        if c.is_file():
            info, d = read_metadata(c)
            return info, None, d, c
    folder = _keras_run_folder(path, trust_model)
    if folder is not None:
        return keras_model_info(folder), folder, None, None
    raise ExportError(f"{path}: no kmedtl metadata found (looked for "
                      f"{', '.join(str(c) for c in candidates)}); predict on a model written "
                      "by kmedtl export, or on model.keras inside its run folder")


def _keras_run_folder(path, trust_model: bool = False):
    """The :class:`~kmedtl.run_folder.RunFolder` a ``.keras`` file sits in (None if not);
    ``trust_model`` loads its model outside Keras' ``safe_mode``."""
    path = Path(path)
    if path.suffix != ".keras":
        return None
    folder = RunFolder(path.parent, error=ExportError, model=path)
    if not folder.has_config:
        return None
    if trust_model:
        folder = RunFolder(path.parent, error=ExportError, model=path,
                           loaded_model=load_model(path, ExportError, safe_mode=False))
    return folder


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

    def leaf_count(self) -> int | None:
        """How many leaf probabilities the model file outputs (None: unknown)."""
        return None

    def check_metadata(self, source=None) -> None:
        """:class:`~kmedtl.errors.ModelFileError` when the metadata's label tree does not
        fit the model file's ``leaf`` output (``source``: the metadata file, for the
        message)."""
        leaves = list(self.info.hierarchy.leaves)
        n = self.leaf_count()
        if n is not None and n > 0 and n != len(leaves):
            where = source or "its metadata"
            raise ModelFileError(
                f"{self.path}: the model outputs {n} leaf probabilities but {where} names "
                f"{len(leaves)} leaves ({', '.join(leaves)}): the metadata belongs to another "
                "export; use the metadata written with this model (--metadata), or "
                "re-export the run")

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

    def __init__(self, path, info, model=None, safe_mode: bool = True):
        super().__init__(path, info)
        self.model = model if model is not None else load_model(path, ExportError,
                                                                safe_mode=safe_mode)

    def raw(self, pixels):  # Keras' compiled predict step (no eager per-call overhead)
        return raw_outputs(self.model.predict_on_batch(pixels))

    def leaf_count(self):
        try:
            return int(leaf_output(self.model.output, ExportError).shape[-1])
        except Exception:  # noqa: BLE001 - a model that is not kmedtl's: not checked
            return None


class SavedModelPredictor(Predictor):
    """Calls the ``predict_pixels`` signature (and ``serving_default`` for encoded bytes)."""

    kind = "savedmodel"

    def __init__(self, path, info):
        super().__init__(path, info)
        try:
            self.module = tf.saved_model.load(str(path))
        except Exception as exc:  # noqa: BLE001 - TensorFlow raises many kinds here
            raise ModelFileError(f"{path}: TensorFlow cannot load this SavedModel "
                                 f"({trust.short_error(exc)}); it is damaged or not written "
                                 "by kmedtl export: re-export the run") from None
        if "predict_pixels" not in self.module.signatures:
            raise ModelFileError(f"{path}: the SavedModel has no 'predict_pixels' signature "
                                 f"(has {list(self.module.signatures)}); it was not written "
                                 "by kmedtl export: re-export the run")

    def leaf_count(self):
        leaf = self.module.signatures["predict_pixels"].structured_outputs.get("leaf")
        return None if leaf is None or leaf.shape.rank is None else leaf.shape[-1]

    def check_metadata(self, source=None) -> None:
        super().check_metadata(source)
        leaves = [str(x) for x in self.info.hierarchy.leaves]
        baked = trust.savedmodel_leaves(self.path, leaves)
        if baked is not None and baked != leaves:
            raise ModelFileError(
                f"{self.path}: the leaf order in {source or 'its metadata'} "
                f"({', '.join(leaves)}) is not the model's ({', '.join(baked)}): its labels "
                "and probabilities would be named wrongly; the metadata belongs to another "
                "export: restore the kmedtl.json written with this model, or re-export")

    def _named(self, out) -> dict[str, np.ndarray]:
        res = {k: v.numpy() for k, v in out.items()}
        res["label"] = np.array([s.decode() for s in res["label"]], dtype=object)
        leaves = list(self.info.hierarchy.leaves)
        if "label_index" in res:  # the graph's label must be the metadata's leaf name
            for label, k in zip(res["label"], res["label_index"]):
                if not 0 <= int(k) < len(leaves) or leaves[int(k)] != label:
                    raise ModelFileError(
                        f"{self.path}: the model labels leaf {int(k)} {label!r} but its "
                        f"metadata names the leaves {leaves}: the metadata belongs to another "
                        "export; restore the kmedtl.json written with this model")
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
        try:
            with native_output_filtered():
                self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
                self.interpreter.allocate_tensors()
            sigs = self.interpreter.get_signature_list()
            self.signature = "serving_default" if "serving_default" in sigs else \
                next(iter(sigs))
            self.runner = self.interpreter.get_signature_runner(self.signature)
        except Exception as exc:  # noqa: BLE001 - LiteRT raises ValueError/RuntimeError
            raise ModelFileError(f"{path}: LiteRT cannot load this TFLite model "
                                 f"({trust.short_error(exc)}); it is damaged or not written "
                                 "by kmedtl export: re-export the run") from None
        self.input_names = list(sigs[self.signature]["inputs"])
        self.input_name = self.input_names[0]
        _check_named(self, self.input_names)

    def leaf_count(self):
        leaf = self.runner.get_output_details().get("leaf")
        shape = None if leaf is None else leaf.get("shape_signature", leaf.get("shape"))
        return None if shape is None or len(shape) == 0 else int(shape[-1])

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
        try:
            self.session = ort.InferenceSession(str(path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own kinds
            raise ModelFileError(f"{path}: ONNX Runtime cannot load this model "
                                 f"({trust.short_error(exc)}); it is damaged or not written "
                                 "by kmedtl export: re-export the run") from None
        self.input_name = self.session.get_inputs()[0].name
        # graph input name -> the model's input name ("t1:0" -> "t1")
        self.feeds = {i.name.split(":")[0]: i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        _check_named(self, list(self.feeds))

    def leaf_count(self):
        leaf = next((o for o in self.session.get_outputs() if o.name.split(":")[0] == "leaf"),
                    None)
        n = None if leaf is None or not leaf.shape else leaf.shape[-1]
        return n if isinstance(n, int) else None

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
            raise ModelFileError(f"{predictor.path}: the model file has {len(graph_inputs)} "
                                 f"inputs {graph_inputs} but its metadata describes a "
                                 "one-image model; re-export it")
        return
    if set(graph_inputs) != set(names):
        raise ModelFileError(f"{predictor.path}: the model file's inputs {graph_inputs} are "
                             f"not the metadata's image types {names}; re-export it")


def load_predictor(path, info: ModelInfo | None = None, *, trust_model: bool = False,
                   metadata: dict | None = None, metadata_file=None,
                   **kwargs) -> Predictor:
    """A :class:`Predictor` for ``path`` (SavedModel folder, ``.tflite``, ``.onnx``,
    ``.keras``); ``info`` defaults to :func:`find_metadata`.

    Before loading, a SavedModel/TFLite/ONNX file's ops are checked against the allowlist
    of :mod:`kmedtl.export.trust` (:class:`~kmedtl.errors.UntrustedModelError` when one is
    not allowed) unless ``trust_model`` -- give it only for a model you trust -- or this
    process has just written it (:func:`kmedtl.export.trust.mark_written`); ``.keras``
    files load in Keras' ``safe_mode`` unless ``trust_model``.  The metadata found beside
    the model (or ``metadata``, the JSON document of ``metadata_file``, when ``info`` is
    given) must record the model's digest, and its label tree must fit the model's
    outputs; otherwise, and for a model that cannot be loaded,
    :class:`~kmedtl.errors.ModelFileError`."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: model not found")
    kind = trust.model_kind(path)
    if not kind:
        raise ExportError(f"{path}: unknown model format {path.suffix.lower()!r}; expected a "
                          "SavedModel folder, .tflite, .onnx or .keras")
    if kind == "savedmodel" and not (path / "saved_model.pb").is_file():
        raise ExportError(f"{path}: a folder but not a SavedModel (no saved_model.pb)")
    if not trust_model and not trust.written_here(path):
        trust.check_model(path)  # reads the file as data; loads nothing
    folder = None
    if info is None:
        info, folder, metadata, metadata_file = _find_metadata(path, trust_model)
    if metadata is not None and kind != "keras":
        trust.check_digest(path, metadata, metadata_file)
    if kind == "savedmodel":
        predictor = SavedModelPredictor(path, info)
    elif kind == "tflite":
        predictor = TFLitePredictor(path, info, **kwargs)
    elif kind == "onnx":
        predictor = OnnxPredictor(path, info, **kwargs)
    else:  # a run folder's model is loaded once (metadata and predictions)
        predictor = KerasPredictor(path, info, model=folder.model if folder is not None
                                   else None, safe_mode=not trust_model)
    predictor.check_metadata(metadata_file)
    return predictor
