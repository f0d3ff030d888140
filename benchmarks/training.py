"""Train-step speed: XLA off/on x float32/mixed precision, as ratios measured in one run.

    python benchmarks/training.py                                   # ResNet50 @224, batch 16
    python benchmarks/training.py --size 64 --batch 8 --steps 3     # small CPU settings
    KERAS_BACKEND=jax python benchmarks/training.py                 # the same on JAX
    python benchmarks/training.py --torch-reference                 # + torchvision ResNet50
    python benchmarks/training.py --backend jax --devices 1 2       # data-parallel images/s
                                        # (benchmarks/data_parallel.py; see its --help)

Models: a kmedtl ``FlatClassifier`` over ResNet50 (random weights; speed does not depend
on their values) and over ResNet50 truncated at ``conv4_block6_out`` (TruncatedTL), RGB
input in [0, 1].  Each row times ``model.train_on_batch`` (Keras' compiled train step:
forward, loss, backward, Adam update) on synthetic data: the median of ``--steps`` timed
steps after ``--warmup`` untimed ones (compilation happens there).  Rows are relative to
the ``float32``, XLA-off row of the same model, measured in the same run.

On JAX, "XLA off" means ``jit_compile=False``: Keras then runs the step op by op
without ``jax.jit`` (a debugging mode), so the JAX ratios mostly measure jit itself.

Precisions: ``float32``, ``mixed_bfloat16`` and ``mixed_float16`` (kmedtl heads stay
float32; float16 gets Keras' loss scaling).  On CPUs float16 is emulated and slow, and
bfloat16 is only fast with AMX/AVX512-BF16; ``auto`` in kmedtl picks float32 on CPU.

``--torch-reference`` also trains torchvision's ResNet50 with bf16 autocast and
channels_last memory format in the same command, as an outside reference; it needs
PyTorch, torchvision and a CUDA GPU and is skipped (with the reason) otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and any(a in sys.argv for a in ("--devices", "--processes")):
    # `--backend jax --devices N [N ...]` (or --processes): the data-parallel rows, i.e.
    # benchmarks/data_parallel.py, which starts its own KERAS_BACKEND=jax processes
    _argv = sys.argv[1:]
    if "--backend" in _argv:
        i = _argv.index("--backend")
        if _argv[i + 1:i + 2] != ["jax"]:
            raise SystemExit("--devices/--processes: data-parallel training needs --backend jax")
        del _argv[i:i + 2]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data_parallel import main as _data_parallel_main

    raise SystemExit(_data_parallel_main(_argv))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
logging.getLogger("tensorflow").setLevel(logging.ERROR)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kmedtl.models import FlatClassifier, backbone  # noqa: E402
from kmedtl.models.precision import precision_policy  # noqa: E402

MODELS = {"resnet50": None, "resnet50@conv4_block6_out": "conv4_block6_out"}
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def build(name, size, precision, jit, classes=4):
    family = name.split("@")[0]
    with precision_policy(precision):
        bb = backbone(family, cut=MODELS.get(name), input_shape=(size, size, 3))
        model = FlatClassifier(bb, classes)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=jit)
    return model


def time_steps(model, x, y, warmup, steps) -> float:
    for _ in range(warmup):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_reference(size, batch, warmup, steps) -> dict:
    try:
        import torch
        import torchvision
    except ImportError as exc:
        return {"skipped": f"PyTorch/torchvision not installed ({exc.name})"}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU visible to PyTorch"}
    dev = torch.device("cuda")
    model = torchvision.models.resnet50(num_classes=4).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.rand(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"step_seconds": s, "images_per_second": batch / s,
            "device": torch.cuda.get_device_name(0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--torch-reference", action="store_true")
    ap.add_argument("--out", help="write all numbers and the environment as JSON")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 4, args.batch)
    rows = []
    for name in args.models:
        for precision in args.precisions:
            for jit in (False, True):
                keras.backend.clear_session()
                row = {"model": name, "precision": precision, "xla": jit}
                try:
                    model = build(name, args.size, precision, jit)
                    used = bool(model.jit_compile)
                    s = time_steps(model, x, y, args.warmup, args.steps)
                    row.update(step_seconds=s, images_per_second=args.batch / s, xla=used)
                except Exception as exc:  # one failing combination must not hide the rest
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    ref = None
    if args.torch_reference:
        ref = torch_reference(args.size, args.batch, args.warmup, args.steps)

    print(f"backend {keras.backend.backend()}, {platform.machine()} "
          f"({os.cpu_count()} CPUs), {args.size}x{args.size}x3, batch {args.batch}, median of "
          f"{args.steps} steps after {args.warmup} warm-up\n")
    print("| model | precision | XLA | step (s) | images/s | vs float32, XLA off |")
    print("|---|---|---|---:|---:|---:|")
    for name in args.models:
        base = next((r for r in rows if r["model"] == name and r["precision"] == "float32"
                     and not r["xla"] and "error" not in r), None)
        for r in (r for r in rows if r["model"] == name):
            if "error" in r:
                print(f"| {name} | {r['precision']} | {'on' if r['xla'] else 'off'} | - | - | "
                      f"failed: {r['error']} |")
                continue
            ratio = f"{r['images_per_second'] / base['images_per_second']:.2f}x" if base else "-"
            print(f"| {name} | {r['precision']} | {'on' if r['xla'] else 'off'} | "
                  f"{r['step_seconds']:.3f} | {r['images_per_second']:.1f} | {ratio} |")
    full = {(r["precision"], r["xla"]): r for r in rows
            if r["model"] == "resnet50" and "error" not in r}
    cut = {(r["precision"], r["xla"]): r for r in rows
           if r["model"] != "resnet50" and "error" not in r}
    if full and cut:
        print("\n| precision | XLA | truncated / full ResNet50 images/s |\n|---|---|---:|")
        for key in full:
            if key in cut:
                print(f"| {key[0]} | {'on' if key[1] else 'off'} | "
                      f"{cut[key]['images_per_second'] / full[key]['images_per_second']:.2f}x |")
    if ref is not None:
        if "skipped" in ref:
            print(f"\ntorch reference skipped: {ref['skipped']}")
        else:
            print(f"\ntorch reference (torchvision ResNet50, bf16 autocast, channels_last, "
                  f"{ref['device']}): {ref['images_per_second']:.1f} images/s")
    if args.out:
        env = {"backend": keras.backend.backend(), "keras": keras.__version__,
               "python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count()}
        Path(args.out).write_text(json.dumps({"args": vars(args), "env": env, "rows": rows,
                                              "torch_reference": ref}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
