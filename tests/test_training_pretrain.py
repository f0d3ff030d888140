"""The one pretraining operation (kmedtl.training.pretrain) that `kmedtl run`'s pretrain stage
and the study call, and the study's use of the library's model builder."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from models_helpers import images

from kmedtl.errors import ConfigError
from kmedtl.models import backbone
from kmedtl.training import pretrain as P
from kmedtl.training.config import train_section


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "jigsaw"}, "method 'jigsaw' is not one of"),
    ({"method": "supervised"}, "needs labels y and their classes"),
    ({"method": "rotation", "train": "x"}, "needs method 'supervised'"),
    ({"method": "rotation", "backbone": None}, "give the backbone to train"),
    # `kmedtl run`'s name for simclr is accepted (it gets as far as the missing backbone)
    ({"method": "contrastive", "backbone": None}, "give the backbone to train"),
])
def test_bad_arguments_name_what_is_wrong(tmp_path, kwargs, message):
    args = {"backbone": object(), "path": tmp_path / "bb.weights.h5", **kwargs}
    with pytest.raises(ConfigError, match=message):
        P.pretrain(images(4), **args)


def test_a_path_keras_cannot_write_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="use a .keras or .weights.h5 file name"):
        P.pretrain(images(4), method="rotation", backbone=object(), path=tmp_path / "bb.h5")


def test_rotations_label_each_quarter_turn():
    x = np.arange(2 * 3 * 3, dtype="float32").reshape(2, 3, 3, 1)
    xr, yr = P.rotations(x)
    assert xr.shape == (8, 3, 3, 1) and yr.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(xr[2], np.rot90(x[0], 1, axes=(0, 1)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rotation", "simclr", "supervised"])
def test_pretrain_saves_the_recalibrated_backbone_atomically(tmp_path, method):
    keras.utils.set_random_seed(0)
    x, y = images(8), np.arange(8) % 2
    path = tmp_path / "bb.weights.h5"
    out = P.pretrain(x, y if method == "supervised" else None, method=method,
                     backbone=backbone("cbr_tiny", input_shape=(32, 32, 1)),
                     classes=["a", "b"] if method == "supervised" else None, path=path,
                     epochs=1, batch_size=4)
    assert out.path == path and path.is_file() and not _leftovers(tmp_path)
    assert len(out.losses) == 1 and np.isfinite(out.losses[0]) and out.recalibrated > 0
    loaded = backbone("cbr_tiny", weights=path, input_shape=(32, 32, 1))
    for a, b in zip(loaded.weights, out.model.backbone.weights):  # BN statistics included
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.slow
def test_the_recipe_route_builds_through_build_model(tmp_path, monkeypatch):
    seen = []
    real = P.build_model
    monkeypatch.setattr(P, "build_model", lambda cfg, *a: seen.append(cfg) or real(cfg, *a))
    tc = train_section({"backbone": "cbr_tiny", "model": "hierarchical", "epochs": 1,
                        "batch_size": 4, "tensorboard": False, "verbose": 0,
                        "recalibrate_bn": False}, "test")
    out = P.pretrain(images(8), np.arange(8) % 2, method="supervised", train=tc,
                     classes=["a", "b"], path=tmp_path / "bb.keras", recalibrate=False)
    assert [c.model for c in seen] == ["flat"] and out.recalibrated is None
    assert (tmp_path / "bb.keras").is_file() and not _leftovers(tmp_path)


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "bb.weights.h5"
    path.write_bytes(b"old")

    class Fake:
        backbone = None

    def broken_save(model, where):
        where.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(P, "pretrain_backbone",
                        lambda *a, **k: type("R", (), {"model": Fake(), "history":
                                                       keras.callbacks.History()})())
    monkeypatch.setattr(P, "save_backbone", broken_save)
    with pytest.raises(OSError, match="disk full"):
        P.pretrain(images(4), method="rotation", backbone=object(), path=path,
                   recalibrate=False)
    assert path.read_bytes() == b"old" and not _leftovers(tmp_path)


@pytest.mark.slow
def test_a_study_cell_builds_through_build_model_with_the_pretrained_weights(tmp_path,
                                                                            monkeypatch):
    from kmedtl.hierarchy import Hierarchy
    from kmedtl.study import training as T
    from kmedtl.study.config import Pretrain

    h = Hierarchy({"normal": None, "tumor": {"a": None, "b": None}})

    class Split:
        hierarchy = h
        x = images(12)
        y = np.arange(12) % 3

        def subset(self, n, seed):
            return np.arange(9)

        @property
        def x_test(self):
            return self.x[9:]

    split = Split()
    recipe = {"model": "flat", "backbone": "cbr_micro", "epochs": 1, "batch_size": 4}
    path = tmp_path / "pre.weights.h5"
    info = T.pretrain(split, Pretrain(method="level1", epochs=1, batch_size=4), np.arange(9),
                      path, "cbr_micro", recipe)
    assert info["path"] == str(path) and path.is_file()
    seen = []
    real = T.build_model
    monkeypatch.setattr(T, "build_model", lambda cfg, *a: seen.append(cfg) or real(cfg, *a))
    out = T.train_cell(split, recipe, 3, 0, weights=path)
    assert [c.weights for c in seen] == [str(path)] and out["probs"].shape == (3, 3)
