"""Config-driven stages: ``kmedtl train``, ``kmedtl tune`` and ``kmedtl lr-find``.

Each prepares the data once (:func:`kmedtl.data.prepare.prepare`: index, audit, cache,
leakage-free split), builds the model the ``train`` section describes under the chosen
precision (and distribution strategy), and writes the run folder described in
:mod:`kmedtl.training`.  The model builders live in :mod:`kmedtl.training.build` (shared
with the tuner) and are re-exported here.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from kmedtl import models  # looked up per call, as kmedtl.models.<name> (patchable there)
from kmedtl.data.audit import public
from kmedtl.data.prepare import Prepared, input_names, prepare, primary_input
from kmedtl.errors import ConfigError
from kmedtl.jsonio import write_json
from kmedtl.ownership import run_lock
from kmedtl.run_folder import RunFolder
from kmedtl.training import data_parallel
from kmedtl.training.build import (  # noqa: F401  (build_backbone, targets_for: re-exported)
    build_backbone,
    build_model,
    build_training_backbone,
    check_multi_input,
    check_weight_scaling,
    targets_for,
)
from kmedtl.training.config import RunConfig, resolved_config, run_config
from kmedtl.training.distribute import enable_determinism, get_strategy, strategy_scope
from kmedtl.training.features import FeatureCache, materialise
from kmedtl.training.freezing import plan_phases
from kmedtl.training.lr_finder import lr_find
from kmedtl.training.trainer import Trainer, save_inference_model


# ---------------------------------------------------------------------------- data
# Every function here takes one RunConfig (kmedtl.training.config): its train section is
# validated, and the rules across sections (data.normalization, image size vs backbone)
# checked, when it was loaded.
def datasets(cfg: RunConfig, prep, targets: str, fold: int = 0) -> dict:
    """``train`` (shuffled, augmented, balanced as ``data.balance``), ``train_eval``
    (plain), ``val`` (or None) and the step count for one epoch."""
    # lazy: tf.data loads TensorFlow, absent under KERAS_BACKEND=jax
    from kmedtl.data.pipeline import make_dataset

    tc = cfg.train
    common = dict(hierarchy=prep.hierarchy, options=prep.options, cache=prep.cache,
                  batch_size=tc.batch_size, targets=targets, normalization="unit",
                  decoder=cfg.data.decoder, primary_input=primary_input(cfg.data))
    train_samples, val_samples = prep.samples("train", fold), prep.samples("val", fold)
    if not train_samples:
        raise ConfigError("split: the training split is empty; check data.root and split.*")
    out = {
        "train": make_dataset(train_samples, training=True, seed=tc.seed,
                              augment=cfg.augmentation(seed=tc.seed),
                              balance=cfg.data.balance, **common),
        "train_eval": make_dataset(train_samples, **common),
        "val": make_dataset(val_samples, **common) if val_samples else None,
        "n_train": len(train_samples), "n_val": len(val_samples),
        "n_test": len(prep.samples("test", fold)),
    }
    out["steps_per_epoch"] = tc.steps_per_epoch or (
        math.ceil(len(train_samples) / tc.batch_size) if cfg.data.balance == "sampling" else None)
    return out


def model_inputs(cfg: RunConfig) -> list[str] | None:
    """The image inputs the configured model takes (``multi_input``: checked, at least
    two), else ``None``; a multi-image source for a single-image model is an error."""
    tc = cfg.train
    names = input_names(cfg.data)
    if tc.model == "multi_input":
        return check_multi_input(tc, names)
    if len(names) > 1:
        raise ConfigError(f"train.model: {tc.model!r} takes one image per case, but the data "
                          f"has {len(names)} image inputs {names} (data.extra_columns); set "
                          "train.model: multi_input, or drop data.extra_columns")
    return None


def check_tunable(tc) -> None:
    """The tuner searches single-input backbones/cuts/strategies, one Keras model per
    trial: not ``staged`` or ``multi_input``; and ``train.weight_scaling`` needs weights."""
    check_weight_scaling(tc)
    if tc.model == "staged":
        raise ConfigError("train.model: the search builds one Keras model per trial; tune "
                          "with flat or hierarchical, then train staged with the best config")
    if tc.model == "multi_input":
        raise ConfigError("train.model: the search (kmedtl tune, the 'tune' stage) builds "
                          "single-image models; tune train.model flat or hierarchical on the "
                          "main image, then train multi_input with the chosen settings")


# ---------------------------------------------------------------------------- run folder
# The layout (file names, what each holds, atomic writes) is kmedtl.run_folder.RunFolder's;
# training writes through it.
def run_folder(cfg, run_dir=None) -> Path:
    return RunFolder.for_config(cfg, run_dir).path


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, clear) a folder holding a finished run; create it."""
    rf = RunFolder(run_dir)
    if rf.training_finished:
        if not overwrite:
            raise ConfigError(f"{run_dir}: already holds a finished run "
                              f"({RunFolder.TRAIN_METRICS}); pass --overwrite, another "
                              "--run-dir, or change name:")
        rf.clear_training()
    rf.path.mkdir(parents=True, exist_ok=True)


def write_provenance(run_dir: Path, cfg: RunConfig, prep) -> None:
    """``config.yaml`` (resolved), ``splits.json`` and ``audit.json``, each atomically."""
    rf = RunFolder(run_dir)
    rf.write_config(resolved_config(cfg, prep.hierarchy))
    rf.write_splits(prep.splits, root=prep.index.root)
    rf.write_audit(public(prep.report))


# ---------------------------------------------------------------------------- train
def run_training(cfg, run_dir=None, *, epochs: int | None = None, overwrite: bool = False,
                 label: str = "config", callbacks=(), fold: int = 0,
                 prepared: Prepared | None = None):
    """``kmedtl train``: prepare data, build, train, write ``runs/<name>/``.

    Returns the :class:`~kmedtl.training.TrainResult` (staged runs: a dict).  An
    interrupted run (``backup/`` holds its state) resumes when called again.  ``fold``
    picks the fold of a k-fold / repeated split (recorded as ``"fold"`` in
    ``train_metrics.json``).  ``cfg``: a :class:`~kmedtl.training.config.RunConfig`
    (``kmedtl run`` passes the one its pipeline loaded, with the tune and pretrain stages'
    results derived into it), or a config :func:`~kmedtl.training.config.run_config`
    lifts into one.  ``prepared``: the data already prepared from ``cfg``'s data and split sections
    (``kmedtl run`` passes the one its split stage wrote, so the data is indexed, audited,
    cached and split once); default: :func:`~kmedtl.data.prepare.prepare` ``(cfg)``.
    """
    t0 = time.perf_counter()
    cfg = run_config(cfg, label)
    if epochs:
        cfg = cfg.derive(label, train={"epochs": epochs})
    tc = cfg.train
    check_weight_scaling(tc)
    inputs = model_inputs(cfg)
    run_dir = run_folder(cfg, run_dir)
    dp = data_parallel.activate() if tc.distribution is not None else None
    if dp is not None and not data_parallel.is_chief():  # only process 0 writes the run folder
        return _train_locked(cfg, run_dir, inputs, overwrite=overwrite, fold=fold,
                             prepared=prepared, callbacks=callbacks, t0=t0, dp=dp)
    # one writer per run folder (kmedtl.ownership): a second one stops here, naming this
    with run_lock(run_dir, "kmedtl train"):
        return _train_locked(cfg, run_dir, inputs, overwrite=overwrite, fold=fold,
                             prepared=prepared, callbacks=callbacks, t0=t0, dp=dp)


def _train_locked(cfg: RunConfig, run_dir: Path, inputs, *, overwrite, fold, prepared,
                  callbacks, t0, dp=None):
    tc = cfg.train
    writer = dp is None or data_parallel.is_chief()
    if writer:
        prepare_run_dir(run_dir, overwrite)
    keras.utils.set_random_seed(tc.seed)
    if tc.deterministic:
        enable_determinism(tc.seed)
    prep = prepare(cfg) if prepared is None else prepared
    if not 0 <= fold < len(prep.splits.folds):
        raise ConfigError(f"--fold {fold}: the split has {len(prep.splits.folds)} fold(s) "
                          f"(split.method: {cfg.split.method})")
    if writer:
        write_provenance(run_dir, cfg, prep)
    # the data preparation counts even when the caller did it (kmedtl run's split stage)
    prepare_seconds = time.perf_counter() - t0 + (prep.seconds if prepared is not None else 0)
    if tc.model == "staged":
        return run_staged(cfg, prep, run_dir, prepare_seconds, fold)
    data = datasets(cfg, prep, targets_for(tc), fold)
    if dp is not None:  # whole global batches, this process keeps its slice of each
        data_parallel.check_batch(tc.batch_size, dp["devices"])
        for key, n in (("train", None if data["steps_per_epoch"] else data["n_train"]),
                       ("train_eval", data["n_train"]), ("val", data["n_val"])):
            if data[key] is not None:
                data[key] = data_parallel.fixed_batches(data[key], tc.batch_size, n, what=key)
    strategy = get_strategy(tc.distribute)
    with strategy_scope(strategy):
        model = build_model(tc, prep.hierarchy, prep.options.shape, inputs)
    extra = {"model": tc.model, "backbone": tc.backbone, "cut": tc.cut, "fold": fold,
             "weights": tc.weights, "weight_scaling": tc.weight_scaling,
             "leaves": list(prep.hierarchy.leaves), "hierarchy": prep.hierarchy.to_config(),
             "n_train": data["n_train"], "n_val": data["n_val"], "n_test": data["n_test"],
             "prepare_seconds": round(prepare_seconds, 3), "backend": keras.backend.backend(),
             "distribute": tc.distribute,
             "replicas": dp["devices"] if dp else getattr(strategy, "num_replicas_in_sync", 1)}
    if dp is not None:
        extra["distribution"] = {"kind": tc.distribution.kind, **dp}
    if tc.model == "multi_input":
        extra["inputs"] = inputs
        extra["multi_input"] = tc.multi_input.model_dump(mode="json")
    if not writer:  # the same steps and callbacks as process 0 (collectives stay in step),
        # written to a throwaway folder: only process 0 writes the run folder
        with tempfile.TemporaryDirectory(prefix="kmedtl_data_parallel_") as scratch:
            trainer = Trainer(model, tc, run_dir=scratch, distribution=strategy,
                              callbacks=callbacks)
            result = trainer.fit(data["train"], data["val"],
                                 steps_per_epoch=data["steps_per_epoch"],
                                 eval_train=data["train_eval"], extra_metrics=extra)
            result.run_dir = None
            return result
    trainer = Trainer(model, tc, run_dir=run_dir, distribution=strategy, callbacks=callbacks)
    return trainer.fit(data["train"], data["val"], steps_per_epoch=data["steps_per_epoch"],
                       eval_train=data["train_eval"], extra_metrics=extra)


def _arrays(dataset):
    return materialise(dataset)


def run_staged(cfg: RunConfig, prep, run_dir: Path, prepare_seconds: float,
               fold: int = 0) -> dict:
    """The staged hierarchical workflow (level-1, level-2 with hierarchy transfer,
    out-of-fold stacking) from one config; each node model is trained by the Trainer with
    ``train.strategy``/schedule/multipliers.  History rows carry ``stage`` and ``fold``."""
    t0 = time.perf_counter()
    tc = cfg.train
    data = datasets(cfg, prep, "leaf", fold)
    h = prep.hierarchy
    x_tr, y_tr = _arrays(data["train_eval"])
    labels = [h.leaves[int(i)] for i in y_tr]
    rows: list[dict] = []
    node_cfg = tc.derive(model="flat", verbose=0)

    def fit_fn(model, x, y, *, name, fold, indices):
        result = Trainer(model, node_cfg).fit((x, np.asarray(y)))
        for i, e in enumerate(result.epochs):
            rows.append({"stage": name, "fold": "final" if fold is None else fold, "epoch": e,
                         **{k: v[i] for k, v in result.history.items() if k != "epoch"}})

    staged = models.StagedHierarchicalClassifier(
        h, lambda: build_training_backbone(tc, prep.options.shape),
        transfer=tc.staged.transfer,
        dropout=tc.dropout, pooling=tc.pooling, n_folds=tc.staged.n_folds, seed=tc.seed,
        fit_fn=fit_fn)
    staged.fit(x_tr, labels)
    fit_seconds = time.perf_counter() - t0
    # clean (un-compiled) node models, so model.keras needs no training objects to load
    staged.models_ = {k: _clean(m) for k, m in staged.models_.items()}
    rf = RunFolder(run_dir)
    rf.checkpoints_dir.mkdir(exist_ok=True)
    for node, m in staged.models_.items():
        m.save_weights(str(rf.stage_weights_path(node)))
    save_inference_model(staged.to_keras(name=f"{cfg.name}_staged"), rf.model_path)
    for d in (rf.backup_dir, rf.logs_dir):
        d.mkdir(exist_ok=True)
    rf.write_history(rows)
    metrics = {"train": _proba_metrics(staged.predict_proba(x_tr), y_tr)}
    if data["val"] is not None:
        x_va, y_va = _arrays(data["val"])
        metrics["val"] = _proba_metrics(staged.predict_proba(x_va), y_va)
    out = {"kind": "kmedtl-train-metrics", "version": 1, "model": "staged", "fold": fold,
           "backbone": tc.backbone, "cut": tc.cut, "weight_scaling": tc.weight_scaling,
           "leaves": list(h.leaves),
           "hierarchy": h.to_config(), "n_train": data["n_train"], "n_val": data["n_val"],
           "n_test": data["n_test"], "epochs": tc.epochs, "n_folds": tc.staged.n_folds,
           "transfer": tc.staged.transfer, "stages": list(h.parents),
           "train_metrics": metrics["train"], "val_metrics": metrics.get("val", {}),
           "timings": {"prepare_seconds": round(prepare_seconds, 3),
                       "fit_seconds": round(fit_seconds, 3)},
           "backend": keras.backend.backend(), "config": tc.model_dump(mode="json")}
    rf.write_train_metrics(out)
    return out


def _clean(model):
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone


def _proba_metrics(proba, y) -> dict:
    y = np.asarray(y).astype(int)
    pred = np.argmax(proba, axis=1)
    out = {"accuracy": float((pred == y).mean()),
           "kappa": float(cohen_kappa_score(y, pred)) if len(set(y)) > 1 else None}
    try:
        labels = list(range(proba.shape[1]))
        out["auc"] = float(roc_auc_score(y, proba, multi_class="ovr", labels=labels)
                           if proba.shape[1] > 2 else roc_auc_score(y, proba[:, 1]))
    except ValueError:  # a class absent from y
        out["auc"] = None
    return out


# ---------------------------------------------------------------------------- lr-find
def run_lr_find(cfg, out_png=None, *, steps: int = 200, start_lr: float = 1e-7,
                end_lr: float = 10.0, label: str = "config"):
    """``kmedtl lr-find``: sweep the LR on the configured model in the state it starts
    training in (the strategy's first phase); writes the PNG (default
    ``<run>/lr_find.png``) and ``lr_find.json`` beside it."""
    cfg = run_config(cfg, label)
    tc = cfg.train
    check_weight_scaling(tc)
    if tc.model == "staged":
        raise ConfigError("train.model: lr-find needs one Keras model; use flat, "
                          "hierarchical or multi_input (the staged workflow trains one model "
                          "per node)")
    inputs = model_inputs(cfg)
    keras.utils.set_random_seed(tc.seed)
    prep = prepare(cfg)
    data = datasets(cfg, prep, targets_for(tc))
    model = build_model(tc, prep.hierarchy, prep.options.shape, inputs)
    plan_phases(tc, model, tc.epochs)[0].apply(model)
    result = lr_find(model, data["train"], start_lr=start_lr, end_lr=end_lr, steps=steps,
                     config=tc)
    out_png = Path(out_png) if out_png else RunFolder.for_config(cfg).lr_find_path
    result.plot(out_png)
    write_json(out_png.with_suffix(".json"), result.to_json(), strict=False)
    return result, out_png


# ---------------------------------------------------------------------------- tune
def tune(cfg: RunConfig, prep, *, directory, fold: int = 0, feature_dir=None,
         overwrite: bool | None = None, verbose=1):
    """The search of ``train.tune`` on ``fold`` of the prepared data: trials fit on its
    training part and are scored on its validation part (never the test part).  Returns
    :class:`kmedtl.training.tuning.Tuned`; its ``section`` is what training then trains
    (at ``train.epochs``, with the config's ``steps_per_epoch`` and ``verbose``).  The one
    tuning operation of ``kmedtl tune`` and ``kmedtl run``'s tune stage."""
    # lazy: keras_tuner loads TensorFlow, absent under KERAS_BACKEND=jax
    from kmedtl.training import tuning

    tc = cfg.train
    check_tunable(tc)
    tuning.preflight()
    data = datasets(cfg, prep, targets_for(tc), fold)
    if data["val"] is None:
        raise ConfigError(f"split.val: the search scores trials on the validation part, but "
                          f"fold {fold} has none (split.val: {cfg.split.val}); set split.val "
                          "> 0 (the test part is never used for the search)")
    base = tc
    if data["steps_per_epoch"] and tc.steps_per_epoch is None:  # data.balance: sampling
        base = tc.derive(steps_per_epoch=data["steps_per_epoch"])
    cache = None
    if tc.tune.feature_cache:
        # on disk in train.tune.cache_dir, else feature_dir, else in memory
        cache = FeatureCache(tc.tune.cache_dir or feature_dir, batch_size=tc.batch_size)
    keras.utils.set_random_seed(tc.tune.seed)
    hm = tuning.TransferHyperModel(base, prep.hierarchy, prep.options.shape,
                                   plain_train=data["train_eval"], plain_val=data["val"],
                                   feature_cache=cache)
    tuned = tuning.search(hm, data["train"], data["val"], directory=directory,
                          epochs=tc.epochs, overwrite=overwrite, verbose=verbose)
    if tuned.section is not None:
        tuned.section = tuned.section.derive(steps_per_epoch=tc.steps_per_epoch,
                                             verbose=tc.verbose)
    return tuned


def run_tuning(cfg, run_dir=None, *, label: str = "config", overwrite: bool | None = None,
               max_trials: int | None = None, tuner: str | None = None,
               epochs: int | None = None, verbose=1):
    """``kmedtl tune``: :func:`tune` on fold 0 of the configured data; writes
    ``<run>/tuning/{results.csv, results.md, best_config.yaml}`` (the best trial's whole
    config at ``train.epochs``: ``kmedtl train`` takes it) and KerasTuner's project folder
    ``<run>/tuning/search/``.  Returns the search's
    :class:`~kmedtl.training.tuning.SearchResult`."""
    tune_over = {k: v for k, v in {"max_trials": max_trials, "tuner": tuner,
                                   "epochs": epochs}.items() if v is not None}
    if overwrite is not None:
        tune_over["overwrite"] = overwrite
    cfg = run_config(cfg, label)
    if tune_over:
        cfg = cfg.derive(label, train={"tune": tune_over})
    check_tunable(cfg.train)  # before any data is prepared
    rf = RunFolder.for_config(cfg, run_dir)
    # one writer per run folder (kmedtl.ownership; none for KerasTuner's chief/workers,
    # which share the folder by design): a second one stops here, naming this one
    with run_lock(rf.path, "kmedtl tune"):
        rf.tuning_dir.mkdir(parents=True, exist_ok=True)
        prep = prepare(cfg)
        write_provenance(rf.path, cfg, prep)
        tuned = tune(cfg, prep, directory=rf.tuning_dir, feature_dir=rf.tuning_features_dir,
                     verbose=verbose)
        result = tuned.result
        if tuned.section is not None:
            best = resolved_config(cfg.derive(train=tuned.section), prep.hierarchy)
            result.files["best_config"] = rf.write_best_config(best)
        return result
