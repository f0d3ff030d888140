"""Wrap real brain-tumour JPEGs as MR Secondary Capture DICOM files, with a CSV manifest.

The DICOM pipeline (``pipelines/dicom_manifest.yaml``) needs DICOM files with patient IDs;
public DICOM brain-tumour sets are not bundled, so this builds one from the brain-tumour
MRI JPEGs: each selected image becomes a Secondary Capture Image Storage object
(SOP class 1.2.840.10008.5.1.4.1.1.7, ``Modality MR``, 8-bit MONOCHROME2, explicit VR
little endian) and several images of one class share a synthetic patient (PatientID,
study and series), so a split that ignored patients would leak::

    python -m kmedtl.pipeline.make_dicom_demo OUT_DIR [--source $KMEDTL_DATASETS/brain-tumor-mri]
        [--patients-per-class 4] [--images-per-patient 3] [--size 128]

writes ``OUT_DIR/images/IM<n>.dcm`` and ``OUT_DIR/manifest.csv`` with columns
``path,label,patient_id`` (paths relative to the manifest).  Every ID and name is
synthetic (``DEMO-0001``...) and file names do not carry them, so a report that leaked a
patient ID would show; nothing of the source files but their pixels is copied.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from kmedtl.errors import DatasetNotFoundError

SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
CLASSES = ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor")


def _gray(path, size: int | None) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("L")
        if size:
            im.thumbnail((size, size))
        return np.asarray(im, dtype=np.uint8)


def write_secondary_capture(path, pixels: np.ndarray, *, patient_id: str, study_uid: str,
                            series_uid: str, instance: int, description: str = "") -> Path:
    """One 8-bit MONOCHROME2 MR Secondary Capture file (pydicom)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SC_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.ConversionType = "WSD"  # workstation: a secondary capture of a rendered image
    ds.PatientID = patient_id
    ds.PatientName = f"Demo^{patient_id}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.SeriesDescription = description[:64]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.WindowCenter = 127.5
    ds.WindowWidth = 256
    ds.PixelData = pixels.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def make_dicom_demo(out_dir, source, *, patients_per_class: int = 4,
                    images_per_patient: int = 3, size: int | None = 128,
                    split_folder: str = "Training") -> Path:
    """Build the demo set; returns the manifest path.  Images are taken evenly spaced
    through each class folder of ``source/split_folder`` (sorted by name), so the set is
    the same on every machine."""
    source, out = Path(source), Path(out_dir)
    rows = []
    n = patients_per_class * images_per_patient
    pid = n_file = 0
    for label in CLASSES:
        folder = source / split_folder / label
        if not folder.is_dir():
            raise DatasetNotFoundError(f"{folder}: class folder not found; pass --source the "
                                       "brain-tumour MRI folder ($KMEDTL_DATASETS/brain-tumor-mri)")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg",
                                                                            ".png"))
        if len(files) < n:
            raise DatasetNotFoundError(f"{folder}: {len(files)} images, need {n}")
        picks = [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]
        for p in range(patients_per_class):
            pid += 1
            patient = f"DEMO-{pid:04d}"
            study, series = generate_uid(), generate_uid()
            for k in range(images_per_patient):
                src = picks[p * images_per_patient + k]
                n_file += 1
                rel = Path("images") / f"IM{n_file:04d}.dcm"
                write_secondary_capture(out / rel, _gray(src, size), patient_id=patient,
                                        study_uid=study, series_uid=series, instance=k + 1,
                                        description="brain MRI (demo)")
                rows.append({"path": rel.as_posix(), "label": label, "patient_id": patient})
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kmedtl.pipeline.make_dicom_demo",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    default = os.path.join(os.environ.get("KMEDTL_DATASETS", "../shared/datasets"),
                           "brain-tumor-mri")
    p.add_argument("--source", default=default, help=f"brain-tumour MRI folder ({default})")
    p.add_argument("--patients-per-class", type=int, default=4)
    p.add_argument("--images-per-patient", type=int, default=3)
    p.add_argument("--size", type=int, default=128, help="longest side in pixels (0: keep)")
    a = p.parse_args(argv)
    manifest = make_dicom_demo(a.out_dir, a.source, patients_per_class=a.patients_per_class,
                               images_per_patient=a.images_per_patient, size=a.size or None)
    print(f"wrote {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
