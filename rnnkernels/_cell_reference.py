"""What the float64 cell references share: the input checks and conversions of
``gru_reference.py`` and ``rnn_reference.py``, and, with ``reference.py`` (the LSTM)
too, the flattening of [T, B, .] arrays for the all-steps weight gradients. Each cell
module keeps only its equations."""

from __future__ import annotations

import numpy as np


def float64_copy(name, a):
    """``a`` as a fresh float64 array (None stays None). A copy even when it already is
    float64, so that what is saved cannot change if the caller later writes to its input."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    return np.array(a, dtype=np.float64)


def check_shape(name, a, shape):
    if a is not None and a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")


def layer_inputs(x, w_ih, w_hh, b_ih, b_hh, h0, gates: int):
    """float64 copies of a layer's inputs, checked against torch.nn's layouts for a cell
    of ``gates`` row blocks: x [T, B, I], w_ih [gates·H, I], w_hh [gates·H, H], biases
    [gates·H], h0 [B, H] (biases and h0 may be None)."""
    names = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0")
    x, w_ih, w_hh, b_ih, b_hh, h0 = (float64_copy(n, a) for n, a in zip(names, (x, w_ih, w_hh, b_ih, b_hh, h0)))
    if x.ndim != 3:
        raise ValueError(f"x must be [T, B, I], got shape {x.shape}")
    rows = "H" if gates == 1 else f"{gates}H"
    if w_hh.ndim != 2 or w_hh.shape[0] != gates * w_hh.shape[1]:
        raise ValueError(f"w_hh must be [{rows}, H], got shape {w_hh.shape}")
    _, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    for name, a, shape in (("w_ih", w_ih, (gates * hidden, input_size)), ("b_ih", b_ih, (gates * hidden,)),
                           ("b_hh", b_hh, (gates * hidden,)), ("h0", h0, (batch, hidden))):
        check_shape(name, a, shape)
    return x, w_ih, w_hh, b_ih, b_hh, h0


def upstream(dy, dh_n, steps: int, batch: int, hidden: int):
    """float64 copies of backward's upstream gradients, checked (None stays None: zero)."""
    dy, dh_n = float64_copy("dy", dy), float64_copy("dh_n", dh_n)
    check_shape("dy", dy, (steps, batch, hidden))
    check_shape("dh_n", dh_n, (batch, hidden))
    return dy, dh_n


def rows(a):
    """[T, B, K] as [T·B, K]; not reshape(-1, K), which fails for T·B·K = 0 (K may be 0:
    input_size 0)."""
    return a.reshape(a.shape[0] * a.shape[1], a.shape[2])
