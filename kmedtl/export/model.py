"""The trained model, made exportable: float32 rebuild, run context, named outputs.

- :func:`float32_model` rebuilds a (possibly mixed-precision) Keras model in float32 and
  copies the weights: float16 graphs do not convert to TFLite/ONNX cleanly and would not
  match the 1e-4 parity bound.  The rebuild rewrites every ``mixed_*`` dtype policy of the
  serialized config to ``float32`` and deserialises under a float32 global policy, so it
  also works for configs that omit ``dtype`` (Flat/HierarchicalClassifier.get_config).
- :class:`RunContext` is what every exporter needs: the float32 model and a view of
  the run folder.
- :func:`postprocess` turns the model's raw outputs into the named outputs every format
  returns (NumPy); :func:`postprocess_tf` is the same in-graph for the SavedModel.

Output names (see :func:`output_names`): ``leaf`` (N, leaves), ``calibrated`` (leaf
probabilities after temperature scaling), ``level_<k>`` (N, nodes at depth k),
``node_<parent>`` (each head: N, children), ``label`` (predicted leaf name),
``label_index`` and ``confidence`` (calibrated probability of the predicted leaf).

Example::

    >>> import keras, numpy as np
    >>> from kmedtl.hierarchy import Hierarchy
    >>> h = Hierarchy({"normal": None, "tumor": {"glioma": None, "pituitary": None}})
    >>> out = postprocess({"leaf": np.array([[0.2, 0.5, 0.3]])}, h)
    >>> out["label"].tolist(), [round(float(p), 2) for p in out["level_1"][0]]
    (['glioma'], [0.2, 0.8])
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import kmedtl.models  # noqa: F401  (registers kmedtl's classes)
from kmedtl.data.pipeline import PipelineReport, make_dataset
from kmedtl.errors import HierarchyError, KmedtlError
from kmedtl.export.errors import ExportError
from kmedtl.jsonio import read_json as _read_json
from kmedtl.models.precision import model_precision
from kmedtl.run_folder import RunFolder, model_input_names, model_input_shape

_EPS = 1e-12


def _float32_config(obj):
    """Copy of a serialized Keras config with every mixed dtype policy set to float32."""
    if isinstance(obj, dict):
        out = {k: _float32_config(v) for k, v in obj.items()}
        if "DTypePolicy" in str(out.get("class_name", "")) and isinstance(out.get("config"), dict):
            name = str(out["config"].get("name", ""))
            if name.startswith("mixed_") or name in ("float16", "bfloat16"):
                out["config"] = {**out["config"], "name": "float32"}
        for key in ("dtype", "compute_dtype"):
            if isinstance(out.get(key), str) and (out[key].startswith("mixed_")
                                                  or out[key] in ("float16", "bfloat16")):
                out[key] = "float32"
        return out
    if isinstance(obj, list):
        return [_float32_config(v) for v in obj]
    return obj


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _all_layers(layer)


def float32_model(model):
    """A float32 copy of ``model`` with the same weights (works for mixed precision)."""
    config = _float32_config(keras.saving.serialize_keras_object(model))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        clone = keras.saving.deserialize_keras_object(config)
    except Exception as exc:  # noqa: BLE001 - any rebuild failure is an export failure
        raise ExportError(f"model {model.name!r}: cannot rebuild it in float32 from its "
                          f"config ({type(exc).__name__}: {exc}); is it a kmedtl model with "
                          "get_config?") from exc
    finally:
        keras.config.set_dtype_policy(previous)
    try:
        clone.set_weights([np.asarray(w, dtype=np.float32) if np.asarray(w).dtype.kind == "f"
                           else np.asarray(w) for w in model.get_weights()])
    except ValueError as exc:
        raise ExportError(f"model {model.name!r}: the float32 rebuild has other weights than "
                          f"the trained model ({exc})") from exc
    bad = [f"{layer.name} ({layer.compute_dtype})" for layer in _all_layers(clone)
           if getattr(layer, "compute_dtype", "float32") not in ("float32", None)
           and layer.weights]
    if bad:
        raise ExportError(f"model {model.name!r}: layers still not float32 after the rebuild: "
                          f"{bad[:5]}")
    return clone


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def output_names(hierarchy, node_outputs=()) -> list[str]:
    """Names of the outputs every exported format returns (in this order; the names are
    the hierarchy's: :meth:`kmedtl.hierarchy.Hierarchy.exported_output_names`)."""
    try:
        return hierarchy.exported_output_names(node_outputs)
    except HierarchyError as exc:
        raise ExportError(str(exc)) from None


def class_names(hierarchy, node_outputs=()) -> dict[str, list[str]]:
    """Class order of every probability output (written into the export metadata)."""
    return hierarchy.exported_class_names(node_outputs)


def raw_outputs(out) -> dict[str, np.ndarray]:
    """A Keras/exported model's raw outputs as ``{"leaf": ..., "<parent>": ...}``."""
    if isinstance(out, dict):
        return {k: np.asarray(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return {"leaf": np.asarray(out[0])}
    return {"leaf": np.asarray(out)}


def postprocess(raw: dict, hierarchy, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Named outputs from raw model outputs (NumPy, float32 like the exported graphs)."""
    leaf = np.asarray(raw["leaf"], dtype=np.float32)
    z = np.log(np.clip(leaf.astype(np.float64), _EPS, None)) / float(temperature)
    z -= z.max(-1, keepdims=True)
    cal = np.exp(z)
    cal /= cal.sum(-1, keepdims=True)
    out = {"leaf": leaf, "calibrated": cal.astype(np.float32)}
    for k in range(1, hierarchy.depth + 1):
        out[hierarchy.level_name(k)] = hierarchy.level_probabilities(leaf, k)
    for p in hierarchy.parents:
        head = hierarchy.node_output_name(p)
        if head in raw:
            out[hierarchy.exported_node_name(p)] = np.asarray(raw[head], dtype=np.float32)
    idx = leaf.argmax(-1)
    out["label"] = np.array([hierarchy.leaves[i] for i in idx], dtype=object)
    out["label_index"] = idx.astype(np.int64)
    out["confidence"] = out["calibrated"][np.arange(len(idx)), idx]
    return out


def postprocess_tf(raw: dict, hierarchy, temperature: float = 1.0) -> dict:
    """:func:`postprocess` in-graph (TensorFlow ops), for the SavedModel signatures."""
    leaf = tf.cast(raw["leaf"], tf.float32)
    z = tf.math.log(tf.maximum(leaf, _EPS)) / float(temperature)
    cal = tf.nn.softmax(z, axis=-1)
    out = {"leaf": leaf, "calibrated": cal}
    for k in range(1, hierarchy.depth + 1):
        out[hierarchy.level_name(k)] = hierarchy.level_probabilities_tf(leaf, k)
    for p in hierarchy.parents:
        head = hierarchy.node_output_name(p)
        if head in raw:
            out[hierarchy.exported_node_name(p)] = tf.cast(raw[head], tf.float32)
    idx = tf.argmax(leaf, axis=-1, output_type=tf.int64)
    out["label"] = tf.gather(tf.constant(list(hierarchy.leaves)), idx)
    out["label_index"] = idx
    out["confidence"] = tf.gather(cal, idx, axis=1, batch_dims=1)
    return out


@dataclass
class RunContext:
    """What the exporters need from a run (see :func:`load_run`): the float32 rebuild of
    its model, the precision it was trained in, and a read-only view of its
    :class:`~kmedtl.run_folder.RunFolder`.

    ``run_dir``, ``config``, ``hierarchy``, ``options``, ``normalization``,
    ``temperature``, ``calibration``, ``train_metrics`` and ``metrics`` are read through
    ``folder``, which reads and checks each once (``hierarchy`` is the one
    :meth:`~kmedtl.run_folder.RunFolder.check_outputs` checked in :func:`load_run`).
    Any object with those attributes of a RunFolder (``path``, ``image_options`` ...) can
    stand in for it, e.g. in a test.
    """

    model: object  # float32 Keras model
    folder: object  # the kmedtl.run_folder.RunFolder it was read from
    source_precision: str = "float32"

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def config(self):
        return self.folder.config

    @property
    def hierarchy(self):
        return self.folder.hierarchy

    @property
    def options(self):
        """The config's :class:`~kmedtl.data.options.ImageOptions`."""
        return self.folder.image_options

    @property
    def normalization(self) -> str:
        return self.folder.normalization

    @property
    def temperature(self) -> float:
        """The fitted temperature of ``calibration.json`` (1.0 without one)."""
        return self.folder.temperature

    @property
    def calibration(self) -> dict | None:
        return self.folder.calibration

    @property
    def train_metrics(self) -> dict:
        return self.folder.train_metrics

    @property
    def metrics(self) -> dict | None:
        return self.folder.metrics

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def node_outputs(self) -> list[str]:
        """Parent nodes whose head is a model output."""
        names = getattr(self.model, "output_names", None) or []
        return [p for p in self.hierarchy.parents if self.hierarchy.node_output_name(p) in names]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of the model's input (of each input of a
        multi-input model), checked against the image options
        (:func:`kmedtl.run_folder.model_input_shape`)."""
        return model_input_shape(self.model, self.options, error=ExportError,
                                 where=f"{self.run_dir}: model", multi=True)

    @property
    def input_names(self) -> list[str] | None:
        """One input per image type for a multi-input model (``None``: one image); every
        exported format takes inputs of these names."""
        return model_input_names(self.model)


def read_json(path) -> dict | None:
    """A JSON file (``None`` when missing); unreadable JSON is an :class:`ExportError`."""
    return _read_json(path, error=ExportError)


def load_run(run_dir, *, indexed: tuple | None = None) -> RunContext:
    """Read ``config.yaml``, ``model.keras`` (rebuilt in float32) and ``calibration.json``
    through :class:`kmedtl.run_folder.RunFolder`; ``indexed``: the run data's
    ``(index, hierarchy)`` when the caller has built it (:meth:`RunFolder.use_index`)."""
    rf = RunFolder(run_dir, error=ExportError)
    if indexed is not None:
        rf.use_index(indexed)
    rf.ensure_dir("kmedtl train writes runs/<name>/")
    rf.ensure_files(RunFolder.CONFIG, RunFolder.MODEL,
                    hint="export needs a finished training run (kmedtl train CONFIG)")
    rf.config  # noqa: B018  (config.yaml must load and validate)
    trained = rf.model
    ctx = RunContext(model=float32_model(trained), folder=rf,
                     source_precision=model_precision(trained))
    rf.check_outputs()  # one leaf output per leaf of the run's label tree
    # read (and check) now what the exporters read later: a bad file fails here, not
    # half-way through an export
    for attr in ("image_options", "normalization", "temperature", "train_metrics", "metrics"):
        getattr(rf, attr)
    ctx.input_shape  # noqa: B018  (the model's input must match the config's image options)
    if ctx.input_names:  # the configured data must name the model's inputs
        rf.check_inputs()
    return ctx


def split_pixels(ctx: RunContext, part: str = "test", limit: int | None = None,
                 seed: int = 0):
    """``(pixels, leaf indices, paths)`` of the run's ``part`` split (``test``, ``train``,
    ``val``) through kmedtl's own pipeline (unreadable files dropped);
    ``(None, None, None)`` when the data or the split file is missing.  ``limit`` keeps a
    seeded random sample (split files list samples class by class).  For a multi-input
    model ``pixels`` is ``{input name: array}`` and each path ``{input name: file}``."""
    rf = ctx.folder
    if not rf.has_splits:
        return None, None, None
    try:
        samples = rf.split_samples(part)  # of the fold the model was trained on
    except (KmedtlError, OSError) as exc:
        logging.getLogger("kmedtl.export").warning(
            "export: the run's data cannot be read (%s); no %s-set checks", exc, part)
        return None, None, None
    if limit is not None and len(samples) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(samples), limit, replace=False))
        samples = [samples[i] for i in keep]
    if not samples:
        return None, None, None
    report = PipelineReport()
    primary = rf.primary_input
    ds = make_dataset(samples, ctx.hierarchy, ctx.options, batch_size=64, training=False,
                      shuffle=False, targets="leaf", normalization=ctx.normalization,
                      decoder=ctx.config.data.decoder, report=report, primary_input=primary)
    xs, ys = [], []
    for x, y in ds:
        xs.append({k: np.asarray(v, np.float32) for k, v in x.items()} if isinstance(x, dict)
                  else np.asarray(x, np.float32))
        ys.append(np.asarray(y))
    if not xs:
        return None, None, None
    bad = {s.path for s in report.skipped}
    kept = [s for s in samples if s.path not in bad and not any(p in bad for _, p in s.extra)]
    if isinstance(xs[0], dict):
        pixels = {k: np.concatenate([x[k] for x in xs]) for k in xs[0]}
        paths = [{primary: s.path, **dict(s.extra)} for s in kept]
    else:
        pixels = np.concatenate(xs)
        paths = [s.path for s in kept]
    return pixels, np.concatenate(ys).astype(np.int64), paths


def file_size(path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def relpath(path, start) -> str:
    return os.path.relpath(path, start)
