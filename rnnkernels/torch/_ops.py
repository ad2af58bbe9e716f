"""The custom ops behind ``rnnkernels.torch``'s LSTM, GRU and RNN: one family per cell,
all made by one function (:func:`_register`) from the cell's description
(``rnnkernels/cells.py``: gate count G, states). For a cell ``<c>`` ("lstm", "gru",
"rnn_tanh", "rnn_relu") and its states S (LSTM h, c; the others h):

``rnnkernels::<c>_layer(x, w_ih, w_hh, b_ih, b_hh, *S0, lengths, reverse, backend)
-> (y, *S_n)`` is one layer in one direction::

    x        [T, B, I]   time-major
    w_ih     [G*H, I], w_hh [G*H, H], b_ih and b_hh [G*H] or both None
    S0       each [B, H] (LSTM: h0, c0; GRU, RNN: h0)
    lengths  [B] int64 or None (every row T steps); rows stop at their own length:
             y is zero past it, the states are taken at its last step
    reverse  False: steps 0 .. n-1; True: n-1 .. 0 within each row's own length
    backend  a backend name ("auto": cuda for CUDA tensors)
    y [T, B, H], each state [B, H]

so ``rnnkernels::lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse,
backend) -> (y, h_n, c_n)`` and ``rnnkernels::gru_layer(x, w_ih, w_hh, b_ih, b_hh, h0,
lengths, reverse, backend) -> (y, h_n)``. The schemas are written out per cell (not one
op taking a list of states) so that each op's arguments are its cell's, as a user of
the op reads them. Rows sorted longest first run fastest (no permutation inside the
op); the modules sort once per call.

Backward keeps the forward's saved state where it can. ``<c>_layer_train`` (same
arguments) runs the training forward and returns ``[y, *S_n, *saved]``: ``saved`` is
the backend's state for backward as the fixed list of arrays its ``SavedArrays``
describes (rnnkernels/_backend.py), as tensors, which autograd keeps;
``<c>_layer_backward_saved`` rebuilds the backend's state from them and the forward's
inputs and runs BPTT only. With ``lengths`` the batch runs as segments of rows
(modules._Plan); each array then holds every segment's part laid side by side at its
own steps and rows, so its shape does not depend on the lengths (what torch.compile's
fake tensors need) and backward rebuilds each segment's state from it
(``_pack_segments``, ``_segment_tape``). The autograd Function uses that pair when a
gradient is wanted and the backend describes its state.

Otherwise (a backend without ``SavedArrays``, or a graph compiled before the backend
was first used eagerly: see ``_saves_arrays``) the forward runs the inference kernels
(``training=False``, nothing kept), only the inputs are saved, and
``<c>_layer_backward`` runs the training forward again, then BPTT: one extra
(inference) forward per layer and direction (+50% for forward + backward at T=50,
B=32, I=H=128 on the LSTM's cpu backend, measured before the saved path).

``<c>_layer_backward(dy, *dS_n, <the forward's inputs>) -> (dx, dw_ih, dw_hh, db_ih,
db_hh, *dS0)``; ``db_ih`` and ``db_hh`` [G*H] are the gradients of the two biases
(zeros without biases; they differ for the GRU, whose b_hn sits inside r ⊙ (W_hn h +
b_hn)). No op has autograd of its own: double backward is not supported (an error
says so).

``cell_layer_autograd(cell_name, x, w_ih, w_hh, b_ih, b_hh, state0, lengths, reverse,
backend) -> (y, *state_n)`` is what callers use (``rnnkernels.torch``'s modules, and
the API for tensors that require grad; ``lstm_layer_autograd`` is its LSTM form): the
ops wrapped in an ``autograd.Function`` with ``setup_context``, which torch.func
(grad, vjp, vmap) needs and an op's own autograd registration lacks; every op has a
batching rule (a loop) for vmap.

CUDA tensors cross into CuPy by DLPack, zero-copy, and the kernels run on torch's
current stream of the tensors' device.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers

from .. import _arrays
from .. import cells
from ..modules import (
    PROJECTED_BACKENDS,
    projected_saved,
    projected_saved_arrays,
    projected_supported,
    _Plan,
    backward_direction,
    projected_backward,
    projected_backward_direction,
    projected_direction,
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


def _check_layer(cell, x: Tensor, w_hh: Tensor):
    if x.dtype not in (torch.float16, torch.float32, torch.float64):
        # before .numpy() / DLPack, whose message for bfloat16 names no argument
        raise TypeError(f"x must hold float16, float32 or float64 numbers, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D [T, B, I] (time-major), got shape {tuple(x.shape)}")
    if w_hh.dim() != 2:
        rows = "H" if cell.gates == 1 else f"{cell.gates}H"
        raise ValueError(f"w_hh must be 2-D [{rows}, H], got shape {tuple(w_hh.shape)}")


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_TORCH_DTYPES = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}


def _impl(cell, backend: str, device: torch.device):
    """The ``Backend`` that ``backend`` names for ``cell`` and tensors on ``device``."""
    from .._api import _resolve_backend

    return _resolve_backend(backend, "cuda" if device.type == "cuda" else "cpu", cell)


_SAVES_ARRAYS: dict = {}  # (backend name, device type[, cell]) -> whether its state travels as arrays


def _saves_arrays(cell, backend: str, device: torch.device) -> bool:
    """Whether ``backend`` on ``device`` describes ``cell``'s saved state as arrays.
    Cached: torch.compile cannot trace the backend registry's imports, so a graph
    being compiled reads the cache only (an entry not yet there: the recompute path).
    The LSTM's key has no cell, as before the other cells."""
    key = (backend, device.type) if cell.name == "lstm" else (backend, device.type, cell.name)
    if key not in _SAVES_ARRAYS:
        if torch.compiler.is_compiling():
            return False
        _SAVES_ARRAYS[key] = _impl(cell, backend, device).saved_arrays is not None
    return _SAVES_ARRAYS[key]


def _saved_layout(impl, x: Tensor, hidden: int):
    steps, batch, input_size = x.shape
    return [
        (shape, _TORCH_DTYPES[np.dtype(dtype)])
        for shape, dtype in impl.saved_arrays.layout(steps, batch, input_size, hidden, _NUMPY_DTYPES[x.dtype])
    ]


# ----------------------------------------------------------------------------- the ops, for any cell


def _layer(cell, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend):
    """``<c>_layer``: ``(y, *states_n)``."""
    _check_layer(cell, x, w_hh)
    steps, batch = x.shape[0], x.shape[1]
    plan = _plan(lengths, steps, batch)
    with _backend_arrays(x.device) as (xp, to_array, to_tensor):
        xa, w_ih_a, w_hh_a, b_ih_a, b_hh_a = map(to_array, (x, w_ih, w_hh, b_ih, b_hh))
        states0_a = [to_array(s) for s in states0]
        if plan.order is not None:
            order = xp.asarray(plan.order)
            xa, states0_a = xa[:, order], [s[order] for s in states0_a]
        y, states_n, _ = run_direction(
            cell, xa, (w_ih_a, w_hh_a, b_ih_a, b_hh_a), states0_a, plan, reverse, training=False, backend=backend
        )
        if plan.order is not None:
            restore = xp.asarray(plan.restore)
            y, states_n = y[:, restore], [s[restore] for s in states_n]
        return (to_tensor(y), *(to_tensor(s) for s in states_n))


def _layer_fake(cell, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend):
    _check_layer(cell, x, w_hh)
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    return (x.new_empty((steps, batch, hidden)), *(x.new_empty((batch, hidden)) for _ in states0))


def _zero_grads(x, w_ih, w_hh, dstates_n, states0):
    """The gradients when nothing runs (T == 0 or B == 0): the state gradients pass
    through (as new tensors, never aliases)."""
    return (
        x.new_zeros(x.shape), w_ih.new_zeros(w_ih.shape), w_hh.new_zeros(w_hh.shape),
        w_hh.new_zeros(w_hh.shape[0]), w_hh.new_zeros(w_hh.shape[0]),
        *(d.to(s.dtype, copy=True).contiguous() for d, s in zip(dstates_n, states0)),
    )


def _grads_fake(x, w_ih, w_hh, states0):
    rows = w_hh.shape[0]
    return (
        x.new_empty(x.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
        w_hh.new_empty((rows,)), w_hh.new_empty((rows,)), *(s.new_empty(s.shape) for s in states0),
    )


def _layer_backward(cell, dy, dstates_n, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend):
    """``<c>_layer_backward``, by recomputation: ``(dx, dw_ih, dw_hh, db_ih, db_hh, *dstates0)``."""
    _check_layer(cell, x, w_hh)
    steps, batch, input_size = x.shape
    if steps == 0 or batch == 0:
        return _zero_grads(x, w_ih, w_hh, dstates_n, states0)
    plan = _plan(lengths, steps, batch)
    has_bias = b_ih is not None
    with _backend_arrays(x.device) as (xp, to_array, to_tensor):
        xa, w_ih_a, w_hh_a, b_ih_a, b_hh_a, dy_a = map(to_array, (x, w_ih, w_hh, b_ih, b_hh, dy))
        states0_a = [to_array(s) for s in states0]
        dy_a = dy_a.astype(xa.dtype, copy=False)
        dstates_a = [to_array(d).astype(xa.dtype, copy=False) for d in dstates_n]
        if plan.order is not None:
            order = xp.asarray(plan.order)
            xa, dy_a = xa[:, order], dy_a[:, order]
            states0_a, dstates_a = [s[order] for s in states0_a], [d[order] for d in dstates_a]
        _, _, tape = run_direction(
            cell, xa, (w_ih_a, w_hh_a, b_ih_a, b_hh_a), states0_a, plan, reverse, training=True, backend=backend
        )
        return _backward_in_user_order(
            cell, tape, plan, reverse, dy_a, dstates_a, input_size, has_bias, w_hh.shape[0], xa.dtype, xp, to_tensor
        )


def _backward_in_user_order(cell, tape, plan, reverse, dy_a, dstates_a, input_size, has_bias, gate_rows, dtype,
                            xp, to_tensor):
    """The backward ops' common end: ``backward_direction`` on the tape of rows sorted by
    length, zero bias gradients when the layer has none (the ops return tensors), the rows
    put back in the caller's order, as tensors."""
    dx, dw_ih, dw_hh, db_ih, db_hh, dstates0 = backward_direction(
        cell, tape, plan, reverse, xp.ascontiguousarray(dy_a), dstates_a, input_size, has_bias
    )
    if not has_bias:
        db_ih = db_hh = xp.zeros(gate_rows, dtype)
    if plan.order is not None:
        restore = xp.asarray(plan.restore)
        dx, dstates0 = dx[:, restore], [d[restore] for d in dstates0]
    return tuple(to_tensor(a) for a in (dx, dw_ih, dw_hh, db_ih, db_hh, *dstates0))


def _layer_backward_fake(cell, dy, dstates_n, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend):
    _check_layer(cell, x, w_hh)
    return _grads_fake(x, w_ih, w_hh, states0)


def _layer_train(cell, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend):
    """``<c>_layer_train``: ``[y, *states_n, *saved]``, ``saved`` the backend's state
    for backward as its ``SavedArrays`` list, in the order the kernels saw the rows and
    steps: rows sorted longest first (the plan's order), time reversed within each row's
    length for ``reverse``. With ``lengths`` the plan's segments are laid side by side
    in each array (:func:`_pack_segments`)."""
    _check_layer(cell, x, w_hh)
    steps, batch = x.shape[0], x.shape[1]
    impl = _impl(cell, backend, x.device)
    layout = _saved_layout(impl, x, w_hh.shape[1])
    if steps == 0 or batch == 0:
        # Nothing runs (the API's own empty case); the saved arrays are never read.
        y = x.new_zeros((steps, batch, w_hh.shape[1]))
        saved = [x.new_zeros(shape, dtype=dtype) for shape, dtype in layout]
        return [y, *(s.clone() for s in states0), *saved]
    plan = _plan(lengths, steps, batch)
    with _backend_arrays(x.device) as (xp, to_array, to_tensor):
        xa, w_ih_a, w_hh_a, b_ih_a, b_hh_a = map(to_array, (x, w_ih, w_hh, b_ih, b_hh))
        states0_a = [to_array(s) for s in states0]
        if plan.order is not None:
            order = xp.asarray(plan.order)
            xa, states0_a = xa[:, order], [s[order] for s in states0_a]
        y, states_n, tape = run_direction(
            cell, xa, (w_ih_a, w_hh_a, b_ih_a, b_hh_a), states0_a, plan, reverse, training=True, backend=backend,
        )
        if plan.order is not None:
            restore = xp.asarray(plan.restore)
            y, states_n = y[:, restore], [s[restore] for s in states_n]
        if plan.uniform:
            saved = impl.saved_arrays.to_arrays(_backend_saved(tape[0]))
        else:
            numpy_layout = impl.saved_arrays.layout(steps, batch, x.shape[2], w_hh.shape[1], _NUMPY_DTYPES[x.dtype])
            saved = _pack_segments(impl, plan, tape, numpy_layout, xp)
        return [to_tensor(y), *(to_tensor(s) for s in states_n), *(to_tensor(a) for a in saved)]


def _pack_segments(impl, plan, tape, layout, xp):
    """:func:`_pack_arrays` of the API's per-segment outputs in ``tape``."""
    return _pack_arrays(plan, [impl.saved_arrays.to_arrays(_backend_saved(out)) for out in tape], layout, xp)


def _pack_arrays(plan, per_segment, layout, xp):
    """The saved arrays of a batch with per-row lengths, one array per entry of
    ``layout`` ([T + k, B, ...]): segment (start, stop, rows) of the plan writes its own
    array [stop - start + k, rows, ...] at [start : stop + k, :rows], so index k + t is
    step t. Neighbouring segments overlap in k entries: the first k of segment s + 1
    (the state it started from) fall on the last k of segment s (the state it ended
    with). The segments are written last first, so the overlap holds segment s's
    exact end state; :func:`_segment_tape` derives segment s + 1's start from it.
    Entries that no segment writes (past a row's length) are zero."""
    packed = [xp.zeros(shape, dtype) for shape, dtype in layout]
    for (start, stop, rows), arrays in reversed(list(zip(plan.segments, per_segment))):
        for target, array in zip(packed, arrays):
            target[start : stop + target.shape[0] - plan.steps, :rows] = array
    return packed


def _segment_tape(cell, impl, plan, xa, w_ih_a, w_hh_a, has_bias, saved, xp):
    """The inverse of :func:`_pack_segments`: one output of the API's forward per
    segment of ``plan``, as ``run_direction`` makes for its tape, with the backend's
    saved state rebuilt from the packed ``saved`` arrays (``xa`` sorted and, for a
    reverse direction, flipped as the kernels saw it), so that ``backward_direction``
    runs on it exactly as on the forward's own tape.

    A segment's first k entries of an array with k > 0 are the state it started from
    (h, c). The forward carried that state between segments in the input dtype
    (run_direction), while a backend may save it wider (the reference: float64): the
    overlap holds the previous segment's exact end state, so the start state is that
    rounded to the input dtype and widened again, the value the segment really saw."""
    from .. import _api

    input_size, hidden = xa.shape[2], w_hh_a.shape[1]
    kind = _arrays.array_kind(xa, "x")
    tape = []
    for (start, stop, rows), x_seg, parts in _unpack_arrays(plan, xa, saved, xp):
        state = impl.saved_arrays.from_arrays(x_seg, w_ih_a, w_hh_a, has_bias, parts)
        context = _api._Context(
            impl, state, kind, np.dtype(xa.dtype), False, (stop - start, rows, input_size, hidden), has_bias,
            (None, False), cell,  # placement: the caller is inside the tensors' CUDA scope already
        )
        tape.append(_api._make_output(cell, None, (None,) * len(cell.states), True, impl.name, context))
    return tape


def _unpack_arrays(plan, xa, saved, xp):
    """The inverse of :func:`_pack_arrays`, per segment of ``plan``: ``((start, stop,
    rows), x_seg, parts)``, ``parts`` that segment's own saved arrays (see
    :func:`_segment_tape` for the start state's rounding)."""
    for index, (start, stop, rows) in enumerate(plan.segments):
        x_seg = xp.ascontiguousarray(xa[start:stop, :rows])
        parts = []
        for array in saved:
            k = array.shape[0] - plan.steps
            part = array[start : stop + k, :rows].copy()
            if k and index:
                part[:k] = part[:k].astype(xa.dtype).astype(part.dtype)
            parts.append(part)
        yield (start, stop, rows), x_seg, parts


def _backend_saved(out):
    """The backend's own ``saved`` inside an output of the API's forward."""
    return out._ctx.saved


def _layer_train_fake(cell, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend):
    _check_layer(cell, x, w_hh)
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    saved = [x.new_empty(shape, dtype=dtype) for shape, dtype in _saved_layout(_impl(cell, backend, x.device), x, hidden)]
    return [x.new_empty((steps, batch, hidden)), *(x.new_empty((batch, hidden)) for _ in states0), *saved]


def _layer_backward_saved(cell, dy, dstates_n, x, w_ih, w_hh, has_bias, saved, lengths, reverse, backend):
    """``<c>_layer_backward_saved``: the gradients of ``<c>_layer_train`` from its
    ``saved`` list; no forward runs. Returns what ``<c>_layer_backward`` returns."""
    _check_layer(cell, x, w_hh)
    steps, batch = x.shape[0], x.shape[1]
    if steps == 0 or batch == 0:
        return _zero_grads(x, w_ih, w_hh, dstates_n, [x.new_empty(d.shape) for d in dstates_n])
    impl = _impl(cell, backend, x.device)
    plan = _plan(lengths, steps, batch)
    if not plan.uniform:
        return _layer_backward_segments(cell, impl, plan, dy, dstates_n, x, w_ih, w_hh, has_bias, saved, reverse)
    with _backend_arrays(x.device) as (xp, to_array, to_tensor):
        xa, w_ih_a, w_hh_a = map(to_array, (x, w_ih, w_hh))
        if reverse:
            xa = plan.flip(xa)  # the kernels saw (and saved for) the flipped sequence
        state = impl.saved_arrays.from_arrays(xa, w_ih_a, w_hh_a, has_bias, [to_array(t) for t in saved])
        # The backend's backward on the rebuilt state, as the API's backward would call
        # it: upstream gradients time-major, contiguous, in the backend's output dtype
        # (float64 for the reference), the results cast back to the input dtype.
        out_dtype = np.dtype(np.float64) if impl.name == "reference" else xa.dtype
        dy_a = to_array(dy).astype(out_dtype, copy=False)
        if reverse:
            dy_a = plan.flip(dy_a)
        dstates_a = [xp.ascontiguousarray(to_array(d).astype(out_dtype, copy=False)) for d in dstates_n]
        dx, dw_ih, dw_hh, db, *dstates0 = impl.backward(state, xp.ascontiguousarray(dy_a), *dstates_a)
        if reverse:
            dx = plan.flip(dx)
        if has_bias:
            db_ih, db_hh = cell.unfold_grad(db, xp)
        else:
            db_ih = db_hh = xp.zeros(w_hh.shape[0], xa.dtype)
        cast = lambda a: to_tensor(xp.asarray(a).astype(xa.dtype, copy=False))  # noqa: E731
        return tuple(cast(a) for a in (dx, dw_ih, dw_hh, db_ih, db_hh, *dstates0))


def _layer_backward_segments(cell, impl, plan, dy, dstates_n, x, w_ih, w_hh, has_bias, saved, reverse):
    """:func:`_layer_backward_saved` for rows with lengths: the tape rebuilt from the
    packed arrays (:func:`_segment_tape`), then the recompute path's own
    ``backward_direction``, so the gradients are that path's without its forward."""
    input_size = x.shape[2]
    with _backend_arrays(x.device) as (xp, to_array, to_tensor):
        xa, w_ih_a, w_hh_a, dy_a = map(to_array, (x, w_ih, w_hh, dy))
        dy_a = dy_a.astype(xa.dtype, copy=False)
        dstates_a = [to_array(d).astype(xa.dtype, copy=False) for d in dstates_n]
        if plan.order is not None:
            order = xp.asarray(plan.order)
            xa, dy_a, dstates_a = xa[:, order], dy_a[:, order], [d[order] for d in dstates_a]
        if reverse:
            xa = plan.flip(xa)  # the kernels saw (and saved for) the flipped rows
        tape = _segment_tape(cell, impl, plan, xa, w_ih_a, w_hh_a, has_bias, [to_array(t) for t in saved], xp)
        return _backward_in_user_order(
            cell, tape, plan, reverse, dy_a, dstates_a, input_size, has_bias, w_hh.shape[0], xa.dtype, xp, to_tensor
        )


def _layer_backward_saved_fake(cell, dy, dstates_n, x, w_ih, w_hh, has_bias, saved, lengths, reverse, backend):
    _check_layer(cell, x, w_hh)
    batch, hidden = x.shape[1], w_hh.shape[1]
    return _grads_fake(x, w_ih, w_hh, [x.new_empty((batch, hidden)) for _ in dstates_n])


# ----------------------------------------------------------------------------- registration


def _register(cell) -> SimpleNamespace:
    """The four ops of ``cell`` (``<c>_layer``, ``_layer_backward``, ``_layer_train``,
    ``_layer_backward_saved``), their fakes, vmap rules and autograd registration, all
    from the functions above; the schemas name the cell's states."""
    name, states = cell.name, cell.states
    n = len(states)
    s0 = ", ".join(f"Tensor {s}0" for s in states)
    ds = ", ".join(f"Tensor d{s}_n" for s in states)
    inputs = "Tensor x, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh"
    grads_out = "(" + ", ".join(["Tensor"] * (5 + n)) + ")"
    schemas = {
        "layer": f"({inputs}, {s0}, Tensor? lengths, bool reverse, str backend) -> ({', '.join(['Tensor'] * (1 + n))})",
        "backward": f"(Tensor dy, {ds}, {inputs}, {s0}, Tensor? lengths, bool reverse, str backend) -> {grads_out}",
        "train": f"({inputs}, {s0}, Tensor? lengths, bool reverse, str backend) -> Tensor[]",
        "backward_saved": (
            f"(Tensor dy, {ds}, Tensor x, Tensor w_ih, Tensor w_hh, bool has_bias, Tensor[] saved, Tensor? lengths, "
            f"bool reverse, str backend) -> {grads_out}"
        ),
    }

    # Flat op arguments -> the functions' grouped ones (the states as tuples).
    def layer_args(a):
        x, w_ih, w_hh, b_ih, b_hh = a[:5]
        return (cell, x, w_ih, w_hh, b_ih, b_hh, tuple(a[5:5 + n]), *a[5 + n:])

    def backward_args(a):
        return (cell, a[0], tuple(a[1:1 + n]), *layer_args(a[1 + n:])[1:])

    def saved_args(a):
        return (cell, a[0], tuple(a[1:1 + n]), *a[1 + n:])

    def make(kind, function, fake, args, outputs):
        op = torch.library.custom_op(
            f"rnnkernels::{name}_{'layer' if kind == 'layer' else 'layer_' + kind}",
            lambda *a: function(*args(a)), mutates_args=(), schema=schemas[kind],
        )
        op.register_fake(lambda *a: fake(*args(a)))
        torch.library.register_vmap(op, _looping_vmap(op, outputs))
        return op

    ops = SimpleNamespace(
        cell=cell,
        layer=make("layer", _layer, _layer_fake, layer_args, 1 + n),
        backward=make("backward", _layer_backward, _layer_backward_fake, backward_args, 5 + n),
        train=make("train", _layer_train, _layer_train_fake, layer_args, None),
        backward_saved=make("backward_saved", _layer_backward_saved, _layer_backward_saved_fake, saved_args, 5 + n),
    )
    def setup_context(ctx, inputs, output):
        _, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend = layer_args(inputs)
        _setup_context(ctx, name, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend, output)

    def backward(ctx, *upstream):
        dx, dw_ih, dw_hh, db_ih, db_hh, dstates0 = _grads(ctx, upstream)
        return (dx, dw_ih, dw_hh, db_ih, db_hh, *dstates0, None, None, None)

    ops.layer.register_autograd(backward, setup_context=setup_context)
    return ops


def _setup_context(ctx, cell_name, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend, output):
    n = len(states0)
    # output[1 + n:]: the backend's saved arrays (<c>_layer_train), empty for <c>_layer.
    saved = tuple(output[1 + n:])
    ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, lengths, *states0, *saved)
    ctx.cell_name, ctx.states, ctx.reverse, ctx.backend = cell_name, n, reverse, backend
    if saved:
        ctx.mark_non_differentiable(*saved)
    # An output no gradient reaches comes to backward as None (_grads reads None as
    # zero), not as a tensor of zeros autograd would allocate and fill: for the saved
    # arrays (never differentiated) that is several times y's size per call.
    ctx.set_materialize_grads(False)


def _grads(ctx, upstream):
    """``(dx, dw_ih, dw_hh, db_ih, db_hh, dstates0)`` for the op's inputs from the
    upstream gradients of its outputs (``upstream[:1 + n]``: y and the states; None:
    zero)."""
    ops, n = _OPS[ctx.cell_name], ctx.states
    x, w_ih, w_hh, b_ih, b_hh, lengths, *rest = ctx.saved_tensors
    states0, saved = rest[:n], rest[n:]
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    dy = x.new_zeros((steps, batch, hidden)) if upstream[0] is None else upstream[0]
    dstates_n = [s.new_zeros(s.shape) if d is None else d for d, s in zip(upstream[1:1 + n], states0)]
    if saved:
        if _eager():
            dx, dw_ih, dw_hh, db_ih, db_hh, *dstates0 = _layer_backward_saved(
                ops.cell, dy, tuple(dstates_n), x, w_ih, w_hh, b_ih is not None, saved, lengths, ctx.reverse, ctx.backend
            )
        else:
            dx, dw_ih, dw_hh, db_ih, db_hh, *dstates0 = ops.backward_saved(
                dy, *dstates_n, x, w_ih, w_hh, b_ih is not None, saved, lengths, ctx.reverse, ctx.backend
            )
        dstates0 = [d.to(s.dtype) for d, s in zip(dstates0, states0)]
    else:
        dx, dw_ih, dw_hh, db_ih, db_hh, *dstates0 = ops.backward(
            dy, *dstates_n, x, w_ih, w_hh, b_ih, b_hh, *states0, lengths, ctx.reverse, ctx.backend
        )
    return dx, dw_ih, dw_hh, db_ih if b_ih is not None else None, db_hh if b_hh is not None else None, tuple(dstates0)


def _eager() -> bool:
    """Whether this runs eagerly: not traced by torch.compile, under no torch.func
    transform. Then the autograd Function calls the ops' functions directly and is
    applied without ``Function.apply``'s Python layer (:func:`cell_layer_autograd`):
    each of those costs tens of microseconds per call (the dispatcher's Python
    custom-op path; ``inspect.signature`` and ``bind`` of forward's arguments, which
    have no defaults to fill), about 0.3 ms per layer and direction for forward and
    backward together, where nothing traces or transforms the call. Traced or
    transformed calls keep both: the compiler sees the ops behind their fakes, and
    vmap needs their batching rules."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


class _CellLayerFunction(torch.autograd.Function):
    """A cell's ``<c>_layer`` with the same backward, as an ``autograd.Function`` with
    its own ``setup_context``, so that torch.func transforms (grad, vjp, jacrev, vmap)
    work. Arguments: ``(cell_name, lengths, reverse, backend, save, x, w_ih, w_hh,
    b_ih, b_hh, *states0)``.

    torch (2.13) builds the autograd of a ``custom_op`` as an ``autograd.Function``
    without ``setup_context``, which functorch refuses ("must override the
    setup_context staticmethod"); this class is that Function written out. Eager
    autograd and ``torch.compile`` go through it too (dynamo traces it, the op inside
    stays opaque behind its fake)."""

    # vmap runs forward and backward under vmap; the ops' batching rules (below) loop
    # over the mapped dimension.
    generate_vmap_rule = True

    @staticmethod
    def forward(cell_name, lengths, reverse, backend, save, x, w_ih, w_hh, b_ih, b_hh, *states0):
        # Under torch.func the inputs here may still require grad at an outer level;
        # no_grad keeps the op's own (functorch-incompatible) autograd out of it.
        # ``save``: run the training forward and return its saved arrays after
        # (y, *states_n); setup_context keeps them for backward.
        ops = _OPS[cell_name]
        with torch.no_grad():
            if _eager():  # the ops' own functions, without the dispatcher (see _eager)
                function = _layer_train if save else _layer
                return tuple(function(ops.cell, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend))
            if save:
                return tuple(ops.train(x, w_ih, w_hh, b_ih, b_hh, *states0, lengths, reverse, backend))
            return ops.layer(x, w_ih, w_hh, b_ih, b_hh, *states0, lengths, reverse, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        cell_name, lengths, reverse, backend, _, x, w_ih, w_hh, b_ih, b_hh, *states0 = inputs
        _setup_context(ctx, cell_name, x, w_ih, w_hh, b_ih, b_hh, states0, lengths, reverse, backend, output)

    @staticmethod
    def backward(ctx, *upstream):
        # upstream[1 + n:]: the saved arrays' (non-differentiable: always None or zeros).
        # The backward ops have no autograd of their own: no double backward. Where one
        # is asked for, say so rather than let the gradients act as constants (a
        # gradient penalty would silently miss the cell's second-order terms).
        # torch.compile traces this backward and cannot trace those checks: it gets the
        # plain one.
        if torch.compiler.is_compiling():
            return _function_grads(ctx, upstream)
        nested = _grad_transforms_active()
        if nested > 1:
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        with torch.no_grad():
            grads = _function_grads(ctx, upstream)
        if nested or not torch.is_grad_enabled():
            return grads
        return _flag_no_double_backward(grads, (*ctx.saved_tensors, *upstream[:1 + ctx.states]))


def _function_grads(ctx, upstream):
    dx, dw_ih, dw_hh, db_ih, db_hh, dstates0 = _grads(ctx, upstream)
    return (None, None, None, None, None, dx, dw_ih, dw_hh, db_ih, db_hh, *dstates0)


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
    "rnnkernels' recurrent layers (LSTM, GRU, RNN) have no double backward (a gradient of its gradients: "
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


def cell_layer_autograd(cell_name, x, w_ih, w_hh, b_ih, b_hh, state0, lengths, reverse: bool, backend: str):
    """One layer of cell ``cell_name`` in one direction with gradients for autograd and
    torch.func: ``(y, *state_n)``; ``state0`` None or a tuple with one [B, H] tensor
    (or None: zero) per state of the cell. What ``rnnkernels.torch``'s modules and ``rnnkernels``' API (for
    tensors that require grad) call."""
    if cell_name not in _OPS:
        raise ValueError(f"unknown cell {cell_name!r}; expected one of {', '.join(map(repr, _OPS))}")
    count = len(_OPS[cell_name].cell.states)
    state0 = (None,) * count if state0 is None else tuple(state0)
    if len(state0) != count:
        raise ValueError(f"state0 must hold {count} tensor(s) for cell {cell_name!r} ({', '.join(_OPS[cell_name].cell.states)}), got {len(state0)}")
    # A missing state is zero (the ops take tensors).
    state0 = tuple(x.new_zeros((x.shape[1], w_hh.shape[1])) if s is None else s for s in state0)
    # Keep the forward's state (no recompute in backward) when a gradient can be asked
    # for and the backend describes its state as arrays.
    save = (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, w_ih, w_hh, b_ih, b_hh, *state0))
        and _saves_arrays(_OPS[cell_name].cell, backend, x.device)
    )
    args = (cell_name, lengths, reverse, backend, save, x, w_ih, w_hh, b_ih, b_hh, *state0)
    if _eager():
        # What Function.apply does here, less binding default arguments (there are none):
        # dead torch.func wrappers unwrapped, then the C++ apply, which calls
        # setup_context itself.
        out = _APPLY(*_unwrap_dead_wrappers(args))
    else:
        out = _CellLayerFunction.apply(*args)
    return tuple(out[: 1 + len(state0)])


_APPLY = super(torch.autograd.Function, _CellLayerFunction).apply  # torch._C._FunctionBase.apply


def lstm_layer_autograd(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse: bool, backend: str):
    """:func:`cell_layer_autograd` for the LSTM: ``(y, h_n, c_n)``."""
    return cell_layer_autograd("lstm", x, w_ih, w_hh, b_ih, b_hh, (h0, c0), lengths, reverse, backend)


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


_OPS = {name: _register(cells.get(name)) for name in cells.CELLS}

# The LSTM's ops under their own names (rnnkernels.torch exports the first two).
lstm_layer = _OPS["lstm"].layer
lstm_layer_backward = _OPS["lstm"].backward
lstm_layer_train = _OPS["lstm"].train
lstm_layer_backward_saved = _OPS["lstm"].backward_saved


# ----------------------------------------------------------------------------- proj_size
#
# LSTM with a projection, through rnnkernels.modules' projected_forward /
# projected_backward, which the NumPy LSTM shares: on CPU tensors with backend
# "reference" (float64), "cpu"/"auto" (the input dtype; reference.forward_projected's
# math on NumPy) or "emulated" (rnnkernels/_projected.py on the CPU emulator), on CUDA
# tensors with "cuda"/"auto" (rnnkernels/_projected.py on CuPy: cuBLAS GEMMs and our
# pointwise cell kernels; float32 saved state). Rows with lengths run as the unprojected
# ops run them (modules.projected_direction: run_direction's segments with the projected
# forward per segment); the per-segment saved arrays are laid side by side as
# _pack_arrays does, their shapes the same as without lengths. The op returns its saved
# state (gates, h, c) so that backward never recomputes.

_PROJECTED_BACKENDS = PROJECTED_BACKENDS


def _check_projected(backend: str, device: torch.device):
    if not projected_supported(backend, device.type):
        raise NotImplementedError(
            f"proj_size > 0 runs on CPU tensors with backend 'auto', 'cpu', 'reference' or 'emulated', and on CUDA "
            f"tensors with 'auto' or 'cuda'; backend {backend!r} on {device.type} tensors does not support it"
        )


def _projected_dtype(backend: str, dtype: torch.dtype, device: torch.device):
    return projected_dtype(backend, _NUMPY_DTYPES[dtype], device.type)


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
    lengths: Optional[Tensor],
    reverse: bool,
    backend: str,
) -> list[Tensor]:
    """One layer, one direction, with a projection: ``[y [T, B, P], h_n [B, P], c_n
    [B, H], gates [T, B, 4H], h [T+1, B, P], c [T+1, B, H]]``; the last three (in the
    compute dtype, time in the order the steps ran) are the saved state. With
    ``lengths`` ([B] integers or None) each row stops at its own length; the saved
    arrays then hold every segment's part as :func:`_pack_arrays` lays them out (rows
    sorted longest first, time flipped within each row for ``reverse``)."""
    _check_projected(backend, x.device)
    _check_layer(cells.get("lstm"), x, w_hh)
    steps, batch = x.shape[0], x.shape[1]
    plan = _plan(lengths, steps, batch)
    if not plan.uniform:
        return _projected_segments(plan, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, backend)
    with _backend_arrays(x.device) as (xp, array, tensor):
        y, h_n, c_n, saved = projected_forward(
            *map(array, (x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0)), reverse, backend
        )
        out = [xp.array(a, dtype=_NUMPY_DTYPES[x.dtype], order="C") for a in (y, h_n, c_n)]  # copies
        return [tensor(a) for a in out] + [tensor(a) for a in projected_saved_arrays(saved)]


def _projected_layout(x, w_hr, backend):
    """``[(shape, numpy dtype)]`` of the projected saved arrays (gates, h, c)."""
    steps, batch = x.shape[0], x.shape[1]
    proj, hidden = w_hr.shape
    dtype = _projected_dtype(backend, x.dtype, x.device)
    return [((steps, batch, 4 * hidden), dtype), ((steps + 1, batch, proj), dtype), ((steps + 1, batch, hidden), dtype)]


def _projected_segments(plan, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse, backend):
    """:func:`lstm_layer_projected` for rows with lengths, as ``_layer_train`` runs the
    unprojected cells: rows sorted, run_direction's segments, the saved arrays packed."""
    with _backend_arrays(x.device) as (xp, array, tensor):
        xa, w_ih_a, w_hh_a, b_ih_a, b_hh_a, w_hr_a, h0_a, c0_a = map(array, (x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0))
        if plan.order is not None:
            order = xp.asarray(plan.order)
            xa, h0_a, c0_a = xa[:, order], h0_a[order], c0_a[order]
        y, (h_n, c_n), tape = projected_direction(
            xa, (w_ih_a, w_hh_a, b_ih_a, b_hh_a), w_hr_a, (h0_a, c0_a), plan, reverse, True, backend
        )
        if plan.order is not None:
            restore = xp.asarray(plan.restore)
            y, h_n, c_n = y[:, restore], h_n[restore], c_n[restore]
        saved = _pack_arrays(plan, [projected_saved_arrays(t) for t in tape], _projected_layout(x, w_hr, backend), xp)
        out = [xp.array(a, dtype=_NUMPY_DTYPES[x.dtype], order="C") for a in (y, h_n, c_n)]  # copies
        return [tensor(a) for a in out] + [tensor(a) for a in saved]


@lstm_layer_projected.register_fake
def _lstm_layer_projected_fake(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths, reverse, backend):
    steps, batch = x.shape[0], x.shape[1]
    proj, hidden = w_hr.shape
    saved_dtype = _TORCH_DTYPES[_projected_dtype(backend, x.dtype, x.device)]
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
    lengths: Optional[Tensor],
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`lstm_layer_projected` from its saved state: ``(dx, dw_ih,
    dw_hh, db, dw_hr, dh0, dc0)``, ``db`` [4H] (zeros without biases)."""
    out_dtype = _NUMPY_DTYPES[x.dtype]
    plan = _plan(lengths, x.shape[0], x.shape[1])
    if not plan.uniform:
        return _projected_backward_segments(plan, dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, has_bias, saved, reverse, backend)
    with _backend_arrays(x.device) as (xp, array, tensor):
        state = projected_saved(backend, *map(array, (x, w_ih, w_hh, w_hr)), has_bias, [array(t) for t in saved], reverse)
        dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0 = projected_backward(state, *map(array, (dy, dh_n, dc_n)), reverse)
        if db is None:
            db = xp.zeros(w_ih.shape[0], out_dtype)
        return tuple(tensor(xp.array(a, dtype=out_dtype, order="C")) for a in (dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0))


def _projected_backward_segments(plan, dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, has_bias, saved, reverse, backend):
    """:func:`lstm_layer_projected_backward` for rows with lengths: each segment's saved
    state rebuilt from the packed arrays (:func:`_unpack_arrays`), then
    modules.projected_backward_direction, the NumPy LSTM's own path, on them."""
    out_dtype = _NUMPY_DTYPES[x.dtype]
    with _backend_arrays(x.device) as (xp, array, tensor):
        xa, w_ih_a, w_hh_a, w_hr_a = map(array, (x, w_ih, w_hh, w_hr))
        dy_a, dh_a, dc_a = (array(a).astype(out_dtype, copy=False) for a in (dy, dh_n, dc_n))
        if plan.order is not None:
            order = xp.asarray(plan.order)
            xa, dy_a, dh_a, dc_a = xa[:, order], dy_a[:, order], dh_a[order], dc_a[order]
        if reverse:
            xa = plan.flip(xa)  # the kernels saw (and saved for) the flipped rows
        tape = [
            projected_saved(backend, x_seg, w_ih_a, w_hh_a, w_hr_a, has_bias, parts, False)
            for _, x_seg, parts in _unpack_arrays(plan, xa, [array(t) for t in saved], xp)
        ]
        dx, dw_ih, dw_hh, db, dw_hr, (dh0, dc0) = projected_backward_direction(
            tape, plan, reverse, xp.ascontiguousarray(dy_a), (dh_a, dc_a), x.shape[2], has_bias
        )
        if db is None:
            db = xp.zeros(w_ih.shape[0], out_dtype)
        if plan.order is not None:
            restore = xp.asarray(plan.restore)
            dx, dh0, dc0 = dx[:, restore], dh0[restore], dc0[restore]
        return tuple(tensor(xp.array(a, dtype=out_dtype, order="C")) for a in (dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0))


@lstm_layer_projected_backward.register_fake
def _lstm_layer_projected_backward_fake(dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, has_bias, saved, lengths, reverse, backend):
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
    def forward(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths, reverse, backend):
        with torch.no_grad():
            return tuple(lstm_layer_projected(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths, reverse, backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w_ih, w_hh, b_ih, _, w_hr, h0, c0, lengths, reverse, backend = inputs
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, h0, c0, lengths, *output[3:])
        ctx.has_bias, ctx.reverse, ctx.backend = b_ih is not None, reverse, backend
        ctx.mark_non_differentiable(*output[3:])

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, *_saved_grads):
        # No double backward: as _CellLayerFunction.backward says so.
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
        x, w_ih, w_hh, w_hr, h0, c0, lengths, *saved = ctx.saved_tensors
        dy = x.new_zeros((x.shape[0], x.shape[1], w_hr.shape[0])) if dy is None else dy
        dh_n = h0.new_zeros(h0.shape) if dh_n is None else dh_n
        dc_n = c0.new_zeros(c0.shape) if dc_n is None else dc_n
        dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0 = lstm_layer_projected_backward(
            dy, dh_n, dc_n, x, w_ih, w_hh, w_hr, ctx.has_bias, saved, lengths, ctx.reverse, ctx.backend
        )
        db_ih, db_hh = (db, db.clone()) if ctx.has_bias else (None, None)
        return dx, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dh0.to(h0.dtype), dc0.to(c0.dtype), None, None, None


def lstm_layer_projected_autograd(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths, reverse: bool, backend: str):
    """:func:`lstm_layer_projected` with gradients: ``(y, h_n, c_n)``; ``lengths`` [B]
    integers or None."""
    _check_projected(backend, x.device)
    return _ProjectedFunction.apply(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths, reverse, backend)[:3]
