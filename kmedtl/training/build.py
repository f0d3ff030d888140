"""The model a ``train`` section describes: backbone (cut, weights, weight scaling) and
classifier, built under ``train.precision``.

Shared by the config-driven stages (:mod:`kmedtl.training.stage`, which re-exports these
names) and the tuner (:mod:`kmedtl.training.tuning` builds one model per trial), so
neither has to import the other.
"""

from __future__ import annotations

import logging

from kmedtl import models  # looked up per call, as kmedtl.models.<name> (patchable there)
from kmedtl.errors import ConfigError, ModelError
from kmedtl.models.precision import precision_policy
from kmedtl.training.config import TrainSection

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


def build_model(cfg: TrainSection, hierarchy, input_shape, input_names=None):
    """The classifier of ``train.model`` (``flat``, ``hierarchical`` or ``multi_input``) over
    ``train.backbone`` (cut at ``train.cut``, rescaled as ``train.weight_scaling``), built
    under ``train.precision``.

    ``multi_input`` needs ``input_names`` (the image types, main image first:
    :func:`kmedtl.data.prepare.input_names`): a
    :class:`~kmedtl.models.MultiInputClassifier` with one input per name (each of
    ``input_shape``), fused as ``train.multi_input.fusion`` under a
    ``train.multi_input.head`` head, over one shared backbone or one per input
    (``train.multi_input.shared_backbone``)."""
    if cfg.model == "multi_input":
        return build_multi_input(cfg, hierarchy, input_shape, input_names)
    if input_names is not None and len(input_names) > 1:
        raise ConfigError(f"train.model: {cfg.model!r} takes one image, but the data has "
                          f"{len(input_names)} image inputs {list(input_names)} "
                          "(data.extra_columns); set train.model: multi_input, or drop "
                          "data.extra_columns")
    bb = build_training_backbone(cfg, input_shape)
    with precision_policy(cfg.precision):
        if cfg.model == "flat":
            return models.FlatClassifier(bb, hierarchy, dropout=cfg.dropout, pooling=cfg.pooling)
        if cfg.model == "hierarchical":
            return models.HierarchicalClassifier(bb, hierarchy, dropout=cfg.dropout,
                                          pooling=cfg.pooling)
    raise ConfigError(f"train.model: {cfg.model!r} builds no single Keras model; use "
                      "run_training() for the staged workflow")


def check_multi_input(cfg: TrainSection, input_names) -> list[str]:
    """``train.model: multi_input`` needs at least two image inputs (the manifest's main
    image and ``data.extra_columns``); returns the names."""
    names = list(input_names or ())
    if len(names) < 2:
        raise ConfigError(
            "train.model: 'multi_input' needs several images per case: use a CSV manifest "
            "(data.source: manifest) and list its further image columns in "
            f"data.extra_columns (got inputs {names or ['image']}); name the main image's "
            "input with data.columns: {path: <its column>}")
    return names


def build_multi_input(cfg: TrainSection, hierarchy, input_shape, input_names):
    """:class:`~kmedtl.models.MultiInputClassifier` of a ``multi_input`` train section."""
    names = check_multi_input(cfg, input_names)
    mi = cfg.multi_input
    if mi.shared_backbone:
        bbs = build_training_backbone(cfg, input_shape)
    else:  # one backbone per image type, each with the configured weights
        bbs = {name: build_training_backbone(cfg, input_shape) for name in names}
    try:
        with precision_policy(cfg.precision):
            return models.MultiInputClassifier(
                bbs, hierarchy, input_names=names if mi.shared_backbone else None,
                fusion=mi.fusion, head=mi.head, dropout=cfg.dropout, pooling=cfg.pooling)
    except ModelError as exc:
        raise ConfigError(f"train.multi_input: {exc}") from None


def targets_for(cfg: TrainSection) -> str:
    """The dataset targets the model of ``cfg`` trains on: the per-head dict for a
    hierarchical head, else leaf indices."""
    if cfg.model == "hierarchical":
        return "hierarchy"
    if cfg.model == "multi_input" and cfg.multi_input.head == "hierarchical":
        return "hierarchy"
    return "leaf"

