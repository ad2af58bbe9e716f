r"""The float64 NumPy reference LSTM: the definition every backend is checked against.

It is written to read like the equations, not to be fast.

Layouts and gate order (exactly ``torch.nn.LSTM``, so its weights load unchanged)::

    x     [T, B, I]    input sequence, time-major
    w_ih  [4H, I]      rows: i (0:H), f (H:2H), g (2H:3H), o (3H:4H)
    w_hh  [4H, H]      same row blocks
    bias  [4H]         b_ih + b_hh (the two biases only ever appear summed)
    h0,c0 [B, H]

Forward, for t = 0 .. T-1::

    z_t = x_t W_ihᵀ + h_{t-1} W_hhᵀ + b                      [B, 4H]
    i_t = σ(z_t^i)   f_t = σ(z_t^f)   g_t = tanh(z_t^g)   o_t = σ(z_t^o)
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
    h_t = o_t ⊙ tanh(c_t)            y_t = h_t

with h_{-1} = h0, c_{-1} = c0, σ(z) = 1 / (1 + e^{-z}). Outputs: y [T, B, H],
h_n = h_{T-1}, c_n = c_{T-1}.

Saved for backward (``training=True``): x, the weights, the activated gates
(i, f, g, o) [T, B, 4H], every hidden state h_{-1} .. h_{T-1} and cell state
c_{-1} .. c_{T-1} as [T+1, B, H] arrays whose index 0 is the initial state.

Backward through time. With dh_t = ∂L/∂h_t arriving from y_t (dy_t) and from step t+1,
and dc_t the gradient flowing into c_t from step t+1, for t = T-1 .. 0::

    dh_t  = dy_t + dz_{t+1} W_hh                 (dz_T W_hh := dh_n)
    dc_t  = dc_{t+1}-carry + dh_t ⊙ o_t ⊙ (1 - tanh²(c_t))   (carry at T-1 := dc_n)
    dz^o  = dh_t ⊙ tanh(c_t) ⊙ o_t (1 - o_t)
    dz^i  = dc_t ⊙ g_t ⊙ i_t (1 - i_t)
    dz^f  = dc_t ⊙ c_{t-1} ⊙ f_t (1 - f_t)
    dz^g  = dc_t ⊙ i_t ⊙ (1 - g_t²)
    carry = dc_t ⊙ f_t                           (flows to c_{t-1})

and, summing over all steps, with dz [T, B, 4H]::

    dW_ih = Σ_t dz_tᵀ x_t        dW_hh = Σ_t dz_tᵀ h_{t-1}      db = Σ_{t,b} dz_t
    dx_t  = dz_t W_ih            dh0 = dz_0 W_hh                  dc0 = carry after t = 0

``db`` is the gradient of both b_ih and b_hh. The same recurrence, with per-step norms
‖dh_t‖ and ‖dc_t‖ (over batch and units), is what the kernels compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._cell_reference import rows


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) = 1 / (1 + e^{-z}), written so that no exponential overflows."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass
class Saved:
    """What forward keeps for backward: the reference's, and the cpu backend's, which
    keeps the same arrays in the input dtype."""

    x: np.ndarray  # [T, B, I]
    w_ih: np.ndarray  # [4H, I]
    w_hh: np.ndarray  # [4H, H]
    has_bias: bool
    gates: np.ndarray  # [T, B, 4H] activated i, f, g, o
    h: np.ndarray  # [T+1, B, H]; h[0] = h0, h[t+1] = h_t
    c: np.ndarray  # [T+1, B, H]; c[0] = c0, c[t+1] = c_t


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def forward(x, w_ih, w_hh, bias, h0, c0, training=True):
    """One LSTM layer in float64. Returns ``(y, h_n, c_n, saved)`` (see the module
    docstring for shapes); ``saved`` is None unless ``training``."""
    x, w_ih, w_hh, bias, h0, c0 = map(_f64, (x, w_ih, w_hh, bias, h0, c0))
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    b = np.zeros(4 * hidden) if bias is None else bias

    gates = np.empty((steps, batch, 4 * hidden))
    h = np.empty((steps + 1, batch, hidden))
    c = np.empty((steps + 1, batch, hidden))
    h[0], c[0] = h0, c0
    for t in range(steps):
        z = x[t] @ w_ih.T + h[t] @ w_hh.T + b
        zi, zf, zg, zo = np.split(z, 4, axis=1)
        i, f, g, o = sigmoid(zi), sigmoid(zf), np.tanh(zg), sigmoid(zo)
        c[t + 1] = f * c[t] + i * g
        h[t + 1] = o * np.tanh(c[t + 1])
        gates[t] = np.concatenate([i, f, g, o], axis=1)

    y = h[1:].copy()
    saved = Saved(x, w_ih, w_hh, bias is not None, gates, h, c) if training else None
    return y, h[steps].copy(), c[steps].copy(), saved


def backward(saved: Saved, dy, dh_n, dc_n, return_step_norms=False):
    """Backpropagation through time for :func:`forward`.

    Returns ``(dx, dw_ih, dw_hh, db, dh0, dc0)``, ``db`` None without bias. With
    ``return_step_norms``, two more arrays follow: ``dh_norms[t] = ‖∂L/∂h_t‖`` and
    ``dc_norms[t] = ‖∂L/∂c_t‖`` (Frobenius norm over batch and units, [T])."""
    dy, dh_n, dc_n = map(_f64, (dy, dh_n, dc_n))
    x, w_ih, w_hh = saved.x, saved.w_ih, saved.w_hh
    steps = x.shape[0]

    dz = np.empty_like(saved.gates)
    dh_norms = np.empty(steps)
    dc_norms = np.empty(steps)
    dh_next = dh_n  # gradient reaching h_t from step t+1 (and from h_n)
    carry = dc_n  # gradient reaching c_t from step t+1 (and from c_n)
    for t in reversed(range(steps)):
        i, f, g, o = np.split(saved.gates[t], 4, axis=1)
        c_prev, c_t = saved.c[t], saved.c[t + 1]
        tanh_c = np.tanh(c_t)

        dh = dy[t] + dh_next
        dc = carry + dh * o * (1.0 - tanh_c**2)
        dz[t] = np.concatenate(
            [
                dc * g * i * (1.0 - i),  # dz^i
                dc * c_prev * f * (1.0 - f),  # dz^f
                dc * i * (1.0 - g**2),  # dz^g
                dh * tanh_c * o * (1.0 - o),  # dz^o
            ],
            axis=1,
        )
        dh_norms[t], dc_norms[t] = np.linalg.norm(dh), np.linalg.norm(dc)
        carry = dc * f
        dh_next = dz[t] @ w_hh

    dx, dw_ih, dw_hh, db = _gradients_after_loop(dz, x, saved.h, w_ih, saved.has_bias)
    grads = (dx, dw_ih, dw_hh, db, dh_next, carry)
    return grads + (dh_norms, dc_norms) if return_step_norms else grads


def _gradients_after_loop(dz, x, h, w_ih, has_bias):
    """(dx, dW_ih, dW_hh, db) from the gate gradients dz [T, B, 4H] of every step: dx =
    dz·W_ih, dW_ih = dzᵀ·x and dW_hh = dzᵀ·h_prev over all T·B rows, db = Σ dz (None
    without a bias). h [T+1, B, H or P] holds h_prev = h[:-1]."""
    flat_dz = rows(dz)
    db = flat_dz.sum(axis=0) if has_bias else None
    return dz @ w_ih, flat_dz.T @ rows(x), flat_dz.T @ rows(h[:-1]), db


def saved_arrays(saved_dtype):
    """The :class:`Saved` of this module as arrays (rnnkernels/_backend.py's
    ``SavedArrays``): gates [T, B, 4H], h and c [T+1, B, H], all in
    ``saved_dtype(input dtype)`` (float64 here; the input dtype for the cpu backend)."""
    from ._backend import SavedArrays

    def layout(steps, batch, input_size, hidden, dtype):
        dtype = saved_dtype(np.dtype(dtype))
        return [((steps, batch, 4 * hidden), dtype), ((steps + 1, batch, hidden), dtype), ((steps + 1, batch, hidden), dtype)]

    def from_arrays(x, w_ih, w_hh, has_bias, arrays):
        dtype = saved_dtype(np.dtype(x.dtype))
        x, w_ih, w_hh = (np.ascontiguousarray(a, dtype=dtype) for a in (x, w_ih, w_hh))
        gates, h, c = (np.ascontiguousarray(a) for a in arrays)
        return Saved(x, w_ih, w_hh, has_bias, gates, h, c)

    return SavedArrays(layout, lambda saved: [saved.gates, saved.h, saved.c], from_arrays)


def _make_backend():
    from ._backend import Backend

    return Backend(
        name="reference",
        device="cpu",
        compute_dtypes=("float16", "float32", "float64"),
        forward=forward,
        backward=backward,
        saved_arrays=saved_arrays(lambda dtype: np.dtype(np.float64)),
    )


BACKEND = _make_backend()


# ----------------------------------------------------------------------------- projections
#
# proj_size (torch.nn.LSTM's LSTMP, as in cuDNN): the hidden state is projected,
#
#     r_t = o_t ⊙ tanh(c_t)                  [B, H]
#     h_t = r_t W_hrᵀ                        [B, P],  W_hr [P, H]
#
# and the recurrence reads the projected h: W_hh is [4H, P], h0 [B, P], c0 [B, H],
# y [T, B, P]. Backward, per step: dh_t = dy_t + dz_{t+1} W_hh (P wide), then
# dr_t = dh_t W_hr takes the place of dh_t in the cell's backward above, and
# dW_hr = Σ_t dh_tᵀ r_t.


@dataclass
class SavedProjected:
    """What :func:`forward_projected` keeps for :func:`backward_projected`."""

    x: np.ndarray  # [T, B, I]
    w_ih: np.ndarray  # [4H, I]
    w_hh: np.ndarray  # [4H, P]
    w_hr: np.ndarray  # [P, H]
    has_bias: bool
    gates: np.ndarray  # [T, B, 4H] activated i, f, g, o
    h: np.ndarray  # [T+1, B, P]; h[0] = h0, h[t+1] = h_t (projected)
    c: np.ndarray  # [T+1, B, H]; c[0] = c0


def forward_projected(x, w_ih, w_hh, bias, w_hr, h0, c0, training=True, dtype=np.float64):
    """One LSTM layer with a projection (see above), computed in ``dtype`` (float64:
    the reference; the cpu backend calls it in its input dtype). Returns ``(y, h_n,
    c_n, saved)``, ``saved`` None unless ``training``."""
    x, w_ih, w_hh, bias, w_hr, h0, c0 = (None if a is None else np.asarray(a, dtype=dtype) for a in (x, w_ih, w_hh, bias, w_hr, h0, c0))
    steps, batch, _ = x.shape
    hidden, proj = w_hr.shape[1], w_hr.shape[0]
    gates = (x.reshape(steps * batch, -1) @ w_ih.T).reshape(steps, batch, 4 * hidden)
    if bias is not None:
        gates += bias
    h = np.empty((steps + 1, batch, proj), dtype)
    c = np.empty((steps + 1, batch, hidden), dtype)
    h[0], c[0] = h0, c0
    for t in range(steps):
        z = gates[t] + h[t] @ w_hh.T
        zi, zf, zg, zo = np.split(z, 4, axis=1)
        i, f, g, o = sigmoid(zi), sigmoid(zf), np.tanh(zg), sigmoid(zo)
        c[t + 1] = f * c[t] + i * g
        h[t + 1] = (o * np.tanh(c[t + 1])) @ w_hr.T
        gates[t] = np.concatenate([i, f, g, o], axis=1)
    saved = SavedProjected(x, w_ih, w_hh, w_hr, bias is not None, gates, h, c) if training else None
    return h[1:].copy(), h[steps].copy(), c[steps].copy(), saved


def backward_projected(saved: SavedProjected, dy, dh_n, dc_n):
    """Backpropagation through time for :func:`forward_projected`. Returns ``(dx,
    dw_ih, dw_hh, db, dw_hr, dh0, dc0)``, ``db`` None without bias; in the forward's
    dtype."""
    dtype = saved.x.dtype
    dy, dh_n, dc_n = (np.asarray(a, dtype=dtype) for a in (dy, dh_n, dc_n))
    x, w_ih, w_hh, w_hr = saved.x, saved.w_ih, saved.w_hh, saved.w_hr
    steps = x.shape[0]
    dz = np.empty_like(saved.gates)
    dw_hr = np.zeros_like(w_hr)
    dh_next, carry = dh_n, dc_n
    for t in reversed(range(steps)):
        i, f, g, o = np.split(saved.gates[t], 4, axis=1)
        c_prev, c_t = saved.c[t], saved.c[t + 1]
        tanh_c = np.tanh(c_t)
        dh = dy[t] + dh_next  # [B, P]
        dw_hr += dh.T @ (o * tanh_c)
        dr = dh @ w_hr  # [B, H]: the cell's dh
        dc = carry + dr * o * (1 - tanh_c**2)
        dz[t] = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g**2), dr * tanh_c * o * (1 - o)], axis=1)
        carry = dc * f
        dh_next = dz[t] @ w_hh
    dx, dw_ih, dw_hh, db = _gradients_after_loop(dz, x, saved.h, w_ih, saved.has_bias)
    return dx, dw_ih, dw_hh, db, dw_hr, dh_next, carry
