"""Near duplicates, and so the leakage-free split, do not depend on the training image
size: the perceptual hash is taken of a fixed 64 px rendering (``audit.HASH_SIZE``), so
models at different resolutions are compared on the same test cases."""

import numpy as np
from helpers import encode_image, smooth_image, write_image

from kmedtl.config import load_config
from kmedtl.data.audit import HASH_SIZE, hash_options
from kmedtl.data.options import ImageOptions
from kmedtl.data.prepare import prepare


def make_tree(root, per_class=12):
    rng = np.random.default_rng(0)
    for c, label in enumerate(("a", "b")):
        for k in range(per_class):
            img = smooth_image(100 * c + k, size=96)
            write_image(root / label / f"{k}.png", img)
            if k % 3 == 0:  # a re-encoded, slightly brightened copy: a near duplicate
                noisy = np.clip(img.astype(int) + rng.integers(0, 3, img.shape), 0, 255)
                (root / label / f"{k}_copy.jpg").write_bytes(
                    encode_image(noisy.astype(np.uint8), "JPEG", quality=85))
    return root


def run(root, size, tmp):
    cfg = load_config({"data": {"root": str(root), "image": {"size": size, "channels": 1},
                                "cache_dir": str(tmp / "cache"), "workers": 1},
                       "split": {"method": "holdout", "val": 0.2, "test": 0.25, "seed": 3,
                                 "dedupe": "near"}})
    return prepare(cfg)


def test_near_duplicates_and_split_are_the_same_at_every_training_size(tmp_path):
    root = make_tree(tmp_path / "data")
    small, large = run(root, 32, tmp_path), run(root, 160, tmp_path)
    near = [p.report["near_duplicate_groups"] for p in (small, large)]
    assert near[0] == near[1] and len(near[0]) >= 6  # the copies were found at both sizes
    assert small.splits.folds[0].to_dict() == large.splits.folds[0].to_dict()
    assert small.options.size == (32, 32) and large.options.size == (160, 160)
    assert hash_options(ImageOptions(size=(160, 160), channels=1)).size == (HASH_SIZE,
                                                                            HASH_SIZE)


def test_hashes_are_taken_at_the_fixed_size_whatever_the_run_size(tmp_path, monkeypatch):
    import sys

    audit_mod = sys.modules["kmedtl.data.audit"]  # the package re-exports audit()
    seen = []
    real = audit_mod.scan_index

    def spy(index, options, *args, **kwargs):
        seen.append(options.size)
        return real(index, options, *args, **kwargs)

    monkeypatch.setattr(audit_mod, "scan_index", spy)
    root = make_tree(tmp_path / "data", per_class=6)
    for size in (32, 160):
        prep = run(root, size, tmp_path)
        assert prep.options.size == (size, size)
    assert seen == [(HASH_SIZE, HASH_SIZE)] * 2
