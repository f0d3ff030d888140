"""Paired comparison of two runs: one split shared through ``split.file``, per-case
predictions in ``predictions.csv``, ``kmedtl compare`` (bootstrap CI of the difference +
McNemar), and refusals when the cases differ."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from test_pipeline_run import pipeline_dict

from kmedtl.cli import main as kmedtl_main
from kmedtl.errors import ConfigError
from kmedtl.evaluation.compare import compare_runs
from kmedtl.pipeline import run_pipeline

LEAVES = ["normal", "glioma", "meningioma", "pituitary"]


def write_run(folder, ids, true, probs):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "frame", "true", "pred"] + [f"p_{c}" for c in LEAVES])
        for i, t, p in zip(ids, true, probs):
            w.writerow([i, "", LEAVES[t], LEAVES[int(np.argmax(p))]] + list(p))
    return folder


def onehot(pred):
    out = np.full((len(pred), 4), 0.02)
    out[np.arange(len(pred)), pred] = 0.94
    return out


def test_compare_counts_discordant_cases_and_orders_by_id(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    true = rng.integers(0, 4, n)
    pred_a = true.copy()
    pred_b = true.copy()
    pred_a[:10] = (true[:10] + 1) % 4          # A wrong on 10
    pred_b[10:50] = (true[10:50] + 1) % 4      # B wrong on 40 others
    ids = [f"img{k:03d}.jpg" for k in range(n)]
    a = write_run(tmp_path / "a", ids, true, onehot(pred_a))
    order = rng.permutation(n)  # B lists the cases in another order
    b = write_run(tmp_path / "b", [ids[k] for k in order], true[order], onehot(pred_b)[order])
    res = compare_runs(a, b, metric="accuracy", n_boot=300)
    assert res["n"] == n
    assert res["a"]["value"] == pytest.approx(0.95) and res["b"]["value"] == pytest.approx(0.80)
    assert res["difference"]["value"] == pytest.approx(0.15)
    assert res["difference"]["ci_low"] > 0
    assert (res["mcnemar"]["b"], res["mcnemar"]["c"]) == (40, 10)
    assert res["mcnemar"]["p_value"] < 1e-4
    out = tmp_path / "cmp.json"
    assert kmedtl_main(["compare", str(a), str(b), "--n-boot", "200", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["metric"] == "balanced_accuracy"


def test_compare_refuses_different_case_sets_and_missing_predictions(tmp_path, capsys):
    ids = [f"img{k}.jpg" for k in range(20)]
    true = np.arange(20) % 4
    a = write_run(tmp_path / "a", ids, true, onehot(true))
    b = write_run(tmp_path / "b", ids[:19] + ["other.jpg"], true, onehot(true))
    with pytest.raises(ConfigError, match=r"different cases \(1 only in .*split\.file.*--common"):
        compare_runs(a, b)
    res = compare_runs(a, b, common=True, n_boot=100)
    assert (res["n"], res["n_a"], res["n_b"], res["cases"]) == (19, 20, 20, "common")
    with pytest.raises(ConfigError, match="predictions.csv: not found; run `kmedtl evaluate"):
        compare_runs(a, tmp_path / "nothing")
    assert kmedtl_main(["compare", str(a), str(b)]) == 2
    assert "different cases" in capsys.readouterr().err


@pytest.mark.slow
def test_split_file_reuses_a_split_and_evaluate_writes_predictions(tmp_path):
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(pipeline_dict(tmp_path, name="first"), sort_keys=False))
    run_pipeline(first)
    run_a = tmp_path / "runs" / "first"
    split_a = run_a / "data" / "splits.json"
    # a second model (other seed and size) on the first run's split
    second = pipeline_dict(tmp_path, name="second", split={"file": str(split_a), "seed": 7})
    second["data"]["image"]["size"] = 40
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(second, sort_keys=False))
    run_pipeline(path)
    run_b = tmp_path / "runs" / "second"
    folds = [json.loads((r / "data" / "splits.json").read_text())["folds"]
             for r in (run_a, run_b)]
    assert folds[0] == folds[1]
    rows = list(csv.reader(open(run_b / "predictions.csv")))
    assert rows[0][:4] == ["id", "frame", "true", "pred"] and len(rows) - 1 == len(
        folds[0][0]["test"])
    res = compare_runs(run_a, run_b, n_boot=100)
    assert res["n"] == len(folds[0][0]["test"])
    # a split file naming images this run does not have is refused, naming the file
    data = json.loads(split_a.read_text())
    data["folds"][0]["test"].append("normal/ghost.png")
    bad = tmp_path / "bad_splits.json"
    bad.write_text(json.dumps(data))
    third = pipeline_dict(tmp_path, name="third", split={"file": str(bad)})
    p3 = tmp_path / "third.yaml"
    p3.write_text(yaml.safe_dump(third, sort_keys=False))
    with pytest.raises(ConfigError, match=r"split.file: .*bad_splits.json: fold 0 test names 1 "
                                          r"sample\(s\) this run does not use, e.g. "
                                          r"normal/ghost.png"):
        run_pipeline(p3)


@pytest.mark.slow
def test_committed_main_job_comparison_rederives_from_its_predictions():
    """README's paired numbers (ImageNet Lite0 vs scratch) come from committed files."""
    base = "pipelines/results/brain_tumor_main_job"
    committed = json.load(open(f"{base}/compare.json"))
    res = compare_runs(f"{base}/lite0", f"{base}/scratch", n_boot=committed["n_boot"])
    assert res["n"] == 466 and res["cases"] == "identical"
    for key in ("a", "b", "difference"):
        for part in ("value", "ci_low", "ci_high"):
            assert res[key][part] == pytest.approx(committed[key][part])
    assert (res["mcnemar"]["b"], res["mcnemar"]["c"]) == (38, 10)
    assert round(res["a"]["value"], 3) == 0.960 and round(res["b"]["value"], 3) == 0.895
    assert res["difference"]["ci_low"] > 0 and res["mcnemar"]["p_value"] < 0.001  # a paired win
