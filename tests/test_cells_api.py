"""The GRU's and the Elman RNN's public API (issue 15), on every backend that implements
them: forward and every gradient against torch.nn.GRU / torch.nn.RNN (float64) and the
float64 references, the folded bias, validation, edge shapes, and the generic
``cell_forward`` / ``cell_backward`` the modules and tools use. The LSTM's own grid is
tests/test_api.py; the two share one implementation (``rnnkernels/_api.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err, torch_or_skip

import rnnkernels
from rnnkernels import _api, cells

HIDDEN_CELLS = ["gru", "rnn_tanh", "rnn_relu"]


def implemented(cell: str, host_only=False) -> list:
    """The backends that implement ``cell`` here (the emulated one on small shapes,
    marked as such; cuda only with a GPU, in the GPU tests)."""
    out = []
    for name in ("reference", "cpu", "emulated"):
        if cells.get(cell).implementation(name) is None:
            continue
        if name == "emulated":
            if host_only:
                continue
            from rnnkernels import emulator

            out.append(pytest.param(name, marks=[pytest.mark.emulated, pytest.mark.skipif(
                not emulator.compiler_available(), reason="no C++ compiler for the emulator")]))
        else:
            out.append(name)
    return out


# A backend given as pytest.param (the emulated one) must stay one at the top level, its
# marks on the (cell, backend) pair: nested in a tuple it would reach the test as is.
GRID = [pytest.param(cell, *backend.values, marks=backend.marks) if hasattr(backend, "marks") else (cell, backend)
        for cell in HIDDEN_CELLS for backend in implemented(cell)]


def _pair(param) -> tuple[tuple, tuple]:
    """((cell, backend), marks) of a GRID entry."""
    return (tuple(param.values), tuple(param.marks)) if hasattr(param, "marks") else (param, ())


# The same pairs with each dtype the backend takes among float32 / float64.
GRID_DTYPES = [
    pytest.param(cell, backend, dtype, marks=marks)
    for (cell, backend), marks in map(_pair, GRID)
    for dtype in ("float32", "float64")
    if dtype in cells.get(cell).implementation(backend).compute_dtypes
]


def make(cell: str, steps, batch, input_size, hidden, *, dtype=np.float64, bias=True, state=True, seed=0):
    """Inputs for the cell's forward with torch.nn's default scale U(±1/√H)."""
    rng = np.random.default_rng(seed)
    gates = cells.get(cell).gates
    bound = 1.0 / np.sqrt(hidden)

    def u(*shape):
        return rng.uniform(-bound, bound, shape).astype(dtype)

    return {
        "x": rng.standard_normal((steps, batch, input_size)).astype(dtype),
        "w_ih": u(gates * hidden, input_size),
        "w_hh": u(gates * hidden, hidden),
        "b_ih": u(gates * hidden) if bias else None,
        "b_hh": u(gates * hidden) if bias else None,
        "h0": (rng.standard_normal((batch, hidden)) * 0.5).astype(dtype) if state else None,
    }


def forward(cell: str, problem: dict, **kwargs):
    if cell == "gru":
        return rnnkernels.gru_forward(**problem, **kwargs)
    return rnnkernels.rnn_forward(**problem, nonlinearity=cell.removeprefix("rnn_"), **kwargs)


def backward(cell: str, out, dy=None, dh_n=None, **kwargs):
    fn = rnnkernels.gru_backward if cell == "gru" else rnnkernels.rnn_backward
    return fn(out, dy, dh_n, **kwargs)


def torch_layer(cell: str, problem: dict):
    """torch.nn.GRU / RNN (float64) with the problem's weights; returns (y, h_n, params, x, h0)."""
    torch = torch_or_skip()
    input_size = problem["x"].shape[2]
    hidden = problem["w_hh"].shape[1]
    bias = problem["b_ih"] is not None
    if cell == "gru":
        layer = torch.nn.GRU(input_size, hidden, bias=bias, dtype=torch.float64)
    else:
        layer = torch.nn.RNN(input_size, hidden, bias=bias, nonlinearity=cell.removeprefix("rnn_"),
                             dtype=torch.float64)
    with torch.no_grad():
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            if problem[name] is not None:
                getattr(layer, name.replace("w_", "weight_").replace("b_", "bias_") + "_l0").copy_(
                    torch.from_numpy(np.asarray(problem[name], np.float64)))
    x = torch.tensor(np.asarray(problem["x"], np.float64), requires_grad=True)
    h0 = torch.tensor(np.asarray(problem["h0"], np.float64)[None], requires_grad=True)
    y, h_n = layer(x, h0)
    return layer, x, h0, y, h_n[0]


TOL = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3}


def _tol(backend: str, dtype) -> float:
    return 1e-10 if backend == "reference" else TOL[np.dtype(dtype).name]


@pytest.mark.parametrize("cell, backend, dtype", GRID_DTYPES, ids=lambda v: str(v))
def test_matches_torch_forward_and_every_gradient(cell, backend, dtype):
    torch = torch_or_skip()
    steps, batch, input_size, hidden = 7, 3, 5, 9
    problem = make(cell, steps, batch, input_size, hidden, dtype=dtype)
    rng = np.random.default_rng(3)
    dy = rng.standard_normal((steps, batch, hidden)).astype(dtype)
    dh_n = rng.standard_normal((batch, hidden)).astype(dtype)

    out = forward(cell, problem, backend=backend)
    grads = backward(cell, out, dy, dh_n)

    layer, x, h0, y, h_n = torch_layer(cell, problem)
    torch.autograd.backward([y, h_n], [torch.from_numpy(dy.astype(np.float64)), torch.from_numpy(dh_n.astype(np.float64))])
    tol = _tol(backend, dtype)
    assert rel_err(out.y, y.detach().numpy()) < tol
    assert rel_err(out.h_n, h_n.detach().numpy()) < tol
    expected = {
        "dx": x.grad, "dh0": h0.grad[0], "dw_ih": layer.weight_ih_l0.grad, "dw_hh": layer.weight_hh_l0.grad,
        "db_ih": layer.bias_ih_l0.grad, "db_hh": layer.bias_hh_l0.grad,
    }
    for name, want in expected.items():
        assert rel_err(getattr(grads, name), want.numpy()) < 10 * tol, name


@pytest.mark.parametrize("cell, backend", GRID, ids=lambda v: str(v))
@pytest.mark.parametrize("bias, state", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (2, 5, 3, 17), (5, 2, 0, 4)], ids=str)
def test_against_reference_edge_sizes(cell, backend, bias, state, sizes):
    """Odd sizes (H = 1, 17; I = 0; T = 1; B = 1), missing biases and states, step norms,
    against the float64 reference called directly with the two biases unfolded."""
    from rnnkernels import gru_reference, rnn_reference

    dtype = np.float64 if "float64" in _api.get_backend(backend, cell).compute_dtypes else np.float32
    steps, batch, input_size, hidden = sizes
    problem = make(cell, steps, batch, input_size, hidden, dtype=dtype, bias=bias, state=state, seed=5)
    rng = np.random.default_rng(7)
    dy = rng.standard_normal((steps, batch, hidden)).astype(dtype)
    dh_n = rng.standard_normal((batch, hidden)).astype(dtype)

    out = forward(cell, problem, backend=backend)
    grads = backward(cell, out, dy, dh_n, return_step_norms=True)
    if cell == "gru":
        y, h_n, saved = gru_reference.forward(**problem)
    else:
        y, h_n, saved = rnn_reference.forward(**problem, nonlinearity=cell.removeprefix("rnn_"))
    ref = (gru_reference if cell == "gru" else rnn_reference).backward(saved, dy, dh_n, return_step_norms=True)
    tol = _tol(backend, dtype)
    assert rel_err(out.y, y) < tol and rel_err(out.h_n, h_n) < tol
    for got, want in zip((grads.dx, grads.dw_ih, grads.dw_hh, grads.db_ih, grads.db_hh, grads.dh0, grads.dh_norms), ref):
        if want is None:
            assert got is None
        else:
            assert rel_err(got, want) < 10 * tol
    assert grads.dstates == (grads.dh0,) and grads.step_norms == (grads.dh_norms,)
    if bias:
        assert grads.db_ih is not grads.db_hh


@pytest.mark.parametrize("cell, backend", GRID, ids=lambda v: str(v))
def test_batch_first_and_inputs_unmodified(cell, backend):
    dtype = np.float32
    problem = make(cell, 4, 3, 5, 6, dtype=dtype)
    copies = {k: None if v is None else v.copy() for k, v in problem.items()}
    plain = forward(cell, problem, backend=backend)
    first = dict(problem, x=np.ascontiguousarray(problem["x"].transpose(1, 0, 2)))
    out = forward(cell, first, backend=backend, batch_first=True)
    np.testing.assert_array_equal(out.y, plain.y.transpose(1, 0, 2))
    dy = np.ones((3, 4, 6), dtype)
    g_first = backward(cell, out, dy)
    g_plain = backward(cell, plain, np.ascontiguousarray(dy.transpose(1, 0, 2)))
    np.testing.assert_array_equal(g_first.dx, g_plain.dx.transpose(1, 0, 2))
    np.testing.assert_array_equal(g_first.dw_hh, g_plain.dw_hh)
    for name, value in copies.items():
        if value is not None:
            np.testing.assert_array_equal(problem[name], value, err_msg=name)


def test_gru_folded_bias_layout():
    """The folded bias the backends get: [b_ir + b_hr, b_iz + b_hz, b_in, b_hn]; its
    gradient unfolds to db_ih and db_hh that agree on r, z and differ on n."""
    hidden = 3
    b_ih, b_hh = np.arange(9.0), 100 + np.arange(9.0)
    folded = cells.GRU.fold_bias(b_ih, b_hh, np)
    np.testing.assert_array_equal(folded, np.concatenate([b_ih[:6] + b_hh[:6], b_ih[6:], b_hh[6:]]))
    db = np.arange(4.0 * hidden)
    db_ih, db_hh = cells.GRU.unfold_grad(db, np)
    np.testing.assert_array_equal(db_ih, db[:9])
    np.testing.assert_array_equal(db_hh, np.concatenate([db[:6], db[9:]]))
    for cell in (cells.LSTM, cells.RNN_TANH):
        a, b = cell.unfold_grad(db, np)
        np.testing.assert_array_equal(a, b)
        assert a is not b


@pytest.mark.parametrize("cell, backend", [(c, b) for c in HIDDEN_CELLS for b in implemented(c, host_only=True)])
def test_empty_shapes(cell, backend):
    for steps, batch in ((0, 3), (4, 0)):
        problem = make(cell, steps, batch, 5, 6, dtype=np.float32)
        out = forward(cell, problem, backend=backend)
        assert out.y.shape == (steps, batch, 6) and out.h_n.shape == (batch, 6)
        grads = backward(cell, out, return_step_norms=True)
        gates = cells.get(cell).gates
        assert grads.dw_hh.shape == (gates * 6, 6) and grads.db_ih.shape == (gates * 6,)
        assert grads.db_hh.shape == (gates * 6,) and grads.dx.shape == (steps, batch, 5)
        assert grads.dh_norms.shape == (steps,)


@pytest.mark.parametrize(
    "cell, changes, error, words",
    [
        ("gru", dict(w_hh=np.zeros((16, 4))), ValueError, ["w_hh", "[3H, H]", "r, z, n"]),
        ("gru", dict(w_ih=np.zeros((9, 5))), ValueError, ["w_ih", "[3H, I]"]),
        ("gru", dict(b_ih=np.zeros(8)), ValueError, ["b_ih", "[3H]"]),
        ("gru", dict(b_hh=None), ValueError, ["b_ih", "b_hh", "without"]),
        ("gru", dict(h0=np.zeros((2, 4))), ValueError, ["h0", "[B, H]"]),
        ("gru", dict(h0=np.zeros((3, 4), np.float32)), TypeError, ["dtype", "h0: float32"]),
        ("gru", dict(backend="gpu"), ValueError, ["backend", "'gpu'"]),
        ("rnn_tanh", dict(w_hh=np.zeros((12, 4))), ValueError, ["w_hh", "[H, H]"]),
        ("rnn_tanh", dict(nonlinearity="sigmoid"), ValueError, ["nonlinearity", "'tanh'", "'relu'"]),
        ("rnn_relu", dict(x=np.zeros((2, 3), np.float64)), ValueError, ["x", "3-D"]),
        ("rnn_relu", dict(training="yes"), TypeError, ["training"]),
    ],
)
def test_bad_input_is_named(cell, changes, error, words):
    problem = make(cell, 2, 3, 5, 4)
    changes = dict(changes)
    kwargs = {"backend": changes.pop("backend", "reference")}
    for key in ("nonlinearity", "training"):
        if key in changes:
            kwargs[key] = changes.pop(key)
    problem.update(changes)
    with pytest.raises(error) as info:
        if cell == "gru":
            rnnkernels.gru_forward(**problem, **kwargs)
        else:
            kwargs.setdefault("nonlinearity", cell.removeprefix("rnn_"))
            rnnkernels.rnn_forward(**problem, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_backward_refuses_other_outputs_and_inference():
    problem = make("gru", 2, 3, 5, 4)
    out = rnnkernels.gru_forward(**problem, backend="reference", training=False)
    with pytest.raises(ValueError, match="training=True"):
        rnnkernels.gru_backward(out)
    rnn_out = rnnkernels.rnn_forward(**make("rnn_tanh", 2, 3, 5, 4), backend="reference")
    with pytest.raises(TypeError, match="GRUOutput"):
        rnnkernels.gru_backward(rnn_out)
    with pytest.raises(TypeError, match="LSTMOutput"):
        rnnkernels.lstm_backward(rnn_out)
    with pytest.raises(ValueError, match="dh_n"):
        rnnkernels.rnn_backward(rnn_out, None, np.zeros((2, 4)))
    assert rnn_out.nonlinearity == "tanh" and rnn_out.cell is cells.RNN_TANH


def test_backends_say_what_they_do_not_implement():
    for cell in cells.CELLS.values():
        for name in rnnkernels.BACKENDS[1:]:
            if cell.implementation(name) is None:
                with pytest.raises(NotImplementedError, match=cell.title.split(" ")[0]):
                    _api.get_backend(name, cell.name)
    with pytest.raises(ValueError, match="unknown cell"):
        cells.get("lstmp")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_generic_entry_points(cell):
    """cell_forward / cell_backward: the states tuple in, the states tuple out, for the
    LSTM too (the modules and tools are written against these)."""
    c = cells.get(cell)
    rng = np.random.default_rng(0)
    steps, batch, input_size, hidden = 3, 2, 4, 5
    x = rng.standard_normal((steps, batch, input_size))
    w_ih = rng.standard_normal((c.gates * hidden, input_size)) * 0.3
    w_hh = rng.standard_normal((c.gates * hidden, hidden)) * 0.3
    state0 = tuple(rng.standard_normal((batch, hidden)) for _ in c.states)
    out = _api.cell_forward(cell, x, w_ih, w_hh, None, None, state0, backend="reference")
    assert len(out.states) == len(c.states)
    dstates = tuple(np.ones((batch, hidden)) for _ in c.states)
    grads = _api.cell_backward(out, np.ones((steps, batch, hidden)), dstates, return_step_norms=True)
    assert len(grads.dstates) == len(c.states) and len(grads.step_norms) == len(c.states)
    assert grads.db_ih is None and grads.db_hh is None
    with pytest.raises(TypeError, match="state0"):
        _api.cell_forward(cell, x, w_ih, w_hh, None, None, state0 + (state0[0],), backend="reference")


@pytest.mark.parametrize("cell, backend", GRID, ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False])
def test_saved_arrays_round_trip(cell, backend, bias):
    """Where a backend describes its saved state as arrays (what rnnkernels.torch's ops
    carry so backward never reruns the forward), the layout describes them and backward
    from the rebuilt state gives the same bits."""
    impl = _api.get_backend(backend, cell)
    if impl.saved_arrays is None:
        pytest.skip(f"{backend} keeps no arrays for {cell}")
    dtype = np.float32
    problem = make(cell, 3, 2, 4, 5, dtype=dtype, bias=bias)
    out = forward(cell, problem, backend=backend)
    saved = out._ctx.saved
    arrays = impl.saved_arrays.to_arrays(saved)
    layout = impl.saved_arrays.layout(3, 2, 4, 5, dtype)
    assert [(tuple(a.shape), np.dtype(a.dtype)) for a in arrays] == [(tuple(s), np.dtype(d)) for s, d in layout]
    rebuilt = impl.saved_arrays.from_arrays(problem["x"], problem["w_ih"], problem["w_hh"], bias,
                                            [np.array(a) for a in arrays])
    dy_dtype = arrays[0].dtype  # the backend's working dtype (float64 for the reference)
    dy = np.random.default_rng(1).standard_normal((3, 2, 5)).astype(dy_dtype)
    dh = np.ones((2, 5), dy_dtype)
    first = impl.backward(saved, dy, dh)
    second = impl.backward(rebuilt, dy, dh)
    for a, b in zip(first, second):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a, b)
