"""rnnkernels: hand-written CUDA kernels for recurrent networks: LSTM, GRU, Elman RNN.

    out = rnnkernels.lstm_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0)
    grads = rnnkernels.lstm_backward(out, dy)

and likewise ``gru_forward`` / ``gru_backward`` and ``rnn_forward`` / ``rnn_backward``
(``nonlinearity="tanh"`` or ``"relu"``), in ``torch.nn``'s layouts and gate orders.

Backends: "reference" (NumPy float64, the definition of the math), "cpu" (Numba),
"cuda" (our CUDA kernels through CuPy), "emulated" (those kernels on a CPU emulator,
for debugging) and "auto". See ``rnnkernels/reference.py`` for the equations.

``rnnkernels.LSTM``, ``GRU`` and ``RNN`` are ``torch.nn``-shaped modules over NumPy
and CuPy arrays; ``rnnkernels.torch.LSTM``, ``GRU`` and ``RNN`` (import them
explicitly: they need torch) replace ``torch.nn.LSTM``, ``GRU`` and ``RNN``.
"""

from . import init
from ._api import (
    BACKENDS,
    GRUGrads,
    GRUOutput,
    LSTMGrads,
    LSTMOutput,
    RNNGrads,
    RNNOutput,
    get_backend,
    gru_backward,
    gru_forward,
    lstm_backward,
    lstm_forward,
    rnn_backward,
    rnn_forward,
)
from .clip import clip_grad_norm, global_grad_norm
from .modules import GRU, LSTM, RNN

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "GRU",
    "GRUGrads",
    "GRUOutput",
    "LSTM",
    "LSTMGrads",
    "LSTMOutput",
    "RNN",
    "RNNGrads",
    "RNNOutput",
    "clip_grad_norm",
    "get_backend",
    "global_grad_norm",
    "gru_backward",
    "gru_forward",
    "init",
    "lstm_backward",
    "lstm_forward",
    "rnn_backward",
    "rnn_forward",
    "__version__",
]
