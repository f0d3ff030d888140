"""PNG/JPEG/TIFF/BMP decoding into float32 [0, 1] images.

Pillow reads the header lazily (IHDR, SOF, the TIFF/BMP header), so the announced size is
checked against ``ImageOptions.max_pixels`` and the decoded float32 size against
``ImageOptions.max_image_bytes`` before any pixel buffer exists: a 500 KB PNG announcing
13000x13000 is refused, not decoded.  Pillow is only asked for the formats docs/reliability.md
lists (:data:`FORMATS`), so EPS (which runs Ghostscript), PSD and the other 40 formats it
knows are never tried.  The decode keeps one full-resolution copy at a time (Pillow's
buffer is freed before the float32 one is made, scaling is in place): peak memory is about
5 bytes per gray pixel here, 8 with the resize.  EXIF orientation is ignored, as
TensorFlow's ``decode_image`` (used by the serving signature) ignores it too.
No TensorFlow import here: this module runs inside cache worker processes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from kmedtl.data.options import DEFAULT_MAX_IMAGE_BYTES
from kmedtl.errors import DecodeError, ImageTooLargeError

#: The formats Pillow may open: those docs/reliability.md lists.  Anything else (EPS runs
#: Ghostscript, and PSD, ICNS, FITS, ... are rarely checked parsers) is ``not_image``.
FORMATS = ("PNG", "JPEG", "TIFF", "BMP")

#: Modes that decode to one channel (the rest become RGB); "P"/"PA" count as three, as
#: the palette is not known to be gray until the pixels are loaded.
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})


def open_image(fp):
    """``Image.open`` restricted to :data:`FORMATS` (header only; nothing is decoded)."""
    return Image.open(fp, formats=FORMATS)


def check_size(name: str, w: int, h: int, mode: str, max_pixels: int,
               max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
    """Refuse an image whose header announces too much, before any pixel exists."""
    if w <= 0 or h <= 0:
        raise DecodeError(name, f"image header announces {w}x{h} pixels",
                          kind="corrupt_image")
    if w * h > max_pixels:
        raise ImageTooLargeError(
            name, f"header announces {w}x{h} = {w * h:,} pixels, over the limit of "
            f"{max_pixels:,} (data.max_pixels); refused before decoding (raise "
            "data.max_pixels if the image is real)")
    channels = 1 if mode in _GRAY_MODES else 3
    need = w * h * channels * 4
    if need > max_image_bytes:
        raise ImageTooLargeError(
            name, f"header announces {w}x{h} {mode} pixels, {need:,} bytes decoded (float32, "
            f"{channels} channel(s)), over data.max_image_bytes = {max_image_bytes:,}; "
            "refused before decoding (raise data.max_image_bytes if the image is real)")


def decode_raster(data: bytes, name: str, max_pixels: int,
                  max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[np.ndarray, dict]:
    """Decode encoded image bytes to (H, W, 1|3) float32 in [0, 1] plus a small meta dict."""
    if len(data) == 0:
        raise DecodeError(name, "file is empty (0 bytes)", kind="zero_byte")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning: we apply our own limit
        try:
            img = open_image(io.BytesIO(data))
        except UnidentifiedImageError:
            raise DecodeError(
                name, f"not a recognised image ({'/'.join(FORMATS)}) nor DICOM; remove it or "
                "fix the file", kind="not_image") from None
        except Image.DecompressionBombError as exc:  # Pillow's own limit, checked on open
            raise ImageTooLargeError(name, f"{exc}; refused before decoding") from None
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(name, f"unreadable image header ({exc})",
                              kind="corrupt_image") from None
        w, h = img.size
        mode = img.mode
        check_size(name, w, h, mode, max_pixels, max_image_bytes)
        fmt = img.format
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt streams raise OSError & co
            raise DecodeError(
                name, f"corrupt or truncated {fmt} data ({exc}); re-export the image",
                kind="corrupt_image") from None
    arr = _to_float(img)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr, {"format": fmt, "mode": mode, "width": w, "height": h}


def _to_float(img) -> np.ndarray:
    """[0, 1] float32 pixels; ``img`` is closed as soon as its pixels are copied out, and
    scaling is in place, so only one full-resolution copy exists at a time (beyond the
    short overlap of the integer and the float arrays)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = _take(img)
        top = 65535.0 if mode != "I" or a.max(initial=0) > 255 else 255.0
    elif mode == "F":
        a = _take(img)
        top = None
    else:
        gray = mode in ("L", "1", "LA", "P", "PA") and _is_gray(img)
        target = "L" if gray else "RGB"
        a = _take(img if mode == target else img.convert(target), img)
        top = 255.0
    arr = a.astype(np.float32)  # a new, writable array
    del a
    if top is None:
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if hi > lo:
            arr -= np.float32(lo)
            arr /= np.float32(hi - lo)
        else:
            arr[...] = 0.0
    else:
        arr /= np.float32(top)
    return arr


def _take(im, *also) -> np.ndarray:
    """The pixels of ``im`` as an array; ``im`` (and ``also``) closed to free their buffers."""
    try:
        return np.asarray(im)
    finally:
        for x in (im, *also):
            x.close()


def _is_gray(img) -> bool:
    if img.mode in ("L", "1", "LA"):
        return True
    palette = img.getpalette() or []
    rgb = np.asarray(palette[: 3 * 256]).reshape(-1, 3) if palette else None
    if rgb is None:
        return False
    return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))
