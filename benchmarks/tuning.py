"""Linear-probe search with and without the feature cache, in one run.

    python benchmarks/tuning.py                       # ResNet50 @96 px, 12 trials
    python benchmarks/tuning.py --size 64 --n 96      # smaller

The same 12-trial KerasTuner ``RandomSearch`` (same seed, so the same trials: learning
rate and head dropout of a linear probe on a frozen ResNet50 with random weights) runs
twice on the same synthetic data: once training every trial end to end with the backbone
frozen, once with :class:`kmedtl.training.FeatureCache`, which computes the backbone's
pooled features once and trains only the head on them.  The Markdown table gives the
wall time of each search and the ratio (target: the cache >= 3x faster).  Both searches
see un-augmented images (cached features cannot be augmented).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
logging.getLogger("tensorflow").setLevel(logging.ERROR)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kmedtl.hierarchy import Hierarchy  # noqa: E402
from kmedtl.training import FeatureCache, train_section  # noqa: E402
from kmedtl.training.tuning import TransferHyperModel, run_search  # noqa: E402


def data(n, size, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = 0.6 * rng.random((n, size, size, 3)) + 0.13 * y[:, None, None, None]
    return x.astype("float32"), y.astype("int32")


def search(cache: bool, args, train, val, directory):
    base = train_section({
        "model": "flat", "backbone": args.family, "epochs": args.epochs, "batch_size": 16,
        "jit_compile": False, "verbose": 0, "tensorboard": False,
        "tune": {"max_trials": args.trials, "strategies": ["linear_probe"], "cuts": "none",
                 "seed": 7, "learning_rate": [1e-4, 1e-2], "dropout": [0.0, 0.5]}})
    h = Hierarchy.flat(["a", "b", "c"])
    hm = TransferHyperModel(base, h, (args.size, args.size, 3), plain_train=train,
                            plain_val=val, feature_cache=FeatureCache() if cache else None)
    t0 = time.perf_counter()
    res = run_search(hm, train, val, directory=directory, verbose=0)
    seconds = time.perf_counter() - t0
    scores = {r["trial_id"]: r["score"] for r in res.rows}
    return seconds, scores, hm.feature_cache


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="resnet50")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--n", type=int, default=128, help="training images (validation: n/2)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--out", help="write the numbers as JSON")
    args = ap.parse_args(argv)
    train, val = data(args.n, args.size, 0), data(args.n // 2, args.size, 1)
    with tempfile.TemporaryDirectory() as tmp:
        t_plain, s_plain, _ = search(False, args, train, val, Path(tmp) / "plain")
        keras.backend.clear_session()
        t_cache, s_cache, cache = search(True, args, train, val, Path(tmp) / "cached")
    ratio = t_plain / t_cache
    same = sorted(s_plain) == sorted(s_cache)
    print(f"{args.trials}-trial linear-probe RandomSearch, {args.family} (frozen, random "
          f"weights) @ {args.size}px, {args.n} train / {args.n // 2} val images, "
          f"{args.epochs} epochs per trial, backend {keras.backend.backend()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| search | wall time (s) | per trial (s) | ratio |\n|---|---:|---:|---:|")
    print(f"| end to end (no cache) | {t_plain:.1f} | {t_plain / args.trials:.2f} | 1.00x |")
    print(f"| feature cache | {t_cache:.1f} | {t_cache / args.trials:.2f} | "
          f"{ratio:.2f}x faster |")
    print(f"\nfeature cache: {cache.misses} computations, {cache.hits} reuses; same trial "
          f"ids in both searches: {same}; target >= 3x: {'met' if ratio >= 3 else 'NOT met'}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "args": vars(args), "seconds_plain": t_plain, "seconds_cached": t_cache,
            "ratio": ratio, "scores_plain": s_plain, "scores_cached": s_cache,
            "cache_misses": cache.misses, "cache_hits": cache.hits}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
