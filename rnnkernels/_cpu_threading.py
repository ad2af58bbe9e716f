"""Two hazards of Numba's threading layers the cpu backends work around.

1. One parallel launch at a time where the layer needs it.

Numba's ``workqueue`` threading layer (its fallback where neither TBB nor OpenMP
loads) is not thread-safe: two parallel launches at once, from two Python threads,
abort the whole process ("Concurrent access has been detected"). Numba offers no lock
of its own, so the cpu backends' forward and backward (everything of ours that may
launch a parallel region) hold this one there. The ``omp`` and ``tbb`` layers are
thread-safe and run concurrent calls side by side, unlocked. Serializing changes no
bits: the results do not depend on which thread runs a call or when.

2. No parallel launch in a child forked after GNU OpenMP ran. libgomp is not
fork-safe: Numba aborts a forked child's first parallel launch ("Terminating: fork()
called from a process already using GNU OpenMP, this is unsafe.") when the parent had
launched on the ``omp`` layer, so a ``multiprocessing`` pool (or a DataLoader worker)
forked after a training call died on its first call of ours, and the pool waited
forever for it. In such a child the forking thread's Numba thread count is set to 1
(``os.register_at_fork``), so our calls take the serial loops and products, which
launch nothing; the bits are those of any thread count. Other threads the child
starts later get Numba's default again, and their parallel launches still abort:
NUMBA_THREADING_LAYER=workqueue (fork-safe, and thread-safe for our calls by 1.)
avoids both (the lock of 1. is made anew in a forked child: a call another thread
of the parent was in does not go on there).

A module of its own, not in ``_cpu_common``: that file's bytes are part of every
compiled function's cache name, and this has nothing to do with the compiled code.
"""

from __future__ import annotations

import functools
import os
import threading

import numba

_WORKQUEUE_LOCK = threading.RLock()


def _layer_is_thread_safe():
    if numba.config.THREADING_LAYER in ("omp", "tbb", "safe", "threadsafe"):  # never workqueue
        return True
    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # nothing launched yet, so no layer chosen: it may be workqueue
        return False


def one_launch_at_a_time(function):
    """``function``, holding a process-wide lock while it runs when Numba's threading
    layer is ``workqueue`` or not chosen yet."""

    @functools.wraps(function)
    def guarded(*args, **kwargs):
        if _layer_is_thread_safe():
            return function(*args, **kwargs)
        with _WORKQUEUE_LOCK:
            return function(*args, **kwargs)

    return guarded


def _after_fork_in_child():
    # The child has only the forking thread: a lock another thread held at the fork (a
    # call of ours in progress there) would stay held for good, and the child's first
    # call wait forever. No call is in progress in the child, so a new lock is right.
    global _WORKQUEUE_LOCK
    _WORKQUEUE_LOCK = threading.RLock()
    try:
        layer = numba.threading_layer()
    except ValueError:  # nothing launched before the fork: the child may launch
        return
    if layer != "omp":
        return
    from numba.np.ufunc import omppool

    if omppool.openmp_vendor == "GNU":  # Intel's OpenMP is fork-safe
        numba.set_num_threads(1)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
