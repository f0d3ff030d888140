"""The train stage's speed against the bare train step of the same model, in one run.

    python benchmarks/train_loop.py                      # the main job, 640 training images
    python benchmarks/train_loop.py --n-train 0 --epochs 3 --rows bare stage

The model, data and settings are the main job's (``pipelines/brain_tumor_hierarchical.yaml``:
EfficientNet-Lite0 hierarchical, ImageNet weights, grey 160 px, batch 32, ``freeze_bn``),
prepared as ``kmedtl run`` prepares them (index, audit, cache, split; needs
``KMEDTL_DATASETS``).  ``--n-train N`` keeps the first N training images and the same
share of validation images (0: all of them).  Rows:

- ``bare``: the compiled Keras train step (forward, losses, metrics, backward, optimizer)
  in Keras' fit loop over the epoch's batches held in memory: the model's own speed, the
  goal's baseline;
- ``stage``: :class:`kmedtl.training.Trainer` ``.fit`` exactly as the train stage calls it
  (augmented ``tf.data`` stream from the cache, validation each epoch, checkpoints,
  backups, CSV log in a run folder, the final evaluation of train and validation sets);
- ablations of ``stage``, one part removed each: ``no_augment``, ``no_validation``,
  ``no_run_dir`` (no backups/CSV/TensorBoard; the best-weights checkpoint goes to a
  temporary folder), ``no_tensorboard`` (``train.tensorboard: false``),
  ``no_metrics`` (no AUC/kappa/accuracy in the train step);
- ``autotune``: ``stage`` with tf.data's autotuner on for every stream (kmedtl's default
  before it was turned off; see :func:`kmedtl.data.pipeline.make_dataset`).

A row's images/s is the training images of one epoch over that epoch's wall time
(validation and callbacks included), the median over the epochs after the first (the
first traces the graph); "whole" is every epoch's images over the whole call (tracing
and the final evaluations included).  Every row is timed in this process, one after another, so
rows compare on the same machine and load; ``--rounds R`` repeats the whole set in
rotating order and reports medians.

Each epoch also records where its wall time went (``usage``): the process's CPU seconds
(user + system, all threads), the machine's idle, I/O-wait and *steal* seconds from
``/proc/stat`` (steal: time a virtual CPU was ready but the hypervisor ran another guest),
garbage collections, the first step (it waits for the epoch's first batch), the median
and slowest of the others, the validation pass and the callbacks after it.  A slow epoch
with steal is the machine's neighbours; with more process CPU for the same steps it is
contention inside the process; with idle CPU and one slow step it is a stall (input, GC,
I/O, a thread waited for: tf.data's autotuner was one, see the ``autotune`` row).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
logging.getLogger("tensorflow").setLevel(logging.ERROR)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402

from kmedtl.data.prepare import prepare  # noqa: E402
from kmedtl.pipeline.spec import load_pipeline  # noqa: E402
from kmedtl.training import Trainer  # noqa: E402
from kmedtl.training.build import build_model, targets_for  # noqa: E402
from kmedtl.training.callbacks import EpochTimer  # noqa: E402
from kmedtl.training.freezing import freeze_batchnorm, plan_phases  # noqa: E402
from kmedtl.training.stage import datasets  # noqa: E402

ROWS = ("bare", "stage", "no_augment", "no_validation", "no_run_dir", "no_tensorboard",
        "no_metrics", "autotune")
ROOT = Path(__file__).resolve().parents[1]


class Subset:
    """A prepared dataset whose train/val parts are cut to their first ``n_train`` (and
    the same share of) samples; everything else is the prepared one's."""

    def __init__(self, prep, n_train: int):
        self._prep = prep
        full = len(prep.samples("train"))
        self.n = {"train": n_train or full}
        self.n["val"] = round(len(prep.samples("val")) * self.n["train"] / full)

    def __getattr__(self, name):
        return getattr(self._prep, name)

    def samples(self, part, fold=0):
        out = self._prep.samples(part, fold)
        return out[:self.n[part]] if part in self.n else out


def _machine_seconds() -> dict:
    """Cumulative idle, iowait and steal seconds of all CPUs (``/proc/stat``; empty
    where there is none, e.g. macOS)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    ticks = [int(f) for f in fields] + [0] * 8
    return {"idle": ticks[3] / hz, "iowait": ticks[4] / hz, "steal": ticks[7] / hz}


class Usage(keras.callbacks.Callback):
    """Per epoch: wall, process CPU, machine idle/iowait/steal seconds, GC collections and
    step times (see the module docstring for how to read them)."""

    def __init__(self):
        super().__init__()
        self.epochs: list[dict] = []

    def _now(self):
        t = os.times()
        return {"wall": time.perf_counter(), "process_cpu": t.user + t.system,
                "gc": sum(g["collections"] for g in gc.get_stats()), **_machine_seconds()}

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps, self._last = self._now(), [], time.perf_counter()
        self._val = 0.0

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self._steps.append(now - self._last)
        self._last = now

    def on_test_begin(self, logs=None):
        self._val_t0 = time.perf_counter()

    def on_test_end(self, logs=None):
        self._val += time.perf_counter() - self._val_t0
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = self._now()
        out = {k: round(end[k] - self._start[k], 3) for k in end}
        steps = self._steps[1:] or self._steps  # the first spans the epoch's start
        if steps:
            # first step: it waits for the input pipeline's first batch; validation: the
            # evaluation pass; after: from the last step (or validation) to this callback
            out |= {"first_step": round(self._steps[0], 3),
                    "step_median": round(statistics.median(steps), 4),
                    "step_max": round(max(steps), 4), "validation": round(self._val, 3),
                    "after": round(time.perf_counter() - self._last, 3)}
        self.epochs.append(out)


def fresh_model(cfg, prep):
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.train.seed)
    return build_model(cfg.train, prep.hierarchy, prep.options.shape)


def no_metrics(model):
    """Metrics for the ``no_metrics`` row: none (the Trainer fills a falsy value with its
    defaults, so a hierarchical model gets an empty list for its leaf output)."""
    if len(model.outputs) < 2:
        raise SystemExit("--rows no_metrics: written for hierarchical models (the main job)")
    return {"leaf": []}


def bare_row(cfg, prep, data, epochs) -> dict:
    """Keras' own fit loop over the epoch's batches held in memory: the compiled train
    step with nothing around it (no decoding, augmentation, validation or callbacks but
    the timer).  The batches are the stage's (augmented once, while the first epoch fills
    the in-memory cache; later epochs only read it), so the graph, shapes and sample
    weights are the stage's too.  Same epochs and steps as the stage rows."""
    model = fresh_model(cfg, prep)
    tc = cfg.train.derive(epochs=epochs)
    plan_phases(tc, model, epochs)[0].apply(model)  # what Trainer.fit does before compiling
    if tc.freeze_bn:
        freeze_batchnorm(model)
    Trainer(model, tc).compile(tc.learning_rate)
    steps = data["steps"]
    timer, usage = EpochTimer(), Usage()
    t0 = time.perf_counter()
    model.fit(data["train"].take(steps).cache().repeat(), epochs=epochs,
              steps_per_epoch=steps, verbose=0, callbacks=[usage, timer], shuffle=False)
    return _timed(timer.seconds, steps * cfg.train.batch_size, epochs,
                  time.perf_counter() - t0, usage)


def _timed(seconds, n_images, epochs, total, usage) -> dict:
    steady = seconds[1:] or seconds
    return {"epoch_seconds": seconds, "usage": usage.epochs,
            "images_per_second": n_images / statistics.median(steady),
            "whole_images_per_second": n_images * epochs / total,
            "total_seconds": total, "images_per_epoch": n_images}


def with_autotune(ds):
    import tensorflow as tf  # loaded already (the streams are tf.data)

    opts = tf.data.Options()
    opts.autotune.enabled = True  # the outer with_options wins over make_dataset's
    return ds.with_options(opts)


def stage_row(row, cfg, prep, data, epochs) -> dict:
    model = fresh_model(cfg, prep)
    if row == "autotune":
        data = {**data, **{k: with_autotune(data[k]) for k in ("train", "val", "train_eval")
                           if data[k] is not None}}
    train = data["train_plain"] if row == "no_augment" else data["train"]
    val = None if row == "no_validation" else data["val"]
    kwargs = {"metrics": no_metrics(model)} if row == "no_metrics" else {}
    timer, usage = EpochTimer(), Usage()  # timer last: it spans checkpoints, backups, logs
    with tempfile.TemporaryDirectory(prefix="kmedtl_bench_") as tmp:
        run_dir = None if row == "no_run_dir" else Path(tmp) / "run"
        tc = cfg.train.derive(epochs=epochs, verbose=0)
        if row == "no_tensorboard":
            tc = tc.derive(tensorboard=False)
        if row in ("no_validation", "no_metrics"):  # no val_ keys / no kappa to monitor
            tc = tc.derive(monitor="loss")
        trainer = Trainer(model, tc, run_dir=run_dir, callbacks=[usage, timer],
                          **kwargs)
        t0 = time.perf_counter()
        trainer.fit(train, val, steps_per_epoch=data["steps_per_epoch"],
                    eval_train=data["train_eval"])  # as the stage: final evaluations too
        total = time.perf_counter() - t0
    return _timed(timer.seconds, data["steps"] * cfg.train.batch_size, epochs, total, usage)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "pipelines/brain_tumor_hierarchical.yaml"))
    ap.add_argument("--n-train", type=int, default=640)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--out", help="write all numbers and the environment as JSON")
    args = ap.parse_args(argv)

    cfg = load_pipeline(args.config).config
    t0 = time.perf_counter()
    prep = Subset(prepare(cfg, progress=False), args.n_train)
    prepare_seconds = time.perf_counter() - t0
    data = datasets(cfg, prep, targets_for(cfg.train))
    data["steps"] = data["steps_per_epoch"] or math.ceil(data["n_train"] / cfg.train.batch_size)
    plain = cfg.derive("benchmark", augment={"flip": None})  # the section replaced: all off
    data["train_plain"] = datasets(plain, prep, targets_for(cfg.train))["train"]
    print(f"prepared in {prepare_seconds:.0f} s: {prep.n['train']} training, "
          f"{prep.n['val']} validation images", file=sys.stderr, flush=True)

    results: dict[str, list] = {r: [] for r in args.rows}
    for rnd in range(args.rounds):
        order = args.rows[rnd % len(args.rows):] + args.rows[:rnd % len(args.rows)]
        for row in order:
            out = (bare_row(cfg, prep, data, args.epochs) if row == "bare"
                   else stage_row(row, cfg, prep, data, args.epochs))
            results[row].append(out)
            print(json.dumps({"row": row, "round": rnd, **out}), file=sys.stderr, flush=True)

    ips = {r: statistics.median(o["images_per_second"] for o in v) for r, v in results.items()}
    base = ips.get("bare")
    print(f"\nbackend {keras.backend.backend()}, {platform.machine()} ({os.cpu_count()} CPUs), "
          f"{cfg.train.backbone} {cfg.train.model}, {cfg.data.image.size} px x "
          f"{cfg.data.image.channels}, batch {cfg.train.batch_size}, {prep.n['train']} "
          f"training / {prep.n['val']} validation images, {args.rounds} round(s)\n")
    print("| row | images/s | vs bare step |\n|---|---:|---:|")
    for r in args.rows:
        ratio = f"{ips[r] / base:.2f}x" if base else "-"
        print(f"| {r} | {ips[r]:.1f} | {ratio} |")
    if args.out:
        env = {"backend": keras.backend.backend(), "keras": keras.__version__,
               "python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "load_average": os.getloadavg()}
        Path(args.out).write_text(json.dumps({"args": vars(args), "env": env,
                                              "prepare_seconds": prepare_seconds,
                                              "images_per_second": ips, "rows": results},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
