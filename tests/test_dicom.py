"""DICOM decoding on the real files shipped with pydicom and pydicom-data."""

import json
import warnings

import numpy as np
import pytest
from helpers import (
    dataset_bytes,
    dicom_file,
    file_id,
    make_dicom,
    pydicom_test_files,
    read_ds,
)

from kmedtl.data import decode, dicom, transforms
from kmedtl.data.options import WINDOW_PRESETS, ImageOptions
from kmedtl.data.sources import index_folder, read_manifest
from kmedtl.errors import DataError, DicomDecodeError

SMALL = ImageOptions(size=32)
ALL_FILES = pydicom_test_files()


def decoded(name, **options):
    return dicom.decode_dicom(dicom_file(name), ImageOptions(size=32, **options))


def header(path):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(str(path), force=True, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not parseable at all: no header to compare with
            return None


def pydicom_decodes(path) -> bool:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pydicom.dcmread(str(path), force=True).pixel_array  # noqa: B018
            return True
        except Exception:  # noqa: BLE001
            return False


def modality_values(name, frame=None):
    from pydicom.pixels import apply_modality_lut

    ds = read_ds(dicom_file(name))
    arr = ds.pixel_array if frame is None else ds.pixel_array[frame]
    return apply_modality_lut(arr, ds).astype(np.float64), ds


def linear_window(x, c, w):
    """DICOM PS3.3 C.11.2.1.2 LINEAR window scaled to [0, 1]."""
    return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def assert_no_identifiers(text, identifiers, what):
    leaked = [v for v in identifiers if v in text]
    assert not leaked, f"{what} contains patient identifiers {leaked}"


# ---------------------------------------------------------------------------- every file
@pytest.mark.parametrize("path", ALL_FILES, ids=[file_id(p) for p in ALL_FILES])
def test_every_real_file_decodes_or_raises_a_clear_data_error(path):
    """Each file gives a finite [0, 1] image of the header's shape, or a DataError with a
    reason code and a message naming the file; never another exception, never a leak."""
    ds = header(path)
    ids = [v for v in dicom.identifying_values(ds) if len(v) >= 3] if ds is not None else []
    try:
        result = dicom.decode_dicom(path, SMALL)
    except DataError as err:
        assert err.kind and err.kind != "data_error"
        assert err.reason.strip()
        assert str(path) in str(err)
        assert_no_identifiers(str(err), ids, "error message")
        if err.kind == "segmentation_object":  # label masks, refused by design (issue 21)
            assert str(ds.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.66.")
            return
        # kmedtl refuses only what pydicom itself cannot turn into pixels.
        assert not pydicom_decodes(path), f"pydicom decodes {path} but kmedtl refused: {err}"
        return
    img = result.image
    assert img.dtype == np.float32 and img.ndim == 3
    assert np.isfinite(img).all()
    assert img.min() >= 0.0 and img.max() <= 1.0
    channels = 3 if (int(ds.get("SamplesPerPixel", 1)) == 3
                     or ds.get("PhotometricInterpretation") == "PALETTE COLOR") else 1
    assert img.shape == (int(ds.Rows), int(ds.Columns), channels)
    assert result.n_frames == dicom.n_frames(ds)
    assert_no_identifiers(json.dumps(result.meta, default=str), ids, "decode meta")
    # The model-ready image through the shared decode path (extension-less files too).
    loaded = decode.load_image(path, SMALL)
    assert loaded.image.shape == (32, 32, 1) and loaded.image.dtype == np.uint8
    assert loaded.meta["source"] == "dicom"


# ---------------------------------------------------------------------------- intensities
def test_ct_rescale_to_hounsfield_with_window_preset():
    hu, ds = modality_values("CT_small.dcm")
    assert float(ds.RescaleIntercept) == -1024  # stored values are not HU
    img = decoded("CT_small.dcm", window="brain").image[..., 0]
    c, w = WINDOW_PRESETS["brain"]
    np.testing.assert_allclose(img, linear_window(hu, c, w), atol=1e-5)
    # A pixel whose HU lies inside the brain window maps to its expected grey level.
    inside = np.argwhere((hu > c - w / 2 + 5) & (hu < c + w / 2 - 5))
    assert len(inside) > 100
    y, x = inside[len(inside) // 2]
    assert img[y, x] == pytest.approx((hu[y, x] - (c - 0.5)) / (w - 1) + 0.5, abs=1e-5)
    assert 0.0 < img[y, x] < 1.0
    # Air (about -1000 HU) is black, dense bone white, in the brain window.
    assert img[hu < -500].max() == 0.0 and img[hu > 500].min() == 1.0


def test_explicit_window_uses_hounsfield_units():
    hu, _ = modality_values("CT_small.dcm")
    result = decoded("CT_small.dcm", window=(300.0, 1500.0))
    assert result.meta["window"] == [300.0, 1500.0]
    assert result.meta["window_source"] == "explicit"
    np.testing.assert_allclose(result.image[..., 0], linear_window(hu, 300.0, 1500.0),
                               atol=1e-5)


def test_minmax_window_spans_zero_to_one():
    hu, _ = modality_values("CT_small.dcm")
    result = decoded("CT_small.dcm", window="minmax")
    img = result.image[..., 0]
    assert img.min() == 0.0 and img.max() == 1.0
    np.testing.assert_allclose(img, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-5)
    assert result.meta["window_source"] == "minmax"


def test_percentile_window_clips_the_tails():
    hu, _ = modality_values("CT_small.dcm")
    result = decoded("CT_small.dcm", window="percentile", percentiles=(5.0, 95.0))
    img = result.image[..., 0]
    lo, hi = np.percentile(hu, [5, 95])
    np.testing.assert_allclose(img, np.clip((hu - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert 0.04 <= np.mean(img == 0.0) <= 0.15
    assert 0.04 <= np.mean(img == 1.0) <= 0.15
    assert result.meta["window_source"] == "percentile"


def test_header_window_is_used_when_present():
    values, ds = modality_values("MR_small.dcm")
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    result = decoded("MR_small.dcm", window="header")
    assert result.meta["window_source"].startswith("header")
    assert result.meta["window"] == [c, w]
    np.testing.assert_allclose(result.image[..., 0], linear_window(values, c, w), atol=1e-5)


def test_header_sigmoid_window_function(tmp_path):
    values, ds = modality_values("MR_small.dcm")
    ds.VOILUTFunction = "SIGMOID"
    path = tmp_path / "sigmoid.dcm"
    path.write_bytes(dataset_bytes(ds))
    result = dicom.decode_dicom(path, SMALL)
    assert result.meta["window_source"] == "header SIGMOID"
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    np.testing.assert_allclose(result.image[..., 0], expected, atol=1e-5)


def test_header_without_window_falls_back_to_percentiles():
    result = decoded("CT_small.dcm", window="header")
    assert result.meta["window_source"] == "percentile (no window in header)"
    assert result.image.min() == 0.0 and result.image.max() == 1.0


def test_header_voi_lut_sequence_is_applied():
    result = decoded("vlut_04.dcm", window="header")
    assert result.meta["window_source"] == "header VOI LUT"
    assert result.image.min() == 0.0 and result.image.max() == 1.0


def test_hounsfield_preset_on_non_ct_warns_in_meta():
    result = decoded("MR_small.dcm", window="lung")
    assert "Hounsfield" in result.meta["warning"]


def test_monochrome1_is_inverted(tmp_path):
    original = decoded("RG1_UNCR.dcm")
    assert original.meta.get("inverted") is True
    ds = read_ds(dicom_file("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    as_mono2 = tmp_path / "rg1_as_monochrome2.dcm"
    as_mono2.write_bytes(dataset_bytes(ds))
    other = dicom.decode_dicom(as_mono2, SMALL)
    assert "inverted" not in other.meta
    np.testing.assert_allclose(original.image, 1.0 - other.image, atol=1e-6)
    assert np.abs(original.image - other.image).mean() > 0.1  # not a grey-on-grey no-op


# ---------------------------------------------------------------------------- colour
@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "SC_rgb.dcm"])
def test_rgb_keeps_three_channels_and_converts_to_luma(name):
    result = decoded(name)
    ds = read_ds(dicom_file(name))
    assert result.image.shape == (ds.Rows, ds.Columns, 3)
    # Full-range 8-bit colour: the decoded pixels are the stored ones / 255.
    np.testing.assert_allclose(result.image, ds.pixel_array / 255.0, atol=1e-6)
    rgb = decode.load_image(dicom_file(name), ImageOptions(size=32, channels=3)).image
    gray = decode.load_image(dicom_file(name), ImageOptions(size=32, channels=1)).image
    assert rgb.shape == (32, 32, 3) and gray.shape == (32, 32, 1)
    luma = rgb.astype(np.float32) @ transforms.LUMA
    assert np.abs(gray[..., 0] - luma).max() <= 1.5
    if name == "SC_rgb.dcm":  # strongly coloured bars: luma is no single channel
        assert min(np.abs(gray[..., 0].astype(int) - rgb[..., c]).max() for c in range(3)) > 50


def test_palette_color_becomes_rgb():
    from pydicom.pixels import apply_color_lut

    result = decoded("OBXXXX1A.dcm")
    ds = read_ds(dicom_file("OBXXXX1A.dcm"))
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    img = result.image
    assert img.shape == (ds.Rows, ds.Columns, 3)
    assert result.meta["window_source"] == "palette"
    spread = img.max(-1) - img.min(-1)
    assert (spread > 0.1).mean() > 0.02, "palette image came out grey"
    np.testing.assert_allclose(img, apply_color_lut(ds.pixel_array, ds) / 65535.0, atol=1e-6)


@pytest.mark.parametrize("twin", ["OBXXXX1A_rle.dcm", "OBXXXX1A_expb.dcm"])
def test_palette_color_twins_decode_alike(twin):
    """The RLE and big-endian copies of OBXXXX1A hold the same image and palette."""
    np.testing.assert_allclose(decoded(twin).image, decoded("OBXXXX1A.dcm").image, atol=1e-6)


def test_ybr_jpeg_matches_the_rgb_original():
    ybr = decoded("SC_rgb_dcmtk_+eb+cy+n1.dcm")
    assert read_ds(dicom_file("SC_rgb_dcmtk_+eb+cy+n1.dcm")).PhotometricInterpretation \
        .startswith("YBR")
    twin = decoded("SC_rgb_dcmtk_ebcyn1_dcmd.dcm")  # the same JPEG, decompressed by dcmtk
    rgb = decoded("SC_rgb.dcm")  # the lossless original
    assert ybr.image.shape == rgb.image.shape == (100, 100, 3)
    assert np.abs(ybr.image - twin.image).max() <= 3 / 255
    assert np.abs(ybr.image - rgb.image).mean() < 0.03
    # Without the YBR -> RGB conversion the colours would be far off.
    assert np.abs(ybr.image - rgb.image).mean() < np.abs(ybr.image[..., ::-1] - rgb.image).mean()


# ---------------------------------------------------------------------------- codecs
@pytest.mark.parametrize("compressed, reference", [
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # JPEG 2000 lossless, 12-bit
    ("693_J2KR.dcm", "693_UNCR.dcm"),  # JPEG 2000 lossless, signed
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # JPEG 2000 lossless, MONOCHROME1
    ("US1_J2KR.dcm", "US1_UNCR.dcm"),  # JPEG 2000 lossless, colour
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE
    ("MR_small_bigendian.dcm", "MR_small.dcm"),  # explicit VR big endian
    ("MR_small_implicit.dcm", "MR_small.dcm"),
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),  # JPEG lossless, colour
])
def test_lossless_syntaxes_decode_exactly_like_the_uncompressed_twin(compressed, reference):
    a, b = decoded(compressed), decoded(reference)
    assert a.meta["TransferSyntax"] != b.meta["TransferSyntax"]
    np.testing.assert_array_equal(a.image, b.image)


@pytest.mark.parametrize("lossy, original", [
    ("MR2_J2KI.dcm", "MR2_UNCR.dcm"),
    ("RG3_J2KI.dcm", "RG3_UNCR.dcm"),
    ("US1_J2KI.dcm", "US1_UNCR.dcm"),
])
def test_lossy_jpeg2000_is_close_to_the_original(lossy, original):
    a, b = decoded(lossy).image, decoded(original).image
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.mean() < 0.02
    assert np.percentile(diff, 99) < 0.1  # (sharp text overlays may differ more)


def test_deflated_transfer_syntax(tmp_path):
    from pydicom.uid import ExplicitVRLittleEndian

    result = decoded("image_dfl.dcm")
    assert result.meta["TransferSyntax"].startswith("Deflated")
    ds = read_ds(dicom_file("image_dfl.dcm"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    inflated = tmp_path / "inflated.dcm"
    inflated.write_bytes(dataset_bytes(ds))
    np.testing.assert_array_equal(result.image, dicom.decode_dicom(inflated, SMALL).image)
    assert result.image.std() > 0.05


# ---------------------------------------------------------------------------- frames
def test_multiframe_first_middle_and_explicit_frames():
    path = dicom_file("emri_small.dcm")
    values, _ = modality_values("emri_small.dcm")
    assert values.shape[0] == 10
    first = dicom.decode_dicom(path, ImageOptions(size=32, frames="first", window="minmax"))
    middle = dicom.decode_dicom(path, ImageOptions(size=32, frames="middle", window="minmax"))
    assert first.n_frames == middle.n_frames == 10
    assert first.meta["frame"] == 0 and middle.meta["frame"] == 5
    for result, k in ((first, 0), (middle, 5)):
        v = values[k]
        np.testing.assert_allclose(result.image[..., 0], (v - v.min()) / (v.max() - v.min()),
                                   atol=1e-5)
    assert not np.array_equal(first.image, middle.image)
    last = dicom.decode_dicom(path, ImageOptions(size=32, window="minmax"), frame=9)
    assert last.meta["frame"] == 9
    with pytest.raises(DicomDecodeError) as info:
        dicom.decode_dicom(path, SMALL, frame=10)
    assert info.value.kind == "bad_frame" and "has 10" in info.value.reason
    # load_image picks the frame too.
    a = decode.load_image(path, ImageOptions(size=32, window="minmax"), frame=5).image
    b = decode.load_image(path, ImageOptions(size=32, window="minmax", frames="middle")).image
    np.testing.assert_array_equal(a, b)


def test_frames_all_makes_one_sample_per_frame(tmp_path):
    root = tmp_path / "ds"
    (root / "mr").mkdir(parents=True)
    (root / "ct").mkdir()
    (root / "mr" / "cine.dcm").write_bytes(dicom_file("emri_small.dcm").read_bytes())
    (root / "ct" / "slice.dcm").write_bytes(dicom_file("CT_small.dcm").read_bytes())
    opts = ImageOptions(size=32, frames="all")
    index = index_folder(root, options=opts)
    cine = [s for s in index.samples if s.label == "mr"]
    assert [s.frame for s in cine] == list(range(10))
    assert len({s.id for s in cine}) == 10
    assert [s.frame for s in index.samples if s.label == "ct"] == [None]
    assert index.counts() == {"read": 2, "used": 2, "skipped": 0, "samples": 11}
    # The default (middle) keeps one sample per file.
    assert len(index_folder(root, options=ImageOptions(size=32)).samples) == 2
    # The same through a manifest.
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient_id\nds/mr/cine.dcm,mr,p1\nds/ct/slice.dcm,ct,p2\n")
    mindex = read_manifest(manifest, options=opts)
    assert len(mindex.samples) == 11
    assert {s.patient_id for s in mindex.samples if s.label == "mr"} == {"p1"}
    assert mindex.counts()["read"] == 2 and mindex.counts()["used"] == 2


# ---------------------------------------------------------------------------- privacy
def identifying_file():
    path = dicom_file("MR2_UNCR.dcm")
    ds = read_ds(path)
    ids = dicom.identifying_values(ds)
    assert ids, "the test needs a file with patient identifiers"
    assert {"PatientName", "PatientID", "PatientBirthDate"} <= set(ds.dir("Patient"))
    return path, ds, ids


def test_header_summary_never_contains_patient_identifiers():
    path, ds, ids = identifying_file()
    assert str(ds.PatientID) in ids and str(ds.PatientBirthDate) in ids
    summary = dicom.header_summary(ds)
    assert summary["Modality"] == "MR" and summary["Rows"] == 1024
    text = json.dumps(summary)
    assert_no_identifiers(text, ids, "header_summary")
    assert "Patient" not in text
    meta = dicom.decode_dicom(path, SMALL).meta
    assert_no_identifiers(json.dumps(meta, default=str), ids, "decode meta")


def test_error_messages_never_contain_patient_identifiers(tmp_path, monkeypatch):
    path, ds, ids = identifying_file()
    data = path.read_bytes()
    broken = {
        "truncated.dcm": data[: len(data) // 2],
        "no_pixels.dcm": dataset_bytes(_without_pixels(read_ds(path))),
        "huge.dcm": dataset_bytes(_with_size(read_ds(path), 65_535, 65_535)),
    }
    errors = []
    for fname, blob in broken.items():
        f = tmp_path / fname
        f.write_bytes(blob)
        with pytest.raises(DataError) as info:
            dicom.decode_dicom(f, SMALL)
        errors.append(info.value)
    with pytest.raises(DataError) as info:
        dicom.decode_dicom(path, SMALL, frame=3)
    errors.append(info.value)
    assert {e.kind for e in errors} >= {"truncated", "too_large", "bad_frame"}
    for err in errors:
        assert_no_identifiers(str(err), ids, f"error {err.kind}")


def test_patient_key_stays_in_memory_for_grouping():
    ds = make_dicom(np.zeros((8, 8)), patient_id="P-777")
    assert dicom.patient_key(ds) == "P-777"
    assert "P-777" not in json.dumps(dicom.header_summary(ds))


def _without_pixels(ds):
    del ds.PixelData
    return ds


def _with_size(ds, rows, cols):
    ds.Rows, ds.Columns = rows, cols
    return ds
