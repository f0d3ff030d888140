"""The recommended recipe is one thing: the study arm that measured it, the constant
``train: {recipe: recommended}`` expands to, and the main job's train section."""

from __future__ import annotations

import pytest

from kmedtl.errors import ConfigError
from kmedtl.training import RECOMMENDED_RECIPE, train_section

MAIN_JOB = "pipelines/brain_tumor_hierarchical.yaml"


def _subset(section: dict) -> dict:
    return {k: section.get(k) for k in RECOMMENDED_RECIPE}


def test_the_main_job_trains_with_the_recommended_recipe(datasets_dir):
    from kmedtl.pipeline.spec import load_pipeline

    tc = load_pipeline(MAIN_JOB).train.model_dump()
    assert _subset(tc) == RECOMMENDED_RECIPE


@pytest.mark.parametrize("ds", ["oct", "brain"])
def test_the_study_arm_that_measured_it_is_the_recommended_recipe(ds, datasets_dir):
    from kmedtl.study.config import load_study

    study = {s.name: s for s in load_study(f"pipelines/study_imagenet_{ds}.yaml")}
    s = study[f"{ds}_recipe"]
    arm = next(a for a in s.arms if a.name == "recommended")
    recipe = s.recipe_of(arm)
    assert _subset(recipe) == RECOMMENDED_RECIPE
    default = next(a for a in s.arms if a.name == s.reference)
    assert s.recipe_of(default)["strategy"] == "fine_tune"  # what it was measured against


def test_recipe_recommended_expands_and_fields_beside_it_win():
    tc = train_section({"recipe": "recommended", "epochs": 3, "learning_rate": 5e-4})
    assert (tc.model, tc.backbone, tc.weights, tc.strategy, tc.schedule, tc.freeze_bn) == (
        "hierarchical", "efficientnet_lite0", "imagenet", "full", "one_cycle", True)
    assert (tc.epochs, tc.learning_rate) == (3, 5e-4)
    with pytest.raises(ConfigError, match=r"train.recipe: 'best' is not a known recipe.*"
                                          r"\['recommended'\]"):
        train_section({"recipe": "best"})


def test_a_run_config_with_the_recipe_is_expanded_when_it_loads(tmp_path):
    from kmedtl.config import load_config

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{source: folder, root: {tmp_path}, hierarchy: {{a: null, b: null}}}}\n"
                 "train: {recipe: recommended, epochs: 2}\n")
    cfg = load_config(p)
    assert "recipe" not in cfg.train  # every reader of cfg.train sees the fields
    assert cfg.train["weights"] == "imagenet" and cfg.train["epochs"] == 2
    p.write_text(f"data: {{source: folder, root: {tmp_path}, hierarchy: {{a: null, b: null}}}}\n"
                 "train: {recipe: fastest}\n")
    with pytest.raises(ConfigError, match=r"(?s)c.yaml.*train: recipe: 'fastest' is not a known"):
        load_config(p)
