// step.cuh: the generic tile loops of the per-step kernels, written once for every cell.
//
// A per-step kernel (lstm_forward_step, gru_forward_step, rnn_forward_step and their
// backward counterparts, one file per cell and direction) is this header's product
// plus the cell's own pointwise epilogue:
//
//   hidden_product<Gates, ...>       forward: for a block's tile of UnitTile hidden
//                                    units j and BatchTile batch rows, the Gates
//                                    recurrent pre-activations h_{t-1}·W_hh[g·H + j, :]ᵀ,
//                                    g = 0 .. Gates-1 (LSTM 4: i, f, g, o; GRU 3: r, z,
//                                    n; Elman 1), in registers, staging h_{t-1} and the
//                                    Gates matching W_hh rows of each unit in shared
//                                    memory; KSplit > 1 splits the k loop over slices.
//   recurrent_gradient<Gates, ...>   backward: dz_{t+1}·W_hh[:, j] (K = Gates·H) for the
//                                    same tile: the gradient reaching h_t through the
//                                    recurrent weights.
//   store_step_squares<Threads>      the block's float64 Σ over its (b, j) pairs of the
//                                    squared state gradients, for the per-step norms.
//
// The launch shape is the same for every cell: block = (UnitTile, BatchThreads,
// KSplit), grid = (ceil(H / UnitTile), ceil(B / (BatchThreads·RowsPerThread))); any
// B, H >= 1 (every load and store is bounds-checked). The tiles are
// rnnkernels/_launch.py's STEP_TILES. The bodies are the LSTM's original step kernels
// with the gate count made a template parameter: for Gates = 4 they are the same
// instructions in the same order, so the LSTM's results are bitwise what they were.
#pragma once

#include "common.cuh"

namespace rnnkernels {

// Returns true in the threads that hold the finished sums acc[g][r] (for unit
// blockIdx.x·UnitTile + threadIdx.x, batch row blockIdx.y·BatchTile + threadIdx.y +
// r·BatchThreads): every thread with KSplit = 1, slice 0 (threadIdx.z == 0) otherwise.
// The other slices get false and must return without reaching another barrier.
// Every thread of the block must call it (it has barriers).
template <int Gates, typename Storage, int UnitTile, int BatchThreads, int RowsPerThread, int KTile, int KSplit>
__device__ __forceinline__ bool hidden_product(const Storage* __restrict__ w_hh,  // [Gates·H, H]
                                               const float* h_prev,               // [B, H] h_{t-1}, float32
                                               int batch,                         // B
                                               int hidden,                        // H
                                               float (&acc)[Gates][RowsPerThread]) {
    constexpr int SliceThreads = UnitTile * BatchThreads;  // threads of one k slice
    constexpr int Threads = SliceThreads * KSplit;
    constexpr int BatchTile = BatchThreads * RowsPerThread;
    constexpr int GateRows = Gates * UnitTile;
    // The block stages KBlock = KSplit·KTile columns of k per round; slice z (threadIdx.z)
    // sums columns [z·KTile, (z+1)·KTile) of each round, so KSplit > 1 splits the
    // reduction over H across warps (small UnitTile: more blocks at B = 1).
    constexpr int KBlock = KTile * KSplit;
    static_assert(Threads % 32 == 0, "whole warps only");
    static_assert((KBlock & (KBlock - 1)) == 0, "KTile * KSplit must be a power of two");
    // Staging keeps its loads in flight: each thread issues all of a round's global
    // loads (Gates·RowsPerGate of W_hh, HLoads of h) into registers before it
    // stores any of them to shared memory, so a round waits for about one memory
    // latency, not one per load. Thread e of the block loads column e % KBlock of gate
    // rows e / KBlock + j·RowStep of each gate: consecutive threads, consecutive k
    // (coalesced), and one base pointer per thread plus small offsets (ptxas keeps a
    // few registers for addresses, not one 64-bit address per load).
    constexpr int RowStep = Threads / KBlock;
    static_assert(Threads % KBlock == 0 && UnitTile % RowStep == 0, "staging needs whole rows per pass");
    constexpr int RowsPerGate = UnitTile / RowStep;
    constexpr int HLoads = (BatchTile * KBlock + Threads - 1) / Threads;
    // float storage with rows on 16-byte boundaries (H % 4 == 0, aligned W_hh): the same
    // W tile loaded as float4s, 4 consecutive k per load (a quarter of the load
    // instructions; the same values land in w_tile, so the same bits). Thread e loads
    // k = 4·(e % VecPerRow) of gate rows e / VecPerRow + j·VecRowStep of each gate.
    constexpr int VecPerRow = KBlock / 4 > 0 ? KBlock / 4 : 1;
    constexpr int VecRowStep = Threads / VecPerRow > 0 ? Threads / VecPerRow : 1;
    constexpr bool CanVector = is_float_storage<Storage>::value && KBlock % 4 == 0 && Threads % VecPerRow == 0 &&
                               UnitTile % VecRowStep == 0;
    constexpr int VecRowsPerGate = CanVector ? UnitTile / VecRowStep : 1;

    // w_tile[k][g·UnitTile + u] = W_hh[g·H + unit0 + u, k0 + k]: the i, f, g, o rows of
    // a unit sit in the same tile. Threads of a warp read consecutive u (no bank
    // conflicts); the +1 pad keeps the transposing store conflict-free and, with
    // KSplit > 1, puts the slices of a warp on different banks (KTile·(GateRows + 1)
    // is 4 mod 32 for the batch1 tile).
    __shared__ float w_tile[KBlock][GateRows + 1];
    // h_tile[r][k] = h_{t-1}[row0 + r, k0 + k]; a warp reads at most a few rows, each
    // as a broadcast.
    __shared__ float h_tile[BatchTile][KBlock + 1];

    const int unit_in_tile = threadIdx.x;
    const int batch_lane = threadIdx.y;
    const int slice = KSplit > 1 ? (int)threadIdx.z : 0;
    // unsigned: the % and / below by compile-time powers of two are masks and shifts.
    const unsigned int thread = (threadIdx.z * BatchThreads + threadIdx.y) * UnitTile + threadIdx.x;
    const int unit0 = blockIdx.x * UnitTile;
    const int row0 = blockIdx.y * BatchTile;

#pragma unroll
    for (int g = 0; g < Gates; ++g)
#pragma unroll
        for (int r = 0; r < RowsPerThread; ++r) acc[g][r] = 0.0f;

    const int load_k = (int)(thread % KBlock);
    const int load_unit = (int)(thread / KBlock);  // < RowStep
    // Row (gate g, unit unit0 + load_unit + j·RowStep), column load_k (+ k0) of W_hh is
    // w_load[g·H·H + j·RowStep·H + k0]; unit0 + load_unit + j·RowStep < H is checked.
    const Storage* w_load = w_hh + (index_t)(unit0 + load_unit) * hidden + load_k;
    const index_t gate_stride = (index_t)hidden * hidden;
    const int row_stride = RowStep * hidden;
    // The float4 path's thread mapping (see VecPerRow); taken only when vector_rows.
    const bool vector_rows = CanVector && rows_allow_float4(w_hh, hidden);
    const int vec_k = 4 * (int)(thread % VecPerRow);
    const int vec_unit = (int)(thread / VecPerRow);  // < VecRowStep
    const Storage* w_vec = w_hh + (index_t)(unit0 + vec_unit) * hidden + vec_k;
    const int vec_row_stride = VecRowStep * hidden;

    // Each part of a round's staging: loads into registers, then (after all loads of
    // the round are issued) stores to shared memory. Out-of-range elements are 0.
    auto load_w = [&](float (&staged)[Gates][RowsPerGate], int k0) {
        const bool k_in = load_k + k0 < hidden;
#pragma unroll
        for (int g = 0; g < Gates; ++g)
#pragma unroll
            for (int j = 0; j < RowsPerGate; ++j)
                staged[g][j] = (k_in && unit0 + load_unit + j * RowStep < hidden)
                                   ? to_float(w_load[g * gate_stride + j * row_stride + k0])
                                   : 0.0f;
    };
    auto store_w = [&](const float (&staged)[Gates][RowsPerGate]) {
#pragma unroll
        for (int g = 0; g < Gates; ++g)
#pragma unroll
            for (int j = 0; j < RowsPerGate; ++j) w_tile[load_k][g * UnitTile + load_unit + j * RowStep] = staged[g][j];
    };
    auto load_h = [&](float (&staged)[HLoads], int k0) {
#pragma unroll
        for (int i = 0; i < HLoads; ++i) {
            const unsigned int e = thread + i * Threads;
            const int kk = (int)(e % KBlock), r = (int)(e / KBlock);
            const int row = row0 + r, k = k0 + kk;
            staged[i] = (e < BatchTile * KBlock && row < batch && k < hidden) ? h_prev[(index_t)row * hidden + k] : 0.0f;
        }
    };
    auto store_h = [&](const float (&staged)[HLoads]) {
#pragma unroll
        for (int i = 0; i < HLoads; ++i) {
            const unsigned int e = thread + i * Threads;
            if (e < BatchTile * KBlock) h_tile[e / KBlock][e % KBlock] = staged[i];
        }
    };

    for (int k0 = 0; k0 < hidden; k0 += KBlock) {
        float h_staged[HLoads];
        bool staged = false;
        if constexpr (CanVector) {
            if (vector_rows) {
                // k < H with H % 4 == 0 and k % 4 == 0: all four columns are in range.
                const bool k_in = vec_k + k0 < hidden;
                float4 w_staged[Gates][VecRowsPerGate];
#pragma unroll
                for (int g = 0; g < Gates; ++g)
#pragma unroll
                    for (int j = 0; j < VecRowsPerGate; ++j)
                        w_staged[g][j] = (k_in && unit0 + vec_unit + j * VecRowStep < hidden)
                                             ? *reinterpret_cast<const float4*>(w_vec + g * gate_stride +
                                                                                j * vec_row_stride + k0)
                                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                load_h(h_staged, k0);
#pragma unroll
                for (int g = 0; g < Gates; ++g)
#pragma unroll
                    for (int j = 0; j < VecRowsPerGate; ++j) {
                        const int column = g * UnitTile + vec_unit + j * VecRowStep;
                        w_tile[vec_k][column] = w_staged[g][j].x;
                        w_tile[vec_k + 1][column] = w_staged[g][j].y;
                        w_tile[vec_k + 2][column] = w_staged[g][j].z;
                        w_tile[vec_k + 3][column] = w_staged[g][j].w;
                    }
                store_h(h_staged);
                staged = true;
            }
        }
        if (!staged) {
            float w_staged[Gates][RowsPerGate];
            load_w(w_staged, k0);
            load_h(h_staged, k0);
            store_w(w_staged);
            store_h(h_staged);
        }
        __syncthreads();

#pragma unroll
        for (int j = 0; j < KTile; ++j) {
            const int kk = slice * KTile + j;
            float w[Gates];
#pragma unroll
            for (int g = 0; g < Gates; ++g) w[g] = w_tile[kk][g * UnitTile + unit_in_tile];
#pragma unroll
            for (int r = 0; r < RowsPerThread; ++r) {
                const float h = h_tile[batch_lane + r * BatchThreads][kk];
#pragma unroll
                for (int g = 0; g < Gates; ++g) acc[g][r] = fmaf(w[g], h, acc[g][r]);
            }
        }
        __syncthreads();
    }

    if constexpr (KSplit > 1) {
        // The slices' partial sums meet in slice 0, added in slice order: a fixed order,
        // so the result is deterministic (it differs in the last bits from a KSplit = 1
        // tile, which sums all k in one chain).
        __shared__ float partial[KSplit - 1][Gates * RowsPerThread][SliceThreads];
        const int lane = threadIdx.y * UnitTile + threadIdx.x;
        if (slice > 0) {
#pragma unroll
            for (int g = 0; g < Gates; ++g)
#pragma unroll
                for (int r = 0; r < RowsPerThread; ++r) partial[slice - 1][g * RowsPerThread + r][lane] = acc[g][r];
        }
        __syncthreads();
        if (slice > 0) return false;  // no barrier follows
#pragma unroll
        for (int z = 0; z < KSplit - 1; ++z)
#pragma unroll
            for (int g = 0; g < Gates; ++g)
#pragma unroll
                for (int r = 0; r < RowsPerThread; ++r) acc[g][r] += partial[z][g * RowsPerThread + r][lane];
    }
    return true;
}

// Row stride of the backward W_hh tile. With one slice (KSplit = 1) the units of a warp
// read consecutive words of a row: no pad. With several, a warp holds slices z whose
// rows sit KTile·stride words apart; a stride with KTile·stride = UnitTile (mod 32)
// puts every (slice, unit) pair of a warp on its own bank (stride 9 for the batch1
// tile); where none exists below UnitTile + 32, a pad of one.
__host__ __device__ constexpr int backward_w_stride(int unit_tile, int k_tile, int k_split) {
    if (k_split == 1) return unit_tile;
    for (int stride = unit_tile; stride < unit_tile + 32; ++stride)
        if ((k_tile * stride) % 32 == unit_tile % 32) return stride;
    return unit_tile + 1;
}

// dh[r] = dz_next[row, :]·W_hh[:, unit] over K = Gates·H for the thread's (row, unit)
// pairs (rows and units as in hidden_product); all zero when dz_next is nullptr (the
// last step, where nothing comes back through W_hh). The finished sums are in slice 0
// (threadIdx.z == 0); the other slices keep partial sums and, unlike hidden_product's,
// go on: a backward kernel's StepNorms block sum needs every thread. Every thread of
// the block must call it.
template <int Gates, typename Storage, int UnitTile, int BatchThreads, int RowsPerThread, int KTile, int KSplit>
__device__ __forceinline__ void recurrent_gradient(const Storage* __restrict__ w_hh,  // [Gates·H, H]
                                                   const float* dz_next,  // [B, Gates·H] dz_{t+1}, or nullptr
                                                   int batch,             // B
                                                   int hidden,            // H
                                                   float (&dh)[RowsPerThread]) {
    constexpr int SliceThreads = UnitTile * BatchThreads;  // threads of one k slice
    constexpr int Threads = SliceThreads * KSplit;
    constexpr int BatchTile = BatchThreads * RowsPerThread;
    // As in hidden_product: KBlock = KSplit·KTile columns of k (here Gates·H) staged per
    // round, slice z sums columns [z·KTile, (z+1)·KTile) of each; every thread issues
    // all its loads of a round into registers before storing any (loads in flight).
    constexpr int KBlock = KTile * KSplit;
    constexpr int WStride = backward_w_stride(UnitTile, KTile, KSplit);
    constexpr int WLoads = (UnitTile * KBlock + Threads - 1) / Threads;
    constexpr int ZLoads = (BatchTile * KBlock + Threads - 1) / Threads;
    static_assert(Threads % 32 == 0, "whole warps only");
    static_assert((KBlock & (KBlock - 1)) == 0, "KTile * KSplit must be a power of two");
    constexpr int VecPerRow = UnitTile / 4 > 0 ? UnitTile / 4 : 1;
    constexpr bool CanVector = is_float_storage<Storage>::value && UnitTile % 4 == 0;
    constexpr int VecLoads = (VecPerRow * KBlock + Threads - 1) / Threads;

    // w_tile[k][u] = W_hh[k0 + k, unit0 + u]: the units are W_hh's contiguous dimension,
    // so loads coalesce and a warp reads consecutive words.
    __shared__ float w_tile[KBlock][WStride];
    // dz_tile[r][k] = dz_{t+1}[row0 + r, k0 + k]
    __shared__ float dz_tile[BatchTile][KBlock + 1];

    const int unit_in_tile = threadIdx.x;
    const int batch_lane = threadIdx.y;
    const int slice = KSplit > 1 ? (int)threadIdx.z : 0;
    // unsigned: the % and / below by compile-time constants are masks, shifts or a
    // multiply, never a 64-bit division.
    const unsigned int thread = (threadIdx.z * BatchThreads + threadIdx.y) * UnitTile + threadIdx.x;
    const int unit0 = blockIdx.x * UnitTile;
    const int row0 = blockIdx.y * BatchTile;
    const int gate_width = Gates * hidden;

#pragma unroll
    for (int r = 0; r < RowsPerThread; ++r) dh[r] = 0.0f;

    // dz_{t+1}'s tile: loads into registers, then stores (both W staging paths use them).
    auto load_dz = [&](float (&staged)[ZLoads], int k0) {
#pragma unroll
        for (int i = 0; i < ZLoads; ++i) {
            const unsigned int e = thread + i * Threads;
            const int kk = (int)(e % KBlock), r = (int)(e / KBlock);
            const int row = row0 + r, k = k0 + kk;
            staged[i] = (e < BatchTile * KBlock && row < batch && k < gate_width) ? dz_next[(index_t)row * gate_width + k]
                                                                                   : 0.0f;
        }
    };
    auto store_dz = [&](const float (&staged)[ZLoads]) {
#pragma unroll
        for (int i = 0; i < ZLoads; ++i) {
            const unsigned int e = thread + i * Threads;
            if (e < BatchTile * KBlock) dz_tile[e / KBlock][e % KBlock] = staged[i];
        }
    };
    // float storage with W_hh's rows on 16-byte boundaries (H % 4 == 0, aligned pointer):
    // the W tile loaded as float4s, 4 consecutive units per load (the same values land
    // in w_tile, so the same bits); thread e loads units 4·(e % VecPerRow) of row
    // e / VecPerRow. A uniform check, scalar loads otherwise.
    const bool vector_rows = CanVector && rows_allow_float4(w_hh, hidden);

    // The last step has no dz_{t+1} (nullptr); the branch is uniform over the grid.
    if (dz_next != nullptr) {
        for (int k0 = 0; k0 < gate_width; k0 += KBlock) {
            float dz_staged[ZLoads];
            bool staged = false;
            if constexpr (CanVector) {
                if (vector_rows) {
                    // unit < H with H % 4 == 0 and unit % 4 == 0: all four units are in range.
                    float4 w_staged[VecLoads];
#pragma unroll
                    for (int i = 0; i < VecLoads; ++i) {
                        const unsigned int e = thread + i * Threads;
                        const int u = 4 * (int)(e % VecPerRow), kk = (int)(e / VecPerRow);
                        const int unit = unit0 + u, k = k0 + kk;
                        w_staged[i] = (e < VecPerRow * KBlock && unit < hidden && k < gate_width)
                                          ? *reinterpret_cast<const float4*>(w_hh + (index_t)k * hidden + unit)
                                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    }
                    load_dz(dz_staged, k0);
#pragma unroll
                    for (int i = 0; i < VecLoads; ++i) {
                        const unsigned int e = thread + i * Threads;
                        if (e < VecPerRow * KBlock) {
                            float* row = &w_tile[e / VecPerRow][4 * (e % VecPerRow)];
                            row[0] = w_staged[i].x;
                            row[1] = w_staged[i].y;
                            row[2] = w_staged[i].z;
                            row[3] = w_staged[i].w;
                        }
                    }
                    store_dz(dz_staged);
                    staged = true;
                }
            }
            if (!staged) {
                float w_staged[WLoads];
#pragma unroll
                for (int i = 0; i < WLoads; ++i) {
                    const unsigned int e = thread + i * Threads;
                    const int u = (int)(e % UnitTile), kk = (int)(e / UnitTile);
                    const int unit = unit0 + u, k = k0 + kk;
                    w_staged[i] = (e < UnitTile * KBlock && unit < hidden && k < gate_width)
                                      ? to_float(w_hh[(index_t)k * hidden + unit])
                                      : 0.0f;
                }
                load_dz(dz_staged, k0);
#pragma unroll
                for (int i = 0; i < WLoads; ++i) {
                    const unsigned int e = thread + i * Threads;
                    if (e < UnitTile * KBlock) w_tile[e / UnitTile][e % UnitTile] = w_staged[i];
                }
                store_dz(dz_staged);
            }
            __syncthreads();
#pragma unroll
            for (int j = 0; j < KTile; ++j) {
                const int kk = slice * KTile + j;
                const float w = w_tile[kk][unit_in_tile];
#pragma unroll
                for (int r = 0; r < RowsPerThread; ++r)
                    dh[r] = fmaf(dz_tile[batch_lane + r * BatchThreads][kk], w, dh[r]);
            }
            __syncthreads();
        }
    }

    if constexpr (KSplit > 1) {
        // The slices' partial sums meet in slice 0, added in slice order (deterministic;
        // the last bits differ from a KSplit = 1 tile's single chain). The other slices
        // go on with no (b, j) pair: with StepNorms they still join the block sum.
        __shared__ float partial[KSplit - 1][RowsPerThread][SliceThreads];
        const int lane = threadIdx.y * UnitTile + threadIdx.x;
        if (slice > 0)
#pragma unroll
            for (int r = 0; r < RowsPerThread; ++r) partial[slice - 1][r][lane] = dh[r];
        __syncthreads();
        if (slice == 0)
#pragma unroll
            for (int z = 0; z < KSplit - 1; ++z)
#pragma unroll
                for (int r = 0; r < RowsPerThread; ++r) dh[r] += partial[z][r][lane];
    }
}

// Writes the block's Σ over its (b, j) pairs of each squared state gradient (each
// thread's own sums in `squares`, added in a fixed-shape tree by block_sum) to its
// slot step_squares[block, step, 0 .. Count) (block = blockIdx.y·gridDim.x +
// blockIdx.x); step_norms (reductions.cuh) adds the blocks. Every thread must call it.
template <int Threads, int Count>
__device__ __forceinline__ void store_step_squares(double (&squares)[Count],
                                                   double* step_squares,  // [blocks, T, Count]
                                                   int steps,             // T
                                                   int step) {            // t
    block_sum<Threads>(squares);
    const int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    if (thread == 0) {
        const index_t block = (index_t)blockIdx.y * gridDim.x + blockIdx.x;
        double* slot = step_squares + (block * steps + step) * Count;
#pragma unroll
        for (int q = 0; q < Count; ++q) slot[q] = squares[q];
    }
}

}  // namespace rnnkernels
