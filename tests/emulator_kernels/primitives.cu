// primitives.cu: small kernels that exercise each CUDA feature the emulator provides,
// for tests/test_emulator.py. Each kernel's result is known exactly, so the test can
// compare with what a GPU gives.
#include <cooperative_groups.h>

namespace cg = cooperative_groups;

constexpr unsigned full_mask = 0xffffffffu;

// Dynamic shared memory, portable between NVRTC and the emulator.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#ifdef RNNKERNELS_EMULATOR
    return static_cast<T*>(emulator_dynamic_shared_memory());
#else
    extern __shared__ __align__(16) unsigned char dynamic_shared_bytes[];
    return reinterpret_cast<T*>(dynamic_shared_bytes);
#endif
}

// Sum of each row: out[b] = sum(x[b, 0:n]). Tree reduction in static shared memory of
// a template kernel; `Threads` is a power of two.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    block_sum(const float* __restrict__ x,  // [gridDim.x, n]
              float* __restrict__ out,      // [gridDim.x]
              int n) {
    static_assert((Threads & (Threads - 1)) == 0, "Threads must be a power of two");
    __shared__ float partial[Threads];
    const int t = threadIdx.x;
    float acc = 0.0f;
    for (int i = t; i < n; i += Threads) acc += __ldg(&x[(long long)blockIdx.x * n + i]);
    partial[t] = acc;
    __syncthreads();
#pragma unroll
    for (int stride = Threads / 2; stride > 0; stride >>= 1) {
        if (t < stride) partial[t] += partial[t + stride];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

// Every shuffle kind on int values, one result per thread and kind.
__global__ void shuffles(const int* in,      // [blockDim.x]
                         int* idx_out,       // [blockDim.x]
                         int* up_out,        // [blockDim.x]
                         int* down_out,      // [blockDim.x]
                         int* xor_out,       // [blockDim.x]
                         int source, unsigned delta, int width) {
    const int t = threadIdx.x;
    const int v = in[t];
    idx_out[t] = __shfl_sync(full_mask, v, source, width);
    up_out[t] = __shfl_up_sync(full_mask, v, delta, width);
    down_out[t] = __shfl_down_sync(full_mask, v, delta, width);
    xor_out[t] = __shfl_xor_sync(full_mask, v, int(delta), width);
}

// Warp sums of doubles (8-byte shuffles) with shfl_down; lane 0 writes its warp's sum.
__global__ void warp_sum_double(const double* x, double* out) {
    double v = x[blockIdx.x * blockDim.x + threadIdx.x];
    for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(full_mask, v, offset);
    if ((threadIdx.x & 31) == 0) out[(blockIdx.x * blockDim.x + threadIdx.x) / 32] = v;
}

// Votes. The low and high half of each warp vote separately (masks 0x0000ffff and
// 0xffff0000), then the whole warp votes once more.
__global__ void votes(const int* predicate,   // [blockDim.x]
                      unsigned* ballot,       // [blockDim.x]
                      int* all,               // [blockDim.x]
                      int* any,               // [blockDim.x]
                      unsigned* half_ballot,  // [blockDim.x]
                      int* count) {           // [blockDim.x], __syncthreads_count
    const int t = threadIdx.x;
    const int p = predicate[t];
    ballot[t] = __ballot_sync(full_mask, p);
    all[t] = __all_sync(full_mask, p);
    any[t] = __any_sync(full_mask, p);
    const unsigned half = (t & 31) < 16 ? 0x0000ffffu : 0xffff0000u;
    half_ballot[t] = __ballot_sync(half, p);
    count[t] = __syncthreads_count(p);
}

// Atomics under contention from every thread of every block.
__global__ void atomics(const int* values,           // [n]
                        int n,
                        int* counter,                // [1]
                        unsigned long long* total,   // [1]
                        float* float_total,          // [1]
                        double* double_total,        // [1]
                        int* maximum,                // [1]
                        int* minimum,                // [1]
                        int* owner,                  // [slots], -1 initially
                        int* won,                    // [n]
                        int slots) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int v = values[i];
    atomicAdd(counter, 1);
    atomicAdd(total, (unsigned long long)v);
    atomicAdd(float_total, 0.25f);
    atomicAdd(double_total, double(v));
    atomicMax(maximum, v);
    atomicMin(minimum, v);
    // The first thread to reach owner[slot] claims it; everyone else sees the claim.
    won[i] = atomicCAS(&owner[i % slots], -1, i) == -1;
}

// Reverses each block's chunk of n floats through dynamic shared memory (n floats).
__global__ void reverse_chunks(const float* in, float* out, int n) {
    float* chunk = dynamic_shared<float>();
    const long long base = (long long)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) chunk[i] = in[base + i];
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[base + i] = chunk[n - 1 - i];
}

// Writes every built-in index of every thread: out[global_thread, 0:12] =
// threadIdx.xyz, blockIdx.xyz, blockDim.xyz, gridDim.xyz.
__global__ void indices(int* out) {
    const int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    int* row = out + 12 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
    const dim3 dims[4] = {dim3(threadIdx), dim3(blockIdx), blockDim, gridDim};
    for (int k = 0; k < 4; ++k) {
        row[3 * k + 0] = dims[k].x;
        row[3 * k + 1] = dims[k].y;
        row[3 * k + 2] = dims[k].z;
    }
}

// Persistent kernel: `steps` rounds of a 3-point average over the whole array, with a
// grid-wide barrier between rounds (every block reads its neighbours' previous values).
// Ends with the result in a if steps is even, b if odd.
__global__ void grid_smooth(float* a, float* b, int n, int steps) {
    cg::grid_group grid = cg::this_grid();
    for (int s = 0; s < steps; ++s) {
        const float* src = (s % 2 == 0) ? a : b;
        float* dst = (s % 2 == 0) ? b : a;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
            const float left = src[i > 0 ? i - 1 : i];
            const float right = src[i < n - 1 ? i + 1 : i];
            dst[i] = (left + src[i] + right) / 3.0f;
        }
        grid.sync();
    }
}

// Two phases: per-block sums, grid sync, then every thread normalises by the total.
// After the grid sync each block sums its static shared block_total again into kept:
// shared memory must survive the sync (the emulator swaps blocks at that point).
__global__ void grid_normalise(const float* x,   // [n]
                               float* partial,   // [gridDim.x]
                               float* kept,      // [gridDim.x]
                               float* out,       // [n]
                               int n) {
    __shared__ float block_total[32];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(full_mask, v, offset);
    if ((threadIdx.x & 31) == 0) block_total[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int w = 0; w < (int)(blockDim.x / 32); ++w) sum += block_total[w];
        partial[blockIdx.x] = sum;
    }
    cg::this_grid().sync();
    float total = 0.0f;
    for (int b = 0; b < (int)gridDim.x; ++b) total += partial[b];
    if (i < n) out[i] = x[i] / total;
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int w = 0; w < (int)(blockDim.x / 32); ++w) sum += block_total[w];
        kept[blockIdx.x] = sum;
    }
}

// Records the order in which threads pass an atomic: differs between seeds.
__global__ void arrival_order(int* counter, int* order) {
    order[atomicAdd(counter, 1)] = threadIdx.x;
}

// Takes one argument of each scalar kind; writes them back so the test sees them.
__global__ void scalar_kinds(double* out, int i32, unsigned u32, long long i64,
                             unsigned long long u64, float f32, double f64, bool flag,
                             const float* maybe_null) {
    out[0] = i32;
    out[1] = u32;
    out[2] = double(i64);
    out[3] = double(u64);
    out[4] = f32;
    out[5] = f64;
    out[6] = flag ? 1.0 : 0.0;
    out[7] = maybe_null == nullptr ? -1.0 : maybe_null[0];
}

// Math intrinsics and helpers the shim provides, one output each.
__global__ void intrinsics(const float* x, float* out) {
    const float v = x[0];
    const float w = x[1];
    float2 pair = make_float2(v, w);
    float4 quad = make_float4(v, w, v, w);
    out[0] = __expf(v);
    out[1] = __fdividef(v, w);
    out[2] = rsqrtf(w);
    out[3] = __int_as_float(__float_as_int(v));
    out[4] = __fmaf_rn(v, w, 1.0f);
    out[5] = min(v, w) + max(3, 4);
    out[6] = pair.x + pair.y + quad.z + quad.w;
    out[7] = tanhf(v) + fmaxf(v, w) + expf(w);
    out[8] = float(__popc(0xF0F0u) + __clz(1) + __ffs(8));
    out[9] = float(warpSize);
    __threadfence();
    __syncwarp();
}

// Cooperative-groups tiles of 8 threads: the tile sum (shfl_down), the lane of the
// tile's maximum (ballot), and the block-wide thread rank.
__global__ void tile_sums(const int* x, int* sum, unsigned* ballot, int* rank) {
    cg::thread_block block = cg::this_thread_block();
    cg::thread_block_tile<8> tile = cg::tiled_partition<8>(block);
    const int v = x[block.thread_rank()];
    int s = v;
    for (int offset = tile.size() / 2; offset > 0; offset /= 2) s += tile.shfl_down(s, offset);
    s = tile.shfl(s, 0);
    int m = v;
    for (int offset = 1; offset < 8; offset *= 2) m = max(m, tile.shfl_xor(m, offset));
    tile.sync();
    sum[block.thread_rank()] = s;
    ballot[block.thread_rank()] = tile.ballot(v == m);
    rank[block.thread_rank()] = tile.meta_group_rank() * 100 + tile.thread_rank();
    block.sync();
}

// A spin lock around a read-modify-write. The fences inside the critical section let
// other threads run (and spin) while the lock is held; the count is exact only if the
// lock works and spinning threads let the holder continue. The counter is read through
// L2 after an acquire fence: another block wrote it, and a plain load may hit a stale
// L1 line (the stale memory model of cooperative launches shows that).
__global__ void spin_lock_counter(int* lock, int* counter) {
    while (atomicCAS(lock, 0, 1) != 0) {
    }
    __threadfence();
    const int value = __ldcg(counter);
    __threadfence();
    *counter = value + 1;
    __threadfence();
    atomicExch(lock, 0);
}

// Threads 48..63 exit before the barrier; the others still meet at it (exited threads
// no longer count, as on Volta and later GPUs).
__global__ void early_exit_barrier(int* out) {
    __shared__ int seen[64];
    if (threadIdx.x >= 48) return;
    seen[threadIdx.x] = threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = seen[47 - threadIdx.x];
}
