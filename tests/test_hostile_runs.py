"""Hostile runs (issue 21, items 10, 11 and the export part of 13): two writers of one run
folder, a damaged cache entry, and the temporary folders a ``kill -9`` of export leaves.

The commands run in child processes under a memory and time cap (:mod:`limits`).  The
lock holder is a light child (``kmedtl.ownership`` only, no TensorFlow), so no model is
trained: the second writer is a real ``kmedtl run``; ``kmedtl evaluate``, ``export`` and
``push`` are checked in this process against the same holder (they stop before loading
anything).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import smooth_image, write_image
from limits import ROOT, kmedtl, python

from kmedtl.ownership import (
    LOCK_FILE,
    UNKNOWN_OWNER_STALE_S,
    RunFolderBusyError,
    owned_name,
    remove_stale,
    run_lock,
)

RSS_DATA_MB = 500  # a `kmedtl data` child (no TensorFlow): ~150 MB
RSS_TF_MB = 1500  # a `kmedtl run` child imports TensorFlow and Keras: ~700 MB


def _tree(root: Path, per_class: int = 4) -> Path:
    k = 0
    for label in ("normal", "tumor"):
        for i in range(per_class):
            k += 1
            write_image(root / label / f"{i}.png", smooth_image(k, size=40))
    return root


def _pipeline(tmp_path: Path, stages=("audit",)) -> Path:
    cfg = {"name": "pipe",
           "data": {"root": str(_tree(tmp_path / "data")), "image": {"size": 32, "channels": 1},
                    "cache_dir": str(tmp_path / "cache"), "workers": 1},
           "split": {"method": "holdout", "val": 0.25, "test": 0.25, "dedupe": "exact"},
           "output_dir": str(tmp_path / "runs"),
           "pipeline": {"stages": list(stages)}}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _hold(folder: Path, extra: str = "") -> subprocess.Popen:
    """A child holding ``folder``'s lock (and running ``extra``) until killed."""
    code = (f"import sys, time\nfrom kmedtl.ownership import run_lock\n"
            f"with run_lock({str(folder)!r}, 'kmedtl run holder.yaml'):\n"
            f"    {extra or 'pass'}\n"
            f"    print('locked', flush=True)\n    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _one_line_error(res, *needles):
    assert res.ok, res.why()
    assert res.rc == 2, res.why()
    assert "Traceback" not in res.err, res.why()
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kmedtl: error: "), res.why()
    for needle in needles:
        assert needle in lines[0], (needle, res.why())


# ------------------------------------------------------------------ item 10: one writer
@pytest.mark.slow
def test_a_second_writer_stops_at_once_naming_the_holder_and_kill_9_frees_the_folder(
        tmp_path):
    pipe = _pipeline(tmp_path)
    run = tmp_path / "runs" / "pipe"
    holder = _hold(run)
    try:
        res = kmedtl("run", pipe, "--run-dir", run, rss_mb=RSS_TF_MB, timeout=120,
                     cwd=tmp_path)
        _one_line_error(res, str(run), f"PID {holder.pid}", "kmedtl run holder.yaml",
                        "another kmedtl process is writing this run folder", "--run-dir")
        assert res.peak_mb < RSS_TF_MB
        assert holder.poll() is None  # the first writer continues untouched
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing was written
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid

        # the other writing commands stop the same way (before loading anything)
        from kmedtl.cli import main as kmedtl_main
        from kmedtl.export import export_run, push_run

        for call in (lambda: export_run(run), lambda: push_run(run, root=tmp_path / "sm")):
            with pytest.raises(RunFolderBusyError, match=f"PID {holder.pid}"):
                call()
        assert kmedtl_main(["evaluate", str(run)]) == 2
    finally:
        _kill9(holder)

    # the kernel dropped the dead holder's lock: a new run proceeds, nothing to delete
    res = kmedtl("run", pipe, "--run-dir", run, rss_mb=RSS_TF_MB, timeout=180, cwd=tmp_path)
    assert res.ok and res.rc == 0, res.why()
    assert res.peak_mb < RSS_TF_MB
    assert json.loads((run / "stages" / "audit.json").read_text())["status"] == "done"
    assert not (run / LOCK_FILE).exists()  # released and removed at the end


def test_the_lock_is_reentrant_in_one_process_and_not_held_by_a_second(tmp_path):
    """In a light child: nested locks (kmedtl run -> train) and a second process's try."""
    code = f"""
import subprocess, sys
from kmedtl.ownership import RunFolderBusyError, run_lock, is_locked_here
d = {str(tmp_path / 'r')!r}
with run_lock(d, 'outer'):
    with run_lock(d, 'inner'):
        pass
    assert is_locked_here(d)
    probe = "from kmedtl.ownership import run_lock\\nwith run_lock(%r): pass" % d
    p = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True)
    assert p.returncode == 1 and 'RunFolderBusyError' in p.stderr, p.stderr
    assert 'PID %d' % __import__('os').getpid() in p.stderr, p.stderr
assert not is_locked_here(d)
p = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True)
assert p.returncode == 0, p.stderr
print('ok')
"""
    res = python(code, rss_mb=RSS_DATA_MB, timeout=60)
    assert res.ok and res.rc == 0 and res.out.strip() == "ok", res.why()


# ------------------------------------------------------------ item 11: cache integrity
@pytest.mark.slow
def test_a_damaged_cache_entry_is_rebuilt_and_counted_never_reused(tmp_path):
    data = _tree(tmp_path / "data", per_class=3)
    cache = tmp_path / "cache"
    args = ("data", "cache", data, "--cache-dir", cache, "--size", 32)
    first = kmedtl(*args, rss_mb=RSS_DATA_MB, timeout=60, cwd=tmp_path)
    assert first.ok and first.rc == 0 and "6 images (6 decoded" in first.out, first.why()
    entries = sorted(cache.rglob("*.u8"))
    assert len(entries) == 6
    good = {p: p.read_bytes() for p in entries}
    entries[0].write_bytes(good[entries[0]][:100])                 # truncated
    entries[1].write_bytes(bytes(255 - b for b in good[entries[1]]))  # same size, garbage
    entries[2].write_bytes(good[entries[2]] + b"\0" * 7)           # too long
    entries[3].unlink()                                            # missing

    second = kmedtl(*args, rss_mb=RSS_DATA_MB, timeout=60, cwd=tmp_path)
    assert second.ok and second.rc == 0, second.why()
    assert second.peak_mb < RSS_DATA_MB
    for p, data_bytes in good.items():
        assert p.read_bytes() == data_bytes, p  # repaired, byte for byte
    assert "6 images (0 decoded, 2 reused, 4 rebuilt)" in second.out, second.why()
    assert "rebuilt 4 damaged cache entries" in second.err, second.why()
    for what in ("1 missing", "1 checksum mismatch", "2 wrong size"):
        assert what in second.err, (what, second.why())

    third = kmedtl(*args, rss_mb=RSS_DATA_MB, timeout=60, cwd=tmp_path)
    assert third.ok and "6 images (0 decoded, 6 reused, 0 rebuilt)" in third.out, third.why()


def test_a_damaged_entry_the_index_does_not_vouch_for_is_rebuilt_too(tmp_path):
    """A second copy of an image (another path, same content) meets the damaged entry in
    the worker, not through the index's fast path."""
    data = _tree(tmp_path / "data", per_class=2)
    cache = tmp_path / "cache"
    code = f"""
import glob, os, shutil
from kmedtl.data import ImageOptions, build_cache, index_folder
opts = ImageOptions(size=32, channels=1)
root = {str(data)!r}
first = build_cache(index_folder(root), opts, {str(cache)!r}, workers=1, progress=False)
entry = first.files[os.path.join(root, 'normal', '0.png')]
good = open(entry, 'rb').read()
open(entry, 'wb').write(good[:10])
shutil.copy(os.path.join(root, 'normal', '0.png'), os.path.join(root, 'normal', 'copy.png'))
for phash in (False, True):
    open(entry, 'wb').write(good[:10] if phash else bytes(len(good)))
    res = build_cache(index_folder(root), opts, {str(cache)!r}, workers=1, progress=False,
                      phash=phash)
    assert not res.skipped, res.skipped
    assert open(entry, 'rb').read() == good, (phash, res.summary())
    assert res.rebuilt >= 1, (phash, res.summary())
    assert res.summary()['cached'] == res.decoded + res.reused + res.rebuilt
print('ok')
"""
    res = python(code, rss_mb=RSS_DATA_MB, timeout=60)
    assert res.ok and res.rc == 0 and res.out.strip().endswith("ok"), res.why()


# ------------------------------------------------- item 13 (export): kill -9 leftovers
def _stale_by_kill_9(parent: Path, prefix: str, mb: int = 5) -> Path:
    """A temporary folder named by a child that is then killed with -9 (as export
    leaves it)."""
    parent.mkdir(parents=True, exist_ok=True)
    code = (f"import os\nfrom kmedtl.ownership import owned_name\n"
            f"d = os.path.join({str(parent)!r}, owned_name({prefix!r}))\n"
            f"os.makedirs(os.path.join(d, 'savedmodel', 'variables'))\n"
            f"open(os.path.join(d, 'savedmodel', 'variables', 'v.data'), 'wb')"
            f".write(b'x' * {mb << 20})\nprint(d, flush=True)\nimport time; time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    path = Path(proc.stdout.readline().strip())
    _kill9(proc)
    assert path.is_dir()
    return path


def test_export_removes_what_a_killed_export_left_and_nothing_live(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    dead = _stale_by_kill_9(run, ".export.tmp-")
    dead_old = _stale_by_kill_9(run, ".export.old-", mb=1)
    legacy_old = run / ".export.tmp-0a1b2c3d"     # named before PIDs: removed after 24 h
    legacy_new = run / ".export.tmp-4e5f6a7b"     # ... kept before that
    for p in (legacy_old, legacy_new):
        (p / "savedmodel").mkdir(parents=True)
    past = time.time() - UNKNOWN_OWNER_STALE_S - 60
    os.utime(legacy_old, (past, past))
    holder = _hold(run.parent / "other", extra=(
        f"import os; from kmedtl.ownership import owned_name; "
        f"os.mkdir(os.path.join({str(run)!r}, owned_name('.export.tmp-')))"))
    try:
        live = next(p for p in run.iterdir() if p.name.startswith(".export.tmp-p")
                    and p != dead)
        # the real path: export_run cleans before it reads the run (which has no model)
        from kmedtl.export import ExportError, export_run

        with pytest.raises(ExportError, match="not found"):
            export_run(run)
        left = sorted(p.name for p in run.iterdir())
        assert dead.name not in left and dead_old.name not in left
        assert legacy_old.name not in left
        assert legacy_new.name in left and live.name in left  # their owners may be writing
    finally:
        _kill9(holder)
    # push's temporary version folders in saved_models/<name>/ follow the same rule
    base = tmp_path / "saved_models" / "m"
    stale_push = _stale_by_kill_9(base, ".tmp-", mb=1)
    (base / "1").mkdir()
    removed = remove_stale(base, ".tmp-")
    assert [r["path"] for r in removed] == [str(stale_push)]
    assert removed[0]["bytes"] >= 1 << 20 and "no longer running" in removed[0]["reason"]
    assert sorted(p.name for p in base.iterdir()) == ["1"]
    assert owned_name(".tmp-").startswith(f".tmp-p{os.getpid()}-h")


def test_a_lock_on_a_missing_folder_is_not_created_for_readers(tmp_path):
    with run_lock(tmp_path / "absent", "kmedtl evaluate", create=False):
        pass
    assert not (tmp_path / "absent").exists()
