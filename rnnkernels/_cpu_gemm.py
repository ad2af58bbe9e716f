"""A register-blocked micro-kernel for the small per-step products of the cpu backend.

Per step the LSTM needs ``h_{t-1} W_hhᵀ`` (forward) and ``dz_t W_hh`` (backward): a few
rows (B) times a matrix the whole sequence reuses. A BLAS call repacks that matrix on
every call (about two thirds of the step's matmul time with OpenBLAS at B=16, H=256),
so the matrix is packed once per call here, into panels the kernel streams:

    packed [P, K, W]:  packed[p, k, c] = M[k, p·W + c]   (zero beyond M's N columns)

for the product ``A [R, K] @ M [K, N]``, with W = 2 vectors. A vector is one register
of the widest kind the target has: 64 bytes (16 float32, 8 float64) where Numba
compiles for a CPU with AVX-512F, 32 bytes (AVX2) elsewhere (``VECTOR_BYTES``). On
the 2-core Zen 4 the project builds on, 512-bit tiles ran the projection's and the
step's products 3-8% faster than 256-bit ones (same FMA throughput; half the
instructions and broadcasts per multiply-add; benchmarks/cpu/03_tile_shapes.py, in
thread CPU time, which a loaded machine disturbs least). One kernel call computes an
R x W tile of the output, R <= 4 rows: it keeps the R·2 accumulators in vector
registers for the whole k loop, and per k loads two vectors of the panel and
broadcasts one element of each row (R·2 FMAs for 2 + R loads). A tile can add a bias
row as it stores (``bias``: a 1-D array, or None for none): the sum over k first, then
one IEEE addition, the same bits as adding the bias afterwards, without a second pass
over the output. Numba cannot express "keep this tile in registers" (a local array
lives in memory, and LLVM cannot prove it does not alias the inputs), so the loop is
written here in LLVM IR through ``numba.extending.intrinsic``; it uses ``llvm.fma``
on ``<VW x float>``, which LLVM lowers to the best the host has (AVX2: one vfmadd;
SSE: two). The summation order over k is fixed (k = 0, 1, ...), whatever the thread
count or the vector width.
"""

from __future__ import annotations

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

VECTORS = 2  # vectors per tile row: R·VECTORS accumulators + 2 panel vectors + 1 broadcast
MAX_ROWS = 4  # 4 x 2 accumulators for float32 leave registers for loads (16 on AVX2)


def _vector_bytes() -> int:
    """64 where Numba compiles for a CPU with AVX-512F, else 32. Numba targets the host
    unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise (e.g. ``generic`` for a
    cache shared between machines): then only explicit ``+avx512f`` features give 64.
    A wrong guess costs speed, never correctness (LLVM splits a vector it cannot hold)."""
    if config.CPU_FEATURES is not None:
        return 64 if "+avx512f" in config.CPU_FEATURES.split(",") else 32
    if config.CPU_NAME not in (None, "host"):
        return 32
    return 64 if llvmlite.binding.get_host_cpu_features().get("avx512f", False) else 32


VECTOR_BYTES = _vector_bytes()


def vector_width(dtype) -> int:
    """Elements per vector (VECTOR_BYTES / itemsize)."""
    return VECTOR_BYTES // np.dtype(dtype).itemsize


def panel_width(dtype) -> int:
    return VECTORS * vector_width(dtype)


def pack(matrix_t, dtype=None):
    """Pack ``M = matrix_t`` [K, N] into [ceil(N/W), K, W] panels (zero-padded columns)."""
    matrix_t = np.asarray(matrix_t)
    width = panel_width(matrix_t.dtype)
    k, n = matrix_t.shape
    full, rest = divmod(n, width)
    packed = np.empty((full + (rest > 0), k, width), matrix_t.dtype)
    # One strided copy for the whole panels (a padded copy first, then a transposed
    # copy of it, read and wrote everything twice), then the last partial one.
    packed[:full] = matrix_t[:, : full * width].reshape(k, full, width).transpose(1, 0, 2)
    if rest:
        packed[full, :, :rest] = matrix_t[:, full * width :]
        packed[full, :, rest:] = 0
    return packed


def _fma_rows(builder, fma, undef, mask0, element, w, acc):
    """One k of a tile's loop, for both kinds of tile: each row r's element (at the
    pointer ``element(r)`` emits) broadcast to a vector and multiplied into that row's
    accumulators ``acc[r]`` with the panel vectors ``w`` (one ``llvm.fma`` each); the
    new sums, row by row."""
    new_acc = []
    for r, row in enumerate(acc):
        x = builder.load(element(r))
        xb = builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(ir.IntType(32), 0)), undef, mask0)
        new_acc.append([builder.call(fma, [xb, w[v], phi]) for v, phi in enumerate(row)])
    return new_acc


def _end_k_loop(builder, k, total, acc, new_acc, start, blocks):
    """Closes a tile's k loop (again while k + 1 < total) and returns, positioned at its
    exit block, each accumulator's value there: the zero vector where the loop did not
    run (start = (entry block, zero)), else its last sum. blocks = (loop, done)."""
    entry, zero = start
    loop, done = blocks
    k_next = builder.add(k, ir.Constant(k.type, 1))
    latch = builder.basic_block
    k.add_incoming(k_next, latch)
    for row, new_row in zip(acc, new_acc, strict=True):
        for phi, value in zip(row, new_row, strict=True):
            phi.add_incoming(value, latch)
    builder.cbranch(builder.icmp_signed("<", k_next, total), loop, done)

    builder.position_at_end(done)
    results = []
    for new_row in new_acc:  # the phis first: LLVM wants them at the top of the block
        results.append([])
        for value in new_row:
            phi = builder.phi(value.type)
            phi.add_incoming(zero, entry)
            phi.add_incoming(value, latch)
            results[-1].append(phi)
    return results


def _make_tile(rows, panels):
    """An intrinsic ``tile(a, row0, packed, panel0, out, bias)``: out[row0:row0+rows,
    panel0·W:(panel0+panels)·W] = a[row0:row0+rows, :K] @ packed[panel0:panel0+panels]
    (+ bias[panel0·W:(panel0+panels)·W] unless bias is None; overwrites). bias: 1-D,
    C-contiguous, the dtype of a, at least (panel0+panels)·W long; None or an array is
    a compile-time choice (two specializations), not a branch per tile. a, out
    C-contiguous 2-D, packed C-contiguous 3-D, one float dtype.
    rows x panels x 2 accumulators: fewer rows take more panels, so that even one row
    keeps 8 independent FMA chains in flight (2 would wait on the FMA latency)."""

    @intrinsic
    def tile(typingctx, a, row0, packed, panel, out, bias):
        if not (isinstance(a, types.Array) and isinstance(packed, types.Array) and isinstance(out, types.Array)):
            return None
        if not (a.dtype == packed.dtype == out.dtype and a.dtype in (types.float32, types.float64)):
            return None
        if not (a.ndim == out.ndim == 2 and packed.ndim == 3 and a.layout == packed.layout == out.layout == "C"):
            return None  # the kernel computes addresses from C-contiguous strides
        has_bias = not isinstance(bias, types.NoneType)
        if has_bias and not (isinstance(bias, types.Array) and bias.dtype == a.dtype and bias.ndim == 1
                             and bias.layout == "C"):
            return None
        sig = types.void(a, row0, packed, panel, out, bias)

        def codegen(context, builder, signature, args):
            a_t, _, p_t, _, o_t, _ = signature.args
            a_arr = context.make_array(a_t)(context, builder, args[0])
            p_arr = context.make_array(p_t)(context, builder, args[2])
            o_arr = context.make_array(o_t)(context, builder, args[4])
            scalar = context.get_value_type(a_t.dtype)
            width = VECTOR_BYTES // (4 if a_t.dtype == types.float32 else 8)
            vec = ir.VectorType(scalar, width)
            intp = context.get_value_type(types.intp)
            row0_v = context.cast(builder, args[1], signature.args[1], types.intp)
            panel_v = context.cast(builder, args[3], signature.args[3], types.intp)
            a_shape = cgutils.unpack_tuple(builder, a_arr.shape, 2)
            o_shape = cgutils.unpack_tuple(builder, o_arr.shape, 2)
            k_total = a_shape[1]
            lda, ldo = a_shape[1], o_shape[1]
            panel_elems = builder.mul(k_total, ir.Constant(intp, VECTORS * width))
            p_bases = [
                builder.gep(p_arr.data, [builder.mul(builder.add(panel_v, ir.Constant(intp, q)), panel_elems)])
                for q in range(panels)
            ]
            a_rows = [
                builder.gep(a_arr.data, [builder.mul(builder.add(row0_v, ir.Constant(intp, r)), lda)])
                for r in range(rows)
            ]
            suffix = f"v{width}f{32 if a_t.dtype == types.float32 else 64}"
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.{suffix}")
            zero = ir.Constant(vec, [0.0] * width)
            undef = ir.Constant(vec, ir.Undefined)
            mask0 = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)

            entry = builder.basic_block
            loop = builder.append_basic_block("tile.loop")
            done = builder.append_basic_block("tile.done")
            has_work = builder.icmp_signed(">", k_total, ir.Constant(intp, 0))
            builder.cbranch(has_work, loop, done)

            builder.position_at_end(loop)
            k = builder.phi(intp)
            k.add_incoming(ir.Constant(intp, 0), entry)
            columns = panels * VECTORS  # accumulators per row
            acc = [[builder.phi(vec) for _ in range(columns)] for _ in range(rows)]
            for row in acc:
                for phi in row:
                    phi.add_incoming(zero, entry)
            k_offset = builder.mul(k, ir.Constant(intp, VECTORS * width))
            w = [
                builder.load(
                    builder.bitcast(
                        builder.gep(p_bases[q], [builder.add(k_offset, ir.Constant(intp, v * width))]), vec.as_pointer()
                    ),
                    align=4,
                )
                for q in range(panels)
                for v in range(VECTORS)
            ]
            new_acc = _fma_rows(builder, fma, undef, mask0, lambda r: builder.gep(a_rows[r], [k]), w, acc)
            results = _end_k_loop(builder, k, k_total, acc, new_acc, (entry, zero), (loop, done))
            col0 = builder.mul(panel_v, ir.Constant(intp, VECTORS * width))
            if has_bias:  # loaded once, added to every row's sums as they are stored
                b_arr = context.make_array(signature.args[5])(context, builder, args[5])
                b_row = builder.gep(b_arr.data, [col0])
                b_vecs = [
                    builder.load(builder.bitcast(builder.gep(b_row, [ir.Constant(intp, v * width)]), vec.as_pointer()),
                                 align=4)
                    for v in range(columns)
                ]
                results = [[builder.fadd(row[v], b_vecs[v]) for v in range(columns)] for row in results]
            for r in range(rows):
                row_ptr = builder.gep(o_arr.data, [builder.add(builder.mul(builder.add(row0_v, ir.Constant(intp, r)), ldo), col0)])
                for v in range(columns):  # the panels' columns are adjacent in out
                    dst = builder.bitcast(builder.gep(row_ptr, [ir.Constant(intp, v * width)]), vec.as_pointer())
                    builder.store(results[r][v], dst, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


# rows x panels: 4 rows per block; a last block of 1-3 rows takes 4, 2 or 1 panels (1 row
# by 2: the persistent loop's 2-panel product chunks, _cpu_common._team).
# With 32 vector registers (AVX-512) a block of 4 rows takes 2 panels: 16 accumulators
# (+ 4 panel vectors + a broadcast) halve the broadcasts per multiply-add; 2-7% faster
# than 4x1 at the products of issue 12's sizes (thread CPU time, 2-core Zen 4). With
# 16 registers (AVX2) it would spill, so 4x1 stays there.
TWO_PANEL_BLOCKS = VECTOR_BYTES == 64
tile4x2 = _make_tile(4, 2)
tile4x1 = _make_tile(4, 1)
tile3x1 = _make_tile(3, 1)
tile2x2 = _make_tile(2, 2)
tile2x1 = _make_tile(2, 1)
tile1x4 = _make_tile(1, 4)
tile1x2 = _make_tile(1, 2)
tile1x1 = _make_tile(1, 1)


def _make_gradient_tile(rows, panels):
    """An intrinsic ``tile(a, b, out, row0, col0, a_k0, b_k0, count, add)``: the
    rows x panels·W tile at (row0, col0) of a[a_k0:a_k0+count, row0:row0+rows]ᵀ @
    b[b_k0:b_k0+count, col0:col0+panels·W], stored into ``out`` at the same place, or
    added to what is there when ``add`` is nonzero (one IEEE addition per element, after
    the whole k sum). a [., R], b [., N], out [R, N]: C-contiguous, one float dtype. The
    k sum runs in registers from zero, k = 0, 1, ... in order, as the per-step tile's.
    Per k: ``rows`` scalar broadcasts of adjacent elements of a row of a and panels·2
    vector loads of a row of b. No bounds checks: the caller keeps every index inside."""

    @intrinsic
    def tile(typingctx, a, b, out, row0, col0, a_k0, b_k0, count, add):
        arrays = (a, b, out)
        if not all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" for t in arrays):
            return None
        if not (a.dtype == b.dtype == out.dtype and a.dtype in (types.float32, types.float64)):
            return None
        if not (all(isinstance(t, types.Integer) for t in (row0, col0, a_k0, b_k0, count))
                and isinstance(add, (types.Integer, types.Boolean))):
            return None
        sig = types.void(a, b, out, row0, col0, a_k0, b_k0, count, add)

        def codegen(context, builder, signature, args):
            a_t, b_t, o_t = signature.args[:3]
            a_arr, b_arr, o_arr = (context.make_array(t)(context, builder, v) for t, v in zip((a_t, b_t, o_t), args[:3]))
            row0_v, col0_v, a_k0_v, b_k0_v, count_v, add_v = (
                context.cast(builder, v, t, types.intp) for v, t in zip(args[3:], signature.args[3:]))
            scalar = context.get_value_type(a_t.dtype)
            width = VECTOR_BYTES // (4 if a_t.dtype == types.float32 else 8)
            vec = ir.VectorType(scalar, width)
            intp = context.get_value_type(types.intp)
            lda = cgutils.unpack_tuple(builder, a_arr.shape, 2)[1]
            ldb = cgutils.unpack_tuple(builder, b_arr.shape, 2)[1]
            ldo = cgutils.unpack_tuple(builder, o_arr.shape, 2)[1]
            columns = panels * VECTORS
            suffix = f"v{width}f{32 if a_t.dtype == types.float32 else 64}"
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.{suffix}")
            zero = ir.Constant(vec, [0.0] * width)
            undef = ir.Constant(vec, ir.Undefined)
            mask0 = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)

            def const(value):
                return ir.Constant(intp, value)

            # Pointers walked by k: a's and b's first elements of row k = 0.
            a_base = builder.gep(a_arr.data, [builder.add(builder.mul(a_k0_v, lda), row0_v)])
            b_base = builder.gep(b_arr.data, [builder.add(builder.mul(b_k0_v, ldb), col0_v)])
            entry = builder.basic_block
            loop = builder.append_basic_block("gradient_tile.loop")
            done = builder.append_basic_block("gradient_tile.done")
            builder.cbranch(builder.icmp_signed(">", count_v, const(0)), loop, done)

            builder.position_at_end(loop)
            k = builder.phi(intp)
            k.add_incoming(const(0), entry)
            acc = [[builder.phi(vec) for _ in range(columns)] for _ in range(rows)]
            for row in acc:
                for phi in row:
                    phi.add_incoming(zero, entry)
            b_row = builder.gep(b_base, [builder.mul(k, ldb)])
            w = [builder.load(builder.bitcast(builder.gep(b_row, [const(v * width)]), vec.as_pointer()), align=4)
                 for v in range(columns)]
            a_row = builder.gep(a_base, [builder.mul(k, lda)])
            new_acc = _fma_rows(builder, fma, undef, mask0, lambda r: builder.gep(a_row, [const(r)]), w, acc)
            results = _end_k_loop(builder, k, count_v, acc, new_acc, (entry, zero), (loop, done))
            adding = builder.icmp_signed("!=", add_v, const(0))
            pointers = []
            for r in range(rows):
                row_ptr = builder.gep(o_arr.data, [builder.add(builder.mul(builder.add(row0_v, const(r)), ldo), col0_v)])
                pointers.append([builder.bitcast(builder.gep(row_ptr, [const(v * width)]), vec.as_pointer())
                                 for v in range(columns)])
            with builder.if_else(adding) as (then, otherwise):
                with then:
                    for r in range(rows):
                        for v in range(columns):
                            total = builder.fadd(builder.load(pointers[r][v], align=4), results[r][v])
                            builder.store(total, pointers[r][v], align=4)
                with otherwise:
                    for r in range(rows):
                        for v in range(columns):
                            builder.store(results[r][v], pointers[r][v], align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


gradient_tile4x2 = _make_gradient_tile(4, 2)
gradient_tile4x1 = _make_gradient_tile(4, 1)
