"""``kmedtl run``'s ``tune`` stage: the ``train.tune`` search on the fold's training and
validation parts, ``tuning/best_config.yaml`` (the one tuning artefact, as ``kmedtl tune``
writes it), the train stage training its best section, resume by
fingerprint (synthetic PNG trees, a 3-stage CBR at 32 px)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import yaml
from test_pipeline_run import record, sha, write_pipeline

from kmedtl.errors import ConfigError
from kmedtl.pipeline import load_pipeline, run_pipeline
from kmedtl.pipeline import records as R
from kmedtl.training import load_run_config

TUNE = {"max_trials": 2, "epochs": 1, "strategies": ["linear_probe", "full"],
        "lr_ratios": [1.0, 3.0], "seed": 1}
STAGES = ["audit", "split", "tune", "train"]


def _digests(x) -> set:
    return {hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() for img in x}


def _count(dataset) -> int:
    return sum(int(np.shape(x)[0]) for x, *_ in dataset)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One ``[audit, split, tune, train]`` run, with a spy on what the search is given."""
    from kmedtl.training import tuning
    from kmedtl.training.features import materialise

    tmp = tmp_path_factory.mktemp("tune")
    path = write_pipeline(tmp, stages=STAGES, train={"tune": TUNE})
    seen: dict = {}
    real = tuning.run_search

    def spy(hypermodel, train, val, **kw):
        seen["n_fit"] = _count(train)
        seen["n_objective"] = _count(val)
        xtr, _ = materialise(hypermodel.plain["train"])
        xva, _ = materialise(hypermodel.plain["val"])
        seen["plain"] = (len(xtr), len(xva))
        seen["digests"] = _digests(xtr) | _digests(xva)
        return real(hypermodel, train, val, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning, "run_search", spy)
        res = run_pipeline(path)
    return {"path": path, "run": tmp / "runs" / "pipe", "res": res, "seen": seen}


@pytest.mark.slow
def test_tune_writes_best_config_and_train_trains_its_section(tuned):
    res, run = tuned["res"], tuned["run"]
    assert res.ran == STAGES and res.summary["status"] == "complete"
    best = record(run, "tune")["result"]  # what the search did: the stage record
    for name in ("best_config.yaml", "results.csv", "results.md", "search/oracle.json"):
        assert (run / "tuning" / name).is_file(), name
    assert not (run / "tuning" / "best.json").exists()  # one tuning artefact
    # the artefact is a whole config `kmedtl train` takes, holding the chosen section
    chosen = load_run_config(run / "tuning" / "best_config.yaml")
    assert chosen.train.model_dump(mode="json") == best["train"]
    assert best["search"]["trials"] == 2
    assert best["hyperparameters"]["strategy"] in ("linear_probe", "full")
    assert best["from_search"]["strategy"] == best["hyperparameters"]["strategy"]
    assert best["from_search"]["learning_rate"] == pytest.approx(
        best["hyperparameters"]["learning_rate"])
    assert best["train"]["epochs"] == 2  # the config's train.epochs, not the trials' 1
    assert best["trial_train"]["epochs"] == 1
    # the train stage recorded, and trained, exactly the search's hyperparameters
    tuned_rec = record(run, "train")["result"]["tuned"]
    assert tuned_rec["from_search"] == best["from_search"]
    assert tuned_rec["hyperparameters"] == best["hyperparameters"]
    assert json.loads((run / "train_metrics.json").read_text())["tuned"] == tuned_rec
    trained = yaml.safe_load((run / "config.yaml").read_text())["train"]
    for key, value in best["from_search"].items():
        assert trained[key] == value, key
    assert record(run, "train")["upstream"]["tune"] == record(run, "tune")["token"]
    # summary: the stage and the chosen hyperparameters
    s = res.summary
    assert [r["stage"] for r in s["stages"]] == STAGES
    assert s["tune"]["hyperparameters"] == best["hyperparameters"]
    assert s["train"]["tuned"]["from_search"] == best["from_search"]
    md = (run / "summary.md").read_text()
    assert "## Hyperparameter search" in md and "Training uses: " in md
    assert f"strategy `{best['from_search']['strategy']}`" in md
    assert "Hyperparameters from the search" in md


@pytest.mark.slow
def test_search_fits_on_train_scores_on_val_and_never_sees_test(tuned):
    from kmedtl.data.pipeline import make_dataset
    from kmedtl.data.prepare import prepare
    from kmedtl.training.features import materialise

    seen, run = tuned["seen"], tuned["run"]
    sizes = record(run, "split")["result"]["sizes"]
    assert seen["n_fit"] == seen["plain"][0] == sizes["train"]
    assert seen["n_objective"] == seen["plain"][1] == sizes["val"]
    data = record(run, "tune")["result"]["data"]
    assert (data["n_train"], data["n_val"], data["n_test_held_out"]) == (
        sizes["train"], sizes["val"], sizes["test"])
    cfg = load_pipeline(tuned["path"]).config
    prep = prepare(cfg)
    test = prep.samples("test", 0)
    assert len(test) == sizes["test"] > 0
    xte, _ = materialise(make_dataset(test, prep.hierarchy, prep.options, cache=prep.cache,
                                      batch_size=8, targets="leaf", normalization="unit",
                                      decoder=cfg.data.decoder))
    assert not _digests(xte) & seen["digests"]  # no test image reached the search


@pytest.mark.slow
def test_rerun_skips_tune_and_train(tuned):
    run = tuned["run"]
    model = sha(run / "model.keras")
    res = run_pipeline(tuned["path"])
    assert res.ran == [] and res.skipped == STAGES
    assert sha(run / "model.keras") == model
    # tune's verbosity and overwrite flag change no search
    res = run_pipeline(tuned["path"], overrides={"train": {"verbose": 1,
                                                           "tune": {"overwrite": True}}})
    assert res.ran == [] and res.skipped == STAGES


@pytest.mark.slow
def test_changed_search_reruns_tune_and_train_not_audit_or_split(tuned, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tuned["run"], run)  # leave the shared run folder as it was
    before = {s: record(run, s)["fingerprint"] for s in STAGES}
    res = run_pipeline(tuned["path"], run_dir=run,
                       overrides={"train": {"tune": {"max_trials": 3}}})
    assert res.ran == ["tune", "train"] and res.skipped == ["audit", "split"]
    assert res.summary["tune"]["search"]["trials"] == 3
    best = record(run, "tune")["result"]
    assert best["search"]["max_trials"] == 3 and best["search"]["resumed"] is False
    assert record(run, "train")["result"]["tuned"]["from_search"] == best["from_search"]
    after = {s: record(run, s)["fingerprint"] for s in STAGES}
    assert after["audit"] == before["audit"] and after["split"] == before["split"]
    assert after["tune"] != before["tune"] and after["train"] != before["train"]


@pytest.mark.slow
def test_tune_without_train_stops_after_it_and_searches_from_pretrained_weights(tmp_path):
    stages = ["audit", "split", "pretrain", "tune"]
    path = write_pipeline(tmp_path, stages=stages, per_class=12, split={"n_per_class": 4},
                          train={"tune": {**TUNE, "strategies": ["linear_probe"],
                                          "cuts": "none"}},
                          pipeline={"stages": stages, "pretrain": {
                              "epochs": 1, "batch_size": 8, "min_images": 4}})
    run = tmp_path / "runs" / "pipe"
    res = run_pipeline(path)
    assert res.ran == stages and res.summary["status"] == "complete"
    best_config = run / "tuning" / "best_config.yaml"
    assert best_config.is_file() and not (run / "model.keras").exists()
    assert res.summary["train"] is None and res.summary["tune"]["best_score"] is not None
    best = record(run, "tune")["result"]
    assert best["train"]["weights"] == str(run / "pretrain" / "backbone.weights.h5")
    assert load_run_config(best_config).train.weights == best["train"]["weights"]
    assert record(run, "tune")["upstream"]["pretrain"] == record(run, "pretrain")["token"]
    assert run_pipeline(path).skipped == stages
    # an interrupted search of the same inputs continues (KerasTuner reloads its oracle)
    rec = record(run, "tune")
    best = rec["result"]
    (run / "stages" / "tune.json").write_text(json.dumps({**rec, "status": "interrupted"}))
    res = run_pipeline(path)
    assert res.ran == ["tune"] and res.resumed == ["tune"] and res.skipped == stages[:3]
    again = record(run, "tune")["result"]
    assert again["search"]["resumed"] is True and again["search"]["trials"] == 2
    assert again["hyperparameters"] == best["hyperparameters"]
    assert record(run, "tune")["token"] == rec["token"]  # same section: training would stay


def test_tune_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_pipeline(write_pipeline(tmp_path, stages=["audit", "tune", "train"]))
    assert "'tune' needs ['split']" in str(e.value)
    with pytest.raises(ConfigError, match=r"stages run in the order .*'pretrain', 'tune', "
                                          r"'train'"):
        load_pipeline(write_pipeline(tmp_path, stages=["audit", "split", "train", "tune"]))
    with pytest.raises(ConfigError, match=r"train.model is 'staged'.*remove 'tune'"):
        load_pipeline(write_pipeline(tmp_path, stages=STAGES, train={"model": "staged"}))
    with pytest.raises(ConfigError, match=r"split.val: the 'tune' stage .*set split.val > 0"):
        load_pipeline(write_pipeline(tmp_path, stages=STAGES, split={"val": 0.0}))
    with pytest.raises(ConfigError, match=r"train.tune.max_trials"):
        load_pipeline(write_pipeline(tmp_path, stages=STAGES, train={"tune": {"max_trials": 0}}))


def test_pipelines_without_tune_keep_their_fingerprints(tmp_path):
    """Adding the stage changes no input or upstream of a pipeline that does not list it."""
    pipe = load_pipeline(write_pipeline(tmp_path, stages=["audit", "split", "train"]))
    tuned = load_pipeline(write_pipeline(tmp_path, stages=STAGES))
    plain = R.stage_inputs("train", pipe)
    assert plain["train"]["tune"]["overwrite"] is False  # as recorded before the stage
    assert set(plain) == {"train", "augment", "data", "fold", "name"}
    assert [u for u in R.UPSTREAM["train"] if u in pipe.spec.stages] == ["split"]
    assert [u for u in R.UPSTREAM["train"] if u in tuned.spec.stages] == ["split", "tune"]
    assert "overwrite" not in R.stage_inputs("tune", tuned)["train"]["tune"]
