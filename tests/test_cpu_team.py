"""The cpu backends' after-loop products on one thread team (rnnkernels/_cpu_team.py):
the BLAS's gemm called from compiled code through a function pointer, the chunks, the
fallback where no gemm is known, the same bits at any thread count, and the user's
BLAS threads left as they were."""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

import rnnkernels
from rnnkernels import _cpu_blas, _cpu_common, _cpu_gemm, _cpu_team

# Of a product's largest value, for K up to a few hundred (tests/test_cpu.py's step
# products use the same).
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-9}


def _gemm_or_fail():
    gemm = _cpu_blas.team_gemm()
    # NumPy's wheels bundle OpenBLAS, whose gemm the team knows: None here would mean
    # the symbol lookup broke, not an unknown BLAS.
    assert gemm is not None, "no BLAS gemm found for the team"
    return gemm


def _operands(rng, steps, rows_ih, input_size, rows_hh, hidden, dtype, same_grad=False):
    grad_ih = rng.standard_normal((steps, rows_ih)).astype(dtype)
    grad_hh = grad_ih if same_grad else rng.standard_normal((steps, rows_hh)).astype(dtype)
    inputs = rng.standard_normal((steps, input_size)).astype(dtype)
    hidden_states = rng.standard_normal((steps, hidden)).astype(dtype)
    w_ih = rng.standard_normal((rows_ih, input_size)).astype(dtype)
    return grad_ih, inputs, grad_hh, hidden_states, w_ih


def _check(got, operands, dtype):
    grad_ih, inputs, grad_hh, hidden_states, w_ih = (a.astype(np.float64) for a in operands)
    for name, result, want in zip(("dw_ih", "dw_hh", "dx"), got,
                                  (grad_ih.T @ inputs, grad_hh.T @ hidden_states, grad_ih @ w_ih)):
        assert result.dtype == dtype and result.shape == want.shape and result.flags.c_contiguous, name
        scale = max(1.0, np.abs(want).max(initial=0.0))
        np.testing.assert_allclose(result, want, rtol=0, atol=4 * TOLERANCE[dtype] * scale, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dx_on_blas", [False, True])
def test_team_products_through_the_blas_function_pointer_match_float64(dtype, dx_on_blas, monkeypatch):
    # Shapes whose rows are not multiples of the chunks' 16 (a short last chunk), one
    # row or column, a hidden size more than twice the input size (dW_hh is more than
    # half the work: cut in two), K > and < the row counts; at 1 worker and at 2 and 3
    # (3 workers on Numba's pool: one thread runs two, or all where there is one).
    gemm = _gemm_or_fail()
    monkeypatch.setattr(_cpu_common, "PARALLEL_MIN_MACS", 0)
    rng = np.random.default_rng(1)
    for steps, rows_ih, input_size, rows_hh, hidden in ((1, 1, 1, 1, 1), (37, 45, 13, 45, 7), (70, 17, 5, 160, 40),
                                                        (300, 100, 70, 100, 33), (5, 400, 129, 400, 3)):
        operands = _operands(rng, steps, rows_ih, input_size, rows_hh, hidden, dtype)
        table, _ = _cpu_team.plan(steps, rows_ih, input_size, rows_hh, hidden, dx_on_blas)
        assert len(table) >= 2
        results = []
        for workers in (1, 2, 3):
            monkeypatch.setattr(_cpu_common, "threads", lambda workers=workers: workers)
            with _cpu_blas.one_blas_thread():
                got = _cpu_team.run(gemm, *operands, dx_on_blas)
            _check(got, operands, dtype)
            results.append([a.tobytes() for a in got])
        assert results[0] == results[1] == results[2]
    # dW_hh more than half the work: two gemm chunks (of 80 rows each), not one.
    table, _ = _cpu_team.plan(70, 17, 5, 160, 40, False)
    dw_hh_rows = table[(table[:, _cpu_team._KIND] == _cpu_team.BLAS) & (table[:, _cpu_team._C] == _cpu_team.DW_HH)]
    assert sorted(dw_hh_rows[:, _cpu_team._M]) == [80, 80]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_tiles_match_a_float64_product_on_odd_shapes(dtype):
    # Our weight-gradient tiles (_cpu_team._weight_rows: aᵀ b read straight from the
    # operands, k in blocks): K = 1, one short of, one past and not a multiple of the k
    # block; rows a multiple of the tiles' 4 but not of 16; one, two, three and five
    # panels of columns (pairs of panels and an odd one). A block of rows writes those
    # rows alone, with the bits of the whole; the pair's products (one pass over a) the
    # bits of two passes.
    block = _cpu_team.GRADIENT_BLOCK
    panel = _cpu_gemm.panel_width(dtype)
    rng = np.random.default_rng(5)
    for steps in (1, block - 1, block + 1, 2 * block + 44):
        for rows, panels in ((4, 1), (12, 2), (100, 3), (36, 5)):
            a = rng.standard_normal((steps, rows)).astype(dtype)
            b = rng.standard_normal((steps, panels * panel)).astype(dtype)
            b2 = rng.standard_normal((steps, panel)).astype(dtype)
            out = np.full((rows, panels * panel), np.nan, dtype)
            out2 = np.full((rows, panel), np.nan, dtype)
            _cpu_team.WEIGHT_ROWS(a, b, out, b2, out2, 0, rows, True)
            for got, other in ((out, b), (out2, b2)):
                want = a.astype(np.float64).T @ other.astype(np.float64)
                scale = max(1.0, np.abs(want).max())
                np.testing.assert_allclose(got, want, rtol=0, atol=4 * TOLERANCE[dtype] * scale)
            alone = np.full_like(out, np.nan)
            _cpu_team.WEIGHT_ROWS(a, b, alone, b, alone, 0, rows, False)
            assert alone.tobytes() == out.tobytes()
            part = np.full_like(out, np.nan)
            _cpu_team.WEIGHT_ROWS(a, b, part, b, part, 4, rows, False)
            assert np.isnan(part[:4]).all() and part[4:].tobytes() == out[4:].tobytes()


def test_gradient_tiles_rule_is_the_shape_and_dtype_alone(monkeypatch):
    # float32, 512-bit vectors, rows % 4, columns % a panel, a row of g <= 4 KB.
    monkeypatch.setattr(_cpu_gemm, "TWO_PANEL_BLOCKS", True)
    panel = _cpu_gemm.panel_width(np.float32)
    assert _cpu_team.tiled(512, 128, np.float32) and _cpu_team.tiled(1024, 256, np.float32)
    assert _cpu_team.tiled(4, panel, np.float32) and _cpu_team.tiled(12, 3 * panel, np.float32)
    assert not _cpu_team.tiled(512, 128, np.float64)
    assert not _cpu_team.tiled(510, 128, np.float32) and not _cpu_team.tiled(512, 120, np.float32)
    assert not _cpu_team.tiled(2048, 512, np.float32)  # 64,64,512: OpenBLAS won
    monkeypatch.setattr(_cpu_gemm, "TWO_PANEL_BLOCKS", False)
    assert not _cpu_team.tiled(512, 128, np.float32)


@pytest.mark.parametrize("same_grad", [False, True])
def test_team_weight_gradients_on_our_tiles_match_float64_with_the_same_bits_at_1_2_3_workers(same_grad, monkeypatch):
    # The team with dW_ih and dW_hh on our tiles (the LSTM's shared g: in one pass as
    # pairs; otherwise each alone), dW_hh over half the work (cut in two), K past and
    # short of the k block, one row block: float64's products within float32 rounding,
    # and the same bits at 1, 2 and 3 workers.
    gemm = _gemm_or_fail()
    monkeypatch.setattr(_cpu_gemm, "TWO_PANEL_BLOCKS", True)  # the rule's vector width: any here
    monkeypatch.setattr(_cpu_common, "PARALLEL_MIN_MACS", 0)
    panel = _cpu_gemm.panel_width(np.float32)
    rng = np.random.default_rng(6)
    for steps, rows, input_size, hidden in ((300, 100, 2 * panel, 3 * panel), (129, 16, panel, 5 * panel),
                                           (1, 4, panel, panel)):
        assert _cpu_team.tiled(rows, input_size, np.float32) and _cpu_team.tiled(rows, hidden, np.float32)
        operands = _operands(rng, steps, rows, input_size, rows, hidden, np.float32, same_grad)
        kinds = set(_cpu_team.plan(steps, rows, input_size, rows, hidden, False, (True, True), same_grad)[0][:, 0])
        assert kinds == {_cpu_team.PACKED, _cpu_team.TILES_PAIR if same_grad else _cpu_team.TILES}
        results = []
        for workers in (1, 2, 3):
            monkeypatch.setattr(_cpu_common, "threads", lambda workers=workers: workers)
            with _cpu_blas.one_blas_thread():
                got = _cpu_team.run(gemm, *operands, False)
            _check(got, operands, np.float32)
            results.append([a.tobytes() for a in got])
        assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("options", [(False, (False, False), False), (True, (False, False), False),
                                     (False, (True, True), False), (False, (True, False), True),
                                     (True, (True, True), True)])
def test_team_plan_is_the_shapes_alone_and_covers_every_row(options):
    # The chunks are a function of the shape (never of the thread count): each output
    # row of each product in exactly one chunk, largest chunks first; with the weight
    # gradients on our tiles, alone or (shared g) as pairs too.
    dx_on_blas, tiles, shared = options
    for shape in ((1024, 512, 128, 512, 128), (33, 9, 300, 9, 4), (1, 3, 2, 3, 2), (300, 100, 64, 100, 96)):
        table, total = _cpu_team.plan(*shape, dx_on_blas, tiles, shared)
        steps, rows_ih, input_size, rows_hh, hidden = shape
        assert total == steps * (2 * rows_ih * input_size + rows_hh * hidden)
        covered = {_cpu_team.DW_IH: [], _cpu_team.DW_HH: [], _cpu_team.DX: []}
        macs = []
        for row in table:
            if row[_cpu_team._KIND] == _cpu_team.PACKED:
                first, end = row[_cpu_team._M], row[_cpu_team._N]
                covered[_cpu_team.DX].extend(range(first, end))
                macs.append((end - first) * rows_ih * input_size)
            elif row[_cpu_team._KIND] == _cpu_team.TILES_PAIR:  # dW_ih's and dW_hh's same rows
                assert shared and tiles == (True, True) and row[_cpu_team._C] == _cpu_team.DW_IH
                first, count = row[_cpu_team._A_AT], row[_cpu_team._M]
                covered[_cpu_team.DW_IH].extend(range(first, first + count))
                covered[_cpu_team.DW_HH].extend(range(first, first + count))
                macs.append(count * (input_size + hidden) * steps)
            else:
                kind = row[_cpu_team._KIND]
                dw = {_cpu_team.DW_IH: 0, _cpu_team.DW_HH: 1}.get(row[_cpu_team._C])
                want = _cpu_team.BLAS if dw is None or not tiles[dw] else _cpu_team.TILES
                assert kind == want and not (shared and tiles == (True, True) and dw is not None)
                columns = row[_cpu_team._N]
                first = row[_cpu_team._C_AT] // columns
                covered[row[_cpu_team._C]].extend(range(first, first + row[_cpu_team._M]))
                macs.append(row[_cpu_team._M] * columns * row[_cpu_team._K])
        assert sorted(covered[_cpu_team.DW_IH]) == list(range(rows_ih))
        assert sorted(covered[_cpu_team.DW_HH]) == list(range(rows_hh))
        assert sorted(covered[_cpu_team.DX]) == list(range(steps))
        assert macs == sorted(macs, reverse=True) and sum(macs) == total
        assert not table.flags.writeable
        if tiles == (True, True) and shared:  # dW in 1 or 2 pair chunks
            assert 1 <= sum(table[:, _cpu_team._KIND] == _cpu_team.TILES_PAIR) <= 2


class _Controller:
    def __init__(self, internal_api, threading_layer="pthreads", **symbols):
        self.internal_api = internal_api
        self.threading_layer = threading_layer
        self.filepath = f"/fake/{internal_api}.so"
        self.dynlib = types.SimpleNamespace(**symbols)


def test_find_gemm_knows_openblas_and_mkl_and_nothing_else():
    # find_gemm returns a gemm only where it knows the symbol and its integer width:
    # the real library here (NumPy's OpenBLAS), nothing for BLIS, nor for an OpenBLAS
    # without its config, older than 0.3.7 or built with OpenMP.
    from threadpoolctl import ThreadpoolController

    real = _cpu_team.find_gemm(ThreadpoolController().select(user_api="blas").lib_controllers)
    assert real is not None and real.sgemm and real.dgemm
    assert _cpu_team.find_gemm([]) is None
    assert _cpu_team.find_gemm([_Controller("blis")]) is None
    assert _cpu_team.find_gemm([_Controller("openblas")]) is None  # no openblas_get_config

    class Config:
        def __init__(self, text):
            self.text, self.restype = text, None

        def __call__(self):
            return self.text

    old = _Controller("openblas", openblas_get_config=Config(b"OpenBLAS 0.3.6 USE64BITINT"))
    assert _cpu_team.find_gemm([old]) is None
    # An OpenMP build: the team would call it from inside its own OpenMP region.
    openmp = _Controller("openblas", threading_layer="openmp", openblas_get_config=Config(b"OpenBLAS 0.3.31"))
    assert _cpu_team.find_gemm([openmp]) is None
    assert _cpu_team._version("OpenBLAS 0.3.31.188.0 USE64BITINT") == (0, 3, 31)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_products_without_a_known_gemm_runs_as_before(dtype, monkeypatch):
    # The fallback (Accelerate, BLIS, an unknown BLAS): NumPy's products with the BLAS
    # at one thread, then dx on the packed kernel; the team is never entered.
    monkeypatch.setattr(_cpu_blas, "_gemm", False)
    monkeypatch.setattr(_cpu_blas, "TEAM_MIN_MACS", 0)
    entered = []
    monkeypatch.setattr(_cpu_team, "run", lambda *a: entered.append(a))
    rng = np.random.default_rng(2)
    operands = _operands(rng, 50, 60, 21, 60, 15, dtype, same_grad=True)
    _check(_cpu_blas.backward_products(*operands), operands, dtype)
    assert not entered


def _train(cell, steps, batch, hidden, dtype, inputs=None):
    rng = np.random.default_rng(3)
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    inputs = hidden + 3 if inputs is None else inputs
    x = rng.standard_normal((steps, batch, inputs)).astype(dtype)
    w_ih = (rng.standard_normal((gates * hidden, inputs)) / hidden).astype(dtype)
    w_hh = (rng.standard_normal((gates * hidden, hidden)) / hidden).astype(dtype)
    b_ih, b_hh = (rng.standard_normal(gates * hidden).astype(dtype) for _ in range(2))
    dy = rng.standard_normal((steps, batch, hidden)).astype(dtype)
    forward, backward = {"lstm": (rnnkernels.lstm_forward, rnnkernels.lstm_backward),
                         "gru": (rnnkernels.gru_forward, rnnkernels.gru_backward),
                         "rnn": (rnnkernels.rnn_forward, rnnkernels.rnn_backward)}[cell]
    grads = backward(forward(x, w_ih, w_hh, b_ih, b_hh, backend="cpu"), dy=dy)
    return [grads.dx, grads.dw_ih, grads.dw_hh, grads.db_ih, grads.db_hh]


@pytest.mark.parametrize("hidden, inputs", [(37, 40), (32, 32)])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_every_cell_gives_the_same_bits_on_the_team_at_1_2_3_workers(cell, hidden, inputs, monkeypatch):
    # Each cell's backward through the team at 1, 2 and 3 workers (with the time loops'
    # choice forced along: serial at 1, persistent otherwise): bit for bit the same, and
    # within float32 rounding of the products as before (the fallback's). At H = I = 32
    # the weight gradients run on our tiles (the LSTM's and RNN's as pairs over one g), where
    # the rule's vector width allows (forced here).
    _gemm_or_fail()
    monkeypatch.setattr(_cpu_gemm, "TWO_PANEL_BLOCKS", True)
    ran = []
    real = _cpu_team.run
    monkeypatch.setattr(_cpu_team, "run", lambda *a: ran.append(1) or real(*a))
    kinds = []
    real_plan = _cpu_team.plan
    monkeypatch.setattr(_cpu_team, "plan", lambda *a: kinds.append(set(real_plan(*a)[0][:, 0])) or real_plan(*a))
    monkeypatch.setattr(_cpu_blas, "TEAM_MIN_MACS", 0)
    results = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(_cpu_common, "threads", lambda workers=workers: workers)
        for name in ("PERSISTENT_MIN_MACS", "PERSISTENT_MIN_GROUPS", "PARALLEL_MIN_UNITS", "PARALLEL_MIN_MACS"):
            monkeypatch.setattr(_cpu_common, name, 0)
        results.append(_train(cell, 5, 6, hidden, np.float32, inputs))
    assert len(ran) == 3
    # The LSTM and the Elman RNN pass one g for both (pairs), the GRU two.
    tiles = set() if hidden != 32 else {_cpu_team.TILES if cell == "gru" else _cpu_team.TILES_PAIR}
    assert all(k - {_cpu_team.BLAS, _cpu_team.PACKED} == tiles for k in kinds) and len(kinds) == 3
    for one, other in zip(results[0], results[1]):
        assert one.tobytes() == other.tobytes()
    for one, other in zip(results[0], results[2]):
        assert one.tobytes() == other.tobytes()
    monkeypatch.setattr(_cpu_blas, "_gemm", False)
    for team, before in zip(results[0], _train(cell, 5, 6, hidden, np.float32, inputs)):
        np.testing.assert_allclose(team, before, rtol=0, atol=1e-5 * max(1.0, np.abs(before).max()))


def test_team_holds_the_blas_at_one_thread_and_gives_the_users_setting_back(monkeypatch):
    # Two Python threads run every cell's backward at once through the team: the BLAS
    # is at one thread whenever the team runs (its gemm calls must not start OpenBLAS's
    # own threads inside ours), the bits are those of a call alone, and the user's 2 is
    # back after.
    from threadpoolctl import ThreadpoolController, threadpool_limits

    _gemm_or_fail()
    blas = ThreadpoolController().select(user_api="blas")
    monkeypatch.setattr(_cpu_blas, "TEAM_MIN_MACS", 0)
    monkeypatch.setattr(_cpu_common, "threads", lambda: 2)
    monkeypatch.setattr(_cpu_common, "PARALLEL_MIN_MACS", 0)
    seen = []
    real = _cpu_team.run

    def spy(*args):
        seen.append([lib.num_threads for lib in blas.lib_controllers])
        return real(*args)

    monkeypatch.setattr(_cpu_team, "run", spy)
    cells = ("lstm", "gru", "rnn")
    want = {cell: _train(cell, 4, 3, 20, np.float32) for cell in cells}
    errors = []
    barrier = threading.Barrier(2)

    def run():
        try:
            for _ in range(15):
                barrier.wait()
                for cell in cells:
                    for got, expected in zip(_train(cell, 4, 3, 20, np.float32), want[cell]):
                        assert got.tobytes() == expected.tobytes()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread's assert
            barrier.abort()
            errors.append(error)

    with threadpool_limits(limits=2, user_api="blas"):
        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert [lib.num_threads for lib in blas.lib_controllers] == [2] * len(blas.lib_controllers)
    assert len(seen) == len(cells) * (1 + 2 * 15)
    assert all(set(counts) == {1} for counts in seen), seen


class _FakeMkl:
    """MKL's two thread settings as its documentation gives them: a process-wide one
    (MKL_Set_Num_Threads) and one per thread that overrides it where set
    (MKL_Set_Num_Threads_Local, which returns the previous one, 0 for none; 0 unsets)."""

    def __init__(self, shared):
        self.shared = shared
        self._local = threading.local()

    def MKL_Set_Num_Threads(self, count):
        self.shared = count

    def MKL_Set_Num_Threads_Local(self, count):
        previous = getattr(self._local, "count", 0)
        self._local.count = count
        return previous

    def MKL_Get_Max_Threads(self):
        return getattr(self._local, "count", 0) or self.shared


class _MklController:
    """threadpoolctl's MKLController as far as _cpu_blas uses it: its limit is
    MKL_Set_Num_Threads_Local, the calling thread's alone."""

    internal_api = "mkl"

    def __init__(self, dynlib):
        self.dynlib = dynlib

    @property
    def num_threads(self):
        return self.dynlib.MKL_Get_Max_Threads()

    def set_num_threads(self, count):
        return self.dynlib.MKL_Set_Num_Threads_Local(count)


def _seen_from_another_thread(mkl):
    seen = []
    thread = threading.Thread(target=lambda: seen.append(mkl.MKL_Get_Max_Threads()))
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.parametrize("callers_local", [0, 3])
def test_one_blas_thread_holds_mkl_at_one_thread_in_every_thread(callers_local, monkeypatch):
    # MKL (conda's NumPy): the team's gemm calls, and weight_gradients' worker, run on
    # threads other than the caller's, which follow MKL's process-wide setting, not the
    # caller's thread-local one (threadpoolctl's limit). Inside, every thread must see 1;
    # after, the process-wide setting and the caller's own (none, or the user's 3) are
    # as they were. (Seen with MKL 2026.2.1, gnu layer: the other thread saw 2 inside.)
    mkl = _FakeMkl(shared=2)
    mkl.MKL_Set_Num_Threads_Local(callers_local)
    monkeypatch.setattr(_cpu_blas, "_blas", [_MklController(mkl)])
    with _cpu_blas.one_blas_thread():
        assert mkl.MKL_Get_Max_Threads() == 1
        assert _seen_from_another_thread(mkl) == 1
        with _cpu_blas.one_blas_thread():  # a second entrant changes nothing
            assert _seen_from_another_thread(mkl) == 1
        assert _seen_from_another_thread(mkl) == 1
    assert mkl.shared == 2 and _seen_from_another_thread(mkl) == 2
    assert mkl.MKL_Set_Num_Threads_Local(callers_local) == callers_local


@pytest.mark.parametrize("wide", [False, True])
def test_a_32_bit_blas_never_gets_a_dimension_past_its_integers(wide, monkeypatch):
    # A BLAS with 32-bit integers (an OpenBLAS without USE64BITINT, MKL's LP64 cblas)
    # takes m, n, k and the leading dimensions as C ints: K = T·B rows past 2^31 - 1
    # would be cut to their low 32 bits by the intrinsic, a silently wrong product.
    # Such shapes must take the fallback (NumPy's products check their BLAS's integer
    # width themselves). The limit lowered here so that a small shape crosses it.
    gemm = _gemm_or_fail()._replace(wide=wide)
    monkeypatch.setattr(_cpu_blas, "_gemm", gemm)
    monkeypatch.setattr(_cpu_blas, "TEAM_MIN_MACS", 0)
    monkeypatch.setattr(_cpu_team, "INT32_MAX", 49)
    entered = []
    real = _cpu_team.run
    monkeypatch.setattr(_cpu_team, "run", lambda *a: entered.append(1) or real(*a))
    rng = np.random.default_rng(4)
    operands = _operands(rng, 50, 12, 5, 12, 3, np.float32, same_grad=True)
    _check(_cpu_blas.backward_products(*operands), operands, np.float32)
    assert entered == ([1] if wide else [])
    assert _cpu_team.fits(gemm, (50, 12, 5, 12, 3)) == wide
    assert _cpu_team.fits(gemm, (49, 12, 5, 12, 3))
