"""Every kernel instance the launcher can pick compiles with NVRTC for sm_80 and sm_90,
and the per-step kernels do not spill. Needs the NVRTC library only, no GPU."""

import pytest
from conftest import add_summary_section

from rnnkernels import _launch, nvrtc_check

pytestmark = pytest.mark.nvrtc


def _nvrtc_or_skip():
    try:
        return nvrtc_check.load_nvrtc()
    except RuntimeError as error:
        pytest.skip(f"NVRTC is not available: {error.__cause__ or error}")


@pytest.fixture(scope="module", params=nvrtc_check.DEFAULT_ARCHES)
def reports(request):
    _nvrtc_or_skip()
    arch = request.param
    found = nvrtc_check.compile_sources(_launch.KERNELS, arch)
    add_summary_section(f"ptxas resource usage, {arch} (NVRTC)", nvrtc_check.format_table(found))
    return found


def test_every_table_instance_compiles(reports):
    compiled = {r.name for r in reports}
    listed = {name for names in _launch.KERNELS.values() for name in names}
    assert compiled == listed
    cell = _launch.PROJECTED_CELL
    assert {cell.forward_name(False), cell.forward_name(True), cell.backward_name()} <= compiled
    # Every tile the heuristic can return is in the table, for every dtype.
    for dtype in _launch.STORAGE_TYPES:
        for tile in _launch.STEP_TILES:
            assert {tile.backward_name(False, dtype), tile.backward_name(True, dtype)} <= compiled
            assert {tile.forward_name(False, dtype), tile.forward_name(True, dtype)} <= compiled
            for cell in _launch.CELL_KERNELS.values():
                assert {cell.backward_name(tile, False, dtype), cell.backward_name(tile, True, dtype)} <= compiled
                assert {cell.forward_name(tile, False, dtype), cell.forward_name(tile, True, dtype)} <= compiled


def test_step_kernels_do_not_spill(reports):
    step_reports = [r for r in reports if r.is_step_kernel]
    # forward inference and training, backward with and without step norms, per dtype;
    # persistent: forward x {scalar, 16-byte staging}, per dtype. The GRU: as the LSTM's
    # step kernels; the Elman RNN: tanh and relu, a forward without a Training flag.
    # Their persistent kernels: GRU forward {training} x {staging}, backward {staging}
    # x {norms}; Elman tanh and relu, forward {staging}, backward {staging} x {norms}.
    persistent = 4 + 2 + (4 + 4) + 2 * (2 + 4)
    gru, rnn = 4, 2 * 3
    per_dtype = (4 + gru + rnn) * len(_launch.STEP_TILES) + persistent
    # proj_size's pointwise cells (rnnkernels/_projected.py): forward inference and
    # training, backward; float32 workspaces, one set for every dtype.
    projected = 3
    assert len(step_reports) == per_dtype * len(_launch.STORAGE_TYPES) + projected
    assert sum("lstm_projected_" in r.name for r in step_reports) == projected
    assert sum("persistent" in r.name for r in step_reports) == persistent * len(_launch.STORAGE_TYPES)
    spilling = [r for r in step_reports if r.spill_stores or r.spill_loads or r.stack_bytes]
    assert not spilling, nvrtc_check.format_table(spilling)


def test_registers_within_launch_bounds(reports):
    assert not nvrtc_check.problems(reports)
    for r in reports:
        assert 0 < r.registers <= r.register_limit, r
        assert r.shared_bytes <= 48 * 1024, f"{r.name} exceeds the 48 KiB of static shared memory"


def test_parse_ptxas_log():
    log = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem\n"
    )
    assert nvrtc_check.parse_ptxas_log(log) == {
        "_Z3fooPf": {"registers": 40, "shared_bytes": 2048, "stack_bytes": 8, "spill_stores": 4, "spill_loads": 12}
    }


def test_tile_heuristic_picks_listed_tiles():
    for batch in (1, 2, 3, 4, 5, 8, 16, 17, 64, 1000):
        for hidden in (1, 7, 33, 512, 4096):
            for sm_count in (4, 132):
                assert _launch.choose_step_tile(batch, hidden, sm_count) in _launch.STEP_TILES
    assert _launch.choose_step_tile(1, 512, 132).batch_tile == 1
    assert _launch.choose_step_tile(256, 1024, 132).name == "batch16"


def test_persistent_static_shared_memory_within_the_plans_reserve(reports):
    """The persistent plan keeps _persistent.STATIC_SHARED_BYTES of the opt-in maximum
    free for the kernels' static shared memory; more static than that and a plan at the
    limit would not launch on the GPU (static + dynamic over the opt-in maximum)."""
    from rnnkernels import _persistent

    persistent = [r for r in reports if r.name.startswith(_persistent.KERNEL_PREFIXES)]
    assert persistent
    over = [r for r in persistent if r.shared_bytes > _persistent.STATIC_SHARED_BYTES]
    assert not over, nvrtc_check.format_table(over)
