"""A register-blocked micro-kernel for the small per-step products of the cpu backend.

Per step the LSTM needs ``h_{t-1} W_hhᵀ`` (forward) and ``dz_t W_hh`` (backward): a few
rows (B) times a matrix the whole sequence reuses. A BLAS call repacks that matrix on
every call (about two thirds of the step's matmul time with OpenBLAS at B=16, H=256),
so the matrix is packed once per call here, into panels the kernel streams:

    packed [P, K, W]:  packed[p, k, c] = M[k, p·W + c]   (zero beyond M's N columns)

for the product ``A [R, K] @ M [K, N]``, with W = 2 vectors (16 float32, 8 float64).
One kernel call computes an R x W tile of the output, R <= 4 rows: it keeps the
R·2 accumulators in vector registers for the whole k loop, and per k loads two
vectors of the panel and broadcasts one element of each row (R·2 FMAs for 2 + R
loads). Numba cannot express "keep this tile in registers" (a local array lives in
memory, and LLVM cannot prove it does not alias the inputs), so the loop is written
here in LLVM IR through ``numba.extending.intrinsic``; it uses ``llvm.fma`` on
``<VW x float>``, which LLVM lowers to the best the host has (AVX2: one vfmadd; SSE:
two). The summation order over k is fixed (k = 0, 1, ...), whatever the thread count.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

VECTORS = 2  # vectors per tile row: R·VECTORS accumulators + 2 panel vectors + 1 broadcast
MAX_ROWS = 4  # 4 x 2 accumulators for float32 leave registers for loads (16 on AVX2)


def vector_width(dtype) -> int:
    """Elements per vector: 32 bytes (one AVX register)."""
    return 32 // np.dtype(dtype).itemsize


def panel_width(dtype) -> int:
    return VECTORS * vector_width(dtype)


def pack(matrix_t, dtype=None):
    """Pack ``M = matrix_t`` [K, N] into [ceil(N/W), K, W] panels (zero-padded columns)."""
    matrix_t = np.asarray(matrix_t)
    width = panel_width(matrix_t.dtype)
    k, n = matrix_t.shape
    panels = -(-n // width)
    padded = np.zeros((k, panels * width), matrix_t.dtype)
    padded[:, :n] = matrix_t
    return np.ascontiguousarray(padded.reshape(k, panels, width).transpose(1, 0, 2))


def _make_tile(rows, panels):
    """An intrinsic ``tile(a, row0, packed, panel0, out)``: out[row0:row0+rows,
    panel0·W:(panel0+panels)·W] = a[row0:row0+rows, :K] @ packed[panel0:panel0+panels]
    (overwrites). a, out C-contiguous 2-D, packed C-contiguous 3-D, one float dtype.
    rows x panels x 2 accumulators: fewer rows take more panels, so that even one row
    keeps 8 independent FMA chains in flight (2 would wait on the FMA latency)."""

    @intrinsic
    def tile(typingctx, a, row0, packed, panel, out):
        if not (isinstance(a, types.Array) and isinstance(packed, types.Array) and isinstance(out, types.Array)):
            return None
        if not (a.dtype == packed.dtype == out.dtype and a.dtype in (types.float32, types.float64)):
            return None
        if not (a.ndim == out.ndim == 2 and packed.ndim == 3 and a.layout == packed.layout == out.layout == "C"):
            return None  # the kernel computes addresses from C-contiguous strides
        sig = types.void(a, row0, packed, panel, out)

        def codegen(context, builder, signature, args):
            a_t, _, p_t, _, o_t = signature.args
            a_arr = context.make_array(a_t)(context, builder, args[0])
            p_arr = context.make_array(p_t)(context, builder, args[2])
            o_arr = context.make_array(o_t)(context, builder, args[4])
            scalar = context.get_value_type(a_t.dtype)
            width = 8 if a_t.dtype == types.float32 else 4
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
            new_acc = []
            for r in range(rows):
                x = builder.load(builder.gep(a_rows[r], [k]))
                xb = builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(ir.IntType(32), 0)), undef, mask0)
                new_acc.append([builder.call(fma, [xb, w[v], acc[r][v]]) for v in range(columns)])
            k_next = builder.add(k, ir.Constant(intp, 1))
            latch = builder.basic_block
            k.add_incoming(k_next, latch)
            for r in range(rows):
                for v in range(columns):
                    acc[r][v].add_incoming(new_acc[r][v], latch)
            builder.cbranch(builder.icmp_signed("<", k_next, k_total), loop, done)

            builder.position_at_end(done)
            results = []
            for r in range(rows):  # the phis first: LLVM wants them at the top of the block
                results.append([])
                for v in range(columns):
                    phi = builder.phi(vec)
                    phi.add_incoming(zero, entry)
                    phi.add_incoming(new_acc[r][v], latch)
                    results[r].append(phi)
            col0 = builder.mul(panel_v, ir.Constant(intp, VECTORS * width))
            for r in range(rows):
                row_ptr = builder.gep(o_arr.data, [builder.add(builder.mul(builder.add(row0_v, ir.Constant(intp, r)), ldo), col0)])
                for v in range(columns):  # the panels' columns are adjacent in out
                    dst = builder.bitcast(builder.gep(row_ptr, [ir.Constant(intp, v * width)]), vec.as_pointer())
                    builder.store(results[r][v], dst, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


# rows x panels: 4 rows per block; a last block of 1-3 rows takes 4, 2 or 1 panels.
tile4x1 = _make_tile(4, 1)
tile3x1 = _make_tile(3, 1)
tile2x2 = _make_tile(2, 2)
tile2x1 = _make_tile(2, 1)
tile1x4 = _make_tile(1, 4)
tile1x1 = _make_tile(1, 1)
