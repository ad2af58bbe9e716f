// lstm_backward.cu: backpropagation through time for lstm_forward.cu; float32 math.
//
// Computes, for t = T-1 .. 0 (gate order i, f, g, o; dz are pre-activation grads):
//     dh_t  = dy_t + dz_{t+1}·W_hh                 (at t = T-1: dy_t + dh_n)
//     dc_t  = carry + dh_t·o·(1 - tanh²(c_t))      (carry at t = T-1: dc_n)
//     dz^i = dc_t·g·i(1-i)    dz^f = dc_t·c_{t-1}·f(1-f)
//     dz^g = dc_t·i·(1-g²)    dz^o = dh_t·tanh(c_t)·o(1-o)
//     carry = dc_t·f                                (flows into c_{t-1})
// then, over all steps at once:
//     dW_ih = dzᵀ·x   dW_hh = dzᵀ·h_prev   db = Σ_{t,b} dz   dx = dz·W_ih
//     dh0 = dz_0·W_hh   dc0 = carry after t = 0
//
// Kernels, launched by rnnkernels/_launch.py:
//   1. lstm_backward_step<Storage, ...>, once per step t, in reverse order: a block owns a tile
//      of UnitTile hidden units j and BatchTile batch rows; it computes the recurrent
//      gradient dz_{t+1}·W_hh[:, j] (K = 4H, staged through shared memory), adds dy_t,
//      reads the saved gates and c_t, c_{t-1} and the dc carry of its (b, j) pairs,
//      and writes dz_t for the four gates of j and the new carry. All in registers.
//      With StepNorms, the block also sums dh_t² and dc_t² over its (b, j) pairs and
//      writes the two sums to its own slot of step_squares (see step_norms below).
//   2. GEMMs on cuBLAS (NumPy in the emulator; rnnkernels/_gemm.py) for dx, dW_ih,
//      dW_hh, dh0 over T·B rows at once.
//   3. column_sum<Storage, ...> for db: fixed-order sums, no atomics.
//   4. step_norms<...>, only with StepNorms: ‖dh_t‖ = sqrt(Σ_blocks dh_t²), same for dc.
// Every output element of our kernels is summed by one thread in a fixed order, and
// cuBLAS is deterministic on one stream, so gradients (and the norms) are bitwise
// identical run after run.
//
// Precision: Storage (common.cuh) is the problem's input type, float or __half.
// Inputs read as Storage: w_hh, dy, dh_n here (x, w_ih, w_hh also feed the GEMMs);
// outputs written as Storage: db (column_sum) here, rounded once from its float32 sum
// (the launcher rounds the GEMMs' float32 dx, dW_ih, dW_hh, dh0 and dc0 the same
// way). Everything in
// between is float32: the saved gates, c_all and h_all (the float32 states forward
// really used, so dW_hh = dzᵀ·h_prev uses the h the recurrence consumed), dgates, the
// dc carry and every sum. For float the kernels are the float32 ones, unchanged.
//
// Layouts (row-major, C-contiguous; Storage where marked, else float32):
//   w_hh      [4H, H] Storage  gates [T, B, 4H] activated i, f, g, o saved by forward
//   c_all     [T+1, B, H]    c_all[0] = c0, c_all[t+1] = c_t (saved by forward)
//   dy        [T, B, H] Storage  dh_n [B, H] Storage  (the launcher widens dc_n to dc_carry)
//   dc_carry  [B, H]         starts as dc_n; after step 0 it is dc0
//   dgates    [T, B, 4H]     dz, pre-activation gate gradients
//   step_squares [blocks, T, 2] float64, blocks = gridDim.x·gridDim.y of the step
//                kernel: [block, t, 0] = Σ dh_t², [block, t, 1] = Σ dc_t² over the
//                block's (b, j) pairs (StepNorms only)
//   norms     [2, T] float64  norms[0] = ‖dh_t‖, norms[1] = ‖dc_t‖ (Frobenius, over b, j)
//
// The per-step norms are float64 sums of float32 squares: the square of a float32 is
// exact in float64 (24-bit mantissa, squared, fits in 53 bits), so only the additions
// round, at 2^-53 relative each; a float32 sum of n = B·H terms has a worst-case
// relative error of n·2^-24 (6% at n = 10^6) and overflows once |dh| > ~1e19. The
// cost is a few float64 adds per thread per step plus one block reduction, nothing
// next to the K = 4H recurrent product the step already does.
//
// The persistent variant (rnnkernels/_persistent.py) replaces step 1 by ONE cooperative
// launch of lstm_backward_persistent<...> for all T steps (see persistent.cuh and the
// kernel's comment); it writes the same dgates, dc0 and step_squares, and the launcher
// ends with the same steps 2 to 4.
//
// Notes for the launcher: same block/grid shape as lstm_forward_step (block =
// (UnitTile, BatchThreads, KSplit)); any B, H >= 1.
// The block slot of step_squares makes the norms deterministic without atomics; the
// slot layout [block, t, 2] lets step_norms read it coalesced (consecutive threads,
// consecutive (t, quantity) pairs of one block).
#include "common.cuh"
#include "persistent.cuh"

namespace rnnkernels {

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

template <typename Storage, int UnitTile, int BatchThreads, int RowsPerThread, int KTile, int KSplit, bool StepNorms>
__global__ void __launch_bounds__(UnitTile * BatchThreads * KSplit)
lstm_backward_step(const Storage* __restrict__ w_hh,  // [4H, H], gate order i,f,g,o
                   const float* __restrict__ gates,   // [T, B, 4H] activated gates
                   const float* __restrict__ c_all,   // [T+1, B, H]
                   const Storage* __restrict__ dy,    // [T, B, H]
                   const Storage* __restrict__ dh_n,  // [B, H], added at t = T-1
                   float* dc_carry,                  // [B, H], read then overwritten
                   float* dgates,                    // [T, B, 4H]; reads slot t+1, writes t
                   double* step_squares,             // [blocks, T, 2]; StepNorms only
                   int steps,                        // T
                   int batch,                        // B
                   int hidden,                       // H
                   int step) {                       // t, 0 <= t < T
    constexpr int SliceThreads = UnitTile * BatchThreads;  // threads of one k slice
    constexpr int Threads = SliceThreads * KSplit;
    constexpr int BatchTile = BatchThreads * RowsPerThread;
    // As in lstm_forward_step: KBlock = KSplit·KTile columns of k (here 4H) staged per
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
    const int gate_width = lstm_gates * hidden;
    const index_t state_size = (index_t)batch * hidden;

    float dh[RowsPerThread];
#pragma unroll
    for (int r = 0; r < RowsPerThread; ++r) dh[r] = 0.0f;

    // dz_{t+1}'s tile: loads into registers, then stores (both W staging paths use them).
    auto load_dz = [&](float (&staged)[ZLoads], const float* dz_next, int k0) {
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

    // The last step has no dz_{t+1}; the branch is uniform over the grid.
    if (step + 1 < steps) {
        const float* dz_next = dgates + (index_t)(step + 1) * batch * gate_width;
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
                    load_dz(dz_staged, dz_next, k0);
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
                load_dz(dz_staged, dz_next, k0);
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

    // Σ dh² and Σ dc² over this thread's (b, j) pairs, in row order (StepNorms only;
    // otherwise unused and compiled away).
    double squares[2] = {0.0, 0.0};  // Σ dh², Σ dc²
    const int unit = unit0 + unit_in_tile;
    // No early return for unit >= hidden (or slice > 0): with StepNorms every thread of
    // the block takes part in the block reduction below.
    if (unit < hidden && slice == 0) {
#pragma unroll
        for (int r = 0; r < RowsPerThread; ++r) {
            const int row = row0 + batch_lane + r * BatchThreads;
            if (row >= batch) continue;
            const index_t cell = (index_t)row * hidden + unit;
            const index_t gate_offset = ((index_t)step * batch + row) * gate_width;
            const float* gates_row = gates + gate_offset;
            const float input_gate = gates_row[unit];
            const float forget_gate = gates_row[hidden + unit];
            const float cell_gate = gates_row[2 * hidden + unit];
            const float output_gate = gates_row[3 * hidden + unit];
            const float c = c_all[(index_t)(step + 1) * state_size + cell];
            const float c_prev = c_all[(index_t)step * state_size + cell];
            const float tanh_c = tanh_activation(c);

            float dh_total = dh[r] + to_float(dy[(index_t)step * state_size + cell]);
            if (step + 1 == steps) dh_total += to_float(dh_n[cell]);
            const float dc = dc_carry[cell] + dh_total * output_gate * (1.0f - tanh_c * tanh_c);

            float* dz = dgates + gate_offset;
            dz[unit] = dc * cell_gate * input_gate * (1.0f - input_gate);
            dz[hidden + unit] = dc * c_prev * forget_gate * (1.0f - forget_gate);
            dz[2 * hidden + unit] = dc * input_gate * (1.0f - cell_gate * cell_gate);
            dz[3 * hidden + unit] = dh_total * tanh_c * output_gate * (1.0f - output_gate);
            dc_carry[cell] = dc * forget_gate;
            if constexpr (StepNorms) {
                // The squares are exact in float64, so fma and mul-then-add agree.
                squares[0] = fma((double)dh_total, (double)dh_total, squares[0]);
                squares[1] = fma((double)dc, (double)dc, squares[1]);
            }
        }
    }

    if constexpr (StepNorms) {
        block_sum<Threads>(squares);
        if (thread == 0) {
            const index_t block = (index_t)blockIdx.y * gridDim.x + blockIdx.x;
            double* slot = step_squares + (block * steps + step) * 2;
            slot[0] = squares[0];
            slot[1] = squares[1];
        }
    }
}

// ------------------------------------------------------------------ persistent
// The reverse recurrence, all T steps in one cooperative launch (machinery and memory
// ordering: persistent.cuh). Block b owns the units [b·units, (b+1)·units) ∩ [0, H):
//   * once: W_hh's COLUMNS of its units, all 4H rows, go to shared memory transposed
//     (w_slice[u][k] = W_hh[k, unit0 + u], float32, units padded to a multiple of 4
//     with zero rows), where they stay for all T steps; dc_n of its cells goes to
//     shared memory, where the dc carry stays between steps;
//   * step t (T-1 down to 0): except at t = T-1, wait until every block has published
//     dz_{t+1}, and per chunk of chunk_rows batch rows stage dz_{t+1}[chunk] (K = 4H,
//     always a multiple of 4: 16-byte loads) and form dh_t[chunk, units] =
//     dz_{t+1}·W_hh[:, units] (slice_times_state, items of four units); then the
//     pointwise backward, one (row, unit) pair per thread, exactly lstm_backward_step's
//     math: dh_t = that product + dy_t (+ dh_n at t = T-1), dc_t from the carry, dz_t
//     of the four gates into dgates[t], carry = dc_t·f; then publish step t.
//     StepNorms: Σ dh_t² and Σ dc_t² of the block's pairs (float64, fixed order: each
//     thread in pair order, then block_sum) into step_squares[block, t]. Each
//     thread loads its first pair's gates, c and dy before the wait.
//   * after the loop the carry is dc0. dh0 = dz_0·W_hh, dx, dW_ih, dW_hh and db are
//     products over all steps, done after the launch (gradients_after_loop).
// Every sum has a fixed order: bitwise deterministic.
//
// Launch (checked by rnnkernels/_persistent.py): grid = (blocks, 1, 1), blocks =
// ceil(H / units) co-resident blocks, COOPERATIVE; block = (Threads, 1, 1); dynamic
// shared memory = SharedLayout's total·4 bytes; chunk_rows a multiple of RowTile;
// flags [blocks] zeroed; dgates 16-byte aligned.
template <typename Storage, int Threads, int KSplit, int RowTile, int InFlight, bool StepNorms>
__global__ void __launch_bounds__(Threads, 1)
lstm_backward_persistent(const Storage* __restrict__ w_hh,  // [4H, H], gate order i,f,g,o
                         const float* __restrict__ gates,   // [T, B, 4H] activated gates
                         const float* __restrict__ c_all,   // [T+1, B, H]
                         const Storage* __restrict__ dy,    // [T, B, H]
                         const Storage* __restrict__ dh_n,  // [B, H], added at t = T-1
                         const float* __restrict__ dc_n,    // [B, H] float32
                         float* __restrict__ dc0,           // [B, H] float32: the carry after t = 0
                         float* dgates,                     // [T, B, 4H]; reads slot t+1, writes t
                         double* step_squares,              // [blocks, T, 2]; StepNorms only
                         unsigned int* flags,               // [blocks], zero on entry
                         int steps,                         // T
                         int batch,                         // B
                         int hidden,                        // H
                         int units,                         // hidden units per block
                         int chunk_rows) {                  // batch rows staged at a time
    static_assert(Threads % 32 == 0, "whole warps only");
    constexpr int ItemRows = 4;  // an item: four consecutive units (columns of W_hh)
    const int unit0 = blockIdx.x * units;
    const int own_units = min(units, hidden - unit0);
    const int producers = gridDim.x;
    const int gate_width = lstm_gates * hidden;
    const index_t state_size = (index_t)batch * hidden;
    const int padded_units = persistent::round_up(units, ItemRows);

    const persistent::SharedLayout<ItemRows, RowTile, KSplit> layout(padded_units, gate_width, chunk_rows,
                                                                     padded_units / ItemRows, batch, units);
    float* shared = persistent::dynamic_shared<float>();
    float* w_slice = shared + layout.weights;  // row u = W_hh[:, unit0 + u]
    float* dz_chunk = shared + layout.state;
    float* partials = shared + layout.partials;
    float* carry = shared + layout.cells;  // carry[row·units + u]: dc carry of (row, unit0 + u)

    persistent::load_slice<Threads>(w_slice, padded_units, gate_width, layout.k_pad, [&](int u, int k) {
        const int unit = unit0 + u;
        return u < own_units ? to_float(w_hh[(index_t)k * hidden + unit]) : 0.0f;
    });
    for (int e = threadIdx.x; e < batch * own_units; e += Threads) {
        const int row = e / own_units, u = e - row * own_units;
        carry[row * units + u] = dc_n[(index_t)row * hidden + unit0 + u];
    }
    __syncthreads();

    // What the pointwise backward of one (row, unit) pair reads at a step, none of it
    // written in this launch.
    struct PairInputs {
        float gate[lstm_gates];  // activated i, f, g, o
        float c, c_prev, dy;
    };
    auto load_inputs = [&](int step, int row, int unit) {
        PairInputs in;
        const index_t cell = (index_t)row * hidden + unit;
        const float* gates_row = gates + ((index_t)step * batch + row) * gate_width + unit;
#pragma unroll
        for (int g = 0; g < lstm_gates; ++g) in.gate[g] = gates_row[g * hidden];
        in.c = c_all[(index_t)(step + 1) * state_size + cell];
        in.c_prev = c_all[(index_t)step * state_size + cell];
        in.dy = to_float(dy[(index_t)step * state_size + cell]);
        return in;
    };

    for (int step = steps - 1; step >= 0; --step) {
        // The last step has no dz_{t+1}: the branch is uniform over the grid.
        const bool recurrent = step + 1 < steps;
        // The inputs of this thread's first pair, loaded BEFORE the wait: their latency
        // overlaps the wait instead of following the product.
        PairInputs first;
        if ((int)threadIdx.x < min(chunk_rows, batch) * own_units) {
            const int r = threadIdx.x / own_units;
            first = load_inputs(step, r, unit0 + (threadIdx.x - r * own_units));
        }
        if (recurrent) persistent::wait_for<Threads>(flags, producers, (unsigned int)(steps - 1 - step));
        double squares[2] = {0.0, 0.0};  // Σ dh², Σ dc² of this thread's pairs
        const float* dz_next = dgates + (index_t)(step + 1) * batch * gate_width;
        for (int row0 = 0; row0 < batch; row0 += chunk_rows) {
            const int rows = min(chunk_rows, batch - row0);
            if (recurrent) {
                persistent::stage_rows<Threads, InFlight, true>(dz_chunk, layout.k_pad, dz_next + (index_t)row0 * gate_width,
                                                               gate_width, rows, persistent::round_up(rows, RowTile),
                                                               gate_width);
                __syncthreads();
                persistent::slice_times_state<Threads, KSplit, ItemRows, RowTile>(w_slice, dz_chunk, partials, layout,
                                                                                 ItemRows, 1);
                __syncthreads();
            }
            for (int pair = threadIdx.x; pair < rows * own_units; pair += Threads) {
                const int r = pair / own_units, u = pair - r * own_units;
                const int row = row0 + r, unit = unit0 + u;
                const index_t cell = (index_t)row * hidden + unit;
                const index_t gate_offset = ((index_t)step * batch + row) * gate_width;
                // The first pair of the first chunk is the one prefetched above.
                const PairInputs in = (row0 == 0 && pair == (int)threadIdx.x) ? first : load_inputs(step, row, unit);
                const float input_gate = in.gate[0];
                const float forget_gate = in.gate[1];
                const float cell_gate = in.gate[2];
                const float output_gate = in.gate[3];
                const float c = in.c;
                const float c_prev = in.c_prev;
                const float tanh_c = tanh_activation(c);

                float dh_total = recurrent ? persistent::sum_partials<KSplit, ItemRows, RowTile>(
                                                 partials, layout, u / ItemRows, u % ItemRows, r)
                                           : 0.0f;
                dh_total += in.dy;
                if (!recurrent) dh_total += to_float(dh_n[cell]);
                float& dc_carry = carry[row * units + u];
                const float dc = dc_carry + dh_total * output_gate * (1.0f - tanh_c * tanh_c);

                float* dz = dgates + gate_offset;
                dz[unit] = dc * cell_gate * input_gate * (1.0f - input_gate);
                dz[hidden + unit] = dc * c_prev * forget_gate * (1.0f - forget_gate);
                dz[2 * hidden + unit] = dc * input_gate * (1.0f - cell_gate * cell_gate);
                dz[3 * hidden + unit] = dh_total * tanh_c * output_gate * (1.0f - output_gate);
                dc_carry = dc * forget_gate;
                if constexpr (StepNorms) {
                    squares[0] = fma((double)dh_total, (double)dh_total, squares[0]);
                    squares[1] = fma((double)dc, (double)dc, squares[1]);
                }
            }
            // The next chunk overwrites dz_chunk and partials (publish syncs the last).
            if (row0 + chunk_rows < batch) __syncthreads();
        }
        if constexpr (StepNorms) {
            // block_sum's shared scratch is reused next step only after publish's
            // __syncthreads(), so thread 0 has read it by then.
            block_sum<Threads>(squares);
            if (threadIdx.x == 0) {
                double* slot = step_squares + ((index_t)blockIdx.x * steps + step) * 2;
                slot[0] = squares[0];
                slot[1] = squares[1];
            }
        }
        persistent::publish(flags, (unsigned int)(steps - step));
    }
    for (int e = threadIdx.x; e < batch * own_units; e += Threads) {
        const int row = e / own_units, u = e - row * own_units;
        dc0[(index_t)row * hidden + unit0 + u] = carry[row * units + u];
    }
}

// out[col] = Σ_row matrix[row, col], for db = Σ_{t,b} dz, summed in float32 and rounded
// once to Out (float or __half) on store. Thread (x, y) of a block sums
// rows y, y + RowThreads, ... of column blockIdx.x·ColumnTile + x in increasing order,
// then the RowThreads partial sums meet in a fixed-shape tree: deterministic, no atomics.
template <typename Out, int ColumnTile, int RowThreads>
__global__ void __launch_bounds__(ColumnTile * RowThreads)
column_sum(const float* __restrict__ matrix,  // [rows, cols]
           Out* __restrict__ out,             // [cols]
           int rows,
           int cols) {
    static_assert((RowThreads & (RowThreads - 1)) == 0, "RowThreads must be a power of two");
    static_assert((ColumnTile * RowThreads) % 32 == 0, "whole warps only");
    __shared__ float partial[RowThreads][ColumnTile];

    const int col = blockIdx.x * ColumnTile + threadIdx.x;
    float sum = 0.0f;
    if (col < cols)
        for (int row = threadIdx.y; row < rows; row += RowThreads) sum += matrix[(index_t)row * cols + col];
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
#pragma unroll
    for (int stride = RowThreads / 2; stride > 0; stride /= 2) {
        if (threadIdx.y < stride) partial[threadIdx.y][threadIdx.x] += partial[threadIdx.y + stride][threadIdx.x];
        __syncthreads();
    }
    if (threadIdx.y == 0 && col < cols) out[col] = from_float<Out>(partial[0][threadIdx.x]);
}

// norms[q, t] = sqrt(Σ_block step_squares[block, t, q]): the per-step gradient norms
// from the step kernels' per-block sums. One thread per (t, q) pair adds the blocks in
// increasing order: deterministic, no atomics. Launched once, after the step loop.
template <int Threads>
__global__ void __launch_bounds__(Threads)
step_norms(const double* __restrict__ step_squares,  // [blocks, T, 2]
           double* __restrict__ norms,               // [2, T]: ‖dh_t‖, then ‖dc_t‖
           int blocks,                               // gridDim.x·gridDim.y of the step kernel
           int steps) {                              // T
    static_assert(Threads % 32 == 0, "whole warps only");
    const index_t pair = (index_t)blockIdx.x * Threads + threadIdx.x;  // 2t + q
    const index_t pairs = 2 * (index_t)steps;
    if (pair >= pairs) return;
    double sum = 0.0;
    for (int block = 0; block < blocks; ++block) sum += step_squares[block * pairs + pair];
    norms[(pair % 2) * steps + pair / 2] = sqrt(sum);
}

}  // namespace rnnkernels
