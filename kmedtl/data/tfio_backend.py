"""Optional DICOM decoder on tensorflow-io (``decoder: tfio``): DCMTK inside a TensorFlow op.

The default decoder is pydicom (:mod:`kmedtl.data.dicom`).  This backend decodes the file
bytes with ``tfio.image.decode_dicom_image`` (DCMTK, an in-graph op, so it can run inside
``tf.data``) and reads the header with ``tfio.image.decode_dicom_data``, then maps pixels
to float32 [0, 1] with the *same* code as the pydicom backend (``dicom.to_display``:
modality rescale, window, MONOCHROME1 inversion), so the two agree pixel for pixel.

Availability.  tensorflow-io 0.37.1 is the last release; its ``libtensorflow_io.so`` is
built against TensorFlow 2.17 and fails to load with an undefined symbol on TensorFlow
>= 2.18 (kmedtl pins 2.21).  :func:`require` raises ``BackendUnavailableError`` saying so
and what to do; ``.ci/tfio.sh`` runs this backend's tests in a TF 2.17 environment.

What DCMTK returns, and how we undo it.  ``IO>DecodeDICOMImage`` does not return stored
values: it returns DCMTK's *rendered* output (``DicomImage::getOutputData`` at the image's
internal bit depth ``d``).  For monochrome images DCMTK applies the modality transform
(rescale slope/intercept or a modality LUT), then, no VOI window being set, maps the whole
theoretical value range ``[absmin, absmax]`` linearly onto ``[0, 2**d - 1]``, reversed for
MONOCHROME1.  ``absmin``/``absmax`` follow from Bits Stored, Pixel Representation and the
rescale; ``d`` is the number of bits that range needs.  That depth is why the op's default
``dtype=tf.uint16`` gives an *empty* tensor for signed 16-bit data with a rescale intercept
(pydicom's ``CT_small.dcm``: 17 bits, refused by the op's ``on_error='skip'``): we ask for
``tf.uint32``.  :func:`_stored_values` inverts the map (exactly for integer rescales, to
the nearest stored value otherwise) and hands stored values to ``dicom.to_display``.
Colour images come back as RGB at Bits Stored depth (YBR converted, palettes applied at
the LUT's depth).

Where the two backends would differ, this one refuses (``DicomDecodeError`` naming the
file and pointing to ``decoder: pydicom``): files DCMTK cannot render (tfio returns no
pixels: e.g. 32-bit RGB, YBR_ICT/YBR_RCT JPEG 2000, some 16-bit palettes), overlay planes
(DCMTK burns them in), 32-bit Explicit VR Big Endian (DCMTK swaps the 16-bit halves), a
VOI LUT Sequence that ``window: header`` would need (the op cannot read sequences), and
truncated uncompressed pixel data (DCMTK zero-fills it; pydicom refuses it too).  What
remains: MONOCHROME1 loses one stored value to a tie (<= 1 stored unit on the pixels of
that value), and lossy JPEG / YBR colour conversion round differently from pydicom's
decoders (a few 1/255 steps).  Multi-frame files are decoded whole for each frame asked.

TensorFlow and tensorflow-io are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import functools
import warnings
from importlib import metadata

import numpy as np

from kmedtl.data import dicom
from kmedtl.data.options import ImageOptions
from kmedtl.errors import BackendUnavailableError, DataError, DicomDecodeError

TFIO_VERSION = "0.37.1"
#: Newest TensorFlow (major, minor) that tensorflow-io 0.37.1 loads with.
MAX_TF = (2, 17)

_FIX = (
    f"tensorflow-io {TFIO_VERSION} loads only with TensorFlow <= {MAX_TF[0]}.{MAX_TF[1]}; "
    "use decoder: pydicom (default), or a separate environment with "
    f"tensorflow==2.17.* tensorflow-io=={TFIO_VERSION} (see .ci/tfio.sh)"
)
_USE_PYDICOM = "use decoder: pydicom"

#: Header fields read with ``decode_dicom_data`` (tag numbers as group << 16 | element).
#: No patient identifiers.
_TAGS = {
    "TransferSyntaxUID": 0x00020010,
    "SOPClassUID": 0x00080016,
    "Modality": 0x00080060,
    "SegmentationType": 0x00620001,
    "SamplesPerPixel": 0x00280002,
    "PhotometricInterpretation": 0x00280004,
    "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "PixelRepresentation": 0x00280103,
    "WindowCenter": 0x00281050,
    "WindowWidth": 0x00281051,
    "RescaleIntercept": 0x00281052,
    "RescaleSlope": 0x00281053,
    "VOILUTFunction": 0x00281056,
    "RedPaletteColorLookupTableDescriptor": 0x00281101,
    # Overlay Rows of the 16 overlay groups 6000..601E: DCMTK burns overlays into its output.
    **{f"OverlayRows{g:02X}": 0x60000010 + (g << 16) for g in range(0, 0x20, 2)},
}
_TAG_NAMES = tuple(_TAGS)
_INTS = ("SamplesPerPixel", "NumberOfFrames", "Rows", "Columns", "BitsAllocated",
         "BitsStored", "PixelRepresentation")
_FLOATS = ("WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope")
_MULTI = ("WindowCenter", "WindowWidth")  # kept as lists, like pydicom's MultiValue
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")

#: Sequences cannot be read with ``decode_dicom_data`` (the op fails on them), so their
#: presence is found in the bytes before the pixel data: (little-endian, big-endian) tag.
_PIXEL_DATA_TAG = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
_MODALITY_LUT_SEQ = (b"\x28\x00\x00\x30", b"\x00\x28\x30\x00")
_VOI_LUT_SEQ = (b"\x28\x00\x10\x30", b"\x00\x28\x30\x10")
_SEGMENT_SEQ = (b"\x62\x00\x02\x00", b"\x00\x62\x00\x02")
#: Shared / Per-frame Functional Groups Sequence: Enhanced objects keep rescale and window
#: there (see ``dicom.apply_functional_groups``), out of the op's reach.
_FUNCTIONAL_GROUPS_SEQ = (b"\x00\x52\x29\x92", b"\x52\x00\x92\x29",
                          b"\x00\x52\x30\x92", b"\x52\x00\x92\x30")


# --------------------------------------------------------------------------- availability

def _tf_version() -> str | None:
    """Installed TensorFlow version, from package metadata (no import)."""
    for dist in ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel",
                 "tensorflow-macos", "tf-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _version_tuple(version: str) -> tuple[int, int]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def _describe(exc: BaseException) -> str:
    """``Type: first line`` of an exception, plus the undefined symbol when there is one."""
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    out = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    marker = "undefined symbol:"
    if marker in text and marker not in first:
        symbol = text.split(marker, 1)[1].split()[0].strip("'\"[]")
        out += f" ({marker} {symbol[:80]}{'...' if len(symbol) > 80 else ''})"
    return out


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    tf_version = _tf_version()
    try:
        with warnings.catch_warnings():
            # tensorflow_io warns (rather than fails) when its plugins do not load, and
            # loads its op library lazily: touching an op forces the load here.
            warnings.simplefilter("ignore")
            # lazy: tensorflow-io is an optional extra (pip install 'kmedtl[tfio]'); probed here
            import tensorflow_io  # noqa: F401
            from tensorflow_io.python.ops import core_ops  # lazy: the tfio extra, as above

            core_ops.io_decode_dicom_image  # noqa: B018 - attribute access loads the .so
            import tensorflow as tf  # lazy: keeps `kmedtl data` (decode imports this) TF-free
        tf_version = tf.__version__
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        on = f"TensorFlow {tf_version}" if tf_version else "TensorFlow not installed"
        return False, (
            f"decoder 'tfio' needs tensorflow-io, which cannot be loaded here "
            f"({_describe(exc)}; {on}). {_FIX}"
        )
    if _version_tuple(tf_version) > MAX_TF:
        return False, (
            f"decoder 'tfio': tensorflow-io imported, but TensorFlow {tf_version} is newer "
            f"than {MAX_TF[0]}.{MAX_TF[1]}. {_FIX}"
        )
    try:
        tfio_version = metadata.version("tensorflow-io")
    except metadata.PackageNotFoundError:
        tfio_version = "?"
    return True, f"tensorflow-io {tfio_version} on TensorFlow {tf_version}"


def available() -> tuple[bool, str]:
    """``(True, versions)`` when the tfio backend works here, else ``(False, reason)``.

    The reason names tensorflow-io, the TensorFlow version, why it failed and the fix.
    Probes once per process (it imports TensorFlow).
    """
    return _probe()


def require() -> None:
    """Raise ``BackendUnavailableError`` (with the reason and the fix) unless usable."""
    ok, reason = _probe()
    if not ok:
        raise BackendUnavailableError(reason)


# --------------------------------------------------------------------------- header

class _Header(dict):
    """Header fields from ``decode_dicom_data``, readable like a pydicom ``Dataset`` by
    the shared display code (``ds.get(k)``, ``k in ds``, ``ds.WindowCenter``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


_US_FIELDS = ("SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored",
              "PixelRepresentation")


def _un_value(data: bytes, key: str, text: str) -> str:
    """Decode a field that the file stores with VR UN (explicit VR, unknown): DCMTK then
    returns its bytes as hex (``'43\\54'`` for ``'CT'``).  Other fields pass through."""
    tag = _TAGS[key]
    group, element = tag >> 16, tag & 0xFFFF
    marker = group.to_bytes(2, "little") + element.to_bytes(2, "little") + b"UN"
    if marker not in data[:_pixel_data_offset(data)]:
        return text
    try:
        raw = bytes(int(tok, 16) for tok in text.split("\\"))
    except ValueError:
        return text
    if key in _US_FIELDS:
        return str(int.from_bytes(raw[:2], "little"))
    return raw.decode("ascii", "replace")


def _parse_header(values, name, data: bytes = b"") -> _Header:
    """Typed fields from the op's strings; empty (absent) fields are left out."""
    header = _Header()
    for key, raw in zip(_TAG_NAMES, values):
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
        text = text.strip().strip("\x00").strip()
        if not text:
            continue
        if data and not key.startswith("OverlayRows"):
            text = _un_value(data, key, text).strip().strip("\x00").strip()
        if key in _INTS or key in _FLOATS:
            try:
                numbers = [float(v) for v in text.split("\\") if v.strip()]
            except ValueError:
                if key in ("Rows", "Columns", "BitsStored"):
                    raise DicomDecodeError(name, f"invalid {key} {text!r} in the image header",
                                           kind="corrupt_header") from None
                continue
            if not numbers:
                continue
            if key in _MULTI and len(numbers) > 1:
                header[key] = numbers
            elif key in _INTS:
                header[key] = int(numbers[0])
            else:
                header[key] = numbers[0]
        elif key.startswith("OverlayRows"):
            header["overlays"] = header.get("overlays", 0) + 1
        elif key == "RedPaletteColorLookupTableDescriptor":
            header[key] = [v.strip() for v in text.split("\\")]
        else:
            header[key] = text
    return header


def _pixel_data_offset(data: bytes) -> int:
    """Offset of the first (7FE0,0010) tag, or ``len(data)``."""
    return min((i for i in (data.find(t) for t in _PIXEL_DATA_TAG) if i >= 0), default=len(data))


def _has_sequence(data: bytes, tags) -> bool:
    """Whether a (top-level) sequence tag occurs before the pixel data."""
    head = data[:_pixel_data_offset(data)]
    return any(t in head for t in tags)


def _check_header(header: _Header, data: bytes, options: ImageOptions, name: str) -> None:
    """Refuse what the pydicom backend refuses, before any pixel buffer is allocated."""
    if "Rows" not in header and "Columns" not in header:
        if not dicom.is_dicom_bytes(data[:132]):
            raise DicomDecodeError(name, "not a DICOM file (no 'DICM' marker and no image "
                                   "header); remove it or fix the file extension",
                                   kind="not_dicom")
        raise DicomDecodeError(
            name, "tensorflow-io found no image header (Rows/Columns): not an image, or a "
            f"dataset DCMTK cannot parse; {_USE_PYDICOM} to tell which", kind="no_pixel_data")
    if _has_sequence(data, _SEGMENT_SEQ):
        header["SegmentSequence"] = ()  # present; its items are not read (segment count 0)
    # DCMTK would render a segmentation's label masks as an image: refuse it as pydicom does.
    dicom.check_not_segmentation(header, name)
    dicom.check_dimensions(header, name, options.max_pixels)
    if header.get("TransferSyntaxUID") in _UNCOMPRESSED:
        # DCMTK zero-fills missing pixel bytes; pydicom refuses.  Refuse too.
        spp = header.get("SamplesPerPixel", 1) or 1
        if str(header.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422":
            spp = 2  # two chroma samples shared by each pair of pixels
        bits = header.get("BitsAllocated", 16) or 16
        need = header["Rows"] * header["Columns"] * dicom.n_frames(header) * spp * bits // 8
        have = len(data) - _pixel_data_offset(data) - 8  # at most: tag + length come first
        if have < need:
            raise DicomDecodeError(
                name, f"truncated pixel data: the header announces {need:,} bytes of pixels "
                f"but at most {max(have, 0):,} follow the pixel data tag; re-export or "
                "re-download it", kind="truncated")
    if (header.get("TransferSyntaxUID") == _UNCOMPRESSED[2]
            and (header.get("BitsAllocated") or 0) > 16):
        raise DicomDecodeError(
            name, "32-bit pixels in Explicit VR Big Endian, which DCMTK (tensorflow-io) "
            f"decodes with the 16-bit halves swapped; {_USE_PYDICOM}", kind="unsupported")
    if header.get("overlays"):
        raise DicomDecodeError(
            name, "the file has overlay planes, which DCMTK (tensorflow-io) burns into the "
            f"pixels; {_USE_PYDICOM}, which leaves them out", kind="unsupported")


# --------------------------------------------------------------------------- pixels

def _tobits(value: int, pos: int) -> int:
    if value > 0:
        value -= pos
    return max(int(value), 0).bit_length()


def _range_to_bits(lo: float, hi: float) -> int:
    """DCMTK's ``DicomImageClass::rangeToBits``: bits needed for values in [lo, hi]."""
    lo, hi = min(lo, hi), max(lo, hi)
    if lo < 0:
        if abs(lo) > abs(hi):
            return _tobits(int(abs(lo)), 1) + 1
        return _tobits(int(abs(hi)), 0) + 1
    return _tobits(int(hi), 0)


def _rescale(header: _Header):
    slope, intercept = header.get("RescaleSlope"), header.get("RescaleIntercept")
    if isinstance(slope, list):
        slope = slope[0]
    if isinstance(intercept, list):
        intercept = intercept[0]
    if slope is None or intercept is None or slope == 0:
        return None
    return float(slope), float(intercept)


def _dcmtk_range(header) -> tuple[int, int, tuple[float, float] | None, float, float, int]:
    """Stored range, rescale, and DCMTK's modality range ``[absmin, absmax]`` and depth."""
    bits = int(header.get("BitsStored") or header.get("BitsAllocated") or 16)
    signed = int(header.get("PixelRepresentation") or 0) == 1
    smin, smax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    rescale = _rescale(header)
    if rescale is not None:
        s, b = rescale
        absmin, absmax = sorted((smin * s + b, smax * s + b))
    else:
        absmin, absmax = float(smin), float(smax)
    return smin, smax, rescale, absmin, absmax, _range_to_bits(absmin, absmax)


def _stored_values(out: np.ndarray, header, monochrome1: bool) -> np.ndarray:
    """Invert DCMTK's no-VOI rendering of one monochrome frame back to stored values.

    DCMTK computes ``w = trunc(slope * p + intercept)`` (its integer intermediate), then
    ``out = trunc(low + (w - absmin) * g)`` with ``g = (high - low + 1) / (absmax - absmin
    + 1)``, ``low, high = 0, 2**d - 1`` (swapped for MONOCHROME1).  We estimate ``p``, try
    the stored values next to the estimate through that forward map and keep the one that
    reproduces ``out``: exact wherever the map is one-to-one (MONOCHROME2 with
    ``|slope| >= 1``); elsewhere (one pair of values per MONOCHROME1 image, slopes below 1)
    the nearest of the values sharing that output.
    """
    smin, smax, rescale, absmin, absmax, depth = _dcmtk_range(header)
    top = float(2**depth - 1)
    low = top if monochrome1 else 0.0
    gradient = ((0.0 if monochrome1 else top) - low + 1.0) / (absmax - absmin + 1.0)
    s, b = rescale if rescale is not None else (1.0, 0.0)

    def forward(p):
        w = np.trunc(p * s + b) if rescale is not None else p
        return np.trunc(low + (w - absmin) * gradient)

    def invert(x):
        estimate = ((x - low) / gradient + absmin - b) / s
        base = np.floor(estimate)
        best = np.clip(np.round(estimate), smin, smax)
        best_dist = np.full(x.shape, np.inf)
        for k in (-1.0, 0.0, 1.0, 2.0):
            cand = np.clip(base + k, smin, smax)
            dist = np.abs(cand - estimate)
            take = (forward(cand) == x) & (dist < best_dist)
            best = np.where(take, cand, best)
            best_dist = np.where(take, dist, best_dist)
        return best

    if depth <= 20:  # invert every possible output once, then look pixels up
        table = invert(np.arange(2**depth, dtype=np.float64)).astype(np.float32)
        index = out if np.issubdtype(out.dtype, np.integer) else out.astype(np.int64)
        return table[np.minimum(index, 2**depth - 1)]
    return invert(out.astype(np.float64))


def _render(pixels: np.ndarray, header: _Header, data: bytes, options: ImageOptions,
            name: str, frame: int | None):
    """tfio output (frames, H, W, C) -> float32 [0, 1] (H, W, C) and window info."""
    if pixels.size == 0:
        raise DicomDecodeError(
            name,
            "tensorflow-io returned no pixels (DCMTK could not decode or render this image: "
            f"{header.get('PhotometricInterpretation', '?')}, "
            f"{header.get('BitsStored', '?')} bits stored, transfer syntax "
            f"{header.get('TransferSyntaxUID', '?')}); {_USE_PYDICOM}",
            kind="tfio_no_pixels",
        )
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    mono = photometric.startswith("MONOCHROME")
    total = dicom.n_frames(header)
    expected = (total, header["Rows"], header["Columns"], 1 if mono else 3)
    if pixels.ndim != 4 or tuple(pixels.shape) != expected:
        raise DicomDecodeError(
            name,
            f"tensorflow-io returned no pixels matching the header: shape "
            f"{tuple(pixels.shape)}, header announces (frames, rows, columns, samples) = "
            f"{expected}; {_USE_PYDICOM}",
            kind="tfio_no_pixels",
        )
    index = frame if frame is not None else dicom.frame_indices(header, options.frames)[0]
    if not 0 <= index < total:
        raise DicomDecodeError(name, f"frame {index} requested but the file has {total}",
                               kind="bad_frame")
    arr = pixels[index]
    if photometric == "PALETTE COLOR":
        # DCMTK applied the palette; its output depth is the LUT's (descriptor value 3).
        descriptor = header.get("RedPaletteColorLookupTableDescriptor") or []
        try:
            lut_bits = int(float(descriptor[2]))
        except (IndexError, ValueError):
            lut_bits = 16 if arr.max() > 255 else 8
        top = 255.0 if lut_bits <= 8 else 65535.0
        img = np.clip(arr.astype(np.float32) / top, 0.0, 1.0)
        return img, {"window_source": "palette"}
    if not mono:
        return dicom.to_display(arr, header, options, name)
    if _has_sequence(data, _FUNCTIONAL_GROUPS_SEQ):
        raise DicomDecodeError(
            name, "an Enhanced (multi-frame) object keeps its rescale and window in the "
            f"Shared/Per-frame Functional Groups, which tensorflow-io cannot read; "
            f"{_USE_PYDICOM}", kind="unsupported")
    if _has_sequence(data, _MODALITY_LUT_SEQ):
        # DCMTK applied the modality LUT; its output range is [0, 2**bits - 1] at that
        # depth, so the output *is* the modality value.  Rescale is then ignored by both.
        values = arr[..., 0].astype(np.float64)
        header = _Header({k: v for k, v in header.items()
                          if k not in ("RescaleSlope", "RescaleIntercept")})
        if photometric == "MONOCHROME1":
            raise DicomDecodeError(
                name, f"MONOCHROME1 with a Modality LUT Sequence is not supported by the tfio "
                f"backend; {_USE_PYDICOM}", kind="unsupported")
    else:
        values = _stored_values(arr[..., 0], header, photometric == "MONOCHROME1")
    if (options.window == "header" and dicom._header_window(header) is None
            and _has_sequence(data, _VOI_LUT_SEQ)):
        raise DicomDecodeError(
            name, "the file's window is a VOI LUT Sequence, which tensorflow-io cannot read; "
            f"{_USE_PYDICOM}, or set an explicit window / percentile", kind="unsupported")
    return dicom.to_display(values, header, options, name)


# --------------------------------------------------------------------------- public API

def decode_dicom_tfio(data: bytes, options: ImageOptions, name: str,
                      frame: int | None = None) -> np.ndarray:
    """Decode one frame of a DICOM file with tensorflow-io: float32 [0, 1], (H, W, C).

    Same pixels as :func:`kmedtl.data.dicom.decode_dicom` (same rescale, window and
    MONOCHROME1 handling).  Raises ``BackendUnavailableError`` where tensorflow-io cannot
    load, ``DicomDecodeError`` naming ``name`` when the file cannot be used.

    >>> from kmedtl.data.options import ImageOptions
    >>> img = decode_dicom_tfio(open("scan.dcm", "rb").read(), ImageOptions(), "scan.dcm")
    ... # doctest: +SKIP
    """
    image, _ = decode_dicom_tfio_with_meta(data, options, name, frame)
    return image


def decode_dicom_tfio_with_meta(data: bytes, options: ImageOptions, name: str,
                                frame: int | None = None) -> tuple[np.ndarray, dict]:
    """Like :func:`decode_dicom_tfio`, also returning the window that was applied."""
    require()
    import tensorflow as tf  # lazy: keeps `kmedtl data` (decode imports this) TF-free
    import tensorflow_io as tfio  # lazy: an optional extra (pip install 'kmedtl[tfio]')

    if len(data) == 0:
        raise DicomDecodeError(name, "file is empty (0 bytes)", kind="zero_byte")
    contents = tf.constant(data, dtype=tf.string)
    try:
        values = tfio.image.decode_dicom_data(
            contents, tf.constant(list(_TAGS.values()), tf.uint32)).numpy()
    except tf.errors.OpError as exc:
        raise DicomDecodeError(name, f"tensorflow-io cannot read the header "
                               f"({_describe(exc)}); {_USE_PYDICOM}",
                               kind="corrupt_header") from None
    header = _parse_header(values, name, data)
    _check_header(header, data, options, name)
    pixels = tfio.image.decode_dicom_image(
        contents, color_dim=True, on_error="skip", scale="preserve", dtype=tf.uint32).numpy()
    image, info = _render(pixels, header, data, options, name, frame)
    return image.astype(np.float32, copy=False), info


def make_tfio_decode_fn(options: ImageOptions):
    """A function for ``tf.data`` ``map``: ``(contents, name="", frame=-1) -> (image, error)``.

    ``contents`` is a scalar ``tf.string`` of file bytes (``tf.io.read_file``).  The DCMTK
    decode runs in-graph; the display mapping then runs the shared numpy code through
    ``tf.numpy_function`` so the pixels equal the pydicom backend's.  ``image`` is float32
    ``(H, W, C)`` in [0, 1]; ``error`` is ``""`` or the reason (naming ``name``) the file
    cannot be used, with ``image`` then of shape ``(0, 0, 1)``: filter on it and record the
    reason, so a bad file is reported rather than crashing the pass.  Images whose header
    announces more than ``options.max_pixels`` are refused before decoding.  ``frame=-1``
    picks the frame from ``options.frames``.

    >>> fn = make_tfio_decode_fn(ImageOptions())                      # doctest: +SKIP
    >>> ds = tf.data.Dataset.from_tensor_slices(paths).map(
    ...     lambda p: fn(tf.io.read_file(p), p), num_parallel_calls=tf.data.AUTOTUNE)
    """
    require()
    import tensorflow as tf  # lazy: keeps `kmedtl data` (decode imports this) TF-free
    import tensorflow_io as tfio  # lazy: an optional extra (pip install 'kmedtl[tfio]')

    tags = tf.constant(list(_TAGS.values()), tf.uint32)
    i_rows, i_cols = _TAG_NAMES.index("Rows"), _TAG_NAMES.index("Columns")

    def _post(pixels, values, contents, name, frame):
        # Graph mode hands over bytes / numpy scalars, eager mode 0-d arrays: unwrap.
        contents, name, frame = (v.item() if isinstance(v, np.ndarray) else v
                                 for v in (contents, name, frame))
        name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        name = name or "<bytes>"
        frame = None if int(frame) < 0 else int(frame)
        try:
            header = _parse_header(list(values), name, contents)
            if len(contents) == 0:
                raise DicomDecodeError(name, "file is empty (0 bytes)", kind="zero_byte")
            _check_header(header, contents, options, name)
            image, _ = _render(pixels, header, contents, options, name, frame)
            return image.astype(np.float32, copy=False), b""
        except DataError as exc:
            message = str(exc)
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop the pass
            message = f"{name}: tensorflow-io backend failed ({_describe(exc)}); {_USE_PYDICOM}"
        return np.zeros((0, 0, 1), np.float32), message.encode("utf-8", "replace")

    def _dimension(text):
        text = tf.strings.strip(text)
        ok = tf.strings.regex_full_match(text, r"[0-9]{1,9}")
        return tf.where(ok, tf.strings.to_number(tf.where(ok, text, "0"), tf.int64),
                        tf.constant(0, tf.int64))

    def decode(contents, name="", frame=-1):
        contents = tf.convert_to_tensor(contents, tf.string)
        values = tfio.image.decode_dicom_data(contents, tags)
        n_pixels = _dimension(values[i_rows]) * _dimension(values[i_cols])
        # Refuse absurd headers before DCMTK allocates anything (_post says why); 0 is
        # "not readable here" (absent, or stored as UN), which _post sorts out.
        pixels = tf.cond(
            n_pixels <= options.max_pixels,
            lambda: tfio.image.decode_dicom_image(
                contents, color_dim=True, on_error="skip", scale="preserve", dtype=tf.uint32),
            lambda: tf.zeros([0], tf.uint32),
        )
        image, error = tf.numpy_function(
            _post, [pixels, values, contents, tf.convert_to_tensor(name, tf.string),
                    tf.convert_to_tensor(frame, tf.int64)],
            [tf.float32, tf.string], stateful=False)
        image.set_shape([None, None, None])
        error.set_shape([])
        return image, error

    return decode


__all__ = ["available", "decode_dicom_tfio", "decode_dicom_tfio_with_meta",
           "make_tfio_decode_fn", "require"]
