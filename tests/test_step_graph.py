"""The per-step path's two variants, "step" (T launches from Python) and "graph" (the
T launches captured once per call shape and replayed; rnnkernels/_graph.py), against
the float64 reference and against each other; what a replay may and may not reuse;
the CuPy capture glue with a fake CuPy; the real capture on a GPU (marker ``gpu``).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from conftest import cuda_backend_or_skip, emulator_or_skip
from test_cuda_kernels import (
    EMULATED_TOLERANCE,
    GPU_TOLERANCE,
    GRADIENTS,
    SMALL_CASES,
    assert_bitwise_equal,
    assert_matches_reference,
    assert_step_norms_match_reference,
    make_problem,
    reference_results,
    relative_error,
    run_kernels,
    run_step_norms,
)

from rnnkernels import _graph, _launch

# The per-step path's variants (other variants of _launch.VARIANTS have their own tests).
PER_STEP_VARIANTS = ("step", "graph")


@pytest.fixture(autouse=True)
def _fresh_graph_cache():
    """Every test starts and ends with an empty graph cache (no workspace of another
    test's shape, no capture counted twice)."""
    _graph.clear_cache()
    yield
    _graph.clear_cache()


class CountingRuntime(_launch.EmulatorRuntime):
    """The emulator runtime, counting captures (to tell a replay from a new capture)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.captures = 0

    def capture(self):
        self.captures += 1
        return super().capture()


def _forward(rt, problem, training=True, **kwargs):
    return _launch.forward(
        rt, problem.x, problem.w_ih, problem.w_hh, problem.bias, problem.h0, problem.c0, training,
        variant="graph", **kwargs,
    )


# ---------------------------------------------------------------------- emulated
@pytest.mark.emulated
@pytest.mark.parametrize("variant", PER_STEP_VARIANTS)
@pytest.mark.parametrize("shape, bias", SMALL_CASES)
def test_emulated_variant_matches_reference(emulator, variant, shape, bias):
    problem = make_problem(*shape, bias=bias, seed=sum(shape))
    assert_matches_reference(run_kernels(emulator, problem, variant=variant), problem, EMULATED_TOLERANCE)


@pytest.mark.emulated
@pytest.mark.parametrize("variant", PER_STEP_VARIANTS)
def test_emulated_variant_step_norms(emulator, variant):
    problem = make_problem(4, 3, 5, 33, seed=21)
    results = run_step_norms(emulator, problem, variant=variant)
    assert_step_norms_match_reference(results, problem, EMULATED_TOLERANCE)


@pytest.mark.emulated
@pytest.mark.parametrize("tile", _launch.STEP_TILES, ids=lambda tile: tile.name)
def test_emulated_every_step_tile_over_several_rounds(emulator, tile):
    """H = 70 takes 2 to 3 staging rounds forward (k_tile * k_split = 32 or 64 columns of
    H) and 5 to 9 backward (4H), the last one partial; B = 3 leaves rows of every batch
    tile empty. Outputs, gradients and step norms against the reference."""
    problem = make_problem(3, 3, 8, 70, seed=13)
    assert_matches_reference(run_kernels(emulator, problem, step_tile=tile, variant="graph"), problem,
                             EMULATED_TOLERANCE)
    results = run_step_norms(emulator, problem, step_tile=tile, variant="graph")
    assert_step_norms_match_reference(results, problem, EMULATED_TOLERANCE)


def _at_offset(array, offset_bytes):
    """A C-contiguous copy of ``array`` whose data starts ``offset_bytes`` past a 64-byte
    boundary (a view into a larger buffer)."""
    buffer = np.empty(array.nbytes + 128, np.uint8)
    start = (-buffer.ctypes.data) % 64 + offset_bytes
    view = buffer[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    view[...] = array
    return view


@pytest.mark.emulated
@pytest.mark.parametrize("tile", _launch.STEP_TILES, ids=lambda tile: tile.name)
def test_emulated_float4_and_scalar_staging_agree_bitwise(emulator, tile):
    """H = 40 (a multiple of 4): W_hh on a 16-byte boundary takes the step kernels'
    float4 staging (forward and backward), 4 bytes past one the scalar staging; both
    put the same values in shared memory, so every output and gradient is bitwise the
    same (and matches the reference). The step variant passes the caller's W_hh itself
    to the kernels."""
    problem = make_problem(3, 3, 8, 40, seed=17)
    results = {}
    for offset in (0, 4):
        problem.w_hh = _at_offset(problem.w_hh, offset)
        assert problem.w_hh.ctypes.data % 16 == offset
        results[offset] = run_kernels(emulator, problem, step_tile=tile, variant="step")
    assert_bitwise_equal(results[0], results[4])
    assert_matches_reference(results[0], problem, EMULATED_TOLERANCE)


@pytest.mark.emulated
@pytest.mark.parametrize("tile", _launch.STEP_TILES, ids=lambda tile: tile.name)
def test_emulated_sanitized_float4_staging_is_clean(tile):
    """AddressSanitizer finds no out-of-bounds access on the float4 path at the edges
    (H = 40: the last unit tile and the last k round are partial)."""
    emulator_or_skip()
    problem = make_problem(2, 3, 5, 40, seed=23)
    # Its own allocation (a view into a larger buffer would hide an overrun from ASan);
    # malloc's 16-byte alignment puts it on the float4 path.
    problem.w_hh = problem.w_hh.copy()
    assert problem.w_hh.ctypes.data % 16 == 0
    runtime = _launch.EmulatorRuntime(sanitize=True)
    results = run_kernels(runtime, problem, step_tile=tile, variant="step")
    assert_matches_reference(results, problem, EMULATED_TOLERANCE)


def test_batch1_tile_fills_the_sms():
    """At B = 1 the heuristic picks the k-split tile, whose grid gives each of an
    H100/H200's 132 SMs at least one block from H = 528 up (4 units per block)."""
    for hidden in (528, 768, 1024, 4096):
        tile = _launch.choose_step_tile(1, hidden, 132)
        assert tile.k_split > 1 and tile.batch_tile == 1, tile
        grid = tile.grid(1, hidden)
        assert grid[0] * grid[1] >= 132, (hidden, grid)
    for tile in _launch.STEP_TILES:
        assert tile.threads % 32 == 0, f"{tile.name}: whole warps only"
        rows_per_pass = tile.threads // (tile.k_tile * tile.k_split)
        assert tile.threads % (tile.k_tile * tile.k_split) == 0 and tile.unit_tile % rows_per_pass == 0, (
            f"{tile.name}: the forward staging takes whole rows per pass"
        )


@pytest.mark.emulated
def test_emulated_graph_is_bitwise_the_step_variant(emulator):
    """Same kernels, same arguments, same order: the replay gives the step loop's bits,
    outputs, gradients and step norms alike."""
    problem = make_problem(5, 3, 6, 33, seed=2)
    assert_bitwise_equal(run_kernels(emulator, problem, variant="step"), run_kernels(emulator, problem, variant="graph"))
    assert_bitwise_equal(
        run_step_norms(emulator, problem, variant="step"), run_step_norms(emulator, problem, variant="graph")
    )


@pytest.mark.emulated
def test_emulated_graph_replays_with_new_inputs():
    """A second call of the same shape replays the captured graph (no new capture) on
    the new inputs and gives the new answer; what the first call returned is untouched."""
    emulator_or_skip()
    rt = CountingRuntime()
    first, second = make_problem(4, 3, 5, 33, seed=31), make_problem(4, 3, 5, 33, seed=32)
    y1, h1, c1, saved1 = _forward(rt, first)
    kept = [a.copy() for a in (y1, h1, c1, saved1.gates, saved1.h_all, saved1.c_all)]
    assert rt.captures == 1
    y2, h2, c2, _ = _forward(rt, second)
    assert rt.captures == 1, "the second call of one shape must replay, not capture again"
    want2 = reference_results(second)
    for name, got in (("y", y2), ("h_n", h2), ("c_n", c2)):
        assert relative_error(got, want2[name]) < EMULATED_TOLERANCE, f"{name}: a stale answer from the first call?"
    for before, after in zip(kept, (y1, h1, c1, saved1.gates, saved1.h_all, saved1.c_all)):
        assert before.tobytes() == after.tobytes(), "a later call overwrote an earlier call's result"
    # Another shape (or training flag) is another graph.
    _forward(rt, second, training=False)
    assert rt.captures == 2 and len(_graph.CACHE) == 2


@pytest.mark.emulated
def test_emulated_saved_states_of_two_forwards_both_backprop():
    """forward(A), forward(B), then backward(A), backward(B): A's saved state survived
    B's forward, and the backward workspace's reuse between them leaks nothing."""
    emulator_or_skip()
    rt = CountingRuntime()
    problems = [make_problem(3, 3, 5, 33, seed=41), make_problem(3, 3, 5, 33, seed=42)]
    saved = [_forward(rt, p)[3] for p in problems]
    for problem, state in zip(problems, saved):
        grads = _launch.backward(rt, state, problem.dy, problem.dh_n, problem.dc_n, variant="graph")
        want = reference_results(problem)
        for name, got in zip(GRADIENTS, grads):
            assert relative_error(got, want[name]) < EMULATED_TOLERANCE, name
    assert rt.captures == 2  # one forward graph, one backward graph


@pytest.mark.emulated
def test_emulated_graph_deterministic_across_schedules():
    emulator_or_skip()
    problem = make_problem(4, 3, 5, 33, seed=5)
    first = run_kernels(_launch.EmulatorRuntime(seed=1), problem, variant="graph")
    assert_bitwise_equal(first, run_kernels(_launch.EmulatorRuntime(seed=3), problem, variant="graph"))


def test_graph_cache_is_a_bounded_lru():
    cache = _graph.GraphCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.keys() == ["a", "c"], "the least recently used entry goes first"
    assert cache.get("b") is None


def test_recorder_records_instead_of_running_and_replays_in_order():
    ran = []

    def launch(grid, block, args):
        ran.append((args[0], grid, block))

    recorder = _graph.LaunchRecorder()
    with recorder.capture() as captured:
        for t in range(3):
            recorder.record(launch, (1, 1, 1), (32, 1, 1), (t,))
        assert ran == [] and captured.graph is None
    assert not recorder.recording
    captured.graph.launch()
    captured.graph.launch()
    assert ran == [(t, (1, 1, 1), (32, 1, 1)) for t in range(3)] * 2
    with pytest.raises(RuntimeError, match="nest"):
        with recorder.capture():
            with recorder.capture():
                pass
    assert not recorder.recording


# ------------------------------------------------------------ CuPy capture, faked
class _FakeCupy:
    """Enough of CuPy for cupy_capture: streams that log entering, capture and launch."""

    def __init__(self):
        self.log = []
        self.current = types.SimpleNamespace(ptr=0xCA11E5)
        log, fake = self.log, self

        class Graph:
            def launch(self, stream=None):
                log.append(("graph.launch", stream.ptr))

        class Stream:
            def __init__(self, non_blocking=False):
                self.ptr = 0x5EED
                log.append(("Stream", non_blocking))

            def __enter__(self):
                log.append(("enter stream",))
                self.previous, fake.current = fake.current, self
                return self

            def __exit__(self, *exc):
                log.append(("exit stream",))
                fake.current = self.previous

            def begin_capture(self):
                log.append(("begin_capture", fake.current.ptr))

            def end_capture(self):
                log.append(("end_capture",))
                return Graph()

        self.cuda = types.SimpleNamespace(Stream=Stream, get_current_stream=lambda: fake.current)


def test_cupy_capture_on_a_side_stream_replays_on_the_callers_stream():
    cupy = _FakeCupy()
    with _graph.cupy_capture(cupy) as captured:
        cupy.log.append(("launch on", cupy.cuda.get_current_stream().ptr))
    assert cupy.log == [
        ("Stream", True),  # non-blocking: CuPy cannot capture the legacy default stream
        ("enter stream",),
        ("begin_capture", 0x5EED),
        ("launch on", 0x5EED),  # the launches go to the capturing stream
        ("end_capture",),
        ("exit stream",),
    ]
    cupy.log.clear()
    captured.graph.launch()
    assert cupy.log == [("graph.launch", 0xCA11E5)], "replay on the caller's current stream"


def test_cupy_capture_ends_the_capture_when_the_block_fails():
    cupy = _FakeCupy()
    with pytest.raises(ValueError, match="boom"):
        with _graph.cupy_capture(cupy):
            raise ValueError("boom")
    assert ("end_capture",) in cupy.log and cupy.log[-1] == ("exit stream",)


def test_cupy_runtime_capture_and_key(monkeypatch):
    """CupyRuntime wires capture() to cupy_capture and keys graphs by device and the
    caller's stream."""
    cupy = _FakeCupy()
    rt = _launch.CupyRuntime.__new__(_launch.CupyRuntime)
    rt.xp, rt._device_id = cupy, 3
    assert rt.graph_key() == ("cuda", 3, 0xCA11E5)
    with rt.capture() as captured:
        pass
    assert isinstance(captured.graph, _graph.CupyGraph)


# --------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def gpu():
    cupy = cuda_backend_or_skip()
    return _launch.CupyRuntime(), cupy


@pytest.mark.gpu
def test_gpu_graph_is_bitwise_the_step_variant(gpu):
    rt, cupy = gpu
    problem = make_problem(16, 19, 24, 96, seed=19)
    run = dict(to_device=cupy.asarray, to_host=cupy.asnumpy)
    step = run_kernels(rt, problem, variant="step", **run)
    graph = run_kernels(rt, problem, variant="graph", **run)
    assert_bitwise_equal(step, graph)
    assert_matches_reference(graph, problem, GPU_TOLERANCE)


@pytest.mark.gpu
def test_gpu_graph_replays_new_inputs_on_a_side_stream(gpu):
    """Captured on the default stream's call, replayed for new inputs on a side stream
    (another key: its own graph) and again on the default stream: every answer fresh."""
    rt, cupy = gpu
    # Only this test's graphs: earlier GPU tests (other streams: torch's, side streams)
    # leave keys in the shared cache that the count below must not see.
    _graph.clear_cache()
    run = dict(to_device=cupy.asarray, to_host=cupy.asnumpy, variant="graph")
    for seed in (1, 2):
        problem = make_problem(8, 5, 12, 70, seed=seed)
        assert_matches_reference(run_kernels(rt, problem, **run), problem, GPU_TOLERANCE)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        problem = make_problem(8, 5, 12, 70, seed=3)
        results = run_kernels(_launch.CupyRuntime(), problem, **run)
        stream.synchronize()
    assert_matches_reference(results, problem, GPU_TOLERANCE)
    keys = _graph.CACHE.keys()
    assert len({key[0] for key in keys}) == 2, "one set of graphs per stream"


@pytest.mark.gpu
def test_gpu_saved_states_of_two_forwards_both_backprop(gpu):
    rt, cupy = gpu
    problems = [make_problem(6, 4, 9, 40, seed=s) for s in (51, 52)]
    device = [{k: None if v is None else cupy.asarray(v) for k, v in vars(p).items()} for p in problems]
    saved = [
        _launch.forward(rt, d["x"], d["w_ih"], d["w_hh"], d["bias"], d["h0"], d["c0"], True, variant="graph")[3]
        for d in device
    ]
    for problem, d, state in zip(problems, device, saved):
        grads = _launch.backward(rt, state, d["dy"], d["dh_n"], d["dc_n"], variant="graph")
        want = reference_results(problem)
        for name, got in zip(GRADIENTS, grads):
            assert relative_error(cupy.asnumpy(got), want[name]) < GPU_TOLERANCE, name
