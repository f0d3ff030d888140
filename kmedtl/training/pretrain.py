"""Same-domain pretraining of a backbone: the one operation ``kmedtl run``'s pretrain stage
and the study both call.

:func:`pretrain` trains a backbone on images the target task does not use and saves its
weights (matched by layer name when loaded: ``backbone(name, weights=path)``, so the target
may cut it, TruncatedTL).  Methods:

- ``simclr`` (``kmedtl run`` calls it ``contrastive``):
  :class:`~kmedtl.models.ContrastivePretrainer` (two augmented views per image, NT-Xent),
  no labels;
- ``rotation``: "which of four 90-degree rotations is this image" (RotNet, Gidaris et al.
  2018) through :func:`~kmedtl.models.pretrain_backbone`, no labels;
- ``supervised``: a flat head over the backbone on the labels ``y`` over ``classes`` (a
  coarser or different label task, e.g. the level-1 nodes of the hierarchy).  Either plain
  Adam (:func:`~kmedtl.models.pretrain_backbone`, the backbone given), or -- with
  ``train=`` -- the whole kmedtl recipe of a :class:`~kmedtl.training.TrainSection`
  (:func:`~kmedtl.training.build.build_model` and the Trainer: strategy, schedules,
  frozen BN, precision), e.g. ImageNet weights then intermediate same-domain training
  (Romero et al. 2020).

Afterwards BatchNorm statistics may be re-averaged over ``x`` (``recalibrate``), and the
backbone is saved atomically: into a temporary sibling, renamed over ``path`` (the
temporary file is removed when anything fails).

Example::

    bb = backbone("cbr_tiny", input_shape=x.shape[1:])
    out = pretrain(x, method="rotation", backbone=bb, path="runs/bb.weights.h5", epochs=5)
    target = backbone("cbr_tiny", weights=out.path, input_shape=x.shape[1:])  # may cut it
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from kmedtl.errors import ConfigError
from kmedtl.models import ContrastivePretrainer, pretrain_backbone, save_backbone
from kmedtl.training.batchnorm import recalibrate_batchnorm
from kmedtl.training.build import build_model
from kmedtl.training.config import TrainSection
from kmedtl.training.trainer import Trainer

METHODS = ("simclr", "rotation", "supervised")
#: Other names of a method (``kmedtl run``'s ``pipeline.pretrain.method: contrastive``).
ALIASES = {"contrastive": "simclr"}
ROTATION_CLASSES = ("r0", "r90", "r180", "r270")


@dataclass
class Pretrained:
    """What :func:`pretrain` did: the saved file, the trained model (the backbone is
    ``model.backbone``) and the per-epoch history (``{"loss": [...], ...}``)."""

    path: Path
    model: keras.Model
    history: dict = field(default_factory=dict)
    recalibrated: int | None = None  # BatchNorm layers re-averaged (None: not asked)

    @property
    def losses(self) -> list[float]:
        return list(self.history.get("loss") or [])


def rotations(x: np.ndarray):
    """Each image in its four 90-degree rotations, labelled 0..3 (RotNet, Gidaris 2018)."""
    xs = [np.rot90(x, k, axes=(1, 2)) for k in range(4)]
    return np.concatenate(xs).astype("float32"), np.repeat(np.arange(4), len(x))


def _check(method, x, y, backbone, train, classes):
    if method not in METHODS:
        raise ConfigError(f"pretrain: method {method!r} is not one of "
                          f"{list(METHODS) + list(ALIASES)}")
    if train is not None and method != "supervised":
        raise ConfigError(f"pretrain: train= (a train recipe) needs method 'supervised', got "
                          f"{method!r}")
    if train is not None and not isinstance(train, TrainSection):
        raise ConfigError(f"pretrain: train= must be a TrainSection, got {type(train).__name__}")
    if (backbone is None) == (train is None):
        raise ConfigError("pretrain: give the backbone to train (backbone=), or a train recipe "
                          "that builds it (train=, method 'supervised'), not both")
    if method == "supervised" and (y is None or classes is None):
        raise ConfigError("pretrain: method 'supervised' needs labels y and their classes")
    if y is not None and len(y) != len(x):
        raise ConfigError(f"pretrain: {len(x)} images but {len(y)} labels")


def _temporary(path: Path) -> Path:
    # Keras picks the format by the suffix, so the temporary file keeps it
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    return path.with_name(f".{path.name}.tmp{suffix}")


def pretrain(x, y=None, *, method: str, path, backbone=None, train: TrainSection | None = None,
             classes=None, epochs: int = 10, batch_size: int = 32,
             learning_rate: float = 1e-3, dropout: float = 0.0, temperature: float = 0.1,
             recalibrate: bool = True, verbose=0) -> Pretrained:
    """Pretrain a backbone on the images ``x`` (``(N, H, W, C)``, ``[0, 1]``) and save it to
    ``path`` (``.weights.h5`` or ``.keras``); see the module docstring for ``method``.

    ``backbone``: the Keras backbone to train (``simclr``, ``rotation``, plain
    ``supervised``: Adam at ``learning_rate``, sparse cross-entropy, ``dropout`` before the
    head).  ``train``: instead of a backbone, the train section whose
    :func:`~kmedtl.training.build.build_model` (``model: flat``) and Trainer do the
    supervised fit (its own epochs, batch size and optimiser).  ``recalibrate``:
    re-average BatchNorm statistics over ``x`` (the original images, not the rotations)
    after training.  The caller seeds the run (``keras.utils.set_random_seed``)."""
    method = ALIASES.get(method, method)
    _check(method, x, y, backbone, train, classes)
    path = Path(path)
    if not path.name.endswith((".keras", ".weights.h5")):
        raise ConfigError(f"pretrain: path {str(path)!r}: use a .keras or .weights.h5 file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fit = {"epochs": int(epochs), "batch_size": int(batch_size), "shuffle": True,
           "verbose": verbose}
    if train is not None:
        cfg = train if train.model == "flat" else train.derive("pretrain", model="flat")
        model = build_model(cfg, list(classes), tuple(x.shape[1:]))
        history = Trainer(model, cfg).fit((x, np.asarray(y))).history
    elif method == "simclr":
        model = ContrastivePretrainer(backbone, temperature=temperature)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate))
        history = model.fit(x, **fit).history
    else:
        if method == "rotation":
            xs, ys, classes = *rotations(x), list(ROTATION_CLASSES)
        else:
            xs, ys = x, np.asarray(y)
        res = pretrain_backbone(
            backbone, xs, ys, classes=classes, path=None, dropout=dropout,
            compile_kwargs={"optimizer": keras.optimizers.Adam(learning_rate),
                            "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
            fit_kwargs=fit)
        model, history = res.model, res.history.history
    recalibrated = recalibrate_batchnorm(model.backbone, x, batch_size=256) if recalibrate \
        else None
    tmp = _temporary(path)
    try:
        save_backbone(model, tmp)
        tmp.replace(path)  # atomic by rename (Keras writes the file by name, not a handle)
    finally:
        tmp.unlink(missing_ok=True)
    return Pretrained(path, model, {k: [float(v) for v in vs] for k, vs in history.items()},
                      recalibrated)


__all__ = ["METHODS", "Pretrained", "pretrain", "rotations"]
