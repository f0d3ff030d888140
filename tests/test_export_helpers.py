"""Helpers shared by the ``tests/test_export_*.py`` and ``tests/test_serving_*.py`` files
(this file holds no tests).

:func:`exported_run` builds, once per test session, a real run folder the way the
pipeline does: 80 brain-tumour MRI JPEGs per class (``$KMEDTL_DATASETS``, symlinked),
``kmedtl train`` through :func:`kmedtl.training.run_training`, ``kmedtl evaluate``
(metrics.json, calibration.json, model card) and ``export_run`` with every format and
verification.

The model is a 3-stage CBR backbone at 32 px trained for 40 epochs (lr 1e-2, cosine,
label smoothing 0.1, best epoch by validation accuracy, deterministic ops): about 0.5
balanced accuracy over 4 classes on 107 test images.  An earlier, undertrained version
(lr 1e-3, no smoothing) gave near-uniform outputs (median top-2 margin 0.006) and full
int8 agreed on only 93% of predicted leaves; without label smoothing the logits span a
wide range and full-int8 probabilities moved by up to 0.15.  With this recipe full int8
agrees on 106/107 leaves (max abs probability difference ~0.01), deterministically.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml

BRAIN = "brain-tumor-mri"
TREE = {"normal": ["no_tumor"],
        "tumor": {"glioma": ["glioma_tumor"], "meningioma": ["meningioma_tumor"],
                  "pituitary": ["pituitary_tumor"]}}
PER_CLASS = 80
SIZE = 32
_CACHE: dict = {}


def run_config(data: Path, out: Path, name: str = "bt_export", **train) -> dict:
    import test_training_helpers as th  # registers the tiny "test_cbr3" backbone

    return {"name": name,
            "data": {"root": str(data), "hierarchy": TREE,
                     "image": {"size": SIZE, "channels": 1},
                     "cache_dir": str(out / "cache"), "workers": 1},
            "split": {"method": "holdout", "val": 0.2, "test": 0.3, "dedupe": "exact"},
            "augment": {"flip": None},
            "train": {"backbone": th.TINY, "epochs": 40, "batch_size": 16, "dropout": 0.0,
                      "monitor": "accuracy", "schedule": "cosine", "learning_rate": 1e-2,
                      "label_smoothing": 0.1, "deterministic": True,
                      "jit_compile": False,
                      "verbose": 0, "tensorboard": False, **train},
            "output_dir": str(out / "runs")}


def link_subset(datasets_dir: Path, dest: Path, per_class: int = PER_CLASS) -> Path:
    """``dest/<raw label>/`` with the first ``per_class`` Training JPEGs (symlinks)."""
    src = Path(datasets_dir) / BRAIN / "Training"
    for raw in ("no_tumor", "glioma_tumor", "meningioma_tumor", "pituitary_tumor"):
        (dest / raw).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / raw).iterdir())[:per_class]:
            os.symlink(f, dest / raw / f.name)
    return dest


def exported_run(tmp_path_factory, datasets_dir) -> dict:
    """``{"run", "report", "root"}``: the trained, evaluated and exported run (built once)."""
    if "run" in _CACHE:
        return _CACHE
    from kmedtl.config import load_config
    from kmedtl.evaluation.stage import evaluate_run
    from kmedtl.export import export_run
    from kmedtl.training import run_training

    base = tmp_path_factory.mktemp("export_run")
    data = link_subset(datasets_dir, base / "data")
    cfg_path = base / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(data, base)))
    run_training(load_config(cfg_path))
    run = base / "runs" / "bt_export"
    evaluate_run(run, n_boot=50, n_gradcam=0, n_examples=0)
    report = export_run(run)
    _CACHE.update(run=run, report=report, base=base)
    return _CACHE


def tiny_context(size: int = 32, channels: int = 1, temperature: float = 1.0, seed: int = 0):
    """A :class:`kmedtl.export.model.RunContext` around an untrained tiny hierarchical
    model (no training, no data): enough for signatures, clients and warmup files."""
    import keras
    import test_training_helpers as th

    from kmedtl.data import ImageOptions
    from kmedtl.export.model import RunContext
    from kmedtl.hierarchy import Hierarchy
    from kmedtl.models import HierarchicalClassifier, backbone

    keras.utils.set_random_seed(seed)
    h = Hierarchy(TREE)
    model = HierarchicalClassifier(backbone(th.TINY, input_shape=(size, size, channels)), h)

    # a stand-in for the RunFolder that RunContext reads through
    folder = SimpleNamespace(path=Path("."), config=SimpleNamespace(name="tiny"), hierarchy=h,
                             image_options=ImageOptions(size=(size, size), channels=channels),
                             normalization="unit", temperature=temperature, calibration=None,
                             train_metrics={}, metrics=None, has_splits=False)
    return RunContext(model=model, folder=folder)


def jpeg_files(datasets_dir, n: int = 8, split: str = "Testing") -> list[Path]:
    """``n`` real JPEGs spread over the four classes of the brain-tumour set."""
    root = Path(datasets_dir) / BRAIN / split
    out = []
    for raw in sorted(os.listdir(root)):
        files = sorted((root / raw).iterdir())
        out += files[: max(1, n // 4)]
    return out[:n]


def random_pixels(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 1)).astype(np.float32)
