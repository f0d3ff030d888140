"""The ``tf.data`` pipeline: samples -> batches of normalised images and targets.

Two sources of pixels, same values:

- **cached** (``cache=build_cache(...)``): raw uint8 files read and decoded in-graph
  (``tf.io.read_file`` + ``tf.io.decode_raw``), fully parallel, no Python per image;
- **uncached**: :func:`kmedtl.data.decode.load_image` in parallel ``tf.numpy_function``
  calls.  A file that fails is dropped from the stream and recorded in ``report`` with its
  reason, so a pass never crashes on one bad file.

Then: shuffle (on file names, before decoding), batch, in-graph augmentation (Keras 3
preprocessing layers), normalisation matched to the backbone, prefetch.  Targets come from
the :class:`~kmedtl.hierarchy.Hierarchy`: ``leaf`` (int), ``onehot`` (float) or
``hierarchy`` (a dict keyed by output name, ``-1`` where a head does not apply).  With
MixUp/CutMix (``augment.mixup``/``augment.cutmix``) the training batches carry soft
targets instead (:func:`soft_targets`): a float distribution per output, mixed with one
lambda/box for every output, which the losses of :mod:`kmedtl.training.losses` accept
beside the integer ones.

Example::

    index = index_folder("brain-tumor-mri", hierarchy)
    opts = ImageOptions(size=(128, 128), channels=1)
    ds = make_dataset(index.samples, hierarchy, opts, batch_size=32, training=True,
                      cache=build_cache(index, opts, ".kmedtl_cache"))
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from kmedtl.data import tfio_backend
from kmedtl.data.augment import Augmentation
from kmedtl.data.cache import CacheResult
from kmedtl.data.decode import load_image
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import Sample, Skipped
from kmedtl.errors import ConfigError, DataError

TARGETS = ("leaf", "onehot", "hierarchy")
BALANCE = ("none", "weights", "sampling")

#: name -> (scale, offset, per-channel mean, per-channel std) applied to [0, 1] pixels.
NORMALIZATIONS = {
    "unit": None,  # [0, 1] as decoded
    "symmetric": "symmetric",  # [-1, 1] (Inception/MobileNet/ResNetV2 "tf" mode)
    "imagenet": "imagenet",  # (x - mean) / std, ImageNet statistics ("torch" mode)
    "caffe": "caffe",  # BGR, x*255 - mean (ResNet v1 / VGG "caffe" mode)
    "raw255": "raw255",  # [0, 255] (EfficientNet/ConvNeXt carry their own rescaling)
}
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


@dataclass
class PipelineReport:
    """Files dropped while streaming (uncached pipeline), filled as batches are produced."""

    skipped: list[Skipped] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, item: Skipped):
        with self._lock:
            if all(s.path != item.path for s in self.skipped):
                self.skipped.append(item)


def normalize(images, mode: str):
    """Map [0, 1] float images to the range a backbone expects (in-graph)."""
    if mode not in NORMALIZATIONS:
        raise ConfigError(f"data.normalization: {mode!r} is not one of {list(NORMALIZATIONS)}")
    if mode == "unit":
        return images
    if mode == "symmetric":
        return images * 2.0 - 1.0
    if mode == "raw255":
        return images * 255.0
    channels = images.shape[-1]
    if mode == "imagenet":
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        if channels == 1:
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        return (images - mean) / std
    bgr = images[..., ::-1] if channels == 3 else images
    mean = _CAFFE_MEAN_BGR if channels == 3 else _CAFFE_MEAN_BGR.mean(keepdims=True)
    return bgr * 255.0 - mean


def encode_targets(samples: list[Sample], hierarchy, targets: str):
    """Targets for ``samples`` as NumPy arrays (or a dict of them)."""
    if targets not in TARGETS:
        raise ConfigError(f"targets: {targets!r} is not one of {list(TARGETS)}")
    enc = hierarchy.encode([s.label for s in samples])
    if targets == "leaf":
        return enc["leaf"].astype(np.int32)
    if targets == "onehot":
        return np.eye(len(hierarchy.leaves), dtype=np.float32)[enc["leaf"]]
    out = {"leaf": enc["leaf"].astype(np.int32)}
    for parent in hierarchy.parents:
        out[hierarchy.node_output_name(parent)] = \
            enc[hierarchy.node_target_name(parent)].astype(np.int32)
    return out


def target_widths(hierarchy, targets: str):
    """The class count of each target of :func:`encode_targets`, in its structure: an int
    (``leaf``/``onehot``) or ``{output name: count}`` (``hierarchy``)."""
    if targets not in TARGETS:
        raise ConfigError(f"targets: {targets!r} is not one of {list(TARGETS)}")
    if targets != "hierarchy":
        return len(hierarchy.leaves)
    out = {"leaf": len(hierarchy.leaves)}
    for parent in hierarchy.parents:
        out[hierarchy.node_output_name(parent)] = len(hierarchy.children(parent))
    return out


def soft_targets(labels, widths):
    """Targets as float distributions, ready to be mixed (in-graph; same structure).

    Integer class indices become one-hot rows of ``widths`` columns, and ``-1`` (a
    hierarchy head that does not apply) an all-zero row; float (one-hot) targets pass.

    What a mixed hierarchical target means: MixUp/CutMix mix every head's target with the
    same lambda, ``t = lam * onehot(a) + (1 - lam) * onehot(b)``, so the *mass* of a
    conditional head's row (``sum(t)``) is the share of the mix that lies in its subtree:
    1 when both cases do, ``lam`` or ``1 - lam`` when one does, 0 when neither does (the
    row is then masked, as ``-1`` is).  The losses keep that mass instead of
    renormalising it away: the row's cross-entropy is ``sum_k t_k * -log p_k``, i.e.
    ``mass * CE(t / mass)``, averaged over the applicable mass of the batch (the count of
    applicable rows when targets are hard).  That is exactly how the leaf cross-entropy
    of the mixed leaf target splits over the heads (``log p(leaf)`` is the sum of the head
    log-probabilities along its path), so a "70 % normal, 30 % glioma" image teaches the
    root head 70/30 and the tumour head "glioma" with weight 0.3, and never a subtype
    for the normal part.  The leaf target is mixed the same way and always has mass 1.
    """
    def one(t, k):
        if t.dtype.is_floating and t.shape.rank == 2:
            return t
        return tf.one_hot(tf.cast(t, tf.int32), k, dtype=tf.float32)  # -1 -> zero row

    return tf.nest.map_structure(one, labels, widths)


def class_weights(samples: list[Sample], hierarchy) -> dict[int, float]:
    """Balanced leaf-class weights n / (k * count_c), as Keras ``class_weight`` expects."""
    leaves = Counter(hierarchy.leaf_index(s.label) for s in samples)
    n, k = sum(leaves.values()), len(leaves)
    return {c: n / (k * m) for c, m in sorted(leaves.items())}


def make_dataset(samples: list[Sample], hierarchy, options: ImageOptions, *,
                 cache: CacheResult | None = None, batch_size: int = 32,
                 training: bool = False, shuffle: bool | None = None, seed: int = 0,
                 targets: str = "leaf", normalization: str = "unit",
                 augment: Augmentation | None = None, balance: str = "none",
                 drop_remainder: bool = False, report: PipelineReport | None = None,
                 decoder: str = "pydicom",
                 num_parallel_calls: int | None = None,
                 primary_input: str = "image", autotune: bool = False) -> tf.data.Dataset:
    """Build the ``tf.data.Dataset`` of ``(images, targets)`` (``sample_weight`` third when
    ``balance="weights"``).

    ``balance="sampling"`` draws classes uniformly and repeats forever: pass
    ``steps_per_epoch`` to ``fit``.  Multi-input samples (manifest image columns) yield a
    dict of images keyed ``primary_input`` (the main image, default ``image``; see
    :func:`kmedtl.data.prepare.input_names`) and the column names.

    ``autotune`` (default off) turns on tf.data's autotuner.  Off, every ``AUTOTUNE``
    parallelism is the number of CPUs the process may use and prefetch buffers grow on
    their own.  Why off: Keras makes a new iterator every epoch, and destroying the old one
    waits for the autotuner's model thread; on 2 CPUs the first step of an epoch then sat
    6-10 s with both cores idle in 7 of 27 epochs (a native stack showed the wait in
    ``RootDataset::Iterator``'s destructor): the train stage ran at 0.78x the bare train
    step with it, 0.86x without (``benchmarks/train_loop.py``, row ``autotune``).
    """
    if balance not in BALANCE:
        raise ConfigError(f"data.balance: {balance!r} is not one of {list(BALANCE)}")
    if decoder not in ("pydicom", "tfio"):
        raise ConfigError(f"data.decoder: {decoder!r} is not one of ['pydicom', 'tfio']")
    if decoder == "tfio":
        tfio_backend.require()
        if cache is not None:
            raise ConfigError("data.decoder: tfio decodes inside the tf.data stream; the cache "
                              "is built with pydicom: use one or the other (data.cache_dir: null)")
    if not samples:
        raise ConfigError("make_dataset: no samples (check the source and the hierarchy)")
    augment = augment if training else None
    shuffle = training if shuffle is None else shuffle
    parallel = num_parallel_calls or tf.data.AUTOTUNE
    report = report if report is not None else PipelineReport()
    y = encode_targets(samples, hierarchy, targets)
    input_names = sample_inputs(samples, primary_input)
    weights = None
    if balance == "weights":
        cw = class_weights(samples, hierarchy)
        weights = np.array([cw[hierarchy.leaf_index(s.label)] for s in samples], np.float32)

    def build(idx: np.ndarray) -> tf.data.Dataset:
        sub = [samples[i] for i in idx]
        columns = _pixel_columns(sub, input_names, cache)
        labels = tf.nest.map_structure(lambda a: a[idx], y)
        parts = (columns, labels) if weights is None else (columns, labels, weights[idx])
        ds = tf.data.Dataset.from_tensor_slices(parts)
        if shuffle and balance != "sampling":
            ds = ds.shuffle(len(sub), seed=seed, reshuffle_each_iteration=True)
        loader = _cached_loader(options) if cache is not None else \
            _uncached_loader(options, report, decoder)
        ds = ds.map(lambda cols, *rest: (loader(cols), *rest), num_parallel_calls=parallel,
                    deterministic=not training)
        if cache is None:
            ds = ds.filter(lambda images, *rest: tf.reduce_all(
                [tf.reduce_any(images[n] > -1) for n in images]))
            ds = ds.map(lambda images, *rest: ({n: tf.maximum(v, 0) for n, v in images.items()},
                                               *rest))
        return ds

    if balance == "sampling":
        leaf = np.array([hierarchy.leaf_index(s.label) for s in samples])
        per_class = [build(np.nonzero(leaf == c)[0]).repeat() for c in np.unique(leaf)]
        ds = tf.data.Dataset.sample_from_datasets(per_class, seed=seed,
                                                  rerandomize_each_iteration=True)
        if shuffle:
            ds = ds.shuffle(batch_size * 8, seed=seed)
    else:
        ds = build(np.arange(len(samples)))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=parallel)
    single = len(input_names) == 1
    primary = input_names[0]

    def finish(images, labels, *rest):
        images = {n: tf.cast(v, tf.float32) / 255.0 for n, v in images.items()}
        if augment is not None:
            layers, mixers = aug_layers
            images = {n: augment.apply_batch(v, labels, layers, [])[0] for n, v in images.items()}
            if mixers:
                images, labels, rest = _mix(images, labels, rest, mixers)
        images = {n: normalize(v, normalization) for n, v in images.items()}
        out = images[primary] if single else images
        return (out, labels, *rest)

    def _mix(images, labels, rest, mixers):
        # one draw for every image input, every output's target and the sample weight
        soft = tf.nest.flatten(soft_targets(labels, widths))
        weight = [tf.reshape(tf.cast(rest[0], tf.float32), (-1, 1))] if rest else []
        images, mixed = augment.mix(images, soft + weight, mixers)
        labels = tf.nest.pack_sequence_as(labels, mixed[:len(soft)])
        rest = (tf.reshape(mixed[-1], (-1,)),) if rest else rest
        return images, labels, rest

    aug_layers = (augment.layers(), augment.mixers()) if augment is not None else None
    widths = target_widths(hierarchy, targets)
    ds = ds.map(finish, num_parallel_calls=parallel)
    opts = tf.data.Options()
    opts.autotune.enabled = autotune
    return ds.prefetch(tf.data.AUTOTUNE).with_options(opts)


def sample_inputs(samples: list[Sample], primary_input: str = "image") -> list[str]:
    """The input names of ``samples``: ``primary_input`` (the main image), then the image
    columns of multi-input samples, in order; every sample must carry the same columns."""
    extra = [name for name, _ in samples[0].extra]
    odd = next((s for s in samples if [n for n, _ in s.extra] != extra), None)
    if odd is not None:
        raise ConfigError(f"{odd.entry_key}: image columns {[n for n, _ in odd.extra]} differ "
                          f"from the other samples' {extra}; every sample needs the same inputs")
    names = [primary_input] + extra
    if len(set(names)) != len(names):
        raise ConfigError(f"inputs {names}: the main image's name {primary_input!r} is also an "
                          "image column; give the columns distinct names")
    return names


def _pixel_columns(sub, input_names, cache):
    """Per input: cache file paths (cached) or (path, frame) pairs (uncached)."""
    if cache is not None:
        missing = [s.id for s in sub if s.id not in cache.files]
        if missing:
            raise ConfigError(
                f"{len(missing)} sample(s) are not in the cache (first: {missing[0]}); they "
                "failed to decode or the cache was built for other samples: build_cache the "
                "same index and drop cache.skipped")
        cols = {input_names[0]: np.array([cache.files[s.id] for s in sub])}
        for k, name in enumerate(input_names[1:]):
            absent = [s.extra[k][1] for s in sub if s.extra[k][1] not in cache.files]
            if absent:
                raise ConfigError(
                    f"{len(absent)} {name!r} image(s) are not in the cache (first: "
                    f"{absent[0]}); they failed to decode or the cache was built for other "
                    "samples: build_cache the same index and drop cache.skipped")
            cols[name] = np.array([cache.files[s.extra[k][1]] for s in sub])
        return cols
    cols = {input_names[0]: (np.array([s.path for s in sub]),
                      np.array([-1 if s.frame is None else s.frame for s in sub], np.int32))}
    for k, name in enumerate(input_names[1:]):
        cols[name] = (np.array([s.extra[k][1] for s in sub]), np.full(len(sub), -1, np.int32))
    return cols


def _cached_loader(options: ImageOptions):
    shape = options.shape

    def load(cols):
        return {n: tf.reshape(tf.io.decode_raw(tf.io.read_file(p), tf.uint8), shape)
                for n, p in cols.items()}

    return load


def _uncached_loader(options: ImageOptions, report: PipelineReport, decoder: str = "pydicom"):
    shape = options.shape

    def py_load(path, frame):
        path = path.decode() if isinstance(path, bytes) else str(path)
        try:
            img = load_image(path, options, None if int(frame) < 0 else int(frame),
                             decoder=decoder).image
            return img.astype(np.int16)
        except DataError as err:
            report.add(Skipped.from_error(err, "stream"))
            return np.full(shape, -1, np.int16)  # sentinel: filtered out downstream

    def load(cols):
        out = {}
        for n, (path, frame) in cols.items():
            img = tf.numpy_function(py_load, [path, frame], tf.int16, stateful=False)
            img.set_shape(shape)
            out[n] = img
        return out

    return load
