// partial_index.cu: csrc/persistent.cuh's SharedLayout::partial_index written out for
// every (item, j, group, r, part) of one layout, for tests/test_shared_banks.py, which
// holds the Python mirror (rnnkernels/_shared_banks.py, swizzled_index) to the same
// words.
//
//   out  [items, ItemRows, groups, RowTile, KSplit]  int32, the partial's word index
// Launch: one block of one thread (a few thousand indices).
#include "persistent.cuh"

template <int ItemRows, bool GateItems>
__global__ void partial_indices(int* out, int items, int groups) {
    constexpr int RowTile = 4, KSplit = 8;
    const rnnkernels::persistent::SharedLayout<ItemRows, RowTile, KSplit, GateItems> layout(0, 4, groups * RowTile,
                                                                                           items, 0, 0);
    int* next = out;
    for (int item = 0; item < items; ++item)
        for (int j = 0; j < ItemRows; ++j)
            for (int group = 0; group < groups; ++group)
                for (int r = 0; r < RowTile; ++r)
                    for (int part = 0; part < KSplit; ++part) *next++ = layout.partial_index(item, j, group, r, part);
}
