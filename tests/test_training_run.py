"""Config-driven training (``kmedtl train``): the run-folder contract, staged workflow,
resume after a kill, and config errors."""

import csv
import json

import keras
import numpy as np
import pytest
from test_training_helpers import StopAfter, write_config

from kmedtl.config import load_config
from kmedtl.errors import ConfigError
from kmedtl.training import run_training
from kmedtl.training.cli import build_parser


def _cli(*argv):
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.mark.slow
def test_train_cli_writes_the_run_folder_contract(tmp_path, capsys):
    cfg = write_config(tmp_path, name="demo", train={
        "strategy": "gradual", "unfreeze_at": [0.34, 0.67], "lr_multipliers": [0.1, 0.3, 1.0],
        "schedule": "one_cycle", "monitor": "auc", "epochs": 5})
    assert _cli("train", cfg, "--epochs", 3) == 0
    assert "best val_leaf_auc" in capsys.readouterr().out
    run = tmp_path / "runs" / "demo"
    for name in ("config.yaml", "splits.json", "audit.json", "model.keras", "history.csv",
                 "train_metrics.json", "checkpoints/best.weights.h5",
                 "checkpoints/last.weights.h5"):
        assert (run / name).is_file(), name
    for d in ("backup", "logs"):
        assert (run / d).is_dir()
    resolved = load_config(run / "config.yaml")  # the written config loads back
    assert resolved.train["epochs"] == 3 and resolved.train["strategy"] == "gradual"
    assert isinstance(resolved.data.hierarchy, dict)
    splits = json.loads((run / "splits.json").read_text())
    assert splits["kind"] == "kmedtl-splits" and splits["folds"][0]["train"]
    m = json.loads((run / "train_metrics.json").read_text())
    assert m["epochs"] == [0, 1, 2] and m["monitor"] == "val_leaf_auc" and m["mode"] == "max"
    assert m["leaves"] == ["normal", "glioma", "pituitary"] and m["model"] == "hierarchical"
    assert m["fold"] == 0
    assert m["n_train"] + m["n_val"] + m["n_test"] == 30
    assert [p["name"] for p in m["phases"]][0] == "head" and len(m["phases"]) == 3
    assert {"leaf_accuracy", "leaf_auc", "leaf_kappa", "loss"} <= set(m["val_metrics"])
    assert m["train_metrics"] and m["timings"]["steps_per_epoch"] >= 1
    with open(run / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and "val_leaf_auc" in rows[0]
    model = keras.saving.load_model(run / "model.keras")
    out = model.predict(np.zeros((2, 32, 32, 1), "float32"), verbose=0)
    assert set(out) == {"leaf", "root", "tumor"}
    np.testing.assert_allclose(out["leaf"].sum(1), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match="finished run"):
        _cli("train", cfg)
    (run / "history.csv").write_text("stale\n")
    assert _cli("train", cfg, "--overwrite", "--epochs", 3) == 0
    assert "stale" not in (run / "history.csv").read_text()


@pytest.mark.slow
def test_killed_cli_run_resumes_when_started_again(tmp_path):
    cfg = load_config(write_config(tmp_path, train={"model": "flat", "epochs": 3}))
    with pytest.raises(RuntimeError, match="killed"):
        run_training(cfg, callbacks=[StopAfter(epoch=1)])
    result = run_training(cfg)
    assert result.resumed_from_epoch == 1 and result.epochs == [0, 1, 2]


@pytest.mark.slow
def test_staged_workflow_runs_from_one_config(tmp_path):
    cfg = write_config(tmp_path, name="staged", train={
        "model": "staged", "epochs": 1, "staged": {"n_folds": 2, "transfer": "hierarchy"}})
    assert _cli("train", cfg) == 0
    run = tmp_path / "runs" / "staged"
    m = json.loads((run / "train_metrics.json").read_text())
    assert m["model"] == "staged" and m["stages"] == ["root", "tumor"]
    assert 0.0 <= m["val_metrics"]["accuracy"] <= 1.0
    with open(run / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # 2 folds + the final models, for each of the two stage models
    assert {(r["stage"], r["fold"]) for r in rows} == {
        (s, f) for s in ("root", "tumor") for f in ("0", "1", "final")}
    assert (run / "checkpoints" / "stage_tumor.weights.h5").is_file()
    model = keras.saving.load_model(run / "model.keras")
    out = model.predict(np.zeros((3, 32, 32, 1), "float32"), verbose=0)
    assert out["leaf"].shape == (3, 3)
    np.testing.assert_allclose(out["leaf"].sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("balance, model", [("sampling", "flat"), ("weights", "hierarchical")])
@pytest.mark.slow
def test_balanced_sampling_or_class_weights(tmp_path, balance, model):
    cfg = load_config(write_config(tmp_path, data={"balance": balance},
                                   train={"model": model, "epochs": 1}))
    result = run_training(cfg)
    assert result.timings["steps_per_epoch"] >= 1 and result.monitor == "val_loss"
    assert np.isfinite(result.history["loss"][0])


def test_config_errors_from_the_data_side(tmp_path):
    cfg = load_config(write_config(tmp_path, data={"normalization": "imagenet"}))
    with pytest.raises(ConfigError, match="data.normalization"):
        run_training(cfg)
    cfg = load_config(write_config(tmp_path, name="cut", train={"cut": "block7_pool"}))
    with pytest.raises(ConfigError, match="train.cut"):
        run_training(cfg)
    with pytest.raises(ConfigError, match="--fold 3"):
        run_training(cfg, fold=3)
