"""What a new user hit trying the cpu backend on settings the other tests do not cover
(session 4's independent check).

Numba's ``workqueue`` threading layer (what Numba falls back to where neither TBB nor
OpenMP loads) is not thread-safe: two parallel launches at once from two Python threads
abort the whole process ("Concurrent access has been detected"). The README promises
the same bits in any thread, so two threads training at once must work there too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Two Python threads, each a forward + backward large enough for the persistent time
# loop and the parallel products (every parallel launch the cpu backend makes), three
# times, on one cell each and on the same one; the bits are checked against one call
# made alone.
CHILD = r"""
import sys, threading
sys.path.insert(0, {repo!r})
import numpy as np
import numba
import rnnkernels

def problem(cell, seed):
    gates = {{"lstm": 4, "gru": 3, "rnn": 1}}[cell]
    rng = np.random.default_rng(seed)
    steps, batch, size = 6, 16, 96
    x = rng.standard_normal((steps, batch, size)).astype(np.float32)
    w_ih = (rng.standard_normal((gates * size, size)) / size).astype(np.float32)
    w_hh = (rng.standard_normal((gates * size, size)) / size).astype(np.float32)
    return cell, x, w_ih, w_hh

def call(cell, x, w_ih, w_hh):
    forward = getattr(rnnkernels, cell + "_forward")
    backward = getattr(rnnkernels, cell + "_backward")
    out = forward(x, w_ih, w_hh, backend="cpu")
    g = backward(out, dy=np.ones_like(out.y))
    return b"".join(np.ascontiguousarray(a).tobytes() for a in (out.y, g.dx, g.dw_ih, g.dw_hh, g.dh0))

problems = [problem("lstm", 0), problem("gru", 1), problem("lstm", 0)]
expected = [call(*p) for p in problems]
assert numba.threading_layer() == "workqueue", numba.threading_layer()
wrong = []

def work(k):
    for _ in range(3):
        if call(*problems[k]) != expected[k]:
            wrong.append(k)

threads = [threading.Thread(target=work, args=(k,)) for k in range(len(problems))]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not wrong, wrong
print("ok")
"""


def test_two_python_threads_on_the_workqueue_layer():
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO))], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
