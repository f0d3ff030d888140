"""Detect damaged entropy-coded data in lossless JPEG (process 14) DICOM frames.

A lossless JPEG stream whose Huffman-coded data is damaged still decodes: the codec
(pylibjpeg-libjpeg) reports no error and no warning and returns an image of garbage of
the right size, so the file would be counted as *used*.  The damage can be proved after
the fact, cheaply and without a second decode: lossless JPEG coding is deterministic, so
re-encoding the decoded samples with the stream's own predictor, point transform and
Huffman tables must give exactly as many bits as the stream holds (T.81 Annex H).  An
intact stream matches to the byte; a desynchronised one (flipped or zeroed bytes) almost
never does, because the decoder consumed bits as codes of the wrong length.

This is written here because neither pydicom nor pylibjpeg expose the information: the
codec returns only pixels, and pydicom's JPEG helpers (``pydicom.pixels.utils``) read the
frame header (precision, size) but not the Huffman tables, restart interval or predictor.
The check is vectorised numpy (a few milliseconds for a 512x512 frame).  Streams it does
not cover (hierarchical, several scans, subsampled components, restart intervals that do
not span whole lines) return ``None``: "not checked", never "corrupt".

An intact stream can still decode to garbage: :func:`predictor6_overflow` recognises
the streams of encoders that computed selection value 6 with a 16-bit overflow (such as
pylibjpeg-data's ``JPEGLossless_1s_1f_i_16_16_bad.dcm``), which the byte count cannot
catch because every code in them is valid.
"""

from __future__ import annotations

import numpy as np

#: DICOM transfer syntaxes whose frames are lossless JPEG (process 14).
LOSSLESS_JPEG_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction
})


class _NotChecked(Exception):
    """The stream uses a feature this check does not model."""


def _markers(frame: bytes, segments: bool = True) -> dict:
    """Frame header, Huffman tables, restart interval, scan header and (with
    ``segments``) the entropy-coded segments (byte-unstuffed, split at restart markers) of
    a single-scan lossless JPEG."""
    data = memoryview(frame)
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise _NotChecked("no SOI marker")
    tables: dict[int, dict[int, int]] = {}
    info: dict = {"restart": 0, "tables": tables}
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise _NotChecked("marker expected")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        body = bytes(data[i + 4:i + 2 + length])
        if len(body) != length - 2:
            raise ValueError("a marker segment runs past the end of the frame")
        i += 2 + length
        if marker in (0xC0, 0xC1, 0xC2, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
                      0xDE):
            raise _NotChecked("not a non-hierarchical lossless Huffman stream")
        if marker == 0xC3:  # SOF3: P, Y, X, Nf, then (Ci, HiVi, Tqi) per component
            p, y, x, nf = body[0], int.from_bytes(body[1:3], "big"), \
                int.from_bytes(body[3:5], "big"), body[5]
            comps = [body[6 + 3 * k:9 + 3 * k] for k in range(nf)]
            if y == 0 or any(c[1] != 0x11 for c in comps):
                raise _NotChecked("DNL-defined height or subsampled components")
            info.update(precision=p, rows=y, cols=x, components=[c[0] for c in comps])
        elif marker == 0xC4:  # DHT: (TcTh, L1..L16, values) repeated
            k = 0
            while k < len(body):
                tc_th = body[k]
                counts = body[k + 1:k + 17]
                values = body[k + 17:k + 17 + sum(counts)]
                k += 17 + sum(counts)
                if tc_th >> 4 == 0:  # DC/lossless table
                    lengths, v = {}, 0
                    for bits, count in enumerate(counts, start=1):
                        for _ in range(count):
                            lengths[values[v]] = bits
                            v += 1
                    tables[tc_th & 0x0F] = lengths
        elif marker == 0xDD:  # DRI
            info["restart"] = int.from_bytes(body[0:2], "big")
        elif marker == 0xDA:  # SOS: Ns, (Cs, TdTa) per component, Ss, Se, AhAl
            ns = body[0]
            info["scan_tables"] = [body[2 + 2 * k] >> 4 for k in range(ns)]
            info["scan_components"] = [body[1 + 2 * k] for k in range(ns)]
            info["predictor"] = body[1 + 2 * ns]
            info["point_transform"] = body[3 + 2 * ns] & 0x0F
            if segments:
                info["segments"] = _entropy_segments(bytes(data[i:]))
            return info
    raise _NotChecked("no scan")


def _entropy_segments(rest: bytes) -> list[np.ndarray]:
    """The entropy-coded data after SOS up to the next non-restart marker, byte-unstuffed
    (``FF 00`` -> ``FF``), one array per restart interval."""
    b = np.frombuffer(rest, np.uint8)
    ff = np.flatnonzero(b[:-1] == 0xFF)
    nxt = b[ff + 1]
    # a marker: FF followed by neither 00 (stuffing) nor FF (fill)
    is_marker = (nxt != 0x00) & (nxt != 0xFF)
    is_rst = is_marker & (nxt >= 0xD0) & (nxt <= 0xD7)
    ends = ff[is_marker & ~is_rst]
    stop = int(ends[0]) if len(ends) else len(b)
    cuts = [int(c) for c in ff[is_rst] if c < stop]
    segments, start = [], 0
    for c in [*cuts, stop]:
        seg = b[start:c]
        f = np.flatnonzero(seg == 0xFF)
        after = np.append(seg, 0xFF)[f + 1]  # the byte after each FF (a marker follows)
        fill = f[after == 0xFF]  # fill bytes: FF before another FF
        stuffed = f[after == 0x00] + 1  # the 00 of a stuffed FF 00
        segments.append(np.delete(seg, np.concatenate([fill, stuffed])))
        start = c + 2
    return segments


def _predict(x: np.ndarray, predictor: int, first_value: int) -> np.ndarray:
    """Lossless prediction (T.81 H.1.2.1) for one component, rows x cols, int64."""
    ra = np.empty_like(x)
    ra[:, 1:] = x[:, :-1]
    rb = np.empty_like(x)
    rb[1:, :] = x[:-1, :]
    rc = np.empty_like(x)
    rc[1:, 1:] = x[:-1, :-1]
    if predictor == 1:
        pred = ra
    elif predictor == 2:
        pred = rb
    elif predictor == 3:
        pred = rc
    elif predictor == 4:
        pred = ra + rb - rc
    elif predictor == 5:
        pred = ra + ((rb - rc) >> 1)
    elif predictor == 6:
        pred = rb + ((ra - rc) >> 1)
    elif predictor == 7:
        pred = (ra + rb) >> 1
    else:
        raise _NotChecked(f"predictor {predictor}")
    pred = pred.copy()
    pred[0, 1:] = x[0, :-1]  # first line: left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: sample above
    pred[0, 0] = first_value
    return pred


def _bits(samples: np.ndarray, predictor: int, precision: int, pt: int,
          lengths: dict[int, int]) -> int:
    """Bits the Huffman coder spends on one component (rows x cols of P-bit samples)."""
    x = samples.astype(np.int64) >> pt
    pred = _predict(x, predictor, 1 << (precision - pt - 1))
    diff = (x - pred) & 0xFFFF
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff)
    mag = np.abs(diff)
    ssss = np.zeros(mag.shape, np.int64)
    nz = mag > 0
    ssss[nz] = np.floor(np.log2(mag[nz])).astype(np.int64) + 1
    ssss[mag == 0x8000] = 16
    counts = np.bincount(ssss.ravel(), minlength=17)
    total = 0
    for s, count in enumerate(counts.tolist()):
        if not count:
            continue
        if s not in lengths:
            raise ValueError(f"difference category {s} has no Huffman code")
        total += count * (lengths[s] + (s if s < 16 else 0))
    return total


def check_frame(frame: bytes, samples: np.ndarray) -> str | None:
    """``None`` when ``samples`` (the decoded frame, rows x cols [x components], with the
    stream's sample values) are consistent with the lossless JPEG ``frame``, else a short
    reason.  Streams outside what the check models return ``None``."""
    try:
        info = _markers(frame)
        if "precision" not in info or "segments" not in info:
            return None
        rows, cols, p = info["rows"], info["cols"], info["precision"]
        comps = info["components"]
        if info["scan_components"] != comps:
            raise _NotChecked("several scans")
        arr = np.asarray(samples)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape != (rows, cols, len(comps)):
            return (f"decoded frame is {list(arr.shape)} but the JPEG header announces "
                    f"{rows}x{cols}x{len(comps)}")
        raw = arr.astype(np.int64) & ((1 << p) - 1)
        restart = info["restart"]
        segments = info["segments"]
        if restart:
            if restart % cols:
                raise _NotChecked("restart interval is not whole lines")
            lines = restart // cols
            blocks = [(r, min(rows, r + lines)) for r in range(0, rows, lines)]
        else:
            blocks = [(0, rows)]
        if len(blocks) != len(segments):
            return (f"{len(segments)} restart interval(s) in the stream, "
                    f"{len(blocks)} expected from its header")
        for (r0, r1), seg in zip(blocks, segments):
            need = 0
            for c, td in enumerate(info["scan_tables"]):
                lengths = info["tables"].get(td)
                if lengths is None:
                    return f"scan uses Huffman table {td}, which the stream does not define"
                need += _bits(raw[r0:r1, :, c], info["predictor"], p,
                              info["point_transform"], lengths)
            have = len(seg)
            if (need + 7) // 8 != have:
                return (f"the entropy-coded data holds {have} bytes but the decoded samples "
                        f"re-encode to {need} bits ({(need + 7) // 8} bytes): the "
                        "compressed data is damaged")
        return None
    except _NotChecked:
        return None
    except ValueError as exc:
        return str(exc)


# ---------------------------------------------------------------------------- predictor 6
#: A decode that T.81 says is right is refused as an encoder's predictor-6 overflow only
#: when at least this fraction of neighbouring sample pairs jump by half the sample range
#: or more (an image of garbage), ...
OVERFLOW_MIN_JUMPS = 0.001
#: ... and the decode with the encoder's 16-bit arithmetic is this many times smoother
#: (mean absolute difference of neighbouring samples).
OVERFLOW_SMOOTHER = 4.0


def _wrap16(v: np.ndarray) -> np.ndarray:
    """Two's-complement 16-bit value of each int64 (what a C ``short`` holds)."""
    return ((v + 0x8000) & 0xFFFF) - 0x8000


def _predictor6_overflow_decode(x: np.ndarray) -> np.ndarray:
    """Re-decode one component block (rows x cols, unsigned 16-bit samples as T.81
    decodes them) as an encoder with the predictor-6 overflow bug meant it.

    Such an encoder computes ``Rb + ((Ra - Rc) >> 1)`` with ``Ra - Rc`` in 16-bit
    arithmetic, so where the difference overflows its prediction is off by 32768 from the
    standard's.  The difference values in the stream are the same for both readings
    (recovered from ``x`` with the standard predictor); only the prediction changes.  The
    first line and column are predicted by copying a neighbour, identical in both, so only
    the interior is re-decoded, one anti-diagonal at a time (each sample depends on its
    left, upper and upper-left neighbours: a diagonal's samples are independent).
    """
    rows, cols = x.shape
    diff = ((x - _predict(x, 6, 1 << 15)) & 0xFFFF).ravel()
    y = x.copy().ravel()
    for k in range(2, rows + cols - 1):
        r = np.arange(max(1, k - cols + 1), min(rows - 1, k - 1) + 1)
        idx = r * cols + (k - r)
        ra, rb, rc = y[idx - 1], y[idx - cols], y[idx - cols - 1]
        y[idx] = (rb + (_wrap16(ra - rc) >> 1) + diff[idx]) & 0xFFFF
    return y.reshape(rows, cols)


def _roughness(v: np.ndarray) -> tuple[float, float]:
    """(fraction of neighbouring pairs that differ by 32768 or more, mean absolute
    difference of neighbours), over rows and columns of a 2-D int64 array."""
    dx = np.abs(np.diff(v, axis=1))
    dy = np.abs(np.diff(v, axis=0))
    n = dx.size + dy.size
    if not n:
        return 0.0, 0.0
    jumps = int(np.count_nonzero(dx >= 0x8000)) + int(np.count_nonzero(dy >= 0x8000))
    return jumps / n, (float(dx.sum()) + float(dy.sum())) / n


def predictor6_overflow(frame: bytes, samples: np.ndarray) -> str | None:
    """A short reason when the lossless JPEG ``frame`` was written by an encoder with the
    *predictor-6 overflow* bug and ``samples`` (its standard decode) are therefore
    garbage; ``None`` when not (or not checked).

    Such a stream is intact: every Huffman code is valid and the entropy-coded data has
    exactly the length :func:`check_frame` expects, so the codec and the byte-count check
    both accept it.  Its encoder (16-bit samples, selection value 6) computed the
    prediction ``Rb + ((Ra - Rc) >> 1)`` with ``Ra - Rc`` overflowing 16 bits, against
    T.81 H.1.2.1; each overflow shifts a sample by half the range, and the error spreads
    through the later predictions.  pydicom-data's ``JPEGLossless_1s_1f_i_16_16_bad.dcm``
    is such a file (dcmtk reads it only with ``dcmdjpeg +w6``, its workaround for this
    bug, and our re-decode equals that output sample for sample).

    The check re-decodes the frame with the encoder's arithmetic and calls the stream
    non-conforming only when the standard decode is garbage (at least
    :data:`OVERFLOW_MIN_JUMPS` of neighbouring pairs jump by half the range) *and* the
    re-decode is :data:`OVERFLOW_SMOOTHER` times smoother: an image encoded correctly
    decodes smoothly the standard way, and its re-decode is the garbage one.  Smoothness
    is measured on the values as DICOM reads them (signed when ``samples`` is a signed
    array).  Only 16-bit, single-scan, selection-value-6 streams without point transform
    are checked (a 16-bit difference cannot overflow for fewer bits).
    """
    try:
        info = _markers(frame, segments=False)
        if info.get("predictor") != 6 or info.get("precision") != 16 or \
                info.get("point_transform") or info.get("scan_components") != \
                info.get("components"):
            return None
        rows, cols = info["rows"], info["cols"]
        arr = np.asarray(samples)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape != (rows, cols, len(info["components"])) or arr.dtype.kind not in "iu":
            return None
        raw = arr.astype(np.int64) & 0xFFFF
        signed = arr.dtype.kind == "i"
        restart = info["restart"]
        if restart and restart % cols:
            return None
        lines = restart // cols if restart else rows

        def as_read(v):
            return _wrap16(v) if signed else v

        std_jumps, std_rough = _roughness(as_read(raw[..., 0]))
        for c in range(1, raw.shape[-1]):
            j, m = _roughness(as_read(raw[..., c]))
            std_jumps, std_rough = max(std_jumps, j), max(std_rough, m)
        if std_jumps < OVERFLOW_MIN_JUMPS:
            return None  # the standard decode is not garbage: nothing to explain
        alt = np.empty_like(raw)
        for c in range(raw.shape[-1]):
            for r0 in range(0, rows, lines):  # prediction restarts with each interval
                alt[r0:r0 + lines, :, c] = _predictor6_overflow_decode(
                    raw[r0:r0 + lines, :, c])
        alt_jumps, alt_rough = 0.0, 0.0
        for c in range(alt.shape[-1]):
            j, m = _roughness(as_read(alt[..., c]))
            alt_jumps, alt_rough = max(alt_jumps, j), max(alt_rough, m)
        if alt_rough * OVERFLOW_SMOOTHER > std_rough or alt_jumps * 10 > std_jumps:
            return None
        return (f"its selection value 6 prediction (Rb + ((Ra - Rc) >> 1)) was computed "
                f"with a 16-bit overflow, against the JPEG standard (T.81 H.1.2.1): decoded "
                f"as the standard requires, {std_jumps:.1%} of neighbouring samples jump by "
                f"half the range (mean step {std_rough:,.0f}); decoded with the encoder's "
                f"overflow, {alt_jumps:.1%} (mean step {alt_rough:,.0f})")
    except (_NotChecked, ValueError, IndexError, KeyError):
        return None
