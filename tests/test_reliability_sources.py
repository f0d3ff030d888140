"""Every file the user pointed at is accounted for (issue 14).

A folder unzipped on macOS carries ``__MACOSX/``, AppleDouble ``._*`` files (as many as
the images, with image extensions) and ``.DS_Store``; Windows adds ``Thumbs.db``.  They
are read, skipped with their own reason kinds and listed by kind, and never change how the
tree's layout (class vs split folders) is read.  A folder of files without class folders
(a PACS export) is audited unlabelled.
"""

import json
import os

import numpy as np
import pytest
from helpers import dataset_bytes, make_dicom, smooth_image, write_image

from kmedtl.cli import main
from kmedtl.data.audit import audit, format_summary
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import index_folder

OPTS = ImageOptions(size=32)


def files_on_disk(root) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def macos_zip_tree(root, split="Test"):
    """``root/<split>/{A,B}/img*.jpg`` unzipped on macOS, plus Windows and editor debris."""
    for c, label in enumerate(("A", "B")):
        for i in range(3):
            name = f"img{i}.jpg"
            write_image(root / split / label / name, smooth_image(10 * c + i), quality=90)
            # AppleDouble companions: same name with '._', image extension, 4 KB of metadata
            (root / split / label / f"._{name}").write_bytes(b"\x00\x05\x16\x07" + bytes(4092))
            mac = root / "__MACOSX" / split / label
            mac.mkdir(parents=True, exist_ok=True)
            (mac / f"._{name}").write_bytes(b"\x00\x05\x16\x07")
        (root / split / label / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / split / "A" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / split / "B" / ".notes.swp").write_bytes(b"vim swap")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "README.md").write_text("six photos\n")
    return root


def test_every_file_under_the_root_is_read_and_junk_has_its_own_kind(tmp_path):
    from kmedtl.data.sources import IGNORED_KINDS

    root = macos_zip_tree(tmp_path / "photos")
    index = index_folder(root, None, OPTS)
    c = index.counts()
    assert c["read"] == files_on_disk(root) == 6 + 6 + 6 + 2 + 1 + 1 + 1 + 1 + 1
    assert c["read"] == c["used"] + c["skipped"] and c["used"] == 6
    kinds = {}
    for s in index.skipped:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
        assert s.reason.strip() and s.kind in IGNORED_KINDS, s
    assert kinds == {"appledouble": 6, "macosx_folder": 6, "ds_store": 3, "thumbs_db": 1,
                     "hidden": 2, "documentation": 1}
    apple = next(s for s in index.skipped if s.kind == "appledouble")
    assert "AppleDouble" in apple.reason and "img" in apple.reason
    # the audit's summary lists them by kind; metadata never fails strict mode
    report = audit(index, OPTS, workers=1, progress=False)
    assert report["counts"]["read"] == c["read"] and report["counts"]["used"] == 6
    assert report["summary"]["ignored_by_kind"] == kinds
    text = format_summary(report)
    assert "appledouble 6" in text and "macosx_folder 6" in text and "ds_store 3" in text
    assert f"read {c['read']} = used 6 + skipped {c['skipped']}" in text
    index.check_strict(True)


@pytest.mark.parametrize("split", ["Test", "Training"])
def test_macosx_folder_does_not_change_how_the_layout_is_read(tmp_path, split):
    root = macos_zip_tree(tmp_path / "photos", split)
    index = index_folder(root, None, OPTS)
    expected = {"Test": "test", "Training": "train"}[split]
    assert {(s.label, s.split) for s in index.samples} == {("A", expected), ("B", expected)}


def test_macosx_beside_test_audits_cleanly_from_the_command_line(tmp_path, capsys):
    """Before: 'hierarchy: needs at least two leaf classes, got ['Test']' (exit 2)."""
    root = macos_zip_tree(tmp_path / "photos")
    out = tmp_path / "audit.json"
    rc = main(["data", "audit", str(root), "--no-cache", "--size", "32", "--workers", "1",
               "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "needs at least two leaf classes" not in captured.err
    report = json.loads(out.read_text())
    assert report["counts"]["by_split"] == {"test": {"A": 3, "B": 3}}
    assert report["counts"]["read"] == files_on_disk(root)


def test_strict_mode_still_fails_on_a_real_problem(tmp_path):
    root = macos_zip_tree(tmp_path / "photos")
    (root / "Test" / "A" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    rc = main(["data", "audit", str(root), "--no-cache", "--size", "32", "--workers", "1",
               "--strict"])
    assert rc == 1


# ---------------------------------------------------------------------------- unlabelled
def pacs_export(root):
    """A PACS export: DICOM files in one folder, no class folders, two patients, one
    byte-identical copy."""
    root.mkdir(parents=True)
    ramp = np.add.outer(np.arange(48), np.arange(48)).astype(np.uint16)
    for i, pid in enumerate(["MRN-4711", "MRN-4711", "MRN-0815"]):
        ds = make_dicom(ramp * (i + 1), patient_id=pid, patient_name=f"Doe^{pid}",
                        instance=i + 1)
        (root / f"IM{i:04d}").write_bytes(dataset_bytes(ds))
    (root / "IM0003").write_bytes((root / "IM0000").read_bytes())
    (root / "DICOMDIR.txt").write_text("exported by PACS\n")
    (root / "._IM0000").write_bytes(b"\x00\x05\x16\x07")
    return root


def test_unlabelled_folder_is_audited_without_label_statistics(tmp_path, capsys):
    """Before: 'hierarchy: the label tree is empty; give at least two classes' (exit 2)."""
    root = pacs_export(tmp_path / "pacs")
    out = tmp_path / "audit.json"
    rc = main(["data", "audit", str(root), "--no-cache", "--size", "32", "--workers", "1",
               "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    report = json.loads(out.read_text())
    c = report["counts"]
    assert (c["read"], c["used"], c["skipped"]) == (6, 4, 2) and c["labelled"] is False
    assert c["by_class"] == {}
    assert report["duplicate_groups"] == [["IM0000", "IM0003"]]
    assert report["label_conflicts"] == []
    assert report["patient_overlap"]["patients_with_id"] == 2
    assert "unlabelled" in printed.out and "patients with an ID: 2" in printed.out
    text = printed.out + printed.err + out.read_text()
    assert "MRN-" not in text and "Doe^" not in text


def test_unlabelled_folder_gives_a_clear_error_where_labels_are_needed(tmp_path, capsys):
    root = pacs_export(tmp_path / "pacs")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{root: {root}, cache_dir: null, image: {{size: 32}}}}\n")
    rc = main(["data", "split", str(cfg), "--out", str(tmp_path / "s.json"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no class folders" in err and "label tree is empty" not in err


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("argv", [
    ["data", "audit", "{root}", "--size", "0"],
    ["data", "cache", "{root}", "--size", "-5"],
    ["data", "show", "{root}/x.png", "--out", "x.png", "--size", "0"],
    ["data", "audit", "{root}", "--workers", "0"],
])
def test_invalid_sizes_and_worker_counts_are_refused(tmp_path, capsys, argv):
    """Before: ``--size 0`` was accepted (0 is falsy, so the override was dropped)."""
    argv = [a.format(root=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--size" in err or "--workers" in err
