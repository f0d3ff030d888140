"""Every path of a config or pipeline is resolved once, when it is loaded, and stored
absolute (docs/pipelines.md, "Path rules"): files a run reads against the YAML file's folder,
folders it writes against the working directory.  A run made from one working directory
is evaluated, resumed and rerun from others on the same files."""

from __future__ import annotations

import csv
import json
import os

import pytest
import yaml
from test_training_helpers import TINY, TREE, write_images

from kmedtl.cli import main as kmedtl_main
from kmedtl.config import load_config
from kmedtl.errors import ConfigError
from kmedtl.pipeline import load_pipeline, run_pipeline
from kmedtl.run_folder import RunFolder

ALL_STAGES = ["audit", "split", "train", "evaluate", "export", "push"]


# ---------------------------------------------------------------------------- the rules
def _yaml(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_read_paths_follow_the_yaml_written_paths_the_working_directory(tmp_path,
                                                                        monkeypatch):
    conf = _yaml(tmp_path / "project" / "conf" / "c.yaml", {
        "data": {"root": "../data", "hierarchy": "h.yaml", "cache_dir": ".cache"},
        "split": {"file": "splits/s.json"},
        "train": {"weights": "w/backbone.weights.h5", "tune": {"cache_dir": "feat"}},
        "output_dir": "runs"})
    (conf.parent / "h.yaml").write_text(yaml.safe_dump(TREE))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(os.path.relpath(conf))  # a relative path to the YAML, as typed
    project = tmp_path / "project"
    assert cfg.data.root == str(project / "data")
    assert cfg.data.hierarchy == str(project / "conf" / "h.yaml")
    assert cfg.split.file == str(project / "conf" / "splits" / "s.json")
    assert cfg.train["weights"] == str(project / "conf" / "w" / "backbone.weights.h5")
    assert cfg.data.cache_dir == str(work / ".cache")
    assert cfg.output_dir == str(work / "runs")
    assert cfg.train["tune"]["cache_dir"] == str(work / "feat")
    assert RunFolder.for_config(cfg).path == work / "runs" / "run"
    # --set values are typed on the command line: relative to the working directory
    cfg = load_config(conf, overrides={"data": {"root": "elsewhere"},
                                       "train": {"weights": "imagenet"}})
    assert cfg.data.root == str(work / "elsewhere") and cfg.train["weights"] == "imagenet"
    # a mapping has no file: its paths are relative to the working directory
    cfg = load_config({"data": {"root": "d", "cache_dir": None}})
    assert cfg.data.root == str(work / "d") and cfg.data.cache_dir is None


def test_a_variable_is_expanded_first_and_a_relative_value_is_the_shells(tmp_path,
                                                                        monkeypatch):
    conf = _yaml(tmp_path / "pipelines" / "p.yaml",
                 {"data": {"root": "${KMEDTL_TEST_DATA}/set", "manifest": None}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KMEDTL_TEST_DATA", "shared/datasets")  # relative, as exported
    assert load_config(conf).data.root == str(tmp_path / "shared" / "datasets" / "set")
    monkeypatch.setenv("KMEDTL_TEST_DATA", str(tmp_path / "abs"))
    assert load_config(conf).data.root == str(tmp_path / "abs" / "set")
    monkeypatch.delenv("KMEDTL_TEST_DATA")
    with pytest.raises(ConfigError, match="data.root: environment variable KMEDTL_TEST_DATA"):
        load_config(conf)


def test_pipeline_section_paths(tmp_path, monkeypatch):
    path = _yaml(tmp_path / "project" / "p.yaml", {
        "data": {"root": "data", "hierarchy": TREE},
        "pipeline": {"export": {"out_dir": "exports"}, "push": {"root": "models"},
                     "evaluate": {"external": [{"name": "b", "source": "../site_b"}]}}})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    pipe = load_pipeline(path)
    assert pipe.config.data.root == str(tmp_path / "project" / "data")
    assert pipe.spec.evaluate.external[0].source == str(tmp_path / "site_b")
    assert pipe.spec.export.out_dir == str(work / "exports")
    assert pipe.spec.push.root == str(work / "models")
    assert pipe.config.output_dir == str(work / "runs")
    pipe = load_pipeline(path, {"pipeline": {"push": {"root": "other"}},
                                "data": {"root": "mine"}})
    assert pipe.spec.push.root == str(work / "other")
    assert pipe.config.data.root == str(work / "mine")
    # the resolved pipeline loads to itself from anywhere
    monkeypatch.chdir(tmp_path)
    assert load_pipeline(pipe.to_dict()).to_dict() == pipe.to_dict()


# ---------------------------------------------------------------------------- end to end
def _pipeline(data: dict, stages) -> dict:
    return {
        "name": "wound",
        "data": {"hierarchy": TREE, "image": {"size": 32, "channels": 1},
                 "cache_dir": ".kmedtl_cache", "workers": 1, **data},
        "split": {"method": "holdout", "val": 0.25, "test": 0.25, "dedupe": "exact"},
        "augment": {"flip": "horizontal"},
        "train": {"backbone": TINY, "epochs": 1, "batch_size": 8, "jit_compile": False,
                  "verbose": 0, "tensorboard": False},
        "output_dir": "runs",
        "pipeline": {"stages": stages,
                     "evaluate": {"n_boot": 20, "n_gradcam": 0, "n_examples": 0},
                     "export": {"formats": ["savedmodel"], "representative_samples": 8},
                     "push": {"thresholds": {"balanced_accuracy": 0.0}}},
    }


def _stored_paths(run) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    pipe = yaml.safe_load((run / "pipeline.yaml").read_text())
    return {"config.yaml": [cfg["data"]["manifest"] or cfg["data"]["root"],
                            cfg["data"]["cache_dir"], cfg["output_dir"]],
            "pipeline.yaml": [pipe["data"]["manifest"] or pipe["data"]["root"],
                              pipe["pipeline"]["push"]["root"]]}


@pytest.mark.slow
def test_a_manifest_pipeline_run_elsewhere_is_evaluated_and_rerun_from_other_folders(
        tmp_path, monkeypatch):
    """The new user's report: ``data.manifest: ../wound_manifest.csv`` trained, then
    evaluation looked for ``runs/<name>/wound_manifest.csv``."""
    write_images(tmp_path / "images", per_class=8)
    with open(tmp_path / "wound_manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        for i, f in enumerate(sorted((tmp_path / "images").rglob("*.png"))):
            w.writerow([f.relative_to(tmp_path).as_posix(), f.parent.name, f"p{i}"])
    path = _yaml(tmp_path / "project" / "wound.yaml", _pipeline(
        {"source": "manifest", "manifest": "../wound_manifest.csv"}, ALL_STAGES))
    first, second, third = (tmp_path / n for n in ("first", "second", "third"))
    for d in (first, second, third):
        d.mkdir()

    monkeypatch.chdir(first)
    res = run_pipeline("../project/wound.yaml")
    run = first / "runs" / "wound"
    assert res.run_dir.resolve() == run.resolve()
    assert res.ran == ALL_STAGES and res.summary["status"] == "complete"
    assert res.summary["push"]["pushed"] is True and (first / "saved_models" / "wound").is_dir()
    assert (first / ".kmedtl_cache").is_dir()
    manifest = str(tmp_path / "wound_manifest.csv")
    assert _stored_paths(run) == {
        "config.yaml": [manifest, str(first / ".kmedtl_cache"), str(first / "runs")],
        "pipeline.yaml": [manifest, str(first / "saved_models")]}
    n_test = json.loads((run / "metrics.json").read_text())["test"]["n"]
    assert n_test > 0

    # a resumed evaluation from another working directory reads the same test images
    monkeypatch.chdir(second)
    (run / "metrics.json").unlink()
    assert kmedtl_main(["evaluate", str(run), "--n-boot", "20", "--gradcam", "0"]) == 0
    assert json.loads((run / "metrics.json").read_text())["test"]["n"] == n_test
    assert not (second / "runs").exists() and not (second / ".kmedtl_cache").exists()

    # the same pipeline rerun from a third folder into the first run folder: the data
    # stages find the same files (same fingerprints: reused); evaluate reruns (the
    # standalone evaluation above rewrote its metrics.json) on the same test images; push
    # writes where it is asked from here
    monkeypatch.chdir(third)
    res = run_pipeline(path, run_dir=run)
    assert res.skipped[:3] == ["audit", "split", "train"] and "push" in res.ran
    assert res.summary["status"] == "complete" and res.summary["test"]["n_test"] == n_test
    assert (third / "saved_models" / "wound").is_dir() and not (third / "runs").exists()


@pytest.mark.slow
def test_root_data_is_not_the_run_folders_own_data_folder(tmp_path, monkeypatch):
    """``root: data`` beside the YAML; the run folder has a ``data/`` of its own (the audit
    and split stage outputs), which evaluation used to read as the dataset ("no test
    samples")."""
    write_images(tmp_path / "project" / "data", per_class=8)
    stages = ["audit", "split", "train", "evaluate"]
    _yaml(tmp_path / "project" / "p.yaml", _pipeline({"root": "data"}, stages))
    monkeypatch.chdir(tmp_path / "project")  # output_dir runs -> project/runs/wound/
    res = run_pipeline("p.yaml")
    run = tmp_path / "project" / "runs" / "wound"
    assert res.ran == stages and (run / "data" / "splits.json").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] \
        == str(tmp_path / "project" / "data")
    n_test = json.loads((run / "metrics.json").read_text())["test"]["n"]
    assert n_test > 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert kmedtl_main(["evaluate", str(run), "--n-boot", "20", "--gradcam", "0"]) == 0
    assert json.loads((run / "metrics.json").read_text())["test"]["n"] == n_test
    assert RunFolder(run).index()[0].root == str(tmp_path / "project" / "data")


def test_a_relative_path_in_an_old_config_yaml_is_named(tmp_path, monkeypatch, caplog):
    """A run folder written before paths were stored absolute (or edited by hand): its
    relative data path is read against the run folder, and a warning says so."""
    import logging

    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"data": {"source": "manifest", "manifest": "../wound_manifest.csv",
                  "cache_dir": ".kmedtl_cache"}, "output_dir": "runs"}))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="kmedtl"):
        cfg = RunFolder(run).config
    assert cfg.data.manifest == str(tmp_path / "runs" / "wound_manifest.csv")
    assert cfg.data.cache_dir == str(tmp_path / ".kmedtl_cache")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("data.manifest '../wound_manifest.csv' is a relative path" in m
               and "give the absolute path" in m for m in msgs), msgs
