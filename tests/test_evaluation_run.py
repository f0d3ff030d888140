"""``kmedtl evaluate`` end to end on a tiny run folder built here (synthetic PNGs, a tiny
hierarchical model trained for two epochs), through the subcommand's own parser."""

from __future__ import annotations

import argparse
import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml

HIER = {"normal": ["no_tumor"],
        "tumor": {"glioma": ["glioma_tumor"], "pituitary": ["pituitary_tumor"]}}
SIZE = 32


def _image(rng, cls: int) -> np.ndarray:
    """Noise plus a class-specific bright bar (none, horizontal, vertical)."""
    img = rng.normal(60, 20, (SIZE, SIZE)).clip(0, 255)
    r, c = rng.integers(4, SIZE - 12, 2)
    if cls == 1:
        img[r:r + 4, c:c + 10] = 230
    elif cls == 2:
        img[r:r + 10, c:c + 4] = 230
    return img.astype(np.uint8)


def build_run(tmp_path, n_per_class: int = 16, seed: int = 0):
    """A run folder as the training stage writes it: config.yaml, splits.json, audit.json,
    model.keras, history.csv, train_metrics.json (+ a learning_curve.json)."""
    import keras
    from PIL import Image

    from kmedtl.config import load_config
    from kmedtl.data.audit import public
    from kmedtl.data.pipeline import make_dataset
    from kmedtl.data.prepare import prepare
    from kmedtl.evaluation.learning_curves import save_learning_curve
    from kmedtl.models import HierarchicalClassifier, backbone

    rng = np.random.default_rng(seed)
    data = tmp_path / "data"
    for cls, raw in enumerate(("no_tumor", "glioma_tumor", "pituitary_tumor")):
        (data / raw).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(_image(rng, cls)).save(data / raw / f"{raw}_{i:02d}.png")
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    raw_cfg = {"name": "tiny",
               "data": {"source": "folder", "root": str(data), "hierarchy": HIER,
                        "image": {"size": SIZE, "channels": 1}, "cache_dir": None},
               "split": {"method": "holdout", "val": 0.25, "test": 0.25, "dedupe": "none",
                         "seed": 0},
               "train": {"backbone": "cbr_tiny", "epochs": 2},
               "output_dir": str(tmp_path / "runs")}
    (run / "config.yaml").write_text(yaml.safe_dump(raw_cfg))
    cfg = load_config(run / "config.yaml")
    prep = prepare(cfg, workers=1, progress=False)
    prep.splits.save(run / "splits.json", root=prep.index.root)
    (run / "audit.json").write_text(json.dumps(public(prep.report)))
    keras.utils.set_random_seed(0)
    kw = dict(hierarchy=prep.hierarchy, options=prep.options, targets="hierarchy",
              batch_size=8)
    model = HierarchicalClassifier(backbone("cbr_tiny", input_shape=prep.options.shape),
                                   prep.hierarchy)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(make_dataset(prep.samples("train"), training=True, **kw),
              validation_data=make_dataset(prep.samples("val"), **kw), epochs=2, verbose=0,
              callbacks=[keras.callbacks.CSVLogger(str(run / "history.csv"))])
    model.save(run / "model.keras")
    (run / "train_metrics.json").write_text(json.dumps({"fold": 0}))
    save_learning_curve(run / "learning_curve.json",
                        {25: [0.6, 0.62, 0.58], 50: [0.7, 0.72, 0.69]}, "accuracy")
    return run, data


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def assert_self_contained(html_text: str) -> int:
    """Every <img> is a data: URI holding a PNG that PIL opens; no external resources."""
    from PIL import Image

    parser = _Images()
    parser.feed(html_text)
    assert parser.srcs, "the report has no images"
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "PNG"
        img.verify()
    lowered = html_text.lower()
    assert "<script" not in lowered and "<link" not in lowered and "http://" not in lowered
    return len(parser.srcs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("evalrun"))


def _parse(argv):
    from kmedtl.evaluation.cli import add_parsers

    parser = argparse.ArgumentParser(prog="kmedtl")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.slow
def test_evaluate_writes_every_artefact(tiny_run, capsys):
    run, _ = tiny_run
    args = _parse(["evaluate", str(run), "--n-boot", "30", "--gradcam", "4",
                   "--examples", "4"])
    assert args.func(args) == 0
    assert "evaluated" in capsys.readouterr().out
    for name in ("metrics.json", "calibration.json", "report.html", "model_card.md",
                 "model_card.json"):
        assert (run / name).is_file(), name
    plots = {p.name for p in (run / "plots").glob("*.png")}
    for name in ("roc_leaf.png", "pr_leaf.png", "confusion_leaf.png", "roc_level_1.png",
                 "confusion_level_2.png", "reliability.png", "training_curves.png",
                 "learning_curve.png", "gradcam.png"):
        assert name in plots, (name, plots)

    m = json.loads((run / "metrics.json").read_text())
    assert m["kind"] == "kmedtl-metrics" and m["bootstrap"]["n_boot"] == 30
    n_test = m["test"]["n"]
    assert n_test == sum(m["data"]["split_sizes"]["test"].values()) == m["n_test"]
    assert set(m["tasks"]) == {"leaf", "level_1", "level_2"}
    assert m["tasks"]["level_2"]["classes"] == ["glioma", "pituitary"]
    assert np.asarray(m["tasks"]["leaf"]["confusion_matrix"]).sum() == n_test
    for ci in m["headline"].values():
        assert set(ci) == {"value", "ci_low", "ci_high"}
        if ci["ci_low"] is not None:
            assert ci["ci_low"] <= ci["value"] + 1e-9 and ci["value"] <= ci["ci_high"] + 1e-9
    assert m["binary"]["negative"] == "normal"
    assert m["binary"]["threshold_chosen_on"] == "val"
    assert m["hierarchical"]["f1"]["value"] is not None
    t = json.loads((run / "calibration.json").read_text())["temperature"]
    assert t > 0 and m["calibration"]["temperature"] == pytest.approx(t)

    html_text = (run / "report.html").read_text()
    assert assert_self_contained(html_text) >= 8
    for words in ("Headline metrics", "Images per split", "Known limitations", "Grad-CAM"):
        assert words in html_text
    card = json.loads((run / "model_card.json").read_text())
    assert card["label_tree"]["leaves"] == ["normal", "glioma", "pituitary"]
    assert card["training_data"]["counts"]["used"] == 48
    assert card["preprocessing"]["image_size"] == [SIZE, SIZE]
    assert "## Known limitations" in (run / "model_card.md").read_text()


@pytest.mark.slow
def test_model_card_from_run_folder(tiny_run, tmp_path):
    """What the export stage calls: the card from the files a run folder holds."""
    from kmedtl.evaluation import model_card_from_run
    from kmedtl.evaluation.stage import evaluate_run

    run, _ = tiny_run
    if not (run / "metrics.json").is_file():
        evaluate_run(run, n_boot=5, n_gradcam=0, n_examples=0)
    card = model_card_from_run(run, out=tmp_path)
    assert (tmp_path / "model_card.md").is_file() and (tmp_path / "model_card.json").is_file()
    assert card["metrics"]["headline"]["accuracy"]["value"] is not None
    assert card["calibration"]["temperature"] > 0
    assert card["training_data"]["split_sizes"]["test"]


@pytest.mark.slow
def test_evaluate_external_test_folder_with_unreadable_file(tiny_run, tmp_path):
    """--test SOURCE evaluates every image there; a broken file is skipped and listed."""
    from kmedtl.evaluation.stage import evaluate_run

    run, data = tiny_run
    ext = tmp_path / "external"
    for raw in ("no_tumor", "glioma_tumor"):
        (ext / raw).mkdir(parents=True)
        for f in sorted((data / raw).glob("*.png"))[:3]:
            (ext / raw / f.name).write_bytes(f.read_bytes())
    (ext / "glioma_tumor" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    doc = evaluate_run(run, test=str(ext), out=out, n_boot=10, n_gradcam=0, n_examples=2)
    assert doc["test"]["n"] == 6
    assert [s["path"].endswith("broken.png") for s in doc["test"]["skipped"]] == [True]
    assert doc["test"]["source"] == str(ext)
    assert "external test" in doc["data"]["split_sizes"]
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
    assert not (out / "plots" / "gradcam.png").exists()


def test_evaluate_missing_model_names_the_file(tmp_path):
    from kmedtl.errors import ConfigError
    from kmedtl.evaluation.stage import evaluate_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"data": {"source": "folder", "root": str(tmp_path)}}))
    with pytest.raises(ConfigError, match="model.keras"):
        evaluate_run(run)
