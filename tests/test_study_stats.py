"""kmedtl.study's pieces without training: metrics, paired tests, config, subsets, BN."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from kmedtl.errors import ConfigError
from kmedtl.evaluation import auroc_per_class
from kmedtl.study.config import load_study
from kmedtl.study.data import StudySplit
from kmedtl.study.stats import metric, metric_values, paired
from kmedtl.study.training import epochs_for, recalibrate_batchnorm


def test_metric_values_equal_sklearn():
    rng = np.random.default_rng(0)
    for t in range(30):
        n, k = int(rng.integers(5, 200)), 4
        y = rng.integers(0, k if t % 4 else 3, n)  # sometimes a class is absent
        p = rng.dirichlet(np.ones(k), n)
        if t % 5 == 0:
            p = np.round(p, 1)  # ties in the scores
        pred = p.argmax(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = {"balanced_accuracy": skm.balanced_accuracy_score(y, pred),
                   "kappa": skm.cohen_kappa_score(y, pred, labels=list(range(k))),
                   "auroc_macro": np.nanmean(auroc_per_class(y, p)),
                   "f1_macro": skm.f1_score(y, pred, labels=list(range(k)), average="macro",
                                            zero_division=0)}
        got = metric_values(y, p)
        for name, v in ref.items():
            assert got[name] == pytest.approx(v, abs=1e-9), name
            assert metric(name, y, p) == pytest.approx(v, abs=1e-9)


def test_paired_detects_a_better_model_and_summarises_seeds():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 400)
    good = {s: np.eye(4)[np.where(rng.random(400) < 0.9, y, (y + 1) % 4)] for s in range(3)}
    bad = {s: np.eye(4)[np.where(rng.random(400) < 0.6, y, (y + 1) % 4)] for s in range(3)}
    r = paired(y, good, bad, n_boot=200)
    assert r["seeds"] == [0, 1, 2] and r["wins"] == 3
    md = r["mean_difference"]
    assert 0 < md["ci_low"] <= md["value"] <= md["ci_high"]
    assert r["mcnemar_p_max"] < 0.001
    assert paired(y, good, {}, n_boot=10) is None


def _write(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


BASE = """
data: {{root: {root}, hierarchy: {{a: null, b: null}}}}
grid: {{sizes: [5, all], seeds: [0]}}
"""


def test_config_errors_name_the_field(tmp_path):
    p = _write(tmp_path, BASE.format(root=tmp_path) + "name: x\narms: [{name: a}, {name: a}]\n")
    with pytest.raises(ConfigError, match="names repeat"):
        load_study(p)
    p = _write(tmp_path, BASE.format(root=tmp_path)
               + "name: x\narms: [{name: a}, {name: b, init: nope}]\n")
    with pytest.raises(ConfigError, match="arms.b.init"):
        load_study(p)
    p = _write(tmp_path, BASE.format(root=tmp_path / "missing") + "name: x\narms: [{name: a}, "
               "{name: b}]\n")
    with pytest.raises(ConfigError, match="data.root"):
        load_study(p)


def test_comparisons_inherit_shared_sections(tmp_path):
    p = _write(tmp_path, BASE.format(root=tmp_path) + """
train: {backbone: cbr_micro, epochs: 3}
comparisons:
  - {name: one, arms: [{name: a}, {name: b, model: hierarchical}]}
  - {name: two, train: {epochs: 5}, arms: [{name: a}, {name: c, strategy: linear_probe}]}
""")
    one, two = load_study(p)
    assert one.train == {"backbone": "cbr_micro", "epochs": 3}
    assert two.train == {"backbone": "cbr_micro", "epochs": 5}
    assert one.arm("b").train == {"model": "hierarchical"} and one.reference == "a"


def test_epochs_per_n():
    assert epochs_for({25: 30, "all": 8}, 25) == 30
    assert epochs_for({25: 30, "all": 8}, "all") == 8
    assert epochs_for(7, 100) == 7
    with pytest.raises(KeyError, match="N=50"):
        epochs_for({25: 30}, 50)


def _fake_split():
    y = np.arange(60) % 3  # 15 per class in the 45 training rows
    ids = [f"img{i:03d}" for i in range(len(y))]
    return StudySplit(None, np.zeros((len(y), 4, 4, 1), "float32"), y, ids,
                      np.arange(45), np.arange(45, 60))


def test_subsets_are_nested_and_pretrain_pool_is_disjoint():
    s = _fake_split()
    for seed in (0, 1):
        small, big = set(s.subset(3, seed)), set(s.subset(6, seed))
        assert small <= big and len(big) == 18
        assert np.bincount(s.y[list(small)]).tolist() == [3, 3, 3]
    pool = set(s.pretrain_pool([3, 6, "all"], [0, 1]).tolist())
    assert not pool & (set(s.subset(6, 0)) | set(s.subset(6, 1)))
    assert not pool & set(s.test_rows.tolist())
    assert len(s.subset("all", 0)) == 45


def test_recalibrate_batchnorm_sets_population_statistics():
    import keras

    x = np.random.default_rng(0).normal(3.0, 2.0, (300, 5)).astype("float32")
    inp = keras.Input((5,))
    bn = keras.layers.BatchNormalization()
    model = keras.Model(inp, bn(inp))
    assert recalibrate_batchnorm(model, x, batch_size=100) == 1
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), rtol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.var(0), rtol=0.05)
    assert bn.momentum == 0.99
    bn.trainable = False
    assert recalibrate_batchnorm(model, x) == 0


def test_plan_shares_identical_cells_and_keys_pretraining_pools(tmp_path):
    from kmedtl.study.runner import StudyRunner

    p = _write(tmp_path, BASE.format(root=tmp_path) + """
grid: {sizes: [3, all], seeds: [0, 1]}
train: {backbone: cbr_micro, epochs: 1}
pretrain:
  shared: {method: rotation}
  own: {method: rotation, pool: per_seed}
comparisons:
  - {name: one, arms: [{name: a}, {name: b, init: shared}]}
  - {name: two, arms: [{name: scratch}, {name: c, init: own}]}
""")
    runner = StudyRunner(load_study(p), tmp_path / "out")
    runner.split = _fake_split()
    cells = runner.plan()
    assert len(runner.all_planned) == 2 * 2 * 2 * 2
    assert len(cells) == 12  # "a" and "scratch" are the same 4 cells
    by = {(c.arm, str(c.n), c.seed): c for c in cells}
    assert by[("b", "all", 0)].skip_reason.startswith("not applicable")
    assert by[("b", "3", 0)].pretrain_key == by[("b", "3", 1)].pretrain_key  # shared pool
    assert by[("c", "3", 0)].pretrain_key != by[("c", "3", 1)].pretrain_key  # one per seed
    assert [str(c.n) for c in cells][:6] == ["3"] * 6  # small N first


def test_pretraining_keys_do_not_depend_on_where_the_datasets_live(tmp_path):
    """Committed cells must be found on any machine: the pool enters the key as paths
    relative to the data root (CI keeps the datasets elsewhere than a workstation)."""
    from kmedtl.study.runner import StudyRunner

    keys = []
    for where in ("here", "there"):
        root = tmp_path / where / "datasets"
        root.mkdir(parents=True)
        p = _write(tmp_path / where, BASE.format(root=root) + """
grid: {sizes: [3], seeds: [0]}
train: {backbone: cbr_micro, epochs: 1}
pretrain: {own: {method: rotation}}
comparisons:
  - {name: one, arms: [{name: a}, {name: b, init: own}]}
""")
        runner = StudyRunner(load_study(p), tmp_path / where / "out")
        split = _fake_split()
        split.ids = [str(root / i) for i in split.ids]
        runner.split = split
        keys.append({(c.arm, c.pretrain_key, c.key) for c in runner.plan()})
    assert keys[0] == keys[1]
    assert any(k[1] for k in keys[0])  # the pretrained arm has a pool key


def test_an_arm_with_an_unknown_train_field_stops_the_study_when_it_loads(tmp_path):
    """An unquoted comma in a YAML flow mapping splits a label into a bogus field; that
    must be a load error naming the arm, not one failed cell after another mid-run."""
    p = _write(tmp_path, BASE.format(root=tmp_path) + """
train: {backbone: cbr_micro, epochs: 1}
comparisons:
  - {name: one, arms: [{name: a}, {name: b, label: default (flat, fine_tune)}]}
""")
    with pytest.raises(ConfigError,
                       match=r"(?s)arms\[1\] \(b\), N=5: .*train.fine_tune\): unknown field"):
        load_study(p)
