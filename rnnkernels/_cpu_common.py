"""What the Numba cpu backends of every cell share (``cpu.py``: LSTM, ``cpu_gru.py``,
``cpu_rnn.py``): compiling a variant so that Numba's on-disk cache hits, the packed
step product, the rule that picks the serial or the parallel variant, the thread
count, the all-steps input projection and the weight gradients (``weight_gradient``:
on the packed kernel, so that a call runs on Numba's thread pool only; cpu.py's
"Threading policy"). A cell's module keeps only its cell loops,
its two time loops and its single-step path; the design is the one ``cpu.py``'s
docstring describes.

Compiled variants: one *serial* and one *parallel* copy of each compiled function,
each under its own name in Numba's cache; float32 and float64 are signatures of each.
The time loop takes the parallel variant when Numba has more than one thread and a
step holds B > 1 rows and B·H >= PARALLEL_MIN_UNITS units (``parallel_steps``): its
step product splits the weight panels over the threads and its cell the batch rows,
one fork and join each per step, which only pays for that much work. The input
projection is one product, split over the threads from PARALLEL_MIN_MACS
multiply-adds up (``project``).
"""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import numba
import numpy as np

from . import _cpu_gemm, _fastmath

# Below this many hidden units per step (B·H), a parallel region costs more than it
# saves on a few cores. Measured on this project's 2-core x86 VM (LSTM, float32, two
# threads, paired against torch.nn.LSTM, `benchmarks/cpu_vs_torch.py --threads 2
# --parallel-min-units N`, quiet machine, 2026-12-01): at 128,16,256 (B·H = 4096) the
# parallel loop took inference from 1.41x torch to 1.03-1.04x (three runs) and training
# from 0.91x to 0.88-0.93x; at B·H = 1024 (B=8, H=128) it made both libraries slower (our
# loop 2.3 -> 3.3 ms, torch's 1.9 -> 3.1 ms: two thread pools on two cores), so 4096.
PARALLEL_MIN_UNITS = 4096
# Below this many multiply-adds a product is not split over threads (a fork costs some
# microseconds; 2^20 multiply-adds take about 30 µs on one core).
PARALLEL_MIN_MACS = 1 << 20
_PANEL_BYTES = _cpu_gemm.panel_width(np.float32) * 4  # the same for every dtype
# The weight gradients' blocking (``_weight_product``): rows per work item (a multiple of
# 4, the row block) and steps of K per block.
WEIGHT_ROW_CHUNK = 64
WEIGHT_K_BLOCK = 64


def _product(a, packed, out, bias):
    """out[:, :N] = a [R, K] @ M [K, N] (+ bias unless None) for M packed by
    ``_cpu_gemm.pack``; out [R, ≥N] C-contiguous, its columns past N get the zero
    padding's products (zeros, plus the bias's padding); bias [≥ out's columns], added
    by the kernel as it stores each tile. Groups of 4 panels (the parallel variant
    splits the groups); in each, blocks of 4 rows (by 2 panels at a time with
    AVX-512's 32 registers, else 1), and a last block of 1-3 rows through the kernel
    that keeps 8 accumulators busy."""
    rows = a.shape[0]
    full = rows - rows % 4
    rest = rows - full
    panels = packed.shape[0]
    # The kernel trusts these (it reads K from a and writes whole panels): check once.
    if a.shape[1] != packed.shape[1] or out.shape[0] != rows or out.shape[1] < panels * packed.shape[2]:
        raise ValueError("step product: a, packed and out do not fit together")
    if packed.shape[2] * a.itemsize != _PANEL_BYTES:
        raise ValueError("step product: packed was not made by _cpu_gemm.pack for this dtype")
    if bias is not None and bias.shape[0] < panels * packed.shape[2]:
        raise ValueError("step product: bias is shorter than the packed width")
    for group in numba.prange((panels + 3) // 4):
        first = 4 * group
        count = min(4, panels - first)
        if _cpu_gemm.TWO_PANEL_BLOCKS and count == 4:  # a compile-time constant
            for panel in range(first, first + 4, 2):
                for row in range(0, full, 4):
                    _cpu_gemm.tile4x2(a, row, packed, panel, out, bias)
        else:
            for panel in range(first, first + count):
                for row in range(0, full, 4):
                    _cpu_gemm.tile4x1(a, row, packed, panel, out, bias)
        if rest == 1 and count == 4:
            _cpu_gemm.tile1x4(a, full, packed, first, out, bias)
        elif rest == 2 and count == 4:
            _cpu_gemm.tile2x2(a, full, packed, first, out, bias)
            _cpu_gemm.tile2x2(a, full, packed, first + 2, out, bias)
        elif rest > 0:
            for panel in range(first, first + count):
                if rest == 1:
                    _cpu_gemm.tile1x1(a, full, packed, panel, out, bias)
                elif rest == 2:
                    _cpu_gemm.tile2x1(a, full, packed, panel, out, bias)
                else:
                    _cpu_gemm.tile3x1(a, full, packed, panel, out, bias)


def _weight_product(a_t, packed, out):
    """out[:, :N] = a_tᵀ @ M for a_t [K, R] and M [K, N] packed by ``_cpu_gemm.pack``:
    a weight gradient (dW = dzᵀ x, K = T·B). ``out`` [R, ≥ the packed width] must hold
    zeros on entry (the tiles add to it). The work is split into items of
    WEIGHT_ROW_CHUNK rows by one tile's panels (the parallel variant splits the items:
    enough of them at any of issue 12's sizes, where a split over panels alone left
    one item at I = 64); in each item K runs in blocks of WEIGHT_K_BLOCK, so that the
    block of packed panels (16 KiB for float32 with AVX-512) stays in L1 while every
    row block of the item reads it, and each output tile continues its sums block after
    block. Every output element is one item's, summed k = 0, 1, ... whatever the thread
    count."""
    steps = a_t.shape[0]
    rows = a_t.shape[1]
    panels = packed.shape[0]
    if packed.shape[1] != steps or out.shape[0] != rows or out.shape[1] < panels * packed.shape[2]:
        raise ValueError("weight product: a_t, packed and out do not fit together")
    if packed.shape[2] * a_t.itemsize != _PANEL_BYTES:
        raise ValueError("weight product: packed was not made by _cpu_gemm.pack for this dtype")
    step = 2 if _cpu_gemm.TWO_PANEL_BLOCKS else 1  # panels per tile
    groups = (panels + step - 1) // step
    chunks = (rows + WEIGHT_ROW_CHUNK - 1) // WEIGHT_ROW_CHUNK
    for item in numba.prange(groups * chunks):
        group = item // chunks
        first_row = (item % chunks) * WEIGHT_ROW_CHUNK
        last_row = min(first_row + WEIGHT_ROW_CHUNK, rows)
        full = last_row - (last_row - first_row) % 4
        panel = group * step
        count = min(step, panels - panel)
        for k0 in range(0, steps, WEIGHT_K_BLOCK):
            k1 = min(k0 + WEIGHT_K_BLOCK, steps)
            for row in range(first_row, full, 4):
                if count == 2:
                    _cpu_gemm.tile_t4x2(a_t, row, packed, panel, out, k0, k1)
                else:
                    _cpu_gemm.tile_t4x1(a_t, row, packed, panel, out, k0, k1)
            for p in range(panel, panel + count):
                if last_row - full == 1:
                    _cpu_gemm.tile_t1x1(a_t, full, packed, p, out, k0, k1)
                elif last_row - full == 2:
                    _cpu_gemm.tile_t2x1(a_t, full, packed, p, out, k0, k1)
                elif last_row - full == 3:
                    _cpu_gemm.tile_t3x1(a_t, full, packed, p, out, k0, k1)


def _step_product(a, packed, out):
    """``_product`` without a bias: the per-step product the time loops call (its
    interface unchanged for the cells' loops)."""
    product(a, packed, out, None)  # noqa: F821 - a global of each variant


# Numba's on-disk cache (cache=True) files a compiled function under its qualified name
# and first line, and keys the entry by its signature, its bytecode and a pickle of its
# closure. Two rules follow, and ``compile_function`` keeps both:
# * a closure over a jitted function never hits: the dispatcher pickles with an id that
#   is new in every process, so each process compiled anew and appended two files to
#   the cache. The loops therefore close over nothing; the dtype's activations come in
#   through the generic ``_fastmath.sigmoid``/``tanh``, and a variant's callees through
#   its globals;
# * ``parallel=`` is not part of the key: compiled from one function, the serial and
#   parallel variants shared one entry, and whichever compiled first in a process served
#   both. Each variant is therefore a copy of the function under its own name. The
#   name also carries a digest of _fastmath.py, _cpu_gemm.py and this file (the step
#   product), since Numba checks only the timestamp of the file the function is defined
#   in, and a time loop's cache entry holds its callees' code too.
# dtypes need nothing more: float32 and float64 are two signatures of one dispatcher.
SOURCE_DIGEST = hashlib.sha256(
    Path(_fastmath.__file__).read_bytes() + Path(_cpu_gemm.__file__).read_bytes() + Path(__file__).read_bytes()
).hexdigest()[:12]


def compile_function(py_func, variant, parallel, callees=None):
    """``py_func`` compiled as its own cached dispatcher named ``{name}_{variant}``,
    with ``callees`` (name: dispatcher) added to the globals it sees."""
    name = f"{py_func.__name__}_{variant}"
    func = types.FunctionType(py_func.__code__, dict(py_func.__globals__, **(callees or {})), name)
    # The vector width shapes the generated code but not the source: it is in the name.
    func.__qualname__ = f"{name}_{SOURCE_DIGEST}_v{_cpu_gemm.VECTOR_BYTES}"
    func.__doc__ = py_func.__doc__
    return numba.njit(
        nogil=True,
        cache=True,
        parallel=parallel,
        error_model="numpy",  # no zero-division branches: they stop vectorization
        # ``reassoc`` lets the norm sums in backward vectorize; everything else in the
        # cell loops is products, where it changes nothing but the last bit.
        fastmath={"contract", "reassoc"},
    )(func)


PRODUCT = {parallel: compile_function(_product, "parallel" if parallel else "serial", parallel) for parallel in (False, True)}
WEIGHT_PRODUCT = {
    parallel: compile_function(_weight_product, "parallel" if parallel else "serial", parallel)
    for parallel in (False, True)
}
STEP_PRODUCT = {
    parallel: compile_function(_step_product, "parallel" if parallel else "serial", False, {"product": PRODUCT[parallel]})
    for parallel in (False, True)
}


def compile_variant(label, parallel, cells, loops):
    """One compiled variant of a cell: ``cells`` (attribute name: Python function)
    compiled with ``parallel``, the step product of that variant, and ``loops`` (the
    time loops) compiled serial, since each step needs the last; in the parallel
    variant their callees (every cell and ``step_product``, through their globals) fork
    and join once per step. Returns a namespace of dispatchers by attribute name;
    ``label`` ("serial", "tanh_parallel" ...) names them in the cache."""
    variant = types.SimpleNamespace()
    callees = {"step_product": STEP_PRODUCT[parallel]}
    for attribute, py_func in cells.items():
        callees[attribute] = compile_function(py_func, label, parallel)
    for attribute, py_func in loops.items():
        setattr(variant, attribute, compile_function(py_func, label, False, callees))
    for attribute, dispatcher in callees.items():
        setattr(variant, attribute, dispatcher)
    return variant


def compiled_functions(variants):
    """The dispatchers of ``variants`` ({label: namespace}) by name,
    ``{attribute}_{label}``: for tests and profiling (``dispatcher.stats.cache_hits``)."""
    return {
        f"{attribute}_{label}": dispatcher
        for label, variant in variants.items()
        for attribute, dispatcher in vars(variant).items()
    }


def threads():
    """Numba's thread count for the calling thread (numba.set_num_threads may lower it)."""
    return numba.get_num_threads()


def parallel_steps(batch, hidden):
    """Whether a time loop over steps of B x H takes the parallel variant: when Numba
    has more than one thread, B > 1 and B·H >= PARALLEL_MIN_UNITS (a fork and a join
    per step must pay). Both variants compute the same bits (tests/test_cpu.py and
    tests/test_cpu_cells.py check it), so the rule decides speed only."""
    return batch > 1 and batch * hidden >= PARALLEL_MIN_UNITS and threads() > 1


def project(a, packed, columns, bias=None):
    """a [M, K] @ M_packed (+ bias [columns]) as a new C-contiguous [M, columns] array
    (the packed matrix's first ``columns`` columns): one fork for the whole product,
    parallel when there is more than one thread and at least PARALLEL_MIN_MACS
    multiply-adds. A bias of a's dtype is added by the kernel as it stores each tile
    (no second pass over the output; the same bits as adding it after); one of another
    dtype by NumPy afterwards."""
    rows = a.shape[0]
    width = packed.shape[0] * packed.shape[2]
    parallel = rows * width * a.shape[1] >= PARALLEL_MIN_MACS and threads() > 1
    out = np.empty((rows, width), a.dtype)
    fused = None
    if bias is not None and bias.dtype == a.dtype:
        fused = np.zeros(width, a.dtype)  # the packed width: padding columns get 0
        fused[:columns] = bias
    PRODUCT[parallel](np.ascontiguousarray(a), packed, out, fused)
    out = out if width == columns else np.ascontiguousarray(out[:, :columns])
    if bias is not None and fused is None:
        out += bias
    return out


def weight_gradient(grad, inputs, columns):
    """gradᵀ @ inputs as a new C-contiguous [R, columns] array, for grad [K, R] and
    inputs [K, ≥columns] (their first ``columns`` columns): a weight gradient summed over
    K = T·B rows. On the packed kernel (``_weight_product``) rather than NumPy's BLAS, so
    that backward runs on one thread pool, Numba's: OpenBLAS's workers spin for about
    100 ms after each call, into the next forward and the caller's code (cpu.py's
    threading policy). Parallel on the same rule as ``project``."""
    steps, rows = grad.shape
    packed = _cpu_gemm.pack(inputs[:, :columns])
    width = packed.shape[0] * packed.shape[2]
    parallel = rows * width * steps >= PARALLEL_MIN_MACS and threads() > 1
    out = np.zeros((rows, width), grad.dtype)
    WEIGHT_PRODUCT[parallel](np.ascontiguousarray(grad), packed, out)
    return out if width == columns else np.ascontiguousarray(out[:, :columns])
