"""The label tree: the single source of class names, order and parent/child structure.

A ``Hierarchy`` is built from YAML (or the equivalent Python objects) of any depth::

    normal: [no_tumor]            # a leaf and the raw labels that map to it
    tumor:                        # an internal node
      glioma: [glioma_tumor]
      meningioma: [meningioma_tumor]
      pituitary: [pituitary_tumor]

A mapping value is an internal node; a list of strings (or one string) is a leaf with the
raw labels found in the data; ``null`` is a leaf whose raw label is its own name.  A plain
list ``[a, b, c]`` is the flat (depth-1) case.  Every leaf also accepts its own name as a
raw label.  So ``intact: [BG, N]`` is ONE class ``intact`` that merges the raw labels
``BG`` and ``N``; ``intact: {BG: [BG], N: [N]}`` is a node with two classes.  When a leaf
merges several labels that the data holds as separate classes (class folders),
:meth:`Hierarchy.merged_leaves` finds it and :meth:`Hierarchy.merge_warning` words the
warning that indexing a folder logs and the audit records.

Data encodes labels with it (:meth:`Hierarchy.encode`), models build one head per parent
node (:attr:`Hierarchy.parents`) and metrics/exports name their outputs from it.

Example::

    >>> h = Hierarchy.from_yaml("normal: [no_tumor]\\ntumor: {glioma: [glioma_tumor], "
    ...                         "pituitary: [pituitary_tumor]}")
    >>> h.leaves
    ('normal', 'glioma', 'pituitary')
    >>> h.encode(["glioma_tumor"])["node:tumor"]
    array([0])
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kmedtl.errors import ConfigError, HierarchyError
from kmedtl.safe_yaml import load_yaml  # nesting, alias and size limits (issue 21)

ROOT = "root"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_RESERVED = {ROOT, "leaf", "leaves", "confidence", "label"}
#: Outputs every exported model returns after its probabilities (see
#: :meth:`Hierarchy.exported_output_names`).
EXPORT_DECISION_OUTPUTS = ("label", "label_index", "confidence")


@dataclass(frozen=True)
class Node:
    """One node of the tree. ``depth`` is 1 for the root's children."""

    name: str
    parent: str | None
    children: tuple[str, ...]
    depth: int
    raw_labels: tuple[str, ...] = ()

    @property
    def is_leaf(self) -> bool:
        return not self.children


class Hierarchy:
    """A label tree of any depth. See the module docstring for the YAML form."""

    def __init__(self, tree: Any):
        self._spec = _normalise(tree, where="hierarchy")
        if not self._spec:
            raise HierarchyError("hierarchy: the label tree is empty; give at least two classes")
        self._nodes: dict[str, Node] = {}
        self._build(ROOT, None, self._spec, 0)
        leaves = [n for n in self._nodes.values() if n.is_leaf]
        if len(leaves) < 2:
            raise HierarchyError(
                f"hierarchy: needs at least two leaf classes, got {[n.name for n in leaves]}"
            )
        self.leaves: tuple[str, ...] = tuple(n.name for n in leaves)
        self._leaf_index = {name: i for i, name in enumerate(self.leaves)}
        self._raw_to_leaf: dict[str, str] = {}
        for leaf in leaves:
            for raw in (leaf.name, *leaf.raw_labels):
                other = self._raw_to_leaf.get(raw)
                if other is not None and other != leaf.name:
                    raise HierarchyError(
                        f"hierarchy: raw label {raw!r} maps to both {other!r} and {leaf.name!r}; "
                        "each raw label must belong to exactly one leaf"
                    )
                self._raw_to_leaf[raw] = leaf.name
        # Internal nodes in breadth-first order, root first: one classification head each.
        order, queue = [], [ROOT]
        while queue:
            name = queue.pop(0)
            node = self._nodes[name]
            if node.children:
                order.append(name)
                queue.extend(node.children)
        self.parents: tuple[str, ...] = tuple(order)
        self.depth: int = max(n.depth for n in leaves)
        self.levels: tuple[tuple[str, ...], ...] = tuple(
            tuple(n for n in self._bfs() if self._nodes[n].depth == k)
            for k in range(1, self.depth + 1)
        )

    # ------------------------------------------------------------------ construction
    def _build(self, name, parent, spec, depth):
        if name in self._nodes:
            raise HierarchyError(
                f"hierarchy: node name {name!r} appears twice; node names must be unique "
                "because outputs are named after them"
            )
        if isinstance(spec, dict):
            children = tuple(spec)
            self._nodes[name] = Node(name, parent, children, depth)
            for child, sub in spec.items():
                self._build(child, name, sub, depth + 1)
        else:
            self._nodes[name] = Node(name, parent, (), depth, tuple(spec))

    def _bfs(self):
        queue = [ROOT]
        while queue:
            name = queue.pop(0)
            if name != ROOT:
                yield name
            queue.extend(self._nodes[name].children)

    @classmethod
    def from_yaml(cls, source: str | Path) -> Hierarchy:
        """Build from a YAML file path or a YAML string."""
        text, label = source, "hierarchy"
        if isinstance(source, Path) or (
            isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))
        ):
            path = Path(source)
            if not path.is_file():
                raise HierarchyError(f"{path}: hierarchy file not found")
            text, label = path.read_text(), f"hierarchy {path}"
        try:
            data = load_yaml(text, label)
        except ConfigError as exc:
            raise HierarchyError(str(exc)) from None
        return cls(data)

    @classmethod
    def flat(cls, labels: Iterable[str]) -> Hierarchy:
        """The depth-1 case: one class per label."""
        return cls(list(labels))

    def to_config(self) -> dict:
        """A plain dict that ``Hierarchy(...)`` turns back into an equal hierarchy."""

        def dump(name):
            node = self._nodes[name]
            if node.children:
                return {c: dump(c) for c in node.children}
            return list(node.raw_labels)

        return dump(ROOT)

    # ------------------------------------------------------------------ queries
    def node(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise HierarchyError(
                f"hierarchy: no node named {name!r}; nodes are {sorted(self._nodes)}"
            ) from None

    def children(self, name: str = ROOT) -> tuple[str, ...]:
        return self.node(name).children

    def path(self, leaf: str) -> tuple[str, ...]:
        """Nodes from depth 1 down to ``leaf`` (the root excluded)."""
        out, name = [], leaf
        node = self.node(name)
        while node.parent is not None:
            out.append(node.name)
            node = self._nodes[node.parent]
        return tuple(reversed(out))

    @property
    def raw_labels(self) -> dict[str, str]:
        """Raw label -> leaf name."""
        return dict(self._raw_to_leaf)

    def leaf_of(self, raw_label: str) -> str:
        try:
            return self._raw_to_leaf[str(raw_label)]
        except KeyError:
            raise HierarchyError(
                f"label {raw_label!r} is not in the hierarchy; known labels: "
                f"{sorted(self._raw_to_leaf)} (add it to the hierarchy YAML or fix the data)"
            ) from None

    def merged_leaves(self, labels: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """``{leaf: raw labels}`` for each leaf that two or more of ``labels`` (raw labels
        the data holds as separate classes, e.g. its class folder names) map to, the raw
        labels in the order given.  Labels not in the tree are ignored.

            >>> Hierarchy({"intact": ["BG", "N"], "torn": None}).merged_leaves(
            ...     ["BG", "N", "torn"])
            {'intact': ('BG', 'N')}
        """
        found: dict[str, list[str]] = {}
        for raw in dict.fromkeys(str(x) for x in labels):
            leaf = self._raw_to_leaf.get(raw)
            if leaf is not None:
                found.setdefault(leaf, []).append(raw)
        return {leaf: tuple(raws) for leaf, raws in found.items() if len(raws) > 1}

    def merge_warning(self, leaf: str, raw_labels: Sequence[str],
                      what: str = "class folders") -> str:
        """The warning for a leaf that merges several of the data's classes
        (:meth:`merged_leaves`): the leaf, the raw labels and the spelling that makes them
        separate leaves."""
        raws = [str(r) for r in raw_labels]
        given = f"{leaf}: [{', '.join(raws)}]"
        split = f"{leaf}: {{" + ", ".join(
            f"{_node_name(r)}: [{r}]" for r in raws) + "}"
        return (f"hierarchy: leaf {leaf!r} merges the {what} {raws} into ONE class: in a "
                f"hierarchy YAML a list is one leaf's raw labels ({given}), a mapping is a "
                f"subtree.  If these are meant to be separate classes, write {split}; if "
                "merging them is intended, ignore this warning")

    def __contains__(self, raw_label) -> bool:
        return str(raw_label) in self._raw_to_leaf

    def leaf_index(self, raw_label: str) -> int:
        return self._leaf_index[self.leaf_of(raw_label)]

    @property
    def is_flat(self) -> bool:
        return self.depth == 1

    # ------------------------------------------------------------------ names
    def level_name(self, k: int) -> str:
        return f"level_{k}"

    def node_output_name(self, parent: str) -> str:
        """Name of the head that classifies among ``parent``'s children."""
        self.node(parent)
        return parent

    def node_target_name(self, parent: str) -> str:
        """Key of a parent node's targets in :meth:`encode` (``node:<parent>``)."""
        self.node(parent)
        return f"node:{parent}"

    def exported_node_name(self, parent: str) -> str:
        """Name of a head's output in an exported model (``node_<parent>``, with every
        character outside ``[A-Za-z0-9_]`` replaced by ``_``: a valid signature key)."""
        self.node(parent)
        return "node_" + re.sub(r"[^A-Za-z0-9_]", "_", parent)

    @property
    def output_names(self) -> dict[str, Any]:
        """Names of every model output: ``leaf``, one per level, one per parent node."""
        return {
            "leaf": "leaf",
            "levels": [self.level_name(k) for k in range(1, self.depth + 1)],
            "nodes": [self.node_output_name(p) for p in self.parents],
        }

    def exported_output_names(self, node_outputs: Iterable[str] = ()) -> list[str]:
        """Names of the outputs every exported format returns, in order: ``leaf``,
        ``calibrated``, one per level (:meth:`level_name`), one per head in
        ``node_outputs`` (parent names; :meth:`exported_node_name`) and
        :data:`EXPORT_DECISION_OUTPUTS` (``label``, ``label_index``, ``confidence``).

        Raises :class:`HierarchyError` when two nodes give the same name."""
        nodes = list(node_outputs)
        names = ["leaf", "calibrated"]
        names += [self.level_name(k) for k in range(1, self.depth + 1)]
        names += [self.exported_node_name(p) for p in nodes]
        names += list(EXPORT_DECISION_OUTPUTS)
        if len(set(names)) != len(names):
            raise HierarchyError(f"hierarchy: node names {nodes} give clashing output "
                                 f"names {names}; rename the nodes")
        return names

    def exported_class_names(self, node_outputs: Iterable[str] = ()) -> dict[str, list[str]]:
        """Class order of every probability output of :meth:`exported_output_names`."""
        out = {"leaf": list(self.leaves), "calibrated": list(self.leaves)}
        for k in range(1, self.depth + 1):
            out[self.level_name(k)] = list(self.levels[k - 1])
        for p in node_outputs:
            out[self.exported_node_name(p)] = list(self.children(p))
        return out

    # ------------------------------------------------------------------ encoding
    def encode(self, raw_labels: Sequence[str]) -> dict[str, np.ndarray]:
        """Integer targets for every output.

        Keys: ``"leaf"`` (index into :attr:`leaves`), ``"level_k"`` (index into
        ``levels[k-1]``) and ``"node:<parent>"`` (index into ``children(parent)``).  A level
        or node that does not apply to a sample (a ``normal`` scan has no subtype) is ``-1``;
        ``masks(...)`` turns that into 0/1 weights.
        """
        leaves = [self.leaf_of(r) for r in raw_labels]
        n = len(leaves)
        out = {"leaf": np.array([self._leaf_index[x] for x in leaves], dtype=np.int64)}
        level_pos = [{name: i for i, name in enumerate(lv)} for lv in self.levels]
        levels = np.full((self.depth, n), -1, dtype=np.int64)
        nodes = {p: np.full(n, -1, dtype=np.int64) for p in self.parents}
        for i, leaf in enumerate(leaves):
            path = self.path(leaf)
            for k, name in enumerate(path):
                levels[k, i] = level_pos[k][name]
            for parent, child in zip((ROOT, *path[:-1]), path):
                nodes[parent][i] = self._nodes[parent].children.index(child)
        for k in range(self.depth):
            out[self.level_name(k + 1)] = levels[k]
        for p in self.parents:
            out[self.node_target_name(p)] = nodes[p]
        return out

    @staticmethod
    def masks(encoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """1.0 where a target applies, 0.0 where it is ``-1``."""
        return {k: (np.asarray(v) >= 0).astype(np.float32) for k, v in encoded.items()}

    def decode_leaf(self, indices: Iterable[int]) -> list[str]:
        return [self.leaves[int(i)] for i in indices]

    # ------------------------------------------------------------------ matrices
    def level_matrix(self, k: int) -> np.ndarray:
        """(n_leaves, len(levels[k-1])) 0/1 matrix: leaf -> its ancestor at level ``k``.

        ``leaf_probs @ level_matrix(k)`` gives the level-k distribution; rows of leaves
        shallower than ``k`` are zero.
        """
        names = self.levels[k - 1]
        m = np.zeros((len(self.leaves), len(names)), dtype=np.float32)
        for i, leaf in enumerate(self.leaves):
            path = self.path(leaf)
            if len(path) >= k:
                m[i, names.index(path[k - 1])] = 1.0
        return m

    def level_probabilities(self, leaf_probs, k: int) -> np.ndarray:
        """Level-``k`` distribution ``leaf_probs @ level_matrix(k)`` (NumPy): each node's
        probability is the sum over the leaves below it (0 for leaves shallower than
        ``k``).  Computed in the dtype of ``leaf_probs`` (float64 for non-float input);
        :meth:`level_probabilities_tf` is the same in a TensorFlow graph."""
        p = np.asarray(leaf_probs)
        if p.dtype.kind != "f":
            p = p.astype(np.float64)
        return p @ self.level_matrix(k).astype(p.dtype, copy=False)

    def level_probabilities_tf(self, leaf, k: int):
        """:meth:`level_probabilities` with TensorFlow ops (for exported graphs)."""
        # lazy: the label tree is loaded by `kmedtl data` and on KERAS_BACKEND=jax (no TF)
        import tensorflow as tf

        leaf = tf.convert_to_tensor(leaf)
        return tf.matmul(leaf, tf.constant(self.level_matrix(k), dtype=leaf.dtype))

    def ancestor_matrix(self) -> np.ndarray:
        """(n_leaves, n_nodes) 0/1 matrix over :meth:`all_nodes`: leaf -> itself and ancestors."""
        names = self.all_nodes()
        pos = {n: i for i, n in enumerate(names)}
        m = np.zeros((len(self.leaves), len(names)), dtype=np.float32)
        for i, leaf in enumerate(self.leaves):
            for name in self.path(leaf):
                m[i, pos[name]] = 1.0
        return m

    def all_nodes(self) -> tuple[str, ...]:
        """Every node but the root, breadth-first."""
        return tuple(self._bfs())

    def leaf_probabilities(self, node_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Leaf distribution from per-parent child distributions (product along each path).

        ``node_probs[parent]`` has shape (N, len(children(parent))).  Rows sum to 1 when
        every head's rows do.
        """
        first = np.asarray(node_probs[ROOT])
        out = np.ones((first.shape[0], len(self.leaves)), dtype=np.float64)
        for i, leaf in enumerate(self.leaves):
            path = self.path(leaf)
            for parent, child in zip((ROOT, *path[:-1]), path):
                j = self._nodes[parent].children.index(child)
                out[:, i] *= np.asarray(node_probs[parent])[:, j]
        return out

    # ------------------------------------------------------------------ dunder
    def __eq__(self, other) -> bool:
        return isinstance(other, Hierarchy) and repr(self.to_config()) == repr(other.to_config())

    def __hash__(self):
        return hash(repr(self.to_config()))

    def __repr__(self) -> str:
        return f"Hierarchy(depth={self.depth}, leaves={list(self.leaves)})"


def _normalise(spec: Any, where: str) -> dict:
    """Turn the accepted YAML shapes into nested dicts whose leaves are tuples of raw labels."""
    if isinstance(spec, Hierarchy):
        return spec._spec
    if isinstance(spec, Mapping):
        out = {}
        for key, value in spec.items():
            name = _check_name(key, where)
            out[name] = _normalise_value(value, name, f"{where}.{name}")
        return out
    if isinstance(spec, (list, tuple)):
        out = {}
        for i, item in enumerate(spec):
            if isinstance(item, Mapping) and len(item) == 1:
                (key, value), = item.items()
                name = _check_name(key, f"{where}[{i}]")
                value = _normalise_value(value, name, f"{where}.{name}")
            elif isinstance(item, (str, int)):
                name = _check_name(item, f"{where}[{i}]")
                value = (name,)
            else:
                raise HierarchyError(
                    f"{where}[{i}]: expected a class name or a one-key mapping, got {item!r}"
                )
            if name in out:
                raise HierarchyError(f"{where}: class {name!r} is listed twice")
            out[name] = value
        return out
    raise HierarchyError(
        f"{where}: expected a mapping (tree) or a list (flat classes), got {type(spec).__name__}"
    )


def _normalise_value(value, name, where):
    if value is None:
        return (name,)
    if isinstance(value, (str, int)):
        return (str(value),)
    if isinstance(value, Mapping):
        if not value:
            raise HierarchyError(f"{where}: an internal node needs at least one child")
        return _normalise(value, where)
    if isinstance(value, (list, tuple)):
        if not value:
            raise HierarchyError(f"{where}: a leaf needs at least one raw label (or null)")
        if all(isinstance(v, (str, int)) for v in value):
            return tuple(str(v) for v in value)
        raise HierarchyError(
            f"{where}: a list holds the raw labels of leaf {name!r} and must contain strings "
            "only; write children as a mapping, e.g. {glioma: [glioma_tumor]}"
        )
    raise HierarchyError(f"{where}: unsupported value {value!r}")


def _node_name(raw: str) -> str:
    """A valid node name for a raw label (characters outside the allowed set become
    ``_``), for suggestions."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(raw)) or "_"


def _check_name(key, where) -> str:
    name = str(key)
    if not _NAME_RE.match(name):
        raise HierarchyError(
            f"{where}: node name {name!r} may contain only letters, digits, '_', '.' and '-' "
            "(outputs and layers are named after nodes)"
        )
    if name in _RESERVED:
        raise HierarchyError(f"{where}: node name {name!r} is reserved; choose another")
    return name
