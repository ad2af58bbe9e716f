"""Experiment 10: backward's after-loop products on one thread team, against before (issue 12).

    NUMBA_NUM_THREADS=2 python benchmarks/cpu/10_after_loop_team.py
    NUMBA_NUM_THREADS=1 python benchmarks/cpu/10_after_loop_team.py --cell lstm --size 128,8,128

A whole training call (forward with training=True, then backward, through the public
API, backend "cpu", float32, I = H) of each cell, in one process, three ways in the same
repeats (each repeat runs each once, in a rotating order):

* ``before``: dW_ih and dW_hh as NumPy products with the BLAS at one thread, side by
  side on a one-worker executor thread at two threads or more, then dx in a parallel
  region of its own (``_cpu_blas.weight_gradients`` and ``_cpu_common.project``: what
  the cpu backends did before ``_cpu_team``, and still do where no BLAS gemm is known);
* ``team``: the three products on one Numba thread team, the weight gradients through
  the BLAS's gemm called from the compiled code, dx on our packed kernel (what they do
  now, ``_cpu_team``);
* ``team-dxblas``: the same with dx through the BLAS's gemm too.

Each is checked against the float64 reference backend first (every output and
gradient, float32 tolerance); the report is each one's median time and its time over
``before``'s in the same repeat: median (p10-p90). Run it under ``/work/bin/quiet``.
Results: rnnkernels/cpu.py's docstring ("Threading policy").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

_CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_CHECKOUT))

import rnnkernels  # noqa: E402 - after the path
from rnnkernels import _cpu_blas, _cpu_common  # noqa: E402

SIZES = ((128, 16, 256), (128, 8, 128), (512, 8, 128), (64, 64, 512), (256, 1, 128), (1024, 4, 64))
CELLS = {
    "lstm": (rnnkernels.lstm_forward, rnnkernels.lstm_backward, 4, {}),
    "gru": (rnnkernels.gru_forward, rnnkernels.gru_backward, 3, {}),
    "rnn": (rnnkernels.rnn_forward, rnnkernels.rnn_backward, 1, {"nonlinearity": "tanh"}),
}
WAYS = ("before", "team", "team-dxblas")


def _size(text):
    return tuple(int(v) for v in text.split(","))


def _call(cell, inputs, dy, backend="cpu"):
    forward, backward, _, options = CELLS[cell]
    out = forward(*inputs, **options, training=True, backend=backend)
    grads = backward(out, dy=dy)
    return [out.y, out.h_n, grads.dx, grads.dw_ih, grads.dw_hh, grads.db_ih, grads.db_hh]


def _way(name, cell, inputs, dy):
    """A call of ``cell`` the way ``name`` says (module docstring)."""
    gemm = _cpu_blas.team_gemm()
    if gemm is None and name != "before":
        raise SystemExit("no BLAS gemm the team can call here (rnnkernels/_cpu_team.py): nothing to compare")

    def run():
        saved = _cpu_blas._gemm, _cpu_blas.DX_ON_BLAS
        _cpu_blas._gemm = False if name == "before" else gemm
        _cpu_blas.DX_ON_BLAS = name == "team-dxblas"
        try:
            return _call(cell, inputs, dy)
        finally:
            _cpu_blas._gemm, _cpu_blas.DX_ON_BLAS = saved

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", choices=CELLS, action="append", help="default: all three")
    parser.add_argument("--size", type=_size, action="append", metavar="T,B,H", help="default: issue 12's six")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"numba threads {_cpu_common.threads()}; BLAS gemm {_cpu_blas.team_gemm()}")
    rng = np.random.default_rng(0)
    for cell in args.cell or CELLS:
        gates = CELLS[cell][2]
        for steps, batch, hidden in args.size or SIZES:
            scale = hidden**-0.5
            x = rng.standard_normal((steps, batch, hidden)).astype(np.float32)
            w_ih, w_hh = (rng.uniform(-scale, scale, (gates * hidden, hidden)).astype(np.float32) for _ in range(2))
            b_ih, b_hh = (rng.uniform(-scale, scale, gates * hidden).astype(np.float32) for _ in range(2))
            dy = rng.standard_normal((steps, batch, hidden)).astype(np.float32)
            inputs = (x, w_ih, w_hh, b_ih, b_hh)
            want = _call(cell, inputs, dy, backend="reference")
            ways = {name: _way(name, cell, inputs, dy) for name in WAYS}
            for name, run in ways.items():
                for got, expected in zip(run(), want):
                    error = np.abs(got - expected).max() / max(1.0, np.abs(expected).max())
                    if error > 1e-4:
                        raise SystemExit(f"{name} is off by {error:.1e} at {cell} {steps, batch, hidden}")
                run()  # warm
            times = {name: [] for name in ways}
            names = list(ways)
            for repeat in range(args.repeats):
                for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                    start = time.perf_counter()
                    ways[name]()
                    times[name].append(time.perf_counter() - start)
            before = np.array(times["before"])
            cells = []
            for name in names:
                ratio = np.array(times[name]) / before
                p10, p50, p90 = np.percentile(ratio, [10, 50, 90])
                cells.append(f"{name} {1e3 * np.median(times[name]):.2f} ms {p50:.2f} ({p10:.2f}-{p90:.2f})")
            print(f"{cell} {steps},{batch},{hidden}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
