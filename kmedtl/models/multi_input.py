"""Several image types per case (e.g. two MRI sequences): late fusion or stacking.

* :class:`MultiInputClassifier` -- one functional model; inputs named after the image
  types; each input has its own backbone (``backbones={"t1": bb1, "t2": bb2}``) or all share
  one (``backbones=bb, input_names=["t1", "t2"]``).  ``fusion="concat"`` concatenates the
  pooled features and puts the head(s) on top (feature-level late fusion);
  ``fusion="average"`` gives every input its own head(s) and averages the probabilities
  (decision-level fusion).  ``head="hierarchical"`` uses one head per parent node plus the
  consistent ``"leaf"`` output, exactly as :class:`~kmedtl.models.HierarchicalClassifier`.
* :class:`StackedMultiInputClassifier` -- one :class:`~kmedtl.models.FlatClassifier` per
  image type, combined by a meta-classifier trained on out-of-fold confidences (see
  :mod:`kmedtl.models.stacking`).

Example::

    >>> import numpy as np
    >>> from kmedtl.models import MultiInputClassifier, backbone
    >>> bb = backbone("cbr_tiny", input_shape=(32, 32, 1))
    >>> m = MultiInputClassifier(bb, 3, input_names=["t1", "t2"])
    >>> x = {"t1": np.zeros((2, 32, 32, 1)), "t2": np.zeros((2, 32, 32, 1))}
    >>> m.predict(x, verbose=0).shape
    (2, 3)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import keras
import numpy as np

from kmedtl.errors import ModelError
from kmedtl.models.heads import (
    FlatClassifier,
    SavedCompileMixin,
    check_pooling,
    classification_head,
    parse_classes,
    pool_features,
)
from kmedtl.models.hierarchical import (
    LeafProbabilities,
    check_output_names,
    hierarchical_losses,
    hierarchy_targets,
)
from kmedtl.models.stacking import OutOfFoldStacking
from kmedtl.models.staged import backbone_factory

FUSIONS = ("concat", "average")
HEADS = ("flat", "hierarchical")


def _check_input_name(name):
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.\-]*", str(name)):
        raise ModelError(
            f"input name {name!r} must start with a letter and contain only letters, "
            "digits, '_', '.', '-' (inputs are named after image types)"
        )
    return str(name)


@keras.saving.register_keras_serializable(package="kmedtl")
class MultiInputClassifier(SavedCompileMixin, keras.Model):
    """One model over several image types, fused late.

    Args:
        backbones: ``{image_type: backbone}`` (one backbone each), or one backbone shared
            by all inputs (then give ``input_names``).
        classes: Hierarchy, list of class names, or int.
        input_names: image types, when ``backbones`` is one shared backbone.
        fusion: ``"concat"`` (features) or ``"average"`` (probabilities).
        head: ``"flat"`` (output ``"leaf"``) or ``"hierarchical"`` (needs a Hierarchy).
        dropout, pooling: as for :class:`~kmedtl.models.FlatClassifier`.
    """

    def __init__(
        self,
        backbones,
        classes,
        input_names=None,
        fusion="concat",
        head="flat",
        dropout=0.0,
        pooling="avg",
        name=None,
        **kwargs,
    ):
        hierarchy, n, class_names, classes_config = parse_classes(classes)
        if fusion not in FUSIONS:
            raise ModelError(f"fusion={fusion!r} is not valid; choose one of {list(FUSIONS)}")
        if head not in HEADS:
            raise ModelError(f"head={head!r} is not valid; choose one of {list(HEADS)}")
        if head == "hierarchical" and hierarchy is None:
            raise ModelError("head='hierarchical' needs classes to be a Hierarchy")
        check_pooling(pooling)
        shared = isinstance(backbones, keras.Model)
        if shared:
            if not input_names:
                raise ModelError("a shared backbone needs input_names=[...] (the image types)")
            names = [_check_input_name(i) for i in input_names]
            per_input = {i: backbones for i in names}
        elif isinstance(backbones, Mapping) and backbones:
            if input_names is not None and list(input_names) != list(backbones):
                raise ModelError("input_names must match the keys of backbones (or be omitted)")
            names = [_check_input_name(i) for i in backbones]
            per_input = dict(backbones)
            seen = set()
            for i, bb in per_input.items():  # nested models need distinct names
                if bb.name in seen or bb.name in names:
                    bb.name = f"{i}_backbone"
                seen.add(bb.name)
        else:
            raise ModelError(
                "backbones must be a dict {image_type: backbone} or one shared keras.Model"
            )
        if len(set(names)) != len(names) or len(names) < 1:
            raise ModelError(f"input_names={names} must be distinct and non-empty")
        if hierarchy is not None and head == "hierarchical":
            check_output_names(hierarchy, names + [bb.name for bb in per_input.values()])
        # === Layers ===
        self.backbones = {} if shared else per_input
        self.shared_backbone = backbones if shared else None
        # === Functional wiring ===
        inputs = {i: keras.Input(shape=per_input[i].input_shape[1:], name=i) for i in names}
        feats = {i: pool_features(per_input[i](inputs[i]), pooling, name=f"{i}_pool")
                 for i in names}

        def heads(x, prefix):
            if head == "flat":
                return {"leaf": classification_head(x, n, dropout, f"{prefix}leaf")}
            node = {hierarchy.node_output_name(p): classification_head(
                x, len(hierarchy.children(p)), dropout, f"{prefix}{p}")
                for p in hierarchy.parents}
            leaf = LeafProbabilities(hierarchy.to_config(), name=f"{prefix}leaf")(
                list(node.values()))
            return {"leaf": leaf, **node}

        if fusion == "concat" or len(names) == 1:
            fused = (keras.layers.Concatenate(dtype="float32", name="fused_features")(
                [feats[i] for i in names]) if len(names) > 1 else feats[names[0]])
            out = heads(fused, "")
        else:
            per = {i: heads(feats[i], f"{i}_") for i in names}
            out = {
                key: keras.layers.Average(dtype="float32", name=key)([per[i][key] for i in names])
                for key in per[names[0]]
            }
        outputs = out["leaf"] if head == "flat" else out
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        # === Config ===
        self.input_names = names
        self.classes = classes_config
        self.hierarchy = hierarchy
        self.class_names = class_names
        self.fusion = fusion
        self.head = head
        self.dropout = float(dropout)
        self.pooling = pooling

    @property
    def preprocessing(self) -> dict[str, str]:
        bbs = self.backbones or {i: self.shared_backbone for i in self.input_names}
        return {i: getattr(bb, "preprocessing", "unit") for i, bb in bbs.items()}

    def targets(self, labels):
        """``y`` for :meth:`fit`: leaf indices (flat head) or :func:`hierarchy_targets`."""
        if self.head == "hierarchical":
            return hierarchy_targets(self.hierarchy, labels)
        if self.hierarchy is None:
            return np.asarray(labels)
        return self.hierarchy.encode([str(v) for v in labels])["leaf"]

    def compile(self, optimizer="adam", loss="auto", metrics="auto", **kwargs):
        if loss == "auto":
            loss = (hierarchical_losses(self.hierarchy) if self.head == "hierarchical"
                    else keras.losses.SparseCategoricalCrossentropy())
        if metrics == "auto":
            acc = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
            metrics = {"leaf": acc} if self.head == "hierarchical" else acc
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def get_config(self):
        ser = keras.saving.serialize_keras_object
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbones": (ser(self.shared_backbone) if self.shared_backbone is not None
                          else {i: ser(bb) for i, bb in self.backbones.items()}),
            "classes": self.classes,
            "input_names": list(self.input_names),
            "fusion": self.fusion,
            "head": self.head,
            "dropout": self.dropout,
            "pooling": self.pooling,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        de = keras.saving.deserialize_keras_object
        bbs = config["backbones"]
        if isinstance(bbs, dict) and "class_name" in bbs and "config" in bbs:
            config["backbones"] = de(bbs)
        else:
            config["backbones"] = {i: de(c) for i, c in bbs.items()}
        return cls(**config)


class StackedMultiInputClassifier(OutOfFoldStacking):
    """One FlatClassifier per image type, stacked by a meta-classifier on OOF confidences.

    Args:
        backbone_fns: ``{image_type: callable returning a new backbone}`` (or dicts of
            :func:`kmedtl.models.backbone` arguments).
        classes: Hierarchy (its leaves), list of class names, or int.
        dropout, pooling: for each per-input head.
        meta_estimator, n_folds, seed, compile_kwargs, fit_kwargs, fit_fn: see
            :class:`~kmedtl.models.stacking.OutOfFoldStacking`; ``fit_fn`` receives
            ``name=<image type>``.

    ``x`` is a dict ``{image_type: images}``; ``y`` leaf indices or raw labels.
    """

    def __init__(
        self,
        backbone_fns: Mapping[str, Callable],
        classes,
        *,
        dropout: float = 0.0,
        pooling: str = "avg",
        **stacking,
    ):
        # meta_estimator, n_folds, seed, compile_kwargs, fit_kwargs, fit_fn: the base's
        # keyword arguments, declared once there
        super().__init__(**stacking)
        if not isinstance(backbone_fns, Mapping) or not backbone_fns:
            raise ModelError("backbone_fns must be a non-empty dict {image_type: callable}")
        self.input_names = [_check_input_name(i) for i in backbone_fns]
        self.backbone_fns = {i: backbone_factory(f) for i, f in backbone_fns.items()}
        self.hierarchy, self.n_classes, self.class_names, self.classes = parse_classes(classes)
        self.dropout = dropout
        self.pooling = pooling

    def _targets(self, y):
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer):
            if self.hierarchy is None:
                raise ModelError("y: raw labels need classes to be a Hierarchy or list of names")
            y = self.hierarchy.encode([str(v) for v in y])["leaf"]
        if y.min() < 0 or y.max() >= self.n_classes:
            raise ModelError(f"y: labels must be in 0..{self.n_classes - 1}")
        return y, y

    def _check_x(self, x):
        if not isinstance(x, Mapping) or set(x) != set(self.input_names):
            raise ModelError(f"x must be a dict with keys {self.input_names}")

    def _train_models(self, x, y, indices, fold):
        self._check_x(x)
        models = {}
        for i in self.input_names:
            model = FlatClassifier(self.backbone_fns[i](), self.classes, dropout=self.dropout,
                                   pooling=self.pooling, name=f"stack_{i}")
            self._fit_model(model, np.asarray(x[i])[indices], y[indices], name=i, fold=fold,
                            indices=indices)
            models[i] = model
        return models

    def _features(self, models, x):
        self._check_x(x)
        return np.concatenate(
            [np.asarray(models[i].predict(x[i], verbose=0)) for i in self.input_names], axis=-1
        )

    def _keras_graph(self, models):
        inputs = {i: keras.Input(shape=models[i].input_shape[1:], name=i)
                  for i in self.input_names}
        per = {f"{i}_leaf": keras.layers.Activation("linear", dtype="float32",
                                                    name=f"{i}_leaf")(models[i](inputs[i]))
               for i in self.input_names}
        feats = (keras.layers.Concatenate(dtype="float32", name="stacking_features")(
            list(per.values())) if len(per) > 1 else next(iter(per.values())))
        return inputs, feats, per
