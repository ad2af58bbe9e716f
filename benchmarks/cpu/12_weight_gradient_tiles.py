"""Experiment 12: the weight gradients gᵀ x on our own tiles against OpenBLAS's sgemm (issue 12).

    NUMBA_NUM_THREADS=1 python benchmarks/cpu/12_weight_gradient_tiles.py
    NUMBA_NUM_THREADS=1 python benchmarks/cpu/12_weight_gradient_tiles.py --size 512,8,128 --part product

Two parts, float32, random operands of issue 12's shapes (K = T·B rows, R = 4H, I = H):

* ``product``: one weight gradient gᵀ x ([R, K] @ [K, I]) by NumPy's BLAS held at one
  thread (``g.T @ x``: OpenBLAS's sgemm in NumPy's wheels) and by our tiles
  (``_cpu_team.WEIGHT_ROWS``: ``_cpu_gemm``'s gradient tiles read straight from the
  row-major g and x, k in blocks of _cpu_team.GRADIENT_BLOCK rows),
  interleaved, in thread CPU time (what a loaded machine disturbs least) and wall time;
  GFLOP/s from the thread CPU time's median;
* ``team``: the three after-loop products as the LSTM's backward runs them
  (``_cpu_blas.backward_products``: dW_ih, dW_hh and dx on one team) three ways, in
  rotating order: ``blas`` (both weight gradients through the BLAS: before this
  experiment), ``tiles`` (each on our tiles, g passed as two arrays: what the GRU, whose
  two g differ, gets) and ``pairs`` (the LSTM's one g: both weight gradients in one
  pass over g); ratios to ``blas`` in the same repeat, median (p10-p90), thread CPU time.

Every variant is checked against a float64 product first. Run it under
``/work/bin/quiet``. What it showed (quiet, 2-core Zen 4 VM, one thread, 2026-12-02):

``product`` (GFLOP/s from thread CPU time; 20 repeats, 01:28 UTC; in brackets the range
over this experiment's drafts, same method, not all quiet):

    T,B,H        [R,K]@[K,I]                OpenBLAS         ours (block 128)
    512,8,128    [512,4096]@[4096,128]      83.0 (73-87)     99.5 (80-103)
    128,16,256   [1024,2048]@[2048,256]     87.0 (86-91)     101.0 (88-106)
    64,64,512    [2048,4096]@[4096,512]     97.7 (96-98)     79.2 (75-79)  <- the BLAS stays
    256,1,128    [512,256]@[256,128]        97.1 (90-97)     111.8 (96-112)
    1024,4,64    [256,4096]@[4096,64]       67.9 (59-71)     75.6 (68-93)
    128,8,128    [512,1024]@[1024,128]      91.9             100.6

  At 512,8,128 ours moved 80-103 GFLOP/s between runs (OpenBLAS 73-87): in one draft
  block 256 did 103 and 128 84, in another the reverse; with the operands placed at
  chosen offsets modulo 4 KB (x at 0, 64, 256, 1024, 2048, 3072 bytes past a page,
  g page-aligned) block 128 did 96-99 and 256 98-99, OpenBLAS 79-87. 128 is kept: the
  smaller block adds the blocks' partial sums more often, which keeps the float32 error
  lower (max abs error at 512,8,128: 7e-5 against 1.0e-4 at 256 and 1.3e-4 for
  OpenBLAS; one sequential sum over all 4096 k: 7e-4). Not kept: tiles of 8 rows x 1
  panel (8 broadcasts, 2 loads per k) 78-81 at 512,8,128; the 4x2 tiles with the column
  loop outside the rows' 66-82; dWᵀ = xᵀ g (x's columns broadcast, g's rows loaded)
  73-90; g's block packed first into 4-wide panels (a plain Numba copy loop) 64-81.

``team`` (ratio to ``blas`` in the same repeat, thread CPU time, 20 repeats, same run):

    T,B,H        blas ms   tiles             pairs
    512,8,128    19.39     0.90 (0.84-0.99)  0.87 (0.85-0.93)
    128,16,256   36.79     0.96 (0.92-0.98)  0.96 (0.91-1.01)
    64,64,512   266.36     1.00 (0.96-1.03)  1.00 (0.97-1.03)  (not tiled: the same path)
    256,1,128    1.08      0.92 (0.87-1.02)  0.89 (0.81-0.99)
    1024,4,64    5.43      0.96 (0.86-1.04)  0.86 (0.79-0.94)
    128,8,128    4.47      0.95 (0.85-1.02)  0.94 (0.76-0.97)

Tried and not kept: the bias gradient db (g's column sums, 0.5-0.6 ms of the 512,8,128
call by NumPy after the team) summed in the pairs' pass over g, from the scalars the
tiles broadcast anyway (a scalar sum per row in the first tile of each row block): the
whole training call against the same code without it, paired, quiet, one thread, 30
repeats: 0.99 (0.95-1.03) / 1.04 (0.96-1.11) / 0.99 (0.89-1.04) / 1.01 (0.97-1.05) at
512,8,128 / 128,8,128 / 1024,4,64 / 256,1,128: no gain to show for the extra code.

The whole LSTM training call against torch and against main: rnnkernels/cpu.py's
docstring ("Threading policy") and _cpu_team's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

_CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_CHECKOUT))

from threadpoolctl import threadpool_limits  # noqa: E402

from rnnkernels import _cpu_blas, _cpu_team  # noqa: E402 - after the path

SIZES = ((512, 8, 128), (128, 16, 256), (64, 64, 512), (256, 1, 128), (1024, 4, 64), (128, 8, 128))


def _size(text):
    return tuple(int(v) for v in text.split(","))


def _check(name, got, want):
    error = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    if error > 1e-5:
        raise SystemExit(f"{name} is off by {error:.1e}")


def product(sizes, repeats):
    rng = np.random.default_rng(0)
    weight_rows = _cpu_team.WEIGHT_ROWS
    print(f"part product: one thread, thread CPU time (wall), k block {_cpu_team.GRADIENT_BLOCK}")
    for steps, batch, hidden in sizes:
        rows, depth = 4 * hidden, steps * batch
        g = rng.standard_normal((depth, rows), dtype=np.float32)
        x = rng.standard_normal((depth, hidden), dtype=np.float32)
        out = np.empty((rows, hidden), np.float32)
        want = g.astype(np.float64).T @ x.astype(np.float64)

        def ours():
            weight_rows(g, x, out, x, out, 0, rows, False)

        def blas():
            return g.T @ x  # at one thread: main() holds the BLAS there

        _check("blas", blas(), want)
        ours()
        _check("ours", out, want)
        times = {"blas": ([], []), "ours": ([], [])}
        for repeat in range(repeats):
            for name, run in ((("blas", blas), ("ours", ours)) if repeat % 2 else (("ours", ours), ("blas", blas))):
                cpu, wall = time.thread_time(), time.perf_counter()
                run()
                times[name][0].append(time.thread_time() - cpu)
                times[name][1].append(time.perf_counter() - wall)
        flops = 2 * rows * depth * hidden
        cells = [f"{name} {1e3 * np.median(c):.2f} ms ({1e3 * np.median(w):.2f}) {flops / np.median(c) / 1e9:.1f} GFLOP/s"
                 for name, (c, w) in times.items()]
        print(f"  {steps},{batch},{hidden} [{rows},{depth}]@[{depth},{hidden}] tiled={_cpu_team.tiled(rows, hidden, np.float32)}: "
              + " | ".join(cells), flush=True)


def team(sizes, repeats):
    rng = np.random.default_rng(0)
    real = _cpu_team.tiled
    print("part team: ratio to blas, thread CPU time, median (p10-p90)")
    for steps, batch, hidden in sizes:
        depth, rows = steps * batch, 4 * hidden
        g = rng.standard_normal((depth, rows), dtype=np.float32)
        g_copy = g.copy()
        x = rng.standard_normal((depth, hidden), dtype=np.float32)
        h = rng.standard_normal((depth, hidden), dtype=np.float32)
        w_ih = rng.standard_normal((rows, hidden), dtype=np.float32)
        wide = [a.astype(np.float64) for a in (g, x, h, w_ih)]
        want = (wide[0].T @ wide[1], wide[0].T @ wide[2], wide[0] @ wide[3])

        def blas():
            _cpu_team.tiled = lambda *a: False
            try:
                return _cpu_blas.backward_products(g, x, g, h, w_ih)
            finally:
                _cpu_team.tiled = real

        ways = {"blas": blas, "tiles": lambda: _cpu_blas.backward_products(g, x, g_copy, h, w_ih),
                "pairs": lambda: _cpu_blas.backward_products(g, x, g, h, w_ih)}
        for name, run in ways.items():
            for got, expected in zip(run(), want):
                _check(name, got, expected)
        times = {name: [] for name in ways}
        names = list(ways)
        for repeat in range(repeats):
            for name in names[repeat % 3:] + names[: repeat % 3]:
                start = time.thread_time()
                ways[name]()
                times[name].append(time.thread_time() - start)
        base = np.array(times["blas"])
        cells = []
        for name in names:
            ratio = np.array(times[name]) / base
            p10, p50, p90 = np.percentile(ratio, [10, 50, 90])
            cells.append(f"{name} {1e3 * np.median(times[name]):.2f} ms {p50:.3f} ({p10:.2f}-{p90:.2f})")
        print(f"  {steps},{batch},{hidden}: " + " | ".join(cells), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, action="append", metavar="T,B,H", help="default: issue 12's six")
    parser.add_argument("--part", choices=("product", "team"), action="append", help="default: both")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if _cpu_blas.team_gemm() is None:
        raise SystemExit("no BLAS gemm the team can call here (rnnkernels/_cpu_team.py): nothing to compare")
    parts = args.part or ("product", "team")
    if "product" in parts:
        with threadpool_limits(1, user_api="blas"):  # once: a limit per call scans the libraries
            product(args.size or SIZES, args.repeats)
    if "team" in parts:
        team(args.size or SIZES, args.repeats)


if __name__ == "__main__":
    main()
