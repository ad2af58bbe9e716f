"""Experiment 05: the time loop at two threads: serial, a fork per step, or persistent.

    NUMBA_NUM_THREADS=2 python benchmarks/cpu/05_persistent_loop.py
    NUMBA_NUM_THREADS=2 python benchmarks/cpu/05_persistent_loop.py --size 128,8,128 --mode training
    NUMBA_NUM_THREADS=2 python benchmarks/cpu/05_persistent_loop.py --mode training --loops \
        --config 1,1,0,0 --config 1,1,0,2 --baseline persistent/1,1,0,0

LSTM (``--cell gru`` / ``rnn``: the GRU, the tanh RNN), float32, I = H, our cpu
backend only, in one process; per size and mode, the time loops below run interleaved
(each repeat runs each once, in a rotating order), and the report is the median (p10,
p90) of each loop's time over the serial loop's (``--baseline``: another loop's) in
the same repeat (lower is better); ``--loops`` adds the forward and backward time
loops' own times, ratios paired the same way:

* ``serial``: the serial variant (one thread);
* ``parallel`` (in the results below only: removed with this experiment): the
  per-step parallel variant it replaced: per step, one fork and join for the product
  (panel groups over the threads) and one for the cell (rows);
* ``persistent/R,G,W[,M]``: ``_cpu_common``'s persistent loop (one parallel region
  per call, work claimed chunk by chunk, ``_cpu_sync``), with about R cell chunks
  (blocks of rows) and G product chunks (runs of panels) per worker and step, W
  workers (0: Numba's thread count; 1: one thread does everything, the machinery's
  own cost), teams of at least M rows (0: one team of all the rows, every worker
  sharing every step, as before teams; default ``_cpu_common.TEAM_MIN_ROWS``).

Every loop is checked against the serial one, bit for bit, before timing. Times are
wall time of a whole ``lstm_forward`` (inference) or forward + backward (training)
call, projection and packing included, which every loop shares. Run it under
``/work/bin/quiet`` (a 2-core machine shared with other jobs moves single rows by
+-20% otherwise).

Results (2-core Zen 4 VM, quiet, 2026-12-01, 30 repeats; inference): the persistent
loop at 0.70-0.85 of the serial loop from 256,1,128 to 64,64,512, where the
fork-per-step variant gave 0.70-0.93 at B·H >= 1024 and 1.38-1.80 below; losses
where the product has a single 4-panel group (H = 32: 1.06-1.14). One chunk of each
kind per worker (1,1,0) beat two (2,2,0) by 1-9%; one worker alone (1,1,1) costs
0-1% over the serial loop (the atomics). All numbers and the rule they gave:
``rnnkernels/_cpu_common.py``'s module docstring. A variant where each worker tried
"its own" chunks first every step (cache affinity) with a barrier per phase lost at
128,8,128 (0.94-0.99 against 0.75-0.78) and gained nothing at larger sizes: removed.

Teams of rows and pairs of panels (training, ``--loops``, quiet, 2026-12-01 22:31 UTC,
30 repeats; persistent/1,1,0,2, teams, over persistent/1,1,0,0, one team, both with
pairs of panels where the groups are few; forward loop, backward loop): 128,8,128
0.91, 0.92; 512,8,128 0.82, 0.71; 128,16,256 0.97, 0.97; 64,64,512 0.97, 0.89;
1024,4,64 0.80, 0.65; 256,1,128 and 256,2,128 (one team either way) 0.99-1.00. The
pairs alone took the backward loop at 128,8,128 from 1.52 ms (one 4-panel group: one
worker computed the whole product) to 1.08 ms, teams to 1.01 (22:26 run: 0.87).
Teams of one row (M = 1) lost at 256,2,128: forward loop 1.36x one team. Persistent
with teams over serial where the product has one group (``--mode training``): LSTM
512,8,32 0.87, 512,4,32 0.98, 512,2,32 (one team) 1.20; tanh RNN (``--cell rnn``)
128,8,128 0.89, 512,8,128 0.87, 1024,4,64 0.94, 256,1,128 (one team) 0.97. The
rule they gave: ``_cpu_common.time_loop``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

_CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_CHECKOUT))

import rnnkernels  # noqa: E402
from rnnkernels import _cpu_common, cpu, cpu_gru, cpu_rnn  # noqa: E402

# --loops: the seconds of each time-loop call of the current run (forward, backward),
# recorded by wrappers around the compiled loops (a Python call each, ~1 µs).
_LOOP_SECONDS = {}


def _timed(name, function):
    def call(*args):
        start = time.perf_counter()
        function(*args)
        _LOOP_SECONDS[name] = time.perf_counter() - start

    return call


def _time_the_loops():
    for variant in (cpu._SERIAL, cpu._PERSISTENT, cpu_gru._SERIAL, cpu_gru._PERSISTENT,
                    *cpu_rnn._SERIAL.values(), *cpu_rnn._PERSISTENT.values()):
        for name, direction in (("forward_steps", "forward loop"), ("backward_steps", "backward loop")):
            setattr(variant, name, _timed(direction, getattr(variant, name)))

SIZES = ((128, 8, 128), (512, 8, 128), (128, 16, 256), (64, 64, 512), (1024, 4, 64), (256, 1, 128), (256, 2, 128))


def _size(text):
    return tuple(int(v) for v in text.split(","))


# --cell: (forward, backward, gate rows per hidden unit)
CELLS = {
    "lstm": (rnnkernels.lstm_forward, rnnkernels.lstm_backward, 4),
    "gru": (rnnkernels.gru_forward, rnnkernels.gru_backward, 3),
    "rnn": (rnnkernels.rnn_forward, rnnkernels.rnn_backward, 1),
}
_CELL = "lstm"


def _problem(steps, batch, hidden, training):
    rng = np.random.default_rng([steps, batch, hidden])
    bound = 1 / np.sqrt(hidden)
    f32 = np.float32
    rows = CELLS[_CELL][2] * hidden
    problem = {
        "x": rng.standard_normal((steps, batch, hidden)).astype(f32),
        "w_ih": rng.uniform(-bound, bound, (rows, hidden)).astype(f32),
        "w_hh": rng.uniform(-bound, bound, (rows, hidden)).astype(f32),
        "b_ih": rng.uniform(-bound, bound, rows).astype(f32),
        "b_hh": rng.uniform(-bound, bound, rows).astype(f32),
    }
    dy = rng.standard_normal((steps, batch, hidden)).astype(f32) if training else None
    return problem, dy


def _runner(loop, config, problem, dy):
    """A call with the time loop forced to ``loop``; for the persistent loop, ``config``
    = (cell chunks per worker, product chunks per worker, workers or 0 for all[, rows
    per team at least, or 0 for one team of all the rows])."""
    names = ("persistent_arguments", "ROW_CHUNKS_PER_WORKER", "PRODUCT_CHUNKS_PER_WORKER", "TEAM_MIN_ROWS")
    original = {name: getattr(_cpu_common, name) for name in names}

    def run():
        _cpu_common.time_loop = lambda *shape: loop
        if config:
            rows, groups, workers, *team_rows = config
            _cpu_common.ROW_CHUNKS_PER_WORKER, _cpu_common.PRODUCT_CHUNKS_PER_WORKER = rows, groups
            if team_rows:
                _cpu_common.TEAM_MIN_ROWS = team_rows[0] or 1 << 30
            if workers:
                arguments = original["persistent_arguments"]
                _cpu_common.persistent_arguments = lambda *a: (arguments(*a)[0], workers, *arguments(*a)[2:])
        try:
            _LOOP_SECONDS.clear()
            forward, backward, _ = CELLS[_CELL]
            out = forward(**problem, training=dy is not None, backend="cpu")
            if dy is None:
                run.loops.append(dict(_LOOP_SECONDS))
                return [out.y]
            grads = backward(out, dy=dy, return_step_norms=True)
            run.loops.append(dict(_LOOP_SECONDS))
            return [out.y, grads.dx, grads.dw_hh, grads.dh0, grads.dh_norms]
        finally:
            for name, value in original.items():
                setattr(_cpu_common, name, value)

    run.loops = []  # per call: {"forward loop": s, "backward loop": s} (with --loops)
    return run


def _cell(name, seconds, baseline):
    ratio = np.array(seconds) / np.array(baseline)
    p10, p50, p90 = np.percentile(ratio, [10, 50, 90])
    return f"{name} {1e3 * np.median(seconds):.2f} ms {p50:.2f} ({p10:.2f}-{p90:.2f})"


def same_bits_then_paired(loops, repeats, where, warm):
    """Each of ``loops`` (name: a call returning its output arrays; "serial" among them)
    checked bit for bit against "serial" (SystemExit naming ``where`` if one differs),
    called once more if ``warm``, then timed ``repeats`` times, all of them in every
    repeat in a rotating order: {name: [seconds]}. Experiment 09 times the same way."""
    want = [a.tobytes() for a in loops["serial"]()]
    for name, run in loops.items():
        if [a.tobytes() for a in run()] != want:
            raise SystemExit(f"{name} differs from serial at {where}")
        if warm:
            run()
    times = {name: [] for name in loops}
    names = list(loops)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            start = time.perf_counter()
            loops[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=_size, action="append")
    parser.add_argument("--mode", choices=("forward", "training"), action="append")
    parser.add_argument("--config", action="append", metavar="R,G,W[,M]",
                        help="persistent loop: cell chunks per worker, product chunks per worker, "
                             "workers (0: all), rows per team at least (0: one team; default "
                             "_cpu_common.TEAM_MIN_ROWS); repeat for several (default 1,1,0)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--baseline", default="serial",
                        help="the loop the ratios are over: serial (default) or persistent/CONFIG")
    parser.add_argument("--loops", action="store_true",
                        help="also each time loop's own time (forward loop, backward loop), paired the same way")
    parser.add_argument("--cell", choices=CELLS, default="lstm", help="the LSTM (default), the GRU or the tanh RNN")
    args = parser.parse_args(argv)
    global _CELL
    _CELL = args.cell
    if args.loops:
        _time_the_loops()
    original_rule = _cpu_common.time_loop
    print(f"numba threads {_cpu_common.threads()}")
    for steps, batch, hidden in args.size or SIZES:
        for mode in args.mode or ("forward",):
            problem, dy = _problem(steps, batch, hidden, mode == "training")
            loops = {"serial": _runner("serial", 0, problem, dy)}
            for config in args.config or ["1,1,0"]:
                loops[f"persistent/{config}"] = _runner("persistent", _size(config), problem, dy)
            times = same_bits_then_paired(loops, args.repeats, f"{steps, batch, hidden} {mode}", warm=True)
            names = list(loops)
            cells = [_cell(name, times[name], times[args.baseline]) for name in names]
            print(f"{steps},{batch},{hidden} {mode}: " + " | ".join(cells), flush=True)
            for part in ("forward loop", "backward loop") if args.loops else ():
                seconds = {name: [call[part] for call in loops[name].loops[-args.repeats:]] for name in names
                           if part in loops[name].loops[-1]}
                if args.baseline in seconds:
                    cells = [_cell(name, seconds[name], seconds[args.baseline]) for name in seconds]
                    print(f"  {part}: " + " | ".join(cells), flush=True)
    _cpu_common.time_loop = original_rule


if __name__ == "__main__":
    main()
