"""Layer groups, freezing, and the training phases of each strategy.

A model is split into **layer groups**, input side first, head last.  For a kmedtl
backbone the groups are its *stages*, read from the registry's named cut points (those of
``kind == "stage"``, see :func:`kmedtl.models.cut_points`): ResNet's ``conv2..conv5``,
CBR's ``block1..blockN``, ...; ``n`` merges consecutive stages into ``n - 1`` backbone
groups (plus the head).  A multi-input model's backbone is its shared one, or its
backbones (one per input) taken together: the k-th group holds each one's k-th stage, and
everything outside them (pooling, fusion, heads) is the head.  Any other model (no
``.backbone``) is split evenly over its weighted layers, the last weighted layer being the
head.

Freezing follows Keras 3 semantics: ``layer.trainable = False`` removes its weights from
training and runs ``BatchNormalization`` in inference mode (moving statistics used and
left untouched), which is what a linear probe wants.  Changing ``trainable`` only takes
effect at the next ``compile``: :class:`~kmedtl.training.Trainer` therefore runs one
``fit`` per :class:`Phase`.

Strategies (``train.strategy``):

============  =================================================================
full          everything trains
linear_probe  backbone frozen (BatchNorm in inference mode), head trains
freeze        backbone frozen up to a named cut (``freeze_below``) or its first K
              layers (``freeze_layers``); the rest trains
gradual       head first; at each fraction of ``unfreeze_at`` the next backbone
              group from the top is unfrozen (ULMFiT's gradual unfreezing)
fine_tune     ``head_epochs`` with the backbone frozen, then everything, each phase
              with its own schedule (fastai's ``fine_tune``)
============  =================================================================

Example::

    >>> from kmedtl.models import FlatClassifier, backbone
    >>> m = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 2)
    >>> [g.name for g in layer_groups(m)]
    ['block1_pool', 'block2_pool', 'block3_pool', 'block4_pool', 'head']
    >>> [g.name for g in layer_groups(m, 3)]
    ['block1_pool+block2_pool', 'block3_pool+block4_pool', 'head']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np

from kmedtl.errors import ConfigError

FINE_TUNE_MULTIPLIERS = (1 / 9, 1 / 3, 1.0)


@dataclass
class LayerGroup:
    """Consecutive layers that freeze, unfreeze and take a learning-rate multiplier
    together.  ``name`` is the stage cut it ends at (``+``-joined when merged) or
    ``"head"``."""

    name: str
    layers: list = field(default_factory=list)

    @property
    def weights(self) -> list:
        return [w for layer in self.layers for w in layer.weights]

    def set_trainable(self, value: bool) -> None:
        for layer in self.layers:
            set_trainable(layer, value)


def set_trainable(layer, value: bool) -> None:
    """``layer.trainable = value``, propagated to every sublayer.

    On the TensorFlow backend Keras' ``__setattr__`` skips the assignment when the
    attribute already holds that value, so ``model.trainable = True`` on a model whose
    backbone was frozen separately leaves the backbone frozen.  Toggling forces the
    setter (and its propagation to sublayers and variables) to run.
    """
    layer.trainable = not value
    layer.trainable = value


# ---------------------------------------------------------------------------- groups
def model_backbones(model) -> list:
    """The backbone(s) of a kmedtl classifier: ``model.backbone``; for a multi-input model
    (:class:`~kmedtl.models.MultiInputClassifier`) its shared backbone, or its backbones,
    one per input, in input order; ``[]`` for any other model."""
    bb = getattr(model, "backbone", None)
    if isinstance(bb, keras.Model):
        return [bb]
    shared = getattr(model, "shared_backbone", None)
    if isinstance(shared, keras.Model):
        return [shared]
    per = getattr(model, "backbones", None)
    if isinstance(per, Mapping) and per and all(isinstance(b, keras.Model)
                                                for b in per.values()):
        return list(per.values())
    return []


def find_backbone(model) -> keras.Model | None:
    """``model.backbone`` when the model has one (every kmedtl classifier does; a
    multi-input model's shared backbone); ``None`` otherwise, also for several backbones
    (:func:`model_backbones` lists those)."""
    bbs = model_backbones(model)
    return bbs[0] if len(bbs) == 1 else None


def _is_input(layer) -> bool:
    return isinstance(layer, keras.layers.InputLayer)


def _own_layers(bb) -> list:
    return [la for la in bb.layers if not _is_input(la)]


def backbone_layers(model) -> list:
    bbs = model_backbones(model)
    if bbs:
        return [la for bb in bbs for la in _own_layers(bb)]
    weighted = [la for la in _flat_layers(model) if la.weights]
    if len(weighted) < 2:
        raise ConfigError(f"model {model.name!r} has fewer than two weighted layers: nothing to "
                          "split into backbone and head")
    last = weighted[-1]
    layers = _flat_layers(model)
    return layers[:layers.index(last)]


def _flat_layers(model) -> list:
    return [la for la in model.layers if not _is_input(la)]


def head_layers(model) -> list:
    bbs = {id(bb) for bb in model_backbones(model)}
    if bbs:
        return [la for la in model.layers if id(la) not in bbs and not _is_input(la)]
    inside = {id(la) for la in backbone_layers(model)}
    return [la for la in _flat_layers(model) if id(la) not in inside]


def stage_groups(model) -> list[LayerGroup]:
    """Backbone layers split at the stage cut points (one group per stage).  Several
    backbones (a multi-input model, one per input) share one architecture: the k-th group
    holds the k-th stage of each."""
    bbs = model_backbones(model)
    if len(bbs) > 1:
        per = [_stage_groups(bb, _own_layers(bb)) for bb in bbs]
        if len({tuple(g.name for g in p) for p in per}) != 1:
            raise ConfigError(f"model {model.name!r}: its backbones {[b.name for b in bbs]} "
                              "have different stages; layer groups need one architecture")
        return [LayerGroup(group.name, [la for p in per for la in p[k].layers])
                for k, group in enumerate(per[0])]
    return _stage_groups(find_backbone(model), backbone_layers(model))


def _stage_groups(bb, layers) -> list[LayerGroup]:
    cuts = []
    if bb is not None and hasattr(bb, "named_cuts"):
        cuts = [c for c in bb.named_cuts() if c.kind == "stage"]
    if not cuts:  # no registry stages: one group per weighted layer
        groups, current = [], []
        for layer in layers:
            current.append(layer)
            if layer.weights:
                groups.append(LayerGroup(layer.name, current))
                current = []
        if current and groups:
            groups[-1].layers.extend(current)
        return groups
    order = {id(op): i for i, op in enumerate(bb.operations)}
    ends = [(order[id(c.op)], c.name) for c in cuts]
    groups = [LayerGroup(name) for _, name in ends]
    for layer in layers:
        pos = order.get(id(layer))
        k = next((i for i, (end, _) in enumerate(ends) if pos is not None and pos <= end),
                 len(ends) - 1)
        groups[k].layers.append(layer)
    return [g for g in groups if g.layers]


def layer_groups(model, n: int | None = None) -> list[LayerGroup]:
    """Backbone groups (input side first) then the head group.

    ``n``: total number of groups including the head; the backbone stages are merged into
    ``n - 1`` contiguous groups of near-equal size.  ``None`` keeps one group per stage.
    """
    stages = stage_groups(model)
    if n is not None:
        if n < 2:
            raise ConfigError(f"layer groups: need at least 2 groups (backbone + head), got {n}")
        if n - 1 > len(stages):
            raise ConfigError(
                f"layer groups: {n} groups asked (e.g. len(train.lr_multipliers)) but the "
                f"backbone has only {len(stages)} stage(s) {[g.name for g in stages]} + head; "
                f"use at most {len(stages) + 1}")
        merged = []
        for idx in np.array_split(np.arange(len(stages)), n - 1):
            part = [stages[i] for i in idx]
            merged.append(LayerGroup("+".join(g.name for g in part),
                                     [la for g in part for la in g.layers]))
        stages = merged
    return [*stages, LayerGroup("head", head_layers(model))]


def group_multipliers(groups: Sequence[LayerGroup], multipliers: Sequence[float]) -> list:
    """``[(regex, multiplier)]`` for :class:`~kmedtl.training.DiscriminativeOptimizer`:
    each group's variable paths, escaped, with that group's multiplier."""
    if len(groups) != len(multipliers):
        raise ConfigError(f"train.lr_multipliers: {len(multipliers)} multiplier(s) for "
                          f"{len(groups)} layer groups {[g.name for g in groups]}")
    seen: dict[str, float] = {}
    out = []
    for group, mult in zip(groups, multipliers):
        for w in group.weights:
            if w.path in seen and seen[w.path] != float(mult):
                raise ConfigError(f"variable path {w.path!r} appears in two layer groups with "
                                  "different multipliers; give the layers unique names")
            if w.path not in seen:
                seen[w.path] = float(mult)
                out.append((re.escape(w.path), float(mult)))
    return out


# ---------------------------------------------------------------------------- freezing
def unfreeze_all(model) -> None:
    set_trainable(model, True)


def freeze_backbone(model) -> None:
    """Linear probe: backbone frozen (BatchNorm in inference mode), head trainable."""
    set_trainable(model, True)
    bbs = model_backbones(model)
    if bbs:
        for bb in bbs:
            bb.trainable = False
    else:
        for layer in backbone_layers(model):
            layer.trainable = False


def freeze_batchnorm(model) -> int:
    """``train.freeze_bn``: keep every BatchNormalization layer of the backbone in inference
    mode (its pretrained statistics and affine weights fixed) while the convolutions train,
    as the Keras fine-tuning guide recommends for pretrained EfficientNets; returns how
    many layers were frozen.  Such layers are also left alone by ``recalibrate_bn``."""
    n = 0
    for layer in backbone_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            layer.trainable = False
            n += 1
    return n


def freeze_below(model, cut: str) -> list:
    """Freeze the backbone up to and including ``cut`` (a named cut or layer name);
    returns the frozen layers."""
    set_trainable(model, True)
    bbs = model_backbones(model)
    if len(bbs) > 1:  # one backbone per input: the same cut in each
        return [la for bb in bbs for la in _freeze_below(bb, _own_layers(bb), cut)]
    return _freeze_below(find_backbone(model), backbone_layers(model), cut)


def _freeze_below(bb, layers, cut: str) -> list:
    target = None
    if bb is not None and hasattr(bb, "named_cuts"):
        target = next((c.op for c in bb.named_cuts() if c.name == cut), None)
    if target is None:
        target = next((la for la in layers if la.name == cut), None)
    if target is None:
        names = [c.name for c in bb.named_cuts()] if bb is not None and \
            hasattr(bb, "named_cuts") else []
        raise ConfigError(f"train.freeze_below: {cut!r} is not a cut point or layer of the "
                          f"backbone; named cuts: {names} (or any backbone layer name)")
    ops = list(bb.operations) if bb is not None else layers
    order = {id(op): i for i, op in enumerate(ops)}
    limit = order[id(target)]
    frozen = [la for la in layers if order.get(id(la), 1 << 30) <= limit]
    for layer in frozen:
        layer.trainable = False
    return frozen


def freeze_first(model, k: int) -> list:
    """Freeze the first ``k`` backbone layers (graph order, input layer excluded)."""
    set_trainable(model, True)
    bbs = model_backbones(model)
    parts = [_own_layers(bb) for bb in bbs] if len(bbs) > 1 else [backbone_layers(model)]
    frozen = []
    for layers in parts:  # one backbone per input: the first k layers of each
        if k > len(layers):
            raise ConfigError(f"train.freeze_layers: {k} is more than the backbone's "
                              f"{len(layers)} layers")
        for layer in layers[:k]:
            layer.trainable = False
        frozen.extend(layers[:k])
    return frozen


def unfreeze_top(model, groups: Sequence[LayerGroup], n_backbone: int) -> None:
    """Head plus the top ``n_backbone`` backbone groups trainable, the rest frozen."""
    set_trainable(model, True)
    backbone = list(groups[:-1])
    for i, group in enumerate(backbone):
        group.set_trainable(i >= len(backbone) - n_backbone)
    groups[-1].set_trainable(True)


def trainable_summary(model) -> dict:
    """Counts of trainable / frozen weights (for logs and ``train_metrics.json``)."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    total = sum(int(np.prod(w.shape)) for w in model.weights)
    return {"trainable_params": trainable, "non_trainable_params": total - trainable}


# ---------------------------------------------------------------------------- phases
@dataclass
class Phase:
    """One ``fit`` of a run: epochs ``[start, end)`` with ``apply(model)`` setting which
    layers train.  ``restart_schedule``: the LR schedule restarts for this phase (fine_tune)
    instead of continuing the run-long one."""

    index: int
    start: int
    end: int
    name: str
    apply: Callable = field(repr=False)
    restart_schedule: bool = False
    groups: list = field(default_factory=list, repr=False)

    @property
    def epochs(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict:
        return {"index": self.index, "start_epoch": self.start, "end_epoch": self.end,
                "name": self.name}


class Strategy:
    """A freezing strategy (``train.strategy``): which layers train in which epochs.

    A strategy is a small class with a ``name`` and :meth:`phases`, registered in
    :data:`STRATEGIES` with :func:`register_strategy` (fastai composes ``fine_tune`` from
    small phases the same way).  A new strategy is one new class; its name must also be
    listed in ``kmedtl.training.config.STRATEGIES``, which the config validates against
    without importing Keras (a test keeps the two in step).
    """

    name: str = ""
    #: per-group learning-rate multipliers when ``train.lr_multipliers`` is not set
    default_multipliers: tuple[float, ...] | None = None

    def phases(self, cfg, model, epochs: int) -> list[Phase]:
        raise NotImplementedError


#: ``train.strategy`` name -> :class:`Strategy` subclass.
STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``train.strategy: <cls.name>``."""
    if not cls.name or cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.__name__}: a new, non-empty name is needed "
                         f"(got {cls.name!r})")
    STRATEGIES[cls.name] = cls
    return cls


@register_strategy
class Full(Strategy):
    """Everything trains."""

    name = "full"

    def phases(self, cfg, model, epochs):
        return [Phase(0, 0, epochs, "all", unfreeze_all)]


@register_strategy
class LinearProbe(Strategy):
    """Backbone frozen (BatchNorm in inference mode), head trains."""

    name = "linear_probe"

    def phases(self, cfg, model, epochs):
        return [Phase(0, 0, epochs, "linear_probe", freeze_backbone)]


@register_strategy
class Freeze(Strategy):
    """Backbone frozen up to a named cut (``freeze_below``) or its first K layers."""

    name = "freeze"

    def phases(self, cfg, model, epochs):
        if cfg.freeze_below is not None:
            return [Phase(0, 0, epochs, f"frozen_below:{cfg.freeze_below}",
                          lambda m: freeze_below(m, cfg.freeze_below))]
        return [Phase(0, 0, epochs, f"frozen_first:{cfg.freeze_layers}",
                      lambda m: freeze_first(m, cfg.freeze_layers))]


@register_strategy
class FineTune(Strategy):
    """``head_epochs`` with the backbone frozen, then everything, each phase with its own
    schedule (fastai's ``fine_tune``); discriminative rates lr/9, lr/3, lr by default."""

    name = "fine_tune"
    default_multipliers = FINE_TUNE_MULTIPLIERS

    def phases(self, cfg, model, epochs):
        h = cfg.head_epochs
        if epochs <= h:
            raise ConfigError(f"train.epochs ({epochs}) must exceed train.head_epochs ({h}) for "
                              "strategy 'fine_tune'")
        return [Phase(0, 0, h, "head", freeze_backbone, restart_schedule=True),
                Phase(1, h, epochs, "all", unfreeze_all, restart_schedule=True)]


@register_strategy
class Gradual(Strategy):
    """Head first; at each fraction of ``unfreeze_at`` the next backbone group from the
    top is unfrozen (ULMFiT's gradual unfreezing)."""

    name = "gradual"

    def phases(self, cfg, model, epochs):
        n = len(cfg.lr_multipliers) if cfg.lr_multipliers else None
        groups = layer_groups(model, n)
        backbone = groups[:-1]
        fracs = list(cfg.unfreeze_at)
        if len(fracs) > len(backbone):
            raise ConfigError(
                f"train.unfreeze_at: {len(fracs)} unfreezing points but the backbone has only "
                f"{len(backbone)} layer group(s) {[g.name for g in backbone]}")
        bounds = [int(round(f * epochs)) for f in fracs]
        if any(b < 1 or b >= epochs for b in bounds) or any(
                b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
            raise ConfigError(
                f"train.unfreeze_at: {fracs} of {epochs} epochs gives unfreezing epochs "
                f"{bounds}; they must be distinct and between 1 and {epochs - 1} (use more "
                "epochs or fewer points)")
        edges = [0, *bounds, epochs]
        phases = []
        for i in range(len(edges) - 1):
            top = [g.name for g in backbone[len(backbone) - i:]] if i else []
            name = "head" if not i else "head+" + ",".join(top)
            phases.append(Phase(i, edges[i], edges[i + 1], name,
                                lambda m, i=i: unfreeze_top(m, groups, i), groups=groups))
        return phases


def strategy(name: str) -> Strategy:
    """The registered strategy called ``name``."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(f"train.strategy: {name!r} is not one of {list(STRATEGIES)}") from None


def plan_phases(cfg, model, epochs: int) -> list[Phase]:
    """The phases of ``cfg.strategy`` over ``epochs`` epochs (``cfg``: a TrainSection)."""
    return strategy(cfg.strategy).phases(cfg, model, epochs)


def phase_multipliers(cfg) -> list[float] | None:
    """The per-group multipliers in force (fine_tune defaults to lr/9, lr/3, lr)."""
    if cfg.lr_multipliers:
        return list(cfg.lr_multipliers)
    default = strategy(cfg.strategy).default_multipliers
    return list(default) if default else None
