"""In-graph augmentation with Keras 3 preprocessing layers (keras-cv is unmaintained; its
augmentation layers now live in Keras itself).

``Augmentation`` holds the parameters; :meth:`Augmentation.layers` builds the Keras layers
and :meth:`Augmentation.apply_batch` runs them on a batch inside ``tf.data``.  Images are
float32 in [0, 1] at this point.  MixUp and CutMix mix labels too, so they need one-hot
leaf targets (``targets="onehot"``).
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
    seed: int | None = None

    def __post_init__(self):
        if self.flip not in (None, *FLIP_MODES):
            raise ConfigError(f"augment.flip: {self.flip!r} is not one of {list(FLIP_MODES)} "
                              "or null")
        for name in ("rotation", "zoom", "contrast", "brightness", "mixup", "cutmix",
                     "randaugment_factor"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name}: must be >= 0, got {getattr(self, name)}")

    @property
    def mixes_labels(self) -> bool:
        return bool(self.mixup or self.cutmix)

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
        if self.randaugment:
            out.append(keras.layers.RandAugment(value_range=(0, 1), num_ops=self.randaugment,
                                                factor=self.randaugment_factor, seed=s))
        return out

    def apply_batch(self, images, labels, layers=None, mixers=None):
        """Augment one batch (tf.data graph mode). Returns (images, labels)."""
        # lazy: keeps `kmedtl data` free of TensorFlow (absent under KERAS_BACKEND=jax)
        import tensorflow as tf

        for layer in layers if layers is not None else self.layers():
            images = layer(images, training=True)
        images = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 1.0)
        for mixer in mixers if mixers is not None else self.mixers():
            out = mixer({"images": images, "labels": labels}, training=True)
            images, labels = out["images"], out["labels"]
        return images, labels

    def mixers(self) -> list:
        import keras  # lazy: keeps `kmedtl data` (configs name an Augmentation) Keras-free

        out = []
        if self.mixup:
            out.append(keras.layers.MixUp(alpha=self.mixup, seed=self.seed))
        if self.cutmix:
            out.append(keras.layers.CutMix(factor=self.cutmix, seed=self.seed))
        return out
