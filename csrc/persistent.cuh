// persistent.cuh: the persistent, weight-stationary recurrences, written once for every
// cell: forward_recurrence and backward_recurrence (at the end) run the loops; each
// cell's kernels (lstm_*_persistent in lstm_forward.cu / lstm_backward.cu, gru_* and
// rnn_* likewise) are thin: they build the cell's policy (its gate count, carry, the
// inputs a pair reads, its pointwise math) and call one of them. The forward's items
// are the gate rows of one unit (LSTM, GRU) or four consecutive units (Elman); the
// backward's always four consecutive units.
//
// The idea. One cooperative launch runs all T steps. Block b owns a slice of the
// recurrent weights (the rows or columns of its hidden units) and keeps it in shared
// memory, as float32, for the whole sequence: W_hh is read from global memory once per
// launch instead of once per step. Per step every block needs the whole exchanged
// state of the previous step (h_{t-1} forward, dz_{t+1} backward), which every block
// wrote a slice of; the blocks meet through per-producer ready flags, not a grid
// barrier. What is here:
//
//   dynamic_shared<T>()    the dynamic shared-memory buffer (and its emulator form)
//   SharedLayout           where the weight slice, the staged state, the k-partials
//                          and the per-cell carry sit in it; rnnkernels/_persistent.py
//                          mirrors the arithmetic (shared_bytes) to size the launch
//   load_slice             the block's weight rows into shared memory, once
//   load_carry             the policy's carry into shared memory, once
//   stage_rows             rows of the exchanged state into shared memory: InFlight
//                          16-byte __ldcg loads per thread issued back to back into
//                          registers before any of them is stored
//   slice_times_state      the register-blocked product: each thread ItemRows weight
//                          rows x RowTile state rows over a 1/KSplit share of k, partial
//                          sums to shared memory (swizzled: SharedLayout::partial_index)
//   sum_partials           the fixed-order sum of one output's KSplit partials
//   publish / wait_for     the per-producer flags (memory ordering below)
//   load_first_inputs      a thread's first pair's inputs, loaded before the wait
//   forward_recurrence     the two loops, on a cell policy (its interface is
//   backward_recurrence    described above them)
//
// Synchronisation and memory ordering. flags[P] holds one 32-bit word per block,
// zeroed by the launcher before the launch (a fresh array per launch). A block that
// has written its slice of the state for its n-th step does
//     plain stores of the slice; __syncthreads(); thread 0: flags[b].store(n, release)
// and a block that needs the n-th state of every producer does
//     threads p < P: while (flags[p].load(acquire) < n) __nanosleep(backoff);
//     __syncthreads(); read the state with __ldcg.
// Why this is enough (PTX memory model): __syncthreads() orders every thread's
// stores of the slice before thread 0's store (CTA-scope synchronisation), and a
// release at device scope is cumulative, so it makes those stores visible at device
// scope before the flag value; the polling thread's acquire load that reads the value
// synchronises with that release, and the consumer's __syncthreads() extends the order
// to every thread of the consuming block. This is the pattern cooperative_groups'
// grid.sync() uses, minus the single shared counter: each flag has one writer and is
// polled by one thread of each block (P readers), so there is no atomic storm on one
// word and no read-modify-write at all. The state is read with __ldcg (cache at L2
// only): L1 is not coherent between SMs, and a line of another block's slice cached
// in L1 by an earlier access would be stale. Each state slot is written once per
// launch (h_all[t+1], dgates[t]), so no producer ever overwrites a slot that a
// consumer may still read: no second (write-after-read) handshake is needed.
// Backoff: __nanosleep doubles from 32 ns to 512 ns, so a spinning thread leaves the
// issue slots to the producers on its SM; it is also the scheduling point the CPU
// emulator needs in a spin loop.
//
// The flags use libcu++'s cuda::atomic_ref<unsigned, cuda::thread_scope_device>
// (<cuda/atomic>): from NVIDIA's header wheel (nvidia-cuda-cccl) under NVRTC, and from
// rnnkernels/emulator/include/cuda/atomic, a stub on the emulator's atomics, there.
//
// The product. The weight slice is w[rows][k_pad] and the staged state s[rows][k_pad]
// (k_pad = the reduction length rounded up to 4, zero-padded), both row-major. An
// item is ItemRows weight rows (forward: the i, f, g, o rows of one unit; backward:
// four consecutive units); a work unit is (item, group of RowTile state rows, k-part),
// k-part p summing the float4 columns p, p + KSplit, ... Consecutive threads take
// consecutive k-parts of one (item, group), so the 8 threads of a quarter warp read 8
// consecutive float4s of one row: every LDS.128 of the product is conflict-free
// (KSplit = 8, the shipped tile). Per float4 column a thread does ItemRows + RowTile
// LDS.128 and 4·ItemRows·RowTile FMAs (forward, 4 x 4: 8 loads for 64 FMAs). The KSplit
// partials of each output go to shared memory and sum_partials adds them in k-part
// order: a fixed order, so results are bitwise deterministic, with no shuffles and no
// float atomics. The partials are swizzled (SharedLayout::partial_index) so that both
// the product's stores and sum_partials's loads are conflict-free on the launcher's
// plans (2-way at worst where they are not; rnnkernels/_shared_banks.py counts them):
// the plain layout cost, PREDICTED from the count, ~3,000 shared-memory cycles a step
// at B = 64, H = 512 (loads 8-way, stores 4-way) next to the product's ~8,200; the
// swizzle ~500.
#pragma once

#include <cuda/atomic>

#include "common.cuh"

namespace rnnkernels {
namespace persistent {

// The launch's dynamic shared memory (see rnnkernels/emulator/README.md for why the
// emulator needs its own accessor).
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#ifdef RNNKERNELS_EMULATOR
    return static_cast<T*>(emulator_dynamic_shared_memory());
#else
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    return reinterpret_cast<T*>(shared_bytes);
#endif
}

__host__ __device__ constexpr int round_up(int value, int multiple) { return (value + multiple - 1) / multiple * multiple; }

// Offsets (in floats) into the dynamic shared memory of a persistent kernel; every
// region starts on a 16-byte boundary. rnnkernels/_persistent.py (shared_bytes)
// computes the same sizes: keep the two in step.
//   weights   [weight_rows][k_pad]                  the stationary slice
//   state     [chunk_rows][k_pad]                   the staged exchanged state
//   partials  [items·groups·ItemRows·RowTile][KSplit], swizzled: partial_index
//   cells     [batch][units]                        c (forward) or the dc carry
// GateItems: an item is the ItemRows gate rows of one unit (the LSTM's and GRU's
// forward), else ItemRows = 4 consecutive units (the Elman forward, every backward).
template <int ItemRows, int RowTile, int KSplit, bool GateItems>
struct SharedLayout {
    static_assert(KSplit == 8 && RowTile == 4, "the partials' swizzle is written for 8 k-parts and 4-row tiles");
    static_assert(GateItems || ItemRows == 4, "unit items are four consecutive units");
    int k_pad, items, groups;
    int weights, state, partials, cells, total;

    __device__ __forceinline__ SharedLayout(int weight_rows, int reduction, int chunk_rows, int item_count, int batch,
                                            int units) {
        k_pad = round_up(reduction, 4);
        items = item_count;
        groups = chunk_rows / RowTile;
        weights = 0;
        state = weights + round_up(weight_rows * k_pad, 4);
        partials = state + round_up(chunk_rows * k_pad, 4);
        cells = partials + round_up(items * groups * ItemRows * RowTile * KSplit, 4);
        total = cells + round_up(batch * units, 4);
    }

    // Where k-part `part` of output (item, j) x chunk row `row` sits in the partials
    // region. The product stores with lanes = 4 tiles x 8 k-parts (one STS per (j, r) of
    // the register tile), the pointwise loop loads with lanes = 32 consecutive (row,
    // unit) pairs (one LDS per k-part); with KSplit·4 bytes per output, four outputs
    // fill the 32 banks, so an output's bank group is its slot mod 4. The plain order
    // (outputs by item, group, j, r; k-parts side by side) put consecutive units
    // groups·ItemRows·RowTile·KSplit words apart, in one bank: the loads were 8-way
    // (B = 64, H = 512 on 132 SMs) to 12-way (B = 16, H = 768), the stores 4-way. So:
    //  * the outputs go in the order the loads' lanes meet them, (row, unit): per gate
    //    in a block of its own (gate items), or with unit = 4·item + j (unit items).
    //    The 32 lanes of a load then cover 8 aligned runs of four outputs, and the XOR
    //    of the k-part with the run's index mod 8 (the key) puts each run's four
    //    outputs in 8 distinct banks of each group;
    //  * within each run the four slots are rotated by items·group (gate items) or
    //    items·group + item (unit items): mod 4 that is slice_times_state's tile index
    //    (item fastest) plus a constant of the (j, r) being stored, so the 4
    //    consecutive tiles of a warp's store land in 4 distinct bank groups, and the 8
    //    k-parts of each tile (XOR'd by one key) in the group's 8 banks. The rotation
    //    and the key depend on the run only (gate items: group = run / items, as
    //    RowTile = 4), so the map is a permutation within each run and within each
    //    output: the same size as the plain layout, no padding.
    // A thread's 16 stores are a per-r base plus j times the gate block (gate items)
    // or a per-j rotation (unit items): cheap addresses. What is left
    // (rnnkernels/_shared_banks.py counts it for the launcher's plans): with unit items
    // and units % 4 != 0 the loads' lanes skip the padded units, so runs 8 apart can
    // share a key, 2-way at worst; the last block, when it owns fewer units, likewise.
    // The sum's order over k-parts is unchanged, so are the bits. The output's chunk
    // row is group·RowTile + r.
    __device__ __forceinline__ int partial_index(int item, int j, int group, int r, int part) const {
        const int row = group * RowTile + r;
        if (GateItems) {
            const int order = row * items + item;
            const int slot = (order & ~3) | ((order + items * group) & 3);
            return (j * groups * RowTile * items + slot) * KSplit + (part ^ ((order >> 2) & (KSplit - 1)));
        }
        const int run = row * items + item;
        return (4 * run + ((j + items * group + item) & 3)) * KSplit + (part ^ (run & (KSplit - 1)));
    }
};

// dst[r·k_pad + k] = weight(r, k) for r < rows, k < k_pad, and 0 for k >= reduction;
// weight(r, k) returns the float of one element (the caller maps rows to W_hh). Once
// per launch, so simple loads are fine here.
template <int Threads, typename Weight>
__device__ __forceinline__ void load_slice(float* dst, int rows, int reduction, int k_pad, Weight weight) {
    const int total = rows * k_pad;
    for (int e = threadIdx.x; e < total; e += Threads) {
        const int r = e / k_pad, k = e - r * k_pad;
        dst[e] = k < reduction ? weight(r, k) : 0.0f;
    }
}

// dst[r·k_pad + k] = src[r·src_stride + k] for r < rows (k < columns), zero for
// k in [columns, k_pad) and for rows r in [rows, padded_rows). The loads go through
// __ldcg (L2: the rows were written by other blocks in this launch, see the header).
// Vector: 16-byte loads; needs columns % 4 == 0 and a 16-byte aligned src (the
// launcher checks). Each thread issues InFlight loads into registers back to back and
// only then stores them, so InFlight·Threads 16-byte loads are in flight per block
// instead of one round trip to L2 after another. The (row, column) of a thread's next
// vector advances by the constant (Threads / vectors, Threads % vectors): no division
// per element.
template <int Threads, int InFlight, bool Vector>
__device__ __forceinline__ void stage_rows(float* dst, int k_pad, const float* src, index_t src_stride, int rows,
                                           int padded_rows, int columns) {
    const int vectors = k_pad / 4;  // per row
    const int total = padded_rows * vectors;
    const int row_step = Threads / vectors, column_step = Threads - row_step * vectors;
    int row = threadIdx.x / vectors, column = threadIdx.x - row * vectors;
    for (int base = threadIdx.x; base < total; base += Threads * InFlight) {
        float4 value[InFlight];
        int rows_at[InFlight], columns_at[InFlight];
#pragma unroll
        for (int i = 0; i < InFlight; ++i) {
            rows_at[i] = row;
            columns_at[i] = column;
            value[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            const int k = 4 * column;
            if (base + i * Threads < total && row < rows) {
                const float* p = src + (index_t)row * src_stride + k;
                if (Vector) {
                    value[i] = __ldcg(reinterpret_cast<const float4*>(p));
                } else {
                    if (k < columns) value[i].x = __ldcg(p);
                    if (k + 1 < columns) value[i].y = __ldcg(p + 1);
                    if (k + 2 < columns) value[i].z = __ldcg(p + 2);
                    if (k + 3 < columns) value[i].w = __ldcg(p + 3);
                }
            }
            column += column_step;
            row += row_step;
            if (column >= vectors) {
                column -= vectors;
                ++row;
            }
        }
#pragma unroll
        for (int i = 0; i < InFlight; ++i)
            if (base + i * Threads < total)
                reinterpret_cast<float4*>(dst + rows_at[i] * k_pad)[columns_at[i]] = value[i];
    }
}

// partials[layout.partial_index(item, j, group, r, part)] =
//     Σ_{k in part's columns} w[row(item, j)·k_pad + k] · s[(group·RowTile + r)·k_pad + k]
// for every item < layout.items, group < layout.groups, with row(item, j) =
// item·item_stride + j·row_stride (forward: unit + gate·units; backward: 4·item + j).
// Tiles go item fastest, which partial_index's rotation assumes (conflict-free stores).
// Within a thread the k order is fixed (column by column, x y z w), so every partial
// is bitwise reproducible.
//
// Read once in the PTX (NVRTC 13.5, sm_90, lstm_forward_persistent<float, 256, 8, 4,
// 4, true, true>; nvdisasm 13.5 from pip refused NVRTC's cubin as "an invalid ELF
// file", so PTX, not SASS): the k loop is unrolled twice, and its body is 16
// ld.shared.v4.f32 (4 weight rows + 4 state rows per float4 column), 128 fma.rn.f32,
// 12 integer adds and the loop branch: 8 LDS.128 per 64 FMA, no local memory. The
// backward instance (4 units x 4 rows) has the same body. ptxas: 124-128 registers
// at 256 threads, no spills (nvrtc_check).
template <int Threads, int KSplit, int ItemRows, int RowTile, typename Layout>
__device__ __forceinline__ void slice_times_state(const float* w, const float* s, float* partials, const Layout& layout,
                                                  int item_stride, int row_stride) {
    static_assert((KSplit & (KSplit - 1)) == 0, "KSplit must be a power of two");
    const int vectors = layout.k_pad / 4;
    const int work = layout.items * layout.groups * KSplit;
    for (int unit = threadIdx.x; unit < work; unit += Threads) {
        const int part = unit % KSplit;
        const int tile = unit / KSplit;
        const int item = tile % layout.items;
        const int group = tile / layout.items;
        const float4* w_rows[ItemRows];
        const float4* s_rows[RowTile];
#pragma unroll
        for (int j = 0; j < ItemRows; ++j)
            w_rows[j] = reinterpret_cast<const float4*>(w + (item * item_stride + j * row_stride) * layout.k_pad);
#pragma unroll
        for (int r = 0; r < RowTile; ++r)
            s_rows[r] = reinterpret_cast<const float4*>(s + (group * RowTile + r) * layout.k_pad);
        float acc[ItemRows][RowTile];
#pragma unroll
        for (int j = 0; j < ItemRows; ++j)
#pragma unroll
            for (int r = 0; r < RowTile; ++r) acc[j][r] = 0.0f;
        for (int v = part; v < vectors; v += KSplit) {
            float4 wv[ItemRows];
#pragma unroll
            for (int j = 0; j < ItemRows; ++j) wv[j] = w_rows[j][v];
#pragma unroll
            for (int r = 0; r < RowTile; ++r) {
                const float4 sv = s_rows[r][v];
#pragma unroll
                for (int j = 0; j < ItemRows; ++j) {
                    acc[j][r] = fmaf(wv[j].x, sv.x, acc[j][r]);
                    acc[j][r] = fmaf(wv[j].y, sv.y, acc[j][r]);
                    acc[j][r] = fmaf(wv[j].z, sv.z, acc[j][r]);
                    acc[j][r] = fmaf(wv[j].w, sv.w, acc[j][r]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < ItemRows; ++j)
#pragma unroll
            for (int r = 0; r < RowTile; ++r) partials[layout.partial_index(item, j, group, r, part)] = acc[j][r];
    }
}

// The sum of one output's KSplit partials, in k-part order (see slice_times_state):
// output (item, j) x state row `row` of the chunk. An output's partials share one
// KSplit-word slot, permuted by an XOR (SharedLayout::partial_index): the slot and the
// key are worked out once, each load is slot + (part ^ key).
template <int KSplit, int RowTile, typename Layout>
__device__ __forceinline__ float sum_partials(const float* partials, const Layout& layout, int item, int j, int row) {
    const int group = row / RowTile;
    const int first = layout.partial_index(item, j, group, row - group * RowTile, 0);
    const float* slot = partials + (first & ~(KSplit - 1));
    const int key = first & (KSplit - 1);
    float sum = slot[key];
#pragma unroll
    for (int part = 1; part < KSplit; ++part) sum += slot[part ^ key];
    return sum;
}

typedef cuda::atomic_ref<unsigned int, cuda::thread_scope_device> flag_ref;

// Ends a step: every thread of the block has written its part of the state; make it
// visible and tell the consumers that this block's `count`-th state is ready.
__device__ __forceinline__ void publish(unsigned int* flags, unsigned int count) {
    __syncthreads();
    if (threadIdx.x == 0) flag_ref(flags[blockIdx.x]).store(count, cuda::memory_order_release);
}

// Waits until every one of the `producers` blocks has published its `count`-th state;
// afterwards the whole block may read it (with __ldcg).
template <int Threads>
__device__ __forceinline__ void wait_for(unsigned int* flags, int producers, unsigned int count) {
    for (int p = threadIdx.x; p < producers; p += Threads) {
        flag_ref flag(flags[p]);
        unsigned int backoff = 32;
        while (flag.load(cuda::memory_order_acquire) < count) {
            __nanosleep(backoff);
            backoff = backoff < 512 ? 2 * backoff : 512;
        }
    }
    __syncthreads();
}

// The carry's initial values of the block's cells (row, unit0 + u), u < own_units, into
// carry[row·units + u] (SharedLayout's cells region); carry policies only. Both
// directions start so.
template <int Threads, typename Cell>
__device__ __forceinline__ void load_carry(const Cell& cell, float* carry, int batch, int hidden, int unit0,
                                           int units, int own_units) {
    for (int e = threadIdx.x; e < batch * own_units; e += Threads) {
        const int row = e / own_units, u = e - row * own_units;
        carry[row * units + u] = cell.initial_carry((index_t)row * hidden + unit0 + u);
    }
}

// The policy's Inputs of this thread's first (row, unit) pair of `step`: pair threadIdx.x
// of the first chunk (first_rows rows), the one the pair loop takes first. Both
// directions call it before their wait; Inputs hold nothing a block writes in the launch
// (the policy contract below), so nothing here waits for another block. A thread with no
// pair in the first chunk leaves `first` unset, and the pair loop never reads it.
template <typename Cell>
__device__ __forceinline__ void load_first_inputs(const Cell& cell, typename Cell::Inputs& first, int step,
                                                  int first_rows, int unit0, int own_units) {
    if ((int)threadIdx.x < first_rows * own_units) {
        const int r = threadIdx.x / own_units;
        first = cell.load_inputs(step, r, unit0 + (threadIdx.x - r * own_units));
    }
}

// ------------------------------------------------------------------ the recurrences
// The two loops every cell's persistent kernels run (lstm_*, gru_*, rnn_*_persistent
// are thin kernels that build a cell policy and call one of them). A policy says what
// differs between cells; everything else (the slice, the shared layout, the waits, the
// staging, the product, the chunks, the prefetch, the step norms' block sums, the
// flags) is written once here. Shared by both directions' policies:
//   static constexpr int gates    gate row blocks of W_hh: W_hh is [gates·H, H]
//   static constexpr bool carry   each (row, unit) pair keeps one float in shared
//                                 memory between steps (SharedLayout's cells region)
//   const Storage* w_hh           W_hh, read once into the slice
//   struct Inputs                 what a pair's pointwise step reads that no block
//                                 (this one included) writes in the launch; Inputs
//                                 load_inputs(step, row, unit). Each thread loads its
//                                 first pair's before the wait, where the latency
//                                 overlaps the wait, so nothing in it may depend on
//                                 another block's step. Declared without an
//                                 initialiser: a plain aggregate of floats.
//   float initial_carry(index_t cell)        carry only: the carry's value on entry
// Both updates run once per (row, unit) pair inside the pair loop, whose trip count
// differs between threads: no barrier, no warp collective, no early exit. They read the
// exchanged state only through their arguments (product / staged_row forward,
// recurrent_part backward), never h_all or dz with plain loads (another block's slice,
// possibly stale in L1: see the header), and write only their own pair's slot of step t
// (h_all[t+1], dz_t), which no consumer reads before this block publishes. Without a
// carry, `carry` points past the layout: never dereference it.
// Forward policies add:
//   static constexpr bool gate_items  an item is the gates rows of one unit (the
//                                     register tile's ItemRows = gates), else four
//                                     consecutive units (gates = 1: the Elman cell)
//   void update(in, product, step, row, unit, staged_row, carry)
//       product[g] = Σ_k h_{t-1}[row, k]·W_hh[g·H + unit, k]; staged_row: h_{t-1}[row]
//       in shared memory; carry: the pair's float (carry only). Writes h_t and what
//       the cell saves.
// Backward policies add:
//   static constexpr int norms    per-step squared norms of the state gradients
//   void update(in, recurrent, recurrent_part, step, row, unit, carry, squares)
//       recurrent_part = (dz_{t+1}·W_hh)[row, unit] (0 at t = T-1, where recurrent is
//       false); writes dz_t (and the cell's other gradients), adds its squares.
//   float* carry_out              carry only: the carry after t = 0 ([B, H])
// Memory ordering, the product and the staging: the header comment above.

// The forward: block b owns the units [b·units, (b+1)·units) ∩ [0, H). Once: W_hh's rows
// of its units to shared memory as float32 (gate_items: row g·units + u = W_hh[g·H +
// unit0 + u, :]; else row u = W_hh[unit0 + u, :], units padded to a multiple of 4
// with zero rows), and the carry's initial values. Step t: wait until every block has
// published h_{t-1} (not at t = 0: h_all[0] is h0, written before the launch); per
// chunk of chunk_rows batch rows stage h_{t-1}[chunk], form the product, and run the
// policy's update, one (row, unit) pair per thread; then publish step t+1.
template <typename Cell, int Threads, int KSplit, int RowTile, int InFlight, bool VectorLoads>
__device__ __forceinline__ void forward_recurrence(const Cell& cell,
                                                   float* h_all,         // [T+1, B, H]; h_all[0] = h0 on entry
                                                   unsigned int* flags,  // [blocks], zero on entry
                                                   int steps,            // T
                                                   int batch,            // B
                                                   int hidden,           // H
                                                   int units,            // hidden units per block
                                                   int chunk_rows) {     // batch rows staged at a time
    static_assert(Threads % 32 == 0, "whole warps only");
    static_assert(Cell::gate_items || Cell::gates == 1, "unit items take one gate row per unit");
    constexpr int ItemRows = Cell::gate_items ? Cell::gates : 4;
    const int unit0 = blockIdx.x * units;
    const int own_units = min(units, hidden - unit0);
    const int producers = gridDim.x;
    const index_t state_size = (index_t)batch * hidden;
    const int weight_rows = Cell::gate_items ? Cell::gates * units : round_up(units, ItemRows);
    const int items = Cell::gate_items ? units : weight_rows / ItemRows;

    const SharedLayout<ItemRows, RowTile, KSplit, Cell::gate_items> layout(weight_rows, hidden, chunk_rows, items,
                                                                           batch, Cell::carry ? units : 0);
    float* shared = dynamic_shared<float>();
    float* w_slice = shared + layout.weights;
    float* h_chunk = shared + layout.state;
    float* partials = shared + layout.partials;
    float* carry = shared + layout.cells;  // carry[row·units + u] of (row, unit0 + u)

    load_slice<Threads>(w_slice, weight_rows, hidden, layout.k_pad, [&](int r, int k) {
        const int gate = Cell::gate_items ? r / units : 0, u = r - gate * units;
        return u < own_units ? to_float(cell.w_hh[((index_t)gate * hidden + unit0 + u) * hidden + k]) : 0.0f;
    });
    if constexpr (Cell::carry) load_carry<Threads>(cell, carry, batch, hidden, unit0, units, own_units);
    __syncthreads();

    for (int step = 0; step < steps; ++step) {
        // Before the wait: the latency overlaps it instead of following the product (what
        // a small batch's step is made of).
        typename Cell::Inputs first;
        load_first_inputs(cell, first, step, min(chunk_rows, batch), unit0, own_units);
        if (step > 0) wait_for<Threads>(flags, producers, (unsigned int)step);
        const float* h_prev = h_all + (index_t)step * state_size;
        for (int row0 = 0; row0 < batch; row0 += chunk_rows) {
            const int rows = min(chunk_rows, batch - row0);
            stage_rows<Threads, InFlight, VectorLoads>(h_chunk, layout.k_pad, h_prev + (index_t)row0 * hidden, hidden,
                                                       rows, round_up(rows, RowTile), hidden);
            __syncthreads();
            slice_times_state<Threads, KSplit, ItemRows, RowTile>(w_slice, h_chunk, partials, layout,
                                                                  Cell::gate_items ? 1 : ItemRows,
                                                                  Cell::gate_items ? units : 1);
            __syncthreads();
            for (int pair = threadIdx.x; pair < rows * own_units; pair += Threads) {
                const int r = pair / own_units, u = pair - r * own_units;
                // The first pair of the first chunk is the one prefetched above.
                const typename Cell::Inputs in =
                    (row0 == 0 && pair == (int)threadIdx.x) ? first : cell.load_inputs(step, row0 + r, unit0 + u);
                float product[Cell::gates];
#pragma unroll
                for (int g = 0; g < Cell::gates; ++g)
                    product[g] = Cell::gate_items
                                     ? sum_partials<KSplit, RowTile>(partials, layout, u, g, r)
                                     : sum_partials<KSplit, RowTile>(partials, layout, u / ItemRows, u % ItemRows, r);
                cell.update(in, product, step, row0 + r, unit0 + u, h_chunk + r * layout.k_pad,
                            carry + (row0 + r) * units + u);
            }
            // The next chunk overwrites h_chunk and partials (publish syncs the last).
            if (row0 + chunk_rows < batch) __syncthreads();
        }
        publish(flags, (unsigned int)(step + 1));
    }
}

// The reverse recurrence: block b owns the units [b·units, (b+1)·units) ∩ [0, H). Once:
// W_hh's COLUMNS of its units, all gates·H rows, to shared memory transposed
// (w_slice[u][k] = W_hh[k, unit0 + u], float32, units padded to a multiple of 4 with
// zero rows; an item is four consecutive units), and the carry's initial values. Step
// t (T-1 down to 0): except at t = T-1, wait until every block has published
// dz_{t+1}; per chunk of chunk_rows batch rows stage dz_{t+1}[chunk] (K = gates·H) and
// form dz_{t+1}·W_hh[:, units]; then the policy's update per (row, unit) pair.
// StepNorms: the block's Σ of each squared state gradient (float64, fixed order: each
// thread in pair order, then block_sum) into step_squares[block, t]. Publish step t.
// After the loop the carry goes to the policy's carry_out.
template <typename Cell, int Threads, int KSplit, int RowTile, int InFlight, bool VectorLoads, bool StepNorms>
__device__ __forceinline__ void backward_recurrence(const Cell& cell,
                                                    float* dz_all,         // [T, B, gates·H]; reads t+1, writes t
                                                    double* step_squares,  // [blocks, T, norms]; StepNorms only
                                                    unsigned int* flags,   // [blocks], zero on entry
                                                    int steps,             // T
                                                    int batch,             // B
                                                    int hidden,            // H
                                                    int units,             // hidden units per block
                                                    int chunk_rows) {      // batch rows staged at a time
    static_assert(Threads % 32 == 0, "whole warps only");
    constexpr int ItemRows = 4;  // an item: four consecutive units (columns of W_hh)
    const int unit0 = blockIdx.x * units;
    const int own_units = min(units, hidden - unit0);
    const int producers = gridDim.x;
    const int gate_width = Cell::gates * hidden;
    const int padded_units = round_up(units, ItemRows);

    const SharedLayout<ItemRows, RowTile, KSplit, false> layout(padded_units, gate_width, chunk_rows,
                                                                padded_units / ItemRows, batch,
                                                                Cell::carry ? units : 0);
    float* shared = dynamic_shared<float>();
    float* w_slice = shared + layout.weights;  // row u = W_hh[:, unit0 + u]
    float* dz_chunk = shared + layout.state;
    float* partials = shared + layout.partials;
    float* carry = shared + layout.cells;  // carry[row·units + u] of (row, unit0 + u)

    load_slice<Threads>(w_slice, padded_units, gate_width, layout.k_pad, [&](int u, int k) {
        return u < own_units ? to_float(cell.w_hh[(index_t)k * hidden + unit0 + u]) : 0.0f;
    });
    if constexpr (Cell::carry) load_carry<Threads>(cell, carry, batch, hidden, unit0, units, own_units);
    __syncthreads();

    for (int step = steps - 1; step >= 0; --step) {
        // The last step has no dz_{t+1}: the branch is uniform over the grid.
        const bool recurrent = step + 1 < steps;
        // Before the wait: the latency overlaps it instead of following the product.
        typename Cell::Inputs first;
        load_first_inputs(cell, first, step, min(chunk_rows, batch), unit0, own_units);
        if (recurrent) wait_for<Threads>(flags, producers, (unsigned int)(steps - 1 - step));
        double squares[Cell::norms];  // Σ of each squared state gradient of this thread's pairs
#pragma unroll
        for (int q = 0; q < Cell::norms; ++q) squares[q] = 0.0;
        const float* dz_next = dz_all + (index_t)(step + 1) * batch * gate_width;
        for (int row0 = 0; row0 < batch; row0 += chunk_rows) {
            const int rows = min(chunk_rows, batch - row0);
            if (recurrent) {
                stage_rows<Threads, InFlight, VectorLoads>(dz_chunk, layout.k_pad, dz_next + (index_t)row0 * gate_width,
                                                           gate_width, rows, round_up(rows, RowTile), gate_width);
                __syncthreads();
                slice_times_state<Threads, KSplit, ItemRows, RowTile>(w_slice, dz_chunk, partials, layout, ItemRows, 1);
                __syncthreads();
            }
            for (int pair = threadIdx.x; pair < rows * own_units; pair += Threads) {
                const int r = pair / own_units, u = pair - r * own_units;
                // The first pair of the first chunk is the one prefetched above.
                const typename Cell::Inputs in =
                    (row0 == 0 && pair == (int)threadIdx.x) ? first : cell.load_inputs(step, row0 + r, unit0 + u);
                const float recurrent_part =
                    recurrent ? sum_partials<KSplit, RowTile>(partials, layout, u / ItemRows, u % ItemRows, r) : 0.0f;
                cell.update(in, recurrent, recurrent_part, step, row0 + r, unit0 + u, carry + (row0 + r) * units + u,
                            squares);
            }
            // The next chunk overwrites dz_chunk and partials (publish syncs the last).
            if (row0 + chunk_rows < batch) __syncthreads();
        }
        if constexpr (StepNorms) {
            // block_sum's shared scratch is reused next step only after publish's
            // __syncthreads(), so thread 0 has read it by then.
            block_sum<Threads>(squares);
            if (threadIdx.x == 0) {
                double* slot = step_squares + ((index_t)blockIdx.x * steps + step) * Cell::norms;
#pragma unroll
                for (int q = 0; q < Cell::norms; ++q) slot[q] = squares[q];
            }
        }
        publish(flags, (unsigned int)(steps - step));
    }
    if constexpr (Cell::carry) {
        for (int e = threadIdx.x; e < batch * own_units; e += Threads) {
            const int row = e / own_units, u = e - row * own_units;
            cell.carry_out[(index_t)row * hidden + unit0 + u] = carry[row * units + u];
        }
    }
}

}  // namespace persistent
}  // namespace rnnkernels
