"""Experiment 06: the polynomial for e^r - 1 in ``rnnkernels/_fastmath.py``, derived.

    python benchmarks/cpu/06_expm1_minimax.py          # about 10 s; needs mpmath

After Cody-Waite's reduction the activations need q = e^r - 1 for |r| <= ln2 / 2. Until
issue 12's cell work this was the degree-7 Taylor polynomial (7 operations: 6 FMAs and
a product; truncation error below 6e-9, far less than float32 needs). Here q is written

    q = r + r^2 Q(r)

so that its two leading terms are exact (the last FMA adds r itself: q keeps r's full
relative accuracy for tiny r, where tanh's u = q), and Q of degree d is the polynomial
that minimizes the largest *relative* error of q on the interval (a minimax fit, by
Remez's exchange algorithm):

* the target is Q*(r) = (e^r - 1 - r) / r^2, evaluated with mpmath at 40 digits;
* weight: the error of q is r^2 (Q - Q*), relative to q it is that over e^r - 1, so
  the fit minimizes max |w (Q - Q*)| with w = r^2 / (e^r - 1);
* Remez: solve for d + 1 coefficients and the levelled error E on d + 2 reference
  points (start: Chebyshev extrema), move the reference to the extrema of the error
  on a 4001-point Chebyshev grid, repeat until the reference stops moving;
* the coefficients are rounded to float32 (what the code multiplies with) and the
  relative error of q is measured again with those, in mpmath, on 20001 points.

Result (this file's output, the error with float32 coefficients):

    degree of Q   operations for q   max relative error of q
         2               4                 2.1e-05
         3               5                 8.4e-07
         4               6                 1.7e-08   <- rnnkernels/_fastmath.py
         5               7                 4.0e-09

Degree 3 would add up to 8.4e-7 to every result (several ulp): too much for the 2e-7
the activations promise. Degree 4 adds 1.7e-8, a quarter of a float32 ulp, with one
operation fewer than the Taylor polynomial; the accuracy test
(tests/test_cpu.py::test_fastmath_activations_max_relative_error) measures the
activations built on it at 1.7e-7 or better over 3.1 million arguments. Run time: 11 s.
"""

from __future__ import annotations

import numpy as np

try:
    import mpmath
except ImportError:  # pragma: no cover - the experiment needs it, the package does not
    raise SystemExit("this experiment needs mpmath (pip install mpmath)") from None

mpmath.mp.dps = 40
HALF_LN2 = mpmath.log(2) / 2


def exact_q(r):
    return mpmath.expm1(mpmath.mpf(float(r)))


def target(points):
    """Q*(r) = (e^r - 1 - r) / r^2 (1/2 at r = 0), in float64."""
    out = np.empty(len(points))
    for i, r in enumerate(points):
        v = mpmath.mpf(float(r))
        out[i] = float((mpmath.expm1(v) - v) / v**2) if v != 0 else 0.5
    return out


def remez(degree, iterations=40):
    """Float64 coefficients (lowest first) of the degree-``degree`` Q and the levelled
    relative error of q."""
    grid = np.cos(np.linspace(0.0, np.pi, 4001)) * float(HALF_LN2)
    want = target(grid)
    q = np.array([float(exact_q(r)) for r in grid])
    weight = np.abs(np.divide(grid**2, q, out=np.zeros_like(grid), where=q != 0))
    count = degree + 2
    reference = np.round(np.linspace(0, len(grid) - 1, count)).astype(int)
    for _ in range(iterations):
        x = grid[reference]
        system = np.zeros((count, count))
        for k in range(degree + 1):
            system[:, k] = x**k
        system[:, -1] = (-1.0) ** np.arange(count) / np.maximum(weight[reference], 1e-300)
        solution = np.linalg.solve(system, want[reference])
        coefficients = solution[:-1]
        error = (np.polynomial.polynomial.polyval(grid, coefficients) - want) * weight
        sign = np.where(error >= 0, 1, -1)
        runs = np.split(np.arange(len(grid)), np.flatnonzero(np.diff(sign)) + 1)
        extrema = [run[np.argmax(np.abs(error[run]))] for run in runs]
        while len(extrema) > count:  # drop the smaller end
            extrema = extrema[1:] if abs(error[extrema[0]]) < abs(error[extrema[-1]]) else extrema[:-1]
        if len(extrema) < count:
            break
        new = np.array(sorted(extrema))
        if np.array_equal(new, reference):
            break
        reference = new
    return coefficients, float(np.abs(error).max())


def relative_error_float32(coefficients):
    """Max relative error of q = r + r^2 Q(r) with Q's coefficients rounded to float32,
    the polynomial evaluated exactly (mpmath): the approximation's own error."""
    c32 = [mpmath.mpf(float(np.float32(c))) for c in coefficients]
    worst = 0.0
    for r in np.linspace(-float(HALF_LN2), float(HALF_LN2), 20001):
        if r == 0.0:
            continue
        v = mpmath.mpf(r)
        poly = mpmath.mpf(0)
        for c in reversed(c32):
            poly = poly * v + c
        approx = v + v * v * poly
        exact = mpmath.expm1(v)
        worst = max(worst, float(abs((approx - exact) / exact)))
    return worst


def main():
    print("degree of Q   operations for q   max relative error of q (float32 coefficients)   coefficients")
    for degree in (2, 3, 4, 5):
        coefficients, levelled = remez(degree)
        error = relative_error_float32(coefficients)
        shown = ", ".join(repr(float(np.float32(c))) for c in coefficients)
        print(f"     {degree}               {degree + 2}                 {error:.1e} (levelled {levelled:.1e})   {shown}")


if __name__ == "__main__":
    main()
