"""``rnnkernels-bench``: sequential LSTM (or GRU, or RNN: ``--cell``) cost beside a
parallel attention baseline.

    rnnkernels-bench gradient-flow [--steps T] [--json PATH] [--plot PATH] ...

runs the gradient-flow report instead (``rnnkernels/gradient_flow.py``): ‖∂L/∂h_t‖
along the sequence for the Elman RNN, the GRU and the LSTM under several initializations;

    rnnkernels-bench stability [--runs-dir DIR] ...

runs ``--quick`` twice back to back and says whether the figures are stable
(``rnnkernels/bench/stability.py``). ``SUBCOMMANDS`` lists them all for ``--help``.

    rnnkernels-bench [--quick | --full] [--cell lstm|gru|rnn] [--device auto|cpu|cuda]
                     [--mode forward|training|decode|all] [--seq-lens 64,256,...]
                     [--batch B] [--hidden H] [--dtype float32|bfloat16|float16|float64]
                     [--json PATH] [--csv PATH] [--plot PATH]

Presets (``--quick``, the default, ``--full``) pick lengths, sizes and repeat counts per
device; ``--seq-lens``, ``--batch``, ``--hidden`` and ``--repeats`` override them.

Exit status: 0 when every implementation that could run validated and was timed
(implementations that cannot run here, e.g. without PyTorch or for an unsupported
dtype, are "skipped" rows); 1 when any row is an "error" (a wrong result or a failure);
2 for a usage error (bad arguments, ``--device cuda`` without a GPU, ``--plot`` without
matplotlib).

Output: a console table (with ``rich`` when installed, plain text otherwise: ``rich`` is
in the ``bench`` extra and only makes it prettier), a progress display on stderr, and
the rows as JSON and CSV and the plot, written to ``./rnnkernels-results/`` unless
``--json``/``--csv``/``--plot`` or ``--out-dir`` say otherwise (``--no-save``: none).

Threads: on a machine with at most ``SMALL_MACHINE_CORES`` cores, and unless ``--threads``
or the environment's thread variables say otherwise, every library (PyTorch, Numba, the
BLAS under NumPy) gets one thread: their pools, each as wide as the machine, otherwise
spin against each other and against the implementation timed next to them, and the
figures moved by 10-100x between two runs on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import NoReturn

from . import impls as impl_registry
from . import plot as plotting
from .device_info import device_info, gpu_present, load_average
from .flops import MODES
from .runner import ROW_DOCS, ROW_FIELDS, Settings, run_suite, steps
from .timing import DRIFT_LIMIT, LOAD_LIMIT, NOISE_LIMIT, Schedule


@dataclass(frozen=True)
class Preset:
    seq_lens: tuple[int, ...]
    batch: int
    hidden: int
    schedule: Schedule


PRESETS = {
    # --quick on a CPU finishes in 15-40 s on issue 14's 2-core VM, Numba compilation
    # included (the longer the more of the run the host spends slow: rounds it slowed
    # are timed again); the default takes a few minutes; --full tens of minutes. CPU warm-up is
    # 3 rounds and at least 0.1-0.3 s (clock ramp-up, caches); at least 15 repeats so that
    # p10 and p90 are not single samples; a call under 1 ms is repeated within a sample
    # until the sample lasts 1 ms (interrupts and timer ticks otherwise dominate a 40 us
    # decode step). CPU cells are timed in 3 passes over the run, each a third of the
    # repeats; a round counts only when the host ran at its usual speed and no other
    # process took the CPU; a cell with too few rounds that count, or too spread, is
    # timed again at the end of the run, up to twice (runner._run_on_cpu).
    ("cpu", "quick"): Preset((32, 128, 512), 4, 64, Schedule(3, 15, 60, 0.25, 0.1, 2, 0.001, 3)),
    ("cpu", "default"): Preset((32, 64, 128, 256, 512, 1024), 8, 128,
                               Schedule(3, 15, 100, 0.5, 0.2, 2, 0.001, 3)),
    ("cpu", "full"): Preset((32, 64, 128, 256, 512, 1024, 2048), 16, 256,
                            Schedule(3, 20, 200, 1.5, 0.3, 2, 0.001, 3)),
    ("cuda", "quick"): Preset((128, 512, 2048), 8, 256, Schedule(5, 20, 100, 0.3, 0.1, 1)),
    # GPU default: the LSTM runs one launch per step, and a step at B=16, H=512 is
    # latency-bound (an estimate from the PTX, not yet measured: 20 to 150 us), so a
    # T=4096 training call may take 1-2 s. 10 repeats (3 warm-ups) keep the whole
    # preset within ~4 minutes; short calls still get up to 200 within 1 s.
    ("cuda", "default"): Preset((64, 128, 256, 512, 1024, 2048, 4096), 16, 512,
                                Schedule(3, 10, 200, 1.0, 0.1, 1)),
    ("cuda", "full"): Preset((64, 128, 256, 512, 1024, 2048, 4096, 8192), 16, 512,
                             Schedule(10, 50, 500, 1.0, 0.2, 1)),
}

SUBCOMMANDS = {
    "(none)": "time the LSTM (or --cell gru, rnn) implementations beside causal attention "
              "(the options below)",
    "gradient-flow": "how much gradient reaches step 0 of a long sequence, per "
                     "initialization (rnnkernels-bench gradient-flow --help)",
    "stability": "run --quick twice back to back and say whether the figures agree "
                 "(rnnkernels-bench stability --help)",
}

DEFAULT_OUT_DIR = "rnnkernels-results"


class UsageError(Exception):
    pass


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(sorted(set(values)))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnkernels-bench",
        usage="rnnkernels-bench [gradient-flow | stability] [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Time an LSTM, GRU or RNN (--cell; rnnkernels, the vendor baseline and peers) beside one causal "
            "attention layer (d_model = H) for training, inference over a sequence and "
            "token-by-token decoding, across sequence lengths. Every implementation is "
            "checked against a float64 reference before it is timed.", 88)
        + "\n\nsubcommands:\n"
        + "\n".join(f"  {name:15} {text}" for name, text in SUBCOMMANDS.items()),
        epilog=columns_help())
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few lengths, small sizes (<1 min on a 2-core CPU)")
    size.add_argument("--full", action="store_true", help="more lengths, larger sizes, more repeats")
    parser.add_argument("--cell", choices=impl_registry.RECURRENT, default="lstm",
                        help="the recurrent cell timed against attention: lstm (default), gru, "
                        "or rnn (the tanh Elman RNN); torch.nn's module of that cell is the baseline")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a GPU where one is usable, else the CPU")
    parser.add_argument("--mode", choices=(*MODES, "all"), default="all")
    parser.add_argument("--seq-lens", type=_positive_ints, metavar="T1,T2,...",
                        help="sequence (decode: context) lengths")
    parser.add_argument("--batch", type=_positive_int, metavar="B")
    parser.add_argument("--hidden", type=_positive_int, metavar="H",
                        help="the recurrent cell's hidden and input size; attention d_model")
    parser.add_argument("--heads", type=_positive_int, default=1,
                        help="attention heads (default 1; H must divide by it)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"),
                        default="float32")
    parser.add_argument("--repeats", type=_positive_int, metavar="N",
                        help="at least N timed repeats per implementation")
    parser.add_argument("--retries", type=int, metavar="N",
                        help="times a cell failing the noise, load or host-drift check is timed again "
                        "(default 2 on a CPU, 1 on a GPU; 0: flag at once)")
    parser.add_argument("--impls", metavar="NAME,...",
                        help="implementations to run (default: all for the device; "
                        "'reference' is opt-in on the CPU)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="CPU threads for PyTorch, Numba and NumPy's BLAS alike (sets "
                        "OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS and restarts the command). "
                        f"Default: 1 on machines with at most {SMALL_MACHINE_CORES} cores "
                        "(steady figures), else each library's own default; thread "
                        "variables already set in the environment are respected")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", metavar="DIR", default=DEFAULT_OUT_DIR,
                        help="where the JSON, CSV and plot go unless a path is given for "
                        f"each (default ./{DEFAULT_OUT_DIR}/, as bench-DEVICE-PRESET.*)")
    parser.add_argument("--json", metavar="PATH", help="write device, config and rows as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib; "
                        "by default drawn when matplotlib is installed)")
    parser.add_argument("--no-save", action="store_true",
                        help="write no files, only the table (paths given explicitly still "
                        "are written)")
    return parser


def columns_help() -> str:
    """The definitions of the ratio and trust columns, for --help and the table."""
    lines = ["columns:",
             "  ratio           ratio of medians: median ms / the baseline's median ms in "
             "the same cell (below 1: faster than the baseline)",
             "  paired p10-p90  10th-90th percentile of the per-repeat ratios "
             "time[r] / baseline[r], each pair run back to back",
             f"  p90/p10         spread of one row's times; above {NOISE_LIMIT:g}, the cell is "
             "timed again (CPU: the new rounds added);",
             "                  CPU: a repeat round counts only when a calibration workload "
             f"timed in it ran within {100 * DRIFT_LIMIT:.0f}% of the host's usual",
             f"                  speed and other processes took under {100 * LOAD_LIMIT:.0f}% "
             "of the CPU; a cell with too few such rounds is timed again at the end;",
             "                  a row that still fails a check is flagged 'noisy' (table, "
             "JSON, plot) and no crossover is drawn from it",
             "  (CPU: each cell is timed in 3 passes over the run; its figures are from the "
             "rounds kept of all of them)"]
    return "\n".join(lines)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")
SMALL_MACHINE_CORES = 4
POLICY_VARIABLE = "RNNKERNELS_BENCH_THREAD_POLICY"  # the reason, handed to the restart


def thread_policy(requested: int | None, cpu_count: int | None,
                  environ=None) -> tuple[int | None, str]:
    """The threads to give every library, and why: ``--threads`` when given; else none
    (leave them) when the environment already sets a thread variable; else 1 on a
    machine of at most ``SMALL_MACHINE_CORES`` cores; else none (each library's default)."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        return requested, f"--threads {requested}"
    if environ.get(POLICY_VARIABLE):  # this process is the restart the policy asked for
        return int(environ["OMP_NUM_THREADS"]), environ[POLICY_VARIABLE]
    already = [name for name in THREAD_VARIABLES if environ.get(name)]
    if already:
        return None, "as the environment sets " + ", ".join(
            f"{name}={environ[name]}" for name in already)
    cores = cpu_count or 1
    if cores <= SMALL_MACHINE_CORES:
        return 1, (f"1 thread per library (PyTorch, Numba, BLAS): the default on a "
                   f"{cores}-core machine")
    return None, f"each library's default on a {cores}-core machine"


def thread_environment(threads: int) -> dict[str, str]:
    """``os.environ`` with every variable of ``THREAD_VARIABLES`` set to ``threads``."""
    return {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads))}


def threads_in_effect(threads: int | None) -> bool:
    """Whether this process already runs with ``threads`` threads (or none were asked)."""
    return threads is None or all(os.environ.get(v) == str(threads) for v in THREAD_VARIABLES)


def restart_with_threads(threads: int, command: list[str], reason: str | None = None) -> NoReturn:
    """Replace this process by ``python *command`` with the thread variables set. BLAS
    pools size themselves when NumPy loads, so setting them later does nothing; the new
    process finds them set (check :func:`threads_in_effect` first, or it loops).
    ``reason``, the thread policy's, is passed on so that the new process reports it."""
    sys.stdout.flush()
    environment = thread_environment(threads)
    if reason:
        environment[POLICY_VARIABLE] = reason
    os.execve(sys.executable, [sys.executable, *command], environment)


def apply_threads(threads: int | None, argv, explicit: bool = True,
                  reason: str | None = None) -> bool:
    """Make every thread pool use ``threads`` threads: the command starts again with the
    variables set (once: the new process finds them set). Called with an explicit
    ``argv`` (from Python, not the shell), it cannot restart: for an ``explicit``
    --threads it asks for the variables, for the default policy it leaves the pools as
    they are. Returns whether the pools run with ``threads``."""
    if threads_in_effect(threads):
        return True
    if argv is not None and not explicit:
        return False
    if argv is not None:
        raise UsageError(f"--threads from Python needs {', '.join(THREAD_VARIABLES)} set to "
                         f"{threads} before NumPy is imported")
    restart_with_threads(threads, ["-m", "rnnkernels.bench", *sys.argv[1:]],
                         None if explicit else reason)


def resolve_device(requested: str, option: str = "--device") -> str:
    """"cpu" or "cuda" for ``requested`` ("auto", "cpu" or "cuda"); a UsageError naming
    ``option`` when "cuda" is asked for and no GPU is usable."""
    present, why = gpu_present()
    if requested == "cuda" and not present:
        raise UsageError(f"{option} cuda, but no GPU is usable here: {why}")
    if requested == "auto":
        return "cuda" if present else "cpu"
    return requested


def preset_name(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "full" if args.full else "default"


def make_settings(args: argparse.Namespace, device: str) -> Settings:
    preset = PRESETS[(device, preset_name(args))]
    schedule = preset.schedule
    if args.repeats:
        schedule = dataclasses.replace(schedule, min_repeats=args.repeats,
                                       max_repeats=max(args.repeats, schedule.max_repeats))
    if args.retries is not None:
        if args.retries < 0:
            raise UsageError(f"--retries must be 0 or more, got {args.retries}")
        schedule = dataclasses.replace(schedule, retries=args.retries)
    hidden = args.hidden or preset.hidden
    if hidden % args.heads:
        raise UsageError(f"--hidden {hidden} is not divisible by --heads {args.heads}")
    names = None if args.impls is None else tuple(
        name.strip() for name in args.impls.split(",") if name.strip())
    try:
        selected = impl_registry.select_impls(device, names, args.cell)
    except ValueError as error:
        raise UsageError(str(error)) from error
    return Settings(device=device, modes=MODES if args.mode == "all" else (args.mode,),
                    seq_lens=args.seq_lens or preset.seq_lens, batch=args.batch or preset.batch,
                    hidden=hidden, dtype=args.dtype, heads=args.heads, schedule=schedule,
                    impls=selected, seed=args.seed)


def config_dict(settings: Settings, preset: str) -> dict:
    cell = next((impl.model for impl in settings.impls if impl.model != "attention"), None)
    return {
        "preset": preset, "device": settings.device, "modes": list(settings.modes),
        "cell": cell, "cell_name": impl_registry.CELLS.get(cell),
        "seq_lens": list(settings.seq_lens), "batch": settings.batch,
        "hidden": settings.hidden, "input_size": settings.hidden, "dtype": settings.dtype,
        "attention_heads": settings.heads, "seed": settings.seed,
        "impls": [impl.name for impl in settings.impls],
        "thread_variables": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "schedule": vars(settings.schedule),
        "flops": "matmul FLOPs, formulas in rnnkernels/bench/flops.py",
    }


# --- output -----------------------------------------------------------------------------

def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "ms":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if kind == "tflops":
        return f"{value:.3f}" if value < 1 else f"{value:.2f}"
    if kind == "bytes":
        return f"{value / 2**20:.1f}"
    if kind == "ratio":
        return f"{value:.2f}x"
    return str(value)


TABLE_COLUMNS = (("mode", "mode", ""), ("model", "model", ""), ("impl", "impl", ""),
                 ("T", "T", ""), ("median ms", "median_ms", "ms"), ("p10 ms", "p10_ms", "ms"),
                 ("p90 ms", "p90_ms", "ms"), ("p90/p10", "spread", "spread"),
                 ("TFLOP/s", "tflops", "tflops"), ("peak MiB", "peak_mem_bytes", "bytes"),
                 ("ratio", "ratio_to_baseline", "ratio"),
                 ("paired p10-p90", "ratio_p10", "ratio_range"), ("status", "status", "status"))


def table_cells(row: dict) -> list[str]:
    cells = []
    for _, key, kind in TABLE_COLUMNS:
        if kind == "ratio_range":
            cells.append("-" if row["ratio_p10"] is None else
                         f"{row['ratio_p10']:.2f}-{row['ratio_p90']:.2f}")
        elif kind == "spread":
            cells.append("-" if row["spread"] is None else f"{row['spread']:.2f}")
        elif kind == "status":
            # A flagged row ran and validated but is not to be trusted: say only that.
            cells.append("noisy" if row.get("noisy") and row["status"] == "ok" else row["status"])
        else:
            cells.append(_fmt(row[key], kind))
    return cells


def print_table(rows: list[dict], title: str, out=None) -> None:
    out = out or sys.stdout
    notes: dict[tuple[str, str], list[str]] = {}  # (impl, note) -> where it happened
    for row in rows:
        if row["status"] != "ok" and row["note"]:
            notes.setdefault((row["impl"], row["note"]), []).append(f"{row['mode']} T={row['T']}")
        if row.get("noisy"):
            notes.setdefault((row["impl"], "noisy: " + row["noise_reason"]), []).append(
                f"{row['mode']} T={row['T']}")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        lines = [[header for header, _, _ in TABLE_COLUMNS]] + [table_cells(row) for row in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_COLUMNS))]
        print(title, file=out)
        print(columns_help(), file=out)
        for line in lines:
            print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)), file=out)
    else:
        # wide enough for every column and implementation name (no "rnnkernel…"), even
        # when the output is piped (rich then assumes 80 columns)
        console = Console(file=out, width=max(165, Console(file=out).width))
        console.print(title, highlight=False)
        console.print(columns_help(), highlight=False, markup=False)
        table = Table()
        for header, _, kind in TABLE_COLUMNS:
            table.add_column(header, justify="left" if kind in ("", "status") and header != "T"
                             else "right")
        previous = None
        for row in rows:
            if previous is not None and (row["mode"], row["model"]) != previous:
                table.add_section()
            previous = (row["mode"], row["model"])
            style = {"error": "bold red", "skipped": "dim"}.get(row["status"])
            if row.get("noisy"):
                style = "yellow"
            table.add_row(*table_cells(row), style=style)
        console.print(table)
    for impls, where, note in grouped_notes(notes):
        print(f"  {', '.join(impls)} ({', '.join(where)}): {note}", file=out)


def grouped_notes(notes: dict[tuple[str, str], list[str]]) -> list[tuple[list[str], list[str], str]]:
    """The table's notes, one line per note and the cells it happened in: the
    implementations of one cell share its noise reason (the host drifted under all of
    them), so a line per implementation would repeat it. ``notes`` maps (impl, note)
    to the cells ("forward T=512"); returns (impls, cells, note), in first-seen order."""
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (impl, note), where in notes.items():
        grouped.setdefault((note, tuple(where)), []).append(impl)
    return [(impls, list(where), note) for (note, where), impls in grouped.items()]


class Progress:
    """A progress bar on stderr (rich), or one line per finished cell without rich."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn)
        except ImportError:
            self._rich = None
        else:
            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=Console(stderr=True), transient=True)
            self._task = self._rich.add_task("starting", total=total)

    def __enter__(self):
        if self._rich:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc):
        if self._rich:
            self._rich.__exit__(*exc)

    def start(self, model, mode, T):
        if self._rich:
            self._rich.update(self._task, description=f"{mode:8} {model:9} T={T}")

    def finish(self, model, mode, T, rows):
        self.done += 1
        if self._rich:
            self._rich.advance(self._task)
        else:
            print(f"[{self.done}/{self.total}] {mode} {model} T={T}", file=sys.stderr, flush=True)


def provenance(argv, program: str = "rnnkernels-bench") -> dict:
    """What made these numbers: the command line (``program`` and its arguments), the
    UTC date, and the git commit of the rnnkernels source (outside a git checkout,
    $GIT_COMMIT if set, else None; ``dirty`` when a checkout has uncommitted changes,
    None when unknown). The benchmark scripts in benchmarks/ record it too."""
    words = sys.argv[1:] if argv is None else list(argv)
    source = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            done = subprocess.run(["git", "-C", source, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    if commit is None and os.environ.get("GIT_COMMIT"):
        # A copy of the tree without .git (a GPU machine's): the commit it was made
        # from, as the caller says (benchmarks/gpu_session.sh passes it on).
        commit = os.environ["GIT_COMMIT"]
    return {
        "command": shlex.join([*shlex.split(program), *words]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
    }


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, allow_nan=False)
        file.write("\n")


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=ROW_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row[key] is None else row[key] for key in ROW_FIELDS})


def _json_safe(rows: list[dict]) -> list[dict]:
    """Infinite or NaN numbers (e.g. an error of inf) become null: JSON has no inf."""
    def clean(value):
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            return None
        return value
    return [{key: clean(value) for key, value in row.items()} for row in rows]


def output_paths(args: argparse.Namespace, device: str) -> dict[str, str | None]:
    """Where the JSON, CSV and plot go: the paths given, else ``--out-dir`` with names
    from the device and preset (no plot there without matplotlib), none with --no-save."""
    paths = {"json": args.json, "csv": args.csv, "plot": args.plot}
    if args.no_save:
        return paths
    cell = "" if args.cell == "lstm" else f"-{args.cell}"  # the LSTM's names as before
    stem = os.path.join(args.out_dir, f"bench-{device}-{preset_name(args)}{cell}")
    try:
        plotting.require_matplotlib()
        can_plot = True
    except RuntimeError:
        can_plot = False
    defaults = {"json": stem + ".json", "csv": stem + ".csv",
                "plot": stem + ".png" if can_plot else None}
    return {kind: path or defaults[kind] for kind, path in paths.items()}


def noise_summary(rows: list[dict]) -> str | None:
    """One paragraph on rows flagged noisy, or None when every timed row passed."""
    timed = [row for row in rows if row["status"] == "ok"]
    noisy = [row for row in timed if row.get("noisy")]
    if not noisy:
        return None
    loads = [row["other_load"] for row in timed if row.get("other_load") is not None]
    worst = (f"; other processes took up to {100 * max(loads):.0f}% of the CPU"
             if loads and max(loads) >= 0.01 else "")
    if any("host drift" in (row.get("noise_reason") or "") for row in noisy):
        worst += (f"; the host ran over {100 * DRIFT_LIMIT:.0f}% slower than its usual speed "
                  "through all the tries of some cells")
    return (f"warning: {len(noisy)} of {len(timed)} timed rows are flagged noisy{worst}. "
            "Their figures are not to be trusted and no crossover is drawn from them: "
            "rerun on a quiet machine (`rnnkernels-bench stability` checks two runs).")


def main(argv=None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] == "gradient-flow":
        from ..gradient_flow import main as gradient_flow_main

        return gradient_flow_main(words[1:], prog="rnnkernels-bench gradient-flow")
    if words and words[0] == "stability":
        from .stability import main as stability_main

        return stability_main(words[1:], prog="rnnkernels-bench stability")
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    threads, thread_reason = thread_policy(args.threads, os.cpu_count())
    try:
        if not apply_threads(threads, argv, explicit=args.threads is not None,
                             reason=thread_reason):
            thread_reason += " (not applied: called from Python, libraries keep their pools)"
        if args.plot:
            plotting.require_matplotlib()
        device = resolve_device(args.device)
        settings = make_settings(args, device)
    except (UsageError, RuntimeError) as error:
        print(f"rnnkernels-bench: error: {error}", file=sys.stderr)
        return 2
    paths = output_paths(args, device)
    info = device_info(device)
    load_before = load_average()
    with Progress(steps(settings)) as progress:
        rows = run_suite(settings, on_cell_done=progress.finish, on_cell_start=progress.start)
    rows = _json_safe(rows)
    elapsed = time.perf_counter() - started
    data = {"run": provenance(argv), "device": info,
            "config": {**config_dict(settings, preset_name(args)),
                       "thread_policy": thread_reason,
                       "noise_limit_p90_p10": NOISE_LIMIT, "load_limit": LOAD_LIMIT,
                       "wall_seconds": round(elapsed, 2),
                       "load_average_1m": [load_before, load_average()],
                       "calibration": settings.host.summary() if settings.host else None},
            "columns": ROW_DOCS,
            "results": rows}
    title = (f"rnnkernels-bench --cell {args.cell} on {info['name']} ({device}) — B={settings.batch}, "
             f"H={settings.hidden}, {settings.dtype}, {elapsed:.1f} s; threads: {thread_reason}")
    print_table(rows, title)
    warning = noise_summary(rows)
    if warning:
        print(textwrap.fill(warning, 100), file=sys.stderr)
    for kind, path in paths.items():
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if paths["json"]:
        write_json(paths["json"], data)
    if paths["csv"]:
        write_csv(paths["csv"], rows)
    if paths["plot"]:
        try:
            plotting.plot_results(data, paths["plot"])
        except ValueError as error:
            print(f"rnnkernels-bench: cannot plot: {error}", file=sys.stderr)
            return 1
    written = [path for path in paths.values() if path]
    if written:
        print("wrote " + ", ".join(written))
    errors = [row for row in rows if row["status"] == "error"]
    if errors:
        print(f"rnnkernels-bench: {len(errors)} implementation(s) failed validation or "
              "could not run; see the status column and notes above", file=sys.stderr)
        return 1
    if not any(row["status"] == "ok" for row in rows):
        print("rnnkernels-bench: nothing could run with these settings", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
