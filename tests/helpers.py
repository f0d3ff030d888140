"""Shared helpers for the data-layer tests (importable as ``helpers`` from any test file).

Nothing here downloads anything: the real DICOM files come from the two installed wheels,
``pydicom`` (``pydicom/data/test_files``) and ``pydicom-data`` (module ``data_store``).
Never call ``pydicom.data.get_testdata_files``: it tries to download missing files.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np


def pydicom_data_dirs() -> list[Path]:
    """The folders holding pydicom's and pydicom-data's test files (those installed)."""
    import pydicom.data

    dirs = [Path(os.path.dirname(pydicom.data.__file__)) / "test_files"]
    try:
        import data_store
    except ImportError:  # pydicom-data not installed: only pydicom's own files
        pass
    else:
        dirs.append(Path(os.path.dirname(data_store.__file__)) / "data")
    return [d for d in dirs if d.is_dir()]


def pydicom_test_files() -> list[Path]:
    """Every file under both wheels' data folders (recursively), sorted."""
    out = []
    for d in pydicom_data_dirs():
        for dirpath, _dirnames, filenames in os.walk(d):
            out.extend(Path(dirpath) / f for f in filenames)
    return sorted(out)


def file_id(path: Path) -> str:
    """Short test id: ``<wheel>/<path inside its data folder>``."""
    for d in pydicom_data_dirs():
        try:
            rel = Path(path).relative_to(d)
        except ValueError:
            continue
        wheel = "pydicom" if d.name == "test_files" else "pydicom-data"
        return f"{wheel}/{rel.as_posix()}"
    return Path(path).name


def dicom_file(name: str) -> Path:
    """A real DICOM test file by base name (top-level files first); skip if absent."""
    import pytest

    for d in pydicom_data_dirs():
        if (d / name).is_file():
            return d / name
    pytest.skip(f"{name} is not in the installed pydicom / pydicom-data wheels")


def read_ds(path, **kwargs):
    import pydicom

    return pydicom.dcmread(str(path), **kwargs)


def dataset_bytes(ds, implicit_vr=None, little_endian=None) -> bytes:
    """Serialise a pydicom Dataset to file bytes (with preamble and file meta)."""
    bio = io.BytesIO()
    kwargs = {}
    if implicit_vr is not None:
        kwargs = {"implicit_vr": implicit_vr, "little_endian": little_endian}
    ds.save_as(bio, enforce_file_format=True, **kwargs)
    return bio.getvalue()


def make_dicom(pixels: np.ndarray, *, patient_id="PID-12345", patient_name="Doe^Jane",
               birth_date="19700101", instance=1, modality="MR", **attrs):
    """A small uncompressed MONOCHROME2 DICOM dataset holding ``pixels`` (uint16 2-D)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = birth_date
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def smooth_image(seed: int, size: int = 64, channels: int = 1) -> np.ndarray:
    """A smooth, structured uint8 image (distinct per seed, stable under JPEG re-encoding)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size), dtype=np.float64)
    for _ in range(4):
        fx, fy, px, py = rng.uniform(0.5, 3.0, 2).tolist() + rng.uniform(0, 6.28, 2).tolist()
        img += np.sin(2 * np.pi * fx * x + px) * np.cos(2 * np.pi * fy * y + py)
    cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
    img += 2.0 * (((y - cy) ** 2 + (x - cx) ** 2) < r * r)
    img = (img - img.min()) / (img.max() - img.min())
    out = np.rint(img * 255).astype(np.uint8)
    if channels == 3:
        out = np.stack([out, np.roll(out, size // 4, 0), 255 - out], -1)
    return out


def write_image(path, array: np.ndarray, fmt: str | None = None, **save_kwargs) -> Path:
    """Write ``array`` (uint8, 2-D or RGB) as PNG/JPEG (format from the suffix)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **save_kwargs)
    return path


def encode_image(array: np.ndarray, fmt: str, **save_kwargs) -> bytes:
    from PIL import Image

    bio = io.BytesIO()
    Image.fromarray(array).save(bio, format=fmt, **save_kwargs)
    return bio.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR announces ``width`` x ``height`` but that holds almost no data."""
    import struct
    import zlib

    def chunk(tag, data):
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def brain_tumor_hierarchy():
    from kmedtl.hierarchy import Hierarchy

    return Hierarchy.from_yaml(
        "normal: [no_tumor]\n"
        "tumor:\n"
        "  glioma: [glioma_tumor]\n"
        "  meningioma: [meningioma_tumor]\n"
        "  pituitary: [pituitary_tumor]\n"
    )
