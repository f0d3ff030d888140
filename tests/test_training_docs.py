"""The runnable examples in kmedtl.training docstrings stay correct."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import kmedtl.training

MODULES = sorted(m.name for m in pkgutil.iter_modules(kmedtl.training.__path__))


@pytest.mark.parametrize("name", [  # these two train models in their examples
    pytest.param(m, marks=pytest.mark.slow) if m in ("lr_finder", "trainer") else m
    for m in MODULES])
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"kmedtl.training.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
