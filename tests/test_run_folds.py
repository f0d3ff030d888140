"""``kmedtl run PIPELINE --folds all|K,K``: every cross-validation fold in its own run
folder, and ``folds/folds.json`` with the mean +- sd of each metric over the folds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_pipeline_run import write_pipeline

from kmedtl.cli import main as kmedtl_main
from kmedtl.errors import ConfigError
from kmedtl.pipeline import load_pipeline
from kmedtl.pipeline.runner import aggregate_folds, fold_count, format_folds, parse_folds

KFOLD = {"method": "kfold", "k": 3, "val": 0.2, "dedupe": "none"}


def test_parse_folds():
    assert parse_folds("all", 3) == [0, 1, 2]
    assert parse_folds("0,2", 3) == [0, 2]
    for bad, match in (("0,3", r"3 fold\(s\).*\[3\]"), ("one", "fold numbers"),
                       ("1,1", "twice"), ("", "3 fold")):
        with pytest.raises(ConfigError, match=match):
            parse_folds(bad, 3)


def test_fold_count_follows_the_split(tmp_path):
    def count(**split):
        return fold_count(load_pipeline(write_pipeline(tmp_path, split=split)))

    assert count(**KFOLD) == 3
    assert count(method="repeated", repeats=4) == 4
    assert count(method="holdout") == 1


def test_folds_refuses_a_one_fold_split_and_unknown_folds(tmp_path, capsys):
    holdout = write_pipeline(tmp_path, name="h.yaml")
    assert kmedtl_main(["run", str(holdout), "--folds", "all"]) == 2
    assert "split.method: kfold" in capsys.readouterr().err
    kfold = write_pipeline(tmp_path, name="k.yaml", split=KFOLD)
    assert kmedtl_main(["run", str(kfold), "--folds", "0,5"]) == 2
    assert "numbered 0 to 2" in capsys.readouterr().err
    assert kmedtl_main(["run", str(kfold), "--folds", "all", "--set", "pipeline.fold=1"]) == 2
    assert "--folds chooses the folds" in capsys.readouterr().err
    assert kmedtl_main(["run", str(kfold), "--folds", "all", "--until", "train"]) == 2
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.keras"))


def _metrics(tmp_path, k, acc, bal):
    d = tmp_path / f"fold_{k}"
    d.mkdir()
    iv = lambda v: {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1}  # noqa: E731
    (d / "metrics.json").write_text(json.dumps({
        "kind": "kmedtl-metrics", "n_test": 10 + k,
        "headline": {"accuracy": iv(acc), "balanced_accuracy": iv(bal)}}))
    return d


def test_aggregate_is_the_mean_and_sample_sd_of_the_fold_metrics(tmp_path):
    dirs = {k: _metrics(tmp_path, k, a, b) for k, a, b in ((0, 0.5, 0.4), (2, 0.7, 0.8))}
    agg = aggregate_folds(dirs)
    assert agg["folds"] == [0, 2] and [r["n_test"] for r in agg["per_fold"]] == [10, 12]
    acc = agg["summary"]["headline/accuracy"]
    assert acc["mean"] == pytest.approx(0.6) and acc["n"] == 2
    assert acc["sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    table = format_folds(agg)
    assert table.splitlines()[0].split()[:5] == ["metric", "fold", "0", "fold", "2"]
    assert "0.600 \u00b1 0.141 (n=2)" in table and "balanced_accuracy" in table
    (dirs[2] / "metrics.json").unlink()
    with pytest.raises(ConfigError, match="fold 2 has no metrics.json"):
        aggregate_folds(dirs)


@pytest.mark.slow
def test_kmedtl_run_folds_all_aggregates_every_fold(tmp_path, capsys):
    path = write_pipeline(tmp_path, per_class=6, split={**KFOLD, "k": 2},
                          stages=["audit", "split", "train", "evaluate", "export"],
                          train={"epochs": 1, "batch_size": 8})
    assert kmedtl_main(["run", str(path), "--folds", "all"]) == 0
    out = capsys.readouterr().out
    folds = tmp_path / "runs" / "pipe" / "folds"
    agg = json.loads((folds / "folds.json").read_text())
    assert agg["folds"] == [0, 1] and agg["n_folds"] == 2
    docs = [json.loads((folds / f"fold_{k}" / "metrics.json").read_text()) for k in (0, 1)]
    # each fold trained and evaluated on its own part of the split: other test cases
    for k in (0, 1):
        assert json.loads((folds / f"fold_{k}" / "train_metrics.json").read_text())["fold"] == k
    tested = [{line.split(",")[0] for line in (folds / f"fold_{k}" / "predictions.csv")
               .read_text().splitlines()[1:]} for k in (0, 1)]
    assert tested[0] and tested[1] and not tested[0] & tested[1]
    assert not (folds / "fold_0" / "export").exists()  # folds stop after evaluate
    headline = docs[0]["headline"]
    assert "balanced_accuracy" in headline
    for name, iv in headline.items():
        if not isinstance(iv, dict) or iv.get("value") is None:
            continue
        values = [d["headline"][name]["value"] for d in docs]
        s = agg["summary"][f"headline/{name}"]
        assert s["mean"] == pytest.approx(np.mean(values)), name
        assert s["sd"] == pytest.approx(np.std(values, ddof=1)), name
        assert s["values"] == pytest.approx(values)
    assert [r["metrics"]["headline/balanced_accuracy"] for r in agg["per_fold"]] == \
        [d["headline"]["balanced_accuracy"]["value"] for d in docs]
    assert "mean \u00b1 sd over folds [0, 1]" in out and "balanced_accuracy" in out
    # a second call reuses every finished fold
    assert kmedtl_main(["run", str(path), "--folds", "1"]) == 0
    assert "train     reused" in capsys.readouterr().out
