"""The CUDA LSTM kernels (csrc/) against the float64 reference.

* marker ``emulated``: the kernels on the CPU emulator (``rnnkernels.emulator``), small
  shapes, runs in CI; skipped with a reason where the emulator cannot run.
* marker ``gpu``: the kernels on an NVIDIA GPU through CuPy; skipped with a reason where
  there is none. Run them all with ``python -m pytest -m gpu tests/``; the shapes
  marked ``slow`` too are the large ones, the long sequence and the sanitizer run.

Both go through the one launch plan (rnnkernels/_launch.py) with a runtime object, so
the emulated tests exercise exactly the launches the GPU makes.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import cuda_backend_or_skip, emulator_or_skip

from rnnkernels import _launch
from rnnkernels.reference import backward as ref_backward
from rnnkernels.reference import forward as ref_forward

OUTPUTS = ("y", "h_n", "c_n")
GRADIENTS = ("dx", "dw_ih", "dw_hh", "db", "dh0", "dc0")
STEP_NORMS = ("dh_norms", "dc_norms")
EMULATED_TOLERANCE = 5e-5
GPU_TOLERANCE = 1e-5
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------ helpers
@dataclass
class Problem:
    x: np.ndarray  # [T, B, I]
    w_ih: np.ndarray  # [4H, I]
    w_hh: np.ndarray  # [4H, H]
    bias: np.ndarray | None  # [4H]
    h0: np.ndarray  # [B, H]
    c0: np.ndarray  # [B, H]
    dy: np.ndarray  # [T, B, H]
    dh_n: np.ndarray  # [B, H]
    dc_n: np.ndarray  # [B, H]


def make_problem(steps, batch, input_size, hidden, *, bias=True, initial_state=True, upstream="all", seed=0):
    """float32 inputs; weights drawn like torch.nn.LSTM's init, U(-1/√H, 1/√H).
    ``upstream``: "all" (dy, dh_n, dc_n random), "y" (only dy; dh_n = dc_n = 0, as when
    the final state is unused) or "none" (all zeros, as when no output is used)."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(hidden)

    def uniform(*shape):
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def zeros(*shape):
        return np.zeros(shape, np.float32)

    state = normal if initial_state else zeros
    return Problem(
        x=normal(steps, batch, input_size),
        w_ih=uniform(4 * hidden, input_size),
        w_hh=uniform(4 * hidden, hidden),
        bias=uniform(4 * hidden) if bias else None,
        h0=state(batch, hidden),
        c0=state(batch, hidden),
        dy=zeros(steps, batch, hidden) if upstream == "none" else normal(steps, batch, hidden),
        dh_n=normal(batch, hidden) if upstream == "all" else zeros(batch, hidden),
        dc_n=normal(batch, hidden) if upstream == "all" else zeros(batch, hidden),
    )


def run_kernels(runtime, problem, *, step_tile=None, variant=None, backward_variant=None, to_device=np.asarray,
                to_host=np.asarray):
    """Forward (training and inference) and backward through ``runtime``; host arrays.
    The backward runs without step norms (see :func:`run_step_norms` for with).
    ``variant``: the forward's (and, unless ``backward_variant`` is given, the
    backward's) variant of _launch.VARIANTS; None: the default."""
    device = {name: None if value is None else to_device(value) for name, value in vars(problem).items()}
    args = (device["x"], device["w_ih"], device["w_hh"], device["bias"], device["h0"], device["c0"])
    y, h_n, c_n, saved = _launch.forward(runtime, *args, True, step_tile=step_tile, variant=variant)
    y_inf, h_n_inf, c_n_inf, saved_inf = _launch.forward(runtime, *args, False, step_tile=step_tile, variant=variant)
    assert saved_inf is None
    grads = _launch.backward(runtime, saved, device["dy"], device["dh_n"], device["dc_n"],
                             variant=backward_variant or variant)
    results = dict(zip(OUTPUTS, (y, h_n, c_n)))
    results.update(zip(("y_inference", "h_n_inference", "c_n_inference"), (y_inf, h_n_inf, c_n_inf)))
    results.update(zip(GRADIENTS, grads))
    return {name: None if value is None else to_host(value) for name, value in results.items()}


def run_step_norms(runtime, problem, *, step_tile=None, variant=None, to_device=np.asarray, to_host=np.asarray):
    """Forward (training), then backward through ``runtime`` twice from the same saved
    state: with step norms (``GRADIENTS`` and ``STEP_NORMS``) and without (the gradients,
    suffixed ``_plain``); host arrays. ``variant`` as for :func:`run_kernels`."""
    device = {name: None if value is None else to_device(value) for name, value in vars(problem).items()}
    args = (device["x"], device["w_ih"], device["w_hh"], device["bias"], device["h0"], device["c0"])
    saved = _launch.forward(runtime, *args, True, step_tile=step_tile, variant=variant)[3]
    upstream = (device["dy"], device["dh_n"], device["dc_n"])
    with_norms = _launch.backward(runtime, saved, *upstream, return_step_norms=True, variant=variant)
    assert len(with_norms) == len(GRADIENTS) + len(STEP_NORMS)
    plain = _launch.backward(runtime, saved, *upstream, variant=variant)
    assert len(plain) == len(GRADIENTS)
    results = dict(zip(GRADIENTS + STEP_NORMS, with_norms))
    results.update(zip((name + "_plain" for name in GRADIENTS), plain))
    return {name: None if value is None else to_host(value) for name, value in results.items()}


def assert_step_norms_match_reference(results, problem, tolerance):
    """The norms against the float64 reference, step by step: relative error below
    ``tolerance`` at every step, exactly zero where the reference is zero; and the
    gradients returned with the norms bitwise equal to those returned without."""
    saved = ref_forward(problem.x, problem.w_ih, problem.w_hh, problem.bias, problem.h0, problem.c0, True)[3]
    expected = ref_backward(saved, problem.dy, problem.dh_n, problem.dc_n, return_step_norms=True)[-2:]
    steps = problem.x.shape[0]
    for name, want in zip(STEP_NORMS, expected):
        got = results[name]
        assert got.dtype == np.float64 and got.shape == (steps,), f"{name}: {got.dtype} {got.shape}"
        assert np.isfinite(got).all() and (got >= 0).all(), f"{name}: {got}"
        assert (got[want == 0] == 0).all(), f"{name} must be exactly zero where the gradient is: {got}"
        nonzero = want != 0
        errors = np.abs(got[nonzero] - want[nonzero]) / want[nonzero]
        assert (errors < tolerance).all(), f"{name}: relative errors {errors} above {tolerance:g}"
    for name in GRADIENTS:
        with_norms, plain = results[name], results[name + "_plain"]
        if plain is None:
            assert with_norms is None
        else:
            assert with_norms.tobytes() == plain.tobytes(), f"{name} changes when step norms are asked for"


def reference_results(problem):
    y, h_n, c_n, saved = ref_forward(problem.x, problem.w_ih, problem.w_hh, problem.bias, problem.h0, problem.c0, True)
    grads = ref_backward(saved, problem.dy, problem.dh_n, problem.dc_n)
    results = dict(zip(OUTPUTS, (y, h_n, c_n)))
    results.update(y_inference=y, h_n_inference=h_n, c_n_inference=c_n)
    results.update(zip(GRADIENTS, grads))
    return results


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (the absolute error if expected is 0)."""
    difference = np.abs(np.asarray(actual, np.float64) - expected).max(initial=0.0)
    scale = np.abs(expected).max(initial=0.0)
    return float(difference / scale) if scale > 0 else float(difference)


def assert_matches_reference(results, problem, tolerance):
    expected = reference_results(problem)
    errors = {}
    for name, want in expected.items():
        got = results[name]
        if want is None:
            assert got is None, f"{name} should be None without a bias"
            continue
        assert got.dtype == np.float32, f"{name} is {got.dtype}"
        assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
        assert np.isfinite(got).all(), f"{name} is not finite"
        errors[name] = relative_error(got, want)
    too_large = {name: f"{error:.2e}" for name, error in errors.items() if not error < tolerance}
    assert not too_large, f"relative error above {tolerance:g}: {too_large}"
    return errors


def assert_bitwise_equal(first, second):
    for name, value in first.items():
        if value is None:
            assert second[name] is None
        else:
            assert value.tobytes() == second[name].tobytes(), f"{name} differs between runs"


# The small grid: shapes that break tilings (B in {1, 3}, T = 1, H not a multiple of
# 32, I != H), with and without bias.
SMALL_SHAPES = [
    (steps, batch, 5 if hidden == 33 else 12, hidden)
    for batch in (1, 3)
    for steps in (1, 5)
    for hidden in (7, 33)
]
SMALL_CASES = [
    pytest.param(shape, bias, id=f"T{shape[0]}-B{shape[1]}-I{shape[2]}-H{shape[3]}-{'bias' if bias else 'nobias'}")
    for shape in SMALL_SHAPES
    for bias in (True, False)
]
# Upstream gradients for the step norms: all, dy only, the final state only, none.
NORM_UPSTREAMS = ("all", "y", "state", "none")


def make_norm_problem(shape, upstream, seed):
    """:func:`make_problem` with ``upstream`` also taking "state": dy = 0, dh_n and dc_n
    random (only the final state is used)."""
    problem = make_problem(*shape, upstream="all" if upstream == "state" else upstream, seed=seed)
    if upstream == "state":
        problem.dy = np.zeros_like(problem.dy)
    return problem


# Initial state and upstream gradients: zero or not, and gradients missing.
STATE_CASES = [
    pytest.param(initial_state, upstream, id=f"{'state' if initial_state else 'zerostate'}-upstream_{upstream}")
    for initial_state, upstream in ((False, "all"), (True, "y"), (True, "none"), (False, "none"))
]


# ---------------------------------------------------------------------- emulated
@pytest.mark.emulated
@pytest.mark.parametrize("tile", _launch.STEP_TILES, ids=lambda tile: tile.name)
def test_emulated_every_step_tile(emulator, tile):
    # B = 5 crosses a batch-tile boundary of every tile; H = 40 one of the unit tiles.
    problem = make_problem(3, 5, 8, 40, seed=11)
    assert_matches_reference(run_kernels(emulator, problem, step_tile=tile), problem, EMULATED_TOLERANCE)


@pytest.mark.emulated
def test_emulated_backend_functions(emulator):
    """The registered backend's functions, as the API calls them."""
    from rnnkernels import emulated

    problem = make_problem(2, 3, 4, 9, seed=3)
    y, h_n, c_n, saved = emulated.BACKEND.forward(
        problem.x, problem.w_ih, problem.w_hh, problem.bias, problem.h0, problem.c0, True
    )
    grads = emulated.BACKEND.backward(saved, problem.dy, problem.dh_n, problem.dc_n)
    results = dict(zip(OUTPUTS, (y, h_n, c_n)), **dict(zip(GRADIENTS, grads)))
    expected = reference_results(problem)
    for name, value in results.items():
        assert relative_error(value, expected[name]) < EMULATED_TOLERANCE, name
    assert emulated.BACKEND.forward(problem.x, problem.w_ih, problem.w_hh, None, problem.h0, problem.c0, False)[3] is None


@pytest.mark.emulated
def test_emulated_deterministic_across_runs_and_schedules():
    """Bitwise-identical results run after run, whatever order the emulator runs the
    threads in (its seed shuffles the schedule)."""
    emulator_or_skip()
    problem = make_problem(4, 3, 5, 33, seed=5)
    first = run_kernels(_launch.EmulatorRuntime(seed=1), problem)
    assert_bitwise_equal(first, run_kernels(_launch.EmulatorRuntime(seed=1), problem))
    assert_bitwise_equal(first, run_kernels(_launch.EmulatorRuntime(seed=2), problem))


@pytest.mark.emulated
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_emulated_step_norms_match_reference(emulator, shape):
    # Every shape with all upstream gradients; the missing ones on two shapes below.
    problem = make_norm_problem(shape, "all", seed=sum(shape))
    assert_step_norms_match_reference(run_step_norms(emulator, problem), problem, EMULATED_TOLERANCE)


@pytest.mark.emulated
@pytest.mark.parametrize("upstream", NORM_UPSTREAMS[1:])
@pytest.mark.parametrize("shape", [(5, 3, 5, 33), (5, 1, 12, 7)], ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_emulated_step_norms_missing_gradients(emulator, shape, upstream):
    problem = make_norm_problem(shape, upstream, seed=3)
    results = run_step_norms(emulator, problem)
    assert_step_norms_match_reference(results, problem, EMULATED_TOLERANCE)
    if upstream == "none":
        for name in STEP_NORMS:
            assert not results[name].any(), f"{name} must be exactly zero without upstream gradients"


@pytest.mark.emulated
@pytest.mark.parametrize("tile", _launch.STEP_TILES, ids=lambda tile: tile.name)
def test_emulated_step_norms_every_step_tile(emulator, tile):
    # 1, 2 and 4 warps per block; B = 5 and H = 40 leave threads without a (b, j) pair,
    # which must still take part in the block reduction.
    problem = make_norm_problem((3, 5, 8, 40), "all", seed=11)
    results = run_step_norms(emulator, problem, step_tile=tile)
    assert_step_norms_match_reference(results, problem, EMULATED_TOLERANCE)


@pytest.mark.emulated
def test_emulated_step_norms_deterministic_across_runs_and_schedules():
    emulator_or_skip()
    problem = make_norm_problem((4, 3, 5, 33), "all", seed=5)
    first = run_step_norms(_launch.EmulatorRuntime(seed=1), problem)
    assert_bitwise_equal(first, run_step_norms(_launch.EmulatorRuntime(seed=1), problem))
    assert_bitwise_equal(first, run_step_norms(_launch.EmulatorRuntime(seed=2), problem))


@pytest.mark.emulated
def test_emulated_step_norms_through_the_api(emulator):
    """rnnkernels.lstm_backward(..., return_step_norms=True) on backend="emulated"
    gives the launch plan's norms, as float64 NumPy arrays."""
    import rnnkernels

    problem = make_norm_problem((3, 2, 4, 9), "all", seed=29)
    out = rnnkernels.lstm_forward(
        problem.x, problem.w_ih, problem.w_hh, b_ih=problem.bias, b_hh=np.zeros_like(problem.bias),
        h0=problem.h0, c0=problem.c0, backend="emulated",
    )
    grads = rnnkernels.lstm_backward(out, problem.dy, problem.dh_n, problem.dc_n, return_step_norms=True)
    saved = ref_forward(problem.x, problem.w_ih, problem.w_hh, problem.bias, problem.h0, problem.c0, True)[3]
    expected = ref_backward(saved, problem.dy, problem.dh_n, problem.dc_n, return_step_norms=True)[-2:]
    for got, want in zip((grads.dh_norms, grads.dc_norms), expected):
        assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (3,)
        assert np.abs(got - want).max() / want.max() < EMULATED_TOLERANCE


@pytest.mark.emulated
def test_emulated_sanitized_run_is_clean():
    """The emulator's checked mode (out-of-bounds accesses, shared-memory races) finds
    nothing in a run that crosses every boundary check."""
    emulator_or_skip()
    problem = make_problem(2, 3, 5, 33, seed=9)
    runtime = _launch.EmulatorRuntime(sanitize=True)
    assert_matches_reference(run_kernels(runtime, problem), problem, EMULATED_TOLERANCE)
    assert_step_norms_match_reference(run_step_norms(runtime, problem), problem, EMULATED_TOLERANCE)


@pytest.mark.emulated
def test_emulated_large_activations_stay_finite(emulator):
    """Pre-activations of order 1e4: sigmoid and tanh must saturate, not overflow."""
    problem = make_problem(3, 2, 3, 7, seed=13)
    for name in ("x", "w_ih", "w_hh", "h0", "c0"):
        setattr(problem, name, (getattr(problem, name) * 1e4).astype(np.float32))
    problem.bias = (problem.bias * 1e4).astype(np.float32)
    results = run_kernels(emulator, problem)
    for name, value in results.items():
        assert np.isfinite(value).all(), name
    expected = reference_results(problem)
    assert relative_error(results["y"], expected["y"]) < EMULATED_TOLERANCE


# ---------------------------------------------------------------------- float16
# float16 problems: inputs and outputs float16, all math float32 (csrc/common.cuh).
# Judged by error ratio: the kernels' error against the float64 reference must be at
# most FLOAT16_RATIO times the error of the same LSTM done naively in float16 (every
# product, sum and activation rounded to float16), plus an absolute sanity bound.
FLOAT16_RATIO = 2.0
FLOAT16_SANITY = 1e-2


def to_float16(problem: Problem) -> Problem:
    return Problem(**{name: None if v is None else v.astype(np.float16) for name, v in vars(problem).items()})


def widened(problem: Problem) -> Problem:
    """The float16 problem's exact values in float64, for the reference."""
    return Problem(**{name: None if v is None else v.astype(np.float64) for name, v in vars(problem).items()})


def naive_float16(problem: Problem) -> dict:
    """Forward and backward of the LSTM in NumPy float16, each operation rounded to
    float16, products accumulated in float16 too: what the kernels must beat."""
    f16 = np.float16
    x, w_ih, w_hh, bias = problem.x, problem.w_ih, problem.w_hh, problem.bias
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    one = f16(1)

    def matmul(a, b):  # a [M, K] · b [K, N], a float16 sum over k
        acc = np.zeros((a.shape[0], b.shape[1]), f16)
        for k in range(a.shape[1]):
            acc = acc + a[:, k : k + 1] * b[k : k + 1, :]
        return acc

    def sigmoid(z):
        return one / (one + np.exp(-z))

    h, c = problem.h0, problem.c0
    hs, cs, gates = [h], [c], []
    for t in range(steps):
        z = matmul(x[t], w_ih.T) + matmul(h, w_hh.T)
        if bias is not None:
            z = z + bias
        i, f, o = sigmoid(z[:, :hidden]), sigmoid(z[:, hidden : 2 * hidden]), sigmoid(z[:, 3 * hidden :])
        g = np.tanh(z[:, 2 * hidden : 3 * hidden])
        c = f * c + i * g
        h = o * np.tanh(c)
        hs.append(h), cs.append(c), gates.append((i, f, g, o))

    dz_all = np.zeros((steps, batch, 4 * hidden), f16)
    dh_next, dc = np.zeros((batch, hidden), f16), problem.dc_n
    for t in reversed(range(steps)):
        i, f, g, o = gates[t]
        dh = problem.dy[t] + dh_next + (problem.dh_n if t == steps - 1 else f16(0))
        tanh_c = np.tanh(cs[t + 1])
        dc = dc + dh * o * (one - tanh_c * tanh_c)
        dz_all[t] = np.concatenate(
            [dc * g * i * (one - i), dc * cs[t] * f * (one - f), dc * i * (one - g * g), dh * tanh_c * o * (one - o)],
            axis=1,
        )
        dh_next = matmul(dz_all[t], w_hh)
        dc = dc * f
    dz = dz_all.reshape(steps * batch, 4 * hidden)
    h_prev = np.stack(hs[:-1]).reshape(steps * batch, hidden)
    db = None
    if bias is not None:
        db = np.zeros(4 * hidden, f16)
        for row in dz:
            db = db + row
    return {
        "y": np.stack(hs[1:]), "h_n": h, "c_n": c,
        "dx": matmul(dz, w_ih).reshape(x.shape), "dw_ih": matmul(dz.T, x.reshape(steps * batch, -1)),
        "dw_hh": matmul(dz.T, h_prev), "db": db, "dh0": dh_next, "dc0": dc,
    }


def assert_float16_beats_naive(results, problem16):
    """Every output float16 and finite, with error <= FLOAT16_RATIO x the naive float16
    LSTM's and below FLOAT16_SANITY, both against float64 on the same float16 inputs."""
    expected = reference_results(widened(problem16))
    with np.errstate(over="ignore"):
        naive = naive_float16(problem16)
    ratios = {}
    for name, want in expected.items():
        got = results[name]
        if want is None:
            assert got is None, f"{name} should be None without a bias"
            continue
        assert got.dtype == np.float16, f"{name} is {got.dtype}"
        assert got.shape == want.shape and np.isfinite(got).all(), name
        error = relative_error(got, want)
        naive_error = relative_error(naive[name.removesuffix("_inference")], want)
        ratios[name] = error / naive_error if naive_error else (0.0 if error == 0 else np.inf)
        assert error < FLOAT16_SANITY, f"{name}: relative error {error:.2e}"
    too_large = {name: f"{r:.2f}" for name, r in ratios.items() if not r <= FLOAT16_RATIO}
    assert not too_large, f"float16 error above {FLOAT16_RATIO} x naive float16: {too_large}"
    return ratios


FLOAT16_CASES = [
    pytest.param(shape, bias_and_state, id=f"T{shape[0]}-B{shape[1]}-I{shape[2]}-H{shape[3]}-"
                 + ("bias-state" if bias_and_state else "nobias-zerostate"))
    for shape in SMALL_SHAPES
    for bias_and_state in (True, False)
]


@pytest.mark.emulated
@pytest.mark.parametrize("shape, bias_and_state", FLOAT16_CASES)
def test_emulated_float16_beats_naive_float16(emulator, shape, bias_and_state):
    problem = to_float16(make_problem(*shape, bias=bias_and_state, initial_state=bias_and_state, seed=sum(shape)))
    assert_float16_beats_naive(run_kernels(emulator, problem), problem)


@pytest.mark.emulated
def test_emulated_float16_large_inputs_stay_finite(emulator):
    """|x| and |c0| ~ 1e4 (float16 holds up to 65504): the float32 math saturates the
    gates; outputs and gradients are finite float16 and close to the float64 reference
    rounded to float16 (some gradients are ~1e-100 there: a perfect kernel returns 0)."""
    problem = make_problem(3, 2, 3, 7, seed=13)
    problem.x = problem.x / np.abs(problem.x).max() * 1e4
    problem.c0 = problem.c0 / np.abs(problem.c0).max() * 1e4
    problem = to_float16(problem)
    results = run_kernels(emulator, problem)
    expected = reference_results(widened(problem))
    for name, value in results.items():
        assert value.dtype == np.float16 and np.isfinite(value).all(), name
        assert np.abs(expected[name]).max() < 6e4, f"{name}: the test's problem must fit float16"
        rounded = expected[name].astype(np.float16).astype(np.float64)
        assert relative_error(value, rounded) < FLOAT16_SANITY, name


@pytest.mark.emulated
def test_emulated_float16_through_the_api(emulator):
    """rnnkernels.lstm_forward/lstm_backward on backend="emulated" take float16 and
    return float16; mixed float16/float32 inputs stay a TypeError, and the cpu backend
    still rejects float16."""
    import rnnkernels

    problem = to_float16(make_problem(3, 2, 4, 9, seed=31))
    zeros = np.zeros_like(problem.bias)
    args = (problem.x, problem.w_ih, problem.w_hh)
    kwargs = dict(b_ih=problem.bias, b_hh=zeros, h0=problem.h0, c0=problem.c0)
    out = rnnkernels.lstm_forward(*args, **kwargs, backend="emulated")
    grads = rnnkernels.lstm_backward(out, problem.dy, problem.dh_n, problem.dc_n)
    results = {"y": out.y, "h_n": out.h_n, "c_n": out.c_n, "dx": grads.dx, "dw_ih": grads.dw_ih,
               "dw_hh": grads.dw_hh, "db": grads.db_ih, "dh0": grads.dh0, "dc0": grads.dc0}
    direct = run_kernels(emulator, problem)
    for name, value in results.items():
        assert isinstance(value, np.ndarray) and value.dtype == np.float16, name
        assert value.tobytes() == direct[name].tobytes(), f"{name}: the API and the launch plan differ"
    with pytest.raises(TypeError, match="share one dtype"):
        rnnkernels.lstm_forward(problem.x, problem.w_ih.astype(np.float32), problem.w_hh, backend="emulated")
    with pytest.raises(TypeError, match="backend 'cpu' supports dtypes"):
        rnnkernels.lstm_forward(*args, **kwargs, backend="cpu")


# SHA-256 of the float32 emulator results of the problem below, and where it was taken:
# the emulator runs the host's expf/tanhf, so another libm may give other (equally valid)
# bits. A change of these bits must be deliberate; each re-recording says why:
#   1f22d5fa.. at 2e2f9f7, the pre-float16 kernels (float16 support kept these bits);
#   2c008275.. the large GEMMs moved from csrc/gemm.cuh to NumPy float32 in the emulator
#              (cuBLAS on a GPU; rnnkernels/_gemm.py): another summation order;
#   e3e3fb8e.. the batch1 step tile (this problem's) splits its reduction over 16 k
#              slices (another order). The staging rewrite (loads in flight) left the
#              bits of the other tiles unchanged (checked bitwise on all three).
FLOAT32_DIGEST = "e3e3fb8e3055fbe2ad3b922e83cfdf4b7df2ec9200d88318b75dcc6d75ba913b"
FLOAT32_DIGEST_PLATFORM = (("glibc", "2.36"), "x86_64")
# The emulator's GEMMs are NumPy's BLAS, whose summation order may depend on the CPU it
# picks a kernel for: SHA-256 of the problem's input projection where the digest was
# recorded (OpenBLAS 0.3.31, AMD EPYC); another BLAS order skips the comparison.
FLOAT32_DIGEST_BLAS = "be2aedc735fe9c016a15f7c542993f7b49c6f258b760a7f04594a47ca8023f04"


@pytest.mark.emulated
@pytest.mark.parametrize("variant", ("step", "graph"))
def test_emulated_float32_bits_pinned(emulator, variant):
    """The float32 results (forward training and inference, backward with and without
    step norms) have the recorded bits, for both variants of the per-step path (same
    kernels, same launches)."""
    import hashlib
    import platform

    here = (platform.libc_ver(), platform.machine())
    if here != FLOAT32_DIGEST_PLATFORM:
        pytest.skip(f"digest recorded on {FLOAT32_DIGEST_PLATFORM}, this is {here} (another libm)")
    problem = make_problem(4, 3, 5, 33, seed=5)
    from rnnkernels import _gemm

    projection = np.empty((12, 132), np.float32)
    _gemm.numpy_gemm(problem.x.reshape(12, 5), problem.w_ih, projection, transpose_b=True)
    if hashlib.sha256(projection.tobytes()).hexdigest() != FLOAT32_DIGEST_BLAS:
        pytest.skip("this NumPy's BLAS sums in another order than where the digest was recorded")
    results = run_kernels(emulator, problem, variant=variant)
    results.update({f"norms_{k}": v for k, v in run_step_norms(emulator, problem, variant=variant).items()})
    digest = hashlib.sha256()
    for name in sorted(results):
        if results[name] is not None:
            digest.update(name.encode() + results[name].tobytes())
    assert digest.hexdigest() == FLOAT32_DIGEST



# --------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def gpu():
    cupy = cuda_backend_or_skip()
    return _launch.CupyRuntime(), cupy.asarray, cupy.asnumpy


def run_gpu(gpu, problem, **kwargs):
    runtime, to_device, to_host = gpu
    return run_kernels(runtime, problem, to_device=to_device, to_host=to_host, **kwargs)


# (T, B, I, H): up to H = 512, B = 64, T = 64; odd sizes cross every tile boundary.
LARGE_SHAPES = [(64, 64, 256, 512), (64, 8, 100, 257), (64, 1, 64, 512), (33, 17, 31, 96), (16, 64, 512, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("tile", _launch.STEP_TILES, ids=lambda tile: tile.name)
def test_gpu_every_step_tile(gpu, tile):
    problem = make_problem(6, 37, 20, 70, seed=11)
    assert_matches_reference(run_gpu(gpu, problem, step_tile=tile), problem, GPU_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_gpu_large_matches_reference(gpu, shape):
    problem = make_problem(*shape, seed=sum(shape))
    assert_matches_reference(run_gpu(gpu, problem), problem, GPU_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_long_sequence_finite_and_close(gpu):
    problem = make_problem(4096, 4, 32, 64, seed=17)
    errors = assert_matches_reference(run_gpu(gpu, problem), problem, 1e-4)
    print("T=4096 relative errors:", {name: f"{error:.1e}" for name, error in errors.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("upstream", NORM_UPSTREAMS)
def test_gpu_step_norms_match_reference(gpu, shape, upstream):
    problem = make_norm_problem(shape, upstream, seed=sum(shape))
    runtime, to_device, to_host = gpu
    results = run_step_norms(runtime, problem, to_device=to_device, to_host=to_host)
    assert_step_norms_match_reference(results, problem, GPU_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", _launch.STEP_TILES, ids=lambda tile: tile.name)
def test_gpu_step_norms_every_step_tile(gpu, tile):
    problem = make_norm_problem((6, 37, 20, 70), "all", seed=11)
    runtime, to_device, to_host = gpu
    results = run_step_norms(runtime, problem, step_tile=tile, to_device=to_device, to_host=to_host)
    assert_step_norms_match_reference(results, problem, GPU_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_gpu_large_step_norms_match_reference(gpu, shape):
    problem = make_norm_problem(shape, "all", seed=sum(shape))
    runtime, to_device, to_host = gpu
    results = run_step_norms(runtime, problem, to_device=to_device, to_host=to_host)
    assert_step_norms_match_reference(results, problem, GPU_TOLERANCE)


@pytest.mark.gpu
def test_gpu_step_norms_deterministic(gpu):
    problem = make_norm_problem((16, 19, 24, 96), "all", seed=19)
    runtime, to_device, to_host = gpu
    first = run_step_norms(runtime, problem, to_device=to_device, to_host=to_host)
    for _ in range(3):
        assert_bitwise_equal(first, run_step_norms(runtime, problem, to_device=to_device, to_host=to_host))


@pytest.mark.gpu
def test_gpu_deterministic(gpu):
    problem = make_problem(16, 19, 24, 96, seed=19)
    first = run_gpu(gpu, problem)
    for _ in range(3):
        assert_bitwise_equal(first, run_gpu(gpu, problem))


@pytest.mark.gpu
def test_gpu_backend_on_caller_stream(gpu):
    """The registered backend on a non-default stream gives the default stream's bits."""
    import cupy

    from rnnkernels import cuda

    problem = make_problem(5, 3, 6, 33, seed=23)
    arrays = {name: None if value is None else cupy.asarray(value) for name, value in vars(problem).items()}

    def run():
        y, h_n, c_n, saved = cuda.BACKEND.forward(
            arrays["x"], arrays["w_ih"], arrays["w_hh"], arrays["bias"], arrays["h0"], arrays["c0"], True
        )
        grads = cuda.BACKEND.backward(saved, arrays["dy"], arrays["dh_n"], arrays["dc_n"])
        return {name: cupy.asnumpy(v) for name, v in zip(OUTPUTS + GRADIENTS, (y, h_n, c_n, *grads))}

    on_default = run()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        on_stream = run()
        stream.synchronize()
    assert_bitwise_equal(on_default, on_stream)
    expected = reference_results(problem)
    for name, value in on_default.items():
        assert relative_error(value, expected[name]) < GPU_TOLERANCE, name


def _compute_sanitizer() -> str | None:
    found = os.environ.get("COMPUTE_SANITIZER") or shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and Path(root, "bin", "compute-sanitizer").is_file():
            return str(Path(root, "bin", "compute-sanitizer"))
    return None


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_compute_sanitizer_clean(gpu):
    """tests/gpu_sanitizer.sh: the fast GPU tests under memcheck and racecheck."""
    if os.environ.get("RNNKERNELS_UNDER_SANITIZER"):
        pytest.skip("already running under compute-sanitizer")
    if _compute_sanitizer() is None:
        pytest.skip("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    completed = subprocess.run(
        ["bash", str(REPO / "tests" / "gpu_sanitizer.sh")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},  # this interpreter, not whatever `python` is
    )
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-6000:]


# ------------------------------------------------------------------ both runtimes
@pytest.fixture(
    scope="module",
    params=[pytest.param("emulated", marks=pytest.mark.emulated), pytest.param("gpu", marks=pytest.mark.gpu)],
)
def kernels(request):
    """``(run, tolerance)`` on the emulator or on the GPU (each param carries its marker
    and skips like the ``emulator`` and ``gpu`` fixtures): ``run(problem, **kwargs)`` is
    :func:`run_kernels` on that runtime, with host arrays in and out."""
    if request.param == "emulated":
        return functools.partial(run_kernels, request.getfixturevalue("emulator")), EMULATED_TOLERANCE
    return functools.partial(run_gpu, request.getfixturevalue("gpu")), GPU_TOLERANCE


@pytest.mark.parametrize("shape, bias", SMALL_CASES)
def test_matches_reference(kernels, shape, bias):
    run, tolerance = kernels
    problem = make_problem(*shape, bias=bias, seed=sum(shape))
    assert_matches_reference(run(problem), problem, tolerance)


@pytest.mark.parametrize("initial_state, upstream", STATE_CASES)
def test_state_and_missing_gradients(kernels, initial_state, upstream):
    run, tolerance = kernels
    problem = make_problem(3, 3, 5, 33, initial_state=initial_state, upstream=upstream, seed=7)
    results = run(problem)
    assert_matches_reference(results, problem, tolerance)
    if upstream == "none":
        for name in GRADIENTS:
            assert not results[name].any(), f"{name} must be exactly zero without upstream gradients"


# ------------------------------------------------------------- shape rejection
class _NoLaunchRuntime:
    """Fails the test if the launch plan gets as far as asking for a kernel."""

    xp = np
    sm_count = 4

    def function(self, source, name_expression):
        raise AssertionError(f"{name_expression} should not have been reached")


@pytest.mark.parametrize(
    "steps, batch, hidden, message",
    [(2, 3, 0, "hidden_size >= 1"), (0, 3, 4, "T >= 1"), (2, 0, 4, "B >= 1"), (1, 2**20, 4, "grid")],
)
def test_unsupported_shapes_rejected_before_launch(steps, batch, hidden, message):
    x = np.zeros((steps, batch, 3), np.float32)
    state = np.zeros((batch, hidden), np.float32)
    w_ih, w_hh = np.zeros((4 * hidden, 3), np.float32), np.zeros((4 * hidden, hidden), np.float32)
    tile = _launch.STEP_TILES[-1]  # one row per block: 2^20 rows exceed grid.y
    with pytest.raises(ValueError, match=message):
        _launch.forward(_NoLaunchRuntime(), x, w_ih, w_hh, None, state, state, True, step_tile=tile)


def test_sizes_keep_a_tile_of_headroom_below_int32():
    """The kernels' reduction loops step a 32-bit int one tile past the last index, so
    the launcher refuses sizes within a tile of 2^31 before anything is allocated."""
    limit = _launch._MAX_SIZE
    _launch._check_sizes(limit, 1, 1, 1)  # T*B at the limit: accepted
    with pytest.raises(ValueError, match="T\\*B = 2147483584 exceeds 2147483583"):
        _launch._check_sizes(limit + 1, 1, 1, 1)
    with pytest.raises(ValueError, match="input_size"):
        _launch._check_sizes(1, 1, limit + 1, 1)


def test_unknown_variant_rejected_before_launch():
    x = np.zeros((2, 3, 3), np.float32)
    state = np.zeros((3, 4), np.float32)
    w_ih, w_hh = np.zeros((16, 3), np.float32), np.zeros((16, 4), np.float32)
    with pytest.raises(ValueError, match="variant must be one of"):
        _launch.forward(_NoLaunchRuntime(), x, w_ih, w_hh, None, state, state, True, variant="warp-speed")


def test_the_emulator_runtimes_fresh_arrays_are_poisoned():
    """The emulated launch plans allocate with NaN-filled (0xFF) empty(): an output or
    workspace a kernel forgets to write shows as NaN instead of stale memory."""
    xp = _launch.EmulatorRuntime().xp
    assert np.isnan(xp.empty((3, 4), dtype=np.float32)).all()
    assert np.isnan(xp.empty((2, 3), dtype=np.float64, order="F")).all()
    assert (xp.empty_like(np.zeros((2, 5), np.int32).T) == -1).all()
    assert xp.zeros is np.zeros and xp.float32 is np.float32  # the rest is NumPy
