"""Cut-point tables: where each registry family can be cut, found in the built graph.

Each finder takes a *full* backbone graph and returns its named cuts (:class:`Cut`), in
network order, at every block, with stage boundaries marked (``kind="stage"``); they are
derived from the real layer names (regular expressions over ``model.operations``), so they
stay right for every depth variant of a family.  :func:`resolve_cut` turns a cut name --
named or any layer name -- into the operation to cut at.

This module sits below :mod:`kmedtl.models.backbones` (the registry refers to the finders,
:class:`~kmedtl.models.Backbone` resolves its cut with them) and below
:mod:`kmedtl.models.truncation` (:func:`~kmedtl.models.cut_points`,
:func:`~kmedtl.models.truncate`), which re-exports every name here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import keras

from kmedtl.errors import ModelError


class Cut(NamedTuple):
    """A named cut: ``name`` (what users pass), ``op`` (the layer/operation), ``kind``."""

    name: str
    op: object
    kind: str  # "block" or "stage"


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
    adds = [op for op in _ops(model) if isinstance(op, keras.layers.Add)]
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


# ---------------------------------------------------------------------------- resolving
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
