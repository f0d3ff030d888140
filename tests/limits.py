"""Run a command under a memory and time cap, for the hostile-input suite (issue 21).

:func:`run_capped` starts ``argv`` in its own process group and polls the resident set
size of the whole group (``/proc/<pid>/status`` ``VmRSS`` of every process in it) every
20 ms.  Over ``rss_mb`` or past ``timeout`` seconds the group is killed, and the result
says which limit fired.  Polling RSS, rather than ``RLIMIT_AS``, works for TensorFlow
children too, which reserve many GiB of address space they never touch.

A test asserts ``res.ok`` (it finished within both caps) and then its own expectations on
``res.rc`` / ``res.out``; ``res.peak_mb`` is the largest group RSS seen.

    >>> import sys
    >>> res = run_capped([sys.executable, "-c", "print(1)"], rss_mb=200, timeout=30)
    >>> res.ok, res.rc, res.out.strip()
    (True, 0, '1')
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Capped:
    rc: int | None
    out: str
    err: str
    peak_mb: float
    seconds: float
    killed: str | None  # "memory" or "time" when a cap fired, else None

    @property
    def ok(self) -> bool:
        return self.killed is None

    def why(self) -> str:
        """A failure message: which cap fired, the peak RSS, and the tail of stderr."""
        return (f"killed={self.killed} rc={self.rc} peak={self.peak_mb:.0f} MB "
                f"t={self.seconds:.1f}s\nstdout: {self.out[-1500:]}\nstderr: "
                f"{self.err[-3000:]}")


def _group_rss_kb(pgid: int) -> int:
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.getpgid(int(d)) != pgid:
                continue
            with open(f"/proc/{d}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError, ProcessLookupError):
            continue
    return total


def run_capped(argv, *, rss_mb: float, timeout: float, env: dict | None = None,
               cwd=None, stdin: str | None = None) -> Capped:
    """Run ``argv``; kill its process group past ``rss_mb`` MB of RSS or ``timeout`` s."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd, env=full_env,
                                stdin=subprocess.PIPE if stdin is not None else
                                subprocess.DEVNULL, start_new_session=True)
        if stdin is not None:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        peak, killed = 0, None
        while proc.poll() is None:
            rss = _group_rss_kb(proc.pid)
            peak = max(peak, rss)
            if rss > rss_mb * 1024:
                killed = "memory"
            elif time.monotonic() - t0 > timeout:
                killed = "time"
            if killed:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                break
            time.sleep(0.02)
        seconds = time.monotonic() - t0
        try:  # reap stragglers of the group (workers) either way
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        out.seek(0)
        err.seek(0)
        return Capped(proc.returncode, out.read().decode(errors="replace"),
                      err.read().decode(errors="replace"), peak / 1024.0, seconds, killed)


def kmedtl(*args, rss_mb: float, timeout: float, **kw) -> Capped:
    """``python -m kmedtl ARGS`` under the caps."""
    return run_capped([sys.executable, "-m", "kmedtl", *map(str, args)], rss_mb=rss_mb,
                      timeout=timeout, **kw)


def python(code: str, *, rss_mb: float, timeout: float, **kw) -> Capped:
    """``python -c CODE`` under the caps."""
    return run_capped([sys.executable, "-c", code], rss_mb=rss_mb, timeout=timeout, **kw)
