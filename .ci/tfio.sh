#!/usr/bin/env bash
# Run the tensorflow-io DICOM backend tests in their own environment.
#
# tensorflow-io 0.37.1 (its last release) loads only with TensorFlow <= 2.17, while kmedtl
# itself pins TensorFlow 2.21; so this script builds a separate virtual environment
# (.venv-tfio) with TensorFlow 2.17 + tensorflow-io 0.37.1, installs kmedtl into it
# *without* its dependencies (which would pull TF 2.21 back in), lists the data-layer
# dependencies explicitly, and runs the tests marked `tfio`: the backend against pydicom
# (tests/test_tfio.py) and `kmedtl run --set data.decoder=tfio` through the command line
# (tests/test_tfio_cli.py), so the CLI works here, not only the library.
#
# It fails when any test fails, when no test is collected (pytest exit code 5) and when
# every tfio test was skipped: in this environment they are expected to run.
#
# Usage: .ci/tfio.sh [extra pytest args]       (from anywhere; works in the repo root)
# Env:   PYTHON (default python3), TFIO_VENV (default .venv-tfio), TFIO_REBUILD=1 to
#        recreate the environment.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${TFIO_VENV:-.venv-tfio}
start=$(date +%s)

if [[ "${TFIO_REBUILD:-0}" == 1 ]]; then
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

# TensorFlow 2.17 needs numpy < 2; everything else is what kmedtl imports for `kmedtl run`
# (kmedtl's own requirements less TensorFlow 2.21 and tensorboard >= 2.20: TF 2.17 brings
# its tensorboard), plus pytest and the real DICOM test files of pydicom-data.  The pylibjpeg plugins are left
# unpinned: their releases that kmedtl pins for TF 2.21 need numpy >= 2, so pip picks the
# last ones that work with numpy 1.26 (they decode the JPEG / JPEG-LS / RLE files the
# pydicom side of these tests reads).
"$PY" -m pip install --quiet \
    "tensorflow-cpu==2.17.*" \
    "tensorflow-io==0.37.1" \
    "numpy>=1.26,<2" \
    "pydicom>=3.0,<4" \
    "pylibjpeg>=2.0,<3" \
    "pylibjpeg-libjpeg<3" \
    "pylibjpeg-openjpeg<3" \
    "pylibjpeg-rle<3" \
    "pillow>=10" \
    "pyyaml>=6" \
    "pydantic>=2.6,<3" \
    "scikit-learn>=1.4" \
    "tqdm>=4.66" \
    "imagehash>=4.3" \
    "matplotlib>=3.8" \
    "keras-tuner>=1.4.7,<2" \
    "pytest>=8" \
    "pydicom-data>=1.0"
"$PY" -m pip install --quiet --no-deps -e .

# Refuse to go on with the wrong TensorFlow (e.g. something pulled 2.21 back in).
"$PY" - <<'PY'
import importlib.metadata as md
import sys

import tensorflow as tf

print(f"tensorflow {tf.__version__}, tensorflow-io {md.version('tensorflow-io')}, "
      f"numpy {md.version('numpy')}, python {sys.version.split()[0]}")
major, minor = (int(x) for x in tf.__version__.split(".")[:2])
if (major, minor) > (2, 17):
    sys.exit(f"error: {tf.__version__} installed; tensorflow-io 0.37.1 needs TensorFlow <= 2.17")
PY

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
"$PY" -m pytest tests/test_tfio.py tests/test_tfio_cli.py -m tfio -v -rs "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

elapsed=$(( $(date +%s) - start ))
if [[ $rc -eq 5 ]]; then
    echo "FAIL: no tfio test was collected (pytest exit code 5); they must run here" >&2
    exit 1
fi
if [[ $rc -ne 0 ]]; then
    echo "FAIL: pytest exit code $rc (${elapsed}s)" >&2
    exit "$rc"
fi
if ! grep -Eq '[0-9]+ passed' "$log"; then
    echo "FAIL: every tfio test was skipped; tensorflow-io did not load in $VENV" >&2
    exit 1
fi
if grep -Eq '[0-9]+ skipped' "$log"; then
    echo "FAIL: some tfio tests were skipped; in $VENV all of them must run" >&2
    exit 1
fi
echo "OK: tfio tests passed (${elapsed}s)"
