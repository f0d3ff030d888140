"""The config-schema base: the one strict pydantic base of every typed config section, and
the one way their validation errors are worded.

Every YAML-facing model in kmedtl (:mod:`kmedtl.config`, :mod:`kmedtl.pipeline.spec`,
:mod:`kmedtl.study.config`, :mod:`kmedtl.training.config`) derives from :class:`Strict`
and is validated through :func:`validate`, so a typo or a wrong type reads the same in
every file::

    pipelines/demo.yaml: invalid config:
      pipeline.export.formatz: unknown field; allowed fields here: ['formats', 'opset', ...]
      data.image.channels: Input should be 1 or 3 (got 2)

i.e. the file (``label``), then one line per error: the dotted field path from the top of
the file, what is wrong, what was given and -- for an unknown field -- the fields allowed
there.

This module imports nothing from kmedtl but :mod:`kmedtl.errors`, so any config module
can use it without an import cycle.
"""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from kmedtl.errors import ConfigError

__all__ = ["Strict", "format_validation_error", "model_at", "validate"]


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors (``extra="forbid"``, so a typo
    is never silently ignored) and defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# pydantic adds one location part per union member it tried ("int", "tuple[int, int]",
# "literal['a','b']", "dict[any,any]", "function-after[...]", ...); those name the type,
# not a field the user wrote, so they are left out of the field path.
_UNION_TAG = re.compile(r"^(?:int|float|str|bool|bytes|none|[a-z][a-z-]*\[.*\])$", re.DOTALL)


def _field_path(loc) -> tuple:
    return tuple(p for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p)))


def _model_in(annotation) -> tuple[type[BaseModel], bool] | None:
    """The model an annotation holds: ``(Model, False)`` for ``Model``/``Model | None``,
    ``(Model, True)`` for ``dict[str, Model]``/``list[Model]`` (one key/index part
    between), else ``None``."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return _model_in(inner[0]) if len(inner) == 1 else None
    if origin in (dict, list):
        args = get_args(annotation)
        found = _model_in(args[-1]) if args else None
        return (found[0], True) if found and not found[1] else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None


def model_at(root: type[BaseModel], loc) -> type[BaseModel]:
    """The (sub)model of ``root`` that the location ``loc`` points into (so an error about
    an unknown field can list the fields allowed there)."""
    model = root
    parts = iter(_field_path(loc))
    for part in parts:
        field = model.model_fields.get(str(part))
        found = _model_in(field.annotation) if field is not None else None
        if found is None:
            break
        model, keyed = found
        if keyed and next(parts, None) is None:  # the dict key / list index
            break
    return model


def format_validation_error(label: str, exc: ValidationError, root: type[BaseModel],
                            prefix: tuple = ()) -> str:
    """``exc`` (from validating ``root``) as one message: ``"<label>: invalid config:"``
    and one line per error, ``"  <path>: <what is wrong> (got <value>)"``.

    ``label`` names the file (or the flag, or ``"config"``); ``prefix`` is where ``root``
    sits in that file (``("pipeline",)`` for the ``pipeline:`` section) and starts every
    path.  An unknown field lists the fields allowed beside it; the alternatives of a
    union field are merged into one line.
    """
    lines = [f"{label}: invalid config:"]
    seen: dict[str, int] = {}
    for err in exc.errors():
        rel = _field_path(err["loc"])
        path = ".".join(str(p) for p in (*prefix, *rel))
        head = f"  {path}: " if path else "  "
        if err["type"] == "extra_forbidden":
            allowed = sorted(model_at(root, rel[:-1]).model_fields)
            lines.append(f"{head}unknown field; allowed fields here: {allowed}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        given_s = f" (got {given!r})" if not isinstance(given, dict) else ""
        if path in seen:  # a union field: merge the alternatives into one line
            lines[seen[path]] = lines[seen[path]].replace(given_s, "") + f", or {msg}{given_s}"
            continue
        seen[path] = len(lines)
        lines.append(f"{head}{msg}{given_s}")
    return "\n".join(lines)


def validate(root: type[BaseModel], data: Any, label: str, prefix: tuple = ()):
    """``root.model_validate(data)``; a :class:`~kmedtl.errors.ConfigError` worded by
    :func:`format_validation_error` when it fails."""
    try:
        return root.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(label, exc, root, prefix)) from None
