"""``export_run``: one run folder -> SavedModel, TFLite variants and ONNX, with parity.

Layout written (atomically: a temporary sibling folder renamed into place)::

    <run_dir>/export/
      export.json                 metadata + report (this module's ExportReport.to_dict())
      savedmodel/                 serving_default (PNG/JPEG bytes) and predict_pixels
        assets.extra/kmedtl.json  label tree, image options, normalisation, temperature,
                                  model_sha256 (the SavedModel's digest, checked at load)
      tflite/model_<variant>.tflite
      model.onnx

``export.json``: ``kind`` ``"kmedtl-export"``, ``version`` 1, ``model`` (the
:class:`~kmedtl.export.predictors.ModelInfo`: ``hierarchy``, ``leaves``, ``image``,
``input_shape``, ``normalization``, ``temperature``), ``outputs`` (names),
``class_names`` (class order per probability output), ``signatures``, ``formats``
(per format: ``path``, ``size_bytes``, ``sha256`` (checked at load,
:mod:`kmedtl.export.trust`), ``accuracy`` on the run's test split,
``parity`` {``kind``, ``max_abs_diff``, ``agreement``, ``bound``, ``n`` (images
compared), ``n_independent`` (of them, the run's test images), ``status`` (``passed`` /
``warned`` / ``failed``), ``passed`` (the bound is met); quantised variants also ``ci``
[low, high], ``ci_method``, ``confidence``, ``gate``; with labels ``accuracy``,
``keras_accuracy`` and ``accuracy_delta`` (format minus Keras, on ``n_accuracy`` test
images)}), ``parity_data``, ``preprocessing`` (``serving_default`` on
the test files' bytes vs the training pipeline), ``quantized_gate``,
``int8_representative`` {``split``, ``requested``, ``used``, ``n``}, ``verified``,
``failures``, ``warnings``, ``source_precision``, ``seconds``.

Parity bounds (:data:`BOUNDS`), against the float32 Keras model on the run's test images
(topped up to :data:`MIN_PARITY_IMAGES` with augmented copies when the split is smaller;
``accuracy`` is on the test images alone).

*Formats that must match numerically gate the export* (``failed`` when over the bound,
which makes ``verified`` false, so the pipeline's export stage fails and push refuses):
SavedModel (the same TensorFlow kernels) within 1e-4 max absolute probability difference
(every probability output), TFLite float32 and ONNX (other kernels) within 1e-3 (a
2-epoch EfficientNet-Lite0 at 32 px differed by 4e-5 on its test images and by 2.2e-4 on
noisy augmented copies of them; a broken conversion -- wrong weights or preprocessing --
moves probabilities by 1e-1); TFLite float16 within 5e-2 (float16 weights through the 16
inverted-residual blocks of EfficientNet-Lite0 move probabilities by up to 0.024 on the
main job's test images while every predicted leaf agrees; the small CBR networks stay
within 1e-3).  float16 stays a max-abs check: its rounding is deterministic and small,
so a difference over 5e-2 is a conversion fault, not sampling noise.

*Quantised variants report and warn* (:data:`QUANTIZED`: dynamic-range and full int8):
their bound is a share of equal predicted leaves (>= 97%), measured on few images, so it
is reported with a 95% Wilson interval.  The interval counts the *independent* images:
the run's test images (``n_independent``), not the augmented copies that top them up
(copies of one image flip together), with ``k = round(agreement * n_independent)``.
Agreement >= the bound is ``passed``.  Below it the variant is ``warned`` (a warning that
names the variant, agreement, interval, n and remedy; ``verified`` is unaffected) unless
``quantized_gate="fail"`` (``pipeline.export.quantized_gate: fail``), which marks it
``failed`` only when the interval's upper end is below the bound, i.e. the variant is
clearly below it, not just unlucky on a small test split.  Push serves the SavedModel,
never a quantised file.

Example::

    >>> report = export_run("runs/demo", formats=("savedmodel", "onnx"))   # doctest: +SKIP
    >>> report.verified, report.out_dir                                     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

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
    savedmodel_metadata,
)
from kmedtl.export.savedmodel import BYTES_INPUT, PIXELS_INPUT, pixel_range, write_savedmodel
from kmedtl.export.trust import mark_written, model_digest
from kmedtl.jsonio import json_safe, write_json
from kmedtl.ownership import owned_name, remove_stale, run_lock
from kmedtl.run_folder import RunFolder
from kmedtl.serving.client import is_raster

log = logging.getLogger("kmedtl.export")

FORMATS = ("savedmodel", "tflite", "onnx")
#: format -> ("max_abs", bound) or ("agreement", minimum share of equal predicted leaves)
BOUNDS = {"savedmodel": ("max_abs", 1e-4), "tflite_float32": ("max_abs", 1e-3),
          "onnx": ("max_abs", 1e-3), "tflite_float16": ("max_abs", 5e-2),
          "tflite_dynamic_int8": ("agreement", 0.97), "tflite_int8": ("agreement", 0.97)}
#: Integer-quantised variants: agreement with a Wilson CI, warned (see the module docstring).
QUANTIZED = ("tflite_dynamic_int8", "tflite_int8")
#: ``quantized_gate`` values: ``warn`` (default) reports a quantised variant below its
#: bound; ``fail`` fails it when the CI's upper end is below the bound.
QUANTIZED_GATES = ("warn", "fail")
CONFIDENCE = 0.95
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
    warnings: list = field(default_factory=list)
    quantized_gate: str = "warn"
    parity_data: str = ""
    preprocessing: dict | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return json_safe({"kind": "kmedtl-export", "version": 1, "run_dir": str(self.run_dir),
                           "out_dir": str(self.out_dir), **self.metadata,
                           "formats": self.formats, "parity_data": self.parity_data,
                           "preprocessing": self.preprocessing, "verify": self.verify,
                           "quantized_gate": self.quantized_gate,
                           "verified": self.verified, "failures": self.failures,
                           "warnings": self.warnings,
                           "seconds": round(self.seconds, 2), **self.extra})

    def table(self) -> str:
        """Markdown table: format, size, test accuracy, parity value, its 95% CI (quantised
        variants), bound, images compared and status."""
        rows = ["| format | size (KiB) | test accuracy | parity | 95% CI | bound | "
                "n (test images) | status |",
                "|---|---:|---:|---:|:-:|---:|---:|:-:|"]
        for name, f in self.formats.items():
            p = f.get("parity") or {}
            acc = f.get("accuracy")
            value, bound = _parity_value(p), _bound_text(p)
            rows.append(f"| {name} | {f['size_bytes'] / 1024:.1f} | "
                        f"{'-' if acc is None else f'{acc:.3f}'} | "
                        f"{'-' if value is None else f'{value:.3g}'} | {_ci_text(p)} | "
                        f"{bound} | {_n_text(p)} | {_status(p) if p else 'reference'} |")
        return "\n".join(rows)


def _status(p: dict) -> str:
    """``passed`` / ``warned`` / ``failed`` (records older than the status: from passed)."""
    return p.get("status") or ("passed" if p.get("passed", True) else "failed")


def _parity_value(p: dict):
    if not p:
        return None
    return p["max_abs_diff"] if p["kind"] == "max_abs" else p["agreement"]


def _bound_text(p: dict) -> str:
    if not p or p.get("bound") is None:
        return ""
    return ("<= " if p["kind"] == "max_abs" else ">= ") + f"{p['bound']:g}"


def _ci_text(p: dict) -> str:
    ci = p.get("ci") if p else None
    return f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"


def _n_text(p: dict) -> str:
    if not p:
        return "-"
    n, ind = p.get("n"), p.get("n_independent")
    return f"{n}" if ind in (None, n) else f"{n} ({ind} test)"


def wilson_ci(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials (SciPy's
    ``binomtest(k, n).proportion_ci(method="wilson")``).

    >>> [round(v, 3) for v in wilson_ci(28, 32)]
    [0.719, 0.95]
    """
    if n <= 0:
        return 0.0, 1.0
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _images_text(p: dict) -> str:
    """``n = 32 test images; measured on 200 including 168 augmented copies``."""
    n, ind = p["n"], p.get("n_independent", p["n"])
    if ind == n:
        return f"n = {n} images"
    if p["kind"] == "max_abs":  # a worst case: every image compared counts
        return f"n = {n} images: {ind} test images + {n - ind} augmented copies"
    return f"n = {ind} test images; measured on {n} including {n - ind} augmented copies"


def _accuracy_text(p: dict) -> str:
    if p.get("accuracy_delta") is None:
        return ""
    return (f" Test accuracy {p['accuracy']:.3f} against Keras {p['keras_accuracy']:.3f} "
            f"({p['accuracy_delta']:+.3f}, on {p['n_accuracy']} test images).")


def remedy(name: str, p: dict, representative: dict | None = None) -> str:
    """What a user can do about a format that missed its bound (re-exporting the same
    model gives the same numbers, so it is never "rerun the export")."""
    if p["kind"] == "max_abs":
        where = ("pipeline.export.tflite_variants (kmedtl export --tflite-variants)"
                 if name.startswith("tflite_") else
                 "pipeline.export.formats (kmedtl export --formats)")
        return (f"{name} must reproduce the Keras model and a difference this large is a "
                "conversion fault, not sampling noise (exporting again gives the same "
                f"numbers): leave {name.removeprefix('tflite_')} out of {where} and report "
                "the fault with export.json attached")
    variant = name.removeprefix("tflite_")
    steps = []
    if name == "tflite_int8":
        rep = representative or {}
        used, requested = rep.get("used"), rep.get("requested")
        if used is not None and requested is not None and used < requested:
            steps.append(f"int8 was calibrated on all {used} training images "
                         f"({requested} requested), so more calibration images need a "
                         "bigger training split")
        else:
            steps.append("calibrate int8 on more training images "
                         "(pipeline.export.representative_samples, kmedtl export "
                         f"--representative-samples; now {used if used is not None else '?'})")
    steps.append(f"measure on a bigger test split (agreement rests on "
                 f"{p.get('n_independent', p['n'])} independent images)")
    steps.append(f"drop {variant} from pipeline.export.tflite_variants "
                 "(kmedtl export --tflite-variants)")
    if p.get("status") == "failed":
        steps.append("or set pipeline.export.quantized_gate: warn (kmedtl export "
                     "--quantized-gate warn) to report it without failing the export")
    return "; ".join(steps)


def _quantized_text(name: str, p: dict) -> str:
    lo, hi = p["ci"]
    return (f"{name}: leaf agreement with Keras {p['agreement']:.3f} "
            f"({p['confidence']:.0%} Wilson CI {lo:.3f}-{hi:.3f}; {_images_text(p)}) "
            f"is below the bound {p['bound']:g}")


def _failure(name: str, p: dict, representative: dict | None = None) -> str:
    if p["kind"] == "max_abs":
        return (f"{name}: max abs probability difference {p['max_abs_diff']:.3g} exceeds "
                f"the bound {p['bound']:g} ({_images_text(p)}).{_accuracy_text(p)} "
                f"Remedy: {remedy(name, p, representative)}")
    return (f"{_quantized_text(name, p)}, and so is the CI's upper end (quantized_gate: "
            f"fail).{_accuracy_text(p)} Remedy: {remedy(name, p, representative)}")


def _warning(name: str, p: dict, representative: dict | None = None) -> str:
    clear = p["ci"][1] < p["bound"]
    if p.get("gate") == "fail":
        why = "quantized_gate: fail, but the CI reaches the bound, so it is not clearly below"
    elif clear:
        why = ("quantized_gate: warn; the CI's upper end is below the bound too, so "
               "quantized_gate: fail would fail it")
    else:
        why = "quantized_gate: warn; the CI reaches the bound, so it is not clearly below"
    return (f"{_quantized_text(name, p)}: reported, not failed ({why}).{_accuracy_text(p)} "
            f"Remedy: {remedy(name, p, representative)}")


def gate_messages(formats: dict, representative: dict | None = None) -> tuple[list, list]:
    """``(failures, warnings)``: one message per format whose parity ``status`` is
    ``failed`` / ``warned``, each naming the format, the measured value with its n (and
    for quantised variants the agreement's CI), the bound and a remedy.  ``representative``
    is the int8 calibration record (``requested``, ``used``), for the int8 remedy."""
    failures, warnings = [], []
    for name, f in formats.items():
        p = (f or {}).get("parity")
        if not p:
            continue
        if p.get("status") == "failed":
            failures.append(_failure(name, p, representative))
        elif p.get("status") == "warned":
            warnings.append(_warning(name, p, representative))
    return failures, warnings


def predict_batched(predictor, x) -> dict[str, np.ndarray]:
    outs = [predictor.predict_pixels(take(x, slice(i, i + BATCH)))
            for i in range(0, n_cases(x), BATCH)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def prob_keys(out: dict) -> list[str]:
    return [k for k in out if k not in ("label", "label_index", "confidence")]


def parity(ref: dict, got: dict, name: str, y=None, *, n_test: int | None = None,
           gate: str = "warn") -> dict:
    """Max abs difference over every probability output + predicted-leaf agreement, and
    the verdict ``status`` (see the module docstring).

    The first ``n_test`` rows are the run's test images, the rest augmented copies of them
    (``None``: every row is an independent image; recorded as ``n_independent``).
    Quantised variants (``QUANTIZED``) get a Wilson interval over the ``n_test``
    independent images; ``gate`` ("warn" or "fail") says what missing the bound means.
    With labels ``y`` (one per row), ``accuracy_delta`` is the format's test accuracy minus
    the Keras model's, on the test images alone (the first ``n_test`` rows).

    >>> ref = {"leaf": np.eye(2)[[0, 1, 1, 0]], "label_index": np.array([0, 1, 1, 0])}
    >>> got = {"leaf": np.eye(2)[[0, 1, 0, 0]], "label_index": np.array([0, 1, 0, 0])}
    >>> p = parity(ref, got, "tflite_int8", np.array([0, 1, 0, 0]))
    >>> p["agreement"], p["status"], p["accuracy_delta"]
    (0.75, 'warned', 0.25)
    """
    if gate not in QUANTIZED_GATES:
        raise ExportError(f"quantized_gate: {gate!r} not in {list(QUANTIZED_GATES)}")
    keys = [k for k in prob_keys(ref) if k in got]
    diff = max(float(np.max(np.abs(np.asarray(ref[k], np.float64) -
                                   np.asarray(got[k], np.float64)))) for k in keys)
    agree = float(np.mean(ref["label_index"] == got["label_index"]))
    n = int(len(ref["label_index"]))
    kind, bound = BOUNDS.get(name, ("max_abs", None))
    met = True if bound is None else (diff <= bound if kind == "max_abs" else agree >= bound)
    n_ind = n if n_test is None else max(1, min(int(n_test), n))
    out = {"max_abs_diff": diff, "agreement": agree, "kind": kind, "bound": bound,
           "n": n, "n_independent": n_ind, "outputs": keys, "passed": bool(met)}
    status = "passed" if met else "failed"
    if name in QUANTIZED:
        lo, hi = wilson_ci(round(agree * n_ind), n_ind)
        out.update(ci=[lo, hi], ci_method="wilson", confidence=CONFIDENCE, gate=gate)
        if not met:
            status = "failed" if gate == "fail" and hi < bound else "warned"
    out["status"] = status
    if y is not None and len(y):
        m = n if n_test is None else min(int(n_test), n)
        yt = np.asarray(y)[:m]
        keras_acc = float(np.mean(ref["label_index"][:m] == yt))
        acc = float(np.mean(got["label_index"][:m] == yt))
        out.update(accuracy=acc, keras_accuracy=keras_acc, accuracy_delta=acc - keras_acc,
                   n_accuracy=m)
    return out


def _swap_in(tmp: Path, final: Path):
    """Replace ``final`` by ``tmp`` with two renames (never a half-written folder)."""
    old = None
    if final.exists():
        old = final.with_name(owned_name(f".{final.name}.old-"))
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir, *, formats=FORMATS, out_dir=None, verify: bool = True,
               tflite_variants=("float32", "float16", "dynamic_int8", "int8"),
               opset: int | None = None, representative_samples: int = 100,
               quantized_gate: str = "warn", indexed: tuple | None = None) -> ExportReport:
    """Export a run folder's model (see the module docstring); returns the report.

    ``verify`` checks parity against the Keras model (``report.verified``; failures are
    listed in ``report.failures``, nothing is raised); without it the measurements are
    still recorded but ``verified`` stays False.  Quantised variants below their bound
    are listed in ``report.warnings`` (``quantized_gate="warn"``, the default) or, with
    ``"fail"``, in ``report.failures`` when clearly below it (the CI's upper end).

    The export is written into a temporary sibling of the export folder named after this
    process (``.export.tmp-p<PID>-h<host>-<random>``) and renamed into place; temporary
    folders that interrupted exports (``kill -9``) left there are removed first
    (:func:`kmedtl.ownership.remove_stale`).  Exporting into the run folder (the default)
    holds the run folder's one-writer lock (:func:`kmedtl.ownership.run_lock`).

    ``indexed``: the ``(index, hierarchy)`` of the run's data, already built by the caller
    (``kmedtl run`` indexes once per run, so a DICOMweb source is queried once).
    """
    t0 = time.perf_counter()
    formats = tuple(formats)
    if quantized_gate not in QUANTIZED_GATES:
        raise ExportError(f"quantized_gate: {quantized_gate!r} not in {list(QUANTIZED_GATES)} "
                          "(pipeline.export.quantized_gate, kmedtl export --quantized-gate)")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"formats: {unknown or '(none)'} not in {list(FORMATS)}")
    out = Path(out_dir) if out_dir else RunFolder(run_dir).export_dir
    inside = os.path.realpath(out).startswith(os.path.realpath(run_dir) + os.sep)
    with run_lock(run_dir, "kmedtl export", create=False) if inside else nullcontext():
        remove_stale(out.parent, (f".{out.name}.tmp-", f".{out.name}.old-"),
                     what="export temporary folder")
        return _export_locked(run_dir, out, formats, verify, tflite_variants, opset,
                              representative_samples, quantized_gate, t0, indexed)


def _export_locked(run_dir, out: Path, formats, verify, tflite_variants, opset,
                   representative_samples, quantized_gate, t0, indexed=None) -> ExportReport:
    ctx = load_run(run_dir, indexed=indexed)
    run = ctx.run_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(owned_name(f".{out.name}.tmp-"))
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
    report = ExportReport(run_dir=run, out_dir=out, metadata=metadata, verify=verify,
                          quantized_gate=quantized_gate)
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
        reps, rep_info = None, None
        if "tflite" in formats and "int8" in tflite_variants:
            reps = split_pixels(ctx, "train", limit=int(representative_samples))[0]
            used = 0 if reps is None else n_cases(reps)
            rep_info = {"split": "train", "requested": int(representative_samples),
                        "used": used, "n": used}
            if reps is not None and used < int(representative_samples):
                report.warnings.append(
                    f"tflite_int8 calibration: representative_samples {representative_samples}"
                    f" requested, but the training split has {used} images, so int8 was "
                    f"calibrated on all {used} (pipeline.export.representative_samples, "
                    f"kmedtl export --representative-samples: at most {used} here)")
        ref = predict_batched(KerasPredictor(ctx.folder.model_path, info, model=ctx.model), x)

        def record(name, path, predictor):
            got = predict_batched(predictor, x)
            entry = {"path": str(Path(path).relative_to(tmp)), "size_bytes": file_size(path),
                     "sha256": model_digest(path),  # checked when the model is loaded
                     "accuracy": None if y is None else
                     float(np.mean(got["label_index"][:n_test] == y[:n_test])),
                     "parity": parity(ref, got, name, y, n_test=n_test, gate=quantized_gate)}
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
            write_json(sm / "assets.extra" / METADATA_FILE, savedmodel_metadata(info, sm))
            smp = load_predictor(mark_written(sm), info)  # written just now: not checked
            record("savedmodel", sm, smp)
            if paths:
                report.preprocessing = _bytes_parity(smp, paths[:64], ref, x)
        if "tflite" in formats:
            for v, path in tflite.convert_all(ctx, tmp / "tflite", tflite_variants,
                                              reps).items():
                record(f"tflite_{v}", path, load_predictor(mark_written(path), info))
        if "onnx" in formats:
            path = onnx_export.write_onnx(ctx, tmp / "model.onnx", opset)
            report.extra["onnx_opset"] = int(opset or onnx_export.DEFAULT_OPSET)
            record("onnx", path, load_predictor(mark_written(path), info))
        if rep_info is not None:
            report.extra["int8_representative"] = rep_info
        failures, warnings = gate_messages(report.formats, rep_info)
        report.failures = failures
        report.warnings += warnings
        report.verified = bool(verify and not report.failures)
        report.seconds = time.perf_counter() - t0
        report.out_dir = out
        write_json(tmp / EXPORT_FILE, report.to_dict())
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for f in report.failures:
        log.warning("export: parity: %s", f)
    for w in report.warnings:
        log.warning("export: %s", w)
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
