"""In-graph augmentation with Keras 3 preprocessing layers (keras-cv is unmaintained; its
augmentation layers now live in Keras itself).

``Augmentation`` holds the parameters; :meth:`Augmentation.layers` builds the Keras layers
and :meth:`Augmentation.apply_batch` runs them on a batch inside ``tf.data``.  Images are
float32 in [0, 1] at this point.  MixUp and CutMix mix the targets too
(:meth:`Augmentation.mix`): every target tensor of the batch (the leaf target, each
hierarchy head's, the sample weights) is mixed with the same partner and the same
lambda/box, see :func:`kmedtl.data.pipeline.soft_targets` for what a mixed hierarchical
target means.  ``saturation`` and ``hue`` (colour jitter, Keras'
``RandomSaturation`` / ``RandomHue``) act on colour input only: asking for them on a
one-channel image is a :class:`~kmedtl.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmedtl.errors import ConfigError

FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")


@dataclass(frozen=True)
class Augmentation:
    """Augmentation parameters (0 / None disables a transform).

    ``rotation``/``zoom``/``contrast``/``brightness`` are Keras factors (rotation as a
    fraction of a full turn), ``randaugment`` a number of ops (magnitude
    ``randaugment_factor``), ``mixup``/``cutmix`` the Beta-distribution alpha.
    ``saturation`` and ``hue`` follow torchvision's ``ColorJitter``: the saturation is
    multiplied by a factor in ``[1 - saturation, 1 + saturation]`` (``saturation < 1``)
    and the hue turned by up to ``+-hue`` of the colour circle (``hue <= 0.5``); both need
    3-channel input.

    >>> [type(x).__name__ for x in Augmentation(saturation=0.1, hue=0.02).layers()]
    ['RandomFlip', 'RandomSaturation', 'RandomHue']
    """

    flip: str | None = "horizontal"
    rotation: float = 0.0
    zoom: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    randaugment: int = 0
    randaugment_factor: float = 0.3
    mixup: float = 0.0
    cutmix: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    gamma: float = 0.0
    invert: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        if self.flip not in (None, *FLIP_MODES):
            raise ConfigError(f"augment.flip: {self.flip!r} is not one of {list(FLIP_MODES)} "
                              "or null")
        for name in ("rotation", "zoom", "contrast", "brightness", "mixup", "cutmix",
                     "randaugment_factor", "saturation", "hue", "gamma", "invert", "blur",
                     "noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name}: must be >= 0, got {getattr(self, name)}")
        if self.invert > 1:
            raise ConfigError(f"augment.invert: a probability in [0, 1], got {self.invert}")
        if self.saturation >= 1:
            raise ConfigError(f"augment.saturation: the factor range is [1 - s, 1 + s], so s "
                              f"must be < 1, got {self.saturation}")
        if self.hue > 0.5:
            raise ConfigError(f"augment.hue: a turn of the colour circle by up to +-hue; at "
                              f"most 0.5, got {self.hue}")

    @property
    def mixes_labels(self) -> bool:
        return bool(self.mixup or self.cutmix)

    @property
    def colour(self) -> list[str]:
        """The fields set here that need colour (3-channel) input."""
        return [n for n in ("saturation", "hue") if getattr(self, n)]

    def check_channels(self, channels: int | None) -> None:
        """ConfigError when colour jitter is asked of one-channel images (``None``: not
        known yet, nothing to check)."""
        if channels is not None and channels != 3 and self.colour:
            raise ConfigError(
                f"augment.{self.colour[0]}: colour jitter needs colour input, but the images "
                f"have {channels} channel(s); set data.image.channels: 3 or remove "
                f"augment.{' and augment.'.join(self.colour)}")

    def layers(self) -> list:
        import keras  # lazy: keeps `kmedtl data` (configs name an Augmentation) Keras-free

        s = self.seed
        out = []
        if self.flip:
            out.append(keras.layers.RandomFlip(self.flip, seed=s))
        if self.rotation:
            out.append(keras.layers.RandomRotation(self.rotation, fill_mode="constant", seed=s))
        if self.zoom:
            out.append(keras.layers.RandomZoom(self.zoom, fill_mode="constant", seed=s))
        if self.contrast:
            out.append(keras.layers.RandomContrast(self.contrast, value_range=(0, 1), seed=s))
        if self.brightness:
            out.append(keras.layers.RandomBrightness(self.brightness, value_range=(0, 1), seed=s))
        if self.saturation:  # Keras' factor f scales saturation by f / (1 - f)
            sat = self.saturation
            out.append(keras.layers.RandomSaturation(
                ((1 - sat) / (2 - sat), (1 + sat) / (2 + sat)), value_range=(0, 1), seed=s))
        if self.hue:  # Keras turns the hue by up to +-factor / 2 of the circle
            out.append(keras.layers.RandomHue((0.0, 2 * self.hue), value_range=(0, 1), seed=s))
        if self.blur:  # a 5x5 kernel at sigma up to ``blur`` px, on every image
            out.append(keras.layers.RandomGaussianBlur(
                factor=1.0, kernel_size=5, sigma=(0.0, self.blur), value_range=(0, 1),
                seed=s))
        if self.randaugment:
            out.append(keras.layers.RandAugment(value_range=(0, 1), num_ops=self.randaugment,
                                                factor=self.randaugment_factor, seed=s))
        return out

    def apply_batch(self, images, labels, layers=None, mixers=None):
        """Augment one batch (tf.data graph mode). Returns (images, labels)."""
        # lazy: keeps `kmedtl data` free of TensorFlow (absent under KERAS_BACKEND=jax)
        import tensorflow as tf

        self.check_channels(images.shape[-1])
        for layer in layers if layers is not None else self.layers():
            images = layer(images, training=True)
        images = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 1.0)
        images = self.acquisition(images)
        for mixer in mixers if mixers is not None else self.mixers():
            out = mixer({"images": images, "labels": labels}, training=True)
            images, labels = out["images"], out["labels"]
        return images, labels

    def mix(self, images: dict, targets: list, mixers=None):
        """MixUp then CutMix (as set) on one batch, every tensor with the same draw.

        ``images``: ``{input name: (N, H, W, C) float}`` (every image input of a case:
        mixed with the same partner and box, so a multi-input case stays one case);
        ``targets``: a list of ``(N, K_i)`` float tensors (soft targets of each output, a
        ``(N, 1)`` sample-weight column), each mixed as ``lam * t + (1 - lam) * t[perm]``.
        Returns ``(images, targets)`` of the same structure.

        Keras' ``MixUp``/``CutMix`` layers take one ``images`` and one ``labels`` tensor
        per call and draw a new lambda/box on every call, so calling them once per target
        would give each output its own lambda.  Their label maths is linear and per
        column, so the targets are concatenated along the last axis (and the image inputs
        along the channels) into one call of the layer and split afterwards: the layers
        stay Keras', and one draw covers every output.
        """
        import tensorflow as tf  # lazy: see apply_batch

        names = list(images)
        channels = [int(images[n].shape[-1]) for n in names]
        widths = [int(t.shape[-1]) for t in targets]
        x = tf.concat([tf.cast(images[n], tf.float32) for n in names], axis=-1)
        y = tf.concat([tf.cast(t, tf.float32) for t in targets], axis=-1)
        for mixer in mixers if mixers is not None else self.mixers():
            out = mixer({"images": x, "labels": y}, training=True)
            x, y = out["images"], out["labels"]
        xs = tf.split(x, channels, axis=-1)
        ys = tf.split(y, widths, axis=-1)
        return dict(zip(names, xs)), list(ys)

    def acquisition(self, images):
        """Per-image gamma, foreground inversion and Gaussian noise (``gamma``,
        ``invert``, ``noise``) on a [0, 1] batch; the identity when all three are 0.

        Keras 3 has no layer for these (``RandomInvert`` inverts the black background
        too, which no scanner does), so they are three lines of TensorFlow here.  The
        inversion keeps the background: pixels at or below 0.05 stay as they are, the
        rest become ``1.05 - x``, which turns T1-like contrast (dark CSF) into T2-like
        (bright CSF) and back.
        """
        if not (self.gamma or self.invert or self.noise):
            return images
        # lazy: keeps `kmedtl data` free of TensorFlow (absent under KERAS_BACKEND=jax)
        import tensorflow as tf

        n = tf.shape(images)[0]
        one = tf.ones(tf.stack([n, 1, 1, 1]), tf.float32)
        if self.gamma:
            g = tf.exp(tf.random.uniform(tf.shape(one), -self.gamma, self.gamma))
            images = tf.where(images > 0, tf.pow(tf.maximum(images, 1e-6), g), images)
        if self.invert:
            flip = tf.cast(tf.random.uniform(tf.shape(one)) < self.invert, tf.float32)
            inverted = tf.where(images > 0.05, 1.05 - images, images)
            images = flip * inverted + (1.0 - flip) * images
        if self.noise:
            std = tf.random.uniform(tf.shape(one), 0.0, self.noise)
            images = images + std * tf.random.normal(tf.shape(images))
        return tf.clip_by_value(images, 0.0, 1.0)

    def mixers(self) -> list:
        import keras  # lazy: keeps `kmedtl data` (configs name an Augmentation) Keras-free

        out = []
        if self.mixup:
            out.append(keras.layers.MixUp(alpha=self.mixup, seed=self.seed))
        if self.cutmix:
            out.append(keras.layers.CutMix(factor=self.cutmix, seed=self.seed))
        return out
