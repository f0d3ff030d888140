"""DICOMweb pull benchmark: instances/s from a local Orthanc, kmedtl's ``pull`` vs a plain
loop of dicomweb-client ``retrieve_instance`` calls.  All numbers come from one run.

    python benchmarks/dicomweb.py [--patients 25] [--images 4] [--size 0] [--workers 4]
        [--repeats 3] [--out r.json]

Data: the brain-tumour DICOM demo (``kmedtl.pipeline.make_dicom_demo``: real brain-tumour
JPEGs wrapped as 8-bit MR Secondary Capture instances; ``--size 0`` keeps the native
~512 px), ``4 x patients x images`` instances in ``4 x patients`` studies, uploaded to a
fresh Orthanc (Debian's orthanc + orthanc-dicomweb, tests/orthanc_server.py) through its
REST API with authentication on.

Rows, timed back to back ``--repeats`` times in rotating order:

- ``plain loop``: what a user writes with dicomweb-client alone: one QIDO-RS search for
  the studies, one per study for its instances, then ``retrieve_instance`` for each
  instance in turn (as stored: ``transfer-syntax=*``) and ``save_as`` to a file.
- ``plain loop, no HTTP compression``: the same with ``Accept-Encoding: identity``
  (Orthanc gzips every response by default; ``pull`` asks it not to, see
  ``DicomWebSpec.http_compression``), to show how much of the gain that is.
- ``kmedtl pull (empty store)``: ``kmedtl.data.dicomweb.pull`` with ``--workers``
  retrieval threads (also checks pixels, strips patient identity, hashes, writes the
  content-addressed store and its journal).
- ``kmedtl pull (workers=1)``: the same, one retrieval at a time.
- ``kmedtl pull (re-run)``: everything already stored: QIDO only, nothing fetched.

The ratio of each row is taken against the plain loop of the same repeat; the table
shows the median and the spread (min-max).  Orthanc runs on the same machine, so the
server's own work shares the CPUs with the client.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the Orthanc harness of the tests


def plain_loop(url, auth, out_dir, identity=False):
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    session.auth = auth
    if identity:
        session.headers["Accept-Encoding"] = "identity"
    client = DICOMwebClient(url, session=session)
    os.makedirs(out_dir, exist_ok=True)
    n = 0
    for study in client.search_for_studies():
        uid = study["0020000D"]["Value"][0]
        for inst in client.search_for_instances(study_instance_uid=uid):
            series, sop = inst["0020000E"]["Value"][0], inst["00080018"]["Value"][0]
            ds = client.retrieve_instance(uid, series, sop,
                                          media_types=(("application/dicom", "*"),))
            ds.save_as(os.path.join(out_dir, f"{sop}.dcm"), enforce_file_format=True)
            n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=25, help="patients per class")
    ap.add_argument("--images", type=int, default=4, help="images per patient")
    ap.add_argument("--size", type=int, default=0, help="longest side (0: native)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from orthanc_server import Orthanc

    from kmedtl.data.dicomweb import DicomWebSpec, pull
    from kmedtl.pipeline.make_dicom_demo import make_dicom_demo

    source = Path(os.environ.get("KMEDTL_DATASETS", "../shared/datasets")) / "brain-tumor-mri"
    tmp = Path(tempfile.mkdtemp(prefix="kmedtl-dicomweb-bench-"))
    try:
        t = time.perf_counter()
        manifest = make_dicom_demo(tmp / "demo", source, patients_per_class=args.patients,
                                   images_per_patient=args.images, size=args.size or None)
        files = [tmp / "demo" / r["path"] for r in csv.DictReader(open(manifest))]
        n = len(files)
        mib = sum(f.stat().st_size for f in files) / 2**20
        gen_s = time.perf_counter() - t
        with Orthanc(tmp / "orthanc") as server:
            t = time.perf_counter()
            server.upload_many(files)
            upload_s = time.perf_counter() - t
            os.environ["KMEDTL_BENCH_PACS_USER"] = server.user
            os.environ["KMEDTL_BENCH_PACS_PASSWORD"] = server.password

            def spec(store, workers):
                return DicomWebSpec(url=server.dicomweb_url, store=str(store), workers=workers,
                                    username_env="KMEDTL_BENCH_PACS_USER",
                                    password_env="KMEDTL_BENCH_PACS_PASSWORD")

            def kmedtl_pull(workers):
                def run():
                    store = tmp / f"store-{workers}"
                    shutil.rmtree(store, ignore_errors=True)
                    res = pull(spec(store, workers))
                    assert res.fetched == n and not res.index.skipped, res.summary()
                return run

            pull(spec(tmp / "store-rerun", args.workers))  # filled once, before timing

            def rerun():
                res = pull(spec(tmp / "store-rerun", args.workers))
                assert res.fetched == 0 and res.reused == n

            def plain_rows(identity):
                def run():
                    shutil.rmtree(tmp / "plain", ignore_errors=True)
                    got = plain_loop(server.dicomweb_url, (server.user, server.password),
                                     tmp / "plain", identity)
                    assert got == n
                return run

            rows = {"plain loop": plain_rows(False),
                    "plain loop, no HTTP compression": plain_rows(True),
                    f"kmedtl pull (empty store, workers={args.workers})":
                        kmedtl_pull(args.workers),
                    "kmedtl pull (empty store, workers=1)": kmedtl_pull(1),
                    "kmedtl pull (re-run, all stored)": rerun}
            names = list(rows)
            walls = {k: [] for k in names}
            for r in range(args.repeats):
                for k in names[r % len(names):] + names[:r % len(names)]:
                    t = time.perf_counter()
                    rows[k]()
                    walls[k].append(time.perf_counter() - t)
        result = {"instances": n, "mib": round(mib, 1), "generate_s": round(gen_s, 1),
                  "upload_s": round(upload_s, 2), "workers": args.workers,
                  "cpu_count": os.cpu_count(), "rows": {}}
        print(f"{n} instances ({mib:.0f} MiB) from local Orthanc; {args.repeats} repeats\n")
        print("| row | instances/s (median) | ratio vs plain loop: median (min-max) |\n"
              "|---|---:|---:|")
        for k in names:
            ratios = [b / w for b, w in zip(walls["plain loop"], walls[k])]
            rate = float(np.median([n / w for w in walls[k]]))
            result["rows"][k] = {"wall_s": [round(w, 3) for w in walls[k]],
                                 "instances_per_s": round(rate, 1),
                                 "ratio_median": round(float(np.median(ratios)), 2),
                                 "ratio_spread": [round(min(ratios), 2), round(max(ratios), 2)]}
            print(f"| {k} | {rate:,.0f} | {np.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |")
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
