"""PyTorch front end: ``rnnkernels.torch.LSTM``, ``GRU`` and ``RNN``, drop-ins for
``torch.nn.LSTM``, ``torch.nn.GRU`` and ``torch.nn.RNN``.

    from rnnkernels.torch import LSTM          # instead of torch.nn.LSTM (GRU, RNN alike)
    lstm = LSTM(input_size, hidden_size, num_layers=2, bidirectional=True)
    lstm.load_state_dict(nn_lstm.state_dict())  # strict, same keys and shapes
    output, (h_n, c_n) = lstm(packed_or_padded_input, (h0, c0))

    replaced = replace_lstm(model)             # or: every nn.LSTM in a model, in place
    replace_gru(model), replace_rnn(model)     # the same for nn.GRU and nn.RNN

Each layer and direction is one call of its cell's custom op (``rnnkernels::lstm_layer``,
``gru_layer``, ``rnn_tanh_layer``, ``rnn_relu_layer``; see ``_ops.py``), which runs the
single-layer backends: CPU tensors on the Numba cpu backend, CUDA tensors on our CUDA
kernels, zero-copy, on torch's current stream. The ops have fake (meta) and autograd
registrations, so the modules also run under ``torch.compile``, and torch.func
transforms (grad, vjp, vmap) work on them. Dropout between layers, the packing and
unpacking of a ``PackedSequence``, and the sorting of rows by length are ordinary torch
operations.
"""

from ._module import GRU, LSTM, RNN
from ._ops import cell_layer_autograd, lstm_layer, lstm_layer_backward
from ._replace import replace_gru, replace_lstm, replace_rnn

__all__ = [
    "GRU", "LSTM", "RNN", "cell_layer_autograd", "lstm_layer", "lstm_layer_backward", "replace_gru", "replace_lstm",
    "replace_rnn",
]
