"""KerasTuner search: space, stock tuners, feature cache, failures, resume, the
tensorboard preflight and chief/worker distributed tuning."""

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import yaml
from test_training_helpers import REPO, TESTS, TINY, arrays, hierarchy, write_config

from kmedtl.config import load_config
from kmedtl.training import FeatureCache, Trainer, train_section
from kmedtl.training.features import split_at_features
from kmedtl.training.tuning import (
    TransferHyperModel,
    TuningError,
    preflight,
    run_search,
    search,
)


def _base(**tune):
    return train_section({"model": "flat", "backbone": TINY, "epochs": 2, "batch_size": 8,
                          "jit_compile": False, "verbose": 0, "tensorboard": False,
                          "tune": {"max_trials": 3, "strategies": ["linear_probe"],
                                   "seed": 1, **tune}})


def _hm(base, cache=True, cls=TransferHyperModel, n=24):
    train, val = arrays(n, n_classes=3), arrays(12, n_classes=3, seed=1)
    hm = cls(base, hierarchy(), (32, 32, 1), plain_train=train, plain_val=val,
             feature_cache=FeatureCache() if cache else None)
    return hm, (train, val)


def _search(hm, data, tmp_path, **kw):
    return run_search(hm, data[0], data[1], directory=tmp_path / "tuning", verbose=0, **kw)


def test_space_covers_families_cuts_strategies_and_rates():
    import keras_tuner as kt

    base = _base(backbones=[TINY, "cbr_tiny"], strategies=["linear_probe", "freeze", "gradual",
                                                           "fine_tune"], lr_ratios=[1, 3, 9])
    hm, _ = _hm(base)
    hp = kt.HyperParameters()
    hm.declaring = True
    assert hm.build(hp) is None  # declaring the space builds no model
    names = {p.name: p for p in hp.space}
    assert names["backbone"].values == [TINY, "cbr_tiny"]
    assert names[f"cut_{TINY}"].values == ["block1_pool", "block2_pool", "block3_pool"]
    assert names["cut_cbr_tiny"].values == ["block1_pool", "block2_pool", "block3_pool",
                                            "block4_pool"]
    assert set(names["strategy"].values) == {"linear_probe", "freeze", "gradual", "fine_tune"}
    assert names["lr_ratio"].values == [1, 3, 9] and "freeze_fraction" in names
    assert names["learning_rate"].sampling == "log"
    hp.values.update({"backbone": TINY, "strategy": "gradual", "lr_ratio": 3,
                      "unfreeze_start": 0.25, f"cut_{TINY}": "block3_pool"})
    hm.declaring = False
    model = hm.build(hp)
    cfg = hm.trial_section(hp, epochs=4, model=model)
    assert cfg.cut == "block3_pool" and cfg.strategy == "gradual"
    assert cfg.lr_multipliers == pytest.approx([1 / 9, 1 / 3, 1.0])
    assert cfg.unfreeze_at == [0.25, 0.625]


@pytest.mark.slow
def test_linear_probe_search_reuses_cached_features(tmp_path):
    hm, data = _hm(_base(cuts="none"))
    res = _search(hm, data, tmp_path)
    cache = hm.feature_cache
    assert cache.misses == 2 and cache.hits == 4  # train + val computed once for 3 trials
    rows = res.rows
    assert len(rows) == 3 and all(r["status"] == "COMPLETED" for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)  # best first (AUC is maximised)
    assert res.objective == "val_auc" and res.direction == "max"
    with open(res.files["csv"], newline="") as fh:
        assert [r["trial_id"] for r in csv.DictReader(fh)] == [r["trial_id"] for r in rows]
    assert "| trial_id | status | score |" in open(res.files["markdown"]).read()
    # the tuner's checkpoint holds the full model (backbone + head), so it reloads
    best = res.tuner.get_best_models(1)[0]
    assert best.predict(data[0][0][:2], verbose=0).shape == (2, 3)


@pytest.mark.slow
def test_cached_head_training_equals_training_the_frozen_model():
    base = _base()
    cfg = train_section(base, strategy="linear_probe", learning_rate=0.01, dropout=0.0,
                        cut=None)
    x, y = arrays(24, n_classes=3)
    from kmedtl.training.stage import build_model

    keras.utils.set_random_seed(0)
    full = build_model(cfg, hierarchy(), (32, 32, 1))
    keras.utils.set_random_seed(0)
    cached = build_model(cfg, hierarchy(), (32, 32, 1))
    Trainer(full, cfg).fit((x, y), (x, y), shuffle=False)
    extractor, head = split_at_features(cached)
    feats = FeatureCache().features(extractor, x)
    args = Trainer(cached, cfg).compile_args()
    Trainer(head, train_section(cfg, strategy="full"), loss=args["loss"],
            metrics=args["metrics"]).fit((feats, y), (feats, y), shuffle=False)
    for a, b in zip(full.get_weights(), cached.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_feature_cache_on_disk_is_keyed_by_backbone_and_data(tmp_path):
    from test_training_helpers import flat_model

    model = flat_model(3, seed=0)
    extractor, _ = split_at_features(model)
    x, _ = arrays(8)
    first = FeatureCache(tmp_path / "f")
    feats = first.features(extractor, x)
    assert len(list((tmp_path / "f").glob("*.npy"))) == 1
    again = FeatureCache(tmp_path / "f")  # a new process would see the same files
    np.testing.assert_array_equal(again.features(extractor, x), feats)
    assert (again.hits, again.misses) == (1, 0)
    again.features(extractor, x + 0.01)  # other data
    other, _ = split_at_features(flat_model(3, seed=1))  # other weights
    again.features(other, x)
    assert again.misses == 2


@pytest.mark.parametrize("tuner", ["hyperband", "bayesian"])
@pytest.mark.slow
def test_stock_tuners_run(tmp_path, tuner):
    base = _base(tuner=tuner, max_trials=2, bayesian_initial_points=1, hyperband_factor=2,
                 cuts="none")
    hm, data = _hm(base)
    tuned = search(hm, data[0], data[1], directory=tmp_path / "tuning", epochs=2, verbose=0)
    res = tuned.result
    assert type(res.tuner).__name__ == {"hyperband": "Hyperband",
                                        "bayesian": "BayesianOptimization"}[tuner]
    assert res.rows and all(r["status"] == "COMPLETED" for r in res.rows)
    assert res.best_section is not None and res.best_section.strategy == "linear_probe"
    # the best trial is the first row of the table, at both epoch counts
    assert tuned.trial_id == res.rows[0]["trial_id"] and tuned.section == tuned.as_searched


@pytest.mark.slow
def test_overwrite_false_resumes_a_search(tmp_path):
    hm, data = _hm(_base(max_trials=2, cuts="none"))
    _search(hm, data, tmp_path)
    calls = []

    class Counting(TransferHyperModel):
        def fit(self, hp, model, *args, **kwargs):
            calls.append(hp.values)
            return super().fit(hp, model, *args, **kwargs)

    hm2, _ = _hm(_base(max_trials=3, cuts="none"), cls=Counting)
    res = _search(hm2, data, tmp_path, overwrite=False)
    assert len(calls) == 1 and len(res.rows) == 3


class _Failing(TransferHyperModel):
    fail_on = (0, 1, 2)

    def fit(self, hp, model, *args, **kwargs):
        k = self.calls = getattr(self, "calls", -1) + 1
        if k in self.fail_on:
            raise ValueError(f"broken trial number {k}")
        return super().fit(hp, model, *args, **kwargs)


@pytest.mark.slow
def test_every_trial_failing_raises_the_first_trials_error(tmp_path):
    hm, data = _hm(_base(cuts="none"), cls=_Failing)
    with pytest.raises(TuningError) as e:
        _search(hm, data, tmp_path)
    msg = str(e.value)
    assert "3 of 3 trials failed" in msg
    assert "broken trial number 0" in msg.splitlines()[0]


@pytest.mark.slow
def test_most_trials_failing_raises_a_few_do_not(tmp_path):
    cls = type("MostFail", (_Failing,), {"fail_on": (0, 2)})
    hm, data = _hm(_base(cuts="none", max_consecutive_failed_trials=5), cls=cls)
    with pytest.raises(TuningError, match="broken trial number 0"):
        _search(hm, data, tmp_path / "a")
    cls = type("FewFail", (_Failing,), {"fail_on": (1,)})
    hm, data = _hm(_base(cuts="none"), cls=cls)
    res = _search(hm, data, tmp_path / "b")
    failed = [r for r in res.rows if r["status"] == "FAILED"]
    assert len(failed) == 1 and "broken trial number 1" in failed[0]["error"]
    assert res.rows[-1]["status"] == "FAILED"  # failed trials sort last


def test_missing_tensorboard_fails_before_any_trial(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(TuningError, match="pip install tensorboard"):
        preflight()
    hm, data = _hm(_base(cuts="none"))
    with pytest.raises(TuningError, match="pip install tensorboard"):
        _search(hm, data, tmp_path)
    assert not (tmp_path / "tuning").exists()  # no trial ran


@pytest.mark.slow
def test_tune_cli_writes_results_and_a_trainable_best_config(tmp_path, capsys):
    from kmedtl.training.cli import build_parser

    cfg = write_config(tmp_path, name="search", train={
        "tune": {"max_trials": 2, "strategies": ["linear_probe"], "objective": "kappa"}})
    args = build_parser().parse_args(["tune", str(cfg), "--overwrite", "--verbose", "0"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "objective val_leaf_kappa (max)" in out
    tdir = tmp_path / "runs" / "search" / "tuning"
    for name in ("results.csv", "results.md", "best_config.yaml"):
        assert (tdir / name).is_file()
    assert list((tdir / "features").glob("*.npy"))  # on-disk feature cache
    best = load_config(tdir / "best_config.yaml")
    section = train_section(best)
    assert section.strategy == "linear_probe" and section.backbone == TINY
    assert yaml.safe_load((tdir / "best_config.yaml").read_text())["train"]["cut"] in (
        "block1_pool", "block2_pool", "block3_pool")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = """
import json, os, sys
from test_training_helpers import TINY, arrays, hierarchy
from kmedtl.training import FeatureCache, train_section
from kmedtl.training.tuning import TransferHyperModel, run_search

LOG = sys.argv[1]
base = train_section({"model": "flat", "backbone": TINY, "epochs": 1, "batch_size": 8,
                      "jit_compile": False, "verbose": 0,
                      "tune": {"max_trials": 4, "strategies": ["linear_probe"], "seed": 3,
                               "cuts": "none"}})

class Logged(TransferHyperModel):
    def fit(self, hp, model, *args, **kwargs):
        trial = next(c.trial for c in kwargs["callbacks"] if hasattr(c, "trial"))
        with open(LOG, "a") as fh:
            fh.write(json.dumps([os.environ["KERASTUNER_TUNER_ID"], trial.trial_id]) + "\\n")
        return super().fit(hp, model, *args, **kwargs)

x, y = arrays(24, n_classes=3)
hm = Logged(base, hierarchy(), (32, 32, 1), plain_train=(x, y), plain_val=(x, y),
            feature_cache=FeatureCache())
res = run_search(hm, (x, y), (x, y), directory=sys.argv[2], verbose=0)
print(json.dumps({"role": res.role, "rows": [[r["trial_id"], r["status"]] for r in res.rows]}))
"""


@pytest.mark.slow
def test_distributed_chief_and_two_workers_run_each_trial_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]),
               TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow",
               KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(port))
    log, directory = tmp_path / "trials.log", tmp_path / "tuning"
    procs = {}
    try:
        for tid in ("chief", "tuner0", "tuner1"):
            procs[tid] = subprocess.Popen(
                [sys.executable, str(script), str(log), str(directory)],
                env=dict(env, KERASTUNER_TUNER_ID=tid), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
            if tid == "chief":
                time.sleep(1.0)
        deadline = time.monotonic() + 240
        outputs = {}
        for tid, p in procs.items():
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, f"{tid} failed:\n{err[-4000:]}"
            outputs[tid] = json.loads(out.strip().splitlines()[-1])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    ran = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
    trial_ids = [t for _, t in ran]
    assert len(trial_ids) == len(set(trial_ids)) == 4  # none lost, none run twice
    assert {w for w, _ in ran} <= {"tuner0", "tuner1"}  # the chief only serves
    assert outputs["chief"]["role"] == "chief"
    assert sorted(outputs["chief"]["rows"]) == sorted([t, "COMPLETED"] for t in trial_ids)
    assert outputs["tuner0"]["role"] == outputs["tuner1"]["role"] == "worker"
