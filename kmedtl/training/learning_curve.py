"""``kmedtl learning-curve CONFIG --n 25,50,100,all --seeds 3``: test metric against the
number of training images per class.

For every size ``N`` and seed, the config's model (``train.*``, built fresh, seeded) is
trained on ``N`` images per class of the config's training split
(:func:`kmedtl.data.splits.per_class_subset`: for one seed the subsets are nested, the
25 images are among the 50), validated on the fixed validation split and scored on the
fixed test split.  ``all`` is the whole training split.  Written into the run folder
(``<output_dir>/<name>/``, or ``out``):

* ``learning_curve.json`` (:mod:`kmedtl.evaluation.learning_curves`; ``kmedtl evaluate``
  plots it in the report when the run folder has one);
* ``learning_curve.csv``: one row per (N, seed) -- ``n_per_class``, ``seed``,
  ``n_train``, the metric, ``seconds``;
* ``learning_curve.md``: the mean +- sd table (also printed);
* ``learning_curve.png``: mean with a +-1 sd band.

Example::

    >>> parse_sizes("25,50, all")
    [25, 50, 'all']
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections import Counter
from pathlib import Path

import keras
import numpy as np

from kmedtl.data.prepare import prepare, primary_input
from kmedtl.data.splits import per_class_subset
from kmedtl.errors import ConfigError
from kmedtl.evaluation.learning_curves import learning_curve, summarise_learning_curve
from kmedtl.evaluation.metrics import classification_metrics
from kmedtl.evaluation.stage import predict
from kmedtl.jsonio import atomic_write
from kmedtl.training.config import run_config
from kmedtl.training.stage import (
    build_model,
    check_weight_scaling,
    model_inputs,
    run_folder,
    targets_for,
)
from kmedtl.training.trainer import Trainer

log = logging.getLogger("kmedtl.training")

METRICS = ("balanced_accuracy", "accuracy", "kappa", "f1_macro", "auroc_macro")
FILES = {"json": "learning_curve.json", "csv": "learning_curve.csv",
         "md": "learning_curve.md", "png": "learning_curve.png"}


def parse_sizes(text: str, where: str = "--n") -> list:
    """``"25,50,all"`` -> ``[25, 50, "all"]``; every bad entry is a ConfigError naming it."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise ConfigError(f"{where}: give images per class, comma-separated, e.g. "
                          f"{where} 25,50,100,all")
    out: list = []
    for t in items:
        if t.lower() == "all":
            value = "all"
        else:
            try:
                value = int(t)
            except ValueError:
                raise ConfigError(f"{where}: {t!r} is not a number of images per class; give "
                                  f"positive integers or 'all', e.g. {where} 25,50,100,all"
                                  ) from None
            if value < 1:
                raise ConfigError(f"{where}: {value} images per class; each size must be >= 1 "
                                  f"(or 'all'), e.g. {where} 25,50,100,all")
        if value in out:
            raise ConfigError(f"{where}: {value!r} is listed twice")
        out.append(value)
    return out


def run_learning_curve(cfg, sizes, seeds: int = 3, *, out=None, fold: int = 0,
                       metric: str = "balanced_accuracy", label: str = "config") -> dict:
    """Train and score every (size, seed); write the files above.  Returns
    ``{"results": {n: [metric per seed]}, "rows": [...], "files": {kind: path},
    "markdown": str, "sizes": {n: label}}``."""
    # lazy: tf.data loads TensorFlow, absent under KERAS_BACKEND=jax
    from kmedtl.data.pipeline import make_dataset

    if isinstance(sizes, str):
        sizes = parse_sizes(sizes)
    if int(seeds) < 1:
        raise ConfigError(f"--seeds: {seeds}; give the number of seeds, >= 1")
    if metric not in METRICS:
        raise ConfigError(f"--metric: {metric!r} is not one of {list(METRICS)}")
    cfg = run_config(cfg, label).derive(label, train={"verbose": 0, "tensorboard": False})
    tc = cfg.train
    if tc.model == "staged":
        raise ConfigError("train.model: learning-curve trains one Keras model per point; use "
                          "flat, hierarchical or multi_input (e.g. --set train.model=hierarchical)")
    check_weight_scaling(tc)
    inputs = model_inputs(cfg)
    primary = primary_input(cfg.data)
    out_dir = Path(out) if out else run_folder(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    prep = prepare(cfg)
    if not 0 <= fold < len(prep.splits.folds):
        raise ConfigError(f"--fold {fold}: the split has {len(prep.splits.folds)} fold(s)")
    h = prep.hierarchy
    train_samples = prep.samples("train", fold)
    val_samples, test_samples = prep.samples("val", fold), prep.samples("test", fold)
    if not train_samples or not test_samples:
        raise ConfigError("split: the learning curve needs non-empty train and test splits "
                          f"(got {len(train_samples)} train, {len(test_samples)} test)")
    leaf_of = {s.id: h.leaf_of(s.label) for s in train_samples}
    counts = Counter(leaf_of.values())
    n_all = max(counts.values())
    keys, names = [], {}
    for s in sizes:
        n = n_all if s == "all" else int(s)
        if n in names:
            raise ConfigError(f"--n: {s!r} and {names[n]!r} are the same size here (the "
                              f"largest class has {n_all} training images)")
        if s != "all" and n > min(counts.values()):
            log.warning("learning curve: n=%d is more than class(es) %s have; they use all "
                        "their images", n, sorted(c for c, k in counts.items() if k < n))
        keys.append(n)
        names[n] = "all" if s == "all" else str(n)
    seed_list = [tc.seed + i for i in range(int(seeds))]
    by_id = {s.id: s for s in train_samples}
    ids = [s.id for s in train_samples]
    labels = [leaf_of[i] for i in ids]
    common = dict(hierarchy=h, options=prep.options, cache=prep.cache,
                  batch_size=tc.batch_size, targets=targets_for(tc), normalization="unit",
                  decoder=cfg.data.decoder, primary_input=primary)
    val_ds = make_dataset(val_samples, **common) if val_samples else None
    rows: list[dict] = []
    paths = {k: out_dir / v for k, v in FILES.items()}

    def train_fn(n, seed):
        t0 = time.perf_counter()
        subset = [by_id[i] for i in per_class_subset(ids, labels, n, seed=seed)]
        keras.utils.set_random_seed(seed)
        train_ds = make_dataset(subset, training=True, seed=seed,
                                augment=cfg.augmentation(seed=seed), balance=cfg.data.balance,
                                **common)
        steps = tc.steps_per_epoch or (math.ceil(len(subset) / tc.batch_size)
                                       if cfg.data.balance == "sampling" else None)
        model = build_model(tc.derive(seed=seed), h, prep.options.shape, inputs)
        Trainer(model, tc, seed=seed).fit(train_ds, val_ds, steps_per_epoch=steps,
                                          evaluate=False)
        pred = predict(model, test_samples, h, prep.options, batch_size=tc.batch_size,
                       decoder=cfg.data.decoder, primary_input=primary)
        value = classification_metrics(pred.y, pred.leaf_probs, list(h.leaves))[metric]
        rows.append({"n_per_class": names[n], "seed": seed, "n_train": len(subset),
                     "n_test": len(pred.y), metric: float(value),
                     "seconds": round(time.perf_counter() - t0, 3)})
        _write_csv(paths["csv"], rows, metric)
        keras.backend.clear_session()
        return value

    results = learning_curve(train_fn, keys, seed_list, metric=metric, path=paths["json"],
                             plot_path=paths["png"])
    summary = summarise_learning_curve(results)
    md = [f"Learning curve: test {metric} against training images per class "
          f"({len(seed_list)} seed(s); test split: {len(test_samples)} images, fold {fold})",
          "", f"| images per class | n train | mean {metric} | sd | per seed |",
          "|---|---|---|---|---|"]
    for n, s in summary.items():
        n_train = [r["n_train"] for r in rows if r["n_per_class"] == names[n]]
        mean = "-" if s.get("mean") is None else f"{s['mean']:.4f}"
        sd = "-" if s.get("sd") is None or not np.isfinite(s["sd"]) else f"{s['sd']:.4f}"
        md.append(f"| {names[n]} | {min(n_train)} | {mean} | {sd} | "
                  + ", ".join(f"{v:.4f}" for v in s["values"]) + " |")
    text = "\n".join(md) + "\n"
    paths["md"].write_text(text)
    return {"results": results, "rows": rows, "files": {k: str(p) for k, p in paths.items()},
            "markdown": text, "sizes": names, "metric": metric}


def _write_csv(path: Path, rows: list[dict], metric: str) -> None:
    def write(fh):
        w = csv.DictWriter(fh, ["n_per_class", "seed", "n_train", "n_test", metric, "seconds"])
        w.writeheader()
        w.writerows(rows)

    atomic_write(path, write, newline="")


__all__ = ["FILES", "METRICS", "parse_sizes", "run_learning_curve"]
