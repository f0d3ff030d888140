"""The ImageNet study's own machinery: per-N cell keys, intermediate and cross-domain
pretraining from ImageNet weights, the KerasTuner search arm, and the moonshot ratio.

The end-to-end test runs a tiny study (32 px, N = 4 per class, Lite0) on the real brain
MRI set with a backbone adapted on the real OCT set, through ``python -m kmedtl.study``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from kmedtl.errors import ConfigError
from kmedtl.study.config import load_study
from kmedtl.study.data import StudySplit

ROOT = Path(__file__).resolve().parents[1]


def _fake_split():
    y = np.arange(60) % 3
    ids = [f"img{i:03d}" for i in range(len(y))]
    return StudySplit(None, np.zeros((len(y), 4, 4, 1), "float32"), y, ids,
                      np.arange(45), np.arange(45, 60))


def _study(tmp_path, epochs, name="s.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump({
        "name": "k", "data": {"root": str(tmp_path), "hierarchy": {"a": None, "b": None}},
        "grid": {"sizes": [3, 6], "seeds": [0]},
        "train": {"backbone": "cbr_micro", "epochs": epochs},
        "arms": [{"name": "a"}, {"name": "b", "model": "hierarchical"}]}))
    return load_study(p)


def _keys(tmp_path, epochs, out):
    from kmedtl.study.runner import StudyRunner

    runner = StudyRunner(_study(tmp_path, epochs), out)
    runner.split = _fake_split()
    return runner, {(c.arm, str(c.n)): c.key for c in runner.plan()}


def test_a_new_n_in_the_epochs_mapping_keeps_the_other_cells(tmp_path):
    out = tmp_path / "out"
    _, before = _keys(tmp_path, {3: 2, 6: 1}, out)
    _, after = _keys(tmp_path, {3: 2, 6: 1, 100: 5, "all": 8}, out)
    assert before == after
    _, changed = _keys(tmp_path, {3: 4, 6: 1}, out)  # a real change of N=3's recipe
    assert changed[("a", "3")] != before[("a", "3")]
    assert changed[("a", "6")] == before[("a", "6")]


def test_a_cell_finished_under_the_first_key_scheme_is_still_found(tmp_path):
    from kmedtl.study.runner import _key

    out = tmp_path / "out"
    runner, keys = _keys(tmp_path, {3: 2, 6: 1}, out)
    recipe = {"backbone": "cbr_micro", "epochs": {3: 2, 6: 1}}
    legacy = _key({"fp": runner.split.fingerprint, "recipe": recipe, "n": "3", "seed": 0,
                   "init": "scratch"})
    assert legacy != keys[("a", "3")]
    (out / "cells").mkdir(parents=True)
    (out / "cells" / f"{legacy}.json").write_text("{}")
    _, again = _keys(tmp_path, {3: 2, 6: 1}, out)
    assert again[("a", "3")] == legacy and again[("a", "6")] == keys[("a", "6")]


@pytest.mark.parametrize("entry, message", [
    ({"method": "simclr", "weights": "imagenet"}, "needs method: level1"),
    ({"method": "rotation", "data": {"root": ".", "hierarchy": {"a": None, "b": None}}},
     "needs method: level1"),
])
def test_pretrain_options_need_the_supervised_method(tmp_path, entry, message):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({
        "name": "x", "data": {"root": str(tmp_path), "hierarchy": {"a": None, "b": None}},
        "pretrain": {"p": entry}, "arms": [{"name": "a"}, {"name": "b", "init": "p"}]}))
    with pytest.raises(ConfigError, match=message):
        load_study(p)


def test_cross_domain_data_must_match_the_image_size(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({
        "name": "x", "data": {"root": str(tmp_path), "hierarchy": {"a": None, "b": None},
                              "image_size": 64},
        "pretrain": {"p": {"method": "level1", "data": {
            "root": str(tmp_path), "hierarchy": {"a": None, "b": None}, "image_size": 32}}},
        "arms": [{"name": "a"}, {"name": "b", "init": "p"}]}))
    with pytest.raises(ConfigError, match=r"pretrain.p.data: 32 px .* differs"):
        load_study(p)


@pytest.fixture(scope="module")
def tiny_study(datasets_dir, tmp_path_factory):
    from kmedtl.study.cli import main

    tmp = tmp_path_factory.mktemp("imagenet_study")
    cache = str(tmp / "cache")
    oct_data = {"root": str(datasets_dir / "kermany-oct2017-test"), "manifest": "MANIFEST.csv",
                "columns": {"label": "class"},
                "hierarchy": {"NORMAL": None, "disease": {"CNV": None, "DME": None,
                                                          "DRUSEN": None}},
                "image_size": 32, "channels": 1, "cache_dir": cache, "test": "holdout",
                "test_fraction": 0.2}
    study = {
        "data": {"root": str(datasets_dir / "brain-tumor-mri"),
                 "hierarchy": str(ROOT / "pipelines" / "hierarchies" / "brain_tumor.yaml"),
                 "image_size": 32, "channels": 1, "cache_dir": cache, "test": "holdout",
                 "test_fraction": 0.2},
        "grid": {"sizes": [4], "seeds": [0]},
        "train": {"backbone": "efficientnet_lite0", "weights": "imagenet", "model": "flat",
                  "strategy": "fine_tune", "head_epochs": 1, "freeze_bn": True,
                  "recalibrate_bn": False, "epochs": 2, "batch_size": 16,
                  "lr_multipliers": [0.111, 0.333, 1.0], "jit_compile": False},
        "pretrain": {
            "same": {"method": "level1", "weights": "imagenet", "epochs": 2, "batch_size": 16,
                     "max_images": 48, "pool": "per_seed"},
            "cross": {"method": "level1", "weights": "imagenet", "epochs": 2,
                      "batch_size": 16, "max_images": 48, "data": oct_data}},
        "evaluation": {"n_boot": 50},
        "comparisons": [
            {"name": "init", "arms": [{"name": "imagenet"},
                                      {"name": "same", "init": "same"},
                                      {"name": "cross", "init": "cross"}]},
            {"name": "search", "arms": [
                {"name": "default"},
                {"name": "searched", "tune": {
                    "tuner": "random", "max_trials": 2, "epochs": 2, "objective": "loss",
                    "cuts": ["block5c_add", "top_activation"],
                    "strategies": ["freeze", "fine_tune"],
                    "learning_rate": [3e-4, 3e-3], "lr_ratios": [3.0],
                    "dropout": [0.2, 0.2], "feature_cache": False}}]}],
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp / "out"
    rc = main([str(path), "--out", str(out), "--results", str(tmp / "R.md"), "--no-plots"])
    assert rc == 0
    cells = {c["arm"]: c for c in (json.loads(p.read_text())
                                   for p in (out / "cells").glob("*.json"))}
    return out, cells, (tmp / "R.md").read_text()


@pytest.mark.slow
def test_intermediate_and_cross_domain_pretraining_start_from_imagenet(tiny_study):
    from kmedtl.models import backbone
    from kmedtl.models.weights import read_weight_file

    out, cells, _ = tiny_study
    assert {"imagenet", "same", "cross", "searched"} <= set(cells)
    metas = {m["name"]: m for m in (json.loads(p.read_text())
                                    for p in (out / "pretrain").glob("*.json"))}
    assert metas["cross"]["data_root"].endswith("kermany-oct2017-test")
    assert metas["cross"]["n_images"] == 48 and metas["same"]["n_images"] == 48
    assert metas["same"]["weights"] == "imagenet"
    ref = np.asarray(backbone("efficientnet_lite0", weights="imagenet",
                              input_shape=(32, 32, 1)).get_layer("top_conv").kernel)
    for name in ("same", "cross"):
        path = out / "pretrain" / f"{cells[name]['pretrain_key']}.weights.h5"
        got = read_weight_file(path)["top_conv"][0]
        assert np.abs(got - ref).max() > 1e-4  # trained ...
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9  # ... from ImageNet
    assert cells["same"]["pretrain_key"] != cells["cross"]["pretrain_key"]


@pytest.mark.slow
def test_the_search_arm_tunes_on_the_subset_and_records_its_choice(tiny_study):
    _, cells, results = tiny_study
    s = cells["searched"]
    assert s["search"]["trials"] == 2
    assert s["search"]["n_search_train"] + s["search"]["n_search_val"] == s["n_train"] == 16
    assert s["search"]["best"]["cut_efficientnet_lite0"] in ("block5c_add", "top_activation")
    assert s["search"]["best"]["strategy"] == s["strategy"]
    assert s["search"]["seconds"] < s["seconds"]
    assert "searched" in results


# ------------------------------------------------------------------ moonshot, costs, summary
def test_moonshot_ratio_divides_seed_means_and_brackets_itself():
    from kmedtl.study.stats import metric, ratio

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    perfect = np.eye(3)[y]
    noisy = {s: np.where(rng.random((len(y), 1)) < 0.3, np.roll(perfect, 1, axis=1), perfect)
             for s in (0, 1, 2)}
    r = ratio(y, noisy, {0: perfect, 1: perfect, 2: perfect, 3: perfect}, n_boot=200)
    expect = np.mean([metric("balanced_accuracy", y, p) for p in noisy.values()])
    assert r["seeds"] == [0, 1, 2] and r["large"] == 1.0
    assert r["value"] == pytest.approx(expect) and r["small"] == pytest.approx(expect)
    assert r["ci_low"] < r["value"] < r["ci_high"] < 1.0
    assert len(r["per_seed"]) == 3
    assert ratio(y, {5: perfect}, {0: perfect}) is None


def test_moonshot_and_costs_are_checked_when_the_study_loads(tmp_path):
    base = {"name": "x", "data": {"root": str(tmp_path), "hierarchy": {"a": None, "b": None}},
            "grid": {"sizes": [5, 10]},
            "arms": [{"name": "a"}, {"name": "b", "sizes": [5]}]}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**base, "moonshot": {"small": 5, "large": "all"}}))
    with pytest.raises(ConfigError, match=r"moonshot.large: arm 'a' does not run N = all"):
        load_study(p)
    p.write_text(yaml.safe_dump({**base, "moonshot": {"arm": "b", "small": 5, "large": 10}}))
    with pytest.raises(ConfigError, match="moonshot.large: arm 'b'"):
        load_study(p)
    p.write_text(yaml.safe_dump({**base, "costs": "nope.json"}))
    with pytest.raises(ConfigError, match="costs: .*nope.json not found .*benchmarks/models.py"):
        load_study(p)
    p.write_text(yaml.safe_dump({**base, "moonshot": {"small": 5, "large": 10}}))
    (s,) = load_study(p)
    assert s.moonshot.arm == "a" and s.topic == "x"


def _fake_run(tmp_path, name, shift, costs=None, topic="cmp", papers=None):
    """A planned runner over a fake split whose cells are written from synthetic
    probabilities: arm ``b`` is ``shift`` better than ``a`` in every seed."""
    from kmedtl.study.runner import StudyRunner, _write_json
    from kmedtl.study.stats import cell_metrics

    root = tmp_path / name
    root.mkdir()
    spec = {"name": f"{name}_cmp", "topic": topic,
            "data": {"root": str(root), "hierarchy": {"a": None, "b": None, "c": None}},
            "grid": {"sizes": [3, "all"], "seeds": [0, 1, 2]},
            "train": {"backbone": "efficientnet_lite0", "epochs": 1},
            "arms": [{"name": "a"}, {"name": "b", "cut": "block4c_add", "sizes": [3]}],
            "moonshot": {"small": 3, "large": "all"}}
    if costs:
        spec["costs"] = str(costs)
    if papers:
        spec["papers"] = papers
    (root / "s.yaml").write_text(yaml.safe_dump(spec))
    runner = StudyRunner(load_study(root / "s.yaml"), tmp_path / f"{name}_out")
    runner.split = _fake_split()
    runner.plan()
    y = runner.split.y_test
    (runner.out / "cells").mkdir(parents=True)
    _write_json(runner.out / "split.json", {"fingerprint": runner.split.fingerprint,
                                            "y_test": y.tolist(), "summary": {}})
    rng = np.random.default_rng(1)
    for c in runner.cells:
        wrong = {"a": 0.4, "b": 0.4 - shift}[c.arm] if c.n != "all" else 0.0
        pred = np.where(rng.random(len(y)) < wrong, (y + 1) % 3, y)
        probs = np.eye(3)[pred] * 0.9 + 0.1 / 3
        _write_json(runner.cell_path(c.key), {
            "fingerprint": runner.split.fingerprint, "probs": probs.tolist(), "seconds": 1,
            "metrics": cell_metrics(y, probs, n_boot=20), "n": c.n, "seed": c.seed})
    return runner


def test_summary_lines_up_datasets_by_topic(tmp_path):
    from kmedtl.study.summary import across, render_runners

    one = _fake_run(tmp_path, "one", 0.4)  # b always right: better
    two = _fake_run(tmp_path, "two", 0.0)
    text = render_runners([one, two])
    row = next(ln for ln in text.splitlines() if ln.startswith("| b | 3 |"))
    assert "better" in row.split("|")[3] and "better" not in row.split("|")[4]
    assert row.rstrip(" |").endswith("depends on the dataset")
    moon = [ln for ln in text.splitlines() if ln.startswith("| one |")]
    assert moon and "3 / all" in moon[-1]
    assert across(["better", "better"]) == "better on every dataset"
    assert across(["no clear difference", "no clear difference, seeds disagree"]) == \
        "no clear difference on any dataset"


def test_the_cost_table_joins_the_benchmark_rows(tmp_path):
    from kmedtl.study.report import Report

    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"environment": {"input": [160, 160, 3], "cpu_count": 2},
                                 "rows": [
        {"family": "efficientnet_lite0", "cut": "(full)", "params": 3_410_000,
         "params_ratio": 1.0, "flops": 390_000_000, "flops_ratio": 1.0,
         "images_per_s": 194.0, "images_per_s_ratio": 1.0},
        {"family": "efficientnet_lite0", "cut": "block4c_add", "params": 260_000,
         "params_ratio": 0.08, "flops": 160_000_000, "flops_ratio": 0.41,
         "images_per_s": 301.0, "images_per_s_ratio": 1.55}]}))
    runner = _fake_run(tmp_path, "c", 0.2, costs=costs)
    lines = Report(runner).costs(runner.studies[0])
    rows = [ln for ln in lines if ln.startswith("| a ") or ln.startswith("| b ")]
    assert rows[0].startswith("| a | 3.41 | 1.00 | 0.39 | 1.00 | 194 | 1.00 |")
    assert rows[1].startswith("| b | 0.26 | 0.08 | 0.16 | 0.41 | 301 | 1.55 |")


def _report_text(rep):  # the report's verdict parts (the fake cells lack timings)
    s = rep.r.studies[0]
    return "\n".join(rep.inference_lines() + rep.summary() + rep.study_section(s, 1))


def test_the_report_says_seed_is_the_unit_and_holm_decides(tmp_path):
    """The paired table carries the seed-level CI, raw and Holm-adjusted p, verdict, seeds
    and wins; the top paragraph names Holm, the family size and what survives; the
    image-level CI is labelled as test-set noise only."""
    from kmedtl.study.report import Report

    text = _report_text(Report(_fake_run(tmp_path, "h", 0.4)))
    assert "Holm" in text and "unit of inference is the training seed" in text
    assert "m = 1 comparisons" in text
    head = next(ln for ln in text.splitlines() if ln.startswith("| arm | N | mean diff"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    for col in ("seed-level 95% CI", "raw p", "Holm p", "verdict", "seeds", "wins k/n"):
        assert col in cols, col
    assert any(c.startswith("image-level 95% CI (one trained model per seed; test-set noise "
                            "only)") for c in cols)
    row = next(ln for ln in text.splitlines() if ln.startswith("| b | 3 |"))
    cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["verdict"] == "better" and cells["seeds"] == "3" and cells["wins k/n"] == "3/3"
    assert float(cells["Holm p"]) < 0.05
    assert "1 of 1 comparisons survives Holm's correction" in text
    assert "No comparison here is marked as the recommended recipe" in text


def test_the_report_says_which_data_chose_the_recommended_recipe(tmp_path):
    from kmedtl.study.report import Report

    text = _report_text(Report(_fake_run(tmp_path, "r", 0.0, topic="recipe",
                                         papers="the winners of the other comparisons")))
    para = next(ln for ln in text.splitlines() if ln.startswith("**Who chose what.**"))
    assert "chosen on this study's own test sets" in para
    assert "selection-biased on these test sets" in para
    assert "the winners of the other comparisons" in para
    assert "None of the 1 comparisons survives Holm's correction" in text

