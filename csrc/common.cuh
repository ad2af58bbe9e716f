// common.cuh: device helpers shared by every rnnkernels kernel.
//
// What it holds: numerically safe activations (sigmoid, tanh) and a 64-bit index
// helper. Nothing here includes a CUDA or system header: NVRTC compiles our sources
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

}  // namespace rnnkernels
