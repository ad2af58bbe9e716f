"""Paired ratio: rnnkernels' CPU backend against torch.nn.LSTM on the CPU, in one process.

    python benchmarks/cpu_vs_torch.py                    # training, T=128, B=16, I=H=256, float32
    python benchmarks/cpu_vs_torch.py --mode forward --repeats 50

Both are first validated against the float64 reference on the same inputs (PyTorch in
float64). Then each repeat runs ours once and torch once, the order alternating, and the
ratio of that pair is recorded; the report is the median (p10, p90) of the per-pair
ratios ours/torch. The goal is a median ratio <= 1.2 for training (forward with
training=True, then backward with a random dy). The exit status is 0 whether or not the
goal is met, 1 if either implementation fails validation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import rnnkernels.bench  # noqa: F401
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rnnkernels.bench import flops, impls, timing
from rnnkernels.bench.cli import THREAD_VARIABLES, restart_with_threads, threads_in_effect
from rnnkernels.bench.device_info import device_info, load_average

GOAL = 1.2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=flops.MODES, default="training")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256, help="hidden and input size")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, metavar="N",
                        help="threads for PyTorch, Numba and NumPy's BLAS (sets "
                        f"{', '.join(THREAD_VARIABLES)} and restarts; default: as they start)")
    parser.add_argument("--json", metavar="PATH", help="also write the samples and ratio")
    args = parser.parse_args(argv)
    if args.threads and not threads_in_effect(args.threads):
        # Start again with the variables set, so NumPy's BLAS, Numba and PyTorch all use
        # that many threads.
        script_args = sys.argv[1:] if argv is None else list(argv)
        restart_with_threads(args.threads, [os.path.abspath(__file__), *script_args])

    problem = impls.Problem("lstm", args.mode, args.seq_len, args.batch, args.hidden, args.dtype)
    inputs = impls.make_inputs(problem)
    want, validated_against = impls.reference_outputs(problem, inputs, "cpu")
    calls = {}
    for name in ("rnnkernels-cpu", "torch-cpu"):
        impl = impls.select_impls("cpu", (name,))[0]
        prepared = impl.build(problem, inputs)
        worst, error = impls.validate(prepared, want)
        print(f"{name:15} max relative error {error:.2e} ({worst}) "
              f"against {validated_against}")
        if error > impls.TOLERANCE[args.dtype]:
            print(f"{name} is wrong; not timing", file=sys.stderr)
            return 1
        calls[name] = prepared.run

    timer = timing.CpuTimer()
    schedule = timing.Schedule(args.warmup, args.repeats, args.repeats, 0.0)
    samples = timing.measure_interleaved(calls, {name: timer for name in calls}, schedule)
    ours, torch = samples["rnnkernels-cpu"], samples["torch-cpu"]
    ratio = timing.paired_ratio(ours, torch)
    count = flops.lstm_flops(args.mode, args.seq_len, args.batch, args.hidden)
    for name, times in samples.items():
        stats = timing.summarize(times)
        print(f"{name:15} median {stats['median_ms']:8.2f} ms  (p10 {stats['p10_ms']:.2f}, "
              f"p90 {stats['p90_ms']:.2f})  {count / stats['median_ms'] / 1e6:.1f} GFLOP/s")
    print(f"threads: torch {__import__('torch').get_num_threads()}, numba "
          f"{__import__('numba').get_num_threads()}; 1-minute load average {load_average()}")
    verdict = "meets" if ratio["median"] <= GOAL else "misses"
    print(f"ratio ours/torch, {args.mode}, T={args.seq_len} B={args.batch} I=H={args.hidden} "
          f"{args.dtype}: median {ratio['median']:.3f} (p10 {ratio['p10']:.3f}, p90 "
          f"{ratio['p90']:.3f}) over {len(ours)} interleaved pairs; {verdict} the goal "
          f"<= {GOAL}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"device": device_info("cpu"), "config": vars(args), "ratio": ratio,
                       "samples_ms": samples}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
