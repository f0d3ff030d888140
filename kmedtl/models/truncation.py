"""TruncatedTL: cut a backbone at a named point and keep everything below it.

Each registry family lists its named cut points, in network order, at every block and
with stage boundaries marked (``kind="stage"``).  They are *derived from the real layer
names of the built model* (regular expressions over ``model.operations``), so they stay
right for every depth variant of a family (ResNet50/101/152 ...).  Any other layer name
of the backbone is accepted as a cut as well.

========================  ==============================================================
family                    named cuts
========================  ==============================================================
ResNet v1 / v2            ``conv2_block3_out`` (end of stage 2), then every block
                          ``conv{3,4,5}_block{i}_out``; v2 adds ``post_relu``
DenseNet                  ``pool2_pool``, ``pool3_pool``, ``pool4_pool``, ``relu``
EfficientNet v1 / v2      every block ``block{s}{x}_add`` (or ``_project_bn`` for a
                          block without residual), then ``top_activation``
MobileNetV2 / V3          every inverted-residual block output, then the last activation
VGG                       ``block{1..5}_pool``
InceptionV3               ``mixed0`` ... ``mixed10``
Xception                  ``block2_out`` ... ``block13_out`` (the residual adds), then
                          ``block14_sepconv2_act``
ConvNeXt                  ``stage{s}_block{b}_out`` (the residual adds), then the final
                          layer norm
CBR                       ``block{i}_pool``
parallel ResNet           ``block{i}_out``
========================  ==============================================================

Example::

    >>> from kmedtl.models import backbone, cut_points
    >>> [c.name for c in cut_points("vgg16", input_shape=(32, 32, 3))]
    ['block1_pool', 'block2_pool', 'block3_pool', 'block4_pool', 'block5_pool']
    >>> bb = backbone("resnet50", cut="conv4_block4_out", input_shape=(64, 64, 3))
    >>> bb.output_shape
    (None, 4, 4, 1024)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import keras

from kmedtl.errors import ModelError


class Cut(NamedTuple):
    """A named cut: ``name`` (what users pass), ``op`` (the layer/operation), ``kind``."""

    name: str
    op: object
    kind: str  # "block" or "stage"


@dataclass(frozen=True)
class CutPoint:
    """What :func:`cut_points` reports for one named cut."""

    name: str
    layer: str
    kind: str
    params: int
    output_shape: tuple

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layer": self.layer,
            "kind": self.kind,
            "params": self.params,
            "output_shape": list(self.output_shape),
        }


CutFinder = Callable[[keras.Model], list]


# ---------------------------------------------------------------------------- helpers
def _ops(model):
    return list(model.operations)


def _by_name(model):
    return {op.name: op for op in model.operations}


def _final(model, cuts: list[Cut]) -> list[Cut]:
    """Append the model's output operation as the last (stage) cut if it is not there."""
    last = model.outputs[0]._keras_history.operation
    if not cuts or cuts[-1].op is not last:
        cuts.append(Cut(last.name, last, "stage"))
    return cuts


def _mark_stage_ends(entries):
    """``entries``: list of (name, op, stage_key); the last entry of each stage is a stage end."""
    cuts = []
    for i, (name, op, stage) in enumerate(entries):
        nxt = entries[i + 1][2] if i + 1 < len(entries) else None
        cuts.append(Cut(name, op, "stage" if nxt != stage else "block"))
    return cuts


def _consumer(op):
    nodes = getattr(op, "_outbound_nodes", [])
    return nodes[0].operation if len(nodes) == 1 else None


# ---------------------------------------------------------------------------- finders
def resnet_cuts(model) -> list[Cut]:
    """``conv{s}_block{b}_out``; the first stage contributes only its end."""
    pat = re.compile(r"^conv(\d+)_block(\d+)_out$")
    entries = [(op.name, op, int(m[1])) for op in _ops(model) if (m := pat.match(op.name))]
    cuts = _mark_stage_ends(entries)
    if cuts:
        first = entries[0][2]
        cuts = [c for c, e in zip(cuts, entries) if e[2] != first or c.kind == "stage"]
    return _final(model, cuts)


def _regex_stage_cuts(pattern: str):
    pat = re.compile(pattern)

    def finder(model) -> list[Cut]:
        cuts = [Cut(op.name, op, "stage") for op in _ops(model) if pat.match(op.name)]
        return _final(model, cuts)

    return finder


densenet_cuts = _regex_stage_cuts(r"^(pool\d+_pool|relu)$")
vgg_cuts = _regex_stage_cuts(r"^block\d+_pool$")
cbr_cuts = _regex_stage_cuts(r"^block\d+_pool$")


def inception_cuts(model) -> list[Cut]:
    """``mixed0``..``mixed10``; stage ends at the grid changes (mixed2, mixed7, mixed10)."""
    pat = re.compile(r"^mixed(\d+)$")
    found = [(op.name, op, int(m[1])) for op in _ops(model) if (m := pat.match(op.name))]
    stage_ends = {2, 7, 10}
    cuts = [Cut(n, op, "stage" if i in stage_ends else "block") for n, op, i in found]
    return _final(model, cuts)


def xception_cuts(model) -> list[Cut]:
    """The residual adds are unnamed in keras.applications: alias them ``block{n}_out``."""
    from keras.layers import Add

    adds = [op for op in _ops(model) if isinstance(op, Add)]
    stage_ends = {4, 12}  # entry flow ends at block 4, middle flow at block 12
    cuts = [
        Cut(f"block{n}_out", op, "stage" if n in stage_ends else "block")
        for n, op in enumerate(adds, start=2)
    ]
    return _final(model, cuts)


def _inverted_residual_cuts(model, block_re: str) -> list[Cut]:
    """Blocks named ``<prefix><id>_(add|project_bn)``: take the add when the block has one.

    A stage ends where the next block has no residual add (it changes width/stride).
    """
    pat = re.compile(block_re, re.IGNORECASE)
    blocks: dict[str, dict] = {}
    order = []
    for op in _ops(model):
        m = pat.match(op.name)
        if not m:
            continue
        key = m["id"]
        if key not in blocks:
            blocks[key] = {}
            order.append(key)
        blocks[key][m["kind"].lower()] = op
    entries = []
    for key in order:
        b = blocks[key]
        op = b.get("add", b.get("project_bn"))
        if op is None:
            continue
        entries.append((op.name, op, "add" in b))
    cuts = []
    for i, (name, op, _) in enumerate(entries):
        next_has_add = entries[i + 1][2] if i + 1 < len(entries) else False
        cuts.append(Cut(name, op, "block" if next_has_add else "stage"))
    return _final(model, cuts)


def mobilenetv2_cuts(model) -> list[Cut]:
    return _inverted_residual_cuts(
        model, r"^(?P<id>expanded_conv|block_\d+)_(?P<kind>add|project_BN)$"
    )


def mobilenetv3_cuts(model) -> list[Cut]:
    return _inverted_residual_cuts(
        model, r"^(?P<id>expanded_conv(_\d+)?)_(?P<kind>add|project_bn)$"
    )


def efficientnet_cuts(model) -> list[Cut]:
    """``block{stage}{letter}``: a stage ends at its last letter."""
    pat = re.compile(r"^block(?P<stage>\d+)(?P<letter>[a-z])_(?P<kind>add|project_bn)$")
    blocks: dict[tuple, dict] = {}
    order = []
    for op in _ops(model):
        m = pat.match(op.name)
        if not m:
            continue
        key = (int(m["stage"]), m["letter"])
        if key not in blocks:
            blocks[key] = {}
            order.append(key)
        blocks[key][m["kind"]] = op
    entries = []
    for key in order:
        op = blocks[key].get("add", blocks[key].get("project_bn"))
        entries.append((op.name, op, key[0]))
    return _final(model, _mark_stage_ends(entries))


def convnext_cuts(model) -> list[Cut]:
    """Alias ``stage{s}_block{b}_out`` = the residual add after ``..._stage_s_block_b``."""
    pat = re.compile(r"_stage_(\d+)_block_(\d+)_(identity|stochastic_depth)$")
    entries = []
    for op in _ops(model):
        m = pat.search(op.name)
        if not m:
            continue
        add = _consumer(op)
        if add is None:
            continue
        entries.append((f"stage{m[1]}_block{m[2]}_out", add, int(m[1])))
    return _final(model, _mark_stage_ends(entries))


def parallel_resnet_cuts(model) -> list[Cut]:
    pat = re.compile(r"^block\d+_out$")
    entries = [(op.name, op, i) for i, op in enumerate(o for o in _ops(model) if pat.match(o.name))]
    cuts = [Cut(n, op, "stage") for n, op, _ in entries]
    return _final(model, cuts)


# ---------------------------------------------------------------------------- truncation
def named_cuts(model, finder: CutFinder | None) -> list[Cut]:
    """The named cuts of a *full* backbone graph (empty list when no finder is known)."""
    return list(finder(model)) if finder is not None else []


def resolve_cut(model, cut: str, finder: CutFinder | None = None, family: str = "backbone"):
    """The operation at ``cut``: a named cut point or any layer/operation name."""
    cuts = named_cuts(model, finder)
    for c in cuts:
        if c.name == cut:
            return c.op
    ops = _by_name(model)
    if cut in ops:
        return ops[cut]
    raise ModelError(
        f"cut={cut!r} is not a cut point or layer of {family!r}; named cuts are "
        f"{[c.name for c in cuts]} (any layer name of the backbone works too, "
        f"see [l.name for l in model.layers])"
    )


def truncate(model: keras.Model, cut: str, finder: CutFinder | None = None, name=None):
    """``keras.Model(model.input, <cut>.output)``: everything below the cut, weights shared.

    ``cut`` is a named cut (see :func:`cut_points`) or any layer name of ``model``.  For a
    :class:`~kmedtl.models.Backbone` prefer ``backbone(name, cut=...)``, which saves and
    reloads with the cut in its config.
    """
    if finder is None:
        finder = getattr(getattr(model, "spec", None), "cuts", None)
    op = resolve_cut(model, cut, finder, family=getattr(model, "family", model.name))
    return keras.Model(model.input, op.output, name=name or f"{model.name}_to_{cut}")


def cut_points(name: str, input_shape=None, include_preprocessing: bool = True) -> list[CutPoint]:
    """Named cut points of a registry family, in order, with parameters and output shape.

    Builds the family once (random weights) at ``input_shape`` (default: 224 px RGB, or the
    family's minimum size if larger) and reports, for each cut, the parameter count of the
    truncated model and its output shape (batch axis ``None``).
    """
    from kmedtl.models.backbones import Backbone, get_spec

    spec = get_spec(name)
    if input_shape is None:
        size = max(224, spec.min_size)
        input_shape = (size, size, 3)
    full = Backbone(spec.name, input_shape=input_shape, include_preprocessing=include_preprocessing)
    out = []
    for c in full.named_cuts():
        sub = keras.Model(full.input, c.op.output)
        out.append(
            CutPoint(c.name, c.op.name, c.kind, int(sub.count_params()), tuple(c.op.output.shape))
        )
    return out
