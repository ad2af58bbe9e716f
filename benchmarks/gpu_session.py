"""The first GPU session in one command: at most 7 minutes, stages by priority.

    python3 benchmarks/gpu_session.py --out "$OUT"          # on the GPU machine
    GIT_COMMIT=<sha> python3 benchmarks/gpu_session.py --out "$OUT"
    python benchmarks/gpu_session.py --emulated --out /tmp/s  # CI's dry run (CPU emulator)

No installation is needed: the script puts this checkout first on sys.path (and on
PYTHONPATH for its children), so a copy of the repository without .git, under the
machine's own python3 with NumPy, CuPy and torch, is enough. Pass the commit in
GIT_COMMIT (the copy has no .git).

Each stage runs in its own subprocess under its own time limit; a stage that fails,
skips (a tool missing) or times out is recorded with the reason and the next one runs.
Results are appended to ``session.jsonl`` as they are measured, so a stage killed at
its limit keeps what it had; at the end ``session.json`` and ``session.md`` (the
tables) are written from it, and ``session.log`` holds every stage's output. Four
files in all (the device tool returns at most 8).

Stages, in priority order, with their limits (seconds; the worst case is each stage
running to its limit, 415 s in all, under the 420 s budget; --budget caps the total):

  env          25  python, library versions, nvidia-smi, the device's attributes, the
                   cost model's device, the commit and the csrc/ digest
  compile      60  every instance of _launch.KERNELS through the runtime's loader
                   (NVRTC via CuPy), timed; then again in a fresh process, to record
                   whether CuPy's disk cache hits for name-expression modules; ptxas
                   report (registers, spills) for sm_90; the microbenchmark modules
  ftz          15  the FTZ probe (03_microbenchmarks.cu: float16 conversions through
                   our helpers, float32 denormal arithmetic, under CuPy's options)
  correctness  60  every variant of _launch.VARIANTS, forward (training and inference)
                   and backward, float32 and float16, small shapes, vs the float64
                   reference; the same for the GRU and the Elman RNN (tanh, relu) on
                   the first shape. Every module is built first, side by side
                   (build_modules): where CuPy's disk cache misses, a serial build
                   would cost 42 s of NVRTC (sm_90, measured on the 2-core CI
                   machine); side by side 23 s there (measured), ~10 s with a core
                   per source (predicted). The emulated stage: 18 s from a cold
                   cache, under 1 s warm (CI machine, loaded). The checks on a GPU:
                   unmeasured (each record carries its seconds for the first
                   session to say)
  sanitizer    80  compute-sanitizer memcheck, then racecheck (40 s each), on every
                   variant forward + backward at the smallest shape, both dtypes
  timing      140  us per step = (t(T=256) - t(T=64)) / 192, CUDA events, warm-up,
                   median of repeats, 3 rotating input sets, every variant x anchor
                   (cost_model.ANCHORS) x mode (forward = inference; training =
                   forward + backward), validated first; cuDNN through torch.nn.LSTM
                   fp32 (TF32 off) and fp16 at the same configs, interleaved in the
                   same process
  microbench   35  03_microbenchmarks: L2 latency, grid-wide sync (flags and
                   grid.sync), launch gap (Python and graph node), L2/HBM bandwidth
  banks        30  on what the stages above left of the budget (not counted in the
                   415 s): Nsight Compute's shared-memory counters (bank conflicts,
                   wavefronts, instructions; loads and stores) of the persistent LSTM
                   kernels at the anchors' (B, H), T = 4, beside the counts
                   rnnkernels/_shared_banks.py PREDICTS from persistent.cuh's layout

``--emulated`` (alias ``--dry-run``) runs the same logic on the CPU emulator
(``_launch.EmulatorRuntime``, NumPy) with tiny shapes and T = 4 vs 2; cuDNN, the
sanitizer and CUDA graphs are skipped with their reasons. Its timings are the
emulator's and mean nothing about a GPU. tests/test_gpu_session.py runs it in CI.

Exit status: 0 when every stage passed or skipped, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rnnkernels import _launch, _sources, cost_model, gru_reference, rnn_reference  # noqa: E402
from rnnkernels import reference as reference_lstm  # noqa: E402

BUDGET_S = 420
SKIPPED_EXIT = 3  # a stage's exit status for "skipped, reason recorded"
JSONL, JSON_FILE, MARKDOWN, LOG = "session.jsonl", "session.json", "session.md", "session.log"


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: int
    what: str
    # Runs only on what the stages before it left of the budget (they usually finish
    # well inside their limits): not counted in the worst case below, and last.
    leftover: bool = False


STAGES = (
    Stage("env", 25, "environment and device"),
    Stage("compile", 60, "NVRTC compile of every KERNELS instance, disk-cache check, ptxas report"),
    Stage("ftz", 15, "FTZ probe"),
    Stage("correctness", 60, "every variant vs the float64 reference, small shapes"),
    Stage("sanitizer", 80, "compute-sanitizer memcheck + racecheck, smallest shape"),
    Stage("timing", 140, "us per step, every variant x anchor x mode, and cuDNN"),
    Stage("microbench", 35, "L2 latency, grid sync, launch gap, bandwidth"),
    Stage("banks", 30, "ncu shared-memory bank conflicts of the persistent kernels vs the counted layout",
          leftover=True),
)
assert sum(stage.limit_s for stage in STAGES if not stage.leftover) <= BUDGET_S - 5, \
    "the stages' limits must fit the budget"
assert [s.leftover for s in STAGES] == sorted(s.leftover for s in STAGES), "leftover stages come last"

# Tolerances against the float64 reference (max over outputs of ‖got − ref‖ / ‖ref‖):
# float32 math leaves ~1e-6; float16 outputs carry their own rounding (2^-11 relative
# per element) on top.
TOLERANCE = {"float32": 5e-5, "float16": 3e-3}
T_LONG, T_SHORT = 256, 64
EMULATED_T_LONG, EMULATED_T_SHORT = 4, 2
ROTATING_SETS = 3


# --------------------------------------------------------------------------- records
class Recorder:
    """Appends one JSON object per line to session.jsonl, flushed at once, so that
    what a stage measured survives its being killed."""

    def __init__(self, out: Path, stage: str):
        self.path = out / JSONL
        self.stage = stage

    def __call__(self, kind: str, **data) -> None:
        record = {"stage": self.stage, "kind": kind, "time": _now(), **data}
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(_jsonable(record)) + "\n")
        print(f"[{self.stage}] {kind}: {json.dumps(_jsonable(data))[:400]}", flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value):
    """JSON without NaN/Infinity (None instead) and with NumPy scalars as numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


class Skip(Exception):
    """Raised by a stage that cannot run here; the message is the reason."""


# --------------------------------------------------------------------------- runtimes
class Runtime:
    """What the stages need from a GPU (CuPy) or the emulator (NumPy): the launch
    runtime, array conversion, a timer (CUDA events or the wall clock)."""

    def __init__(self, emulated: bool):
        self.emulated = emulated
        if emulated:
            from rnnkernels import emulated as emulated_backend

            try:
                emulated_backend.check_available()
            except RuntimeError as error:
                raise Skip(f"the CPU emulator cannot run here: {error}") from error
            self.launch = _launch.EmulatorRuntime()
            self.xp = np
        else:
            try:
                import cupy

                if cupy.cuda.runtime.getDeviceCount() < 1:
                    raise RuntimeError("CuPy sees no GPU")
            except Exception as error:  # noqa: BLE001 - ImportError or any CUDA failure
                raise Skip(f"no usable GPU through CuPy: {type(error).__name__}: {error}") from error
            self.cupy = cupy
            self.launch = _launch.CupyRuntime()
            self.xp = cupy

    def asarray(self, array):
        return array if self.emulated else self.cupy.asarray(array)

    def asnumpy(self, array):
        return np.asarray(array) if self.emulated else self.cupy.asnumpy(array)

    def synchronize(self):
        if not self.emulated:
            self.cupy.cuda.Device().synchronize()

    def time_ms(self, run) -> float:
        """One timed call: CUDA events on the current stream, else the wall clock."""
        if self.emulated:
            start = time.perf_counter()
            run()
            return (time.perf_counter() - start) * 1e3
        start, stop = self.cupy.cuda.Event(), self.cupy.cuda.Event()
        start.record()
        run()
        stop.record()
        stop.synchronize()
        return self.cupy.cuda.get_elapsed_time(start, stop)


def _load_experiment(file_name: str):
    """benchmarks/kernels/<file_name> as a module (its name starts with a digit)."""
    name = "experiment_" + Path(file_name).stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "kernels" / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def microbenchmarks():
    return _load_experiment("03_microbenchmarks.py")


# --------------------------------------------------------------------------- problems
def make_problem(steps, batch, input_size, hidden, dtype, seed):
    """float64 arrays (torch.nn.LSTM's weight scale) rounded to ``dtype`` and back, so
    that the reference sees exactly the values the kernels get; bias = b_ih + b_hh."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(hidden)

    def rounded(array):
        return array.astype(dtype).astype(np.float64)

    return {
        "x": rounded(rng.standard_normal((steps, batch, input_size))),
        "w_ih": rounded(rng.uniform(-bound, bound, (4 * hidden, input_size))),
        "w_hh": rounded(rng.uniform(-bound, bound, (4 * hidden, hidden))),
        "bias": rounded(rng.uniform(-2 * bound, 2 * bound, 4 * hidden)),
        "h0": rounded(rng.standard_normal((batch, hidden)) * 0.5),
        "c0": rounded(rng.standard_normal((batch, hidden)) * 0.5),
        "dy": rounded(rng.standard_normal((steps, batch, hidden))),
        "dh_n": rounded(rng.standard_normal((batch, hidden))),
        "dc_n": rounded(rng.standard_normal((batch, hidden))),
    }


def on_device(rt: Runtime, problem: dict, dtype) -> dict:
    return {key: rt.asarray(np.ascontiguousarray(value.astype(dtype))) for key, value in problem.items()}


def run_ours(rt: Runtime, d: dict, variant: str, mode: str):
    """``mode``: "forward" (inference), "forward_training" or "training" (forward and
    backward); returns the outputs of the last call."""
    args = (d["x"], d["w_ih"], d["w_hh"], d["bias"], d["h0"], d["c0"])
    if mode == "forward":
        return _launch.forward(rt.launch, *args, False, variant=variant)
    out = _launch.forward(rt.launch, *args, True, variant=variant)
    if mode == "forward_training":
        return out
    return out, _launch.backward(rt.launch, out[3], d["dy"], d["dh_n"], d["dc_n"], variant=variant)


def relative_error(got, want) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    norm = np.linalg.norm(want)
    error = np.linalg.norm(got - want)
    if not np.all(np.isfinite(got)):
        return math.inf
    return float(error / norm) if norm else float(error)


def check_variant(rt: Runtime, variant: str, dtype: str, shape, seed: int) -> dict:
    """Max relative error of every output of forward (inference and training) and
    backward against the float64 reference."""
    steps, batch, input_size, hidden = shape
    p = make_problem(steps, batch, input_size, hidden, dtype, seed)
    d = on_device(rt, p, dtype)
    y, h_n, c_n, saved = reference_lstm.forward(p["x"], p["w_ih"], p["w_hh"], p["bias"], p["h0"], p["c0"], True)
    grads = reference_lstm.backward(saved, p["dy"], p["dh_n"], p["dc_n"])
    errors = {}
    inference = run_ours(rt, d, variant, "forward")
    for name, got, want in zip(("y", "h_n", "c_n"), inference[:3], (y, h_n, c_n)):
        errors[f"inference_{name}"] = relative_error(rt.asnumpy(got), want)
    out, ours = run_ours(rt, d, variant, "training")
    for name, got, want in zip(("y", "h_n", "c_n"), out[:3], (y, h_n, c_n)):
        errors[name] = relative_error(rt.asnumpy(got), want)
    for name, got, want in zip(("dx", "dw_ih", "dw_hh", "db", "dh0", "dc0"), ours, grads):
        errors[name] = relative_error(rt.asnumpy(got), want)
    worst = max(errors, key=errors.get)
    return {"variant": variant, "dtype": dtype, "shape": list(shape), "errors": errors, "worst": worst,
            "max_error": errors[worst], "tolerance": TOLERANCE[dtype], "ok": errors[worst] <= TOLERANCE[dtype]}


def check_cell_variant(rt: Runtime, cell: str, variant: str, dtype: str, shape, seed: int) -> dict:
    """:func:`check_variant` for the GRU or an Elman cell (``_launch.CELL_KERNELS``):
    forward (inference and training) and backward with step norms against
    gru_reference / rnn_reference; db in the folded layout of the bias."""
    kernels = _launch.CELL_KERNELS[cell]
    steps, batch, input_size, hidden = shape
    g = kernels.gates
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(hidden)

    def rounded(array):
        return array.astype(dtype).astype(np.float64)

    p = {"x": rounded(rng.standard_normal((steps, batch, input_size))),
         "w_ih": rounded(rng.uniform(-bound, bound, (g * hidden, input_size))),
         "w_hh": rounded(rng.uniform(-bound, bound, (g * hidden, hidden))),
         "h0": rounded(rng.standard_normal((batch, hidden)) * 0.5),
         "dy": rounded(rng.standard_normal((steps, batch, hidden))),
         "dh_n": rounded(rng.standard_normal((batch, hidden)))}
    b_ih, b_hh = rng.uniform(-bound, bound, g * hidden), rng.uniform(-bound, bound, g * hidden)
    args = (p["x"], p["w_ih"], p["w_hh"], b_ih, b_hh, p["h0"])
    if cell == "gru":
        y, h_n, saved = gru_reference.forward(*args)
        dx, dw_ih, dw_hh, db_ih, db_hh, dh0, norms = gru_reference.backward(saved, p["dy"], p["dh_n"], True)
        db = np.concatenate([db_ih[:2 * hidden], db_ih[2 * hidden:], db_hh[2 * hidden:]])
        bias = np.concatenate([b_ih[:2 * hidden] + b_hh[:2 * hidden], b_ih[2 * hidden:], b_hh[2 * hidden:]])
    else:
        y, h_n, saved = rnn_reference.forward(*args, nonlinearity=cell.removeprefix("rnn_"))
        dx, dw_ih, dw_hh, db, _, dh0, norms = rnn_reference.backward(saved, p["dy"], p["dh_n"], True)
        bias = b_ih + b_hh
    d = on_device(rt, p, dtype)
    bias32 = rt.asarray(bias.astype(np.float32))
    errors = {}
    inference = _launch.cell_forward(rt.launch, kernels, d["x"], d["w_ih"], d["w_hh"], bias32, d["h0"], False,
                                     variant=variant)
    for name, got, want in zip(("y", "h_n"), inference[:2], (y, h_n)):
        errors[f"inference_{name}"] = relative_error(rt.asnumpy(got), want)
    out = _launch.cell_forward(rt.launch, kernels, d["x"], d["w_ih"], d["w_hh"], bias32, d["h0"], True,
                               variant=variant)
    ours = _launch.cell_backward(rt.launch, out[2], d["dy"], d["dh_n"], return_step_norms=True, variant=variant)
    for name, got, want in zip(("y", "h_n"), out[:2], (y, h_n)):
        errors[name] = relative_error(rt.asnumpy(got), want)
    for name, got, want in zip(("dx", "dw_ih", "dw_hh", "db", "dh0", "dh_norms"), ours, (dx, dw_ih, dw_hh, db, dh0,
                                                                                          norms)):
        errors[name] = relative_error(rt.asnumpy(got), want)
    worst = max(errors, key=errors.get)
    return {"cell": cell, "variant": variant, "dtype": dtype, "shape": list(shape), "errors": errors, "worst": worst,
            "max_error": errors[worst], "tolerance": TOLERANCE[dtype], "ok": errors[worst] <= TOLERANCE[dtype]}


# --------------------------------------------------------------------------- stages
def stage_env(args, record) -> None:
    # Cheapest and most useful first: a cold torch import on a fresh machine can take
    # many seconds, so it comes last and cannot cost the device's description.
    import rnnkernels

    record("python", version=sys.version, executable=sys.executable, platform=platform.platform())
    record("source", commit=_commit(), sources_digest=_sources.sources_digest(), variants=list(_launch.VARIANTS),
           modelled_variants=list(cost_model.MODELS), rnnkernels_file=rnnkernels.__file__)
    record("tools", compute_sanitizer=_sanitizer_path(), nvidia_smi=shutil.which("nvidia-smi"),
           nvcc=shutil.which("nvcc"), ncu=shutil.which("ncu"))
    if args.emulated:
        record("device", emulated=True, model_device=cost_model.DEFAULT_DEVICE)
    else:
        if shutil.which("nvidia-smi"):
            query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit"
            rc, output = run_group(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], 10)
            record("nvidia_smi", query=query, exit=rc, output=output.strip())
        cupy = Runtime(False).cupy
        attributes = cupy.cuda.Device().attributes
        keep = DEVICE_ATTRIBUTES_READ
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        dev = cost_model.from_cupy_attributes(name, attributes)
        record("device", name=name, attributes={k: attributes.get(k) for k in keep},
               compute_capability=cupy.cuda.Device().compute_capability,
               cupy_runtime=cupy.cuda.runtime.runtimeGetVersion(), cupy_driver=cupy.cuda.runtime.driverGetVersion(),
               model_device=_device_dict(dev))
    versions = {}
    for name in ("numpy", "numba", "cupy", "torch"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as error:  # noqa: BLE001 - record what is missing, go on
            versions[name] = f"NOT IMPORTABLE: {type(error).__name__}: {error}"
    record("versions", **versions)
    if not args.emulated and "torch" in sys.modules:
        torch = sys.modules["torch"]
        record("torch", cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               available=torch.cuda.is_available())


# The device attributes the env stage records: keys of cupy.cuda.Device().attributes,
# CuPy's cudaDevAttr* names without the prefix (tests/test_gpu_glue.py holds them to
# CuPy's list). CuPy has no ComputeCapabilityMajor/Minor there: the env stage records
# Device().compute_capability instead.
DEVICE_ATTRIBUTES_READ = ("MultiProcessorCount", "ClockRate", "MemoryClockRate", "GlobalMemoryBusWidth",
                          "L2CacheSize", "MaxSharedMemoryPerBlockOptin", "MaxSharedMemoryPerMultiprocessor",
                          "CooperativeLaunch")


def _commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown (no .git here; pass GIT_COMMIT)"


def _cuda_tool(name, variable):
    """The CUDA tool ``name``: $``variable``, else on PATH, else in $CUDA_HOME/bin or
    /usr/local/cuda/bin; None if none."""
    found = os.environ.get(variable) or shutil.which(name)
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and root and os.access(os.path.join(root, "bin", name), os.X_OK):
            found = os.path.join(root, "bin", name)
    return found


def _sanitizer_path():
    return _cuda_tool("compute-sanitizer", "COMPUTE_SANITIZER")


def _device_dict(dev: cost_model.Device) -> dict:
    fields = {k: getattr(dev, k) for k in cost_model.Device.__dataclass_fields__ if k not in ("sources",)}
    return {**fields, "assumed": list(dev.assumed)}


def load_source(source: str, emulated: bool):
    """The module the runtime's loader builds for ``source`` (every KERNELS instance)."""
    if emulated:
        return _launch._emulator_module(source, _sources.sources_digest(), False)
    import cupy

    return _launch._cupy_module(source, _launch.compile_options(), cupy.cuda.Device().id)


def compile_seconds(source: str, emulated: bool) -> float:
    start = time.perf_counter()
    load_source(source, emulated)
    return time.perf_counter() - start


def stage_compile(args, record) -> None:
    Runtime(args.emulated)  # a Skip when there is no GPU (or no emulator)
    # The sources build side by side, one thread each: NVRTC (and the emulator's g++)
    # runs outside the GIL, and with the GRU's and Elman's files the table is twice the
    # LSTM's, more than one core compiles within the stage's limit (a prediction from
    # the CPU machine's NVRTC times, not measured on a GPU host). Each "seconds" is that
    # source's own wall time, overlapping the others'.
    sources = list(_launch.KERNELS)
    with ThreadPoolExecutor(len(sources)) as pool:
        firsts = list(pool.map(lambda source: _timed_or_error(compile_seconds, source, args.emulated), sources))

        def again(source):
            # Again in a fresh process: CuPy's (or the emulator's) disk cache should make
            # it fast; CuPy's used to miss modules built with name_expressions.
            command = [sys.executable, str(Path(__file__).resolve()), "--compile-source", source]
            return run_group(command + (["--emulated"] if args.emulated else []), max(5, args.limit_s / 3))

        agains = list(pool.map(again, sources))
    failed = []
    for source, (first, first_error), (rc, output) in zip(sources, firsts, agains):
        again_s = float(output.strip().splitlines()[-1]) if rc == 0 else None
        error = first_error or (None if rc == 0 else f"exit {rc}: {output[-2000:]}")
        record("compile", source=source, instances=len(_launch.KERNELS[source]), seconds=first,
               # A build from scratch takes seconds; loading a cached module, well under one.
               fresh_process_seconds=again_s,
               disk_cache_hit=None if again_s is None or first is None else again_s < max(1.0, 0.5 * first),
               error=error)
        if error:
            failed.append(source)
    microbenchmarks().kernels(args.emulated)  # builds (and caches) the microbenchmark modules
    record("compile", source="benchmarks/kernels/03_microbenchmarks.cu", ok=True)
    if failed:
        raise RuntimeError(f"sources that did not build: {failed}")
    if args.emulated:
        record("ptxas", skipped="the NVRTC/ptxas report is tests/test_nvrtc.py's job in CI")
        return
    from rnnkernels import nvrtc_check

    reports = nvrtc_check.compile_sources(_launch.KERNELS, "sm_90")  # one thread per CPU
    problems = nvrtc_check.problems(reports)
    record("ptxas", arch="sm_90", kernels=[vars(r) for r in reports], problems=problems)
    if problems:
        raise RuntimeError("; ".join(problems))


def _timed_or_error(function, *args):
    """(function(*args), None), or (None, the error as text): one source's failure is
    recorded beside the others' results instead of ending the stage."""
    try:
        return function(*args), None
    except Exception as error:  # noqa: BLE001 - recorded, and the stage fails after the loop
        return None, f"{type(error).__name__}: {error}"


def run_group(command, timeout: float, env=None) -> tuple:
    """(exit status or "timeout", stdout + stderr) of ``command`` run in its own process
    group, all of which is killed at ``timeout`` (a sanitizer's target process too)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        return "timeout", output or ""


def stage_ftz(args, record) -> None:
    micro = microbenchmarks()
    result = micro.probe_ftz(micro.kernels(args.emulated))
    record("ftz", **result)
    if not result["conversions_exact"]:
        raise RuntimeError(f"float16 conversions through common.cuh are not exact: {result['conversion_mismatches']}")


CORRECTNESS_SHAPES = [(5, 3, 6, 33), (3, 1, 40, 7), (2, 16, 64, 64)]  # (T, B, I, H)
EMULATED_CORRECTNESS_SHAPES = [(3, 2, 5, 7)]
SANITIZER_SHAPE = (2, 1, 3, 5)


def build_modules(emulated: bool, record) -> None:
    """Every source's module, side by side, one thread each, before the checks use them.

    Why: the checks load the modules one after another. Where CuPy's disk cache hits
    (the compile stage's ``disk_cache_hit``) a load is well under a second; where it
    misses, the stage would compile every source serially: 42 s for sm_90 on the
    2-core CI machine (quiet, NVRTC 13.5, every source of _launch.KERNELS, all
    cells), most of the stage's limit. In threads (NVRTC and the emulator's g++ run
    outside the GIL) the build takes about the slowest source's time where there are as
    many cores as sources (a prediction: ~10 s at that machine's speed per core,
    rnn_backward.cu), and took 23 s on its 2 cores (measured, quiet). A source
    that fails is recorded and left to its checks, which then report the error."""
    sources = list(_launch.KERNELS)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(sources)) as pool:
        builds = list(pool.map(lambda source: _timed_or_error(compile_seconds, source, emulated), sources))
    for source, (seconds, error) in zip(sources, builds):
        record("correctness_build", source=source, seconds=seconds, error=error)
    record("correctness_build", source="all", seconds=time.perf_counter() - start, error=None)


def stage_correctness(args, record) -> None:
    rt = Runtime(args.emulated)
    build_modules(args.emulated, record)
    shapes = EMULATED_CORRECTNESS_SHAPES if args.emulated else CORRECTNESS_SHAPES
    failures = []
    for variant in _launch.VARIANTS:
        for dtype in _launch.STORAGE_TYPES:
            for index, shape in enumerate(shapes):
                start = time.perf_counter()
                try:
                    result = check_variant(rt, variant, dtype, shape, seed=index)
                except Exception as error:  # noqa: BLE001 - one variant's crash must not hide the others
                    result = {"variant": variant, "dtype": dtype, "shape": list(shape), "ok": False,
                              "error": f"{type(error).__name__}: {error}"}
                record("correctness", **result, seconds=time.perf_counter() - start)
                if not result["ok"]:
                    failures.append(f"{variant} {dtype} {shape}")
    # The other cells: every variant and dtype on the first shape.
    for cell in _launch.CELL_KERNELS:
        for variant in _launch.VARIANTS:
            for dtype in _launch.STORAGE_TYPES:
                start = time.perf_counter()
                try:
                    result = check_cell_variant(rt, cell, variant, dtype, shapes[0], seed=0)
                except Exception as error:  # noqa: BLE001 - one variant's crash must not hide the others
                    result = {"cell": cell, "variant": variant, "dtype": dtype, "shape": list(shapes[0]), "ok": False,
                              "error": f"{type(error).__name__}: {error}"}
                record("correctness", **result, seconds=time.perf_counter() - start)
                if not result["ok"]:
                    failures.append(f"{cell} {variant} {dtype} {shapes[0]}")
    if failures:
        raise RuntimeError(f"variants off the reference: {failures}")


def stage_sanitizer(args, record) -> None:
    if args.emulated:
        raise Skip("compute-sanitizer needs a GPU (the emulator's AddressSanitizer build is the tests' job)")
    sanitizer = _sanitizer_path()
    if not sanitizer:
        raise Skip("compute-sanitizer not found (PATH, $COMPUTE_SANITIZER, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    env = {**os.environ, "RNNKERNELS_UNDER_SANITIZER": "1"}
    failed = []
    for tool in ("memcheck", "racecheck"):
        command = [sanitizer, "--tool", tool, "--error-exitcode", "1", "--target-processes", "all",
                   sys.executable, str(Path(__file__).resolve()), "--sanitizer-target"]
        start = time.perf_counter()
        rc, output = run_group(command, args.limit_s / 2 - 2, env=env)
        print(output[-6000:], flush=True)
        summary = [line for line in output.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
        record("sanitizer", tool=tool, exit=rc, seconds=time.perf_counter() - start, summary=summary,
               tail=output[-1500:])
        if rc != 0:
            failed.append(f"{tool} (exit {rc})")
    if failed:
        raise RuntimeError(f"compute-sanitizer: {failed}")


def sanitizer_target() -> int:
    """What compute-sanitizer runs: every variant, forward (both modes) and backward,
    both dtypes, on the smallest shape; plain cudaMalloc per array (no pool), so that
    memcheck sees an access past an array's end."""
    rt = Runtime(False)
    rt.cupy.cuda.set_allocator(None)
    for variant in _launch.VARIANTS:
        for dtype in _launch.STORAGE_TYPES:
            result = check_variant(rt, variant, dtype, SANITIZER_SHAPE, seed=0)
            print(f"{variant} {dtype}: max rel err {result['max_error']:.2e} ({result['worst']})", flush=True)
    rt.synchronize()
    return 0


# --------------------------------------------------------------------------- timing
def _torch_cudnn(record):
    """torch with cuDNN on the GPU and TF32 off, or None with the reason recorded."""
    try:
        import torch
    except ImportError as error:
        record("cudnn", skipped=f"torch is not importable: {error}")
        return None
    if not torch.cuda.is_available() or not torch.backends.cudnn.is_available():
        record("cudnn", skipped="torch sees no CUDA device or no cuDNN")
        return None
    how, readings = disable_tf32(torch)
    torch.backends.cudnn.enabled = True
    record("cudnn", torch=torch.__version__, cudnn=torch.backends.cudnn.version(), tf32_off_by=how, readings=readings)
    return torch


def disable_tf32(torch) -> tuple[str, dict]:
    """Exact FP32 in cuDNN's LSTM and in torch's matmuls; returns how, and what torch
    reports afterwards (a reading it refuses is recorded as its error)."""
    # Exact FP32. torch >= 2.9 has per-backend precision settings and objects to mixing
    # them with the legacy flags: use them where they exist (as experiment 02 does),
    # else the legacy allow_tf32 switches.
    rnn_settings = getattr(torch.backends.cudnn, "rnn", None)
    if rnn_settings is not None and hasattr(rnn_settings, "fp32_precision"):
        rnn_settings.fp32_precision = "ieee"
        torch.backends.cudnn.fp32_precision = "ieee"
        # conv too: with conv and rnn set differently, torch refuses to answer
        # cudnn.allow_tf32, the reading recorded below.
        if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):
            torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        how = "fp32_precision = 'ieee' (cudnn, cudnn.rnn, cudnn.conv, cuda.matmul)"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        how = "allow_tf32 = False (cuda.matmul, cudnn)"
    readings = {}
    for label, read in (("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                        ("cuda.matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                        ("cudnn.rnn.fp32_precision", lambda: torch.backends.cudnn.rnn.fp32_precision),
                        ("cuda.matmul.fp32_precision", lambda: torch.backends.cuda.matmul.fp32_precision)):
        try:
            readings[label] = read()
        except Exception as error:  # noqa: BLE001 - a reading torch refuses is recorded as such
            readings[label] = f"{type(error).__name__}: {error}"
    return how, readings


class CudnnLstm:
    """torch.nn.LSTM (cuDNN) on the same problem, in ``dtype``."""

    def __init__(self, torch, problem: dict, dtype: str, device: str = "cuda"):
        self.torch = torch
        torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        hidden = problem["w_hh"].shape[1]
        self.lstm = torch.nn.LSTM(problem["x"].shape[2], hidden).to(device=device, dtype=torch_dtype)
        with torch.no_grad():
            for name, key in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"), ("bias_ih_l0", "bias")):
                getattr(self.lstm, name).copy_(torch.from_numpy(problem[key]))
            self.lstm.bias_hh_l0.zero_()
        self.tensors = {k: torch.from_numpy(np.ascontiguousarray(problem[k])).to(device=device, dtype=torch_dtype)
                        for k in ("x", "h0", "c0", "dy", "dh_n", "dc_n")}
        self.tensors["x"].requires_grad_(True)

    def __call__(self, mode: str):
        torch, t = self.torch, self.tensors
        state = (t["h0"][None], t["c0"][None])
        if mode == "forward":
            with torch.no_grad():
                return self.lstm(t["x"], state)
        self.lstm.zero_grad(set_to_none=True)
        t["x"].grad = None
        y, (h_n, c_n) = self.lstm(t["x"], state)
        torch.autograd.backward([y, h_n[0], c_n[0]], [t["dy"], t["dh_n"], t["dc_n"]])
        return y

    def time_ms(self, mode: str) -> float:
        torch = self.torch
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self(mode)
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)


def timing_configs(emulated: bool) -> list[dict]:
    """The anchors (cost_model.ANCHORS) with their modes; tiny stand-ins when emulated."""
    if emulated:
        return [{"label": "emulated B=2 H=8", "problem": cost_model.Problem(2, 8), "modes": ("forward", "training")},
                {"label": "emulated B=2 H=8 fp16", "problem": cost_model.Problem(2, 8, dtype="float16"),
                 "modes": ("forward",)}]
    return [{"label": a.label, "problem": a.problem, "modes": a.directions} for a in cost_model.ANCHORS]


def stage_timing(args, record) -> None:
    rt = Runtime(args.emulated)
    t_long, t_short = (EMULATED_T_LONG, EMULATED_T_SHORT) if args.emulated else (T_LONG, T_SHORT)
    repeats, warmup = (2, 1) if args.emulated else (15, 2)
    torch = None
    if args.emulated:
        record("cudnn", skipped="cuDNN needs a GPU (emulated run)")
    else:
        torch = _torch_cudnn(record)
    record("timing_setup", t_long=t_long, t_short=t_short, repeats=repeats, warmup=warmup,
           rotating_sets=ROTATING_SETS, variants=list(_launch.VARIANTS))
    for config in timing_configs(args.emulated):
        p = config["problem"]
        dtype = p.dtype
        sets = {steps: [make_problem(steps, p.batch, p.inputs, p.hidden, dtype, seed=100 * steps + s)
                        for s in range(ROTATING_SETS)] for steps in (t_short, t_long)}
        device_sets = {steps: [on_device(rt, q, dtype) for q in problems] for steps, problems in sets.items()}
        impls = {}
        # Validate every variant before timing it (forward at T_short vs the reference).
        q = sets[t_short][0]
        want = reference_lstm.forward(q["x"], q["w_ih"], q["w_hh"], q["bias"], q["h0"], q["c0"], False)[0]
        for variant in _launch.VARIANTS:
            try:
                got = rt.asnumpy(run_ours(rt, device_sets[t_short][0], variant, "forward")[0])
                error = relative_error(got, want)
            except Exception as failure:  # noqa: BLE001 - record, time the others
                error, got = math.inf, f"{type(failure).__name__}: {failure}"
            ok = error <= TOLERANCE[dtype]
            record("validation", config=config["label"], impl=variant, rel_error=error, ok=ok,
                   error=None if ok or not isinstance(got, str) else got)
            if ok:
                impls[variant] = _ours_timer(rt, device_sets, variant)
        if torch is not None:
            for cudnn_dtype in (("float32", "float16") if dtype == "float32" else ("float16",)):
                try:
                    models = {steps: [CudnnLstm(torch, q, cudnn_dtype) for q in problems]
                              for steps, problems in sets.items()}
                    y = models[t_short][0]("forward")[0].float().cpu().numpy()
                    error = relative_error(y, want)
                    # cuDNN in fp16 keeps h_t in float16 between steps: a looser bound.
                    ok = error <= (5e-2 if cudnn_dtype == "float16" else TOLERANCE["float32"])
                    record("validation", config=config["label"], impl=f"cudnn {cudnn_dtype}", rel_error=error, ok=ok)
                    if not ok:
                        continue
                    impls[f"cudnn-{'fp32' if cudnn_dtype == 'float32' else 'fp16'}"] = _cudnn_timer(models)
                except Exception as failure:  # noqa: BLE001
                    record("validation", config=config["label"], impl=f"cudnn {cudnn_dtype}", ok=False,
                           error=f"{type(failure).__name__}: {failure}")
        for mode in config["modes"]:
            times = {name: {t_short: [], t_long: []} for name in impls}
            for name, timer in impls.items():  # warm-up: compile, caches, cuDNN plans
                for _ in range(warmup):
                    for steps in (t_short, t_long):
                        timer(mode, steps, 0)
            for repeat in range(repeats):
                for name, timer in impls.items():  # interleaved: drift hits every impl alike
                    for steps in (t_short, t_long):
                        times[name][steps].append(timer(mode, steps, repeat % ROTATING_SETS))
            for name in impls:
                long_ms, short_ms = statistics.median(times[name][t_long]), statistics.median(times[name][t_short])
                record("timing", config=config["label"], mode=mode, impl=name, dtype=dtype,
                       batch=p.batch, hidden=p.hidden, input_size=p.inputs,
                       us_per_step=(long_ms - short_ms) * 1e3 / (t_long - t_short),
                       median_ms={str(t_long): long_ms, str(t_short): short_ms},
                       spread_ms={str(s): [min(v), max(v)] for s, v in times[name].items()})


def _ours_timer(rt, device_sets, variant):
    def timer(mode, steps, index):
        return rt.time_ms(lambda: run_ours(rt, device_sets[steps][index], variant, mode))

    return timer


def _cudnn_timer(models):
    def timer(mode, steps, index):
        return models[steps][index].time_ms(mode)

    return timer


def stage_microbench(args, record) -> None:
    micro = microbenchmarks()
    rt = micro.kernels(args.emulated)
    results = micro.run_all(rt, log=lambda line: print(line, flush=True))
    record("microbench", **results, device_parameters=micro.device_parameters(results))
    errors = [key for key in results if key.endswith("_error")]
    if errors:
        raise RuntimeError(f"microbenchmarks failed: {[results[k] for k in errors]}")


# ------------------------------------------------------------------ bank conflicts
# Nsight Compute's shared-memory counters: wavefronts beyond one per phase (bank
# conflicts), wavefronts, and instructions, of loads and of stores.
BANK_METRICS = (
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
    "smsp__sass_inst_executed_op_shared_ld.sum",
    "smsp__sass_inst_executed_op_shared_st.sum",
)
# The anchors' (B, H) (cost_model.ANCHORS), the LSTM in float32, training (the forward
# and the backward persistent kernel each launch once). The counts grow with T and ncu
# replays each launch once per pass: a short sequence says as much.
BANK_CONFIGS = ((64, 512), (16, 768))
BANK_STEPS = 4


def banks_predictions(sm_count: int, max_shared_bytes: int) -> list[dict]:
    """What the banks stage expects ncu to see, in launch order (per config: the
    forward, then the backward): the plan the launcher makes on this device and the
    partials' traffic rnnkernels/_shared_banks.py PREDICTS for it, under the shipped
    layout and under the plain one it replaced (for scale)."""
    from rnnkernels import _persistent, _shared_banks

    expected = []
    for batch, hidden in BANK_CONFIGS:
        for direction in (_persistent.FORWARD, _persistent.BACKWARD):
            found = _persistent.plan(direction, batch, hidden, sm_count,
                                     max_shared_bytes - _persistent.STATIC_SHARED_BYTES)
            entry = {"config": f"B={batch} H={hidden} T={BANK_STEPS}", "direction": direction, "plan": None}
            if found is not None:
                entry.update(plan={"blocks": found.blocks, "units": found.units, "chunk_rows": found.chunk_rows},
                             predicted=_shared_banks.launch_totals(found, batch, hidden, BANK_STEPS),
                             predicted_plain_layout=_shared_banks.launch_totals(found, batch, hidden, BANK_STEPS,
                                                                                layout="plain"))
            expected.append(entry)
    return expected


def parse_ncu_csv(output: str) -> list[dict]:
    """ncu --csv's rows (one per kernel launch and metric) as one dict per launch, in
    launch order: {"kernel", "grid", "metrics": {name: value}}. Lines that are not CSV
    (the target's own output, ncu's ==PROF== lines) are left out."""
    import csv

    lines = [line for line in output.splitlines() if line.startswith('"')]
    header = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if header is None:
        return []
    launches: dict[str, dict] = {}
    for row in csv.DictReader(lines[header:]):
        if row.get("ID") is None or row.get("Metric Name") is None:
            continue
        launch = launches.setdefault(row["ID"], {"kernel": row.get("Kernel Name", ""), "grid": row.get("Grid Size", ""),
                                                 "metrics": {}})
        value = (row.get("Metric Value") or "").replace(",", "")
        try:
            launch["metrics"][row["Metric Name"]] = float(value)
        except ValueError:
            launch["metrics"][row["Metric Name"]] = value
    return list(launches.values())


def _ncu_path():
    return _cuda_tool("ncu", "NCU")


def stage_banks(args, record) -> None:
    if args.emulated:
        raise Skip("Nsight Compute needs a GPU (the emulator has no shared-memory counters)")
    ncu = _ncu_path()
    if not ncu:
        raise Skip("ncu (Nsight Compute) not found (PATH, $NCU, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    rt = Runtime(False)
    expected = banks_predictions(rt.launch.sm_count, rt.launch.max_shared_bytes)
    for entry in expected:  # recorded first: a stage killed at its limit keeps them
        record("banks_predicted", **entry)
    command = [ncu, "--metrics", ",".join(BANK_METRICS), "--kernel-name", "regex:_persistent", "--csv",
               "--target-processes", "all", sys.executable, str(Path(__file__).resolve()), "--banks-target"]
    start = time.perf_counter()
    rc, output = run_group(command, max(5.0, args.limit_s - 3))
    print(output[-6000:], flush=True)
    launches = parse_ncu_csv(output)
    for entry, launch in zip(expected, launches):
        record("banks", config=entry["config"], direction=entry["direction"], kernel=launch["kernel"],
               grid=launch["grid"], measured=launch["metrics"], predicted=entry.get("predicted"),
               predicted_plain_layout=entry.get("predicted_plain_layout"))
    record("banks_run", exit=rc, seconds=time.perf_counter() - start, launches=len(launches),
           tail=output[-1500:] if rc != 0 or len(launches) != len(expected) else "")
    if rc != 0 or len(launches) != len(expected):
        raise RuntimeError(f"ncu: exit {rc}, {len(launches)} of {len(expected)} persistent launches profiled")


def banks_target() -> int:
    """What ncu runs: the LSTM's persistent forward (training) and backward, float32,
    once per BANK_CONFIGS entry, in that order (banks_predictions' order)."""
    rt = Runtime(False)
    for batch, hidden in BANK_CONFIGS:
        problem = make_problem(BANK_STEPS, batch, hidden, hidden, "float32", seed=batch + hidden)
        run_ours(rt, on_device(rt, problem, "float32"), "persistent", "training")
    rt.synchronize()
    return 0


STAGE_FUNCTIONS = {
    "env": stage_env, "compile": stage_compile, "ftz": stage_ftz, "correctness": stage_correctness,
    "sanitizer": stage_sanitizer, "timing": stage_timing, "microbench": stage_microbench, "banks": stage_banks,
}
assert set(STAGE_FUNCTIONS) == {stage.name for stage in STAGES}


def run_stage(args) -> int:
    """The child's side: run one stage, record a skip with its reason (exit 3)."""
    record = Recorder(args.out, args.run_stage)
    if args.inject_failure == args.run_stage:  # for the tests: a stage that breaks
        raise RuntimeError("injected failure (--inject-failure)")
    if args.inject_hang == args.run_stage:  # for the tests: a stage that hangs
        time.sleep(3600)
    try:
        STAGE_FUNCTIONS[args.run_stage](args, record)
    except Skip as reason:
        record("skip", reason=str(reason))
        return SKIPPED_EXIT
    return 0


# --------------------------------------------------------------------------- parent
def run_session(args) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in (JSONL, JSON_FILE, MARKDOWN, LOG):
        (out / name).unlink(missing_ok=True)
    wanted = args.stages.split(",") if args.stages else [stage.name for stage in STAGES]
    unknown = set(wanted) - set(STAGE_FUNCTIONS)
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {sorted(unknown)}; known: {[s.name for s in STAGES]}")
    limits = {stage.name: stage.limit_s for stage in STAGES}
    for item in filter(None, args.limits.split(",")):
        name, _, seconds = item.partition("=")
        if name not in limits or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--limits: expected NAME=SECONDS with NAME in {list(limits)}, got {item!r}")
        limits[name] = float(seconds)
    record = Recorder(out, "session")
    record("start", emulated=args.emulated, budget_s=args.budget, stages=wanted, argv=sys.argv[1:])
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    statuses = []
    for stage in (s for s in STAGES if s.name in wanted):
        left = args.budget - (time.monotonic() - started) - 3  # 3 s for the report
        limit = int(min(limits[stage.name], left))
        if left < 5:
            status = {"stage": stage.name, "status": "skipped", "seconds": 0.0, "limit_s": limit,
                      "reason": f"session budget of {args.budget} s spent"}
            record("stage", **status)
            statuses.append(status)
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--run-stage", stage.name, "--out", str(out),
                   "--limit-s", str(limit)]
        if args.emulated:
            command.append("--emulated")
        for option in ("inject_failure", "inject_hang"):
            if getattr(args, option):
                command += [f"--{option.replace('_', '-')}", getattr(args, option)]
        print(f"===== [{stage.name}] {stage.what} (limit {limit} s, session at "
              f"{time.monotonic() - started:.0f} s)", flush=True)
        start = time.monotonic()
        with open(out / LOG, "a", encoding="utf-8") as log:
            log.write(f"\n===== [{stage.name}] {stage.what} (limit {limit} s) {_now()}\n")
            log.flush()
            # Its own session (process group), so a timeout kills the stage's children
            # (a sanitizer, a compile) too.
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                       start_new_session=True)
            try:
                rc = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
                rc = None
        seconds = time.monotonic() - start
        if rc is None:
            status, reason = "timeout", f"killed at its limit of {limit} s"
        elif rc == 0:
            status, reason = "ok", ""
        elif rc == SKIPPED_EXIT:
            status, reason = "skipped", _skip_reason(out, stage.name)
        else:
            status, reason = "failed", f"exit {rc}: {_last_error(out / LOG)}"
        entry = {"stage": stage.name, "status": status, "seconds": round(seconds, 1), "limit_s": limit,
                 "reason": reason}
        record("stage", **entry)
        statuses.append(entry)
    record("end", seconds=round(time.monotonic() - started, 1))
    report = build_report(out)
    (out / JSON_FILE).write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    markdown = render_markdown(report)
    (out / MARKDOWN).write_text(markdown, encoding="utf-8")
    print(markdown, flush=True)
    return 0 if all(s["status"] in ("ok", "skipped") for s in statuses) else 1


def _skip_reason(out: Path, stage: str) -> str:
    for record in reversed(read_records(out)):
        if record["stage"] == stage and record["kind"] == "skip":
            return record["reason"]
    return "skipped (no reason recorded)"


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def read_records(out: Path) -> list[dict]:
    path = out / JSONL
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: keep the rest
            continue
    return records


# --------------------------------------------------------------------------- report
def build_report(out: Path) -> dict:
    """session.json: the records grouped by kind, the stage table, and the predictions
    beside the measurements (table parameters, and measured parameters where the
    microbenchmarks ran)."""
    records = read_records(out)
    by_kind: dict[str, list] = {}
    for record in records:
        by_kind.setdefault(record["kind"], []).append(record)
    base = _model_device(by_kind)
    measured = next((r.get("device_parameters") for r in by_kind.get("microbench", [])), None) or {}
    calibrated = cost_model.with_measurements(base, measured) if measured else None
    comparisons = []
    timings = by_kind.get("timing", [])
    for t in timings:
        problem = cost_model.Problem(t["batch"], t["hidden"], t["input_size"], t["dtype"])
        row = {k: t[k] for k in ("config", "mode", "impl", "us_per_step")}
        if t["impl"] in cost_model.MODELS:
            row["predicted_us"] = cost_model.predict_mode(t["impl"], t["mode"], problem, base)
            if calibrated is not None:
                row["predicted_measured_params_us"] = cost_model.predict_mode(t["impl"], t["mode"], problem,
                                                                              calibrated)
        cudnn = next((c for c in timings if c["config"] == t["config"] and c["mode"] == t["mode"]
                      and c["impl"] == ("cudnn-fp16" if t["dtype"] == "float16" else "cudnn-fp32")), None)
        if cudnn and not t["impl"].startswith("cudnn") and cudnn["us_per_step"]:
            row["ratio_to_cudnn"] = t["us_per_step"] / cudnn["us_per_step"]
        comparisons.append(row)
    return {
        "stages": [r for r in by_kind.get("stage", [])],
        "model_device": _device_dict(base),
        "measured_device_parameters": measured,
        "comparisons": comparisons,
        "records": by_kind,
    }


def _model_device(by_kind) -> cost_model.Device:
    for record in by_kind.get("device", []):
        info = record.get("model_device")
        if isinstance(info, dict):
            fields = {k: v for k, v in info.items() if k in cost_model.Device.__dataclass_fields__ and k != "assumed"}
            return cost_model.Device(**fields, assumed=tuple(info.get("assumed", ())))
    return cost_model.DEVICES[cost_model.DEFAULT_DEVICE]


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if value == value else "nan"
    return str(value)


def render_markdown(report: dict) -> str:
    records = report["records"]
    lines = ["# GPU session", ""]
    start = (records.get("start") or [{}])[0]
    source = (records.get("source") or [{}])[0]
    device = (records.get("device") or [{}])[0]
    lines += [f"- date: {start.get('time', '?')}, emulated: {start.get('emulated')}",
              f"- commit: {source.get('commit', '?')}, csrc digest: {source.get('sources_digest', '?')}",
              f"- device: {device.get('name', 'emulator' if device.get('emulated') else '?')}",
              f"- variants: {source.get('variants', '?')}", ""]
    lines += ["## Stages", "", "| stage | status | seconds | limit s | reason |", "|---|---|---:|---:|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['limit_s']} | {s['reason']} |")
    comparisons = report["comparisons"]
    lines += ["", "## Summary: ours/cuDNN per variant, measured (predicted) us per step", ""]
    keys = list(dict.fromkeys((c["config"], c["mode"]) for c in comparisons))
    impls = list(dict.fromkeys(c["impl"] for c in comparisons if not c["impl"].startswith("cudnn")))
    if keys:
        lines += ["| config | mode | cuDNN fp32 us | cuDNN fp16 us | " + " | ".join(impls) + " |",
                  "|---|---|---:|---:|" + "---|" * len(impls)]
        for config, mode in keys:
            row = {c["impl"]: c for c in comparisons if (c["config"], c["mode"]) == (config, mode)}
            cells = []
            for impl in impls:
                c = row.get(impl)
                if c is None:
                    cells.append("-")
                    continue
                ratio = f"x{_fmt(c['ratio_to_cudnn'])}: " if c.get("ratio_to_cudnn") is not None else ""
                cells.append(f"{ratio}{_fmt(c['us_per_step'])} ({_fmt(c.get('predicted_us'))})")
            lines.append(f"| {config} | {mode} | {_fmt((row.get('cudnn-fp32') or {}).get('us_per_step'))} | "
                         f"{_fmt((row.get('cudnn-fp16') or {}).get('us_per_step'))} | " + " | ".join(cells) + " |")
    else:
        lines.append("no timings recorded")
    lines += ["", "## Time per step (us) and ratios, measured; predictions are PREDICTIONS", ""]
    if comparisons:
        lines += ["| config | mode | impl | measured us/step | ours/cuDNN | predicted (table) | predicted (measured params) |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for c in comparisons:
            lines.append(f"| {c['config']} | {c['mode']} | {c['impl']} | {_fmt(c['us_per_step'])} | "
                         f"{_fmt(c.get('ratio_to_cudnn'))} | {_fmt(c.get('predicted_us'))} | "
                         f"{_fmt(c.get('predicted_measured_params_us'))} |")
    else:
        lines.append("no timings recorded")
    lines += ["", "## Correctness (max relative error vs the float64 reference)", ""]
    builds = {b["source"]: b for b in records.get("correctness_build", [])}
    if builds:
        slowest = max((b for name, b in builds.items() if name != "all" and b.get("seconds") is not None),
                      key=lambda b: b["seconds"], default=None)
        lines += [f"Modules built side by side in {_fmt((builds.get('all') or {}).get('seconds'))} s"
                  + (f" (slowest: {slowest['source']}, {_fmt(slowest['seconds'])} s)" if slowest else "")
                  + "; checks in "
                  + f"{_fmt(sum(c.get('seconds') or 0.0 for c in records.get('correctness', [])))} s.", ""]
    lines += ["| cell | variant | dtype | shape (T,B,I,H) | worst output | max rel err | tolerance | ok | s |",
              "|---|---|---|---|---|---:|---:|---|---:|"]
    for c in records.get("correctness", []):
        lines.append(f"| {c.get('cell', 'lstm')} | {c['variant']} | {c['dtype']} | {c['shape']} | "
                     f"{c.get('worst', c.get('error', ''))} | "
                     f"{_fmt(c.get('max_error'))} | {_fmt(c.get('tolerance'))} | {c['ok']} | "
                     f"{_fmt(c.get('seconds'), 2)} |")
    for v in records.get("validation", []):
        if not v.get("ok"):
            lines.append(f"- timing validation failed: {v['config']} {v['impl']}: {v.get('error') or v.get('rel_error')}")
    lines += ["", "## Device parameters: cost model table vs microbenchmarks", "",
              "| parameter | model (table) | measured |", "|---|---:|---:|"]
    measured = report["measured_device_parameters"]
    for key in ("l2_latency_ns", "grid_sync_ns", "python_launch_us", "graph_node_us", "l2_gbs", "hbm_gbs"):
        lines.append(f"| {key} | {_fmt(report['model_device'].get(key))} | {_fmt(measured.get(key))} |")
    for m in records.get("microbench", []):
        extra = {k: m[k] for k in ("l2_latency_cycles", "grid_sync_cg_ns", "grid_sync_cg_skipped",
                                   "graph_node_skipped") if k in m}
        if extra:
            lines.append(f"- also: {json.dumps(extra)}")
    for f in records.get("ftz", []):
        lines += ["", "## FTZ probe", "",
                  f"- float16 conversions through common.cuh exact: {f['conversions_exact']}",
                  f"- float32 denormal arithmetic: {f['denormals']} (ieee: kept; ftz: flushed, as CuPy's "
                  "-ftz=true should make it)"]
        lines += [f"  - {m}" for m in f["conversion_mismatches"] + f["denormal_arithmetic_mismatches"]]
    sanitizer = records.get("sanitizer", [])
    if sanitizer:
        lines += ["", "## compute-sanitizer", ""]
        lines += [f"- {s['tool']}: exit {s['exit']}, {_fmt(s['seconds'])} s, {s['summary']}" for s in sanitizer]
    banks = records.get("banks", [])
    if banks:
        lines += ["", "## Shared-memory bank conflicts of the persistent kernels (ncu), measured vs PREDICTED", "",
                  "Predicted: the k-partials only (rnnkernels/_shared_banks.py; the kernels' other shared "
                  "accesses are predicted conflict-free); 'plain': the layout the swizzle replaced.", "",
                  "| config | direction | ld conflicts | predicted | plain | st conflicts | predicted | plain |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for b in banks:
            measured, predicted, plain = b.get("measured") or {}, b.get("predicted") or {}, \
                b.get("predicted_plain_layout") or {}
            cells = []
            for op in ("ld", "st"):
                for value in (measured.get(f"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_{op}.sum"),
                              predicted.get(f"{op}_conflicts"), plain.get(f"{op}_conflicts")):
                    cells.append(f"{value:.0f}" if isinstance(value, (int, float)) else _fmt(value))
            lines.append(f"| {b['config']} | {b['direction']} | " + " | ".join(cells) + " |")
    skips = records.get("skip", []) + [c for c in records.get("cudnn", []) if c.get("skipped")] + \
        [p for p in records.get("ptxas", []) if p.get("skipped")]
    if skips:
        lines += ["", "## Skipped", ""]
        lines += [f"- {s['stage']}: {s.get('reason') or s.get('skipped')}" for s in skips]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.environ.get("OUT") or str(REPO / "benchmarks" / "results" / f"gpu-session-{datetime.date.today()}")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="results folder (default: $OUT)")
    parser.add_argument("--emulated", "--dry-run", action="store_true", help="the CPU emulator, tiny shapes")
    parser.add_argument("--stages", help=f"comma-separated subset of {[s.name for s in STAGES]}")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole session")
    parser.add_argument("--limits", default="", help="per-stage limits in seconds, e.g. timing=300,sanitizer=60")
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)
    parser.add_argument("--limit-s", type=float, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--sanitizer-target", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--banks-target", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile-source", help=argparse.SUPPRESS)
    parser.add_argument("--inject-failure", help=argparse.SUPPRESS)
    parser.add_argument("--inject-hang", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.sanitizer_target:
        return sanitizer_target()
    if args.banks_target:
        return banks_target()
    if args.compile_source:
        print(compile_seconds(args.compile_source, args.emulated))
        return 0
    if args.run_stage:
        return run_stage(args)
    return run_session(args)


if __name__ == "__main__":
    sys.exit(main())
