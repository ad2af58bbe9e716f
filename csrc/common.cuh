// common.cuh: device helpers shared by every rnnkernels kernel.
//
// What it holds: numerically safe activations (sigmoid, tanh), a 64-bit index type,
// the fixed-order float64 block sum of the norm kernels, and the conversions to_float /
// from_float between float and the storage types (float, cuda_fp16.h's __half).
// The one header included is NVIDIA's cuda_fp16.h: NVRTC finds it through the include
// folders rnnkernels/_sources.py locates (the pip wheels' or a toolkit's), the CPU
// emulator through its own stand-in (rnnkernels/emulator/include/cuda_fp16.h, same
// semantics), which also provides the CUDA built-ins (threadIdx, __syncthreads, expf,
// tanhf, ...) and defines RNNKERNELS_EMULATOR.
//
// Gate order everywhere is i, f, g, o (torch.nn.LSTM): gate row blocks
// [0, H), [H, 2H), [2H, 3H), [3H, 4H) of w_ih [4H, I], w_hh [4H, H] and of every
// [.., 4H] gate array.
#pragma once

#include <cuda_fp16.h>

namespace rnnkernels {

// Offsets into [T, B, 4H] arrays exceed 2^31 for large problems; every offset
// is computed in 64 bits from 32-bit shape arguments.
typedef long long index_t;

// Number of gates of an LSTM cell (i, f, g, o).
constexpr int lstm_gates = 4;

// ---------------------------------------------------------------- storage types
// Kernels that take a `typename Storage` read their inputs and write their outputs as
// Storage and do all arithmetic in float: Storage is float (float32 problems) or
// __half (float16 problems; cuda_fp16.h, same size and layout as numpy.float16). Load
// with to_float, store with from_float<Storage>; for float both are the identity, so the
// float instances compile to exactly the code they had before these helpers existed.
//
// The __half conversions are NVIDIA's, and they are exact under the flags the kernels
// really get: CuPy compiles every kernel with -ftz=true, which flushes float denormals
// in the arithmetic NVVM generates. __half2float is one cvt.f32.f16 instruction, exact
// for every binary16 value (each binary16 subnormal is a normal float), and
// __float2half_rn is cvt.rn.f16.f32, round to nearest even, as numpy's astype(float16).
// An earlier hand-written to_float built subnormals through a float multiply of a float
// denormal, which -ftz=true turned into 0 for all 2046 subnormal patterns
// (tests/emulator_kernels/ftz_conversions.cu keeps it, and tests/test_ftz.py shows the
// emulator, which flushes like the GPU, catching it).

__device__ __forceinline__ float to_float(float value) { return value; }

__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }

template <typename Storage>
__device__ __forceinline__ Storage from_float(float value);

template <>
__device__ __forceinline__ float from_float<float>(float value) {
    return value;
}

// Round to nearest, ties to even; |x| >= 65520 becomes Inf, NaN stays NaN.
template <>
__device__ __forceinline__ __half from_float<__half>(float value) {
    return __float2half_rn(value);
}

// True for float storage: the per-step kernels' 16-byte (float4) staging loads exist
// for it only (no <type_traits> under NVRTC without headers).
template <typename Storage>
struct is_float_storage {
    static constexpr bool value = false;
};
template <>
struct is_float_storage<float> {
    static constexpr bool value = true;
};

// Whether 16-byte loads of 4 consecutive floats along rows of `row_length` floats from
// `base` are aligned: every row starts on a 16-byte boundary. Uniform over a launch.
__device__ __forceinline__ bool rows_allow_float4(const void* base, int row_length) {
    return (row_length % 4) == 0 && (reinterpret_cast<unsigned long long>(base) % 16) == 0;
}

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

// Sums each of values[0 .. Count) over the Threads threads of a 1-, 2- or 3-D block (every
// thread must call it; none may have exited). A fixed-shape tree, so the result does
// not depend on the order threads run: a shuffle tree inside each warp, then thread 0
// adds the warp sums in warp order. The totals are valid in thread 0 only. A second call
// needs a __syncthreads() between the two (the persistent backward calls it once a step,
// with publish's barrier between): without one it would overwrite warp_sums while thread
// 0 may still read them.
template <int Threads, int Count>
__device__ __forceinline__ void block_sum(double (&values)[Count]) {
    static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps only");
    constexpr int Warps = Threads / 32;
    __shared__ double warp_sums[Count][Warps];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
#pragma unroll
        for (int q = 0; q < Count; ++q) values[q] += __shfl_down_sync(0xffffffffu, values[q], offset);
    const int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
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
