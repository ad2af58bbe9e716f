// rnn_forward.cu: forward pass of one Elman RNN layer (tanh or ReLU); float32 or
// float16 inputs, float32 math.
//
// Computes, for t = 0 .. T-1 (rnnkernels/rnn_reference.py; torch.nn.RNN's layout):
//     a_t = x_t·W_ihᵀ + b + h_{t-1}·W_hhᵀ       (b = b_ih + b_hh, folded by the API)
//     h_t = act(a_t)        y_t = h_t            act = tanh or relu
// with h_{-1} = h0. The nonlinearity is a template parameter (Relu), as cuDNN's
// RNN_TANH / RNN_RELU modes are two cells: no runtime branch per element.
//
// Two steps, launched by rnnkernels/_launch.py:
//   1. a GEMM (cuBLAS; NumPy in the emulator), once for all steps: gx = x·W_ihᵀ + b
//   2. rnn_forward_step<Storage, Relu, ...>, once per step t, in order: step.cuh's
//      hidden_product<1> for the block's (b, j) pairs, plus gx, then act.
// There are no gates to save: backward reads act'(a_t) off h_t (1 - h_t² for tanh,
// [h_t > 0] for relu), so training and inference run the same instance.
//
// Precision: as lstm_forward.cu (Storage float or __half for x, W, outputs; float32
// math and workspaces; the recurrence reads the float32 h_{t-1}).
//
// Layouts (row-major, C-contiguous; Storage where marked, else float32):
//   x  [T, B, I] Storage   w_ih [H, I] Storage   w_hh [H, H] Storage
//   gx [T, B, H]           x·W_ihᵀ + b
//   h_all [T+1, B, H]      h_all[0] = h0, h_all[t+1] = h_t
// Saved for backward: x, W_ih, W_hh, h_all (see rnn_backward.cu).
//
// The persistent variant (rnnkernels/_persistent.py) replaces step 2 by ONE cooperative
// launch of rnn_forward_persistent<...> (persistent.cuh); it writes the same h_all.
//
// Notes for the launcher: step.cuh's launch shape; any B, H >= 1.
#include "common.cuh"
#include "persistent.cuh"
#include "step.cuh"

namespace rnnkernels {

// The Elman cell's activation. relu as PyTorch's: NaN stays NaN (a < 0 is false for it).
template <bool Relu>
__device__ __forceinline__ float elman_activation(float a) {
    if constexpr (Relu)
        return a < 0.0f ? 0.0f : a;
    else
        return tanh_activation(a);
}

template <typename Storage, bool Relu, int UnitTile, int BatchThreads, int RowsPerThread, int KTile, int KSplit>
__global__ void __launch_bounds__(UnitTile * BatchThreads * KSplit)
rnn_forward_step(const float* __restrict__ gx,      // [T, B, H] x·W_ihᵀ + b
                 const Storage* __restrict__ w_hh,  // [H, H]
                 float* h_all,                      // [T+1, B, H]; reads slot t, writes t+1
                 int batch,                         // B
                 int hidden,                        // H
                 int step) {                        // t, 0 <= t < T
    constexpr int BatchTile = BatchThreads * RowsPerThread;
    const index_t state_size = (index_t)batch * hidden;
    float acc[1][RowsPerThread];
    if (!hidden_product<1, Storage, UnitTile, BatchThreads, RowsPerThread, KTile, KSplit>(
            w_hh, h_all + (index_t)step * state_size, batch, hidden, acc))
        return;  // a k slice other than the first: its partial sums are added in

    const int unit = blockIdx.x * UnitTile + threadIdx.x;
    if (unit >= hidden) return;
    const int row0 = blockIdx.y * BatchTile;
#pragma unroll
    for (int r = 0; r < RowsPerThread; ++r) {
        const int row = row0 + threadIdx.y + r * BatchThreads;
        if (row >= batch) continue;
        const index_t cell = (index_t)row * hidden + unit;
        h_all[(index_t)(step + 1) * state_size + cell] =
            elman_activation<Relu>(gx[(index_t)step * state_size + cell] + acc[0][r]);
    }
}

// ------------------------------------------------------------------ persistent
// All T steps in one cooperative launch (persistent.cuh's machinery). Block b owns the
// units [b·units, (b+1)·units) ∩ [0, H): W_hh's rows of its units (padded to a multiple
// of 4 with zero rows) stay in shared memory as float32; per step it waits for
// h_{t-1}, stages it chunk by chunk, forms the product with items of four consecutive
// units (the Elman cell has one gate row per unit: four units make the register tile
// lstm_forward_persistent's four gates make), and writes h_t = act(gx + product);
// then publishes step t+1. No per-cell carry; each thread loads the gx of its first
// pair before the wait. Launch as lstm_forward_persistent.
template <typename Storage, bool Relu, int Threads, int KSplit, int RowTile, int InFlight, bool VectorLoads>
__global__ void __launch_bounds__(Threads, 1)
rnn_forward_persistent(const float* __restrict__ gx,      // [T, B, H] x·W_ihᵀ + b
                       const Storage* __restrict__ w_hh,  // [H, H]
                       float* h_all,                      // [T+1, B, H]; h_all[0] = h0 on entry
                       unsigned int* flags,               // [blocks], zero on entry
                       int steps,                         // T
                       int batch,                         // B
                       int hidden,                        // H
                       int units,                         // hidden units per block
                       int chunk_rows) {                  // batch rows staged at a time
    static_assert(Threads % 32 == 0, "whole warps only");
    constexpr int ItemRows = 4;  // an item: four consecutive units (rows of W_hh)
    const int unit0 = blockIdx.x * units;
    const int own_units = min(units, hidden - unit0);
    const int producers = gridDim.x;
    const index_t state_size = (index_t)batch * hidden;
    const int padded_units = persistent::round_up(units, ItemRows);

    const persistent::SharedLayout<ItemRows, RowTile, KSplit> layout(padded_units, hidden, chunk_rows,
                                                                     padded_units / ItemRows, batch, 0);
    float* shared = persistent::dynamic_shared<float>();
    float* w_slice = shared + layout.weights;  // row u = W_hh[unit0 + u, :]
    float* h_chunk = shared + layout.state;
    float* partials = shared + layout.partials;

    persistent::load_slice<Threads>(w_slice, padded_units, hidden, layout.k_pad, [&](int u, int k) {
        return u < own_units ? to_float(w_hh[(index_t)(unit0 + u) * hidden + k]) : 0.0f;
    });
    __syncthreads();

    for (int step = 0; step < steps; ++step) {
        // gx of this thread's first (row, unit) pair, loaded BEFORE the wait (as in
        // lstm_forward_persistent): it does not depend on the other blocks.
        float gx_first = 0.0f;
        if ((int)threadIdx.x < min(chunk_rows, batch) * own_units) {
            const int r = threadIdx.x / own_units, u = threadIdx.x - r * own_units;
            gx_first = gx[(index_t)step * state_size + (index_t)r * hidden + unit0 + u];
        }
        if (step > 0) persistent::wait_for<Threads>(flags, producers, (unsigned int)step);
        const float* h_prev = h_all + (index_t)step * state_size;
        float* h_next = h_all + (index_t)(step + 1) * state_size;
        for (int row0 = 0; row0 < batch; row0 += chunk_rows) {
            const int rows = min(chunk_rows, batch - row0);
            persistent::stage_rows<Threads, InFlight, VectorLoads>(h_chunk, layout.k_pad, h_prev + (index_t)row0 * hidden,
                                                                  hidden, rows, persistent::round_up(rows, RowTile), hidden);
            __syncthreads();
            persistent::slice_times_state<Threads, KSplit, ItemRows, RowTile>(w_slice, h_chunk, partials, layout,
                                                                             ItemRows, 1);
            __syncthreads();
            for (int pair = threadIdx.x; pair < rows * own_units; pair += Threads) {
                const int r = pair / own_units, u = pair - r * own_units;
                const int row = row0 + r, unit = unit0 + u;
                const index_t cell = (index_t)row * hidden + unit;
                // The first pair of the first chunk is the one prefetched above.
                const bool prefetched = row0 == 0 && pair == (int)threadIdx.x;
                h_next[cell] = elman_activation<Relu>(
                    (prefetched ? gx_first : gx[(index_t)step * state_size + cell]) +
                    persistent::sum_partials<KSplit, ItemRows, RowTile>(partials, layout, u / ItemRows, u % ItemRows, r));
            }
            // The next chunk overwrites h_chunk and partials (publish syncs the last).
            if (row0 + chunk_rows < batch) __syncthreads();
        }
        persistent::publish(flags, (unsigned int)(step + 1));
    }
}

}  // namespace rnnkernels
