"""The cache build and the duplicate audit as Apache Beam pipelines.

``build_cache_beam`` runs the per-file work of ``kmedtl data cache`` (read, SHA-256,
decode, window, resize, pHash, write) as a Beam pipeline instead of a process pool.  Every
element goes through :func:`kmedtl.data.scan.process`, the very function the process pool
calls, and writes the same content-addressed entries
(``<cache_dir>/<options.key()>/<sha[:2]>/<sha>[_f<frame>].u8``, raw uint8, plus
``index.json``), so ``make_dataset`` cannot tell the two builds apart: same bytes, same
skip list (reason and kind), same digests and perceptual hashes.  Entries are written
atomically (temporary file, then rename) and are a pure function of the file's content,
so Beam's retries of a bundle (at-least-once execution) are harmless.

Raw ``.u8`` entries were kept rather than TFRecord shards: they are what the
process-pool build, ``make_dataset`` and ``kmedtl data show`` already read, a re-run
rebuilds exactly the changed files (a shard would be rewritten whole), and parity is
checkable byte for byte.

Runners: DirectRunner in multi-process mode by default (``--direct_num_workers`` = the
CPUs this process may use).  Any standard Beam flag passes through ``beam_options``; one
line switches runner::

    build_cache_beam(index, options, "/mnt/shared/cache",
                     beam_options=["--runner=FlinkRunner", "--flink_master=host:8081",
                                   "--environment_type=LOOPBACK"])

(``--runner=SparkRunner``, ``--runner=DataflowRunner --project ... --region ...`` alike.)
On a cluster the workers must see the dataset files and ``cache_dir`` at the same POSIX
paths (NFS, a Filestore or GCS FUSE mount) and have kmedtl installed.  Tested here:
DirectRunner (multi_processing and in_memory) and the DaskRunner on a ``dask scheduler``
with two ``dask worker`` processes (``tests/test_beam_dask.py``); Flink, Spark and
Dataflow were not available to test.

Dask (``pip install 'apache-beam[dask]'``): :func:`dask_flags` gives
``--runner=DaskRunner --dask_client_address=tcp://HOST:PORT`` (``kmedtl data cache|audit
--runner dask --dask-scheduler HOST:PORT``); ``DaskRunner`` is accepted as a short name
(Beam itself only knows the qualified ``apache_beam.runners.dask.dask_runner.DaskRunner``).
Without an address the DaskRunner starts a ``LocalCluster`` for each job.  What kmedtl
does for Beam's DaskRunner (2.77), which translates a pipeline into ``dask.bag``
operations:

- results come back through :class:`WriteLines` (one JSON-lines file per bundle, written
  atomically), not ``beam.io.WriteToText``: the DaskRunner evaluates a side input by
  recomputing its producer, so ``WriteToText``'s initialise / write / finalise steps run
  in different temporary folders and the job "succeeds" with an empty output file;
- each job has exactly one sink, the last transform applied (the DaskRunner computes only
  the graph of the last transform it visits: a second sink would silently never run), so
  :func:`duplicate_groups` flattens its three outputs into one;
- near-duplicate components use ``CombineGlobally(...).without_defaults()`` (no side
  input to recompute);
- ``Reshuffle`` is a no-op and ``Create`` puts 128 elements in a partition by default, so
  the per-file job sets ``--dask_partition_size`` itself (about four partitions per worker
  thread, at most 64 files each) unless ``--dask_partition_size``/``--dask_npartitions``
  is given;
- before a job, kmedtl connects to the scheduler once to fail fast, with a clear error,
  when it is unreachable or has no workers (a job would otherwise wait forever), and it
  closes the runner's client after each job (the DaskRunner leaves it open).

Duplicates (``duplicate_groups``) are Beam transforms too, and never compare all pairs:

- exact: group by (SHA-256, frame) (:class:`ExactDuplicateGroups`);
- near: pHash banding (:class:`NearDuplicatePairs`).  With threshold ``t`` bits, the 64-bit
  hash is cut into ``t + 1`` disjoint bands; two hashes within ``t`` bits differ in at most
  ``t`` bands, so by the pigeonhole principle they agree on at least one band.  Each hash is
  keyed by (band index, band value), candidates meet only inside a bucket, each candidate
  pair is verified by its Hamming distance and reported only by the first band it agrees
  on (no duplicates, no missed pairs); components of the pair graph then come from a
  union-find ``CombineFn`` (:class:`NearDuplicateComponents`).  The groups equal
  ``kmedtl.data.audit``'s all-pairs result exactly.

A worker killed by a crashing codec fails the Beam job (the runner's own retry policy
applies); the process-pool build isolates such a file and reports it as
``worker_crashed``, so prefer it to hunt a crashing file.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kmedtl.data import scan
from kmedtl.data.cache import CacheResult, finish_build, plan_build
from kmedtl.data.hashing import popcount
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import DatasetIndex, Sample, Skipped
from kmedtl.errors import BackendUnavailableError, KmedtlError
from kmedtl.jsonio import atomic_write

try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
except ImportError:  # pragma: no cover - the error is raised when a pipeline is asked for
    beam = PipelineOptions = StandardOptions = None

HASH_BITS = 64
#: Beam's DaskRunner by the name Beam accepts (it has no short name in Beam 2.77).
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
DASK_INSTALL = "pip install 'apache-beam[dask]>=2.77,<2.78' (or pip install 'kmedtl[beam]')"
_MASK = (1 << HASH_BITS) - 1


def _signed(h: int) -> int:
    """A 64-bit hash as a signed int64 (Beam's integer coder stops at 2**63 - 1)."""
    h = int(h) & _MASK
    return h - (1 << HASH_BITS) if h >> (HASH_BITS - 1) else h


class BeamPipelineError(KmedtlError, RuntimeError):
    """The Beam job failed as a whole (a worker crashed, the runner refused the job)."""


def _beam():
    if beam is None:
        raise BackendUnavailableError("--runner beam needs Apache Beam: "
                                      "pip install kmedtl[beam]")
    return beam


def beam_flags(beam_options=None, *, workers: int | None = None) -> list[str]:
    """kmedtl's default flags followed by the caller's (``argparse``: the last wins).

    ``beam_options``: None, a list of command-line flags (``["--runner=FlinkRunner",
    ...]``, as ``--beam-option`` passes them), one string of flags, or a mapping
    (``{"runner": "SparkRunner"}``).  Defaults: DirectRunner,
    ``direct_running_mode=multi_processing``, ``direct_num_workers`` = ``workers`` or
    the CPUs this process may use, workers logging at WARNING.
    """
    if isinstance(beam_options, Mapping):
        flags = [f"--{k}={v}" for k, v in beam_options.items()]
    elif isinstance(beam_options, str):
        flags = beam_options.split()
    else:
        flags = [str(f) for f in (beam_options or ())]
    n = int(workers) if workers else scan.default_workers()
    return ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
            f"--direct_num_workers={n}", "--default_sdk_harness_log_level=WARNING",
            *_qualify_runner(flags)]


def _qualify_runner(flags: list[str]) -> list[str]:
    """``--runner=DaskRunner`` (or ``dask``) -> Beam's qualified DaskRunner name."""
    out = list(flags)
    for i, f in enumerate(out):
        if f.startswith("--runner="):
            name = f.split("=", 1)[1]
            if name.lower() in ("daskrunner", "dask"):
                out[i] = f"--runner={DASK_RUNNER}"
        elif f == "--runner" and i + 1 < len(out) and \
                out[i + 1].lower() in ("daskrunner", "dask"):
            out[i + 1] = DASK_RUNNER
    return out


def dask_address(scheduler: str) -> str:
    """``HOST:PORT`` -> ``tcp://HOST:PORT`` (an address with a scheme is kept)."""
    scheduler = str(scheduler).strip()
    if not scheduler:
        raise KmedtlError("--dask-scheduler: empty address; give HOST:PORT of a running "
                          "`dask scheduler` (e.g. tcp://10.0.0.5:8786)")
    return scheduler if "://" in scheduler else f"tcp://{scheduler}"


def dask_flags(scheduler: str | None = None, *,
               partition_size: int | None = None) -> list[str]:
    """Beam flags for the DaskRunner: on the ``dask scheduler`` at ``scheduler``
    (``HOST:PORT`` or ``tcp://HOST:PORT``), or a ``LocalCluster`` per job without one.
    ``partition_size``: files per Dask partition (default: chosen per job)."""
    flags = [f"--runner={DASK_RUNNER}"]
    if scheduler is not None:
        flags.append(f"--dask_client_address={dask_address(scheduler)}")
    if partition_size is not None:
        flags.append(f"--dask_partition_size={int(partition_size)}")
    return flags


def _is_dask(options) -> bool:
    return "DaskRunner" in str(options.view_as(StandardOptions).runner or "")


def _require_dask() -> None:
    try:
        import dask.bag  # noqa: F401  # lazy: dask is optional (apache-beam[dask])
        import dask.distributed  # noqa: F401  # lazy: checks the optional extra is installed
    except ImportError as exc:
        raise BackendUnavailableError(
            f"Beam's DaskRunner needs dask and distributed ({exc}): {DASK_INSTALL}") from None


def _dask_settings(options) -> dict:
    # lazy: the DaskRunner's module imports dask, an optional extra
    from apache_beam.runners.dask.dask_runner import DaskOptions

    return options.view_as(DaskOptions).get_all_options(drop_default=True,
                                                        current_only=True)


def _dask_threads(options) -> int:
    """Fail fast on an unreachable scheduler or one without workers (a job would wait
    forever); the cluster's worker threads (this machine's CPUs for a LocalCluster)."""
    settings = _dask_settings(options)
    address, scheduler_file = settings.get("address"), settings.get("scheduler_file")
    if not address and not scheduler_file:
        return os.cpu_count() or 1
    # lazy: dask is optional (apache-beam[dask])
    from dask.distributed import Client

    timeout = settings.get("timeout") if isinstance(settings.get("timeout"), int) else 30
    where = address or f"the scheduler file {scheduler_file}"
    try:
        client = Client(address=address, scheduler_file=scheduler_file, timeout=timeout,
                        set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise BeamPipelineError(
            f"cannot reach the Dask scheduler at {where} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): start one with "
            "`dask scheduler` or fix --dask-scheduler HOST:PORT") from exc
    try:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError) as exc:
            raise BeamPipelineError(
                f"the Dask scheduler at {where} has no workers after {timeout} s: start "
                f"some with `dask worker {address or '--scheduler-file ' + scheduler_file}`"
                " (each needs kmedtl installed and the data at the same paths)") from exc
        return max(1, sum(client.nthreads().values()))
    finally:
        client.close()


def _job_options(beam_options, *, workers: int | None = None,
                 n_files: int | None = None):
    """Options for one job.  On the DaskRunner: dask must be importable, the scheduler
    must answer (:func:`_dask_threads`), and a per-file job (``n_files``) gets about four
    partitions per worker thread, 1..64 files each, unless the caller set
    ``--dask_partition_size`` or ``--dask_npartitions`` (the DaskRunner's default, 128
    elements a partition, would leave a few hundred files on one worker).  A ready
    ``PipelineOptions`` is used as is, after the same checks."""
    options = pipeline_options(beam_options, workers=workers)
    if not _is_dask(options):
        stray = [f for f in ([] if isinstance(beam_options, PipelineOptions) else
                             beam_flags(beam_options)) if f.startswith("--dask_")]
        if stray:
            raise KmedtlError(
                f"{stray[0].split('=')[0]} is a DaskRunner option but the runner is "
                f"{options.view_as(StandardOptions).runner}: add --beam-option="
                "--runner=DaskRunner, or use --runner dask --dask-scheduler HOST:PORT")
        return options
    _require_dask()
    threads = _dask_threads(options)
    settings = _dask_settings(options)
    if n_files is None or isinstance(beam_options, PipelineOptions) or \
            settings.get("npartitions") or settings.get("partition_size"):
        return options
    size = max(1, min(64, -(-n_files // (4 * threads))))
    return PipelineOptions([*beam_flags(beam_options, workers=workers),
                            f"--dask_partition_size={size}"])


def _run(pipeline) -> None:
    """Run ``pipeline`` to the end; close the DaskRunner's client (it leaves it open, and
    with it the ``LocalCluster`` it may have started)."""
    result = pipeline.run()
    try:
        result.wait_until_finish()
    finally:
        client = getattr(result, "client", None)
        if client is not None:
            client.close()


def pipeline_options(beam_options=None, *, workers: int | None = None):
    """``PipelineOptions`` from :func:`beam_flags`; a ready ``PipelineOptions`` is used
    as is."""
    _beam()
    if isinstance(beam_options, PipelineOptions):
        return beam_options
    return PipelineOptions(beam_flags(beam_options, workers=workers))


def _small_job_options(beam_options):
    """Options for a job over small in-memory data (the duplicate grouping): the
    caller's runner, but in this process when it is the DirectRunner (starting worker
    processes would cost more than the job)."""
    options = _job_options(beam_options)
    runner = str(options.view_as(StandardOptions).runner or "DirectRunner")
    if isinstance(beam_options, PipelineOptions) or "Direct" not in runner:
        return options
    return PipelineOptions(beam_flags(beam_options) + ["--direct_running_mode=in_memory",
                                                       "--direct_num_workers=1"])


# ---------------------------------------------------------------------------------------
# Per-file work


def _process_indexed(item):
    i, task = item
    return i, scan.process(task)


def _result_json(item) -> str:
    i, r = item
    return json.dumps({"i": i, "path": r.path, "frame": r.frame, "ok": r.ok,
                       "digest": r.digest, "phash": None if r.phash is None else str(r.phash),
                       "cache_file": r.cache_file, "from_cache": r.from_cache,
                       "error_kind": r.error_kind, "error_reason": r.error_reason,
                       "thumb": None if r.thumb is None else r.thumb.hex()})


def _result_from_json(d: dict) -> scan.Result:
    return scan.Result(d["path"], d["frame"], d["ok"], d["digest"],
                       None if d["phash"] is None else int(d["phash"]), d["cache_file"],
                       d["from_cache"], None, d["error_kind"], d["error_reason"],
                       None if d.get("thumb") is None else bytes.fromhex(d["thumb"]))


def read_lines(out_dir) -> list[str]:
    """The distinct non-empty lines of :class:`WriteLines`' files in ``out_dir``, sorted."""
    lines = set()
    for path in glob.glob(os.path.join(out_dir, "part-*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            lines.update(line.rstrip("\n") for line in fh if line.strip())
    return sorted(lines)


def run_tasks(tasks: Sequence[scan.Task], beam_options=None, *, work_dir: str,
              workers: int | None = None) -> list[scan.Result]:
    """``scan.process`` over ``tasks`` on Beam; results in task order.

    Results travel back as JSON lines under ``work_dir`` (it must be visible to the
    workers and to this process: on a cluster, a shared mount), removed afterwards.
    ``workers``: the DirectRunner's processes (a Dask cluster has its own).
    """
    _beam()
    if not tasks:
        return []
    options = _job_options(beam_options, workers=workers, n_files=len(tasks))
    out_dir = os.path.join(work_dir, f".beam-{uuid.uuid4().hex[:12]}")
    os.makedirs(out_dir)
    try:
        try:
            p = beam.Pipeline(options=options)
            (p
             | "Tasks" >> beam.Create(list(enumerate(tasks)), reshuffle=False)
             | "Process" >> ProcessFiles()
             | "ToJson" >> beam.Map(_result_json)
             # a stage boundary: a worker that dies while processing then fails the
             # DirectRunner's job (with the sink fused in, its job waits forever)
             | "Collect" >> beam.Reshuffle()
             | "Write" >> beam.ParDo(WriteLines(out_dir)))
            _run(p)
        except Exception as exc:  # noqa: BLE001 - the runner's error, whatever its type
            where = ("; the Dask scheduler and workers need the same kmedtl and Beam "
                     "versions as here, and the workers the dataset and cache folder at "
                     "the same paths" if _is_dask(options) else "")
            raise BeamPipelineError(
                f"the Beam cache job failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); a worker may have "
                "crashed on a corrupt file: run the process-pool build (without --runner "
                f"beam) to find and skip it{where}") from exc
        results: list[scan.Result | None] = [None] * len(tasks)
        for line in read_lines(out_dir):  # a retried bundle repeats identical lines
            d = json.loads(line)
            results[d["i"]] = _result_from_json(d)
        missing = [tasks[i].path for i, r in enumerate(results) if r is None]
        if missing:
            raise BeamPipelineError(
                f"the Beam job returned no result for {len(missing)} file(s), e.g. "
                f"{missing[0]}: the workers write their results under {work_dir}, which "
                "must be the same folder for them and for this process (on a cluster: a "
                "cache folder on a shared mount, --cache-dir)")
        return results
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def build_cache_beam(index: DatasetIndex | list[Sample], options: ImageOptions, cache_dir,
                     beam_options=None, *, workers: int | None = None,
                     phash: bool = True) -> CacheResult:
    """``kmedtl.data.cache.build_cache`` on Apache Beam: the same entries, the same
    ``CacheResult`` (files, skipped, digests, phashes, decoded, reused)."""
    plan = plan_build(index, options, cache_dir, phash)
    results = run_tasks(plan.tasks, beam_options, work_dir=plan.result.folder,
                        workers=workers)
    return finish_build(plan, results)


def scan_index_beam(index: DatasetIndex, options: ImageOptions, cache_dir=None,
                    beam_options=None, *, workers: int | None = None, work_dir=None):
    """``kmedtl.data.audit.scan_index`` on Beam: ``(digests, phashes, thumbs, skipped)`` by
    sample id.  Without ``cache_dir`` nothing is written but the job's temporary results
    (under ``work_dir``, default the system's temporary folder)."""
    if cache_dir is not None:
        res = build_cache_beam(index, options, cache_dir, beam_options, workers=workers,
                               phash=True)
        return res.digests, res.phashes, res.thumbs, res.skipped
    tasks = [scan.Task(s.path, s.frame, options, None, True) for s in index.samples]
    results = run_tasks(tasks, beam_options, work_dir=work_dir or tempfile.gettempdir(),
                        workers=workers)
    digests, phashes, thumbs, skipped = {}, {}, {}, []
    for s, r in zip(index.samples, results, strict=True):
        if r.ok:
            digests[s.id], phashes[s.id], thumbs[s.id] = r.digest, r.phash, r.thumb
        else:
            skipped.append(Skipped(r.path, r.error_reason, r.error_kind, "decode"))
    return digests, phashes, thumbs, skipped


# ---------------------------------------------------------------------------------------
# Duplicates


def bands(threshold: int, bits: int = HASH_BITS) -> list[tuple[int, int]]:
    """``threshold + 1`` disjoint (shift, width) bands covering ``bits`` bits.

    Any two hashes within ``threshold`` bits agree on at least one band (pigeonhole).
    With more bands than bits some bands are empty (width 0): every hash then shares
    that band, and the search degenerates, correctly, to comparing all pairs.
    """
    if threshold < 0:
        return []
    n = threshold + 1
    edges = [round(i * bits / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(n)]


def band_keys(h: int, band_list) -> list[tuple[int, int]]:
    h = int(h) & _MASK
    return [(i, (h >> shift) & ((1 << width) - 1)) for i, (shift, width) in
            enumerate(band_list)]


def _first_shared_band(a: int, b: int, band_list) -> int:
    a, b = a & _MASK, b & _MASK
    for i, (shift, width) in enumerate(band_list):
        mask = (1 << width) - 1
        if (a >> shift) & mask == (b >> shift) & mask:
            return i
    return -1


def _emit_band_keys(rec, band_list):
    sid, h, digest = rec
    for key in band_keys(h, band_list):
        yield key, (sid, h, digest)


def _verify_bucket(kv, threshold: int, band_list):
    """Pairs within ``threshold`` bits among one bucket's members, each reported by the
    first band it agrees on only."""
    (band, _), members = kv
    members = sorted(members)
    if len(members) < 2:
        return
    hashes = np.array([m[1] for m in members], dtype=np.int64).view(np.uint64)
    for a in range(len(members) - 1):
        dist = popcount(hashes[a + 1:] ^ hashes[a])
        for off in np.nonzero(dist <= threshold)[0].tolist():
            b = a + 1 + off
            if _first_shared_band(members[a][1], members[b][1], band_list) == band:
                yield (members[a][0], members[a][2]), (members[b][0], members[b][2])


def _exact_key(rec):
    sid, digest, path = rec
    return (digest, sid.rsplit("#", 1)[1] if "#" in sid else None), (sid, path)


def _exact_group(kv):
    _, members = kv
    members = list(members)
    if len({path for _, path in members}) > 1:
        yield sorted(sid for sid, _ in members)


if beam is not None:

    class ProcessFn(beam.DoFn):
        """``scan.process`` per element; in a worker process (not the driver, where the
        in-memory DirectRunner runs it) the allocator is tuned as the pool's workers are
        (``scan.tune_allocator``)."""

        def __init__(self, driver_pid: int):
            super().__init__()
            self.driver_pid = driver_pid

        def setup(self):
            if os.getpid() != self.driver_pid:
                scan.tune_allocator()

        def process(self, item):
            yield _process_indexed(item)

    class WriteLines(beam.DoFn):
        """Strings -> one ``part-<uuid>.jsonl`` file per bundle in ``out_dir`` (written
        to a temporary name, then renamed: a file is whole or absent).  The sink of every
        kmedtl job, on every runner: ``beam.io.WriteToText`` loses its output on the
        DaskRunner (see the module docstring).  A retried bundle may leave a second file
        with the same lines; readers take distinct lines (:func:`read_lines`)."""

        def __init__(self, out_dir: str):
            super().__init__()
            self.out_dir = str(out_dir)

        def start_bundle(self):
            self.lines = []

        def process(self, line):
            self.lines.append(line)

        def finish_bundle(self):
            if not self.lines:
                return
            name = os.path.join(self.out_dir, f"part-{uuid.uuid4().hex}.jsonl")
            lines = self.lines
            atomic_write(name, lambda fh: fh.writelines(f"{line}\n" for line in lines))
            self.lines = []

    class ProcessFiles(beam.PTransform):
        """``(index, scan.Task)`` -> ``(index, scan.Result)`` through ``scan.process``,
        after a reshuffle so the runner spreads the files over its workers."""

        def expand(self, pcoll):
            return (pcoll
                    | "Spread" >> beam.Reshuffle()
                    | "ReadHashDecodeWrite" >> beam.ParDo(ProcessFn(os.getpid())))

    class ExactDuplicateGroups(beam.PTransform):
        """``(sample_id, sha256, path)`` -> sorted id groups of byte-identical content
        (same frame) from more than one file."""

        def expand(self, pcoll):
            return (pcoll
                    | "KeyByDigest" >> beam.Map(_exact_key)
                    | "GroupByDigest" >> beam.GroupByKey()
                    | "MultiFile" >> beam.FlatMap(_exact_group))

    class NearDuplicatePairs(beam.PTransform):
        """``(sample_id, phash, sha256)`` -> ``((id_a, sha_a), (id_b, sha_b))`` for every
        pair within ``threshold`` bits, found by banding (no all-pairs comparison)."""

        def __init__(self, threshold: int):
            super().__init__()
            self.threshold = int(threshold)
            self.band_list = bands(self.threshold)

        def expand(self, pcoll):
            return (pcoll
                    | "BandKeys" >> beam.FlatMap(_emit_band_keys, self.band_list)
                    | "GroupByBand" >> beam.GroupByKey()
                    | "Verify" >> beam.FlatMap(_verify_bucket, self.threshold,
                                               self.band_list))

    class UnionFindFn(beam.CombineFn):
        """Pairs -> connected components (sorted id lists) whose members are not all
        byte-identical."""

        def create_accumulator(self):
            return {}, {}

        def add_input(self, acc, pair):
            parent, digest = acc
            (a, da), (b, db) = pair
            digest[a], digest[b] = da, db
            _union(parent, a, b)
            return acc

        def merge_accumulators(self, accs):
            parent, digest = {}, {}
            for p, d in accs:
                digest.update(d)
                for node in list(p):
                    _union(parent, node, _find(p, node))
            return parent, digest

        def extract_output(self, acc):
            parent, digest = acc
            comp: dict[str, list[str]] = {}
            for node in list(parent):
                comp.setdefault(_find(parent, node), []).append(node)
            return sorted(sorted(g) for g in comp.values()
                          if len(g) > 1 and len({digest[x] for x in g}) > 1)

    class NearDuplicateComponents(beam.PTransform):
        """Verified pairs -> near-duplicate groups, as ``kmedtl.data.audit`` reports them."""

        def expand(self, pairs):
            return (pairs
                    | "UnionFind" >> beam.CombineGlobally(UnionFindFn()).without_defaults()
                    | "Groups" >> beam.FlatMap(_identity_list))


def _identity_list(groups):
    return groups


def _json_tagged(tag):
    def fmt(value):
        return json.dumps([tag, value])

    return fmt


def _done_line(_):
    return json.dumps(["D", 1])


def _pair_ids(pair):
    return [pair[0][0], pair[1][0]]


def _find(parent: dict, x):
    parent.setdefault(x, x)
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        parent[x], x = root, parent[x]
    return root


def _union(parent: dict, a, b):
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)


@dataclass
class DuplicateGroups:
    """Sample-id groups as ``kmedtl.data.audit`` builds them before turning ids into
    paths: ``exact`` and ``near`` are sorted lists of sorted id lists; ``near_pairs`` are
    the verified (id_a, id_b) links, id_a < id_b."""

    exact: list[list[str]]
    near: list[list[str]]
    near_pairs: list[tuple[str, str]]


def duplicate_groups(digests: Mapping[str, str], phashes: Mapping[str, int],
                     path_of: Mapping[str, str], near_threshold: int = 2,
                     beam_options=None, *, work_dir=None) -> DuplicateGroups:
    """Exact and near-duplicate groups of the samples in ``path_of`` as one Beam job.

    Same inputs and the same groups as ``kmedtl.data.audit.audit`` (which compares all
    pairs): ``digests``/``phashes`` by sample id, ``path_of`` the used samples' files.
    With the DirectRunner the job runs in this process (its input is one small record
    per sample); any other runner gets the caller's options unchanged.  The workers
    write the groups under ``work_dir`` (default: the system's temporary folder; on a
    cluster it must be a folder they share with this process, e.g. the cache folder).
    """
    _beam()
    options = _small_job_options(beam_options)
    exact_in = [(sid, d, path_of[sid]) for sid, d in digests.items() if sid in path_of]
    near_in = [(sid, _signed(phashes[sid]), digests[sid]) for sid in phashes
               if sid in path_of and sid in digests]
    if work_dir is not None:
        os.makedirs(work_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".beam-groups-", dir=work_dir) as out_dir:
        p = beam.Pipeline(options=options)
        tagged = [p | "Done" >> beam.Create([0], reshuffle=False)  # proves the output arrived
                  | "DoneJson" >> beam.Map(_done_line),
                  p | "ExactInput" >> beam.Create(exact_in, reshuffle=False)
                  | "Exact" >> ExactDuplicateGroups()
                  | "ExactJson" >> beam.Map(_json_tagged("E"))]
        if near_threshold >= 0 and near_in:
            pairs = (p | "NearInput" >> beam.Create(near_in, reshuffle=False)
                     | "Pairs" >> NearDuplicatePairs(near_threshold))
            tagged.append(pairs | "PairIds" >> beam.Map(_pair_ids)
                          | "PairJson" >> beam.Map(_json_tagged("P")))
            tagged.append(pairs | "Components" >> NearDuplicateComponents()
                          | "NearJson" >> beam.Map(_json_tagged("N")))
        # one sink, applied last: the DaskRunner runs only the last transform's graph
        (tuple(tagged) | "All" >> beam.Flatten()
         | "Write" >> beam.ParDo(WriteLines(out_dir)))
        try:
            _run(p)
        except Exception as exc:  # noqa: BLE001 - the runner's error, whatever its type
            raise BeamPipelineError(
                f"the Beam duplicate-grouping job failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from exc
        found = {"D": [], "E": [], "P": [], "N": []}
        for line in read_lines(out_dir):  # distinct: a retried bundle repeats its lines
            kind, value = json.loads(line)
            found[kind].append(value)
        if not found["D"]:
            raise BeamPipelineError(
                f"the Beam duplicate-grouping job left no output in {out_dir}: its workers "
                "must write to a folder this process reads (on a cluster: give the audit "
                "a --cache-dir on a shared mount)")
    return DuplicateGroups(sorted(found["E"]), sorted(found["N"]),
                           sorted(tuple(p) for p in found["P"]))


def audit_groups_as_paths(index: DatasetIndex, groups: Iterable[list[str]]) -> list[list[str]]:
    """Id groups -> the path lists of an audit report (relative path, ``#frame``)."""
    path_of = {s.id: s.path for s in index.samples}

    def as_path(sid):
        frame = f"#{sid.rsplit('#', 1)[1]}" if "#" in sid else ""
        return index.relpath(path_of[sid]) + frame

    return sorted([as_path(x) for x in g] for g in groups)
