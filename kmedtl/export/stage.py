"""``export_run``: one run folder -> SavedModel, TFLite variants and ONNX, with parity.

Layout written (atomically: a temporary sibling folder renamed into place)::

    <run_dir>/export/
      export.json                 metadata + report (this module's ExportReport.to_dict())
      savedmodel/                 serving_default (PNG/JPEG bytes) and predict_pixels
        assets.extra/kmedtl.json  label tree, image options, normalisation, temperature
      tflite/model_<variant>.tflite
      model.onnx

``export.json``: ``kind`` ``"kmedtl-export"``, ``version`` 1, ``model`` (the
:class:`~kmedtl.export.predictors.ModelInfo`: ``hierarchy``, ``leaves``, ``image``,
``input_shape``, ``normalization``, ``temperature``), ``outputs`` (names),
``class_names`` (class order per probability output), ``signatures``, ``formats``
(per format: ``path``, ``size_bytes``, ``accuracy`` on the run's test split,
``parity`` {``max_abs_diff``, ``agreement``, ``bound``, ``passed``}), ``parity_data``,
``preprocessing`` (``serving_default`` on the test files' bytes vs the training
pipeline), ``verified``, ``failures``, ``source_precision``, ``seconds``.

Parity bounds (:data:`BOUNDS`), against the float32 Keras model on the run's test images
(topped up to :data:`MIN_PARITY_IMAGES` with augmented copies when the split is smaller;
``accuracy`` is on the test images alone):
SavedModel (the same TensorFlow kernels) within 1e-4 max absolute probability difference
(every probability output), TFLite float32 and ONNX (other kernels) within 1e-3 (a
2-epoch EfficientNet-Lite0 at 32 px differed by 4e-5 on its test images and by 2.2e-4 on
noisy augmented copies of them; a broken conversion -- wrong weights or preprocessing --
moves probabilities by 1e-1); TFLite float16 within 5e-2 (float16 weights through the 16
inverted-residual blocks of EfficientNet-Lite0 move probabilities by up to 0.024 on the
main job's test images while every predicted leaf agrees; the small CBR networks stay
within 1e-3); dynamic-range and full int8 agree on the predicted leaf for >= 97% of
images.

Example::

    >>> report = export_run("runs/demo", formats=("savedmodel", "onnx"))   # doctest: +SKIP
    >>> report.verified, report.out_dir                                     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kmedtl.data.decode import read_bytes
from kmedtl.export import onnx as onnx_export
from kmedtl.export import tflite
from kmedtl.export.errors import ExportError
from kmedtl.export.model import (
    class_names,
    file_size,
    load_run,
    output_names,
    split_pixels,
)
from kmedtl.export.predictors import (
    EXPORT_FILE,
    METADATA_FILE,
    KerasPredictor,
    ModelInfo,
    load_predictor,
)
from kmedtl.export.savedmodel import BYTES_INPUT, PIXELS_INPUT, pixel_range, write_savedmodel
from kmedtl.jsonio import json_safe, write_json
from kmedtl.serving.client import is_raster

log = logging.getLogger("kmedtl.export")

FORMATS = ("savedmodel", "tflite", "onnx")
#: format -> ("max_abs", bound) or ("agreement", minimum share of equal predicted leaves)
BOUNDS = {"savedmodel": ("max_abs", 1e-4), "tflite_float32": ("max_abs", 1e-3),
          "onnx": ("max_abs", 1e-3), "tflite_float16": ("max_abs", 5e-2),
          "tflite_dynamic_int8": ("agreement", 0.97), "tflite_int8": ("agreement", 0.97)}
#: Integer-quantised variants, and their second way to pass (see :func:`parity`).
QUANTIZED = ("tflite_dynamic_int8", "tflite_int8")
QUANTIZED_FLOOR = 0.95
MAX_ACCURACY_DROP = 0.01
PARITY_SAMPLES = 256  # random pixels when the run's test data cannot be read
#: Parity is a property of the exported model, not of the test split: it is measured on at
#: least this many images, so that one disagreement moves agreement by <= 0.5 point and
#: cannot flip a verdict on its own (a smaller test split is topped up with augmented copies).
MIN_PARITY_IMAGES = 200


def augmented_copies(x, n: int, lo: float, hi: float, seed: int = 0) -> tuple:
    """``n`` seeded augmented copies of the images ``x`` (cycled): a horizontal and/or
    vertical flip, a brightness shift of up to 5% of the pixel range and Gaussian noise of 1%,
    clipped to ``[lo, hi]``.  Returns ``(copies, source_index)`` so labels can follow.  A
    dict of inputs (a multi-input model) gives a dict: every input of a case gets the same
    flips."""
    if isinstance(x, dict):
        copies = {k: augmented_copies(v, n, lo, hi, seed)[0] for k, v in x.items()}
        return copies, np.arange(n) % n_cases(x)
    rng = np.random.default_rng(seed)
    idx = np.arange(n) % len(x)
    out = x[idx].astype(np.float32, copy=True)
    span = float(hi - lo)
    for i in range(n):
        k = i // len(x)  # the k-th round of copies of the same image flips differently
        if k % 2 == 0:
            out[i] = out[i][:, ::-1]
        if k % 4 >= 2:
            out[i] = out[i][::-1]
        out[i] += rng.uniform(-0.05, 0.05) * span
        out[i] += rng.normal(0.0, 0.01 * span, out[i].shape).astype(np.float32)
    return np.clip(out, lo, hi).astype(np.float32), idx
BATCH = 32


def n_cases(x) -> int:
    """Number of cases in pixels: an array, or a dict of arrays (one per input)."""
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def take(x, index):
    """Rows ``index`` (a slice or an index array) of pixels: an array or a dict of them."""
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


def join(a, b):
    """Pixels ``a`` followed by ``b`` (arrays or dicts of arrays)."""
    if isinstance(a, dict):
        return {k: np.concatenate([a[k], b[k]]) for k in a}
    return np.concatenate([a, b])


@dataclass
class ExportReport:
    """What :func:`export_run` wrote and measured (``to_dict()`` is ``export.json``)."""

    run_dir: Path
    out_dir: Path
    metadata: dict
    formats: dict = field(default_factory=dict)
    verified: bool = False
    verify: bool = True
    failures: list = field(default_factory=list)
    parity_data: str = ""
    preprocessing: dict | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return json_safe({"kind": "kmedtl-export", "version": 1, "run_dir": str(self.run_dir),
                           "out_dir": str(self.out_dir), **self.metadata,
                           "formats": self.formats, "parity_data": self.parity_data,
                           "preprocessing": self.preprocessing, "verify": self.verify,
                           "verified": self.verified, "failures": self.failures,
                           "seconds": round(self.seconds, 2), **self.extra})

    def table(self) -> str:
        """Markdown table: format, size, test accuracy, parity value and bound."""
        rows = ["| format | size (KiB) | test accuracy | parity | bound | ok |",
                "|---|---:|---:|---:|---:|:-:|"]
        for name, f in self.formats.items():
            p = f.get("parity") or {}
            acc = f.get("accuracy")
            value, bound = _parity_value(p), _bound_text(p)
            rows.append(f"| {name} | {f['size_bytes'] / 1024:.1f} | "
                        f"{'-' if acc is None else f'{acc:.3f}'} | "
                        f"{'-' if value is None else f'{value:.3g}'} | {bound} | "
                        f"{'yes' if p.get('passed', True) else 'NO'} |")
        return "\n".join(rows)


def _parity_value(p: dict):
    if not p:
        return None
    return p["max_abs_diff"] if p["kind"] == "max_abs" else p["agreement"]


def _bound_text(p: dict) -> str:
    if not p or p.get("bound") is None:
        return ""
    text = ("<= " if p["kind"] == "max_abs" else ">= ") + f"{p['bound']:g}"
    if p.get("accuracy_drop") is not None:
        text += (f", or >= {QUANTIZED_FLOOR:g} with accuracy within "
                 f"{MAX_ACCURACY_DROP:g} of Keras")
    return text


def _failure(name: str, p: dict) -> str:
    what = "max abs prob diff" if p["kind"] == "max_abs" else "leaf agreement"
    drop = p.get("accuracy_drop")
    extra = "" if drop is None else f" (test accuracy {-drop:+.4f} against Keras)"
    return (f"{name}: {what} {_parity_value(p):.4g}{extra} violates the bound "
            f"{_bound_text(p)} on {p['n']} images")


def predict_batched(predictor, x) -> dict[str, np.ndarray]:
    outs = [predictor.predict_pixels(take(x, slice(i, i + BATCH)))
            for i in range(0, n_cases(x), BATCH)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def prob_keys(out: dict) -> list[str]:
    return [k for k in out if k not in ("label", "label_index", "confidence")]


def parity(ref: dict, got: dict, name: str, y=None) -> dict:
    """Max abs difference over every probability output + predicted-leaf agreement.

    Integer-quantised variants (``QUANTIZED``) flip some near-boundary cases both ways; with
    labelled test images they also pass at agreement >= ``QUANTIZED_FLOOR`` when their test
    accuracy is within ``MAX_ACCURACY_DROP`` of the Keras model's (quantisation that costs
    accuracy, or breaks the model, still fails).
    """
    keys = [k for k in prob_keys(ref) if k in got]
    diff = max(float(np.max(np.abs(np.asarray(ref[k], np.float64) -
                                   np.asarray(got[k], np.float64)))) for k in keys)
    agree = float(np.mean(ref["label_index"] == got["label_index"]))
    kind, bound = BOUNDS.get(name, ("max_abs", None))
    passed = True if bound is None else (diff <= bound if kind == "max_abs" else agree >= bound)
    out = {"max_abs_diff": diff, "agreement": agree, "kind": kind, "bound": bound,
           "n": int(len(ref["label_index"])), "outputs": keys}
    if name in QUANTIZED and y is not None and len(y):
        drop = float(np.mean(ref["label_index"] == y) - np.mean(got["label_index"] == y))
        out["accuracy_drop"] = drop
        passed = passed or (agree >= QUANTIZED_FLOOR and drop <= MAX_ACCURACY_DROP)
    out["passed"] = bool(passed)
    return out


def _swap_in(tmp: Path, final: Path):
    """Replace ``final`` by ``tmp`` with two renames (never a half-written folder)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir, *, formats=FORMATS, out_dir=None, verify: bool = True,
               tflite_variants=("float32", "float16", "dynamic_int8", "int8"),
               opset: int | None = None, representative_samples: int = 100) -> ExportReport:
    """Export a run folder's model (see the module docstring); returns the report.

    ``verify`` checks parity against the Keras model (``report.verified``; failures are
    listed in ``report.failures``, nothing is raised); without it the measurements are
    still recorded but ``verified`` stays False.
    """
    t0 = time.perf_counter()
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"formats: {unknown or '(none)'} not in {list(FORMATS)}")
    ctx = load_run(run_dir)
    run = ctx.run_dir
    out = Path(out_dir) if out_dir else ctx.folder.export_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    inputs = ctx.input_names  # a multi-input model: one named input per image type
    info = ModelInfo(ctx.hierarchy, ctx.options, ctx.normalization, ctx.temperature, ctx.name,
                     tuple(inputs) if inputs else None)
    names = output_names(ctx.hierarchy, ctx.node_outputs)
    h, w, c = ctx.input_shape  # from the model's input, checked against the image options
    byte_inputs, pixel_inputs = (inputs, inputs) if inputs else ([BYTES_INPUT], [PIXELS_INPUT])
    metadata = {
        "model": info.to_dict(), "outputs": names,
        "class_names": class_names(ctx.hierarchy, ctx.node_outputs),
        "signatures": {
            "serving_default": {"inputs": {n: {"dtype": "string", "shape": [-1]}
                                           for n in byte_inputs}},
            "predict_pixels": {"inputs": {n: {"dtype": "float32", "shape": [-1, h, w, c]}
                                          for n in pixel_inputs}}},
        "source_precision": ctx.source_precision,
        "calibration": {"temperature": ctx.temperature,
                        "source": "calibration.json" if ctx.calibration else "none (T=1)"},
    }
    report = ExportReport(run_dir=run, out_dir=out, metadata=metadata, verify=verify)
    try:
        # ---- data: test split for parity/accuracy, training split for int8 calibration
        x, y, paths = split_pixels(ctx, "test")
        if x is None:
            rng = np.random.default_rng(0)
            lo, hi = pixel_range(ctx.normalization, c)
            x = rng.uniform(lo, hi, (PARITY_SAMPLES, h, w, c)).astype(np.float32)
            if inputs:
                x = {n: rng.uniform(lo, hi, (PARITY_SAMPLES, h, w, c)).astype(np.float32)
                     for n in inputs}
            report.parity_data = f"synthetic uniform pixels ({n_cases(x)}); the run's test " \
                                 "split could not be read"
        else:
            report.parity_data = f"test split of the run ({n_cases(x)} images)"
        n_test = n_cases(x)
        if x is not None and n_test < MIN_PARITY_IMAGES:
            lo, hi = pixel_range(ctx.normalization, c)
            extra, src = augmented_copies(x, MIN_PARITY_IMAGES - n_test, lo, hi)
            x = join(x, extra)
            if y is not None:
                y = np.concatenate([np.asarray(y), np.asarray(y)[src]])
            report.parity_data += (f" + {n_cases(extra)} augmented copies of them (flips, "
                                   f"brightness, noise) = {n_cases(x)} images")
        if inputs:
            report.parity_data += f" (cases of {len(inputs)} named inputs {list(inputs)})"
        reps = None
        if "tflite" in formats and "int8" in tflite_variants:
            reps = split_pixels(ctx, "train", limit=int(representative_samples))[0]
        ref = predict_batched(KerasPredictor(ctx.folder.model_path, info, model=ctx.model), x)

        def record(name, path, predictor):
            got = predict_batched(predictor, x)
            entry = {"path": str(Path(path).relative_to(tmp)), "size_bytes": file_size(path),
                     "accuracy": None if y is None else
                     float(np.mean(got["label_index"][:n_test] == y[:n_test])),
                     "parity": parity(ref, got, name, y)}
            report.formats[name] = entry
            log.info("export: %s %.1f KiB, parity %s", name, entry["size_bytes"] / 1024,
                     entry["parity"])

        keras_file = ctx.folder.model_path
        report.formats["keras"] = {
            "path": str(keras_file), "size_bytes": file_size(keras_file),
            "accuracy": None if y is None else
            float(np.mean(ref["label_index"][:n_test] == y[:n_test])),
            "parity": None}
        if "savedmodel" in formats:
            sm = write_savedmodel(ctx, tmp / "savedmodel")
            (sm / "assets.extra").mkdir(exist_ok=True)
            write_json(sm / "assets.extra" / METADATA_FILE, info.to_dict())
            smp = load_predictor(sm, info)
            record("savedmodel", sm, smp)
            if paths:
                report.preprocessing = _bytes_parity(smp, paths[:64], ref, x)
        if "tflite" in formats:
            for v, path in tflite.convert_all(ctx, tmp / "tflite", tflite_variants,
                                              reps).items():
                record(f"tflite_{v}", path, load_predictor(path, info))
        if "onnx" in formats:
            path = onnx_export.write_onnx(ctx, tmp / "model.onnx", opset)
            report.extra["onnx_opset"] = int(opset or onnx_export.DEFAULT_OPSET)
            record("onnx", path, load_predictor(path, info))
        if reps is not None:
            report.extra["int8_representative"] = {"split": "train", "n": int(len(reps))}
        report.failures = [_failure(n, f["parity"]) for n, f in report.formats.items()
                           if f.get("parity") and not f["parity"]["passed"]]
        report.verified = bool(verify and not report.failures)
        report.seconds = time.perf_counter() - t0
        report.out_dir = out
        write_json(tmp / EXPORT_FILE, report.to_dict())
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for f in report.failures:
        log.warning("export: parity: %s", f)
    return report


def _bytes_parity(smp, paths, ref, x) -> dict:
    """``serving_default`` on the test files' encoded bytes vs the Keras model on the
    training pipeline's pixels (checks the in-graph preprocessing end to end).  For a
    multi-input model each path is ``{input name: file}`` (a case is used when every one
    of its files is PNG/JPEG)."""
    def raster(p):
        files = p.values() if isinstance(p, dict) else [p]
        return all(is_raster(read_bytes(f)[:8]) for f in files)

    idx = [i for i, p in enumerate(paths) if raster(p)]
    if not idx:
        return {"n": 0, "note": "no PNG/JPEG test files (DICOM is decoded client-side)"}
    if isinstance(paths[idx[0]], dict):
        names = list(paths[idx[0]])
        blobs = {n: [read_bytes(paths[i][n]) for i in idx] for n in names}
        outs = [smp.predict_bytes({n: b[i:i + BATCH] for n, b in blobs.items()})
                for i in range(0, len(idx), BATCH)]
    else:
        blobs = [read_bytes(paths[i]) for i in idx]
        outs = [smp.predict_bytes(blobs[i:i + BATCH]) for i in range(0, len(blobs), BATCH)]
    got = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    leaf = ref["leaf"][idx]
    return {"n": len(idx), "signature": "serving_default",
            "max_abs_prob_diff": float(np.max(np.abs(got["leaf"] - leaf))),
            "agreement": float(np.mean(got["label_index"] == ref["label_index"][idx]))}
