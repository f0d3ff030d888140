"""The ``kmedtl`` command: one subcommand per stage.

This module is the root parser and dispatcher:

    kmedtl data audit|cache|show|split ...       datasets (kmedtl.data.cli)
    kmedtl weights list|import ...               pretrained weights (kmedtl.pretrained.cli)
    kmedtl train|evaluate|export|predict|run ... the stages (the STAGE_PARSERS modules)

Each package registers its own subcommands through ``add_parsers(sub)``.  ``kmedtl.data``
sits below ``kmedtl.config`` and never imports it, so this module hands the data commands
the YAML -> config resolution: ``add_data_parsers(sub, load_config=load_run_config)`` (a
YAML path -- a run config or a pipeline YAML -- or a config mapping -> the validated run
config), used for a YAML SOURCE and for ``data split CONFIG``.

Exit codes (every command):

- ``0``: everything asked for was done;
- ``1``: some inputs were unreadable and skipped (``kmedtl predict`` files that could not
  be read, data problems in ``--strict`` mode), each named on its own ``kmedtl: error:``
  line; an export whose parity check failed, or a push that was not blessed;
- ``2``: a config or argument error (a ``KmedtlError``: the message names the field), data
  with nothing usable, or a refused model: an untrusted SavedModel/TFLite/ONNX file whose
  ops are not all pure compute (``WriteFile``, ``PyFunc``, a Flex or custom op ...), or a
  ``.keras`` file Keras' ``safe_mode`` refuses (``UntrustedModelError``; ``kmedtl predict
  --trust-model`` overrides it for a model you trust: :mod:`kmedtl.export.trust`);
- ``3``: a broken or mismatched model (``ModelFileError``): a model file that cannot be
  parsed or loaded, or metadata (``kmedtl.json``/``export.json``) that does not belong to
  it (digest, leaf count or leaf order).

The data commands (and ``weights``) import neither TensorFlow nor Keras to parse their
arguments: the stage subcommands (train, evaluate, export, predict, run ...) are registered
only when the command line names one of them (or asks for the full list, ``kmedtl
--help``).  TensorFlow's and LiteRT's native log lines stay off the console unless
``--verbose`` (:mod:`kmedtl._quiet`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from kmedtl import __version__
from kmedtl._quiet import configure as configure_quiet
from kmedtl._quiet import native_output_filtered, quiet_environment
from kmedtl._text import EscapingFormatter, printable
from kmedtl.config import load_config, load_yaml
from kmedtl.data.cli import add_parsers as add_data_parsers
from kmedtl.errors import ConfigError, DataError, KmedtlError, ModelFileError
from kmedtl.init import add_parsers as add_init_parsers
from kmedtl.pretrained.cli import add_parsers as add_weights_parsers

log = logging.getLogger("kmedtl")

#: Exit codes (see the module docstring): 1 is returned by the commands themselves.
EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, EXIT_MODEL = 0, 1, 2, 3
#: Subcommands that need neither TensorFlow nor Keras.
LIGHT_COMMANDS = ("data", "weights", "init")
#: Modules whose ``add_parsers(sub)`` register the stage subcommands.  Importing their
#: packages loads Keras and TensorFlow (seconds), so it happens only when needed.
STAGE_PARSERS = ("kmedtl.training.cli", "kmedtl.evaluation.cli", "kmedtl.export.cli",
                 "kmedtl.pipeline.cli")

def quiet_tensorflow_startup(verbose: bool = False) -> None:
    """Import TensorFlow and probe its devices with the native start-up lines filtered out
    (``--verbose`` keeps them; :mod:`kmedtl._quiet`).  Without TensorFlow (e.g. a JAX-only
    machine) nothing happens."""
    if verbose or "tensorflow" in sys.modules or \
            os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    with native_output_filtered():
        try:
            # lazy: keeps `kmedtl data`/`weights` free of TensorFlow (stage commands only)
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA probing logs its errors here
        except Exception:  # noqa: BLE001 - absent or broken TF: the command reports it
            pass


def load_run_config(source):
    """``load_config`` for the data commands, which also take a pipeline YAML (a run config
    plus a ``pipeline:`` section, as ``kmedtl run`` reads it): that section says which
    stages to run, not which data to read, so it is dropped here and the rest loads as a
    run config, paths relative to the file's folder as in ``kmedtl run``.  (``load_pipeline``
    itself is not called: it imports Keras, which the data commands never load.)"""
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is None or not path.is_file():
        return load_config(source)
    raw = load_yaml(path.read_text(), str(path))  # limits: kmedtl.safe_yaml
    if not isinstance(raw, dict) or "pipeline" not in raw:
        return load_config(source)
    raw.pop("pipeline")
    try:
        return load_config(raw, base_dir=path.parent)
    except ConfigError as exc:  # name the file, not "config"
        msg = str(exc)
        raise ConfigError(f"{path}{msg[len('config'):]}" if msg.startswith("config:")
                          else f"{path}: {msg}") from None


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
    add_data_parsers(sub, load_config=load_run_config)

    # Later stages register their own subcommands.  Their packages load Keras (seconds of
    # start-up), so a data command's parser leaves them out.
    if argv is None or needs_stage_parsers(argv):
        for module in STAGE_PARSERS:
            importlib.import_module(module).add_parsers(sub)
    add_weights_parsers(sub)
    add_init_parsers(sub)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head = argv[:argv.index(_command(argv))] if _command(argv) else argv
    verbose = "-v" in head or "--verbose" in head
    quiet_environment(verbose)  # TF_CPP_MIN_LOG_LEVEL, before anything imports TensorFlow
    configure_quiet(verbose)    # filter native log lines (TFLite conversion, interpreters)
    if needs_stage_parsers(argv):
        quiet_tensorflow_startup(verbose)
    args = build_parser(argv).parse_args(argv)
    # `weights import` starts TensorFlow itself, filtered (kmedtl.pretrained.cli)
    log_format = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=log_format)
    for handler in logging.getLogger().handlers:  # file names in log lines print escaped
        if type(handler.formatter) is logging.Formatter:
            handler.setFormatter(EscapingFormatter(log_format))
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
        # a DataError is one line (a file name with a newline must not forge a second one);
        # other messages keep their line breaks, with every other control escaped
        msg = printable(exc, keep_newlines=not isinstance(exc, DataError))
        print(f"kmedtl: error: {msg}", file=sys.stderr)
        return EXIT_MODEL if isinstance(exc, ModelFileError) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
