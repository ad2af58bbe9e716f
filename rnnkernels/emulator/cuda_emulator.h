// cuda_emulator.h: the CUDA shim of the rnnkernels CPU emulator.
//
// Included first by the generated translation unit, before any csrc/*.cu file, so
// the unchanged CUDA sources compile with the system g++. It maps the CUDA keywords
// onto C++ (or onto nothing), defines the built-in variables and types, and turns
// every operation that synchronises threads (__syncthreads, warp shuffles and votes,
// grid sync) into a call into the fiber scheduler in runtime.cpp. Everything else
// (arithmetic, math functions, atomics) runs directly as host code; in the stale
// memory model, fences, atomics and the L1-bypassing loads also call into the
// runtime's views of global memory (runtime.cpp, "Global memory views").
//
// What kernels may rely on (see README.md beside this file for the full contract):
//   * RNNKERNELS_EMULATOR is defined; __CUDA_ARCH__ and __CUDACC__ are not.
//   * Static __shared__ variables are real static variables, poisoned with 0xFF bytes
//     (NaN for float/half/bf16, -1 for ints) when a block starts.
//   * Dynamic shared memory: emulator_dynamic_shared_memory() instead of
//     `extern __shared__` (which is not valid C++ once __shared__ means static).
//   * Inline PTX (asm) does not compile: guard it with #ifndef RNNKERNELS_EMULATOR.
#pragma once

#define RNNKERNELS_EMULATOR 1

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <type_traits>

#include "runtime.h"

// ---------------------------------------------------------------------------------
// Keywords and qualifiers
// ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(n) __attribute__((aligned(n)))
#define __cudart_builtin__
// __restrict__ is a g++ keyword already.

// Static shared memory. The variable becomes a static with its own linker section
// (one section per declaration, so that comdat and non-comdat variables never share
// one); the link step gathers those sections, plus the .bss._ZZ* sections g++ uses
// for static locals of templates and inline functions (where it ignores section
// attributes), into one range that runtime.cpp poisons at every block start and
// swaps between blocks of a cooperative launch.
#define RNNEMU_STRINGIFY2(x) #x
#define RNNEMU_STRINGIFY(x) RNNEMU_STRINGIFY2(x)
//
// The section attribute also matters for correctness at -O2: g++ treats a plain static
// whose address never escapes as invisible to other functions, so it could keep its
// value in a register across __syncthreads() (an external call) or fold a never-written
// one to 0. A variable in a named section (or in a comdat group, for templates) is
// reloaded after every call, like shared memory must be.
#define __shared__ static __attribute__((section("rnnemu_shared." RNNEMU_STRINGIFY(__COUNTER__))))

// ---------------------------------------------------------------------------------
// Built-in vector types, dim3, built-in variables
// ---------------------------------------------------------------------------------
#define RNNEMU_VECTOR_TYPES(T, name, a2, a4)                                              \
    struct name##1 { T x; };                                                             \
    struct __attribute__((aligned(a2))) name##2 { T x, y; };                             \
    struct name##3 { T x, y, z; };                                                       \
    struct __attribute__((aligned(a4))) name##4 { T x, y, z, w; };                       \
    inline name##1 make_##name##1(T x) { return name##1{x}; }                            \
    inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }                    \
    inline name##3 make_##name##3(T x, T y, T z) { return name##3{x, y, z}; }            \
    inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }

RNNEMU_VECTOR_TYPES(signed char, char, 2, 4)
RNNEMU_VECTOR_TYPES(unsigned char, uchar, 2, 4)
RNNEMU_VECTOR_TYPES(short, short, 4, 8)
RNNEMU_VECTOR_TYPES(unsigned short, ushort, 4, 8)
RNNEMU_VECTOR_TYPES(int, int, 8, 16)
RNNEMU_VECTOR_TYPES(unsigned int, uint, 8, 16)
RNNEMU_VECTOR_TYPES(long long, longlong, 16, 16)
RNNEMU_VECTOR_TYPES(unsigned long long, ulonglong, 16, 16)
RNNEMU_VECTOR_TYPES(float, float, 8, 16)
RNNEMU_VECTOR_TYPES(double, double, 16, 16)
#undef RNNEMU_VECTOR_TYPES

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
        : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace rnnemu {
// The scheduler sets these before it resumes a thread (runtime.cpp).
extern RNNEMU_HIDDEN unsigned int current_thread_index[3];
extern RNNEMU_HIDDEN unsigned int current_block_index[3];
extern RNNEMU_HIDDEN unsigned int current_block_dim[3];
extern RNNEMU_HIDDEN unsigned int current_grid_dim[3];
inline uint3 as_uint3(const unsigned int* v) { return uint3{v[0], v[1], v[2]}; }
inline dim3 as_dim3(const unsigned int* v) { return dim3(v[0], v[1], v[2]); }
}  // namespace rnnemu

// Read-only values, like on the GPU: `threadIdx.x = 0` does not compile.
#define threadIdx (static_cast<const uint3>(::rnnemu::as_uint3(::rnnemu::current_thread_index)))
#define blockIdx (static_cast<const uint3>(::rnnemu::as_uint3(::rnnemu::current_block_index)))
#define blockDim (static_cast<const dim3>(::rnnemu::as_dim3(::rnnemu::current_block_dim)))
#define gridDim (static_cast<const dim3>(::rnnemu::as_dim3(::rnnemu::current_grid_dim)))

constexpr int warpSize = 32;

// Per-block buffer of `shared_mem` bytes (the launch argument), 128-byte aligned and
// filled with 0xFF when the block starts. Use it where CUDA code would write
// `extern __shared__ T buffer[];`.
inline void* emulator_dynamic_shared_memory() { return ::rnnemu::dynamic_shared_memory(); }

// ---------------------------------------------------------------------------------
// Synchronisation: block barrier, warp shuffles and votes, fences
// ---------------------------------------------------------------------------------
// The trailing file/line defaults record the caller's location for deadlock reports.
// Every call into the scheduler is also a compiler memory barrier: other threads run
// during it and may have written any memory.
#define RNNEMU_FENCE() asm volatile("" ::: "memory")
#define RNNEMU_WHERE const char *rnnemu_file = __builtin_FILE(), int rnnemu_line = __builtin_LINE()
#define RNNEMU_AT rnnemu_file, rnnemu_line

namespace rnnemu {
inline int fenced_barrier(BarrierKind kind, int predicate, const char* file, int line) {
    RNNEMU_FENCE();
    const int result = block_barrier(kind, predicate, file, line);
    RNNEMU_FENCE();
    return result;
}
inline unsigned long long fenced_exchange(WarpOp op, unsigned int mask, unsigned long long value,
                                          int argument, int width, const char* file, int line) {
    RNNEMU_FENCE();
    const unsigned long long result = warp_exchange(op, mask, value, argument, width, file, line);
    RNNEMU_FENCE();
    return result;
}
inline void fenced_yield() {
    RNNEMU_FENCE();
    yield_point();
    RNNEMU_FENCE();
}
}  // namespace rnnemu

inline void __syncthreads(RNNEMU_WHERE) {
    ::rnnemu::fenced_barrier(::rnnemu::barrier_plain, 0, RNNEMU_AT);
}
inline int __syncthreads_count(int predicate, RNNEMU_WHERE) {
    return ::rnnemu::fenced_barrier(::rnnemu::barrier_count, predicate, RNNEMU_AT);
}
inline int __syncthreads_and(int predicate, RNNEMU_WHERE) {
    return ::rnnemu::fenced_barrier(::rnnemu::barrier_and, predicate, RNNEMU_AT);
}
inline int __syncthreads_or(int predicate, RNNEMU_WHERE) {
    return ::rnnemu::fenced_barrier(::rnnemu::barrier_or, predicate, RNNEMU_AT);
}
inline void __syncwarp(unsigned int mask = 0xffffffffu, RNNEMU_WHERE) {
    ::rnnemu::fenced_exchange(::rnnemu::warp_sync, mask, 0, 0, warpSize, RNNEMU_AT);
}

// Fences: host fences, and a point where the scheduler may switch threads so that
// spin-waits on memory written by other threads make progress (see runtime.h).
// In the stale memory model __threadfence and __threadfence_system also publish the
// block's writes to the other blocks; __threadfence_block orders nothing for them.
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); ::rnnemu::fenced_yield(); }
inline void __threadfence() {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    RNNEMU_FENCE();
    if (::rnnemu::stale_memory_active) ::rnnemu::publish_writes();
    ::rnnemu::fenced_yield();
}
inline void __threadfence_system() { __threadfence(); }
// A sleeping thread's weak L2 reads (__ldcg) see newer data when it wakes, so that a
// poll on them makes progress in the stale memory model (a GPU's L2 reads do, sooner
// or later; that is not an acquire: the data read after it still needs a fence).
inline void __nanosleep(unsigned int) {
    ::rnnemu::fenced_yield();
    if (::rnnemu::stale_memory_active) ::rnnemu::refresh_l2_reads();
}

namespace rnnemu {
template <typename T>
inline unsigned long long to_bits(T value) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move values of at most 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}
template <typename T>
inline T from_bits(unsigned long long bits) {
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}
}  // namespace rnnemu

template <typename T>
inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize, RNNEMU_WHERE) {
    return ::rnnemu::from_bits<T>(::rnnemu::fenced_exchange(
        ::rnnemu::warp_shfl, mask, ::rnnemu::to_bits(var), src_lane, width, RNNEMU_AT));
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                        RNNEMU_WHERE) {
    return ::rnnemu::from_bits<T>(::rnnemu::fenced_exchange(
        ::rnnemu::warp_shfl_up, mask, ::rnnemu::to_bits(var), int(delta), width, RNNEMU_AT));
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                          RNNEMU_WHERE) {
    return ::rnnemu::from_bits<T>(::rnnemu::fenced_exchange(
        ::rnnemu::warp_shfl_down, mask, ::rnnemu::to_bits(var), int(delta), width, RNNEMU_AT));
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize,
                         RNNEMU_WHERE) {
    return ::rnnemu::from_bits<T>(::rnnemu::fenced_exchange(
        ::rnnemu::warp_shfl_xor, mask, ::rnnemu::to_bits(var), lane_mask, width, RNNEMU_AT));
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate, RNNEMU_WHERE) {
    return unsigned(::rnnemu::fenced_exchange(::rnnemu::warp_ballot, mask, predicate != 0, 0,
                                            warpSize, RNNEMU_AT));
}
inline int __all_sync(unsigned int mask, int predicate, RNNEMU_WHERE) {
    return int(::rnnemu::fenced_exchange(::rnnemu::warp_all, mask, predicate != 0, 0, warpSize,
                                       RNNEMU_AT));
}
inline int __any_sync(unsigned int mask, int predicate, RNNEMU_WHERE) {
    return int(::rnnemu::fenced_exchange(::rnnemu::warp_any, mask, predicate != 0, 0, warpSize,
                                       RNNEMU_AT));
}
inline int __uni_sync(unsigned int mask, int predicate, RNNEMU_WHERE) {
    return int(::rnnemu::fenced_exchange(::rnnemu::warp_uni, mask, predicate != 0, 0, warpSize,
                                       RNNEMU_AT));
}
template <typename T>
inline unsigned int __match_any_sync(unsigned int mask, T value, RNNEMU_WHERE) {
    return unsigned(::rnnemu::fenced_exchange(::rnnemu::warp_match_any, mask,
                                            ::rnnemu::to_bits(value), 0, warpSize, RNNEMU_AT));
}
inline unsigned int __reduce_add_sync(unsigned int mask, unsigned int value, RNNEMU_WHERE) {
    return unsigned(::rnnemu::fenced_exchange(::rnnemu::warp_reduce_add, mask, value, 0, warpSize,
                                            RNNEMU_AT));
}
inline unsigned int __reduce_min_sync(unsigned int mask, unsigned int value, RNNEMU_WHERE) {
    return unsigned(::rnnemu::fenced_exchange(::rnnemu::warp_reduce_umin, mask, value, 0,
                                            warpSize, RNNEMU_AT));
}
inline unsigned int __reduce_max_sync(unsigned int mask, unsigned int value, RNNEMU_WHERE) {
    return unsigned(::rnnemu::fenced_exchange(::rnnemu::warp_reduce_umax, mask, value, 0,
                                            warpSize, RNNEMU_AT));
}
inline int __reduce_min_sync(unsigned int mask, int value, RNNEMU_WHERE) {
    return int(::rnnemu::fenced_exchange(::rnnemu::warp_reduce_imin, mask,
                                       (unsigned long long)(unsigned)value, 0, warpSize, RNNEMU_AT));
}
inline int __reduce_max_sync(unsigned int mask, int value, RNNEMU_WHERE) {
    return int(::rnnemu::fenced_exchange(::rnnemu::warp_reduce_imax, mask,
                                       (unsigned long long)(unsigned)value, 0, warpSize, RNNEMU_AT));
}
inline unsigned int __reduce_and_sync(unsigned int mask, unsigned int value, RNNEMU_WHERE) {
    return unsigned(::rnnemu::fenced_exchange(::rnnemu::warp_reduce_and, mask, value, 0, warpSize,
                                            RNNEMU_AT));
}
inline unsigned int __reduce_or_sync(unsigned int mask, unsigned int value, RNNEMU_WHERE) {
    return unsigned(::rnnemu::fenced_exchange(::rnnemu::warp_reduce_or, mask, value, 0, warpSize,
                                            RNNEMU_AT));
}
inline unsigned int __reduce_xor_sync(unsigned int mask, unsigned int value, RNNEMU_WHERE) {
    return unsigned(::rnnemu::fenced_exchange(::rnnemu::warp_reduce_xor, mask, value, 0, warpSize,
                                            RNNEMU_AT));
}
// Approximation: the emulator does not track divergence, so the "active" lanes are
// the lanes of the warp that exist and have not exited.
inline unsigned int __activemask() { return ::rnnemu::live_lanes(); }
inline unsigned int __lanemask_lt() { return (1u << ::rnnemu::lane_id()) - 1u; }

// ---------------------------------------------------------------------------------
// Atomics: compare-and-swap loops on GCC __atomic builtins (real atomics, so also
// correct for memory that other host threads touch). Each one is a scheduling point
// (see yield_point() in runtime.h); one that changes memory counts as progress for the
// livelock check, so only polling loops that never change anything trip it.
// ---------------------------------------------------------------------------------
namespace rnnemu {
// In the stale memory model the update acts on L2 (where a GPU executes atomics) and
// the new value is copied into the running block's view.
template <typename T, typename F>
inline T atomic_update(T* address, F update) {
    fenced_yield();
    T* target = stale_memory_active ? static_cast<T*>(atomic_address(address, sizeof(T)))
                                    : address;
    T expected = __atomic_load_n(target, __ATOMIC_SEQ_CST);
    T desired = update(expected);
    while (!__atomic_compare_exchange_n(target, &expected, desired, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
        desired = update(expected);
    }
    if (target != address) atomic_done(address, sizeof(T));
    if (desired != expected) note_progress();
    return expected;  // the old value
}
template <typename T, typename Bits, typename F>
inline T atomic_update_bits(T* address, F update) {
    static_assert(sizeof(T) == sizeof(Bits), "bit type must match");
    Bits* bits_address = reinterpret_cast<Bits*>(address);
    Bits old = atomic_update(bits_address, [&](Bits bits) {
        T value;
        std::memcpy(&value, &bits, sizeof(T));
        T result = update(value);
        Bits out;
        std::memcpy(&out, &result, sizeof(T));
        return out;
    });
    T value;
    std::memcpy(&value, &old, sizeof(T));
    return value;
}
}  // namespace rnnemu

#define RNNEMU_ATOMIC(name, T, new_value)                                              \
    inline T name(T* address, T value) {                                               \
        return ::rnnemu::atomic_update(address, [=](T old) { return static_cast<T>(new_value); }); \
    }                                                                                  \
    inline T name##_block(T* address, T value) { return name(address, value); }        \
    inline T name##_system(T* address, T value) { return name(address, value); }
#define RNNEMU_ATOMIC_INTEGERS(name, new_value)           \
    RNNEMU_ATOMIC(name, int, new_value)                   \
    RNNEMU_ATOMIC(name, unsigned int, new_value)          \
    RNNEMU_ATOMIC(name, unsigned long long, new_value)
// Integer addition wraps around, as on the GPU (computed unsigned: no signed overflow).
RNNEMU_ATOMIC_INTEGERS(atomicAdd, (unsigned long long)old + (unsigned long long)value)
RNNEMU_ATOMIC_INTEGERS(atomicAnd, old & value)
RNNEMU_ATOMIC_INTEGERS(atomicOr, old | value)
RNNEMU_ATOMIC_INTEGERS(atomicXor, old ^ value)
RNNEMU_ATOMIC_INTEGERS(atomicExch, ((void)old, value))
RNNEMU_ATOMIC(atomicSub, int, (unsigned long long)old - (unsigned long long)value)
RNNEMU_ATOMIC(atomicSub, unsigned int, old - value)
RNNEMU_ATOMIC(atomicMin, int, value < old ? value : old)
RNNEMU_ATOMIC(atomicMin, unsigned int, value < old ? value : old)
RNNEMU_ATOMIC(atomicMin, long long, value < old ? value : old)
RNNEMU_ATOMIC(atomicMin, unsigned long long, value < old ? value : old)
RNNEMU_ATOMIC(atomicMax, int, value > old ? value : old)
RNNEMU_ATOMIC(atomicMax, unsigned int, value > old ? value : old)
RNNEMU_ATOMIC(atomicMax, long long, value > old ? value : old)
RNNEMU_ATOMIC(atomicMax, unsigned long long, value > old ? value : old)
#undef RNNEMU_ATOMIC_INTEGERS
#undef RNNEMU_ATOMIC

inline float atomicAdd(float* address, float value) {
    return ::rnnemu::atomic_update_bits<float, unsigned int>(address,
                                                             [=](float x) { return x + value; });
}
inline double atomicAdd(double* address, double value) {
    return ::rnnemu::atomic_update_bits<double, unsigned long long>(
        address, [=](double x) { return x + value; });
}
inline float atomicAdd_block(float* a, float v) { return atomicAdd(a, v); }
inline float atomicAdd_system(float* a, float v) { return atomicAdd(a, v); }
inline double atomicAdd_block(double* a, double v) { return atomicAdd(a, v); }
inline double atomicAdd_system(double* a, double v) { return atomicAdd(a, v); }
inline float atomicExch(float* address, float value) {
    return ::rnnemu::atomic_update_bits<float, unsigned int>(address, [=](float) { return value; });
}


#define RNNEMU_ATOMIC_CAS(T)                                                               \
    inline T atomicCAS(T* address, T compare, T value) {                                  \
        return ::rnnemu::atomic_update(address,                                           \
                                       [=](T old) { return old == compare ? value : old; }); \
    }                                                                                     \
    inline T atomicCAS_block(T* a, T c, T v) { return atomicCAS(a, c, v); }               \
    inline T atomicCAS_system(T* a, T c, T v) { return atomicCAS(a, c, v); }
RNNEMU_ATOMIC_CAS(int)
RNNEMU_ATOMIC_CAS(unsigned int)
RNNEMU_ATOMIC_CAS(unsigned long long)
RNNEMU_ATOMIC_CAS(unsigned short)
#undef RNNEMU_ATOMIC_CAS

// atomicInc/atomicDec wrap around like the hardware: ((old >= limit) ? 0 : old + 1) and
// ((old == 0 || old > limit) ? limit : old - 1).
inline unsigned int atomicInc(unsigned int* address, unsigned int limit) {
    return ::rnnemu::atomic_update(address,
                                   [=](unsigned x) { return x >= limit ? 0u : x + 1u; });
}
inline unsigned int atomicDec(unsigned int* address, unsigned int limit) {
    return ::rnnemu::atomic_update(
        address, [=](unsigned x) { return (x == 0u || x > limit) ? limit : x - 1u; });
}

// ---------------------------------------------------------------------------------
// min / max as CUDA provides them (overloads in the global namespace)
// ---------------------------------------------------------------------------------
#define RNNEMU_MINMAX(A, B, R)                                                  \
    inline R min(A a, B b) {                                                    \
        return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
    }                                                                           \
    inline R max(A a, B b) {                                                    \
        return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
    }
RNNEMU_MINMAX(int, int, int)
RNNEMU_MINMAX(unsigned int, unsigned int, unsigned int)
RNNEMU_MINMAX(int, unsigned int, unsigned int)
RNNEMU_MINMAX(unsigned int, int, unsigned int)
RNNEMU_MINMAX(long, long, long)
RNNEMU_MINMAX(unsigned long, unsigned long, unsigned long)
RNNEMU_MINMAX(long long, long long, long long)
RNNEMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
RNNEMU_MINMAX(long long, unsigned long long, unsigned long long)
RNNEMU_MINMAX(unsigned long long, long long, unsigned long long)
#undef RNNEMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// ---------------------------------------------------------------------------------
// Math intrinsics. The fast-math intrinsics (__expf, __fdividef, ...) are computed at
// full precision here: the emulator is exact in ordering, not in last-ulp arithmetic.
// ---------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x <= 0.0f ? 0.0f : (x >= 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
// Rounding-mode variants: only round-to-nearest is exact; _rz/_ru/_rd use it too.
#define RNNEMU_ROUNDED(suffix)                                                          \
    inline float __fadd##suffix(float a, float b) { return a + b; }                    \
    inline float __fsub##suffix(float a, float b) { return a - b; }                    \
    inline float __fmul##suffix(float a, float b) { return a * b; }                    \
    inline float __fdiv##suffix(float a, float b) { return a / b; }                    \
    inline float __frcp##suffix(float a) { return 1.0f / a; }                          \
    inline float __fsqrt##suffix(float a) { return sqrtf(a); }                         \
    inline float __fmaf##suffix(float a, float b, float c) { return fmaf(a, b, c); }   \
    inline double __dadd##suffix(double a, double b) { return a + b; }                 \
    inline double __dsub##suffix(double a, double b) { return a - b; }                 \
    inline double __dmul##suffix(double a, double b) { return a * b; }                 \
    inline double __ddiv##suffix(double a, double b) { return a / b; }                 \
    inline double __drcp##suffix(double a) { return 1.0 / a; }                         \
    inline double __dsqrt##suffix(double a) { return sqrt(a); }                        \
    inline double __fma##suffix(double a, double b, double c) { return fma(a, b, c); }
RNNEMU_ROUNDED(_rn)
RNNEMU_ROUNDED(_rz)
RNNEMU_ROUNDED(_ru)
RNNEMU_ROUNDED(_rd)
#undef RNNEMU_ROUNDED
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fmaf_ieee_rn(float a, float b, float c) { return fmaf(a, b, c); }

// Bit casts and conversions.
inline float __int_as_float(int x) { return ::rnnemu::from_bits<float>((unsigned)x); }
inline int __float_as_int(float x) { return int(unsigned(::rnnemu::to_bits(x))); }
inline float __uint_as_float(unsigned int x) { return ::rnnemu::from_bits<float>(x); }
inline unsigned int __float_as_uint(float x) { return unsigned(::rnnemu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return ::rnnemu::from_bits<double>((unsigned long long)x); }
inline long long __double_as_longlong(double x) { return (long long)::rnnemu::to_bits(x); }
inline int __double2hiint(double x) { return int(::rnnemu::to_bits(x) >> 32); }
inline int __double2loint(double x) { return int(unsigned(::rnnemu::to_bits(x))); }
inline int __float2int_rn(float x) { return int(nearbyintf(x)); }
inline int __float2int_rz(float x) { return int(truncf(x)); }
inline int __float2int_rd(float x) { return int(floorf(x)); }
inline int __float2int_ru(float x) { return int(ceilf(x)); }
inline unsigned int __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline unsigned int __float2uint_rz(float x) { return (unsigned)truncf(x); }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline long long __float2ll_rz(float x) { return (long long)truncf(x); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned int x) { return float(x); }
inline int __double2int_rn(double x) { return int(nearbyint(x)); }
inline float __double2float_rn(double x) { return float(x); }

// Integer intrinsics.
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    unsigned int r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned long long __brevll(unsigned long long x) {
    return ((unsigned long long)__brev(unsigned(x)) << 32) | __brev(unsigned(x >> 32));
}
inline int __mul24(int x, int y) { return int((long long)((x << 8) >> 8) * ((y << 8) >> 8)); }
inline unsigned int __umul24(unsigned int x, unsigned int y) { return (x & 0xffffffu) * (y & 0xffffffu); }
inline int __mulhi(int x, int y) { return int(((long long)x * y) >> 32); }
inline unsigned int __umulhi(unsigned int x, unsigned int y) { return unsigned(((unsigned long long)x * y) >> 32); }
inline long long __mul64hi(long long x, long long y) { return (long long)(((__int128)x * y) >> 64); }
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
    return (unsigned long long)(((unsigned __int128)x * y) >> 64);
}
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
    return unsigned((((unsigned long long)hi << 32 | lo) << (shift & 31)) >> 32);
}
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
    return unsigned(((unsigned long long)hi << 32 | lo) >> (shift & 31));
}
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    unsigned long long bytes = (unsigned long long)y << 32 | x;
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) r |= unsigned((bytes >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}

// Cache-hinted loads and stores. By default all are plain loads and stores. In the
// stale memory model (runtime.cpp, "Global memory views") the two that bypass L1 read
// L2: __ldcg (ld.global.cg, "cache global": L2, not L1) sees L2 as of the block's last
// fence, __ldcv (ld.global.cv, "don't cache, fetch again") sees L2 now. The others may
// hit a stale L1 line and read the block's view like a plain load: __ldg
// (ld.global.nc, the non-coherent read-only path), __ldca (cache all levels), __ldcs
// (streaming, allocates in L1 evict-first) and __ldlu (ld.lu is ld.cs on global
// addresses, PTX ISA). Stores of any hint are weak: they reach other blocks only at a
// fence, like plain stores.
namespace rnnemu {
template <typename T>
inline T load_bypassing_l1(const T* p, bool latest) {
    if (!stale_memory_active) return *p;
    RNNEMU_FENCE();  // the view in host memory may hold stores the compiler has not made yet
    T value;
    load_bypassing_l1(&value, p, sizeof(T), latest);
    return value;
}
}  // namespace rnnemu
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return ::rnnemu::load_bypassing_l1(p, false); }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return ::rnnemu::load_bypassing_l1(p, true); }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

// Misc.
[[noreturn]] inline void __trap(RNNEMU_WHERE) { ::rnnemu::kernel_trap("__trap()", RNNEMU_AT); }
[[noreturn]] inline void __brkpt(RNNEMU_WHERE) { ::rnnemu::kernel_trap("__brkpt()", RNNEMU_AT); }
inline long long clock64() { return ::rnnemu::clock_ticks(); }
inline long long __clock64() { return ::rnnemu::clock_ticks(); }
inline unsigned long long __globaltimer() { return (unsigned long long)::rnnemu::clock_ticks(); }
template <typename T> inline bool __isGlobal(const T*) { return true; }
