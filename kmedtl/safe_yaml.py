"""YAML written by users, parsed with limits (issue 21).

PyYAML's ``SafeLoader`` builds no Python objects from tags, but it follows aliases by
reference, so a few hundred bytes of ``&a [*b, *b, ...]`` stand for billions of values:
whatever walks the result (``${VAR}`` expansion, validation, a copy) pays for all of them.
Its composer also recurses once per nesting level, so a file of 5,000 ``[`` ends in a
``RecursionError``.  :func:`load_yaml` is ``yaml.safe_load`` with three limits, each a
:class:`~kmedtl.errors.ConfigError` that names the file, the line, the limit and the
environment variable that raises it:

- ``KMEDTL_YAML_MAX_DEPTH`` (default 64): nesting depth, aliases followed;
- ``KMEDTL_YAML_MAX_ALIASES`` (default 100): aliases (``*name``) in one file;
- ``KMEDTL_YAML_MAX_NODES`` (default 200,000): values once every alias is followed (an
  alias used twice counts its values twice).

Aliases and merge keys (``<<: *base``) stay allowed within those limits: a study file may
share its recipe between arms.  Every reader of user YAML in kmedtl (run config, pipeline,
hierarchy, study, ``--set`` values, a run folder's ``config.yaml``, ``kmedtl init``) goes
through here.  This module imports only PyYAML, so :mod:`kmedtl.hierarchy` can use it.

    >>> load_yaml("base: &b {lr: 0.1}\\narm: {<<: *b, name: a}\\n", "x.yaml")["arm"]
    {'lr': 0.1, 'name': 'a'}
"""

from __future__ import annotations

import os

import yaml

from kmedtl.errors import ConfigError

#: name of the environment variable -> default
LIMITS = {"KMEDTL_YAML_MAX_DEPTH": 64, "KMEDTL_YAML_MAX_ALIASES": 100,
          "KMEDTL_YAML_MAX_NODES": 200_000}


def limit(name: str) -> int:
    """The limit ``name`` (a key of :data:`LIMITS`): the environment's value or the default."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return LIMITS[name]
    try:
        value = int(raw.replace("_", "").replace(",", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name}={raw!r}: give a whole number >= 1 (default "
                          f"{LIMITS[name]:,})")
    return value


def _hint(name: str, value: int) -> str:
    return (f"the limit is {name}={value:,}; raise it (export {name}=...) only for a file "
            "you trust")


def too_many_nodes(label: str, value: int) -> ConfigError:
    return ConfigError(f"{label}: expands to more than {value:,} values once its aliases "
                       f"are followed (an alias bomb?); {_hint('KMEDTL_YAML_MAX_NODES', value)}")


def too_deep(label: str, value: int, where: str = "") -> ConfigError:
    return ConfigError(f"{label}: nested more than {value} levels deep{where}; "
                       f"{_hint('KMEDTL_YAML_MAX_DEPTH', value)}")


def self_reference(label: str, where: str = "") -> ConfigError:
    return ConfigError(f"{label}: a value refers to itself{where} (a recursive alias); "
                       "write it out instead")


class _LimitedLoader(yaml.SafeLoader):
    """``SafeLoader`` whose composer counts nesting and aliases as it goes."""

    def __init__(self, stream, label: str, max_depth: int, max_aliases: int):
        super().__init__(stream)
        self._label, self._max_depth, self._max_aliases = label, max_depth, max_aliases
        self._depth = self._aliases = 0

    def _at(self) -> str:
        mark = self.peek_event().start_mark
        return f" (line {mark.line + 1})" if mark is not None else ""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > self._max_aliases:
                anchor = self.peek_event().anchor
                raise ConfigError(
                    f"{self._label}: uses more than {self._max_aliases} aliases (*{anchor}"
                    f"{self._at()}); write the values out, or: "
                    f"{_hint('KMEDTL_YAML_MAX_ALIASES', self._max_aliases)}")
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise too_deep(self._label, self._max_depth, self._at())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _measure(root, label: str, max_depth: int, max_nodes: int) -> None:
    """Refuse a composed node graph whose expansion (aliases followed) is too big or too
    deep, or that contains itself.  Iterative: the graph may be deeper than Python's
    recursion limit once aliases are followed."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack = [(root, False)]
    open_ids: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_ids.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > max_nodes:
                raise too_many_nodes(label, max_nodes)
            if depth[key] > max_depth:
                raise too_deep(label, max_depth, f" (line {node.start_mark.line + 1}, "
                                                 "aliases followed)")
            continue
        if key in size:
            continue
        if key in open_ids:
            raise self_reference(label, f" (line {node.start_mark.line + 1})")
        open_ids.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_yaml(text: str, label: str, *, max_depth: int | None = None,
              max_aliases: int | None = None, max_nodes: int | None = None):
    """``yaml.safe_load(text)`` within the limits above (``None``: the environment's or
    the default).  ``label`` (a file name, ``--set KEY``) starts every error message.
    Invalid YAML is a :class:`ConfigError` ``"<label>: not valid YAML: ..."``."""
    max_depth = max_depth or limit("KMEDTL_YAML_MAX_DEPTH")
    max_aliases = max_aliases or limit("KMEDTL_YAML_MAX_ALIASES")
    max_nodes = max_nodes or limit("KMEDTL_YAML_MAX_NODES")
    loader = _LimitedLoader(text, label, max_depth, max_aliases)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, label, max_depth, max_nodes)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML: {exc}") from None
    except RecursionError:  # belt and braces: the depth limit set above Python's own
        raise too_deep(label, max_depth) from None
    finally:
        loader.dispose()
