"""The CPU backend: Numba for the time loop, packed weights, a register-blocked kernel.

The math is the reference's (see ``rnnkernels/reference.py``); the work is split the
way the CUDA kernels split it:

* one large product projects every step's input at once: ``gx = x W_ihᵀ + b`` over
  T·B rows, by the same packed kernel, which adds b as it stores each tile;
* the whole time loop is one compiled call (``_forward_steps``): per step the small
  product ``h_{t-1} W_hhᵀ``, by the micro-kernel of ``_cpu_gemm`` on W_hhᵀ packed
  once per call (a BLAS call per step repacked W_hh every time and cost Python and
  unboxing overhead on top), then the fused cell, which applies all four gate
  activations and the cell update, reading each gate pre-activation once, writing
  h_t and c_t, and overwriting the step's slice of the input projection with the
  activated gates (the buffer backward reads);
* backward mirrors it in one call (``_backward_steps``): per step the cell turns dh,
  dc and the saved gates into the gate gradients dz_t (and the per-step gradient
  norms), then dh_{t-1} = dz_t W_hh with packed W_hh; after the loop, dW_ih = dzᵀ x,
  dW_hh = dzᵀ h_{t-1} and dx = dz W_ih on ONE Numba thread team (``_cpu_team``, through
  ``_cpu_blas.backward_products``): the weight gradients by the BLAS's sgemm, called
  from inside the parallel region through a function pointer at one BLAS thread, dx
  by the packed kernel (the whole training call 0-3% faster than with dx by the
  BLAS's sgemm in the team at one thread), a fixed list of chunks the threads claim;
  then a column sum gives db;
* a single step (T = 1: token-by-token decoding) packs nothing: two BLAS products and
  the same fused cell (``_single_step``), since packing would cost more than the step;
* inference (training=False, T > 1) keeps nothing for backward (``_inference_steps``):
  the input projection is done a chunk of 64 rows (64 / B steps) at a time just ahead
  of the steps that read it, so each chunk is read back from L2 instead of a T·B·4H
  buffer from L3 (8 MB at 128,16,256), and c has no history (two rows, ping-pong);
  where the packed W_ih is over 1 MB (I = H = 512: 4 MB, from L3 each chunk) a chunk
  is 256 rows (``_cpu_common.inference_scratch``; 0.94-0.97 of the time at 64,64,512).
  With two Numba threads or more and B >= 8, the batch is split into row blocks, one
  per thread, each running that whole loop, chunked projection included, on its own
  rows (``_inference_split``; rows never interact) instead of the persistent loop
  (whose teams split the rows the same way, after one parallel projection of all
  steps); the split's threads first pack W_ih and W_hh between them (NumPy's packing
  before the region was serial: 3.7 ms, 4% of the two-thread call at 64,64,512).
  Why rows and not columns (each core the gates of half of the hidden units, so its
  half of W_hh could stay in its 2 MB L2) at 64,64,512, where W_hh is 4 MB: the step
  product of a block of 32 rows already runs at the tile's L1 peak (111.6 GFLOP/s,
  each panel pair reused by 8 row blocks while in L2), and beside the other core its
  thread CPU time is unchanged (the phases, benchmarks/cpu/13_two_thread_inference.py),
  so keeping W_hh in L2 has nothing to save and a column split adds a barrier per
  step; its product alone was 6% slower (40.9 against 38.5 ms). The same kernels,
  each element by the same code: the same bits as the
  training forward at any chunk, split and thread count
  (tests/test_cpu.py::test_cpu_inference_gives_the_training_forwards_bits). The
  helpers are in ``_cpu_common`` (the chunk's projection, the block rule, the scratch,
  the padded bias) for the GRU and the Elman RNN, which do not use them yet: each
  cell's loop is one more compiled function, 1.2-2.4 s cold per dtype (the split
  4.4-5.5 s), which CI pays once per run.

Where one-thread inference time goes, and the floor (2-core Zen 4 VM, float32; phases
timed alone, not quiet; ``benchmarks/cpu/11_inference_phases.py``, which has a quiet
run too): at (T,B,I=H) = 128,16,256 the projection took 10.1 ms and the
loop 10.6 ms (its step products 9.9 ms, its cells 128 x 7 µs), packing 0.2 ms; at
512,8,128 5.6 ms, 6.1 ms (cells 512 x 1.6 µs), 0.05 ms. The packed kernel's 4x2 tile
runs 112 GFLOP/s with its operands in L1 (16 float32 FMAs per cycle: AVX-512 FMAs
double-pumped on two 256-bit pipes, at about 3.5 GHz); the projection ran at 101-106 of
that and the step product at about 108, so the multiply-adds alone (2·T·B·4H·(I+H)
flops) take at least 19.2 ms at 128,16,256 and 9.6 ms at 512,8,128. torch took 21.4-22.7
and 11.6-13.3 ms there: 0.8x torch (issue 12's goal) is below that floor at 128,16,256
and within the cells' own time of it at 512,8,128. What chunking saves is the
projection buffer's round trip through L3 (below). The cells cost 4-7% of the call; a
cell fused into the product's tile (W_hh packed so one tile holds all four gates of
its units) would save only their loads and stores of z and the gates, not their
σ/tanh arithmetic, which is most of it (benchmarks/cpu/07): not tried. Chunk sizes of
16-256 rows were within 1% of each other at every size (not quiet).

Inference against the training forward's loops (the path before), paired in one
process (``benchmarks/cpu/08_against_checkout.py --mode forward``, 31 pairs, quiet,
2026-12-01; median new/old, p10-p90), at 128,16,256 / 128,8,128 / 512,8,128 / 64,64,512
/ 256,1,128 / 1024,4,64. Against main 302a23f (before bwdloop's teams), 23:00 UTC:
one thread 0.94 (0.90-0.97) / 0.98 (0.91-1.08) / 0.87 (0.79-0.93) / 0.97 (0.92-1.03) /
1.03 (0.97-1.11) / 0.90 (0.87-0.98); two threads 0.94 / 0.94 / 0.78 / 0.94 (p90 <=
0.98). Against main 5591497 (the persistent loop in teams, the serial product in runs
of panels), 23:19 UTC: one thread 0.98 (0.95-0.99) / 1.00 (0.98-1.01) / 0.96
(0.93-0.99) / 0.97 (0.93-1.03) / 1.02 (0.99-1.04) / 0.99 (0.96-1.02); two threads 0.95
(0.70-1.00) / 1.01 (0.96-1.04) / 0.96 (0.94-1.01) / 0.96 (0.76-1.02). At B = 1 the
chunked loop is 2-3% slower (about 80 ns more a step, its slicing per step), within
the spread at 1024,4,64. Training runs the loops it ran before (08, one thread, against
302a23f: 0.99-1.03, within the spreads). Tried and lost: the two row blocks on Python
threads (the caller and ``_cpu_blas``'s worker; the nogil serial loop, so no parallel
function to compile) instead of a prange: 1.0-1.8x the prange at B = 8-16 beside torch
or our persistent loop, whose OpenMP workers spin on the second core for a while after
each call where a sleeping Python thread had to be woken and scheduled.

Against torch (``benchmarks/cpu_vs_torch.py --mode forward``, quiet, ours/torch with
p10-p90), on this branch at 128,16,256 / 128,8,128 / 512,8,128 / 64,64,512 / 256,1,128 /
1024,4,64: one thread (23:16 UTC, before rebasing onto 5591497) 0.97 (0.95-0.99) / 0.95 (0.93-0.97) / 0.93
(0.91-0.96) / 0.95 (0.94-0.96) / 0.90 (0.87-0.94) / 0.89 (0.87-0.90); two threads (after
rebasing onto 5591497, 23:20-23:24) 0.94 (0.84-1.05) / 0.78 (0.61-0.91) / 0.83
(0.76-0.92) / 0.95 (0.92-1.01) / 0.76 (0.65-1.07) / 0.46 (0.39-0.52). Before, on
302a23f (22:36-22:39): one thread 1.00 / 0.93 / 1.05 / 0.98 / 0.87 / 0.87, two threads
1.00 / 0.90 / 0.90 / 1.10 / 0.77 / 0.59.

The split's threads packing the weights, and chunks of 256 rows where W_ih is over 1
MB (issue 12's two-thread target at 64,64,512; benchmarks/cpu/13_two_thread_inference.py
has where the time goes), 2026-12-02, quiet: against main 3593bda, paired
(``08_against_checkout.py --mode forward``, median new/old with p10-p90), at
64,64,512 / 128,16,256 / 128,8,128 / 512,8,128 / 256,1,128 / 1024,4,64, two threads (41
pairs) 0.938 (0.88-1.05) / 0.967 / 0.927 / 0.985 / 0.976 / 0.996 (the last two do not
split: B < 8); one thread (31 pairs) 0.963 (0.91-1.00) / 0.993 / 0.998 / 1.001 / 0.998 /
0.996 (only 64,64,512's chunks changed). Against torch (``cpu_vs_torch.py --mode
forward``, same order), two threads 0.86 (0.77-0.90) / 0.87 / 0.77 / 0.78 / 0.80 / 0.49,
one thread 0.89 (0.85-0.93) / 0.95 / 0.91 / 0.91 / 0.82 / 0.83: every size at two
threads at or under its one-thread ratio. A second run at 64,64,512 (``--size
64,64,512 --threads 1 --threads 2 --repeats 40``, 01:43 UTC): 0.89 (0.85-0.94) at one
thread, 0.89 (0.85-0.96) at two; experiment 13's scaling part (01:41 UTC): ours
speeds up 2.01x (1.78-2.10) from one thread to two, torch 1.91x (1.75-2.16), ours/torch
0.903 at one thread, 0.869 at two.

float32 and float64 are supported; arithmetic stays in the input dtype. Every output
bit is the same in any process, whatever ran before, at any thread count and in
either time loop (tests/test_cpu.py, tests/test_cpu_process.py).

Compiled variants (``rnnkernels/_cpu_common.py``, shared with the GRU and the Elman
RNN; the rule is ``_cpu_common.time_loop``): a *serial* and a *persistent* copy of
each time loop, each under its own name in Numba's cache; float32 and float64 are
signatures of each. The persistent loop is one parallel region per call: the threads
stay in it for all T steps; the batch rows are split into one team per thread (from 2
rows each: a row's recurrence never reads another row, so a team never waits for
another), and where a team has several threads they share each step's product (runs
of panels) and cell (blocks of rows) by claiming chunks with atomic counters
(``_cpu_sync.py``), instead of forking and joining the pool twice per step. It runs
when Numba has more than one thread, the step product has 2^14 multiply-adds or more
(B·4H·H for the LSTM) and two 4-panel groups or more, or two teams: 0.70-0.85x our
serial loop's time from (T,B,H) = 256,1,128 to 64,64,512 at two threads in
inference, before the teams, which took the backward loop from 1.64 to 0.95 ms at
128,8,128 (measurements in ``_cpu_common``'s docstring).
The input projection is one product, split over the threads from 2^20 multiply-adds
up. The packed kernel's vector
width follows Numba's target (``_cpu_gemm.VECTOR_BYTES``: 64 bytes where it has
AVX-512F, else 32) and is part of every compiled function's cache name; a product's
sums keep their order at either width. The compiled code is cached on disk
(``__pycache__`` next to this file, or ``NUMBA_CACHE_DIR``): a new process loads it
instead of compiling (about a second per variant).

Threading policy: ONE thread pool, Numba's, for everything a call of T > 1 steps
computes: the input projection, both time loops, and backward's after-loop products
(``_cpu_team``). The weight gradients among those are gemm calls into NumPy's BLAS,
made by Numba's threads from inside the team's parallel region, with the BLAS held at
ONE thread meanwhile (``_cpu_blas``: the user's BLAS setting is restored after, also
when several Python threads call backward at once), so no BLAS thread ever runs. The
products are cut into a fixed list of chunks (a function of the shape, never of the
thread count) that the threads claim in order, so the bits are the same at any thread
count. ``numba.set_num_threads`` / ``NUMBA_NUM_THREADS`` sets Numba's threads; the rule
for what runs in parallel is above. Where the team has no gemm to call (a BLAS other
than OpenBLAS or MKL: ``_cpu_team.find_gemm``) or the products are small (under
``_cpu_blas.TEAM_MIN_MACS`` multiply-adds), the weight gradients are NumPy products at
one BLAS thread, side by side on a one-worker executor thread at two Numba threads or
more, then dx is a parallel product of its own (what every call did before the team).
NumPy's BLAS at the user's threads (``OPENBLAS_NUM_THREADS``) is used only by the
single step's forward (T = 1: two small products, see ``_single_step``; at two BLAS
threads its worker still spins after each decoding step). No OpenMP variable is set or
needed. Why, as measured on the 2-core Zen 4 VM the project builds on (quiet machine,
float32, ``benchmarks/cpu/04_thread_interference.py`` and ``10_after_loop_team.py``,
2026-12-01):

* One team for the after-loop products (dW_ih, dW_hh, dx), against the weight gradients
  side by side on the executor thread, then dx in a region of its own: the whole LSTM
  training call at two threads took 0.86 (0.72-0.99) / 0.74 (0.68-0.84) / 0.69
  (0.63-0.76) / 0.94 (0.82-1.02) / 0.85 (0.75-0.98) / 0.72 (0.67-0.75) of the time, at
  (T,B,H) = 128,16,256 / 128,8,128 / 512,8,128 / 64,64,512 / 256,1,128 / 1024,4,64
  (experiment 10, quiet, 25 interleaved repeats, median (p10-p90) of the paired ratios;
  with the time loops that split rows into teams). Measured before those loops came in:
  at one thread 1.00 / 0.99 / 1.01 / 1.00 / 1.00 / 0.99 (p10-p90 within 0.93-1.09); the
  GRU and the tanh RNN at 128,16,256 / 128,8,128 / 512,8,128, two threads 0.80 / 0.90 /
  0.78 and 0.80 / 0.74 / 0.77, one thread 1.00-1.01. Against torch
  (``benchmarks/cpu_vs_torch.py --mode training``, quiet, LSTM, ours/torch at the six
  sizes in the order above): two threads 0.98 / 0.81 / 0.85 / 0.92 / 0.58 / 0.72 (the
  weight gradients on the executor thread, same loops, same session: 1.10 / 1.12 / 1.24
  at the first three), one thread 0.97 / 0.92 / 1.01 / 0.92 / 0.86 / 0.87. Not done: the
  products inside the persistent backward loop's own region (no region end between the
  last step and the first chunk): an empty parallel region of the team costs 3.2 µs at
  two threads and the whole team call at a tiny size 15 µs (quiet), under 0.3% of the 6
  ms call at 128,8,128, so it was not worth a change to the shared loop. By phase at
  128,8,128, two threads (experiment 04 --phases, quiet, before the rows-in-teams
  loops): dW 3.99 + dx 1.60 ms before, 2.56-2.70 ms for both on the team, the whole call
  9.68-10.16 -> 6.44-6.70 ms (two runs). With the rows-in-teams loops: dW 3.40 + dx 1.44
  -> 2.27 ms, the call 7.92 -> 5.19 ms; at 512,8,128 dW 12.51 + dx 5.73 -> 8.90 ms, the
  call 30.55 -> 19.99 ms. The cause of the old cost: libgomp's worker, spinning after
  the persistent backward loop's region ended, held the second core while the executor's
  thread wanted it (with OMP_WAIT_POLICY=passive the dW phase had halved); now that
  worker is the one that takes the next chunk. dx by the BLAS's sgemm in the team
  instead of the packed kernel: 1.00-1.03x the packed kernel's whole call at one thread,
  0.97-1.04x at two (ratios of the medians, same runs as the first numbers; 1.01-1.04x
  at two with the new loops), so the packed kernel stays. Chunks: each chunk of a BLAS
  product is one gemm call that repacks the other operand, which at one thread cost
  2-14% of the three products when each was cut into 2-8 chunks (quiet, the products
  alone), so a weight gradient is one chunk unless it is more than half of the work, and
  dx (whose packed row blocks cost nothing extra) is cut into four: with I = H, each of
  two threads runs a weight gradient and two dx blocks.
* OpenBLAS's workers spin for about 100 ms after each call. When dW_ih and dW_hh were
  NumPy products at two BLAS threads, a training call burnt 0.10-0.11 s of CPU in the
  0.2 s after it returned (now 0.004-0.008 s, Numba's OpenMP workers' own short spin;
  tests/test_cpu_process.py checks it), and the spinning worker took the core that
  the next call's parallel projection and dx needed: our training call alone in a
  process took 65.7 / 8.6 / 3.1 / 11.2 ms at one thread and 69.7 / 17.0 / 8.0 / 16.1 ms
  at two (p90 131.6 / 26.0 / 17.2 / 25.3) at (T, B, H) = 128,16,256 / 128,8,128 /
  256,1,128 / 1024,4,64; by phase at 256,1,128, the projection 0.34 -> 3.72 ms. With
  OpenBLAS at one thread (the whole process): 47.9 / 8.9 / 3.2 / 11.3 ms; with the
  weight gradients on our packed kernel: 38.2 / 9.9 / 2.9 / 10.3 ms.
* The spinning also slowed PyTorch when both ran in one process, taking turns (as
  ``benchmarks/cpu_vs_torch.py`` times them): torch's two-thread training calls took
  69.2 / 17.6 / 7.6 / 29.3 ms paired with ours against 36.4 / 7.4 / 3.6 / 13.4 ms
  alone; without the spinning, 39.9 / 6.7 / 3.9 / 12.8 ms (0.91-1.10x alone), in a
  fresh process. Two OpenMP runtimes are loaded (Numba's ``omp`` layer the system's
  libgomp, torch its own copy); each spins a few ms after a parallel region, then
  sleeps. Not explained yet: in a process that had run 64,64,512 first, torch's
  two-thread calls at 1024,4,64 took 10.9 / 23.3 ms (inference / training) paired
  with ours, 4.9 / 16.9 ms alone (so benchmarks/cpu_vs_torch.py runs each size in a
  fresh process).
* OMP_WAIT_POLICY=passive (no spinning at all) is no remedy: it slowed torch's
  two-thread calls 1.8-24x (1024,4,64 inference: 4.2 -> 101.7 ms alone; oneDNN's
  per-step parallel regions need spinning workers) and our two-thread inference up to
  2x (128,16,256: 12.1 -> 24.2 ms); GOMP_SPINCOUNT=0 did the same to the paired calls.
  OMP_WAIT_POLICY=active moved torch's rows by -28% to +32%, no consistent gain.
* Why OpenBLAS and not our packed kernel for the weight gradients (dW = dzᵀ x through
  a transposed-A tile blocked over K, parallel over row chunks; deleted): at one
  thread it was slower than OpenBLAS's sgemm at these long-K products, the two at
  128,16,256 (2048 x 1024 x 256 each) 30-34 ms against 23-24 ms, which put one-thread
  training at 1.07-1.11x torch at 128,16,256, 512,8,128 and 64,64,512. Paired in one
  process (LSTM training call, 40 pairs, quiet, median B/A with p10-p90; A the packed
  kernel, B the weight gradients as now): one thread 0.86 (0.83-0.89) / 0.92
  (0.86-0.99) / 0.96 (0.89-1.02) at 128,16,256 / 512,8,128 / 64,64,512; two threads,
  with the products before dx, 1.03 (0.93-1.26) / 0.96 (0.87-1.10) / 0.94 (0.74-1.11),
  and after dx 1.02 / 1.08 / 0.94 (the spinning OpenMP worker of dx's parallel
  product took the second product's core). Holding the BLAS at one thread and
  restoring it costs 2-5 µs per call. (Measured before the persistent time loops
  came in, on the fork-per-step parallel variant.)

The persistent time loop's waiters spin about 100 µs, then yield 16 times, then nap
(``usleep(20)``) until their phase is done (``_cpu_sync``'s "Waiting": the policy and
its measurements, benchmarks/cpu/09_oversubscribed.py). On an unloaded machine that is
a spin (no cost measured); with more runnable threads than cores it bounds the damage:
at NUMBA_NUM_THREADS=4 on 2 cores, 1024,4,64 inference, p90 10x the serial loop
instead of 1346x with a spin alone. When another process's busy threads share the
cores, giving the core away costs up to a scheduler tick per nap (128,8,128 training
at 2.2x the serial loop where pure spinning gave 1.0x): one thread per core, Numba's
default, on cores nobody else needs, is still the setting the loop is made for, and
NUMBA_NUM_THREADS=1 (the serial loop) the one for a loaded machine.
"""

from __future__ import annotations

import numba
import numpy as np

from . import _cpu_blas, _cpu_common, _cpu_gemm, _cpu_sync, _cpu_threading, _fastmath
from ._backend import Backend
from .reference import Saved, saved_arrays

# The cell loops. Each reads every gate pre-activation once and keeps the cell math in
# registers. They are plain functions here, compiled below into one Numba dispatcher
# per variant; see ``_cpu_common.compile_function`` for why.
#
# Each row is processed by a few short loops over a handful of arrays each rather than
# one loop touching all of them: with six or more arrays in one loop LLVM's runtime
# alias checks give up and the scalar loop runs (4x slower, measured). Each gate is
# reached through its own slice that starts at 0: written as ``act[3 * hidden + j]``
# the output-gate loop did not vectorize (11.9 µs against 1.9 µs for the input/forget
# loop over twice the values, 16x256 float32); the slices compute the same bits.


def _cell_forward(gates, z, c_prev, h_out, c_out):
    """One step for every (b, j). On entry ``gates`` [B, 4H] holds the input projection
    with bias and z [B, 4H] holds h_{t-1} W_hhᵀ; on exit ``gates`` holds the activated
    i, f, g, o. c_prev, h_out, c_out [B, H]."""
    batch, hidden = c_prev.shape
    for b in numba.prange(batch):
        act, rec = gates[b], z[b]
        act_if, rec_if = act[: 2 * hidden], rec[: 2 * hidden]
        act_g, rec_g = act[2 * hidden : 3 * hidden], rec[2 * hidden : 3 * hidden]
        act_o, rec_o = act[3 * hidden :], rec[3 * hidden :]
        for j in range(2 * hidden):  # i, f
            act_if[j] = _fastmath.sigmoid(act_if[j] + rec_if[j])
        for j in range(hidden):
            act_g[j] = _fastmath.tanh(act_g[j] + rec_g[j])
        gate_i, gate_f = act[:hidden], act[hidden : 2 * hidden]
        c_in, c_row, h_row = c_prev[b], c_out[b], h_out[b]
        # σ(o) here rather than in a loop of its own saves storing and reloading it: 8%
        # of the cell at 8 x 128, 3% at 16 x 256, the same bits (the loop still
        # vectorizes: its eight views come from five arrays).
        for j in range(hidden):
            o = _fastmath.sigmoid(act_o[j] + rec_o[j])
            act_o[j] = o
            c = gate_f[j] * c_in[j] + gate_i[j] * act_g[j]
            c_row[j] = c
            h_row[j] = o * _fastmath.tanh(c)


def _cell_backward(dy, dh_next, carry, gates, c_prev, c_cur, dz, row_sq):
    """Gate gradients of one step. Reads dy, dh_next [B, H] (the gradient reaching h_t
    from y_t and from step t+1), carry [B, H] (reaching c_t from step t+1; overwritten
    with the part that flows on to c_{t-1}), the saved gates [B, 4H], c_{t-1} and c_t
    [B, H]; writes dz [B, 4H] and row_sq [B, 2] (scratch). Returns (‖dh_t‖², ‖dc_t‖²)."""
    batch, hidden = c_cur.shape
    one = dz.dtype.type(1)
    for b in numba.prange(batch):
        act, grad, dc_row = gates[b], dz[b], carry[b]
        gate_i, gate_f = act[:hidden], act[hidden : 2 * hidden]
        gate_g, gate_o = act[2 * hidden : 3 * hidden], act[3 * hidden :]
        grad_i, grad_f = grad[:hidden], grad[hidden : 2 * hidden]
        grad_g, grad_o = grad[2 * hidden : 3 * hidden], grad[3 * hidden :]
        dy_row, dh_row, c_row = dy[b], dh_next[b], c_cur[b]
        # Per-row sums, added across rows in order after the loop: a prange reduction
        # would add them in an order that depends on the thread count.
        dh_sq = 0.0
        dc_sq = 0.0
        for j in range(hidden):  # dz^o, and dc_t into the carry row
            o = gate_o[j]
            tanh_c = _fastmath.tanh(c_row[j])
            dh = dy_row[j] + dh_row[j]
            dc = dc_row[j] + dh * o * (one - tanh_c * tanh_c)
            grad_o[j] = dh * tanh_c * o * (one - o)
            dc_row[j] = dc
            dh_sq += dh * dh
            dc_sq += dc * dc
        row_sq[b, 0] = dh_sq
        row_sq[b, 1] = dc_sq
        c_in = c_prev[b]
        for j in range(hidden):  # dz^i, dz^f, dz^g, and the carry to c_{t-1}
            i, f, g = gate_i[j], gate_f[j], gate_g[j]
            dc = dc_row[j]
            grad_i[j] = dc * g * i * (one - i)
            grad_f[j] = dc * c_in[j] * f * (one - f)
            grad_g[j] = dc * i * (one - g * g)
            dc_row[j] = dc * f
    dh_total = 0.0
    dc_total = 0.0
    for b in range(batch):
        dh_total += row_sq[b, 0]
        dc_total += row_sq[b, 1]
    return dh_total, dc_total


def _forward_steps(gates, h, c, packed_w_hh_t, z):
    """All T steps in one compiled call (no per-step Python, BLAS or unboxing cost).
    gates [T, B, 4H]: x W_ihᵀ + b on entry, the activated gates on exit; h, c
    [T+1, B, H] with h[0], c[0] set; packed_w_hh_t: W_hhᵀ packed; z [B, ≥4H] scratch."""
    for t in range(gates.shape[0]):
        step_product(h[t], packed_w_hh_t, z)  # noqa: F821 - a global of each variant
        cell_forward(gates[t], z, c[t], h[t + 1], c[t + 1])  # noqa: F821


def _backward_steps(dy, gates, c, packed_w_hh, dz, dh_next, carry, row_sq, dh_norms, dc_norms):
    """All T steps backward in one compiled call. dh_next [B, ≥H] and carry [B, H]: the
    gradients reaching h_T, c_T on entry, h_0, c_0 on exit; writes dz [T, B, 4H] and
    the step norms [T]."""
    for t in range(dy.shape[0] - 1, -1, -1):
        dh_sq, dc_sq = cell_backward(  # noqa: F821
            dy[t], dh_next, carry, gates[t], c[t], c[t + 1], dz[t], row_sq
        )
        dh_norms[t] = np.sqrt(dh_sq)
        dc_norms[t] = np.sqrt(dc_sq)
        step_product(dz[t], packed_w_hh, dh_next)  # noqa: F821


def _inference_steps(x, first_row, end_row, packed_ih, bias, h, c, packed_hh, z, gates, rows_in):
    """All T steps of an inference forward for batch rows first_row:end_row (R rows)
    in one compiled call, the input projection a chunk of steps at a time just ahead
    of the steps that read it (``_cpu_common.project_chunk``). x [T, B, I]; packed_ih:
    W_ihᵀ packed; bias [≥ its packed width] (``_cpu_common.padded_bias``: -0.0 without
    one); h [T+1, B, H] with h[0] set; c [2, B, H] with c[0] set (c_t in c[t % 2]:
    inference returns only c_T); packed_hh: W_hhᵀ packed; z [≥R, ≥ its packed width],
    gates [chunk·R, ≥ W_ih's packed width] and rows_in [chunk·R, I] (or empty for the
    whole batch) scratch. Rows never
    interact, and every element comes from the same kernels as ``_steps``'s projection
    and loop, so the same bits as a training forward for any split of the batch."""
    steps = x.shape[0]
    count_rows = end_row - first_row
    chunk = gates.shape[0] // count_rows
    z = z[:count_rows]
    for first in range(0, steps, chunk):
        count = min(chunk, steps - first)
        project_chunk(x, first, count, first_row, end_row, packed_ih, bias, gates, rows_in)  # noqa: F821
        for s in range(count):
            t = first + s
            step_product(h[t, first_row:end_row], packed_hh, z)  # noqa: F821 - a global of each variant
            cell_forward(  # noqa: F821
                gates[s * count_rows : (s + 1) * count_rows], z, c[t % 2, first_row:end_row],
                h[t + 1, first_row:end_row], c[(t + 1) % 2, first_row:end_row],
            )


def _inference_split(x, w_ih, w_hh, packed_ih, bias, h, c, packed_hh, z, gates, rows_in, counters, bounds):
    """``_inference_steps`` on each block of batch rows (bounds [n+1]), one block per
    thread, after the threads packed W_ihᵀ and W_hhᵀ between them (packed_ih,
    packed_hh: empty on entry, ``_cpu_common.split_packing``; 8 MB at H = 512, 3.7 ms
    of NumPy packing before the region, serial, 4% of the two-thread call). z, gates,
    rows_in [n, ...]: each block's scratch. The work is a list of chunks, the packing
    chunks (``_cpu_common.PACK_CHUNK_PANELS`` panels of one matrix) and then one per
    row block, that the threads claim in order with ``_cpu_sync``'s counters; a row
    block waits until every packing chunk is done. The same argument as the persistent
    loops' (``_cpu_sync``'s docstring): a chunk waits only for chunks numbered below it,
    each held by a running thread, so no deadlock whatever the threading layer does (a
    layer that runs the iterations one after another runs every chunk on the first);
    the packers' stores are released by ``finish`` and acquired by ``wait`` before any
    product reads them. Which thread runs which block does not change a bit. A prange,
    not Python threads running the nogil serial loop side by side (which would compile
    nothing more): those lost to it, 1.0-1.8x at B = 8-16 paired with torch or with
    our persistent loop (quiet), whose OpenMP workers spin on the second core for a
    while after each call, where a sleeping Python thread had to be scheduled."""
    blocks = bounds.shape[0] - 1
    panels = _cpu_common.PACK_CHUNK_PANELS  # a compile-time constant
    ih_chunks = (packed_ih.shape[0] + panels - 1) // panels
    pack_chunks = ih_chunks + (packed_hh.shape[0] + panels - 1) // panels
    total = pack_chunks + blocks
    for _ in numba.prange(blocks):
        while True:
            index = _cpu_sync.claim(counters)
            if index >= total:
                break
            if index < pack_chunks:
                if index < ih_chunks:
                    matrix, packed, first = w_ih, packed_ih, index * panels
                else:
                    matrix, packed, first = w_hh, packed_hh, (index - ih_chunks) * panels
                pack_panels(matrix, packed, first, min(packed.shape[0], first + panels))  # noqa: F821
            else:
                _cpu_sync.wait(counters, pack_chunks)  # both weights are packed
                block = index - pack_chunks
                inference_steps(  # noqa: F821 - a global of this function
                    x, bounds[block], bounds[block + 1], packed_ih, bias, h, c, packed_hh, z[block], gates[block],
                    rows_in[block],
                )
            _cpu_sync.finish(counters)


def _forward_rows(state, z, t, first, end):
    """Step t's cell over rows first:end, for the persistent loop (state: gates, h, c)."""
    gates, h, c = state
    cell_forward(  # noqa: F821 - the serial variant's, a global of the persistent variant
        gates[t, first:end], z[first:end], c[t, first:end], h[t + 1, first:end], c[t + 1, first:end]
    )


def _backward_rows(state, dh_next, t, first, end):
    """Step t's cell backward over rows first:end, for the persistent loop (state: dy,
    gates, c, dz, carry, row_sq [T, B, 2]; the step norms are summed after the loop)."""
    dy, gates, c, dz, carry, row_sq = state
    cell_backward(  # noqa: F821
        dy[t, first:end], dh_next[first:end], carry[first:end], gates[t, first:end], c[t, first:end],
        c[t + 1, first:end], dz[t, first:end], row_sq[t, first:end],
    )


# The serial and the persistent variant (rnnkernels/_cpu_common.py: how each is compiled
# and cached, and the rule that picks one).
_SERIAL = _cpu_common.compile_variant(
    "serial",
    cells={"cell_forward": _cell_forward, "cell_backward": _cell_backward},
    loops={"forward_steps": _forward_steps, "backward_steps": _backward_steps},
)
_PERSISTENT = _cpu_common.compile_persistent(
    "persistent", _SERIAL, rows={"forward_rows": _forward_rows, "backward_rows": _backward_rows}
)


# The inference loop (``_cpu_common.compile_inference``): the serial variant's cell.
_INFERENCE_STEPS = _cpu_common.compile_inference("serial", _SERIAL, _inference_steps)
_INFERENCE_SPLIT = _cpu_common.compile_function(
    _inference_split, "parallel", True,
    {"inference_steps": _INFERENCE_STEPS, "pack_panels": _cpu_common.PACK_PANELS},
)


def compiled_functions():
    """The dispatchers by name (``forward_steps_serial`` ...): for tests and profiling,
    e.g. ``dispatcher.stats.cache_hits``."""
    return _cpu_common.compiled_functions({"serial": _SERIAL, "persistent": _PERSISTENT})


def forward(x, w_ih, w_hh, bias, h0, c0, training=True):
    steps = x.shape[0]
    blocks = 0
    # Not for a bias of another dtype (NumPy adds that one after the product, as
    # ``_cpu_common.project`` does) nor an empty batch.
    if not training and steps > 1 and x.shape[1] > 0 and (bias is None or bias.dtype == x.dtype):
        blocks = _cpu_common.inference_blocks(x.shape[1], w_hh.shape[1], 4, x.dtype)
    if blocks:
        h, c_n = _inference(x, w_ih, w_hh, bias, h0, c0, blocks)
        return h[1:], h[steps].copy(), c_n, None
    if steps == 1:
        h, c, gates = _single_step(x, w_ih, w_hh, bias, h0, c0)
    else:
        h, c, gates = _steps(x, w_ih, w_hh, bias, h0, c0)
    if not training:
        return h[1:], h[steps].copy(), c[steps].copy(), None
    saved = Saved(x, w_ih, w_hh, bias is not None, gates, h, c)
    # y is a copy so that a caller writing into it cannot corrupt the saved states.
    return h[1:].copy(), h[steps].copy(), c[steps].copy(), saved


def _single_step(x, w_ih, w_hh, bias, h0, c0):
    """(h, c, gates) of a one-step forward (T = 1: token-by-token decoding). Packing the
    weights copies all 4H·(I + H) of them to multiply each by B rows once, which costs
    more than the step itself at small B (3x torch's step at B = 1, H = 256): here the
    two products are plain BLAS calls (a matrix-vector product at B = 1), then the
    forward loop's fused cell. Always this path for T = 1, so same inputs, same bits."""
    _, batch, _ = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    gates = np.dot(x[0], w_ih.T).reshape(1, batch, 4 * hidden)
    if bias is not None:
        gates += bias
    z = np.dot(h0, w_hh.T)
    h = np.empty((2, batch, hidden), dtype)
    c = np.empty((2, batch, hidden), dtype)
    h[0], c[0] = h0, c0
    cell_step(gates[0], z, c[0], h[1], c[1])
    return h, c, gates


def _steps(x, w_ih, w_hh, bias, h0, c0):
    """(h, c, gates) of a forward over T > 1 steps: the packed kernel and one compiled
    time loop (the module docstring)."""
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    loop = _cpu_common.time_loop(batch, hidden, 4, dtype)

    # The input projection of every step; each step's cell overwrites its slice with
    # the activated gates, so this one buffer is also what backward reads. It goes
    # through the packed kernel rather than NumPy's BLAS (on par with OpenBLAS here at
    # one thread) so that forward runs on one thread pool, Numba's: OpenBLAS's workers
    # would spin on the cores the time loop's threads need (see the threading policy).
    # The bias is added by the kernel as it stores each tile (no pass of its own).
    gates = _cpu_common.project(x.reshape(steps * batch, input_size), _cpu_gemm.pack(w_ih.T), 4 * hidden, bias)
    gates = gates.reshape(steps, batch, 4 * hidden)
    h = np.empty((steps + 1, batch, hidden), dtype)
    c = np.empty((steps + 1, batch, hidden), dtype)
    h[0], c[0] = h0, c0
    # W_hhᵀ packed once per call; z has the packed width (4H rounded up to a panel).
    packed = _cpu_gemm.pack(w_hh.T)
    z = np.empty((batch, packed.shape[0] * packed.shape[2]), dtype)
    if loop == "persistent":
        _PERSISTENT.forward_steps(h, packed, z, (gates, h, c), *_cpu_common.persistent_arguments(batch, packed))
    else:
        _SERIAL.forward_steps(gates, h, c, packed, z)
    return h, c, gates


def _inference(x, w_ih, w_hh, bias, h0, c0, blocks):
    """(h [T+1, B, H], c_T) of an inference forward in ``blocks`` row blocks
    (``_cpu_common.inference_blocks``): ``_inference_steps``, on one thread per block
    where there are two or more (``_inference_split``)."""
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    x = np.ascontiguousarray(x)
    if blocks > 1:  # the split's threads pack the weights (``_inference_split``)
        w_ih, w_hh, packed_ih, packed_hh, counters = _cpu_common.split_packing(w_ih, w_hh)
    else:
        packed_ih = _cpu_gemm.pack(w_ih.T)
        packed_hh = _cpu_gemm.pack(w_hh.T)
    bias = _cpu_common.padded_bias(bias, packed_ih, 4 * hidden, dtype)
    h = np.empty((steps + 1, batch, hidden), dtype)
    c = np.empty((2, batch, hidden), dtype)
    h[0], c[0] = h0, c0
    bounds, z, gates, rows_in = _cpu_common.inference_scratch(blocks, x, packed_ih, packed_hh)
    if blocks > 1:
        _INFERENCE_SPLIT(x, w_ih, w_hh, packed_ih, bias, h, c, packed_hh, z, gates, rows_in, counters, bounds)
    else:
        _INFERENCE_STEPS(x, 0, batch, packed_ih, bias, h, c, packed_hh, z[0], gates[0], rows_in[0])
    return h, c[steps % 2].copy()


def cell_step(gates, z, c_prev, h_out, c_out):
    """The forward loop's fused cell for one step (serial variant), for callers that
    make the two products themselves: rnnkernels.torch's decode step (T=1, a state,
    no gradients), where packing W_hh as :func:`forward` does on every call would cost
    more than the step. ``gates`` [B, 4H]: x W_ihᵀ + b on entry, activated i, f, g, o
    on exit; ``z`` [B, 4H] = h_{t-1} W_hhᵀ; c_prev, h_out, c_out [B, H]; C-contiguous,
    one dtype (float32 or float64)."""
    _SERIAL.cell_forward(gates, z, c_prev, h_out, c_out)


def backward(saved: Saved, dy, dh_n, dc_n, return_step_norms=False):
    x, w_ih, w_hh = saved.x, saved.w_ih, saved.w_hh
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    loop = _cpu_common.time_loop(batch, hidden, 4, dtype)

    dz = np.empty((steps, batch, 4 * hidden), dtype)
    packed = _cpu_gemm.pack(w_hh)
    # dh_next has the packed width (H rounded up to a panel); its first H columns count.
    dh_next = np.zeros((batch, packed.shape[0] * packed.shape[2]), dtype)
    dh_next[:, :hidden] = dh_n
    carry = np.array(dc_n, dtype=dtype, order="C")
    dh_norms = np.empty(steps)
    dc_norms = np.empty(steps)
    dy = np.ascontiguousarray(dy)
    if loop == "persistent":
        row_sq = np.empty((steps, batch, 2))  # per step: summed after the loop
        state = (dy, saved.gates, saved.c, dz, carry, row_sq)
        _PERSISTENT.backward_steps(dz, packed, dh_next, state, *_cpu_common.persistent_arguments(batch, packed))
        _cpu_common.STEP_NORMS(row_sq, dh_norms, dc_norms)
    else:
        row_sq = np.empty((batch, 2))
        _SERIAL.backward_steps(
            dy, saved.gates, saved.c, packed, dz, dh_next, carry, row_sq, dh_norms, dc_norms
        )
    dh_next = np.ascontiguousarray(dh_next[:, :hidden])

    flat_dz = dz.reshape(steps * batch, 4 * hidden)
    # dW_ih, dW_hh and dx on one thread team (the threading policy above).
    dw_ih, dw_hh, dx = _cpu_blas.backward_products(
        flat_dz, x.reshape(steps * batch, input_size), flat_dz, saved.h[:-1].reshape(steps * batch, hidden), w_ih
    )
    dx = dx.reshape(steps, batch, input_size)
    db = flat_dz.sum(axis=0) if saved.has_bias else None
    grads = (dx, dw_ih, dw_hh, db, dh_next, carry)
    return grads + (dh_norms, dc_norms) if return_step_norms else grads


BACKEND = Backend(
    name="cpu",
    device="cpu",
    compute_dtypes=("float32", "float64"),
    forward=_cpu_threading.one_launch_at_a_time(forward),
    backward=_cpu_threading.one_launch_at_a_time(backward),
    check_available=_cpu_common.check_jit,
    # reference.Saved in the input dtype (the saved state as arrays, for torch's ops).
    saved_arrays=saved_arrays(lambda dtype: dtype),
)
