"""The Elman RNN's cpu backends (tanh and relu): Numba for the time loop, packed weights,
a register-blocked kernel.

The math is ``rnn_reference.py``'s (torch.nn.RNN: h_t = act(x_t W_ihᵀ + h_{t-1} W_hhᵀ
+ b), act = tanh or relu); the work is split as in the LSTM's ``cpu.py`` (read its
docstring for the why), with the machinery shared through ``_cpu_common.py``:

* one large product projects every step's input at once: ``gx = x W_ihᵀ + b``;
* the whole time loop is one compiled call: per step ``h_{t-1} W_hhᵀ`` on W_hhᵀ
  packed once per call, then the cell writes h_t = act(gx_t + that);
* backward mirrors it in one call: per step the cell turns dh_t = dy_t + (from step
  t+1) into da_t = dh_t ⊙ act'(a_t), read off the saved h_t (tanh' = 1 − h_t²,
  relu' = [h_t > 0], 0 at 0 as PyTorch), with the per-step norm ‖dh_t‖; then
  da_t W_hh with packed W_hh. After the loop three large GEMMs (NumPy's BLAS) and a
  column sum give dx, dW_ih, dW_hh and db;
* a single step (T = 1) packs nothing: two BLAS products and the same cell.

The nonlinearity is a compile-time choice: two cells, each compiled into its own
variants (names ``..._tanh_serial`` etc.), and two backends, ``TANH_BACKEND`` and
``RELU_BACKEND`` (cuDNN's RNN_TANH / RNN_RELU modes, torch's rnn_tanh / rnn_relu). The
bias arrives folded by the API: [H] = b_ih + b_hh, or None; db is its gradient (both
db_ih and db_hh). float32 and float64; the arithmetic stays in the input dtype.
Variants, cache and threads: as ``cpu.py`` (``_cpu_common.time_loop`` picks the
serial or the persistent loop, both give the same bits). Tests: tests/test_cpu_cells.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numba
import numpy as np

from . import _cpu_blas, _cpu_common, _cpu_gemm, _cpu_threading, _fastmath
from ._backend import Backend, SavedArrays

NONLINEARITIES = ("tanh", "relu")


@dataclass
class Saved:
    """What :func:`forward` keeps for :func:`backward`, in the input dtype."""

    x: np.ndarray  # [T, B, I]
    w_ih: np.ndarray  # [H, I]
    w_hh: np.ndarray  # [H, H]
    has_bias: bool
    nonlinearity: str  # "tanh" or "relu"
    h: np.ndarray  # [T+1, B, H]; h[0] = h0, h[t+1] = h_t


# The cells, compiled per (nonlinearity, variant). Each is one loop over three or four
# arrays (few enough for LLVM's alias checks; it vectorizes).


def _cell_forward_tanh(gx, z, h_out):
    """h_out [B, H] = tanh(gx [B, H] + z [B, ≥H])."""
    batch, hidden = h_out.shape
    for b in numba.prange(batch):
        g, rec, h_row = gx[b], z[b], h_out[b]
        for j in range(hidden):
            h_row[j] = _fastmath.tanh(g[j] + rec[j])


def _cell_forward_relu(gx, z, h_out):
    """h_out [B, H] = relu(gx [B, H] + z [B, ≥H]); NaN stays NaN (as torch's and the
    reference's maximum): the select keeps ``a`` unless ``a < 0``, which is false for
    NaN (``a if a > 0 else 0`` would give 0, and Numba's max leaves the order open)."""
    batch, hidden = h_out.shape
    for b in numba.prange(batch):
        g, rec, h_row = gx[b], z[b], h_out[b]
        zero = h_row.dtype.type(0)
        for j in range(hidden):
            a = g[j] + rec[j]
            h_row[j] = zero if a < zero else a  # noqa: FURB136 - see the docstring


def _cell_backward_tanh(dy, dh_next, h_cur, da, row_sq):
    """da [B, H] = (dy + dh_next[:, :H]) ⊙ (1 − h_t²); dh_next [B, ≥H] from step t+1;
    row_sq [B] scratch. Returns ‖dh_t‖²."""
    batch, hidden = h_cur.shape
    one = da.dtype.type(1)
    for b in numba.prange(batch):
        dy_row, rec, h_row, da_row = dy[b], dh_next[b], h_cur[b], da[b]
        # A per-row sum, added across rows in order after the loop: a prange reduction
        # would add them in an order that depends on the thread count.
        dh_sq = 0.0
        for j in range(hidden):
            dh = dy_row[j] + rec[j]
            h = h_row[j]
            da_row[j] = dh * (one - h * h)
            dh_sq += dh * dh
        row_sq[b] = dh_sq
    dh_total = 0.0
    for b in range(batch):
        dh_total += row_sq[b]
    return dh_total


def _cell_backward_relu(dy, dh_next, h_cur, da, row_sq):
    """da [B, H] = 0 where h_t <= 0, else dy + dh_next[:, :H] (PyTorch's threshold_backward,
    as the reference: exactly 0 for an infinite or NaN dh at h_t <= 0, and dh passes a NaN
    h_t); row_sq [B] scratch. Returns ‖dh_t‖²."""
    batch, hidden = h_cur.shape
    zero = da.dtype.type(0)
    for b in numba.prange(batch):
        dy_row, rec, h_row, da_row = dy[b], dh_next[b], h_cur[b], da[b]
        dh_sq = 0.0
        for j in range(hidden):
            dh = dy_row[j] + rec[j]
            da_row[j] = zero if h_row[j] <= zero else dh
            dh_sq += dh * dh
        row_sq[b] = dh_sq
    dh_total = 0.0
    for b in range(batch):
        dh_total += row_sq[b]
    return dh_total


def _forward_steps(gx, h, packed_w_hh_t, z):
    """All T steps in one compiled call. gx [T, B, H] = x W_ihᵀ + b; h [T+1, B, H] with
    h[0] set; packed_w_hh_t: W_hhᵀ packed; z [B, ≥H] scratch."""
    for t in range(gx.shape[0]):
        step_product(h[t], packed_w_hh_t, z)  # noqa: F821 - a global of each variant
        cell_forward(gx[t], z, h[t + 1])  # noqa: F821


def _backward_steps(dy, h, packed_w_hh, da, dh_next, row_sq, dh_norms):
    """All T steps backward in one compiled call. dh_next [B, ≥H]: dh_n on entry, dh0
    on exit (first H columns); writes da [T, B, H] and dh_norms [T]."""
    for t in range(dy.shape[0] - 1, -1, -1):
        dh_sq = cell_backward(dy[t], dh_next, h[t + 1], da[t], row_sq)  # noqa: F821
        dh_norms[t] = np.sqrt(dh_sq)
        step_product(da[t], packed_w_hh, dh_next)  # noqa: F821


def _forward_rows(state, z, t, first, end):
    """Step t's cell over rows first:end, for the persistent loop (state: gx, h)."""
    gx, h = state
    cell_forward(gx[t, first:end], z[first:end], h[t + 1, first:end])  # noqa: F821 - the serial variant's


def _backward_rows(state, dh_next, t, first, end):
    """Step t's cell backward over rows first:end, for the persistent loop (state: dy,
    h, da, row_sq [T, B]; the step norms are summed after the loop)."""
    dy, h, da, row_sq = state
    cell_backward(dy[t, first:end], dh_next[first:end], h[t + 1, first:end], da[t, first:end], row_sq[t, first:end])  # noqa: F821


_CELLS = {
    "tanh": {"cell_forward": _cell_forward_tanh, "cell_backward": _cell_backward_tanh},
    "relu": {"cell_forward": _cell_forward_relu, "cell_backward": _cell_backward_relu},
}
_SERIAL = {
    nonlinearity: _cpu_common.compile_variant(
        f"{nonlinearity}_serial",
        cells=_CELLS[nonlinearity],
        loops={"forward_steps": _forward_steps, "backward_steps": _backward_steps},
    )
    for nonlinearity in NONLINEARITIES
}
_PERSISTENT = {
    nonlinearity: _cpu_common.compile_persistent(
        f"{nonlinearity}_persistent", _SERIAL[nonlinearity], rows={"forward_rows": _forward_rows, "backward_rows": _backward_rows}
    )
    for nonlinearity in NONLINEARITIES
}


def compiled_functions():
    """The dispatchers by name (``forward_steps_tanh_serial`` ...): for tests and profiling."""
    variants = {f"{nonlinearity}_serial": v for nonlinearity, v in _SERIAL.items()}
    variants |= {f"{nonlinearity}_persistent": v for nonlinearity, v in _PERSISTENT.items()}
    return _cpu_common.compiled_functions(variants)


def forward(nonlinearity, x, w_ih, w_hh, bias, h0, training=True):
    """The backend's forward for ``nonlinearity`` (bound by TANH_/RELU_BACKEND)."""
    steps = x.shape[0]
    step = _single_step if steps == 1 else _steps
    h = step(nonlinearity, x, w_ih, w_hh, bias, h0)
    if not training:
        return h[1:], h[steps].copy(), None
    saved = Saved(x, w_ih, w_hh, bias is not None, nonlinearity, h)
    # y is a copy so that a caller writing into it cannot corrupt the saved states.
    return h[1:].copy(), h[steps].copy(), saved


def _single_step(nonlinearity, x, w_ih, w_hh, bias, h0):
    """h [2, B, H] of a one-step forward (T = 1: decoding): two plain BLAS products (no
    packing, see cpu.py), then the loop's cell. Always this path for T = 1, so same
    inputs, same bits."""
    _, batch, _ = x.shape
    hidden = w_hh.shape[1]
    gx = np.dot(x[0], w_ih.T)
    if bias is not None:
        gx += bias
    h = np.empty((2, batch, hidden), x.dtype)
    h[0] = h0
    cell_step(nonlinearity, gx, np.dot(h0, w_hh.T), h[1])
    return h


def cell_step(nonlinearity, gx, z, h_out):
    """The forward loop's cell for one step (serial variant), for callers that make the
    two products themselves (a decode step, as ``cpu.cell_step`` for the LSTM):
    h_out [B, H] = act(gx [B, H] + z [B, ≥H]), gx = x W_ihᵀ + b, z = h_{t-1} W_hhᵀ;
    C-contiguous, one dtype (float32 or float64)."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    _SERIAL[nonlinearity].cell_forward(gx, z, h_out)


def _steps(nonlinearity, x, w_ih, w_hh, bias, h0):
    """h [T+1, B, H] of a forward over T > 1 steps: the packed kernel and one compiled
    time loop."""
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    loop = _cpu_common.time_loop(batch, hidden, 1, dtype)
    # Through the packed kernel rather than BLAS so that forward runs on one thread
    # pool, Numba's (cpu.py's threading policy).
    # The bias added by the kernel as it stores each tile, as in the LSTM's projection.
    gx = _cpu_common.project(x.reshape(steps * batch, input_size), _cpu_gemm.pack(w_ih.T), hidden, bias)
    gx = gx.reshape(steps, batch, hidden)
    h = np.empty((steps + 1, batch, hidden), dtype)
    h[0] = h0
    packed = _cpu_gemm.pack(w_hh.T)
    z = np.empty((batch, packed.shape[0] * packed.shape[2]), dtype)
    if loop == "persistent":
        _PERSISTENT[nonlinearity].forward_steps(h, packed, z, (gx, h), *_cpu_common.persistent_arguments(batch, packed))
    else:
        _SERIAL[nonlinearity].forward_steps(gx, h, packed, z)
    return h


def backward(saved: Saved, dy, dh_n, return_step_norms=False):
    x, w_ih, w_hh = saved.x, saved.w_ih, saved.w_hh
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    dtype = x.dtype
    loop = _cpu_common.time_loop(batch, hidden, 1, dtype)

    da = np.empty((steps, batch, hidden), dtype)
    packed = _cpu_gemm.pack(w_hh)
    # dh_next has the packed width (H rounded up to a panel); its first H columns count.
    dh_next = np.zeros((batch, packed.shape[0] * packed.shape[2]), dtype)
    dh_next[:, :hidden] = dh_n
    dh_norms = np.empty(steps)
    dy = np.ascontiguousarray(dy)
    if loop == "persistent":
        row_sq = np.empty((steps, batch))  # per step: summed after the loop
        state = (dy, saved.h, da, row_sq)
        _PERSISTENT[saved.nonlinearity].backward_steps(
            da, packed, dh_next, state, *_cpu_common.persistent_arguments(batch, packed)
        )
        _cpu_common.STEP_NORM(row_sq, dh_norms)
    else:
        row_sq = np.empty(batch)
        _SERIAL[saved.nonlinearity].backward_steps(
            dy, saved.h, packed, da, dh_next, row_sq, dh_norms
        )
    dh0 = np.ascontiguousarray(dh_next[:, :hidden])

    flat_da = da.reshape(steps * batch, hidden)
    # As the LSTM's (cpu.py's threading policy): dW_ih, dW_hh and dx on one thread team.
    dw_ih, dw_hh, dx = _cpu_blas.backward_products(
        flat_da, x.reshape(steps * batch, input_size), flat_da, saved.h[:-1].reshape(steps * batch, hidden), w_ih
    )
    dx = dx.reshape(steps, batch, input_size)
    db = flat_da.sum(axis=0) if saved.has_bias else None
    grads = (dx, dw_ih, dw_hh, db, dh0)
    return grads + (dh_norms,) if return_step_norms else grads


def _layout(steps, batch, input_size, hidden, dtype):
    return [((steps + 1, batch, hidden), np.dtype(dtype))]


def _from_arrays(nonlinearity, x, w_ih, w_hh, has_bias, arrays):
    dtype = np.dtype(x.dtype)
    x, w_ih, w_hh = (np.ascontiguousarray(a, dtype=dtype) for a in (x, w_ih, w_hh))
    (h,) = arrays
    return Saved(x, w_ih, w_hh, has_bias, nonlinearity, np.ascontiguousarray(h))


def _make_backend(nonlinearity):
    return Backend(
        name="cpu",
        device="cpu",
        compute_dtypes=("float32", "float64"),
        forward=_cpu_threading.one_launch_at_a_time(partial(forward, nonlinearity)),
        backward=_cpu_threading.one_launch_at_a_time(backward),
        check_available=_cpu_common.check_jit,
        # h [T+1, B, H] in the input dtype (act' is read off it).
        saved_arrays=SavedArrays(_layout, lambda saved: [saved.h], partial(_from_arrays, nonlinearity)),
    )


TANH_BACKEND = _make_backend("tanh")
RELU_BACKEND = _make_backend("relu")
