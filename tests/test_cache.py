"""The decoded-image cache: decode once, reuse, rebuild exactly what changed."""

import json
import os

import numpy as np
import pytest
from helpers import dataset_bytes, dicom_file, make_dicom, read_ds, smooth_image, write_image

from kmedtl.data import dicom
from kmedtl.data.cache import build_cache, cache_folder
from kmedtl.data.decode import load_image
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import index_folder

OPTS = ImageOptions(size=32, frames="all")
PATIENT = {"patient_id": "PID-98765", "patient_name": "Roe^Richard", "birth_date": "19610203"}


@pytest.fixture
def dataset(tmp_path):
    """PNG/JPEG images, DICOMs with patient identifiers and a 10-frame DICOM: 17 samples."""
    root = tmp_path / "ds"
    for i in range(3):
        write_image(root / "no_tumor" / f"n{i}.png", smooth_image(i))
    write_image(root / "no_tumor" / "photo.jpg", smooth_image(9, channels=3), quality=90)
    for i in range(2):
        pixels = (smooth_image(20 + i).astype(np.uint16) * 16)
        ds = make_dicom(pixels, instance=i + 1, **PATIENT)
        (root / "glioma_tumor" / f"scan{i}.dcm").parent.mkdir(parents=True, exist_ok=True)
        (root / "glioma_tumor" / f"scan{i}.dcm").write_bytes(dataset_bytes(ds))
    (root / "glioma_tumor" / "ct.dcm").write_bytes(dicom_file("CT_small.dcm").read_bytes())
    (root / "glioma_tumor" / "cine.dcm").write_bytes(dicom_file("emri_small.dcm").read_bytes())
    return root


def identifiers(root):
    out = set()
    for path in root.rglob("*.dcm"):
        out.update(dicom.identifying_values(read_ds(path, stop_before_pixels=True)))
    return out


def cached_image(path, options):
    return np.fromfile(path, dtype=np.uint8).reshape(options.shape)


def test_first_build_decodes_everything_and_matches_load_image(dataset, tmp_path):
    index = index_folder(dataset, None, OPTS)
    assert len(index.samples) == 17
    result = build_cache(index, OPTS, tmp_path / "cache", workers=2, progress=False)
    assert result.decoded == 17 and result.reused == 0 and not result.skipped
    assert sorted(result.files) == sorted(s.id for s in index.samples)
    assert result.folder == cache_folder(tmp_path / "cache", OPTS)
    assert len(set(result.files.values())) == 17  # one entry per frame
    for s in index.samples:
        expected = load_image(s.path, OPTS, frame=s.frame).image
        got = cached_image(result.files[s.id], OPTS)
        np.testing.assert_array_equal(got, expected, err_msg=s.id)
        assert os.path.getsize(result.files[s.id]) == 32 * 32 * 1
    assert set(result.phashes) == set(result.files)
    assert result.summary() == {"folder": result.folder, "cached": 17, "decoded": 17,
                                "reused": 0, "rebuilt": 0, "skipped": 0}


def test_second_build_reuses_everything(dataset, tmp_path):
    index = index_folder(dataset, None, OPTS)
    first = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    second = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    assert second.decoded == 0 and second.reused == 17
    assert second.files == first.files and second.digests == first.digests
    assert second.phashes == first.phashes


def test_changed_file_content_rebuilds_only_that_file(dataset, tmp_path):
    index = index_folder(dataset, None, OPTS)
    first = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    changed = dataset / "no_tumor" / "n1.png"
    write_image(changed, smooth_image(77))
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    assert second.decoded == 1 and second.reused == 16
    sid = str(changed)
    assert second.files[sid] != first.files[sid]
    assert second.digests[sid] != first.digests[sid]
    np.testing.assert_array_equal(cached_image(second.files[sid], OPTS),
                                  load_image(changed, OPTS).image)
    assert {k: v for k, v in second.files.items() if k != sid} == \
        {k: v for k, v in first.files.items() if k != sid}


def test_touched_but_unchanged_file_is_not_decoded_again(dataset, tmp_path):
    index = index_folder(dataset, None, OPTS)
    first = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    touched = dataset / "glioma_tumor" / "ct.dcm"
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    assert second.decoded == 0 and second.reused == 17
    assert second.files == first.files


def test_changed_image_options_rebuild_into_another_folder(dataset, tmp_path):
    index = index_folder(dataset, None, OPTS)
    small = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    bigger = ImageOptions(size=48, frames="all")
    big = build_cache(index, bigger, tmp_path / "cache", workers=1, progress=False)
    assert big.folder != small.folder
    assert os.path.dirname(big.folder) == os.path.dirname(small.folder)
    assert big.decoded == 17 and big.reused == 0
    for s in index.samples:
        assert os.path.getsize(big.files[s.id]) == 48 * 48
        assert os.path.exists(small.files[s.id])  # the other folder is left alone
    # Parameters that do not change pixels keep the key; ones that do change it.
    assert ImageOptions(size=32, frames="all", max_pixels=10**6).key() == OPTS.key()
    for other in (ImageOptions(size=32, frames="all", channels=3),
                  ImageOptions(size=32, frames="all", window="minmax"),
                  ImageOptions(size=32, frames="all", resize="crop")):
        assert other.key() != OPTS.key()
    again = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    assert again.decoded == 0


def test_cache_never_names_files_after_patients(dataset, tmp_path):
    ids = identifiers(dataset)
    assert {"PID-98765", "Roe^Richard", "19610203", "1CT1"} <= ids
    index = index_folder(dataset, None, OPTS)
    result = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    names = [name for _, dirs, files in os.walk(tmp_path / "cache") for name in dirs + files]
    assert len(names) > 17
    for name in names:
        for value in ids:
            assert value not in name, f"cache entry {name!r} contains {value!r}"
    with open(os.path.join(result.folder, "index.json")) as fh:
        text = fh.read()
    json.loads(text)
    for value in ids:
        assert value not in text


def test_failed_files_are_not_cached_and_retried(dataset, tmp_path):
    (dataset / "no_tumor" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    index = index_folder(dataset, None, OPTS)
    first = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    assert [os.path.basename(s.path) for s in first.skipped] == ["broken.png"]
    assert str(dataset / "no_tumor" / "broken.png") not in first.files
    write_image(dataset / "no_tumor" / "broken.png", smooth_image(5))  # fixed by the user
    second = build_cache(index, OPTS, tmp_path / "cache", workers=1, progress=False)
    assert not second.skipped and second.decoded == 1 and second.reused == 17
