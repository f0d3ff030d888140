"""Leakage-free splits: stratified by class, grouped by patient *and* by duplicate.

Every sample gets a group id; samples sharing a patient, an exact duplicate (same
SHA-256) or a near duplicate (perceptual hash within a threshold) share a group, and a
group never straddles two splits.  Holdout, k-fold and repeated splits use
scikit-learn's ``StratifiedGroupKFold``; "N images per class" subsets are nested (the
25-image subset is inside the 50-image one) so learning curves compare like with like.
Everything is reproducible from ``seed`` and can be written to / read from a split file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from kmedtl.errors import ConfigError
from kmedtl.jsonio import atomic_write


class _UnionFind:
    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, i):
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def leakage_groups(ids: list[str], patients: dict | None = None, digests: dict | None = None,
                   near_pairs: list[tuple[str, str]] = ()) -> np.ndarray:
    """Group id per sample id: connected components of same-patient, same-file-content and
    near-duplicate links."""
    pos = {s: i for i, s in enumerate(ids)}
    uf = _UnionFind(len(ids))
    for mapping in (patients or {}, digests or {}):
        first: dict = {}
        for sid, key in mapping.items():
            if key is None or sid not in pos:
                continue
            if key in first:
                uf.union(first[key], pos[sid])
            else:
                first[key] = pos[sid]
    for a, b in near_pairs:
        if a in pos and b in pos:
            uf.union(pos[a], pos[b])
    roots = [uf.find(i) for i in range(len(ids))]
    _, group = np.unique(roots, return_inverse=True)
    return group


@dataclass
class Fold:
    train: list[str]
    val: list[str]
    test: list[str]

    def to_dict(self):
        return {"train": self.train, "val": self.val, "test": self.test}

    def assignment(self) -> dict[str, str]:
        out = {}
        for name in ("train", "val", "test"):
            for sid in getattr(self, name):
                out[sid] = name
        return out


@dataclass
class Splits:
    """One or more folds plus how they were made (``method``, ``seed``, ``params``)."""

    method: str
    seed: int
    folds: list[Fold]
    params: dict = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)

    def stored(self, root: str | None = None) -> dict:
        """The split file's content; ids are stored relative to ``root`` when given (ids
        outside ``root``, e.g. absolute paths in a manifest, stay as they are: ``load``
        joins a relative id to the root, which would not give the id back for ``../``
        paths)."""
        def rel(s):
            if not root:
                return s
            r = os.path.relpath(s, root)
            return s if r == os.pardir or r.startswith(os.pardir + os.sep) else r
        return {"kind": "kmedtl-splits", "version": 1, "method": self.method, "seed": self.seed,
                "params": self.params, "root": root,
                "folds": [{k: [rel(s) for s in v] for k, v in f.to_dict().items()}
                          for f in self.folds],
                "dropped": [dict(d, id=rel(d["id"])) for d in self.dropped]}

    def save(self, path, root: str | None = None):
        """Write the split file (:meth:`stored`), atomically."""
        data = self.stored(root)
        atomic_write(path, lambda fh: json.dump(data, fh, indent=1))

    @classmethod
    def load(cls, path, root: str | None = None) -> Splits:
        with open(path) as fh:
            data = json.load(fh)
        if data.get("kind") != "kmedtl-splits":
            raise ConfigError(f"{path}: not a kmedtl split file (kind={data.get('kind')!r})")
        base = root or data.get("root")
        absolute = (lambda s: os.path.join(base, s)) if base else (lambda s: s)
        folds = [Fold(*[[absolute(s) for s in f[k]] for k in ("train", "val", "test")])
                 for f in data["folds"]]
        return cls(data["method"], data["seed"], folds, data.get("params", {}),
                   [dict(d, id=absolute(d["id"])) for d in data.get("dropped", [])])


def _sgkf_take(idx, labels, groups, fraction, seed, what="split"):
    """Split ``idx`` into (rest, held) with ~``fraction`` held out, stratified and grouped."""
    if fraction <= 0:
        return idx, idx[:0]
    n_splits = max(2, int(round(1.0 / fraction)))
    n_groups = len(np.unique(groups[idx]))
    if n_groups < n_splits:
        raise ConfigError(f"split: {n_groups} independent groups cannot be split into "
                          f"{n_splits} parts; use a smaller fraction or more data")
    _, counts = np.unique(labels[idx], return_counts=True)
    if counts.max() < n_splits:  # scikit-learn's own message names neither field nor fix
        raise ConfigError(
            f"{what}: holding out {fraction:.0%} of {len(idx)} images stratified by class "
            f"needs a class of at least {n_splits} images; the largest here has "
            f"{counts.max()}; use a smaller {what} (or 0), split.method: kfold, or more data")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, held = next(sgkf.split(idx, labels[idx], groups[idx]))
    return idx[rest], idx[held]


def holdout(ids, labels, groups, val=0.15, test=0.15, seed=0) -> Splits:
    """One stratified, grouped train/val/test split."""
    _check_fractions(val, test)
    ids, labels, groups = list(ids), np.asarray(labels), np.asarray(groups)
    idx = np.arange(len(ids))
    rest, te = _sgkf_take(idx, labels, groups, test, seed, "split.test")
    tr, va = _sgkf_take(rest, labels, groups, val / (1.0 - test) if val else 0.0, seed + 1,
                        "split.val")
    fold = Fold(*[[ids[i] for i in sorted(part)] for part in (tr, va, te)])
    return Splits("holdout", seed, [fold], {"val": val, "test": test})


def kfold(ids, labels, groups, k=5, val=0.15, seed=0) -> Splits:
    """k stratified grouped folds; each test fold once, a val part carved from the rest."""
    if k < 2:
        raise ConfigError(f"split.k: need at least 2 folds, got {k}")
    ids, labels, groups = list(ids), np.asarray(labels), np.asarray(groups)
    idx = np.arange(len(ids))
    folds = []
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (rest, te) in enumerate(sgkf.split(idx, labels, groups)):
        tr, va = _sgkf_take(idx[rest], labels, groups, val / (1 - 1 / k) if val else 0.0,
                            seed + 1 + f, "split.val")
        folds.append(Fold(*[[ids[i] for i in sorted(p)] for p in (tr, va, idx[te])]))
    return Splits("kfold", seed, folds, {"k": k, "val": val})


def repeated(ids, labels, groups, repeats=5, val=0.15, test=0.15, seed=0) -> Splits:
    """``repeats`` independent holdout splits with seeds seed, seed+1, ..."""
    folds = [holdout(ids, labels, groups, val, test, seed + 1000 * r).folds[0]
             for r in range(repeats)]
    return Splits("repeated", seed, folds, {"repeats": repeats, "val": val, "test": test})


def source_split(ids, labels, groups, source_splits, val=0.15, seed=0) -> Splits:
    """Keep the split the data came with (e.g. ``Training``/``Testing`` folders), made
    leakage-free: training samples that share a group with any test sample are dropped
    (and listed in ``dropped``), and a validation part is carved from training when the
    source has none."""
    ids, labels, groups = list(ids), np.asarray(labels), np.asarray(groups)
    split = np.asarray([s or "train" for s in source_splits])
    test_groups = set(groups[split == "test"].tolist())
    dropped = []
    keep = []
    for i in np.nonzero(split != "test")[0]:
        if groups[i] in test_groups:
            dropped.append({"id": ids[i], "reason": "same patient or duplicate image as a "
                            "test sample"})
        else:
            keep.append(i)
    keep = np.asarray(keep, dtype=int)
    val_groups = set(groups[split == "val"].tolist())
    if val_groups:
        kept_val = [i for i in keep if split[i] == "val"]
        tr = [i for i in keep if split[i] == "train" and groups[i] not in val_groups]
        dropped += [{"id": ids[i], "reason": "same patient or duplicate image as a val sample"}
                    for i in keep if split[i] == "train" and groups[i] in val_groups]
        va = kept_val
    else:
        tr, va = _sgkf_take(keep, labels, groups, val, seed, "split.val")
    te = np.nonzero(split == "test")[0]
    fold = Fold(*[[ids[i] for i in sorted(p)] for p in (tr, va, te)])
    return Splits("source", seed, [fold], {"val": val}, dropped)


def per_class_subset(ids, labels, n: int | None, seed=0) -> list[str]:
    """Up to ``n`` samples per class, nested across ``n`` for a fixed seed."""
    if n is None:
        return list(ids)
    if n < 1:
        raise ConfigError(f"split.n_per_class: must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    ids, labels = list(ids), np.asarray(labels)
    order = rng.permutation(len(ids))
    taken: dict = {}
    out = []
    for i in order:
        c = labels[i]
        if taken.get(c, 0) < n:
            taken[c] = taken.get(c, 0) + 1
            out.append(ids[i])
    return sorted(out)


def _check_fractions(val, test):
    if not (0 <= val < 1 and 0 < test < 1 and val + test < 1):
        raise ConfigError(f"split: need 0 <= val, 0 < test and val + test < 1, got val={val}, "
                          f"test={test}")


def check_no_leak(splits: Splits, groups_by_id: dict[str, int]) -> list[str]:
    """Problems found: any group on more than one side of any fold (empty list = clean)."""
    problems = []
    for f, fold in enumerate(splits.folds):
        side: dict = {}
        for name, sid in ((n, s) for n in ("train", "val", "test") for s in getattr(fold, n)):
            g = groups_by_id[sid]
            if g in side and side[g] != name:
                problems.append(f"fold {f}: group {g} in both {side[g]} and {name}")
            side.setdefault(g, name)
    return problems
