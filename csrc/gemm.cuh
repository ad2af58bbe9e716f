// gemm.cuh: one tiled matrix product with float32 arithmetic, used for every "all
// steps at once" product of the LSTM (the launcher, rnnkernels/_launch.py, lists each
// use):
//
//     C[M, N] = op(A)[M, K] · op(B)[K, N]  (+ bias[N] broadcast over rows)
//
// Element types: A is AType, B and bias are BType, C is CType, each float or __half
// (common.cuh). Elements are widened to float on load (exact), summed in float, and C
// is rounded once on store (to nearest even for __half). With all three float this
// is the plain float32 product.
//
// Operands are row-major with a leading dimension (elements between rows):
//     TransposeA == false: A is stored [M, K], element (m, k) at a[m * lda + k]
//     TransposeA == true:  A is stored [K, M], element (m, k) at a[k * lda + m]
//     TransposeB == false: B is stored [K, N], element (k, n) at b[k * ldb + n]
//     TransposeB == true:  B is stored [N, K], element (k, n) at b[n * ldb + k]
//     C is stored [M, N], element (m, n) at c[m * ldc + n]
//
// Exact FP32: plain fused multiply-adds on the CUDA cores, no tensor cores, hence no
// TF32. Deterministic: every C element is summed by one thread, over k in increasing
// order, so the result is bitwise identical run after run (no split-K, no atomics).
//
// Tiling: a block computes a TileM x TileN tile of C; it walks K in chunks of TileK,
// staging the A and B chunks in shared memory; each of its
// (TileM / ThreadM) x (TileN / ThreadN) threads accumulates ThreadM x ThreadN
// outputs in registers. Out-of-range rows, columns and k are zero-filled on load and
// skipped on store, so any M, N, K >= 0 works.
#pragma once

#include "common.cuh"

namespace rnnkernels {

template <typename AType, typename BType, typename CType, int TileM, int TileN, int TileK, int ThreadM,
          int ThreadN, bool TransposeA, bool TransposeB, bool HasBias>
__global__ void __launch_bounds__((TileM / ThreadM) * (TileN / ThreadN))
gemm(const AType* __restrict__ a,     // see above: [M, K] or [K, M]
     int lda,                         // leading dimension of a
     const BType* __restrict__ b,     // see above: [K, N] or [N, K]
     int ldb,                         // leading dimension of b
     const BType* __restrict__ bias,  // [N], read only when HasBias
     CType* __restrict__ c,           // [M, N] output, overwritten
     int ldc,                         // leading dimension of c
     int m_size,                      // M
     int n_size,                      // N
     int k_size) {                    // K
    static_assert(TileM % ThreadM == 0 && TileN % ThreadN == 0, "tile must split evenly");
    constexpr int ThreadsM = TileM / ThreadM;
    constexpr int ThreadsN = TileN / ThreadN;
    constexpr int Threads = ThreadsM * ThreadsN;
    static_assert(Threads % 32 == 0, "whole warps only");

    // +1 pads break the bank conflicts of the transposing loads.
    __shared__ float a_tile[TileK][TileM + 1];
    __shared__ float b_tile[TileK][TileN + 1];

    const int thread_n = threadIdx.x % ThreadsN;
    const int thread_m = threadIdx.x / ThreadsN;
    // M can be T*B (large), so it walks the x dimension of the grid (up to 2^31 - 1).
    const int m0 = blockIdx.x * TileM;
    const int n0 = blockIdx.y * TileN;

    float acc[ThreadM][ThreadN];
#pragma unroll
    for (int i = 0; i < ThreadM; ++i)
#pragma unroll
        for (int j = 0; j < ThreadN; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < k_size; k0 += TileK) {
        // Load order follows the contiguous dimension so global reads coalesce.
        for (int e = threadIdx.x; e < TileM * TileK; e += Threads) {
            int mm, kk;
            if (TransposeA) { mm = e % TileM; kk = e / TileM; }
            else            { kk = e % TileK; mm = e / TileK; }
            const int row = m0 + mm, k = k0 + kk;
            float value = 0.0f;
            if (row < m_size && k < k_size)
                value = to_float(TransposeA ? a[(index_t)k * lda + row] : a[(index_t)row * lda + k]);
            a_tile[kk][mm] = value;
        }
        for (int e = threadIdx.x; e < TileN * TileK; e += Threads) {
            int nn, kk;
            if (TransposeB) { kk = e % TileK; nn = e / TileK; }
            else            { nn = e % TileN; kk = e / TileN; }
            const int col = n0 + nn, k = k0 + kk;
            float value = 0.0f;
            if (col < n_size && k < k_size)
                value = to_float(TransposeB ? b[(index_t)col * ldb + k] : b[(index_t)k * ldb + col]);
            b_tile[kk][nn] = value;
        }
        __syncthreads();

#pragma unroll
        for (int kk = 0; kk < TileK; ++kk) {
            float a_values[ThreadM], b_values[ThreadN];
            // Thread (thread_m, thread_n) owns rows thread_m + i * ThreadsM and columns
            // thread_n + j * ThreadsN: neighbouring threads read neighbouring words.
#pragma unroll
            for (int i = 0; i < ThreadM; ++i) a_values[i] = a_tile[kk][thread_m + i * ThreadsM];
#pragma unroll
            for (int j = 0; j < ThreadN; ++j) b_values[j] = b_tile[kk][thread_n + j * ThreadsN];
#pragma unroll
            for (int i = 0; i < ThreadM; ++i)
#pragma unroll
                for (int j = 0; j < ThreadN; ++j) acc[i][j] = fmaf(a_values[i], b_values[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < ThreadM; ++i) {
        const int row = m0 + thread_m + i * ThreadsM;
        if (row >= m_size) continue;
#pragma unroll
        for (int j = 0; j < ThreadN; ++j) {
            const int col = n0 + thread_n + j * ThreadsN;
            if (col >= n_size) continue;
            float value = acc[i][j];
            if (HasBias) value += to_float(bias[col]);
            c[(index_t)row * ldc + col] = from_float<CType>(value);
        }
    }
}

}  // namespace rnnkernels
