"""kmedtl.export: SavedModel for TF Serving, TFLite for edge devices, ONNX; parity checks
and a TFX-style versioned push.

- :func:`export_run` -- a run folder -> ``<run>/export/`` (SavedModel with
  ``serving_default`` (PNG/JPEG bytes, training preprocessing in-graph) and
  ``predict_pixels``; TFLite float32/float16/dynamic-int8/int8; ONNX), parity verified;
- :func:`push_run` -- blessing gate + atomic ``saved_models/<name>/<version>/`` with
  ``assets.extra/`` (model card, metrics, blessing, TF Serving warmup requests);
- :func:`load_predictor` -- run any exported format (or ``.keras``) on pixels or files;
- :func:`float32_model` -- rebuild a mixed-precision model in float32.

Importing the package imports TensorFlow and Keras (the export stage needs both); the
optional converters and runtimes (tf2onnx, ONNX Runtime, LiteRT, tensorflow-serving-api:
``kmedtl[export]``) load only when a format needs them.  CLI: ``kmedtl export`` and
``kmedtl predict`` (:func:`kmedtl.export.cli.add_parsers`).

Example::

    >>> from kmedtl.export import export_run, push_run                # doctest: +SKIP
    >>> report = export_run("runs/demo")                              # doctest: +SKIP
    >>> push = push_run("runs/demo", thresholds={"balanced_accuracy": 0.6})  # doctest: +SKIP
    >>> push.pushed, push.version                                     # doctest: +SKIP
"""

from kmedtl.export.errors import ExportError, ParityError, PushError, ServingError
from kmedtl.export.model import float32_model, postprocess
from kmedtl.export.predictors import ModelInfo, Predictor, find_metadata, load_predictor
from kmedtl.export.push import PushReport, push_run, write_warmup
from kmedtl.export.stage import BOUNDS, ExportReport, export_run

__all__ = ["BOUNDS", "ExportError", "ExportReport", "ModelInfo", "ParityError", "Predictor",
           "PushError", "PushReport", "ServingError", "export_run", "find_metadata",
           "float32_model", "load_predictor", "postprocess", "push_run", "write_warmup"]
