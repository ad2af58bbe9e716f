"""Experiment 13: where two-thread LSTM inference time goes at 64,64,512, against torch.

    OPENBLAS_NUM_THREADS=1 python benchmarks/cpu/13_two_thread_inference.py [--size 64,64,512] [--part scaling]

Two parts (float32, I = H, inference: ``cpu.forward(training=False)``, checked against
the float64 reference first):

* ``scaling``: ours and torch.nn.LSTM at one and at two threads (Numba's and torch's
  ``set_num_threads``), the four interleaved in a rotating order per repeat; per
  repeat the one-to-two-thread speed-up of each library, reported as median (p10-p90)
  over the repeats, and the medians of each. Is torch's two-thread scaling stable?
* ``phases``: the row split's work (``cpu._inference_steps`` on each half of the
  batch) taken apart, each phase over all T steps of one half: the chunked input
  projections (``project_chunk``), the step products (``STEP_PRODUCT``), the cells,
  and the whole loop; each once on one thread alone (the other core idle) and once on
  two Python threads at the same time, one half each (the compiled functions release
  the GIL), each thread's wall and CPU time (``time.thread_time``). A phase that takes
  longer beside the other thread than alone is slowed by what the two cores share (L3,
  memory, the clock). ``product, units`` is the column split's product: all B rows,
  the panels of half the hidden units (all four gates of units 0:H/2 or H/2:H), so
  each core streams half of the packed W_hh.
* ``chunks``: whole inference calls at ``--threads`` threads with chunks of each of
  ``--chunk-rows`` rows (``_cpu_common.INFERENCE_CHUNK_ROWS`` and ``LARGE_CHUNK_ROWS``
  both set to it), interleaved, bits checked against the first; median (p10-p90) of
  the paired ratios to the first.

Results (2-core Zen 4 VM, AVX-512, 2 MB L2 per core, 32 MB L3; quiet; 64,64,512).
Before this experiment's changes (main 3593bda's code), 2026-12-02 00:59-01:01 UTC, 20
rounds per thread count: ours 179.2 ms at one thread, 97.5 (p10-p90 83.6-106.8) at
two, speed-up 1.86 (1.68-2.28); torch 200.5 and 103.2 (93.2-116.8), speed-up 1.88
(1.73-2.24); ours/torch 0.911 (0.843-0.948) at one thread, 0.920 (0.840-1.027) at two.
Torch's two-thread scaling is as unstable as ours, and both move with the host: in
one quiet process a little later (01:05-01:12 UTC), the medians of 15 two-thread calls of ours
were 168 ms and then 86 ms, with the process on both cores all along (CPU time /
wall 1.98 and 1.94) and no steal time reported by the guest's /proc/stat; the
previous session's 0.98 against 0.91 is within that. Phases (ms, medians of 20, one
half of the batch = 32 rows over all 64 steps):

    phase              alone wall  alone cpu   both wall (h0, h1)   both cpu (h0, h1)  both/alone
    projection            40.22      40.22      43.60    44.12      39.90    40.22      1.097
    product               38.52      38.50      43.09    42.74      38.86    38.55      1.118
    product, units        40.88      40.85      44.67    44.97      40.62    40.94      1.100
    cells                  2.83       2.83       4.14     3.85       3.44     3.49      1.466
    whole loop            89.86      89.48      92.24    93.84      88.04    89.51      1.044

So the row split does not lose compute beside the other core: each thread's CPU time
is what it is alone (the cells, 3% of it, excepted); what the wall time loses (4-12%)
is time the thread was not running (other processes' wake-ups on a machine whose two
cores we both hold). The step product of 32 rows runs at 111.6 GFLOP/s (4.29 GFLOP in
38.5 ms), the 4x2 tile's L1 peak, with the 4 MB W_hh streamed from L3 every step:
each panel pair (128 KB) is reused by 8 row blocks while in L2, so a column split
(``product, units``: each core the four gates of half of the units, 2 MB of W_hh)
has nothing to save, was 6% slower here, and would add a barrier per step; the
persistent loop's one team (dynamic chunk claims, so no core keeps its panels
either) measured 0.97x teams last session for the same reason. What the call had on
top of the split: NumPy packing W_ih and W_hh before the region, serial, 3.7 ms (1.4
ms per matrix in a warm loop; ``_cpu_common._pack_panels`` 0.75 ms), 4% of the
two-thread call. Changed: the split's threads pack both weights between them
(claimed chunks, then the row blocks); and the loop itself was 8 ms (10%) over the
sum of its phases, which chunks of 256 projection rows instead of 64 cut where W_ih
is 4 MB (``--part chunks``, 01:21 UTC, 30 pairs): 0.940 (0.899-1.046) at two threads,
0.967 (0.895-1.039) at one; 128,16,512 two threads 0.983 (0.825-1.062); 128,16,256
(W_ih 1 MB, in L2) 1.008 (0.820-1.130), hence the rule's 1 MB. Whole calls after
both: rnnkernels/cpu.py's docstring (0.94 of main at two threads, ours/torch 0.86
against 0.89 at one). This experiment's scaling part after both, 01:41 UTC: ours 170.0
ms at one thread, 84.2 (82.1-94.3) at two, speed-up 2.01 (1.78-2.10); torch 190.6 and
97.5 (93.5-103.6), 1.91 (1.75-2.16); ours/torch 0.903 (0.843-0.928) at one thread,
0.869 (0.807-0.980) at two. Run time: about 2 minutes for the two default parts.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numba
import numpy as np

from rnnkernels import _cpu_common, _cpu_gemm, cpu, reference


def _size(text):
    return tuple(int(v) for v in text.split(","))


def problem(steps, batch, hidden, seed=0):
    rng = np.random.default_rng(seed)
    scale = 1 / np.sqrt(hidden)
    x = rng.standard_normal((steps, batch, hidden), dtype=np.float32)
    w_ih = (scale * rng.standard_normal((4 * hidden, hidden))).astype(np.float32)
    w_hh = (scale * rng.standard_normal((4 * hidden, hidden))).astype(np.float32)
    bias = (scale * rng.standard_normal(4 * hidden)).astype(np.float32)
    h0 = rng.standard_normal((batch, hidden), dtype=np.float32) * 0.5
    c0 = rng.standard_normal((batch, hidden), dtype=np.float32) * 0.5
    return x, w_ih, w_hh, bias, h0, c0


def check(args):
    want = reference.forward(*(a.astype(np.float64) for a in args), training=False)[0]
    got = cpu.forward(*args, training=False)[0]
    error = np.abs(got - want).max() / np.abs(want).max()
    if error > 2e-5:
        raise SystemExit(f"cpu.forward: rel. err. {error:.2e} against the float64 reference")


def scaling(args, repeats):
    import torch

    steps, batch, hidden = args[0].shape[0], args[0].shape[1], args[2].shape[1]
    lstm = torch.nn.LSTM(hidden, hidden)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(args[1]))
        lstm.weight_hh_l0.copy_(torch.from_numpy(args[2]))
        lstm.bias_ih_l0.copy_(torch.from_numpy(args[3]))
        lstm.bias_hh_l0.zero_()
    tx, th, tc = (torch.from_numpy(a) for a in (args[0], args[4], args[5]))

    def ours():
        cpu.forward(*args, training=False)

    def theirs():
        with torch.no_grad():
            lstm(tx, (th[None], tc[None]))

    with torch.no_grad():
        want = reference.forward(*(a.astype(np.float64) for a in args), training=False)[0]
        got = lstm(tx, (th[None], tc[None]))[0].numpy()
        if np.abs(got - want).max() / np.abs(want).max() > 2e-5:
            raise SystemExit("torch: wrong against the float64 reference")
    # Blocks of rounds at one thread count, the counts alternating: torch rebuilds its
    # OpenMP team when its thread count changes (a call after a change took 260 ms at
    # 16,16,128), so the count changes only between blocks, each opened by a warm-up
    # round.
    runs = [("ours", ours), ("torch", theirs)]
    times = {(name, threads): [] for name, _ in runs for threads in (1, 2)}
    per_block = 5
    for block in range(2 * (-(-repeats // per_block))):
        threads = 1 + block % 2
        numba.set_num_threads(threads)
        torch.set_num_threads(threads)
        for repeat in range(per_block + 1):
            for name, function in runs if repeat % 2 == 0 else runs[::-1]:
                start = time.perf_counter()
                function()
                if repeat > 0:
                    times[(name, threads)].append(time.perf_counter() - start)
    print(f"scaling, {steps},{batch},{hidden}, {len(times[('ours', 1)])} rounds per thread count (ms medians)")
    for name in ("ours", "torch"):
        one, two = np.array(times[(name, 1)]), np.array(times[(name, 2)])
        p10, p50, p90 = np.percentile(one / two, [10, 50, 90])
        print(f"  {name:5s} 1 thr {1e3 * np.median(one):7.2f}  2 thr {1e3 * np.median(two):7.2f}"
              f"  (p10-p90 {1e3 * np.percentile(two, 10):.1f}-{1e3 * np.percentile(two, 90):.1f})"
              f"  speed-up {p50:.2f} ({p10:.2f}-{p90:.2f})")
    ratio1 = np.array(times[("ours", 1)]) / np.array(times[("torch", 1)])
    ratio2 = np.array(times[("ours", 2)]) / np.array(times[("torch", 2)])
    for label, ratio in (("1 thr", ratio1), ("2 thr", ratio2)):
        p10, p50, p90 = np.percentile(ratio, [10, 50, 90])
        print(f"  ours/torch {label}: {p50:.3f} ({p10:.3f}-{p90:.3f})")


def phase_functions(args):
    """{phase: function(half) running that phase over all T steps of batch half 0 or 1}."""
    x, w_ih, w_hh, bias, h0, c0 = args
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    packed_ih = _cpu_gemm.pack(w_ih.T)
    packed_hh = _cpu_gemm.pack(w_hh.T)
    padded = _cpu_common.padded_bias(bias, packed_ih, 4 * hidden, x.dtype)
    h = np.empty((steps + 1, batch, hidden), x.dtype)
    c = np.empty((2, batch, hidden), x.dtype)
    h[0], c[0] = h0, c0
    cpu._INFERENCE_STEPS(x, 0, batch, packed_ih, padded, h, c, packed_hh,
                         *(s[0] for s in _cpu_common.inference_scratch(1, x, packed_ih, packed_hh)[1:]))
    bounds, z, gates, rows_in = _cpu_common.inference_scratch(2, x, packed_ih, packed_hh)
    wide_z = np.empty((2, batch, z.shape[2]), x.dtype)
    rows = batch // 2
    chunk = gates.shape[1] // rows
    panels = packed_hh.shape[0]
    unit_panels = panels // 8  # panels of half the units of one gate
    product_panels = _cpu_common._PRODUCT_CALLEES["product_panels"]
    c_work = np.empty((2, 2, batch, hidden), x.dtype)
    h_out = np.empty((2, batch, hidden), x.dtype)

    def project(half):
        first_row, end_row = bounds[half], bounds[half + 1]
        for first in range(0, steps, chunk):
            _cpu_common.PROJECT_CHUNK(x, first, min(chunk, steps - first), first_row, end_row, packed_ih, padded,
                                      gates[half], rows_in[half])

    def product(half):
        first_row, end_row = bounds[half], bounds[half + 1]
        for t in range(steps):
            _cpu_common.STEP_PRODUCT(h[t, first_row:end_row], packed_hh, z[half])

    def product_units(half):
        for t in range(steps):
            for gate in range(4):
                first = gate * 2 * unit_panels + half * unit_panels
                product_panels(h[t], packed_hh, wide_z[half], None, first, first + unit_panels)

    def cells(half):
        first_row, end_row = bounds[half], bounds[half + 1]
        scratch = gates[half][:rows].copy()
        for t in range(steps):
            work = scratch.copy()  # the cell overwrites its gates; about 2% of a cell
            cpu._SERIAL.cell_forward(work, z[half], c_work[half, t % 2, first_row:end_row],
                                     h_out[half, first_row:end_row], c_work[half, (t + 1) % 2, first_row:end_row])

    def whole(half):
        cpu._INFERENCE_STEPS(x, bounds[half], bounds[half + 1], packed_ih, padded, h, c, packed_hh, z[half],
                             gates[half], rows_in[half])

    c_work[:] = 0.5
    return {"projection": project, "product": product, "product, units": product_units, "cells": cells,
            "whole loop": whole}


def timed(function, half, out, barrier=None):
    if barrier is not None:
        barrier.wait()
    wall, cpu_time = time.perf_counter(), time.thread_time()
    function(half)
    out[half] = (time.perf_counter() - wall, time.thread_time() - cpu_time)


def phases(args, repeats):
    functions = phase_functions(args)
    print(f"phases: ms over all T steps of one half of the batch, median of {repeats};"
          " alone: one thread, the other core idle; both: two threads at once, one half each")
    print("  phase              alone wall  alone cpu   both wall (h0, h1)      both cpu (h0, h1)   both/alone")
    for name, function in functions.items():
        for half in (0, 1):
            function(half)  # compiles or loads the cache
        alone = {0: [], 1: []}
        both = {0: [], 1: []}
        for _ in range(repeats):
            out = {}
            for half in (0, 1):
                timed(function, half, out)
                alone[half].append(out[half])
            out = {}
            barrier = threading.Barrier(2)
            workers = [threading.Thread(target=timed, args=(function, half, out, barrier)) for half in (0, 1)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            for half in (0, 1):
                both[half].append(out[half])
        a = np.array(alone[0] + alone[1]) * 1e3
        b = [np.array(both[half]) * 1e3 for half in (0, 1)]
        a_wall, a_cpu = np.median(a[:, 0]), np.median(a[:, 1])
        b_wall = [np.median(v[:, 0]) for v in b]
        b_cpu = [np.median(v[:, 1]) for v in b]
        print(f"  {name:16s} {a_wall:10.2f} {a_cpu:10.2f}   {b_wall[0]:8.2f} {b_wall[1]:8.2f}     "
              f"{b_cpu[0]:8.2f} {b_cpu[1]:8.2f}     {max(b_wall) / a_wall:6.3f}")


def chunks(args, threads, choices, repeats):
    numba.set_num_threads(threads)
    want = cpu.forward(*args, training=False)[0]
    times = {rows: [] for rows in choices}
    for repeat in range(repeats + 1):
        for rows in choices if repeat % 2 == 0 else choices[::-1]:
            _cpu_common.INFERENCE_CHUNK_ROWS = _cpu_common.LARGE_CHUNK_ROWS = rows
            start = time.perf_counter()
            got = cpu.forward(*args, training=False)[0]
            if repeat > 0:
                times[rows].append(time.perf_counter() - start)
            if got.tobytes() != want.tobytes():
                raise SystemExit(f"chunks of {rows} rows: other bits")
    base = np.array(times[choices[0]])
    for rows in choices:
        ratio = np.array(times[rows]) / base
        print(f"  {threads} thr, chunks of {rows:4d} rows: {1e3 * np.median(times[rows]):8.2f} ms,"
              f" over {choices[0]} rows {np.median(ratio):.3f} ({np.percentile(ratio, 10):.3f}-"
              f"{np.percentile(ratio, 90):.3f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, default=(64, 64, 512), metavar="T,B,H")
    parser.add_argument("--part", choices=("scaling", "phases", "chunks"), action="append")
    parser.add_argument("--threads", type=int, default=2, help="for --part chunks")
    parser.add_argument("--chunk-rows", default="64,256", help="for --part chunks: comma-separated")
    parser.add_argument("--repeats", type=int, default=15)
    options = parser.parse_args(argv)
    steps, batch, hidden = options.size
    args = problem(steps, batch, hidden)
    check(args)
    for part in options.part or ("scaling", "phases"):
        if part == "scaling":
            scaling(args, options.repeats)
        elif part == "chunks":
            chunks(args, options.threads, [int(v) for v in options.chunk_rows.split(",")], options.repeats)
        else:
            numba.set_num_threads(1)
            phases(args, options.repeats)


if __name__ == "__main__":
    main()
