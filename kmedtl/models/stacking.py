"""Out-of-fold stacking: base Keras models -> confidences -> a meta-classifier.

Shared by the staged hierarchical scheme (:mod:`kmedtl.models.staged`) and by stacking of
per-image-type models (:mod:`kmedtl.models.multi_input`).

The meta-classifier must never see confidences that a base model produced for samples it
was trained on (they are over-confident and the meta-model would learn to trust them).
So :meth:`OutOfFoldStacking.fit` splits the training set into ``n_folds`` stratified folds
(``seed`` fixes the split), trains the base models on ``k-1`` folds, records their
confidences on the held-out fold, fits the meta-classifier on those out-of-fold
confidences, and finally retrains the base models on the whole training set for
prediction.  ``fold_train_indices_[k]`` and ``oof_fold_[i]`` record which samples trained
the models that scored sample ``i``.

The meta-classifier defaults to scikit-learn's ``LogisticRegression``; any estimator with
``fit``/``predict_proba`` works.  A fitted (multinomial or binary) logistic regression can
be exported with the base models as one Keras model (:meth:`OutOfFoldStacking.to_keras`),
so the whole ensemble saves to ``.keras`` and serves like any other model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import keras
import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold

from kmedtl.errors import ModelError

DEFAULT_FIT_KWARGS = {"epochs": 10, "batch_size": 32, "verbose": 0}
DEFAULT_COMPILE_KWARGS = {"optimizer": "adam"}


def kfold_splits(y, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold (plain k-fold when a class has fewer than ``n_folds`` samples)."""
    y = np.asarray(y)
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ModelError(f"n_folds={n_folds!r} must be an integer >= 2")
    if len(y) < n_folds:
        raise ModelError(f"n_folds={n_folds} is more than the {len(y)} training samples")
    _, counts = np.unique(y, return_counts=True)
    if counts.min() >= n_folds:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


def default_meta_estimator():
    return LogisticRegression(max_iter=1000)


def _clone(estimator):
    try:
        return clone(estimator)
    except Exception:  # not a scikit-learn estimator: a deep copy is the best we can do
        return copy.deepcopy(estimator)


class MetaClassifier:
    """An estimator with ``fit``/``predict_proba`` whose output covers all ``n_classes``."""

    def __init__(self, estimator, n_classes: int):
        for attr in ("fit", "predict_proba"):
            if not callable(getattr(estimator, attr, None)):
                raise ModelError(
                    f"meta_estimator={estimator!r} has no {attr}(); give an estimator with "
                    "fit(X, y) and predict_proba(X), e.g. sklearn LogisticRegression"
                )
        self.estimator = estimator
        self.n_classes = n_classes

    def fit(self, features, y):
        self.estimator_ = _clone(self.estimator).fit(features, y)
        return self

    def predict_proba(self, features) -> np.ndarray:
        proba = np.asarray(self.estimator_.predict_proba(features), dtype="float64")
        classes = np.asarray(getattr(self.estimator_, "classes_", np.arange(proba.shape[1])))
        out = np.zeros((proba.shape[0], self.n_classes))
        out[:, classes.astype(int)] = proba
        return out

    def dense_weights(self, n_features: int) -> tuple[np.ndarray, np.ndarray]:
        """``(W, b)`` of a dense+softmax layer equal to a fitted logistic regression."""
        est = self.estimator_
        coef, intercept = getattr(est, "coef_", None), getattr(est, "intercept_", None)
        if coef is None or intercept is None:
            raise ModelError(
                f"to_keras() needs a linear meta-estimator with coef_/intercept_ (logistic "
                f"regression); got {type(est).__name__}. Use predict_proba() instead"
            )
        classes = np.asarray(est.classes_).astype(int)
        w = np.zeros((n_features, self.n_classes))
        b = np.full(self.n_classes, -1e4)  # classes never seen in training: probability 0
        if len(classes) == 2 and coef.shape[0] == 1:  # binary: p1 = sigmoid(z) = softmax(0, z)
            w[:, classes[1]] = coef[0]
            b[classes] = [0.0, intercept[0]]
        else:
            w[:, classes] = coef.T
            b[classes] = intercept
        return w.astype("float32"), b.astype("float32")


def default_fit(model, x, y, compile_kwargs, fit_kwargs):
    model.compile(**compile_kwargs)
    model.fit(x, y, **fit_kwargs)


class OutOfFoldStacking:
    """Base class: subclasses define how base models are trained and what they output.

    Hooks: ``_targets(y) -> (leaf int array, targets)``, ``_train_models(x, targets,
    indices, fold) -> models``, ``_features(models, x) -> (N, F) array``,
    ``_keras_graph(models) -> (inputs, feature tensor, extra outputs)``.
    """

    n_classes: int

    def __init__(
        self,
        meta_estimator=None,
        n_folds: int = 5,
        seed: int = 0,
        compile_kwargs: dict | None = None,
        fit_kwargs: dict | None = None,
        fit_fn: Callable | None = None,
    ):
        self.meta_estimator = meta_estimator if meta_estimator is not None else (
            default_meta_estimator()
        )
        MetaClassifier(self.meta_estimator, 2)  # fail early on an unusable estimator
        self.n_folds = n_folds
        self.seed = seed
        self.compile_kwargs = {**DEFAULT_COMPILE_KWARGS, **(compile_kwargs or {})}
        self.fit_kwargs = {**DEFAULT_FIT_KWARGS, **(fit_kwargs or {})}
        self.fit_fn = fit_fn

    # -------------------------------------------------------------- helpers for subclasses
    def _fit_model(self, model, x, y, *, name, fold, indices):
        if self.fit_fn is not None:
            self.fit_fn(model, x, y, name=name, fold=fold, indices=indices)
        else:
            default_fit(model, x, y, self.compile_kwargs, self.fit_kwargs)

    @staticmethod
    def _take(x, idx):
        if isinstance(x, dict):
            return {k: np.asarray(v)[idx] for k, v in x.items()}
        return np.asarray(x)[idx]

    @staticmethod
    def _len(x):
        return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)

    # -------------------------------------------------------------- public API
    def fit(self, x, y):
        """Out-of-fold confidences -> meta-classifier; then base models on all of ``x``."""
        leaf, targets = self._targets(y)
        n = self._len(x)
        if len(leaf) != n:
            raise ModelError(f"x has {n} samples but y has {len(leaf)} labels")
        splits = kfold_splits(leaf, self.n_folds, self.seed)
        self.oof_fold_ = np.full(n, -1)
        self.fold_train_indices_ = []
        oof = None
        for k, (train, held_out) in enumerate(splits):
            models = self._train_models(x, targets, np.sort(train), fold=k)
            feats = self._features(models, self._take(x, held_out))
            if oof is None:
                oof = np.zeros((n, feats.shape[1]))
            oof[held_out] = feats
            self.oof_fold_[held_out] = k
            self.fold_train_indices_.append(np.sort(train))
            del models
        self.oof_features_ = oof
        self.meta_ = MetaClassifier(self.meta_estimator, self.n_classes).fit(oof, leaf)
        self.models_ = self._train_models(x, targets, np.arange(n), fold=None)
        return self

    def _check_fitted(self):
        if not hasattr(self, "meta_"):
            raise ModelError(f"{type(self).__name__} is not fitted; call fit(x, y) first")

    def features(self, x) -> np.ndarray:
        """The base models' confidences (meta-classifier input) for ``x``."""
        self._check_fitted()
        return self._features(self.models_, x)

    def predict_proba(self, x) -> np.ndarray:
        """(N, n_classes) class probabilities; rows sum to 1."""
        features = self.features(x)  # checks that fit() ran
        return self.meta_.predict_proba(features)

    def predict(self, x) -> np.ndarray:
        return np.argmax(self.predict_proba(x), axis=-1)

    def to_keras(self, name: str = "stacked") -> keras.Model:
        """Base models + the logistic-regression meta-classifier as one functional model.

        Output ``"leaf"`` equals :meth:`predict_proba` (checked on the out-of-fold
        features); other outputs are the base models' confidences.
        """
        self._check_fitted()
        inputs, feats, extra = self._keras_graph(self.models_)
        w, b = self.meta_.dense_weights(int(feats.shape[-1]))
        dense = keras.layers.Dense(self.n_classes, dtype="float32", name="meta_logits")
        leaf = keras.layers.Softmax(dtype="float32", name="leaf")(dense(feats))
        dense.set_weights([w, b])
        model = keras.Model(inputs, {"leaf": leaf, **extra}, name=name)
        check = self.oof_features_[:64].astype("float32")
        got = keras.ops.convert_to_numpy(
            keras.layers.Softmax()(dense(check))
        )
        if not np.allclose(got, self.meta_.predict_proba(check), atol=1e-4):
            raise ModelError(
                f"to_keras(): {type(self.meta_.estimator_).__name__} is not a plain softmax "
                "of a linear function (e.g. one-vs-rest); use predict_proba() instead"
            )
        return model

    def save(self, path) -> None:
        """Save :meth:`to_keras` to a ``.keras`` file."""
        self.to_keras().save(path)
