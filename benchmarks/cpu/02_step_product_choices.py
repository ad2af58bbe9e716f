"""Experiment 02: how to do the per-step product h_{t-1} W_hhᵀ of the CPU time loop.

    python benchmarks/cpu/02_step_product_choices.py          # 1 thread, the six sizes of issue 12

Inference (training=False), float32, one thread for every library; every candidate is
validated against ``rnnkernels.reference`` (float32 max rel. err. < 1e-4 of the output)
before timing. Candidates, all with the same input projection and the same compiled
cell (``rnnkernels.cpu``'s serial variant):

* ``python-blas``: the time loop in Python, one ``np.matmul`` (OpenBLAS) per step: the
  cpu backend before issue 12;
* ``numba-blas``: the time loop in one Numba call, OpenBLAS's ``cblas_sgemm`` called
  from nopython code through a symbol registered with llvmlite (no SciPy needed; the
  library is NumPy's bundled scipy-openblas). Removes the per-step Python and unboxing
  overhead, not OpenBLAS's repacking of W_hh on every call;
* ``numba-mkl-packed``: as numba-blas, with MKL's packed GEMM (``cblas_sgemm_pack`` once
  per call, ``cblas_sgemm_compute`` per step). MKL is taken from PyTorch's
  ``libtorch_cpu.so``, which exports it on x86 Linux wheels: good enough to measure,
  not something the library may depend on (an ``mkl`` wheel would be the real route);
  skipped where torch or the symbols are missing;
* ``packed-kernel``: what ``rnnkernels.cpu`` does since issue 12: W_hhᵀ packed once per call into
  16-column panels, the register-blocked kernel of ``rnnkernels/_cpu_gemm.py``.

Result (2-core AMD EPYC, AVX2, numba 0.68, torch 2.13; one run of this file, 20 s;
1-minute load average 2.5-2.8 from other jobs, so single rows move by +-10-20%;
median of 11 paired interleaved ratios to torch.nn.LSTM, lower is better):

    T,B,I,H           python-blas   numba-blas   numba-mkl-packed   packed-kernel
    128,16,256,256       1.85          1.82           1.25              1.11
    128,8,128,128        2.16          2.09           1.18              0.96
    512,8,128,128        2.46          2.35           1.32              1.06
    64,64,512,512        1.15          1.16           1.05              1.01
    256,1,128,128        1.04          0.66           1.08              0.73
    1024,4,64,64         1.49          0.98           1.28              0.90

numba-blas gains little over python-blas except where steps are tiny (B=1, H=64):
the OpenBLAS call itself, with its per-call packing of W_hh, is the cost, not the
loop around it. MKL's packed GEMM removes the packing and wins up to 1.9x over
python-blas; the hand-written kernel wins more at every size but B=1 (0.73 against
numba-blas's 0.66, within this run's noise) and needs no library: at these shapes
(B <= 64 rows, K = H <= 512) a 4-row x 16-column tile of FMAs kept in registers,
with the packed weights streaming from L1/L2, runs near the core's peak (about 100
GFLOP/s float32 at 16x256x1024 on one core of this machine when quiet, against 40
for OpenBLAS with its repacking; measured with the load average at 2).
Kept: packed-kernel (the cpu backend adds its own projection and the API around it).
Run time of this file: about 20 s.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SIZES = [(128, 16, 256, 256), (128, 8, 128, 128), (512, 8, 128, 128), (64, 64, 512, 512),
         (256, 1, 128, 128), (1024, 4, 64, 64)]


def _symbols():
    """Register cblas_sgemm (NumPy's OpenBLAS) and, if present, MKL's packed GEMM (from
    libtorch_cpu) as llvmlite symbols; return which are there."""
    import llvmlite.binding as llvm

    found = {}
    blas = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "libscipy_openblas*.so"))
    if blas:
        lib = ctypes.CDLL(blas[0])
        name = next((n for n in ("scipy_cblas_sgemm64_", "cblas_sgemm") if hasattr(lib, n)), None)
        if name:
            llvm.add_symbol("exp02_sgemm", ctypes.cast(getattr(lib, name), ctypes.c_void_p).value)
            found["blas"] = lib
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        for name in ("cblas_sgemm_compute", "cblas_sgemm_pack", "cblas_sgemm_pack_get_size"):
            getattr(lib, name)
        llvm.add_symbol("exp02_sgemm_compute", ctypes.cast(lib.cblas_sgemm_compute, ctypes.c_void_p).value)
        lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
        lib.cblas_sgemm_pack_get_size.argtypes = [ctypes.c_int] * 4
        lib.cblas_sgemm_pack.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                                                 ctypes.c_void_p]
        found["mkl"] = lib
    except (ImportError, OSError, AttributeError):
        pass
    return found


def make_candidates():
    import numba
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from rnnkernels import _cpu_gemm, cpu

    found = _symbols()
    cell = cpu._SERIAL.cell_forward
    i32, i64, ptr_t = types.int32, types.int64, types.voidptr
    row_major, no_trans, trans, packed_id, b_matrix = 101, 111, 112, 151, 162

    @intrinsic
    def data(typingctx, arr):
        def codegen(context, builder, sig, args):
            array = context.make_array(sig.args[0])(context, builder, args[0])
            return builder.bitcast(array.data, cgutils.voidptr_t)

        return types.voidptr(arr), codegen

    def projection(x, w_ih):
        steps, batch, size = x.shape
        return (x.reshape(steps * batch, size) @ w_ih.T).reshape(steps, batch, w_ih.shape[0])

    def states(x, hidden):
        steps, batch, _ = x.shape
        return np.zeros((steps + 1, batch, hidden), x.dtype), np.zeros((steps + 1, batch, hidden), x.dtype)

    def python_blas(x, w_ih, w_hh):
        gates = projection(x, w_ih)
        h, c = states(x, w_hh.shape[1])
        z = np.empty(gates.shape[1:], x.dtype)
        for t in range(x.shape[0]):
            np.matmul(h[t], w_hh.T, out=z)
            cell(gates[t], z, c[t], h[t + 1], c[t + 1])
        return h[1:]

    candidates = {"python-blas": python_blas}

    if "blas" in found:
        # ILP64 OpenBLAS: 64-bit sizes, 32-bit enums.
        sgemm = types.ExternalFunction("exp02_sgemm", types.void(
            i32, i32, i32, i64, i64, i64, types.float32, ptr_t, i64, ptr_t, i64, types.float32, ptr_t, i64))

        @numba.njit
        def blas_loop(gates, h, c, w_hh, z):
            steps, batch, width = gates.shape
            hidden = width // 4
            for t in range(steps):
                sgemm(row_major, no_trans, trans, batch, width, hidden, np.float32(1), data(h[t]), hidden,
                      data(w_hh), hidden, np.float32(0), data(z), width)
                cell(gates[t], z, c[t], h[t + 1], c[t + 1])

        def numba_blas(x, w_ih, w_hh):
            gates = projection(x, w_ih)
            h, c = states(x, w_hh.shape[1])
            blas_loop(gates, h, c, w_hh, np.empty(gates.shape[1:], x.dtype))
            return h[1:]

        candidates["numba-blas"] = numba_blas

    if "mkl" in found:
        mkl = found["mkl"]
        compute = types.ExternalFunction("exp02_sgemm_compute", types.void(
            i32, i32, i32, i32, i32, i32, ptr_t, i32, ptr_t, i32, types.float32, ptr_t, i32))

        @numba.njit
        def mkl_loop(gates, h, c, packed, z):
            steps, batch, width = gates.shape
            hidden = width // 4
            for t in range(steps):
                compute(row_major, no_trans, packed_id, batch, width, hidden, data(h[t]), hidden, data(packed), width,
                        np.float32(0), data(z), width)
                cell(gates[t], z, c[t], h[t + 1], c[t + 1])

        def numba_mkl_packed(x, w_ih, w_hh):
            gates = projection(x, w_ih)
            h, c = states(x, w_hh.shape[1])
            batch, width, hidden = x.shape[1], w_hh.shape[0], w_hh.shape[1]
            packed = np.empty(mkl.cblas_sgemm_pack_get_size(b_matrix, batch, width, hidden) // 4 + 16, np.float32)
            mkl.cblas_sgemm_pack(row_major, b_matrix, trans, batch, width, hidden, 1.0, w_hh.ctypes.data, hidden,
                                 packed.ctypes.data)
            mkl_loop(gates, h, c, packed, np.empty((batch, width), x.dtype))
            return h[1:]

        candidates["numba-mkl-packed"] = numba_mkl_packed

    def packed_kernel(x, w_ih, w_hh):
        gates = projection(x, w_ih)
        h, c = states(x, w_hh.shape[1])
        packed = _cpu_gemm.pack(w_hh.T)
        cpu._SERIAL.forward_steps(gates, h, c, packed,
                                           np.empty((x.shape[1], packed.shape[0] * packed.shape[2]), x.dtype))
        return h[1:]

    candidates["packed-kernel"] = packed_kernel
    return candidates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    import torch

    import rnnkernels

    torch.set_num_threads(1)
    candidates = make_candidates()
    print("median ratio to torch (paired, interleaved); float32 inference, 1 thread")
    print(f"{'T,B,I,H':18}" + "".join(f"{name:>18}" for name in candidates) + "   load")
    for steps, batch, size, hidden in SIZES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((steps, batch, size)).astype(np.float32)
        lstm = torch.nn.LSTM(size, hidden, bias=False)
        w_ih = lstm.weight_ih_l0.detach().numpy()
        w_hh = lstm.weight_hh_l0.detach().numpy()
        want = rnnkernels.lstm_forward(x, w_ih, w_hh, backend="reference").y
        for name, run in candidates.items():
            error = np.abs(run(x, w_ih, w_hh) - want).max() / np.abs(want).max()
            if not error < 1e-4:
                raise SystemExit(f"{name} is wrong at {(steps, batch, size, hidden)}: {error:.2e}")
        x_t = torch.from_numpy(x)

        def torch_run(lstm=lstm, x_t=x_t):
            with torch.no_grad():
                lstm(x_t)

        calls = dict(candidates, torch=None)
        times = {name: [] for name in calls}
        for repeat in range(args.repeats):
            order = list(calls) if repeat % 2 else list(reversed(calls))
            for name in order:
                start = time.perf_counter()
                if name == "torch":
                    torch_run()
                else:
                    calls[name](x, w_ih, w_hh)
                times[name].append(time.perf_counter() - start)
        base = np.array(times["torch"])
        ratios = [np.median(np.array(times[name]) / base) for name in candidates]
        print(f"{f'{steps},{batch},{size},{hidden}':18}" + "".join(f"{r:>18.2f}" for r in ratios)
              + f"   {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
