"""``kmedtl.run_folder.RunFolder`` on a tiny trained run (built like the evaluation tests'),
the label-tree rule, the model's input shape, atomic JSON and the one level-probability
function."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_evaluation_run import HIER, SIZE, build_run

from kmedtl.errors import ConfigError, HierarchyError
from kmedtl.hierarchy import Hierarchy
from kmedtl.jsonio import json_safe, read_json, write_json
from kmedtl.run_folder import RunFolder, model_input_shape


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run, data = build_run(tmp_path_factory.mktemp("runfolder"), n_per_class=8)
    return run, data


def _copy(run, dest, *, drop=(), config=None):
    """A copy of the run folder without ``drop``; ``config(raw) -> raw`` edits config.yaml."""
    shutil.copytree(run, dest)
    for name in drop:
        (dest / name).unlink()
    if config is not None:
        raw = yaml.safe_load((dest / "config.yaml").read_text())
        (dest / "config.yaml").write_text(yaml.safe_dump(config(raw)))
    return dest


@pytest.mark.slow
def test_run_folder_reads_each_artefact_once(tiny):
    run, _ = tiny
    rf = RunFolder(run)
    assert rf.config_path == run / "config.yaml" and rf.model_path == run / "model.keras"
    assert rf.splits_path == run / "splits.json" and rf.export_dir == run / "export"
    assert rf.config.name == "tiny" and rf.name == "tiny"
    assert rf.model is rf.model  # loaded once
    assert rf.image_options.shape == (SIZE, SIZE, 1)
    assert rf.input_shape == (SIZE, SIZE, 1)
    assert rf.normalization == "unit"
    assert rf.hierarchy == Hierarchy(HIER) and rf.check_outputs() is rf.hierarchy
    assert rf.fold == 0 and rf.train_metrics == {"fold": 0}
    assert rf.temperature == 1.0 and rf.calibration is None
    assert rf.audit["counts"]["used"] == 24
    splits = json.loads((run / "splits.json").read_text())
    for part in ("train", "val", "test"):
        samples = rf.split_samples(part)
        assert len(samples) == len(splits["folds"][0][part]) > 0
        assert all(rf.hierarchy.leaf_of(s.label) for s in samples)
    missing = []
    assert rf.split_samples("test", 0, missing=missing) and missing == []
    with pytest.raises(ConfigError, match="fold 3"):
        rf.split_samples("test", 3)


@pytest.mark.slow
def test_hierarchy_rule_model_then_config_then_data_then_audit(tiny, tmp_path):
    run, _ = tiny
    flat = ["normal", "glioma", "pituitary"]
    # 1. the model's own tree wins over a (different) config tree
    a = _copy(run, tmp_path / "a", config=lambda raw: {**raw, "data": {**raw["data"],
                                                                       "hierarchy": flat}})
    assert RunFolder(a).hierarchy == Hierarchy(HIER)
    # 2. without a model: the config's
    b = _copy(run, tmp_path / "b", drop=["model.keras"],
              config=lambda raw: {**raw, "data": {**raw["data"], "hierarchy": flat}})
    assert RunFolder(b).hierarchy == Hierarchy.flat(flat)
    # 3. without either: the labels found in the configured data
    def no_tree(raw):
        raw["data"].pop("hierarchy")
        return raw

    c = _copy(run, tmp_path / "c", drop=["model.keras"], config=no_tree)
    assert RunFolder(c).hierarchy.leaves == ("glioma_tumor", "no_tumor", "pituitary_tumor")

    # 4. data gone: the classes audit.json counted
    def no_data(raw):
        raw = no_tree(raw)
        raw["data"]["root"] = str(tmp_path / "nowhere")
        return raw

    d = _copy(run, tmp_path / "d", drop=["model.keras"], config=no_data)
    by_class = json.loads((d / "audit.json").read_text())["counts"]["by_class"]
    assert RunFolder(d).hierarchy == Hierarchy.flat(sorted(by_class))


@pytest.mark.slow
def test_input_shape_comes_from_the_model_and_must_match_the_config(tiny, tmp_path):
    from kmedtl.export.errors import ExportError
    from kmedtl.export.model import load_run

    run, _ = tiny
    bad = _copy(run, tmp_path / "bad", config=lambda raw: {
        **raw, "data": {**raw["data"], "image": {"size": 48, "channels": 1}}})
    with pytest.raises(ConfigError, match=r"\(32, 32, 1\).*\(48, 48, 1\).*data.image.size"):
        _ = RunFolder(bad).input_shape
    with pytest.raises(ExportError, match="image options"):
        load_run(bad)
    ctx = load_run(run)
    assert ctx.input_shape == (SIZE, SIZE, 1) and ctx.folder.path == run
    assert ctx.hierarchy == Hierarchy(HIER) and ctx.node_outputs == ["root", "tumor"]

    class Open:  # a model whose spatial size is open takes it from the options
        input_shape = (None, None, None, 3)

    class Opts:
        shape = (64, 64, 3)

    assert model_input_shape(Open(), Opts()) == (64, 64, 3)
    with pytest.raises(ConfigError, match="open"):
        model_input_shape(Open())

    class Two:
        input_shape = [(None, 8, 8, 1), (None, 8, 8, 1)]

    with pytest.raises(ConfigError, match="2 inputs"):
        model_input_shape(Two())


@pytest.mark.slow
def test_keras_predictor_metadata_comes_from_the_run_folder(tiny):
    from kmedtl.export.predictors import find_metadata, load_predictor

    run, _ = tiny
    info = find_metadata(run / "model.keras")
    assert info.hierarchy == Hierarchy(HIER) and tuple(info.options.shape) == (SIZE, SIZE, 1)
    p = load_predictor(run / "model.keras")
    out = p.predict_pixels(np.zeros((2, SIZE, SIZE, 1), np.float32))
    assert set(out) == set(Hierarchy(HIER).exported_output_names(["root", "tumor"]))


def test_json_writes_are_atomic_and_strict(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": np.float32(0.5), "b": [float("nan"), np.int64(3)],
                      "c": np.arange(2)})
    assert read_json(path) == {"a": 0.5, "b": [None, 3], "c": [0, 1]}
    assert not (tmp_path / "m.json.tmp").exists()
    with pytest.raises(TypeError):  # a failed write keeps the old file and no temp file
        write_json(path, {"x": object()})
    assert read_json(path)["a"] == 0.5 and not (tmp_path / "m.json.tmp").exists()
    write_json(path, {"t": (1, 2), "o": object}, strict=False, default=str)
    assert read_json(path) == {"t": [1, 2], "o": str(object)}
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: unreadable JSON"):
        read_json(tmp_path / "broken.json")
    with pytest.raises(KeyError):
        read_json(tmp_path / "broken.json", error=KeyError)
    assert json_safe({1: float("inf")}) == {"1": None}
    rf = RunFolder(tmp_path)
    rf.write_json("x.json", {"v": 1})
    assert rf.read_json("x.json") == {"v": 1}


DEEP = {"normal": None,
        "disease": {"benign": {"cyst": None, "lipoma": None}, "malignant": None}}


def test_level_probabilities_numpy_and_graph_agree():
    import tensorflow as tf

    h = Hierarchy(DEEP)  # leaves: normal (depth 1), cyst, lipoma (depth 3), malignant (2)
    assert h.leaves == ("normal", "cyst", "lipoma", "malignant")
    leaf = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], np.float32)
    l1 = h.level_probabilities(leaf, 1)
    np.testing.assert_allclose(l1, [[0.1, 0.9], [0.7, 0.3]], rtol=1e-6)
    assert l1.dtype == np.float32
    l2 = h.level_probabilities(leaf.astype(np.float64), 2)  # benign, malignant
    assert l2.dtype == np.float64
    np.testing.assert_allclose(l2, [[0.5, 0.4], [0.2, 0.1]], rtol=1e-6)
    l3 = h.level_probabilities(leaf, 3)  # shallower leaves add nothing
    np.testing.assert_allclose(l3, [[0.2, 0.3], [0.1, 0.1]], rtol=1e-6)
    assert h.level_probabilities([[0, 1, 0, 0]], 1).dtype == np.float64
    for k in (1, 2, 3):
        np.testing.assert_allclose(h.level_probabilities_tf(tf.constant(leaf), k).numpy(),
                                   h.level_probabilities(leaf, k), rtol=1e-6)


def test_output_names_come_from_the_hierarchy():
    from kmedtl.export.errors import ExportError
    from kmedtl.export.model import class_names, output_names

    h = Hierarchy({"a.b": None, "c": {"d": None, "e": None}})
    assert h.exported_node_name("a.b") == "node_a_b" and h.exported_node_name("root") == \
        "node_root"
    names = h.exported_output_names(["root", "c"])
    assert names == ["leaf", "calibrated", "level_1", "level_2", "node_root", "node_c",
                     "label", "label_index", "confidence"] == output_names(h, ["root", "c"])
    assert class_names(h, ["c"]) == h.exported_class_names(["c"])
    assert h.exported_class_names(["c"])["node_c"] == ["d", "e"]
    assert h.node_target_name("c") == "node:c" and "node:c" in h.encode(["d"])
    clash = Hierarchy({"x-y": {"p": None, "q": None}, "x_y": {"r": None, "s": None}})
    with pytest.raises(HierarchyError, match="clashing"):
        clash.exported_output_names(["x-y", "x_y"])
    with pytest.raises(ExportError, match="clashing"):
        output_names(clash, ["x-y", "x_y"])


# ---------------------------------------------------------------------------- training side
TRAINING_SOURCES = sorted((Path(__file__).resolve().parents[1] / "kmedtl" / "training")
                          .glob("*.py"))
#: (module file, name) pairs allowed to spell a run-folder name: user-facing help text of
#: modules that write nothing there themselves.
SPELLING_ALLOWED = {("cli.py", RunFolder.LR_FIND_PNG)}


def _layout_names() -> tuple[set[str], set[str]]:
    """RunFolder's file names (with a dot) and folder names, ``{...}`` fields as ``{}``."""
    names = {re.sub(r"\{\w*\}", "{}", v) for k, v in vars(RunFolder).items()
             if k.isupper() and isinstance(v, str)}
    return {n for n in names if "." in n}, {n for n in names if "." not in n}


def _string_literals(tree) -> list[tuple[int, str]]:
    """``(line, text)`` of every string literal that is not a docstring or a bare string
    statement; an f-string's text has ``{}`` for each field."""
    skip = {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, (ast.Constant,
                                                                      ast.JoinedStr))}
    inner = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
             for v in node.values}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip or id(node) in inner:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            out.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}"
                                             for v in node.values)))
    return out


#: folder names that are also plain words of kmedtl's vocabulary (the config section
#: ``data``, train_metrics.json's ``stages``): flagged only inside a path ``a/b``
WORDS = {RunFolder.DATA_DIR, RunFolder.STAGES_DIR}


def _spelt(text: str, files: set[str], dirs: set[str]) -> set[str]:
    """The run-folder names a literal spells: a file name anywhere, a folder name as the
    whole literal or as a component of a path-like one (no blanks)."""
    found = {n for n in files if re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", text)}
    if not re.search(r"\s", text):
        parts = text.strip("/").split("/")
        found |= {n for n in dirs if n in parts and (len(parts) > 1 or n not in WORDS)}
    return found


def test_training_spells_no_run_folder_name():
    """kmedtl/training/*.py builds every run-folder path through RunFolder: no string
    literal outside docstrings and comments names one of its files or folders."""
    files, dirs = _layout_names()
    assert {"config.yaml", "model.keras", "train_metrics.json", "history.csv", "splits.json",
            "audit.json", "best.weights.h5", "stage_{}.weights.h5", "state.json",
            "best_config.yaml", "lr_find.png"} <= files
    assert {"checkpoints", "backup", "logs", "tuning", "phase_{}"} <= dirs
    snippet = ('"""model.keras"""\n'  # the checker: docstrings and comments are skipped
               'def f(run):\n    """See ``backup/``."""  # history.csv\n'
               '    return f"{run}/checkpoints", run / "audit.json", {"backup": 1}\n')
    assert sorted(_string_literals(ast.parse(snippet))) == [
        (4, "audit.json"), (4, "backup"), (4, "{}/checkpoints")]
    assert _spelt("{}/checkpoints", files, dirs) == {"checkpoints"}
    assert _spelt("see train_metrics.json", files, dirs) == {"train_metrics.json"}
    assert _spelt("no backup left", files, dirs) == set()
    assert _spelt("data", files, dirs) == set() and _spelt("data/x", files, dirs) == {"data"}
    found = []
    for path in TRAINING_SOURCES:
        for line, text in _string_literals(ast.parse(path.read_text(), str(path))):
            for name in _spelt(text, files, dirs):
                if (path.name, name) not in SPELLING_ALLOWED:
                    found.append(f"{path.name}:{line}: {name!r} in {text!r}")
    assert not found, "run-folder names spelt outside kmedtl/run_folder.py:\n" + \
        "\n".join(found)


@pytest.mark.slow
def test_training_run_writes_every_file_where_run_folder_says(tmp_path):
    from test_training_helpers import write_config

    from kmedtl.config import load_config
    from kmedtl.training import run_training
    from kmedtl.training.stage import prepare_run_dir

    cfg = load_config(write_config(tmp_path, name="rf", train={
        "model": "flat", "epochs": 2, "strategy": "gradual", "unfreeze_at": [0.5]}))
    rf = RunFolder.for_config(cfg)
    assert rf.path == tmp_path / "runs" / "rf"
    result = run_training(cfg)
    assert result.run_dir == str(rf.path) and len(result.phases) == 2
    paths = rf.training_paths()
    for key in ("best", "last", "history", "model", "metrics"):
        assert paths[key].is_file(), key
    assert paths["model"] == rf.model_path and paths["metrics"] == rf.train_metrics_path
    assert paths["best"].parent == paths["last"].parent == rf.checkpoints_dir
    for key in ("state", "phase_weights", "phase_weights_tmp"):  # finished: nothing to resume
        assert paths[key].parent == rf.backup_dir and not paths[key].exists(), key
    assert rf.backup_dir.is_dir() and not any(rf.backup_dir.iterdir())
    assert paths["logs_dir"] == rf.logs_dir and rf.logs_dir.is_dir()
    for p in (rf.config_path, rf.splits_path, rf.audit_path, rf.history_path):
        assert p.is_file(), p
    assert {p.name for p in rf.path.iterdir()} == \
        set(RunFolder.TRAINING_FILES) | set(RunFolder.TRAINING_DIRS)
    assert not [p for p in rf.path.rglob("*") if ".tmp" in p.name]
    assert rf.training_finished and rf.training_state() is None
    # the files' formats: config.yaml as yaml.safe_dump(sort_keys=False), JSON indent=1
    text = rf.config_path.read_text()
    assert text == yaml.safe_dump(yaml.safe_load(text), sort_keys=False)
    assert rf.config.name == "rf" and rf.fold == 0
    for p in (rf.train_metrics_path, rf.audit_path):
        text = p.read_text()
        assert text == json.dumps(json.loads(text), indent=1), p
    assert json.loads(rf.splits_path.read_text())["kind"] == "kmedtl-splits"
    assert rf.train_metrics["run_dir"] == str(rf.path) and rf.train_metrics["model"] == "flat"
    # a finished run is refused, then cleared by --overwrite
    with pytest.raises(ConfigError, match=re.escape(RunFolder.TRAIN_METRICS)):
        prepare_run_dir(rf.path, overwrite=False)
    (rf.path / "notes.txt").write_text("mine")
    prepare_run_dir(rf.path, overwrite=True)
    assert [p.name for p in rf.path.iterdir()] == ["notes.txt"]
    assert not rf.training_finished


@pytest.mark.slow
def test_staged_training_writes_where_run_folder_says(tmp_path):
    from test_training_helpers import write_config

    from kmedtl.config import load_config
    from kmedtl.training import run_training

    cfg = load_config(write_config(tmp_path, name="st", train={
        "model": "staged", "epochs": 1, "staged": {"n_folds": 2}}))
    rf = RunFolder.for_config(cfg)
    run_training(cfg)
    h = rf.hierarchy
    for node in h.parents:
        assert rf.stage_weights_path(node).is_file()
        assert rf.stage_weights_path(node).parent == rf.checkpoints_dir
    assert {p.name for p in rf.path.iterdir()} == \
        set(RunFolder.TRAINING_FILES) | set(RunFolder.TRAINING_DIRS)
    assert rf.training_finished and rf.train_metrics["model"] == "staged"
    text = rf.train_metrics_path.read_text()
    assert text == json.dumps(json.loads(text), indent=1)
    assert rf.history_path.read_text().splitlines()[0].startswith("stage,fold,epoch,")
    assert set(rf.model.output) == {"leaf", *(h.node_output_name(p) for p in h.parents)}
    assert not [p for p in rf.path.rglob("*") if ".tmp" in p.name]


def test_write_config_is_atomic(tmp_path, monkeypatch):
    rf = RunFolder(tmp_path)
    mapping = {"name": "x", "data": {"root": "d", "hierarchy": {"b": None, "a": None}}}
    assert rf.write_config(mapping) == str(rf.config_path)
    old = rf.config_path.read_bytes()
    assert old == yaml.safe_dump(mapping, sort_keys=False).encode()
    with pytest.raises(yaml.representer.RepresenterError):  # cannot be represented
        rf.write_config({"name": "y", "bad": object()})

    def half_then_fail(data, fh, **kwargs):
        fh.write("name: y\n")
        raise OSError("disk full")

    monkeypatch.setattr(yaml, "safe_dump", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        rf.write_config({"name": "y"})
    with pytest.raises(OSError, match="disk full"):
        rf.write_best_config({"name": "y"})
    assert rf.config_path.read_bytes() == old  # the old file, whole
    assert not rf.tuning_best_config_path.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == [RunFolder.CONFIG,
                                                           RunFolder.TUNING_DIR]


def test_training_writes_are_atomic_and_invalidate_what_was_read(tmp_path):
    rf = RunFolder(tmp_path)
    assert rf.train_metrics == {} and rf.audit is None
    rf.write_train_metrics({"fold": 2, "when": object})
    rf.write_audit({"counts": {"by_class": {"a": 1, "b": 2}}})
    assert rf.fold == 2 and rf.train_metrics["when"] == str(object)  # default=str
    assert rf.audit["counts"]["by_class"] == {"a": 1, "b": 2}
    loop: dict = {"fold": 3}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):  # a failed write keeps the old file
        rf.write_train_metrics(loop)
    assert read_json(rf.train_metrics_path)["fold"] == 2
    rows = [{"stage": "root", "fold": 0, "epoch": 0, "loss": 1.5},
            {"stage": "root", "fold": "final", "epoch": 0, "loss": 1.0, "auc": 0.5}]
    rf.write_history(rows)
    assert rf.history_path.read_bytes() == (b"stage,fold,epoch,loss,auc\r\n"
                                            b"root,0,0,1.5,\r\nroot,final,0,1.0,0.5\r\n")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert rf.training_state() is None and rf.training_finished  # metrics, no resume state
    rf.backup_dir.mkdir()
    rf.backup_state_path.write_text('{"epoch": 1}')
    assert rf.training_state() == {"epoch": 1} and not rf.training_finished
    rf.backup_state_path.write_text("{half")
    assert rf.training_state() is None and rf.training_finished
    assert rf.backup_phase_dir(3) == rf.backup_dir / "phase_3"
    assert RunFolder.backup_phase_index("phase_3") == 3
    assert RunFolder.backup_phase_index("phase_x") is None
    assert RunFolder.backup_phase_index("phase_end.npz") is None
    rf.clear_training()
    assert not any(tmp_path.iterdir())


def test_leaf_output_first_is_the_trainers_rule():
    from kmedtl.run_folder import leaf_output

    assert leaf_output({"a": 1, "leaf": 2}) == 2 and leaf_output({"a": 1}) == 1
    assert leaf_output([3, 4]) == 3 and leaf_output(5) == 5
    with pytest.raises(ConfigError, match="'leaf' output"):
        leaf_output({"a": 1, "b": 2})
    assert leaf_output({"a": 1, "b": 2}, first=True) == 1
