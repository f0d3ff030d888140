"""Hierarchy-aware metrics: hierarchical precision/recall/F1 and inconsistent predictions.

Written here because no maintained library we depend on has them: ``hiclass`` defines the
hierarchical scores (Kiritchenko et al. 2006; Silla & Freitas 2011) but is not a kmedtl
dependency, so :func:`hierarchical_prf` re-implements *its* definition (micro-averaged over
samples, root excluded, every node counted with all its ancestors)::

    hP = sum_i |anc(pred_i) & anc(true_i)| / sum_i |anc(pred_i)|
    hR = sum_i |anc(pred_i) & anc(true_i)| / sum_i |anc(true_i)|
    hF = 2 hP hR / (hP + hR)

where ``anc(x)`` is ``x`` with its ancestors.  Predictions may stop at an internal node
(``"tumor"``), which earns partial credit.

Example (``normal`` vs ``tumor -> {glioma, pituitary}``)::

    >>> from kmedtl.hierarchy import Hierarchy
    >>> h = Hierarchy({"normal": None, "tumor": {"glioma": None, "pituitary": None}})
    >>> hierarchical_prf(h, ["glioma"], ["pituitary"])  # {tumor} shared of 2 and 2
    {'precision': 0.5, 'recall': 0.5, 'f1': 0.5}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from kmedtl.errors import ConfigError
from kmedtl.hierarchy import ROOT, Hierarchy


def _node_names(hierarchy: Hierarchy, values) -> list[str]:
    """Leaf indices (ints) or node names -> node names."""
    out = []
    for v in np.asarray(values, dtype=object).ravel():
        if isinstance(v, (int, np.integer)):
            out.append(hierarchy.leaves[int(v)])
        else:
            name = str(v)
            hierarchy.node(name)  # raises HierarchyError naming the unknown node
            if name == ROOT:
                raise ConfigError("hierarchical metrics: 'root' is not a prediction")
            out.append(name)
    return out


def ancestor_sets(hierarchy: Hierarchy, values) -> np.ndarray:
    """``(N, n_nodes)`` 0/1 matrix over :meth:`Hierarchy.all_nodes`: each value's node and
    its ancestors (the root excluded)."""
    nodes = hierarchy.all_nodes()
    pos = {n: i for i, n in enumerate(nodes)}
    names = _node_names(hierarchy, values)
    out = np.zeros((len(names), len(nodes)), dtype=np.int64)
    for i, name in enumerate(names):
        for a in hierarchy.path(name):
            out[i, pos[a]] = 1
    return out


def hierarchical_prf(hierarchy: Hierarchy, y_true, y_pred) -> dict[str, float]:
    """hiclass-style hierarchical precision, recall and F1 (see the module docstring).

    ``y_true`` / ``y_pred``: leaf indices or node names (a prediction may be an internal
    node).
    """
    t, p = ancestor_sets(hierarchy, y_true), ancestor_sets(hierarchy, y_pred)
    if t.shape != p.shape:
        raise ConfigError(f"hierarchical metrics: {len(t)} true labels, {len(p)} predictions")
    inter = float((t * p).sum())
    n_pred, n_true = float(p.sum()), float(t.sum())
    prec = inter / n_pred if n_pred else float("nan")
    rec = inter / n_true if n_true else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else (
        0.0 if np.isfinite(prec + rec) else float("nan"))
    return {"precision": prec, "recall": rec, "f1": f1}


def level_predictions(hierarchy: Hierarchy, leaf_probs) -> list[np.ndarray]:
    """Argmax node index per level from the level marginals ``leaf_probs @ level_matrix(k)``
    (one array per level, indexing ``hierarchy.levels[k-1]``)."""
    p = np.asarray(leaf_probs, dtype=np.float64)
    return [hierarchy.level_probabilities(p, k).argmax(1) for k in range(1, hierarchy.depth + 1)]


def inconsistent_mask(hierarchy: Hierarchy, leaf_probs=None, *,
                      level_preds: Sequence | None = None,
                      node_probs: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-sample flags of hierarchy-inconsistent predictions, by reason.

    - ``"leaf_vs_levels"`` (needs ``leaf_probs``): for some level ``k`` on the path of the
      argmax leaf, the argmax of level ``k`` is not that path's node.  Level predictions
      are ``level_preds`` when given (a model with one head per level), else the argmax of
      the level marginals ``leaf_probs @ level_matrix(k)``.  Example: P(normal) = 0.4 and
      P(tumor) = 0.6 split over three subtypes: the top leaf is ``normal`` but level 1 says
      ``tumor``.
    - ``"child_not_under_parent"`` (needs ``level_preds``): a level-``k`` prediction is not
      a child of the level-``k-1`` prediction although that one is an internal node.
    - ``"heads_vs_leaf"`` (needs ``node_probs``, one softmax per parent node keyed by node
      name as :class:`~kmedtl.models.HierarchicalClassifier` outputs them, and
      ``leaf_probs``): walking down from the root, each head taking its argmax child, ends at
      a different leaf than the argmax leaf.

    ``"any"`` is the union.  All arrays are boolean of length N.
    """
    h = hierarchy
    n = None
    for arr in (leaf_probs, *(level_preds or [])):
        if arr is not None:
            n = len(arr)
            break
    if n is None and node_probs:
        n = len(np.asarray(node_probs[ROOT]))
    if n is None:
        raise ConfigError("inconsistent_mask: give leaf_probs, level_preds or node_probs")
    out: dict[str, np.ndarray] = {}
    levels = None
    if level_preds is not None:
        levels = [np.asarray(a).astype(np.int64) for a in level_preds]
        if len(levels) != h.depth:
            raise ConfigError(f"level_preds: one array per level ({h.depth}), got {len(levels)}")
        bad = np.zeros(n, bool)
        stopped = np.zeros(n, bool)  # the prediction reached a leaf: deeper levels ignored
        for k in range(1, h.depth):
            upper, lower = h.levels[k - 1], h.levels[k]
            is_leaf = np.array([h.node(x).is_leaf for x in upper])
            parent_pos = np.array([upper.index(h.node(x).parent) if h.node(x).parent in upper
                                   else -1 for x in lower])
            stopped |= is_leaf[levels[k - 1]]
            bad |= ~stopped & (parent_pos[levels[k]] != levels[k - 1])
        out["child_not_under_parent"] = bad
    if leaf_probs is not None:
        p = np.asarray(leaf_probs, dtype=np.float64)
        top = p.argmax(1)
        preds = levels if levels is not None else level_predictions(h, p)
        bad = np.zeros(n, bool)
        for li, leaf in enumerate(h.leaves):
            rows = top == li
            if not rows.any():
                continue
            for k, node in enumerate(h.path(leaf), start=1):
                bad[rows] |= preds[k - 1][rows] != h.levels[k - 1].index(node)
        out["leaf_vs_levels"] = bad
        if node_probs is not None:
            greedy = greedy_leaf(h, node_probs)
            out["heads_vs_leaf"] = greedy != top
    out["any"] = np.any(np.stack(list(out.values())), axis=0) if out else np.zeros(n, bool)
    return out


def greedy_leaf(hierarchy: Hierarchy, node_probs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Leaf index reached by following each head's argmax child from the root down."""
    h = hierarchy
    argmax = {p: np.asarray(node_probs[h.node_output_name(p)]).argmax(1) for p in h.parents}
    out = np.full(len(argmax[ROOT]), -1, dtype=np.int64)
    for li, leaf in enumerate(h.leaves):  # exactly one leaf has every step of its path taken
        path = h.path(leaf)
        taken = np.ones(len(out), bool)
        for parent, child in zip((ROOT, *path[:-1]), path):
            taken &= argmax[parent] == h.children(parent).index(child)
        out[taken] = li
    return out


def inconsistency_rate(hierarchy: Hierarchy, leaf_probs=None, *, level_preds=None,
                       node_probs=None) -> float:
    """Share of samples with any inconsistency of :func:`inconsistent_mask`."""
    mask = inconsistent_mask(hierarchy, leaf_probs, level_preds=level_preds,
                             node_probs=node_probs)["any"]
    return float(mask.mean()) if len(mask) else float("nan")
