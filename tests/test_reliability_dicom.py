"""DICOM read correctly or refused with a reason, never a traceback (issue 14).

- Enhanced multi-frame objects keep rescale, window and pixel spacing in the Shared and
  Per-frame Functional Groups (``eCT_Supplemental.dcm``, a real file in pydicom-data).
- An empty Modality LUT Sequence item (as in pylibjpeg-data's
  ``JPEGLosslessP14SV1_1s_1f_u_16_16.dcm``) and malformed VOI LUT items fall back with a
  reason instead of crashing ``kmedtl data show``.
- A lossless JPEG stream with damaged entropy-coded data decodes to garbage without any
  codec error; it is detected and skipped as ``corrupt_pixel_data``.  (pylibjpeg-data's
  real ``JPEGLossless_1s_1f_i_16_16_bad.dcm`` turned out to be another defect, an intact
  stream whose encoder overflowed in predictor 6: ``tests/test_hostile_dicom.py``.)
- pydicom's own tracebacks stay off the console (DEBUG with ``--verbose``).

The pylibjpeg-data files are not on PyPI, so equivalent files are built here with pydicom
from real files of the pydicom/pydicom-data wheels.
"""

import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pydicom
import pytest
from helpers import dicom_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence

from kmedtl.cli import main
from kmedtl.data import decode, dicom
from kmedtl.data.audit import audit
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import index_folder
from kmedtl.errors import DicomDecodeError

OPTS = ImageOptions(size=32)


def linear_window(x, c, w):
    """DICOM PS3.3 C.11.2.1.2 LINEAR window scaled to [0, 1]."""
    return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


# ---------------------------------------------------------------------------- enhanced
def test_enhanced_ct_uses_functional_group_rescale_and_window():
    """Before: 'percentile (no window in header)' on raw stored values (brain saturated)."""
    path = dicom_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds and "WindowCenter" not in ds  # only in the groups
    stored = ds.pixel_array.astype(np.float64)
    for frame in (0, 1):
        got = dicom.decode_dicom(path, OPTS, frame=frame)
        assert got.meta["window_source"] == "header LINEAR"
        assert got.meta["window"] == [49.0, 102.0]
        expected = linear_window(stored[frame] - 1024.0, 49.0, 102.0)
        np.testing.assert_allclose(got.image[..., 0], expected, atol=1e-5)
        assert float(got.meta["RescaleIntercept"]) == -1024.0
        assert [float(v) for v in got.meta["PixelSpacing"]] == [0.388672, 0.388672]
    # the brain window leaves most of the image in range, not saturated white
    assert 0.05 < float(got.image.mean()) < 0.5


def enhanced_per_frame(tmp_path, windows):
    """eCT_Supplemental with rescale and window moved into per-frame items, one per frame."""
    ds = pydicom.dcmread(dicom_file("eCT_Supplemental.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    del shared.FrameVOILUTSequence
    del shared.PixelValueTransformationSequence
    for item, (c, w, intercept) in zip(ds.PerFrameFunctionalGroupsSequence, windows):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = c, w
        pvt = Dataset()
        pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = intercept, 1, "HU"
        item.FrameVOILUTSequence = Sequence([voi])
        item.PixelValueTransformationSequence = Sequence([pvt])
    path = tmp_path / "enhanced_per_frame.dcm"
    ds.save_as(path)
    return path, ds.pixel_array.astype(np.float64)


def test_per_frame_functional_groups_give_each_frame_its_own_values(tmp_path):
    windows = [(40, 80, -1024), (400, 1800, -1000)]
    path, stored = enhanced_per_frame(tmp_path, windows)
    for frame, (c, w, intercept) in enumerate(windows):
        got = dicom.decode_dicom(path, OPTS, frame=frame)
        assert got.meta["window"] == [c, w]
        assert got.meta["functional_groups"][:2] == ["per-frame PixelValueTransformation",
                                                     "per-frame FrameVOILUT"]
        np.testing.assert_allclose(got.image[..., 0],
                                   linear_window(stored[frame] + intercept, c, w), atol=1e-5)


def test_enhanced_ct_through_data_show_reports_the_header_window(tmp_path, capsys):
    out = tmp_path / "ect.png"
    assert main(["data", "show", str(dicom_file("eCT_Supplemental.dcm")), "--out", str(out),
                 "--size", "64"]) == 0
    summary = json.loads(capsys.readouterr().out.rsplit("\nwrote", 1)[0])
    assert summary["window_source"] == "header LINEAR" and summary["window"] == [49.0, 102.0]
    assert "shared PixelMeasures" in summary["functional_groups"]


# ---------------------------------------------------------------------------- LUT items
def empty_modality_lut_file(tmp_path, zero_length=True):
    """Like pylibjpeg-data's JPEGLosslessP14SV1_1s_1f_u_16_16.dcm: a JPEG Lossless SV1
    image (real, pydicom-data's JPEG-LL.dcm) whose Modality LUT Sequence item is empty:
    zero-length LUT Descriptor and LUT Data (``zero_length``) or no elements at all."""
    ds = pydicom.dcmread(dicom_file("JPEG-LL.dcm"))
    item = Dataset()
    if zero_length:
        item.add_new("LUTDescriptor", "US", None)
        item.add_new("LUTData", "OW", None)
    ds.ModalityLUTSequence = Sequence([item])
    path = tmp_path / "empty_modality_lut.dcm"
    ds.save_as(path)
    return path, ds


@pytest.mark.parametrize("zero_length, words", [(True, "no LUT Descriptor and LUT Data"),
                                                (False, "empty")])
def test_empty_modality_lut_item_falls_back_with_a_reason(tmp_path, zero_length, words):
    """Before: TypeError: 'NoneType' object is not subscriptable (data show traceback, the
    audit's 'unexpected' skip)."""
    path, ds = empty_modality_lut_file(tmp_path, zero_length)
    got = dicom.decode_dicom(path, OPTS, summary=True)
    assert "Modality LUT Sequence ignored" in got.meta["modality_lut"]
    assert words in got.meta["modality_lut"]
    # identity modality transform: the same pixels as without the sequence
    del ds.ModalityLUTSequence
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain)
    np.testing.assert_array_equal(got.image, dicom.decode_dicom(plain, OPTS).image)
    # counted as used by the audit
    root = tmp_path / "ds" / "A"
    root.mkdir(parents=True)
    os.replace(path, root / "scan.dcm")
    report = audit(index_folder(tmp_path / "ds", None, OPTS), OPTS, workers=1, progress=False)
    assert (report["counts"]["used"], report["counts"]["skipped"]) == (1, 0)


@pytest.mark.slow
def test_data_show_on_an_empty_modality_lut_item_has_no_traceback(tmp_path):
    path, _ = empty_modality_lut_file(tmp_path)
    res = subprocess.run([sys.executable, "-m", "kmedtl.cli", "data", "show", str(path),
                          "--out", str(tmp_path / "x.png"), "--size", "32"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "Modality LUT Sequence ignored" in res.stdout


@pytest.mark.parametrize("item, words", [
    ({}, "empty"),
    ({"LUTDescriptor": [256, 0, 16]}, "no LUT Data"),
    ({"LUTDescriptor": [256, 0, 16], "LUTData": bytes(20)}, "10 entries"),
    ({"LUTDescriptor": [256, 0, 32], "LUTData": bytes(512)}, "32 bits"),
])
def test_malformed_voi_lut_items_fall_back_to_percentiles(tmp_path, item, words):
    ds = pydicom.dcmread(dicom_file("vlut_04.dcm"))
    lut = Dataset()
    for k, v in item.items():
        setattr(lut, k, v)
    ds.VOILUTSequence = Sequence([lut])
    path = tmp_path / "voi.dcm"
    ds.save_as(path)
    got = dicom.decode_dicom(path, OPTS)
    assert got.meta["window_source"].startswith("percentile (VOI LUT Sequence ignored")
    assert words in got.meta["window_source"]
    assert np.isfinite(got.image).all() and 0.0 <= got.image.min() <= got.image.max() <= 1.0


def test_malformed_modality_lut_items_fall_back_to_rescale(tmp_path):
    ds = pydicom.dcmread(dicom_file("mlut_18.dcm"))
    ds.ModalityLUTSequence[0].LUTData = ds.ModalityLUTSequence[0].LUTData[:7]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -100
    path = tmp_path / "mlut.dcm"
    ds.save_as(path)
    got = dicom.decode_dicom(path, ImageOptions(size=32, window="minmax"))
    assert "LUT Data has 7 entries" in got.meta["modality_lut"]
    assert "Rescale Slope/Intercept" in got.meta["modality_lut"]


# ---------------------------------------------------------------------------- corrupt data
def damaged_lossless_jpeg(tmp_path, name="JPEG-LL.dcm", offset=0.5, run=16):
    """A real JPEG Lossless SV1 file with a run of its entropy-coded bytes damaged (XOR
    0x5A): libjpeg decodes it without an error to an image of garbage."""
    ds = pydicom.dcmread(dicom_file(name))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sos = frame.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(frame[sos + 2:sos + 4], "big")
    at = start + int((len(frame) - start) * offset)
    for k in range(at, at + run):
        frame[k] ^= 0x5A
    ds.PixelData = encapsulate([bytes(frame)])
    path = tmp_path / f"damaged_{name}"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
                                  "bad_sequence.dcm"])
def test_damaged_lossless_jpeg_is_detected_not_used(tmp_path, name):
    """Before: the codec returned garbage without an error and the file counted as used."""
    path = damaged_lossless_jpeg(tmp_path, name)
    garbage = pydicom.dcmread(path).pixel_array
    assert not np.array_equal(garbage, pydicom.dcmread(dicom_file(name)).pixel_array)
    with pytest.raises(DicomDecodeError) as info:
        decode.load_image(path, OPTS)
    assert info.value.kind == "corrupt_pixel_data"
    assert str(path) in str(info.value) and "damaged" in info.value.reason
    # the intact original passes the same check (no false alarm)
    assert decode.load_image(dicom_file(name), OPTS).image.shape == (32, 32, 1)


def test_damaged_lossless_jpeg_is_skipped_by_the_audit(tmp_path):
    root = tmp_path / "ds" / "A"
    root.mkdir(parents=True)
    os.replace(damaged_lossless_jpeg(tmp_path), root / "bad.dcm")
    (root / "good.dcm").write_bytes(dicom_file("JPEG-LL.dcm").read_bytes())
    report = audit(index_folder(tmp_path / "ds", None, OPTS), OPTS, workers=1, progress=False)
    c = report["counts"]
    assert (c["read"], c["used"], c["skipped"]) == (2, 1, 1)
    assert report["skipped"][0]["kind"] == "corrupt_pixel_data"


def test_lossless_check_accepts_every_real_lossless_jpeg(pydicom_files):
    """No false alarm on any real JPEG Lossless file of the two wheels."""
    from kmedtl.data.jpeg_lossless import LOSSLESS_JPEG_SYNTAXES, check_frame

    checked = 0
    for path in pydicom_files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(str(path))
            ts = str(ds.file_meta.TransferSyntaxUID)
        except Exception:  # noqa: BLE001 - not DICOM or no file meta
            continue
        if ts not in LOSSLESS_JPEG_SYNTAXES:
            continue
        n = int(ds.get("NumberOfFrames", 1) or 1)
        try:
            arr = ds.pixel_array
        except Exception:  # noqa: BLE001 - truncated real files: nothing decoded to check
            continue
        for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=n)):
            assert check_frame(frame, arr[i] if n > 1 else arr) is None, path
            checked += 1
    assert checked >= 4


# ---------------------------------------------------------------------------- logging
def corrupt_jpeg2000(tmp_path):
    ds = pydicom.dcmread(dicom_file("MR_small_jp2klossless.dcm"))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    # destroys the codestream's COD/QCD segments (not SIZ: a forged SIZ is refused before
    # decoding, as codec_size_mismatch, and this case is about the decoder's own error)
    frame[50:90] = bytes(40)
    ds.PixelData = encapsulate([bytes(frame)])
    path = tmp_path / "bad_j2k.dcm"
    ds.save_as(path)
    return path


@pytest.mark.slow
def test_pydicom_tracebacks_stay_off_the_console_and_show_with_verbose(tmp_path):
    """Before: pydicom logged 'ERROR pydicom.pixels.decoders.base' and a full traceback
    before kmedtl's one-line error."""
    path = corrupt_jpeg2000(tmp_path)
    cmd = [sys.executable, "-m", "kmedtl.cli", "data", "show", str(path), "--out",
           str(tmp_path / "x.png")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"kmedtl: error: {path}: pixel data cannot be decoded")
    verbose = subprocess.run(cmd[:3] + ["--verbose"] + cmd[3:], capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
    assert verbose.returncode == 2
    assert "DEBUG kmedtl.data.dicom: pydicom:" in verbose.stderr
    assert "Traceback" in verbose.stderr


def test_pydicom_logging_is_untouched_outside_kmedtl_decodes(tmp_path, caplog):
    import logging

    path = corrupt_jpeg2000(tmp_path)
    with pytest.raises(DicomDecodeError):
        dicom.decode_dicom(path, OPTS)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pydicom"):
        with pytest.raises(Exception):  # noqa: B017 - pydicom's own error type
            pydicom.dcmread(path).pixel_array  # noqa: B018
    assert any(r.name.startswith("pydicom") for r in caplog.records)


# ---------------------------------------------------------------------------- corpora
@pytest.mark.slow
def test_audit_of_every_wheel_file_and_the_pylibjpeg_cases_names_every_skip(
        tmp_path, pydicom_files):
    """Every file of the pydicom and pydicom-data wheels plus the pylibjpeg-data cases
    built above, audited as kmedtl data audit does (frames: all, worker pool): counts
    reconcile and no skip is 'unexpected' (before: the empty Modality LUT item was one)."""
    from kmedtl.data.audit import dicom_patients

    root = tmp_path / "corpus" / "all"
    root.mkdir(parents=True)
    for i, path in enumerate(pydicom_files):
        os.symlink(path, root / f"{i:03d}_{path.name}")
    built = {empty_modality_lut_file(tmp_path)[0]: None,
             damaged_lossless_jpeg(tmp_path): "corrupt_pixel_data",
             corrupt_jpeg2000(tmp_path): "corrupt_pixel_data"}
    for path in built:
        os.replace(path, root / path.name)
    options = ImageOptions(size=32, frames="all")
    index = index_folder(tmp_path / "corpus", None, options)
    report = audit(index, options, workers=2, progress=False,
                   patients=dicom_patients(index))
    c = report["counts"]
    assert c["read"] == len(pydicom_files) + len(built) == c["used"] + c["skipped"]
    kinds = {s["path"].split("/", 1)[1]: s["kind"] for s in report["skipped"]}
    assert not [p for p, k in kinds.items() if k in ("unexpected", "data_error", "")], kinds
    for path, kind in built.items():
        assert kinds.get(path.name) == kind, (path.name, kinds.get(path.name))


def test_lossless_check_tolerates_values_beyond_bits_stored(tmp_path):
    """An intact stream whose samples exceed the header's Bits Stored is a header mismatch
    pydicom masks away, not damaged data: it must still decode."""
    ds = pydicom.dcmread(dicom_file("bad_sequence.dcm"))
    assert int(ds.pixel_array.max()) > 255
    ds.BitsStored, ds.HighBit = 8, 7
    path = tmp_path / "bits_stored_8.dcm"
    ds.save_as(path)
    assert decode.load_image(path, OPTS).image.shape == (32, 32, 1)


def test_tfio_backend_refuses_functional_groups_instead_of_misreading_them():
    """tensorflow-io cannot read sequences: an Enhanced CT must be refused with the way out,
    not rendered without its rescale and window (checked on the bytes, no TF needed)."""
    from kmedtl.data import tfio_backend

    data = dicom_file("eCT_Supplemental.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    header = tfio_backend._Header(Rows=ds.Rows, Columns=ds.Columns, NumberOfFrames=2,
                                  PhotometricInterpretation="MONOCHROME2", BitsStored=16,
                                  PixelRepresentation=0)
    pixels = np.zeros((2, ds.Rows, ds.Columns, 1), np.uint32)
    with pytest.raises(DicomDecodeError) as info:
        tfio_backend._render(pixels, header, data, OPTS, "ect.dcm", None)
    assert info.value.kind == "unsupported" and "decoder: pydicom" in str(info.value)
