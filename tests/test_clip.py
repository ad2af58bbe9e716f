"""clip_grad_norm: the global-norm math, what it scales and what it leaves alone, and
that NaN or Inf is reported, never scaled into the gradients."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import cupy_or_skip, make_problem, torch_or_skip

import rnnkernels
from rnnkernels.clip import LSTM_PARAMETER_FIELDS, clip_grad_norm, global_grad_norm


def _grads(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((6, 5)),
        "b": rng.standard_normal(6).astype(np.float32),
        "v": rng.standard_normal((2, 3, 4)),
    }


def _flat_norm(arrays) -> float:
    return float(np.linalg.norm(np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])))


def test_returns_global_norm_and_scales_to_max_norm():
    grads = _grads()
    before = {k: v.copy() for k, v in grads.items()}
    expected = _flat_norm(before.values())
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert isinstance(norm, float) and norm == pytest.approx(expected, rel=1e-12)
    assert _flat_norm(grads.values()) == pytest.approx(1.0, rel=1e-6)
    for k in grads:  # one common factor: the direction is kept
        np.testing.assert_allclose(grads[k], before[k] * (1.0 / (expected + 1e-6)), rtol=1e-6)
        assert grads[k].dtype == before[k].dtype


def test_below_max_norm_nothing_changes():
    grads = _grads()
    before = {k: v.copy() for k, v in grads.items()}
    norm = clip_grad_norm(grads, max_norm=1e3)
    assert norm == pytest.approx(_flat_norm(before.values()), rel=1e-12)
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])


def test_nested_iterables_none_and_duplicates():
    a, b = np.full(4, 3.0), np.full(9, 4.0 / 3.0)  # ‖a‖ = 6, ‖b‖ = 4
    assert global_grad_norm([a, None, (b,), {"again": a}]) == pytest.approx(math.hypot(6, 4))
    assert global_grad_norm([]) == 0.0
    assert clip_grad_norm([None], 1.0) == 0.0
    clip_grad_norm([a, a], 1.0)  # listed twice, scaled once
    assert np.linalg.norm(a) == pytest.approx(1.0, rel=1e-6)


def test_lstm_grads_clip_parameter_gradients_only():
    problem = make_problem(5, 3, 4, 6, seed=4)
    out = rnnkernels.lstm_forward(**problem, backend="reference")
    grads = rnnkernels.lstm_backward(out, dy=np.ones((5, 3, 6)) * 10)
    params_before = {f: getattr(grads, f).copy() for f in LSTM_PARAMETER_FIELDS}
    dx_before = grads.dx.copy()
    expected = _flat_norm(params_before.values())  # db_ih and db_hh both count, as in torch
    norm = clip_grad_norm(grads, max_norm=0.5)
    assert norm == pytest.approx(expected, rel=1e-12)
    assert _flat_norm(getattr(grads, f) for f in LSTM_PARAMETER_FIELDS) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_array_equal(grads.dx, dx_before)
    # a stack of layers: one global norm over both
    second = rnnkernels.lstm_backward(out, dy=np.ones((5, 3, 6)))
    combined = math.hypot(global_grad_norm(grads), global_grad_norm(second))
    assert clip_grad_norm([grads, second], 1e9) == pytest.approx(combined, rel=1e-12)


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_gru_and_rnn_grads_clip_parameter_gradients_only(cell):
    rng = np.random.default_rng(2)
    gates = 3 if cell == "gru" else 1
    x = rng.standard_normal((5, 3, 4))
    w_ih, w_hh = rng.standard_normal((gates * 6, 4)), rng.standard_normal((gates * 6, 6)) * 0.3
    b_ih, b_hh = rng.standard_normal(gates * 6), rng.standard_normal(gates * 6)
    forward = rnnkernels.gru_forward if cell == "gru" else rnnkernels.rnn_forward
    backward = rnnkernels.gru_backward if cell == "gru" else rnnkernels.rnn_backward
    grads = backward(forward(x, w_ih, w_hh, b_ih, b_hh, backend="reference"), dy=np.ones((5, 3, 6)) * 10)
    expected = _flat_norm(getattr(grads, f).copy() for f in LSTM_PARAMETER_FIELDS)
    dx_before = grads.dx.copy()
    assert clip_grad_norm(grads, max_norm=0.5) == pytest.approx(expected, rel=1e-12)
    assert _flat_norm(getattr(grads, f) for f in LSTM_PARAMETER_FIELDS) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_array_equal(grads.dx, dx_before)


def test_low_precision_squares_do_not_overflow():
    half = np.full(100, 300.0, np.float16)  # 300² = 9e4 overflows float16 (max 65504)
    assert global_grad_norm([half]) == pytest.approx(3000.0, rel=1e-6)
    huge = np.array([3e200, 4e200])  # squares overflow float64
    assert global_grad_norm({"huge": huge}) == pytest.approx(5e200, rel=1e-12)
    clip_grad_norm([huge], 1.0)
    assert np.linalg.norm(huge) == pytest.approx(1.0, rel=1e-9)
    big32 = np.full(4, 1e30, np.float32)
    assert global_grad_norm(big32) == pytest.approx(2e30, rel=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_raises_naming_the_gradient_and_scales_nothing(bad):
    grads = _grads()
    grads["v"][1, 2, 3] = bad
    before = {k: v.copy() for k, v in grads.items()}
    with pytest.raises(FloatingPointError, match=r"grads\['v'\]") as info:
        clip_grad_norm(grads, max_norm=1.0)
    assert "'w'" not in str(info.value) and "'b'" not in str(info.value)
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])


def test_nonfinite_without_error_warns_and_returns_it_unscaled():
    grads = _grads()
    grads["w"][0, 0] = np.inf
    grads["b"][2] = np.nan
    before = {k: v.copy() for k, v in grads.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norm = clip_grad_norm(grads, max_norm=1.0, error_if_nonfinite=False)
    assert math.isnan(norm)  # NaN wins over Inf
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert "grads['w']" in str(caught[0].message) and "grads['b']" in str(caught[0].message)
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])
    only_inf = {"w": np.array([1.0, np.inf])}
    with pytest.warns(RuntimeWarning, match="inf"):
        assert clip_grad_norm(only_inf, 1.0, error_if_nonfinite=False) == math.inf


def test_nonfinite_lstm_gradient_is_named():
    problem = make_problem(3, 2, 3, 4, seed=1)
    out = rnnkernels.lstm_forward(**problem, backend="reference")
    grads = rnnkernels.lstm_backward(out, dy=np.ones((3, 2, 4)))
    grads.dw_hh[0, 0] = np.nan
    with pytest.raises(FloatingPointError, match=r"grads\.dw_hh"):
        clip_grad_norm(grads, 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(_grads(), 0.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(_grads(), math.nan)
    with pytest.raises(TypeError, match="floating"):
        clip_grad_norm([np.arange(3)], 1.0)
    with pytest.raises(TypeError, match="array"):
        clip_grad_norm({"x": "not an array"}, 1.0)
    frozen = np.ones(3)
    frozen.flags.writeable = False
    other = np.ones(3)
    with pytest.raises(ValueError, match="read-only"):
        clip_grad_norm([other, frozen], 0.1)
    np.testing.assert_array_equal(other, 1.0)  # checked before anything was scaled
    assert global_grad_norm(frozen) == pytest.approx(math.sqrt(3))


def test_torch_tensors_clip_in_place_and_report_nan():
    torch = torch_or_skip()
    p = torch.nn.Parameter(torch.ones(3, 4))
    g = torch.full((5,), 2.0, dtype=torch.float64)
    host = np.full(2, 1.0)
    expected = _flat_norm([p.detach().numpy(), g.numpy(), host])
    assert clip_grad_norm([p, g, host], 1.0) == pytest.approx(expected, rel=1e-12)
    assert _flat_norm([p.detach().numpy(), g.numpy(), host]) == pytest.approx(1.0, rel=1e-6)
    assert p.requires_grad and p.dtype == torch.float32
    g[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"grads\[1\]"):
        clip_grad_norm([p, g], 1.0)


@pytest.mark.gpu
def test_cupy_matches_numpy():
    cupy = cupy_or_skip()
    host = _grads()
    host["h"] = np.full(100, 300.0, np.float16)
    device = {k: cupy.asarray(v) for k, v in host.items()}
    expected = global_grad_norm(host)
    assert clip_grad_norm(device, 1.0) == pytest.approx(expected, rel=1e-12)
    assert global_grad_norm(device) == pytest.approx(1.0, rel=1e-3)  # float16 rounding
    device["w"][0, 0] = cupy.nan
    with pytest.raises(FloatingPointError, match=r"grads\['w'\]"):
        clip_grad_norm(device, 1.0)


def test_module_backward_grads_are_accepted():
    # rnnkernels.LSTM.backward returns an LSTMModuleGrads: clipping it clips its
    # parameter gradients (params), not dx, dh0, dc0, as for an LSTMGrads.
    lstm = rnnkernels.LSTM(3, 4, num_layers=2, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    y, _ = lstm(x)
    grads = lstm.backward(100 * np.ones_like(y))
    dx = grads.dx.copy()
    params = {name: g.copy() for name, g in grads.params.items()}
    total = clip_grad_norm(grads, 1.0)
    assert total == pytest.approx(_flat_norm(params.values()), rel=1e-6)
    assert global_grad_norm(grads.params) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_array_equal(grads.dx, dx)
    assert global_grad_norm(grads) == pytest.approx(1.0, rel=1e-5)
