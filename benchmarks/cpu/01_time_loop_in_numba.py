"""Experiment 01: the whole LSTM time loop in one Numba call, against the Python loop.

    python benchmarks/cpu/01_time_loop_in_numba.py            # 1 thread, then 2 threads
    python benchmarks/cpu/01_time_loop_in_numba.py --threads 1 --repeats 9

The current cpu backend (``rnnkernels/cpu.py``) runs the time loop in Python: per step
one ``np.matmul`` (OpenBLAS) for h_{t-1} W_hhᵀ and one Numba call for the cell. At
small B·H both calls cost more in overhead (call, unboxing, BLAS thread sync) than in
arithmetic. The candidate here runs all T steps in one Numba call per direction:

* batch rows never interact within a layer, so the rows are split into a few groups
  (one per thread, ``prange``) of whole 4-row chunks, and each group runs all T steps
  on its own rows, with no synchronization between steps;
* the recurrent product is a register-blocked dot-product kernel: 4 rows × 2 outputs =
  8 running sums over k, so each loaded weight element serves 4 FMAs and each loaded
  h element 2; LLVM vectorizes the k loop (8 float32 per AVX2 register) with the
  sums kept in registers, and reduces them horizontally at the end;
* the last chunk of a batch that is not a multiple of 4 repeats its last row in the
  missing slots (reads only; the duplicate writes store the same value), so every row
  goes through the same arithmetic whatever B and the thread count are: the results
  do not depend on the number of threads;
* backward: per group, the reversed time loop computes dz_t and the step's norm sums
  for its rows, then dh_{t-1} = dz_t W_hh with the same 4×2 kernel over W_hhᵀ rows.
  The big GEMMs after the loop (dx, dW_ih, dW_hh, db) stay in NumPy's BLAS.

Result (2-core AMD EPYC, AVX2; numba 0.68, OpenBLAS, torch CPU; 1-minute load average
1.9-3.1 during the run, another job was using the machine, so treat single rows as
+-20%). Not adopted: the one-call loop wins where the Python loop's per-step overhead
dominates (512,4,64,64: 1.4-1.9x; 1024,8,128,128: 1.15-1.3x, training about even at 2
threads), but it is even to 1.2x slower at 128,16,256,256 (the size of the project's
paired-ratio goal) and 1.3-1.7x slower at 128,64,512,512, where OpenBLAS's packed GEMM
beats these loops. A port would need a size rule and would not move the headline ratio.
What limits the candidates (measured inside the file's kernels):
* "dot" (4 rows x 2 outputs, k loop vectorized, 8 sums in registers) runs ~4.4 FMA per
  cycle of the 16 an AVX2 core can issue: for H=128 each call has only 16 vector
  iterations, so the FMA latency chains, the 8 horizontal sums and the index set-up
  cost as much as the products;
* "axpy" (one row, four weight rows per pass) vectorizes but streams all of W_hhᵀ
  from L2 per batch row (~24 B/cycle, L2-bound); the two-row version that would halve
  that traffic (two z rows, or two rows of one flat slice, in one inner loop) was left
  scalar by LLVM (alias checks), which is why the kept version calls the one-row
  kernel twice.
Run time of this file: about 4 minutes under that load.

Every candidate is validated against ``rnnkernels.reference`` (float32 rel. err. < 2e-5,
float64 < 1e-9) at every size before timing. Timing: forward (training=False), forward
(training=True) and forward+backward, candidate, current ``rnnkernels.cpu`` and
torch.nn.LSTM, interleaved in one process (the order rotates per repeat), medians.
Each thread count runs in a fresh interpreter with OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS
set, since BLAS pools size themselves at import.

    median ms (paired ratio to the current cpu backend in brackets); float32; load = 1-minute load average at the end of the row
    thr          T,B,I,H mode                    numba-dot          numba-axpy       cpu (current)               torch  load
      1   128,16,256,256 inference          47.80 ( 0.93)      71.97 ( 1.44)      50.87 ( 1.00)      37.52 ( 0.75)  2.91
      1   128,16,256,256 forward-train      41.60 ( 0.88)      66.83 ( 1.32)      50.77 ( 1.00)      41.46 ( 0.84)  2.91
      1   128,16,256,256 training          128.20 ( 1.12)     171.24 ( 1.45)     126.20 ( 1.00)     112.17 ( 0.87)  2.84
      1   1024,8,128,128 inference          73.73 ( 0.77)      81.47 ( 0.94)      98.98 ( 1.00)      72.53 ( 0.82)  2.85
      1   1024,8,128,128 forward-train      82.15 ( 0.86)     114.79 ( 1.22)      95.81 ( 1.00)      63.09 ( 0.68)  2.86
      1   1024,8,128,128 training          196.15 ( 0.77)     271.83 ( 1.10)     243.72 ( 1.00)     216.84 ( 0.78)  2.86
      1      512,4,64,64 inference          12.00 ( 0.63)      10.39 ( 0.59)      19.93 ( 1.00)       9.41 ( 0.46)  2.87
      1      512,4,64,64 forward-train      15.24 ( 0.69)      10.30 ( 0.53)      19.89 ( 1.00)      10.59 ( 0.55)  2.87
      1      512,4,64,64 training           20.72 ( 0.60)      25.62 ( 0.58)      40.51 ( 1.00)      25.33 ( 0.63)  2.87
      1   128,64,512,512 inference        1480.84 ( 1.74)    1086.20 ( 1.67)     651.35 ( 1.00)     751.15 ( 0.96)  3.09
      1   128,64,512,512 forward-train     942.66 ( 1.47)     981.34 ( 1.60)     614.52 ( 1.00)     656.79 ( 1.04)  2.92
      1   128,64,512,512 training         2305.79 ( 1.39)    2353.05 ( 1.44)    1661.03 ( 1.00)    1671.31 ( 1.01)  2.48
      2   128,16,256,256 inference          44.41 ( 1.00)      59.97 ( 1.37)      44.61 ( 1.00)     126.60 ( 1.96)  1.94
      2   128,16,256,256 forward-train      47.31 ( 1.06)      66.24 ( 1.48)      44.22 ( 1.00)      89.82 ( 1.83)  1.94
      2   128,16,256,256 training          120.23 ( 1.20)     146.50 ( 1.61)      81.20 ( 1.00)     157.80 ( 1.93)  1.87
      2   1024,8,128,128 inference          68.61 ( 0.87)      63.86 ( 0.79)      80.33 ( 1.00)     125.77 ( 1.66)  1.88
      2   1024,8,128,128 forward-train      63.00 ( 0.78)      75.44 ( 0.98)      78.71 ( 1.00)     112.58 ( 1.46)  1.88
      2   1024,8,128,128 training          119.40 ( 1.00)     138.53 ( 0.98)     141.09 ( 1.00)     215.91 ( 1.63)  1.97
      2      512,4,64,64 inference           6.33 ( 0.53)       9.40 ( 0.61)      11.72 ( 1.00)       8.22 ( 0.69)  1.97
      2      512,4,64,64 forward-train       9.20 ( 0.74)       8.18 ( 0.68)      12.22 ( 1.00)      11.29 ( 0.92)  1.97
      2      512,4,64,64 training           13.90 ( 0.73)      21.06 ( 1.10)      18.31 ( 1.00)      91.82 ( 4.38)  1.97
      2   128,64,512,512 inference         448.75 ( 1.29)     522.15 ( 1.70)     343.60 ( 1.00)     347.92 ( 1.09)  2.05
      2   128,64,512,512 forward-train     571.40 ( 1.39)     601.48 ( 1.55)     390.26 ( 1.00)     410.72 ( 1.01)  2.13
      2   128,64,512,512 training         1450.77 ( 1.53)    1320.58 ( 1.32)    1008.35 ( 1.00)    1059.37 ( 1.09)  2.10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rnnkernels.bench.cli import thread_environment  # noqa: E402

SIZES = [(128, 16, 256, 256), (1024, 8, 128, 128), (512, 4, 64, 64), (128, 64, 512, 512)]
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-9}
ROWS = 4  # rows per chunk of the recurrent product


# --- candidate: the time loop in Numba ---------------------------------------------------

def _make_kernels():
    import numba

    from rnnkernels import _fastmath

    kernel = dict(nogil=True, error_model="numpy",  # no cache: this file runs as __main__ and by path
                  # reassoc: the k loop's running sums vectorize (8 partial sums each)
                  fastmath={"contract", "reassoc"})

    @numba.njit(**kernel)
    def dot_4x2(a0, a1, a2, a3, w0, w1):
        """The 8 dot products of rows a0..a3 with rows w0, w1 (all length K)."""
        zero = w0.dtype.type(0)
        s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = zero
        for k in range(w0.shape[0]):
            x0, x1 = w0[k], w1[k]
            y = a0[k]
            s00 += y * x0
            s01 += y * x1
            y = a1[k]
            s10 += y * x0
            s11 += y * x1
            y = a2[k]
            s20 += y * x0
            s21 += y * x1
            y = a3[k]
            s30 += y * x0
            s31 += y * x1
        return s00, s01, s10, s11, s20, s21, s30, s31

    def make(sigmoid, tanh):
        jit = numba.njit(parallel=True, **kernel)

        @jit
        def forward_loop(gates, w_hh, h, c, groups):
            """All T steps. gates [T, B, 4H]: on entry x W_ihᵀ + b, on exit the
            activated i, f, g, o; w_hh [4H, H]; h, c [T+1, B, H] with h[0], c[0] set."""
            steps, batch, width = gates.shape
            hidden = width // 4
            chunks = (batch + ROWS - 1) // ROWS
            last = batch - 1
            for group in numba.prange(groups):
                chunk_lo = group * chunks // groups
                chunk_hi = (group + 1) * chunks // groups
                row_lo, row_hi = chunk_lo * ROWS, min(chunk_hi * ROWS, batch)
                for t in range(steps):
                    h_prev, z = h[t], gates[t]
                    # z += h_{t-1} W_hhᵀ, two gate columns at a time over the group
                    for j in range(0, width, 2):
                        w0, w1 = w_hh[j], w_hh[j + 1]
                        for chunk in range(chunk_lo, chunk_hi):
                            b0 = chunk * ROWS
                            b1, b2, b3 = min(b0 + 1, last), min(b0 + 2, last), min(b0 + 3, last)
                            s00, s01, s10, s11, s20, s21, s30, s31 = dot_4x2(
                                h_prev[b0], h_prev[b1], h_prev[b2], h_prev[b3], w0, w1)
                            # read all, then write: b1..b3 may repeat the last row
                            v00, v01 = z[b0, j] + s00, z[b0, j + 1] + s01
                            v10, v11 = z[b1, j] + s10, z[b1, j + 1] + s11
                            v20, v21 = z[b2, j] + s20, z[b2, j + 1] + s21
                            v30, v31 = z[b3, j] + s30, z[b3, j + 1] + s31
                            z[b0, j], z[b0, j + 1] = v00, v01
                            z[b1, j], z[b1, j + 1] = v10, v11
                            z[b2, j], z[b2, j + 1] = v20, v21
                            z[b3, j], z[b3, j + 1] = v30, v31
                    c_prev, h_out, c_out = c[t], h[t + 1], c[t + 1]
                    for b in range(row_lo, row_hi):
                        act = z[b]
                        for j in range(2 * hidden):  # i, f
                            act[j] = sigmoid(act[j])
                        for j in range(2 * hidden, 3 * hidden):  # g
                            act[j] = tanh(act[j])
                        for j in range(3 * hidden, 4 * hidden):  # o
                            act[j] = sigmoid(act[j])
                        c_in, c_row, h_row = c_prev[b], c_out[b], h_out[b]
                        for j in range(hidden):
                            cell = act[hidden + j] * c_in[j] + act[j] * act[2 * hidden + j]
                            c_row[j] = cell
                            h_row[j] = act[3 * hidden + j] * tanh(cell)

        @jit
        def backward_loop(dy, gates, c, w_hh_t, dz, dh_next, carry, norms, groups):
            """All T steps backward. dy [T, B, H]; gates [T, B, 4H] activated;
            c [T+1, B, H]; w_hh_t [H, 4H] = W_hhᵀ contiguous; writes dz [T, B, 4H];
            dh_next, carry [B, H]: dh_n, dc_n on entry, dh0, dc0 on exit;
            norms [chunks, T, 2]: the chunk's Σ dh_t², Σ dc_t² per step (zeroed)."""
            steps, batch, hidden = dy.shape
            chunks = (batch + ROWS - 1) // ROWS
            last = batch - 1
            one = dz.dtype.type(1)
            for group in numba.prange(groups):
                chunk_lo = group * chunks // groups
                chunk_hi = (group + 1) * chunks // groups
                for t in range(steps - 1, -1, -1):
                    act_t, grad_t, dy_t = gates[t], dz[t], dy[t]
                    c_in_t, c_cur_t = c[t], c[t + 1]
                    for chunk in range(chunk_lo, chunk_hi):
                        dh_sq = 0.0
                        dc_sq = 0.0
                        for b in range(chunk * ROWS, min(chunk * ROWS + ROWS, batch)):
                            act, grad, dc_row = act_t[b], grad_t[b], carry[b]
                            dy_row, dh_row, c_row = dy_t[b], dh_next[b], c_cur_t[b]
                            for j in range(hidden):  # dz^o, and dc_t into the carry row
                                o = act[3 * hidden + j]
                                tanh_c = tanh(c_row[j])
                                dh = dy_row[j] + dh_row[j]
                                dc = dc_row[j] + dh * o * (one - tanh_c * tanh_c)
                                grad[3 * hidden + j] = dh * tanh_c * o * (one - o)
                                dc_row[j] = dc
                                dh_sq += dh * dh
                                dc_sq += dc * dc
                            c_in = c_in_t[b]
                            for j in range(hidden):  # dz^i, dz^f, dz^g, carry to c_{t-1}
                                i, f, g = act[j], act[hidden + j], act[2 * hidden + j]
                                dc = dc_row[j]
                                grad[j] = dc * g * i * (one - i)
                                grad[hidden + j] = dc * c_in[j] * f * (one - f)
                                grad[2 * hidden + j] = dc * i * (one - g * g)
                                dc_row[j] = dc * f
                        norms[chunk, t, 0] = dh_sq
                        norms[chunk, t, 1] = dc_sq
                    # dh_{t-1} = dz_t W_hh, two hidden units at a time (the last pair
                    # repeats unit H-1 when H is odd: same value written twice)
                    for k in range(0, hidden, 2):
                        k1 = min(k + 1, hidden - 1)
                        w0, w1 = w_hh_t[k], w_hh_t[k1]
                        for chunk in range(chunk_lo, chunk_hi):
                            b0 = chunk * ROWS
                            b1, b2, b3 = min(b0 + 1, last), min(b0 + 2, last), min(b0 + 3, last)
                            s00, s01, s10, s11, s20, s21, s30, s31 = dot_4x2(
                                grad_t[b0], grad_t[b1], grad_t[b2], grad_t[b3], w0, w1)
                            dh_next[b0, k], dh_next[b0, k1] = s00, s01
                            dh_next[b1, k], dh_next[b1, k1] = s10, s11
                            dh_next[b2, k], dh_next[b2, k1] = s20, s21
                            dh_next[b3, k], dh_next[b3, k1] = s30, s31

        return forward_loop, backward_loop

    # Candidate 2, "axpy": no horizontal sums. z[b, :] += Σ_k h[b, k] W_hhᵀ[k, :] is
    # accumulated along the rows of W_hhᵀ [H, 4H], four k at a time (one load and one
    # store of z per four FMAs) for two batch rows at a time (each loaded weight
    # serves two FMAs). The inner loop touches z, one 2D weight array and nothing
    # else, so LLVM's alias checks stay few and it vectorizes. "contract" only: every
    # element is the same fixed chain of FMAs, so the one-row and two-row versions
    # give the same bits and results do not depend on how rows are grouped.
    axpy = dict(nogil=True, error_model="numpy", fastmath={"contract"})

    @numba.njit(**axpy)
    def add_row_times_matrix(z, a, w):
        """z += a w; a [K], w [K, N], z [N]. Four weight rows as 1D views: the inner
        loop reads five arrays and writes one (four alias checks; two output rows in
        one loop made nine, and LLVM left it scalar)."""
        depth, width = w.shape
        head = depth - depth % 4
        for k in range(0, head, 4):
            p0, p1, p2, p3 = a[k], a[k + 1], a[k + 2], a[k + 3]
            w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
            for j in range(width):
                z[j] = z[j] + p0 * w0[j] + p1 * w1[j] + p2 * w2[j] + p3 * w3[j]
        for k in range(head, depth):
            p0, w0 = a[k], w[k]
            for j in range(width):
                z[j] = z[j] + p0 * w0[j]

    def add_rows_times_matrix_2(z0, z1, a0, a1, w):
        add_row_times_matrix(z0, a0, w)
        add_row_times_matrix(z1, a1, w)

    add_rows_times_matrix_2 = numba.njit(**axpy)(add_rows_times_matrix_2)

    def make_axpy(sigmoid, tanh):
        jit = numba.njit(parallel=True, **kernel)

        @jit
        def forward_loop(gates, w_hh_t, h, c, groups):
            """As candidate 1, but w_hh_t [H, 4H] = W_hhᵀ contiguous."""
            steps, batch, width = gates.shape
            hidden = width // 4
            pairs = (batch + 1) // 2
            for group in numba.prange(groups):
                row_lo = 2 * (group * pairs // groups)
                row_hi = min(2 * ((group + 1) * pairs // groups), batch)
                for t in range(steps):
                    h_prev, z = h[t], gates[t]
                    c_prev, h_out, c_out = c[t], h[t + 1], c[t + 1]
                    for b0 in range(row_lo, row_hi, 2):
                        if b0 + 1 < row_hi:
                            add_rows_times_matrix_2(z[b0], z[b0 + 1], h_prev[b0],
                                                    h_prev[b0 + 1], w_hh_t)
                        else:
                            add_row_times_matrix(z[b0], h_prev[b0], w_hh_t)
                        for b in range(b0, min(b0 + 2, row_hi)):
                            act = z[b]
                            for j in range(2 * hidden):  # i, f
                                act[j] = sigmoid(act[j])
                            for j in range(2 * hidden, 3 * hidden):  # g
                                act[j] = tanh(act[j])
                            for j in range(3 * hidden, 4 * hidden):  # o
                                act[j] = sigmoid(act[j])
                            c_in, c_row, h_row = c_prev[b], c_out[b], h_out[b]
                            for j in range(hidden):
                                cell = act[hidden + j] * c_in[j] + act[j] * act[2 * hidden + j]
                                c_row[j] = cell
                                h_row[j] = act[3 * hidden + j] * tanh(cell)

        @jit
        def backward_loop(dy, gates, c, w_hh, dz, dh_next, carry, norms, groups):
            """As candidate 1, but w_hh [4H, H] as given; norms [B, T, 2] per row."""
            steps, batch, hidden = dy.shape
            one = dz.dtype.type(1)
            zero = dz.dtype.type(0)
            pairs = (batch + 1) // 2
            for group in numba.prange(groups):
                row_lo = 2 * (group * pairs // groups)
                row_hi = min(2 * ((group + 1) * pairs // groups), batch)
                for t in range(steps - 1, -1, -1):
                    act_t, grad_t, dy_t = gates[t], dz[t], dy[t]
                    c_in_t, c_cur_t = c[t], c[t + 1]
                    for b in range(row_lo, row_hi):
                        dh_sq = 0.0
                        dc_sq = 0.0
                        act, grad, dc_row = act_t[b], grad_t[b], carry[b]
                        dy_row, dh_row, c_row = dy_t[b], dh_next[b], c_cur_t[b]
                        for j in range(hidden):  # dz^o, and dc_t into the carry row
                            o = act[3 * hidden + j]
                            tanh_c = tanh(c_row[j])
                            dh = dy_row[j] + dh_row[j]
                            dc = dc_row[j] + dh * o * (one - tanh_c * tanh_c)
                            grad[3 * hidden + j] = dh * tanh_c * o * (one - o)
                            dc_row[j] = dc
                            dh_sq += dh * dh
                            dc_sq += dc * dc
                        c_in = c_in_t[b]
                        for j in range(hidden):  # dz^i, dz^f, dz^g, carry to c_{t-1}
                            i, f, g = act[j], act[hidden + j], act[2 * hidden + j]
                            dc = dc_row[j]
                            grad[j] = dc * g * i * (one - i)
                            grad[hidden + j] = dc * c_in[j] * f * (one - f)
                            grad[2 * hidden + j] = dc * i * (one - g * g)
                            dc_row[j] = dc * f
                        norms[b, t, 0] = dh_sq
                        norms[b, t, 1] = dc_sq
                        for j in range(hidden):
                            dh_row[j] = zero
                    for b0 in range(row_lo, row_hi, 2):  # dh_{t-1} = dz_t W_hh
                        if b0 + 1 < row_hi:
                            add_rows_times_matrix_2(dh_next[b0], dh_next[b0 + 1], grad_t[b0],
                                                    grad_t[b0 + 1], w_hh)
                        else:
                            add_row_times_matrix(dh_next[b0], grad_t[b0], w_hh)

        return forward_loop, backward_loop

    kernels_axpy = {
        np.dtype(np.float32): make_axpy(_fastmath.sigmoid32, _fastmath.tanh32),
        np.dtype(np.float64): make_axpy(_fastmath.sigmoid64, _fastmath.tanh64),
    }

    kernels_dot = {
        np.dtype(np.float32): make(_fastmath.sigmoid32, _fastmath.tanh32),
        np.dtype(np.float64): make(_fastmath.sigmoid64, _fastmath.tanh64),
    }
    return {"dot": kernels_dot, "axpy": kernels_axpy}


_KERNELS = None


def _kernels(kind, dtype):
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _make_kernels()
    return _KERNELS[kind][np.dtype(dtype)]


def _groups(units):
    import numba

    return max(1, min(numba.get_num_threads(), units))


def make_candidate(kind):
    from rnnkernels.reference import Saved

    def forward(x, w_ih, w_hh, bias, h0, c0, training=True):
        steps, batch, input_size = x.shape
        hidden = w_hh.shape[1]
        dtype = x.dtype
        gates = (x.reshape(steps * batch, input_size) @ w_ih.T).reshape(steps, batch, 4 * hidden)
        if bias is not None:
            gates += bias
        h = np.empty((steps + 1, batch, hidden), dtype)
        c = np.empty((steps + 1, batch, hidden), dtype)
        h[0], c[0] = h0, c0
        forward_loop, _ = _kernels(kind, dtype)
        if kind == "dot":
            forward_loop(gates, np.ascontiguousarray(w_hh), h, c, _groups(-(-batch // ROWS)))
        else:
            forward_loop(gates, np.ascontiguousarray(w_hh.T), h, c, _groups(-(-batch // 2)))
        if not training:
            return h[1:], h[steps].copy(), c[steps].copy(), None
        saved = Saved(x, w_ih, w_hh, bias is not None, gates, h, c)
        return h[1:].copy(), h[steps].copy(), c[steps].copy(), saved

    def backward(saved, dy, dh_n, dc_n, return_step_norms=False):
        x, w_ih, w_hh = saved.x, saved.w_ih, saved.w_hh
        steps, batch, input_size = x.shape
        hidden = w_hh.shape[1]
        dtype = x.dtype
        dz = np.empty((steps, batch, 4 * hidden), dtype)
        dh_next = np.array(dh_n, dtype=dtype, order="C")
        carry = np.array(dc_n, dtype=dtype, order="C")
        _, backward_loop = _kernels(kind, dtype)
        if kind == "dot":
            norms = np.zeros((-(-batch // ROWS), steps, 2))
            backward_loop(np.ascontiguousarray(dy), saved.gates, saved.c,
                          np.ascontiguousarray(w_hh.T), dz, dh_next, carry, norms,
                          _groups(-(-batch // ROWS)))
        else:
            norms = np.zeros((batch, steps, 2))
            backward_loop(np.ascontiguousarray(dy), saved.gates, saved.c,
                          np.ascontiguousarray(w_hh), dz, dh_next, carry, norms,
                          _groups(-(-batch // 2)))
        flat_dz = dz.reshape(steps * batch, 4 * hidden)
        dx = (flat_dz @ w_ih).reshape(steps, batch, input_size)
        dw_ih = flat_dz.T @ x.reshape(steps * batch, input_size)
        dw_hh = flat_dz.T @ saved.h[:-1].reshape(steps * batch, hidden)
        db = flat_dz.sum(axis=0) if saved.has_bias else None
        grads = (dx, dw_ih, dw_hh, db, dh_next, carry)
        if not return_step_norms:
            return grads
        sums = norms.sum(axis=0)
        return grads + (np.sqrt(sums[:, 0]), np.sqrt(sums[:, 1]))

    return forward, backward


CANDIDATES = {"numba-dot": make_candidate("dot"), "numba-axpy": make_candidate("axpy")}


# --- problems, validation ----------------------------------------------------------------

def make_problem(steps, batch, input_size, hidden, dtype, seed=0):
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(hidden)
    u = lambda *shape: rng.uniform(-bound, bound, shape).astype(dtype)  # noqa: E731
    return {
        "x": rng.standard_normal((steps, batch, input_size)).astype(dtype),
        "w_ih": u(4 * hidden, input_size), "w_hh": u(4 * hidden, hidden),
        "bias": u(4 * hidden) + u(4 * hidden),
        "h0": (0.5 * rng.standard_normal((batch, hidden))).astype(dtype),
        "c0": (0.5 * rng.standard_normal((batch, hidden))).astype(dtype),
        "dy": rng.standard_normal((steps, batch, hidden)).astype(dtype),
        "dh_n": rng.standard_normal((batch, hidden)).astype(dtype),
        "dc_n": rng.standard_normal((batch, hidden)).astype(dtype),
    }


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def run_all(forward, backward, p):
    y, h_n, c_n, saved = forward(p["x"], p["w_ih"], p["w_hh"], p["bias"], p["h0"], p["c0"],
                                 training=True)
    grads = backward(saved, p["dy"], p["dh_n"], p["dc_n"], return_step_norms=True)
    names = ("dx", "dw_ih", "dw_hh", "db", "dh0", "dc0", "dh_norms", "dc_norms")
    return {"y": y, "h_n": h_n, "c_n": c_n, **dict(zip(names, grads))}


def validate(name, forward, backward, p, want, dtype):
    got = run_all(forward, backward, p)
    errors = {k: _rel(got[k], want[k]) for k in want}
    y_inference = forward(p["x"], p["w_ih"], p["w_hh"], p["bias"], p["h0"], p["c0"],
                          training=False)[0]
    errors["y (inference)"] = _rel(y_inference, want["y"])
    worst = max(errors, key=errors.get)
    if errors[worst] >= TOLERANCE[dtype]:
        raise SystemExit(f"{name} fails validation: {worst} rel. err. {errors[worst]:.2e}")
    return errors[worst]


# --- timing ------------------------------------------------------------------------------

def torch_calls(p):
    import torch

    steps, batch, input_size = p["x"].shape
    hidden = p["w_hh"].shape[1]
    lstm = torch.nn.LSTM(input_size, hidden)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(p["w_ih"]))
        lstm.weight_hh_l0.copy_(torch.from_numpy(p["w_hh"]))
        lstm.bias_ih_l0.copy_(torch.from_numpy(p["bias"]))
        lstm.bias_hh_l0.zero_()
    x = torch.from_numpy(p["x"])
    x_grad = x.clone().requires_grad_(True)
    h0, c0 = torch.from_numpy(p["h0"])[None], torch.from_numpy(p["c0"])[None]
    dy = torch.from_numpy(p["dy"])
    params = list(lstm.parameters())

    def inference():
        with torch.no_grad():
            return lstm(x, (h0, c0))

    def forward_training():
        return lstm(x_grad, (h0, c0))

    def training():
        y, _ = lstm(x_grad, (h0, c0))
        return torch.autograd.grad(y, [x_grad, *params], grad_outputs=dy)

    return {"inference": inference, "forward-train": forward_training, "training": training}


def ours_calls(forward, backward, p):
    args = (p["x"], p["w_ih"], p["w_hh"], p["bias"], p["h0"], p["c0"])
    return {
        "inference": lambda: forward(*args, training=False),
        "forward-train": lambda: forward(*args, training=True),
        "training": lambda: backward(forward(*args, training=True)[3], p["dy"], p["dh_n"],
                                     p["dc_n"]),
    }


def measure(calls, repeats, budget_s):
    """Interleaved: each repeat runs every call once, the order rotating. Stops early
    (at >= 3 repeats) once ``budget_s`` is spent."""
    names = list(calls)
    samples = {n: [] for n in names}
    calls["torch"]()  # warm-up; validation has already compiled and run ours
    start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            calls[n]()
            samples[n].append((time.perf_counter() - t0) * 1e3)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return samples


def child(threads, repeats, budget_s, sizes, json_path):
    import numba
    import torch

    from rnnkernels import cpu, reference

    torch.set_num_threads(threads)
    rows = []
    for size in sizes:
        steps, batch, input_size, hidden = size
        for dtype in (np.float64, np.float32):
            if dtype == np.float64 and steps * batch * hidden > 2**20:
                continue  # float64 validated on the smaller sizes only (time)
            p = make_problem(*size, dtype=dtype)
            want = run_all(reference.forward, reference.backward, p)
            for name, (f, b) in {**CANDIDATES, "cpu (current)": (cpu.forward, cpu.backward)}.items():
                err = validate(name, f, b, p, want, dtype)
                print(f"  validated {name:14} {np.dtype(dtype).name} T,B,I,H={size}: "
                      f"max rel. err. {err:.1e}", flush=True)
        p = make_problem(*size, dtype=np.float32)
        impls = {name: ours_calls(f, b, p) for name, (f, b) in CANDIDATES.items()}
        impls["cpu (current)"] = ours_calls(cpu.forward, cpu.backward, p)
        impls["torch"] = torch_calls(p)
        for mode in ("inference", "forward-train", "training"):
            samples = measure({n: c[mode] for n, c in impls.items()}, repeats, budget_s)
            med = {n: float(np.median(s)) for n, s in samples.items()}
            ratio = {n: float(np.median(np.array(samples[n]) / np.array(samples["cpu (current)"])))
                     for n in samples}
            rows.append({"threads": threads, "size": size, "mode": mode, "median_ms": med,
                         "paired_ratio_to_current": ratio, "repeats": len(samples["torch"]),
                         "load": os.getloadavg()[0]})
            print(f"  {threads}t {str(size):22} {mode:13} " + "  ".join(
                f"{n} {med[n]:8.2f} ms ({ratio[n]:.2f})" for n in med)
                + f"  n={len(samples['torch'])} load {os.getloadavg()[0]:.2f}", flush=True)
    assert numba.get_num_threads() == threads
    with open(json_path, "w", encoding="utf-8") as file:
        json.dump(rows, file)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per size and mode")
    parser.add_argument("--sizes", default=None, help="e.g. 1024,8,128,128;512,4,64,64")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = SIZES if args.sizes is None else [
        tuple(int(v) for v in s.split(",")) for s in args.sizes.split(";")]
    if args.child:
        child(args.child, args.repeats, args.budget, sizes, args.json)
        return
    results = []
    for threads in args.threads:
        env = thread_environment(threads)
        out = Path(f"/tmp/01_time_loop_{os.getpid()}_{threads}.json")
        print(f"{threads} thread(s), load average {os.getloadavg()}", flush=True)
        cmd = [sys.executable, __file__, "--child", str(threads), "--repeats", str(args.repeats),
               "--budget", str(args.budget), "--json", str(out)]
        if args.sizes:
            cmd += ["--sizes", args.sizes]
        subprocess.run(cmd, env=env, check=True)
        results += json.loads(out.read_text())
        out.unlink()
    names = list(CANDIDATES) + ["cpu (current)", "torch"]
    print("\nmedian ms (paired ratio to the current cpu backend in brackets); float32; "
          "load = 1-minute load average at the end of the row")
    print(f"{'thr':>3} {'T,B,I,H':>16} {'mode':13} " + " ".join(f"{n:>19}" for n in names)
          + f" {'load':>5}")
    for r in results:
        m, q = r["median_ms"], r["paired_ratio_to_current"]
        print(f"{r['threads']:>3} {','.join(map(str, r['size'])):>16} {r['mode']:13} "
              + " ".join(f"{m[n]:10.2f} ({q[n]:5.2f})" for n in names) + f" {r['load']:5.2f}")

if __name__ == "__main__":
    main()
