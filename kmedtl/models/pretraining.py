"""Same-domain pretraining: supervised on a source label set, or self-supervised.

Supervised (the main workflow)::

    source_bb = backbone("resnet50", weights="imagenet", input_shape=(224, 224, 1))
    result = pretrain_backbone(source_bb, x_src, y_src, classes=source_hierarchy,
                               path="runs/src/backbone.weights.h5")
    target_bb = backbone("resnet50", weights=result.path, cut="conv4_block4_out",
                         input_shape=(224, 224, 1))
    model = HierarchicalClassifier(target_bb, target_hierarchy)

Any model of this package accepts the transferred backbone: weights are matched by layer
name, so the target may be truncated and may have 1 or 3 channels.

Self-supervised: :class:`ContrastivePretrainer` trains a backbone on unlabelled images
with the SimCLR objective (Chen et al. 2020, "A Simple Framework for Contrastive Learning
of Visual Representations"): two random augmentations of each image, a small projection
MLP, and the NT-Xent loss (:func:`nt_xent`), all in ``keras.ops``.  The augmentation is a
Keras preprocessing-layer pipeline inside the model (active only in training), so
``fit(images)`` needs no labels; pass ``augmentation=None`` to use the default, or your
own ``keras.Sequential`` of random layers.  Afterwards ``save_backbone(pretrainer, path)``
and ``backbone(name, weights=path)`` as above.

Example::

    >>> import numpy as np
    >>> from kmedtl.models import ContrastivePretrainer, backbone
    >>> pre = ContrastivePretrainer(backbone("cbr_tiny", input_shape=(32, 32, 1)))
    >>> pre.compile(optimizer="adam")
    >>> _ = pre.fit(np.random.rand(8, 32, 32, 1).astype("float32"), epochs=1, verbose=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
from keras import ops

from kmedtl.errors import ModelError
from kmedtl.models.heads import FlatClassifier, image_input, pool_features
from kmedtl.models.weights import save_backbone


@dataclass
class PretrainResult:
    path: Path | None
    model: keras.Model
    history: keras.callbacks.History


def pretrain_backbone(
    backbone,
    x,
    y=None,
    *,
    classes,
    path,
    dropout: float = 0.0,
    compile_kwargs: dict | None = None,
    fit_kwargs: dict | None = None,
) -> PretrainResult:
    """Train ``backbone`` under a flat head on a source task and save it to ``path``.

    ``x``/``y`` are whatever ``keras.Model.fit`` takes (arrays, or a dataset with
    ``y=None``), with integer labels over ``classes`` (Hierarchy, names or int).
    ``path`` ends in ``.keras`` or ``.weights.h5``; the head is not saved.  ``path=None``
    saves nothing (:func:`kmedtl.training.pretrain.pretrain` saves after re-averaging the
    BatchNorm statistics).
    """
    path = None if path is None else Path(path)
    if path is not None and not path.name.endswith((".keras", ".weights.h5")):
        raise ModelError(f"path={str(path)!r}: use a .keras or .weights.h5 file name")
    model = FlatClassifier(backbone, classes, dropout=dropout, name="pretraining")
    model.compile(**{"optimizer": "adam", **(compile_kwargs or {})})
    history = model.fit(x, y, **{"epochs": 10, "verbose": 0, **(fit_kwargs or {})})
    if path is not None:
        save_backbone(model, path)
    return PretrainResult(path, model, history)


def nt_xent(z_a, z_b, temperature: float = 0.1):
    """NT-Xent (normalised temperature-scaled cross-entropy) of paired embeddings.

    ``z_a[i]`` and ``z_b[i]`` are two views of image ``i``; every other embedding in the
    batch (2N - 2 of them) is a negative.  Returns the mean over the 2N anchors.
    """
    z = ops.concatenate([z_a, z_b], axis=0)
    z = z / ops.maximum(ops.sqrt(ops.sum(z * z, axis=-1, keepdims=True)), 1e-12)
    n2 = ops.shape(z)[0]
    n = n2 // 2
    sim = ops.matmul(z, ops.transpose(z)) / temperature
    sim = sim - 1e9 * ops.eye(n2, dtype=sim.dtype)  # an anchor is not its own negative
    idx = ops.arange(n2)
    positive = ops.where(idx < n, idx + n, idx - n)
    log_prob = sim - ops.logsumexp(sim, axis=-1, keepdims=True)
    picked = ops.take_along_axis(log_prob, ops.expand_dims(positive, -1), axis=-1)
    return -ops.mean(picked)


def default_augmentation(seed: int | None = None) -> keras.Sequential:
    """Flip, small rotation/zoom/translation and contrast -- safe for grey medical images."""
    L = keras.layers
    return keras.Sequential(
        [
            L.RandomFlip("horizontal", seed=seed),
            L.RandomRotation(0.05, fill_mode="constant", seed=seed),
            L.RandomZoom(0.15, fill_mode="constant", seed=seed),
            L.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=seed),
            L.RandomContrast(0.3, seed=seed),
        ],
        name="augmentation",
    )


@keras.saving.register_keras_serializable(package="kmedtl")
class ContrastivePretrainer(keras.Model):
    """SimCLR-style self-supervised training of a backbone on unlabelled images.

    Args:
        backbone: the ``keras.Model`` to train (``model.backbone``).
        projection_dim, hidden_dim: the projection MLP (GAP -> dense+ReLU -> dense).
        temperature: NT-Xent temperature.
        augmentation: ``keras.Sequential`` of random layers applied twice per image (two
            views); ``None`` uses :func:`default_augmentation`.

    The output concatenates the two views' projections, ``(N, 2 * projection_dim)``;
    :meth:`compute_loss` applies :func:`nt_xent`, so ``fit(x)`` takes no ``y``.
    """

    def __init__(
        self,
        backbone,
        projection_dim: int = 128,
        hidden_dim: int = 256,
        temperature: float = 0.1,
        augmentation=None,
        name=None,
        **kwargs,
    ):
        if temperature <= 0:
            raise ModelError(f"temperature={temperature!r} must be > 0")
        # === Layers ===
        self.backbone = backbone
        self.augmentation = augmentation if augmentation is not None else default_augmentation()
        self.projection = keras.Sequential(
            [
                keras.layers.Dense(hidden_dim, activation="relu", dtype="float32",
                                   name="projection_hidden"),
                keras.layers.Dense(projection_dim, dtype="float32", name="projection_out"),
            ],
            name="projection",
        )
        # === Functional wiring ===
        inputs = image_input(backbone)
        views = []
        for v in ("a", "b"):
            x = self.augmentation(inputs)
            x = pool_features(backbone(x), "avg", name=f"pool_{v}")
            views.append(self.projection(x))
        outputs = keras.layers.Concatenate(dtype="float32", name="projections")(views)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        # === Config ===
        self.projection_dim = int(projection_dim)
        self.hidden_dim = int(hidden_dim)
        self.temperature = float(temperature)

    @property
    def preprocessing(self) -> str:
        return getattr(self.backbone, "preprocessing", "unit")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        d = self.projection_dim
        loss = nt_xent(y_pred[:, :d], y_pred[:, d:], self.temperature)
        if self.losses:
            loss = loss + ops.sum(self.losses)
        return loss

    def get_config(self):
        ser = keras.saving.serialize_keras_object
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": ser(self.backbone),
            "projection_dim": self.projection_dim,
            "hidden_dim": self.hidden_dim,
            "temperature": self.temperature,
            "augmentation": ser(self.augmentation),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        de = keras.saving.deserialize_keras_object
        config["backbone"] = de(config["backbone"])
        config["augmentation"] = de(config["augmentation"])
        return cls(**config)
