"""What a new user hit trying rnnkernels on inputs the other tests do not cover
(session 6's independent check).

NumPy arrays in non-native byte order (``>f4`` on x86: data read from a FITS or HDF5
file, ``np.load`` of a file written on a big-endian machine, ``np.frombuffer(...,
">f4")``) are float32 numbers like any other, and the reference backend takes them.
The cpu backend handed them to Numba as they came, which cannot type them: a Numba
``TypingError`` from deep inside the packed product instead of a result (and a mix of
``>f4`` and ``<f4`` arguments was refused as two dtypes; the NumPy modules refused
``>f4`` input to float32 parameters).

The NumPy modules (``rnnkernels.LSTM``, ``GRU``, ``RNN``) could not be pickled once
they had run a forward (below)."""

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


@pytest.mark.parametrize("module", ["LSTM", "GRU"])
def test_numpy_module_takes_non_native_byte_order(module):
    layer = getattr(rnnkernels, module)(7, 9, backend="cpu", seed=0)
    x = _problem(module.lower(), np.float32)["x"]
    want = layer(x)[0]
    assert np.array_equal(layer(x.astype(">f4"))[0], want)


# The NumPy modules keep their last forward's state for ``backward`` (the torch modules
# keep none: autograd does). That state holds the cell's Backend, whose functions are
# wrapped (``_cpu_threading.one_launch_at_a_time``) under their original names, so
# pickle found another object under the name and refused: a module could not be
# pickled once it had run (``multiprocessing``, ``joblib``, a checkpoint), while
# ``copy.deepcopy`` worked.
@pytest.mark.parametrize("module", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_numpy_module_pickles_after_forward_and_its_copy_runs_backward(module, backend):
    import pickle

    layer = getattr(rnnkernels, module)(5, 8, num_layers=2, bidirectional=True, backend=backend, seed=0)
    x = np.random.default_rng(1).standard_normal((4, 3, 5)).astype(np.float32)
    y = layer(x)[0]
    copy = pickle.loads(pickle.dumps(layer))
    dy = np.ones_like(y)
    want, got = layer.backward(dy), copy.backward(dy)
    for name in ("dx", "dh0"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    for name, grad in want.params.items():
        assert np.array_equal(got.params[name], grad), name
    assert np.array_equal(copy(x)[0], y)


# NUMBA_DISABLE_JIT=1 (Numba's switch for debugging jitted code in Python) leaves the
# cpu backend's hand-written LLVM (the packed tile, the atomics) with no compiler: the
# first call raised "NotImplementedError: <intrinsic tile> is not usable in
# pure-python" from deep inside, for backend "cpu" and for "auto" (cpu on the host).
# A backend that cannot run here says why and what to do (_backend.Backend's
# check_available), before any work; the reference backend still runs.
NO_JIT_CHILD = r"""
import sys
sys.path.insert(0, {repo!r})
import numpy as np
import rnnkernels

x = np.ones((3, 2, 4), np.float32)
for cell, gates in (("lstm", 4), ("gru", 3), ("rnn", 1)):
    forward = getattr(rnnkernels, cell + "_forward")
    w_ih, w_hh = np.full((gates * 5, 4), 0.1, np.float32), np.full((gates * 5, 5), 0.1, np.float32)
    for backend in ("cpu", "auto"):
        try:
            forward(x, w_ih, w_hh, backend=backend)
        except RuntimeError as error:
            assert "NUMBA_DISABLE_JIT" in str(error) and "reference" in str(error), str(error)
        else:
            raise AssertionError(f"{{cell}} on {{backend}} ran with the JIT disabled")
    forward(x, w_ih, w_hh, backend="reference")
print("ok")
"""


def test_cpu_backend_with_numbas_jit_disabled_says_so():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    child = subprocess.run(
        [sys.executable, "-c", NO_JIT_CHILD.format(repo=str(Path(__file__).resolve().parents[1]))],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip().endswith("ok")


@pytest.mark.parametrize("cell", sorted(GATES))
def test_functional_output_pickles_and_its_copy_runs_backward(cell):
    # The same Backend inside lstm_forward's output: send it to another process, or
    # checkpoint it, and run the backward there.
    import pickle

    arrays = _problem(cell, np.float32, seed=3)
    out = getattr(rnnkernels, f"{cell}_forward")(**arrays, backend="cpu")
    backward = getattr(rnnkernels, f"{cell}_backward")
    dy = np.ones_like(out.y)
    want, got = backward(out, dy=dy), backward(pickle.loads(pickle.dumps(out)), dy=dy)
    for name in ("dx", "dw_ih", "dw_hh", "db_ih", "dh0"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name


def test_backend_copies_are_itself_registered_or_not():
    # A Backend pickles by where cells.py registers it, and refuses to pickle otherwise
    # (its functions have no importable names). copy.copy and copy.deepcopy go through
    # the same __reduce__, so they began to raise for a Backend made outside cells.py
    # (dataclasses.replace of a registered one, a test's stand-in), which they had
    # copied before. A Backend is immutable functions and names: its copy is itself.
    import copy
    import dataclasses

    from rnnkernels import reference

    made = dataclasses.replace(reference.BACKEND, name="stand-in")
    for backend in (made, reference.BACKEND):
        assert copy.copy(backend) is backend
        assert copy.deepcopy(backend) is backend
    with pytest.raises(TypeError, match="not registered"):
        import pickle

        pickle.dumps(made)
