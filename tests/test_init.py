"""Initializers: their statistics (variance, bounds, orthogonality), reproducibility,
array kinds, and where the forget-gate bias lands."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import cupy_or_skip, torch_or_skip

import rnnkernels
from rnnkernels import init, rnn_reference
from rnnkernels.reference import sigmoid

SHAPE = (300, 400)  # fan_out 300, fan_in 400: 120 000 draws, the variance to ~0.5 %
FAN_OUT, FAN_IN = SHAPE


@pytest.mark.parametrize(
    "make, variance, bound",
    [
        (lambda **kw: init.xavier_uniform(SHAPE, **kw), 2 / (FAN_IN + FAN_OUT), math.sqrt(6 / (FAN_IN + FAN_OUT))),
        (lambda **kw: init.xavier_uniform(SHAPE, gain=5 / 3, **kw), (5 / 3) ** 2 * 2 / (FAN_IN + FAN_OUT),
         5 / 3 * math.sqrt(6 / (FAN_IN + FAN_OUT))),
        (lambda **kw: init.xavier_normal(SHAPE, **kw), 2 / (FAN_IN + FAN_OUT), None),
        (lambda **kw: init.kaiming_uniform(SHAPE, **kw), 2 / FAN_IN, math.sqrt(6 / FAN_IN)),
        (lambda **kw: init.kaiming_uniform(SHAPE, mode="fan_out", **kw), 2 / FAN_OUT, math.sqrt(6 / FAN_OUT)),
        (lambda **kw: init.kaiming_normal(SHAPE, **kw), 2 / FAN_IN, None),
        (lambda **kw: init.kaiming_normal(SHAPE, gain=1.0, mode="fan_out", **kw), 1 / FAN_OUT, None),
        (lambda **kw: init.lecun_normal(SHAPE, **kw), 1 / FAN_IN, None),
        (lambda **kw: init.pytorch_default(SHAPE, 64, **kw), 1 / (3 * 64), 1 / 8),
    ],
    ids=["xavier_u", "xavier_u_gain", "xavier_n", "kaiming_u", "kaiming_u_fan_out", "kaiming_n",
         "kaiming_n_fan_out", "lecun_n", "pytorch_default"],
)
def test_variance_mean_and_bounds(make, variance, bound):
    w = make(rng=0, dtype=np.float64)
    assert w.shape == SHAPE and w.dtype == np.float64
    assert w.var() == pytest.approx(variance, rel=0.03)
    assert abs(w.mean()) < 4 * math.sqrt(variance / w.size)
    if bound is not None:
        assert np.abs(w).max() <= bound
        assert np.abs(w).max() > 0.99 * bound  # uniform: it reaches the edges


def test_fans_count_the_receptive_field():
    w = init.xavier_normal((64, 32, 3, 3), rng=1, dtype=np.float64)  # fan_in 288, fan_out 576
    assert w.var() == pytest.approx(2 / (288 + 576), rel=0.05)
    w = init.lecun_normal((64, 32, 3, 3), rng=1, dtype=np.float64)
    assert w.var() == pytest.approx(1 / 288, rel=0.05)


@pytest.mark.parametrize("fn", [init.xavier_uniform, init.xavier_normal, init.kaiming_uniform,
                                init.kaiming_normal, init.lecun_normal, init.orthogonal])
def test_vectors_have_no_fans(fn):
    with pytest.raises(ValueError, match="fan"):
        fn((16,), rng=0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode"):
        init.kaiming_normal((4, 4), mode="fan_avg", rng=0)
    with pytest.raises(ValueError, match="gain"):
        init.xavier_uniform((4, 4), gain=-1, rng=0)
    with pytest.raises(ValueError, match="blocks"):
        init.orthogonal((10, 4), blocks=4, rng=0)
    with pytest.raises(ValueError, match="hidden_size"):
        init.pytorch_default((4, 4), 0, rng=0)
    with pytest.raises(ValueError, match="scheme"):
        init.lstm_parameters(3, 4, "glorot", rng=0)
    with pytest.raises(TypeError, match="Generator"):
        init.xavier_uniform((4, 4), rng=np.random.RandomState(0))
    with pytest.raises(ValueError, match="not both"):
        init.xavier_uniform((4, 4), rng=0, like=np.zeros(1), xp=np)


def test_empty_shapes_give_empty_arrays():
    assert init.xavier_uniform((0, 5), rng=0).shape == (0, 5)
    assert init.kaiming_normal((5, 0), rng=0).shape == (5, 0)
    assert init.orthogonal((0, 4), rng=0).shape == (0, 4)


# ----------------------------------------------------------------------------- orthogonal


@pytest.mark.parametrize("shape", [(8, 8), (33, 33), (40, 10), (10, 40)])
def test_orthogonal_is_orthogonal(shape):
    q = init.orthogonal(shape, rng=3, dtype=np.float64)
    rows, cols = shape
    gram = q.T @ q if rows >= cols else q @ q.T
    np.testing.assert_allclose(gram, np.eye(min(shape)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(q, compute_uv=False), 1.0, atol=1e-12)


def test_orthogonal_gain_scales_every_singular_value():
    q = init.orthogonal((16, 16), gain=0.5, rng=0, dtype=np.float64)
    np.testing.assert_allclose(np.linalg.svd(q, compute_uv=False), 0.5, atol=1e-12)


def test_orthogonal_per_gate_block():
    hidden = 12
    w = init.orthogonal((4 * hidden, hidden), blocks=4, rng=5, dtype=np.float64)
    blocks = np.split(w, 4)
    for block in blocks:
        np.testing.assert_allclose(block.T @ block, np.eye(hidden), atol=1e-12)
    assert not np.allclose(blocks[0], blocks[1])  # drawn independently
    # one draw over the whole matrix: columns orthonormal, each block ~1/2 singular values
    whole = init.orthogonal((4 * hidden, hidden), rng=5, dtype=np.float64)
    np.testing.assert_allclose(whole.T @ whole, np.eye(hidden), atol=1e-12)
    assert np.linalg.svd(whole[:hidden], compute_uv=False).max() < 0.99


def test_orthogonal_is_haar_not_sign_biased():
    """Without the sign correction QR gives a diagonal biased to one sign; Haar-uniform
    Q has E[Q_ii] = 0."""
    rng = np.random.default_rng(11)
    diag = np.array([np.diag(init.orthogonal((4, 4), rng=rng, dtype=np.float64)) for _ in range(2000)])
    assert np.abs(diag.mean(axis=0)).max() < 0.06  # sd of each mean is 0.5/√2000 ≈ 0.011


# ----------------------------------------------------------------------------- seeds, kinds


def test_same_seed_same_numbers_and_generator_advances():
    a = init.xavier_uniform((5, 7), rng=42)
    b = init.xavier_uniform((5, 7), rng=np.random.default_rng(42))
    np.testing.assert_array_equal(a, b)
    gen = np.random.default_rng(42)
    first, second = init.xavier_uniform((5, 7), rng=gen), init.xavier_uniform((5, 7), rng=gen)
    assert not np.array_equal(first, second)
    p, q = init.lstm_parameters(3, 4, "keras_default", rng=9), init.lstm_parameters(3, 4, "keras_default", rng=9)
    for name in p:
        np.testing.assert_array_equal(p[name], q[name])


def test_dtype_and_like():
    assert init.kaiming_normal((4, 3), rng=0).dtype == np.float32  # the default
    assert init.kaiming_normal((4, 3), rng=0, dtype=np.float64).dtype == np.float64
    like = init.kaiming_normal((4, 3), rng=0, like=np.zeros(1, np.float16))
    assert isinstance(like, np.ndarray) and like.dtype == np.float16
    assert init.kaiming_normal((4, 3), rng=0, xp="numpy").dtype == np.float32
    with pytest.raises(ValueError, match="xp"):
        init.kaiming_normal((4, 3), rng=0, xp="jax")


def test_torch_like_gets_the_same_numbers():
    torch = torch_or_skip()
    host = init.orthogonal((8, 8), rng=4, dtype=np.float64)
    t = init.orthogonal((8, 8), rng=4, like=torch.zeros(1, dtype=torch.float64))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    np.testing.assert_array_equal(t.numpy(), host)
    params = init.lstm_parameters(3, 5, "orthogonal", forget_bias=1.0, rng=0, like=torch.zeros(1))
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in params.values())


@pytest.mark.gpu
def test_cupy_arrays_hold_the_host_numbers():
    cupy = cupy_or_skip()
    host = init.xavier_uniform((6, 5), rng=8)
    device = init.xavier_uniform((6, 5), rng=8, xp=cupy)
    assert isinstance(device, cupy.ndarray) and device.dtype == np.float32
    np.testing.assert_array_equal(cupy.asnumpy(device), host)
    params = init.lstm_parameters(3, 4, "keras_default", rng=0, like=device)
    assert all(isinstance(v, cupy.ndarray) for v in params.values())
    init.forget_bias(params["b_hh"], 2.0)
    assert float(params["b_hh"][4:8].min()) == 2.0


# ----------------------------------------------------------------------------- forget bias


def test_forget_bias_sets_only_the_forget_block():
    hidden = 5
    b = np.zeros(4 * hidden, np.float32)
    assert init.forget_bias(b, 1.5) is b
    np.testing.assert_array_equal(b[hidden : 2 * hidden], 1.5)
    assert not b[:hidden].any() and not b[2 * hidden :].any()
    with pytest.raises(ValueError, match=r"\[4H\]"):
        init.forget_bias(np.zeros(10), 1.0)
    with pytest.raises(ValueError, match=r"\[4H\]"):
        init.forget_bias(np.zeros((4, 4)), 1.0)


def test_forget_bias_on_a_torch_parameter():
    torch = torch_or_skip()
    b = torch.nn.Parameter(torch.zeros(8))
    init.forget_bias(b, 1.0)
    assert b[2:4].tolist() == [1.0, 1.0] and b[:2].abs().sum() == 0 and b.requires_grad


@pytest.mark.parametrize("scheme", ["pytorch_default", "keras_default", "orthogonal", "xavier_uniform"])
def test_lstm_parameters_effective_forget_bias_is_the_value_not_twice(scheme):
    """The layer adds b_ih and b_hh: the forget block of the sum is the value, once."""
    hidden = 6
    params = init.lstm_parameters(4, hidden, scheme, forget_bias=1.0, rng=2, dtype=np.float64)
    total = params["b_ih"] + params["b_hh"]
    np.testing.assert_array_equal(total[hidden : 2 * hidden], 1.0)
    assert not params["b_hh"][hidden : 2 * hidden].any()
    if scheme != "pytorch_default":
        others = np.concatenate([total[:hidden], total[2 * hidden :]])
        assert not others.any()


def test_forget_bias_lands_on_the_forget_gate_of_the_layer():
    """With zero weights the cell computes c_1 = σ(b_f)·c0 + σ(b_i)·tanh(b_g): a unit
    forget bias gives exactly c_1 = σ(1)·c0 (one bias vector set, not both)."""
    hidden, batch = 4, 3
    params = init.lstm_parameters(2, hidden, "keras_default", rng=0, dtype=np.float64)
    params["w_ih"][:] = 0.0
    params["w_hh"][:] = 0.0
    c0 = np.linspace(-1, 1, batch * hidden).reshape(batch, hidden)
    out = rnnkernels.lstm_forward(np.ones((1, batch, 2)), **params, h0=np.zeros_like(c0), c0=c0,
                                  backend="reference")
    np.testing.assert_allclose(out.c_n, sigmoid(np.float64(1.0)) * c0, rtol=1e-15)


def test_parameter_set_shapes_and_schemes():
    i, h = 3, 5
    for scheme in init.SCHEMES:
        lstm = init.lstm_parameters(i, h, scheme, rng=0)
        assert {k: v.shape for k, v in lstm.items()} == {
            "w_ih": (4 * h, i), "w_hh": (4 * h, h), "b_ih": (4 * h,), "b_hh": (4 * h,)}
        rnn = init.rnn_parameters(i, h, scheme, rng=0)
        assert {k: v.shape for k, v in rnn.items()} == {"w_ih": (h, i), "w_hh": (h, h), "b_ih": (h,), "b_hh": (h,)}
    keras = init.lstm_parameters(i, h, "keras_default", rng=0, dtype=np.float64)
    np.testing.assert_allclose(keras["w_hh"].T @ keras["w_hh"], np.eye(h), atol=1e-12)
    orth = init.lstm_parameters(i, h, "orthogonal", recurrent_gain=0.9, rng=0, dtype=np.float64)
    for block in np.split(orth["w_hh"], 4):
        np.testing.assert_allclose(block.T @ block, 0.81 * np.eye(h), atol=1e-12)
    with pytest.raises(ValueError, match="recurrent_gain"):
        init.lstm_parameters(i, h, "pytorch_default", recurrent_gain=2.0, rng=0)


# ----------------------------------------------------------------------------- GRU and Elman RNN


def test_gru_and_rnn_parameter_shapes_for_every_scheme():
    i, h = 3, 5
    for cell, gates in (("gru", 3), ("rnn_tanh", 1), ("rnn_relu", 1)):
        for scheme in init.CELL_SCHEMES[cell]:
            params = init.cell_parameters(cell, i, h, scheme, rng=0)
            assert {k: v.shape for k, v in params.items()} == {
                "w_ih": (gates * h, i), "w_hh": (gates * h, h), "b_ih": (gates * h,), "b_hh": (gates * h,)}
            assert all(v.dtype == np.float32 for v in params.values())
    gru = init.gru_parameters(i, h, "xavier_uniform", rng=0)
    assert gru["w_hh"].shape == (3 * h, h)


@pytest.mark.parametrize("cell, gates", [("lstm", 4), ("gru", 3), ("rnn_tanh", 1), ("rnn_relu", 1)])
def test_orthogonal_scheme_is_orthogonal_per_gate_block_for_every_cell(cell, gates):
    """Each H×H recurrent block (W_hr, W_hz, W_hn for the GRU; the whole W_hh for the
    RNN) orthogonal on its own, times recurrent_gain."""
    hidden = 7
    params = init.cell_parameters(cell, 4, hidden, "orthogonal", recurrent_gain=0.9, rng=1, dtype=np.float64)
    blocks = np.split(params["w_hh"], gates)
    for block in blocks:
        np.testing.assert_allclose(block.T @ block, 0.81 * np.eye(hidden), atol=1e-12)
    if gates > 1:
        assert not np.allclose(blocks[0], blocks[1])
    assert not params["b_ih"].any() and not params["b_hh"].any()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_pytorch_default_is_torch_nn_init_for_every_cell(cell):
    """U(±1/√H) on every weight and bias: the bound and the variance 1/(3H), and
    torch.nn's own module draws within the same bound (so the two agree on the law)."""
    hidden, inputs = 64, 48
    params = init.cell_parameters(cell, inputs, hidden, rng=3, dtype=np.float64)
    bound = 1 / math.sqrt(hidden)
    drawn = np.concatenate([v.ravel() for v in params.values()])
    assert np.abs(drawn).max() <= bound and np.abs(drawn).max() > 0.99 * bound
    assert drawn.var() == pytest.approx(1 / (3 * hidden), rel=0.05)
    torch = torch_or_skip()
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}[cell](inputs, hidden)
    theirs = torch.cat([p.detach().flatten() for p in module.parameters()]).double().numpy()
    assert theirs.size == drawn.size
    assert np.abs(theirs).max() <= bound and np.abs(theirs).max() > 0.99 * bound


def test_update_bias_sets_only_the_update_block():
    hidden = 4
    b = np.zeros(3 * hidden)
    assert init.update_bias(b, 2.0) is b
    np.testing.assert_array_equal(b[hidden : 2 * hidden], 2.0)
    assert not b[:hidden].any() and not b[2 * hidden :].any()
    with pytest.raises(ValueError, match=r"update_bias needs one GRU bias vector of shape \[3H\]"):
        init.update_bias(np.zeros(8), 1.0)
    torch = torch_or_skip()
    p = torch.nn.Parameter(torch.zeros(6))
    init.update_bias(p, 1.0)
    assert p.tolist() == [0, 0, 1, 1, 0, 0] and p.requires_grad


@pytest.mark.parametrize("scheme", ["pytorch_default", "keras_default", "orthogonal"])
def test_gru_update_bias_lands_on_the_update_gate_once(scheme):
    """b_ih + b_hh on the z rows is the value, once; with zero weights and no other
    bias the GRU computes n = tanh(0) = 0 and h_1 = σ(b_z)·h0, so the bias is on z (the
    gate that keeps the old state), not on r."""
    from rnnkernels import gru_reference

    hidden, batch = 5, 3
    params = init.gru_parameters(2, hidden, scheme, update_bias=1.0, rng=4, dtype=np.float64)
    total = params["b_ih"] + params["b_hh"]
    np.testing.assert_array_equal(total[hidden : 2 * hidden], 1.0)
    assert not params["b_hh"][hidden : 2 * hidden].any()
    if scheme == "pytorch_default":
        return
    params["w_ih"][:] = 0.0
    params["w_hh"][:] = 0.0
    h0 = np.linspace(-1, 1, batch * hidden).reshape(batch, hidden)
    _, h_n, _ = gru_reference.forward(np.ones((1, batch, 2)), **params, h0=h0)
    np.testing.assert_allclose(h_n, sigmoid(np.float64(1.0)) * h0, rtol=1e-15)


def test_chrono_bias_lstm_and_gru():
    hidden, steps = 200, 100
    b = np.full(4 * hidden, 7.0)
    init.chrono_bias(b, steps, "lstm", rng=0)
    forget = b[hidden : 2 * hidden]
    assert forget.min() >= 0.0 and forget.max() <= math.log(steps - 1)
    np.testing.assert_array_equal(b[:hidden], -forget)
    np.testing.assert_array_equal(b[2 * hidden :], 7.0)  # g and o untouched
    # memory time scales 1 + e^b_f = 1 + u, u ~ U[1, T-1]: spread over [2, T]
    assert np.mean(1 + np.exp(forget)) == pytest.approx(steps / 2 + 1, rel=0.1)

    g = np.zeros(3 * hidden)
    init.chrono_bias(g, steps, "gru", rng=0)
    np.testing.assert_array_equal(g[hidden : 2 * hidden], forget)  # same draw: the z block
    assert not g[:hidden].any() and not g[2 * hidden :].any()
    with pytest.raises(ValueError, match="max_steps"):
        init.chrono_bias(g, 1, "gru")
    with pytest.raises(ValueError, match="cell"):
        init.chrono_bias(g, 10, "rnn_tanh")
    with pytest.raises(ValueError, match=r"\[3H\]"):
        init.chrono_bias(np.zeros(8), 10, "gru")
    torch = torch_or_skip()
    t = torch.nn.Parameter(torch.zeros(3 * hidden, dtype=torch.float64))
    init.chrono_bias(t, steps, "gru", rng=0)
    np.testing.assert_array_equal(t.detach().numpy(), g)


def test_identity_blocks_and_gain():
    w = init.identity((6, 3), gain=0.5, blocks=2, dtype=np.float64)
    np.testing.assert_array_equal(w, 0.5 * np.concatenate([np.eye(3), np.eye(3)]))
    np.testing.assert_array_equal(init.identity((2, 4), dtype=np.float64), np.eye(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        init.identity((3, 3, 3))
    with pytest.raises(ValueError, match="blocks"):
        init.identity((5, 3), blocks=2)


def test_irnn_copies_the_state_of_a_relu_rnn():
    """Le et al.'s IRNN: W_hh = I and zero biases, so with no input a ReLU RNN keeps a
    non-negative state exactly, and its gradient reaches every step unchanged;
    w_ih ~ N(0, 0.001²)."""
    hidden = 40
    params = init.rnn_parameters(300, hidden, "irnn", rng=6, dtype=np.float64)
    np.testing.assert_array_equal(params["w_hh"], np.eye(hidden))
    assert params["w_ih"].std() == pytest.approx(init.IRNN_INPUT_STD, rel=0.05)
    assert not params["b_ih"].any() and not params["b_hh"].any()
    scaled = init.cell_parameters("rnn_relu", 3, hidden, "irnn", recurrent_gain=0.01, rng=6, dtype=np.float64)
    np.testing.assert_array_equal(scaled["w_hh"], 0.01 * np.eye(hidden))

    h0 = np.abs(np.random.default_rng(0).standard_normal((2, hidden)))
    _, h_n, saved = rnn_reference.forward(np.zeros((50, 2, 300)), **params, h0=h0, nonlinearity="relu")
    np.testing.assert_array_equal(h_n, h0)
    *_, dh_norms = rnn_reference.backward(saved, dh_n=np.ones((2, hidden)), return_step_norms=True)
    np.testing.assert_allclose(dh_norms, dh_norms[-1], rtol=1e-15)


def test_cell_parameters_match_the_cell_functions_and_check_the_cell():
    for cell, own in (("lstm", lambda **kw: init.lstm_parameters(3, 4, "orthogonal", forget_bias=1.0, **kw)),
                      ("gru", lambda **kw: init.gru_parameters(3, 4, "orthogonal", update_bias=1.0, **kw)),
                      ("rnn_tanh", lambda **kw: init.rnn_parameters(3, 4, "orthogonal", **kw))):
        gate_bias = None if cell == "rnn_tanh" else 1.0
        generic = init.cell_parameters(cell, 3, 4, "orthogonal", gate_bias=gate_bias, rng=5)
        for name, value in own(rng=5).items():
            np.testing.assert_array_equal(generic[name], value)
    from rnnkernels import cells

    for name, cell in cells.CELLS.items():  # a registry Cell stands for its name
        by_cell = init.cell_parameters(cell, 3, 4, "orthogonal", rng=5)
        for key, value in init.cell_parameters(name, 3, 4, "orthogonal", rng=5).items():
            np.testing.assert_array_equal(by_cell[key], value)
        assert by_cell["w_hh"].shape == (cell.gates * 4, 4)
    assert set(init.CELL_SCHEMES) == set(cells.CELLS)
    with pytest.raises(ValueError, match="gate_bias"):
        init.cell_parameters("rnn_relu", 3, 4, gate_bias=1.0)
    with pytest.raises(ValueError, match="cell must be one of"):
        init.cell_parameters("transformer", 3, 4)
    with pytest.raises(ValueError, match="scheme 'irnn' for the gru cell"):
        init.gru_parameters(3, 4, "irnn")
    with pytest.raises(ValueError, match="recurrent_gain"):
        init.gru_parameters(3, 4, "pytorch_default", recurrent_gain=0.5)


def test_gate_biases_check_the_length_against_hidden_size():
    """A GRU's [3H'] bias whose length 4 also divides is taken for an LSTM's by length
    alone; with hidden_size the mistake is named instead of writing the wrong rows."""
    gru_bias = np.zeros(3 * 8)
    with pytest.raises(ValueError, match=r"forget_bias.*\[4H\].*hidden_size=8"):
        init.forget_bias(gru_bias, hidden_size=8)
    with pytest.raises(ValueError, match=r"update_bias.*\[3H\].*hidden_size=6"):
        init.update_bias(np.zeros(4 * 6), hidden_size=6)
    with pytest.raises(ValueError, match=r"chrono_bias.*hidden_size=8"):
        init.chrono_bias(np.zeros(24), 50, "lstm", hidden_size=8)
    np.testing.assert_array_equal(init.update_bias(gru_bias, 2.0, hidden_size=8)[8:16], 2.0)
    assert not gru_bias[:8].any() and not gru_bias[16:].any()


def test_cell_parameters_takes_rnn_for_the_elman_cells():
    a = init.cell_parameters("rnn", 5, 8, rng=0)
    b = init.cell_parameters("rnn_relu", 5, 8, rng=0)
    assert all(np.array_equal(a[k], b[k]) for k in ("w_ih", "w_hh", "b_ih", "b_hh"))
    assert init.cell_parameters("rnn", 5, 8, "irnn")["w_hh"].shape == (8, 8)
