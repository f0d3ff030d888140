"""The smoke version of the study, end to end on the real brain-tumour set (< 2 min).

``pipelines/study_smoke.yaml``: the four comparisons with two arms each, 32 px, N = 10 per
class, one seed, one epoch.  Checks what a user of the study would look at: RESULTS.md with
its tables and paired tests, CIs that bracket their values, cells saved as JSON, a rerun
with --resume that trains nothing, and a rerun without it that refuses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kmedtl.study.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "pipelines" / "study_smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(datasets_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study_smoke")
    results = out / "RESULTS.md"
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)  # the smoke config caches decoded images in ./.kmedtl_cache
    try:
        rc = main([str(SMOKE), "--out", str(out), "--results", str(results), "--no-plots"])
    finally:
        mp.undo()
    assert rc == 0
    return out, results


def _cells(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))
            if not p.name.endswith(".error.json")]


def test_every_cell_ran_and_is_saved(smoke_run):
    out, _ = smoke_run
    cells = _cells(out)
    # 8 arms, of which flat = scratch and full = simclr = full_fine_tune are shared cells
    assert len(cells) == 5
    assert not list((out / "cells").glob("*.error.json"))
    split = json.loads((out / "split.json").read_text())
    n_test = len(split["y_test"])
    for c in cells:
        assert c["n"] == 10 and c["seed"] == 0 and c["n_train"] == 40
        assert len(c["probs"]) == n_test
        assert all(abs(sum(row) - 1) < 1e-3 for row in c["probs"])


def test_cis_are_ordered(smoke_run):
    out, _ = smoke_run
    for c in _cells(out):
        for name in ("balanced_accuracy", "kappa", "auroc_macro", "f1_macro"):
            m = c["metrics"][name]
            assert m["ci_low"] <= m["value"] <= m["ci_high"], (c["arm"], name, m)


def test_split_is_duplicate_free(smoke_run):
    out, _ = smoke_run
    split = json.loads((out / "split.json").read_text())
    s = split["summary"]
    assert s["train_duplicates_removed"] > 0 and s["test_duplicates_removed"] > 0
    assert len(set(split["test_ids"])) == len(split["test_ids"])


def test_results_md_has_tables_and_paired_tests(smoke_run):
    _, results = smoke_run
    text = results.read_text()
    for title in ("flat vs hierarchical", "scratch vs same-domain SimCLR",
                  "full vs truncated", "linear probe"):
        assert title in text
    assert text.count("| arm | N=10 |") == 4 * 4  # 4 metrics x 4 comparisons
    tables = re.findall(r"^\| (?:hierarchical|simclr|cut_block2|linear_probe) \| 10 \| "
                        r"([+-]\d+\.\d) \| ([+-]\d+\.\d) to ([+-]\d+\.\d) \|", text, re.M)
    assert len(tables) == 4  # one paired row per comparison
    for diff, lo, hi in tables:
        assert float(lo) <= float(diff) <= float(hi)
    assert "McNemar" in text and "Expected from the papers vs found" in text
    assert "2 CPU cores" in text or "CPU cores" in text
    assert "Every planned cell ran" in text


def test_resume_skips_done_cells_and_a_plain_rerun_refuses(smoke_run, capsys):
    out, results = smoke_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)
    try:
        assert main([str(SMOKE), "--out", str(out), "--results", str(results), "--resume",
                     "--no-plots"]) == 0
        assert "(0 now" in capsys.readouterr().out
        assert main([str(SMOKE), "--out", str(out), "--results", str(results),
                     "--no-plots"]) == 2
        assert "--resume" in capsys.readouterr().err
    finally:
        mp.undo()
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert after == before
