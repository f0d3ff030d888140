"""``kmedtl run PIPELINE.yaml``: the whole pipeline, resumable.

The CLI owner wires it in with::

    from kmedtl.pipeline.cli import add_parsers as add_run_parsers
    add_run_parsers(sub)   # sub = parser.add_subparsers(...)

Config problems raise :class:`~kmedtl.errors.KmedtlError` subclasses, which
``kmedtl.cli.main`` prints and turns into exit code 2.
"""

from __future__ import annotations

from kmedtl.errors import ConfigError
from kmedtl.pipeline.runner import FOLDS_UNTIL, format_folds, run_folds, run_pipeline
from kmedtl.pipeline.spec import STAGES, parse_set


def _print_stages(res) -> None:
    s = res.summary
    for row in s.get("stages", []):
        if row["stage"] in res.stages:
            secs = f"{row['seconds']:.1f} s" if row.get("seconds") is not None else "-"
            if row["this_call"] == "reused":
                secs = f"(ran in {secs}, {row.get('finished')})"
            print(f"{row['stage']:<9} {row['this_call']:<8} {secs}")
    print(f"{s.get('status')}: {res.summary_md}")


def cmd_folds(args) -> int:
    if args.until not in (None, FOLDS_UNTIL):
        raise ConfigError(f"--until {args.until}: with --folds every fold runs until "
                          f"{FOLDS_UNTIL} (the folds are compared on their metrics.json)")
    res = run_folds(args.pipeline, args.folds, run_dir=args.run_dir, force=args.force or (),
                    overrides=parse_set(args.set))
    for k, r in res.results.items():
        print(f"--- fold {k}: {r.run_dir}")
        _print_stages(r)
    print(f"\nmean \u00b1 sd over folds {res.folds} (all metrics: {res.json_path})")
    print(format_folds(res.aggregate))
    return 0


def cmd_run(args) -> int:
    if args.folds is not None:
        return cmd_folds(args)
    res = run_pipeline(args.pipeline, run_dir=args.run_dir, force=args.force or (),
                       until=args.until, overrides=parse_set(args.set))
    _print_stages(res)
    return 0


def add_parsers(subparsers) -> None:
    """Register ``run`` on an ``add_subparsers()`` object."""
    r = subparsers.add_parser(
        "run", help="run a pipeline YAML end to end (audit, split, pretrain, tune, train, "
                    "evaluate, export, push); reruns skip finished stages")
    r.add_argument("pipeline", help="pipeline YAML: a run config plus a pipeline: section")
    r.add_argument("--run-dir", help="run folder (default: <output_dir>/<name>)")
    r.add_argument("--force", action="append", choices=(*STAGES, "all"), metavar="STAGE",
                   help="rerun STAGE and every stage after it even if up to date "
                        "(repeatable; 'all' reruns everything)")
    r.add_argument("--until", choices=STAGES, metavar="STAGE",
                   help="stop after STAGE")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (YAML value)")
    r.add_argument("--folds", metavar="all|K,K",
                   help="cross-validation: run every fold ('all') or the listed ones "
                        "(split.method kfold or repeated), each in <run>/folds/fold_K/ until "
                        "evaluate, and write <run>/folds/folds.json (mean \u00b1 sd of each "
                        "metric over the folds, per-fold rows)")
    r.set_defaults(func=cmd_run)
