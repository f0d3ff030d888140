"""Full versus truncated backbones: parameters, FLOPs and CPU inference latency.

    python benchmarks/models.py --out results.json           # default repetitions
    python benchmarks/models.py --out results.json --quick   # fewer repetitions
    python benchmarks/models.py --quick --families efficientnet_lite0 --size 128

For ResNet50, DenseNet121 and EfficientNet-Lite0 at 224x224x3 (or ``--size``; random
weights: speed does not depend on their values) the script builds the full backbone
(``include_top=False``, kmedtl's in-model preprocessing included) and the backbone
truncated at each *stage* cut point
(:func:`kmedtl.models.cut_points` with ``kind == "stage"``), and measures

* parameters (``count_params``),
* FLOPs per image, counted analytically from layer shapes
  (:func:`kmedtl.models.count_flops`: 2 x multiply-accumulates of Conv/Dense layers; the
  TensorFlow profiler would tie the package to TF and add nothing for these networks),
* latency of ``model.predict_on_batch`` (Keras' compiled predict step) at batch 1 and
  32 (and images/s = 32 / batch-32 latency): the median of several timed calls after
  untimed warm-up calls; the models of a family are timed round-robin so that other load
  on the machine hits them alike.

Every number is also given as a ratio to the full model of the same family, measured in
the same run, so the table is comparable across machines.  The Markdown table goes to
stdout, everything (with the environment) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
logging.getLogger("tensorflow").setLevel(logging.ERROR)  # tf.function retracing notices
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kmedtl.models import backbone, count_flops, cut_points  # noqa: E402

FAMILIES = ("resnet50", "densenet121", "efficientnet_lite0")
SIZE = 224  # --size changes it


def latencies_ms(models, batch: int, warmup: int, runs: int) -> list[float]:
    """Median latency of each model; the models are timed round-robin (one call each per
    round), so a load change on the machine affects all of them alike."""
    x = np.random.default_rng(0).uniform(size=(batch, SIZE, SIZE, 3)).astype("float32")
    for model in models:
        for _ in range(warmup):
            model.predict_on_batch(x)
    times = [[] for _ in models]
    for _ in range(runs):
        for i, model in enumerate(models):
            start = time.perf_counter()
            model.predict_on_batch(x)
            times[i].append(time.perf_counter() - start)
    return [1000.0 * statistics.median(t) for t in times]


def measure_family(family: str, args) -> list[dict]:
    stages = [c.name for c in cut_points(family, input_shape=(SIZE, SIZE, 3))
              if c.kind == "stage"]
    cuts = [None, *stages[:-1]]  # the last stage cut is the full model
    models = [backbone(family, cut=cut, input_shape=(SIZE, SIZE, 3)) for cut in cuts]
    b1 = latencies_ms(models, 1, args.warmup, args.runs)
    b32 = latencies_ms(models, 32, args.warmup_b32, args.runs_b32)
    rows = []
    for cut, model, t1, t32 in zip(cuts, models, b1, b32):
        rows.append({
            "family": family,
            "cut": cut or "(full)",
            "output_shape": list(model.output_shape[1:]),
            "params": int(model.count_params()),
            "flops": int(count_flops(model)),
            "latency_b1_ms": t1,
            "latency_b32_ms": t32,
            "images_per_s": 32000.0 / t32,
        })
        print(f"  {family:12s} {rows[-1]['cut']:18s} b1 {t1:7.1f} ms  b32 {t32:8.0f} ms",
              file=sys.stderr, flush=True)
    del models
    keras.backend.clear_session()
    return rows


def add_ratios(rows):
    full = {r["family"]: r for r in rows if r["cut"] == "(full)"}
    for r in rows:
        f = full[r["family"]]
        for key in ("params", "flops", "latency_b1_ms", "latency_b32_ms", "images_per_s"):
            r[f"{key}_ratio"] = r[key] / f[key] if f[key] else float("nan")
    return rows


def markdown(rows) -> str:
    head = ("| backbone | cut | output | params (M) | ratio | GFLOPs | ratio "
            "| b1 ms | ratio | b32 ms | ratio | img/s | ratio |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['cut']} | {'x'.join(map(str, r['output_shape']))} "
            f"| {r['params'] / 1e6:.2f} | {r['params_ratio']:.2f} "
            f"| {r['flops'] / 1e9:.2f} | {r['flops_ratio']:.2f} "
            f"| {r['latency_b1_ms']:.1f} | {r['latency_b1_ms_ratio']:.2f} "
            f"| {r['latency_b32_ms']:.0f} | {r['latency_b32_ms_ratio']:.2f} "
            f"| {r['images_per_s']:.0f} | {r['images_per_s_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmark_models.json"))
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--size", type=int, default=224, help="input size (224)")
    args = p.parse_args(argv)
    global SIZE
    SIZE = args.size
    args.warmup, args.runs = (1, 3) if args.quick else (3, 15)
    args.warmup_b32, args.runs_b32 = (1, 2) if args.quick else (2, 5)

    load_before = os.getloadavg()
    rows = []
    for family in args.families:
        rows.extend(measure_family(family, args))
    add_ratios(rows)
    table = markdown(rows)
    print(table)
    env = {
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "input": [SIZE, SIZE, 3],
        "repetitions": {"b1": [args.warmup, args.runs], "b32": [args.warmup_b32,
                                                               args.runs_b32]},
        "quick": args.quick,
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
    }
    args.out.write_text(json.dumps({"environment": env, "rows": rows, "markdown": table},
                                   indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
