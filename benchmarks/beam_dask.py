"""Cache build throughput (files/s): plain loop, process pool, Beam's DirectRunner, and
Beam's DaskRunner on a real ``dask.distributed`` cluster with 1 and with 2 workers, on
the same files in one run.

    python benchmarks/beam_dask.py [--n 600] [--size 224] [--repeats 3] [--out r.json]

Inputs: the first ``--n`` brain-tumour MRI JPEGs under
``$KMEDTL_DATASETS/brain-tumor-mri/Training`` (sorted by path, all classes), read in
place; every row builds the cache from empty into its own temporary folder (read,
SHA-256, decode, resize, pHash, write: ``kmedtl data cache``'s work).

Rows:
- ``plain loop``: ``build_cache(..., workers=1)``: ``scan.process`` per file in this
  process, no pool.
- ``process pool (2)``: ``build_cache(..., workers=2)``, kmedtl's default runner.
- ``DirectRunner (2)``: ``build_cache_beam`` with Beam's DirectRunner, multi-process,
  2 workers.
- ``DaskRunner, 1 worker`` / ``2 workers``: ``build_cache_beam`` with
  ``--runner dask --dask-scheduler`` on two clusters started here with the ``dask``
  command line: a ``dask scheduler`` and 1 (or 2) ``dask worker --nthreads 1``
  processes on 127.0.0.1, over TCP.  Both clusters run through the whole benchmark (an
  idle worker costs nothing), so the rows can be interleaved.  Each cluster first runs
  a warm-up job (a worker's first job imports kmedtl and Beam, several seconds); its
  time is reported apart as ``cold first job``.

Rows are timed ``--repeats`` times in rotating order; the table shows the median
files/s with the spread and the ratio to the plain loop's median.  Each row checks
that it cached every file.  The machine's CPU count and load average are printed: on a
2-core machine two workers can at best double one, and other jobs share the cores.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def start_cluster(folder: str, workers: int) -> tuple[str, list[subprocess.Popen]]:
    """A ``dask scheduler`` and ``workers`` single-thread ``dask worker`` processes."""
    import distributed

    os.makedirs(folder, exist_ok=True)
    sched_file = os.path.join(folder, "scheduler.json")
    procs = []

    def spawn(name, *args):
        with open(os.path.join(folder, f"{name}.log"), "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "dask", *args],
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))

    spawn("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0",
          "--no-dashboard", "--scheduler-file", sched_file, "--idle-timeout", "900s")
    for i in range(workers):
        spawn(f"worker{i}", "worker", "--scheduler-file", sched_file, "--host",
              "127.0.0.1", "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
              "--death-timeout", "60s")
    deadline = time.monotonic() + 60
    while not os.path.exists(sched_file):
        if time.monotonic() > deadline:
            stop_cluster(procs)
            raise RuntimeError(f"dask scheduler did not start (logs in {folder})")
        time.sleep(0.2)
    with open(sched_file) as fh:
        address = json.load(fh)["address"]
    with distributed.Client(address, timeout=30, set_as_default=False) as client:
        client.wait_for_workers(workers, timeout=120)
    return address, procs


def stop_cluster(procs) -> None:
    for p in reversed(procs):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
                p.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from kmedtl.data import beam as kb
    from kmedtl.data.cache import build_cache
    from kmedtl.data.options import ImageOptions
    from kmedtl.data.sources import DatasetIndex, Sample

    src = os.path.join(os.environ.get("KMEDTL_DATASETS", ""), "brain-tumor-mri", "Training")
    files = sorted(glob.glob(os.path.join(src, "*", "*.jpg")))[:args.n]
    if len(files) < args.n:
        sys.exit(f"need {args.n} JPEGs under {src} (set KMEDTL_DATASETS)")
    samples = [Sample(f, os.path.basename(os.path.dirname(f))) for f in files]
    index = DatasetIndex(samples, [], len(samples), src)
    warm = DatasetIndex(samples[:16], [], 16, src)
    opts = ImageOptions(size=args.size)
    tmp = tempfile.mkdtemp(prefix="kmedtl-beam-dask-")
    print(f"{len(files)} files, size {args.size}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)

    clusters, procs = {}, []
    try:
        cold = {}
        for n in (1, 2):
            address, p = start_cluster(os.path.join(tmp, f"cluster{n}"), n)
            procs += p
            clusters[n] = address
            t = time.perf_counter()
            kb.build_cache_beam(warm, opts, os.path.join(tmp, f"warm{n}"),
                                beam_options=kb.dask_flags(address))
            cold[n] = time.perf_counter() - t
            print(f"cluster with {n} worker(s) at {address}: cold first job (16 files) "
                  f"{cold[n]:.1f} s", flush=True)

        rows = {
            "plain loop": lambda d: build_cache(index, opts, d, workers=1, progress=False),
            "process pool (2)": lambda d: build_cache(index, opts, d, workers=2,
                                                      progress=False),
            "DirectRunner (2)": lambda d: kb.build_cache_beam(index, opts, d, workers=2),
            "DaskRunner, 1 worker": lambda d: kb.build_cache_beam(
                index, opts, d, beam_options=kb.dask_flags(clusters[1])),
            "DaskRunner, 2 workers": lambda d: kb.build_cache_beam(
                index, opts, d, beam_options=kb.dask_flags(clusters[2])),
        }
        names = list(rows)
        times: dict[str, list[float]] = {k: [] for k in names}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                folder = os.path.join(tmp, f"r{r}-{names.index(name)}")
                t = time.perf_counter()
                res = rows[name](folder)
                times[name].append(time.perf_counter() - t)
                assert len(res.files) + len(res.skipped) == len(files), name
                shutil.rmtree(folder, ignore_errors=True)
                print(f"  repeat {r}: {name}: {len(files) / times[name][-1]:.1f} files/s",
                      flush=True)
    finally:
        stop_cluster(procs)
        shutil.rmtree(tmp, ignore_errors=True)

    base = len(files) / statistics.median(times["plain loop"])
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
    print(f"| runner | files/s (median of {args.repeats}) | min-max | vs plain loop |")
    print("|---|---:|---|---:|")
    result = {"n": len(files), "size": args.size, "cpus": os.cpu_count(),
              "cold_first_job_s": cold, "rows": {}}
    for name in names:
        rates = sorted(len(files) / t for t in times[name])
        med = statistics.median(rates)
        print(f"| {name} | {med:.1f} | {rates[0]:.1f}-{rates[-1]:.1f} | {med / base:.2f}x |")
        result["rows"][name] = {"files_per_s": rates, "median": med, "vs_plain": med / base}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
