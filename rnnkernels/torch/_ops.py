"""The custom ops ``rnnkernels::lstm_layer`` and ``rnnkernels::lstm_layer_backward``.

``lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend)
-> (y, h_n, c_n)`` is one LSTM layer in one direction::

    x        [T, B, I]   time-major
    w_ih     [4H, I], w_hh [4H, H], b_ih and b_hh [4H] or both None
    h0, c0   [B, H]
    lengths  [B] int64 or None (every row T steps); rows stop at their own length:
             y is zero past it, h_n and c_n are taken at its last step
    reverse  False: steps 0 .. n-1; True: n-1 .. 0 within each row's own length
    backend  a name for ``rnnkernels.lstm_forward`` ("auto": cuda for CUDA tensors)
    y [T, B, H], h_n and c_n [B, H]

Rows sorted longest first run fastest (no permutation inside the op); the module
sorts once per call.

Backward keeps the forward's saved state where it can. ``lstm_layer_train`` (same
arguments, no ``lengths``) runs the training forward and returns ``[y, h_n, c_n,
*saved]``: ``saved`` is the backend's state for backward as the fixed list of arrays
its ``SavedArrays`` describes (rnnkernels/_backend.py; gates [T, B, 4H], h and c
[T+1, B, H] for every backend here), as tensors, which autograd keeps;
``lstm_layer_backward_saved`` rebuilds the backend's state from them and the forward's
inputs and runs BPTT only. The autograd Function uses that pair when a gradient is
wanted, the rows have no ``lengths`` and the backend describes its state.

Otherwise (packed rows with lengths: the per-segment state is not yet packed into one
list) the forward runs the inference kernels (``training=False``, nothing kept), only
the inputs are saved, and ``lstm_layer_backward`` runs the training forward again,
then BPTT: one extra (inference) forward per layer and direction (+50% for forward +
backward at T=50, B=32, I=H=128 on the cpu backend, measured before the saved path).

``lstm_layer_backward(dy, dh_n, dc_n, <the forward's inputs>) -> (dx, dw_ih, dw_hh,
db, dh0, dc0)``; ``db`` [4H] is the gradient of each bias (zeros without biases).
It has no autograd of its own: double backward is not supported (an error says so).

``lstm_layer_autograd`` is what callers use (``rnnkernels.torch.LSTM``, and
``rnnkernels.lstm_forward`` for tensors that require grad): the op wrapped in an
``autograd.Function`` with ``setup_context``, which torch.func (grad, vjp, vmap)
needs and the op's own autograd registration lacks; both ops have batching rules
(a loop) for vmap.

CUDA tensors cross into CuPy by DLPack, zero-copy, and the kernels run on torch's
current stream of the tensors' device.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from .. import _arrays
from ..modules import (
    PROJECTED_BACKENDS,
    _Plan,
    backward_direction,
    projected_backward,
    projected_dtype,
    projected_forward,
    run_direction,
)

Tensor = torch.Tensor


@contextlib.contextmanager
def _backend_arrays(device: torch.device):
    """Yields (xp, to_array, to_tensor) for tensors on ``device``; for CUDA, inside
    CuPy's context for that device with torch's current stream as CuPy's."""
    if device.type == "cpu":
        yield np, lambda t: None if t is None else t.detach().numpy(), lambda a: torch.from_numpy(np.ascontiguousarray(a))
        return
    if device.type != "cuda":
        raise RuntimeError(f"rnnkernels runs on CPU and CUDA tensors, not on {device.type}")
    cupy = _arrays.import_cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _arrays.cuda_scope(index, torch_stream=True):
        yield (
            cupy,
            lambda t: None if t is None else cupy.from_dlpack(t.detach()),
            lambda a: torch.from_dlpack(cupy.ascontiguousarray(a)),
        )


def _plan(lengths: Optional[Tensor], steps: int, batch: int) -> _Plan:
    host = None
    if lengths is not None:
        if lengths.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
        host = lengths.detach().cpu().numpy().astype(np.int64).reshape(-1)
        if host.shape != (batch,):
            raise ValueError(f"lengths must have one entry per row of the batch ({batch}), got shape {tuple(lengths.shape)}")
        if batch and (host.min() < 0 or host.max() > steps):
            raise ValueError(f"lengths must lie in [0, {steps}] (the padded length), got {host.tolist()}")
    return _Plan(host, steps, batch)


def _check_layer(x: Tensor, w_hh: Tensor):
    if x.dtype not in (torch.float16, torch.float32, torch.float64):
        # before .numpy() / DLPack, whose message for bfloat16 names no argument
        raise TypeError(f"x must hold float16, float32 or float64 numbers, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D [T, B, I] (time-major), got shape {tuple(x.shape)}")
    if w_hh.dim() != 2:
        raise ValueError(f"w_hh must be 2-D [4H, H], got shape {tuple(w_hh.shape)}")


@torch.library.custom_op("rnnkernels::lstm_layer", mutates_args=())
def lstm_layer(
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction; see the module docstring."""
    _check_layer(x, w_hh)
    steps, batch = x.shape[0], x.shape[1]
    plan = _plan(lengths, steps, batch)
    with _backend_arrays(x.device) as (xp, to_array, to_tensor):
        xa, w_ih_a, w_hh_a, b_ih_a, b_hh_a, h0_a, c0_a = map(to_array, (x, w_ih, w_hh, b_ih, b_hh, h0, c0))
        if plan.order is not None:
            order = xp.asarray(plan.order)
            xa, h0_a, c0_a = xa[:, order], h0_a[order], c0_a[order]
        y, h_n, c_n, _ = run_direction(
            xa, (w_ih_a, w_hh_a, b_ih_a, b_hh_a), h0_a, c0_a, plan, reverse, training=False, backend=backend
        )
        if plan.order is not None:
            restore = xp.asarray(plan.restore)
            y, h_n, c_n = y[:, restore], h_n[restore], c_n[restore]
        return to_tensor(y), to_tensor(h_n), to_tensor(c_n)


@lstm_layer.register_fake
def _lstm_layer_fake(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend):
    _check_layer(x, w_hh)
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    return x.new_empty((steps, batch, hidden)), x.new_empty((batch, hidden)), x.new_empty((batch, hidden))


@torch.library.custom_op("rnnkernels::lstm_layer_backward", mutates_args=())
def lstm_layer_backward(
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`lstm_layer` by recomputation; see the module docstring."""
    _check_layer(x, w_hh)
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    if steps == 0 or batch == 0:
        # Nothing runs: the state gradients pass through (as new tensors, never aliases).
        return (
            x.new_zeros(x.shape), w_ih.new_zeros(w_ih.shape), w_hh.new_zeros(w_hh.shape),
            w_hh.new_zeros(4 * hidden), dh_n.to(h0.dtype, copy=True).contiguous(), dc_n.to(c0.dtype, copy=True).contiguous(),
        )
    plan = _plan(lengths, steps, batch)
    has_bias = b_ih is not None
    with _backend_arrays(x.device) as (xp, to_array, to_tensor):
        arrays = map(to_array, (x, w_ih, w_hh, b_ih, b_hh, h0, c0, dy, dh_n, dc_n))
        xa, w_ih_a, w_hh_a, b_ih_a, b_hh_a, h0_a, c0_a, dy_a, dh_a, dc_a = arrays
        dy_a, dh_a, dc_a = (a.astype(xa.dtype, copy=False) for a in (dy_a, dh_a, dc_a))
        if plan.order is not None:
            order = xp.asarray(plan.order)
            xa, h0_a, c0_a, dy_a, dh_a, dc_a = xa[:, order], h0_a[order], c0_a[order], dy_a[:, order], dh_a[order], dc_a[order]
        _, _, _, tape = run_direction(
            xa, (w_ih_a, w_hh_a, b_ih_a, b_hh_a), h0_a, c0_a, plan, reverse, training=True, backend=backend
        )
        dx, dw_ih, dw_hh, db, dh0, dc0 = backward_direction(
            tape, plan, reverse, xp.ascontiguousarray(dy_a), dh_a, dc_a, input_size, has_bias
        )
        if db is None:
            db = xp.zeros(4 * hidden, xa.dtype)
        if plan.order is not None:
            restore = xp.asarray(plan.restore)
            dx, dh0, dc0 = dx[:, restore], dh0[restore], dc0[restore]
        return tuple(to_tensor(a) for a in (dx, dw_ih, dw_hh, db, dh0, dc0))


@lstm_layer_backward.register_fake
def _lstm_layer_backward_fake(dy, dh_n, dc_n, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend):
    _check_layer(x, w_hh)
    return (
        x.new_empty(x.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
        w_hh.new_empty((4 * w_hh.shape[1],)), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
    )


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_TORCH_DTYPES = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}


def _impl(backend: str, device: torch.device):
    """The ``Backend`` that ``backend`` names for tensors on ``device``."""
    from .._api import _resolve_backend

    return _resolve_backend(backend, "cuda" if device.type == "cuda" else "cpu")


_SAVES_ARRAYS: dict = {}  # (backend name, device type) -> whether its state travels as arrays


def _saves_arrays(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` on ``device`` describes its saved state as arrays. Cached:
    torch.compile cannot trace the backend registry's imports, so a graph being
    compiled reads the cache only (an entry not yet there: the recompute path)."""
    key = (backend, device.type)
    if key not in _SAVES_ARRAYS:
        if torch.compiler.is_compiling():
            return False
        _SAVES_ARRAYS[key] = _impl(backend, device).saved_arrays is not None
    return _SAVES_ARRAYS[key]


def _empty_saved(impl, x: Tensor, hidden: int) -> list[Tensor]:
    steps, batch, input_size = x.shape
    layout = impl.saved_arrays.layout(steps, batch, input_size, hidden, _NUMPY_DTYPES[x.dtype])
    return [x.new_zeros(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)]) for shape, dtype in layout]


@torch.library.custom_op("rnnkernels::lstm_layer_train", mutates_args=())
def lstm_layer_train(
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    reverse: bool,
    backend: str,
) -> list[Tensor]:
    """:func:`lstm_layer` (no lengths) with the training forward: ``[y, h_n, c_n,
    *saved]``, ``saved`` the backend's state for backward as its ``SavedArrays``
    list (time in the order the kernels ran: reversed for ``reverse``)."""
    _check_layer(x, w_hh)
    steps, batch = x.shape[0], x.shape[1]
    impl = _impl(backend, x.device)
    if steps == 0 or batch == 0:
        # Nothing runs (the API's own empty case); the saved arrays are never read.
        y = x.new_zeros((steps, batch, w_hh.shape[1]))
        return [y, h0.clone(), c0.clone(), *_empty_saved(impl, x, w_hh.shape[1])]
    plan = _Plan(None, steps, batch)
    with _backend_arrays(x.device) as (_, to_array, to_tensor):
        xa, w_ih_a, w_hh_a, b_ih_a, b_hh_a, h0_a, c0_a = map(to_array, (x, w_ih, w_hh, b_ih, b_hh, h0, c0))
        y, h_n, c_n, tape = run_direction(
            xa, (w_ih_a, w_hh_a, b_ih_a, b_hh_a), h0_a, c0_a, plan, reverse, training=True, backend=backend
        )
        saved = impl.saved_arrays.to_arrays(tape[0]._ctx.saved)
        return [to_tensor(y), to_tensor(h_n), to_tensor(c_n), *(to_tensor(a) for a in saved)]


@lstm_layer_train.register_fake
def _lstm_layer_train_fake(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, backend):
    _check_layer(x, w_hh)
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    layout = _impl(backend, x.device).saved_arrays.layout(steps, batch, x.shape[2], hidden, _NUMPY_DTYPES[x.dtype])
    saved = [x.new_empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)]) for shape, dtype in layout]
    return [x.new_empty((steps, batch, hidden)), x.new_empty((batch, hidden)), x.new_empty((batch, hidden)), *saved]


@torch.library.custom_op("rnnkernels::lstm_layer_backward_saved", mutates_args=())
def lstm_layer_backward_saved(
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    has_bias: bool,
    saved: list[Tensor],
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`lstm_layer_train` from its ``saved`` list: no forward
    runs. Returns what :func:`lstm_layer_backward` returns."""
    _check_layer(x, w_hh)
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    if steps == 0 or batch == 0:
        return (
            x.new_zeros(x.shape), w_ih.new_zeros(w_ih.shape), w_hh.new_zeros(w_hh.shape),
            w_hh.new_zeros(4 * hidden), dh_n.to(x.dtype, copy=True).contiguous(), dc_n.to(x.dtype, copy=True).contiguous(),
        )
    from .._api import LSTMOutput, _Context

    impl = _impl(backend, x.device)
    plan = _Plan(None, steps, batch)
    with _backend_arrays(x.device) as (xp, to_array, to_tensor):
        xa, w_ih_a, w_hh_a, dy_a, dh_a, dc_a = map(to_array, (x, w_ih, w_hh, dy, dh_n, dc_n))
        dy_a, dh_a, dc_a = (a.astype(xa.dtype, copy=False) for a in (dy_a, dh_a, dc_a))
        if reverse:
            xa = plan.flip(xa)  # the kernels saw (and saved for) the flipped sequence
        state = impl.saved_arrays.from_arrays(xa, w_ih_a, w_hh_a, has_bias, [to_array(t) for t in saved])
        # What lstm_forward(training=True) would have returned, rebuilt around the
        # saved state, so that backward_direction (lstm_backward) runs as usual.
        context = _Context(
            impl, state, _arrays.array_kind(xa, "x"), xa.dtype, False, (steps, batch, input_size, hidden), has_bias,
            _arrays.cuda_placement(x),
        )
        out = LSTMOutput(y=None, h_n=None, c_n=None, training=True, backend=impl.name, _ctx=context)
        dx, dw_ih, dw_hh, db, dh0, dc0 = backward_direction(
            [out], plan, reverse, xp.ascontiguousarray(dy_a), dh_a, dc_a, input_size, has_bias
        )
        if db is None:
            db = xp.zeros(4 * hidden, xa.dtype)
        return tuple(to_tensor(a) for a in (dx, dw_ih, dw_hh, db, dh0, dc0))


@lstm_layer_backward_saved.register_fake
def _lstm_layer_backward_saved_fake(dy, dh_n, dc_n, x, w_ih, w_hh, has_bias, saved, reverse, backend):
    _check_layer(x, w_hh)
    batch, hidden = x.shape[1], w_hh.shape[1]
    return (
        x.new_empty(x.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
        w_hh.new_empty((4 * hidden,)), x.new_empty((batch, hidden)), x.new_empty((batch, hidden)),
    )


def _setup_context(ctx, inputs, output):
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend = inputs[:10]
    # output[3:]: the backend's saved arrays (lstm_layer_train), empty for lstm_layer.
    saved = tuple(output[3:])
    ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, *saved)
    ctx.reverse, ctx.backend, ctx.saved_count = reverse, backend, len(saved)
    if saved:
        ctx.mark_non_differentiable(*saved)


def _backward(ctx, dy, dh_n, dc_n):
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, *saved = ctx.saved_tensors
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    dy = x.new_zeros((steps, batch, hidden)) if dy is None else dy
    dh_n = h0.new_zeros(h0.shape) if dh_n is None else dh_n
    dc_n = c0.new_zeros(c0.shape) if dc_n is None else dc_n
    if saved:
        dx, dw_ih, dw_hh, db, dh0, dc0 = lstm_layer_backward_saved(
            dy, dh_n, dc_n, x, w_ih, w_hh, b_ih is not None, saved, ctx.reverse, ctx.backend
        )
        dh0, dc0 = dh0.to(h0.dtype), dc0.to(c0.dtype)
    else:
        dx, dw_ih, dw_hh, db, dh0, dc0 = lstm_layer_backward(
            dy, dh_n, dc_n, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, ctx.reverse, ctx.backend
        )
    db_ih = db if b_ih is not None else None
    db_hh = db.clone() if b_hh is not None else None
    return dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0, None, None, None


lstm_layer.register_autograd(_backward, setup_context=_setup_context)


class _LSTMLayerFunction(torch.autograd.Function):
    """``lstm_layer`` with the same backward, as an ``autograd.Function`` with its own
    ``setup_context``, so that torch.func transforms (grad, vjp, jacrev, vmap) work.

    torch (2.13) builds the autograd of a ``custom_op`` as an ``autograd.Function``
    without ``setup_context``, which functorch refuses ("must override the
    setup_context staticmethod"); this class is that Function written out. Eager
    autograd and ``torch.compile`` go through it too (dynamo traces it, the op inside
    stays opaque behind its fake)."""

    # vmap runs forward and backward under vmap; the two ops' batching rules (below)
    # loop over the mapped dimension.
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend, save):
        # Under torch.func the inputs here may still require grad at an outer level;
        # no_grad keeps the op's own (functorch-incompatible) autograd out of it.
        # ``save``: run the training forward and return its saved arrays after
        # (y, h_n, c_n); setup_context keeps them for backward.
        with torch.no_grad():
            if save:
                return tuple(lstm_layer_train(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, backend))
            return lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, *_saved_grads):
        # _saved_grads: the saved arrays' (non-differentiable: always None or zeros).
        # The backward op has no autograd of its own: no double backward. Where one is
        # asked for, say so rather than let the gradients act as constants (a gradient
        # penalty would silently miss the LSTM's second-order terms). torch.compile
        # traces this backward and cannot trace those checks: it gets the plain one.
        if torch.compiler.is_compiling():
            return _backward(ctx, dy, dh_n, dc_n) + (None,)
        nested = _grad_transforms_active()
        if nested > 1:
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        with torch.no_grad():
            grads = _backward(ctx, dy, dh_n, dc_n) + (None,)
        if nested or not torch.is_grad_enabled():
            return grads
        return _flag_no_double_backward(grads, (*ctx.saved_tensors, dy, dh_n, dc_n))


def _flag_no_double_backward(grads, sources):
    """``grads`` as a backward returns them, made to raise _NO_DOUBLE_BACKWARD when
    differentiated, where any of ``sources`` (the saved inputs and the incoming
    gradients) requires grad: what torch.autograd.function.once_differentiable does,
    but also when only the saved inputs (not the incoming gradients) require grad, and
    with the error node's edges leading to those inputs (passed as extra inputs, their
    outputs dropped), so that autograd.grad(..., inputs) reaches it and raises instead
    of finding the inputs unused (None with allow_unused=True)."""
    anchors = [t for t in sources if t is not None and t.requires_grad]
    if not anchors or _transforms_active():
        # under a torch.func transform (vmap over a vjp: jacrev) requires_grad_ is
        # refused; grad-of-grad there is caught by _grad_transforms_active instead
        return grads
    present = [g for g in grads if g is not None]
    error = torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD, len(present) + len(anchors))
    flagged = iter(error(*[g.detach().requires_grad_() for g in present], *anchors)[: len(present)])
    return tuple(None if g is None else next(flagged) for g in grads)


_NO_DOUBLE_BACKWARD = (
    "rnnkernels' LSTM has no double backward (a gradient of its gradients: "
    "create_graph=True, or torch.func.grad nested in torch.func.grad)"
)


def _transforms_active() -> bool:
    """Whether any torch.func transform (grad, vjp, vmap, jvp) is running."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return bool(retrieve_all_functorch_interpreters())


def _grad_transforms_active() -> int:
    """How many torch.func grad/vjp transforms are running (0 outside torch.func).
    Read from functorch's interpreter stack: torch has no public call for it."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    grad = torch._C._functorch.TransformType.Grad
    return sum(1 for interpreter in retrieve_all_functorch_interpreters() if interpreter.key() == grad)


def lstm_layer_autograd(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse: bool, backend: str):
    """:func:`lstm_layer` with gradients for autograd and torch.func: what
    ``rnnkernels.torch.LSTM`` and ``rnnkernels.lstm_forward`` (on tensors that require
    grad) call."""
    # Keep the forward's state (no recompute in backward) when a gradient can be asked
    # for, the rows have no lengths, and the backend describes its state as arrays.
    save = (
        lengths is None
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0))
        and _saves_arrays(backend, x.device)
    )
    return _LSTMLayerFunction.apply(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend, save)[:3]


def _looping_vmap(op, outputs: Optional[int]):
    """A batching rule for ``op``: one call per index of the mapped dimension, results
    stacked along dimension 0. The kernels take one batch of sequences per call; a
    vmapped dimension is a batch of such problems with different weights, which no
    kernel here fuses, so a loop is what it costs."""

    def select(a, d, index):
        if isinstance(a, (list, tuple)):  # a list argument has a list of dims
            return [t if e is None else t.select(e, index) for t, e in zip(a, d or [None] * len(a))]
        return a if d is None else a.select(d, index)

    def rule(info, in_dims, *args):
        results = []
        for index in range(info.batch_size):
            results.append(op(*[select(a, d, index) for a, d in zip(args, in_dims)]))
        count = outputs if outputs is not None else len(results[0])
        stacked = [torch.stack([r[k] for r in results]) for k in range(count)]
        if outputs is None:  # an op returning a list
            return stacked, [0] * count
        return tuple(stacked), (0,) * count

    return rule


torch.library.register_vmap(lstm_layer, _looping_vmap(lstm_layer, 3))
torch.library.register_vmap(lstm_layer_backward, _looping_vmap(lstm_layer_backward, 6))
torch.library.register_vmap(lstm_layer_train, _looping_vmap(lstm_layer_train, None))
torch.library.register_vmap(lstm_layer_backward_saved, _looping_vmap(lstm_layer_backward_saved, 6))


# ----------------------------------------------------------------------------- proj_size
#
# LSTM with a projection (rnnkernels.reference's forward_projected, called through
# rnnkernels.modules' projected_forward/projected_backward, which the NumPy LSTM
# shares): CPU tensors only, on NumPy, in float64 for backend "reference" and in the
# input dtype for "cpu" and "auto". The tuned cpu cells and the CUDA kernels read an unprojected h and do not
# support it yet; other backends and CUDA tensors get a NotImplementedError. Rows with
# lengths are not supported either. The op returns its saved state (gates, h, c) so
# that backward never recomputes.

_PROJECTED_BACKENDS = PROJECTED_BACKENDS


def _check_projected(backend: str, device: torch.device):
    if device.type != "cpu" or backend not in _PROJECTED_BACKENDS:
        raise NotImplementedError(
            f"proj_size > 0 runs on CPU tensors with backend 'auto', 'cpu' or 'reference' (NumPy); "
            f"backend {backend!r} on {device.type} tensors does not support it yet"
        )


def _projected_dtype(backend: str, dtype: torch.dtype):
    return projected_dtype(backend, _NUMPY_DTYPES[dtype])


@torch.library.custom_op("rnnkernels::lstm_layer_projected", mutates_args=())
def lstm_layer_projected(
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    w_hr: Tensor,
    h0: Tensor,
    c0: Tensor,
    reverse: bool,
    backend: str,
) -> list[Tensor]:
    """One layer, one direction, with a projection: ``[y [T, B, P], h_n [B, P], c_n
    [B, H], gates [T, B, 4H], h [T+1, B, P], c [T+1, B, H]]``; the last three (in the
    compute dtype, time in the order the steps ran) are the saved state."""
    _check_projected(backend, x.device)
    _check_layer(x, w_hh)
    numpy = lambda t: None if t is None else t.detach().numpy()
    y, h_n, c_n, saved = projected_forward(
        x.detach().numpy(), *map(numpy, (w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0)), reverse, backend
    )
    out = [np.ascontiguousarray(a, dtype=_NUMPY_DTYPES[x.dtype]) for a in (y, h_n, c_n)]
    return [torch.from_numpy(a.copy()) for a in out] + [torch.from_numpy(a) for a in (saved.gates, saved.h, saved.c)]


@lstm_layer_projected.register_fake
def _lstm_layer_projected_fake(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, backend):
    steps, batch = x.shape[0], x.shape[1]
    proj, hidden = w_hr.shape
    saved_dtype = _TORCH_DTYPES[_projected_dtype(backend, x.dtype)]
    return [
        x.new_empty((steps, batch, proj)), x.new_empty((batch, proj)), x.new_empty((batch, hidden)),
        x.new_empty((steps, batch, 4 * hidden), dtype=saved_dtype),
        x.new_empty((steps + 1, batch, proj), dtype=saved_dtype),
        x.new_empty((steps + 1, batch, hidden), dtype=saved_dtype),
    ]


@torch.library.custom_op("rnnkernels::lstm_layer_projected_backward", mutates_args=())
def lstm_layer_projected_backward(
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Tensor,
    has_bias: bool,
    saved: list[Tensor],
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`lstm_layer_projected` from its saved state: ``(dx, dw_ih,
    dw_hh, db, dw_hr, dh0, dc0)``, ``db`` [4H] (zeros without biases)."""
    from .. import reference

    dtype = _projected_dtype(backend, x.dtype)
    xa = x.detach().numpy()
    if reverse:
        xa = xa[::-1]
    cast = lambda t: np.ascontiguousarray(t.detach().numpy(), dtype=dtype)
    state = reference.SavedProjected(
        np.ascontiguousarray(xa, dtype=dtype), cast(w_ih), cast(w_hh), cast(w_hr), has_bias, *(cast(t) for t in saved)
    )
    dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0 = projected_backward(
        state, dy.detach().numpy(), dh_n.detach().numpy(), dc_n.detach().numpy(), reverse
    )
    if db is None:
        db = np.zeros(w_ih.shape[0], dtype)
    out_dtype = _NUMPY_DTYPES[x.dtype]
    return tuple(torch.from_numpy(np.array(a, dtype=out_dtype, order="C")) for a in (dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0))


@lstm_layer_projected_backward.register_fake
def _lstm_layer_projected_backward_fake(dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, has_bias, saved, reverse, backend):
    batch = x.shape[1]
    proj, hidden = w_hr.shape
    return (
        x.new_empty(x.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape), w_ih.new_empty((4 * hidden,)),
        w_hr.new_empty(w_hr.shape), x.new_empty((batch, proj)), x.new_empty((batch, hidden)),
    )


class _ProjectedFunction(torch.autograd.Function):
    """:func:`lstm_layer_projected` with autograd (and ``setup_context``, for
    torch.func's grad and vjp; no vmap rule). No double backward."""

    @staticmethod
    def forward(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, backend):
        with torch.no_grad():
            return tuple(lstm_layer_projected(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w_ih, w_hh, b_ih, _, w_hr, h0, c0, reverse, backend = inputs
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, h0, c0, *output[3:])
        ctx.has_bias, ctx.reverse, ctx.backend = b_ih is not None, reverse, backend
        ctx.mark_non_differentiable(*output[3:])

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, *_saved_grads):
        # No double backward: as _LSTMLayerFunction.backward says so.
        if torch.compiler.is_compiling():
            return _ProjectedFunction._grads(ctx, dy, dh_n, dc_n)
        if _grad_transforms_active() > 1:
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        with torch.no_grad():
            grads = _ProjectedFunction._grads(ctx, dy, dh_n, dc_n)
        if _grad_transforms_active() or not torch.is_grad_enabled():
            return grads
        return _flag_no_double_backward(grads, (*ctx.saved_tensors, dy, dh_n, dc_n))

    @staticmethod
    def _grads(ctx, dy, dh_n, dc_n):
        x, w_ih, w_hh, w_hr, h0, c0, *saved = ctx.saved_tensors
        dy = x.new_zeros((x.shape[0], x.shape[1], w_hr.shape[0])) if dy is None else dy
        dh_n = h0.new_zeros(h0.shape) if dh_n is None else dh_n
        dc_n = c0.new_zeros(c0.shape) if dc_n is None else dc_n
        dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0 = lstm_layer_projected_backward(
            dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, ctx.has_bias, saved, ctx.reverse, ctx.backend
        )
        db_ih, db_hh = (db, db.clone()) if ctx.has_bias else (None, None)
        return dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dh0.to(h0.dtype), dc0.to(c0.dtype), None, None


def lstm_layer_projected_autograd(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse: bool, backend: str):
    """:func:`lstm_layer_projected` with gradients: ``(y, h_n, c_n)``."""
    _check_projected(backend, x.device)
    return _ProjectedFunction.apply(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, backend)[:3]
