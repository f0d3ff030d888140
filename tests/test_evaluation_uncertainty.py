"""Bootstrap intervals (width, coverage, missing classes), McNemar, paired comparisons,
repeated-split summaries and learning curves."""

import json

import numpy as np
import pytest
from scipy import stats

from kmedtl.evaluation import (
    auroc_per_class,
    bootstrap,
    bootstrap_ci,
    bootstrap_indices,
    compare_models,
    format_interval,
    format_mean_sd,
    learning_curve,
    load_learning_curve,
    mcnemar,
    mean_sd,
    summarise_learning_curve,
    summarise_repeats,
)


def accuracy(y, pred):
    return float((y == pred).mean())


def _dataset(rng, n, p_correct=0.8):
    y = rng.integers(0, 3, n)
    wrong = rng.random(n) > p_correct
    pred = np.where(wrong, (y + 1) % 3, y)
    return y, pred


def test_interval_contains_value_and_shrinks_with_sample_size():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 200, 2000):
        y, pred = _dataset(rng, n)
        ci = bootstrap_ci(accuracy, y, pred, n_boot=400, seed=1)
        assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]
        widths.append(ci["ci_high"] - ci["ci_low"])
    assert widths[0] > widths[1] > widths[2]
    # seeded: the same call gives the same interval
    y, pred = _dataset(np.random.default_rng(5), 100)
    assert bootstrap_ci(accuracy, y, pred, n_boot=50, seed=3) == \
        bootstrap_ci(accuracy, y, pred, n_boot=50, seed=3)


def test_percentile_interval_covers_the_true_accuracy():
    """>= 90% of 100 simulated test sets (n=100, true accuracy 0.8) cover 0.8."""
    rng = np.random.default_rng(2024)
    hits = 0
    for i in range(100):
        y, pred = _dataset(rng, 100, 0.8)
        ci = bootstrap_ci(accuracy, y, pred, n_boot=300, seed=i)
        hits += ci["ci_low"] <= 0.8 <= ci["ci_high"]
    assert hits >= 90, hits


def test_resamples_missing_a_class_are_left_out():
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 30 + [2])  # one case of class 2
    p = rng.dirichlet(np.ones(3), len(y))
    res = bootstrap(lambda idx: {"auroc_2": auroc_per_class(y[idx], p[idx])[2]}, len(y),
                    n_boot=200, seed=0, details=True)["auroc_2"]
    assert 40 < res["n_failed"] < 120  # ~ (60/61)^61 = 37% of resamples lack class 2
    assert res["ci_low"] is not None and 0 <= res["ci_low"] <= res["ci_high"] <= 1
    # a metric undefined on the data itself has no interval
    res = bootstrap(lambda idx: float("nan"), 10, n_boot=5)
    assert res == {"value": None, "ci_low": None, "ci_high": None}


def test_strata_and_groups():
    strata = np.array([0] * 10 + [1] * 5)
    for idx in bootstrap_indices(15, 20, seed=0, strata=strata):
        assert (strata[idx] == 0).sum() == 10 and (strata[idx] == 1).sum() == 5
    groups = np.repeat(np.arange(5), 3)  # 5 patients with 3 images each
    for idx in bootstrap_indices(15, 20, seed=0, groups=groups):
        counts = np.bincount(groups[idx], minlength=5)
        assert (counts % 3 == 0).all()  # a patient's images come together


def test_mcnemar_exact_and_chi_square():
    a = np.array([True] * 7 + [False] * 2 + [True] * 20)   # b = 7, c = 2
    b = np.array([False] * 7 + [True] * 2 + [True] * 20)
    r = mcnemar(a, b)
    assert (r["b"], r["c"], r["method"]) == (7, 2, "exact binomial")
    assert r["p_value"] == pytest.approx(stats.binomtest(7, 9, 0.5).pvalue)
    assert r["p_value"] == pytest.approx(2 * (1 + 9 + 36) / 512)  # 2 P(X <= 2), X~B(9, .5)

    a = np.array([True] * 30 + [False] * 12)               # b = 30, c = 12
    r = mcnemar(a, ~a)
    assert r["method"].startswith("chi-square")
    assert r["statistic"] == pytest.approx((18 - 1) ** 2 / 42)
    assert r["p_value"] == pytest.approx(stats.chi2.sf(289 / 42, 1))
    assert mcnemar(a, a)["p_value"] == 1.0


def test_compare_models_paired():
    rng = np.random.default_rng(0)
    y, pred_a = _dataset(rng, 300, 0.85)
    pred_b = pred_a.copy()
    flip = rng.choice(300, 40, replace=False)
    pred_b[flip] = (y[flip] + 1) % 3  # B makes up to 40 extra mistakes
    r = compare_models(y, pred_a, pred_b, n_boot=300, seed=0)
    assert r["difference"]["value"] == pytest.approx(r["a"]["value"] - r["b"]["value"])
    assert r["difference"]["ci_low"] > 0
    assert r["mcnemar"]["p_value"] < 0.001 and r["mcnemar"]["c"] == 0
    same = compare_models(y, pred_a, pred_a, n_boot=50)
    assert same["difference"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert same["mcnemar"]["p_value"] == 1.0


def test_repeated_splits_mean_sd():
    folds = [{"accuracy": 0.8, "kappa": {"value": 0.6, "ci_low": 0.5, "ci_high": 0.7}},
             {"accuracy": 0.7, "kappa": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}},
             {"accuracy": 0.9, "kappa": {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8}}]
    s = summarise_repeats(folds)
    assert s["accuracy"]["mean"] == pytest.approx(0.8)
    assert s["accuracy"]["sd"] == pytest.approx(0.1)  # sample sd
    assert s["kappa"]["n"] == 3 and s["kappa"]["mean"] == pytest.approx(0.6)
    assert format_mean_sd(s["accuracy"]) == "0.800 \u00b1 0.100 (n=3)"
    assert mean_sd([0.5, float("nan")])["n"] == 1
    assert format_interval({"value": 0.8, "ci_low": 0.7, "ci_high": 0.9}) == \
        "0.800 (0.700-0.900)"


def test_learning_curve_collects_saves_and_plots(tmp_path):
    calls = []

    def train_fn(n, seed):
        calls.append((n, seed))
        return 1.0 - 5.0 / n + 0.01 * seed

    res = learning_curve(train_fn, [25, 50, 100], [0, 1, 2], metric="accuracy",
                         path=tmp_path / "learning_curve.json",
                         plot_path=tmp_path / "learning_curve.png")
    assert len(calls) == 9 and sorted(res) == [25, 50, 100]
    assert res[25] == pytest.approx([0.8, 0.81, 0.82])
    summary = summarise_learning_curve(res)
    assert summary[100]["mean"] == pytest.approx(0.96)
    loaded, metric = load_learning_curve(tmp_path / "learning_curve.json")
    assert loaded == res and metric == "accuracy"
    assert json.loads((tmp_path / "learning_curve.json").read_text())["summary"]["50"]["n"] == 3
    assert (tmp_path / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
