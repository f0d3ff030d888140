"""Data-parallel training speed (``train.distribution: {kind: data_parallel}``): images/s
for 1..N devices or processes, through Keras 3's JAX distribution API, in one run.

    python benchmarks/data_parallel.py --devices 1 2                 # one process, N devices
    python benchmarks/data_parallel.py --processes 1 2               # N processes, 127.0.0.1
    python benchmarks/data_parallel.py --devices 1 2 4 8 --backbone efficientnet_lite0 \\
        --size 224 --batch 256 --precision mixed_bfloat16            # a multi-GPU machine
    python benchmarks/training.py --backend jax --devices 2          # the same, via training.py

Each configuration runs in a fresh ``KERAS_BACKEND=jax`` interpreter: ``--devices N`` uses
the first N devices of one process (on a CPU, XLA splits it into N host devices with
``--xla_force_host_platform_device_count``); ``--processes N`` starts N processes joined by
``jax.distributed`` on 127.0.0.1 (gloo on CPUs; on GPUs each process gets one GPU through
``CUDA_VISIBLE_DEVICES``), one device each.  The model is a kmedtl ``FlatClassifier`` over
``--backbone`` (random weights), trained by ``model.fit`` on a synthetic ``tf.data``
stream of global batches of ``--batch`` (split across devices by Keras, as ``kmedtl train``
does); the time is the median step over ``--steps`` steps after ``--warmup`` (compilation).
Rows are relative to the first configuration, measured in the same run.

On a CPU, N devices or processes share the same cores, so this checks that the path
works and what it costs, not a speed-up; the speed-up needs N GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "KMEDTL_DP_BENCH "


def child(args) -> dict:
    """One configuration, in this (fresh, KERAS_BACKEND=jax) process."""
    sys.path.insert(0, str(REPO))
    import keras
    import numpy as np
    import tensorflow as tf

    from kmedtl.models import FlatClassifier, backbone
    from kmedtl.models.precision import precision_policy
    from kmedtl.training import data_parallel

    info = data_parallel.activate(data_parallel.cluster_from(), devices=args.use_devices)
    keras.utils.set_random_seed(0)
    with precision_policy(args.precision):
        model = FlatClassifier(backbone(args.backbone, input_shape=(args.size, args.size,
                                                                    args.channels)), 4)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True,
                  loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, args.size, args.size, args.channels), dtype=np.float32)
    y = rng.integers(0, 4, args.batch)
    # the global batch, endlessly; this process keeps its slice (as kmedtl train does)
    ds = data_parallel.fixed_batches(tf.data.Dataset.from_tensors((x, y)).repeat(), args.batch)

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.stamps = []

        def on_train_batch_end(self, batch, logs=None):
            self.stamps.append(time.perf_counter())

    timer = Timer()
    total = args.warmup + args.steps
    t0 = time.perf_counter()
    model.fit(ds, steps_per_epoch=total, epochs=1, verbose=0, callbacks=[timer])
    steps = [b - a for a, b in zip(timer.stamps[args.warmup - 1:], timer.stamps[args.warmup:])]
    step = statistics.median(steps)
    return {**info, "backbone": args.backbone, "size": args.size, "global_batch": args.batch,
            "precision": args.precision, "median_step_s": round(step, 4),
            "images_per_s": round(args.batch / step, 2),
            "first_steps_s": round(timer.stamps[args.warmup - 1] - t0, 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict) -> dict:
    env = dict(os.environ)
    env.update(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    env.update(extra)
    return env


def _gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.SubprocessError):
        return 0


def run_config(mode: str, n: int, args, passthrough: list[str]) -> dict:
    """Start the child process(es) of one configuration; process 0's result."""
    base = [sys.executable, __file__, "--child", *passthrough]
    gpus = _gpus()
    procs = []
    try:
        if mode == "devices":
            extra = {}
            if not gpus:
                extra["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
                extra["JAX_PLATFORMS"] = "cpu"
            procs.append(subprocess.Popen([*base, "--use-devices", str(n)], env=_env(extra),
                                          stdout=subprocess.PIPE, text=True))
        else:
            port = _free_port()
            for i in range(n):
                extra = {"KMEDTL_COORDINATOR": f"127.0.0.1:{port}",
                         "KMEDTL_NUM_PROCESSES": str(n), "KMEDTL_PROCESS_ID": str(i)}
                if gpus:
                    extra["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
                else:
                    extra["JAX_PLATFORMS"] = "cpu"
                procs.append(subprocess.Popen(base, env=_env(extra), stdout=subprocess.PIPE,
                                              text=True))
        outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    finally:
        for p in procs:  # never leave a child behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for p in procs:
        if p.returncode:
            raise SystemExit(f"{mode}={n}: a child exited {p.returncode}")
    line = [ln for ln in outs[0].splitlines() if ln.startswith(MARK)][-1]
    return {"mode": mode, "n": n, **json.loads(line[len(MARK):])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, nargs="*", default=None,
                    help="one process over N devices, for each N (default 1 2)")
    ap.add_argument("--processes", type=int, nargs="*", default=None,
                    help="N processes on 127.0.0.1, one device each, for each N")
    ap.add_argument("--backbone", default="cbr_tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--precision", default="float32",
                    choices=("float32", "mixed_bfloat16", "mixed_float16"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", help="write the rows and the environment as JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--use-devices", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(MARK + json.dumps(child(args)), flush=True)
        return 0
    passthrough = ["--backbone", args.backbone, "--size", str(args.size), "--channels",
                   str(args.channels), "--batch", str(args.batch), "--precision",
                   args.precision, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    plan = [("devices", n) for n in (args.devices or [])] + \
        [("processes", n) for n in (args.processes or [])]
    if not plan:
        plan = [("devices", 1), ("devices", 2)]
    rows = [run_config(mode, n, args, passthrough) for mode, n in plan]
    base = rows[0]["images_per_s"]
    print(f"{args.backbone} @{args.size}, global batch {args.batch}, {args.precision}, "
          f"{rows[0]['platform']}, {platform.node()}")
    print("| configuration | devices | images/s | ratio |\n|---|---|---|---|")
    for r in rows:
        label = f"{r['n']} process(es)" if r["mode"] == "processes" else "1 process"
        print(f"| {label}, {r['devices']} device(s) | {r['devices']} | {r['images_per_s']} | "
              f"{r['images_per_s'] / base:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "python": sys.version,
                                              "machine": platform.machine(),
                                              "cpus": os.cpu_count()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
