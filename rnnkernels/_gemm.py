"""The large "all steps at once" matrix products of the LSTM, on cuBLAS or NumPy.

One operation, used by ``rnnkernels/_launch.py`` through each runtime's ``gemm`` method
(:meth:`CupyRuntime.gemm <rnnkernels._launch.CupyRuntime.gemm>` calls :func:`cublas_gemm`,
:meth:`EmulatorRuntime.gemm <rnnkernels._launch.EmulatorRuntime.gemm>` calls
:func:`numpy_gemm`)::

    C[M, N] = op(A)[M, K] · op(B)[K, N]  (+ C when accumulate)

on row-major (C-contiguous) 2-D arrays. ``A`` and ``B`` share one dtype, float32 or
float16; ``C`` is float32. ``op(A)`` is ``A`` (stored [M, K]) or, with ``transpose_a``,
``Aᵀ`` (stored [K, M]); likewise ``B`` (stored [K, N], or [N, K] with ``transpose_b``).

cuBLAS (``backend="cuda"``): one ``cublasGemmEx`` per product, called through CuPy's
binding (``cupy_backends.cuda.libs.cublas``, CuPy's own cuBLAS handle for the current
device) on the caller's current CuPy stream, which is set on the handle before every
call (CuPy's handle is shared, and its stream is whatever the last user set).

* Exact FP32, never TF32: the compute type is ``CUBLAS_COMPUTE_32F`` (not
  ``..._FAST_TF32``), and the handle's math mode is set to ``CUBLAS_DEFAULT_MATH`` for the
  call (the mode is sticky per handle: ``CUPY_TF32=1`` makes CuPy's own ``matmul`` set
  ``CUBLAS_TF32_TENSOR_OP_MATH``, which would let cuBLAS round a COMPUTE_32F product's
  inputs to TF32) and put back afterwards. We never call ``cupy.matmul``, so CuPy's
  compute-type setting (``CUPY_TF32``, ``cupy._core.set_compute_type``) plays no part.
* float16: A and B float16, C float32, compute type 32F: products of two float16 values
  are exact in float32 and the sums are float32 (tensor cores may do them; that is
  float16 × float16 with float32 accumulation, not a loss of input precision).
* Deterministic: cuBLAS documents bitwise-identical results run to run for one toolkit
  version on GPUs of one architecture and SM count, *when a single stream is active*;
  concurrent streams sharing a handle may get a different internal workspace choice
  (cuBLAS docs, "Results reproducibility"; the fixes it lists are a workspace or a handle
  per stream, or ``CUBLAS_WORKSPACE_CONFIG=:4096:8``). The atomics mode that makes some
  routines non-reproducible (``cublasSetAtomicsMode``) concerns symv/hemv, not gemm, and
  we leave it at its default (not allowed). Across toolkit versions or GPUs the bits may
  differ (another algorithm may be picked): compare with a tolerance there.
* Pointer mode: alpha and beta are host scalars, so the handle's pointer mode is set to
  host for the call and put back.

NumPy (``backend="emulated"``): the same products with ``numpy.matmul`` in float32
(float16 operands widened to float32 first, which is exact). BLAS sums in another order
than cuBLAS, so the emulated backend's GEMM results are float32-accurate but not
cuBLAS's bits: the emulator checks the launch plan and our own kernels, not cuBLAS.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

# numpy dtype name -> cudaDataType (library_types.h); the values CuPy's
# cupy_backends.cuda.api.runtime.CUDA_R_32F / CUDA_R_16F carry, written out so that
# the glue can be tested with a fake cuBLAS where CuPy has none.
CUDA_DATA_TYPES = {"float32": 0, "float16": 2}


def check_operands(a, b, c, transpose_a: bool, transpose_b: bool) -> tuple[int, int, int]:
    """(M, N, K) of the product, after checking shapes, dtypes and layouts: every
    mistake here would be a silent wrong answer from BLAS, so it is a ValueError or a
    TypeError naming the operand."""
    for name, array in (("a", a), ("b", b), ("c", c)):
        if array.ndim != 2:
            raise ValueError(f"gemm operand {name} must be 2-D, got shape {array.shape}")
        if not array.flags.c_contiguous:
            raise ValueError(f"gemm operand {name} must be C-contiguous")
    if a.dtype != b.dtype or a.dtype.name not in CUDA_DATA_TYPES:
        raise TypeError(f"gemm operands a and b must share one dtype of {tuple(CUDA_DATA_TYPES)}, got {a.dtype}, {b.dtype}")
    if c.dtype != np.float32:
        raise TypeError(f"gemm operand c must be float32, got {c.dtype}")
    m, k = (a.shape[1], a.shape[0]) if transpose_a else a.shape
    k_b, n = (b.shape[1], b.shape[0]) if transpose_b else b.shape
    if k != k_b or c.shape != (m, n):
        raise ValueError(
            f"gemm shapes do not match: op(a) {m}x{k}, op(b) {k_b}x{n}, c {c.shape[0]}x{c.shape[1]}"
        )
    return m, n, k


def numpy_gemm(a, b, c, *, transpose_a: bool = False, transpose_b: bool = False, accumulate: bool = False) -> None:
    """The product with NumPy in float32 (the emulated backend's GEMM; see the module
    docstring for how it differs from cuBLAS)."""
    check_operands(a, b, c, transpose_a, transpose_b)
    a32 = a.astype(np.float32, copy=False)  # float16 -> float32 is exact
    b32 = b.astype(np.float32, copy=False)
    product = np.matmul(a32.T if transpose_a else a32, b32.T if transpose_b else b32)
    if accumulate:
        c += product
    else:
        c[...] = product


def _cublas():
    """CuPy's cuBLAS binding (needs the cuBLAS library: nvidia-cublas from the cuda13
    extra, or a CUDA toolkit)."""
    from cupy_backends.cuda.libs import cublas

    return cublas


@contextmanager
def _handle_settings(cublas, handle: int, stream_ptr: int):
    """CuPy's cuBLAS handle set up for our calls: the caller's stream, default (non-TF32)
    math, host pointers; math and pointer mode put back on the way out."""
    math_mode = cublas.getMathMode(handle)
    pointer_mode = cublas.getPointerMode(handle)
    cublas.setStream(handle, stream_ptr)
    cublas.setMathMode(handle, cublas.CUBLAS_DEFAULT_MATH)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        yield
    finally:
        cublas.setPointerMode(handle, pointer_mode)
        cublas.setMathMode(handle, math_mode)


# alpha = 1, beta = 0 or 1 as host float32 scalars (compute type 32F takes float
# scalars); module-level so they outlive every call (cuBLAS reads them during the call).
_ONE = np.ones((), np.float32)
_ZERO = np.zeros((), np.float32)


def cublas_gemm(cupy, a, b, c, *, transpose_a: bool = False, transpose_b: bool = False,
                accumulate: bool = False, cublas=None) -> None:
    """The product with cublasGemmEx on the current CuPy device and stream (see the
    module docstring). ``cublas``: the binding, for tests; CuPy's by default."""
    m, n, k = check_operands(a, b, c, transpose_a, transpose_b)
    if m == 0 or n == 0:
        return
    if k == 0:  # an empty sum; cuBLAS would refuse the zero leading dimensions
        if not accumulate:
            c.fill(0)
        return
    cublas = cublas or _cublas()
    handle = cupy.cuda.device.get_cublas_handle()
    stream_ptr = cupy.cuda.get_current_stream().ptr
    data_type = CUDA_DATA_TYPES[a.dtype.name]
    # cuBLAS is column-major: a row-major [R, S] array is a column-major S x R matrix,
    # its transpose. So row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ:
    # B is cuBLAS's first operand, A its second, and each row-major array's row length
    # is its column-major leading dimension.
    with _handle_settings(cublas, handle, stream_ptr):
        cublas.gemmEx(
            handle,
            cublas.CUBLAS_OP_T if transpose_b else cublas.CUBLAS_OP_N,
            cublas.CUBLAS_OP_T if transpose_a else cublas.CUBLAS_OP_N,
            n,  # rows of Cᵀ
            m,  # columns of Cᵀ
            k,
            _ONE.ctypes.data,
            b.data.ptr,
            data_type,
            b.shape[1],
            a.data.ptr,
            data_type,
            a.shape[1],
            (_ONE if accumulate else _ZERO).ctypes.data,
            c.data.ptr,
            CUDA_DATA_TYPES["float32"],
            n,
            cublas.CUBLAS_COMPUTE_32F,
            cublas.CUBLAS_GEMM_DEFAULT,
        )
