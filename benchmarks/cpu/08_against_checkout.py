"""Experiment 08: this checkout's cpu backend against another checkout's, paired in one process.

    mkdir -p /tmp/base && git archive main | tar -x -C /tmp/base
    NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \\
        python benchmarks/cpu/08_against_checkout.py --other /tmp/base --size 512,8,128 --size 128,16,256

A change that saves 2-4% of a step is within the run-to-run spread of
``benchmarks/cpu_vs_torch.py``'s ratios to torch (±0.03 between two quiet runs of the
same code). This compares two versions of rnnkernels directly: the other checkout's
package is copied under another name (``rnnkernels_other``; the package imports itself
relatively) and both run the same LSTM inputs, float32, one call each per repeat, the
order alternating; the report is the median (p10, p90) of the per-pair ratios
this / other for inference (``cpu.forward``, training=False) and training (forward with
training=True, then backward). Outputs of both are checked against the float64
reference first (rel. err. < 2e-5). Run it with one thread per library, as above, and
under the project's ``quiet`` wrapper.

Result: this branch (the activations of ``07_cell_activations.py``, then σ(o) moved into
the LSTM cell's update loop) against main before it (other, 89af9ad), one thread, quiet.
Activations only, 2026-12-01 20:10-20:15 UTC, 61 pairs per row:

        T   B  I=H mode       this ms  other ms  this/other     (p10, p90)
      512   8  128 forward      13.10     13.34       0.987     (0.931, 1.032)
      512   8  128 training     42.74     42.97       0.990     (0.972, 1.022)
      128  16  256 forward      22.22     22.44       0.993     (0.959, 1.033)
      128  16  256 training     73.97     74.20       0.999     (0.979, 1.016)

Both changes, two runs of 45 pairs per row (20:38 and 20:43 UTC):

      512   8  128 forward      11.10     11.39       0.977     (0.952, 0.998)
      512   8  128 training     36.98     36.97       0.993     (0.959, 1.052)
      128  16  256 forward      21.35     21.62       0.986     (0.972, 1.026)
      128  16  256 training     67.74     68.31       0.992     (0.967, 1.010)

      512   8  128 forward      12.27     12.32       0.987     (0.954, 1.022)
      512   8  128 training     40.73     41.13       0.977     (0.937, 1.035)
      128  16  256 forward      22.78     23.57       0.986     (0.931, 1.016)
      128  16  256 training     72.38     71.65       1.005     (0.940, 1.051)

After rebasing onto main 0ef82b1 (the weight gradients on the packed kernel), against
it, 20:53 UTC, 45 pairs per row:

      512   8  128 forward      11.80     12.00       0.984     (0.964, 1.030)
      512   8  128 training     41.21     40.60       1.004     (0.958, 1.057)
      128  16  256 forward      21.82     22.20       0.985     (0.954, 1.013)
      128  16  256 training     74.19     75.04       0.996     (0.947, 1.048)

Run time: 25 s with the Numba caches warm.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

import rnnkernels
from rnnkernels import cpu, reference


def _size(text):
    steps, batch, hidden = (int(v) for v in text.split(","))
    return steps, batch, hidden


def load_other(checkout):
    """The other checkout's package, imported as ``rnnkernels_other``."""
    source = Path(checkout) / "rnnkernels"
    if not (source / "__init__.py").exists():
        raise SystemExit(f"--other: no rnnkernels package in {checkout}")
    # One fixed copy per checkout (a new path each run would miss Numba's disk cache).
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    parent = Path(tempfile.gettempdir()) / f"rnnkernels-other-{digest}"
    shutil.copytree(source, parent / "rnnkernels_other", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    sys.path.insert(0, str(parent))
    return importlib.import_module("rnnkernels_other.cpu")


def problem(steps, batch, hidden, seed=0):
    rng = np.random.default_rng(seed)
    scale = 1 / np.sqrt(hidden)
    x = rng.standard_normal((steps, batch, hidden), dtype=np.float32)
    w_ih = (scale * rng.standard_normal((4 * hidden, hidden))).astype(np.float32)
    w_hh = (scale * rng.standard_normal((4 * hidden, hidden))).astype(np.float32)
    bias = (scale * rng.standard_normal(4 * hidden)).astype(np.float32)
    h0 = rng.standard_normal((batch, hidden), dtype=np.float32) * 0.5
    c0 = rng.standard_normal((batch, hidden), dtype=np.float32) * 0.5
    dy = rng.standard_normal((steps, batch, hidden), dtype=np.float32)
    return (x, w_ih, w_hh, bias, h0, c0), dy


def check(module, args, label):
    wide = [a.astype(np.float64) for a in args]
    want = reference.forward(*wide, training=False)[0]
    got = module.forward(*args, training=False)[0]
    error = np.abs(got - want).max() / np.abs(want).max()
    if error > 2e-5:
        raise SystemExit(f"{label}: forward rel. err. {error:.2e} against the float64 reference")


def run(module, args, dy, mode):
    if mode == "forward":
        module.forward(*args, training=False)
        return
    _, h_n, c_n, saved = module.forward(*args, training=True)
    module.backward(saved, dy, np.zeros_like(h_n), np.zeros_like(c_n))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", required=True, help="a checkout of rnnkernels to compare against")
    parser.add_argument("--size", type=_size, action="append", metavar="T,B,H", required=True)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--mode", choices=("forward", "training"), action="append",
                        help="forward (inference) or training; repeat for both (default: both)")
    args = parser.parse_args(argv)
    other = load_other(args.other)
    print(f"this: {Path(rnnkernels.__file__).parent}   other: {args.other}")
    print("    T   B  I=H mode       this ms  other ms  this/other     (p10, p90)")
    for steps, batch, hidden in args.size:
        inputs, dy = problem(steps, batch, hidden)
        check(cpu, inputs, "this")
        check(other, inputs, "other")
        for mode in args.mode or ("forward", "training"):
            for module in (cpu, other, cpu, other):
                run(module, inputs, dy, mode)  # warm-up: compiles or loads the cache
            times = {"this": [], "other": []}
            for repeat in range(args.repeats):
                pair = (("this", cpu), ("other", other)) if repeat % 2 == 0 else (("other", other), ("this", cpu))
                for name, module in pair:
                    start = time.perf_counter()
                    run(module, inputs, dy, mode)
                    times[name].append(time.perf_counter() - start)
            ratios = np.array(times["this"]) / np.array(times["other"])
            p10, p50, p90 = np.percentile(ratios, [10, 50, 90])
            print(f"{steps:5d} {batch:3d} {hidden:4d} {mode:9s} {1e3 * np.median(times['this']):8.2f} "
                  f"{1e3 * np.median(times['other']):9.2f}  {p50:10.3f}     ({p10:.3f}, {p90:.3f})")


if __name__ == "__main__":
    main()
