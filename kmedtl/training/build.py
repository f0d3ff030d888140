"""The model a ``train`` section describes: backbone (cut, weights, weight scaling) and
classifier, built under ``train.precision``.

Shared by the config-driven stages (:mod:`kmedtl.training.run`, which re-exports these
names) and the tuner (:mod:`kmedtl.training.tuning` builds one model per trial), so
neither has to import the other.
"""

from __future__ import annotations

import logging

from kmedtl import models  # looked up per call, as kmedtl.models.<name> (patchable there)
from kmedtl.errors import ConfigError, ModelError
from kmedtl.training.config import TrainSection
from kmedtl.training.precision import precision_policy

log = logging.getLogger("kmedtl.training")


def build_backbone(cfg: TrainSection, input_shape):
    try:
        with precision_policy(cfg.precision):
            return models.backbone(cfg.backbone, weights=cfg.weights, cut=cfg.cut,
                            input_shape=tuple(input_shape))
    except ModelError as exc:
        field = "train.cut" if "cut=" in str(exc) else (
            "train.weights" if "weights" in str(exc) else "train.backbone")
        raise ConfigError(f"{field}: {exc}") from None


def check_weight_scaling(cfg: TrainSection) -> None:
    """``train.weight_scaling: transfusion`` rescales *pretrained* weights: it needs
    ``train.weights`` (checked where the weights are final: the pipeline's pretrain stage
    fills them in after the config is loaded)."""
    if cfg.weight_scaling == "transfusion" and not cfg.weights:
        raise ConfigError("train.weight_scaling: 'transfusion' redraws the pretrained weights "
                          "from their per-tensor mean/std, but train.weights is null (random "
                          "weights); set train.weights (imagenet or a weight file), or "
                          "train.weight_scaling: none")


def build_training_backbone(cfg: TrainSection, input_shape):
    """:func:`build_backbone`, then ``train.weight_scaling`` applied (seed ``train.seed``)."""
    bb = build_backbone(cfg, input_shape)
    if cfg.weight_scaling == "transfusion":
        check_weight_scaling(cfg)
        models.transfusion_scale(bb, seed=cfg.seed)
        log.info("train.weight_scaling: transfusion (per-tensor mean/std of %s)", cfg.weights)
    return bb


def build_model(cfg: TrainSection, hierarchy, input_shape):
    """The classifier of ``train.model`` (``flat`` or ``hierarchical``) over ``train.backbone``
    (cut at ``train.cut``, rescaled as ``train.weight_scaling``), built under
    ``train.precision``."""
    bb = build_training_backbone(cfg, input_shape)
    with precision_policy(cfg.precision):
        if cfg.model == "flat":
            return models.FlatClassifier(bb, hierarchy, dropout=cfg.dropout, pooling=cfg.pooling)
        if cfg.model == "hierarchical":
            return models.HierarchicalClassifier(bb, hierarchy, dropout=cfg.dropout,
                                          pooling=cfg.pooling)
    raise ConfigError(f"train.model: {cfg.model!r} builds no single Keras model; use "
                      "run_training() for the staged workflow")
