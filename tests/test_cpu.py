"""The Numba CPU backend against the float64 reference and against torch.nn.LSTM."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import GRAD_OF, make_problem, make_upstream, rel_err, torch_or_skip

import rnnkernels

TOLERANCE = {np.float32: 2e-5, np.float64: 1e-9}

SHAPES = [  # T, B, I, H: tile-breaking sizes, I != H, single steps and rows
    (1, 1, 1, 1),
    (1, 3, 5, 7),
    (5, 1, 33, 17),
    (7, 3, 16, 40),
    (12, 4, 20, 33),
    (3, 2, 64, 48),
]


def _compare(problem, upstream, dtype, batch_first=False):
    cpu = rnnkernels.lstm_forward(**problem, batch_first=batch_first, backend="cpu")
    ref = rnnkernels.lstm_forward(**problem, batch_first=batch_first, backend="reference")
    tol = TOLERANCE[dtype]
    assert cpu.y.dtype == dtype
    for field in ("y", "h_n", "c_n"):
        assert rel_err(getattr(cpu, field), getattr(ref, field)) < tol, field
    g_cpu = rnnkernels.lstm_backward(cpu, **upstream)
    g_ref = rnnkernels.lstm_backward(ref, **upstream)
    for name, grad_name in GRAD_OF.items():
        got, want = getattr(g_cpu, grad_name), getattr(g_ref, grad_name)
        if problem.get(name) is None and name.startswith("b"):
            assert got is None and want is None
            continue
        assert got.dtype == dtype, grad_name
        assert rel_err(got, want) < tol, grad_name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_cpu_matches_reference(shape, dtype):
    steps, batch, input_size, hidden = shape
    problem = make_problem(*shape, dtype=dtype, seed=sum(shape))
    _compare(problem, make_upstream(steps, batch, hidden, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("state", [True, False])
@pytest.mark.parametrize("upstream", ["all", "dy only", "dh_n only", "none", "zeros"])
def test_cpu_options_match_reference(dtype, bias, state, upstream):
    steps, batch, input_size, hidden = 6, 3, 9, 11
    problem = make_problem(steps, batch, input_size, hidden, dtype=dtype, bias=bias, state=state, seed=5)
    full = make_upstream(steps, batch, hidden, dtype=dtype)
    chosen = {
        "all": full,
        "dy only": {"dy": full["dy"]},
        "dh_n only": {"dh_n": full["dh_n"]},
        "none": {},
        "zeros": {k: np.zeros_like(v) for k, v in full.items()},
    }[upstream]
    _compare(problem, chosen, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_batch_first_and_parallel_path(dtype):
    # Large enough for the persistent loops wherever Numba has two threads or more.
    steps, batch, input_size, hidden = 3, 64, 10, 300
    problem = make_problem(steps, batch, input_size, hidden, dtype=dtype, seed=11)
    problem["x"] = np.ascontiguousarray(problem["x"].transpose(1, 0, 2))
    upstream = make_upstream(steps, batch, hidden, dtype=dtype)
    upstream["dy"] = np.ascontiguousarray(upstream["dy"].transpose(1, 0, 2))
    _compare(problem, upstream, dtype, batch_first=True)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch_first", [False, True])
def test_cpu_matches_torch_lstm(dtype, batch_first):
    torch = torch_or_skip()
    steps, batch, input_size, hidden = 9, 4, 7, 13
    torch_dtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    lstm = torch.nn.LSTM(input_size, hidden, batch_first=batch_first, dtype=torch_dtype)
    problem = {
        "w_ih": lstm.weight_ih_l0.detach().numpy(),
        "w_hh": lstm.weight_hh_l0.detach().numpy(),
        "b_ih": lstm.bias_ih_l0.detach().numpy(),
        "b_hh": lstm.bias_hh_l0.detach().numpy(),
    }
    rng = np.random.default_rng(0)
    x_shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
    x = rng.standard_normal(x_shape).astype(dtype)
    h0 = rng.standard_normal((batch, hidden)).astype(dtype)
    c0 = rng.standard_normal((batch, hidden)).astype(dtype)
    dy = rng.standard_normal(x_shape[:2] + (hidden,)).astype(dtype)

    x_t = torch.tensor(x, requires_grad=True)
    h0_t = torch.tensor(h0[None], requires_grad=True)
    c0_t = torch.tensor(c0[None], requires_grad=True)
    y_t, _ = lstm(x_t, (h0_t, c0_t))
    y_t.backward(torch.from_numpy(dy))

    out = rnnkernels.lstm_forward(x, **problem, h0=h0, c0=c0, batch_first=batch_first, backend="cpu")
    grads = rnnkernels.lstm_backward(out, dy=dy)
    tol = 10 * TOLERANCE[dtype] if dtype == np.float32 else 1e-9
    assert rel_err(out.y, y_t.detach().numpy()) < tol
    assert rel_err(grads.dx, x_t.grad.numpy()) < tol
    assert rel_err(grads.dh0, h0_t.grad[0].numpy()) < tol
    assert rel_err(grads.dc0, c0_t.grad[0].numpy()) < tol
    assert rel_err(grads.dw_ih, lstm.weight_ih_l0.grad.numpy()) < tol
    assert rel_err(grads.dw_hh, lstm.weight_hh_l0.grad.numpy()) < tol
    assert rel_err(grads.db_ih, lstm.bias_ih_l0.grad.numpy()) < tol
    assert rel_err(grads.db_hh, lstm.bias_hh_l0.grad.numpy()) < tol


def test_fastmath_sigmoid32_saturates_to_exact_zero_and_one():
    # Issue 11, defect 7: σ(-inf) was 2^-126 (1.6e-38), not the exact 0 documented.
    from rnnkernels import _fastmath

    inf = np.float32(np.inf)
    assert _fastmath.sigmoid32(-inf) == 0.0
    assert _fastmath.sigmoid32(np.float32(-200.0)) == 0.0
    assert _fastmath.sigmoid32(inf) == 1.0
    assert _fastmath.tanh32(inf) == 1.0 and _fastmath.tanh32(-inf) == -1.0
    assert np.isnan(_fastmath.sigmoid32(np.float32(np.nan)))
    assert np.isnan(_fastmath.tanh32(np.float32(np.nan)))
    # Below -87, σ is under the smallest normal float32 and flushes to 0; above it the
    # exact value stays within a few ulp.
    for x in (-87.0, -80.0, -20.0):
        want = 1.0 / (1.0 + np.exp(-x))
        assert abs(_fastmath.sigmoid32(np.float32(x)) - want) <= 1e-6 * want


def test_fastmath_activations_max_relative_error():
    """sigmoid32 and tanh32 as the cell loops run them (vectorized loops over an array)
    within the 2e-7 relative error _fastmath's docstring states, against float64; σ an
    exact 0 below -87; and the scalar code (a loop's remainder) giving the vector
    code's bits."""
    import numba

    from rnnkernels import _fastmath

    @numba.njit(fastmath={"contract"}, error_model="numpy")
    def apply(x, out, which):
        if which == 0:
            for j in range(x.shape[0]):
                out[j] = _fastmath.sigmoid(x[j])
        else:
            for j in range(x.shape[0]):
                out[j] = _fastmath.tanh(x[j])

    x = _fastmath.accuracy_arguments()
    wide = x.astype(np.float64)
    got_sigmoid, got_tanh = np.empty_like(x), np.empty_like(x)
    apply(x, got_sigmoid, 0)
    apply(x, got_tanh, 1)
    with np.errstate(over="ignore"):
        want_sigmoid = 1.0 / (1.0 + np.exp(-wide))
    want_tanh = np.tanh(wide)

    normal = x >= -87  # below, σ is an exact 0 (the docstring)
    assert (got_sigmoid[~normal] == 0).all()
    sigmoid_error = np.abs(got_sigmoid[normal] - want_sigmoid[normal]) / want_sigmoid[normal]
    nonzero = want_tanh != 0
    assert (got_tanh[~nonzero] == 0).all()
    tanh_error = np.abs(got_tanh[nonzero] - want_tanh[nonzero]) / np.abs(want_tanh[nonzero])
    assert sigmoid_error.max() <= 2e-7, f"sigmoid32: {sigmoid_error.max():.3g} at x = {x[normal][sigmoid_error.argmax()]}"
    assert tanh_error.max() <= 2e-7, f"tanh32: {tanh_error.max():.3g} at x = {x[nonzero][tanh_error.argmax()]}"
    assert got_sigmoid.dtype == got_tanh.dtype == np.float32

    # One argument at a time (the scalar path a loop's remainder takes) gives the same bits.
    sample = x[:: len(x) // 997]
    scalar_sigmoid = np.array([_fastmath.sigmoid32(v) for v in sample], np.float32)
    scalar_tanh = np.array([_fastmath.tanh32(v) for v in sample], np.float32)
    np.testing.assert_array_equal(scalar_sigmoid, got_sigmoid[:: len(x) // 997])
    np.testing.assert_array_equal(scalar_tanh, got_tanh[:: len(x) // 997])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_infinite_input_gives_the_references_nan_and_inf_pattern(dtype):
    # With +Inf in x, dz^i = dc g σ'(z^i) is an exact 0 where σ saturates; dW_ih = dzᵀ x
    # then holds 0·Inf = NaN where torch and the reference have it, not ±Inf.
    problem = make_problem(4, 3, 5, 6, dtype=dtype, seed=3, scale=4.0)
    problem["x"][1, 0, 2] = np.inf
    upstream = make_upstream(4, 3, 6, dtype=dtype)
    cpu = rnnkernels.lstm_forward(**problem, backend="cpu")
    ref = rnnkernels.lstm_forward(**problem, backend="reference")
    g_cpu = rnnkernels.lstm_backward(cpu, **upstream)
    g_ref = rnnkernels.lstm_backward(ref, **upstream)
    for name in ("y", "h_n", "c_n"):
        got, want = getattr(cpu, name), getattr(ref, name)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=name)
    for name in GRAD_OF.values():
        got, want = getattr(g_cpu, name), getattr(g_ref, name)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=name)
        finite = np.isfinite(want)
        assert rel_err(got[finite], want[finite]) < 10 * TOLERANCE[dtype], name


def _lstm_outputs(shape, dtype):
    steps, batch, _, hidden = shape
    problem = make_problem(*shape, dtype=dtype, seed=9)
    upstream = make_upstream(steps, batch, hidden, dtype=dtype)
    out = rnnkernels.lstm_forward(**problem, backend="cpu")
    grads = rnnkernels.lstm_backward(out, **upstream, return_step_norms=True)
    return [out.y, out.h_n, out.c_n] + [getattr(grads, name) for name in GRAD_OF.values()] + [grads.dh_norms, grads.dc_norms]


def _force_loop(monkeypatch, persistent):
    """The time loops' rule (_cpu_common.time_loop) forced serial or persistent, with
    two threads whatever Numba has; the projection's split with it."""
    from rnnkernels import _cpu_common

    threshold = 0 if persistent else 10**12
    monkeypatch.setattr(_cpu_common, "threads", lambda: 2)
    for name in ("PERSISTENT_MIN_MACS", "PERSISTENT_MIN_GROUPS", "PARALLEL_MIN_UNITS", "PARALLEL_MIN_MACS"):
        monkeypatch.setattr(_cpu_common, name, threshold)


def _count_weight_gradient_submissions(monkeypatch, record=None):
    """A list that gets one entry per product the weight gradients hand to their worker
    thread (``_cpu_blas``): the BLAS thread counts ``record()`` returns at that moment,
    or None."""
    from rnnkernels import _cpu_blas

    submitted = []
    real = _cpu_blas._worker

    class Spy:
        def submit(self, *args):
            submitted.append(record() if record else None)
            return real().submit(*args)

    monkeypatch.setattr(_cpu_blas, "_worker", Spy)
    return submitted


def _count_team_runs(monkeypatch):
    """A list that gets one entry per run of the after-loop products' team
    (``_cpu_team``): True where it ran in parallel, False where serial."""
    from rnnkernels import _cpu_team

    runs = []
    for parallel, real in list(_cpu_team.PRODUCTS.items()):
        monkeypatch.setitem(_cpu_team.PRODUCTS, parallel, lambda *a, p=parallel, f=real: runs.append(p) or f(*a))
    return runs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 5, 6, 37), (3, 1, 4, 20), (2, 9, 3, 64), (3, 64, 5, 40)])
def test_cpu_serial_and_persistent_loops_give_the_same_bits(shape, dtype, monkeypatch):
    # The rule in _cpu_common.time_loop picks a time loop for speed only: whichever runs, and
    # with however many threads, every output bit is the same (issue 11, defect 3). B = 64:
    # the persistent backward sums each step's row norms after its loop, the serial
    # cell in it, the same loop (it vectorizes at that B).
    from rnnkernels import _cpu_common, cpu

    results = []
    submitted = _count_weight_gradient_submissions(monkeypatch)
    team = _count_team_runs(monkeypatch)
    for persistent in (False, True):
        _force_loop(monkeypatch, persistent)
        results.append(_lstm_outputs(shape, dtype))
    # The persistent loops did run, and the parallel projection (the loops' callees
    # record no signature when the loops come from the on-disk cache); the after-loop
    # products on the team (from _cpu_blas.TEAM_MIN_MACS, whichever loop ran: serial,
    # then parallel), or below it as before, the weight gradients side by side (dW_ih
    # on the worker thread) only with the persistent loop's settings.
    assert cpu._PERSISTENT.forward_steps.signatures and cpu._PERSISTENT.backward_steps.signatures
    assert _cpu_common.PRODUCT[True].signatures
    if team:
        assert team == [False, True] and not submitted
    else:
        assert len(submitted) == 1
    for serial, persistent in zip(*results):
        assert serial.tobytes() == persistent.tobytes()


def test_cpu_persistent_teams_and_product_chunks_at_their_boundaries():
    # _cpu_common._team splits the rows into teams (one per worker from TEAM_MIN_ROWS
    # rows each) and each team's product into runs of panels: whole 4-panel groups
    # while there are as many groups as chunks wanted, else pairs of panels. Every
    # split covers each row and each panel exactly once.
    from rnnkernels import _cpu_common

    least = _cpu_common.TEAM_MIN_ROWS
    assert _cpu_common._teams(2 * least - 1, 2) == 1
    assert _cpu_common._teams(2 * least, 2) == 2
    assert _cpu_common._teams(1, 2) == 1 and _cpu_common._teams(3 * least, 3) == 3
    assert _cpu_common._teams(100, 1) == 1
    for batch, workers, teams, panels, parts in [
        (8, 2, 2, 4, 1), (3, 2, 1, 4, 1), (3, 2, 1, 8, 1), (3, 2, 1, 5, 1), (3, 2, 1, 1, 1),
        (3, 2, 1, 3, 1), (7, 3, 2, 16, 1), (7, 3, 2, 3, 2), (1, 1, 1, 9, 1),
    ]:
        rows, chunks = [], {}
        for worker in range(workers):
            team, first, end, row_chunk, panel_chunk, product_chunks, per_step = _cpu_common._team(
                batch, workers, teams, worker, 1, parts, panels
            )
            assert product_chunks == -(-panels // panel_chunk)
            assert per_step == product_chunks + -(-(end - first) // row_chunk)
            rows.append((team, first, end))
            chunks.setdefault(team, set()).add((row_chunk, panel_chunk))
        covered = sorted(set(rows), key=lambda row: row[1])
        assert [first for _, first, _ in covered] == [0] + [end for _, _, end in covered[:-1]]
        assert covered[-1][2] == batch and len(covered) == teams
        for team, shares in chunks.items():
            assert len(shares) == 1  # the members of a team agree on the chunks
            members = sum(1 for row in rows if row[0] == team)
            (row_chunk, panel_chunk), = shares
            groups = -(-panels // 4)
            if members == 1 and parts == 1:
                assert panel_chunk >= panels  # one chunk: the whole product
            elif groups >= members * parts:
                assert panel_chunk % 4 == 0
            else:  # fewer groups than chunks wanted: pairs of panels (here one pair each)
                assert panel_chunk == 2
    # The boundaries: 2 groups for 2 members: one group each; 1 group (4 panels): a
    # pair each; 5 panels (2 groups, the second partial): 4 + 1.
    assert _cpu_common._team(3, 2, 1, 0, 1, 1, 8)[4] == 4
    assert _cpu_common._team(3, 2, 1, 0, 1, 1, 4)[4] == 2
    assert _cpu_common._team(3, 2, 1, 0, 1, 1, 5)[4] == 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [1, 3, 4, 5])
def test_cpu_persistent_loop_at_the_team_and_pair_boundaries(batch, dtype, monkeypatch):
    # B = 3 (2·TEAM_MIN_ROWS - 1): one team, its two workers share each product in
    # pairs of panels where it has one 4-panel group (H = 64 float64 / 128 float32
    # backward: 4 panels), with a 3-row tile; B = 4, 5: two teams (2 + 2, 2 + 3 rows);
    # B = 1: one row, pairs by the 1 x 2 tile. The serial loop's bits, also with 3
    # workers on 2 threads.
    from rnnkernels import _cpu_common, _cpu_gemm

    hidden = 4 * _cpu_gemm.panel_width(dtype)
    shape = (5, batch, 6, hidden)
    _force_loop(monkeypatch, False)
    want = _lstm_outputs(shape, dtype)
    _force_loop(monkeypatch, True)
    arguments = _cpu_common.persistent_arguments
    for workers in (2, 3):
        monkeypatch.setattr(_cpu_common, "persistent_arguments", lambda *a, w=workers: (arguments(*a)[0], w, *arguments(*a)[2:]))
        got = _lstm_outputs(shape, dtype)
        for a, b in zip(want, got):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(("workers", "numba_threads", "policy"), [(1, 2, None), (2, 1, None), (3, 2, None), (3, 2, (0, 0)), (2, 2, (1, 1))])
def test_cpu_persistent_loop_with_any_number_of_workers_and_threads(workers, numba_threads, policy, monkeypatch):
    # The persistent loops hand out work by claiming (rnnkernels/_cpu_sync.py), never by
    # a fixed thread per chunk, so they finish and give the serial loop's bits when one
    # worker does everything (1 worker), when one thread runs two workers one after the
    # other (2 workers on 1 Numba thread: the second finds nothing left) and with more
    # workers than threads (3 on 2). A deadlock would hang: faulthandler ends the run
    # with every thread's traceback instead. ``policy``: the waits' (spins, yields)
    # (_cpu_sync.set_policy): (0, 0) naps at every wait that finds its phase unfinished,
    # (1, 1) goes through a spin, a yield and naps; the same bits either way.
    import faulthandler

    import numba

    from rnnkernels import _cpu_common, _cpu_sync

    if policy is not None:
        monkeypatch.setattr(_cpu_sync, "_policy", list(policy))

    shape = (6, 7, 5, 40)  # 7 rows: cell chunks of unequal size
    _force_loop(monkeypatch, False)
    want = _lstm_outputs(shape, np.float32)
    _force_loop(monkeypatch, True)
    arguments = _cpu_common.persistent_arguments
    monkeypatch.setattr(_cpu_common, "persistent_arguments", lambda *a: (arguments(*a)[0], workers, *arguments(*a)[2:]))
    before = numba.get_num_threads()
    faulthandler.dump_traceback_later(300, exit=True)
    try:
        numba.set_num_threads(min(numba_threads, numba.config.NUMBA_NUM_THREADS))
        got = _lstm_outputs(shape, np.float32)
    finally:
        faulthandler.cancel_dump_traceback_later()
        numba.set_num_threads(before)
    for a, b in zip(want, got):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parallel", [False, True])
def test_cpu_step_product_matches_float64_matmul(dtype, parallel):
    # The packed micro-kernel (rnnkernels/_cpu_gemm.py) behind every per-step product
    # and the input projection: every row-block remainder (rows % 4), column counts that
    # leave a partial panel or a partial group of 4 panels, K = 0 and 1.
    from rnnkernels import _cpu_common, _cpu_gemm, cpu

    product = _cpu_common.PRODUCT[parallel]  # the step product's kernel, with a bias or None
    rng = np.random.default_rng(4)
    for rows in range(10):
        for k, n in ((0, 5), (1, 16), (7, 33), (40, 130), (64, 4 * 64 + 8)):
            a = rng.standard_normal((rows, k)).astype(dtype)
            m = rng.standard_normal((k, n)).astype(dtype)
            packed = _cpu_gemm.pack(m)
            assert packed.shape[1:] == (k, _cpu_gemm.panel_width(dtype))
            out = np.full((rows, packed.shape[0] * packed.shape[2]), np.nan, dtype)
            product(a, packed, out, None)
            want = a.astype(np.float64) @ m.astype(np.float64)
            np.testing.assert_allclose(out[:, :n], want, rtol=0, atol=4 * TOLERANCE[dtype] * max(1.0, np.abs(want).max(initial=0.0)))
            assert not out[:, n:].any()  # the zero padding's columns
            # The bias the kernel adds as it stores: the same bits as adding it after.
            bias = rng.standard_normal(out.shape[1]).astype(dtype)
            with_bias = np.full_like(out, np.nan)
            product(a, packed, with_bias, bias)
            assert with_bias.tobytes() == (out + bias).tobytes()
            step = np.full_like(out, np.nan)  # the serial time loop's entry: the same kernel
            cpu._SERIAL.step_product(a, packed, step)
            assert step.tobytes() == out.tobytes()
    a = np.ones((3, 4), dtype)
    width = _cpu_gemm.panel_width(dtype)
    with pytest.raises(ValueError, match="do not fit"):
        product(a, _cpu_gemm.pack(np.ones((5, width), dtype)), np.empty((3, width), dtype), None)
    with pytest.raises(ValueError, match="do not fit"):
        product(a, _cpu_gemm.pack(np.ones((4, width + 4), dtype)), np.empty((3, width), dtype), None)
    with pytest.raises(ValueError, match="bias is shorter"):
        product(a, _cpu_gemm.pack(np.ones((4, width), dtype)), np.empty((3, width), dtype), np.ones(width - 1, dtype))


def test_cpu_backward_leaves_the_users_blas_threads_as_they_were(monkeypatch):
    # _cpu_blas pins NumPy's BLAS to one thread around the weight gradients; the limit
    # is process-global, so the last of several concurrent callers restores the user's
    # setting. Two Python threads run every cell's backward at once, many times, the
    # products side by side: the BLAS ran at one thread in each product handed to the
    # worker, and is back at the user's 2 after.
    import threading

    from threadpoolctl import ThreadpoolController, threadpool_limits

    from rnnkernels import _cpu_common

    blas = ThreadpoolController().select(user_api="blas")
    assert blas.lib_controllers, "NumPy's BLAS is not one threadpoolctl can control"
    monkeypatch.setattr(_cpu_common, "threads", lambda: 2)
    monkeypatch.setattr(_cpu_common, "PARALLEL_MIN_MACS", 0)
    submitted = _count_weight_gradient_submissions(
        monkeypatch, lambda: [lib.num_threads for lib in blas.lib_controllers])
    rng = np.random.default_rng(2)
    steps, batch, hidden = 6, 4, 24
    calls = []
    for forward, backward, gates in ((rnnkernels.lstm_forward, rnnkernels.lstm_backward, 4),
                                     (rnnkernels.gru_forward, rnnkernels.gru_backward, 3),
                                     (rnnkernels.rnn_forward, rnnkernels.rnn_backward, 1)):
        x = rng.standard_normal((steps, batch, hidden)).astype(np.float32)
        w_ih, w_hh = (rng.standard_normal((gates * hidden, hidden)).astype(np.float32) / hidden for _ in range(2))
        dy = rng.standard_normal((steps, batch, hidden)).astype(np.float32)
        calls.append((backward, forward(x, w_ih, w_hh, training=True, backend="cpu"), dy))
    want = [backward(out, dy=dy) for backward, out, dy in calls]
    rounds = 40
    barrier = threading.Barrier(2)
    errors = []

    def run():
        try:
            for _ in range(rounds):
                barrier.wait()
                for (backward, out, dy), expected in zip(calls, want):
                    got = backward(out, dy=dy)
                    assert got.dw_ih.tobytes() == expected.dw_ih.tobytes()
                    assert got.dw_hh.tobytes() == expected.dw_hh.tobytes()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread's assert
            barrier.abort()
            errors.append(error)

    with threadpool_limits(limits=2, user_api="blas"):
        before = [lib.num_threads for lib in blas.lib_controllers]
        assert set(before) == {2}
        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert [lib.num_threads for lib in blas.lib_controllers] == before
    assert len(submitted) == 2 * rounds * len(calls) + len(calls)
    assert all(set(counts) == {1} for counts in submitted), submitted


@pytest.mark.parametrize("bad", [-1, 2**62, 1.5, True, "8"])
def test_cpu_sync_set_policy_rejects_bad_bounds(bad, monkeypatch):
    from rnnkernels import _cpu_sync

    monkeypatch.setattr(_cpu_sync, "_policy", list(_cpu_sync.policy()))
    for arguments in ((bad, 0), (0, bad)):
        with pytest.raises(ValueError if isinstance(bad, int) and not isinstance(bad, bool) else TypeError, match="spins|yields"):
            _cpu_sync.set_policy(*arguments)
    _cpu_sync.set_policy(3, 4)
    assert _cpu_sync.policy() == (3, 4)
    assert list(_cpu_sync.counters()[[_cpu_sync._SPINS, _cpu_sync._YIELDS]]) == [3, 4]


def spy_inference_loop(monkeypatch, owner, key, calls=None):
    """A list that gets the (first, end) batch rows of each call of the inference loop
    ``owner.key`` (or ``owner[key]`` for a dict) from Python; for a split over row
    blocks (the last argument: their bounds), each block's."""
    calls = [] if calls is None else calls
    real = owner[key] if isinstance(owner, dict) else getattr(owner, key)

    def spy(*args):
        if key.endswith("SPLIT"):
            bounds = [int(b) for b in args[-1]]
            calls.extend(itertools.pairwise(bounds))
        else:
            calls.append((int(args[1]), int(args[2])))
        return real(*args)

    if isinstance(owner, dict):
        monkeypatch.setitem(owner, key, spy)
    else:
        monkeypatch.setattr(owner, key, spy)
    return calls


def expected_blocks(batch, split):
    """The row blocks an inference forward of ``batch`` rows runs at two threads
    (split) or one."""
    from rnnkernels import _cpu_common

    if split and batch >= 2 * _cpu_common.SPLIT_MIN_ROWS:
        return [(0, batch // 2), (batch // 2, batch)]
    return [(0, batch)]


# The split in float32 only: its float64 signature is one more cold compile (about 5 s
# of CI) of the same code; the serial loop in both dtypes.
@pytest.mark.parametrize(("split", "dtype"), [(False, np.float32), (False, np.float64), (True, np.float32)])
def test_cpu_inference_gives_the_training_forwards_bits(split, dtype, monkeypatch):
    # Inference (training=False) runs its own loop (cpu._inference_steps: the input
    # projection a chunk of steps at a time, c without history; at two threads, the
    # batch split into two row blocks, one per thread): every output bit is the training
    # forward's, for any chunk (1 row: one step per chunk; 5 rows: chunks that end
    # mid-sequence; the default), any split (9 and 13 rows: unequal blocks), with and
    # without bias and initial state, and within the reference's tolerance.
    import numba

    from rnnkernels import _cpu_common, cpu

    calls = spy_inference_loop(monkeypatch, cpu, "_INFERENCE_STEPS")
    spy_inference_loop(monkeypatch, cpu, "_INFERENCE_SPLIT", calls)
    cases = [((5, 3, 7, 20), True), ((9, 16, 20, 64), False), ((7, 9, 13, 40), True), ((4, 13, 70, 20), False)]
    for shape, options in cases:
        for chunk_rows in (1, 5, _cpu_common.INFERENCE_CHUNK_ROWS):
            problem = make_problem(*shape, dtype=dtype, bias=options, state=options, seed=sum(shape))
            want = rnnkernels.lstm_forward(**problem, backend="cpu", training=True)
            ref = rnnkernels.lstm_forward(**problem, backend="reference", training=False)
            monkeypatch.setattr(_cpu_common, "INFERENCE_CHUNK_ROWS", chunk_rows)
            # Two row blocks whatever Numba has (the blocks then share its threads).
            monkeypatch.setattr(_cpu_common, "threads", lambda: 2 if split else 1)
            got = rnnkernels.lstm_forward(**problem, backend="cpu", training=False)
            monkeypatch.setattr(_cpu_common, "threads", numba.get_num_threads)
            for field in ("y", "h_n", "c_n"):
                assert getattr(got, field).tobytes() == getattr(want, field).tobytes(), (shape, chunk_rows, field)
                assert rel_err(getattr(got, field), getattr(ref, field)) < TOLERANCE[dtype], (shape, field)
            assert sorted(calls) == expected_blocks(shape[1], split), (shape, split)
            calls.clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_split_packing_gives_the_packed_kernels_layout(dtype):
    # The inference split's threads pack W_ih and W_hh themselves, a chunk of panels
    # each (_cpu_common._pack_panels): the same array as _cpu_gemm.pack, zero padding
    # included, for any chunk of panels, partial last panels and K = 0, 1.
    from rnnkernels import _cpu_common, _cpu_gemm

    rng = np.random.default_rng(7)
    for rows, depth in ((1, 1), (28, 5), (64, 0), (80, 13), (200, 40)):
        matrix = rng.standard_normal((rows, depth)).astype(dtype)
        want = _cpu_gemm.pack(matrix.T)
        _, _, packed, _, _ = _cpu_common.split_packing(matrix, matrix)
        packed[:] = np.nan  # every element must be written
        panels = packed.shape[0]
        for first in range(0, panels, 3):
            _cpu_common.PACK_PANELS(matrix, packed, first, min(panels, first + 3))
        assert packed.tobytes() == want.tobytes(), (rows, depth)


def test_cpu_inference_split_on_one_worker(monkeypatch):
    # The split's work is a list of chunks claimed in order (packing first, then one per
    # row block, which waits for the packing): a threading layer that runs the prange's
    # iterations one after another, here one Numba thread for two blocks, runs every
    # chunk on the first iteration, without waiting for the second. Same bits as the
    # training forward.
    import faulthandler

    import numba

    from rnnkernels import _cpu_common, cpu

    calls = spy_inference_loop(monkeypatch, cpu, "_INFERENCE_SPLIT")
    problem = make_problem(6, 11, 20, 72, dtype=np.float32, bias=True, state=True, seed=3)
    want = rnnkernels.lstm_forward(**problem, backend="cpu", training=True)
    monkeypatch.setattr(_cpu_common, "threads", lambda: 2)
    before = numba.get_num_threads()
    faulthandler.dump_traceback_later(300, exit=True)
    try:
        numba.set_num_threads(1)
        got = rnnkernels.lstm_forward(**problem, backend="cpu", training=False)
    finally:
        faulthandler.cancel_dump_traceback_later()
        numba.set_num_threads(before)
    assert calls == [(0, 5), (5, 11)]
    for field in ("y", "h_n", "c_n"):
        assert getattr(got, field).tobytes() == getattr(want, field).tobytes(), field


def test_cpu_inference_chunk_rule():
    # A chunk of the inference loop's input projection is INFERENCE_CHUNK_ROWS rows,
    # LARGE_CHUNK_ROWS where the packed W_ih is over LARGE_WEIGHTS_BYTES (it comes from
    # L3 each chunk), whole steps of a block's rows, at least one step, at most T.
    from rnnkernels import _cpu_common

    def chunk_steps(steps, batch, blocks, packed_ih_bytes):
        x = np.empty((steps, batch, 3), np.float32)
        packed_ih = np.empty((1, packed_ih_bytes // 128, 32), np.float32)
        packed_hh = np.empty((1, 3, 32), np.float32)
        _, _, gates, _ = _cpu_common.inference_scratch(blocks, x, packed_ih, packed_hh)
        return gates.shape[1] // -(-batch // blocks)

    small, large = _cpu_common.LARGE_WEIGHTS_BYTES, _cpu_common.LARGE_WEIGHTS_BYTES + 128
    assert chunk_steps(64, 64, 2, small) == _cpu_common.INFERENCE_CHUNK_ROWS // 32
    assert chunk_steps(64, 64, 2, large) == _cpu_common.LARGE_CHUNK_ROWS // 32
    assert chunk_steps(64, 64, 1, large) == _cpu_common.LARGE_CHUNK_ROWS // 64
    assert chunk_steps(3, 64, 2, large) == 3
    assert chunk_steps(5, 300, 1, large) == 1


def test_cpu_inference_split_with_read_only_weights_compiles_nothing_more(monkeypatch):
    # Read-only weights (np.load(mmap_mode="r"), np.frombuffer) reach the cpu backend as
    # they are (_arrays.to_backend copies nothing that fits). The inference split packs
    # them on its threads, so they became arguments of its compiled region: a read-only
    # array is another Numba type, and every process with a fresh cache paid a second
    # cold compile of the split (about 6 s) for the same code. Same bits either way.
    from rnnkernels import _cpu_common, cpu

    monkeypatch.setattr(_cpu_common, "threads", lambda: 2)
    problem = make_problem(4, 8, 6, 20, dtype=np.float32, bias=True, state=True, seed=11)
    want = rnnkernels.lstm_forward(**problem, backend="cpu", training=False)
    compiled = len(cpu._INFERENCE_SPLIT.signatures)
    read_only = dict(problem)
    for name in ("w_ih", "w_hh"):
        read_only[name] = problem[name].copy()
        read_only[name].setflags(write=False)
    got = rnnkernels.lstm_forward(**read_only, backend="cpu", training=False)
    for field in ("y", "h_n", "c_n"):
        assert getattr(got, field).tobytes() == getattr(want, field).tobytes(), field
    assert len(cpu._INFERENCE_SPLIT.signatures) == compiled, cpu._INFERENCE_SPLIT.signatures
