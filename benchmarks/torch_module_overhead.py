"""What ``rnnkernels.torch`` costs over the functional API and over ``torch.nn.LSTM``.

Two paired, interleaved comparisons on the CPU (one thread everywhere: torch, Numba):

* ``train``: ``rnnkernels.torch.LSTM`` forward + ``loss.backward()`` against
  ``rnnkernels.lstm_forward(training=True)`` + ``rnnkernels.lstm_backward`` on the same
  data, both on the cpu backend (issue 13's target: ratio <= 1.15 at T=50, B=32,
  I=H=128, float32).
* ``decode``: a loop of T=1 calls with the state passed along, under ``no_grad``,
  ``rnnkernels.torch.LSTM`` against ``torch.nn.LSTM`` with the same weights (target:
  per-step ratio <= 1.5 at B=1, H=256).

Each round times A then B or B then A (alternating), so drifts in the machine's load
hit both; the ratio is taken per round and reported as median and p10/p90, with the
1-minute load average before and after. Both sides are validated against each other
before timing. Usage::

    NUMBA_NUM_THREADS=1 python benchmarks/torch_module_overhead.py [--mode train|decode|both] [--rounds N] [--clock wall|thread]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

import rnnkernels
import rnnkernels.torch as rtorch
from rnnkernels.bench.cli import provenance


# What a round is timed with: wall time (perf_counter), or the CPU time of this thread
# (thread_time), which leaves out the time others' processes hold the CPU: on a loaded
# machine the closer measure of what a call costs, given that everything here runs
# on this one thread (torch and Numba at one thread; the autograd engine runs CPU
# backward on the calling thread). It still counts cache and page-fault effects.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_clock = time.perf_counter


def _paired(first, second, rounds: int, repeats: int):
    """Per-round times (seconds per call) of ``first`` and ``second``, interleaved."""
    a, b = [], []
    for r in range(rounds):
        order = ((first, a), (second, b)) if r % 2 == 0 else ((second, b), (first, a))
        for fn, out in order:
            start = _clock()
            for _ in range(repeats):
                fn()
            out.append((_clock() - start) / repeats)
    return np.array(a), np.array(b)


def _summary(name, a, b, label_a, label_b, target):
    ratio = a / b
    p10, p50, p90 = np.percentile(ratio, [10, 50, 90])
    row = {
        "mode": name,
        label_a + "_ms_median": float(np.median(a) * 1e3),
        label_b + "_ms_median": float(np.median(b) * 1e3),
        "ratio_median": float(p50),
        "ratio_p10": float(p10),
        "ratio_p90": float(p90),
        "target": target,
    }
    print(
        f"{name:7s} {label_a} {np.median(a) * 1e3:8.3f} ms  {label_b} {np.median(b) * 1e3:8.3f} ms  "
        f"ratio median {p50:.3f} (p10 {p10:.3f}, p90 {p90:.3f}; target <= {target})"
    )
    return row


def train(rounds: int, steps=50, batch=32, size=128):
    torch.manual_seed(0)
    module = rtorch.LSTM(size, size, backend="cpu")
    x = torch.randn(steps, batch, size)
    dy = torch.randn(steps, batch, size)
    weights = [p.detach().numpy() for p in (module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0)]
    x_np, dy_np = x.numpy(), dy.numpy()
    x_req = x.clone().requires_grad_()

    def with_module():
        module.zero_grad(set_to_none=True)
        x_req.grad = None
        y, _ = module(x_req)
        y.backward(dy)

    def functional():
        out = rnnkernels.lstm_forward(x_np, *weights, training=True, backend="cpu")
        return rnnkernels.lstm_backward(out, dy_np)

    # Validate: the same gradients both ways.
    with_module()
    grads = functional()
    np.testing.assert_allclose(x_req.grad.numpy(), grads.dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(module.weight_hh_l0.grad.numpy(), grads.dw_hh, rtol=1e-4, atol=1e-4)
    for _ in range(3):
        with_module(), functional()
    a, b = _paired(with_module, functional, rounds, repeats=3)
    return _summary("train", a, b, "module", "functional", 1.15)


def decode(rounds: int, batch=1, size=256, steps=200):
    torch.manual_seed(0)
    reference = torch.nn.LSTM(size, size)
    ours = rtorch.LSTM(size, size, backend="cpu")
    ours.load_state_dict(reference.state_dict())
    tokens = torch.randn(steps, 1, batch, size)

    def loop(module):
        def run():
            state = (torch.zeros(1, batch, size), torch.zeros(1, batch, size))
            with torch.no_grad():
                for t in range(steps):
                    y, state = module(tokens[t], state)
            return y, state

        return run

    ours_run, ref_run = loop(ours), loop(reference)
    (_y1, (h1, c1)), (_y2, (h2, c2)) = ours_run(), ref_run()
    torch.testing.assert_close(h1, h2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c1, c2, rtol=1e-4, atol=1e-5)
    a, b = _paired(ours_run, ref_run, rounds, repeats=1)
    return _summary("decode", a / steps, b / steps, "ours_step", "nn_step", 1.5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("train", "decode", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall",
        help="wall: elapsed time (a quiet machine); thread: this thread's CPU time (a loaded one)",
    )
    args = parser.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows = []
    if args.mode in ("train", "both"):
        rows.append(train(args.rounds))
    if args.mode in ("decode", "both"):
        rows.append(decode(args.rounds))
    load_after = os.getloadavg()[0]
    print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} CPUs; clock {args.clock}")
    if args.json:
        meta = {"torch": torch.__version__, "load_before": load_before, "load_after": load_after, "cpus": os.cpu_count(),
                "clock": args.clock}
        with open(args.json, "w") as f:
            json.dump({"run": provenance(argv, "python benchmarks/torch_module_overhead.py"), "meta": meta,
                       "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
