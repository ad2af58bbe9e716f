"""The GRU and Elman RNN modules (issue 15): ``rnnkernels.torch.GRU`` / ``RNN`` against
``torch.nn.GRU`` / ``torch.nn.RNN`` in forward and every gradient (input, h0, every
parameter) over layers, bidirectional, batch_first, bias and packed input, on every
host backend that implements the cell here (and the emulated CUDA kernels where
present); the decode step, dropout, strict state dicts both ways, torch.compile,
torch.func, the nn attributes, ``replace_gru`` / ``replace_rnn``, the generated ops
under ``torch.library.opcheck``, the saved-state path for any cell, the API's hook
``cell_layer_autograd``; and the NumPy modules ``rnnkernels.GRU`` / ``RNN`` against
torch.nn with per-row lengths. The LSTM's own grid is in test_torch_module.py and
test_modules.py; the code under test is the same generic module for all cells."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import rel_err

torch = pytest.importorskip("torch", reason="torch is not installed (pip install rnnkernels[torch])")
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence  # noqa: E402

import rnnkernels  # noqa: E402
from rnnkernels import cells  # noqa: E402
import rnnkernels.torch as rtorch  # noqa: E402

pytestmark = pytest.mark.torch

INPUT, HIDDEN, STEPS = 3, 5, 6
LENGTHS = [6, 2, 6, 1, 4]  # unsorted, with a tie, a single step and a full row

# (our torch module, torch.nn's, constructor keywords, cell name)
CELLS = {
    "gru": (rtorch.GRU, torch.nn.GRU, {}, "gru"),
    "rnn_tanh": (rtorch.RNN, torch.nn.RNN, {}, "rnn_tanh"),
    "rnn_relu": (rtorch.RNN, torch.nn.RNN, {"nonlinearity": "relu"}, "rnn_relu"),
}


def _host_backends(cell: str) -> list[str]:
    """The host backends that implement ``cell`` in this checkout ("reference" always;
    "cpu" once its Numba backend is registered)."""
    return [b for b in ("reference", "cpu") if cells.get(cell).implementation(b) is not None]


def _pair(cell, layers=1, bidirectional=False, batch_first=False, bias=True, dtype=torch.float64, backend="auto", **kwargs):
    """torch.nn's module and ours holding the same parameters."""
    ours_cls, ref_cls, extra, _ = CELLS[cell]
    torch.manual_seed(0)
    config = dict(bias=bias, batch_first=batch_first, bidirectional=bidirectional, dtype=dtype, **extra, **kwargs)
    ref = ref_cls(INPUT, HIDDEN, layers, **config)
    ours = ours_cls(INPUT, HIDDEN, layers, backend=backend, **config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _run(module, x, h0, packed, batch_first, seed=1):
    """Forward with fresh leaves, a random linear loss on every output, backward."""
    x = x.detach().clone().requires_grad_()
    h0 = None if h0 is None else h0.detach().clone().requires_grad_()
    inp = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=batch_first, enforce_sorted=False) if packed else x
    y, h_n = module(inp, h0)
    if packed:
        assert isinstance(y, PackedSequence)
        y, _ = pad_packed_sequence(y, batch_first=batch_first, total_length=STEPS)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (y, h_n))
    loss.backward()
    grads = {"x": x.grad}
    if h0 is not None:
        grads["h0"] = h0.grad
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return {"y": y, "h_n": h_n}, grads


def _compare(ref, ours, packed, batch_first, state=True, tol=1e-8):
    gen = torch.Generator().manual_seed(2)
    dtype = ref.weight_ih_l0.dtype
    batch = len(LENGTHS)
    x = torch.randn((batch, STEPS, INPUT) if batch_first else (STEPS, batch, INPUT), generator=gen, dtype=dtype)
    rows = ref.num_layers * (2 if ref.bidirectional else 1)
    h0 = torch.randn(rows, batch, HIDDEN, generator=gen, dtype=dtype) if state else None
    want_out, want_grads = _run(ref, x, h0, packed, batch_first)
    got_out, got_grads = _run(ours, x, h0, packed, batch_first)
    assert list(got_grads) == list(want_grads)
    for name in want_out:
        assert got_out[name].dtype == dtype and got_out[name].shape == want_out[name].shape, name
        assert rel_err(got_out[name].detach(), want_out[name].detach()) < tol, name
    for name in want_grads:
        assert got_grads[name] is not None, name
        assert rel_err(got_grads[name], want_grads[name]) < tol, name


# layers, bidirectional, batch_first, bias, packed: the configurations, each in
# one row with the others varied, so that every feature meets every cell at little cost.
GRID = [(2, True, True, True, True), (2, True, False, False, False), (1, False, True, True, False), (2, False, False, True, True)]


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize(
    "layers,bidirectional,batch_first,bias,packed", GRID,
    ids=[f"L{l}-{'bi' if d else 'uni'}-{'bf' if f else 'tm'}-{'bias' if b else 'nobias'}-{'packed' if p else 'padded'}" for l, d, f, b, p in GRID],
)
def test_dropin_matches_torch_nn(cell, layers, bidirectional, batch_first, bias, packed):
    for backend in _host_backends(cell):
        ref, ours = _pair(cell, layers, bidirectional, batch_first, bias, backend=backend)
        _compare(ref, ours, packed, batch_first)


def test_dropin_on_the_emulated_kernels():
    """The GRU's CUDA kernels (on the CPU emulator, float32) through the drop-in, packed
    input and the saved path both, where this checkout has them."""
    if cells.GRU.implementation("emulated") is None:
        pytest.skip("the emulated backend does not implement the GRU in this checkout")
    ref, ours = _pair("gru", 1, True, dtype=torch.float32, backend="emulated")
    for packed in (False, True):
        _compare(ref, ours, packed, batch_first=False, tol=2e-5)


@pytest.mark.parametrize("cell", list(CELLS))
def test_without_initial_state_unbatched_and_lengths(cell):
    ref, ours = _pair(cell, 2, True, backend="reference")
    _compare(ref, ours, packed=True, batch_first=False, state=False)
    x = torch.randn(STEPS, INPUT, dtype=torch.float64)
    h0 = torch.randn(4, HIDDEN, dtype=torch.float64)
    for args in ((x,), (x, h0)):
        want, want_h = ref(*args)
        got, got_h = ours(*args)
        assert got.shape == want.shape == (STEPS, 2 * HIDDEN) and got_h.shape == want_h.shape == (4, HIDDEN)
        assert rel_err(got.detach(), want.detach()) < 1e-10 and rel_err(got_h.detach(), want_h.detach()) < 1e-10
    # lengths= on padded input is packing without the packing
    xb = torch.randn(len(LENGTHS), STEPS, INPUT, dtype=torch.float64)
    _, bf_ours = _pair(cell, 2, True, batch_first=True, backend="reference")
    packed_y, packed_h = bf_ours(pack_padded_sequence(xb, torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False))
    want_y, _ = pad_packed_sequence(packed_y, batch_first=True, total_length=STEPS)
    y, h_n = bf_ours(xb, lengths=LENGTHS)
    assert torch.equal(y, want_y) and torch.equal(h_n, packed_h)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_step_matches_general_path_and_torch_nn(cell, dtype, monkeypatch):
    """A T=1 call with a state under no_grad on the cpu backend takes the decode step
    (no custom op; the cell's cpu ``cell_step``), as the LSTM's; same results as
    torch.nn and, to rounding, as the general path."""
    if cells.get(cell).implementation("cpu") is None:
        pytest.skip(f"the cpu backend does not implement {cell} in this checkout")
    from rnnkernels.torch import _ops

    ref, ours = _pair(cell, 2, True, batch_first=True, dtype=dtype, backend="cpu")
    ref.eval(), ours.eval()
    state = torch.randn(4, 3, HIDDEN, dtype=dtype)
    steps = [torch.randn(3, 1, INPUT, dtype=dtype) for _ in range(3)]
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    short = []
    with torch.no_grad():
        s_ours = s_theirs = state
        for x in steps:
            monkeypatch.setattr(_ops, "cell_layer_autograd", None)  # the decode step calls no op
            y_ours, s_ours = ours(x, s_ours)
            monkeypatch.undo()
            y_theirs, s_theirs = ref(x, s_theirs)
            for a, b in ((y_ours, y_theirs), (s_ours, s_theirs)):
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a, b, **tol)
            short.append((y_ours, s_ours))
    s_general = state
    for x, (y_short, s_short) in zip(steps, short):
        y, s_general = ours(x, s_general)  # grad mode on: the general path
        torch.testing.assert_close(y.detach(), y_short, **tol)
        torch.testing.assert_close(s_general.detach(), s_short, **tol)
    with torch.no_grad(), pytest.raises(RuntimeError, match="Expected hidden size"):
        ours(steps[0], state[:1])


def test_state_dict_both_ways_and_nn_attributes():
    for cell, (ours_cls, ref_cls, extra, _) in CELLS.items():
        torch.manual_seed(3)
        ref = ref_cls(INPUT, HIDDEN, 3, bidirectional=True, **extra)
        ours = ours_cls(INPUT, HIDDEN, 3, bidirectional=True, **extra)
        assert list(ours.state_dict()) == list(ref.state_dict()), cell
        for (name, mine), theirs in zip(ours.state_dict().items(), ref.state_dict().values()):
            assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, (cell, name)
        ours.load_state_dict(ref.state_dict(), strict=True)
        back = ref_cls(INPUT, HIDDEN, 3, bidirectional=True, **extra)
        back.load_state_dict(ours.state_dict(), strict=True)
        for name, value in ref.state_dict().items():
            assert torch.equal(back.state_dict()[name], value), (cell, name)
        with pytest.raises(RuntimeError, match="Unexpected key"):
            ours_cls(INPUT, HIDDEN, 3, bidirectional=True, bias=False, **extra).load_state_dict(ref.state_dict(), strict=True)
        # what code written for torch.nn reads
        assert ours.mode == ref.mode and repr(ours) == repr(ref), cell
        assert ours._flat_weights_names == ref._flat_weights_names
        assert [t.shape for t in ours._flat_weights] == [t.shape for t in ref._flat_weights]
        assert [[p.shape for p in g] for g in ours.all_weights] == [[p.shape for p in g] for g in ref.all_weights]
        ours.flatten_parameters()
        bound = 1 / HIDDEN**0.5
        assert all(p.abs().max() <= bound for p in ours.parameters())
        x = torch.randn(STEPS, 2, INPUT)
        with pytest.raises(RuntimeError, match="Expected hidden size"):
            ours(x, torch.zeros(1, 2, HIDDEN))
        with pytest.raises(TypeError, match="hx must be a tensor"):
            ours(x, (torch.zeros(6, 2, HIDDEN),))
        with pytest.raises(RuntimeError, match="input_size"):
            ours(torch.randn(STEPS, 2, INPUT + 1))
    assert rtorch.RNN(INPUT, HIDDEN, 1, "relu").nonlinearity == "relu"
    with pytest.raises(ValueError, match="nonlinearity"):
        rtorch.RNN(INPUT, HIDDEN, nonlinearity="sigmoid")


@pytest.mark.parametrize("cell", ["gru", "rnn_relu"])
def test_dropout_between_layers(cell):
    """As the LSTM drop-in: masks through torch.nn.functional.dropout, so torch's seed
    reproduces them; eval equals torch.nn; p = 1 is torch.nn's result exactly."""
    ref, ours = _pair(cell, 3, True, dropout=0.5, backend="reference")
    x = torch.randn(STEPS, 4, INPUT, dtype=torch.float64)
    torch.manual_seed(7)
    first = ours(x)[0]
    torch.manual_seed(7)
    assert torch.equal(ours(x)[0], first)
    ours.eval(), ref.eval()
    assert rel_err(ours(x)[0].detach(), ref(x)[0].detach()) < 1e-10
    assert rel_err(first.detach(), ours(x)[0].detach()) > 1e-3
    ref_all, ours_all = _pair(cell, 3, True, dropout=1.0, backend="reference")
    for a, b in zip(ours_all(x), ref_all(x)):
        assert rel_err(a.detach(), b.detach()) < 1e-10


def test_torch_compile_fullgraph():
    ref, ours = _pair("gru", 2, True, batch_first=True, backend="reference")
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, STEPS, INPUT, dtype=torch.float64)
    for module in (ref, compiled):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        y, h_n = module(xi)
        (y.square().sum() + h_n.sum()).backward()
        if module is ref:
            want = (y.detach(), xi.grad, [p.grad for p in ref.parameters()])
    assert rel_err(y.detach(), want[0]) < 1e-8 and rel_err(xi.grad, want[1]) < 1e-8
    for got, expected in zip([p.grad for p in ours.parameters()], want[2]):
        assert rel_err(got, expected) < 1e-8


@pytest.mark.parametrize("lengths", [LENGTHS, sorted(LENGTHS, reverse=True)], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("cell", ["gru", "lstm_proj"])
def test_torch_compile_fullgraph_with_lengths(cell, lengths):
    """``lengths=`` under torch.compile(fullgraph=True): no branch on the lengths' values
    (whether rows come sorted is data), forward and every gradient as torch.nn's packed
    run. Rows already sorted take the same compiled path."""
    if cell == "gru":
        ref, ours = _pair("gru", 2, True, backend="reference")
    else:
        torch.manual_seed(0)
        config = dict(bidirectional=True, dtype=torch.float64, proj_size=2)
        ref = torch.nn.LSTM(INPUT, HIDDEN, 2, **config)
        ours = rtorch.LSTM(INPUT, HIDDEN, 2, backend="reference", **config)
        ours.load_state_dict(ref.state_dict(), strict=True)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(STEPS, len(lengths), INPUT, dtype=torch.float64)
    results = []
    for module in (ref, compiled):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        if module is ref:
            y, state = ref(pack_padded_sequence(xi, torch.tensor(lengths), enforce_sorted=False))
            y, _ = pad_packed_sequence(y, total_length=STEPS)
        else:
            y, state = module(xi, lengths=torch.tensor(lengths))
        h_n = state if cell == "gru" else state[0]
        (y.sin().sum() + h_n.square().sum()).backward()
        results.append((y.detach(), h_n.detach(), xi.grad, [p.grad for p in module.parameters()]))
    (want_y, want_h, want_dx, want_params), (y, h_n, dx, params) = results
    assert rel_err(y, want_y) < 1e-10 and rel_err(h_n, want_h) < 1e-10 and rel_err(dx, want_dx) < 1e-10
    for got, expected in zip(params, want_params, strict=True):
        assert rel_err(got, expected) < 1e-10


def test_torch_func_grad_and_vmap():
    ref, ours = _pair("rnn_tanh", 1, True, backend="reference")
    x = torch.randn(STEPS, 2, INPUT, dtype=torch.float64)

    def loss(module):
        return lambda params, x: torch.func.functional_call(module, params, (x,))[0].sin().sum()

    params = {name: p.detach() for name, p in ours.named_parameters()}
    got = torch.func.grad(loss(ours), argnums=(0, 1))(params, x)
    want = torch.func.grad(loss(ref), argnums=(0, 1))(params, x)
    assert rel_err(got[1], want[1]) < 1e-10
    for name in params:
        assert rel_err(got[0][name], want[0][name]) < 1e-10, name
    xs = torch.randn(3, STEPS, 2, INPUT, dtype=torch.float64)
    assert rel_err(torch.func.vmap(lambda x: ours(x)[0])(xs).detach(), torch.stack([ref(x)[0] for x in xs]).detach()) < 1e-10


def test_no_double_backward():
    _, ours = _pair("gru", backend="reference")
    x = torch.randn(STEPS, 2, INPUT, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ours(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        g.sum().backward()


class _Model(torch.nn.Module):
    """Stock layers: embedding, a 2-layer bidirectional GRU, a relu RNN, linear."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, INPUT)
        self.gru = torch.nn.GRU(INPUT, HIDDEN, 2, bidirectional=True, batch_first=True)
        self.rnn = torch.nn.RNN(2 * HIDDEN, HIDDEN, nonlinearity="relu", batch_first=True)
        self.head = torch.nn.Linear(HIDDEN, 2)

    def forward(self, tokens):
        y, _ = self.gru(self.embed(tokens))
        y, h = self.rnn(y)
        return self.head(h[-1])


def test_replace_gru_and_rnn_on_a_stock_model():
    torch.manual_seed(5)
    model = _Model().double()
    tokens = torch.randint(0, 11, (4, STEPS))
    want = model(tokens)
    want.sum().backward()
    want_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    gru_param = model.gru.weight_hh_l0
    assert rtorch.replace_gru(model, backend="reference") == ["gru"]
    assert rtorch.replace_rnn(model, backend="reference") == ["rnn"]
    assert type(model.gru) is rtorch.GRU and type(model.rnn) is rtorch.RNN and model.rnn.nonlinearity == "relu"
    assert model.gru.weight_hh_l0 is gru_param  # the same Parameter objects
    got = model(tokens)
    got.sum().backward()
    assert rel_err(got.detach(), want.detach()) < 1e-10
    for name, p in model.named_parameters():
        assert rel_err(p.grad, want_grads[name]) < 1e-10, name
    assert rtorch.replace_gru(model) == []  # nothing left to replace
    with pytest.raises(ValueError, match="not the model itself"):
        rtorch.replace_rnn(torch.nn.RNN(2, 3))


@pytest.mark.parametrize("cell", ["gru", "rnn_tanh"])
def test_opcheck(cell):
    """The generated ops (schemas, fakes, autograd and vmap registrations) under
    torch.library.opcheck, with and without lengths (rnn_relu's ops come from the same
    function as rnn_tanh's)."""
    op = getattr(torch.ops.rnnkernels, f"{cell}_layer")
    backward = getattr(torch.ops.rnnkernels, f"{cell}_layer_backward")
    gates = 3 if cell == "gru" else 1
    gen = torch.Generator().manual_seed(4)

    def r(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    batch = len(LENGTHS)
    x, w_ih, w_hh, b_ih, b_hh, h0 = r(STEPS, batch, INPUT), r(gates * HIDDEN, INPUT), r(gates * HIDDEN, HIDDEN), r(gates * HIDDEN), r(gates * HIDDEN), r(batch, HIDDEN)
    for lengths, reverse in ((None, False), (torch.tensor(LENGTHS), True)):
        args = (x, w_ih, w_hh, b_ih, b_hh, h0, lengths, reverse, "reference")
        torch.library.opcheck(op.default, tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))
        torch.library.opcheck(backward.default, (r(STEPS, batch, HIDDEN), r(batch, HIDDEN), *(a.detach() if isinstance(a, torch.Tensor) else a for a in args)))


def test_saved_state_path_for_any_cell(monkeypatch):
    """A cell whose backend describes its saved state as arrays (SavedArrays) gets the
    saved path of the LSTM: backward runs no forward and matches torch.nn. Shown on
    the tanh RNN's reference backend with a SavedArrays written here (its backward
    reads h [T+1, B, H] beside x and the weights); the GRU/RNN backends that describe
    theirs take the same path."""
    import dataclasses

    from rnnkernels import modules, rnn_reference
    from rnnkernels._backend import SavedArrays
    from rnnkernels.torch import _ops

    def layout(steps, batch, input_size, hidden, dtype):
        return [((steps + 1, batch, hidden), np.float64)]

    def from_arrays(x, w_ih, w_hh, has_bias, arrays):
        f64 = lambda a: np.array(a, dtype=np.float64)  # noqa: E731
        return rnn_reference.Saved(f64(x), f64(w_ih), f64(w_hh), has_bias, False, "tanh", f64(arrays[0]))

    described = SavedArrays(layout, lambda saved: [saved.h], from_arrays)
    monkeypatch.setattr(rnn_reference, "TANH_BACKEND", dataclasses.replace(rnn_reference.TANH_BACKEND, saved_arrays=described))
    monkeypatch.setattr(_ops, "_SAVES_ARRAYS", {})
    calls = {"training": 0, "inference": 0}
    original = modules.cell_forward

    def counting(*args, **kwargs):
        calls["training" if kwargs.get("training") else "inference"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(modules, "cell_forward", counting)
    ref, ours = _pair("rnn_tanh", 2, True, backend="reference")
    _compare(ref, ours, packed=False, batch_first=False)
    assert calls == {"training": 4, "inference": 0}  # 2 layers x 2 directions, once each
    assert _ops._SAVES_ARRAYS == {("reference", "cpu", "rnn_tanh"): True}


def test_cell_layer_autograd_hook():
    """The hook rnnkernels' API calls for torch tensors that require grad:
    ``cell_layer_autograd(cell_name, ...) -> (y, *state_n)``, a missing state zero."""
    ref, _ = _pair("gru")
    x = torch.randn(STEPS, 2, INPUT, dtype=torch.float64, requires_grad=True)
    weights = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    y, h_n = rtorch.cell_layer_autograd("gru", x, *weights, None, None, False, "reference")
    (y.sin().sum() + h_n.sum()).backward()
    got = [x.grad] + [w.grad for w in weights]
    x.grad = None
    want_y, want_h = ref(x)
    (want_y.sin().sum() + want_h[0].sum()).backward()
    assert rel_err(y.detach(), want_y.detach()) < 1e-10 and rel_err(h_n.detach(), want_h[0].detach()) < 1e-10
    for a, b in zip(got, [x.grad] + [p.grad for p in ref.parameters()]):
        assert rel_err(a, b) < 1e-10
    # rnnkernels.gru_forward on tensors that require grad goes through the hook
    x.grad = None
    out = rnnkernels.gru_forward(x, *weights, backend="reference")
    assert out.y.grad_fn is not None and out.h_n.grad_fn is not None
    (out.y.sin().sum() + out.h_n.sum()).backward()
    assert rel_err(x.grad, got[0]) < 1e-12
    with pytest.raises(ValueError, match="unknown cell"):
        rtorch.cell_layer_autograd("lstmish", x, *weights, None, None, False, "reference")
    with pytest.raises(ValueError, match="state0 must hold 1"):
        rtorch.cell_layer_autograd("gru", x, *weights, (None, None), None, False, "reference")


# ----------------------------------------------------------------------------- NumPy modules


@pytest.mark.parametrize("cell", list(CELLS))
def test_numpy_modules_match_torch_nn_with_lengths(cell):
    _, ref_cls, extra, _ = CELLS[cell]
    ours_cls = rnnkernels.GRU if cell == "gru" else rnnkernels.RNN
    torch.manual_seed(0)
    ref = ref_cls(INPUT, HIDDEN, 2, bidirectional=True, batch_first=True, dtype=torch.float64, **extra)
    for backend in _host_backends(cell):
        ours = ours_cls.from_torch(ref, dtype=np.float64, backend=backend)
        assert list(ours.state_dict()) == list(ref.state_dict())
        rng = np.random.default_rng(1)
        x = rng.standard_normal((len(LENGTHS), STEPS, INPUT))
        h0 = rng.standard_normal((4, len(LENGTHS), HIDDEN))
        y, h_n = ours(x, h0, lengths=LENGTHS)
        dy, dh = rng.standard_normal(y.shape), rng.standard_normal(h_n.shape)
        grads = ours.backward(dy, dh)
        xt, ht = torch.tensor(x, requires_grad=True), torch.tensor(h0, requires_grad=True)
        ref.zero_grad()
        yt, hnt = ref(pack_padded_sequence(xt, torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False), ht)
        yt, _ = pad_packed_sequence(yt, batch_first=True, total_length=STEPS)
        torch.autograd.backward([yt, hnt], [torch.tensor(dy), torch.tensor(dh)])
        assert rel_err(y, yt.detach().numpy()) < 1e-10 and rel_err(h_n, hnt.detach().numpy()) < 1e-10
        assert rel_err(grads.dx, xt.grad.numpy()) < 1e-10 and rel_err(grads.dh0, ht.grad.numpy()) < 1e-10
        assert list(grads.params) == list(ours.state_dict())
        for name, p in ref.named_parameters():
            assert rel_err(grads.params[name], p.grad.numpy()) < 1e-10, (backend, name)
    assert "nonlinearity='relu'" in repr(rnnkernels.RNN(INPUT, HIDDEN, nonlinearity="relu")) or cell != "rnn_relu"
    with pytest.raises(ValueError, match="h0 must have shape"):
        ours(x, h0[:1])




@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_dtype_mismatches_are_value_errors_naming_what(cls):
    """A float64 input to a float32 module: torch.nn's ValueError and message; a state of
    another dtype: a ValueError naming hx, on the general path and the decode step."""
    import rnnkernels.torch as rt

    ours, theirs = getattr(rt, cls)(3, 4), getattr(torch.nn, cls)(3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError) as want:
        theirs(x)
    with pytest.raises(ValueError) as got:
        ours(x)
    assert str(got.value) == str(want.value)
    state = torch.zeros(1, 2, 4, dtype=torch.float64)
    hx = (state, torch.zeros(1, 2, 4)) if cls == "LSTM" else state
    for steps in (5, 1):  # T = 1 under no_grad takes the decode step
        with torch.no_grad(), pytest.raises(ValueError, match=r"hx(\[0\])? must have the weights' dtype torch.float32"):
            ours(torch.randn(steps, 2, 3), hx)


@pytest.mark.parametrize("cls", ["GRU", "RNN"])
def test_numpy_module_state_dict_mismatch_is_a_value_error(cls):
    module = getattr(rnnkernels, cls)(3, 4)
    state = {k: v for k, v in getattr(torch.nn, cls)(3, 4).state_dict().items() if "bias_hh" not in k}
    with pytest.raises(ValueError, match=r"missing keys \['bias_hh_l0'\]"):
        module.load_state_dict(state)
