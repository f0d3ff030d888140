"""Data-parallel training across processes and machines: Keras 3's JAX distribution API.

``train.distribution: {kind: data_parallel}`` trains one model over every device of every
process: ``keras.distribution.DataParallel`` replicates the weights, and each step runs on
a *global* batch of ``train.batch_size`` images split across the devices, with the
gradients summed by XLA collectives (NCCL on GPUs, gloo on CPUs).  The processes find each
other through ``jax.distributed.initialize``; each one is told the coordinator's address,
the process count and its own id, by CLI flags or the environment::

    # on every machine (process id 0 .. N-1; the coordinator runs process 0)
    KERAS_BACKEND=jax kmedtl train run.yaml \\
        --coordinator HOST:PORT --num-processes N --process-id I
    # or: KMEDTL_COORDINATOR=HOST:PORT KMEDTL_NUM_PROCESSES=N KMEDTL_PROCESS_ID=I

- **Data.** Every process builds the same ``tf.data`` pipeline (same seed, so the same
  shuffle and augmentation; TensorFlow op determinism on, so the same order);
  :func:`fixed_batches` re-forms full global batches of
  ``train.batch_size`` (the last partial batch of a pass is dropped: uneven slices would
  stall the collectives), splits each into one slice per process and keeps this process's
  slice.  A step's global batch is therefore the one a single process would see, and the
  loss trajectory matches a one-process run at the same ``train.batch_size`` (tested,
  ``tests/test_data_parallel.py``).
- **Run folder.** Only process 0 writes it (checkpoints, history, ``model.keras``,
  ``train_metrics.json``); the others train in memory.  ``model.keras`` is the usual clean
  inference model and reloads under the TensorFlow backend for export.
- **Not under data_parallel:** BatchNorm recalibration after training (each process sees
  only its shard; ``train.recalibrate_bn`` is skipped with a log line), resuming from
  ``backup/`` (only process 0 holds it), the ``staged`` model (one small fit per node).

Why JAX only: Keras 3 on TensorFlow cannot train across processes
(``MultiWorkerMirroredStrategy`` is broken there, keras-team/keras#20585), and
``keras.distribution`` is implemented for JAX only.  On CPUs the collectives use gloo
(``jax_cpu_collectives_implementation``), which is how the test runs two processes on
127.0.0.1; on CPUs XLA is a slow engine for depthwise convolutions, so this route is for
GPUs (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import keras

from kmedtl.errors import ConfigError

log = logging.getLogger("kmedtl.training")

ENV_COORDINATOR = "KMEDTL_COORDINATOR"
ENV_NUM_PROCESSES = "KMEDTL_NUM_PROCESSES"
ENV_PROCESS_ID = "KMEDTL_PROCESS_ID"

TF_BACKEND_ERROR = (
    "train.distribution: data_parallel needs KERAS_BACKEND=jax (this process runs Keras "
    "on {backend!r}). Keras 3 on TensorFlow cannot train across processes: "
    "MultiWorkerMirroredStrategy does not work with Keras 3 (keras-team/keras#20585), and "
    "keras.distribution is implemented for JAX only. Start every process with "
    "KERAS_BACKEND=jax (pip install 'jax[cuda12]' on GPUs, 'jax' on CPUs); the saved "
    "Keras model still loads under TensorFlow for export.")


@dataclass(frozen=True)
class Cluster:
    """Who this process is: ``num_processes`` processes, this one ``process_id``,
    joined through ``coordinator`` (``HOST:PORT`` of process 0; unused for one process)."""

    num_processes: int = 1
    process_id: int = 0
    coordinator: str | None = None

    @property
    def is_chief(self) -> bool:
        """Process 0: the one that writes the run folder."""
        return self.process_id == 0

    def to_json(self) -> dict:
        return {"num_processes": self.num_processes, "process_id": self.process_id,
                "coordinator": self.coordinator}


def _int(value, flag: str, env: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{flag} / ${env}: expected a whole number, got {value!r}") from None


def cluster_from(coordinator: str | None = None, num_processes=None, process_id=None,
                 environ=None) -> Cluster:
    """The :class:`Cluster` from CLI values, else ``$KMEDTL_COORDINATOR``,
    ``$KMEDTL_NUM_PROCESSES`` and ``$KMEDTL_PROCESS_ID``; one process when none is set.
    Bad or inconsistent values raise :class:`~kmedtl.errors.ConfigError` naming the flag."""
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    n_raw = num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES)
    i_raw = process_id if process_id is not None else env.get(ENV_PROCESS_ID)
    n = 1 if n_raw in (None, "") else _int(n_raw, "--num-processes",
                                           ENV_NUM_PROCESSES)
    i = 0 if i_raw in (None, "") else _int(i_raw, "--process-id", ENV_PROCESS_ID)
    if n < 1:
        raise ConfigError(f"--num-processes / ${ENV_NUM_PROCESSES}: must be >= 1, got {n}")
    if not 0 <= i < n:
        raise ConfigError(f"--process-id / ${ENV_PROCESS_ID}: must be in 0..{n - 1} for "
                          f"{n} process(es), got {i}")
    if n > 1:
        if not coordinator:
            raise ConfigError(f"--coordinator / ${ENV_COORDINATOR}: {n} processes need the "
                              "HOST:PORT of process 0 (the same value on every process)")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--coordinator / ${ENV_COORDINATOR}: expected HOST:PORT, "
                              f"got {coordinator!r}")
    return Cluster(num_processes=n, process_id=i, coordinator=coordinator)


def check_backend() -> None:
    """:class:`~kmedtl.errors.ConfigError` unless Keras runs on JAX."""
    backend = keras.backend.backend()
    if backend != "jax":
        raise ConfigError(TF_BACKEND_ERROR.format(backend=backend))


_ACTIVE: dict = {}


def activate(cluster: Cluster | None = None, devices: int | None = None) -> dict:
    """Join the cluster (``jax.distributed.initialize``, once per process) and set
    ``keras.distribution.DataParallel`` over every device of every process as the global
    distribution.  Must run before any JAX computation and before the model is built.

    ``devices``: use only the first ``devices`` global devices (benchmarks); default all.
    Returns ``{"num_processes", "process_id", "devices", "local_devices", "platform"}``.
    """
    check_backend()
    cluster = cluster or cluster_from()
    import jax  # lazy: JAX backend only

    if cluster.num_processes > 1 and not _ACTIVE.get("initialized"):
        # CPU processes exchange gradients through gloo (no effect on GPU/TPU clients)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            keras.distribution.initialize(cluster.coordinator, cluster.num_processes,
                                          cluster.process_id)
        except RuntimeError as exc:
            raise ConfigError(f"train.distribution: could not join the cluster at "
                              f"{cluster.coordinator} as process {cluster.process_id} of "
                              f"{cluster.num_processes}: {exc} (initialise before any JAX "
                              "computation; is the coordinator reachable?)") from exc
        _ACTIVE["initialized"] = True
    _deterministic_input()
    all_devices = keras.distribution.list_devices()
    if devices is not None:
        if not 1 <= devices <= len(all_devices):
            raise ConfigError(f"--devices: {devices} asked, {len(all_devices)} available")
        all_devices = all_devices[:devices]
    # auto_shard_dataset=False: fixed_batches() shards the data itself, with a cardinality
    # Keras can count (Keras' own rebatch loses it, and its epoch loop then re-creates the
    # input iterators at other points than a one-process run: other shuffles per epoch)
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=all_devices, auto_shard_dataset=False))
    info = {"num_processes": jax.process_count(), "process_id": jax.process_index(),
            "devices": len(all_devices), "local_devices": jax.local_device_count(),
            "platform": jax.devices()[0].platform}
    _ACTIVE.update(info)
    log.info("data_parallel: process %d of %d, %d device(s) in all (%s)", info["process_id"],
             info["num_processes"], info["devices"], info["platform"])
    return info


def _deterministic_input() -> None:
    """Every process must cut the *same* global batches into slices, so the ``tf.data``
    pipeline (TensorFlow's only job under JAX) yields in a fixed order: op determinism makes
    its parallel ``map(deterministic=False)`` ordered, at some input speed."""
    try:
        import tensorflow as tf  # lazy: tf.data input pipelines only (absent on a JAX-only install)
    except ImportError:  # no tf.data input here (e.g. arrays only)
        return
    tf.config.experimental.enable_op_determinism()


def active() -> bool:
    """Whether a Keras distribution is in force (training is data-parallel)."""
    return keras.backend.backend() == "jax" and keras.distribution.distribution() is not None


def is_chief() -> bool:
    """Process 0 (or no multi-process cluster): the process that writes the run folder."""
    if not _ACTIVE.get("initialized"):
        return True
    import jax  # lazy: JAX backend only

    return jax.process_index() == 0


def processes() -> tuple[int, int]:
    """``(process count, this process's index)``: ``(1, 0)`` outside a cluster."""
    if not _ACTIVE.get("initialized"):
        return 1, 0
    import jax  # lazy: JAX backend only

    return jax.process_count(), jax.process_index()


def fixed_batches(dataset, global_batch: int, n: int | None = None, *, what: str = "train"):
    """This process's slice of ``dataset`` in whole global batches of ``global_batch``.

    The batches are re-formed into full global batches (the last partial batch dropped,
    logged), each is split into one equal slice per process, and this process keeps its
    own slice of every batch (``rebatch`` + ``shard``, as ``DataParallel`` would); Keras
    then assembles the global batch across processes.  ``n``: the number of images per
    pass when known, for the step count Keras needs (``None``: an endless stream)."""
    import tensorflow as tf  # lazy: tf.data input pipelines only (absent on a JAX-only install)

    count, index = processes()
    if global_batch % count:
        raise ConfigError(f"train.batch_size: {global_batch} does not split into {count} "
                          "equal per-process batches; use a multiple of the process count")
    ds = dataset.unbatch().batch(global_batch, drop_remainder=True)
    if count > 1:
        ds = ds.rebatch(global_batch // count).shard(count, index)
    if n is not None:
        steps = n // global_batch
        if steps < 1:
            raise ConfigError(f"train.batch_size: the {what} split has {n} image(s), fewer "
                              f"than one global batch of {global_batch}")
        if n % global_batch:
            log.warning("data_parallel: %s uses %d of %d images per pass (whole global "
                        "batches of %d only)", what, steps * global_batch, n, global_batch)
        ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    return ds.prefetch(tf.data.AUTOTUNE)


def check_batch(global_batch: int, devices: int) -> None:
    if global_batch % devices:
        raise ConfigError(f"train.batch_size: data_parallel splits each global batch across "
                          f"{devices} device(s); {global_batch} is not a multiple (use e.g. "
                          f"{math.ceil(global_batch / devices) * devices})")
