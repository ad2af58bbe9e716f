// ftz_conversions.cu: float16 <-> float conversions under flush-to-zero, for
// tests/test_ftz.py. CuPy compiles every kernel with -ftz=true, and the emulator flushes
// float32 denormals the same way by default (MXCSR FTZ|DAZ during a launch).
//
// planted_half_to_float keeps, on purpose, the binary16 -> float conversion csrc/common.cuh
// had before it used cuda_fp16.h: the magnitude bits shifted into a float, then scaled by
// 2^112. For a subnormal binary16 the shifted bits are a float DENORMAL, which -ftz=true
// flushes before the multiply, so all 2046 subnormal patterns come out as ±0. The test
// shows the emulator reproduces that failure (and that it is exact with denormals kept),
// while the conversions csrc/ uses now (rnnkernels::to_float / from_float, common.cuh)
// are exact on all 65536 patterns in both modes.
#include "common.cuh"

// The old code, verbatim but for the argument type (the 16 bits of a binary16).
__device__ __forceinline__ float planted_old_to_float(unsigned short bits) {
    const unsigned int magnitude = bits & 0x7fffu;
    const unsigned int sign = (unsigned int)(bits & 0x8000u) << 16;
    const float scaled = __uint_as_float(magnitude << 13) * 5.192296858534828e+33f;  // 2^112
    const unsigned int special = magnitude >= 0x7c00u ? 0x7f800000u : 0u;
    return __uint_as_float(__float_as_uint(scaled) | special | sign);
}

__global__ void planted_half_to_float(const unsigned short* bits,  // [n] binary16 patterns
                                      float* out,                  // [n]
                                      int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = planted_old_to_float(bits[i]);
}

// What csrc/ uses: to_float(__half) and from_float<__half>, the latter applied to the
// float values read back (a round trip, which must give every non-NaN pattern back) and
// to arbitrary floats (compared with numpy's astype(float16)).
__global__ void storage_conversions(const __half* values,  // [n] binary16 patterns
                                    float* widened,        // [n] to_float(values)
                                    __half* round_trip,    // [n] from_float(to_float(values))
                                    const float* x,        // [n] floats to narrow
                                    __half* narrowed,      // [n] from_float(x)
                                    int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float value = rnnkernels::to_float(values[i]);
    widened[i] = value;
    round_trip[i] = rnnkernels::from_float<__half>(value);
    narrowed[i] = rnnkernels::from_float<__half>(x[i]);
}

// The emulator's denormal mode itself: a float32 product whose exact result is a denormal
// (2^-100 * 2^-30 = 2^-130), and a denormal input times one. Flushed, both are 0.
__global__ void denormal_arithmetic(const float* a,  // [2] 2^-100, 2^-130 (a denormal)
                                    const float* b,  // [2] 2^-30, 1
                                    float* product,  // [2] a * b
                                    int n) {
    const int i = threadIdx.x;
    if (i < n) product[i] = a[i] * b[i];
}
