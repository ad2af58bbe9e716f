"""Experiment 02: a persistent, weight-stationary LSTM forward (one cooperative launch).

    python benchmarks/kernels/02_persistent_forward.py --json benchmarks/results/02_persistent_forward.json
    python benchmarks/kernels/02_persistent_forward.py --emulated      # CPU, no GPU needed
    python benchmarks/kernels/02_persistent_forward.py --ptxas          # NVRTC only, no GPU

The kernel (02_persistent_forward.cu, read its header) keeps each block's slice of
W_hh in shared memory for all T steps and meets the other blocks at a grid barrier
once per step, instead of one launch per step that re-reads W_hh from L2
(csrc/lstm_forward.cu). Inference only (training=False), float32, FP32 math.

GPU mode (default): for (B, H) in {(1,256), (8,512), (16,1024), (64,512)} and T in
{128, 1024}, with I = H: validate the persistent forward against the float64
reference (y, h_n, c_n; relative error < max(5e-5, 2x the per-step kernel's error)),
then time, with CUDA events after warm-up, the median of repeats with L2 flushed
(a 256 MiB write) before each: the persistent forward (input GEMM + the one
cooperative launch), the per-step kernels (rnnkernels.lstm_forward(..., backend="cuda",
training=False)) and cuDNN (torch.nn.LSTM, exact FP32: TF32 off). Prints a table with
ratios to cuDNN; exits 1 if any validation failed (the other shapes still run).
Shapes whose grid cannot be co-resident are refused with a message, not launched.

--emulated: runs every tile of the table on the CPU emulator (cooperative launch)
on small shapes, several scheduling seeds, against the reference (rel err < 5e-5)
and checks that all seeds give bit-identical results.

Written without a GPU: the emulated mode and the NVRTC compile have run, GPU mode has not.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rnnkernels import _launch, _sources  # noqa: E402
from rnnkernels.reference import forward as reference_forward  # noqa: E402

SOURCE = Path(__file__).resolve().with_suffix(".cu")
GATES = 4
TOLERANCE = 5e-5
GPU_SHAPES = [(1, 256), (8, 512), (16, 1024), (64, 512)]  # (B, H)
GPU_STEPS = [128, 1024]
# (T, B, I, H): T = 1 and 5, B = 1 and 3, H not a multiple of 4 or 32, I != H.
EMULATED_SHAPES = [(1, 1, 5, 7), (5, 3, 6, 7), (5, 1, 40, 33), (1, 3, 16, 33), (5, 3, 48, 64), (5, 1, 20, 64)]
EMULATED_SEEDS = (0, 1, 2)
# The emulator's "SM count": sets unit_tile = ceil(H / 4), so every shape has several
# blocks, and H = 7 and 33 have a partly empty last block.
EMULATED_SMS = 4


# --------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class PersistentTile:
    """``lstm_forward_persistent<Warps, RowsPerWarp, RowGroups>``: 32·warps threads; a
    warp item is one unit x rows_per_warp batch rows; h_{t-1} is staged
    chunk_rows = rows_per_warp·row_groups rows at a time."""

    name: str
    warps: int
    rows_per_warp: int
    row_groups: int

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def chunk_rows(self) -> int:
        return self.rows_per_warp * self.row_groups

    def kernel_name(self) -> str:
        return f"rnnkernels::lstm_forward_persistent<{self.warps}, {self.rows_per_warp}, {self.row_groups}>"


# By batch: a warp's item covers up to 8 rows (4 gates x 8 rows = 32 accumulators per
# lane); more rows per step go to more row groups, so that at B >= 16 the warps of a
# block have several items even when a block owns few units (H / SMs is small).
# 8 warps: enough loads in flight per SM, and unit_tile = ceil(H / SMs) is often < 8.
TILES = (
    PersistentTile("batch1", warps=8, rows_per_warp=1, row_groups=1),
    PersistentTile("batch4", warps=8, rows_per_warp=4, row_groups=1),
    PersistentTile("batch8", warps=8, rows_per_warp=8, row_groups=1),
    PersistentTile("batch16", warps=8, rows_per_warp=8, row_groups=2),
    PersistentTile("batch32", warps=8, rows_per_warp=8, row_groups=4),
)


def choose_tile(batch: int, hidden: int, sm_count: int, max_shared: int) -> PersistentTile:
    """The smallest tile whose chunk holds the whole batch (else the largest), stepping
    down while its shared memory does not fit."""
    fitting = [t for t in TILES if t.chunk_rows >= batch] or [TILES[-1]]
    tile = fitting[0]
    index = TILES.index(tile)
    while index > 0 and shared_bytes(tile, unit_tile_for(hidden, sm_count), hidden) > max_shared:
        index -= 1
        tile = TILES[index]
    return tile


def unit_tile_for(hidden: int, sm_count: int) -> int:
    """One block per SM: the W_hh slice is most of an SM's shared memory."""
    return -(-hidden // sm_count)


def shared_bytes(tile: PersistentTile, unit_tile: int, hidden: int) -> int:
    padded = 4 * (-(-hidden // 4))
    return 4 * (GATES * unit_tile + tile.chunk_rows) * padded


def largest_hidden(sm_count: int, max_shared: int, tile: PersistentTile = TILES[2]) -> int:
    """Largest H whose W_hh fits the grid's shared memory (one block per SM)."""
    best = 0
    for hidden in range(1, 8192):
        if shared_bytes(tile, unit_tile_for(hidden, sm_count), hidden) <= max_shared:
            best = hidden
    return best


def grid_for(hidden: int, unit_tile: int) -> tuple[int, int, int]:
    return (-(-hidden // unit_tile), 1, 1)


# --------------------------------------------------------------------------- problems
def make_problem(steps, batch, input_size, hidden, seed=0):
    """float32 inputs with torch.nn.LSTM's weight scale U(±1/√H); bias = b_ih + b_hh."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(hidden)

    def uniform(*shape):
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return {
        "x": rng.standard_normal((steps, batch, input_size)).astype(np.float32),
        "w_ih": uniform(GATES * hidden, input_size),
        "w_hh": uniform(GATES * hidden, hidden),
        "b_ih": uniform(GATES * hidden),
        "b_hh": uniform(GATES * hidden),
        "h0": (rng.standard_normal((batch, hidden)) * 0.5).astype(np.float32),
        "c0": (rng.standard_normal((batch, hidden)) * 0.5).astype(np.float32),
    }


def reference(problem):
    """(y, h_n, c_n) in float64."""
    p = {k: v.astype(np.float64) for k, v in problem.items()}
    y, h_n, c_n, _ = reference_forward(p["x"], p["w_ih"], p["w_hh"], p["b_ih"] + p["b_hh"], p["h0"], p["c0"], training=False)
    return y, h_n, c_n


def relative_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    norm = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / norm) if norm else float(np.linalg.norm(actual))


def max_relative_error(results, expected) -> float:
    # np.max, not max(): Python's max skips a NaN that is not first, and NaN is wrong.
    return float(np.max([relative_error(a, e) for a, e in zip(results, expected)]))


# --------------------------------------------------------------------------- the launch
def persistent_forward(xp, launch, problem, tile: PersistentTile, unit_tile: int):
    """(y, h_n, c_n) arrays of ``xp`` (NumPy or CuPy). ``launch(tile, grid, block, args,
    shared_mem)`` runs the persistent kernel cooperatively. The input projection
    gx = x·W_ihᵀ + b is one float32 matmul of ``xp`` (cuBLAS on a GPU, in FP32: CuPy
    uses TF32 only with CUPY_TF32=1, refused in GPU mode), as cuDNN does it; it is not
    the kernel under test, and csrc/'s GEMM launcher is being changed."""
    x, w_ih, w_hh = problem["x"], problem["w_ih"], problem["w_hh"]
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    gx = x.reshape(steps * batch, input_size) @ w_ih.T
    gx += problem["b_ih"] + problem["b_hh"]
    # NaN, not empty(): a stale read of a slot the kernel has not written yet must not
    # find an earlier run's answer left in reused memory (the stale-model tests rely on it).
    h_all = xp.full((steps + 1, batch, hidden), np.nan, dtype=np.float32)
    h_all[0] = problem["h0"]
    c_state = problem["c0"].copy()
    barrier = xp.zeros((1,), dtype=np.uint32)
    i32 = np.int32
    args = (xp.ascontiguousarray(gx, dtype=np.float32), w_hh, h_all, c_state, barrier,
            i32(steps), i32(batch), i32(hidden), i32(unit_tile))
    launch(tile, grid_for(hidden, unit_tile), (tile.threads, 1, 1), args, shared_bytes(tile, unit_tile, hidden))
    return h_all[1:], h_all[steps], c_state


def _source_text() -> str:
    return f'#line 1 "benchmarks/kernels/{SOURCE.name}"\n' + SOURCE.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- emulated
def emulated_launcher(seed: int):
    from rnnkernels import emulator

    module = emulator.load_module(
        [str(SOURCE)],
        [tile.kernel_name() for tile in TILES],
        include_dirs=(str(_sources.csrc_dir()),),
    )

    def launch(tile, grid, block, args, shared_mem):
        module.get_function(tile.kernel_name())(grid, block, args, shared_mem=shared_mem, cooperative=True, seed=seed)

    return launch


def validate_emulated(shapes=EMULATED_SHAPES, seeds=EMULATED_SEEDS, tiles=TILES, log=print) -> list[str]:
    """Runs every (shape, tile) on the emulator for every seed; returns the failures
    (empty when the errors are < TOLERANCE and all seeds agree bitwise)."""
    failures = []
    for shape in shapes:
        problem = make_problem(*shape, seed=sum(shape))
        expected = reference(problem)
        unit_tile = unit_tile_for(shape[3], EMULATED_SMS)
        for tile in tiles:
            first = None
            for seed in seeds:
                outputs = persistent_forward(np, emulated_launcher(seed), problem, tile, unit_tile)
                results = [np.array(a) for a in outputs]
                error = max_relative_error(results, expected)
                label = f"T={shape[0]} B={shape[1]} I={shape[2]} H={shape[3]} {tile.name} seed={seed}"
                log(f"{label}: unit_tile={unit_tile} blocks={grid_for(shape[3], unit_tile)[0]} rel err {error:.2e}")
                if not error < TOLERANCE:
                    failures.append(f"{label}: rel err {error:.2e} >= {TOLERANCE}")
                if first is None:
                    first = results
                elif not all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(first, results)):
                    failures.append(f"{label}: differs bitwise from seed {seeds[0]}")
    return failures


# --------------------------------------------------------------------------- NVRTC
def compile_report(arch: str) -> list[dict]:
    """Compiles every tile's instance with NVRTC for ``arch`` (-Xptxas=-v); one dict
    per tile: name, registers, shared_bytes, stack_bytes, spill_stores, spill_loads.
    Needs the NVRTC library only."""
    from rnnkernels import nvrtc_check

    nvrtc = nvrtc_check.load_nvrtc()
    program = nvrtc.createProgram(_source_text(), SOURCE.name, [], [])
    try:
        for tile in TILES:
            nvrtc.addNameExpression(program, tile.kernel_name())
        options = list(nvrtc_check.check_options(arch))  # CuPy's exact options, NVIDIA's headers
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            raise RuntimeError(f"NVRTC failed for {arch}:\n{nvrtc.getProgramLog(program)}") from error
        usage = nvrtc_check.parse_ptxas_log(nvrtc.getProgramLog(program))
        return [{"name": tile.kernel_name(), "arch": arch, "threads": tile.threads,
                 **usage[nvrtc.getLoweredName(program, tile.kernel_name())]} for tile in TILES]
    finally:
        nvrtc.destroyProgram(program)


# --------------------------------------------------------------------------- GPU
class CoResidencyError(ValueError):
    pass


class GpuPersistent:
    """Compiles the instances once (cupy.RawModule, cooperative launch) and checks
    shared memory and co-residency before every launch."""

    def __init__(self, cupy):
        import os

        if os.environ.get("CUPY_TF32", "0") != "0":
            raise RuntimeError("CUPY_TF32 is set: the input projection would not be exact FP32; unset it")
        self.cupy = cupy
        device = cupy.cuda.Device()
        self.sm_count = device.attributes["MultiProcessorCount"]
        self.max_shared = device.attributes["MaxSharedMemoryPerBlockOptin"]
        if not device.attributes.get("CooperativeLaunch", 1):
            raise RuntimeError("this device does not support cooperative launches")
        self.module = cupy.RawModule(
            code=_source_text(),
            options=_launch.compile_options(),  # csrc/, NVIDIA's header folders, the digest
            name_expressions=[tile.kernel_name() for tile in TILES],
            enable_cooperative_groups=True,
        )
        self.module.compile()
        self.kernels = {}
        for tile in TILES:
            kernel = self.module.get_function(tile.kernel_name())
            if not kernel.enable_cooperative_groups:
                raise RuntimeError(f"{tile.kernel_name()} would not be launched cooperatively (CuPy changed?)")
            # Allow the device's maximum once; each launch passes its own shared_mem.
            kernel.max_dynamic_shared_size_bytes = self.max_shared
            self.kernels[tile.name] = kernel
        self.plans = {}

    def plan(self, batch: int, hidden: int):
        """(tile, unit_tile, blocks, shared bytes), or CoResidencyError saying why not;
        memoized, so the occupancy query stays out of the timed forward."""
        if (batch, hidden) not in self.plans:
            self.plans[batch, hidden] = self._plan(batch, hidden)
        return self.plans[batch, hidden]

    def _plan(self, batch: int, hidden: int):
        tile = choose_tile(batch, hidden, self.sm_count, self.max_shared)
        unit_tile = unit_tile_for(hidden, self.sm_count)
        blocks = grid_for(hidden, unit_tile)[0]
        shared = shared_bytes(tile, unit_tile, hidden)
        if shared > self.max_shared:
            raise CoResidencyError(
                f"H={hidden}: a block's W_hh slice + h chunk needs {shared} B of shared memory, the device allows "
                f"{self.max_shared} B per block (largest H here: {largest_hidden(self.sm_count, self.max_shared)})")
        kernel = self.kernels[tile.name]
        from cupy.cuda import driver

        per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, tile.threads, shared)
        if blocks > per_sm * self.sm_count:
            raise CoResidencyError(
                f"B={batch} H={hidden}: {blocks} blocks of {tile.threads} threads and {shared} B shared memory "
                f"cannot all be resident ({per_sm} per SM x {self.sm_count} SMs); the grid barrier would deadlock")
        return tile, unit_tile, blocks, shared

    def launch(self, tile, grid, block, args, shared_mem):
        self.kernels[tile.name](grid, block, args, shared_mem=shared_mem)

    def forward(self, problem, batch, hidden):
        tile, unit_tile, _, _ = self.plan(batch, hidden)
        return persistent_forward(self.cupy, self.launch, problem, tile, unit_tile)


def _cudnn_lstm(torch, problem):
    # Exact FP32 in cuDNN: the new per-backend setting where it exists (PyTorch objects
    # to mixing it with the legacy flags), else the legacy TF32 switches.
    rnn_settings = getattr(torch.backends.cudnn, "rnn", None)
    if rnn_settings is not None and hasattr(rnn_settings, "fp32_precision"):
        rnn_settings.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    hidden = problem["w_hh"].shape[1]
    lstm = torch.nn.LSTM(problem["x"].shape[2], hidden).cuda().float()
    with torch.no_grad():
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            getattr(lstm, f"{name.replace('w_', 'weight_').replace('b_', 'bias_')}_l0").copy_(torch.from_numpy(problem[name]))
    tensors = {k: torch.from_numpy(problem[k]).cuda() for k in ("x", "h0", "c0")}

    def run():
        with torch.no_grad():
            y, (h_n, c_n) = lstm(tensors["x"], (tensors["h0"][None], tensors["c0"][None]))
        return y, h_n[0], c_n[0]

    return run


def _median_ms(run, make_events, flush, repeats, warmup):
    """Median of ``repeats`` timings of ``run()`` in ms, after ``warmup`` calls;
    ``make_events()`` gives (start, stop, elapsed(start, stop)) of one library's CUDA
    events; ``flush()`` empties L2 before each repeat, outside the timed range."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        flush()
        start, stop, elapsed = make_events()
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(elapsed(start, stop))
    return float(np.median(times))


def run_gpu(args) -> int:
    import cupy

    import rnnkernels

    try:
        import torch
    except ImportError:
        torch = None
        print("torch not installed: no cuDNN column", file=sys.stderr)
    if torch is not None and not torch.cuda.is_available():
        torch = None
        print("torch has no CUDA: no cuDNN column", file=sys.stderr)

    gpu = GpuPersistent(cupy)
    print(f"device {cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)['name'].decode()}: "
          f"{gpu.sm_count} SMs, {gpu.max_shared} B shared/block; largest H for the persistent kernel: "
          f"{largest_hidden(gpu.sm_count, gpu.max_shared)}", flush=True)
    flush_buffer = cupy.empty(256 * 2**20, dtype=cupy.uint8)

    def cupy_events():
        return cupy.cuda.Event(), cupy.cuda.Event(), cupy.cuda.get_elapsed_time

    def torch_events():
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        return start, stop, lambda first, second: first.elapsed_time(second)

    def cupy_flush():
        flush_buffer.fill(0)
        if torch is not None:
            torch.cuda.synchronize()
        cupy.cuda.Device().synchronize()

    rows, failures = [], []
    header = (f"{'T':>5} {'B':>3} {'H':>5}  {'tile':8} {'blocks':>6} {'smem KB':>7}  {'err persist':>11} {'err step':>9}"
              f" {'err cuDNN':>9}  {'persist ms':>10} {'step ms':>9} {'cuDNN ms':>9}  {'persist/cuDNN':>13} {'step/cuDNN':>10}")
    print(header)
    print("-" * len(header), flush=True)
    for steps in args.steps:
        for batch, hidden in args.shapes:
            problem = make_problem(steps, batch, hidden, hidden, seed=steps + batch + hidden)
            row = {"T": steps, "B": batch, "I": hidden, "H": hidden}
            try:
                tile, unit_tile, blocks, shared = gpu.plan(batch, hidden)
            except CoResidencyError as error:
                print(f"{steps:5d} {batch:3d} {hidden:5d}  REFUSED: {error}", flush=True)
                rows.append({**row, "refused": str(error)})
                continue
            row.update(tile=tile.name, unit_tile=unit_tile, blocks=blocks, shared_bytes=shared)
            expected = reference(problem)
            device = {k: cupy.asarray(v) for k, v in problem.items()}

            def persistent():
                return gpu.forward(device, batch, hidden)

            def per_step():
                out = rnnkernels.lstm_forward(device["x"], device["w_ih"], device["w_hh"], device["b_ih"], device["b_hh"],
                                              device["h0"], device["c0"], backend="cuda", training=False)
                return out[0], out[1], out[2]

            errors = {
                "persistent": max_relative_error([cupy.asnumpy(a) for a in persistent()], expected),
                "per_step": max_relative_error([cupy.asnumpy(a) for a in per_step()], expected),
            }
            cudnn = _cudnn_lstm(torch, problem) if torch is not None else None
            if cudnn is not None:
                errors["cudnn"] = max_relative_error([a.cpu().numpy() for a in cudnn()], expected)
            tolerance = max(TOLERANCE, 2 * errors["per_step"])
            row.update({f"err_{k}": v for k, v in errors.items()}, tolerance=tolerance)
            ok = errors["persistent"] < tolerance
            if not ok:
                failures.append(f"T={steps} B={batch} H={hidden}: persistent rel err {errors['persistent']:.2e} "
                                f">= {tolerance:.2e}")
            timing = dict(repeats=args.repeats, warmup=args.warmup)
            ms = {
                "persistent": _median_ms(persistent, cupy_events, cupy_flush, **timing) if ok else float("nan"),
                "per_step": _median_ms(per_step, cupy_events, cupy_flush, **timing),
                "cudnn": _median_ms(cudnn, torch_events, cupy_flush, **timing) if cudnn else float("nan"),
            }
            row.update({f"ms_{k}": v for k, v in ms.items()})
            rows.append(row)
            print(f"{steps:5d} {batch:3d} {hidden:5d}  {tile.name:8} {blocks:6d} {shared / 1024:7.1f}  "
                  f"{errors['persistent']:11.2e} {errors['per_step']:9.2e} {errors.get('cudnn', float('nan')):9.2e}  "
                  f"{ms['persistent']:10.3f} {ms['per_step']:9.3f} {ms['cudnn']:9.3f}  "
                  f"{ms['persistent'] / ms['cudnn']:13.2f} {ms['per_step'] / ms['cudnn']:10.2f}"
                  f"{'' if ok else '  VALIDATION FAILED'}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "experiment": "02_persistent_forward",
            "device": cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode(),
            "sm_count": gpu.sm_count, "max_shared_per_block": gpu.max_shared,
            "cupy": cupy.__version__, "torch": None if torch is None else torch.__version__,
            "cudnn": None if torch is None else torch.backends.cudnn.version(),
            "python": platform.python_version(), "repeats": args.repeats, "warmup": args.warmup,
            "rows": rows, "failures": failures,
        }, indent=1))
    for failure in failures:
        print("FAIL:", failure, file=sys.stderr)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulated", action="store_true", help="validate on the CPU emulator (no GPU)")
    parser.add_argument("--ptxas", action="store_true", help="NVRTC compile for sm_80 and sm_90, print ptxas usage")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=GPU_STEPS)
    parser.add_argument("--shapes", type=lambda s: tuple(map(int, s.split(","))), nargs="+", default=GPU_SHAPES,
                        help="B,H pairs, e.g. 1,256 8,512")
    args = parser.parse_args(argv)
    if args.ptxas:
        bad = 0
        for arch in ("sm_80", "sm_90"):
            for r in compile_report(arch):
                print(f"{arch} {r['name']}: {r['registers']} regs, {r['shared_bytes']} B static smem, "
                      f"{r['stack_bytes']} B stack, spills {r['spill_stores']}/{r['spill_loads']} B")
                bad += bool(r["spill_stores"] or r["spill_loads"] or r["stack_bytes"])
        return 1 if bad else 0
    if args.emulated:
        start = time.perf_counter()
        failures = validate_emulated()
        print(f"{len(EMULATED_SHAPES)} shapes x {len(TILES)} tiles x {len(EMULATED_SEEDS)} seeds in "
              f"{time.perf_counter() - start:.1f} s: {'OK' if not failures else 'FAILED'}")
        for failure in failures:
            print("FAIL:", failure, file=sys.stderr)
        return 1 if failures else 0
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
