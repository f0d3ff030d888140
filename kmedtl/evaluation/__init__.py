"""kmedtl.evaluation: honest numbers for small test sets.

Plain functions on arrays (no hidden state), scikit-learn wherever it has the metric:

- :mod:`~kmedtl.evaluation.metrics`: per-leaf and per-level metrics (accuracy, balanced
  accuracy, kappa, F1, AUROC/AUPRC, sensitivity/specificity, confusion matrices);
- :mod:`~kmedtl.evaluation.hierarchical`: hierarchical precision/recall/F1 and
  hierarchy-inconsistent predictions;
- :mod:`~kmedtl.evaluation.calibration`: ECE, reliability curves, temperature scaling;
- :mod:`~kmedtl.evaluation.uncertainty`: bootstrap CIs, McNemar, paired comparisons,
  mean +- sd over repeats;
- :mod:`~kmedtl.evaluation.learning_curves`, :mod:`~kmedtl.evaluation.plots`;
- :mod:`~kmedtl.evaluation.tta`: test-time augmentation (:func:`predict_tta`);
- :mod:`~kmedtl.evaluation.evaluate`: everything ``metrics.json`` holds, from predictions;
- :mod:`~kmedtl.evaluation.gradcam` (Keras), :mod:`~kmedtl.evaluation.report` (HTML),
  :mod:`~kmedtl.evaluation.model_card`, :mod:`~kmedtl.evaluation.stage` (a run folder end to
  end) and :mod:`~kmedtl.evaluation.cli` (``kmedtl evaluate``).

Importing the package loads Keras (``GradCAM``, ``TemperatureScaling`` and the run
folder's model loading need it) but not TensorFlow: ``evaluate_run`` and ``predict`` load
the ``tf.data`` pipeline on first use, so everything else runs under ``KERAS_BACKEND=jax``.

Example::

    >>> import numpy as np
    >>> from kmedtl.evaluation import bootstrap_ci, classification_metrics
    >>> y = np.array([0, 1, 1, 0]); p = np.array([[.8, .2], [.3, .7], [.6, .4], [.9, .1]])
    >>> classification_metrics(y, p)["accuracy"]
    0.75
"""

from kmedtl.evaluation.calibration import (
    apply_temperature,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    load_calibration,
    negative_log_likelihood,
    reliability_curve,
    save_calibration,
)
from kmedtl.evaluation.evaluate import evaluate_predictions, flat_values, summarise_metrics
from kmedtl.evaluation.gradcam import GradCAM, find_target_layer, grad_cam, overlay
from kmedtl.evaluation.hierarchical import (
    ancestor_sets,
    greedy_leaf,
    hierarchical_prf,
    inconsistency_rate,
    inconsistent_mask,
    level_predictions,
)
from kmedtl.evaluation.layers import TemperatureScaling
from kmedtl.evaluation.learning_curves import (
    learning_curve,
    load_learning_curve,
    save_learning_curve,
    summarise_learning_curve,
)
from kmedtl.evaluation.metrics import (
    Task,
    auprc_per_class,
    auroc_per_class,
    binary_view,
    classification_metrics,
    confusion,
    level_view,
    negative_class,
    operating_point,
    specificity_per_class,
    task_view,
    tasks,
    threshold_for_sensitivity,
)
from kmedtl.evaluation.model_card import (
    build_model_card,
    known_limitations,
    label_tree_text,
    model_card_from_run,
    render_model_card,
    write_model_card,
)
from kmedtl.evaluation.report import render_report, write_report
from kmedtl.evaluation.stage import evaluate_run, predict
from kmedtl.evaluation.tta import predict_tta
from kmedtl.evaluation.uncertainty import (
    bootstrap,
    bootstrap_ci,
    bootstrap_indices,
    compare_models,
    format_interval,
    format_mean_sd,
    mcnemar,
    mean_sd,
    summarise_repeats,
)

__all__ = [
    "GradCAM",
    "Task",
    "TemperatureScaling",
    "ancestor_sets",
    "apply_temperature",
    "auprc_per_class",
    "auroc_per_class",
    "binary_view",
    "bootstrap",
    "bootstrap_ci",
    "bootstrap_indices",
    "build_model_card",
    "calibrate",
    "classification_metrics",
    "compare_models",
    "confusion",
    "evaluate_predictions",
    "evaluate_run",
    "expected_calibration_error",
    "find_target_layer",
    "fit_temperature",
    "flat_values",
    "format_interval",
    "format_mean_sd",
    "grad_cam",
    "greedy_leaf",
    "hierarchical_prf",
    "inconsistency_rate",
    "inconsistent_mask",
    "known_limitations",
    "label_tree_text",
    "learning_curve",
    "level_predictions",
    "level_view",
    "load_calibration",
    "load_learning_curve",
    "mcnemar",
    "mean_sd",
    "model_card_from_run",
    "negative_class",
    "negative_log_likelihood",
    "operating_point",
    "overlay",
    "predict",
    "reliability_curve",
    "render_model_card",
    "render_report",
    "save_calibration",
    "predict_tta",
    "save_learning_curve",
    "specificity_per_class",
    "summarise_learning_curve",
    "summarise_metrics",
    "summarise_repeats",
    "task_view",
    "tasks",
    "threshold_for_sensitivity",
    "write_model_card",
    "write_report",
]
