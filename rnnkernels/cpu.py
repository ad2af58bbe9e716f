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
  norms), then dh_{t-1} = dz_t W_hh with packed W_hh; after the loop, dx = dz W_ih by
  the packed kernel (8-12% faster than OpenBLAS's sgemm there, packing included,
  1 thread), two GEMMs (NumPy's BLAS) and a column sum give dW_ih, dW_hh and db;
* a single step (T = 1: token-by-token decoding) packs nothing: two BLAS products and
  the same fused cell (``_single_step``), since packing would cost more than the step.

float32 and float64 are supported; arithmetic stays in the input dtype. Every output
bit is the same in any process, whatever ran before, at any thread count and in
either variant (tests/test_cpu.py, tests/test_cpu_process.py).

Compiled variants (``rnnkernels/_cpu_common.py``, shared with the GRU and the Elman
RNN; the rule is ``_cpu_common.parallel_steps``): one *serial* and one *parallel* copy of
each compiled function, each under its own name in Numba's cache; float32 and float64
are signatures of each. The time loop takes the parallel variant when Numba has more
than one thread and a step holds B > 1 rows and B·H >= 4096 units: its step product
splits the weight panels over the threads and its cell the batch rows, one fork and
join each per step, which only pays for that much work. The input projection is one
product, split over the threads from 2^20 multiply-adds up. The packed kernel's vector
width follows Numba's target (``_cpu_gemm.VECTOR_BYTES``: 64 bytes where it has
AVX-512F, else 32) and is part of every compiled function's cache name; a product's
sums keep their order at either width. The compiled code is cached on disk
(``__pycache__`` next to this file, or ``NUMBA_CACHE_DIR``): a new process loads it
instead of compiling (about a second per variant).

Threading policy: one thread pool at a time, Numba's for everything that runs per step.
``numba.set_num_threads`` / ``NUMBA_NUM_THREADS`` sets the threads for forward and the
backward loop and dx; NumPy's BLAS threads (``OPENBLAS_NUM_THREADS``) only the two
weight-gradient GEMMs after the backward loop, which are large enough for any thread
count. No BLAS call
runs inside a time loop or between forward's projection and its loop any more:
OpenBLAS's workers spin for about 100 ms after each call, and at two threads on two
cores they took the core a parallel step needed. Not yet covered: in training, the
GEMMs after one backward can still be spinning when the next forward's loop starts
(moving them to the packed kernel needs blocking over their T·B-long k loop). Numba's
``omp`` layer and PyTorch's bundled libgomp are separate OpenMP runtimes when both are
used in one process; each spins briefly (GOMP_SPINCOUNT) and then sleeps when idle.
"""

from __future__ import annotations

import numba
import numpy as np

from . import _cpu_common, _cpu_gemm, _fastmath
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
        for j in range(hidden):
            act_o[j] = _fastmath.sigmoid(act_o[j] + rec_o[j])
        gate_i, gate_f = act[:hidden], act[hidden : 2 * hidden]
        c_in, c_row, h_row = c_prev[b], c_out[b], h_out[b]
        for j in range(hidden):
            c = gate_f[j] * c_in[j] + gate_i[j] * act_g[j]
            c_row[j] = c
            h_row[j] = act_o[j] * _fastmath.tanh(c)


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


# One serial and one parallel variant (rnnkernels/_cpu_common.py: how each is compiled
# and cached, and the rule that picks one).
_VARIANTS = {
    parallel: _cpu_common.compile_variant(
        "parallel" if parallel else "serial",
        parallel,
        cells={"cell_forward": _cell_forward, "cell_backward": _cell_backward},
        loops={"forward_steps": _forward_steps, "backward_steps": _backward_steps},
    )
    for parallel in (False, True)
}


def compiled_functions():
    """The dispatchers by name (``forward_steps_serial`` ...): for tests and profiling,
    e.g. ``dispatcher.stats.cache_hits``."""
    return _cpu_common.compiled_functions({"parallel" if p else "serial": v for p, v in _VARIANTS.items()})


def _variant(batch, hidden):
    """The variant for the time loop, steps of B x H (``_cpu_common.parallel_steps``)."""
    return _VARIANTS[_cpu_common.parallel_steps(batch, hidden)]


def forward(x, w_ih, w_hh, bias, h0, c0, training=True):
    steps = x.shape[0]
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
    variant = _variant(batch, hidden)

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
    variant.forward_steps(gates, h, c, packed, z)
    return h, c, gates


def cell_step(gates, z, c_prev, h_out, c_out):
    """The forward loop's fused cell for one step (serial variant), for callers that
    make the two products themselves: rnnkernels.torch's decode step (T=1, a state,
    no gradients), where packing W_hh as :func:`forward` does on every call would cost
    more than the step. ``gates`` [B, 4H]: x W_ihᵀ + b on entry, activated i, f, g, o
    on exit; ``z`` [B, 4H] = h_{t-1} W_hhᵀ; c_prev, h_out, c_out [B, H]; C-contiguous,
    one dtype (float32 or float64)."""
    _VARIANTS[False].cell_forward(gates, z, c_prev, h_out, c_out)


def backward(saved: Saved, dy, dh_n, dc_n, return_step_norms=False):
    x, w_ih, w_hh = saved.x, saved.w_ih, saved.w_hh
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    variant = _variant(batch, hidden)

    dz = np.empty((steps, batch, 4 * hidden), dtype)
    packed = _cpu_gemm.pack(w_hh)
    # dh_next has the packed width (H rounded up to a panel); its first H columns count.
    dh_next = np.zeros((batch, packed.shape[0] * packed.shape[2]), dtype)
    dh_next[:, :hidden] = dh_n
    carry = np.array(dc_n, dtype=dtype, order="C")
    row_sq = np.empty((batch, 2))
    dh_norms = np.empty(steps)
    dc_norms = np.empty(steps)
    variant.backward_steps(
        np.ascontiguousarray(dy), saved.gates, saved.c, packed, dz, dh_next, carry, row_sq, dh_norms, dc_norms
    )
    dh_next = np.ascontiguousarray(dh_next[:, :hidden])

    flat_dz = dz.reshape(steps * batch, 4 * hidden)
    dx = _cpu_common.project(flat_dz, _cpu_gemm.pack(w_ih), input_size).reshape(steps, batch, input_size)
    dw_ih = _cpu_common.weight_gradient(flat_dz, x.reshape(steps * batch, input_size), input_size)
    dw_hh = _cpu_common.weight_gradient(flat_dz, saved.h[:-1].reshape(steps * batch, hidden), hidden)
    db = flat_dz.sum(axis=0) if saved.has_bias else None
    grads = (dx, dw_ih, dw_hh, db, dh_next, carry)
    return grads + (dh_norms, dc_norms) if return_step_norms else grads


BACKEND = Backend(
    name="cpu",
    device="cpu",
    compute_dtypes=("float32", "float64"),
    forward=forward,
    backward=backward,
    # reference.Saved in the input dtype (the saved state as arrays, for torch's ops).
    saved_arrays=saved_arrays(lambda dtype: dtype),
)
