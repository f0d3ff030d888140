"""Helpers shared by the ``tests/test_training_*.py`` files (this file holds no tests).

- ``TINY``: a 3-stage conv-BN-ReLU-pool backbone family (8/16/32 channels, 3x3) registered
  in the kmedtl backbone registry as ``"test_cbr3"``, so tests get registry features
  (named stage cuts, truncation, save/load) at a fraction of CBR-Tiny's cost;
- synthetic, learnable image arrays and PNG folder trees, a config writer;
- :class:`StopAfter`, a callback that "kills" a run after N batches;
- :func:`run_python`, a fresh interpreter with a hard timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import yaml

from kmedtl.hierarchy import Hierarchy
from kmedtl.models import FlatClassifier, HierarchicalClassifier, backbone, truncation
from kmedtl.models.backbones import BACKBONES, BackboneSpec, register_backbone
from kmedtl.models.cbr import cbr_network

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TINY = "test_cbr3"
TREE = {"normal": ["no_tumor"], "tumor": {"glioma": ["glioma_tumor"],
                                          "pituitary": ["pituitary_tumor"]}}
RAW = ("no_tumor", "glioma_tumor", "pituitary_tumor")


def _tiny(include_top=False, weights=None, input_tensor=None, input_shape=None, **kwargs):
    return cbr_network((8, 16, 32), 3, input_tensor, input_shape, weights, TINY, include_top)


if TINY not in BACKBONES:
    register_backbone(BackboneSpec(TINY, _tiny, "unit", 32, truncation.cbr_cuts, "cbr",
                                   pretrained=False, reference="kmedtl tests"))


def hierarchy() -> Hierarchy:
    return Hierarchy(TREE)


def flat_model(n_classes=2, family=TINY, size=32, seed=0, dropout=0.0, cut=None):
    keras.utils.set_random_seed(seed)
    return FlatClassifier(backbone(family, cut=cut, input_shape=(size, size, 1)), n_classes,
                          dropout=dropout)


def hier_model(family=TINY, size=32, seed=0, dropout=0.0):
    keras.utils.set_random_seed(seed)
    return HierarchicalClassifier(backbone(family, input_shape=(size, size, 1)), hierarchy(),
                                  dropout=dropout)


def arrays(n=24, n_classes=2, size=32, seed=0):
    """``(x, y)``: images whose mean and stripe frequency depend on the class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    xx = np.linspace(0, 1, size)[None, :]
    x = 0.25 * rng.random((n, size, size, 1))
    x += 0.3 * (0.5 + 0.5 * np.sin(2 * np.pi * (y[:, None, None] + 1) * xx))[..., None]
    x += 0.2 * y[:, None, None, None] / max(n_classes - 1, 1)
    return np.clip(x, 0, 1).astype("float32"), y.astype("int32")


def hier_targets(leaf_idx):
    from kmedtl.models import hierarchy_targets

    h = hierarchy()
    return hierarchy_targets(h, [h.leaves[int(i)] for i in leaf_idx])


def write_images(root, per_class=10, size=32, seed=0) -> Path:
    """``root/<raw label>/<i>.png`` for the three raw labels of ``TREE``."""
    from PIL import Image

    x, y = arrays(per_class * 3, 3, size, seed)
    root = Path(root)
    for i, (img, c) in enumerate(zip(x, y)):
        d = root / RAW[c]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[..., 0] * 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def write_config(tmp_path, train=None, name="run", **sections) -> Path:
    """A run config over a synthetic PNG tree in ``tmp_path``; returns its path."""
    data_root = tmp_path / "data"
    if not data_root.exists():
        write_images(data_root, per_class=sections.pop("per_class", 10))
    else:
        sections.pop("per_class", None)
    cfg = {
        "name": name,
        "data": {"root": str(data_root), "hierarchy": TREE, "image": {"size": 32, "channels": 1},
                 "cache_dir": str(tmp_path / "cache"), "workers": 1},
        "split": {"method": "holdout", "val": 0.25, "test": 0.2, "dedupe": "exact"},
        "augment": {"flip": "horizontal"},
        "train": {"backbone": TINY, "epochs": 2, "batch_size": 8, "jit_compile": False,
                  "verbose": 0, "tensorboard": False, **(train or {})},
        "output_dir": str(tmp_path / "runs"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class StopAfter(keras.callbacks.Callback):
    """Raise ``RuntimeError("killed")`` after ``batches`` batches of epoch ``epoch``
    (a run killed mid-epoch)."""

    def __init__(self, epoch, batches=1):
        super().__init__()
        self.epoch, self.batches, self._current = epoch, batches, -1

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._current == self.epoch and batch + 1 >= self.batches:
            raise RuntimeError("killed")


class RecordTrainable(keras.callbacks.Callback):
    """Which layer names are trainable at each epoch's start (``self.by_epoch[e]``)."""

    def __init__(self, names):
        super().__init__()
        self.names, self.by_epoch = names, {}

    def on_epoch_begin(self, epoch, logs=None):
        bb = self.model.backbone
        self.by_epoch[epoch] = {n for n in self.names if bb.get_layer(n).trainable}


def run_python(code: str, timeout: float = 240, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter (repo and tests on the path); return stdout.

    Fails the calling test with the child's stderr on a non-zero exit or a timeout."""
    import pytest

    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), e.get("PYTHONPATH", "")])
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    e.setdefault("KERAS_BACKEND", "tensorflow")
    e.update(env or {})
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"child process timed out after {timeout}s; stderr tail:\n"
                    f"{(exc.stderr or '')[-3000:] if isinstance(exc.stderr, str) else ''}")
    if proc.returncode != 0:
        pytest.fail(f"child process failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc.stdout
