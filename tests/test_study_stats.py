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
from kmedtl.study.stats import (
    bootstrap_p,
    distinct_seed_resamples,
    holm,
    holm_family,
    metric,
    metric_values,
    paired,
    seed_bootstrap,
    seed_t_test,
)
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
    il = r["image_level"]
    assert 0 < il["ci_low"] <= il["value"] <= il["ci_high"]
    assert il["value"] == pytest.approx(md["value"])
    assert r["t_test"]["df"] == 2
    assert r["p_value"] == max(md["p_value"], r["t_test"]["p_value"])
    assert r["mcnemar_p_max"] < 0.001
    assert paired(y, good, {}, n_boot=10) is None
    one = paired(y, {0: good[0]}, {0: bad[0]}, n_boot=50)  # one seed: no seed-level test
    assert np.isnan(one["p_value"])
    holm_family([one])
    assert one["verdict"] == "undetermined"


# ------------------------------------------------------------------ seed-level inference
def test_holm_matches_a_hand_computed_case():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06
    # (step-down: an adjusted p never falls below the one before it)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    got = holm([0.01, float("nan"), 0.04])  # nan: no test, not counted in m
    assert got[0] == pytest.approx(0.02) and np.isnan(got[1]) and got[2] == pytest.approx(0.04)
    assert holm([0.02, 0.02]) == [0.04, 0.04]  # ties
    assert holm([]) == []


def test_holm_family_sets_verdicts_from_the_adjusted_p():
    def comp(p, diff):
        return {"p_value": p, "mean_difference": {"value": diff}}

    comps = [comp(0.001, 0.05), comp(0.01, -0.04), comp(0.02, 0.03), comp(float("nan"), 0.1)]
    assert holm_family(comps) == 3
    assert [c["p_holm"] for c in comps[:3]] == pytest.approx([0.003, 0.02, 0.02])
    assert [c["verdict"] for c in comps] == ["better", "worse", "better", "undetermined"]
    assert all(c["family_size"] == 3 for c in comps)
    # the same raw p = 0.02 in a family of 5 no longer passes
    five = [comp(0.02, 0.03)] + [comp(0.5, 0.0) for _ in range(4)]
    holm_family(five)
    assert five[0]["p_holm"] == pytest.approx(0.1) and five[0]["verdict"] == "no clear difference"


def _seeded(y, acc, rng):
    """One-hot predictions right on a fraction ``acc`` of the cases of each class."""
    right = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        right[rng.choice(idx, int(round(acc * len(idx))), replace=False)] = True
    return np.eye(3)[np.where(right, y, (y + 1) % 3)]


def test_seed_bootstrap_separates_agreeing_from_disagreeing_seeds():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 100)
    ref = [_seeded(y, 0.75, rng) for _ in range(3)]
    # A beats B by 10-12 points on every seed
    agree = [_seeded(y, 0.85 + 0.01 * s, rng) for s in range(3)]
    # A is far ahead on one seed, far behind on another, even on the third
    disagree = [_seeded(y, acc, rng) for acc in (0.90, 0.60, 0.75)]
    good = seed_bootstrap(y, agree, ref, n_boot=1000)
    mixed = seed_bootstrap(y, disagree, ref, n_boot=1000)
    assert good["value"] > 0.09 and 0 < good["ci_low"] < good["value"] < good["ci_high"]
    assert good["p_value"] < 0.01
    assert mixed["ci_low"] < 0 < mixed["ci_high"] and mixed["p_value"] > 0.3
    assert good["distinct_seed_resamples"] == 10 and good["n_seeds"] == 3
    # paired() combines it with the t-test: small for the agreeing seeds, large otherwise
    pa = paired(y, dict(enumerate(agree)), dict(enumerate(ref)), n_boot=200)
    pm = paired(y, dict(enumerate(disagree)), dict(enumerate(ref)), n_boot=200)
    assert pa["t_test"]["p_value"] < 0.01 and pa["p_value"] < 0.05
    assert pm["t_test"]["p_value"] > 0.3 and pm["p_value"] > 0.3
    # the same inputs give the same numbers (the report must regenerate exactly)
    assert seed_bootstrap(y, agree, ref, n_boot=1000) == good


def test_seed_bootstrap_is_wider_than_the_image_level_ci_when_seeds_spread():
    """Seeds that disagree widen the seed-level CI; the image-level CI (test-set noise
    only) does not see them."""
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 150)
    ref = [_seeded(y, 0.75, rng) for _ in range(3)]
    spread = [_seeded(y, acc, rng) for acc in (0.95, 0.75, 0.70)]
    r = paired(y, dict(enumerate(spread)), dict(enumerate(ref)), n_boot=500)
    seed_w = r["mean_difference"]["ci_high"] - r["mean_difference"]["ci_low"]
    image_w = r["image_level"]["ci_high"] - r["image_level"]["ci_low"]
    assert seed_w > 1.5 * image_w


@pytest.mark.parametrize("name", ["balanced_accuracy", "kappa", "f1_macro", "auroc_macro"])
def test_seed_bootstrap_replicates_equal_the_metric_on_each_resample(name):
    """The vectorised replicates (one matrix product per seed) are the metric of the
    resampled cases, as a loop would compute it."""
    from kmedtl.study.stats import _per_seed_replicates, _stratified_counts

    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 120)
    probs = [rng.dirichlet(np.ones(4), 120) for _ in range(2)]
    counts = _stratified_counts(y, 25, np.random.default_rng(0))
    assert (counts.sum(1) == 120).all()
    for c in range(4):  # stratified: every resample keeps the class counts
        assert (counts[:, y == c].sum(1) == (y == c).sum()).all()
    got = _per_seed_replicates(y, probs, name, counts)
    for b in range(25):
        idx = np.repeat(np.arange(120), counts[b].astype(int))
        for s in range(2):
            assert got[b, s] == pytest.approx(metric(name, y[idx], probs[s][idx]), abs=1e-12)


def test_bootstrap_p_and_t_test_edges():
    assert bootstrap_p(np.ones(999)) == pytest.approx(2 / 1000)  # never exactly 0
    assert bootstrap_p(np.r_[-np.ones(500), np.ones(500)]) == 1.0
    assert np.isnan(bootstrap_p([np.nan]))
    assert distinct_seed_resamples(3) == 10 and distinct_seed_resamples(5) == 126
    t = seed_t_test([0.03, 0.02, 0.04])
    assert t["df"] == 2 and t["p_value"] == pytest.approx(0.0351, abs=1e-4)  # t = 5.196, df 2
    assert np.isnan(seed_t_test([0.05])["p_value"])
    assert seed_t_test([0.0, 0.0, 0.0])["p_value"] == 1.0
    assert seed_t_test([0.02, 0.02, 0.02])["p_value"] == 0.0


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
