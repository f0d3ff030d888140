"""evaluate_predictions' documented structure; the HTML report is self-contained (every
<img> a PNG data URI); the model card renders from the same numbers."""

import json

import numpy as np
import pytest
from test_evaluation_run import assert_self_contained

from kmedtl.evaluation import (
    build_model_card,
    evaluate_predictions,
    flat_values,
    label_tree_text,
    plots,
    reliability_curve,
    render_model_card,
    render_report,
    write_model_card,
)
from kmedtl.hierarchy import Hierarchy

H = Hierarchy({"normal": ["no_tumor"], "tumor": {"glioma": ["glioma_tumor"],
                                                 "pituitary": ["pituitary_tumor"]}})


def _predictions(rng, n):
    y = rng.integers(0, 3, n)
    z = rng.normal(size=(n, 3))
    z[np.arange(n), y] += 1.2
    p = np.exp(2 * z) / np.exp(2 * z).sum(1, keepdims=True)
    return y, p


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    y, p = _predictions(rng, 120)
    yv, pv = _predictions(rng, 60)
    node_probs = {"root": np.stack([p[:, 0], p[:, 1:].sum(1)], 1),
                  "tumor": p[:, 1:] / p[:, 1:].sum(1, keepdims=True)}
    return y, p, evaluate_predictions(H, y, p, node_probs=node_probs, val=(yv, pv),
                                      n_boot=40, seed=0)


def test_structure_of_the_metrics(result):
    y, p, m = result
    assert m["kind"] == "kmedtl-metrics" and m["n_test"] == 120
    assert list(m["tasks"]) == ["leaf", "level_1", "level_2"]
    leaf = m["tasks"]["leaf"]
    assert leaf["metrics"]["accuracy"]["value"] == pytest.approx((p.argmax(1) == y).mean())
    assert sum(v["support"] for v in leaf["per_class"].values()) == 120
    assert m["tasks"]["level_2"]["n"] == int((y > 0).sum())
    assert m["binary"]["negative"] == "normal" and m["binary"]["threshold_chosen_on"] == "val"
    assert m["binary"]["n_positive"] == int((y > 0).sum())
    # heads vs leaf: the root head says "tumor" (p_glioma + p_pituitary > p_normal) while
    # the argmax leaf is normal; counted here without the code under test
    heads_disagree = int(((p.argmax(1) == 0) & (p[:, 0] < p[:, 1:].sum(1))).sum())
    assert heads_disagree > 0  # the fixture has some, so a count stuck at 0 fails
    assert m["hierarchical"]["inconsistent"]["heads_vs_leaf"] == heads_disagree
    assert m["calibration"]["temperature"] == pytest.approx(m["_calibration"]["temperature"])
    # every scalar metric is an interval
    flat = flat_values(m)
    assert "tasks/leaf/per_class/glioma/auroc" in flat and "headline/accuracy" in flat
    assert len(flat) > 80 and None not in flat.values()  # every metric is defined here
    for key, value in flat.items():
        interval = m
        for part in key.split("/"):
            interval = interval[part]
        assert interval["ci_low"] <= value <= interval["ci_high"], key
        assert 0 <= value and (value <= 1 or key.endswith("nll")), key


def test_raw_labels_and_no_validation(result):
    y, p, _ = result
    raw = np.array(["no_tumor", "glioma_tumor", "pituitary_tumor"])[y]
    m = evaluate_predictions(H, raw, p, n_boot=5)
    assert m["tasks"]["leaf"]["metrics"]["accuracy"]["value"] == pytest.approx(
        (p.argmax(1) == y).mean())
    assert m["binary"]["threshold_chosen_on"] == "test"
    assert m["calibration"]["temperature"] is None and m["_calibration"] is None
    flat = evaluate_predictions(Hierarchy(["a", "b", "c"]), y, p, n_boot=5)
    assert flat["hierarchical"] is None and list(flat["tasks"]) == ["leaf"]


def test_report_is_self_contained(result, tmp_path):
    y, p, m = result
    figures = [("ROC", "roc", plots.png_bytes(plots.plot_roc(y, p, H.leaves))),
               ("Calibration", "rel", plots.png_bytes(plots.plot_reliability(
                   {"raw": reliability_curve(y, p)})))]
    thumb = plots.png_bytes(plots.plot_image_grid([np.zeros((8, 8))], ["x"]))
    html_text = render_report(
        m, title="Evaluation <test>", run_info={"run": "demo"},
        data_summary={"images": 120}, split_sizes={"train": {"normal": 3, "glioma": 4},
                                                   "test": {"normal": 1}},
        figures=figures, gradcam=[("cam", thumb)],
        examples=[{"png": thumb, "true": "glioma", "pred": "normal", "confidence": 0.9,
                   "name": "a/b.png"}],
        limitations=["small <data>"], label_tree=label_tree_text(H))
    assert assert_self_contained(html_text) == 4
    assert "Evaluation &lt;test&gt;" in html_text and "small &lt;data&gt;" in html_text
    assert "Disease vs normal" in html_text and "95% confidence interval" in html_text


def test_model_card(result, tmp_path):
    _, _, m = result
    audit = {"counts": {"read": 10, "used": 9, "skipped": 1, "samples": 9,
                        "by_class": {"normal": 3}},
             "summary": {"duplicate_groups": 2, "label_conflicts": 1},
             "patient_overlap": {"patients_with_id": 0}}
    card = build_model_card(name="demo", hierarchy=H, metrics=m, audit=audit,
                            calibration=m["_calibration"])
    assert card["training_data"]["duplicates"]["exact_duplicate_groups"] == 2
    assert any("patient identifiers" in x for x in card["limitations"])
    assert any("conflicting labels" in x for x in card["limitations"])
    md = render_model_card(card)
    for heading in ("## Intended use", "## Training data", "## Label tree", "## Metrics",
                    "## Calibration", "## Known limitations"):
        assert heading in md
    assert "glioma  (labels: glioma_tumor)" in md
    md_path, json_path = write_model_card(card, tmp_path)
    assert json.loads(open(json_path).read())["name"] == "demo"


def test_summarise_metrics_over_repeats():
    from kmedtl.evaluation import summarise_metrics

    docs = []
    for seed in range(3):
        y, p = _predictions(np.random.default_rng(seed), 80)
        docs.append(evaluate_predictions(H, y, p, n_boot=5, seed=seed))
    s = summarise_metrics(docs)
    accs = [d["headline"]["accuracy"]["value"] for d in docs]
    assert s["headline/accuracy"]["n"] == 3
    assert s["headline/accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert s["headline/accuracy"]["sd"] == pytest.approx(np.std(accs, ddof=1))


def test_training_curves_from_keras_and_staged_histories(tmp_path):
    keras_csv = tmp_path / "history.csv"
    keras_csv.write_text("epoch,leaf_accuracy,loss,val_leaf_accuracy,val_loss\n"
                         "0,0.5,1.2,0.4,1.3\n1,0.6,1.0,0.5,1.1\n2,0.7,0.8,0.55,1.0\n")
    fig = plots.plot_training_curves(keras_csv)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2 and len(fig.axes[1].lines) == 2
    staged_csv = tmp_path / "staged.csv"
    staged_csv.write_text("stage,fold,epoch,loss,accuracy\n"
                          "root,0,0,1.0,0.5\nroot,final,0,0.9,0.6\nroot,final,1,0.7,0.7\n"
                          "tumor,final,0,1.1,0.4\ntumor,final,1,0.8,0.6\n")
    hist = plots.read_history(staged_csv)
    assert hist["stage"][0] == "root" and hist["loss"][1] == 0.9
    fig = plots.plot_training_curves(staged_csv)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["root: loss", "tumor: loss"]
    assert len(fig.axes[0].lines[0].get_xdata()) == 2  # the fold-0 row is left out
    assert plots.png_bytes(fig)[:4] == b"\x89PNG"


def test_single_class_test_set_gives_undefined_not_errors():
    """An external test set of normals only: subtype metrics and sensitivity are undefined
    (null), the rest is computed and the report still renders."""
    p = np.random.default_rng(0).dirichlet(np.ones(3), 20)
    m = evaluate_predictions(H, np.zeros(20, int), p, n_boot=20)
    assert m["tasks"]["level_2"]["n"] == 0
    assert m["tasks"]["level_2"]["metrics"]["accuracy"]["value"] is None
    assert m["binary"]["at_threshold"]["sensitivity"]["value"] is None
    assert m["binary"]["threshold_at_target"] is None
    assert m["headline"]["accuracy"]["value"] == pytest.approx((p.argmax(1) == 0).mean())
    assert "n/a" in render_report(m)
