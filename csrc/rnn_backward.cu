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
// The reverse recurrence in one cooperative launch: persistent.cuh's
// backward_recurrence with K = H and the Elman policy below (no carry; each thread's
// first pair's dy and h_t are loaded before the wait); per (row, unit) pair
// rnn_backward_step's pointwise math; StepNorms: Σ dh_t².
template <typename Storage, bool Relu, bool StepNorms>
struct RnnBackwardCell {
    static constexpr int gates = 1;
    static constexpr bool carry = false;
    static constexpr int norms = 1;  // ‖dh_t‖
    const Storage* w_hh;
    const float* h_all;
    const Storage* dy;
    const Storage* dh_n;
    float* da;
    int batch, hidden;

    struct Inputs {
        float dy, h;  // h = h_t = h_all[t+1]
    };
    __device__ __forceinline__ Inputs load_inputs(int step, int row, int unit) const {
        Inputs in;
        const index_t offset = (index_t)step * batch * hidden + (index_t)row * hidden + unit;
        in.dy = to_float(dy[offset]);
        in.h = h_all[offset + (index_t)batch * hidden];
        return in;
    }
    __device__ __forceinline__ void update(const Inputs& in, bool recurrent, float recurrent_part, int step, int row,
                                           int unit, float* /* carry */, double (&squares)[norms]) const {
        const index_t cell = (index_t)row * hidden + unit;
        const index_t offset = (index_t)step * batch * hidden + cell;
        float dh_total = recurrent_part;
        dh_total += in.dy;
        if (!recurrent) dh_total += to_float(dh_n[cell]);
        const float h = in.h;  // h_t
        if constexpr (Relu)
            da[offset] = h <= 0.0f ? 0.0f : dh_total;  // PyTorch's: a NaN h passes dh
        else
            da[offset] = dh_total * (1.0f - h * h);
        if constexpr (StepNorms) squares[0] = fma((double)dh_total, (double)dh_total, squares[0]);
    }
};

// Launch as lstm_backward_persistent. VectorLoads (16-byte staging of da rows) needs
// H % 4 == 0.
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
    const RnnBackwardCell<Storage, Relu, StepNorms> cell{w_hh, h_all, dy, dh_n, da, batch, hidden};
    persistent::backward_recurrence<RnnBackwardCell<Storage, Relu, StepNorms>, Threads, KSplit, RowTile, InFlight,
                                    VectorLoads, StepNorms>(cell, da, step_squares, flags, steps, batch, hidden, units,
                                                            chunk_rows);
}

}  // namespace rnnkernels
