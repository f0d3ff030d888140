"""The study's cells in worker processes (``--cells-per-process K``, kmedtl.study.runner).

A long study in one process grows per cell until the kernel kills it, so the runner trains
the cells in a spawned worker replaced after every K cells.  These tests check, on a tiny
synthetic study (32 px, ``cbr_micro``, no real dataset needed), that:

- K = 1 (a fresh process per cell) writes the same cell files as K = 0 (in-process), with
  the same metrics for the same seeds, and the worker's log lines reach the parent's log;
- a worker that dies in a cell (SIGKILL, as from the OOM killer) fails only that cell, with
  an error file naming the signal and the remedy, and the study goes on in a fresh worker;
- ``--cells-per-process`` parses and reaches :meth:`StudyRunner.run`.

Each worker start imports TensorFlow (about 10-15 s on two loaded cores), so the studies
here have two or three cells.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from study_isolation_helpers import die_in_cells_with_dropout, tiny_study

from kmedtl.errors import ConfigError
from kmedtl.study.config import load_study
from kmedtl.study.runner import CELLS_PER_PROCESS, StudyRunner


def _cells(out: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))
            if not p.name.endswith(".error.json")}


@pytest.fixture
def two_arm_study(tmp_path):
    return tiny_study(tmp_path, arms=[{"name": "flat"},
                                      {"name": "probe", "strategy": "linear_probe"}])


@pytest.mark.slow
def test_a_fresh_process_per_cell_writes_the_same_cells_as_in_process(two_arm_study,
                                                                       tmp_path, caplog):
    studies = load_study(two_arm_study)
    with caplog.at_level(logging.INFO, logger="kmedtl.study"):
        s0 = StudyRunner(studies, tmp_path / "k0").run(cells_per_process=0)
        s1 = StudyRunner(studies, tmp_path / "k1").run(cells_per_process=1)
    assert s0["ran_now"] == s1["ran_now"] == 2 and s0["failed_now"] == s1["failed_now"] == 0
    assert s0["memory"]["mode"] == "in-process" and s0["memory"]["workers_started"] == 0
    m1 = s1["memory"]
    assert m1["cells_per_process"] == 1 and m1["workers_started"] == 2
    assert m1["workers_died"] == 0
    pids = [row["pid"] for row in m1["cells"]]
    assert len(set(pids)) == 2 and os.getpid() not in pids  # one fresh worker per cell
    assert all(row["rss_mb"] and row["rss_mb"] > 50 for row in m1["cells"])
    assert m1["peak_rss_mb"]["parent"] > 0 and m1["peak_rss_mb"]["children"] > 0
    assert {row["pid"] for row in s0["memory"]["cells"]} == {os.getpid()}

    c0, c1 = _cells(tmp_path / "k0"), _cells(tmp_path / "k1")
    assert sorted(c0) == sorted(c1) and len(c0) == 2
    for name, a in c0.items():
        b = c1[name]
        assert set(a) == set(b)
        for field in ("key", "arm", "n", "seed", "n_train", "epochs", "recipe", "fingerprint"):
            assert a[field] == b[field], field
        # the same seed gives the same model in a fresh process (CPU, no XLA)
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-4)
        for metric, v in a["metrics"].items():
            assert b["metrics"][metric]["value"] == pytest.approx(v["value"], abs=1e-6), metric
    # the worker's own log lines (the result line of each cell) reach this process's log
    results = [r for r in caplog.records if r.getMessage().startswith("    balanced_accuracy")]
    assert len(results) == 4
    assert {r.process for r in results} == {os.getpid(), *pids}
    # ... in order: every cell's result line comes after its own "[i/n]" line
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith(("[", "    balanced_accuracy"))]
    assert [line.startswith("[") for line in lines] == [True, False] * 4


@pytest.mark.slow
def test_a_worker_that_dies_fails_only_its_cell(tmp_path, caplog):
    path = tiny_study(tmp_path, arms=[{"name": "flat"}, {"name": "doomed", "dropout": 0.3},
                                      {"name": "probe", "strategy": "linear_probe"}])
    runner = StudyRunner(load_study(path), tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="kmedtl.study"):
        status = runner.run(cells_per_process=2, worker_init=die_in_cells_with_dropout(0.3))
    assert status["ran_now"] == 2 and status["failed_now"] == 1 and status["done"] == 2
    mem = status["memory"]
    assert mem["workers_started"] == 2 and mem["workers_died"] == 1
    assert {c["arm"] for c in _cells(runner.out).values()} == {"flat", "probe"}
    (err_path,) = (runner.out / "cells").glob("*.error.json")
    err = json.loads(err_path.read_text())
    assert err["arm"] == "doomed" and err["signal"] == "SIGKILL" and err["exit_code"] == -9
    assert "killed by signal 9 (SIGKILL)" in err["error"]
    assert "out-of-memory" in err["error"] and "--cells-per-process" in err["error"]
    assert "--resume" in err["error"] and err["cells_before_in_worker"] == 1
    doomed = next(c for c in runner.cells if c.arm == "doomed")
    assert err_path.name == f"{doomed.key}.error.json"
    assert any("doomed" in r.getMessage() and "SIGKILL" in r.getMessage()
               and r.levelno == logging.ERROR for r in caplog.records)
    # the cell after the dead one ran in a new worker
    rows = {row["key"]: row for row in mem["cells"]}
    flat, probe = (next(c for c in runner.cells if c.arm == a) for a in ("flat", "probe"))
    assert rows[flat.key]["pid"] != rows[probe.key]["pid"]
    assert rows[doomed.key]["pid"] == rows[flat.key]["pid"]


def test_the_cli_flag_reaches_the_runner(monkeypatch, tmp_path, capsys):
    from kmedtl.study import cli

    assert cli.parser().parse_args(["s.yaml"]).cells_per_process == CELLS_PER_PROCESS > 0
    assert cli.parser().parse_args(["s.yaml", "--cells-per-process", "0"]).cells_per_process == 0
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["s.yaml", "--cells-per-process", bad])
    assert ">= 0" in capsys.readouterr().err
    assert "--cells-per-process" in cli.parser().format_help()

    seen = {}

    def fake_run(self, **kw):
        seen.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr(StudyRunner, "run", fake_run)
    path = tiny_study(tmp_path)
    assert cli.main([str(path), "--out", str(tmp_path / "o"), "--cells-per-process", "3"]) == 2
    assert seen["cells_per_process"] == 3
    assert cli.main([str(path), "--out", str(tmp_path / "o")]) == 2
    assert seen["cells_per_process"] == CELLS_PER_PROCESS


@pytest.mark.parametrize("k", [-1, 1.5, "2", None])
def test_run_rejects_a_bad_cells_per_process(tmp_path, k):
    runner = StudyRunner(load_study(tiny_study(tmp_path)), tmp_path / "out")
    with pytest.raises(ConfigError, match="cells_per_process"):
        runner.run(cells_per_process=k)
