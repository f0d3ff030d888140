"""Model cards (Mitchell et al., "Model Cards for Model Reporting", FAT* 2019) as Markdown
and JSON.

:func:`build_model_card` assembles the card from what a run knows: the config (label tree,
image preprocessing), the audit report and split file (training-data counts, duplicates
and leaking images removed), ``metrics.json`` (headline metrics with 95% CIs) and
``calibration.json``.  :func:`write_model_card` writes ``model_card.md`` and
``model_card.json``; :func:`model_card_from_run` does all of it from a run folder (what
``kmedtl evaluate`` and the export stage call).

No patient identifier is ever read into the card: counts only.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from kmedtl import __version__
from kmedtl.evaluation.uncertainty import format_interval
from kmedtl.hierarchy import ROOT, Hierarchy
from kmedtl.jsonio import write_json
from kmedtl.run_folder import RunFolder, model_input_names

DEFAULT_INTENDED_USE = (
    "Research on transfer learning for small medical-image datasets: classifying images "
    "into the classes of the label tree below. Not a medical device; not validated for "
    "diagnosis, triage or any clinical decision. Outputs must be reviewed by a qualified "
    "clinician.")
OUT_OF_SCOPE = (
    "Clinical use without prospective validation at the deploying site.",
    "Images of another modality, body part, protocol or scanner than the training data.",
    "Classes outside the label tree: the model always answers with one of its classes.",
)


def label_tree_text(hierarchy: Hierarchy) -> str:
    """The tree as indented lines, leaves with the raw labels that map to them."""
    lines: list[str] = []

    def walk(name, depth):
        for child in hierarchy.children(name):
            node = hierarchy.node(child)
            raw = [r for r in node.raw_labels if r != child]
            extra = f"  (labels: {', '.join(raw)})" if raw else ""
            lines.append("  " * depth + f"- {child}{extra}")
            walk(child, depth + 1)

    walk(ROOT, 0)
    return "\n".join(lines)


def known_limitations(metrics: Mapping | None = None, audit: Mapping | None = None,
                      split_sizes: Mapping | None = None,
                      calibration: Mapping | None = None) -> list[str]:
    """Limitations that follow from the numbers (small test set, rare classes, wide
    intervals, duplicates, poor calibration...) plus the ones that always hold."""
    out = []
    if metrics:
        n = metrics.get("n_test", 0)
        if n and n < 200:
            out.append(f"The test set is small ({n} images): confidence intervals are wide "
                       "and rare failure modes may not appear at all.")
        acc = metrics.get("headline", {}).get("accuracy") or {}
        if acc.get("ci_low") is not None and acc["ci_high"] - acc["ci_low"] > 0.1:
            out.append(f"Accuracy is uncertain by more than 10 percentage points "
                       f"(95% CI {acc['ci_low']:.3f}-{acc['ci_high']:.3f}).")
        leaf = metrics.get("tasks", {}).get("leaf", {})
        rare = [c for c, v in leaf.get("per_class", {}).items() if v.get("support", 0) < 30]
        if rare:
            out.append(f"Few test images for {', '.join(rare)} (< 30 each): per-class "
                       "numbers for them are unreliable.")
        hier = metrics.get("hierarchical") or {}
        rate = (hier.get("inconsistency_rate") or {}).get("value")
        if rate:
            out.append(f"{100 * rate:.1f}% of test predictions are inconsistent with the "
                       "label tree (the top class disagrees with the top class of a level).")
        if (metrics.get("binary") or {}).get("threshold_chosen_on") == "test":
            out.append("The target-sensitivity threshold was chosen on the test set (no "
                       "validation data): its sensitivity/specificity are optimistic.")
    if audit:
        s = audit.get("summary", {})
        if s.get("label_conflicts"):
            out.append(f"{s['label_conflicts']} duplicate groups carry conflicting labels in "
                       "the source data (label noise).")
        if audit.get("counts", {}).get("skipped"):
            out.append(f"{audit['counts']['skipped']} source files could not be read and were "
                       "left out.")
        if not audit.get("patient_overlap", {}).get("patients_with_id"):
            out.append("The audit recorded no patient identifiers (manifest column): unless "
                       "the images carry a DICOM PatientID, images of one patient may sit in "
                       "both training and test data (only exact and near-duplicate images "
                       "were kept apart), which can inflate the results.")
    if split_sizes:
        train = split_sizes.get("train", {})
        if train and max(train.values()) > 3 * max(1, min(train.values())):
            out.append("The training classes are imbalanced (largest > 3x smallest).")
    if calibration is None:
        out.append("No temperature was fitted (no validation data): probabilities are the "
                   "raw model outputs.")
    elif metrics:
        ece = (metrics.get("calibration", {}).get("ece_after_temperature") or {}).get("value")
        if ece is not None and ece > 0.05:
            out.append(f"Even after temperature scaling the expected calibration error is "
                       f"{ece:.3f}: treat the probabilities as scores, not risks.")
    out.append("All data come from the source(s) listed under training data; performance on "
               "other hospitals, scanners or populations is unknown (no external validation "
               "unless stated).")
    out.append("Grad-CAM heatmaps show what the model used, not whether it is medically "
               "relevant.")
    return out


def _preprocessing(config) -> dict:
    if config is None:
        return {}
    d = config.data
    return {"image_size": list(d.image.size) if isinstance(d.image.size, (list, tuple))
            else [d.image.size, d.image.size],
            "channels": d.image.channels, "resize": d.image.resize,
            "dicom_window": d.dicom.window if isinstance(d.dicom.window, str)
            else list(d.dicom.window),
            "dicom_percentiles": list(d.dicom.percentiles), "dicom_frames": d.dicom.frames,
            "model_input": "float32 in [0, 1]; the model normalises for its backbone",
            "augmentation_during_training": config.augment.model_dump()}


def _model_info(model, config) -> dict:
    info: dict = {}
    if config is not None:
        info["backbone"] = config.train.get("backbone")
        info["training"] = {k: v for k, v in config.train.items()
                            if isinstance(v, (int, float, str, bool)) and k != "intended_use"}
    if model is not None:
        info["architecture"] = type(model).__name__
        bb = getattr(model, "backbone", None)
        if bb is not None:
            info["backbone"] = getattr(bb, "family", bb.name)
            info["cut"] = getattr(bb, "cut", None)
        info["input_shape"] = list(model.input_shape[1:]) if not isinstance(
            model.input_shape, list) else [list(s[1:]) for s in model.input_shape]
        names = model_input_names(model)
        if names:  # a multi-input model: one input per image type
            info["inputs"] = names
            mi = (config.train or {}).get("multi_input") if config is not None else None
            if isinstance(mi, dict):
                info["fusion"], info["head"] = mi.get("fusion"), mi.get("head")
        info["parameters"] = int(model.count_params())
        info["outputs"] = list(getattr(model, "output_names", []) or [])
    return {k: v for k, v in info.items() if v is not None}


def build_model_card(*, name: str, hierarchy: Hierarchy, metrics: Mapping | None = None,
                     config=None, audit: Mapping | None = None, splits=None,
                     split_sizes: Mapping | None = None, calibration: Mapping | None = None,
                     model=None, intended_use: str | None = None,
                     limitations: Sequence[str] | None = None) -> dict:
    """The card as a JSON-able dict (keys: ``kind``, ``name``, ``date``,
    ``kmedtl_version``, ``model``, ``intended_use``, ``training_data``, ``label_tree``,
    ``preprocessing``, ``metrics``, ``calibration``, ``limitations``).

    ``intended_use`` defaults to ``config.train["intended_use"]`` or a research-only text.
    ``limitations`` are added to :func:`known_limitations`.
    """
    if intended_use is None and config is not None:
        intended_use = config.train.get("intended_use")
    data: dict = {}
    if config is not None:
        d = config.data
        data["source"] = {"type": d.source, "location": d.root if d.source == "folder"
                          else d.manifest}
    if audit:
        c = audit.get("counts", {})
        data["counts"] = {k: c.get(k) for k in ("read", "used", "skipped", "samples")}
        data["by_class"] = c.get("by_class", {})
        s = audit.get("summary", {})
        data["duplicates"] = {
            "exact_duplicate_groups": s.get("duplicate_groups", 0),
            "near_duplicate_groups": s.get("near_duplicate_groups", 0),
            "cross_split_duplicate_groups": s.get("cross_split_duplicate_groups", 0),
            "label_conflicts": s.get("label_conflicts", 0),
            "patients_in_several_source_splits": s.get("patients_in_several_splits", 0)}
    if splits is not None:
        data["split"] = {"method": splits.method, "seed": splits.seed,
                         "params": dict(splits.params), "folds": len(splits.folds),
                         "removed_for_leakage": len(splits.dropped)}
    if split_sizes:
        data["split_sizes"] = {k: dict(v) for k, v in split_sizes.items()}
    card_metrics: dict = {}
    if metrics:
        card_metrics = {"n_test": metrics.get("n_test"),
                        "bootstrap": metrics.get("bootstrap"),
                        "headline": metrics.get("headline"),
                        "test_source": metrics.get("test", {}).get("source")
                        if isinstance(metrics.get("test"), Mapping) else None}
        if metrics.get("binary"):
            b = metrics["binary"]
            card_metrics["disease_vs_normal"] = {
                k: b[k] for k in ("negative", "positive", "threshold", "at_threshold",
                                  "auroc", "target_sensitivity", "threshold_at_target",
                                  "threshold_chosen_on", "at_target")}
        card_metrics["per_task"] = {t: v["metrics"] for t, v in metrics.get("tasks",
                                                                           {}).items()}
    lim = known_limitations(metrics, audit, split_sizes, calibration) + list(limitations or [])
    return {
        "kind": "kmedtl-model-card", "version": 1, "name": name,
        "date": _dt.date.today().isoformat(), "kmedtl_version": __version__,
        "model": _model_info(model, config),
        "intended_use": {"purpose": intended_use or DEFAULT_INTENDED_USE,
                         "out_of_scope": list(OUT_OF_SCOPE)},
        "training_data": data,
        "label_tree": {"config": hierarchy.to_config(), "leaves": list(hierarchy.leaves),
                       "text": label_tree_text(hierarchy)},
        "preprocessing": _preprocessing(config),
        "metrics": card_metrics,
        "calibration": dict(calibration) if calibration else None,
        "limitations": lim,
    }


def render_model_card(card: Mapping) -> str:
    """The card as Markdown."""
    md = [f"# Model card: {card['name']}", "",
          f"*{card['date']}, kmedtl {card['kmedtl_version']}*", ""]
    md += ["## Intended use", "", card["intended_use"]["purpose"], "", "Out of scope:", ""]
    md += [f"- {x}" for x in card["intended_use"]["out_of_scope"]] + [""]
    if card.get("model"):
        md += ["## Model", ""]
        md += [f"- **{k}**: {v}" for k, v in card["model"].items() if k != "training"]
        if card["model"].get("training"):
            md += ["- **training**: " + ", ".join(f"{k}={v}" for k, v in
                                                   card["model"]["training"].items())]
        md.append("")
    td = card.get("training_data") or {}
    md += ["## Training data", ""]
    if td.get("source"):
        md.append(f"- **source**: {td['source']['type']} `{td['source']['location']}`")
    if td.get("counts"):
        c = td["counts"]
        md.append(f"- **files**: {c.get('read')} read, {c.get('used')} used, "
                  f"{c.get('skipped')} skipped (unreadable)")
    if td.get("by_class"):
        md.append("- **images per class**: " + ", ".join(f"{k} {v}" for k, v in
                                                       td["by_class"].items()))
    if td.get("duplicates"):
        md.append("- **duplicates**: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in
                                                   td["duplicates"].items()))
    if td.get("split"):
        s = td["split"]
        md.append(f"- **split**: {s['method']} (seed {s['seed']}, {s['folds']} fold(s)); "
                  f"{s['removed_for_leakage']} training image(s) removed because they "
                  "duplicate or share a patient with a held-out image; groups of duplicates "
                  "and patients never straddle splits")
    if td.get("split_sizes"):
        md += ["", "| split | " + " | ".join(sorted({c for v in td["split_sizes"].values()
                                                   for c in v})) + " | total |"]
        classes = sorted({c for v in td["split_sizes"].values() for c in v})
        md.append("|" + "---|" * (len(classes) + 2))
        for split, counts in td["split_sizes"].items():
            md.append(f"| {split} | " + " | ".join(str(counts.get(c, 0)) for c in classes)
                      + f" | {sum(counts.values())} |")
    md += ["", "## Label tree", "", "```", card["label_tree"]["text"], "```", ""]
    if card.get("preprocessing"):
        md += ["## Preprocessing", ""]
        md += [f"- **{k.replace('_', ' ')}**: {v}" for k, v in card["preprocessing"].items()]
        md.append("")
    m = card.get("metrics") or {}
    if m.get("headline"):
        bs = m.get("bootstrap") or {}
        md += ["## Metrics", "",
               f"On {m.get('n_test')} test images"
               + (f" ({m['test_source']})" if m.get("test_source") else "")
               + f"; 95% CIs by percentile bootstrap ({bs.get('n_boot')} resamples by "
               f"{bs.get('unit')}).", "", "| metric | value (95% CI) |", "|---|---|"]
        md += [f"| {k.replace('_', ' ')} | {format_interval(v)} |"
               for k, v in m["headline"].items()]
        b = m.get("disease_vs_normal")
        if b:
            md += ["", f"Disease ({', '.join(b['positive'])}) vs {b['negative']}: AUROC "
                   f"{format_interval(b['auroc'])}; at threshold {b['threshold']:.2f} "
                   f"sensitivity {format_interval(b['at_threshold']['sensitivity'])}, "
                   f"specificity {format_interval(b['at_threshold']['specificity'])}."]
            if b.get("threshold_at_target") is not None:
                md.append(f"At threshold {b['threshold_at_target']:.3f} (chosen on "
                          f"{b['threshold_chosen_on']} for sensitivity >= "
                          f"{b['target_sensitivity']:.0%}): sensitivity "
                          f"{format_interval(b['at_target'].get('sensitivity'))}, specificity "
                          f"{format_interval(b['at_target'].get('specificity'))}.")
        md.append("")
    if m.get("internal_vs_external"):
        md += ["### Internal vs external test", "",
               "The internal test comes from the training source; an external set from "
               "another acquisition or site, with copies of training images removed, says "
               "whether the model travels.", "",
               "| test set | images | " + " | ".join(
                   k.replace("_", " ") for k in m["internal_vs_external"][0]["metrics"])
               + " | ECE |",
               "|---|---|" + "---|" * (len(m["internal_vs_external"][0]["metrics"]) + 1)]
        for r in m["internal_vs_external"]:
            md.append(f"| {r['set']} | {r['n']} | " + " | ".join(
                format_interval(v) for v in r["metrics"].values())
                + f" | {format_interval(r['ece']) if r.get('ece') else 'n/a'} |")
        md.append("")
    md += ["## Calibration", ""]
    c = card.get("calibration")
    if c:
        md.append(f"Temperature scaling (Guo et al. 2017), T = {c['temperature']:.3f}, fitted "
                  f"on {c.get('fitted_on')} ({c.get('n_fit', '?')} images): NLL "
                  f"{c.get('nll_before', float('nan')):.3f} -> "
                  f"{c.get('nll_after', float('nan')):.3f}, ECE "
                  f"{c.get('ece_before', float('nan')):.3f} -> "
                  f"{c.get('ece_after', float('nan')):.3f} on the fitting data. Apply with "
                  "`kmedtl.evaluation.apply_temperature(probs, T)`.")
    else:
        md.append("Not calibrated (no temperature fitted).")
    md += ["", "## Known limitations", ""] + [f"- {x}" for x in card["limitations"]] + [""]
    return "\n".join(md)


def write_model_card(card: Mapping, out_dir) -> tuple[str, str]:
    """Write ``model_card.md`` and ``model_card.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "model_card.md", out / "model_card.json"
    md.write_text(render_model_card(card), encoding="utf-8")
    write_json(js, card, strict=False, default=str)
    return str(md), str(js)


def split_sizes_of(splits, label_of: Mapping[str, str], fold: int = 0) -> dict:
    """``{"train": {class: n}, "val": ..., "test": ...}`` for one fold of a split file."""
    f = splits.folds[fold]
    return {part: dict(sorted(Counter(label_of[i] for i in getattr(f, part)
                                      if i in label_of).items()))
            for part in ("train", "val", "test")}


def model_card_from_run(run_dir, *, out=None, model=None, hierarchy: Hierarchy | None = None,
                        metrics: Mapping | None = None, intended_use: str | None = None) -> dict:
    """Build and write the card from a run folder (``config.yaml``, ``splits.json``,
    ``audit.json``, ``metrics.json``, ``calibration.json`` -- whichever exist, read through
    :class:`kmedtl.run_folder.RunFolder`); returns it.  The label tree is ``hierarchy``,
    else the run folder's (:attr:`~kmedtl.run_folder.RunFolder.hierarchy`: the model's own,
    else the config's, else the data's or the audit's classes).

    Split sizes per class come from ``audit.json``'s ``counts.by_split`` when the split
    file's ids cannot be matched to labels without re-indexing the data.
    """
    rf = RunFolder(run_dir, loaded_model=model)
    cfg = rf.config if rf.has_config else None
    audit = rf.audit
    metrics = metrics if metrics is not None else rf.metrics
    calibration = rf.calibration
    splits = rf.splits()
    if hierarchy is None:
        # the run folder's rule: the model's own tree, else the config's, else the data's
        hierarchy = rf.hierarchy
    sizes = (metrics or {}).get("data", {}).get("split_sizes") if metrics else None
    card = build_model_card(name=cfg.name if cfg else rf.path.name, hierarchy=hierarchy,
                            metrics=metrics, config=cfg, audit=audit, splits=splits,
                            split_sizes=sizes, calibration=calibration, model=model,
                            intended_use=intended_use)
    write_model_card(card, out or rf.path)
    return card
