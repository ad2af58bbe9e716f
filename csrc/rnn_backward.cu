// rnn_backward.cu: backpropagation through time for rnn_forward.cu; float32 math.
//
// Computes, for t = T-1 .. 0 (rnnkernels/rnn_reference.py):
//     dh_t = dy_t + da_{t+1}·W_hh          (at t = T-1: dy_t + dh_n)
//     da_t = dh_t·act'(a_t)                tanh: 1 - h_t²; relu: 0 where h_t <= 0, else 1
//                                          (PyTorch's threshold_backward: a NaN h_t passes dh)
// then, over all steps at once (launcher): dW_ih = daᵀ·x, dW_hh = daᵀ·h_prev,
// db = Σ_{t,b} da (the folded bias: db_ih = db_hh = db), dx = da·W_ih, dh0 = da_0·W_hh.
//
// Kernels, launched by rnnkernels/_launch.py:
//   1. rnn_backward_step<Storage, Relu, ...>, once per step t, in reverse order:
//      step.cuh's recurrent_gradient<1> (da_{t+1}·W_hh, K = H), then da_t in registers;
//      with StepNorms the block's Σ dh_t² to its slot of step_squares.
//   2. GEMMs for dx, dW_ih, dW_hh, dh0; 3. column_sum (reductions.cuh) for db;
//   4. step_norms<..., 1> with StepNorms. Fixed-order sums: bitwise deterministic.
//
// Layouts (row-major, C-contiguous; Storage where marked, else float32):
//   w_hh [H, H] Storage   h_all [T+1, B, H]   dy [T, B, H] Storage   dh_n [B, H] Storage
//   da   [T, B, H]        step_squares [blocks, T, 1] float64 (StepNorms only)
//
// The persistent variant (rnnkernels/_persistent.py) replaces step 1 by ONE cooperative
// launch of rnn_backward_persistent<...> (persistent.cuh); it writes the same da and
// step_squares.
//
// Notes for the launcher: step.cuh's launch shape; any B, H >= 1.
#include "common.cuh"
#include "persistent.cuh"
#include "reductions.cuh"
#include "step.cuh"

namespace rnnkernels {

template <typename Storage, bool Relu, int UnitTile, int BatchThreads, int RowsPerThread, int KTile, int KSplit,
          bool StepNorms>
__global__ void __launch_bounds__(UnitTile * BatchThreads * KSplit)
rnn_backward_step(const Storage* __restrict__ w_hh,  // [H, H]
                  const float* __restrict__ h_all,   // [T+1, B, H]
                  const Storage* __restrict__ dy,    // [T, B, H]
                  const Storage* __restrict__ dh_n,  // [B, H], added at t = T-1
                  float* da,                         // [T, B, H]; reads slot t+1, writes t
                  double* step_squares,              // [blocks, T, 1]; StepNorms only
                  int steps,                         // T
                  int batch,                         // B
                  int hidden,                        // H
                  int step) {                        // t, 0 <= t < T
    constexpr int Threads = UnitTile * BatchThreads * KSplit;
    constexpr int BatchTile = BatchThreads * RowsPerThread;
    const index_t state_size = (index_t)batch * hidden;
    float dh[RowsPerThread];
    recurrent_gradient<1, Storage, UnitTile, BatchThreads, RowsPerThread, KTile, KSplit>(
        w_hh, step + 1 < steps ? da + (index_t)(step + 1) * state_size : nullptr, batch, hidden, dh);

    const int slice = KSplit > 1 ? (int)threadIdx.z : 0;
    const int unit = blockIdx.x * UnitTile + threadIdx.x;
    const int row0 = blockIdx.y * BatchTile;
    double squares[1] = {0.0};  // Σ dh_t² of this thread's pairs (StepNorms only)
    // No early return: with StepNorms every thread joins the block sum.
    if (unit < hidden && slice == 0) {
#pragma unroll
        for (int r = 0; r < RowsPerThread; ++r) {
            const int row = row0 + threadIdx.y + r * BatchThreads;
            if (row >= batch) continue;
            const index_t cell = (index_t)row * hidden + unit;
            const index_t offset = (index_t)step * state_size + cell;
            float dh_total = dh[r] + to_float(dy[offset]);
            if (step + 1 == steps) dh_total += to_float(dh_n[cell]);
            const float h = h_all[offset + state_size];  // h_t = h_all[t+1]
            if constexpr (Relu)
                da[offset] = h <= 0.0f ? 0.0f : dh_total;  // PyTorch's: a NaN h passes dh
            else
                da[offset] = dh_total * (1.0f - h * h);
            if constexpr (StepNorms) squares[0] = fma((double)dh_total, (double)dh_total, squares[0]);
        }
    }
    if constexpr (StepNorms) store_step_squares<Threads>(squares, step_squares, steps, step);
}

// ------------------------------------------------------------------ persistent
// The reverse recurrence in one cooperative launch (persistent.cuh's machinery, as
// lstm_backward_persistent with K = H): W_hh's columns of the block's units stay in
// shared memory transposed; per step (T-1 down to 0) it waits for da_{t+1} (except at
// t = T-1), stages it chunk by chunk, forms da_{t+1}·W_hh[:, units] (items of four
// units), then rnn_backward_step's pointwise math per (row, unit) pair; StepNorms:
// Σ dh_t² into step_squares[block, t]; publishes step t. No per-cell carry. Each
// thread loads its first pair's dy and h_t before the wait.
// VectorLoads (16-byte staging of da rows) needs H % 4 == 0.
template <typename Storage, bool Relu, int Threads, int KSplit, int RowTile, int InFlight, bool VectorLoads,
          bool StepNorms>
__global__ void __launch_bounds__(Threads, 1)
rnn_backward_persistent(const Storage* __restrict__ w_hh,  // [H, H]
                        const float* __restrict__ h_all,   // [T+1, B, H]
                        const Storage* __restrict__ dy,    // [T, B, H]
                        const Storage* __restrict__ dh_n,  // [B, H], added at t = T-1
                        float* da,                         // [T, B, H]; reads slot t+1, writes t
                        double* step_squares,              // [blocks, T, 1]; StepNorms only
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
    const index_t state_size = (index_t)batch * hidden;
    const int padded_units = persistent::round_up(units, ItemRows);

    const persistent::SharedLayout<ItemRows, RowTile, KSplit> layout(padded_units, hidden, chunk_rows,
                                                                     padded_units / ItemRows, batch, 0);
    float* shared = persistent::dynamic_shared<float>();
    float* w_slice = shared + layout.weights;  // row u = W_hh[:, unit0 + u]
    float* dz_chunk = shared + layout.state;
    float* partials = shared + layout.partials;

    persistent::load_slice<Threads>(w_slice, padded_units, hidden, layout.k_pad, [&](int u, int k) {
        return u < own_units ? to_float(w_hh[(index_t)k * hidden + unit0 + u]) : 0.0f;
    });
    __syncthreads();

    // What the pointwise backward of one (row, unit) pair reads at a step, none of it
    // written in this launch.
    struct PairInputs {
        float dy, h;  // h = h_t = h_all[t+1]
    };
    auto load_inputs = [&](int step, int row, int unit) {
        PairInputs in;
        const index_t offset = (index_t)step * state_size + (index_t)row * hidden + unit;
        in.dy = to_float(dy[offset]);
        in.h = h_all[offset + state_size];
        return in;
    };

    for (int step = steps - 1; step >= 0; --step) {
        const bool recurrent = step + 1 < steps;  // uniform over the grid
        // The inputs of this thread's first pair, loaded BEFORE the wait (as in
        // lstm_backward_persistent): their latency overlaps the wait instead of
        // following the product.
        PairInputs first;
        if ((int)threadIdx.x < min(chunk_rows, batch) * own_units) {
            const int r = threadIdx.x / own_units;
            first = load_inputs(step, r, unit0 + (threadIdx.x - r * own_units));
        }
        if (recurrent) persistent::wait_for<Threads>(flags, producers, (unsigned int)(steps - 1 - step));
        double squares[1] = {0.0};  // Σ dh² of this thread's pairs
        const float* dz_next = da + (index_t)(step + 1) * state_size;
        for (int row0 = 0; row0 < batch; row0 += chunk_rows) {
            const int rows = min(chunk_rows, batch - row0);
            if (recurrent) {
                persistent::stage_rows<Threads, InFlight, VectorLoads>(dz_chunk, layout.k_pad,
                                                                      dz_next + (index_t)row0 * hidden, hidden, rows,
                                                                      persistent::round_up(rows, RowTile), hidden);
                __syncthreads();
                persistent::slice_times_state<Threads, KSplit, ItemRows, RowTile>(w_slice, dz_chunk, partials, layout,
                                                                                 ItemRows, 1);
                __syncthreads();
            }
            for (int pair = threadIdx.x; pair < rows * own_units; pair += Threads) {
                const int r = pair / own_units, u = pair - r * own_units;
                const int row = row0 + r, unit = unit0 + u;
                const index_t cell = (index_t)row * hidden + unit;
                const index_t offset = (index_t)step * state_size + cell;
                // The first pair of the first chunk is the one prefetched above.
                const PairInputs in = (row0 == 0 && pair == (int)threadIdx.x) ? first : load_inputs(step, row, unit);
                float dh_total = recurrent ? persistent::sum_partials<KSplit, ItemRows, RowTile>(
                                                 partials, layout, u / ItemRows, u % ItemRows, r)
                                           : 0.0f;
                dh_total += in.dy;
                if (!recurrent) dh_total += to_float(dh_n[cell]);
                const float h = in.h;  // h_t = h_all[t+1]
                if constexpr (Relu)
                    da[offset] = h <= 0.0f ? 0.0f : dh_total;  // PyTorch's: a NaN h passes dh
                else
                    da[offset] = dh_total * (1.0f - h * h);
                if constexpr (StepNorms) squares[0] = fma((double)dh_total, (double)dh_total, squares[0]);
            }
            // The next chunk overwrites dz_chunk and partials (publish syncs the last).
            if (row0 + chunk_rows < batch) __syncthreads();
        }
        if constexpr (StepNorms) {
            // block_sum's scratch is reused next step only after publish's barrier.
            block_sum<Threads>(squares);
            if (threadIdx.x == 0) step_squares[(index_t)blockIdx.x * steps + step] = squares[0];
        }
        persistent::publish(flags, (unsigned int)(steps - step));
    }
}

}  // namespace rnnkernels
