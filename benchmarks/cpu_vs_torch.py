"""Paired ratios: rnnkernels' CPU backend against torch.nn.LSTM (oneDNN) on the CPU.

    python benchmarks/cpu_vs_torch.py                        # the table: six sizes x 2 modes x 1, 2 threads
    python benchmarks/cpu_vs_torch.py --threads 1 --size 128,16,256 --mode training --repeats 50
    python benchmarks/cpu_vs_torch.py --cell gru --threads 1      # torch.nn.GRU; also rnn_tanh, rnn_relu
    python benchmarks/cpu_vs_torch.py --processes separate        # each library in its own worker process

The default run is the table of issue 12 (sizes (T, B, I=H), float32, inference and
training, one and two threads per library); it takes about 3 minutes on the 2-core
machine the project builds on, when that machine is otherwise idle. Each thread
count and size runs in a fresh interpreter with OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS set
(BLAS pools size themselves at import; torch.set_num_threads is set to the same): in
one interpreter for all sizes, torch's two-thread rows at the small sizes depended on
the sizes run before them (1024,4,64 inference: 4.0 ms fresh, 10.1 ms after the
others; see ``run_children``).

Cross-library interference. Both libraries run in one process, taking turns, so each
can find the other's idle worker threads still spinning (OpenMP workers wait busy for
a few ms before they sleep; OpenBLAS's for about 100 ms, which is why the cpu backend
no longer calls BLAS in a training call: rnnkernels/cpu.py, "Threading policy").
Measured with benchmarks/cpu/04_thread_interference.py (quiet 2-core VM, 2026-12-01):
before that change, torch's two-thread training calls took 1.9-2.4x as long paired
with ours as alone (36 -> 69 ms at 128,16,256; 7.4 -> 17.6 ms at 128,8,128); since,
0.9-1.1x at the four sizes it runs. ``--processes separate`` runs each library in a
worker process of its own, the two still taking turns call by call through pipes
(each call timed in its worker, so the pipe is not timed): that removes the shared
address space, not the contention for the two cores, and measured it did not help
(2 threads, 256,1,128 and 1024,4,64: the same medians within 0.10, but p10-p90 of the
ratios 0.21-1.20 and 0.37-2.98 where one process gave 0.90-1.07 and 0.80-0.89), so
the default stays one process.

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
import multiprocessing
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
    parser.add_argument("--processes", choices=("shared", "separate"), default="shared",
                        help="shared (default): both libraries in one process; separate: each in a "
                             "worker process of its own, the two taking turns through pipes")
    parser.add_argument("--json", metavar="PATH", help="also write every row and its samples")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or list(SIZES)
    args.mode = args.mode or list(MODES)
    args.threads = args.threads or [1, 2]
    if min(args.threads) < 1:
        parser.error("--threads must be >= 1")
    return args


LIBRARIES = ("rnnkernels-cpu", "torch-cpu")


def measure(args, threads: int) -> list[dict]:
    """Every (size, mode) row at ``threads`` threads, in this process (its thread
    variables are already set), or with ``--processes separate`` in one worker process
    per library (started here, with the same variables)."""
    import numba
    import torch

    from rnnkernels import _cpu_common

    torch.set_num_threads(threads)
    if args.parallel_min_units is not None:
        _cpu_common.PARALLEL_MIN_UNITS = args.parallel_min_units
    workers = {}
    if args.processes == "separate":
        workers = {name: _Worker(name, threads, args.parallel_min_units) for name in LIBRARIES}
    try:
        return _measure_rows(args, threads, workers, numba.get_num_threads(), torch.get_num_threads())
    finally:
        for worker in workers.values():
            worker.close()


def _measure_rows(args, threads, workers, numba_threads, torch_threads):
    from rnnkernels import _cpu_common

    rows = []
    for steps, batch, hidden in args.size:
        for mode in args.mode:
            problem = impls.Problem("lstm", mode, steps, batch, hidden, args.dtype)
            inputs = impls.make_inputs(problem) if args.cell == "lstm" else _cell_inputs(args.cell, problem)
            want, validated_against = _reference(args.cell, problem, inputs)
            calls, timers, errors = {}, {}, {}
            for name in LIBRARIES:
                if workers:
                    worst, error = workers[name].prepare(args.cell, problem, inputs, want)
                    calls[name], timers[name] = workers[name], _WorkerTimer(workers[name])
                else:
                    prepared = _build(args.cell, name, problem, inputs)
                    worst, error = impls.validate(prepared, want)
                    calls[name], timers[name] = prepared.run, timing.CpuTimer()
                errors[name] = {"output": worst, "rel_error": error, "against": validated_against}
                if error > impls.TOLERANCE[args.dtype]:
                    raise SystemExit(f"{name} is wrong at {problem}: {worst} off by {error:.2e}")
            # Calls under 1 ms are timed several times per sample (timer ticks and interrupts
            # would otherwise set p10/p90).
            schedule = timing.Schedule(warmup=args.warmup, min_repeats=args.repeats,
                                       max_repeats=4 * args.repeats, budget_s=args.budget,
                                       min_sample_s=0.001)
            samples = timing.measure_interleaved(calls, timers, schedule)
            ours, theirs = samples["rnnkernels-cpu"], samples["torch-cpu"]
            row = {
                "rnnkernels": str(Path(impls.__file__).resolve().parents[2]),
                "cell": args.cell, "threads": threads, "T": steps, "B": batch, "I": hidden, "H": hidden, "mode": mode,
                "dtype": args.dtype, "ratio": timing.paired_ratio(ours, theirs),
                "ours": timing.summarize(ours), "torch": timing.summarize(theirs),
                "processes": args.processes, "load": load_average(), "numba_threads": numba_threads,
                "torch_threads": torch_threads, "parallel_min_units": _cpu_common.PARALLEL_MIN_UNITS,
                "validation": errors, "samples_ms": samples,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _reference(cell: str, problem, inputs: dict):
    """float64 outputs of the problem (torch in float64 where installed) and their source."""
    if cell == "lstm":
        return impls.reference_outputs(problem, inputs, "cpu")
    reference = _cell_builds(cell, problem, inputs, "float64")["torch-cpu"]()
    return reference.collect(reference.run()), "torch-float64-cpu"


def _build(cell: str, name: str, problem, inputs: dict):
    """impls.Prepared of one library (``LIBRARIES``) for one problem, in the dtype of it."""
    if cell == "lstm":
        return impls.select_impls("cpu", (name,))[0].build(problem, inputs)
    return _cell_builds(cell, problem, inputs, problem.dtype)[name]()


class _Worker:
    """One library in a process of its own (``--processes separate``): called, it has
    the worker run the prepared call once and adds the worker's own perf_counter time of
    it to ``elapsed_ms`` (read by ``_WorkerTimer``), so that the pipe's round trip is
    not timed. Spawned, not forked: a fork would copy this process's thread pools'
    state; the worker imports only its own library (a worker running ours never
    loads torch, nor the torch worker Numba) and inherits this process's thread
    variables."""

    def __init__(self, name: str, threads: int, parallel_min_units: int | None):
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_end, name, threads, parallel_min_units),
                                       daemon=True)
        self.process.start()
        child_end.close()
        self.elapsed_ms = 0.0

    def _ask(self, *message):
        self.connection.send(message)
        status, reply = self.connection.recv()
        if status != "ok":
            raise RuntimeError(f"the worker failed:\n{reply}")
        return reply

    def prepare(self, cell, problem, inputs, want):
        """Build and validate the call: (name of the worst output, its relative error)."""
        return self._ask("prepare", cell, problem, inputs, want)

    def __call__(self):
        self.elapsed_ms += self._ask("run")

    def close(self):
        if self.process.is_alive():
            self.connection.send(("stop",))
        self.process.join(timeout=30)
        self.connection.close()


class _WorkerTimer:
    """``timing.measure_interleaved``'s timer for a ``_Worker``: the worker's own time of
    the calls ``fn`` makes (one, or a batch of them)."""

    method = "perf_counter in the worker process"

    def __init__(self, worker: _Worker):
        self.worker = worker

    def time_ms(self, fn) -> float:
        self.worker.elapsed_ms = 0.0
        fn()
        return self.worker.elapsed_ms


def _serve(connection, name: str, threads: int, parallel_min_units: int | None) -> None:
    """A worker's loop (``_Worker``): ("prepare", cell, problem, inputs, want) builds and
    validates the call, ("run",) times it once, ("stop",) ends. Every reply is ("ok",
    value) or ("error", traceback), which the parent raises."""
    import time
    import traceback

    if name == "torch-cpu":
        import torch

        torch.set_num_threads(threads)
    elif parallel_min_units is not None:
        from rnnkernels import _cpu_common

        _cpu_common.PARALLEL_MIN_UNITS = parallel_min_units
    prepared = None
    while True:
        message = connection.recv()
        try:
            if message[0] == "stop":
                return
            if message[0] == "prepare":
                _, cell, problem, inputs, want = message
                prepared = _build(cell, name, problem, inputs)
                reply = impls.validate(prepared, want)
            else:
                start = time.perf_counter()
                prepared.run()
                reply = (time.perf_counter() - start) * 1e3
        except Exception:  # noqa: BLE001 - sent on: the parent raises it with this traceback
            connection.send(("error", traceback.format_exc()))
            continue
        connection.send(("ok", reply))


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

    import rnnkernels

    grad_names = ("dx", "dw_ih", "dw_hh", "db_ih", "db_hh", "dh0")
    a = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in inputs.items()}
    args = (a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"])
    # torch is imported by theirs() only: a worker process that runs ours never loads it.
    if cell == "gru":
        ours_forward, ours_backward, layer = rnnkernels.gru_forward, rnnkernels.gru_backward, "GRU"
        options = {}
    else:
        ours_forward, ours_backward, layer = rnnkernels.rnn_forward, rnnkernels.rnn_backward, "RNN"
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
        import torch

        module = getattr(torch.nn, layer)(p.H, p.H, **options).to(dtype=getattr(torch, dtype))
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
    """One fresh interpreter per thread count and size; their rows, printed as they
    come. Not one per thread count: in a process that had run the larger sizes first,
    torch's two-thread calls at the small ones were up to 2.5x slower than in a fresh
    one (benchmarks/cpu/04_thread_interference.py; cpu.py's docstring), so a row
    depended on the rows before it."""
    rows = []
    script = os.path.abspath(__file__)
    passed = sys.argv[1:]
    # The child gets this command line minus --threads and --size, plus its own.
    keep, skip = [], False
    for arg in passed:
        if skip:
            skip = False
            continue
        if arg in ("--threads", "--size"):
            skip = True
            continue
        if arg.startswith(("--threads=", "--size=")):
            continue
        keep.append(arg)
    print(f"{'thr':>3} {'T':>5} {'B':>3} {'I=H':>4} {'mode':8} {'ours ms':>9} {'torch ms':>9} "
          f"{'ours/torch':>10} {'(p10, p90)':>14} {'load':>5}")
    for threads, size in ((threads, size) for threads in args.threads for size in args.size):
        command = [sys.executable, script, *keep, "--threads", str(threads), "--size", ",".join(map(str, size)),
                   "--child"]
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
