"""``python -m kmedtl.study STUDY.yaml [...]``: run the grid, then write RESULTS.md.

The cells train in worker processes replaced after every ``--cells-per-process`` cells
(default :data:`kmedtl.study.runner.CELLS_PER_PROCESS`; 0 = in this process), which keeps
a long study's memory bounded; see :mod:`kmedtl.study.runner`.  ``--executor dask
--scheduler HOST:PORT`` sends the cells to a Dask cluster instead
(:mod:`kmedtl.study.dask_executor`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kmedtl.errors import ConfigError, KmedtlError
from kmedtl.study.config import load_study
from kmedtl.study.report import plot_learning_curves, write_report
from kmedtl.study.runner import CELLS_PER_PROCESS, StudyRunner


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kmedtl.study",
        description="Run study grids (arms x N per class x seeds) and write RESULTS.md.")
    p.add_argument("studies", nargs="+", help="study YAML files (pipelines/study_*.yaml); run "
                   "together they share one split and identical cells")
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study)")
    p.add_argument("--resume", action="store_true", help="skip cells already finished")
    p.add_argument("--overwrite", action="store_true", help="train finished cells again")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new cell after this many minutes (the rest: --resume)")
    p.add_argument("--results", default=None, help="where to write RESULTS.md (default: the "
                   "first study's results: field, else <out>/RESULTS.md)")
    p.add_argument("--report-only", action="store_true", help="train nothing; only write "
                   "RESULTS.md from the finished cells")
    p.add_argument("--no-plots", action="store_true", help="skip learning-curve PNGs")
    p.add_argument("--cells-per-process", type=_cells_per_process,
                   default=_default_cells_per_process(), metavar="K",
                   help="train the cells in a worker process that is replaced by a fresh one "
                   "after every K cells, so memory that TensorFlow keeps per cell goes back "
                   "to the system; a worker that dies (e.g. OOM-killed) fails only its cell, "
                   "which the next --resume retries (default "
                   f"{_default_cells_per_process()}; 0: every cell in this process, whose "
                   "memory grows over a long run; lower K if cells die of memory)")
    p.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="where the cells train: local (this machine's worker processes, "
                   "default) or dask (the workers of the Dask scheduler at --scheduler, each "
                   "training in a child process replaced after --cells-per-process cells)")
    p.add_argument("--scheduler", metavar="HOST:PORT", default=None,
                   help="address of a running `dask scheduler` (with --executor dask); its "
                   "workers need kmedtl and the study's data at the same paths")
    return p


def _executor(args):
    """The ``executor`` of :meth:`StudyRunner.run` the flags ask for (None: local)."""
    if args.executor != "dask":
        if args.scheduler is not None:
            raise ConfigError("--scheduler needs --executor dask")
        return None
    if args.scheduler is None:
        raise ConfigError("--executor dask needs --scheduler HOST:PORT of a running "
                          "`dask scheduler` (start one with `dask scheduler`, and workers "
                          "with `dask worker HOST:PORT --nthreads 1`)")
    # lazy: dask is an optional extra (kmedtl[dask]); its ImportError names the pip command
    from kmedtl.study.dask_executor import DaskExecutor

    return DaskExecutor(args.scheduler, cells_per_process=args.cells_per_process)


def _default_cells_per_process() -> int:
    return CELLS_PER_PROCESS


def _cells_per_process(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return k


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    try:
        executor = None if args.report_only else _executor(args)
        studies = [c for p in args.studies for c in load_study(p)]
        runner = StudyRunner(studies, args.out)
        if args.report_only:
            runner.plan()
        else:
            status = runner.run(resume=args.resume, overwrite=args.overwrite,
                                max_minutes=args.max_minutes,
                                cells_per_process=args.cells_per_process,
                                executor=executor)
            total = status["planned_unique"] - status["not_applicable"]
            print(f"study: {status['done']} of {total} cells done ({status['ran_now']} now, "
                  f"{status['failed_now']} failed, "
                  f"{status['stopped_by_budget']} left by the time budget)")
        results = args.results or studies[0].results or str(Path(args.out) / "RESULTS.md")
        cmd = "python -m kmedtl.study " + " ".join(
            str(Path(p)) for p in args.studies) + f" --out {args.out}"
        path = write_report(runner, results, command=cmd)
        print(f"report: {path}")
        if not args.no_plots:
            for p in plot_learning_curves(runner, args.out):
                print(f"plot: {p}")
    except KmedtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
