"""Calibration: expected calibration error, reliability curves, temperature scaling.

scikit-learn's ``calibration_curve`` is binary-only and drops empty bins, so the top-label
reliability curve and ECE are written here:

- **Bins** are ``M`` equal-width intervals of the top-label confidence ``max_c p_c``:
  ``(0, 1/M], (1/M, 2/M], ..., ((M-1)/M, 1]`` (a confidence of exactly 0 goes to the first
  bin).  Default ``M = 15`` (Guo et al. 2017).
- **ECE** ``= sum_b (n_b / N) * |accuracy_b - mean confidence_b|`` over non-empty bins.

**Temperature scaling** (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017)
divides the logits by one scalar ``T`` fitted on validation data by minimising the
negative log-likelihood (``scipy.optimize.minimize_scalar`` over ``log T``).  kmedtl
models output probabilities, and ``softmax(log p / T) == softmax(z / T)`` for ``p =
softmax(z)``, so :func:`apply_temperature` works from probabilities through the log;
it leaves the argmax (hence accuracy) unchanged.

The fitted result is written to ``calibration.json``::

    {"method": "temperature", "temperature": 1.83, "output": "leaf", "fitted_on": "val",
     "n_fit": 120, "nll_before": .., "nll_after": .., "ece_before": .., "ece_after": ..,
     "n_bins": 15}

and applied anywhere (export included) with ``apply_temperature(probs, T)``.

Example::

    >>> import numpy as np
    >>> p = np.array([[0.9, 0.1], [0.6, 0.4]])
    >>> np.round(apply_temperature(p, 1.0), 6).tolist()
    [[0.9, 0.1], [0.6, 0.4]]
"""

from __future__ import annotations

import json
import os

import numpy as np
from keras import ops
from scipy.optimize import minimize_scalar

from kmedtl.errors import ConfigError
from kmedtl.jsonio import atomic_write
from kmedtl.run_folder import check_temperature

DEFAULT_BINS = 15
_EPS = 1e-12


def _top_label(y_true, probs):
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64).ravel()
    if p.ndim != 2 or len(p) != len(y):
        raise ConfigError(f"calibration: probs must be (N, K) with N = {len(y)}, got {p.shape}")
    return p.max(1), (p.argmax(1) == y).astype(np.float64)


def reliability_curve(y_true, probs, n_bins: int = DEFAULT_BINS) -> dict:
    """Per equal-width confidence bin: ``edges`` (M+1), ``count``, ``accuracy`` and
    ``confidence`` (means; ``nan`` for empty bins)."""
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins}")
    conf, correct = _top_label(y_true, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.searchsorted(edges[1:-1], conf, side="left")  # right-closed bins
    count = np.bincount(b, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(b, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
    return {"edges": edges, "count": count,
            "accuracy": acc, "confidence": mean_conf}


def expected_calibration_error(y_true, probs, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE with equal-width bins (see the module docstring)."""
    curve = reliability_curve(y_true, probs, n_bins)
    n = curve["count"].sum()
    if n == 0:
        return float("nan")
    used = curve["count"] > 0
    gap = np.abs(curve["accuracy"][used] - curve["confidence"][used])
    return float((curve["count"][used] / n * gap).sum())


def negative_log_likelihood(y_true, probs) -> float:
    """Mean ``-log p[true class]`` (probabilities clipped at 1e-12)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64).ravel()
    return float(-np.log(np.clip(p[np.arange(len(y)), y], _EPS, 1.0)).mean())


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def apply_temperature(probs_or_logits, temperature: float, *, from_logits: bool = False,
                      eps: float = _EPS):
    """``softmax(log(p) / T)`` (or ``softmax(z / T)`` with ``from_logits``).

    NumPy arrays (and lists) give NumPy float64; any backend tensor goes through
    ``keras.ops`` (float32-safe), so the same function serves an exported graph.
    ``T > 1`` softens over-confident predictions, ``T < 1`` sharpens them.
    """
    t = float(temperature)
    if not t > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if isinstance(probs_or_logits, (np.ndarray, list, tuple)):
        x = np.asarray(probs_or_logits, dtype=np.float64)
        z = x if from_logits else np.log(np.clip(x, eps, None))
        return np.exp(_log_softmax(z / t))
    x = ops.convert_to_tensor(probs_or_logits)
    z = x if from_logits else ops.log(ops.maximum(x, ops.cast(eps, x.dtype)))
    return ops.softmax(z / ops.cast(t, z.dtype), axis=-1)


def fit_temperature(y_true, probs_or_logits, *, from_logits: bool = False,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The ``T`` in ``bounds`` minimising the NLL of ``apply_temperature(x, T)`` on
    ``y_true`` (bounded Brent search over ``log T``; the NLL is smooth and unimodal in it)."""
    x = np.asarray(probs_or_logits, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64).ravel()
    if len(y) == 0:
        raise ConfigError("fit_temperature: no samples to fit on")
    z = x if from_logits else np.log(np.clip(x, _EPS, None))
    rows = np.arange(len(y))

    def nll(log_t):
        return float(-_log_softmax(z / np.exp(log_t))[rows, y].mean())

    res = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])),
                          method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def calibrate(y_val, probs_val, *, n_bins: int = DEFAULT_BINS, output: str = "leaf",
              fitted_on: str = "val") -> dict:
    """Fit a temperature on validation predictions; the ``calibration.json`` payload
    (NLL and ECE before/after are on the fitting data)."""
    t = fit_temperature(y_val, probs_val)
    after = apply_temperature(np.asarray(probs_val), t)
    return {
        "method": "temperature",
        "temperature": t,
        "output": output,
        "fitted_on": fitted_on,
        "n_fit": int(len(np.asarray(y_val))),
        "nll_before": negative_log_likelihood(y_val, probs_val),
        "nll_after": negative_log_likelihood(y_val, after),
        "ece_before": expected_calibration_error(y_val, probs_val, n_bins),
        "ece_after": expected_calibration_error(y_val, after, n_bins),
        "n_bins": n_bins,
        "reference": "Guo et al. 2017, On Calibration of Modern Neural Networks",
    }


def save_calibration(path, result: dict) -> str:
    """Write ``calibration.json`` (atomically)."""
    return atomic_write(path, lambda fh: json.dump(result, fh, indent=1))


def load_calibration(path) -> dict:
    """Read ``calibration.json``; ``result["temperature"]`` feeds :func:`apply_temperature`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: calibration file not found (run kmedtl evaluate first)")
    with open(path) as fh:
        data = json.load(fh)
    check_temperature(data.get("temperature"), path)  # the one rule, RunFolder's
    return data
