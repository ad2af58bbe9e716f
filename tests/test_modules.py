"""``rnnkernels.modules.LSTM`` (NumPy/CuPy): against ``torch.nn.LSTM`` over layers x
bidirectional x batch_first x bias x variable lengths, variable lengths against each
row run on its own, state_dict and Keras weights, dropout, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import rel_err, torch_or_skip

from rnnkernels.modules import LSTM, parameter_names

INPUT, HIDDEN, STEPS = 3, 5, 6
LENGTHS = [6, 2, 6, 1, 4]


def _problem(module, batch=len(LENGTHS), seed=0, state=True):
    rng = np.random.default_rng(seed)
    dt = module.dtype
    shape = (batch, STEPS, INPUT) if module.batch_first else (STEPS, batch, INPUT)
    rows = module.num_layers * module.num_directions
    x = rng.standard_normal(shape).astype(dt)
    hx = tuple(rng.standard_normal((rows, batch, HIDDEN)).astype(dt) for _ in range(2)) if state else None
    y_shape = shape[:2] + (module.num_directions * HIDDEN,)
    upstream = (rng.standard_normal(y_shape).astype(dt),) + tuple(rng.standard_normal((rows, batch, HIDDEN)).astype(dt) for _ in range(2))
    return x, hx, upstream


def _torch_run(torch, ref, x, hx, upstream, lengths, batch_first):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    xt = torch.tensor(x, requires_grad=True)
    ht = tuple(torch.tensor(s, requires_grad=True) for s in hx)
    inp = xt if lengths is None else pack_padded_sequence(xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
    y, (h_n, c_n) = ref(inp, ht)
    if lengths is not None:
        y, _ = pad_packed_sequence(y, batch_first=batch_first, total_length=STEPS)
    dy, dh, dc = (torch.tensor(u) for u in upstream)
    torch.autograd.backward([y, h_n, c_n], [dy, dh, dc])
    outs = {"y": y, "h_n": h_n, "c_n": c_n}
    grads = {"dx": xt.grad, "dh0": ht[0].grad, "dc0": ht[1].grad}
    grads.update({name: p.grad for name, p in ref.named_parameters()})
    return {k: v.detach().numpy() for k, v in outs.items()}, {k: v.numpy() for k, v in grads.items()}


GRID = list(itertools.product([1, 2], [False, True], [False, True], [True, False], [False, True]))


@pytest.mark.torch
@pytest.mark.parametrize(
    "layers,bidirectional,batch_first,bias,varlen", GRID,
    ids=[f"L{l}-{'bi' if d else 'uni'}-{'bf' if f else 'tm'}-{'bias' if b else 'nobias'}-{'lengths' if v else 'full'}" for l, d, f, b, v in GRID],
)
def test_matches_nn_lstm_float64(layers, bidirectional, batch_first, bias, varlen):
    torch = torch_or_skip()
    torch.manual_seed(0)
    ref = torch.nn.LSTM(INPUT, HIDDEN, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, dtype=torch.float64)
    lstm = LSTM.from_torch(ref, dtype=np.float64, backend="cpu")
    lengths = LENGTHS if varlen else None
    x, hx, upstream = _problem(lstm)
    want_out, want_grads = _torch_run(torch, ref, x, hx, upstream, lengths, batch_first)
    y, (h_n, c_n) = lstm(x, hx, lengths=lengths)
    grads = lstm.backward(*upstream)
    for name, got in (("y", y), ("h_n", h_n), ("c_n", c_n)):
        assert got.dtype == np.float64 and rel_err(got, want_out[name]) < 1e-8, name
    got_grads = {"dx": grads.dx, "dh0": grads.dh0, "dc0": grads.dc0, **grads.params}
    assert list(got_grads) == list(want_grads)
    for name, want in want_grads.items():
        assert rel_err(got_grads[name], want) < 1e-8, name


@pytest.mark.torch
@pytest.mark.parametrize("layers,bidirectional,varlen", [(1, False, False), (2, True, True)])
def test_matches_nn_lstm_float32(layers, bidirectional, varlen):
    torch = torch_or_skip()
    torch.manual_seed(1)
    ref = torch.nn.LSTM(INPUT, HIDDEN, layers, bidirectional=bidirectional)
    lstm = LSTM.from_torch(ref)  # float32 by default
    lengths = LENGTHS if varlen else None
    x, hx, upstream = _problem(lstm)
    want_out, want_grads = _torch_run(torch, ref, x, hx, upstream, lengths, False)
    y, (h_n, c_n) = lstm(x, hx, lengths=lengths)
    grads = lstm.backward(*upstream)
    assert y.dtype == np.float32 and grads.dx.dtype == np.float32
    for name, got in (("y", y), ("h_n", h_n), ("c_n", c_n)):
        assert rel_err(got, want_out[name]) < 2e-5, name
    got_grads = {"dx": grads.dx, "dh0": grads.dh0, "dc0": grads.dc0, **grads.params}
    for name, want in want_grads.items():
        assert rel_err(got_grads[name], want) < 2e-5, name


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("lengths", [[6, 0, 3, 3, 1], [0, 0, 0, 0, 0], [2, 6, 5, 4, 1]], ids=["with-zero", "all-zero", "distinct"])
def test_lengths_equal_each_row_on_its_own(bidirectional, lengths):
    """A batch with lengths gives, row by row, what that row alone, cut to its
    length, gives; parameter gradients are the sums over the rows."""
    lstm = LSTM(INPUT, HIDDEN, 2, bidirectional=bidirectional, dtype=np.float64, seed=3)
    x, hx, (dy, dh, dc) = _problem(lstm, seed=4)
    y, (h_n, c_n) = lstm(x, hx, lengths=np.array(lengths))
    grads = lstm.backward(dy, dh, dc)
    param_sum = {name: np.zeros_like(p) for name, p in lstm.named_parameters()}
    for b, n in enumerate(lengths):
        assert np.all(y[n:, b] == 0)
        row_state = tuple(s[:, b : b + 1] for s in hx)
        if n == 0:
            assert np.array_equal(h_n[:, b], hx[0][:, b]) and np.array_equal(c_n[:, b], hx[1][:, b])
            assert np.array_equal(grads.dh0[:, b], dh[:, b]) and np.array_equal(grads.dc0[:, b], dc[:, b])
            assert np.all(grads.dx[:, b] == 0)
            continue
        y_b, (h_b, c_b) = lstm(x[:n, b : b + 1], row_state)
        g_b = lstm.backward(dy[:n, b : b + 1], dh[:, b : b + 1], dc[:, b : b + 1])
        assert rel_err(y[:n, b], y_b[:, 0]) < 1e-12
        assert rel_err(h_n[:, b], h_b[:, 0]) < 1e-12 and rel_err(c_n[:, b], c_b[:, 0]) < 1e-12
        assert rel_err(grads.dx[:n, b], g_b.dx[:, 0]) < 1e-12 and np.all(grads.dx[n:, b] == 0)
        assert rel_err(grads.dh0[:, b], g_b.dh0[:, 0]) < 1e-12 and rel_err(grads.dc0[:, b], g_b.dc0[:, 0]) < 1e-12
        for name in param_sum:
            param_sum[name] += g_b.params[name]
    for name, total in param_sum.items():
        assert rel_err(grads.params[name], total) < 1e-12, name


def test_reference_backend_and_unbatched_input():
    lstm = LSTM(INPUT, HIDDEN, 2, bidirectional=True, dtype=np.float64, seed=5)
    ref = LSTM(INPUT, HIDDEN, 2, bidirectional=True, dtype=np.float64, backend="reference")
    ref.load_state_dict(lstm.state_dict())
    x, hx, upstream = _problem(lstm, batch=1)
    y, (h_n, _) = lstm(x, hx, lengths=[4])
    g = lstm.backward(*upstream)
    y_ref, (h_ref, _) = ref(x, hx, lengths=[4])
    g_ref = ref.backward(*upstream)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(h_n, h_ref) < 1e-12
    assert all(rel_err(g.params[n], g_ref.params[n]) < 1e-10 for n in g.params)
    # Unbatched: [T, I] input and [L*D, H] state give the batch-of-one results.
    y_u, (h_u, c_u) = lstm(x[:, 0], tuple(s[:, 0] for s in hx))
    g_u = lstm.backward(upstream[0][:, 0], upstream[1][:, 0], upstream[2][:, 0])
    y_1, (h_1, c_1) = lstm(x, hx)
    g_1 = lstm.backward(*upstream)
    assert y_u.shape == (STEPS, 2 * HIDDEN) and h_u.shape == (4, HIDDEN) and g_u.dx.shape == (STEPS, INPUT)
    assert np.array_equal(y_u, y_1[:, 0]) and np.array_equal(h_u, h_1[:, 0]) and np.array_equal(g_u.dx, g_1.dx[:, 0])
    assert all(np.array_equal(g_u.params[n], g_1.params[n]) for n in g_u.params)


# ----------------------------------------------------------------------------- weights


@pytest.mark.torch
def test_state_dict_round_trip_with_torch():
    torch = torch_or_skip()
    torch.manual_seed(2)
    ref = torch.nn.LSTM(INPUT, HIDDEN, 3, bidirectional=True, batch_first=True)
    lstm = LSTM(INPUT, HIDDEN, 3, bidirectional=True, batch_first=True)
    assert list(lstm.state_dict()) == list(ref.state_dict()) == parameter_names(3, True, True)
    for name, value in ref.state_dict().items():
        assert lstm.state_dict()[name].shape == tuple(value.shape), name
    lstm.load_state_dict(ref.state_dict(), strict=True)
    back = torch.nn.LSTM(INPUT, HIDDEN, 3, bidirectional=True, batch_first=True)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in lstm.state_dict().items()}, strict=True)
    for name, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
        assert np.array_equal(getattr(lstm, name), value.numpy())
    with pytest.raises(ValueError, match="unexpected keys"):
        LSTM(INPUT, HIDDEN, 3, bidirectional=True, bias=False).load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        LSTM(INPUT, HIDDEN, 4, bidirectional=True).load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="shape"):
        LSTM(INPUT + 1, HIDDEN, 3, bidirectional=True).load_state_dict(ref.state_dict())


def _keras_lstm(x, kernel, recurrent_kernel, bias, go_backwards=False):
    """Keras's LSTM written out (batch-major x [B, T, I], z = x K + h R + b, gates
    i, f, c, o, sigmoid and tanh); returns the sequence of hidden states."""
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    batch, steps, _ = x.shape
    units = recurrent_kernel.shape[0]
    h, c = np.zeros((batch, units)), np.zeros((batch, units))
    out = np.zeros((batch, steps, units))
    for t in (reversed(range(steps)) if go_backwards else range(steps)):
        z = x[:, t] @ kernel + h @ recurrent_kernel + bias
        i, f, g, o = (z[:, k * units : (k + 1) * units] for k in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        out[:, t] = h
    return out


def test_keras_weights():
    rng = np.random.default_rng(6)
    lstm = LSTM(INPUT, HIDDEN, 2, bidirectional=True, batch_first=True, dtype=np.float64)
    layers = []
    for layer, size in enumerate((INPUT, 2 * HIDDEN)):
        weights = [rng.standard_normal(s) * 0.4 for s in [(size, 4 * HIDDEN), (HIDDEN, 4 * HIDDEN), (4 * HIDDEN,)] * 2]
        lstm.load_keras_weights(weights, layer=layer)
        assert all(np.array_equal(a, b) for a, b in zip(lstm.keras_weights(layer), weights))
        layers.append(weights)
    assert np.all(lstm.bias_hh_l1_reverse == 0)
    x = rng.standard_normal((4, STEPS, INPUT))
    want = x
    for weights in layers:  # Bidirectional(LSTM(return_sequences=True)), merge_mode="concat"
        forward = _keras_lstm(want, *weights[:3])
        backward = _keras_lstm(want, *weights[3:], go_backwards=True)
        want = np.concatenate([forward, backward], axis=2)
    y, _ = lstm(x)
    assert rel_err(y, want) < 1e-12
    # Export sums the two biases.
    lstm.bias_hh_l0[:] = 1.0
    assert np.array_equal(lstm.keras_weights(0)[2], layers[0][2] + 1.0)
    no_bias = LSTM(INPUT, HIDDEN, dtype=np.float64)
    no_bias_weights = [rng.standard_normal((INPUT, 4 * HIDDEN)), rng.standard_normal((HIDDEN, 4 * HIDDEN))]
    with pytest.raises(ValueError, match="expected 3 Keras arrays"):
        no_bias.load_keras_weights(no_bias_weights)
    LSTM(INPUT, HIDDEN, bias=False, dtype=np.float64).load_keras_weights(no_bias_weights)


# ----------------------------------------------------------------------------- dropout, modes


def test_dropout_masks():
    lstm = LSTM(INPUT, 64, 3, dropout=0.25, seed=11)
    masks = [lstm._dropout_mask((40, 30, 64)) for _ in range(2)]
    for mask in masks:
        kept = mask != 0
        assert abs(kept.mean() - 0.75) < 0.01 and np.allclose(mask[kept], 1 / 0.75)
    assert not np.array_equal(masks[0], masks[1])
    x = np.random.default_rng(0).standard_normal((STEPS, 4, INPUT)).astype(np.float32)
    first, second = (LSTM(INPUT, HIDDEN, 3, dropout=0.5, seed=12)(x)[0] for _ in range(2))
    assert np.array_equal(first, second)  # the same seed draws the same masks
    evaluated = LSTM(INPUT, HIDDEN, 3, dropout=0.5, seed=12).eval()(x)[0]
    assert rel_err(first, evaluated) > 1e-3
    assert np.array_equal(evaluated, LSTM(INPUT, HIDDEN, 3, dropout=0.0, seed=12)(x)[0])


def test_dropout_gradient_is_the_derivative():
    """With the masks fixed by the seed, the backward is the derivative of the
    forward: central differences along a random direction in x and in a weight."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((STEPS, 3, INPUT))
    dy = rng.standard_normal((STEPS, 3, 2 * HIDDEN))
    direction_x = rng.standard_normal(x.shape)
    direction_w = rng.standard_normal((4 * HIDDEN, 2 * HIDDEN))

    def loss(dx_step=0.0, dw_step=0.0, grads=False):
        lstm = LSTM(INPUT, HIDDEN, 2, bidirectional=True, dropout=0.4, dtype=np.float64, seed=14)
        lstm.weight_ih_l1[:] += dw_step * direction_w
        y, _ = lstm(x + dx_step * direction_x, lengths=[6, 3, 5])
        return lstm.backward(dy) if grads else float(np.sum(y * dy))

    g = loss(grads=True)
    eps = 1e-6
    for analytic, step in ((np.sum(g.dx * direction_x), "dx_step"), (np.sum(g.params["weight_ih_l1"] * direction_w), "dw_step")):
        numeric = (loss(**{step: eps}) - loss(**{step: -eps})) / (2 * eps)
        assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic)), step


def test_modes_and_errors():
    lstm = LSTM(INPUT, HIDDEN, 2)
    x = np.zeros((STEPS, 2, INPUT), np.float32)
    lstm.eval()(x)
    with pytest.raises(ValueError, match="training mode"):
        lstm.backward()
    lstm.train()(x)
    g = lstm.backward()  # every upstream gradient missing: all zero
    assert not np.any(g.dx) and all(not np.any(p) for p in g.params.values())
    with pytest.raises(TypeError, match="float64"):
        lstm(x.astype(np.float64))
    with pytest.raises(ValueError, match="h0 must have shape"):
        lstm(x, (np.zeros((1, 2, HIDDEN), np.float32),) * 2)
    with pytest.raises(ValueError, match="lengths must lie in"):
        lstm(x, lengths=[7, 1])
    with pytest.raises(ValueError, match="one entry per sequence"):
        lstm(x, lengths=[1])
    with pytest.raises(ValueError, match="input_size"):
        lstm(np.zeros((STEPS, 2, INPUT + 1), np.float32))
    # proj_size with backend "cuda" needs device "cuda" (tests/test_projection.py covers it).
    with pytest.raises(NotImplementedError, match="proj_size"):
        LSTM(INPUT, HIDDEN, proj_size=3, backend="cuda")
    bound = 1 / np.sqrt(HIDDEN)
    assert all(p.dtype == np.float32 and np.abs(p).max() <= bound for p in lstm.parameters())
    assert np.array_equal(LSTM(INPUT, HIDDEN, seed=1).weight_hh_l0, LSTM(INPUT, HIDDEN, seed=1).weight_hh_l0)


@pytest.mark.gpu
def test_cupy_module_matches_numpy():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        has_gpu = False
    if not has_gpu:
        pytest.skip("no CUDA GPU visible to CuPy")
    host = LSTM(16, 32, 2, bidirectional=True, seed=15)
    device = LSTM(16, 32, 2, bidirectional=True, device="cuda")
    device.load_state_dict(host.state_dict())
    rng = np.random.default_rng(16)
    x = rng.standard_normal((9, 5, 16)).astype(np.float32)
    dy = rng.standard_normal((9, 5, 64)).astype(np.float32)
    lengths = [9, 4, 9, 1, 6]
    y_host, _ = host(x, lengths=lengths)
    g_host = host.backward(dy)
    y_dev, _ = device(cupy.asarray(x), lengths=lengths)
    g_dev = device.backward(cupy.asarray(dy))
    assert isinstance(y_dev, cupy.ndarray)
    assert rel_err(cupy.asnumpy(y_dev), y_host) < 1e-4
    assert rel_err(cupy.asnumpy(g_dev.dx), g_host.dx) < 1e-4
    for name, grad in g_host.params.items():
        assert rel_err(cupy.asnumpy(g_dev.params[name]), grad) < 1e-4, name
