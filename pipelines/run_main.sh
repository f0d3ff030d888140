#!/usr/bin/env bash
# The README's main job: build the environment, then run the brain-tumour pipeline end to
# end (pipelines/brain_tumor_hierarchical.yaml): audit -> leakage-free split -> train ->
# evaluate -> export (SavedModel, TFLite, ONNX; parity verified) -> push to saved_models/.
# Needs KMEDTL_DATASETS (default: ../shared/datasets beside the checkout).  Rerunning it
# resumes: finished stages are skipped (see runs/brain_tumor_hierarchical/summary.md).
# Extra arguments go to `kmedtl run`, e.g. --force train, --until evaluate,
# --set train.epochs=4.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KMEDTL_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[export,weights]"
export KMEDTL_DATASETS=${KMEDTL_DATASETS:-$(cd .. && pwd)/shared/datasets}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
"$VENV/bin/kmedtl" run pipelines/brain_tumor_hierarchical.yaml "$@"
