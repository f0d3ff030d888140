"""Per-cell metrics with bootstrap CIs, paired comparisons between arms with the **seed** as
the unit of inference, and Holm's correction over a report's family of comparisons.

Per cell (one arm, one N, one seed): balanced accuracy, Cohen's kappa, macro AUROC
(one-vs-rest) and macro F1 over the leaves, each with a 95% percentile-bootstrap CI over
the test cases (:func:`kmedtl.evaluation.bootstrap`, strata = true class).  Such a CI
describes one trained model: it says how much the number would move on another test set,
not how much it would move with another training seed.

Paired comparison of arm A against the reference arm B at one N (:func:`paired`): both arms
are trained with the same seeds, a seed fixes the training subset, and every model is
tested on the same test cases.  The difference A - B of the primary metric is taken per
seed, and the inference treats **the seed as the unit** (a method "helps" when the effect
holds across training seeds, ``DESIGN.md``, "Honest numbers"):

- :func:`seed_bootstrap` -- a two-level (hierarchical) bootstrap: resample the seeds with
  replacement, then the test cases (stratified by class); the mean difference over the
  resampled seeds gives the seed-level 95% percentile CI and a two-sided bootstrap p-value;
- :func:`seed_t_test` -- a one-sample t-test of the per-seed differences against 0
  (``df = seeds - 1``), the cross-check;
- the p-value a verdict uses is the larger of the two (see :func:`paired`), and a report
  corrects it with :func:`holm` over all the comparisons it makes.

With 3 seeds either test is weak, and says so in its docstring.  The older per-seed pieces
are kept beside them, labelled as what they are: the image-level paired bootstrap CI of the
seed-mean difference (one trained model per seed; it describes test-set noise only) and
McNemar's test per seed (per-case correctness).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import ttest_1samp

from kmedtl.evaluation import bootstrap, compare_models, mean_sd
from kmedtl.evaluation.metrics import (
    auroc_macro_ranks,
    confusion_counts,
    confusion_metric,
    weighted_confusions,
)
from kmedtl.study.config import METRICS


def metric_values(y, probs) -> dict[str, float]:
    """The four study metrics of leaf probabilities (``nan`` where undefined):
    :func:`~kmedtl.evaluation.metrics.confusion_metric` of the confusion matrix (equal to
    scikit-learn's ``balanced_accuracy_score``, ``cohen_kappa_score``, ``f1_score(average=
    "macro", zero_division=0)`` over all classes) and the mean of the defined one-vs-rest
    AUROCs (:func:`~kmedtl.evaluation.metrics.auroc_macro_ranks`) -- the bootstrap forms."""
    y = np.asarray(y).astype(int)
    p = np.asarray(probs, dtype=float)
    cm = confusion_counts(y, p.argmax(1), p.shape[1])
    return {"balanced_accuracy": float(confusion_metric(cm, "balanced_accuracy")),
            "kappa": float(confusion_metric(cm, "kappa")),
            "auroc_macro": auroc_macro_ranks(y, p),
            "f1_macro": float(confusion_metric(cm, "f1_macro"))}


def metric(name: str, y, probs) -> float:
    """One study metric (the confusion-matrix ones skip the AUROC)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(probs, dtype=float)
    if name == "auroc_macro":
        return auroc_macro_ranks(y, p)
    return float(confusion_metric(confusion_counts(y, p.argmax(1), p.shape[1]), name))


def cell_metrics(y, probs, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """``{metric: {"value", "ci_low", "ci_high"}}`` for :data:`~kmedtl.study.config.METRICS`."""
    y = np.asarray(y)
    p = np.asarray(probs)
    return bootstrap(lambda idx: metric_values(y[idx], p[idx]), len(y), n_boot=n_boot,
                     alpha=alpha, seed=seed, strata=y)


def _metric_fn(name):
    return lambda y, p: metric(name, y, p)


# ------------------------------------------------------------------ seed-level inference
def distinct_seed_resamples(n_seeds: int) -> int:
    """How many different multisets a bootstrap of ``n_seeds`` seeds can draw:
    ``C(2n - 1, n)`` -- 10 for 3 seeds, 35 for 4, 126 for 5."""
    return math.comb(2 * n_seeds - 1, n_seeds) if n_seeds > 0 else 0


def bootstrap_p(draws, null: float = 0.0) -> float:
    """Two-sided bootstrap p-value of ``draws`` (bootstrap replicates of a difference)
    against ``null``: ``p = min(1, 2 * min(P(d <= null), P(d >= null)))`` with each
    probability counted as ``(1 + #) / (1 + B)`` over the ``B`` finite replicates (the
    Monte Carlo p-value of Davison & Hinkley 1997, never exactly 0: the smallest p that
    ``B = 1000`` replicates can give is 2/1001).  ``nan`` without finite replicates."""
    d = np.asarray(draws, dtype=float)
    d = d[np.isfinite(d)]
    if not d.size:
        return float("nan")
    lo = (1 + np.count_nonzero(d <= null)) / (1 + d.size)
    hi = (1 + np.count_nonzero(d >= null)) / (1 + d.size)
    return float(min(1.0, 2 * min(lo, hi)))


def _stratified_counts(y, n_boot: int, rng) -> np.ndarray:
    """``(n_boot, n)`` counts: how often each test case is drawn in each resample, drawn
    with replacement within each class (every resample keeps the class counts)."""
    n = len(y)
    flat = np.zeros(n_boot * n)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        pick = members[rng.integers(0, len(members), (n_boot, len(members)))]
        flat += np.bincount((pick + n * np.arange(n_boot)[:, None]).ravel(),
                            minlength=n_boot * n)
    return flat.reshape(n_boot, n)


def _per_seed_replicates(y, probs: list, name: str, counts: np.ndarray) -> np.ndarray:
    """``(n_boot, seeds)``: ``name`` of every seed's model on every test-case resample
    (``counts``: :func:`_stratified_counts`).  Confusion-matrix metrics are one matrix
    product per seed; the AUROC falls back to one evaluation per resample."""
    k = np.asarray(probs[0]).shape[1]
    if name != "auroc_macro":
        out = []
        for p in probs:
            cm = weighted_confusions(y, np.asarray(p).argmax(1), k, counts)
            out.append(confusion_metric(cm, name))
        return np.stack(out, axis=1)
    idx = [np.repeat(np.arange(len(y)), c.astype(int)) for c in counts]
    return np.array([[auroc_macro_ranks(y[i], np.asarray(p)[i]) for p in probs] for i in idx])


def seed_bootstrap(y, probs_a: list, probs_b: list, metric: str = "balanced_accuracy",
                   n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Two-level (hierarchical) paired bootstrap of the seed-mean difference A - B.

    ``probs_a[i]`` and ``probs_b[i]`` are the test-set probabilities of the two arms trained
    with the same seed (hence the same training subset).  Each of ``n_boot`` replicates

    1. draws ``S`` seeds with replacement from the ``S`` seed pairs (the seed is the unit:
       the per-seed differences are what varies from one training run to the next), and
    2. draws the test cases with replacement within each class; the same resample scores
       both arms of a seed *and* every seed of the replicate, because every model was
       tested on the same test set (seeds and test cases are crossed, so test-set noise is
       shared by the seeds, not averaged away),

    and takes the mean over the drawn seeds of ``metric(A) - metric(B)``.  Returns
    ``{"value"`` (the mean of the per-seed differences on the whole test set),
    ``"ci_low", "ci_high"`` (the percentile interval), ``"p_value"`` (two-sided,
    :func:`bootstrap_p`), ``"n_boot", "n_seeds", "distinct_seed_resamples"}``.

    **Coarse with few seeds.**  ``S`` seeds have only :func:`distinct_seed_resamples`
    (``C(2S-1, S)``) seed multisets -- 10 for 3 seeds -- and its variance of a mean over
    seeds is ``(S-1)/S`` of the usual ``sd**2 / S`` (2/3 for 3 seeds), so the CI is coarse
    and too narrow, and when all 3 seeds agree in sign the p-value mostly reflects
    test-set noise (it cannot go below ``2 / (n_boot + 1)``, see :func:`bootstrap_p`).
    That is why :func:`paired` also runs :func:`seed_t_test` and a verdict needs both.

    Vectorised: one ``(n_boot, n) @ (n, k*k)`` product per seed and arm gives every
    replicate's confusion matrix (the AUROC loops over replicates).  Deterministic for a
    given ``seed``.
    """
    y = np.asarray(y).astype(int)
    if len(probs_a) != len(probs_b) or not probs_a:
        raise ValueError("seed_bootstrap: give one pair of probabilities per seed")
    rng = np.random.default_rng(seed)
    s = len(probs_a)
    counts = _stratified_counts(y, n_boot, rng)
    diffs = (_per_seed_replicates(y, probs_a, metric, counts)
             - _per_seed_replicates(y, probs_b, metric, counts))  # (n_boot, S)
    weights = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot) / s  # seeds drawn
    draws = np.where(weights > 0, weights * diffs, 0.0).sum(1)
    draws[(np.isnan(diffs) & (weights > 0)).any(1)] = np.nan  # a drawn seed undefined
    fn = _metric_fn(metric)
    full = [fn(y, a) - fn(y, b) for a, b in zip(probs_a, probs_b)]
    finite = draws[np.isfinite(draws)]
    lo, hi = (np.quantile(finite, [alpha / 2, 1 - alpha / 2]) if finite.size
              else (np.nan, np.nan))
    return {"value": float(np.mean(full)), "ci_low": float(lo), "ci_high": float(hi),
            "p_value": bootstrap_p(draws), "n_boot": int(n_boot), "n_seeds": s,
            "distinct_seed_resamples": distinct_seed_resamples(s)}


def seed_t_test(differences) -> dict:
    """One-sample t-test of per-seed differences against 0 (``scipy.stats.ttest_1samp``,
    two-sided): ``{"t", "df", "p_value", "mean", "sd"}``.

    It treats each seed's difference on the whole test set as one observation, so it sees
    the seed-to-seed spread but not test-set noise (the test set is held fixed).  With 3
    seeds ``df = 2``: the 97.5% t quantile is 4.30, and a difference must be large against
    its spread to reach p < 0.05.  Fewer than 2 seeds: ``p = nan``.  All seeds equal: ``p =
    1`` when they are all 0, else 0 (no spread at all)."""
    d = np.asarray(differences, dtype=float)
    d = d[np.isfinite(d)]
    n = int(d.size)
    mean = float(d.mean()) if n else float("nan")
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    if n < 2:
        return {"t": float("nan"), "df": max(n - 1, 0), "p_value": float("nan"),
                "mean": mean, "sd": sd}
    if sd == 0:
        return {"t": float("nan") if mean == 0 else math.copysign(math.inf, mean),
                "df": n - 1, "p_value": 1.0 if mean == 0 else 0.0, "mean": mean, "sd": sd}
    r = ttest_1samp(d, 0.0)
    return {"t": float(r.statistic), "df": n - 1, "p_value": float(r.pvalue), "mean": mean,
            "sd": sd}


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given.

    Sort the ``m`` p-values ascending, ``p(1) <= ... <= p(m)``; the adjusted ``p(i)`` is
    ``max over j <= i of min(1, (m - j + 1) * p(j))``.  Rejecting where the adjusted p is
    below alpha controls the family-wise error rate at alpha under any dependence between
    the tests.  ``nan`` (no test) stays ``nan`` and does not count towards ``m``.

    Written here rather than imported: statsmodels (``multipletests(method="holm")``) is
    not a kmedtl dependency, and scipy only has Benjamini-Hochberg / -Yekutieli
    (``scipy.stats.false_discovery_control``), which control the false discovery rate, not
    the family-wise error rate.
    """
    p = np.asarray(list(p_values), dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if not m:
        return out.tolist()
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out.tolist()


def verdict(c: dict, alpha: float = 0.05) -> str:
    """"better" / "worse" when the Holm-adjusted seed-level p (``c["p_holm"]``, set by
    :func:`holm_family`) is below ``alpha``, by the sign of the seed-mean difference; else
    "no clear difference"; "undetermined" without a p-value (fewer than 2 seeds)."""
    p = c.get("p_holm")
    if p is None or not math.isfinite(p):
        return "undetermined"
    if p < alpha:
        return "better" if c["mean_difference"]["value"] > 0 else "worse"
    return "no clear difference"


def holm_family(comparisons, alpha: float = 0.05) -> int:
    """Holm-correct a family of :func:`paired` results in place: sets ``"p_holm"``,
    ``"family_size"`` and ``"verdict"`` on each from its ``"p_value"``.  Returns ``m``,
    the number of comparisons with a p-value."""
    comps = list(comparisons)
    adjusted = holm([c["p_value"] for c in comps])
    m = int(sum(math.isfinite(c["p_value"]) for c in comps))
    for c, p in zip(comps, adjusted):
        c["p_holm"] = p
        c["family_size"] = m
        c["verdict"] = verdict(c, alpha)
    return m


def paired(y, probs_a: dict, probs_b: dict, metric: str = "balanced_accuracy",
           n_boot: int = 1000, alpha: float = 0.05) -> dict | None:
    """Compare A with B over the seeds both have (``probs_*``: ``{seed: probs}``).

    Seed level (the unit of inference): ``"mean_difference"`` (:func:`seed_bootstrap`: the
    seed-mean difference, its two-level bootstrap CI and p), ``"t_test"``
    (:func:`seed_t_test` of the per-seed differences), ``"p_value"`` = the larger of the
    two p-values, which a verdict uses after :func:`holm_family`.  The larger one because
    each test misses one source of noise: the t-test holds the test set fixed, and the
    bootstrap over 3 seeds has 10 seed multisets and understates the seed spread; a
    difference counts only when it stands out against both.

    Also: per seed :func:`kmedtl.evaluation.compare_models` (the difference with its paired
    bootstrap CI, McNemar's test), ``"difference_over_seeds"`` (mean, sd), ``"wins"`` /
    ``"losses"`` (seeds where A beat / trailed B), and ``"image_level"``: the seed-mean
    difference with a paired bootstrap CI that resamples test cases only (the same
    resample for every seed) -- one trained model per seed, so it describes test-set noise
    only, not what another training seed would do.
    """
    seeds = sorted(set(probs_a) & set(probs_b))
    if not seeds:
        return None
    y = np.asarray(y)
    fn = _metric_fn(metric)
    per_seed = []
    for s in seeds:
        c = compare_models(y, probs_a[s], probs_b[s], fn, n_boot=n_boot, alpha=alpha,
                           seed=int(s))
        per_seed.append({"seed": s, "a": c["a"]["value"], "b": c["b"]["value"],
                         "difference": c["difference"], "mcnemar": c["mcnemar"]})
    pa = [np.asarray(probs_a[s]) for s in seeds]
    pb = [np.asarray(probs_b[s]) for s in seeds]

    def mean_diff(idx):
        return float(np.mean([fn(y[idx], a[idx]) - fn(y[idx], b[idx]) for a, b in zip(pa, pb)]))

    image_level = bootstrap(mean_diff, len(y), n_boot=n_boot, alpha=alpha, seed=0)
    seed_level = seed_bootstrap(y, pa, pb, metric, n_boot=n_boot, alpha=alpha, seed=0)
    diffs = [r["difference"]["value"] for r in per_seed]
    t = seed_t_test(diffs)
    p_use = (max(seed_level["p_value"], t["p_value"])
             if math.isfinite(seed_level["p_value"]) and math.isfinite(t["p_value"])
             else float("nan"))  # fewer than 2 seeds: no seed-level test
    ps = [r["mcnemar"]["p_value"] for r in per_seed]
    return {"metric": metric, "seeds": seeds, "per_seed": per_seed,
            "mean_difference": seed_level, "t_test": t, "p_value": float(p_use),
            "image_level": image_level, "difference_over_seeds": mean_sd(diffs),
            "wins": int(sum(d > 0 for d in diffs)), "losses": int(sum(d < 0 for d in diffs)),
            "mcnemar_p": ps, "mcnemar_p_max": float(max(ps)),
            "mcnemar_significant_seeds": int(sum(p < alpha for p in ps))}


def ratio(y, probs_small: dict, probs_large: dict, metric: str = "balanced_accuracy",
          n_boot: int = 1000, alpha: float = 0.05) -> dict | None:
    """The moonshot ratio: the seed-mean ``metric`` of the small-N cells divided by that of
    the large-N (all labels) cells, over the seeds both have, with a percentile-bootstrap CI
    that resamples the test cases (the same resample for every cell).  Also the per-seed
    ratios.  None when no seed has both."""
    seeds = sorted(set(probs_small) & set(probs_large))
    if not seeds:
        return None
    y = np.asarray(y)
    fn = _metric_fn(metric)
    ps = [np.asarray(probs_small[s]) for s in seeds]
    pl = [np.asarray(probs_large[s]) for s in seeds]

    def value(idx):
        small = np.mean([fn(y[idx], p[idx]) for p in ps])
        large = np.mean([fn(y[idx], p[idx]) for p in pl])
        return float(small / large) if large > 0 else float("nan")

    out = bootstrap(value, len(y), n_boot=n_boot, alpha=alpha, seed=0)
    out["seeds"] = seeds
    out["per_seed"] = [float(fn(y, a) / fn(y, b)) for a, b in zip(ps, pl)]
    out["small"] = float(np.mean([fn(y, p) for p in ps]))
    out["large"] = float(np.mean([fn(y, p) for p in pl]))
    return out


__all__ = ["METRICS", "bootstrap_p", "cell_metrics", "distinct_seed_resamples", "holm",
           "holm_family", "metric", "metric_values", "paired", "ratio", "seed_bootstrap",
           "seed_t_test", "verdict"]
