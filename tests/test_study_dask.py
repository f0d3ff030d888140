"""The study grid on a Dask cluster: ``python -m kmedtl.study STUDY --executor dask
--scheduler HOST:PORT`` (kmedtl.study.dask_executor).

On a real cluster -- a ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1
(tests/dask_cluster.py, shared with tests/test_beam_dask.py) -- a tiny synthetic study (32 px,
``cbr_micro``: a flat arm, a linear probe and an arm fine-tuned from a same-domain SimCLR
backbone, so pretraining travels too) must write the same cell files as a local run of the
same study (timings, hardware and finishing time aside), with both workers training cells,
each cell written and counted once, and a ``--resume`` that sends nothing to the cluster.
Also: the one-line errors (unreachable scheduler, flags, dask missing) and a cell whose
workers all died.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from study_isolation_helpers import tiny_study

if os.environ.get("CI", "").strip().lower() in ("true", "1"):
    import distributed  # noqa: F401 - CI installs kmedtl[test] (with distributed): fail, never skip
else:
    pytest.importorskip("distributed", reason="the Dask executor: pip install 'kmedtl[dask]'")

from dask_cluster import dask_cluster_fixture  # noqa: E402, F401 - fixture `dask_cluster`

from kmedtl.errors import BackendUnavailableError, ConfigError, KmedtlError  # noqa: E402
from kmedtl.study import cli  # noqa: E402
from kmedtl.study import dask_executor as de  # noqa: E402
from kmedtl.study.config import load_study  # noqa: E402
from kmedtl.study.runner import Cell, StudyRunner  # noqa: E402

#: Fields of a cell file that depend on where and when it ran, not on what it computed.
RUN_FIELDS = {"seconds", "hardware", "finished_at"}


def _study(tmp: Path) -> Path:
    """:func:`tiny_study` with a flat arm, a linear probe and a SimCLR-initialised arm."""
    path = tiny_study(tmp, arms=[{"name": "flat"},
                                 {"name": "probe", "strategy": "linear_probe"},
                                 {"name": "simclr", "init": "simclr"}])
    doc = yaml.safe_load(path.read_text())
    doc["pretrain"] = {"simclr": {"method": "simclr", "epochs": 1, "batch_size": 8}}
    path.write_text(yaml.safe_dump(doc))
    return path


def _files(out: Path, sub: str) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / sub).glob("*.json"))}


def _host_port(address: str) -> str:
    return address.split("://", 1)[1]


@pytest.mark.integration
@pytest.mark.slow
def test_cells_on_a_dask_cluster_equal_a_local_run(dask_cluster, tmp_path, capsys):
    study = _study(tmp_path)
    local = StudyRunner(load_study(study), tmp_path / "local").run(cells_per_process=0)
    assert local["ran_now"] == 3 and local["failed_now"] == 0

    out = tmp_path / "dask"
    t0 = time.time()
    argv = [str(study), "--out", str(out), "--no-plots", "--executor", "dask",
            "--scheduler", _host_port(dask_cluster.address)]
    assert cli.main(argv) == 0, dask_cluster.logs()
    assert "study: 3 of 3 cells done (3 now, 0 failed" in capsys.readouterr().out

    # the same cell files, written here once each (no error files), timings aside
    a, b = _files(tmp_path / "local", "cells"), _files(out, "cells")
    assert sorted(a) == sorted(b) and len(b) == 3
    for name, row in a.items():
        assert {k: v for k, v in b[name].items() if k not in RUN_FIELDS} == \
            {k: v for k, v in row.items() if k not in RUN_FIELDS}, name
    assert {r["arm"] for r in b.values()} == {"flat", "probe", "simclr"}
    # the pretrained backbone came back and was written as a local run writes it
    pa, pb = _files(tmp_path / "local", "pretrain"), _files(out, "pretrain")
    assert sorted(pa) == sorted(pb) and len(pb) == 1
    for name, meta in pa.items():
        assert {k: v for k, v in pb[name].items() if k not in ("seconds", "path")} == \
            {k: v for k, v in meta.items() if k not in ("seconds", "path")}
        assert pb[name]["path"] == str(out / "pretrain" / name.replace(".json", ".weights.h5"))
    assert len(list((out / "pretrain").glob("*.weights.h5"))) == 1

    # both workers trained cells; each cell was counted once; none ran in this process
    status = json.loads((out / "status.json").read_text())
    mem = status["memory"]
    assert status["ran_now"] == 3 and status["failed_now"] == 0 and status["done"] == 3
    assert mem["mode"] == f"dask scheduler {dask_cluster.address}"
    assert set(mem["dask_workers"]) == dask_cluster.workers()
    assert sorted(r["key"] for r in mem["cells"]) == sorted(r["key"] for r in b.values())
    assert {r["worker"] for r in mem["cells"]} == dask_cluster.workers()
    assert len({r["pid"] for r in mem["cells"]}) == 2 and os.getpid() not in \
        {r["pid"] for r in mem["cells"]}
    tasks = dask_cluster.client.get_task_stream(start=t0)
    names = [t["key"] if isinstance(t["key"], str) else str(t["key"]) for t in tasks]
    assert sorted(n for n in names if n.startswith("kmedtl-study-cell-")) == \
        sorted(f"kmedtl-study-cell-{r['key']}" for r in b.values())
    # the first cell that needed the SimCLR backbone pretrained it (no separate task)
    assert not any(n.startswith("kmedtl-study-pretrain-") for n in names)

    # --resume: nothing is sent to the cluster, nothing is written again
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    t1 = time.time()
    assert cli.main([*argv, "--resume"]) == 0
    assert "study: 3 of 3 cells done (0 now, 0 failed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == mtimes
    assert dask_cluster.workers_that_ran_tasks_since(t1) == set()

    # a lost cell file: --resume trains that cell alone, from the weights in pretrain/
    simclr = next(name for name, row in b.items() if row["arm"] == "simclr")
    (out / "cells" / simclr).unlink()
    t2 = time.time()
    assert cli.main([*argv, "--resume"]) == 0
    assert "study: 3 of 3 cells done (1 now, 0 failed" in capsys.readouterr().out
    again = json.loads((out / "cells" / simclr).read_text())
    assert {k: v for k, v in again.items() if k not in RUN_FIELDS} == \
        {k: v for k, v in a[simclr].items() if k not in RUN_FIELDS}
    names = sorted(str(t["key"]) for t in dask_cluster.client.get_task_stream(start=t2))
    assert names == sorted([f"kmedtl-study-cell-{a[simclr]['key']}",
                            f"kmedtl-study-pretrain-{a[simclr]['pretrain_key']}"])


def test_an_unreachable_scheduler_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(de, "CONNECT_TIMEOUT", 2)
    study = tiny_study(tmp_path)
    code = cli.main([str(study), "--out", str(tmp_path / "out"), "--executor", "dask",
                     "--scheduler", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:9 (")
    assert "`dask scheduler`" in err and "--scheduler HOST:PORT" in err
    assert err.count("\n") == 1  # one line
    assert not (tmp_path / "out").exists()  # failed before planning anything


def test_the_executor_flags(tmp_path, capsys):
    study = str(tiny_study(tmp_path))
    assert cli.main([study, "--scheduler", "h:1"]) == 2
    assert "--scheduler needs --executor dask" in capsys.readouterr().err
    assert cli.main([study, "--executor", "dask"]) == 2
    assert "--executor dask needs --scheduler HOST:PORT" in capsys.readouterr().err
    args = cli.parser().parse_args([study, "--executor", "dask", "--scheduler", "h:1",
                                    "--cells-per-process", "3"])
    executor = cli._executor(args)
    assert executor.address == "tcp://h:1" and executor.k == 3
    assert de.scheduler_address("10.0.0.5:8786") == "tcp://10.0.0.5:8786"
    assert de.scheduler_address("tls://h:1") == "tls://h:1"
    with pytest.raises(ConfigError, match="HOST:PORT"):
        de.scheduler_address(" ")


def test_without_dask_the_error_gives_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    monkeypatch.delitem(sys.modules, "kmedtl.study.dask_executor")
    with pytest.raises(BackendUnavailableError, match=r"pip install 'kmedtl\[dask\]'"):
        importlib.import_module("kmedtl.study.dask_executor")


class _Lost:
    """A Dask future whose workers all died (the scheduler gave up on it)."""

    key = "kmedtl-study-cell-x"

    def result(self):
        raise de.KilledWorker("kmedtl-study-cell-x", SimpleNamespace(address="tcp://w:1"), 3)


class _Broken(_Lost):
    def result(self):
        raise ConfigError("its split differs from the parent's")


def test_a_cell_whose_workers_died_gets_an_error_file(tmp_path):
    runner = StudyRunner(load_study(tiny_study(tmp_path)), tmp_path / "out")
    cell = Cell("iso", "flat", 4, 0, "0123abcd", {}, "scratch")  # no split needed
    (runner.out / "cells").mkdir(parents=True)
    pool = de._DaskCells(runner, None, "tcp://127.0.0.1:1", retries=2)
    out = pool._finish(cell, _Lost())
    assert out["ok"] is False and pool.died == 1 and out["error"].startswith("WorkerDied")
    err = json.loads(runner.cell_path(cell.key).with_suffix(".error.json").read_text())
    assert err["key"] == cell.key and "died or were lost" in err["error"]
    assert "--resume" in err["error"]
    assert not runner.done(cell.key)
    # any other failure of the task (not of the cell's training) stops the study, clearly
    with pytest.raises(KmedtlError, match="a Dask worker could not run cell .*split differs"):
        pool._finish(cell, _Broken())
    np.testing.assert_equal(pool.peak, 0.0)
