"""How the suite times one call, and how it measures memory.

CPU: ``time.perf_counter`` around each call, after warm-up (the warm-up includes the
first call, which is where Numba compiles).

GPU: CUDA events recorded on the current stream around each call (CuPy events for CuPy
code, ``torch.cuda.Event`` for PyTorch code), after warm-up, with the L2 cache flushed
before every repeat by writing a buffer twice the L2 size (not timed). Each sample is the
time of one call; the row reports the median and the 10th and 90th percentiles.

All implementations of one (model, mode, T) are timed *interleaved*: repeat r runs each
of them once, in an order that rotates with r, so a slow patch of the machine (another
process, frequency scaling) hits them all alike.

Ratios to a baseline (see ``ratio_columns``): the headline is the *ratio of medians*,
``median(ours) / median(baseline)``, which agrees with the medians printed beside it;
the *paired* p10-p90 range of the per-repeat ratios ``ours[r] / baseline[r]`` goes
beside it as the spread (each pair ran back to back, so a slow patch cancels out).

Trust: after warm-up (a number of calls *and* a minimum time, so that Numba has
compiled, caches are warm and the clock has ramped), each cell is timed; its spread
p90/p10 and the CPU time that *other* processes took during it (from /proc/stat against
our own ``os.times()``) are checked. On a GPU (``measure_checked``) a cell whose spread
exceeds ``NOISE_LIMIT`` or whose competing load exceeds ``LOAD_LIMIT`` is timed again,
up to ``retries`` times; the calmest attempt is kept, and if it still fails a check its
rows are flagged ``noisy`` with the reason. On a CPU, see host drift.

Host drift (``HostDrift``, ``CellTiming``): a machine can get slower as a whole (another
guest of the VM host, frequency, CPU credits) without any process of ours seeing it:
/proc/stat shows no other process and no steal. On the 2-core VM of issue 14 the host
runs at one steady speed (the calibration below: 0.279-0.281 ms in every half second
of 12 s) or, in stretches of a second to tens of seconds that can fill most of a run,
1.5-2x slower, switching between the two from one round of a few milliseconds to the
next; two runs' medians missed the 20% target by landing in different stretches, and
flagging those rows, or spreading each row's samples over the run, does not fix that. So on a
CPU a fixed calibration workload (a NumPy LSTM cell, one thread, about 0.3 ms) is
timed before every round and after every sample, interleaved with the
implementations, and a *round* (one sample of each implementation) counts only when
the slowest calibration around it ran within ``DRIFT_LIMIT`` of the host's usual
speed (``HostDrift.usual_ms``: a low percentile of the run's calibrations): a round
that ran while the host was slow is timed again instead, within ``HOST_WAIT`` times
the cell's budget. The rounds of an attempt during which other processes took more
than ``LOAD_LIMIT`` of the CPU do not count either. After the last cell, every cell
with fewer than ``min_repeats`` rounds that count, or whose rounds spread more than
``NOISE_LIMIT``, is timed again (rounds added), up to ``retries`` times, and its rows
are flagged ``noisy`` with the reason if it still fails. The figures are those of the
rounds kept: never divided by the calibration (that would hide real costs as well as
drift), and an implementation that slowed the calibration itself (a thread pool left
spinning) gets its rounds dropped and its rows flagged, not hidden. The calibrations
(with /proc/stat's steal time and /proc/cpuinfo's clock) go into the JSON, so that two
runs can be compared: did the host change speed, or did we? Its time counts against
the cell's budget like any other.

Garbage collection is off while a cell is timed (after collecting the young
generations), as ``timeit`` does: a collection triggered by one implementation's garbage
would otherwise land in whichever call happened to cross the threshold, often another
implementation's.

Peak memory, ``peak_mem_bytes``: the most memory allocated at once *during* one call,
beyond what existed before it (inputs and weights excluded, outputs and workspace
included), measured on a call of its own outside the timed repeats:
  * ``tracemalloc``: CPU code whose arrays are NumPy arrays (NumPy reports its buffers
    to tracemalloc). Memory that Numba allocates inside compiled functions is not seen,
    so for ``rnnkernels-cpu`` this is a lower bound.
  * ``cupy-memory-hook``: bytes handed out by CuPy's memory pool during the call.
  * ``torch.cuda.max_memory_allocated``: PyTorch's caching allocator on the GPU.
  * none (null): PyTorch on the CPU, which has no such counter.
"""

from __future__ import annotations

import gc
import math
import os
import time
import tracemalloc
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import numpy as np


def summarize(samples_ms) -> dict[str, float]:
    """Median and 10th/90th percentiles of a list of times in milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples to summarize")
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {"median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90),
            "repeats": int(values.size)}


def paired_ratio(samples_ms, baseline_ms) -> dict[str, float]:
    """Median (and p10/p90) of the per-repeat ratios ``samples[r] / baseline[r]``. Not the
    headline ratio (see ``ratio_columns``): the median of ratios can differ a lot from
    the ratio of the medians when the two distributions have different shapes."""
    a = np.asarray(samples_ms, dtype=np.float64)
    b = np.asarray(baseline_ms, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired samples must be non-empty and of equal length")
    p10, median, p90 = np.percentile(a / b, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90)}


def ratio_columns(samples_ms, baseline_ms) -> dict[str, float]:
    """The ratio columns of a row against its baseline: ``ratio_to_baseline``, the ratio
    of medians (the headline: it agrees with the medians of the two rows), and
    ``ratio_p10``/``ratio_p90``, the 10th and 90th percentiles of the paired per-repeat
    ratios (how much it moved from repeat to repeat)."""
    if min(baseline_ms, default=0.0) <= 0:
        raise ValueError("baseline times must be positive")
    paired = paired_ratio(samples_ms, baseline_ms)
    median = float(np.median(np.asarray(samples_ms, dtype=np.float64)))
    base = float(np.median(np.asarray(baseline_ms, dtype=np.float64)))
    return {"ratio_to_baseline": median / base, "ratio_p10": paired["p10"],
            "ratio_p90": paired["p90"]}


def spread(samples_ms) -> float:
    """p90 / p10 of the samples: 1.0 for a perfectly steady timing."""
    p10, p90 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [10, 90])
    return float(p90 / p10) if p10 > 0 else math.inf


class Timer(Protocol):
    method: str

    def time_ms(self, fn: Callable[[], Any]) -> float: ...


class CpuTimer:
    """Wall time of one call with ``time.perf_counter``."""

    method = "perf_counter"

    def time_ms(self, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def l2_flush_bytes(l2_cache_bytes: int) -> int:
    """Size of the buffer written between repeats: twice L2, at least 8 MiB."""
    if l2_cache_bytes < 0:
        raise ValueError(f"L2 size must be non-negative, got {l2_cache_bytes}")
    return max(2 * int(l2_cache_bytes), 8 << 20)


class CudaEventTimer:
    """GPU time of one call between two CUDA events, after an (untimed) L2 flush.

    The pieces are passed in so the logic does not depend on CuPy or PyTorch:
    ``new_event()`` makes a timing event with ``record()`` and ``synchronize()``,
    ``elapsed_ms(start, end)`` reads the time between two, ``flush()`` writes the flush
    buffer on the same stream the work runs on.
    """

    def __init__(self, method: str, new_event: Callable[[], Any],
                 elapsed_ms: Callable[[Any, Any], float], flush: Callable[[], None]):
        self.method = method
        self._new_event = new_event
        self._elapsed_ms = elapsed_ms
        self._flush = flush

    def time_ms(self, fn: Callable[[], Any]) -> float:
        self._flush()
        start, end = self._new_event(), self._new_event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(self._elapsed_ms(start, end))


def require_gpu_cupy():
    """Import CuPy and check that it sees a GPU; a clear RuntimeError otherwise."""
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError(
            "CuPy is not installed; install rnnkernels[cuda12] or rnnkernels[cuda13]"
        ) from error
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError: no driver, driver too old, ...
        raise RuntimeError(f"CuPy cannot use a GPU here: {error}") from error
    if count < 1:
        raise RuntimeError("CuPy sees no GPU")
    return cupy


def require_gpu_torch():
    """Import PyTorch and check that it has CUDA; a clear RuntimeError otherwise."""
    try:
        import torch
    except ImportError as error:
        raise RuntimeError("PyTorch is not installed; install rnnkernels[torch]") from error
    if not torch.cuda.is_available():
        raise RuntimeError(f"PyTorch {torch.__version__} has no usable CUDA device")
    return torch


def cupy_event_timer() -> CudaEventTimer:
    """CUDA-event timer for CuPy work on CuPy's current stream."""
    cupy = require_gpu_cupy()
    l2 = cupy.cuda.Device().attributes["L2CacheSize"]
    buffer = cupy.empty(l2_flush_bytes(l2), dtype=cupy.uint8)
    return CudaEventTimer("cuda-events (cupy)", lambda: cupy.cuda.Event(),
                          cupy.cuda.get_elapsed_time, lambda: buffer.fill(1))


def torch_event_timer() -> CudaEventTimer:
    """CUDA-event timer for PyTorch work on PyTorch's current stream."""
    torch = require_gpu_torch()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 0) or (50 << 20)  # unknown: assume a large L2
    buffer = torch.empty(l2_flush_bytes(l2), dtype=torch.uint8, device="cuda")
    return CudaEventTimer("cuda-events (torch)", lambda: torch.cuda.Event(enable_timing=True),
                          lambda start, end: start.elapsed_time(end), lambda: buffer.fill_(1))


@dataclass
class Schedule:
    """How many times to run: untimed warm-up rounds until both ``warmup`` rounds are
    done and ``warmup_s`` has passed (at most ``max_repeats`` rounds), then repeats until
    both ``min_repeats`` are done and ``budget_s`` has passed, at most ``max_repeats``.
    ``retries``: how many times a cell that fails the noise or load check is timed again.
    ``min_sample_s``: a shorter call is timed several times per sample (CPU only: on a
    GPU every call is timed by events after its own L2 flush)."""

    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 100
    budget_s: float = 0.5
    warmup_s: float = 0.0
    retries: int = 0
    min_sample_s: float = 0.0
    passes: int = 1

    def __post_init__(self):
        if (self.warmup < 0 or self.min_repeats < 1 or self.max_repeats < self.min_repeats
                or self.warmup_s < 0 or self.retries < 0 or self.min_sample_s < 0
                or self.passes < 1):
            raise ValueError(f"bad schedule {self}")

    def retry(self) -> Schedule:
        """The schedule of a CPU cell timed again at the end of a run: one warm-up
        round, a pass's share of the repeats, the whole budget (so that a cell the slow
        host left short may wait ``HOST_WAIT`` times that for rounds that count)."""
        return replace(self.one_pass(False), budget_s=self.budget_s)

    def one_pass(self, first: bool) -> Schedule:
        """The schedule of one of ``passes`` passes over a CPU run (``runner``): a share
        of the repeats and of the budget; the whole warm-up in the first pass, one
        round in the others (compiled and the clock up: only the caches to refill after
        the other cells, and a call under ``PRIME_BELOW_MS`` is primed in every sample)."""
        if self.passes == 1:
            return self
        min_repeats = math.ceil(self.min_repeats / self.passes)
        return Schedule(self.warmup if first else min(self.warmup, 1), min_repeats,
                        max(min_repeats, math.ceil(self.max_repeats / self.passes)),
                        self.budget_s / self.passes, self.warmup_s if first else 0.0,
                        self.retries, self.min_sample_s)


# On a CPU (``min_sample_s`` set), a call shorter than this is preceded, in every
# sample, by one untimed call of the same implementation (see measure_interleaved).
PRIME_BELOW_MS = 10.0


def calls_per_sample(call_ms: float, min_sample_ms: float, limit: int = 1000) -> int:
    """How many back-to-back calls one sample times so that it lasts ``min_sample_ms``:
    1 when one call is long enough (or no minimum is set), at most ``limit``."""
    if min_sample_ms <= 0 or call_ms >= min_sample_ms:
        return 1
    return min(limit, math.ceil(min_sample_ms / max(call_ms, 1e-6)))


def measure_interleaved(calls: dict[str, Callable[[], Any]], timers: dict[str, Timer],
                        schedule: Schedule,
                        clock: Callable[[], float] = time.perf_counter,
                        batches: dict[str, int] | None = None,
                        calibration: Callable[[], float] | None = None,
                        calibration_samples: list[float] | None = None,
                        plan: dict[str, tuple[int, bool]] | None = None,
                        counts: Callable[[float], bool] | None = None
                        ) -> dict[str, list[float]]:
    """Time each call in ``calls`` with its timer, interleaved (see the module docstring).
    Returns the samples in milliseconds per call, one list per name, all of equal length.

    With ``schedule.min_sample_s`` set (CPU presets), a call shorter than that is timed
    ``calls_per_sample`` times back to back per sample and the sample is their mean,
    as ``timeit`` does: a 40 us call timed alone is at the mercy of every interrupt and
    timer tick, which spread p90/p10 far more than the call varies. The count comes
    from the warm-up rounds and is written into ``batches`` (name -> calls).

    On a CPU, a call shorter than ``PRIME_BELOW_MS`` is also *primed*: each of its
    samples starts with one untimed call, so that every timed call follows a call of
    the same implementation. Without it, what a sample measured depended on the count:
    the first call of a sample runs after the other implementations have filled the
    caches with their own data, and a sample of one call is all first call, of two
    calls half. A call near the 1 ms threshold (0.7-1.2 ms: training at T=32) got one
    count in one run and the other in the next (seen twice in pairs of --quick runs on
    the 2-core VM of issue 14, the medians 22% and 70% apart). Measured there, training
    at T=32 against the calibration of the same rounds: one call per sample against
    2-5 moved rnnkernels-cpu by 16% and torch-cpu by 10% unprimed, 10% and 5% primed.
    Above 10 ms the first call's extra (a few tenths of a ms) is a few percent, and
    priming would double the time.

    ``calibration`` (``HostDrift.workload``: runs the calibration and returns its ms)
    is timed before the first round and after every sample, so that each sample sits
    between two readings of the host's speed, and each round's reading, appended to
    ``calibration_samples``, is the slowest of those around its samples. Why not once
    a round: the host of issue 14's VM can switch between its usual speed and 1.7-2x
    slower from one millisecond to the next for a second or more; in such a stretch a
    reading taken once a round saw the usual speed while the samples of the same round
    ran 15-35% slow (training at T=32, rounds of 3-5 ms). Each calibration is run
    twice and the second time kept, as a short call is primed: the first call after an
    implementation reads what that implementation left in the caches, not the host.
    Measured there (quiet, 20 s, interleaved so that the host's bursts hit all alike),
    the 10th percentile of the calibration right after attention training at T=512,
    torch training at T=512 and a torch decode step: 0.43, 0.48 and 0.32 ms unprimed,
    0.275 ms primed after each of the three.

    ``counts`` (``HostDrift.judge_round``), given the calibration of a round, says
    whether the round counts towards ``min_repeats``/``max_repeats``: a round that ran
    while the host was slow does not, and more rounds are timed instead, until
    ``min_repeats`` count or ``HOST_WAIT`` times the budget has passed (then the cell is
    short: see ``CellTiming``). Every round is returned, counted or not.

    ``plan`` (name -> (calls per sample, primed)): a name found in it is timed so, a
    name missing is planned from the warm-up and written into it. A cell timed again
    (``CellTiming``) hands the first attempt's plan on, so that every attempt times a
    row the same way (a call near a threshold must not be timed one way in one attempt
    and the other way in the next: see the priming above)."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    if not names:
        return samples
    # Collect the young generations now, then none while the cell runs (see the module
    # docstring). Not a full collection: with torch and Numba loaded that takes 0.1-0.2 s,
    # at every attempt of every cell, and the old generation is not what a cell makes.
    gc.collect(1)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _measure_interleaved(calls, timers, schedule, clock, batches, names, samples,
                                    calibration, calibration_samples, plan, counts)
    finally:
        if was_enabled:
            gc.enable()


def _measure_interleaved(calls, timers, schedule, clock, batches, names, samples,
                         calibration, calibration_samples, plan, counts):
    started = clock()
    rounds = 0
    warm: dict[str, list[float]] = {name: [] for name in names}
    # A minimum warm-up *time* as well as a count: a fast call is over before the CPU
    # clock has ramped up and the caches are warm after a few calls of a slower one.
    while rounds < max(schedule.warmup, 1 if schedule.min_sample_s > 0 else 0) or (
            clock() - started < schedule.warmup_s and rounds < schedule.max_repeats):
        for name in names:
            warm[name].append(timers[name].time_ms(calls[name]))
        rounds += 1
    # The calls per sample come from the fastest warm-up call, not the last one (nor the
    # median of the last five, as before): an interrupted call, or a slow patch of the
    # host during the warm-up (issue 14's VM: 1.7-2x for a second or more), would
    # otherwise change how a row is timed from one run to the next (torch training at
    # T=32, 0.7 ms, was timed 1 or 2 times per sample; 2 or 3 times moved attention-sdpa
    # by 4-6% in six runs of the cell). Calls are only ever slowed, never sped up.
    plan = {} if plan is None else plan
    for name in names:
        if name not in plan:
            typical = min(warm[name], default=math.inf)
            plan[name] = (calls_per_sample(typical, 1e3 * schedule.min_sample_s),
                          schedule.min_sample_s > 0 and typical < PRIME_BELOW_MS)
    counts_of = {name: plan[name][0] for name in names}
    if batches is not None:
        batches.update(counts_of)

    def batched(fn, count):
        def run():
            for _ in range(count):
                result = fn()
            return result
        return run
    timed = {name: calls[name] if counts_of[name] == 1 else batched(calls[name], counts_of[name])
             for name in names}
    primed = {name for name in names if plan[name][1]}
    def calibrate() -> float:
        calibration()  # primed: see the docstring
        return calibration()
    # the calibration brackets every sample: one before the first round, one after each
    # implementation (see the docstring)
    previous = calibrate() if calibration is not None else None
    started = clock()
    repeat = counted = 0
    previous_usual = True
    while repeat < schedule.max_repeats * (HOST_WAIT if counts else 1) and (
        counted < schedule.min_repeats or (clock() - started < schedule.budget_s
                                           and counted < schedule.max_repeats)
    ):
        if counts is not None and repeat >= schedule.min_repeats and (
                clock() - started > HOST_WAIT * schedule.budget_s):
            break  # the host stayed slow: the cell is short, and is timed again later
        shift = repeat % len(names)
        bracket = [previous]
        for name in names[shift:] + names[:shift]:
            if name in primed:
                calls[name]()
            samples[name].append(timers[name].time_ms(timed[name]) / counts_of[name])
            if calibration is not None:
                previous = calibrate()
                bracket.append(previous)
        repeat += 1
        if calibration is None:
            counted += 1
            continue
        slowest = max(bracket)  # the round is as slow as the slowest moment around it
        if calibration_samples is not None:
            calibration_samples.append(slowest)
        usual = counts is None or counts(slowest)
        counted += 1 if usual and previous_usual else 0  # see CellTiming._slow
        previous_usual = usual
    return samples


# --- trust: competing load and spread ----------------------------------------------------

NOISE_LIMIT = 1.5  # p90/p10 above this: the row's timing is too spread to trust
LOAD_LIMIT = 0.1  # other processes took more than this fraction of the machine's CPU time
# The median calibration during a cell was more than this far (either way) from the
# run's median: the host ran at another speed (see HostDrift). Half the stability
# target's 20%, so that drift alone cannot make two runs' medians miss it unseen.
DRIFT_LIMIT = 0.1
# A cell whose rounds do not count (the host slow) keeps timing for at most this many
# times its budget before giving up for now (it is timed again at the end of the run).
HOST_WAIT = 4


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU accounting at one instant: wall time, CPU seconds the whole machine spent
    busy (None where /proc/stat is unreadable), CPU seconds of this process, and CPU
    seconds stolen by the hypervisor (None where unknown)."""

    wall_s: float
    machine_busy_s: float | None
    own_s: float
    steal_s: float | None = None


def _proc_stat_cpu_ticks(path: str) -> list[int] | None:
    """user, nice, system, idle, iowait, irq, softirq, steal from the first ``cpu``
    line of /proc/stat (in clock ticks, since boot); None where there is none."""
    try:
        with open(path, encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    return ([int(v) for v in fields[1:9]] + [0] * 8)[:8]


def read_proc_stat(path: str = "/proc/stat") -> float | None:
    """Busy CPU seconds of the whole machine since boot, from the first ``cpu`` line of
    /proc/stat: user, nice, system, irq, softirq and steal (steal is time the hypervisor
    gave to other guests: just as lost to us). None where there is no /proc/stat."""
    ticks = _proc_stat_cpu_ticks(path)
    if ticks is None:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def read_proc_steal(path: str = "/proc/stat") -> float | None:
    """CPU seconds the hypervisor gave to other guests since boot (/proc/stat's steal
    column); None where there is no /proc/stat. Recorded apart from the busy time so
    that a slow run can be told apart: another process here, or another guest."""
    ticks = _proc_stat_cpu_ticks(path)
    return None if ticks is None else ticks[7] / os.sysconf("SC_CLK_TCK")


def read_cpu_mhz(path: str = "/proc/cpuinfo") -> float | None:
    """Mean of the ``cpu MHz`` lines of /proc/cpuinfo (None where there are none). On
    many VMs it is the nominal clock and never moves; it is recorded in case it does."""
    try:
        with open(path, encoding="ascii", errors="replace") as info:
            values = [float(line.split(":", 1)[1]) for line in info
                      if line.startswith("cpu MHz") and ":" in line]
    except (OSError, ValueError):
        return None
    return sum(values) / len(values) if values else None


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads (BLAS, Numba, torch)."""
    times = os.times()
    return times.user + times.system


class LoadProbe:
    """Measures the CPU time other processes take while a cell is timed: the machine's
    busy time over an interval minus our own CPU time, as a fraction of the machine's
    capacity (``cpus`` x wall time). The load average cannot do this: it counts
    runnable threads averaged over a minute, including ours, and on 2 cores one other
    busy process (load 1) already halves what a 2-thread run gets."""

    def __init__(self, cpus: int | None = None, read_busy: Callable[[], float | None] = read_proc_stat,
                 read_own: Callable[[], float] = own_cpu_seconds,
                 clock: Callable[[], float] = time.perf_counter,
                 read_steal: Callable[[], float | None] = read_proc_steal):
        self.cpus = cpus or os.cpu_count() or 1
        self._read_busy, self._read_own, self._clock = read_busy, read_own, clock
        self._read_steal = read_steal

    def snapshot(self) -> CpuSnapshot:
        return CpuSnapshot(self._clock(), self._read_busy(), self._read_own(), self._read_steal())

    def steal_fraction(self, before: CpuSnapshot, after: CpuSnapshot) -> float | None:
        """Fraction of the machine's CPU time stolen by the hypervisor between the two
        snapshots (part of ``other_fraction``, reported apart); None when unknown."""
        wall = after.wall_s - before.wall_s
        if before.steal_s is None or after.steal_s is None or wall <= 0:
            return None
        return min(1.0, max(0.0, (after.steal_s - before.steal_s) / (wall * self.cpus)))

    def other_fraction(self, before: CpuSnapshot, after: CpuSnapshot) -> float | None:
        """Fraction of the machine's CPU time used by other processes between the two
        snapshots (0 = none, 1 = every core busy with other work); None when unknown.
        /proc/stat counts in clock ticks (10 ms), so short intervals read coarsely."""
        wall = after.wall_s - before.wall_s
        if before.machine_busy_s is None or after.machine_busy_s is None or wall <= 0:
            return None
        other = (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)
        return min(1.0, max(0.0, other / (wall * self.cpus)))


CALIBRATION_STEPS = 10
CALIBRATION_WORKLOAD = (f"{CALIBRATION_STEPS} steps of a NumPy LSTM cell at B=4, H=64 (x @ W + "
                        "h @ U, sigmoids, tanh; float64, one thread at any thread setting), "
                        "timed before every repeat round and after every sample of every CPU "
                        "cell, interleaved with the implementations, twice each (the second "
                        "time kept)")


def calibration_workload(steps: int = CALIBRATION_STEPS) -> Callable[[], float]:
    """The fixed workload of ``HostDrift``: a function that runs it once and returns its
    time in ms (about 0.28 ms on a 2.6 GHz EPYC core, warm).

    Why an LSTM cell in NumPy and not a bigger matmul: at the sizes a CPU preset times,
    the rows cost mostly dispatch and interpreter time plus small products, and a slow
    patch of a shared VM slows such code far more than it slows a dense matmul. On the
    2-core VM of issue 14 (one core held by SCHED_FIFO, the other busy), over 0.3 s
    chunks torch's decode step moved 1.25x as much as this workload (16 steps then;
    log-log slope, residual sd 6.6%), and 3.6x as much as 50 64x64 matmuls (9.1%). Its
    products (4x64 @ 64x256) stay below OpenBLAS's threading threshold, so it runs on
    one thread whatever the thread policy."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64))
    w, u = 0.1 * rng.standard_normal((64, 256)), 0.1 * rng.standard_normal((64, 256))

    def sigmoid(v):
        return 1.0 / (1.0 + np.exp(-v))

    def run() -> float:
        start = time.perf_counter()
        h = c = np.zeros((4, 64))
        for _ in range(steps):
            i, f, g, o = np.split(x @ w + h @ u, 4, axis=1)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
        return (time.perf_counter() - start) * 1e3
    return run


def relative_gap(a: float, b: float) -> float:
    """max(a, b) / min(a, b) - 1: how far apart two positive times are, either way."""
    return max(a, b) / min(a, b) - 1.0


class HostDrift:
    """The host's speed through one run (see the module docstring). ``workload`` runs
    the calibration once and returns ms. Every calibration a cell times (one per repeat
    round) goes through ``judge_round``, which adds it to the run's samples and says
    whether the round ran at the host's *usual* speed: within ``limit`` of
    ``usual_ms``, the 5th percentile of every calibration of the run so far (a low
    percentile, not the median: the host's slow patches only ever add time, and they
    can fill most of a run, while its undisturbed speed is the same from one minute to
    the next: on the VM of issue 14, 0.278-0.283 ms in the calm half seconds of 25 s in
    which the others ran at 0.4-0.53 ms, then 0.279-0.281 ms for 12 s). ``settle`` times it a number of times before
    the first cell, so that the first rounds are judged against more than themselves.
    ``record`` keeps each attempt's calibrations as a reading (median, spread, when,
    /proc/stat's steal, /proc/cpuinfo's clock, and what the caller adds) for the JSON."""

    def __init__(self, workload: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 read_mhz: Callable[[], float | None] = read_cpu_mhz,
                 read_steal: Callable[[], float | None] = read_proc_steal,
                 limit: float = DRIFT_LIMIT):
        self.workload = workload or calibration_workload()
        self._clock, self._read_mhz, self._read_steal = clock, read_mhz, read_steal
        self.limit = limit
        self.readings: list[dict] = []
        self.samples: list[float] = []  # every calibration of the run, in order
        self.spent_s = 0.0  # time spent in the calibration itself, all cells together
        self._start: float | None = None

    def settle(self, count: int = 200) -> None:
        """Time the workload ``count`` times (primed, as in a round) before the run."""
        for _ in range(count):
            self.workload()
            self.observe(self.workload())

    def observe(self, ms: float) -> None:
        self.samples.append(float(ms))

    def usual_ms(self) -> float | None:
        """The host's usual (undisturbed) calibration time: the 5th percentile of the
        run's calibrations so far; None before the first."""
        return float(np.percentile(self.samples, 5)) if self.samples else None

    def counts(self, ms: float) -> bool:
        """Whether a round whose calibration took ``ms`` ran at the host's usual speed:
        at most ``limit`` slower than ``usual_ms`` (true while there is none)."""
        usual = self.usual_ms()
        return usual is None or ms <= usual * (1.0 + self.limit)

    def judge_round(self, ms: float) -> bool:
        """``observe`` then ``counts``: the predicate ``measure_interleaved`` calls."""
        self.observe(ms)
        return self.counts(ms)

    def drift(self, ms: float) -> float | None:
        """ms / ``usual_ms`` - 1: above 0, the host was slower than usual."""
        usual = self.usual_ms()
        return None if usual is None else ms / usual - 1.0

    def record(self, samples_ms, where: str = "", **extra) -> dict:
        """Record one attempt's calibrations; returns the reading."""
        now = self._clock()
        if self._start is None:
            self._start = now
        values = np.asarray(samples_ms, dtype=np.float64)
        if values.size == 0:
            raise ValueError("no calibration samples to record")
        p10, median, p90 = np.percentile(values, [10, 50, 90])
        self.spent_s += 2 * float(values.sum()) / 1e3  # each timed once primed
        reading = {"where": where, "at_s": round(now - self._start, 3), "ms": float(median),
                   "p10_ms": float(p10), "p90_ms": float(p90), "samples": int(values.size),
                   "cpu_mhz": self._read_mhz(), "steal_s": self._read_steal(), **extra}
        self.readings.append(reading)
        return reading

    def reference_ms(self) -> float | None:
        """Median reading of the run's attempts; None when there is none."""
        values = [reading["ms"] for reading in self.readings]
        return float(np.median(values)) if values else None

    def summary(self) -> dict:
        """What goes into the JSON: the workload, the limit, the host's usual speed
        (``usual_ms``), every reading, their median (``median_ms``: with ``usual_ms``,
        how much of the run the host was slow) and the time the calibration took."""
        values = [reading["ms"] for reading in self.readings]
        slow = (sum(not self.counts(ms) for ms in self.samples) / len(self.samples)
                if self.samples else None)
        return {"workload": CALIBRATION_WORKLOAD, "drift_limit": self.limit,
                "cpus": os.cpu_count(), "usual_ms": self.usual_ms(),
                "slow_fraction": None if slow is None else round(slow, 3),
                "median_ms": self.reference_ms(),
                "fastest_ms": min(values) if values else None,
                "slowest_ms": max(values) if values else None,
                "spent_s": round(self.spent_s, 3), "readings": self.readings}


def drift_reason(slow_rounds: int, rounds: int, limit: float = DRIFT_LIMIT) -> str:
    return (f"host drift: the host ran over {100 * limit:.0f}% slower than its usual speed "
            f"in {slow_rounds} of {rounds} rounds")


def load_reason(other_load: float) -> str:
    return f"other processes took {100 * other_load:.0f}% of the CPU"


@dataclass
class CheckedSamples:
    """Samples of the rounds kept, and what the checks found."""

    samples: dict[str, list[float]]
    attempts: int
    other_load: float | None  # fraction of the machine other processes used
    spreads: dict[str, float]
    noisy: dict[str, str]  # name -> why its timing is not to be trusted (absent: trusted)
    batches: dict[str, int] = field(default_factory=dict)  # calls per sample
    steal: float | None = None  # fraction of the machine stolen by the hypervisor
    calibration_ms: float | None = None  # median calibration of the rounds kept
    drift: float | None = None  # calibration_ms / the host's usual - 1
    dropped: int = 0  # rounds timed but not kept (the host slow, or other load)


def _problems(spreads: dict[str, float], other_load: float | None, noise_limit: float,
              load_limit: float) -> dict[str, str]:
    found = {}
    for name, value in spreads.items():
        reasons = []
        if value > noise_limit:
            reasons.append(f"p90/p10 = {value:.2f} > {noise_limit:g}")
        if other_load is not None and other_load > load_limit:
            reasons.append(load_reason(other_load))
        if reasons:
            found[name] = "; ".join(reasons)
    return found


@dataclass
class Attempt:
    """One timing of a cell: every round's samples and calibration, and the load."""

    samples: dict[str, list[float]]
    calibrations: list[float]  # one per round; empty when no calibration was timed
    other_load: float | None
    steal: float | None
    wall_s: float

    @property
    def rounds(self) -> int:
        return len(next(iter(self.samples.values()), []))


MIN_KEPT = 3  # fewer rounds at the host's usual speed: a row's figures from all its rounds


class CellTiming:
    """Every round timed for one CPU cell, over one or more attempts, and which rounds
    count (module docstring, "host drift"): a round counts when its calibration was
    within the limit of the host's usual speed (``HostDrift.counts``, judged again at
    the end against the whole run's usual speed) and its attempt's other load was
    within ``load_limit``. The cell is ``short`` when fewer than ``min_repeats`` count,
    or ``noisy`` when those spread more than ``noise_limit``; ``runner`` then times it
    again (the new rounds are added to the old). The rows' figures come from the rounds
    that count, and the rows are flagged, with the reason, when fewer than half of
    ``min_repeats`` do (``enough``: a median of 8 undisturbed rounds is better than one
    of 15 with slow ones among them). With fewer than ``MIN_KEPT`` rounds that count
    the figures come from all the rounds (flagged). Why not from all the rounds as soon
    as it is flagged: on issue 14's VM a cell that found 5 of 114 rounds at the usual
    speed got, from all its rounds, medians 17-22% above those of the other run."""

    def __init__(self, min_repeats: int, host: HostDrift | None = None,
                 noise_limit: float = NOISE_LIMIT, load_limit: float = LOAD_LIMIT):
        self.min_repeats, self.host = min_repeats, host
        self.enough = math.ceil(min_repeats / 2)
        self.noise_limit, self.load_limit = noise_limit, load_limit
        self.attempts: list[Attempt] = []
        self.plan: dict[str, tuple[int, bool]] = {}  # shared by every attempt of the cell

    def time(self, calls, timers, schedule: Schedule, probe: LoadProbe, label: str = "",
             measure: Callable[..., dict[str, list[float]]] | None = None) -> Attempt:
        """Time the cell once more (``measure_interleaved``, the calibration in its
        rotation when there is a host) and keep the attempt."""
        measure = measure or measure_interleaved
        host = self.host
        before = probe.snapshot()
        calibrations: list[float] = []
        samples = measure(calls, timers, schedule, calibration=host.workload if host else None,
                          calibration_samples=calibrations, plan=self.plan,
                          counts=host.judge_round if host else None)
        after = probe.snapshot()
        attempt = Attempt(samples, calibrations, probe.other_fraction(before, after),
                          probe.steal_fraction(before, after), after.wall_s - before.wall_s)
        self.attempts.append(attempt)
        if host and calibrations:
            host.record(calibrations, label, rounds=attempt.rounds,
                        other_load=None if attempt.other_load is None
                        else round(attempt.other_load, 4))
        return attempt

    def _loaded(self, attempt: Attempt) -> bool:
        return attempt.other_load is not None and attempt.other_load > self.load_limit

    def _slow(self, attempt: Attempt, index: int) -> bool:
        """Whether round ``index`` of ``attempt``, or the round before it, ran while the
        host was slow. The round before as well: in a stretch where the host switches
        from round to round, a round whose few readings all look usual can still have
        had its samples slowed between them; two rounds in a row at the usual speed
        (7-9 readings over a few ms to 0.1 s) seldom happen in such a stretch, and always
        do while the host is steady (issue 14: torch's LSTM rows 18-26% slower in a run
        spent 83% slow than in one 70% slow, judging by single rounds)."""
        if self.host is None:
            return False
        return any(not self.host.counts(attempt.calibrations[i])
                   for i in (index - 1, index) if 0 <= i < len(attempt.calibrations))

    def kept_rounds(self) -> list[tuple[Attempt, int]]:
        return [(attempt, i) for attempt in self.attempts for i in range(attempt.rounds)
                if not self._loaded(attempt) and not self._slow(attempt, i)]

    def short(self) -> bool:
        return len(self.kept_rounds()) < self.min_repeats

    def _chosen(self) -> list[tuple[Attempt, int]]:
        kept = self.kept_rounds()
        if len(kept) >= min(MIN_KEPT, self.enough):
            return kept
        return [(attempt, i) for attempt in self.attempts for i in range(attempt.rounds)]

    def noisy(self) -> bool:
        chosen = self._chosen()
        return any(spread([attempt.samples[name][i] for attempt, i in chosen]) > self.noise_limit
                   for name in self.attempts[0].samples)

    def checked(self) -> CheckedSamples:
        """The rows' samples (the rounds kept; all rounds when fewer than ``MIN_KEPT``
        are), and what still fails: p90/p10 above the noise limit, and, when fewer than
        ``enough`` rounds were kept, why the others were not."""
        chosen = self._chosen()
        names = list(self.attempts[0].samples)
        samples = {name: [attempt.samples[name][i] for attempt, i in chosen] for name in names}
        spreads = {name: spread(values) for name, values in samples.items()}
        rounds = sum(attempt.rounds for attempt in self.attempts)
        wall = sum(attempt.wall_s for attempt in self.attempts)

        def over_time(values):
            if None in values or wall <= 0:
                return None
            return sum(v * a.wall_s for v, a in zip(values, self.attempts)) / wall
        other_load = over_time([attempt.other_load for attempt in self.attempts])
        calibrations = [attempt.calibrations[i] for attempt, i in chosen
                        if i < len(attempt.calibrations)]
        calibration = float(np.median(calibrations)) if calibrations else None
        failures = []
        if len(self.kept_rounds()) < self.enough:
            slow = sum(self._slow(attempt, i) for attempt in self.attempts
                       for i in range(attempt.rounds))
            if slow:
                failures.append(drift_reason(slow, rounds, self.host.limit))
            loaded = [attempt.other_load for attempt in self.attempts if self._loaded(attempt)]
            if loaded:
                failures.append(load_reason(max(loaded)))
            if not failures:
                failures.append(f"only {len(self.kept_rounds())} rounds kept")
        noisy = {}
        for name in names:
            reasons = ([f"p90/p10 = {spreads[name]:.2f} > {self.noise_limit:g}"]
                       if spreads[name] > self.noise_limit else []) + failures
            if reasons:
                noisy[name] = "; ".join(reasons)
        return CheckedSamples(
            samples, len(self.attempts), other_load, spreads, noisy,
            {name: count for name, (count, _) in self.plan.items() if name in samples},
            over_time([attempt.steal for attempt in self.attempts]), calibration,
            None if calibration is None or self.host is None else self.host.drift(calibration),
            rounds - len(chosen))


def measure_checked(calls: dict[str, Callable[[], Any]], timers: dict[str, Timer],
                    schedule: Schedule, probe: LoadProbe | None = None,
                    noise_limit: float = NOISE_LIMIT, load_limit: float = LOAD_LIMIT,
                    measure: Callable[..., dict[str, list[float]]] | None = None
                    ) -> CheckedSamples:
    """``measure_interleaved`` with the noise and load checks of the module docstring,
    as a GPU cell is timed (a CPU cell: ``CellTiming``): up to ``1 + schedule.retries``
    attempts, stopping at the first that passes; the attempt kept is the first that
    passes, else the one with the smallest worst spread."""
    probe = probe or LoadProbe()
    measure = measure or measure_interleaved
    best: CheckedSamples | None = None
    for attempt in range(1, schedule.retries + 2):
        before = probe.snapshot()
        batches: dict[str, int] = {}
        samples = measure(calls, timers, schedule, batches=batches)
        after = probe.snapshot()
        other = probe.other_fraction(before, after)
        spreads = {name: spread(values) for name, values in samples.items()}
        checked = CheckedSamples(samples, attempt, other, spreads,
                                 _problems(spreads, other, noise_limit, load_limit),
                                 batches, probe.steal_fraction(before, after))
        if not checked.noisy:
            return checked
        if best is None or max(spreads.values()) < max(best.spreads.values()):
            best = checked
        best.attempts = attempt
    return best


# --- peak memory ----------------------------------------------------------------------

def tracemalloc_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak traced bytes allocated during one call of ``fn`` (see the module docstring)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return max(0, peak - before)


def cupy_pool_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes handed out by CuPy's memory pool during one call of ``fn``."""
    cupy = require_gpu_cupy()
    from cupy.cuda import memory_hook

    class PeakHook(memory_hook.MemoryHook):
        name = "rnnkernels-bench-peak"

        def __init__(self):
            self.live = 0
            self.peak = 0

        def malloc_postprocess(self, **kwargs):
            if kwargs.get("mem_ptr"):
                self.live += kwargs["mem_size"]
                self.peak = max(self.peak, self.live)

        def free_postprocess(self, **kwargs):
            self.live -= kwargs["mem_size"]

    hook = PeakHook()
    cupy.cuda.Device().synchronize()
    with hook:
        result = fn()
        cupy.cuda.Device().synchronize()
    del result
    return hook.peak


def torch_cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of PyTorch's CUDA allocator during one call, above the level before it."""
    torch = require_gpu_torch()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return max(0, peak - before)


PEAK_METHODS: dict[str, Callable[[Callable[[], Any]], int]] = {
    "tracemalloc": tracemalloc_peak_bytes,
    "cupy-memory-hook": cupy_pool_peak_bytes,
    "torch.cuda.max_memory_allocated": torch_cuda_peak_bytes,
}
