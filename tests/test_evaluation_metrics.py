"""Metrics against hand-computed values and scikit-learn; tree levels; hierarchical scores;
inconsistent predictions."""

import numpy as np
import pytest
from sklearn import metrics as skm

from kmedtl.evaluation import (
    binary_view,
    classification_metrics,
    confusion,
    greedy_leaf,
    hierarchical_prf,
    inconsistency_rate,
    inconsistent_mask,
    level_view,
    negative_class,
    operating_point,
    tasks,
    threshold_for_sensitivity,
)
from kmedtl.hierarchy import Hierarchy

# pred = argmax = [0, 1, 1, 1, 2, 0]
Y = np.array([0, 0, 1, 1, 2, 2])
P = np.array([[.7, .2, .1], [.3, .5, .2], [.2, .6, .2], [.1, .8, .1], [.1, .2, .7],
              [.5, .1, .4]])

BRAIN = Hierarchy({"normal": None, "tumor": {"glioma": None, "meningioma": None,
                                             "pituitary": None}})
DEEP = Hierarchy({"normal": None,
                  "disease": {"benign": {"cyst": None, "lipoma": None},
                              "malignant": {"glioma": None, "lymphoma": None}}})


def test_hand_computed_task_metrics():
    m = classification_metrics(Y, P, ["a", "b", "c"], ordered=True)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # p_o = 4/6, p_e = (2*2 + 2*3 + 2*1) / 36 = 1/3  ->  kappa = (2/3 - 1/3) / (2/3)
    assert m["kappa"] == pytest.approx(0.5)
    # quadratic weights (i-j)^2/4: sum w*O = 1.25, sum w*E = 1.75
    assert m["kappa_quadratic"] == pytest.approx(1 - 1.25 / 1.75)
    assert m["precision/a"] == pytest.approx(1 / 2)
    assert m["precision/b"] == pytest.approx(2 / 3)
    assert m["recall/c"] == pytest.approx(1 / 2)
    assert m["f1/b"] == pytest.approx(0.8)
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert [m["specificity/a"], m["specificity/b"], m["specificity/c"]] == \
        pytest.approx([3 / 4, 3 / 4, 1.0])
    # class a: positives score .7, .3 against negatives .2 .1 .1 .5 -> 7 of 8 pairs
    assert m["auroc/a"] == pytest.approx(7 / 8)
    assert confusion(Y, P).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert "kappa_quadratic" not in classification_metrics(Y, P)


def test_against_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    z = rng.normal(size=(300, 4))
    z[np.arange(300), y] += 1.0
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    pred = p.argmax(1)
    m = classification_metrics(y, p)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["auroc_macro"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    onehot = np.eye(4)[y]
    assert m["auprc_macro"] == pytest.approx(skm.average_precision_score(onehot, p))
    assert m["recall/2"] == pytest.approx(skm.recall_score(y, pred, average=None)[2])


def test_undefined_metrics_are_nan_not_zero():
    y = np.array([0, 0, 1, 1])  # class 2 absent and never predicted
    p = np.array([[.9, .05, .05], [.6, .3, .1], [.2, .7, .1], [.4, .5, .1]])
    m = classification_metrics(y, p)
    assert np.isnan(m["auroc/2"]) and np.isnan(m["auprc/2"]) and np.isnan(m["precision/2"])
    assert m["auroc_macro"] == pytest.approx(1.0)  # mean over the defined classes


def test_tasks_and_level_view():
    assert [t.name for t in tasks(BRAIN)] == ["leaf", "level_1", "level_2"]
    assert [t.name for t in tasks(Hierarchy(["a", "b", "c"]))] == ["leaf"]
    y = np.array([1, 0])  # glioma, normal
    p = np.array([[0.2, 0.6, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    y1, p1, mask1 = level_view(BRAIN, y, p, 1)
    assert y1.tolist() == [1, 0] and mask1.all()
    np.testing.assert_allclose(p1, [[0.2, 0.8], [0.7, 0.3]])
    y2, p2, mask2 = level_view(BRAIN, y, p, 2)
    assert mask2.tolist() == [True, False] and y2.tolist() == [0]
    np.testing.assert_allclose(p2, [[0.75, 0.125, 0.125]])  # P(subtype | tumour)


def test_normal_vs_disease_operating_points():
    assert negative_class(BRAIN) == "normal"
    assert negative_class(Hierarchy(["x", "y", "z"])) is None
    assert negative_class(DEEP, "disease") == "disease"
    yb, score = binary_view(BRAIN, np.array([0, 2]), np.array([[.7, .1, .1, .1],
                                                                [.2, .1, .6, .1]]), "normal")
    assert yb.tolist() == [0, 1] and score == pytest.approx([0.3, 0.8])

    y = np.array([0, 0, 1, 1, 1, 1])
    s = np.array([.1, .4, .35, .8, .6, .9])
    op = operating_point(y, s, 0.5)
    assert op == pytest.approx({"sensitivity": 0.75, "specificity": 1.0, "ppv": 1.0,
                                "npv": 2 / 3})
    t = threshold_for_sensitivity(y, s, 0.75)
    assert t == pytest.approx({"threshold": 0.6, "sensitivity": 0.75, "specificity": 1.0})
    t = threshold_for_sensitivity(y, s, 1.0)
    assert t == pytest.approx({"threshold": 0.35, "sensitivity": 1.0, "specificity": 0.5})
    assert np.isnan(threshold_for_sensitivity(np.zeros(3), s[:3])["threshold"])


def test_hierarchical_prf_hand_worked():
    # anc(): cyst -> {disease, benign, cyst}; the root never counts
    true = ["cyst", "cyst", "glioma", "normal", "lipoma"]
    pred = ["cyst", "lipoma", "normal", "glioma", "benign"]  # the last stops at a node
    # intersections 3, 2, 0, 0, 2 = 7; |pred| 3+3+1+3+2 = 12; |true| 3+3+3+1+3 = 13
    r = hierarchical_prf(DEEP, true, pred)
    assert r["precision"] == pytest.approx(7 / 12)
    assert r["recall"] == pytest.approx(7 / 13)
    assert r["f1"] == pytest.approx(2 * (7 / 12) * (7 / 13) / (7 / 12 + 7 / 13))
    # leaf indices work too, and a perfect prediction scores 1
    assert hierarchical_prf(DEEP, [0, 1, 2], [0, 1, 2]) == {"precision": 1.0, "recall": 1.0,
                                                             "f1": 1.0}


def test_inconsistency_from_leaf_probabilities():
    p = np.array([[0.4, 0.2, 0.2, 0.2],   # top leaf normal, but P(tumor) = 0.6
                  [0.1, 0.7, 0.1, 0.1],
                  [0.5, 0.3, 0.1, 0.1]])
    mask = inconsistent_mask(BRAIN, p)
    assert mask["leaf_vs_levels"].tolist() == [True, False, False]
    assert inconsistency_rate(BRAIN, p) == pytest.approx(1 / 3)


def test_inconsistency_child_not_under_parent():
    # levels: [normal, disease], [benign, malignant], [cyst, lipoma, glioma, lymphoma]
    level_preds = [np.array([1, 1, 0]), np.array([0, 1, 1]), np.array([2, 2, 0])]
    mask = inconsistent_mask(DEEP, level_preds=level_preds)
    # 1: benign -> glioma (not its child); 2: malignant -> glioma; 3: normal is a leaf
    assert mask["child_not_under_parent"].tolist() == [True, False, False]
    assert inconsistency_rate(DEEP, level_preds=level_preds) == pytest.approx(1 / 3)


def test_inconsistency_heads_vs_leaf():
    h = BRAIN
    node_probs = {"root": np.array([[0.4, 0.6], [0.8, 0.2]]),
                  "tumor": np.array([[0.34, 0.33, 0.33], [0.1, 0.1, 0.8]])}
    leaf = h.leaf_probabilities(node_probs)
    assert greedy_leaf(h, node_probs).tolist() == [1, 0]  # tumour -> glioma; normal
    mask = inconsistent_mask(h, leaf, node_probs=node_probs)
    assert mask["heads_vs_leaf"].tolist() == [True, False]
    assert mask["any"].tolist() == [True, False]


# ------------------------------------------------------------------ bootstrap forms
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_confusion_forms_equal_sklearn_one_matrix_and_a_stack():
    from kmedtl.errors import ConfigError
    from kmedtl.evaluation.metrics import (
        auroc_macro_ranks,
        auroc_per_class,
        confusion_counts,
        confusion_metric,
        weighted_confusions,
    )

    rng = np.random.default_rng(3)
    stack, expected = [], {"balanced_accuracy": [], "kappa": [], "f1_macro": []}
    for trial in range(6):
        k = 4
        y = rng.integers(0, 3 if trial % 2 else k, 40)  # odd trials: a class never present
        p = rng.dirichlet(np.ones(k), 40)
        pred = p.argmax(1)
        cm = confusion_counts(y, pred, k)
        np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=range(k)))
        want = {"balanced_accuracy": skm.balanced_accuracy_score(y, pred),
                "kappa": skm.cohen_kappa_score(y, pred),
                "f1_macro": skm.f1_score(y, pred, labels=range(k), average="macro",
                                         zero_division=0)}
        for name, value in want.items():
            assert confusion_metric(cm, name) == pytest.approx(value, abs=1e-12)
            expected[name].append(value)
        assert auroc_macro_ranks(y, p) == pytest.approx(np.nanmean(auroc_per_class(y, p)),
                                                        abs=1e-12)
        stack.append(cm)
    for name, values in expected.items():  # vectorised over a stack of matrices
        np.testing.assert_allclose(confusion_metric(np.stack(stack), name), values, atol=1e-12)
    with pytest.raises(ConfigError, match="not a confusion-matrix metric"):
        confusion_metric(stack[0], "auroc_macro")
    counts = rng.integers(0, 3, (5, 40))  # a bootstrap's draws: one matrix per resample
    many = weighted_confusions(y, pred, k, counts)
    for row, cm in zip(counts, many):
        drawn = confusion_counts(np.repeat(y, row), np.repeat(pred, row), k)
        np.testing.assert_array_equal(cm, drawn)
