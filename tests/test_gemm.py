"""The large products (rnnkernels/_gemm.py): NumPy's in the emulator, cuBLAS's glue
with a fake cuBLAS that does the column-major arithmetic on host memory (so the
row-major -> column-major mapping, the scalars and the handle settings are checked
here, without a GPU), and the real cuBLAS on a GPU (marker ``gpu``): accuracy, float16
inputs, TF32 kept off whatever the handle was set to, determinism.
"""

from __future__ import annotations

import ctypes
import itertools
import types

import numpy as np
import pytest

from rnnkernels import _gemm

CASES = list(itertools.product((False, True), (False, True), (False, True), ("float32", "float16")))


def _operands(m, n, k, transpose_a, transpose_b, dtype, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if transpose_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(np.float32)
    return a, b, c


def _expected(a, b, c, transpose_a, transpose_b, accumulate):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    product = (a64.T if transpose_a else a64) @ (b64.T if transpose_b else b64)
    return product + c if accumulate else product


@pytest.mark.parametrize("transpose_a, transpose_b, accumulate, dtype", CASES)
def test_numpy_gemm_is_the_product_in_float32(transpose_a, transpose_b, accumulate, dtype):
    a, b, c = _operands(7, 5, 9, transpose_a, transpose_b, dtype)
    want = _expected(a, b, c, transpose_a, transpose_b, accumulate)
    a_before, b_before = a.copy(), b.copy()
    _gemm.numpy_gemm(a, b, c, transpose_a=transpose_a, transpose_b=transpose_b, accumulate=accumulate)
    assert np.abs(c - want).max() <= 1e-5 * np.abs(want).max()
    assert a.tobytes() == a_before.tobytes() and b.tobytes() == b_before.tobytes(), "inputs are never modified"


@pytest.mark.parametrize(
    "a, b, c, error, match",
    [
        (np.zeros((2, 3), np.float32), np.zeros((3, 4), np.float16), np.zeros((2, 4), np.float32), TypeError, "share"),
        (np.zeros((2, 3), np.float64), np.zeros((3, 4), np.float64), np.zeros((2, 4), np.float32), TypeError, "share"),
        (np.zeros((2, 3), np.float32), np.zeros((3, 4), np.float32), np.zeros((2, 4), np.float16), TypeError, "c must"),
        (np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32), ValueError, "match"),
        (np.zeros((2, 3), np.float32), np.zeros((3, 4), np.float32), np.zeros((4, 2), np.float32), ValueError, "match"),
        (np.zeros(3, np.float32), np.zeros((3, 4), np.float32), np.zeros((1, 4), np.float32), ValueError, "2-D"),
        (np.zeros((3, 2), np.float32).T, np.zeros((3, 4), np.float32), np.zeros((2, 4), np.float32), ValueError, "contig"),
    ],
)
def test_bad_operands_are_refused_naming_them(a, b, c, error, match):
    with pytest.raises(error, match=match):
        _gemm.numpy_gemm(a, b, c)


# --------------------------------------------------------------- cuBLAS, faked
class _DeviceArray:
    """A NumPy array posing as a CuPy one: ``.data.ptr`` is its host address."""

    def __init__(self, array):
        self.array = array
        self.data = types.SimpleNamespace(ptr=array.ctypes.data)

    def __getattr__(self, name):
        return getattr(self.array, name)


# cublasMath_t's CUBLAS_TF32_TENSOR_OP_MATH (cublas_api.h). CuPy's binding has no name
# for it (it has CUBLAS_DEFAULT_MATH and CUBLAS_TENSOR_OP_MATH only), so the tests that
# put a handle in TF32 mode spell the value out.
TF32_TENSOR_OP_MATH = 3


class _FakeCublas:
    """cublasGemmEx done in float64 on host memory, column-major as cuBLAS reads it;
    logs handle settings in order. Its constants are the real binding's values
    (test_cupy_cublas_binding_has_what_the_glue_calls holds them to it)."""

    CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
    CUBLAS_DEFAULT_MATH, CUBLAS_TF32_TENSOR_OP_MATH = 0, TF32_TENSOR_OP_MATH
    CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE = 0, 1
    CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
    CUBLAS_GEMM_DEFAULT = -1

    def __init__(self):
        self.log = []
        self.math_mode = self.CUBLAS_TF32_TENSOR_OP_MATH  # as CUPY_TF32=1 would leave it
        self.pointer_mode = self.CUBLAS_POINTER_MODE_DEVICE

    def getMathMode(self, handle):
        return self.math_mode

    def setMathMode(self, handle, mode):
        self.log.append(("math", mode))
        self.math_mode = mode

    def getPointerMode(self, handle):
        return self.pointer_mode

    def setPointerMode(self, handle, mode):
        self.log.append(("pointer", mode))
        self.pointer_mode = mode

    def setStream(self, handle, stream):
        self.log.append(("stream", handle, stream))

    @staticmethod
    def _matrix(ptr, data_type, rows, cols, ld):
        """Column-major rows x cols at ptr with leading dimension ld, as float64."""
        dtype = {0: np.float32, 2: np.float16}[data_type]
        flat = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint16 if dtype == np.float16 else ctypes.c_float)), (ld * cols,))
        return flat.view(dtype).reshape(cols, ld)[:, :rows].T.astype(np.float64)

    def gemmEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
               compute, algo):
        self.log.append(("gemmEx", compute, algo, self.math_mode, self.pointer_mode))
        assert Atype == Btype and Ctype == 0
        alpha_value = ctypes.c_float.from_address(alpha).value
        beta_value = ctypes.c_float.from_address(beta).value
        op_a = self._matrix(A, Atype, *((m, k) if transa == self.CUBLAS_OP_N else (k, m)), lda)
        op_b = self._matrix(B, Btype, *((k, n) if transb == self.CUBLAS_OP_N else (n, k)), ldb)
        op_a = op_a if transa == self.CUBLAS_OP_N else op_a.T
        op_b = op_b if transb == self.CUBLAS_OP_N else op_b.T
        c_flat = np.ctypeslib.as_array(ctypes.cast(C, ctypes.POINTER(ctypes.c_float)), (ldc * n,))
        c = c_flat.reshape(n, ldc)[:, :m].T
        c[...] = alpha_value * (op_a @ op_b) + beta_value * c


def _fake_cupy(stream_ptr=0xABC):
    device = types.SimpleNamespace(get_cublas_handle=lambda: 0x4A)
    cuda = types.SimpleNamespace(device=device, get_current_stream=lambda: types.SimpleNamespace(ptr=stream_ptr))
    return types.SimpleNamespace(cuda=cuda)


@pytest.mark.parametrize("transpose_a, transpose_b, accumulate, dtype", CASES)
def test_cublas_glue_computes_the_row_major_product(transpose_a, transpose_b, accumulate, dtype):
    """Row-major C = op(A)·op(B) (+ C) through the column-major call: operands swapped,
    M and N swapped, leading dimensions the row lengths; checked by doing the
    arithmetic cuBLAS would do on the very pointers we pass."""
    a, b, c = _operands(7, 5, 9, transpose_a, transpose_b, dtype, seed=1)
    want = _expected(a, b, c, transpose_a, transpose_b, accumulate)
    cublas = _FakeCublas()
    _gemm.cublas_gemm(
        _fake_cupy(), _DeviceArray(a), _DeviceArray(b), _DeviceArray(c), transpose_a=transpose_a,
        transpose_b=transpose_b, accumulate=accumulate, cublas=cublas,
    )
    assert np.abs(c - want).max() <= 1e-5 * np.abs(want).max()


def test_cublas_glue_settings_exact_fp32_on_the_callers_stream():
    """The caller's current stream on the handle; default math (never TF32) and host
    pointers during the call, compute type 32F; the handle's modes put back after."""
    a, b, c = _operands(4, 3, 2, False, True, "float32")
    cublas = _FakeCublas()
    _gemm.cublas_gemm(_fake_cupy(0x57EA), _DeviceArray(a), _DeviceArray(b), _DeviceArray(c), transpose_b=True,
                      cublas=cublas)
    assert cublas.log == [
        ("stream", 0x4A, 0x57EA),
        ("math", cublas.CUBLAS_DEFAULT_MATH),
        ("pointer", cublas.CUBLAS_POINTER_MODE_HOST),
        ("gemmEx", cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT, cublas.CUBLAS_DEFAULT_MATH,
         cublas.CUBLAS_POINTER_MODE_HOST),
        ("pointer", cublas.CUBLAS_POINTER_MODE_DEVICE),
        ("math", cublas.CUBLAS_TF32_TENSOR_OP_MATH),
    ]


def test_cublas_glue_empty_sizes_call_nothing():
    cublas = _FakeCublas()
    c = np.ones((3, 4), np.float32)
    _gemm.cublas_gemm(_fake_cupy(), _DeviceArray(np.zeros((3, 0), np.float32)),
                      _DeviceArray(np.zeros((0, 4), np.float32)), _DeviceArray(c), accumulate=True, cublas=cublas)
    assert (c == 1).all()  # an empty sum added: unchanged
    _gemm.cublas_gemm(_fake_cupy(), _DeviceArray(np.zeros((3, 0), np.float32)),
                      _DeviceArray(np.zeros((0, 4), np.float32)), _DeviceArray(c), cublas=cublas)
    assert (c == 0).all()
    assert cublas.log == []


def test_cupy_cublas_binding_has_what_the_glue_calls():
    """The binding's names and constants (a CuPy or cuBLAS upgrade that renames one
    fails here, not in a GPU session); needs the cuBLAS library, not a GPU."""
    pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        cublas = _gemm._cublas()
    except ImportError as error:
        pytest.skip(f"the cuBLAS library is not installed: {error}")
    from cupy_backends.cuda.api import runtime

    for name in ("gemmEx", "setStream", "getMathMode", "setMathMode", "getPointerMode", "setPointerMode",
                 "CUBLAS_OP_N", "CUBLAS_OP_T", "CUBLAS_DEFAULT_MATH", "CUBLAS_POINTER_MODE_HOST",
                 "CUBLAS_COMPUTE_32F", "CUBLAS_GEMM_DEFAULT"):
        assert hasattr(cublas, name), name
    assert cublas.CUBLAS_COMPUTE_32F != cublas.CUBLAS_COMPUTE_32F_FAST_TF32
    assert _gemm.CUDA_DATA_TYPES == {"float32": runtime.CUDA_R_32F, "float16": runtime.CUDA_R_16F}
    # The fake's constants are the binding's (cuBLAS's enum values), so the fake's log
    # checks what the real handle gets.
    for name in ("CUBLAS_OP_N", "CUBLAS_OP_T", "CUBLAS_DEFAULT_MATH", "CUBLAS_POINTER_MODE_HOST",
                 "CUBLAS_POINTER_MODE_DEVICE", "CUBLAS_COMPUTE_32F", "CUBLAS_COMPUTE_32F_FAST_TF32",
                 "CUBLAS_GEMM_DEFAULT"):
        assert getattr(_FakeCublas, name) == getattr(cublas, name), name
    assert (cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT, runtime.CUDA_R_16F) == (68, -1, 2)


# --------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def cupy():
    from conftest import cupy_or_skip

    return cupy_or_skip()


@pytest.mark.gpu
@pytest.mark.parametrize("transpose_a, transpose_b, accumulate, dtype", CASES)
def test_gpu_cublas_gemm_matches_float64(cupy, transpose_a, transpose_b, accumulate, dtype):
    a, b, c = _operands(300, 70, 513, transpose_a, transpose_b, dtype, seed=2)
    want = _expected(a, b, c, transpose_a, transpose_b, accumulate)
    c_device = cupy.asarray(c)
    _gemm.cublas_gemm(cupy, cupy.asarray(a), cupy.asarray(b), c_device, transpose_a=transpose_a,
                      transpose_b=transpose_b, accumulate=accumulate)
    got = cupy.asnumpy(c_device)
    # FP32 accumulation over K = 513 terms of size ~1: errors ~1e-6 relative; TF32
    # inputs (10-bit mantissas) would give ~1e-3.
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()


@pytest.mark.gpu
def test_gpu_cublas_gemm_never_tf32_and_restores_the_handle(cupy):
    """With CuPy's handle left in TF32 mode, our product is still exact FP32: inputs
    1 + 2^-20 (not representable in TF32's 10 mantissa bits) give 1 + 2^-19 (+2^-40,
    lost in float32) per term, which TF32 would round to exactly 1. The mode is
    restored afterwards."""
    from cupy_backends.cuda.libs import cublas

    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setMathMode(handle, TF32_TENSOR_OP_MATH)
    try:
        value = np.float32(1 + 2**-20)
        a = cupy.full((64, 8), value, dtype=np.float32)
        b = cupy.full((8, 64), value, dtype=np.float32)
        c = cupy.empty((64, 64), dtype=np.float32)
        _gemm.cublas_gemm(cupy, a, b, c)
        expected = np.float32(8 * np.float32(value * value))
        assert (cupy.asnumpy(c) == expected).all(), "the product lost input bits: TF32?"
        assert cublas.getMathMode(handle) == TF32_TENSOR_OP_MATH
    finally:
        cublas.setMathMode(handle, cublas.CUBLAS_DEFAULT_MATH)


@pytest.mark.gpu
def test_gpu_cublas_gemm_deterministic(cupy):
    a, b, c = _operands(1024, 768, 3072, True, False, "float32", seed=3)
    a, b = cupy.asarray(a), cupy.asarray(b)
    outputs = []
    for _ in range(3):
        c_device = cupy.empty((1024, 768), dtype=np.float32)
        _gemm.cublas_gemm(cupy, a, b, c_device, transpose_a=True)
        outputs.append(cupy.asnumpy(c_device).tobytes())
    assert outputs[0] == outputs[1] == outputs[2]
