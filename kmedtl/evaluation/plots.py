"""Evaluation figures as PNG: ROC and PR curves, confusion matrices, reliability diagrams,
training curves, learning curves, Grad-CAM grids.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure`` + the Agg
canvas), never ``pyplot``: nothing here touches the user's interactive backend or global
figure state, and it works headless.  Each ``plot_*`` returns a ``Figure``; :func:`save`
writes it as PNG and :func:`png_bytes` gives the bytes (for embedding in HTML).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn import metrics as skm

DPI = 110


def _figure(width=5.0, height=4.0, ncols=1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save(fig: Figure, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _one_vs_rest(y_true, probs, class_names):
    """(name, binary truth, score) per class; a binary task keeps only its second class."""
    y = np.asarray(y_true)
    p = np.asarray(probs)
    cols = [1] if p.shape[1] == 2 else range(p.shape[1])
    for c in cols:
        pos = y == c
        yield class_names[c], pos, p[:, c]


def plot_roc(y_true, probs, class_names: Sequence[str], title: str = "ROC") -> Figure:
    """One-vs-rest ROC curve per class (sklearn ``roc_curve``), AUROC in the legend."""
    fig, (ax,) = _figure()
    for name, pos, score in _one_vs_rest(y_true, probs, class_names):
        if 0 < pos.sum() < len(pos):
            fpr, tpr, _ = skm.roc_curve(pos, score)
            ax.plot(fpr, tpr, label=f"{name} (AUROC {skm.auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=title, xlim=(0, 1), ylim=(0, 1.02))
    if ax.lines[:-1]:
        ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_pr(y_true, probs, class_names: Sequence[str], title: str = "Precision-recall") -> Figure:
    """One-vs-rest precision-recall curve per class, average precision in the legend; the
    dotted line of each colour is that class's prevalence (a random classifier)."""
    fig, (ax,) = _figure()
    for name, pos, score in _one_vs_rest(y_true, probs, class_names):
        if pos.any():
            prec, rec, _ = skm.precision_recall_curve(pos, score)
            ap = skm.average_precision_score(pos, score)
            (line,) = ax.plot(rec, prec, label=f"{name} (AP {ap:.3f})")
            ax.axhline(pos.mean(), color=line.get_color(), lw=0.7, ls=":")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title,
           xlim=(0, 1), ylim=(0, 1.02))
    if ax.lines:
        ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_confusion(cm, class_names: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Counts with the row percentage (share of each true class) in every cell."""
    cm = np.asarray(cm)
    k = len(class_names)
    size = max(3.6, 0.9 * k + 1.8)
    fig, (ax,) = _figure(size, size * 0.9)
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    fontsize=8, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return fig


def plot_reliability(curves: Mapping[str, Mapping], title: str = "Reliability diagram") -> Figure:
    """Accuracy against confidence per bin for one or more reliability curves
    (``{"raw": reliability_curve(...), "temperature-scaled": ...}``), with the count of
    cases per bin below."""
    fig = Figure(figsize=(5, 5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax, axc = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfect calibration")
    width = None
    for i, (label, c) in enumerate(curves.items()):
        edges = np.asarray(c["edges"])
        centre = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        used = np.asarray(c["count"]) > 0
        ax.plot(np.asarray(c["confidence"])[used], np.asarray(c["accuracy"])[used], "o-",
                ms=3, label=label)
        off = (i - (len(curves) - 1) / 2) * width / max(len(curves), 1)
        axc.bar(centre + off, c["count"], width=width / max(len(curves), 1), alpha=0.7)
    ax.set(ylabel="accuracy", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    axc.set(xlabel="confidence (top-class probability)", ylabel="cases")
    return fig


def read_history(path) -> dict[str, list]:
    """A Keras ``CSVLogger`` file as ``{column: values}``: numeric columns as floats (empty
    cells nan), others (the staged workflow's ``stage`` / ``fold``) as strings."""
    rows: dict[str, list[str]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                rows.setdefault(k, []).append(v or "")
    out: dict[str, list] = {}
    for k, values in rows.items():
        try:
            out[k] = [float(v) if v != "" else float("nan") for v in values]
        except ValueError:
            out[k] = values
    return out


_NOT_PLOTTED = ("epoch", "lr", "learning_rate", "stage", "fold")


def plot_training_curves(history: Mapping[str, Sequence] | str | os.PathLike,
                         title: str = "Training curves") -> Figure:
    """Losses (left) and other metrics (right) per epoch from a ``history.csv`` path or a
    ``{column: values}`` dict; validation curves dashed.

    A staged run's history (``stage`` and ``fold`` columns) gets one curve per stage, from
    the rows of its final model (``fold == "final"``) when there are any.
    """
    hist = read_history(history) if isinstance(history, (str, os.PathLike)) else dict(history)
    n = len(next(iter(hist.values()), []))
    epochs = np.asarray(hist.get("epoch", range(n)), dtype=float)
    rows = np.ones(n, bool)
    segments = [("", rows)]
    if "stage" in hist:
        folds = np.asarray([str(f) for f in hist.get("fold", [""] * n)])
        if (folds == "final").any():
            rows = folds == "final"
        stages = np.asarray([str(s) for s in hist["stage"]])
        segments = [(f"{st}: ", rows & (stages == st)) for st in dict.fromkeys(stages[rows])]
    epochs = epochs + 1 if epochs.size and np.nanmin(epochs) == 0 else epochs
    cols = [k for k in hist if k not in _NOT_PLOTTED and isinstance(hist[k][0], float)
            and np.isfinite(np.asarray(hist[k], dtype=float)[rows]).any()]
    losses = [k for k in cols if "loss" in k]
    others = [k for k in cols if "loss" not in k]
    fig, axes = _figure(4.5, 3.6, ncols=2 if others else 1)
    groups = [(axes[0], losses, "loss")] + ([(axes[1], others, "metric")] if others else [])
    for ax, keys, ylabel in groups:
        bases = sorted({k.removeprefix("val_") for k in keys})
        for s, (prefix, sel) in enumerate(segments):
            for k in keys:
                colour = (s if len(segments) > 1 else bases.index(k.removeprefix("val_")))
                ax.plot(epochs[sel], np.asarray(hist[k], dtype=float)[sel],
                        ls="--" if k.startswith("val_") else "-", label=prefix + k,
                        color=f"C{colour % 10}")
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if keys:
            ax.legend(fontsize=7)
    axes[0].set_title(title)
    return fig


def plot_learning_curve(results: Mapping, metric: str = "metric",
                        title: str = "Learning curve") -> Figure:
    """Mean over seeds against training-set size, with a +-1 sd band and the single runs as
    dots (``results``: ``{n: [metric per seed]}``); log-scaled size axis."""
    ns = sorted(int(n) for n in results)
    vals = [np.asarray([v for v in results[_key(results, n)] if v is not None], float)
            for n in ns]
    mean = np.array([v.mean() if v.size else np.nan for v in vals])
    sd = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in vals])
    fig, (ax,) = _figure(5.2, 3.8)
    ax.plot(ns, mean, "o-", label=f"mean {metric}")
    ax.fill_between(ns, mean - sd, mean + sd, alpha=0.25, label="\u00b11 sd over seeds")
    for n, v in zip(ns, vals):
        ax.plot([n] * len(v), v, ".", color="grey", ms=4)
    if len(ns) > 1 and min(ns) > 0:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ns, [str(n) for n in ns])
    ax.set(xlabel="training images per class", ylabel=metric, title=title)
    ax.legend(fontsize=8)
    return fig


def _key(results, n):
    return n if n in results else str(n)


def plot_image_grid(images: Sequence[np.ndarray], titles: Sequence[str], ncols: int = 4,
                    title: str | None = None, cell: float = 2.2) -> Figure:
    """Images (H, W) / (H, W, 1|3) in ``[0, 1]`` or uint8, titled, in a grid."""
    n = max(len(images), 1)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig = Figure(figsize=(cell * ncols, cell * nrows + (0.3 if title else 0)), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, t in zip(axes, images, titles):
        img = np.asarray(img)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None,
                  vmin=0, vmax=255 if img.dtype == np.uint8 else 1)
        ax.set_title(t, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
