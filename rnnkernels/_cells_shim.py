"""TEMPORARY (torchcells branch, until the lead's cells.py and _api.cell_forward land):
the parts of the issue-15 contract the modules use, so that they can be written against
it now. GRU/RNN run on their float64 references only. Deleted at the rebase."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from ._api import lstm_backward, lstm_forward


@dataclass(frozen=True)
class Cell:
    name: str
    gates: int
    states: tuple
    bias_rows: int

    def unfold_grad(self, db):
        if self.name != "gru":
            return db, db.copy()
        h = db.shape[0] // 4
        xp = np if isinstance(db, np.ndarray) else __import__("cupy")
        return xp.concatenate([db[: 2 * h], db[2 * h : 3 * h]]), xp.concatenate([db[: 2 * h], db[3 * h :]])


CELLS = {
    "lstm": Cell("lstm", 4, ("h", "c"), 4),
    "gru": Cell("gru", 3, ("h",), 4),
    "rnn_tanh": Cell("rnn_tanh", 1, ("h",), 1),
    "rnn_relu": Cell("rnn_relu", 1, ("h",), 1),
}


def get(name):
    return name if isinstance(name, Cell) else CELLS[name]


def cell_forward(cell, x, w_ih, w_hh, b_ih, b_hh, state0, *, batch_first=False, training=True, backend="auto"):
    cell = get(cell)
    if cell.name == "lstm":
        out = lstm_forward(x, w_ih, w_hh, b_ih, b_hh, *(state0 or (None, None)), training=training, backend=backend)
        return SimpleNamespace(y=out.y, h_n=out.h_n, states=(out.h_n, out.c_n), inner=out, cell=cell)
    from . import gru_reference, rnn_reference

    if backend not in ("reference",):
        raise NotImplementedError(f"shim: {cell.name} runs on 'reference' only")
    h0 = None if state0 is None else state0[0]
    if cell.name == "gru":
        y, h_n, saved = gru_reference.forward(x, w_ih, w_hh, b_ih, b_hh, h0, training=training)
    else:
        y, h_n, saved = rnn_reference.forward(
            x, w_ih, w_hh, b_ih, b_hh, h0, nonlinearity=cell.name[4:], training=training
        )
    return SimpleNamespace(y=y, h_n=h_n, states=(h_n,), inner=saved, cell=cell)


def cell_backward(out, dy=None, dstates=None, *, return_step_norms=False):
    dstates = dstates or (None,) * len(out.cell.states)
    if out.cell.name == "lstm":
        g = lstm_backward(out.inner, dy, *dstates)
        return SimpleNamespace(
            dx=g.dx, dw_ih=g.dw_ih, dw_hh=g.dw_hh, db_ih=g.db_ih, db_hh=g.db_hh, dh0=g.dh0, dstates=(g.dh0, g.dc0)
        )
    from . import gru_reference, rnn_reference

    ref = gru_reference if out.cell.name == "gru" else rnn_reference
    dx, dw_ih, dw_hh, db_ih, db_hh, dh0 = ref.backward(out.inner, dy, dstates[0])
    if not out.inner.has_b_ih:
        db_ih = db_hh = None
    return SimpleNamespace(dx=dx, dw_ih=dw_ih, dw_hh=dw_hh, db_ih=db_ih, db_hh=db_hh, dh0=dh0, dstates=(dh0,))




def implements(cell, backend):
    return get(cell).name == "lstm" or backend == "reference"
