"""kmedtl's models really train on JAX: a hierarchical classifier is trained, predicts,
saves and reloads under ``KERAS_BACKEND=jax``.

This process already runs Keras on TensorFlow (Keras picks its backend once, at import),
so the work runs in a fresh interpreter, ``tests/jax_backend_child.py``, with
``import tensorflow`` blocked there; it prints one JSON line that the tests below check.
Both cases (``cbr_tiny`` through kmedtl's ``Trainer``; ``efficientnet_lite0`` with its
ImageNet weights through plain ``compile``/``fit``/``save``) share one child process.

``jax[cpu]`` is in the ``test`` extras: without it these tests skip, except under CI
(``CI=true`` or ``CI=1``), where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("jax_backend_child.py")
REPO = CHILD.parent.parent
MARK = "KMEDTL_JAX_RESULT "
CASES = ("cbr_tiny", "efficientnet_lite0")
CHANCE = 1 / 3  # three balanced leaves


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _require_jax() -> None:
    # find_spec, not importorskip: jaxlib need not be loaded into this TensorFlow process
    if importlib.util.find_spec("jax") is not None:
        return
    message = "jax is not installed (pip install -e '.[test]' installs jax[cpu])"
    if _under_ci():
        pytest.fail(f"{message}; CI installs the test extras, so this must not skip",
                    pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory) -> dict:
    """Run the child once for every case; its parsed JSON result."""
    _require_jax()
    tmp = tmp_path_factory.mktemp("jax")
    env = dict(os.environ)
    env.update(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               KMEDTL_HOME=str(tmp / "kmedtl_home"),  # converts the ImageNet weights on JAX
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, str(CHILD), str(tmp), *CASES], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"JAX child process failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", pytrace=False)
    result = json.loads(lines[-1][len(MARK):])
    assert result["backend"] == "jax", result
    return result


def _case(jax_run, name) -> dict:
    out = jax_run["cases"][name]
    if "error" in out:
        pytest.fail(f"{name} on JAX raised:\n{out['error']}", pytrace=False)
    return out


def test_child_ran_on_jax_without_tensorflow(jax_run):
    assert jax_run["backend"] == "jax"
    assert jax_run["jax_devices"] and set(jax_run["jax_devices"]) <= {"cpu", "gpu", "cuda", "tpu"}
    assert jax_run["tensorflow_imported"] is False
    assert jax_run["leaves"] == ["normal", "a", "b"]
    assert sorted(jax_run["cases"]) == sorted(CASES)


def _check_learned_and_predicts(out):
    loss, acc = out["loss"], out["leaf_accuracy"]
    assert all(v == v for v in loss), loss  # no NaN
    assert loss[-1] < 0.8 * loss[0], f"loss did not fall: {loss}"
    n = out["n_images"]
    assert out["output_shapes"] == {"leaf": [n, 3], "root": [n, 2], "disease": [n, 2]}
    assert out["leaf_sum_error"] < 1e-5
    # the saved .keras model reloads on JAX as the same class with the same predictions
    assert out["reloaded_class"] == "HierarchicalClassifier"
    assert set(out["reload_max_diff"]) == {"leaf", "root", "disease"}
    assert max(out["reload_max_diff"].values()) <= 1e-6, out["reload_max_diff"]
    return loss, acc


def test_cbr_tiny_trains_with_kmedtl_trainer_on_jax(jax_run):
    out = _case(jax_run, "cbr_tiny")
    _, acc = _check_learned_and_predicts(out)
    assert acc[-1] >= 0.8, acc  # training-mode leaf accuracy, chance is 1/3
    # inference mode after Trainer's BatchNorm recalibration
    assert out["predict_accuracy"] >= 0.8, out["predict_accuracy"]
    assert out["optimizer"] == "DiscriminativeOptimizer"  # train.lr_multipliers
    assert out["jit_compile"] is True  # train.jit_compile "auto" is XLA on JAX
    # train.precision "auto": mixed_float16 where JAX sees a GPU, float32 on CPU/TPU
    gpu = bool({"gpu", "cuda"} & set(jax_run["jax_devices"]))
    assert out["precision"] == ("mixed_float16" if gpu else "float32")
    assert {"model.keras", "history.csv", "train_metrics.json", "checkpoints"} <= set(
        out["run_files"])


def test_efficientnet_lite0_imagenet_fine_tunes_on_jax(jax_run):
    out = _case(jax_run, "efficientnet_lite0")
    _, acc = _check_learned_and_predicts(out)
    # training-mode leaf accuracy well above chance (no BatchNorm recalibration here, so
    # the inference-mode predict_accuracy is not a learning signal; see the child)
    assert max(acc) >= 0.7 and acc[-1] >= 2 * CHANCE - 0.05, acc
    # the ImageNet weights were converted under JAX into $KMEDTL_HOME and loaded
    assert Path(out["imagenet_cache"]).is_file() and "kmedtl_home" in out["imagenet_cache"]
    assert out["imagenet_top_conv_diff"] == 0.0
