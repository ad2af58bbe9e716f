"""The cpu backends' after-loop products of backward (dW_ih = gᵀ x, dW_hh = gᵀ h_{t-1},
summed over the T·B rows, and dx = g W_ih), with NumPy's BLAS held at one thread
(cpu.py's "Threading policy").

``backward_products`` is what the three cells call. Where it knows the BLAS's gemm
(``team_gemm``: OpenBLAS, MKL) and the products have TEAM_MIN_MACS multiply-adds or
more, all three run on ONE Numba thread team (``_cpu_team``): Numba's threads call the
BLAS's single-threaded gemm from inside one parallel region, chunk by chunk, and dx is
computed by our packed kernel in the same region. Otherwise, as before the team (the
rest of this docstring): ``weight_gradients``, two NumPy products side by side when
Numba has two threads or more, then dx as a parallel product of its own. The team at
two threads took 0.69-0.86 of the old way's LSTM training call at five of issue 12's
six sizes (0.94 at 64,64,512) and the same time at one thread (cpu.py has the numbers).

Why a BLAS at all: OpenBLAS's sgemm ran these long-K products faster at one thread than
our packed kernel (``_cpu_gemm``'s tiles; the measurements are in cpu.py's docstring
and benchmarks/cpu/04_thread_interference.py). Since then the team runs the weight
gradients on gradient tiles of our own wherever a shape rule says they win
(``_cpu_team.tiled``; float32 with AVX-512; measurements in _cpu_team's docstring);
the BLAS keeps the rest (64,64,512, float64, AVX2, the fallback below). Why one BLAS thread: at two, OpenBLAS
splits a product over a worker that spins for about 100 ms after each call, taking
the core that our next parallel region, torch, or the caller's code needs. Pinned to
one thread, OpenBLAS has no worker to wake; the second core, where there is one, runs
the other product instead (on a persistent one-worker thread, which blocks on a queue
when idle: it never spins). Each product is one single-threaded BLAS call, whichever
thread runs it, so its bits do not depend on the thread count.

The thread limit is set through threadpoolctl (the library that finds NumPy's BLAS among
the loaded libraries and calls the BLAS's own thread setter): OpenBLAS, MKL and BLIS;
for MKL, whose threadpoolctl limit is the calling thread's alone, MKL's process-wide
setting instead (``_is_mkl``: the team's other threads follow that one).
The setting is process-global, so ``one_blas_thread`` counts who is inside: the first
entrant sets 1 and remembers the user's setting, the last one out restores it, under
one lock, so concurrent backward calls never leave the setting changed. While any call
is inside, NumPy products of other Python threads run at one BLAS thread too, and a
change of the BLAS's threads made from another thread in that time is undone at the
exit. Setting and restoring costs about 2-5 µs per call (2-core VM, not quiet). A BLAS
that threadpoolctl cannot control (none of the three) is called as it is: its own
thread count applies, and with it whatever it does to the bits and to idle cores.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np
from threadpoolctl import ThreadpoolController

from . import _cpu_common, _cpu_gemm, _cpu_team

_lock = threading.Lock()
_blas = None  # threadpoolctl's controllers of the loaded BLAS libraries, found on the first call
_saved = None  # [(controller, the user's thread count)] while _entrants > 0
_entrants = 0
_executor = None
_executor_pid = None
_gemm = None  # _cpu_team.Gemm of the BLAS, or False where none is usable; found on the first call
# dx = g W_ih in the team by the BLAS (True) or by our packed kernel (False): cpu.py's
# threading policy has the measurements behind the choice.
DX_ON_BLAS = False
# The team from this many multiply-adds (all three products) up; below, the products
# run as before (``backward_products``). A rule on the shape alone, so that the path,
# and with it every bit, does not depend on the thread count.
TEAM_MIN_MACS = 1 << 20


def _set_threads(library, count):
    # Not threadpoolctl's public set_num_threads: for a pthreads OpenBLAS (NumPy's wheels)
    # it acts only for the first Python thread that ever set a limit (its guard against
    # threads fighting over the process-wide setting; our lock and count do that here).
    # Called first from a worker thread it would make that thread the owner, and the
    # user's own threadpool_limits from the main thread would silently do nothing; from
    # any other thread ours would (tests/test_cpu.py saw it: the BLAS stayed at 2).
    getattr(library, "_real_set_num_threads", library.set_num_threads)(count)


def _is_mkl(library):
    # threadpoolctl limits MKL with MKL_Set_Num_Threads_Local: the calling thread's
    # setting alone. The team's gemm calls (and weight_gradients' worker) come from
    # other threads, which follow MKL's process-wide setting, so MKL is held through
    # that one (MKL_Set_Num_Threads), and each caller's own setting is unset meanwhile
    # (the caller runs chunks too). Seen with MKL 2026.2.1 (gnu layer): through
    # threadpoolctl alone, another thread still saw 2 threads inside the context.
    return getattr(library, "internal_api", None) == "mkl"


def _shared_threads(library):
    """The process-wide thread count (MKL: the caller's own setting must be unset)."""
    return library.dynlib.MKL_Get_Max_Threads() if _is_mkl(library) else library.num_threads


def _set_shared_threads(library, count):
    if _is_mkl(library):
        library.dynlib.MKL_Set_Num_Threads(count)
    else:
        _set_threads(library, count)


def _reset_after_fork():
    # A forked child has only the thread that forked, which was not inside (a fork from
    # inside a product is impossible): a lock held by another thread stays held, and a
    # limit in force stays in force. Release both, restoring the user's setting.
    global _lock, _saved, _entrants
    _lock = threading.Lock()
    for library, count in _saved or ():
        _set_shared_threads(library, count)
    _saved, _entrants = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _controllers():
    """threadpoolctl's controllers of the loaded BLAS libraries (call under _lock)."""
    global _blas
    if _blas is None:  # a scan of the loaded libraries: ~1 ms, once
        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


class _OneBlasThread:
    def __enter__(self):
        global _saved, _entrants
        with _lock:
            _controllers()
            # This caller's own MKL setting (0: none), unset so that it follows the
            # process-wide 1; given back at this caller's exit (``_is_mkl``).
            self._mkl_locals = [(library, library.dynlib.MKL_Set_Num_Threads_Local(0))
                                for library in _blas if _is_mkl(library)]
            if _entrants == 0:
                _saved = [(library, _shared_threads(library)) for library in _blas]
                for library, _ in _saved:
                    _set_shared_threads(library, 1)
            _entrants += 1
        return self

    def __exit__(self, *exc):
        global _saved, _entrants
        with _lock:
            _entrants -= 1
            if _entrants == 0:
                for library, count in _saved:
                    _set_shared_threads(library, count)
                _saved = None
            for library, count in self._mkl_locals:
                library.dynlib.MKL_Set_Num_Threads_Local(count)
        return False


def one_blas_thread():
    """A context in which NumPy's BLAS runs at one thread; the user's setting is back
    when the last of the concurrent callers has left (see the module docstring)."""
    return _OneBlasThread()


def _worker():
    """The persistent one-worker executor, made anew in a forked child (whose copy has
    no thread behind it)."""
    global _executor, _executor_pid
    with _lock:
        if _executor is None or _executor_pid != os.getpid():
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnkernels-dw")
            _executor_pid = os.getpid()
        return _executor


def weight_gradients(grad_ih, inputs, grad_hh, hidden_states):
    """(grad_ihᵀ @ inputs, grad_hhᵀ @ hidden_states) as new C-contiguous arrays, for
    grad_ih [K, R_ih], inputs [K, I], grad_hh [K, R_hh], hidden_states [K, H] (K = T·B):
    a cell's dW_ih and dW_hh. NumPy's products with its BLAS at one thread; with two
    Numba threads or more and at least _cpu_common.PARALLEL_MIN_MACS multiply-adds in
    all, dW_ih runs on the worker thread while the caller computes dW_hh (NumPy
    releases the GIL in both). The same bits either way."""
    steps = grad_ih.shape[0]
    macs = steps * (grad_ih.shape[1] * inputs.shape[1] + grad_hh.shape[1] * hidden_states.shape[1])
    with one_blas_thread():
        if _cpu_common.threads() < 2 or macs < _cpu_common.PARALLEL_MIN_MACS:
            return grad_ih.T @ inputs, grad_hh.T @ hidden_states
        future = _worker().submit(np.matmul, grad_ih.T, inputs)
        try:
            dw_hh = grad_hh.T @ hidden_states
        finally:
            # The worker's product must end inside the limit, whatever happened here.
            concurrent.futures.wait([future])
        return future.result(), dw_hh


def team_gemm():
    """The BLAS gemm the team calls (``_cpu_team.find_gemm`` over the loaded BLAS
    libraries, looked up once), or None: then ``backward_products`` runs as before."""
    global _gemm
    if _gemm is None:
        with _lock:
            if _gemm is None:
                _gemm = _cpu_team.find_gemm(_controllers()) or False
    return _gemm or None


def backward_products(grad_ih, inputs, grad_hh, hidden_states, w_ih):
    """(dW_ih, dW_hh, dx) = (grad_ihᵀ inputs, grad_hhᵀ hidden_states, grad_ih W_ih) as
    new C-contiguous arrays, for grad_ih [K, R_ih], inputs [K, I], grad_hh [K, R_hh],
    hidden_states [K, H] (K = T·B) and w_ih [R_ih, I], one dtype: a cell's after-loop
    products. From TEAM_MIN_MACS multiply-adds up, on one thread team
    through the BLAS's gemm (``_cpu_team``), with the BLAS held at one thread; below it
    (the team's fixed costs, some 10 µs, would show), where no gemm is known
    (``team_gemm`` None), where a dimension is 0 or past the gemm's integers
    (``_cpu_team.fits``), as before: ``weight_gradients``,
    then dx on the packed kernel (``_cpu_common.project``). Which path runs depends on
    the shape alone, and each gives the same bits at any thread count."""
    arrays = [np.ascontiguousarray(a) for a in (grad_ih, inputs, grad_hh, hidden_states, w_ih)]
    gemm = team_gemm()
    macs = grad_ih.shape[0] * (grad_ih.shape[1] * inputs.shape[1] * 2 + grad_hh.shape[1] * hidden_states.shape[1])
    dimensions = (grad_ih.shape[0], grad_ih.shape[1], inputs.shape[1], grad_hh.shape[1], hidden_states.shape[1])
    if gemm is not None and macs >= TEAM_MIN_MACS and all(a.size for a in arrays) and _cpu_team.fits(gemm, dimensions):
        with one_blas_thread():
            return _cpu_team.run(gemm, *arrays, DX_ON_BLAS)
    grad_ih, inputs, grad_hh, hidden_states, w_ih = arrays
    dw_ih, dw_hh = weight_gradients(grad_ih, inputs, grad_hh, hidden_states)
    dx = _cpu_common.project(grad_ih, _cpu_gemm.pack(w_ih), w_ih.shape[1])
    return dw_ih, dw_hh, dx
