"""Hostile and misread DICOM files (issue 21, items 2 and 15): refused before they cost
memory, with a reason naming the limit, or read correctly.

- A codestream whose own frame header (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ) claims
  65500x65500 inside a 64x64 DICOM made the codec allocate gigabytes: refused before
  decoding (``too_large``, naming ``data.max_pixels``); a claim that merely disagrees with
  Rows/Columns/Samples per Pixel is ``codec_size_mismatch``.  Each decoded frame of a
  multi-frame file is checked on its own.
- A Deflated Explicit VR Little Endian file of a few hundred kB inflated to gigabytes in
  pydicom: it is now inflated chunk by chunk within a cap (the header's pixel data plus
  64 MiB, never above ``data.max_file_bytes``; Rows x Columns over ``data.max_pixels``
  refused at once).
- The real files of ``$KMEDTL_DATASETS/dicom-extra`` (pydicom's data repositories, MIT):
  the predictor-6 overflow ``_bad`` lossless JPEG, a Deflated Image Frame Compression
  file, a 1-bit segmentation, and a DX whose header window misses every pixel.

Every hostile file runs through ``kmedtl data audit`` in a subprocess capped at
:data:`RSS_MB` of resident memory (``tests/limits.py``); the hostile files share one
subprocess (one TensorFlow-free audit, a few seconds), so each test's RSS figure is the
peak over the whole batch.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import dicom_file
from limits import kmedtl as capped_kmedtl
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLossless,
    generate_uid,
)

from kmedtl.data import dicom, jpeg_lossless
from kmedtl.data.audit import audit
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import index_folder
from kmedtl.errors import DataError, DicomDecodeError

#: Resident-memory bound of every hostile audit (before the fixes each case went past it:
#: >= 9.4 GB for the forged SOF, 3.3-4.8 GB for the deflated files).
RSS_MB = 600
TIMEOUT = 240
OPTS = ImageOptions(size=32)


# ---------------------------------------------------------------------------- builders
def _base(rows, cols, *, ts, bits=8, signed=False, frames=1, modality="OT"):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def _smooth(rows, cols, seed=0):
    yy, xx = np.mgrid[:rows, :cols]
    return (128 + 60 * np.sin(xx / (5.0 + seed)) + 40 * np.cos(yy / 7.0)).astype(np.uint8)


def baseline_jpeg(seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_smooth(64, 64, seed)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def patch_sof(stream: bytes, height: int, width: int, marker: int) -> bytes:
    """The stream with the height and width of its SOF (``marker``) segment replaced."""
    data = bytearray(stream)
    at = data.find(bytes([0xFF, marker]))
    assert at > 0, hex(marker)
    data[at + 5:at + 7] = height.to_bytes(2, "big")
    data[at + 7:at + 9] = width.to_bytes(2, "big")
    return bytes(data)


def patch_siz(stream: bytes, height: int, width: int) -> bytes:
    """A JPEG 2000 codestream whose SIZ announces one ``width`` x ``height`` tile (Xsiz,
    Ysiz, XTsiz, YTsiz): openjpeg then allocates the whole image before reading a tile."""
    data = bytearray(stream)
    assert data[:4] == b"\xff\x4f\xff\x51"
    data[8:12] = data[24:28] = width.to_bytes(4, "big")
    data[12:16] = data[28:32] = height.to_bytes(4, "big")
    return bytes(data)


def encapsulated(path, ds, frames: list[bytes]):
    ds.PixelData = encapsulate(frames, has_bot=len(frames) > 1)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def forged_jpeg(path, height=65500, width=65500):
    """The issue's 978-byte case: a 64x64 header, a real JPEG whose SOF0 says otherwise."""
    return encapsulated(path, _base(64, 64, ts=JPEGBaseline8Bit),
                        [patch_sof(baseline_jpeg(), height, width, 0xC0)])


def forged_real_file(path, name, patch):
    ds = pydicom.dcmread(dicom_file(name))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([patch(frame)])
    ds.save_as(path)
    return path


def _wrap16(v):
    return ((v + 0x8000) & 0xFFFF) - 0x8000


def encode_lossless16(samples, predictor6_overflow=False) -> bytes:
    """A 16-bit single-component lossless JPEG (T.81 process 14, selection value 6, one
    Huffman table of 17 five-bit codes), written here from the standard: pydicom has no
    lossless JPEG encoder.  With ``predictor6_overflow`` the prediction's ``Ra - Rc`` is
    computed in 16 bits, the bug of the encoder that wrote pylibjpeg-data's
    ``JPEGLossless_1s_1f_i_16_16_bad.dcm`` (dcmtk's ``dcmdjpeg +w6`` reads both that file
    and this one back to the original samples)."""
    x = np.asarray(samples).astype(np.int64) & 0xFFFF
    rows, cols = x.shape
    ra, rb, rc = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    ra[:, 1:], rb[1:, :], rc[1:, 1:] = x[:, :-1], x[:-1, :], x[:-1, :-1]
    pred = rb + ((_wrap16(ra - rc) if predictor6_overflow else ra - rc) >> 1)
    pred[0, 1:], pred[1:, 0], pred[0, 0] = x[0, :-1], x[:-1, 0], 1 << 15
    diff = (x - pred) & 0xFFFF
    diff = np.where(diff > 0x8000, diff - 0x10000, diff)  # -32767..32768 (H.1.2.2)
    acc, nbits, out = 0, 0, bytearray()
    for v in diff.ravel().tolist():
        ssss = 16 if v == 32768 else abs(v).bit_length()
        code, n = ssss, 5  # symbol k has the 5-bit code k
        if 0 < ssss < 16:
            code = (code << ssss) | (v if v > 0 else v + (1 << ssss) - 1)
            n += ssss
        acc, nbits = (acc << n) | code, nbits + n
        while nbits >= 8:
            nbits -= 8
            out.append((acc >> nbits) & 0xFF)
            if out[-1] == 0xFF:
                out.append(0)  # byte stuffing
        acc &= (1 << nbits) - 1
    if nbits:
        out.append(((acc << (8 - nbits)) | ((1 << (8 - nbits)) - 1)) & 0xFF)
        if out[-1] == 0xFF:
            out.append(0)

    def seg(marker, body):
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    sof = bytes([16, *rows.to_bytes(2, "big"), *cols.to_bytes(2, "big"), 1, 1, 0x11, 0])
    dht = bytes([0x00, 0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 6, 0, 0])
    return (b"\xff\xd8" + seg(0xC3, sof) + seg(0xC4, dht) + seg(0xDA, sos) + bytes(out)
            + b"\xff\xd9")


def signed_ct(rows=64, cols=64):
    """A signed 16-bit 'CT': a disk of tissue on -2000 padding (values of both signs, so
    the 16-bit Ra - Rc overflows at the disk's edge)."""
    yy, xx = np.mgrid[:rows, :cols]
    disk = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (0.45 * rows) ** 2
    return np.where(disk, 200 + 30 * np.sin(xx / 3.0) + 20 * yy, -2000).astype(np.int16)


def lossless_dicom(path, samples, predictor6_overflow=False):
    ds = _base(*samples.shape, ts=JPEGLossless, bits=16, signed=True, modality="CT")
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    return encapsulated(path, ds, [encode_lossless16(samples, predictor6_overflow)])


def deflated_dicom(path, rows, cols, pixel_bytes: int):
    """A Deflated Explicit VR Little Endian file announcing ``rows`` x ``cols`` 8-bit pixels
    whose Pixel Data holds ``pixel_bytes`` zero bytes: written as raw deflate with
    full flushes, so a 64 MiB block of zeros is compressed once and repeated (the file
    stays small however much it inflates to)."""
    ds = _base(rows, cols, ts=DeflatedExplicitVRLittleEndian)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    head = body.getvalue() + b"\xe0\x7f\x10\x00OB\x00\x00" + pixel_bytes.to_bytes(4, "little")
    block = 64 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)]
    zeros = bytes(block)
    full, rest = divmod(pixel_bytes, block)
    if full:
        unit = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
        parts.append(unit * full)  # identical: each full flush resets the compressor
    parts.append(comp.compress(bytes(rest)) + comp.flush())
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    Path(path).write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + b"".join(parts))
    return path


def segmentation_by_sop(path):
    """An ordinary uncompressed image whose SOP Class says Segmentation Storage."""
    ds = _base(64, 64, ts=ExplicitVRLittleEndian, modality="OT")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.PixelData = _smooth(64, 64).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def window_misses(path):
    """A 16-bit image whose header window (2725/5310) lies far below its values
    (32744..65535), as in JPEG2KLossless_1s_1f_u_16_16.dcm."""
    ds = _base(64, 64, ts=ExplicitVRLittleEndian, bits=16, modality="DX")
    ds.WindowCenter, ds.WindowWidth = 2725, 5310
    ds.PixelData = (32744 + _smooth(64, 64).astype(np.uint16) * 128).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def run_audit(root: Path, out: Path, *args):
    res = capped_kmedtl("data", "audit", root, "--workers", "1", "--no-cache", "--json", out,
                        *args, rss_mb=RSS_MB, timeout=TIMEOUT, cwd=root.parent)
    report = json.loads(out.read_text()) if res.ok and out.is_file() else None
    return res, report


def skip_of(report, name) -> dict:
    found = [s for s in report["skipped"] if s["path"].split("/")[-1] == name]
    assert len(found) == 1, (name, report["skipped"])
    return found[0]


def assert_capped(res, report):
    assert res.ok, res.why()
    assert res.rc == 0, res.why()
    assert res.peak_mb < RSS_MB, res.why()
    c = report["counts"]
    assert c["read"] == c["used"] + c["skipped"], c


# ---------------------------------------------------------------------------- hostile batch
HOSTILE = {
    "jpeg_sof_65500.dcm": lambda p: forged_jpeg(p),
    "jpeg_ls_sof55_65500.dcm": lambda p: forged_real_file(
        p, "MR_small_jpeg_ls_lossless.dcm", lambda f: patch_sof(f, 65500, 65500, 0xF7)),
    "j2k_siz_65500.dcm": lambda p: forged_real_file(
        p, "MR_small_jp2klossless.dcm", lambda f: patch_siz(f, 65500, 65500)),
    "ljpeg_sof3_65500.dcm": lambda p: encapsulated(
        p, _base(64, 64, ts=JPEGLossless, bits=16, signed=True),
        [patch_sof(encode_lossless16(signed_ct()), 65500, 65500, 0xC3)]),
    "jpeg_sof_mismatch.dcm": lambda p: forged_jpeg(p, 128, 128),
    "multiframe_bad_frame1.dcm": lambda p: encapsulated(
        p, _base(64, 64, ts=JPEGBaseline8Bit, frames=3),
        [baseline_jpeg(0), patch_sof(baseline_jpeg(1), 65500, 65500, 0xC0),
         baseline_jpeg(2)]),
    # 1.5 GiB of pixel data behind a 64x64 header, in a file of about 1.5 MB
    "deflate_bomb_64x64.dcm": lambda p: deflated_dicom(p, 64, 64, 1536 << 20),
    # the 420-438 kB files: 400 MB of zeros, 20000x20000 announced
    "deflate_bomb_20000x20000.dcm": lambda p: deflated_dicom(p, 20000, 20000, 400_000_000),
    "seg_by_sop_class.dcm": segmentation_by_sop,
    "window_misses.dcm": window_misses,
    "control_jpeg.dcm": lambda p: encapsulated(p, _base(64, 64, ts=JPEGBaseline8Bit),
                                               [baseline_jpeg(3)]),
    "control_deflated.dcm": lambda p: deflated_dicom(p, 64, 64, 64 * 64),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    root = base / "ds"
    (root / "A").mkdir(parents=True)
    for name, build in HOSTILE.items():
        build(root / "A" / name)
    sizes = {name: (root / "A" / name).stat().st_size for name in HOSTILE}
    res, report = run_audit(root, base / "audit.json", "--frames", "all")
    return res, report, sizes


def test_hostile_files_are_small(hostile):
    _, _, sizes = hostile
    assert sizes["jpeg_sof_65500.dcm"] < 2000  # the file: 978 bytes
    assert sizes["deflate_bomb_20000x20000.dcm"] < 500_000
    assert sizes["deflate_bomb_64x64.dcm"] < 2_000_000


@pytest.mark.parametrize("name, codec", [
    ("jpeg_sof_65500.dcm", "JPEG"), ("jpeg_ls_sof55_65500.dcm", "JPEG-LS"),
    ("j2k_siz_65500.dcm", "JPEG 2000"), ("ljpeg_sof3_65500.dcm", "JPEG")])
def test_codestream_claiming_65500_squared_is_refused_before_decoding(hostile, name, codec):
    """Before: libjpeg (JPEG, JPEG-LS) and openjpeg allocated what the SOF/SIZ said
    (killed past the cap here; >= 9.4 GB in the issue); the lossless SOF3 case was
    refused by libjpeg, but only as corrupt pixel data after the decode was attempted."""
    res, report, _ = hostile
    assert_capped(res, report)
    skip = skip_of(report, name)
    assert skip["kind"] == "too_large", skip
    assert f"its {codec} codestream announces 65500x65500" in skip["reason"]
    assert "data.max_pixels" in skip["reason"] and "before decoding" in skip["reason"]


def test_codestream_disagreeing_with_rows_columns_is_refused(hostile):
    res, report, _ = hostile
    assert_capped(res, report)
    skip = skip_of(report, "jpeg_sof_mismatch.dcm")
    assert skip["kind"] == "codec_size_mismatch", skip
    assert "128x128" in skip["reason"] and "64x64x1" in skip["reason"]


def test_each_decoded_frame_is_checked(hostile):
    """frames: all decodes every frame: frame 0 passes, frame 1's forged SOF is refused
    (and with it the file: the audit counts files)."""
    res, report, _ = hostile
    assert_capped(res, report)
    skip = skip_of(report, "multiframe_bad_frame1.dcm")
    assert skip["kind"] == "too_large" and "(frame 1)" in skip["reason"], skip


@pytest.mark.parametrize("name, limit", [("deflate_bomb_64x64.dcm", "data.max_file_bytes"),
                                         ("deflate_bomb_20000x20000.dcm", "data.max_pixels")])
def test_deflate_bomb_is_refused_while_inflating(hostile, name, limit):
    """Before: pydicom inflated the whole dataset (3.3-4.8 GB for 420-438 kB files)."""
    res, report, _ = hostile
    assert_capped(res, report)
    skip = skip_of(report, name)
    assert skip["kind"] == "too_large", skip
    assert limit in skip["reason"] and "inflat" in skip["reason"], skip


def test_segmentation_is_skipped_by_sop_class(hostile):
    res, report, _ = hostile
    assert_capped(res, report)
    skip = skip_of(report, "seg_by_sop_class.dcm")
    assert skip["kind"] == "segmentation_object" and "Segmentation Storage" in skip["reason"]


def test_window_missing_the_pixels_is_used_with_a_warning_in_the_audit(hostile):
    res, report, _ = hostile
    assert_capped(res, report)
    assert not [s for s in report["skipped"] if s["path"].endswith("window_misses.dcm")]
    warned = [w for w in report["image_warnings"] if w["path"].endswith("window_misses.dcm")]
    assert len(warned) == 1 and "covers 0.0%" in warned[0]["warning"], report["image_warnings"]
    assert any("window_misses.dcm" in w for w in report["warnings"])


def test_controls_are_used(hostile):
    res, report, _ = hostile
    assert_capped(res, report)
    skipped = {s["path"].split("/")[-1] for s in report["skipped"]}
    assert not skipped & {"control_jpeg.dcm", "control_deflated.dcm", "window_misses.dcm"}
    assert report["counts"]["skipped"] == len(HOSTILE) - 3


# ---------------------------------------------------------------------------- in process
def test_deflate_check_inflates_in_bounded_chunks(tmp_path):
    """The cap is the header's pixel data + 64 MiB; a small honest file passes."""
    path = deflated_dicom(tmp_path / "ok.dcm", 64, 64, 64 * 64)
    with open(path, "rb") as fh:
        inflated = dicom.check_deflated(fh, "ok.dcm")
        assert fh.tell() == 0
    assert 64 * 64 < inflated < 64 * 64 + 1000  # the pixel data and a small header
    bomb = deflated_dicom(tmp_path / "bomb.dcm", 64, 64, 80 << 20)
    with pytest.raises(DataError) as info:
        dicom.read_dataset(bomb, "bomb.dcm", stop_before_pixels=True)
    assert info.value.kind == "too_large" and "67,108,864 more" in info.value.reason
    with pytest.raises(DataError) as info:  # a lower byte budget lowers the cap
        dicom.decode_dicom(path, ImageOptions(size=32, max_file_bytes=4096))
    assert "data.max_file_bytes = 4,096" in info.value.reason


def test_codec_frame_header_parser():
    assert dicom.codec_frame_header(baseline_jpeg()) == {
        "codec": "JPEG", "precision": 8, "height": 64, "width": 64, "components": 1}
    ds = pydicom.dcmread(dicom_file("MR_small_jp2klossless.dcm"))
    j2k = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert dicom.codec_frame_header(j2k) == {
        "codec": "JPEG 2000", "precision": 16, "height": 64, "width": 64, "components": 1}
    assert dicom.codec_frame_header(b"\x00" * 64) is None
    assert dicom.codec_frame_header(b"\xff\xd8\xff") is None


def test_predictor6_overflow_stream_is_refused_and_a_conforming_one_used(tmp_path):
    """The _bad file's defect, reproduced: an intact stream whose encoder computed
    selection value 6 with a 16-bit overflow decodes (per T.81) to garbage that passes
    the byte-count check; the same image encoded correctly decodes exactly and is used."""
    img = signed_ct()
    good = lossless_dicom(tmp_path / "good.dcm", img)
    bad = lossless_dicom(tmp_path / "bad.dcm", img, predictor6_overflow=True)
    assert np.array_equal(pydicom.dcmread(good).pixel_array, img)
    garbage = pydicom.dcmread(bad).pixel_array
    assert int(garbage.min()) < -30000 and int(garbage.max()) > 30000
    stream = next(generate_frames(pydicom.dcmread(bad).PixelData, number_of_frames=1))
    assert jpeg_lossless.check_frame(stream, garbage) is None  # the byte count matches
    assert dicom.decode_dicom(good, OPTS).image.shape == (64, 64, 1)
    with pytest.raises(DicomDecodeError) as info:
        dicom.decode_dicom(bad, OPTS)
    assert info.value.kind == "corrupt_pixel_data"
    assert "16-bit overflow" in info.value.reason and "dcmdjpeg +w6" in info.value.reason
    # the encoder's reading recovers the image exactly
    raw = garbage.astype(np.int64) & 0xFFFF
    assert np.array_equal(_wrap16(jpeg_lossless._predictor6_overflow_decode(raw)), img)


def test_window_warning_survives_a_cached_audit(tmp_path):
    """The warning is kept with the cache entry: a second audit reusing it still says it."""
    root = tmp_path / "ds" / "A"
    root.mkdir(parents=True)
    window_misses(root / "w.dcm")
    shutil.copy(segmentation_by_sop(tmp_path / "s.dcm"), root / "s.dcm")
    for _ in range(2):
        index = index_folder(tmp_path / "ds", None, OPTS)
        report = audit(index, OPTS, cache_dir=tmp_path / "cache", workers=1, progress=False)
        assert [w["path"] for w in report["image_warnings"]] == ["A/w.dcm"]
        assert report["summary"]["skipped_by_kind"] == {"segmentation_object": 1}


# ---------------------------------------------------------------------------- dicom-extra
EXTRA = ("JPEGLossless_1s_1f_i_16_16_bad.dcm", "liver_deflate.dcm", "liver_rle.dcm",
         "JPEG2KLossless_1s_1f_u_16_16.dcm")


@pytest.fixture(scope="module")
def extra(tmp_path_factory):
    folder = Path(os.environ.get("KMEDTL_DATASETS", "")) / "dicom-extra"
    if not os.environ.get("KMEDTL_DATASETS") or not all((folder / n).is_file() for n in EXTRA):
        pytest.skip(f"the real misread files are not in {folder} ($KMEDTL_DATASETS/"
                    "dicom-extra, see its README.md): set KMEDTL_DATASETS to the datasets root")
    base = tmp_path_factory.mktemp("extra")
    root = base / "ds"
    (root / "A").mkdir(parents=True)
    for name in EXTRA:
        shutil.copy(folder / name, root / "A" / name)
    return run_audit(root, base / "audit.json")


@pytest.mark.slow
def test_real_predictor6_overflow_file_is_skipped_as_corrupt(extra):
    """Before: counted as used (garbage spanning -32768..32767; check_frame returned
    None: predictor 6, matching byte count)."""
    res, report = extra
    assert_capped(res, report)
    skip = skip_of(report, "JPEGLossless_1s_1f_i_16_16_bad.dcm")
    assert skip["kind"] == "corrupt_pixel_data", skip
    assert "16-bit overflow" in skip["reason"] and "dcmdjpeg +w6" in skip["reason"]


def test_deflated_image_frame_compression_is_an_unsupported_transfer_syntax(extra):
    """Before: reported as corrupt_header ("UID is not a transfer syntax")."""
    res, report = extra
    assert_capped(res, report)
    skip = skip_of(report, "liver_deflate.dcm")
    assert skip["kind"] == "unsupported_transfer_syntax", skip
    assert "1.2.840.10008.1.2.8.1 (Deflated Image Frame Compression)" in skip["reason"]
    assert f"pydicom {pydicom.__version__}" in skip["reason"]


def test_one_bit_segmentation_is_skipped_as_such(extra):
    """Before: 'pixel data cannot be decoded ... RLE ... 1 bits allocated'."""
    res, report = extra
    assert_capped(res, report)
    skip = skip_of(report, "liver_rle.dcm")
    assert skip["kind"] == "segmentation_object", skip
    assert "RLE" not in skip["reason"] and "BINARY" in skip["reason"]


def test_header_window_missing_every_pixel_is_used_with_a_warning(extra):
    """Before: an all-white image, used, no warning anywhere."""
    res, report = extra
    assert_capped(res, report)
    assert report["counts"]["used"] == 1
    (warned,) = report["image_warnings"]
    assert warned["path"] == "A/JPEG2KLossless_1s_1f_u_16_16.dcm"
    assert "center 2725, width 5310" in warned["warning"]
    assert "32744..65535" in warned["warning"] and "white" in warned["warning"]
