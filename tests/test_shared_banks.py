"""The shared-memory bank-conflict counter (rnnkernels/_shared_banks.py) and what it
says of the persistent kernels' k-partials (csrc/persistent.cuh, SharedLayout::
partial_index): the counter on hand-made patterns; the plain layout's conflicts as
counted before the swizzle (8-way / 12-way loads, 4-way stores); the swizzled layout
conflict-free (2-way at worst) on every plan the launcher makes for H100/H200 and A100,
a permutation of the same words, and the C++ giving the Python mirror's words (on the
emulator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rnnkernels import _persistent, _shared_banks, cost_model, emulator
from rnnkernels._shared_banks import PartialsShape, least_wavefronts, wavefronts

KERNELS = Path(__file__).resolve().parent / "emulator_kernels"
CSRC = Path(__file__).resolve().parent.parent / "csrc"


# ------------------------------------------------------------------ the counter
def test_counter_on_known_patterns():
    lanes = range(32)
    assert wavefronts([i for i in lanes]) == 1  # consecutive words: 32 banks
    assert wavefronts([7] * 32) == 1  # one word: a broadcast
    assert wavefronts([32 * i for i in lanes]) == 32  # one bank, 32 words
    assert wavefronts([2 * i for i in lanes]) == 2
    assert wavefronts([(i % 4) * 32 for i in lanes]) == 4  # 4 distinct words of bank 0, repeated
    assert wavefronts([None] * 31 + [5]) == 1 and wavefronts([None] * 32) == 0
    # 8 bytes: two phases of 16 lanes; 16 bytes: four of 8.
    assert wavefronts([2 * i for i in lanes], 8) == 2
    assert wavefronts([4 * i for i in lanes], 16) == 4
    # Lanes 0 and 1 (one quarter warp) 32 words apart: the same four banks, twice.
    assert wavefronts([4 * i + (28 if i == 1 else 0) for i in lanes], 16) == 5
    # Conflicts across phases do not add up: lane 0 and lane 8 share banks, in
    # different quarters.
    assert wavefronts([32 * (i // 8) + 4 * (i % 8) for i in lanes], 16) == 4
    assert least_wavefronts([4 * i for i in lanes], 16) == 4
    assert least_wavefronts([None] * 8 + [0] + [None] * 23, 16) == 1


@pytest.mark.parametrize("addresses, width, match", [
    ([0] * 33, 4, "at most 32"),
    ([0, 1], 2, "width"),
    ([1], 16, "multiple of 4"),
    ([-1], 4, "non-negative"),
    ([1.0], 4, "non-negative ints"),
])
def test_counter_rejects_bad_input(addresses, width, match):
    with pytest.raises(ValueError, match=match):
        wavefronts(addresses, width)


# ------------------------------------------------------------------ the partials
def _plans():
    sizes = _shared_banks.TABLE_SIZES + ((3, 333), (64, 256), (16, 1024), (5, 100), (2, 40))
    for dev, cell, _, batch, hidden, found in _shared_banks.plans(cells=tuple(_persistent.CELLS), sizes=sizes):
        yield dev.name, cell, batch, hidden, found


def _plan(direction, batch, hidden, device="H200", cell="lstm"):
    dev = cost_model.device(device)
    return _persistent.plan(direction, batch, hidden, dev.sms, dev.shared_per_block - _persistent.STATIC_SHARED_BYTES,
                            cell=cell)


@pytest.mark.parametrize("batch, hidden, load_ways", [(64, 512, 8), (16, 768, 12)])
def test_plain_layout_conflicts_as_counted_before_the_swizzle(batch, hidden, load_ways):
    """What persistent.cuh's header said of the plain layout, on an H100's plan (the
    H200's: same SMs and shared memory): sum_partials's loads 8-way at B = 64, H = 512
    and 12-way at B = 16, H = 768; the product's stores were 4-way too (4 tiles of a
    warp KSplit·ItemRows·RowTile = 128 words apart)."""
    count = _shared_banks.persistent_partials(_plan(_persistent.FORWARD, batch, hidden), batch, hidden, "lstm",
                                              "plain")
    assert count.loads.worst_ways == load_ways and count.stores.worst_ways == 4
    if batch == 64:  # the header's "about 2,000 cycles a step" were the loads
        assert (count.loads.wavefronts, count.stores.wavefronts, count.product_wavefronts) == (2048, 1024, 8192)


def _swizzle_holds(layout: str) -> list[str]:
    """The swizzle's promise, checked on every plan: stores conflict-free; loads
    conflict-free in the busiest block where the loads' lanes meet whole runs of four
    outputs (gate items; unit items with units % 4 == 0), 2-way at worst elsewhere."""
    broken = []
    for device, cell, batch, hidden, found in _plans():
        count = _shared_banks.persistent_partials(found, batch, hidden, cell, layout)
        gate_items = found.direction == _persistent.FORWARD and _persistent.CELLS[cell].forward_items_are_gates
        whole_runs = gate_items or found.units % 4 == 0
        label = f"{device} {cell} {found.direction} B={batch} H={hidden}: {count}"
        if max(count.stores.worst_ways, count.last_stores.worst_ways) != 1:
            broken.append(f"stores {label}")
        if count.loads.worst_ways != 1 and whole_runs or count.loads.worst_ways > 2:
            broken.append(f"loads {label}")
        if count.last_loads.worst_ways > 3:
            broken.append(f"last block's loads {label}")
    return broken


def test_swizzled_partials_are_conflict_free_on_every_plan():
    assert _shared_banks.LAYOUT == "swizzled"
    assert _swizzle_holds(_shared_banks.LAYOUT) == []


def test_the_swizzle_check_fails_on_the_plain_layout():
    """The check above is not vacuous: the layout it replaced fails it on most plans."""
    plans = len(list(_plans()))
    assert len(_swizzle_holds("plain")) > plans


@pytest.mark.parametrize("gate_items, item_rows", [(True, 4), (True, 3), (False, 4)])
@pytest.mark.parametrize("items, groups", [(1, 1), (2, 3), (6, 4), (3, 16), (11, 2), (5, 22)])
def test_swizzle_is_a_permutation_of_the_plain_words(gate_items, item_rows, items, groups):
    shape = PartialsShape(items, groups, item_rows, 4, 8, gate_items)
    words = [_shared_banks.swizzled_index(shape, i, j, row, part) for i in range(items) for j in range(item_rows)
             for row in range(4 * groups) for part in range(8)]
    assert sorted(words) == list(range(items * item_rows * 4 * groups * 8))
    # An output's 8 partials share one aligned slot of 8 words (sum_partials reads
    # slot + (part ^ key)).
    for first in range(0, len(words), 8):
        assert len({w // 8 for w in words[first:first + 8]}) == 1


def test_cost_model_counts_the_partials():
    b = cost_model.explain("persistent", "forward_inference", cost_model.Problem(64, 512), cost_model.DEVICES["H200"])
    assert b.counts["partials_wavefronts"] == 512 and b.counts["partials_load_ways"] == 1
    assert b.terms["partials_us"] == pytest.approx(512 / (1.98 * 1e3))


def test_launch_totals_sum_the_grid():
    found = _plan(_persistent.BACKWARD, 16, 768)
    totals = _shared_banks.launch_totals(found, 16, 768, 5)
    count = _shared_banks.persistent_partials(found, 16, 768)
    # The backward forms the product on T - 1 steps; every block of this plan owns 6 units.
    assert found.blocks * found.units == 768
    assert totals["ld_wavefronts"] == 4 * found.blocks * count.loads.wavefronts
    assert totals["ld_conflicts"] == 4 * found.blocks * (count.loads.wavefronts - count.loads.least) > 0
    assert totals["st_conflicts"] == 0
    assert _shared_banks.launch_totals(found, 16, 768, 1)["ld_wavefronts"] == 0


@pytest.mark.emulated
@pytest.mark.skipif(not emulator.compiler_available(), reason="the CPU emulator needs a C++ compiler (g++ or $CXX)")
def test_cpp_partial_index_matches_the_python_mirror():
    variants = {(4, True): "partial_indices<4, true>", (3, True): "partial_indices<3, true>",
                (4, False): "partial_indices<4, false>"}
    module = emulator.load_module([KERNELS / "partial_index.cu"], list(variants.values()), include_dirs=(CSRC,))
    for (item_rows, gate_items), name in variants.items():
        for items, groups in ((1, 1), (6, 4), (3, 16), (11, 3)):
            out = np.full(items * item_rows * groups * 4 * 8, -1, np.int32)
            module.get_function(name)(1, 1, (out, np.int32(items), np.int32(groups)))
            shape = PartialsShape(items, groups, item_rows, 4, 8, gate_items)
            want = [_shared_banks.swizzled_index(shape, i, j, 4 * g + r, p) for i in range(items)
                    for j in range(item_rows) for g in range(groups) for r in range(4) for p in range(8)]
            assert out.tolist() == want, (name, items, groups)
