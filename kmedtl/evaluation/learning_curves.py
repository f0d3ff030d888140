"""Learning curves: a metric against the number of training images per class, over seeds.

Training at N = 25, 50, 100, 200 ... images per class is orchestrated by the pipelines;
here :func:`learning_curve` calls a user function ``train_fn(n, seed) -> metric`` for every
size and seed, collects ``{n: [metric per seed]}``, and optionally writes
``learning_curve.json`` and a PNG.  ``kmedtl evaluate`` plots ``learning_curve.json`` when
the run folder has one.

File format (``learning_curve.json``)::

    {"kind": "kmedtl-learning-curve", "metric": "balanced_accuracy",
     "results": {"25": [0.61, 0.58, 0.64], "50": [...]},
     "summary": {"25": {"mean": .., "sd": .., "n": 3, "values": [...]}, ...}}

Example::

    >>> res = learning_curve(lambda n, seed: 1 - 1 / n, sizes=[25, 50], seeds=[0, 1])
    >>> sorted(res)
    [25, 50]
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping

from kmedtl.errors import ConfigError
from kmedtl.evaluation import plots
from kmedtl.evaluation.uncertainty import mean_sd
from kmedtl.jsonio import atomic_write

log = logging.getLogger("kmedtl.evaluation")

FILE_NAME = "learning_curve.json"


def learning_curve(train_fn: Callable[[int, int], float], sizes: Iterable[int],
                   seeds: Iterable[int], *, metric: str = "metric", path=None,
                   plot_path=None) -> dict[int, list[float]]:
    """Run ``train_fn(n, seed)`` for every size and seed; ``{n: [metric per seed]}``.

    ``path`` writes ``learning_curve.json`` (after every run, so a crash keeps what was
    done); ``plot_path`` writes the PNG (mean with a +-1 sd band).
    """
    sizes, seeds = [int(n) for n in sizes], list(seeds)
    if not sizes or not seeds:
        raise ConfigError("learning_curve: give at least one size and one seed")
    results: dict[int, list[float]] = {}
    for n in sizes:
        for seed in seeds:
            value = float(train_fn(n, seed))
            log.info("learning curve: n=%d seed=%s %s=%.4f", n, seed, metric, value)
            results.setdefault(n, []).append(value)
            if path is not None:
                save_learning_curve(path, results, metric)
    if plot_path is not None:
        plots.save(plots.plot_learning_curve(results, metric), plot_path)
    return results


def summarise_learning_curve(results: Mapping) -> dict[int, dict]:
    """``{n: {"mean", "sd", "n", "values"}}`` in increasing ``n``."""
    return {int(n): mean_sd(results[n]) for n in sorted(results, key=int)}


def save_learning_curve(path, results: Mapping, metric: str = "metric") -> str:
    path = os.fspath(path)
    data = {"kind": "kmedtl-learning-curve", "metric": metric,
            "results": {str(int(n)): [float(v) for v in results[n]]
                        for n in sorted(results, key=int)},
            "summary": {str(n): s for n, s in summarise_learning_curve(results).items()}}
    return atomic_write(path, lambda fh: json.dump(data, fh, indent=1))


def load_learning_curve(path) -> tuple[dict[int, list[float]], str]:
    """``(results, metric)`` from a ``learning_curve.json``."""
    with open(path) as fh:
        data = json.load(fh)
    if data.get("kind") != "kmedtl-learning-curve":
        raise ConfigError(f"{path}: not a kmedtl learning-curve file")
    return {int(n): list(v) for n, v in data["results"].items()}, data.get("metric", "metric")
