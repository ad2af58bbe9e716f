"""rnnkernels.cost_model: the counted quantities, the device constructors, the chooser
hook, and the README's prediction table staying what the CLI prints."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rnnkernels import _launch, cost_model
from rnnkernels.cost_model import Problem

REPO = Path(__file__).resolve().parent.parent
H200 = cost_model.DEVICES["H200"]


def test_every_launch_variant_has_a_model():
    # A variant added to _launch.VARIANTS without a model would make the chooser and
    # the session's predicted column silently skip it.
    assert set(_launch.VARIANTS) <= set(cost_model.MODELS)


def test_fma_efficiency_counts_shared_loads_per_fma():
    # 4 gate weights + rows h values loaded per 4·rows FMAs; one warp-load per clock
    # against four warp-FMAs per clock.
    assert cost_model.fma_efficiency(1) == pytest.approx(1 / 5)
    assert cost_model.fma_efficiency(4) == pytest.approx(1 / 2)
    assert cost_model.fma_efficiency(8) == pytest.approx(2 / 3)


def test_gemm_time_is_flops_over_rate():
    us = cost_model.gemm_us(64, 2048, 512, H200, 0.5)
    assert us == pytest.approx(2 * 64 * 2048 * 512 / (H200.fp32_tflops * 1e6 * 0.5))


def test_step_kernel_counts_the_l2_rereads_of_its_tile():
    # B = 64, H = 512 on 132 SMs: the launcher picks the batch4 tile (16 units x 4 rows),
    # grid 32 x 16; every block row re-reads W_hh, every block column re-reads h.
    problem = Problem(64, 512)
    tile = _launch.choose_step_tile(64, 512, H200.sms)
    assert (tile.name, tile.grid(64, 512)) == ("batch4", (32, 16, 1))
    us, terms, counts = cost_model.step_kernel_us("forward_inference", problem, H200)
    assert counts["l2_bytes"] == 16 * 4 * 512 * 512 * 4 + 32 * 64 * 512 * 4
    assert counts["flops"] == 2 * 64 * 4 * 512 * 512  # 64 and 512 fill whole tiles
    # B = 3 runs a whole batch tile of 4 rows (zero-filled): executed FMAs count.
    _, _, padded = cost_model.step_kernel_us("forward_inference", Problem(3, 512), H200, tile)
    assert padded["flops"] == 2 * 4 * 4 * 512 * 512
    assert terms["l2_us"] == pytest.approx(counts["l2_bytes"] / (H200.l2_gbs * 1e3))
    assert us == max(terms.values())
    # float16 storage halves the W_hh bytes, not the float32 h re-reads.
    _, _, half = cost_model.step_kernel_us("forward_inference", Problem(64, 512, dtype="float16"), H200)
    assert half["l2_bytes"] == 16 * 4 * 512 * 512 * 2 + 32 * 64 * 512 * 4


def test_best_step_tile_ranks_the_tile_table():
    problem = Problem(64, 512)
    tile, us = cost_model.best_step_tile("forward_inference", problem, H200)
    assert tile in _launch.STEP_TILES
    assert us == min(cost_model.step_kernel_us("forward_inference", problem, H200, t)[0] for t in _launch.STEP_TILES)
    only = _launch.STEP_TILES[-1]
    assert cost_model.best_step_tile("backward", problem, H200, tiles=[only])[0] is only


def test_step_variant_is_launch_bound_when_the_kernel_is_short():
    small = Problem(1, 32)
    breakdown = cost_model.explain("step", "forward_inference", small, H200)
    assert breakdown.terms["kernel_us"] + H200.graph_node_us < H200.python_launch_us
    assert breakdown.us == pytest.approx(H200.python_launch_us + breakdown.terms["gemm_us"])
    # The graph variant pays the graph node instead of the Python launch.
    assert cost_model.predict("graph", "forward_inference", small, H200) < breakdown.us


def test_persistent_formula_and_infeasible_sizes():
    problem = Problem(1, 512)
    b = cost_model.explain("persistent", "forward_inference", problem, H200)
    # The launcher's plan on 132 SMs: 4 units a block (128 blocks), one chunk; the row
    # tile of 4 computes 3 padded rows beside the one real row.
    assert (b.counts["units"], b.counts["blocks"], b.counts["chunks"]) == (4, 128, 1)
    block_fmas = 4 * (4 * 4) * 512
    expected = (H200.grid_sync_ns / 1e3
                + H200.l2_latency_ns / 1e3 + 512 * 4 / (H200.l2_gbs * 1e3 / H200.sms)
                + max(2 * block_fmas / (H200.fp32_tflops * 1e6 / H200.sms * cost_model.fma_efficiency(4)),
                      b.terms["hbm_us"])
                + b.counts["partials_wavefronts"] / (H200.clock_ghz * 1e3)
                + b.terms["gemm_us"])
    # One row (of a row tile of 4): 4 units x 4 gates x 8 k-parts loaded by 4 threads,
    # 4 tiles x 8 k-parts storing 16 partials each, conflict-free (tests/test_shared_banks.py).
    assert b.counts["partials_wavefronts"] == 4 * 8 + 16
    assert b.us == pytest.approx(expected)
    # 16·H² bytes of float32 W_hh at H = 2048 is 64 MiB: more than any table entry's
    # shared memory in all.
    too_big = cost_model.explain("persistent", "forward_inference", Problem(4, 2048), H200)
    assert math.isinf(too_big.us) and "does not fit" in too_big.reason
    name, us = cost_model.best_variant(["persistent", "graph", "step"], "forward_inference", Problem(4, 2048), H200)
    assert name == "graph" and math.isfinite(us)


@pytest.mark.parametrize("variant", sorted(cost_model.MODELS))
@pytest.mark.parametrize("direction", cost_model.DIRECTIONS)
def test_predictions_grow_with_the_problem(variant, direction):
    for dev in cost_model.DEVICES.values():
        previous = 0.0
        for batch, hidden in ((1, 64), (4, 128), (16, 256), (64, 512)):
            us = cost_model.predict(variant, direction, Problem(batch, hidden), dev)
            assert math.isfinite(us) and us >= previous, (dev.name, batch, hidden, us, previous)
            previous = us


def test_training_mode_is_forward_training_plus_backward():
    p = Problem(16, 768)
    for variant in cost_model.MODELS:
        both = cost_model.predict_mode(variant, "training", p, H200)
        assert both == pytest.approx(cost_model.predict(variant, "forward_training", p, H200)
                                     + cost_model.predict(variant, "backward", p, H200))
    with pytest.raises(ValueError, match="mode"):
        cost_model.predict_mode("step", "decode", p, H200)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="variant"):
        cost_model.predict("fused", "backward", Problem(1, 8))
    with pytest.raises(ValueError, match="direction"):
        cost_model.predict("step", "sideways", Problem(1, 8))
    with pytest.raises(ValueError, match="batch"):
        Problem(0, 8)
    with pytest.raises(ValueError, match="dtype"):
        Problem(1, 8, dtype="bfloat16")
    with pytest.raises(ValueError, match="device"):
        cost_model.device("V100")
    with pytest.raises(ValueError, match="no modelled, feasible variant"):
        cost_model.best_variant(["fused"], "backward", Problem(1, 8))


def test_from_cupy_attributes_reads_what_the_device_says_and_names_the_rest():
    attributes = {"MultiProcessorCount": 132, "ClockRate": 1_980_000, "MemoryClockRate": 3_201_000,
                  "GlobalMemoryBusWidth": 6144, "L2CacheSize": 62_914_560, "MaxSharedMemoryPerBlockOptin": 232_448}
    dev = cost_model.from_cupy_attributes("NVIDIA H200", attributes)
    assert "H200" in dev.name and dev.sms == 132 and dev.l2_bytes == 62_914_560
    assert dev.hbm_gbs == pytest.approx(2 * 3_201_000e3 * 6144 / 8 / 1e9)
    assert dev.fp32_tflops == pytest.approx(H200.fp32_tflops)
    assert "l2_latency_ns" in dev.assumed and "hbm_gbs" not in dev.assumed
    # An unknown name with 108 SMs and no clock: the A100 entry, its clock assumed.
    other = cost_model.from_cupy_attributes("Some GPU", {"MultiProcessorCount": 108})
    assert other.name.endswith("rest from A100-SXM)") and "clock_ghz" in other.assumed
    assert other.hbm_gbs == cost_model.DEVICES["A100-SXM"].hbm_gbs


def test_with_measurements_replaces_parameters():
    dev = cost_model.from_cupy_attributes("NVIDIA H200", {"MultiProcessorCount": 132})
    measured = cost_model.with_measurements(dev, {"l2_latency_ns": 250.0, "grid_sync_ns": 1500.0})
    assert measured.l2_latency_ns == 250.0 and measured.grid_sync_ns == 1500.0
    assert "l2_latency_ns" not in measured.assumed and "l2_gbs" in measured.assumed
    p = Problem(1, 512)
    assert cost_model.predict("persistent", "forward_inference", p, measured) > \
        cost_model.predict("persistent", "forward_inference", p, dev)
    with pytest.raises(ValueError, match="not Device parameters"):
        cost_model.with_measurements(dev, {"l3_latency_ns": 1.0})


def test_cli_prints_the_table_labelled_as_predictions():
    done = subprocess.run([sys.executable, "-m", "rnnkernels.cost_model", "--device", "H100-SXM"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("PREDICTIONS (not measurements) for H100-SXM")
    for anchor in cost_model.ANCHORS:
        assert f"| {anchor.label} |" in done.stdout
    assert "Sources of the parameters" in done.stdout and "arXiv:2402.13499" in done.stdout


def test_readme_table_is_the_clis():
    """README's "Cost model predictions" table is `python -m rnnkernels.cost_model
    --markdown` verbatim: change the model, regenerate the README."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- cost-model-table -->\n(.*?)\n<!-- /cost-model-table -->", readme, re.S)
    assert match, "README.md lacks the <!-- cost-model-table --> block"
    assert match.group(1).strip() == cost_model.markdown_table(H200).strip()


def test_the_default_variant_is_the_models_pick_among_those_that_fit(monkeypatch):
    """variant=None: "graph" where the persistent kernels do not fit; where both fit,
    whichever the cost model predicts faster on the runtime's device."""
    from rnnkernels import _persistent

    rt = _launch.EmulatorRuntime()
    device = cost_model.for_runtime(rt)
    assert (device.sms, device.shared_per_block) == (rt.sm_count, rt.max_shared_bytes)
    assert device.fp32_tflops == pytest.approx(cost_model.DEVICES["H100-SXM"].fp32_tflops * rt.sm_count / 132)
    assert _launch._default_variant(rt, 3, 33, "float32", None, "backward") == "persistent"
    assert _launch._default_variant(rt, 3, 33, "float32", _launch.STEP_TILES[0], "backward") == "graph"
    # Make the model prefer the graph: the chooser follows it.
    slower = dict(cost_model.MODELS)
    slower["persistent"] = lambda direction, p, dev: cost_model.Breakdown("persistent", direction, 1e9)
    monkeypatch.setattr(cost_model, "MODELS", slower)
    assert _launch._default_variant(rt, 3, 33, "float32", None, "forward_training") == "graph"
    # Where the persistent kernels do not fit, the model is not asked.
    monkeypatch.setattr(_persistent, "choose", lambda *args: "step")
    monkeypatch.setattr(cost_model, "best_variant", None)
    assert _launch._default_variant(rt, 3, 33, "float32", None, "forward_training") == "graph"


@pytest.mark.parametrize("cell", sorted(cost_model.CELL_GATES))
@pytest.mark.parametrize("direction", cost_model.DIRECTIONS)
def test_prefetch_saving_is_one_l2_round_trip_a_step(cell, direction):
    """Every persistent kernel loads its first pair's inputs before the wait: without
    that, the model adds one dependent L2 round trip to each step, and the saving per
    launch counts the T - 1 steps that wait."""
    problem = Problem(1, 512, cell=cell)
    with_prefetch = cost_model.explain("persistent", direction, problem, H200)
    without = cost_model.model_persistent(direction, problem, H200, prefetch=False)
    assert with_prefetch.terms["inputs_us"] == 0.0
    assert without.us - with_prefetch.us == pytest.approx(H200.l2_latency_ns / 1e3)
    saving = cost_model.prefetch_saving(direction, problem, 256, H200)
    assert saving["us_per_step"] == pytest.approx(H200.l2_latency_ns / 1e3)
    assert saving["us_per_launch"] == pytest.approx(255 * H200.l2_latency_ns / 1e3)
    assert 0 < saving["share_of_step"] < 1
    # Where the persistent kernels do not fit (4·H² floats of W_hh at H = 8192: 1 GiB) nothing is saved.
    assert cost_model.prefetch_saving(direction, Problem(4, 8192, cell=cell), 8, H200)["us_per_launch"] == 0.0
    with pytest.raises(ValueError, match="steps"):
        cost_model.prefetch_saving(direction, problem, 0, H200)
