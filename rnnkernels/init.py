r"""Weight initializers for recurrent layers, seeded and reproducible across devices.

Every initializer draws on the host in float64 from a ``numpy.random.Generator`` (give
one, or an integer seed, or None for fresh entropy), then casts and, when asked, moves
the result to the device. The same seed therefore gives the same numbers on NumPy,
CuPy and PyTorch. Where the array goes::

    like=arr    the kind, device and dtype of ``arr`` (NumPy, CuPy or a torch tensor)
    xp=cupy     a CuPy array on the current device (xp=numpy, the default: NumPy)
    dtype=...   overrides the dtype (default: ``like``'s, else float32)

Shapes follow ``torch.nn``: a weight matrix is [fan_out, fan_in] (rows produce outputs,
columns read inputs); beyond two dimensions the trailing ones count as a receptive
field in both fans. An LSTM in this package uses torch's layout and gate order::

    w_ih [4H, I]   w_hh [4H, H]   b_ih, b_hh [4H]    row blocks i (0:H), f (H:2H),
                                                       g (2H:3H), o (3H:4H)

The two biases are only ever used summed, so a forget-gate bias belongs in one of them:
:func:`forget_bias` sets one vector, and :func:`lstm_parameters` puts it in ``b_ih``
and zeroes the forget block of ``b_hh``.

Variances, with n_in, n_out the fans::

    xavier_uniform   U(±a), a = gain·√(6 / (n_in + n_out))   Var = gain²·2/(n_in + n_out)
    xavier_normal    N(0, gain²·2/(n_in + n_out))
    kaiming_uniform  U(±gain·√(3 / n))                        Var = gain²/n, n = n_in or n_out
    kaiming_normal   N(0, gain²/n)
    lecun_normal     N(0, gain²/n_in)
    orthogonal       gain · Q with QᵀQ = I (or QQᵀ = I when wide), per row block if asked
    pytorch_default  U(±1/√H) for every LSTM/RNN weight and bias    Var = 1/(3H)
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from . import _arrays

__all__ = [
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "lecun_normal",
    "orthogonal",
    "pytorch_default",
    "recommended_gain",
    "forget_bias",
    "lstm_parameters",
    "rnn_parameters",
    "SCHEMES",
]


# ----------------------------------------------------------------------------- plumbing


def _shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        shape = tuple(int(n) for n in shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(n < 0 for n in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    return shape


def _fans(shape: tuple[int, ...], what: str) -> tuple[int, int]:
    """(fan_in, fan_out) of a [fan_out, fan_in, *receptive_field] weight."""
    if len(shape) < 2:
        raise ValueError(
            f"{what} needs a weight of at least 2 dimensions [fan_out, fan_in], got shape "
            f"{shape}: fan in and fan out are undefined for a vector (initialize biases "
            "with zeros, pytorch_default or forget_bias)"
        )
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _rng(rng) -> np.random.Generator:
    """A Generator from a Generator (used as is), an int seed or None."""
    if isinstance(rng, np.random.RandomState):
        raise TypeError("rng must be a numpy.random.Generator or an int seed, not the legacy RandomState")
    return np.random.default_rng(rng)


def _deliver(values: np.ndarray, dtype, like, xp):
    """``values`` (host float64) cast to the dtype and moved to where the caller asked."""
    if like is not None and xp is not None:
        raise ValueError("give like= or xp=, not both")
    if like is not None:
        kind = _arrays.array_kind(like, "like")
        if kind.library == "torch":
            torch = sys.modules["torch"]
            host = torch.from_numpy(values if dtype is None else values.astype(np.dtype(dtype)))
            return host.to(device=like.device, dtype=like.dtype if dtype is None else host.dtype)
        if dtype is None:
            dtype = _arrays.array_dtype(like)
            if dtype is None or dtype.kind != "f":
                raise TypeError(f"like has dtype {_arrays.dtype_name(like)}; pass a floating dtype=")
        host = values.astype(np.dtype(dtype))
        if kind.library == "cupy":
            with like.device:
                return _arrays.import_cupy().asarray(host)
        return _arrays.from_backend(host, kind)
    host = values.astype(np.dtype(np.float32 if dtype is None else dtype))
    name = getattr(xp, "__name__", xp)
    if xp is None or name == "numpy":
        return host
    if name == "cupy":
        return _arrays.import_cupy().asarray(host)
    raise ValueError(f"xp must be numpy or cupy (the module or its name), got {xp!r}")


def _check_gain(gain) -> float:
    gain = float(gain)
    if not math.isfinite(gain) or gain < 0:
        raise ValueError(f"gain must be a finite number >= 0, got {gain}")
    return gain


def recommended_gain(nonlinearity: str, negative_slope: float = 0.01) -> float:
    """The gain that keeps the activation variance of a layer followed by
    ``nonlinearity`` near constant: 1 for "linear" and "sigmoid", 5/3 for "tanh", √2
    for "relu" (He et al. 2015), √(2 / (1 + slope²)) for "leaky_relu"."""
    table = {"linear": 1.0, "identity": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3.0, "relu": math.sqrt(2.0)}
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + float(negative_slope) ** 2))
    if nonlinearity not in table:
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected one of {sorted(table) + ['leaky_relu']}")
    return table[nonlinearity]


# ----------------------------------------------------------------------------- initializers


def xavier_uniform(shape, gain=1.0, *, rng=None, dtype=None, like=None, xp=None):
    """U(−a, a) with a = gain·√(6 / (fan_in + fan_out)): variance gain²·2/(fan_in + fan_out).

    Glorot & Bengio (2010), "Understanding the difficulty of training deep feedforward
    neural networks", AISTATS: the compromise between keeping forward activations and
    backward gradients at constant variance ("normalized initialization", their eq. 16).
    Keras's ``glorot_uniform``, the default LSTM kernel there."""
    shape = _shape(shape)
    fan_in, fan_out = _fans(shape, "xavier_uniform")
    gain = _check_gain(gain)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out)) if fan_in + fan_out else 0.0
    return _deliver(_rng(rng).uniform(-bound, bound, shape), dtype, like, xp)


def xavier_normal(shape, gain=1.0, *, rng=None, dtype=None, like=None, xp=None):
    """N(0, σ²) with σ = gain·√(2 / (fan_in + fan_out)); Glorot & Bengio (2010), the
    same variance as :func:`xavier_uniform` from a Gaussian."""
    shape = _shape(shape)
    fan_in, fan_out = _fans(shape, "xavier_normal")
    gain = _check_gain(gain)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out)) if fan_in + fan_out else 0.0
    return _deliver(_rng(rng).normal(0.0, std, shape), dtype, like, xp)


def _kaiming_fan(shape, mode: str, what: str) -> int:
    fan_in, fan_out = _fans(shape, what)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    return fan_in if mode == "fan_in" else fan_out


def kaiming_uniform(shape, gain=math.sqrt(2.0), mode="fan_in", *, rng=None, dtype=None, like=None, xp=None):
    """U(±gain·√(3 / n)), n the fan of ``mode``: variance gain²/n (2/n for ReLU).

    He, Zhang, Ren & Sun (2015), "Delving Deep into Rectifiers: Surpassing Human-Level
    Performance on ImageNet Classification", ICCV: a ReLU halves the second moment, so
    Var(w) = 2/n_in keeps it constant through the layers (``mode="fan_in"``), or keeps
    the backward gradients constant with ``mode="fan_out"``. For other nonlinearities
    pass ``gain=recommended_gain(...)``."""
    shape = _shape(shape)
    fan = _kaiming_fan(shape, mode, "kaiming_uniform")
    gain = _check_gain(gain)
    bound = gain * math.sqrt(3.0 / fan) if fan else 0.0
    return _deliver(_rng(rng).uniform(-bound, bound, shape), dtype, like, xp)


def kaiming_normal(shape, gain=math.sqrt(2.0), mode="fan_in", *, rng=None, dtype=None, like=None, xp=None):
    """N(0, gain²/n), n the fan of ``mode``; He et al. (2015), see :func:`kaiming_uniform`."""
    shape = _shape(shape)
    fan = _kaiming_fan(shape, mode, "kaiming_normal")
    gain = _check_gain(gain)
    std = gain / math.sqrt(fan) if fan else 0.0
    return _deliver(_rng(rng).normal(0.0, std, shape), dtype, like, xp)


def lecun_normal(shape, gain=1.0, *, rng=None, dtype=None, like=None, xp=None):
    """N(0, gain²/fan_in) (untruncated).

    LeCun, Bottou, Orr & Müller (1998), "Efficient BackProp", in Neural Networks:
    Tricks of the Trade: weights with standard deviation 1/√fan_in keep a unit's input
    of unit variance when its inputs have unit variance (section 4.6)."""
    shape = _shape(shape)
    fan_in, _ = _fans(shape, "lecun_normal")
    gain = _check_gain(gain)
    std = gain / math.sqrt(fan_in) if fan_in else 0.0
    return _deliver(_rng(rng).normal(0.0, std, shape), dtype, like, xp)


def _haar_orthogonal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A [rows, cols] matrix with orthonormal columns (tall) or rows (wide), uniformly
    (Haar) distributed: QR of a Gaussian with the signs of R's diagonal moved into Q
    (Mezzadri 2007, "How to generate random matrices from the classical compact groups")."""
    tall, small = max(rows, cols), min(rows, cols)
    q, r = np.linalg.qr(rng.standard_normal((tall, small)))
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    q *= signs
    return q if rows >= cols else q.T


def orthogonal(shape, gain=1.0, blocks=1, *, rng=None, dtype=None, like=None, xp=None):
    """gain·Q with Q (semi-)orthogonal, drawn uniformly from the orthogonal group.

    Saxe, McClelland & Ganguli (2014), "Exact solutions to the nonlinear dynamics of
    learning in deep linear neural networks", ICLR: with all singular values equal to
    one, a product of such matrices neither shrinks nor grows a vector, so gradients
    keep their norm across depth, or across time steps in a recurrence.

    The shape is viewed as [shape[0], prod(shape[1:])]. ``blocks`` splits the rows into
    that many equal blocks, each drawn independently: for an LSTM's w_hh [4H, H] use
    ``blocks=4`` so that every gate's H×H recurrent matrix is orthogonal on its own
    (one draw over the whole [4H, H] only makes the columns orthonormal, leaving each
    gate block with singular values near 1/2)."""
    shape = _shape(shape)
    _fans(shape, "orthogonal")
    gain = _check_gain(gain)
    if not isinstance(blocks, (int, np.integer)) or blocks < 1 or shape[0] % blocks:
        raise ValueError(f"blocks must be a positive int dividing the {shape[0]} rows, got {blocks!r}")
    rows, cols = shape[0] // blocks, math.prod(shape[1:])
    generator = _rng(rng)
    if rows == 0 or cols == 0:
        values = np.zeros(shape)
    else:
        values = np.concatenate([_haar_orthogonal(rows, cols, generator) for _ in range(blocks)])
    return _deliver(gain * values.reshape(shape), dtype, like, xp)


def pytorch_default(shape, hidden_size, *, rng=None, dtype=None, like=None, xp=None):
    """U(±1/√H) with H = ``hidden_size``, for weights and biases alike: variance 1/(3H).

    What ``torch.nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` do in ``reset_parameters``; not
    from a paper of its own, it is the 1/√fan_in scale of LeCun et al. (1998),
    "Efficient BackProp", with H standing in for the fan-in of every matrix."""
    shape = _shape(shape)
    if not isinstance(hidden_size, (int, np.integer)) or hidden_size < 1:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    bound = 1.0 / math.sqrt(hidden_size)
    return _deliver(_rng(rng).uniform(-bound, bound, shape), dtype, like, xp)


def forget_bias(b, value=1.0):
    """Set the forget-gate block b[H:2H] of one LSTM bias vector ``b`` [4H] to
    ``value``, in place (NumPy, CuPy or torch); returns ``b``.

    Gers, Schmidhuber & Cummins (2000), "Learning to Forget: Continual Prediction with
    LSTM", introduced the forget gate and started its bias positive so the cell
    remembers by default; Jozefowicz, Zaremba & Sutskever (2015), "An Empirical
    Exploration of Recurrent Network Architectures", ICML, found a forget bias of 1
    closes most of the gap between the LSTM and the best architectures they searched.

    The layer adds b_ih and b_hh, so call this on ONE of them: setting both to 1 gives
    an effective forget bias of 2. :func:`lstm_parameters` puts it in b_ih and zeroes the
    forget block of b_hh."""
    shape = tuple(getattr(b, "shape", ()))
    if len(shape) != 1 or shape[0] % 4 or shape[0] == 0:
        raise ValueError(f"forget_bias needs one LSTM bias vector of shape [4H], got shape {shape}")
    hidden = shape[0] // 4
    value = float(value)
    if _arrays._is_torch_tensor(b):
        with sys.modules["torch"].no_grad():
            b[hidden : 2 * hidden].fill_(value)
    else:
        b[hidden : 2 * hidden] = value
    return b


_set_forget_bias = forget_bias  # lstm_parameters has an argument of that name

# ----------------------------------------------------------------------------- parameter sets

SCHEMES = (
    "pytorch_default",
    "keras_default",
    "orthogonal",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "lecun_normal",
)
"""Schemes for :func:`lstm_parameters` and :func:`rnn_parameters`."""

_MATRIX_INIT = {
    "xavier_uniform": xavier_uniform,
    "xavier_normal": xavier_normal,
    "kaiming_uniform": kaiming_uniform,
    "kaiming_normal": kaiming_normal,
    "lecun_normal": lecun_normal,
}


def _parameters(gates, input_size, hidden_size, scheme, rng, dtype, like, xp, recurrent_gain):
    """Host float64 w_ih [gH, I], w_hh [gH, H], b_ih, b_hh [gH] for ``gates`` gate blocks."""
    for name, size in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    rows = gates * hidden_size
    host = {"dtype": np.float64}
    generator = _rng(rng)
    if scheme == "pytorch_default":
        draw = lambda *shape: pytorch_default(shape, hidden_size, rng=generator, **host)  # noqa: E731
        params = {"w_ih": draw(rows, input_size), "w_hh": draw(rows, hidden_size),
                  "b_ih": draw(rows), "b_hh": draw(rows)}
    else:
        if scheme in ("keras_default", "orthogonal"):
            w_ih = xavier_uniform((rows, input_size), rng=generator, **host)
            # keras: one orthogonal draw over the whole recurrent kernel; ours: per gate.
            blocks = 1 if scheme == "keras_default" else gates
            w_hh = orthogonal((rows, hidden_size), recurrent_gain, blocks, rng=generator, **host)
        else:
            w_ih = _MATRIX_INIT[scheme]((rows, input_size), rng=generator, **host)
            w_hh = _MATRIX_INIT[scheme]((rows, hidden_size), rng=generator, **host)
            w_hh *= recurrent_gain
        params = {"w_ih": w_ih, "w_hh": w_hh, "b_ih": np.zeros(rows), "b_hh": np.zeros(rows)}
    return {name: _deliver(value, dtype, like, xp) for name, value in params.items()}


def lstm_parameters(
    input_size,
    hidden_size,
    scheme="pytorch_default",
    *,
    forget_bias=None,
    recurrent_gain=1.0,
    rng=None,
    dtype=None,
    like=None,
    xp=None,
) -> dict[str, Any]:
    """A full LSTM parameter set ``{"w_ih": [4H, I], "w_hh": [4H, H], "b_ih": [4H],
    "b_hh": [4H]}`` in torch's layout, ready for ``lstm_forward(x, **params)``.

    Schemes:

    * ``"pytorch_default"``: every array U(±1/√H), torch.nn.LSTM's own.
    * ``"keras_default"``: Keras's LSTM: Glorot-uniform kernel w_ih, an orthogonal
      recurrent kernel (one draw over the whole [4H, H], as Keras does), zero biases and
      a unit forget bias (``unit_forget_bias=True``); ``forget_bias`` defaults to 1.
    * ``"orthogonal"``: Glorot-uniform w_ih, w_hh orthogonal per gate block (each H×H
      block orthogonal, Saxe et al. 2014), zero biases.
    * ``"xavier_uniform"``, ``"xavier_normal"``, ``"kaiming_uniform"``,
      ``"kaiming_normal"``, ``"lecun_normal"``: that initializer on w_ih and w_hh, each
      taken as one matrix (fan_out = 4H), zero biases.

    ``forget_bias``: when given, b_ih[H:2H] = value and b_hh[H:2H] = 0, so the gate sees
    exactly ``value``. ``recurrent_gain`` scales w_hh (not for pytorch_default).
    Draws come from ``rng`` in a fixed order (w_ih, w_hh, then biases)."""
    if scheme == "pytorch_default" and recurrent_gain != 1.0:
        raise ValueError("recurrent_gain applies to the other schemes; pytorch_default is U(±1/√H)")
    if forget_bias is None and scheme == "keras_default":
        forget_bias = 1.0
    params = _parameters(4, input_size, hidden_size, scheme, rng, dtype, like, xp, _check_gain(recurrent_gain))
    if forget_bias is not None:
        _set_forget_bias(params["b_ih"], forget_bias)
        _set_forget_bias(params["b_hh"], 0.0)
    return params


def rnn_parameters(
    input_size, hidden_size, scheme="pytorch_default", *, recurrent_gain=1.0, rng=None, dtype=None, like=None, xp=None
) -> dict[str, Any]:
    """The same schemes for a plain (tanh) RNN, torch.nn.RNN's layout: ``{"w_ih": [H, I],
    "w_hh": [H, H], "b_ih": [H], "b_hh": [H]}``. ``keras_default`` is Keras's SimpleRNN:
    Glorot kernel, orthogonal recurrent matrix, zero bias (no gate, no forget bias)."""
    if scheme == "pytorch_default" and recurrent_gain != 1.0:
        raise ValueError("recurrent_gain applies to the other schemes; pytorch_default is U(±1/√H)")
    return _parameters(1, input_size, hidden_size, scheme, rng, dtype, like, xp, _check_gain(recurrent_gain))
