"""``kmedtl export`` and ``kmedtl predict``.

Wire into the top-level parser with::

    from kmedtl.export.cli import add_parsers as add_export_parsers
    add_export_parsers(sub)

``kmedtl export RUN_DIR [--formats savedmodel,tflite,onnx] [--no-verify] [--push]``
exits 0 when every requested format was written and (with verification, the default)
passed its parity bound, 1 on a parity failure or a push that was not blessed.  A
quantised TFLite variant (dynamic_int8, int8) below its agreement bound is a
``WARNING:`` line (agreement, 95% CI, n, remedy), not a failure, unless
``--quantized-gate fail`` and the CI's upper end is below the bound.
``kmedtl predict MODEL FILES...`` runs a SavedModel folder, ``.tflite``, ``.onnx`` or
``.keras`` on PNG/JPEG/DICOM files; ``kmedtl predict --server URL FILES...`` asks TF
Serving (``http://HOST:8501/v1/models/NAME`` or ``grpc://HOST:8500/NAME``).  Files are
read and predicted in batches of ``--batch-size``; a file that cannot be read gets one
``kmedtl: error: FILE: reason`` line on stderr and the others still run.  Exit code 0 when
every file was predicted, 1 when some could not be, 2 for bad arguments or a refused
(untrusted) model, 3 for a broken model or metadata that does not match it.

Untrusted models (issue 21): a SavedModel, TFLite or ONNX file is checked before it is
loaded (:mod:`kmedtl.export.trust`): an op outside the allowlist of pure compute ops
(``WriteFile``, ``ReadFile``, ``PyFunc``, a Flex or custom op, a custom ONNX domain ...)
stops ``kmedtl predict`` with one line naming the op and the file, exit 2.
``--trust-model`` skips that check (and loads ``.keras`` files outside Keras'
``safe_mode``): the model then runs with your rights and can read and write your files,
so give it only for a model from someone you trust.  The digest and label tree of the
model's ``kmedtl.json``/``export.json`` (or ``--metadata``) are checked whatever the
trust: a mismatch is exit 3.
A multi-input model (``train.model: multi_input``) takes one argument per case naming a
file for each of its inputs: ``kmedtl predict MODEL t1=a_t1.png,t2=a_t2.png
t1=b_t1.png,t2=b_t2.png``.  ``--server`` sends one image per request, so multi-input
models are served by calling their SavedModel signatures with the named inputs directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from kmedtl._text import printable
from kmedtl.data import decode
from kmedtl.data.options import ImageOptions
from kmedtl.errors import KmedtlError, ModelFileError
from kmedtl.export.errors import ServingError
from kmedtl.export.predictors import (
    EXPORT_FILE,
    METADATA_FILE,
    find_metadata,
    load_predictor,
    read_metadata,
)
from kmedtl.export.push import push_run
from kmedtl.export.stage import QUANTIZED_GATES, export_run
from kmedtl.export.trust import short_error
from kmedtl.run_folder import RunFolder
from kmedtl.serving.client import ServingClient, is_raster


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
    p.add_argument("--quantized-gate", choices=QUANTIZED_GATES, default="warn",
                   help="dynamic_int8/int8 below their agreement bound: warn (default), or "
                        "fail when the 95%% CI's upper end is below the bound")
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
                   help="MODEL then FILES, or only FILES with --server; a multi-input model "
                        "takes one NAME=FILE,NAME=FILE argument per case (one file per input)")
    q.add_argument("--server", help="http(s)://HOST:8501/v1/models/NAME[/labels/L] or "
                                    "grpc://HOST:8500/NAME[/versions/N]")
    q.add_argument("--metadata", help="export folder, export.json, SavedModel or run folder "
                                      "giving the preprocessing (needed for DICOM with --server)")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.add_argument("--batch-size", type=int, default=32,
                   help="files decoded and predicted together (32)")
    q.add_argument("--trust-model", action="store_true",
                   help="load the model without checking its ops (and .keras outside Keras' "
                        "safe_mode): a model is a program that then runs with your rights "
                        "and can read and write your files; only for a model you trust")
    q.set_defaults(func=cmd_predict)


def cmd_export(args) -> int:
    report = export_run(args.run_dir, formats=args.formats, out_dir=args.out, verify=args.verify,
                        tflite_variants=args.tflite_variants, opset=args.opset,
                        representative_samples=args.representative_samples,
                        quantized_gate=args.quantized_gate)
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
        for w in report.warnings:
            print(f"WARNING: {w}")
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
    return _metadata_doc(path)[0]


def _metadata_doc(path):
    """``(ModelInfo, JSON document or None, its file or None)`` from ``--metadata``."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        info, doc = read_metadata(p)
        return info, doc, p
    if p.is_dir() and (p / EXPORT_FILE).is_file():
        return _metadata_doc(p / EXPORT_FILE)
    if p.is_dir() and (p / "assets.extra" / METADATA_FILE).is_file():  # a SavedModel
        return _metadata_doc(p / "assets.extra" / METADATA_FILE)
    if p.is_dir() and (RunFolder(p).export_dir / EXPORT_FILE).is_file():
        return _metadata_doc(RunFolder(p).export_dir / EXPORT_FILE)
    return _metadata_legacy(p), None, None


def _metadata_legacy(p):
    if p.is_dir() and RunFolder(p).has_model:  # a run folder (RunFolder's label tree)
        return find_metadata(RunFolder(p).model_path)
    return find_metadata(p)


def cmd_predict(args) -> int:
    if args.server:
        files = args.inputs
        info = _metadata(args.metadata) if args.metadata else None
        if info is not None and info.inputs:
            raise ServingError(
                f"kmedtl predict --server: the model takes one named input per image type "
                f"{list(info.inputs)}; the client sends one image per request, so call the "
                "SavedModel's serving_default (encoded bytes) or predict_pixels signature "
                f"with the inputs {list(info.inputs)} directly, or predict locally: kmedtl "
                "predict MODEL " + ",".join(f"{n}=FILE" for n in info.inputs))
        client = ServingClient(args.server, info=info)
        check, run = (lambda f: _check_for_server(f, info)), client.predict_files
    else:
        if len(args.inputs) < 2:
            raise ServingError("kmedtl predict MODEL FILES...: give a model and at least one "
                               "file (or --server URL FILES...)")
        model, files = args.inputs[0], args.inputs[1:]
        info, doc, source = _metadata_doc(args.metadata) if args.metadata else \
            (None, None, None)
        predictor = load_predictor(model, info, trust_model=args.trust_model, metadata=doc,
                                   metadata_file=source)
        info = predictor.info
        check, run = (lambda f: predictor.load_pixels([f])), None
        if predictor.inputs:  # one NAME=FILE,NAME=FILE argument per case
            check = lambda f: predictor.load_pixels(  # noqa: E731
                {n: [p] for n, p in parse_case(f, predictor.inputs).items()})
    size = max(1, int(args.batch_size))
    rows, failed = [], 0
    for start in range(0, len(files), size):
        batch = files[start:start + size]
        good, pixels, batch_rows = [], [], {}
        for i, f in enumerate(batch):
            try:
                px = check(f)
            except KmedtlError as exc:  # DataError, ServingError for this one file
                failed += 1
                print(f"kmedtl: error: {_one_line(exc, f)}", file=sys.stderr)
                batch_rows[i] = {"file": str(f), "error": _one_line(exc, f),
                                 "kind": getattr(exc, "kind", "error")}
                continue
            good.append(i)
            pixels.append(px)
        if good:
            if run is not None:
                out = run([batch[i] for i in good])
            else:
                out = _run_model(predictor, {n: np.concatenate([p[n] for p in pixels])
                                             for n in pixels[0]}
                                 if isinstance(pixels[0], dict) else np.concatenate(pixels))
            for j, i in enumerate(good):
                batch_rows[i] = {"file": str(batch[i]), **{
                    k: (v[j].tolist() if hasattr(v[j], "tolist") else v[j])
                    for k, v in out.items()}}
        if args.json or info is None:
            rows.extend(batch_rows[i] for i in range(len(batch)))
        elif good:
            print(format_prediction_text([batch[i] for i in good], out, info,
                                         temperature=info.temperature), flush=True)
    if args.json or info is None:
        print(json.dumps(rows, indent=1, default=str))
    if failed:
        print(f"kmedtl: predicted {len(files) - failed} of {len(files)} file(s); {failed} "
              "could not be read (see the error lines above)", file=sys.stderr)
        return 1
    return 0


def _run_model(predictor, pixels):
    """The model on one batch; a model that loads but fails to run is a broken model
    (:class:`~kmedtl.errors.ModelFileError`, exit 3), not a traceback."""
    try:
        return predictor.predict_pixels(pixels)
    except KmedtlError:
        raise
    except Exception as exc:  # noqa: BLE001 - TensorFlow/LiteRT/ORT raise many kinds
        raise ModelFileError(f"{predictor.path}: the model failed to run ({short_error(exc)}); "
                             "it is damaged or does not fit its metadata: re-export the "
                             "run") from None


def parse_case(arg: str, names) -> dict[str, str]:
    """``"t1=a.png,t2=b.png"`` -> ``{"t1": "a.png", "t2": "b.png"}``: one file per input of a
    multi-input model (every input named once)."""
    example = ",".join(f"{n}=FILE" for n in names)
    out: dict[str, str] = {}
    for part in str(arg).split(","):
        name, sep, path = part.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ServingError(f"{arg}: the model takes one image per input {list(names)}; "
                               f"give each case as {example}")
        if name not in names:
            raise ServingError(f"{arg}: {name!r} is not an input of the model; its inputs are "
                               f"{list(names)} (give each case as {example})")
        if name in out:
            raise ServingError(f"{arg}: input {name!r} given twice (give each case as "
                               f"{example})")
        out[name] = path
    missing = [n for n in names if n not in out]
    if missing:
        raise ServingError(f"{arg}: missing input(s) {missing}; give each case as {example}")
    return out


def _one_line(exc, path) -> str:
    text = " ".join(str(exc).split())
    # names print escaped (an ESC/OSC sequence in a file name must not reach the terminal)
    return printable(text if str(path) in text else f"{path}: {text}")


def _check_for_server(path, info):
    """Read one file as the serving client will: PNG/JPEG must decode (TF Serving would
    reject the whole request otherwise), DICOM needs the preprocessing options."""
    data = decode.read_bytes(path)
    if info is None and not is_raster(data):
        raise ServingError(f"{path}: not PNG/JPEG, so it is decoded client-side (DICOM) and "
                           "needs the model's preprocessing options: pass --metadata "
                           "EXPORT_DIR (its export.json) or the run folder")
    options = info.options if info is not None else ImageOptions()
    decode.decode_bytes(data, str(path), options, summary=False)


def format_prediction_text(files, out: dict, info, temperature: float = 1.0) -> str:
    """One block per file that says which numbers are calibrated and which are raw.

    The label is the leaf with the highest raw probability; its *calibrated* probability
    (temperature scaling fitted on validation data) is the confidence.
    """
    h = info.hierarchy
    cal = out.get("calibrated")
    lines = []
    for i, f in enumerate(files):
        k = int(out["label_index"][i]) if "label_index" in out else \
            list(h.leaves).index(str(out["label"][i]))
        raw = float(out["leaf"][i][k])
        head = f"{os.fspath(f)}: {out['label'][i]}"
        if cal is not None:
            head += (f" (calibrated confidence {float(cal[i][k]):.3f}, temperature "
                     f"{float(temperature):.3g}; raw probability {raw:.3f})")
        else:
            head += f" (raw probability {raw:.3f})"
        lines.append(head)
        lines.append("  raw model probabilities:")
        for lv in range(1, h.depth + 1):
            probs = out[h.level_name(lv)][i]
            lines.append(f"    level {lv}: " + ", ".join(
                f"{n} {p:.3f}" for n, p in zip(h.levels[lv - 1], probs)))
        lines.append("    leaf:    " + ", ".join(
            f"{n} {p:.3f}" for n, p in zip(h.leaves, out["leaf"][i])))
        if cal is not None:
            lines.append("  calibrated leaf probabilities: " + ", ".join(
                f"{n} {p:.3f}" for n, p in zip(h.leaves, cal[i])))
    return "\n".join(lines)
