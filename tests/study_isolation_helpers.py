"""Helpers of tests/test_study_isolation.py, importable by the study's worker processes
(spawned workers get the parent's ``sys.path``, which holds ``tests/`` under pytest).

- :func:`tiny_study`: a study YAML over a tiny synthetic two-class image folder (32 px,
  ``cbr_micro``), so the worker-process tests need no real dataset.
- :func:`die_in_cells_with_dropout`: a ``worker_init`` for :meth:`StudyRunner.run` that
  makes the worker process die -- SIGKILL, as the kernel's OOM killer does -- when it starts
  training a cell whose recipe has the given dropout.  It is set per run through the
  runner's own ``worker_init`` argument (pickled to the worker), so production code holds
  no test switch.
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import numpy as np
import yaml


def _image(seed: int, label: int, size: int = 32) -> np.ndarray:
    """Class 0: smooth noise; class 1: the same plus a bright disc (learnable)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.4, 0.08, (size, size))
    if label:
        yy, xx = np.mgrid[0:size, 0:size]
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.2) ** 2] += 0.45
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def tiny_dataset(root: Path, per_class: int = 16) -> Path:
    """``root/{neg,pos}/*.png``: ``per_class`` distinct 32 px grey images per class."""
    from PIL import Image

    for label, name in enumerate(("neg", "pos")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_image(1000 * label + i, label)).save(root / name / f"{i:03d}.png")
    return root


def tiny_study(tmp: Path, arms=None, seeds=(0,), sizes=(4,), name="iso") -> Path:
    """A study YAML in ``tmp`` over :func:`tiny_dataset`; arms default to flat / hierarchical
    / linear probe (three distinct cells per N and seed)."""
    tmp = Path(tmp).resolve()
    data = tiny_dataset(tmp / "data")
    arms = arms or [{"name": "flat"}, {"name": "hier", "model": "hierarchical"},
                    {"name": "probe", "strategy": "linear_probe"}]
    study = {
        "name": name,
        "data": {"root": str(data), "hierarchy": {"neg": None, "pos": None},
                 "image_size": 32, "channels": 1, "cache_dir": str(tmp / "cache"),
                 "dedupe": "exact", "test": "holdout", "test_fraction": 0.25},
        "grid": {"sizes": list(sizes), "seeds": list(seeds)},
        "train": {"backbone": "cbr_micro", "model": "flat", "epochs": 1, "batch_size": 8,
                  "learning_rate": 0.003, "dropout": 0.2, "jit_compile": False},
        "evaluation": {"n_boot": 20},
        "arms": arms,
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _install_killer(dropout: float) -> None:
    import kmedtl.study.training as training

    real = training.train_cell

    def train_cell(split, recipe, n, seed, **kw):
        if recipe.get("dropout") == dropout:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(split, recipe, n, seed, **kw)

    training.train_cell = train_cell


def die_in_cells_with_dropout(dropout: float):
    """A picklable ``worker_init``: the worker SIGKILLs itself on such a cell."""
    return functools.partial(_install_killer, dropout)
