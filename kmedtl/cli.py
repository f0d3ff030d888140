"""The ``kmedtl`` command: one subcommand per stage.

    kmedtl data audit SOURCE [--json OUT]      counts, bad files, duplicates, patient overlap
    kmedtl data cache SOURCE [--cache-dir D]   decode every image once (process pool)
    kmedtl data show FILE --out PNG            what the model will see + header summary
    kmedtl data split CONFIG --out FILE        leakage-free split file

SOURCE is a folder-per-class tree, a CSV manifest or a YAML config.  Exit codes: 0 ok,
1 data problems in --strict mode, 2 bad arguments or config, or data with nothing usable.

The data commands (and ``weights``) import neither TensorFlow nor Keras: the stage
subcommands (train, evaluate, export, predict, run ...) are registered only when the
command line names one of them (or asks for the full list, ``kmedtl --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

# TensorFlow's C++ start-up banner (oneDNN, CUDA probing) is noise on a command line; a
# user who wants it sets TF_CPP_MIN_LOG_LEVEL themselves.  Set before anything imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kmedtl import __version__  # noqa: E402
from kmedtl.errors import KmedtlError  # noqa: E402

log = logging.getLogger("kmedtl")

#: Subcommands that need neither TensorFlow nor Keras.
LIGHT_COMMANDS = ("data", "weights")
#: Modules whose ``add_parsers(sub)`` register the stage subcommands.  Importing their
#: packages loads Keras and TensorFlow (seconds), so it happens only when needed.
STAGE_PARSERS = ("kmedtl.training.cli", "kmedtl.evaluation.cli", "kmedtl.export.cli",
                 "kmedtl.pipeline.cli")

#: TensorFlow's native start-up lines.  TF_CPP_MIN_LOG_LEVEL does not silence them: absl
#: writes everything logged before ``absl::InitializeLog()`` straight to stderr, and both
#: of TF's shared libraries log oneDNN/CUDA probing while loading.  Only these known lines
#: are dropped; anything else TF prints while starting goes through.
_STARTUP_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    rb"STDERR"
    rb"|I\d{4} [\d:. ]+\d+ \S+\.cc:\d+\] "
    rb"|[WE]\d{4} [\d:. ]+\d+ (cuda_\w+|cudart_stub|dso_loader|cpu_feature_guard"
    rb"|computation_placer|gpu_device|port)\.cc:\d+\] "
    rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate "
    rb"compiler flags\.$)")


@contextlib.contextmanager
def _filter_native_stderr():
    """Capture file descriptor 2 (C++ writes bypass ``sys.stderr``), then replay every line
    except the known start-up noise."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter (closed descriptor)
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().splitlines(keepends=True):
                if not _STARTUP_NOISE.match(line):
                    os.write(2, line)


def quiet_tensorflow_startup(verbose: bool = False) -> None:
    """Import TensorFlow and probe its devices with the native start-up lines filtered out
    (``--verbose`` keeps them).  Without TensorFlow (e.g. a JAX-only machine) nothing
    happens."""
    if verbose or "tensorflow" in sys.modules or \
            os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    with _filter_native_stderr():
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA probing logs its errors here
        except Exception:  # noqa: BLE001 - absent or broken TF: the command reports it
            pass


def _command(argv) -> str | None:
    """The subcommand on a command line (its first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def needs_stage_parsers(argv) -> bool:
    """False when the command line needs only the data/weights commands."""
    command = _command(argv)
    if command is None:
        return "--version" not in argv
    return command not in LIGHT_COMMANDS


def _image_size(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if not 8 <= n <= 8192:
        raise argparse.ArgumentTypeError(
            f"{n} is not an image size in pixels: use 8..8192 (as data.image.size)")
    return n


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be at least 1")
    return n


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
    if getattr(args, "size", None) is not None:
        d.image.size = args.size
    if getattr(args, "channels", None) is not None:
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
    if getattr(args, "workers", None) is not None:
        d.workers = args.workers
    if getattr(args, "unknown_labels", None):
        d.unknown_labels = args.unknown_labels
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
    from kmedtl.data.labels import LabelMismatchError, check_labels
    from kmedtl.data.prepare import load_index, require_usable

    cfg = _source_config(args)
    index, hierarchy = load_index(cfg, allow_unlabelled=True,
                                  unlabelled=True if args.unlabelled else None)
    report = audit(index, cfg.image_options(), cache_dir=cfg.data.cache_dir,
                   workers=cfg.data.workers, near_threshold=cfg.split.near_threshold,
                   progress=None, hierarchy=hierarchy, patients=dicom_patients(index),
                   runner=args.runner, beam_options=args.beam_option)
    print(format_summary(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(public(report), fh, indent=1)
        print(f"wrote {args.json}")
    used = report["_internal"]["index"]
    require_usable(report, index.root or args.source)  # raises: exit 2
    code = 0
    if hierarchy is not None:
        try:
            for note in check_labels(used, hierarchy, cfg.data.unknown_labels):
                print(note)
        except LabelMismatchError as exc:
            print(f"kmedtl: error: {exc}", file=sys.stderr)
            code = 2
    problems = used.problems()
    if cfg.data.strict and problems:
        print(f"strict: {len(problems)} file(s) skipped", file=sys.stderr)
        code = code or 1
    return code


def cmd_cache(args) -> int:
    from kmedtl.data.cache import build_cache
    from kmedtl.data.prepare import load_index

    cfg = _source_config(args)
    if not cfg.data.cache_dir:
        raise KmedtlError("data cache: no cache folder (set data.cache_dir or --cache-dir)")
    index, _ = load_index(cfg)
    if args.runner == "beam":
        from kmedtl.data.beam import build_cache_beam

        res = build_cache_beam(index, cfg.image_options(), cfg.data.cache_dir,
                               beam_options=args.beam_option, workers=cfg.data.workers)
    else:
        res = build_cache(index, cfg.image_options(), cfg.data.cache_dir, cfg.data.workers)
    counts = index.drop(res.skipped).counts()
    print(f"cache {res.folder}: {len(res.files)} images ({res.decoded} decoded, {res.reused} "
          f"reused), skipped {len(res.skipped)}")
    print(f"read {counts['read']} = used {counts['used']} + skipped {counts['skipped']}")
    for s in index.skipped + res.skipped:
        print(f"  skipped {s.path}: {s.reason}")
    problems = index.drop(res.skipped).problems()
    return 1 if cfg.data.strict and problems else 0


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


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The whole command line; given ``argv`` that names a data command (or ``weights``),
    the stage subcommands, whose packages import Keras/TensorFlow, are left out."""
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
        sp.add_argument("--size", type=_image_size, help="image size in pixels (8..8192)")
        sp.add_argument("--channels", type=int, choices=(1, 3))
        sp.add_argument("--window", help="header, percentile, minmax, a preset or C,W")
        sp.add_argument("--frames", choices=("first", "middle", "all"))
        sp.add_argument("--cache-dir")
        sp.add_argument("--workers", type=_positive_int)
        sp.add_argument("--strict", action="store_true",
                        help="exit 1 if any file is skipped (metadata and documentation aside)")
        sp.add_argument("--unknown-labels", choices=("error", "skip"),
                        help="labels not in --hierarchy: error (default) or skip them")

    a = dsub.add_parser("audit", help="counts, undecodable files, duplicates, overlap")
    common(a)
    a.add_argument("--json", help="write the full report here")
    a.add_argument("--near-threshold", type=int, help="pHash bits for near duplicates")
    a.add_argument("--no-cache", action="store_true", help="do not write the image cache")
    a.add_argument("--unlabelled", action="store_true",
                   help="treat every file under SOURCE as an unlabelled image (a PACS "
                        "export); automatic when SOURCE holds files but no folders")
    a.set_defaults(func=cmd_audit)
    c = dsub.add_parser("cache", help="decode every image once into the cache")
    common(c)
    c.set_defaults(func=cmd_cache)
    for sp_ in (a, c):
        sp_.add_argument("--runner", choices=("process", "beam"), default="process",
                         help="process pool (default) or Apache Beam (pip install "
                              "'kmedtl[beam]'; DirectRunner unless --beam-option says else)")
        sp_.add_argument("--beam-option", action="append", default=[], metavar="FLAG",
                         help="a Beam pipeline flag, repeatable, e.g. --beam-option="
                              "--runner=FlinkRunner --beam-option=--flink_master=HOST:8081")
    s = dsub.add_parser("show", help="render what the model sees, with a header summary")
    s.add_argument("file")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("--size", type=_image_size, help="model input size in pixels (8..8192)")
    s.add_argument("--channels", type=int, choices=(1, 3))
    s.add_argument("--window")
    s.add_argument("--frames", choices=("first", "middle", "all"))
    s.add_argument("--frame", type=int)
    s.add_argument("--resize", default="pad", choices=("pad", "crop", "stretch"))
    s.set_defaults(func=cmd_show)
    sp = dsub.add_parser("split", help="write a leakage-free split file")
    sp.add_argument("config")
    sp.add_argument("--out", required=True)
    sp.add_argument("--workers", type=_positive_int)
    sp.set_defaults(func=cmd_split)

    # Later stages register their own subcommands.  Their packages load Keras (seconds of
    # start-up), so a data command's parser leaves them out.
    if argv is None or needs_stage_parsers(argv):
        for module in STAGE_PARSERS:
            importlib.import_module(module).add_parsers(sub)
    from kmedtl.pretrained.cli import add_parsers as add_weights_parsers

    add_weights_parsers(sub)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head = argv[:argv.index(_command(argv))] if _command(argv) else argv
    verbose = "-v" in head or "--verbose" in head
    if needs_stage_parsers(argv):
        quiet_tensorflow_startup(verbose)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # --verbose shows kmedtl's DEBUG records too (e.g. pydicom's tracebacks, which are
    # kept off the console otherwise); reset for the next call in the same process
    logging.getLogger("kmedtl").setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    # dicomweb-client logs every retrieval at INFO, retrying a traceback per retry
    logging.getLogger("dicomweb_client").setLevel(
        logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("retrying").setLevel(logging.INFO if args.verbose else logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except KmedtlError as exc:
        print(f"kmedtl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
