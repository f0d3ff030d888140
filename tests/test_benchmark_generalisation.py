"""``benchmarks/generalisation.py``'s in-domain table: the training arms on internal
validation (the data that chooses) and the internal test (the data that reports), paired
with ``pad`` seed by seed."""

from __future__ import annotations

import importlib.util

import numpy as np
from test_training_helpers import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "generalisation", REPO / "benchmarks" / "generalisation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _part(y, right):
    """Probabilities that get the first ``right`` images right and the rest wrong."""
    y = np.array(y)
    pred = np.where(np.arange(len(y)) < right, y, (y + 1) % 2)
    return {"y": y.tolist(), "plain": np.eye(2)[pred].tolist()}


def test_in_domain_table_pairs_each_arm_with_pad_seed_by_seed():
    bench = load_benchmark()
    y = [0, 1] * 5  # 10 images, balanced: balanced accuracy = right / 10
    right = {("pad", 0): (9, 7), ("pad", 1): (10, 6), ("crop", 0): (8, 8), ("crop", 1): (9, 9)}
    cells = [{"arm": a, "seed": s, "val": _part(y, v), "internal": _part(y, t)}
             for (a, s), (v, t) in right.items()]
    lines = bench._training_arms_in_domain(cells, ["pad", "crop"])
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in lines if ln.startswith("| ")}
    assert rows["pad"] == "| pad | 2 | 0.950 ± 0.071 | - | 0.650 ± 0.071 | - |"
    # crop: validation -0.1 on both seeds (chooses pad), internal test +0.1 and +0.3
    assert rows["crop"] == ("| crop | 2 | 0.850 ± 0.071 | -0.100, -0.100 | 0.850 ± 0.071 | "
                            "+0.100, +0.300 |")
