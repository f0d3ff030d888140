"""Training one study cell, and same-domain pretraining.

Every cell trains a kmedtl model with :class:`kmedtl.training.Trainer` on in-memory arrays
(the decoded images of :mod:`kmedtl.study.data`) and returns the leaf probabilities of the
fixed test set.  There is no validation split: each cell trains for the epochs the study
gives its N and keeps the last-epoch weights ("best" by training loss, which under
one-cycle is the end of the run); the test set is never looked at during training.

Arm kinds (``train.model``):

- ``flat`` / ``hierarchical``: :class:`~kmedtl.models.FlatClassifier` /
  :class:`~kmedtl.models.HierarchicalClassifier` (one softmax per parent node, leaf
  probabilities as products along the tree) over ``train.backbone`` cut at ``train.cut``,
  built as ``kmedtl run`` builds it (:func:`kmedtl.training.build.build_model`:
  ``train.precision``, ``train.weight_scaling``);
- ``staged``: :class:`~kmedtl.models.StagedHierarchicalClassifier` (An et al. 2021: a
  level-1 model, a level-2 model initialised from it -- hierarchy transfer -- and a
  logistic-regression stacker on out-of-fold confidences, ``n_folds`` folds), every node
  model trained by the Trainer with the same recipe.

``init``: ``scratch`` (random weights) or a pretrain entry, whose backbone weights
(:func:`pretrain`, through :func:`kmedtl.training.pretrain.pretrain`) become the cell's
``train.weights`` and are loaded by layer name -- so a truncated backbone (``train.cut``)
takes the lower blocks of the pretrained one (TruncatedTL).

The study also registers ``cbr_micro`` in the backbone registry: the Transfusion CBR
design (conv-BN-ReLU + 3x3/2 max-pool blocks, Raghu et al. 2019) scaled to what two CPU
cores can train hundreds of times -- channels 16, 32, 64, 128 and 3x3 kernels (CBR-Small
is 32..256 with 7x7; about 13x the compute at 32 px).
"""

from __future__ import annotations

import logging
import tempfile
import time

import keras
import numpy as np
from sklearn.model_selection import train_test_split

from kmedtl.models import StagedHierarchicalClassifier, hierarchy_targets
from kmedtl.models import backbones as _bb
from kmedtl.models import truncation as _trunc
from kmedtl.models.cbr import cbr_network
from kmedtl.training import Trainer, train_section
from kmedtl.training.batchnorm import recalibrate_batchnorm as _recalibrate
from kmedtl.training.build import build_model, build_training_backbone
from kmedtl.training.pretrain import pretrain as pretrain_backbone
from kmedtl.training.tuning import TransferHyperModel, search

log = logging.getLogger("kmedtl.study")

MICRO = ((16, 32, 64, 128), 3)


def _cbr_micro(include_top=False, weights=None, input_tensor=None, input_shape=None, **kw):
    if kw:
        raise TypeError(f"cbr_micro: unexpected arguments {sorted(kw)}")
    return cbr_network(MICRO[0], MICRO[1], input_tensor, input_shape, weights, "cbr_micro",
                       include_top)


if "cbr_micro" not in _bb.BACKBONES:
    _bb.register_backbone(_bb.BackboneSpec(
        "cbr_micro", _cbr_micro, "unit", 32, _trunc.cbr_cuts, "cbr", pretrained=False,
        reference="CBR design of Raghu et al. 2019 (arXiv:1902.07208), scaled down by "
                  "kmedtl.study: channels 16-128, 3x3 kernels"))


def recalibrate_batchnorm(model, x, batch_size: int = 256) -> int:
    """:func:`kmedtl.training.batchnorm.recalibrate_batchnorm` over the cell's training
    images (the study runs it itself, with the Trainer's own pass turned off, because its
    staged and pretraining cells train several models per cell)."""
    return _recalibrate(model, x, batch_size=batch_size)


def epochs_for(epochs, n) -> int:
    """``train.epochs`` may be one int or a mapping ``{N: epochs}`` (keys 25, 50, ..., all)."""
    if isinstance(epochs, dict):
        table = {str(k): int(v) for k, v in epochs.items()}
        if str(n) not in table:
            raise KeyError(f"train.epochs has no entry for N={n}: {sorted(table)}")
        return table[str(n)]
    return int(epochs)


def _section(recipe: dict, label: str, **fields):
    """The :class:`~kmedtl.training.TrainSection` of a study recipe (a mapping: it is part of
    every cell key) with ``fields`` on top; the study's own keys dropped, no TensorBoard,
    silent, and no BatchNorm pass by the Trainer (the study runs its own)."""
    raw = {k: v for k, v in recipe.items() if k not in ("init", "recalibrate_bn")}
    raw.update(tensorboard=False, verbose=0, recalibrate_bn=False, **fields)
    return train_section(raw, label)


def train_section_for(recipe: dict, n, seed: int):
    """The section of a cell: the recipe with the N-specific epoch count and the seed."""
    return _section(recipe, "study", epochs=epochs_for(recipe.get("epochs", 10), n),
                    seed=int(seed))


def _with_weights(tc, weights):
    """The section whose backbone starts from a pretrain entry's weights (a file, loaded by
    layer name), else from the recipe's own (``weights: imagenet``), else random."""
    return tc if weights is None else tc.derive("study", weights=str(weights))


def train_cell(split, recipe: dict, n, seed: int, *, weights=None, n_folds: int = 2,
               recalibrate: bool = True) -> dict:
    """Train one cell; returns ``{"probs", "seconds", "n_train", "epochs", ...}``.

    ``recalibrate``: :func:`recalibrate_batchnorm` on the cell's training images after
    training (every node model of a staged arm too)."""
    t0 = time.perf_counter()
    tc = train_section_for(recipe, n, seed)
    keras.utils.clear_session(free_memory=True)
    keras.utils.set_random_seed(int(seed))
    rows = split.subset(n, seed)
    x, y = split.x[rows], split.y[rows]
    h = split.hierarchy
    shape = split.x.shape[1:]
    info = {"n_train": int(len(rows)), "epochs": tc.epochs, "model": tc.model,
            "backbone": tc.backbone, "cut": tc.cut, "strategy": tc.strategy}
    if recipe.get("tune"):  # the search arm: KerasTuner on the subset, then one final fit
        search = _search(split, tc, x, y, shape, seed)
        tc = search.pop("section")
        info.update(search=search, strategy=tc.strategy, cut=tc.cut)
    tc = _with_weights(tc, weights)
    if tc.model == "staged":
        node_cfg = tc.derive("study", model="flat")

        def fit_fn(model, xs, ys, *, name, fold, indices):
            Trainer(model, node_cfg).fit((xs, np.asarray(ys)))
            if recalibrate:
                recalibrate_batchnorm(model, xs)

        staged = StagedHierarchicalClassifier(
            h, lambda: build_training_backbone(tc, shape), transfer="hierarchy",
            dropout=tc.dropout, pooling=tc.pooling, n_folds=n_folds, seed=int(seed),
            fit_fn=fit_fn)
        staged.fit(x, y.astype(np.int64))
        probs = staged.predict_proba(split.x_test)
        info["n_folds"] = n_folds
    else:
        # train.precision, train.weight_scaling and the backbone cut, as `kmedtl run` builds
        model = build_model(tc, h, shape)
        info["params"] = int(model.backbone.count_params())
        targets = hierarchy_targets(h, [h.leaves[i] for i in y]) \
            if tc.model == "hierarchical" else y
        result = Trainer(model, tc).fit((x, targets))
        if recalibrate:
            info["bn_recalibrated"] = recalibrate_batchnorm(model, x)
        out = model.predict(split.x_test, batch_size=256, verbose=0)
        probs = out["leaf"] if isinstance(out, dict) else out
        info["final_train_loss"] = (result.history.get("loss") or [None])[-1]
        info["jit_compile"] = result.jit_compile
    info["probs"] = np.asarray(probs, dtype=np.float64)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _search(split, tc, x, y, shape, seed: int) -> dict:
    """KerasTuner (:func:`kmedtl.training.tuning.search`, as ``kmedtl tune`` runs it) over
    ``train.tune``'s space on the N-subset alone: a stratified 20% of it is the validation
    split, the test set is never seen.  Returns the best trial's recipe (``section``, with
    the cell's own epochs, for the final fit on the whole subset) and what the search did."""
    t0 = time.perf_counter()
    rows = np.arange(len(y))
    tr, va = train_test_split(rows, test_size=0.2, stratify=y, random_state=int(seed))
    base = tc.derive("study", tune={"seed": int(seed)})
    hm = TransferHyperModel(base, split.hierarchy, shape)
    with tempfile.TemporaryDirectory(prefix="kmedtl-study-search-") as d:
        tuned = search(hm, (x[tr], y[tr]), (x[va], y[va]), directory=d, epochs=tc.epochs,
                       verbose=0)
    res = tuned.result
    # the best trial as searched, given the cell's epochs (how the committed cells of the
    # search arms were made; ``tuned.section`` would rescale head epochs and unfreeze points)
    section = tuned.as_searched.derive("study", epochs=tc.epochs, seed=int(seed))
    keras.utils.clear_session(free_memory=True)
    keras.utils.set_random_seed(int(seed))
    return {"section": section, "best": res.best_hyperparameters,
            "objective": res.objective, "trials": len(res.rows),
            "n_search_train": int(len(tr)), "n_search_val": int(len(va)),
            "seconds": round(time.perf_counter() - t0, 2),
            "table": [{k: v for k, v in r.items() if not str(k).startswith("tuner/")}
                      for r in res.rows]}


# ---------------------------------------------------------------------------- pretraining
def _level1(split, rows) -> np.ndarray:
    """The level-1 node (e.g. normal vs tumour) of each of ``split.y[rows]``."""
    return np.asarray(split.hierarchy.level_matrix(1))[split.y[rows]].argmax(1)


def _intermediate_section(spec, name: str, recipe: dict):
    """The study's own recipe on ImageNet weights for the level-1 task, with the pretrain
    entry's epochs, batch size and seed."""
    if recipe.get("strategy") == "fine_tune" and int(spec.epochs) <= recipe.get("head_epochs", 1):
        raise ValueError(f"pretrain: epochs ({spec.epochs}) must exceed the recipe's "
                         f"head_epochs ({recipe.get('head_epochs', 1)})")
    return _section(recipe, "study pretrain", backbone=name, weights="imagenet", model="flat",
                    cut=None, epochs=int(spec.epochs), batch_size=int(spec.batch_size),
                    seed=spec.seed)


def pretrain(split, spec, rows: np.ndarray, path, default_backbone: str,
             recipe: dict | None = None) -> dict:
    """Pretrain ``spec.backbone`` on ``split.x[rows]`` and save its weights to ``path``
    (``.weights.h5``) with :func:`kmedtl.training.pretrain.pretrain`; BatchNorm statistics
    are re-averaged over the pool images.

    ``simclr`` (no labels) and ``rotation`` ("which of four 90-degree rotations is this
    image", no diagnosis labels) train a random backbone.  ``level1``: supervised on a
    different, coarser label task of the pool images -- the level-1 node of the hierarchy
    (normal vs tumour) -- as in same-domain supervised transfer (Romero et al. 2020,
    Alzubaidi et al. 2020).  ``weights: imagenet``: the level-1 task from ImageNet weights
    with the study's own ``recipe`` (intermediate training; BatchNorm re-averaged unless the
    recipe says ``recalibrate_bn: false`` or ``freeze_bn``).
    """
    t0 = time.perf_counter()
    keras.utils.clear_session(free_memory=True)
    keras.utils.set_random_seed(spec.seed)
    name = spec.backbone or default_backbone
    if spec.max_images and len(rows) > spec.max_images:
        rows = np.random.default_rng(spec.seed).choice(rows, spec.max_images, replace=False)
    x = split.x[rows]
    shape = tuple(split.x.shape[1:])
    common = {"path": path, "epochs": spec.epochs, "batch_size": spec.batch_size,
              "learning_rate": spec.learning_rate}
    if spec.weights == "imagenet":
        if recipe is None:
            raise ValueError("pretrain: weights: imagenet trains with the study's recipe; "
                             "pass recipe=")
        out = pretrain_backbone(
            x, _level1(split, rows), method="supervised",
            train=_intermediate_section(spec, name, recipe),
            classes=list(split.hierarchy.levels[0]), path=path,
            recalibrate=recipe.get("recalibrate_bn", True) and not recipe.get("freeze_bn"))
    elif spec.method == "level1":
        out = pretrain_backbone(x, _level1(split, rows), method="supervised",
                                backbone=_bb.backbone(name, input_shape=shape),
                                classes=list(split.hierarchy.levels[0]), **common)
    else:
        out = pretrain_backbone(x, method=spec.method,
                                backbone=_bb.backbone(name, input_shape=shape),
                                temperature=spec.temperature, **common)
    losses = out.losses
    return {"method": spec.method, "backbone": name, "n_images": int(len(rows)),
            "weights": spec.weights,
            "epochs": spec.epochs, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "seconds": round(time.perf_counter() - t0, 2), "path": str(out.path)}
