"""float32 σ and tanh that LLVM can vectorize, for the Numba CPU backend.

Numba lowers ``np.tanh`` and ``np.exp`` on scalars to calls into libm, which LLVM
cannot vectorize here (no SVML), and five such calls per hidden unit made the LSTM
cell cost more than its matrix product. These functions are straight-line arithmetic
instead, so a loop over units compiles to 16-wide AVX-512 (or 8-wide AVX2) code: about
0.3 ns per value on the 2-core Zen 4 machine the project builds on, against 22 ns for
libm's tanhf.

Both rest on one range reduction of e^{-a} (Cody and Waite)::

    a = m ln2 - r,  m = round(a / ln2),  |r| <= ln2 / 2
    e^{-a} = 2^{-m} e^{r} = s (1 + q),   s = 2^{-m},  q = e^{r} - 1

q = r + r^2 Q(r) with Q the degree-4 minimax polynomial for (e^r - 1 - r) / r^2 on
|r| <= ln2/2 (relative error of q below 1.7e-8 with its float32 coefficients; derived
by Remez's algorithm in ``benchmarks/cpu/06_expm1_minimax.py``): six operations, one
fewer than the degree-7 Taylor polynomial used before, at a quarter of an ulp. s is
built directly from its exponent bits. Then::

    tanh(|x|) = -u / (2 + u),     u = e^{-2|x|} - 1 = s q + (s - 1)
    σ(x)      = 1 / (1 + e),      e = e^{-x} = s q + s

Writing tanh through u = expm1 keeps full relative accuracy for tiny x (no 1 - e
cancellation). σ takes x with its sign (a = x, clamped to [-87, 87]): for x < 0, e is
e^{|x|} and 1 / (1 + e) keeps full relative accuracy for tiny σ, with no select between
two numerators (measured 1.5e-7 max error, better than e / (1 + e) with e = e^{-|x|}).
tanh needs only the one-constant reduction r = m ln2 - a, one FMA with a float32 ln2:
its error m (ln2 - fl(ln2)) < 2e-9 m only matters where m is small, since tanh is within
2 e^{-a} of ±1; σ for x < 0 keeps the two-constant split (ln2 = _LN2_HI + _LN2_LO with
m _LN2_HI exact), since σ ≈ e^{x} there needs e's full relative accuracy up to m = 126.
Arguments are clamped at 87 so 2^{±m} stays a normal float; σ(x) is an exact 0 below
x = -87 (as σ of -Inf is 0 in float64, and a saturated gate's derivative σ(1-σ) is an
exact 0), tanh saturates exactly to ±1 and σ to 1. NaN gives NaN; the results are never
Inf. Measured over 3.1 million arguments (``accuracy_arguments``: Gaussian, a ramp over
[-100, 100], tiny values, ±1e4; tests/test_cpu.py::test_fastmath_activations_max_relative_error): max
relative error 1.5e-7 for σ and 1.7e-7 for tanh, within 2e-7, i.e. a few float32 ulp.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_JIT = dict(inline="always", fastmath={"contract"}, error_model="numpy")


@intrinsic
def _exp2_int(typingctx, k):
    """2^k as float32 for an int32 k in [-126, 127], built from the exponent bits."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        biased = builder.add(args[0], ir.Constant(ir.IntType(32), 127))
        bits = builder.shl(biased, ir.Constant(ir.IntType(32), 23))
        return builder.bitcast(bits, ir.FloatType())

    return sig, codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)  # tanh's one-constant reduction
_LN2_HI = np.float32(0.693145751953125)  # ln 2 split so that m * _LN2_HI is exact
_LN2_LO = np.float32(1.428606765330187e-06)
_MAX_ARG = np.float32(87.0)  # 2^-126 is the smallest normal float32
# Q(r) ≈ (e^r - 1 - r) / r^2 on |r| <= ln2/2, lowest degree first (the module docstring;
# printed by benchmarks/cpu/06_expm1_minimax.py).
_Q0, _Q1, _Q2, _Q3, _Q4 = (
    np.float32(v) for v in (0.4999999701976776, 0.1666654348373413, 0.04166720062494278, 0.00836651399731636, 0.0013882522471249104)
)
_ZERO, _HALF, _ONE, _TWO = (np.float32(v) for v in (0.0, 0.5, 1.0, 2.0))


@numba.njit(**_JIT)
def _expm1_reduced(r):
    """e^r - 1 for a float32 |r| <= ln2 / 2: r plus the minimax r^2 Q(r), so that the
    last FMA adds r itself (full relative accuracy for tiny r)."""
    return r + (r * r) * (_Q0 + r * (_Q1 + r * (_Q2 + r * (_Q3 + r * _Q4))))


@numba.njit(**_JIT)
def tanh32(x):
    """tanh of a float32, vectorizable."""
    a = min(_TWO * abs(x), _MAX_ARG)
    m = np.floor(a * _LOG2E + _HALF)
    # One product in the expression, so contraction can only make it fma(m, ln2, -a).
    r = m * _LN2 - a
    s = _exp2_int(-np.int32(m))
    u = s * _expm1_reduced(r) + (s - _ONE)
    # t = -tanh(|x|): the sign is then one masked negation after the division (negating
    # u first, as before, cost an operation more).
    t = u / (_TWO + u)
    return -t if x >= _ZERO else t


@numba.njit(**_JIT)
def sigmoid32(x):
    """σ of a float32, vectorizable."""
    a = max(min(x, _MAX_ARG), -_MAX_ARG)
    m = np.floor(a * _LOG2E + _HALF)
    r = (m * _LN2_HI - a) + m * _LN2_LO
    s = _exp2_int(-np.int32(m))
    e = s * _expm1_reduced(r) + s
    # The clamp would leave σ = 1 / (1 + e^87) for any x below -87, -Inf included; NaN
    # fails the comparison and stays NaN (the clamps keep it: Numba's min and max
    # return NaN for a NaN argument).
    return _ZERO if x < -_MAX_ARG else _ONE / (_ONE + e)


@numba.njit(inline="always", error_model="numpy")
def tanh64(x):
    """tanh of a float64 (libm: float64 accuracy matters more than speed)."""
    return np.tanh(x)


@numba.njit(inline="always", error_model="numpy")
def sigmoid64(x):
    """σ of a float64 without overflow: e^{-|x|} never exceeds 1."""
    e = np.exp(-abs(x))
    return 1.0 / (1.0 + e) if x >= 0.0 else e / (1.0 + e)


def sigmoid(x):
    """σ for Numba code of either float dtype: sigmoid32 or sigmoid64, chosen at typing
    time. Cell loops call this one name, so they carry no closure over a dispatcher
    (whose pickle would make Numba's cache key differ in every process)."""
    raise NotImplementedError("sigmoid is only callable from Numba-compiled code")


def tanh(x):
    """tanh for Numba code of either float dtype (see ``sigmoid``)."""
    raise NotImplementedError("tanh is only callable from Numba-compiled code")


@overload(sigmoid)
def _sigmoid_for(x):
    if x == types.float32:
        return lambda x: sigmoid32(x)
    if x == types.float64:
        return lambda x: sigmoid64(x)
    return None


@overload(tanh)
def _tanh_for(x):
    if x == types.float32:
        return lambda x: tanh32(x)
    if x == types.float64:
        return lambda x: tanh64(x)
    return None


def accuracy_arguments():
    """The 3.1 million float32 arguments the accuracy above is stated over (the test and
    benchmarks/cpu/07 measure on these): Gaussian (scale 3, where gates live), a ramp
    over [-100, 100] (every branch and both clamps), tiny values (tanh through expm1, σ
    near 1/2) and ±1e4."""
    rng = np.random.default_rng(12)
    return np.concatenate([
        3 * rng.standard_normal(1_000_000, dtype=np.float32),
        np.linspace(-100, 100, 2_000_001, dtype=np.float32),
        1e-6 * rng.standard_normal(100_000, dtype=np.float32),
        np.float32(1e4) * rng.choice(np.array([-1, 1], np.float32), 10_001),
    ])
