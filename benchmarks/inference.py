"""CPU inference speed of every export format: Keras, SavedModel, TFLite, ONNX Runtime.

    python benchmarks/inference.py                 # mobilenetv2 at 96x96x1
    python benchmarks/inference.py --quick         # cbr_small at 64x64x1, few repetitions
    python benchmarks/inference.py --out inference.json --family resnet50 --size 128
    python benchmarks/inference.py --family efficientnet_lite0 --size 128 \
        --cuts block4c_add,block5c_add,block6d_add --formats keras,tflite_float32,tflite_int8

For one backbone family (random weights: speed does not depend on their values) the script
builds a hierarchical classifier (normal vs tumor -> 3 subtypes) over the *full* backbone
and over the backbone *truncated* at a middle stage cut, or at each of ``--cuts``
(TruncatedTL), exports each with
kmedtl's own exporters (SavedModel ``predict_pixels``, TFLite float32/float16/
dynamic_int8/int8 with representative random images, ONNX through tf2onnx) and measures

* p50 / p99 latency at batch 1 (after warm-up calls; all formats timed round-robin, so a
  load change on the machine hits them alike),
* images/s at batch 32,
* file size (the ``.keras`` file for Keras).

Every number is also a ratio to the Keras model of the same backbone measured in the same
run; the truncated model's images/s is also given relative to the full model's.  Targets
(issue 6): int8 TFLite <= 30% of the float32 TFLite file; truncated >= 1.5x the full
model's images/s.  The Markdown table goes to stdout, everything to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
logging.getLogger("tensorflow").setLevel(logging.ERROR)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kmedtl.data import ImageOptions  # noqa: E402
from kmedtl.export.model import RunContext, file_size  # noqa: E402
from kmedtl.export.onnx import write_onnx  # noqa: E402
from kmedtl.export.predictors import ModelInfo, load_predictor  # noqa: E402
from kmedtl.export.savedmodel import write_savedmodel  # noqa: E402
from kmedtl.export.tflite import VARIANTS, convert_all  # noqa: E402
from kmedtl.hierarchy import Hierarchy  # noqa: E402
from kmedtl.models import HierarchicalClassifier, backbone, cut_points  # noqa: E402

TREE = {"normal": None, "tumor": {"glioma": None, "meningioma": None, "pituitary": None}}


class _Cfg:
    name = "bench"


ALL_FORMATS = ("keras", "savedmodel", *[f"tflite_{v}" for v in VARIANTS], "onnx")


def build(family: str, cut, size: int, out: Path, n_rep: int, wanted=ALL_FORMATS) -> dict:
    """Export one model to the ``wanted`` formats; returns {format: (predictor, bytes)}."""
    keras.utils.set_random_seed(0)
    h = Hierarchy(TREE)
    opts = ImageOptions(size=(size, size), channels=1)
    model = HierarchicalClassifier(backbone(family, cut=cut, input_shape=opts.shape), h)
    ctx = RunContext(run_dir=out, config=_Cfg(), model=model, hierarchy=h, options=opts,
                     normalization="unit")
    info = ModelInfo(h, opts)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    reps = np.random.default_rng(1).random((n_rep, *opts.shape)).astype("float32")
    paths = {"keras": out / "model.keras"}
    if "savedmodel" in wanted:
        paths["savedmodel"] = write_savedmodel(ctx, out / "sm")
    variants = [v for v in VARIANTS if f"tflite_{v}" in wanted]
    if variants:
        for v, p in convert_all(ctx, out / "tflite", variants, reps).items():
            paths[f"tflite_{v}"] = p
    if "onnx" in wanted:
        paths["onnx"] = write_onnx(ctx, out / "model.onnx")
    threads = os.cpu_count()
    formats = {}
    for name, p in paths.items():
        kw = {"num_threads": threads} if name.startswith(("tflite", "onnx")) else {}
        formats[name] = (load_predictor(p, info, **kw), file_size(p))
    formats["keras"][0].model = model  # time the in-memory model (same weights)
    return formats


def timed(formats: dict, x: np.ndarray, warmup: int, runs: int) -> dict[str, list[float]]:
    for pred, _ in formats.values():
        for _ in range(warmup):
            pred.predict_pixels(x)
    times = {name: [] for name in formats}
    for _ in range(runs):
        for name, (pred, _) in formats.items():
            start = time.perf_counter()
            pred.predict_pixels(x)
            times[name].append(time.perf_counter() - start)
    return times


def measure(family: str, cut, label: str, args, tmp: Path) -> list[dict]:
    formats = build(family, cut, args.size, tmp / label, args.representative, args.formats)
    rng = np.random.default_rng(0)
    x1 = rng.random((1, args.size, args.size, 1)).astype("float32")
    x32 = rng.random((32, args.size, args.size, 1)).astype("float32")
    b1 = timed(formats, x1, args.warmup, args.runs)
    b32 = timed(formats, x32, 1, args.runs_b32)
    rows = []
    for name, (_, size) in formats.items():
        t1 = sorted(b1[name])
        rows.append({"backbone": family, "model": label, "format": name, "size_bytes": size,
                     "p50_ms": 1000 * statistics.median(t1),
                     "p99_ms": 1000 * t1[min(len(t1) - 1, int(round(0.99 * (len(t1) - 1))))],
                     "images_per_s": 32 / statistics.median(b32[name])})
        print(f"  {label:9s} {name:20s} p50 {rows[-1]['p50_ms']:7.2f} ms  "
              f"{rows[-1]['images_per_s']:8.1f} img/s", file=sys.stderr, flush=True)
    keras.backend.clear_session()
    return rows


def add_ratios(rows):
    base = {r["model"]: r for r in rows if r["format"] == "keras"}
    full = {r["format"]: r for r in rows if r["model"] == "full"}
    f32 = {r["model"]: r for r in rows if r["format"] == "tflite_float32"}
    for r in rows:
        b = base[r["model"]]
        r["p50_vs_keras"] = r["p50_ms"] / b["p50_ms"]
        r["throughput_vs_keras"] = r["images_per_s"] / b["images_per_s"]
        r["throughput_vs_full"] = r["images_per_s"] / full[r["format"]]["images_per_s"]
        if r["format"].startswith("tflite") and r["model"] in f32:
            r["size_vs_tflite_float32"] = r["size_bytes"] / f32[r["model"]]["size_bytes"]
    return rows


def markdown(rows) -> str:
    lines = ["| model | format | size (KiB) | size / tflite f32 | p50 b1 (ms) | p99 b1 (ms) "
             "| p50 / keras | img/s b32 | img/s / keras | img/s / full |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = r.get("size_vs_tflite_float32")
        lines.append(
            f"| {r['backbone']} {r['model']} | {r['format']} | {r['size_bytes'] / 1024:.0f} "
            f"| {'' if rel is None else f'{rel:.2f}'} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['p50_vs_keras']:.2f} | {r['images_per_s']:.0f} "
            f"| {r['throughput_vs_keras']:.2f} | {r['throughput_vs_full']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmark_inference.json"))
    p.add_argument("--quick", action="store_true", help="small model, few repetitions")
    p.add_argument("--family", help="backbone family (mobilenetv2; quick: cbr_small)")
    p.add_argument("--size", type=int, help="input size (96; quick: 64)")
    p.add_argument("--cut", help="truncation cut (default: the middle stage cut)")
    p.add_argument("--cuts", help="comma-separated cuts, each measured against the full model")
    p.add_argument("--formats", default=",".join(ALL_FORMATS),
                   help=f"comma-separated subset of {','.join(ALL_FORMATS)} (keras is always "
                        "measured: it is the baseline)")
    args = p.parse_args(argv)
    args.formats = tuple(dict.fromkeys(["keras", *args.formats.split(",")]))
    unknown = set(args.formats) - set(ALL_FORMATS)
    if unknown:
        p.error(f"--formats: unknown {sorted(unknown)}; choose from {list(ALL_FORMATS)}")
    args.family = args.family or ("cbr_small" if args.quick else "mobilenetv2")
    args.size = args.size or (64 if args.quick else 96)
    args.warmup, args.runs, args.runs_b32 = (2, 20, 3) if args.quick else (5, 100, 10)
    args.representative = 8 if args.quick else 32
    stages = [c.name for c in cut_points(args.family, input_shape=(args.size, args.size, 1))
              if c.kind == "stage"]
    cut = args.cut or stages[len(stages) // 2 - 1]
    cuts = args.cuts.split(",") if args.cuts else [cut]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kmedtl-bench-") as tmp:
        rows = measure(args.family, None, "full", args, Path(tmp))
        for c in cuts:
            rows += measure(args.family, c, c if args.cuts else "truncated", args, Path(tmp))
    add_ratios(rows)
    print(f"{args.family} at {args.size}x{args.size}x1, truncated at {cuts}; "
          f"{os.cpu_count()} CPUs\n")
    print(markdown(rows))
    by = {(r["model"], r["format"]): r for r in rows}
    first = cuts[0] if args.cuts else "truncated"
    targets = {
        "int8_size_vs_float32": by.get(("full", "tflite_int8"), {}).get(
            "size_vs_tflite_float32"),
        "truncated_vs_full_images_per_s_keras": by[(first, "keras")]["throughput_vs_full"],
    }
    if targets["int8_size_vs_float32"] is not None:
        print(f"\nint8 / float32 TFLite size: {targets['int8_size_vs_float32']:.2f} "
              "(target <= 0.30)")
    print(f"truncated ({first}) / full images/s (Keras): "
          f"{targets['truncated_vs_full_images_per_s_keras']:.2f} (target >= 1.5)")
    env = {"keras": keras.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "load_before": load_before, "load_after": os.getloadavg(), "quick": args.quick,
           "family": args.family, "size": args.size, "cuts": cuts,
           "repetitions": {"b1": [args.warmup, args.runs], "b32": [1, args.runs_b32]}}
    args.out.write_text(json.dumps({"env": env, "targets": targets, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
