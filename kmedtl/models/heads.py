"""Classification heads and the flat classifier.

Heads always compute in float32 (pooling, dropout, dense, softmax get ``dtype="float32"``),
so under a ``mixed_float16`` / ``mixed_bfloat16`` policy the backbone runs in half
precision while probabilities and losses stay float32.

Example::

    >>> import numpy as np
    >>> from kmedtl.models import FlatClassifier, backbone
    >>> model = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 3)
    >>> model.compile()
    >>> model.predict(np.zeros((2, 32, 32, 1), "float32"), verbose=0).shape
    (2, 3)
"""

from __future__ import annotations

from typing import Any

import keras

from kmedtl.errors import ModelError
from kmedtl.hierarchy import Hierarchy

POOLINGS = ("avg", "max")


def as_hierarchy(hierarchy) -> Hierarchy:
    if isinstance(hierarchy, Hierarchy):
        return hierarchy
    if isinstance(hierarchy, (dict, list, tuple)):
        return Hierarchy(hierarchy)
    raise ModelError(
        f"hierarchy={hierarchy!r} must be a kmedtl.hierarchy.Hierarchy (or its to_config() "
        "dict / a list of class names)"
    )


def parse_classes(classes) -> tuple[Hierarchy | None, int, list[str], Any]:
    """``classes`` = int, list of names, Hierarchy or its config -> (hierarchy, n, names, cfg)."""
    if isinstance(classes, bool):
        raise ModelError(f"classes={classes!r}: give a Hierarchy, a list of names or an int")
    if isinstance(classes, int):
        if classes < 2:
            raise ModelError(f"classes={classes}: a classifier needs at least 2 classes")
        return None, classes, [str(i) for i in range(classes)], classes
    h = as_hierarchy(classes)
    return h, len(h.leaves), list(h.leaves), h.to_config()


def check_pooling(pooling):
    if pooling not in POOLINGS:
        raise ModelError(f"pooling={pooling!r} is not valid; choose one of {list(POOLINGS)}")
    return pooling


def pool_features(x, pooling: str = "avg", name: str = "pool"):
    """Global pooling of a feature map to a float32 vector (vectors pass through)."""
    check_pooling(pooling)
    if len(x.shape) == 2:
        return keras.layers.Activation("linear", dtype="float32", name=name)(x)
    if len(x.shape) != 4:
        raise ModelError(f"backbone output has shape {x.shape}; expected (N, H, W, C)")
    layer = (keras.layers.GlobalAveragePooling2D if pooling == "avg"
             else keras.layers.GlobalMaxPooling2D)
    return layer(dtype="float32", name=name)(x)


def classification_head(features, n_classes: int, dropout: float, name: str):
    """dropout -> dense -> softmax, in float32; the softmax layer is named ``name``."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ModelError(f"dropout={dropout!r} must be in [0, 1)")
    x = features
    if dropout:
        x = keras.layers.Dropout(dropout, dtype="float32", name=f"{name}_dropout")(x)
    x = keras.layers.Dense(n_classes, dtype="float32", name=f"{name}_logits")(x)
    return keras.layers.Softmax(dtype="float32", name=name)(x)


def image_input(backbone, name: str = "image"):
    if not isinstance(backbone, keras.Model):
        raise ModelError(
            f"backbone must be a keras.Model (e.g. kmedtl.models.backbone(...)), got "
            f"{type(backbone).__name__}"
        )
    return keras.Input(shape=backbone.input_shape[1:], name=name)


class SavedCompileMixin:
    """Reload the compile arguments a custom ``compile`` resolved (losses, metrics ...).

    Keras skips ``compile_from_config`` for models that override ``compile``; the stored
    config already holds the resolved arguments, so hand them to ``keras.Model.compile``.
    """

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        keras.Model.compile(self, **config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)


class BackboneClassifier(SavedCompileMixin, keras.Model):
    """Base of the single-backbone classifiers: the backbone (``self.backbone``) is
    serialised and restored here, once, the way keras-hub's task base classes do; a
    subclass names its head's own fields in :meth:`head_config` (the ``__init__``
    arguments besides ``backbone``, ``dropout``, ``pooling`` and ``name``)."""

    @property
    def preprocessing(self) -> str:
        return getattr(self.backbone, "preprocessing", "unit")

    def head_config(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define head_config()")

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            **self.head_config(),
            "dropout": self.dropout,
            "pooling": self.pooling,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="kmedtl")
class FlatClassifier(BackboneClassifier):
    """One softmax over the leaves (or ``n`` classes) on top of a backbone.

    Args:
        backbone: a ``keras.Model`` mapping images to a feature map (see
            :func:`kmedtl.models.backbone`); nested as ``model.backbone``.
        classes: a :class:`~kmedtl.hierarchy.Hierarchy` (its leaves are the classes), a list
            of class names, or an int.
        dropout: dropout rate before the dense layer.
        pooling: ``"avg"`` or ``"max"`` global pooling.

    The output is named ``"leaf"`` (probabilities, float32).  ``model.preprocessing`` says
    what input the backbone wants (``"unit"``: images in ``[0, 1]``).

    Example::

        >>> from kmedtl.models import backbone
        >>> m = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), ["a", "b"])
        >>> m.output_names
        ['leaf']
    """

    def __init__(self, backbone, classes, dropout=0.0, pooling="avg", name=None, **kwargs):
        hierarchy, n, class_names, classes_config = parse_classes(classes)
        # === Layers ===
        self.backbone = backbone
        # === Functional wiring ===
        inputs = image_input(backbone)
        features = pool_features(backbone(inputs), pooling)
        outputs = classification_head(features, n, dropout, "leaf")
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        # === Config ===
        self.classes = classes_config
        self.hierarchy = hierarchy
        self.class_names = class_names
        self.dropout = float(dropout)
        self.pooling = pooling

    def head_config(self) -> dict:
        return {"classes": self.classes}

    def compile(self, optimizer="adam", loss="auto", metrics="auto", **kwargs):
        """Defaults: sparse categorical cross-entropy on integer labels, accuracy."""
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy()
        if metrics == "auto":
            metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
