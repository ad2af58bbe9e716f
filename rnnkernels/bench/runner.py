"""One benchmark run: for every (mode, model, T), validate each implementation against
the float64 reference, measure its peak memory on one call, then time all that passed,
interleaved, with the noise, load and (CPU) host-drift checks (``_run_on_cpu``; a GPU
cell: ``run_cell``).
Produces the result rows; ``ROW_DOCS`` says what the timing columns mean (the JSON
carries it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import flops as flop_formulas
from . import timing
from .impls import (TOLERANCE, Impl, Prepared, Problem, Unavailable, baseline_name,
                    make_inputs, reference_outputs, validate)

ROW_FIELDS = (
    "model", "impl", "mode", "device", "T", "B", "H", "heads", "dtype", "status",
    "median_ms", "p10_ms", "p90_ms", "repeats", "flops", "tflops", "sequential_steps",
    "peak_mem_bytes", "peak_mem_method", "ratio_to_baseline", "ratio_p10", "ratio_p90",
    "baseline", "max_rel_err", "validated_against", "timer", "calls_per_sample", "spread",
    "other_load", "steal", "calibration_ms", "host_drift", "dropped_rounds", "attempts", "noisy",
    "noise_reason",
    "note",
)
ROW_DOCS = {
    "median_ms": "median time per call over the timed repeats kept, after warm-up (on a "
                 "CPU, the rounds of all the cell's passes over the run that ran at the "
                 "host's usual speed: see attempts and dropped_rounds)",
    "p10_ms": "10th percentile of the time per call", "p90_ms": "90th percentile",
    "ratio_to_baseline": "ratio of medians: median_ms / the baseline's median_ms in the same "
                         "cell (below 1: faster than the baseline)",
    "ratio_p10": "10th percentile of the paired per-repeat ratios time[r] / baseline[r] "
                 "(each pair ran back to back)",
    "ratio_p90": "90th percentile of the paired per-repeat ratios",
    "calls_per_sample": "calls timed back to back per sample (a call shorter than the "
                        "preset's minimum sample time is repeated; times are per call). On a "
                        f"CPU a call under {timing.PRIME_BELOW_MS:g} ms is preceded in each "
                        "sample by one untimed call of its own, so every timed call is warm",
    "spread": "p90_ms / p10_ms: 1.0 is perfectly steady; above "
              f"{timing.NOISE_LIMIT:g} the row is flagged noisy",
    "other_load": "fraction of the machine's CPU time other processes took while the cell "
                  "was timed (/proc/stat minus our own CPU time); on a CPU, the rounds of an "
                  f"attempt above {timing.LOAD_LIMIT:g} are not kept and the cell is timed "
                  "again; a row that cannot keep enough rounds, or a GPU row above it, is "
                  "flagged noisy",
    "steal": "fraction of the machine's CPU time the hypervisor gave to other guests while "
             "the cell was timed (/proc/stat's steal; part of other_load)",
    "calibration_ms": "median time of the fixed calibration workload "
                      "(config.calibration.workload) in the rounds kept: it is timed once "
                      "per repeat round of the cell, in the rotation with the "
                      "implementations (CPU only)",
    "host_drift": "calibration_ms / the host's usual calibration time (config.calibration."
                  "usual_ms, the 5th percentile of the run's) - 1: how much slower (above 0) "
                  "the host was in the rounds kept. median_ms is never corrected by it",
    "dropped_rounds": "repeat rounds timed but not kept: their calibration ran more than "
                      f"{timing.DRIFT_LIMIT:g} slower than the host's usual (a slow patch of "
                      "the host: more rounds are timed instead), or other processes took the "
                      "CPU. A cell with fewer than the preset's minimum repeats kept is timed "
                      "again at the end of the run, and flagged noisy if fewer than half "
                      "are kept even then (its figures are then from all its rounds)",
    "attempts": "how many times the cell was timed: on a CPU once in each pass over the run "
                "(schedule.passes), plus once for each time it was timed again at the end "
                "(short or noisy), the rounds of every attempt pooled; on a GPU, attempts "
                "after a failed check, the calmest kept",
    "noisy": "true when the kept samples still fail a check: do not trust this row's "
             "figures, and no crossover is drawn from it",
    "noise_reason": "which check failed",
}
STATUSES = ("ok", "skipped", "error")


@dataclass
class Settings:
    device: str  # "cpu" or "cuda"
    modes: tuple[str, ...]
    seq_lens: tuple[int, ...]
    batch: int
    hidden: int
    dtype: str
    heads: int
    schedule: timing.Schedule
    impls: list[Impl]
    seed: int = 0
    probe: timing.LoadProbe | None = None  # None: a LoadProbe of this machine
    # the run's calibration readings (timing.HostDrift; CPU cells only); None: no check
    host: timing.HostDrift | None = field(default_factory=timing.HostDrift)


def _timer_factories() -> dict[str, Callable[[], timing.Timer]]:
    return {"cpu": timing.CpuTimer, "cupy": timing.cupy_event_timer,
            "torch-cuda": timing.torch_event_timer}


def _row(impl: Impl, p: Problem, status: str, note: str = "", **values) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(model=p.model, impl=impl.name, mode=p.mode, device=impl.device, T=p.T, B=p.B,
               H=p.H, heads=p.heads if p.model == "attention" else None, dtype=p.dtype,
               status=status, flops=flop_formulas.flops(p.model, p.mode, p.T, p.B, p.H),
               sequential_steps=flop_formulas.sequential_steps(p.model, p.mode, p.T),
               note=note or (impl.note if status == "ok" else "") or None)
    row.update(values)
    return row


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()


def prepare_cell(settings: Settings, model: str, mode: str, T: int,
                 timers: dict[str, timing.Timer]) -> tuple[dict[str, dict], dict[str, Prepared]]:
    """Rows of every selected implementation of ``model`` for one (mode, T), validated
    and their peak memory measured, and the prepared calls of those to time."""
    p = Problem(model, mode, T, settings.batch, settings.hidden, settings.dtype,
                settings.heads, settings.seed)
    impls = {impl.name: impl for impl in settings.impls if impl.model == model}
    inputs = make_inputs(p)
    rows: dict[str, dict] = {}
    prepared: dict[str, Prepared] = {}
    reference = None
    tolerance = TOLERANCE[p.dtype]
    for impl in impls.values():
        if p.dtype not in impl.dtypes:
            rows[impl.name] = _row(impl, p, "skipped",
                                   f"{impl.name} does not support {p.dtype}")
            continue
        try:
            if reference is None:
                reference = reference_outputs(p, inputs, settings.device)
            want, validated_against = reference
            if impl.timer not in timers:
                timers[impl.timer] = _timer_factories()[impl.timer]()
            candidate = impl.build(p, inputs)
            worst, max_err = validate(candidate, want)
        except Unavailable as reason:
            rows[impl.name] = _row(impl, p, "error" if reason.error else "skipped", str(reason))
            continue
        except Exception as error:  # recorded in the row, and the run exits non-zero
            rows[impl.name] = _row(impl, p, "error", _error_text(error))
            continue
        row = _row(impl, p, "ok", max_rel_err=max_err, validated_against=validated_against,
                   timer=timers[impl.timer].method)
        if max_err > tolerance:
            row.update(status="error", note=f"wrong result, not timed: {worst} off by "
                       f"{max_err:.3g} relative (tolerance {tolerance:g} for {p.dtype})")
        else:
            prepared[impl.name] = candidate
        rows[impl.name] = row

    for name, candidate in list(prepared.items()):
        impl = impls[name]
        if impl.peak_method is None:
            continue
        try:
            rows[name].update(peak_mem_bytes=timing.PEAK_METHODS[impl.peak_method](candidate.run),
                              peak_mem_method=impl.peak_method)
        except Exception as error:
            rows[name].update(status="error", note=f"peak memory: {_error_text(error)}")
            del prepared[name]
    return rows, prepared


def fill_rows(rows: dict[str, dict], checked: timing.CheckedSamples, model: str,
              device: str) -> list[dict]:
    """The timing columns of a cell's rows from its checked samples."""
    samples = checked.samples
    for name, times in samples.items():
        stats = timing.summarize(times)
        rows[name].update(stats)
        rows[name]["tflops"] = rows[name]["flops"] / (stats["median_ms"] * 1e-3) / 1e12
        rows[name].update(spread=checked.spreads[name], other_load=checked.other_load,
                          steal=checked.steal, calibration_ms=checked.calibration_ms,
                          host_drift=checked.drift, dropped_rounds=checked.dropped,
                          attempts=checked.attempts, calls_per_sample=checked.batches.get(name, 1),
                          noisy=name in checked.noisy,
                          noise_reason=checked.noisy.get(name))
    base = baseline_name(model, device)
    if base in samples:
        for name, times in samples.items():
            rows[name].update(timing.ratio_columns(times, samples[base]), baseline=base)
    return list(rows.values())


def _cell_timers(settings: Settings, model: str, prepared,
                 timers: dict[str, timing.Timer]) -> dict[str, timing.Timer]:
    kinds = {impl.name: impl.timer for impl in settings.impls if impl.model == model}
    return {name: timers[kinds[name]] for name in prepared}


def _timing_failed(rows: dict[str, dict], names, error: BaseException) -> list[dict]:
    for name in names:
        rows[name].update(status="error", note=f"timing: {_error_text(error)}")
    return list(rows.values())


def run_cell(settings: Settings, model: str, mode: str, T: int,
             timers: dict[str, timing.Timer]) -> list[dict]:
    """Rows of every selected implementation of ``model`` for one (mode, T), as a GPU
    cell is timed (``timing.measure_checked``: timed again at once while a check fails)."""
    rows, prepared = prepare_cell(settings, model, mode, T, timers)
    try:
        checked = timing.measure_checked(
            {name: c.run for name, c in prepared.items()},
            _cell_timers(settings, model, prepared, timers), settings.schedule,
            probe=settings.probe)
    except Exception as error:
        return _timing_failed(rows, prepared, error)
    return fill_rows(rows, checked, model, settings.device)


def cells(settings: Settings) -> list[tuple[str, str, int]]:
    """(model, mode, T) in run order."""
    return [(model, mode, T) for mode in settings.modes
            for model in (*flop_formulas.RECURRENT, "attention")
            for T in settings.seq_lens
            if any(impl.model == model for impl in settings.impls)]


def steps(settings: Settings) -> int:
    """How many times ``run_suite`` calls ``on_cell_done``: once per cell and pass."""
    return len(cells(settings)) * (settings.schedule.passes if settings.device == "cpu" else 1)


def run_suite(settings: Settings, on_cell_done: Callable[[str, str, int, list[dict]], None]
              = lambda *args: None, on_cell_start: Callable[[str, str, int], None]
              = lambda *args: None) -> list[dict]:
    """Every cell in run order: on a GPU each prepared and timed (``run_cell``) before
    the next, on a CPU as ``_run_on_cpu`` says. ``on_cell_start`` and ``on_cell_done``
    are called for every cell in every pass (``steps`` times)."""
    if settings.device == "cpu":
        return _run_on_cpu(settings, on_cell_done, on_cell_start)
    rows: list[dict] = []
    timers: dict[str, timing.Timer] = {}
    for model, mode, T in cells(settings):
        on_cell_start(model, mode, T)
        cell_rows = run_cell(settings, model, mode, T, timers)
        rows.extend(cell_rows)
        on_cell_done(model, mode, T, cell_rows)
    return rows


@dataclass
class _Cell:
    model: str
    mode: str
    T: int
    rows: dict[str, dict]
    calls: dict[str, Callable]
    timers: dict[str, timing.Timer]
    timing: timing.CellTiming
    failed: BaseException | None = None

    def label(self) -> str:
        return f"{self.mode} {self.model} T={self.T} attempt {len(self.timing.attempts) + 1}"


def _run_on_cpu(settings: Settings, on_cell_done, on_cell_start) -> list[dict]:
    """Every cell timed in ``schedule.passes`` passes over the whole run, each pass
    taking its share of the cell's repeats (``Schedule.one_pass``); a round counts only
    when the host ran at its usual speed (the calibration around its samples) and no
    other process took the CPU (``timing.CellTiming``), and each row's figures come from
    the rounds that count, of all passes. Passes, because some slow patches do not show
    in the calibration: on issue 14's VM attention-numpy's training at T=512 (17.5 MiB,
    1634 fresh pages a call) once ran 17.5 ms against 14.7-15.7 ms in seven other runs,
    steadily through its cell, while attention-sdpa in the same rounds and the
    calibration around them did not move; spread over passes seconds apart, such a
    patch meets a minority of a row's rounds. After the last pass, with the host's usual
    speed known from the whole run, every cell that has too few rounds that count, or
    whose rounds spread too much, is timed again (its new rounds added), up to
    ``schedule.retries`` times. The first pass prepares each cell (validation, peak
    memory) before timing it; the prepared calls are kept until the end of the run (on
    a CPU preset, inputs of a few MiB a cell)."""
    schedule, probe, host = settings.schedule, settings.probe or timing.LoadProbe(), settings.host
    if host is not None:
        host.settle()
    timers: dict[str, timing.Timer] = {}
    run: list[_Cell] = []

    def time_cell(cell: _Cell, timed_as: timing.Schedule) -> None:
        try:
            cell.timing.time(cell.calls, cell.timers, timed_as, probe, cell.label())
        except Exception as error:  # recorded in the rows, and the run exits non-zero
            cell.failed = error

    for index in range(schedule.passes):
        for position, (model, mode, T) in enumerate(cells(settings)):
            on_cell_start(model, mode, T)
            if index == 0:
                rows, prepared = prepare_cell(settings, model, mode, T, timers)
                run.append(_Cell(model, mode, T, rows,
                                 {name: c.run for name, c in prepared.items()},
                                 _cell_timers(settings, model, prepared, timers),
                                 timing.CellTiming(schedule.min_repeats, host)))
            cell = run[position]
            if cell.calls and cell.failed is None:
                time_cell(cell, schedule.one_pass(first=index == 0))
            on_cell_done(model, mode, T, list(cell.rows.values()))
    for _ in range(schedule.retries):
        again = [cell for cell in run if cell.calls and cell.failed is None
                 and (cell.timing.short() or cell.timing.noisy())]
        if not again:
            break
        for cell in again:
            time_cell(cell, schedule.retry())
    rows: list[dict] = []
    for cell in run:
        if not cell.calls:
            rows.extend(cell.rows.values())
        elif cell.failed is not None:
            rows.extend(_timing_failed(cell.rows, cell.calls, cell.failed))
        else:
            rows.extend(fill_rows(cell.rows, cell.timing.checked(), cell.model, settings.device))
    return rows
