"""The study's data: one duplicate-free split, loaded once into memory.

1. :func:`kmedtl.data.prepare.prepare` indexes, audits and caches the images and makes the
   leakage-free split: ``test: source`` keeps the dataset's own ``Testing`` folder and drops
   every training image that shares an exact (SHA-256) or near (pHash within
   ``near_threshold`` bits) duplicate group with a test image; ``test: holdout`` holds out a
   stratified, grouped ``test_fraction`` instead.
2. Within each side, every duplicate group is cut down to one image (the first by file
   path), and groups whose copies carry different labels are dropped altogether, so the
   training subsets contain no duplicate pair and the test set counts each image once.
3. ``subset(n, seed)``: :func:`kmedtl.data.splits.per_class_subset` of the training pool --
   nested across ``n`` for a fixed seed (the N=25 subset lies inside the N=50 one).
4. ``pretrain_pool(...)``: the training pool minus every small subset of every seed, i.e.
   images that no fine-tuning cell with finite N ever sees.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from kmedtl.config import load_config
from kmedtl.data import splits as splitlib
from kmedtl.data.pipeline import make_dataset
from kmedtl.data.prepare import prepare
from kmedtl.jsonio import digest_items
from kmedtl.study.config import StudyData
from kmedtl.training.features import materialise

log = logging.getLogger("kmedtl.study")


@dataclass
class StudySplit:
    hierarchy: object
    x: np.ndarray  # all kept images (train pool then test), float32 in [0, 1]
    y: np.ndarray  # leaf index per row
    ids: list[str]
    train_rows: np.ndarray
    test_rows: np.ndarray
    summary: dict = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def x_test(self):
        return self.x[self.test_rows]

    @property
    def y_test(self):
        return self.y[self.test_rows]

    def subset(self, n, seed: int) -> np.ndarray:
        """Rows of the N-per-class training subset (``n="all"``: the whole pool)."""
        ids = [self.ids[i] for i in self.train_rows]
        labels = self.y[self.train_rows]
        chosen = set(splitlib.per_class_subset(ids, labels, None if n == "all" else int(n),
                                               seed))
        return np.array([r for r in self.train_rows if self.ids[r] in chosen], dtype=int)

    def pretrain_pool(self, sizes, seeds) -> np.ndarray:
        """Training rows outside the largest finite subset of every seed (nested subsets:
        outside every finite subset)."""
        finite = [int(s) for s in sizes if s != "all"]
        used: set[int] = set()
        if finite:
            for seed in seeds:
                used.update(self.subset(max(finite), seed).tolist())
        return np.array([r for r in self.train_rows if r not in used], dtype=int)


def load_split(d: StudyData, progress: bool = False) -> StudySplit:
    """Prepare, dedupe and load the study split (see the module docstring)."""
    source = {"source": "folder", "root": d.root}
    if d.manifest:
        source = {"source": "manifest", "manifest": os.path.join(d.root, d.manifest),
                  "columns": d.columns}
    cfg = load_config({
        "name": "study",
        "data": {**source, "hierarchy": d.hierarchy,
                 "image": {"size": d.image_size, "channels": d.channels, "resize": "pad"},
                 "cache_dir": d.cache_dir},
        "split": {"method": d.test if d.test == "source" else "holdout", "val": 0.0,
                  "test": d.test_fraction, "seed": d.split_seed, "dedupe": d.dedupe,
                  "near_threshold": d.near_threshold},
    })
    prep = prepare(cfg, progress=progress)
    h = prep.hierarchy
    samples = prep.index.samples
    ids = [s.id for s in samples]
    leaf = {s.id: h.leaf_index(s.label) for s in samples}
    report = prep.report["_internal"]
    near = report["near_pairs"] if d.dedupe == "near" else ()
    # duplicate groups only: prepare() already kept each patient (a manifest's patient_id,
    # used in memory only) on one side of the split; here one image per duplicate group
    groups = splitlib.leakage_groups(ids, None, report["digests"], near)
    group_of = dict(zip(ids, groups.tolist()))
    labels_in_group: dict[int, set] = defaultdict(set)
    for i in ids:
        labels_in_group[group_of[i]].add(leaf[i])
    conflicting = {g for g, ls in labels_in_group.items() if len(ls) > 1}

    fold = prep.splits.folds[0]
    kept: dict[str, list[str]] = {}
    summary = {"indexed": len(ids), "dropped_train_leaking_into_test":
               len(prep.splits.dropped) if d.test == "source" else 0,
               "label_conflict_groups": len(conflicting)}
    for part in ("train", "test"):
        members = sorted(getattr(fold, part) + (fold.val if part == "train" else []))
        seen: set[int] = set()
        out, dup, conf = [], 0, 0
        for sid in members:
            g = group_of[sid]
            if g in conflicting:
                conf += 1
            elif g in seen:
                dup += 1
            else:
                seen.add(g)
                out.append(sid)
        kept[part] = out
        summary[f"{part}_duplicates_removed"] = dup
        summary[f"{part}_label_conflicts_removed"] = conf
    train_groups = {group_of[s] for s in kept["train"]}
    assert not train_groups & {group_of[s] for s in kept["test"]}, "duplicate across train/test"
    by_id = {s.id: s for s in samples}
    order = kept["train"] + kept["test"]
    ds = make_dataset([by_id[i] for i in order], h, prep.options, cache=prep.cache,
                      batch_size=512, targets="leaf")
    x, y = materialise(ds)
    n_train = len(kept["train"])
    leaves = list(h.leaves)
    for part, rows in (("train", y[:n_train]), ("test", y[n_train:])):
        c = Counter(int(v) for v in rows)
        summary[f"{part}_per_class"] = {leaves[k]: c.get(k, 0) for k in range(len(leaves))}
        summary[f"{part}_total"] = int(len(rows))
    summary["image"] = f"{d.image_size} px, {d.channels} channel(s), pad-resized"
    split = StudySplit(h, x.astype("float32"), y.astype(int), order,
                       np.arange(n_train), np.arange(n_train, len(order)), summary)
    # part of every cell key: its value must not change (tests/test_fingerprints.py)
    split.fingerprint = digest_items([d.image_size, d.channels, d.dedupe, d.near_threshold,
                                      d.test, d.test_fraction, d.split_seed,
                                      *[os.path.relpath(i, d.root) for i in order], "|",
                                      n_train])
    log.info("study split: %s", summary)
    return split
