"""Evidence for the similar-content threshold (``split.similar_threshold``, default 0.935).

    KMEDTL_DATASETS=../shared/datasets python benchmarks/similarity_threshold.py
    python benchmarks/similarity_threshold.py --out similarity_threshold.json

For each threshold, on the brain MRI ``Training/`` folder (no patient ids; many adjacent
slices of one scan):

- the audit's own thumbnails (32x32 grey, from the 64 px rendering) are linked at the
  threshold and grouped (connected components), and a stratified group split (the
  split's ``StratifiedGroupKFold``, 7 folds ~ 15% test) is drawn for three seeds;
- leakage is measured *independently of the grouping*: 32x32 grey bilinear thumbnails of
  the original JPEGs (PIL), zero mean, unit norm; the share of test images whose best
  train/val correlation is >= 0.95 (the check a reviewer ran on the main job);
- chaining: the largest group's share of the images and the number of groups holding
  more than one class (look-alikes of different scans joined).

On the OCT set, with the patient ids of its manifest, the share of linked pairs that
join two *different* patients (the measure's false-merge rate) and the share of
same-patient pairs it links (its recall of patients).

No training; about a minute on 2 cores.  The baseline row is pHash-only grouping
(``dedupe: near``), measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from kmedtl.data import hashing
from kmedtl.data.audit import hash_options, scan_index
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import index_folder

THRESHOLDS = (0.97, 0.95, 0.945, 0.94, 0.935, 0.93, 0.92, 0.90)
REVIEW_R = 0.95


def audit_thumbs(root: Path, options: ImageOptions):
    index = index_folder(root, None, options)
    _, phashes, thumbs, _ = scan_index(index, hash_options(options), None, None, False)
    ids = [s.id for s in index.samples if s.id in thumbs]
    return ([os.path.relpath(i, root) for i in ids],
            hashing.thumbnail_matrix([thumbs[i] for i in ids]),
            np.array([phashes[i] for i in ids], dtype=np.uint64))


def independent_thumbs(paths) -> np.ndarray:
    rows = []
    for p in paths:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L").resize((32, 32), Image.BILINEAR), np.float32).ravel()
        a = a - a.mean()
        rows.append(a / (np.linalg.norm(a) or 1.0))
    return np.stack(rows)


def groups_of(adjacency) -> np.ndarray:
    return connected_components(coo_matrix(adjacency), directed=False)[1]


def brain(root: Path) -> list[dict]:
    ids, m, ph = audit_thumbs(root, ImageOptions(size=(160, 160), channels=1, resize="pad"))
    labels = np.array([i.split("/")[0] for i in ids])
    ref = independent_thumbs([root / i for i in ids])
    sim_ref = ref @ ref.T
    sim = m @ m.T
    np.fill_diagonal(sim, -1.0)
    phash_adj = np.bitwise_count(ph[:, None] ^ ph[None, :]) <= 2
    np.fill_diagonal(phash_adj, False)
    rows = []
    for name, adj in [("pHash <= 2 bits (dedupe: near)", phash_adj)] + [
            (f"thumbnail r >= {t}", (sim >= t) | phash_adj) for t in THRESHOLDS]:
        g = groups_of(adj)
        sizes = np.bincount(g)
        leaks = []
        for seed in range(3):
            sgkf = StratifiedGroupKFold(n_splits=7, shuffle=True, random_state=seed)
            tr, te = next(sgkf.split(np.zeros(len(ids)), labels, g))
            leaks.append(float(np.mean(sim_ref[np.ix_(te, tr)].max(1) >= REVIEW_R)))
        mixed = sum(len(set(labels[g == k])) > 1 for k in np.nonzero(sizes > 1)[0])
        rows.append({"grouping": name, "groups": int(len(sizes)),
                     "largest_group": int(sizes.max()),
                     "largest_share": round(float(sizes.max() / len(ids)), 4),
                     "mixed_class_groups": int(mixed),
                     "test_with_neighbour_r95": [round(x, 4) for x in leaks]})
    return rows


def oct_patients(root: Path) -> list[dict]:
    ids, m, _ = audit_thumbs(root, ImageOptions(size=(160, 160), channels=1, resize="pad"))
    with open(root / "MANIFEST.csv", newline="") as fh:
        pid = {r["path"]: r["patient_id"] for r in csv.DictReader(fh)}
    p = np.array([pid[i] for i in ids])
    iu = np.triu_indices(len(ids), 1)
    s = (m @ m.T)[iu]
    same = p[iu[0]] == p[iu[1]]
    out = []
    for t in THRESHOLDS:
        linked = s >= t
        diff = int((linked & ~same).sum())
        out.append({"threshold": t, "pairs": int(linked.sum()),
                    "different_patient_pairs": diff,
                    "false_merge_rate": round(diff / max(1, int(linked.sum())), 3),
                    "same_patient_pairs_linked":
                        round(float((linked & same).sum() / same.sum()), 4)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    data = Path(os.environ.get("KMEDTL_DATASETS", Path(__file__).resolve().parents[2]
                               / "shared" / "datasets"))
    res = {"brain_training": brain(data / "brain-tumor-mri" / "Training"),
           "oct_patients": oct_patients(data / "kermany-oct2017-test")}
    print("brain-tumor-mri/Training: grouping -> split (3 seeds); share of test images with "
          f"a train/val neighbour at r >= {REVIEW_R} (independent thumbnails)")
    print(f"{'grouping':34s} {'groups':>6s} {'largest':>7s} {'mixed':>5s}  leak per seed")
    for r in res["brain_training"]:
        print(f"{r['grouping']:34s} {r['groups']:6d} {r['largest_group']:7d} "
              f"{r['mixed_class_groups']:5d}  {r['test_with_neighbour_r95']}")
    print("\nkermany-oct2017-test (patient ids from MANIFEST.csv)")
    for r in res["oct_patients"]:
        print(f"r >= {r['threshold']:<6} pairs {r['pairs']:4d}  different patients "
              f"{r['different_patient_pairs']:4d} (false-merge rate {r['false_merge_rate']:.2f})"
              f"  same-patient pairs linked {r['same_patient_pairs_linked']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
