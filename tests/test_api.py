"""The public API's contract: validation, edge shapes, array kinds and layouts. Every
bad input must raise a ValueError or TypeError that names the argument."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_problem, make_upstream, rel_err, torch_or_skip

import rnnkernels

HOST_BACKENDS = ["reference", "cpu"]


def _emulator_ready() -> bool:
    from rnnkernels import emulator

    return emulator.compiler_available()


# Validation is the API's, shared by every backend: each must refuse bad input the same
# way, the emulated CUDA backend included.
VALIDATING_BACKENDS = HOST_BACKENDS + [
    pytest.param(
        "emulated",
        marks=[pytest.mark.emulated, pytest.mark.skipif(not _emulator_ready(), reason="no C++ compiler for the emulator")],
    )
]

T, B, I, H = 4, 3, 5, 6


@pytest.fixture
def problem():
    return make_problem(T, B, I, H, dtype=np.float32)


def _call(problem, default_backend="cpu", **changes):
    kwargs = dict(problem)
    kwargs.update(changes)
    backend = kwargs.pop("backend", default_backend)
    return rnnkernels.lstm_forward(**kwargs, backend=backend)


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "changes, error, words",
    [
        (dict(x=[[[1.0]]]), TypeError, ["x", "array", "list"]),
        (dict(w_ih=3.0), TypeError, ["w_ih", "array"]),
        (dict(x=np.zeros((T, B, I), np.int32)), TypeError, ["x", "floating", "int32"]),
        (dict(x=np.zeros((T, B, I), np.complex64)), TypeError, ["x", "complex64"]),
        (dict(h0=np.zeros((B, H), bool), c0=np.zeros((B, H), bool)), TypeError, ["h0", "bool"]),
        (dict(x=np.zeros((T, B, I), np.float64)), TypeError, ["dtype", "x: float64", "w_ih: float32"]),
        (dict(x=np.zeros((T, I), np.float32)), ValueError, ["x", "3-D", "[T, B, I]"]),
        (dict(w_ih=np.zeros((4 * H, I + 1), np.float32)), ValueError, ["w_ih", "[4H, I]", str((4 * H, I))]),
        (dict(w_hh=np.zeros((4 * H, H + 1), np.float32)), ValueError, ["w_hh", "[4H, H]"]),
        (dict(w_hh=np.zeros((4 * H,), np.float32)), ValueError, ["w_hh", "2-D"]),
        (dict(b_ih=np.zeros(4 * H + 1, np.float32)), ValueError, ["b_ih", "[4H]"]),
        (dict(b_hh=np.zeros((1, 4 * H), np.float32)), ValueError, ["b_hh", "1-D"]),
        (dict(b_hh=None), ValueError, ["b_ih", "b_hh", "without"]),
        (dict(h0=None), ValueError, ["h0", "c0", "without"]),
        (dict(c0=np.zeros((B + 1, H), np.float32)), ValueError, ["c0", "[B, H]", str((B, H))]),
        (dict(backend="gpu"), ValueError, ["backend", "'gpu'", "'cpu'"]),
        (dict(backend=3), TypeError, ["backend"]),
        (dict(batch_first="yes"), TypeError, ["batch_first"]),
        (dict(training=None), TypeError, ["training"]),
    ],
)
@pytest.mark.parametrize("backend", VALIDATING_BACKENDS)
def test_bad_input_is_named(problem, backend, changes, error, words):
    with pytest.raises(error) as info:
        _call(problem, backend, **changes)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_float16_rejected_by_cpu_backend_but_reference_takes_it(problem):
    half = {k: None if v is None else v.astype(np.float16) for k, v in problem.items()}
    with pytest.raises(TypeError, match="backend 'cpu' supports dtypes float32, float64"):
        _call(half)
    out = _call(half, backend="reference")
    assert out.y.dtype == np.float64


def test_backward_errors(problem):
    out = _call(problem, training=False)
    with pytest.raises(ValueError, match="training=True"):
        rnnkernels.lstm_backward(out)
    with pytest.raises(TypeError, match="LSTMOutput"):
        rnnkernels.lstm_backward(problem["x"])
    out = _call(problem)
    with pytest.raises(ValueError, match="dy must have shape"):
        rnnkernels.lstm_backward(out, dy=np.zeros((T, B, H + 1), np.float32))
    with pytest.raises(ValueError, match="dh_n must be 2-D"):
        rnnkernels.lstm_backward(out, dh_n=np.zeros(H, np.float32))
    with pytest.raises(TypeError, match="dc_n must have dtype float32"):
        rnnkernels.lstm_backward(out, dc_n=np.zeros((B, H), np.float64))
    with pytest.raises(TypeError, match="dy must be an array"):
        rnnkernels.lstm_backward(out, dy="zeros")


def test_backends_listed():
    assert rnnkernels.BACKENDS == ("auto", "reference", "cpu", "cuda", "emulated")
    assert rnnkernels.get_backend("cpu").name == "cpu"


# --------------------------------------------------------------------- edge shapes


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_zero_steps(backend, batch_first):
    p = make_problem(0, B, I, H, dtype=np.float64)
    if batch_first:
        p["x"] = p["x"].transpose(1, 0, 2)
    out = rnnkernels.lstm_forward(**p, batch_first=batch_first, backend=backend)
    assert out.y.shape == ((B, 0, H) if batch_first else (0, B, H))
    np.testing.assert_array_equal(out.h_n, p["h0"])
    np.testing.assert_array_equal(out.c_n, p["c0"])
    assert not np.shares_memory(out.h_n, p["h0"])
    dh_n = np.ones((B, H))
    grads = rnnkernels.lstm_backward(out, dh_n=dh_n, return_step_norms=True)
    assert grads.dx.shape == p["x"].shape
    np.testing.assert_array_equal(grads.dh0, dh_n)
    assert not np.shares_memory(grads.dh0, dh_n)
    np.testing.assert_array_equal(grads.dc0, np.zeros((B, H)))
    assert not grads.dw_ih.any() and not grads.dw_hh.any() and not grads.db_ih.any()
    assert grads.dh_norms.shape == (0,)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_zero_batch(backend):
    p = make_problem(T, 0, I, H, dtype=np.float64)
    out = rnnkernels.lstm_forward(**p, backend=backend)
    assert out.y.shape == (T, 0, H) and out.h_n.shape == (0, H)
    grads = rnnkernels.lstm_backward(out)
    assert grads.dx.shape == (T, 0, I) and grads.dw_hh.shape == (4 * H, H)
    assert not grads.dw_hh.any()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_non_contiguous_inputs(backend):
    p = make_problem(T, B, I, H, dtype=np.float64, seed=4)
    strided = {
        "x": np.asfortranarray(p["x"]),
        "w_ih": p["w_ih"].T.copy().T,  # a transposed view of a copy: Fortran order
        "w_hh": np.repeat(p["w_hh"], 2, axis=1)[:, ::2],
        "b_ih": np.repeat(p["b_ih"], 3)[::3],
        "b_hh": p["b_hh"],
        "h0": np.asfortranarray(p["h0"]),
        "c0": p["c0"],
    }
    assert not strided["w_hh"].flags.c_contiguous and not strided["b_ih"].flags.c_contiguous
    a = rnnkernels.lstm_forward(**p, backend=backend)
    b = rnnkernels.lstm_forward(**strided, backend=backend)
    np.testing.assert_array_equal(a.y, b.y)
    up = make_upstream(T, B, H)
    ga = rnnkernels.lstm_backward(a, **up)
    gb = rnnkernels.lstm_backward(b, dy=np.asfortranarray(up["dy"]), dh_n=up["dh_n"], dc_n=up["dc_n"])
    np.testing.assert_array_equal(ga.dw_hh, gb.dw_hh)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_preactivations_stay_finite(backend, dtype):
    p = make_problem(6, 2, 3, 4, dtype=dtype, seed=9)
    p["x"] = (p["x"] * 1e4).astype(dtype)
    p["w_ih"] = np.sign(p["w_ih"]).astype(dtype)  # |pre-activation| around 1e4
    out = rnnkernels.lstm_forward(**p, backend=backend)
    grads = rnnkernels.lstm_backward(out, dy=np.ones_like(out.y))
    for value in (out.y, out.h_n, out.c_n, *(getattr(grads, f) for f in ("dx", "dw_ih", "dw_hh", "db_ih", "dh0", "dc0"))):
        assert np.isfinite(value).all()
    assert np.abs(out.y).max() <= 1.0


def test_outputs_do_not_alias_saved_state(problem):
    out = _call(problem)
    before = rnnkernels.lstm_backward(out, dy=np.ones_like(out.y)).dw_hh
    out.y[...] = 123.0  # a user scribbling on y must not change the gradients
    after = rnnkernels.lstm_backward(out, dy=np.ones_like(out.y)).dw_hh
    np.testing.assert_array_equal(before, after)


def test_bias_gradients_are_separate_arrays(problem):
    grads = rnnkernels.lstm_backward(_call(problem), dy=np.ones((T, B, H), np.float32))
    np.testing.assert_array_equal(grads.db_ih, grads.db_hh)
    assert not np.shares_memory(grads.db_ih, grads.db_hh)


def test_auto_picks_cpu_for_host_arrays(problem):
    out = rnnkernels.lstm_forward(**problem)
    assert out.backend == "cpu"


# --------------------------------------------------------------------- array kinds


@pytest.mark.torch
def test_torch_tensors_in_torch_tensors_out(problem):
    torch = torch_or_skip()
    tensors = {k: torch.from_numpy(v).requires_grad_(k == "x") for k, v in problem.items()}
    out = rnnkernels.lstm_forward(**tensors)
    assert isinstance(out.y, torch.Tensor) and out.y.dtype == torch.float32
    grads = rnnkernels.lstm_backward(out, dy=torch.ones(T, B, H))
    assert isinstance(grads.dw_hh, torch.Tensor)
    expected = rnnkernels.lstm_forward(**problem)
    np.testing.assert_array_equal(out.y.detach().numpy(), expected.y)  # y carries a grad_fn (issue 11, defect 5)


def test_dlpack_host_array_round_trip(problem):
    class Wrapped:
        """A minimal foreign array that only speaks DLPack."""

        def __init__(self, a):
            self._a = a
            self.shape, self.dtype = a.shape, a.dtype

        def __dlpack__(self, **kwargs):
            return self._a.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    wrapped = {k: Wrapped(v) for k, v in problem.items()}
    out = rnnkernels.lstm_forward(**wrapped, backend="cpu")
    expected = rnnkernels.lstm_forward(**problem, backend="cpu")
    assert rel_err(np.from_dlpack(out.y), expected.y) == 0.0


def test_cuda_backend_without_gpu_says_what_is_missing(problem):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - any CUDA runtime failure means no usable GPU
        has_gpu = False
    if has_gpu:
        pytest.skip("a GPU is present; this checks the message on machines without one")
    with pytest.raises(RuntimeError, match="GPU|CUDA"):
        _call(problem, backend="cuda")
