// runtime.h: the interface between the CUDA shim (cuda_emulator.h, compiled into the
// kernel translation unit) and the fiber scheduler (runtime.cpp).
//
// Every CUDA thread of a block is a fiber with its own stack. The scheduler runs one
// fiber at a time on the calling OS thread and switches only where CUDA threads
// synchronise or may observe each other: barriers, warp exchanges, grid sync, atomics
// and fences. Between those points the next fiber is drawn by a seeded random
// generator, so an ordering bug shows up for some seed instead of hiding behind the
// GPU's usual lock-step order.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#define RNNEMU_HIDDEN __attribute__((visibility("hidden")))
#define RNNEMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace rnnemu {

enum BarrierKind { barrier_plain, barrier_count, barrier_and, barrier_or };

enum WarpOp {
    warp_sync,
    warp_shfl,
    warp_shfl_up,
    warp_shfl_down,
    warp_shfl_xor,
    warp_ballot,
    warp_all,
    warp_any,
    warp_uni,
    warp_match_any,
    warp_reduce_add,
    warp_reduce_umin,
    warp_reduce_umax,
    warp_reduce_imin,
    warp_reduce_imax,
    warp_reduce_and,
    warp_reduce_or,
    warp_reduce_xor,
};

// __syncthreads and its _count/_and/_or forms. Threads that have exited no longer count
// (as on Volta and later GPUs). Threads of one block waiting at different call sites
// is reported as an error: CUDA leaves it undefined.
RNNEMU_HIDDEN int block_barrier(BarrierKind kind, int predicate, const char* file, int line);

// A warp-level rendezvous: every lane named in `mask` must arrive at the same kind of
// operation with the same mask; then each gets its result. A mask naming an exited lane,
// or not naming the caller, is an error; lanes beyond the end of a partial last warp are
// ignored (a shuffle from one reads 0xFF.. bytes).
RNNEMU_HIDDEN unsigned long long warp_exchange(WarpOp op, unsigned int mask,
                                               unsigned long long value, int argument,
                                               int width, const char* file, int line);

// cooperative_groups::this_grid().sync(). Only valid in a cooperative launch.
RNNEMU_HIDDEN void grid_sync(const char* file, int line);
RNNEMU_HIDDEN bool launch_is_cooperative();

// Atomics and fences call this: the running thread goes back to the pool of runnable
// threads and the scheduler picks one at random (in a cooperative launch, from a random
// block), so spin-waits that poll with an atomic, a fence or __nanosleep make progress.
// A spin-wait on a plain volatile load never yields and hangs, as it might on a GPU.
RNNEMU_HIDDEN void yield_point();
// An atomic changed memory: not a livelock.
RNNEMU_HIDDEN void note_progress();

// The stale memory model (memory_model="stale"; runtime.cpp, "Global memory views").
// True while a launch runs in it; the shim calls the hooks below only then, so the
// default, sequentially consistent mode pays one branch per hinted load or atomic.
extern RNNEMU_HIDDEN bool stale_memory_active;
// __threadfence(): publish the running block's unpublished writes to L2 and let its
// L1-bypassing loads see L2 as it is now.
RNNEMU_HIDDEN void publish_writes();
// __nanosleep(): the running block's __ldcg see L2 as it is now (nothing published).
RNNEMU_HIDDEN void refresh_l2_reads();
// __ldcg (latest = false: L2 as of the block's last fence) and __ldcv (latest = true:
// L2 now); the block's own unpublished bytes win. Untracked memory is read directly.
RNNEMU_HIDDEN void load_bypassing_l1(void* out, const void* address, size_t bytes, bool latest);
// Atomics: the address to update (the L2 copy of a tracked word, else `address`), and
// afterwards atomic_done copies the word's new value into the block's view.
RNNEMU_HIDDEN void* atomic_address(void* address, size_t bytes);
RNNEMU_HIDDEN void atomic_done(void* address, size_t bytes);

RNNEMU_HIDDEN void* dynamic_shared_memory();
RNNEMU_HIDDEN unsigned int lane_id();
RNNEMU_HIDDEN unsigned int live_lanes();
RNNEMU_HIDDEN long long clock_ticks();
[[noreturn]] RNNEMU_HIDDEN void kernel_trap(const char* what, const char* file, int line);

// ---------------------------------------------------------------------------------
// Kernel table. The generated translation unit defines one KernelInfo per name
// expression; `invoke` unpacks `void** args` (one pointer per parameter, to a value of
// the parameter's type, like cuLaunchKernel's kernelParams) and calls the kernel.
// ---------------------------------------------------------------------------------
struct KernelInfo {
    const char* name;
    void (*kernel)();
    void (*invoke)(void (*kernel)(), void** args);
    int param_count;
    // One character per parameter: 'p' pointer, 'i' signed integer, 'u' unsigned
    // integer, 'f' floating point, 'b' bool, '?' anything else (a struct by value),
    // and the parameter's size in bytes.
    const char* param_codes;
    const unsigned char* param_sizes;
};

template <typename T>
constexpr char param_code() {
    using U = typename std::remove_cv<T>::type;
    if constexpr (std::is_pointer<U>::value || std::is_null_pointer<U>::value) {
        return 'p';
    } else if constexpr (std::is_same<U, bool>::value) {
        return 'b';
    } else if constexpr (std::is_enum<U>::value) {
        return param_code<typename std::underlying_type<U>::type>();
    } else if constexpr (std::is_integral<U>::value) {
        return std::is_signed<U>::value ? 'i' : 'u';
    } else if constexpr (std::is_floating_point<U>::value) {
        return 'f';
    } else {
        return '?';
    }
}

template <typename... P>
struct KernelSignature {
    static constexpr char codes[sizeof...(P) + 1] = {param_code<P>()..., '\0'};
    static constexpr unsigned char sizes[sizeof...(P) + 1] = {
        static_cast<unsigned char>(sizeof(P))..., 0};

    template <std::size_t... I>
    static void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
        (void)args;
        kernel(*static_cast<typename std::remove_cv<P>::type*>(args[I])...);
    }
    static void invoke(void (*kernel)(), void** args) {
        call(reinterpret_cast<void (*)(P...)>(kernel), args, std::index_sequence_for<P...>{});
    }
};

template <typename... P>
inline KernelInfo describe_kernel(void (*kernel)(P...), const char* name) {
    return KernelInfo{name,
                      reinterpret_cast<void (*)()>(kernel),
                      &KernelSignature<P...>::invoke,
                      static_cast<int>(sizeof...(P)),
                      KernelSignature<P...>::codes,
                      KernelSignature<P...>::sizes};
}

}  // namespace rnnemu
