"""One file in, one model-ready image out: the single decode path of every data route.

``load_image`` reads a file (DICOM or PNG/JPEG, told apart by content, not extension),
decodes it to float32 [0, 1] and applies ``ImageOptions`` (channels, resize) and the 8-bit
quantisation.  The uncached ``tf.data`` pipeline, the process-pool cache, the audit and
``kmedtl data show`` all call it, so they cannot disagree about pixels.
No TensorFlow import here: this module runs inside cache worker processes.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmedtl.data import dicom, raster, tfio_backend, transforms
from kmedtl.data.hashing import content_digest
from kmedtl.data.options import DEFAULT_MAX_FILE_BYTES, ImageOptions
from kmedtl.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")


@dataclass
class Loaded:
    """A preprocessed image (uint8, ``options.shape``), its safe meta and the file's digest."""

    image: np.ndarray
    meta: dict
    digest: str | None = None


#: Reads past the first ``stat`` size (a file growing while it is read) go in chunks of
#: this size, so the buffer never runs ahead of the byte budget.
_CHUNK = 1 << 20


def _limit_hint(limit: int) -> str:
    return (f"over data.max_file_bytes = {limit:,} bytes; raise data.max_file_bytes if this "
            "file is a real image")


def check_file(path, max_bytes: int | None = None) -> os.stat_result:
    """``os.stat`` (following symlinks) and refuse what must not be opened or read.

    Raises ``DataError`` with kind ``not_regular_file`` for FIFOs, sockets and devices
    (also behind a symlink: opening a FIFO blocks forever, ``/dev/zero`` never ends) and
    ``file_too_large`` for files over ``max_bytes`` (``data.max_file_bytes``).
    """
    p = os.fspath(path)
    limit = DEFAULT_MAX_FILE_BYTES if max_bytes is None else int(max_bytes)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise _os_error(p, exc) from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(p, "is a folder, not a file", kind="not_a_file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(p, f"not a regular file ({_file_type(st.st_mode)}); only regular "
                        "files are read", kind="not_regular_file")
    if st.st_size > limit:
        raise DataError(p, f"file is {st.st_size:,} bytes, {_limit_hint(limit)}",
                        kind="file_too_large")
    return st


def read_bytes(path, max_bytes: int | None = None) -> bytes:
    """Read a whole regular file of at most ``max_bytes`` (default
    ``DEFAULT_MAX_FILE_BYTES``), turning OS errors into ``DataError`` with a reason code.

    The file is checked with :func:`check_file` before it is opened, opened non-blocking
    and checked again (a file swapped for a FIFO in between), and read no further than
    ``max_bytes + 1`` bytes even if it grows meanwhile.
    """
    p = os.fspath(path)
    limit = DEFAULT_MAX_FILE_BYTES if max_bytes is None else int(max_bytes)
    st = check_file(p, limit)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _os_error(p, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(p, f"not a regular file ({_file_type(st.st_mode)}); only regular "
                            "files are read", kind="not_regular_file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(min(st.st_size, limit) + 1)
            if len(data) > st.st_size:  # it grew since the stat: read on, chunk by chunk
                parts, n = [data], len(data)
                while n <= limit:
                    chunk = fh.read(min(_CHUNK, limit + 1 - n))
                    if not chunk:
                        break
                    parts.append(chunk)
                    n += len(chunk)
                data = b"".join(parts)
    except OSError as exc:
        raise _os_error(p, exc) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise DataError(p, f"file grew past {limit:,} bytes while being read, "
                        f"{_limit_hint(limit)}", kind="file_too_large")
    return data


def read_head(path, n: int = 132, max_bytes: int | None = None) -> bytes:
    """The first ``n`` bytes of a regular file (checked as :func:`read_bytes` checks)."""
    p = os.fspath(path)
    check_file(p, max_bytes)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _os_error(p, exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(p, "not a regular file; only regular files are read",
                            kind="not_regular_file")
        return os.read(fd, n)
    except OSError as exc:
        raise _os_error(p, exc) from None
    finally:
        os.close(fd)


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO / named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def _os_error(p: str, exc: OSError) -> DataError:
    if isinstance(exc, FileNotFoundError):
        return DataError(p, "file does not exist (check the manifest path or the folder)",
                         kind="missing_file")
    if isinstance(exc, IsADirectoryError):
        return DataError(p, "is a folder, not a file", kind="not_a_file")
    if isinstance(exc, PermissionError):
        return DataError(p, "permission denied: make the file readable (chmod +r)",
                         kind="unreadable")
    if exc.errno == errno.ELOOP:
        return DataError(p, "symbolic link loop", kind="missing_file")
    kind = "unreadable" if exc.errno in (errno.EACCES, errno.EIO) else "io_error"
    return DataError(p, f"cannot read file ({exc.strerror})", kind=kind)


def looks_like_dicom(path, head: bytes) -> bool:
    if dicom.is_dicom_bytes(head):
        return True
    suffix = Path(str(path)).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    # Extension-less files in DICOM series folders are common; anything Pillow does not
    # know by its magic number is tried as DICOM.
    return suffix == "" and not _has_image_magic(head)


def _has_image_magic(head: bytes) -> bool:
    return head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*"))


def decode_bytes(data: bytes, name: str, options: ImageOptions, frame: int | None = None,
                 summary: bool = True, decoder: str = "pydicom"):
    """Decode to float32 [0, 1] (H, W, C) at native resolution, plus meta.

    ``summary=False`` skips the DICOM header summary (hot paths only need pixels);
    ``decoder="tfio"`` decodes DICOM with tensorflow-io (see ``tfio_backend``).
    """
    if len(data) == 0:
        raise DataError(name, "file is empty (0 bytes)", kind="zero_byte")
    if looks_like_dicom(name, data[:132]):
        if decoder == "tfio":
            img, meta = tfio_backend.decode_dicom_tfio_with_meta(data, options, name, frame)
            return img, dict(meta, source="dicom", decoder="tfio")
        d = dicom.decode_dicom(data, options, frame=frame, name=name, summary=summary)
        meta = dict(d.meta, source="dicom", n_frames=d.n_frames)
        return d.image, meta
    if frame not in (None, 0):
        raise DataError(name, f"frame {frame} requested from a single-frame image",
                        kind="bad_frame")
    img, meta = raster.decode_raster(data, name, options.max_pixels, options.max_image_bytes)
    meta["source"] = "raster"
    return img, meta


def preprocess(img: np.ndarray, options: ImageOptions) -> np.ndarray:
    """Channels, resize and 8-bit quantisation: the geometry every path shares."""
    img = transforms.to_channels(img, options.channels)
    img = transforms.resize(img, options.size, options.resize)
    return transforms.to_uint8(img)


def load_image(path, options: ImageOptions, frame: int | None = None,
               with_digest: bool = False, decoder: str = "pydicom") -> Loaded:
    """Read, decode and preprocess one file (one frame of a multi-frame DICOM)."""
    name = os.fspath(path)
    data = read_bytes(name, options.max_file_bytes)
    digest = None
    if with_digest:
        digest = content_digest(data)
    img, meta = decode_bytes(data, name, options, frame=frame, summary=False, decoder=decoder)
    return Loaded(image=preprocess(img, options), meta=meta, digest=digest)
