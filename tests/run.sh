#!/usr/bin/env bash
# The README's test command: makes its own virtual environment, installs kmedtl with its
# test extras, lints, and runs the whole suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KMEDTL_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
# Shared datasets live beside the checkout unless the caller says otherwise.
export KMEDTL_DATASETS=${KMEDTL_DATASETS:-$(cd .. && pwd)/shared/datasets}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
"$VENV/bin/ruff" check .
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
