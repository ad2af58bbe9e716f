"""The float64 reference against central finite differences: every input and
parameter, h0, c0 and both biases included."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GRAD_OF, make_problem, make_upstream, rel_err

import rnnkernels


def _loss(problem, upstream, batch_first=False):
    """L = Σ dy ⊙ y + Σ dh_n ⊙ h_n + Σ dc_n ⊙ c_n, whose gradient the backward
    computes when handed dy, dh_n, dc_n."""
    out = rnnkernels.lstm_forward(**problem, batch_first=batch_first, training=False, backend="reference")
    return float(np.sum(upstream["dy"] * out.y) + np.sum(upstream["dh_n"] * out.h_n) + np.sum(upstream["dc_n"] * out.c_n))


def _numerical_grad(problem, upstream, name, batch_first=False, eps=1e-6):
    value = problem[name]
    grad = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        original = value[index]
        value[index] = original + eps
        plus = _loss(problem, upstream, batch_first)
        value[index] = original - eps
        minus = _loss(problem, upstream, batch_first)
        value[index] = original
        grad[index] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize(
    "steps, batch, input_size, hidden, batch_first",
    [(3, 2, 3, 4, False), (1, 1, 2, 3, False), (4, 3, 5, 2, True)],
)
def test_reference_gradients_match_finite_differences(steps, batch, input_size, hidden, batch_first):
    problem = make_problem(steps, batch, input_size, hidden, seed=steps)
    upstream = make_upstream(steps, batch, hidden, seed=hidden)
    if batch_first:
        problem["x"] = np.ascontiguousarray(problem["x"].transpose(1, 0, 2))
        upstream["dy"] = np.ascontiguousarray(upstream["dy"].transpose(1, 0, 2))
    out = rnnkernels.lstm_forward(**problem, batch_first=batch_first, backend="reference")
    grads = rnnkernels.lstm_backward(out, **upstream)
    for name, grad_name in GRAD_OF.items():
        numerical = _numerical_grad(problem, upstream, name, batch_first)
        analytic = getattr(grads, grad_name)
        assert analytic.shape == problem[name].shape
        assert rel_err(analytic, numerical) < 1e-6, name


def test_reference_returns_float64_for_float32_input():
    problem = make_problem(2, 2, 3, 4, dtype=np.float32)
    out = rnnkernels.lstm_forward(**problem, backend="reference")
    assert out.y.dtype == np.float64 and out.h_n.dtype == np.float64
    grads = rnnkernels.lstm_backward(out, dy=np.ones((2, 2, 4), np.float32))
    assert grads.dw_hh.dtype == np.float64


def test_reference_matches_torch_lstm():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    problem = make_problem(6, 3, 5, 4, seed=3)
    lstm = torch.nn.LSTM(5, 4, dtype=torch.float64)
    with torch.no_grad():
        for name, key in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"), ("bias_ih_l0", "b_ih"), ("bias_hh_l0", "b_hh")):
            getattr(lstm, name).copy_(torch.from_numpy(problem[key]))
    y, (h_n, c_n) = lstm(torch.from_numpy(problem["x"]), (torch.from_numpy(problem["h0"])[None], torch.from_numpy(problem["c0"])[None]))
    out = rnnkernels.lstm_forward(**problem, backend="reference")
    assert rel_err(out.y, y.detach().numpy()) < 1e-12
    assert rel_err(out.h_n, h_n[0].detach().numpy()) < 1e-12
    assert rel_err(out.c_n, c_n[0].detach().numpy()) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_input_size_zero_gives_empty_input_gradients(backend):
    """I = 0 (no input features) is a valid, if odd, LSTM: the recurrence alone."""
    x, w_ih, w_hh = np.zeros((3, 2, 0)), np.zeros((16, 0)), 0.1 * np.ones((16, 4))
    h0, c0 = np.full((2, 4), 0.5), np.full((2, 4), -0.3)  # a state, so h_t and dW_hh are not 0
    out = rnnkernels.lstm_forward(x, w_ih, w_hh, h0=h0, c0=c0, backend=backend)
    grads = rnnkernels.lstm_backward(out, dy=np.ones_like(out.y))
    assert grads.dx.shape == (3, 2, 0) and grads.dw_ih.shape == (16, 0)
    assert np.all(np.isfinite(grads.dw_hh)) and np.any(grads.dw_hh != 0)
