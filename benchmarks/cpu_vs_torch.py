"""Paired ratios: rnnkernels' CPU backend against torch.nn.LSTM (oneDNN) on the CPU.

    python benchmarks/cpu_vs_torch.py                        # the table: six sizes x 2 modes x 1, 2 threads
    python benchmarks/cpu_vs_torch.py --threads 1 --size 128,16,256 --mode training --repeats 50

The default run is the table of issue 12 (sizes (T, B, I=H), float32, inference and
training, one and two threads per library); it takes about 4 minutes on the 2-core
machine the project builds on, when that machine is otherwise idle. Each thread
count runs in a fresh interpreter with OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS set (BLAS
pools size themselves at import; torch.set_num_threads is set to the same).

Per size and mode, both implementations are first validated against a float64
reference on the same inputs (PyTorch in float64), warmed up (which also compiles or
loads our Numba code), then each repeat runs ours once and torch once, the order
alternating, and the ratio of that pair (ours / torch) is recorded. The report is the
median (p10, p90) of the per-pair ratios, with the 1-minute load average: on a loaded
machine single rows move by +-20% and more. ``forward`` is inference (training=False,
torch under no_grad); ``training`` is forward with training=True, then backward with
a random dy. Target (issue 12): median <= 1.0 at every size and mode at one thread, the
goal 0.8; at two threads no worse relative to torch than at one. The exit status is 0
whether or not the target is met, 1 if either implementation fails validation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Measure the checkout this script is in, even where another copy of rnnkernels is
# installed (an editable install of another worktree would be imported first).
_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "rnnkernels" / "__init__.py").exists():
    sys.path.insert(0, str(_CHECKOUT))

from rnnkernels.bench import impls, timing
from rnnkernels.bench.cli import provenance, thread_environment, threads_in_effect
from rnnkernels.bench.device_info import device_info, load_average

TARGET = 1.0
# (T, B, I=H) of issue 12.
SIZES = ((128, 16, 256), (128, 8, 128), (512, 8, 128), (64, 64, 512), (256, 1, 128), (1024, 4, 64))
MODES = ("forward", "training")


def _size(text: str) -> tuple[int, int, int]:
    try:
        steps, batch, hidden = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size wants T,B,H (three integers), got {text!r}") from None
    if min(steps, batch, hidden) < 1:
        raise argparse.ArgumentTypeError(f"--size wants positive T,B,H, got {text!r}")
    return steps, batch, hidden


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, action="append", metavar="T,B,H",
                        help="a size (I = H); repeat for several (default: the six of issue 12)")
    parser.add_argument("--mode", choices=MODES, action="append",
                        help="forward (inference) or training; repeat for both (default: both)")
    parser.add_argument("--threads", type=int, action="append", metavar="N",
                        help="threads per library; repeat for several (default: 1 and 2)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved pairs per row")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds per row: more pairs (up to 4x --repeats) while time is left")
    parser.add_argument("--json", metavar="PATH", help="also write every row and its samples")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or list(SIZES)
    args.mode = args.mode or list(MODES)
    args.threads = args.threads or [1, 2]
    if min(args.threads) < 1:
        parser.error("--threads must be >= 1")
    return args


def measure(args, threads: int) -> list[dict]:
    """Every (size, mode) row at ``threads`` threads, in this process (its thread
    variables are already set)."""
    import numba
    import torch

    torch.set_num_threads(threads)
    rows = []
    for steps, batch, hidden in args.size:
        for mode in args.mode:
            problem = impls.Problem("lstm", mode, steps, batch, hidden, args.dtype)
            inputs = impls.make_inputs(problem)
            want, validated_against = impls.reference_outputs(problem, inputs, "cpu")
            calls, errors = {}, {}
            for name in ("rnnkernels-cpu", "torch-cpu"):
                prepared = impls.select_impls("cpu", (name,))[0].build(problem, inputs)
                worst, error = impls.validate(prepared, want)
                errors[name] = {"output": worst, "rel_error": error, "against": validated_against}
                if error > impls.TOLERANCE[args.dtype]:
                    raise SystemExit(f"{name} is wrong at {problem}: {worst} off by {error:.2e}")
                calls[name] = prepared.run
            timer = timing.CpuTimer()
            # Calls under 1 ms are timed several times per sample (timer ticks and interrupts
            # would otherwise set p10/p90).
            schedule = timing.Schedule(warmup=args.warmup, min_repeats=args.repeats,
                                       max_repeats=4 * args.repeats, budget_s=args.budget,
                                       min_sample_s=0.001)
            samples = timing.measure_interleaved(calls, {name: timer for name in calls}, schedule)
            ours, theirs = samples["rnnkernels-cpu"], samples["torch-cpu"]
            row = {
                "rnnkernels": str(Path(impls.__file__).resolve().parents[2]),
                "threads": threads, "T": steps, "B": batch, "I": hidden, "H": hidden, "mode": mode,
                "dtype": args.dtype, "ratio": timing.paired_ratio(ours, theirs),
                "ours": timing.summarize(ours), "torch": timing.summarize(theirs),
                "load": load_average(), "numba_threads": numba.get_num_threads(),
                "torch_threads": torch.get_num_threads(), "validation": errors, "samples_ms": samples,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def run_children(args) -> list[dict]:
    """One fresh interpreter per thread count; their rows, printed as they come."""
    rows = []
    script = os.path.abspath(__file__)
    passed = sys.argv[1:]
    # The child gets this command line minus --threads, plus its own.
    keep, skip = [], False
    for arg in passed:
        if skip:
            skip = False
            continue
        if arg == "--threads":
            skip = True
            continue
        if arg.startswith("--threads="):
            continue
        keep.append(arg)
    print(f"{'thr':>3} {'T':>5} {'B':>3} {'I=H':>4} {'mode':8} {'ours ms':>9} {'torch ms':>9} "
          f"{'ours/torch':>10} {'(p10, p90)':>14} {'load':>5}")
    for threads in args.threads:
        command = [sys.executable, script, *keep, "--threads", str(threads), "--child"]
        with subprocess.Popen(command, env=thread_environment(threads), stdout=subprocess.PIPE,
                              text=True) as child:
            for line in child.stdout:
                row = json.loads(line)
                if not rows:
                    print(f"rnnkernels from {row['rnnkernels']}")
                rows.append(row)
                ratio = row["ratio"]
                print(f"{threads:>3} {row['T']:>5} {row['B']:>3} {row['H']:>4} {row['mode']:8} "
                      f"{row['ours']['median_ms']:>9.2f} {row['torch']['median_ms']:>9.2f} "
                      f"{ratio['median']:>10.2f} ({ratio['p10']:.2f}, {ratio['p90']:.2f})"
                      f"{row['load']:>6}", flush=True)
        if child.returncode != 0:
            raise SystemExit(child.returncode)
    return rows


def summary(rows: list[dict]) -> str:
    worst = max(rows, key=lambda r: r["ratio"]["median"])
    one = [r for r in rows if r["threads"] == 1]
    meets = all(r["ratio"]["median"] <= TARGET for r in one)
    verdict = "meets" if meets else "misses"
    return (f"worst median ratio {worst['ratio']['median']:.2f} ({worst['threads']} thr, "
            f"T={worst['T']} B={worst['B']} H={worst['H']} {worst['mode']}); at one thread the "
            f"table {verdict} the target <= {TARGET}")


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        if len(args.threads) != 1 or not threads_in_effect(args.threads[0]):
            raise SystemExit("--child runs one thread count with its variables set")
        measure(args, args.threads[0])
        return 0
    rows = run_children(args)
    print(summary(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"run": provenance(argv, "python benchmarks/cpu_vs_torch.py"), "device": device_info("cpu"),
                       "config": {k: v for k, v in vars(args).items() if k != "child"},
                       "rows": rows}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
