"""tf.data pipeline: cached and uncached give the same pixels, targets, balance, bad files."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import smooth_image, write_image

from kmedtl.data import ImageOptions, build_cache, index_folder
from kmedtl.data.augment import Augmentation
from kmedtl.data.pipeline import (
    PipelineReport,
    class_weights,
    encode_targets,
    make_dataset,
    normalize,
)
from kmedtl.data.transforms import resize
from kmedtl.errors import ConfigError
from kmedtl.hierarchy import Hierarchy

H = Hierarchy({"normal": ["no_tumor"], "tumor": {"glioma": ["glioma_tumor"],
                                                 "pituitary": ["pituitary_tumor"]}})
OPTS = ImageOptions(size=(32, 32), channels=1)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    k = 0
    for label, n in (("no_tumor", 6), ("glioma_tumor", 3), ("pituitary_tumor", 3)):
        for i in range(n):
            k += 1
            write_image(root / label / f"{i}.png", smooth_image(k, size=48))
    return root


def _collect(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y)
    return np.concatenate(xs), ys


def test_cached_and_uncached_pipelines_give_identical_pixels(tree, tmp_path):
    index = index_folder(tree, H)
    cache = build_cache(index, OPTS, tmp_path / "cache", workers=1)
    a, _ = _collect(make_dataset(index.samples, H, OPTS, cache=cache, batch_size=5))
    b, _ = _collect(make_dataset(index.samples, H, OPTS, batch_size=5))
    assert a.shape == (12, 32, 32, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.max() > 0.5


def test_hierarchy_targets_mask_subtype_of_normal_samples(tree):
    index = index_folder(tree, H)
    ds = make_dataset(index.samples, H, OPTS, batch_size=12, targets="hierarchy")
    _, ys = _collect(ds)
    y = ys[0]
    assert set(y) == {"leaf", "root", "tumor"}
    normal = y["leaf"].numpy() == H.leaves.index("normal")
    assert normal.sum() == 6
    assert (y["tumor"].numpy()[normal] == -1).all()
    assert (y["tumor"].numpy()[~normal] >= 0).all()
    assert (y["root"].numpy() >= 0).all()


def test_onehot_targets_and_mixup_cutmix_keep_distributions(tree, tmp_path):
    index = index_folder(tree, H)
    cache = build_cache(index, OPTS, tmp_path / "c", workers=1)
    aug = Augmentation(rotation=0.05, zoom=0.1, contrast=0.1, brightness=0.1, randaugment=1,
                       mixup=0.4, cutmix=1.0, seed=1)
    ds = make_dataset(index.samples, H, OPTS, cache=cache, batch_size=6, training=True,
                      targets="onehot", augment=aug)
    for x, y in ds:
        np.testing.assert_allclose(y.numpy().sum(1), 1.0, atol=1e-5)
        assert x.shape[1:] == (32, 32, 1)
        assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 1.0


def test_mixup_mixes_leaf_targets_too(tree):  # more in test_mix_hierarchy.py
    index = index_folder(tree, H)
    ds = make_dataset(index.samples, H, OPTS, training=True, batch_size=6,
                      augment=Augmentation(mixup=0.2))
    y = next(iter(ds))[1].numpy()
    assert y.shape == (6, 3)
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-5)


def test_balance_weights_and_sampling(tree, tmp_path):
    index = index_folder(tree, H)
    cw = class_weights(index.samples, H)
    assert cw[H.leaves.index("normal")] == pytest.approx(12 / (3 * 6))
    assert cw[H.leaves.index("glioma")] == pytest.approx(12 / (3 * 3))
    ds = make_dataset(index.samples, H, OPTS, batch_size=4, balance="weights")
    x, y, w = next(iter(ds))
    assert w.shape == (4,)
    cache = build_cache(index, OPTS, tmp_path / "c", workers=1)
    ds = make_dataset(index.samples, H, OPTS, cache=cache, batch_size=30, balance="sampling",
                      training=True)
    leaves = np.concatenate([y.numpy() for _, y in ds.take(20)])
    frac = np.bincount(leaves, minlength=3) / len(leaves)
    # uniform over classes although "normal" is half of the data
    np.testing.assert_allclose(frac, 1 / 3, atol=0.06)


def test_bad_file_is_dropped_from_stream_and_reported(tree):
    (tree / "glioma_tumor" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    index = index_folder(tree, H)
    report = PipelineReport()
    x, _ = _collect(make_dataset(index.samples, H, OPTS, batch_size=4, report=report))
    assert len(x) == len(index.samples) - 1
    assert [s.path for s in report.skipped] == [str(tree / "glioma_tumor" / "broken.png")]
    assert report.skipped[0].reason
    assert index.counts()["read"] == len(x) + len(report.skipped)


def test_multi_input_manifest_yields_named_inputs(tmp_path):
    from kmedtl.data import read_manifest

    rows = ["path,label,patient_id,t2"]
    for i, label in enumerate(["no_tumor", "glioma_tumor", "pituitary_tumor"]):
        write_image(tmp_path / f"t1_{i}.png", smooth_image(i, size=40))
        write_image(tmp_path / f"t2_{i}.png", smooth_image(10 + i, size=40))
        rows.append(f"t1_{i}.png,{label},p{i},t2_{i}.png")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    index = read_manifest(tmp_path / "m.csv", H, OPTS, extra_columns=["t2"])
    x, y = next(iter(make_dataset(index.samples, H, OPTS, batch_size=3)))
    assert set(x) == {"image", "t2"}
    assert x["image"].shape == x["t2"].shape == (3, 32, 32, 1)
    assert not np.array_equal(x["image"].numpy(), x["t2"].numpy())
    cache = build_cache(index, OPTS, tmp_path / "c", workers=1)
    xc, _ = next(iter(make_dataset(index.samples, H, OPTS, batch_size=3, cache=cache)))
    np.testing.assert_array_equal(xc["t2"].numpy(), x["t2"].numpy())


@pytest.mark.parametrize("mode,lo,hi", [("unit", 0, 1), ("symmetric", -1, 1),
                                        ("raw255", 0, 255)])
def test_normalization_ranges(mode, lo, hi):
    x = tf.constant(np.array([0.0, 1.0], np.float32).reshape(1, 1, 2, 1))
    out = normalize(x, mode).numpy().ravel()
    np.testing.assert_allclose(out, [lo, hi], rtol=1e-6)


def test_imagenet_and_caffe_normalization_match_keras_applications():
    import keras

    rgb = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    ref_torch = keras.applications.densenet.preprocess_input(rgb * 255.0)
    np.testing.assert_allclose(normalize(tf.constant(rgb), "imagenet").numpy(), ref_torch,
                               rtol=1e-4, atol=1e-4)
    ref_caffe = keras.applications.resnet50.preprocess_input(rgb * 255.0)
    np.testing.assert_allclose(normalize(tf.constant(rgb), "caffe").numpy(), ref_caffe,
                               rtol=1e-4, atol=1e-3)
    with pytest.raises(ConfigError, match="normalization"):
        normalize(tf.constant(rgb), "zscore")


def test_pillow_resize_matches_tensorflow_antialiased_resize():
    """The serving signature resizes with TF; training with Pillow: same filter."""
    img = np.random.default_rng(1).random((97, 131, 1)).astype(np.float32)
    for size in ((32, 32), (64, 48), (200, 180)):
        ours = resize(img, size, "stretch")
        ref = tf.image.resize(img, size, method="bilinear", antialias=True).numpy()
        assert np.abs(ours - ref).max() < 1e-4


def test_resize_modes_preserve_aspect():
    img = np.ones((50, 100, 1), np.float32)
    pad = resize(img, (64, 64), "pad")
    assert pad.shape == (64, 64, 1)
    assert pad[0].max() == 0 and pad[32].min() == pytest.approx(1.0)  # letterbox bars
    crop = resize(img, (64, 64), "crop")
    assert crop.shape == (64, 64, 1) and crop.min() == pytest.approx(1.0)


def test_encode_targets_rejects_unknown_mode(tree):
    index = index_folder(tree, H)
    with pytest.raises(ConfigError, match="targets"):
        encode_targets(index.samples, H, "sparse")


@pytest.mark.slow
def test_worker_crash_is_reported_and_the_pass_goes_on(tmp_path, monkeypatch):
    """A decoder that kills its worker process (segfault) costs one file, not the pass."""
    from kmedtl.data import scan

    for i in range(12):
        write_image(tmp_path / f"img_{i:02d}.png", smooth_image(i, size=24))
    write_image(tmp_path / "img_crashme.png", smooth_image(99, size=24))
    monkeypatch.setenv("KMEDTL_TEST_CRASH_MARKER", "crashme")  # read by spawned workers
    paths = sorted(str(p) for p in tmp_path.glob("*.png"))
    tasks = [scan.Task(p, None, ImageOptions(size=(16, 16)), None, False) for p in paths]
    results = scan.run(tasks, workers=2, progress=False)
    assert [r.path for r in results] == paths
    bad = [r for r in results if not r.ok]
    assert [(r.path.endswith("img_crashme.png"), r.error_kind) for r in bad] == \
        [(True, "worker_crashed")]
    assert sum(r.ok for r in results) == 12


def test_streams_run_without_the_tfdata_autotuner_and_give_the_same_batches(tree, tmp_path):
    """Every stream has tf.data's autotuner off unless asked (make_dataset's docstring says
    why: its model thread stalled each new epoch's first step on 2 CPUs); it only changes
    scheduling, so the batches are the same either way."""
    index = index_folder(tree, H)
    cache = build_cache(index, OPTS, tmp_path / "cache", workers=1)
    streams = {
        "eval": dict(cache=cache, batch_size=5),
        "train": dict(cache=cache, batch_size=4, training=True, seed=3,
                      augment=Augmentation(flip="horizontal", seed=3)),
        "uncached weights": dict(batch_size=4, balance="weights"),
        "sampling": dict(cache=cache, batch_size=4, training=True, balance="sampling"),
    }
    for name, kw in streams.items():
        assert make_dataset(index.samples, H, OPTS, **kw).options().autotune.enabled is False, name
        assert make_dataset(index.samples, H, OPTS, autotune=True,
                            **kw).options().autotune.enabled is True, name
    off, _ = _collect(make_dataset(index.samples, H, OPTS, **streams["eval"]))
    on, _ = _collect(make_dataset(index.samples, H, OPTS, autotune=True, **streams["eval"]))
    np.testing.assert_array_equal(off, on)
