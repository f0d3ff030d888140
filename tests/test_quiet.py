"""A quiet console: TensorFlow's and LiteRT's native log lines are filtered at the file
descriptor level unless ``--verbose`` (kmedtl._quiet), and nothing else is swallowed --
not a real error line, not output written just before the process aborts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from kmedtl._quiet import configure, filtering, native_output_filtered, quiet_environment

#: Lines the issue saw on the console, one per known source.
NOISE_LINES = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1796605808.713839   11750 cudart_stub.cc:31] Could not find cuda drivers "
    b"on your machine, GPU will not be used.\n",
    b"I0000 00:00:1796605808.713839   11750 cpu_feature_guard.cc:227] This TensorFlow binary "
    b"is optimized to use available CPU instructions in performance-critical operations.\n",
    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild "
    b"TensorFlow with the appropriate compiler flags.\n",
    b"E0000 00:00:1796605818.597951   11750 cuda_platform.cc:52] failed call to cuInit: "
    b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n",
    b"W0000 00:00:1796605959.992744   13360 tf_tfl_flatbuffer_helpers.cc:364] Ignored "
    b"output_format.\n",
    b"W0000 00:00:1796605959.992744   13360 mkl_util.h:1012] oneDNN supports DT_INT32 only on "
    b"platforms with AVX-512. Falling back to the default Eigen-based implementation.\n",
    b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, "
    b"output_inference_type: FLOAT32\n",
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
]
#: Lines that must come through: an error from any other source, a traceback, output.
REAL_LINES = [
    b"E0000 00:00:1796605818.597951   11750 convert_graph.cc:88] error: 'tf.Foo' op is "
    b"neither a custom op nor a flex op\n",
    b"W0000 00:00:1796605818.597951   11750 flatbuffer_export.cc:3705] TFLite interpreter "
    b"needs to link Flex delegate in order to run the model\n",
    b"Traceback (most recent call last):\n",
    b"INFO tensorflow: Assets written to: /tmp/x/assets\n",
    b"tflite_int8 | 4225.4 | passed\n",
]


@pytest.fixture(autouse=True)
def not_verbose(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    configure(False)
    yield
    configure(False)


def _write_everything():
    for i, line in enumerate(NOISE_LINES + REAL_LINES):
        os.write(1 + i % 2, line)  # both descriptors, C++-style (bypassing sys.stdout)


def test_noise_is_dropped_and_everything_else_passes(capfd):
    before = [os.fstat(fd).st_ino for fd in (1, 2)]
    with native_output_filtered():
        _write_everything()
        os.write(2, b"a last line without a newline")
    out, err = capfd.readouterr()
    both = out + err
    for line in NOISE_LINES:
        assert line.decode().strip() not in both
    for i, line in enumerate(REAL_LINES, start=len(NOISE_LINES)):
        assert line.decode() in (out if i % 2 == 0 else err), line
    assert err.endswith("a last line without a newline")
    assert [os.fstat(fd).st_ino for fd in (1, 2)] == before  # descriptors restored


def test_an_exception_inside_keeps_what_was_written(capfd):
    with pytest.raises(RuntimeError, match="conversion failed"):
        with native_output_filtered():
            os.write(2, NOISE_LINES[1] + b"E0000 00:00:1.0 7 converter.cc:1] the real cause\n")
            raise RuntimeError("conversion failed")
    err = capfd.readouterr().err
    assert "the real cause" in err and "cudart_stub" not in err


@pytest.mark.parametrize("how", ["--verbose", "TF_CPP_MIN_LOG_LEVEL=0", "TF_CPP_MIN_LOG_LEVEL=1"])
def test_nothing_is_filtered_when_the_user_asks_for_native_logs(how, capfd, monkeypatch):
    if how == "--verbose":
        configure(True)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", how.split("=")[1])
    assert not filtering()
    with native_output_filtered():
        _write_everything()
    out, err = capfd.readouterr()
    for line in NOISE_LINES + REAL_LINES:
        assert line.decode() in out + err


def test_the_cli_sets_the_log_level_only_when_the_user_did_not(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    quiet_environment(verbose=True)
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ  # --verbose: TensorFlow's own default
    quiet_environment(verbose=False)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    quiet_environment(verbose=False)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


MOBILENET_WARNING = ("`input_shape` is undefined or non-square, or `rows` is not in [96, 128, "
                     "160, 192, 224]. Weights for input shape (224, 224) will be loaded as "
                     "the default.")


@pytest.mark.parametrize("verbose", [False, True])
def test_the_cli_drops_known_library_warnings_unless_verbose(verbose, monkeypatch):
    """keras.applications' MobileNet size note came before the one-line offline-weights
    error; the kmedtl command drops it (and only it) unless --verbose."""
    import warnings

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_environment(verbose=verbose)
        warnings.warn(MOBILENET_WARNING, UserWarning, stacklevel=1)
        warnings.warn("another UserWarning", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in seen]
    assert ("another UserWarning" in messages) and ((MOBILENET_WARNING in messages) is verbose)


def test_output_before_an_abort_is_not_lost(tmp_path):
    """A native ``Check failed`` aborts the process inside the block: the filter is a
    separate process, so the last words still reach the terminal."""
    script = ("import os\nfrom kmedtl._quiet import native_output_filtered\n"
              "with native_output_filtered():\n"
              f"    os.write(2, {NOISE_LINES[1]!r})\n"
              "    os.write(2, b'F0000 check.cc:1] Check failed: the real reason\\n')\n"
              "    os.write(1, b'partial stdout')\n"
              "    os.abort()\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert res.returncode == -signal.SIGABRT
    assert "Check failed: the real reason" in res.stderr and "cudart_stub" not in res.stderr
    assert res.stdout == "partial stdout"


# ------------------------------------------------------------------- the real command
def _is_noise(line: str) -> bool:
    """The issue's list of what must not reach the console without --verbose."""
    return line.startswith(("E0000", "I0000", "W0000",
                            "WARNING: All log messages before absl::InitializeLog()",
                            "INFO: Created TensorFlow Lite")) or \
        "fully_quantize:" in line or "inference_type:" in line


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A trained 32 px run on a registered backbone (a fresh process can load it), with
    training images for int8 calibration."""
    from test_training_helpers import write_config

    from kmedtl.config import load_config
    from kmedtl.training import run_training

    tmp = tmp_path_factory.mktemp("quiet")
    run_training(load_config(write_config(tmp, name="quiet", per_class=6,
                                          train={"backbone": "cbr_tiny", "epochs": 1})))
    return tmp / "runs" / "quiet"


def _export(run, out, *head):
    """``kmedtl [head] export RUN --formats tflite --tflite-variants int8``: imports
    TensorFlow, quantises (the converter prints ``fully_quantize: ...``) and verifies with
    the LiteRT interpreter (``INFO: Created TensorFlow Lite XNNPACK delegate``)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    exe = os.path.join(os.path.dirname(sys.executable), "kmedtl")
    return subprocess.run([exe, *head, "export", str(run), "--formats", "tflite",
                           "--tflite-variants", "int8", "--representative-samples", "8",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_export_prints_no_native_log_lines(small_run, tmp_path):
    res = _export(small_run, tmp_path / "quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tflite_int8" in res.stdout
    assert (tmp_path / "quiet" / "tflite" / "model_int8.tflite").is_file()
    noise = [ln for ln in (res.stdout + res.stderr).splitlines() if _is_noise(ln)]
    assert noise == [], noise


@pytest.mark.slow
def test_export_verbose_keeps_them(small_run, tmp_path):
    res = _export(small_run, tmp_path / "verbose", "--verbose")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fully_quantize:" in res.stderr
    assert "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." in res.stderr
    assert any(ln.startswith("I0000") for ln in res.stderr.splitlines())  # TF's own INFO


#: The line a training run printed once on a CPU without AVX-512 (AMD EPYC, CI).
ONEDNN_INT32 = (b"E0000 00:00:1796659055.047133   15641 util.cc:131] oneDNN supports DT_INT32 "
                b"only on platforms with AVX-512. Falling back to the default Eigen-based "
                b"implementation if present.\n")


def test_training_stderr_is_filtered_in_the_command_only(capfd, monkeypatch):
    """The Trainer's fit runs inside console_stderr_filtered: in the kmedtl command the
    one-time native line is dropped from stderr while stdout (Keras' progress bar) is not
    redirected; a library caller's descriptors are never touched."""
    import kmedtl._quiet as quiet

    monkeypatch.setattr(quiet, "_console", False)  # a library caller: nothing redirected
    before = os.fstat(2).st_ino
    with quiet.console_stderr_filtered():
        assert os.fstat(2).st_ino == before
        os.write(2, ONEDNN_INT32)
    assert ONEDNN_INT32.decode() in capfd.readouterr().err

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setattr(quiet, "_verbose", False)
    monkeypatch.setattr(quiet, "_console", True)  # what configure() does in the command
    stdout_before = os.fstat(1).st_ino
    with quiet.console_stderr_filtered():
        assert os.fstat(1).st_ino == stdout_before  # stdout left alone
        os.write(2, ONEDNN_INT32)
        os.write(2, REAL_LINES[0])
        os.write(1, b"epoch 1/1\r")
    out, err = capfd.readouterr()
    assert "DT_INT32" not in err and REAL_LINES[0].decode() in err
    assert out == "epoch 1/1\r"


def test_a_training_fit_in_the_command_drops_the_native_line(capfd, monkeypatch):
    """The Trainer wiring, on any CPU: a line written to fd 2 during fit (as TF's oneDNN
    check does on CPUs without AVX-512) is dropped in the command, kept for a library
    caller.  (tests/test_init.py's end-to-end run sees the real line only on such CPUs.)"""
    import keras
    from test_training_helpers import arrays, flat_model

    import kmedtl._quiet as quiet
    from kmedtl.training import Trainer

    class NativeLine(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            os.write(2, ONEDNN_INT32)

    x, y = arrays(8)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setattr(quiet, "_verbose", False)
    for console, shown in ((True, False), (False, True)):
        monkeypatch.setattr(quiet, "_console", console)
        Trainer(flat_model(), epochs=1, batch_size=8, jit_compile=False, verbose=0,
                callbacks=[NativeLine()]).fit((x, y))
        assert ("DT_INT32" in capfd.readouterr().err) is shown, console
