// common.cuh: device helpers shared by every rnnkernels kernel.
//
// What it holds: numerically safe activations (sigmoid, tanh), a 64-bit index type,
// the fixed-order float64 block sum of the norm kernels, and the 16-bit storage type
// half_bits with its exact conversions to_float / from_float (round to nearest even).
// Nothing here includes a CUDA or system header: NVRTC compiles our sources
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

// ---------------------------------------------------------------- storage types
// Kernels that take a `typename Storage` read their inputs and write their outputs as
// Storage and do all arithmetic in float: Storage is float (float32 problems) or
// half_bits (float16 problems). Load with to_float, store with from_float<Storage>; for
// float both are the identity, so the float instances compile to exactly the code they
// had before these helpers existed.

// An IEEE binary16 value as its 16 bits (same size and layout as numpy.float16). NVRTC
// here has no CUDA headers, so no cuda_fp16.h __half: the conversions are our own.
struct half_bits {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float value) { return value; }

// binary16 -> float, exact (every binary16 value is a float). The magnitude bits
// shifted into place (<< 13) read as a float whose exponent is biased by 127 instead
// of 15; multiplying by 2^112 rebiases it exactly, for normal and subnormal values
// alike (a subnormal binary16 lands on a float denormal first; no flush to zero in our
// builds). Exponent field 31 (Inf, NaN) comes out of the product as exponent 143 with
// the mantissa in place; setting all exponent bits makes it the float Inf/NaN with the
// payload kept. The sign is copied last. No branches.
__device__ __forceinline__ float to_float(half_bits value) {
    const unsigned int magnitude = value.bits & 0x7fffu;
    const unsigned int sign = (unsigned int)(value.bits & 0x8000u) << 16;
    const float scaled = __uint_as_float(magnitude << 13) * 5.192296858534828e+33f;  // 2^112
    const unsigned int special = magnitude >= 0x7c00u ? 0x7f800000u : 0u;
    return __uint_as_float(__float_as_uint(scaled) | special | sign);
}

template <typename Storage>
__device__ __forceinline__ Storage from_float(float value);

template <>
__device__ __forceinline__ float from_float<float>(float value) {
    return value;
}

// float -> binary16, rounded to nearest, ties to even (as numpy's astype(float16) and
// CUDA's __float2half_rn). |x| >= 65520 (halfway above the largest binary16, 65504)
// becomes Inf; NaN stays NaN (quiet); |x| below 2^-14 becomes a subnormal, and |x| <=
// 2^-25 (at most half the smallest subnormal; the tie goes to even, 0) becomes ±0.
template <>
__device__ __forceinline__ half_bits from_float<half_bits>(float value) {
    const unsigned int bits = __float_as_uint(value);
    const unsigned int sign = (bits >> 16) & 0x8000u;
    const unsigned int magnitude = bits & 0x7fffffffu;
    unsigned int result;
    if (magnitude > 0x7f800000u) {
        result = 0x7e00u;  // NaN
    } else if (magnitude >= 0x477ff000u) {
        result = 0x7c00u;  // Inf, or rounds to it
    } else if (magnitude >= 0x38800000u) {
        // Normal: drop 13 mantissa bits, rounding to even (a carry may bump the
        // exponent, which is right), then rebias the exponent (127 -> 15).
        const unsigned int rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
        result = (rounded - 0x38000000u) >> 13;
    } else if (magnitude > 0x33000000u) {
        // Subnormal: value = significand·2^(exponent - 150), in units of 2^-24 that
        // is significand >> (126 - exponent), a shift of 14 to 24 bits.
        const unsigned int significand = (magnitude & 0x7fffffu) | 0x800000u;
        const unsigned int shift = 126u - (magnitude >> 23);
        const unsigned int kept = significand >> shift;
        const unsigned int rest = significand & ((1u << shift) - 1u);
        const unsigned int halfway = 1u << (shift - 1u);
        result = kept + ((rest > halfway || (rest == halfway && (kept & 1u))) ? 1u : 0u);
    } else {
        result = 0u;
    }
    half_bits out;
    out.bits = (unsigned short)(sign | result);
    return out;
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
