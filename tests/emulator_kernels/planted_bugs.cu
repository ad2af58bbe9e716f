// planted_bugs.cu: kernels with the bugs a GPU usually hides, for
// tests/test_emulator.py to show that the emulator catches each one.

// Tree sum of 256 values in shared memory. WithBarrier = false leaves out the barrier
// between the writes and the first reads: thread t may read partial[t + 128] before
// thread t + 128 wrote it. On a GPU warps often run in an order that hides this.
template <bool WithBarrier>
__global__ void tree_sum(const float* x, float* out) {
    __shared__ float partial[256];
    const int t = threadIdx.x;
    partial[t] = x[blockIdx.x * 256 + t];
    if (WithBarrier) __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (t < stride) partial[t] += partial[t + stride];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

// Off by one: the stencil reads tile[t + 1] for every thread, but only blockDim.x
// values are staged, so the last thread reads a value nobody wrote.
__global__ void stencil_unwritten(const float* x, float* out) {
    __shared__ float tile[129];
    const int t = threadIdx.x;
    tile[t] = x[t];
    __syncthreads();
    out[t] = 0.5f * (tile[t] + tile[t + 1]);
}

// The same bug with dynamic shared memory (blockDim.x + 1 floats requested).
__global__ void stencil_unwritten_dynamic(const float* x, float* out) {
#ifdef RNNKERNELS_EMULATOR
    float* tile = static_cast<float*>(emulator_dynamic_shared_memory());
#else
    extern __shared__ float tile[];
#endif
    const int t = threadIdx.x;
    tile[t] = x[t];
    __syncthreads();
    out[t] = 0.5f * (tile[t] + tile[t + 1]);
}

// Reads shared variables that no thread ever writes (a plain one and one in a template
// kernel): the compiler must not fold them to 0, the poison must show.
__global__ void read_never_written(float* out) {
    __shared__ float never_written;
    out[threadIdx.x] = never_written;
}
template <int N>
__global__ void read_never_written_template(float* out) {
    __shared__ float never_written[N];
    out[threadIdx.x] = never_written[N - 1];
}

// Writes out[threadIdx.x + shift]: with shift = 1 the last thread writes one element
// past the end of the array.
__global__ void write_shifted(float* out, int shift) { out[threadIdx.x + shift] = 1.0f; }

// Deadlock: the low half-warp waits at a barrier, the high half at a shuffle whose
// mask names the low half.
__global__ void barrier_against_shuffle(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    out[threadIdx.x] = v;
}

// Threads of one block at two different __syncthreads() calls.
__global__ void divergent_barriers(int* out) {
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// Lane 5 exits, then the warp shuffles with a full mask.
__global__ void shuffle_after_exit(int* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, int(threadIdx.x), 0);
}

// A spin-wait on a flag that no thread ever sets.
__global__ void spin_forever(int* flag) {
    while (atomicAdd(flag, 0) == 0) {
    }
}

// Grid sync in a launch that is not cooperative.
#include <cooperative_groups.h>
__global__ void grid_sync_without_cooperation(int* out) {
    cooperative_groups::this_grid().sync();
    out[0] = 1;
}

__global__ void calls_trap(int* out) {
    if (threadIdx.x == 3) __trap();
    out[threadIdx.x] = 1;
}
