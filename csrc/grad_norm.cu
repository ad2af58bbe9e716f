// grad_norm.cu: the sum of squares Σ_k Σ_i g_k[i]² over many gradient arrays of one
// element type, in ONE launch (plus one tiny finishing launch), for clip_grad_norm's
// global norm ‖(g_1, …, g_n)‖₂ = √(that sum) (rnnkernels/clip.py takes the root).
//
// Layouts:
//   pointers   [count] unsigned 64-bit: the address of g_k's first element; every
//              g_k is contiguous, elements of type T (float, double or __half)
//   ends       [count] int64: ends[k] = size(g_0) + … + size(g_k), the prefix sums of
//              the sizes; total = ends[count-1] > 0. Arrays of size 0 are allowed.
//   block_sums [gridDim.x] float64: block b's partial sum (grad_norm_partial)
//   out        [1] float64: Σ_b block_sums[b] (grad_norm_finish)
//
// The arrays are read as one virtual concatenation of `total` elements. Block b owns the
// contiguous chunk [b·chunk, min((b+1)·chunk, total)); inside it, array by array, thread
// t adds the elements t, t + Threads, … of that array's part of the chunk (consecutive
// threads read consecutive elements: coalesced). Every thread accumulates x² in float64
// with fma in that fixed order, a fixed-shape tree (warp shuffles, then warp sums in warp
// order) adds the block's threads, and grad_norm_finish adds the block sums the same way.
// No atomics and no dependence on scheduling or on the device: the result is a function
// of the data, `chunk` and Threads only, so it is bitwise identical run after run.
//
// Why float64: a float32 or float16 square is exact in float64, so only the additions
// round (2^-53 relative each), and squares that overflow float32 (|x| > ~1.8e19) or
// float16 (|x| > 255) do not. NaN and Inf propagate through the sum (squares are >= 0,
// so Inf + Inf never makes a NaN); a float64 sum of finite squares can still overflow to
// Inf (|x| > ~1e154), which the caller tells apart from a real Inf on the host.
//
// float16 is read as cuda_fp16.h's __half and widened by __half2float (to_float,
// common.cuh), which is exact for every binary16 value, subnormals included, under the
// -ftz=true CuPy compiles with.
//
// Notes for the launcher (rnnkernels/_grad_norm.py): 1-D grid of ceil(total / chunk)
// blocks of Threads threads, any chunk >= 1 (a multiple of Threads wastes no lanes);
// then grad_norm_finish with ONE block of Threads threads over those block sums. The
// arrays and the pointer table must stay alive until the launches complete.
#include "common.cuh"

namespace rnnkernels {

__device__ __forceinline__ double widen(float x) { return (double)x; }
__device__ __forceinline__ double widen(double x) { return x; }
// binary16 -> float64, exactly, through common.cuh's to_float (binary16 -> float is exact).
__device__ __forceinline__ double widen(__half x) { return (double)to_float(x); }

// The first k with ends[k] > position (exists for 0 <= position < ends[count-1]).
__device__ __forceinline__ int array_holding(const long long* __restrict__ ends, int count, long long position) {
    int low = 0, high = count - 1;
    while (low < high) {
        const int middle = low + (high - low) / 2;
        if (ends[middle] > position)
            high = middle;
        else
            low = middle + 1;
    }
    return low;
}

// block_sums[b] = Σ x² over block b's chunk of the concatenated arrays.
template <typename T, int Threads>
__global__ void __launch_bounds__(Threads)
grad_norm_partial(const unsigned long long* __restrict__ pointers,  // [count] addresses of T arrays
                  const long long* __restrict__ ends,               // [count] prefix sums of sizes
                  int count,                                        // n >= 1
                  long long total,                                  // ends[count-1] >= 1
                  long long chunk,                                  // elements per block, >= 1
                  double* __restrict__ block_sums) {                // [gridDim.x]
    static_assert(Threads % 32 == 0, "whole warps only");
    const long long start = (long long)blockIdx.x * chunk;
    const long long stop = start + chunk < total ? start + chunk : total;

    double squares[1] = {0.0};
    // Walk the arrays overlapping [start, stop) in order; empty ones are skipped.
    long long position = start;
    for (int k = array_holding(ends, count, start); position < stop; ++k) {
        const long long begin = k == 0 ? 0 : ends[k - 1];  // g_k's first virtual index
        const long long end = ends[k] < stop ? ends[k] : stop;
        const T* __restrict__ values = reinterpret_cast<const T*>(pointers[k]);
        for (long long i = position + threadIdx.x; i < end; i += Threads) {
            const double x = widen(values[i - begin]);
            squares[0] = fma(x, x, squares[0]);
        }
        position = end;
    }

    block_sum<Threads>(squares);  // common.cuh
    if (threadIdx.x == 0) block_sums[blockIdx.x] = squares[0];
}

// out[0] = Σ_b block_sums[b], for ONE block: thread t adds b = t, t + Threads, … in
// increasing order, then the fixed block tree.
template <int Threads>
__global__ void __launch_bounds__(Threads)
grad_norm_finish(const double* __restrict__ block_sums,  // [blocks]
                 int blocks,                             // gridDim.x of grad_norm_partial
                 double* __restrict__ out) {             // [1]
    double sum[1] = {0.0};
    for (int b = threadIdx.x; b < blocks; b += Threads) sum[0] += block_sums[b];
    block_sum<Threads>(sum);
    if (threadIdx.x == 0) out[0] = sum[0];
}

}  // namespace rnnkernels
