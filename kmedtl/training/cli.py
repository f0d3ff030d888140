"""``kmedtl train``, ``kmedtl tune`` and ``kmedtl lr-find``.

The CLI owner wires them in with::

    from kmedtl.training.cli import add_parsers
    add_parsers(sub)   # sub = parser.add_subparsers(...)

Each handler takes the parsed ``argparse.Namespace`` and returns an exit code (0 ok);
config problems raise :class:`~kmedtl.errors.KmedtlError` subclasses, which
``kmedtl.cli.main`` prints and turns into exit code 2.
"""

from __future__ import annotations

import argparse
import json


def _config(path):
    from kmedtl.config import load_config

    return load_config(path)


def cmd_train(args) -> int:
    from kmedtl.training.run import run_training

    cfg = _config(args.config)
    result = run_training(cfg, args.run_dir, epochs=args.epochs, overwrite=args.overwrite,
                          label=args.config, fold=args.fold)
    if isinstance(result, dict):  # staged workflow
        print(json.dumps({"val": result.get("val_metrics"), "train": result.get("train_metrics")},
                         indent=1))
        return 0
    print(f"trained {len(result.epochs)} epoch(s) in {result.run_dir}; best {result.monitor} = "
          f"{result.best_value} at epoch {result.best_epoch}")
    if result.val_metrics:
        print("val: " + ", ".join(f"{k} {v:.4g}" for k, v in result.val_metrics.items()
                                  if isinstance(v, float)))
    return 0


def cmd_tune(args) -> int:
    from kmedtl.training.run import run_tuning

    cfg = _config(args.config)
    overwrite = True if args.overwrite else (False if args.resume else None)
    res = run_tuning(cfg, args.run_dir, label=args.config, overwrite=overwrite,
                     max_trials=args.max_trials, tuner=args.tuner, epochs=args.epochs,
                     verbose=args.verbose)
    if res.role == "worker":
        print("worker finished; the chief writes the results")
        return 0
    print(f"objective {res.objective} ({res.direction}); best hyper-parameters: "
          f"{json.dumps(res.best_hyperparameters)}")
    for key, path in res.files.items():
        print(f"wrote {key}: {path}")
    return 0


def cmd_lr_find(args) -> int:
    from kmedtl.training.run import run_lr_find

    cfg = _config(args.config)
    result, png = run_lr_find(cfg, args.out, steps=args.steps, start_lr=args.start_lr,
                              end_lr=args.end_lr, label=args.config)
    print(f"suggested learning rate {result.suggestion:.3g} ({result.method}; steepest "
          f"{result.steepest}, min/10 {result.min10:.3g}); wrote {png}")
    return 0


def add_parsers(subparsers) -> None:
    """Register ``train``, ``tune`` and ``lr-find`` on an ``add_subparsers()`` object."""
    t = subparsers.add_parser("train", help="train the configured model; writes runs/<name>/")
    t.add_argument("config", help="YAML run config")
    t.add_argument("--epochs", type=int, help="override train.epochs")
    t.add_argument("--run-dir", help="run folder (default: <output_dir>/<name>)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in the run folder")
    t.add_argument("--fold", type=int, default=0,
                   help="fold of a k-fold / repeated split to train on (default 0)")
    t.set_defaults(func=cmd_train)

    u = subparsers.add_parser("tune", help="KerasTuner search over train.tune")
    u.add_argument("config", help="YAML run config")
    u.add_argument("--max-trials", type=int, help="override train.tune.max_trials")
    u.add_argument("--tuner", choices=("random", "hyperband", "bayesian"),
                   help="override train.tune.tuner")
    u.add_argument("--epochs", type=int, help="epochs per trial (train.tune.epochs)")
    u.add_argument("--run-dir", help="run folder (default: <output_dir>/<name>)")
    g = u.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="start the search afresh")
    g.add_argument("--resume", action="store_true", help="continue a previous search")
    u.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    u.set_defaults(func=cmd_tune)

    f = subparsers.add_parser("lr-find", help="learning-rate range test; writes a PNG")
    f.add_argument("config", help="YAML run config")
    f.add_argument("--out", help="PNG path (default: <output_dir>/<name>/lr_find.png)")
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--start-lr", type=float, default=1e-7)
    f.add_argument("--end-lr", type=float, default=10.0)
    f.set_defaults(func=cmd_lr_find)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with just these commands (tests, scripts)."""
    p = argparse.ArgumentParser(prog="kmedtl")
    add_parsers(p.add_subparsers(dest="command", required=True))
    return p
