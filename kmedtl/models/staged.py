"""The staged hierarchical scheme of An et al. (2021) as one workflow object.

The scheme as kmedtl's design brief describes An et al. (2021) (full reference not verified
here): instead of one multi-head network,

1. a **level-1** model separates the root's children (normal vs disease) on all samples;
2. a **level-2** model per internal node separates that node's children, trained on that
   node's samples only, and initialised either from the chosen pretrained weights
   (``transfer="pretrained"``) or from the level-1 model's backbone (``transfer=
   "hierarchy"``: "hierarchy transfer", the backbone weights are copied);
3. a **stacking** meta-classifier (logistic regression by default) learns the final leaf
   class from the *out-of-fold* confidences of all levels.

Deeper trees recurse: every parent node gets its own model, initialised (with hierarchy
transfer) from its parent node's model.  Each node model is a
:class:`~kmedtl.models.FlatClassifier` over the node's children; the out-of-fold
mechanics live in :class:`~kmedtl.models.stacking.OutOfFoldStacking`.

The models are trained with Keras ``Model.fit`` (``compile_kwargs`` / ``fit_kwargs``), or
by a user ``fit_fn(model, x, y, *, name, fold, indices)`` (``name`` is the parent node,
``fold`` the fold number or ``None`` for the final models, ``indices`` the training rows),
e.g. one from ``kmedtl.training`` with freezing schedules.  For full determinism also call
``keras.utils.set_random_seed``; ``seed`` fixes the fold split.

Example::

    >>> import numpy as np
    >>> from kmedtl.hierarchy import Hierarchy
    >>> from kmedtl.models import StagedHierarchicalClassifier, backbone
    >>> h = Hierarchy({"normal": None, "tumor": {"glioma": None, "pituitary": None}})
    >>> staged = StagedHierarchicalClassifier(
    ...     h, lambda: backbone("cbr_tiny", input_shape=(32, 32, 1)),
    ...     n_folds=2, fit_kwargs={"epochs": 1})
    >>> x = np.random.rand(12, 32, 32, 1).astype("float32")
    >>> y = ["normal", "glioma", "pituitary"] * 4
    >>> staged.fit(x, y).predict_proba(x).shape
    (12, 3)
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from kmedtl.errors import ModelError
from kmedtl.hierarchy import ROOT
from kmedtl.models.backbones import backbone
from kmedtl.models.heads import FlatClassifier, as_hierarchy
from kmedtl.models.stacking import OutOfFoldStacking

TRANSFERS = ("hierarchy", "pretrained")


def backbone_factory(backbone_fn) -> Callable[[], keras.Model]:
    """A callable returning a *fresh* backbone: a callable, or kwargs for ``backbone()``."""
    if callable(backbone_fn):
        return backbone_fn
    if isinstance(backbone_fn, dict):
        return lambda: backbone(**backbone_fn)
    raise ModelError(
        "backbone_fn must be a callable returning a new backbone (e.g. lambda: "
        "backbone('resnet50', weights='imagenet')) or a dict of backbone() arguments"
    )


class StagedHierarchicalClassifier(OutOfFoldStacking):
    """Level-wise models over a :class:`~kmedtl.hierarchy.Hierarchy` + stacking.

    Args:
        hierarchy: the label tree.
        backbone_fn: callable returning a new backbone (with the chosen pretrained
            weights) each call, or a dict of :func:`kmedtl.models.backbone` arguments.
        transfer: ``"hierarchy"`` (child-node models start from their parent model's
            backbone weights) or ``"pretrained"`` (every model starts from
            ``backbone_fn()``).
        dropout, pooling: for each node model's head.
        meta_estimator: stacking classifier (default ``LogisticRegression(max_iter=1000)``).
        n_folds, seed: out-of-fold split.
        compile_kwargs, fit_kwargs, fit_fn: how each node model is trained.

    After :meth:`fit`: ``models_`` (parent node -> final Keras model), ``meta_``,
    ``oof_features_``, ``oof_fold_``, ``fold_train_indices_``.
    """

    def __init__(
        self,
        hierarchy,
        backbone_fn,
        *,
        transfer: str = "hierarchy",
        dropout: float = 0.0,
        pooling: str = "avg",
        **stacking,
    ):
        # meta_estimator, n_folds, seed, compile_kwargs, fit_kwargs, fit_fn: the base's
        # keyword arguments, declared once there
        super().__init__(**stacking)
        if transfer not in TRANSFERS:
            raise ModelError(f"transfer={transfer!r} is not valid; choose one of {TRANSFERS}")
        self.hierarchy = as_hierarchy(hierarchy)
        self.backbone_fn = backbone_factory(backbone_fn)
        self.transfer = transfer
        self.dropout = dropout
        self.pooling = pooling
        self.n_classes = len(self.hierarchy.leaves)

    @property
    def feature_names(self) -> list[str]:
        """Column names of the stacking features: ``"<parent>:<child>"``."""
        h = self.hierarchy
        return [f"{p}:{c}" for p in h.parents for c in h.children(p)]

    def build_node_model(self, node: str, parent_model: keras.Model | None = None):
        """The classifier over ``node``'s children; with ``parent_model`` its backbone
        weights are copied in (hierarchy transfer)."""
        h = self.hierarchy
        bb = self.backbone_fn()
        model = FlatClassifier(
            bb, list(h.children(node)), dropout=self.dropout, pooling=self.pooling,
            name=f"stage_{node}",
        )
        if parent_model is not None:
            src = parent_model.backbone.get_weights()
            if [w.shape for w in src] != [tuple(w.shape) for w in bb.weights]:
                raise ModelError(
                    "hierarchy transfer needs backbone_fn to build the same architecture "
                    "for every node"
                )
            bb.set_weights(src)
        return model

    # -------------------------------------------------------------- stacking hooks
    def _targets(self, y):
        h = self.hierarchy
        y = np.asarray(y)
        if np.issubdtype(y.dtype, np.integer):
            if y.min() < 0 or y.max() >= len(h.leaves):
                raise ModelError(
                    f"y: integer labels must index hierarchy.leaves (0..{len(h.leaves) - 1})"
                )
            y = np.asarray(h.leaves)[y]
        enc = h.encode([str(v) for v in y])
        return enc["leaf"], enc

    def _train_models(self, x, enc, indices, fold):
        h = self.hierarchy
        models: dict[str, keras.Model] = {}
        for parent in h.parents:  # breadth first: a node's parent model exists already
            up = h.node(parent).parent
            init = models[up] if self.transfer == "hierarchy" and parent != ROOT else None
            model = self.build_node_model(parent, init)
            target = enc[h.node_target_name(parent)]
            rows = indices[target[indices] >= 0]
            if len(rows):
                self._fit_model(
                    model, self._take(x, rows), target[rows], name=parent, fold=fold,
                    indices=rows,
                )
            models[parent] = model
        return models

    def _features(self, models, x):
        return np.concatenate(
            [np.asarray(models[p].predict(x, verbose=0)) for p in self.hierarchy.parents],
            axis=-1,
        )

    def predict_nodes(self, x) -> dict[str, np.ndarray]:
        """Each final node model's probabilities over its children."""
        self._check_fitted()
        return {p: np.asarray(self.models_[p].predict(x, verbose=0))
                for p in self.hierarchy.parents}

    def _keras_graph(self, models):
        shape = models[ROOT].input_shape[1:]
        inputs = keras.Input(shape=shape, name="image")
        per_node = {}
        for p in self.hierarchy.parents:
            name = self.hierarchy.node_output_name(p)  # the output "<parent>"
            per_node[name] = keras.layers.Activation("linear", dtype="float32", name=name)(
                models[p](inputs)
            )
        feats = keras.layers.Concatenate(dtype="float32", name="stacking_features")(
            list(per_node.values())
        ) if len(per_node) > 1 else next(iter(per_node.values()))
        return inputs, feats, per_node
