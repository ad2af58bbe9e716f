"""Record the T step launches of a call shape once, replay them on later calls.

The ``graph`` variant of ``rnnkernels/_launch.py`` launches its T per-step kernels
once, inside ``rt.capture()``, and from then on replays them with one call per
forward or backward instead of T launches from Python:

* :func:`cupy_capture` (``backend="cuda"``): CUDA stream capture through CuPy
  (``Stream.begin_capture`` / ``end_capture`` -> ``cupy.cuda.Graph``). Capture runs on a
  fresh non-blocking stream (CuPy refuses to capture the legacy default stream); the
  graph is launched on the caller's current stream, so it is ordered with the copies
  and GEMMs around it exactly like the per-step launches it replaces.
* :class:`LaunchRecorder` (``backend="emulated"``): the emulator runtime's kernels, while
  recording, append ``(launch, grid, block, args)`` to a list instead of running;
  the replay runs that list in order. So CI runs the exact launches a GPU graph holds.

What a graph may point at. A graph bakes in every kernel argument, pointers included,
so it must only ever see arrays whose addresses do not change from call to call. The
launcher (``_launch.run_steps``, for every cell) therefore keeps one *workspace* per
cached graph (one array per distinct array argument of the step kernel), copies the
caller's arrays into it before each replay (gx, W_hh, h_all and the LSTM's c_all with
their initial states, the saved arrays and the upstream gradients for backward) and
copies the arrays the steps write back out (h_all, c_all, the saved gates; dz and the
carries backward). Nothing returned to a caller, and nothing a ``CellSaved`` holds, is
ever a view of a workspace, so a later call, which overwrites the workspace, cannot
change it.
(Alternatives considered: capturing per call buys nothing; kernels reading their
pointers from a device-side argument block would avoid the copies but change every
step kernel's signature, and the copies are one pass over arrays that the T steps
touch T times over.)

Memory: :data:`CACHE` keeps at most :data:`CACHE_SIZE` graphs (least recently used
dropped first), each with its workspace: for forward about
4·(2·T·B·4H + 2·(T+1)·B·H) + 4H·H·itemsize bytes (gx, gates, h_all, c_all, W_hh), for
backward about 4·(2·T·B·4H + (T+1)·B·H + T·B·H + 2·B·H) + 4H·H·itemsize (+ the step
norms' slots): roughly the size of the saved state of one call, per cached shape.
:func:`clear_cache` frees them all. Dropping an entry while its graph may still be
running is safe: CUDA frees an executable graph destroyed in flight when it completes,
and the workspace, allocated on the caller's stream, goes back to CuPy's pool, which
hands it out again only to later work on that stream (ordered after the replay).

When it pays: every call of a cached shape costs one graph launch instead of T kernel
launches from Python, plus the copies above (one pass over the saved state). A new
shape costs a capture (about what the T launches cost) and a workspace; a workload
whose T changes on almost every call (unbucketed variable-length batches) gains
nothing and holds up to CACHE_SIZE workspaces: ``variant="step"`` suits it better.
Layers of one shape (the upper layers of a stack, both directions) share one graph.

Keys: the runtime's ``graph_key()`` (device and caller's stream for CuPy: two streams
must not share a workspace), the direction and every shape-like input of the plan
(T, B, I, H, dtype, training or step norms, tile), and the calling host thread: threads
calling at once must not share a workspace (they would overwrite each other's inputs
between fill and replay: wrong answers, found by tests/test_contracts.py), so each
thread gets its own graphs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable

CACHE_SIZE = 8


class GraphCache:
    """A bounded LRU map key -> (workspace, graph)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # several threads may look up and evict at once

    def get(self, key):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key, entry):
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            return entry

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return list(self._entries)


CACHE = GraphCache(CACHE_SIZE)


def clear_cache() -> None:
    """Drop every cached graph and workspace (their memory goes back to the pool)."""
    CACHE.clear()


def cached_graph(rt, key, build: Callable[[], tuple[Any, Any]]):
    """The ``(workspace, graph)`` cached under ``(rt.graph_key(), *key, thread)``, built by
    ``build()`` (which allocates the workspace and captures the graph) on a miss."""
    full_key = (rt.graph_key(), *key, threading.get_ident())
    entry = CACHE.get(full_key)
    if entry is None:
        entry = CACHE.put(full_key, build())
    return entry


class Captured:
    """The value of a ``capture()`` block; ``graph`` is set when the block ends."""

    graph: Any = None


# ------------------------------------------------------------------------- CuPy
class CupyGraph:
    """A captured ``cupy.cuda.Graph``, replayed on the caller's current stream."""

    def __init__(self, cupy, graph) -> None:
        self._cupy = cupy
        self._graph = graph

    def launch(self) -> None:
        self._graph.launch(stream=self._cupy.cuda.get_current_stream())


@contextmanager
def cupy_capture(cupy):
    """Capture the launches made in the block on a new non-blocking stream (made
    current for the block). Nothing runs during capture. If the block raises, the
    capture is ended (and the partial graph dropped) before the error propagates, so
    the stream is not left capturing."""
    captured = Captured()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            yield captured
        except BaseException:
            stream.end_capture()
            raise
        graph = stream.end_capture()
    captured.graph = CupyGraph(cupy, graph)


# --------------------------------------------------------------------- emulator
class RecordedGraph:
    """Emulator launches recorded in order; :meth:`launch` runs them all again."""

    def __init__(self, launches: list) -> None:
        self.launches = tuple(launches)

    def launch(self) -> None:
        for launch, grid, block, args in self.launches:
            launch(grid, block, args)


class LaunchRecorder:
    """Held by an EmulatorRuntime: while :meth:`capture` is active, the runtime's
    kernels :meth:`record` their launches here instead of running them."""

    def __init__(self) -> None:
        self.recording = False
        self._launches: list = []

    def record(self, launch: Callable, grid, block, args) -> None:
        """Keep ``launch(grid, block, args)`` for the replay (the emulator kernel with
        its launch options bound)."""
        self._launches.append((launch, grid, block, tuple(args)))

    @contextmanager
    def capture(self):
        if self.recording:
            raise RuntimeError("capture() blocks do not nest")
        captured = Captured()
        self.recording, self._launches = True, []
        try:
            yield captured
        finally:
            self.recording = False
        captured.graph = RecordedGraph(self._launches)
        self._launches = []
