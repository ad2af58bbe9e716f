"""Numbered kernel experiments (benchmarks/kernels/) keep compiling and stay correct.

Only the CPU-side checks: the emulated validation on a few tiny shapes and the NVRTC
compile with ptxas's report. Timing needs a GPU and is the experiment's own job
(see its docstring for the command).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from rnnkernels import emulator, nvrtc_check

EXPERIMENTS = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels"


def load_experiment(file_name: str):
    """Imports benchmarks/kernels/<file_name> (its name starts with a digit, so not by
    an import statement)."""
    module_name = "experiment_" + Path(file_name).stem
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXPERIMENTS / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def persistent():
    return load_experiment("02_persistent_forward.py")


@pytest.mark.emulated
@pytest.mark.skipif(not emulator.compiler_available(), reason="the CPU emulator needs a C++ compiler (g++ or $CXX) on PATH")
def test_02_persistent_forward_emulated(persistent):
    # H = 7 and 33: a partly empty last block and a float4 tail; B = 3 with the
    # one-row tile: three chunks per step; with batch16: two row groups, one empty.
    tiles = {tile.name: tile for tile in persistent.TILES}
    cases = [
        ((5, 3, 6, 7), [tiles["batch1"], tiles["batch16"]]),
        ((3, 1, 40, 33), [tiles["batch4"]]),
    ]
    start = time.perf_counter()
    failures = []
    for shape, shape_tiles in cases:
        failures += persistent.validate_emulated(shapes=[shape], seeds=(0, 1), tiles=shape_tiles, log=lambda line: None)
    assert not failures, "\n".join(failures)
    assert time.perf_counter() - start < 60, "the emulated check got slow; shrink the shapes"


def test_02_tile_choice_fits_and_covers_the_batch(persistent):
    h100 = {"sm_count": 132, "max_shared": 232448}
    for batch, hidden in persistent.GPU_SHAPES:
        tile = persistent.choose_tile(batch, hidden, **h100)
        unit_tile = persistent.unit_tile_for(hidden, h100["sm_count"])
        assert persistent.shared_bytes(tile, unit_tile, hidden) <= h100["max_shared"]
        assert persistent.grid_for(hidden, unit_tile)[0] <= h100["sm_count"]
    assert persistent.largest_hidden(**h100) == 1208


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", nvrtc_check.DEFAULT_ARCHES)
def test_02_persistent_forward_compiles_without_spills(persistent, arch):
    try:
        nvrtc_check.load_nvrtc()
    except RuntimeError as error:
        pytest.skip(f"NVRTC is not available: {error.__cause__ or error}")
    reports = persistent.compile_report(arch)
    assert {r["name"] for r in reports} == {tile.kernel_name() for tile in persistent.TILES}
    for r in reports:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0, r
        # __launch_bounds__(256, 1): one block of 256 threads per SM.
        assert 0 < r["registers"] <= min(255, 65536 // r["threads"]), r
        assert r["shared_bytes"] == 0, r  # all of it is dynamic: the W_hh slice and the h chunk
