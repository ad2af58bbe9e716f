"""The recurrent cells: what is cell-specific above the kernels, written down once.

Every layer of the stack above the kernels is generic: ``_api.py`` validates, lays out
and dispatches any cell, ``modules.py`` and ``rnnkernels.torch`` stack and wrap any cell.
A :class:`Cell` tells them what differs: how many gate row blocks the weights stack, which
states the recurrence carries, how the two biases reach a backend, and which module
implements the cell on each backend. Each cell's equations live in one file per layer
(``reference.py`` / ``gru_reference.py`` / ``rnn_reference.py``, ``cpu.py`` /
``cpu_gru.py`` / ``cpu_rnn.py``, ``csrc/<cell>_{forward,backward}.cu``); adding a cell is
one such file per layer, its entry here, its kernel description in ``_launch.py``
(``CellKernels``: gate count, sources, what a step saves) and a thin module subclass in
``modules.py`` and ``torch/_module.py`` (its constructor and state shapes).

Biases. Backends get ONE bias vector, folded by the API in float32 at least (the
backend contract: ``_backend.py``), and return its gradient in the same layout:

* LSTM and Elman RNN: ``b_ih + b_hh`` ([4H] and [H]). The two only ever appear summed,
  so ``db_ih = db_hh = db``.
* GRU: ``[b_ir + b_hr, b_iz + b_hz, b_in, b_hn]`` ([4H]). The r and z gates see only the
  sum, but b_hn sits inside the reset gate's product, n = tanh(W_in x + b_in + r ⊙
  (W_hn h + b_hn)), so the n gate's two biases stay apart: a backend adds the first 3H
  to the input projection and the last H to the hidden product's n block. This is the
  layout cuDNN and haste use for the same reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


def _sum_biases(b_ih, b_hh, xp):
    return b_ih + b_hh


def _same_gradient(db, xp):
    return db, db.copy()  # two arrays: a caller may update one in place


def _gru_fold(b_ih, b_hh, xp):
    hidden = b_ih.shape[0] // 3
    return xp.concatenate([b_ih[: 2 * hidden] + b_hh[: 2 * hidden], b_ih[2 * hidden :], b_hh[2 * hidden :]])


def _gru_unfold(db, xp):
    hidden = db.shape[0] // 4
    shared = db[: 2 * hidden]
    return xp.concatenate([shared, db[2 * hidden : 3 * hidden]]), xp.concatenate([shared, db[3 * hidden :]])


@dataclass(frozen=True)
class Cell:
    """A recurrent cell as the generic layers see it (see the module docstring)."""

    name: str  # "lstm", "gru", "rnn_tanh", "rnn_relu"
    title: str  # for messages: "LSTM", "GRU", "Elman RNN (tanh)"
    gate_names: tuple[str, ...]  # row blocks of w_ih / w_hh, in torch.nn's order
    states: tuple[str, ...]  # what the recurrence carries: ("h", "c") or ("h",)
    bias_rows: int  # rows of the folded bias, in units of H
    fold_bias: Callable[[Any, Any, Any], Any] = field(repr=False)  # (b_ih, b_hh, xp) -> bias
    unfold_grad: Callable[[Any, Any], tuple] = field(repr=False)  # (db, xp) -> (db_ih, db_hh)
    # backend name -> "module:ATTRIBUTE" holding its Backend (rnnkernels/_backend.py)
    implementations: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def gates(self) -> int:
        return len(self.gate_names)

    @property
    def rows_layout(self) -> str:
        """The weights' row count as the docs write it: "4H", "3H", "H"."""
        return "H" if self.gates == 1 else f"{self.gates}H"

    @property
    def state_inputs(self) -> tuple[str, ...]:
        """The names of the initial states: ("h0", "c0") or ("h0",)."""
        return tuple(f"{s}0" for s in self.states)

    @property
    def state_outputs(self) -> tuple[str, ...]:
        return tuple(f"{s}_n" for s in self.states)

    def describe_rows(self) -> str:
        """How the weights' rows are stacked, for error messages."""
        if self.gates == 1:
            return "one row per hidden unit"
        return f"gate rows {', '.join(self.gate_names)} stacked"

    def implementation(self, backend: str):
        """The Backend implementing this cell on ``backend``, or None if there is none."""
        where = self.implementations.get(backend)
        if where is None:
            return None
        module_name, attribute = where.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:  # the module exists but an import inside it failed
                raise
            return None  # not written yet
        return getattr(module, attribute, None)


_LSTM_GATES = ("i", "f", "g", "o")


def _implementations(reference: str, cpu: str, device: str) -> dict:
    return {
        "reference": reference,
        "cpu": cpu,
        "cuda": f"rnnkernels.cuda:{device}",
        "emulated": f"rnnkernels.emulated:{device}",
    }


LSTM = Cell(
    "lstm", "LSTM", _LSTM_GATES, ("h", "c"), 4, _sum_biases, _same_gradient,
    _implementations("rnnkernels.reference:BACKEND", "rnnkernels.cpu:BACKEND", "BACKEND"),
)
GRU = Cell(
    "gru", "GRU", ("r", "z", "n"), ("h",), 4, _gru_fold, _gru_unfold,
    _implementations("rnnkernels.gru_reference:BACKEND", "rnnkernels.cpu_gru:BACKEND", "GRU_BACKEND"),
)
RNN_TANH = Cell(
    "rnn_tanh", "Elman RNN (tanh)", ("a",), ("h",), 1, _sum_biases, _same_gradient,
    _implementations("rnnkernels.rnn_reference:TANH_BACKEND", "rnnkernels.cpu_rnn:TANH_BACKEND", "RNN_TANH_BACKEND"),
)
RNN_RELU = Cell(
    "rnn_relu", "Elman RNN (relu)", ("a",), ("h",), 1, _sum_biases, _same_gradient,
    _implementations("rnnkernels.rnn_reference:RELU_BACKEND", "rnnkernels.cpu_rnn:RELU_BACKEND", "RNN_RELU_BACKEND"),
)

CELLS = {cell.name: cell for cell in (LSTM, GRU, RNN_TANH, RNN_RELU)}
NONLINEARITIES = ("tanh", "relu")


def get(cell) -> Cell:
    """The :class:`Cell` named ``cell`` (or ``cell`` itself); a clear error if unknown."""
    if isinstance(cell, Cell):
        return cell
    if not isinstance(cell, str):
        raise TypeError(f"cell must be a cell name, one of {', '.join(map(repr, CELLS))}; got {type(cell).__name__}")
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; expected one of {', '.join(map(repr, CELLS))}")
    return CELLS[cell]


def rnn(nonlinearity) -> Cell:
    """The Elman RNN cell for ``nonlinearity`` ("tanh" or "relu", as torch.nn.RNN)."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return RNN_TANH if nonlinearity == "tanh" else RNN_RELU
