"""What a new user hit trying the cpu backend on settings the other tests do not cover
(session 5's independent check).

On Numba's ``workqueue`` layer our calls hold a process-wide lock
(``_cpu_threading.one_launch_at_a_time``). A process forked while another Python thread
is inside one of our calls (a ``multiprocessing`` pool or a DataLoader started while a
background thread trains or evaluates) inherits that lock held by a thread that does
not exist in the child: the child's first call waited forever, and the pool with it.
``_cpu_threading`` says workqueue is the fork-safe layer to pick, so it must stay so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A background thread runs long forward calls back to back; the main thread forks while
# that thread is inside one (it signals just before each call and the fork waits a little
# after the signal, so the lock is held), and the child makes a small call of its own
# and reports its digest. The child gets a deadline: a hang is reported, not waited out.
FORK_WHILE_CALLING = r"""
import hashlib, os, signal, sys, threading, time
sys.path.insert(0, {repo!r})
import numpy as np
import numba
import rnnkernels

rng = np.random.default_rng(0)
long_x = rng.standard_normal((4000, 1, 8)).astype(np.float32)
long_w = [(rng.standard_normal((64, n)) / 16).astype(np.float32) for n in (8, 16)]
x = rng.standard_normal((5, 3, 8)).astype(np.float32)

def small():
    out = rnnkernels.lstm_forward(x, *long_w, backend="cpu")
    g = rnnkernels.lstm_backward(out, dy=np.ones_like(out.y))
    return hashlib.sha256(out.y.tobytes() + g.dx.tobytes()).hexdigest()

expected = small()
assert numba.threading_layer() == "workqueue", numba.threading_layer()
inside = threading.Event()
stop = False

def background():
    while not stop:
        inside.set()
        rnnkernels.lstm_forward(long_x, *long_w, backend="cpu", training=False)

thread = threading.Thread(target=background)
thread.start()
try:
    for _ in range(3):
        inside.wait()
        inside.clear()
        time.sleep(0.005)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            signal.alarm(20)  # a hang ends the child (SIGALRM) instead of the test
            os.write(write, small().encode())
            os._exit(0)
        os.close(write)
        got = os.read(read, 100).decode()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child failed: wait status {{status}}"
        assert got == expected, (got, expected)
finally:
    stop = True
    thread.join()
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_fork_while_another_thread_is_inside_a_call_on_the_workqueue_layer():
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "-c", FORK_WHILE_CALLING.format(repo=str(REPO))],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
