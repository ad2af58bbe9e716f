"""One benchmark run: for every (mode, model, T), validate each implementation against
the float64 reference, measure its peak memory on one call, then time all that passed,
interleaved, with the noise and load checks (``timing.measure_checked``). Produces the
result rows; ``ROW_DOCS`` says what the timing columns mean (the JSON carries it)."""

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
    "other_load", "steal", "calibration_ms", "host_drift", "attempts", "noisy", "noise_reason",
    "note",
)
ROW_DOCS = {
    "median_ms": "median time per call over the timed repeats, after warm-up",
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
                  "was timed (/proc/stat minus our own CPU time); above "
                  f"{timing.LOAD_LIMIT:g} the row is flagged noisy",
    "steal": "fraction of the machine's CPU time the hypervisor gave to other guests while "
             "the cell was timed (/proc/stat's steal; part of other_load)",
    "calibration_ms": "median time of the fixed calibration workload "
                      "(config.calibration.workload), timed once per repeat round of the "
                      "cell in the rotation with the implementations (CPU only)",
    "host_drift": "calibration_ms / the run's median calibration - 1: how much slower "
                  "(above 0) or faster the host was while this cell ran; more than "
                  f"{timing.DRIFT_LIMIT:g} either way and the cell is timed again, and a "
                  "row still that far off after the run is flagged noisy. median_ms is "
                  "never corrected by it",
    "attempts": "how many times the cell was timed (a failed noise, load or drift check times it "
                "again; the calmest attempt is kept)",
    "noisy": "true when the kept attempt still failed a check: do not trust this row's "
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


def run_cell(settings: Settings, model: str, mode: str, T: int,
             timers: dict[str, timing.Timer]) -> list[dict]:
    """Rows of every selected implementation of ``model`` for one (mode, T)."""
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

    try:
        checked = timing.measure_checked(
            {name: c.run for name, c in prepared.items()},
            {name: timers[impls[name].timer] for name in prepared},
            settings.schedule, probe=settings.probe,
            # GPU rows are timed by CUDA events: the CPU's speed is not what they measure
            host=settings.host if settings.device == "cpu" else None,
            label=f"{mode} {model} T={T}")
    except Exception as error:
        for name in prepared:
            rows[name].update(status="error", note=f"timing: {_error_text(error)}")
        return list(rows.values())

    samples = checked.samples
    for name, times in samples.items():
        stats = timing.summarize(times)
        rows[name].update(stats)
        rows[name]["tflops"] = rows[name]["flops"] / (stats["median_ms"] * 1e-3) / 1e12
        rows[name].update(spread=checked.spreads[name], other_load=checked.other_load,
                          steal=checked.steal, calibration_ms=checked.calibration_ms,
                          host_drift=checked.drift,
                          attempts=checked.attempts, calls_per_sample=checked.batches.get(name, 1),
                          noisy=name in checked.noisy,
                          noise_reason=checked.noisy.get(name))

    base = baseline_name(model, settings.device)
    if base in samples:
        for name, times in samples.items():
            rows[name].update(timing.ratio_columns(times, samples[base]), baseline=base)
    return list(rows.values())


def cells(settings: Settings) -> list[tuple[str, str, int]]:
    """(model, mode, T) in run order."""
    return [(model, mode, T) for mode in settings.modes
            for model in (*flop_formulas.RECURRENT, "attention")
            for T in settings.seq_lens
            if any(impl.model == model for impl in settings.impls)]


def flag_host_drift(rows: list[dict], host: timing.HostDrift) -> None:
    """After the run: each timed row's drift against the run's median calibration, and
    its drift flag set anew from it. During the run a cell was judged against the cells
    before it, a reference of a few readings, to decide whether to time it again; the
    flag is decided here, against the whole run. A row is not timed again after the run
    (its cell is long gone): it is flagged, and its median kept as measured."""
    if host.reference_ms() is None:
        return
    for row in rows:
        if row["status"] != "ok" or row.get("calibration_ms") is None:
            continue
        row["host_drift"] = drift = host.drift(row["calibration_ms"])
        reasons = [reason for reason in (row["noise_reason"] or "").split("; ")
                   if reason and not reason.startswith("host drift")]
        if host.drifted(row["calibration_ms"]):
            reasons.append(timing.drift_reason(drift))
        row.update(noisy=bool(reasons), noise_reason="; ".join(reasons) or None)


def run_suite(settings: Settings, on_cell_done: Callable[[str, str, int, list[dict]], None]
              = lambda *args: None, on_cell_start: Callable[[str, str, int], None]
              = lambda *args: None) -> list[dict]:
    """Every cell in run order; then, with a drift check, the rows flagged whose host ran
    at another speed than the run's median (``flag_host_drift``)."""
    rows: list[dict] = []
    timers: dict[str, timing.Timer] = {}
    for model, mode, T in cells(settings):
        on_cell_start(model, mode, T)
        cell_rows = run_cell(settings, model, mode, T, timers)
        rows.extend(cell_rows)
        on_cell_done(model, mode, T, cell_rows)
    if settings.host is not None:
        flag_host_drift(rows, settings.host)
    return rows
