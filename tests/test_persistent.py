"""The persistent, weight-stationary LSTM kernels (csrc/persistent.cuh,
lstm_forward_persistent, lstm_backward_persistent; launch plan rnnkernels/_persistent.py).

* emulated: against the float64 reference over the small shape grid (float32 by relative
  error, float16 by the error-ratio rule of test_cuda_kernels.py), training and
  inference, with and without step norms; the splitting and chunking paths forced by a
  smaller emulated device; every pair of forward and backward variants; bitwise
  determinism across runs and scheduling seeds; planted synchronisation bugs that the
  emulator must catch.
* plan and chooser: pure Python, no kernel runs.
* gpu: the same checks through CuPy, skipped with the reason where there is no GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cuda_backend_or_skip, emulator_or_skip
from test_cuda_kernels import (
    EMULATED_TOLERANCE,
    GPU_TOLERANCE,
    GRADIENTS,
    assert_bitwise_equal,
    assert_float16_beats_naive,
    assert_matches_reference,
    assert_step_norms_match_reference,
    make_norm_problem,
    make_problem,
    reference_results,
    relative_error,
    run_kernels,
    run_step_norms,
    to_float16,
)

from rnnkernels import _launch, _persistent, _sources

# ------------------------------------------------------------------ shape grid
# B in {1, 3, 5}, H in {1, 5, 33} (none a multiple of 4: scalar staging of h) plus
# H = 12 (16-byte staging of h), I != H, T in {1, 4}.
GRID_SHAPES = [
    (steps, batch, hidden + 2, hidden) for steps in (1, 4) for batch in (1, 3, 5) for hidden in (1, 5, 12, 33)
]


def shape_id(shape):
    return "T{}-B{}-I{}-H{}".format(*shape)


def persistent_plans(runtime, batch, hidden):
    forward = _persistent.plan_for(runtime, _persistent.FORWARD, batch, hidden)
    backward = _persistent.plan_for(runtime, _persistent.BACKWARD, batch, hidden)
    return forward, backward


# ----------------------------------------------------------------------- emulated
@pytest.mark.emulated
@pytest.mark.parametrize("shape", GRID_SHAPES, ids=shape_id)
def test_emulated_persistent_matches_reference(emulator, shape):
    # Bias and initial state on for odd seeds, off for even: both on every H.
    seed = sum(shape)
    with_extras = seed % 2 == 1
    problem = make_problem(*shape, bias=with_extras, initial_state=with_extras, seed=seed)
    assert _persistent.choose(emulator, shape[1], shape[3]) == "persistent"
    assert_matches_reference(run_kernels(emulator, problem, variant="persistent"), problem, EMULATED_TOLERANCE)


@pytest.mark.emulated
@pytest.mark.parametrize("bias_and_state", (True, False), ids=("bias-state", "nobias-zerostate"))
@pytest.mark.parametrize("shape", [(4, 5, 7, 33), (1, 3, 3, 5), (4, 1, 14, 12)], ids=shape_id)
def test_emulated_persistent_bias_and_state(emulator, shape, bias_and_state):
    problem = make_problem(*shape, bias=bias_and_state, initial_state=bias_and_state, seed=3)
    assert_matches_reference(run_kernels(emulator, problem, variant="persistent"), problem, EMULATED_TOLERANCE)


@pytest.mark.emulated
@pytest.mark.parametrize("upstream", ("all", "y", "state", "none"))
@pytest.mark.parametrize("shape", [(4, 5, 7, 33), (1, 3, 3, 5), (4, 1, 14, 12)], ids=shape_id)
def test_emulated_persistent_step_norms(emulator, shape, upstream):
    problem = make_norm_problem(shape, upstream, seed=sum(shape))
    results = run_step_norms(emulator, problem, variant="persistent")
    assert_step_norms_match_reference(results, problem, EMULATED_TOLERANCE)
    if upstream == "none":
        for name in GRADIENTS:
            assert not results[name].any(), f"{name} must be exactly zero without upstream gradients"


@pytest.mark.emulated
@pytest.mark.parametrize("bias_and_state", (True, False), ids=("bias-state", "nobias-zerostate"))
@pytest.mark.parametrize("shape", [(4, 5, 7, 33), (1, 3, 3, 5), (4, 1, 14, 12), (4, 3, 3, 1)], ids=shape_id)
def test_emulated_persistent_float16_beats_naive_float16(emulator, shape, bias_and_state):
    problem = to_float16(make_problem(*shape, bias=bias_and_state, initial_state=bias_and_state, seed=sum(shape)))
    assert _persistent.choose(emulator, shape[1], shape[3], "float16") == "persistent"
    assert_float16_beats_naive(run_kernels(emulator, problem, variant="persistent"), problem)


@pytest.mark.emulated
def test_emulated_persistent_float16_step_norms(emulator):
    problem = to_float16(make_norm_problem((4, 5, 7, 33), "all", seed=2))
    results = run_step_norms(emulator, problem, variant="persistent")
    plain = run_step_norms(emulator, problem, variant="step")
    for name in ("dh_norms", "dc_norms"):
        assert relative_error(results[name], plain[name]) < EMULATED_TOLERANCE, name
    for name in GRADIENTS:
        assert results[name].dtype == np.float16
        assert results[name].tobytes() == results[name + "_plain"].tobytes(), name


# The limits below are the dynamic shared memory a plan may use plus the kernels'
# static shared memory, which the plan keeps free.
STATIC = _persistent.STATIC_SHARED_BYTES

# Limits that force the plan's paths: H split over many blocks with few units each,
# and B staged in several chunks (forward and backward), with scalar (H = 9) and
# 16-byte (H = 12) staging of h.
FORCED = [
    pytest.param(dict(sm_count=16, max_shared_bytes=48 * 1024), (3, 5, 6, 33), False, id="split-33-over-11-blocks"),
    pytest.param(dict(sm_count=2, max_shared_bytes=6 * 1024 + STATIC), (3, 13, 6, 12), True, id="chunked-B13-H12"),
    pytest.param(dict(sm_count=3, max_shared_bytes=2560 + STATIC), (4, 11, 5, 9), True, id="split-and-chunked-B11-H9"),
]


@pytest.mark.emulated
@pytest.mark.parametrize("limits, shape, chunked", FORCED)
def test_emulated_persistent_forced_split_and_chunks(limits, shape, chunked):
    emulator_or_skip()
    runtime = _launch.EmulatorRuntime(**limits)
    steps, batch, _, hidden = shape
    forward, backward = persistent_plans(runtime, batch, hidden)
    assert forward is not None and backward is not None, "the limits must still fit one row tile"
    assert forward.blocks > 1 and backward.blocks > 1
    if chunked:  # several chunks of B rows in both directions: the path this case exists for
        assert forward.chunk_rows < batch and backward.chunk_rows < batch, (forward, backward)
    problem = make_norm_problem(shape, "all", seed=sum(shape))
    assert_matches_reference(run_kernels(runtime, problem, variant="persistent"), problem, EMULATED_TOLERANCE)
    assert_step_norms_match_reference(run_step_norms(runtime, problem, variant="persistent"), problem,
                                      EMULATED_TOLERANCE)


@pytest.mark.emulated
@pytest.mark.parametrize("forward_variant, backward_variant", [("persistent", "step"), ("step", "persistent")])
@pytest.mark.parametrize("dtype", ("float32", "float16"))
def test_emulated_cross_pairs(emulator, forward_variant, backward_variant, dtype):
    """Any forward variant's Saved feeds any backward variant: the cross pairs agree
    with the reference, and the backward of a pair gives the same bits whichever
    forward saved the state, up to the forward's own rounding (checked against the
    straight pair by tolerance)."""
    problem = make_problem(4, 5, 7, 33, seed=41)
    if dtype == "float16":
        problem = to_float16(problem)
    crossed = run_kernels(emulator, problem, variant=forward_variant, backward_variant=backward_variant)
    if dtype == "float32":
        assert_matches_reference(crossed, problem, EMULATED_TOLERANCE)
    else:
        assert_float16_beats_naive(crossed, problem)
    straight = run_kernels(emulator, problem, variant=backward_variant)
    for name in GRADIENTS:
        assert relative_error(crossed[name], straight[name].astype(np.float64)) < 5 * EMULATED_TOLERANCE, name


@pytest.mark.emulated
def test_emulated_persistent_deterministic_across_runs_and_seeds():
    emulator_or_skip()
    problem = make_norm_problem((4, 5, 7, 33), "all", seed=5)
    limits = dict(sm_count=8, max_shared_bytes=7680 + STATIC)  # 7 blocks, B in two chunks
    first = run_kernels(_launch.EmulatorRuntime(seed=1, **limits), problem, variant="persistent")
    first_norms = run_step_norms(_launch.EmulatorRuntime(seed=1, **limits), problem, variant="persistent")
    for seed in (1, 2, 3):
        runtime = _launch.EmulatorRuntime(seed=seed, **limits)
        assert_bitwise_equal(first, run_kernels(runtime, problem, variant="persistent"))
        assert_bitwise_equal(first_norms, run_step_norms(runtime, problem, variant="persistent"))


@pytest.mark.emulated
def test_emulated_persistent_same_bits_in_stale_and_sequential_memory():
    """The emulator runs cooperative launches in its stale memory model by default (a
    non-coherent L1: reads see another block's stores only through the release/acquire
    and __ldcg that persistent.cuh uses); the kernels give the same bits there as in
    the sequentially consistent model, several blocks and chunks deep."""
    emulator_or_skip()
    if not _stale_model_available():
        pytest.skip("this emulator has no stale memory model")
    problem = make_norm_problem((4, 5, 7, 12), "all", seed=12)
    limits = dict(sm_count=3, max_shared_bytes=3328 + STATIC)  # 3 blocks, B in chunks of 4 rows
    forward, backward = persistent_plans(_launch.EmulatorRuntime(**limits), 5, 12)
    assert forward.blocks == backward.blocks == 3 and forward.chunk_rows == backward.chunk_rows == 4
    runs = {model: run_step_norms(_launch.EmulatorRuntime(memory_model=model, **limits), problem, variant="persistent")
            for model in ("stale", "sequential")}
    assert_step_norms_match_reference(runs["stale"], problem, EMULATED_TOLERANCE)
    assert_bitwise_equal(runs["stale"], runs["sequential"])


@pytest.mark.emulated
def test_emulated_default_is_persistent_where_it_fits(emulator):
    """variant=None runs the persistent kernels where they fit (same bits as asking for
    them) and the per-step kernels where they do not (their default, "graph")."""
    problem = make_problem(3, 3, 5, 33, seed=8)
    assert_bitwise_equal(run_kernels(emulator, problem), run_kernels(emulator, problem, variant="persistent"))
    tiny = _launch.EmulatorRuntime(max_shared_bytes=1024)  # W_hh's slice of H = 33 does not fit
    assert _persistent.choose(tiny, 3, 33) == "step"
    assert_bitwise_equal(run_kernels(tiny, problem), run_kernels(tiny, problem, variant="graph"))
    assert_bitwise_equal(run_kernels(tiny, problem), run_kernels(tiny, problem, variant="step"))
    with pytest.raises(ValueError, match="does not fit"):
        run_kernels(tiny, problem, variant="persistent")


@pytest.mark.emulated
def test_emulated_persistent_through_the_api():
    """rnnkernels.lstm_forward / lstm_backward on backend="emulated" take the default
    (persistent here) and give the launch plan's bits."""
    emulator_or_skip()
    import rnnkernels

    problem = make_problem(3, 2, 4, 9, seed=31)
    out = rnnkernels.lstm_forward(problem.x, problem.w_ih, problem.w_hh, b_ih=problem.bias,
                                  b_hh=np.zeros_like(problem.bias), h0=problem.h0, c0=problem.c0, backend="emulated")
    grads = rnnkernels.lstm_backward(out, problem.dy, problem.dh_n, problem.dc_n)
    direct = run_kernels(_launch.EmulatorRuntime(), problem, variant="persistent")
    for name, value in (("y", out.y), ("h_n", out.h_n), ("c_n", out.c_n), ("dx", grads.dx), ("dw_hh", grads.dw_hh),
                        ("dh0", grads.dh0), ("dc0", grads.dc0)):
        assert value.tobytes() == direct[name].tobytes(), name


@pytest.mark.emulated
def test_emulated_persistent_inputs_not_modified(emulator):
    problem = make_norm_problem((2, 3, 4, 5), "all", seed=4)
    before = {name: None if v is None else v.copy() for name, v in vars(problem).items()}
    run_step_norms(emulator, problem, variant="persistent")
    run_kernels(emulator, problem, variant="persistent")
    for name, value in vars(problem).items():
        if value is not None:
            assert value.tobytes() == before[name].tobytes(), f"{name} was modified"


# --------------------------------------------------------- planted bugs must fail
class _PlantedRuntime(_launch.EmulatorRuntime):
    """The emulator runtime on a copy of csrc/ with one edit to persistent.cuh."""

    def __init__(self, folder: Path, **kwargs):
        super().__init__(**kwargs)
        self.folder = folder

    def function(self, source, name_expression):
        from rnnkernels import emulator

        module = emulator.load_module([str(self.folder / source)], tuple(_launch.KERNELS[source]),
                                      include_dirs=(str(self.folder),))
        kernel = module.get_function(name_expression)

        def launch(grid, block, args, shared_mem=0, cooperative=False):
            # No memory_model: the emulator's default for the launch (cooperative ones
            # run in the stale model where the emulator has it).
            return kernel(grid, block, args, shared_mem=shared_mem, cooperative=cooperative, seed=self.seed)

        return launch


def _stale_model_available() -> bool:
    """Whether the emulator models a non-coherent L1 (the memmodel work: stale reads
    unless __ldcg/acquire/release are used as persistent.cuh documents)."""
    from rnnkernels import emulator

    return hasattr(emulator, "memory_model_for")


# name: (text of persistent.cuh, its replacement, whether only a memory model with
# stale reads can see the bug: a sequentially consistent emulator cannot).
PLANTED_BUGS = {
    # The consumers do not wait for the producers' flags.
    "no-wait": ("while (flag.load(cuda::memory_order_acquire) < count) {",
                "while (false && flag.load(cuda::memory_order_acquire) < count) {", False),
    # A producer publishes before its block has finished writing the state.
    "early-publish": ("    __syncthreads();\n    if (threadIdx.x == 0) flag_ref",
                      "    if (threadIdx.x == 0) flag_ref", False),
    # The state is read through L1 (a plain load), which may hold a stale line.
    "plain-load": ("value[i] = __ldcg(reinterpret_cast<const float4*>(p));",
                   "value[i] = *reinterpret_cast<const float4*>(p);", True),
    # The flag is published without release: the state may not be visible yet.
    "relaxed-publish": ("flag_ref(flags[blockIdx.x]).store(count, cuda::memory_order_release);",
                        "flag_ref(flags[blockIdx.x]).store(count, cuda::memory_order_relaxed);", True),
    # The flag is polled without acquire. The stale model catches this on 1 of the 6
    # seeds only (a sleep in the poll loop refreshes what __ldcg reads, so only a
    # producer that publishes between the last sleep and the last poll exposes it);
    # test_ptx_exchange_contract is the deterministic guard: ptx_check rejects a poll
    # without acquire.
    "relaxed-poll": ("while (flag.load(cuda::memory_order_acquire) < count) {",
                     "while (flag.load(cuda::memory_order_relaxed) < count) {", True),
    # The block does not wait for its polling threads: the others read the state early.
    "no-barrier-after-wait": ("2 * backoff : 512;\n        }\n    }\n    __syncthreads();\n}",
                              "2 * backoff : 512;\n        }\n    }\n}", False),
}


@pytest.mark.emulated
@pytest.mark.parametrize("bug", PLANTED_BUGS)
def test_emulated_planted_synchronisation_bug_is_caught(tmp_path, bug):
    """With a synchronisation step removed from persistent.cuh, some scheduling seed
    gives wrong results (or the emulator reports an error): the tests above would
    catch the bug. The memory-ordering bugs need the emulator's stale memory model."""
    emulator_or_skip()
    from rnnkernels.emulator import EmulatorError

    old, new, needs_stale_model = PLANTED_BUGS[bug]
    if needs_stale_model and not _stale_model_available():
        pytest.skip("this emulator is sequentially consistent (no stale memory model yet): it cannot see this bug")

    folder = tmp_path / "csrc"
    shutil.copytree(_sources.csrc_dir(), folder)
    header = folder / "persistent.cuh"
    text = header.read_text()
    assert text.count(old) == 1, f"the planted edit no longer matches persistent.cuh: {old!r}"
    header.write_text(text.replace(old, new))
    # Build the edited modules first, outside the try below: a compile error must fail
    # the test, not count as a caught bug.
    for source in (_launch.FORWARD_SOURCE, _launch.BACKWARD_SOURCE):
        _PlantedRuntime(folder).function(source, next(iter(_launch.KERNELS[source])))
    caught = []
    seeds = range(6 if needs_stale_model else 4)
    for seed in seeds:
        # A new problem per seed (H = 12: the 16-byte staging path, which plain-load
        # edits): a stale read must not find the right answer left in reused memory by
        # the run before (NumPy hands freed buffers back).
        problem = make_problem(4, 5, 7, 12, seed=6 + seed)
        expected = reference_results(problem)
        runtime = _PlantedRuntime(folder, seed=seed, sm_count=4)
        try:
            results = run_kernels(runtime, problem, variant="persistent")
        except EmulatorError as error:
            caught.append(f"seed {seed}: {str(error)[:80]}")
            continue
        worst = max(relative_error(results[name], expected[name]) for name in ("y", "dx", "dw_hh"))
        if not worst < EMULATED_TOLERANCE:
            caught.append(f"seed {seed}: relative error {worst:.1e}")
    assert caught, f"planted bug {bug!r} was not caught by any of {len(seeds)} seeds"
    if not needs_stale_model:  # not a fluke of one seed: most schedules expose these
        assert len(caught) >= 2, caught


@pytest.mark.nvrtc
def test_ptx_exchange_contract():
    """rnnkernels/ptx_check (the memmodel work) on every persistent instance: flags
    published with release, polled with acquire, the exchanged state (h_all forward,
    dgates backward) read only with L1-bypassing loads. Skips until ptx_check exists."""
    ptx_check = pytest.importorskip("rnnkernels.ptx_check", reason="rnnkernels.ptx_check is not in this tree yet")
    try:
        from rnnkernels import nvrtc_check

        nvrtc_check.load_nvrtc()
    except RuntimeError as error:
        pytest.skip(f"NVRTC is not available: {error}")
    for source, exchanged in ((_launch.FORWARD_SOURCE, "h_all"), (_launch.BACKWARD_SOURCE, "dgates")):
        names = [name for name in _launch.KERNELS[source] if name.startswith(_persistent.KERNEL_PREFIXES)]
        assert names
        reports = ptx_check.check_exchanges(_sources.source_path(source), names, exchanged=exchanged, flags="flags",
                                            arch="sm_90")
        bad = [report.explain() for report in reports if not report.ok]
        assert not bad, "\n".join(bad)


# ------------------------------------------------------------ plan and chooser
# Opt-in dynamic shared memory per block: A100 163 KiB, H100/H200 227 KiB.
A100 = dict(sm_count=108, max_shared=166912)
H100 = dict(sm_count=132, max_shared=232448)


@pytest.mark.parametrize("direction", (_persistent.FORWARD, _persistent.BACKWARD))
@pytest.mark.parametrize("batch, hidden", [(64, 512), (16, 768), (1, 512), (1, 1024)])
def test_plan_fits_the_issue_sizes_on_h100(direction, batch, hidden):
    found = _persistent.plan(direction, batch, hidden, **H100)
    assert found is not None
    assert found.blocks <= H100["sm_count"] and found.blocks * found.units >= hidden
    assert (found.blocks - 1) * found.units < hidden, "no block without units"
    assert found.shared_bytes <= H100["max_shared"]
    assert found.chunk_rows % found.tile.row_tile == 0
    assert found.shared_bytes == _persistent.shared_bytes(direction, found.tile, batch, hidden, found.units,
                                                          found.chunk_rows)


def test_plan_chunks_only_when_needed():
    # B = 64, H = 512 forward: all 64 rows fit next to the slice on an H100, so one
    # chunk; the backward stages rows of 4H = 2048 floats and needs chunks.
    forward = _persistent.plan(_persistent.FORWARD, 64, 512, **H100)
    backward = _persistent.plan(_persistent.BACKWARD, 64, 512, **H100)
    assert forward.chunk_rows == 64 and forward.units == 4 and forward.blocks == 128
    assert backward.chunk_rows < 64 and -(-64 // backward.chunk_rows) * backward.chunk_rows - 64 < 4 * 4
    assert _persistent.plan(_persistent.FORWARD, 64, 512, **A100) is not None


def test_plan_refuses_what_does_not_fit():
    # H = 4096 on an H100: 31 units a block, a slice of 124 rows of 4096 floats is
    # 2 MB: far more than 227 KiB. And no SMs or no rows at all.
    assert _persistent.plan(_persistent.FORWARD, 8, 4096, **H100) is None
    assert _persistent.plan(_persistent.BACKWARD, 8, 4096, **H100) is None
    assert _persistent.plan(_persistent.FORWARD, 8, 64, sm_count=0, max_shared=232448) is None


class _Device:
    """A runtime that only answers the chooser's questions."""

    xp = np

    def __init__(self, sm_count, max_shared, cooperative=True, resident=1):
        self.sm_count, self.max_shared_bytes, self.cooperative_launch = sm_count, max_shared, cooperative
        self.resident = resident

    def blocks_per_sm(self, source, name, threads, shared_mem):
        assert name in _launch.KERNELS[source], f"{name} is not in the kernel table"
        return self.resident


def test_chooser():
    assert _persistent.choose(_Device(**H100), 64, 512) == "persistent"
    assert _persistent.choose(_Device(**H100), 16, 768, "float16") == "persistent"
    assert _persistent.choose(_Device(**H100), 64, 4096) == "step"
    assert _persistent.choose(_Device(**H100, cooperative=False), 64, 512) == "step"
    # The compiled instance cannot be resident (registers or shared memory): step.
    assert _persistent.choose(_Device(**H100, resident=0), 64, 512) == "step"


def test_kernel_table_lists_every_persistent_instance():
    names = {name for table in _launch.KERNELS.values() for name in table}
    for storage in _launch.STORAGE_TYPES.values():
        for name in _persistent.TILE.forward_names(storage) + _persistent.TILE.backward_names(storage):
            assert name in names
            assert name.startswith(_launch.STEP_KERNEL_PREFIXES), "the no-spill rule must cover it"


# --------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def gpu():
    cupy = cuda_backend_or_skip()
    return _launch.CupyRuntime(), cupy.asarray, cupy.asnumpy


GPU_SHAPES = [(6, 37, 20, 70), (4, 3, 5, 33), (64, 64, 256, 512), (16, 16, 100, 768), (32, 1, 64, 512), (5, 5, 7, 12)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_gpu_persistent_matches_reference(gpu, shape):
    runtime, to_device, to_host = gpu
    assert _persistent.choose(runtime, shape[1], shape[3]) == "persistent"
    problem = make_problem(*shape, seed=sum(shape))
    results = run_kernels(runtime, problem, variant="persistent", to_device=to_device, to_host=to_host)
    assert_matches_reference(results, problem, GPU_TOLERANCE)
    norms = run_step_norms(runtime, make_norm_problem(shape, "all", seed=1), variant="persistent",
                           to_device=to_device, to_host=to_host)
    assert_step_norms_match_reference(norms, make_norm_problem(shape, "all", seed=1), GPU_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 5, 7, 33), (8, 16, 20, 256)], ids=shape_id)
def test_gpu_persistent_float16_and_cross_pairs(gpu, shape):
    runtime, to_device, to_host = gpu
    problem16 = to_float16(make_problem(*shape, seed=2))
    assert_float16_beats_naive(run_kernels(runtime, problem16, variant="persistent", to_device=to_device,
                                           to_host=to_host), problem16)
    problem = make_problem(*shape, seed=3)
    for forward_variant, backward_variant in (("persistent", "step"), ("step", "persistent")):
        results = run_kernels(runtime, problem, variant=forward_variant, backward_variant=backward_variant,
                              to_device=to_device, to_host=to_host)
        assert_matches_reference(results, problem, GPU_TOLERANCE)


@pytest.mark.gpu
def test_gpu_persistent_deterministic(gpu):
    runtime, to_device, to_host = gpu
    problem = make_norm_problem((16, 19, 24, 96), "all", seed=19)
    first = run_step_norms(runtime, problem, variant="persistent", to_device=to_device, to_host=to_host)
    for _ in range(3):
        assert_bitwise_equal(first, run_step_norms(runtime, problem, variant="persistent", to_device=to_device,
                                                   to_host=to_host))
