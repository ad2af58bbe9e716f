// gru_backward.cu: backpropagation through time for gru_forward.cu; float32 math.
//
// Computes, for t = T-1 .. 0 (gate order r, z, n; rnnkernels/gru_reference.py):
//     dh_t  = dy_t + carry_t + dgh_{t+1}·W_hh       carry_{T-1} = dh_n, dgh_T = 0
//     da^n = dh_t·(1-z)·(1-n²)   da^z = dh_t·(h_{t-1} - n)·z(1-z)
//     da^r = da^n·gh^n·r(1-r)
//     dgi_t = [da^r, da^z, da^n]      (gradient of gx: x's side)
//     dgh_t = [da^r, da^z, da^n·r]    (gradient of gh: the hidden product's side)
//     carry_{t-1} = dh_t·z           (the z·h_{t-1} path, no weight matrix)
// then, over all steps at once (launcher):
//     dW_ih = dgiᵀ·x   dW_hh = dghᵀ·h_prev   dx = dgi·W_ih   dh0 = carry_{-1} + dgh_0·W_hh
//     db (folded [4H]) = [Σ dgh^r, Σ dgh^z, Σ dgi^n, Σ dgh^n]
// The n rows are where dgi and dgh differ, so both are kept: dx and dW_ih use dgi,
// the recurrence, dW_hh and b_hn's gradient use dgh.
//
// Kernels, launched by rnnkernels/_launch.py:
//   1. gru_backward_step<Storage, ...>, once per step t, in reverse order: step.cuh's
//      recurrent_gradient<3> (dgh_{t+1}·W_hh, K = 3H) for the block's (b, j) pairs,
//      then the pointwise backward above in registers. With StepNorms the block's
//      Σ dh_t² goes to its slot of step_squares.
//   2. GEMMs for dx, dW_ih, dW_hh, dh0; 3. column_sum (reductions.cuh) over dgi and
//      dgh for db; 4. step_norms<..., 1> with StepNorms.
// Every sum has a fixed order: bitwise deterministic.
//
// Layouts (row-major, C-contiguous; Storage where marked, else float32):
//   w_hh   [3H, H] Storage      gates [T, B, 3H] r, z, n     hn [T, B, H] gh^n
//   h_all  [T+1, B, H]          dy [T, B, H] Storage
//   carry  [B, H]               starts as dh_n (widened); after step 0 it is dh_0·z_0
//   dgi, dgh [T, B, 3H]         step_squares [blocks, T, 1] float64 (StepNorms only)
//
// The persistent variant (rnnkernels/_persistent.py) replaces step 1 by ONE cooperative
// launch of gru_backward_persistent<...> (persistent.cuh); it writes the same dgi, dgh,
// carry and step_squares, and the launcher ends with the same steps 2 to 4.
//
// Notes for the launcher: step.cuh's launch shape; any B, H >= 1.
#include "common.cuh"
#include "persistent.cuh"
#include "reductions.cuh"
#include "step.cuh"

namespace rnnkernels {

constexpr int gru_gates = 3;  // r, z, n

template <typename Storage, int UnitTile, int BatchThreads, int RowsPerThread, int KTile, int KSplit, bool StepNorms>
__global__ void __launch_bounds__(UnitTile * BatchThreads * KSplit)
gru_backward_step(const Storage* __restrict__ w_hh,  // [3H, H], gate order r,z,n
                  const float* __restrict__ gates,   // [T, B, 3H] activated r, z, n
                  const float* __restrict__ hn,      // [T, B, H] gh^n = W_hn h_{t-1} + b_hn
                  const float* __restrict__ h_all,   // [T+1, B, H]
                  const Storage* __restrict__ dy,    // [T, B, H]
                  float* carry,                      // [B, H] dh_t·z_t into h_{t-1}; read, then overwritten
                  float* dgi,                        // [T, B, 3H]; writes slot t
                  float* dgh,                        // [T, B, 3H]; reads slot t+1, writes t
                  double* step_squares,              // [blocks, T, 1]; StepNorms only
                  int steps,                         // T
                  int batch,                         // B
                  int hidden,                        // H
                  int step) {                        // t, 0 <= t < T
    constexpr int Threads = UnitTile * BatchThreads * KSplit;
    constexpr int BatchTile = BatchThreads * RowsPerThread;
    const int gate_width = gru_gates * hidden;
    const index_t state_size = (index_t)batch * hidden;
    float dh[RowsPerThread];
    recurrent_gradient<gru_gates, Storage, UnitTile, BatchThreads, RowsPerThread, KTile, KSplit>(
        w_hh, step + 1 < steps ? dgh + (index_t)(step + 1) * batch * gate_width : nullptr, batch, hidden, dh);

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
            const index_t gate_offset = ((index_t)step * batch + row) * gate_width;
            const float* gates_row = gates + gate_offset;
            const float reset_gate = gates_row[unit];
            const float update_gate = gates_row[hidden + unit];
            const float candidate = gates_row[2 * hidden + unit];
            const float hidden_n = hn[(index_t)step * state_size + cell];
            const float h_prev = h_all[(index_t)step * state_size + cell];

            const float dh_total = dh[r] + to_float(dy[(index_t)step * state_size + cell]) + carry[cell];
            const float da_n = dh_total * (1.0f - update_gate) * (1.0f - candidate * candidate);
            const float da_z = dh_total * (h_prev - candidate) * update_gate * (1.0f - update_gate);
            const float da_r = da_n * hidden_n * reset_gate * (1.0f - reset_gate);
            float* dgi_row = dgi + gate_offset;
            float* dgh_row = dgh + gate_offset;
            dgi_row[unit] = da_r;
            dgi_row[hidden + unit] = da_z;
            dgi_row[2 * hidden + unit] = da_n;
            dgh_row[unit] = da_r;
            dgh_row[hidden + unit] = da_z;
            dgh_row[2 * hidden + unit] = da_n * reset_gate;
            carry[cell] = dh_total * update_gate;
            if constexpr (StepNorms) squares[0] = fma((double)dh_total, (double)dh_total, squares[0]);
        }
    }
    if constexpr (StepNorms) store_step_squares<Threads>(squares, step_squares, steps, step);
}

// ------------------------------------------------------------------ persistent
// The reverse recurrence, all T steps in one cooperative launch: persistent.cuh's
// backward_recurrence (W_hh's columns of the block's units, K = 3H, the prefetch of
// each thread's first pair's gates, gh^n, h_{t-1} and dy before the wait, the step
// norms' block sums) with the GRU's policy below: dh_n of the block's cells goes to
// shared memory, where the dh·z carry stays between steps; per (row, unit) pair
// gru_backward_step's pointwise math: dgi_t, dgh_t, the carry; StepNorms: Σ dh_t².
// After the loop the carry (dh_0·z_0) goes to carry_out; the launcher adds dgh_0·W_hh
// for dh0.
template <typename Storage, bool StepNorms>
struct GruBackwardCell {
    static constexpr int gates = gru_gates;
    static constexpr bool carry = true;
    static constexpr int norms = 1;  // ‖dh_t‖
    const Storage* w_hh;
    const float* saved_gates;
    const float* hn;
    const float* h_all;
    const Storage* dy;
    const float* dh_n;
    float* carry_out;
    float* dgi;
    float* dgh;
    int batch, hidden;

    // What the pointwise backward of one (row, unit) pair reads at a step (the carry is
    // the block's own, in shared memory).
    struct Inputs {
        float gate[gru_gates];  // activated r, z, n
        float hidden_n, h_prev, dy;
    };
    __device__ __forceinline__ Inputs load_inputs(int step, int row, int unit) const {
        Inputs in;
        const index_t state_size = (index_t)batch * hidden;
        const index_t cell = (index_t)row * hidden + unit;
        const float* gates_row = saved_gates + ((index_t)step * batch + row) * (gru_gates * hidden) + unit;
#pragma unroll
        for (int g = 0; g < gru_gates; ++g) in.gate[g] = gates_row[g * hidden];
        in.hidden_n = hn[(index_t)step * state_size + cell];
        in.h_prev = h_all[(index_t)step * state_size + cell];
        in.dy = to_float(dy[(index_t)step * state_size + cell]);
        return in;
    }
    __device__ __forceinline__ float initial_carry(index_t cell) const { return dh_n[cell]; }
    __device__ __forceinline__ void update(const Inputs& in, bool /* recurrent */, float recurrent_part, int step,
                                           int row, int unit, float* dh_carry, double (&squares)[norms]) const {
        const float reset_gate = in.gate[0];
        const float update_gate = in.gate[1];
        const float candidate = in.gate[2];
        const float hidden_n = in.hidden_n;
        const float h_prev = in.h_prev;

        const float dh_total = recurrent_part + in.dy + *dh_carry;
        const float da_n = dh_total * (1.0f - update_gate) * (1.0f - candidate * candidate);
        const float da_z = dh_total * (h_prev - candidate) * update_gate * (1.0f - update_gate);
        const float da_r = da_n * hidden_n * reset_gate * (1.0f - reset_gate);
        const index_t gate_offset = ((index_t)step * batch + row) * (gru_gates * hidden);
        float* dgi_row = dgi + gate_offset;
        float* dgh_row = dgh + gate_offset;
        dgi_row[unit] = da_r;
        dgi_row[hidden + unit] = da_z;
        dgi_row[2 * hidden + unit] = da_n;
        dgh_row[unit] = da_r;
        dgh_row[hidden + unit] = da_z;
        dgh_row[2 * hidden + unit] = da_n * reset_gate;
        *dh_carry = dh_total * update_gate;
        if constexpr (StepNorms) squares[0] = fma((double)dh_total, (double)dh_total, squares[0]);
    }
};

// Launch: as lstm_backward_persistent (checked by rnnkernels/_persistent.py).
// VectorLoads (16-byte staging of dgh rows) needs 3H % 4 == 0, i.e. H % 4 == 0.
template <typename Storage, int Threads, int KSplit, int RowTile, int InFlight, bool VectorLoads, bool StepNorms>
__global__ void __launch_bounds__(Threads, 1)
gru_backward_persistent(const Storage* __restrict__ w_hh,  // [3H, H], gate order r,z,n
                        const float* __restrict__ gates,   // [T, B, 3H] activated r, z, n
                        const float* __restrict__ hn,      // [T, B, H] gh^n
                        const float* __restrict__ h_all,   // [T+1, B, H]
                        const Storage* __restrict__ dy,    // [T, B, H]
                        const float* __restrict__ dh_n,    // [B, H] float32: the carry into step T-1
                        float* __restrict__ carry_out,     // [B, H] float32: the carry after t = 0
                        float* dgi,                        // [T, B, 3H]; writes slot t
                        float* dgh,                        // [T, B, 3H]; reads slot t+1, writes t
                        double* step_squares,              // [blocks, T, 1]; StepNorms only
                        unsigned int* flags,               // [blocks], zero on entry
                        int steps,                         // T
                        int batch,                         // B
                        int hidden,                        // H
                        int units,                         // hidden units per block
                        int chunk_rows) {                  // batch rows staged at a time
    const GruBackwardCell<Storage, StepNorms> cell{w_hh, gates, hn, h_all, dy, dh_n, carry_out, dgi, dgh, batch, hidden};
    persistent::backward_recurrence<GruBackwardCell<Storage, StepNorms>, Threads, KSplit, RowTile, InFlight,
                                    VectorLoads, StepNorms>(cell, dgh, step_squares, flags, steps, batch, hidden,
                                                            units, chunk_rows);
}

}  // namespace rnnkernels
