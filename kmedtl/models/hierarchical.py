"""One functional model with a softmax head per parent node of a :class:`Hierarchy`.

``HierarchicalClassifier`` shares one backbone between heads named after the parent
nodes (``"root"`` over the root's children, ``"tumor"`` over the tumour subtypes, ...) and
adds a ``"leaf"`` output: the probability of each leaf is the product of the head
probabilities along its path (:class:`LeafProbabilities`), so it sums to 1 and is
consistent with every head.

Training uses :class:`MaskedSparseCategoricalCrossentropy` on each head: targets come from
:meth:`Hierarchy.encode` (``"node:<parent>"`` -> output ``"<parent>"``, see
:func:`hierarchy_targets`) and ``-1`` (not applicable: a normal scan has no subtype) gives
exactly zero loss and zero gradient; the loss is averaged over the *applicable* rows of
the batch (0 when none apply), so a subtype head learns only from its subtree at a scale
that does not depend on how many normals the batch holds.

Example::

    >>> import numpy as np
    >>> from kmedtl.hierarchy import Hierarchy
    >>> from kmedtl.models import HierarchicalClassifier, backbone, hierarchy_targets
    >>> h = Hierarchy({"normal": None, "tumor": {"glioma": None, "pituitary": None}})
    >>> model = HierarchicalClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), h)
    >>> model.compile()
    >>> y = hierarchy_targets(h, ["normal", "glioma", "pituitary", "glioma"])
    >>> _ = model.fit(np.random.rand(4, 32, 32, 1), y, epochs=1, verbose=0)
    >>> sorted(model.predict(np.zeros((1, 32, 32, 1)), verbose=0))
    ['leaf', 'root', 'tumor']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np
from keras import ops

from kmedtl.errors import ModelError
from kmedtl.hierarchy import ROOT, Hierarchy
from kmedtl.models.heads import (
    BackboneClassifier,
    as_hierarchy,
    check_pooling,
    classification_head,
    image_input,
    pool_features,
)

try:  # what Keras' own mean reductions call (a private module: see _scale_for_distribution)
    from keras.src.losses.loss import scale_loss_for_distribution as _keras_scale_loss
except ImportError:  # moved in a future Keras
    _keras_scale_loss = None


def leaf_paths(h: Hierarchy) -> tuple[np.ndarray, list[int]]:
    """Index table for :class:`LeafProbabilities`.

    Returns ``(idx, widths)``: ``idx[l, d]`` is the column, in the concatenation of the
    heads in ``h.parents`` order, of the child taken at depth ``d`` on the path to leaf
    ``l``; paths shorter than the tree depth point at an extra all-ones column.
    """
    widths = [len(h.children(p)) for p in h.parents]
    offsets = dict(zip(h.parents, np.cumsum([0, *widths[:-1]]).tolist()))
    ones_col = int(sum(widths))
    idx = np.full((len(h.leaves), h.depth), ones_col, dtype="int32")
    for i, leaf in enumerate(h.leaves):
        path = h.path(leaf)
        for d, (parent, child) in enumerate(zip((ROOT, *path[:-1]), path)):
            idx[i, d] = offsets[parent] + h.children(parent).index(child)
    return idx, widths


@keras.saving.register_keras_serializable(package="kmedtl")
class LeafProbabilities(keras.layers.Layer):
    """Leaf probabilities = product of head probabilities along each root-to-leaf path.

    Call it on the list of head outputs in ``hierarchy.parents`` order.  float32, pure
    ``keras.ops`` (one gather and one product).
    """

    def __init__(self, hierarchy, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        h = as_hierarchy(hierarchy)
        self.hierarchy = h
        self._idx, self._widths = leaf_paths(h)

    def call(self, node_probs):
        if len(node_probs) != len(self._widths):
            raise ModelError(
                f"{self.name}: expected {len(self._widths)} head outputs in hierarchy.parents "
                f"order {list(self.hierarchy.parents)}, got {len(node_probs)}"
            )
        probs = [ops.cast(p, self.compute_dtype) for p in node_probs]
        ones = ops.ones_like(probs[0][:, :1])
        table = ops.concatenate([*probs, ones], axis=-1)
        gathered = ops.take(table, ops.convert_to_tensor(self._idx), axis=1)  # (N, L, D)
        return ops.prod(gathered, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], len(self.hierarchy.leaves))

    def get_config(self):
        return {**super().get_config(), "hierarchy": self.hierarchy.to_config()}


@keras.saving.register_keras_serializable(package="kmedtl")
class MaskedSparseCategoricalCrossentropy(keras.losses.Loss):
    """Sparse categorical cross-entropy that ignores rows whose target is ``ignore_index``.

    Ignored rows get exactly zero loss and zero gradient.  Reductions:
    ``"sum_over_batch_size"`` / ``"mean"`` (default) average over the applicable rows
    (``sum(w * ce) / n_applicable``, 0 when none apply); ``"mean_with_sample_weight"``
    divides by the applicable sample weights instead; ``"sum"`` sums; ``"none"`` returns the
    per-row values (zeros on ignored rows).

    Example::

        >>> import numpy as np
        >>> loss = MaskedSparseCategoricalCrossentropy()
        >>> p = np.array([[0.5, 0.5], [0.9, 0.1]], "float32")
        >>> round(float(loss(np.array([0, -1]), p)), 4)  # only row 0 counts: -log(0.5)
        0.6931
    """

    def __init__(
        self,
        from_logits=False,
        ignore_index=-1,
        reduction="sum_over_batch_size",
        name="masked_sparse_categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.ignore_index = int(ignore_index)

    def _valid(self, y_true):
        y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        return y_true, ops.not_equal(y_true, self.ignore_index)

    def call(self, y_true, y_pred):
        y_true, valid = self._valid(y_true)
        safe = ops.where(valid, y_true, ops.zeros_like(y_true))
        ce = keras.losses.sparse_categorical_crossentropy(
            safe, y_pred, from_logits=self.from_logits
        )
        ce = ops.reshape(ce, (-1,))
        return ops.where(valid, ce, ops.zeros_like(ce))

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            y_pred = ops.convert_to_tensor(y_pred, dtype=self.dtype)
            y_true = ops.convert_to_tensor(y_true)
            losses = self.call(y_true, y_pred)
            _, valid = self._valid(y_true)
            valid = ops.cast(valid, losses.dtype)
            weights = valid
            if sample_weight is not None:
                sw = ops.reshape(ops.cast(sample_weight, losses.dtype), (-1,))
                weights = valid * sw
            weighted = losses * weights
            if self.reduction in (None, "none"):
                return weighted
            total = ops.sum(weighted)
            if self.reduction == "sum":
                return total
            denom = ops.sum(weights) if self.reduction == "mean_with_sample_weight" else ops.sum(
                valid
            )
            return _scale_for_distribution(ops.divide_no_nan(total, denom))

    def get_config(self):
        return {
            **super().get_config(),
            "from_logits": self.from_logits,
            "ignore_index": self.ignore_index,
        }


def _scale_for_distribution(loss):
    """What Keras' own mean reductions do under a multi-replica ``tf.distribute`` strategy
    (divide by the replica count); a no-op on one device and on other backends."""
    if _keras_scale_loss is None:  # moved in a future Keras: single device is unaffected
        return loss
    return _keras_scale_loss(loss)


def hierarchy_targets(hierarchy, labels) -> dict[str, np.ndarray]:
    """``y`` dict keyed by output name from raw labels or from ``Hierarchy.encode(...)``.

    ``{"leaf": leaf index, "root": child of root, "<parent>": child of parent or -1}``.

    Example::

        >>> h = Hierarchy({"normal": None, "tumor": {"glioma": None, "pituitary": None}})
        >>> hierarchy_targets(h, ["normal", "pituitary"])["tumor"].tolist()
        [-1, 1]
    """
    h = as_hierarchy(hierarchy)
    if isinstance(labels, Mapping):
        encoded = labels
    elif isinstance(labels, (Sequence, np.ndarray)) and not isinstance(labels, str):
        encoded = h.encode([str(x) for x in labels])
    else:
        raise ModelError(
            f"labels must be raw labels or Hierarchy.encode(...) output, got {type(labels)}"
        )
    try:
        out = {"leaf": np.asarray(encoded["leaf"])}
        for p in h.parents:
            out[h.node_output_name(p)] = np.asarray(encoded[h.node_target_name(p)])
    except KeyError as exc:
        raise ModelError(
            f"labels: encoded targets lack key {exc.args[0]!r}; pass Hierarchy.encode(...) "
            "of the same hierarchy"
        ) from None
    return out


def hierarchical_losses(hierarchy) -> dict[str, keras.losses.Loss]:
    """One masked cross-entropy per head, keyed by output name."""
    h = as_hierarchy(hierarchy)
    return {h.node_output_name(p): MaskedSparseCategoricalCrossentropy() for p in h.parents}


def hierarchical_heads(features, h: Hierarchy, dropout: float) -> dict:
    """Head outputs ``{parent: probs}`` (in ``h.parents`` order) plus ``"leaf"``."""
    heads = {
        h.node_output_name(p): classification_head(
            features, len(h.children(p)), dropout, h.node_output_name(p)
        )
        for p in h.parents
    }
    leaf = LeafProbabilities(h.to_config(), name="leaf")(list(heads.values()))
    return {"leaf": leaf, **heads}


def check_output_names(h: Hierarchy, taken: Sequence[str]):
    clash = set(h.parents) & set(taken)
    if clash:
        raise ModelError(
            f"hierarchy node(s) {sorted(clash)} clash with layer names {sorted(taken)}; "
            "rename the node(s) or the input/backbone"
        )


@keras.saving.register_keras_serializable(package="kmedtl")
class HierarchicalClassifier(BackboneClassifier):
    """Shared backbone + one softmax head per parent node + consistent ``"leaf"`` output.

    Args:
        backbone: a ``keras.Model`` mapping images to a feature map.
        hierarchy: the label tree (:class:`~kmedtl.hierarchy.Hierarchy` or its config).
        dropout: dropout before each head's dense layer.
        pooling: ``"avg"`` or ``"max"``.

    Outputs (a dict): ``"leaf"`` (N, n_leaves) and one ``"<parent>"`` (N, n_children) per
    parent node, all float32 probabilities.  :meth:`compile` defaults to the masked losses
    (:func:`hierarchical_losses`) and leaf accuracy; feed ``y`` from
    :func:`hierarchy_targets`.

    Example::

        >>> from kmedtl.models import backbone
        >>> h = Hierarchy({"normal": None, "tumor": {"glioma": None, "pituitary": None}})
        >>> m = HierarchicalClassifier(backbone=backbone("cbr_tiny", input_shape=(32, 32, 1)),
        ...                            hierarchy=h)
        >>> sorted(m.output_names)
        ['leaf', 'root', 'tumor']
    """

    def __init__(self, backbone, hierarchy, dropout=0.0, pooling="avg", name=None, **kwargs):
        h = as_hierarchy(hierarchy)
        check_pooling(pooling)
        check_output_names(h, ["image", "pool", backbone.name])
        # === Layers ===
        self.backbone = backbone
        # === Functional wiring ===
        inputs = image_input(backbone)
        features = pool_features(backbone(inputs), pooling)
        outputs = hierarchical_heads(features, h, dropout)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        # === Config ===
        self.hierarchy = h
        self.dropout = float(dropout)
        self.pooling = pooling

    def head_config(self) -> dict:
        return {"hierarchy": self.hierarchy.to_config()}

    def targets(self, labels) -> dict[str, np.ndarray]:
        """:func:`hierarchy_targets` for this model's hierarchy."""
        return hierarchy_targets(self.hierarchy, labels)

    def compile(
        self,
        optimizer="adam",
        loss="auto",
        metrics="auto",
        leaf_loss_weight: float = 0.0,
        **kwargs,
    ):
        """Compile with masked per-head losses (``loss="auto"``) and leaf accuracy.

        ``leaf_loss_weight > 0`` adds a cross-entropy on the ``"leaf"`` output (with that
        weight; the heads keep weight 1).
        """
        if loss == "auto":
            loss = hierarchical_losses(self.hierarchy)
            if leaf_loss_weight:
                loss["leaf"] = keras.losses.SparseCategoricalCrossentropy()
                weights = {name: 1.0 for name in loss}
                weights["leaf"] = float(leaf_loss_weight)
                kwargs.setdefault("loss_weights", weights)
        if metrics == "auto":
            metrics = {"leaf": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]}
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
