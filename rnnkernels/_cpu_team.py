"""The after-loop products of the cpu backends' backward on ONE thread team: the BLAS's
gemm called from inside a Numba parallel region through a function pointer.

After the backward time loop three products remain, all over the K = T·B rows of the
gate gradients g [K, R] (R = gates·H; the GRU's dW_hh reads its own g_hh):

    dW_ih = gᵀ x [R, I],    dW_hh = g_hhᵀ h_{t-1} [R, H],    dx = g W_ih [K, I].

They run here in one parallel region (``_products``): each product's output rows are
cut into a FIXED list of chunks (``chunk_rows``: a function of the shape only, never
of the thread count), and the threads of Numba's team claim the chunks in order with
an atomic counter (``_cpu_sync.claim``) until none is left. Each chunk is one call of
the BLAS's single-threaded gemm (the BLAS is held at one thread around the region,
``_cpu_blas.one_blas_thread``) or, for dx where it wins, of our packed kernel on a
block of rows, or, for a weight gradient where ``tiled`` says so, of our gradient tiles
on a block of its rows (below). At one thread the same chunks run one after the other, so every output
bit is the same at any thread count (each chunk's bits depend only on its own call).

Why one team: before this, dW_ih ran on a one-worker Python executor thread while the
caller computed dW_hh, and dx in a parallel region of its own after. At two threads the
OpenMP worker that the persistent backward loop's region left spinning (libgomp spins
for a while after a region ends; GOMP_SPINCOUNT) held the second core while the
executor's thread wanted it: the dW phase took 3.1 ms at two threads against 2.9 at
one at (T,B,H) = 128,8,128, and halved with OMP_WAIT_POLICY=passive. Here the spinning
worker is the one that picks up the work.

The weight gradients on our own tiles (``TILES``, ``TILES_PAIR``; ``tiled`` is the rule,
on the shape and dtype alone): OpenBLAS's sgemm ran dW = gᵀ x, a long-K product with a
transposed A (K = T·B = 4096, R = 512, I = 128 at 512,8,128), at 73-87 GFLOP/s at one
thread, against 109-112 for our step tiles. ``_cpu_gemm``'s gradient tiles (4 rows of
R x 2 panels of columns) read g and x where they lie, row-major, with no packing: per k
they broadcast 4 adjacent elements of g's row k and load 4 vectors of x's row k. k runs
in blocks of GRADIENT_BLOCK = 128 rows; within a block the tile's sums start at zero
and are then added to the output (the first block's stored), in order, so the bits
are the shape's alone, as every chunk's must be; the blocks' partial sums also keep the
float32 error under OpenBLAS's (7e-5 against 1.3e-4 max abs at 512,8,128; one
sequential sum over all 4096 k: 7e-4). Where one g feeds both (the LSTM and the Elman
RNN pass the same array twice; the GRU has two), a ``TILES_PAIR`` chunk runs both
products for its rows in one pass over g, the same bits as two passes. Quiet, one
thread, 2-core Zen 4, thread CPU time (benchmarks/cpu/12_weight_gradient_tiles.py):
one gᵀ x at 99.5 / 101 / 112 / 76 / 101 GFLOP/s against OpenBLAS's 83 / 87 / 97 / 68 /
92 at (T,B,H) = 512,8,128 / 128,16,256 / 256,1,128 / 1024,4,64 / 128,8,128, and at
64,64,512 ([2048, 4096]ᵀ @ [4096, 512], a row of g 8 KB) 79 against 98: there the BLAS
stays (``tiled``: a row of g at most GRADIENT_MAX_ROW_BYTES). All three products of the
team, pairs against the BLAS: 0.87 / 0.96 / 0.89 / 0.86 / 0.94 (each alone: 0.90 / 0.96
/ 0.92 / 0.96 / 0.95). The whole LSTM training call against main's (the BLAS),
paired, quiet (benchmarks/cpu/08_against_checkout.py, 15 repeats, one thread): 0.946 /
0.977 / 1.005 / 0.929 / 0.972, and 1.013 (0.96-1.57) at 64,64,512, whose path did not
change; against torch at one thread, 512,8,128 went from 1.02 to 0.95 (0.87-1.00).
Only float32 with 512-bit vectors was measured, so float64 and AVX2 keep the BLAS.

The function pointer: the gemm's address is found once with ctypes in the BLAS library
threadpoolctl reports (``find_gemm``) and passed to the compiled code as a run-time
int64; ``_gemm32``/``_gemm64`` (llvmlite intrinsics, as ``_cpu_sync``'s) turn it into
an indirect call with the cblas signature. An address baked into the code as a
constant would differ per process, and Numba refuses to cache such a function; as an
argument, the compiled code is the same in every process and the on-disk cache hits.

Which symbols (``find_gemm``; the integer width is part of the ABI and must be known,
never guessed):
* OpenBLAS (``internal_api == "openblas"``) built with pthreads (threadpoolctl's
  ``threading_layer``; NumPy's wheels), 0.3.7 or later, with the symbol prefix and suffix
  threadpoolctl found (NumPy's wheels: ``scipy_cblas_sgemm64_``, older ones
  ``cblas_sgemm64_``, a plain build ``cblas_sgemm``): 64-bit integers when its
  ``openblas_get_config()`` lists USE64BITINT, else 32.
* MKL: ``cblas_sgemm_64`` (64-bit integers whatever the interface layer) where the
  library exports it, else ``cblas_sgemm`` with 32-bit integers unless
  MKL_INTERFACE_LAYER asks for ILP64.
* Anything else (BLIS, Accelerate, a BLAS threadpoolctl does not know): None, and the
  products run as before (``_cpu_blas.weight_gradients``: NumPy's products with the BLAS
  at one thread, side by side at two threads, then dx on the packed kernel).

Thread safety of concurrent single-thread calls: OpenBLAS built with threads (NumPy's
wheels: pthreads) takes its memory-buffer lock around its per-call buffers, and a call
made while its thread count is 1 runs the single-threaded driver in the calling thread
(the serialization of concurrent callers OpenBLAS 0.3.4 added, the level-3 lock of
driver/level3/level3_thread.c, is taken only by its multi-threaded driver, which a call
at one thread never reaches); OpenBLAS 0.3.7 added USE_LOCKING so that even builds
without threads are safe when called from several threads, and a test program for
exactly that (OpenBLAS's Changelog, 0.3.4 and 0.3.7). Older OpenBLAS (< 0.3.7) is not
used here (``MIN_OPENBLAS``), nor an OpenMP or single-threaded build (not checked here).
MKL is thread-safe by its documentation. tests/test_cpu_team.py runs the team's gemm
calls from two and three threads at once against a float64 product and one thread's
bits.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import _cpu_common, _cpu_gemm, _cpu_sync

# cblas's enum values (cblas.h: CBLAS_ORDER, CBLAS_TRANSPOSE), C ints in every ABI.
ROW_MAJOR = 101
NO_TRANS = 111
TRANS = 112
MIN_OPENBLAS = (0, 3, 7)
# The largest m, n, k or leading dimension a BLAS with 32-bit integers takes (a C int):
# ``_gemm32`` truncates its arguments to 32 bits, so larger ones never reach it (``fits``).
INT32_MAX = 2**31 - 1


class Gemm(NamedTuple):
    """A BLAS's cblas_sgemm and cblas_dgemm: their addresses and integer width."""

    library: str  # the file, for messages and tests
    sgemm: int
    dgemm: int
    wide: bool  # 64-bit integers (ILP64) rather than 32


def _address(dynlib, name):
    function = getattr(dynlib, name, None)
    return None if function is None else ctypes.cast(function, ctypes.c_void_p).value


def _version(text):
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(int(v) for v in match.groups()) if match else None


def _openblas_gemm(controller):
    # Only the pthreads build (NumPy's wheels), whose thread safety at one thread is
    # the module docstring's argument; an OpenMP build called from inside our own
    # OpenMP region, or a build without threads (safe only if built with USE_LOCKING,
    # which nothing reports), is left to the fallback.
    if getattr(controller, "threading_layer", None) != "pthreads":
        return None
    # threadpoolctl found the library's symbol affixes (scipy_ ... 64_) to call its
    # thread setter; the cblas symbols carry the same ones.
    prefix = getattr(controller, "_symbol_prefix", "")
    suffix = getattr(controller, "_symbol_suffix", "")
    config = getattr(controller.dynlib, f"{prefix}openblas_get_config{suffix}", None)
    if config is None:
        return None
    config.restype = ctypes.c_char_p
    text = (config() or b"").decode("ascii", "replace")
    version = _version(text)
    if version is None or version < MIN_OPENBLAS:
        return None
    sgemm = _address(controller.dynlib, f"{prefix}cblas_sgemm{suffix}")
    dgemm = _address(controller.dynlib, f"{prefix}cblas_dgemm{suffix}")
    if not (sgemm and dgemm):
        return None
    return Gemm(controller.filepath, sgemm, dgemm, "USE64BITINT" in text.split())


def _mkl_gemm(controller):
    sgemm = _address(controller.dynlib, "cblas_sgemm_64")
    dgemm = _address(controller.dynlib, "cblas_dgemm_64")
    if sgemm and dgemm:
        return Gemm(controller.filepath, sgemm, dgemm, True)
    if "ILP64" in os.environ.get("MKL_INTERFACE_LAYER", "").upper():
        return None
    sgemm = _address(controller.dynlib, "cblas_sgemm")
    dgemm = _address(controller.dynlib, "cblas_dgemm")
    return Gemm(controller.filepath, sgemm, dgemm, False) if sgemm and dgemm else None


_FINDERS = {"openblas": _openblas_gemm, "mkl": _mkl_gemm}


def find_gemm(controllers):
    """The first of threadpoolctl's BLAS ``controllers`` whose gemm we know how to call
    (module docstring), as a ``Gemm``; None if none."""
    for controller in controllers:
        finder = _FINDERS.get(getattr(controller, "internal_api", None))
        found = finder(controller) if finder else None
        if found is not None:
            return found
    return None


def fits(gemm, dimensions):
    """Whether ``gemm``'s integers hold every one of ``dimensions`` (the products' K, R_ih,
    I, R_hh, H: every m, n, k and leading dimension of the plan is one of them). False
    sends the products to the fallback, whose NumPy products check their BLAS's width."""
    return gemm.wide or max(dimensions) <= INT32_MAX


def _make_gemm(bits):
    """An intrinsic ``gemm(address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
    ldc)``: cblas_?gemm(RowMajor, ...) called through ``address``, with ``bits``-wide
    integers (the arguments: any integer type); a, b, c are addresses; alpha's type
    (float32 or float64) picks the real type, so ``address`` must be the matching ?gemm."""

    @intrinsic
    def gemm(typingctx, address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        integers = (address, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc)
        if not all(isinstance(t, types.Integer) for t in integers):
            return None
        if not (isinstance(alpha, types.Float) and beta == alpha):
            return None
        sig = types.void(address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

        def codegen(context, builder, signature, args):
            # Every integer as int64 first (addresses come as uintp, table entries as int64).
            args = [value if isinstance(kind, types.Float) else context.cast(builder, value, kind, types.int64)
                    for value, kind in zip(args, signature.args)]
            address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc = args
            real = context.get_value_type(signature.args[6])
            enum = ir.IntType(32)
            integer = ir.IntType(bits)
            pointer = real.as_pointer()
            function_type = ir.FunctionType(
                ir.VoidType(),
                [enum, enum, enum, integer, integer, integer, real, pointer, integer, pointer, integer, real,
                 pointer, integer],
            )
            function = builder.inttoptr(address, function_type.as_pointer())

            def int_(value):
                return value if bits == 64 else builder.trunc(value, integer)

            builder.call(function, [
                ir.Constant(enum, ROW_MAJOR), builder.trunc(trans_a, enum), builder.trunc(trans_b, enum),
                int_(m), int_(n), int_(k), alpha,
                builder.inttoptr(a, pointer), int_(lda),
                builder.inttoptr(b, pointer), int_(ldb), beta,
                builder.inttoptr(c, pointer), int_(ldc),
            ])
            return context.get_dummy_value()

        return sig, codegen

    return gemm


_gemm32 = _make_gemm(32)
_gemm64 = _make_gemm(64)

# The operands, in a tuple of 2-D arrays of one dtype (indexable at run time).
GRAD_IH, INPUTS, GRAD_HH, HIDDEN, W_IH, DW_IH, DW_HH, DX = range(8)
# A chunk, a row of the plan: one gemm (``BLAS``: C[m, n] = op(A) @ B, A, B and C given
# as operand, element offset and leading dimension), a block of dx's rows on the
# packed kernel (``PACKED``: rows m to n), or a block of a weight gradient's rows on our
# gradient tiles (``TILES``: the fields of the BLAS chunk it replaces, always Aᵀ B;
# ``weight_rows``), or, where dW_ih and dW_hh read the same g (the LSTM's), a block of
# both's rows in one pass over g (``TILES_PAIR``: dW_ih's fields; dW_hh's rows the same).
BLAS = 0
PACKED = 1
TILES = 2
TILES_PAIR = 3
_KIND, _TRANS_A, _M, _N, _K, _A, _A_AT, _LDA, _B, _B_AT, _LDB, _C, _C_AT, _LDC = range(14)
_FIELDS = 14


# Weight gradients on our tiles (``weight_rows``): k in blocks of this many rows, each
# block's sums added to the output (module docstring of the rule, ``tiled``).
GRADIENT_BLOCK = 128
# ... only where a row of g (A's rows are read with this stride) is at most this many
# bytes: each k then touches one page of A (``tiled``).
GRADIENT_MAX_ROW_BYTES = 4096


def _tile_row(a, b, out, row, k0, count, add):
    # One row block (4 rows of out) across all of b's columns: pairs of panels, then the
    # odd panel.
    columns = b.shape[1]
    panel = _cpu_gemm.VECTORS * (_cpu_gemm.VECTOR_BYTES // a.itemsize)
    pairs = columns - columns % (2 * panel)
    for column in range(0, pairs, 2 * panel):
        _cpu_gemm.gradient_tile4x2(a, b, out, row, column, k0, k0, count, add)
    if pairs < columns:
        _cpu_gemm.gradient_tile4x1(a, b, out, row, pairs, k0, k0, count, add)


def _weight_rows(a, b, out, b2, out2, first, end, pair):
    """out[first:end] = a[:, first:end]ᵀ @ b, and when ``pair`` out2[first:end] =
    a[:, first:end]ᵀ @ b2 in the same pass, for a [K, M], b [K, N], out [M, N] (b2, out2
    likewise), C-contiguous, one float dtype, with first, end and M multiples of 4 and
    N of the panel width (``tiled``): ``_cpu_gemm``'s gradient tiles, read straight from
    a and b. k runs in blocks of GRADIENT_BLOCK rows, in order; a block's sums are added
    to the output's (the first block's stored), so every element's bits depend on the
    shape alone (and are the same whether or not the pair shares the pass). Within a
    block: rows of 4, each across all columns of b (then of b2): the block's b, 64 KB at
    N = 128 float32, stays in the cache while a's rows stream, and the pair reads each
    of a's rows once for both products."""
    steps = a.shape[0]
    for k0 in range(0, steps, GRADIENT_BLOCK):
        count = min(GRADIENT_BLOCK, steps - k0)
        add = k0 > 0
        for row in range(first, end, 4):
            _tile_row(a, b, out, row, k0, count, add)
            if pair:
                _tile_row(a, b2, out2, row, k0, count, add)


def tiled(rows, columns, dtype):
    """Whether a weight gradient [rows, columns] = gᵀ x (g [K, rows]) runs on our tiles
    (``weight_rows``) rather than the BLAS's gemm: a rule on the shape and dtype alone.
    float32 with 512-bit vectors (the only case measured: benchmarks/cpu/12), rows a
    multiple of the tiles' 4 and columns of a panel (no partial tiles), and a row of g
    at most GRADIENT_MAX_ROW_BYTES: at [2048, 4096]ᵀ @ [4096, 512] (64,64,512; a row of
    8 KB) OpenBLAS won, 96 against 75 GFLOP/s, at the three others ours."""
    dtype = np.dtype(dtype)
    return (dtype == np.float32 and _cpu_gemm.TWO_PANEL_BLOCKS and rows % 4 == 0
            and columns % _cpu_gemm.panel_width(dtype) == 0 and rows * dtype.itemsize <= GRADIENT_MAX_ROW_BYTES)


def _products(plan, gemm_address, wide, counters, workers, operands, packed):
    """Every chunk of ``plan`` [chunks, _FIELDS] once, claimed in order by ``workers``
    workers (``_cpu_sync.claim``: one thread may run all of them). ``operands``: the
    arrays by the indices above; a PACKED chunk is dx[m:n] = g_ih[m:n] @ W_ih with
    W_ih ``packed`` (``_cpu_common``'s product, serial)."""
    count = plan.shape[0]
    out = operands[DX]
    one = out.dtype.type(1)
    zero = out.dtype.type(0)
    item = out.itemsize
    for _ in numba.prange(workers):
        while True:
            index = _cpu_sync.claim(counters)
            if index >= count:
                break
            task = plan[index]
            if task[_KIND] == PACKED:
                first, end = task[_M], task[_N]
                product(operands[GRAD_IH][first:end], packed, out[first:end], None)  # noqa: F821 - a global of each variant
                continue
            if task[_KIND] == TILES or task[_KIND] == TILES_PAIR:
                first = task[_A_AT]
                weight_rows(operands[task[_A]], operands[task[_B]], operands[task[_C]],  # noqa: F821
                            operands[HIDDEN], operands[DW_HH], first, first + task[_M], task[_KIND] == TILES_PAIR)
                continue
            a = operands[task[_A]].ctypes.data + task[_A_AT] * item
            b = operands[task[_B]].ctypes.data + task[_B_AT] * item
            c = operands[task[_C]].ctypes.data + task[_C_AT] * item
            if wide:
                _gemm64(gemm_address, task[_TRANS_A], NO_TRANS, task[_M], task[_N], task[_K], one,
                        a, task[_LDA], b, task[_LDB], zero, c, task[_LDC])
            else:
                _gemm32(gemm_address, task[_TRANS_A], NO_TRANS, task[_M], task[_N], task[_K], one,
                        a, task[_LDA], b, task[_LDB], zero, c, task[_LDC])


WEIGHT_ROWS = _cpu_common.compile_function(
    _weight_rows, "serial", False, {"_tile_row": _cpu_common.compile_function(_tile_row, "serial", False, inline=True)}
)
PRODUCTS = {
    parallel: _cpu_common.compile_function(
        _products, "parallel" if parallel else "serial", parallel,
        {"product": _cpu_common.PRODUCT[False], "weight_rows": WEIGHT_ROWS},
    )
    for parallel in (False, True)
}

# The chunks (``plan``): a function of the shape only, never of the thread count.
# Each chunk of a BLAS product is one gemm call that repacks the product's other
# operand, and at one thread that costs time (quiet, 2-core Zen 4, the three LSTM
# products alone, one thread, each product cut into 1 / 2 / 4 / 8 chunks: 4.79 / 4.91
# / 5.12 / 5.44 ms at (T,B,H) = 128,8,128, 18.70 / 19.24 / 20.11 / 20.16 at 512,8,128);
# the packed kernel's row blocks cost nothing extra (W_ih is packed once per call).
# So a weight gradient stays one call unless it is more than half of all the work,
# and dx, on the packed kernel, is cut into DX_CHUNKS row blocks that balance the
# threads at the end: with I = H the three products are equal, and 2 threads run a
# weight gradient and two dx blocks each, 3 threads a product each.
DX_CHUNKS = 4
ROW_ALIGN = 16  # a multiple of the packed kernel's 4-row blocks and of any SIMD width


def chunk_rows(rows, pieces):
    """Rows per chunk when ``rows`` output rows are cut into at most ``pieces``."""
    per_chunk = -(-rows // pieces)
    return max(ROW_ALIGN, -(-per_chunk // ROW_ALIGN) * ROW_ALIGN)


def _gemm_chunks(chunks, a, trans_a, a_shape, b, b_shape, c, pieces, kind=BLAS):
    """C = op(A) @ B's chunks (blocks of C's rows) as (multiply-adds, plan row), for
    operands a, b, c (indices) of C-contiguous shapes: op(A) = Aᵀ for trans_a (A
    [K, M]), else A [M, K]; B [K, N]; C [M, N]. ``kind`` TILES (trans_a only): on our
    gradient tiles, the same fields."""
    depth, columns = b_shape
    rows = a_shape[1] if trans_a else a_shape[0]
    lda = a_shape[1]
    step = chunk_rows(rows, pieces)
    for first in range(0, rows, step):
        count = min(step, rows - first)
        # op(A)'s rows first: columns of A when transposed, rows of A otherwise.
        a_at = first if trans_a else first * lda
        chunks.append((count * columns * depth, (kind, TRANS if trans_a else NO_TRANS, count, columns, depth,
                                                 a, a_at, lda, b, 0, columns, c, first * columns, columns)))


@functools.lru_cache(maxsize=64)
def plan(steps, rows_ih, input_size, rows_hh, hidden, dx_on_blas, tiles=(False, False), shared=False):
    """The chunks of the three products for K = ``steps`` rows, R_ih, I, R_hh, H (module
    docstring; ``DX_CHUNKS``), largest first, as a read-only int64 [chunks, _FIELDS]
    array; and the multiply-adds of all three. ``tiles``: dW_ih, dW_hh on our gradient
    tiles (``tiled``), else through the BLAS; ``shared``: both read the same g (then,
    both on the tiles, in TILES_PAIR chunks)."""
    macs_ih = steps * rows_ih * input_size  # dW_ih's and dx's each
    macs_hh = steps * rows_hh * hidden
    total = 2 * macs_ih + macs_hh
    chunks = []
    if shared and tiles[0] and tiles[1] and rows_ih == rows_hh:
        # One pass over g for both: dW_ih's chunks, each carrying dW_hh's same rows.
        pair = []
        _gemm_chunks(pair, GRAD_IH, True, (steps, rows_ih), INPUTS, (steps, input_size), DW_IH,
                     2 if 2 * (macs_ih + macs_hh) > total else 1, TILES_PAIR)
        chunks.extend((row[_M] * (input_size + hidden) * steps, row) for _, row in pair)
    else:
        _gemm_chunks(chunks, GRAD_IH, True, (steps, rows_ih), INPUTS, (steps, input_size), DW_IH,
                     2 if 2 * macs_ih > total else 1, TILES if tiles[0] else BLAS)
        _gemm_chunks(chunks, GRAD_HH, True, (steps, rows_hh), HIDDEN, (steps, hidden), DW_HH,
                     2 if 2 * macs_hh > total else 1, TILES if tiles[1] else BLAS)
    if dx_on_blas:
        _gemm_chunks(chunks, GRAD_IH, False, (steps, rows_ih), W_IH, (rows_ih, input_size), DX, DX_CHUNKS)
    else:
        step = chunk_rows(steps, DX_CHUNKS)
        for first in range(0, steps, step):
            end = min(steps, first + step)
            chunks.append(((end - first) * rows_ih * input_size, (PACKED, 0, first, end) + (0,) * (_FIELDS - 4)))
    # Largest first (a stable sort: the order, too, is the shape's alone): a thread that
    # finishes early takes the small blocks at the end.
    chunks.sort(key=lambda chunk: -chunk[0])
    table = np.array([row for _, row in chunks], np.int64).reshape(-1, _FIELDS)
    table.flags.writeable = False
    return table, total


def run(gemm, grad_ih, inputs, grad_hh, hidden_states, w_ih, dx_on_blas):
    """(dW_ih, dW_hh, dx) = (grad_ihᵀ inputs, grad_hhᵀ hidden_states, grad_ih W_ih) on
    one team (module docstring), through ``gemm`` (a ``Gemm``), for grad_ih [K, R_ih],
    inputs [K, I], grad_hh [K, R_hh], hidden_states [K, H], w_ih [R_ih, I], each
    C-contiguous of one dtype (float32 or float64), no dimension 0. dx by the BLAS when
    ``dx_on_blas``, else by the packed kernel. The caller holds the BLAS at one thread."""
    dtype = grad_ih.dtype
    (steps, rows_ih), input_size = grad_ih.shape, inputs.shape[1]
    rows_hh, hidden = grad_hh.shape[1], hidden_states.shape[1]
    tiles = (tiled(rows_ih, input_size, dtype), tiled(rows_hh, hidden, dtype))
    # The LSTM passes its one g as both (the GRU its two): a property of the cell.
    shared = grad_ih is grad_hh
    table, total = plan(steps, rows_ih, input_size, rows_hh, hidden, bool(dx_on_blas), tiles, shared)
    dw_ih = np.empty((rows_ih, input_size), dtype)
    dw_hh = np.empty((rows_hh, hidden), dtype)
    if dx_on_blas:
        packed = np.empty((0, 0, 0), dtype)
        dx = np.empty((steps, input_size), dtype)
    else:
        packed = _cpu_gemm.pack(w_ih)
        dx = np.empty((steps, packed.shape[0] * packed.shape[2]), dtype)  # the packed width
    parallel = _cpu_common.threads() > 1 and total >= _cpu_common.PARALLEL_MIN_MACS
    workers = _cpu_common.threads() if parallel else 1
    address = gemm.sgemm if dtype == np.float32 else gemm.dgemm
    operands = (grad_ih, inputs, grad_hh, hidden_states, w_ih, dw_ih, dw_hh, dx)
    PRODUCTS[parallel](table, address, gemm.wide, _cpu_sync.counters(), workers, operands, packed)
    if dx.shape[1] != input_size:
        dx = np.ascontiguousarray(dx[:, :input_size])
    return dw_ih, dw_hh, dx
