// lstm_forward.cu: forward pass of one LSTM layer; float32 or float16 inputs, float32 math.
//
// Computes, for t = 0 .. T-1 (gate order i, f, g, o as in torch.nn.LSTM):
//     z_t = x_t·W_ihᵀ + b + h_{t-1}·W_hhᵀ                        [B, 4H]
//     i = σ(z^i)  f = σ(z^f)  g = tanh(z^g)  o = σ(z^o)
//     c_t = f·c_{t-1} + i·g      h_t = o·tanh(c_t)      y_t = h_t
// with h_{-1} = h0, c_{-1} = c0.
//
// Two steps, launched by rnnkernels/_launch.py:
//   1. a GEMM on cuBLAS (NumPy in the emulator; rnnkernels/_gemm.py), once for all steps:
//          gx[T·B, 4H] = x[T·B, I]·W_ihᵀ + b          (b = b_ih + b_hh, or none)
//   2. lstm_forward_step<Storage, ..., Training>, once per step t, in order: a block owns a
//      tile of UnitTile hidden units j and BatchTile batch rows; it computes all four
//      gate pre-activations of its (b, j) pairs, h_{t-1}·W_hh[g·H + j, :]ᵀ for
//      g = i, f, g, o, by staging h_{t-1} and the four matching W_hh rows of each
//      unit in shared memory (step.cuh's hidden_product, shared by every cell), adds
//      gx[t], and applies the cell update in registers.
//      Gate values never round-trip through global memory (except the copy saved for
//      backward when Training).
//
// Precision: the inputs x, w_ih, w_hh (and h0, c0, which the launcher copies into
// h_all[0], c_all[0]) are Storage: float for float32 problems, __half (binary16,
// common.cuh) for float16 ones. Every product, sum and activation is float32, and the
// workspaces gx, h_all, c_all, gates are float32 whatever Storage is. The recurrence
// reads the float32 h_{t-1} and c_{t-1}, NOT their float16 roundings: a float16
// problem follows the float32 trajectory from float16 inputs (more accurate than a
// framework that stores h_t in float16 between steps), and only the outputs y, h_n,
// c_n are rounded to float16, once, by the launcher (to nearest even). For float the
// kernels are the float32 ones, unchanged.
//
// Layouts (row-major, C-contiguous; Storage where marked, else float32):
//   x      [T, B, I] Storage  w_ih [4H, I] Storage  w_hh [4H, H] Storage
//   bias   [4H]               b_ih + b_hh, summed in float32 by the API (read by the GEMM)
//   gx     [T, B, 4H]         gate pre-activations from the input, bias included
//   h_all  [T+1, B, H]        h_all[0] = h0, h_all[t+1] = h_t (so y = h_all[1:], rounded
//                             to the input dtype by the launcher)
//   c_all  [T+1, B, H]        Training: c_all[0] = c0, c_all[t+1] = c_t
//          [2, B, H]          inference: c_t lives in slot (t+1) % 2 (ping-pong)
//   gates  [T, B, 4H]         Training only: activated i, f, g, o of every step
//
// Saved for backward (Training): x, W_ih, W_hh, gates, h_all, c_all
// (see lstm_backward.cu).
//
// The persistent variant (rnnkernels/_persistent.py) replaces step 2 by ONE cooperative
// launch of lstm_forward_persistent<...> for all T steps (see persistent.cuh and the
// kernel's comment); it writes the same h_all, c_all and gates.
//
// Notes for the launcher: block = (UnitTile, BatchThreads, KSplit) threads, grid =
// (ceil(H / UnitTile), ceil(B / (BatchThreads·RowsPerThread))). Any B, H >= 1 works
// (boundary checks on every load and store). One launch per step on one stream: step
// t+1 reads the h_t that step t wrote.
#include "common.cuh"
#include "persistent.cuh"
#include "step.cuh"

namespace rnnkernels {

template <typename Storage, int UnitTile, int BatchThreads, int RowsPerThread, int KTile, int KSplit, bool Training>
__global__ void __launch_bounds__(UnitTile * BatchThreads * KSplit)
lstm_forward_step(const float* __restrict__ gx,      // [T, B, 4H] x·W_ihᵀ + b, gate order i,f,g,o
                  const Storage* __restrict__ w_hh,  // [4H, H], gate order i,f,g,o
                  float* h_all,                    // [T+1, B, H]; reads slot t, writes slot t+1
                  float* c_all,                    // [T+1, B, H] (Training) or [2, B, H]
                  float* gates,                    // [T, B, 4H] activated gates; Training only
                  int batch,                       // B
                  int hidden,                      // H
                  int step) {                      // t, 0 <= t < T
    constexpr int BatchTile = BatchThreads * RowsPerThread;
    const index_t state_size = (index_t)batch * hidden;
    // The recurrent pre-activations of the four gates (the tile loop of step.cuh).
    float acc[lstm_gates][RowsPerThread];
    if (!hidden_product<lstm_gates, Storage, UnitTile, BatchThreads, RowsPerThread, KTile, KSplit>(
            w_hh, h_all + (index_t)step * state_size, batch, hidden, acc))
        return;  // a k slice other than the first: its partial sums are added in

    const int unit_in_tile = threadIdx.x;
    const int batch_lane = threadIdx.y;
    const int unit0 = blockIdx.x * UnitTile;
    const int row0 = blockIdx.y * BatchTile;
    const int unit = unit0 + unit_in_tile;
    if (unit >= hidden) return;
    // Inference keeps only two cell-state slots (ping-pong); training keeps them all.
    const index_t c_prev_slot = Training ? step : (step & 1);
    const index_t c_next_slot = Training ? step + 1 : ((step + 1) & 1);
#pragma unroll
    for (int r = 0; r < RowsPerThread; ++r) {
        const int row = row0 + batch_lane + r * BatchThreads;
        if (row >= batch) continue;
        const index_t gate_offset = ((index_t)step * batch + row) * (lstm_gates * hidden);
        const float* gx_row = gx + gate_offset;
        const float input_gate = sigmoid(acc[0][r] + gx_row[unit]);
        const float forget_gate = sigmoid(acc[1][r] + gx_row[hidden + unit]);
        const float cell_gate = tanh_activation(acc[2][r] + gx_row[2 * hidden + unit]);
        const float output_gate = sigmoid(acc[3][r] + gx_row[3 * hidden + unit]);

        const index_t cell = (index_t)row * hidden + unit;
        const float c = forget_gate * c_all[c_prev_slot * state_size + cell] + input_gate * cell_gate;
        const float h = output_gate * tanh_activation(c);
        c_all[c_next_slot * state_size + cell] = c;
        h_all[(index_t)(step + 1) * state_size + cell] = h;
        if (Training) {
            float* gates_row = gates + gate_offset;
            gates_row[unit] = input_gate;
            gates_row[hidden + unit] = forget_gate;
            gates_row[2 * hidden + unit] = cell_gate;
            gates_row[3 * hidden + unit] = output_gate;
        }
    }
}

// ------------------------------------------------------------------ persistent
// All T steps of the recurrence in one cooperative launch: persistent.cuh's
// forward_recurrence (the machinery, the memory ordering, the block's units, the
// prefetch of each thread's first pair's gx before the wait) with the LSTM's policy
// below: an item is the i, f, g, o rows of one unit; W_hh's rows stay in shared memory
// as float32 (float16 weights are widened once, so the slice costs 4 bytes per weight
// whatever the storage: simpler, and the product is float32 anyway); c0 of the block's
// cells goes to shared memory, where c_t stays between steps (only Training copies it
// out, to c_all). Per (row, unit) pair: the four gates' k-partials summed in fixed
// order, plus gx, activations, c and h; h_t to h_all[t+1] (and c_t, the gates when
// Training). Gate order and math are lstm_forward_step's, so results agree with it to
// rounding (the k-sums are ordered differently) and both save the same arrays.
template <typename Storage, bool Training>
struct LstmForwardCell {
    static constexpr int gates = lstm_gates;
    static constexpr bool gate_items = true;
    static constexpr bool carry = true;
    const float* gx;
    const Storage* w_hh;
    const float* c0;
    float* h_all;
    float* c_out;
    float* saved_gates;
    int steps, batch, hidden;

    struct Inputs {
        float gx[lstm_gates];
    };
    __device__ __forceinline__ Inputs load_inputs(int step, int row, int unit) const {
        Inputs in;
        const float* gx_row = gx + ((index_t)step * batch + row) * (lstm_gates * hidden) + unit;
#pragma unroll
        for (int g = 0; g < lstm_gates; ++g) in.gx[g] = gx_row[g * hidden];
        return in;
    }
    __device__ __forceinline__ float initial_carry(index_t cell) const { return c0[cell]; }
    __device__ __forceinline__ void update(const Inputs& in, const float (&product)[lstm_gates], int step, int row,
                                           int unit, const float* /* staged_row */, float* cell) const {
        const index_t state_size = (index_t)batch * hidden;
        float z[lstm_gates];
#pragma unroll
        for (int g = 0; g < lstm_gates; ++g) z[g] = product[g] + in.gx[g];
        const float input_gate = sigmoid(z[0]);
        const float forget_gate = sigmoid(z[1]);
        const float cell_gate = tanh_activation(z[2]);
        const float output_gate = sigmoid(z[3]);
        const float c = forget_gate * *cell + input_gate * cell_gate;
        *cell = c;
        const index_t state = (index_t)row * hidden + unit;
        h_all[(index_t)(step + 1) * state_size + state] = output_gate * tanh_activation(c);
        if (Training) {
            c_out[(index_t)(step + 1) * state_size + state] = c;
            float* gates_row = saved_gates + ((index_t)step * batch + row) * (lstm_gates * hidden);
            gates_row[unit] = input_gate;
            gates_row[hidden + unit] = forget_gate;
            gates_row[2 * hidden + unit] = cell_gate;
            gates_row[3 * hidden + unit] = output_gate;
        } else if (step + 1 == steps) {
            c_out[state] = c;
        }
    }
};

// Launch (checked by rnnkernels/_persistent.py): grid = (blocks, 1, 1) with
// blocks = ceil(H / units) <= the number of co-resident blocks (a COOPERATIVE launch,
// which refuses a grid that cannot be resident instead of letting the waits
// deadlock), block = (Threads, 1, 1), dynamic shared memory = SharedLayout's total·4
// bytes; chunk_rows a multiple of RowTile; flags [blocks] zeroed; VectorLoads only if
// H % 4 == 0 (16-byte aligned rows of h_all).
template <typename Storage, int Threads, int KSplit, int RowTile, int InFlight, bool VectorLoads, bool Training>
__global__ void __launch_bounds__(Threads, 1)
lstm_forward_persistent(const float* __restrict__ gx,      // [T, B, 4H] x·W_ihᵀ + b, gate order i,f,g,o
                        const Storage* __restrict__ w_hh,  // [4H, H], gate order i,f,g,o
                        const float* __restrict__ c0,      // [B, H] float32
                        float* h_all,                      // [T+1, B, H]; h_all[0] = h0 on entry
                        float* c_out,                      // Training: c_all [T+1, B, H] (slots 1..T
                                                           // written); inference: [B, H], c_T
                        float* gates,                      // [T, B, 4H] activated gates; Training only
                        unsigned int* flags,               // [blocks], zero on entry
                        int steps,                         // T
                        int batch,                         // B
                        int hidden,                        // H
                        int units,                         // hidden units per block
                        int chunk_rows) {                  // batch rows staged at a time
    const LstmForwardCell<Storage, Training> cell{gx, w_hh, c0, h_all, c_out, gates, steps, batch, hidden};
    persistent::forward_recurrence<LstmForwardCell<Storage, Training>, Threads, KSplit, RowTile, InFlight, VectorLoads>(
        cell, h_all, flags, steps, batch, hidden, units, chunk_rows);
}

// ------------------------------------------------------------------ projected cell
// proj_size (LSTM with a projection, torch.nn.LSTM's LSTMP; rnnkernels/reference.py's
// "projections"): the recurrence reads the projected h_{t-1} [B, P], so the per-step
// kernels above (whose product is h_{t-1}·W_hhᵀ with K = H) do not apply. The launcher
// (rnnkernels/_projected.py) runs each step as cuDNN-like library code would:
//     z_t = gx[t] + h_{t-1}·W_hhᵀ      cuBLAS, accumulated into gx[t] in place
//     THIS kernel: the pointwise cell on z_t: activations, c_t, r_t = o ⊙ tanh(c_t)
//     h_t = r_t·W_hrᵀ                  cuBLAS, into h_all[t+1]
// One thread per (row, unit) pair of the step, grid = ceil(B·H / Threads) blocks.
// All arrays float32 (float16 problems widen W_hh and W_hr once; the states stay
// float32 as in the unprojected kernels). Same activations (common.cuh) and the same
// expressions, in the same order, as lstm_forward_step's epilogue.
template <int Threads, bool Training>
__global__ void __launch_bounds__(Threads)
lstm_projected_forward_cell(const float* __restrict__ z,  // [T, B, 4H] slot t: gx[t] + h_{t-1}·W_hhᵀ
                            float* c_all,                 // [T+1, B, H] (Training) or [2, B, H]
                            float* __restrict__ r,        // [B, H] r_t = o ⊙ tanh(c_t), read by the h GEMM
                            float* __restrict__ gates,    // [T, B, 4H] activated gates; Training only
                            int batch,                    // B
                            int hidden,                   // H
                            int step) {                   // t, 0 <= t < T
    const index_t pair = (index_t)blockIdx.x * Threads + threadIdx.x;
    const index_t state_size = (index_t)batch * hidden;
    if (pair >= state_size) return;
    const int row = (int)(pair / hidden);
    const int unit = (int)(pair - (index_t)row * hidden);
    const index_t gate_offset = ((index_t)step * batch + row) * (lstm_gates * hidden);
    const float* z_row = z + gate_offset;
    const float input_gate = sigmoid(z_row[unit]);
    const float forget_gate = sigmoid(z_row[hidden + unit]);
    const float cell_gate = tanh_activation(z_row[2 * hidden + unit]);
    const float output_gate = sigmoid(z_row[3 * hidden + unit]);
    // Inference keeps only two cell-state slots (ping-pong); training keeps them all.
    const index_t c_prev_slot = Training ? step : (step & 1);
    const index_t c_next_slot = Training ? step + 1 : ((step + 1) & 1);
    const float c = forget_gate * c_all[c_prev_slot * state_size + pair] + input_gate * cell_gate;
    c_all[c_next_slot * state_size + pair] = c;
    r[pair] = output_gate * tanh_activation(c);
    if (Training) {
        float* gates_row = gates + gate_offset;
        gates_row[unit] = input_gate;
        gates_row[hidden + unit] = forget_gate;
        gates_row[2 * hidden + unit] = cell_gate;
        gates_row[3 * hidden + unit] = output_gate;
    }
}

}  // namespace rnnkernels
