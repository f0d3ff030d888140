"""DICOM decoding with pydicom: modality LUT, windowing, photometric handling, frames.

Pixel data is decoded by pydicom 3 and its plugins (pylibjpeg-libjpeg for JPEG and
JPEG-LS, pylibjpeg-openjpeg for JPEG 2000 / HTJ2K, pylibjpeg-rle or pydicom's own RLE),
with Pillow as a fallback pydicom chooses itself.  The result is a float32 image in
[0, 1], shaped (H, W, 1) for MONOCHROME data and (H, W, 3) for colour, exactly what a
radiologist sees on screen with the chosen window.

Every failure raises a ``kmedtl.errors.DataError`` subclass with a reason code
(``kind``), so dataset passes can skip the file and say why.  Nothing here reads or
returns patient identifiers except :func:`patient_key`, whose value stays in memory
(used only to group a patient's scans on one side of a split).

No TensorFlow import here: this module runs inside cache worker processes.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmedtl.data.options import WINDOW_PRESETS, ImageOptions
from kmedtl.errors import DicomDecodeError, ImageTooLargeError

#: pip package that provides a decoder, by transfer syntax family (for error messages).
_CODEC_PACKAGES = {
    "JPEG 2000": "pylibjpeg-openjpeg",
    "High-Throughput JPEG 2000": "pylibjpeg-openjpeg",
    "JPEG-LS": "pylibjpeg-libjpeg",
    "JPEG": "pylibjpeg-libjpeg",
    "RLE": "pylibjpeg-rle",
    "Deflated": "(built in to pydicom)",
}

#: Header fields that :func:`header_summary` may show. Patient and operator identity,
#: dates, institution and accession numbers are deliberately absent.
SAFE_FIELDS = (
    "Modality",
    "SOPClassUID",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PixelSpacing",
    "SliceThickness",
    "BodyPartExamined",
    "Manufacturer",
)

_IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs")


@dataclass
class DicomImage:
    """A decoded frame: float32 ``image`` in [0, 1] (H, W, C) and a safe header ``meta``."""

    image: np.ndarray
    meta: dict
    n_frames: int


def is_dicom_bytes(head: bytes) -> bool:
    """True when the 128-byte preamble is followed by the ``DICM`` magic."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def read_dataset(source, path_for_errors, *, stop_before_pixels=False):
    """Parse a DICOM file (path, bytes or file object) into a pydicom ``Dataset``.

    Files without the DICOM preamble (old ACR-NEMA style, or written by tools that skip
    the file meta) are accepted when they parse into a plausible image dataset.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    name = path_for_errors
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise DicomDecodeError(name, "file is empty (0 bytes)", kind="zero_byte")
        fp = io.BytesIO(source)
    else:
        if os.path.getsize(source) == 0:
            raise DicomDecodeError(name, "file is empty (0 bytes)", kind="zero_byte")
        fp = source
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            if hasattr(fp, "seek"):
                fp.seek(0)
            try:
                ds = pydicom.dcmread(fp, force=True, stop_before_pixels=stop_before_pixels)
            except Exception as exc:  # noqa: BLE001 - any parse failure means "not DICOM"
                raise DicomDecodeError(
                    name, f"not a DICOM file ({type(exc).__name__}: {_first_line(exc)})",
                    kind="not_dicom",
                ) from None
            if not _plausible(ds):
                raise DicomDecodeError(
                    name,
                    "not a DICOM file (no 'DICM' marker and no recognisable DICOM elements); "
                    "remove it or fix the file extension",
                    kind="not_dicom",
                ) from None
        except (EOFError, OSError, ValueError, KeyError, TypeError) as exc:
            raise DicomDecodeError(
                name, f"truncated or corrupt DICOM ({type(exc).__name__}: {_first_line(exc)})",
                kind="truncated",
            ) from None
    # pydicom stops quietly at an unexpected end of file (it only warns): remember it, so
    # a dataset that lost its pixel data is reported as truncated, not as "not an image".
    ds.kmedtl_truncated = any("end of file" in str(w.message).lower() or
                              "truncat" in str(w.message).lower() for w in caught)
    return ds


def _plausible(ds) -> bool:
    try:
        tags = [int(t) for t in ds.keys()]
    except Exception:  # noqa: BLE001
        return False
    if not tags:
        return False
    known = {0x00080016, 0x00080018, 0x00080060, 0x00280010, 0x00280011, 0x7FE00010}
    # A text file forced through the parser yields a handful of garbage tags; require
    # real DICOM identifying or image elements, and tags in ascending order.
    return bool(known.intersection(tags)) and tags == sorted(tags)


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _ensure_transfer_syntax(ds):
    """Datasets without file meta still decode: infer the syntax they were read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit is None:
            implicit, little = True, True
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else
            (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )


def n_frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frame_indices(ds, mode: str) -> list[int]:
    n = n_frames(ds)
    if mode == "first":
        return [0]
    if mode == "middle":
        return [n // 2]
    return list(range(n))


def check_pixels_present(ds, name):
    """Raise a clear error for datasets that carry no image."""
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if has_pixels:
        return
    sop = ds.get("SOPClassUID")
    sop_name = getattr(sop, "name", str(sop)) if sop is not None else "unknown SOP class"
    if getattr(ds, "kmedtl_truncated", False) or not len(ds):
        raise DicomDecodeError(
            name, "the file ends before its pixel data: it is truncated; re-export or "
            "re-download it", kind="truncated")
    if "Rows" in ds and "Columns" in ds:
        raise DicomDecodeError(
            name,
            f"image header ({ds.Rows}x{ds.Columns}) but no pixel data: the file is probably "
            "truncated; re-export or re-download it",
            kind="truncated",
        )
    raise DicomDecodeError(
        name,
        f"no pixel data (Modality {ds.get('Modality', '?')}, {sop_name}): not an image; "
        "remove it from the dataset or manifest",
        kind="no_pixel_data",
    )


def check_dimensions(ds, name, max_pixels):
    """Refuse absurd dimensions from the header, before any pixel buffer is allocated."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DicomDecodeError(
            name, "missing or invalid Rows/Columns in the image header", kind="corrupt_header"
        ) from None
    if rows <= 0 or cols <= 0:
        raise DicomDecodeError(name, f"invalid image size {rows}x{cols}", kind="corrupt_header")
    if rows * cols > max_pixels:
        raise ImageTooLargeError(
            name,
            f"header announces {rows}x{cols} = {rows * cols:,} pixels per frame, over the "
            f"limit of {max_pixels:,} (data.max_pixels); refused before decoding",
        )


def _check_codec(ds, name):
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.TransferSyntaxUID
    if not tsyntax.is_compressed:
        return
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DicomDecodeError(
            name, f"transfer syntax {tsyntax.name} ({tsyntax}) has no decoder in pydicom",
            kind="codec_missing",
        ) from None
    if not decoder.is_available:
        package = next(
            (pkg for key, pkg in _CODEC_PACKAGES.items() if tsyntax.name.startswith(key)),
            "a pydicom pixel-data plugin",
        )
        raise DicomDecodeError(
            name,
            f"transfer syntax {tsyntax.name} needs {package}: pip install {package} "
            "(or pip install kmedtl[dicom])",
            kind="codec_missing",
        )


def decode_dicom(source, options: ImageOptions, *, frame: int | None = None,
                 name: str | None = None, summary: bool = True) -> DicomImage:
    """Decode one frame of a DICOM file into a float32 [0, 1] image.

    ``source`` is a path, bytes or a file object; ``frame`` overrides ``options.frames``
    (used when every frame is its own sample).  Raises ``DicomDecodeError`` (or
    ``ImageTooLargeError``) naming the file and the reason.
    """
    from pydicom.pixels import pixel_array

    name = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    ds = read_dataset(source, name)
    check_pixels_present(ds, name)
    check_dimensions(ds, name, options.max_pixels)
    _ensure_transfer_syntax(ds)
    _check_codec(ds, name)
    total = n_frames(ds)
    index = frame if frame is not None else frame_indices(ds, options.frames)[0]
    if not 0 <= index < total:
        raise DicomDecodeError(name, f"frame {index} requested but the file has {total}",
                               kind="bad_frame")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr = pixel_array(ds, index=index if total > 1 else None, as_rgb=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types; we classify
            text = str(exc)
            kind = "truncated" if "less than expected" in text else "corrupt_pixel_data"
            raise DicomDecodeError(
                name,
                f"pixel data cannot be decoded ({type(exc).__name__}: "
                f"{_decoder_reason(text)}); the file is corrupt or truncated",
                kind=kind,
            ) from None
    image, window_info = to_display(arr, ds, options, name)
    meta = header_summary(ds) if summary else {"Modality": str(ds.get("Modality", ""))}
    meta.update(window_info)
    meta["frame"] = index
    return DicomImage(image=image, meta=meta, n_frames=total)


def _decoder_reason(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # pydicom lists one line per plugin; keep them short and together.
    return "; ".join(lines[:3])[:300]


def to_display(arr: np.ndarray, ds, options: ImageOptions, name: str):
    """Map decoded pixel values to float32 [0, 1] display values, (H, W, C)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    info: dict = {}
    if photometric == "PALETTE COLOR":
        _fix_big_endian_palette(ds)
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:  # noqa: BLE001
            raise DicomDecodeError(
                name, f"PALETTE COLOR lookup table is unusable ({_first_line(exc)})",
                kind="corrupt_header",
            ) from None
        top = 255.0 if rgb.dtype == np.uint8 else 65535.0
        img = rgb.astype(np.float32) / top
        info["window_source"] = "palette"
    elif arr.ndim == 3 or photometric.startswith(("RGB", "YBR")):
        bits = int(ds.get("BitsStored", 8) or 8)
        img = arr.astype(np.float32) / float(2**bits - 1)
        info["window_source"] = "colour (full range)"
    else:
        values = _modality(arr, ds, apply_modality_lut)
        img, info = _window(values, ds, options)
        if photometric == "MONOCHROME1":
            img = 1.0 - img
            info["inverted"] = True
        img = img[..., None]
    img = np.clip(img, 0.0, 1.0, out=img if img.dtype == np.float32 else None)
    if img.ndim == 2:
        img = img[..., None]
    return img, info


def _modality(arr, ds, apply_modality_lut):
    """Stored values -> modality values (e.g. HU) as float32.

    The common Rescale Slope/Intercept case is done in float32 here (pydicom's
    ``apply_modality_lut`` works in float64, twice the memory traffic); a Modality LUT
    Sequence goes through pydicom.
    """
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    values = arr.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _fix_big_endian_palette(ds):
    """pydicom 3.0's ``apply_color_lut`` reads 16-bit palette data as little endian; a
    big-endian file then maps to near-black.  Byte-swap those tables in place (the dataset
    is ours alone) so both byte orders decode alike."""
    if ds.original_encoding[1] is not False:
        return
    for colour in ("Red", "Green", "Blue"):
        # (segmented tables are already read in the right byte order)
        key = f"{colour}PaletteColorLookupTableData"
        desc = ds.get(f"{colour}PaletteColorLookupTableDescriptor")
        if key in ds and (desc is None or int(desc[2]) > 8):
            raw = np.frombuffer(ds[key].value, dtype=">u2")
            ds[key].value = raw.astype("<u2").tobytes()


def _window(values: np.ndarray, ds, options: ImageOptions):
    window = options.window
    if isinstance(window, tuple):
        c, w = window
        return _linear(values, c, w), {"window": [c, w], "window_source": "explicit"}
    if window in WINDOW_PRESETS:
        c, w = WINDOW_PRESETS[window]
        info = {"window": [c, w], "window_source": f"preset {window}"}
        if str(ds.get("Modality", "")).upper() not in ("CT", ""):
            info["warning"] = (
                f"window preset {window!r} is in Hounsfield units but Modality is "
                f"{ds.get('Modality')}; use window: header or percentile"
            )
        return _linear(values, c, w), info
    if window == "header":
        header = _header_window(ds)
        if header is not None:
            c, w, func = header
            fn = _sigmoid if func == "SIGMOID" else (
                _linear_exact if func == "LINEAR_EXACT" else _linear)
            return fn(values, c, w), {"window": [c, w], "window_source": f"header {func}"}
        if "VOILUTSequence" in ds:
            from pydicom.pixels import apply_voi_lut

            # a VOI LUT is indexed by integer modality values
            out = apply_voi_lut(np.rint(values).astype(np.int32), ds,
                                prefer_lut=True).astype(np.float32)
            lo, hi = float(out.min()), float(out.max())
            return _scale(out, lo, hi), {"window_source": "header VOI LUT"}
        lo, hi = np.percentile(values, options.percentiles)
        return _scale(values, lo, hi), {
            "window": _cw(lo, hi), "window_source": "percentile (no window in header)"}
    if window == "minmax":
        lo, hi = float(values.min()), float(values.max())
        return _scale(values, lo, hi), {"window": _cw(lo, hi), "window_source": "minmax"}
    lo, hi = np.percentile(values, options.percentiles)
    return _scale(values, lo, hi), {"window": _cw(lo, hi), "window_source": "percentile"}


def _header_window(ds):
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    c, w = ds.WindowCenter, ds.WindowWidth
    try:
        c = float(c[0] if _is_multi(c) else c)
        w = float(w[0] if _is_multi(w) else w)
    except (TypeError, ValueError, IndexError):
        return None
    if w <= 0:
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return c, w, func


def _is_multi(v) -> bool:
    return hasattr(v, "__len__") and not isinstance(v, (str, bytes))


def _cw(lo, hi):
    return [float((lo + hi) / 2), float(hi - lo)]


def _scale(values, lo, hi):
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return (values - lo) / (hi - lo)


# Window functions of DICOM PS3.3 C.11.2.1.2, written out because pydicom's
# apply_windowing maps into the stored-bits range while we need [0, 1] floats.
def _linear(x, c, w):
    if w <= 1:
        return (x > c - 0.5).astype(np.float32)
    out = np.subtract(x, np.float32(c - 0.5), dtype=np.float32)
    out *= np.float32(1.0 / (w - 1.0))
    out += np.float32(0.5)
    return out


def _linear_exact(x, c, w):
    return (x - c) / w + 0.5


def _sigmoid(x, c, w):
    return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))


def header_summary(ds) -> dict:
    """Header fields safe to show, log or export: never patient identifiers."""
    out = {}
    for key in SAFE_FIELDS:
        if key not in ds:
            continue
        value = ds.get(key)
        if key == "SOPClassUID":
            value = getattr(value, "name", str(value))
        elif _is_multi(value):
            value = [_plain(v) for v in value]
        else:
            value = _plain(value)
        out[key] = value
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        out["TransferSyntax"] = meta.TransferSyntaxUID.name
    return out


def _plain(v):
    if isinstance(v, (int, float, str)):
        return v
    try:
        f = float(v)
        return int(f) if f.is_integer() else f
    except (TypeError, ValueError):
        return str(v)


def patient_key(ds) -> str | None:
    """PatientID for grouping splits, kept in memory only (never logged or written)."""
    pid = ds.get("PatientID")
    return str(pid) if pid else None


def identifying_values(ds) -> list[str]:
    """The identifying strings of a dataset (for tests that check nothing leaks)."""
    return [str(ds.get(k)) for k in _IDENTIFYING if ds.get(k)]
