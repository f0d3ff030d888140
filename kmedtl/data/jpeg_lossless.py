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


def _markers(frame: bytes) -> dict:
    """Frame header, Huffman tables, restart interval, scan header and the entropy-coded
    segments (byte-unstuffed, split at restart markers) of a single-scan lossless JPEG."""
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
