"""Where samples come from: folder trees (with split folders), CSV manifests, series."""

import numpy as np
import pytest
from helpers import (
    brain_tumor_hierarchy,
    dataset_bytes,
    dicom_file,
    read_ds,
    smooth_image,
    write_image,
)

from kmedtl.data import decode
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import index_folder, read_manifest, series_slices
from kmedtl.errors import ManifestError

OPTS = ImageOptions(size=32)
HIERARCHY = brain_tumor_hierarchy()


# ---------------------------------------------------------------------------- folders
def test_folder_per_class(tiny_images):
    index = index_folder(tiny_images, HIERARCHY, OPTS)
    assert index.counts() == {"read": 6, "used": 6, "skipped": 0, "samples": 6}
    assert index.label_counts() == {"no_tumor": 3, "glioma_tumor": 3}
    assert all(s.split is None and s.frame is None for s in index.samples)
    assert index.root == str(tiny_images)
    for s in index.samples:
        assert decode.load_image(s.path, OPTS).image.shape == (32, 32, 1)


def test_split_folders_are_recognised(tmp_path):
    root = tmp_path / "brain"
    layout = {"Training": {"glioma_tumor": 3, "no_tumor": 2},
              "Testing": {"glioma_tumor": 1, "no_tumor": 1},
              "VALIDATION": {"no_tumor": 1}}
    seed = 0
    for split, classes in layout.items():
        for label, n in classes.items():
            for i in range(n):
                seed += 1
                write_image(root / split / label / f"img ({i}).jpg", smooth_image(seed))
    index = index_folder(root, HIERARCHY, OPTS)
    assert index.counts() == {"read": 8, "used": 8, "skipped": 0, "samples": 8}
    by_split = {}
    for s in index.samples:
        by_split.setdefault(s.split, []).append(s.label)
    assert sorted(by_split) == ["test", "train", "val"]
    assert sorted(by_split["train"]) == ["glioma_tumor"] * 3 + ["no_tumor"] * 2
    assert sorted(by_split["test"]) == ["glioma_tumor", "no_tumor"]
    assert by_split["val"] == ["no_tumor"]
    # File names with spaces and parentheses survive.
    assert any(s.path.endswith("img (0).jpg") for s in index.samples)


def test_class_named_like_a_split_is_not_mistaken_when_others_are_classes(tmp_path):
    # Only when *every* top folder is a split name is the top level read as splits.
    write_image(tmp_path / "ds" / "no_tumor" / "a.png", smooth_image(1))
    write_image(tmp_path / "ds" / "test" / "b.png", smooth_image(2))
    index = index_folder(tmp_path / "ds", None, OPTS)
    assert {(s.label, s.split) for s in index.samples} == {("no_tumor", None), ("test", None)}


def test_nested_series_folder_under_a_class_and_hidden_files(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "no_tumor" / "a.png", smooth_image(1))
    write_image(root / "no_tumor" / "patient1" / "series" / "b.png", smooth_image(2))
    (root / "no_tumor" / ".DS_Store").write_bytes(b"junk")
    write_image(root / "no_tumor" / ".thumbs" / "c.png", smooth_image(3))
    write_image(root / "glioma_tumor" / "d.png", smooth_image(4))
    index = index_folder(root, HIERARCHY, OPTS)
    # hidden files are read and skipped with their own kinds, never silently dropped
    assert index.counts() == {"read": 5, "used": 3, "skipped": 2, "samples": 3}
    assert sorted(s.path.rsplit("/", 1)[1] for s in index.samples) == ["a.png", "b.png", "d.png"]
    assert {s.path.rsplit("/", 1)[1]: s.kind for s in index.skipped} == {
        ".DS_Store": "ds_store", "c.png": "hidden"}
    index.check_strict(True)  # metadata is not a data problem: strict mode does not fail


# ---------------------------------------------------------------------------- manifests
def write_manifest(path, text):
    path.write_text(text)
    return path


def test_manifest_with_patient_split_and_extra_columns(tiny_images, tmp_path):
    for i in range(5):
        write_image(tiny_images / "more" / f"m{i}.png", smooth_image(50 + i))
    manifest = write_manifest(
        tiny_images / "cases.csv",
        "path,label,patient_id,split,t2,frame\n"
        "no_tumor/gray.png,no_tumor,P1,Training,no_tumor/rgb.png,\n"
        "glioma_tumor/gray.png,glioma_tumor,P2,test,glioma_tumor/rgb.png,\n"
        "glioma_tumor/photo.jpg,glioma_tumor,P2,Val,glioma_tumor/gray.png,0\n"
        "more/m0.png,no_tumor,P3,somewhere,no_tumor/rgb.png,\n"
        "more/m1.png,no_tumor,P4,train,,\n"
        "more/m2.png,no_tumor,P5,train,no_tumor/missing.png,\n"
        "more/m3.png,,P6,train,no_tumor/rgb.png,\n"
        "more/m4.png,no_tumor,P7,train,no_tumor/rgb.png,first\n",
    )
    index = read_manifest(manifest, HIERARCHY, OPTS, extra_columns=["t2"])
    assert index.read == 8
    assert sorted(s.patient_id for s in index.samples) == ["P1", "P2", "P2"]
    assert index.counts() == {"read": 8, "used": 3, "skipped": 5, "samples": 3}
    (p1,) = [s for s in index.samples if s.patient_id == "P1"]
    assert p1.path == str(tiny_images / "no_tumor" / "gray.png")
    assert p1.split == "train" and p1.label == "no_tumor"
    assert p1.extra == (("t2", str(tiny_images / "no_tumor" / "rgb.png")),)
    splits = sorted((s.split, s.frame) for s in index.samples)
    assert splits == [("test", None), ("train", None), ("val", 0)]
    reasons = {s.reason.split(": ", 1)[1] if ": " in s.reason else s.reason: s.kind
               for s in index.skipped}
    assert reasons == {
        "split 'somewhere' is not one of train/val/test": "bad_row",
        "image column 't2' is empty; every row needs one image per input (fill in the t2 "
        "path, or remove the row)": "bad_row",
        f"image column 't2': {tiny_images / 'no_tumor' / 'missing.png'} does not exist "
        f"(relative paths are read from {tiny_images}); fix the path in the CSV or remove the "
        "row": "missing_file",
        "empty label": "no_label",
        "frame 'first' is not an integer": "bad_row",
    }
    # Every skip names the manifest line it came from.
    assert sorted(int(s.reason.split(":")[1]) for s in index.skipped) == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("rows, samples, skipped", [
    # the same image listed twice (a copy-pasted row)
    (["no_tumor/gray.png,no_tumor,train", "no_tumor/gray.png,no_tumor,train"], 3, 0),
    # two bad rows naming the same image
    (["no_tumor/gray.png,no_tumor,nowhere", "no_tumor/gray.png,no_tumor,elsewhere"], 1, 2),
])
def test_rows_naming_the_same_file_still_reconcile(tiny_images, rows, samples, skipped):
    """A manifest entry is a row: rows that name the same file must still give
    read = used + skipped."""
    manifest = write_manifest(
        tiny_images / "cases.csv",
        "path,label,split\n" + "\n".join(rows) + "\nglioma_tumor/gray.png,glioma_tumor,test\n")
    index = read_manifest(manifest, HIERARCHY, OPTS)
    assert len(index.samples) == samples and len(index.skipped) == skipped
    counts = index.counts()
    assert counts["read"] == 3
    assert counts["read"] == counts["used"] + counts["skipped"], counts


@pytest.mark.parametrize("header, missing", [
    ("file,label,patient_id", "path"),
    ("path,diagnosis,patient_id", "label"),
])
def test_missing_column_error_names_the_column(tmp_path, header, missing):
    manifest = write_manifest(tmp_path / "m.csv", header + "\na.png,x,p\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, HIERARCHY, OPTS)
    msg = str(info.value)
    assert f"missing column(s) ['{missing}']" in msg
    assert "m.csv" in msg


def test_missing_extra_column_error_names_the_column(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", "path,label,patient_id\na.png,no_tumor,p\n")
    with pytest.raises(ManifestError, match=r"extra image column\(s\) \['flair'\]"):
        read_manifest(manifest, HIERARCHY, OPTS, extra_columns=["flair"])


def test_manifest_paths_relative_to_root_or_absolute(tiny_images, tmp_path):
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    absolute = tiny_images / "no_tumor" / "gray.png"
    manifest = write_manifest(
        elsewhere / "m.csv",
        f"\ufeffpath,label\nglioma_tumor/gray.png,glioma_tumor\n{absolute},no_tumor\n")
    index = read_manifest(manifest, HIERARCHY, OPTS, root=tiny_images)
    assert [s.path for s in index.samples] == [str(tiny_images / "glioma_tumor" / "gray.png"),
                                             str(absolute)]
    assert index.counts() == {"read": 2, "used": 2, "skipped": 0, "samples": 2}
    assert all(s.patient_id is None for s in index.samples)


# ---------------------------------------------------------------------------- series
INSTANCES = {"a.dcm": 3, "b.dcm": 1, "c.dcm": 4, "d.dcm": 2}  # name order != slice order


def make_series(folder):
    """Four single-frame slices cut from the real multi-frame emri_small.dcm; slice k
    (InstanceNumber k) holds frame k-1.  File names sort differently from the slices."""
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True)
    src = read_ds(dicom_file("emri_small.dcm"))
    frames = src.pixel_array
    for name, inst in INSTANCES.items():
        ds = read_ds(dicom_file("emri_small.dcm"))
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.NumberOfFrames = 1
        ds.InstanceNumber = inst
        ds.PixelData = np.ascontiguousarray(frames[inst - 1]).tobytes()
        for tag in ("PerFrameFunctionalGroupsSequence",):
            if tag in ds:
                delattr(ds, tag)
        (folder / name).write_bytes(dataset_bytes(ds))
    (folder / "notes.txt").write_text("not a slice")  # ignored: not readable DICOM
    return frames


def test_series_folder_in_manifest_is_ordered_by_instance_number(tmp_path):
    frames = make_series(tmp_path / "cases" / "series1")
    manifest = write_manifest(tmp_path / "cases" / "m.csv",
                              "path,label,patient_id\nseries1,no_tumor,P9\n")
    order = sorted(INSTANCES, key=INSTANCES.get)  # b, d, a, c
    folder = tmp_path / "cases" / "series1"
    assert series_slices(folder) == [str(folder / n) for n in order]

    opts = ImageOptions(size=32, frames="all", window="minmax")
    index = read_manifest(manifest, HIERARCHY, opts)
    assert [s.path for s in index.samples] == [str(folder / n) for n in order]
    assert {(s.label, s.patient_id) for s in index.samples} == {("no_tumor", "P9")}
    # Slice k shows frame k-1 of the original acquisition.
    for k, s in enumerate(index.samples):
        got = decode.load_image(s.path, opts).image
        want = decode.load_image(dicom_file("emri_small.dcm"), opts, frame=k).image
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(frames[0], frames[3])

    middle = read_manifest(manifest, HIERARCHY, ImageOptions(size=32, frames="middle"))
    assert [s.path for s in middle.samples] == [str(folder / order[2])]
    first = read_manifest(manifest, HIERARCHY, ImageOptions(size=32, frames="first"))
    assert [s.path for s in first.samples] == [str(folder / order[0])]


def test_series_row_with_frame_column_picks_that_slice(tmp_path):
    make_series(tmp_path / "cases" / "s")
    manifest = write_manifest(tmp_path / "cases" / "m.csv", "path,label,frame\ns,no_tumor,1\n")
    index = read_manifest(manifest, HIERARCHY, OPTS)
    assert [s.path for s in index.samples] == [str(tmp_path / "cases" / "s" / "d.dcm")]


@pytest.mark.parametrize("frames", ["all", "middle"])
def test_series_counts_reconcile(tmp_path, frames):
    """One manifest row naming a series is one entry read and one entry used."""
    make_series(tmp_path / "cases" / "s")
    write_image(tmp_path / "cases" / "x.png", smooth_image(3))
    manifest = write_manifest(tmp_path / "cases" / "m.csv",
                              "path,label\ns,glioma_tumor\nx.png,no_tumor\n")
    counts = read_manifest(manifest, HIERARCHY, ImageOptions(size=32, frames=frames)).counts()
    assert counts["read"] == 2 and counts["skipped"] == 0
    assert counts["read"] == counts["used"] + counts["skipped"], counts


def test_empty_series_folder_is_skipped(tmp_path):
    (tmp_path / "cases" / "empty").mkdir(parents=True)
    (tmp_path / "cases" / "empty" / "readme.txt").write_text("nothing here")
    manifest = write_manifest(tmp_path / "cases" / "m.csv", "path,label\nempty,no_tumor\n")
    index = read_manifest(manifest, HIERARCHY, OPTS)
    assert index.samples == []
    (skip,) = index.skipped
    assert skip.kind == "empty_series" and skip.path.endswith("empty")
    assert index.counts() == {"read": 1, "used": 0, "skipped": 1, "samples": 0}
