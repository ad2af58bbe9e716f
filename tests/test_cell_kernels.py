"""The GRU's and the Elman RNN's (tanh, relu) CUDA kernels (csrc/gru_*.cu, rnn_*.cu on
csrc/step.cuh) through their launch plan (rnnkernels/_launch.py: cell_forward,
cell_backward) on the CPU emulator, against the float64 references
(rnnkernels/gru_reference.py, rnn_reference.py): small shapes that break the tiles
(odd H, B = 1, T = 1, several blocks and rounds), with and without biases, step
norms, float16, every step tile, graph == step bitwise, and the Backend objects."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import cuda_backend_or_skip, emulator_or_skip

from rnnkernels import _graph, _launch, _persistent, cuda, emulated, gru_reference, rnn_reference

pytestmark = pytest.mark.emulated

CELLS = ("gru", "rnn_tanh", "rnn_relu")
GRADIENTS = ("dx", "dw_ih", "dw_hh", "db", "dh0")
# (T, B, I, H): odd H and I != H; B = 1 and T = 1; H over several unit tiles and k
# rounds of the batch tiles (the batch1 tile stages 64 columns per round).
CASES = [(3, 3, 4, 7), (1, 1, 3, 5), (2, 2, 3, 70)]


@pytest.fixture(autouse=True)
def _fresh_graph_cache():
    _graph.clear_cache()
    yield
    _graph.clear_cache()


@pytest.fixture(scope="module")
def rt():
    return emulator_or_skip()


def make_problem(cell, steps, batch, input_size, hidden, *, bias=True, seed=0):
    """float64 inputs, weights ~ U(-1/sqrt(H), 1/sqrt(H)) as torch.nn's (so relu and tanh
    units stay out of saturation), upstream gradients."""
    rng = np.random.default_rng(seed)
    gates = _launch.CELL_KERNELS[cell].gates
    scale = 1.0 / np.sqrt(hidden)
    p = dict(
        x=rng.standard_normal((steps, batch, input_size)),
        w_ih=rng.uniform(-scale, scale, (gates * hidden, input_size)),
        w_hh=rng.uniform(-scale, scale, (gates * hidden, hidden)),
        b_ih=rng.uniform(-scale, scale, gates * hidden) if bias else None,
        b_hh=rng.uniform(-scale, scale, gates * hidden) if bias else None,
        h0=rng.standard_normal((batch, hidden)),
        dy=rng.standard_normal((steps, batch, hidden)),
        dh_n=rng.standard_normal((batch, hidden)),
    )
    return p


def folded_bias(cell, p):
    """The API's folded bias (cells_design.md): GRU [b_r sum, b_z sum, b_in, b_hn], Elman
    b_ih + b_hh; float32."""
    if p["b_ih"] is None:
        return None
    if cell == "gru":
        hidden = p["w_hh"].shape[1]
        b_ih, b_hh = p["b_ih"], p["b_hh"]
        return np.concatenate([b_ih[:2 * hidden] + b_hh[:2 * hidden], b_ih[2 * hidden:], b_hh[2 * hidden:]]).astype(
            np.float32)
    return (p["b_ih"] + p["b_hh"]).astype(np.float32)


def reference(cell, p):
    """(y, h_n, dx, dw_ih, dw_hh, db (folded), dh0, dh_norms) in float64."""
    args = (p["x"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], p["h0"])
    if cell == "gru":
        y, h_n, saved = gru_reference.forward(*args)
        dx, dw_ih, dw_hh, db_ih, db_hh, dh0, norms = gru_reference.backward(saved, p["dy"], p["dh_n"], True)
        hidden = p["w_hh"].shape[1]
        db = None if db_ih is None else np.concatenate([db_ih[:2 * hidden], db_ih[2 * hidden:], db_hh[2 * hidden:]])
    else:
        y, h_n, saved = rnn_reference.forward(*args, nonlinearity=cell[4:])
        dx, dw_ih, dw_hh, db, _, dh0, norms = rnn_reference.backward(saved, p["dy"], p["dh_n"], True)
    return dict(y=y, h_n=h_n, dx=dx, dw_ih=dw_ih, dw_hh=dw_hh, db=db, dh0=dh0, dh_norms=norms)


def run(rt, cell, p, dtype="float32", *, variant=None, step_tile=None, training=True, norms=True):
    """The kernels' results (same keys as :func:`reference`) for inputs rounded to ``dtype``."""
    kernels = _launch.CELL_KERNELS[cell]
    cast = {k: (None if v is None else v.astype(dtype)) for k, v in p.items()}
    y, h_n, saved = _launch.cell_forward(rt, kernels, cast["x"], cast["w_ih"], cast["w_hh"], folded_bias(cell, p),
                                         cast["h0"], training, variant=variant, step_tile=step_tile)
    out = dict(y=y, h_n=h_n)
    if training:
        grads = _launch.cell_backward(rt, saved, cast["dy"], cast["dh_n"], return_step_norms=norms,
                                      variant=variant, step_tile=step_tile)
        out.update(zip(GRADIENTS + (("dh_norms",) if norms else ()), grads))
    return out


def assert_close(got, want, rtol):
    """Every result within ``rtol`` of the reference, relative to the array's largest
    magnitude (1 where that is below 1: the arrays are O(1))."""
    for key, expected in want.items():
        if key not in got:
            continue
        if expected is None:
            assert got[key] is None, key
            continue
        actual = np.asarray(got[key], dtype=np.float64)
        assert actual.shape == expected.shape, (key, actual.shape, expected.shape)
        assert np.isfinite(actual).all(), key
        error = np.abs(actual - expected).max() / max(1.0, np.abs(expected).max())
        assert error <= rtol, f"{key}: relative error {error:.2e} > {rtol:.0e}"


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None:
            assert b[key] is None, key
        else:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key].view(np.uint8), b[key].view(np.uint8)), key


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_matches_reference(rt, cell, shape):
    p = make_problem(cell, *shape)
    got = run(rt, cell, p)
    assert got["y"].dtype == np.float32 and got["dx"].dtype == np.float32
    assert got["dh_norms"].dtype == np.float64 and got["dh_norms"].shape == (shape[0],)
    assert_close(got, reference(cell, p), 2e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_without_bias_and_inference(rt, cell):
    p = make_problem(cell, 2, 3, 4, 5, bias=False, seed=1)
    want = reference(cell, p)
    got = run(rt, cell, p)
    assert got["db"] is None
    assert_close(got, want, 2e-5)
    inference = run(rt, cell, p, training=False)
    assert set(inference) == {"y", "h_n"}
    assert_close(inference, want, 2e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_float16(rt, cell):
    """float16 in and out, float32 math: against the float64 reference of the float16-
    rounded inputs, the error is the one rounding of each output (2^-11 relative) plus
    float32 noise."""
    p = make_problem(cell, 3, 2, 4, 9, seed=2)
    rounded = {k: (None if v is None else v.astype(np.float16).astype(np.float64)) for k, v in p.items()}
    rounded["b_ih"], rounded["b_hh"] = p["b_ih"], p["b_hh"]  # the bias stays float32 (folded)
    got = run(rt, cell, p, "float16")
    assert got["y"].dtype == np.float16 and got["dw_hh"].dtype == np.float16 and got["db"].dtype == np.float16
    assert_close(got, reference(cell, rounded), 2e-3)


@pytest.mark.parametrize("tile", _launch.STEP_TILES, ids=lambda t: t.name)
def test_every_step_tile(rt, tile):
    """Each tile of the table (the heuristic picks few of them on small shapes), for the
    GRU (3 gate blocks) and the relu RNN (1), over more than one k round."""
    for cell in ("gru", "rnn_relu"):
        p = make_problem(cell, 2, 5, 3, 37, seed=3)
        assert_close(run(rt, cell, p, variant="step", step_tile=tile), reference(cell, p), 2e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_graph_is_bitwise_the_step_variant_and_replays(rt, cell):
    p = make_problem(cell, 3, 3, 4, 7, seed=4)
    step = run(rt, cell, p, variant="step")
    assert_bitwise(step, run(rt, cell, p, variant="graph"))
    # A second call of the same shape replays the cached graph on new inputs.
    q = make_problem(cell, 3, 3, 4, 7, seed=5)
    assert_bitwise(run(rt, cell, q, variant="step"), run(rt, cell, q, variant="graph"))


@pytest.mark.parametrize("cell", CELLS)
def test_graph_without_step_norms(rt, cell):
    """Without step norms the backward passes one array for two parameters (the norms'
    slot is a buffer the kernel does not touch): the graph's workspaces must alias the
    same way, or the copy-back overwrites dgh with a workspace the kernels never wrote
    (found in review: every Elman gradient and the GRU's dw_hh, db, dh0 came back NaN)."""
    p = make_problem(cell, 3, 2, 4, 7, seed=8)
    want = reference(cell, p)
    del want["dh_norms"]
    graph = run(rt, cell, p, variant="graph", norms=False)
    assert_close(graph, want, 2e-5)
    assert_bitwise(run(rt, cell, p, variant="step", norms=False), graph)
    # and the graph cached with the aliasing replays correctly, as does the one without
    assert_close(run(rt, cell, p, variant="graph", norms=False), want, 2e-5)
    assert_close(run(rt, cell, p, variant="graph", norms=True), reference(cell, p), 2e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_persistent_takes_unaligned_user_arrays(rt, cell):
    """The persistent kernels read the caller's arrays with scalar loads; only the rows
    the blocks exchange (our own workspace) need 16-byte alignment. A contiguous view at
    a 4-byte offset into a flat buffer (a packed parameter store) must run, not raise."""
    p = make_problem(cell, 2, 3, 4, 8, seed=9)
    kernels = _launch.CELL_KERNELS[cell]

    def unaligned(a):
        flat = np.zeros(a.size + 1, np.float32)
        view = flat[1:].reshape(a.shape)
        view[...] = a
        assert view.ctypes.data % 16 and view.flags.c_contiguous
        return view

    cast = {k: None if v is None else v.astype(np.float32) for k, v in p.items()}
    y, h_n, saved = _launch.cell_forward(rt, kernels, cast["x"], cast["w_ih"], unaligned(cast["w_hh"]),
                                         folded_bias(cell, p), unaligned(cast["h0"]), True, variant="persistent")
    grads = _launch.cell_backward(rt, saved, unaligned(cast["dy"]), unaligned(cast["dh_n"]), variant="persistent")
    want = reference(cell, p)
    assert_close(dict(y=y, h_n=h_n, **dict(zip(GRADIENTS, grads))), {k: want[k] for k in ("y", "h_n", *GRADIENTS)},
                 2e-5)


def test_deterministic_across_schedules():
    p = make_problem("gru", 2, 3, 4, 7, seed=6)
    first = run(emulator_or_skip(seed=1), "gru", p, variant="step")
    assert_bitwise(first, run(emulator_or_skip(seed=7), "gru", p, variant="step"))


def test_inputs_not_modified(rt):
    p = make_problem("gru", 2, 2, 3, 5, seed=8)
    cast = {k: v.astype(np.float32) for k, v in p.items()}
    before = {k: v.copy() for k, v in cast.items()}
    bias = folded_bias("gru", p)
    bias_before = bias.copy()
    kernels = _launch.GRU_KERNELS
    y, h_n, saved = _launch.cell_forward(rt, kernels, cast["x"], cast["w_ih"], cast["w_hh"], bias, cast["h0"], True)
    _launch.cell_backward(rt, saved, cast["dy"], cast["dh_n"])
    for k in cast:
        assert np.array_equal(cast[k], before[k]), k
    assert np.array_equal(bias, bias_before)


# ------------------------------------------------------------------ persistent
def forced_runtime(cell, shape, sm_count, **kwargs):
    """An emulated device of ``sm_count`` SMs with just enough shared memory for one row
    tile of state beside the slices (both directions): H split over blocks, B staged in
    chunks of one row tile. Its own memory model: "stale" (the default for cooperative
    launches: another block's stores are seen only through release/acquire and __ldcg)."""
    steps, batch, _, hidden = shape
    tile = _persistent.TILE
    units = -(-hidden // sm_count)
    need = max(_persistent.shared_bytes(direction, tile, batch, hidden, units, tile.row_tile, cell=cell)
               for direction in (_persistent.FORWARD, _persistent.BACKWARD))
    return _launch.EmulatorRuntime(sm_count=sm_count, max_shared_bytes=need + _persistent.STATIC_SHARED_BYTES,
                                   **kwargs)


PERSISTENT_CASES = [
    # (T, B, I, H), SMs: H = 7 and 9 scalar staging, H = 12 16-byte staging; several
    # blocks; B = 9 in chunks of 4 rows; T = 1; B = 1.
    ((3, 9, 4, 7), 3),
    ((2, 9, 3, 12), 3),
    ((1, 1, 2, 9), 2),
]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape, sm_count", PERSISTENT_CASES, ids=lambda v: str(v))
def test_persistent_split_and_chunked_matches_reference(cell, shape, sm_count):
    emulator_or_skip()
    runtime = forced_runtime(cell, shape, sm_count, memory_model="stale")
    batch, hidden = shape[1], shape[3]
    for direction in (_persistent.FORWARD, _persistent.BACKWARD):
        found = _persistent.plan_for(runtime, direction, batch, hidden, cell=cell)
        assert found is not None and found.cell == cell and found.blocks == min(sm_count, hidden)
        assert found.chunk_rows == _persistent.TILE.row_tile
    p = make_problem(cell, *shape, seed=sum(shape))
    assert_close(run(runtime, cell, p, variant="persistent"), reference(cell, p), 2e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_persistent_float16_without_bias_and_inference(rt, cell):
    p = make_problem(cell, 3, 5, 4, 12, bias=False, seed=10)
    rounded = {k: (None if v is None else v.astype(np.float16).astype(np.float64)) for k, v in p.items()}
    want = reference(cell, rounded)
    got = run(rt, cell, p, "float16", variant="persistent")
    assert got["db"] is None and got["dx"].dtype == np.float16
    assert_close(got, want, 2e-3)
    assert_close(run(rt, cell, p, "float16", variant="persistent", training=False), want, 2e-3)


@pytest.mark.parametrize("cell", CELLS)
def test_persistent_pairs_with_the_step_variants(rt, cell):
    """Every forward variant saves the same arrays: persistent forward with a step
    backward and the reverse; the backward's bits do not depend on which variant
    saved (the saved arrays agree to rounding, so compare by tolerance), and the
    persistent backward agrees with the step backward."""
    p = make_problem(cell, 3, 3, 4, 7, seed=11)
    kernels = _launch.CELL_KERNELS[cell]
    cast = {k: v.astype(np.float32) for k, v in p.items()}
    want = reference(cell, p)
    for forward_variant, backward_variant in (("persistent", "step"), ("step", "persistent")):
        y, h_n, saved = _launch.cell_forward(rt, kernels, cast["x"], cast["w_ih"], cast["w_hh"], folded_bias(cell, p),
                                             cast["h0"], True, variant=forward_variant)
        grads = _launch.cell_backward(rt, saved, cast["dy"], cast["dh_n"], return_step_norms=True,
                                      variant=backward_variant)
        assert_close(dict(zip(GRADIENTS + ("dh_norms",), grads), y=y, h_n=h_n), want, 2e-5)


def test_persistent_deterministic_across_seeds_and_memory_models():
    emulator_or_skip()
    shape = (3, 9, 4, 12)
    for cell in ("gru", "rnn_tanh"):
        p = make_problem(cell, *shape, seed=12)
        first = run(forced_runtime(cell, shape, 3, seed=1), cell, p, variant="persistent")
        for seed, model in ((2, "stale"), (3, "sequential")):
            assert_bitwise(first, run(forced_runtime(cell, shape, 3, seed=seed, memory_model=model), cell, p,
                                      variant="persistent"))


@pytest.mark.parametrize("cell", CELLS)
def test_default_variant_is_persistent_where_it_fits(cell):
    """variant=None: persistent where both directions fit the device (the cost model
    permitting), graph where they do not; the results are those of the chosen variant."""
    emulator_or_skip()
    big = _launch.EmulatorRuntime()
    assert _persistent.choose(big, 3, 7, "float32", cell) == "persistent"
    tiny = _launch.EmulatorRuntime(max_shared_bytes=_persistent.STATIC_SHARED_BYTES + 64)  # no slice fits
    assert _persistent.choose(tiny, 3, 7, "float32", cell) == "step"
    assert _launch._default_variant(tiny, 3, 7, "float32", None, "backward", cell) == "graph"
    p = make_problem(cell, 2, 3, 4, 7, seed=13)
    kernels = _launch.CELL_KERNELS[cell]
    cast = {k: v.astype(np.float32) for k, v in p.items()}
    results = {}
    for variants in ((None, None), tuple(_launch._default_variant(big, 3, 7, "float32", None, direction, cell)
                                         for direction in ("forward_training", "backward"))):
        y, h_n, saved = _launch.cell_forward(big, kernels, cast["x"], cast["w_ih"], cast["w_hh"],
                                             folded_bias(cell, p), cast["h0"], True, variant=variants[0])
        grads = _launch.cell_backward(big, saved, cast["dy"], cast["dh_n"], variant=variants[1])
        results[variants[0]] = dict(zip(GRADIENTS, grads), y=y, h_n=h_n)
    assert_bitwise(*results.values())
    assert_bitwise(run(tiny, cell, p), run(tiny, cell, p, variant="graph"))


@pytest.mark.parametrize("cell", CELLS)
def test_backends_and_saved_arrays(cell):
    """The registered Backend objects (cells_design.md's names) run the contract, and
    saved_arrays rebuilds a Saved whose backward is bitwise the original's."""
    attribute = {"gru": "GRU_BACKEND", "rnn_tanh": "RNN_TANH_BACKEND", "rnn_relu": "RNN_RELU_BACKEND"}[cell]
    assert getattr(cuda, attribute).name == "cuda"
    backend = getattr(emulated, attribute)
    backend.check_available()
    p = make_problem(cell, 2, 3, 4, 5, seed=9)
    f32 = {k: v.astype(np.float32) for k, v in p.items()}
    y, h_n, saved = backend.forward(f32["x"], f32["w_ih"], f32["w_hh"], folded_bias(cell, p), f32["h0"], True)
    grads = backend.backward(saved, f32["dy"], f32["dh_n"], return_step_norms=True)
    assert len(grads) == 6
    layout = backend.saved_arrays.layout(2, 3, 4, 5, np.dtype(np.float32))
    arrays = backend.saved_arrays.to_arrays(saved)
    assert [(a.shape, a.dtype) for a in arrays] == layout
    rebuilt = backend.saved_arrays.from_arrays(f32["x"], f32["w_ih"], f32["w_hh"], True, arrays)
    again = backend.backward(rebuilt, f32["dy"], f32["dh_n"], return_step_norms=True)
    for a, b in zip(grads, again):
        assert np.array_equal(a, b)
    want = reference(cell, p)
    assert_close(dict(zip(GRADIENTS + ("dh_norms",), grads), y=y, h_n=h_n), want, 2e-5)


def test_kernel_table_lists_every_instance_the_plan_can_pick():
    for kernels in _launch.CELL_KERNELS.values():
        for dtype in _launch.STORAGE_TYPES:
            for tile in _launch.STEP_TILES:
                assert kernels.forward_name(tile, True, dtype) in _launch.KERNELS[kernels.forward_source]
                assert kernels.forward_name(tile, False, dtype) in _launch.KERNELS[kernels.forward_source]
                for norms in (False, True):
                    assert kernels.backward_name(tile, norms, dtype) in _launch.KERNELS[kernels.backward_source]
    assert _launch.RNN_RELU_KERNELS.forward_name(_launch.STEP_TILES[0], False) == (
        "rnnkernels::rnn_forward_step<float, true, 32, 4, 4, 32, 1>")


# ------------------------------------------------------------ plan, chooser, PTX
H100 = dict(sm_count=132, max_shared=232448)  # opt-in dynamic shared memory per block


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch, hidden", [(64, 512), (16, 768), (1, 1024)])
def test_plan_fits_the_issue_sizes_on_h100(cell, batch, hidden):
    """The GRU's and Elman's slices are 3/4 and 1/4 of the LSTM's: wherever the LSTM's
    plan fits, theirs does, in no more chunks."""
    for direction in (_persistent.FORWARD, _persistent.BACKWARD):
        found = _persistent.plan(direction, batch, hidden, **H100, cell=cell)
        lstm = _persistent.plan(direction, batch, hidden, **H100)
        assert found is not None and found.cell == cell and found.chunk_rows % found.tile.row_tile == 0
        assert found.shared_bytes == _persistent.shared_bytes(direction, found.tile, batch, hidden, found.units,
                                                              found.chunk_rows, cell=cell)
        assert found.shared_bytes <= H100["max_shared"]
        assert found.chunk_rows >= lstm.chunk_rows  # no more chunks than the LSTM's


def test_cost_model_takes_the_gate_count():
    """The cost model's products and traffic scale with the cell's gate count; the
    LSTM's numbers are what they were (Problem's default cell)."""
    from rnnkernels import cost_model

    dev = cost_model.device("H100-SXM")
    for variant in ("graph", "persistent"):
        for direction in cost_model.DIRECTIONS:
            times = {cell: cost_model.predict(variant, direction, cost_model.Problem(64, 512, cell=cell), dev)
                     for cell in ("lstm", "gru", "rnn_tanh")}
            assert times["lstm"] == cost_model.predict(variant, direction, cost_model.Problem(64, 512), dev)
            assert times["rnn_tanh"] < times["gru"] < times["lstm"], (variant, direction, times)
    with pytest.raises(ValueError, match="cell must be one of"):
        cost_model.Problem(1, 1, cell="lstmp")


@pytest.mark.nvrtc
def test_persistent_exchange_contract_in_ptx():
    """ptx_check on every GRU and Elman persistent instance (sm_90, CuPy's options):
    flags published with release and polled with acquire, the exchanged state (h_all
    forward; dgh, da backward) read only through L2 (.cg)."""
    from rnnkernels import _sources, nvrtc_check, ptx_check

    try:
        nvrtc_check.load_nvrtc()
    except RuntimeError as error:
        pytest.skip(f"NVRTC is not available: {error}")
    def check(source, exchanged):
        # The float instances only: the storage type changes how the weight slice is
        # loaded, once, never the exchange (flags, h or dz through L2); half the compile.
        names = [name for name in _launch.KERNELS[source]
                 if name.startswith(_persistent.KERNEL_PREFIXES) and "<float," in name]
        assert names
        return ptx_check.check_exchanges(_sources.source_path(source), names, exchanged=exchanged, flags="flags",
                                         arch="sm_90")

    jobs = [(kernels.forward_source, "h_all") for kernels in (_launch.GRU_KERNELS, _launch.RNN_TANH_KERNELS)]
    jobs += [(_launch.GRU_KERNELS.backward_source, "dgh"), (_launch.RNN_TANH_KERNELS.backward_source, "da")]
    # Four NVRTC compiles in threads (NVRTC releases the GIL; see nvrtc_check.compile_sources).
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        reports = [report for found in pool.map(lambda job: check(*job), jobs) for report in found]
    assert len(reports) == 4 + 4 + 4 + 8  # GRU forward, backward; Elman (tanh, relu) forward, backward
    bad = [report.explain() for report in reports if not report.ok]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------ gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("variant", _launch.VARIANTS)
@pytest.mark.parametrize("dtype", ("float32", "float16"))
def test_gpu_matches_reference(cell, variant, dtype):
    """Needs an NVIDIA GPU (skipped with the reason elsewhere): every variant of the
    cuda runtime against the float64 reference, float32 and float16, on a shape with
    several blocks and a ragged batch tile."""
    cupy = cuda_backend_or_skip()
    rt = _launch.CupyRuntime()
    p = make_problem(cell, 5, 3, 6, 33, seed=20)
    if dtype == "float16":
        # The reference sees the float16 values; the bias stays float32 (folded).
        p = {k: v if k.startswith("b_") else v.astype(np.float16).astype(np.float64) for k, v in p.items()}
    kernels = _launch.CELL_KERNELS[cell]
    d = {k: cupy.asarray(v.astype(dtype)) for k, v in p.items() if v is not None}
    bias = cupy.asarray(folded_bias(cell, p))
    y, h_n, saved = _launch.cell_forward(rt, kernels, d["x"], d["w_ih"], d["w_hh"], bias, d["h0"], True,
                                         variant=variant)
    grads = _launch.cell_backward(rt, saved, d["dy"], d["dh_n"], return_step_norms=True, variant=variant)
    got = {k: cupy.asnumpy(v) for k, v in zip(("y", "h_n") + GRADIENTS + ("dh_norms",), (y, h_n, *grads))}
    assert_close(got, reference(cell, p), 2e-5 if dtype == "float32" else 2e-3)


# ------------------------------------------------- one launch plan, the LSTM included
def test_one_plan_has_no_per_cell_branch():
    """Issue 15's design: the plan (cell_forward, cell_backward, run_steps, the
    persistent launch) is written once; what differs between cells (the LSTM's c, its
    two step norms, the GRU's b_hn and dgi) lives in each CellKernels' Recurrence."""
    import ast
    import inspect
    import textwrap

    for function in (_launch.cell_forward, _launch.cell_backward, _launch.run_steps, _persistent.launch,
                     _persistent._instance):
        tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
        tree.body = [node for node in tree.body if not (isinstance(node, ast.Expr) and
                                                        isinstance(node.value, ast.Constant))]  # the docstring
        code = ast.unparse(tree)  # without comments, which may name cells
        for branch in ("lstm", "gru", "rnn", "gates ==", ".cell ==", "c_all", "c0", "dc_"):
            assert branch not in code.lower(), f"{function.__name__} branches on a cell: {branch!r}"
    assert _launch.LSTM_KERNELS.recurrence.states == ("h", "c") and _launch.LSTM_KERNELS.state_gradients == 2
    for kernels in _launch.CELL_KERNELS.values():
        assert kernels.recurrence.states == ("h",) and kernels.state_gradients == 1
    # The LSTM's entry points are the generic ones with its CellKernels: no copy of the plan.
    for gone in ("Saved", "gradients_after_loop", "_forward_graph", "_backward_graph"):
        assert not hasattr(_launch, gone), gone
    assert not hasattr(_persistent, "forward") and not hasattr(_persistent, "backward")


def test_state_count_follows_the_cell(rt):
    """States travel as the contract's tuple, one array per state of the cell: a wrong
    count is a TypeError naming the cell and its states, before any launch."""
    p = make_problem("gru", 2, 2, 3, 5, seed=4)
    f32 = {k: None if v is None else v.astype(np.float32) for k, v in p.items()}
    args = (f32["x"], f32["w_ih"], f32["w_hh"], None)
    with pytest.raises(TypeError, match=r"gru forward .*\('h',\)"):
        _launch.cell_forward(rt, _launch.GRU_KERNELS, *args, f32["h0"], f32["h0"], True)
    lstm = {"x": f32["x"], "w_ih": np.zeros((20, 3), np.float32), "w_hh": np.zeros((20, 5), np.float32)}
    with pytest.raises(TypeError, match=r"lstm forward .*\('h', 'c'\)"):
        _launch.cell_forward(rt, _launch.LSTM_KERNELS, lstm["x"], lstm["w_ih"], lstm["w_hh"], None, f32["h0"], True)
    *_, saved = _launch.cell_forward(rt, _launch.LSTM_KERNELS, lstm["x"], lstm["w_ih"], lstm["w_hh"], None,
                                     f32["h0"], f32["h0"], True, variant="step")
    with pytest.raises(TypeError, match=r"lstm backward .*\('h', 'c'\)"):
        _launch.cell_backward(rt, saved, f32["dy"], f32["dh_n"], variant="step")


def test_lstm_backend_saved_arrays_round_trip():
    """The LSTM's Backend objects are the generic ones (cell_backend(LSTM_KERNELS)); its
    saved arrays keep the layout rnnkernels/torch/_ops.py carries (gates, h_all, c_all,
    float32), and a Saved rebuilt from them backprops bitwise like the original (whose
    step tile the rebuilt one chooses again)."""
    assert cuda.BACKEND.name == "cuda" and emulated.BACKEND.name == "emulated"
    backend = emulated.BACKEND
    rng = np.random.default_rng(12)
    steps, batch, inputs, hidden = 2, 3, 4, 5
    x = rng.standard_normal((steps, batch, inputs)).astype(np.float32)
    w_ih, w_hh = (0.3 * rng.standard_normal((4 * hidden, n)).astype(np.float32) for n in (inputs, hidden))
    bias = rng.standard_normal(4 * hidden).astype(np.float32)
    h0, c0, dh_n, dc_n = (rng.standard_normal((batch, hidden)).astype(np.float32) for _ in range(4))
    dy = rng.standard_normal((steps, batch, hidden)).astype(np.float32)
    *_, saved = backend.forward(x, w_ih, w_hh, bias, h0, c0, True)
    grads = backend.backward(saved, dy, dh_n, dc_n, return_step_norms=True)
    assert len(grads) == 8  # dx, dw_ih, dw_hh, db, dh0, dc0, dh_norms, dc_norms
    layout = backend.saved_arrays.layout(steps, batch, inputs, hidden, np.dtype(np.float16))
    assert layout == [((steps, batch, 4 * hidden), np.float32), ((steps + 1, batch, hidden), np.float32),
                      ((steps + 1, batch, hidden), np.float32)]
    arrays = backend.saved_arrays.to_arrays(saved)
    assert [a is b for a, b in zip(arrays, (saved.gates, saved.h_all, saved.c_all))] == [True] * 3
    rebuilt = backend.saved_arrays.from_arrays(x, w_ih, w_hh, True, arrays)
    for a, b in zip(grads, backend.backward(rebuilt, dy, dh_n, dc_n, return_step_norms=True)):
        assert np.array_equal(a, b)
