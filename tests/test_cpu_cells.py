"""The GRU's and the Elman RNN's Numba cpu backends (rnnkernels/cpu_gru.py, cpu_rnn.py)
against the float64 references (gru_reference, rnn_reference).

The backends are called through their Backend objects, as the API calls them: folded
biases (GRU [4H] = [b_ir + b_hr, b_iz + b_hz, b_in, b_hn], RNN [H] = b_ih + b_hh), built
here independently of the API, and db unfolded here for the comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err

from rnnkernels import _cpu_common, cpu_gru, cpu_rnn, gru_reference, rnn_reference

TOLERANCE = {np.float32: 2e-5, np.float64: 1e-9}
CELLS = ("gru", "rnn_tanh", "rnn_relu")
SHAPES = [  # T, B, I, H: single units, odd sizes that leave partial panels, T=1, I=0
    (1, 1, 1, 1),
    (2, 5, 3, 3),
    (7, 1, 5, 17),
    (7, 5, 4, 33),
    (1, 5, 6, 33),
    (2, 1, 0, 3),
]
GRADS = ("dx", "dw_ih", "dw_hh", "db_ih", "db_hh", "dh0", "dh_norms")


def _backend(cell):
    return {"gru": cpu_gru.BACKEND, "rnn_tanh": cpu_rnn.TANH_BACKEND, "rnn_relu": cpu_rnn.RELU_BACKEND}[cell]


def _problem(cell, steps, batch, input_size, hidden, *, bias=True, state=True, seed=0):
    """float64 inputs in torch.nn's layouts (torch's default scale U(±1/√H)) and
    upstream gradients."""
    rng = np.random.default_rng(seed)
    rows = (3 if cell == "gru" else 1) * hidden
    bound = 1.0 / np.sqrt(hidden)
    return {
        "x": rng.standard_normal((steps, batch, input_size)),
        "w_ih": rng.uniform(-bound, bound, (rows, input_size)),
        "w_hh": rng.uniform(-bound, bound, (rows, hidden)),
        "b_ih": rng.uniform(-bound, bound, rows) if bias else None,
        "b_hh": rng.uniform(-bound, bound, rows) if bias else None,
        "h0": 0.5 * rng.standard_normal((batch, hidden)) if state else np.zeros((batch, hidden)),
        "dy": rng.standard_normal((steps, batch, hidden)),
        "dh_n": rng.standard_normal((batch, hidden)),
    }


def _fold(cell, b_ih, b_hh):
    """The bias the API hands a backend (cells_design: r and z only see the sum; b_in
    and b_hn stay apart, b_hn sits inside r ⊙ (W_hn h + b_hn))."""
    if b_ih is None:
        return None
    if cell != "gru":
        return b_ih + b_hh
    hidden = b_ih.shape[0] // 3
    return np.concatenate([b_ih[: 2 * hidden] + b_hh[: 2 * hidden], b_ih[2 * hidden :], b_hh[2 * hidden :]])


def _unfold(cell, db):
    if db is None:
        return None, None
    if cell != "gru":
        return db, db
    hidden = db.shape[0] // 4
    return db[: 3 * hidden], np.concatenate([db[: 2 * hidden], db[3 * hidden :]])


def _reference(cell, p):
    """(y, h_n, grads by name) of the float64 reference."""
    args = (p["x"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], p["h0"])
    if cell == "gru":
        y, h_n, saved = gru_reference.forward(*args)
        grads = gru_reference.backward(saved, p["dy"], p["dh_n"], return_step_norms=True)
    else:
        y, h_n, saved = rnn_reference.forward(*args, nonlinearity=cell[4:])
        grads = rnn_reference.backward(saved, p["dy"], p["dh_n"], return_step_norms=True)
    return y, h_n, dict(zip(GRADS, grads))


def _inputs(cell, p, dtype):
    """The backend's arguments in ``dtype``: (x, w_ih, w_hh, bias, h0) and (dy, dh_n)."""
    def cast(a):
        return None if a is None else np.ascontiguousarray(a, dtype=dtype)

    forward = (cast(p["x"]), cast(p["w_ih"]), cast(p["w_hh"]), cast(_fold(cell, p["b_ih"], p["b_hh"])), cast(p["h0"]))
    return forward, (cast(p["dy"]), cast(p["dh_n"]))


def _run(cell, forward_args, upstream):
    """(y, h_n, grads by name) of the cpu backend, db unfolded."""
    backend = _backend(cell)
    y, h_n, saved = backend.forward(*forward_args, training=True)
    dx, dw_ih, dw_hh, db, dh0, dh_norms = backend.backward(saved, *upstream, return_step_norms=True)
    db_ih, db_hh = _unfold(cell, db)
    return y, h_n, dict(zip(GRADS, (dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dh_norms)))


def _compare(cell, p, dtype):
    y, h_n, grads = _run(cell, *_inputs(cell, p, dtype))
    y_ref, h_n_ref, grads_ref = _reference(cell, p)
    tol = TOLERANCE[dtype]
    assert y.dtype == h_n.dtype == dtype
    assert rel_err(y, y_ref) < tol and rel_err(h_n, h_n_ref) < tol
    for name in GRADS:
        if p["b_ih"] is None and name.startswith("db"):
            assert grads[name] is None and grads_ref[name] is None
            continue
        assert grads[name].dtype == (np.float64 if name == "dh_norms" else dtype), name
        assert grads[name].shape == grads_ref[name].shape, name
        assert rel_err(grads[name], grads_ref[name]) < tol, name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_cell_matches_reference(cell, shape, dtype):
    _compare(cell, _problem(cell, *shape, seed=sum(shape)), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("state", [True, False])
@pytest.mark.parametrize("upstream", ["all", "dy only", "dh_n only"])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_cell_options_match_reference(cell, upstream, state, bias, dtype):
    # The API hands a backend zeros for a missing state or upstream gradient.
    p = _problem(cell, 6, 3, 9, 11, bias=bias, state=state, seed=5)
    if upstream == "dy only":
        p["dh_n"] = np.zeros_like(p["dh_n"])
    elif upstream == "dh_n only":
        p["dy"] = np.zeros_like(p["dy"])
    _compare(cell, p, dtype)


def test_cpu_relu_rnn_derivative_is_zero_at_zero_and_the_bias_is_folded_right():
    # relu'(0) = 0 as PyTorch has it: a unit held exactly at 0 (zero weights and input,
    # a zero bias) passes no gradient. And the GRU's b_hn sits inside r ⊙ (.): folding
    # it into b_in instead (as summing b_ih + b_hh would) changes h, which the backend
    # must not do.
    p = _problem("rnn_relu", 3, 2, 4, 5, seed=2)
    p["w_ih"][:] = 0.0
    p["w_hh"][:] = 0.0
    p["b_ih"][:] = 0.0
    p["b_hh"][:] = 0.0
    y, _, grads = _run("rnn_relu", *_inputs("rnn_relu", p, np.float64))
    assert not y.any() and not grads["dx"].any() and not grads["dh0"].any() and not grads["db_ih"].any()

    p = _problem("gru", 3, 2, 4, 5, seed=3)
    (x, w_ih, w_hh, bias, h0), _ = _inputs("gru", p, np.float64)
    y, _, _ = cpu_gru.BACKEND.forward(x, w_ih, w_hh, bias, h0, training=False)
    wrong = bias.copy()
    wrong[10:15] += wrong[15:]  # b_hn added to b_in
    wrong[15:] = 0.0
    y_wrong, _, _ = cpu_gru.BACKEND.forward(x, w_ih, w_hh, wrong, h0, training=False)
    assert rel_err(y, _reference("gru", p)[0]) < 1e-12
    assert rel_err(y_wrong, y) > 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_cell_infinite_input_gives_the_references_nan_and_inf_pattern(cell, dtype):
    # +Inf in x saturates gates (and makes a relu unit Inf): where the reference has a
    # NaN (0·Inf in the weight gradients) or an Inf, the backend has it too.
    p = _problem(cell, 4, 3, 5, 6, seed=3)
    p["x"][1, 0, 2] = np.inf
    y, h_n, grads = _run(cell, *_inputs(cell, p, dtype))
    y_ref, h_n_ref, grads_ref = _reference(cell, p)
    for name, got, want in [("y", y, y_ref), ("h_n", h_n, h_n_ref)] + [(n, grads[n], grads_ref[n]) for n in GRADS]:
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=name)
        finite = np.isfinite(want)
        assert rel_err(got[finite], want[finite]) < 10 * TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_cell_serial_and_persistent_loops_give_the_same_bits(cell, dtype, monkeypatch):
    # _cpu_common.time_loop picks a time loop for speed only: whichever runs, with any
    # number of workers (3 on 2 threads: one thread runs two workers one after the
    # other), every output bit is the same. B=5 leaves a partial 4-row block, H=37 a
    # partial panel; B=64 a step-norm sum that vectorizes.
    module = cpu_gru if cell == "gru" else cpu_rnn
    persistent = module._PERSISTENT if cell == "gru" else module._PERSISTENT[cell[4:]]
    arguments = _cpu_common.persistent_arguments
    monkeypatch.setattr(_cpu_common, "threads", lambda: 2)
    for shape in ((4, 5, 6, 37), (3, 64, 5, 20)):
        p = _problem(cell, *shape, seed=9)
        results = []
        for threshold, workers in ((10**12, 2), (0, 2), (0, 3)):  # serial, then persistent
            for name in ("PERSISTENT_MIN_MACS", "PERSISTENT_MIN_GROUPS", "PARALLEL_MIN_UNITS", "PARALLEL_MIN_MACS"):
                monkeypatch.setattr(_cpu_common, name, threshold)
            monkeypatch.setattr(
                _cpu_common, "persistent_arguments", lambda *a, w=workers: (arguments(*a)[0], w, *arguments(*a)[2:])
            )
            y, h_n, grads = _run(cell, *_inputs(cell, p, dtype))
            results.append([y, h_n] + [grads[name] for name in GRADS])
        assert persistent.forward_steps.signatures and persistent.backward_steps.signatures  # they did run
        for serial, *others in zip(*results):
            for other in others:
                assert serial.tobytes() == other.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_cell_single_step_path_matches_the_time_loop(cell, dtype):
    # T = 1 takes the BLAS path without packing; the packed loop on the same step must
    # agree (to rounding: BLAS and the packed kernel sum in different orders).
    p = _problem(cell, 1, 5, 7, 19, seed=4)
    (x, w_ih, w_hh, bias, h0), _ = _inputs(cell, p, dtype)
    if cell == "gru":
        single = cpu_gru._single_step(x, w_ih, w_hh, bias, h0)
        loop = cpu_gru._steps(x, w_ih, w_hh, bias, h0)
    else:
        single = cpu_rnn._single_step(cell[4:], x, w_ih, w_hh, bias, h0)
        loop = cpu_rnn._steps(cell[4:], x, w_ih, w_hh, bias, h0)
        single, loop = (single,), (loop,)
    for a, b in zip(single, loop):
        assert a.shape == b.shape and a.dtype == b.dtype == dtype
        assert rel_err(a, b) < 4 * np.finfo(dtype).eps


@pytest.mark.parametrize("cell", CELLS)
def test_cpu_cell_step_for_decoding_gives_the_single_step_forwards_bits(cell):
    # cell_step (for a caller that makes the two products itself, e.g. a decode step)
    # on the same products as the T = 1 forward: the same bits.
    dtype = np.float32
    p = _problem(cell, 1, 3, 4, 10, seed=12)
    (x, w_ih, w_hh, bias, h0), _ = _inputs(cell, p, dtype)
    y, h_n, _ = _backend(cell).forward(x, w_ih, w_hh, bias, h0, training=False)
    h_out = np.empty_like(h0)
    if cell == "gru":
        gates = np.dot(x[0], w_ih.T)
        gates += bias[:30]
        cpu_gru.cell_step(gates, np.dot(h0, w_hh.T), np.ascontiguousarray(bias[30:]), h0, h_out, np.empty_like(h0))
    else:
        gx = np.dot(x[0], w_ih.T)
        gx += bias
        cpu_rnn.cell_step(cell[4:], gx, np.dot(h0, w_hh.T), h_out)
        with pytest.raises(ValueError, match="nonlinearity"):
            cpu_rnn.cell_step("sigmoid", gx, gx, h_out)
    assert h_out.tobytes() == h_n.tobytes() == y[0].tobytes()


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_cell_saved_arrays_round_trip_inference_inputs_and_repeats(cell, steps):
    # saved_arrays: the layout describes to_arrays, and backward from from_arrays gives
    # the same bits. Inference returns the same y bits and no saved state. The inputs are
    # not modified, and a second run gives the same bits.
    dtype = np.float32
    p = _problem(cell, steps, 3, 4, 10, seed=6)
    forward_args, upstream = _inputs(cell, p, dtype)
    originals = [None if a is None else a.copy() for a in forward_args + upstream]
    backend = _backend(cell)

    y, h_n, saved = backend.forward(*forward_args, training=True)
    arrays = backend.saved_arrays.to_arrays(saved)
    layout = backend.saved_arrays.layout(steps, 3, 4, 10, dtype)
    assert [(a.shape, a.dtype) for a in arrays] == [(tuple(s), np.dtype(d)) for s, d in layout]
    x, w_ih, w_hh, bias, _ = forward_args
    rebuilt = backend.saved_arrays.from_arrays(x, w_ih, w_hh, bias is not None, [a.copy() for a in arrays])
    direct = backend.backward(saved, *upstream, return_step_norms=True)
    again = backend.backward(rebuilt, *upstream, return_step_norms=True)
    for a, b in zip(direct, again):
        assert a.tobytes() == b.tobytes()
    assert len(direct) == 6 and len(backend.backward(saved, *upstream)) == 5

    y_inference, h_n_inference, none = backend.forward(*forward_args, training=False)
    assert none is None
    assert y_inference.tobytes() == y.tobytes() and h_n_inference.tobytes() == h_n.tobytes()

    y2, h_n2, saved2 = backend.forward(*forward_args, training=True)
    repeat = backend.backward(saved2, *upstream, return_step_norms=True)
    assert y2.tobytes() == y.tobytes() and h_n2.tobytes() == h_n.tobytes()
    for a, b in zip(direct, repeat):
        assert a.tobytes() == b.tobytes()
    for before, after in zip(originals, forward_args + upstream):
        assert (before is None and after is None) or before.tobytes() == after.tobytes()


# A child process: every variant of both modules on a small problem (the persistent ones
# forced), digests of the outputs, and per used dispatcher the number of signatures it
# compiled against the number it loaded from the on-disk cache.
CHILD = r"""
import hashlib, json, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import test_cpu_cells as t
from rnnkernels import _cpu_common, cpu_gru, cpu_rnn
_cpu_common.threads = lambda: 2
digest = hashlib.sha256()
for threshold in (10**12, 0):
    _cpu_common.PARALLEL_MIN_UNITS = _cpu_common.PARALLEL_MIN_MACS = threshold
    _cpu_common.PERSISTENT_MIN_MACS = _cpu_common.PERSISTENT_MIN_GROUPS = threshold
    for cell in t.CELLS:
        for dtype in ("float32", "float64"):
            y, h_n, grads = t._run(cell, *t._inputs(cell, t._problem(cell, 3, 2, 4, 5), dtype))
            for a in [y, h_n] + [grads[name] for name in t.GRADS]:
                digest.update(a.tobytes())
used = {{}}
for module in (cpu_gru, cpu_rnn):
    for name, dispatcher in module.compiled_functions().items():
        if dispatcher.signatures:
            used[module.__name__ + "." + name] = [len(dispatcher.signatures), sum(dispatcher.stats.cache_hits.values())]
print(json.dumps({{"digest": digest.hexdigest(), "used": used}}))
"""


@pytest.mark.slow
def test_cpu_cells_same_bits_in_a_new_process_from_a_disk_cache_that_hits():
    # The first child compiles what the cache (this run's NUMBA_CACHE_DIR) lacks; the
    # second must load every dispatcher it uses from disk (compile nothing) and give
    # the same bits. Cache keys as cpu.py's (rnnkernels/_cpu_common.py).
    tests = Path(__file__).resolve().parent
    code = CHILD.format(repo=str(tests.parent), tests=str(tests))
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    results = []
    for _ in range(2):
        child = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=600)
        assert child.returncode == 0, child.stderr
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    first, second = results
    assert first["digest"] == second["digest"]
    assert "rnnkernels.cpu_gru.backward_steps_persistent" in second["used"], second
    assert "rnnkernels.cpu_rnn.forward_steps_relu_serial" in second["used"], second
    for name, (compiled, hits) in second["used"].items():
        assert hits == compiled, (name, second)


# Through the public API (rnnkernels/_api.py folds the biases and unfolds db itself).


def _api_forward(cell, p, **kwargs):
    import rnnkernels

    args = {name: p[name] for name in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0")}
    if cell == "gru":
        return rnnkernels.gru_forward(**args, **kwargs)
    return rnnkernels.rnn_forward(**args, nonlinearity=cell[4:], **kwargs)


def _api_backward(cell, out, dy=None, dh_n=None, **kwargs):
    import rnnkernels

    return (rnnkernels.gru_backward if cell == "gru" else rnnkernels.rnn_backward)(out, dy, dh_n, **kwargs)


@pytest.mark.parametrize("upstream", ["all", "dy only", "none"])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_cell_through_the_api_matches_the_reference_backend(cell, upstream):
    # float32 through gru_forward/rnn_forward with backend="cpu" (and "auto", which is
    # cpu for NumPy arrays) against the float64 reference backend through the same API.
    p = _problem(cell, 5, 4, 6, 13, seed=8)
    p32 = {k: None if v is None else v.astype(np.float32) for k, v in p.items()}
    dy = {"all": p["dy"], "dy only": p["dy"], "none": None}[upstream]
    dh_n = p["dh_n"] if upstream == "all" else None
    cast = (lambda a: None if a is None else a.astype(np.float32))
    out = _api_forward(cell, p32, backend="cpu")
    assert out.backend == "cpu" and _api_forward(cell, p32).backend == "cpu"
    ref = _api_forward(cell, p, backend="reference")
    grads = _api_backward(cell, out, cast(dy), cast(dh_n), return_step_norms=True)
    want = _api_backward(cell, ref, dy, dh_n, return_step_norms=True)
    assert out.y.dtype == np.float32
    assert rel_err(out.y, ref.y) < 2e-5 and rel_err(out.h_n, ref.h_n) < 2e-5
    for name in GRADS:
        assert rel_err(getattr(grads, name), getattr(want, name)) < 2e-5, name
    if upstream == "none":  # zero gradients, not missing ones
        assert not any(getattr(grads, name).any() for name in GRADS)
    elif cell == "gru":  # db_ih and db_hh agree on r, z and differ on n
        np.testing.assert_array_equal(grads.db_ih[:26], grads.db_hh[:26])
        assert not np.array_equal(grads.db_ih[26:], grads.db_hh[26:])


@pytest.mark.parametrize("cell", CELLS)
def test_cpu_cell_through_the_api_at_a_size_for_the_parallel_rule(cell):
    # B·H = 64·260: with more than one Numba thread the rule itself (no patching) takes
    # the persistent loop; either way against the
    # float64 reference, through the generic cell_forward / cell_backward.
    from rnnkernels import _api

    p = _problem(cell, 3, 64, 20, 260, seed=11)
    p32 = {k: None if v is None else v.astype(np.float32) for k, v in p.items()}
    args = ("x", "w_ih", "w_hh", "b_ih", "b_hh")
    out = _api.cell_forward(cell, *(p32[k] for k in args), (p32["h0"],), backend="cpu")
    ref = _api.cell_forward(cell, *(p[k] for k in args), (p["h0"],), backend="reference")
    grads = _api.cell_backward(out, p32["dy"], (p32["dh_n"],), return_step_norms=True)
    want = _api.cell_backward(ref, p["dy"], (p["dh_n"],), return_step_norms=True)
    assert rel_err(out.y, ref.y) < 2e-5
    for name in ("dx", "dw_ih", "dw_hh", "db_ih", "db_hh", "dh0"):
        assert rel_err(getattr(grads, name), getattr(want, name)) < 2e-5, name
    assert rel_err(grads.step_norms[0], want.step_norms[0]) < 2e-5
