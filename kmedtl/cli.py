"""The ``kmedtl`` command: one subcommand per stage.

This module is the root parser and dispatcher:

    kmedtl data audit|cache|show|split ...       datasets (kmedtl.data.cli)
    kmedtl weights list|import ...               pretrained weights (kmedtl.pretrained.cli)
    kmedtl train|evaluate|export|predict|run ... the stages (the STAGE_PARSERS modules)

Each package registers its own subcommands through ``add_parsers(sub)``.  ``kmedtl.data``
sits below ``kmedtl.config`` and never imports it, so this module hands the data commands
the YAML -> config resolution: ``add_data_parsers(sub, load_config=load_config)`` (a YAML
path or a config mapping -> the validated run config), used for a YAML SOURCE and for
``data split CONFIG``.  Exit codes: 0 ok, 1 data problems in --strict mode, 2 bad
arguments or config (a ``KmedtlError``), or data with nothing usable.

The data commands (and ``weights``) import neither TensorFlow nor Keras: the stage
subcommands (train, evaluate, export, predict, run ...) are registered only when the
command line names one of them (or asks for the full list, ``kmedtl --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import tempfile

# TensorFlow's C++ start-up banner (oneDNN, CUDA probing) is noise on a command line; a
# user who wants it sets TF_CPP_MIN_LOG_LEVEL themselves.  Set before anything imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kmedtl import __version__  # noqa: E402
from kmedtl.config import load_config  # noqa: E402
from kmedtl.data.cli import add_parsers as add_data_parsers  # noqa: E402
from kmedtl.errors import KmedtlError  # noqa: E402
from kmedtl.pretrained.cli import add_parsers as add_weights_parsers  # noqa: E402

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
            # lazy: keeps `kmedtl data`/`weights` free of TensorFlow (stage commands only)
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


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The whole command line; given ``argv`` that names a data command (or ``weights``),
    the stage subcommands, whose packages import Keras/TensorFlow, are left out."""
    p = argparse.ArgumentParser(prog="kmedtl", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"kmedtl {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    add_data_parsers(sub, load_config=load_config)

    # Later stages register their own subcommands.  Their packages load Keras (seconds of
    # start-up), so a data command's parser leaves them out.
    if argv is None or needs_stage_parsers(argv):
        for module in STAGE_PARSERS:
            importlib.import_module(module).add_parsers(sub)
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
