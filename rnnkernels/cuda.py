"""``backend="cuda"``: the CUDA kernels of ``csrc/`` on an NVIDIA GPU, via CuPy: ``BACKEND`` (LSTM),
``GRU_BACKEND``, ``RNN_TANH_BACKEND`` and ``RNN_RELU_BACKEND`` (:func:`cell_backend`).

Arrays are CuPy arrays (the API converts DLPack / ``__cuda_array_interface__`` inputs);
every kernel and copy runs on the caller's current CuPy stream, on the device holding
``x``. Kernels are compiled with NVRTC through ``cupy.RawModule`` once per (source,
options, device) and cached on disk by CuPy. The launch plan is shared with
``backend="emulated"`` (``rnnkernels/_launch.py``). The large products (input
projection, dx, dW_ih, dW_hh, dh0) run on cuBLAS in exact FP32, never TF32 (float16
inputs: float16 products with float32 accumulation), deterministic on one stream
(``rnnkernels/_gemm.py``). The T step launches of a call are captured once per call
shape as a CUDA graph and replayed (``rnnkernels/_graph.py``).

dtypes: float32, and float16 with float32 math: float16 inputs are read as stored,
every product, sum and activation and every saved state is float32, and the outputs
(y, h_n, c_n) and gradients come back float16, each rounded once (to nearest even)
from its float32 value. The recurrence consumes the float32 h_t, not its float16
rounding, so it is more accurate than a framework keeping h_t in float16 between steps
(and y is not bitwise what such a framework would feed back). bfloat16 is not offered:
CuPy has no bfloat16 dtype.
"""

from __future__ import annotations

import ctypes
import os

from . import _launch
from ._backend import Backend

_INSTALL = "pip install rnnkernels[cuda13] (CUDA 13 driver) or rnnkernels[cuda12] (CUDA 12 driver)"


def check_available() -> None:
    """Raise a RuntimeError saying what is missing: CuPy, NVRTC or a GPU."""
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError(f"backend='cuda' needs CuPy: {_INSTALL}") from error
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError: no driver, or an unusable one
        if not nvidia_driver_present():
            # The CUDA runtime reports a missing driver as cudaErrorInsufficientDriver
            # ("CUDA driver version is insufficient"), which reads like an upgrade hint.
            raise RuntimeError(
                "backend='cuda' found no NVIDIA driver on this machine (no libcuda, no "
                "/proc/driver/nvidia): it needs an NVIDIA GPU and its driver. Use backend='cpu' here."
            ) from error
        raise RuntimeError(
            f"backend='cuda' found no usable NVIDIA GPU or driver ({error}); "
            "it needs an NVIDIA GPU with a CUDA driver. Use backend='cpu' elsewhere."
        ) from error
    if count == 0:
        raise RuntimeError("backend='cuda' found no NVIDIA GPU; use backend='cpu'")
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as error:
        raise RuntimeError(f"backend='cuda' needs the NVRTC library: {_INSTALL}") from error


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver at all: its kernel module's
    /proc entry (Linux) or a loadable driver library (libcuda, nvcuda.dll)."""
    if os.path.exists("/proc/driver/nvidia"):
        return True
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


# The kernels poll with __nanosleep and use 16-bit conversions and libcu++ atomics that
# need Volta's instructions; NVRTC checks are run for sm_80 and sm_90.
MIN_COMPUTE_CAPABILITY = 70


def _check_compute_capability(device) -> None:
    """A clear error on a GPU older than Volta (compute capability 7.0), instead of an
    NVRTC failure naming an intrinsic."""
    capability = int(device.compute_capability)
    if capability < MIN_COMPUTE_CAPABILITY:
        raise RuntimeError(
            f"backend='cuda' needs an NVIDIA GPU of compute capability 7.0 (Volta) or newer; GPU {device.id} "
            f"is {capability // 10}.{capability % 10}. Use backend='cpu' there."
        )


def _check_same_device(device_id: int, *arrays) -> None:
    for array in arrays:
        if array is not None and array.device.id != device_id:
            raise ValueError(f"all arrays must be on GPU {device_id}; one is on GPU {array.device.id}")


def cell_backend(kernels: _launch.CellKernels) -> Backend:
    """The ``cuda`` Backend of a cell: the backend contract (rnnkernels/_backend.py)
    ``forward(x, w_ih, w_hh, bias, *state0, training) -> (y, *state_n, saved)`` and
    ``backward(saved, dy, *dstate_n, return_step_norms=False) -> (dx, dw_ih, dw_hh, db,
    *dstate0)`` (+ one step-norm array per state), one state per ``kernels.recurrence.
    states`` (LSTM: h, c; GRU, Elman RNN: h), on the launch plan ``_launch.cell_forward``
    / ``cell_backward`` shares with ``backend="emulated"``; CuPy float32 or float16
    arrays (see the module docstring for float16's precision), ``bias`` and ``db`` in
    the API's folded layout."""

    def forward(x, w_ih, w_hh, bias, *state0_and_training):
        _check_same_device(x.device.id, w_ih, w_hh, bias, *state0_and_training[:-1])
        _check_compute_capability(x.device)
        with x.device:
            return _launch.cell_forward(_launch.CupyRuntime(), kernels, x, w_ih, w_hh, bias, *state0_and_training)

    def backward(saved, dy, *dstate_n, return_step_norms=False):
        device = saved.x.device
        _check_same_device(device.id, dy, *dstate_n)
        with device:
            return _launch.cell_backward(_launch.CupyRuntime(), saved, dy, *dstate_n,
                                         return_step_norms=return_step_norms)

    return Backend(
        name="cuda",
        device="cuda",
        compute_dtypes=("float32", "float16"),
        forward=forward,
        backward=backward,
        check_available=check_available,
        saved_arrays=_launch.cell_saved_arrays(kernels),
    )


BACKEND = cell_backend(_launch.LSTM_KERNELS)
GRU_BACKEND = cell_backend(_launch.GRU_KERNELS)
RNN_TANH_BACKEND = cell_backend(_launch.RNN_TANH_KERNELS)
RNN_RELU_BACKEND = cell_backend(_launch.RNN_RELU_KERNELS)
