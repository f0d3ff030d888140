"""Study memory: RSS growth per cell, in-process (K = 0) vs a fresh worker every K cells.

    python benchmarks/study_memory.py                # Lite0, 64 px, 8 cells, K=0 vs K=4
    python benchmarks/study_memory.py --cells 8 --k 2 --size 32 --backbone cbr_micro
    python benchmarks/study_memory.py --out study_memory.json    # + every number as JSON

The script writes a tiny synthetic dataset (three classes of grey images: plain texture, a
bright disc, a bright square; ``--per-class`` each) and a study YAML into a temporary
folder, then runs the same study twice, back to back, each time as its own
``python -m kmedtl.study STUDY --out DIR --cells-per-process K`` process: once with K = 0
(every cell in one process, the old behaviour) and once with K > 0 (cells in worker
processes, a fresh one every K cells).  The cells are the real study's kind at a small
scale: ``--backbone`` (default ``efficientnet_lite0`` with its ImageNet weights, fastai-style
``fine_tune`` with frozen BatchNorm, as in pipelines/study_imagenet_brain.yaml) fine-tuned
on N = ``--n`` images per class, flat and hierarchical arms, ``--cells / 2`` seeds.

What is measured comes from the run's own ``status.json`` (``memory``): each cell's RSS,
read from ``/proc/self/statm`` right after the cell in the process that trained it (the
study process itself with K = 0, the worker with K > 0), and the peak RSS (``getrusage``)
of the parent and of its children (with K = 0 the only children are the image-decoding
pool of the first split load).  "growth per cell" is each process's RSS rise from the end
of its first cell to the end of its last, per cell in between, pooled over the processes
(the first cell also pays for what later cells reuse: imports, traced functions, the
weights file).  The wall time outside the cells' own training (wall time minus the sum of
the cells' ``seconds``), K > 0 minus K = 0, per worker started, is the cost of starting a
worker (spawn, import TensorFlow, load the cached split).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _image(rng, label: int, size: int) -> np.ndarray:
    img = rng.normal(0.4, 0.08, (size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
    r = size * rng.uniform(0.12, 0.22)
    if label == 1:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 0.4
    elif label == 2:
        img[(abs(yy - cy) < r) & (abs(xx - cx) < r)] += 0.4
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def write_study(tmp: Path, args) -> Path:
    """The synthetic dataset and the study YAML; returns the YAML's path."""
    import yaml
    from PIL import Image

    rng = np.random.default_rng(0)
    classes = ("plain", "disc", "square")
    for label, name in enumerate(classes):
        (tmp / "data" / name).mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            path = tmp / "data" / name / f"{i:03d}.png"
            Image.fromarray(_image(rng, label, args.size)).save(path)
    n_seeds = max(1, args.cells // 2)
    train = {"backbone": args.backbone, "model": "flat", "epochs": args.epochs,
             "batch_size": 16, "learning_rate": 0.001, "schedule": "one_cycle",
             "dropout": 0.2, "jit_compile": False}
    if args.backbone != "cbr_micro":  # the real study's recipe (ImageNet weights)
        train.update(weights="imagenet", strategy="fine_tune", head_epochs=1, freeze_bn=True,
                     recalibrate_bn=False, lr_multipliers=[0.111, 0.333, 1.0])
    study = {
        "name": "memory",
        "data": {"root": str(tmp / "data"),
                 "hierarchy": {"plain": None, "lesion": {"disc": None, "square": None}},
                 "image_size": args.size, "channels": 1, "cache_dir": str(tmp / "cache"),
                 "dedupe": "exact", "test": "holdout", "test_fraction": 0.2},
        "grid": {"sizes": [args.n], "seeds": list(range(n_seeds))},
        "train": train,
        "evaluation": {"n_boot": 50},
        "arms": [{"name": "flat"}, {"name": "hierarchical", "model": "hierarchical"}],
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def run_mode(study: Path, out: Path, k: int) -> dict:
    """One ``python -m kmedtl.study`` process; its status.json and wall time."""
    cmd = [sys.executable, "-m", "kmedtl.study", str(study), "--out", str(out),
           "--cells-per-process", str(k), "--no-plots", "--results", str(out / "R.md")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    status = json.loads((out / "status.json").read_text())
    seconds = [json.loads((out / "cells" / f"{r['key']}.json").read_text())["seconds"]
               for r in status["memory"]["cells"]]
    return {"k": k, "wall_s": round(wall, 1), "status": status, "cell_seconds": seconds}


def growth(by_pid: dict) -> float | None:
    """MB per cell: each process's rise from its first cell to its last, divided by the
    cells in between, pooled over the processes (weighted by those cells)."""
    rise = sum(v[-1] - v[0] for v in by_pid.values() if len(v) > 1)
    steps = sum(len(v) - 1 for v in by_pid.values() if len(v) > 1)
    return rise / steps if steps else None


def summarise(run: dict) -> dict:
    mem = run["status"]["memory"]
    rows = mem["cells"]
    by_pid: dict[int, list] = {}
    for r in rows:
        by_pid.setdefault(r["pid"], []).append(r["rss_mb"])
    g = growth(by_pid)
    rss = [r["rss_mb"] for r in rows]
    return {"k": run["k"], "cells": len(rows), "processes": len(by_pid),
            "wall_s": run["wall_s"], "failed": run["status"]["failed_now"],
            "rss_first_mb": rss[0], "rss_last_mb": rss[-1], "rss_max_mb": max(rss),
            "growth_mb_per_cell": None if g is None else round(g, 1),
            "peak_parent_mb": mem["peak_rss_mb"]["parent"],
            "peak_children_mb": mem["peak_rss_mb"]["children"],
            "workers_started": mem["workers_started"], "rss_per_cell_mb": rss,
            "cell_seconds": run["cell_seconds"],
            "mean_cell_s": round(float(np.mean(run["cell_seconds"])), 1),
            "pid_per_cell": [r["pid"] for r in rows]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=8, help="cells per run (even: 2 arms)")
    ap.add_argument("--k", type=int, default=4, help="cells per worker of the second run")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=64, help="image size (px)")
    ap.add_argument("--n", type=int, default=8, help="images per class of each cell")
    ap.add_argument("--per-class", type=int, default=24, help="images per class on disk")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", help="write all numbers and the environment as JSON")
    args = ap.parse_args(argv)
    if args.k < 1:
        ap.error("--k must be >= 1 (the K = 0 run is always made)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory(prefix="kmedtl-study-memory-") as d:
        tmp = Path(d)
        study = write_study(tmp, args)
        runs = []
        for k in (0, args.k):
            print(f"running K={k} ...", file=sys.stderr, flush=True)
            runs.append(run_mode(study, tmp / f"k{k}", k))
        same = (sorted(p.name for p in (tmp / "k0" / "cells").glob("*.json"))
                == sorted(p.name for p in (tmp / f"k{args.k}" / "cells").glob("*.json")))
    summary = [summarise(r) for r in runs]
    env = {"machine": platform.machine(), "cpu_count": os.cpu_count(),
           "python": platform.python_version(),
           "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
           **runs[0]["status"]["hardware"]}
    base, iso = summary
    print(f"{args.cells} cells: {args.backbone} at {args.size} px, N = {args.n} per class, "
          f"{args.epochs} epochs; {env['cpu_count']} CPU cores, TensorFlow "
          f"{env['tensorflow']}, load average {env['load_average']}")
    print()
    print("| mode | processes | wall (s) | mean cell (s) | RSS after cell 1 (MB) | "
          "after last cell (MB) | max after a cell (MB) | growth per cell (MB) | "
          "peak RSS parent / children (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        mode = "in-process (K=0)" if s["k"] == 0 else f"worker every {s['k']} cells (K={s['k']})"
        growth = "-" if s["growth_mb_per_cell"] is None else f"{s['growth_mb_per_cell']:+.1f}"
        print(f"| {mode} | {s['processes']} | {s['wall_s']:.0f} | {s['mean_cell_s']:.1f} | "
              f"{s['rss_first_mb']:.0f} | "
              f"{s['rss_last_mb']:.0f} | {s['rss_max_mb']:.0f} | {growth} | "
              f"{s['peak_parent_mb']:.0f} / {s['peak_children_mb']:.0f} |")
    print()
    print("| cell | " + " | ".join(f"RSS K={s['k']} (MB) | cell K={s['k']} (s)"
                                   for s in summary) + " |")
    print("|---:|" + "---:|---:|" * len(summary))
    for i in range(max(s["cells"] for s in summary)):
        cols = []
        for s in summary:
            v = s["rss_per_cell_mb"][i] if i < s["cells"] else None
            new = i > 0 and s["k"] and s["pid_per_cell"][i] != s["pid_per_cell"][i - 1]
            cols.append("-" if v is None else f"{v:.0f}{' (new worker)' if new else ''}")
            cols.append("-" if v is None else f"{s['cell_seconds'][i]:.1f}")
        print(f"| {i + 1} | " + " | ".join(cols) + " |")
    # outside the cells' own training time: imports, split loads, metrics, worker starts
    over = {s["k"]: s["wall_s"] - sum(s["cell_seconds"]) for s in summary}
    per_start = (over[args.k] - over[0]) / max(1, iso["workers_started"])
    print(f"\nsame cell files in both runs: {same}; wall time outside training: K=0 "
          f"{over[0]:.0f} s, K={args.k} {over[args.k]:.0f} s, i.e. {per_start:+.1f} s per "
          f"worker started")
    for s in summary:
        s["outside_training_s"] = round(over[s["k"]], 1)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "env": env,
                                              "summary": summary, "same_cells": same},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
