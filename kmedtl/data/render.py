"""``kmedtl data show``: the decoded, windowed image beside a patient-free header summary."""

from __future__ import annotations

import json
import os

from matplotlib.figure import Figure

from kmedtl.data import decode
from kmedtl.data.options import ImageOptions


def describe(path, options: ImageOptions, frame: int | None = None) -> dict:
    """Decode ``path`` and return the model-input image, the native image and a safe summary."""
    data = decode.read_bytes(path)
    native, meta = decode.decode_bytes(data, os.fspath(path), options, frame=frame)
    model_input = decode.preprocess(native, options)
    summary = {"file": os.path.basename(os.fspath(path)), **meta,
               "native_shape": list(native.shape), "model_input_shape": list(model_input.shape),
               "image_options": {"size": list(options.size), "channels": options.channels,
                                 "resize": options.resize, "window": options.window,
                                 "frames": options.frames}}
    return {"native": native, "model_input": model_input, "summary": summary}


def render(path, out_png, options: ImageOptions, frame: int | None = None) -> dict:
    """Write a PNG: native image, what the model sees, and the header summary."""
    d = describe(path, options, frame)
    # a Figure of its own (no pyplot): drawn by Agg, whatever backend the caller uses
    fig = Figure(figsize=(15, 5.2))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, img, title in ((axes[0], d["native"], "decoded (windowed, native size)"),
                           (axes[1], d["model_input"], "model input")):
        shown = img[..., 0] if img.shape[-1] == 1 else img
        ax.imshow(shown, cmap="gray" if img.shape[-1] == 1 else None, vmin=0,
                  vmax=1 if img.dtype != "uint8" else 255)
        ax.set_title(f"{title}\n{img.shape[1]}x{img.shape[0]}x{img.shape[2]}", fontsize=10)
        ax.axis("off")
    axes[2].axis("off")
    text = "\n".join(f"{k}: {_short(v)}" for k, v in d["summary"].items())
    axes[2].text(0, 1, text, va="top", ha="left", family="monospace", fontsize=8, wrap=True)
    fig.suptitle(d["summary"]["file"], fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return d["summary"]


def _short(v) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s if len(s) <= 60 else s[:57] + "..."
