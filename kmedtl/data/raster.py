"""PNG/JPEG (and other Pillow formats) decoding into float32 [0, 1] images.

Pillow reads the header lazily, so the image size is checked against
``ImageOptions.max_pixels`` before any pixel buffer exists.  EXIF orientation is ignored,
as TensorFlow's ``decode_image`` (used by the serving signature) ignores it too.
No TensorFlow import here: this module runs inside cache worker processes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from kmedtl.errors import DecodeError, ImageTooLargeError


def decode_raster(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, dict]:
    """Decode encoded image bytes to (H, W, 1|3) float32 in [0, 1] plus a small meta dict."""
    if len(data) == 0:
        raise DecodeError(name, "file is empty (0 bytes)", kind="zero_byte")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning: we apply our own limit
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise DecodeError(
                name, "not a recognised image (PNG/JPEG/TIFF/BMP) nor DICOM; remove it or "
                "fix the file", kind="not_image") from None
        except Image.DecompressionBombError as exc:  # Pillow's own limit, checked on open
            raise ImageTooLargeError(name, f"{exc}; refused before decoding") from None
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(name, f"unreadable image header ({exc})",
                              kind="corrupt_image") from None
        w, h = img.size
        if w * h > max_pixels:
            raise ImageTooLargeError(
                name, f"header announces {w}x{h} = {w * h:,} pixels, over the limit of "
                f"{max_pixels:,} (data.max_pixels); refused before decoding")
        fmt = img.format
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt streams raise OSError & co
            raise DecodeError(
                name, f"corrupt or truncated {fmt} data ({exc}); re-export the image",
                kind="corrupt_image") from None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif mode == "I":
        a = np.asarray(img)
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        arr = a.astype(np.float32) / top
    elif mode == "F":
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        arr = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    elif mode in ("L", "1", "LA", "P", "PA") and _is_gray(img):
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr, {"format": fmt, "mode": mode, "width": w, "height": h}


def _is_gray(img) -> bool:
    if img.mode in ("L", "1", "LA"):
        return True
    palette = img.getpalette() or []
    rgb = np.asarray(palette[: 3 * 256]).reshape(-1, 3) if palette else None
    if rgb is None:
        return False
    return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))
