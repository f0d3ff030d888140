"""The cache build and the duplicate audit on Apache Beam (DirectRunner, multi-process and
in-memory): bit-identical entries, identical skip lists and identical exact and
near-duplicate groups against the process-pool build and ``kmedtl.data.audit``, on a
brain-tumour subset holding real duplicates and on every pydicom / pydicom-data file."""

import hashlib
import os
import random
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import brain_tumor_hierarchy, pydicom_test_files

from kmedtl.data import scan
from kmedtl.data.audit import audit, hash_options, scan_index
from kmedtl.data.cache import build_cache
from kmedtl.data.hashing import hamming_pairs
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import DatasetIndex, Sample, index_folder

if os.environ.get("CI", "").strip().lower() in ("true", "1"):
    import apache_beam as beam  # CI installs kmedtl[beam]: fail, never skip
else:
    beam = pytest.importorskip("apache_beam", reason="Apache Beam: pip install kmedtl[beam]")
from apache_beam.testing.util import assert_that  # noqa: E402

from kmedtl.data import beam as kb  # noqa: E402

IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def entries(folder) -> dict[str, bytes]:
    """Every cache entry under ``folder``: relative name -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*.u8")}


def assert_same_build(a, b):
    # byte-identical files share one entry: which of them decodes it and which finds it
    # already written depends on timing in both builds, so compare the sum
    assert (len(a.files), len(a.skipped), a.decoded + a.reused) == \
        (len(b.files), len(b.skipped), b.decoded + b.reused)
    for r in (a, b):
        assert len(set(r.files.values())) <= r.decoded <= len(r.files)
    assert a.digests == b.digests and a.phashes == b.phashes
    assert [s.to_dict() for s in a.skipped] == [s.to_dict() for s in b.skipped]
    assert {k: os.path.relpath(v, a.folder) for k, v in a.files.items()} == \
        {k: os.path.relpath(v, b.folder) for k, v in b.files.items()}
    ea, eb = entries(a.folder), entries(b.folder)
    assert ea.keys() == eb.keys() and len(ea) == len(set(a.files.values()))
    assert all(ea[k] == eb[k] for k in ea), "cached pixels differ"


def random_hashes(n, seed, planted=()):
    rng = random.Random(seed)
    hashes = [rng.getrandbits(64) for _ in range(n)]
    for i, d in planted:  # a neighbour of hashes[i] at exactly d bits
        bits = rng.sample(range(64), d)
        h = hashes[i]
        for b in bits:
            h ^= 1 << b
        hashes.append(h)
    return hashes


@pytest.mark.parametrize("threshold", [0, 1, 2, 5, 8, 70])
def test_banding_finds_exactly_the_all_pairs_result(threshold):
    band_list = kb.bands(threshold)
    assert len(band_list) == threshold + 1
    assert sum(w for _, w in band_list) == 64
    covered = [s + k for s, w in band_list for k in range(w)]
    assert sorted(covered) == list(range(64))  # disjoint and complete
    planted = [(i, d) for i, d in zip(range(0, 60, 3), [0, 1, 2, 3, 4, 5, 8, 9, 12, 20] * 2)]
    hashes = random_hashes(60, threshold, planted)
    hashes += [hashes[0]] * 2 + [0, 1, (1 << 64) - 1]  # repeats, extremes, top bit set
    ids = [f"s{i:03d}" for i in range(len(hashes))]
    expected = {(ids[a], ids[b]) for a, b in hamming_pairs(hashes, threshold)}
    with beam.Pipeline(options=kb.pipeline_options(IN_MEMORY)) as p:
        got = (p | beam.Create([(sid, kb._signed(h), "d" + sid) for sid, h in zip(ids, hashes)])
               | kb.NearDuplicatePairs(threshold)
               | beam.Map(lambda pair: tuple(kb._pair_ids(pair))))
        assert_that(got, _exactly(expected))
    assert len(expected) >= (1 if threshold < 70 else 100)


def _exactly(expected):
    def check(actual):
        actual = list(actual)
        assert len(actual) == len(set(actual)), "a pair was reported twice"
        assert set(actual) == expected, (sorted(set(actual) ^ expected))[:5]

    return check


def test_pigeonhole_any_pair_within_t_bits_shares_a_band():
    rng = random.Random(0)
    for t in range(0, 12):
        band_list = kb.bands(t)
        for _ in range(300):
            a = rng.getrandbits(64)
            b = a
            for bit in rng.sample(range(64), rng.randint(0, t)):
                b ^= 1 << bit
            assert kb._first_shared_band(a, b, band_list) >= 0


def test_options_defaults_and_pass_through():
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    opts = kb.pipeline_options(workers=3)
    assert opts.view_as(StandardOptions).runner == "DirectRunner"
    assert opts.view_as(DirectOptions).direct_running_mode == "multi_processing"
    assert opts.view_as(DirectOptions).direct_num_workers == 3
    opts = kb.pipeline_options(["--direct_running_mode=in_memory", "--runner=DirectRunner"])
    assert opts.view_as(DirectOptions).direct_running_mode == "in_memory"
    opts = kb.pipeline_options({"runner": "FlinkRunner", "flink_master": "host:8081"})
    assert opts.view_as(StandardOptions).runner == "FlinkRunner"
    assert "--flink_master=host:8081" in kb.beam_flags({"flink_master": "host:8081"})
    assert kb.pipeline_options(opts) is opts


def test_failed_job_is_a_clear_error(tmp_path, tiny_images):
    index = index_folder(tiny_images)
    with pytest.raises(kb.BeamPipelineError, match="Beam cache job failed"):
        kb.build_cache_beam(index, ImageOptions(size=16), tmp_path / "c",
                            beam_options=["--runner=NoSuchRunner"])


@pytest.mark.slow
def test_a_crashing_worker_fails_the_job_with_a_clear_error(tmp_path, tiny_images,
                                                             monkeypatch):
    """A codec that kills its process (``os.abort``, standing in for a segfault) fails the
    Beam job promptly, pointing at the process-pool build that isolates the file."""
    victim = tiny_images / "no_tumor" / "CRASHME.png"
    victim.write_bytes((tiny_images / "no_tumor" / "gray.png").read_bytes())
    monkeypatch.setenv("KMEDTL_TEST_CRASH_MARKER", "CRASHME")  # read by fresh workers
    with pytest.raises(kb.BeamPipelineError, match="process-pool build"):
        kb.build_cache_beam(index_folder(tiny_images), ImageOptions(size=16), tmp_path / "c",
                            workers=2)
    assert not list((tmp_path / "c").rglob(".beam-*"))  # its temporary results are gone


def test_in_memory_runner_and_reuse_match_the_pool(tiny_images, tmp_path):
    (tiny_images / "no_tumor" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    index = index_folder(tiny_images)
    opts = ImageOptions(size=24)
    pool = build_cache(index, opts, tmp_path / "pool", workers=2, progress=False)
    mem = kb.build_cache_beam(index, opts, tmp_path / "beam", beam_options=IN_MEMORY)
    assert_same_build(pool, mem)
    assert [os.path.basename(s.path) for s in mem.skipped] == ["broken.png"]
    again = kb.build_cache_beam(index, opts, tmp_path / "beam", beam_options=IN_MEMORY)
    assert again.decoded == 0 and again.reused == 6 and again.files == mem.files
    # a Beam build reuses a process-pool cache (same index.json), and vice versa
    cross = kb.build_cache_beam(index, opts, tmp_path / "pool", beam_options=IN_MEMORY)
    assert cross.decoded == 0 and cross.reused == 6


@pytest.fixture(scope="module")
def brain_subset(datasets_dir):
    """~300 brain-tumour images: every 12th file plus every member of 25 groups of
    byte-identical files (the README promises duplicates, also across splits)."""
    root = datasets_dir / "brain-tumor-mri"
    index = index_folder(root, brain_tumor_hierarchy(), ImageOptions(size=64))
    by_sha = defaultdict(list)
    for s in index.samples:
        by_sha[hashlib.sha256(Path(s.path).read_bytes()).hexdigest()].append(s.path)
    dup_paths = {p for g in sorted(g for g in by_sha.values() if len(g) > 1)[:25] for p in g}
    keep = [s for i, s in enumerate(index.samples) if i % 12 == 0 or s.path in dup_paths]
    assert len(dup_paths) >= 50
    return DatasetIndex(keep, [], len(keep), index.root)


@pytest.mark.integration
@pytest.mark.slow
def test_brain_tumour_subset_beam_equals_pool_and_audit(brain_subset, tmp_path):
    opts = ImageOptions(size=64)
    pool = build_cache(brain_subset, opts, tmp_path / "pool", workers=2, progress=False)
    beamed = kb.build_cache_beam(brain_subset, opts, tmp_path / "beam")  # multi-process
    assert_same_build(pool, beamed)
    assert beamed.decoded + beamed.reused == len(brain_subset.samples)
    assert len(set(beamed.files.values())) < len(beamed.files)  # duplicates share entries

    report = audit(brain_subset, opts, cache_dir=tmp_path / "pool", workers=2, progress=False)
    used = brain_subset.drop(beamed.skipped)
    groups = kb.duplicate_groups(beamed.digests, beamed.phashes,
                                 {s.id: s.path for s in used.samples}, 2)
    assert kb.audit_groups_as_paths(used, groups.exact) == report["duplicate_groups"]
    assert kb.audit_groups_as_paths(used, groups.near) == report["near_duplicate_groups"]
    assert len(report["duplicate_groups"]) >= 25 and report["near_duplicate_groups"]
    assert {frozenset(p) for p in groups.near_pairs} == \
        {frozenset(p) for p in report["_internal"]["near_pairs"]}
    # a looser threshold: still exactly the all-pairs answer
    loose = kb.duplicate_groups(beamed.digests, beamed.phashes,
                                {s.id: s.path for s in used.samples}, 8)
    ids = sorted(beamed.phashes)
    expected = {frozenset((ids[a], ids[b])) for a, b in
                hamming_pairs([beamed.phashes[i] for i in ids], 8)}
    assert {frozenset(p) for p in loose.near_pairs} == expected


@pytest.mark.integration
@pytest.mark.slow
def test_dicom_corpus_beam_equals_pool(pydicom_files, tmp_path):
    """Every file of the pydicom wheels: compressed, multi-frame, colour, corrupt, not
    DICOM at all.  Same entries, same skip reasons, same hashes."""
    samples = [Sample(str(p), "dicom") for p in pydicom_test_files()]
    index = DatasetIndex(samples, [], len(samples), None)
    opts = ImageOptions(size=32)
    pool = build_cache(index, opts, tmp_path / "pool", workers=2, progress=False)
    beamed = kb.build_cache_beam(index, opts, tmp_path / "beam")
    assert_same_build(pool, beamed)
    assert len(pool.skipped) > 10 and len(pool.files) > 100  # both outcomes are exercised
    kinds = {s.kind for s in beamed.skipped}
    assert {"not_dicom", "no_pixel_data"} & kinds

    # the audit's pass without a cache: same digests, hashes and skips (the audit hashes a
    # fixed-size rendering, audit.hash_options)
    hopts = hash_options(opts)
    digests, phashes, _, skipped = scan_index(index, hopts, None, workers=2, progress=False)
    d2, p2, _, s2 = kb.scan_index_beam(index, hopts, beam_options=IN_MEMORY, work_dir=tmp_path)
    assert (digests, phashes) == (d2, p2)
    assert [s.to_dict() for s in skipped] == [s.to_dict() for s in s2]
    used = index.drop(skipped)
    groups = kb.duplicate_groups(d2, p2, {s.id: s.path for s in used.samples}, 2)
    report = audit(index, opts, workers=2, progress=False)
    assert kb.audit_groups_as_paths(used, groups.exact) == report["duplicate_groups"]
    assert kb.audit_groups_as_paths(used, groups.near) == report["near_duplicate_groups"]
    assert report["duplicate_groups"]  # the wheels ship byte-identical copies


def test_scan_process_is_what_beam_runs(tiny_images):
    """The Beam DoFn is ``scan.process`` itself, not a copy."""
    task = scan.Task(str(next(tiny_images.rglob("*.png"))), None, ImageOptions(size=16))
    i, r = kb._process_indexed((7, task))
    assert i == 7 and r.ok and r == scan.process(task)


@pytest.mark.slow
def test_cli_audit_with_the_beam_runner_matches_the_process_pool(tmp_path, capsys):
    """`kmedtl data audit --runner beam` reports what the process pool reports."""
    import json

    from helpers import smooth_image, write_image

    from kmedtl.cli import main

    root = tmp_path / "data"
    for c, label in enumerate(("a", "b")):
        for k in range(6):
            write_image(root / label / f"{k}.png", smooth_image(10 * c + k))
        write_image(root / label / "copy.png", smooth_image(10 * c))  # exact duplicate
    (root / "a" / "broken.png").write_bytes(b"not a png")
    out = {}
    for runner in ("process", "beam"):
        j = tmp_path / f"{runner}.json"
        code = main(["data", "audit", str(root), "--runner", runner, "--workers", "1",
                     "--cache-dir", str(tmp_path / f"cache_{runner}"), "--json", str(j)])
        assert code == 0
        out[runner] = json.loads(j.read_text())
    for key in ("counts", "duplicate_groups", "near_duplicate_groups", "label_conflicts"):
        assert out["process"][key] == out["beam"][key], key
    assert out["beam"]["counts"]["skipped"] == 1 and len(out["beam"]["duplicate_groups"]) == 2
