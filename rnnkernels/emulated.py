"""``backend="emulated"``: the CUDA kernels of ``csrc/`` run on the CPU emulator: ``BACKEND`` (LSTM),
``GRU_BACKEND``, ``RNN_TANH_BACKEND`` and ``RNN_RELU_BACKEND`` (:func:`cell_backend`).

The same kernel text, the same instances and the same launch plan as
``backend="cuda"`` (``rnnkernels/_launch.py``), on NumPy arrays: this is how CI, which
has no GPU, tests every launch the GPU makes (the graph variant's captured launches
are recorded and replayed the same way). The large GEMMs, cuBLAS on a GPU, are
NumPy float32 products here (``rnnkernels/_gemm.py``): float32-accurate, but summed in
BLAS's order, not cuBLAS's, so this backend checks the launch plan and our kernels,
not cuBLAS's bits. It is slow (every CUDA thread runs on the CPU); use it for checking,
not for training.

dtypes: float32, and float16 with float32 math, exactly as ``backend="cuda"`` (see
its module docstring): float16 in and out, float32 arithmetic and saved states, the
recurrence on the float32 h_t. NumPy has no bfloat16, so neither backend offers it.
"""

from __future__ import annotations

from . import _launch
from ._backend import Backend


def check_available() -> None:
    """Raise a RuntimeError when the emulator cannot run here (no C++ compiler)."""
    try:
        from . import emulator
    except ImportError as error:
        raise RuntimeError("backend='emulated' needs rnnkernels.emulator, missing from this installation") from error
    if not emulator.compiler_available():
        raise RuntimeError("backend='emulated' needs a C++17 compiler (g++ or clang++) on PATH")


def cell_backend(kernels: _launch.CellKernels) -> Backend:
    """The ``emulated`` Backend of a cell: the contract of ``rnnkernels.cuda.cell_backend``
    on NumPy arrays, through the same launch plan (``_launch.cell_forward`` /
    ``cell_backward``)."""

    def forward(x, w_ih, w_hh, bias, *state0_and_training):
        return _launch.cell_forward(_launch.EmulatorRuntime(), kernels, x, w_ih, w_hh, bias, *state0_and_training)

    def backward(saved, dy, *dstate_n, return_step_norms=False):
        return _launch.cell_backward(_launch.EmulatorRuntime(), saved, dy, *dstate_n,
                                     return_step_norms=return_step_norms)

    return Backend(
        name="emulated",
        device="cpu",
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
