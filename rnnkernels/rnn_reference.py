r"""A plain tanh RNN in float64 NumPy: the ungated baseline for the gradient-flow report.

Layouts (``torch.nn.RNN`` with ``nonlinearity="tanh"``)::

    x     [T, B, I]    input sequence, time-major
    w_ih  [H, I]       w_hh [H, H]       bias [H] (b_ih + b_hh)       h0 [B, H]

Forward, for t = 0 .. T-1, with h_{-1} = h0::

    h_t = tanh(x_t W_ihᵀ + h_{t-1} W_hhᵀ + b)

Backward through time. With dh_t = ∂L/∂h_t, for t = T-1 .. 0::

    dh_t = dy_t + dz_{t+1} W_hh                  (dz_T W_hh := dh_n)
    dz_t = dh_t ⊙ (1 − h_t²)

    dW_ih = Σ_t dz_tᵀ x_t    dW_hh = Σ_t dz_tᵀ h_{t-1}    db = Σ_{t,b} dz_t
    dx_t  = dz_t W_ih        dh0 = dz_0 W_hh

So ∂L/∂h_{t-1} = ∂L/∂h_t · diag(1 − h_t²) · W_hh: a product of T Jacobians whose
norms are at most ‖W_hh‖. Unless W_hh's singular values sit near one and the units
stay out of saturation, the product shrinks (or grows) geometrically in t: the
vanishing gradient of Hochreiter (1991) and Bengio, Simard & Frasconi (1994).
``dh_norms[t] = ‖dh_t‖`` (over batch and units) shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RNNGrads:
    dx: np.ndarray  # [T, B, I]
    dw_ih: np.ndarray  # [H, I]
    dw_hh: np.ndarray  # [H, H]
    db: np.ndarray  # [H], the gradient of b_ih and of b_hh
    dh0: np.ndarray  # [B, H]
    dh_norms: np.ndarray  # [T], ‖∂L/∂h_t‖


def forward(x, w_ih, w_hh, bias=None, h0=None) -> np.ndarray:
    """All hidden states as one [T+1, B, H] float64 array: index 0 is h0, index t+1 is
    h_t (so ``y = h[1:]`` and ``h_n = h[-1]``)."""
    x, w_ih, w_hh = (np.asarray(a, dtype=np.float64) for a in (x, w_ih, w_hh))
    steps, batch, _ = x.shape
    hidden = w_hh.shape[0]
    b = np.zeros(hidden) if bias is None else np.asarray(bias, dtype=np.float64)
    h = np.empty((steps + 1, batch, hidden))
    h[0] = 0.0 if h0 is None else h0
    for t in range(steps):
        h[t + 1] = np.tanh(x[t] @ w_ih.T + h[t] @ w_hh.T + b)
    return h


def backward(x, w_ih, w_hh, h, dy=None, dh_n=None) -> RNNGrads:
    """BPTT for :func:`forward`, given its states ``h`` [T+1, B, H] and the upstream
    gradients ``dy`` [T, B, H] and ``dh_n`` [B, H] (None means zero)."""
    x, w_ih, w_hh = (np.asarray(a, dtype=np.float64) for a in (x, w_ih, w_hh))
    steps, batch, _ = x.shape
    hidden = w_hh.shape[0]
    dy = np.zeros((steps, batch, hidden)) if dy is None else np.asarray(dy, dtype=np.float64)
    dh_next = np.zeros((batch, hidden)) if dh_n is None else np.asarray(dh_n, dtype=np.float64)

    dz = np.empty((steps, batch, hidden))
    dh_norms = np.empty(steps)
    for t in reversed(range(steps)):
        dh = dy[t] + dh_next
        dh_norms[t] = np.linalg.norm(dh)
        dz[t] = dh * (1.0 - h[t + 1] ** 2)
        dh_next = dz[t] @ w_hh

    flat_dz = dz.reshape(-1, hidden)
    return RNNGrads(
        dx=dz @ w_ih,
        dw_ih=flat_dz.T @ x.reshape(-1, x.shape[2]),
        dw_hh=flat_dz.T @ h[:-1].reshape(-1, hidden),
        db=flat_dz.sum(axis=0),
        dh0=dh_next,
        dh_norms=dh_norms,
    )
