"""``lstm_forward`` and ``lstm_backward``: validation, layout, dispatch to a backend.

Everything a user can get wrong is checked here, once, for every backend: the array
types, dtypes, shapes, the pairing of biases and states, the backend name. Backends
(see ``_backend.py``) then see only well-formed, time-major, contiguous, non-empty
problems.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _arrays
from ._backend import Backend

# name -> module holding ``BACKEND``; imported on first use so that numba, CuPy and
# the emulator load only when asked for.
_BACKEND_MODULES = {
    "reference": "rnnkernels.reference",
    "cpu": "rnnkernels.cpu",
    "cuda": "rnnkernels.cuda",
    "emulated": "rnnkernels.emulated",
}
BACKENDS = ("auto",) + tuple(_BACKEND_MODULES)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (not "auto"); a clear error if unknown."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {BACKENDS}; got {type(name).__name__}")
    if name not in _BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    backend = importlib.import_module(_BACKEND_MODULES[name]).BACKEND
    backend.check_available()
    return backend


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
    return kind, dtype


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


def _check_pair(a, b, names: str):
    if (a is None) != (b is None):
        first, second = names.split(" and ")
        given, missing = (first, second) if b is None else (second, first)
        raise ValueError(f"{names} go together: {given} was given without {missing}")


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


def _resolve_backend(name, device: str) -> Backend:
    if name == "auto":
        name = "cuda" if device == "cuda" else "cpu"
    return get_backend(name)


def _check_backend_dtype(backend: Backend, dtype: np.dtype):
    if dtype.name not in backend.compute_dtypes:
        raise TypeError(
            f"backend {backend.name!r} supports dtypes {', '.join(backend.compute_dtypes)}; "
            f"the inputs are {dtype.name}"
        )


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
    _check_flag(batch_first, "batch_first")
    _check_flag(training, "training")
    inputs = {"x": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "h0": h0, "c0": c0}
    kind, dtype = _common(inputs, "the inputs x, w_ih, w_hh, b_ih, b_hh, h0, c0", ("x", "w_ih", "w_hh"))
    _check_pair(b_ih, b_hh, "b_ih and b_hh")
    _check_pair(h0, c0, "h0 and c0")

    _check_ndim(x, "x", 3, "[B, T, I] (batch_first)" if batch_first else "[T, B, I]")
    if batch_first:
        batch, steps, input_size = x.shape
    else:
        steps, batch, input_size = x.shape
    _check_ndim(w_hh, "w_hh", 2, "[4H, H]")
    gate_rows, hidden = w_hh.shape
    if gate_rows != 4 * hidden:
        raise ValueError(
            f"w_hh must have shape [4H, H] (gate rows i, f, g, o stacked), got "
            f"{tuple(w_hh.shape)}: {gate_rows} rows is not 4 x {hidden}"
        )
    _check_ndim(w_ih, "w_ih", 2, "[4H, I]")
    _check_shape(
        w_ih, "w_ih", (4 * hidden, input_size), f"[4H, I] with H from w_hh and I from x of shape {tuple(x.shape)}"
    )
    for name in ("b_ih", "b_hh"):
        if inputs[name] is not None:
            _check_ndim(inputs[name], name, 1, "[4H]")
            _check_shape(inputs[name], name, (4 * hidden,), "[4H]")
    for name in ("h0", "c0"):
        if inputs[name] is not None:
            _check_ndim(inputs[name], name, 2, "[B, H]")
            _check_shape(inputs[name], name, (batch, hidden), "[B, H]")

    impl = _resolve_backend(backend, kind.device)
    _check_backend_dtype(impl, dtype)
    dev = impl.device
    if dev == "cpu" and kind.device == "cuda":
        raise ValueError(
            f"x is a CUDA array ({kind.library}), but backend {impl.name!r} runs on host (CPU) "
            "arrays; use backend='cuda' (or 'auto'), or copy the inputs to the host"
        )
    out_dtype = np.dtype(np.float64) if impl.name == "reference" else dtype

    if kind.library == "torch" and _torch_needs_op(inputs):
        return _forward_with_autograd(inputs, batch_first, training, impl, out_dtype)

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
            # Summed in the precision the backend computes in: float64 for the
            # reference, which promises float64 math, and float32 at least (float16
            # problems do float32 math: a float16 sum would round the bias first).
            bias_dtype = np.result_type(out_dtype, np.float32)
            bias = _arrays.to_backend(b_ih, dev).astype(bias_dtype, copy=False) + _arrays.to_backend(
                b_hh, dev
            ).astype(bias_dtype, copy=False)
        if h0 is None:
            h0_b = xp.zeros((batch, hidden), dtype)
            c0_b = xp.zeros((batch, hidden), dtype)
        else:
            h0_b, c0_b = _arrays.to_backend(h0, dev), _arrays.to_backend(c0, dev)

        if steps == 0 or batch == 0:
            y = xp.zeros((steps, batch, hidden), out_dtype)
            h_n, c_n, saved = h0_b.astype(out_dtype), c0_b.astype(out_dtype), None
        else:
            y, h_n, c_n, saved = impl.forward(x_b, w_ih_b, w_hh_b, bias, h0_b, c0_b, training)
        if batch_first:
            y = xp.ascontiguousarray(y.transpose(1, 0, 2))

        ctx = None
        if training:
            ctx = _Context(
                impl, saved, kind, dtype, batch_first, (steps, batch, input_size, hidden), bias is not None, placement
            )
        return LSTMOutput(
            y=_arrays.from_backend(y, kind),
            h_n=_arrays.from_backend(h_n, kind),
            c_n=_arrays.from_backend(c_n, kind),
            training=training,
            backend=impl.name,
            _ctx=ctx,
        )


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
    grad): the inputs, detached, and how to run the forward again. ``lstm_backward``
    recomputes the training forward from them, as the custom op's own backward does,
    so that such an output costs nothing extra unless ``lstm_backward`` is called."""

    inputs: dict
    batch_first: bool
    backend: str


def _forward_with_autograd(inputs: dict, batch_first: bool, training: bool, impl: Backend, out_dtype):
    """Torch tensors that require grad: run through ``rnnkernels::lstm_layer``, the
    custom op behind ``rnnkernels.torch.LSTM``, so that ``y``, ``h_n`` and ``c_n``
    carry a ``grad_fn`` and ``loss.backward()`` (or torch.func) reaches the inputs."""
    import torch

    from .torch._ops import lstm_layer_autograd

    # The op returns its input dtype; the reference promises float64 math and output,
    # so it gets float64 inputs (autograd casts the gradients back).
    target = torch.float64 if out_dtype == np.float64 else inputs["x"].dtype
    args = {k: None if v is None else v.to(target) for k, v in inputs.items()}
    x_t = args["x"].transpose(0, 1) if batch_first else args["x"]
    batch, hidden = x_t.shape[1], args["w_hh"].shape[1]
    h0, c0 = args["h0"], args["c0"]
    if h0 is None:
        h0 = c0 = x_t.new_zeros((batch, hidden))
    y, h_n, c_n = lstm_layer_autograd(
        x_t, args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"], h0, c0, None, False, impl.name
    )
    if batch_first:
        y = y.transpose(0, 1).contiguous()
    ctx = None
    if training:
        detached = {k: None if v is None else v.detach() for k, v in inputs.items()}
        ctx = _Recompute(detached, batch_first, impl.name)
    return LSTMOutput(y=y, h_n=h_n, c_n=c_n, training=training, backend=impl.name, _ctx=ctx)


# ----------------------------------------------------------------------------- backward


def lstm_backward(out: LSTMOutput, dy=None, dh_n=None, dc_n=None, *, return_step_norms=False) -> LSTMGrads:
    """Backpropagation through time for an output of :func:`lstm_forward`.

    ``dy`` is shaped like ``out.y``, ``dh_n`` and ``dc_n`` like ``out.h_n``; a missing
    one means zero. They share the forward's device and its input or output dtype.
    Returns an :class:`LSTMGrads` of arrays of the kind the forward was given.
    """
    if not isinstance(out, LSTMOutput):
        raise TypeError(f"out must be the LSTMOutput that lstm_forward returned, got {type(out).__name__}")
    _check_flag(return_step_norms, "return_step_norms")
    if not out.training or out._ctx is None:
        raise ValueError(
            "lstm_backward needs an output made with lstm_forward(..., training=True); "
            "this one was made with training=False, so nothing was saved for backward"
        )
    ctx = out._ctx
    if isinstance(ctx, _Recompute):
        ctx = lstm_forward(**ctx.inputs, batch_first=ctx.batch_first, training=True, backend=ctx.backend)._ctx
        if isinstance(ctx, _Recompute):
            raise ValueError(
                "lstm_backward cannot run on tensors inside torch.func transforms (vmap, grad); "
                "differentiate lstm_forward's outputs with torch.func.grad or torch.func.vjp instead"
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
        upstream = {"dy": (dy, y_shape, "like out.y"), "dh_n": (dh_n, (batch, hidden), "[B, H]"), "dc_n": (dc_n, (batch, hidden), "[B, H]")}
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

        if steps == 0 or batch == 0:
            dx = xp.zeros((steps, batch, input_size), out_dtype)
            dw_ih = xp.zeros((4 * hidden, input_size), out_dtype)
            dw_hh = xp.zeros((4 * hidden, hidden), out_dtype)
            db = xp.zeros(4 * hidden, out_dtype) if ctx.has_bias else None
            dh0, dc0 = converted["dh_n"].copy(), converted["dc_n"].copy()  # never the caller's arrays
            norms = (np.zeros(steps), np.zeros(steps))
        else:
            args = (ctx.saved, converted["dy"], converted["dh_n"], converted["dc_n"])
            if return_step_norms:
                dx, dw_ih, dw_hh, db, dh0, dc0, *norms = impl.backward(*args, return_step_norms=True)
            else:
                dx, dw_ih, dw_hh, db, dh0, dc0 = impl.backward(*args)
        if ctx.batch_first:
            dx = xp.ascontiguousarray(dx.transpose(1, 0, 2))

        to_user = lambda a: _arrays.from_backend(a, ctx.kind)  # noqa: E731
        grads = LSTMGrads(
            dx=to_user(dx),
            dw_ih=to_user(dw_ih),
            dw_hh=to_user(dw_hh),
            db_ih=to_user(db),
            db_hh=None if db is None else to_user(db.copy()),
            dh0=to_user(dh0),
            dc0=to_user(dc0),
        )
        if return_step_norms:
            grads.dh_norms, grads.dc_norms = (np.asarray(_to_host(n), dtype=np.float64) for n in norms)
        return grads


def _to_host(a):
    return a if isinstance(a, np.ndarray) else _arrays.import_cupy().asnumpy(a)
