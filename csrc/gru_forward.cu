// gru_forward.cu: forward pass of one GRU layer; float32 or float16 inputs, float32 math.
//
// Computes, for t = 0 .. T-1 (gate order r, z, n as in torch.nn.GRU; the equations of
// rnnkernels/gru_reference.py):
//     gx_t = x_t·W_ihᵀ + [b_ir + b_hr, b_iz + b_hz, b_in]          [B, 3H]
//     gh_t = h_{t-1}·W_hhᵀ, and gh^n += b_hn                        [B, 3H]
//     r = σ(gx^r + gh^r)   z = σ(gx^z + gh^z)   n = tanh(gx^n + r·gh^n)
//     h_t = (1 - z)·n + z·h_{t-1}      y_t = h_t
// with h_{-1} = h0. b_hn sits inside r·(W_hn h + b_hn), so it is added to the hidden
// product's n block only, never folded into gx (the API's folded GRU bias is
// [b_r sum, b_z sum, b_in, b_hn], [4H]; the launcher passes its first 3H to the GEMM
// and its last H here).
//
// Two steps, launched by rnnkernels/_launch.py:
//   1. a GEMM (cuBLAS; NumPy in the emulator), once for all steps: gx = x·W_ihᵀ + bias[:3H]
//   2. gru_forward_step<Storage, ..., Training>, once per step t, in order: the three
//      recurrent pre-activations of the block's (b, j) pairs from step.cuh's
//      hidden_product<3> (h_{t-1} and the r, z, n rows of W_hh of each unit staged in
//      shared memory), then the cell update in registers.
//
// Precision: as lstm_forward.cu (Storage float or __half for x, W, outputs; every
// product, activation and workspace float32; the recurrence reads the float32 h_{t-1}).
//
// Layouts (row-major, C-contiguous; Storage where marked, else float32):
//   x      [T, B, I] Storage   w_ih [3H, I] Storage   w_hh [3H, H] Storage
//   gx     [T, B, 3H]          x·W_ihᵀ + bias[:3H]
//   b_hn   [H]                 bias[3H:4H] (zeros when the layer has no bias)
//   h_all  [T+1, B, H]         h_all[0] = h0, h_all[t+1] = h_t
//   gates  [T, B, 3H]          Training only: activated r, z, n of every step
//   hn     [T, B, H]           Training only: gh^n = W_hn h_{t-1} + b_hn (the reset
//                              gate's derivative needs it)
// Saved for backward (Training): x, W_ih, W_hh, gates, hn, h_all (see gru_backward.cu).
//
// The persistent variant (rnnkernels/_persistent.py) replaces step 2 by ONE cooperative
// launch of gru_forward_persistent<...> for all T steps (persistent.cuh); it writes the
// same h_all, gates and hn.
//
// Notes for the launcher: step.cuh's launch shape; any B, H >= 1.
#include "common.cuh"
#include "persistent.cuh"
#include "step.cuh"

namespace rnnkernels {

// Number of gate row blocks of a GRU cell (r, z, n).
constexpr int gru_gates = 3;

template <typename Storage, int UnitTile, int BatchThreads, int RowsPerThread, int KTile, int KSplit, bool Training>
__global__ void __launch_bounds__(UnitTile * BatchThreads * KSplit)
gru_forward_step(const float* __restrict__ gx,      // [T, B, 3H] x·W_ihᵀ + bias[:3H], gates r,z,n
                 const Storage* __restrict__ w_hh,  // [3H, H], gate order r,z,n
                 const float* __restrict__ b_hn,    // [H] the n gate's hidden bias
                 float* h_all,                      // [T+1, B, H]; reads slot t, writes t+1
                 float* gates,                      // [T, B, 3H] activated r, z, n; Training only
                 float* hn,                         // [T, B, H] gh^n; Training only
                 int batch,                         // B
                 int hidden,                        // H
                 int step) {                        // t, 0 <= t < T
    constexpr int BatchTile = BatchThreads * RowsPerThread;
    const index_t state_size = (index_t)batch * hidden;
    const float* h_prev = h_all + (index_t)step * state_size;
    float acc[gru_gates][RowsPerThread];
    if (!hidden_product<gru_gates, Storage, UnitTile, BatchThreads, RowsPerThread, KTile, KSplit>(w_hh, h_prev, batch,
                                                                                                  hidden, acc))
        return;  // a k slice other than the first: its partial sums are added in

    const int unit = blockIdx.x * UnitTile + threadIdx.x;
    if (unit >= hidden) return;
    const int row0 = blockIdx.y * BatchTile;
    const float hidden_bias = b_hn[unit];
#pragma unroll
    for (int r = 0; r < RowsPerThread; ++r) {
        const int row = row0 + threadIdx.y + r * BatchThreads;
        if (row >= batch) continue;
        const index_t gate_offset = ((index_t)step * batch + row) * (gru_gates * hidden);
        const float* gx_row = gx + gate_offset;
        const float reset_gate = sigmoid(gx_row[unit] + acc[0][r]);
        const float update_gate = sigmoid(gx_row[hidden + unit] + acc[1][r]);
        const float hidden_n = acc[2][r] + hidden_bias;  // gh^n = W_hn h_{t-1} + b_hn
        const float candidate = tanh_activation(gx_row[2 * hidden + unit] + reset_gate * hidden_n);
        const index_t cell = (index_t)row * hidden + unit;
        const float h = (1.0f - update_gate) * candidate + update_gate * h_prev[cell];
        h_all[(index_t)(step + 1) * state_size + cell] = h;
        if (Training) {
            float* gates_row = gates + gate_offset;
            gates_row[unit] = reset_gate;
            gates_row[hidden + unit] = update_gate;
            gates_row[2 * hidden + unit] = candidate;
            hn[(index_t)step * state_size + cell] = hidden_n;
        }
    }
}

// ------------------------------------------------------------------ persistent
// All T steps in one cooperative launch: persistent.cuh's forward_recurrence (the
// machinery, the block's units, the prefetch of each thread's first pair's gx before
// the wait) with the GRU's policy below: an item is the r, z, n rows of one unit; no
// carry (the GRU's state is h alone, which every step re-stages, and which gives each
// pair its own h_{t-1} for z·h_{t-1}); per (row, unit) pair gru_forward_step's cell
// update: h_t (and, Training, the gates and gh^n).
template <typename Storage, bool Training>
struct GruForwardCell {
    static constexpr int gates = gru_gates;
    static constexpr bool gate_items = true;
    static constexpr bool carry = false;
    const float* gx;
    const Storage* w_hh;
    const float* b_hn;
    float* h_all;
    float* saved_gates;
    float* hn;
    int batch, hidden;

    struct Inputs {
        float gx[gru_gates];
    };
    __device__ __forceinline__ Inputs load_inputs(int step, int row, int unit) const {
        Inputs in;
        const float* gx_row = gx + ((index_t)step * batch + row) * (gru_gates * hidden) + unit;
#pragma unroll
        for (int g = 0; g < gru_gates; ++g) in.gx[g] = gx_row[g * hidden];
        return in;
    }
    __device__ __forceinline__ void update(const Inputs& in, const float (&product)[gru_gates], int step, int row,
                                           int unit, const float* staged_row, float* /* carry */) const {
        const index_t state_size = (index_t)batch * hidden;
        const float reset_gate = sigmoid(in.gx[0] + product[0]);
        const float update_gate = sigmoid(in.gx[1] + product[1]);
        const float hidden_n = product[2] + b_hn[unit];  // gh^n = W_hn h_{t-1} + b_hn
        const float candidate = tanh_activation(in.gx[2] + reset_gate * hidden_n);
        const index_t cell = (index_t)row * hidden + unit;
        h_all[(index_t)(step + 1) * state_size + cell] =
            (1.0f - update_gate) * candidate + update_gate * staged_row[unit];  // staged h_{t-1}
        if (Training) {
            float* gates_row = saved_gates + ((index_t)step * batch + row) * (gru_gates * hidden);
            gates_row[unit] = reset_gate;
            gates_row[hidden + unit] = update_gate;
            gates_row[2 * hidden + unit] = candidate;
            hn[(index_t)step * state_size + cell] = hidden_n;
        }
    }
};

// Launch: as lstm_forward_persistent (checked by rnnkernels/_persistent.py); dynamic
// shared memory = SharedLayout's total·4 bytes with no cells region.
template <typename Storage, int Threads, int KSplit, int RowTile, int InFlight, bool VectorLoads, bool Training>
__global__ void __launch_bounds__(Threads, 1)
gru_forward_persistent(const float* __restrict__ gx,      // [T, B, 3H] x·W_ihᵀ + bias[:3H], gates r,z,n
                       const Storage* __restrict__ w_hh,  // [3H, H], gate order r,z,n
                       const float* __restrict__ b_hn,    // [H] the n gate's hidden bias
                       float* h_all,                      // [T+1, B, H]; h_all[0] = h0 on entry
                       float* gates,                      // [T, B, 3H] activated r, z, n; Training only
                       float* hn,                         // [T, B, H] gh^n; Training only
                       unsigned int* flags,               // [blocks], zero on entry
                       int steps,                         // T
                       int batch,                         // B
                       int hidden,                        // H
                       int units,                         // hidden units per block
                       int chunk_rows) {                  // batch rows staged at a time
    const GruForwardCell<Storage, Training> cell{gx, w_hh, b_hn, h_all, gates, hn, batch, hidden};
    persistent::forward_recurrence<GruForwardCell<Storage, Training>, Threads, KSplit, RowTile, InFlight, VectorLoads>(
        cell, h_all, flags, steps, batch, hidden, units, chunk_rows);
}

}  // namespace rnnkernels
