"""Paired ratios: rnnkernels' CPU backend against torch.nn.LSTM (oneDNN) on the CPU.

    python benchmarks/cpu_vs_torch.py                        # the table: six sizes x 2 modes x 1, 2 threads
    python benchmarks/cpu_vs_torch.py --threads 1 --size 128,16,256 --mode training --repeats 50
    python benchmarks/cpu_vs_torch.py --cell gru --threads 1      # torch.nn.GRU; also rnn_tanh, rnn_relu

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
    parser.add_argument("--cell", choices=("lstm", "gru", "rnn_tanh", "rnn_relu"), default="lstm",
                        help="the cell: ours against torch.nn.LSTM / GRU / RNN (default lstm)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved pairs per row")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds per row: more pairs (up to 4x --repeats) while time is left")
    parser.add_argument("--parallel-min-units", type=int, metavar="N",
                        help="B·H from which a time loop splits over threads (default: "
                             "rnnkernels._cpu_common.PARALLEL_MIN_UNITS); to compare split rules "
                             "at 2 threads, e.g. 4096 against the default")
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

    from rnnkernels import _cpu_common

    torch.set_num_threads(threads)
    if args.parallel_min_units is not None:
        _cpu_common.PARALLEL_MIN_UNITS = args.parallel_min_units
    rows = []
    for steps, batch, hidden in args.size:
        for mode in args.mode:
            problem = impls.Problem("lstm", mode, steps, batch, hidden, args.dtype)
            if args.cell == "lstm":
                inputs = impls.make_inputs(problem)
                want, validated_against = impls.reference_outputs(problem, inputs, "cpu")
                builds = {name: impls.select_impls("cpu", (name,))[0].build for name in ("rnnkernels-cpu", "torch-cpu")}
            else:
                inputs = _cell_inputs(args.cell, problem)
                reference = _cell_builds(args.cell, problem, inputs, "float64")["torch-cpu"]()
                want, validated_against = reference.collect(reference.run()), "torch-float64-cpu"
                builds = {name: (lambda p, i, build=build: build()) for name, build in
                          _cell_builds(args.cell, problem, inputs, args.dtype).items()}
            calls, errors = {}, {}
            for name in ("rnnkernels-cpu", "torch-cpu"):
                prepared = builds[name](problem, inputs)
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
                "cell": args.cell, "threads": threads, "T": steps, "B": batch, "I": hidden, "H": hidden, "mode": mode,
                "dtype": args.dtype, "ratio": timing.paired_ratio(ours, theirs),
                "ours": timing.summarize(ours), "torch": timing.summarize(theirs),
                "load": load_average(), "numba_threads": numba.get_num_threads(),
                "torch_threads": torch.get_num_threads(), "parallel_min_units": _cpu_common.PARALLEL_MIN_UNITS,
                "validation": errors, "samples_ms": samples,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _cell_inputs(cell: str, p) -> dict:
    """float64 inputs for a GRU or Elman RNN layer (I = H, biases, h0; dy in training),
    torch's default scale U(±1/√H)."""
    import numpy as np

    rng = np.random.default_rng([p.seed, p.T, p.B, p.H, impls.MODES.index(p.mode)])
    rows = (3 if cell == "gru" else 1) * p.H
    bound = 1.0 / np.sqrt(p.H)
    inputs = {"w_ih": rng.uniform(-bound, bound, (rows, p.H)), "w_hh": rng.uniform(-bound, bound, (rows, p.H)),
              "b_ih": rng.uniform(-bound, bound, rows), "b_hh": rng.uniform(-bound, bound, rows),
              "h0": 0.5 * rng.standard_normal((p.B, p.H)), "x": rng.standard_normal((p.T, p.B, p.H))}
    if p.mode == "training":
        inputs["dy"] = rng.standard_normal((p.T, p.B, p.H))
    return inputs


def _cell_builds(cell: str, p, inputs: dict, dtype: str) -> dict:
    """{"rnnkernels-cpu": build, "torch-cpu": build} for a GRU / Elman RNN problem, each
    build() -> impls.Prepared whose outputs are y, h_n and, in training, every gradient."""
    import numpy as np
    import torch

    import rnnkernels

    grad_names = ("dx", "dw_ih", "dw_hh", "db_ih", "db_hh", "dh0")
    a = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in inputs.items()}
    args = (a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"])
    if cell == "gru":
        ours_forward, ours_backward, layer = rnnkernels.gru_forward, rnnkernels.gru_backward, torch.nn.GRU
        options = {}
    else:
        ours_forward, ours_backward, layer = rnnkernels.rnn_forward, rnnkernels.rnn_backward, torch.nn.RNN
        options = {"nonlinearity": cell[4:]}

    def ours():
        if p.mode == "training":
            def run():
                out = ours_forward(*args, **options, training=True, backend="cpu")
                return out, ours_backward(out, dy=a["dy"])

            def collect(result):
                out, grads = result
                got = {"y": out.y, "h_n": out.h_n} | {n: getattr(grads, n) for n in grad_names}
                return {k: np.asarray(v, np.float64) for k, v in got.items()}
            return impls.Prepared(run, collect)
        return impls.Prepared(lambda: ours_forward(*args, **options, training=False, backend="cpu"),
                              lambda out: {"y": np.asarray(out.y, np.float64), "h_n": np.asarray(out.h_n, np.float64)})

    def theirs():
        module = layer(p.H, p.H, **options).to(dtype=getattr(torch, dtype))
        t = {k: torch.from_numpy(v) for k, v in a.items()}
        with torch.no_grad():
            for name, value in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"), ("bias_ih_l0", "b_ih"),
                                ("bias_hh_l0", "b_hh")):
                getattr(module, name).copy_(t[value])
        h0 = t["h0"][None]
        if p.mode == "training":
            x = t["x"].clone().requires_grad_(True)
            h0.requires_grad_(True)
            params = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]

            def run():
                y, h_n = module(x, h0)
                return y, h_n, torch.autograd.grad(y, [x, *params, h0], grad_outputs=t["dy"])

            def collect(result):
                y, h_n, grads = result
                got = {"y": y, "h_n": h_n[0]} | dict(zip(grad_names, grads[:-1])) | {"dh0": grads[-1][0]}
                return {k: v.detach().double().numpy() for k, v in got.items()}
            return impls.Prepared(run, collect)

        def run():
            with torch.no_grad():
                return module(t["x"], h0)
        return impls.Prepared(run, lambda r: {"y": r[0].double().numpy(), "h_n": r[1][0].double().numpy()})

    return {"rnnkernels-cpu": ours, "torch-cpu": theirs}


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
                    print(f"rnnkernels from {row['rnnkernels']}, cell {row['cell']}")
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
    head = (f"worst median ratio {worst['ratio']['median']:.2f} ({worst['threads']} thr, "
            f"T={worst['T']} B={worst['B']} H={worst['H']} {worst['mode']}); ")
    if not one:  # all() of nothing would claim the target met
        return head + "no one-thread rows, so no verdict on the target"
    verdict = "meets" if all(r["ratio"]["median"] <= TARGET for r in one) else "misses"
    return head + f"at one thread the table {verdict} the target <= {TARGET}"


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
