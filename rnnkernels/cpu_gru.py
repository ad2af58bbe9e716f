"""The GRU's cpu backend: Numba for the time loop, packed weights, a register-blocked kernel.

The math is ``gru_reference.py``'s (torch.nn.GRU's cell, gate rows r, z, n,
n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))); the work is split as in the LSTM's
``cpu.py`` (read its docstring for the why), with the machinery shared through
``_cpu_common.py``:

* one large product projects every step's input at once: ``gx = x W_ihᵀ + b[:3H]``
  over T·B rows;
* the whole time loop is one compiled call (``_forward_steps``): per step the small
  product ``h_{t-1} W_hhᵀ`` on W_hhᵀ packed once per call, then the fused cell, which
  adds b_hn to the n block only (it sits inside r ⊙ (W_hn h + b_hn)), applies the
  three gate activations and the update, writes h_t, keeps gh^n = W_hn h_{t-1} + b_hn
  (the reset gate's derivative needs it) and overwrites the step's slice of gx with the
  activated r, z, n (the buffer backward reads);
* backward mirrors it in one call (``_backward_steps``): per step the cell turns dh and
  the saved gates into the gradients of both pre-activations, dgi (of gx) and dgh (of
  h W_hhᵀ + b_hh; it differs from dgi only in its n block, by the factor r), the
  per-step norm ‖dh_t‖ and the direct part dh_t ⊙ z_t of the gradient reaching
  h_{t-1}; then dgh_t W_hh with packed W_hh adds the rest. After the loop, three large
  GEMMs (NumPy's BLAS) and two column sums give dx, dW_ih, dW_hh and the folded db;
* a single step (T = 1: token-by-token decoding) packs nothing: two BLAS products and
  the same fused cell (``_single_step``).

The bias arrives folded by the API (``cells.py``): [4H] = [b_ir + b_hr, b_iz + b_hz,
b_in, b_hn], or None; db comes back in the same layout. float32 and float64; the
arithmetic stays in the input dtype. Variants, cache and threads: as ``cpu.py``
(``_cpu_common.time_loop`` picks the serial or the persistent loop, both give the same bits).
Tests: tests/test_cpu_cells.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from . import _cpu_blas, _cpu_common, _cpu_gemm, _cpu_threading, _fastmath
from ._backend import Backend, SavedArrays


@dataclass
class Saved:
    """What :func:`forward` keeps for :func:`backward`, in the input dtype."""

    x: np.ndarray  # [T, B, I]
    w_ih: np.ndarray  # [3H, I]
    w_hh: np.ndarray  # [3H, H]
    has_bias: bool
    gates: np.ndarray  # [T, B, 3H] activated r, z, n
    hn: np.ndarray  # [T, B, H] gh^n = W_hn h_{t-1} + b_hn, before the reset gate
    h: np.ndarray  # [T+1, B, H]; h[0] = h0, h[t+1] = h_t


# The cell loops, compiled per variant by _cpu_common.compile_variant. As in cpu.py:
# a few short loops over a handful of arrays each (six or more arrays in one loop and
# LLVM's runtime alias checks give up: scalar code), and each gate reached through
# its own slice that starts at 0 (an offset index kept a loop from vectorizing).


def _cell_forward(gates, z, b_hn, h_prev, h_out, hn_out):
    """One step for every (b, j). On entry ``gates`` [B, 3H] holds x W_ihᵀ + b[:3H]
    and z [B, ≥3H] holds h_{t-1} W_hhᵀ; on exit ``gates`` holds the activated r, z, n.
    b_hn [H]; h_prev, h_out, hn_out [B, H] (hn_out: W_hn h_{t-1} + b_hn)."""
    batch, hidden = h_prev.shape
    for b in numba.prange(batch):
        act, rec = gates[b], z[b]
        act_rz, rec_rz = act[: 2 * hidden], rec[: 2 * hidden]
        for j in range(2 * hidden):  # r, z
            act_rz[j] = _fastmath.sigmoid(act_rz[j] + rec_rz[j])
        gate_r = act[:hidden]
        act_n, rec_n, hn_row = act[2 * hidden : 3 * hidden], rec[2 * hidden : 3 * hidden], hn_out[b]
        for j in range(hidden):  # n
            gh_n = rec_n[j] + b_hn[j]
            hn_row[j] = gh_n
            act_n[j] = _fastmath.tanh(act_n[j] + gate_r[j] * gh_n)
        gate_z, h_in, h_row = act[hidden : 2 * hidden], h_prev[b], h_out[b]
        one = h_row.dtype.type(1)
        for j in range(hidden):
            u = gate_z[j]
            h_row[j] = (one - u) * act_n[j] + u * h_in[j]


def _cell_backward(dy, dh_rec, carry, gates, hn, h_prev, dgi, dgh, row_sq):
    """Gradients of one step's pre-activations. Reads dy [B, H], dh_rec [B, ≥H] (the
    gradient reaching h_t through step t+1's W_hh) and carry [B, H] (reaching it through
    step t+1's z ⊙ h_t; overwritten with dh_t ⊙ z_t, the part that flows on to h_{t-1}
    that way), the saved gates [B, 3H], gh^n [B, H] and h_{t-1} [B, H]; writes dgi, dgh
    [B, 3H] and row_sq [B] (scratch). Returns ‖dh_t‖²."""
    batch, hidden = h_prev.shape
    one = dgi.dtype.type(1)
    for b in numba.prange(batch):
        act, gi, gh = gates[b], dgi[b], dgh[b]
        gate_r, gate_z, gate_n = act[:hidden], act[hidden : 2 * hidden], act[2 * hidden : 3 * hidden]
        gi_r, gi_z, gi_n = gi[:hidden], gi[hidden : 2 * hidden], gi[2 * hidden : 3 * hidden]
        dh_row, dy_row, rec_row = carry[b], dy[b], dh_rec[b]
        # A per-row sum, added across rows in order after the loop: a prange reduction
        # would add them in an order that depends on the thread count.
        dh_sq = 0.0
        for j in range(hidden):  # dh_t, kept in the carry row until the last loop
            dh = dy_row[j] + rec_row[j] + dh_row[j]
            dh_row[j] = dh
            dh_sq += dh * dh
        row_sq[b] = dh_sq
        for j in range(hidden):  # the n pre-activation
            n = gate_n[j]
            gi_n[j] = dh_row[j] * (one - gate_z[j]) * (one - n * n)
        h_in = h_prev[b]
        for j in range(hidden):  # the z pre-activation
            u = gate_z[j]
            gi_z[j] = dh_row[j] * (h_in[j] - gate_n[j]) * u * (one - u)
        gh_n, hn_row = gh[2 * hidden : 3 * hidden], hn[b]
        for j in range(hidden):  # r; dgh's n block is r ⊙ dgi's
            r = gate_r[j]
            gi_r[j] = gi_n[j] * hn_row[j] * r * (one - r)
            gh_n[j] = gi_n[j] * r
        gi_rz, gh_rz = gi[: 2 * hidden], gh[: 2 * hidden]
        for j in range(2 * hidden):  # r and z only ever see the sum: the same gradient
            gh_rz[j] = gi_rz[j]
        for j in range(hidden):
            dh_row[j] = dh_row[j] * gate_z[j]
    dh_total = 0.0
    for b in range(batch):
        dh_total += row_sq[b]
    return dh_total


def _forward_steps(gates, b_hn, h, hn, packed_w_hh_t, z):
    """All T steps in one compiled call. gates [T, B, 3H]: x W_ihᵀ + b[:3H] on entry,
    the activated gates on exit; b_hn [H]; h [T+1, B, H] with h[0] set; hn [T, B, H]
    written; packed_w_hh_t: W_hhᵀ packed; z [B, ≥3H] scratch."""
    for t in range(gates.shape[0]):
        step_product(h[t], packed_w_hh_t, z)  # noqa: F821 - a global of each variant
        cell_forward(gates[t], z, b_hn, h[t], h[t + 1], hn[t])  # noqa: F821


def _backward_steps(dy, gates, hn, h, packed_w_hh, dgi, dgh, dh_rec, carry, row_sq, dh_norms):
    """All T steps backward in one compiled call. dh_rec [B, ≥H] and carry [B, H]: on
    entry dh_n and zeros; on exit the two parts of the gradient reaching h_0 (their sum
    is dh0). Writes dgi, dgh [T, B, 3H] and dh_norms [T]."""
    for t in range(dy.shape[0] - 1, -1, -1):
        dh_sq = cell_backward(dy[t], dh_rec, carry, gates[t], hn[t], h[t], dgi[t], dgh[t], row_sq)  # noqa: F821
        dh_norms[t] = np.sqrt(dh_sq)
        step_product(dgh[t], packed_w_hh, dh_rec)  # noqa: F821


def _forward_rows(state, z, t, first, end):
    """Step t's cell over rows first:end, for the persistent loop (state: gates, b_hn, h, hn)."""
    gates, b_hn, h, hn = state
    cell_forward(  # noqa: F821 - the serial variant's, a global of the persistent variant
        gates[t, first:end], z[first:end], b_hn, h[t, first:end], h[t + 1, first:end], hn[t, first:end]
    )


def _backward_rows(state, dh_rec, t, first, end):
    """Step t's cell backward over rows first:end, for the persistent loop (state: dy,
    gates, hn, h, dgi, dgh, carry, row_sq [T, B]; the step norms are summed after)."""
    dy, gates, hn, h, dgi, dgh, carry, row_sq = state
    cell_backward(  # noqa: F821
        dy[t, first:end], dh_rec[first:end], carry[first:end], gates[t, first:end], hn[t, first:end],
        h[t, first:end], dgi[t, first:end], dgh[t, first:end], row_sq[t, first:end],
    )


_SERIAL = _cpu_common.compile_variant(
    "serial",
    cells={"cell_forward": _cell_forward, "cell_backward": _cell_backward},
    loops={"forward_steps": _forward_steps, "backward_steps": _backward_steps},
)
_PERSISTENT = _cpu_common.compile_persistent(
    "persistent", _SERIAL, rows={"forward_rows": _forward_rows, "backward_rows": _backward_rows}
)


def compiled_functions():
    """The dispatchers by name (``forward_steps_serial`` ...): for tests and profiling."""
    return _cpu_common.compiled_functions({"serial": _SERIAL, "persistent": _PERSISTENT})


def _b_hn(bias, hidden, dtype):
    """The n gate's recurrent bias [H] (zeros without a bias): added inside r ⊙ (.)."""
    if bias is None:
        return np.zeros(hidden, dtype)
    return np.ascontiguousarray(bias[3 * hidden :], dtype=dtype)


def forward(x, w_ih, w_hh, bias, h0, training=True):
    steps = x.shape[0]
    if steps == 1:
        h, hn, gates = _single_step(x, w_ih, w_hh, bias, h0)
    else:
        h, hn, gates = _steps(x, w_ih, w_hh, bias, h0)
    if not training:
        return h[1:], h[steps].copy(), None
    saved = Saved(x, w_ih, w_hh, bias is not None, gates, hn, h)
    # y is a copy so that a caller writing into it cannot corrupt the saved states.
    return h[1:].copy(), h[steps].copy(), saved


def _single_step(x, w_ih, w_hh, bias, h0):
    """(h, hn, gates) of a one-step forward (T = 1): two plain BLAS products (packing
    the weights would cost more than the step, see cpu.py), then the loop's cell.
    Always this path for T = 1, so same inputs, same bits."""
    _, batch, _ = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    gates = np.dot(x[0], w_ih.T).reshape(1, batch, 3 * hidden)
    if bias is not None:
        gates += bias[: 3 * hidden]
    z = np.dot(h0, w_hh.T)
    h = np.empty((2, batch, hidden), dtype)
    hn = np.empty((1, batch, hidden), dtype)
    h[0] = h0
    cell_step(gates[0], z, _b_hn(bias, hidden, dtype), h[0], h[1], hn[0])
    return h, hn, gates


def cell_step(gates, z, b_hn, h_prev, h_out, hn_out):
    """The forward loop's fused cell for one step (serial variant), for callers that
    make the two products themselves (a decode step, as ``cpu.cell_step`` for the LSTM).
    ``gates`` [B, 3H]: x W_ihᵀ + b[:3H] on entry, activated r, z, n on exit; ``z``
    [B, ≥3H] = h_{t-1} W_hhᵀ; b_hn [H] (zeros without biases); h_prev, h_out, hn_out
    [B, H]; C-contiguous, one dtype (float32 or float64)."""
    _SERIAL.cell_forward(gates, z, b_hn, h_prev, h_out, hn_out)


def _steps(x, w_ih, w_hh, bias, h0):
    """(h, hn, gates) of a forward over T > 1 steps: the packed kernel and one compiled
    time loop."""
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    loop = _cpu_common.time_loop(batch, hidden, 3, dtype)
    # Through the packed kernel rather than BLAS so that forward runs on one thread
    # pool, Numba's (cpu.py's threading policy).
    # The bias's input-side blocks (r, z, n_ih) are added by the kernel as it stores each
    # tile, as in the LSTM's projection; b_hn stays for the cell (inside r ⊙ (...)).
    input_bias = None if bias is None else bias[: 3 * hidden]
    gates = _cpu_common.project(x.reshape(steps * batch, input_size), _cpu_gemm.pack(w_ih.T), 3 * hidden, input_bias)
    gates = gates.reshape(steps, batch, 3 * hidden)
    h = np.empty((steps + 1, batch, hidden), dtype)
    hn = np.empty((steps, batch, hidden), dtype)
    h[0] = h0
    packed = _cpu_gemm.pack(w_hh.T)
    z = np.empty((batch, packed.shape[0] * packed.shape[2]), dtype)
    b_hn = _b_hn(bias, hidden, dtype)
    if loop == "persistent":
        _PERSISTENT.forward_steps(h, packed, z, (gates, b_hn, h, hn), *_cpu_common.persistent_arguments(batch, packed))
    else:
        _SERIAL.forward_steps(gates, b_hn, h, hn, packed, z)
    return h, hn, gates


def backward(saved: Saved, dy, dh_n, return_step_norms=False):
    x, w_ih, w_hh = saved.x, saved.w_ih, saved.w_hh
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    loop = _cpu_common.time_loop(batch, hidden, 3, dtype)

    dgi = np.empty((steps, batch, 3 * hidden), dtype)
    dgh = np.empty((steps, batch, 3 * hidden), dtype)
    packed = _cpu_gemm.pack(w_hh)
    # dh_rec has the packed width (H rounded up to a panel); its first H columns count.
    dh_rec = np.zeros((batch, packed.shape[0] * packed.shape[2]), dtype)
    dh_rec[:, :hidden] = dh_n
    carry = np.zeros((batch, hidden), dtype)
    dh_norms = np.empty(steps)
    dy = np.ascontiguousarray(dy)
    if loop == "persistent":
        row_sq = np.empty((steps, batch))  # per step: summed after the loop
        state = (dy, saved.gates, saved.hn, saved.h, dgi, dgh, carry, row_sq)
        _PERSISTENT.backward_steps(dgh, packed, dh_rec, state, *_cpu_common.persistent_arguments(batch, packed))
        _cpu_common.STEP_NORM(row_sq, dh_norms)
    else:
        row_sq = np.empty(batch)
        _SERIAL.backward_steps(
            dy, saved.gates, saved.hn, saved.h, packed, dgi, dgh, dh_rec, carry, row_sq, dh_norms
        )
    dh0 = dh_rec[:, :hidden] + carry

    flat_dgi = dgi.reshape(steps * batch, 3 * hidden)
    flat_dgh = dgh.reshape(steps * batch, 3 * hidden)
    # As the LSTM's (cpu.py's threading policy): dW_ih, dW_hh and dx on one thread team.
    dw_ih, dw_hh, dx = _cpu_blas.backward_products(
        flat_dgi, x.reshape(steps * batch, input_size), flat_dgh, saved.h[:-1].reshape(steps * batch, hidden), w_ih
    )
    dx = dx.reshape(steps, batch, input_size)
    # The folded layout [r, z, n_ih, n_hh]: dgi's column sums, then dgh's n block's.
    db = np.concatenate([flat_dgi.sum(axis=0), flat_dgh[:, 2 * hidden :].sum(axis=0)]) if saved.has_bias else None
    grads = (dx, dw_ih, dw_hh, db, dh0)
    return grads + (dh_norms,) if return_step_norms else grads


def _layout(steps, batch, input_size, hidden, dtype):
    dtype = np.dtype(dtype)
    return [((steps, batch, 3 * hidden), dtype), ((steps, batch, hidden), dtype), ((steps + 1, batch, hidden), dtype)]


def _from_arrays(x, w_ih, w_hh, has_bias, arrays):
    dtype = np.dtype(x.dtype)
    x, w_ih, w_hh = (np.ascontiguousarray(a, dtype=dtype) for a in (x, w_ih, w_hh))
    gates, hn, h = (np.ascontiguousarray(a) for a in arrays)
    return Saved(x, w_ih, w_hh, has_bias, gates, hn, h)


BACKEND = Backend(
    name="cpu",
    device="cpu",
    compute_dtypes=("float32", "float64"),
    forward=_cpu_threading.one_launch_at_a_time(forward),
    backward=_cpu_threading.one_launch_at_a_time(backward),
    check_available=_cpu_common.check_jit,
    # gates [T, B, 3H], hn [T, B, H], h [T+1, B, H], in the input dtype.
    saved_arrays=SavedArrays(_layout, lambda saved: [saved.gates, saved.hn, saved.h], _from_arrays),
)
