"""The kmedtl command: audit, cache, show, split, exit codes."""

import json
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from helpers import smooth_image, write_image
from PIL import Image

from kmedtl.cli import main


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    for split in ("Training", "Testing"):
        for c, label in enumerate(("no_tumor", "glioma_tumor")):
            for i in range(4):
                write_image(root / split / label / f"{i}.png",
                            smooth_image(100 * c + 10 * i + (split == "Testing"), size=40))
    # a cross-split exact duplicate and a bad file
    (root / "Testing" / "glioma_tumor" / "dup.png").write_bytes(
        (root / "Training" / "glioma_tumor" / "0.png").read_bytes())
    (root / "Training" / "no_tumor" / "empty.png").write_bytes(b"")
    return root


def test_audit_writes_json_with_required_keys(tree, tmp_path, capsys):
    out = tmp_path / "audit.json"
    rc = main(["data", "audit", str(tree), "--json", str(out), "--cache-dir",
               str(tmp_path / "c"), "--size", "32", "--workers", "1"])
    assert rc == 0
    report = json.loads(out.read_text())
    for key in ("counts", "skipped", "duplicate_groups", "cross_split_duplicate_groups"):
        assert key in report
    c = report["counts"]
    assert c["read"] == 18 and c["read"] == c["used"] + c["skipped"] and c["skipped"] == 1
    assert report["skipped"][0]["path"].endswith("empty.png")
    assert ["Testing/glioma_tumor/dup.png", "Training/glioma_tumor/0.png"] in \
        report["cross_split_duplicate_groups"]
    assert "read 18 = used 17 + skipped 1" in capsys.readouterr().out


def test_audit_strict_exits_1(tree, tmp_path):
    assert main(["data", "audit", str(tree), "--strict", "--no-cache", "--size", "32",
                 "--workers", "1"]) == 1


def test_cache_command_reports_and_reuses(tree, tmp_path, capsys):
    args = ["data", "cache", str(tree), "--cache-dir", str(tmp_path / "c"), "--size", "32",
            "--workers", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "16 decoded" in first and "skipped 1" in first  # dup.png reuses 0.png's entry
    assert main(args) == 0
    assert "0 decoded" in capsys.readouterr().out


def test_show_renders_png_without_patient_identifiers(tmp_path, capsys):
    src = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "CT_small.dcm")
    ds = pydicom.dcmread(src)
    out = tmp_path / "ct.png"
    assert main(["data", "show", src, "--out", str(out), "--window", "brain", "--size", "64"]) == 0
    printed = capsys.readouterr().out
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[0] > 200
    assert "preset brain" in printed and "CT" in printed
    for ident in (str(ds.PatientName), str(ds.PatientID)):
        if ident:
            assert ident not in printed


def test_show_missing_file_exits_2_with_clear_message(tmp_path, capsys):
    rc = main(["data", "show", str(tmp_path / "nope.dcm"), "--out", str(tmp_path / "x.png")])
    assert rc == 2
    assert "nope.dcm: file does not exist" in capsys.readouterr().err


def test_split_command_writes_leakage_free_split(tree, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{root: {tree}, cache_dir: {tmp_path / 'c'}, image: {{size: 32}}}}\n"
                   "split: {method: source, val: 0.25}\n")
    out = tmp_path / "splits.json"
    assert main(["data", "split", str(cfg), "--out", str(out), "--workers", "1"]) == 0
    data = json.loads(out.read_text())
    fold = data["folds"][0]
    assert "Training/glioma_tumor/0.png" not in fold["train"] + fold["val"]
    assert "Testing/glioma_tumor/dup.png" in fold["test"]
    assert {d["id"] for d in data["dropped"]} == {"Training/glioma_tumor/0.png"}


def test_console_script_runs_in_a_fresh_process(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "kmedtl")
    res = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("kmedtl ")


def test_data_package_never_imports_the_config():
    """``kmedtl.data`` sits below ``kmedtl.config`` (and the root CLI): the data commands
    get the YAML -> config resolution handed in by ``kmedtl.cli``."""
    from test_import_graph import import_graph

    graph = import_graph()
    up = {src: sorted(d for d in dsts if d in ("kmedtl.config", "kmedtl.cli"))
          for src, dsts in graph.items() if src.startswith("kmedtl.data")}
    assert {src: d for src, d in up.items() if d} == {}
    assert "kmedtl.data.cli" in graph["kmedtl.cli"]


def test_data_commands_use_the_config_loader_they_are_given(tree, tmp_path, capsys):
    import argparse

    from kmedtl.config import load_config
    from kmedtl.data.cli import add_parsers

    seen = []

    def loader(source):
        seen.append(source)
        return load_config(source)

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True), load_config=loader)
    args = parser.parse_args(["data", "audit", str(tree), "--no-cache", "--size", "32",
                              "--workers", "1"])
    assert args.func(args) == 0
    assert "read 18 = used 17 + skipped 1" in capsys.readouterr().out
    # SOURCE as a folder, then the overridden values re-validated
    assert seen[0] == {"data": {"source": "folder", "root": str(tree)}}
    assert seen[1]["data"]["image"]["size"] == 32 and len(seen) == 2

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{root: {tree}, image: {{size: 32}}}}\n"
                   "split: {method: source, val: 0.25}\n")
    seen.clear()
    args = parser.parse_args(["data", "split", str(cfg), "--out", str(tmp_path / "s.json"),
                              "--workers", "1"])
    assert args.func(args) == 0
    assert seen == [str(cfg)]


def test_audit_console_lists_classes_overall_and_per_split(tree, capsys):
    """Before: the per-class counts were only in --json."""
    assert main(["data", "audit", str(tree), "--no-cache", "--size", "32",
                 "--workers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # 17 used: Testing 4 + 4 + dup.png, Training 4 + 4 (+ empty.png, skipped)
    assert "by class: glioma_tumor 9, no_tumor 8" in lines
    assert "by class in test: glioma_tumor 5, no_tumor 4" in lines
    assert "by class in train: glioma_tumor 4, no_tumor 4" in lines


def test_data_commands_take_a_pipeline_yaml(tree, tmp_path, capsys, monkeypatch):
    """Before: ``pipeline: unknown field``.  The pipeline section is dropped; paths stay
    relative to the pipeline file's folder, as in ``kmedtl run``."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "tree").symlink_to(tree)
    pipe = folder / "p.yaml"
    pipe.write_text("name: p\ndata: {root: tree, image: {size: 32}}\n"
                    "split: {method: source, val: 0.25}\n"
                    "pipeline: {stages: [audit, split, train]}\n")
    monkeypatch.chdir(tmp_path)  # not the file's folder
    assert main(["data", "audit", str(pipe), "--no-cache", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "read 18 = used 17 + skipped 1" in out and "by class: glioma_tumor 9" in out
    splits = tmp_path / "s.json"
    assert main(["data", "split", str(pipe), "--out", str(splits), "--workers", "1"]) == 0
    assert "Testing/glioma_tumor/dup.png" in json.loads(splits.read_text())["folds"][0]["test"]
    # a mistake outside the pipeline section still names the file and the field
    pipe.write_text("data: {root: tree, image: {size: 32}, colour: red}\n"
                    "pipeline: {stages: [audit]}\n")
    assert main(["data", "audit", str(pipe), "--no-cache", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"kmedtl: error: {pipe}" in err and "colour" in err


@pytest.mark.integration
@pytest.mark.slow
def test_split_of_the_shipped_pipeline(datasets_dir, tmp_path, monkeypatch, capsys):
    """``kmedtl data split pipelines/brain_tumor_hierarchical.yaml --out s.json``, as the
    README's main job reads it (Training/, its hierarchy file, dedupe: similar)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)  # the shipped cache_dir (.kmedtl_cache) is the main job's
    out = tmp_path / "s.json"
    assert main(["data", "split", "pipelines/brain_tumor_hierarchical.yaml", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    data = json.loads(out.read_text())
    fold = data["folds"][0]
    n = len(fold["train"]) + len(fold["val"]) + len(fold["test"]) + len(data["dropped"])
    assert n == 2870  # Training/ only: Testing/ is the pipeline's external set
    assert 0.12 < len(fold["test"]) / n < 0.18  # split: {test: 0.15}
