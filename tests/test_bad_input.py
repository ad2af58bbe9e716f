"""The bad-input matrix (issue 11): every kind of wrong argument to ``lstm_forward``
and ``lstm_backward``, on every backend that runs here, gets a TypeError or
ValueError whose message names the argument and says what was expected (the
README's promise). Validation is the API's, shared by every backend, so each
backend must refuse each kind the same way.

What is allowed rather than refused (see test_contracts.py): arguments that overlap
in memory (h0 and c0 one array, dy = out.y), since nothing rnnkernels does writes
into an argument; the layouts of test_fuzz.py; a missing upstream gradient.

The same matrix runs over every cell (``rnnkernels.cells.CELLS``) through its public
functions (``gru_forward``, ``rnn_forward(nonlinearity=...)`` and their backwards) with
the cell's gate rows and states, the LSTM's cases keeping their ids; the cell-specific
mistakes (a c0 for a cell without one, another cell's weights or output, a bad
nonlinearity, the generic ``cell_forward``'s state tuple) come after it.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_cell_problem

import rnnkernels
from rnnkernels import _api, cells

T, B, I, H = 3, 2, 4, 5
OTHER_CELLS = ("gru", "rnn_tanh", "rnn_relu")


def shapes(cell: str) -> dict:
    """The arguments' shapes for ``cell`` (a name in rnnkernels.cells.CELLS)."""
    c = cells.get(cell)
    G = c.gates
    return {
        "x": (T, B, I), "w_ih": (G * H, I), "w_hh": (G * H, H), "b_ih": (G * H,), "b_hh": (G * H,),
        **{name: (B, H) for name in c.state_inputs},
    }


SHAPES = shapes("lstm")
EXPECTED_NDIM = {"x": "3-D", "w_ih": "2-D", "w_hh": "2-D", "b_ih": "1-D", "b_hh": "1-D", "h0": "2-D", "c0": "2-D"}
ARRAY = "must be an array"
FLOAT = "floating-point"


def _emulated_param():
    from rnnkernels import emulator

    return pytest.param(
        "emulated",
        marks=[pytest.mark.emulated, pytest.mark.skipif(not emulator.compiler_available(), reason="no C++ compiler")],
    )


BACKENDS = ["reference", "cpu", _emulated_param()]


class FakeCudaArray:
    """An object that says it lives in GPU memory (``__cuda_array_interface__``),
    like a Numba or JAX device array; nothing here ever reads its memory."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}


class FakeDlpackArray:
    """An array on a DLPack device rnnkernels does not take (8 = kDLMetal)."""

    def __init__(self, shape):
        self.shape, self.dtype = tuple(shape), np.dtype(np.float32)

    def __dlpack__(self, **kwargs):
        raise AssertionError("rnnkernels must refuse this array before reading it")

    def __dlpack_device__(self):
        return (8, 0)


def _torch():
    return pytest.importorskip("torch", reason="torch is not installed")


def _problem(cell: str = "lstm"):
    return make_cell_problem(cell, T, B, I, H, dtype=np.float32, seed=11)


# (id, changes to the forward's arguments, error, words every message must contain).
# A change is a value or a function of the problem (for what needs torch or the
# problem's own arrays).
def forward_cases(cell: str) -> list:
    """The matrix for ``cell``'s forward (the LSTM's is FORWARD_CASES)."""
    c = cells.get(cell)
    rows, gates = c.rows_layout, c.gates
    cell_shapes = shapes(cell)
    cases = []
    for _name in ("x", "w_ih", "w_hh"):
        cases.append((f"{_name}-None", {_name: None}, TypeError, [_name, ARRAY, "None"]))
    for _name, _shape in cell_shapes.items():
        wrong_ndim = np.zeros(_shape + (1,), np.float32)
        wrong_size = np.zeros(tuple(n + 1 for n in _shape), np.float32)
        cases += [
            (f"{_name}-list", {_name: [[1.0, 2.0]]}, TypeError, [_name, ARRAY, "list"]),
            (f"{_name}-scalar", {_name: 1.5}, TypeError, [_name, ARRAY, "float"]),
            (f"{_name}-0d", {_name: np.array(1.5, np.float32)}, ValueError, [_name, EXPECTED_NDIM[_name], "0-D"]),
            (f"{_name}-bool", {_name: True}, TypeError, [_name, ARRAY, "bool"]),
            (f"{_name}-int", {_name: 3}, TypeError, [_name, ARRAY, "int"]),
            (f"{_name}-complex", {_name: 1j}, TypeError, [_name, ARRAY, "complex"]),
            (f"{_name}-object", {_name: object()}, TypeError, [_name, ARRAY, "object"]),
            (f"{_name}-wrong-ndim", {_name: wrong_ndim}, ValueError, [_name, EXPECTED_NDIM[_name]]),
            # x's size is only wrong against the weights: the message names both. So is
            # an Elman RNN's square w_hh of another H, against w_ih.
            (f"{_name}-wrong-size", {_name: wrong_size}, ValueError,
             {"x": ["w_ih", f"x of shape {wrong_size.shape}"],
              "w_hh": ["w_hh", f"[{rows}, H]", f"rows is not {gates} x"] if gates > 1 else ["w_ih", "H from w_hh"]}.get(
                 _name, [_name, "must have shape", str(_shape)])),
            (f"{_name}-int-array", {_name: np.zeros(_shape, np.int32)}, TypeError, [_name, FLOAT, "int32"]),
            (f"{_name}-complex-array", {_name: np.zeros(_shape, np.complex64)}, TypeError, [_name, FLOAT, "complex64"]),
            (f"{_name}-bool-array", {_name: np.zeros(_shape, bool)}, TypeError, [_name, FLOAT, "bool"]),
            (f"{_name}-object-array", {_name: np.zeros(_shape, object)}, TypeError, [_name, FLOAT, "object"]),
            (f"{_name}-other-dtype", {_name: np.zeros(_shape, np.float64)}, TypeError, [f"{_name}: float64", "share one dtype"]),
            (f"{_name}-on-gpu", {_name: FakeCudaArray(_shape)}, ValueError, [f"{_name} on cuda", "one device"]),
            (f"{_name}-dlpack-device", {_name: FakeDlpackArray(_shape)}, TypeError, [_name, "DLPack device", "CUDA"]),
            (f"{_name}-meta", {_name: lambda p, s=_shape: _torch().empty(s, device="meta")}, TypeError, [_name, "meta", "CPU and CUDA"]),
            (f"{_name}-torch-among-numpy", {_name: lambda p, n=_name: _torch().from_numpy(p[n])}, TypeError, [f"{_name}: torch", "one kind of array"]),
            (f"{_name}-bfloat16", {_name: lambda p, s=_shape: _torch().zeros(s, dtype=_torch().bfloat16)}, TypeError, [_name, FLOAT, "bfloat16"]),
        ]
    cases += [
        ("all-None", {"x": None, "w_ih": None, "w_hh": None}, TypeError, ["x", ARRAY, "None"]),
        ("b_hh-missing", {"b_hh": None}, ValueError, ["b_ih", "b_hh", "without"]),
        ("b_ih-missing", {"b_ih": None}, ValueError, ["b_ih", "b_hh", "without"]),
    ]
    if cell == "lstm":
        cases.append(("c0-missing", {"c0": None}, ValueError, ["h0", "c0", "without"]))
    cases += [
        (f"w_hh-not-{rows}", {"w_hh": np.zeros((gates * H + 1, H), np.float32)}, ValueError, ["w_hh", f"[{rows}, H]", f"not {gates} x"]),
        ("all-on-gpu", {n: FakeCudaArray(s) for n, s in cell_shapes.items()}, ValueError, ["x", "CUDA array", "host"]),
        ("all-torch-meta", {n: (lambda p, s=s: _torch().empty(s, device="meta")) for n, s in cell_shapes.items()}, TypeError, ["x", "meta"]),
        ("backend-unknown", {"backend": "gpu"}, ValueError, ["backend", "'gpu'", "'cpu'"]),
        ("backend-int", {"backend": 3}, TypeError, ["backend", "string"]),
        ("backend-None", {"backend": None}, TypeError, ["backend", "string"]),
        ("batch_first-str", {"batch_first": "yes"}, TypeError, ["batch_first", "True or False"]),
        ("training-None", {"training": None}, TypeError, ["training", "True or False"]),
        ("training-int", {"training": 1}, TypeError, ["training", "True or False"]),
    ]
    return cases


FORWARD_CASES = forward_cases("lstm")

def _forward(problem, backend, changes, cell="lstm"):
    kwargs = dict(problem, backend=backend)
    for name, value in changes.items():
        kwargs[name] = value(problem) if callable(value) else value
    return _public_forward(cell)(**kwargs)


def _public_forward(cell: str):
    """``cell``'s public forward, taking the arguments by name."""
    if cell == "lstm":
        return rnnkernels.lstm_forward
    if cell == "gru":
        return rnnkernels.gru_forward
    return lambda **kwargs: rnnkernels.rnn_forward(**kwargs, nonlinearity=cell.removeprefix("rnn_"))


def _public_backward(cell: str):
    return {"lstm": rnnkernels.lstm_backward, "gru": rnnkernels.gru_backward}.get(cell, rnnkernels.rnn_backward)


def _assert_names(info, words):
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in the message {message!r}"


@pytest.mark.parametrize("changes, error, words", [pytest.param(*c[1:], id=c[0]) for c in FORWARD_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_refuses(backend, changes, error, words):
    problem = _problem()
    with pytest.raises(error) as info:
        _forward(problem, backend, changes)
    _assert_names(info, words)


@pytest.mark.parametrize(
    "cell, changes, error, words",
    [pytest.param(cell, *c[1:], id=f"{cell}-{c[0]}") for cell in OTHER_CELLS for c in forward_cases(cell)],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_forward_refuses(backend, cell, changes, error, words):
    problem = _problem(cell)
    with pytest.raises(error) as info:
        _forward(problem, backend, changes, cell)
    _assert_names(info, words)


def test_dtype_a_backend_does_not_take():
    half = {k: v.astype(np.float16) for k, v in _problem().items()}
    with pytest.raises(TypeError) as info:
        rnnkernels.lstm_forward(**half, backend="cpu")
    _assert_names(info, ["backend 'cpu'", "float32, float64", "float16"])
    double = {k: v.astype(np.float64) for k, v in _problem().items()}
    with pytest.raises(TypeError) as info:
        rnnkernels.lstm_forward(**double, backend="emulated")
    _assert_names(info, ["backend 'emulated'", "float32, float16", "float64"])


# (id, arguments of lstm_backward besides out, error, words); the other cells take
# every case but those of dc_n.
BACKWARD_CASES = [
    ("dy-list", {"dy": [[1.0]]}, TypeError, ["dy", ARRAY, "list"]),
    ("dy-scalar", {"dy": 1.0}, TypeError, ["dy", ARRAY, "float"]),
    ("dy-bool", {"dy": False}, TypeError, ["dy", ARRAY, "bool"]),
    ("dy-object", {"dy": object()}, TypeError, ["dy", ARRAY, "object"]),
    ("dy-0d", {"dy": np.array(0.0, np.float32)}, ValueError, ["dy", "3-D", "like out.y"]),
    ("dy-wrong-shape", {"dy": np.zeros((T, B, H + 1), np.float32)}, ValueError, ["dy", "shape", str((T, B, H))]),
    ("dy-batch-first-shape", {"dy": np.zeros((B, T, H), np.float32)}, ValueError, ["dy", "shape", str((T, B, H))]),
    ("dy-int", {"dy": np.zeros((T, B, H), np.int64)}, TypeError, ["dy", FLOAT, "int64"]),
    ("dy-complex", {"dy": np.zeros((T, B, H), np.complex128)}, TypeError, ["dy", FLOAT, "complex128"]),
    ("dy-float16", {"dy": np.zeros((T, B, H), np.float16)}, TypeError, ["dy", "must have dtype", "float16"]),
    ("dy-on-gpu", {"dy": FakeCudaArray((T, B, H))}, ValueError, ["dy", "cuda", "forward ran on cpu"]),
    ("dy-meta", {"dy": lambda: _torch().empty((T, B, H), device="meta")}, TypeError, ["dy", "meta"]),
    ("dy-torch-for-numpy", {"dy": lambda: _torch().zeros((T, B, H))}, TypeError, ["dy", "torch", "numpy"]),
    ("dh_n-wrong-ndim", {"dh_n": np.zeros(H, np.float32)}, ValueError, ["dh_n", "2-D", "[B, H]"]),
    ("dh_n-wrong-size", {"dh_n": np.zeros((B + 1, H), np.float32)}, ValueError, ["dh_n", "[B, H]", str((B, H))]),
    ("dh_n-str", {"dh_n": "zeros"}, TypeError, ["dh_n", ARRAY, "str"]),
    ("dc_n-wrong-size", {"dc_n": np.zeros((B, H + 1), np.float32)}, ValueError, ["dc_n", "[B, H]"]),
    ("dc_n-bool-array", {"dc_n": np.zeros((B, H), bool)}, TypeError, ["dc_n", FLOAT, "bool"]),
    ("return_step_norms-str", {"return_step_norms": "yes"}, TypeError, ["return_step_norms", "True or False"]),
]


@pytest.mark.parametrize("arguments, error, words", [pytest.param(*c[1:], id=c[0]) for c in BACKWARD_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_refuses(backend, arguments, error, words):
    out = rnnkernels.lstm_forward(**_problem(), backend=backend)
    kwargs = {k: v() if callable(v) else v for k, v in arguments.items()}
    with pytest.raises(error) as info:
        rnnkernels.lstm_backward(out, **kwargs)
    _assert_names(info, words)


@pytest.mark.parametrize(
    "cell, arguments, error, words",
    [pytest.param(cell, *c[1:], id=f"{cell}-{c[0]}") for cell in OTHER_CELLS for c in BACKWARD_CASES if "dc_n" not in c[0]],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_backward_refuses(backend, cell, arguments, error, words):
    out = _forward(_problem(cell), backend, {}, cell)
    kwargs = {k: v() if callable(v) else v for k, v in arguments.items()}
    with pytest.raises(error) as info:
        _public_backward(cell)(out, **kwargs)
    _assert_names(info, words)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_refuses_what_is_not_a_training_output(backend):
    problem = _problem()
    for value in (None, problem["x"], (problem["x"],)):
        with pytest.raises(TypeError) as info:
            rnnkernels.lstm_backward(value)
        _assert_names(info, ["out", "LSTMOutput", type(value).__name__])
    out = rnnkernels.lstm_forward(**problem, training=False, backend=backend)
    with pytest.raises(ValueError) as info:
        rnnkernels.lstm_backward(out)
    _assert_names(info, ["lstm_backward", "training=True"])


def test_matrix_has_at_least_40_kinds():
    kinds = {case[0].split("-", 1)[-1] if case[0].split("-")[0] in SHAPES else case[0] for case in FORWARD_CASES}
    assert len(kinds) + len(BACKWARD_CASES) >= 40, sorted(kinds)


@pytest.mark.parametrize("cell", OTHER_CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_backward_refuses_what_is_not_its_training_output(backend, cell):
    problem = _problem(cell)
    expected = "GRUOutput" if cell == "gru" else "RNNOutput"
    for value in (None, problem["x"], (problem["x"],), rnnkernels.lstm_forward(**_problem(), backend=backend)):
        with pytest.raises(TypeError) as info:
            _public_backward(cell)(value)
        _assert_names(info, ["out", expected, type(value).__name__])
    out = _forward(problem, backend, {"training": False}, cell)
    with pytest.raises(ValueError) as info:
        _public_backward(cell)(out)
    _assert_names(info, [f"{cell[:3]}_backward", "training=True"])
    # The LSTM's backward refuses another cell's output by name too.
    with pytest.raises(TypeError) as info:
        rnnkernels.lstm_backward(_forward(problem, backend, {}, cell))
    _assert_names(info, ["out", "LSTMOutput", expected])


# ----------------------------------------------------------------------------- cell-specific
# (id, cell, call(problem, backend) -> the call that must fail, error, words). The
# problem is the cell's own (_problem(cell)) unless the call builds another.
_LSTM_WEIGHTS = {n: v for n, v in make_cell_problem("lstm", T, B, I, H, dtype=np.float32, seed=11).items()}
CELL_CASES = [
    ("c0-to-gru", "gru", lambda p, b: rnnkernels.gru_forward(**p, c0=p["h0"], backend=b), TypeError, ["c0"]),
    ("c0-to-rnn", "rnn_tanh", lambda p, b: rnnkernels.rnn_forward(**p, c0=p["h0"], backend=b), TypeError, ["c0"]),
    ("dc_n-to-gru_backward", "gru", lambda p, b: rnnkernels.gru_backward(rnnkernels.gru_forward(**p, backend=b), dc_n=p["h0"]), TypeError, ["dc_n"]),
    ("lstm-weights-to-gru", "gru",
     lambda p, b: rnnkernels.gru_forward(**dict(p, w_ih=_LSTM_WEIGHTS["w_ih"], w_hh=_LSTM_WEIGHTS["w_hh"]), backend=b),
     ValueError, ["w_hh", "[3H, H]", "r, z, n", "not 3 x"]),
    ("lstm-problem-to-gru", "gru",
     lambda p, b: rnnkernels.gru_forward(**{k: v for k, v in _LSTM_WEIGHTS.items() if k != "c0"}, backend=b),
     ValueError, ["w_hh", "[3H, H]", "not 3 x"]),
    ("lstm-weights-to-rnn", "rnn_relu",
     lambda p, b: rnnkernels.rnn_forward(**dict(p, w_hh=_LSTM_WEIGHTS["w_hh"]), nonlinearity="relu", backend=b),
     ValueError, ["w_hh", "[H, H]", "one row per hidden unit"]),
    ("gru-weights-to-lstm", "gru",
     lambda p, b: rnnkernels.lstm_forward(**p, c0=p["h0"], backend=b), ValueError, ["w_hh", "[4H, H]", "i, f, g, o"]),
    ("lstm-w_ih-to-gru", "gru",
     lambda p, b: rnnkernels.gru_forward(**dict(p, w_ih=_LSTM_WEIGHTS["w_ih"]), backend=b), ValueError, ["w_ih", "[3H, I]"]),
    ("lstm-biases-to-gru", "gru",
     lambda p, b: rnnkernels.gru_forward(**dict(p, b_ih=_LSTM_WEIGHTS["b_ih"], b_hh=_LSTM_WEIGHTS["b_hh"]), backend=b),
     ValueError, ["b_ih", "[3H]"]),
    ("gru-b_hh-to-rnn", "rnn_tanh",
     lambda p, b: rnnkernels.rnn_forward(**dict(p, b_hh=np.zeros(3 * H, np.float32)), backend=b), ValueError, ["b_hh", "[H]"]),
    ("nonlinearity-unknown", "rnn_tanh",
     lambda p, b: rnnkernels.rnn_forward(**p, nonlinearity="sigmoid", backend=b), ValueError, ["nonlinearity", "'tanh'", "'relu'", "'sigmoid'"]),
    ("nonlinearity-upper", "rnn_tanh",
     lambda p, b: rnnkernels.rnn_forward(**p, nonlinearity="TANH", backend=b), ValueError, ["nonlinearity", "'tanh'", "'TANH'"]),
    ("nonlinearity-None", "rnn_tanh",
     lambda p, b: rnnkernels.rnn_forward(**p, nonlinearity=None, backend=b), (TypeError, ValueError), ["nonlinearity", "'tanh'"]),
    ("nonlinearity-function", "rnn_tanh",
     lambda p, b: rnnkernels.rnn_forward(**p, nonlinearity=np.tanh, backend=b), (TypeError, ValueError), ["nonlinearity", "'tanh'"]),
    ("cell-unknown", "gru",
     lambda p, b: _api.cell_forward("lstmp", p["x"], p["w_ih"], p["w_hh"], backend=b), ValueError, ["cell", "'lstmp'", "'gru'"]),
    ("cell-int", "gru",
     lambda p, b: _api.cell_forward(3, p["x"], p["w_ih"], p["w_hh"], backend=b), TypeError, ["cell", "int"]),
    ("state0-with-c0-for-gru", "gru",
     lambda p, b: _api.cell_forward("gru", p["x"], p["w_ih"], p["w_hh"], state0=(p["h0"], p["h0"]), backend=b),
     TypeError, ["state0", "(h0)", "GRU"]),
    ("state0-an-array", "rnn_relu",
     lambda p, b: _api.cell_forward("rnn_relu", p["x"], p["w_ih"], p["w_hh"], state0=p["h0"], backend=b),
     TypeError, ["state0", "tuple"]),
    ("state0-h0-only-for-lstm", "lstm",
     lambda p, b: _api.cell_forward("lstm", p["x"], p["w_ih"], p["w_hh"], state0=(p["h0"],), backend=b),
     TypeError, ["state0", "(h0, c0)"]),
    ("dstates-too-many", "gru",
     lambda p, b: _api.cell_backward(_api.cell_forward("gru", p["x"], p["w_ih"], p["w_hh"], backend=b), None, (p["h0"], p["h0"])),
     TypeError, ["dstates", "(dh_n)"]),
    ("dstates-an-array", "rnn_tanh",
     lambda p, b: _api.cell_backward(_api.cell_forward("rnn_tanh", p["x"], p["w_ih"], p["w_hh"], backend=b), None, p["h0"]),
     TypeError, ["dstates", "tuple"]),
    ("cell_backward-of-an-array", "gru",
     lambda p, b: _api.cell_backward(p["x"]), TypeError, ["out", "GRUOutput", "ndarray"]),
]


@pytest.mark.parametrize("cell, call, error, words", [pytest.param(*c[1:], id=c[0]) for c in CELL_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_specific_mistakes(backend, cell, call, error, words):
    with pytest.raises(error) as info:
        call(_problem(cell), backend)
    _assert_names(info, words)
