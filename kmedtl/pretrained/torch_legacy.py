"""Read a PyTorch *legacy* (non-zip) checkpoint into NumPy arrays, without torch.

Why not ``torch.load``: torch is a 700 MB+ dependency kmedtl does not otherwise need, and
``torch.load`` on an untrusted file executes whatever the pickle asks for.  A checkpoint is
untrusted input, so this reader uses a restricted unpickler: the only globals it resolves
are ``collections.OrderedDict``, torch's tensor-rebuild functions and the typed storage
classes, each mapped to a harmless stand-in.  Anything else (``os.system``, ``eval``, a
``__reduce__`` of any other class) raises :class:`~kmedtl.errors.WeightsError` naming the
file and the refused global.  Nothing from the file is ever called.

A checkpoint may also be built to exhaust memory or CPU (issue 21), so the reader checks
before it allocates:

- every storage's declared size against the bytes left in the file;
- every tensor's shape and strides against its storage: no zero stride on a dimension
  longer than 1 (an expanded view), no negative one, the whole view inside its storage and
  no more elements than it holds (no overlapping views), dimensions <= 64; Python integers,
  so no product overflows;
- the arrays returned add up to at most ``max_expansion`` (default 2) times the file's
  size, identical views counted once (tied weights);
- the pickles: at most ``max_ops`` opcodes (default 2,000,000; the EfficientNet-Lite0
  state dict takes 10,696), nesting at most ``max_depth`` (default 32) levels, no object
  that contains itself, dictionary keys and set items only strings, numbers, bytes or
  None (hashing a nested tuple of shared parts takes 2**depth steps), and no length field
  larger than what is left of the file;
- error messages show at most a few hundred characters of any value (``reprlib``).

Each refusal is one WeightsError naming the file, the tensor or value, and the limit.

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
import io
import math
import pickle
import reprlib
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

#: Defaults of :func:`read_state_dict`'s limits (see the module docstring).
MAX_EXPANSION = 2.0
MAX_OPS = 2_000_000
MAX_DEPTH = 32
MAX_DIMS = 64

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 6


def _short(value) -> str:
    """A repr of at most a few hundred characters, whatever ``value`` is."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int of more than 4,300 digits
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 200 else text[:200] + "..."


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


class _Refused(Exception):
    """Raised inside the unpickler; :func:`read_state_dict` names the file."""


class _Truncated(Exception):
    """A length field that points past the end of the file."""


def _ints(value, what: str, limit: int = MAX_DIMS) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) > limit:
        raise _Refused(f"a tensor's {what} is not a list of at most {limit} integers "
                       f"({_short(value)})")
    if not all(type(v) is int for v in value):
        raise _Refused(f"a tensor's {what} holds a non-integer ({_short(value)})")
    return tuple(value)


def _rebuild(storage, storage_offset, size, stride, *_ignored):
    # Stand-in for torch._utils._rebuild_tensor(_v2): records the view, allocates nothing.
    # Its arguments come from the file: only their types are checked here; the view is
    # checked against its storage and the file once the tensor's name is known (_check_views).
    if not isinstance(storage, _StorageRef):
        raise _Refused(f"a tensor's storage is {_short(storage)}, not a storage")
    if type(storage_offset) is not int:
        raise _Refused(f"a tensor's storage offset is {_short(storage_offset)}")
    size, stride = _ints(size, "shape"), _ints(stride, "strides")
    if len(size) != len(stride):
        raise _Refused(f"a tensor has shape {size} but strides {stride}")
    return _TensorRef(storage, storage_offset, size, stride)


def _ordered_dict(*args):
    # torch pickles an OrderedDict as OrderedDict() + SETITEMS: with arguments, the C
    # constructor would hash whatever keys they hold, unchecked
    if args:
        raise _Refused("an OrderedDict built from arguments (a checkpoint never does)")
    return collections.OrderedDict()


class _BoundedFile(io.RawIOBase):
    """The checkpoint file as the unpickler sees it: a length field that asks for more
    bytes than are left in the file is refused before anything is allocated for it."""

    def __init__(self, fh, size: int):
        self._fh, self._size = fh, size

    def read(self, n=-1):
        left = self._size - self._fh.tell()
        if n is None or n < 0:
            n = left
        if n > left:
            raise _Truncated(f"a length field asks for {n:,} bytes, but only {left:,} "
                             "are left in the file")
        return self._fh.read(n)

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readline(self, limit=-1):
        line = self._fh.readline(limit)
        if not line.endswith(b"\n"):  # the C unpickler's check, which the Python one lacks
            raise _Truncated("a text field runs to the end of the file")
        return line


_SCALAR_KEYS = (str, int, float, bytes, bool, type(None))


def _check_keys(keys) -> None:
    for k in keys:
        if not isinstance(k, _SCALAR_KEYS):
            raise _Refused(f"a dictionary key or set item is a {type(k).__name__} "
                           f"({_short(k)}); a checkpoint's keys are names")


def _build_dispatch() -> dict:
    """The pure-Python unpickler's opcode table, with the checks above wrapped around it."""
    base = pickle._Unpickler.dispatch
    table = {}
    for code, fn in base.items():
        table[code] = fn
    refused = {pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.EXT1,
               pickle.EXT2, pickle.EXT4}
    for op in ("BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"):  # protocol 5
        if hasattr(pickle, op):
            refused.add(getattr(pickle, op))
    for op in refused:
        def no(self, _op=op):
            raise _Refused(f"pickle opcode {_op!r} (a checkpoint never uses it)")
        table[op[0]] = no

    def setitem(self, _fn=base[pickle.SETITEM[0]]):
        if len(self.stack) >= 2:
            _check_keys([self.stack[-2]])
        _fn(self)

    def marked_pairs(self, _fn):
        _check_keys(self.stack[0::2])
        _fn(self)

    def marked_items(self, _fn):
        _check_keys(self.stack)
        _fn(self)

    def build(self):
        # BUILD sets state on an object: only an OrderedDict's (torch's ``_metadata``),
        # which a state dict does not need; never on a tensor stand-in
        if len(self.stack) < 2 or not isinstance(self.stack[-2], collections.OrderedDict):
            raise _Refused("pickle BUILD on something other than an OrderedDict")
        self.stack.pop()

    table[pickle.SETITEM[0]] = setitem
    for op in (pickle.SETITEMS, pickle.DICT):
        table[op[0]] = lambda self, _fn=base[op[0]]: marked_pairs(self, _fn)
    for op in (pickle.ADDITEMS, pickle.FROZENSET):
        table[op[0]] = lambda self, _fn=base[op[0]]: marked_items(self, _fn)
    table[pickle.BUILD[0]] = build
    return table


class _LimitedUnpickler(pickle._Unpickler):
    """A restricted unpickler built on the pure-Python one (``pickle._Unpickler``): its
    opcode table can be wrapped op by op, which the C unpickler's cannot, so keys are
    checked before they are hashed and the opcodes are counted.  A checkpoint's pickles are
    small (tens of kB for a 20 MB file), so the slower Python loop costs milliseconds."""

    _table = _build_dispatch()

    def __init__(self, fh, path: str, *, tensors: bool, max_ops: int, file_size: int):
        super().__init__(fh)
        self._path, self._tensors, self._max_ops = path, tensors, max_ops
        self._file_size = file_size
        self._ops = 0
        self.storages: dict[str, _StorageRef] = {}
        table, limit = self._table, max_ops

        def counted(code):
            fn = table[code]

            def op(self_):
                self_._ops += 1
                if self_._ops > limit:
                    raise _Refused(f"a pickle of more than {limit:,} opcodes "
                                   "(read_state_dict(max_ops=...))")
                fn(self_)
            return op

        self.dispatch = {code: counted(code) for code in table}

    def find_class(self, module, name):
        if self._tensors:
            if module == "collections" and name == "OrderedDict":
                return _ordered_dict
            if module == "torch._utils" and name in _REBUILDERS:
                return _rebuild
            if module == "torch" and name in STORAGE_DTYPES:
                return _StorageType(name)
        where = "" if self._tensors else " in the header"
        raise WeightsError(
            f"{self._path}: refused to load global {str(module)[:80]}.{str(name)[:80]}"
            f"{where}: a checkpoint may only hold tensors and OrderedDicts (it may be "
            "malicious or not a weights file)"
        )

    def persistent_load(self, pid):
        if not self._tensors:
            raise _Refused(f"a persistent id in the header ({_short(pid)})")
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise WeightsError(f"{self._path}: unexpected persistent id {_short(pid)}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise WeightsError(f"{self._path}: storage of unknown type {_short(storage_type)}")
        if not isinstance(key, str) or len(key) > 256:
            raise _Refused(f"a storage key that is not a short string ({_short(key)})")
        if type(numel) is not int or numel < 0:
            raise _Refused(f"storage {key!r} declares {_short(numel)} elements")
        dtype = STORAGE_DTYPES[storage_type.name]
        if dtype is None:
            raise WeightsError(
                f"{self._path}: {storage_type.name} tensors have no NumPy dtype; re-save the "
                "checkpoint in float32"
            )
        nbytes = numel * np.dtype(dtype).itemsize
        if nbytes > self._file_size:
            raise _Refused(f"storage {key!r} declares {numel:,} elements ({nbytes:,} bytes), "
                           f"more than the whole file ({self._file_size:,} bytes)")
        ref = self.storages.setdefault(key, _StorageRef(key, dtype, numel))
        if (ref.dtype, ref.numel) != (dtype, numel):
            raise _Refused(f"storage {key!r} is declared twice, with different types or sizes")
        return ref


def _check_structure(obj, max_depth: int) -> None:
    """Refuse an unpickled value nested deeper than ``max_depth`` or containing itself.
    Iterative, and each object once however often it is shared."""
    depth: dict[int, int] = {}
    open_ids: set[int] = set()
    keep = []  # holds what is measured, so no id is reused meanwhile
    stack = [(obj, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        kids = _kids(node)
        if done:
            open_ids.discard(key)
            depth[key] = 1 + max((depth.get(id(k), 0) for k in kids), default=0)
            if depth[key] > max_depth:
                raise _Refused(f"a value nested more than {max_depth} levels deep "
                               "(read_state_dict(max_depth=...))")
            continue
        if not kids or key in depth:
            continue
        if key in open_ids:
            raise _Refused("a value that contains itself")
        open_ids.add(key)
        keep.append(node)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in depth)


def _kids(node) -> list:
    if isinstance(node, dict):
        return [x for kv in node.items() for x in kv]
    if isinstance(node, (list, tuple, set, frozenset)):
        return list(node)
    if isinstance(node, _TensorRef):
        return [node.size, node.stride]
    return []


def read_state_dict(path, *, max_expansion: float = MAX_EXPANSION, max_ops: int = MAX_OPS,
                    max_depth: int = MAX_DEPTH) -> collections.OrderedDict:
    """``{name: np.ndarray}`` from a legacy-format PyTorch checkpoint (see module docstring).

    Raises :class:`~kmedtl.errors.WeightsError` for a zip-format checkpoint, a file that is
    not a legacy checkpoint, a truncated file, a pickle that asks for anything but
    tensors and OrderedDicts, or one past the limits (``max_expansion``: the arrays
    returned, in bytes, over the file's size; ``max_ops``: opcodes per pickle;
    ``max_depth``: nesting).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as raw_fh:
        if raw_fh.read(4) == b"PK\x03\x04":
            raise WeightsError(
                f"{path}: this is a zip-format PyTorch checkpoint (torch >= 1.6 default); "
                "only the legacy format is read without torch"
            )
        raw_fh.seek(0)
        fh = _BoundedFile(raw_fh, size)

        def load(tensors=False):
            u = _LimitedUnpickler(fh, str(path), tensors=tensors, max_ops=max_ops,
                                  file_size=size)
            value = u.load()
            _check_structure(value, max_depth)
            return u, value

        try:
            _, magic = load()
            if type(magic) is not int or magic != MAGIC_NUMBER:
                raise WeightsError(f"{path}: not a legacy PyTorch checkpoint (bad magic number)")
            _, protocol = load()
            if type(protocol) is not int or protocol != PROTOCOL_VERSION:
                raise WeightsError(f"{path}: unsupported checkpoint protocol {_short(protocol)}")
            _, sys_info = load()
            if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
                raise WeightsError(f"{path}: big-endian checkpoints are not supported")
            unpickler, obj = load(True)
            _, keys = load()
        except WeightsError:
            raise
        except _Refused as exc:
            raise WeightsError(f"{path}: refused: {exc}") from None
        except _Truncated as exc:
            raise WeightsError(f"{path}: truncated, or not a checkpoint: {exc}") from None
        except RecursionError:
            raise WeightsError(f"{path}: refused: nested too deeply") from None
        except Exception as exc:  # noqa: BLE001 - any malformed pickle: not a checkpoint
            text = str(exc)[:200]
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint ("
                               f"{type(exc).__name__}: {text})") from None
        if not isinstance(obj, dict):
            raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise WeightsError(f"{path}: its storage list is {_short(keys)}, not a list of "
                               "storage keys")
        tensors = {str(name): value for name, value in obj.items()
                   if isinstance(value, _TensorRef)}  # other entries: metadata
        _check_views(tensors, path, size, max_expansion)
        data: dict[str, np.ndarray] = {}
        for key in keys:
            ref = unpickler.storages.get(key)
            if ref is None:
                raise WeightsError(f"{path}: storage {key!r} is listed but never used")
            head = raw_fh.read(8)
            if len(head) != 8:
                raise WeightsError(f"{path}: truncated (storage {key} has no size)")
            numel = int(np.frombuffer(head, "<i8")[0])
            if numel != ref.numel:
                raise WeightsError(f"{path}: storage {key} holds {numel} elements, "
                                   f"expected {ref.numel}")
            nbytes = numel * np.dtype(ref.dtype).itemsize  # <= the file size (persistent_load)
            raw = raw_fh.read(nbytes)
            if len(raw) != nbytes:
                raise WeightsError(f"{path}: truncated in storage {key}")
            data[ref.key] = np.frombuffer(raw, ref.dtype)
    out = collections.OrderedDict()
    made: dict[tuple, np.ndarray] = {}
    for name, value in tensors.items():
        flat = data.get(value.storage.key)
        if flat is None:
            raise WeightsError(f"{path}: tensor {name!r} refers to a missing storage")
        view = (value.storage.key, value.offset, value.size, value.stride)
        if view not in made:  # tied weights: one array
            made[view] = _view(flat, value)
        out[name] = made[view]
    return out


def _check_views(tensors: dict, path, file_size: int, max_expansion: float) -> None:
    """Every tensor's view against its storage, and all of them against the file, before
    any storage is read or any array made."""
    total, seen = 0, set()
    for name, t in tensors.items():
        where = f"{path}: tensor {_short(name)}"
        if t.offset < 0:
            raise WeightsError(f"{where} starts at {t.offset}, before its storage")
        if any(s < 0 for s in t.size):
            raise WeightsError(f"{where} has a negative dimension in its shape {t.size}")
        if any(st < 0 for st in t.stride):
            raise WeightsError(f"{where} has a negative stride ({t.stride}); a weights file "
                               "holds plain tensors: save tensor.contiguous()")
        if any(st == 0 and s > 1 for s, st in zip(t.size, t.stride)):
            raise WeightsError(f"{where} has a zero stride on a dimension of more than one "
                               f"element (shape {_short(t.size)}, strides {t.stride}): an "
                               "expanded view, refused; save tensor.contiguous()")
        numel = math.prod(t.size)
        if numel == 0:
            continue
        last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride))
        if numel > t.storage.numel or last >= t.storage.numel:
            raise WeightsError(
                f"{where} (shape {_short(t.size)}, strides {_short(t.stride)}, offset "
                f"{t.offset}) needs {numel:,} elements up to index {last:,}, but its storage "
                f"holds {t.storage.numel:,} elements")
        view = (t.storage.key, t.offset, t.size, t.stride)
        if view not in seen:
            seen.add(view)
            total += numel * np.dtype(t.storage.dtype).itemsize
    if total > max_expansion * file_size:
        raise WeightsError(
            f"{path}: its tensors add up to {total:,} bytes, more than {max_expansion:g} times "
            f"the file's {file_size:,} bytes (read_state_dict(max_expansion=...)); a weights "
            "file does not hold many views of one storage")


def _view(flat: np.ndarray, t: _TensorRef) -> np.ndarray:
    # checked by _check_views: inside the storage, strides >= 0
    if not t.size:
        return np.array(flat[t.offset], copy=True)
    if math.prod(t.size) == 0:
        return np.zeros(t.size, flat.dtype)
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset:], shape=t.size, strides=tuple(st * item for st in t.stride),
        writeable=False,
    )
    return np.ascontiguousarray(view)
