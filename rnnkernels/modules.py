"""``LSTM``, ``GRU`` and ``RNN``: framework-free, multi-layer, bidirectional recurrent
modules over NumPy and CuPy arrays, laid out exactly like ``torch.nn.LSTM``,
``torch.nn.GRU`` and ``torch.nn.RNN``.

Every layer and direction runs on the single-layer ``_api.cell_forward`` /
``cell_backward`` of the module's cell (``rnnkernels/cells.py``); this file only
arranges the calls, once for all cells: a cell contributes its gate count G (LSTM 4,
GRU 3, RNN 1) and its states (LSTM h and c, the others h), which travel as tuples.

Shapes (torch.nn's; D = 2 if bidirectional else 1, L = num_layers)::

    x          [T, B, I]   ([B, T, I] with batch_first; [T, I] unbatched)
    h0 (, c0)  [L*D, B, H] (index layer*D + direction; [L*D, H] unbatched)
    y          [T, B, D*H] (forward direction in [..., :H], reverse in [..., H:])
    h_n (, c_n) [L*D, B, H]
    weight_ih_l{k}[_reverse] [G*H, I] for k = 0, [G*H, D*H] above
    weight_hh_l{k}[_reverse] [G*H, H]; bias_ih_l{k}[_reverse], bias_hh_l{k}[_reverse] [G*H]

With ``proj_size = P > 0`` (LSTM only; h_t = W_hr (o ⊙ tanh c_t)), as torch: h0, h_n
[L*D, B, P], y [T, B, D*P], weight_hh [4H, P], weight_ih [4H, D*P] above layer 0, and
weight_hr_l{k}[_reverse] [P, H] after each layer-direction's biases (NumPy only).

Variable lengths. Row b of a batch with ``lengths[b] = n`` runs steps 0 .. n-1 only:
``y[t, b] = 0`` for t >= n, and ``h_n[:, b]``, ``c_n[:, b]`` are the states after
its step n-1 (h0, c0 when n = 0). The reverse direction reads row b backwards from
step n-1. The rows are sorted by length, longest first, once per call; then the time
axis is cut at every distinct length into segments, and each segment is one kernel
call over the rows still running, a prefix of the sorted batch::

    lengths (sorted) 5 5 3 1
    segment [0, 1)   rows 0..3      states carried from one segment to the next,
    segment [1, 3)   rows 0..2      rows that end keep their final state
    segment [3, 5)   rows 0..1

so every valid step is computed once, as in a packed sequence, with as many calls per
layer and direction as there are distinct lengths (one for equal lengths). Backward
runs the segments in reverse: the state gradient a segment returns for its first step
becomes the upstream gradient of the rows that continue into the segment before it,
and a row's ``dh_n``/``dc_n`` enters at the end of its own last segment. That is
exact BPTT on each row's own sequence; padded steps get zero gradient. The reverse
direction gathers each row reversed within its own length (padding stays in place),
runs the same forward code, and gathers back.

Dropout (``dropout=p``) multiplies the output of every layer but the last by a mask
of Bernoulli(1 - p) / (1 - p), in training mode only, as torch does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _arrays, cells, reference
from ._api import BACKENDS, cell_backward, cell_forward

__all__ = ["GRU", "LSTM", "LSTMModuleGrads", "ModuleGrads", "RNN", "parameter_names"]


def _xp_of(array):
    return np if isinstance(array, np.ndarray) else _arrays.import_cupy()


def parameter_names(num_layers: int, bidirectional: bool, bias: bool, proj: bool = False) -> list[str]:
    """``torch.nn.LSTM``'s parameter names, in its order (layer, direction, then
    weight_ih, weight_hh, bias_ih, bias_hh, and weight_hr with a projection)."""
    names = []
    for layer in range(num_layers):
        for suffix in ("", "_reverse")[: 2 if bidirectional else 1]:
            kinds = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ()) + (("weight_hr",) if proj else ())
            names += [f"{kind}_l{layer}{suffix}" for kind in kinds]
    return names


# ----------------------------------------------------------------------------- proj_size
#
# One layer, one direction of an LSTM with a projection: the math is
# reference.forward_projected / backward_projected, run on NumPy in float64 for backend
# "reference" and in the input dtype for "auto" and "cpu" (the tuned cpu cells read an
# unprojected h); backends "cuda" (CuPy arrays; "auto" picks it for them) and "emulated"
# (NumPy arrays, the CPU emulator) run rnnkernels/_projected.py: per step the GEMMs on
# cuBLAS (NumPy in the emulator) and our pointwise cell kernels, float32 math and saved
# state for float32 and float16 inputs. Both this module and rnnkernels.torch.LSTM call
# these functions, so there is one implementation per backend.

PROJECTED_BACKENDS = ("auto", "cpu", "reference", "cuda", "emulated")
# Backends whose projected path runs rnnkernels/_projected.py, the CUDA kernels' machinery.
_PROJECTED_KERNEL_BACKENDS = ("cuda", "emulated")
# Which backends take a projection for arrays on each device.
_PROJECTED_BY_DEVICE = {"cpu": ("auto", "cpu", "reference", "emulated"), "cuda": ("auto", "cuda")}


def projected_supported(backend: str, device: str) -> bool:
    """Whether ``backend`` runs proj_size > 0 for arrays on ``device`` ("cpu" or "cuda")."""
    return backend in _PROJECTED_BY_DEVICE.get(device, ())


def _projected_backend(backend: str, device: str) -> str:
    """``backend`` with "auto" resolved: "cuda" for GPU arrays."""
    return "cuda" if backend == "auto" and device == "cuda" else backend


def projected_dtype(backend: str, dtype, device: str = "cpu") -> np.dtype:
    """The dtype the projected math runs in (and its saved state is kept in) for
    ``backend``, input ``dtype`` and arrays on ``device``."""
    backend = _projected_backend(backend, device)
    if backend == "reference":
        return np.dtype(np.float64)
    if backend in _PROJECTED_KERNEL_BACKENDS:
        return np.dtype(np.float32)
    return np.dtype(dtype)


def _projected_runtime(backend: str, xp):
    """The ``_launch`` runtime of a kernel backend for arrays of ``xp``; TypeError when
    the arrays do not suit it (CuPy for "cuda", NumPy for "emulated")."""
    from . import _launch

    if backend == "emulated":
        if xp is not np:
            raise TypeError("backend='emulated' runs on NumPy arrays; pass NumPy arrays or use backend='cuda'")
        from . import emulated

        emulated.check_available()
        return _launch.EmulatorRuntime()
    if xp is np:
        raise TypeError("backend='cuda' needs CuPy arrays; pass CuPy arrays or use backend 'cpu' or 'emulated'")
    from . import cuda

    cuda.check_available()
    return _launch.CupyRuntime()


def _device_scope(x):
    """The GPU that holds ``x`` made current (CuPy arrays); nothing for NumPy ones."""
    return contextlib.nullcontext() if isinstance(x, np.ndarray) else x.device


def projected_forward(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, reverse: bool, backend: str, training: bool = True):
    """``x`` [T, B, I] (NumPy, or CuPy for "cuda"/"auto"), weights as ``torch.nn.LSTM``'s
    (biases None or both given), ``h0`` [B, P], ``c0`` [B, H]. Returns ``(y [T, B, P],
    h_n, c_n, saved)``: in the compute dtype (:func:`projected_dtype`) on NumPy, in the
    input dtype on the kernel backends; ``saved`` (a ``reference.SavedProjected`` or a
    ``_projected.Saved``, its time axis in the order the steps ran) is None unless
    ``training``."""
    xp = _xp_of(x)
    backend = _projected_backend(backend, "cpu" if xp is np else "cuda")
    if backend in _PROJECTED_KERNEL_BACKENDS:
        from . import _projected

        rt = _projected_runtime(backend, xp)
        if reverse:
            x = x[::-1]
        x, w_ih, w_hh, w_hr, h0, c0 = (xp.ascontiguousarray(a) for a in (x, w_ih, w_hh, w_hr, h0, c0))
        with _device_scope(x):
            # b_ih + b_hh summed in float32, as the API does for the unprojected kernels.
            bias = None if b_ih is None else b_ih.astype(np.float32) + b_hh.astype(np.float32)
            y, h_n, c_n, saved = _projected.forward(rt, x, w_ih, w_hh, bias, w_hr, h0, c0, training)
        if reverse:
            y = y[::-1]
        return y, h_n, c_n, saved
    dtype = projected_dtype(backend, x.dtype)
    if reverse:
        x = x[::-1]
    bias = None if b_ih is None else np.asarray(b_ih).astype(dtype) + np.asarray(b_hh).astype(dtype)
    y, h_n, c_n, saved = reference.forward_projected(x, w_ih, w_hh, bias, w_hr, h0, c0, training, dtype)
    if reverse:
        y = y[::-1]
    return y, h_n, c_n, saved


def projected_saved(backend: str, x, w_ih, w_hh, w_hr, has_bias: bool, arrays, reverse: bool):
    """The ``saved`` of :func:`projected_forward` rebuilt from its arrays ``[gates, h,
    c]`` (:func:`projected_saved_arrays`); ``x`` in the caller's time order."""
    xp = _xp_of(x)
    backend = _projected_backend(backend, "cpu" if xp is np else "cuda")
    if reverse:
        x = x[::-1]
    if backend in _PROJECTED_KERNEL_BACKENDS:
        from . import _projected

        with _device_scope(x):
            return _projected.saved_from_arrays(x, w_ih, w_hh, w_hr, has_bias, arrays)
    dtype = projected_dtype(backend, x.dtype)
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)
    return reference.SavedProjected(cast(x), cast(w_ih), cast(w_hh), cast(w_hr), has_bias, *(cast(a) for a in arrays))


def projected_saved_arrays(saved) -> list:
    """``[gates [T, B, 4H], h [T+1, B, P], c [T+1, B, H]]`` of a ``saved``."""
    if isinstance(saved, reference.SavedProjected):
        return [saved.gates, saved.h, saved.c]
    return [saved.gates, saved.h_all, saved.c_all]


def projected_backward(saved, dy, dh_n, dc_n, reverse: bool):
    """Gradients of :func:`projected_forward` from its ``saved``: ``dy`` [T, B, P] in
    the caller's time order, ``dh_n`` [B, P], ``dc_n`` [B, H]. Returns ``(dx, dw_ih,
    dw_hh, db, dw_hr, dh0, dc0)`` in the compute dtype (the input dtype on the kernel
    backends), ``db`` (the gradient of each bias) None without biases."""
    if reverse:
        dy = dy[::-1]
    if isinstance(saved, reference.SavedProjected):
        dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0 = reference.backward_projected(saved, dy, dh_n, dc_n)
    else:
        from . import _projected

        x = saved.x
        xp = _xp_of(x)
        rt = _projected_runtime("emulated" if xp is np else "cuda", xp)
        dy, dh_n, dc_n = (xp.ascontiguousarray(a, dtype=x.dtype) for a in (dy, dh_n, dc_n))
        with _device_scope(x):
            dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0 = _projected.backward(rt, saved, dy, dh_n, dc_n)
    if reverse:
        dx = dx[::-1]
    return dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0


# ----------------------------------------------------------------------------- lengths


class _Plan:
    """How a batch with per-row lengths is cut into single-layer kernel calls (see the
    module docstring). ``order`` sorts the rows longest first (None when they already
    are); ``segments`` are (first step, stop step, rows) over the sorted rows."""

    def __init__(self, lengths, steps: int, batch: int):
        self.steps, self.batch = steps, batch
        self._reverse_index = {}
        if lengths is None:
            # Every row runs every step: one segment, nothing to sort (the common case,
            # once per layer and direction in forward and backward: no argsort).
            self.uniform, self.order, self.restore = True, None, None
            self.sorted_lengths = np.full(batch, steps, dtype=np.int64)
            self.segments = [(0, steps, batch)]
            return
        self.uniform = bool(np.all(lengths == steps))
        order = np.argsort(-lengths, kind="stable")
        if self.uniform or np.array_equal(order, np.arange(batch)):
            self.order = self.restore = None
            self.sorted_lengths = lengths
        else:
            self.order, self.restore = order, np.argsort(order)
            self.sorted_lengths = lengths[order]
        if self.uniform:
            self.segments = [(0, steps, batch)]
        else:
            self.segments, start = [], 0
            for stop in sorted(set(int(n) for n in self.sorted_lengths if n > 0)):
                self.segments.append((start, stop, int(np.count_nonzero(self.sorted_lengths >= stop))))
                start = stop

    def flip(self, array):
        """``array`` [T, B, F] (sorted rows) with each row reversed within its own
        length; padding stays where it is. Its own inverse."""
        xp = _xp_of(array)
        if self.uniform:
            # copy(), not ascontiguousarray: with T == 1 the reversed view counts as
            # contiguous yet keeps a negative stride, which torch.from_numpy refuses.
            return array[::-1].copy()
        if xp not in self._reverse_index:
            t = np.arange(self.steps)[:, None]
            n = self.sorted_lengths[None, :]
            rows = np.where(t < n, n - 1 - t, t)
            cols = np.broadcast_to(np.arange(self.batch)[None, :], rows.shape)
            self._reverse_index[xp] = (xp.asarray(rows), xp.asarray(cols))
        rows, cols = self._reverse_index[xp]
        return array[rows, cols]


def _host_lengths(lengths, batch: int, steps: int):
    """``lengths`` (a sequence of ints or an integer array of any kind) as a host int64
    array [B], checked against the batch."""
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        host = np.asarray(lengths)
    else:
        host = _arrays.to_backend(lengths, "cpu") if not isinstance(lengths, np.ndarray) else lengths
    host = np.asarray(host)
    if host.dtype.kind not in "iu" and host.size:
        raise TypeError(f"lengths must hold integers, got dtype {host.dtype}")
    host = host.astype(np.int64).reshape(-1)
    if host.shape != (batch,):
        raise ValueError(f"lengths must have one entry per sequence in the batch ({batch}), got shape {host.shape}")
    if host.size and (host.min() < 0 or host.max() > steps):
        raise ValueError(f"lengths must lie in [0, {steps}] (the padded length), got {host.tolist()}")
    return host


# ----------------------------------------------------------------------------- one direction


def run_direction(cell, x, weights, states0, plan: _Plan, reverse: bool, training: bool, backend: str, *, segment=None):
    """One layer of ``cell`` (a ``cells.Cell`` or its name) in one direction over sorted
    rows. ``x`` [T, B, I], ``weights`` = (w_ih, w_hh, b_ih, b_hh) with biases possibly
    None, ``states0`` a tuple of [B, H] arrays, one per ``cell.states``, all backend
    arrays of one dtype. Returns ``(y, states_n, tape)``, ``states_n`` a tuple like
    ``states0``; ``tape`` (the per-segment forward outputs) is None unless ``training``.

    ``segment(x_seg, states_seg) -> (y, states, out)`` runs one segment forward (in
    the order the steps run: the caller flips nothing); None runs the API's
    ``cell_forward``. The projection (:func:`projected_direction`) passes its own, so
    that segments, state chaining and the per-row flip exist once."""
    if segment is None:
        def segment(x_seg, states_seg):
            out = cell_forward(cell, x_seg, *weights, states_seg, training=training, backend=backend)
            return out.y, out.states, out

    xp = _xp_of(x)
    dtype = x.dtype
    steps, batch, _ = x.shape
    width = weights[1].shape[1]  # of y and h: H, or P with a projection (w_hh [4H, P])
    if reverse:
        x = plan.flip(x)
    outs = []
    if plan.uniform:
        y_seg, states_seg, out = segment(x, tuple(states0))
        y = xp.asarray(y_seg).astype(dtype, copy=False)
        states = tuple(xp.asarray(s).astype(dtype, copy=False) for s in states_seg)
        outs.append(out)
    else:
        y = xp.zeros((steps, batch, width), dtype)
        states = tuple(s.astype(dtype, copy=True) for s in states0)
        for start, stop, rows in plan.segments:
            # Copies of the states: the kernels may keep their inputs for backward,
            # and the states are written again below.
            y_seg, states_seg, out = segment(x[start:stop, :rows], tuple(s[:rows].copy() for s in states))
            y[start:stop, :rows] = y_seg
            for state, new in zip(states, states_seg):
                state[:rows] = new
            outs.append(out)
    if reverse:
        y = plan.flip(y)
    return y, states, (outs if training else None)


def _backward_segments(tape, plan: _Plan, reverse: bool, dy, dstates_n, input_size: int, grad_shapes, segment):
    """The segments of :func:`run_direction` backwards: ``segment(out, dy_seg,
    dstates_seg) -> (dx, grads, dstates)``, ``grads`` a tuple of parameter gradients
    shaped by ``grad_shapes`` (None entries: absent, e.g. biases). Returns ``(dx, grads,
    dstates0)`` in ``dy``'s dtype, the parameter gradients summed over the segments."""
    xp = _xp_of(dy)
    dtype = dy.dtype
    steps, batch, _ = dy.shape
    if reverse:
        dy = plan.flip(dy)
    cast = lambda a: None if a is None else xp.asarray(a).astype(dtype, copy=False)  # noqa: E731
    if plan.uniform:
        dx, grads, dstates0 = segment(tape[0], dy, tuple(dstates_n))
        dx, grads, dstates0 = cast(dx), tuple(map(cast, grads)), tuple(map(cast, dstates0))
    else:
        dx = xp.zeros((steps, batch, input_size), dtype)
        grads = tuple(None if shape is None else xp.zeros(shape, dtype) for shape in grad_shapes)
        dstates0 = tuple(d.astype(dtype, copy=True) for d in dstates_n)
        for (start, stop, rows), out in reversed(list(zip(plan.segments, tape))):
            dx_seg, grads_seg, dstates_seg = segment(out, dy[start:stop, :rows], tuple(d[:rows].copy() for d in dstates0))
            dx[start:stop, :rows] = dx_seg
            for total, g in zip(grads, grads_seg):
                if total is not None:
                    total += g
            for d, new in zip(dstates0, dstates_seg):
                d[:rows] = new
    if reverse:
        dx = plan.flip(dx)
    return dx, grads, dstates0


def backward_direction(cell, tape, plan: _Plan, reverse: bool, dy, dstates_n, input_size: int, has_bias: bool):
    """Gradients of :func:`run_direction` from its ``tape``: ``dy`` [T, B, H],
    ``dstates_n`` a tuple of [B, H], one per state. Returns ``(dx, dw_ih, dw_hh, db_ih,
    db_hh, dstates0)``; the bias gradients are None without biases."""
    hidden = dy.shape[2]
    rows = cells.get(cell).gates * hidden
    shapes = ((rows, input_size), (rows, hidden), (rows,) if has_bias else None, (rows,) if has_bias else None)

    def segment(out, dy_seg, dstates_seg):
        g = cell_backward(out, dy_seg, dstates_seg)
        return g.dx, (g.dw_ih, g.dw_hh, g.db_ih, g.db_hh), g.dstates

    dx, (dw_ih, dw_hh, db_ih, db_hh), dstates0 = _backward_segments(
        tape, plan, reverse, dy, dstates_n, input_size, shapes, segment
    )
    return dx, dw_ih, dw_hh, db_ih, db_hh, dstates0


def projected_direction(x, weights, w_hr, states0, plan: _Plan, reverse: bool, training: bool, backend: str):
    """:func:`run_direction` of an LSTM with a projection: ``weights`` = (w_ih [4H, I],
    w_hh [4H, P], b_ih, b_hh), ``w_hr`` [P, H], ``states0`` = (h0 [B, P], c0 [B, H]).
    Each segment runs :func:`projected_forward`; the tape holds one projected ``saved``
    per segment. Returns ``(y [T, B, P], (h_n, c_n), tape)`` in x's dtype."""

    def segment(x_seg, states_seg):
        y, h, c, saved = projected_forward(x_seg, *weights, w_hr, *states_seg, False, backend, training)
        return y, (h, c), saved

    return run_direction("lstm", x, weights, states0, plan, reverse, training, backend, segment=segment)


def projected_backward_direction(tape, plan: _Plan, reverse: bool, dy, dstates_n, input_size: int, has_bias: bool):
    """Gradients of :func:`projected_direction` from its ``tape``: ``dy`` [T, B, P],
    ``dstates_n`` = (dh_n [B, P], dc_n [B, H]). Returns ``(dx, dw_ih, dw_hh, db, dw_hr,
    (dh0, dc0))`` in dy's dtype, ``db`` (of each bias) None without biases."""
    proj, hidden = dstates_n[0].shape[1], dstates_n[1].shape[1]
    shapes = ((4 * hidden, input_size), (4 * hidden, proj), (4 * hidden,) if has_bias else None, (proj, hidden))

    def segment(saved, dy_seg, dstates_seg):
        dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0 = projected_backward(saved, dy_seg, *dstates_seg, False)
        return dx, (dw_ih, dw_hh, db, dw_hr), (dh0, dc0)

    dx, (dw_ih, dw_hh, db, dw_hr), dstates0 = _backward_segments(
        tape, plan, reverse, dy, dstates_n, input_size, shapes, segment
    )
    return dx, dw_ih, dw_hh, db, dw_hr, dstates0


# ----------------------------------------------------------------------------- modules


@dataclass
class ModuleGrads:
    """What :meth:`GRU.backward` and :meth:`RNN.backward` return: ``dx`` shaped like
    the input, ``dh0`` like the initial state ([L*D, B, H]; the gradient with respect
    to the zero state when none was given), and ``params``, parameter name ->
    gradient."""

    dx: Any
    dh0: Any
    params: dict = field(default_factory=dict)


@dataclass
class LSTMModuleGrads:
    """What :meth:`LSTM.backward` returns: ``dx`` shaped like the input, ``dh0`` and
    ``dc0`` like the initial state ([L*D, B, H]; the gradient with respect to the zero
    state when none was given), and ``params``, parameter name -> gradient."""

    dx: Any
    dh0: Any
    dc0: Any
    params: dict = field(default_factory=dict)


@dataclass
class _Tape:
    plan: _Plan
    kind: _arrays.Kind
    batch_first: bool
    unbatched: bool
    input_shape: tuple
    layers: list  # per layer, per direction: tape of run_direction
    masks: list  # per layer but the last: dropout mask or None


def _check_sizes(input_size, hidden_size, num_layers):
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (0 if name == "input_size" else 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _Recurrent:
    """What ``LSTM``, ``GRU`` and ``RNN`` share: the multi-layer, bidirectional,
    variable-length arrangement of single-layer calls of a cell (``cell_name``, a name in
    ``rnnkernels.cells``), torch.nn's parameter names, shapes and initialization, the
    state_dict, modes and dropout. A subclass says which cell, how its states are passed
    in and returned (a pair for the LSTM, one array for the others) and any extra
    configuration; the states themselves travel as tuples, one array per
    ``cell.states``."""

    cell_name = ""  # a subclass's cell
    proj_size = 0  # only the LSTM has a projection

    def __init__(
        self, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, *, dtype, backend, device, seed,
    ):
        _check_sizes(input_size, hidden_size, num_layers)
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout <= 1.0) or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' (NumPy arrays) or 'cuda' (CuPy arrays), got {device!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.bias, self.batch_first, self.bidirectional = bool(bias), bool(batch_first), bool(bidirectional)
        self.dropout = float(dropout)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise TypeError(f"dtype must be a floating-point dtype, got {self.dtype}")
        self.backend, self.device = backend, device
        self.training = True
        self._rng = np.random.default_rng(seed)
        self._last: _Tape | None = None
        self._params: dict[str, Any] = {}
        self.reset_parameters()

    # -- what a subclass may change ------------------------------------------------------

    @property
    def _cell(self) -> cells.Cell:
        return cells.get(self.cell_name)

    @property
    def _real_hidden(self) -> int:
        """The width of h (and of each direction's output): P with a projection."""
        return self.proj_size or self.hidden_size

    def _state_widths(self) -> tuple[int, ...]:
        """The width of each state, in the order of ``cell.states``."""
        return (self.hidden_size,) * len(self._cell.states)

    def _state_meanings(self) -> tuple[str, ...]:
        """How each state's width is named in error messages."""
        return ("hidden",) * len(self._cell.states)

    def _run_direction(self, layer, direction, layer_input, states0, plan, training):
        """One layer and direction: ``(y, states_n, tape)`` in the module's dtype."""
        return run_direction(
            self._cell, layer_input, self._weights(layer, direction), states0, plan,
            reverse=direction == 1, training=training, backend=self.backend,
        )

    def _backward_direction(self, layer, direction, tape, plan, d_dir, dstates_n, input_size, grads):
        """Gradients of :meth:`_run_direction`; puts the parameter gradients into
        ``grads`` and returns ``(dx, dstates0)``."""
        dx, dw_ih, dw_hh, db_ih, db_hh, dstates0 = backward_direction(
            self._cell, tape, plan, direction == 1, d_dir, dstates_n, input_size, self.bias,
        )
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        grads["weight_ih" + suffix], grads["weight_hh" + suffix] = dw_ih, dw_hh
        if self.bias:
            grads["bias_ih" + suffix], grads["bias_hh" + suffix] = db_ih, db_hh
        return dx, dstates0

    def _check_lengths_supported(self, lengths):
        pass

    # -- parameters --------------------------------------------------------------------

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _shapes(self) -> dict[str, tuple]:
        rows = self._cell.gates * self.hidden_size
        directions, real = self.num_directions, self._real_hidden
        shapes = {}
        for name in parameter_names(self.num_layers, self.bidirectional, self.bias, self.proj_size > 0):
            layer = int(name.split("_l")[1].split("_")[0])
            if name.startswith("weight_ih"):
                shapes[name] = (rows, self.input_size if layer == 0 else directions * real)
            elif name.startswith("weight_hh"):
                shapes[name] = (rows, real)
            elif name.startswith("weight_hr"):
                shapes[name] = (self.proj_size, self.hidden_size)
            else:
                shapes[name] = (rows,)
        return shapes

    def _xp(self):
        return np if self.device == "cpu" else _arrays.import_cupy()

    def reset_parameters(self):
        """Every parameter from U(-1/√H, 1/√H), as torch.nn's LSTM, GRU and RNN do."""
        bound = 1.0 / np.sqrt(self.hidden_size)
        xp = self._xp()
        self._params = {
            name: xp.asarray(self._rng.uniform(-bound, bound, shape).astype(self.dtype))
            for name, shape in self._shapes().items()
        }

    def named_parameters(self) -> list[tuple[str, Any]]:
        """(name, array) pairs in torch.nn's order; the arrays are the module's own
        (update them in place to train)."""
        return list(self._params.items())

    def parameters(self) -> list[Any]:
        return list(self._params.values())

    def __getattr__(self, name):
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def state_dict(self) -> dict[str, Any]:
        """Parameter name -> a copy of the array (NumPy or CuPy), keyed and shaped like
        the torch.nn module's ``state_dict()``."""
        return {name: value.copy() for name, value in self._params.items()}

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy parameters in from ``state_dict`` (name -> NumPy/CuPy array or torch
        tensor, e.g. ``torch.nn.LSTM(...).state_dict()``), cast to the module's dtype.
        With ``strict``, the keys must be exactly the module's. Returns
        ``(missing_keys, unexpected_keys)``."""
        shapes = self._shapes()
        missing = [name for name in shapes if name not in state_dict]
        unexpected = [name for name in state_dict if name not in shapes]
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict does not fit this {type(self).__name__}: missing keys {missing}, unexpected keys {unexpected}"
            )
        new = {}
        for name, shape in shapes.items():
            if name not in state_dict:
                continue
            value = _arrays.to_backend(state_dict[name], self.device)
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
            new[name] = value.astype(self.dtype, copy=True)
        self._params.update(new)
        return missing, unexpected

    @classmethod
    def _config_of(cls, module) -> dict:
        """The constructor arguments of a torch.nn module of this kind."""
        return dict(
            input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
            bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
            bidirectional=module.bidirectional,
        )

    @classmethod
    def from_torch(cls, module, **kwargs):
        """A module with the configuration and weights of the torch.nn module of the
        same kind (``dtype``, ``backend``, ``device``, ``seed`` may be given as
        keywords)."""
        ours = cls(**cls._config_of(module), **kwargs)
        ours.load_state_dict(module.state_dict())
        return ours

    # -- modes ---------------------------------------------------------------------------

    def train(self, mode: bool = True):
        """Training mode: dropout on, calls record what :meth:`backward` needs."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Inference mode: no dropout, nothing recorded, inference kernels."""
        return self.train(False)

    _REPR_DEFAULTS = (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False))

    def __repr__(self):
        extra = "".join(
            f", {name}={getattr(self, name)!r}" for name, default in self._REPR_DEFAULTS if getattr(self, name) != default
        )
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}{extra}, dtype={self.dtype.name}, backend={self.backend!r})"

    # -- forward -------------------------------------------------------------------------

    @staticmethod
    def _suffixed(kind: str, layer: int, direction: int) -> str:
        return f"{kind}_l{layer}" + ("_reverse" if direction else "")

    def _weights(self, layer: int, direction: int):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        p = self._params
        if self.bias:
            return p["weight_ih" + suffix], p["weight_hh" + suffix], p["bias_ih" + suffix], p["bias_hh" + suffix]
        return p["weight_ih" + suffix], p["weight_hh" + suffix], None, None

    def _to_device(self, value, name: str):
        kind = _arrays.array_kind(value, name)
        dtype = _arrays.array_dtype(value)
        if dtype is not None:
            dtype = dtype.newbyteorder("=")  # ">f4" is float32 (to_backend makes it native)
        if dtype != self.dtype:
            raise TypeError(
                f"{name} has dtype {_arrays.dtype_name(value)} but this {type(self).__name__}'s parameters are {self.dtype}"
            )
        return _arrays.to_backend(value, self.device), kind

    def _forward(self, x, states0, lengths):
        """``(y, states_n)``, ``states0`` None or a tuple of arrays (one per state, as
        the user shaped them), ``states_n`` a tuple of the same kind as ``x``."""
        xb, kind = self._to_device(x, "x")
        xp = self._xp()
        if xb.ndim not in (2, 3):
            raise ValueError(f"x must be 3-D ([B, T, I] with batch_first, else [T, B, I]) or 2-D [T, I], got shape {tuple(xb.shape)}")
        unbatched = xb.ndim == 2
        if unbatched:
            xb = xb[:, None, :]
        elif self.batch_first:
            xb = xb.transpose(1, 0, 2)
        steps, batch, input_size = xb.shape
        if input_size != self.input_size:
            raise ValueError(f"x must have {self.input_size} features (input_size), got {input_size}")
        layers, directions = self.num_layers, self.num_directions
        self._check_lengths_supported(lengths)
        names = tuple(f"{s}0" for s in self._cell.states)
        widths = self._state_widths()
        rows = (layers * directions,) if unbatched else (layers * directions, batch)
        if states0 is None:
            states0 = [xp.zeros((layers * directions, batch, width), self.dtype) for width in widths]
        else:
            states0 = [self._to_device(value, name)[0] for name, value in zip(names, states0)]
            for name, value, width, what in zip(names, states0, widths, self._state_meanings()):
                if tuple(value.shape) != rows + (width,):
                    raise ValueError(f"{name} must have shape {rows + (width,)} (num_layers * num_directions, batch, {what}), got {tuple(value.shape)}")
            if unbatched:
                states0 = [s[:, None, :] for s in states0]
        plan = _Plan(_host_lengths(lengths, batch, steps), steps, batch)
        if plan.order is not None:
            xb, states0 = xb[:, plan.order], [s[:, plan.order] for s in states0]

        training = self.training
        layer_input, tapes, masks = xb, [], []
        states_n = [[] for _ in states0]
        for layer in range(layers):
            outputs, layer_tapes = [], []
            for direction in range(directions):
                k = layer * directions + direction
                y, states, tape = self._run_direction(layer, direction, layer_input, tuple(s[k] for s in states0), plan, training)
                outputs.append(y)
                for collected, state in zip(states_n, states):
                    collected.append(state)
                layer_tapes.append(tape)
            tapes.append(layer_tapes)
            layer_input = outputs[0] if directions == 1 else xp.concatenate(outputs, axis=2)
            if layer < layers - 1:
                mask = self._dropout_mask(layer_input.shape) if training and self.dropout > 0 else None
                if mask is not None:
                    layer_input = layer_input * mask
                masks.append(mask)
        y, states_n = layer_input, [xp.stack(s) for s in states_n]

        if plan.order is not None:
            y, states_n = y[:, plan.restore], [s[:, plan.restore] for s in states_n]
        if unbatched:
            y, states_n = y[:, 0], [s[:, 0] for s in states_n]
        elif self.batch_first:
            y = y.transpose(1, 0, 2)
        self._last = None
        if training:
            self._last = _Tape(plan, kind, self.batch_first, unbatched, tuple(x.shape), tapes, masks)
        back = lambda a: _arrays.from_backend(xp.ascontiguousarray(a), kind)  # noqa: E731
        return back(y), tuple(back(s) for s in states_n)

    def _dropout_mask(self, shape):
        keep = 1.0 - self.dropout
        if keep == 0.0:
            mask = np.zeros(shape, self.dtype)
        else:
            mask = ((self._rng.random(shape) < keep) / keep).astype(self.dtype)
        return self._xp().asarray(mask)

    # -- backward ------------------------------------------------------------------------

    def _backward(self, dy, dstates_n):
        """``(dx, dstates0, params)`` of the most recent training-mode call, ``dstates_n``
        a tuple (entries may be None: zero) shaped like its states."""
        tape = self._last
        if tape is None:
            raise ValueError(
                "backward needs a forward call made in training mode "
                f"({type(self).__name__.lower()}.train()); the last call was in eval mode or there was none"
            )
        xp = self._xp()
        plan = tape.plan
        steps, batch = plan.steps, plan.batch
        layers, directions, real = self.num_layers, self.num_directions, self._real_hidden
        rows = layers * directions

        def upstream(value, name, shape_tm, user_shape):
            if value is None:
                return xp.zeros(shape_tm, self.dtype)
            arr, _ = self._to_device(value, name)
            if tuple(arr.shape) != user_shape:
                raise ValueError(f"{name} must have shape {user_shape}, like the forward's output, got {tuple(arr.shape)}")
            return arr

        y_tm = (steps, batch, directions * real)
        if tape.unbatched:
            y_user = (steps, directions * real)
        else:
            y_user = (batch, steps, directions * real) if tape.batch_first else y_tm
        dy_b = upstream(dy, "dy", y_tm, y_user)
        dstates_b = []
        for name, value, width in zip(self._cell.states, dstates_n, self._state_widths()):
            user = (rows, width) if tape.unbatched else (rows, batch, width)
            arr = upstream(value, f"d{name}_n", (rows, batch, width), user)
            dstates_b.append(arr[:, None] if tape.unbatched and value is not None else arr)
        if tape.unbatched:
            dy_b = dy_b[:, None] if dy is not None else dy_b
        elif tape.batch_first and dy is not None:
            dy_b = dy_b.transpose(1, 0, 2)
        if plan.order is not None:
            dy_b, dstates_b = dy_b[:, plan.order], [d[:, plan.order] for d in dstates_b]

        grads: dict[str, Any] = {}
        dstates0 = [[None] * rows for _ in dstates_b]
        d_out = dy_b
        for layer in reversed(range(layers)):
            input_size = self.input_size if layer == 0 else directions * real
            d_in = None
            for direction in range(directions):
                k = layer * directions + direction
                d_dir = xp.ascontiguousarray(d_out[:, :, direction * real:(direction + 1) * real])
                dx, ds0 = self._backward_direction(
                    layer, direction, tape.layers[layer][direction], plan, d_dir, tuple(d[k] for d in dstates_b),
                    input_size, grads,
                )
                for collected, d in zip(dstates0, ds0):
                    collected[k] = d
                d_in = dx if d_in is None else d_in + dx
            if layer > 0 and tape.masks[layer - 1] is not None:
                d_in = d_in * tape.masks[layer - 1]
            d_out = d_in
        dx, dstates0 = d_out, [xp.stack(d) for d in dstates0]
        if plan.order is not None:
            dx, dstates0 = dx[:, plan.restore], [d[:, plan.restore] for d in dstates0]
        if tape.unbatched:
            dx, dstates0 = dx[:, 0], [d[:, 0] for d in dstates0]
        elif tape.batch_first:
            dx = dx.transpose(1, 0, 2)
        back = lambda a: _arrays.from_backend(xp.ascontiguousarray(a), tape.kind)  # noqa: E731
        ordered = {name: grads[name] for name in self._params}
        return back(dx), tuple(back(d) for d in dstates0), ordered


class LSTM(_Recurrent):
    """A multi-layer, optionally bidirectional LSTM, a drop-in for ``torch.nn.LSTM``'s
    math and parameters, over NumPy (``device="cpu"``) or CuPy (``device="cuda"``)
    arrays.

    ``lstm(x, state=None, lengths=None)`` returns ``(y, (h_n, c_n))`` with torch's
    shapes (see the module docstring), as the kind of array ``x`` is. In training
    mode (the default; see :meth:`train`, :meth:`eval`) the call also records what
    :meth:`backward` needs; the next :meth:`backward` uses the most recent call.

    Parameters are named and shaped like ``torch.nn.LSTM``'s and initialized like
    them, U(-1/√H, 1/√H), from ``seed`` (an int, a ``numpy.random.Generator`` or None).
    The same generator draws the dropout masks. ``backend`` is passed to
    :func:`rnnkernels.lstm_forward` ("auto": cuda for CuPy arrays, cpu otherwise).

    ``proj_size = P > 0`` (LSTM with projections, h_t = W_hr (o ⊙ tanh c_t)) adds
    ``weight_hr_l{k}[_reverse]`` [P, H] after each layer-direction's biases, as
    ``torch.nn.LSTM`` does; then ``h0``/``h_n`` are [L*D, B, P], ``c0``/``c_n`` stay
    [L*D, B, H], ``y`` is [T, B, D*P] and ``weight_hh`` is [4H, P]. It runs on NumPy
    (``device="cpu"``) with backend "auto"/"cpu" (in the module's dtype) or
    "reference" (float64), the math of ``reference.forward_projected``; with backend
    "cuda" (``device="cuda"``, "auto" there too) or "emulated" it runs
    rnnkernels/_projected.py (per-step cuBLAS GEMMs and our pointwise cell kernels,
    float32 math for float32 and float16 modules), per-row ``lengths`` included (the
    same segments as without a projection). :meth:`load_keras_weights` raises
    NotImplementedError with a projection.
    """

    cell_name = "lstm"
    _REPR_DEFAULTS = _Recurrent._REPR_DEFAULTS + (("proj_size", 0),)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        proj_size: int = 0,
        dtype=np.float32,
        backend: str = "auto",
        device: str = "cpu",
        seed=None,
    ):
        _check_sizes(input_size, hidden_size, num_layers)
        if not isinstance(proj_size, (int, np.integer)) or isinstance(proj_size, bool):
            raise TypeError(f"proj_size must be an int, got {type(proj_size).__name__}")
        if not 0 <= proj_size < hidden_size:
            raise ValueError(f"proj_size must be 0 (no projection) or in [1, hidden_size={hidden_size}), got {proj_size}")
        if proj_size and not projected_supported(backend, device):
            raise NotImplementedError(
                f"proj_size > 0 runs with backend 'auto', 'cpu', 'reference' or 'emulated' on device 'cpu', and "
                f"'auto' or 'cuda' on device 'cuda'; backend {backend!r} on device {device!r} does not support it"
            )
        self.proj_size = int(proj_size)
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            dtype=dtype, backend=backend, device=device, seed=seed,
        )

    @classmethod
    def _config_of(cls, module) -> dict:
        return dict(super()._config_of(module), proj_size=getattr(module, "proj_size", 0))

    def _state_widths(self):
        return (self._real_hidden, self.hidden_size)

    def _state_meanings(self):
        return ("proj_size" if self.proj_size else "hidden", "hidden")

    def _run_direction(self, layer, direction, layer_input, states0, plan, training):
        if not self.proj_size:
            return super()._run_direction(layer, direction, layer_input, states0, plan, training)
        # The projected path runs in its compute dtype (float64 for "reference");
        # outputs come back in the module's dtype (run_direction casts them).
        return projected_direction(
            layer_input, self._weights(layer, direction), self._params[self._suffixed("weight_hr", layer, direction)],
            states0, plan, direction == 1, training, self.backend,
        )

    def _backward_direction(self, layer, direction, tape, plan, d_dir, dstates_n, input_size, grads):
        if not self.proj_size:
            return super()._backward_direction(layer, direction, tape, plan, d_dir, dstates_n, input_size, grads)
        dx, dw_ih, dw_hh, db, dw_hr, dstates0 = projected_backward_direction(
            tape, plan, direction == 1, d_dir, dstates_n, input_size, self.bias
        )
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        grads["weight_hr" + suffix] = dw_hr
        grads["weight_ih" + suffix], grads["weight_hh" + suffix] = dw_ih, dw_hh
        if self.bias:
            grads["bias_ih" + suffix], grads["bias_hh" + suffix] = db, db.copy()
        return dx, dstates0

    def __call__(self, x, state=None, lengths=None):
        """``(y, (h_n, c_n))``; see the class docstring."""
        return self.forward(x, state, lengths)

    def forward(self, x, state=None, lengths=None):
        if state is not None and (not isinstance(state, (tuple, list)) or len(state) != 2):
            raise TypeError("state must be a pair (h0, c0)")
        y, (h_n, c_n) = self._forward(x, None if state is None else tuple(state), lengths)
        return y, (h_n, c_n)

    def backward(self, dy=None, dh_n=None, dc_n=None) -> LSTMModuleGrads:
        """Gradients of the most recent training-mode call. ``dy`` is shaped like its
        ``y``, ``dh_n`` and ``dc_n`` like its ``h_n`` and ``c_n``; a missing one is
        zero. Returns :class:`LSTMModuleGrads`: ``dx`` (as the kind of the input),
        ``dh0``, ``dc0`` and the parameter gradients (module arrays)."""
        dx, (dh0, dc0), params = self._backward(dy, (dh_n, dc_n))
        return LSTMModuleGrads(dx=dx, dh0=dh0, dc0=dc0, params=params)
    # -- Keras --------------------------------------------------------------------------

    def load_keras_weights(self, weights, layer: int = 0):
        """Set layer ``layer`` from Keras LSTM weights, the list ``get_weights()`` gives:
        ``[kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H]]`` (no bias with
        ``use_bias=False``), twice (forward, then backward) for a ``Bidirectional``
        layer. Keras's gate order i, f, c, o is torch's i, f, g, o; the kernels are
        transposed, ``bias`` goes to ``bias_ih`` and ``bias_hh`` is set to zero. The
        Keras layer must use the default activations (tanh, sigmoid). Keras's LSTM has
        no projection: a module with ``proj_size`` raises NotImplementedError."""
        self._refuse_keras_projection()
        per_direction = 3 if self.bias else 2
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if len(weights) != per_direction * self.num_directions:
            raise ValueError(
                f"expected {per_direction * self.num_directions} Keras arrays for this layer "
                f"({'kernel, recurrent_kernel' + (', bias' if self.bias else '')} per direction, "
                f"{self.num_directions} direction(s)), got {len(weights)}"
            )
        state = {}
        for direction in range(self.num_directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            arrays = [_arrays.to_backend(a, self.device) for a in weights[direction * per_direction:][:per_direction]]
            state["weight_ih" + suffix] = arrays[0].T
            state["weight_hh" + suffix] = arrays[1].T
            if self.bias:
                state["bias_ih" + suffix] = arrays[2]
                state["bias_hh" + suffix] = self._xp().zeros_like(arrays[2])
        self.load_state_dict(state, strict=False)

    def _refuse_keras_projection(self):
        if self.proj_size:
            raise NotImplementedError(
                f"Keras's LSTM has no projection (weight_hr); this LSTM has proj_size={self.proj_size}, "
                "so its weights have no Keras equivalent"
            )

    def keras_weights(self, layer: int = 0) -> list:
        """Layer ``layer`` as Keras LSTM weights (see :meth:`load_keras_weights`):
        ``[kernel, recurrent_kernel, bias]`` per direction, bias = bias_ih + bias_hh."""
        self._refuse_keras_projection()
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        xp = self._xp()
        out = []
        for direction in range(self.num_directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            out.append(xp.ascontiguousarray(self._params["weight_ih" + suffix].T))
            out.append(xp.ascontiguousarray(self._params["weight_hh" + suffix].T))
            if self.bias:
                out.append(self._params["bias_ih" + suffix] + self._params["bias_hh" + suffix])
        return out



class _HiddenState(_Recurrent):
    """The cells whose only state is h (GRU, RNN): ``module(x, h0=None, lengths=None)
    -> (y, h_n)`` and ``backward(dy, dh_n) -> ModuleGrads``, as torch.nn.GRU/RNN."""

    def __call__(self, x, h0=None, lengths=None):
        """``(y, h_n)``; see the class docstring."""
        return self.forward(x, h0, lengths)

    def forward(self, x, h0=None, lengths=None):
        y, (h_n,) = self._forward(x, None if h0 is None else (h0,), lengths)
        return y, h_n

    def backward(self, dy=None, dh_n=None) -> ModuleGrads:
        """Gradients of the most recent training-mode call. ``dy`` is shaped like its
        ``y``, ``dh_n`` like its ``h_n``; a missing one is zero. Returns
        :class:`ModuleGrads`: ``dx`` (as the kind of the input), ``dh0`` and the
        parameter gradients (module arrays)."""
        dx, (dh0,), params = self._backward(dy, (dh_n,))
        return ModuleGrads(dx=dx, dh0=dh0, params=params)


class GRU(_HiddenState):
    """A multi-layer, optionally bidirectional GRU, a drop-in for ``torch.nn.GRU``'s
    math and parameters (gate rows r, z, n; n = tanh(W_in x + b_in + r ⊙ (W_hn h +
    b_hn))), over NumPy or CuPy arrays; everything as :class:`LSTM` without the cell
    state: ``gru(x, h0=None, lengths=None)`` returns ``(y, h_n)`` and
    :meth:`backward` ``(dy, dh_n)`` a :class:`ModuleGrads`. Weights are [3H, .]."""

    cell_name = "gru"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        dtype=np.float32,
        backend: str = "auto",
        device: str = "cpu",
        seed=None,
    ):
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            dtype=dtype, backend=backend, device=device, seed=seed,
        )


class RNN(_HiddenState):
    """A multi-layer, optionally bidirectional Elman RNN, a drop-in for
    ``torch.nn.RNN``'s math and parameters: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} +
    b_hh), ``nonlinearity`` "tanh" (cell "rnn_tanh") or "relu" ("rnn_relu"), weights
    [H, .]; calls and gradients as :class:`GRU`. The constructor's positional order is
    torch's (``nonlinearity`` fourth)."""

    _REPR_DEFAULTS = (("num_layers", 1), ("nonlinearity", "tanh")) + _Recurrent._REPR_DEFAULTS[1:]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        dtype=np.float32,
        backend: str = "auto",
        device: str = "cpu",
        seed=None,
    ):
        cells.rnn(nonlinearity)  # checks it
        self.nonlinearity = nonlinearity
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            dtype=dtype, backend=backend, device=device, seed=seed,
        )

    @property
    def cell_name(self) -> str:
        return f"rnn_{self.nonlinearity}"

    @classmethod
    def _config_of(cls, module) -> dict:
        return dict(super()._config_of(module), nonlinearity=module.nonlinearity)
