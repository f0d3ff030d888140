"""The optional tensorflow-io DICOM backend (``kmedtl.data.tfio_backend``).

Two environments run this file:

- the normal one (TensorFlow 2.21, where tensorflow-io 0.37.1 cannot load): asking for the
  backend must fail with a message that says why and what to do; the pure-numpy parts
  (undoing DCMTK's rendering, reading its header strings) are checked against a model of
  DCMTK's arithmetic;
- ``.ci/tfio.sh`` (TensorFlow 2.17 + tensorflow-io 0.37.1, ``-m tfio``): the backend's
  pixels are compared with the pydicom backend's on real files of the pydicom and
  pydicom-data wheels, eagerly and inside ``tf.data``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from kmedtl.data import dicom, tfio_backend
from kmedtl.data.options import ImageOptions
from kmedtl.errors import BackendUnavailableError, DicomDecodeError, ImageTooLargeError

#: After windowing, in [0, 1] display units.
TOLERANCE = 1e-3

#: Files compared in both backends.  The first seven are required; where tensorflow-io
#: cannot render one it must say so (DicomDecodeError), never return other pixels.
CORE_FILES = ("MR_small.dcm", "CT_small.dcm", "US1_UNCR.dcm", "RG1_UNCR.dcm",
              "emri_small.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm")
EXTRA_FILES = (
    "MR_small_RLE.dcm",                 # RLE
    "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS, multi-frame
    "JPEG-LL.dcm",                      # JPEG lossless, signed
    "RG3_UNCR.dcm",                     # MONOCHROME1, 10 bits: its one tie is 1/1023 = 9.8e-4
    "OBXXXX1A.dcm",                     # PALETTE COLOR, 16-bit LUT
    "SC_rgb_16bit.dcm",                 # 16-bit RGB
    "rtdose_1frame.dcm",                # 32-bit unsigned
    "liver_1frame.dcm",                 # 1-bit segmentation: both backends must refuse it
    "mlut_18.dcm",                      # Modality LUT Sequence
    "explicit_VR-UN.dcm",               # header elements stored with VR UN
)


def _data_dirs() -> list[Path]:
    """pydicom's and pydicom-data's folders of test files (never get_testdata_files)."""
    import pydicom.data

    dirs = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import data_store
    except ImportError:
        pass
    else:
        dirs.append(Path(data_store.__file__).parent / "data")
    return [d for d in dirs if d.is_dir()]


def _find(name: str) -> Path | None:
    return next((d / name for d in _data_dirs() if (d / name).is_file()), None)


def _tf_version() -> str | None:
    for dist in ("tensorflow", "tensorflow-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


@pytest.fixture(scope="module")
def tfio_loads():
    ok, reason = tfio_backend.available()
    if not ok:
        pytest.skip(f"tensorflow-io does not load here: {reason.split('. ')[0]}; run .ci/tfio.sh")


# --------------------------------------------------------------- every environment

def test_unavailable_backend_says_why_and_what_to_do():
    ok, _ = tfio_backend.available()
    if ok:
        pytest.skip("tensorflow-io loads in this environment (the .ci/tfio.sh one)")
    with pytest.raises(BackendUnavailableError) as caught:
        tfio_backend.require()
    message = str(caught.value)
    assert "tensorflow-io" in message
    version = _tf_version()
    if version is not None:
        assert f"TensorFlow {version}" in message
    assert "<= 2.17" in message
    assert "decoder: pydicom" in message
    assert "tensorflow==2.17.* tensorflow-io==0.37.1" in message
    # Every entry point refuses the same way, and callers can catch it as ImportError.
    with pytest.raises(ImportError, match="pydicom"):
        tfio_backend.decode_dicom_tfio(b"\0" * 132, ImageOptions(), "scan_017.dcm")
    with pytest.raises(BackendUnavailableError, match="tensorflow-io"):
        tfio_backend.make_tfio_decode_fn(ImageOptions())


def test_module_imports_without_tensorflow():
    code = ("import sys, kmedtl.data.tfio_backend; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported eagerly'; "
            "assert 'tensorflow_io' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(("lo", "hi", "bits"), [
    (0, 1, 1),                    # 1-bit
    (0, 4095, 12),                # unsigned 12-bit
    (-32768, 32767, 16),          # signed 16-bit (MR_small)
    (-33792, 31743, 17),          # signed 16-bit, intercept -1024 (CT_small)
    (-9216, 7167, 15),            # signed 14-bit, intercept -1024 (693_UNCR)
    (-1024, 3071, 13),            # unsigned 12-bit, intercept -1024
    (0.000061, 15455.0, 14),      # MR2_UNCR's slope 3.774114
])
def test_dcmtk_depth_of_a_value_range(lo, hi, bits):
    assert tfio_backend._range_to_bits(lo, hi) == bits


def _dcmtk_render(p, bits, signed, monochrome1=False, rescale=None):
    """DCMTK's no-VOI rendering (dimoopxt.h ``nowindow``), written independently."""
    smin, smax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    s, b = rescale or (1.0, 0.0)
    absmin, absmax = sorted((smin * s + b, smax * s + b))
    depth = tfio_backend._range_to_bits(absmin, absmax)
    low, high = (2**depth - 1, 0) if monochrome1 else (0, 2**depth - 1)
    w = np.trunc(p * s + b) if rescale else p.astype(np.float64)
    return np.trunc(low + (w - absmin) * (high - low + 1) / (absmax - absmin + 1))


@pytest.mark.parametrize(("bits", "signed", "rescale"), [
    (16, True, None), (16, True, (1.0, -1024.0)), (14, True, (1.0, -1024.0)),
    (12, False, None), (12, False, (3.774114, 0.000061)), (12, False, (2.0, -1000.0)),
    (8, False, None), (1, False, None), (12, True, (-1.0, 0.0)),
])
def test_undoing_dcmtk_rendering_recovers_stored_values(bits, signed, rescale):
    smin, smax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    p = np.arange(smin, smax + 1, dtype=np.float64)
    header = {"BitsStored": bits, "PixelRepresentation": int(signed)}
    if rescale:
        header.update(RescaleSlope=rescale[0], RescaleIntercept=rescale[1])
    out = _dcmtk_render(p, bits, signed, rescale=rescale)
    np.testing.assert_array_equal(tfio_backend._stored_values(out, header, False), p)


@pytest.mark.parametrize("bits", [10, 15])
def test_undoing_monochrome1_rendering_is_off_by_at_most_one_stored_value(bits):
    # Reversed, DCMTK's gradient is (2 - 2**d) / 2**d: one pair of values shares an output.
    p = np.arange(0, 2**bits, dtype=np.float64)
    out = _dcmtk_render(p, bits, False, monochrome1=True)
    got = tfio_backend._stored_values(out, {"BitsStored": bits, "PixelRepresentation": 0}, True)
    assert np.abs(got - p).max() <= 1
    assert (got != p).sum() <= 1


def test_header_strings_become_typed_fields():
    names = tfio_backend._TAG_NAMES
    raw = {"Rows": b"512", "Columns": b"256 ", "WindowCenter": b"40\\400",
           "WindowWidth": b"80\\2000", "RescaleSlope": b"1", "RescaleIntercept": b"-1024",
           "PhotometricInterpretation": b"MONOCHROME2 ", "Modality": b"CT",
           "OverlayRows00": b"512"}
    header = tfio_backend._parse_header([raw.get(n, b"") for n in names], "scan.dcm")
    assert header["Rows"] == 512 and header["Columns"] == 256
    assert header["WindowCenter"] == [40.0, 400.0]
    assert dicom._header_window(header) == (40.0, 80.0, "LINEAR")
    assert header.RescaleIntercept == -1024.0
    assert header["PhotometricInterpretation"] == "MONOCHROME2"
    assert header["overlays"] == 1
    assert "BitsStored" not in header  # absent fields stay absent, as in a pydicom Dataset


def test_empty_tfio_output_names_the_file_and_the_fix():
    header = tfio_backend._Header(Rows=128, Columns=128, PhotometricInterpretation="MONOCHROME2",
                                  BitsStored=16, TransferSyntaxUID="1.2.840.10008.1.2.1")
    with pytest.raises(DicomDecodeError) as caught:
        tfio_backend._render(np.zeros([0], np.uint32), header, b"", ImageOptions(),
                             "scan_017.dcm", None)
    message = str(caught.value)
    assert message.startswith("scan_017.dcm: ")
    assert "tensorflow-io returned no pixels" in message and "decoder: pydicom" in message
    wrong = np.zeros((1, 64, 64, 1), np.uint32)  # not what the header announces
    with pytest.raises(DicomDecodeError, match="scan_017.dcm: tensorflow-io returned no pixels "
                                               "matching the header"):
        tfio_backend._render(wrong, header, b"", ImageOptions(), "scan_017.dcm", None)


# --------------------------------------------------------------- where tensorflow-io loads

def _both(path: Path, options: ImageOptions, frame=None):
    data = path.read_bytes()
    ref = dicom.decode_dicom(data, options, frame=frame, name=path.name).image
    got = tfio_backend.decode_dicom_tfio(data, options, path.name, frame=frame)
    return ref, got


@pytest.mark.tfio
@pytest.mark.parametrize("window", ["header", "percentile", (40.0, 400.0)])
def test_tfio_matches_pydicom_on_real_files(tfio_loads, window):
    options = ImageOptions(window=window)
    missing = [n for n in CORE_FILES if _find(n) is None]
    assert not missing, f"test files missing from the pydicom / pydicom-data wheels: {missing}"
    compared, refused = {}, {}
    for name in CORE_FILES + EXTRA_FILES:
        path = _find(name)
        if path is None:
            continue
        data = path.read_bytes()
        try:
            ref = dicom.decode_dicom(data, options, name=name).image
        except DicomDecodeError as exc:
            # What pydicom refuses (a segmentation's masks) tfio must refuse the same way,
            # never render as an image.
            with pytest.raises(DicomDecodeError) as also:
                tfio_backend.decode_dicom_tfio(data, options, name)
            assert also.value.kind == exc.kind and str(also.value).startswith(f"{name}: ")
            refused[name] = f"both: {exc.kind}"
            continue
        try:
            got = tfio_backend.decode_dicom_tfio(data, options, name)
        except DicomDecodeError as exc:
            # Allowed only as a clear refusal naming the file and the way out.
            assert str(exc).startswith(f"{name}: ") and "decoder: pydicom" in str(exc), exc
            refused[name] = str(exc)
            continue
        assert got.dtype == np.float32 and got.shape == ref.shape, (name, got.shape, ref.shape)
        assert 0.0 <= got.min() and got.max() <= 1.0, name
        compared[name] = float(np.abs(got - ref).max())
    print(f"\nwindow={window!r} max |tfio - pydicom| per file: {compared}; refused: {refused}")
    worse = {n: d for n, d in compared.items() if d >= TOLERANCE}
    assert not worse, f"tfio and pydicom differ by >= {TOLERANCE}: {worse}"
    assert len(compared) >= 3, f"only {sorted(compared)} compared; refused: {refused}"
    assert len([n for n in CORE_FILES if n in compared]) >= 5, refused


@pytest.mark.tfio
def test_tfio_decodes_ct_small_which_uint16_output_drops(tfio_loads):
    # With the op's default dtype=tf.uint16 DCMTK's 17-bit rendering of this signed
    # 16-bit CT is refused and the op returns an empty tensor; we ask for uint32.
    import tensorflow as tf
    import tensorflow_io as tfio

    path = _find("CT_small.dcm")
    data = path.read_bytes()
    assert tfio.image.decode_dicom_image(data, dtype=tf.uint16).shape.num_elements() == 0
    options = ImageOptions(window="brain")
    ref, got = _both(path, options)
    assert np.abs(got - ref).max() < TOLERANCE


@pytest.mark.tfio
def test_tfio_frames_match_pydicom(tfio_loads):
    path = _find("emri_small.dcm")
    for frames in ("first", "middle"):
        ref, got = _both(path, ImageOptions(frames=frames))
        assert np.abs(got - ref).max() < TOLERANCE, frames
    for k in (0, 3, 9):
        ref, got = _both(path, ImageOptions(), frame=k)
        assert np.abs(got - ref).max() < TOLERANCE, k
    with pytest.raises(DicomDecodeError, match="frame 10 requested but the file has 10"):
        tfio_backend.decode_dicom_tfio(path.read_bytes(), ImageOptions(), path.name, frame=10)


@pytest.mark.tfio
@pytest.mark.parametrize(("name", "says", "fix"), [
    # DCMTK renders nothing:
    ("SC_rgb_32bit.dcm", "tensorflow-io returned no pixels", "decoder: pydicom"),
    ("US1_J2KR.dcm", "tensorflow-io returned no pixels", "decoder: pydicom"),  # YBR_RCT J2K
    # DCMTK would give other pixels than pydicom:
    ("rtdose_expb_1frame.dcm", "16-bit halves swapped", "decoder: pydicom"),
    ("examples_overlay.dcm", "overlay planes", "decoder: pydicom"),
    ("vlut_04.dcm", "VOI LUT Sequence", "decoder: pydicom"),
    # A bad file (pydicom refuses it too; DCMTK would zero-fill it):
    ("MR_truncated.dcm", "truncated pixel data", "re-download"),
])
def test_tfio_refuses_what_it_cannot_match_with_a_clear_error(tfio_loads, name, says, fix):
    path = _find(name)
    if path is None:
        pytest.fail(f"{name} missing from the pydicom / pydicom-data wheels")
    with pytest.raises(DicomDecodeError) as caught:
        tfio_backend.decode_dicom_tfio(path.read_bytes(), ImageOptions(), name)
    message = str(caught.value)
    assert message.startswith(f"{name}: ") and says in message and fix in message, message


@pytest.mark.tfio
def test_tfio_refuses_oversized_images_before_decoding(tfio_loads):
    path = _find("CT_small.dcm")
    small = ImageOptions(max_pixels=1000)
    with pytest.raises(ImageTooLargeError, match="CT_small.dcm: .* over the limit of 1,000"):
        tfio_backend.decode_dicom_tfio(path.read_bytes(), small, path.name)
    image, error = tfio_backend.make_tfio_decode_fn(small)(path.read_bytes(), path.name)
    assert image.shape == (0, 0, 1) and b"over the limit of 1,000" in error.numpy()


@pytest.mark.tfio
def test_tfio_decode_fn_in_tf_data_matches_pydicom_and_reports_bad_files(tfio_loads, tmp_path):
    import tensorflow as tf

    options = ImageOptions()
    good = [_find(n) for n in ("MR_small.dcm", "CT_small.dcm", "US1_UNCR.dcm", "RG1_UNCR.dcm",
                               "emri_small.dcm")]
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_text("not an image\n" * 20)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    paths = [str(p) for p in good] + [str(not_dicom), str(empty), str(_find("rtplan.dcm"))]
    fn = tfio_backend.make_tfio_decode_fn(options)
    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: (p, *fn(tf.io.read_file(p), p)), num_parallel_calls=tf.data.AUTOTUNE)
    seen = {}
    for path, image, error in ds.as_numpy_iterator():
        seen[path.decode()] = (image, error.decode())
    assert len(seen) == len(paths)  # nothing dropped, nothing crashed
    for p in good:
        image, error = seen[str(p)]
        assert error == "", error
        ref = dicom.decode_dicom(str(p), options).image
        assert image.shape == ref.shape and np.abs(image - ref).max() < TOLERANCE, p.name
    for bad in paths[len(good):]:
        image, error = seen[bad]
        assert image.shape == (0, 0, 1) and error.startswith(f"{bad}: "), error
    assert "not a DICOM file" in seen[str(not_dicom)][1]
    assert "empty" in seen[str(empty)][1]


@pytest.mark.tfio
def test_pipeline_decoder_tfio_streams_the_same_pixels_as_pydicom(tfio_loads, tmp_path):
    """``make_dataset(decoder="tfio")`` (the ``data.decoder: tfio`` setting) end to end."""
    from kmedtl.data.pipeline import PipelineReport, make_dataset
    from kmedtl.data.sources import Sample
    from kmedtl.hierarchy import Hierarchy

    names = ("MR_small.dcm", "CT_small.dcm", "693_UNCR.dcm")
    samples = [Sample(str(_find(n)), "a" if i % 2 else "b") for i, n in enumerate(names)]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(_find("MR_small.dcm").read_bytes()[:1000])
    samples.append(Sample(str(broken), "a"))
    h = Hierarchy(["a", "b"])
    opts = ImageOptions(size=(32, 32), window=(40.0, 400.0))
    report = PipelineReport()
    got = next(iter(make_dataset(samples, h, opts, batch_size=8, decoder="tfio",
                                 report=report)))[0].numpy()
    ref = next(iter(make_dataset(samples[:3], h, opts, batch_size=8)))[0].numpy()
    assert got.shape == (3, 32, 32, 1)
    assert np.abs(got - ref).max() <= 1.0 / 255 + 1e-6
    assert [s.path for s in report.skipped] == [str(broken)]


def test_pipeline_decoder_tfio_without_tfio_says_why(tmp_path):
    ok, _ = tfio_backend.available()
    if ok:
        pytest.skip("tensorflow-io loads here")
    from kmedtl.data.pipeline import make_dataset
    from kmedtl.data.sources import Sample
    from kmedtl.hierarchy import Hierarchy

    with pytest.raises(BackendUnavailableError, match="pydicom"):
        make_dataset([Sample("x.dcm", "a")], Hierarchy(["a", "b"]), ImageOptions(size=32),
                     decoder="tfio")
