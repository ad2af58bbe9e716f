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

Backward (registered with ``register_autograd``) recomputes. An op can only return
tensors, and our forward's saved state is a backend object, so the forward op runs
the inference kernels (``training=False``, nothing kept) and saves only its inputs;
``lstm_layer_backward`` runs the training forward again, then BPTT. The cost is one
extra (inference) forward per layer and direction in a training step: measured on
the cpu backend at T=50, B=32, I=H=128, float32, one thread, a module forward +
backward takes 64 ms against 43 ms for ``lstm_forward(training=True)`` +
``lstm_backward`` (+50%). The saving is memory: no gates or states are held between
forward and backward, only the layer inputs, which autograd keeps anyway. Returning
the workspace instead would need each backend to describe its saved arrays (shapes
for the fake kernel), a change to the backend contract.

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
from ..modules import _Plan, backward_direction, run_direction

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


def _setup_context(ctx, inputs, output):
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend = inputs
    ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)
    ctx.reverse, ctx.backend = reverse, backend


def _backward(ctx, dy, dh_n, dc_n):
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths = ctx.saved_tensors
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    dy = x.new_zeros((steps, batch, hidden)) if dy is None else dy
    dh_n = h0.new_zeros(h0.shape) if dh_n is None else dh_n
    dc_n = c0.new_zeros(c0.shape) if dc_n is None else dc_n
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
    def forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend):
        # Under torch.func the inputs here may still require grad at an outer level;
        # no_grad keeps the op's own (functorch-incompatible) autograd out of it.
        with torch.no_grad():
            return lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        # The backward op has no autograd of its own: no double backward. Where one is
        # asked for, say so rather than let the gradients act as constants (a gradient
        # penalty would silently miss the LSTM's second-order terms). torch.compile
        # traces this backward and cannot trace those checks: it gets the plain one.
        if torch.compiler.is_compiling():
            return _backward(ctx, dy, dh_n, dc_n)
        nested = _grad_transforms_active()
        if nested > 1:
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        with torch.no_grad():
            grads = _backward(ctx, dy, dh_n, dc_n)
        if nested or not torch.is_grad_enabled():
            return grads
        if not any(t is not None and t.requires_grad for t in (*ctx.saved_tensors, dy, dh_n, dc_n)):
            return grads
        # create_graph=True: what torch.autograd.function.once_differentiable does, but
        # also when only the saved inputs (not the incoming gradients) require grad.
        present = [g for g in grads if g is not None]
        error = torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD, len(present))
        flagged = iter(error(*[g.detach().requires_grad_() for g in present]))
        return tuple(None if g is None else next(flagged) for g in grads)


_NO_DOUBLE_BACKWARD = (
    "rnnkernels' LSTM has no double backward (a gradient of its gradients: "
    "create_graph=True, or torch.func.grad nested in torch.func.grad)"
)


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
    return _LSTMLayerFunction.apply(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, backend)


def _looping_vmap(op, outputs: int):
    """A batching rule for ``op``: one call per index of the mapped dimension, results
    stacked along dimension 0. The kernels take one batch of sequences per call; a
    vmapped dimension is a batch of such problems with different weights, which no
    kernel here fuses, so a loop is what it costs."""

    def rule(info, in_dims, *args):
        results = []
        for index in range(info.batch_size):
            sliced = [a if d is None else a.select(d, index) for a, d in zip(args, in_dims)]
            results.append(op(*sliced))
        stacked = tuple(torch.stack([r[k] for r in results]) for k in range(outputs))
        return stacked, (0,) * outputs

    return rule


torch.library.register_vmap(lstm_layer, _looping_vmap(lstm_layer, 3))
torch.library.register_vmap(lstm_layer_backward, _looping_vmap(lstm_layer_backward, 6))
