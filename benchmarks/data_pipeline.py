"""Data pipeline benchmark: plain pydicom loop vs kmedtl (uncached, parallel) vs cache build
(process pool and Apache Beam), the cached pipeline's throughput, and streaming memory.
All numbers come from one run.

    python benchmarks/data_pipeline.py [--n 2000] [--size 224] [--workers 2] [--repeats 3]
        [--scale 1000,10000] [--no-beam] [--out r.json]

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
- ``cache build (beam)``: ``kmedtl.data.beam.build_cache_beam`` from empty on the
  DirectRunner in multi-process mode with ``--workers`` workers (same entries).
- ``cached pipeline``: ``make_dataset`` over the cache, batch 32, images/s.
- ``streaming peak RSS``: peak memory of an uncached pass over n/4 and n files (separate
  processes); bounded means the ratio stays near 1.

The three build rows (plain loop, cache build, cache build (beam)) are timed back to back
``--repeats`` times in rotating order; each repeat gives a ratio against the plain loop of
the same repeat, and the table shows the median with the spread (min-max).  CPU seconds
per file (this process and its worker processes) are reported beside wall time: they
show the work each row does whatever else runs on the machine.  ``--scale`` times the
build rows once per size (files synthesised the same way) to show how build time grows.
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


def _cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def build_rows(paths, size, workers, cache_root, beam_ok: bool):
    """name -> callable that builds (or loops over) ``paths`` from scratch."""
    from kmedtl.data.cache import build_cache
    from kmedtl.data.options import ImageOptions
    from kmedtl.data.sources import Sample

    opts = ImageOptions(size=(size, size), channels=1, window="header")
    samples = [Sample(p, "mr") for p in paths]

    def pool():
        folder = os.path.join(cache_root, "pool")
        shutil.rmtree(folder, ignore_errors=True)
        res = build_cache(samples, opts, folder, workers=workers, progress=False, phash=False)
        assert len(res.files) == len(paths) and not res.skipped

    def beam():
        from kmedtl.data.beam import build_cache_beam

        folder = os.path.join(cache_root, "beam")
        shutil.rmtree(folder, ignore_errors=True)
        res = build_cache_beam(samples, opts, folder, workers=workers, phash=False)
        assert len(res.files) == len(paths) and not res.skipped

    rows = {"plain loop": lambda: plain_loop(paths, size), "cache build": pool}
    if beam_ok:
        rows["cache build (beam)"] = beam
    return rows


def time_rows(rows: dict, n: int, repeats: int) -> dict:
    """Each row ``repeats`` times, back to back in rotating order; wall and CPU times."""
    names = list(rows)
    runs = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            c, t = _cpu(), time.perf_counter()
            rows[k]()
            runs[k].append((time.perf_counter() - t, _cpu() - c))
    base = [w for w, _ in runs["plain loop"]]
    out = {}
    for k in names:
        walls = [w for w, _ in runs[k]]
        ratios = [b / w for b, w in zip(base, walls)]
        out[k] = {"images_per_s": [round(n / w, 1) for w in walls],
                  "wall_s": [round(w, 3) for w in walls],
                  "cpu_ms_per_file": [round(1000 * c / n, 3) for _, c in runs[k]],
                  "ratio_vs_plain": [round(x, 3) for x in ratios],
                  "ratio_median": round(float(np.median(ratios)), 2),
                  "ratio_spread": [round(min(ratios), 2), round(max(ratios), 2)]}
    return out


def print_build_table(build: dict, n: int):
    print(f"\n| build row ({n} files) | images/s (median) | ratio vs plain loop: median "
          "(min-max) | CPU ms/file (median) |\n|---|---:|---:|---:|")
    for k, v in build.items():
        print(f"| {k} | {np.median(v['images_per_s']):,.0f} | {v['ratio_median']:.2f}x "
              f"({v['ratio_spread'][0]:.2f}-{v['ratio_spread'][1]:.2f}) | "
              f"{np.median(v['cpu_ms_per_file']):.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the build rows")
    ap.add_argument("--scale", default="", help="comma-separated file counts for the "
                    "build-time growth rows, e.g. 1000,10000")
    ap.add_argument("--no-beam", action="store_true", help="skip the Apache Beam row")
    ap.add_argument("--out")
    ap.add_argument("--keep", help="folder for the generated DICOMs (default: temporary)")
    args = ap.parse_args(argv)
    try:
        import apache_beam  # noqa: F401

        beam_ok = not args.no_beam
    except ImportError:
        beam_ok = False
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

        build = time_rows(build_rows(paths, args.size, workers, os.path.join(tmp, "b"),
                                     beam_ok), n, max(1, args.repeats))
        for k, v in build.items():
            rows[k] = float(np.median(v["images_per_s"]))

        t = time.perf_counter()
        got = sum(int(x.shape[0]) for x, _ in make_dataset(samples, h, opts, batch_size=32))
        rows["pipeline uncached"] = got / (time.perf_counter() - t)

        cache_dir = os.path.join(tmp, "cache")
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache = build_cache(samples, opts, cache_dir, workers=workers, progress=False,
                            phash=False)
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

        scale = {}
        for m in [int(x) for x in args.scale.split(",") if x.strip()]:
            more = sorted(glob.glob(os.path.join(tmp, "dicom", "*.dcm")))[:m]
            if len(more) < m:
                more = make_dicoms(os.path.join(tmp, "dicom"), m)
            grown = time_rows(build_rows(more, args.size, workers, os.path.join(tmp, "s"),
                                         beam_ok), m, 1)
            scale[m] = {k: {"wall_s": v["wall_s"][0], "images_per_s": v["images_per_s"][0],
                            "ratio_vs_plain": v["ratio_vs_plain"][0]} for k, v in grown.items()}

        base = rows["plain loop"]
        result = {
            "n_files": n, "size": args.size, "workers": workers, "generate_s": round(gen_s, 1),
            "images_per_s": {k: round(v, 1) for k, v in rows.items()},
            "ratio_vs_plain_loop": {k: round(v / base, 2) for k, v in rows.items()},
            "streaming_peak_mib": {f"{mem_small['n']} files": round(mem_small["peak_mib"], 1),
                                   f"{mem_full['n']} files": round(mem_full["peak_mib"], 1)},
            "streaming_peak_ratio": round(mem_full["peak_mib"] / mem_small["peak_mib"], 3),
            "build_rows": build,
            "scale": scale,
            "targets": {"cache build >= 1.6x plain loop (median)":
                            build["cache build"]["ratio_median"] >= 1.6,
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
        print_build_table(build, n)
        if scale:
            print("\n| files | " + " | ".join(f"{k} s" for k in next(iter(scale.values())))
                  + " |\n|---:|" + "---:|" * len(next(iter(scale.values()))))
            for m, v in scale.items():
                print(f"| {m} | " + " | ".join(f"{x['wall_s']:.1f} ({x['ratio_vs_plain']:.2f}x)"
                                               for x in v.values()) + " |")
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
