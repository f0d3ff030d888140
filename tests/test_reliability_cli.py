"""The command line: no TensorFlow for pure-data commands, no native start-up noise, and
``kmedtl predict`` that survives bad files in a batch and labels its numbers (issue 14)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import make_dicom, smooth_image, write_image
from test_serving_client import served  # noqa: F401 - the TF-Serving-like fixture

from kmedtl.cli import build_parser, main

NOISE = ("I0000", "E0000", "W0000", "absl::InitializeLog")


def run_cli(tmp_path, *argv):
    """``python -c`` running kmedtl's main in a fresh process; prints the heavy modules it
    imported on the last line of stdout."""
    script = ("import sys\nfrom kmedtl.cli import main\n"
              "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
              "print('IMPORTED', sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
              "\nsys.exit(rc)\n")
    return subprocess.run([sys.executable, "-c", script, *map(str, argv)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.mark.slow
def test_pure_data_commands_import_neither_tensorflow_nor_keras(tmp_path):
    """Before: every command imported Keras and TensorFlow (4-5 s, I0000 lines)."""
    for label in ("A", "B"):
        write_image(tmp_path / "ds" / label / "x.png", smooth_image(ord(label)))
    res = run_cli(tmp_path, "data", "audit", tmp_path / "ds", "--no-cache", "--size", "32",
                  "--workers", "1")
    assert res.returncode == 0, res.stderr
    assert "read 2 = used 2 + skipped 0" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "IMPORTED []"
    assert not any(n in res.stderr for n in NOISE), res.stderr
    for argv in (["data", "audit", "--help"], ["data", "show", "--help"], ["--version"],
                 ["weights", "--help"]):
        res = run_cli(tmp_path, *argv)
        assert res.returncode == 0, (argv, res.stderr)
        assert res.stdout.strip().splitlines()[-1] == "IMPORTED []", argv
        assert res.stderr == "", (argv, res.stderr)


@pytest.mark.slow
def test_stage_commands_start_without_native_start_up_lines(tmp_path):
    res = run_cli(tmp_path, "train", "--help")
    assert res.returncode == 0 and "--epochs" in res.stdout
    assert "tensorflow" in res.stdout.strip().splitlines()[-1]  # it did import TF
    assert not any(n in res.stderr for n in NOISE), res.stderr
    # --verbose keeps everything TensorFlow prints
    verbose = run_cli(tmp_path, "--verbose", "train", "--help")
    assert verbose.returncode == 0


def test_full_parser_still_lists_every_command():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"data", "train", "tune", "lr-find", "evaluate", "export", "predict", "run",
            "weights"} <= set(sub.choices)
    light = build_parser(["data", "audit", "x"])
    light_sub = next(a for a in light._actions if a.dest == "command")
    assert set(light_sub.choices) == {"data", "weights", "init"}


# ---------------------------------------------------------------------------- predict
TREE = {"normal": ["no_tumor"], "tumor": {"glioma": ["glioma_tumor"],
                                          "pituitary": ["pituitary_tumor"]}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with an untrained 32 px hierarchical model, its config and a
    calibration temperature of 2 (so calibrated and raw probabilities differ)."""
    import keras

    from kmedtl.models import HierarchicalClassifier, backbone

    run = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(0)
    model = HierarchicalClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), TREE)
    model.save(run / "model.keras")
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"name": "tiny", "data": {"root": str(run), "hierarchy": TREE,
                                  "image": {"size": 32, "channels": 1}}}))
    (run / "calibration.json").write_text(json.dumps({"temperature": 2.0}))
    return run


def batch_with_bad_files(tmp_path):
    good = [write_image(tmp_path / f"ok{i}.png", smooth_image(i, size=48)) for i in range(3)]
    dcm = tmp_path / "scan.dcm"
    make_dicom(np.add.outer(np.arange(40), np.arange(40)).astype(np.uint16)).save_as(
        dcm, enforce_file_format=True)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.dcm"
    text.write_text("not an image\n" * 20)
    missing = tmp_path / "gone.jpg"
    return [good[0], empty, good[1], text, missing, dcm, good[2]], [empty, text, missing]


def test_predict_keeps_going_past_bad_files_and_says_so(tiny_run, tmp_path, capsys):
    """Before: the first bad file stopped the whole batch with exit 2."""
    files, bad = batch_with_bad_files(tmp_path)
    rc = main(["predict", str(tiny_run / "model.keras"), *map(str, files), "--batch-size", "3"])
    out, err = capsys.readouterr()
    assert rc == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("kmedtl: error: ")]
    assert len(errors) == len(bad)
    for b in bad:
        assert sum(str(b) in ln for ln in errors) == 1
    assert "Traceback" not in err and "predicted 4 of 7 file(s); 3 could not be read" in err
    heads = [ln for ln in out.splitlines() if not ln.startswith(" ")]
    assert [h.split(":")[0] for h in heads] == [str(f) for f in files if f not in bad]


def test_predict_text_names_calibrated_and_raw_probabilities(tiny_run, tmp_path, capsys):
    """Before: '<class> (confidence 0.690)' beside 'leaf: <class> 0.841' with nothing
    saying which number was calibrated."""
    png = write_image(tmp_path / "a.png", smooth_image(5, size=48))
    assert main(["predict", str(tiny_run / "model.keras"), str(png)]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert "calibrated confidence" in head and "temperature 2" in head
    assert "raw probability" in head
    assert "  raw model probabilities:" in out and "level 1: normal" in out
    assert "  calibrated leaf probabilities: " in out
    # the two numbers in the head line are the calibrated and raw leaf probabilities
    rc = main(["predict", str(tiny_run / "model.keras"), str(png), "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert rc == 0
    k = row["label_index"]
    assert f"calibrated confidence {row['calibrated'][k]:.3f}" in head
    assert f"raw probability {row['leaf'][k]:.3f}" in head


def test_predict_json_lists_failures_with_their_kind(tiny_run, tmp_path, capsys):
    files, bad = batch_with_bad_files(tmp_path)
    rc = main(["predict", str(tiny_run / "model.keras"), *map(str, files), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 1 and [r["file"] for r in rows] == [str(f) for f in files]
    kinds = {r["file"]: r.get("kind") for r in rows if "error" in r}
    assert kinds == {str(bad[0]): "zero_byte", str(bad[1]): "not_dicom",
                     str(bad[2]): "missing_file"}
    assert all(abs(sum(r["leaf"]) - 1) < 1e-4 for r in rows if "error" not in r)


def test_predict_against_a_server_skips_bad_files_too(served, tmp_path, capsys):  # noqa: F811
    """The TF-Serving path (a REST server over a real SavedModel, from
    test_serving_client): bad files are reported one by one, the rest are sent."""
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    files = [served["png"], empty, served["dcm"]]
    rc = main(["predict", "--server", served["rest"], "--metadata", str(served["sm"]),
               *map(str, files)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert [ln for ln in err.splitlines() if ln.startswith("kmedtl: error: ")] == [
        f"kmedtl: error: {empty}: file is empty (0 bytes)"]
    heads = [ln.split(":")[0] for ln in out.splitlines() if not ln.startswith(" ")]
    assert heads == [str(served["png"]), str(served["dcm"])]
    # without --metadata a DICOM cannot be preprocessed: that file fails, the PNG runs
    rc = main(["predict", "--server", served["rest"], str(served["png"]),
               str(served["dcm"]), "--json"])
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert rc == 1 and "label" in rows[0] and "--metadata" in rows[1]["error"]
