"""``kmedtl.run_folder.RunFolder`` on a tiny trained run (built like the evaluation tests'),
the label-tree rule, the model's input shape, atomic JSON and the one level-probability
function."""

from __future__ import annotations

import json
import shutil

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
