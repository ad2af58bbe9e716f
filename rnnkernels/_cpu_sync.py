"""Atomics and a work-claiming barrier for the persistent time loops of the cpu backend.

Numba has no atomics on the CPU, so the few the persistent loops need are written
here in LLVM IR (``numba.extending.intrinsic``, llvmlite's IRBuilder), on int64
counters in a NumPy array.

How the loops use them (``_cpu_common``'s persistent loops): ONE parallel region per
call, ``for worker in numba.prange(workers)``, and inside it the workers share all T
steps' work. The batch rows are split into teams (``_cpu_common._team``: worker w in
team w % teams); a team's work touches only its own rows (a row's recurrence never
reads another row), and each team has its own counters (a row of
``team_counters(teams)``), so everything below holds per team, and teams never wait
for one another. Each step of a team has phases (the step product, then the cell, or
the reverse in backward), each phase a few *chunks* (runs of panels of the product,
blocks of the team's rows of the cell). The chunks of the team's whole call are
numbered in the order the math needs them, step by step and phase by phase, and two
counters hand them out:

* ``claim(counters)``: fetch-add on the claim counter; the old value is the chunk
  this worker computes next (>= the call's chunk count: nothing left);
* ``wait(counters, first)``: before computing a chunk, spin until the done counter
  reaches ``first``, the number of the first chunk of that chunk's phase;
* ``finish(counters)``: after computing it, fetch-add on the done counter.

The done counter reaches ``first`` only once every chunk before ``first`` is done:
a chunk numbered ``first`` or later is computed only after its own worker saw the
done counter at ``first`` or more, so the first ``first`` completions are all of
chunks before it. Hence a phase starts only when the previous one is complete, as
with a barrier, and a worker that claimed a chunk of the next phase early simply
holds it while it waits.

Deadlock-free whatever the threading layer does: a worker waits only for chunks of
its own team numbered below the one it holds, each of which was claimed by a worker
that is running (it was inside ``claim``); the lowest unfinished chunk of a team has
its worker wait for nothing (everything of the team before it is done), so every team
always progresses. Teams share no counters and wait for nothing of each other's, so
they cannot block one another, whatever the layer runs when. A layer that runs the
prange's iterations one after another on one thread (``workqueue``; ``tbb`` may) is
the case of one worker per team: the first iteration of a team claims and computes
every chunk of that team in order, that team's later iterations find nothing left.
Every element is computed by the same code whichever worker or team computes it, so
the bits do not depend on the thread count, the teams or on who claims what.

Memory ordering (why h_t written by one thread is what another reads):
* A worker's chunk writes its outputs (h_t, c_t, z, gates ...) with plain stores,
  then ``finish`` does an ``acq_rel`` fetch-add on the done counter: the release half
  orders those stores before the increment.
* ``wait`` reads the done counter with ``acquire`` loads. The increments of one
  counter are read-modify-writes, so each releasing increment heads a release
  sequence that contains every later increment of that counter; the acquire load
  that reads ``first`` or more (written by the ``first``-th increment or a later one)
  therefore synchronizes with every ``finish`` of the chunks before ``first``, and
  their stores happen-before everything the waiter does next (reading h_t in the next
  step's product).
* The other direction (write after read): the next phase may overwrite what this
  phase read (the step product rewrites z, which the previous step's cell read).
  Those reads come before the reader's own ``finish`` (release) and the writer
  starts only after its ``wait`` (acquire) read a count that includes it, so they
  are ordered.
* ``claim`` needs no ordering for data (it hands out indices, all writes are
  ordered by done/wait); it is ``acq_rel`` anyway: it costs the same on x86 (a
  ``lock xadd``) and keeps the argument simple on weaker machines.
* Across teams: no team reads what another writes during the region (their rows are
  disjoint; the packed weights are only read); the caller reads the results after
  the region's join, which orders them.
The counters only grow (zeroed by ``counters()`` / ``team_counters()``, one pair per
team and call), so none is ever reset while another thread reads it.

Waiting (``wait``): a check of the done counter, and only if the phase is
unfinished, three stages, by the number of checks so far (the bounds are data in the
counters' third cache line, ``set_policy``; defaults SPINS, YIELDS):
1. SPINS = 2^11 checks each followed by ``pause`` (x86's ``llvm.x86.sse2.pause``:
   the spinning hyperthread yields pipeline resources and the loop leaves the
   memory-order mis-speculation cheaply; elsewhere nothing: a plain loop of acquire
   loads, correct, the atomic load cannot be hoisted). ~48 ns per check on the
   project's Zen 4 VM, so ~100 µs: longer than almost every wait of an unloaded
   machine at the measured sizes (a step is ~5-50 µs there).
2. YIELDS = 16 checks each followed by ``sched_yield`` (~0.6-1.1 µs each here).
3. Then checks each followed by a nap, ``usleep(NAP_MICROSECONDS = 20)`` (Linux
   rounds it up by the timer slack, 50 µs by default), without end.
Why naps: with more runnable threads than cores, the thread a waiter needs may be
descheduled, often on the other core's run queue, where ``sched_yield`` (Linux CFS:
it only skips the yielder once, on its own queue) does not reach it; a spinning
waiter then burns its whole slice, and with several of our own threads per core the
waits chain. A napping waiter leaves its core idle, the scheduler moves the needed
thread there. Measured (benchmarks/cpu/09_oversubscribed.py, quiet, 2-core VM, LSTM
1024,4,64 inference, NUMBA_NUM_THREADS=4, persistent over serial, median (p10-p90)
over 25 paired repeats): spinning without end 1.25 (0.84-1346), spinning 2^15 then
naps 1.54 (0.82-216), spinning 2^15 then yielding without end 13.5 (0.87-177), this
policy 1.05 (0.81-10.2); the policy before this one (spin, ``sched_yield`` every 2^12
spins), run in another process beside one busy loop: 1.03 (0.78-117) against this
policy's 1.05 (0.79-18.7) (quiet otherwise, 25 repeats: p90 is the third-worst). The price: where ONE other process's busy thread shares 2
cores with our 2 workers, giving the core away lets that process run until the
next scheduler tick, and pure spinning was better (128,8,128 training 0.98 against
2.21; 1024,4,64 training 1.21 against 2.82; same run); no stage bound tried (256 to
2^15 spins) escaped that, so the policy bounds the pathological case rather than
optimizing that one. On an unloaded machine it costs nothing measurable (pure spin
against it: 0.97/0.96, 0.90/0.89, 0.80/0.79, 1.13/1.17 at 128,8,128 and 1024,4,64,
inference/training, within the p10-p90 spreads); spinning only 256 times before
napping cost 2.7x in quiet training (backward waits are longer than 12 µs).
Not a futex: waking needs the finisher to know whether anyone sleeps (a waiter
count and the recheck protocol against lost wake-ups, or a syscall per ``finish``,
~1 µs each, hundreds per call), the futex word is 32 bits (the done counter 64) and
it is Linux only (macOS ``__ulock_wait`` is private, Windows ``WaitOnAddress``); a
nap needs none of it and bounds the extra latency to one nap past the spin stage.
A worker that finds nothing left to claim leaves the loop at once (``claim`` >= the
chunk count: the loops ``break``); what it does next is the threading layer's join.

Deadlock-freedom and memory ordering are unchanged by the stages: a waiter only ever
re-reads the done counter with the same acquire load, whatever it did between two
reads, and a nap ends by itself (nothing needs to wake it). The policy slots are
written by the calling thread before the parallel region and only read inside it:
the region's start orders them (as it does the arrays' contents).
"""

from __future__ import annotations

import platform
import sys

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# The claim counter at 0, the done counter a cache line (8 int64) further, so that a
# claim by one thread does not evict the line the others spin on; the wait policy on a
# third line, written before the parallel region and only read in it.
_CLAIM = 0
_DONE = 8
_SPINS = 16
_YIELDS = 17
_COUNTERS = 24
# The wait policy (module docstring, "Waiting"): SPINS ``pause`` spins (about 10-140
# cycles each depending on the core: ~48 ns with its check on the project's VM, so 2^11
# spins ~ 100 µs, longer than a quiet wait at the measured sizes), then YIELDS ``sched_yield`` calls, then naps of
# NAP_MICROSECONDS (Linux rounds a nap up by the thread's timer slack, 50 µs by default).
SPINS = 1 << 11
YIELDS = 16
NAP_MICROSECONDS = 20
_policy = [SPINS, YIELDS]
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
_POSIX = sys.platform != "win32"


def policy():
    """(spins, yields) of the counters made from now on (``set_policy``)."""
    return tuple(_policy)


def set_policy(spins=SPINS, yields=YIELDS):
    """The wait policy of the counters made from now on: ``spins`` pause spins, then
    ``yields`` sched_yield calls, then naps (benchmarks/cpu/09_oversubscribed.py sweeps
    it; the policy is data, not code, so changing it recompiles nothing)."""
    for name, value in (("spins", spins), ("yields", yields)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= value < 2**62:  # spins + yields must not overflow the int64 count
            raise ValueError(f"{name} must be in [0, 2**62), got {value}")
    _policy[:] = [int(spins), int(yields)]


def counters():
    """A call's zeroed claim and done counters and the wait policy (int64, three cache
    lines)."""
    return team_counters(1)[0]


def team_counters(teams):
    """``counters()`` for each of ``teams`` teams of workers: [teams, 24] int64, a row
    (three cache lines) per team."""
    array = np.zeros((teams, _COUNTERS), np.int64)
    array[:, _SPINS], array[:, _YIELDS] = _policy
    return array


def _element_pointer(context, builder, array_type, array, index, index_type):
    arr = context.make_array(array_type)(context, builder, array)
    index = context.cast(builder, index, index_type, types.intp)
    return cgutils.get_item_pointer(context, builder, array_type, arr, [index], wraparound=False)


def _int64_vector(array):
    return isinstance(array, types.Array) and array.ndim == 1 and array.dtype == types.int64


@intrinsic
def fetch_add(typingctx, array, index, value):
    """array[index] += value atomically (acq_rel); returns the old value."""
    if not (_int64_vector(array) and isinstance(index, types.Integer) and isinstance(value, types.Integer)):
        return None
    sig = types.int64(array, index, value)

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        addend = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, addend, "acq_rel")

    return sig, codegen


@intrinsic
def load_acquire(typingctx, array, index):
    """array[index], read with an acquire load."""
    if not (_int64_vector(array) and isinstance(index, types.Integer)):
        return None
    sig = types.int64(array, index)

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        return builder.load_atomic(pointer, "acquire", 8)

    return sig, codegen


@intrinsic
def pause(typingctx):
    """A spin-wait hint: x86's ``pause``; nothing elsewhere (see the module docstring)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            hint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(hint, [])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def yield_core(typingctx):
    """``sched_yield()`` on POSIX (libc, resolved when the code is linked); nothing on Windows."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _POSIX:
            function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(function, [])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def nap(typingctx):
    """``usleep(NAP_MICROSECONDS)`` on POSIX (libc, resolved when the code is linked);
    nothing on Windows (it keeps spinning: its Sleep has millisecond steps). usleep, not
    nanosleep: it takes one unsigned int, where nanosleep's struct timespec has a
    time_t whose width the IR would have to know per platform."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _POSIX:
            function = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.IntType(32), [ir.IntType(32)]), "usleep")
            builder.call(function, [ir.Constant(ir.IntType(32), NAP_MICROSECONDS)])
        return context.get_dummy_value()

    return sig, codegen


_JIT = dict(inline="always", nogil=True)


@numba.njit(**_JIT)
def claim(counters):
    """The next unclaimed chunk (>= the call's chunk count: none left)."""
    return fetch_add(counters, _CLAIM, 1)


@numba.njit(**_JIT)
def finish(counters):
    """Publish a computed chunk (release: its stores come before the count)."""
    fetch_add(counters, _DONE, 1)


@numba.njit(**_JIT)
def _wait_long(counters, first):
    spins = counters[_SPINS]
    patience = spins + counters[_YIELDS]
    tries = 0
    while load_acquire(counters, _DONE) < first:
        if tries < spins:
            pause()
        elif tries < patience:
            yield_core()
        else:
            nap()
        tries += 1


@numba.njit(**_JIT)
def wait(counters, first):
    """Wait until ``first`` chunks are done (acquire: their stores are visible after):
    call it with the number of the first chunk of the phase of the chunk held. Spins,
    then yields, then naps (module docstring, "Waiting")."""
    if load_acquire(counters, _DONE) < first:
        _wait_long(counters, first)
