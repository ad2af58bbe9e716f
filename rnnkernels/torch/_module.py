"""``LSTM``, ``GRU``, ``RNN``: ``torch.nn``'s constructors, parameters and forwards, on
rnnkernels, written once for all cells (``_Recurrent``) with thin subclasses."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import cells
from .._api import BACKENDS
from ..modules import parameter_names
from . import _ops  # registers torch.ops.rnnkernels.*


def _cast(value, dtype):
    """``value`` (a tensor, a PackedSequence, a tuple or list of them, None) with its
    floating tensors in ``dtype``."""
    if isinstance(value, PackedSequence):
        return value.to(dtype) if value.data.is_floating_point() else value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class _Recurrent(nn.Module):
    """What the drop-ins share: ``torch.nn.RNNBase``'s constructor checks, parameter
    names, shapes and initialization, the attributes code written for torch.nn reads
    (``mode``, ``all_weights``, ``_flat_weights(_names)``, ``flatten_parameters``,
    ``__repr__``), and a forward that runs each layer and direction as one call of the
    cell's custom op (``_ops.cell_layer_autograd``) with torch's padded, packed or
    unbatched inputs. The cell (``cell_name``) gives the gate count and the states; a
    subclass says how the states are passed in and out (a pair for the LSTM, one
    tensor for the others)."""

    cell_name = ""
    # Whether torch.nn's module runs in the lower-precision dtype under CPU autocast,
    # for padded (and unbatched) input and for a PackedSequence: whether its _VF op is
    # on CPU autocast's lower-precision list (torch 2.13: lstm's padded form, rnn_tanh
    # and rnn_relu in both forms; not lstm's packed form, not gru). See _autocast_dtype.
    _autocast_padded = False
    _autocast_packed = False

    def __init__(
        self, mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
        device, dtype, backend,
    ):
        super().__init__()
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=3,
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
        # (proj_size is the LSTM's; 0 for the other cells)
        if not isinstance(proj_size, int) or isinstance(proj_size, bool):
            raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if proj_size and backend not in _ops._PROJECTED_BACKENDS:
            raise NotImplementedError(
                f"proj_size > 0 runs with backend 'auto', 'cpu', 'reference' or 'emulated' on CPU tensors and 'auto' or "
                f"'cuda' on CUDA tensors; {backend!r} does not support it"
            )
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.backend = bidirectional, proj_size, backend
        directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        rows = cells.get(self.cell_name).gates * hidden_size
        # torch.nn's names and order: per layer and direction weight_ih, weight_hh, the
        # biases, then (LSTM) weight_hr [P, H] with a projection (the state h is P wide then).
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
                shape = (rows, input_size if layer == 0 else directions * real_hidden)
            elif name.startswith("weight_hh"):
                shape = (rows, real_hidden)
            elif name.startswith("weight_hr"):
                shape = (proj_size, hidden_size)
            else:
                shape = (rows,)
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter from U(-1/√H, 1/√H), as torch.nn's LSTM, GRU and RNN do."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @property
    def _flat_weights(self) -> list:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters grouped per layer and direction, as ``nn.RNNBase.all_weights``."""
        per = (4 if self.bias else 2) + (1 if self.proj_size else 0)
        flat = self._flat_weights
        return [flat[i : i + per] for i in range(0, len(flat), per)]

    def flatten_parameters(self) -> None:
        """A no-op, kept so code written for cuDNN's torch.nn modules runs unchanged:
        the kernels read the parameters where they are."""

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

    def _layer_weights(self, layer: int, direction: int):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        w_ih, w_hh = getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)
        if self.bias:
            return w_ih, w_hh, getattr(self, "bias_ih" + suffix), getattr(self, "bias_hh" + suffix)
        return w_ih, w_hh, None, None

    # -- what a subclass may change ------------------------------------------------------

    def _state_widths(self) -> tuple[int, ...]:
        return (self.hidden_size,) * len(cells.get(self.cell_name).states)

    def _check_state(self, hx) -> tuple:
        """``hx`` as the tuple of states (one tensor for GRU and RNN)."""
        if isinstance(hx, (tuple, list)) or not isinstance(hx, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: hx must be a tensor h_0, got {type(hx).__name__}")
        return (hx,)

    def _state_error(self, index: int, expected, got) -> str:
        return f"Expected hidden size {expected}, got {list(got)}"

    def _run_layer(self, layer, direction, layer_input, states0, lengths):
        """One layer and direction: ``(y, *states_n)``."""
        return _ops.cell_layer_autograd(
            self.cell_name, layer_input, *self._layer_weights(layer, direction), tuple(states0), lengths,
            direction == 1, self.backend,
        )

    def _check_state_dims(self, states, batched: bool):
        """torch.nn's check (and message) that the states have the input's rank."""
        want = 3 if batched else 2
        if any(s.dim() != want for s in states):
            kind = "batched 3-D" if batched else "unbatched 2-D"
            if len(states) == 2:
                dims = ", ".join(f"{s.dim()}-D" for s in states)
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got ({dims}) tensors")
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {states[0].dim()}-D tensor")

    @staticmethod
    def _check_state_devices(states, device):
        """torch.nn's check (and message) that the states are on the input's device."""
        for value in states:
            if value.device != device:
                raise RuntimeError(
                    f"Input and hidden tensors are not at the same device, found input tensor at {device} and "
                    f"hidden tensor at {value.device}"
                )

    # -- autocast ------------------------------------------------------------------------

    def _autocast_dtype(self, input):
        """The dtype torch.nn's module returns under CPU autocast for this input, or
        None (autocast off, not CPU, a cell or input form torch leaves alone, or
        parameters autocast does not cast: it casts float32 only)."""
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        if (
            not isinstance(data, torch.Tensor)
            or data.device.type != "cpu"
            or not torch.is_autocast_enabled("cpu")
            or not (self._autocast_packed if packed else self._autocast_padded)
            or self.weight_ih_l0.dtype != torch.float32
        ):
            return None
        return torch.get_autocast_dtype("cpu")

    def _autocast_forward(self, target, input, hx, lengths):
        """``forward`` under CPU autocast: the input and states in the parameters'
        dtype (an input may come in the autocast dtype, from an autocast layer before
        it), the kernels in that dtype (they have no bfloat16: the math is float32,
        finer than torch.nn's bfloat16), the outputs cast to ``target`` as torch.nn's
        are. Autocast is off inside, so that torch ops here (the decode step's
        products) stay in float32 too. Gradients flow back through the casts."""
        compute = self.weight_ih_l0.dtype
        with torch.autocast("cpu", enabled=False):
            output, states = self._run_forward(_cast(input, compute), _cast(hx, compute), lengths)
        return _cast(output, target), tuple(s.to(target) for s in states)

    def _run_forward(self, input, hx, lengths):
        """``(output, states_n)``: the decode step or the general path."""
        if self._decodes(input, hx, lengths):
            if torch.is_autocast_enabled("cpu"):
                # A cell torch.nn leaves in float32 under autocast (the GRU): so do the
                # decode step's torch products, which autocast would make bfloat16.
                with torch.autocast("cpu", enabled=False):
                    return self._single_step(input, hx)
            return self._single_step(input, hx)
        return self._forward(input, hx, lengths)

    # -- the decode step -----------------------------------------------------------------

    def _decodes(self, input, hx, lengths) -> bool:
        """Whether ``forward`` takes the decode step (:meth:`_single_step`): one time
        step with a state, no gradients, CPU tensors, the cpu backend, nothing a
        transform or the compiler traces."""
        return (
            hx is not None
            and lengths is None
            and type(input) is torch.Tensor  # not a PackedSequence nor a torch.func wrapper
            and input.dim() == 3
            and input.shape[1 if self.batch_first else 0] == 1
            and input.shape[0 if self.batch_first else 1] >= 1
            and input.device.type == "cpu"
            and self.weight_ih_l0.device.type == "cpu"  # else the general path's device error
            and input.dtype in (torch.float32, torch.float64)  # else the general path's error
            and self.backend in ("auto", "cpu")
            and not self.proj_size
            and not torch.is_grad_enabled()
            and not (self.dropout > 0 and self.training and self.num_layers > 1)
            and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(input)
        )

    def _single_step(self, input, hx):
        """The decode step: ``(output, states_n)`` for one time step. Per layer and
        direction, the two products on torch's BLAS (what the cpu backend would do with
        W_hh packed, which costs more than the step at T=1) and the cpu backend's fused
        cell (the cell's ``cell_step``, :meth:`_step`) on NumPy views; no custom op, no
        length plan, no API validation (the checks that matter here are made here).
        Same results as the general path to rounding (the products sum in another
        order): tests/test_torch_dropin.py, tests/test_cell_modules.py."""
        states0 = self._check_state(hx)
        self._check_state_dims(states0, batched=True)
        self._check_state_devices(states0, input.device)
        batch = input.shape[0 if self.batch_first else 1]
        directions = 2 if self.bidirectional else 1
        expected = (self.num_layers * directions, batch, self.hidden_size)
        for i, value in enumerate(states0):
            if tuple(value.shape) != expected:
                raise RuntimeError(self._state_error(i, expected, value.shape))
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.shape[-1]}")
        dtype = self.weight_ih_l0.dtype
        self._check_input_dtype(input.dtype)
        self._check_state_dtypes(states0)

        layer_input = input.reshape(batch, self.input_size)  # one step: [B, I] either way
        states_n = [torch.empty(expected, dtype=dtype) for _ in states0]
        outs = [s.numpy() for s in states_n]
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):  # one step: the reverse direction is the same step
                k = layer * directions + direction
                self._step(layer_input, self._layer_weights(layer, direction), [s[k] for s in states0], [o[k] for o in outs])
                outputs.append(states_n[0][k])
            # (Dropout between layers, training mode only, never gets here: forward
            # sends it down the general path.)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=1)
        output = layer_input.clone().unsqueeze(1 if self.batch_first else 0)
        return output, tuple(states_n)

    def _step(self, x, weights, states, outs):
        """One cell step of the decode path: ``x`` [B, I], ``weights`` (w_ih, w_hh,
        b_ih, b_hh) tensors, ``states`` the [B, H] state tensors, ``outs`` the NumPy
        [B, H] arrays the new states go into."""
        raise NotImplementedError

    # -- forward -------------------------------------------------------------------------

    def _forward(self, input, hx, lengths):
        """``(output, states_n)`` with ``states_n`` a tuple, one per state of the cell."""
        name = type(self).__name__
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
                raise ValueError(f"{name}: Expected packed input data to be 2D, got {data.dim()}D instead")
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
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
                # Rows already longest first need no reordering; whether they are is a
                # value of the data, which a compiled graph cannot branch on, so under
                # torch.compile the rows are always reordered (an identity gather).
                if not torch.compiler.is_compiling() and bool((order == torch.arange(batch)).all()):
                    order = None
                else:
                    lengths, restore = sorted_lengths, torch.argsort(order)
                    x = x.index_select(1, order.to(x.device))
        weight = self.weight_ih_l0
        if x.device != weight.device:
            # torch.nn's check and message; without it a meta input would run on the
            # ops' fake implementations and return meta tensors.
            raise RuntimeError(
                f"Input and parameter tensors are not at the same device, found input tensor at {x.device} and "
                f"parameter tensor at {weight.device}"
            )
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}")
        self._check_input_dtype(x.dtype)

        self._check_lengths(lengths)
        widths = self._state_widths()
        if hx is None:
            states0 = [x.new_zeros((state_rows, batch, width)) for width in widths]
        else:
            states0 = list(self._check_state(hx))
            if not packed:
                self._check_state_dims(states0, batched=not unbatched)
            self._check_state_devices(states0, x.device)
            self._check_state_dtypes(states0)
            for i, (value, width) in enumerate(zip(states0, widths)):
                expected = (state_rows, width) if unbatched else (state_rows, batch, width)
                if tuple(value.shape) != expected:
                    raise RuntimeError(self._state_error(i, expected, value.shape))
            if unbatched:
                states0 = [s.unsqueeze(1) for s in states0]
            if order is not None:
                states0 = [s.index_select(1, order.to(s.device)) for s in states0]

        layer_input, states_n = x, [[] for _ in states0]
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                y, *states = self._run_layer(layer, direction, layer_input, [s[k] for s in states0], lengths)
                outputs.append(y)
                for collected, state in zip(states_n, states):
                    collected.append(state)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = self._dropout(layer_input, lengths)
        output, states_n = layer_input, [torch.stack(s) for s in states_n]

        if restore is not None:
            states_n = [s.index_select(1, restore.to(s.device)) for s in states_n]
        if packed:
            output = pack_padded_sequence(output, lengths, enforce_sorted=True)
            return PackedSequence(output.data, batch_sizes, order, restore), tuple(states_n)
        if restore is not None:
            output = output.index_select(1, restore.to(output.device))
        if unbatched:
            return output.squeeze(1), tuple(s.squeeze(1) for s in states_n)
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, tuple(states_n)

    def _check_lengths(self, lengths):
        pass

    def _check_input_dtype(self, dtype):
        """torch.nn's check and message (a ValueError, as torch.nn.RNNBase raises)."""
        weight = self.weight_ih_l0.dtype
        if dtype != weight:
            raise ValueError(
                f"RNN input dtype ({dtype}) does not match weight dtype ({weight}). Convert input: "
                f"input.to({weight}), or convert model: model.to({dtype})"
            )

    def _check_state_dtypes(self, states0):
        """The states must have the weights' dtype. torch.nn has no check of its own (its
        matrix product fails with "mat1 and mat2 must have the same dtype"); this names
        hx, on the general path and the decode step alike."""
        weight = self.weight_ih_l0.dtype
        for i, value in enumerate(states0):
            if value.dtype != weight:
                which = "hx" if len(states0) == 1 else f"hx[{i}]"
                raise ValueError(f"{which} must have the weights' dtype {weight}, got {value.dtype}")

    def _dropout(self, layer_input, lengths):
        """Dropout between layers (training mode), with torch.nn's masks on the CPU
        under the same seed: torch.nn drops out its layer output as it holds it, the
        padded [T, B, D*H] tensor, or for a PackedSequence the packed data [sum of
        lengths, D*H], so with lengths the mask is drawn over the steps inside each
        row, in packed order (time-major over rows sorted longest first: boolean
        indexing of a [T, B] mask, the rows here being sorted), and spread back; the
        padding stays zero. ``lengths=`` draws it the same way, as packing would."""
        if lengths is None:
            return F.dropout(layer_input, self.dropout, training=True)
        steps = layer_input.shape[0]
        inside = (torch.arange(steps)[:, None] < lengths[None, :]).to(layer_input.device)
        out = layer_input.new_zeros(layer_input.shape)
        out[inside] = F.dropout(layer_input[inside], self.dropout, training=True)
        return out


class LSTM(_Recurrent):
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
    on every backend: on CPU tensors the ``reference`` math (in the input dtype for
    backend "auto"/"cpu") or the emulated kernels, on CUDA tensors our kernels (cuBLAS
    per step and a fused cell kernel: ``rnnkernels/_projected.py``), with per-row
    lengths too (PackedSequence or ``lengths=``); not inside vmap.

    dtypes: float32 and float64 on the CPU, float32 on CUDA. Under CPU autocast the
    outputs take torch.nn's dtype (bfloat16 for padded input, float32 for a
    PackedSequence, as torch 2.13's autocast lists have it); the math stays float32.
    Dropout between layers follows torch's semantics (training mode only, not after
    the last layer) and draws its masks through ``torch.nn.functional.dropout``: on
    the CPU torch.nn's masks under the same seed (padded and packed), not cuDNN's on a
    GPU.
    """

    cell_name = "lstm"
    _autocast_padded = True

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
        super().__init__(
            "LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device, dtype, backend,
        )

    def _state_widths(self):
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _check_state(self, hx):
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("LSTM: hx must be a tuple (h_0, c_0)")
        return tuple(hx)

    def _state_error(self, index, expected, got):
        return f"Expected hidden[{index}] size {expected}, got {list(got)}"

    def _step(self, x, weights, states, outs):
        from .. import cpu

        w_ih, w_hh, b_ih, b_hh = weights
        (h0, c0), (h_out, c_out) = states, outs
        gates = x @ w_ih.t() if b_ih is None else torch.addmm(b_ih + b_hh, x, w_ih.t())
        z = h0 @ w_hh.t()
        cpu.cell_step(gates.numpy(), z.numpy(), np.ascontiguousarray(c0.detach().numpy()), h_out, c_out)

    def _run_layer(self, layer, direction, layer_input, states0, lengths):
        if not self.proj_size:
            return super()._run_layer(layer, direction, layer_input, states0, lengths)
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        return _ops.lstm_layer_projected_autograd(
            layer_input, *self._layer_weights(layer, direction), getattr(self, "weight_hr" + suffix),
            *states0, lengths, direction == 1, self.backend,
        )

    def forward(self, input, hx=None, *, lengths=None):
        """``(output, (h_n, c_n))`` like ``torch.nn.LSTM.forward``; ``lengths`` ([B]
        integers, padded input only) stops each row at its own length."""
        target = self._autocast_dtype(input)
        if target is not None:
            output, (h_n, c_n) = self._autocast_forward(target, input, hx, lengths)
        else:
            output, (h_n, c_n) = self._run_forward(input, hx, lengths)
        return output, (h_n, c_n)


class _HiddenState(_Recurrent):
    """The cells whose only state is h: ``forward(input, hx=None) -> (output, h_n)``
    as ``torch.nn.GRU`` and ``torch.nn.RNN``."""

    def forward(self, input, hx=None, *, lengths=None):
        """``(output, h_n)`` like ``torch.nn.GRU.forward`` / ``torch.nn.RNN.forward``;
        ``lengths`` ([B] integers, padded input only) stops each row at its own
        length."""
        target = self._autocast_dtype(input)
        if target is not None:
            output, (h_n,) = self._autocast_forward(target, input, hx, lengths)
        else:
            output, (h_n,) = self._run_forward(input, hx, lengths)
        return output, h_n


class GRU(_HiddenState):
    """A drop-in for ``torch.nn.GRU`` (gate rows r, z, n; n = tanh(W_in x + b_in + r ⊙
    (W_hn h + b_hn))) that runs rnnkernels' GRU backends: everything
    :class:`LSTM` has (the same constructor as ``torch.nn.GRU`` plus ``backend``,
    padded, packed and unbatched input, ``lengths``, strict state dicts both ways,
    torch.compile, torch.func, dropout through ``torch.nn.functional.dropout``) but
    the projection."""

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
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ):
        super().__init__(
            "GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
            device, dtype, backend,
        )


    def _step(self, x, weights, states, outs):
        from .. import cpu_gru

        w_ih, w_hh, b_ih, b_hh = weights
        (h0,), (h_out,) = states, outs
        rows = 3 * self.hidden_size
        if b_ih is None:
            gates, b_hn = x @ w_ih.t(), x.new_zeros(self.hidden_size)
        else:
            # The backends' folded bias (cells.py): r and z see the sums, b_in joins the
            # input product, b_hn stays for the hidden product's n block.
            bias = cells.GRU.fold_bias(b_ih, b_hh, torch)
            gates, b_hn = torch.addmm(bias[:rows], x, w_ih.t()), bias[rows:]
        z = h0 @ w_hh.t()
        hn = np.empty(h_out.shape, h_out.dtype)  # W_hn h + b_hn: what training would save
        cpu_gru.cell_step(gates.numpy(), z.numpy(), b_hn.numpy(), np.ascontiguousarray(h0.detach().numpy()), h_out, hn)


class RNN(_HiddenState):
    """A drop-in for ``torch.nn.RNN`` (h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),
    ``nonlinearity`` "tanh" or "relu": cells "rnn_tanh" and "rnn_relu"), as
    :class:`GRU` otherwise; ``nonlinearity`` is the fourth positional argument, as in
    torch."""

    _autocast_padded = _autocast_packed = True  # torch: rnn_tanh, rnn_relu, both forms

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
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ):
        if nonlinearity not in cells.NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(
            f"RNN_{nonlinearity.upper()}", input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, 0, device, dtype, backend,
        )

    @property
    def cell_name(self) -> str:
        return f"rnn_{self.nonlinearity}"

    def _step(self, x, weights, states, outs):
        from .. import cpu_rnn

        w_ih, w_hh, b_ih, b_hh = weights
        gx = x @ w_ih.t() if b_ih is None else torch.addmm(b_ih + b_hh, x, w_ih.t())
        z = states[0] @ w_hh.t()
        cpu_rnn.cell_step(self.nonlinearity, gx.numpy(), z.numpy(), outs[0])
