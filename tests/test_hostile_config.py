"""Hostile configs and checkpoints (issue 21, items 4, 7, 9 and the ``weights import``
part of 13): YAML alias bombs and deep nesting, secrets pulled in through ``${VAR}``,
checkpoints built to exhaust memory or CPU, and staged files left by ``kill -9``.

Every hostile case runs in a child process under a memory and time cap
(:mod:`limits`) and asserts a one-line error (exit 2, no traceback) that names the file,
what was wrong and the limit, within the caps.
"""

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from limits import kmedtl, python, run_capped
from test_pretrained_weights import _Storage, _Tensor, write_legacy

from kmedtl.errors import ConfigError, WeightsError
from kmedtl.pretrained.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION

ROOT = Path(__file__).resolve().parents[1]
RSS_MB = 500  # every child below stays under this (a bare `kmedtl data` start is ~150 MB)


def _fails_cleanly(res, *needles, rss_mb=RSS_MB):
    """Within the caps, exit 2, one ``kmedtl: error:`` line naming every needle."""
    print(f"peak {res.peak_mb:.0f} MB in {res.seconds:.1f} s: {res.err.strip()[-300:]}")
    assert res.ok, res.why()
    assert res.rc == 2, res.why()
    assert "Traceback" not in res.err, res.why()
    assert res.peak_mb < rss_mb, res.why()
    for needle in needles:
        assert needle in res.err, (needle, res.why())
    assert len(res.err) < 4000, res.why()  # bounded: no repr of a hostile structure


# ----------------------------------------------------------------------------- YAML
def _alias_bomb(levels=9, width=9) -> str:
    """A few hundred bytes whose aliases expand to width**levels strings."""
    lines = ["data: {root: data}", "train:", f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(_alias_bomb())
    assert len(cfg.read_bytes()) < 600
    res = kmedtl("data", "audit", cfg, rss_mb=RSS_MB, timeout=60, cwd=tmp_path)
    _fails_cleanly(res, "bomb.yaml", "KMEDTL_YAML_MAX_NODES")


@pytest.mark.slow
def test_yaml_deep_nesting_is_refused_with_the_depth_limit(tmp_path):
    flow = tmp_path / "deep.yaml"
    flow.write_text("data: {root: data}\ntrain: {x: " + "[" * 5000 + "]" * 5000 + "}\n")
    res = kmedtl("data", "audit", flow, rss_mb=RSS_MB, timeout=60, cwd=tmp_path)
    _fails_cleanly(res, "deep.yaml", "KMEDTL_YAML_MAX_DEPTH", "64")


def test_deep_block_yaml_and_deep_aliases_are_refused():
    from kmedtl.config import load_yaml

    block = "".join(f"{'  ' * i}k{i}:\n" for i in range(300)) + "  " * 300 + "v\n"
    with pytest.raises(ConfigError, match=r"b\.yaml: nested more than 64 levels deep "
                                          r"\(line \d+\).*KMEDTL_YAML_MAX_DEPTH=64"):
        load_yaml(block, "b.yaml")
    # 40 levels, then the same 40 again through an alias: 80 once followed
    nested = "[" * 40 + "]" * 40
    with pytest.raises(ConfigError, match="aliases followed"):
        load_yaml(f"a: &a {nested}\nb: " + "[" * 39 + "*a" + "]" * 39 + "\n", "c.yaml")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_yaml("a: &a [1, *a]\n", "r.yaml")


def test_every_yaml_reader_uses_the_limited_loader(tmp_path):
    """Hierarchy, study and the `--set` parser refuse the bomb too (in a capped child: no
    TensorFlow there, so it is quick)."""
    bomb = tmp_path / "h.yaml"
    bomb.write_text(_alias_bomb(levels=12, width=6).replace("data: {root: data}\ntrain:\n",
                                                            "tumor:\n"))
    code = f"""
import sys
from kmedtl.errors import KmedtlError
from kmedtl.hierarchy import Hierarchy
from kmedtl.config import parse_set
for f in (lambda: Hierarchy.from_yaml({str(bomb)!r}),
          lambda: Hierarchy.from_yaml(open({str(bomb)!r}).read()),
          lambda: parse_set(["train.x=" + "[" * 3000 + "]" * 3000])):
    try:
        f()
        print("LOADED")
    except KmedtlError as exc:
        print("REFUSED", str(exc)[:300])
"""
    res = python(code, rss_mb=RSS_MB, timeout=60)
    assert res.ok, res.why()
    lines = res.out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("REFUSED") for line in lines), res.why()
    assert "KMEDTL_YAML_MAX_NODES" in lines[0] and "h.yaml" in lines[0]
    assert "KMEDTL_YAML_MAX_DEPTH" in lines[2] and "--set" in lines[2]


def test_no_reader_of_user_yaml_calls_pyyaml_directly(tmp_path, monkeypatch):
    """The run config / pipeline YAML of the data commands goes through the limited
    loader; the other readers (pipeline, study, run folder, init, hierarchy) are checked
    in their source, which keeps this test free of TensorFlow."""
    import yaml

    def forbidden(*a, **k):
        raise AssertionError("yaml.safe_load/yaml.load called on user YAML")

    from kmedtl.cli import load_run_config

    monkeypatch.setattr(yaml, "safe_load", forbidden)
    monkeypatch.setattr(yaml, "load", forbidden)
    (tmp_path / "d").mkdir()
    pipe = tmp_path / "p.yaml"
    pipe.write_text("data: {root: d}\npipeline: {stages: [audit]}\n")
    assert load_run_config(pipe).data.root == str(tmp_path / "d")
    for f in ("run_folder.py", "init.py", "cli.py", "hierarchy.py", "config.py",
              "pipeline/spec.py", "study/config.py"):
        text = (ROOT / "kmedtl" / f).read_text()
        assert "yaml.safe_load(" not in text and "yaml.load(" not in text, f
        assert "load_yaml(" in text, f


def test_shipped_yaml_loads_and_a_few_aliases_are_fine(tmp_path):
    from kmedtl.config import load_yaml

    shipped = sorted((ROOT / "pipelines").rglob("*.yaml"))
    assert len(shipped) > 10
    for f in shipped:
        assert load_yaml(f.read_text(), str(f)) is not None, f
    text = ("base: &base {epochs: 3, lr: 0.1}\narms:\n  - {<<: *base, name: a}\n"
            "  - {<<: *base, name: b, lr: 0.2}\n")
    assert load_yaml(text, "x.yaml")["arms"][1] == {"epochs": 3, "lr": 0.2, "name": "b"}
    with pytest.raises(ConfigError, match=r"x\.yaml: .*aliases.*KMEDTL_YAML_MAX_ALIASES"):
        load_yaml("a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n", "x.yaml")
    assert load_yaml("a: &a 1\nb: [*a, *a]\n", "x.yaml", max_aliases=2)["b"] == [1, 1]


def test_expand_env_refuses_self_referencing_and_exploding_structures():
    from kmedtl.config import expand_env

    loop: dict = {"a": 1}
    loop["self"] = loop
    with pytest.raises(ConfigError, match="refers to itself"):
        expand_env(loop)
    shared: list = ["x"]
    for _ in range(40):  # 2**40 strings once copied out
        shared = [shared, shared]
    with pytest.raises(ConfigError, match="KMEDTL_YAML_MAX_NODES"):
        expand_env({"train": {"x": shared}})


# ----------------------------------------------------------------------------- ${VAR} secrets
SECRET = "s3cr3t-Pl4nted-0xC0FFEE"


def _tree_holds(folder: Path, needle: str) -> list:
    hits = []
    for p in folder.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(p)
    return hits


def test_a_secret_variable_in_a_url_is_refused_and_never_printed_or_written(tmp_path):
    (tmp_path / "labels.csv").write_text("StudyInstanceUID,label\n1.2.3,a\n")
    cfg = tmp_path / "pacs.yaml"
    cfg.write_text("name: pacs\ndata:\n  source: dicomweb\n  dicomweb:\n"
                   "    url: 'https://pacs.example.org/dicom-web?token=${PACS_PASSWORD}'\n"
                   "    store: store\n    labels: labels.csv\n")
    res = kmedtl("data", "audit", cfg, rss_mb=RSS_MB, timeout=60, cwd=tmp_path,
                 env={"PACS_PASSWORD": SECRET})
    _fails_cleanly(res, "pacs.yaml", "data.dicomweb.url", "PACS_PASSWORD", "token_env")
    assert SECRET not in res.out + res.err
    assert not _tree_holds(tmp_path, SECRET)


@pytest.mark.parametrize("text, field, var", [
    ("name: 'run-${PACS_PASSWORD}'\ndata: {root: d}\n", "name", "PACS_PASSWORD"),
    ("data: {root: '${API_TOKEN}/d'}\n", "data.root", "API_TOKEN"),
    ("data: {root: d}\ntrain: {note: '${HOME}'}\n", "train.note", "HOME"),
    ("data: {root: d, dicom: {window: '${WIN}'}}\n", "data.dicom.window", "WIN"),
])
def test_env_expansion_is_only_for_path_fields_and_never_for_secrets(tmp_path, monkeypatch,
                                                                   text, field, var):
    from kmedtl.config import load_config

    monkeypatch.setenv(var, SECRET)
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    msg = str(err.value)
    assert field in msg and "${" + var + "}" in msg and SECRET not in msg
    with pytest.raises(ConfigError) as err:  # the same through --set
        from kmedtl.config import parse_set
        load_config({"data": {"root": "d"}},
                    overrides=parse_set([f"{field}=${{{var}}}"]))
    assert "${" + var + "}" in str(err.value) and SECRET not in str(err.value)


def test_non_secret_variables_still_expand_in_path_fields(tmp_path, monkeypatch):
    from kmedtl.config import load_config

    monkeypatch.setenv("MY_DATA", str(tmp_path))
    monkeypatch.setenv("KEY_DIR", str(tmp_path / "keys"))  # *_DIR: a folder, not a secret
    cfg = load_config({"data": {"root": "${MY_DATA}/x", "cache_dir": "${KEY_DIR}/c"},
                       "output_dir": "${MY_DATA}/runs"})
    assert cfg.data.root == str(tmp_path / "x")
    assert cfg.data.cache_dir == str(tmp_path / "keys" / "c")
    assert cfg.output_dir == str(tmp_path / "runs")


# ----------------------------------------------------------------------------- checkpoints
READ = """
import sys
from kmedtl.errors import KmedtlError
from kmedtl.pretrained.torch_legacy import read_state_dict
try:
    sd = read_state_dict(sys.argv[1])
    print("READ", {k: v.shape for k, v in sd.items()})
except KmedtlError as exc:
    print(f"kmedtl: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _read_capped(path, rss_mb=300):
    return run_capped([sys.executable, "-c", READ, str(path)], rss_mb=rss_mb, timeout=30)


def _header(fh, protocol=PROTOCOL_VERSION, sys_info=None):
    pickle.dump(MAGIC_NUMBER, fh, protocol=2)
    if isinstance(protocol, bytes):
        fh.write(protocol)
    else:
        pickle.dump(protocol, fh, protocol=2)
    pickle.dump(sys_info if sys_info is not None else
                {"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, fh, protocol=2)


def test_checkpoint_with_zero_strides_is_refused_before_allocating(tmp_path):
    s0 = _Storage("0", np.zeros(1, "<f4"))
    path = write_legacy(tmp_path / "zero.pth", {"w": _Tensor(s0, 0, (27000, 27000), (0, 0))},
                        [s0])
    assert path.stat().st_size < 600
    _fails_cleanly(_read_capped(path), "zero.pth", "'w'", "stride", rss_mb=300)


@pytest.mark.parametrize("size, stride, why", [
    ((4, 4), (-1, 1), "stride"),
    ((2 ** 40, 2 ** 40), (1, 1), "elements"),
    ((3,), (1,), "storage"),          # runs past the 2-element storage
])
def test_checkpoint_tensor_views_are_checked_against_their_storage(tmp_path, size, stride,
                                                                   why):
    s0 = _Storage("0", np.zeros(2, "<f4"))
    path = write_legacy(tmp_path / "v.pth", {"w": _Tensor(s0, 0, size, stride)}, [s0])
    _fails_cleanly(_read_capped(path), "v.pth", why, rss_mb=300)


class _HugeData:
    """A storage that declares 2**40 elements (4 TiB) and holds 16 bytes."""

    size = 2 ** 40

    def tobytes(self):
        return b"\0" * 16


def test_checkpoint_storage_larger_than_the_file_is_refused(tmp_path):
    s0 = _Storage("0", _HugeData())
    path = write_legacy(tmp_path / "big.pth", {"w": _Tensor(s0, 0, (4,), (1,))}, [s0])
    _fails_cleanly(_read_capped(path), "big.pth", "storage '0'", "whole file", rss_mb=300)


def test_one_storage_shared_by_many_tensors_is_capped(tmp_path):
    """A 1 MB storage named by 2,000 strided views: 2 GB once copied out."""
    s0 = _Storage("0", np.zeros(2 ** 18, "<f4"))
    views = {f"w{i}": _Tensor(s0, i, (2, 2 ** 17 - 1100), (1, 2)) for i in range(2000)}
    path = write_legacy(tmp_path / "many.pth", views, [s0])
    _fails_cleanly(_read_capped(path), "many.pth", "max_expansion", rss_mb=400)


def _nested_shared_list(levels=40) -> bytes:
    a: list = []
    for _ in range(levels):
        a = [a, a]
    return pickle.dumps(a, protocol=2)  # the pickler's memo keeps it tiny


def _deep_list(depth=100_000) -> bytes:
    return b"\x80\x02" + b"(" * depth + b"l" * depth + b"."


@pytest.mark.parametrize("payload", ["shared", "deep"])
def test_checkpoint_header_with_a_nested_list_gives_a_short_error(tmp_path, payload):
    path = tmp_path / "proto.pth"
    with open(path, "wb") as fh:
        _header(fh, protocol=_nested_shared_list() if payload == "shared" else _deep_list())
    _fails_cleanly(_read_capped(path), "proto.pth", rss_mb=300)


def _nested_tuple_key(levels=60) -> bytes:
    """``{t: 1}`` where ``t = (t', t')`` 60 levels down: hashing it takes 2**60 steps.
    Written by hand: building the dict here would hash the key."""
    t: tuple = ()
    for _ in range(levels):
        t = (t, t)
    body = pickle.dumps(t, protocol=2)[2:-1]  # no PROTO, no STOP
    return b"\x80\x02}" + body + b"K\x01s."


def test_checkpoint_with_a_nested_tuple_key_is_refused_quickly(tmp_path):
    path = tmp_path / "key.pth"
    with open(path, "wb") as fh:
        _header(fh)
        fh.write(_nested_tuple_key())
        pickle.dump([], fh, protocol=2)
    _fails_cleanly(_read_capped(path), "key.pth", "key", rss_mb=300)


def test_checkpoint_with_deep_nesting_in_the_state_dict_is_refused(tmp_path):
    path = tmp_path / "deep.pth"
    with open(path, "wb") as fh:
        _header(fh)
        fh.write(b"\x80\x02}X\x01\x00\x00\x00w" + _deep_list(50_000)[2:-1] + b"s.")
        pickle.dump([], fh, protocol=2)
    _fails_cleanly(_read_capped(path), "deep.pth", "nested", rss_mb=300)


def test_a_normal_checkpoint_still_reads_in_the_capped_child(tmp_path):
    s0 = _Storage("0", np.arange(6, dtype="<f4"))
    path = write_legacy(tmp_path / "ok.pth", {"w": _Tensor(s0, 0, (2, 3), (3, 1)),
                                              "tied": _Tensor(s0, 0, (2, 3), (3, 1)),
                                              "b": _Tensor(s0, 5, (1, 1), (0, 0))}, [s0])
    res = _read_capped(path)
    assert res.ok and res.rc == 0, res.why()
    assert "'w': (2, 3)" in res.out and "'b': (1, 1)" in res.out


# ----------------------------------------------------------------------------- weights import
STAGE_AND_HANG = """
import sys, time
from kmedtl.pretrained import store
def validate(staged):
    print(staged, flush=True)
    time.sleep(120)
store.register_import(sys.argv[1], "efficientnet_lite0", validate)
"""


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name != "record.json")


@pytest.mark.slow
def test_weights_import_cleans_what_a_killed_import_left(tmp_path, monkeypatch):
    from kmedtl.pretrained import store

    home = tmp_path / "home"
    monkeypatch.setenv("KMEDTL_HOME", str(home))
    src = tmp_path / "efficientnet-lite0.pth"
    src.write_bytes(b"\0" * 4096)
    # kill -9 while the staged copy is being validated
    res = run_capped([sys.executable, "-c", STAGE_AND_HANG, str(src)], rss_mb=RSS_MB,
                     timeout=8, env={"KMEDTL_HOME": str(home)})
    assert res.killed == "time" and res.out.strip(), res.why()
    folder = home / "weights" / "imported" / "efficientnet_lite0"
    assert _leftovers(folder), "the killed import left nothing to clean"
    (folder / "staged-old.pth").write_bytes(b"x")  # the name older versions used
    (folder / "tmpab12cd_z.part").write_bytes(b"x")
    old = 1577836800  # 2020: older than any process running this test
    for name in ("staged-old.pth", "tmpab12cd_z.part"):
        os.utime(folder / name, (old, old))
    live = folder / store.staged_name(os.getpid(), "other.pth")  # a live importer's file
    live.write_bytes(b"x")

    def refuse(staged):
        assert staged.is_file() and staged.suffix == ".pth"
        raise WeightsError("does not fit")

    with pytest.raises(WeightsError, match="does not fit"):
        store.register_import(src, "efficientnet_lite0", refuse)
    assert _leftovers(folder) == [live.name]

    def interrupted(staged):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.register_import(src, "efficientnet_lite0", interrupted)
    assert _leftovers(folder) == [live.name]
    live.unlink()
    rec = store.register_import(src, "efficientnet_lite0", lambda staged: None)
    assert _leftovers(folder) == [src.name] and rec["file"] == src.name


def test_stale_conversion_temporaries_are_cleaned(tmp_path, monkeypatch):
    from kmedtl.pretrained import store

    monkeypatch.setenv("KMEDTL_HOME", str(tmp_path))
    wdir = store.weights_dir()
    wdir.mkdir(parents=True)
    dead = wdir / store.staged_name(2 ** 22 + 7, "x.weights.h5")  # no such PID
    dead.write_bytes(b"x")
    store.clean_stale(wdir)
    assert not dead.exists()
