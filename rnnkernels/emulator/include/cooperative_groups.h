// cooperative_groups.h for the rnnkernels CPU emulator: the subset of CUDA's
// cooperative groups that maps onto the shim. this_grid().sync() is a grid-wide
// barrier and needs a cooperative launch (cooperative=True); tiles are warp slices.
#pragma once

#include "cuda_emulator.h"

namespace cooperative_groups {

class thread_block {
  public:
    void sync(RNNEMU_WHERE) const { ::rnnemu::fenced_barrier(::rnnemu::barrier_plain, 0, RNNEMU_AT); }
    unsigned int thread_rank() const {
        return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    }
    unsigned int size() const { return blockDim.x * blockDim.y * blockDim.z; }
    unsigned int num_threads() const { return size(); }
    dim3 group_index() const { return dim3(blockIdx); }
    dim3 thread_index() const { return dim3(threadIdx); }
    dim3 group_dim() const { return blockDim; }
    dim3 dim_threads() const { return blockDim; }
};

class grid_group {
  public:
    void sync(RNNEMU_WHERE) const {
        RNNEMU_FENCE();
        ::rnnemu::grid_sync(RNNEMU_AT);
        RNNEMU_FENCE();
    }
    bool is_valid() const { return ::rnnemu::launch_is_cooperative(); }
    unsigned long long thread_rank() const {
        const unsigned long long block =
            (1ull * blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
        return block * (1ull * blockDim.x * blockDim.y * blockDim.z) + thread_block().thread_rank();
    }
    unsigned long long size() const {
        return 1ull * gridDim.x * gridDim.y * gridDim.z * blockDim.x * blockDim.y * blockDim.z;
    }
    unsigned long long num_threads() const { return size(); }
    unsigned long long block_rank() const {
        return (1ull * blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    }
    unsigned long long num_blocks() const { return 1ull * gridDim.x * gridDim.y * gridDim.z; }
    dim3 group_dim() const { return gridDim; }
    dim3 dim_blocks() const { return gridDim; }
    dim3 block_index() const { return dim3(blockIdx); }
};

inline thread_block this_thread_block() { return thread_block(); }
inline grid_group this_grid() { return grid_group(); }

// A tile of Size consecutive threads (Size a power of two, at most 32) of a block.
template <unsigned int Size>
class thread_block_tile {
    static_assert(Size >= 1 && Size <= 32 && (Size & (Size - 1)) == 0,
                  "tile size must be a power of two <= 32");

    static unsigned int mask() {
        const unsigned int lane = ::rnnemu::lane_id();
        const unsigned int ones = Size == 32 ? 0xffffffffu : ((1u << Size) - 1u);
        return ones << (lane & ~(Size - 1u));
    }

  public:
    void sync(RNNEMU_WHERE) const { __syncwarp(mask(), RNNEMU_AT); }
    unsigned int thread_rank() const { return thread_block().thread_rank() & (Size - 1u); }
    static constexpr unsigned int size() { return Size; }
    static constexpr unsigned int num_threads() { return Size; }
    unsigned int meta_group_rank() const { return thread_block().thread_rank() / Size; }
    unsigned int meta_group_size() const {
        return (thread_block().size() + Size - 1u) / Size;
    }
    template <typename T>
    T shfl(T var, int src_rank, RNNEMU_WHERE) const {
        return __shfl_sync(mask(), var, src_rank, int(Size), RNNEMU_AT);
    }
    template <typename T>
    T shfl_up(T var, unsigned int delta, RNNEMU_WHERE) const {
        return __shfl_up_sync(mask(), var, delta, int(Size), RNNEMU_AT);
    }
    template <typename T>
    T shfl_down(T var, unsigned int delta, RNNEMU_WHERE) const {
        return __shfl_down_sync(mask(), var, delta, int(Size), RNNEMU_AT);
    }
    template <typename T>
    T shfl_xor(T var, unsigned int lane_mask, RNNEMU_WHERE) const {
        return __shfl_xor_sync(mask(), var, int(lane_mask), int(Size), RNNEMU_AT);
    }
    unsigned int ballot(int predicate, RNNEMU_WHERE) const {
        return __ballot_sync(mask(), predicate, RNNEMU_AT) >> (::rnnemu::lane_id() & ~(Size - 1u));
    }
    int any(int predicate, RNNEMU_WHERE) const { return __any_sync(mask(), predicate, RNNEMU_AT); }
    int all(int predicate, RNNEMU_WHERE) const { return __all_sync(mask(), predicate, RNNEMU_AT); }
};

template <unsigned int Size, typename Parent>
inline thread_block_tile<Size> tiled_partition(const Parent&) {
    return thread_block_tile<Size>();
}

template <typename Group>
inline void sync(const Group& group, RNNEMU_WHERE) {
    group.sync(RNNEMU_AT);
}

}  // namespace cooperative_groups
