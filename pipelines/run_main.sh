#!/usr/bin/env bash
# The README's main job: set up the environment, audit the brain-tumour MRI set, and run
# the demo training (pipelines/brain_tumor_demo.yaml).  Needs KMEDTL_DATASETS (defaults to
# ../shared/datasets beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KMEDTL_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
export KMEDTL_DATASETS=${KMEDTL_DATASETS:-$(cd .. && pwd)/shared/datasets}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
mkdir -p runs
"$VENV/bin/kmedtl" data audit "$KMEDTL_DATASETS/brain-tumor-mri" --json runs/audit.json \
  --hierarchy pipelines/hierarchies/brain_tumor.yaml
"$VENV/bin/python" pipelines/demo_train.py pipelines/brain_tumor_demo.yaml "$@"
