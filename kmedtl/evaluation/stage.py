"""Evaluate a run folder: load, predict, compute, write every artefact.

:func:`evaluate_run` is what ``kmedtl evaluate RUN_DIR [--test SOURCE]`` does:

1. read ``config.yaml``, ``splits.json`` (and ``train_metrics.json`` for the fold) and load
   ``model.keras`` through :class:`kmedtl.run_folder.RunFolder` (which also gives the label
   tree: the model's own, else the config's, else the data's);
2. build the test set -- by default the run's test split of the configured data (the
   split file is authoritative; the data are re-indexed, not re-split), or every image of
   ``test`` (a folder-per-class tree, a CSV manifest or a YAML config) -- and the
   validation split (for temperature scaling and the target-sensitivity threshold);
3. predict both with the ``tf.data`` pipeline (:func:`kmedtl.data.pipeline.make_dataset`);
   an unreadable file is skipped and listed, never fatal;
4. compute :func:`~kmedtl.evaluation.evaluate.evaluate_predictions` and write
   ``metrics.json``, ``calibration.json``, ``plots/*.png``, ``report.html``,
   ``model_card.md`` and ``model_card.json`` into the run folder (or ``out``).

``metrics.json`` is the body documented in :mod:`kmedtl.evaluation.evaluate` plus
``run`` (``name``, ``dir``, ``model``, ``fold``), ``test`` (``source``, ``n``,
``by_class``, ``skipped``: ``[{path, reason}]``), ``tta`` (``null``, or the test-time
augmentation used: ``flips``, ``n`` views, ``flip_views``, ``random_views``, ``rotation``,
``zoom``, ``seed``, ``applied_to``), ``data`` (``split_sizes``: images per
class in train/val/test of the fold; ``audit``: the audit summary) and ``artefacts``
(relative paths of everything written).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from kmedtl import jsonio
from kmedtl.config import load_config, tta_options
from kmedtl.data.audit import dicom_patients, training_lookalikes
from kmedtl.data.decode import load_image
from kmedtl.data.prepare import input_names, load_index, primary_input
from kmedtl.data.sources import DatasetIndex
from kmedtl.errors import ConfigError, KmedtlError
from kmedtl.evaluation import calibration as cal
from kmedtl.evaluation import metrics as M
from kmedtl.evaluation import plots
from kmedtl.evaluation.evaluate import evaluate_predictions
from kmedtl.evaluation.gradcam import GradCAM, overlay
from kmedtl.evaluation.learning_curves import FILE_NAME as LC_FILE
from kmedtl.evaluation.learning_curves import load_learning_curve
from kmedtl.evaluation.model_card import (
    build_model_card,
    known_limitations,
    label_tree_text,
    write_model_card,
)
from kmedtl.evaluation.report import write_report
from kmedtl.evaluation.tta import predict_tta
from kmedtl.evaluation.uncertainty import format_interval
from kmedtl.jsonio import atomic_write, json_safe
from kmedtl.run_folder import (
    RunFolder,
    leaf_output,
    load_model,  # noqa: F401  (re-exported: kmedtl.evaluation.stage.load_model)
    normalization_for,
)

log = logging.getLogger("kmedtl.evaluation")


@dataclass
class Predictions:
    """Model outputs on a list of samples (the samples that could be read)."""

    samples: list
    y: np.ndarray  # leaf indices
    leaf_probs: np.ndarray
    node_probs: dict | None
    skipped: list = field(default_factory=list)  # [{"path", "reason"}]


# ``load_model``, ``normalization_for`` (kmedtl.run_folder) and ``write_json``
# (kmedtl.jsonio) stay importable from here for existing callers.
write_json = jsonio.write_json


def _tta_batch(model, x, tta, layers):
    """Mean outputs of one batch over the views of ``tta`` (a :class:`TTAOptions`)."""
    x = {k: np.asarray(v) for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    return predict_tta(model, x, n=tta.views, flips=tta.flips, augment=layers or None,
                       batch_size=max(1, n))


def predict(model, samples, hierarchy, options, *, batch_size: int = 32,
            normalization: str = "unit", decoder: str = "pydicom",
            tta=None, primary_input: str = "image") -> Predictions:
    """Run ``model`` over ``samples`` through the uncached ``tf.data`` pipeline.

    Files that fail to decode are dropped from the stream and returned in ``skipped``; the
    kept samples stay aligned with the outputs (the pipeline keeps order when not
    training).  ``tta`` (:class:`kmedtl.config.TTAOptions`, a mapping or ``True``) averages
    every output over flipped / randomly augmented views of each image.  Multi-input
    samples feed the model a dict keyed ``primary_input`` and the image columns; a case
    goes when any of its images cannot be read.
    """
    tta = tta_options(tta)
    layers = tta.augment_layers() if tta is not None else []
    # lazy: tf.data imports TensorFlow, absent under KERAS_BACKEND=jax
    from kmedtl.data.pipeline import PipelineReport, make_dataset

    if not samples:
        return Predictions([], np.zeros(0, np.int64), np.zeros((0, len(hierarchy.leaves))),
                           None)
    report = PipelineReport()
    ds = make_dataset(samples, hierarchy, options, batch_size=batch_size, training=False,
                      shuffle=False, targets="leaf", normalization=normalization,
                      report=report, decoder=decoder, primary_input=primary_input)
    outs, ys = [], []
    for x, y in ds:
        out = model(x, training=False) if tta is None else _tta_batch(model, x, tta, layers)
        if isinstance(out, dict):
            outs.append({k: np.asarray(v, dtype=np.float64) for k, v in out.items()})
        else:
            outs.append({"leaf": np.asarray(leaf_output(out), dtype=np.float64)})
        ys.append(np.asarray(y))
    skipped = [{"path": s.path, "reason": s.reason} for s in report.skipped]
    if not outs:
        raise ConfigError(f"evaluate: none of the {len(samples)} images could be read; first "
                          f"problem: {skipped[0]['path'] if skipped else '?'}: "
                          f"{skipped[0]['reason'] if skipped else 'unknown'}")
    merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    bad = {s.path for s in report.skipped}
    kept = [s for s in samples if s.path not in bad and not any(p in bad for _, p in s.extra)]
    y = np.concatenate(ys).astype(np.int64)
    if len(kept) != len(y):
        raise KmedtlError(f"evaluate: {len(y)} predictions for {len(kept)} readable samples "
                          "(the pipeline lost alignment); please report this")
    if "leaf" not in merged:
        if len(merged) != 1:
            raise ConfigError(f"evaluate: the model returns {sorted(merged)}; expected a "
                              "'leaf' output (probabilities over the hierarchy's leaves)")
        merged = {"leaf": next(iter(merged.values()))}
    leaf = merged.pop("leaf")
    nodes = {k: v for k, v in merged.items() if k in hierarchy.parents} or None
    return Predictions(kept, y, leaf, nodes, skipped)


def _source_index(source: str, cfg, hierarchy):
    """Index an external test source with the run's hierarchy and image options."""
    src = os.path.abspath(source)
    if src.endswith((".yaml", ".yml")):
        other = load_config(src)
        data = other.model_dump(mode="json")["data"]
    elif src.endswith(".csv"):  # read as the run's manifest was (image columns, mapping)
        run_data = cfg.data
        data = {"source": "manifest", "manifest": src,
                "extra_columns": list(run_data.extra_columns or ()),
                "columns": dict(run_data.columns or {}) if run_data.source == "manifest"
                else {}}
    else:
        data = {"source": "folder", "root": src}
    run = cfg.model_dump(mode="json")["data"]
    data.update({"hierarchy": hierarchy.to_config(), "image": run["image"],
                 "dicom": run["dicom"], "decoder": run["decoder"]})
    test_cfg = load_config({"data": data})
    index, _ = load_index(test_cfg)
    return index, test_cfg.data


def _thumbnail(img: np.ndarray, size: int = 140) -> bytes:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    im = Image.fromarray(a)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _load_images(samples, options) -> np.ndarray:
    """[0, 1] float32 images of a few samples (for Grad-CAM and thumbnails)."""
    return np.stack([load_image(s.path, options, s.frame).image.astype("float32") / 255.0
                     for s in samples])


def _pick(rng, idx, k):
    idx = np.asarray(idx)
    return idx if len(idx) <= k else np.sort(rng.choice(idx, k, replace=False))


def evaluate_run(run_dir, *, test: str | None = None, out=None, fold: int | None = None,
                 n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                 batch_size: int = 32, threshold: float = 0.5,
                 target_sensitivity: float = 0.95, negative: str | None = None,
                 ordered: bool = False, n_bins: int = 15, n_gradcam: int = 8,
                 n_examples: int = 12, tta=None, exclude_training: bool = False,
                 external=None, indexed: tuple | None = None) -> dict:
    """Evaluate the model of a run folder; returns ``metrics.json``'s content (with the
    written paths under ``"artefacts"``).  See the module docstring for the steps.

    ``tta``: test-time augmentation of the test and validation predictions (``None``: off;
    ``True``; a flip mode; a mapping or :class:`kmedtl.config.TTAOptions`), recorded in
    ``metrics.json`` as ``"tta"``.

    ``exclude_training`` (with ``test``): leave out test images that are exact, near
    (pHash) or similar-content (thumbnail) copies of the run's training or validation
    images, counted in ``metrics.json`` under ``test.removed_as_training_lookalikes``.

    ``external``: ``[{"name", "source", "dedupe"}]`` external test sets (another folder,
    manifest or config), each evaluated like ``test`` into ``<out>/external/<name>/``
    (its own metrics, report and model card) and summarised beside the internal test under
    ``"external"`` in this ``metrics.json``, the report and the model card.

    ``indexed``: the ``(index, hierarchy)`` of the run's data, already built by the caller
    (``kmedtl run`` indexes once per run, so a DICOMweb source is queried once)."""
    tta = tta_options(tta, "evaluate.tta")
    rf = RunFolder(run_dir).ensure_dir()
    if indexed is not None:
        rf.use_index(indexed)
    run = rf.path
    out_dir = Path(out) if out else run
    plot_dir = out_dir / RunFolder.PLOTS_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    cfg = rf.config
    model = rf.model
    options = rf.image_options
    train_metrics = rf.train_metrics
    audit = rf.audit

    # ---- data: the run's index (for val, and test by default)
    index = None
    try:
        index = rf.index()[0]
    except KmedtlError as exc:
        if test is None:
            raise
        log.warning("evaluate: the run's data cannot be indexed (%s); no validation set", exc)
    hierarchy = rf.check_outputs()
    splits = None
    if rf.has_splits:
        splits = rf.splits(root=index.root if index else None)
    elif test is None:
        raise ConfigError(f"{rf.splits_path}: split file not found; pass --test SOURCE "
                          "to evaluate on other data")
    fold = int(train_metrics.get("fold", 0) if fold is None else fold)
    if splits is not None and not 0 <= fold < len(splits.folds):
        raise ConfigError(f"fold {fold}: the split file has {len(splits.folds)} fold(s)")
    missing: list[dict] = []

    def part(name):
        if splits is None or index is None:
            return []
        return rf.split_samples(name, fold, missing=missing)

    val_samples = part("val")
    test_data = None  # the data section of an external test source
    if test is None:
        test_samples = part("test")
        test_source = f"test split of fold {fold} ({cfg.data.root or cfg.data.manifest})"
    else:
        missing.clear()
        test_index, test_data = _source_index(test, cfg, hierarchy)
        test_samples = test_index.samples
        test_source = os.path.abspath(test)
        if exclude_training:
            reference = part("train") + part("val")
            if not reference:
                raise ConfigError(f"{test_source}: cannot remove training look-alikes: "
                                  f"the run's training images are not available ({run})")
            found = training_lookalikes(test_samples, reference, options,
                                        near_threshold=cfg.split.near_threshold,
                                        similar_threshold=cfg.split.similar_threshold,
                                        cache_dir=cfg.data.cache_dir)
            test_samples = [x for x in test_samples if x.id not in found]
            removed = {"count": len(found),
                       "by_reason": dict(Counter(v["reason"] for v in found.values())),
                       "of": len(test_index.samples),
                       "similar_threshold": cfg.split.similar_threshold,
                       "near_threshold": cfg.split.near_threshold}
            log.info("evaluate: %d of %d images of %s copy a training or validation image "
                     "(%s); left out", len(found), len(test_index.samples), test_source,
                     removed["by_reason"])
    if not test_samples:
        raise ConfigError(f"{run}: no test samples ({test_source})")
    ext_rows = _evaluate_external(
        external, run_dir, out_dir, fold=fold, n_boot=n_boot, alpha=alpha, seed=seed,
        batch_size=batch_size, threshold=threshold, target_sensitivity=target_sensitivity,
        negative=negative, ordered=ordered, n_bins=n_bins, n_examples=n_examples, tta=tta)
    norm = normalization_for(model, cfg.data.normalization)
    # a multi-input model takes the images its data names (main image, extra columns)
    data_section = cfg.data if test_data is None else test_data
    rf.check_inputs(input_names(data_section, check=False),
                    where=f"{rf.model_path} on {test_source}")
    kw = dict(batch_size=batch_size, normalization=norm, decoder=cfg.data.decoder, tta=tta,
              primary_input=primary_input(data_section))
    log.info("evaluate: predicting %d test and %d validation images%s", len(test_samples),
             len(val_samples), f" ({tta.views} TTA views each)" if tta is not None else "")
    pt = predict(model, test_samples, hierarchy, options, **kw)
    kw["primary_input"] = primary_input(cfg.data)  # validation: the run's own data
    pv = predict(model, val_samples, hierarchy, options, **kw) if val_samples else None

    # ---- metrics
    patients = [s.patient_id for s in pt.samples]
    try:  # DICOM PatientID for samples without one: bootstrap clusters only, never written
        from_headers = dicom_patients(DatasetIndex(list(pt.samples)))
        patients = [p or from_headers.get(s.id) for p, s in zip(patients, pt.samples)]
    except (KmedtlError, OSError, ImportError) as exc:
        log.warning("evaluate: cannot read DICOM patient ids (%s); bootstrap by image", exc)
    groups = None
    if any(patients):
        groups = np.array([p or f"sample:{s.id}" for p, s in zip(patients, pt.samples)])
    metrics = evaluate_predictions(
        hierarchy, pt.y, pt.leaf_probs, node_probs=pt.node_probs,
        val=(pv.y, pv.leaf_probs) if pv is not None and len(pv.y) else None,
        n_boot=n_boot, alpha=alpha, seed=seed, groups=groups, ordered=ordered,
        negative=negative, threshold=threshold, target_sensitivity=target_sensitivity,
        n_bins=n_bins)
    calib = metrics.pop("_calibration")
    artefacts: dict = {"plots": []}
    if calib is not None:
        artefacts["calibration"] = os.path.relpath(
            cal.save_calibration(out_dir / RunFolder.CALIBRATION, json_safe(calib)), out_dir)

    # ---- split sizes / data summary
    label_of = {s.id: hierarchy.leaf_of(s.label) for s in (index.samples if index else [])}
    split_sizes = {}
    if splits is not None and index is not None:
        f = splits.folds[fold]
        for name in ("train", "val", "test"):
            split_sizes[name] = dict(sorted(Counter(label_of[i] for i in getattr(f, name)
                                                    if i in label_of).items()))
    if test is not None:
        split_sizes["external test"] = dict(sorted(Counter(
            hierarchy.leaves[i] for i in pt.y).items()))
        split_sizes.pop("test", None)

    # ---- figures
    figures: list[tuple[str, str, bytes]] = []

    def add(section, caption, fig, name):
        path = plot_dir / f"{name}.png"
        plots.save(fig, path)
        artefacts["plots"].append(os.path.relpath(path, out_dir))
        figures.append((section, caption, plots.png_bytes(fig)))

    for task in M.tasks(hierarchy):
        ty, tp, _ = M.task_view(hierarchy, task, pt.y, pt.leaf_probs)
        label = "final class" if task.level is None else f"level {task.level}"
        if len(ty):
            add("ROC and precision-recall curves", f"ROC, {label}",
                plots.plot_roc(ty, tp, task.classes, f"ROC ({label})"), f"roc_{task.name}")
            add("ROC and precision-recall curves", f"Precision-recall, {label}",
                plots.plot_pr(ty, tp, task.classes, f"Precision-recall ({label})"),
                f"pr_{task.name}")
        cm = metrics["tasks"][task.name]["confusion_matrix"]
        add("Confusion matrices", f"Confusion matrix, {label} (count and share of the "
            "true class)", plots.plot_confusion(cm, task.classes, f"Confusion ({label})"),
            f"confusion_{task.name}")
    curves = {"model output": cal.reliability_curve(pt.y, pt.leaf_probs, n_bins)}
    if calib is not None:
        curves[f"temperature {calib['temperature']:.2f}"] = cal.reliability_curve(
            pt.y, cal.apply_temperature(pt.leaf_probs, calib["temperature"]), n_bins)
    add("Calibration", "Reliability diagram on the test set (points on the diagonal = "
        "confidence matches accuracy)", plots.plot_reliability(curves), "reliability")
    if rf.history_path.is_file():
        try:
            add("Training", "Loss and metrics per epoch (dashed: validation)",
                plots.plot_training_curves(rf.history_path), "training_curves")
        except (OSError, ValueError, StopIteration) as exc:
            log.warning("evaluate: cannot plot history.csv: %s", exc)
    if rf.file(LC_FILE).is_file():
        lc, lc_metric = load_learning_curve(rf.file(LC_FILE))
        add("Learning curve", "Test metric against training images per class (band: "
            "\u00b11 sd over seeds)", plots.plot_learning_curve(lc, lc_metric),
            "learning_curve")

    # ---- Grad-CAM and misclassified examples
    rng = np.random.default_rng(seed)
    pred = pt.leaf_probs.argmax(1)
    wrong = np.nonzero(pred != pt.y)[0]
    right = np.nonzero(pred == pt.y)[0]
    gradcam_imgs: list[tuple[str, bytes]] = []
    if n_gradcam > 0 and not pt.samples[0].extra:
        chosen = np.concatenate([_pick(rng, right, n_gradcam - n_gradcam // 2),
                                 _pick(rng, wrong, n_gradcam // 2)]).astype(int)
        try:
            # lazy: tf.data imports TensorFlow, absent under KERAS_BACKEND=jax
            from kmedtl.data.pipeline import normalize

            imgs = _load_images([pt.samples[i] for i in chosen], options)
            cam = GradCAM(model)
            heat, cls, _ = cam(np.asarray(normalize(imgs, norm), "float32"),
                               batch_size=batch_size)
            tiles, titles = [], []
            for j, i in enumerate(chosen):
                tiles.append(overlay(imgs[j], heat[j]))
                ok = "correct" if pred[i] == pt.y[i] else "WRONG"
                titles.append(f"{ok}: true {hierarchy.leaves[pt.y[i]]}\npred "
                              f"{hierarchy.leaves[cls[j]]} ({pt.leaf_probs[i, cls[j]]:.0%})")
            fig = plots.plot_image_grid(tiles, titles, ncols=4,
                                        title=f"Grad-CAM at layer {cam.layer_name}")
            path = plot_dir / "gradcam.png"
            plots.save(fig, path)
            artefacts["plots"].append(os.path.relpath(path, out_dir))
            gradcam_imgs.append((f"Grad-CAM (layer {cam.layer_name}) on correctly and "
                                 "wrongly classified test images", plots.png_bytes(fig)))
        except (KmedtlError, ValueError, OSError) as exc:
            log.warning("evaluate: Grad-CAM skipped: %s", exc)
    examples = []
    if n_examples > 0 and len(wrong):
        conf = pt.leaf_probs[wrong, pred[wrong]]
        worst = wrong[np.argsort(-conf)][:n_examples]
        imgs = _load_images([pt.samples[i] for i in worst], options)
        root = index.root if index is not None and test is None else (
            test if test and os.path.isdir(test) else None)
        for j, i in enumerate(worst):
            s = pt.samples[i]
            name = os.path.relpath(s.path, root) if root else os.path.basename(s.path)
            examples.append({"png": _thumbnail(imgs[j]), "true": hierarchy.leaves[pt.y[i]],
                             "pred": hierarchy.leaves[pred[i]],
                             "confidence": float(pt.leaf_probs[i, pred[i]]),
                             "name": name + (f" #{s.frame}" if s.frame is not None else "")})
        fig = plots.plot_image_grid([imgs[j] for j in range(len(worst))],
                                    [f"true {e['true']}\npred {e['pred']} "
                                     f"({e['confidence']:.0%})" for e in examples], ncols=6,
                                    title="Most confident mistakes")
        path = plot_dir / "misclassified.png"
        plots.save(fig, path)
        artefacts["plots"].append(os.path.relpath(path, out_dir))

    # ---- metrics.json
    by_class = Counter(hierarchy.leaves[i] for i in pt.y)
    doc = {
        "kind": metrics["kind"], "version": metrics["version"],
        "run": {"name": cfg.name, "dir": str(run), "model": RunFolder.MODEL, "fold": fold},
        "test": {"source": test_source, "n": int(len(pt.y)),
                 "by_class": dict(sorted(by_class.items())),
                 "skipped": pt.skipped + (missing if test is None else []),
                 **({"removed_as_training_lookalikes": removed}
                    if test is not None and exclude_training else {})},
        "tta": tta.describe() if tta is not None else None,
        "data": {"split_sizes": split_sizes,
                 "audit": (audit or {}).get("summary"),
                 "audit_counts": {k: v for k, v in (audit or {}).get("counts", {}).items()
                                  if k in ("read", "used", "skipped", "samples")}},
        **{k: v for k, v in metrics.items() if k not in ("kind", "version")},
    }
    if ext_rows:
        doc["external"] = ext_rows
        doc["internal_vs_external"] = internal_vs_external(doc)
    root = index.root if index is not None and test is None else (
        test if test and os.path.isdir(test) else None)
    write_predictions(out_dir / PREDICTIONS_FILE, pt, hierarchy, root)
    artefacts["predictions"] = PREDICTIONS_FILE
    artefacts["metrics"] = "metrics.json"
    artefacts["report"] = "report.html"
    artefacts["model_card"] = ["model_card.md", "model_card.json"]
    doc["artefacts"] = artefacts
    doc = json_safe(doc)

    # ---- model card and report
    limitations = known_limitations(doc, audit, split_sizes, calib)
    card = build_model_card(name=cfg.name, hierarchy=hierarchy, metrics=doc, config=cfg,
                            audit=audit, splits=splits, split_sizes=split_sizes,
                            calibration=json_safe(calib) if calib else None, model=model)
    if ext_rows:
        card["metrics"]["internal_vs_external"] = doc["internal_vs_external"]
    write_model_card(card, out_dir)
    summary = {}
    if audit:
        c = audit.get("counts", {})
        s = audit.get("summary", {})
        summary = {"files read": c.get("read"), "images used": c.get("used"),
                   "unreadable files skipped": c.get("skipped"),
                   "exact-duplicate groups found": s.get("duplicate_groups"),
                   "near-duplicate groups found": s.get("near_duplicate_groups"),
                   "label conflicts among duplicates": s.get("label_conflicts")}
    if splits is not None:
        summary["split"] = f"{splits.method} (seed {splits.seed}), fold {fold}"
        summary["training images removed for leakage"] = len(splits.dropped)
    summary["test images evaluated"] = len(pt.y)
    for row in doc.get("internal_vs_external", []):
        summary[f"{row['set']} ({row['n']} images)"] = row["text"]
    if doc["test"]["skipped"]:
        summary["test images not evaluated (unreadable or missing)"] = len(doc["test"]["skipped"])
    write_report(out_dir / "report.html", doc, title=f"Evaluation report: {cfg.name}",
                 run_info={"run": cfg.name, "model": type(model).__name__,
                           "test set": test_source,
                           **({"test-time augmentation": _tta_text(tta)} if tta else {})},
                 data_summary=summary, split_sizes=split_sizes, figures=figures,
                 gradcam=gradcam_imgs, examples=examples, limitations=limitations,
                 label_tree=label_tree_text(hierarchy))
    jsonio.write_json(out_dir / RunFolder.METRICS, doc)
    return doc


#: The metrics of the internal-vs-external table, in order.
EXTERNAL_METRICS = ("balanced_accuracy", "kappa", "auroc_macro", "f1_macro")


def _evaluate_external(external, run_dir, out_dir, **kw) -> dict:
    """Evaluate each declared external set into ``<out_dir>/external/<name>/``; returns
    name -> its summary (source, n, removed look-alikes, headline, ECE)."""
    rows: dict = {}
    for ext in external or ():
        ext = dict(ext)
        name = ext["name"]
        sub = evaluate_run(run_dir, test=ext["source"], out=Path(out_dir) / "external" / name,
                           exclude_training=bool(ext.get("dedupe", True)), n_gradcam=0,
                           external=None, **kw)
        rows[name] = {"source": sub["test"]["source"], "n": sub["n_test"],
                      "by_class": sub["test"]["by_class"],
                      "removed_as_training_lookalikes":
                          sub["test"].get("removed_as_training_lookalikes"),
                      "skipped": len(sub["test"].get("skipped") or []),
                      "headline": sub["headline"],
                      "ece": (sub.get("calibration") or {}).get("ece"),
                      "dir": os.path.relpath(Path(out_dir) / "external" / name, out_dir)}
    return rows


def internal_vs_external(doc) -> list[dict]:
    """Rows of the internal-vs-external table: the internal test first, then each external
    set, with :data:`EXTERNAL_METRICS` (value and CI) and a one-line text."""
    def row(set_name, n, headline, ece, note=""):
        vals = {k: headline.get(k) for k in EXTERNAL_METRICS if headline.get(k)}
        text = "; ".join(f"{k.replace('_', ' ')} {format_interval(v)}" for k, v in vals.items())
        if ece:
            text += f"; ECE {format_interval(ece)}"
        return {"set": set_name, "n": n, "metrics": vals, "ece": ece,
                "text": text + (f" ({note})" if note else "")}

    out = [row("internal test", doc["n_test"], doc["headline"],
               (doc.get("calibration") or {}).get("ece"))]
    for name, e in (doc.get("external") or {}).items():
        rm = e.get("removed_as_training_lookalikes") or {}
        note = (f"{rm['count']} of {rm['of']} removed as copies of training/validation "
                f"images" if rm else "not deduplicated against training")
        out.append(row(f"external: {name}", e["n"], e["headline"], e.get("ece"), note))
    return out


def _tta_text(tta) -> str:
    d = tta.describe()
    text = f"mean of {d['n']} views: {d['flip_views']} flip view(s) ({d['flips']})"
    if d["random_views"]:
        text += (f" + {d['random_views']} random (rotation {d['rotation']}, zoom {d['zoom']},"
                 f" seed {d['seed']})")
    return text + "; test and validation predictions"


PREDICTIONS_FILE = RunFolder.PREDICTIONS


def write_predictions(path, pred: Predictions, hierarchy, root=None) -> Path:
    """Per test case: ``id`` (relative to the data root), ``frame``, ``true``, ``pred`` and
    one ``p_<leaf>`` column per leaf.  What :func:`kmedtl.evaluation.compare.compare_runs`
    pairs two models on."""
    def write(fh):
        w = csv.writer(fh)
        w.writerow(["id", "frame", "true", "pred"] + [f"p_{c}" for c in hierarchy.leaves])
        for s, y, p in zip(pred.samples, pred.y, pred.leaf_probs):
            name = os.path.relpath(s.path, root) if root else s.path
            w.writerow([name, "" if s.frame is None else s.frame, hierarchy.leaves[int(y)],
                        hierarchy.leaves[int(np.argmax(p))]] + [f"{v:.6g}" for v in p])

    path = Path(path)
    atomic_write(path, write, newline="")
    return path
