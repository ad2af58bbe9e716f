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
//      unit in shared memory, adds gx[t], and applies the cell update in registers.
//      Gate values never round-trip through global memory (except the copy saved for
//      backward when Training).
//
// Precision: the inputs x, w_ih, w_hh, bias (and h0, c0, which the launcher copies into
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
//   x      [T, B, I] Storage  w_ih [4H, I] Storage  w_hh [4H, H] Storage  bias [4H] Storage
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
// Notes for the launcher: block = (UnitTile, BatchThreads) threads, grid =
// (ceil(H / UnitTile), ceil(B / (BatchThreads·RowsPerThread))). Any B, H >= 1 works
// (boundary checks on every load and store). One launch per step on one stream: step
// t+1 reads the h_t that step t wrote.
#include "common.cuh"

namespace rnnkernels {

template <typename Storage, int UnitTile, int BatchThreads, int RowsPerThread, int KTile, bool Training>
__global__ void __launch_bounds__(UnitTile * BatchThreads)
lstm_forward_step(const float* __restrict__ gx,      // [T, B, 4H] x·W_ihᵀ + b, gate order i,f,g,o
                  const Storage* __restrict__ w_hh,  // [4H, H], gate order i,f,g,o
                  float* h_all,                    // [T+1, B, H]; reads slot t, writes slot t+1
                  float* c_all,                    // [T+1, B, H] (Training) or [2, B, H]
                  float* gates,                    // [T, B, 4H] activated gates; Training only
                  int batch,                       // B
                  int hidden,                      // H
                  int step) {                      // t, 0 <= t < T
    constexpr int Threads = UnitTile * BatchThreads;
    constexpr int BatchTile = BatchThreads * RowsPerThread;
    constexpr int GateRows = lstm_gates * UnitTile;
    static_assert(Threads % 32 == 0, "whole warps only");
    static_assert((KTile & (KTile - 1)) == 0, "KTile must be a power of two");

    // w_tile[k][g·UnitTile + u] = W_hh[g·H + unit0 + u, k0 + k]: the i, f, g, o rows of
    // a unit sit in the same tile. Threads of a warp read consecutive u (no bank
    // conflicts); the +1 pad keeps the transposing store conflict-free.
    __shared__ float w_tile[KTile][GateRows + 1];
    // h_tile[r][k] = h_{t-1}[row0 + r, k0 + k]; a warp reads at most a few rows, each
    // as a broadcast.
    __shared__ float h_tile[BatchTile][KTile + 1];

    const int unit_in_tile = threadIdx.x;
    const int batch_lane = threadIdx.y;
    const int thread = threadIdx.y * UnitTile + threadIdx.x;
    const int unit0 = blockIdx.x * UnitTile;
    const int row0 = blockIdx.y * BatchTile;
    const index_t state_size = (index_t)batch * hidden;
    const float* h_prev = h_all + (index_t)step * state_size;

    float acc[lstm_gates][RowsPerThread];
#pragma unroll
    for (int g = 0; g < lstm_gates; ++g)
#pragma unroll
        for (int r = 0; r < RowsPerThread; ++r) acc[g][r] = 0.0f;

    for (int k0 = 0; k0 < hidden; k0 += KTile) {
        // k is the contiguous dimension of both W_hh and h: consecutive threads load
        // consecutive k (coalesced).
        for (int e = thread; e < GateRows * KTile; e += Threads) {
            const int kk = e % KTile, gate_row = e / KTile;
            const int unit = unit0 + gate_row % UnitTile, gate = gate_row / UnitTile;
            const int k = k0 + kk;
            w_tile[kk][gate_row] = (unit < hidden && k < hidden)
                                       ? to_float(w_hh[((index_t)gate * hidden + unit) * hidden + k])
                                       : 0.0f;
        }
        for (int e = thread; e < BatchTile * KTile; e += Threads) {
            const int kk = e % KTile, r = e / KTile;
            const int row = row0 + r, k = k0 + kk;
            h_tile[r][kk] = (row < batch && k < hidden) ? h_prev[(index_t)row * hidden + k] : 0.0f;
        }
        __syncthreads();

#pragma unroll
        for (int kk = 0; kk < KTile; ++kk) {
            float w[lstm_gates];
#pragma unroll
            for (int g = 0; g < lstm_gates; ++g) w[g] = w_tile[kk][g * UnitTile + unit_in_tile];
#pragma unroll
            for (int r = 0; r < RowsPerThread; ++r) {
                const float h = h_tile[batch_lane + r * BatchThreads][kk];
#pragma unroll
                for (int g = 0; g < lstm_gates; ++g) acc[g][r] = fmaf(w[g], h, acc[g][r]);
            }
        }
        __syncthreads();
    }

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

}  // namespace rnnkernels
