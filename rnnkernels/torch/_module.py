"""``LSTM``: ``torch.nn.LSTM``'s constructor, parameters and forward, on rnnkernels."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .._api import BACKENDS
from ..modules import parameter_names
from . import _ops  # registers torch.ops.rnnkernels.*


class LSTM(nn.Module):
    """A drop-in for ``torch.nn.LSTM`` that runs rnnkernels' LSTM kernels.

    Same constructor, same parameter names, shapes
    and initialization, same ``forward(input, hx=None)`` with padded or
    ``PackedSequence`` input, same outputs; a strict ``load_state_dict`` of an
    ``nn.LSTM``'s state dict works and vice versa. Two additions, both optional
    keywords: ``backend`` in the constructor (a name for ``rnnkernels.lstm_forward``,
    "auto" by default: the cpu backend for CPU tensors, our CUDA kernels for CUDA
    tensors) and ``lengths`` in ``forward`` (per-row lengths [B] for padded input,
    the same result as packing it, without the packing).

    ``proj_size > 0`` (h_t = W_hr (o ⊙ tanh c_t), parameters ``weight_hr_l*``) runs
    on CPU tensors only, on NumPy (the ``reference`` math, in the input dtype for
    backend "auto"/"cpu"), without per-row lengths and outside vmap; other backends
    and CUDA tensors raise NotImplementedError.

    dtypes: float32 and float64 on the CPU, float32 on CUDA. Dropout between layers
    follows torch's semantics (training mode only, not after the last layer) but
    draws its masks through ``torch.nn.functional.dropout``, not cuDNN's generator.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if input_size < 0:
            raise ValueError("input_size must be non-negative")
        if not isinstance(proj_size, int) or isinstance(proj_size, bool):
            raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if proj_size and backend not in _ops._PROJECTED_BACKENDS:
            raise NotImplementedError(
                f"proj_size > 0 runs with backend 'auto', 'cpu' or 'reference' on CPU tensors; {backend!r} does not support it yet"
            )
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        self.mode = "LSTM"
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.backend = bidirectional, proj_size, backend
        directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        # nn.LSTM's names and order: per layer and direction weight_ih, weight_hh, the
        # biases, then weight_hr [P, H] with a projection (the state h is P wide then).
        names = parameter_names(num_layers, bidirectional, bias)
        if proj_size:
            per = 4 if bias else 2
            names = [
                n for i in range(0, len(names), per)
                for n in names[i : i + per] + ["weight_hr" + names[i][len("weight_ih"):]]
            ]
        self._flat_weights_names = names
        real_hidden = proj_size or hidden_size
        for name in self._flat_weights_names:
            layer = int(name.split("_l")[1].split("_")[0])
            if name.startswith("weight_ih"):
                shape = (4 * hidden_size, input_size if layer == 0 else directions * real_hidden)
            elif name.startswith("weight_hh"):
                shape = (4 * hidden_size, real_hidden)
            elif name.startswith("weight_hr"):
                shape = (proj_size, hidden_size)
            else:
                shape = (4 * hidden_size,)
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter from U(-1/√H, 1/√H), as ``torch.nn.LSTM`` does."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @property
    def _flat_weights(self) -> list:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters grouped per layer and direction, as ``nn.LSTM.all_weights``."""
        per = (4 if self.bias else 2) + (1 if self.proj_size else 0)
        flat = self._flat_weights
        return [flat[i : i + per] for i in range(0, len(flat), per)]

    def flatten_parameters(self) -> None:
        """A no-op, kept so code written for cuDNN's ``nn.LSTM`` runs unchanged: the
        kernels read the parameters where they are."""

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.backend != "auto":
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    def _single_step(self, input, hx):
        """The decode step: one time step with a state, no gradients, CPU tensors, the
        cpu backend. Per layer and direction, the two products on torch's BLAS (what
        the cpu backend would do with W_hh packed, which costs more than the step at
        T=1) and the cpu backend's fused cell (``cpu.cell_step``) on NumPy views; no
        custom op, no length plan, no API validation (the checks that matter here are
        made here). Same results as the general path to rounding (the products sum in
        another order): tests/test_torch_dropin.py."""
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("LSTM: hx must be a tuple (h_0, c_0)")
        h0, c0 = hx
        batch = input.shape[0 if self.batch_first else 1]
        directions = 2 if self.bidirectional else 1
        expected = (self.num_layers * directions, batch, self.hidden_size)
        for i, value in enumerate((h0, c0)):
            if tuple(value.shape) != expected:
                raise RuntimeError(f"Expected hidden[{i}] size {expected}, got {list(value.shape)}")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.shape[-1]}")
        dtype = self.weight_ih_l0.dtype
        if input.dtype != dtype or h0.dtype != dtype or c0.dtype != dtype or dtype not in (torch.float32, torch.float64):
            raise RuntimeError(f"input and hx must have the type {dtype}, got {input.dtype}, {h0.dtype}, {c0.dtype}")
        from .. import cpu

        layer_input = input.reshape(batch, self.input_size)  # one step: [B, I] either way
        h_n = torch.empty(expected, dtype=dtype)
        c_n = torch.empty(expected, dtype=dtype)
        h_out, c_out = h_n.numpy(), c_n.numpy()
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):  # one step: the reverse direction is the same step
                k = layer * directions + direction
                w_ih, w_hh, b_ih, b_hh = self._layer_weights(layer, direction)
                gates = layer_input @ w_ih.t() if b_ih is None else torch.addmm(b_ih + b_hh, layer_input, w_ih.t())
                z = h0[k] @ w_hh.t()
                cpu.cell_step(gates.numpy(), z.numpy(), np.ascontiguousarray(c0[k].detach().numpy()), h_out[k], c_out[k])
                outputs.append(h_n[k])
            # (Dropout between layers, training mode only, never gets here: forward
            # sends it down the general path.)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=1)
        output = layer_input.clone().unsqueeze(1 if self.batch_first else 0)
        return output, (h_n, c_n)

    def _layer_weights(self, layer: int, direction: int):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        w_ih, w_hh = getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)
        if self.bias:
            return w_ih, w_hh, getattr(self, "bias_ih" + suffix), getattr(self, "bias_hh" + suffix)
        return w_ih, w_hh, None, None

    def forward(self, input, hx=None, *, lengths=None):
        """``(output, (h_n, c_n))`` like ``torch.nn.LSTM.forward``; ``lengths`` ([B]
        integers, padded input only) stops each row at its own length."""
        if (
            hx is not None
            and lengths is None
            and type(input) is torch.Tensor  # not a PackedSequence nor a torch.func wrapper
            and input.dim() == 3
            and input.shape[1 if self.batch_first else 0] == 1
            and input.shape[0 if self.batch_first else 1] >= 1
            and input.device.type == "cpu"
            and input.dtype in (torch.float32, torch.float64)  # else the general path's error
            and self.backend in ("auto", "cpu")
            and not self.proj_size
            and not torch.is_grad_enabled()
            and not (self.dropout > 0 and self.training and self.num_layers > 1)
            and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(input)
        ):
            return self._single_step(input, hx)
        directions = 2 if self.bidirectional else 1
        state_rows = self.num_layers * directions
        packed = isinstance(input, PackedSequence)
        order = restore = None
        unbatched = False
        if packed:
            if lengths is not None:
                raise ValueError("lengths is for padded input; a PackedSequence carries its own")
            data, batch_sizes, order, restore = input
            # Padded, time-major, rows in the packed (longest-first) order.
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            batch = int(batch_sizes[0])
            if data.dim() != 2:
                raise ValueError(f"LSTM: Expected packed input data to be 2D, got {data.dim()}D instead")
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            unbatched = input.dim() == 2
            if unbatched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
            batch = x.shape[1]
            if lengths is not None:
                lengths = torch.as_tensor(lengths).to("cpu", torch.int64).reshape(-1)
                if lengths.shape[0] != batch:
                    raise ValueError(f"lengths must have one entry per sequence ({batch}), got {lengths.shape[0]}")
                sorted_lengths, order = torch.sort(lengths, descending=True, stable=True)
                if bool((order == torch.arange(batch)).all()):
                    order = None
                else:
                    lengths, restore = sorted_lengths, torch.argsort(order)
                    x = x.index_select(1, order.to(x.device))
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}")
        if x.dtype != self.weight_ih_l0.dtype:
            raise RuntimeError(f"input must have the type {self.weight_ih_l0.dtype}, got type {x.dtype}")

        real_hidden = self.proj_size or self.hidden_size
        if self.proj_size and lengths is not None:
            raise NotImplementedError("proj_size > 0 with per-row lengths (PackedSequence or lengths=) is not supported yet")
        if hx is None:
            h0 = x.new_zeros((state_rows, batch, real_hidden))
            c0 = x.new_zeros((state_rows, batch, self.hidden_size))
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("LSTM: hx must be a tuple (h_0, c_0)")
            h0, c0 = hx
            for i, (value, width) in enumerate(((h0, real_hidden), (c0, self.hidden_size))):
                expected = (state_rows, width) if unbatched else (state_rows, batch, width)
                if tuple(value.shape) != expected:
                    raise RuntimeError(f"Expected hidden[{i}] size {expected}, got {list(value.shape)}")
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            if order is not None:
                h0, c0 = h0.index_select(1, order.to(h0.device)), c0.index_select(1, order.to(c0.device))

        layer_input, h_n, c_n = x, [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                if self.proj_size:
                    suffix = f"_l{layer}" + ("_reverse" if direction else "")
                    y, h, c = _ops.lstm_layer_projected_autograd(
                        layer_input, *self._layer_weights(layer, direction), getattr(self, "weight_hr" + suffix),
                        h0[k], c0[k], direction == 1, self.backend,
                    )
                else:
                    y, h, c = _ops.lstm_layer_autograd(
                        layer_input, *self._layer_weights(layer, direction), h0[k], c0[k], lengths,
                        direction == 1, self.backend,
                    )
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output, h_n, c_n = layer_input, torch.stack(h_n), torch.stack(c_n)

        if restore is not None:
            h_n, c_n = h_n.index_select(1, restore.to(h_n.device)), c_n.index_select(1, restore.to(c_n.device))
        if packed:
            output = pack_padded_sequence(output, lengths, enforce_sorted=True)
            return PackedSequence(output.data, batch_sizes, order, restore), (h_n, c_n)
        if restore is not None:
            output = output.index_select(1, restore.to(output.device))
        if unbatched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)
