"""``kmedtl learning-curve CONFIG --n ... --seeds ...`` on a tiny synthetic config."""

from __future__ import annotations

import csv
import json

import pytest
from test_training_helpers import write_config

from kmedtl.cli import main as kmedtl_main
from kmedtl.errors import ConfigError
from kmedtl.training.learning_curve import parse_sizes


@pytest.mark.slow
def test_learning_curve_writes_table_json_and_plot(tmp_path, capsys):
    cfg = write_config(tmp_path, name="lc", train={"model": "flat", "epochs": 3}, per_class=10)
    out = tmp_path / "lc_out"
    rc = kmedtl_main(["learning-curve", str(cfg), "--n", "2,4,all", "--seeds", "2",
                      "--set", "train.epochs=1", "--set", "train.batch_size=4",
                      "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| images per class | n train | mean balanced_accuracy | sd | per seed |" in printed
    for name in ("learning_curve.csv", "learning_curve.json", "learning_curve.md",
                 "learning_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert f"wrote {out / name}" in printed
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "learning_curve.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["n_per_class"], r["seed"]) for r in rows] == [
        (n, s) for n in ("2", "4", "all") for s in ("0", "1")]  # one row per (N, seed)
    n_train = {(r["n_per_class"], r["seed"]): int(r["n_train"]) for r in rows}
    assert n_train[("2", "0")] == 6 and n_train[("4", "1")] == 12  # 3 classes x N
    assert n_train[("all", "0")] > 12 and n_train[("all", "0")] == n_train[("all", "1")]
    assert all(0.0 <= float(r["balanced_accuracy"]) <= 1.0 for r in rows)
    assert len({r["n_test"] for r in rows}) == 1  # the same fixed test split for every point
    doc = json.loads((out / "learning_curve.json").read_text())
    assert doc["kind"] == "kmedtl-learning-curve" and doc["metric"] == "balanced_accuracy"
    assert len(doc["results"]) == 3 and all(len(v) == 2 for v in doc["results"].values())
    md = (out / "learning_curve.md").read_text()
    assert md.count("\n| ") == 4 and "| all |" in md  # header + 3 sizes
    # the run folder is not touched when --out is given
    assert not (tmp_path / "runs" / "lc").exists()


def test_nested_subsets_per_seed():
    from kmedtl.data.splits import per_class_subset

    ids = [f"s{i}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    small = per_class_subset(ids, labels, 2, seed=1)
    large = per_class_subset(ids, labels, 5, seed=1)
    assert set(small) <= set(large) and len(small) == 6 and len(large) == 15


@pytest.mark.parametrize("text, message", [
    ("0", "--n: 0 images per class; each size must be >= 1"),
    ("25,-3", "--n: -3 images per class"),
    ("abc", "--n: 'abc' is not a number of images per class; give positive integers or 'all'"),
    ("25,,50", "--n: '' is not a number"),
    ("", "--n: give images per class, comma-separated"),
    ("25,25", "--n: 25 is listed twice"),
    ("2.5", "--n: '2.5' is not a number"),
])
def test_n_parsing_errors_are_clear(text, message):
    with pytest.raises(ConfigError) as err:
        parse_sizes(text)
    assert message in str(err.value)


def test_n_parsing():
    assert parse_sizes("25, 50,100,ALL") == [25, 50, 100, "all"]


def test_cli_errors_exit_2_with_the_message(tmp_path, capsys):
    cfg = write_config(tmp_path, name="lc", train={"model": "flat"}, per_class=4)
    assert kmedtl_main(["learning-curve", str(cfg), "--n", "0"]) == 2
    assert "--n: 0 images per class" in capsys.readouterr().err
    assert kmedtl_main(["learning-curve", str(cfg), "--n", "abc,5"]) == 2
    assert "'abc' is not a number of images per class" in capsys.readouterr().err
    assert kmedtl_main(["learning-curve", str(cfg), "--n", "2",
                        "--set", "train.model=staged"]) == 2
    assert "train.model: learning-curve trains one Keras model" in capsys.readouterr().err
    assert kmedtl_main(["learning-curve", str(cfg), "--n", "2",
                        "--set", "train.epochz=1"]) == 2
    assert "train.epochz: unknown field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kmedtl_main(["learning-curve", str(cfg), "--n", "2", "--seeds", "0"])
    assert "--seeds: 0: give at least 1 seed" in capsys.readouterr().err
