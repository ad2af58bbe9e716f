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
squares would overflow their own dtype still give the right norm. On the GPU each array
is read once by one fused reduction kernel (square, accumulate in float64; NaN and Inf
travel through the sum, so there is no separate isfinite pass and no temporary); the
per-array sums are stacked on the device and come to the host in one transfer, the
only synchronization. (One launch per array, not one multi-tensor launch for all.)
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _arrays
from ._api import LSTMGrads

__all__ = ["clip_grad_norm", "global_grad_norm", "LSTM_PARAMETER_FIELDS"]

LSTM_PARAMETER_FIELDS = ("dw_ih", "dw_hh", "db_ih", "db_hh")
"""The fields of an :class:`~rnnkernels.LSTMGrads` that are parameter gradients, the
ones clipped. dx, dh0 and dc0 are gradients for whatever produced the input and the
initial state; pass them in a dict to include them."""


# ----------------------------------------------------------------------------- collecting


def _collect(grads, prefix: str, out: list) -> None:
    """Flatten ``grads`` into ``out`` as (name, array) pairs; None entries are skipped."""
    if grads is None:
        return
    if isinstance(grads, LSTMGrads):
        for field in LSTM_PARAMETER_FIELDS:
            _collect(getattr(grads, field), f"{prefix}.{field}", out)
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
            f"{prefix} must be an array (NumPy, CuPy, torch), an LSTMGrads, or a dict or "
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


_cupy_kernel = None


def _cupy_sum_of_squares():
    """One reduction kernel: Σ x² accumulated in float64, for any float input dtype."""
    global _cupy_kernel
    if _cupy_kernel is None:
        cupy = _arrays.import_cupy()
        _cupy_kernel = cupy.ReductionKernel(
            "T x",  # in: the gradient, any float dtype
            "float64 total",  # out: the sum of squares
            "(double)x * (double)x",  # map
            "a + b",  # reduce (NaN and Inf propagate)
            "total = a",  # post
            "0.0",  # identity
            "rnnkernels_sum_of_squares",
        )
    return _cupy_kernel


def _device_sums(arrays: list) -> Any:
    """Per-array sums of squares of CuPy arrays as one float64 CuPy vector (no sync)."""
    cupy = _arrays.import_cupy()
    kernel = _cupy_sum_of_squares()
    return cupy.stack([kernel(a.reshape(-1)) for a in arrays])


def _torch_norms(tensors: list):
    """Per-tensor norms (float64 accumulation) as one float64 tensor (no sync)."""
    torch = sys.modules["torch"]
    return torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors])


def _per_array_norms(named: list[tuple[str, Any]]) -> list[float]:
    """‖g_k‖₂ for every gradient, with one host synchronization per device library."""
    norms: list[float | None] = [None] * len(named)
    cupy_idx, torch_idx = [], []
    for k, (_, array) in enumerate(named):
        if isinstance(array, np.ndarray):
            norms[k] = _numpy_norm(array)
        elif _arrays._is_cupy_array(array):
            cupy_idx.append(k)
        else:
            torch_idx.append(k)
    if cupy_idx:
        cupy = _arrays.import_cupy()
        sums = cupy.asnumpy(_device_sums([named[k][1] for k in cupy_idx]))  # the one sync
        for k, squares in zip(cupy_idx, sums):
            norms[k] = _finish_device_norm(math.sqrt(float(squares)), named[k][1])
    if torch_idx:
        device_norms = _torch_norms([named[k][1] for k in torch_idx]).cpu().numpy()  # one sync
        for k, norm in zip(torch_idx, device_norms):
            norms[k] = _finish_device_norm(float(norm), named[k][1])
    return norms


def _finish_device_norm(norm: float, array) -> float:
    """``norm``, or, in the rare case a float64 sum of squares overflowed on finite
    values, the norm recomputed on the host with scaling (a second pass, only then)."""
    if not math.isinf(norm):
        return norm
    if _arrays._is_torch_tensor(array):
        host = array.detach().cpu().double().numpy()
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
    return _combine(_per_array_norms(_gather(grads, in_place=False)))


def clip_grad_norm(grads, max_norm, *, eps=1e-6, error_if_nonfinite=True) -> float:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; return
    the global norm before clipping, as a Python float.

    ``grads``: an :class:`~rnnkernels.LSTMGrads` (its parameter gradients dw_ih, dw_hh,
    db_ih, db_hh; see :data:`LSTM_PARAMETER_FIELDS`), one array, or a dict or iterable
    of arrays and LSTMGrads, nested as you like. None entries are skipped; an array
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
    norms = _per_array_norms(named)
    total = _combine(norms)
    if not math.isfinite(total):
        bad = ", ".join(f"{name} (norm {n})" for (name, _), n in zip(named, norms) if not math.isfinite(n))
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
