"""Shared helpers for the kmedtl.models tests (imported by the test_models_* files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np

from kmedtl.hierarchy import Hierarchy

REPO = Path(__file__).resolve().parents[1]

TUMOUR_TREE = {
    "normal": ["no_tumor"],
    "tumor": {
        "glioma": ["glioma_tumor"],
        "meningioma": ["meningioma_tumor"],
        "pituitary": ["pituitary_tumor"],
    },
}
# Three levels: normal | lesion -> {benign, malignant -> {a, b}}
DEEP_TREE = {
    "normal": None,
    "lesion": {"benign": None, "malignant": {"type_a": None, "type_b": None}},
}


def tumour_hierarchy() -> Hierarchy:
    return Hierarchy(TUMOUR_TREE)


def deep_hierarchy() -> Hierarchy:
    return Hierarchy(DEEP_TREE)


def images(n, size=32, channels=1, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, size, size, channels)).astype("float32")


def randomise_batchnorm(model, seed=0):
    """Give BatchNorm layers non-trivial statistics so inference paths are really tested."""
    rng = np.random.default_rng(seed)
    from kmedtl.models.weights import leaf_layers

    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.1, shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))


def run_python(code: str, timeout=240) -> str:
    """Run ``code`` in a fresh Python process (repo on the path); return its stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO),
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def dump_json(path, obj):
    Path(path).write_text(json.dumps(obj))
