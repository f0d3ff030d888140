"""``benchmarks/init_rules.py``: each arm changes exactly one of ``kmedtl init``'s choices,
the verdict is taken on validation with the seed as the unit, and the committed report is
what the committed cells give."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from helpers import smooth_image, write_image
from test_benchmark_generalisation import _part
from test_training_helpers import REPO

from kmedtl import init as kinit
from kmedtl.pipeline.spec import load_pipeline

STUDY = REPO / "pipelines" / "study_init_rules"


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "init_rules", REPO / "benchmarks" / "init_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def colour_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    # imbalanced (12 / 12 / 6), so init chooses class weights and `unweighted` changes them
    for c, (name, n) in enumerate((("alpha", 12), ("beta", 12), ("gamma", 6))):
        for i in range(n):
            write_image(root / name / f"{name}_{i:02d}.jpg",
                        smooth_image(1000 * c + i, 48, channels=3), quality=92)
    out, _, _ = kinit.init(root, root.parent / "init.yaml", cache=False)
    return out


def _picks(raw: dict) -> dict:
    return {"channels": raw["data"]["image"]["channels"], "augment": raw["augment"],
            "balance": raw["data"].get("balance")}


def test_each_arm_changes_one_choice_and_still_loads(colour_yaml):
    bench = load_benchmark()
    init = bench.arm_config(colour_yaml, "ham", "init", seed=2)
    assert init["data"]["image"]["channels"] == 3
    assert init["augment"] == kinit.PHOTO_AUGMENT and init["data"]["balance"] == "weights"
    assert init["train"]["seed"] == 2 and init["train"]["tensorboard"] is False
    for arm in bench.ARMS["ham"]:
        raw = bench.arm_config(colour_yaml, "ham", arm, seed=2)
        edit = bench.ARMS["ham"][arm][0]
        for key, value in _picks(raw).items():  # the edited choices, and nothing else
            if key in edit:
                assert value == (bench._family(edit[key]) if key == "augment"
                                 else edit[key]), (arm, key)
            else:
                assert value == _picks(init)[key], (arm, key)
        load_pipeline(raw)  # every arm is a valid pipeline
    grey = bench.arm_config(colour_yaml, "ham", "grey", seed=0)
    # the whole section is replaced: no photo key (saturation, hue) survives
    assert grey["augment"] == kinit.RADIOLOGY_AUGMENT and grey["data"]["image"]["channels"] == 1
    geometry = bench.arm_config(colour_yaml, "ham", "photo_geometry", seed=0)
    assert geometry["augment"] == bench.PHOTO_GEOMETRY
    assert geometry["augment"]["flip"] == "horizontal_and_vertical"
    assert not set(geometry["augment"]) & {"brightness", "saturation", "hue"}


def test_grey_arms_load_on_a_grey_pipeline(colour_yaml):
    """Colour jitter needs colour input: every OCT arm must load with one channel."""
    bench = load_benchmark()
    for arm in bench.ARMS["oct"]:
        raw = bench.arm_config(colour_yaml, "oct", arm, seed=0)
        raw["data"]["image"]["channels"] = 1
        if arm == "init":
            raw["augment"] = kinit.RADIOLOGY_AUGMENT  # what init writes for grey input
        load_pipeline(raw)


def test_verdict_takes_the_seed_as_the_unit():
    bench = load_benchmark()
    assert bench.verdict([0.02, 0.01, 0.0]).startswith("holds")
    assert bench.verdict([-0.02, -0.01, -0.03]).startswith("fails")
    assert bench.verdict([0.05, -0.01, 0.02]) == "no consistent difference"
    assert bench.verdict([0.0, 0.0]) == "tie"
    assert bench.verdict([0.3]) == "too few seeds"
    assert bench.verdict([-0.1, -0.2], "pad", "crop") == "fails (crop better on every seed)"


def test_table_pairs_each_arm_with_init_seed_by_seed():
    bench = load_benchmark()
    y = [0, 1] * 5  # balanced accuracy = right / 10
    recipe = {"channels": 3, "size": 160, "resize": "pad", "balance": "weights",
              "augment": {"flip": "horizontal"}, "epochs": 19, "batch_size": 32}
    right = {("grey", 0): (7, 9), ("grey", 1): (6, 6), ("init", 0): (9, 8), ("init", 1): (8, 9)}
    cells = [{"dataset": "ham", "arm": a, "seed": s, "change": a, "recipe": recipe,
              "leaves": ["a", "b"], "n": {"train": 5, "val": 10, "test": 10},
              "val": _part(y, v), "test": _part(y, t)} for (a, s), (v, t) in right.items()]
    lines, verdicts = bench.dataset_lines(cells, "ham")
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in lines if ln.startswith("| ")}
    assert rows["init"].startswith("| init | init | 2 | 0.850 ± 0.071 | - | 0.850 ± 0.071 | - |")
    # validation: init +0.2 on both seeds (holds); test: -0.1 and +0.3 (reports only)
    assert "| 0.650 ± 0.071 | +0.200, +0.200 | 0.750 ± 0.212 | -0.100, +0.300 |" in rows["grey"]
    assert rows["grey"].endswith("| holds (init >= on every seed) |")
    assert verdicts["grey"] == {"validation_diffs": pytest.approx([0.2, 0.2]),
                                "verdict": "holds (init >= on every seed)"}
    # both arms share the recipe here, so they compete for the augmentation choice: the
    # higher validation mean wins, and it leads on every seed
    choice = verdicts["augment_choice"]
    assert (choice["arm"], choice["holds"], choice["val"]) == ("init", True, "0.850 ± 0.071")
    assert choice["candidates"] == {"grey": 0.65, "init": 0.85}
    assert any("epochs 19, batch 32" in ln for ln in lines)


def test_committed_report_is_what_the_committed_cells_give(tmp_path):
    bench = load_benchmark()
    cells = sorted((STUDY / "cells").glob("*.json"))
    assert cells, f"{STUDY}/cells: the committed cells are missing"
    shutil.copytree(STUDY / "cells", tmp_path / "cells")
    bench.write_report(tmp_path)
    assert (tmp_path / "RESULTS.md").read_text() == (STUDY / "RESULTS.md").read_text()
    assert (tmp_path / "summary.json").read_text() == (STUDY / "summary.json").read_text()


def test_brain_resize_rule_is_read_from_the_generalisation_cells():
    """The resize rule on brain MRI (pad, as init writes it now, against crop, as it wrote it
    before) is judged by the generalisation study's cells: validation chooses, the rest
    reports."""
    bench = load_benchmark()
    lines, summary = bench.brain_lines()
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| data")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| validation", "| internal test", "| Testing/ (another acquisition)"]
    v = summary["crop"]
    assert len(v["val"]["diffs"]) == 3  # one per seed, paired
    assert v["val"]["verdict"] == bench.verdict(v["val"]["diffs"], "pad", "crop")
    # the evidence behind the rule: pad is at least as good on validation on every seed
    assert v["val"]["verdict"].startswith("holds")
    assert v["external"]["verdict"] in ("crop higher on every seed", "pad higher on every seed",
                                        "no consistent difference")
