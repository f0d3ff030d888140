"""Seeded fuzzing of the whole data path over real DICOM and JPEG files (issue 14).

Each file of the corpus (real DICOM files from the pydicom / pydicom-data wheels; real
brain-tumour MRI and OCT JPEGs from ``$KMEDTL_DATASETS``) is mutated ``PER_FILE`` times:
truncation at a random offset, flipped bytes in the header or in the pixel data, a wrong
VR (DICOM) or marker type (JPEG) on a real element or segment, and a zero-length element
or segment.  The mutants go through what ``kmedtl data audit`` runs (folder index with
``frames: all``, DICOM patient lookup, the process-pool decode + hash pass), and the test
proves, for every one of them:

- no uncaught exception (a non-``DataError`` in a worker would be a skip of kind
  ``unexpected``; in the main process it would fail the test),
- ``read = used + skipped``, and
- every skip carries a named reason kind and a reason.

The seed is fixed (``SEED``): a failure names the source file and the mutation, so it can
be replayed.  ``KMEDTL_FUZZ_ROUNDS`` multiplies the mutations for a longer local run.
"""

from __future__ import annotations

import io
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import dicom_file

from kmedtl.data.audit import audit, dicom_patients
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import index_folder

SEED = 14
PER_FILE = 20 * int(os.environ.get("KMEDTL_FUZZ_ROUNDS", "1"))
DICOM_CORPUS = (
    "CT_small.dcm",  # explicit VR LE, CT with rescale
    "MR_small.dcm",
    "MR_small_RLE.dcm",  # RLE Lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "MR_small_jp2klossless.dcm",  # JPEG 2000
    "JPEG-LL.dcm",  # JPEG Lossless SV1, 16-bit signed
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR colour
    "eCT_Supplemental.dcm",  # Enhanced CT, functional groups, 2 frames
    "emri_small.dcm",  # multi-frame MR, 10 frames
    "mlut_18.dcm",  # Modality LUT Sequence
    "OBXXXX1A.dcm",  # PALETTE COLOR
    "rtplan.dcm",  # implicit VR, no pixel data
)
JPEG_CORPUS = (
    ("brain-tumor-mri/Training/glioma_tumor", 2),
    ("brain-tumor-mri/Testing/no_tumor", 1),
    ("kermany-oct2017-test/DME", 1),
)
#: Long-form VRs of explicit VR encoding: 2 reserved bytes and a 4-byte length.
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
OTHER_VRS = [b"US", b"UL", b"SS", b"DS", b"IS", b"CS", b"UI", b"SQ", b"OB", b"OW", b"UN",
             b"AT", b"FD", b"LO", b"XX"]
#: Kinds that mean "an exception nobody classified": none may appear.
UNNAMED = {"unexpected", "data_error", "decode_error", "", None}


# ---------------------------------------------------------------------------- DICOM layout
def dicom_elements(data: bytes) -> tuple[list[tuple], int | None]:
    """Top-level elements of a DICOM file as ``(tag, vr, header_offset, value_offset,
    length, explicit)`` (read with pydicom's own element generator) and the offset of the
    pixel data value (None without one)."""
    import pydicom
    from pydicom.filereader import data_element_generator

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    implicit, little = ds.original_encoding
    fp = io.BytesIO(data)
    fp.seek(132)

    def walk(explicit, little, stop_when=None):
        gen = data_element_generator(fp, not explicit, little, stop_when=stop_when)
        while True:
            at = fp.tell()
            try:
                e = next(gen)
            except StopIteration:
                return
            vr = e.VR if explicit else None
            value = at + (12 if explicit and vr in LONG_VRS else 8)
            undefined = getattr(e, "is_undefined_length", False) or e.length == 0xFFFFFFFF \
                if hasattr(e, "length") else getattr(e, "is_undefined_length", False)
            length = 0xFFFFFFFF if undefined else fp.tell() - value
            out.append((int(e.tag), vr, at, value, length, explicit))

    out: list[tuple] = []
    walk(True, True, stop_when=lambda t, vr, n: t.group != 2)
    walk(not implicit, bool(little))
    pixels = next((v for t, _, _, v, _, _ in out if t == 0x7FE00010), None)
    return out, pixels


def mutate_dicom(data: bytes, rng) -> tuple[bytes, str]:
    elements, pixels = dicom_elements(data)
    pixels = pixels or len(data)
    kind = rng.choice(["truncate", "flip_header", "flip_pixels", "wrong_vr", "zero_length"])
    if kind == "flip_pixels" and pixels >= len(data) - 1:
        kind = "flip_header"
    out = bytearray(data)
    if kind == "truncate":
        at = int(rng.integers(1, len(data)))
        return bytes(out[:at]), f"truncate at {at}"
    if kind in ("flip_header", "flip_pixels"):
        lo, hi = (132, pixels) if kind == "flip_header" else (pixels, len(data))
        where = sorted(int(x) for x in rng.integers(lo, hi, int(rng.integers(1, 9))))
        for at in where:
            out[at] ^= int(rng.integers(1, 256))
        return bytes(out), f"{kind} at {where}"
    if kind == "wrong_vr":
        explicit = [e for e in elements if e[5]]
        tag, vr, head, _, _, _ = explicit[int(rng.integers(len(explicit)))]
        new = OTHER_VRS[int(rng.integers(len(OTHER_VRS)))]
        if new == vr.encode():
            new = b"UN" if vr != "UN" else b"OB"
        out[head + 4:head + 6] = new
        return bytes(out), f"wrong VR {vr}->{new.decode()} on ({tag >> 16:04X},{tag & 0xFFFF:04X})"
    defined = [e for e in elements if e[4] not in (0, 0xFFFFFFFF)]
    tag, vr, head, value, length, explicit = defined[int(rng.integers(len(defined)))]
    if explicit and vr not in LONG_VRS:
        out[head + 6:head + 8] = b"\x00\x00"
    else:
        out[value - 4:value] = b"\x00\x00\x00\x00"
    del out[value:value + length]
    return bytes(out), f"zero-length ({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr}"


# ---------------------------------------------------------------------------- JPEG layout
def jpeg_segments(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """Marker segments before the scan data as ``(offset, marker, length)`` and the offset
    where the entropy-coded data starts."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        out.append((i, marker, length))
        i += 2 + length
        if marker == 0xDA:
            break
    return out, i


def mutate_jpeg(data: bytes, rng) -> tuple[bytes, str]:
    segments, scan = jpeg_segments(data)
    kind = rng.choice(["truncate", "flip_header", "flip_pixels", "wrong_marker", "zero_length"])
    out = bytearray(data)
    if kind == "truncate":
        at = int(rng.integers(1, len(data)))
        return bytes(out[:at]), f"truncate at {at}"
    if kind in ("flip_header", "flip_pixels"):
        lo, hi = (2, scan) if kind == "flip_header" else (scan, len(data) - 2)
        where = sorted(int(x) for x in rng.integers(lo, hi, int(rng.integers(1, 9))))
        for at in where:
            out[at] ^= int(rng.integers(1, 256))
        return bytes(out), f"{kind} at {where}"
    at, marker, length = segments[int(rng.integers(len(segments)))]
    if kind == "wrong_marker":
        new = int(rng.choice([0xC0, 0xC2, 0xC4, 0xDB, 0xDD, 0xE1, 0xFE, 0xD9, 0x01]))
        out[at + 1] = new if new != marker else 0xFE
        return bytes(out), f"marker {marker:02X}->{out[at + 1]:02X} at {at}"
    out[at + 2:at + 4] = b"\x00\x02"
    del out[at + 4:at + 2 + length]
    return bytes(out), f"zero-length segment {marker:02X} at {at}"


# ---------------------------------------------------------------------------- the test
def corpus(datasets_dir: Path) -> list[tuple[str, bytes, str]]:
    items = [(name, dicom_file(name).read_bytes(), "dicom") for name in DICOM_CORPUS]
    for folder, n in JPEG_CORPUS:
        files = sorted((datasets_dir / folder).iterdir())[:n]
        assert files, f"{folder}: no JPEGs"
        items += [(f"{Path(folder).parts[0]}/{f.name}", f.read_bytes(), "jpeg") for f in files]
    return items


def write_mutants(root: Path, items, rng) -> dict[str, str]:
    """``root/<source kind>/<n>_<name>``: every mutant; returns path -> what was done."""
    done = {}
    n = 0
    for name, data, kind in items:
        mutate = mutate_dicom if kind == "dicom" else mutate_jpeg
        for _ in range(PER_FILE):
            blob, what = mutate(data, rng)
            suffix = ".dcm" if kind == "dicom" else ".jpg"
            path = root / kind / f"{n:04d}_{Path(name).stem}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            done[str(path)] = f"{name}: {what}"
            n += 1
    return done


@pytest.mark.integration
@pytest.mark.slow
def test_fuzzed_dicom_and_jpeg_never_crash_and_always_reconcile(datasets_dir, tmp_path):
    rng = np.random.default_rng(SEED)
    items = corpus(datasets_dir)
    root = tmp_path / "fuzz"
    done = write_mutants(root, items, rng)
    assert len(done) == len(items) * PER_FILE >= 300

    options = ImageOptions(size=32, frames="all")
    index = index_folder(root, None, options)  # main process: headers of every DICOM
    patients = dicom_patients(index)  # main process: PatientID of every DICOM
    report = audit(index, options, workers=2, progress=False, patients=patients)

    c = report["counts"]
    assert c["read"] == len(done) == c["used"] + c["skipped"], c
    unnamed = [(s["path"], s["kind"], s["reason"], done.get(str(root / s["path"])))
               for s in report["skipped"] if s["kind"] in UNNAMED or not s["reason"].strip()]
    assert not unnamed, "skips without a named reason:\n" + "\n".join(map(str, unnamed))
    crashed = [done.get(str(root / s["path"])) for s in report["skipped"]
               if s["kind"] == "worker_crashed"]
    assert not crashed, f"a codec crashed its worker on: {crashed}"
    kinds = Counter(s["kind"] for s in report["skipped"])
    # the mutations do break files, and the untouched-enough ones still decode
    assert c["skipped"] > len(done) // 4 and c["used"] > len(done) // 4, (c, kinds)
    print(f"fuzz: {len(done)} mutants, used {c['used']}, skipped {c['skipped']}: "
          f"{dict(kinds.most_common())}")
