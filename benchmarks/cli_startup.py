"""Command-line start-up: the commands that load no Keras/TensorFlow against one that does.

    python benchmarks/cli_startup.py                 # 5 rounds
    python benchmarks/cli_startup.py --rounds 9 --out cli_startup.json

Each command runs as ``python -m kmedtl ARGS`` in a fresh process (what a user's shell
does), round-robin so that load on the machine hits every row alike; the table gives the
median wall time per command and its ratio to the baseline row, ``kmedtl train --help``,
which imports Keras and TensorFlow to build its parser.  Each process also reports which
of ``tensorflow``, ``keras``, ``sklearn``, ``matplotlib`` and ``pydicom`` it imported, so
a row that got heavier says why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

BASELINE = ("train", "--help")
COMMANDS = [("--version",), ("data", "audit", "--help"), ("data", "show", "--help"),
            ("weights", "--help"), BASELINE]
WATCH = ("tensorflow", "keras", "sklearn", "matplotlib", "pydicom")
CHILD = ("import runpy, sys, atexit\n"
         "watch = {watch!r}\n"
         "atexit.register(lambda: print('KMEDTL_LOADED', ','.join("
         "m for m in watch if m in sys.modules), file=sys.stderr))\n"
         "sys.argv = ['kmedtl', *sys.argv[1:]]\n"
         "runpy.run_module('kmedtl', run_name='__main__')\n")


def run_once(args) -> tuple[float, list[str]]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD.format(watch=WATCH), *args],
                         capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"kmedtl {' '.join(args)} failed ({res.returncode}): "
                         f"{res.stderr[-1000:]}")
    loaded = next((line.split(" ", 1)[1].split(",") if " " in line else []
                   for line in res.stderr.splitlines() if line.startswith("KMEDTL_LOADED")),
                  [])
    return seconds, [m for m in loaded if m]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="also write every number and the environment as JSON")
    a = ap.parse_args(argv)
    run_once(("--version",))  # warm the file cache (bytecode, shared libraries)
    times = {c: [] for c in COMMANDS}
    loaded = {}
    for _ in range(a.rounds):
        for c in COMMANDS:
            seconds, mods = run_once(c)
            times[c].append(seconds)
            loaded[c] = mods
    base = statistics.median(times[BASELINE])
    print(f"| command | median s ({a.rounds} runs) | vs `kmedtl {' '.join(BASELINE)}` | "
          "imports |")
    print("|---|---:|---:|---|")
    rows = []
    for c in COMMANDS:
        med = statistics.median(times[c])
        rows.append({"command": " ".join(c), "seconds": times[c], "median": med,
                     "ratio": med / base, "loaded": loaded[c]})
        print(f"| `kmedtl {' '.join(c)}` | {med:.2f} | {med / base:.2f}x | "
              f"{', '.join(loaded[c]) or '-'} |")
    if a.out:
        env = {"python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "platform": platform.platform()}
        with open(a.out, "w") as fh:
            json.dump({"rows": rows, "baseline": " ".join(BASELINE), "env": env}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
