r"""The float64 NumPy reference GRU: the definition its backends will be checked against.

Part of issue 15 (GRU and Elman RNN on every backend). This module is the cell's
reference only; the public API (``gru_forward`` / ``gru_backward``), the backends and
the modules are to follow in the generic three-cell design. Tests:
``tests/test_cell_references.py`` (against ``torch.nn.GRU``, torch autograd and central
finite differences).

It is written to read like the equations, not to be fast.

Layouts and gate order (exactly ``torch.nn.GRU``, so its weights load unchanged)::

    x     [T, B, I]    input sequence, time-major
    w_ih  [3H, I]      rows: r (0:H), z (H:2H), n (2H:3H)
    w_hh  [3H, H]      same row blocks
    b_ih  [3H]         b_hh [3H]      (each may be None: zero)
    h0    [B, H]       (None: zero)

Forward, for t = 0 .. T-1, with h_{-1} = h0 and σ(a) = 1 / (1 + e^{-a})::

    gi_t = x_t W_ihᵀ + b_ih        gh_t = h_{t-1} W_hhᵀ + b_hh          [B, 3H]
    r_t  = σ(gi_t^r + gh_t^r)                      reset gate
    z_t  = σ(gi_t^z + gh_t^z)                      update gate
    n_t  = tanh(gi_t^n + r_t ⊙ gh_t^n)             candidate; gh_t^n = W_hn h_{t-1} + b_hn
    h_t  = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}         y_t = h_t

Outputs: y [T, B, H], h_n = h_{T-1}. The reset gate multiplies W_hn h + b_hn *after* the
matrix product and with b_hn inside: PyTorch's and cuDNN's GRU (ONNX's
``linear_before_reset=1``), not the r ⊙ h before W_hn of Cho et al. (2014). So b_hn does
not commute with b_in and the two biases must stay separate: summing b_ih + b_hh, as the
LSTM and the Elman RNN may, would compute a different cell.

Saved for backward: x, the weights, which biases exist, the activated gates (r, z, n)
[T, B, 3H], gh^n = W_hn h_{t-1} + b_hn [T, B, H] (the reset gate's derivative needs it),
and every hidden state h_{-1} .. h_{T-1} as one [T+1, B, H] array whose index 0 is the
initial state.

Backward through time. With dh_t = ∂L/∂h_t, for t = T-1 .. 0::

    dh_t  = dy_t + (carry from step t+1)           (carry at T-1 := dh_n)
    da^n  = dh_t ⊙ (1 − z_t) ⊙ (1 − n_t²)          pre-activation of n
    da^z  = dh_t ⊙ (h_{t-1} − n_t) ⊙ z_t (1 − z_t)
    da^r  = da^n ⊙ gh_t^n ⊙ r_t (1 − r_t)
    dgi_t = [da^r, da^z, da^n]                      gradient of gi_t    [B, 3H]
    dgh_t = [da^r, da^z, da^n ⊙ r_t]                gradient of gh_t    [B, 3H]
    carry = dh_t ⊙ z_t + dgh_t W_hh                 (flows to h_{t-1})

and, summing over all steps::

    dW_ih = Σ_t dgi_tᵀ x_t      dW_hh = Σ_t dgh_tᵀ h_{t-1}
    db_ih = Σ_{t,b} dgi_t       db_hh = Σ_{t,b} dgh_t
    dx_t  = dgi_t W_ih          dh0 = carry after t = 0

db_ih and db_hh agree on the r and z rows and differ on the n rows by the factor r_t.
``dh_norms[t] = ‖dh_t‖`` (over batch and units) is the per-step norm the LSTM's backends
report too. The z_t ⊙ h_{t-1} path carries the gradient to h_{t-1} scaled by z_t
alone, without a weight matrix: the GRU's counterpart of the LSTM's cell state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._cell_reference import layer_inputs, rows, upstream
from .reference import sigmoid


@dataclass
class Saved:
    """What :func:`forward` keeps for :func:`backward`, all float64."""

    x: np.ndarray  # [T, B, I]
    w_ih: np.ndarray  # [3H, I]
    w_hh: np.ndarray  # [3H, H]
    has_b_ih: bool
    has_b_hh: bool
    gates: np.ndarray  # [T, B, 3H] activated r, z, n
    hn: np.ndarray  # [T, B, H] gh^n = W_hn h_{t-1} + b_hn, before the reset gate
    h: np.ndarray  # [T+1, B, H]; h[0] = h0, h[t+1] = h_t


def forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, *, training=True):
    """One GRU layer in float64. Returns ``(y, h_n, saved)`` (see the module docstring
    for shapes); ``saved`` is None unless ``training``."""
    x, w_ih, w_hh, b_ih, b_hh, h0 = layer_inputs(x, w_ih, w_hh, b_ih, b_hh, h0, gates=3)
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    zeros = np.zeros(3 * hidden)
    bi = zeros if b_ih is None else b_ih
    bh = zeros if b_hh is None else b_hh

    gates = np.empty((steps, batch, 3 * hidden))
    hn = np.empty((steps, batch, hidden))
    h = np.empty((steps + 1, batch, hidden))
    h[0] = 0.0 if h0 is None else h0
    for t in range(steps):
        gi_r, gi_z, gi_n = np.split(x[t] @ w_ih.T + bi, 3, axis=1)
        gh_r, gh_z, gh_n = np.split(h[t] @ w_hh.T + bh, 3, axis=1)
        r = sigmoid(gi_r + gh_r)
        z = sigmoid(gi_z + gh_z)
        n = np.tanh(gi_n + r * gh_n)
        h[t + 1] = (1.0 - z) * n + z * h[t]
        gates[t] = np.concatenate([r, z, n], axis=1)
        hn[t] = gh_n

    saved = Saved(x, w_ih, w_hh, b_ih is not None, b_hh is not None, gates, hn, h) if training else None
    return h[1:].copy(), h[steps].copy(), saved


def backward(saved: Saved, dy=None, dh_n=None, return_step_norms=False):
    """Backpropagation through time for :func:`forward`.

    ``dy`` [T, B, H] and ``dh_n`` [B, H] are the upstream gradients (None: zero). Returns
    ``(dx, dw_ih, dw_hh, db_ih, db_hh, dh0)``, float64, ``db_ih`` / ``db_hh`` None where
    forward had no such bias. With ``return_step_norms``, ``dh_norms`` follows:
    ``dh_norms[t] = ‖∂L/∂h_t‖`` (Frobenius norm over batch and units, [T])."""
    x, w_ih, w_hh, h = saved.x, saved.w_ih, saved.w_hh, saved.h
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    dy, dh_n = upstream(dy, dh_n, steps, batch, hidden)

    dgi = np.empty((steps, batch, 3 * hidden))
    dgh = np.empty((steps, batch, 3 * hidden))
    dh_norms = np.empty(steps)
    carry = np.zeros((batch, hidden)) if dh_n is None else dh_n  # reaches h_t from step t+1
    for t in reversed(range(steps)):
        r, z, n = np.split(saved.gates[t], 3, axis=1)
        h_prev = h[t]

        dh = carry if dy is None else dy[t] + carry
        dh_norms[t] = np.linalg.norm(dh)
        da_n = dh * (1.0 - z) * (1.0 - n**2)
        da_z = dh * (h_prev - n) * z * (1.0 - z)
        da_r = da_n * saved.hn[t] * r * (1.0 - r)
        dgi[t] = np.concatenate([da_r, da_z, da_n], axis=1)
        dgh[t] = np.concatenate([da_r, da_z, da_n * r], axis=1)
        carry = dh * z + dgh[t] @ w_hh

    flat_dgi = dgi.reshape(-1, 3 * hidden)
    flat_dgh = dgh.reshape(-1, 3 * hidden)
    dx = dgi @ w_ih
    dw_ih = flat_dgi.T @ rows(x)
    dw_hh = flat_dgh.T @ rows(h[:-1])
    db_ih = flat_dgi.sum(axis=0) if saved.has_b_ih else None
    db_hh = flat_dgh.sum(axis=0) if saved.has_b_hh else None
    grads = (dx, dw_ih, dw_hh, db_ih, db_hh, carry)
    return grads + (dh_norms,) if return_step_norms else grads


# ----------------------------------------------------------------------------- backend
#
# The reference as a backend of the generic API (rnnkernels/_backend.py): the API hands
# backends one FOLDED bias [4H] = [b_ir + b_hr, b_iz + b_hz, b_in, b_hn] (cells.py says
# why) and takes its gradient back in that layout. Unfolded here as b_ih = bias[:3H] and
# b_hh = [0, 0, b_hn], which computes the same cell.


def _backend_forward(x, w_ih, w_hh, bias, h0, training=True):
    b_ih = b_hh = None
    if bias is not None:
        hidden = w_hh.shape[1]
        bias = np.asarray(bias, dtype=np.float64)
        b_ih = bias[: 3 * hidden]
        b_hh = np.concatenate([np.zeros(2 * hidden), bias[3 * hidden :]])
    return forward(x, w_ih, w_hh, b_ih, b_hh, h0, training=training)


def _backend_backward(saved: Saved, dy, dh_n, return_step_norms=False):
    dx, dw_ih, dw_hh, db_ih, db_hh, dh0, *norms = backward(saved, dy, dh_n, return_step_norms)
    hidden = saved.w_hh.shape[1]
    db = None if db_ih is None else np.concatenate([db_ih, db_hh[2 * hidden :]])
    return (dx, dw_ih, dw_hh, db, dh0, *norms)


def _saved_arrays():
    """:class:`Saved` as arrays (rnnkernels/_backend.py's ``SavedArrays``): gates
    [T, B, 3H], hn [T, B, H], h [T+1, B, H], all float64; the backend's biases are both
    present or both absent (see ``_backend_forward``)."""
    from ._backend import SavedArrays

    def layout(steps, batch, input_size, hidden, dtype):
        f64 = np.dtype(np.float64)
        return [((steps, batch, 3 * hidden), f64), ((steps, batch, hidden), f64), ((steps + 1, batch, hidden), f64)]

    def from_arrays(x, w_ih, w_hh, has_bias, arrays):
        x, w_ih, w_hh = (np.ascontiguousarray(a, dtype=np.float64) for a in (x, w_ih, w_hh))
        gates, hn, h = (np.ascontiguousarray(a, dtype=np.float64) for a in arrays)
        return Saved(x, w_ih, w_hh, has_bias, has_bias, gates, hn, h)

    return SavedArrays(layout, lambda saved: [saved.gates, saved.hn, saved.h], from_arrays)


def _make_backend():
    from ._backend import Backend

    return Backend(
        name="reference",
        device="cpu",
        compute_dtypes=("float16", "float32", "float64"),
        forward=_backend_forward,
        backward=_backend_backward,
        saved_arrays=_saved_arrays(),
    )


BACKEND = _make_backend()
