"""`kmedtl run --set data.decoder=tfio` through the command line, in the environment of
``.ci/tfio.sh`` (TensorFlow 2.17, tensorflow-io 0.37.1, numpy < 2).

Elsewhere (TensorFlow 2.21, where tensorflow-io cannot load) the test is skipped; that
script fails when any tfio test is skipped there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import make_dicom, smooth_image

from kmedtl.data import tfio_backend


@pytest.mark.tfio
@pytest.mark.slow
def test_kmedtl_run_with_the_tfio_decoder_runs_every_stage(tmp_path):
    ok, reason = tfio_backend.available()
    if not ok:
        pytest.skip(f"tensorflow-io does not load here: {reason.split('. ')[0]}; run .ci/tfio.sh")
    for c, label in enumerate(("a", "b")):
        folder = tmp_path / "data" / label
        folder.mkdir(parents=True)
        for k in range(12):
            px = smooth_image(100 * c + k, size=48).astype(np.uint16) * 16
            make_dicom(px, patient_id=f"P{c}{k}", instance=k + 1).save_as(
                folder / f"{k}.dcm", enforce_file_format=True)
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({
        "name": "tfio",
        "data": {"root": "data", "image": {"size": 32, "channels": 1}, "workers": 1},
        "split": {"method": "holdout", "val": 0.25, "test": 0.25},
        "train": {"backbone": "cbr_tiny", "epochs": 1, "batch_size": 8, "jit_compile": False,
                  "verbose": 0, "tensorboard": False},
        "output_dir": "runs",
        "pipeline": {"stages": ["audit", "split", "train", "evaluate"],
                     "evaluate": {"n_boot": 20, "n_gradcam": 0, "n_examples": 0}},
    }))
    env = {**os.environ, "KMEDTL_HOME": str(tmp_path / "home")}
    # tfio decodes inside tf.data: no pydicom cache, and a stream of unknown length
    out = subprocess.run(
        [sys.executable, "-m", "kmedtl.cli", "run", str(pipe), "--set", "data.decoder=tfio",
         "--set", "data.cache_dir=null", "--set", "train.steps_per_epoch=2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    run = tmp_path / "runs" / "tfio"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete", summary
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["decoder"] == "tfio"
    predictions = (run / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + 6  # header + every test image (24 x 0.25)
