"""Geometry and channel transforms on float32 [0, 1] images (NumPy + Pillow).

Resizing uses Pillow's antialiased bilinear filter on 32-bit float planes; TensorFlow's
``tf.image.resize(..., antialias=True)`` implements the same filter, so the serving
signature reproduces these pixels in-graph (checked in tests).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: ITU-R BT.601 luma weights, as used by Pillow's convert("L") and tf.image.rgb_to_grayscale.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    c = img.shape[-1]
    if c == channels:
        return img
    if channels == 1:
        return (img[..., :3] @ LUMA)[..., None].astype(np.float32)
    return np.repeat(img[..., :1], 3, axis=-1)


def _resize_plane(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    im = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def resize(img: np.ndarray, size: tuple[int, int], mode: str = "pad") -> np.ndarray:
    """Resize (H, W, C) to ``size`` = (height, width) by ``pad``, ``crop`` or ``stretch``."""
    th, tw = size
    h, w = img.shape[:2]
    if mode == "stretch":
        nh, nw = th, tw
    else:
        scale = min(th / h, tw / w) if mode == "pad" else max(th / h, tw / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        out = img.astype(np.float32, copy=False)
    elif img.shape[-1] == 1:
        out = _resize_plane(img[..., 0], nw, nh)[..., None]
    else:
        out = np.stack([_resize_plane(img[..., c], nw, nh) for c in range(img.shape[-1])], -1)
    if mode == "pad":
        canvas = np.zeros((th, tw, img.shape[-1]), dtype=np.float32)
        top, left = (th - nh) // 2, (tw - nw) // 2
        canvas[top:top + nh, left:left + nw] = out
        return canvas
    if mode == "crop":
        top, left = (nh - th) // 2, (nw - tw) // 2
        return out[top:top + th, left:left + tw]
    return out


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Quantise [0, 1] floats to the 8-bit display values the model is trained on."""
    scaled = np.multiply(img, np.float32(255.0), dtype=np.float32)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)
