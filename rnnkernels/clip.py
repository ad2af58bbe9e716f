r"""Global gradient-norm clipping with loud non-finite detection.

    norm = clip_grad_norm(grads, max_norm=1.0)

The global norm is ‖(g_1, …, g_n)‖₂ = √(Σ_k ‖g_k‖²) over every gradient in the set
(Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
networks", ICML: rescale the whole gradient when its norm exceeds a threshold, which
keeps its direction). When norm > max_norm every gradient is multiplied in place by
max_norm / (norm + eps); the norm before clipping is returned.

A NaN or Inf anywhere makes the norm non-finite. That is never scaled into the
parameters silently: by default a FloatingPointError names the gradients that hold it;
with ``error_if_nonfinite=False`` a RuntimeWarning names them, nothing is scaled and the
non-finite norm is returned so the caller can skip the step.

Arrays may be NumPy, CuPy or torch tensors (CPU or CUDA), mixed. Sums of squares
accumulate in float64 whatever the gradient dtype, so float16/float32 gradients whose
squares would overflow their own dtype still give the right norm. CuPy gradients are
grouped by dtype (float16, float32, float64) and each group is read once by ONE fused
launch over all its arrays (csrc/grad_norm.cu through rnnkernels/_grad_norm.py: square,
accumulate in float64 in a fixed order, no atomics, so bitwise deterministic; NaN and
Inf travel through the sum, so there is no separate isfinite pass and no temporary).
The per-dtype sums land in one device vector that comes to the host in one transfer,
the only synchronization (one per GPU when gradients live on several). Per-array norms
are computed only when that total is not finite, to name the offending arrays (or to
redo, with scaling, a float64 sum that overflowed on finite values): a second pass, in
that case only. torch tensors get one norm per tensor and one synchronization.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _arrays
from ._api import LSTMGrads, _HiddenGrads
from .modules import LSTMModuleGrads, ModuleGrads

__all__ = ["clip_grad_norm", "global_grad_norm", "LSTM_PARAMETER_FIELDS"]

LSTM_PARAMETER_FIELDS = ("dw_ih", "dw_hh", "db_ih", "db_hh")
"""The fields of an :class:`~rnnkernels.LSTMGrads` (or ``GRUGrads``, ``RNNGrads``: the
same names) that are parameter gradients, the ones clipped. dx, dh0 and dc0 are
gradients for whatever produced the input and the initial state; pass them in a dict to
include them."""


# ----------------------------------------------------------------------------- collecting


def _collect(grads, prefix: str, out: list) -> None:
    """Flatten ``grads`` into ``out`` as (name, array) pairs; None entries are skipped."""
    if grads is None:
        return
    if isinstance(grads, (LSTMGrads, _HiddenGrads)):  # any cell's layer gradients
        for field in LSTM_PARAMETER_FIELDS:
            _collect(getattr(grads, field), f"{prefix}.{field}", out)
        return
    if isinstance(grads, (LSTMModuleGrads, ModuleGrads)):  # the NumPy modules' backward: their parameters
        _collect(grads.params, f"{prefix}.params", out)
        return
    if _is_array(grads):
        out.append((prefix, grads))
        return
    if isinstance(grads, Mapping):
        for key, value in grads.items():
            _collect(value, f"{prefix}[{key!r}]", out)
        return
    if isinstance(grads, (str, bytes)) or not hasattr(grads, "__iter__"):
        raise TypeError(
            f"{prefix} must be an array (NumPy, CuPy, torch), an LSTMGrads (GRUGrads, RNNGrads), an LSTMModuleGrads, "
            "or a dict or "
            f"iterable of those; got {type(grads).__name__}"
        )
    for index, value in enumerate(grads):
        _collect(value, f"{prefix}[{index}]", out)


def _is_array(obj) -> bool:
    return isinstance(obj, np.ndarray) or _arrays._is_cupy_array(obj) or _arrays._is_torch_tensor(obj)


def _gather(grads, in_place: bool) -> list[tuple[str, Any]]:
    found: list = []
    _collect(grads, "grads", found)
    unique, seen = [], set()
    for name, array in found:
        if id(array) in seen:  # the same array listed twice counts (and is scaled) once
            continue
        seen.add(id(array))
        dtype = _arrays.array_dtype(array)
        if _arrays._is_torch_tensor(array):
            if not array.is_floating_point():
                raise TypeError(f"{name} must be a floating-point gradient, got {_arrays.dtype_name(array)}")
        elif dtype is None or dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point gradient, got dtype {_arrays.dtype_name(array)}")
        if in_place and isinstance(array, np.ndarray) and not array.flags.writeable:
            raise ValueError(f"{name} is read-only; clip_grad_norm scales gradients in place")
        unique.append((name, array))
    return unique


# ----------------------------------------------------------------------------- norms per library


def _numpy_norm(a: np.ndarray) -> float:
    """‖a‖₂ in float64; exact for finite arrays whose squares overflow float64."""
    flat = a.reshape(-1).astype(np.float64, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        squares = float(np.dot(flat, flat))
    if math.isfinite(squares) or not np.isfinite(flat).all():
        return math.sqrt(squares)  # nan or inf when a value is
    largest = float(np.max(np.abs(flat)))  # finite values whose squares overflow
    scaled = flat / largest
    return largest * math.sqrt(float(np.dot(scaled, scaled)))


def _fused_sums(rt, arrays: list, groups: list[list[int]]) -> list[float]:
    """Σ x² in float64 over each group of ``arrays`` (``rt.xp`` arrays; a group holds the
    indices of arrays of one dtype): one fused launch per group, then one transfer of
    all the sums, the only synchronization."""
    from . import _grad_norm
    from ._launch import GRAD_NORM

    xp = rt.xp
    sums = xp.empty(len(groups), dtype=np.float64)
    for slot, group in enumerate(groups):
        members = [arrays[k] for k in group]
        if members[0].dtype.name not in GRAD_NORM.ELEMENT_TYPES:  # a float dtype the kernel lacks
            members = [m.astype(np.float64) for m in members]
        _grad_norm.sum_of_squares(rt, members, sums[slot : slot + 1])
    to_host = getattr(xp, "asnumpy", np.asarray)
    return [float(v) for v in to_host(sums)]


def _fused_norms(rt, arrays: list) -> tuple[list[float], list[float] | None]:
    """``(parts, norms)`` for ``arrays`` on runtime ``rt`` (rnnkernels/_launch.py): one
    fused launch per dtype gives one part per dtype, and ``norms`` is None. Only when a
    part is not finite, a second pass computes each array's own norm (one launch per
    array, one transfer; the host rescales a float64 sum that overflowed on finite
    values), and those norms are both the parts and ``norms``, to name the culprits."""
    by_dtype: dict[str, list[int]] = {}
    for k, array in enumerate(arrays):
        by_dtype.setdefault(array.dtype.name, []).append(k)
    sums = _fused_sums(rt, arrays, list(by_dtype.values()))
    if all(math.isfinite(v) for v in sums):
        return [math.sqrt(v) for v in sums], None
    singles = _fused_sums(rt, arrays, [[k] for k in range(len(arrays))])
    norms = [_finish_device_norm(math.sqrt(v), a) for v, a in zip(singles, arrays)]
    return norms, norms


def _cupy_norms(named: list[tuple[str, Any]], indices: list[int], norms: list) -> list[float]:
    """The global-norm parts of the CuPy gradients ``named[k]``, k in ``indices``, per
    GPU through :func:`_fused_norms`; fills ``norms[k]`` when those were computed."""
    from ._launch import CupyRuntime

    by_device: dict[int, list[int]] = {}
    for k in indices:
        by_device.setdefault(named[k][1].device.id, []).append(k)
    parts: list[float] = []
    for members in by_device.values():
        arrays = [named[k][1] for k in members]
        with arrays[0].device:
            device_parts, device_norms = _fused_norms(CupyRuntime(), arrays)
        parts.extend(device_parts)
        if device_norms is not None:
            for k, norm in zip(members, device_norms):
                norms[k] = norm
    return parts


def _torch_norms(tensors: list):
    """Per-tensor norms (float64 accumulation) as one float64 tensor (no sync)."""
    torch = sys.modules["torch"]
    return torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors])


def _norms(named: list[tuple[str, Any]]) -> tuple[list[float], list[float | None]]:
    """``(parts, norms)``: the global norm is ``_combine(parts)``; ``norms[k]`` is
    ‖g_k‖₂ for NumPy and torch gradients, and for CuPy ones only when their fused total
    was not finite (None otherwise: they are then all finite). One host synchronization
    per device library (per GPU for CuPy), two in CuPy's non-finite case."""
    norms: list[float | None] = [None] * len(named)
    cupy_idx, torch_idx = [], []
    for k, (_, array) in enumerate(named):
        if isinstance(array, np.ndarray):
            norms[k] = _numpy_norm(array)
        elif _arrays._is_cupy_array(array):
            cupy_idx.append(k)
        else:
            torch_idx.append(k)
    if torch_idx:
        device_norms = _torch_norms([named[k][1] for k in torch_idx]).cpu().numpy()  # one sync
        for k, norm in zip(torch_idx, device_norms):
            norms[k] = _finish_device_norm(float(norm), named[k][1])
    parts = [n for n in norms if n is not None]
    if cupy_idx:
        parts.extend(_cupy_norms(named, cupy_idx, norms))
    return parts, norms


def _finish_device_norm(norm: float, array) -> float:
    """``norm``, or, in the rare case a float64 sum of squares overflowed on finite
    values, the norm recomputed on the host with scaling (a second pass, only then)."""
    if not math.isinf(norm):
        return norm
    if _arrays._is_torch_tensor(array):
        host = array.detach().cpu().double().numpy()
    elif isinstance(array, np.ndarray):  # the emulated runtime's arrays
        host = array
    else:
        host = _arrays.import_cupy().asnumpy(array)
    return _numpy_norm(np.asarray(host))


def _combine(norms: list[float]) -> float:
    """√(Σ n_k²) without overflow when the n_k are large."""
    if not norms:
        return 0.0
    if any(math.isnan(n) for n in norms):
        return math.nan
    largest = max(norms)
    if largest == 0.0 or math.isinf(largest):
        return largest
    return largest * math.sqrt(sum((n / largest) ** 2 for n in norms))


# ----------------------------------------------------------------------------- public


def global_grad_norm(grads) -> float:
    """‖(g_1, …, g_n)‖₂ over the gradients in ``grads`` (as :func:`clip_grad_norm`
    collects them), without changing anything; NaN or Inf when one is."""
    return _combine(_norms(_gather(grads, in_place=False))[0])


def clip_grad_norm(grads, max_norm, *, eps=1e-6, error_if_nonfinite=True) -> float:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; return
    the global norm before clipping, as a Python float.

    ``grads``: an :class:`~rnnkernels.LSTMGrads`, ``GRUGrads`` or ``RNNGrads`` (their
    parameter gradients dw_ih, dw_hh, db_ih, db_hh; see :data:`LSTM_PARAMETER_FIELDS`), what ``rnnkernels.LSTM.backward``
    returns (its ``params``), one array, or a dict or iterable of arrays and those,
    nested as you like. None entries are skipped; an array
    listed twice counts once. Arrays are NumPy, CuPy or torch tensors.

    When the norm exceeds ``max_norm`` each gradient is multiplied by
    ``max_norm / (norm + eps)``; otherwise nothing is touched.

    Non-finite norm (a NaN or Inf in some gradient): with ``error_if_nonfinite`` (the
    default) a FloatingPointError names the gradients that hold one; otherwise a
    RuntimeWarning names them, nothing is scaled, and the NaN or Inf norm is returned.
    """
    max_norm = float(max_norm)
    if not max_norm > 0.0:  # also rejects NaN
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    eps = float(eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")

    named = _gather(grads, in_place=True)
    parts, norms = _norms(named)
    total = _combine(parts)
    if not math.isfinite(total):
        bad = ", ".join(
            f"{name} (norm {n})" for (name, _), n in zip(named, norms) if n is not None and not math.isfinite(n)
        )
        message = (
            f"clip_grad_norm: the global gradient norm is {total}: non-finite values in {bad}. "
            "Nothing was scaled."
        )
        if error_if_nonfinite:
            raise FloatingPointError(message + " Pass error_if_nonfinite=False to get the norm back instead.")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return total

    if total > max_norm:
        scale = max_norm / (total + eps)
        for _, array in named:
            _scale_in_place(array, scale)
    return total


def _scale_in_place(array, scale: float) -> None:
    if _arrays._is_torch_tensor(array):
        with sys.modules["torch"].no_grad():
            array.mul_(scale)
        return
    array *= array.dtype.type(scale)
