"""``kmedtl compare RUN_A RUN_B``: a paired comparison of two evaluated runs.

Both runs must have been evaluated on the *same* test cases (``predictions.csv``, written
by ``kmedtl evaluate``): give the second run the first run's split with
``split.file: <run A>/data/splits.json``, or pass ``common=True`` (``--common``) to compare
on the cases *both* runs held out.  Each run's split is leak-free under its own duplicate
groups, so a case in both test sets was seen by neither model and has no near copy in
either training set; the report says how many cases each run had and how many are shared.
Cases are matched by id; without ``common`` any difference in the case sets is an error,
never silently intersected.  (Two runs at different image sizes can disagree on which
images are near duplicates, since the perceptual hash is taken of the resized image; then
one run's split file may leak under the other's groups and ``split.file`` refuses it.)

Reports, for A minus B: the difference of a metric (balanced accuracy by default) with a
percentile-bootstrap CI over the same resampled cases, and McNemar's test on per-case
correctness (:func:`kmedtl.evaluation.uncertainty.compare_models`).

Example::

    >>> res = compare_runs("runs/lite0", "runs/scratch")   # doctest: +SKIP
    >>> res["difference"]["value"] > 0                    # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from kmedtl.errors import ConfigError
from kmedtl.evaluation.stage import PREDICTIONS_FILE
from kmedtl.evaluation.uncertainty import compare_models
from kmedtl.jsonio import write_json

METRICS = ("balanced_accuracy", "accuracy", "f1_macro", "kappa")


def read_predictions(run_dir) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """``(case ids, leaf names, probabilities, true labels)`` from ``predictions.csv``."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run `kmedtl evaluate {run_dir}` first")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    head, body = rows[0], rows[1:]
    if head[:4] != ["id", "frame", "true", "pred"] or not body:
        raise ConfigError(f"{path}: not a kmedtl predictions file (or no cases)")
    leaves = [h[2:] for h in head[4:]]
    ids = [f"{r[0]}#{r[1]}" if r[1] else r[0] for r in body]
    true = [r[2] for r in body]
    probs = np.array([[float(v) for v in r[4:]] for r in body], np.float64)
    return ids, leaves, probs, true


def _metric(name):
    fns = {"balanced_accuracy": skm.balanced_accuracy_score, "accuracy": skm.accuracy_score,
           "f1_macro": lambda y, p: skm.f1_score(y, p, average="macro"),
           "kappa": skm.cohen_kappa_score}
    if name not in fns:
        raise ConfigError(f"compare: --metric {name!r} is not one of {list(METRICS)}")
    fn = fns[name]
    return lambda y, p: float(fn(y, p.argmax(1) if p.ndim == 2 else p))


def compare_runs(run_a, run_b, metric: str = "balanced_accuracy", n_boot: int = 2000,
                 alpha: float = 0.05, seed: int = 0, common: bool = False) -> dict:
    """Paired comparison of two evaluated runs (A minus B) on the same test cases (with
    ``common``: on the cases both runs held out, see the module docstring)."""
    ids_a, leaves_a, pa, true_a = read_predictions(run_a)
    ids_b, leaves_b, pb, true_b = read_predictions(run_b)
    if leaves_a != leaves_b:
        raise ConfigError(f"compare: the runs predict different classes: {leaves_a} vs "
                          f"{leaves_b}")
    if len(ids_a) != len(set(ids_a)) or len(ids_b) != len(set(ids_b)):
        raise ConfigError("compare: a predictions.csv lists a case twice")
    n_a, n_b = len(ids_a), len(ids_b)
    only_a, only_b = set(ids_a) - set(ids_b), set(ids_b) - set(ids_a)
    if (only_a or only_b) and not common:
        raise ConfigError(
            f"compare: the runs were tested on different cases ({len(only_a)} only in "
            f"{run_a}, {len(only_b)} only in {run_b}); evaluate them on one split (run the "
            f"second with --set split.file=<first run>/data/splits.json) or compare on the "
            f"cases both held out with --common")
    if only_a:
        keep = [k for k, i in enumerate(ids_a) if i not in only_a]
        ids_a, pa, true_a = [ids_a[k] for k in keep], pa[keep], [true_a[k] for k in keep]
    if not ids_a:
        raise ConfigError(f"compare: {run_a} and {run_b} share no test case")
    order = {i: k for k, i in enumerate(ids_b)}
    idx = [order[i] for i in ids_a]
    pb = pb[idx]
    true_b = [true_b[k] for k in idx]
    if true_a != true_b:
        bad = sum(a != b for a, b in zip(true_a, true_b))
        raise ConfigError(f"compare: {bad} case(s) carry different true labels in the two "
                          "runs (different label trees or data?)")
    y = np.array([leaves_a.index(t) for t in true_a])
    res = compare_models(y, pa, pb, _metric(metric), n_boot=n_boot, alpha=alpha, seed=seed)
    return {"kind": "kmedtl-compare", "version": 1, "run_a": str(run_a), "run_b": str(run_b),
            "metric": metric, "n": int(len(y)), "n_a": n_a, "n_b": n_b,
            "cases": "common" if (only_a or only_b) else "identical",
            "n_boot": n_boot, "alpha": alpha,
            **{k: v for k, v in res.items()}}


def format_comparison(res: dict) -> str:
    a, b, d, mc = res["a"], res["b"], res["difference"], res["mcnemar"]
    name = res["metric"]
    shared = "" if res.get("cases") != "common" else (
        f" (held out by both runs: A tested {res['n_a']}, B {res['n_b']})")
    lines = [
        f"{res['n']} paired test cases{shared}; {name} (95% percentile bootstrap, "
        f"{res['n_boot']} resamples of the same cases)",
        f"  A {os.path.basename(str(res['run_a']).rstrip('/'))}: {a['value']:.3f} "
        f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}]",
        f"  B {os.path.basename(str(res['run_b']).rstrip('/'))}: {b['value']:.3f} "
        f"[{b['ci_low']:.3f}, {b['ci_high']:.3f}]",
        f"  A - B: {d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
        f"  McNemar: {_mcnemar_text(mc)}",
    ]
    return "\n".join(lines)


def _mcnemar_text(mc: dict) -> str:
    return (f"A right/B wrong {mc['b']}, A wrong/B right {mc['c']}, p = {mc['p_value']:.3g} "
            f"({mc['method']})")


def write_comparison(res: dict, path) -> Path:
    write_json(path, res)
    return Path(path)


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="paired comparison of two evaluated runs (bootstrap CI + McNemar)")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--metric", default="balanced_accuracy", choices=METRICS)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--common", action="store_true",
                   help="compare on the test cases both runs held out (their splits differ)")
    p.add_argument("--json", help="also write the result here")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    res = compare_runs(args.run_a, args.run_b, args.metric, n_boot=args.n_boot,
                       seed=args.seed, common=args.common)
    print(format_comparison(res))
    if args.json:
        write_comparison(res, args.json)
        print(f"wrote {args.json}")
    return 0
