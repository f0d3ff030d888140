"""Keep TensorFlow's and LiteRT's native log lines off the console (``--verbose`` keeps them).

Three kinds of native output reach a terminal whatever Python's ``logging`` says:

- TensorFlow's C++ log (``I0000 ...``, ``W0000 ...``, ``E0000 ...``): most of it obeys
  ``TF_CPP_MIN_LOG_LEVEL``, which the ``kmedtl`` command sets to 2 (warnings hidden) when
  the user has not (:func:`quiet_environment`).  The lines logged through absl before
  ``absl::InitializeLog()`` (CUDA probing in both of TF's shared libraries, the
  ``WARNING: All log messages before absl::InitializeLog() ...`` preamble) ignore it, and
  so do ``GLOG_minloglevel`` and ``ABSL_MIN_LOG_LEVEL`` (tried: absl reads no environment
  variable at run time), so they are filtered instead.
- The TFLite quantiser's ``fully_quantize: 0, inference_type: 6, ...``: a bare C++ print.
- The LiteRT interpreter's ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``,
  printed when the interpreter first allocates its tensors.

:func:`native_output_filtered` wraps the few calls that print them (importing TensorFlow,
TFLite conversion, creating an interpreter); :func:`console_stderr_filtered` wraps a
training run's ``fit`` in the ``kmedtl`` command (stderr only).  It points file
descriptors 1 and 2 at pipes read by a small filter process, which passes on every line
that is not on the noise list (:data:`NOISE`) as soon as it is written.  The filter is a
separate process, not a thread or a temporary file, so that nothing is lost or held back
when the native code aborts (``Check failed``, a segfault) or prints more than a pipe
holds while it keeps the GIL.

What it never swallows: anything not matching :data:`NOISE`; in particular ``W``/``E``
lines from any source other than the known start-up ones (CUDA/oneDNN probing), Python
tracebacks and exceptions (the converter's errors reach the caller as exceptions), and
every line at all when filtering is off.  Filtering is off with ``--verbose``
(:func:`configure`), when the user asked TensorFlow for its info or warning lines
(``TF_CPP_MIN_LOG_LEVEL=0`` or ``1`` in the environment), or where a descriptor cannot be
redirected (not POSIX, no ``sys.executable``, a closed descriptor).

The ``kmedtl`` command also ignores the Python warnings listed in :data:`NOISY_WARNINGS`
(known noise from the libraries, never kmedtl's own), unless ``--verbose``.

Example::

    >>> with native_output_filtered():  # doctest: +SKIP
    ...     blob = converter.convert()
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import warnings

#: Native lines that are noise on a console; :func:`native_output_filtered` drops these and
#: passes on everything else.  Matched against the start of each line (bytes).
NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    rb"STDERR"
    # absl/TSL INFO lines, from any source: information, never an error
    rb"|I\d{4} [\d:. ]+\d+ \S+\.(?:cc|h|cpp):\d+\] "
    # warnings and errors only from the known start-up probes (CUDA absent, CPU features)
    rb"|[WE]\d{4} [\d:. ]+\d+ (?:cuda_\w+|cudart_stub|dso_loader|cpu_feature_guard"
    rb"|computation_placer|gpu_device|port)\.cc:\d+\] "
    rb"|[WE]\d{4} [\d:. ]+\d+ \S+\] (?:oneDNN supports DT_INT32 only on platforms with "
    rb"AVX-512|Ignored (?:output_format|drop_control_dependency)\.)"
    rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate "
    rb"compiler flags\.$"
    # the TFLite quantiser's settings, printed on every quantised conversion
    rb"|fully_quantize: \d+, inference_type: \d+"
    # LiteRT's start-up information
    rb"|INFO: (?:Created|Initialized) TensorFlow Lite ")

#: The filter process: lines from stdin that do not match the pattern in argv[1] to
#: stdout, each as soon as it is complete.
_FILTER = ("import re, sys\n"
           "noise = re.compile(sys.argv[1].encode('latin-1'))\n"
           "out = sys.stdout.buffer\n"
           "for line in sys.stdin.buffer:\n"
           "    if not noise.match(line):\n"
           "        out.write(line)\n"
           "        out.flush()\n")

#: Python warnings that are noise on a console, as ``(category, message regex)``: the
#: ``kmedtl`` command ignores them unless ``--verbose`` (:func:`quiet_environment`).
#: keras.applications' MobileNets warn that a model built at another input size gets the
#: 224-pixel ImageNet weights, which is what kmedtl asks for (transfer at any size); the
#: warning named a line of kmedtl's code and came before every error of such a run,
#: offline-weights error included.
NOISY_WARNINGS = (
    (UserWarning, r"`input_shape` is undefined or non-square, or `rows` is not"),
)

_verbose = False
#: set by :func:`configure`, i.e. by the ``kmedtl`` command: this process owns a console
_console = False


def configure(verbose: bool) -> None:
    """``--verbose`` (True) turns filtering off for this process; False turns it back on.
    Called by the ``kmedtl`` command, which marks the process as a console command (see
    :func:`console_stderr_filtered`)."""
    global _verbose, _console
    _verbose = bool(verbose)
    _console = True


@contextlib.contextmanager
def console_stderr_filtered():
    """:func:`native_output_filtered` on stderr only, and only in the ``kmedtl`` command
    (library callers' descriptors are left alone).  For a whole training run: native code
    logs a line or two of :data:`NOISE` once a graph first executes (on CPUs without
    AVX-512, ``oneDNN supports DT_INT32 only on platforms with AVX-512``, from the first
    ``fit``), while stdout keeps Keras' progress bar unfiltered (a ``\r``-updated bar would
    wait for its newline in a line filter)."""
    if not _console:
        yield
        return
    with native_output_filtered(fds=(2,)):
        yield


def quiet_environment(verbose: bool) -> None:
    """Before TensorFlow is imported: ``TF_CPP_MIN_LOG_LEVEL=2`` unless ``verbose`` or the
    user set it (their value is kept); and, unless ``verbose``, ignore the Python warnings
    of :data:`NOISY_WARNINGS` in this process."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        for category, message in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)


def filtering() -> bool:
    """Whether :func:`native_output_filtered` filters: not with ``--verbose``, and not when
    the user asked TensorFlow for its info or warning lines (``TF_CPP_MIN_LOG_LEVEL`` 0/1)."""
    return not _verbose and os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() not in ("0", "1")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # None (pythonw) or a closed stream
            stream.flush()


def _redirect(fd: int):
    """Point ``fd`` at a pipe into a filter process writing to where ``fd`` pointed;
    ``(saved fd, process)``, or None where that cannot be done (``fd`` left as it was)."""
    try:
        saved = os.dup(fd)
    except OSError:  # a closed descriptor: nothing to filter
        return None
    try:
        r, w = os.pipe()
    except OSError:
        os.close(saved)
        return None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER, NOISE.pattern.decode("latin-1")],
            stdin=r, stdout=saved, close_fds=True)
    except (OSError, ValueError):
        for x in (r, w, saved):
            os.close(x)
        return None
    os.close(r)
    os.dup2(w, fd)
    os.close(w)
    return saved, proc


@contextlib.contextmanager
def native_output_filtered(fds=(1, 2)):
    """Drop the :data:`NOISE` lines that native code (and anything else) writes to ``fds``
    inside the block; pass on every other line as it comes.  A no-op where
    :func:`filtering` is off."""
    if not filtering() or os.name != "posix" or not sys.executable:
        yield
        return
    _flush()
    redirected = []
    try:
        for fd in fds:
            r = _redirect(fd)
            if r is not None:
                redirected.append((fd, *r))
        yield
    finally:
        _flush()
        for fd, saved, _ in reversed(redirected):
            os.dup2(saved, fd)  # closes this process's end of the pipe
            os.close(saved)
        for _, _, proc in redirected:
            # the filter ends once every writer has closed the pipe; a child process
            # started inside the block may still hold it, and then the filter keeps
            # forwarding its lines after this returns
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


__all__ = ["NOISE", "NOISY_WARNINGS", "configure", "console_stderr_filtered", "filtering",
           "native_output_filtered", "quiet_environment"]
