"""PyTorch front end: ``rnnkernels.torch.LSTM``, a drop-in for ``torch.nn.LSTM``.

    from rnnkernels.torch import LSTM          # instead of torch.nn.LSTM
    lstm = LSTM(input_size, hidden_size, num_layers=2, bidirectional=True)
    lstm.load_state_dict(nn_lstm.state_dict())  # strict, same keys and shapes
    output, (h_n, c_n) = lstm(packed_or_padded_input, (h0, c0))

    replaced = replace_lstm(model)             # or: every nn.LSTM in a model, in place

Each layer and direction is one call of the custom op ``rnnkernels::lstm_layer``
(see ``_ops.py``), which runs the single-layer kernels: CPU tensors on the Numba cpu
backend, CUDA tensors on our CUDA kernels, zero-copy, on torch's current stream. The
op has fake (meta) and autograd registrations, so the module also runs under
``torch.compile``, and torch.func transforms (grad, vjp, vmap) work on it. Dropout between layers, the packing and unpacking of a
``PackedSequence``, and the sorting of rows by length are ordinary torch operations.
"""

from ._module import LSTM
from ._ops import lstm_layer, lstm_layer_backward
from ._replace import replace_lstm

__all__ = ["LSTM", "lstm_layer", "lstm_layer_backward", "replace_lstm"]
