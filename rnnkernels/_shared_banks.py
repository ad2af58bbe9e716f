"""Shared-memory bank conflicts, counted from an access pattern (no GPU needed), and the
persistent kernels' k-partials (csrc/persistent.cuh) counted with it.

The counter. Shared memory has 32 banks of 4-byte words; word address a sits in bank
a mod 32. One warp-wide load or store is served in *wavefronts*: a 4-byte access
(LDS/STS.32) of the 32 lanes in one phase, an 8-byte one (.64) in two phases of 16 lanes,
a 16-byte one (.128) in four phases of 8 lanes (lanes 0-7, 8-15, ...), the classic model
of NVIDIA's CUDA C++ Programming Guide ("Shared Memory", compute capability 5.x and
later). Within a phase, lanes that read the same word are served together (broadcast);
n distinct words in one bank take n wavefronts. So a phase costs the largest number of
distinct words any bank holds among its lanes' accesses, and an instruction the sum
over its phases; the least it can cost is one wavefront per phase with an active lane,
and ``ways`` is the ratio. Each wavefront is one cycle of the SM's shared-memory pipe
(128 bytes a clock): wavefronts are the PREDICTED shared-memory cycles, a count from
the layout, never a measurement. Not modelled: stores and loads from different warps
interleaving, and the hardware merging some .64/.128 phases (newer GPUs can serve two
half-warps of a .64 access in one wavefront when they fit): both only make the true
count smaller.

The persistent kernels. :func:`persistent_partials` lists, per block and step, the
product's stores of its k-partials (slice_times_state: lane = (tile, k-part), one STS.32
per (j, r) of the thread's register tile) and sum_partials' loads (the pointwise loop:
lane = (row, unit) pair, one LDS.32 per gate and k-part), for the launch plan
``rnnkernels/_persistent.py`` makes, under a partials layout: :data:`LAYOUTS` holds the
shipped one (``"swizzled"``, persistent.cuh's ``partial_index``) and the one it
replaced (``"plain"``: partials[((item·groups + group)·ItemRows + j)·RowTile + r]
[k-part], which put consecutive units' partials into one bank: 8-way at B = 64,
H = 512 on an H100's plan), so the two can be compared; keep ``"swizzled"`` in step
with the C++.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BANKS = 32
WORD_BYTES = 4
_PHASE_LANES = {4: 32, 8: 16, 16: 8}  # access width in bytes -> lanes per phase


def wavefronts(addresses: Sequence[int | None], width: int = 4) -> int:
    """Wavefronts one warp-wide shared-memory access takes: ``addresses[lane]`` is the
    word address (in 4-byte words) lane ``lane`` accesses, None for an inactive lane
    (at most 32 lanes); ``width``: bytes per lane, 4, 8 or 16 (the address must then be
    a multiple of 2 or 4 words)."""
    if width not in _PHASE_LANES:
        raise ValueError(f"width must be 4, 8 or 16 bytes, got {width!r}")
    if len(addresses) > 32:
        raise ValueError(f"addresses must list at most 32 lanes (one warp), got {len(addresses)}")
    words = width // WORD_BYTES
    lanes = _PHASE_LANES[width]
    total = 0
    for start in range(0, len(addresses), lanes):
        banks: dict[int, set[int]] = {}
        for address in addresses[start:start + lanes]:
            if address is None:
                continue
            if not isinstance(address, int) or address < 0:
                raise ValueError(f"addresses must be non-negative ints or None, got {address!r}")
            if address % words:
                raise ValueError(f"a {width}-byte access needs an address that is a multiple of {words} words, "
                                 f"got {address}")
            for word in range(address, address + words):
                banks.setdefault(word % BANKS, set()).add(word)
        total += max((len(distinct) for distinct in banks.values()), default=0)
    return total


def least_wavefronts(addresses: Sequence[int | None], width: int = 4) -> int:
    """What a conflict-free access of the same active lanes costs: one wavefront per
    phase with an active lane."""
    lanes = _PHASE_LANES[width]
    return sum(any(a is not None for a in addresses[s:s + lanes]) for s in range(0, len(addresses), lanes))


# ------------------------------------------------------------ the persistent partials
@dataclass(frozen=True)
class PartialsShape:
    """What the partials' layout depends on (SharedLayout in persistent.cuh): ``items``
    and ``groups`` of the chunk (groups = chunk_rows / row_tile), ``item_rows``
    (ItemRows), ``row_tile``, ``k_split``, and whether an item is the gate rows of one
    unit (``gate_items``: the LSTM's and GRU's forward) or four consecutive units."""

    items: int
    groups: int
    item_rows: int
    row_tile: int
    k_split: int
    gate_items: bool


def plain_index(s: PartialsShape, item: int, j: int, row: int, part: int) -> int:
    """The layout before the swizzle: an output's k_split partials side by side, the
    outputs in (item, group, j, r) order."""
    group, r = divmod(row, s.row_tile)
    return (((item * s.groups + group) * s.item_rows + j) * s.row_tile + r) * s.k_split + part


def swizzled_index(s: PartialsShape, item: int, j: int, row: int, part: int) -> int:
    """persistent.cuh's SharedLayout::partial_index (keep in step; the C++ comment says
    why it is conflict-free both ways): the outputs in the order the pointwise loop's
    lanes read them, (row, unit), per gate for gate items; each output's 8 k-parts in
    one 8-word slot, four slots to a bank row; within each aligned run of four outputs
    the slots rotated by the product's tile index, within each slot the k-parts
    permuted by an XOR with the run's index."""
    if s.k_split != 8 or s.row_tile != 4:
        raise ValueError(f"the swizzle is written for k_split 8 and a row tile of 4, got {s}")
    run_rotation = s.items * (row // s.row_tile)
    if s.gate_items:
        order = row * s.items + item
        slot = (order & ~3) | ((order + run_rotation) & 3)
        return (j * s.groups * s.row_tile * s.items + slot) * 8 + (part ^ ((order >> 2) & 7))
    run = row * s.items + item
    return (4 * run + ((j + run_rotation + item) & 3)) * 8 + (part ^ (run & 7))


def _group_fastest(s: PartialsShape, tile: int) -> tuple[int, int]:
    return divmod(tile, s.groups)


def _item_fastest(s: PartialsShape, tile: int) -> tuple[int, int]:
    group, item = divmod(tile, s.items)
    return item, group


# name -> (the partial's word index, slice_times_state's tile -> (item, group)): the
# plain layout came with the group-fastest tile order, the swizzle needs item-fastest.
LAYOUTS: dict[str, tuple[Callable[[PartialsShape, int, int, int, int], int],
                         Callable[[PartialsShape, int], tuple[int, int]]]] = {
    "plain": (plain_index, _group_fastest),
    "swizzled": (swizzled_index, _item_fastest),
}
LAYOUT = "swizzled"  # the one persistent.cuh ships


@dataclass(frozen=True)
class AccessCount:
    """Warp-wide instructions, their wavefronts, the conflict-free least, and the worst
    instruction's ways."""

    instructions: int = 0
    wavefronts: int = 0
    least: int = 0
    worst_ways: float = 1.0

    def add(self, addresses: Sequence[int | None], width: int = 4) -> AccessCount:
        got, least = wavefronts(addresses, width), least_wavefronts(addresses, width)
        if least == 0:
            return self
        return AccessCount(self.instructions + 1, self.wavefronts + got, self.least + least,
                           max(self.worst_ways, got / least))

    def __add__(self, other: AccessCount) -> AccessCount:
        return AccessCount(self.instructions + other.instructions, self.wavefronts + other.wavefronts,
                           self.least + other.least, max(self.worst_ways, other.worst_ways))

    def times(self, n: int) -> AccessCount:
        return AccessCount(self.instructions * n, self.wavefronts * n, self.least * n, self.worst_ways)

    @property
    def ways(self) -> float:
        """Average: wavefronts over the conflict-free least."""
        return self.wavefronts / self.least if self.least else 1.0


def _warps(count: int, threads: int):
    """(round, warp lanes as work indices or None) of a loop ``for (i = threadIdx.x; i <
    count; i += threads)`` over a block of ``threads``."""
    for base in range(0, count, threads):
        for warp in range(base, min(base + threads, count), 32):
            yield [i if i < count else None for i in range(warp, warp + 32)]


def chunk_accesses(shape: PartialsShape, threads: int, rows: int, own_units: int, gates: int,
                   layout: str = LAYOUT) -> tuple[AccessCount, AccessCount]:
    """(stores, loads) of the partials for one chunk of ``rows`` batch rows in a block
    owning ``own_units`` units: the product's STS.32 (every tile of the chunk, padded
    rows and units too, as slice_times_state computes them) and the pointwise loop's
    LDS.32 (``rows`` x ``own_units`` pairs; ``gates`` loads of k_split each per pair
    for gate items, one output per pair otherwise), slice_times_state's tiles in the
    order that came with ``layout``."""
    index, tile_order = LAYOUTS[layout]
    ks, rt, ir = shape.k_split, shape.row_tile, shape.item_rows
    stores = AccessCount()
    work = shape.items * shape.groups * ks
    for lanes in _warps(work, threads):
        tiles = [None if w is None else tile_order(shape, w // ks) + (w % ks,) for w in lanes]
        for j in range(ir):
            for r in range(rt):
                stores = stores.add([None if t is None else index(shape, t[0], j, t[1] * rt + r, t[2])
                                     for t in tiles])
    loads = AccessCount()
    for lanes in _warps(rows * own_units, threads):
        pairs = [None if p is None else divmod(p, own_units) for p in lanes]
        for g in range(gates if shape.gate_items else 1):
            for part in range(ks):
                addresses = []
                for pair in pairs:
                    if pair is None:
                        addresses.append(None)
                        continue
                    row, u = pair
                    item, j = (u, g) if shape.gate_items else divmod(u, 4)
                    addresses.append(index(shape, item, j, row, part))
                loads = loads.add(addresses)
    return stores, loads


@dataclass(frozen=True)
class PartialsCount:
    """Per block and step (all chunks): the partials' stores and loads in the busiest
    block (``stores``, ``loads``, a block owning ``units`` units) and in the last block
    (``last_*``, which may own fewer), and the product's LDS.128 wavefronts (conflict-free,
    4 per instruction) for scale."""

    stores: AccessCount
    loads: AccessCount
    last_stores: AccessCount
    last_loads: AccessCount
    product_wavefronts: int

    @property
    def wavefronts(self) -> int:
        """PREDICTED shared-memory cycles of the partials in the busiest block a step."""
        return max(self.stores.wavefronts + self.loads.wavefronts,
                   self.last_stores.wavefronts + self.last_loads.wavefronts)


@functools.lru_cache(maxsize=512)
def persistent_partials(plan, batch: int, hidden: int, cell: str = "lstm", layout: str = LAYOUT) -> PartialsCount:
    """The partials' accesses of ``plan`` (an ``_persistent.Plan`` for (B, H)) under
    ``layout``; counts per block and step (memoized: the cost model asks per call)."""
    from . import _persistent

    pcell = _persistent.CELLS[cell]
    tile = plan.tile
    item_rows, _, reduction, items, _ = pcell.geometry(plan.direction, plan.units, hidden)
    gate_items = plan.direction == _persistent.FORWARD and pcell.forward_items_are_gates
    shape = PartialsShape(items, plan.chunk_rows // tile.row_tile, item_rows, tile.row_tile, tile.k_split, gate_items)
    gates = pcell.gates if gate_items else 1
    last_units = hidden - (plan.blocks - 1) * plan.units
    counts = {}
    for own in {plan.units, last_units}:
        stores, loads = AccessCount(), AccessCount()
        for row0 in range(0, batch, plan.chunk_rows):
            rows = min(plan.chunk_rows, batch - row0)
            s, l = chunk_accesses(shape, tile.threads, rows, own, gates, layout)
            stores, loads = stores + s, loads + l
        counts[own] = (stores, loads)
    k_pad = -(-reduction // 4) * 4
    chunks = -(-batch // plan.chunk_rows)
    work = items * shape.groups * tile.k_split
    # Per work unit: ceil(vectors / k_split) columns or fewer, item_rows + row_tile LDS.128
    # each; summed over work units, the columns are exactly k_pad / 4 per tile.
    lds128_lanes = items * shape.groups * (k_pad // 4) * (item_rows + tile.row_tile)
    product = chunks * 4 * -(-lds128_lanes // 32) if work else 0
    return PartialsCount(*counts[plan.units], *counts[last_units], product)


def launch_totals(plan, batch: int, hidden: int, steps: int, cell: str = "lstm", layout: str = LAYOUT) -> dict:
    """PREDICTED totals of the partials' shared-memory traffic over one launch of
    ``plan`` for T = ``steps``, summed over the grid as Nsight Compute's counters sum
    it: ``ld_conflicts`` / ``st_conflicts`` (wavefronts beyond one per phase, the
    quantity of l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld/st.sum),
    ``ld_wavefronts`` / ``st_wavefronts``, and the instructions. The forward forms the
    product every step, the backward every step but t = T-1. The kernels' other
    shared-memory accesses (the product's LDS.128, the staging's STS.128, the slice and
    carry loads) are conflict-free by their layouts and not counted here."""
    from . import _persistent

    count = persistent_partials(plan, batch, hidden, cell, layout)
    products = steps if plan.direction == _persistent.FORWARD else max(steps - 1, 0)
    totals = {}
    for name, busy, last in (("ld", count.loads, count.last_loads), ("st", count.stores, count.last_stores)):
        grid = busy.times(plan.blocks - 1) + last
        totals[f"{name}_conflicts"] = products * (grid.wavefronts - grid.least)
        totals[f"{name}_wavefronts"] = products * grid.wavefronts
        totals[f"{name}_instructions"] = products * grid.instructions
    return totals


# The (B, H) the table below covers: the anchors (cost_model.ANCHORS) and a spread of
# batch sizes and widths around them.
TABLE_SIZES = ((16, 768), (64, 512), (8, 256), (1, 1024), (1, 512), (4, 768), (32, 1024), (128, 512), (256, 256))


def plans(devices=("H200", "A100-SXM"), cells=("lstm", "gru", "rnn_tanh"), sizes=TABLE_SIZES):
    """(device, cell, direction, B, H, plan) for every plan the launcher makes on ``devices``
    (names in cost_model.DEVICES; H200's plan is the H100's: same SMs and shared memory)
    for ``cells`` and ``sizes``, both directions; sizes it cannot plan are left out."""
    from . import _persistent, cost_model

    for name in devices:
        dev = cost_model.device(name)
        for cell in cells:
            for direction in (_persistent.FORWARD, _persistent.BACKWARD):
                for batch, hidden in sizes:
                    found = _persistent.plan(direction, batch, hidden, dev.sms,
                                             dev.shared_per_block - _persistent.STATIC_SHARED_BYTES, cell=cell)
                    if found is not None:
                        yield dev, cell, direction, batch, hidden, found


def table(devices=("H200", "A100-SXM"), cells=("lstm", "gru", "rnn_tanh"), sizes=TABLE_SIZES) -> str:
    """A markdown table of the PREDICTED partials traffic per block and step, the plain
    layout against the shipped one, for the launcher's plans (``plans``)."""

    def ways(count: PartialsCount, loads: bool) -> float:
        busy, last = (count.loads, count.last_loads) if loads else (count.stores, count.last_stores)
        return max(busy.worst_ways, last.worst_ways)

    lines = ["PREDICTED from the layouts (rnnkernels/_shared_banks.py), not measured: per block and step; "
             "ways = the worst instruction's wavefronts / the conflict-free least (the busiest block or the "
             "last); cycles = wavefronts (one a clock) of the busier of the two.", "",
             "| device | cell | direction | B | H | units | chunk | load ways plain -> swizzled | "
             "store ways plain -> swizzled | partials cycles plain -> swizzled | product cycles |",
             "|---|---|---|---:|---:|---:|---:|---|---|---|---:|"]
    for dev, cell, direction, batch, hidden, found in plans(devices, cells, sizes):
        old, new = (persistent_partials(found, batch, hidden, cell, layout) for layout in ("plain", LAYOUT))
        lines.append(f"| {dev.name} | {cell} | {direction} | {batch} | {hidden} | {found.units} | "
                     f"{found.chunk_rows} | {ways(old, True):.0f} -> {ways(new, True):.0f} | "
                     f"{ways(old, False):.0f} -> {ways(new, False):.0f} | {old.wavefronts} -> "
                     f"{new.wavefronts} | {new.product_wavefronts} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
