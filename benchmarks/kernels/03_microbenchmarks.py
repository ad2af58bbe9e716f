"""Experiment 03: microbenchmarks that feed the cost model, and the FTZ probe.

    python benchmarks/kernels/03_microbenchmarks.py [--json out.json]   # GPU (CuPy)
    python benchmarks/kernels/03_microbenchmarks.py --emulated          # CPU emulator

Runs the kernels of 03_microbenchmarks.cu (read its header) and returns the device
parameters of ``rnnkernels.cost_model.Device`` it measured:

* ``l2_latency_ns``: a single thread's pointer chase through a buffer that fits L2
  but not L1 (entries a cache line apart, one random cycle, L2-only loads), after a
  warm pass: kernel time / hops; also cycles per hop from clock64;
* ``grid_sync_ns``: per-producer ready flags (release store, acquire polls), one block
  per SM, cooperative launch: kernel time / steps; and, where the CUDA headers are
  there for NVRTC, ``cooperative_groups::this_grid().sync()`` the same way
  (``grid_sync_cg_ns``);
* ``python_launch_us``: empty kernels launched from a Python loop, wall time per launch;
  ``graph_node_us``: the same kernels captured in a CUDA graph, replay time per node;
* ``l2_gbs`` and ``hbm_gbs``: L2-only float4 reads over a buffer of a quarter of the L2
  (repeated) and of 8x the L2 (once).

Each time is the median of repeats (CUDA events on a GPU). ``--emulated`` runs the same
launches on tiny sizes on the CPU emulator and checks the results; its timings are
the emulator's and mean nothing about a GPU. ``ftz_probe`` (``probe_ftz``) is run by
benchmarks/gpu_session.py: it records whether float16 conversions through our helpers
are exact and whether float32 denormal arithmetic is flushed, under CuPy's options.

Written without a GPU: the emulated mode and the NVRTC compile have run, GPU mode has not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rnnkernels import _launch, _sources  # noqa: E402

SOURCE = Path(__file__).resolve().with_suffix(".cu")
NAMES = ("rnnkernels::pointer_chase", "rnnkernels::flag_barrier", "rnnkernels::empty_kernel",
         "rnnkernels::stream_read", "rnnkernels::ftz_probe")
COOPERATIVE_NAMES = ("rnnkernels::flag_barrier", "rnnkernels::grid_sync_loop")
COOPERATIVE_DEFINE = "-DRNNKERNELS_COOPERATIVE_GROUPS"
LINE_WORDS = 32  # 128-byte cache line / 4-byte entries


def _source_text() -> str:
    return f'#line 1 "benchmarks/kernels/{SOURCE.name}"\n' + SOURCE.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- runtimes
class GpuKernels:
    """CuPy modules for the kernels; ``cooperative`` launches flag_barrier and
    grid_sync_loop cooperatively (every block resident, or the launch fails)."""

    emulated = False

    def __init__(self):
        import cupy

        self.cupy = cupy
        self.xp = cupy
        dev = cupy.cuda.Device()
        self.sm_count = dev.attributes["MultiProcessorCount"]
        self.l2_bytes = dev.attributes["L2CacheSize"]
        # The kernels' own options (csrc/ and NVIDIA's header folders, which hold
        # cuda_fp16.h and cooperative_groups.h): CuPy adds the rest, -ftz=true included.
        options = _launch.compile_options()
        self.module = cupy.RawModule(code=_source_text(), options=options, name_expressions=NAMES)
        self.module.compile()
        self.cg_reason = ""
        try:
            self.cooperative = self._cooperative_module(options + (COOPERATIVE_DEFINE,), COOPERATIVE_NAMES)
        except Exception as error:  # noqa: BLE001 - the flags barrier can still run without grid.sync
            self.cg_reason = f"grid.sync module did not compile: {type(error).__name__}: {str(error)[:500]}"
            self.cooperative = self._cooperative_module(options, COOPERATIVE_NAMES[:1])

    def _cooperative_module(self, options, names):
        """flag_barrier (and grid_sync_loop) launched cooperatively: CuPy uses
        cuLaunchCooperativeKernel, which refuses a grid that cannot be co-resident."""
        module = self.cupy.RawModule(code=_source_text(), options=options, name_expressions=names,
                                     enable_cooperative_groups=True)
        module.compile()
        return module

    def function(self, name, cooperative=False):
        module = self.cooperative if cooperative else self.module
        kernel = module.get_function(name)
        return lambda grid, block, args: kernel(grid, block, args)

    def timer(self):
        cupy = self.cupy
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()

        class Timer:
            def __enter__(self):
                start.record()
                return self

            def __exit__(self, *exc):
                stop.record()
                stop.synchronize()
                self.ms = cupy.cuda.get_elapsed_time(start, stop)

        return Timer()

    def synchronize(self):
        self.cupy.cuda.Device().synchronize()

    def asnumpy(self, array):
        return self.cupy.asnumpy(array)


class EmulatedKernels:
    """The same launches on the CPU emulator (cooperative launches for the barriers)."""

    emulated = True
    sm_count = 4
    l2_bytes = 64 * 1024
    cg_reason = ""

    def __init__(self):
        from rnnkernels import emulator

        self.xp = np
        self.module = emulator.load_module(
            [_source_text()], NAMES + COOPERATIVE_NAMES[1:], include_dirs=(str(_sources.csrc_dir()),),
            defines={"RNNKERNELS_COOPERATIVE_GROUPS": 1})

    def function(self, name, cooperative=False):
        kernel = self.module.get_function(name)
        return lambda grid, block, args: kernel(grid, block, args, cooperative=cooperative)

    def timer(self):
        class Timer:
            def __enter__(self):
                self.start = time.perf_counter()
                return self

            def __exit__(self, *exc):
                self.ms = (time.perf_counter() - self.start) * 1e3

        return Timer()

    def synchronize(self):
        pass

    def asnumpy(self, array):
        return np.asarray(array)


def kernels(emulated: bool):
    return EmulatedKernels() if emulated else GpuKernels()


def _median_ms(rt, run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with rt.timer() as timer:
            run()
        times.append(timer.ms)
    return statistics.median(times)


# --------------------------------------------------------------------------- measurements
def l2_latency(rt, repeats=5) -> dict:
    """ns per dependent L2 load; the walk's end index is checked against the host's."""
    lines = 64 if rt.emulated else max(1024, rt.l2_bytes // 4 // 128)  # a quarter of L2
    hops = 100 if rt.emulated else 32768
    rng = np.random.default_rng(0)
    order = rng.permutation(lines)
    chain = np.zeros(lines * LINE_WORDS, dtype=np.uint32)
    # One cycle through the lines in random order (defeats prefetching and L1 reuse).
    chain[order * LINE_WORDS] = np.roll(order, -1) * LINE_WORDS
    expected = 0
    for _ in range(hops):
        expected = int(chain[expected])
    device_chain = rt.xp.asarray(chain)
    out = rt.xp.zeros(2, dtype=np.int64)
    chase = rt.function("rnnkernels::pointer_chase")
    chase((1,), (32,), (device_chain, np.int32(lines), out))  # warm L2 with one full cycle
    ms = _median_ms(rt, lambda: chase((1,), (32,), (device_chain, np.int32(hops), out)), repeats)
    index, cycles = (int(v) for v in rt.asnumpy(out))
    if index != expected:
        raise RuntimeError(f"pointer_chase ended at {index}, the host's walk at {expected}")
    return {"l2_latency_ns": ms * 1e6 / hops, "l2_latency_cycles": cycles / hops, "chase_lines": lines, "hops": hops}


def grid_sync(rt, repeats=5) -> dict:
    """ns per grid-wide handshake: per-producer flags, and cooperative groups' grid.sync."""
    blocks = rt.sm_count
    threads = 32 if rt.emulated else 128
    steps = 5 if rt.emulated else 2000
    result = {"sync_blocks": blocks, "sync_steps": steps}
    barrier = rt.function("rnnkernels::flag_barrier", cooperative=True)
    out = rt.xp.zeros(blocks, dtype=np.uint32)
    # Zeroed flags for every launch, made before the timed ones (no memset timed).
    fresh_flags = [rt.xp.zeros(blocks, dtype=np.uint32) for _ in range(repeats + 1)]

    def run_flags():
        barrier((blocks,), (threads,), (fresh_flags.pop(), np.int32(steps), out))

    run_flags()  # warm-up (module load, first-launch costs)
    result["grid_sync_ns"] = _median_ms(rt, run_flags, repeats) * 1e6 / steps
    if not np.all(rt.asnumpy(out) == steps):
        raise RuntimeError(f"flag_barrier: blocks saw {rt.asnumpy(out)}, expected {steps} everywhere")
    if rt.cg_reason:
        result["grid_sync_cg_skipped"] = rt.cg_reason
        return result
    sync = rt.function("rnnkernels::grid_sync_loop", cooperative=True)
    out[...] = 0
    sync((blocks,), (threads,), (np.int32(steps), out))
    result["grid_sync_cg_ns"] = _median_ms(rt, lambda: sync((blocks,), (threads,), (np.int32(steps), out)),
                                           repeats) * 1e6 / steps
    if not np.all(rt.asnumpy(out) == steps):
        raise RuntimeError(f"grid_sync_loop: blocks saw {rt.asnumpy(out)}, expected {steps}")
    return result


def launch_gap(rt, repeats=5) -> dict:
    """us per empty-kernel launch from a Python loop (wall clock, CPU bound), and per
    node of a CUDA graph of the same launches (events around the replay)."""
    launches = 5 if rt.emulated else 2000
    empty = rt.function("rnnkernels::empty_kernel")
    empty((1,), (32,), ())
    rt.synchronize()
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(launches):
            empty((1,), (32,), ())
        rt.synchronize()
        walls.append((time.perf_counter() - start) / launches * 1e6)
    result = {"python_launch_us": statistics.median(walls), "launches": launches}
    if rt.emulated:
        result["graph_node_skipped"] = "the emulator has no CUDA graphs"
        return result
    cupy = rt.cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    nodes = 200
    with stream:
        stream.begin_capture()
        for _ in range(nodes):
            empty((1,), (32,), ())
        graph = stream.end_capture()
    graph.upload(stream)
    graph.launch(stream)
    stream.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3 / nodes)
    result.update(graph_node_us=statistics.median(times), graph_nodes=nodes)
    return result


def bandwidth(rt, repeats=5) -> dict:
    """GB/s of L2-only float4 reads: a buffer of a quarter of the L2 read `repeats`
    times per launch (L2), and one of 8x the L2 read once (HBM). The per-thread sums
    are checked against the host's."""
    result = {}
    blocks = rt.sm_count * (2 if rt.emulated else 8)
    threads = 32 if rt.emulated else 256
    read = rt.function("rnnkernels::stream_read")
    for key, size, passes in (("l2_gbs", rt.l2_bytes // 4, 2 if rt.emulated else 100),
                              ("hbm_gbs", rt.l2_bytes * 8, 1)):
        n4 = max(blocks * threads, size // 16)
        # Small integers: every float sum is exact, so the check is bitwise. Made on
        # the device (8x the L2 is half a gigabyte: no host copy).
        device_data = (rt.xp.arange(n4 * 4, dtype=np.int32) % 3).astype(np.float32)
        out = rt.xp.zeros(blocks * threads, dtype=np.float32)
        args = (device_data, np.int64(n4), np.int32(passes), out)
        read((blocks,), (threads,), args)
        ms = _median_ms(rt, lambda: read((blocks,), (threads,), args), repeats)
        result[key] = n4 * 16 * passes / (ms * 1e-3) / 1e9
        result[key.replace("_gbs", "_buffer_bytes")] = n4 * 16
        if rt.emulated:  # the check needs the whole buffer on the host: only at tiny sizes
            quads = np.asarray(device_data).reshape(n4, 4)
            sums = (quads[:, 0] + quads[:, 1]) + (quads[:, 2] + quads[:, 3])
            want = np.zeros(blocks * threads, dtype=np.float64)
            np.add.at(want, np.arange(n4) % (blocks * threads), sums)
            if not np.array_equal(rt.asnumpy(out), (want * passes).astype(np.float32)):
                raise RuntimeError("stream_read sums differ from the host's")
    return result


def _flush(values: np.ndarray) -> np.ndarray:
    """float32 denormals to zero, sign kept (what -ftz=true does to inputs and results)."""
    tiny = np.abs(values) < np.finfo(np.float32).tiny
    return np.where(tiny & np.isfinite(values), np.copysign(np.float32(0), values), values).astype(np.float32)


def probe_ftz(rt) -> dict:
    """float16 <-> float32 through our helpers, and float32 denormal arithmetic, against
    NumPy. ``conversions_exact`` must hold (our kernels rely on it); ``denormals`` says
    what the arithmetic did: "ieee" (kept), "ftz" (inputs and results flushed to zero,
    sign kept: CuPy's -ftz=true) or "other" (see the mismatches)."""
    half_bits = np.array([0x0001, 0x0002, 0x0200, 0x03FF, 0x8001, 0x83FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00],
                         dtype=np.uint16)
    floats = np.array([1.17549435e-38, 5.877472e-39, 1e-40, 1.4e-45, -3e-39, 1.0, 5.96e-08, 3.0e-05,
                       6.1e-05, 65504.0, 1e-30, -2.98e-08], dtype=np.float32)
    n = max(len(half_bits), len(floats))
    half_in = np.resize(half_bits, n)
    float_in = np.resize(floats, n)
    xp = rt.xp
    half_wide = xp.zeros(n, dtype=np.float32)
    half_narrow = xp.zeros(n, dtype=np.uint16)
    float_out = xp.zeros(4 * n, dtype=np.float32)
    probe = rt.function("rnnkernels::ftz_probe")
    probe((1,), (32,), (xp.asarray(half_in), half_wide, xp.asarray(float_in), half_narrow, float_out, np.int32(n)))
    got_wide, got_narrow, got_out = (rt.asnumpy(a) for a in (half_wide, half_narrow, float_out))
    want_wide = half_in.view(np.float16).astype(np.float32)
    want_narrow = float_in.astype(np.float16).view(np.uint16)
    def arithmetic_of(x):
        with np.errstate(all="ignore"):
            return np.stack([x * np.float32(2), x + x, x * np.float32(1) + np.float32(0), x * np.float32(0.5)],
                            axis=1).reshape(-1)

    want_out = arithmetic_of(float_in)
    flushed_out = _flush(arithmetic_of(_flush(float_in)))
    mismatches = []
    for what, got, want, inputs in (("float16->float32", got_wide.view(np.uint32), want_wide.view(np.uint32), half_in),
                                    ("float32->float16", got_narrow, want_narrow, float_in)):
        for i in np.flatnonzero(got != want):
            mismatches.append(f"{what} of {inputs[i]!r}: got bits {int(got[i]):#x}, IEEE {int(want[i]):#x}")
    arithmetic = []
    ops = ("x*2", "x+x", "fmaf(x,1,0)", "x*0.5")
    for i in np.flatnonzero(got_out.view(np.uint32) != want_out.view(np.uint32)):
        arithmetic.append(f"{ops[i % 4]} of {float_in[i // 4]!r}: got {got_out[i]!r}, IEEE {want_out[i]!r}")
    bits = got_out.view(np.uint32)
    denormals = ("ieee" if np.array_equal(bits, want_out.view(np.uint32))
                 else "ftz" if np.array_equal(bits, flushed_out.view(np.uint32)) else "other")
    return {
        "conversions_exact": not mismatches,
        "denormals": denormals,
        "denormals_preserved": not arithmetic,
        "conversion_mismatches": mismatches,
        "denormal_arithmetic_mismatches": arithmetic,
        "inputs": {"half_bits": [int(v) for v in half_in], "floats": [float(v) for v in float_in]},
    }


MEASUREMENTS = (l2_latency, grid_sync, launch_gap, bandwidth)


def run_all(rt, log=print) -> dict:
    """Every measurement; one that fails is recorded with its error, the others run."""
    results = {}
    for measure in MEASUREMENTS:
        try:
            part = measure(rt)
        except Exception as error:  # noqa: BLE001 - record it, keep measuring
            part = {f"{measure.__name__}_error": f"{type(error).__name__}: {error}"}
        log(f"{measure.__name__}: {json.dumps(part)}")
        results.update(part)
    return results


def device_parameters(results: dict) -> dict:
    """The measured values that are ``cost_model.Device`` fields (for with_measurements)."""
    keys = ("l2_latency_ns", "grid_sync_ns", "python_launch_us", "graph_node_us", "l2_gbs", "hbm_gbs")
    return {key: float(results[key]) for key in keys if key in results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulated", action="store_true", help="run on the CPU emulator (tiny sizes)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rt = kernels(args.emulated)
    results = run_all(rt)
    results["ftz"] = probe_ftz(rt)
    print(f"ftz: conversions exact {results['ftz']['conversions_exact']}, float32 denormal arithmetic: "
          f"{results['ftz']['denormals']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failed = [key for key in results if key.endswith("_error")] + ([] if results["ftz"]["conversions_exact"] else ["ftz"])
    for key in failed:
        print("FAIL:", key, results.get(key, ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
