"""kmedtl.training: freezing schedules, learning-rate schedules, the fit loop and the tuner.

Uses ``keras``, ``keras.ops`` and ``keras_tuner`` only (``tf.distribute`` and TF's
determinism switch are isolated in :mod:`kmedtl.training.distribute`).  Importing this
package registers its serializable objects (``kmedtl>DiscriminativeOptimizer``,
``kmedtl>OneCycle``, ``kmedtl>SparseAUC``, ...).

Parts, each usable alone
------------------------
- :class:`Trainer` / :func:`fine_tune` -- the fit loop (:mod:`~kmedtl.training.trainer`);
- :class:`RunConfig` / :func:`load_run_config` -- the whole run config, validated once at
  load; :class:`TrainSection` / :func:`train_section` -- its typed ``train:`` section;
- freezing: :func:`freeze_backbone`, :func:`freeze_batchnorm`, :func:`freeze_below`,
  :func:`freeze_first`,
  :func:`unfreeze_all`, :func:`layer_groups`, :func:`group_multipliers`,
  :func:`plan_phases`;
- :class:`DiscriminativeOptimizer` -- per-group LR multipliers around any optimizer;
- schedules: :class:`OneCycle`, :class:`OneCycleMomentum`, :class:`OffsetSchedule`,
  :class:`ExponentialSweep`, :func:`make_schedule` (cosine and step are Keras');
- :func:`lr_find` -- the LR range test with a loss-vs-LR plot;
- :func:`kmedtl.training.pretrain.pretrain` -- same-domain pretraining of a backbone
  (SimCLR, rotation, supervised), saved atomically; ``kmedtl run``'s pretrain stage and the
  study both call it (not re-exported here: the name is its module's);
- :class:`SparseAUC`, :class:`CohenKappa`, :class:`SmoothedSparseCategoricalCrossentropy`;
- :class:`FeatureCache`, :func:`split_at_features` -- cached frozen-backbone features;
- tuning (imported on first use): :class:`TransferHyperModel`, :func:`run_search`,
  :class:`TuningError`;
- config-driven stages: :func:`run_training`, :func:`run_tuning`, :func:`run_lr_find`,
  :func:`build_model`; CLI: :func:`kmedtl.training.cli.add_parsers`.

Run folder (contract)
---------------------
``kmedtl train CONFIG [--epochs N] [--run-dir D] [--fold K] [--overwrite]``
(:func:`run_training`) writes one folder per run,
``<output_dir>/<name>/`` (default ``runs/<name>/``, or ``--run-dir``)::

    runs/<name>/
      config.yaml          the resolved config: every section with defaults filled in, the
                           validated train section, data.hierarchy inlined as a mapping
                           (yaml.safe_dump, sort_keys=False); load_config() reads it back
      splits.json          the leakage-free split (kind "kmedtl-splits", version 1; see
                           kmedtl.data.splits.Splits.load); training used the fold
                           recorded as "fold" in train_metrics.json (0 unless --fold)
      audit.json           the data audit report (kmedtl.data.audit.public)
      model.keras          the best model (by train.monitor), without optimizer or compile
                           state: keras.saving.load_model(path) works in a fresh process
                           after `import kmedtl.models` (safe_mode on, no custom_objects);
                           it takes float32 images in [0, 1] of data.image.size/channels;
                           outputs: "leaf" (flat), or {"leaf", "<parent>"...}
                           (hierarchical / staged), softmax probabilities over
                           Hierarchy.leaves / each parent's children; multi_input: one
                           input per image type, named after it (data.columns.path, else
                           "image", then data.extra_columns), outputs as its head
      checkpoints/
        best.weights.h5    weights (with optimizer state) at the best epoch
        last.weights.h5    weights after the last epoch
                           (staged runs: stage_<node>.weights.h5 per node model)
      backup/              keras.callbacks.BackupAndRestore state (phase_<k>/) plus
                           state.json and phase_end.npz while the run is unfinished;
                           empty once it completes; a rerun resumes from it
      logs/                TensorBoard event files (train/, validation/)
      history.csv          one row per epoch (keras CSVLogger): epoch, loss, metrics
                           (accuracy, auc, kappa; prefixed "leaf_" for hierarchical
                           models; per-head *_loss), val_* columns, learning_rate.
                           Staged runs: one row per (stage, fold, epoch) with columns
                           stage, fold, epoch, loss, ...
      train_metrics.json   {"kind": "kmedtl-train-metrics", "version": 1,
                            "model", "backbone", "cut", "leaves", "hierarchy",
                            "n_train", "n_val", "n_test",
                            "epochs": [indices run], "monitor", "mode",
                            "best_epoch", "best_value", "stopped_early",
                            "phases": [{index, start_epoch, end_epoch, name}],
                            "train_metrics": {...}, "val_metrics": {...}  (best model,
                               un-augmented data; Keras metric names as in history.csv),
                            "history": {column: [per-epoch values]},
                            "timings": {total_seconds, fit_seconds, first_epoch_seconds,
                               median_epoch_seconds, steps_per_epoch, images_per_second},
                            "prepare_seconds", "jit_compile", "precision", "backend",
                            "distribute", "replicas", "resumed_from_epoch", "run_dir",
                            "config": the train section}
                           ("jit_compile" is whether XLA was really used: false after the
                           fallback, or when Keras turned it off, e.g. under determinism)
                           (staged: model "staged", train_metrics/val_metrics with
                           accuracy, kappa, auc from predict_proba, timings, stages)
                           (multi_input: also "inputs" [image types] and "multi_input"
                           {fusion, head, shared_backbone})

``kmedtl tune`` adds ``tuning/`` (``results.csv``, ``results.md``,
``best_config.yaml`` -- a full config for ``kmedtl train`` -- ``search/`` KerasTuner's
project, ``features/`` the on-disk feature cache); ``kmedtl lr-find`` writes
``lr_find.png`` and ``lr_find.json``.
"""

from kmedtl.config import RECOMMENDED_RECIPE
from kmedtl.models.precision import precision_policy, resolve_precision
from kmedtl.training.config import (
    MultiInputSection,
    OneCycleSection,
    RunConfig,
    StagedSection,
    TrainSection,
    TuneSection,
    load_run_config,
    resolved_config,
    run_config,
    train_section,
)
from kmedtl.training.features import FeatureCache, split_at_features
from kmedtl.training.freezing import (
    LayerGroup,
    Phase,
    freeze_backbone,
    freeze_batchnorm,
    freeze_below,
    freeze_first,
    group_multipliers,
    layer_groups,
    plan_phases,
    set_trainable,
    unfreeze_all,
)
from kmedtl.training.losses import SmoothedSparseCategoricalCrossentropy
from kmedtl.training.lr_finder import LRFinderResult, lr_find
from kmedtl.training.metrics import CohenKappa, SparseAUC
from kmedtl.training.optimizers import DiscriminativeOptimizer, make_optimizer
from kmedtl.training.schedules import (
    ExponentialSweep,
    OffsetSchedule,
    OneCycle,
    OneCycleMomentum,
    make_schedule,
)
from kmedtl.training.stage import build_model, run_lr_find, run_training, run_tuning
from kmedtl.training.trainer import Trainer, TrainResult, fine_tune, save_inference_model

_LAZY = {"TransferHyperModel", "run_search", "TuningError", "preflight", "SearchResult"}


def __getattr__(name):  # PEP 562: keras_tuner is imported on first use of the tuner
    if name in _LAZY:
        # lazy: keras_tuner loads TensorFlow, absent under KERAS_BACKEND=jax
        from kmedtl.training import tuning

        return getattr(tuning, name)
    raise AttributeError(f"module 'kmedtl.training' has no attribute {name!r}")


__all__ = [
    "CohenKappa",
    "DiscriminativeOptimizer",
    "ExponentialSweep",
    "FeatureCache",
    "LRFinderResult",
    "LayerGroup",
    "OffsetSchedule",
    "OneCycle",
    "OneCycleMomentum",
    "OneCycleSection",
    "Phase",
    "SearchResult",
    "SmoothedSparseCategoricalCrossentropy",
    "SparseAUC",
    "MultiInputSection",
    "RECOMMENDED_RECIPE",
    "RunConfig",
    "StagedSection",
    "TrainResult",
    "TrainSection",
    "Trainer",
    "TransferHyperModel",
    "TuneSection",
    "TuningError",
    "build_model",
    "fine_tune",
    "freeze_backbone",
    "freeze_batchnorm",
    "freeze_below",
    "freeze_first",
    "group_multipliers",
    "layer_groups",
    "load_run_config",
    "lr_find",
    "make_optimizer",
    "make_schedule",
    "plan_phases",
    "precision_policy",
    "preflight",
    "resolve_precision",
    "resolved_config",
    "run_lr_find",
    "run_search",
    "run_config",
    "run_training",
    "run_tuning",
    "save_inference_model",
    "set_trainable",
    "split_at_features",
    "train_section",
    "unfreeze_all",
]
