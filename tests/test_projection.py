"""proj_size (LSTM with a projection, h_t = W_hr (o ⊙ tanh c_t)): the float64
reference against central finite differences and torch.nn.LSTM, and
rnnkernels.torch.LSTM(proj_size=...) against nn.LSTM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cuda_backend_or_skip, emulator_or_skip

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
    # backend "cuda" takes CUDA tensors only.
    with pytest.raises(NotImplementedError, match="proj_size.*'cuda' on cpu tensors"):
        rtorch.LSTM(5, 4, proj_size=2, backend="cuda")(torch.randn(3, 2, 5))
    module = rtorch.LSTM(5, 4, proj_size=2)
    with pytest.raises(RuntimeError, match="hidden\\[0\\] size"):
        module(torch.randn(3, 2, 5), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))


# ----------------------------------------------------------------------------- NumPy module

_CONFIGS = [
    {},
    {"bias": False},
    {"bidirectional": True},
    {"num_layers": 2, "bidirectional": True, "batch_first": True},
    {"num_layers": 2, "bias": False, "batch_first": True},
]


def _numpy_pair(kwargs, dtype, backend, seed=0):
    """A torch.nn.LSTM(5, 6, proj_size=3) in ``dtype`` and rnnkernels.LSTM with its weights."""
    import rnnkernels

    torch.manual_seed(seed)
    theirs = torch.nn.LSTM(5, 6, proj_size=3, **kwargs).to(dtype)
    ours = rnnkernels.LSTM.from_torch(theirs, dtype={torch.float32: np.float32, torch.float64: np.float64}[dtype], backend=backend)
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kwargs", _CONFIGS)
def test_numpy_module_with_projection_matches_nn_lstm(dtype, backend, kwargs):
    ours, theirs = _numpy_pair(kwargs, dtype, backend)
    names = [name for name, _ in theirs.named_parameters()]
    assert [name for name, _ in ours.named_parameters()] == names
    assert all(ours.state_dict()[n].shape == tuple(p.shape) for n, p in theirs.named_parameters())
    assert ours.proj_size == 3 and "proj_size=3" in repr(ours)
    rows = ours.num_layers * ours.num_directions
    steps, batch = 4, 3
    x = torch.randn((batch, steps, 5) if ours.batch_first else (steps, batch, 5), dtype=dtype)
    h0, c0 = torch.randn(rows, batch, 3, dtype=dtype), torch.randn(rows, batch, 6, dtype=dtype)
    xt, h0t, c0t = (t.clone().requires_grad_() for t in (x, h0, c0))
    y_t, (h_t, c_t) = theirs(xt, (h0t, c0t))
    dy, dh, dc = torch.randn_like(y_t), torch.randn_like(h_t), torch.randn_like(c_t)
    torch.autograd.backward((y_t, h_t, c_t), (dy, dh, dc))

    x_np, h0_np, c0_np = (t.numpy().copy() for t in (x, h0, c0))
    inputs = [a.copy() for a in (x_np, h0_np, c0_np)]
    y, (h_n, c_n) = ours(x_np, (h0_np, c0_np))
    assert y.dtype == h_n.dtype == c_n.dtype == ours.dtype
    assert y.shape == tuple(y_t.shape) and h_n.shape == (rows, batch, 3) and c_n.shape == (rows, batch, 6)
    grads = ours.backward(dy.numpy(), dh.numpy(), dc.numpy())
    for before, after in zip(inputs, (x_np, h0_np, c0_np)):
        np.testing.assert_array_equal(before, after)  # inputs never modified

    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 2e-5}
    pairs = [("y", y, y_t), ("h_n", h_n, h_t), ("c_n", c_n, c_t), ("dx", grads.dx, xt.grad),
             ("dh0", grads.dh0, h0t.grad), ("dc0", grads.dc0, c0t.grad)]
    assert list(grads.params) == names
    pairs += [(name, grads.params[name], p.grad) for name, p in theirs.named_parameters()]
    for name, a, b in pairs:
        assert a.dtype == ours.dtype, name
        np.testing.assert_allclose(a, b.detach().numpy(), err_msg=name, **tol)

    # No state given: zeros of the projected widths; eval mode records nothing.
    y0, (h0n, c0n) = ours.eval()(x_np)
    y0_t, (h0n_t, c0n_t) = theirs(x)
    for a, b in ((y0, y0_t), (h0n, h0n_t), (c0n, c0n_t)):
        np.testing.assert_allclose(a, b.detach().numpy(), **tol)
    with pytest.raises(ValueError, match="training mode"):
        ours.backward(dy.numpy())


def test_numpy_module_projection_unbatched_and_zero_upstream():
    ours, theirs = _numpy_pair({"num_layers": 2, "bidirectional": True}, torch.float64, "cpu", seed=3)
    x = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    y_t, (h_t, c_t) = theirs(x)
    y_t.square().sum().backward()
    y, (h_n, c_n) = ours(x.detach().numpy())
    assert y.shape == (5, 6) and h_n.shape == (4, 3) and c_n.shape == (4, 6)
    grads = ours.backward(2 * y)  # dh_n, dc_n missing: zero
    for a, b in ((y, y_t), (h_n, h_t), (c_n, c_t)):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads.dx, x.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert grads.dh0.shape == (4, 3) and grads.dc0.shape == (4, 6)
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(grads.params[name], p.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def test_numpy_module_projection_dropout_gradients_against_finite_differences():
    """Dropout between layers (training mode) with a projection: the masks are drawn
    from the module's generator, so reseeding it before each call fixes them and
    central differences of the loss check backward, dropout included."""
    import rnnkernels

    lstm = rnnkernels.LSTM(4, 5, num_layers=2, dropout=0.5, bidirectional=True, proj_size=2, dtype=np.float64, seed=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 4))
    w = rng.standard_normal((3, 2, 4))

    def run(x_value):
        lstm._rng = np.random.default_rng(5)
        return lstm(x_value)[0]

    y = run(x)
    assert np.any(y != 0)
    grads = lstm.backward(w)
    # A second call with another mask gives another output: dropout is on.
    assert not np.allclose(lstm(x)[0], y)
    eps = 1e-6
    for _ in range(4):
        direction = rng.standard_normal(x.shape)
        numeric = ((run(x + eps * direction) * w).sum() - (run(x - eps * direction) * w).sum()) / (2 * eps)
        np.testing.assert_allclose((grads.dx * direction).sum(), numeric, rtol=1e-6, atol=1e-8)
    for name in ("weight_hr_l0", "weight_hr_l1_reverse", "weight_hh_l1"):
        direction = rng.standard_normal(lstm._params[name].shape)
        original = lstm._params[name].copy()
        values = []
        for sign in (1, -1):
            lstm._params[name][...] = original + sign * eps * direction
            values.append((run(x) * w).sum())
        lstm._params[name][...] = original
        np.testing.assert_allclose((grads.params[name] * direction).sum(), (values[0] - values[1]) / (2 * eps), rtol=1e-6, atol=1e-8, err_msg=name)


def test_numpy_module_projection_state_dict_both_ways():
    import rnnkernels

    theirs = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3).double()
    ours = rnnkernels.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3, dtype=np.float64, seed=1)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.load_state_dict(theirs.state_dict()) == ([], [])
    for name, value in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[name], value.numpy())
    other = rnnkernels.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3, dtype=np.float64, seed=2)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in other.state_dict().items()}, strict=True)
    for name, value in theirs.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[name], value.numpy())
    # Strict both ways: a state dict without projections does not fit, nor ours an unprojected LSTM.
    plain = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True).double()
    with pytest.raises(ValueError, match="weight_hr_l0"):
        ours.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match="weight_hr_l0"):
        plain.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    bad = dict(theirs.state_dict())
    bad["weight_hr_l1"] = torch.zeros(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight_hr_l1 must have shape \\(3, 6\\)"):
        ours.load_state_dict(bad)


def test_numpy_module_projection_refusals():
    import rnnkernels

    with pytest.raises(NotImplementedError, match="proj_size.*'cuda' on device 'cpu'"):
        rnnkernels.LSTM(5, 4, proj_size=2, backend="cuda")
    for backend in ("cpu", "reference", "emulated"):
        with pytest.raises(NotImplementedError, match=f"proj_size.*{backend!r} on device 'cuda'"):
            rnnkernels.LSTM(5, 4, proj_size=2, backend=backend, device="cuda")
    with pytest.raises(ValueError, match="proj_size"):
        rnnkernels.LSTM(5, 4, proj_size=4)
    with pytest.raises(ValueError, match="proj_size"):
        rnnkernels.LSTM(5, 4, proj_size=-1)
    with pytest.raises(TypeError, match="proj_size"):
        rnnkernels.LSTM(5, 4, proj_size=True)
    lstm = rnnkernels.LSTM(5, 4, proj_size=2)
    x = np.zeros((3, 2, 5), np.float32)
    with pytest.raises(ValueError, match="h0 must have shape \\(1, 2, 2\\)"):
        lstm(x, (np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 4), np.float32)))
    with pytest.raises(ValueError, match="c0 must have shape \\(1, 2, 4\\)"):
        lstm(x, (np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), np.float32)))
    lstm(x)
    with pytest.raises(ValueError, match="dh_n must have shape \\(1, 2, 2\\)"):
        lstm.backward(dh_n=np.zeros((1, 2, 4), np.float32))
    with pytest.raises(NotImplementedError, match="proj_size"):
        lstm.load_keras_weights([np.zeros((5, 16)), np.zeros((2, 16)), np.zeros(16)])
    with pytest.raises(NotImplementedError, match="proj_size"):
        lstm.keras_weights()


# ------------------------------------------------------- the CUDA kernels (emulated)
# rnnkernels/_projected.py: per-step GEMMs (NumPy float32 in the emulator, cuBLAS on a
# GPU) and our pointwise cell kernels, run on the CPU emulator.


def _emulated_problem(rng, dtype, bias=True, **sizes):
    p = _problem(rng, bias=bias, **sizes)
    # The kernels' inputs; the reference gets the same values in float64.
    kernel_inputs = {k: None if v is None else v.astype(dtype) for k, v in p.items()}
    if bias:
        kernel_inputs["bias"] = p["bias"].astype(dtype).astype(np.float32)
    return {k: None if v is None else v.astype(np.float64) for k, v in kernel_inputs.items()}, kernel_inputs


def _kernel_run(rt, inputs, upstream, variant):
    from rnnkernels import _projected

    y, h_n, c_n, saved = _projected.forward(rt, *(inputs[k] for k in ("x", "w_ih", "w_hh", "bias", "w_hr", "h0", "c0")),
                                            True, variant=variant)
    grads = _projected.backward(rt, saved, *upstream, variant=variant)
    return (y, h_n, c_n), grads


@pytest.mark.emulated
@pytest.mark.parametrize("dtype, rtol, atol", [(np.float32, 1e-5, 2e-6), (np.float16, 2e-2, 5e-3)])
@pytest.mark.parametrize("bias", [True, False])
def test_emulated_kernels_match_reference_graph_equals_step(dtype, rtol, atol, bias):
    from rnnkernels import _projected

    rng = np.random.default_rng(3)
    ref_inputs, inputs = _emulated_problem(rng, dtype, bias, steps=5, batch=3, hidden=7, proj=4)
    y, h_n, c_n, saved = reference.forward_projected(**ref_inputs)
    upstream = [rng.standard_normal(a.shape).astype(dtype) for a in (y, h_n, c_n)]
    expected = reference.backward_projected(saved, *(u.astype(np.float64) for u in upstream))
    before = {k: None if v is None else v.copy() for k, v in inputs.items()}
    upstream_before = [u.copy() for u in upstream]

    rt = emulator_or_skip()
    results = {variant: _kernel_run(rt, inputs, upstream, variant) for variant in ("step", "graph")}
    replay = _kernel_run(rt, inputs, upstream, "graph")  # the cached graph, replayed
    outputs, grads = results["step"]
    for ours, ref, name in zip(outputs + grads, (y, h_n, c_n) + expected,
                               ("y", "h_n", "c_n", "dx", "dw_ih", "dw_hh", "db", "dw_hr", "dh0", "dc0")):
        if ref is None:
            assert ours is None and not bias
            continue
        assert ours.dtype == dtype, name
        np.testing.assert_allclose(ours.astype(np.float64), ref, rtol=rtol, atol=atol, err_msg=name)
    # graph == step, bitwise, first capture and replay.
    for other in (results["graph"], replay):
        for a, b in zip(outputs + grads, other[0] + other[1]):
            assert (a is None and b is None) or np.array_equal(a, b)
    # Inference (two cell-state slots, no gates saved) gives training's bits.
    for variant in ("step", "graph"):
        *inference, no_saved = _projected.forward(
            rt, *(inputs[k] for k in ("x", "w_ih", "w_hh", "bias", "w_hr", "h0", "c0")), False, variant=variant)
        assert no_saved is None
        for a, b in zip(inference, outputs):
            assert np.array_equal(a, b)
    # Inputs unmodified.
    for k, v in before.items():
        assert (v is None and inputs[k] is None) or np.array_equal(v, inputs[k]), k
    for u, u0 in zip(upstream, upstream_before):
        assert np.array_equal(u, u0)


@pytest.mark.emulated
def test_emulated_kernels_refuse_float64_and_unknown_variant():
    from rnnkernels import _projected

    rng = np.random.default_rng(4)
    _, inputs = _emulated_problem(rng, np.float32)
    args = [inputs[k] for k in ("x", "w_ih", "w_hh", "bias", "w_hr", "h0", "c0")]
    rt = emulator_or_skip()
    with pytest.raises(ValueError, match="variant.*persistent"):
        _projected.forward(rt, *args, True, variant="persistent")
    with pytest.raises(TypeError, match="x must be one of"):
        _projected.forward(rt, *(None if a is None else a.astype(np.float64) for a in args), True)
    with pytest.raises(TypeError, match="w_hr must have x's dtype"):
        _projected.forward(rt, *args[:4], args[4].astype(np.float16), *args[5:], True)


@pytest.mark.emulated
@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True}, {"bias": False}])
def test_torch_module_emulated_projection_matches_nn_lstm(kwargs):
    import rnnkernels.torch as rtorch

    emulator_or_skip()
    torch.manual_seed(5)
    theirs = torch.nn.LSTM(5, 6, proj_size=3, **kwargs)
    ours = rtorch.LSTM(5, 6, proj_size=3, backend="emulated", **kwargs)
    ours.load_state_dict(theirs.state_dict())
    directions = 2 if kwargs.get("bidirectional") else 1
    layers = kwargs.get("num_layers", 1)
    x = torch.randn(3, 4, 5) if kwargs.get("batch_first") else torch.randn(4, 3, 5)
    h0 = torch.randn(layers * directions, 3, 3)
    c0 = torch.randn(layers * directions, 3, 6)
    results = []
    for module in (ours, theirs):
        xs, hs, cs = (t.clone().requires_grad_() for t in (x, h0, c0))
        y, (h, c) = module(xs, (hs, cs))
        (y.square().sum() + h.sum() + (c * 0.3).sum()).backward()
        results.append([y, h, c, xs.grad, hs.grad, cs.grad] + [p.grad for p in module.parameters()])
    names = ["y", "h_n", "c_n", "dx", "dh0", "dc0"] + [n for n, _ in theirs.named_parameters()]
    assert any("weight_hr" in n for n in names)
    for a, b, name in zip(*results, names):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)


@pytest.mark.emulated
def test_numpy_module_emulated_projection_matches_nn_lstm():
    emulator_or_skip()
    kwargs = {"num_layers": 2, "bidirectional": True}
    ours, theirs = _numpy_pair(kwargs, torch.float32, "emulated", seed=6)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 2, 5)).astype(np.float32)
    x_before = x.copy()
    y, (h_n, c_n) = ours(x)
    xt = torch.from_numpy(x).requires_grad_()
    y_t, (h_t, c_t) = theirs(xt)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(h_n, h_t.detach().numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(c_n, c_t.detach().numpy(), rtol=1e-5, atol=2e-6)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    grads = ours.backward(dy)
    (y_t * torch.from_numpy(dy)).sum().backward()
    np.testing.assert_allclose(grads.dx, xt.grad.numpy(), rtol=1e-5, atol=2e-6)
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(grads.params[name], p.grad.numpy(), rtol=1e-5, atol=2e-6, err_msg=name)
    assert np.array_equal(x, x_before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_projection_matches_nn_lstm(dtype):
    """rnnkernels.torch.LSTM(proj_size, backend "auto") on CUDA tensors (cuBLAS and our
    cells) against nn.LSTM in float64 on the CPU: forward and every gradient; and the
    graph variant's bits against the step variant's."""
    import rnnkernels.torch as rtorch
    from rnnkernels import _launch, _projected

    cupy = cuda_backend_or_skip()
    torch.manual_seed(7)
    kwargs = {"num_layers": 2, "bidirectional": True}
    theirs = torch.nn.LSTM(16, 24, proj_size=8, **kwargs).double()
    ours = rtorch.LSTM(16, 24, proj_size=8, **kwargs).to("cuda", dtype)
    ours.load_state_dict({k: v.to(dtype) for k, v in theirs.state_dict().items()})
    theirs.load_state_dict({k: v.to(dtype).double() for k, v in theirs.state_dict().items()})
    x = torch.randn(9, 5, 16).to(dtype)
    results = []
    for module, device, cast in ((ours, "cuda", dtype), (theirs, "cpu", torch.float64)):
        xs = x.to(device, cast).requires_grad_()
        y, (h, c) = module(xs)
        (y.float().square().sum() + h.float().sum() + (c.float() * 0.3).sum()).backward()
        results.append([t.detach().cpu().double() for t in [y, h, c, xs.grad] + [p.grad for p in module.parameters()]])
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b, name in zip(*results, ["y", "h_n", "c_n", "dx"] + [n for n, _ in theirs.named_parameters()]):
        torch.testing.assert_close(a, b, msg=name, **tol)

    rng = np.random.default_rng(7)
    _, inputs = _emulated_problem(rng, np.float32, steps=6, batch=4, hidden=33, proj=9)
    args = [None if inputs[k] is None else cupy.asarray(inputs[k]) for k in ("x", "w_ih", "w_hh", "bias", "w_hr", "h0", "c0")]
    rt = _launch.CupyRuntime()
    runs = []
    for variant in ("step", "graph", "graph"):
        y, h_n, c_n, saved = _projected.forward(rt, *args, True, variant=variant)
        upstream = [cupy.ones_like(a) for a in (y, h_n, c_n)]
        runs.append([cupy.asnumpy(a) for a in (y, h_n, c_n, *_projected.backward(rt, saved, *upstream, variant=variant))])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- per-row lengths
#
# proj_size with lengths runs the unprojected path's segments (modules.run_direction /
# backward_direction with the projected forward and backward per segment); checked
# against nn.LSTM(proj_size) on a PackedSequence, which runs each row to its own length.

_LENGTHS = [3, 5, 1, 3]  # unsorted, repeated, one row of a single step


def _packed_reference(dtype, seed=0):
    """nn.LSTM(proj_size) (2 layers, bidirectional) on a packed batch with lengths
    ``_LENGTHS`` (enforce_sorted=False): its module, padded input, the upstream
    gradients, outputs and every gradient."""
    torch.manual_seed(seed)
    steps, batch, input_size, hidden, proj = 5, len(_LENGTHS), 3, 6, 2
    theirs = torch.nn.LSTM(input_size, hidden, num_layers=2, bidirectional=True, proj_size=proj).to(dtype)
    x = torch.randn(steps, batch, input_size, dtype=dtype)
    state = (torch.randn(4, batch, proj, dtype=dtype), torch.randn(4, batch, hidden, dtype=dtype))
    inside = (torch.arange(steps)[:, None] < torch.tensor(_LENGTHS)[None, :])[..., None]
    dy = torch.randn(steps, batch, 2 * proj, dtype=dtype) * inside
    dh, dc = torch.randn_like(state[0]), torch.randn_like(state[1])
    return theirs, x, state, dy, dh, dc


def _run_torch(module, x, state, dy, dh, dc, mode):
    """Outputs and gradients (x, h0, c0, then every parameter) of ``module`` on the
    padded ``x`` with ``_LENGTHS``: ``mode`` "packed" or "lengths" (``lengths=``)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    x = x.clone().requires_grad_()
    state = tuple(s.clone().requires_grad_() for s in state)
    if mode == "packed":
        packed = pack_padded_sequence(x, _LENGTHS, enforce_sorted=False)
        y, (h_n, c_n) = module(packed, state)
        y = pad_packed_sequence(y, total_length=x.shape[0])[0]
    else:
        y, (h_n, c_n) = module(x, state, lengths=torch.tensor(_LENGTHS))
    torch.autograd.backward([y, h_n, c_n], [dy, dh, dc])
    grads = [x.grad, *(s.grad for s in state)] + [p.grad for _, p in module.named_parameters()]
    return [y.detach(), h_n.detach(), c_n.detach()], grads


@pytest.mark.parametrize("backend, mode", [("cpu", "packed"), ("cpu", "lengths"), ("emulated", "packed")])
def test_torch_module_projection_with_lengths_matches_nn_lstm(backend, mode):
    import rnnkernels.torch as rtorch

    if backend == "emulated":
        emulator_or_skip()
    # float64 on the cpu backend (NumPy in the input dtype: tight); the emulated kernels
    # compute in float32.
    dtype = torch.float64 if backend == "cpu" else torch.float32
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    theirs, x, state, dy, dh, dc = _packed_reference(dtype)
    ours = rtorch.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2, backend=backend).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    expected_out, expected_grads = _run_torch(theirs, x, state, dy, dh, dc, "packed")
    out, grads = _run_torch(ours, x, state, dy, dh, dc, mode)
    names = ["x", "h0", "c0"] + [n for n, _ in theirs.named_parameters()]
    assert any("weight_hr" in n for n in names)
    for name, a, b in zip(("y", "h_n", "c_n"), out, expected_out):
        torch.testing.assert_close(a, b, **tol, msg=name)
    for name, a, b in zip(names, grads, expected_grads):
        assert a is not None, name
        torch.testing.assert_close(a, b, **tol, msg=name)
    # Padding gets no output and no gradient.
    inside = (torch.arange(5)[:, None] < torch.tensor(_LENGTHS)[None, :])[..., None]
    assert torch.all(out[0] * ~inside == 0) and torch.all(grads[0] * ~inside == 0)


@pytest.mark.parametrize("backend", ["reference", "cpu", "emulated"])
def test_numpy_module_projection_with_lengths_matches_nn_lstm(backend):
    import rnnkernels

    if backend == "emulated":
        emulator_or_skip()
    dtype = np.float32 if backend == "emulated" else np.float64
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-9, "atol": 1e-10}
    theirs, x, state, dy, dh, dc = _packed_reference(torch.float64, seed=1)
    expected_out, expected_grads = _run_torch(theirs, x, state, dy, dh, dc, "packed")
    ours = rnnkernels.LSTM.from_torch(theirs, backend=backend, dtype=dtype)
    as_np = lambda t: t.numpy().astype(dtype)  # noqa: E731
    inputs = [as_np(a) for a in (x, *state, dy, dh, dc)]
    before = [a.copy() for a in inputs]
    y, (h_n, c_n) = ours(inputs[0], (inputs[1], inputs[2]), lengths=np.array(_LENGTHS))
    g = ours.backward(*inputs[3:])
    for a, b in zip(inputs, before):
        np.testing.assert_array_equal(a, b)  # inputs never modified
    for name, a, b in zip(("y", "h_n", "c_n"), (y, h_n, c_n), expected_out):
        np.testing.assert_allclose(a, b.numpy(), **tol, err_msg=name)
    for name, a, b in zip(("dx", "dh0", "dc0"), (g.dx, g.dh0, g.dc0), expected_grads[:3]):
        np.testing.assert_allclose(a, b.numpy(), **tol, err_msg=name)
    params = dict(theirs.named_parameters())
    assert set(g.params) == set(params)
    for name, p in params.items():
        np.testing.assert_allclose(g.params[name], p.grad.numpy(), **tol, err_msg=name)


def test_torch_projection_with_lengths_zero_row_batch_first_and_opcheck():
    """A row of length 0 (allowed with ``lengths=``, not by packing) keeps its state and
    gets zero output and gradient; the rows around it match nn.LSTM on packed input,
    batch_first; the projected ops with lengths pass opcheck's schema and fake checks."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    import rnnkernels.torch as rtorch
    from rnnkernels.torch import _ops

    torch.manual_seed(3)
    ours = rtorch.LSTM(3, 5, proj_size=2, bidirectional=True, batch_first=True, backend="cpu").double()
    theirs = torch.nn.LSTM(3, 5, proj_size=2, bidirectional=True, batch_first=True).double()
    theirs.load_state_dict(ours.state_dict())
    lengths, live = torch.tensor([0, 4, 2, 4]), [1, 2, 3]
    x = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, 2, dtype=torch.float64)
    c0 = torch.randn(2, 4, 5, dtype=torch.float64)
    y, (h_n, c_n) = ours(x, (h0, c0), lengths=lengths)
    (y.square().sum() + h_n.sum() + c_n.square().sum()).backward()
    x_live = x.detach()[live].requires_grad_()
    packed = pack_padded_sequence(x_live, lengths[live], batch_first=True, enforce_sorted=False)
    y_ref, (h_ref, c_ref) = theirs(packed, (h0[:, live], c0[:, live]))
    y_ref = pad_packed_sequence(y_ref, batch_first=True, total_length=4)[0]
    (y_ref.square().sum() + h_ref.sum() + c_ref.square().sum()).backward()
    tol = {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(y[live], y_ref, **tol)
    torch.testing.assert_close(h_n[:, live], h_ref, **tol)
    torch.testing.assert_close(c_n[:, live], c_ref, **tol)
    torch.testing.assert_close(x.grad[live], x_live.grad, **tol)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **tol, msg=name)
    assert torch.all(y[0] == 0) and torch.all(x.grad[0] == 0)
    assert torch.equal(h_n[:, 0], h0[:, 0]) and torch.equal(c_n[:, 0], c0[:, 0])

    steps, batch, hidden, proj = 4, 3, 5, 2
    r = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    args = (r(steps, batch, 3), r(4 * hidden, 3), r(4 * hidden, proj), r(4 * hidden), r(4 * hidden), r(proj, hidden),
            r(batch, proj), r(batch, hidden), torch.tensor([2, 0, 4]), True, "cpu")
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(_ops.lstm_layer_projected, args, test_utils=checks)
    saved = _ops.lstm_layer_projected(*args)[3:]
    backward_args = (r(steps, batch, proj), r(batch, proj), r(batch, hidden), *args[:3], args[5], True, saved, *args[8:])
    torch.library.opcheck(_ops.lstm_layer_projected_backward, backward_args, test_utils=checks)
