"""proj_size (LSTM with a projection, torch.nn.LSTM's LSTMP) on the CUDA kernels'
machinery, for ``backend="cuda"`` (CuPy) and ``backend="emulated"`` (the CPU emulator).

The math is ``reference.forward_projected`` / ``backward_projected`` (see the
"projections" comment in rnnkernels/reference.py): the recurrence reads the projected
h_{t-1} [B, P], so the fused per-step kernels of the plain LSTM, whose product has
K = H, do not apply. Each step runs as a GPU library (cuDNN's LSTMP) would, on the
runtime's GEMM (cuBLAS; NumPy float32 in the emulator: rnnkernels/_gemm.py) and OUR
pointwise cells (csrc/lstm_forward.cu / lstm_backward.cu, ``lstm_projected_*_cell``):

forward, once:  gx[T·B, 4H] = x·W_ihᵀ + b                     (``_launch.input_projection``)
forward, step t:
    z_t  = gx[t] + h_{t-1}·W_hhᵀ    GEMM accumulated into gx[t] in place   [B, 4H]
    cell: i, f, g, o, c_t, r_t = o ⊙ tanh(c_t); saves the gates (training)
    h_t  = r_t·W_hrᵀ                GEMM into h_all[t+1]                    [B, P]
backward, before the loop: dh_all = dy (float32), dh_all[T-1] += dh_n
backward, step t = T-1 .. 0:
    dh_t = dy_t + dz_{t+1}·W_hh     GEMM accumulated into dh_all[t] (t < T-1)
    dr_t = dh_t·W_hr                GEMM                                    [B, H]
    cell: dc_t, dz_t (into dgates[t]), carry = dc_t·f, and r_t (from the saved gates
          and c: the forward's expression, so the forward's bits) into r_all[t]
backward, after the loop (one GEMM each, over all steps): dx = dz·W_ih,
    dW_ih = dzᵀ·x, dW_hh = dzᵀ·h_all[0:T], dh0 = dz_0·W_hh, dW_hr = dh_allᵀ·r_all,
    db = column_sum(dz) (our fixed-order kernel, as the plain LSTM's), dc0 = carry.

Saved for backward: gates [T, B, 4H], h_all [T+1, B, P], c_all [T+1, B, H], float32
(the same three arrays, by shape, as the reference's ``SavedProjected``; r is
recomputed by the backward cell instead of being kept: [T, B, H] less to save).

Precision: float32 problems are float32 throughout; float16 problems widen W_hh and
W_hr to float32 once per call (exact; cuBLAS multiplies two operands of one type, and
the states are float32), keep every workspace float32 and round y, h_n, c_n and the
gradients to float16 once, as the unprojected kernels do. CuPy compiles with
-ftz=true and the emulator flushes like the GPU (tests/test_ftz.py).

Variants: "step" (every GEMM and cell launch from Python, 3 per step forward, 3 per
step backward) and "graph" (those launches captured once per call shape and replayed:
CUDA stream capture records the cuBLAS calls with our kernels; the emulator's
recorder records its NumPy GEMMs with them, ``_launch.EmulatorRuntime.gemm``). The
graph's workspace is filled before each replay and what the caller keeps is copied out
(as ``_launch.run_steps`` does), so "graph" gives the bits of "step". There is no
persistent variant: a cooperative kernel would have to hold W_hh [4H, P] and W_hr
[P, H] slices and exchange both h_t and r_t across blocks each step (two grid-wide
hand-overs per step); left for later. Default: "graph".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _graph, _launch

VARIANTS = ("step", "graph")


@dataclass
class Saved:
    """What :func:`forward` keeps for :func:`backward`."""

    x: Any  # [T, B, I] input dtype (float32 or float16), like w_ih, w_hh, w_hr
    w_ih: Any  # [4H, I]
    w_hh: Any  # [4H, P]
    w_hr: Any  # [P, H]
    has_bias: bool
    gates: Any  # [T, B, 4H] float32 activated i, f, g, o
    h_all: Any  # [T+1, B, P] float32, h_all[0] = h0
    c_all: Any  # [T+1, B, H] float32, c_all[0] = c0


def _check_variant(variant: str | None) -> str:
    if variant is None:
        return "graph"
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS} (proj_size has no persistent variant), got {variant!r}")
    return variant


class _Arrays:
    """Named arrays (attribute access) for the step bodies below."""

    def __init__(self, arrays: dict) -> None:
        self.__dict__.update(arrays)


def _run(rt, variant: str, key: tuple, arrays: dict, outputs: tuple[str, ...], body) -> None:
    """``body(_Arrays(arrays))`` makes the launches (kernels and GEMMs). "step": on the
    caller's arrays. "graph": captured once per ``key`` and shapes over a workspace
    shaped like ``arrays`` (filled from them before each replay; ``outputs`` copied back
    after it), so both give the same bits."""
    if variant == "step":
        body(_Arrays(arrays))
        return
    names = tuple(sorted(arrays))
    # One workspace array per name: the arrays must be distinct, or a copy-back could
    # overwrite an output with a workspace the launches never wrote.
    if len({id(arrays[n]) for n in names}) != len(names):
        raise ValueError("internal error: the graph variant's arrays must be distinct")

    def build():
        workspace = {n: rt.xp.empty_like(arrays[n]) for n in names}
        with rt.capture() as captured:
            body(_Arrays(workspace))
        return workspace, captured.graph

    shapes = tuple((n, arrays[n].shape, arrays[n].dtype.str) for n in names)
    workspace, graph = _graph.cached_graph(rt, ("projected", *key, shapes), build)
    for n in names:
        workspace[n][...] = arrays[n]
    graph.launch()
    for n in outputs:
        arrays[n][...] = workspace[n]


def _check_inputs(x, w_ih, w_hh, w_hr, h0, c0):
    dtype = x.dtype
    if dtype.name not in _launch.STORAGE_TYPES:
        raise TypeError(f"x must be one of {tuple(_launch.STORAGE_TYPES)} for the CUDA kernels, got {dtype}")
    for name, a in (("w_ih", w_ih), ("w_hh", w_hh), ("w_hr", w_hr), ("h0", h0), ("c0", c0)):
        if a.dtype != dtype:
            raise TypeError(f"{name} must have x's dtype {dtype}, got {a.dtype}")


def forward(rt, x, w_ih, w_hh, bias, w_hr, h0, c0, training: bool, *, variant: str | None = None):
    """One layer, one direction, on runtime ``rt`` (``_launch.CupyRuntime`` or
    ``EmulatorRuntime``): ``x`` [T, B, I], ``w_ih`` [4H, I], ``w_hh`` [4H, P], ``bias``
    [4H] float32 (b_ih + b_hh) or None, ``w_hr`` [P, H], ``h0`` [B, P], ``c0`` [B, H],
    C-contiguous, one dtype of ``_launch.STORAGE_TYPES``. Returns ``(y [T, B, P], h_n,
    c_n, saved)`` in x's dtype; ``saved`` (:class:`Saved`) None unless ``training``."""
    variant = _check_variant(variant)
    _check_inputs(x, w_ih, w_hh, w_hr, h0, c0)
    xp = rt.xp
    f32 = np.float32
    steps, batch, input_size = x.shape
    proj, hidden = w_hr.shape
    _launch._check_sizes(steps, batch, input_size, hidden)
    cell = _launch.PROJECTED_CELL
    grid = (_launch._ceil_div(batch * hidden, cell.threads), 1, 1)
    name = cell.forward_name(training)
    _launch._check_grid(grid, name)

    gx = _launch.input_projection(rt, x, w_ih, bias)  # becomes z_t, step by step
    h_all = xp.empty((steps + 1, batch, proj), dtype=f32)
    h_all[0] = h0
    c_all = xp.empty((steps + 1 if training else 2, batch, hidden), dtype=f32)
    c_all[0] = c0
    arrays = {
        "gx": gx,
        # float16 weights widened once (exact); float32 ones copied so that a graph's
        # workspace never aliases a caller's array.
        "w_hh": w_hh.astype(f32), "w_hr": w_hr.astype(f32),
        "h_all": h_all, "c_all": c_all,
        "r": xp.empty((batch, hidden), dtype=f32),
        # Inference saves no gates: the kernel never touches this (distinct) pointer.
        "gates": xp.empty((steps, batch, 4 * hidden) if training else (1,), dtype=f32),
    }
    i32 = np.int32

    def body(a):
        kernel = rt.function(_launch.FORWARD_SOURCE, name)
        for t in range(steps):
            rt.gemm(a.h_all[t], a.w_hh, a.gx[t], transpose_b=True, accumulate=True)
            kernel(grid, (cell.threads, 1, 1), (a.gx, a.c_all, a.r, a.gates, i32(batch), i32(hidden), i32(t)))
            rt.gemm(a.r, a.w_hr, a.h_all[t + 1], transpose_b=True)

    _run(rt, variant, ("forward", training), arrays, ("h_all", "c_all", "gates") if training else ("h_all", "c_all"),
         body)
    y = h_all[1:].astype(x.dtype, copy=True)
    h_n = h_all[steps].astype(x.dtype, copy=True)
    c_n = c_all[steps if training else steps % 2].astype(x.dtype, copy=True)
    saved = Saved(x, w_ih, w_hh, w_hr, bias is not None, arrays["gates"], h_all, c_all) if training else None
    return y, h_n, c_n, saved


def backward(rt, saved: Saved, dy, dh_n, dc_n, *, variant: str | None = None):
    """Gradients of :func:`forward` from its ``saved``: ``dy`` [T, B, P], ``dh_n`` [B, P],
    ``dc_n`` [B, H] (x's dtype, C-contiguous). Returns ``(dx, dw_ih, dw_hh, db, dw_hr,
    dh0, dc0)`` in x's dtype, ``db`` (of b_ih + b_hh) None without a bias."""
    variant = _check_variant(variant)
    xp = rt.xp
    f32 = np.float32
    x, w_ih, w_hh, w_hr = saved.x, saved.w_ih, saved.w_hh, saved.w_hr
    steps, batch, input_size = x.shape
    proj, hidden = w_hr.shape
    gate_width = 4 * hidden
    rows = steps * batch
    cell = _launch.PROJECTED_CELL
    grid = (_launch._ceil_div(batch * hidden, cell.threads), 1, 1)
    name = cell.backward_name()
    _launch._check_grid(grid, name)

    dh_all = dy.astype(f32)  # a new float32 array: dy_t, to which dz_{t+1}·W_hh is added
    dh_all[steps - 1] += dh_n
    arrays = {
        "gates": saved.gates, "c_all": saved.c_all,
        "w_hh": w_hh.astype(f32), "w_hr": w_hr.astype(f32),
        "dh_all": dh_all,
        "carry": dc_n.astype(f32),  # a copy: read and overwritten every step
        "dr": xp.empty((batch, hidden), dtype=f32),
        "dz": xp.empty((steps, batch, gate_width), dtype=f32),
        "r_all": xp.empty((steps, batch, hidden), dtype=f32),
    }
    i32 = np.int32

    def body(a):
        kernel = rt.function(_launch.BACKWARD_SOURCE, name)
        for t in range(steps - 1, -1, -1):
            if t + 1 < steps:
                rt.gemm(a.dz[t + 1], a.w_hh, a.dh_all[t], accumulate=True)
            rt.gemm(a.dh_all[t], a.w_hr, a.dr)
            kernel(grid, (cell.threads, 1, 1),
                   (a.gates, a.c_all, a.dr, a.carry, a.dz, a.r_all, i32(batch), i32(hidden), i32(t)))

    _run(rt, variant, ("backward",), arrays, ("dh_all", "carry", "dz", "r_all"), body)

    product = _launch._product
    dz = arrays["dz"].reshape(rows, gate_width)
    dx = product(rt, dz, w_ih, x.dtype).reshape(steps, batch, input_size)
    dw_ih = product(rt, dz, x.reshape(rows, input_size), x.dtype, transpose_a=True)
    dw_hh = product(rt, dz, saved.h_all.reshape((steps + 1) * batch, proj)[:rows], x.dtype, transpose_a=True)
    dh0 = product(rt, dz[:batch], arrays["w_hh"], x.dtype)
    dw_hr = product(rt, dh_all.reshape(rows, proj), arrays["r_all"].reshape(rows, hidden), x.dtype, transpose_a=True)
    db = _launch._column_sum(rt, _launch.BACKWARD_SOURCE, dz, x.dtype.name) if saved.has_bias else None
    dc0 = arrays["carry"].astype(x.dtype, copy=True)
    return dx, dw_ih, dw_hh, db, dw_hr, dh0, dc0


def saved_from_arrays(x, w_ih, w_hh, w_hr, has_bias, arrays) -> Saved:
    """A :class:`Saved` from ``[gates, h_all, c_all]`` (what the torch op carries)."""
    from . import _arrays

    xp = np if isinstance(x, np.ndarray) else _arrays.import_cupy()
    gates, h_all, c_all = (xp.ascontiguousarray(a, dtype=np.float32) for a in arrays)
    return Saved(*(xp.ascontiguousarray(a) for a in (x, w_ih, w_hh, w_hr)), has_bias, gates, h_all, c_all)


def runtime(backend: str):
    """The runtime of ``backend`` ("cuda" or "emulated")."""
    if backend == "cuda":
        return _launch.CupyRuntime()
    if backend == "emulated":
        return _launch.EmulatorRuntime()
    raise ValueError(f"backend must be 'cuda' or 'emulated' here, got {backend!r}")
