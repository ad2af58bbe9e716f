"""The contract between the public API (``rnnkernels/_api.py``) and a backend.

The API validates every argument, moves arrays to the backend's memory, makes the
layout time-major and C-contiguous, fills in zeros for a missing state or gradient,
and handles the empty shapes (T == 0 or B == 0) itself. A backend therefore sees only
well-formed, non-empty problems.

One Backend implements one cell (``rnnkernels/cells.py`` maps each (cell, backend name)
to its Backend). With ``states`` the cell's states, (h, c) for the LSTM and (h,) for the
GRU and the Elman RNN, a backend implements two functions:

``forward(x, w_ih, w_hh, bias, *state0, training) -> (y, *state_n, saved)``
    x     [T, B, I]   time-major, C-contiguous, T >= 1, B >= 1
    w_ih  [G·H, I]    G gate row blocks in torch.nn's order (LSTM i, f, g, o; GRU
                      r, z, n; Elman RNN one block)
    w_hh  [G·H, H]
    bias  the FOLDED bias (cells.py): LSTM [4H] = b_ih + b_hh; Elman [H] = b_ih + b_hh;
          GRU [4H] = [b_ir + b_hr, b_iz + b_hz, b_in, b_hn]; or None without biases.
          Folded by the API in float32 at least (float16 problems: a float32 bias;
          the only exception to the one-dtype rule below)
    state0  one [B, H] array per state (h0, c0 for the LSTM), never None
    y [T, B, H]; each final state [B, H]; ``saved`` is whatever backward needs (opaque
    to the API), or None when ``training`` is False.

``backward(saved, dy, *dstate_n, return_step_norms=False) -> (dx, dw_ih, dw_hh, db, *dstate0)``
    dy [T, B, H] and one [B, H] upstream gradient per state, never None. ``db`` is the
    gradient of the folded bias, in its layout (the API unfolds it into db_ih and db_hh),
    None when forward had no bias. With ``return_step_norms=True`` one [T] float64 array
    per state follows: ``‖∂L/∂h_t‖`` (and ``‖∂L/∂c_t‖`` for the LSTM) over batch and units.

Optionally (``saved_arrays``, a :class:`SavedArrays`), a backend describes ``saved``
as a fixed list of arrays beyond forward's own inputs, so that callers that can only
carry arrays between forward and backward (torch's custom ops: rnnkernels/torch/_ops.py)
keep them instead of running the forward again:

``layout(steps, batch, input_size, hidden, dtype) -> [(shape, dtype), ...]``
    the arrays' shapes and dtypes for an input of that size and dtype (what a fake
    tensor implementation needs). Every array is [T + k, B, ...] for a fixed k, index
    k + t holding step t (so segments of a batch can be laid side by side).
``to_arrays(saved) -> [array, ...]``  in that order and layout.
``from_arrays(x, w_ih, w_hh, has_bias, arrays) -> saved``
    ``saved`` again, from forward's x, w_ih, w_hh (as forward received them) and the
    arrays; backward on it gives what backward on the original gives, bit for bit.

All arrays a backend receives (the bias aside) share one floating dtype from ``compute_dtypes`` and
live on its ``device`` ("cpu": NumPy arrays, "cuda": CuPy arrays); it returns arrays
of the same kind and, except for the reference (always float64), the same dtype.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class SavedArrays:
    """How a backend's ``saved`` travels as a fixed list of arrays (see above)."""

    layout: Callable[..., list]
    to_arrays: Callable[[Any], list]
    from_arrays: Callable[..., Any]


@dataclass(frozen=True)
class Backend:
    """A registered backend: the functions above plus what the API must know."""

    name: str
    device: str  # "cpu" (NumPy arrays) or "cuda" (CuPy arrays)
    compute_dtypes: tuple[str, ...]  # input dtypes it accepts, e.g. ("float32",)
    forward: Callable[..., tuple]
    backward: Callable[..., tuple]
    # Called before use; raises a clear RuntimeError saying what to install when the
    # backend cannot run here (no CuPy, no GPU, no C++ compiler).
    check_available: Callable[[], None] = lambda: None
    # The saved state as arrays; None: callers that need arrays recompute the forward.
    saved_arrays: Optional[SavedArrays] = None

    def __reduce__(self):
        # A Backend is a module-level object registered in cells.py, and some of its
        # functions are lambdas or wrapped under their original names, which pickle
        # cannot name; a forward's saved state holds its Backend (rnnkernels.LSTM keeps
        # one between forward and backward), so it pickles as where it is registered.
        from . import cells

        for cell in cells.CELLS.values():
            for where in cell.implementations.values():
                module_name, attribute = where.split(":")
                module = sys.modules.get(module_name)  # a Backend in use was imported
                if module is not None and getattr(module, attribute, None) is self:
                    return _registered_backend, (where,)
        raise TypeError(f"cannot pickle the {self.name!r} Backend: it is not registered in rnnkernels.cells")

    # copy.copy and copy.deepcopy would go through __reduce__ too, and refuse a Backend
    # made outside cells.py (dataclasses.replace, a test's stand-in); a Backend is
    # immutable (frozen, functions and names), so it is its own copy.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _registered_backend(where: str) -> Backend:
    """The Backend at ``where`` ("module:ATTRIBUTE"), for unpickling."""
    module_name, attribute = where.split(":")
    return getattr(importlib.import_module(module_name), attribute)
