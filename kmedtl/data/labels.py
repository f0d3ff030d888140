"""Labels that match nothing, and classes that get nothing, are errors.

A one-letter typo in the hierarchy YAML (a leaf written ``[Ss]`` where the folder is
``S``) used to turn a whole class into ``unknown_label`` skips and train a model with an
empty leaf.  :func:`check_labels` runs after the decode pass (so "usable" means "decoded")
and before anything is split or trained:

- a hierarchy leaf with zero usable images is an error naming the leaf and the nearest
  folder/label names found in the data ("did you mean 'S'?");
- labels found in the data but absent from the hierarchy are an error too, unless
  ``data.unknown_labels: skip`` is set explicitly; then their per-label counts are
  returned as notes for the console.

Every message is one line per problem and says what to change.
"""

from __future__ import annotations

import difflib
from collections import Counter

from kmedtl.errors import HierarchyError


class LabelMismatchError(HierarchyError):
    """The hierarchy and the labels found in the data do not match (see the message)."""


def unknown_label_counts(index) -> Counter:
    """Entries skipped because their label is not in the hierarchy, per raw label."""
    seen: dict[str, set] = {}
    for s in index.skipped:
        if s.kind == "unknown_label":
            seen.setdefault(s.label or "?", set()).add(s.entry_key)
    return Counter({label: len(entries) for label, entries in seen.items()})


def nearest(names, candidates, n: int = 3) -> list[str]:
    """Candidates closest to any of ``names`` (case-insensitive), best first."""
    lower = {c.lower(): c for c in candidates}
    scored: dict[str, float] = {}
    for name in names:
        for c in candidates:
            if c.lower() == name.lower():
                scored[c] = max(scored.get(c, 0.0), 1.0)
        for hit in difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5):
            ratio = difflib.SequenceMatcher(None, name.lower(), hit).ratio()
            scored[lower[hit]] = max(scored.get(lower[hit], 0.0), ratio)
    return [c for c, _ in sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))][:n]


def _quoted(names) -> str:
    return ", ".join(repr(x) for x in names)


def check_labels(index, hierarchy, unknown_labels: str = "error",
                 field: str = "data.hierarchy") -> list[str]:
    """Raise :class:`LabelMismatchError` when a leaf has no usable sample or (with
    ``unknown_labels="error"``) a label is not in the hierarchy; return console notes.

    ``index`` is the index *after* the decode pass (undecodable files dropped).
    """
    used = Counter(hierarchy.leaf_of(s.label) for s in index.samples if s.label is not None)
    raw_used = Counter(s.label for s in index.samples if s.label is not None)
    unknown = unknown_label_counts(index)
    found = sorted(set(raw_used) | set(unknown))
    problems, notes = [], []
    raw_of: dict[str, list[str]] = {}
    for raw, leaf in hierarchy.raw_labels.items():
        raw_of.setdefault(leaf, []).append(raw)
    for leaf in hierarchy.leaves:
        if used[leaf]:
            continue
        names = sorted(set(raw_of.get(leaf, [])) | {leaf})
        pool = sorted(unknown) or [x for x in found if x not in names]
        close = nearest(names, pool)
        line = (f"{field}: leaf {leaf!r} (labels {_quoted(names)}) has no usable images")
        if close:
            extra = ", ".join(f"{c!r} ({unknown[c]} file(s) not in the hierarchy)"
                              if c in unknown else repr(c) for c in close)
            line += f"; did you mean {close[0]!r}? nearest labels in the data: {extra}"
        elif found:
            line += f"; labels in the data: {_quoted(found)}"
        else:
            line += "; the data has no labelled images"
        problems.append(line + "; fix the hierarchy YAML or remove the leaf")
    if unknown:
        counts = ", ".join(f"{k!r} {v}" for k, v in sorted(unknown.items()))
        total = sum(unknown.values())
        if unknown_labels == "error":
            problems.append(
                f"{field}: {total} file(s) have labels that are not in the hierarchy "
                f"({counts}); add them to the hierarchy YAML, or set data.unknown_labels: "
                "skip (kmedtl data audit: --unknown-labels skip) to leave them out on purpose")
        else:
            notes.append(f"data.unknown_labels: skip: left out {total} file(s) whose labels "
                         f"are not in the hierarchy: {counts}")
    if problems:
        raise LabelMismatchError("\n".join(problems))
    return notes
