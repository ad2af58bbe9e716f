"""Atomics and a work-claiming barrier for the persistent time loops of the cpu backend.

Numba has no atomics on the CPU, so the few the persistent loops need are written
here in LLVM IR (``numba.extending.intrinsic``, llvmlite's IRBuilder), on int64
counters in a NumPy array.

How the loops use them (``_cpu_common``'s persistent loops): ONE parallel region per
call, ``for worker in numba.prange(workers)``, and inside it the workers share all T
steps' work. Each step has phases (the step product, then the cell, or the reverse
in backward), each phase a few *chunks* (4-panel groups of the product, blocks of
batch rows of the cell). The chunks of the whole call are numbered in the order the
math needs them, step by step and phase by phase, and two counters hand them out:

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

Deadlock-free whatever the threading layer does: a worker waits only for chunks
numbered below the one it holds, each of which was claimed by a worker that is
running (it was inside ``claim``); the lowest unfinished chunk's worker waits for
nothing (everything before it is done), so it always progresses. A layer that runs
the prange's iterations one after another on one thread (``workqueue``; ``tbb``
may) is the case of one worker: the first iteration claims and computes every chunk
in order, the next ones find nothing left. Every element is computed by the same
code whichever worker computes it, so the bits do not depend on the thread count or
on who claims what.

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
The counters only grow (zeroed by the caller, one pair per call), so none is ever
reset while another thread reads it.

The spin: ``pause`` emits x86's ``pause`` (``llvm.x86.sse2.pause``: the spinning
hyperthread yields pipeline resources and the loop exits the memory-order
mis-speculation cheaply). On other architectures it emits nothing: the spin is a
plain loop of acquire loads, correct (the load cannot be hoisted: it is atomic)
but without the hint. After ``YIELD_AFTER`` spins a waiter calls ``sched_yield``
(POSIX; on Windows it keeps spinning): when the machine has more runnable threads
than cores, the thread we wait for may be descheduled, and spinning on would only
take its core for the rest of our time slice.
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
# claim by one thread does not evict the line the others spin on.
_CLAIM = 0
_DONE = 8
_COUNTERS = 16
# Spins (each one ``pause``, about 10-140 cycles depending on the core) before a
# waiter yields its core: around 10-100 µs, several steps of the loops' sizes.
YIELD_AFTER = 1 << 12
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
_POSIX = sys.platform != "win32"


def counters():
    """A call's zeroed claim and done counters (int64, two cache lines)."""
    return np.zeros(_COUNTERS, np.int64)


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
def wait(counters, first):
    """Spin until ``first`` chunks are done (acquire: their stores are visible after):
    call it with the number of the first chunk of the phase of the chunk held."""
    spins = 0
    while load_acquire(counters, _DONE) < first:
        pause()
        spins += 1
        if spins == YIELD_AFTER:
            yield_core()
            spins = 0
