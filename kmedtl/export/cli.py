"""``kmedtl export`` and ``kmedtl predict``.

Wire into the top-level parser with::

    from kmedtl.export.cli import add_parsers as add_export_parsers
    add_export_parsers(sub)

``kmedtl export RUN_DIR [--formats savedmodel,tflite,onnx] [--no-verify] [--push]``
exits 0 when every requested format was written and (with verification, the default)
passed its parity bound, 1 on a parity failure or a push that was not blessed.
``kmedtl predict MODEL FILES...`` runs a SavedModel folder, ``.tflite``, ``.onnx`` or
``.keras`` on PNG/JPEG/DICOM files; ``kmedtl predict --server URL FILES...`` asks TF
Serving (``http://HOST:8501/v1/models/NAME`` or ``grpc://HOST:8500/NAME``).
"""

from __future__ import annotations

import argparse
import json


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _threshold(value: str) -> tuple[str, float]:
    name, _, minimum = value.partition("=")
    try:
        return name.strip(), float(minimum)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--threshold {value!r}: expected METRIC=MINIMUM, e.g. balanced_accuracy=0.6"
        ) from None


def add_parsers(subparsers) -> None:
    """Register ``export`` and ``predict`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "export", help="SavedModel (TF Serving), TFLite and ONNX with parity checks",
        description="Export a run folder's model to <run>/export (SavedModel with "
                    "serving_default/predict_pixels signatures, TFLite float32/float16/"
                    "dynamic_int8/int8, ONNX), check parity against Keras, optionally push "
                    "to saved_models/<name>/<version>/.")
    p.add_argument("run_dir", help="run folder (config.yaml, model.keras, splits.json)")
    p.add_argument("--formats", type=_csv, default=["savedmodel", "tflite", "onnx"],
                   help="comma-separated: savedmodel,tflite,onnx (all)")
    p.add_argument("--out", help="export folder (default <run>/export)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check parity bounds against the Keras model (default on)")
    p.add_argument("--tflite-variants", type=_csv,
                   default=["float32", "float16", "dynamic_int8", "int8"])
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    p.add_argument("--representative-samples", type=int, default=100,
                   help="training images calibrating full-integer int8 (100)")
    p.add_argument("--push", action="store_true",
                   help="then push the SavedModel (blessing gate, see --threshold)")
    p.add_argument("--root", default="saved_models", help="push root (saved_models)")
    p.add_argument("--name", help="served model name (default: the config's name)")
    p.add_argument("--threshold", type=_threshold, action="append", default=[],
                   metavar="METRIC=MIN", help="blessing threshold on metrics.json (repeatable)")
    p.add_argument("--metric", default="balanced_accuracy",
                   help="metric that must not get worse than the pushed version's")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)

    q = subparsers.add_parser(
        "predict", help="predict PNG/JPEG/DICOM files with an exported model or TF Serving",
        description="kmedtl predict MODEL FILES... (SavedModel folder, .tflite, .onnx, "
                    ".keras) or kmedtl predict --server URL FILES...; prints per-level "
                    "probabilities.")
    q.add_argument("inputs", nargs="+", metavar="MODEL_OR_FILE",
                   help="MODEL then FILES, or only FILES with --server")
    q.add_argument("--server", help="http(s)://HOST:8501/v1/models/NAME[/labels/L] or "
                                    "grpc://HOST:8500/NAME[/versions/N]")
    q.add_argument("--metadata", help="export folder, export.json, SavedModel or run folder "
                                      "giving the preprocessing (needed for DICOM with --server)")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(func=cmd_predict)


def cmd_export(args) -> int:
    from kmedtl.export.push import push_run
    from kmedtl.export.run import export_run

    report = export_run(args.run_dir, formats=args.formats, out_dir=args.out, verify=args.verify,
                        tflite_variants=args.tflite_variants, opset=args.opset,
                        representative_samples=args.representative_samples)
    code = 0 if (report.verified or not args.verify) else 1
    doc = report.to_dict()
    if args.push:
        push = push_run(args.run_dir, root=args.root, name=args.name,
                        thresholds=dict(args.threshold) or None, metric=args.metric)
        doc["push"] = push.to_dict()
        code = code or (0 if push.pushed else 1)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"exported {args.run_dir} -> {report.out_dir} ({report.parity_data})")
        print(report.table())
        for f in report.failures:
            print(f"PARITY FAILURE: {f}")
        if args.verify:
            print("verified: " + ("yes" if report.verified else "NO"))
        if args.push:
            p = doc["push"]
            where = f"version {p['model_version']} at {p['path']}" if p["pushed"] else \
                "not pushed"
            print(f"push: {where} ({p['reason']})")
    return code


def _metadata(path):
    from pathlib import Path

    from kmedtl.export.predictors import EXPORT_FILE, ModelInfo, find_metadata

    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        d = json.loads(p.read_text())
        return ModelInfo.from_dict(d.get("model", d))
    if p.is_dir() and (p / EXPORT_FILE).is_file():
        return _metadata(p / EXPORT_FILE)
    if p.is_dir() and (p / "export" / EXPORT_FILE).is_file():
        return _metadata(p / "export" / EXPORT_FILE)
    if p.is_dir() and (p / "model.keras").is_file():
        return find_metadata(p / "model.keras")
    return find_metadata(p)


def cmd_predict(args) -> int:
    from kmedtl.export.errors import ServingError
    from kmedtl.export.predictors import format_predictions, load_predictor

    if args.server:
        from kmedtl.serving.client import ServingClient

        files = args.inputs
        info = _metadata(args.metadata) if args.metadata else None
        out = ServingClient(args.server, info=info).predict_files(files)
    else:
        if len(args.inputs) < 2:
            raise ServingError("kmedtl predict MODEL FILES...: give a model and at least one "
                               "file (or --server URL FILES...)")
        model, files = args.inputs[0], args.inputs[1:]
        info = _metadata(args.metadata) if args.metadata else None
        predictor = load_predictor(model, info)
        info = predictor.info
        out = predictor.predict_files(files)
    if args.json or info is None:
        rows = [{k: (v[i].tolist() if hasattr(v[i], "tolist") else v[i]) for k, v in out.items()}
                for i in range(len(files))]
        print(json.dumps([{"file": f, **r} for f, r in zip(files, rows)], indent=1,
                         default=str))
    else:
        print(format_predictions(files, out, info))
    return 0
