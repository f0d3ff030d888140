"""Test-time augmentation in evaluation: ``kmedtl evaluate --tta`` and
``pipeline.evaluate.tta`` (a tiny run folder from :mod:`test_evaluation_run`)."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
from test_evaluation_run import build_run

from kmedtl.errors import ConfigError

FAST = dict(n_boot=20, n_gradcam=0, n_examples=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("ttarun"), n_per_class=8)


def _probs(path):
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    cols = [c for c in rows[0] if c.startswith("p_")]
    return [r["id"] for r in rows], np.array([[float(r[c]) for c in cols] for r in rows])


def _parse(argv):
    from kmedtl.evaluation.cli import add_parsers

    parser = argparse.ArgumentParser(prog="kmedtl")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.slow
def test_tta_predictions_are_the_mean_over_flipped_views(tiny_run):
    """predict(tta=...) equals a hand-made mean of the model over the 4 flip views, and
    differs from the plain prediction."""
    from kmedtl.config import load_config
    from kmedtl.data.pipeline import make_dataset
    from kmedtl.data.prepare import load_index
    from kmedtl.data.splits import Splits
    from kmedtl.evaluation.stage import load_model, predict

    run, _ = tiny_run
    cfg = load_config(run / "config.yaml")
    index, hierarchy = load_index(cfg)
    splits = Splits.load(run / "splits.json", root=index.root)
    by_id = {s.id: s for s in index.samples}
    samples = [by_id[i] for i in splits.folds[0].test]
    model = load_model(run / "model.keras")
    options = cfg.image_options()
    plain = predict(model, samples, hierarchy, options, batch_size=4)
    tta = predict(model, samples, hierarchy, options, batch_size=4,
                  tta={"flips": "horizontal_and_vertical"})
    x = np.concatenate([np.asarray(b[0]["image"] if isinstance(b[0], dict) else b[0])
                        for b in make_dataset(samples, hierarchy, options, batch_size=4,
                                              targets="leaf")])
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    want = np.mean([np.asarray(model(v, training=False)["leaf"]) for v in views], axis=0)
    np.testing.assert_allclose(tta.leaf_probs, want, atol=1e-5)
    np.testing.assert_allclose(tta.leaf_probs.sum(1), 1.0, atol=1e-5)
    assert np.abs(tta.leaf_probs - plain.leaf_probs).max() > 1e-4
    assert tta.node_probs is not None and set(tta.node_probs) == set(plain.node_probs)
    assert [s.id for s in tta.samples] == [s.id for s in plain.samples]


@pytest.mark.slow
def test_cli_tta_changes_predictions_and_metrics_json_records_it(tiny_run, tmp_path, capsys):
    from kmedtl.evaluation.stage import evaluate_run

    run, _ = tiny_run
    off = evaluate_run(run, out=tmp_path / "off", **FAST)
    assert off["tta"] is None
    args = _parse(["evaluate", str(run), "--out", str(tmp_path / "on"), "--n-boot", "20",
                   "--gradcam", "0", "--examples", "0", "--tta", "vertical"])
    assert args.func(args) == 0
    assert "test-time augmentation: 2 views per image (flips vertical" in capsys.readouterr().out
    doc = json.loads((tmp_path / "on" / "metrics.json").read_text())
    assert doc["tta"] == {"flips": "vertical", "n": 2, "flip_views": 2, "random_views": 0,
                          "rotation": 0.0, "zoom": 0.0, "seed": None,
                          "applied_to": ["test", "val"]}
    assert json.loads((tmp_path / "off" / "metrics.json").read_text())["tta"] is None
    ids_off, p_off = _probs(tmp_path / "off" / "predictions.csv")
    ids_on, p_on = _probs(tmp_path / "on" / "predictions.csv")
    assert ids_off == ids_on and np.abs(p_on - p_off).max() > 1e-4
    assert "test-time augmentation" in (tmp_path / "on" / "report.html").read_text()


@pytest.mark.slow
def test_random_tta_views_are_reproducible(tiny_run, tmp_path):
    from kmedtl.evaluation.stage import evaluate_run

    run, _ = tiny_run
    tta = {"flips": "none", "n": 3, "rotation": 0.1, "zoom": 0.1, "seed": 3}
    a = evaluate_run(run, out=tmp_path / "a", tta=tta, **FAST)
    evaluate_run(run, out=tmp_path / "b", tta=tta, **FAST)
    evaluate_run(run, out=tmp_path / "c", **FAST)
    assert a["tta"]["random_views"] == 2 and a["tta"]["seed"] == 3
    _, pa = _probs(tmp_path / "a" / "predictions.csv")
    _, pb = _probs(tmp_path / "b" / "predictions.csv")
    _, pc = _probs(tmp_path / "c" / "predictions.csv")
    np.testing.assert_allclose(pa, pb, atol=1e-6)
    assert np.abs(pa - pc).max() > 1e-4


@pytest.mark.parametrize("argv, message", [
    (["--tta-n", "3"], "--tta-n: needs --tta FLIPS"),
    (["--tta", "horizontal", "--tta-n", "3"],
     "n=3 views but flips 'horizontal' gives only 2; lower n to <= 2, or add random views"),
    (["--tta", "horizontal", "--tta-rotation", "0.1"], "set n > 2"),
    (["--tta", "none"], "one view (flips 'none', no random views) is no test-time"),
    (["--tta", "vertical", "--tta-n", "0"], "--tta-n: Input should be greater than or equal"),
])
def test_cli_tta_errors_name_the_flag_and_the_fix(tmp_path, argv, message):
    from kmedtl.evaluation.cli import tta_from_args

    with pytest.raises(ConfigError) as err:
        tta_from_args(_parse(["evaluate", str(tmp_path), *argv]))
    assert message in str(err.value)


def test_cli_tta_rejects_unknown_flip_mode(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse(["evaluate", str(tmp_path), "--tta", "diagonal"])
    assert "invalid choice: 'diagonal'" in capsys.readouterr().err


@pytest.mark.parametrize("tta, message", [
    ({"flips": "diagonal"}, "pipeline.evaluate.tta.flips: Input should be 'none', 'horizontal'"),
    ({"n": 5}, "pipeline.evaluate.tta: n=5 views but flips 'horizontal' gives only 2"),
    ({"flip": "vertical"}, "pipeline.evaluate.tta.flip: unknown field; allowed fields here: "
                           "['flips', 'n', 'rotation', 'seed', 'zoom']"),
    ({"rotation": 2.0, "n": 4}, "pipeline.evaluate.tta.rotation: Input should be less than 1"),
    (7, "pipeline.evaluate.tta: Input should be a valid dictionary"),
])
def test_pipeline_tta_errors_name_the_field(tmp_path, tta, message):
    from test_pipeline_run import pipeline_dict

    from kmedtl.pipeline import load_pipeline

    raw = pipeline_dict(tmp_path)
    raw["pipeline"]["evaluate"]["tta"] = tta
    with pytest.raises(ConfigError) as err:
        load_pipeline(raw)
    assert message in str(err.value)


@pytest.mark.parametrize("tta, flips, n", [(True, "horizontal", 2), ("vertical", "vertical", 2),
                                           ({"flips": "horizontal_and_vertical", "n": 3},
                                            "horizontal_and_vertical", 3), (None, None, None),
                                           (False, None, None)])
def test_pipeline_tta_shorthands(tmp_path, tta, flips, n):
    from test_pipeline_run import pipeline_dict

    from kmedtl.pipeline import load_pipeline

    raw = pipeline_dict(tmp_path)
    raw["pipeline"]["evaluate"]["tta"] = tta
    got = load_pipeline(raw).spec.evaluate.tta
    assert (got.flips, got.views) == (flips, n) if flips else got is None


@pytest.mark.slow
def test_pipeline_evaluate_stage_applies_tta_and_reruns_alone_when_it_changes(tmp_path):
    from test_pipeline_run import pipeline_dict

    from kmedtl.pipeline import run_pipeline

    raw = pipeline_dict(tmp_path, train={"epochs": 1})
    raw["pipeline"]["evaluate"]["tta"] = {"flips": "horizontal"}
    res = run_pipeline(raw)
    run = res.run_dir
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["tta"]["flips"] == "horizontal" and doc["tta"]["n"] == 2
    rec = json.loads((run / "stages" / "evaluate.json").read_text())
    assert rec["result"]["tta"]["n"] == 2
    _, p_on = _probs(run / "predictions.csv")
    raw["pipeline"]["evaluate"]["tta"] = None
    res = run_pipeline(raw)
    assert res.ran == ["evaluate"], (res.ran, res.skipped)
    assert json.loads((run / "metrics.json").read_text())["tta"] is None
    _, p_off = _probs(run / "predictions.csv")
    assert np.abs(p_on - p_off).max() > 1e-4
