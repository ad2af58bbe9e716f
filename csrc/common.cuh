// common.cuh: device helpers shared by every rnnkernels kernel.
//
// What it holds: numerically safe activations (sigmoid, tanh), a 64-bit index type
// and the fixed-order float64 block sum of the norm kernels. Nothing here includes a CUDA or system header: NVRTC compiles our sources
// without any header search path except csrc/ itself, and the CPU emulator provides
// the CUDA built-ins (threadIdx, __syncthreads, expf, tanhf, ...) through its shim,
// which defines RNNKERNELS_EMULATOR.
//
// Gate order everywhere is i, f, g, o (torch.nn.LSTM): gate row blocks
// [0, H), [H, 2H), [2H, 3H), [3H, 4H) of w_ih [4H, I], w_hh [4H, H] and of every
// [.., 4H] gate array.
#pragma once

namespace rnnkernels {

// Offsets into [T, B, 4H] arrays exceed 2^31 for large problems; every offset
// is computed in 64 bits from 32-bit shape arguments.
typedef long long index_t;

// Number of gates of an LSTM cell (i, f, g, o).
constexpr int lstm_gates = 4;

// σ(x) = 1 / (1 + e^{-x}), computed from e^{-|x|} so the exponential never
// overflows: for x >= 0 it is 1 / (1 + e^{-x}), for x < 0 it is e^{x} / (1 + e^{x}).
// Finite and in [0, 1] for every finite x (and saturates exactly at |x| ~ 1e4).
// expf, not __expf: the fast intrinsic loses ~2 ulp more, which the 1e-5 float32
// tolerance against the float64 reference does not need to spend.
__device__ __forceinline__ float sigmoid(float x) {
    const float e = expf(-fabsf(x));
    const float s = 1.0f / (1.0f + e);
    return x >= 0.0f ? s : e * s;
}

// tanhf is accurate to ~2 ulp and saturates to +-1 without overflow for large |x|.
__device__ __forceinline__ float tanh_activation(float x) { return tanhf(x); }

// Sums each of values[0 .. Count) over the Threads threads of a 1-D or 2-D block (every
// thread must call it; none may have exited). A fixed-shape tree, so the result does
// not depend on the order threads run: a shuffle tree inside each warp, then thread 0
// adds the warp sums in warp order. The totals are valid in thread 0 only. Call it once
// per kernel: a second call would overwrite warp_sums while thread 0 may still read it.
template <int Threads, int Count>
__device__ __forceinline__ void block_sum(double (&values)[Count]) {
    static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps only");
    constexpr int Warps = Threads / 32;
    __shared__ double warp_sums[Count][Warps];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
#pragma unroll
        for (int q = 0; q < Count; ++q) values[q] += __shfl_down_sync(0xffffffffu, values[q], offset);
    const int thread = threadIdx.y * blockDim.x + threadIdx.x;
    if (thread % 32 == 0)
#pragma unroll
        for (int q = 0; q < Count; ++q) warp_sums[q][thread / 32] = values[q];
    __syncthreads();
    if (thread == 0)
#pragma unroll
        for (int q = 0; q < Count; ++q) {
            values[q] = warp_sums[q][0];
#pragma unroll
            for (int w = 1; w < Warps; ++w) values[q] += warp_sums[q][w];
        }
}

}  // namespace rnnkernels
