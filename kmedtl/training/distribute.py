"""The one place in ``kmedtl.training`` that touches TensorFlow directly.

Why TensorFlow here: multi-device data parallelism on the TensorFlow backend *is*
``tf.distribute`` (``MirroredStrategy`` for the devices of one machine), op-level determinism
is ``tf.config.experimental.enable_op_determinism``, and splitting a CPU into logical
devices is ``tf.config.set_logical_device_configuration``.  Keras 3 has no
backend-neutral spelling of these on TensorFlow (``keras.distribution`` covers JAX only),
so they live here, imported lazily, and every other training module stays on
``keras``/``keras.ops``.  On the JAX backend :func:`strategy_scope` is a no-op for
``"none"`` and an error otherwise (use ``keras.distribution.DataParallel`` there), and
determinism is requested through ``XLA_FLAGS``.

Across processes and machines, train with ``train.distribution: {kind: data_parallel}``
under ``KERAS_BACKEND=jax`` (:mod:`kmedtl.training.data_parallel`):
``MultiWorkerMirroredStrategy`` does not work with Keras 3 (keras-team/keras#20585), and
``train.distribute: multi_worker`` was removed.
"""

from __future__ import annotations

import contextlib
import logging
import os

import keras

from kmedtl.errors import ConfigError

log = logging.getLogger("kmedtl.training")

KINDS = ("none", "mirrored")
MULTI_WORKER_REMOVED = (
    "train.distribute: 'multi_worker' was removed (every worker wrote the run folder, and "
    "Keras 3 on TensorFlow cannot run MultiWorkerMirroredStrategy, keras-team/keras#20585); "
    "train across processes with train.distribution: {kind: data_parallel} under "
    "KERAS_BACKEND=jax")


def get_strategy(kind: str = "none", devices=None):
    """A ``tf.distribute`` strategy (``None`` for ``"none"``)."""
    if kind == "multi_worker":
        raise ConfigError(MULTI_WORKER_REMOVED)
    if kind not in KINDS:
        raise ConfigError(f"train.distribute: {kind!r} is not one of {list(KINDS)}")
    if kind == "none":
        return None
    if keras.backend.backend() != "tensorflow":
        raise ConfigError(f"train.distribute: {kind!r} needs the TensorFlow backend (this is "
                          f"{keras.backend.backend()!r}; use keras.distribution there)")
    import tensorflow as tf  # lazy: absent under KERAS_BACKEND=jax (TensorFlow backend only)

    return tf.distribute.MirroredStrategy(devices)


@contextlib.contextmanager
def strategy_scope(strategy):
    """``strategy.scope()``, or nothing when ``strategy`` is None."""
    if strategy is None:
        yield None
        return
    with strategy.scope():
        yield strategy


def split_cpu(n: int) -> list[str]:
    """Split the CPU into ``n`` logical devices (call before TensorFlow initialises its
    devices, i.e. before any op runs); returns their names for ``MirroredStrategy``."""
    import tensorflow as tf  # lazy: absent under KERAS_BACKEND=jax (TensorFlow backend only)

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def enable_determinism(seed: int | None = None) -> None:
    """Seed every RNG (``keras.utils.set_random_seed``) and make ops deterministic.

    TensorFlow: ``tf.config.experimental.enable_op_determinism()`` (Keras then also turns
    XLA off, as not every XLA kernel is deterministic).  JAX: ``XLA_FLAGS`` gets
    ``--xla_gpu_deterministic_ops=true``, which only works if set before JAX starts.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # lazy: absent under KERAS_BACKEND=jax

        tf.config.experimental.enable_op_determinism()
    elif keras.backend.backend() == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_gpu_deterministic_ops" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_deterministic_ops=true").strip()
            log.warning("deterministic: XLA_FLAGS set now; it only takes effect if JAX has not "
                        "initialised its backend yet (set it before starting Python)")
    else:
        log.warning("deterministic: no op-determinism switch for backend %r",
                    keras.backend.backend())
