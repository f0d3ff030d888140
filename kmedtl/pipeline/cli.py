"""``kmedtl run PIPELINE.yaml``: the whole pipeline, resumable.

The CLI owner wires it in with::

    from kmedtl.pipeline.cli import add_parsers as add_run_parsers
    add_run_parsers(sub)   # sub = parser.add_subparsers(...)

Config problems raise :class:`~kmedtl.errors.KmedtlError` subclasses, which
``kmedtl.cli.main`` prints and turns into exit code 2.
"""

from __future__ import annotations

from kmedtl.pipeline.runner import run_pipeline
from kmedtl.pipeline.spec import STAGES, parse_set


def cmd_run(args) -> int:
    res = run_pipeline(args.pipeline, run_dir=args.run_dir, force=args.force or (),
                       until=args.until, overrides=parse_set(args.set))
    s = res.summary
    for row in s.get("stages", []):
        if row["stage"] in res.stages:
            secs = f"{row['seconds']:.1f} s" if row.get("seconds") is not None else "-"
            if row["this_call"] == "reused":
                secs = f"(ran in {secs}, {row.get('finished')})"
            print(f"{row['stage']:<9} {row['this_call']:<8} {secs}")
    print(f"{s.get('status')}: {res.summary_md}")
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
    r.set_defaults(func=cmd_run)
