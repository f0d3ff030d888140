"""Everything ``metrics.json`` holds, computed from predictions (no model, no files).

:func:`evaluate_predictions` takes the true leaves and the model's leaf probabilities on the
test set (optionally the per-node head outputs and validation predictions) and returns the
``metrics.json`` body.  Every scalar metric is an interval dict ``{"value", "ci_low",
"ci_high"}`` from one shared percentile bootstrap (all metrics see the same resamples).

metrics.json keys
-----------------
``kind`` ``"kmedtl-metrics"``, ``version`` 1.

``bootstrap``
    ``{"method": "percentile", "n_boot", "alpha", "seed", "unit"}`` -- ``unit`` is
    ``"image"``, or ``"patient"`` for a cluster bootstrap over patients.
``headline``
    The numbers a reader looks at first (intervals): leaf ``accuracy``,
    ``balanced_accuracy``, ``kappa``, ``f1_macro``, ``auroc_macro``; with a normal class,
    ``sensitivity`` / ``specificity`` of disease-vs-normal at ``binary.threshold``; for a
    tree deeper than 1, ``hierarchical_f1``; ``ece`` (uncalibrated).
``tasks``
    ``{"leaf": ..., "level_1": ..., ...}`` (levels that are not just the leaves again).
    Each: ``classes`` (names), ``level`` (k or null), ``n`` (test cases in the task: a
    level-k task keeps cases whose true leaf reaches depth k), ``metrics``
    (``accuracy``, ``balanced_accuracy``, ``kappa``, ``kappa_quadratic`` (ordered labels
    only), ``f1_macro``, ``f1_weighted``, ``auroc_macro``, ``auprc_macro``),
    ``per_class`` (``{class: {"support": int, "auroc", "auprc", "precision", "recall",
    "specificity", "f1"}}``) and ``confusion_matrix`` (rows true, columns predicted, in
    ``classes`` order).
``binary``
    Disease vs normal (null when the tree has no normal class, see
    :func:`~kmedtl.evaluation.metrics.negative_class`): ``negative``, ``positive`` (leaf
    names), ``n_positive``, ``n_negative``, ``auroc``, ``threshold`` (operating point on
    the disease score ``1 - P(normal)``), ``at_threshold`` (``sensitivity``,
    ``specificity``, ``ppv``, ``npv``), ``target_sensitivity``, ``threshold_at_target``
    (highest threshold reaching the target sensitivity), ``threshold_chosen_on``
    (``"val"``, or ``"test"`` -- optimistic -- without validation data), ``at_target``
    (the same four metrics at that threshold on the test set).
``hierarchical``
    ``precision``, ``recall``, ``f1`` (hiclass definition) and ``inconsistency_rate``
    (intervals), ``inconsistent`` (counts per reason).  Null for a flat tree.
``calibration``
    ``n_bins``, ``ece``, ``nll`` (test, raw outputs), ``temperature`` (null when not
    fitted), ``fitted_on``, ``ece_after_temperature``, ``nll_after_temperature``.
``n_test``
    Number of test cases.

Metrics are computed on the model's raw probabilities; temperature scaling changes no
argmax and is reported only under ``calibration``.  The binary threshold and the
temperature are fixed before bootstrapping (not re-fitted per resample).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kmedtl.errors import ConfigError
from kmedtl.evaluation import calibration as cal
from kmedtl.evaluation import metrics as M
from kmedtl.evaluation.hierarchical import hierarchical_prf, inconsistent_mask
from kmedtl.evaluation.uncertainty import bootstrap, summarise_repeats
from kmedtl.hierarchy import Hierarchy

HEADLINE = ("accuracy", "balanced_accuracy", "kappa", "f1_macro", "auroc_macro")


def _leaf_indices(hierarchy: Hierarchy, y_true) -> np.ndarray:
    y = np.asarray(y_true)
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    return np.array([hierarchy.leaves.index(hierarchy.leaf_of(str(v))) for v in y], np.int64)


def evaluate_predictions(hierarchy: Hierarchy, y_true, leaf_probs, *,
                         node_probs: Mapping[str, np.ndarray] | None = None,
                         val: tuple | None = None, n_boot: int = 1000, alpha: float = 0.05,
                         seed: int = 0, groups=None, ordered: bool = False,
                         negative: str | None = None, threshold: float = 0.5,
                         target_sensitivity: float = 0.95,
                         n_bins: int = cal.DEFAULT_BINS,
                         temperature: float | None = None) -> dict:
    """The ``metrics.json`` body (see the module docstring) for one test set.

    Args:
        hierarchy: the label tree.
        y_true: true leaf indices (or raw labels / leaf names).
        leaf_probs: ``(N, n_leaves)`` probabilities.
        node_probs: per-parent head outputs (``HierarchicalClassifier``), for the
            heads-vs-leaf consistency check.
        val: ``(y_val, leaf_probs_val)``: fits the temperature and chooses the threshold
            reaching ``target_sensitivity``.  Without it no temperature is fitted and that
            threshold is chosen on the test set (flagged).
        groups: one id per test case (patient): cluster bootstrap.
        ordered: the leaf order is a severity scale (adds quadratic-weighted kappa).
        negative: the depth-1 node meaning "normal" (default: guessed from the tree).
        threshold: operating point on the disease score.
        temperature: use this temperature instead of fitting one.

    The fitted calibration (``calibration.json`` payload) is returned under the private
    key ``"_calibration"``.
    """
    h = hierarchy
    y = _leaf_indices(h, y_true)
    p = np.asarray(leaf_probs, dtype=np.float64)
    if p.shape != (len(y), len(h.leaves)):
        raise ConfigError(f"evaluate: leaf_probs has shape {p.shape}, expected "
                          f"({len(y)}, {len(h.leaves)}) for leaves {list(h.leaves)}")
    nodes = None
    if node_probs is not None and not h.is_flat:
        nodes = {k: np.asarray(v, dtype=np.float64) for k, v in node_probs.items()
                 if k in h.parents}
        if set(nodes) != set(h.parents):
            nodes = None
    task_list = M.tasks(h)
    neg = M.negative_class(h, negative)

    # ---- fixed before bootstrapping: temperature and the target-sensitivity threshold
    calib = None
    if temperature is None and val is not None and len(val[0]):
        yv, pv = _leaf_indices(h, val[0]), np.asarray(val[1], dtype=np.float64)
        calib = cal.calibrate(yv, pv, n_bins=n_bins)
        temperature = calib["temperature"]
    elif temperature is not None:
        calib = {"method": "temperature", "temperature": float(temperature),
                 "output": "leaf", "fitted_on": "given", "n_bins": n_bins}
    target = None
    if neg is not None:
        if val is not None and len(val[0]):
            yb, sb = M.binary_view(h, _leaf_indices(h, val[0]), val[1], neg)
            chosen_on = "val"
        else:
            yb, sb = M.binary_view(h, y, p, neg)
            chosen_on = "test"
        target = M.threshold_for_sensitivity(yb, sb, target_sensitivity)
        target["chosen_on"] = chosen_on

    def flat(idx):
        yi, pi = y[idx], p[idx]
        out = {}
        for task in task_list:
            ty, tp, _ = M.task_view(h, task, yi, pi)
            for k, v in M.classification_metrics(ty, tp, task.classes, ordered=ordered).items():
                out[f"{task.name}/{k}"] = v
        if neg is not None:
            yb, sb = M.binary_view(h, yi, pi, neg)
            for k, v in M.operating_point(yb, sb, threshold).items():
                out[f"binary/{k}"] = v
            if np.isfinite(target["threshold"]):
                for k, v in M.operating_point(yb, sb, target["threshold"]).items():
                    out[f"binary_target/{k}"] = v
            out["binary/auroc"] = float(M.auroc_per_class(yb, np.stack([1 - sb, sb], 1))[1])
        if not h.is_flat:
            for k, v in hierarchical_prf(h, yi, pi.argmax(1)).items():
                out[f"hierarchical/{k}"] = v
            sub = {k: v[idx] for k, v in nodes.items()} if nodes else None
            out["hierarchical/inconsistency_rate"] = float(
                inconsistent_mask(h, pi, node_probs=sub)["any"].mean())
        out["calibration/ece"] = cal.expected_calibration_error(yi, pi, n_bins)
        out["calibration/nll"] = cal.negative_log_likelihood(yi, pi)
        if temperature is not None:
            pt = cal.apply_temperature(pi, temperature)
            out["calibration/ece_after_temperature"] = cal.expected_calibration_error(
                yi, pt, n_bins)
            out["calibration/nll_after_temperature"] = cal.negative_log_likelihood(yi, pt)
        return out

    ci = bootstrap(flat, len(y), n_boot=n_boot, alpha=alpha, seed=seed, groups=groups)

    # ---- nest the flat intervals into the documented structure
    result: dict = {"kind": "kmedtl-metrics", "version": 1, "n_test": int(len(y)),
                    "bootstrap": {"method": "percentile", "n_boot": int(n_boot),
                                  "alpha": alpha, "seed": seed,
                                  "unit": "patient" if groups is not None else "image"}}
    result["tasks"] = {}
    for task in task_list:
        ty, tp, mask = M.task_view(h, task, y, p)
        metrics = {m: ci[f"{task.name}/{m}"] for m in M.TASK_METRICS
                   if f"{task.name}/{m}" in ci}
        support = np.bincount(ty, minlength=len(task.classes))
        per_class = {}
        for c, name in enumerate(task.classes):
            per_class[name] = {"support": int(support[c]),
                               **{m: ci[f"{task.name}/{m}/{name}"] for m in M.CLASS_METRICS}}
        result["tasks"][task.name] = {
            "classes": list(task.classes), "level": task.level, "n": int(mask.sum()),
            "metrics": metrics, "per_class": per_class,
            "confusion_matrix": M.confusion(ty, tp, len(task.classes)).tolist()}
    result["binary"] = None
    if neg is not None:
        yb, _ = M.binary_view(h, y, p, neg)
        result["binary"] = {
            "negative": neg,
            "positive": [leaf for leaf in h.leaves if h.path(leaf)[0] != neg],
            "n_positive": int(yb.sum()), "n_negative": int(len(yb) - yb.sum()),
            "auroc": ci["binary/auroc"], "threshold": float(threshold),
            "at_threshold": {k: ci[f"binary/{k}"] for k in ("sensitivity", "specificity",
                                                            "ppv", "npv")},
            "target_sensitivity": float(target_sensitivity),
            "threshold_at_target": _num(target["threshold"]),
            "threshold_chosen_on": target["chosen_on"],
            "at_target": {k: ci[f"binary_target/{k}"] for k in ("sensitivity", "specificity",
                                                                "ppv", "npv")
                          if f"binary_target/{k}" in ci},
        }
    result["hierarchical"] = None
    if not h.is_flat:
        masks = inconsistent_mask(h, p, node_probs=nodes)
        result["hierarchical"] = {
            **{k: ci[f"hierarchical/{k}"] for k in ("precision", "recall", "f1",
                                                    "inconsistency_rate")},
            "inconsistent": {k: int(v.sum()) for k, v in masks.items()},
        }
    result["calibration"] = {
        "n_bins": n_bins, "ece": ci["calibration/ece"], "nll": ci["calibration/nll"],
        "temperature": None if temperature is None else float(temperature),
        "fitted_on": None if calib is None else calib["fitted_on"],
        "ece_after_temperature": ci.get("calibration/ece_after_temperature"),
        "nll_after_temperature": ci.get("calibration/nll_after_temperature"),
    }
    leaf = result["tasks"]["leaf"]["metrics"]
    head = {m: leaf[m] for m in HEADLINE}
    if result["binary"] is not None:
        head["sensitivity"] = result["binary"]["at_threshold"]["sensitivity"]
        head["specificity"] = result["binary"]["at_threshold"]["specificity"]
    if result["hierarchical"] is not None:
        head["hierarchical_f1"] = result["hierarchical"]["f1"]
    head["ece"] = result["calibration"]["ece"]
    result["headline"] = head
    result["_calibration"] = calib
    order = ["kind", "version", "n_test", "bootstrap", "headline", "tasks", "binary",
             "hierarchical", "calibration", "_calibration"]
    return {k: result[k] for k in order}


def _num(v):
    v = float(v)
    return v if np.isfinite(v) else None


def flat_values(metrics: Mapping) -> dict[str, float]:
    """``{"leaf/accuracy": 0.81, ...}``: every interval's value in a metrics.json body, for
    :func:`~kmedtl.evaluation.uncertainty.summarise_repeats` over folds or repeats."""
    out: dict[str, float] = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            if set(node) >= {"value", "ci_low", "ci_high"}:
                out[prefix] = node["value"]
                return
            for k, v in node.items():
                if not str(k).startswith("_"):
                    walk(f"{prefix}/{k}" if prefix else str(k), v)

    walk("", {k: metrics[k] for k in ("headline", "tasks", "binary", "hierarchical",
                                      "calibration") if metrics.get(k)})
    return out


def summarise_metrics(docs) -> dict[str, dict]:
    """Mean +- sd of every metric over several ``metrics.json`` bodies (one per repeated
    split or fold): ``{"headline/accuracy": {"mean", "sd", "n", "values"}, ...}``."""
    return summarise_repeats([flat_values(d) for d in docs])
