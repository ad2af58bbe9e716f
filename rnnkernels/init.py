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
field in both fans. The three cells use torch.nn's layouts and gate orders::

    LSTM  w_ih [4H, I]  w_hh [4H, H]  b_ih, b_hh [4H]   row blocks i, f, g, o
    GRU   w_ih [3H, I]  w_hh [3H, H]  b_ih, b_hh [3H]   row blocks r, z, n
    RNN   w_ih [H, I]   w_hh [H, H]   b_ih, b_hh [H]    one block (tanh or relu)

(block k is rows kH:(k+1)H). A gate's two biases are only ever used summed (the LSTM's
four, the GRU's r and z, the RNN's one; only the GRU's b_in and b_hn stay apart), so a
gate bias belongs in one of them: :func:`forget_bias` and :func:`update_bias` set one
vector, and :func:`lstm_parameters` / :func:`gru_parameters` put it in ``b_ih`` and
zero that block of ``b_hh``. :func:`cell_parameters` gives any cell by name.

Variances, with n_in, n_out the fans::

    xavier_uniform   U(±a), a = gain·√(6 / (n_in + n_out))   Var = gain²·2/(n_in + n_out)
    xavier_normal    N(0, gain²·2/(n_in + n_out))
    kaiming_uniform  U(±gain·√(3 / n))                        Var = gain²/n, n = n_in or n_out
    kaiming_normal   N(0, gain²/n)
    lecun_normal     N(0, gain²/n_in)
    orthogonal       gain · Q with QᵀQ = I (or QQᵀ = I when wide), per row block if asked
    identity         gain · I per row block (IRNN, Le et al. 2015)
    pytorch_default  U(±1/√H) for every LSTM/GRU/RNN weight and bias    Var = 1/(3H)
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from . import _arrays, cells

__all__ = [
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "lecun_normal",
    "orthogonal",
    "identity",
    "pytorch_default",
    "recommended_gain",
    "forget_bias",
    "update_bias",
    "chrono_bias",
    "lstm_parameters",
    "gru_parameters",
    "rnn_parameters",
    "cell_parameters",
    "SCHEMES",
    "CELL_SCHEMES",
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


def identity(shape, gain=1.0, blocks=1, *, dtype=None, like=None, xp=None):
    """gain·I in every one of ``blocks`` equal row blocks of a 2-D ``shape`` (a
    rectangular block gets ones on its main diagonal, as ``numpy.eye``). No draw: it
    takes no ``rng``.

    Le, Jaitly & Hinton (2015), "A Simple Way to Initialize Recurrent Networks of
    Rectified Linear Units", arXiv:1504.00941: a ReLU RNN whose W_hh starts as the
    identity (zero biases) copies its state forward unchanged while the inputs are
    quiet, so neither the state nor the backpropagated gradient shrinks or grows at the
    start (the "IRNN"); a scaled identity (gain < 1; 0.01 in their speech experiments,
    the "iRNN") forgets on purpose. :func:`rnn_parameters` ``scheme="irnn"`` is the whole
    recipe."""
    shape = _shape(shape)
    if len(shape) != 2:
        raise ValueError(f"identity needs a 2-D shape [rows, cols], got {shape}")
    gain = _check_gain(gain)
    if not isinstance(blocks, (int, np.integer)) or blocks < 1 or shape[0] % blocks:
        raise ValueError(f"blocks must be a positive int dividing the {shape[0]} rows, got {blocks!r}")
    block = np.eye(shape[0] // blocks, shape[1])
    return _deliver(gain * np.concatenate([block] * blocks), dtype, like, xp)


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


def _gate_block(b, gates: int, block: int, what: str, layout: str, hidden_size=None) -> tuple[int, int]:
    """(start, stop) of gate ``block`` in one bias vector ``b`` of ``gates`` blocks; with
    ``hidden_size``, ``b`` must be exactly [gates·hidden_size] (the length alone cannot
    tell an LSTM's [4H] from a GRU's [3H'] when both divide it)."""
    shape = tuple(getattr(b, "shape", ()))
    if len(shape) != 1 or shape[0] % gates or shape[0] == 0:
        raise ValueError(f"{what} needs one {layout} bias vector of shape [{gates}H], got shape {shape}")
    if hidden_size is not None and shape[0] != gates * hidden_size:
        raise ValueError(
            f"{what} needs one {layout} bias vector of shape [{gates}H] = ({gates * hidden_size},) for "
            f"hidden_size={hidden_size}, got shape {shape}"
        )
    hidden = shape[0] // gates
    return block * hidden, (block + 1) * hidden


def _write(b, start: int, stop: int, values) -> None:
    """b[start:stop] = values, in place, for NumPy, CuPy and torch (a Parameter too)."""
    if _arrays._is_torch_tensor(b):
        torch = sys.modules["torch"]
        with torch.no_grad():
            if np.ndim(values) == 0:
                b[start:stop].fill_(float(values))
            else:
                b[start:stop].copy_(torch.from_numpy(np.asarray(values, dtype=np.float64)))
    elif type(b).__module__.startswith("cupy") and np.ndim(values):
        b[start:stop] = _arrays.import_cupy().asarray(values)
    else:
        b[start:stop] = values


def forget_bias(b, value=1.0, *, hidden_size=None):
    """Set the forget-gate block b[H:2H] of one LSTM bias vector ``b`` [4H] to
    ``value``, in place (NumPy, CuPy or torch); returns ``b``.

    Gers, Schmidhuber & Cummins (2000), "Learning to Forget: Continual Prediction with
    LSTM", introduced the forget gate and started its bias positive so the cell
    remembers by default; Jozefowicz, Zaremba & Sutskever (2015), "An Empirical
    Exploration of Recurrent Network Architectures", ICML, found a forget bias of 1
    closes most of the gap between the LSTM and the best architectures they searched.

    The layer adds b_ih and b_hh, so call this on ONE of them: setting both to 1 gives
    an effective forget bias of 2. :func:`lstm_parameters` puts it in b_ih and zeroes the
    forget block of b_hh. Pass ``hidden_size`` to have ``b``'s length checked against it
    (a GRU's [3H'] bias whose length 4 divides is otherwise taken for an LSTM's)."""
    start, stop = _gate_block(b, 4, 1, "forget_bias", "LSTM", hidden_size)
    _write(b, start, stop, float(value))
    return b


def update_bias(b, value=1.0, *, hidden_size=None):
    """Set the update-gate block b[H:2H] (z, rows H:2H) of one GRU bias vector ``b``
    [3H] to ``value``, in place (NumPy, CuPy or torch); returns ``b``.

    The GRU's twin of the forget bias. In torch's GRU (and cuDNN's, and this package's)
    h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t−1}: z is the fraction of the old state KEPT
    (Cho et al. 2014's convention; Chung et al. 2014 write the same cell with z and
    1 − z swapped, so there the sign flips). A positive value starts z near σ(value):
    the state, and the gradient along z_t ⊙ h_{t−1}, decay by about that factor per
    step, a memory of about 1 / (1 − σ(value)) = 1 + e^value steps (σ(1) ≈ 0.73: about
    3.7 steps; with no bias z ≈ 1/2: 2 steps). Tallec & Ollivier (2018), "Can Recurrent
    Neural Networks Warp Time?", ICLR, make this gate-bias-as-time-scale argument for
    LSTMs and GRUs and derive :func:`chrono_bias` from it. Jozefowicz et al. (2015)
    tuned the LSTM's forget bias; they give no value for the GRU's update gate, so
    this function asks for one rather than assuming 1 is as good there.

    b_ih and b_hh are summed for the r and z gates (only the n gate keeps them apart),
    so call this on ONE of them; :func:`gru_parameters` puts it in b_ih and zeroes the
    z block of b_hh. The reset gate's bias has no such role: r scales W_hn h + b_hn
    inside the candidate, it does not carry the state. Pass ``hidden_size`` to have
    ``b``'s length checked against it (see :func:`forget_bias`)."""
    start, stop = _gate_block(b, 3, 1, "update_bias", "GRU", hidden_size)
    _write(b, start, stop, float(value))
    return b


def chrono_bias(b, max_steps, cell="lstm", *, hidden_size=None, rng=None):
    """Chrono initialization of one bias vector, in place (NumPy, CuPy or torch);
    returns ``b``. Tallec & Ollivier (2018), "Can Recurrent Neural Networks Warp
    Time?", ICLR ("chrono initialization"): a gate that keeps σ(β) of the state per step remembers
    for about 1 + e^β steps, so draw β = log(u), u ~ U[1, max_steps − 1], per unit:
    memory time scales spread over [2, max_steps], for dependencies up to
    ``max_steps`` long.

    * ``cell="lstm"`` (b [4H], i, f, g, o): forget block b_f = log(u) and input block
      b_i = −b_f, as in the paper.
    * ``cell="gru"`` (b [3H], r, z, n): update block b_z = log(u). In torch's
      convention z keeps the old state (see :func:`update_bias`), so b_z plays b_f's
      part; the input side is tied to it as 1 − z, with no bias of its own.

    The other blocks are left as they are. As with :func:`forget_bias`, call it on ONE
    of b_ih, b_hh and zero the same blocks of the other (they are summed), and pass
    ``hidden_size`` to have ``b``'s length checked against the cell."""
    if cell not in ("lstm", "gru"):
        raise ValueError(f"cell must be 'lstm' or 'gru' (the gated cells), got {cell!r}")
    if not isinstance(max_steps, (int, np.integer)) or max_steps < 2:
        raise ValueError(f"max_steps must be an int >= 2 (the longest dependency expected), got {max_steps!r}")
    gates = 4 if cell == "lstm" else 3
    start, stop = _gate_block(b, gates, 1, "chrono_bias", cell.upper(), hidden_size)
    values = np.log(_rng(rng).uniform(1.0, max_steps - 1.0, stop - start))
    _write(b, start, stop, values)
    if cell == "lstm":
        _write(b, 0, start, -values)  # the input gate opens as much as the forget gate closes
    return b


_set_forget_bias = forget_bias  # lstm_parameters has an argument of that name
_set_update_bias = update_bias  # and gru_parameters this one

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
"""Schemes every cell takes (:func:`lstm_parameters`, :func:`gru_parameters`,
:func:`rnn_parameters`); ``CELL_SCHEMES[cell]`` adds a cell's own."""

CELL_SCHEMES = {
    "lstm": SCHEMES,
    "gru": SCHEMES,
    "rnn_tanh": SCHEMES + ("irnn",),
    "rnn_relu": SCHEMES + ("irnn",),
}
"""The schemes of each cell, by the names of ``rnnkernels.cells``: the Elman RNN adds
"irnn" (identity W_hh, Le et al. 2015); gated cells have no identity recipe."""


IRNN_INPUT_STD = 0.001
"""σ of the IRNN's input weights: N(0, 0.001²), as in Le et al. (2015)'s toy-problem
experiments and Keras's ``mnist_irnn`` example, which reproduces the paper's pixel-MNIST
run (a small input scale: the identity carries the state, the inputs nudge it)."""

_MATRIX_INIT = {
    "xavier_uniform": xavier_uniform,
    "xavier_normal": xavier_normal,
    "kaiming_uniform": kaiming_uniform,
    "kaiming_normal": kaiming_normal,
    "lecun_normal": lecun_normal,
}


def _parameters(cell, input_size, hidden_size, scheme, rng, dtype, like, xp, recurrent_gain):
    """Host float64 w_ih [gH, I], w_hh [gH, H], b_ih, b_hh [gH] for ``cell``'s g gate
    blocks, delivered as asked."""
    for name, size in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if scheme not in CELL_SCHEMES[cell]:
        raise ValueError(f"unknown scheme {scheme!r} for the {cell} cell; expected one of "
                         f"{', '.join(CELL_SCHEMES[cell])}")
    recurrent_gain = _check_gain(recurrent_gain)
    if scheme == "pytorch_default" and recurrent_gain != 1.0:
        raise ValueError("recurrent_gain applies to the other schemes; pytorch_default is U(±1/√H)")
    gates = cells.get(cell).gates
    rows = gates * hidden_size
    host = {"dtype": np.float64}
    generator = _rng(rng)
    if scheme == "pytorch_default":
        draw = lambda *shape: pytorch_default(shape, hidden_size, rng=generator, **host)  # noqa: E731
        params = {"w_ih": draw(rows, input_size), "w_hh": draw(rows, hidden_size),
                  "b_ih": draw(rows), "b_hh": draw(rows)}
    else:
        if scheme == "irnn":
            w_ih = generator.normal(0.0, IRNN_INPUT_STD, (rows, input_size))
            w_hh = identity((rows, hidden_size), recurrent_gain, **host)
        elif scheme in ("keras_default", "orthogonal"):
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


def _gate_bias_in_one(params, setter, value) -> None:
    """The gate bias in b_ih, that gate's block of b_hh zero: the layer sums the two."""
    setter(params["b_ih"], value)
    setter(params["b_hh"], 0.0)


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
    if forget_bias is None and scheme == "keras_default":
        forget_bias = 1.0
    params = _parameters("lstm", input_size, hidden_size, scheme, rng, dtype, like, xp, recurrent_gain)
    if forget_bias is not None:
        _gate_bias_in_one(params, _set_forget_bias, forget_bias)
    return params


def gru_parameters(
    input_size,
    hidden_size,
    scheme="pytorch_default",
    *,
    update_bias=None,
    recurrent_gain=1.0,
    rng=None,
    dtype=None,
    like=None,
    xp=None,
) -> dict[str, Any]:
    """A full GRU parameter set ``{"w_ih": [3H, I], "w_hh": [3H, H], "b_ih": [3H],
    "b_hh": [3H]}`` in torch.nn.GRU's layout (row blocks r, z, n), ready for
    ``gru_forward(x, **params)``.

    The schemes of :func:`lstm_parameters`, with three gate blocks: ``"pytorch_default"``
    is torch.nn.GRU's U(±1/√H); ``"orthogonal"`` draws each of W_hr, W_hz, W_hn
    orthogonal on its own (Saxe et al. 2014); ``"keras_default"`` is Keras's GRU
    (Glorot kernel, one orthogonal draw over the whole recurrent kernel, zero biases;
    Keras has no unit update bias, so none is set). ``update_bias``: when given,
    b_ih[H:2H] = value and b_hh[H:2H] = 0 (see :func:`update_bias`)."""
    params = _parameters("gru", input_size, hidden_size, scheme, rng, dtype, like, xp, recurrent_gain)
    if update_bias is not None:
        _gate_bias_in_one(params, _set_update_bias, update_bias)
    return params


def rnn_parameters(
    input_size, hidden_size, scheme="pytorch_default", *, recurrent_gain=1.0, rng=None, dtype=None, like=None, xp=None
) -> dict[str, Any]:
    """The same schemes for an Elman RNN (tanh or relu: the parameters do not depend on
    it), torch.nn.RNN's layout: ``{"w_ih": [H, I], "w_hh": [H, H], "b_ih": [H],
    "b_hh": [H]}``. ``keras_default`` is Keras's SimpleRNN: Glorot kernel, orthogonal
    recurrent matrix, zero bias (no gate, no forget bias). ``"irnn"`` is Le, Jaitly &
    Hinton (2015)'s ReLU-RNN recipe: W_hh = ``recurrent_gain``·I (see :func:`identity`;
    1 is their IRNN, 0.01 their iRNN), w_ih ~ N(0, IRNN_INPUT_STD²), zero biases; meant
    for ``nonlinearity="relu"`` (with tanh the identity starts saturating the units
    instead of copying them)."""
    return _parameters("rnn_tanh", input_size, hidden_size, scheme, rng, dtype, like, xp, recurrent_gain)


def cell_parameters(
    cell,
    input_size,
    hidden_size,
    scheme="pytorch_default",
    *,
    gate_bias=None,
    recurrent_gain=1.0,
    rng=None,
    dtype=None,
    like=None,
    xp=None,
) -> dict[str, Any]:
    """The parameter set of any cell, by name ("lstm", "gru", "rnn_tanh", "rnn_relu",
    "rnn" for either Elman cell, or a ``rnnkernels.cells.Cell``): :func:`lstm_parameters`,
    :func:`gru_parameters` or :func:`rnn_parameters`. ``gate_bias`` is the LSTM's forget bias or the GRU's update
    bias (the gate that keeps the state); the Elman RNN has none. Draws are the same as
    the cell's own function for the same arguments."""
    name = getattr(cell, "name", cell)
    if name == "rnn":  # the Elman RNN's parameters do not depend on its nonlinearity
        name = "rnn_tanh"
    if name not in CELL_SCHEMES:
        raise ValueError(f"cell must be one of {', '.join(CELL_SCHEMES)} or 'rnn', got {cell!r}")
    common = {"recurrent_gain": recurrent_gain, "rng": rng, "dtype": dtype, "like": like, "xp": xp}
    if name == "lstm":
        return lstm_parameters(input_size, hidden_size, scheme, forget_bias=gate_bias, **common)
    if name == "gru":
        return gru_parameters(input_size, hidden_size, scheme, update_bias=gate_bias, **common)
    if gate_bias is not None:
        raise ValueError(f"gate_bias: the {name} cell has no gate (it is the LSTM's forget bias "
                         "or the GRU's update bias)")
    return _parameters(name, input_size, hidden_size, scheme, rng, dtype, like, xp, recurrent_gain)
