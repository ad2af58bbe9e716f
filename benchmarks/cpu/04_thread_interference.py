"""Experiment 04: what makes two-thread training slow and noisy, for us and for torch.

    python benchmarks/cpu/04_thread_interference.py               # every configuration, about 4.5 min
    python benchmarks/cpu/04_thread_interference.py --config ours-2 --config torch-2
    python benchmarks/cpu/04_thread_interference.py --phases      # + our training call by phase

Each *configuration* is one fresh interpreter with its own thread variables: a library
alone (``ours-N``, ``torch-N``: the other is never imported), both in one process taking
turns call by call as ``benchmarks/cpu_vs_torch.py`` times them (``paired-N``), and the
same with one environment variable changed (OpenBLAS at one thread; OpenMP's wait
policy). Every implementation is validated against a float64 reference first
(rnnkernels' reference backend where torch must not be loaded, torch in float64
elsewhere), then warmed up and timed call by call in wall time; each row gives the
median and p10/p90 in ms and ``cpu/wall``, the process CPU time per call over its
wall time (1.0: one busy core; near 2.0 at two threads: both cores busy, whether
working or spinning). ``--phases`` times the parts of our training call (the input
projection, the forward loop, the backward loop, the after-loop products, db) by
running, in place of our call, a copy of what ``rnnkernels.cpu.forward``/``backward``
do with a clock between the parts. ``--dw`` picks the after-loop products: ``team``
(what rnnkernels.cpu does: dx and both weight gradients on one Numba thread team,
``_cpu_team``, one phase "dx+dW"), ``team-dxblas`` (the same with dx by the BLAS's
gemm), ``blas1`` (before the team: the weight gradients as NumPy products at one BLAS
thread, side by side on an executor thread, then dx: phases "dW" and "dx"), ``blas``
(before this experiment: dx, then the weight gradients as NumPy products at the
process's BLAS threads).

What was found, and the numbers, are in rnnkernels/cpu.py's docstring ("Threading
policy") and in the report of the branch that added this file. What this experiment led
to first, the weight gradients on our packed kernel (a transposed-A tile blocked over K)
so that no OpenBLAS worker spins, lost afterwards and was deleted: at one thread it was
8-14% slower per LSTM training call than OpenBLAS's sgemm held at one thread (paired,
quiet: 0.86 / 0.92 / 0.96 the ratio of the BLAS's call to the packed kernel's at
128,16,256 / 512,8,128 / 64,64,512), and at two threads the BLAS products side by side,
one per thread, matched it (1.03 / 0.96 / 0.94). The numbers are in cpu.py's docstring.
What the phases showed next (quiet, 2026-12-01, 128,8,128 at two threads, before the
time loops split rows into teams): dW 3.99 ms and dx 1.60 ms with ``--dw blas1``, where
the OpenMP worker left spinning by the persistent backward loop's region held the core
the executor thread wanted; on one team (``--dw team``,
benchmarks/cpu/10_after_loop_team.py compares the whole calls) the two phases take
2.56-2.70 ms together and the whole call 6.44-6.70 ms instead of 9.68-10.16 (two runs
each). With the rows-in-teams loops: dW 3.40 + dx 1.44 ms -> 2.27 ms, the call 7.92 ->
5.19 ms; at 512,8,128 dW 12.51 + dx 5.73 -> 8.90 ms, the call 30.55 -> 19.99 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_CHECKOUT))

from rnnkernels.bench.cli import thread_environment  # noqa: E402 - after the path

SIZES = ((128, 16, 256), (128, 8, 128), (256, 1, 128), (1024, 4, 64))
MODES = ("forward", "training")


def _config(libraries, threads, **extra):
    return {"libraries": libraries, "threads": threads, "env": extra}


# name: (libraries, threads, extra environment). Numba's threads and every BLAS's
# follow ``threads`` unless ``env`` overrides one.
CONFIGS = {
    "ours-1": _config(("ours",), 1),
    "ours-2": _config(("ours",), 2),
    "ours-2-openblas1": _config(("ours",), 2, OPENBLAS_NUM_THREADS="1"),
    "ours-2-passive": _config(("ours",), 2, OMP_WAIT_POLICY="passive"),
    "torch-1": _config(("torch",), 1),
    "torch-2": _config(("torch",), 2),
    "torch-2-passive": _config(("torch",), 2, OMP_WAIT_POLICY="passive"),
    "torch-2-active": _config(("torch",), 2, OMP_WAIT_POLICY="active"),
    "paired-1": _config(("ours", "torch"), 1),
    "paired-2": _config(("ours", "torch"), 2),
    "paired-2-openblas1": _config(("ours", "torch"), 2, OPENBLAS_NUM_THREADS="1"),
    "paired-2-passive": _config(("ours", "torch"), 2, OMP_WAIT_POLICY="passive"),
    "paired-2-spin0": _config(("ours", "torch"), 2, GOMP_SPINCOUNT="0"),
}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=CONFIGS, action="append",
                        help="a configuration; repeat for several (default: all)")
    parser.add_argument("--size", action="append", metavar="T,B,H",
                        help="a size (I = H); repeat for several (default: four of issue 12's)")
    parser.add_argument("--mode", choices=MODES, action="append", help="default: both")
    parser.add_argument("--repeats", type=int, default=25, help="timed calls per library and row")
    parser.add_argument("--phases", action="store_true",
                        help="our training call by phase (a copy of it with a clock between the parts)")
    parser.add_argument("--dw", choices=("team", "team-dxblas", "blas1", "blas"), default="team",
                        help="--phases: the after-loop products on one thread team with dx on the packed "
                             "kernel (what rnnkernels.cpu does) or on the BLAS; the weight gradients with "
                             "NumPy's BLAS held at one thread, side by side, then dx (before the team); or "
                             "dx, then NumPy's products at the process's BLAS threads (before that)")
    parser.add_argument("--json", metavar="PATH", help="also write every row")
    parser.add_argument("--child", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config = args.config or list(CONFIGS)
    args.size = [tuple(int(v) for v in s.split(",")) for s in args.size] if args.size else list(SIZES)
    args.mode = args.mode or list(MODES)
    return args


def _percentiles(values):
    import numpy as np

    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {"median_ms": round(float(median), 3), "p10_ms": round(float(p10), 3), "p90_ms": round(float(p90), 3)}


def _phase_call(a, dw):
    """Our LSTM training call (forward with training=True, then backward), as
    rnnkernels.cpu does it for T > 1, with a clock between its parts: ms per part. The
    after-loop products by ``dw`` (the module docstring): "team" and "team-dxblas" (one
    phase), "blas1" (the weight gradients, then dx) or "blas" (dx, then the weight
    gradients)."""
    import numpy as np

    from rnnkernels import _cpu_blas, _cpu_common, _cpu_gemm, cpu

    marks = [("start", time.perf_counter())]

    def mark(name):
        marks.append((name, time.perf_counter()))

    x, w_ih, w_hh, dy = a["x"], a["w_ih"], a["w_hh"], a["dy"]
    bias = a["b_ih"] + a["b_hh"]
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    loop = _cpu_common.time_loop(batch, hidden, 4, x.dtype)  # as cpu.forward and cpu.backward
    gates = _cpu_common.project(x.reshape(steps * batch, input_size), _cpu_gemm.pack(w_ih.T), 4 * hidden, bias)
    gates = gates.reshape(steps, batch, 4 * hidden)
    mark("projection")
    h = np.empty((steps + 1, batch, hidden), x.dtype)
    c = np.empty((steps + 1, batch, hidden), x.dtype)
    h[0], c[0] = a["h0"], a["c0"]
    packed = _cpu_gemm.pack(w_hh.T)
    z = np.empty((batch, packed.shape[0] * packed.shape[2]), x.dtype)
    if loop == "persistent":
        cpu._PERSISTENT.forward_steps(h, packed, z, (gates, h, c), *_cpu_common.persistent_arguments(batch, packed))
    else:
        cpu._SERIAL.forward_steps(gates, h, c, packed, z)
    mark("forward loop")
    # backward, as cpu.backward
    dz = np.empty((steps, batch, 4 * hidden), x.dtype)
    packed = _cpu_gemm.pack(w_hh)
    dh_next = np.zeros((batch, packed.shape[0] * packed.shape[2]), x.dtype)
    carry = np.zeros((batch, hidden), x.dtype)
    norms = np.empty(steps), np.empty(steps)
    if loop == "persistent":
        row_sq = np.empty((steps, batch, 2))
        state = (dy, gates, c, dz, carry, row_sq)
        cpu._PERSISTENT.backward_steps(dz, packed, dh_next, state, *_cpu_common.persistent_arguments(batch, packed))
        _cpu_common.STEP_NORMS(row_sq, *norms)
    else:
        cpu._SERIAL.backward_steps(dy, gates, c, packed, dz, dh_next, carry, np.empty((batch, 2)), *norms)
    mark("backward loop")
    flat_dz = dz.reshape(steps * batch, 4 * hidden)
    if dw in ("team", "team-dxblas"):  # what rnnkernels.cpu does: one phase, one team
        saved_choice = _cpu_blas.DX_ON_BLAS
        _cpu_blas.DX_ON_BLAS = dw == "team-dxblas"
        try:
            _cpu_blas.backward_products(flat_dz, x.reshape(steps * batch, input_size), flat_dz,
                                        h[:-1].reshape(steps * batch, hidden), w_ih)
        finally:
            _cpu_blas.DX_ON_BLAS = saved_choice
        mark("dx+dW")
    elif dw == "blas1":  # as rnnkernels.cpu did before the team: the weight gradients first
        _cpu_blas.weight_gradients(flat_dz, x.reshape(steps * batch, input_size), flat_dz,
                                   h[:-1].reshape(steps * batch, hidden))
        mark("dW")
        _cpu_common.project(flat_dz, _cpu_gemm.pack(w_ih), input_size)
        mark("dx")
    else:  # as rnnkernels.cpu did before this experiment: NumPy's BLAS
        _cpu_common.project(flat_dz, _cpu_gemm.pack(w_ih), input_size)
        mark("dx")
        flat_dz.T @ x.reshape(steps * batch, input_size)
        flat_dz.T @ h[:-1].reshape(steps * batch, hidden)
        mark("dW")
    flat_dz.sum(axis=0)
    mark("db")
    return {name: (t - marks[i][1]) * 1e3 for i, (name, t) in enumerate(marks[1:])}


def _builds(problem, inputs, libraries):
    """{library: (run, validation error)} for one problem."""
    from rnnkernels.bench import impls

    if "torch" in libraries:
        want, _ = impls.reference_outputs(problem, inputs, "cpu")
    else:  # torch must stay out of this process: rnnkernels' float64 reference
        prepared = impls._ours_build("reference", "cpu")(problem, inputs)
        want = prepared.collect(prepared.run())
    names = {"ours": "rnnkernels-cpu", "torch": "torch-cpu"}
    runs = {}
    for library in libraries:
        prepared = impls.select_impls("cpu", (names[library],))[0].build(problem, inputs)
        worst, error = impls.validate(prepared, want)
        if error > impls.TOLERANCE[problem.dtype]:
            raise SystemExit(f"{library} is wrong at {problem}: {worst} off by {error:.2e}")
        runs[library] = prepared.run
    return runs


def child(args, name):
    config = CONFIGS[name]
    libraries = config["libraries"]
    import numpy as np

    if "torch" in libraries:
        import torch

        torch.set_num_threads(config["threads"])
    from rnnkernels.bench import impls

    rows = []
    for steps, batch, hidden in args.size:
        for mode in args.mode:
            problem = impls.Problem("lstm", mode, steps, batch, hidden, "float32")
            inputs = impls.make_inputs(problem)
            runs = _builds(problem, inputs, libraries)
            per_call = []
            if args.phases and "ours" in libraries and mode == "training":
                # Our call replaced by its copy with a clock between the parts, timed in
                # its place (after torch's call where paired).
                a = {k: np.ascontiguousarray(v, np.float32) for k, v in inputs.items()}
                runs["ours"] = lambda a=a: per_call.append(_phase_call(a, args.dw))
            order = list(libraries)
            for _ in range(3):  # warm-up
                for library in order:
                    runs[library]()
            wall = {library: [] for library in order}
            cpu = {library: [] for library in order}
            for repeat in range(args.repeats):
                # The order alternates, as in cpu_vs_torch.py: each library follows the
                # other as often as it precedes it.
                for library in (order if repeat % 2 == 0 else order[::-1]):
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    runs[library]()
                    wall[library].append((time.perf_counter() - wall0) * 1e3)
                    cpu[library].append((time.process_time() - cpu0) * 1e3)
            for library in order:
                row = {"config": name, "library": library, "T": steps, "B": batch, "H": hidden, "mode": mode,
                       **_percentiles(wall[library]),
                       "cpu_per_wall": round(float(np.sum(cpu[library]) / np.sum(wall[library])), 2)}
                if library == "ours" and per_call:
                    per_call = per_call[-args.repeats:]  # not the warm-up's
                    row["phases_ms"] = {part: round(float(np.median([p[part] for p in per_call])), 3)
                                        for part in per_call[0]}
                    row["phases_p90_ms"] = {part: round(float(np.percentile([p[part] for p in per_call], 90)), 3)
                                            for part in per_call[0]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main(argv=None):
    args = parse(argv)
    if args.child:
        child(args, args.child)
        return 0
    rows = []
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    keep, skip = [], False
    for arg in passed:  # the child gets this command line minus --config and --json
        if skip:
            skip = False
            continue
        if arg in ("--config", "--json"):
            skip = True
            continue
        keep.append(arg)
    print(f"{'config':20} {'lib':6} {'T':>5} {'B':>3} {'H':>4} {'mode':8} {'median':>8} {'p10':>8} {'p90':>8} "
          f"{'cpu/wall':>8}  phases (median ms)")
    for name in args.config:
        config = CONFIGS[name]
        environment = thread_environment(config["threads"])
        environment.update(config["env"])
        command = [sys.executable, os.path.abspath(__file__), *keep, "--child", name]
        with subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True) as process:
            for line in process.stdout:
                row = json.loads(line)
                rows.append(row)
                phases = " ".join(f"{k} {v:.2f}" for k, v in row.get("phases_ms", {}).items())
                print(f"{name:20} {row['library']:6} {row['T']:>5} {row['B']:>3} {row['H']:>4} {row['mode']:8} "
                      f"{row['median_ms']:>8.2f} {row['p10_ms']:>8.2f} {row['p90_ms']:>8.2f} "
                      f"{row['cpu_per_wall']:>8.2f}  {phases}", flush=True)
        if process.returncode != 0:
            raise SystemExit(process.returncode)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"argv": sys.argv, "rows": rows}, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
