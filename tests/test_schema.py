"""One config schema base (:class:`kmedtl.schema.Strict`) and one error formatter
(:func:`kmedtl.schema.format_validation_error`): every config family -- the run config,
the ``pipeline:`` section, the ``train:`` section and the study file -- words an unknown
field and a wrong type the same way, naming the file and the dotted field path."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from kmedtl.config import load_config
from kmedtl.errors import ConfigError
from kmedtl.pipeline import load_pipeline
from kmedtl.schema import Strict, format_validation_error, model_at, validate
from kmedtl.study.config import load_study

PACKAGE = Path(__file__).resolve().parents[1] / "kmedtl"
STUDY = {"name": "s", "data": {"root": ".", "hierarchy": {"a": None, "b": None}},
         "arms": [{"name": "a"}, {"name": "b"}]}


def _write(tmp_path, doc: dict, name="c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _message(load, path) -> str:
    with pytest.raises(ConfigError) as err:
        load(path)
    return str(err.value)


def _check(msg: str, path: Path, unknown: str, allowed: list[str], wrong: str, got: str):
    """The one format: ``<file>: invalid config:``, then ``  <path>: <what> (got ...)``."""
    lines = msg.splitlines()
    assert lines[0] == f"{path}: invalid config:", msg
    line = next((x for x in lines
                 if x.startswith(f"  {unknown}: unknown field; allowed fields here: [")), None)
    assert line is not None, msg
    for name in allowed:
        assert repr(name) in line, (name, line)
    assert any(x.startswith(f"  {wrong}: Input should be ") and x.endswith(f"(got {got})")
               for x in lines), msg
    assert "Value error" not in msg


# ------------------------------------------------------------------------------ families
def test_run_config_errors(tmp_path):
    path = _write(tmp_path, {"data": {"root": "x", "colour": 3},
                             "split": {"k": "five"}})
    _check(_message(load_config, path), path, "data.colour", ["root", "cache_dir", "image"],
           "split.k", "'five'")


def test_pipeline_section_errors(tmp_path):
    path = _write(tmp_path, {"data": {"root": "x"},
                             "pipeline": {"export": {"formatz": ["onnx"]},
                                          "evaluate": {"n_boot": "many"}}})
    _check(_message(load_pipeline, path), path, "pipeline.export.formatz",
           ["formats", "opset", "verify"], "pipeline.evaluate.n_boot", "'many'")


def test_train_section_errors(tmp_path):
    path = _write(tmp_path, {"data": {"root": "x"},
                             "train": {"epochz": 3, "tune": {"max_trials": "ten"}},
                             "pipeline": {"stages": ["audit"]}})
    msg = _message(load_pipeline, path)
    _check(msg, path, "train.epochz", ["epochs", "learning_rate", "tune"],
           "train.tune.max_trials", "'ten'")
    assert "'output_dir'" not in msg  # the train section's fields, not the file's sections


def test_study_errors(tmp_path):
    path = _write(tmp_path, {**STUDY, "grid": {"sizez": [5]},
                             "evaluation": {"n_boot": "many"}}, "s.yaml")
    _check(_message(load_study, path), path, "grid.sizez", ["seeds", "sizes"],
           "evaluation.n_boot", "'many'")


def test_study_unknown_field_in_a_named_entry_lists_that_entrys_fields(tmp_path):
    path = _write(tmp_path, {**STUDY, "pretrain": {"p": {"colour": 1}}}, "s.yaml")
    msg = _message(load_study, path)
    line = next(x for x in msg.splitlines() if "pretrain.p.colour" in x)
    assert "unknown field" in line and "'temperature'" in line and "'arms'" not in line


# ------------------------------------------------------------------------------ formatter
def test_union_alternatives_are_one_line_without_type_tags(tmp_path):
    path = _write(tmp_path, {"data": {"root": "x", "image": {"size": "big"},
                                      "hierarchy": 3}})
    lines = _message(load_config, path).splitlines()
    size = [x for x in lines if "data.image.size" in x]
    assert len(size) == 1, lines
    assert size[0].startswith("  data.image.size: Input should be a valid integer")
    assert ", or Input should be a valid tuple" in size[0]
    assert size[0].endswith("(got 'big')") and size[0].count("(got") == 1
    assert any(x.startswith("  data.hierarchy: ") for x in lines)
    assert not re.search(r"\.(int|str|tuple\[|list\[|dict\[|literal\[)", "\n".join(lines))


def test_model_level_errors_name_the_section():
    class Inner(Strict):
        a: int = 0

    class Outer(Strict):
        inner: Inner = Inner()
        named: dict[str, Inner] = {}

    with pytest.raises(ConfigError) as err:
        validate(Outer, {"inner": {"b": 1}, "named": {"x": {"c": 2}}}, "f.yaml", ("top",))
    lines = str(err.value).splitlines()
    assert lines[0] == "f.yaml: invalid config:"
    assert "  top.inner.b: unknown field; allowed fields here: ['a']" in lines
    assert "  top.named.x.c: unknown field; allowed fields here: ['a']" in lines
    assert model_at(Outer, ("named", "x")) is Inner and model_at(Outer, ("nope",)) is Outer


def test_formatter_strips_value_error_prefix():
    from pydantic import ValidationError, model_validator

    class M(Strict):
        n: int = 1

        @model_validator(mode="after")
        def _check(self):
            raise ValueError("n is wrong; set n: 2")

    with pytest.raises(ValidationError) as err:
        M.model_validate({})
    text = format_validation_error("m.yaml", err.value, M, ("sec",))
    assert text.splitlines() == ["m.yaml: invalid config:", "  sec: n is wrong; set n: 2"]


# ------------------------------------------------------------------------------ one base
def _direct_pydantic_models(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
                if name == "BaseModel":
                    names.append(node.name)
    return names


def _reads_validation_errors(tree: ast.AST) -> bool:
    """Calls ``<exc>.errors()``: words a pydantic ValidationError itself."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr == "errors" and not n.args and not n.keywords
               for n in ast.walk(tree))


def test_one_strict_base_and_one_error_formatter():
    tree = ast.parse((PACKAGE / "schema.py").read_text())
    assert _direct_pydantic_models(tree) == ["Strict"]
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "schema.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(PACKAGE.parent))
        offenders += [f"{rel}: class {c}(BaseModel)" for c in _direct_pydantic_models(tree)]
        if _reads_validation_errors(tree):
            offenders.append(f"{rel}: formats ValidationError.errors() itself")
    # >>> EXPECTED TO FAIL until kmedtl/training/config.py derives from kmedtl.schema.Strict
    # >>> and words its errors with kmedtl.schema (its _Strict and _errors are the offenders)
    assert offenders == [], offenders


def test_the_train_stage_validates_the_train_section_once(monkeypatch):
    """load_pipeline validates ``train``; the train stage, run_training and the Trainer use
    that object instead of validating the mapping again."""
    import kmedtl.training.trainer as trainer_mod
    from kmedtl.models import FlatClassifier, backbone
    from kmedtl.training import Trainer, train_section

    tc = train_section({"backbone": "cbr_tiny", "epochs": 1})
    model = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 2)
    calls = []
    monkeypatch.setattr(trainer_mod, "train_section",
                        lambda *a, **k: calls.append(a) or train_section(*a, **k))
    t = Trainer(model, tc)
    assert t.cfg is tc and calls == []
    assert Trainer(model, tc, epochs=3).cfg.epochs == 3  # overrides: a new section
    assert len(calls) == 1
