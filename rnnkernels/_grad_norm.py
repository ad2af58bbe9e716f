"""The fused sum of squares of many arrays (csrc/grad_norm.cu), written once for both
runtimes of :mod:`rnnkernels._launch` (CuPy on a GPU, the CPU emulator in CI).

    _grad_norm.sum_of_squares(rt, arrays, out)   # out[0] = Σ_k Σ_i arrays[k][i]², float64

Two launches whatever the number of arrays: ``grad_norm_partial`` reads all of them as
one virtual concatenation (a table of their addresses and the prefix sums of their
sizes), one float64 partial sum per block; ``grad_norm_finish`` adds the block sums in a
fixed order. Nothing synchronizes with the host: ``out`` stays on the device. The result
depends only on the data and the sizes (the chunk comes from the total size, not from
the device), so it is bitwise identical run after run and GPU after GPU.
"""

from __future__ import annotations

import numpy as np

from . import _launch
from ._launch import GRAD_NORM, GRAD_NORM_SOURCE

# Elements per block: at least 16 per thread, so the per-block work (finding the first
# array, the block reduction) stays small next to the reads; and at most MAX_BLOCKS
# blocks, ~8 per SM on a 132-SM H100, enough to cover the memory latency. The finishing
# block then adds at most MAX_BLOCKS / threads = 4 block sums per thread.
MIN_CHUNK = 16 * GRAD_NORM.threads
MAX_BLOCKS = 1024

_INT32_MAX = 2**31 - 1


def choose_chunk(total: int) -> int:
    """Elements per block for ``total`` elements: a multiple of the block size, at least
    MIN_CHUNK, and large enough that there are at most MAX_BLOCKS blocks."""
    threads = GRAD_NORM.threads
    chunk = max(MIN_CHUNK, -(-total // MAX_BLOCKS))
    return -(-chunk // threads) * threads


def _address(xp, array) -> int:
    """Device address of a contiguous array's first element (a host address for NumPy)."""
    return array.ctypes.data if isinstance(array, np.ndarray) else array.data.ptr


def sum_of_squares(rt, arrays, out, *, chunk: int | None = None) -> None:
    """``out[0] = Σ_k Σ_i arrays[k][i]²`` accumulated in float64, NaN and Inf propagated.

    ``rt``: a runtime of :mod:`rnnkernels._launch`; ``arrays``: a non-empty sequence of
    ``rt.xp`` arrays sharing one dtype (float16, float32 or float64), any shape, sizes
    0 allowed; non-contiguous arrays (and views) are copied to contiguous ones first.
    ``out``: a float64 ``rt.xp`` array of at least one element (a view such as
    ``totals[k:k+1]`` is fine); only ``out[0]`` is written. ``chunk``: elements per
    block, default :func:`choose_chunk` (tests set small ones to get many blocks)."""
    xp = rt.xp
    if not arrays:
        raise ValueError("sum_of_squares needs at least one array")
    dtype = np.dtype(arrays[0].dtype)
    if dtype.name not in GRAD_NORM.ELEMENT_TYPES:
        raise TypeError(f"the fused norm kernel takes float16, float32 or float64 arrays, got {dtype}")
    if any(np.dtype(a.dtype) != dtype for a in arrays):
        raise TypeError(f"sum_of_squares takes arrays of one dtype, got {sorted({str(a.dtype) for a in arrays})}")
    if out.dtype != np.float64 or out.size < 1:
        raise ValueError(f"out must be a float64 array with at least one element, got {out.dtype} {out.shape}")
    if len(arrays) > _INT32_MAX:
        raise ValueError(f"{len(arrays)} arrays exceed the 32-bit count the kernel takes")

    if getattr(rt, "sanitize", False):
        from . import emulator

        if not emulator._asan_loaded():
            raise RuntimeError(
                "the fused norm kernel reads arrays through a table of addresses, which the "
                "emulator's out-of-process AddressSanitizer cannot follow (it copies only the "
                "arrays passed as arguments); run Python with LD_PRELOAD=$(g++ "
                "-print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 to sanitize in-process"
            )

    # Contiguous arrays are used as they are; others are copied. `contiguous` holds every
    # array (copies included) until the launches are queued: CuPy's pool only reuses
    # freed memory on the same stream, after the kernels that read it.
    contiguous = [xp.ascontiguousarray(a) for a in arrays]
    sizes = np.array([a.size for a in contiguous], dtype=np.int64)
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    if total == 0:
        out[:1] = 0.0
        return
    chunk = choose_chunk(total) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    blocks = -(-total // chunk)
    _launch._check_grid((blocks, 1, 1), GRAD_NORM.partial_name(dtype.name))

    # One table, one transfer: [addresses..., ends...] as 64-bit integers.
    count = len(contiguous)
    table = np.empty(2 * count, dtype=np.int64)
    table[:count] = np.array([_address(xp, a) for a in contiguous], dtype=np.uint64).view(np.int64)
    table[count:] = ends
    device_table = xp.asarray(table)
    block_sums = xp.empty(blocks, dtype=np.float64)
    threads = (GRAD_NORM.threads, 1, 1)
    rt.function(GRAD_NORM_SOURCE, GRAD_NORM.partial_name(dtype.name))(
        (blocks, 1, 1),
        threads,
        (device_table[:count], device_table[count:], np.int32(count), np.int64(total), np.int64(chunk), block_sums),
    )
    rt.function(GRAD_NORM_SOURCE, GRAD_NORM.finish_name())(
        (1, 1, 1), threads, (block_sums, np.int32(blocks), out)
    )
    del contiguous  # alive until here, after both launches were queued
