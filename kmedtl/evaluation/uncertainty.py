"""How sure are the numbers: bootstrap intervals, paired comparisons, repeated-split summaries.

- :func:`bootstrap` / :func:`bootstrap_ci`: **percentile bootstrap** (Efron & Tibshirani
  1993): resample the test cases with replacement ``n_boot`` times (seeded, optionally
  within strata), recompute the metric, take the ``alpha/2`` and ``1 - alpha/2``
  percentiles.  A resample on which a metric is undefined (a class absent: ``nan`` or a
  ``ValueError`` from scikit-learn) is left out of that metric's interval and counted in
  ``n_failed``.  scikit-learn has no bootstrap; ``scipy.stats.bootstrap`` handles one
  statistic of plain arrays and fails on undefined resamples, so the loop lives here.
- :func:`mcnemar`: McNemar's test for two classifiers on the same cases -- exact binomial
  (``scipy.stats.binomtest``) when the discordant count is below 25, otherwise the
  chi-square statistic with continuity correction.
- :func:`compare_models`: the bootstrap CI of a metric difference on paired resamples plus
  McNemar's p-value.
- :func:`summarise_repeats`: mean +- sd over repeated splits or k folds.

Every interval is a dict ``{"value", "ci_low", "ci_high"}`` (what ``metrics.json`` stores).

Example::

    >>> import numpy as np
    >>> y = np.array([0, 1] * 50); pred = y.copy(); pred[:20] = 1 - pred[:20]
    >>> ci = bootstrap_ci(lambda a, b: (a == b).mean(), y, pred, n_boot=200, seed=0)
    >>> ci["value"], ci["ci_low"] < 0.8 < ci["ci_high"]
    (0.8, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

from kmedtl.errors import ConfigError

#: Discordant pairs below this use the exact binomial McNemar test.
MCNEMAR_EXACT_BELOW = 25


def bootstrap_indices(n: int, n_boot: int, seed: int = 0, strata=None, groups=None):
    """Yield ``n_boot`` index arrays into ``n`` cases, drawn with replacement.

    - ``strata`` (one label per case): each stratum is resampled within itself, so every
      resample keeps the class counts of the data.
    - ``groups`` (one id per case, e.g. the patient): a *cluster* bootstrap -- whole groups
      are drawn with replacement and all their cases come along (images of one patient
      are not independent).  Resamples then vary slightly in length.

    ``strata`` and ``groups`` cannot be combined.
    """
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    if strata is not None and groups is not None:
        raise ConfigError("bootstrap: give strata or groups, not both")
    rng = np.random.default_rng(seed)
    labels = strata if strata is not None else groups
    if labels is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, n)
        return
    labels = np.asarray(labels)
    if len(labels) != n:
        raise ConfigError(f"{'strata' if strata is not None else 'groups'} has {len(labels)} "
                          f"labels for {n} cases")
    members = [np.nonzero(labels == s)[0] for s in np.unique(labels)]
    for _ in range(n_boot):
        if strata is not None:
            yield np.concatenate([g[rng.integers(0, len(g), len(g))] for g in members])
        else:
            pick = rng.integers(0, len(members), len(members))
            yield np.concatenate([members[i] for i in pick])


def _as_dict(value) -> dict[str, float]:
    if isinstance(value, Mapping):
        return {str(k): _float(v) for k, v in value.items()}
    return {"": _float(value)}


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def interval(value: float, samples, alpha: float = 0.05) -> dict:
    """``{"value", "ci_low", "ci_high"}`` from a point value and bootstrap replicates
    (``None`` bounds when no replicate is finite or the value is undefined)."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    value = _float(value)
    if not s.size or not math.isfinite(value):
        return {"value": value if math.isfinite(value) else None, "ci_low": None,
                "ci_high": None}
    lo, hi = np.percentile(s, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi)}


def bootstrap(fn: Callable[[np.ndarray], float | Mapping[str, float]], n: int, *,
              n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, strata=None,
              groups=None, details: bool = False) -> dict:
    """Percentile-bootstrap intervals of ``fn(indices)``.

    ``fn`` takes an index array into the ``n`` test cases (``np.arange(n)`` for the point
    value) and returns a float or a ``{name: float}`` dict; every key gets its interval.
    ``strata`` / ``groups``: see :func:`bootstrap_indices`.
    Returns ``{name: {"value", "ci_low", "ci_high"}}`` (for a float: that one dict).  With
    ``details``, each interval also holds ``n_boot`` and ``n_failed`` (resamples on which
    the metric was undefined).
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    point = fn(np.arange(n))
    scalar = not isinstance(point, Mapping)
    point = _as_dict(point)
    reps = {k: np.full(n_boot, np.nan) for k in point}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b, idx in enumerate(bootstrap_indices(n, n_boot, seed, strata, groups)):
            try:
                vals = _as_dict(fn(idx))
            except (ValueError, ZeroDivisionError, IndexError):
                continue  # undefined on this resample (e.g. a class is missing)
            for k, v in vals.items():
                if k in reps:
                    reps[k][b] = v
    out = {}
    for k, v in point.items():
        out[k] = interval(v, reps[k], alpha)
        if details:
            out[k]["n_boot"] = n_boot
            out[k]["n_failed"] = int((~np.isfinite(reps[k])).sum())
    return out[""] if scalar else out


def bootstrap_ci(metric: Callable[..., float], *arrays, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, strata=None, groups=None) -> dict:
    """Percentile-bootstrap CI of ``metric(*arrays)``, resampling the rows of every array
    together: ``{"value", "ci_low", "ci_high"}``."""
    arrs = [np.asarray(a) for a in arrays]
    if not arrs or len({len(a) for a in arrs}) != 1:
        raise ConfigError("bootstrap_ci: give one or more arrays of the same length")
    return bootstrap(lambda idx: metric(*[a[idx] for a in arrs]), len(arrs[0]),
                     n_boot=n_boot, alpha=alpha, seed=seed, strata=strata, groups=groups)


# ---------------------------------------------------------------------------- paired tests
def mcnemar(correct_a, correct_b, *, exact: bool | None = None) -> dict:
    """McNemar's test of equal error rates for two classifiers on the same cases.

    ``correct_a`` / ``correct_b``: booleans, case correctly classified by A / B.  The
    discordant counts are ``b`` (A right, B wrong) and ``c`` (A wrong, B right).  ``exact``
    (default: when ``b + c < 25``) uses the two-sided exact binomial test of ``b`` out of
    ``b + c`` at 0.5; otherwise ``chi2 = (|b - c| - 1)^2 / (b + c)`` with 1 degree of
    freedom.  Returns ``{"b", "c", "statistic", "p_value", "method"}``.
    """
    a = np.asarray(correct_a, bool).ravel()
    bb = np.asarray(correct_b, bool).ravel()
    if a.shape != bb.shape:
        raise ConfigError(f"mcnemar: {a.size} and {bb.size} cases; pass the same test cases")
    b = int((a & ~bb).sum())
    c = int((~a & bb).sum())
    n = b + c
    if exact is None:
        exact = n < MCNEMAR_EXACT_BELOW
    if n == 0:
        return {"b": b, "c": c, "statistic": 0.0, "p_value": 1.0,
                "method": "no discordant pairs"}
    if exact:
        p = stats.binomtest(b, n, 0.5, alternative="two-sided").pvalue
        return {"b": b, "c": c, "statistic": float(b), "p_value": float(p),
                "method": "exact binomial"}
    stat = (abs(b - c) - 1.0) ** 2 / n
    return {"b": b, "c": c, "statistic": float(stat),
            "p_value": float(stats.chi2.sf(stat, df=1)),
            "method": "chi-square with continuity correction"}


def _accuracy(y, p):
    return float((np.asarray(p).argmax(1) == y).mean()) if np.ndim(p) == 2 else float(
        (np.asarray(p) == y).mean())


def compare_models(y_true, pred_a, pred_b, metric: Callable | None = None, *,
                   n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Paired comparison of models A and B on the same test cases.

    ``pred_a`` / ``pred_b``: probabilities ``(N, K)`` or predicted labels ``(N,)``.
    ``metric(y_true, pred) -> float`` defaults to accuracy.  Returns ``{"a", "b",
    "difference"}`` (each ``{"value", "ci_low", "ci_high"}``; difference = A - B, on the
    same resampled cases) and ``"mcnemar"`` (:func:`mcnemar` on per-case correctness).
    """
    metric = metric or _accuracy
    y = np.asarray(y_true)
    pa, pb = np.asarray(pred_a), np.asarray(pred_b)
    if not len(y) == len(pa) == len(pb):
        raise ConfigError("compare_models: y_true, pred_a and pred_b must cover the same cases")

    def fn(idx):
        a, b = metric(y[idx], pa[idx]), metric(y[idx], pb[idx])
        return {"a": a, "b": b, "difference": a - b}

    out = bootstrap(fn, len(y), n_boot=n_boot, alpha=alpha, seed=seed)
    hard_a = pa.argmax(1) if pa.ndim == 2 else pa
    hard_b = pb.argmax(1) if pb.ndim == 2 else pb
    out["mcnemar"] = mcnemar(hard_a == y, hard_b == y)
    return out


# ---------------------------------------------------------------------------- repeats
def mean_sd(values: Sequence[float]) -> dict:
    """``{"mean", "sd", "n", "values"}`` (sample sd, ddof=1; 0 for one value); non-finite
    values are left out and the count says how many remained."""
    v = np.asarray([_float(x) for x in values], dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": None, "sd": None, "n": 0, "values": []}
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "sd": sd, "n": int(v.size), "values": v.tolist()}


def summarise_repeats(results: Sequence[Mapping[str, float]]) -> dict[str, dict]:
    """Mean +- sd of every metric over repeated splits / k folds.

    ``results``: one flat ``{metric: value}`` dict per split (a value may also be an
    interval dict; its ``"value"`` is used).  Returns ``{metric: mean_sd(...)}``.
    """
    keys: list[str] = []
    for r in results:
        keys += [k for k in r if k not in keys]
    out = {}
    for k in keys:
        vals = []
        for r in results:
            v = r.get(k)
            vals.append(v.get("value") if isinstance(v, Mapping) else v)
        out[k] = mean_sd(vals)
    return out


def format_interval(ci: Mapping | None, digits: int = 3) -> str:
    """``"0.812 (0.750-0.866)"`` from an interval dict; ``"n/a"`` when undefined."""
    if not ci or ci.get("value") is None:
        return "n/a"
    v = f"{ci['value']:.{digits}f}"
    if ci.get("ci_low") is None:
        return v
    return f"{v} ({ci['ci_low']:.{digits}f}-{ci['ci_high']:.{digits}f})"


def format_mean_sd(s: Mapping | None, digits: int = 3) -> str:
    """``"0.812 +- 0.021 (n=5)"``."""
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} \u00b1 {s['sd']:.{digits}f} (n={s['n']})"
