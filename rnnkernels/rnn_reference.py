r"""The float64 NumPy reference Elman RNN (tanh or ReLU): the definition its backends
will be checked against, and the ungated baseline of the gradient-flow report.

Part of issue 15 (GRU and Elman RNN on every backend). This module is the cell's
reference only; the public API (``rnn_forward`` / ``rnn_backward``), the backends and
the modules are to follow in the generic three-cell design. Tests:
``tests/test_cell_references.py`` (against ``torch.nn.RNN``, torch autograd and central
finite differences).

It is written to read like the equations, not to be fast.

Layouts (exactly ``torch.nn.RNN``, so its weights load unchanged)::

    x     [T, B, I]    input sequence, time-major
    w_ih  [H, I]       w_hh [H, H]
    b_ih  [H]          b_hh [H]      (each may be None: zero)
    h0    [B, H]       (None: zero)

Forward, for t = 0 .. T-1, with h_{-1} = h0 and act = tanh or relu::

    a_t = x_t W_ihᵀ + h_{t-1} W_hhᵀ + b_ih + b_hh            [B, H]
    h_t = act(a_t)            y_t = h_t

Outputs: y [T, B, H], h_n = h_{T-1}. The two biases only ever appear summed here (unlike
the GRU's, see ``gru_reference``), so they are added once.

Saved for backward: x, the weights, which biases exist, the nonlinearity, and every hidden
state h_{-1} .. h_{T-1} as one [T+1, B, H] array whose index 0 is the initial state. The
activation's derivative is read off h_t: tanh'(a) = 1 − h_t², and for relu da_t = 0 where
h_t <= 0 and dh_t elsewhere, exactly as PyTorch's ReLU backward (``threshold_backward``):
relu'(0) = 0, an infinite or NaN dh_t still gives 0 where h_t <= 0, a NaN h_t passes dh_t.

Backward through time. With dh_t = ∂L/∂h_t, for t = T-1 .. 0::

    dh_t = dy_t + da_{t+1} W_hh                  (da_T W_hh := dh_n)
    da_t = dh_t ⊙ act'(a_t)

and, summing over all steps::

    dW_ih = Σ_t da_tᵀ x_t    dW_hh = Σ_t da_tᵀ h_{t-1}    db_ih = db_hh = Σ_{t,b} da_t
    dx_t  = da_t W_ih        dh0 = da_0 W_hh

So ∂L/∂h_{t-1} = ∂L/∂h_t · diag(act'(a_t)) · W_hh: a product of T Jacobians whose
norms are at most ‖W_hh‖ (tanh' ≤ 1, relu' ∈ {0, 1}). Unless W_hh's singular values sit
near one and the units stay out of saturation, the product shrinks (or grows)
geometrically in t: the vanishing (exploding) gradient of Hochreiter (1991) and Bengio,
Simard & Frasconi (1994). ``dh_norms[t] = ‖dh_t‖`` (over batch and units) shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._cell_reference import layer_inputs, rows, upstream

NONLINEARITIES = ("tanh", "relu")


@dataclass
class Saved:
    """What :func:`forward` keeps for :func:`backward`, all float64."""

    x: np.ndarray  # [T, B, I]
    w_ih: np.ndarray  # [H, I]
    w_hh: np.ndarray  # [H, H]
    has_b_ih: bool
    has_b_hh: bool
    nonlinearity: str  # "tanh" or "relu"
    h: np.ndarray  # [T+1, B, H]; h[0] = h0, h[t+1] = h_t


def forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, *, nonlinearity="tanh", training=True):
    """One Elman RNN layer in float64. Returns ``(y, h_n, saved)`` (see the module
    docstring for shapes); ``saved`` is None unless ``training``."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    x, w_ih, w_hh, b_ih, b_hh, h0 = layer_inputs(x, w_ih, w_hh, b_ih, b_hh, h0, gates=1)
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]

    b = np.zeros(hidden)
    for bias in (b_ih, b_hh):
        if bias is not None:
            b = b + bias
    act = np.tanh if nonlinearity == "tanh" else (lambda a: np.maximum(a, 0.0))

    h = np.empty((steps + 1, batch, hidden))
    h[0] = 0.0 if h0 is None else h0
    for t in range(steps):
        h[t + 1] = act(x[t] @ w_ih.T + h[t] @ w_hh.T + b)

    saved = Saved(x, w_ih, w_hh, b_ih is not None, b_hh is not None, nonlinearity, h) if training else None
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

    da = np.empty((steps, batch, hidden))
    dh_norms = np.empty(steps)
    dh_next = np.zeros((batch, hidden)) if dh_n is None else dh_n  # reaches h_t from step t+1
    for t in reversed(range(steps)):
        dh = dh_next if dy is None else dy[t] + dh_next
        dh_norms[t] = np.linalg.norm(dh)
        if saved.nonlinearity == "tanh":
            da[t] = dh * (1.0 - h[t + 1] ** 2)
        else:
            # PyTorch's threshold_backward: 0 where h_t <= 0 (relu'(0) = 0, and exactly 0
            # even for an infinite or NaN dh), dh elsewhere, a NaN h_t included.
            da[t] = np.where(h[t + 1] <= 0.0, 0.0, dh)
        dh_next = da[t] @ w_hh

    flat_da = da.reshape(-1, hidden)
    dx = da @ w_ih
    dw_ih = flat_da.T @ rows(x)
    dw_hh = flat_da.T @ rows(h[:-1])
    db = flat_da.sum(axis=0)
    grads = (dx, dw_ih, dw_hh, db if saved.has_b_ih else None, db.copy() if saved.has_b_hh else None, dh_next)
    return grads + (dh_norms,) if return_step_norms else grads


# ----------------------------------------------------------------------------- backends
#
# The reference as backends of the generic API (rnnkernels/_backend.py), one per
# nonlinearity (the cells "rnn_tanh" and "rnn_relu", as cuDNN's RNN_TANH / RNN_RELU
# modes): the API hands them the folded bias b_ih + b_hh and takes db back.


def _make_backend(nonlinearity: str):
    from ._backend import Backend, SavedArrays

    def backend_forward(x, w_ih, w_hh, bias, h0, training=True):
        return forward(x, w_ih, w_hh, bias, None, h0, nonlinearity=nonlinearity, training=training)

    def backend_backward(saved: Saved, dy, dh_n, return_step_norms=False):
        dx, dw_ih, dw_hh, db, _, dh0, *norms = backward(saved, dy, dh_n, return_step_norms)
        return (dx, dw_ih, dw_hh, db, dh0, *norms)

    def layout(steps, batch, input_size, hidden, dtype):
        return [((steps + 1, batch, hidden), np.dtype(np.float64))]

    def from_arrays(x, w_ih, w_hh, has_bias, arrays):
        x, w_ih, w_hh, h = (np.ascontiguousarray(a, dtype=np.float64) for a in (x, w_ih, w_hh, *arrays))
        # backend_forward passes the folded bias as b_ih and no b_hh
        return Saved(x, w_ih, w_hh, has_bias, False, nonlinearity, h)

    return Backend(
        name="reference",
        device="cpu",
        compute_dtypes=("float16", "float32", "float64"),
        forward=backend_forward,
        backward=backend_backward,
        # Saved as arrays: h [T+1, B, H], float64 (rnnkernels/_backend.py's SavedArrays)
        saved_arrays=SavedArrays(layout, lambda saved: [saved.h], from_arrays),
    )


TANH_BACKEND = _make_backend("tanh")
RELU_BACKEND = _make_backend("relu")
