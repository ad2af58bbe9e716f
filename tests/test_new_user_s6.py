"""What a new user hit trying rnnkernels on inputs the other tests do not cover
(session 6's independent check).

NumPy arrays in non-native byte order (``>f4`` on x86: data read from a FITS or HDF5
file, ``np.load`` of a file written on a big-endian machine, ``np.frombuffer(...,
">f4")``) are float32 numbers like any other, and the reference backend takes them.
The cpu backend handed them to Numba as they came, which cannot type them: a Numba
``TypingError`` from deep inside the packed product instead of a result (and a mix of
``>f4`` and ``<f4`` arguments was refused as two dtypes)."""

from __future__ import annotations

import numpy as np
import pytest

import rnnkernels

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _problem(cell, dtype, seed=0, steps=5, batch=3, input_size=7, hidden=9):
    rng = np.random.default_rng(seed)
    gates = GATES[cell]
    x = rng.standard_normal((steps, batch, input_size)).astype(dtype)
    w_ih = (rng.standard_normal((gates * hidden, input_size)) / 3).astype(dtype)
    w_hh = (rng.standard_normal((gates * hidden, hidden)) / 3).astype(dtype)
    b_ih = (rng.standard_normal(gates * hidden) / 3).astype(dtype)
    b_hh = (rng.standard_normal(gates * hidden) / 3).astype(dtype)
    h0 = rng.standard_normal((batch, hidden)).astype(dtype)
    arrays = {"x": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "h0": h0}
    if cell == "lstm":
        arrays["c0"] = h0[::-1].copy()
    return arrays


def _run(cell, arrays, backend="cpu"):
    out = getattr(rnnkernels, f"{cell}_forward")(**arrays, backend=backend)
    dy = np.ones(out.y.shape, out.y.dtype.newbyteorder("="))
    grads = getattr(rnnkernels, f"{cell}_backward")(out, dy=dy)
    results = {"y": out.y, "h_n": out.h_n}
    results.update({name: getattr(grads, name) for name in ("dx", "dw_ih", "dw_hh", "db_ih", "db_hh", "dh0")})
    return results


@pytest.mark.parametrize("cell", sorted(GATES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_native_byte_order_gives_the_native_arrays_bits(cell, dtype):
    native = _problem(cell, dtype)
    swapped = {name: a.astype(a.dtype.newbyteorder("S")) for name, a in native.items()}
    # One argument in each order: the same numbers, so one dtype.
    mixed = dict(swapped, w_hh=native["w_hh"])
    expected = _run(cell, native)
    for arrays in (swapped, mixed):
        kept = {name: a.copy() for name, a in arrays.items()}
        got = _run(cell, arrays)
        for name, want in expected.items():
            assert got[name].dtype == np.dtype(dtype), (name, got[name].dtype)  # results in native order
            assert np.array_equal(got[name], want), name
        for name, a in arrays.items():  # inputs never written, their byte order kept
            assert a.dtype == kept[name].dtype and np.array_equal(a, kept[name]), name
