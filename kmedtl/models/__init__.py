"""kmedtl.models: backbones, truncation, heads and hierarchical workflows.

Uses ``keras`` and ``keras.ops`` only (no ``tensorflow``), so every model trains on the
TensorFlow and the JAX backend.  Import this package before loading a saved ``.keras``
model: it registers kmedtl's layers, models and losses (package ``"kmedtl"``), after which
``keras.saving.load_model(path)`` works with ``safe_mode`` on and no ``custom_objects``.

Every model takes images in ``[0, 1]`` (the backbone normalises them itself, see
:mod:`kmedtl.models.preprocessing`) and reports it as ``model.preprocessing == "unit"``.
"""

from kmedtl.models.backbones import (
    BACKBONES,
    Backbone,
    BackboneSpec,
    backbone,
    backbone_names,
    canonicalise_names,
    get_spec,
    load_backbone_weights,
    register_backbone,
)
from kmedtl.models.cbr import CBR_CONFIGS
from kmedtl.models.flops import count_flops
from kmedtl.models.heads import FlatClassifier
from kmedtl.models.hierarchical import (
    HierarchicalClassifier,
    LeafProbabilities,
    MaskedSparseCategoricalCrossentropy,
    hierarchical_losses,
    hierarchy_targets,
)
from kmedtl.models.multi_input import MultiInputClassifier, StackedMultiInputClassifier
from kmedtl.models.preprocessing import PREPROCESSING_MODES, ImagePreprocessing
from kmedtl.models.pretraining import (
    ContrastivePretrainer,
    PretrainResult,
    default_augmentation,
    nt_xent,
    pretrain_backbone,
)
from kmedtl.models.stacking import MetaClassifier, OutOfFoldStacking, kfold_splits
from kmedtl.models.staged import StagedHierarchicalClassifier
from kmedtl.models.transfusion import transfusion_scale
from kmedtl.models.truncation import CutPoint, cut_points, truncate
from kmedtl.models.weights import read_weight_file, save_backbone, transfer_weights

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "CBR_CONFIGS",
    "ContrastivePretrainer",
    "CutPoint",
    "FlatClassifier",
    "HierarchicalClassifier",
    "ImagePreprocessing",
    "LeafProbabilities",
    "MaskedSparseCategoricalCrossentropy",
    "MetaClassifier",
    "MultiInputClassifier",
    "OutOfFoldStacking",
    "PREPROCESSING_MODES",
    "PretrainResult",
    "StackedMultiInputClassifier",
    "StagedHierarchicalClassifier",
    "backbone",
    "backbone_names",
    "canonicalise_names",
    "count_flops",
    "cut_points",
    "default_augmentation",
    "get_spec",
    "hierarchical_losses",
    "hierarchy_targets",
    "kfold_splits",
    "load_backbone_weights",
    "nt_xent",
    "pretrain_backbone",
    "read_weight_file",
    "register_backbone",
    "save_backbone",
    "transfer_weights",
    "transfusion_scale",
    "truncate",
]
