"""Experiment 03: the packed kernel's tile shape and vector width (rnnkernels/_cpu_gemm.py).

    python benchmarks/cpu/03_tile_shapes.py          # 1 thread; about a minute

Each candidate computes out = A [M, K] @ M [K, N] through one tile shape only (rows x
panels, each panel two vectors) at one vector width (32 bytes: AVX2's ymm; 64 bytes:
AVX-512's zmm, where the CPU has it), over the products of issue 12's sizes: the input
projection (M = T·B) and one step (M = B). Every candidate is validated against a
float64 product first. Timed in thread CPU time (``time.thread_time``), best of 15
interleaved rounds: on the shared 2-core build machine other jobs' load moves wall
times by 20% and more, and a single-threaded kernel's CPU time much less.

Result (2-core AMD EPYC Zen 4, AVX-512, numba 0.68, load average 3.3-5.8 from other
jobs; GFLOP/s, higher is better):

    M, K, N              4x1/32   4x1/64   4x2/64
    2048, 256, 1024         99      103      110
    16, 256, 1024          103      111      114
    8, 128, 512            100      107      110
    4096, 128, 512          98      103      105
    64, 512, 2048           99      107      111
    4, 64, 256              78       81       81

(OpenBLAS's sgemm: 82 GFLOP/s wall on 2048x256x1024 with the machine idle.) 512-bit
vectors win 3-8% (the same FMA throughput on Zen 4, half the instructions and
broadcasts); 4 rows x 2 panels (16 zmm accumulators, possible with AVX-512's 32
registers) 2-7% more. rnnkernels uses 4x2 at 64 bytes where Numba targets AVX-512F,
4x1 at 32 bytes elsewhere (``_cpu_gemm.VECTOR_BYTES``, ``TWO_PANEL_BLOCKS``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numba
import numpy as np

from rnnkernels import _cpu_gemm

SHAPES = ((2048, 256, 1024), (16, 256, 1024), (8, 128, 512), (4096, 128, 512), (64, 512, 2048), (4, 64, 256))
CANDIDATES = ((4, 1, 32), (4, 1, 64), (4, 2, 64))  # rows, panels, vector bytes


def driver(rows, panels, vector_bytes):
    """A product through one tile shape only (M a multiple of rows, panels of N a
    multiple of panels). The tile's width is read when it compiles, so each driver is
    compiled here, with VECTOR_BYTES set to its width."""
    _cpu_gemm.VECTOR_BYTES = vector_bytes
    tile = _cpu_gemm._make_tile(rows, panels)

    @numba.njit(nogil=True)
    def product(a, packed, out):
        for panel in range(0, packed.shape[0] - packed.shape[0] % panels, panels):
            for row in range(0, a.shape[0] - a.shape[0] % rows, rows):
                tile(a, row, packed, panel, out, None)

    return product


def main():
    if numba.get_num_threads() != 1:  # the drivers are serial; a note for the record only
        print("note: run with NUMBA_NUM_THREADS=1 for a one-thread figure", file=sys.stderr)
    default_bytes = _cpu_gemm.VECTOR_BYTES
    if default_bytes < 64:
        print("this CPU (or Numba's target) has no AVX-512F: the 64-byte rows are split by LLVM")
    rng = np.random.default_rng(0)
    print("M, K, N            " + "".join(f"{r}x{p}/{b}".rjust(9) for r, p, b in CANDIDATES) + "   load")
    drivers = {}
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        matrix = rng.standard_normal((k, n)).astype(np.float32)
        want = a.astype(np.float64) @ matrix.astype(np.float64)
        calls = {}
        for candidate in CANDIDATES:
            if candidate not in drivers:
                drivers[candidate] = driver(*candidate)
            _cpu_gemm.VECTOR_BYTES = candidate[2]
            packed = _cpu_gemm.pack(matrix)
            out = np.zeros((m, packed.shape[0] * packed.shape[2]), np.float32)
            drivers[candidate](a, packed, out)
            error = np.abs(out[:, :n] - want).max() / np.abs(want).max()
            if error > 1e-5:
                raise SystemExit(f"{candidate} is wrong at {(m, k, n)}: max rel. error {error:.1e}")
            calls[candidate] = (packed, out)
        repeats = max(3, int(2e10 / (m * k * n)))
        best = dict.fromkeys(CANDIDATES, np.inf)
        for _ in range(15):
            for candidate in CANDIDATES:
                packed, out = calls[candidate]
                start = time.thread_time()
                for _ in range(repeats):
                    drivers[candidate](a, packed, out)
                best[candidate] = min(best[candidate], (time.thread_time() - start) / repeats)
        print(f"{m:5}, {k:4}, {n:5}    " + "".join(f"{2 * m * k * n / best[c] / 1e9:9.0f}" for c in CANDIDATES)
              + f"   {os.getloadavg()[0]:.1f}", flush=True)
    _cpu_gemm.VECTOR_BYTES = default_bytes


if __name__ == "__main__":
    main()
