"""A self-contained HTML evaluation report that a clinician can read.

One file, no external CSS, JavaScript or fonts: styles are inline and every image is a
``data:image/png;base64,...`` URI, so the report opens offline and can be e-mailed.  It
shows, in this order: a plain-language summary, the data (counts, duplicates removed,
split sizes), headline metrics with 95% confidence intervals and what each one means,
per-class tables, the normal-vs-disease operating points, hierarchy and calibration
results, the figures, Grad-CAM heatmaps, misclassified test images, and known limitations.

:func:`render_report` returns the HTML text; :func:`write_report` writes it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
from collections.abc import Mapping, Sequence

from kmedtl.evaluation.uncertainty import format_interval
from kmedtl.jsonio import atomic_write

#: Plain-language meaning of each metric, shown beside it.
EXPLAIN = {
    "accuracy": "Share of test images whose class was predicted correctly.",
    "balanced_accuracy": "Average of the per-class sensitivities: accuracy that does not "
                         "reward ignoring rare classes.",
    "kappa": "Cohen's kappa: agreement with the reference labels beyond chance "
             "(0 = chance, 1 = perfect).",
    "kappa_quadratic": "Quadratic-weighted kappa: like kappa, but near-misses on an "
                       "ordered scale cost less.",
    "f1_macro": "F1 score (balance of precision and sensitivity) averaged over classes.",
    "f1_weighted": "F1 score averaged over classes, weighted by class size.",
    "auroc_macro": "Area under the ROC curve, averaged over classes: chance that a case of "
                   "a class scores higher than a case of another (0.5 = chance, 1 = perfect).",
    "auprc_macro": "Area under the precision-recall curve, averaged over classes.",
    "sensitivity": "Share of diseased cases flagged as diseased (true positive rate).",
    "specificity": "Share of normal cases correctly called normal (true negative rate).",
    "ppv": "Positive predictive value: share of cases flagged diseased that are diseased "
           "(depends on prevalence).",
    "npv": "Negative predictive value: share of cases called normal that are normal.",
    "hierarchical_f1": "F1 over the label tree: a wrong subtype with the right disease "
                       "group earns partial credit.",
    "ece": "Expected calibration error: average gap between the model's confidence and its "
           "actual accuracy (0 = confidences can be taken at face value).",
    "auroc": "Area under the ROC curve of disease vs normal.",
}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1100px;padding:1.5em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;
padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f5f7}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em;margin:1em 0}
.summary{background:#eef6ff;border-left:4px solid #2a7ae2;padding:.6em 1em}
.muted{color:#666;font-size:.9em}
figure{display:inline-block;margin:.5em;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555;max-width:520px}
.grid{display:flex;flex-wrap:wrap;gap:.6em}
.case{border:1px solid #ddd;padding:.4em;width:150px;font-size:.8em}
.case img{width:140px;height:140px;object-fit:contain;background:#000}
"""


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(x) -> str:
    return html.escape(str(x))


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{data_uri(png)}" alt="{_e(alt)}"{w}>'


def _table(header: Sequence[str], rows: Sequence[Sequence], text: Sequence[int] = (0,)) -> str:
    """A table; columns not in ``text`` are right-aligned numbers."""
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            cls = "" if i in text else ' class="num"'
            cells.append(f"<td{cls}>{c if isinstance(c, _Raw) else _e(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


class _Raw(str):
    """Already-escaped HTML inside a table cell."""


def _pct(ci: Mapping | None) -> str:
    if not ci or ci.get("value") is None:
        return "n/a"
    if ci.get("ci_low") is None:
        return f"{100 * ci['value']:.1f}%"
    return f"{100 * ci['value']:.1f}% ({100 * ci['ci_low']:.1f}-{100 * ci['ci_high']:.1f}%)"


def _summary_text(metrics: Mapping) -> str:
    n = metrics.get("n_test", 0)
    acc = metrics["headline"].get("accuracy")
    parts = [f"On <b>{n}</b> test images the model assigned the correct class to "
             f"<b>{_pct(acc)}</b> of them (95% confidence interval in brackets)."]
    b = metrics.get("binary")
    if b:
        at = b["at_threshold"]
        parts.append(
            f"Of the {b['n_positive']} images with disease ({_e(', '.join(b['positive']))}) it "
            f"flagged <b>{_pct(at['sensitivity'])}</b> as diseased (sensitivity); of the "
            f"{b['n_negative']} {_e(b['negative'])} images it correctly called "
            f"<b>{_pct(at['specificity'])}</b> {_e(b['negative'])} (specificity), at a "
            f"decision threshold of {b['threshold']:.2f} on the disease probability.")
    c = metrics.get("calibration") or {}
    if c.get("ece") and c["ece"].get("value") is not None:
        parts.append(f"Its stated confidence is off from its actual accuracy by "
                     f"{_pct(c['ece'])} on average (expected calibration error).")
    return " ".join(parts)


def render_report(metrics: Mapping, *, title: str = "Evaluation report",
                  run_info: Mapping | None = None, data_summary: Mapping | None = None,
                  split_sizes: Mapping | None = None,
                  figures: Sequence[tuple[str, str, bytes]] = (),
                  gradcam: Sequence[tuple[str, bytes]] = (),
                  examples: Sequence[Mapping] = (), limitations: Sequence[str] = (),
                  label_tree: str | None = None) -> str:
    """The report as one HTML string.

    Args:
        metrics: the ``metrics.json`` body (:func:`~kmedtl.evaluation.evaluate_predictions`).
        run_info: ``{label: value}`` shown at the top (run, model, test source, date ...).
        data_summary: ``{label: value}`` about the data (counts, duplicates removed ...).
        split_sizes: ``{split: {class: count}}``.
        figures: ``(section, caption, png bytes)``.
        gradcam: ``(caption, png bytes)``.
        examples: misclassified cases ``{"png", "true", "pred", "confidence", "name"}``.
        limitations: sentences for the "Known limitations" section.
        label_tree: the label tree as indented text.
    """
    h = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}"
         f"</title><style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    info = dict(run_info or {})
    info.setdefault("generated", _dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    h.append('<p class="muted">' + " &middot; ".join(f"{_e(k)}: {_e(v)}" for k, v in
                                                      info.items()) + "</p>")
    h.append('<div class="note"><b>Research use only.</b> This model has not been validated '
             "for clinical decisions. Every number below is an estimate from a limited test "
             "set; the range in brackets is its 95% confidence interval (percentile "
             f"bootstrap, {metrics['bootstrap']['n_boot']} resamples by "
             f"{_e(metrics['bootstrap']['unit'])}).</div>")
    h.append(f'<h2>Summary</h2><p class="summary">{_summary_text(metrics)}</p>')

    # ---- data
    h.append("<h2>Data</h2>")
    if data_summary:
        h.append(_table(["", "value"], [(k, v) for k, v in data_summary.items()],
                        text=(0, 1)))
    if split_sizes:
        classes = sorted({c for v in split_sizes.values() for c in v})
        rows = [[c] + [split_sizes[s].get(c, 0) for s in split_sizes] for c in classes]
        rows.append([_Raw("<b>total</b>")] + [sum(split_sizes[s].values())
                                              for s in split_sizes])
        h.append("<h3>Images per split</h3>" + _table(["class", *split_sizes], rows))
    if label_tree:
        h.append(f"<h3>Label tree</h3><pre>{_e(label_tree)}</pre>")

    # ---- headline
    h.append("<h2>Headline metrics</h2>")
    rows = [(k.replace("_", " "), _Raw(_e(format_interval(v))), EXPLAIN.get(k, ""))
            for k, v in metrics["headline"].items()]
    h.append(_table(["metric", "value (95% CI)", "what it means"], rows, text=(0, 2)))

    # ---- tasks
    for task in metrics["tasks"].values():
        label = ("Final class (leaf)" if task["level"] is None else
                 f"Level {task['level']} of the label tree")
        h.append(f"<h2>{_e(label)}: {_e(', '.join(task['classes']))}</h2>")
        h.append(f'<p class="muted">{task["n"]} test images in this task.</p>')
        rows = [(k.replace("_", " "), _Raw(_e(format_interval(v))))
                for k, v in task["metrics"].items()]
        h.append(_table(["metric", "value (95% CI)"], rows))
        cols = ("recall", "specificity", "precision", "f1", "auroc", "auprc")
        heads = ("sensitivity (recall)", "specificity", "precision (PPV)", "F1", "AUROC",
                 "AUPRC")
        rows = [[c, v["support"], *[_Raw(_e(format_interval(v[m]))) for m in cols]]
                for c, v in task["per_class"].items()]
        h.append(_table(["class", "images", *heads], rows))

    # ---- binary
    b = metrics.get("binary")
    if b:
        h.append(f"<h2>Disease vs {_e(b['negative'])}</h2>")
        h.append(f"<p>Positive = any of {_e(', '.join(b['positive']))}. AUROC "
                 f"{_e(format_interval(b['auroc']))}.</p>")
        rows = [(k, _Raw(_e(format_interval(b["at_threshold"][k]))),
                 _Raw(_e(format_interval(b["at_target"].get(k)))), EXPLAIN.get(k, ""))
                for k in ("sensitivity", "specificity", "ppv", "npv")]
        tt = b["threshold_at_target"]
        h.append(_table(["", f"threshold {b['threshold']:.2f}",
                         f"threshold {tt:.3f} (target sensitivity "
                         f"{b['target_sensitivity']:.0%})" if tt is not None else
                         "target threshold (undefined)", "what it means"], rows,
                         text=(0, 3)))
        if b["threshold_chosen_on"] == "test":
            h.append('<p class="note">The target-sensitivity threshold was chosen on the test '
                     "set itself (no validation data): its numbers are optimistic.</p>")
        else:
            h.append('<p class="muted">The target-sensitivity threshold was chosen on the '
                     "validation set and then applied to the test set.</p>")

    hier = metrics.get("hierarchical")
    if hier:
        h.append("<h2>Hierarchy</h2>")
        rows = [(k.replace("_", " "), _Raw(_e(format_interval(hier[k]))))
                for k in ("precision", "recall", "f1", "inconsistency_rate")]
        h.append(_table(["hierarchical metric", "value (95% CI)"], rows))
        h.append('<p class="muted">Inconsistent = the most likely final class is not on the '
                 "path of the most likely class at each level (e.g. 'normal' overall while "
                 "'tumour' is more likely than 'normal').</p>")

    c = metrics.get("calibration") or {}
    if c:
        h.append("<h2>Calibration</h2>")
        rows = [("ECE", _Raw(_e(format_interval(c.get("ece"))))),
                ("negative log-likelihood", _Raw(_e(format_interval(c.get("nll")))))]
        if c.get("temperature") is not None:
            rows += [("temperature (fitted on " + str(c.get("fitted_on")) + ")",
                      f"{c['temperature']:.3f}"),
                     ("ECE after temperature scaling",
                      _Raw(_e(format_interval(c.get("ece_after_temperature"))))),
                     ("NLL after temperature scaling",
                      _Raw(_e(format_interval(c.get("nll_after_temperature")))))]
        h.append(_table(["", "value (95% CI)"], rows))

    # ---- figures
    sections: dict[str, list] = {}
    for section, caption, png in figures:
        sections.setdefault(section, []).append((caption, png))
    for section, items in sections.items():
        h.append(f"<h2>{_e(section)}</h2><div>")
        for caption, png in items:
            h.append(f"<figure>{_img(png, caption)}<figcaption>{_e(caption)}</figcaption>"
                     "</figure>")
        h.append("</div>")
    if gradcam:
        h.append("<h2>Where the model looks (Grad-CAM)</h2><p class=\"muted\">Red marks the "
                 "regions that most increased the predicted class's score. A heatmap shows "
                 "what the model used, not whether that is medically right.</p>")
        for caption, png in gradcam:
            h.append(f"<figure>{_img(png, caption)}<figcaption>{_e(caption)}</figcaption>"
                     "</figure>")
    if examples:
        h.append("<h2>Misclassified test images</h2><div class=\"grid\">")
        for ex in examples:
            h.append(f'<div class="case">{_img(ex["png"], ex.get("name", "case"))}<br>'
                     f"true: <b>{_e(ex['true'])}</b><br>predicted: <b>{_e(ex['pred'])}</b> "
                     f"({100 * ex['confidence']:.0f}%)<br><span class=\"muted\">"
                     f"{_e(ex.get('name', ''))}</span></div>")
        h.append("</div>")
    if limitations:
        h.append("<h2>Known limitations</h2><ul>" + "".join(f"<li>{_e(x)}</li>"
                                                          for x in limitations) + "</ul>")
    h.append("</body></html>")
    return "\n".join(h)


def write_report(path, metrics: Mapping, **kwargs) -> str:
    """Render and write the report; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    text = render_report(metrics, **kwargs)
    return atomic_write(path, lambda fh: fh.write(text))
