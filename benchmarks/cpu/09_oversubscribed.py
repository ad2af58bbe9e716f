"""Experiment 09: the persistent loop when other jobs hold the cores (issue 12).

    NUMBA_NUM_THREADS=2 python benchmarks/cpu/09_oversubscribed.py                 # loads 0, 1, 2
    NUMBA_NUM_THREADS=2 python benchmarks/cpu/09_oversubscribed.py --load 1 --size 128,8,128

LSTM, float32, I = H, our cpu backend only, in one process. For each load (0, 1 or 2
busy-loop processes started by this script, pinned to no core in particular, killed
before the next load) and each size and mode, the serial and the persistent time
loops run interleaved (each repeat runs each once, in a rotating order); the report
is each loop's median time and the persistent loop's time over the serial loop's in
the same repeat: median (p10-p90). ``--policy S,Y`` runs the persistent loop under
the wait policy S pause spins, then Y sched_yield calls, then naps
(``_cpu_sync.set_policy``; repeat for several, compared in the same repeats);
without it, the default policy. Every loop is checked against the serial loop bit for
bit first. Run it under ``/work/bin/quiet`` so that the busy loops are the only other
load (the 2-core machine is shared).

Results: ``rnnkernels/_cpu_sync.py``'s module docstring (the wait policy).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

_CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_CHECKOUT))

from rnnkernels import _cpu_common, _cpu_sync

# Experiment 05's problem and its loop-forcing runner, not copied.
_spec = importlib.util.spec_from_file_location("persistent05", Path(__file__).with_name("05_persistent_loop.py"))
_05 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_05)

SIZES = ((128, 8, 128), (64, 64, 512), (1024, 4, 64))


def _busy(count):
    # A shell's empty loop: one runnable thread each, no memory traffic.
    return [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(count)]


def _with_policy(run, policy):
    if policy is None:
        return run

    def wrapped():
        saved = _cpu_sync.policy()
        _cpu_sync.set_policy(*policy)
        try:
            return run()
        finally:
            _cpu_sync.set_policy(*saved)

    return wrapped


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=_05._size, action="append")
    parser.add_argument("--mode", choices=("forward", "training"), action="append")
    parser.add_argument("--load", type=int, action="append", help="busy-loop processes beside (default 0, 1, 2)")
    parser.add_argument("--policy", type=_05._size, action="append", metavar="S,Y")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    print(f"numba threads {_cpu_common.threads()}")
    for load in args.load or (0, 1, 2):
        busy = _busy(load)
        try:
            for steps, batch, hidden in args.size or SIZES:
                for mode in args.mode or ("forward", "training"):
                    problem, dy = _05._problem(steps, batch, hidden, mode == "training")
                    loops = {"serial": _05._runner("serial", 0, problem, dy)}
                    persistent = _05._runner("persistent", 0, problem, dy)
                    for policy in args.policy or [None]:
                        name = "persistent" if policy is None else "persistent/{},{}".format(*policy)
                        loops[name] = _with_policy(persistent, policy)
                    times = _05.same_bits_then_paired(loops, args.repeats, f"{steps, batch, hidden} {mode}", warm=False)
                    names = list(loops)
                    serial = np.array(times["serial"])
                    cells = [f"serial {1e3 * np.median(serial):.2f} ms"]
                    for name in names[1:]:
                        p10, p50, p90 = np.percentile(np.array(times[name]) / serial, [10, 50, 90])
                        cells.append(f"{name} {1e3 * np.median(times[name]):.2f} ms {p50:.2f} ({p10:.2f}-{p90:.2f})")
                    print(f"load {load} {steps},{batch},{hidden} {mode}: " + " | ".join(cells), flush=True)
        finally:
            for process in busy:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
