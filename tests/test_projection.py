"""proj_size (LSTM with a projection, h_t = W_hr (o ⊙ tanh c_t)): the float64
reference against central finite differences and torch.nn.LSTM, and
rnnkernels.torch.LSTM(proj_size=...) against nn.LSTM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnkernels import reference


def _problem(rng, steps=4, batch=3, input_size=5, hidden=6, proj=3, bias=True):
    return dict(
        x=rng.standard_normal((steps, batch, input_size)),
        w_ih=rng.standard_normal((4 * hidden, input_size)) * 0.4,
        w_hh=rng.standard_normal((4 * hidden, proj)) * 0.4,
        bias=rng.standard_normal(4 * hidden) * 0.2 if bias else None,
        w_hr=rng.standard_normal((proj, hidden)) * 0.4,
        h0=rng.standard_normal((batch, proj)),
        c0=rng.standard_normal((batch, hidden)),
    )


@pytest.mark.parametrize("bias", [True, False])
def test_reference_projected_against_finite_differences(bias):
    rng = np.random.default_rng(0)
    p = _problem(rng, bias=bias)
    y, h_n, c_n, saved = reference.forward_projected(**p)
    dy, dh_n, dc_n = rng.standard_normal(y.shape), rng.standard_normal(h_n.shape), rng.standard_normal(c_n.shape)

    def loss(q):
        y, h_n, c_n, _ = reference.forward_projected(**q, training=False)
        return float((y * dy).sum() + (h_n * dh_n).sum() + (c_n * dc_n).sum())

    dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0 = reference.backward_projected(saved, dy, dh_n, dc_n)
    analytic = {"x": dx, "w_ih": dw_ih, "w_hh": dw_hh, "bias": db, "w_hr": dw_hr, "h0": dh0, "c0": dc0}
    eps = 1e-6
    for name, grad in analytic.items():
        if p[name] is None:
            assert grad is None
            continue
        numeric = np.empty_like(p[name])
        for index in np.ndindex(p[name].shape):
            plus = {k: (None if v is None else v.copy()) for k, v in p.items()}
            minus = {k: (None if v is None else v.copy()) for k, v in p.items()}
            plus[name][index] += eps
            minus[name][index] -= eps
            numeric[index] = (loss(plus) - loss(minus)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_reference_projected_matches_nn_lstm():
    rng = np.random.default_rng(1)
    p = _problem(rng)
    module = torch.nn.LSTM(5, 6, proj_size=3).double()
    with torch.no_grad():
        module.weight_ih_l0.copy_(torch.from_numpy(p["w_ih"]))
        module.weight_hh_l0.copy_(torch.from_numpy(p["w_hh"]))
        module.bias_ih_l0.copy_(torch.from_numpy(p["bias"]))
        module.bias_hh_l0.zero_()
        module.weight_hr_l0.copy_(torch.from_numpy(p["w_hr"]))
    x = torch.from_numpy(p["x"]).requires_grad_()
    h0, c0 = (torch.from_numpy(p[k])[None].requires_grad_() for k in ("h0", "c0"))
    y_t, (h_t, c_t) = module(x, (h0, c0))
    y, h_n, c_n, saved = reference.forward_projected(**p)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(h_n, h_t[0].detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(c_n, c_t[0].detach().numpy(), rtol=1e-12, atol=1e-13)
    dy = rng.standard_normal(y.shape)
    (y_t * torch.from_numpy(dy)).sum().backward()
    dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0 = reference.backward_projected(saved, dy, np.zeros_like(h_n), np.zeros_like(c_n))
    for ours, theirs in ((dx, x.grad), (dw_ih, module.weight_ih_l0.grad), (dw_hh, module.weight_hh_l0.grad),
                         (db, module.bias_ih_l0.grad), (dw_hr, module.weight_hr_l0.grad), (dh0, h0.grad[0]), (dc0, c0.grad[0])):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-12)
