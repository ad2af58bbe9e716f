"""The float64 references of the GRU (rnnkernels/gru_reference.py) and the Elman RNN,
tanh and relu (rnnkernels/rnn_reference.py), issue 15's first slice: forward against
torch.nn.GRU / torch.nn.RNN; every gradient against central finite differences of the
reference's own forward and against torch autograd; the per-step norms ‖∂L/∂h_t‖ against
finite differences and against torch autograd on a model unrolled step by step
(GRUCell / RNNCell); relu's derivative at exactly 0; dtypes; inputs never modified."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err, torch_or_skip

from rnnkernels import gru_reference, rnn_reference

CELLS = ("gru", "rnn_tanh", "rnn_relu")
GRAD_NAMES = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0")
BIASES = ("both", "none", "ih", "hh")  # which of b_ih, b_hh exist


def gates(cell):
    return 3 if cell == "gru" else 1


def forward(cell, p, training=True):
    if cell == "gru":
        return gru_reference.forward(**p, training=training)
    return rnn_reference.forward(**p, nonlinearity=cell.removeprefix("rnn_"), training=training)


def backward(cell, saved, dy, dh_n, return_step_norms=False):
    module = gru_reference if cell == "gru" else rnn_reference
    return module.backward(saved, dy, dh_n, return_step_norms=return_step_norms)


def make_problem(cell, steps, batch, input_size, hidden, *, biases="both", state=True, seed=0, scale=1.0):
    """Inputs as a dict, weights U(±scale/√H) (torch.nn's default at scale 1)."""
    rng = np.random.default_rng(seed)
    bound = scale / np.sqrt(hidden)
    rows = gates(cell) * hidden

    def u(*shape):
        return rng.uniform(-bound, bound, shape)

    return {
        "x": rng.standard_normal((steps, batch, input_size)),
        "w_ih": u(rows, input_size),
        "w_hh": u(rows, hidden),
        "b_ih": u(rows) if biases in ("both", "ih") else None,
        "b_hh": u(rows) if biases in ("both", "hh") else None,
        "h0": rng.standard_normal((batch, hidden)) * 0.5 if state else None,
    }


def make_upstream(steps, batch, hidden, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((steps, batch, hidden)), rng.standard_normal((batch, hidden))


def loss_of(cell, p, dy, dh_n):
    """L = Σ dy ⊙ y + Σ dh_n ⊙ h_n, by the reference's forward alone."""
    y, h_n, _ = forward(cell, p, training=False)
    return float(np.sum(dy * y) + np.sum(dh_n * h_n))


def central_difference(f, value, eps=1e-6):
    """∂f/∂value by central differences, perturbing ``value`` in place and restoring it."""
    grad = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        original = value[index]
        value[index] = original + eps
        plus = f()
        value[index] = original - eps
        minus = f()
        value[index] = original
        grad[index] = (plus - minus) / (2 * eps)
    return grad


def relu_margin(p):
    """The smallest |a_t| of an Elman RNN's pre-activations over the whole run: finite
    differences of relu are only valid where no unit sits within eps of the kink."""
    _, _, saved = rnn_reference.forward(**p, nonlinearity="relu")
    h_prev = saved.h[:-1]
    a = p["x"] @ p["w_ih"].T + h_prev @ p["w_hh"].T
    for bias in (p["b_ih"], p["b_hh"]):
        if bias is not None:
            a = a + bias
    return float(np.abs(a).min())


# ----------------------------------------------------------------------------- torch side


def torch_model(cell, p, input_size, hidden, *, unrolled=False):
    """torch.nn.GRU / torch.nn.RNN (or the GRUCell / RNNCell, for an unrolled model) in
    float64 holding the problem's weights; a missing bias is zero in torch."""
    torch = torch_or_skip()
    has_bias = p["b_ih"] is not None or p["b_hh"] is not None
    if cell == "gru":
        model = (torch.nn.GRUCell if unrolled else torch.nn.GRU)(input_size, hidden, bias=has_bias, dtype=torch.float64)
    else:
        kind = torch.nn.RNNCell if unrolled else torch.nn.RNN
        model = kind(input_size, hidden, bias=has_bias, nonlinearity=cell.removeprefix("rnn_"), dtype=torch.float64)
    suffix = "" if unrolled else "_l0"
    with torch.no_grad():
        getattr(model, "weight_ih" + suffix).copy_(torch.from_numpy(p["w_ih"]))
        getattr(model, "weight_hh" + suffix).copy_(torch.from_numpy(p["w_hh"]))
        if has_bias:
            for name in ("b_ih", "b_hh"):
                param = getattr(model, name.replace("b_", "bias_") + suffix)
                param.copy_(torch.from_numpy(p[name])) if p[name] is not None else param.zero_()
    return model


def torch_gradients(cell, p, dy, dh_n):
    """y, h_n and the gradients of L = Σ dy ⊙ y + Σ dh_n ⊙ h_n by torch autograd."""
    torch = torch_or_skip()
    input_size, hidden = p["x"].shape[2], p["w_hh"].shape[1]
    model = torch_model(cell, p, input_size, hidden)
    x = torch.tensor(p["x"], requires_grad=True)
    h0 = None if p["h0"] is None else torch.tensor(p["h0"][None], requires_grad=True)
    y, h_n = model(x, h0)
    loss = (y * torch.from_numpy(dy)).sum() + (h_n[0] * torch.from_numpy(dh_n)).sum()
    loss.backward()
    grads = {
        "x": x.grad.numpy(),
        "w_ih": model.weight_ih_l0.grad.numpy(),
        "w_hh": model.weight_hh_l0.grad.numpy(),
        "b_ih": None if p["b_ih"] is None else model.bias_ih_l0.grad.numpy(),
        "b_hh": None if p["b_hh"] is None else model.bias_hh_l0.grad.numpy(),
        "h0": None if h0 is None else h0.grad[0].numpy(),
    }
    return y.detach().numpy(), h_n[0].detach().numpy(), grads


# ----------------------------------------------------------------------------- forward vs torch

SHAPES = [  # (T, B, I, H): T and B of 1, I != H both ways, H not a multiple of anything
    (1, 1, 1, 1),
    (1, 3, 5, 2),
    (5, 1, 2, 7),
    (6, 3, 4, 5),
    (3, 2, 9, 3),
]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("biases", BIASES)
@pytest.mark.parametrize("state", [True, False], ids=["h0", "no_h0"])
def test_matches_torch_forward_and_autograd(cell, shape, biases, state):
    steps, batch, _, hidden = shape
    p = make_problem(cell, *shape, biases=biases, state=state, seed=sum(shape), scale=2.0)
    dy, dh_n = make_upstream(steps, batch, hidden, seed=steps + batch)
    y, h_n, saved = forward(cell, p)
    assert y.shape == (steps, batch, hidden) and h_n.shape == (batch, hidden)
    assert y.dtype == h_n.dtype == np.float64
    np.testing.assert_array_equal(h_n, y[-1])

    torch_y, torch_h_n, torch_grads = torch_gradients(cell, p, dy, dh_n)
    assert rel_err(y, torch_y) < 1e-13
    assert rel_err(h_n, torch_h_n) < 1e-13
    grads = dict(zip(GRAD_NAMES, backward(cell, saved, dy, dh_n)))
    for name in GRAD_NAMES:
        if name in ("b_ih", "b_hh", "h0") and p[name] is None:
            # a missing bias has no gradient (None, as the LSTM's missing bias); a
            # missing h0 (zero) still has one: dh0 is the gradient of that zero state
            if name == "h0":
                assert grads[name].shape == (batch, hidden)
            else:
                assert grads[name] is None, name
            continue
        assert grads[name].shape == p[name].shape, name
        assert grads[name].dtype == np.float64, name
        assert rel_err(grads[name], torch_grads[name]) < 1e-12, name


# ----------------------------------------------------------------------------- finite differences

FD_SHAPES = [(1, 1, 2, 1), (3, 2, 3, 4), (4, 3, 2, 3)]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", FD_SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("biases", BIASES)
def test_every_gradient_matches_finite_differences(cell, shape, biases):
    steps, batch, _, hidden = shape
    # weights U(±1.5/√H): the gates sit inside their curved range, so a wrong factor in
    # any derivative shows; h0 given, so dh0 is exercised with a nonzero state
    p = make_problem(cell, *shape, biases=biases, seed=3 * steps + hidden, scale=1.5)
    dy, dh_n = make_upstream(steps, batch, hidden, seed=7)
    if cell == "rnn_relu":
        # a difference of eps = 1e-6 in any input moves any a_t by a few 1e-6 at most (the
        # weights are below 1, |x| and |h| a few units): no unit crosses the kink, so the
        # differences are valid
        assert relu_margin(p) > 1e-4
    _, _, saved = forward(cell, p)
    grads = dict(zip(GRAD_NAMES, backward(cell, saved, dy, dh_n)))
    for name in GRAD_NAMES:
        if p[name] is None:
            assert grads[name] is None, name
            continue
        numerical = central_difference(lambda: loss_of(cell, p, dy, dh_n), p[name])
        assert rel_err(grads[name], numerical) < 1e-6, name


@pytest.mark.parametrize("cell", CELLS)
def test_step_norms_match_finite_differences(cell):
    """‖∂L/∂h_t‖ against central differences: the run is split after step t, h_t is
    perturbed where it is made (it reaches both y_t and step t+1), and the rest of the
    sequence is run from the perturbed state, by the reference's forward alone."""
    steps, batch, input_size, hidden = 5, 2, 3, 4
    p = make_problem(cell, steps, batch, input_size, hidden, seed=11, scale=1.5)
    dy, dh_n = make_upstream(steps, batch, hidden, seed=12)
    if cell == "rnn_relu":
        assert relu_margin(p) > 1e-4  # see test_every_gradient_matches_finite_differences
    _, _, saved = forward(cell, p)
    *grads, norms = backward(cell, saved, dy, dh_n, return_step_norms=True)
    assert len(grads) == 6 and norms.shape == (steps,) and norms.dtype == np.float64

    def loss(t, delta):
        head = dict(p, x=p["x"][: t + 1])
        y_head, h_t, _ = forward(cell, head, training=False)
        h_t = h_t + delta
        y_head[t] += delta
        tail = dict(p, x=p["x"][t + 1 :], h0=h_t)  # empty when t = T-1: h_n is then h_t
        y_tail, h_n, _ = forward(cell, tail, training=False)
        return float(np.sum(dy[: t + 1] * y_head) + np.sum(dy[t + 1 :] * y_tail) + np.sum(dh_n * h_n))

    for t in range(steps):
        delta = np.zeros((batch, hidden))
        numerical = central_difference(lambda t=t, delta=delta: loss(t, delta), delta)
        assert norms[t] == pytest.approx(np.linalg.norm(numerical), rel=1e-7), t


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("state", [True, False], ids=["h0", "no_h0"])
def test_step_norms_match_torch_unrolled(cell, state):
    """‖∂L/∂h_t‖ against torch autograd on the model unrolled with GRUCell / RNNCell,
    reading each h_t's .grad (the whole gradient reaching it: from y_t and from step t+1)."""
    torch = torch_or_skip()
    steps, batch, input_size, hidden = 7, 3, 4, 5
    p = make_problem(cell, steps, batch, input_size, hidden, state=state, seed=13, scale=2.0)
    dy, dh_n = make_upstream(steps, batch, hidden, seed=14)
    _, _, saved = forward(cell, p)
    *_, norms = backward(cell, saved, dy, dh_n, return_step_norms=True)

    model = torch_model(cell, p, input_size, hidden, unrolled=True)
    h = torch.zeros(batch, hidden, dtype=torch.float64) if p["h0"] is None else torch.from_numpy(p["h0"])
    states, loss = [], 0.0
    for t in range(steps):
        h = model(torch.from_numpy(p["x"][t]), h)
        h.retain_grad()
        states.append(h)
        loss = loss + (h * torch.from_numpy(dy[t])).sum()
    loss = loss + (h * torch.from_numpy(dh_n)).sum()
    loss.backward()
    expected = np.array([float(torch.linalg.norm(state.grad)) for state in states])
    assert rel_err(norms, expected) < 1e-13
    np.testing.assert_allclose(norms, expected, rtol=1e-12)  # elementwise: the small ones too


# ----------------------------------------------------------------------------- relu at 0


def test_relu_derivative_is_zero_at_zero_as_in_torch():
    """Units whose weight rows and biases are zero have a_t = 0 exactly at every step;
    relu'(0) = 0 in torch, so nothing flows through them: their rows of dW_ih, dW_hh and
    db are zero, and every gradient matches torch autograd."""
    steps, batch, input_size, hidden = 4, 3, 3, 5
    p = make_problem("rnn_relu", steps, batch, input_size, hidden, seed=17, scale=2.0)
    dead = [1, 3]
    for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
        p[name][dead] = 0.0
    dy, dh_n = make_upstream(steps, batch, hidden, seed=18)
    y, _, saved = rnn_reference.forward(**p, nonlinearity="relu")
    assert not y[:, :, dead].any()  # relu(0) = 0 at every step
    grads = dict(zip(GRAD_NAMES, rnn_reference.backward(saved, dy, dh_n)))
    for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
        assert not grads[name][dead].any(), name
    # some live unit still learns, so the zero rows are not a degenerate all-zero result
    assert np.abs(grads["w_ih"]).sum() > 0
    _, _, torch_grads = torch_gradients("rnn_relu", p, dy, dh_n)
    for name in GRAD_NAMES:
        np.testing.assert_allclose(grads[name], torch_grads[name], rtol=1e-12, atol=1e-15, err_msg=name)


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("cell", CELLS)
def test_missing_upstream_gradients_are_zero(cell):
    steps, batch, input_size, hidden = 4, 2, 3, 5
    p = make_problem(cell, steps, batch, input_size, hidden, seed=19)
    dy, dh_n = make_upstream(steps, batch, hidden, seed=20)
    _, _, saved = forward(cell, p)
    cases = {
        "no dy": ((None, dh_n), (np.zeros_like(dy), dh_n)),
        "no dh_n": ((dy, None), (dy, np.zeros_like(dh_n))),
        "neither": ((None, None), (np.zeros_like(dy), np.zeros_like(dh_n))),
    }
    for case, (given, zeros) in cases.items():
        got = backward(cell, saved, *given, return_step_norms=True)
        want = backward(cell, saved, *zeros, return_step_norms=True)
        for name, a, b in zip(GRAD_NAMES + ("dh_norms",), got, want):
            np.testing.assert_array_equal(a, b, err_msg=f"{case}: {name}")
    dx, dw_ih, dw_hh, db_ih, db_hh, dh0, norms = backward(cell, saved, None, None, return_step_norms=True)
    for a in (dx, dw_ih, dw_hh, db_ih, db_hh, dh0, norms):
        assert not a.any()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_other_float_dtypes_are_widened_to_float64(cell, dtype):
    steps, batch, input_size, hidden = 3, 2, 4, 3
    p64 = make_problem(cell, steps, batch, input_size, hidden, seed=23)
    p = {name: value.astype(dtype) for name, value in p64.items()}
    widened = {name: value.astype(np.float64) for name, value in p.items()}  # exact
    dy, dh_n = (a.astype(dtype) for a in make_upstream(steps, batch, hidden, seed=24))
    y, h_n, saved = forward(cell, p)
    y_want, h_n_want, saved_want = forward(cell, widened)
    assert y.dtype == h_n.dtype == np.float64
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(h_n, h_n_want)
    got = backward(cell, saved, dy, dh_n, return_step_norms=True)
    want = backward(cell, saved_want, dy.astype(np.float64), dh_n.astype(np.float64), return_step_norms=True)
    for name, a, b in zip(GRAD_NAMES + ("dh_norms",), got, want):
        assert a.dtype == np.float64, name
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("cell", CELLS)
def test_inputs_are_never_modified_and_saved_is_a_copy(cell):
    steps, batch, input_size, hidden = 4, 3, 2, 5
    p = make_problem(cell, steps, batch, input_size, hidden, seed=29)
    dy, dh_n = make_upstream(steps, batch, hidden, seed=30)
    before = {name: value.copy() for name, value in p.items()}
    dy_before, dh_n_before = dy.copy(), dh_n.copy()
    _, _, saved = forward(cell, p)
    grads = backward(cell, saved, dy, dh_n, return_step_norms=True)
    grads_again = backward(cell, saved, dy, dh_n, return_step_norms=True)  # saved is reusable
    for name, value in p.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    np.testing.assert_array_equal(dy, dy_before)
    np.testing.assert_array_equal(dh_n, dh_n_before)
    for a, b in zip(grads, grads_again):
        np.testing.assert_array_equal(a, b)
    # writing to the inputs after forward does not change what backward computes
    for value in p.values():
        value += 1.0
    for a, b in zip(grads, backward(cell, saved, dy, dh_n, return_step_norms=True)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_empty_batch_and_empty_sequence(cell):
    """B = 0 gives empty outputs and gradients of the right shapes; T = 0 gives h_n = h0
    and dh0 = dh_n (the report's split forward and the step-norm test rely on it)."""
    p = make_problem(cell, 3, 0, 2, 4, seed=31)
    y, h_n, saved = forward(cell, p)
    assert y.shape == (3, 0, 4) and h_n.shape == (0, 4)
    grads = backward(cell, saved, np.zeros((3, 0, 4)), np.zeros((0, 4)), return_step_norms=True)
    for name, grad in zip(GRAD_NAMES, grads):
        assert grad.shape == p[name].shape, name
    assert not grads[-1].any()  # the norms of empty gradients

    p = make_problem(cell, 0, 2, 3, 4, seed=32)
    y, h_n, saved = forward(cell, p)
    assert y.shape == (0, 2, 4)
    np.testing.assert_array_equal(h_n, p["h0"])
    dh_n = np.arange(8.0).reshape(2, 4)
    _, dw_ih, dw_hh, db_ih, db_hh, dh0 = backward(cell, saved, None, dh_n)
    np.testing.assert_array_equal(dh0, dh_n)
    assert not dw_ih.any() and not dw_hh.any() and not db_ih.any() and not db_hh.any()


@pytest.mark.parametrize("cell", CELLS)
def test_bad_input_names_the_argument(cell):
    p = make_problem(cell, 3, 2, 4, 5, seed=33)
    for name, bad in (
        ("w_ih", p["w_ih"][:-1]),
        ("w_hh", p["w_hh"][:, :-1]),
        ("b_ih", p["b_ih"][:-1]),
        ("b_hh", p["b_hh"][None]),
        ("h0", p["h0"][:1]),
        ("x", p["x"][0]),
    ):
        with pytest.raises(ValueError, match=f"^{name} "):
            forward(cell, dict(p, **{name: bad}))
    with pytest.raises(TypeError, match="^x "):
        forward(cell, dict(p, x=p["x"].astype(np.int64)))
    _, _, saved = forward(cell, p)
    with pytest.raises(ValueError, match="^dy "):
        backward(cell, saved, np.zeros((3, 2, 4)), None)
    with pytest.raises(ValueError, match="^dh_n "):
        backward(cell, saved, None, np.zeros((2, 6)))


def test_rnn_rejects_an_unknown_nonlinearity():
    p = make_problem("rnn_tanh", 2, 1, 2, 2)
    with pytest.raises(ValueError, match="^nonlinearity "):
        rnn_reference.forward(**p, nonlinearity="sigmoid")


def test_gru_biases_are_not_summable():
    """The reason the GRU keeps b_ih and b_hh apart: moving b_hn into b_in (same sum)
    changes the output, because b_hn is multiplied by the reset gate."""
    p = make_problem("gru", 3, 2, 3, 4, seed=37, scale=2.0)
    hidden = 4
    moved = dict(p, b_ih=p["b_ih"].copy(), b_hh=p["b_hh"].copy())
    moved["b_ih"][2 * hidden :] += moved["b_hh"][2 * hidden :]
    moved["b_hh"][2 * hidden :] = 0.0
    y, _, _ = gru_reference.forward(**p)
    y_moved, _, _ = gru_reference.forward(**moved)
    assert rel_err(y_moved, y) > 1e-3
    # while the r and z rows may move freely: they only ever appear summed
    moved = dict(p, b_ih=p["b_ih"].copy(), b_hh=p["b_hh"].copy())
    moved["b_ih"][: 2 * hidden] += moved["b_hh"][: 2 * hidden]
    moved["b_hh"][: 2 * hidden] = 0.0
    assert rel_err(gru_reference.forward(**moved)[0], y) < 1e-14


@pytest.mark.parametrize("module, gates", [(gru_reference, 3), (rnn_reference, 1)])
def test_input_size_zero_backprops(module, gates):
    """I = 0 (no input features) is valid: the recurrence alone, as for the LSTM."""
    hidden = 4
    x, w_ih = np.zeros((3, 2, 0)), np.zeros((gates * hidden, 0))
    w_hh, h0 = np.full((gates * hidden, hidden), 0.1), np.full((2, hidden), 0.5)
    _, _, saved = module.forward(x, w_ih, w_hh, h0=h0)
    dx, dw_ih, dw_hh, _, _, dh0 = module.backward(saved, dy=np.ones((3, 2, hidden)))
    assert dx.shape == (3, 2, 0) and dw_ih.shape == (gates * hidden, 0)
    assert np.all(np.isfinite(dw_hh)) and np.any(dw_hh != 0) and np.any(dh0 != 0)
