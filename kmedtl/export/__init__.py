"""kmedtl.export: SavedModel for TF Serving, TFLite for edge devices, ONNX; parity checks
and a TFX-style versioned push.

- :func:`export_run` -- a run folder -> ``<run>/export/`` (SavedModel with
  ``serving_default`` (PNG/JPEG bytes, training preprocessing in-graph) and
  ``predict_pixels``; TFLite float32/float16/dynamic-int8/int8; ONNX), parity verified;
- :func:`push_run` -- blessing gate + atomic ``saved_models/<name>/<version>/`` with
  ``assets.extra/`` (model card, metrics, blessing, TF Serving warmup requests);
- :func:`load_predictor` -- run any exported format (or ``.keras``) on pixels or files;
- :func:`float32_model` -- rebuild a mixed-precision model in float32.

TensorFlow is imported on first use. CLI: ``kmedtl export`` and ``kmedtl predict``
(:func:`kmedtl.export.cli.add_parsers`).

Example::

    >>> from kmedtl.export import export_run, push_run                # doctest: +SKIP
    >>> report = export_run("runs/demo")                              # doctest: +SKIP
    >>> push = push_run("runs/demo", thresholds={"balanced_accuracy": 0.6})  # doctest: +SKIP
    >>> push.pushed, push.version                                     # doctest: +SKIP
"""

from kmedtl.export.errors import ExportError, ParityError, PushError, ServingError

_LAZY = {
    "export_run": "kmedtl.export.stage", "ExportReport": "kmedtl.export.stage",
    "BOUNDS": "kmedtl.export.stage",
    "push_run": "kmedtl.export.push", "PushReport": "kmedtl.export.push",
    "write_warmup": "kmedtl.export.push",
    "load_predictor": "kmedtl.export.predictors", "find_metadata": "kmedtl.export.predictors",
    "ModelInfo": "kmedtl.export.predictors", "Predictor": "kmedtl.export.predictors",
    "float32_model": "kmedtl.export.model", "postprocess": "kmedtl.export.model",
}


def __getattr__(name):  # TensorFlow/Keras load only when an exporter is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kmedtl.export' has no attribute {name!r}")


__all__ = ["BOUNDS", "ExportError", "ExportReport", "ModelInfo", "ParityError", "Predictor",
           "PushError", "PushReport", "ServingError", "export_run", "find_metadata",
           "float32_model", "load_predictor", "postprocess", "push_run", "write_warmup"]
