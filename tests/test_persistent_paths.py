"""The persistent recurrences (csrc/persistent.cuh) on the paths that only GPU-sized
problems take with the shipped 256-thread tile, run on the emulator with a 32-thread
tile instead (the same templates, the same launch plan, only ``threads`` smaller).

With 256 threads the emulator's small shapes never reach these loops' later rounds,
yet every issue size does on a GPU:
  * several (row, unit) pairs per thread in the pointwise loop (B·units > threads,
    e.g. B = 128, H = 512), where only the first pair is prefetched before the wait;
  * several work units per thread in slice_times_state (items·groups·k_split > threads);
  * several rounds of stage_rows (rows·k_pad/4 > threads·in_flight);
  * exchanged rows longer than the block in stage_rows (k_pad/4 > threads: row_step 0,
    the column advance wraps): the LSTM backward for every H > 256 (rows of 4H), the
    GRU backward for H > 341, every forward for H > 1024.
Each case below takes all of them in both directions (LSTM: gate items and a carry;
Elman: four-unit items and none), in the stale memory model, against the float64
references, with step norms."""

from __future__ import annotations

import numpy as np
import pytest
import test_cell_kernels as cells_test
import test_cuda_kernels as lstm_test
from conftest import emulator_or_skip

from rnnkernels import _launch, _persistent, _sources

pytestmark = pytest.mark.emulated

SMALL = _persistent.PersistentTile("persistent32", threads=32, k_split=8, row_tile=4, in_flight=2)


def _small_names(source: str) -> list[str]:
    """The float instances of SMALL in ``source``, plus the non-step kernels a backward
    launches after the recurrence (column_sum, step_norms)."""
    names = [name for name in _launch.KERNELS[source] if name.startswith(("rnnkernels::column_sum<float",
                                                                          "rnnkernels::step_norms<"))]
    for cell in _persistent.CELLS.values():
        kernels = _launch.ALL_CELL_KERNELS[cell.cell]
        forward, backward = cell.names(SMALL, "float")
        names += forward if kernels.forward_source == source else backward if kernels.backward_source == source else []
    return sorted(set(names))


class _SmallTileRuntime(_launch.EmulatorRuntime):
    """The emulator runtime with modules that hold SMALL's instances (the shipped
    modules hold only the 256-thread tile's)."""

    def function(self, source, name_expression):
        from rnnkernels import emulator

        module = emulator.load_module([_sources.read_source(source)], tuple(_small_names(source)),
                                      include_dirs=(str(_sources.csrc_dir()),),
                                      defines={"RNNKERNELS_SOURCES": _sources.sources_digest()})
        kernel = module.get_function(name_expression)
        options = {} if self.memory_model is None else {"memory_model": self.memory_model}

        def launch(grid, block, args, shared_mem=0, cooperative=False):
            if "_persistent<" in name_expression:  # not the shipped tile's by mistake
                assert cooperative and f", {SMALL.threads}, " in name_expression, name_expression
            kernel(grid, block, args, shared_mem=shared_mem, cooperative=cooperative, seed=self.seed, **options)

        return launch


@pytest.fixture
def small_tile(monkeypatch):
    """The launch plan with SMALL in place of the shipped tile (plan_for is what
    _launch asks, through _persistent.require)."""
    emulator_or_skip()
    plan = _persistent.plan

    def plan_for(rt, direction, batch, hidden, dtype="float32", flag=True, cell="lstm"):
        return plan(direction, batch, hidden, rt.sm_count, rt.max_shared_bytes - _persistent.STATIC_SHARED_BYTES,
                    tile=SMALL, cell=cell)

    monkeypatch.setattr(_persistent, "plan_for", plan_for)
    return plan_for


# (T, B, I, H), SMs, chunked: H = 33 (scalar staging of h; the LSTM's dz rows of 132
# floats are 33 float4s, more than the 32 threads) split over 3 blocks of 11 units,
# 9 rows: 99 pairs and 264 forward work units per block; H = 130 (scalar staging of
# rows of 33 float4s, padded, both ways for the Elman cell; 130 float4s of dz for the
# LSTM's backward); H = 68 (16-byte staging) with B = 13 in chunks of one row tile (the
# smallest shared memory that fits it).
CASES = [((3, 9, 5, 33), 3, False), ((2, 6, 3, 130), 4, False), ((2, 13, 3, 68), 2, True)]


def _runtime(cell, shape, sm_count, chunked):
    if not chunked:
        return _SmallTileRuntime(sm_count=sm_count, max_shared_bytes=200 * 1024, memory_model="stale")
    _, batch, _, hidden = shape
    units = -(-hidden // sm_count)
    need = max(_persistent.shared_bytes(direction, SMALL, batch, hidden, units, SMALL.row_tile, cell=cell)
               for direction in (_persistent.FORWARD, _persistent.BACKWARD))
    return _SmallTileRuntime(sm_count=sm_count, max_shared_bytes=need + _persistent.STATIC_SHARED_BYTES,
                             memory_model="stale")


def _assert_takes_the_paths(plan_for, runtime, cell, shape, chunked):
    """Asserts that both directions take the paths of the module docstring; returns the
    directions whose exchanged rows are longer than the block (row_step 0)."""
    _, batch, _, hidden = shape
    long_rows = set()
    gates = _persistent.CELLS[cell].gates
    for direction in (_persistent.FORWARD, _persistent.BACKWARD):
        found = plan_for(runtime, direction, batch, hidden, cell=cell)
        assert found is not None and found.tile == SMALL and found.blocks > 1
        rows = min(found.chunk_rows, batch)
        assert rows * min(found.units, hidden) > SMALL.threads, "several pairs per thread"
        assert (found.chunk_rows < batch) == chunked, found
        row_vectors = -(-(hidden if direction == _persistent.FORWARD else gates * hidden) // 4)
        assert found.chunk_rows * row_vectors > SMALL.threads * SMALL.in_flight, "several staging rounds"
        if row_vectors > SMALL.threads:
            long_rows.add(direction)
    return long_rows


# The directions that stage rows longer than the block, per cell and H.
LONG_ROWS = {("lstm", 33): {"backward"}, ("lstm", 130): {"forward", "backward"}, ("lstm", 68): {"backward"},
             ("rnn_tanh", 33): set(), ("rnn_tanh", 130): {"forward", "backward"}, ("rnn_tanh", 68): set()}


@pytest.mark.parametrize("shape, sm_count, chunked", CASES, ids=lambda v: str(v))
def test_lstm_persistent_with_several_rounds_per_thread(small_tile, shape, sm_count, chunked):
    runtime = _runtime("lstm", shape, sm_count, chunked)
    assert _assert_takes_the_paths(small_tile, runtime, "lstm", shape, chunked) == LONG_ROWS["lstm", shape[3]]
    problem = lstm_test.make_norm_problem(shape, "all", seed=sum(shape))
    results = lstm_test.run_step_norms(runtime, problem, variant="persistent")
    lstm_test.assert_step_norms_match_reference(results, problem, lstm_test.EMULATED_TOLERANCE)
    for name in lstm_test.GRADIENTS:  # step norms on or off: the same gradients
        assert results[name].tobytes() == results[name + "_plain"].tobytes(), name
    lstm_test.assert_matches_reference(lstm_test.run_kernels(runtime, problem, variant="persistent"), problem,
                                       lstm_test.EMULATED_TOLERANCE)


@pytest.mark.parametrize("shape, sm_count, chunked", CASES, ids=lambda v: str(v))
def test_elman_persistent_with_several_rounds_per_thread(small_tile, shape, sm_count, chunked):
    runtime = _runtime("rnn_tanh", shape, sm_count, chunked)
    assert (_assert_takes_the_paths(small_tile, runtime, "rnn_tanh", shape, chunked)
            == LONG_ROWS["rnn_tanh", shape[3]])
    p = cells_test.make_problem("rnn_tanh", *shape, seed=sum(shape))
    got = cells_test.run(runtime, "rnn_tanh", p, variant="persistent")
    assert np.isfinite(got["dh_norms"]).all()
    cells_test.assert_close(got, cells_test.reference("rnn_tanh", p), 2e-5)
