"""Classification metrics per leaf and per level of a label tree: plain functions on arrays.

Every number comes from a scikit-learn function where one exists (accuracy, balanced
accuracy, Cohen's kappa, F1, precision/recall, AUROC, average precision, ROC curve,
confusion matrices).  What scikit-learn lacks is written here and says so: the view of a
tree level (:func:`level_view`), per-class specificity (from sklearn's
``multilabel_confusion_matrix``), the normal-vs-disease reduction and the threshold that
reaches a target sensitivity (from sklearn's ``roc_curve``).

Conventions:

- ``y_true`` holds integer class indices, ``probs`` an ``(N, K)`` array of probabilities;
  the prediction is ``probs.argmax(1)``.
- A metric that is undefined on the data given (AUROC of a class with no positive, the
  precision of a class never predicted) is ``nan``, never a silent 0, so bootstrap
  resamples where a class is missing drop out of that metric's interval instead of
  dragging it down.
- Level ``k`` of a :class:`~kmedtl.hierarchy.Hierarchy`: probabilities are
  ``leaf_probs @ hierarchy.level_matrix(k)``; samples whose true leaf is shallower than
  ``k`` are masked out, and the remaining rows are renormalised to sum to 1 (the level-2
  distribution of a tumour scan is then P(subtype | tumour)).

Example::

    >>> import numpy as np
    >>> m = classification_metrics(np.array([0, 1, 1]), np.array([[.9, .1], [.2, .8], [.6, .4]]))
    >>> round(m["accuracy"], 3), m["auroc_macro"]
    (0.667, 1.0)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm

from kmedtl.errors import ConfigError
from kmedtl.hierarchy import Hierarchy

#: Scalar metrics of a task, in report order (``kappa_quadratic`` only for ordered labels).
TASK_METRICS = ("accuracy", "balanced_accuracy", "kappa", "kappa_quadratic", "f1_macro",
                "f1_weighted", "auroc_macro", "auprc_macro")
#: Per-class metrics (keys ``"<metric>/<class>"`` in :func:`classification_metrics`).
CLASS_METRICS = ("auroc", "auprc", "precision", "recall", "specificity", "f1")


def _check(y_true, probs):
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ConfigError(f"metrics: probs must be (N, K) with N = len(y_true) = {len(y)}, "
                          f"got shape {p.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ConfigError(f"metrics: y_true holds class indices outside 0..{p.shape[1] - 1}")
    return y, p


# ---------------------------------------------------------------------------- one task
def auroc_per_class(y_true, probs) -> np.ndarray:
    """One-vs-rest AUROC of each column (``nan`` where the class is absent or alone)."""
    y, p = _check(y_true, probs)
    out = np.full(p.shape[1], np.nan)
    for c in range(p.shape[1]):
        pos = y == c
        if 0 < pos.sum() < len(y):
            out[c] = skm.roc_auc_score(pos, p[:, c])
    return out


def auprc_per_class(y_true, probs) -> np.ndarray:
    """One-vs-rest average precision (area under the PR curve) per column, ``nan`` when the
    class has no positive."""
    y, p = _check(y_true, probs)
    out = np.full(p.shape[1], np.nan)
    for c in range(p.shape[1]):
        pos = y == c
        if pos.any():
            out[c] = skm.average_precision_score(pos, p[:, c])
    return out


def specificity_per_class(y_true, y_pred, n_classes: int) -> np.ndarray:
    """TN / (TN + FP) per class, one-vs-rest (sklearn has no specificity function; this
    reads it off ``multilabel_confusion_matrix``)."""
    mcm = skm.multilabel_confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))
    tn, fp = mcm[:, 0, 0].astype(float), mcm[:, 0, 1].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), np.nan)


def classification_metrics(y_true, probs, class_names: Sequence[str] | None = None, *,
                           ordered: bool = False) -> dict[str, float]:
    """Scalar metrics of one classification task as a flat ``{name: float}`` dict.

    Keys: ``accuracy``, ``balanced_accuracy``, ``kappa`` (Cohen), ``kappa_quadratic``
    (quadratic-weighted, only when ``ordered``: the class order means severity),
    ``f1_macro``, ``f1_weighted``, ``auroc_macro`` / ``auprc_macro`` (mean of the defined
    one-vs-rest values; equals sklearn's ``roc_auc_score(..., multi_class="ovr")`` when
    every class is present), and per class ``auroc/<c>``, ``auprc/<c>``,
    ``precision/<c>``, ``recall/<c>`` (sensitivity), ``specificity/<c>``, ``f1/<c>``.
    Class names default to ``"0"``, ``"1"``...
    """
    y, p = _check(y_true, probs)
    k = p.shape[1]
    names = [str(c) for c in (class_names if class_names is not None else range(k))]
    if len(names) != k:
        raise ConfigError(f"metrics: {len(names)} class names for {k} probability columns")
    out: dict[str, float] = {}
    if len(y) == 0:  # e.g. a level no test case reaches
        nan = float("nan")
        out = {m: nan for m in TASK_METRICS if m != "kappa_quadratic" or ordered}
        return out | {f"{m}/{c}": nan for c in names for m in CLASS_METRICS}
    pred = p.argmax(1)
    labels = list(range(k))
    with warnings.catch_warnings():  # undefined values come back as nan, documented above
        warnings.simplefilter("ignore")
        out["accuracy"] = float(skm.accuracy_score(y, pred))
        out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y, pred))
        out["kappa"] = float(skm.cohen_kappa_score(y, pred, labels=labels))
        if ordered:
            out["kappa_quadratic"] = float(skm.cohen_kappa_score(y, pred, labels=labels,
                                                                 weights="quadratic"))
        out["f1_macro"] = float(skm.f1_score(y, pred, average="macro", zero_division=0))
        out["f1_weighted"] = float(skm.f1_score(y, pred, average="weighted", zero_division=0))
        auroc, auprc = auroc_per_class(y, p), auprc_per_class(y, p)
        out["auroc_macro"] = _nanmean(auroc)
        out["auprc_macro"] = _nanmean(auprc)
        prec, rec, f1, _ = skm.precision_recall_fscore_support(
            y, pred, labels=labels, zero_division=np.nan)
        spec = specificity_per_class(y, pred, k)
    for c, name in enumerate(names):
        out[f"auroc/{name}"] = float(auroc[c])
        out[f"auprc/{name}"] = float(auprc[c])
        out[f"precision/{name}"] = float(prec[c])
        out[f"recall/{name}"] = float(rec[c])
        out[f"specificity/{name}"] = float(spec[c])
        out[f"f1/{name}"] = float(f1[c])
    return out


def confusion(y_true, probs_or_pred, n_classes: int | None = None) -> np.ndarray:
    """Confusion matrix (rows: true class, columns: predicted), via sklearn."""
    pred = np.asarray(probs_or_pred)
    if pred.ndim == 2:
        n_classes = n_classes or pred.shape[1]
        pred = pred.argmax(1)
    n_classes = n_classes or int(max(np.max(y_true, initial=0), np.max(pred, initial=0)) + 1)
    if len(pred) == 0:
        return np.zeros((n_classes, n_classes), dtype=np.int64)
    return skm.confusion_matrix(np.asarray(y_true), pred, labels=list(range(n_classes)))


def _nanmean(a) -> float:
    a = np.asarray(a, dtype=float)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


# ---------------------------------------------------------------------------- tree levels
@dataclass(frozen=True)
class Task:
    """One classification task read off the tree: the leaves or one level."""

    name: str  # "leaf" or "level_<k>"
    classes: tuple[str, ...]
    level: int | None  # None for the leaf task


def tasks(hierarchy: Hierarchy) -> list[Task]:
    """The leaf task plus every level that is not just the leaves again.

    For ``normal`` vs ``tumor -> {glioma, pituitary}``: ``leaf`` (3 classes), ``level_1``
    (normal / tumor) and ``level_2`` (glioma / pituitary, tumour scans only).  A flat tree
    has the leaf task only.
    """
    out = [Task("leaf", tuple(hierarchy.leaves), None)]
    for k in range(1, hierarchy.depth + 1):
        names = hierarchy.levels[k - 1]
        if set(names) == set(hierarchy.leaves):
            continue
        out.append(Task(hierarchy.level_name(k), tuple(names), k))
    return out


def level_view(hierarchy: Hierarchy, y_true, leaf_probs, k: int):
    """``(y_level, probs_level, mask)`` for level ``k``.

    ``mask`` selects samples whose true leaf reaches depth ``k``; ``y_level`` indexes
    ``hierarchy.levels[k-1]``; ``probs_level`` is ``leaf_probs[mask] @ level_matrix(k)``
    renormalised per row (uniform where a row has no mass at that level).
    """
    y, p = _check(y_true, leaf_probs)
    m = hierarchy.level_matrix(k).astype(np.float64)
    if m.shape[0] != p.shape[1]:
        raise ConfigError(f"metrics: leaf_probs has {p.shape[1]} columns, the hierarchy "
                          f"{m.shape[0]} leaves")
    member = m[y]
    mask = member.sum(1) > 0
    lp = hierarchy.level_probabilities(p[mask], k)
    total = lp.sum(1, keepdims=True)
    lp = np.divide(lp, total, out=np.full_like(lp, 1.0 / m.shape[1]), where=total > 0)
    return member[mask].argmax(1), lp, mask


def task_view(hierarchy: Hierarchy, task: Task, y_true, leaf_probs):
    """``(y, probs, mask)`` of a :class:`Task` (the leaf task keeps every sample)."""
    if task.level is None:
        y, p = _check(y_true, leaf_probs)
        return y, p, np.ones(len(y), bool)
    return level_view(hierarchy, y_true, leaf_probs, task.level)


# ---------------------------------------------------------------------------- binary
def negative_class(hierarchy: Hierarchy, negative: str | None = None) -> str | None:
    """The level-1 node that means "no disease", or ``None`` when there is no such split.

    ``negative`` names it explicitly (any depth-1 node).  Otherwise: with two depth-1 nodes
    where one is a leaf and the other has children (``normal`` vs ``disease -> {...}``), the
    leaf; else a depth-1 node literally named ``normal``; else the first node of a two-node
    level 1.  Nothing else is guessed: a 3-way level 1 without ``normal`` gives ``None``.
    """
    level1 = hierarchy.levels[0]
    if negative is not None:
        if negative not in level1:
            raise ConfigError(f"negative class {negative!r} is not a depth-1 node of the "
                              f"hierarchy; depth-1 nodes: {list(level1)}")
        return negative
    if len(level1) == 2:
        leafy = [n for n in level1 if hierarchy.node(n).is_leaf]
        if len(leafy) == 1:
            return leafy[0]
    for n in level1:
        if n.lower() == "normal":
            return n
    return level1[0] if len(level1) == 2 else None


def binary_view(hierarchy: Hierarchy, y_true, leaf_probs, negative: str):
    """``(y_disease, disease_score)``: 1 where the true leaf is outside ``negative``'s
    subtree, and the model's probability mass outside it (``1 - P(negative)``)."""
    y, p = _check(y_true, leaf_probs)
    under = np.array([hierarchy.path(leaf)[0] == negative for leaf in hierarchy.leaves])
    return (~under[y]).astype(np.int64), p[:, ~under].sum(1)


def operating_point(y_true_binary, score, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV and NPV when ``score >= threshold`` means positive
    (``nan`` where a denominator is 0)."""
    y = np.asarray(y_true_binary).astype(int)
    pred = (np.asarray(score) >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel().astype(float)

    def ratio(a, b):
        return float(a / b) if b > 0 else float("nan")

    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn)}


def threshold_for_sensitivity(y_true_binary, score, target: float = 0.95) -> dict[str, float]:
    """The highest threshold whose sensitivity is at least ``target`` (so the best
    specificity among those), read off sklearn's ``roc_curve``.

    Returns ``{"threshold", "sensitivity", "specificity"}`` (``nan`` without positives or
    negatives).  Choose it on validation data and apply it to the test set; chosen on the
    test set it is optimistic.
    """
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target sensitivity must be in (0, 1], got {target}")
    y = np.asarray(y_true_binary).astype(int)
    s = np.asarray(score, dtype=np.float64)
    nan = {"threshold": float("nan"), "sensitivity": float("nan"),
           "specificity": float("nan")}
    if y.min(initial=1) == y.max(initial=0) or len(y) == 0:
        return nan
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    i = int(np.argmax(tpr >= target - 1e-12))
    return {"threshold": float(thr[i]), "sensitivity": float(tpr[i]),
            "specificity": float(1.0 - fpr[i])}


# ---------------------------------------------------------------------------- bootstrap forms
# A bootstrap scores a model on 1000 resamples of the test set (kmedtl.study.stats: per cell,
# per paired comparison, per seed), so these are the metrics in the forms it needs: counts
# by ``np.bincount`` and every metric read off the confusion matrix, vectorised over stacks
# of matrices (one ``(n_boot, n) @ (n, k*k)`` product gives every resample's matrix).  They
# are written out rather than calls to scikit-learn because sklearn validates its input on
# every call (about 0.5 ms per metric, 50x the arithmetic) and takes one matrix at a time;
# each equals its sklearn counterpart (tests/test_evaluation_metrics.py checks it).

#: Metrics :func:`confusion_metric` reads off a confusion matrix.
CONFUSION_METRICS = ("balanced_accuracy", "kappa", "f1_macro")


def confusion_counts(y_true, y_pred, n_classes: int) -> np.ndarray:
    """``(k, k)`` float confusion matrix (rows: true class) by ``np.bincount`` -- the value of
    sklearn's ``confusion_matrix(..., labels=range(k))`` without its input checks."""
    y = np.asarray(y_true).astype(int)
    pred = np.asarray(y_pred).astype(int)
    k = int(n_classes)
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(float)


def weighted_confusions(y_true, y_pred, n_classes: int, weights) -> np.ndarray:
    """``(B, k, k)`` confusion matrices of the same predictions under ``B`` rows of case
    weights (``weights``: ``(B, n)``, e.g. how often each test case is drawn in each
    bootstrap resample) -- one ``(B, n) @ (n, k*k)`` product."""
    y = np.asarray(y_true).astype(int)
    pred = np.asarray(y_pred).astype(int)
    k = int(n_classes)
    onehot = np.zeros((len(y), k * k))
    onehot[np.arange(len(y)), y * k + pred] = 1.0
    return (np.asarray(weights) @ onehot).reshape(-1, k, k)


def confusion_metric(cm, name: str):
    """``name`` (:data:`CONFUSION_METRICS`) of confusion matrices ``cm`` of shape
    ``(..., k, k)`` (rows: true class), vectorised over the leading axes:

    - ``balanced_accuracy``: mean recall over the classes present (sklearn's
      ``balanced_accuracy_score``);
    - ``kappa``: Cohen's kappa, ``nan`` where the chance agreement is 1
      (``cohen_kappa_score``);
    - ``f1_macro``: mean F1 over all ``k`` classes, 0 for a class never predicted nor present
      (``f1_score(average="macro", labels=range(k), zero_division=0)``).
    """
    cm = np.asarray(cm, dtype=float)
    support, predicted = cm.sum(-1), cm.sum(-2)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
        if name == "balanced_accuracy":
            return np.nanmean(recall, axis=-1)
        if name == "kappa":
            n = cm.sum((-2, -1))
            po = tp.sum(-1) / n
            pe = (support * predicted).sum(-1) / n ** 2
            return np.where(pe < 1, (po - pe) / (1 - pe), np.nan)
        if name == "f1_macro":
            r = np.nan_to_num(recall)
            prec = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
            f1 = np.where(prec + r > 0, 2 * prec * r / (prec + r), 0.0)
            return f1.mean(-1)
    raise ConfigError(f"metrics: {name!r} is not a confusion-matrix metric; use one of "
                      f"{list(CONFUSION_METRICS)}")


def auroc_macro_ranks(y_true, probs) -> float:
    """Mean one-vs-rest AUROC over the classes present, by the Mann-Whitney U statistic with
    average ranks (``scipy.stats.rankdata``): the value of :func:`auroc_per_class` (sklearn's
    ``roc_auc_score``) up to rounding, about 50x faster -- which matters inside a
    1000-resample bootstrap.  ``nan`` when no class has both positives and negatives."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=float)
    out = []
    for c in range(p.shape[1]):
        pos = y == c
        n_pos = int(pos.sum())
        n_neg = len(y) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        r = rankdata(p[:, c])
        out.append((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(out)) if out else float("nan")
