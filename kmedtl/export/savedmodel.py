"""SavedModel with TF Serving signatures (through ``keras.export.ExportArchive``).

Signatures (inputs -> outputs, names from :func:`kmedtl.export.model.output_names`):

- ``serving_default``: ``image_bytes`` -- ``tf.string [N]``, encoded PNG/JPEG files
  (base64 ``{"b64": ...}`` in TF Serving's REST API); the training preprocessing runs
  in-graph (:mod:`kmedtl.export.preprocess`);
- ``predict_pixels``: ``pixels`` -- ``float32 [N, H, W, C]``, images already preprocessed
  as in training (what :mod:`kmedtl.serving` sends for DICOM).

Both return ``leaf``, ``calibrated``, ``level_<k>``, ``node_<parent>``, ``label``
(string), ``label_index`` and ``confidence``.

A multi-input model (``train.model: multi_input``) takes one named input per image type
in both signatures, named after the image types (:attr:`RunContext.input_names`, e.g.
``t1`` and ``t2``): ``serving_default(t1=<tf.string [N]>, t2=<tf.string [N]>)`` and
``predict_pixels(t1=<float32 [N, H, W, C]>, t2=...)``; the i-th entries of every input are
one case (batches of different sizes are refused).  A request that is not a batch of PNG/JPEG
bytes, pixels of the wrong size, or values outside the normalisation's range fails with
``InvalidArgumentError`` whose message names the input and the fix.

Example::

    >>> sm = tf.saved_model.load("runs/demo/export/savedmodel")       # doctest: +SKIP
    >>> png = open("slice.png", "rb").read()                          # doctest: +SKIP
    >>> sm.signatures["serving_default"](image_bytes=tf.constant([png]))["label"]  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kmedtl.data.pipeline import normalize
from kmedtl.export.model import RunContext, postprocess_tf
from kmedtl.export.preprocess import decode_batch
from kmedtl.ownership import owned_name, remove_stale

SIGNATURES = ("serving_default", "predict_pixels")
BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "pixels"


def pixel_range(normalization: str, channels: int) -> tuple[float, float]:
    """(min, max) a pixel can take after ``normalization`` of [0, 1] images."""
    ends = np.stack([np.asarray(normalize(np.full((1, 1, 1, channels), v, np.float32),
                                          normalization)) for v in (0.0, 1.0)])
    return float(ends.min()), float(ends.max())


def check_pixels(pixels, shape, normalization: str, name: str = PIXELS_INPUT):
    """In-graph guards of ``predict_pixels`` (TF Serving feeds the signature's tensors
    without Python's shape check: spatial size and range are asserted here).  ``name`` is
    the input the messages name."""
    h, w, c = shape
    lo, hi = pixel_range(normalization, c)
    tol = 1e-3 * max(1.0, hi - lo)
    where = (f"{name}: expected float32 images of shape [N, {h}, {w}, {c}] in "
             f"[{lo:g}, {hi:g}] (normalisation {normalization!r})")
    # checked at run time, also where TF Serving feeds the tensor without Python's check:
    # "Shape of tensor pixels [1,48,48,1] is not compatible with expected shape [?,32,32,1]"
    pixels = tf.ensure_shape(pixels, [None, h, w, c],
                             name=f"{name}_must_match_data_image")
    checks = [
        tf.debugging.assert_all_finite(pixels, message=f"{where}; got NaN or inf"),
        tf.debugging.assert_greater_equal(tf.reduce_min(pixels), tf.constant(lo - tol),
                                          message=f"{where}; got values below the range"),
        tf.debugging.assert_less_equal(tf.reduce_max(pixels), tf.constant(hi + tol),
                                       message=f"{where}; got values above the range "
                                       "(0-255 pixels sent to a [0, 1] model?)"),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(pixels)


def same_batch(tensors: dict):
    """In-graph check that every named input holds the same number of cases."""
    names = list(tensors)
    first = tf.shape(tensors[names[0]])[0]
    checks = [tf.debugging.assert_equal(
        tf.shape(tensors[n])[0], first,
        message=f"inputs {names}: every input needs one entry per case; {n!r} and "
                f"{names[0]!r} have different batch sizes") for n in names[1:]]
    with tf.control_dependencies(checks):
        return {n: tf.identity(t) for n, t in tensors.items()}


def _named_function(fn, names):
    """``fn(dict)`` as a function of one positional argument per name (a signature's
    inputs are named after its TensorSpecs)."""
    def wrapped(*args):
        return fn(dict(zip(names, args)))

    return wrapped


def serving_functions(ctx: RunContext):
    """``{signature name: (python function, input signature)}`` for the run's model."""
    model, h, opts = ctx.model, ctx.hierarchy, ctx.options
    norm, temp = ctx.normalization, ctx.temperature
    shape = ctx.input_shape  # the model's input (checked against the image options)
    names = ctx.input_names
    if names:
        def run_multi(pixels: dict):
            out = model(same_batch(pixels), training=False)
            return postprocess_tf(out if isinstance(out, dict) else {"leaf": out}, h, temp)

        def serving_multi(blobs: dict):
            return run_multi({n: decode_batch(b, opts, norm) for n, b in blobs.items()})

        def pixels_multi(pixels: dict):
            return run_multi({n: check_pixels(p, shape, norm, n) for n, p in pixels.items()})

        return {
            "serving_default": (_named_function(serving_multi, names),
                                [tf.TensorSpec([None], tf.string, name=n) for n in names]),
            "predict_pixels": (_named_function(pixels_multi, names),
                               [tf.TensorSpec([None, *shape], tf.float32, name=n)
                                for n in names]),
        }

    def run(pixels):
        out = model(pixels, training=False)
        return postprocess_tf(out if isinstance(out, dict) else {"leaf": out}, h, temp)

    def serving_default(image_bytes):
        return run(decode_batch(image_bytes, opts, norm))

    def predict_pixels(pixels):
        return run(check_pixels(pixels, shape, norm))

    return {
        "serving_default": (serving_default,
                            [tf.TensorSpec([None], tf.string, name=BYTES_INPUT)]),
        "predict_pixels": (predict_pixels,
                           [tf.TensorSpec([None, *shape], tf.float32, name=PIXELS_INPUT)]),
    }


def core_function(model, shape, input_names=None):
    """pixels -> the Keras model's raw outputs (dict): what TFLite and ONNX convert.  A
    multi-input model (``input_names``) takes one pixels input per image type, named after
    it."""
    if input_names:
        specs = [tf.TensorSpec([None, *shape], tf.float32, name=n) for n in input_names]

        def raw(pixels: dict):
            out = model(pixels, training=False)
            return out if isinstance(out, dict) else {"leaf": out}

        return tf.function(_named_function(raw, list(input_names)), input_signature=specs)
    spec = tf.TensorSpec([None, *shape], tf.float32, name=PIXELS_INPUT)

    @tf.function(input_signature=[spec])
    def core(pixels):
        out = model(pixels, training=False)
        return out if isinstance(out, dict) else {"leaf": out}

    return core


def _write_archive(model, endpoints: dict, path: Path):
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, (fn, spec) in endpoints.items():
        archive.add_endpoint(name, fn, input_signature=spec)
    archive.write_out(str(path), verbose=False)


def write_savedmodel(ctx: RunContext, path) -> Path:
    """Write the serving SavedModel to ``path`` (atomically: temp folder + rename; the
    temporary folder is named after this process, and ones that interrupted writes left
    beside ``path`` are removed first: :mod:`kmedtl.ownership`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.tmp-", what="SavedModel temporary folder")
    tmp = path.with_name(owned_name(f".{path.name}.tmp-"))
    try:
        _write_archive(ctx.model, serving_functions(ctx), tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_core_savedmodel(model, shape, path, input_names=None) -> Path:
    """A plain pixels -> raw outputs SavedModel (input to the TFLite converter)."""
    core = core_function(model, shape, input_names)
    _write_archive(model, {"serving_default": (core, list(core.input_signature))}, Path(path))
    return Path(path)
