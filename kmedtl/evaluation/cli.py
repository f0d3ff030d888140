"""``kmedtl evaluate RUN_DIR [--test SOURCE]``: the evaluation subcommand.

Wire it into the top-level parser with::

    from kmedtl.evaluation.cli import add_parsers
    add_parsers(sub)          # sub = parser.add_subparsers(...)

The handler (``args.func``) returns an exit code: 0 when every artefact was written.
kmedtl errors propagate to ``kmedtl.cli.main``, which prints them and exits 2.
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext

from kmedtl.config import tta_options
from kmedtl.errors import ConfigError
from kmedtl.evaluation.compare import add_parsers as add_compare_parsers
from kmedtl.evaluation.stage import evaluate_run
from kmedtl.evaluation.uncertainty import format_interval
from kmedtl.ownership import run_lock


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "evaluate", help="metrics with CIs, plots, HTML report and model card for a run",
        description="Evaluate the model of a run folder on its test split (or --test data) "
                    "and write metrics.json, calibration.json, plots/, report.html, "
                    "model_card.md and model_card.json.")
    p.add_argument("run_dir", help="run folder (config.yaml, splits.json, model.keras)")
    p.add_argument("--test", metavar="SOURCE",
                   help="evaluate on every image of this folder-per-class tree, CSV manifest "
                        "or YAML config instead of the run's test split")
    p.add_argument("--exclude-training", action="store_true",
                   help="with --test: leave out (and count) images that copy a training or "
                        "validation image (exact, pHash or similar content)")
    p.add_argument("--external", action="append", default=[], metavar="NAME=SOURCE",
                   help="an external test set evaluated beside the test split into "
                        "external/NAME/, copies of training images removed (repeatable; as "
                        "pipeline.evaluate.external)")
    p.add_argument("--out", help="write the artefacts here (default: the run folder)")
    p.add_argument("--fold", type=int,
                   help="fold of the split file (default: train_metrics.json's 'fold' or 0)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (1000)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - CI level (0.05)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap / sampling seed (0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.5,
                   help="operating point on the disease probability (0.5)")
    p.add_argument("--target-sensitivity", type=float, default=0.95,
                   help="report the threshold reaching this sensitivity (0.95)")
    p.add_argument("--negative", help="depth-1 class meaning 'normal' (default: guessed)")
    p.add_argument("--ordered", action="store_true",
                   help="leaf classes are an ordered scale (adds quadratic-weighted kappa)")
    p.add_argument("--bins", type=int, default=15, help="calibration bins (15)")
    p.add_argument("--gradcam", type=int, default=8,
                   help="test images with Grad-CAM heatmaps (8; 0 to skip)")
    p.add_argument("--examples", type=int, default=12,
                   help="misclassified test images shown in the report (12)")
    g = p.add_argument_group(
        "test-time augmentation", "average each test and validation image over flipped "
        "(and optionally randomly rotated/zoomed) copies; recorded in metrics.json as 'tta'")
    g.add_argument("--tta", metavar="FLIPS",
                   choices=("horizontal", "vertical", "horizontal_and_vertical", "none"),
                   help="turn TTA on with these flip views: horizontal (2 views), vertical "
                        "(2), horizontal_and_vertical (4) or none (random views only)")
    g.add_argument("--tta-n", type=int, metavar="N",
                   help="views per image (default: every flip view); more than the flip "
                        "views needs --tta-rotation and/or --tta-zoom")
    g.add_argument("--tta-rotation", type=float, metavar="F",
                   help="random rotation of the extra views (fraction of a full turn)")
    g.add_argument("--tta-zoom", type=float, metavar="F",
                   help="random zoom of the extra views (fraction)")
    g.add_argument("--tta-seed", type=int, metavar="S", help="seed of the random views (0)")
    p.set_defaults(func=cmd_evaluate)
    add_compare_parsers(subparsers)
    return p


_TTA_FLAGS = {"tta_n": "n", "tta_rotation": "rotation", "tta_zoom": "zoom",
              "tta_seed": "seed"}


def tta_from_args(args):
    """The TTA options of ``--tta``/``--tta-*`` (``None`` when ``--tta`` is not given)."""
    given = {opt: getattr(args, flag) for flag, opt in _TTA_FLAGS.items()
             if getattr(args, flag, None) is not None}
    if getattr(args, "tta", None) is None:
        if given:
            flags = ", ".join(f"--tta-{k}" for k in given)
            raise ConfigError(f"{flags}: needs --tta FLIPS to turn test-time augmentation on "
                              "(e.g. --tta horizontal, or --tta none with --tta-n and "
                              "--tta-rotation for random views only)")
        return None
    try:
        return tta_options({"flips": args.tta, **given}, "--tta")
    except ConfigError as exc:
        msg = str(exc)
        for opt in _TTA_FLAGS.values():
            msg = msg.replace(f"--tta.{opt}:", f"--tta-{opt}:")
        raise ConfigError(msg) from None


def _external_sets(values) -> list[dict]:
    out = []
    for v in values:
        name, sep, source = v.partition("=")
        if not sep or not name or not source:
            raise ConfigError(f"--external {v!r}: use NAME=SOURCE, e.g. "
                              "--external site_b=data/site_b")
        out.append({"name": name, "source": os.path.abspath(source), "dedupe": True})
    if len({e["name"] for e in out}) != len(out):
        raise ConfigError(f"--external: names must differ, got {[e['name'] for e in out]}")
    return out


def cmd_evaluate(args) -> int:
    tta = tta_from_args(args)
    external = _external_sets(args.external)
    if args.exclude_training and not args.test:
        raise ConfigError("--exclude-training goes with --test SOURCE (the run's own test "
                          "split never holds copies of training images)")

    # writing into the run folder (no --out elsewhere): one writer at a time (issue 21)
    writes_run = not args.out or os.path.realpath(args.out) == os.path.realpath(args.run_dir)
    lock = run_lock(args.run_dir, "kmedtl evaluate", create=False) if writes_run else \
        nullcontext()
    with lock:
        doc = evaluate_run(args.run_dir, test=args.test, out=args.out, fold=args.fold,
                           n_boot=args.n_boot, alpha=args.alpha, seed=args.seed,
                           batch_size=args.batch_size, threshold=args.threshold,
                           target_sensitivity=args.target_sensitivity,
                           negative=args.negative, ordered=args.ordered, n_bins=args.bins,
                           n_gradcam=args.gradcam, n_examples=args.examples, tta=tta,
                           exclude_training=args.exclude_training, external=external)
    print(f"evaluated {doc['test']['n']} test images ({doc['test']['source']}); "
          f"{len(doc['test']['skipped'])} skipped")
    if doc.get("tta"):
        print(f"test-time augmentation: {doc['tta']['n']} views per image "
              f"(flips {doc['tta']['flips']}, {doc['tta']['random_views']} random)")
    for name, ci in doc["headline"].items():
        print(f"  {name:<18} {format_interval(ci)}")
    for row in doc.get("internal_vs_external", [])[1:]:
        print(f"{row['set']} ({row['n']} images): {row['text']}")
    out = args.out or args.run_dir
    print(f"wrote metrics.json, report.html, model_card.md/.json and "
          f"{len(doc['artefacts']['plots'])} plot(s) to {out}")
    return 0
