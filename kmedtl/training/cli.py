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
import os

from kmedtl.config import parse_set
from kmedtl.training import data_parallel as dp
from kmedtl.training.config import load_run_config
from kmedtl.training.learning_curve import METRICS, parse_sizes, run_learning_curve
from kmedtl.training.stage import run_lr_find, run_training, run_tuning


def _config(path):  # every section, train included, validated here, once
    return load_run_config(path)


def _cluster_env(args) -> None:
    """``--coordinator/--num-processes/--process-id`` -> ``$KMEDTL_*`` (read, validated,
    by :func:`kmedtl.training.data_parallel.cluster_from` when training starts)."""
    for value, name in ((getattr(args, "coordinator", None), dp.ENV_COORDINATOR),
                        (getattr(args, "num_processes", None), dp.ENV_NUM_PROCESSES),
                        (getattr(args, "process_id", None), dp.ENV_PROCESS_ID)):
        if value is not None:
            os.environ[name] = str(value)


def cmd_train(args) -> int:
    _cluster_env(args)
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
    cfg = _config(args.config)
    result, png = run_lr_find(cfg, args.out, steps=args.steps, start_lr=args.start_lr,
                              end_lr=args.end_lr, label=args.config)
    print(f"suggested learning rate {result.suggestion:.3g} ({result.method}; steepest "
          f"{result.steepest}, min/10 {result.min10:.3g}); wrote {png}")
    return 0


def _config_with_overrides(path, items):
    """The run config at ``path`` with ``--set KEY=VALUE`` overrides merged in."""
    return load_run_config(path, overrides=parse_set(items))


def cmd_learning_curve(args) -> int:
    sizes = parse_sizes(args.n)
    cfg = _config_with_overrides(args.config, args.set)
    res = run_learning_curve(cfg, sizes, args.seeds, out=args.out, fold=args.fold,
                             metric=args.metric, label=args.config)
    print(res["markdown"], end="")
    for kind in ("csv", "json", "md", "png"):
        print(f"wrote {res['files'][kind]}")
    return 0


def _seeds(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of seeds") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give at least 1 seed")
    return n


def add_parsers(subparsers) -> None:
    """Register ``train``, ``tune``, ``lr-find`` and ``learning-curve`` on an
    ``add_subparsers()`` object."""
    t = subparsers.add_parser("train", help="train the configured model; writes runs/<name>/")
    t.add_argument("config", help="YAML run config")
    t.add_argument("--epochs", type=int, help="override train.epochs")
    t.add_argument("--run-dir", help="run folder (default: <output_dir>/<name>)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in the run folder")
    t.add_argument("--fold", type=int, default=0,
                   help="fold of a k-fold / repeated split to train on (default 0)")
    d = t.add_argument_group(
        "data-parallel (train.distribution: {kind: data_parallel}, KERAS_BACKEND=jax)")
    d.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0, the same on every process "
                        "(default $KMEDTL_COORDINATOR)")
    d.add_argument("--num-processes", type=int, metavar="N",
                   help="processes in all (default $KMEDTL_NUM_PROCESSES, else 1)")
    d.add_argument("--process-id", type=int, metavar="I",
                   help="this process, 0..N-1; 0 writes the run folder "
                        "(default $KMEDTL_PROCESS_ID, else 0)")
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

    c = subparsers.add_parser(
        "learning-curve", help="test metric against training images per class, over seeds",
        description="Train the config's model on N images per class of its training split "
                    "(nested subsets per seed) and score the fixed test split; writes "
                    "learning_curve.csv/.json/.md/.png into the run folder (or --out).")
    c.add_argument("config", help="YAML run config")
    c.add_argument("--n", required=True, metavar="N,N,...",
                   help="images per class, comma-separated; 'all' = the whole training "
                        "split, e.g. 25,50,100,all")
    c.add_argument("--seeds", type=_seeds, default=3,
                   help="seeds per size (train.seed, train.seed + 1, ...; default 3)")
    c.add_argument("--metric", choices=METRICS, default="balanced_accuracy",
                   help="test metric (default balanced_accuracy)")
    c.add_argument("--fold", type=int, default=0, help="fold of a k-fold split (default 0)")
    c.add_argument("--out", help="output folder (default: the run folder <output_dir>/<name>)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (YAML value)")
    c.set_defaults(func=cmd_learning_curve)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with just these commands (tests, scripts)."""
    p = argparse.ArgumentParser(prog="kmedtl")
    add_parsers(p.add_subparsers(dest="command", required=True))
    return p
