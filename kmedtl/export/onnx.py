"""ONNX through ``tf2onnx.convert.from_function`` (opset configurable), run with
onnxruntime.

The graph takes ``pixels`` (float32 [N, H, W, C], preprocessed as in training; a
multi-input model: one such input per image type, named after it) and returns the model's
raw outputs (``leaf`` and one per head), named as in Keras.

Example::

    >>> write_onnx(ctx, "runs/demo/export/model.onnx", opset=17)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from kmedtl.export.errors import ExportError
from kmedtl.export.savedmodel import core_function

DEFAULT_OPSET = 17


def write_onnx(ctx, out_path, opset: int | None = None) -> Path:
    import tf2onnx  # lazy: tf2onnx is an optional extra (kmedtl[export])

    opset = int(opset or DEFAULT_OPSET)
    core = core_function(ctx.model, ctx.input_shape, ctx.input_names)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    try:
        model_proto, _ = tf2onnx.convert.from_function(
            core, input_signature=list(core.input_signature), opset=opset,
            output_path=str(tmp))
    except Exception as exc:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise ExportError(f"onnx (opset {opset}): tf2onnx failed ({type(exc).__name__}: "
                          f"{str(exc)[:500]}); try another --opset") from exc
    tmp.replace(out_path)
    return out_path
