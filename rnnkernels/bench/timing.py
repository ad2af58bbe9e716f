"""How the suite times one call, and how it measures memory.

CPU: ``time.perf_counter`` around each call, after warm-up (the warm-up includes the
first call, which is where Numba compiles).

GPU: CUDA events recorded on the current stream around each call (CuPy events for CuPy
code, ``torch.cuda.Event`` for PyTorch code), after warm-up, with the L2 cache flushed
before every repeat by writing a buffer twice the L2 size (not timed). Each sample is the
time of one call; the row reports the median and the 10th and 90th percentiles.

All implementations of one (model, mode, T) are timed *interleaved*: repeat r runs each
of them once, in an order that rotates with r, so a slow patch of the machine (another
process, frequency scaling) hits them all alike. A ratio to a baseline is the median of
the per-repeat ratios.

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

import time
import tracemalloc
from dataclasses import dataclass
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
    """Median (and p10/p90) of the per-repeat ratios ``samples[r] / baseline[r]``."""
    a = np.asarray(samples_ms, dtype=np.float64)
    b = np.asarray(baseline_ms, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired samples must be non-empty and of equal length")
    p10, median, p90 = np.percentile(a / b, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90)}


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
    """How many times to run: ``warmup`` untimed calls each, then repeats until both
    ``min_repeats`` are done and ``budget_s`` has passed, at most ``max_repeats``."""

    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 100
    budget_s: float = 0.5

    def __post_init__(self):
        if self.warmup < 0 or self.min_repeats < 1 or self.max_repeats < self.min_repeats:
            raise ValueError(f"bad schedule {self}")


def measure_interleaved(calls: dict[str, Callable[[], Any]], timers: dict[str, Timer],
                        schedule: Schedule,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Time each call in ``calls`` with its timer, interleaved (see the module docstring).
    Returns the samples in milliseconds, one list per name, all of equal length."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    if not names:
        return samples
    for _ in range(schedule.warmup):
        for name in names:
            timers[name].time_ms(calls[name])
    started = clock()
    repeat = 0
    while repeat < schedule.max_repeats and (
        repeat < schedule.min_repeats or clock() - started < schedule.budget_s
    ):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timers[name].time_ms(calls[name]))
        repeat += 1
    return samples


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
