"""Experiment 10: where one-thread LSTM inference time goes, and the floor of the packed kernel.

    NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/cpu/11_inference_phases.py

Per size (T, B, I=H; float32), after checking ``cpu.forward(training=False)`` against
the float64 reference (rel. err. < 2e-5): the median time of the whole inference call;
of its phases run alone: the input projection of all steps (``_cpu_common.project``),
packing both weights, the training forward's time loop (``_SERIAL.forward_steps``:
step products and cells, on a fresh copy of the projection each call), and the T step
products alone (one Python call each, so about 1 µs a step of call overhead on top);
and the GFLOP/s of the packed kernel's 4x2 tile with its operands in L1, which with
2·T·B·4H·(I+H) flops gives the floor of any call that does the multiply-adds on it.

Result (2-core Zen 4 VM, AVX-512; ms). 2026-12-01 22:24 UTC, not quiet, the whole
call before the chunked inference loop: 128,16,256: whole 21.6, projection 10.1,
packing 0.20, loop 10.6, products 9.9; 512,8,128: 12.3, 5.6, 0.05, 6.1, 5.3;
64,64,512: 164, 79, 2.5, 80, 79; 128,8,128: 2.8, 1.2, 0.05, 1.5, 1.2. 23:54 UTC, quiet,
the whole call with the chunked loop (the phases are the training forward's, as
before; this run's machine was slower): tile 111 GFLOP/s; 128,16,256: whole 22.2,
projection 12.0, packing 0.36, loop 11.9, products 10.7, floor 19.4; 512,8,128: 11.7,
6.0, 0.08, 6.9, 5.6, 9.7; 64,64,512: 186, 97, 3.1, 100, 86, 155; 128,8,128: 3.04, 1.34,
0.05, 1.65, 1.28, 2.42. The tile's 111-112 GFLOP/s is 16 float32 FMAs a cycle at about
3.5 GHz (AVX-512 FMAs double-pumped on two 256-bit pipes); rnnkernels/cpu.py's
docstring says what the floor means for issue 12's 0.8x torch. Run time: about 70 s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numba
import numpy as np

from rnnkernels import _cpu_common, _cpu_gemm, cpu, reference

SIZES = ((128, 16, 256), (512, 8, 128), (64, 64, 512), (128, 8, 128))


def median_ms(function, repeats=15):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


@numba.njit
def _tile_in_l1(a, packed, out, repeats):
    for _ in range(repeats):
        _cpu_gemm.tile4x2(a, 0, packed, 0, out, None)


def tile_gflops(depth=64, repeats=200_000):
    """The 4x2 tile's rate on a 4 x depth block and 2 panels, all in L1."""
    a = np.ones((4, depth), np.float32)
    packed = _cpu_gemm.pack(np.full((depth, 2 * _cpu_gemm.panel_width(np.float32)), 1e-3, np.float32))
    out = np.empty((4, packed.shape[0] * packed.shape[2]), np.float32)
    _tile_in_l1(a, packed, out, 10)
    if not np.allclose(out, depth * np.float32(1e-3), rtol=1e-5):
        raise SystemExit("tile4x2: wrong product")
    flops = 2 * repeats * 4 * out.shape[1] * depth
    return flops / (median_ms(lambda: _tile_in_l1(a, packed, out, repeats), 5) * 1e6)


def row(steps, batch, hidden, rate):
    """One size's line: validated, then the whole call and its phases (median ms)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps, batch, hidden), dtype=np.float32)
    w_ih = (rng.standard_normal((4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    w_hh = (rng.standard_normal((4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(4 * hidden)).astype(np.float32)
    h0 = np.zeros((batch, hidden), np.float32)
    args = (x, w_ih, w_hh, bias, h0, h0)
    want = reference.forward(*(a.astype(np.float64) for a in args), training=False)[0]
    got = cpu.forward(*args, training=False)[0]
    if np.abs(got - want).max() / np.abs(want).max() > 2e-5:
        raise SystemExit(f"cpu.forward wrong at {steps},{batch},{hidden}")
    whole = median_ms(lambda: cpu.forward(*args, training=False))
    packed_ih = _cpu_gemm.pack(w_ih.T)
    flat = x.reshape(steps * batch, hidden)
    project = median_ms(lambda: _cpu_common.project(flat, packed_ih, 4 * hidden, bias))
    pack = median_ms(lambda: (_cpu_gemm.pack(w_ih.T), _cpu_gemm.pack(w_hh.T)))
    gates = _cpu_common.project(flat, packed_ih, 4 * hidden, bias).reshape(steps, batch, 4 * hidden)
    packed = _cpu_gemm.pack(w_hh.T)
    z = np.empty((batch, packed.shape[0] * packed.shape[2]), np.float32)
    h = np.zeros((steps + 1, batch, hidden), np.float32)
    c = np.zeros((steps + 1, batch, hidden), np.float32)
    copies = iter([gates.copy() for _ in range(20)])
    loop = median_ms(lambda: cpu._SERIAL.forward_steps(next(copies), h, c, packed, z))

    def products():
        for t in range(steps):
            _cpu_common.STEP_PRODUCT(h[t], packed, z)

    product_ms = median_ms(products)
    floor = 2 * steps * batch * 4 * hidden * 2 * hidden / (rate * 1e6)
    return (f"{steps:5d} {batch:3d} {hidden:4d} {whole:7.2f} {project:8.2f} {pack:5.2f} {loop:6.2f} "
            f"{product_ms:9.2f} {floor:9.2f}")


def main():
    rate = tile_gflops()
    print(f"tile4x2 in L1: {rate:.0f} GFLOP/s")
    print("    T   B  I=H   whole  project  pack   loop  products   floor (ms, medians)")
    for size in SIZES:
        print(row(*size, rate), flush=True)


if __name__ == "__main__":
    main()
