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
//      writes the two sums to its own slot of step_squares (see step_norms, reductions.cuh).
//   2. GEMMs on cuBLAS (NumPy in the emulator; rnnkernels/_gemm.py) for dx, dW_ih,
//      dW_hh, dh0 over T·B rows at once.
//   3. column_sum<Storage, ...> for db: fixed-order sums, no atomics (reductions.cuh).
//   4. step_norms<..., 2>, only with StepNorms: ‖dh_t‖ = sqrt(Σ_blocks dh_t²), same for dc.
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
#include "reductions.cuh"
#include "step.cuh"

namespace rnnkernels {

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
    constexpr int Threads = UnitTile * BatchThreads * KSplit;
    constexpr int BatchTile = BatchThreads * RowsPerThread;
    const int gate_width = lstm_gates * hidden;
    const index_t state_size = (index_t)batch * hidden;
    // dz_{t+1}·W_hh for the tile (step.cuh); the last step has no dz_{t+1}.
    float dh[RowsPerThread];
    recurrent_gradient<lstm_gates, Storage, UnitTile, BatchThreads, RowsPerThread, KTile, KSplit>(
        w_hh, step + 1 < steps ? dgates + (index_t)(step + 1) * batch * gate_width : nullptr, batch, hidden, dh);

    const int unit_in_tile = threadIdx.x;
    const int batch_lane = threadIdx.y;
    const int slice = KSplit > 1 ? (int)threadIdx.z : 0;
    const int unit0 = blockIdx.x * UnitTile;
    const int row0 = blockIdx.y * BatchTile;

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

    if constexpr (StepNorms) store_step_squares<Threads>(squares, step_squares, steps, step);
}

// ------------------------------------------------------------------ persistent
// The reverse recurrence, all T steps in one cooperative launch: persistent.cuh's
// backward_recurrence (the machinery, the memory ordering, W_hh's columns of the
// block's units in shared memory, K = 4H, the prefetch of each thread's first pair's
// inputs before the wait, the step norms' block sums) with the LSTM's policy below:
// dc_n of the block's cells goes to shared memory, where the dc carry stays between
// steps; per (row, unit) pair exactly lstm_backward_step's math: dh_t = the product +
// dy_t (+ dh_n at t = T-1), dc_t from the carry, dz_t of the four gates into
// dgates[t], carry = dc_t·f; StepNorms: Σ dh_t² and Σ dc_t². After the loop the carry
// is dc0. dh0 = dz_0·W_hh, dx, dW_ih, dW_hh and db are products over all steps, done
// after the launch (gradients_after_loop). Every sum has a fixed order: bitwise
// deterministic.
template <typename Storage, bool StepNorms>
struct LstmBackwardCell {
    static constexpr int gates = lstm_gates;
    static constexpr bool carry = true;
    static constexpr int norms = 2;  // ‖dh_t‖, ‖dc_t‖
    const Storage* w_hh;
    const float* saved_gates;
    const float* c_all;
    const Storage* dy;
    const Storage* dh_n;
    const float* dc_n;
    float* carry_out;
    float* dgates;
    int batch, hidden;

    // What the pointwise backward of one (row, unit) pair reads at a step.
    struct Inputs {
        float gate[lstm_gates];  // activated i, f, g, o
        float c, c_prev, dy;
    };
    __device__ __forceinline__ Inputs load_inputs(int step, int row, int unit) const {
        Inputs in;
        const index_t state_size = (index_t)batch * hidden;
        const index_t cell = (index_t)row * hidden + unit;
        const float* gates_row = saved_gates + ((index_t)step * batch + row) * (lstm_gates * hidden) + unit;
#pragma unroll
        for (int g = 0; g < lstm_gates; ++g) in.gate[g] = gates_row[g * hidden];
        in.c = c_all[(index_t)(step + 1) * state_size + cell];
        in.c_prev = c_all[(index_t)step * state_size + cell];
        in.dy = to_float(dy[(index_t)step * state_size + cell]);
        return in;
    }
    __device__ __forceinline__ float initial_carry(index_t cell) const { return dc_n[cell]; }
    __device__ __forceinline__ void update(const Inputs& in, bool recurrent, float recurrent_part, int step, int row,
                                           int unit, float* dc_carry, double (&squares)[norms]) const {
        const float input_gate = in.gate[0];
        const float forget_gate = in.gate[1];
        const float cell_gate = in.gate[2];
        const float output_gate = in.gate[3];
        const float c = in.c;
        const float c_prev = in.c_prev;
        const float tanh_c = tanh_activation(c);

        float dh_total = recurrent_part;
        dh_total += in.dy;
        if (!recurrent) dh_total += to_float(dh_n[(index_t)row * hidden + unit]);
        const float dc = *dc_carry + dh_total * output_gate * (1.0f - tanh_c * tanh_c);

        float* dz = dgates + ((index_t)step * batch + row) * (lstm_gates * hidden);
        dz[unit] = dc * cell_gate * input_gate * (1.0f - input_gate);
        dz[hidden + unit] = dc * c_prev * forget_gate * (1.0f - forget_gate);
        dz[2 * hidden + unit] = dc * input_gate * (1.0f - cell_gate * cell_gate);
        dz[3 * hidden + unit] = dh_total * tanh_c * output_gate * (1.0f - output_gate);
        *dc_carry = dc * forget_gate;
        if constexpr (StepNorms) {
            squares[0] = fma((double)dh_total, (double)dh_total, squares[0]);
            squares[1] = fma((double)dc, (double)dc, squares[1]);
        }
    }
};

// Launch (checked by rnnkernels/_persistent.py): grid = (blocks, 1, 1), blocks =
// ceil(H / units) co-resident blocks, COOPERATIVE; block = (Threads, 1, 1); dynamic
// shared memory = SharedLayout's total·4 bytes; chunk_rows a multiple of RowTile;
// flags [blocks] zeroed; dgates 16-byte aligned (its 4H-float rows are always staged
// with 16-byte loads).
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
    const LstmBackwardCell<Storage, StepNorms> cell{w_hh, gates, c_all, dy, dh_n, dc_n, dc0, dgates, batch, hidden};
    persistent::backward_recurrence<LstmBackwardCell<Storage, StepNorms>, Threads, KSplit, RowTile, InFlight, true,
                                    StepNorms>(cell, dgates, step_squares, flags, steps, batch, hidden, units,
                                               chunk_rows);
}

// ------------------------------------------------------------------ projected cell
// The pointwise backward of lstm_projected_forward_cell (lstm_forward.cu), one step;
// the launcher (rnnkernels/_projected.py) runs each step t = T-1 .. 0 as
//     dh_t = dy_t + dz_{t+1}·W_hh        cuBLAS, accumulated into dh_all[t] (= dy_t,
//                                        + dh_n at t = T-1, filled before the loop)
//     dr_t = dh_t·W_hr                   cuBLAS, [B, P]·[P, H]
//     THIS kernel: lstm_backward_step's pointwise math with dr_t in the place of its
//     dh_t: dc_t, dz_t of the four gates into dgates[t], carry = dc_t·f; and
//     r_t = o ⊙ tanh(c_t) into r_all[t] (the forward's expression on the same float32
//     gates and c, so the same bits) for dW_hr = Σ_t dh_tᵀ·r_t after the loop.
// One thread per (row, unit) pair, grid = ceil(B·H / Threads) blocks; float32 arrays.
template <int Threads>
__global__ void __launch_bounds__(Threads)
lstm_projected_backward_cell(const float* __restrict__ gates,  // [T, B, 4H] activated gates
                             const float* __restrict__ c_all,  // [T+1, B, H]
                             const float* __restrict__ dr,     // [B, H] dh_t·W_hr
                             float* dc_carry,                  // [B, H], read then overwritten
                             float* __restrict__ dgates,       // [T, B, 4H]; writes slot t
                             float* __restrict__ r_all,        // [T, B, H]; writes slot t
                             int batch,                        // B
                             int hidden,                       // H
                             int step) {                       // t, 0 <= t < T
    const index_t pair = (index_t)blockIdx.x * Threads + threadIdx.x;
    const index_t state_size = (index_t)batch * hidden;
    if (pair >= state_size) return;
    const int row = (int)(pair / hidden);
    const int unit = (int)(pair - (index_t)row * hidden);
    const index_t gate_offset = ((index_t)step * batch + row) * (lstm_gates * hidden);
    const float* gates_row = gates + gate_offset;
    const float input_gate = gates_row[unit];
    const float forget_gate = gates_row[hidden + unit];
    const float cell_gate = gates_row[2 * hidden + unit];
    const float output_gate = gates_row[3 * hidden + unit];
    const float c = c_all[(index_t)(step + 1) * state_size + pair];
    const float c_prev = c_all[(index_t)step * state_size + pair];
    const float tanh_c = tanh_activation(c);
    r_all[(index_t)step * state_size + pair] = output_gate * tanh_c;

    const float dh_total = dr[pair];
    const float dc = dc_carry[pair] + dh_total * output_gate * (1.0f - tanh_c * tanh_c);
    float* dz = dgates + gate_offset;
    dz[unit] = dc * cell_gate * input_gate * (1.0f - input_gate);
    dz[hidden + unit] = dc * c_prev * forget_gate * (1.0f - forget_gate);
    dz[2 * hidden + unit] = dc * input_gate * (1.0f - cell_gate * cell_gate);
    dz[3 * hidden + unit] = dh_total * tanh_c * output_gate * (1.0f - output_gate);
    dc_carry[pair] = dc * forget_gate;
}

}  // namespace rnnkernels
