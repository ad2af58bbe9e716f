"""What a new user hit trying the cpu backend on settings the other tests do not cover
(session 4's independent check).

Numba's ``workqueue`` threading layer (what Numba falls back to where neither TBB nor
OpenMP loads) is not thread-safe: two parallel launches at once from two Python threads
abort the whole process ("Concurrent access has been detected"). The README promises
the same bits in any thread, so two threads training at once must work there too.

GNU OpenMP (Numba's ``omp`` layer on Linux) is not fork-safe: a child forked after a
parallel call of ours (a ``multiprocessing`` pool, a DataLoader worker) aborts on its
first parallel launch, and a pool waits forever for the dead worker."""

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

def problem(cell, seed, batch=16):
    gates = {{"lstm": 4, "gru": 3, "rnn": 1}}[cell]
    rng = np.random.default_rng(seed)
    steps, size = 6, 96
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
# The persistent loops on this layer give the serial loop's bits: two teams of rows
# (B = 16), and one team of two workers sharing pairs of panels (B = 3, H = 96: the
# backward product's 3 panels).
small = problem("lstm", 2, batch=3)
persistent = [call(*p) for p in problems[:2] + [small]]
numba.set_num_threads(1)
serial = [call(*p) for p in problems[:2] + [small]]
numba.set_num_threads(2)
assert persistent == serial
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


# After a call large enough to launch parallel regions, fork; the child makes the same
# call and sends its digest back; the parent checks the child's exit status and bits.
FORK_CHILD = r"""
import hashlib, os, sys
sys.path.insert(0, {repo!r})
import numpy as np
import numba
import rnnkernels

rng = np.random.default_rng(0)
x = rng.standard_normal((6, 16, 96)).astype(np.float32)
w_ih = (rng.standard_normal((384, 96)) / 96).astype(np.float32)
w_hh = (rng.standard_normal((384, 96)) / 96).astype(np.float32)

def call():
    out = rnnkernels.lstm_forward(x, w_ih, w_hh, backend="cpu")
    g = rnnkernels.lstm_backward(out, dy=np.ones_like(out.y))
    return hashlib.sha256(b"".join(a.tobytes() for a in (out.y, g.dx, g.dw_ih, g.dw_hh))).hexdigest()

expected = call()
assert numba.threading_layer() == "omp", numba.threading_layer()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read)
    os.write(write, call().encode())
    os._exit(0)
os.close(write)
got = os.read(read, 100).decode()
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child died: wait status {{status}}"
assert got == expected, (got, expected)
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_child_forked_after_a_parallel_call_works():
    pytest.importorskip("numba.np.ufunc.omppool", reason="Numba's omp layer is not available here")
    env = dict(os.environ, NUMBA_THREADING_LAYER="omp", NUMBA_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "-c", FORK_CHILD.format(repo=str(REPO))], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
