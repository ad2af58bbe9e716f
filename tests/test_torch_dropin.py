"""rnnkernels.torch as a drop-in for torch.nn.LSTM (issue 13): saved state instead of
recompute, model-wide replacement, what code written for nn.LSTM reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rnnkernels.modules
import rnnkernels.torch as rtorch
from rnnkernels.torch import _ops


def _count_forwards(monkeypatch):
    """Counts every backend forward (cell_forward calls from run_direction) by mode."""
    calls = {"training": 0, "inference": 0}
    original = rnnkernels.modules.cell_forward

    def counting(*args, **kwargs):
        calls["training" if kwargs.get("training") else "inference"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(rnnkernels.modules, "cell_forward", counting)
    return calls


@pytest.mark.parametrize("backend", ["cpu", "reference", "emulated"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_backward_uses_saved_state_and_matches_nn_lstm(backend, bidirectional, monkeypatch):
    torch.manual_seed(0)
    dtype = torch.float64 if backend == "reference" else torch.float32
    reference = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=bidirectional).to(dtype)
    ours = rtorch.LSTM(5, 7, num_layers=2, bidirectional=bidirectional, backend=backend).to(dtype)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(6, 3, 5, dtype=dtype)
    h0 = torch.randn(2 * (1 + bidirectional), 3, 7, dtype=dtype)
    c0 = torch.randn_like(h0)
    calls = _count_forwards(monkeypatch)
    results = []
    for module in (ours, reference):
        xs, hs, cs = (t.clone().requires_grad_() for t in (x, h0, c0))
        y, (h, c) = module(xs, (hs, cs))
        if module is ours:
            forwards = dict(calls)
            assert forwards == {"training": 2 * (1 + bidirectional), "inference": 0}
        (y.square().sum() + h.sum() + (c * 0.5).sum()).backward()
        if module is ours:
            assert calls == forwards, "backward ran the forward again"
        results.append([y, h, c, xs.grad, hs.grad, cs.grad] + [p.grad for p in module.parameters()])
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


def test_saved_arrays_rebuild_the_same_gradients():
    """Each backend's SavedArrays round trip (to_arrays, from_arrays) gives backward
    bit for bit what the original saved state gives."""
    from rnnkernels._api import get_backend

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    w_ih = rng.standard_normal((24, 5)).astype(np.float32) * 0.3
    w_hh = rng.standard_normal((24, 6)).astype(np.float32) * 0.3
    bias = rng.standard_normal(24).astype(np.float32)
    h0, c0 = (rng.standard_normal((3, 6)).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((4, 3, 6)).astype(np.float32)
    for name in ("reference", "cpu", "emulated"):
        impl = get_backend(name)
        description = impl.saved_arrays
        _, _, _, saved = impl.forward(x, w_ih, w_hh, bias, h0, c0, True)
        arrays = description.to_arrays(saved)
        layout = description.layout(4, 3, 5, 6, np.dtype(np.float32))
        assert [(a.shape, a.dtype) for a in arrays] == [(tuple(s), np.dtype(d)) for s, d in layout], name
        rebuilt = description.from_arrays(x, w_ih, w_hh, True, [a.copy() for a in arrays])
        first = impl.backward(saved, dy, h0, c0)
        second = impl.backward(rebuilt, dy, h0, c0)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b, err_msg=name)


# (our module, torch.nn's, constructor keywords) per cell
_PACKED_CELLS = {
    "lstm": (rtorch.LSTM, torch.nn.LSTM, {}),
    "gru": (rtorch.GRU, torch.nn.GRU, {}),
    "rnn_tanh": (rtorch.RNN, torch.nn.RNN, {}),
    "rnn_relu": (rtorch.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}
_PACKED_LENGTHS = torch.tensor([6, 2, 6, 1, 4, 3])  # unsorted, a tie, a single step, full rows


def _packed_run(module, x, states0):
    """Packed forward (unsorted lengths), a random linear loss on the padded output and
    every final state, backward. Returns outputs and gradients (input, states, params)."""
    xs = x.clone().requires_grad_()
    states = tuple(s.clone().requires_grad_() for s in states0)
    packed = torch.nn.utils.rnn.pack_padded_sequence(xs, _PACKED_LENGTHS, enforce_sorted=False)
    out, hx = module(packed, states if len(states) > 1 else states[0])
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=x.shape[0])
    finals = hx if isinstance(hx, tuple) else (hx,)
    weights = torch.Generator().manual_seed(7)
    loss = (padded * torch.randn(padded.shape, generator=weights, dtype=x.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=weights, dtype=x.dtype)).sum() for s in finals)
    loss.backward()
    return [padded.detach(), *(s.detach() for s in finals), xs.grad, *(s.grad for s in states)] + [
        p.grad.clone() for p in module.parameters()
    ]


_PACKED_CASES = [
    (cell, backend, dtype)
    for cell in _PACKED_CELLS
    for backend, dtype in (("reference", torch.float32), ("cpu", torch.float32))
] + [
    ("lstm", "cpu", torch.float64),
    # the CUDA kernels' saved state (float32 arrays) on the CPU emulator
    ("lstm", "emulated", torch.float32),
    ("gru", "emulated", torch.float32),
    ("rnn_tanh", "emulated", torch.float32),
]


@pytest.mark.parametrize("cell,backend,dtype", _PACKED_CASES, ids=[f"{c}-{b}-{str(d)[6:]}" for c, b, d in _PACKED_CASES])
def test_packed_rows_keep_saved_state_and_match_nn(cell, backend, dtype, monkeypatch):
    """Rows with lengths (a PackedSequence) take the saved path: the forward runs once
    per layer and direction in training mode, backward runs none, the gradients match
    torch.nn's, and they are bit for bit the recompute path's (which reruns the forward
    per segment): the packed arrays rebuild every segment's saved state exactly, also
    where the backend saves wider than the input (the reference: float64)."""
    ours_cls, ref_cls, extra = _PACKED_CELLS[cell]
    torch.manual_seed(0)
    reference = ref_cls(3, 5, num_layers=2, bidirectional=True, dtype=dtype, **extra)
    ours = ours_cls(3, 5, num_layers=2, bidirectional=True, dtype=dtype, backend=backend, **extra)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(6, len(_PACKED_LENGTHS), 3, dtype=dtype)
    states0 = tuple(torch.randn(4, len(_PACKED_LENGTHS), 5, dtype=dtype) for _ in (("h", "c") if cell == "lstm" else ("h",)))
    calls = _count_forwards(monkeypatch)
    saved_path = _packed_run(ours, x, states0)
    # 2 layers x 2 directions, each one training forward per segment of its rows
    # (lengths 6, 4, 3, 2, 1: five segments), nothing at inference, nothing in backward
    assert calls == {"training": 2 * 2 * 5, "inference": 0}
    want = _packed_run(reference, x, states0)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for a, b in zip(saved_path, want):
        torch.testing.assert_close(a, b, **tol)
    monkeypatch.setattr(_ops, "_saves_arrays", lambda *args: False)  # the recompute path
    ours.zero_grad(set_to_none=True)
    recomputed = _packed_run(ours, x, states0)
    assert calls["inference"] == 2 * 2 * 5  # it did rerun the forward
    for a, b in zip(saved_path, recomputed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_saved_ops_opcheck(cell):
    """The saved path's ops with lengths (<c>_layer_train, <c>_layer_backward_saved)
    under torch.library.opcheck: their fakes' shapes (which do not depend on the
    lengths) match the real outputs, in both directions."""
    ops = _ops._OPS[cell]
    states, gates = (2, 4) if cell == "lstm" else (1, 3)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(6, 4, 3, **f64)
    weights = [torch.randn(gates * 5, 3, **f64), torch.randn(gates * 5, 5, **f64), torch.randn(gates * 5, **f64), torch.randn(gates * 5, **f64)]
    states0 = [torch.randn(4, 5, **f64) for _ in range(states)]
    lengths = torch.tensor([6, 4, 4, 1])
    for reverse in (False, True):
        args = (x, *weights, *states0, lengths, reverse, "cpu")
        torch.library.opcheck(ops.train._opoverload, args)
        saved = list(ops.train(*args)[1 + states:])
        upstream = (torch.randn(6, 4, 5, **f64), *(torch.randn(4, 5, **f64) for _ in range(states)))
        torch.library.opcheck(ops.backward_saved._opoverload, (*upstream, x, *weights[:2], True, saved, lengths, reverse, "cpu"))


def test_saved_path_under_torch_compile():
    torch.manual_seed(3)
    module = rtorch.LSTM(4, 5)
    x = torch.randn(3, 2, 4, requires_grad=True)
    module(x)[0].sum().backward()  # eager first: fills the backend cache compile reads
    eager = x.grad.clone()
    x.grad = None
    compiled = torch.compile(lambda x: module(x)[0].sum(), fullgraph=True)
    compiled(x).backward()
    torch.testing.assert_close(x.grad, eager)
    assert _ops._SAVES_ARRAYS[("auto", "cpu")] is True


# ----------------------------------------------------------------------------- replace_lstm


class _Tagger(torch.nn.Module):
    """A model of stock layers: embedding, a 2-layer bidirectional LSTM, linear."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 6)
        self.encoder = torch.nn.Sequential(torch.nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True))
        self.head = torch.nn.Linear(16, 5)

    def forward(self, tokens):
        y, _ = self.encoder[0](self.embed(tokens))
        return self.head(y)


def test_replace_lstm_same_outputs_gradients_and_training():
    import copy

    torch.manual_seed(4)
    original = _Tagger()
    swapped = copy.deepcopy(original)
    optimizer = torch.optim.SGD(swapped.parameters(), lr=0.1)  # built before the swap
    replaced = rtorch.replace_lstm(swapped)
    assert replaced == ["encoder.0"]
    assert type(swapped.encoder[0]) is rtorch.LSTM
    assert not any(type(m) is torch.nn.LSTM for m in swapped.modules())
    assert [n for n, _ in swapped.named_parameters()] == [n for n, _ in original.named_parameters()]
    tokens = torch.randint(0, 20, (3, 7))
    targets = torch.randint(0, 5, (3, 7))

    def loss_of(model):
        return torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 5), targets.reshape(-1))

    out_a, out_b = original(tokens), swapped(tokens)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    loss_of(original).backward()
    loss_of(swapped).backward()
    for (name, a), (_, b) in zip(original.named_parameters(), swapped.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    # A few training steps track the original (the optimizer holds the same Parameters).
    reference_optimizer = torch.optim.SGD(original.parameters(), lr=0.1)
    for _ in range(5):
        for model, opt in ((original, reference_optimizer), (swapped, optimizer)):
            opt.zero_grad()
            loss_of(model).backward()
            opt.step()
        torch.testing.assert_close(loss_of(swapped), loss_of(original), rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(original.named_parameters(), swapped.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_replace_lstm_shared_modules_and_refusals(monkeypatch):
    lstm = torch.nn.LSTM(3, 4)
    model = torch.nn.ModuleDict({"a": lstm, "b": torch.nn.Sequential(lstm), "c": torch.nn.GRU(3, 4)})
    model.eval()
    replaced = rtorch.replace_lstm(model, backend="reference")
    assert sorted(replaced) == ["a", "b.0"]
    assert model["a"] is model["b"][0] and model["a"].backend == "reference"
    assert not model["a"].training
    assert model["a"].weight_hh_l0 is lstm.weight_hh_l0
    assert type(model["c"]) is torch.nn.GRU
    assert rtorch.replace_lstm(model) == []
    with pytest.raises(ValueError, match="not the model itself"):
        rtorch.replace_lstm(torch.nn.LSTM(3, 4))
    with pytest.raises(TypeError, match="model must be"):
        rtorch.replace_lstm("not a module")
    with_projection = torch.nn.Sequential(torch.nn.LSTM(3, 4, proj_size=2))
    assert rtorch.replace_lstm(with_projection) == ["0"] and with_projection[0].proj_size == 2
    mixed = torch.nn.Sequential(torch.nn.LSTM(3, 4), torch.nn.LSTM(4, 4, proj_size=2))
    # Every backend takes proj_size now; a backend list without "emulated" stands in for
    # one that lacks projections, to show that nothing is swapped when one is refused.
    from rnnkernels.torch import _ops

    with monkeypatch.context() as patched:
        patched.setattr(_ops, "_PROJECTED_BACKENDS", ("auto", "cpu", "reference"))
        with pytest.raises(NotImplementedError, match="proj_size"):
            rtorch.replace_lstm(mixed, backend="emulated")
    assert type(mixed[0]) is torch.nn.LSTM  # nothing swapped when one is refused
    assert rtorch.replace_lstm(mixed, backend="emulated") == ["0", "1"]


# ----------------------------------------------------------------------------- what nn.LSTM code reads


@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "bidirectional": True}, {"bias": False, "batch_first": True, "dropout": 0.5, "num_layers": 2}])
def test_attributes_code_written_for_nn_lstm_reads(kwargs):
    torch.manual_seed(5)
    theirs = torch.nn.LSTM(3, 4, **kwargs)
    ours = rtorch.LSTM(3, 4, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert len(ours._flat_weights) == len(theirs._flat_weights)
    for a, b in zip(ours._flat_weights, theirs._flat_weights):
        assert a.shape == b.shape and torch.equal(a, b)
    assert len(ours.all_weights) == len(theirs.all_weights)
    for group_a, group_b in zip(ours.all_weights, theirs.all_weights):
        assert [tuple(p.shape) for p in group_a] == [tuple(p.shape) for p in group_b]
        assert all(torch.equal(a, b) for a, b in zip(group_a, group_b))
    assert ours.proj_size == theirs.proj_size == 0
    for name in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(ours, name) == getattr(theirs, name), name
    ours.flatten_parameters()  # a no-op that must exist
    assert repr(ours) == repr(theirs)
    assert repr(rtorch.LSTM(3, 4, backend="reference")) == "LSTM(3, 4, backend='reference')"


# ----------------------------------------------------------------------------- DistributedDataParallel


def test_distributed_data_parallel_matches_nn_lstm(tmp_path):
    """2 processes, gloo on 127.0.0.1: DDP training with rnnkernels.torch.LSTM ends
    with the parameters DDP training with nn.LSTM ends with, the same on both ranks
    (gradients averaged across ranks that saw different data). Hard timeout: 120 s."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("ddp_worker.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(rank), "2", str(port), str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{text[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, stock in ranks[0]["stock"].items():
        torch.testing.assert_close(ranks[0]["ours"][name], stock, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(ranks[1]["ours"][name], ranks[0]["ours"][name], rtol=0, atol=0, msg=name)
    assert not torch.equal(ranks[0]["stock"]["lstm.weight_hh_l0"], _initial_weight_hh())


def _initial_weight_hh():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("ddp_worker", Path(__file__).with_name("ddp_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.Model().lstm.weight_hh_l0.detach()


# ----------------------------------------------------------------------------- single steps


@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True}, {"bias": False, "num_layers": 2, "dropout": 0.3}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_step_short_path_matches_general_path_and_nn_lstm(kwargs, dtype, monkeypatch):
    torch.manual_seed(6)
    theirs = torch.nn.LSTM(5, 6, **kwargs).to(dtype).eval()
    ours = rtorch.LSTM(5, 6, **kwargs).to(dtype).eval()
    ours.load_state_dict(theirs.state_dict())
    rows = 2 * (1 + kwargs.get("bidirectional", False)) if kwargs.get("num_layers") else 1
    state = (torch.randn(rows, 3, 6, dtype=dtype), torch.randn(rows, 3, 6, dtype=dtype))
    steps = [torch.randn(3, 1, 5, dtype=dtype) if kwargs.get("batch_first") else torch.randn(1, 3, 5, dtype=dtype) for _ in range(4)]
    general = []
    with torch.no_grad():
        s_ours, s_theirs = state, state
        for x in steps:  # the short path: no custom op call
            monkeypatch.setattr(_ops, "cell_layer_autograd", None)
            y_ours, s_ours = ours(x, s_ours)
            monkeypatch.undo()
            y_theirs, s_theirs = theirs(x, s_theirs)
            tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
            for a, b in zip((y_ours, *s_ours), (y_theirs, *s_theirs)):
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a, b, **tol)
            general.append((y_ours, *s_ours))
    # The general path (grad mode on) gives the same to rounding (the short path's
    # products are torch's BLAS, not the cpu backend's packed kernel).
    s_general = state
    for x, short in zip(steps, general):
        y, s_general = ours(x, s_general)
        for a, b in zip((y, *s_general), short):
            torch.testing.assert_close(a.detach(), b, **tol)


def test_single_step_short_path_checks_and_leaves_inputs_alone():
    ours = rtorch.LSTM(5, 6).eval()
    x = torch.randn(1, 2, 5)
    h0, c0 = torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    copies = [t.clone() for t in (x, h0, c0)]
    with torch.no_grad():
        ours(x, (h0, c0))
        ours(x, (h0.clone().requires_grad_(), c0.clone().requires_grad_()))  # a state that requires grad
        with pytest.raises(RuntimeError, match="hidden\\[0\\] size"):
            ours(x, (torch.randn(1, 3, 6), c0))
        with pytest.raises(RuntimeError, match="input_size"):
            ours(torch.randn(1, 2, 4), (h0, c0))
        with pytest.raises(ValueError, match="input dtype .* does not match weight dtype"):  # torch.nn's
            ours(x.double(), (h0.double(), c0.double()))
        with pytest.raises(TypeError, match="hx must be a tuple"):
            ours(x, h0)
    for a, b in zip((x, h0, c0), copies):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 3, 4), (5, 0, 4)])
def test_saved_path_empty_shapes(shape):
    module = rtorch.LSTM(4, 5)
    x = torch.randn(*shape, requires_grad=True)
    y, (h, c) = module(x)
    (y.sum() + h.sum() + c.sum()).backward()
    assert x.grad.shape == x.shape and not x.grad.any()
    assert not module.weight_hh_l0.grad.any()


def test_saved_path_float16_emulated_same_bits_as_numpy_api():
    """lstm_forward on float16 torch tensors that require grad goes through the op's
    saved path (_launch.CellSaved as float32 arrays); its gradients are the NumPy API's."""
    import rnnkernels

    torch.manual_seed(8)
    inputs = [torch.randn(4, 3, 5), torch.randn(24, 5) * 0.3, torch.randn(24, 6) * 0.3, torch.randn(24) * 0.1, torch.randn(24) * 0.1]
    inputs = [t.half() for t in inputs]
    leaves = [t.clone().requires_grad_() for t in inputs]
    rnnkernels.lstm_forward(*leaves, backend="emulated").y.float().sum().backward()
    out = rnnkernels.lstm_forward(*(t.numpy() for t in inputs), training=True, backend="emulated")
    grads = rnnkernels.lstm_backward(out, np.ones((4, 3, 6), np.float16))
    for leaf, expected in zip(leaves, (grads.dx, grads.dw_ih, grads.dw_hh, grads.db_ih, grads.db_hh)):
        np.testing.assert_array_equal(leaf.grad.numpy(), expected)


# ----------------------------------------------------------------------------- a new user's gaps, against torch.nn

_NN = {"lstm": (rtorch.LSTM, torch.nn.LSTM), "gru": (rtorch.GRU, torch.nn.GRU), "rnn": (rtorch.RNN, torch.nn.RNN)}


def _nn_pair(cell, **kwargs):
    ours_cls, ref_cls = _NN[cell]
    torch.manual_seed(0)
    reference = ref_cls(3, 4, **kwargs)
    ours = ours_cls(3, 4, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _state(cell, *shape, **kwargs):
    if cell == "lstm":
        return torch.randn(*shape, **kwargs), torch.randn(*shape, **kwargs)
    return torch.randn(*shape, **kwargs)


def _message(call) -> str:
    with pytest.raises(RuntimeError) as error:
        call()
    return str(error.value)


@pytest.mark.parametrize("cell", list(_NN))
def test_device_mismatch_refused_with_nn_message(cell):
    """A meta input (or state) with CPU parameters is refused as torch.nn refuses it,
    rather than run on the ops' fakes and return meta tensors."""
    reference, ours = _nn_pair(cell)
    meta = torch.empty(5, 2, 3, device="meta")
    want = _message(lambda: reference(meta))
    assert "not at the same device" in want
    assert _message(lambda: ours(meta)) == want
    hx = _state(cell, 1, 2, 4, device="meta")
    want = _message(lambda: reference(torch.randn(5, 2, 3), hx))
    assert _message(lambda: ours(torch.randn(5, 2, 3), hx)) == want
    with torch.no_grad():  # the decode step's conditions send it to the same check
        assert _message(lambda: ours(torch.randn(1, 2, 3), hx)) == _message(lambda: reference(torch.randn(1, 2, 3), hx))


@pytest.mark.parametrize("cell", list(_NN))
def test_state_rank_messages_match_nn(cell):
    """Unbatched input with a batched state and batched input with an unbatched one:
    torch.nn's messages, on the general path and the decode step."""
    reference, ours = _nn_pair(cell)
    cases = [(torch.randn(5, 3), _state(cell, 1, 2, 4)), (torch.randn(5, 2, 3), _state(cell, 1, 4))]
    for x, hx in cases:
        want = _message(lambda x=x, hx=hx: reference(x, hx))
        assert "should also be" in want
        assert _message(lambda x=x, hx=hx: ours(x, hx)) == want
    with torch.no_grad():
        x, hx = torch.randn(1, 2, 3), _state(cell, 1, 4)
        assert _message(lambda: ours(x, hx)) == _message(lambda: reference(x, hx))


@pytest.mark.parametrize("cell", list(_NN))
def test_cpu_autocast_follows_nn(cell):
    """Under CPU autocast (bfloat16) each module returns what torch.nn's returns, form
    by form (torch 2.13: the LSTM's padded form and the RNN in bfloat16; the LSTM's
    packed form and the GRU in float32), computed in float32 (close to torch.nn's
    bfloat16 math), with float32 parameter gradients; an input already in bfloat16
    (from an autocast layer before it) is taken where torch.nn takes it."""
    reference, ours = _nn_pair(cell, num_layers=2)
    x = torch.randn(5, 2, 3)
    packed = lambda t: torch.nn.utils.rnn.pack_padded_sequence(t, [5, 3])  # noqa: E731
    hx = _state(cell, 2, 2, 4)
    data = lambda out: out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out  # noqa: E731
    for make, state in ((lambda: x, None), (lambda: packed(x), None), (lambda: x[:1], hx)):
        results = []
        for module in (reference, ours):
            module.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, _ = module(make(), state)
            results.append(data(out))
            data(out).float().sum().backward()
            assert module.weight_hh_l1.grad.dtype == torch.float32
        assert results[1].dtype == results[0].dtype
        torch.testing.assert_close(results[1].float(), results[0].float(), atol=3e-2, rtol=3e-2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the decode step
            assert ours(x[:1], hx)[0].dtype == reference(x[:1], hx)[0].dtype
    if cell != "gru":  # torch.nn's GRU refuses a bfloat16 input under autocast too
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, _ = reference(x.bfloat16())
            got, _ = ours(x.bfloat16())
        assert got.dtype == want.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 parameters: autocast casts nothing
        reference64, ours64 = _nn_pair(cell, dtype=torch.float64)
        assert ours64(x.double())[0].dtype == reference64(x.double())[0].dtype == torch.float64


@pytest.mark.parametrize("cell", list(_NN))
def test_packed_dropout_masks_match_nn(cell):
    """Dropout between layers with a PackedSequence: under the same seed, torch.nn's
    masks (drawn over the packed data), so outputs and gradients agree; ``lengths=``
    on the padded input draws the same masks."""
    reference, ours = _nn_pair(cell, num_layers=3, dropout=0.5, bidirectional=True, dtype=torch.float64)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = [6, 2, 5, 3]
    results = []
    for module in (reference, ours):
        torch.manual_seed(42)
        xs = x.clone().requires_grad_()
        out, _ = module(torch.nn.utils.rnn.pack_padded_sequence(xs, lengths, enforce_sorted=False))
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=6)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        results.append([y.detach(), xs.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.manual_seed(42)
    padded, _ = ours(x, lengths=torch.tensor(lengths))
    torch.testing.assert_close(padded, results[1][0], rtol=1e-12, atol=1e-14)


def test_eager_path_skips_torch_python_layers_and_zero_fills(monkeypatch):
    """What keeps the module's overhead down (benchmarks/torch_module_overhead.py):
    eagerly, the autograd Function is applied without Function.apply's Python layer
    and backward gets None, not zero-filled tensors, for the outputs no gradient
    reaches (the saved arrays, and here the final states); under torch.func the
    regular apply runs (its batching and setup_context handling), with equal results."""
    seen = {"apply": 0, "upstream": []}
    original_apply, original_grads = _ops._CellLayerFunction.apply, _ops._grads

    def counting_apply(*args):
        seen["apply"] += 1
        return original_apply(*args)

    def recording_grads(ctx, upstream):
        seen["upstream"].append(upstream)
        return original_grads(ctx, upstream)

    monkeypatch.setattr(_ops._CellLayerFunction, "apply", counting_apply)
    monkeypatch.setattr(_ops, "_grads", recording_grads)
    torch.manual_seed(4)
    module = rtorch.LSTM(3, 4)
    x = torch.randn(5, 2, 3, requires_grad=True)
    module(x)[0].sum().backward()
    assert seen["apply"] == 0
    (upstream,) = seen["upstream"]
    assert upstream[0] is not None and all(u is None for u in upstream[1:])
    eager = x.grad.clone()
    params = dict(module.named_parameters())
    grads = torch.func.grad(lambda x: torch.func.functional_call(module, params, (x,))[0].sum())(x.detach())
    assert seen["apply"] >= 1  # functorch re-enters apply once per level
    torch.testing.assert_close(grads, eager)
