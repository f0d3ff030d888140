"""``kmedtl data``: the dataset subcommands.

    kmedtl data audit SOURCE [--json OUT]      counts, bad files, duplicates, patient overlap
    kmedtl data cache SOURCE [--cache-dir D]   decode every image once (process pool)
    ... cache|audit SOURCE --runner beam       the same work as Apache Beam jobs
    ... cache|audit SOURCE --runner dask --dask-scheduler HOST:PORT
                                               Beam's DaskRunner on a Dask cluster
    kmedtl data show FILE --out PNG            what the model will see + header summary
    kmedtl data split CONFIG --out FILE        leakage-free split file

SOURCE is a folder-per-class tree, a CSV manifest or a YAML config.  Exit codes: 0 ok,
1 data problems in --strict mode, 2 bad arguments or config, or data with nothing usable.

The root command (``kmedtl.cli``) wires it in with
``add_parsers(sub, load_config=load_config)``, passing the run config's loader.

``kmedtl.data`` sits below ``kmedtl.config`` and never imports it, yet SOURCE may be a
YAML config and ``data split`` takes one: the caller hands over the YAML -> config
resolution as ``load_config``, a callable that takes a YAML path or a config mapping and
returns the validated run config (``kmedtl.config.load_config``).  Only its ``data`` and
``split`` sections, ``image_options()`` and ``model_dump()`` are used here.

Nothing here imports TensorFlow or Keras; Apache Beam is imported only for
``--runner beam``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from kmedtl._text import printable
from kmedtl.data.audit import (
    audit,
    dicom_patients,
    format_summary,
    public,
    similarity_montage,
)
from kmedtl.data.cache import build_cache
from kmedtl.data.labels import LabelMismatchError, check_labels
from kmedtl.data.options import ImageOptions
from kmedtl.data.prepare import load_index, prepare, require_usable
from kmedtl.data.render import render
from kmedtl.errors import KmedtlError

#: YAML path or config mapping -> the validated run config (``kmedtl.config.load_config``).
LoadConfig = Callable[[str | Mapping[str, Any]], Any]


def image_size(value: str) -> int:
    """argparse type: an image size in pixels, 8..8192."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if not 8 <= n <= 8192:
        raise argparse.ArgumentTypeError(
            f"{n} is not an image size in pixels: use 8..8192 (as data.image.size)")
    return n


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be at least 1")
    return n


def window_arg(value: str):
    """``--window``: a mode or preset name, or ``C,W`` (centre, width)."""
    if "," in value:
        c, w = value.split(",", 1)
        return (float(c), float(w))
    return value


def source_config(args, load_config: LoadConfig):
    """A config from SOURCE (yaml / folder / csv) plus command-line overrides."""
    src = args.source
    if src.endswith((".yaml", ".yml")):
        cfg = load_config(src)
    else:
        data = {"source": "manifest" if src.endswith(".csv") else "folder"}
        data["manifest" if data["source"] == "manifest" else "root"] = os.path.abspath(src)
        cfg = load_config({"data": data})
    d = cfg.data
    if getattr(args, "hierarchy", None):
        d.hierarchy = os.path.abspath(args.hierarchy)
    if getattr(args, "extra_columns", None):
        d.extra_columns = args.extra_columns
    if getattr(args, "size", None) is not None:
        d.image.size = args.size
    if getattr(args, "channels", None) is not None:
        d.image.channels = args.channels
    if getattr(args, "window", None):
        d.dicom.window = window_arg(args.window)
    if getattr(args, "frames", None):
        d.dicom.frames = args.frames
    if getattr(args, "cache_dir", None):
        d.cache_dir = args.cache_dir
    if getattr(args, "no_cache", False):
        d.cache_dir = None
    if getattr(args, "strict", False):
        d.strict = True
    if getattr(args, "workers", None) is not None:
        d.workers = args.workers
    if getattr(args, "unknown_labels", None):
        d.unknown_labels = args.unknown_labels
    if getattr(args, "near_threshold", None) is not None:
        cfg.split.near_threshold = args.near_threshold
    if getattr(args, "similar_threshold", None) is not None:
        cfg.split.similar_threshold = args.similar_threshold
    # re-validate the overridden values through the typed model
    return load_config(cfg.model_dump(mode="json"))


def beam_runner(args) -> tuple[str, list[str]]:
    """``(runner, beam_options)`` for ``kmedtl.data.audit``/``build_cache_beam``:
    ``--runner dask`` (or ``--dask-scheduler`` with ``--runner beam``) is Beam with the
    DaskRunner, the scheduler's address in front of the caller's ``--beam-option`` flags
    (which win)."""
    scheduler = getattr(args, "dask_scheduler", None)
    if args.runner == "process":
        if scheduler:
            raise KmedtlError("--dask-scheduler needs --runner dask (the process pool runs "
                              "on this machine only)")
        return "process", list(args.beam_option)
    if args.runner == "dask" or scheduler:
        from kmedtl.data.beam import dask_flags  # lazy: Apache Beam is an optional extra

        return "beam", [*dask_flags(scheduler), *args.beam_option]
    return "beam", list(args.beam_option)


def cmd_audit(args, load_config: LoadConfig) -> int:
    cfg = source_config(args, load_config)
    runner, beam_options = beam_runner(args)
    index, hierarchy = load_index(cfg, allow_unlabelled=True,
                                  unlabelled=True if args.unlabelled else None)
    report = audit(index, cfg.image_options(), cache_dir=cfg.data.cache_dir,
                   workers=cfg.data.workers, near_threshold=cfg.split.near_threshold,
                   similar_threshold=cfg.split.similar_threshold,
                   progress=None, hierarchy=hierarchy, patients=dicom_patients(index),
                   runner=runner, beam_options=beam_options)
    print(format_summary(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(public(report), fh, indent=1)
        print(f"wrote {args.json}")
    if args.montage:
        similarity_montage(report, args.montage, cfg.image_options())
        print(f"wrote {args.montage}")
    used = report["_internal"]["index"]
    require_usable(report, index.root or args.source)  # raises: exit 2
    code = 0
    if hierarchy is not None:
        try:
            for note in check_labels(used, hierarchy, cfg.data.unknown_labels):
                print(note)
        except LabelMismatchError as exc:
            print(f"kmedtl: error: {printable(exc, keep_newlines=True)}", file=sys.stderr)
            code = 2
    problems = used.problems()
    if cfg.data.strict and problems:
        print(f"strict: {len(problems)} file(s) skipped", file=sys.stderr)
        code = code or 1
    return code


def cmd_cache(args, load_config: LoadConfig) -> int:
    cfg = source_config(args, load_config)
    if not cfg.data.cache_dir:
        raise KmedtlError("data cache: no cache folder (set data.cache_dir or --cache-dir)")
    runner, beam_options = beam_runner(args)
    index, _ = load_index(cfg)
    if runner == "beam":
        # lazy: Apache Beam is an optional extra (pip install 'kmedtl[beam]')
        from kmedtl.data.beam import build_cache_beam

        res = build_cache_beam(index, cfg.image_options(), cfg.data.cache_dir,
                               beam_options=beam_options, workers=cfg.data.workers)
    else:
        res = build_cache(index, cfg.image_options(), cfg.data.cache_dir, cfg.data.workers)
    counts = index.drop(res.skipped).counts()
    print(f"cache {res.folder}: {len(res.files)} images ({res.decoded} decoded, {res.reused} "
          f"reused, {res.rebuilt} rebuilt), skipped {len(res.skipped)}")
    print(f"read {counts['read']} = used {counts['used']} + skipped {counts['skipped']}")
    for s in index.skipped + res.skipped:
        print(f"  skipped {printable(s.path)}: {printable(s.reason)}")
    problems = index.drop(res.skipped).problems()
    return 1 if cfg.data.strict and problems else 0


def cmd_show(args) -> int:
    opts = ImageOptions(size=args.size or 224, channels=args.channels or 1,
                        window=window_arg(args.window or "header"),
                        frames=args.frames or "middle", resize=args.resize)
    summary = render(args.file, args.out, opts, frame=args.frame)
    print(json.dumps(summary, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


def cmd_split(args, load_config: LoadConfig) -> int:
    cfg = load_config(args.config)
    prep = prepare(cfg, workers=args.workers)
    prep.splits.save(args.out, root=prep.index.root)
    for i, f in enumerate(prep.splits.folds):
        print(f"fold {i}: train {len(f.train)}, val {len(f.val)}, test {len(f.test)}")
    print(f"dropped {len(prep.splits.dropped)} leaking sample(s); wrote {args.out}")
    return 0


def _common(sp) -> None:
    sp.add_argument("source", help="folder-per-class tree, CSV manifest or YAML config")
    sp.add_argument("--hierarchy", help="label tree YAML (default: flat, from the labels)")
    sp.add_argument("--extra-columns", nargs="*", help="manifest image columns")
    sp.add_argument("--size", type=image_size, help="image size in pixels (8..8192)")
    sp.add_argument("--channels", type=int, choices=(1, 3))
    sp.add_argument("--window", help="header, percentile, minmax, a preset or C,W")
    sp.add_argument("--frames", choices=("first", "middle", "all"))
    sp.add_argument("--cache-dir")
    sp.add_argument("--workers", type=positive_int)
    sp.add_argument("--strict", action="store_true",
                    help="exit 1 if any file is skipped (metadata and documentation aside)")
    sp.add_argument("--unknown-labels", choices=("error", "skip"),
                    help="labels not in --hierarchy: error (default) or skip them")


def add_parsers(subparsers, *, load_config: LoadConfig) -> argparse.ArgumentParser:
    """Register ``data`` (audit, cache, show, split) on an ``add_subparsers()`` object.

    ``load_config``: YAML path or config mapping -> the validated run config (the
    caller's ``kmedtl.config.load_config``; see the module docstring).  Each command's
    ``func`` takes the parsed arguments only.  Returns the ``data`` parser.
    """
    data = subparsers.add_parser("data", help="dataset stages: audit, cache, show, split")
    dsub = data.add_subparsers(dest="data_command", required=True)

    a = dsub.add_parser("audit", help="counts, undecodable files, duplicates, overlap")
    _common(a)
    a.add_argument("--json", help="write the full report here")
    a.add_argument("--near-threshold", type=int, help="pHash bits for near duplicates")
    a.add_argument("--similar-threshold", type=float,
                   help="thumbnail correlation for similar content (default 0.935)")
    a.add_argument("--montage", metavar="PNG",
                   help="draw the image pairs just above and just below the similarity "
                        "threshold here, to judge it by eye")
    a.add_argument("--no-cache", action="store_true", help="do not write the image cache")
    a.add_argument("--unlabelled", action="store_true",
                   help="treat every file under SOURCE as an unlabelled image (a PACS "
                        "export); automatic when SOURCE holds files but no folders")
    a.set_defaults(func=partial(cmd_audit, load_config=load_config))
    c = dsub.add_parser("cache", help="decode every image once into the cache")
    _common(c)
    c.set_defaults(func=partial(cmd_cache, load_config=load_config))
    for sp_ in (a, c):
        sp_.add_argument("--runner", choices=("process", "beam", "dask"), default="process",
                         help="process pool (default), Apache Beam (pip install "
                              "'kmedtl[beam]'; DirectRunner unless --beam-option says else) "
                              "or dask: Beam's DaskRunner on --dask-scheduler (a "
                              "LocalCluster without it)")
        sp_.add_argument("--dask-scheduler", metavar="HOST:PORT",
                         help="address of a running `dask scheduler` (tcp://HOST:PORT); "
                              "its workers need kmedtl and the data and --cache-dir at the "
                              "same paths")
        sp_.add_argument("--beam-option", action="append", default=[], metavar="FLAG",
                         help="a Beam pipeline flag, repeatable, e.g. --beam-option="
                              "--runner=FlinkRunner --beam-option=--flink_master=HOST:8081, "
                              "--beam-option=--dask_partition_size=16")
    s = dsub.add_parser("show", help="render what the model sees, with a header summary")
    s.add_argument("file")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--size", type=image_size, help="model input size in pixels (8..8192)")
    s.add_argument("--channels", type=int, choices=(1, 3))
    s.add_argument("--window")
    s.add_argument("--frames", choices=("first", "middle", "all"))
    s.add_argument("--frame", type=int)
    s.add_argument("--resize", default="pad", choices=("pad", "crop", "stretch"))
    s.set_defaults(func=cmd_show)
    sp = dsub.add_parser("split", help="write a leakage-free split file")
    sp.add_argument("config")
    sp.add_argument("--out", required=True)
    sp.add_argument("--workers", type=positive_int)
    sp.set_defaults(func=partial(cmd_split, load_config=load_config))
    return data
