"""What a process owns on disk: the run folder's one-writer lock, and temporary folders.

**One run folder, one writer.**  :func:`run_lock` takes an exclusive ``fcntl.flock`` on
``<run>/.kmedtl-lock`` for as long as a command writes the run folder (``kmedtl run``,
``train``, ``tune``, ``evaluate`` and ``export``/``push`` into the run folder).  A second
writer stops at once with :class:`RunFolderBusyError` (exit code 2) naming the holder's PID,
host, command and start time, which the holder writes into the lock file.  The kernel
drops the lock when the holder's process ends, however it ends (``kill -9`` included), so
there is never a stale lock to delete by hand (a file a killed holder left is simply locked
again).  A holder removes the file as it finishes, before it unlocks, and a process that
locked a file no longer at that path retries on the new one, so two processes never lock
two different files.  The lock is re-entrant within one process (the
pipeline's train stage calls ``run_training``, which locks the same folder again) and is
not inherited by the processes a command starts (``O_CLOEXEC``).  Commands that only read a
finished run (``predict``, ``evaluate --out`` elsewhere) take no lock.  Distributed jobs
whose processes share one run folder (``TF_CONFIG``, KerasTuner's
``KERASTUNER_ORACLE_IP``) coordinate themselves and take no lock; nor does a file system
that cannot lock (``ENOLCK``, ``EOPNOTSUPP``: a warning says so).

**Temporary folders.**  Exports and pushes write under a hidden temporary name and rename
it into place; a ``kill -9`` leaves the temporary folder (50-60 MB for a small model).
:func:`owned_name` puts the owner's PID and host into such a name
(``.export.tmp-p4242-h1a2b3c-9f8e7d6c``), and :func:`remove_stale` (called by the next
export or push into the same place) removes those whose owner is gone: a PID that no longer
runs on this host, or runs but started after the folder was last changed (a reused PID).
A folder whose owner cannot be checked (another host, or a name without a PID, from kmedtl
before this scheme) is removed once untouched for :data:`UNKNOWN_OWNER_STALE_S`.

Standard library only: the data commands and tests import this without TensorFlow.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from kmedtl.errors import KmedtlError

log = logging.getLogger("kmedtl")

#: The lock file inside a run folder.
LOCK_FILE = ".kmedtl-lock"
#: A temporary folder whose owner cannot be checked (another host's, or named before PIDs
#: were part of the name) is stale once untouched this long (seconds).
UNKNOWN_OWNER_STALE_S = 24 * 3600


class RunFolderBusyError(KmedtlError):
    """Another process is writing the run folder (``kmedtl`` exits with code 2)."""


def _host_id() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()


def _distributed() -> bool:
    """True inside a multi-process job that shares one run folder by design."""
    return bool(os.environ.get("TF_CONFIG", "").strip()
                or os.environ.get("KERASTUNER_ORACLE_IP", "").strip())


_HELD: dict[str, list] = {}  # realpath of the folder -> [fd, depth]
_HELD_GUARD = threading.Lock()


def _shown(value) -> str:
    text = str(value)[:200]
    return text if text.isprintable() else ascii(text)


def _holder(path: Path) -> str:
    """Who holds the lock, from what it wrote into the lock file (one line; the file is
    read as untrusted: at most 4 KiB, every field checked and escaped)."""
    info = {}
    for _ in range(20):  # the holder writes right after locking: wait briefly for it
        try:
            with open(path, "rb") as fh:
                info = json.loads(fh.read(4096) or b"{}")
        except (OSError, ValueError, RecursionError):
            info = {}
        if not isinstance(info, dict):
            info = {}
        if isinstance(info.get("pid"), int):
            break
        time.sleep(0.01)
    pid = info.get("pid")
    if not isinstance(pid, int):
        return "a process that has not yet said which"
    text = f"PID {pid}"
    if info.get("host"):
        text += f" on {_shown(info['host'])}"
    if info.get("command"):
        text += f", {_shown(info['command'])}"
    if info.get("started"):
        text += f", since {_shown(info['started'])}"
    if info.get("host") == socket.gethostname() and not pid_alive(pid):
        text += " (no longer running: a process it started still holds the lock)"
    return text


def acquire(folder, command: str = "kmedtl", *, create: bool = True) -> bool:
    """Lock ``folder`` for this process; re-entrant.  A missing folder is created, or with
    ``create=False`` left missing (the command then reports it) and not locked.  Returns
    False when no lock was taken (also a distributed job, or a file system without locks),
    raises :class:`RunFolderBusyError` when another process holds it.  Pair with
    :func:`release`, or use :func:`run_lock`."""
    folder = Path(folder)
    if not create and not folder.is_dir():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return True
        if _distributed():
            log.debug("%s: distributed job (TF_CONFIG / KERASTUNER_ORACLE_IP): no run "
                      "folder lock", folder)
            return False
        path = folder / LOCK_FILE
        for _ in range(100):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderBusyError(
                    f"{folder}: another kmedtl process is writing this run folder "
                    f"({_holder(path)}); wait for it to finish, or give this one another "
                    "run folder (--run-dir, or another name:)") from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    log.warning("%s: this file system cannot lock files (%s); nothing "
                                "stops two kmedtl processes from writing this run folder "
                                "at once", folder, exc.strerror)
                    return False
                raise
            # the last holder removes the file as it unlocks: a lock taken on a file
            # that is no longer at ``path`` locks nothing; open the new one
            if _same_file(fd, path):
                break
            os.close(fd)
        else:  # pragma: no cover - 100 holders came and went while we looked
            raise RunFolderBusyError(f"{folder}: the run folder's lock keeps changing "
                                     "hands; try again")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[key] = [fd, 1]
        return True


def release(folder) -> None:
    """Undo one :func:`acquire` of ``folder`` by this process (the last one unlocks)."""
    key = os.path.realpath(folder)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        fd = held[0]
        path = Path(key) / LOCK_FILE
        if _same_file(fd, path):  # removed while still locked (see acquire)
            with contextlib.suppress(OSError):
                path.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def run_lock(folder, command: str = "kmedtl", *, create: bool = True):
    """``with run_lock(run_dir, "kmedtl run"):`` -- see the module docstring and
    :func:`acquire`."""
    taken = acquire(folder, command, create=create)
    try:
        yield
    finally:
        if taken:
            release(folder)


def is_locked_here(folder) -> bool:
    """True when this process holds the lock of ``folder``."""
    return os.path.realpath(folder) in _HELD


# ------------------------------------------------------------------ temporary folders
_TAG = re.compile(r"p(\d+)-h([0-9a-f]{6})-")


def owned_name(prefix: str) -> str:
    """``prefix`` + ``p<PID>-h<host>-<random>``: a temporary name :func:`remove_stale`
    can tell the owner of."""
    return f"{prefix}{owned_tag()}{uuid.uuid4().hex[:8]}"


def owned_tag() -> str:
    """``p<PID>-h<host>-``: what :func:`owned_name` puts after the prefix (also a
    ``tempfile`` prefix, e.g. ``TemporaryDirectory(prefix="kmedtl-core-" + owned_tag())``)."""
    return f"p{os.getpid()}-h{_host_id()}-"


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host (also when owned by another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_started(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), from ``/proc`` (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5): starttime, after "(comm)" state
        with open("/proc/stat") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def stale_reason(path: Path, rest: str, legacy: str | None = None,
                 now: float | None = None) -> str | None:
    """Why the temporary ``path`` (``rest``: its name after the prefix) is stale, or None
    when its owner may still be writing it."""
    try:
        mtime = path.lstat().st_mtime
    except OSError:
        return None
    now = time.time() if now is None else now
    m = _TAG.match(rest)
    if m is None:
        if legacy is None or not re.fullmatch(legacy, rest):
            return None  # not one of ours
        if now - mtime > UNKNOWN_OWNER_STALE_S:
            return f"no owner recorded, untouched for {(now - mtime) / 3600:.0f} h"
        return None
    pid, host = int(m.group(1)), m.group(2)
    if host != _host_id():
        if now - mtime > UNKNOWN_OWNER_STALE_S:
            return f"owner on another host, untouched for {(now - mtime) / 3600:.0f} h"
        return None
    if pid == os.getpid():
        return None
    if not pid_alive(pid):
        return f"PID {pid} is no longer running"
    started = _pid_started(pid)
    if started is not None and mtime < started - 1.0:
        return f"PID {pid} now belongs to a process started after it"
    return None


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def remove_stale(parent, prefixes, *, legacy: str | None = r"[0-9a-f]{8}",
                 what: str = "temporary folder") -> list[dict]:
    """Remove the stale temporary folders (or files) in ``parent`` whose names start with
    one of ``prefixes`` (see the module docstring); returns ``[{"path", "bytes",
    "reason"}]`` of those removed and logs one warning line for them.  ``legacy``: a
    regular expression for what follows the prefix in names from before the owner was
    recorded (``None``: leave such names alone)."""
    parent = Path(parent)
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in names:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            continue
        path = parent / name
        try:
            if path.lstat().st_uid != os.getuid():
                continue  # another user's: not ours to judge (nor to remove)
        except OSError:
            continue
        reason = stale_reason(path, name[len(prefix):], legacy)
        if reason is None:
            continue
        size = _size(path) if path.is_dir() and not path.is_symlink() else 0
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("%s: could not remove this stale %s: %s", path, what, exc)
            continue
        removed.append({"path": str(path), "bytes": size, "reason": reason})
    if removed:
        total = sum(r["bytes"] for r in removed)
        log.warning("removed %d stale %s(s) left by interrupted processes in %s "
                    "(%.1f MB): %s", len(removed), what, parent, total / 1e6,
                    "; ".join(f"{Path(r['path']).name} ({r['reason']})" for r in removed))
    return removed
