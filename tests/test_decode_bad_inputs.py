"""Bad inputs: each is skipped with a reason code and a message naming the file, counts
reconcile (read = used + skipped) through index -> cache -> audit, strict mode raises."""

import os
import time
import tracemalloc

import numpy as np
import pytest
from helpers import (
    brain_tumor_hierarchy,
    dataset_bytes,
    dicom_file,
    encode_image,
    make_dicom,
    png_header_only,
    read_ds,
    smooth_image,
    write_image,
)

from kmedtl.data import decode, dicom
from kmedtl.data.audit import audit, public
from kmedtl.data.cache import build_cache
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import index_folder, read_manifest
from kmedtl.errors import (
    DataError,
    DicomDecodeError,
    ImageTooLargeError,
    ManifestError,
    StrictModeError,
)

OPTS = ImageOptions(size=32)
HIERARCHY = brain_tumor_hierarchy()
GOOD_FILES = 3


def _half(name):
    data = dicom_file(name).read_bytes()
    return data[: len(data) // 2]


def _huge_dicom():
    return dataset_bytes(make_dicom(np.zeros((4, 4)), Rows=65_535, Columns=65_535))


def _garbled_jpeg_header():
    data = bytearray(encode_image(smooth_image(5), "JPEG", quality=90))
    data[2:80] = b"\xff" * 78  # markers and quantisation tables destroyed
    return bytes(data)


def _truncated_jpeg():
    data = encode_image(smooth_image(6), "JPEG", quality=90)
    return data[: len(data) // 2]


#: file name -> (bytes factory, expected reason code, words the reason must contain)
BAD_FILES = {
    "empty.dcm": (lambda: b"", "zero_byte", "empty"),
    "empty.png": (lambda: b"", "zero_byte", "empty"),
    "notes.dcm": (lambda: b"Patient notes, not an image.\n" * 20, "not_dicom", "not a DICOM"),
    "truncated.dcm": (lambda: _half("CT_small.dcm"), "truncated", "truncated"),
    "plan.dcm": (lambda: dicom_file("rtplan.dcm").read_bytes(), "no_pixel_data",
                 "no pixel data"),
    "report.dcm": (lambda: dicom_file("test-SR.dcm").read_bytes(), "no_pixel_data",
                   "no pixel data"),
    "huge.dcm": (_huge_dicom, "too_large", "65535x65535"),
    "huge.png": (lambda: png_header_only(100_000, 100_000), "too_large", "10000000000 pixels"),
    "truncated.jpg": (_truncated_jpeg, "corrupt_image", "truncated"),
    "garbled.jpg": (_garbled_jpeg_header, None, ""),
}


def make_tree(root, bad_name=None, bad_bytes=None):
    """``root/no_tumor`` with three good images (and the bad file, if given)."""
    for i in range(GOOD_FILES):
        write_image(root / "no_tumor" / f"good_{i}.png", smooth_image(100 + i))
    if bad_name is not None:
        (root / "no_tumor" / bad_name).write_bytes(bad_bytes)
    return root


def assert_reconciles(counts, read, used, skipped):
    assert counts["read"] == read
    assert counts["used"] == used
    assert counts["skipped"] == skipped
    assert counts["read"] == counts["used"] + counts["skipped"]


def check_skip_through_all_passes(tmp_path, bad_name, kind, words, workers=1):
    """index -> cache -> audit: the bad file is skipped with ``kind``, counts reconcile."""
    root = tmp_path / "ds"
    bad_path = str(root / "no_tumor" / bad_name)
    index = index_folder(root, HIERARCHY, OPTS)
    assert_reconciles(index.counts(), GOOD_FILES + 1, GOOD_FILES + 1, 0)

    result = build_cache(index, OPTS, tmp_path / "cache", workers=workers, progress=False)
    assert len(result.files) == GOOD_FILES
    (skip,) = result.skipped
    assert skip.path == bad_path and skip.stage == "decode"
    assert skip.reason.strip()
    if kind is not None:
        assert skip.kind == kind, skip
    assert words.lower() in skip.reason.lower()
    used = index.drop(result.skipped)
    assert_reconciles(used.counts(), GOOD_FILES + 1, GOOD_FILES, 1)
    with pytest.raises(StrictModeError) as info:
        used.check_strict(True)
    assert bad_name in str(info.value) and "1 file(s)" in str(info.value)

    report = audit(index, OPTS, cache_dir=tmp_path / "cache", workers=workers, progress=False)
    assert_reconciles(report["counts"], GOOD_FILES + 1, GOOD_FILES, 1)
    (entry,) = public(report)["skipped"]
    assert entry["path"] == os.path.join("no_tumor", bad_name)
    assert entry["kind"] == skip.kind and entry["reason"] == skip.reason
    return skip


@pytest.mark.parametrize("bad_name", list(BAD_FILES))
def test_bad_file_is_skipped_with_reason_and_counts_reconcile(tmp_path, bad_name):
    factory, kind, words = BAD_FILES[bad_name]
    make_tree(tmp_path / "ds", bad_name, factory())
    check_skip_through_all_passes(tmp_path, bad_name, kind, words)
    # Decoding it directly raises a DataError whose message names the file.
    with pytest.raises(DataError) as info:
        decode.load_image(tmp_path / "ds" / "no_tumor" / bad_name, OPTS)
    assert str(info.value).startswith(str(tmp_path / "ds" / "no_tumor" / bad_name) + ": ")
    if kind is not None:
        assert info.value.kind == kind


@pytest.mark.slow
def test_bad_files_are_skipped_in_a_worker_pool_too(tmp_path):
    """Eight or more tasks go through the process pool: same skips, same counts."""
    root = tmp_path / "ds"
    make_tree(root)
    for i in range(8):
        write_image(root / "no_tumor" / f"more_{i}.png", smooth_image(200 + i))
    bad = {"empty.dcm": b"", "notes.dcm": b"text\n" * 50, "cut.dcm": _half("CT_small.dcm")}
    for name, blob in bad.items():
        (root / "no_tumor" / name).write_bytes(blob)
    index = index_folder(root, HIERARCHY, OPTS)
    result = build_cache(index, OPTS, tmp_path / "cache", workers=2, progress=False)
    assert sorted(os.path.basename(s.path) for s in result.skipped) == sorted(bad)
    assert {os.path.basename(s.path): s.kind for s in result.skipped} == {
        "empty.dcm": "zero_byte", "notes.dcm": "not_dicom", "cut.dcm": "truncated"}
    assert_reconciles(index.drop(result.skipped).counts(), 14, 11, 3)


# ---------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("name", [
    "MR_small_jp2klossless.dcm",  # JPEG 2000, encapsulated
    "MR_small_RLE.dcm",  # RLE, encapsulated
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG, encapsulated
])
def test_truncated_compressed_dicom_is_reported_as_truncated(tmp_path, name):
    """Cut in half, a compressed DICOM must read as truncated, not as 'not an image'."""
    path = tmp_path / f"cut_{name}"
    path.write_bytes(_half(name))
    with pytest.raises(DicomDecodeError) as info:
        dicom.decode_dicom(path, OPTS)
    assert info.value.kind == "truncated", str(info.value)
    assert "truncated" in info.value.reason


def test_real_too_short_jpeg2000_file_is_reported_as_truncated():
    with pytest.raises(DicomDecodeError) as info:
        dicom.decode_dicom(dicom_file("emri_small_jpeg_2k_lossless_too_short.dcm"), OPTS)
    assert info.value.kind == "truncated", str(info.value)


def test_real_truncated_uncompressed_file():
    with pytest.raises(DicomDecodeError) as info:
        dicom.decode_dicom(dicom_file("MR_truncated.dcm"), OPTS)
    assert info.value.kind == "truncated"
    assert "less than expected" in info.value.reason


# ---------------------------------------------------------------------------- too large
@pytest.mark.parametrize("name, blob", [
    ("huge.dcm", _huge_dicom),
    ("huge.png", lambda: png_header_only(100_000, 100_000)),
    ("big.png", lambda: png_header_only(30_000, 30_000)),  # 900 MP: over the 500 MP default
])
def test_absurd_dimensions_are_refused_before_allocating(tmp_path, name, blob):
    path = tmp_path / name
    path.write_bytes(blob())
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageTooLargeError) as info:
            decode.load_image(path, OPTS)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.kind == "too_large"
    assert "refused before decoding" in info.value.reason
    assert str(path) in str(info.value)
    assert elapsed < 2.0
    assert peak < 20_000_000, f"{peak / 1e6:.0f} MB allocated before refusing"


def test_max_pixels_limit_is_configurable(tmp_path):
    path = write_image(tmp_path / "img.png", smooth_image(1, size=64))
    decode.load_image(path, ImageOptions(size=32, max_pixels=64 * 64))
    with pytest.raises(ImageTooLargeError, match="4,096 pixels, over the limit of 4,095"):
        decode.load_image(path, ImageOptions(size=32, max_pixels=64 * 64 - 1))
    dcm = tmp_path / "img.dcm"
    dcm.write_bytes(dataset_bytes(make_dicom(np.zeros((64, 64)))))
    with pytest.raises(ImageTooLargeError):
        decode.load_image(dcm, ImageOptions(size=32, max_pixels=1000))


# ---------------------------------------------------------------------------- codecs
CODECS = [
    ("JPEG2000Lossless", "MR_small_jp2klossless.dcm", "pylibjpeg-openjpeg"),
    ("JPEGLSLossless", "MR_small_jpeg_ls_lossless.dcm", "pylibjpeg-libjpeg"),
    ("JPEGBaseline8Bit", "SC_rgb_jpeg_dcmtk.dcm", "pylibjpeg-libjpeg"),
]


def remove_decoder_plugins(monkeypatch, uid_name):
    """Simulate an environment without the codec: drop every plugin of that decoder
    (on a copy that monkeypatch swaps back afterwards)."""
    import pydicom.uid
    from pydicom.pixels import get_decoder

    decoder = get_decoder(getattr(pydicom.uid, uid_name))
    monkeypatch.setattr(decoder, "_available", dict(decoder._available))
    for label in list(decoder.available_plugins):
        decoder.remove_plugin(label)
    assert not decoder.is_available
    return decoder


@pytest.mark.parametrize("uid_name, name, package", CODECS)
def test_missing_codec_says_what_to_install(tmp_path, monkeypatch, uid_name, name, package):
    path = dicom_file(name)
    assert read_ds(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
        getattr(__import__("pydicom.uid", fromlist=[uid_name]), uid_name)
    remove_decoder_plugins(monkeypatch, uid_name)
    with pytest.raises(DicomDecodeError) as info:
        dicom.decode_dicom(path, OPTS)
    assert info.value.kind == "codec_missing"
    assert f"pip install {package}" in info.value.reason
    assert str(path) in str(info.value)


def test_missing_codec_is_skipped_and_counted(tmp_path, monkeypatch):
    make_tree(tmp_path / "ds", "scan.dcm", dicom_file("MR_small_jp2klossless.dcm").read_bytes())
    with monkeypatch.context() as m:
        remove_decoder_plugins(m, "JPEG2000Lossless")
        skip = check_skip_through_all_passes(tmp_path, "scan.dcm", "codec_missing",
                                             "pip install pylibjpeg-openjpeg")
    assert "JPEG 2000" in skip.reason
    # With the codec back, the same file decodes (the plugins were restored).
    assert dicom.decode_dicom(tmp_path / "ds" / "no_tumor" / "scan.dcm", OPTS).image.size


# ---------------------------------------------------------------------------- labels, paths
def test_label_missing_from_hierarchy(tmp_path):
    root = make_tree(tmp_path / "ds")
    write_image(root / "glioma_tumour" / "typo.png", smooth_image(7))
    write_image(root / "glioma_tumour" / "typo2.png", smooth_image(8))
    index = index_folder(root, HIERARCHY, OPTS)
    assert_reconciles(index.counts(), GOOD_FILES + 2, GOOD_FILES, 2)
    assert {s.kind for s in index.skipped} == {"unknown_label"}
    for s in index.skipped:
        assert os.path.basename(s.path) in ("typo.png", "typo2.png")
        assert "'glioma_tumour'" in s.reason and "glioma_tumor" in s.reason
    with pytest.raises(StrictModeError, match="typo.png"):
        index.check_strict(True)
    report = audit(index, OPTS, workers=1, progress=False)
    assert_reconciles(report["counts"], GOOD_FILES + 2, GOOD_FILES, 2)


def test_files_outside_class_folders_are_counted(tmp_path):
    root = make_tree(tmp_path / "ds")
    write_image(root / "stray.png", smooth_image(9))
    (root / "README.md").write_text("about this dataset")
    index = index_folder(root, HIERARCHY, OPTS)
    # every file is read: the README is skipped as documentation, not silently dropped
    assert_reconciles(index.counts(), GOOD_FILES + 2, GOOD_FILES, 2)
    kinds = {os.path.basename(s.path): s.kind for s in index.skipped}
    assert kinds == {"stray.png": "no_label", "README.md": "documentation"}
    # strict mode fails on the stray image only, never on documentation
    with pytest.raises(StrictModeError, match="1 file") as info:
        index.check_strict(True)
    assert "stray.png" in str(info.value) and "README" not in str(info.value)


def test_manifest_path_that_does_not_exist(tmp_path):
    root = make_tree(tmp_path / "ds")
    manifest = tmp_path / "ds" / "manifest.csv"
    manifest.write_text(
        "path,label,patient_id\n"
        "no_tumor/good_0.png,no_tumor,p1\n"
        "no_tumor/good_1.png,no_tumor,p2\n"
        "no_tumor/gone.png,no_tumor,p3\n"
        "no_tumor/good_2.png,not_a_class,p4\n"
    )
    index = read_manifest(manifest, HIERARCHY, OPTS)
    assert_reconciles(index.counts(), 4, 2, 2)
    kinds = {os.path.basename(s.path): s for s in index.skipped}
    assert kinds["gone.png"].kind == "missing_file"
    assert "manifest.csv:4" in kinds["gone.png"].reason
    assert "does not exist" in kinds["gone.png"].reason
    assert kinds["good_2.png"].kind == "unknown_label"
    assert str(root / "no_tumor" / "gone.png") == kinds["gone.png"].path
    with pytest.raises(StrictModeError, match="gone.png"):
        index.check_strict(True)
    with pytest.raises(DataError) as info:
        decode.load_image(root / "no_tumor" / "gone.png", OPTS)
    assert info.value.kind == "missing_file"


def test_missing_manifest_and_dataset_folder(tmp_path):
    with pytest.raises(ManifestError, match="nope.csv: manifest file not found"):
        read_manifest(tmp_path / "nope.csv", HIERARCHY, OPTS)
    with pytest.raises(DataError) as info:
        index_folder(tmp_path / "no_such_folder", HIERARCHY, OPTS)
    assert info.value.kind == "missing_folder" and "no_such_folder" in str(info.value)


def _reads_despite_chmod(path) -> bool:
    try:
        os.listdir(path)
        return True
    except PermissionError:
        return False


def test_unreadable_folder_is_skipped_with_reason(tmp_path):
    root = make_tree(tmp_path / "ds")
    locked = root / "glioma_tumor"
    write_image(locked / "series" / "a.png", smooth_image(11))
    os.chmod(locked / "series", 0)
    try:
        if _reads_despite_chmod(locked / "series"):
            pytest.skip("running as root (or with CAP_DAC_READ_SEARCH): chmod 000 does not "
                        "block reads, so an unreadable folder cannot be simulated")
        check_unreadable_folder_skipped(root, locked / "series")
    finally:
        os.chmod(locked / "series", 0o755)


def check_unreadable_folder_skipped(root, folder):
    index = index_folder(root, HIERARCHY, OPTS)
    (skip,) = index.skipped
    assert skip.kind == "unreadable_folder" and skip.path == str(folder)
    assert "permission" in skip.reason.lower()
    assert [s.path for s in index.samples] == [
        str(root / "no_tumor" / f"good_{i}.png") for i in range(GOOD_FILES)]
    counts = index.counts()
    assert counts["used"] == GOOD_FILES and counts["skipped"] == 1
    assert counts["read"] == counts["used"] + counts["skipped"], counts
    with pytest.raises(StrictModeError, match=folder.name):
        index.check_strict(True)


def test_unlistable_folder_is_skipped_with_reason(tmp_path, monkeypatch):
    """The same as above without relying on file permissions (which root ignores):
    listing the folder fails with EACCES, as it does for a chmod 000 folder."""
    root = make_tree(tmp_path / "ds")
    locked = root / "glioma_tumor" / "series"
    write_image(locked / "a.png", smooth_image(11))
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    check_unreadable_folder_skipped(root, locked)
