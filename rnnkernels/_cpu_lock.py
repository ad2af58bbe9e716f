"""One parallel launch at a time where Numba's threading layer needs it.

Numba's ``workqueue`` threading layer (its fallback where neither TBB nor OpenMP
loads) is not thread-safe: two parallel launches at once, from two Python threads,
abort the whole process ("Concurrent access has been detected"). Numba offers no lock
of its own, so the cpu backends' forward and backward (everything of ours that may
launch a parallel region) hold this one there. The ``omp`` and ``tbb`` layers are
thread-safe and run concurrent calls side by side, unlocked. Serializing changes no
bits: the results do not depend on which thread runs a call or when.

A module of its own, not in ``_cpu_common``: that file's bytes are part of every
compiled function's cache name, and this has nothing to do with the compiled code.
"""

from __future__ import annotations

import functools
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
