// runtime.cpp: the fiber scheduler of the rnnkernels CPU emulator.
//
// One launch at a time per loaded module (a mutex serialises them). A launch
//   1. checks the configuration and the arguments against the kernel's signature;
//   2. runs the blocks: in a normal launch one block after another, in a seeded random
//      order; in a cooperative launch all blocks together, so that grid sync works;
//   3. inside a block, runs each CUDA thread as a fiber until it reaches a
//      synchronisation point (barrier, warp exchange, grid sync, atomic, fence, exit),
//      then draws the next runnable fiber at random.
// When no fiber can run and some have not finished, the launch fails with a report of
// who waits where (a deadlock) instead of hanging. In the stale memory model each
// block also has its own view of the array arguments ("Global memory views" below).
//
// Shared memory. Static __shared__ variables live in one linker section
// [__rnnemu_shared_begin, __rnnemu_shared_end) (see cuda_emulator.h and the link step
// in _build.py); dynamic shared memory is a per-block heap buffer. Both are filled
// with 0xFF when a block starts. In a cooperative launch the blocks share the one
// static section, so the scheduler saves and restores it when it switches blocks.
//
// Fibers. On x86-64 a dozen instructions of assembly switch stacks (callee-saved
// registers, the SSE and x87 control words); elsewhere, or with
// -DRNNEMU_USE_UCONTEXT, swapcontext() does it. Under AddressSanitizer every switch is
// announced with __sanitizer_start/finish_switch_fiber.
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define RNNEMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define RNNEMU_ASAN 0
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr, _mm_setcsr: the denormal mode of a launch
#endif

#if defined(__x86_64__) && !defined(RNNEMU_USE_UCONTEXT)
#define RNNEMU_ASM_SWITCH 1
#else
#define RNNEMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

extern "C" char __rnnemu_shared_begin[] RNNEMU_HIDDEN;
extern "C" char __rnnemu_shared_end[] RNNEMU_HIDDEN;

namespace rnnemu {

unsigned int current_thread_index[3];
unsigned int current_block_index[3];
unsigned int current_block_dim[3];
unsigned int current_grid_dim[3];
bool stale_memory_active = false;

namespace {

constexpr unsigned char kPoison = 0xFF;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr unsigned long long kMaxCooperativeThreads = 1ull << 16;
constexpr unsigned long long kMaxSharedBytes = 227 * 1024;  // the largest any GPU allows

// ---------------------------------------------------------------------------------
// Context switching
// ---------------------------------------------------------------------------------
#if RNNEMU_ASM_SWITCH
// rnnemu_switch_context(save, load): push the callee-saved registers and the control
// words, store the stack pointer in *save, load `load`, pop, return into the other side.
// A new fiber's stack is laid out so that the first switch "returns" into
// rnnemu_fiber_trampoline with the entry function in r13 and its argument in r12.
extern "C" void rnnemu_switch_context(void** save, void* load) RNNEMU_HIDDEN;
extern "C" void rnnemu_fiber_trampoline() RNNEMU_HIDDEN;
asm(R"(
    .text
    .globl rnnemu_switch_context
    .hidden rnnemu_switch_context
    .type rnnemu_switch_context, @function
rnnemu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size rnnemu_switch_context, .-rnnemu_switch_context

    .globl rnnemu_fiber_trampoline
    .hidden rnnemu_fiber_trampoline
    .type rnnemu_fiber_trampoline, @function
rnnemu_fiber_trampoline:
    movq %r12, %rdi
    xorl %ebp, %ebp
    andq $-16, %rsp
    call *%r13
    ud2
    .size rnnemu_fiber_trampoline, .-rnnemu_fiber_trampoline
)");

struct Context {
    void* sp = nullptr;
};

void init_context(Context& context, char* stack_low, size_t stack_size, void (*entry)(void*),
                  void* argument) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack_low) + stack_size) & ~uintptr_t(15);
    uint64_t* slot = reinterpret_cast<uint64_t*>(top - 16);  // return address, 16-aligned
    slot[0] = reinterpret_cast<uint64_t>(&rnnemu_fiber_trampoline);
    slot[1] = 0;
    uint64_t* sp = slot - 8;
    uint32_t mxcsr = 0;
    uint16_t fcw = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fcw));
    sp[0] = fcw;                                    // popped by fldcw
    sp[1] = mxcsr;                                  // popped by ldmxcsr
    sp[2] = 0;                                      // r15
    sp[3] = 0;                                      // r14
    sp[4] = reinterpret_cast<uint64_t>(entry);      // r13
    sp[5] = reinterpret_cast<uint64_t>(argument);   // r12
    sp[6] = 0;                                      // rbx
    sp[7] = 0;                                      // rbp
    context.sp = sp;
}

inline void raw_switch(Context& from, Context& to) { rnnemu_switch_context(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};

void (*g_ucontext_entry)(void*) = nullptr;

void ucontext_trampoline(unsigned int high, unsigned int low) {
    void* argument = reinterpret_cast<void*>((uintptr_t(high) << 32) | uintptr_t(low));
    g_ucontext_entry(argument);
    std::abort();
}

void init_context(Context& context, char* stack_low, size_t stack_size, void (*entry)(void*),
                  void* argument) {
    g_ucontext_entry = entry;
    getcontext(&context.uc);
    context.uc.uc_stack.ss_sp = stack_low;
    context.uc.uc_stack.ss_size = stack_size;
    context.uc.uc_link = nullptr;
    uintptr_t bits = reinterpret_cast<uintptr_t>(argument);
    makecontext(&context.uc, reinterpret_cast<void (*)()>(&ucontext_trampoline), 2,
                unsigned(bits >> 32), unsigned(bits & 0xffffffffu));
}

inline void raw_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---------------------------------------------------------------------------------
// Stacks: one mmap per fiber with a PROT_NONE guard page below it, reused across
// launches. Pages are committed only when touched.
// ---------------------------------------------------------------------------------
size_t stack_bytes() {
    size_t kib = RNNEMU_ASAN ? 1024 : 256;
    if (const char* text = std::getenv("RNNKERNELS_EMULATOR_STACK_KB")) {
        long value = std::atol(text);
        if (value >= 16) kib = size_t(value);
    }
    return kib * 1024;
}

struct Stack {
    char* low;
    size_t size;
};

std::vector<Stack> g_stacks;

bool ensure_stacks(size_t count, std::string& error) {
    static const size_t size = stack_bytes();
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    while (g_stacks.size() < count) {
        void* base = mmap(nullptr, size + page, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (base == MAP_FAILED) {
            error = "could not map a stack for fiber " + std::to_string(g_stacks.size()) +
                    " (" + std::to_string(count) + " threads requested)";
            return false;
        }
        mprotect(base, page, PROT_NONE);
        g_stacks.push_back(Stack{static_cast<char*>(base) + page, size});
    }
    return true;
}

// ---------------------------------------------------------------------------------
// Launch state
// ---------------------------------------------------------------------------------
enum class State : unsigned char { runnable, barrier, warp, grid, done };

struct Block;

struct Fiber {
    Context context;
    Stack stack;
    void* asan_fake_stack = nullptr;
    Block* block = nullptr;
    unsigned index[3] = {0, 0, 0};
    unsigned linear = 0;  // index within the block, x fastest
    State state = State::runnable;
    // barrier
    BarrierKind barrier_kind = barrier_plain;
    int predicate = 0;
    int barrier_result = 0;
    // warp exchange
    WarpOp op = warp_sync;
    unsigned mask = 0;
    unsigned long long value = 0;
    int argument = 0;
    int width = 32;
    unsigned long long result = 0;
    // where it waits
    const char* file = "";
    int line = 0;
};

struct Block {
    unsigned index[3] = {0, 0, 0};
    Fiber* fibers = nullptr;  // thread_count fibers, linear order
    unsigned live = 0;        // not exited
    unsigned arrived = 0;     // waiting at the barrier
    std::vector<Fiber*> runnable;
    unsigned char* dynamic_shared = nullptr;
    std::vector<unsigned char> saved_static;  // cooperative launches
    bool static_initialised = false;
    // Stale memory model (see "Global memory views" below): this block's copies of the
    // tracked buffers, each laid out like StaleMemory::l2.
    unsigned char* view = nullptr;  // its plain loads and stores (in host memory while loaded)
    unsigned char* base = nullptr;  // the view as of its last publish: view != base is dirty
    unsigned char* seen = nullptr;  // L2 as of its last fence: what its weak __ldcg reads
    unsigned long long linear = 0;  // x fastest: the order of the launch-end publish
};

struct Rng {  // splitmix64
    unsigned long long state;
    unsigned long long next() {
        unsigned long long z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    size_t below(size_t n) { return size_t(next() % n); }
};

// One array argument's allocation, tracked by the stale memory model.
struct GlobalRegion {
    unsigned char* host;  // the memory the kernel's pointers point into
    size_t size;
    size_t offset;  // where its copy starts in every buffer of StaleMemory and Block
};

struct PendingBytes {  // a finished block's unpublished writes (normal launches)
    unsigned long long block;
    size_t offset;
    std::vector<unsigned char> bytes;
};

struct StaleMemory {
    bool enabled = false;
    std::vector<GlobalRegion> regions;  // sorted by address, disjoint
    size_t total = 0;                   // bytes of one copy (regions plus alignment gaps)
    std::vector<unsigned char*> allocations;
    unsigned char* initial = nullptr;  // contents at launch start
    unsigned char* l2 = nullptr;       // what is globally visible
    Block* loaded = nullptr;           // block whose view is in host memory
    std::vector<PendingBytes> pending;
    unsigned long long block_switches = 0;
};

struct Launch {
    const KernelInfo* kernel = nullptr;
    void** args = nullptr;
    unsigned grid[3] = {1, 1, 1};
    unsigned block[3] = {1, 1, 1};
    unsigned thread_count = 0;
    size_t shared_bytes = 0;
    bool cooperative = false;
    Rng rng{0};
    std::vector<Fiber> fibers;
    std::vector<Block> blocks;
    Block* current = nullptr;  // block of the fiber that runs or ran last
    Block* loaded = nullptr;   // block whose static shared memory is in the section
    Fiber* running = nullptr;
    bool hop = false;  // a yield point asked to pick a random block next
    unsigned long long idle_yields = 0;
    unsigned long long spin_limit = 0;
    std::string error;
    Context scheduler;
    void* scheduler_fake_stack = nullptr;
    const void* scheduler_stack_bottom = nullptr;
    size_t scheduler_stack_size = 0;
    StaleMemory memory;
};

Launch* g_launch = nullptr;
std::mutex g_launch_mutex;

size_t static_shared_size() { return size_t(__rnnemu_shared_end - __rnnemu_shared_begin); }

void poison(void* data, size_t size) {
    if (size) std::memset(data, kPoison, size);
}

// ---------------------------------------------------------------------------------
// Global memory views: the stale memory model
// ---------------------------------------------------------------------------------
// With memory_model="stale" (README.md, "Memory ordering"), the allocations behind the
// launch's array arguments (the regions) get a GPU's weak ordering, made visible:
//   * every block has a private VIEW of them: the launch-start contents plus its own
//     plain stores. Plain loads and stores, and the hinted ones that may hit L1 or sit
//     in a store queue (__ldg, __ldca, __ldcs, __ldlu, __stcg, __stcs, __stwb, __stwt),
//     touch the view: host memory holds the view of the block whose thread runs, and
//     the scheduler swaps views when it switches blocks, as it does static shared
//     memory. An L1 that is never invalidated plus a store queue that drains only at a
//     fence: stricter than a GPU, never looser.
//   * L2 holds what is globally visible. __threadfence() and __threadfence_system()
//     publish the block's dirty bytes (view != base) to L2, then refresh `seen`, the
//     block's copy of L2 that its weak L1-bypassing loads (__ldcg) read: such a load
//     sees what was published before the block's last fence and nothing newer (a GPU
//     may satisfy a load early unless an acquire orders it after the flag).
//     __nanosleep() refreshes `seen` too (a sleeper's L2 reads see newer data when it
//     wakes), without publishing: a poll on __ldcg with a sleep makes progress.
//     __threadfence_block() orders nothing for other blocks and publishes nothing.
//   * atomics act on L2 (as on a GPU, where they execute there) and write the word's
//     new value into the block's view, base and seen; __ldcv ("fetch again") reads L2
//     as it is now.
//   * a block's L1-bypassing loads return its own unpublished bytes where it has any
//     (a thread sees its own stores).
//   * grid sync publishes every block's dirty bytes (in block order), then sets every
//     view, base and seen to L2: plain loads after it see everything before it.
//   * at the end of the launch, every block's dirty bytes are published in block order
//     and host memory gets L2. Normal launches work the same way, block after block:
//     each block starts from the launch-start contents and L2 as it is then.
// Dirty bytes are found by comparing view with base, so a plain store of the value the
// view already holds does not count as a write. Only a byte written by several blocks
// in one launch with flags (not a grid sync) between them can suffer from that; then L2
// may keep the other block's value: a false alarm, never a missed bug.
// Cost: a memcpy of the regions per block switch (cooperative launches switch blocks at
// every atomic and fence) plus a compare per fence; keep emulated shapes small.
struct MemoryRequest {  // set by rnnemu_set_memory_model for the next launch
    bool stale = false;
    std::vector<std::pair<unsigned char*, size_t>> regions;
};
MemoryRequest g_memory_request;
unsigned long long g_view_switches = 0;  // of the last launch, for rnnemu_view_switches

const GlobalRegion* find_region(const StaleMemory& memory, const void* address, size_t bytes) {
    const unsigned char* start = static_cast<const unsigned char*>(address);
    for (const GlobalRegion& region : memory.regions) {
        if (start >= region.host && start + bytes <= region.host + region.size) return &region;
    }
    return nullptr;
}

unsigned char* new_copy(StaleMemory& memory) {
    void* data = nullptr;
    if (posix_memalign(&data, 64, memory.total ? memory.total : 1) != 0) throw std::bad_alloc();
    memory.allocations.push_back(static_cast<unsigned char*>(data));
    return static_cast<unsigned char*>(data);
}

void copy_from_host(const StaleMemory& memory, unsigned char* copy) {
    for (const GlobalRegion& region : memory.regions)
        std::memcpy(copy + region.offset, region.host, region.size);
}

void copy_to_host(const StaleMemory& memory, const unsigned char* copy) {
    for (const GlobalRegion& region : memory.regions)
        std::memcpy(region.host, copy + region.offset, region.size);
}

// The block's view of `region`: host memory while the block is loaded.
unsigned char* view_of(const StaleMemory& memory, Block* block, const GlobalRegion& region) {
    return memory.loaded == block ? region.host : block->view + region.offset;
}

// Calls found(start, length) for each run of bytes where view and base differ.
template <typename F>
void for_each_dirty_run(const unsigned char* view, const unsigned char* base, size_t size,
                        F found) {
    size_t i = 0;
    while (i < size) {
        // Whole 64-byte chunks that are clean are the common case: memcmp skips them.
        if (i % 64 == 0 && i + 64 <= size && std::memcmp(view + i, base + i, 64) == 0) {
            i += 64;
            continue;
        }
        if (view[i] == base[i]) {
            ++i;
            continue;
        }
        size_t end = i + 1;
        while (end < size && view[end] != base[end]) ++end;
        found(i, end - i);
        i = end;
    }
}

// The block's unpublished writes go to L2 (and become its base).
void publish_block(StaleMemory& memory, Block* block) {
    for (const GlobalRegion& region : memory.regions) {
        const unsigned char* view = view_of(memory, block, region);
        unsigned char* base = block->base + region.offset;
        unsigned char* l2 = memory.l2 + region.offset;
        for_each_dirty_run(view, base, region.size, [&](size_t start, size_t length) {
            std::memcpy(l2 + start, view + start, length);
            std::memcpy(base + start, view + start, length);
        });
    }
}

// Normal launches: the finished block's unpublished writes, published at launch end.
void keep_pending(StaleMemory& memory, Block* block) {
    for (const GlobalRegion& region : memory.regions) {
        const unsigned char* view = view_of(memory, block, region);
        const unsigned char* base = block->base + region.offset;
        for_each_dirty_run(view, base, region.size, [&](size_t start, size_t length) {
            memory.pending.push_back(PendingBytes{
                block->linear, region.offset + start,
                std::vector<unsigned char>(view + start, view + start + length)});
        });
    }
}

void memory_begin(Launch& launch, MemoryRequest& request) {
    StaleMemory& memory = launch.memory;
    if (!request.stale || request.regions.empty()) return;
    std::sort(request.regions.begin(), request.regions.end());
    for (const auto& [host, size] : request.regions) {
        if (size == 0) continue;
        if (!memory.regions.empty()) {
            GlobalRegion& last = memory.regions.back();
            if (host < last.host + last.size) {  // overlapping views of one array: merge
                last.size = std::max(last.size, size_t(host + size - last.host));
                continue;
            }
        }
        memory.regions.push_back(GlobalRegion{host, size, 0});
    }
    // Each copy keeps the host address's alignment modulo 64, so an atomic on the L2
    // copy of a word is as aligned as on the host.
    size_t offset = 0;
    for (GlobalRegion& region : memory.regions) {
        const size_t misalignment = reinterpret_cast<uintptr_t>(region.host) % 64;
        offset = (offset + 63) / 64 * 64 + misalignment;
        region.offset = offset;
        offset += region.size;
    }
    memory.total = offset;
    memory.initial = new_copy(memory);
    memory.l2 = new_copy(memory);
    copy_from_host(memory, memory.initial);
    std::memcpy(memory.l2, memory.initial, memory.total);
    for (Block& block : launch.blocks) {
        block.view = new_copy(memory);
        block.base = new_copy(memory);
        block.seen = new_copy(memory);
    }
    memory.enabled = true;  // only now: every copy exists
    stale_memory_active = true;
}

// A block starts: its view and base are the launch-start contents; its weak
// L1-bypassing loads see L2 as it is now (in a normal launch: with the finished
// blocks' fenced writes).
void memory_start_block(Launch& launch, Block& block) {
    StaleMemory& memory = launch.memory;
    if (!memory.enabled) return;
    std::memcpy(block.base, memory.initial, memory.total);
    std::memcpy(block.seen, memory.l2, memory.total);
    if (launch.cooperative) {
        std::memcpy(block.view, memory.initial, memory.total);
    } else {  // the one block of a normal launch: its view is host memory
        copy_to_host(memory, memory.initial);
        memory.loaded = &block;
        memory.block_switches += 1;
    }
}

// Makes `block`'s view the content of host memory.
void memory_load_view(Launch& launch, Block* block) {
    StaleMemory& memory = launch.memory;
    if (!memory.enabled || memory.loaded == block) return;
    if (memory.loaded) copy_from_host(memory, memory.loaded->view);
    copy_to_host(memory, block->view);
    memory.loaded = block;
    memory.block_switches += 1;
}

void memory_end_block(Launch& launch, Block& block) {
    if (launch.memory.enabled && !launch.cooperative) keep_pending(launch.memory, &block);
}

void memory_grid_sync(Launch& launch) {
    StaleMemory& memory = launch.memory;
    if (!memory.enabled) return;
    if (memory.loaded) copy_from_host(memory, memory.loaded->view);
    memory.loaded = nullptr;
    for (Block& block : launch.blocks) publish_block(memory, &block);
    for (Block& block : launch.blocks) {
        std::memcpy(block.view, memory.l2, memory.total);
        std::memcpy(block.base, memory.l2, memory.total);
        std::memcpy(block.seen, memory.l2, memory.total);
    }
}

// Publishes what no fence published, in block order, and gives host memory L2. Also
// after an error, so that the arrays hold one consistent state.
void memory_end(Launch& launch) {
    StaleMemory& memory = launch.memory;
    stale_memory_active = false;
    g_view_switches = memory.block_switches;
    if (memory.enabled) {
        memory.enabled = false;
        if (launch.cooperative) {
            if (memory.loaded) copy_from_host(memory, memory.loaded->view);
            memory.loaded = nullptr;
            for (Block& block : launch.blocks) publish_block(memory, &block);
        } else {
            std::stable_sort(memory.pending.begin(), memory.pending.end(),
                             [](const PendingBytes& a, const PendingBytes& b) {
                                 return a.block < b.block;
                             });
            for (const PendingBytes& run : memory.pending)
                std::memcpy(memory.l2 + run.offset, run.bytes.data(), run.bytes.size());
        }
        copy_to_host(memory, memory.l2);
    }
    for (unsigned char* data : memory.allocations) std::free(data);
    memory.allocations.clear();
    for (Block& block : launch.blocks) block.view = block.base = block.seen = nullptr;
}

// ---------------------------------------------------------------------------------
// Switching between the scheduler and fibers
// ---------------------------------------------------------------------------------
void switch_to_fiber(Launch& launch, Fiber* fiber) {
#if RNNEMU_ASAN
    __sanitizer_start_switch_fiber(&launch.scheduler_fake_stack, fiber->stack.low,
                                   fiber->stack.size);
#endif
    raw_switch(launch.scheduler, fiber->context);
#if RNNEMU_ASAN
    __sanitizer_finish_switch_fiber(launch.scheduler_fake_stack, nullptr, nullptr);
#endif
}

void arrived_in_fiber(Launch& launch, Fiber* fiber) {
#if RNNEMU_ASAN
    __sanitizer_finish_switch_fiber(fiber->asan_fake_stack, &launch.scheduler_stack_bottom,
                                    &launch.scheduler_stack_size);
#else
    (void)launch;
    (void)fiber;
#endif
}

void switch_to_scheduler(Launch& launch, Fiber* fiber) {
#if RNNEMU_ASAN
    __sanitizer_start_switch_fiber(&fiber->asan_fake_stack, launch.scheduler_stack_bottom,
                                   launch.scheduler_stack_size);
#endif
    raw_switch(fiber->context, launch.scheduler);
    arrived_in_fiber(launch, fiber);
}

Launch& this_launch() {
    if (!g_launch || !g_launch->running) {
        std::fprintf(stderr,
                     "rnnkernels emulator: a CUDA device function was called outside a "
                     "kernel launch\n");
        std::abort();
    }
    return *g_launch;
}

std::string format(const char* pattern, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* pattern, ...) {
    char buffer[1024];
    va_list list;
    va_start(list, pattern);
    std::vsnprintf(buffer, sizeof buffer, pattern, list);
    va_end(list);
    return buffer;
}

std::string thread_name(const Fiber* fiber) {
    const Block* block = fiber->block;
    return format("thread (%u,%u,%u) of block (%u,%u,%u)", fiber->index[0], fiber->index[1],
                  fiber->index[2], block->index[0], block->index[1], block->index[2]);
}

// Ends the launch with an error, from inside a fiber. The fiber is never resumed.
[[noreturn]] void fail(Launch& launch, const std::string& message) {
    if (launch.error.empty()) launch.error = message;
    Fiber* fiber = launch.running;
    switch_to_scheduler(launch, fiber);
    std::abort();
}

const char* op_name(WarpOp op) {
    switch (op) {
        case warp_sync: return "__syncwarp";
        case warp_shfl: return "__shfl_sync";
        case warp_shfl_up: return "__shfl_up_sync";
        case warp_shfl_down: return "__shfl_down_sync";
        case warp_shfl_xor: return "__shfl_xor_sync";
        case warp_ballot: return "__ballot_sync";
        case warp_all: return "__all_sync";
        case warp_any: return "__any_sync";
        case warp_uni: return "__uni_sync";
        case warp_match_any: return "__match_any_sync";
        case warp_reduce_add: return "__reduce_add_sync";
        case warp_reduce_umin:
        case warp_reduce_imin: return "__reduce_min_sync";
        case warp_reduce_umax:
        case warp_reduce_imax: return "__reduce_max_sync";
        case warp_reduce_and: return "__reduce_and_sync";
        case warp_reduce_or: return "__reduce_or_sync";
        case warp_reduce_xor: return "__reduce_xor_sync";
    }
    return "warp operation";
}

const char* barrier_name(BarrierKind kind) {
    switch (kind) {
        case barrier_plain: return "__syncthreads()";
        case barrier_count: return "__syncthreads_count()";
        case barrier_and: return "__syncthreads_and()";
        case barrier_or: return "__syncthreads_or()";
    }
    return "__syncthreads()";
}

std::string wait_description(const Fiber* fiber) {
    switch (fiber->state) {
        case State::runnable: return "runnable";
        case State::done: return "exited";
        case State::barrier:
            return format("waiting at %s (%s:%d)", barrier_name(fiber->barrier_kind), fiber->file,
                          fiber->line);
        case State::warp:
            return format("waiting at %s(mask=0x%08x) (%s:%d)", op_name(fiber->op), fiber->mask,
                          fiber->file, fiber->line);
        case State::grid:
            return format("waiting at grid sync (%s:%d)", fiber->file, fiber->line);
    }
    return "";
}

void progress(Launch& launch) { launch.idle_yields = 0; }

void make_runnable(Fiber* fiber) {
    fiber->state = State::runnable;
    fiber->block->runnable.push_back(fiber);
}

// Lanes of the warp starting at `first` that exist (a partial last warp has fewer).
unsigned present_lanes(const Launch& launch, unsigned first) {
    unsigned count = std::min(32u, launch.thread_count - first);
    return count == 32 ? 0xffffffffu : ((1u << count) - 1u);
}

// ---------------------------------------------------------------------------------
// Block barrier
// ---------------------------------------------------------------------------------
void release_barrier(Launch& launch, Block* block) {
    const Fiber* first = nullptr;
    int count = 0;
    int total = 0;
    for (unsigned t = 0; t < launch.thread_count; ++t) {
        const Fiber* fiber = &block->fibers[t];
        if (fiber->state != State::barrier) continue;
        if (!first) {
            first = fiber;
        } else if (fiber->line != first->line || std::strcmp(fiber->file, first->file) != 0 ||
                   fiber->barrier_kind != first->barrier_kind) {
            fail(launch, format("threads of block (%u,%u,%u) met at different barriers: %s (%s) "
                                "and %s (%s); CUDA leaves this undefined (a barrier in "
                                "divergent code?)",
                                block->index[0], block->index[1], block->index[2],
                                thread_name(first).c_str(), wait_description(first).c_str(),
                                thread_name(fiber).c_str(), wait_description(fiber).c_str()));
        }
        total += 1;
        count += fiber->predicate != 0;
    }
    for (unsigned t = 0; t < launch.thread_count; ++t) {
        Fiber* fiber = &block->fibers[t];
        if (fiber->state != State::barrier) continue;
        switch (fiber->barrier_kind) {
            case barrier_plain: fiber->barrier_result = 0; break;
            case barrier_count: fiber->barrier_result = count; break;
            case barrier_and: fiber->barrier_result = count == total; break;
            case barrier_or: fiber->barrier_result = count != 0; break;
        }
        make_runnable(fiber);
    }
    block->arrived = 0;
    progress(launch);
}

// ---------------------------------------------------------------------------------
// Warp exchange
// ---------------------------------------------------------------------------------
unsigned long long lane_value(Launch& launch, Fiber* warp, unsigned lane, unsigned source,
                              unsigned participants, unsigned present) {
    if (source == lane) return warp[lane].value;
    if (!((present >> source) & 1u)) return ~0ull;  // beyond a partial warp: poison
    if (!((participants >> source) & 1u)) {
        fail(launch, format("%s: %s reads lane %u, which is not in the mask 0x%08x (%s:%d)",
                            op_name(warp[lane].op), thread_name(&warp[lane]).c_str(), source,
                            warp[lane].mask, warp[lane].file, warp[lane].line));
    }
    return warp[source].value;
}

void complete_warp_exchange(Launch& launch, Fiber* warp, unsigned participants,
                            unsigned present) {
    const WarpOp op = warp[__builtin_ctz(participants)].op;
    unsigned ballot = 0;
    unsigned long long sum = 0, umin = ~0ull, umax = 0, all_and = ~0ull, all_or = 0,
                       all_xor = 0;
    long long imin = INT32_MAX, imax = INT32_MIN;
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (!((participants >> lane) & 1u)) continue;
        const unsigned long long v = warp[lane].value;
        if (v) ballot |= 1u << lane;
        sum += v;
        umin = std::min(umin, v);
        umax = std::max(umax, v);
        imin = std::min<long long>(imin, int(unsigned(v)));
        imax = std::max<long long>(imax, int(unsigned(v)));
        all_and &= v;
        all_or |= v;
        all_xor ^= v;
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (!((participants >> lane) & 1u)) continue;
        Fiber& fiber = warp[lane];
        const unsigned width = unsigned(fiber.width);
        const unsigned segment = lane & ~(width - 1u);
        unsigned source = lane;
        switch (op) {
            case warp_sync: fiber.result = 0; break;
            case warp_shfl:
                source = segment + (unsigned(fiber.argument) & (width - 1u));
                fiber.result = lane_value(launch, warp, lane, source, participants, present);
                break;
            case warp_shfl_up: {
                const unsigned delta = unsigned(fiber.argument);
                source = (lane - segment) >= delta ? lane - delta : lane;
                fiber.result = lane_value(launch, warp, lane, source, participants, present);
                break;
            }
            case warp_shfl_down: {
                const unsigned delta = unsigned(fiber.argument);
                source = (lane - segment) + delta < width ? lane + delta : lane;
                fiber.result = lane_value(launch, warp, lane, source, participants, present);
                break;
            }
            case warp_shfl_xor:
                source = lane ^ unsigned(fiber.argument);
                if (source >= segment + width) source = lane;  // later groups: own value
                fiber.result = lane_value(launch, warp, lane, source, participants, present);
                break;
            case warp_ballot: fiber.result = ballot; break;
            case warp_all: fiber.result = ballot == participants; break;
            case warp_any: fiber.result = ballot != 0; break;
            case warp_uni: fiber.result = ballot == 0 || ballot == participants; break;
            case warp_match_any: {
                unsigned same = 0;
                for (unsigned other = 0; other < 32; ++other) {
                    if (((participants >> other) & 1u) && warp[other].value == fiber.value)
                        same |= 1u << other;
                }
                fiber.result = same;
                break;
            }
            case warp_reduce_add: fiber.result = unsigned(sum); break;
            case warp_reduce_umin: fiber.result = umin; break;
            case warp_reduce_umax: fiber.result = umax; break;
            case warp_reduce_imin: fiber.result = (unsigned long long)(unsigned)int(imin); break;
            case warp_reduce_imax: fiber.result = (unsigned long long)(unsigned)int(imax); break;
            case warp_reduce_and: fiber.result = all_and; break;
            case warp_reduce_or: fiber.result = all_or; break;
            case warp_reduce_xor: fiber.result = all_xor; break;
        }
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
        if ((participants >> lane) & 1u) make_runnable(&warp[lane]);
    }
    progress(launch);
}

// ---------------------------------------------------------------------------------
// The fiber body and thread exit
// ---------------------------------------------------------------------------------
void thread_exit(Launch& launch, Fiber* fiber) {
    Block* block = fiber->block;
    fiber->state = State::done;
    block->live -= 1;
    progress(launch);
    // Lanes of the same warp that wait for this one in a warp exchange never complete.
    const unsigned first = fiber->linear & ~31u;
    const unsigned lane = fiber->linear & 31u;
    Fiber* warp = &block->fibers[first];
    const unsigned present = present_lanes(launch, first);
    for (unsigned other = 0; other < 32; ++other) {
        if (!((present >> other) & 1u)) continue;
        const Fiber& waiting = warp[other];
        if (waiting.state == State::warp && ((waiting.mask >> lane) & 1u)) {
            fail(launch, format("%s exited while %s, %s, named it in its mask; on a GPU "
                                "this is undefined behaviour",
                                thread_name(fiber).c_str(), thread_name(&waiting).c_str(),
                                wait_description(&waiting).c_str()));
        }
    }
    if (block->arrived > 0 && block->arrived == block->live) release_barrier(launch, block);
    switch_to_scheduler(launch, fiber);
}

void fiber_main(void* argument) {
    Fiber* fiber = static_cast<Fiber*>(argument);
    arrived_in_fiber(*g_launch, fiber);
    for (;;) {
        Launch& launch = *g_launch;
        bool threw = false;
        try {
            launch.kernel->invoke(launch.kernel->kernel, launch.args);
        } catch (...) {
            threw = true;  // fail() below, once the handler has freed the exception
        }
        if (threw) fail(launch, "a C++ exception escaped the kernel in " + thread_name(fiber));
        thread_exit(launch, fiber);  // returns when the fiber is given another block
    }
}

// ---------------------------------------------------------------------------------
// The scheduler
// ---------------------------------------------------------------------------------
void set_block_globals(Launch& launch, Block* block) {
    for (int d = 0; d < 3; ++d) current_block_index[d] = block->index[d];
    launch.current = block;
}

// Makes `block`'s static shared memory the content of the section.
void load_static_shared(Launch& launch, Block* block) {
    if (launch.loaded == block) return;
    const size_t size = static_shared_size();
    if (launch.loaded && launch.cooperative) {
        std::memcpy(launch.loaded->saved_static.data(), __rnnemu_shared_begin, size);
    }
    if (block->static_initialised) {
        std::memcpy(__rnnemu_shared_begin, block->saved_static.data(), size);
    } else {
        poison(__rnnemu_shared_begin, size);
        block->static_initialised = true;
    }
    launch.loaded = block;
}

Fiber* pick(Launch& launch) {
    Block* block = launch.current;
    if (launch.hop || !block || block->runnable.empty()) {
        launch.hop = false;
        size_t candidates = 0;
        for (Block& b : launch.blocks) candidates += !b.runnable.empty();
        if (candidates == 0) return nullptr;
        size_t choice = launch.rng.below(candidates);
        for (Block& b : launch.blocks) {
            if (b.runnable.empty()) continue;
            if (choice-- == 0) {
                block = &b;
                break;
            }
        }
    }
    std::vector<Fiber*>& runnable = block->runnable;
    const size_t i = launch.rng.below(runnable.size());
    Fiber* fiber = runnable[i];
    runnable[i] = runnable.back();
    runnable.pop_back();
    return fiber;
}

std::string deadlock_report(Launch& launch) {
    for (Block& block : launch.blocks) {
        bool stuck = false;
        for (unsigned t = 0; t < launch.thread_count; ++t) {
            State s = block.fibers[t].state;
            stuck |= s == State::barrier || s == State::warp;
        }
        if (!stuck) continue;
        std::string report = format(
            "deadlock: no thread of block (%u,%u,%u) can continue (block size (%u,%u,%u)):",
            block.index[0], block.index[1], block.index[2], launch.block[0], launch.block[1],
            launch.block[2]);
        // Group the threads by what they do, in order of first appearance.
        std::vector<std::pair<std::string, unsigned>> groups;
        std::vector<const Fiber*> examples;
        for (unsigned t = 0; t < launch.thread_count; ++t) {
            const Fiber* fiber = &block.fibers[t];
            std::string what = wait_description(fiber);
            auto it = std::find_if(groups.begin(), groups.end(),
                                   [&](const auto& g) { return g.first == what; });
            if (it == groups.end()) {
                groups.emplace_back(what, 1u);
                examples.push_back(fiber);
            } else {
                it->second += 1;
            }
        }
        for (size_t g = 0; g < groups.size(); ++g) {
            report += format("\n  %u thread(s) %s, e.g. thread (%u,%u,%u)", groups[g].second,
                             groups[g].first.c_str(), examples[g]->index[0],
                             examples[g]->index[1], examples[g]->index[2]);
        }
        // Name one missing partner of a warp exchange.
        for (unsigned t = 0; t < launch.thread_count; ++t) {
            const Fiber* fiber = &block.fibers[t];
            if (fiber->state != State::warp) continue;
            const unsigned first = t & ~31u;
            const unsigned present = present_lanes(launch, first);
            for (unsigned lane = 0; lane < 32; ++lane) {
                if (!(((fiber->mask & present) >> lane) & 1u)) continue;
                const Fiber* other = &block.fibers[first + lane];
                if (other->state != State::warp || other->mask != fiber->mask) {
                    report += format("\n  e.g. thread (%u,%u,%u), %s, needs lane %u, "
                                     "thread (%u,%u,%u), which is %s",
                                     fiber->index[0], fiber->index[1], fiber->index[2],
                                     wait_description(fiber).c_str(), lane, other->index[0],
                                     other->index[1], other->index[2],
                                     wait_description(other).c_str());
                    return report;
                }
            }
        }
        return report;
    }
    return "deadlock";
}

// Nothing can run. Returns true to continue (a grid sync completed), false to stop:
// the launch finished, or launch.error says why not.
bool on_quiescent(Launch& launch) {
    bool waiting = false, grid = false, all_done = true;
    for (const Fiber& fiber : launch.fibers) {
        if (fiber.block == nullptr) continue;
        waiting |= fiber.state == State::barrier || fiber.state == State::warp;
        grid |= fiber.state == State::grid;
        all_done &= fiber.state == State::done;
    }
    if (waiting) {
        launch.error = deadlock_report(launch);
        return false;
    }
    if (all_done) return false;
    if (grid) {
        for (const Block& block : launch.blocks) {
            if (block.live == 0) {
                const Fiber* example = nullptr;
                for (const Fiber& fiber : launch.fibers)
                    if (fiber.state == State::grid) example = example ? example : &fiber;
                launch.error = format(
                    "deadlock: block (%u,%u,%u) exited without reaching the grid sync at "
                    "which %s waits (%s:%d)",
                    block.index[0], block.index[1], block.index[2],
                    thread_name(example).c_str(), example->file, example->line);
                return false;
            }
        }
        memory_grid_sync(launch);
        for (Fiber& fiber : launch.fibers) {
            if (fiber.state == State::grid) make_runnable(&fiber);
        }
        progress(launch);
        return true;
    }
    return false;
}

void run_scheduler(Launch& launch) {
    for (;;) {
        if (!launch.error.empty()) return;
        Fiber* fiber = pick(launch);
        if (!fiber) {
            if (!on_quiescent(launch)) return;
            continue;
        }
        if (fiber->block != launch.current) set_block_globals(launch, fiber->block);
        load_static_shared(launch, fiber->block);
        memory_load_view(launch, fiber->block);
        for (int d = 0; d < 3; ++d) current_thread_index[d] = fiber->index[d];
        launch.running = fiber;
        switch_to_fiber(launch, fiber);
        launch.running = nullptr;
    }
}

// Gives the threads of `block` to fibers[first ...] and makes them all runnable.
void start_block(Launch& launch, Block& block, Fiber* fibers) {
    block.fibers = fibers;
    block.live = launch.thread_count;
    block.arrived = 0;
    block.runnable.clear();
    block.static_initialised = false;
    poison(block.dynamic_shared, launch.shared_bytes);
    unsigned t = 0;
    for (unsigned z = 0; z < launch.block[2]; ++z) {
        for (unsigned y = 0; y < launch.block[1]; ++y) {
            for (unsigned x = 0; x < launch.block[0]; ++x, ++t) {
                Fiber& fiber = fibers[t];
                fiber.block = &block;
                fiber.index[0] = x;
                fiber.index[1] = y;
                fiber.index[2] = z;
                fiber.linear = t;
                make_runnable(&fiber);
            }
        }
    }
    // make_runnable pushed in order; the scheduler draws at random anyway.
}

unsigned char* allocate_dynamic_shared(size_t bytes) {
    void* data = nullptr;
    // Exactly `bytes` (plus nothing) so that AddressSanitizer sees an overrun.
    if (posix_memalign(&data, 128, bytes ? bytes : 1) != 0) return nullptr;
    return static_cast<unsigned char*>(data);
}

std::string type_name(char code, unsigned size) {
    switch (code) {
        case 'p': return "pointer";
        case 'b': return "bool";
        case 'i': return "int" + std::to_string(8 * size);
        case 'u': return "uint" + std::to_string(8 * size);
        case 'f': return "float" + std::to_string(8 * size);
        default: return "a by-value type of " + std::to_string(size) + " bytes";
    }
}

std::string check_arguments(const KernelInfo* kernel, int arg_count, const char* codes,
                            const unsigned* sizes) {
    if (arg_count != kernel->param_count) {
        return format("kernel %s takes %d argument(s), got %d", kernel->name,
                      kernel->param_count, arg_count);
    }
    for (int i = 0; i < arg_count; ++i) {
        const char want = kernel->param_codes[i];
        const unsigned want_size = kernel->param_sizes[i];
        if (want == '?') {
            return format("kernel %s: parameter %d is %s, which the emulator cannot pass from "
                          "Python (only pointers and scalars)",
                          kernel->name, i, type_name(want, want_size).c_str());
        }
        // Signedness may differ (the bits are the same); kind and size may not.
        const bool integer_pair = (want == 'i' || want == 'u') &&
                                  (codes[i] == 'i' || codes[i] == 'u');
        if ((want != codes[i] && !integer_pair) || want_size != sizes[i]) {
            return format("kernel %s: argument %d is %s, but the parameter is %s", kernel->name,
                          i, type_name(codes[i], sizes[i]).c_str(),
                          type_name(want, want_size).c_str());
        }
    }
    return "";
}

std::string check_configuration(const unsigned* grid, const unsigned* block, size_t shared,
                                bool cooperative) {
    const unsigned long long threads = 1ull * block[0] * block[1] * block[2];
    if (!grid[0] || !grid[1] || !grid[2] || !block[0] || !block[1] || !block[2])
        return "invalid launch configuration: grid and block dimensions must be >= 1";
    if (block[0] > 1024 || block[1] > 1024 || block[2] > 64 || threads > kMaxBlockThreads)
        return format("invalid launch configuration: block (%u,%u,%u) exceeds (1024,1024,64) or "
                      "1024 threads",
                      block[0], block[1], block[2]);
    if (grid[0] > 2147483647u || grid[1] > 65535u || grid[2] > 65535u)
        return format("invalid launch configuration: grid (%u,%u,%u) exceeds "
                      "(2147483647,65535,65535)",
                      grid[0], grid[1], grid[2]);
    if (shared > kMaxSharedBytes)
        return format("invalid launch configuration: %zu bytes of dynamic shared memory, more "
                      "than the %llu any GPU allows",
                      shared, kMaxSharedBytes);
    const unsigned long long blocks = 1ull * grid[0] * grid[1] * grid[2];
    if (cooperative && blocks * threads > kMaxCooperativeThreads)
        return format("cooperative launch of %llu threads: the emulator runs at most %llu "
                      "threads at once",
                      blocks * threads, kMaxCooperativeThreads);
    return "";
}

unsigned long long spin_limit() {
    unsigned long long limit = 1ull << 22;
    if (const char* text = std::getenv("RNNKERNELS_EMULATOR_SPIN_LIMIT")) {
        unsigned long long value = std::strtoull(text, nullptr, 10);
        if (value) limit = value;
    }
    return limit;
}

// Denormals, as on the GPU under our compile options. CuPy compiles every kernel with
// -ftz=true, so the GPU's float32 arithmetic flushes denormal inputs and results to zero
// (sign kept). A launch does the same by default: it sets MXCSR's FTZ (results) and DAZ
// (inputs) bits for its duration and restores the caller's MXCSR after. Every fiber
// inherits them: a fiber's context is made from the running MXCSR when its block starts,
// and each stack switch saves and restores MXCSR. MXCSR also governs SSE double, which
// -ftz=true leaves alone: float64 denormals (below ~2.2e-308) flush here, not on a GPU.
// RNNKERNELS_EMULATOR_DENORMALS=keep turns this off (IEEE denormals, nvcc's default).
struct DenormalMode {
    std::string error;  // non-empty: the launch must not run
#if defined(__x86_64__) || defined(__i386__)
    unsigned int saved = _mm_getcsr();
    bool changed = false;
#endif
    DenormalMode() {
        const char* text = std::getenv("RNNKERNELS_EMULATOR_DENORMALS");
        const std::string mode = text ? text : "";
        if (mode == "keep") return;
        if (!mode.empty() && mode != "flush") {
            error = "RNNKERNELS_EMULATOR_DENORMALS=" + mode + ": expected flush (the default) or keep";
            return;
        }
#if defined(__x86_64__) || defined(__i386__)
        _mm_setcsr(saved | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
        changed = true;
#else
        error = "flushing denormals like the GPU is implemented for x86 only; set "
                "RNNKERNELS_EMULATOR_DENORMALS=keep to run with IEEE denormals";
#endif
    }
    ~DenormalMode() {
#if defined(__x86_64__) || defined(__i386__)
        if (changed) _mm_setcsr(saved);
#endif
    }
    DenormalMode(const DenormalMode&) = delete;
    DenormalMode& operator=(const DenormalMode&) = delete;
};

void init_fibers(Launch& launch, size_t count) {
    launch.fibers.resize(count);
    for (size_t i = 0; i < count; ++i) {
        Fiber& fiber = launch.fibers[i];
        fiber.stack = g_stacks[i];
#if RNNEMU_ASAN
        // Frames left behind by an earlier launch that ended in an error.
        ASAN_UNPOISON_MEMORY_REGION(fiber.stack.low, fiber.stack.size);
#endif
        init_context(fiber.context, fiber.stack.low, fiber.stack.size, &fiber_main, &fiber);
    }
}

std::string run_launch(Launch& launch, MemoryRequest& memory_request) {
    const unsigned long long block_count = 1ull * launch.grid[0] * launch.grid[1] * launch.grid[2];
    std::string error;
    const size_t fiber_count = launch.cooperative ? size_t(block_count) * launch.thread_count
                                                  : launch.thread_count;
    if (!ensure_stacks(fiber_count, error)) return error;
    init_fibers(launch, fiber_count);
    const size_t static_size = static_shared_size();

    if (launch.cooperative) {
        launch.blocks.resize(size_t(block_count));
        memory_begin(launch, memory_request);
        size_t b = 0;
        for (unsigned z = 0; z < launch.grid[2]; ++z)
            for (unsigned y = 0; y < launch.grid[1]; ++y)
                for (unsigned x = 0; x < launch.grid[0]; ++x, ++b) {
                    Block& block = launch.blocks[b];
                    block.index[0] = x;
                    block.index[1] = y;
                    block.index[2] = z;
                    block.dynamic_shared = allocate_dynamic_shared(launch.shared_bytes);
                    block.saved_static.assign(static_size, kPoison);
                    block.linear = b;
                    start_block(launch, block, &launch.fibers[b * launch.thread_count]);
                    memory_start_block(launch, block);
                }
        run_scheduler(launch);
        return launch.error;
    }

    // Normal launch: one block after another, in a seeded random order.
    std::vector<unsigned long long> sequence(static_cast<size_t>(block_count));
    for (size_t i = 0; i < sequence.size(); ++i) sequence[i] = i;
    for (size_t i = sequence.size(); i > 1; --i) {
        std::swap(sequence[i - 1], sequence[launch.rng.below(i)]);
    }
    launch.blocks.resize(1);
    memory_begin(launch, memory_request);
    Block& block = launch.blocks[0];
    block.dynamic_shared = allocate_dynamic_shared(launch.shared_bytes);
    for (unsigned long long linear : sequence) {
        block.index[0] = unsigned(linear % launch.grid[0]);
        block.index[1] = unsigned((linear / launch.grid[0]) % launch.grid[1]);
        block.index[2] = unsigned(linear / (1ull * launch.grid[0] * launch.grid[1]));
        block.linear = linear;
        start_block(launch, block, launch.fibers.data());
        memory_start_block(launch, block);
        launch.loaded = nullptr;
        launch.current = nullptr;
        run_scheduler(launch);
        memory_end_block(launch, block);
        if (!launch.error.empty()) break;
    }
    return launch.error;
}

}  // namespace

// ---------------------------------------------------------------------------------
// Functions the shim calls from inside a kernel
// ---------------------------------------------------------------------------------
int block_barrier(BarrierKind kind, int predicate, const char* file, int line) {
    Launch& launch = this_launch();
    Fiber* fiber = launch.running;
    Block* block = fiber->block;
    fiber->state = State::barrier;
    fiber->barrier_kind = kind;
    fiber->predicate = predicate;
    fiber->file = file;
    fiber->line = line;
    block->arrived += 1;
    if (block->arrived == block->live) release_barrier(launch, block);
    switch_to_scheduler(launch, fiber);
    return fiber->barrier_result;
}

unsigned long long warp_exchange(WarpOp op, unsigned int mask, unsigned long long value,
                                 int argument, int width, const char* file, int line) {
    Launch& launch = this_launch();
    Fiber* fiber = launch.running;
    const unsigned lane = fiber->linear & 31u;
    const unsigned first = fiber->linear & ~31u;
    Fiber* warp = &fiber->block->fibers[first];
    if (!((mask >> lane) & 1u)) {
        fail(launch, format("%s(mask=0x%08x) in %s: the mask does not name the calling lane %u "
                            "(%s:%d)",
                            op_name(op), mask, thread_name(fiber).c_str(), lane, file, line));
    }
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
        fail(launch, format("%s: width %d is not a power of two in [1, 32] (%s:%d)", op_name(op),
                            width, file, line));
    }
    const unsigned present = present_lanes(launch, first);
    const unsigned participants = mask & present;
    for (unsigned other = 0; other < 32; ++other) {
        if (((participants >> other) & 1u) && warp[other].state == State::done) {
            fail(launch, format("%s(mask=0x%08x) in %s names lane %u, which has exited (%s:%d)",
                                op_name(op), mask, thread_name(fiber).c_str(), other, file,
                                line));
        }
    }
    fiber->state = State::warp;
    fiber->op = op;
    fiber->mask = mask;
    fiber->value = value;
    fiber->argument = argument;
    fiber->width = width;
    fiber->file = file;
    fiber->line = line;
    bool complete = true;
    for (unsigned other = 0; other < 32 && complete; ++other) {
        if (!((participants >> other) & 1u) || other == lane) continue;
        const Fiber& partner = warp[other];
        if (partner.state != State::warp || partner.mask != mask) {
            complete = false;
        } else if (partner.op != op) {
            fail(launch, format("lanes of one warp meet with mask 0x%08x at different "
                                "operations: %s (%s) and %s (%s)",
                                mask, thread_name(&partner).c_str(),
                                wait_description(&partner).c_str(), thread_name(fiber).c_str(),
                                wait_description(fiber).c_str()));
        }
    }
    if (complete) complete_warp_exchange(launch, warp, participants, present);
    switch_to_scheduler(launch, fiber);
    return fiber->result;
}

void grid_sync(const char* file, int line) {
    Launch& launch = this_launch();
    Fiber* fiber = launch.running;
    if (!launch.cooperative) {
        fail(launch, format("grid sync (%s:%d) in a launch that is not cooperative; launch with "
                            "cooperative=True",
                            file, line));
    }
    fiber->state = State::grid;
    fiber->file = file;
    fiber->line = line;
    switch_to_scheduler(launch, fiber);
}

bool launch_is_cooperative() { return this_launch().cooperative; }

void yield_point() {
    Launch* launch = g_launch;
    if (!launch || !launch->running) return;
    Fiber* fiber = launch->running;
    if (++launch->idle_yields > launch->spin_limit) {
        fail(*launch,
             format("livelock: %llu atomics/fences in a row changed no memory, and no thread "
                    "passed a barrier or exited; last in %s. A spin-wait for a block that "
                    "cannot run (normal launches run blocks one after another)? "
                    "RNNKERNELS_EMULATOR_SPIN_LIMIT raises the limit",
                    launch->idle_yields, thread_name(fiber).c_str()));
    }
    fiber->block->runnable.push_back(fiber);
    launch->hop = launch->cooperative;
    switch_to_scheduler(*launch, fiber);
}

void note_progress() {
    if (g_launch) progress(*g_launch);
}

void* dynamic_shared_memory() { return this_launch().current->dynamic_shared; }

unsigned int lane_id() { return this_launch().running->linear & 31u; }

unsigned int live_lanes() {
    Launch& launch = this_launch();
    const unsigned first = launch.running->linear & ~31u;
    const unsigned present = present_lanes(launch, first);
    unsigned live = 0;
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (((present >> lane) & 1u) &&
            launch.running->block->fibers[first + lane].state != State::done)
            live |= 1u << lane;
    }
    return live;
}

long long clock_ticks() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

void kernel_trap(const char* what, const char* file, int line) {
    Launch& launch = this_launch();
    fail(launch, format("%s called %s (%s:%d)", thread_name(launch.running).c_str(), what, file,
                        line));
}

// Stale memory model hooks (the shim calls them only while stale_memory_active).
void publish_writes() {
    Launch& launch = this_launch();
    StaleMemory& memory = launch.memory;
    if (!memory.enabled) return;
    Block* block = launch.running->block;
    publish_block(memory, block);
    std::memcpy(block->seen, memory.l2, memory.total);
}

void refresh_l2_reads() {
    Launch& launch = this_launch();
    StaleMemory& memory = launch.memory;
    if (memory.enabled) std::memcpy(launch.running->block->seen, memory.l2, memory.total);
}

void load_bypassing_l1(void* out, const void* address, size_t bytes, bool latest) {
    Launch& launch = this_launch();
    const StaleMemory& memory = launch.memory;
    const GlobalRegion* region = memory.enabled ? find_region(memory, address, bytes) : nullptr;
    if (!region) {
        std::memcpy(out, address, bytes);
        return;
    }
    const Block* block = launch.running->block;
    const unsigned char* view = static_cast<const unsigned char*>(address);
    const size_t offset = region->offset + size_t(view - region->host);
    const unsigned char* base = block->base + offset;
    const unsigned char* source = (latest ? memory.l2 : block->seen) + offset;
    unsigned char* result = static_cast<unsigned char*>(out);
    for (size_t i = 0; i < bytes; ++i) result[i] = view[i] != base[i] ? view[i] : source[i];
}

void* atomic_address(void* address, size_t bytes) {
    Launch& launch = this_launch();
    const StaleMemory& memory = launch.memory;
    const GlobalRegion* region = memory.enabled ? find_region(memory, address, bytes) : nullptr;
    if (!region) return address;
    return memory.l2 + region->offset + size_t(static_cast<unsigned char*>(address) - region->host);
}

void atomic_done(void* address, size_t bytes) {
    Launch& launch = this_launch();
    const StaleMemory& memory = launch.memory;
    const GlobalRegion* region = memory.enabled ? find_region(memory, address, bytes) : nullptr;
    if (!region) return;
    Block* block = launch.running->block;
    const size_t offset =
        region->offset + size_t(static_cast<unsigned char*>(address) - region->host);
    std::memcpy(address, memory.l2 + offset, bytes);
    std::memcpy(block->base + offset, memory.l2 + offset, bytes);
    std::memcpy(block->seen + offset, memory.l2 + offset, bytes);
}

}  // namespace rnnemu

// ---------------------------------------------------------------------------------
// Entry points for Python (ctypes)
// ---------------------------------------------------------------------------------
// Runs one launch. Returns 0, or 1 with a message in `error`.
RNNEMU_EXPORT int rnnemu_launch(const rnnemu::KernelInfo* kernel, const unsigned* grid,
                                const unsigned* block, unsigned long long shared_bytes,
                                int cooperative, unsigned long long seed, int arg_count,
                                void** args, const char* arg_codes, const unsigned* arg_sizes,
                                char* error, unsigned long error_size) {
    using namespace rnnemu;
    MemoryRequest memory_request = std::move(g_memory_request);  // for this launch only
    g_memory_request = MemoryRequest();
    std::string message = check_arguments(kernel, arg_count, arg_codes, arg_sizes);
    if (message.empty()) message = check_configuration(grid, block, shared_bytes, cooperative);
    if (message.empty()) {
        std::lock_guard<std::mutex> lock(g_launch_mutex);
        Launch launch;
        launch.kernel = kernel;
        launch.args = args;
        for (int d = 0; d < 3; ++d) {
            launch.grid[d] = grid[d];
            launch.block[d] = block[d];
            current_block_dim[d] = block[d];
            current_grid_dim[d] = grid[d];
        }
        launch.thread_count = block[0] * block[1] * block[2];
        launch.shared_bytes = size_t(shared_bytes);
        launch.cooperative = cooperative != 0;
        launch.rng.state = seed;
        launch.spin_limit = spin_limit();
        g_launch = &launch;
        {
            DenormalMode denormals;  // FTZ|DAZ while the launch runs, then the caller's MXCSR
            if (!denormals.error.empty()) {
                message = denormals.error;
            } else {
                try {
                    message = run_launch(launch, memory_request);
                } catch (const std::bad_alloc&) {  // thrown before any fiber runs
                    message = "out of memory for the stale memory model's copies of the arrays";
                }
            }
        }
        memory_end(launch);
        g_launch = nullptr;
        for (Block& b : launch.blocks) std::free(b.dynamic_shared);
    }
    if (message.empty()) return 0;
    std::snprintf(error, error_size, "%s", message.c_str());
    return 1;
}

// The memory model of the NEXT rnnemu_launch only: stale != 0 gives the `count`
// allocations [addresses[i], addresses[i] + sizes[i]) a GPU's weak ordering (see
// "Global memory views"); overlapping ones are merged. The caller makes the two calls
// back to back under one lock (rnnkernels/emulator/__init__.py).
RNNEMU_EXPORT void rnnemu_set_memory_model(int stale, int count,
                                           const unsigned long long* addresses,
                                           const unsigned long long* sizes) {
    rnnemu::MemoryRequest request;
    request.stale = stale != 0;
    for (int i = 0; i < count; ++i) {
        request.regions.emplace_back(reinterpret_cast<unsigned char*>(uintptr_t(addresses[i])),
                                     size_t(sizes[i]));
    }
    rnnemu::g_memory_request = std::move(request);
}

// How often the last launch put a block's view of the tracked arrays into host memory
// (a block switch in a cooperative launch, a block start in a normal one): its cost,
// and 0 when the launch ran sequentially consistent.
RNNEMU_EXPORT unsigned long long rnnemu_view_switches() { return rnnemu::g_view_switches; }

// Bytes of static shared memory in this module (all kernels together).
RNNEMU_EXPORT unsigned long long rnnemu_static_shared_bytes() {
    return rnnemu::static_shared_size();
}
