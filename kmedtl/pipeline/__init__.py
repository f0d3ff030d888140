"""kmedtl.pipeline: one pipeline YAML, end to end, resumable (``kmedtl run PIPELINE.yaml``).

A pipeline file is a run config (:class:`kmedtl.config.Config`) plus a ``pipeline:``
section (:class:`~kmedtl.pipeline.spec.PipelineSection`)::

    pipeline:
      stages: [audit, split, pretrain, tune, train, evaluate, export, push]
      fold: 0
      pretrain: {method: supervised, task: level1, epochs: 5}
      evaluate: {n_boot: 1000}
      export: {formats: [savedmodel, tflite, onnx], verify: true}
      push: {root: saved_models, thresholds: {balanced_accuracy: 0.7}}

Run folder (``<output_dir>/<name>/`` or ``--run-dir``)::

    pipeline.yaml        the resolved pipeline (defaults filled in)
    stages/<stage>.json  one record per stage: status (running/done/failed/interrupted),
                         fingerprint, upstream tokens, inputs, outputs (paths, sizes),
                         started/finished/seconds, attempts, result (the stage's summary)
    data/audit.json      audit stage: counts, skipped files, duplicates, patient overlap
    data/splits.json     split stage: the leakage-free split (kmedtl-splits v1)
    pretrain/            pretrain stage: backbone.weights.h5, pretrain.json
    tuning/              tune stage (search space: train.tune): best_config.yaml (the
                         best trial's whole config, which the train stage trains, as
                         kmedtl tune writes it; the search's provenance is in
                         stages/tune.json), results.csv, results.md, search/
                         (KerasTuner), features/
    config.yaml, splits.json, audit.json, model.keras, checkpoints/, backup/, logs/,
    history.csv, train_metrics.json      train stage (contract: kmedtl.training)
    metrics.json, report.html, model_card.*, calibration.json, plots/   evaluate stage
    <export_run's folder>                export stage; push: saved_models/<name>/<version>/
    summary.md, summary.json             one page: counts reconciled, split sizes,
                                         test metrics with CIs, export parity, push, times

Resume: see :mod:`kmedtl.pipeline.records` (fingerprints, tokens) and
:mod:`kmedtl.pipeline.runner`.  Python::

    from kmedtl.pipeline import run_pipeline
    result = run_pipeline("pipelines/brain_tumor_hierarchical.yaml")
    result.ran, result.skipped, result.summary["test"]["headline"]
"""

from kmedtl.pipeline.runner import PipelineResult, run_pipeline
from kmedtl.pipeline.spec import STAGES, Pipeline, PipelineSection, load_pipeline

__all__ = ["STAGES", "Pipeline", "PipelineResult", "PipelineSection", "load_pipeline",
           "run_pipeline"]
