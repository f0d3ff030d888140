"""``benchmarks/train_loop.py`` (train stage vs bare step) runs every row on a tiny
hierarchical run config and writes what its table reports."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_training_helpers import REPO, write_config

pytestmark = pytest.mark.slow


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_loop",
                                                  REPO / "benchmarks" / "train_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_row_is_timed_on_the_same_epochs_and_images(tmp_path, capsys):
    bench = load_benchmark()
    cfg = write_config(tmp_path, train={"model": "hierarchical", "batch_size": 4},
                       per_class=8)
    out = tmp_path / "bench.json"
    assert bench.main(["--config", str(cfg), "--n-train", "12", "--epochs", "2",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["rows"]) == set(bench.ROWS)
    for row, runs in doc["rows"].items():
        (run,) = runs
        assert len(run["epoch_seconds"]) == 2, row
        assert run["images_per_epoch"] == 12, row  # 3 steps of 4 (the first 12 images)
        assert run["images_per_second"] > 0 and run["whole_images_per_second"] > 0, row
        # where each epoch's time went: one record per epoch, 3 steps counted in each
        assert len(run["usage"]) == 2, row
        for epoch in run["usage"]:
            assert epoch["wall"] > 0 and epoch["process_cpu"] > 0, row
            assert 0 < epoch["first_step"] <= epoch["wall"], row
            assert epoch["step_median"] <= epoch["step_max"] <= epoch["wall"], row
            assert epoch["validation"] >= 0 and epoch["after"] >= 0, row
            if row not in ("bare", "no_validation"):  # bare: the step alone
                assert epoch["validation"] > 0, row
        assert doc["images_per_second"][row] == run["images_per_second"]
    table = capsys.readouterr().out
    assert "| bare | " in table and "1.00x" in table
    for row in bench.ROWS:
        assert f"| {row} | " in table
