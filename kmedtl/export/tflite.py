"""TFLite variants with ``tf.lite.TFLiteConverter``, run with the LiteRT interpreter.

Variants (:data:`VARIANTS`):

- ``float32``: no optimisation;
- ``float16``: float16 weights (``Optimize.DEFAULT`` + ``supported_types=[float16]``);
- ``dynamic_int8``: dynamic-range quantisation (int8 weights, float activations);
- ``int8``: full-integer quantisation (``TFLITE_BUILTINS_INT8``) calibrated on
  representative images from the run's *training* split; input and output stay float32
  (the converter adds quantise/dequantise at the edges), so every variant takes the same
  pixels.

Each file takes ``pixels`` (float32 [N, H, W, C], preprocessed as in training; a
multi-input model: one such input per image type, named after it) and returns
the model's raw outputs (``leaf`` and one per head); :mod:`kmedtl.export.predictors` adds
the named outputs (levels, label, calibrated confidence).

Example::

    >>> paths = convert_all(ctx, "export/tflite", representative=x_train)  # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from kmedtl._quiet import native_output_filtered
from kmedtl.export.errors import ExportError
from kmedtl.export.savedmodel import write_core_savedmodel
from kmedtl.ownership import owned_tag, remove_stale

VARIANTS = ("float32", "float16", "dynamic_int8", "int8")


def _converter(saved_model_dir, variant: str, representative=None):
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    if variant == "float32":
        return conv
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        conv.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if representative is None or len(representative) == 0:
            raise ExportError("tflite int8: full-integer quantisation needs representative "
                              "images from the training split (the run's data could not be "
                              "read); export the other variants with --tflite-variants")
        if isinstance(representative, dict):  # a multi-input model: one entry per input
            named = {k: np.asarray(v, np.float32) for k, v in representative.items()}
            n = min(len(v) for v in named.values())

            def gen():
                for i in range(n):
                    yield {k: v[i:i + 1] for k, v in named.items()}
        else:
            reps = np.asarray(representative, np.float32)

            def gen():
                for i in range(len(reps)):
                    yield [reps[i:i + 1]]

        conv.representative_dataset = gen
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif variant != "dynamic_int8":
        raise ExportError(f"tflite variant {variant!r} is not one of {list(VARIANTS)}")
    return conv


def convert(saved_model_dir, variant: str, out_path, representative=None) -> Path:
    """Convert the core SavedModel (pixels -> raw outputs) to one TFLite variant.  The
    converter's native log lines (``fully_quantize: ...``) are filtered
    (:func:`kmedtl._quiet.native_output_filtered`); its errors arrive as the exception."""
    try:
        with native_output_filtered():
            blob = _converter(saved_model_dir, variant, representative).convert()
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - converter errors are many and deep
        raise ExportError(f"tflite {variant}: conversion failed ({type(exc).__name__}: "
                          f"{str(exc)[:500]})") from exc
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    tmp.replace(out_path)
    return out_path


def convert_all(ctx, out_dir, variants=VARIANTS, representative=None) -> dict[str, Path]:
    """Every requested variant of the run's model into ``out_dir/model_<variant>.tflite``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ExportError(f"tflite_variants: {unknown} not in {list(VARIANTS)}")
    out = {}
    # the converter's input SavedModel, beside out_dir (inside export_run's temporary
    # folder) and named after this process: a kill -9 leaves nothing in /tmp, and the next
    # conversion here removes what an interrupted one left (kmedtl.ownership)
    work = Path(out_dir).parent
    work.mkdir(parents=True, exist_ok=True)
    remove_stale(work, ".kmedtl-core-", legacy=None, what="TFLite conversion folder")
    with tempfile.TemporaryDirectory(prefix=".kmedtl-core-" + owned_tag(), dir=work) as tmp:
        core = write_core_savedmodel(ctx.model, ctx.input_shape, Path(tmp) / "core",
                                     ctx.input_names)
        for v in variants:
            out[v] = convert(core, v, Path(out_dir) / f"model_{v}.tflite",
                             representative if v == "int8" else None)
    return out
