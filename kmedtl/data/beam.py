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
DirectRunner (multi_processing and in_memory); Flink, Spark and Dataflow were not
available to test.

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
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import DatasetIndex, Sample, Skipped
from kmedtl.errors import BackendUnavailableError, KmedtlError

try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
except ImportError:  # pragma: no cover - the error is raised when a pipeline is asked for
    beam = PipelineOptions = StandardOptions = None

HASH_BITS = 64
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
            f"--direct_num_workers={n}", "--default_sdk_harness_log_level=WARNING", *flags]


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
    options = pipeline_options(beam_options)
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


def run_tasks(tasks: Sequence[scan.Task], beam_options=None, *, work_dir: str,
              workers: int | None = None) -> list[scan.Result]:
    """``scan.process`` over ``tasks`` on Beam; results in task order.

    Results travel back as JSON lines under ``work_dir`` (it must be visible to the
    workers and to this process: on a cluster, a shared mount), removed afterwards.
    """
    _beam()
    if not tasks:
        return []
    options = pipeline_options(beam_options, workers=workers)
    out_dir = os.path.join(work_dir, f".beam-{uuid.uuid4().hex[:12]}")
    os.makedirs(out_dir)
    try:
        try:
            with beam.Pipeline(options=options) as p:
                (p
                 | "Tasks" >> beam.Create(list(enumerate(tasks)), reshuffle=False)
                 | "Process" >> ProcessFiles()
                 | "ToJson" >> beam.Map(_result_json)
                 | "Write" >> beam.io.WriteToText(os.path.join(out_dir, "results"),
                                                  file_name_suffix=".jsonl"))
        except Exception as exc:  # noqa: BLE001 - the runner's error, whatever its type
            raise BeamPipelineError(
                f"the Beam cache job failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); a worker may have "
                "crashed on a corrupt file: run the process-pool build (without --runner "
                "beam) to find and skip it") from exc
        results: list[scan.Result | None] = [None] * len(tasks)
        for path in glob.glob(os.path.join(out_dir, "results*.jsonl")):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        d = json.loads(line)
                        results[d["i"]] = _result_from_json(d)
        missing = [tasks[i].path for i, r in enumerate(results) if r is None]
        if missing:
            raise BeamPipelineError(f"the Beam job returned no result for {len(missing)} "
                                    f"file(s), e.g. {missing[0]}")
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
        dist = np.bitwise_count(hashes[a + 1:] ^ hashes[a])
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
                    | "UnionFind" >> beam.CombineGlobally(UnionFindFn())
                    | "Groups" >> beam.FlatMap(_identity_list))


def _identity_list(groups):
    return groups


def _json_tagged(tag):
    def fmt(value):
        return json.dumps([tag, value])

    return fmt


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
                     beam_options=None) -> DuplicateGroups:
    """Exact and near-duplicate groups of the samples in ``path_of`` as one Beam job.

    Same inputs and the same groups as ``kmedtl.data.audit.audit`` (which compares all
    pairs): ``digests``/``phashes`` by sample id, ``path_of`` the used samples' files.
    With the DirectRunner the job runs in this process (its input is one small record
    per sample); any other runner gets the caller's options unchanged.
    """
    _beam()
    options = _small_job_options(beam_options)
    exact_in = [(sid, d, path_of[sid]) for sid, d in digests.items() if sid in path_of]
    near_in = [(sid, _signed(phashes[sid]), digests[sid]) for sid in phashes
               if sid in path_of and sid in digests]
    with tempfile.TemporaryDirectory(prefix="kmedtl-beam-") as out_dir:
        with beam.Pipeline(options=options) as p:
            exact = (p | "ExactInput" >> beam.Create(exact_in, reshuffle=False)
                     | "Exact" >> ExactDuplicateGroups())
            (exact | "ExactJson" >> beam.Map(_json_tagged("E"))
             | "WriteExact" >> beam.io.WriteToText(os.path.join(out_dir, "exact")))
            if near_threshold >= 0 and near_in:
                pairs = (p | "NearInput" >> beam.Create(near_in, reshuffle=False)
                         | "Pairs" >> NearDuplicatePairs(near_threshold))
                (pairs | "PairIds" >> beam.Map(_pair_ids)
                 | "PairJson" >> beam.Map(_json_tagged("P"))
                 | "WritePairs" >> beam.io.WriteToText(os.path.join(out_dir, "pairs")))
                (pairs | "Components" >> NearDuplicateComponents()
                 | "NearJson" >> beam.Map(_json_tagged("N"))
                 | "WriteNear" >> beam.io.WriteToText(os.path.join(out_dir, "near")))
        found = {"E": [], "P": [], "N": []}
        for path in glob.glob(os.path.join(out_dir, "*")):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        kind, value = json.loads(line)
                        found[kind].append(value)
    return DuplicateGroups(sorted(found["E"]), sorted(found["N"]),
                           sorted(tuple(p) for p in found["P"]))


def audit_groups_as_paths(index: DatasetIndex, groups: Iterable[list[str]]) -> list[list[str]]:
    """Id groups -> the path lists of an audit report (relative path, ``#frame``)."""
    path_of = {s.id: s.path for s in index.samples}

    def as_path(sid):
        frame = f"#{sid.rsplit('#', 1)[1]}" if "#" in sid else ""
        return index.relpath(path_of[sid]) + frame

    return sorted([as_path(x) for x in g] for g in groups)
