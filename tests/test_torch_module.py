"""``rnnkernels.torch.LSTM`` against ``torch.nn.LSTM``: forward and every gradient over
layers x bidirectional x batch_first x bias x packed input, state_dict round trips,
the custom op under ``torch.library.opcheck`` and ``torch.compile``, dropout, and
cuDNN on a GPU where there is one."""

from __future__ import annotations

import itertools
import warnings

import pytest
from conftest import rel_err

torch = pytest.importorskip("torch", reason="torch is not installed (pip install rnnkernels[torch])")
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence  # noqa: E402

from rnnkernels.torch import LSTM  # noqa: E402

pytestmark = pytest.mark.torch

INPUT, HIDDEN, STEPS = 3, 5, 6
LENGTHS = [6, 2, 6, 1, 4]  # unsorted, with a tie, a single step and a full row
TOLERANCE = {torch.float64: 1e-8, torch.float32: 2e-5}


def _pair(layers=1, bidirectional=False, batch_first=False, bias=True, dtype=torch.float64, seed=0, **kwargs):
    """An nn.LSTM and our LSTM holding the same parameters."""
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(INPUT, HIDDEN, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, dtype=dtype, **kwargs)
    ours = LSTM(INPUT, HIDDEN, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _run(module, x, state, packed, batch_first, seed=1):
    """Forward with fresh leaves, a random linear loss on every output, backward.
    Returns the outputs and the gradients of input, state and parameters."""
    x = x.detach().clone().requires_grad_()
    h0, c0 = (s.detach().clone().requires_grad_() for s in state) if state is not None else (None, None)
    inp = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=batch_first, enforce_sorted=False) if packed else x
    y, (h_n, c_n) = module(inp, None if h0 is None else (h0, c0))
    if packed:
        assert isinstance(y, PackedSequence)
        y, _ = pad_packed_sequence(y, batch_first=batch_first, total_length=STEPS)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (y, h_n, c_n))
    loss.backward()
    grads = {"x": x.grad}
    if h0 is not None:
        grads.update(h0=h0.grad, c0=c0.grad)
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return {"y": y, "h_n": h_n, "c_n": c_n}, grads


def _compare(ref, ours, dtype, packed, batch_first, state=True, seed=2):
    gen = torch.Generator().manual_seed(seed)
    batch = len(LENGTHS)
    shape = (batch, STEPS, INPUT) if batch_first else (STEPS, batch, INPUT)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    rows = ref.num_layers * (2 if ref.bidirectional else 1)
    hx = tuple(torch.randn(rows, batch, HIDDEN, generator=gen, dtype=dtype) for _ in range(2)) if state else None
    want_out, want_grads = _run(ref, x, hx, packed, batch_first)
    got_out, got_grads = _run(ours, x, hx, packed, batch_first)
    assert list(got_grads) == list(want_grads)
    tol = TOLERANCE[dtype]
    for name in want_out:
        assert got_out[name].dtype == dtype and got_out[name].shape == want_out[name].shape, name
        assert rel_err(got_out[name].detach(), want_out[name].detach()) < tol, name
    for name in want_grads:
        assert got_grads[name] is not None, name
        assert rel_err(got_grads[name], want_grads[name]) < tol, name


GRID = list(itertools.product([1, 2], [False, True], [False, True], [True, False], [False, True]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    "layers,bidirectional,batch_first,bias,packed", GRID,
    ids=[f"L{l}-{'bi' if d else 'uni'}-{'bf' if f else 'tm'}-{'bias' if b else 'nobias'}-{'packed' if p else 'padded'}" for l, d, f, b, p in GRID],
)
def test_matches_nn_lstm(layers, bidirectional, batch_first, bias, packed, dtype):
    ref, ours = _pair(layers, bidirectional, batch_first, bias, dtype)
    _compare(ref, ours, dtype, packed, batch_first)


def test_without_initial_state_and_unbatched():
    ref, ours = _pair(2, True)
    _compare(ref, ours, torch.float64, packed=True, batch_first=False, state=False)
    x = torch.randn(STEPS, INPUT, dtype=torch.float64)
    hx = tuple(torch.randn(4, HIDDEN, dtype=torch.float64) for _ in range(2))
    for args in ((x,), (x, hx)):
        want, (want_h, want_c) = ref(*args)
        got, (got_h, got_c) = ours(*args)
        assert got.shape == want.shape == (STEPS, 2 * HIDDEN) and got_h.shape == want_h.shape == (4, HIDDEN)
        assert rel_err(got.detach(), want.detach()) < 1e-10
        assert rel_err(got_h.detach(), want_h.detach()) < 1e-10 and rel_err(got_c.detach(), want_c.detach()) < 1e-10


def test_lengths_keyword_equals_packing():
    _, ours = _pair(2, True, batch_first=True)
    x = torch.randn(len(LENGTHS), STEPS, INPUT, dtype=torch.float64)
    packed_y, (packed_h, packed_c) = ours(pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False))
    padded_want, _ = pad_packed_sequence(packed_y, batch_first=True, total_length=STEPS)
    y, (h_n, c_n) = ours(x, lengths=LENGTHS)
    assert torch.equal(y, padded_want) and torch.equal(h_n, packed_h) and torch.equal(c_n, packed_c)
    for b, n in enumerate(LENGTHS):
        assert torch.all(y[b, n:] == 0)


# ----------------------------------------------------------------------------- state dict


def test_strict_state_dict_round_trip():
    torch.manual_seed(3)
    ref = torch.nn.LSTM(INPUT, HIDDEN, 3, bidirectional=True)
    ours = LSTM(INPUT, HIDDEN, 3, bidirectional=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, mine), theirs in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, name
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = torch.nn.LSTM(INPUT, HIDDEN, 3, bidirectional=True)
    back.load_state_dict(ours.state_dict(), strict=True)
    for name, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    no_bias = LSTM(INPUT, HIDDEN, 3, bidirectional=True, bias=False)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        no_bias.load_state_dict(ref.state_dict(), strict=True)


def test_nn_lstm_interface():
    ours = LSTM(INPUT, HIDDEN, 2, bidirectional=True)
    ref = torch.nn.LSTM(INPUT, HIDDEN, 2, bidirectional=True)
    assert [[p.shape for p in group] for group in ours.all_weights] == [[p.shape for p in group] for group in ref.all_weights]
    ours.flatten_parameters()
    assert repr(ours) == repr(ref)
    bound = 1 / HIDDEN**0.5
    assert all(p.abs().max() <= bound for p in ours.parameters())
    with pytest.raises(NotImplementedError, match="proj_size"):  # backend "cuda" takes CUDA tensors only
        LSTM(INPUT, HIDDEN, proj_size=2, backend="cuda")(torch.zeros(2, 1, INPUT))
    with pytest.raises(ValueError, match="dropout"):
        LSTM(INPUT, HIDDEN, dropout=1.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LSTM(INPUT, HIDDEN, dropout=0.5)
    assert any("num_layers greater than 1" in str(w.message) for w in caught)
    x = torch.randn(STEPS, 2, INPUT)
    with pytest.raises(RuntimeError, match="Expected hidden"):
        ours(x, (torch.zeros(1, 2, HIDDEN), torch.zeros(1, 2, HIDDEN)))
    with pytest.raises(RuntimeError, match="input_size"):
        ours(torch.randn(STEPS, 2, INPUT + 1))
    with pytest.raises(ValueError, match="2D or 3D"):
        ours(torch.randn(STEPS))


# ----------------------------------------------------------------------------- custom op


def _op_args(bias, lengths, reverse, dtype=torch.float64, requires_grad=True):
    gen = torch.Generator().manual_seed(4)
    batch = len(lengths) if lengths is not None else 3

    def r(*shape):
        return torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)

    return (
        r(STEPS, batch, INPUT), r(4 * HIDDEN, INPUT), r(4 * HIDDEN, HIDDEN),
        r(4 * HIDDEN) if bias else None, r(4 * HIDDEN) if bias else None,
        r(batch, HIDDEN), r(batch, HIDDEN),
        None if lengths is None else torch.tensor(lengths), reverse, "cpu",
    )


@pytest.mark.parametrize(
    "bias,lengths,reverse",
    [(True, None, False), (False, None, True), (True, LENGTHS, True), (False, LENGTHS, False), (True, [6, 4, 4, 2, 0], True)],
    ids=["full", "full-reverse-nobias", "unsorted-reverse", "unsorted-nobias", "sorted-with-zero-reverse"],
)
def test_opcheck(bias, lengths, reverse):
    args = _op_args(bias, lengths, reverse)
    torch.library.opcheck(torch.ops.rnnkernels.lstm_layer.default, args)
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, *rest = (a.detach() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    upstream = (torch.randn(STEPS, x.shape[1], HIDDEN, dtype=x.dtype), torch.randn_like(h0), torch.randn_like(c0))
    torch.library.opcheck(torch.ops.rnnkernels.lstm_layer_backward.default, upstream + (x, w_ih, w_hh, b_ih, b_hh, h0, c0, *rest))


def test_op_gradcheck_and_empty_shapes():
    args = _op_args(True, [6, 3, 3, 1, 5], True)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.rnnkernels.lstm_layer(*a), args)
    for steps, batch in ((0, 3), (4, 0)):
        x = torch.randn(steps, batch, INPUT, dtype=torch.float64, requires_grad=True)
        h0 = torch.randn(batch, HIDDEN, dtype=torch.float64, requires_grad=True)
        w_ih = torch.randn(4 * HIDDEN, INPUT, dtype=torch.float64, requires_grad=True)
        w_hh = torch.randn(4 * HIDDEN, HIDDEN, dtype=torch.float64, requires_grad=True)
        y, h_n, c_n = torch.ops.rnnkernels.lstm_layer(x, w_ih, w_hh, None, None, h0, h0, None, False, "cpu")
        assert y.shape == (steps, batch, HIDDEN) and torch.equal(h_n, h0)
        (h_n.sum() + y.sum()).backward()
        assert torch.equal(h0.grad, torch.ones_like(h0)) and torch.equal(w_ih.grad, torch.zeros_like(w_ih))


def test_torch_compile_fullgraph():
    ref, ours = _pair(2, True, batch_first=True)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, STEPS, INPUT, dtype=torch.float64)
    for module in (ref, compiled):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        y, (h_n, c_n) = module(xi)
        (y.square().sum() + h_n.sum() + c_n.sum()).backward()
        if module is ref:
            want = (y.detach(), xi.grad, [p.grad for p in ref.parameters()])
    assert rel_err(y.detach(), want[0]) < 1e-8 and rel_err(xi.grad, want[1]) < 1e-8
    for got, expected in zip([p.grad for p in ours.parameters()], want[2]):
        assert rel_err(got, expected) < 1e-8


# ----------------------------------------------------------------------------- dropout


def test_dropout_between_layers():
    ref, ours = _pair(3, True, dropout=0.5)
    x = torch.randn(STEPS, 4, INPUT, dtype=torch.float64)
    # Reproducible with the seed, different from eval, eval equals nn.LSTM.
    torch.manual_seed(7)
    first = ours(x)[0]
    torch.manual_seed(7)
    assert torch.equal(ours(x)[0], first)
    ours.eval(), ref.eval()
    assert rel_err(ours(x)[0].detach(), ref(x)[0].detach()) < 1e-10
    assert rel_err(first.detach(), ours(x)[0].detach()) > 1e-3
    # p = 1 drops every input of layers 1 and 2: exactly nn.LSTM's behaviour.
    ref_all, ours_all = _pair(3, True, dropout=1.0)
    (got, (got_h, got_c)), (want, (want_h, want_c)) = ours_all(x), ref_all(x)
    for a, b in ((got, want), (got_h, want_h), (got_c, want_c)):
        assert rel_err(a.detach(), b.detach()) < 1e-10


def test_dropout_mask_statistics(monkeypatch):
    seen = []
    real_dropout = torch.nn.functional.dropout

    def spy(input, p, training):
        out = real_dropout(input, p, training)
        seen.append((input.detach(), out.detach()))
        return out

    monkeypatch.setattr("rnnkernels.torch._module.F.dropout", spy)
    ours = LSTM(INPUT, 64, 3, dropout=0.3, dtype=torch.float64)
    ours(torch.randn(20, 16, INPUT, dtype=torch.float64))
    assert len(seen) == 2  # after layers 0 and 1, not after the last
    for before, after in seen:
        kept = after != 0
        assert abs(kept.double().mean().item() - 0.7) < 0.02
        assert torch.allclose(after[kept], before[kept] / 0.7)


# ----------------------------------------------------------------------------- GPU


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch; the cuDNN comparison needs one")
    pytest.importorskip("cupy", reason="CuPy is not installed (pip install rnnkernels[cuda13])")


@pytest.mark.gpu
@pytest.mark.parametrize("layers,bidirectional,packed", [(1, False, False), (2, True, False), (2, True, True)])
def test_matches_cudnn(layers, bidirectional, packed):
    _cuda_or_skip()
    torch.manual_seed(0)
    ref = torch.nn.LSTM(32, 48, layers, bidirectional=bidirectional, batch_first=True).cuda()
    ours = LSTM(32, 48, layers, bidirectional=bidirectional, batch_first=True).cuda()
    ours.load_state_dict(ref.state_dict(), strict=True)
    lengths = torch.tensor([17, 9, 17, 3, 12, 1, 16, 8])
    x = torch.randn(8, 17, 32, device="cuda")
    results = []
    for module in (ref, ours):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        inp = pack_padded_sequence(xi, lengths, batch_first=True, enforce_sorted=False) if packed else xi
        y, (h_n, c_n) = module(inp)
        y = pad_packed_sequence(y, batch_first=True)[0] if packed else y
        gen = torch.Generator(device="cuda").manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=gen, device="cuda")).sum() for t in (y, h_n, c_n))
        loss.backward()
        results.append([y.detach(), h_n.detach(), c_n.detach(), xi.grad] + [p.grad for p in module.parameters()])
    torch.cuda.synchronize()
    for got, want in zip(results[1], results[0]):
        # cuDNN may use TF32; both are float32 with different summation orders.
        assert rel_err(got.cpu(), want.cpu()) < 2e-3


def test_bfloat16_is_refused_naming_the_dtype():
    # NumPy has no bfloat16: the message must say what is supported, not torch's
    # "Got unsupported ScalarType BFloat16" from .numpy().
    lstm = LSTM(5, 4).to(torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16.*float16, float32 or float64|float16, float32 or float64.*bfloat16"):
        lstm(torch.randn(3, 2, 5, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_step_in_an_unsupported_dtype_says_which(dtype):
    # A T=1 no_grad step with (h, c) takes the decode path; in a dtype the cpu backend
    # lacks it said "must have the type torch.float16, got torch.float16, ...".
    lstm = LSTM(5, 4).to(dtype).eval()
    state = (torch.zeros(1, 2, 4, dtype=dtype), torch.zeros(1, 2, 4, dtype=dtype))
    with torch.no_grad(), pytest.raises(TypeError, match="float32.*float64.*float16|float16.*float32.*float64"):
        lstm(torch.randn(1, 2, 5, dtype=dtype), state)
