// 02_persistent_forward.cu: experiment 02, a persistent, weight-stationary LSTM
// forward (inference only), float32 storage and FP32 math. Driven by
// 02_persistent_forward.py; not part of the product (csrc/ keeps the per-step kernel).
//
// Computes the recurrence of csrc/lstm_forward.cu (gate order i, f, g, o, as in
// torch.nn.LSTM), for t = 0 .. T-1:
//     z_t = gx_t + h_{t-1}·W_hhᵀ                                   [B, 4H]
//     i = σ(z^i)  f = σ(z^f)  g = tanh(z^g)  o = σ(z^o)
//     c_t = f·c_{t-1} + i·g      h_t = o·tanh(c_t)
// with gx = x·W_ihᵀ + b computed beforehand (one float32 matmul; cuBLAS in the product), in
// ONE cooperative launch instead of T launches:
//   * block b owns units [b·unit_tile, (b+1)·unit_tile): at start it copies the four
//     gate rows of each of its units of W_hh into shared memory, where they stay for
//     all T steps (weight-stationary: W_hh is read from global memory once, not T times);
//   * per step, it stages h_{t-1} (written by every block at step t-1) in chunks of
//     ChunkRows batch rows into shared memory, computes its units' four gates, applies
//     the cell update in registers and writes h_t; c_t never leaves the block (each
//     (row, unit) cell is updated by the same block at every step, in c_state);
//   * then all blocks meet at a grid barrier before step t+1 reads h_t.
//
// Work split inside a block: a warp takes one (unit, group of RowsPerWarp rows) item at
// a time; its 32 lanes split the reduction over k (lane reads float4 k-quads lane,
// lane+32, ...), each lane accumulating 4 gates x RowsPerWarp partial sums, which a
// fixed xor-shuffle tree then adds. Summation order is fixed: bitwise deterministic.
//
// Layouts (row-major, float32):
//   gx       [T, B, 4H]     x·W_ihᵀ + b, gate order i,f,g,o
//   w_hh     [4H, H]        gate order i,f,g,o
//   h_all    [T+1, B, H]    h_all[0] = h0 (set by the host), h_all[t+1] = h_t
//   c_state  [B, H]         in: c0, out: c_n
//   barrier  [1] unsigned   zero before the launch (the host clears it)
// Shared memory (dynamic, floats), with H4 = H rounded up to a multiple of 4 (the pad
// is zero so float4 loads need no tail case):
//   w_slice  [4·unit_tile][H4]   row g·unit_tile + u = W_hh[g·H + unit0 + u, :]
//   h_chunk  [ChunkRows][H4]     rows row0 .. row0 + ChunkRows - 1 of h_{t-1}
//   bytes = 4·(4·unit_tile + ChunkRows)·H4.
// Lanes read consecutive float4s of one row of each: conflict-free.
//
// Saved for backward: nothing (inference only; a training version would also write
// the activated gates and c_all, as lstm_forward_step<.., true> does).
//
// Launch constraints (checked by the .py before launching):
//   * grid = (ceil(H / unit_tile), 1, 1), block = (32·Warps, 1, 1), dynamic shared
//     memory as above; COOPERATIVE launch (cuLaunchCooperativeKernel): every block
//     must be resident at once (blocks <= SMs x occupancy), or the barrier deadlocks;
//     the cooperative launch refuses such a grid rather than hanging.
//   * the whole W_hh must fit in the grid's shared memory: 16·H² bytes. With one block
//     per SM, unit_tile = ceil(H / SMs) and H fits while
//     4·(4·ceil(H/SMs) + ChunkRows)·H4 <= max dynamic shared memory per block.
//     H100 SXM (132 SMs, 227 KiB = 232448 B opt-in): H <= 1208 at ChunkRows = 8
//     (unit_tile 10: 4·48·1208 = 231936 B), H <= 1320 at ChunkRows 1 or 4, H <= 924 at
//     ChunkRows = 32. A100 (108 SMs, 163 KiB): H <= 948 at ChunkRows = 8. Beyond that:
//     16-bit weights, or several blocks per unit tile splitting k (a cross-block
//     reduction per step). largest_hidden() in the .py computes it for a device.
//   * B >= 1, H >= 1, T >= 1; B·H and T·B·4H offsets are 64-bit.
//
// Grid barrier: our own (NVRTC here has no CUDA headers, so no cooperative_groups.h),
// one unsigned word. Each block's thread 0 adds 1, except block 0, which adds
// 2^31 - (blocks - 1); after all blocks arrive the word has gained exactly 2^31, so
// its top bit has flipped and its low bits are back where they were: no reset needed,
// and the next barrier works the same way. A waiter polls with atomicAdd(word, 0) (an
// atomic, so the CPU emulator schedules other threads while it spins). Ordering: the
// block's __syncthreads, then thread 0's __threadfence (release of every thread's h_t
// writes) before arriving; after the flip, __threadfence (acquire) and __syncthreads.
// h_{t-1} is read with __ldcg (L2, not L1): it was written by other SMs in this launch.
#include "common.cuh"

namespace rnnkernels {

template <typename T>
__device__ __forceinline__ T* persistent_dynamic_shared() {
#ifdef RNNKERNELS_EMULATOR
    return static_cast<T*>(emulator_dynamic_shared_memory());
#else
    extern __shared__ __align__(16) unsigned char persistent_shared_bytes[];
    return reinterpret_cast<T*>(persistent_shared_bytes);
#endif
}

// Every thread of every block calls it; returns when all blocks have arrived.
__device__ __forceinline__ void grid_barrier(unsigned* word) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned increment = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1u) : 1u;
        __threadfence();
        const unsigned before = atomicAdd(word, increment);
        while (((before ^ atomicAdd(word, 0u)) & 0x80000000u) == 0u) {
        }
        __threadfence();
    }
    __syncthreads();
}

template <int Warps, int RowsPerWarp, int RowGroups>
__global__ void __launch_bounds__(32 * Warps, 1)
lstm_forward_persistent(const float* __restrict__ gx,    // [T, B, 4H] x·W_ihᵀ + b, gate order i,f,g,o
                        const float* __restrict__ w_hh,  // [4H, H], gate order i,f,g,o
                        float* h_all,                    // [T+1, B, H]; h_all[0] = h0 on entry
                        float* c_state,                  // [B, H]; c0 on entry, c_n on exit
                        unsigned* barrier,               // [1], zero on entry
                        int steps,                       // T
                        int batch,                       // B
                        int hidden,                      // H
                        int unit_tile) {                 // units per block
    constexpr int Threads = 32 * Warps;
    constexpr int ChunkRows = RowsPerWarp * RowGroups;
    static_assert(RowsPerWarp >= 1 && RowsPerWarp <= 32, "lane r updates row r of its group");
    static_assert(lstm_gates * RowsPerWarp <= 64, "accumulators must stay in registers");

    const int hidden4 = (hidden + 3) / 4;      // float4s per shared row
    const int padded = 4 * hidden4;            // H4
    const int gate_rows = lstm_gates * unit_tile;
    float* w_slice = persistent_dynamic_shared<float>();  // [4·unit_tile][H4]
    float* h_chunk = w_slice + (index_t)gate_rows * padded;  // [ChunkRows][H4]
    const float4* w_slice4 = reinterpret_cast<const float4*>(w_slice);
    const float4* h_chunk4 = reinterpret_cast<const float4*>(h_chunk);

    const int thread = threadIdx.x;
    const int lane = thread % 32;
    const int warp = thread / 32;
    const int unit0 = blockIdx.x * unit_tile;
    const index_t state_size = (index_t)batch * hidden;

    // Load this block's W_hh slice once (consecutive threads, consecutive k: coalesced).
    for (index_t e = thread; e < (index_t)gate_rows * padded; e += Threads) {
        const int k = (int)(e % padded), gate_row = (int)(e / padded);
        const int gate = gate_row / unit_tile, unit = unit0 + gate_row % unit_tile;
        w_slice[e] = (unit < hidden && k < hidden) ? w_hh[((index_t)gate * hidden + unit) * hidden + k] : 0.0f;
    }

    for (int step = 0; step < steps; ++step) {
        const float* h_prev = h_all + (index_t)step * state_size;
        float* h_next = h_all + (index_t)(step + 1) * state_size;
        const float* gx_step = gx + (index_t)step * batch * (lstm_gates * hidden);

        for (int row0 = 0; row0 < batch; row0 += ChunkRows) {
            // The previous chunk's readers are done before its rows are overwritten
            // (and, at row0 = 0, the W_hh slice is complete).
            __syncthreads();
            for (index_t e = thread; e < (index_t)ChunkRows * padded; e += Threads) {
                const int k = (int)(e % padded), r = (int)(e / padded);
                const int row = row0 + r;
                h_chunk[e] = (row < batch && k < hidden) ? __ldcg(h_prev + (index_t)row * hidden + k) : 0.0f;
            }
            __syncthreads();

            const int groups = min(RowGroups, (batch - row0 + RowsPerWarp - 1) / RowsPerWarp);
            for (int item = warp; item < unit_tile * groups; item += Warps) {
                const int u = item % unit_tile, group = item / unit_tile;
                const int unit = unit0 + u;
                if (unit >= hidden) continue;  // whole warp: item is warp-uniform

                float acc[lstm_gates][RowsPerWarp];
#pragma unroll
                for (int g = 0; g < lstm_gates; ++g)
#pragma unroll
                    for (int r = 0; r < RowsPerWarp; ++r) acc[g][r] = 0.0f;

                for (int k4 = lane; k4 < hidden4; k4 += 32) {
                    float4 w[lstm_gates];
#pragma unroll
                    for (int g = 0; g < lstm_gates; ++g) w[g] = w_slice4[(index_t)(g * unit_tile + u) * hidden4 + k4];
#pragma unroll
                    for (int r = 0; r < RowsPerWarp; ++r) {
                        const float4 h = h_chunk4[(index_t)(group * RowsPerWarp + r) * hidden4 + k4];
#pragma unroll
                        for (int g = 0; g < lstm_gates; ++g) {
                            acc[g][r] = fmaf(w[g].x, h.x, acc[g][r]);
                            acc[g][r] = fmaf(w[g].y, h.y, acc[g][r]);
                            acc[g][r] = fmaf(w[g].z, h.z, acc[g][r]);
                            acc[g][r] = fmaf(w[g].w, h.w, acc[g][r]);
                        }
                    }
                }
                // Butterfly: afterwards every lane holds the full sums (a + b == b + a,
                // so all lanes agree bitwise).
#pragma unroll
                for (int offset = 16; offset > 0; offset /= 2)
#pragma unroll
                    for (int g = 0; g < lstm_gates; ++g)
#pragma unroll
                        for (int r = 0; r < RowsPerWarp; ++r)
                            acc[g][r] += __shfl_xor_sync(0xffffffffu, acc[g][r], offset);

                // Lane r updates row r of the group (compile-time r: acc stays in registers).
#pragma unroll
                for (int r = 0; r < RowsPerWarp; ++r) {
                    const int row = row0 + group * RowsPerWarp + r;
                    if (lane != r || row >= batch) continue;
                    const float* gx_row = gx_step + (index_t)row * (lstm_gates * hidden);
                    const float input_gate = sigmoid(acc[0][r] + gx_row[unit]);
                    const float forget_gate = sigmoid(acc[1][r] + gx_row[hidden + unit]);
                    const float cell_gate = tanh_activation(acc[2][r] + gx_row[2 * hidden + unit]);
                    const float output_gate = sigmoid(acc[3][r] + gx_row[3 * hidden + unit]);
                    const index_t cell = (index_t)row * hidden + unit;
                    const float c = forget_gate * c_state[cell] + input_gate * cell_gate;
                    c_state[cell] = c;
                    h_next[cell] = output_gate * tanh_activation(c);
                }
            }
        }
        // h_t complete everywhere before any block stages it (none needed after the last step).
        if (step + 1 < steps) grid_barrier(barrier);
    }
}

}  // namespace rnnkernels

// Notes for the launcher (02_persistent_forward.py): instances are
// lstm_forward_persistent<Warps, RowsPerWarp, RowGroups>, picked from a small table by
// batch; unit_tile = ceil(H / SMs) (one block per SM: the W_hh slice dominates shared
// memory); set the kernel's max dynamic shared memory attribute above 48 KiB, clear
// the barrier word, and launch with cuLaunchCooperativeKernel.
