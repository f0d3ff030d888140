"""Reading and writing kmedtl's JSON artefacts: one pair of functions for the package.

- :func:`write_json` writes atomically (a ``<path>.tmp`` sibling renamed over ``path``), so
  a reader never sees half a file.  By default the data go through :func:`json_safe` and
  are written as strict JSON (NaN/inf become ``null``, NumPy scalars and arrays become
  Python numbers and lists); ``strict=False`` writes them as given, with ``default`` for
  whatever ``json`` cannot encode (the run stages' records use ``default=str``).
- :func:`read_json` returns ``None`` for a missing file and raises ``error`` (a
  :class:`~kmedtl.errors.KmedtlError` subclass, :class:`~kmedtl.errors.ConfigError` unless
  told) naming the file for one that is not valid JSON.

Example::

    >>> import tempfile, numpy as np, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.json"
    >>> _ = write_json(p, {"auc": np.float64(0.9), "ci": [float("nan"), 1.0]})
    >>> read_json(p)
    {'auc': 0.9, 'ci': [None, 1.0]}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from kmedtl.errors import ConfigError

__all__ = ["canonical", "digest", "digest_items", "json_safe", "read_json", "write_json"]


def json_safe(obj):
    """NaN/inf -> None and NumPy scalars/arrays -> Python, recursively (valid strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def atomic_write(path, write, *, newline: str | None = None, binary: bool = False) -> str:
    """``write(fh)`` into ``<path>.tmp``, then rename it over ``path``: a reader never sees
    half a file, and a failed write leaves the old file and no temporary one.  Returns the
    path (a string).  ``binary``: ``fh`` takes bytes (UTF-8 text otherwise)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    opened = (dict(mode="wb") if binary else
              dict(mode="w", encoding="utf-8", newline=newline))
    try:
        with open(tmp, **opened) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path, data, *, strict: bool = True, default=None, indent: int = 1) -> str:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`); returns the path.

    ``strict`` (default): :func:`json_safe` first and refuse NaN (strict JSON).  Otherwise
    the data are dumped as they are, ``default`` encoding what ``json`` cannot."""
    if strict:
        return atomic_write(path, lambda fh: json.dump(json_safe(data), fh, indent=indent,
                                                       allow_nan=False, default=default))
    return atomic_write(path, lambda fh: json.dump(data, fh, indent=indent, default=default))


def read_json(path, *, error: type[Exception] = ConfigError,
              hint: str = "rerun the stage that writes it") -> Any | None:
    """The content of ``path``; ``None`` when there is no such file.  A file that cannot
    be read or parsed raises ``error`` naming it (with ``hint`` on what to do)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise error(f"{path}: unreadable JSON ({exc}); {hint}") from None


# ------------------------------------------------------------------------ fingerprints
# kmedtl's digests of values, in one place: `kmedtl run`'s stage fingerprints and tokens
# (:func:`digest`) and the study's split fingerprint (:func:`digest_items`).  They are two
# functions because each value is stored: stage records hold digests, and every study cell
# key holds the split fingerprint, so changing either algorithm would orphan committed
# records and cells (tests/test_fingerprints.py pins both values).


def canonical(obj) -> str:
    """``obj`` as compact JSON with sorted keys (``str()`` for what JSON cannot encode)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj) -> str:
    """SHA-256 (hex) of :func:`canonical` ``obj``: the pipeline's stage fingerprints."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()


def digest_items(items, size: int = 8) -> str:
    """BLAKE2b (``size`` bytes, hex) of ``str(item)`` for each item, each ended by a NUL
    byte: the study's split fingerprint (image size, split options, relative image paths)."""
    h = hashlib.blake2b(digest_size=size)
    for s in items:
        h.update(str(s).encode())
        h.update(b"\0")
    return h.hexdigest()
