"""The runnable examples in kmedtl.evaluation docstrings stay correct."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import kmedtl.evaluation

MODULES = ["__init__"] + sorted(m.name for m in pkgutil.iter_modules(
    kmedtl.evaluation.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = kmedtl.evaluation if name == "__init__" else importlib.import_module(
        f"kmedtl.evaluation.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
