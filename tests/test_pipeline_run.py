"""``kmedtl run``: stages into one run folder, resume by fingerprint, interruptions, config
errors, same-domain pretraining (synthetic PNG trees, a 3-stage CBR at 32 px)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import yaml
from test_training_helpers import TINY, TREE, write_images

from kmedtl.cli import main as kmedtl_main
from kmedtl.data.leakage import pretrain_pool
from kmedtl.errors import ConfigError, DatasetNotFoundError
from kmedtl.pipeline import load_pipeline, run_pipeline
from kmedtl.pipeline.stages import FAIL_ENV, SimulatedInterruption

UNTIL_EVALUATE = ["audit", "split", "train", "evaluate"]


def pipeline_dict(tmp_path, *, stages=None, train=None, **sections) -> dict:
    data_root = tmp_path / "data"
    if not data_root.exists():
        write_images(data_root, per_class=sections.pop("per_class", 10))
    cfg = {
        "name": "pipe",
        "data": {"root": str(data_root), "hierarchy": TREE, "image": {"size": 32, "channels": 1},
                 "cache_dir": str(tmp_path / "cache"), "workers": 1},
        "split": {"method": "holdout", "val": 0.25, "test": 0.25, "dedupe": "near"},
        "augment": {"flip": "horizontal"},
        "train": {"backbone": TINY, "epochs": 2, "batch_size": 8, "jit_compile": False,
                  "verbose": 0, "tensorboard": False, **(train or {})},
        "output_dir": str(tmp_path / "runs"),
        "pipeline": {"stages": stages or UNTIL_EVALUATE,
                     "evaluate": {"n_boot": 50, "n_gradcam": 0, "n_examples": 2},
                     "push": {"root": str(tmp_path / "saved_models")}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_pipeline(tmp_path, name="pipe.yaml", **kw):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(pipeline_dict(tmp_path, **kw), sort_keys=False))
    return path


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(run, stage) -> dict:
    return json.loads((run / "stages" / f"{stage}.json").read_text())


@pytest.mark.slow
def test_rerun_skips_everything_and_a_changed_field_reruns_only_downstream(tmp_path):
    path = write_pipeline(tmp_path)
    res = run_pipeline(path)
    run = tmp_path / "runs" / "pipe"
    assert res.ran == UNTIL_EVALUATE and res.skipped == [] and res.run_dir == run
    for name in ("pipeline.yaml", "data/audit.json", "data/splits.json", "config.yaml",
                 "splits.json", "model.keras", "train_metrics.json", "metrics.json",
                 "report.html", "summary.md", "summary.json"):
        assert (run / name).is_file(), name
    s = res.summary
    assert s["status"] == "complete"
    assert s["data"]["counts"] == {"read": 30, "used": 30, "skipped": 0, "samples": 30}
    assert s["data"]["reconciled"] is True
    sizes = s["split"]["sizes"]
    assert sizes["train"] + sizes["val"] + sizes["test"] + s["split"]["dropped"] \
        + s["split"]["unused"] == 30
    assert s["split"]["cross_split"] == {"exact_duplicate_groups": 0,
                                         "near_duplicate_pairs": 0,
                                         "similar_content_pairs": 0, "patients": 0}
    head = s["test"]["headline"]["balanced_accuracy"]
    assert head["ci_low"] <= head["value"] <= head["ci_high"]
    md = (run / "summary.md").read_text()
    for text in ("Files read 30 = used 30 + skipped 0 (reconciled)", "## Split",
                 "## Test metrics", "balanced_accuracy", "95% CI", "| train |"):
        assert text in md, text
    stamp = {n: sha(run / n) for n in ("model.keras", "metrics.json", "data/splits.json",
                                       "train_metrics.json")}
    train_fp = record(run, "train")["fingerprint"]

    # 1. the same pipeline again: nothing runs, nothing changes
    res = run_pipeline(path)
    assert res.ran == [] and res.skipped == UNTIL_EVALUATE
    assert {n: sha(run / n) for n in stamp} == stamp
    assert record(run, "train")["fingerprint"] == train_fp
    assert [r["this_call"] for r in res.summary["stages"]] == ["reused"] * 4
    assert "reused" in (run / "summary.md").read_text()

    # 2. writing a default out explicitly changes no fingerprint
    res = run_pipeline(path, overrides={"train": {"optimizer": "adam"},
                                        "pipeline": {"fold": 0}})
    assert res.ran == []

    # 3. more epochs: train and evaluate rerun, audit and split are reused
    res = run_pipeline(path, overrides={"train": {"epochs": 3}})
    assert res.ran == ["train", "evaluate"] and res.skipped == ["audit", "split"]
    assert sha(run / "data/splits.json") == stamp["data/splits.json"]
    assert sha(run / "model.keras") != stamp["model.keras"]
    assert json.loads((run / "train_metrics.json").read_text())["epochs"] == [0, 1, 2]
    assert record(run, "train")["fingerprint"] != train_fp

    # 4. an evaluation option: only evaluate reruns
    res = run_pipeline(path, overrides={"train": {"epochs": 3},
                                        "pipeline": {"evaluate": {"n_boot": 60}}})
    assert res.ran == ["evaluate"]
    assert json.loads((run / "metrics.json").read_text())["bootstrap"]["n_boot"] == 60

    # 5. a deleted output makes its stage (and what follows) run again
    (run / "metrics.json").unlink()
    res = run_pipeline(path, overrides={"train": {"epochs": 3},
                                        "pipeline": {"evaluate": {"n_boot": 60}}})
    assert res.ran == ["evaluate"] and "outputs missing" in record(run, "evaluate")["reason"]


@pytest.mark.slow
def test_changed_data_reruns_audit_but_an_identical_split_keeps_the_model(tmp_path):
    """The split stage's token is its file's hash: a new audit that yields the same split
    does not retrain; a new image (a new split) does."""
    path = write_pipeline(tmp_path, stages=["audit", "split", "train"], per_class=8)
    run_pipeline(path)
    run = tmp_path / "runs" / "pipe"
    model = sha(run / "model.keras")
    res = run_pipeline(path, overrides={"split": {"near_threshold": 1}})  # audit input
    assert res.ran == ["audit", "split"] and res.skipped == ["train"]
    assert sha(run / "model.keras") == model
    src = tmp_path / "data" / "no_tumor"
    shutil.copy(next(src.iterdir()), src / "copy_of_first.png")  # an exact duplicate
    res = run_pipeline(path, overrides={"split": {"near_threshold": 1}})
    assert res.ran == ["audit", "split", "train"]
    assert res.summary["data"]["summary"]["duplicate_groups"] == 1
    assert res.summary["split"]["cross_split"]["exact_duplicate_groups"] == 0


@pytest.mark.slow
def test_interrupted_training_resumes_and_a_failed_stage_reruns_alone(tmp_path, monkeypatch):
    path = write_pipeline(tmp_path, train={"epochs": 3})
    run = tmp_path / "runs" / "pipe"
    monkeypatch.setenv(FAIL_ENV, "train@1")  # killed after a batch of the second epoch
    with pytest.raises(SimulatedInterruption):
        run_pipeline(path)
    assert record(run, "train")["status"] == "interrupted"
    assert (run / "backup" / "state.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted in train" and summary["test"] is None
    assert "interrupted" in (run / "summary.md").read_text()

    monkeypatch.setenv(FAIL_ENV, "evaluate")
    with pytest.raises(SimulatedInterruption):
        run_pipeline(path)
    rec = record(run, "train")
    assert rec["status"] == "done" and rec["resumed"] is True and rec["attempts"] == 2
    m = json.loads((run / "train_metrics.json").read_text())
    assert m["resumed_from_epoch"] == 1 and m["epochs"] == [0, 1, 2]
    assert record(run, "evaluate")["status"] == "interrupted"

    monkeypatch.delenv(FAIL_ENV)
    res = run_pipeline(path)
    assert res.ran == ["evaluate"] and res.skipped == ["audit", "split", "train"]
    assert res.summary["status"] == "complete"


@pytest.mark.slow
def test_interrupted_training_with_a_changed_config_starts_over(tmp_path, monkeypatch):
    path = write_pipeline(tmp_path, stages=["audit", "split", "train"], train={"epochs": 3})
    run = tmp_path / "runs" / "pipe"
    monkeypatch.setenv(FAIL_ENV, "train@1")
    with pytest.raises(SimulatedInterruption):
        run_pipeline(path)
    monkeypatch.delenv(FAIL_ENV)
    res = run_pipeline(path, overrides={"train": {"learning_rate": 0.002}})
    assert res.ran == ["train"] and res.resumed == []
    m = json.loads((run / "train_metrics.json").read_text())
    assert m["resumed_from_epoch"] == 0 and m["epochs"] == [0, 1, 2]


def test_cli_until_force_and_set(tmp_path, capsys):
    path = write_pipeline(tmp_path)
    run = tmp_path / "other_run"
    assert kmedtl_main(["run", str(path), "--run-dir", str(run), "--until", "split"]) == 0
    out = capsys.readouterr().out
    assert "audit     ran" in out and "split     ran" in out and "stopped after split" in out
    assert not (run / "stages" / "train.json").exists()
    assert kmedtl_main(["run", str(path), "--run-dir", str(run), "--until", "split"]) == 0
    assert "audit     reused" in capsys.readouterr().out
    assert kmedtl_main(["run", str(path), "--run-dir", str(run), "--until", "split",
                        "--force", "split", "--set", "split.seed=0"]) == 0
    out = capsys.readouterr().out
    assert "audit     reused" in out and "split     ran" in out
    assert kmedtl_main(["run", str(path), "--run-dir", str(run), "--until", "split",
                        "--force", "audit"]) == 0
    out = capsys.readouterr().out
    assert "audit     ran" in out and "split     ran" in out  # forced: it and what follows
    assert kmedtl_main(["run", str(path), "--run-dir", str(run), "--until", "push"]) == 2
    assert "--until push: not a stage of this pipeline" in capsys.readouterr().err


def test_a_failing_stage_is_recorded_and_named_in_the_summary(tmp_path, capsys):
    stages = ["audit", "split", "pretrain"]
    path = write_pipeline(tmp_path, stages=stages, pipeline={"stages": stages})
    assert kmedtl_main(["run", str(path)]) == 2  # no image lies outside the fold
    err = capsys.readouterr().err
    assert "pipeline.pretrain: only 0 image(s) lie outside" in err and "n_per_class" in err
    run = tmp_path / "runs" / "pipe"
    rec = record(run, "pretrain")
    assert rec["status"] == "failed" and "ConfigError" in rec["error"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed in pretrain" and summary["split"]["sizes"]["test"] > 0
    assert "| pretrain | failed: ConfigError" in (run / "summary.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"pipeline": {"export": {"formatz": ["onnx"]}}},
     "pipeline.export.formatz: unknown field; allowed fields here: ['formats'"),
    ({"pipeline": {"stages": ["split", "audit"]}}, "list them so: ['audit', 'split']"),
    ({"pipeline": {"stages": ["audit", "split", "train", "push"]}},
     "'push' needs ['evaluate', 'export']"),
    ({"pipeline": {"stages": ["audit", "split", "deploy"]}}, "pipeline.stages.2: Input should be"),
    ({"trian": {"epochs": 1}}, "trian: unknown field"),
    ({"data": {"image": {"size": "big"}}}, "data.image.size"),
])
def test_config_errors_name_the_file_and_field(tmp_path, change, message):
    from kmedtl.config import merge_overrides as _merge

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_merge(pipeline_dict(tmp_path), change)))
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_train_options_are_checked_before_anything_runs(tmp_path):
    path = write_pipeline(tmp_path, train={"epoch": 3})
    with pytest.raises(ConfigError, match="train.epoch: unknown field"):
        run_pipeline(path)
    assert not (tmp_path / "runs" / "pipe" / "stages" / "audit.json").exists()


def test_main_job_names_kmedtl_datasets_and_the_dataset_when_missing(tmp_path, monkeypatch):
    main_job = "pipelines/brain_tumor_hierarchical.yaml"
    monkeypatch.delenv("KMEDTL_DATASETS", raising=False)
    with pytest.raises(DatasetNotFoundError, match=r"KMEDTL_DATASETS is not set.*brain-tumor-mri"):
        load_pipeline(main_job)
    monkeypatch.setenv("KMEDTL_DATASETS", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as err:
        load_pipeline(main_job)
    assert "data.root" in str(err.value) and "'brain-tumor-mri' not found" in str(err.value)
    assert "KMEDTL_DATASETS=" in str(err.value)


def test_main_job_pipeline_is_valid(datasets_dir):
    pipe = load_pipeline("pipelines/brain_tumor_hierarchical.yaml")
    assert pipe.spec.stages == ["audit", "split", "train", "evaluate", "export", "push"]
    assert pipe.config.split.dedupe == "similar" and pipe.config.split.method == "holdout"
    # trained on Training/ only; Testing/ (another acquisition) is the external test set
    assert pipe.config.data.root.endswith(os.path.join("brain-tumor-mri", "Training"))
    ext = pipe.spec.evaluate.external
    assert [e.name for e in ext] == ["testing"] and ext[0].dedupe
    assert ext[0].source.endswith(os.path.join("brain-tumor-mri", "Testing"))
    assert pipe.spec.push.thresholds == {"balanced_accuracy": 0.75}
    assert pipe.config.hierarchy().leaves == ("normal", "glioma", "meningioma", "pituitary")
    # written folders: relative to the working directory, made absolute when loaded
    assert pipe.spec.export.verify and pipe.spec.push.root == os.path.abspath("saved_models")
    assert pipe.config.output_dir == os.path.abspath("runs")


@pytest.mark.slow
def test_pretraining_uses_only_images_outside_the_fold_and_feeds_training(tmp_path):
    path = write_pipeline(tmp_path, stages=["audit", "split", "pretrain", "train"],
                          per_class=12, split={"n_per_class": 3},
                          pipeline={"stages": ["audit", "split", "pretrain", "train"],
                                    "pretrain": {"epochs": 1, "batch_size": 8,
                                                 "min_images": 4}})
    res = run_pipeline(path)
    run = tmp_path / "runs" / "pipe"
    assert res.ran == ["audit", "split", "pretrain", "train"]
    splits = json.loads((run / "data" / "splits.json").read_text())["folds"][0]
    used = sum(len(v) for v in splits.values())
    pt = res.summary["pretrain"]
    assert 4 <= pt["n_images"] <= 36 - used == res.summary["split"]["unused"]
    assert pt["classes"] == ["normal", "tumor"] and set(pt["by_class"]) == {"normal", "tumor"}
    assert (run / "pretrain" / "backbone.weights.h5").is_file()
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["train"]["weights"] == str(run / "pretrain" / "backbone.weights.h5")
    assert res.summary["train"]["weights"].endswith("backbone.weights.h5")
    assert "## Same-domain pretraining" in (run / "summary.md").read_text()
    # more pretraining epochs: pretrain and train rerun, audit and split do not
    res = run_pipeline(path, overrides={"pipeline": {"pretrain": {"epochs": 2}}})
    assert res.ran == ["pretrain", "train"]


def test_pretraining_pool_never_holds_a_copy_of_a_test_image(tmp_path):
    """``split.method: source`` drops training images that duplicate a test image; they are
    in no part, yet they must not be pretrained on either."""
    src = write_images(tmp_path / "flat", per_class=8)
    root = tmp_path / "data"
    for label_dir in src.iterdir():
        files = sorted(label_dir.iterdir())
        for part, chunk in (("Training", files[:6]), ("Testing", files[6:])):
            (root / part / label_dir.name).mkdir(parents=True)
            for f in chunk:
                shutil.copy(f, root / part / label_dir.name / f.name)
    leak = root / "Training" / "no_tumor" / "leak.png"
    shutil.copy(sorted((root / "Testing" / "no_tumor").iterdir())[0], leak)
    pipe = load_pipeline(pipeline_dict(tmp_path, split={"method": "source", "val": 0.2,
                                                        "n_per_class": 2}))
    from kmedtl.data.prepare import prepare

    prep = prepare(pipe.config)
    fold = prep.splits.folds[0]
    pool = pretrain_pool(prep, fold)
    ids = {s.id for s in pool}
    assert str(leak) in {d["id"] for d in prep.splits.dropped}
    assert str(leak) not in ids and ids and not ids & set(fold.train + fold.val + fold.test)


@pytest.mark.slow
def test_export_and_push_stages(tmp_path, monkeypatch):
    import kmedtl.data.prepare as prep_mod

    indexed = []  # the data is indexed once per run, not again by evaluate and export
    real_index = prep_mod.index_folder
    monkeypatch.setattr(prep_mod, "index_folder",
                        lambda *a, **k: indexed.append(a[0]) or real_index(*a, **k))
    stages = ["audit", "split", "train", "evaluate", "export", "push"]
    path = write_pipeline(tmp_path, stages=stages, pipeline={
        "stages": stages, "evaluate": {"n_boot": 50, "n_gradcam": 0, "n_examples": 0},
        "export": {"formats": ["savedmodel", "tflite"], "tflite_variants": ["float32"],
                   "representative_samples": 8},
        "push": {"root": str(tmp_path / "saved_models"),
                 "thresholds": {"balanced_accuracy": 0.0}}})
    res = run_pipeline(path)
    run = tmp_path / "runs" / "pipe"
    assert res.ran == stages and res.summary["status"] == "complete"
    assert len(indexed) == 1, indexed
    assert res.summary["export"]["verified"] is True
    push = res.summary["push"]
    assert push["pushed"] is True and (tmp_path / "saved_models" / "pipe").is_dir()
    md = (run / "summary.md").read_text()
    assert "## Export" in md and "Verified" in md and "Pushed version" in md
    res = run_pipeline(path)
    assert res.ran == []
    res = run_pipeline(path, overrides={"pipeline": {"push": {
        "thresholds": {"balanced_accuracy": 1.01}}}})
    assert res.ran == ["push"] and res.summary["push"]["pushed"] is False
    assert "Not pushed" in (run / "summary.md").read_text()


@pytest.mark.slow
def test_the_data_is_prepared_once_per_process(tmp_path, monkeypatch):
    """The train stage trains on the data the split stage prepared: before, run_training
    indexed, audited, cached and split the data a second time, and the pipeline compared
    the two split files after training."""
    import kmedtl.data.prepare as prep_mod
    import kmedtl.pipeline.stages as stages_mod
    import kmedtl.training.stage as train_mod

    calls = []

    def counting(cfg, **kw):
        prep = prep_mod.prepare(cfg, **kw)
        calls.append((cfg.name, prep.seconds))
        return prep

    monkeypatch.setattr(stages_mod, "prepare", counting)
    monkeypatch.setattr(train_mod, "prepare", counting)
    res = run_pipeline(write_pipeline(tmp_path, stages=["audit", "split", "train"]))
    assert res.ran == ["audit", "split", "train"]
    assert [name for name, _ in calls] == ["pipe"]
    run = tmp_path / "runs" / "pipe"
    # train_metrics' prepare_seconds still counts the preparation the split stage did
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["prepare_seconds"] >= round(calls[0][1], 3) > 0
    assert json.loads((run / "splits.json").read_text())["folds"] == \
        json.loads((run / "data" / "splits.json").read_text())["folds"]


def test_a_resumed_train_stage_refuses_a_split_that_is_not_the_split_stages(tmp_path):
    """Prepared afresh in a new process, the data must split as the split stage wrote;
    a difference stops the stage before any training (the old check ran after it)."""
    from kmedtl.pipeline.records import Records
    from kmedtl.pipeline.stages import Context, PipelineStageError, stage_train

    path = write_pipeline(tmp_path, stages=["audit", "split", "train"])
    run_pipeline(path, until="split")
    run = tmp_path / "runs" / "pipe"
    written = run / "data" / "splits.json"
    doc = json.loads(written.read_text())
    fold = doc["folds"][0]
    fold["train"], fold["test"] = fold["train"][1:], fold["test"] + fold["train"][:1]
    written.write_text(json.dumps(doc))
    ctx = Context(load_pipeline(path), run, Records(run))  # a fresh process's context
    with pytest.raises(PipelineStageError, match=r"data/splits.json: the split stage wrote "
                                                   r"a different split.*--force split"):
        stage_train(ctx, resume=False)
    assert not (run / "model.keras").exists() and not (run / "train_metrics.json").exists()


def test_a_fold_the_split_does_not_have_is_a_config_error(tmp_path):
    """pipeline.fold is not an input of the split stage: a rerun with a fold the split
    lacks reaches the train stage, which names the field (it raised IndexError)."""
    path = write_pipeline(tmp_path, stages=["audit", "split", "train"])
    run_pipeline(path, until="split")
    with pytest.raises(ConfigError, match=r"pipeline.fold: 3 but the split has 1 fold"):
        run_pipeline(path, overrides={"pipeline": {"fold": 3}})


def test_same_fold_compares_ids_as_the_split_file_stores_them(tmp_path):
    from kmedtl.data.splits import Fold, Splits
    from kmedtl.pipeline.stages import same_fold

    root = tmp_path / "data"
    ids = [str(root / "a" / f"{i}.png") for i in range(4)]
    splits = Splits("holdout", 0, [Fold(ids[:2], ids[2:3], ids[3:])])
    path = tmp_path / "splits.json"
    splits.save(path, root=str(root))
    odd = [str(root / "a" / ".." / "a" / f"{i}.png") for i in range(4)]  # same files
    assert same_fold(Splits("holdout", 0, [Fold(odd[:2], odd[2:3], odd[3:])]), path,
                     str(root), 0)
    assert not same_fold(Splits("holdout", 0, [Fold(ids[:1], ids[1:3], ids[3:])]), path,
                         str(root), 0)
    assert not same_fold(splits, path, str(root), 1)

