"""The public functions, ``lstm_forward`` / ``gru_forward`` / ``rnn_forward`` and their
backwards: validation, layout, dispatch to a backend, written once for every cell.

Everything a user can get wrong is checked here, once, for every cell and backend: the
array types, dtypes, shapes, the pairing of biases and states, the backend name. Backends
(see ``_backend.py``) then see only well-formed, time-major, contiguous, non-empty
problems with one folded bias (``cells.py``). What differs between cells (gate count,
states, bias folding, which module implements a backend) comes from ``cells.Cell``;
``cell_forward`` and ``cell_backward`` are the generic entry points the modules, the torch
ops and the tools use, and the public functions are thin wrappers naming their arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _arrays, cells
from ._backend import Backend

BACKENDS = ("auto", "reference", "cpu", "cuda", "emulated")


def get_backend(name: str, cell="lstm") -> Backend:
    """The backend registered as ``name`` (not "auto") for ``cell`` (a name from
    ``rnnkernels.cells.CELLS`` or a Cell); a clear error if unknown or not implemented."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {BACKENDS}; got {type(name).__name__}")
    if name not in BACKENDS[1:]:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    cell = cells.get(cell)
    backend = cell.implementation(name)
    if backend is None:
        have = [b for b in BACKENDS[1:] if cell.implementation(b) is not None]
        raise NotImplementedError(
            f"backend {name!r} does not implement the {cell.title} yet; backends that do: {', '.join(have)}"
        )
    backend.check_available()
    return backend


# ----------------------------------------------------------------------------- results


@dataclass
class LSTMOutput:
    """What :func:`lstm_forward` returns. ``y`` is [T, B, H] ([B, T, H] with
    ``batch_first``); ``h_n`` and ``c_n`` are [B, H]. When made with ``training=True``
    it also carries what :func:`lstm_backward` needs."""

    y: Any
    h_n: Any
    c_n: Any
    training: bool
    backend: str
    _ctx: Any = field(default=None, repr=False)
    cell = cells.LSTM

    @property
    def states(self) -> tuple:
        """The final states in the cell's order: (h_n, c_n)."""
        return (self.h_n, self.c_n)


@dataclass
class _HiddenOutput:
    """The output of a cell whose only state is h: ``y`` [T, B, H] ([B, T, H] with
    ``batch_first``) and ``h_n`` [B, H]."""

    y: Any
    h_n: Any
    training: bool
    backend: str
    _ctx: Any = field(default=None, repr=False)

    @property
    def states(self) -> tuple:
        return (self.h_n,)


@dataclass
class GRUOutput(_HiddenOutput):
    """What :func:`gru_forward` returns: ``y`` [T, B, H] ([B, T, H] with
    ``batch_first``), ``h_n`` [B, H]; with ``training=True`` also what
    :func:`gru_backward` needs."""

    cell = cells.GRU


@dataclass
class RNNOutput(_HiddenOutput):
    """What :func:`rnn_forward` returns: ``y`` [T, B, H] ([B, T, H] with
    ``batch_first``), ``h_n`` [B, H]; ``nonlinearity`` is "tanh" or "relu"."""

    nonlinearity: str = "tanh"

    @property
    def cell(self) -> cells.Cell:
        return cells.rnn(self.nonlinearity)


@dataclass
class LSTMGrads:
    """What :func:`lstm_backward` returns, each gradient shaped like its input;
    ``db_ih`` and ``db_hh`` are None when the forward had no biases. With
    ``return_step_norms=True``, ``dh_norms[t] = ‖∂L/∂h_t‖`` and ``dc_norms[t] =
    ‖∂L/∂c_t‖`` ([T], float64, NumPy) are filled in."""

    dx: Any
    dw_ih: Any
    dw_hh: Any
    db_ih: Any
    db_hh: Any
    dh0: Any
    dc0: Any
    dh_norms: Any = None
    dc_norms: Any = None

    @property
    def dstates(self) -> tuple:
        return (self.dh0, self.dc0)

    @property
    def step_norms(self):
        return None if self.dh_norms is None else (self.dh_norms, self.dc_norms)


@dataclass
class _HiddenGrads:
    """The gradients of a cell whose only state is h, each shaped like its input;
    ``db_ih`` and ``db_hh`` are None when the forward had no biases. With
    ``return_step_norms=True``, ``dh_norms[t] = ‖∂L/∂h_t‖`` ([T], float64, NumPy)."""

    dx: Any
    dw_ih: Any
    dw_hh: Any
    db_ih: Any
    db_hh: Any
    dh0: Any
    dh_norms: Any = None

    @property
    def dstates(self) -> tuple:
        return (self.dh0,)

    @property
    def step_norms(self):
        return None if self.dh_norms is None else (self.dh_norms,)


class GRUGrads(_HiddenGrads):
    """What :func:`gru_backward` returns. ``db_ih`` and ``db_hh`` agree on the r and z
    rows and differ on the n rows (b_hn sits inside the reset gate's product)."""


class RNNGrads(_HiddenGrads):
    """What :func:`rnn_backward` returns (``db_ih`` equals ``db_hh``: the two biases
    only ever appear summed)."""


_GRADS = {"lstm": LSTMGrads, "gru": GRUGrads, "rnn_tanh": RNNGrads, "rnn_relu": RNNGrads}
_OUTPUT_TYPES = (LSTMOutput, GRUOutput, RNNOutput)


def _make_output(cell: cells.Cell, y, states, training, backend, ctx):
    if cell.name == "lstm":
        return LSTMOutput(y, states[0], states[1], training, backend, ctx)
    if cell.name == "gru":
        return GRUOutput(y, states[0], training, backend, ctx)
    return RNNOutput(y, states[0], training, backend, ctx, nonlinearity=cell.name.removeprefix("rnn_"))


def _make_grads(cell: cells.Cell, dx, dw_ih, dw_hh, db_ih, db_hh, dstates):
    return _GRADS[cell.name](dx, dw_ih, dw_hh, db_ih, db_hh, *dstates)


@dataclass
class _Context:
    """What the API itself remembers between forward and backward."""

    backend: Backend
    saved: Any
    kind: _arrays.Kind
    dtype: np.dtype  # the common input dtype
    batch_first: bool
    sizes: tuple[int, int, int, int]  # T, B, I, H
    has_bias: bool
    placement: tuple[Any, bool] = (None, False)  # _arrays.cuda_placement of the forward's x
    cell: cells.Cell = cells.LSTM


# ----------------------------------------------------------------------------- checks


def _check_array(value, name: str):
    """The kind and dtype of an input, or a TypeError naming it."""
    kind = _arrays.array_kind(value, name)
    dtype = _arrays.array_dtype(value)
    if dtype is None or dtype.kind != "f":
        raise TypeError(
            f"{name} must hold floating-point numbers (float16, float32 or float64), "
            f"got dtype {_arrays.dtype_name(value)}"
        )
    # The byte order is storage, not the numbers: ">f4" and "<f4" are one dtype here,
    # and the arrays are made native on their way to a backend (_arrays.to_backend).
    return kind, dtype.newbyteorder("=")


def _check_shape(value, name: str, expected: tuple, meaning: str):
    shape = tuple(value.shape)
    if shape != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {shape}")


def _check_ndim(value, name: str, ndim: int, meaning: str):
    if len(value.shape) != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D {meaning}, got {len(value.shape)}-D with shape "
            f"{tuple(value.shape)}"
        )


def _check_together(values: dict):
    """The arrays named in ``values`` are all given or all None."""
    given = [n for n, v in values.items() if v is not None]
    if given and len(given) != len(values):
        missing = [n for n in values if n not in given]
        raise ValueError(
            f"{' and '.join(values)} go together: {', '.join(given)} was given without {', '.join(missing)}"
        )


def _check_flag(value, name: str):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _common(arrays: dict, what: str, required: tuple[str, ...]):
    """The single kind (library and device) and dtype shared by ``arrays`` (name ->
    array or None); the ``required`` ones may not be None."""
    kinds, dtypes = {}, {}
    for name, value in arrays.items():
        if value is not None or name in required:
            kinds[name], dtypes[name] = _check_array(value, name)
    devices = {k.device for k in kinds.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {k.device}" for n, k in kinds.items())
        raise ValueError(f"{what} must all be on one device, got {where}")
    # One library too: results come back as the inputs' kind, and a torch tensor that
    # requires grad mixed with NumPy arrays would silently lose its gradient.
    libraries = {k.library for k in kinds.values()}
    if len(libraries) > 1:
        which = ", ".join(f"{n}: {k.library}" for n, k in kinds.items())
        raise TypeError(f"{what} must all be one kind of array (one library), got {which}")
    if len(set(dtypes.values())) > 1:
        which = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"{what} must share one dtype, got {which}")
    first = next(iter(kinds))
    return kinds[first], dtypes[first]


def _resolve_backend(name, device: str, cell="lstm") -> Backend:
    if name == "auto":
        name = "cuda" if device == "cuda" else "cpu"
    return get_backend(name, cell)


def _check_backend_dtype(backend: Backend, dtype: np.dtype, cell: cells.Cell = cells.LSTM, device: str = "cpu"):
    if dtype.name not in backend.compute_dtypes:
        others = []
        for name in BACKENDS[1:]:
            impl = cell.implementation(name)
            if impl is not None and impl.device == device and dtype.name in impl.compute_dtypes:
                others.append(f"backend={name!r}")
        hint = f"; {' or '.join(others)} takes {dtype.name} {'arrays' if device == 'cpu' else 'device arrays'}" if others else ""
        raise TypeError(
            f"backend {backend.name!r} supports dtypes {', '.join(backend.compute_dtypes)}; "
            f"the inputs are {dtype.name}{hint}"
        )


def _check_weights(cell: cells.Cell, inputs: dict, input_size: int) -> int:
    """Checks w_ih, w_hh and the biases against ``cell``'s layout; returns H."""
    rows = cell.rows_layout
    _check_ndim(inputs["w_hh"], "w_hh", 2, f"[{rows}, H]")
    gate_rows, hidden = inputs["w_hh"].shape
    if gate_rows != cell.gates * hidden:
        raise ValueError(
            f"w_hh must have shape [{rows}, H] ({cell.describe_rows()}), got "
            f"{tuple(inputs['w_hh'].shape)}: {gate_rows} rows is not {cell.gates} x {hidden}"
        )
    _check_ndim(inputs["w_ih"], "w_ih", 2, f"[{rows}, I]")
    _check_shape(
        inputs["w_ih"], "w_ih", (cell.gates * hidden, input_size),
        f"[{rows}, I] with H from w_hh and I from x of shape {tuple(inputs['x'].shape)}",
    )
    for name in ("b_ih", "b_hh"):
        if inputs[name] is not None:
            _check_ndim(inputs[name], name, 1, f"[{rows}]")
            _check_shape(inputs[name], name, (cell.gates * hidden,), f"[{rows}]")
    return hidden


# ----------------------------------------------------------------------------- forward


def lstm_forward(
    x,
    w_ih,
    w_hh,
    b_ih=None,
    b_hh=None,
    h0=None,
    c0=None,
    *,
    batch_first=False,
    training=True,
    backend="auto",
) -> LSTMOutput:
    """One LSTM layer over a whole sequence.

    Shapes (``torch.nn.LSTM``'s, gate order i, f, g, o): ``x`` [T, B, I] ([B, T, I]
    with ``batch_first``), ``w_ih`` [4H, I], ``w_hh`` [4H, H], ``b_ih`` and ``b_hh``
    [4H] (both or neither), ``h0`` and ``c0`` [B, H] (both or neither; zeros when
    absent). All arrays share one floating dtype and one device.

    ``backend``: "reference" (NumPy, computes and returns float64), "cpu" (Numba;
    float32, float64), "cuda" (our CUDA kernels; float32), "emulated" (the CUDA
    kernels on the CPU emulator: slow, for debugging), or "auto" (cuda for device
    arrays, cpu otherwise). Results come back as the kind of array that came in.
    With ``training=True`` the output carries what :func:`lstm_backward` needs,
    including references to ``x`` and the weights (not copies): changing them in
    place before the backward changes its gradients. Torch tensors that require grad
    (with grad mode on) run through ``rnnkernels.torch``'s custom op instead, so that
    ``y``, ``h_n`` and ``c_n`` carry a ``grad_fn``; :func:`lstm_backward` on such an
    output recomputes the training forward first.
    """
    return cell_forward(
        cells.LSTM, x, w_ih, w_hh, b_ih, b_hh, _states(h0=h0, c0=c0),
        batch_first=batch_first, training=training, backend=backend,
    )


def gru_forward(
    x,
    w_ih,
    w_hh,
    b_ih=None,
    b_hh=None,
    h0=None,
    *,
    batch_first=False,
    training=True,
    backend="auto",
) -> GRUOutput:
    """One GRU layer over a whole sequence (``torch.nn.GRU``'s cell and layouts).

    Gate rows r, z, n: ``x`` [T, B, I] ([B, T, I] with ``batch_first``), ``w_ih``
    [3H, I], ``w_hh`` [3H, H], ``b_ih`` and ``b_hh`` [3H] (both or neither), ``h0``
    [B, H] (zeros when absent)::

        r = σ(W_ir x + b_ir + W_hr h + b_hr)     z = σ(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
        h' = (1 − z) ⊙ n + z ⊙ h

    Backends, dtypes, devices and torch tensors as for :func:`lstm_forward`; the
    equations are ``rnnkernels/gru_reference.py``'s.
    """
    return cell_forward(
        cells.GRU, x, w_ih, w_hh, b_ih, b_hh, _states(h0=h0),
        batch_first=batch_first, training=training, backend=backend,
    )


def rnn_forward(
    x,
    w_ih,
    w_hh,
    b_ih=None,
    b_hh=None,
    h0=None,
    *,
    nonlinearity="tanh",
    batch_first=False,
    training=True,
    backend="auto",
) -> RNNOutput:
    """One Elman RNN layer over a whole sequence (``torch.nn.RNN``'s cell and layouts):
    h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu (``nonlinearity``).

    ``x`` [T, B, I] ([B, T, I] with ``batch_first``), ``w_ih`` [H, I], ``w_hh`` [H, H],
    ``b_ih`` and ``b_hh`` [H] (both or neither), ``h0`` [B, H] (zeros when absent).
    Backends, dtypes, devices and torch tensors as for :func:`lstm_forward`; the
    equations are ``rnnkernels/rnn_reference.py``'s.
    """
    cell = cells.rnn(nonlinearity)
    return cell_forward(
        cell, x, w_ih, w_hh, b_ih, b_hh, _states(h0=h0),
        batch_first=batch_first, training=training, backend=backend,
    )


def _states(**named):
    """The initial states as cell_forward takes them: None when none was given, else
    the tuple (entries may be None: cell_forward names what is missing)."""
    return None if all(v is None for v in named.values()) else tuple(named.values())


def cell_forward(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, state0=None, *, batch_first=False, training=True,
                 backend="auto"):
    """One layer of ``cell`` (a ``cells.Cell`` or its name) over a whole sequence: the
    generic form of :func:`lstm_forward`, :func:`gru_forward` and :func:`rnn_forward`.
    ``state0`` is None (zeros) or a tuple with one array per ``cell.states`` (h0, or
    h0 and c0). Returns the cell's output (``LSTMOutput``, ``GRUOutput``,
    ``RNNOutput``), whose ``states`` is the tuple of final states."""
    cell = cells.get(cell)
    _check_flag(batch_first, "batch_first")
    _check_flag(training, "training")
    names = cell.state_inputs
    if state0 is None:
        state0 = (None,) * len(names)
    if not isinstance(state0, (tuple, list)) or len(state0) != len(names):
        raise TypeError(f"state0 must be None or a tuple ({', '.join(names)}) for the {cell.title}, got {state0!r:.80}")
    states = dict(zip(names, state0))
    inputs = {"x": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, **states}
    kind, dtype = _common(inputs, f"the inputs {', '.join(inputs)}", ("x", "w_ih", "w_hh"))
    _check_together({"b_ih": b_ih, "b_hh": b_hh})
    _check_together(states)

    _check_ndim(x, "x", 3, "[B, T, I] (batch_first)" if batch_first else "[T, B, I]")
    if batch_first:
        batch, steps, input_size = x.shape
    else:
        steps, batch, input_size = x.shape
    hidden = _check_weights(cell, inputs, input_size)
    for name, value in states.items():
        if value is not None:
            _check_ndim(value, name, 2, "[B, H]")
            _check_shape(value, name, (batch, hidden), "[B, H]")

    impl = _resolve_backend(backend, kind.device, cell)
    _check_backend_dtype(impl, dtype, cell, kind.device)
    dev = impl.device
    if dev == "cpu" and kind.device == "cuda":
        raise ValueError(
            f"x is a CUDA array ({kind.library}), but backend {impl.name!r} runs on host (CPU) "
            "arrays; use backend='cuda' (or 'auto'), or copy the inputs to the host"
        )
    out_dtype = np.dtype(np.float64) if impl.name == "reference" else dtype

    if kind.library == "torch" and _torch_needs_op(inputs):
        return _forward_with_autograd(cell, inputs, batch_first, training, impl, out_dtype)

    xp = np if dev == "cpu" else _arrays.import_cupy()

    # CUDA work runs on the GPU holding x and, for torch tensors, on torch's current
    # stream (see _arrays.cuda_scope); host backends need no scope.
    placement = _arrays.cuda_placement(x) if dev == "cuda" else (None, False)
    with _arrays.cuda_scope(*placement):
        x_b = _arrays.to_backend(x, dev)
        if batch_first:
            x_b = xp.ascontiguousarray(x_b.transpose(1, 0, 2))
        w_ih_b, w_hh_b = _arrays.to_backend(w_ih, dev), _arrays.to_backend(w_hh, dev)
        bias = None
        if b_ih is not None:
            # Folded (cells.py) in the precision the backend computes in: float64 for
            # the reference, which promises float64 math, and float32 at least (float16
            # problems do float32 math: a float16 sum would round the bias first).
            bias_dtype = np.result_type(out_dtype, np.float32)
            bias = cell.fold_bias(
                _arrays.to_backend(b_ih, dev).astype(bias_dtype, copy=False),
                _arrays.to_backend(b_hh, dev).astype(bias_dtype, copy=False),
                xp,
            )
        if state0[0] is None:
            state0_b = tuple(xp.zeros((batch, hidden), dtype) for _ in names)
        else:
            state0_b = tuple(_arrays.to_backend(s, dev) for s in state0)

        if steps == 0 or batch == 0:
            y = xp.zeros((steps, batch, hidden), out_dtype)
            state_n, saved = tuple(s.astype(out_dtype) for s in state0_b), None
        else:
            y, *state_n, saved = impl.forward(x_b, w_ih_b, w_hh_b, bias, *state0_b, training)
        if batch_first:
            y = xp.ascontiguousarray(y.transpose(1, 0, 2))

        ctx = None
        if training:
            ctx = _Context(
                impl, saved, kind, dtype, batch_first, (steps, batch, input_size, hidden), bias is not None, placement,
                cell,
            )
        to_user = lambda a: _arrays.from_backend(a, kind)  # noqa: E731
        return _make_output(cell, to_user(y), tuple(map(to_user, state_n)), training, impl.name, ctx)


def _torch_needs_op(inputs: dict) -> bool:
    """Whether torch inputs must go through the custom op: some require grad (with
    grad mode on), or torch.func transforms them (vmap's batched tensors have no
    storage to hand a backend; the op has batching rules)."""
    import torch

    present = [v for v in inputs.values() if v is not None]
    if torch.is_grad_enabled() and any(v.requires_grad for v in present):
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(v) for v in present)


@dataclass
class _Recompute:
    """The context of an output made through autograd (torch inputs that require
    grad): the inputs, detached, and how to run the forward again. The backward
    functions recompute the training forward from them, as the custom op's own backward
    does, so that such an output costs nothing extra unless a backward is called."""

    cell: cells.Cell
    inputs: dict
    batch_first: bool
    backend: str


def _forward_with_autograd(cell: cells.Cell, inputs: dict, batch_first: bool, training: bool, impl: Backend,
                           out_dtype):
    """Torch tensors that require grad: run through ``rnnkernels.torch``'s custom op
    for the cell, so that the outputs carry a ``grad_fn`` and ``loss.backward()`` (or
    torch.func) reaches the inputs."""
    import torch

    from .torch import _ops

    # The op returns its input dtype; the reference promises float64 math and output,
    # so it gets float64 inputs (autograd casts the gradients back).
    target = torch.float64 if out_dtype == np.float64 else inputs["x"].dtype
    args = {k: None if v is None else v.to(target) for k, v in inputs.items()}
    x_t = args["x"].transpose(0, 1) if batch_first else args["x"]
    batch, hidden = x_t.shape[1], args["w_hh"].shape[1]
    state0 = tuple(args[n] for n in cell.state_inputs)
    if state0[0] is None:
        state0 = tuple(x_t.new_zeros((batch, hidden)) for _ in state0)
    y, *state_n = _ops.cell_layer_autograd(
        cell.name, x_t, args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"], state0, None, False, impl.name
    )
    if batch_first:
        y = y.transpose(0, 1).contiguous()
    ctx = None
    if training:
        detached = {k: None if v is None else v.detach() for k, v in inputs.items()}
        ctx = _Recompute(cell, detached, batch_first, impl.name)
    return _make_output(cell, y, tuple(state_n), training, impl.name, ctx)


# ----------------------------------------------------------------------------- backward


def lstm_backward(out: LSTMOutput, dy=None, dh_n=None, dc_n=None, *, return_step_norms=False) -> LSTMGrads:
    """Backpropagation through time for an output of :func:`lstm_forward`.

    ``dy`` is shaped like ``out.y``, ``dh_n`` and ``dc_n`` like ``out.h_n``; a missing
    one means zero. They share the forward's device and its input or output dtype.
    Returns an :class:`LSTMGrads` of arrays of the kind the forward was given.
    """
    _check_output(out, LSTMOutput, "lstm_forward")
    return cell_backward(out, dy, (dh_n, dc_n), return_step_norms=return_step_norms)


def gru_backward(out: GRUOutput, dy=None, dh_n=None, *, return_step_norms=False) -> GRUGrads:
    """Backpropagation through time for an output of :func:`gru_forward`: ``dy`` shaped
    like ``out.y``, ``dh_n`` like ``out.h_n`` (missing: zero). Returns a
    :class:`GRUGrads` of arrays of the kind the forward was given."""
    _check_output(out, GRUOutput, "gru_forward")
    return cell_backward(out, dy, (dh_n,), return_step_norms=return_step_norms)


def rnn_backward(out: RNNOutput, dy=None, dh_n=None, *, return_step_norms=False) -> RNNGrads:
    """Backpropagation through time for an output of :func:`rnn_forward`: ``dy`` shaped
    like ``out.y``, ``dh_n`` like ``out.h_n`` (missing: zero). Returns an
    :class:`RNNGrads` of arrays of the kind the forward was given."""
    _check_output(out, RNNOutput, "rnn_forward")
    return cell_backward(out, dy, (dh_n,), return_step_norms=return_step_norms)


def _check_output(out, expected: type, made_by: str):
    if not isinstance(out, expected):
        raise TypeError(f"out must be the {expected.__name__} that {made_by} returned, got {type(out).__name__}")


def cell_backward(out, dy=None, dstates=None, *, return_step_norms=False):
    """Backpropagation through time for an output of :func:`cell_forward` (or of the
    public forwards): the generic form of the backward functions. ``dstates`` is None
    or a tuple like ``out.states`` whose entries may be None (zero)."""
    if not isinstance(out, _OUTPUT_TYPES):
        raise TypeError(f"out must be the output of a forward function (LSTMOutput, GRUOutput, RNNOutput), got "
                        f"{type(out).__name__}")
    _check_flag(return_step_norms, "return_step_norms")
    cell = out.cell
    forward_name = {"lstm": "lstm_forward", "gru": "gru_forward"}.get(cell.name, "rnn_forward")
    if not out.training or out._ctx is None:
        raise ValueError(
            f"{forward_name.replace('forward', 'backward')} needs an output made with {forward_name}(..., "
            "training=True); this one was made with training=False, so nothing was saved for backward"
        )
    names = cell.state_outputs
    if dstates is None:
        dstates = (None,) * len(names)
    if not isinstance(dstates, (tuple, list)) or len(dstates) != len(names):
        raise TypeError(f"dstates must be None or a tuple ({', '.join('d' + n for n in names)}), got {dstates!r:.80}")
    ctx = out._ctx
    if isinstance(ctx, _Recompute):
        state0 = tuple(ctx.inputs[n] for n in cell.state_inputs)
        ctx = cell_forward(
            cell, ctx.inputs["x"], ctx.inputs["w_ih"], ctx.inputs["w_hh"], ctx.inputs["b_ih"], ctx.inputs["b_hh"],
            None if state0[0] is None else state0, batch_first=ctx.batch_first, training=True, backend=ctx.backend,
        )._ctx
        if isinstance(ctx, _Recompute):
            raise ValueError(
                f"{forward_name.replace('forward', 'backward')} cannot run on tensors inside torch.func transforms "
                f"(vmap, grad); differentiate {forward_name}'s outputs with torch.func.grad or torch.func.vjp instead"
            )
    steps, batch, input_size, hidden = ctx.sizes
    impl = ctx.backend
    dev = impl.device
    xp = np if dev == "cpu" else _arrays.import_cupy()
    out_dtype = np.dtype(np.float64) if impl.name == "reference" else ctx.dtype
    allowed = {ctx.dtype, out_dtype}

    # The forward's GPU and, for torch tensors, torch's current stream now.
    with _arrays.cuda_scope(*ctx.placement):
        y_shape = (batch, steps, hidden) if ctx.batch_first else (steps, batch, hidden)
        upstream = {"dy": (dy, y_shape, "like out.y")}
        upstream.update({"d" + n: (v, (batch, hidden), "[B, H]") for n, v in zip(names, dstates)})
        converted = {}
        for name, (value, shape, meaning) in upstream.items():
            if value is None:
                converted[name] = xp.zeros((steps, batch, hidden) if name == "dy" else shape, out_dtype)
                continue
            kind, dtype = _check_array(value, name)
            if kind.device != ctx.kind.device:
                raise ValueError(f"{name} is on {kind.device} but the forward ran on {ctx.kind.device} arrays")
            if kind.library != ctx.kind.library:
                raise TypeError(f"{name} is a {kind.library} array but the forward ran on {ctx.kind.library} arrays")
            if dtype not in allowed:
                raise TypeError(f"{name} must have dtype {' or '.join(sorted(d.name for d in allowed))}, got {dtype}")
            _check_ndim(value, name, len(shape), meaning)
            _check_shape(value, name, shape, meaning)
            arr = _arrays.to_backend(value, dev).astype(out_dtype, copy=False)
            if name == "dy" and ctx.batch_first:
                arr = xp.ascontiguousarray(arr.transpose(1, 0, 2))
            converted[name] = arr
        dstates_b = [converted["d" + n] for n in names]

        if steps == 0 or batch == 0:
            dx = xp.zeros((steps, batch, input_size), out_dtype)
            dw_ih = xp.zeros((cell.gates * hidden, input_size), out_dtype)
            dw_hh = xp.zeros((cell.gates * hidden, hidden), out_dtype)
            db = xp.zeros(cell.bias_rows * hidden, out_dtype) if ctx.has_bias else None
            dstate0 = [d.copy() for d in dstates_b]  # never the caller's arrays
            norms = [np.zeros(steps) for _ in names]
        else:
            args = (ctx.saved, converted["dy"], *dstates_b)
            results = impl.backward(*args, return_step_norms=True) if return_step_norms else impl.backward(*args)
            dx, dw_ih, dw_hh, db = results[:4]
            dstate0 = results[4 : 4 + len(names)]
            norms = results[4 + len(names) :]
        if ctx.batch_first:
            dx = xp.ascontiguousarray(dx.transpose(1, 0, 2))

        to_user = lambda a: None if a is None else _arrays.from_backend(a, ctx.kind)  # noqa: E731
        db_ih, db_hh = (None, None) if db is None else cell.unfold_grad(db, xp)
        grads = _make_grads(
            cell, to_user(dx), to_user(dw_ih), to_user(dw_hh), to_user(db_ih), to_user(db_hh), map(to_user, dstate0)
        )
        if return_step_norms:
            for state, norm in zip(cell.states, norms):  # dh_norms (and dc_norms)
                setattr(grads, f"d{state}_norms", np.asarray(_to_host(norm), dtype=np.float64))
        return grads


def _to_host(a):
    return a if isinstance(a, np.ndarray) else _arrays.import_cupy().asnumpy(a)
