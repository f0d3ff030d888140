"""The grid runner: arms x N per class x seeds, one JSON row per finished cell.

Layout of the output folder (default ``runs/study``)::

    runs/study/
      split.json              the duplicate-free split: counts, test labels, fingerprint
      pretrain/<key>.weights.h5, <key>.json   same-domain pretrained backbones
      cells/<key>.json        one finished cell: arm recipe, N, seed, test-set metrics with
                              bootstrap CIs, test probabilities, timings
      cells/<key>.error.json  a cell that raised (retried on the next run)
      status.json             planned / done / not-run cells of the last run
      log.txt                 (when started with nohup ... > log.txt)

A cell's key is a digest of everything that determines its result (split fingerprint,
resolved training recipe, initialisation incl. the pretraining recipe and pool, N, seed),
so identical cells of different comparisons are trained once and shared, and a rerun with
``--resume`` skips every cell already in ``cells/``.  Cells run in the order N (small
first), seed, comparison, arm, so a run stopped by its time budget leaves complete,
paired columns for the smaller N.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from kmedtl.errors import ConfigError
from kmedtl.study.config import StudyConfig

log = logging.getLogger("kmedtl.study")


def _str_keys(obj):
    if isinstance(obj, dict):
        return {str(k): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_str_keys(v) for v in obj]
    return obj


def _key(obj) -> str:
    text = json.dumps(_str_keys(obj), sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=_default)
    os.replace(tmp, path)


def _default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


@dataclass
class Cell:
    study: str
    arm: str
    n: object
    seed: int
    key: str
    recipe: dict
    init: str
    pretrain_key: str | None = None
    n_folds: int = 2
    skip_reason: str | None = None  # not applicable (never run)
    shared_with: list = field(default_factory=list)


def hardware() -> dict:
    import keras
    import tensorflow as tf

    return {"cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "backend": keras.backend.backend(),
            "gpus": len(tf.config.list_physical_devices("GPU"))}


class StudyRunner:
    """Plan and run the cells of one or more studies (comparisons) on one shared split."""

    def __init__(self, studies: list[StudyConfig], out="runs/study"):
        if not studies:
            raise ConfigError("give at least one study file")
        d0 = studies[0].data.model_dump()
        for s in studies[1:]:
            if s.data.model_dump() != d0:
                raise ConfigError(f"{s.source}: data: differs from {studies[0].source}; "
                                  "studies run together must share one split")
        self.studies = studies
        self.out = Path(out)
        self.split = None
        self._other: dict = {}  # other datasets' splits (cross-domain pretraining), by spec

    # ------------------------------------------------------------------ planning
    def load(self):
        from kmedtl.study.data import load_split

        if self.split is None:
            self.split = load_split(self.studies[0].data)
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / "split.json", {
                "kind": "kmedtl-study-split", "fingerprint": self.split.fingerprint,
                "summary": self.split.summary, "leaves": list(self.split.hierarchy.leaves),
                "y_test": self.split.y_test.tolist(),
                "test_ids": [os.path.relpath(self.split.ids[i], self.studies[0].data.root)
                             for i in self.split.test_rows]})
        return self.split

    def _pool(self, spec=None, seed: int | None = None):
        sizes = {str(n): n for s in self.studies for n in s.grid.sizes}
        if spec is not None and spec.pool == "per_seed":
            seeds = [seed]
        else:
            seeds = sorted({x for s in self.studies for x in s.grid.seeds})
        return self.split.pretrain_pool(list(sizes.values()), seeds)

    def pretrain_key(self, study: StudyConfig, name: str, seed: int) -> str:
        spec_obj = study.pretrain[name]
        spec = spec_obj.model_dump()
        if spec["pool"] == "shared":  # keys of shared pools predate the field
            del spec["pool"]
        if spec["weights"] is None:  # keys of specs without it predate the field
            del spec["weights"]
        del spec["data"]  # an absolute path: the other split's fingerprint stands for it
        spec["backbone"] = spec["backbone"] or study.train.get("backbone", "cbr_small")
        if spec_obj.weights == "imagenet":  # trained with the study's recipe
            spec["recipe"] = {k: v for k, v in study.train.items() if k != "epochs"}
        if spec_obj.data is not None:  # another dataset: all of its images
            other = self.other_split(spec_obj.data)
            return _key({"fp": self.split.fingerprint, "spec": spec,
                         "other_fp": other.fingerprint,
                         "other_leaves": list(other.hierarchy.leaves)})
        pool = self._pool(spec_obj, seed)
        # Image paths relative to the data root, as in the split's fingerprint: the key
        # must not depend on where this machine keeps the datasets.
        ids = [os.path.relpath(self.split.ids[i], study.data.root) for i in pool]
        return _key({"fp": self.split.fingerprint, "spec": spec,
                     "pool": ids[:: max(1, len(pool) // 500)], "pool_n": len(pool)})

    def other_split(self, data):
        """The split of another dataset (cross-domain pretraining), loaded once."""
        from kmedtl.study.data import load_split

        k = json.dumps(data.model_dump(), sort_keys=True)
        if k not in self._other:
            self._other[k] = load_split(data)
        return self._other[k]

    def _cell_key(self, recipe: dict, n, seed: int, pkey, arm) -> str:
        """The digest of what determines a cell's result.  ``train.epochs`` enters as the
        epoch count of this N, so adding an N to the grid (a new ``{N: epochs}`` entry)
        keeps every finished cell.  Cells finished under the first scheme (the whole epochs
        mapping in the digest) are still found: that key is used while its file exists and
        the new one's does not."""
        from kmedtl.study.training import epochs_for

        def ident(r):
            d = {"fp": self.split.fingerprint, "recipe": r, "n": str(n), "seed": seed,
                 "init": pkey or "scratch"}
            if r.get("model") == "staged":
                d["n_folds"] = arm.n_folds
            return _key(d)

        legacy = ident(recipe)
        if not isinstance(recipe.get("epochs"), dict):
            return legacy
        try:
            resolved = {**recipe, "epochs": epochs_for(recipe["epochs"], n)}
        except KeyError:
            return legacy  # reported when the cell runs
        key = ident(resolved)
        if not self.done(key) and self.done(legacy):
            return legacy
        return key

    def plan(self) -> list[Cell]:
        """Every cell of every study, deduplicated by key, in run order."""
        self.load()
        order = {}
        for s in self.studies:
            for n in s.grid.sizes:
                order.setdefault(str(n), (1e9 if n == "all" else int(n)))
        cells: dict[str, Cell] = {}
        planned = []
        for si, s in enumerate(self.studies):
            for ai, arm in enumerate(s.arms):
                recipe = {**s.train, **arm.train}
                for n in s.sizes_of(arm):
                    for seed in s.grid.seeds:
                        pkey = (self.pretrain_key(s, arm.init, seed) if arm.init != "scratch"
                                else None)
                        skip = None
                        if arm.init != "scratch" and n == "all":
                            skip = ("not applicable: with N = all every training image is "
                                    "in the fine-tuning set, none is left to pretrain on")
                        k = self._cell_key(recipe, n, seed, pkey, arm)
                        c = Cell(s.name, arm.name, n, int(seed), k, recipe, arm.init, pkey,
                                 arm.n_folds, skip)
                        planned.append(((order[str(n)], seed, si, ai), c))
        planned.sort(key=lambda t: t[0])
        out = []
        for _, c in planned:
            if c.key in cells:
                cells[c.key].shared_with.append((c.study, c.arm))
                continue
            cells[c.key] = c
            out.append(c)
        self.cells = out
        self.all_planned = [c for _, c in planned]
        return out

    # ------------------------------------------------------------------ files
    def cell_path(self, key: str) -> Path:
        return self.out / "cells" / f"{key}.json"

    def done(self, key: str) -> bool:
        return self.cell_path(key).exists()

    def read_cell(self, key: str) -> dict | None:
        p = self.cell_path(key)
        if not p.exists():
            return None
        with open(p) as fh:
            return json.load(fh)

    # ------------------------------------------------------------------ running
    def _pretrained(self, cell: Cell, study: StudyConfig) -> str:
        from kmedtl.study.training import pretrain

        path = self.out / "pretrain" / f"{cell.pretrain_key}.weights.h5"
        meta = path.with_suffix("").with_suffix(".json")
        if path.exists() and meta.exists():
            return str(path)
        spec = study.pretrain[cell.init]
        if spec.data is not None:
            source = self.other_split(spec.data)
            pool = np.arange(len(source.ids))  # every image of the other dataset
        else:
            source = self.split
            pool = self._pool(spec, cell.seed)
        if len(pool) < 2 * spec.batch_size:
            raise ConfigError(f"pretrain.{cell.init}: only {len(pool)} training images lie "
                              "outside every small subset; lower grid.sizes or batch_size")
        log.info("pretraining %s (%s%s) on %d images%s", cell.init, spec.method,
                 f", from {spec.data.root}" if spec.data is not None else "", len(pool),
                 f" (capped at {spec.max_images})" if spec.max_images else "")
        info = pretrain(source, spec, pool, path,
                        study.train.get("backbone", "cbr_small"),
                        recipe=study.train if spec.weights == "imagenet" else None)
        if spec.data is not None:
            info["data_root"] = os.path.relpath(spec.data.root, study.data.root)
        info.update(name=cell.init, study=study.name, key=cell.pretrain_key, pool=spec.pool,
                    seed=cell.seed if spec.pool == "per_seed" else None)
        _write_json(meta, info)
        log.info("pretrained %s in %.0f s", cell.init, info["seconds"])
        return str(path)

    def run(self, resume: bool = False, overwrite: bool = False,
            max_minutes: float | None = None) -> dict:
        """Train every planned cell not yet done; returns the status dict (also written to
        ``status.json``)."""
        from kmedtl.study.stats import cell_metrics
        from kmedtl.study.training import train_cell

        cells = self.plan()
        studies = {s.name: s for s in self.studies}
        runnable = [c for c in cells if c.skip_reason is None]
        finished = [c for c in runnable if self.done(c.key)]
        if finished and not (resume or overwrite):
            raise ConfigError(f"{self.out}: already holds {len(finished)} finished cell(s) of "
                              "these studies; pass --resume to skip them or --overwrite to "
                              "train them again")
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        budgets = [s.budget_minutes for s in self.studies if s.budget_minutes]
        if max_minutes is None and budgets:
            max_minutes = min(budgets)
        t_start = time.perf_counter()
        deadline = t_start + 60 * max_minutes if max_minutes else None
        hw = hardware()
        ran, failed, stopped = 0, 0, []
        todo = [c for c in runnable if overwrite or not self.done(c.key)]
        log.info("%d cells planned (%d unique, %d not applicable), %d to run",
                 len(self.all_planned), len(cells), len(cells) - len(runnable), len(todo))
        for i, c in enumerate(todo):
            if deadline and time.perf_counter() > deadline:
                stopped = [x.key for x in todo[i:]]
                log.info("time budget of %.0f min spent: %d cell(s) left for --resume",
                         max_minutes, len(stopped))
                break
            study = studies[c.study]
            log.info("[%d/%d] %s/%s N=%s seed=%d", i + 1, len(todo), c.study, c.arm, c.n,
                     c.seed)
            err = self.cell_path(c.key).with_suffix(".error.json")
            try:
                weights = self._pretrained(c, study) if c.init != "scratch" else None
                info = train_cell(self.split, c.recipe, c.n, c.seed, weights=weights,
                                  n_folds=c.n_folds,
                                  recalibrate=c.recipe.get("recalibrate_bn", True))
                probs = info.pop("probs")
                metrics = cell_metrics(self.split.y_test, probs, study.evaluation.n_boot,
                                       study.evaluation.alpha, seed=c.seed)
            except Exception as exc:  # one failing cell must not end the study
                failed += 1
                log.error("cell %s/%s N=%s seed=%d failed: %s", c.study, c.arm, c.n, c.seed,
                          exc)
                _write_json(err, {"key": c.key, "study": c.study, "arm": c.arm, "n": c.n,
                                  "seed": c.seed, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()})
                continue
            err.unlink(missing_ok=True)
            row = {"kind": "kmedtl-study-cell", "version": 1, "key": c.key,
                   "study": c.study, "arm": c.arm, "shared_with": c.shared_with,
                   "n": c.n, "seed": c.seed, "init": c.init, "pretrain_key": c.pretrain_key,
                   "recipe": c.recipe, **info, "metrics": metrics,
                   "probs": np.round(probs, 6).tolist(),
                   "fingerprint": self.split.fingerprint, "hardware": hw,
                   "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
            _write_json(self.cell_path(c.key), row)
            ran += 1
            m = metrics[study.evaluation.primary]
            log.info("    %s = %.3f (%.3f-%.3f) in %.0f s", study.evaluation.primary,
                     m["value"], m["ci_low"] or float("nan"), m["ci_high"] or float("nan"),
                     info["seconds"])
        status = {"kind": "kmedtl-study-status", "studies": [s.source for s in self.studies],
                  "planned_unique": len(cells), "not_applicable": len(cells) - len(runnable),
                  "ran_now": ran, "failed_now": failed,
                  "done": sum(self.done(c.key) for c in runnable),
                  "stopped_by_budget": len(stopped), "max_minutes": max_minutes,
                  "wall_seconds": round(time.perf_counter() - t_start, 1),
                  "hardware": hw,
                  "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
        _write_json(self.out / "status.json", status)
        return status
