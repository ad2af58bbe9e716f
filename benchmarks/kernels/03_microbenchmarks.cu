// 03_microbenchmarks.cu: experiment 03, the measurements that feed the cost model
// (rnnkernels/cost_model.py) and the FTZ probe. Driven by 03_microbenchmarks.py, run
// by benchmarks/gpu_session.py; every kernel also runs on the CPU emulator (CI), where
// the timings mean nothing but the launches, the results and the checks are the same.
//
// Kernels (each writes something the host checks, so nothing is optimised away):
//   pointer_chase     one thread follows next[i] `hops` times with L2-only loads
//                     (__ldcg): hops dependent L2 round trips, the cost model's
//                     l2_latency_ns = kernel time / hops (and clock64 cycles / hops).
//                       next   [n] unsigned  a single cycle through the buffer; the
//                                            host spaces entries a cache line apart
//                       out    [2] long long out[0] = index after the hops (checked
//                                            against the host's walk), out[1] = cycles
//   flag_barrier      the persistent variant's per-step handshake: every block
//                     publishes "step s done" in its own flag (release) and waits
//                     until every producer's flag reaches s (acquire), `steps`
//                     times; kernel time / steps = one grid-wide flags round trip
//                     (cost model: grid_sync_ns). Needs all blocks resident: launch
//                     cooperatively, at most one block per SM.
//                       flags  [blocks] unsigned  zero before the launch
//                       out    [blocks] unsigned  out[b] = last step block b saw
//                                                 completed by everyone (= steps)
//   grid_sync_loop    the same with cooperative_groups::this_grid().sync() (only when
//                     RNNKERNELS_COOPERATIVE_GROUPS is defined: it lives in a module of
//                     its own, so that the others still build if this one does not).
//                       out    [blocks] unsigned  out[b] = steps
//   empty_kernel      nothing: the launch gap from Python and inside a CUDA graph.
//   stream_read       every thread sums float4s grid-stride over `data`, `repeats`
//                     times, with L2-only loads: bytes / time = L2 bandwidth when the
//                     buffer fits L2, HBM bandwidth when it is many times larger.
//                       data   [n4] float4
//                       out    [gridDim.x · blockDim.x] float  per-thread sums
//   ftz_probe         float16 <-> float conversions through OUR helpers (common.cuh
//                     to_float / from_float<__half>, what the kernels use) and float32
//                     arithmetic on denormals, compiled with the options CuPy uses for
//                     our kernels (-ftz=true among them): records what the GPU does.
//                     Expected: exact conversions (cvt is not flushed), flushed float32
//                     denormal arithmetic; the emulator flushes the same way by default.
//                       half_in     [n] __half     bit patterns, subnormals included
//                       half_wide   [n] float      to_float(half_in[i])
//                       float_in    [n] float      inputs, denormals included
//                       half_narrow [n] __half     from_float<__half>(float_in[i])
//                       float_out   [4n] float     x·2, x+x, fmaf(x, 1, 0), x·0.5 of
//                                                  float_in[i] at [4i .. 4i+3]
#include "common.cuh"

#ifdef RNNKERNELS_COOPERATIVE_GROUPS
#include <cooperative_groups.h>
#endif

namespace rnnkernels {

__global__ void pointer_chase(const unsigned* __restrict__ next,  // [n] a single cycle
                              int hops,                         // dependent loads
                              long long* out) {                 // [2] index, cycles
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    unsigned index = 0;
    const long long start = clock64();
    for (int hop = 0; hop < hops; ++hop) index = __ldcg(next + index);
    const long long stop = clock64();
    out[0] = index;
    out[1] = stop - start;
}

// Loads and stores of the flags: release/acquire at GPU scope on the GPU; the
// emulator's atomics are its scheduling points (a plain spin would never yield).
__device__ __forceinline__ unsigned load_acquire(const unsigned* flag) {
#ifdef RNNKERNELS_EMULATOR
    return atomicAdd(const_cast<unsigned*>(flag), 0u);
#else
    unsigned value;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(flag) : "memory");
    return value;
#endif
}

__device__ __forceinline__ void store_release(unsigned* flag, unsigned value) {
#ifdef RNNKERNELS_EMULATOR
    atomicExch(flag, value);
#else
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(flag), "r"(value) : "memory");
#endif
}

__global__ void flag_barrier(unsigned* flags,  // [blocks] zero before the launch
                             int steps,        // handshakes
                             unsigned* out) {  // [blocks] steps everyone completed
    const unsigned blocks = gridDim.x;
    for (unsigned step = 1; step <= (unsigned)steps; ++step) {
        // The block's work of this step is done (here: none) before it publishes.
        __syncthreads();
        if (threadIdx.x == 0) store_release(flags + blockIdx.x, step);
        // One thread per producer waits for it: the round trip the persistent
        // variant pays once per step.
        for (unsigned producer = threadIdx.x; producer < blocks; producer += blockDim.x)
            while (load_acquire(flags + producer) < step) {
            }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        unsigned seen = 0xffffffffu;
        for (unsigned producer = 0; producer < blocks; ++producer) seen = min(seen, load_acquire(flags + producer));
        out[blockIdx.x] = seen;
    }
}

#ifdef RNNKERNELS_COOPERATIVE_GROUPS
__global__ void grid_sync_loop(int steps,        // grid.sync() calls
                               unsigned* out) {  // [blocks] = steps
    cooperative_groups::grid_group grid = cooperative_groups::this_grid();
    int done = 0;
    for (int step = 0; step < steps; ++step) {
        grid.sync();
        ++done;
    }
    if (threadIdx.x == 0) out[blockIdx.x] = done;
}
#endif

__global__ void empty_kernel() {}

__global__ void stream_read(const float4* __restrict__ data,  // [n4]
                            long long n4,                     // float4s in data
                            int repeats,                      // passes over data
                            float* out) {                     // [grid · block] sums
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    float sum = 0.0f;
    for (int pass = 0; pass < repeats; ++pass)
        for (long long i = thread; i < n4; i += stride) {
            const float4 v = __ldcg(data + i);
            sum += (v.x + v.y) + (v.z + v.w);
        }
    out[thread] = sum;
}

__global__ void ftz_probe(const __half* __restrict__ half_in,   // [n]
                          float* half_wide,                      // [n]
                          const float* __restrict__ float_in,    // [n]
                          __half* half_narrow,                   // [n]
                          float* float_out,                      // [4n]
                          int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    half_wide[i] = to_float(half_in[i]);
    const float x = float_in[i];
    half_narrow[i] = from_float<__half>(x);
    float_out[4 * i + 0] = x * 2.0f;
    float_out[4 * i + 1] = x + x;
    float_out[4 * i + 2] = fmaf(x, 1.0f, 0.0f);
    float_out[4 * i + 3] = x * 0.5f;
}

}  // namespace rnnkernels
