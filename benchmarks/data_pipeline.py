"""Data pipeline benchmark: plain pydicom loop vs kmedtl (uncached, parallel) vs cache build,
the cached pipeline's throughput, and streaming memory.  All numbers come from one run.

    python benchmarks/data_pipeline.py [--n 2000] [--size 224] [--workers 2] [--out r.json]

Inputs: ``--n`` 512x512 16-bit MR DICOM slices written by this script from the real
brain-tumour JPEGs (``$KMEDTL_DATASETS/brain-tumor-mri``; each slice wrapped as an MR
image with a rescale slope/intercept and a header window), or, without that dataset,
from pydicom's own 512x512 CT slice with per-file noise.

Rows:
- ``plain loop``: one process, ``pydicom.dcmread`` + ``pixel_array`` + modality LUT +
  window + Pillow resize per file (the same work kmedtl does, without kmedtl).
- ``pipeline uncached``: ``make_dataset`` without a cache (parallel tf.data decode).
- ``cache build``: ``build_cache`` from empty in a process pool (also hashes every file
  and writes the cache).
- ``cached pipeline``: ``make_dataset`` over the cache, batch 32, images/s.
- ``streaming peak RSS``: peak memory of an uncached pass over n/4 and n files (separate
  processes); bounded means the ratio stays near 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_dicoms(folder: str, n: int, seed: int = 0) -> list[str]:
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    src_dir = os.path.join(os.environ.get("KMEDTL_DATASETS", ""), "brain-tumor-mri")
    sources = sorted(glob.glob(os.path.join(src_dir, "Training", "*", "*.jpg")))
    if not sources:
        base = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
        ct = pydicom.dcmread(os.path.join(base, "CT_small.dcm")).pixel_array.astype(np.float32)
        ct = np.asarray(Image.fromarray(ct, mode="F").resize((512, 512)))
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        if sources:
            img = Image.open(sources[i % len(sources)]).convert("L").resize((512, 512))
            arr = np.asarray(img, np.float32) * 8.0  # 12-bit-ish MR values
        else:
            arr = ct + rng.normal(0, 5, ct.shape)
        arr = np.clip(arr + rng.normal(0, 1.0, arr.shape), 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, f"slice_{i:05d}.dcm")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.InstanceNumber = "MR", f"BENCH{i // 20:04d}", i % 20
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.WindowCenter, ds.WindowWidth = 1000, 2000
        ds.PixelData = arr.tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def plain_loop(paths, size):
    """What a user writes without kmedtl: same decode + window + resize, one process."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut

    for p in paths:
        ds = pydicom.dcmread(p)
        v = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        v = np.clip((v - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        out = np.asarray(Image.fromarray(v, mode="F").resize((size, size), Image.BILINEAR))
        np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def stream_peak(paths_file, size):
    """Peak RSS (MiB) of a process that streams every file once (uncached)."""
    code = (
        "import json,sys,resource;from kmedtl.data.sources import Sample;"
        "from kmedtl.data.options import ImageOptions;from kmedtl.hierarchy import Hierarchy;"
        "from kmedtl.data.pipeline import make_dataset;"
        f"paths=json.load(open({paths_file!r}));h=Hierarchy(['mr','other']);"
        "s=[Sample(p,'mr') for p in paths];"
        f"ds=make_dataset(s,h,ImageOptions(size=({size},{size})),batch_size=32);"
        "n=sum(int(x.shape[0]) for x,_ in ds);"
        "print(json.dumps({'n':n,'peak_mib':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out")
    ap.add_argument("--keep", help="folder for the generated DICOMs (default: temporary)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from kmedtl.data.cache import build_cache
    from kmedtl.data.options import ImageOptions
    from kmedtl.data.pipeline import make_dataset
    from kmedtl.data.scan import default_workers
    from kmedtl.data.sources import Sample
    from kmedtl.hierarchy import Hierarchy

    workers = args.workers or default_workers()
    tmp = args.keep or tempfile.mkdtemp(prefix="kmedtl-bench-")
    try:
        t = time.perf_counter()
        paths = sorted(glob.glob(os.path.join(tmp, "dicom", "*.dcm")))[: args.n]
        if len(paths) < args.n:
            paths = make_dicoms(os.path.join(tmp, "dicom"), args.n)
        gen_s = time.perf_counter() - t
        opts = ImageOptions(size=(args.size, args.size), channels=1, window="header")
        h = Hierarchy(["mr", "other"])
        samples = [Sample(p, "mr") for p in paths]
        n = len(paths)
        rows = {}

        t = time.perf_counter()
        plain_loop(paths, args.size)
        rows["plain loop"] = n / (time.perf_counter() - t)

        t = time.perf_counter()
        got = sum(int(x.shape[0]) for x, _ in make_dataset(samples, h, opts, batch_size=32))
        rows["pipeline uncached"] = got / (time.perf_counter() - t)

        cache_dir = os.path.join(tmp, "cache")
        shutil.rmtree(cache_dir, ignore_errors=True)
        t = time.perf_counter()
        cache = build_cache(samples, opts, cache_dir, workers=workers, progress=False,
                            phash=False)
        rows["cache build"] = n / (time.perf_counter() - t)
        assert len(cache.files) == n and not cache.skipped

        ds = make_dataset(samples, h, opts, cache=cache, batch_size=32, training=True)
        rates = []
        for _ in range(3):
            t = time.perf_counter()
            got = sum(int(x.shape[0]) for x, _ in ds)
            rates.append(got / (time.perf_counter() - t))
        rows["cached pipeline"] = float(np.median(rates))

        small = os.path.join(tmp, "small.json")
        full = os.path.join(tmp, "full.json")
        json.dump(paths[: max(64, n // 4)], open(small, "w"))
        json.dump(paths, open(full, "w"))
        mem_small, mem_full = stream_peak(small, args.size), stream_peak(full, args.size)

        base = rows["plain loop"]
        result = {
            "n_files": n, "size": args.size, "workers": workers, "generate_s": round(gen_s, 1),
            "images_per_s": {k: round(v, 1) for k, v in rows.items()},
            "ratio_vs_plain_loop": {k: round(v / base, 2) for k, v in rows.items()},
            "streaming_peak_mib": {f"{mem_small['n']} files": round(mem_small["peak_mib"], 1),
                                   f"{mem_full['n']} files": round(mem_full["peak_mib"], 1)},
            "streaming_peak_ratio": round(mem_full["peak_mib"] / mem_small["peak_mib"], 3),
            "targets": {"cache build >= 1.7x plain loop": rows["cache build"] / base >= 1.7,
                        "cached pipeline >= 2000 img/s": rows["cached pipeline"] >= 2000,
                        "streaming memory bounded (ratio <= 1.15)":
                            mem_full["peak_mib"] / mem_small["peak_mib"] <= 1.15},
            "cpu_count": os.cpu_count(),
            "self_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        print("| row | images/s | ratio vs plain loop |\n|---|---:|---:|")
        for k, v in rows.items():
            print(f"| {k} | {v:,.0f} | {v / base:.2f}x |")
        print(f"streaming peak RSS: {result['streaming_peak_mib']} "
              f"(ratio {result['streaming_peak_ratio']})")
        print(json.dumps(result["targets"]))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
