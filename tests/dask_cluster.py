"""A real ``dask.distributed`` cluster for tests: a ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1 (separate processes started with the ``dask`` command line, talking
TCP, not an in-process ``LocalCluster``), every process group killed by the fixture's
finaliser.  Shared by ``tests/test_beam_dask.py`` and ``tests/test_study_dask.py``: import
the fixture into a test module (``from dask_cluster import dask_cluster_fixture``) and ask
for ``dask_cluster``; each module gets its own cluster.  The importing module decides
whether a missing ``distributed`` skips or fails (CI must fail)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _dask_cli(*args) -> list[str]:
    return [sys.executable, "-m", "dask", *args]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (a worker's nanny and its worker process), then
    SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:  # the group may outlive its leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Cluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.client = None
        self.address = ""

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - the process owns it
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=self.folder, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
                         for p in sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        for proc in reversed(self.procs):
            _stop(proc)

    def workers(self) -> set[str]:
        return set(self.client.scheduler_info(n_workers=-1)["workers"])

    def workers_that_ran_tasks_since(self, t0: float) -> set[str]:
        return {r["worker"] for r in self.client.get_task_stream(start=t0)}


@pytest.fixture(scope="module", name="dask_cluster")
def dask_cluster_fixture(tmp_path_factory):
    """A ``dask scheduler`` (free port, via ``--scheduler-file``) and two single-thread
    ``dask worker`` processes on 127.0.0.1; every process group is killed afterwards.
    The scheduler quits after 5 idle minutes and the workers 60 s after losing it, should
    this process die before its finaliser runs."""
    import distributed  # the importing test module has checked that it is installed

    folder = tmp_path_factory.mktemp("dask")
    sched_file = folder / "scheduler.json"
    cluster = Cluster(folder)
    try:
        cluster.spawn("scheduler", _dask_cli(
            "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
            "--scheduler-file", str(sched_file), "--idle-timeout", "300s"))
        for i in range(2):
            cluster.spawn(f"worker{i}", _dask_cli(
                "worker", "--scheduler-file", str(sched_file), "--host", "127.0.0.1",
                "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                "--death-timeout", "60s", "--name", f"kmedtl-test-{i}"))
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            if any(p.poll() is not None for p in cluster.procs):
                break
            time.sleep(0.2)
        assert sched_file.exists(), f"the dask scheduler did not start:\n{cluster.logs()}"
        cluster.address = json.loads(sched_file.read_text())["address"]
        cluster.client = distributed.Client(cluster.address, timeout=30,
                                            set_as_default=False)
        try:
            cluster.client.wait_for_workers(2, timeout=60)
        except TimeoutError:
            pytest.fail(f"two dask workers did not register:\n{cluster.logs()}")
        cluster.client.get_task_stream()  # start recording the task stream
        yield cluster
    finally:
        cluster.stop()
