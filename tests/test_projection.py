"""proj_size (LSTM with a projection, h_t = W_hr (o ⊙ tanh c_t)): the float64
reference against central finite differences and torch.nn.LSTM, and
rnnkernels.torch.LSTM(proj_size=...) against nn.LSTM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnkernels import reference


def _problem(rng, steps=4, batch=3, input_size=5, hidden=6, proj=3, bias=True):
    return {
        "x": rng.standard_normal((steps, batch, input_size)),
        "w_ih": rng.standard_normal((4 * hidden, input_size)) * 0.4,
        "w_hh": rng.standard_normal((4 * hidden, proj)) * 0.4,
        "bias": rng.standard_normal(4 * hidden) * 0.2 if bias else None,
        "w_hr": rng.standard_normal((proj, hidden)) * 0.4,
        "h0": rng.standard_normal((batch, proj)),
        "c0": rng.standard_normal((batch, hidden)),
    }


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


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True}, {"bias": False}])
def test_torch_module_with_projection_matches_nn_lstm(backend, kwargs):
    import rnnkernels.torch as rtorch

    torch.manual_seed(7)
    dtype = torch.float64
    theirs = torch.nn.LSTM(5, 6, proj_size=3, **kwargs).to(dtype)
    ours = rtorch.LSTM(5, 6, proj_size=3, backend=backend, **kwargs).to(dtype)
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert [[p.shape for p in g] for g in ours.all_weights] == [[p.shape for p in g] for g in theirs.all_weights]
    assert repr(ours) == repr(theirs) if backend == "auto" else "backend='reference'" in repr(ours)
    ours.load_state_dict(theirs.state_dict())
    rows = 2 * (1 + kwargs.get("bidirectional", False)) if kwargs.get("num_layers") else 1
    x = torch.randn(3, 4, 5, dtype=dtype)
    state = (torch.randn(rows, 3 if kwargs.get("batch_first") else 4, 3, dtype=dtype),
             torch.randn(rows, 3 if kwargs.get("batch_first") else 4, 6, dtype=dtype))
    results = []
    for module in (ours, theirs):
        xs, h0, c0 = (t.clone().requires_grad_() for t in (x, *state))
        y, (h, c) = module(xs, (h0, c0))
        (y.square().sum() + h.sum() + (c * 0.3).sum()).backward()
        results.append([y, h, c, xs.grad, h0.grad, c0.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # No state given: zeros of the right widths; float32 on the cpu backend.
    ours32, theirs32 = ours.float(), theirs.float()
    torch.testing.assert_close(ours32(x.float())[0], theirs32(x.float())[0], rtol=1e-5, atol=1e-6)


def test_torch_module_projection_refusals():
    import rnnkernels.torch as rtorch

    with pytest.raises(ValueError, match="smaller than hidden_size"):
        rtorch.LSTM(5, 4, proj_size=4)
    with pytest.raises(ValueError, match="positive integer or zero"):
        rtorch.LSTM(5, 4, proj_size=-1)
    with pytest.raises(NotImplementedError, match="proj_size"):
        rtorch.LSTM(5, 4, proj_size=2, backend="emulated")
    module = rtorch.LSTM(5, 4, proj_size=2)
    with pytest.raises(NotImplementedError, match="lengths"):
        module(torch.randn(3, 2, 5), lengths=[3, 1])
    with pytest.raises(RuntimeError, match="hidden\\[0\\] size"):
        module(torch.randn(3, 2, 5), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
