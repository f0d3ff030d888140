"""Read a PyTorch *legacy* (non-zip) checkpoint into NumPy arrays, without torch.

Why not ``torch.load``: torch is a 700 MB+ dependency kmedtl does not otherwise need, and
``torch.load`` on an untrusted file executes whatever the pickle asks for.  A checkpoint is
untrusted input, so this reader uses a restricted unpickler: the only globals it resolves
are ``collections.OrderedDict``, torch's tensor-rebuild functions and the typed storage
classes, each mapped to a harmless stand-in.  Anything else (``os.system``, ``eval``, a
``__reduce__`` of any other class) raises :class:`~kmedtl.errors.WeightsError` naming the
file and the refused global.  Nothing from the file is ever called.

The legacy layout (``torch.save(..., _use_new_zipfile_serialization=False)``), as written
by ``torch/serialization.py``:

1. three small pickles: the magic number ``0x1950a86a20f9469cfc6c``, the protocol version
   (1001) and a ``sys_info`` dict (endianness, sizes of short/int/long);
2. the object pickle (here a state dict).  Tensors are ``_rebuild_tensor_v2(storage,
   offset, size, stride, ...)`` calls whose storage is a *persistent id*
   ``("storage", StorageClass, key, location, numel)``;
3. a pickled list of storage keys, in the order their data follows;
4. for each key: the element count as a little-endian int64, then the raw elements.

Example::

    >>> from kmedtl.pretrained.torch_legacy import read_state_dict
    >>> sd = read_state_dict("efficientnet-lite0-57934424.pth")   # doctest: +SKIP
    >>> sd["_conv_stem.weight"].shape                              # doctest: +SKIP
    (32, 3, 3, 3)
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmedtl.errors import WeightsError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

#: torch storage class name -> NumPy dtype (little-endian, as written on x86/ARM).
STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": None,  # no NumPy dtype: refused with a clear message
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

_REBUILDERS = {"_rebuild_tensor", "_rebuild_tensor_v2"}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild(storage, storage_offset, size, stride, *_ignored):
    # Stand-in for torch._utils._rebuild_tensor(_v2): records the view, allocates nothing.
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: str):
        super().__init__(fh)
        self._path = path
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in _REBUILDERS:
            return _rebuild
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise WeightsError(
            f"{self._path}: refused to load global {module}.{name}: a checkpoint may only "
            "hold tensors and OrderedDicts (it may be malicious or not a weights file)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise WeightsError(f"{self._path}: unexpected persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise WeightsError(f"{self._path}: storage of unknown type {storage_type!r:.80}")
        dtype = STORAGE_DTYPES[storage_type.name]
        if dtype is None:
            raise WeightsError(
                f"{self._path}: {storage_type.name} tensors have no NumPy dtype; re-save the "
                "checkpoint in float32"
            )
        ref = self.storages.setdefault(key, _StorageRef(key, dtype, numel))
        return ref


def _load_small_pickle(fh, path):
    class _Plain(pickle.Unpickler):
        def find_class(self, module, name):
            raise WeightsError(f"{path}: refused to load global {module}.{name} in the header")

    return _Plain(fh).load()


def read_state_dict(path) -> collections.OrderedDict:
    """``{name: np.ndarray}`` from a legacy-format PyTorch checkpoint (see module docstring).

    Raises :class:`~kmedtl.errors.WeightsError` for a zip-format checkpoint, a file that is
    not a legacy checkpoint, a truncated file, or a pickle that asks for anything but
    tensors and OrderedDicts.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    with open(path, "rb") as fh:
        if fh.read(4) == b"PK\x03\x04":
            raise WeightsError(
                f"{path}: this is a zip-format PyTorch checkpoint (torch >= 1.6 default); "
                "only the legacy format is read without torch"
            )
        fh.seek(0)
        try:
            magic = _load_small_pickle(fh, path)
            if magic != MAGIC_NUMBER:
                raise WeightsError(f"{path}: not a legacy PyTorch checkpoint (bad magic number)")
            protocol = _load_small_pickle(fh, path)
            if protocol != PROTOCOL_VERSION:
                raise WeightsError(f"{path}: unsupported checkpoint protocol {protocol!r}")
            sys_info = _load_small_pickle(fh, path)
            if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
                raise WeightsError(f"{path}: big-endian checkpoints are not supported")
            unpickler = _RestrictedUnpickler(fh, str(path))
            obj = unpickler.load()
            keys = _load_small_pickle(fh, path)
        except WeightsError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
        data: dict[str, np.ndarray] = {}
        for key in keys:
            ref = unpickler.storages.get(str(key))
            if ref is None:
                raise WeightsError(f"{path}: storage {key!r} is listed but never used")
            head = fh.read(8)
            if len(head) != 8:
                raise WeightsError(f"{path}: truncated (storage {key} has no size)")
            numel = int(np.frombuffer(head, "<i8")[0])
            if numel != ref.numel:
                raise WeightsError(f"{path}: storage {key} holds {numel} elements, "
                                   f"expected {ref.numel}")
            itemsize = np.dtype(ref.dtype).itemsize
            raw = fh.read(numel * itemsize)
            if len(raw) != numel * itemsize:
                raise WeightsError(f"{path}: truncated in storage {key}")
            data[ref.key] = np.frombuffer(raw, ref.dtype)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = collections.OrderedDict()
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            continue  # e.g. metadata entries; tensors are all we read
        flat = data.get(value.storage.key)
        if flat is None:
            raise WeightsError(f"{path}: tensor {name!r} refers to a missing storage")
        out[str(name)] = _view(flat, value, path, name)
    return out


def _view(flat: np.ndarray, t: _TensorRef, path, name) -> np.ndarray:
    if not t.size:
        return np.array(flat[t.offset], copy=True)
    last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride)) if all(t.size) else 0
    if t.offset < 0 or last >= flat.size or any(st < 0 for st in t.stride):
        raise WeightsError(f"{path}: tensor {name!r} lies outside its storage")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset:], shape=t.size, strides=tuple(st * item for st in t.stride),
        writeable=False,
    )
    return np.ascontiguousarray(view)
