"""The ``kmedtl`` command: one subcommand per stage.

    kmedtl data audit SOURCE [--json OUT]      counts, bad files, duplicates, patient overlap
    kmedtl data cache SOURCE [--cache-dir D]   decode every image once (process pool)
    kmedtl data show FILE --out PNG            what the model will see + header summary
    kmedtl data split CONFIG --out FILE        leakage-free split file

SOURCE is a folder-per-class tree, a CSV manifest or a YAML config.  Exit codes: 0 ok,
1 data problems in --strict mode, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# TensorFlow's C++ start-up banner (oneDNN, CUDA probing) is noise on a command line; a
# user who wants it sets TF_CPP_MIN_LOG_LEVEL themselves.  Set before anything imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kmedtl import __version__  # noqa: E402
from kmedtl.errors import KmedtlError  # noqa: E402

log = logging.getLogger("kmedtl")


def _source_config(args):
    """A Config from SOURCE (yaml / folder / csv) plus command-line overrides."""
    from kmedtl.config import load_config

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
    if getattr(args, "size", None):
        d.image.size = args.size
    if getattr(args, "channels", None):
        d.image.channels = args.channels
    if getattr(args, "window", None):
        d.dicom.window = _window_arg(args.window)
    if getattr(args, "frames", None):
        d.dicom.frames = args.frames
    if getattr(args, "cache_dir", None):
        d.cache_dir = args.cache_dir
    if getattr(args, "no_cache", False):
        d.cache_dir = None
    if getattr(args, "strict", False):
        d.strict = True
    if getattr(args, "workers", None):
        d.workers = args.workers
    if getattr(args, "near_threshold", None) is not None:
        cfg.split.near_threshold = args.near_threshold
    # re-validate the overridden values through the typed model
    return load_config(cfg.model_dump(mode="json"))


def _window_arg(value: str):
    if "," in value:
        c, w = value.split(",", 1)
        return (float(c), float(w))
    return value


def cmd_audit(args) -> int:
    from kmedtl.data.audit import audit, dicom_patients, format_summary, public
    from kmedtl.data.prepare import load_index

    cfg = _source_config(args)
    index, hierarchy = load_index(cfg)
    report = audit(index, cfg.image_options(), cache_dir=cfg.data.cache_dir,
                   workers=cfg.data.workers, near_threshold=cfg.split.near_threshold,
                   progress=None, hierarchy=hierarchy, patients=dicom_patients(index))
    print(format_summary(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(public(report), fh, indent=1)
        print(f"wrote {args.json}")
    if cfg.data.strict and report["skipped"]:
        print(f"strict: {len(report['skipped'])} file(s) skipped", file=sys.stderr)
        return 1
    return 0


def cmd_cache(args) -> int:
    from kmedtl.data.cache import build_cache
    from kmedtl.data.prepare import load_index

    cfg = _source_config(args)
    if not cfg.data.cache_dir:
        raise KmedtlError("data cache: no cache folder (set data.cache_dir or --cache-dir)")
    index, _ = load_index(cfg)
    res = build_cache(index, cfg.image_options(), cfg.data.cache_dir, cfg.data.workers)
    counts = index.drop(res.skipped).counts()
    print(f"cache {res.folder}: {len(res.files)} images ({res.decoded} decoded, {res.reused} "
          f"reused), skipped {len(res.skipped)}")
    print(f"read {counts['read']} = used {counts['used']} + skipped {counts['skipped']}")
    for s in index.skipped + res.skipped:
        print(f"  skipped {s.path}: {s.reason}")
    return 1 if cfg.data.strict and (index.skipped or res.skipped) else 0


def cmd_show(args) -> int:
    from kmedtl.data.options import ImageOptions
    from kmedtl.data.render import render

    opts = ImageOptions(size=args.size or 224, channels=args.channels or 1,
                        window=_window_arg(args.window or "header"),
                        frames=args.frames or "middle", resize=args.resize)
    summary = render(args.file, args.out, opts, frame=args.frame)
    print(json.dumps(summary, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


def cmd_split(args) -> int:
    from kmedtl.config import load_config
    from kmedtl.data.prepare import prepare

    cfg = load_config(args.config)
    prep = prepare(cfg, workers=args.workers)
    prep.splits.save(args.out, root=prep.index.root)
    for i, f in enumerate(prep.splits.folds):
        print(f"fold {i}: train {len(f.train)}, val {len(f.val)}, test {len(f.test)}")
    print(f"dropped {len(prep.splits.dropped)} leaking sample(s); wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kmedtl", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"kmedtl {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="dataset stages: audit, cache, show, split")
    dsub = data.add_subparsers(dest="data_command", required=True)

    def common(sp, cache_default=True):
        sp.add_argument("source", help="folder-per-class tree, CSV manifest or YAML config")
        sp.add_argument("--hierarchy", help="label tree YAML (default: flat, from the labels)")
        sp.add_argument("--extra-columns", nargs="*", help="manifest image columns")
        sp.add_argument("--size", type=int)
        sp.add_argument("--channels", type=int, choices=(1, 3))
        sp.add_argument("--window", help="header, percentile, minmax, a preset or C,W")
        sp.add_argument("--frames", choices=("first", "middle", "all"))
        sp.add_argument("--cache-dir")
        sp.add_argument("--workers", type=int)
        sp.add_argument("--strict", action="store_true", help="exit 1 if any file is skipped")

    a = dsub.add_parser("audit", help="counts, undecodable files, duplicates, overlap")
    common(a)
    a.add_argument("--json", help="write the full report here")
    a.add_argument("--near-threshold", type=int, help="pHash bits for near duplicates")
    a.add_argument("--no-cache", action="store_true", help="do not write the image cache")
    a.set_defaults(func=cmd_audit)
    c = dsub.add_parser("cache", help="decode every image once into the cache")
    common(c)
    c.set_defaults(func=cmd_cache)
    s = dsub.add_parser("show", help="render what the model sees, with a header summary")
    s.add_argument("file")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--size", type=int)
    s.add_argument("--channels", type=int, choices=(1, 3))
    s.add_argument("--window")
    s.add_argument("--frames", choices=("first", "middle", "all"))
    s.add_argument("--frame", type=int)
    s.add_argument("--resize", default="pad", choices=("pad", "crop", "stretch"))
    s.set_defaults(func=cmd_show)
    sp = dsub.add_parser("split", help="write a leakage-free split file")
    sp.add_argument("config")
    sp.add_argument("--out", required=True)
    sp.add_argument("--workers", type=int)
    sp.set_defaults(func=cmd_split)

    # Later stages register their own subcommands (importing their packages loads Keras,
    # a few seconds of start-up for every subcommand; acceptable next to any real stage).
    from kmedtl.evaluation.cli import add_parsers as add_evaluate_parsers
    from kmedtl.training.cli import add_parsers as add_training_parsers

    add_training_parsers(sub)
    add_evaluate_parsers(sub)
    from kmedtl.export.cli import add_parsers as add_export_parsers

    add_export_parsers(sub)
    from kmedtl.run.cli import add_parsers as add_run_parsers

    add_run_parsers(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KmedtlError as exc:
        print(f"kmedtl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
