"""The runnable examples in kmedtl.export and kmedtl.serving docstrings stay correct."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import kmedtl.export
import kmedtl.serving

MODULES = sorted([f"kmedtl.export.{m.name}" for m in pkgutil.iter_modules(kmedtl.export.__path__)]
                 + [f"kmedtl.serving.{m.name}"
                    for m in pkgutil.iter_modules(kmedtl.serving.__path__)]
                 + ["kmedtl.export", "kmedtl.serving"])


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
