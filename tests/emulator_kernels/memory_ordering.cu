// memory_ordering.cu: blocks of one cooperative launch exchange data through global
// memory every step, for tests/test_emulator_memory.py (the emulator's stale memory
// model) and tests/test_ptx_check.py (the PTX ordering checker). One correct version of
// the persistent kernels' contract and planted bugs that a sequentially consistent
// emulator cannot see.
//
// The computation (uint32 arithmetic, wrapping: exact, so any stale value shows), for
// t = 1 .. steps, with n = gridDim.x * slice:
//     history[t][i] = 3 * history[t-1][(i + 1) % n] + history[t-1][(5 i + 2) % n] + t
// Block b owns i in [b * slice, (b + 1) * slice): it writes those entries of every step,
// and reads entries of every block from the step before.
//
// Layouts:
//   history  [steps + 1, n]  uint32; history[0] set by the host, the rest zero
//   ready    [gridDim.x]     uint32, zero on entry; ready[b] = last step block b published
// Launch: cooperative, gridDim.x <= blockDim.x (thread p waits for producer p).
//
// The contract (the persistent LSTM kernels follow it):
//   producer: plain stores of its slice; __syncthreads(); thread 0: __threadfence()
//             (release), then atomicExch(&ready[b], t);
//   consumer: thread p polls ready[p] with an atomic until it reaches t - 1, then
//             __threadfence() (acquire); __syncthreads(); every thread reads the data
//             with __ldcg (ld.global.cg: L2, not the SM's L1, which is not coherent).
#ifdef RNNKERNELS_EMULATOR  // NVRTC finds cooperative_groups.h only with the CUDA headers
#include <cooperative_groups.h>
#endif

enum class Ordering {
    correct,          // the contract above
    acquire_release,  // the same with ld.acquire.gpu / st.release.gpu (inline PTX on a GPU)
    no_release,       // bug 1: no __threadfence() before the flag store
    plain_load,       // bug 2: the data read with plain loads (may hit a stale L1 line)
    no_wait,          // bug 3: the consumer does not wait for the flags
    no_acquire,       // bug 4: the flag polled with a relaxed atomic, no fence after it
    sleepy_poll,      // the flag polled with __ldcg and __nanosleep, then a fence
                      // (emulator only: the PTX check wants a strong load of a flag)
};

__device__ __forceinline__ unsigned next_value(const unsigned* previous, unsigned i, unsigned n,
                                               unsigned step, bool through_l2) {
    const unsigned* left = previous + (i + 1u) % n;
    const unsigned* right = previous + (5u * i + 2u) % n;
    const unsigned a = through_l2 ? __ldcg(left) : *left;
    const unsigned b = through_l2 ? __ldcg(right) : *right;
    return 3u * a + b + step;
}

// ld.acquire.gpu and st.release.gpu, as cuda::atomic_ref's load(acquire) and
// store(release) compile; on the emulator the built-ins they stand for.
__device__ __forceinline__ unsigned load_acquire(unsigned* flag) {
#ifdef RNNKERNELS_EMULATOR
    const unsigned value = atomicAdd(flag, 0u);
    __threadfence();
    return value;
#else
    unsigned value;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(flag) : "memory");
    return value;
#endif
}

__device__ __forceinline__ void store_release(unsigned* flag, unsigned value) {
#ifdef RNNKERNELS_EMULATOR
    __threadfence();
    atomicExch(flag, value);
#else
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(flag), "r"(value) : "memory");
#endif
}

template <Ordering Order>
__global__ void exchange_with_flags(unsigned* history,  // [steps + 1, n]
                                    unsigned* ready,    // [gridDim.x]
                                    int steps,
                                    int slice) {        // entries per block
    const unsigned n = gridDim.x * unsigned(slice);
    for (int step = 1; step <= steps; ++step) {
        const unsigned* previous = history + (size_t)(step - 1) * n;
        unsigned* current = history + (size_t)step * n;
        // Wait until every producer has published step - 1 (step 0 is the host's).
        if (Order == Ordering::acquire_release && step > 1 && threadIdx.x < gridDim.x) {
            while (load_acquire(&ready[threadIdx.x]) < unsigned(step - 1)) {
            }
        } else if (Order == Ordering::sleepy_poll && step > 1 && threadIdx.x < gridDim.x) {
            while (__ldcg(&ready[threadIdx.x]) < unsigned(step - 1)) {
                __nanosleep(64);
            }
            __threadfence();
        } else if (Order != Ordering::no_wait && step > 1 && threadIdx.x < gridDim.x) {
            while (atomicAdd(&ready[threadIdx.x], 0u) < unsigned(step - 1)) {
            }
            if (Order != Ordering::no_acquire) __threadfence();
        }
        __syncthreads();
        for (int k = threadIdx.x; k < slice; k += blockDim.x) {
            const unsigned i = blockIdx.x * unsigned(slice) + unsigned(k);
            current[i] = next_value(previous, i, n, unsigned(step), Order != Ordering::plain_load);
        }
        __syncthreads();  // the whole slice is written before thread 0 publishes it
        if (threadIdx.x == 0 && Order == Ordering::acquire_release) {
            store_release(&ready[blockIdx.x], unsigned(step));
        } else if (threadIdx.x == 0) {
            if (Order != Ordering::no_release) __threadfence();
            atomicExch(&ready[blockIdx.x], unsigned(step));
        }
    }
}

#ifdef RNNKERNELS_EMULATOR
// The same exchange with a grid sync between steps: plain loads after it are correct
// (it makes every block's writes visible to every block).
__global__ void exchange_with_grid_sync(unsigned* history,  // [steps + 1, n]
                                        int steps,
                                        int slice) {
    const unsigned n = gridDim.x * unsigned(slice);
    cooperative_groups::grid_group grid = cooperative_groups::this_grid();
    for (int step = 1; step <= steps; ++step) {
        const unsigned* previous = history + (size_t)(step - 1) * n;
        unsigned* current = history + (size_t)step * n;
        for (int k = threadIdx.x; k < slice; k += blockDim.x) {
            const unsigned i = blockIdx.x * unsigned(slice) + unsigned(k);
            current[i] = next_value(previous, i, n, unsigned(step), false);
        }
        grid.sync();
    }
}
#endif

// A lock-protected counter: thread 0 of each block adds 1, `rounds` times. The
// counter is read through L2 after taking the lock (PlainRead = false), or with a plain
// load (true: may return what this SM's L1 holds, a count from before).
template <bool PlainRead>
__global__ void locked_counter(unsigned* lock,     // [1], zero on entry
                               unsigned* counter,  // [1]
                               int rounds) {
    if (threadIdx.x != 0) return;
    for (int r = 0; r < rounds; ++r) {
        while (atomicCAS(lock, 0u, 1u) != 0u) {
        }
        __threadfence();
        const unsigned value = PlainRead ? *counter : __ldcg(counter);
        *counter = value + 1u;
        __threadfence();
        atomicExch(lock, 0u);
    }
}
