"""DICOM decoding with pydicom: modality LUT, windowing, photometric handling, frames.

Pixel data is decoded by pydicom 3 and its plugins (pylibjpeg-libjpeg for JPEG and
JPEG-LS, pylibjpeg-openjpeg for JPEG 2000 / HTJ2K, pylibjpeg-rle or pydicom's own RLE),
with Pillow as a fallback pydicom chooses itself.  The result is a float32 image in
[0, 1], shaped (H, W, 1) for MONOCHROME data and (H, W, 3) for colour, exactly what a
radiologist sees on screen with the chosen window.

Resource limits are checked before anything large is allocated: Rows x Columns against
``data.max_pixels``, the codestream's own frame header (JPEG SOFn / JPEG-LS SOF55 /
JPEG 2000 SIZ, :func:`check_codec_frame`) against that limit and against the DICOM
header, and a Deflated Explicit VR Little Endian dataset's inflated size against a cap
(:func:`check_deflated`).  Segmentation objects are refused (their frames are label
masks) and transfer syntaxes pydicom cannot decode are reported as
``unsupported_transfer_syntax``.  A fixed window that covers under 1% of the pixel values
is kept but warned about in the meta (``warning``), which the audit reports.

Enhanced (multi-frame) objects keep rescale, window and pixel spacing in the Shared and
Per-frame Functional Groups; :func:`apply_functional_groups` brings the decoded frame's
values to the top level so that pydicom's modality/VOI LUT functions (which read only
top-level attributes, pydicom issue #2353) see them.  Empty or malformed Modality/VOI LUT
items fall back to rescale / window / percentiles with the reason in the meta, and lossless
JPEG frames whose entropy-coded data is damaged are refused (``jpeg_lossless``).

Every failure raises a ``kmedtl.errors.DataError`` subclass with a reason code
(``kind``), so dataset passes can skip the file and say why.  pydicom's own log records
(its plugins log full tracebacks) are kept off the console while kmedtl decodes and
re-logged at DEBUG under ``kmedtl.data.dicom`` (``kmedtl --verbose`` shows them).

Nothing here reads or returns patient identifiers except :func:`patient_key`, whose value
stays in memory (used only to group a patient's scans on one side of a split).

No TensorFlow import here: this module runs inside cache worker processes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filereader import read_dataset as _pydicom_read_dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    get_decoder,
    pixel_array,
)
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from kmedtl.data.jpeg_lossless import LOSSLESS_JPEG_SYNTAXES, check_frame, predictor6_overflow
from kmedtl.data.options import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    WINDOW_PRESETS,
    ImageOptions,
)
from kmedtl.errors import DataError, DicomDecodeError, ImageTooLargeError

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

#: Functional-group macros (PS3.3 C.7.6.16.2) whose attributes the display path reads,
#: and those attributes: rescale (C.7.6.16.2.9), window / VOI LUT (C.7.6.16.2.10) and
#: pixel spacing (C.7.6.16.2.1).  Enhanced CT, MR, XA and PET objects store them here.
FUNCTIONAL_GROUP_MACROS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction",
                            "WindowCenterWidthExplanation", "VOILUTSequence"),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
}

_log = logging.getLogger("kmedtl.data.dicom")
_local = threading.local()
_filter_lock = threading.Lock()
_PYDICOM_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils",
                    "pydicom.pixels.encoders.base")


class _PydicomToDebug(logging.Filter):
    """While kmedtl decodes on this thread, pydicom's records (a failing pixel plugin is
    logged at ERROR with its full traceback) stay off the console: they are re-logged at
    DEBUG under ``kmedtl.data.dicom`` and kept for the caller.  Other threads and code
    outside kmedtl's decode see pydicom's logging unchanged."""

    def filter(self, record):
        records = getattr(_local, "records", None)
        if records is None:
            return True
        records.append(record)
        _log.debug("pydicom: %s", record.getMessage(), exc_info=record.exc_info)
        return False


@contextlib.contextmanager
def quiet_pydicom():
    """pydicom's warnings ignored and its log records sent to DEBUG for the duration: a
    damaged element warns when first read, which may be long after ``dcmread``."""
    with warnings.catch_warnings(), pydicom_logs_to_debug():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def pydicom_logs_to_debug():
    """Route pydicom's log records on this thread to DEBUG for the duration."""
    with _filter_lock:
        for name in _PYDICOM_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, _PydicomToDebug) for f in logger.filters):
                logger.addFilter(_PydicomToDebug())
    outer = getattr(_local, "records", None)
    _local.records = [] if outer is None else outer
    try:
        yield _local.records
    finally:
        _local.records = outer


@dataclass
class DicomImage:
    """A decoded frame: float32 ``image`` in [0, 1] (H, W, C) and a safe header ``meta``."""

    image: np.ndarray
    meta: dict
    n_frames: int


def is_dicom_bytes(head: bytes) -> bool:
    """True when the 128-byte preamble is followed by the ``DICM`` magic."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def read_dataset(source, path_for_errors, *, stop_before_pixels=False,
                 max_pixels: int | None = None, max_file_bytes: int | None = None):
    """Parse a DICOM file (path, bytes or file object) into a pydicom ``Dataset``.

    Files without the DICOM preamble (old ACR-NEMA style, or written by tools that skip
    the file meta) are accepted when they parse into a plausible image dataset.  A
    Deflated Explicit VR Little Endian file is first inflated within a byte cap
    (:func:`check_deflated`, with ``max_pixels`` / ``max_file_bytes``, by default
    ``data.max_pixels`` / ``data.max_file_bytes``'s defaults), because pydicom inflates
    the whole dataset in memory even with ``stop_before_pixels``.
    """
    name = path_for_errors
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise DicomDecodeError(name, "file is empty (0 bytes)", kind="zero_byte")
        fp = io.BytesIO(source)
        check_deflated(fp, name, max_pixels, max_file_bytes)
    else:
        if hasattr(source, "read"):
            check_deflated(source, name, max_pixels, max_file_bytes)
        elif os.path.getsize(source) == 0:
            raise DicomDecodeError(name, "file is empty (0 bytes)", kind="zero_byte")
        else:
            with open(source, "rb") as fh:
                check_deflated(fh, name, max_pixels, max_file_bytes)
        fp = source
    with warnings.catch_warnings(record=True) as caught, pydicom_logs_to_debug():
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
        except MemoryError:
            raise DicomDecodeError(name, "a header element announces more data than fits in "
                                   "memory: the file is corrupt", kind="corrupt_header") from None
        except Exception as exc:  # noqa: BLE001 - pydicom's parser raises its own types too
            # (BytesLengthException, AttributeError, IndexError, struct.error ...) for a
            # damaged header; each is one corrupt file, never a crash of the whole pass
            raise DicomDecodeError(
                name, f"corrupt DICOM header ({type(exc).__name__}: {_first_line(exc)}); "
                "re-export the file", kind="corrupt_header") from None
    # pydicom stops quietly at an unexpected end of file (it only warns): remember it, so
    # a dataset that lost its pixel data is reported as truncated, not as "not an image".
    ds.kmedtl_truncated = any("end of file" in str(w.message).lower() or
                              "truncat" in str(w.message).lower() for w in caught)
    return ds


#: A deflated dataset may inflate to its header's pixel data (Rows x Columns x Samples
#: per Pixel x bytes per sample x Number of Frames) plus this much for every other element
#: (text, sequences, overlays, icons, private data).  Beyond it (and in any case beyond
#: ``data.max_file_bytes``) the file is refused while it is being inflated.
DEFLATE_HEADROOM = 64 << 20

#: How much of the inflated dataset is parsed for the image header (group 0028) first.
_DEFLATE_HEAD = 256 << 10


def check_deflated(fp, name, max_pixels: int | None = None,
                   max_file_bytes: int | None = None) -> int | None:
    """Inflate a Deflated Explicit VR Little Endian dataset (1.2.840.10008.1.2.1.99)
    chunk by chunk, keeping none of it, and refuse it before pydicom inflates it whole.

    pydicom's ``dcmread`` inflates the entire dataset into memory in one call (even with
    ``stop_before_pixels``), so a few hundred kB of deflated zeros became gigabytes.
    Here ``zlib.decompressobj`` inflates at most 1 MiB at a time (``max_length``) and
    counts.  The first 256 kB inflated are parsed for the image header: Rows x Columns
    over ``max_pixels`` is refused at once (``too_large``, naming ``data.max_pixels``);
    otherwise the cap is the pixel data that header announces plus
    :data:`DEFLATE_HEADROOM` (64 MiB), and never more than ``max_file_bytes`` (the byte
    budget of any file, ``data.max_file_bytes``).  Over the cap: ``too_large``.

    Returns the inflated size (None when the file is not deflated or its file meta cannot
    be read: then pydicom's own reading reports the problem).  ``fp`` is left where it was.
    """
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    max_file_bytes = DEFAULT_MAX_FILE_BYTES if max_file_bytes is None else int(max_file_bytes)
    start = fp.tell()
    try:
        try:
            with warnings.catch_warnings(), pydicom_logs_to_debug():
                warnings.simplefilter("ignore")
                read_preamble(fp, False)
                # private pydicom API: the public read_file_meta_info takes a path and
                # opens the file again; this file object is already open and bounded
                meta = _read_file_meta_info(fp)
                deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        except Exception:  # noqa: BLE001 - no preamble or a damaged file meta: not ours
            return None
        if not deflated:
            return None
        return _inflate_within(fp, name, max_pixels, max_file_bytes)
    finally:
        fp.seek(start)


def _inflate_within(fp, name, max_pixels: int, max_file_bytes: int) -> int:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate (PS3.5 A.5), as pydicom
    head = bytearray()
    total, cap, why = 0, None, ""
    while not inflater.eof:
        data = fp.read(1 << 20)
        if not data:
            break
        while data and not inflater.eof:
            try:
                out = inflater.decompress(data, 1 << 20)
            except zlib.error as exc:
                raise DicomDecodeError(
                    name, f"the deflated dataset is corrupt (zlib: {exc}); re-export the "
                    "file", kind="corrupt_header") from None
            total += len(out)
            if cap is None:
                head += out[:_DEFLATE_HEAD - len(head)]
                if len(head) >= _DEFLATE_HEAD:
                    cap, why = _deflate_cap(bytes(head), name, max_pixels, max_file_bytes)
            if cap is not None and total > cap:
                raise ImageTooLargeError(
                    name, f"the deflated dataset inflates to more than {cap:,} bytes "
                    f"({why}); refused while inflating, before it is read (a "
                    "decompression bomb, or a header that does not match its data)")
            data = inflater.unconsumed_tail
    if cap is None:
        cap, why = _deflate_cap(bytes(head), name, max_pixels, max_file_bytes)
        if total > cap:
            raise ImageTooLargeError(
                name, f"the deflated dataset inflates to {total:,} bytes, more than "
                f"{cap:,} ({why}); refused before it is read")
    return total


def _deflate_cap(head: bytes, name, max_pixels: int, max_file_bytes: int) -> tuple[int, str]:
    """The inflated-size cap for a deflated dataset whose first bytes are ``head``, and
    why; raises ``too_large`` when its header announces more than ``max_pixels``."""
    budget = (max_file_bytes, f"data.max_file_bytes = {max_file_bytes:,}; raise it if this "
              "file is a real image")

    def stop(tag, vr, length):
        return tag > 0x0028FFFF  # the image header is group 0028

    try:
        with warnings.catch_warnings(), pydicom_logs_to_debug():
            warnings.simplefilter("ignore")
            ds = _pydicom_read_dataset(io.BytesIO(head), False, True, stop_when=stop)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            spp = int(ds.get("SamplesPerPixel", 1) or 1)
            bits = int(ds.get("BitsAllocated", 16) or 16)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - no readable image header: the headroom alone
        rows = cols = 0
    if rows <= 0 or cols <= 0:
        cap = min(max_file_bytes, DEFLATE_HEADROOM)
        return cap, (budget[1] if cap == max_file_bytes else
                     f"its header announces no image size, and {DEFLATE_HEADROOM:,} bytes "
                     "are allowed for the other elements; the cap never exceeds "
                     f"data.max_file_bytes = {max_file_bytes:,}")
    if rows * cols > max_pixels:
        raise ImageTooLargeError(
            name, f"header announces {rows}x{cols} = {rows * cols:,} pixels per frame, over "
            f"the limit of {max_pixels:,} (data.max_pixels); refused before inflating the "
            "deflated dataset")
    pixel_bytes = (rows * cols * max(1, spp) * max(1, frames) * max(1, bits) + 7) // 8
    cap = pixel_bytes + DEFLATE_HEADROOM
    if cap >= max_file_bytes:
        return budget
    return cap, (f"its header announces {pixel_bytes:,} bytes of pixel data ({rows}x{cols}"
                 f"x{spp} samples of {bits} bits x {frames} frame(s)) and {DEFLATE_HEADROOM:,} "
                 "more are allowed for the other elements; the cap never exceeds "
                 f"data.max_file_bytes = {max_file_bytes:,}")


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
        with quiet_pydicom():
            return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except Exception:  # noqa: BLE001 - absent, malformed or unreadable: one frame
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
    if "Image Storage" in sop_name and "Presentation State" not in sop_name:
        raise DicomDecodeError(
            name, f"an image object ({sop_name}) without pixel data: the file is probably "
            "truncated; re-export or re-download it", kind="truncated")
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


#: Transfer syntaxes newer than pydicom 3.0's UID dictionary, by UID (for messages).
_NEWER_SYNTAXES = {
    "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}


def _unsupported_syntax(ds, name, tsyntax, why: str) -> DicomDecodeError:
    label = _NEWER_SYNTAXES.get(str(tsyntax)) or (
        tsyntax.name if tsyntax.name != str(tsyntax) else "not a transfer syntax pydicom knows")
    extra = ""
    if _is_segmentation(ds):
        extra = " (it is also a Segmentation object, which kmedtl skips in any case)"
    return DicomDecodeError(
        name, f"transfer syntax {tsyntax} ({label}) is not supported: {why}{extra}; convert "
        "the file to a supported syntax (e.g. Explicit VR Little Endian) or remove it",
        kind="unsupported_transfer_syntax")


def _check_codec(ds, name):
    tsyntax = ds.file_meta.TransferSyntaxUID
    if not tsyntax.is_transfer_syntax:
        # e.g. 1.2.840.10008.1.2.8.1 (Deflated Image Frame Compression, DICOM 2024): the
        # UID is not in pydicom's dictionary, which then cannot even say whether it is
        # compressed (it raised "UID is not a transfer syntax", reported as corrupt_header)
        raise _unsupported_syntax(
            ds, name, tsyntax, f"pydicom {pydicom.__version__} has no decoder for it")
    if not tsyntax.is_compressed:
        return
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise _unsupported_syntax(
            ds, name, tsyntax, f"pydicom {pydicom.__version__} has no decoder for it "
            "(video and other syntaxes without a pixel-data plugin)") from None
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


#: SOP Classes whose pixel data are segment masks (labels), not an image: Segmentation
#: Storage (1-bit BINARY or 8-bit FRACTIONAL frames, one per segment and slice), Label
#: Map Segmentation Storage and Height Map Segmentation Storage (DICOM 2024).
SEGMENTATION_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.8": "Height Map Segmentation Storage",
}


def _is_segmentation(ds) -> bool:
    """By SOP Class UID, or (a SOP Class lost in an export) Modality SEG with a Segment
    Sequence."""
    try:
        return str(ds.get("SOPClassUID", "")) in SEGMENTATION_SOP_CLASSES or (
            str(ds.get("Modality", "")).upper() == "SEG" and "SegmentSequence" in ds)
    except Exception:  # noqa: BLE001 - an unreadable SOP Class is not a segmentation
        return False


def check_not_segmentation(ds, name):
    """Refuse segmentation objects: their frames are masks of labelled regions (often
    1-bit, one frame per segment), which would otherwise be decoded as images or fail as
    "corrupt RLE" (pydicom cannot decode 1-bit RLE)."""
    if not _is_segmentation(ds):
        return
    sop = str(ds.get("SOPClassUID", ""))
    what = SEGMENTATION_SOP_CLASSES.get(sop, f"Modality SEG, SOP Class {sop or 'absent'}")
    kind_of = str(ds.get("SegmentationType", "") or "").upper()
    try:
        segments = len(ds.get("SegmentSequence") or ())
    except Exception:  # noqa: BLE001
        segments = 0
    detail = ", ".join(x for x in (kind_of and f"{kind_of} masks",
                                   segments and f"{segments} segment(s)") if x)
    raise DicomDecodeError(
        name, f"a segmentation object ({what}{', ' + detail if detail else ''}): its frames "
        "are label masks, not an image; remove it from the image dataset (use it as labels)",
        kind="segmentation_object")


#: JPEG start-of-frame markers, T.81 B.1.1.3 (SOF0-3, 5-7, 9-11, 13-15: baseline,
#: extended, progressive, lossless, hierarchical, arithmetic) and JPEG-LS SOF55 (T.87).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                       0xCE, 0xCF, 0xF7})


def codec_frame_header(frame: bytes) -> dict | None:
    """What a compressed frame's own header announces: ``{"codec", "height", "width",
    "components", "precision"}``, or None when it is not a JPEG, JPEG-LS or JPEG 2000
    codestream (RLE has no such header: pydicom sizes it from Rows/Columns) or the
    header cannot be read (the decoder then reports the damage).

    The codec allocates what *this* header says, not what Rows/Columns say, so a 64x64
    DICOM whose JPEG SOF claims 65500x65500 made the decoder allocate gigabytes.
    Written here because pydicom has no public parser for it: ``get_j2k_parameters``
    returns only the precision, and the JPEG one is private.  JPEG / JPEG-LS: the SOFn or
    SOF55 segment (P, Y, X, Nf; T.81 B.2.2); JPEG 2000 / HTJ2K: the SIZ segment that must
    follow SOC (Xsiz - XOsiz, Ysiz - YOsiz, Csiz, Ssiz; T.800 A.5.1), inside a JP2
    ``jp2c`` box when wrapped.
    """
    data = memoryview(frame)
    n = len(data)
    try:
        if n >= 4 and data[0] == 0xFF and data[1] == 0xD8:
            i = 2
            while i + 4 <= n:
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
                    i += 2
                    continue
                if marker in (0xDA, 0xD9):  # a scan or the end before any frame header
                    return None
                length = int.from_bytes(data[i + 2:i + 4], "big")
                if marker in _JPEG_SOF:
                    if i + 10 > n:
                        return None
                    return {"codec": "JPEG-LS" if marker == 0xF7 else "JPEG",
                            "precision": data[i + 4],
                            "height": int.from_bytes(data[i + 5:i + 7], "big"),
                            "width": int.from_bytes(data[i + 7:i + 9], "big"),
                            "components": data[i + 9]}
                i += 2 + length
            return None
        off = 0
        if bytes(data[:8]) == b"\x00\x00\x00\x0cjP  ":  # JP2 file format: find jp2c
            off = 12
            while off + 8 <= n:
                length = int.from_bytes(data[off:off + 4], "big")
                box = bytes(data[off + 4:off + 8])
                header = 8
                if length == 1:  # XLBox: a 64-bit length follows
                    length, header = int.from_bytes(data[off + 8:off + 16], "big"), 16
                if box == b"jp2c":
                    off += header
                    break
                if length < header:
                    return None
                off += length
            else:
                return None
        if off + 43 <= n and data[off] == 0xFF and data[off + 1] == 0x4F and \
                data[off + 2] == 0xFF and data[off + 3] == 0x51:
            def u32(k):
                return int.from_bytes(data[off + k:off + k + 4], "big")
            xsiz, ysiz, xosiz, yosiz = u32(8), u32(12), u32(16), u32(20)
            return {"codec": "JPEG 2000", "precision": (data[off + 42] & 0x7F) + 1,
                    "height": max(0, ysiz - yosiz), "width": max(0, xsiz - xosiz),
                    "components": int.from_bytes(data[off + 40:off + 42], "big")}
    except (IndexError, ValueError):
        return None
    return None


def check_codec_frame(ds, index: int, total: int, name, max_pixels: int):
    """Refuse frame ``index`` before decoding it when its codestream header announces
    more than ``max_pixels`` pixels (``too_large``), or a size or component count other
    than Rows x Columns x Samples per Pixel (``codec_size_mismatch``): the codec
    allocates the codestream's size whatever the DICOM header says."""
    tsyntax = ds.file_meta.TransferSyntaxUID
    if not tsyntax.is_encapsulated or "PixelData" not in ds:
        return
    try:
        stream = get_frame(ds.PixelData, index, number_of_frames=total)
    except Exception:  # noqa: BLE001 - the decoder reports unreadable encapsulation
        return
    head = codec_frame_header(stream)
    if head is None:
        return
    h, w, comps, codec = head["height"], head["width"], head["components"], head["codec"]
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    where = f"its {codec} codestream{f' (frame {index})' if total > 1 else ''}"
    size = f"{h if h else '(height from DNL)'}x{w}"
    if max(h, 1) * w > max_pixels or h * w * max(comps, 1) > max_pixels * max(spp, 1):
        raise ImageTooLargeError(
            name, f"{where} announces {size} = {h * w:,} pixels x {comps} component(s) "
            f"({head['precision']}-bit), over the limit of {max_pixels:,} pixels "
            f"(data.max_pixels), while the DICOM header says {rows}x{cols}; refused before "
            "decoding")
    if (h and h != rows) or w != cols or comps != spp:
        raise DicomDecodeError(
            name, f"{where} announces {size} pixels x {comps} component(s), but the DICOM "
            f"header says Rows x Columns x Samples per Pixel = {rows}x{cols}x{spp}: the "
            "file is corrupt or forged; refused before decoding (the codec would allocate "
            "the codestream's size)", kind="codec_size_mismatch")


def decode_dicom(source, options: ImageOptions, *, frame: int | None = None,
                 name: str | None = None, summary: bool = True) -> DicomImage:
    """Decode one frame of a DICOM file into a float32 [0, 1] image.

    ``source`` is a path, bytes or a file object; ``frame`` overrides ``options.frames``
    (used when every frame is its own sample).  Raises ``DicomDecodeError`` (or
    ``ImageTooLargeError``) naming the file and the reason.
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    with pydicom_logs_to_debug():
        ds = read_dataset(source, name, max_pixels=options.max_pixels,
                          max_file_bytes=options.max_file_bytes)
        try:
            with quiet_pydicom():
                return _decode_dataset(ds, options, frame, name, summary)
        except DataError:
            raise
        except MemoryError:
            raise ImageTooLargeError(name, "ran out of memory decoding this image") from None
        except Exception as exc:  # noqa: BLE001 - pydicom reads elements lazily: a corrupt
            # value surfaces on first access, as any of ValueError, TypeError, KeyError,
            # IndexError, struct.error, UnicodeDecodeError, NotImplementedError ...
            raise DicomDecodeError(
                name, f"a header element cannot be read ({type(exc).__name__}: "
                f"{_first_line(exc)}); the file is corrupt: re-export it",
                kind="corrupt_header") from None


def _decode_dataset(ds, options: ImageOptions, frame, name, summary) -> DicomImage:
    check_pixels_present(ds, name)
    _ensure_transfer_syntax(ds)
    _check_codec(ds, name)
    check_not_segmentation(ds, name)
    check_dimensions(ds, name, options.max_pixels)
    total = n_frames(ds)
    index = frame if frame is not None else frame_indices(ds, options.frames)[0]
    if not 0 <= index < total:
        raise DicomDecodeError(name, f"frame {index} requested but the file has {total}",
                               kind="bad_frame")
    check_codec_frame(ds, index, total, name, options.max_pixels)
    plugin = {}
    if ds.file_meta.TransferSyntaxUID == RLELossless and \
            "pydicom" in get_decoder(RLELossless).available_plugins:
        # pydicom's own RLE decoder: pylibjpeg-rle (Rust) panics on a damaged segment, and
        # the panic hook prints to stderr before Python sees the error
        plugin = {"decoding_plugin": "pydicom"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr = pixel_array(ds, index=index if total > 1 else None, as_rgb=True, **plugin)
        except (MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - pydicom and its plugins raise many
            # types; a Rust codec's panic (pylibjpeg-rle, pyo3 PanicException) is not even
            # an Exception.  Each is one undecodable frame: classify it.
            text = str(exc)
            kind = "truncated" if "less than expected" in text else "corrupt_pixel_data"
            raise DicomDecodeError(
                name,
                f"pixel data cannot be decoded ({type(exc).__name__}: "
                f"{_decoder_reason(text)}); the file is corrupt or truncated",
                kind=kind,
            ) from None
    _check_lossless_jpeg(ds, arr, index, total, name)
    groups = apply_functional_groups(ds, index)
    image, window_info = to_display(arr, ds, options, name)
    meta = header_summary(ds) if summary else {"Modality": str(ds.get("Modality", ""))}
    meta.update(window_info)
    if groups:
        meta["functional_groups"] = groups
    meta["frame"] = index
    return DicomImage(image=image, meta=meta, n_frames=total)


def _check_lossless_jpeg(ds, arr, index, total, name):
    """Refuse a lossless JPEG frame whose entropy-coded data is damaged (the codec decodes
    it to garbage without an error; see :mod:`kmedtl.data.jpeg_lossless`)."""
    if str(ds.file_meta.TransferSyntaxUID) not in LOSSLESS_JPEG_SYNTAXES:
        return
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric.startswith("YBR") or photometric == "PALETTE COLOR" or \
            arr.dtype.kind not in "iu":
        return  # colour-converted or looked-up samples are not the stream's samples
    try:
        stream = get_frame(ds.PixelData, index, number_of_frames=total)
    except Exception:  # noqa: BLE001 - pixel_array already read the frame; nothing to check
        return
    problem = check_frame(stream, arr)
    if problem and int(ds.get("BitsStored", 0) or 0) < int(ds.get("BitsAllocated", 0) or 0):
        # pydicom masks (or sign-extends) the bits above Bits Stored; a stream whose values
        # do not fit Bits Stored is a header mismatch, not damage: check the raw samples
        try:
            raw = pixel_array(ds, index=index if total > 1 else None,
                              correct_unused_bits=False)
        except Exception:  # noqa: BLE001 - it decoded a moment ago
            return
        problem = check_frame(stream, raw)
    if problem:
        raise DicomDecodeError(
            name, f"JPEG Lossless pixel data is damaged: {problem}; the codec returned an "
            "image of garbage without an error; re-export or re-transfer the file",
            kind="corrupt_pixel_data")
    problem = predictor6_overflow(stream, arr)
    if problem:
        raise DicomDecodeError(
            name, f"JPEG Lossless pixel data was written by a non-conforming encoder, "
            f"{problem}; the codec returned an image of garbage without an error; "
            "decompress it with dcmtk's workaround (dcmdjpeg +w6 in.dcm out.dcm) or "
            "re-export it from the original", kind="corrupt_pixel_data")


def apply_functional_groups(ds, index: int) -> list[str]:
    """Copy the frame's functional-group values (rescale, window/VOI LUT, pixel spacing)
    to the top level of ``ds`` (the caller's own dataset), per-frame over shared.

    Written here because pydicom 3.0's ``apply_modality_lut``/``apply_voi_lut`` read only
    top-level attributes (pydicom issue #2353); with the values flattened they work
    unchanged for Enhanced CT/MR/XA/PET.  Returns what was applied, e.g.
    ``["shared PixelValueTransformation", "shared FrameVOILUT"]``; missing, empty or
    malformed group items are treated as absent (the top-level values, if any, stay).
    """
    notes: list[str] = []
    shared = _item(ds, "SharedFunctionalGroupsSequence", 0)
    per = _item(ds, "PerFrameFunctionalGroupsSequence", index)
    if shared is None and per is None:
        return notes
    for macro, keys in FUNCTIONAL_GROUP_MACROS.items():
        for where, group in (("per-frame", per), ("shared", shared)):
            item = _item(group, macro, 0) if group is not None else None
            if item is None:
                continue
            copied = [k for k in keys if k in item and item[k].value not in (None, "", [])]
            for k in copied:
                ds[k] = item[k]
            if copied:
                notes.append(f"{where} {macro[:-len('Sequence')]}")
                break
    return notes


def _item(ds, keyword: str, index: int):
    """Item ``index`` of sequence ``keyword`` in ``ds``, or None (absent, empty, short)."""
    try:
        seq = ds.get(keyword)
        return seq[index] if seq is not None and len(seq) > index else None
    except Exception:  # noqa: BLE001 - a malformed sequence is treated as absent
        return None


def _decoder_reason(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # pydicom lists one line per plugin after a heading; keep them short and together.
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return "; ".join(lines[:3])[:300]


def to_display(arr: np.ndarray, ds, options: ImageOptions, name: str):
    """Map decoded pixel values to float32 [0, 1] display values, (H, W, C)."""
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
        if rgb.ndim != arr.ndim + 1 or rgb.shape[-1] != 3:
            raise DicomDecodeError(
                name, f"PALETTE COLOR lookup table is unusable (it maps to {rgb.shape[-1]} "
                "colour channels, not 3: a LUT Data element is empty or damaged)",
                kind="corrupt_header")
        top = 255.0 if rgb.dtype == np.uint8 else 65535.0
        img = rgb.astype(np.float32) / top
        info["window_source"] = "palette"
    elif arr.ndim == 3 or photometric.startswith(("RGB", "YBR")):
        bits = int(ds.get("BitsStored", 8) or 8)
        img = arr.astype(np.float32) / float(2**bits - 1)
        info["window_source"] = "colour (full range)"
    else:
        values, note = _modality(arr, ds)
        if note:
            info["modality_lut"] = note
        img, window_info = _window(values, ds, options)
        info.update(window_info)
        if photometric == "MONOCHROME1":
            img = 1.0 - img
            info["inverted"] = True
        img = img[..., None]
    img = np.clip(img, 0.0, 1.0, out=img if img.dtype == np.float32 else None)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise DicomDecodeError(name, f"decoded to an image of shape {list(img.shape)}, not "
                               "(rows, columns, 1 or 3): the header does not match the pixel "
                               "data", kind="corrupt_header")
    return img, info


def lut_problem(item) -> str | None:
    """Why a Modality/VOI LUT Sequence item cannot be applied, or None when it can.

    PS3.3 C.11.1 / C.11.2: LUT Descriptor is (entries, first mapped value, bits per entry)
    with 0 entries meaning 65536, and LUT Data holds that many entries.
    """
    if item is None or not len(item):
        return "its item is empty (no LUT Descriptor, no LUT Data)"
    desc, data = item.get("LUTDescriptor"), item.get("LUTData")
    if desc is None or data is None:
        missing = " and ".join(k for k, v in (("LUT Descriptor", desc), ("LUT Data", data))
                               if v is None)
        return f"its item has no {missing}"
    try:
        entries, _first, bits = (int(v) for v in desc)
    except (TypeError, ValueError):
        return f"LUT Descriptor {desc!r} is not three numbers"
    entries = entries or 65536
    if not 1 <= bits <= 16:
        return f"LUT Descriptor gives {bits} bits per entry (1-16 allowed)"
    have = len(data) // 2 if isinstance(data, (bytes, bytearray)) else len(data)
    if have < entries:
        return f"LUT Data has {have} entries but the descriptor announces {entries}"
    return None


def _modality(arr, ds):
    """Stored values -> modality values (e.g. HU) as float32, plus a note when a Modality
    LUT Sequence had to be ignored.

    The common Rescale Slope/Intercept case is done in float32 here (pydicom's
    ``apply_modality_lut`` works in float64, twice the memory traffic); a usable Modality
    LUT Sequence goes through pydicom.  An empty or malformed one falls back to the rescale
    (or identity), with the reason in the note, instead of crashing.
    """
    note = None
    if "ModalityLUTSequence" in ds:
        seq = ds.get("ModalityLUTSequence")
        problem = lut_problem(seq[0] if seq else None)
        if problem is None:
            try:
                return apply_modality_lut(arr, ds).astype(np.float32), None
            except Exception as exc:  # noqa: BLE001 - a LUT pydicom cannot apply
                problem = f"pydicom cannot apply it ({type(exc).__name__}: {_first_line(exc)})"
        used = ("Rescale Slope/Intercept" if "RescaleSlope" in ds or "RescaleIntercept" in ds
                else "stored values")
        note = f"Modality LUT Sequence ignored: {problem}; used {used}"
    values = arr.astype(np.float32)
    slope = _number(ds.get("RescaleSlope", 1), 1.0) or 1.0
    intercept = _number(ds.get("RescaleIntercept", 0), 0.0)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values, note


def _number(value, default: float) -> float:
    try:
        v = float(value[0] if _is_multi(value) else value)
    except (TypeError, ValueError, IndexError):
        return default
    return v if np.isfinite(v) else default


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


#: A fixed window (header, preset or explicit) covering less than this fraction of the
#: decoded values' range (min..max) gets a warning: the image renders nearly flat.
MIN_WINDOW_COVERAGE = 0.01


def window_coverage_warning(values: np.ndarray, c: float, w: float, source: str):
    """A warning when the window ``c``/``w`` covers less than
    :data:`MIN_WINDOW_COVERAGE` of the range of ``values``, else None.

    A header window that misses the pixels (e.g. a DX whose Window Center/Width 2725/5310
    was written for other stored values than its 32744..65535) renders an all-white or
    all-black image that is still used; the warning reaches the image's meta and the
    audit report."""
    vmin, vmax = float(np.min(values)), float(np.max(values))
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmax <= vmin:
        return None
    lo, hi = c - w / 2.0, c + w / 2.0
    covered = max(0.0, min(hi, vmax) - max(lo, vmin)) / (vmax - vmin)
    if covered >= MIN_WINDOW_COVERAGE:
        return None
    side = ("every value is above it, so the image is white" if vmin >= hi else
            "every value is below it, so the image is black" if vmax <= lo else
            "nearly every value is outside it, so the image is nearly flat")
    return (f"the {source} window (center {c:g}, width {w:g}: {lo:g}..{hi:g}) covers "
            f"{covered:.1%} of the pixel values' range {vmin:g}..{vmax:g} (under "
            f"{MIN_WINDOW_COVERAGE:.0%}): {side} (before any MONOCHROME1 inversion); use "
            "window: percentile or minmax, or fix the file's window")


def _add_warning(info: dict, warning: str | None) -> dict:
    if warning:
        info["warning"] = f"{info['warning']}; {warning}" if info.get("warning") else warning
    return info


def _window(values: np.ndarray, ds, options: ImageOptions):
    window = options.window
    if isinstance(window, tuple):
        c, w = window
        return _linear(values, c, w), _add_warning(
            {"window": [c, w], "window_source": "explicit"},
            window_coverage_warning(values, c, w, "explicit"))
    if window in WINDOW_PRESETS:
        c, w = WINDOW_PRESETS[window]
        info = {"window": [c, w], "window_source": f"preset {window}"}
        if str(ds.get("Modality", "")).upper() not in ("CT", ""):
            info["warning"] = (
                f"window preset {window!r} is in Hounsfield units but Modality is "
                f"{ds.get('Modality')}; use window: header or percentile"
            )
        _add_warning(info, window_coverage_warning(values, c, w, f"preset {window!r}"))
        return _linear(values, c, w), info
    if window == "header":
        header = _header_window(ds)
        if header is not None:
            c, w, func = header
            fn = _sigmoid if func == "SIGMOID" else (
                _linear_exact if func == "LINEAR_EXACT" else _linear)
            return fn(values, c, w), _add_warning(
                {"window": [c, w], "window_source": f"header {func}"},
                window_coverage_warning(values, c, w, "header"))
        reason = "no window in header"
        if "VOILUTSequence" in ds:
            seq = ds.get("VOILUTSequence")
            problem = lut_problem(seq[0] if seq else None)
            if problem is None:
                try:
                    # a VOI LUT is indexed by integer modality values
                    out = apply_voi(np.rint(values).astype(np.int32), ds).astype(np.float32)
                except Exception as exc:  # noqa: BLE001 - a LUT pydicom cannot apply
                    problem = (f"pydicom cannot apply it ({type(exc).__name__}: "
                               f"{_first_line(exc)})")
                else:
                    lo, hi = float(out.min()), float(out.max())
                    return _scale(out, lo, hi), {"window_source": "header VOI LUT"}
            reason = f"VOI LUT Sequence ignored: {problem}"
        lo, hi = np.percentile(values, options.percentiles)
        return _scale(values, lo, hi), {
            "window": _cw(lo, hi), "window_source": f"percentile ({reason})"}
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
        try:
            if key not in ds:
                continue
            value = ds.get(key)
        except Exception:  # noqa: BLE001 - a damaged optional field is shown as such
            out[key] = "(unreadable)"
            continue
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


#: Header fields that group a split when PatientID is empty, broadest first: images of one
#: study, one frame of reference (one scanner set-up) or one series are one patient's.
GROUP_UIDS = ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesInstanceUID")


def patient_key(ds) -> str | None:
    """The key that groups splits, kept in memory only (never logged or written):
    PatientID, else (anonymised exports often blank it) the first of :data:`GROUP_UIDS`
    present, prefixed with its field so keys of different kinds never collide.  None when
    all are absent or unreadable (a damaged element)."""
    for field in ("PatientID", *GROUP_UIDS):
        try:
            with quiet_pydicom():
                value = ds.get(field)
        except Exception:  # noqa: BLE001 - a corrupt element groups nothing
            continue
        if value:
            return str(value) if field == "PatientID" else f"{field}:{value}"
    return None


def identifying_values(ds) -> list[str]:
    """The identifying strings of a dataset (for tests that check nothing leaks)."""
    return [str(ds.get(k)) for k in _IDENTIFYING if ds.get(k)]
