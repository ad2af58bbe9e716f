// reductions.cuh: the fixed-order sums every cell's backward ends with: column_sum
// (the bias gradient, db = Σ_{t,b} dz) and step_norms (the per-step gradient norms).
// Written once here, instantiated by each backward file (lstm_backward.cu,
// gru_backward.cu, rnn_backward.cu) in its own module.
#pragma once

#include "common.cuh"

namespace rnnkernels {

// out[col] = Σ_row matrix[row, col], for db = Σ_{t,b} dz, summed in float32 and rounded
// once to Out (float or __half) on store. Thread (x, y) of a block sums
// rows y, y + RowThreads, ... of column blockIdx.x·ColumnTile + x in increasing order,
// then the RowThreads partial sums meet in a fixed-shape tree: deterministic, no atomics.
template <typename Out, int ColumnTile, int RowThreads>
__global__ void __launch_bounds__(ColumnTile * RowThreads)
column_sum(const float* __restrict__ matrix,  // [rows, cols]
           Out* __restrict__ out,             // [cols]
           int rows,
           int cols) {
    static_assert((RowThreads & (RowThreads - 1)) == 0, "RowThreads must be a power of two");
    static_assert((ColumnTile * RowThreads) % 32 == 0, "whole warps only");
    __shared__ float partial[RowThreads][ColumnTile];

    const int col = blockIdx.x * ColumnTile + threadIdx.x;
    float sum = 0.0f;
    if (col < cols)
        for (int row = threadIdx.y; row < rows; row += RowThreads) sum += matrix[(index_t)row * cols + col];
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
#pragma unroll
    for (int stride = RowThreads / 2; stride > 0; stride /= 2) {
        if (threadIdx.y < stride) partial[threadIdx.y][threadIdx.x] += partial[threadIdx.y + stride][threadIdx.x];
        __syncthreads();
    }
    if (threadIdx.y == 0 && col < cols) out[col] = from_float<Out>(partial[0][threadIdx.x]);
}

// norms[q, t] = sqrt(Σ_block step_squares[block, t, q]): the per-step gradient norms
// from the step kernels' per-block sums (store_step_squares in step.cuh), Quantities
// of them per step (the LSTM: ‖dh_t‖ and ‖dc_t‖; the GRU and the Elman RNN: ‖dh_t‖).
// One thread per (t, q) pair adds the blocks in increasing order: deterministic, no
// atomics. Launched once, after the step loop.
template <int Threads, int Quantities>
__global__ void __launch_bounds__(Threads)
step_norms(const double* __restrict__ step_squares,  // [blocks, T, Quantities]
           double* __restrict__ norms,               // [Quantities, T]: LSTM ‖dh_t‖, then ‖dc_t‖
           int blocks,                               // gridDim.x·gridDim.y of the step kernel
           int steps) {                              // T
    static_assert(Threads % 32 == 0, "whole warps only");
    const index_t pair = (index_t)blockIdx.x * Threads + threadIdx.x;  // Quantities·t + q
    const index_t pairs = Quantities * (index_t)steps;
    if (pair >= pairs) return;
    double sum = 0.0;
    for (int block = 0; block < blocks; ++block) sum += step_squares[block * pairs + pair];
    norms[(pair % Quantities) * steps + pair / Quantities] = sqrt(sum);
}

}  // namespace rnnkernels
