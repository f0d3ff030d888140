"""Export's :class:`~kmedtl.export.model.RunContext` is a view of the run folder (issue 22
item 4): it holds the float32 model, the trained precision and the
:class:`~kmedtl.run_folder.RunFolder`; everything else is read through the folder, once,
and :func:`~kmedtl.export.model.load_run` fails at once on a bad artefact."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import yaml

from kmedtl.export.errors import ExportError
from kmedtl.export.model import RunContext, load_run
from kmedtl.hierarchy import Hierarchy
from kmedtl.run_folder import RunFolder

TREE = {"normal": None, "tumor": {"glioma": None, "pituitary": None}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with an untrained tiny model (no training, no images)."""
    import keras

    from kmedtl.models import HierarchicalClassifier, backbone

    root = tmp_path_factory.mktemp("context")
    (root / "data").mkdir()
    run = root / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "output_dir": str(root / "runs"), "train": {"backbone": "cbr_tiny"},
        "data": {"source": "folder", "root": str(root / "data"), "hierarchy": TREE,
                 "image": {"size": 32, "channels": 1}, "cache_dir": None}}))
    keras.utils.set_random_seed(0)
    model = HierarchicalClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)),
                                   Hierarchy(TREE))
    model.save(run / "model.keras")
    (run / "train_metrics.json").write_text(json.dumps({"fold": 0}))
    (run / "metrics.json").write_text(json.dumps({"headline": {}}))
    (run / "calibration.json").write_text(json.dumps({"temperature": 1.5}))
    return run


def test_run_context_reads_through_its_folder_once(run, monkeypatch):
    import kmedtl.run_folder as rf_module

    checks = []
    check = rf_module.check_temperature
    monkeypatch.setattr(rf_module, "check_temperature",
                        lambda *a, **k: checks.append(a) or check(*a, **k))
    ctx = load_run(run)
    assert {f.name for f in dataclasses.fields(RunContext)} == {
        "model", "folder", "source_precision"}
    rf = ctx.folder
    assert isinstance(rf, RunFolder) and ctx.run_dir == rf.path == run
    assert ctx.config is rf.config and ctx.name == "tiny"
    assert ctx.hierarchy is rf.hierarchy and ctx.hierarchy == Hierarchy(TREE)
    assert ctx.options is rf.image_options and ctx.options.shape == (32, 32, 1)
    assert ctx.normalization == "unit" and ctx.source_precision == "float32"
    assert ctx.calibration == {"temperature": 1.5} and ctx.metrics == {"headline": {}}
    assert ctx.train_metrics == {"fold": 0}
    assert [ctx.temperature for _ in range(3)] == [1.5] * 3
    assert len(checks) == 1  # validated once, in load_run
    assert ctx.model is not rf.model  # the float32 rebuild, beside the trained model
    with pytest.raises(AttributeError):
        ctx.temperature = 2.0  # read-only: the run folder is the one source


@pytest.mark.parametrize("file, text, match", [
    ("calibration.json", '{"temperature": 0}', r"calibration.json: 'temperature' must be a "
                                                r"positive number, got 0; rerun kmedtl evaluate"),
    ("calibration.json", '{"temperature": true}', "got True"),
    ("calibration.json", '{"temperature": "1.2"}', "got '1.2'"),
    ("train_metrics.json", "{not json", "train_metrics.json"),
])
def test_load_run_fails_at_once_on_a_bad_artefact(run, tmp_path, file, text, match):
    bad = shutil.copytree(run, tmp_path / "bad")
    (bad / file).write_text(text)
    with pytest.raises(ExportError, match=match):
        load_run(bad)
