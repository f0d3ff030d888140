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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmedtl.data import dicom, raster, tfio_backend, transforms
from kmedtl.data.hashing import content_digest
from kmedtl.data.options import ImageOptions
from kmedtl.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")


@dataclass
class Loaded:
    """A preprocessed image (uint8, ``options.shape``), its safe meta and the file's digest."""

    image: np.ndarray
    meta: dict
    digest: str | None = None


def read_bytes(path) -> bytes:
    """Read a whole file, turning OS errors into ``DataError`` with a reason code."""
    p = str(path)
    try:
        with open(p, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DataError(p, "file does not exist (check the manifest path or the folder)",
                        kind="missing_file") from None
    except IsADirectoryError:
        raise DataError(p, "is a folder, not a file", kind="not_a_file") from None
    except PermissionError:
        raise DataError(p, "permission denied: make the file readable (chmod +r)",
                        kind="unreadable") from None
    except OSError as exc:
        kind = "unreadable" if exc.errno in (errno.EACCES, errno.EIO) else "io_error"
        raise DataError(p, f"cannot read file ({exc.strerror})", kind=kind) from None


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
    img, meta = raster.decode_raster(data, name, options.max_pixels)
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
    data = read_bytes(name)
    digest = None
    if with_digest:
        digest = content_digest(data)
    img, meta = decode_bytes(data, name, options, frame=frame, summary=False, decoder=decoder)
    return Loaded(image=preprocess(img, options), meta=meta, digest=digest)
