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
// All T steps in one cooperative launch: persistent.cuh's forward_recurrence with the
// Elman policy below. The cell has one gate row per unit, so an item is four
// consecutive units (W_hh's rows of the block's units, padded to a multiple of 4 with
// zero rows): four units make the register tile the LSTM's four gates make. No carry;
// each thread's first pair's gx is loaded before the wait; per (row, unit) pair
// h_t = act(gx + product).
template <typename Storage, bool Relu>
struct RnnForwardCell {
    static constexpr int gates = 1;
    static constexpr bool gate_items = false;
    static constexpr bool carry = false;
    const float* gx;
    const Storage* w_hh;
    float* h_all;
    int batch, hidden;

    struct Inputs {
        float gx;
    };
    __device__ __forceinline__ Inputs load_inputs(int step, int row, int unit) const {
        return Inputs{gx[((index_t)step * batch + row) * hidden + unit]};
    }
    __device__ __forceinline__ void update(const Inputs& in, const float (&product)[1], int step, int row, int unit,
                                           const float* /* staged_row */, float* /* carry */) const {
        const index_t state_size = (index_t)batch * hidden;
        h_all[(index_t)(step + 1) * state_size + (index_t)row * hidden + unit] =
            elman_activation<Relu>(in.gx + product[0]);
    }
};

// Launch as lstm_forward_persistent.
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
    const RnnForwardCell<Storage, Relu> cell{gx, w_hh, h_all, batch, hidden};
    persistent::forward_recurrence<RnnForwardCell<Storage, Relu>, Threads, KSplit, RowTile, InFlight, VectorLoads>(
        cell, h_all, flags, steps, batch, hidden, units, chunk_rows);
}

}  // namespace rnnkernels
