"""The cache build and the duplicate audit on Beam's DaskRunner, against a real
``dask.distributed`` cluster: a ``dask scheduler`` and two ``dask worker`` processes on
127.0.0.1 (separate processes started with the ``dask`` command line, talking TCP, not an
in-process ``LocalCluster``), stopped by the fixture's finaliser.

The data: ~40 real files (brain-tumour MRI JPEGs from ``$KMEDTL_DATASETS``, pydicom's
DICOMs including a multi-frame one, an exact copy, a re-encoded near copy, a DICOM without
pixels and a broken PNG).  The Dask build must equal the plain-loop build bit for bit:
entries, digests, perceptual hashes, skip lists with reasons; the Dask audit must equal
the process-pool audit key for key (exact and near-duplicate groups included).  Both
workers must have run tasks.  Also the shorthand flags and the clear errors.
"""

import json
import os
import shutil
import sys
import time

import pytest
from helpers import dicom_file

if os.environ.get("CI", "").strip().lower() in ("true", "1"):
    import apache_beam  # noqa: F401 - CI installs kmedtl[beam] (with dask): fail, never skip
    import distributed
else:
    pytest.importorskip("apache_beam", reason="Apache Beam: pip install kmedtl[beam]")
    distributed = pytest.importorskip(
        "distributed", reason="Beam's DaskRunner: pip install 'apache-beam[dask]'")

from dask_cluster import dask_cluster_fixture  # noqa: E402, F401 - fixture `dask_cluster`
from test_beam import assert_same_build, entries  # noqa: E402

from kmedtl.cli import main  # noqa: E402
from kmedtl.data import beam as kb  # noqa: E402
from kmedtl.data.cache import build_cache  # noqa: E402
from kmedtl.data.options import ImageOptions  # noqa: E402
from kmedtl.data.sources import index_folder  # noqa: E402
from kmedtl.errors import BackendUnavailableError, KmedtlError  # noqa: E402

OPTS = ImageOptions(size=64, frames="all")
PER_CLASS = 8


@pytest.fixture(scope="module")
def dicom_and_mri(tmp_path_factory, datasets_dir):
    """~40 real files in a folder-per-class tree with an exact copy, a near copy (JPEG
    re-encoded as greyscale at quality 70), a multi-frame DICOM and two files to skip."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data") / "ds"
    src = datasets_dir / "brain-tumor-mri" / "Training"
    for cls in sorted(p.name for p in src.iterdir() if p.is_dir()):
        (root / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:PER_CLASS]:
            shutil.copyfile(f, root / cls / f.name)
    first = sorted((root / "glioma_tumor").iterdir())[0]
    shutil.copyfile(first, root / "no_tumor" / f"copy_{first.name}")
    Image.open(first).convert("L").save(root / "no_tumor" / "near.jpg", quality=70)
    (root / "no_tumor" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "dicom").mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "rtplan.dcm"):
        shutil.copyfile(dicom_file(name), root / "dicom" / name)
    return root


def host_port(address: str) -> str:
    return address.split("://", 1)[1]


# ---------------------------------------------------------------------------------------
# On the cluster


@pytest.mark.integration
@pytest.mark.slow
def test_dask_cache_build_equals_the_plain_loop_bit_for_bit(dask_cluster, dicom_and_mri,
                                                            tmp_path):
    index = index_folder(dicom_and_mri, None, OPTS)
    assert len(index.samples) > 4 * PER_CLASS + 10  # emri_small.dcm is 10 frames
    local = build_cache(index, OPTS, tmp_path / "local", workers=1, progress=False)
    t0 = time.time()
    dask = kb.build_cache_beam(index, OPTS, tmp_path / "dask",
                               beam_options=kb.dask_flags(host_port(dask_cluster.address)))
    assert_same_build(local, dask)  # entries byte for byte, digests, pHashes, skips
    assert sorted((os.path.basename(s.path), s.kind) for s in dask.skipped) == \
        [("broken.png", "not_image"), ("rtplan.dcm", "no_pixel_data")]
    assert len(set(dask.files.values())) < len(dask.files)  # the copy shares an entry
    # both workers ran the per-file work (the DaskRunner's default, 128 files a
    # partition, would have left it all to one)
    assert dask_cluster.workers_that_ran_tasks_since(t0) == dask_cluster.workers()
    assert not list((tmp_path / "dask").rglob(".beam-*"))  # temporary results removed
    again = kb.build_cache_beam(index, OPTS, tmp_path / "dask",
                                beam_options=kb.dask_flags(dask_cluster.address))
    assert again.decoded == 0 and again.files == dask.files


@pytest.mark.integration
@pytest.mark.slow
def test_dask_audit_cli_equals_the_process_pool_audit(dask_cluster, dicom_and_mri,
                                                      tmp_path, capsys):
    """`kmedtl data audit --runner dask --dask-scheduler HOST:PORT`: the report equals the
    process pool's, every key; small partitions make both jobs' GroupByKeys shuffle
    between the two workers."""
    out = {}
    for runner, extra in (("process", ["--workers", "1"]),
                          ("dask", ["--dask-scheduler", host_port(dask_cluster.address),
                                    "--beam-option=--dask_partition_size=3"])):
        j = tmp_path / f"{runner}.json"
        code = main(["data", "audit", str(dicom_and_mri), "--runner", runner, *extra,
                     "--size", "64", "--frames", "all",
                     "--cache-dir", str(tmp_path / f"cache_{runner}"), "--json", str(j)])
        assert code == 0, capsys.readouterr()
        out[runner] = json.loads(j.read_text())
    local, dask = out["process"], out["dask"]
    assert local.keys() == dask.keys()
    for key in local:
        assert dask[key] == local[key], key
    assert [s["kind"] for s in dask["skipped"]] == ["no_pixel_data", "not_image"]
    assert len(dask["duplicate_groups"]) >= 1 and len(dask["near_duplicate_groups"]) >= 1
    assert any("near.jpg" in p for g in dask["near_duplicate_groups"] for p in g)
    assert entries(tmp_path / "cache_dask") == entries(tmp_path / "cache_process")


@pytest.mark.integration
def test_dask_cache_cli_long_form_beam_options(dask_cluster, dicom_and_mri, tmp_path,
                                               capsys):
    """`--runner beam --beam-option=--runner=DaskRunner --beam-option=--dask_client_
    address=...` (Beam's own flags; kmedtl qualifies the runner's name)."""
    outputs = {}
    for name, flags in (("process", ["--workers", "1"]),
                        ("dask", ["--runner", "beam", "--beam-option=--runner=DaskRunner",
                                  f"--beam-option=--dask_client_address="
                                  f"{dask_cluster.address}"])):
        capsys.readouterr()
        code = main(["data", "cache", str(dicom_and_mri), *flags, "--size", "64",
                     "--frames", "all", "--cache-dir", str(tmp_path / name)])
        assert code == 0
        outputs[name] = capsys.readouterr().out.replace(str(tmp_path / name), "CACHE")
    # the first line's decoded/reused split depends on timing (which of two identical
    # files is decoded first); the image count, read/used/skipped counts and skip reasons
    # must agree
    local, dask = (outputs[k].splitlines() for k in ("process", "dask"))
    assert dask[0].split(" (")[0] == local[0].split(" (")[0]
    assert dask[0].endswith("skipped 2") and dask[1:] == local[1:]
    assert entries(tmp_path / "dask") == entries(tmp_path / "process")


# ---------------------------------------------------------------------------------------
# Flags and errors (no cluster)


def test_dask_flags_and_the_runner_short_name():
    from apache_beam.options.pipeline_options import StandardOptions

    assert kb.dask_flags("10.0.0.5:8786") == [
        f"--runner={kb.DASK_RUNNER}", "--dask_client_address=tcp://10.0.0.5:8786"]
    assert kb.dask_flags("tls://h:1", partition_size=4)[1:] == [
        "--dask_client_address=tls://h:1", "--dask_partition_size=4"]
    for flags in (["--runner=DaskRunner"], ["--runner", "DaskRunner"], "--runner=dask"):
        opts = kb.pipeline_options(flags)
        assert opts.view_as(StandardOptions).runner == kb.DASK_RUNNER
    with pytest.raises(KmedtlError, match="HOST:PORT"):
        kb.dask_address(" ")


def test_dask_cli_runner_mapping():
    from types import SimpleNamespace as NS

    from kmedtl.data.cli import beam_runner

    assert beam_runner(NS(runner="dask", dask_scheduler="h:1", beam_option=["--x=1"])) == \
        ("beam", [f"--runner={kb.DASK_RUNNER}", "--dask_client_address=tcp://h:1", "--x=1"])
    assert beam_runner(NS(runner="dask", dask_scheduler=None, beam_option=[])) == \
        ("beam", [f"--runner={kb.DASK_RUNNER}"])  # a LocalCluster per job
    assert beam_runner(NS(runner="beam", dask_scheduler=None, beam_option=[])) == ("beam", [])
    with pytest.raises(KmedtlError, match="--dask-scheduler needs --runner dask"):
        beam_runner(NS(runner="process", dask_scheduler="h:1", beam_option=[]))


def test_dask_errors_are_clear(tiny_images, tmp_path, monkeypatch):
    index = index_folder(tiny_images)
    opts = ImageOptions(size=16)
    # a Dask option without the DaskRunner would be ignored quietly: refuse it
    with pytest.raises(KmedtlError, match="--dask_client_address is a DaskRunner option"):
        kb.build_cache_beam(index, opts, tmp_path / "a",
                            beam_options=["--dask_client_address=tcp://127.0.0.1:1"])
    # nothing listening there: fail fast, naming the address and the fix
    with pytest.raises(kb.BeamPipelineError,
                       match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"):
        kb.build_cache_beam(index, opts, tmp_path / "b", beam_options=[
            *kb.dask_flags("127.0.0.1:9"), "--dask_connection_timeout=2"])
    # apache-beam without its [dask] extra
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'apache-beam\[dask\]"):
        kb.build_cache_beam(index, opts, tmp_path / "c", beam_options=kb.dask_flags("h:1"))
