"""Hostile files in a dataset (issue 21): special files, bombs, huge frame counts, symlinked
folders, terminal escapes in names, and workers left behind by ``kill -9``.

One audit runs over one folder holding every hostile file at once, in a subprocess under a
memory and time cap (``tests/limits.py``); each case is then a test on its JSON report:
skipped with its own kind (naming the limit), and read = used + skipped.  Before the fixes
the FIFO hung the audit (time cap), ``/dev/zero`` and the sparse file were read whole and
the PNG bomb and the 10^9-frame DICOM ran out of memory (memory cap), so every test here
failed.  Nothing imports TensorFlow: each subprocess takes a few seconds.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import dataset_bytes, make_dicom
from limits import ROOT, _group_rss_kb, run_capped
from PIL import Image

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="FIFOs, /dev/zero, /proc and prctl: Linux")

#: caps for every subprocess here (the audit + cache of the hostile folder peaks near
#: 250 MB; a clean 2-worker pool alone is about 480 MB)
RSS_MB = 600
#: the cache with a 2-process pool: each spawned worker imports kmedtl.data (about 150 MB)
POOL_RSS_MB = 900
TIMEOUT = 60

ESC_NAME = "esc\x1b]0;pwned\x07.png"
NL_NAME = "nl\nkmedtl: forged line.png"


def _png(path: Path, seed: int, size: int = 24, mode: str = "L") -> None:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def png_bomb(width: int, height: int, *, colour: bool = False) -> bytes:
    """A valid PNG of ``width`` x ``height`` all-black pixels: bit depth 1 gray (or 8-bit
    RGB), a few KB to a few hundred KB.  Written chunk by chunk with zlib because making
    it with Pillow would first allocate the very image it describes."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(
            ">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    depth, ctype, row_bytes = (8, 2, 3 * width) if colour else (1, 0, (width + 7) // 8)
    row = b"\x00" * (row_bytes + 1)  # filter byte 0 + black pixels
    block, (n, rest) = row * 64, divmod(height, 64)
    # Raw deflate with a full flush after a block restarts the dictionary, so every block
    # compresses to the same bytes: compress one, repeat it (fast even for 147 MB of rows)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    once = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    tail = z.compress(row * rest) + z.flush()
    adler = 1
    for _ in range(n):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(row * rest, adler)
    idat = b"\x78\xda" + once * n + tail + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, ctype, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def many_frames_dicom() -> bytes:
    """A small DICOM whose header announces 10^9 frames of 8x8 (one frame of pixels)."""
    ds = make_dicom(np.zeros((8, 8), dtype=np.uint16), NumberOfFrames=10**9)
    return dataset_bytes(ds)


@pytest.fixture(scope="module")
def hostile_tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    root = base / "data"
    a, b = root / "a", root / "b"
    for d in (a, b):
        d.mkdir(parents=True)
    for i in range(4):
        _png(a / f"good{i}.png", i)
        _png(b / f"good{i}.png", 100 + i)
    os.mkfifo(a / "x.png")                                   # opening it blocks for ever
    os.symlink("/dev/zero", a / "y.png")                     # never ends
    with open(a / "sparse.png", "wb") as fh:                 # 3 GB, no disk blocks
        fh.truncate(3 * 10**9)
    (a / "bomb.png").write_bytes(png_bomb(13000, 13000))     # 169 MP, 1-bit
    (a / "rgb_bomb.png").write_bytes(png_bomb(7000, 7000, colour=True))  # 49 MP RGB
    (a / "eps.png").write_bytes(EPS)                         # EPS runs Ghostscript
    (a / "frames.dcm").write_bytes(many_frames_dicom())      # NumberOfFrames = 10^9
    (a / ESC_NAME).write_bytes(b"not an image")              # ESC/OSC retitles a terminal
    (a / NL_NAME).write_bytes(b"not an image either")        # forges a "kmedtl:" line
    outside = base / "elsewhere"                             # a symlinked sub-folder
    outside.mkdir()
    _png(outside / "linked0.png", 400)
    _png(outside / "linked1.png", 401)
    os.symlink(outside, a / "linked")
    os.symlink(a, a / "loop")                                # a cycle: a/loop -> a
    return root


#: ``kmedtl data audit`` then ``kmedtl data cache`` on the tree, in one capped process
#: (one interpreter start-up instead of two); their outputs are split at the marker
_BOTH = """
import sys
from kmedtl.cli import main
n = int(sys.argv[1])
rc = main(sys.argv[2:2 + n])
print("=== cache ===", flush=True)
sys.exit(rc * 10 + main(sys.argv[2 + n:]))
"""


@pytest.fixture(scope="module")
def audit_run(hostile_tree, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-out")
    out = tmp / "audit.json"
    # one worker: files are decoded in this process (the pool's start-up would double
    # the time and the memory; the pool itself is tested with the orphan workers below)
    audit = ["data", "audit", str(hostile_tree), "--frames", "all", "--no-cache",
             "--workers", "1", "--json", str(out)]
    cache = ["data", "cache", str(hostile_tree), "--frames", "all", "--workers", "1",
             "--cache-dir", str(tmp / "cache")]
    res = run_capped([sys.executable, "-c", _BOTH, str(len(audit)), *audit, *cache],
                     rss_mb=RSS_MB, timeout=TIMEOUT, cwd=ROOT)
    report = json.loads(out.read_text()) if out.exists() else None
    return res, report


def _skips(report) -> dict:
    return {Path(s["path"]).name: s for s in report["skipped"]}


def _finished(audit_run):
    res, report = audit_run
    assert res.ok, res.why()
    assert res.rc == 0, res.why()
    assert report is not None, res.why()
    c = report["counts"]
    assert c["read"] == c["used"] + c["skipped"], c
    assert c["skipped"] == len(report["skipped"]), c
    return res, report


def test_hostile_audit_finishes_under_the_caps_and_reconciles(audit_run):
    res, report = _finished(audit_run)
    c = report["counts"]
    # a: 4 good + 2 through the symlinked folder; b: 4
    assert c["used"] == 10, report["skipped"]
    # x, y, sparse, bomb, rgb_bomb, eps, frames, loop, esc, nl
    assert c["skipped"] == 10, report["skipped"]
    assert res.peak_mb < RSS_MB
    print(f"hostile audit: peak {res.peak_mb:.0f} MB in {res.seconds:.1f} s")


def test_fifo_is_skipped_never_opened(audit_run):
    _, report = _finished(audit_run)
    s = _skips(report)["x.png"]
    assert s["kind"] == "not_regular_file" and "FIFO" in s["reason"], s


def test_symlink_to_dev_zero_is_skipped(audit_run):
    _, report = _finished(audit_run)
    s = _skips(report)["y.png"]
    assert s["kind"] == "not_regular_file" and "character device" in s["reason"], s


def test_sparse_3gb_file_is_skipped_by_the_byte_budget(audit_run):
    _, report = _finished(audit_run)
    s = _skips(report)["sparse.png"]
    assert s["kind"] == "file_too_large", s
    assert "data.max_file_bytes = 1,073,741,824" in s["reason"], s


def test_png_bomb_is_refused_before_decoding(audit_run):
    _, report = _finished(audit_run)
    s = _skips(report)["bomb.png"]
    assert s["kind"] == "too_large" and "13000x13000" in s["reason"], s
    assert "data.max_pixels" in s["reason"], s
    s = _skips(report)["rgb_bomb.png"]  # under max_pixels, over the decoded-bytes limit
    assert s["kind"] == "too_large" and "data.max_image_bytes" in s["reason"], s


def test_eps_named_png_is_not_handed_to_pillow_eps(audit_run):
    _, report = _finished(audit_run)
    s = _skips(report)["eps.png"]
    assert s["kind"] == "not_image" and "PNG/JPEG/TIFF/BMP" in s["reason"], s


def test_billion_frames_are_not_expanded(audit_run):
    _, report = _finished(audit_run)
    s = _skips(report)["frames.dcm"]
    assert s["kind"] == "too_many_frames", s
    assert "1,000,000,000 frames" in s["reason"] and "data.max_frames = 10,000" in s["reason"]


def test_symlinked_sub_folder_is_followed_once(audit_run):
    _, report = _finished(audit_run)
    assert report["counts"]["by_class"]["a"] == 6  # 4 good + linked0/1
    s = _skips(report)["loop"]
    assert s["kind"] == "symlink_loop", s


def test_names_are_printed_escaped(audit_run):
    res, report = _finished(audit_run)
    assert res.out.count("=== cache ===") == 1, res.why()
    text = res.out + res.err
    assert "\x1b" not in text and "\x07" not in text, text
    assert not any(line.startswith("kmedtl: forged") for line in text.splitlines()), text
    skips = _skips(report)
    assert skips[ESC_NAME]["kind"] == skips[NL_NAME]["kind"] == "not_image"
    cache_out = res.out.split("=== cache ===")[1]
    assert "read 20 = used 10 + skipped 10" in cache_out, cache_out
    assert "nl\\nkmedtl: forged line.png: not a recognised image" in cache_out, cache_out
    assert "esc\\x1b]0;pwned\\x07.png: not a recognised image" in cache_out, cache_out
    assert "x.png: not a regular file (a FIFO" in cache_out, cache_out


# ---------------------------------------------------------------- in-process, no caps needed
def test_pillow_is_only_asked_for_the_readme_formats(monkeypatch):
    from kmedtl.data import raster
    from kmedtl.errors import DataError

    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # what Pillow alone would do
    calls = []
    real_open = Image.open

    def spy(fp, mode="r", formats=None):
        calls.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(raster.Image, "open", spy)
    with pytest.raises(DataError) as exc:
        raster.decode_raster(EPS, "eps.png", 10**6)
    assert exc.value.kind == "not_image"
    assert calls == [("PNG", "JPEG", "TIFF", "BMP")]


def test_read_bytes_stops_at_the_budget(tmp_path):
    from kmedtl.data import decode
    from kmedtl.errors import DataError

    f = tmp_path / "f.png"
    f.write_bytes(b"x" * 1000)
    assert decode.read_bytes(f, 1000) == b"x" * 1000
    with pytest.raises(DataError) as exc:
        decode.read_bytes(f, 999)
    assert exc.value.kind == "file_too_large" and "data.max_file_bytes = 999" in str(exc.value)
    with pytest.raises(DataError) as exc:
        decode.read_bytes("/dev/zero")
    assert exc.value.kind == "not_regular_file"


def test_manifest_rows_naming_special_files_are_skipped_at_index_time(tmp_path):
    """Indexing only stats: a FIFO or a device named in a manifest never reaches a reader."""
    from kmedtl.data.options import ImageOptions
    from kmedtl.data.sources import read_manifest

    _png(tmp_path / "ok.png", 1)
    _png(tmp_path / "ok2.png", 2)
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "m.csv").write_text("path,label\nok.png,a\npipe.png,a\n/dev/zero,b\n"
                                    "ok2.png,b\n")
    index = read_manifest(tmp_path / "m.csv", options=ImageOptions(max_file_bytes=10**6))
    assert {(Path(s.path).name, s.kind) for s in index.skipped} == {
        ("pipe.png", "not_regular_file"), ("zero", "not_regular_file")}
    c = index.counts()
    assert (c["read"], c["used"], c["skipped"]) == (4, 2, 2)


def test_limits_are_config_fields_and_stay_out_of_the_cache_key():
    from kmedtl.config import load_config
    from kmedtl.data.options import ImageOptions

    cfg = load_config({"data": {"root": "x", "max_file_bytes": 5000, "max_frames": 7,
                                "max_pixels": 123, "max_image_bytes": 4096}})
    o = cfg.image_options()
    assert (o.max_file_bytes, o.max_frames, o.max_pixels, o.max_image_bytes) == (
        5000, 7, 123, 4096)
    assert o.key() == ImageOptions().key()
    default = load_config({"data": {"root": "x"}}).image_options()
    assert (default.max_file_bytes, default.max_frames, default.max_pixels,
            default.max_image_bytes) == (1 << 30, 10_000, 100_000_000, 512 << 20)


# ---------------------------------------------------------------------- orphan workers
def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_workers_die_with_a_killed_parent(tmp_path):
    """kill -9 of ``kmedtl data cache`` mid-run leaves no worker behind (PR_SET_PDEATHSIG)."""
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    y, x = np.mgrid[0:1800, 0:1800]
    buf = io.BytesIO()
    Image.fromarray(((x + y) % 256).astype(np.uint8)).save(buf, "PNG")  # 6 KB, 3.2 MP
    for i in range(80):  # a distinct byte after IEND: each file its own digest to decode
        (root / ("a" if i % 2 else "b") / f"img{i}.png").write_bytes(
            buf.getvalue() + i.to_bytes(2, "big"))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmedtl", "data", "cache", str(root), "--cache-dir",
         str(cache), "--workers", "2"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    peak = 0
    try:
        t0 = time.monotonic()
        workers: list[int] = []
        while time.monotonic() - t0 < TIMEOUT and proc.poll() is None:
            peak = max(peak, _group_rss_kb(proc.pid))
            workers = _children(proc.pid)
            if len(workers) >= 3:  # resource tracker + 2 pool workers, busy
                break
            time.sleep(0.05)
        assert len(workers) >= 3, f"workers {workers}"
        while time.monotonic() - t0 < TIMEOUT and proc.poll() is None:  # busy decoding
            peak = max(peak, _group_rss_kb(proc.pid))
            if len(list(cache.rglob("*.u8"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the cache finished before it could be killed mid-run"
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.05)
        left = [p for p in workers if _alive(p)]
        assert not left, f"workers {left} outlived their parent"
        assert peak / 1024 < POOL_RSS_MB
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
