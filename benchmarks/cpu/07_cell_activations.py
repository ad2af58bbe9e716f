"""Experiment 07: cheaper σ and tanh for the CPU cells (issue 12, the one-thread half).

    python benchmarks/cpu/07_cell_activations.py          # 1 thread; about 3 minutes

Candidates for ``rnnkernels/_fastmath.py``'s float32 activations (each a (σ, tanh) pair):

* ``taylor7`` (before): e^{-|x|} through Cody-Waite and the degree-7 Taylor polynomial
  of e^r - 1 (7 operations); σ(x) = (x >= 0 ? 1 : e) / (1 + e) with e = e^{-|x|};
  tanh(|x|) = -u / (2 + u), u = e^{-2|x|} - 1, both with the two-constant ln2 split;
* ``minimax``: the same, with e^r - 1 = r + r^2 Q(r), Q the degree-4 minimax polynomial
  of ``06_expm1_minimax.py`` (6 operations, error 1.7e-8 relative);
* ``kept`` (what _fastmath.py now has): the minimax polynomial; σ(x) = 1 / (1 + e) with
  e = e^{-x} for x clamped to [-87, 87] (no select between two numerators, no |x|);
  tanh with the one-constant reduction r = fma(m, ln2, -2|x|) (its error matters only
  where tanh is ±1 anyway) and the negation moved into the final select.

Not tried here, and why: a shared reciprocal for two gates (1 / (d_i d_g), then each
gate as its numerator times the other denominator times it) saves a division but adds
three roundings to each gate: about 1.5 ulp on top of the 1.5e-7 these already have,
past the 2e-7 they promise, and every gate is saved for backward, so no quotient can
be skipped. vrcp14ps with a Newton step comes only with LLVM's full ``fast`` flags
(nnan and ninf too, which would break the NaN contract). A quotient with the other
gate's product (σ(o) tanh(c) as one fraction) saves nothing: σ(o) is saved, so its
division stays.

Times are the timing thread's CPU time (``time.thread_time``): on the shared 2-core
machine other jobs' load moves wall times by 20% and more, CPU time much less.
Measured per candidate, all in one process: the max relative error against float64
over the 3.1 million arguments of tests/test_cpu.py (the test asks <= 2e-7); ns per
value over a 4096-value array in L1 (median of 15 rounds); then the cells alone, each
compiled with the candidate's activations exactly as ``_cpu_common.compile_variant``
compiles the package's (serial variant), timed in pairs against the step product
h W_hhᵀ on the same B x H (``_cpu_common.STEP_PRODUCT``), the order rotating
each round: the median µs per call, and ``new/old``, the median of the per-round
ratios of the candidate's cell to taylor7's. Every candidate's cell outputs are
checked before timing (LSTM forward and backward cells against float64 NumPy formulas,
rel. err. < 1e-5; the GRU's and RNN's against the package's own cells, which
tests/test_cpu_cells.py checks against their references).

Result (2-core AMD EPYC Zen 4 VM, AVX-512, numba 0.68; 2026-12-01 20:04-20:07 UTC,
under the project's ``quiet`` wrapper: nothing else running; 2m49s):

    candidate   σ max rel. err.   tanh max rel. err.   σ ns/value   tanh ns/value
    taylor7            1.78e-07             1.88e-07        0.383           0.405
    minimax            1.71e-07             1.69e-07        0.335           0.345
    kept               1.47e-07             1.69e-07        0.295           0.290

    B x H      cell               product µs   taylor7 µs (new/old)   minimax µs (new/old)   kept µs (new/old)   kept cell / product
     8 x 128   lstm forward             9.22      2.34 (1.000)      2.05 (0.878)      1.90 (0.823)   0.206
     8 x 128   lstm backward            9.22      1.18 (1.000)      1.37 (1.154)      1.21 (1.027)   0.132
     8 x 128   gru forward              9.22      1.47 (1.000)      1.38 (0.941)      1.23 (0.827)   0.133
     8 x 128   rnn tanh forward         9.22      0.42 (1.000)      0.37 (0.891)      0.34 (0.802)   0.036
    16 x 256   lstm forward            72.93      8.91 (1.000)      7.93 (0.885)      7.09 (0.794)   0.097
    16 x 256   lstm backward           72.93      4.36 (1.000)      4.39 (1.000)      3.95 (0.901)   0.054
    16 x 256   gru forward             72.93      5.43 (1.000)      4.86 (0.892)      4.38 (0.806)   0.060
    16 x 256   rnn tanh forward        72.93      1.64 (1.000)      1.48 (0.900)      1.27 (0.772)   0.017

A second quiet run (20:34-20:38 UTC, after ``cpu._cell_forward`` moved σ(o) into its
update loop, a body all candidates share; the machine ran about 20% slower per value
that time) gave ``kept``'s LSTM forward cell 0.794 and 0.862 of taylor7's at 8 x 128
and 16 x 256, GRU 0.845 and 0.811, tanh RNN 0.770 and 0.765, LSTM backward 1.015 and
0.967.

Kept: ``kept``. Per value σ is 23% and tanh 28% cheaper; the cells that are mostly
activations (LSTM and GRU forward, tanh RNN) 17-23% cheaper; the LSTM's backward cell
(one tanh per unit among many products) within noise to 10%. Against a step the gain is
small: at 8 x 128 the LSTM forward cell was 25% of the step product's time (2.34 µs
against 9.22) and is 21% now, so a forward step is about 4% shorter, and a whole
inference call at (512, 8, 128) about 1.3% (``08_against_checkout.py``: 0.987, p10-p90
0.931-1.032; the input projection is some 40% of that call). What is left in the cell is
mostly the activations themselves, at 21-24 operations per 16 values, one of them a
division: at 8 x 128 the kept forward cell took 2.13 µs, its four loops timed one at a
time 2.02 µs together, and its 5·B·H activations at 0.3 ns per value 1.54 µs (thread CPU
time, one run, not quiet). Tried and dropped on the side (one run each, not quiet):
64-byte aligned cell arrays (each step's gates, z, h and c land 16-48 bytes off a cache
line; a cell with all its arrays aligned ran 17% faster alone, but the 512 x 8 x 128 time
loop with every array aligned ran 19% slower, likely 4K aliasing between arrays that
then share their low address bits), and Cody-Waite's rounding by the 1.5·2^23
trick instead of floor (no gain measured), and Eigen's rational tanh (x P(x²) / Q(x²),
degrees 13 and 6, clamped at ±7.9): 2.7e-7 max relative error over the same arguments,
past the 2e-7, for only about 10% less time per value than ``kept``'s tanh.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numba
import numpy as np

from rnnkernels import _cpu_common, _cpu_gemm, _fastmath, cpu, cpu_gru, cpu_rnn
from rnnkernels._fastmath import (
    _HALF,
    _JIT,
    _LN2_HI,
    _LN2_LO,
    _LOG2E,
    _MAX_ARG,
    _ONE,
    _TWO,
    _ZERO,
    _exp2_int,
)

# -- the candidates' activations ---------------------------------------------------------

_C1, _C2, _C3, _C4, _C5, _C6, _C7 = (np.float32(1.0 / n) for n in (1, 2, 6, 24, 120, 720, 5040))


@numba.njit(**_JIT)
def _taylor7_parts(a):
    a = min(a, _MAX_ARG)
    m = np.floor(a * _LOG2E + _HALF)
    r = (m * _LN2_HI - a) + m * _LN2_LO
    q = r * (_C1 + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * _C7))))))
    return _exp2_int(-np.int32(m)), q


@numba.njit(**_JIT)
def _minimax_parts(a):
    a = min(a, _MAX_ARG)
    m = np.floor(a * _LOG2E + _HALF)
    r = (m * _LN2_HI - a) + m * _LN2_LO
    return _exp2_int(-np.int32(m)), _fastmath._expm1_reduced(r)


def _old_forms(parts):
    """The activations of _fastmath.py before issue 12's cell work, on ``parts``."""

    @numba.njit(**_JIT)
    def tanh32(x):
        s, q = parts(_TWO * abs(x))
        u = s * q + (s - _ONE)
        t = -u / (_TWO + u)
        return t if x >= _ZERO else -t

    @numba.njit(**_JIT)
    def sigmoid32(x):
        s, q = parts(abs(x))
        e = s * q + s
        d = _ONE + e
        if x >= _ZERO:
            return _ONE / d
        return _ZERO if x < -_MAX_ARG else e / d

    return sigmoid32, tanh32


CANDIDATES = {
    "taylor7": _old_forms(_taylor7_parts),
    "minimax": _old_forms(_minimax_parts),
    "kept": (_fastmath.sigmoid32, _fastmath.tanh32),
}


def _module(sigmoid32, tanh32):
    """A stand-in for the ``_fastmath`` module the cells call ``sigmoid``/``tanh`` on."""
    module = types.ModuleType("candidate")
    module.sigmoid, module.tanh = sigmoid32, tanh32
    return module


def _compiled(py_func, glob):
    """``py_func`` compiled as _cpu_common.compile_function compiles a serial cell, with
    ``glob`` replacing some of its globals; not cached."""
    func = types.FunctionType(py_func.__code__, dict(py_func.__globals__, **glob), py_func.__name__)
    return numba.njit(nogil=True, error_model="numpy", fastmath={"contract", "reassoc"})(func)


# -- accuracy and throughput of the activations -----------------------------------------


def _loops(sigmoid32, tanh32):
    @numba.njit(fastmath={"contract"}, error_model="numpy")
    def sigmoid_loop(rounds, x, out):
        for _ in range(rounds):
            for j in range(x.shape[0]):
                out[j] = sigmoid32(x[j])

    @numba.njit(fastmath={"contract"}, error_model="numpy")
    def tanh_loop(rounds, x, out):
        for _ in range(rounds):
            for j in range(x.shape[0]):
                out[j] = tanh32(x[j])

    return sigmoid_loop, tanh_loop


def accuracy(loops, x):
    """(σ's, tanh's) max relative error against float64; raises if σ is not an exact 0
    below -87 or tanh(0) is not 0."""
    wide = x.astype(np.float64)
    with np.errstate(over="ignore"):
        want = {0: 1.0 / (1.0 + np.exp(-wide)), 1: np.tanh(wide)}
    errors = []
    for which, loop in enumerate(loops):
        got = np.empty_like(x)
        loop(1, x, got)
        keep = x >= -87 if which == 0 else want[1] != 0
        if not (got[~keep] == 0).all():
            raise AssertionError("an exact 0 is not exact")
        errors.append(float((np.abs(got[keep] - want[which][keep]) / np.abs(want[which][keep])).max()))
    return errors


def throughput(all_loops, rounds=15, size=4096, calls=400):
    """ns per value, {name: (σ, tanh)}, interleaved rounds, medians."""
    x = 3 * np.random.default_rng(0).standard_normal(size, dtype=np.float32)
    out = np.empty_like(x)
    samples = {(name, which): [] for name in all_loops for which in (0, 1)}
    for loops in all_loops.values():
        for loop in loops:
            loop(1, x, out)
    for _ in range(rounds):
        for name, loops in all_loops.items():
            for which, loop in enumerate(loops):
                start = time.thread_time()
                loop(calls, x, out)
                samples[(name, which)].append((time.thread_time() - start) / calls / size * 1e9)
    return {name: tuple(float(np.median(samples[(name, w)])) for w in (0, 1)) for name in all_loops}


# -- the cells alone, against the step product ----------------------------------------


def _repeat(call_name, arity):
    """A compiled loop that calls the global ``call_name`` ``rounds`` times with
    ``arity`` arguments."""
    names = ", ".join(f"a{k}" for k in range(arity))
    source = f"def repeat(rounds, {names}):\n    for _ in range(rounds):\n        {call_name}({names})\n"
    namespace = {}
    exec(source, namespace)  # noqa: S102 - a fixed template: one loop per arity
    return namespace["repeat"]


def _lstm_problem(batch, hidden, rng):
    gates = rng.standard_normal((batch, 4 * hidden), dtype=np.float32) * 2
    z = rng.standard_normal((batch, 4 * hidden), dtype=np.float32) * 2
    c_prev = rng.standard_normal((batch, hidden), dtype=np.float32)
    return gates, z, c_prev


def _check_lstm_forward(cell, batch, hidden):
    rng = np.random.default_rng(1)
    gates, z, c_prev = _lstm_problem(batch, hidden, rng)
    pre = (gates.astype(np.float64) + z)
    act = np.concatenate([1 / (1 + np.exp(-pre[:, : 2 * hidden])), np.tanh(pre[:, 2 * hidden : 3 * hidden]),
                          1 / (1 + np.exp(-pre[:, 3 * hidden :]))], axis=1)
    c = act[:, hidden : 2 * hidden] * c_prev + act[:, :hidden] * act[:, 2 * hidden : 3 * hidden]
    h = act[:, 3 * hidden :] * np.tanh(c)
    got_h, got_c = np.empty_like(c_prev), np.empty_like(c_prev)
    cell(gates, z, c_prev, got_h, got_c)
    for got, want in ((gates, act), (got_c, c), (got_h, h)):
        error = np.abs(got - want).max() / np.abs(want).max()
        if error > 1e-5:
            raise AssertionError(f"LSTM forward cell: rel. err. {error:.2e}")


def _check_lstm_backward(cell, batch, hidden):
    rng = np.random.default_rng(2)
    gates, _, c_prev = _lstm_problem(batch, hidden, rng)
    act = (1 / (1 + np.exp(-gates.astype(np.float64))))
    act[:, 2 * hidden : 3 * hidden] = np.tanh(gates[:, 2 * hidden : 3 * hidden])
    c_cur = rng.standard_normal((batch, hidden), dtype=np.float32)
    dy, dh, carry = (rng.standard_normal((batch, hidden), dtype=np.float32) for _ in range(3))
    i, f, g, o = (act[:, k * hidden : (k + 1) * hidden] for k in range(4))
    tanh_c = np.tanh(c_cur.astype(np.float64))
    dh_t = dy.astype(np.float64) + dh
    dc = carry + dh_t * o * (1 - tanh_c**2)
    want = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                           dh_t * tanh_c * o * (1 - o)], axis=1)
    dz = np.empty((batch, 4 * hidden), np.float32)
    cell(dy, dh, carry.copy(), act.astype(np.float32), c_prev, c_cur, dz, np.empty((batch, 2)))
    error = np.abs(dz - want).max() / np.abs(want).max()
    if error > 1e-5:
        raise AssertionError(f"LSTM backward cell: rel. err. {error:.2e}")


def cell_cases(batch, hidden):
    """{cell: (py_func, arguments maker, checker or None)}: the cells that call the
    activations, with float32 arguments at B x H."""
    rng = np.random.default_rng(3)

    def lstm_forward():
        gates, z, c_prev = _lstm_problem(batch, hidden, rng)
        return gates, z, c_prev, np.empty_like(c_prev), np.empty_like(c_prev)

    def lstm_backward():
        gates = rng.random((batch, 4 * hidden), dtype=np.float32)
        c_prev, c_cur, dy, dh, carry = (rng.standard_normal((batch, hidden), dtype=np.float32) for _ in range(5))
        return dy, dh, carry, gates, c_prev, c_cur, np.empty_like(gates), np.empty((batch, 2))

    def gru_forward():
        gates = rng.standard_normal((batch, 3 * hidden), dtype=np.float32)
        z = rng.standard_normal((batch, 3 * hidden), dtype=np.float32)
        b_hn = rng.standard_normal(hidden, dtype=np.float32)
        h_prev = rng.standard_normal((batch, hidden), dtype=np.float32)
        return gates, z, b_hn, h_prev, np.empty_like(h_prev), np.empty_like(h_prev)

    def rnn_forward():
        gx = rng.standard_normal((batch, hidden), dtype=np.float32)
        return gx, rng.standard_normal((batch, hidden), dtype=np.float32), np.empty_like(gx)

    return {
        "lstm forward": (cpu._cell_forward, lstm_forward, _check_lstm_forward),
        "lstm backward": (cpu._cell_backward, lstm_backward, _check_lstm_backward),
        "gru forward": (cpu_gru._cell_forward, gru_forward, None),
        "rnn tanh forward": (cpu_rnn._cell_forward_tanh, rnn_forward, None),
    }


def _check_against_package(py_func, cell, make_args):
    """A candidate's cell against the package's serial one on the same inputs."""
    package = _cpu_common.compile_function(py_func, "bench05", False)
    args = make_args()
    mine = [a.copy() for a in args]
    theirs = [a.copy() for a in args]
    cell(*mine)
    package(*theirs)
    for got, want in zip(mine, theirs):
        error = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
        if error > 1e-5:
            raise AssertionError(f"{py_func.__name__}: rel. err. {error:.2e} against the package's cell")


def time_cells(batch, hidden, rounds=21, target_s=0.004):
    """{cell: {candidate: (median µs, median new/old)}}, plus the product's µs."""
    rng = np.random.default_rng(4)
    w_hh = rng.standard_normal((4 * hidden, hidden), dtype=np.float32)
    packed = _cpu_gemm.pack(w_hh.T)
    h = rng.standard_normal((batch, hidden), dtype=np.float32)
    z = np.empty((batch, packed.shape[0] * packed.shape[2]), np.float32)
    product = _compiled(_repeat("PRODUCT", 3), {"PRODUCT": _cpu_common.STEP_PRODUCT})
    results = {}
    product_samples = []
    for cell_name, (py_func, make_args, check) in cell_cases(batch, hidden).items():
        runners = {}
        for name, pair in CANDIDATES.items():
            cell = _compiled(py_func, {"_fastmath": _module(*pair)})
            if check is not None:
                check(cell, batch, hidden)
            else:
                _check_against_package(py_func, cell, make_args)
            args = make_args()
            runners[name] = (_compiled(_repeat("CELL", len(args)), {"CELL": cell}), args)
        jobs = dict(runners, product=(product, (h, packed, z)))
        for runner, args in jobs.values():
            runner(1, *args)
        start = time.thread_time()
        runners["taylor7"][0](100, *runners["taylor7"][1])
        calls = max(10, int(target_s / ((time.thread_time() - start) / 100)))
        product_calls = max(2, calls // 8)
        samples = {name: [] for name in jobs}
        order = list(jobs)
        for round_ in range(rounds):
            for name in order[round_ % len(order):] + order[: round_ % len(order)]:
                runner, args = jobs[name]
                count = product_calls if name == "product" else calls
                begin = time.thread_time()
                runner(count, *args)
                samples[name].append((time.thread_time() - begin) / count * 1e6)
        old = np.array(samples["taylor7"])
        results[cell_name] = {
            name: (float(np.median(samples[name])), float(np.median(np.array(samples[name]) / old)))
            for name in CANDIDATES
        }
        product_samples += samples["product"]
    return results, float(np.median(product_samples))


def main():
    numba.set_num_threads(1)
    x = _fastmath.accuracy_arguments()
    loops = {name: _loops(*pair) for name, pair in CANDIDATES.items()}
    speed = throughput(loops)
    print("candidate   σ max rel. err.   tanh max rel. err.   σ ns/value   tanh ns/value")
    for name in CANDIDATES:
        sigmoid_error, tanh_error = accuracy(loops[name], x)
        print(f"{name:10s}  {sigmoid_error:15.2e}   {tanh_error:18.2e}   {speed[name][0]:10.3f}   {speed[name][1]:13.3f}")
    print()
    print("B x H      cell               product µs   " + "   ".join(f"{n} µs (new/old)" for n in CANDIDATES)
          + "   kept cell / product")
    for batch, hidden in ((8, 128), (16, 256)):
        results, product_us = time_cells(batch, hidden)
        for cell_name, row in results.items():
            cells = "   ".join(f"{row[n][0]:7.2f} ({row[n][1]:.3f})" for n in CANDIDATES)
            print(f"{batch:2d} x {hidden:3d}   {cell_name:17s}  {product_us:10.2f}   {cells}   {row['kept'][0] / product_us:.3f}")


if __name__ == "__main__":
    main()
