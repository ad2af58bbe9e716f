"""The CPU backend: BLAS for the matrix products, Numba for the fused cell.

The math is the reference's (see ``rnnkernels/reference.py``); the work is split the
way the CUDA kernels split it:

* one large GEMM projects every step's input at once: ``gx = x W_ihᵀ + b``
  over T·B rows;
* per step, one small GEMM ``h_{t-1} W_hhᵀ`` into a scratch buffer, then one Numba
  call applies all four gate activations and the cell update, reading each gate
  pre-activation once, writing h_t and c_t, and overwriting the step's slice of the
  input projection with the activated gates (the buffer backward reads);
* backward mirrors it: one Numba loop per step turns dh, dc and the saved gates into
  the gate gradients dz_t (and the per-step gradient norms), one GEMM carries
  dh_{t-1} = dz_t W_hh; after the loop, three large GEMMs and a column sum give
  dW_ih, dW_hh, dx and db.

float32 and float64 are supported; arithmetic stays in the input dtype. The pointwise
loops run in parallel over the batch (``numba.prange``) once a step holds enough work
to pay for the fork; below that they run serially.
"""

from __future__ import annotations

import numba
import numpy as np

from . import _fastmath
from ._backend import Backend
from .reference import Saved

# Below this many hidden units per step (B·H), a parallel region costs more than it
# saves on a few cores (measured on a 2-core x86 machine with float32).
_PARALLEL_MIN_UNITS = 16384


def _make_cells(sigmoid, tanh, parallel):
    """The forward and backward cell loops for one dtype's activations. Each reads
    every gate pre-activation once and keeps the cell math in registers."""
    jit = numba.njit(
        nogil=True,
        cache=True,
        parallel=parallel,
        error_model="numpy",  # no zero-division branches: they stop vectorization
        # ``reassoc`` lets the two norm sums in backward vectorize; everything else
        # in these loops is products, where it changes nothing but the last bit.
        fastmath={"contract", "reassoc"},
    )

    # Each row is processed by a few short loops over a handful of arrays each rather
    # than one loop touching all of them: with six or more arrays in one loop LLVM's
    # runtime alias checks give up and the scalar loop runs (4x slower, measured).

    @jit
    def cell_forward(gates, z, c_prev, h_out, c_out):
        """One step for every (b, j). On entry ``gates`` [B, 4H] holds the input
        projection with bias and z [B, 4H] holds h_{t-1} W_hhᵀ; on exit ``gates``
        holds the activated i, f, g, o. c_prev, h_out, c_out [B, H]."""
        batch, hidden = c_prev.shape
        for b in numba.prange(batch):
            act, rec = gates[b], z[b]
            for j in range(2 * hidden):  # i, f
                act[j] = sigmoid(act[j] + rec[j])
            for j in range(2 * hidden, 3 * hidden):  # g
                act[j] = tanh(act[j] + rec[j])
            for j in range(3 * hidden, 4 * hidden):  # o
                act[j] = sigmoid(act[j] + rec[j])
            c_in, c_row, h_row = c_prev[b], c_out[b], h_out[b]
            for j in range(hidden):
                c = act[hidden + j] * c_in[j] + act[j] * act[2 * hidden + j]
                c_row[j] = c
                h_row[j] = act[3 * hidden + j] * tanh(c)

    @jit
    def cell_backward(dy, dh_next, carry, gates, c_prev, c_cur, dz):
        """Gate gradients of one step. Reads dy, dh_next [B, H] (the gradient reaching
        h_t from y_t and from step t+1), carry [B, H] (reaching c_t from step t+1;
        overwritten with the part that flows on to c_{t-1}), the saved gates [B, 4H],
        c_{t-1} and c_t [B, H]; writes dz [B, 4H]. Returns (‖dh_t‖², ‖dc_t‖²)."""
        batch, hidden = c_cur.shape
        one = dz.dtype.type(1)
        dh_sq = 0.0
        dc_sq = 0.0
        for b in numba.prange(batch):
            act, grad, dc_row = gates[b], dz[b], carry[b]
            dy_row, dh_row, c_row = dy[b], dh_next[b], c_cur[b]
            for j in range(hidden):  # dz^o, and dc_t into the carry row
                o = act[3 * hidden + j]
                tanh_c = tanh(c_row[j])
                dh = dy_row[j] + dh_row[j]
                dc = dc_row[j] + dh * o * (one - tanh_c * tanh_c)
                grad[3 * hidden + j] = dh * tanh_c * o * (one - o)
                dc_row[j] = dc
                dh_sq += dh * dh
                dc_sq += dc * dc
            c_in = c_prev[b]
            for j in range(hidden):  # dz^i, dz^f, dz^g, and the carry to c_{t-1}
                i, f, g = act[j], act[hidden + j], act[2 * hidden + j]
                dc = dc_row[j]
                grad[j] = dc * g * i * (one - i)
                grad[hidden + j] = dc * c_in[j] * f * (one - f)
                grad[2 * hidden + j] = dc * i * (one - g * g)
                dc_row[j] = dc * f
        return dh_sq, dc_sq

    return cell_forward, cell_backward


_CELLS = {
    (dtype, parallel): _make_cells(sigmoid, tanh, parallel)
    for dtype, sigmoid, tanh in (
        (np.dtype(np.float32), _fastmath.sigmoid32, _fastmath.tanh32),
        (np.dtype(np.float64), _fastmath.sigmoid64, _fastmath.tanh64),
    )
    for parallel in (False, True)
}


def _cells(dtype, batch, hidden):
    parallel = batch > 1 and batch * hidden >= _PARALLEL_MIN_UNITS
    return _CELLS[np.dtype(dtype), parallel]


def forward(x, w_ih, w_hh, bias, h0, c0, training=True):
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    cell, _ = _cells(dtype, batch, hidden)

    # The input projection of every step; each step's cell overwrites its slice with
    # the activated gates, so this one buffer is also what backward reads.
    gates = (x.reshape(steps * batch, input_size) @ w_ih.T).reshape(steps, batch, 4 * hidden)
    if bias is not None:
        gates += bias
    h = np.empty((steps + 1, batch, hidden), dtype)
    c = np.empty((steps + 1, batch, hidden), dtype)
    h[0], c[0] = h0, c0
    z = np.empty((batch, 4 * hidden), dtype)
    w_hh_t = w_hh.T
    for t in range(steps):
        np.matmul(h[t], w_hh_t, out=z)
        cell(gates[t], z, c[t], h[t + 1], c[t + 1])

    if not training:
        return h[1:], h[steps].copy(), c[steps].copy(), None
    saved = Saved(x, w_ih, w_hh, bias is not None, gates, h, c)
    # y is a copy so that a caller writing into it cannot corrupt the saved states.
    return h[1:].copy(), h[steps].copy(), c[steps].copy(), saved


def backward(saved: Saved, dy, dh_n, dc_n, return_step_norms=False):
    x, w_ih, w_hh = saved.x, saved.w_ih, saved.w_hh
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    _, cell = _cells(dtype, batch, hidden)

    dz = np.empty((steps, batch, 4 * hidden), dtype)
    dh_next = np.array(dh_n, dtype=dtype, order="C")
    carry = np.array(dc_n, dtype=dtype, order="C")
    dh_norms = np.empty(steps)
    dc_norms = np.empty(steps)
    for t in reversed(range(steps)):
        dh_sq, dc_sq = cell(dy[t], dh_next, carry, saved.gates[t], saved.c[t], saved.c[t + 1], dz[t])
        dh_norms[t], dc_norms[t] = np.sqrt(dh_sq), np.sqrt(dc_sq)
        np.matmul(dz[t], w_hh, out=dh_next)

    flat_dz = dz.reshape(steps * batch, 4 * hidden)
    dx = (flat_dz @ w_ih).reshape(steps, batch, input_size)
    dw_ih = flat_dz.T @ x.reshape(steps * batch, input_size)
    dw_hh = flat_dz.T @ saved.h[:-1].reshape(steps * batch, hidden)
    db = flat_dz.sum(axis=0) if saved.has_bias else None
    grads = (dx, dw_ih, dw_hh, db, dh_next, carry)
    return grads + (dh_norms, dc_norms) if return_step_norms else grads


BACKEND = Backend(
    name="cpu",
    device="cpu",
    compute_dtypes=("float32", "float64"),
    forward=forward,
    backward=backward,
)
