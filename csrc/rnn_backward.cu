// rnn_backward.cu: backpropagation through time for rnn_forward.cu; float32 math.
//
// Computes, for t = T-1 .. 0 (rnnkernels/rnn_reference.py):
//     dh_t = dy_t + da_{t+1}·W_hh          (at t = T-1: dy_t + dh_n)
//     da_t = dh_t·act'(a_t)                tanh: 1 - h_t²; relu: [h_t > 0] (PyTorch's
//                                          threshold_backward: 0 where h_t <= 0)
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
// Notes for the launcher: step.cuh's launch shape; any B, H >= 1.
#include "common.cuh"
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
                da[offset] = h > 0.0f ? dh_total : 0.0f;
            else
                da[offset] = dh_total * (1.0f - h * h);
            if constexpr (StepNorms) squares[0] = fma((double)dh_total, (double)dh_total, squares[0]);
        }
    }
    if constexpr (StepNorms) store_step_squares<Threads>(squares, step_squares, steps, step);
}

}  // namespace rnnkernels
