"""What the Numba cpu backends of every cell share (``cpu.py``: LSTM, ``cpu_gru.py``,
``cpu_rnn.py``): compiling a variant so that Numba's on-disk cache hits, the packed
step product, the persistent parallel time loops and the rule that picks them, the
thread count and the all-steps input projection (backward's after-loop products,
dW_ih, dW_hh and dx, are ``_cpu_blas.backward_products``: one thread team, the BLAS's
gemm called from it through ``_cpu_team``). A cell's module keeps only its cell
loops, its two serial time loops, the two functions that run its cell over a block of rows for the
persistent loops, and its single-step path; the design is the one ``cpu.py``'s
docstring describes.

Compiled variants, each function under its own name in Numba's cache (float32 and
float64 are signatures of each):

* *serial*: the time loops and cells on one thread;
* *persistent* (``_forward_persistent``, ``_backward_persistent``): ONE parallel
  region per call, the CPU twin of the GPU persistent kernel. The workers stay in it
  for all T steps. The batch rows are split into *teams*, one per worker while each
  gets TEAM_MIN_ROWS (2) rows or more: a row's recurrence never reads another row
  (h_t[b] needs only h_{t-1}[b]; the step norms are summed after the loop), so a
  team runs its rows through all T steps on its own counters and never waits for
  another. Within a team (all the rows where B < 2·TEAM_MIN_ROWS at two threads) each
  step's product is cut into runs of panels (whole 4-panel groups, or pairs of
  panels where the groups are fewer than the chunks wanted) and the cell into blocks
  of rows; the team's workers claim chunks with atomic counters and wait for a phase
  to finish before the next starts (``_cpu_sync.py``: the atomics, why it cannot
  deadlock whatever the threading layer does, and the memory ordering). Each element
  is computed by the serial variant's code (the persistent loops call the serial
  cells on row blocks, and the same tile kernels; which tile computes an element does
  not change it), so the two give the same bits at any thread count. The per-step
  parallel variant it replaced forked and joined Numba's pool twice per step, which
  cost more than half of a 10-20 µs step.

Why teams and pairs (2-core Zen 4 VM, LSTM, float32, quiet, 2026-12-01). Before them
all workers shared every step, and at H = 128 the backward product dh = dz W_hh has
128 columns, 4 panels of 32 float32, ONE 4-panel group, so one chunk: one worker
computed the whole product (8.2 µs a step at 128,8,128, cycle counters around each
phase, not quiet) while the other waited for it (8.3 µs a step), and the backward
loop barely scaled (1.69 -> 1.60 ms from 1 to 2 threads). Pairs of panels alone (one
team) took it to 1.08 ms, teams to about 0.95 ms. The time loops at two threads, one
team with pairs -> teams (``benchmarks/cpu/05_persistent_loop.py --loops``, medians
of 30 paired ratios, p10-p90): 128,8,128 forward 0.91 (0.77-1.01), backward 0.92
(0.70-1.09); 512,8,128 0.82 (0.72-0.90), 0.71 (0.35-0.83); 128,16,256 0.97, 0.97;
64,64,512 0.97, 0.89; 1024,4,64 0.80, 0.65; 256,1,128 and 256,2,128 (one team either
way) 0.99-1.00. One row per team lost (TEAM_MIN_ROWS = 1: 256,2,128 forward 1.36x
one team; each core streams all of W_hh from its L2 for a single row), hence 2. By
phase, ms at 2 threads, the loops before this change -> now
(``benchmarks/cpu/04_thread_interference.py --phases``, 20 calls, each checkout in its
own process, not paired): forward loop 1.05 -> 0.99, backward loop 1.64 -> 0.95 at
128,8,128; 3.70 -> 3.59, 6.53 -> 4.34 at 512,8,128; 6.57 -> 6.09, 6.92 -> 6.48 at
128,16,256; 45.7 -> 44.7, 51.2 -> 50.0 at 64,64,512; 0.56 -> 0.64, 0.85 -> 0.63 at
256,1,128; 4.76 -> 1.73, 4.46 -> 1.94 at 1024,4,64 (one thread: 1.57 / 1.69 ms at
128,8,128). A team of 4 rows at two threads runs within 11% of the serial loop on those
4 rows alone at 512,8,128 and 128,16,256 (3.92 against 3.53 ms forward at 512,8,128).
Whole LSTM calls at two threads against the loops before (``08_against_checkout.py``,
quiet, 41 pairs, this/before): training 0.95 / 0.89 / 0.98 / 0.96 / 0.88 / 0.87 at
128,8,128 / 512,8,128 / 128,16,256 / 64,64,512 / 256,1,128 / 1024,4,64, inference
0.91-0.99 (at B <= 2, one team, the algorithm unchanged: 256,1,128 0.995, 256,2,128
1.000, 512,2,64 1.007, 161 pairs, p10-p90 within 0.90-1.11); at one thread (the
serial loop, whose product now goes through ``_product_panels`` too) 0.97-1.03,
within the spreads.

The rule (``time_loop``): persistent when Numba has more than one thread, the step
product has at least 2^14 multiply-adds (B·gates·H²), and there is something to
share: at least two 4-panel groups (gates·H columns) or at least two teams of rows.
Measured on the 2-core Zen 4 VM, LSTM inference, two threads, float32, our persistent
loop against our serial loop in one process (``benchmarks/cpu/05_persistent_loop.py``,
quiet, 2026-12-01, before teams; medians of 30 paired ratios, whole calls including
the projection): (T,B,H) = 512,1,64 0.85, 512,2,64 0.91, 512,2,96 0.91, 256,1,128
0.77, 1024,4,64 0.85, 128,8,128 0.76, 512,8,128 0.74, 128,16,256 0.70, 64,64,512 0.70
(the fork-per-step variant: 0.88, 0.93, 0.72, 0.70 at the last four, 1.38-1.80 below
B·H = 1024); it lost where the product has one group (512,2,32 1.14, 512,4,32 1.06,
512,8,32 1.06) and at 16,2,8 (1.15). With teams one group is enough where the rows
make two teams (training, quiet, 30 pairs, persistent over serial): LSTM 512,8,32 0.87
(0.76-0.97), 512,4,32 0.98 (0.89-1.09), but 512,2,32 (one team) 1.20 and 16,2,8 1.19;
the tanh Elman RNN (one group up to H = 128) 128,8,128 0.89, 512,8,128 0.87,
1024,4,64 0.94 (128,16,256, two groups: 0.87), its 256,1,128 (one team) 0.97
(0.90-1.08), left serial; the GRU at 1024,4,64 0.91 (one team: 1.05), 128,8,128
0.83. Training (forward + backward, OPENBLAS_NUM_THREADS=1), before teams: 0.81-0.95
at 128,8,128, 512,8,128, 128,16,256, 1024,4,64, 256,1,128. Against torch.nn.LSTM at two threads
(``benchmarks/cpu_vs_torch.py --threads 2``, quiet): see README's table.
Chunks per worker: one product chunk and one cell chunk per worker and step ran
1-9% faster than two of each (fewer atomics on the shared lines; the same at
64,64,512). Tried and lost:
each worker preferring the same chunks every step (its weight panels stay in its
core's cache) with all workers in lock-step per phase: no gain at 128,16,256 and
64,64,512, 0.94-0.99 instead of 0.75-0.78 at 128,8,128 (the claim-ahead order, where
a worker done early already holds a chunk of the next phase, wins).

The input projection is one product, split over the threads from PARALLEL_MIN_MACS
multiply-adds up (``project``: one fork for the whole product).
"""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import numba
import numpy as np

from . import _cpu_gemm, _cpu_sync, _fastmath

# The rule for the persistent time loop (``time_loop``), measured on this project's
# 2-core x86 VM: the module docstring. PARALLEL_MIN_UNITS (B·H) is a second floor, 1 by
# default, for ``benchmarks/cpu_vs_torch.py --parallel-min-units`` (e.g. 4096: the old
# rule's floor, to compare).
PERSISTENT_MIN_MACS = 1 << 14
PERSISTENT_MIN_GROUPS = 2
PARALLEL_MIN_UNITS = 1
# Below this many multiply-adds a product is not split over threads (a fork costs some
# microseconds; 2^20 multiply-adds take about 30 µs on one core).
PARALLEL_MIN_MACS = 1 << 20
_PANEL_BYTES = _cpu_gemm.panel_width(np.float32) * 4  # the same for every dtype


def _check_product(a, packed, out, bias):
    """The shapes the kernel trusts (it reads K from a and writes whole panels)."""
    if a.shape[1] != packed.shape[1] or out.shape[0] != a.shape[0] or out.shape[1] < packed.shape[0] * packed.shape[2]:
        raise ValueError("step product: a, packed and out do not fit together")
    if packed.shape[2] * a.itemsize != _PANEL_BYTES:
        raise ValueError("step product: packed was not made by _cpu_gemm.pack for this dtype")
    if bias is not None and bias.shape[0] < packed.shape[0] * packed.shape[2]:
        raise ValueError("step product: bias is shorter than the packed width")


def _product_panels(a, packed, out, bias, first, end):
    """``_product``'s work for panels first:end (columns first·W to end·W): blocks of 4
    rows (by 2 panels at a time with AVX-512's 32 registers, else 1), and a last
    block of 1-3 rows through kernels that keep 8 accumulators busy where the panels
    allow (1 row by 4 panels, 2 rows by 2). Which tile computes an element does not
    change it (every tile sums over k in order, from 0, with one FMA per k), so any
    split of the panels or rows gives the same bits. Unchecked: the callers check once
    (``_check_product``)."""
    rows = a.shape[0]
    full = rows - rows % 4
    rest = rows - full
    pairs_end = end - (end - first) % 2
    if _cpu_gemm.TWO_PANEL_BLOCKS:  # a compile-time constant
        for panel in range(first, pairs_end, 2):
            for row in range(0, full, 4):
                _cpu_gemm.tile4x2(a, row, packed, panel, out, bias)
        if pairs_end < end:
            for row in range(0, full, 4):
                _cpu_gemm.tile4x1(a, row, packed, pairs_end, out, bias)
    else:
        for panel in range(first, end):
            for row in range(0, full, 4):
                _cpu_gemm.tile4x1(a, row, packed, panel, out, bias)
    if rest == 1:
        panel = first
        while panel + 4 <= end:
            _cpu_gemm.tile1x4(a, full, packed, panel, out, bias)
            panel += 4
        if panel + 2 <= end:
            _cpu_gemm.tile1x2(a, full, packed, panel, out, bias)
            panel += 2
        if panel < end:
            _cpu_gemm.tile1x1(a, full, packed, panel, out, bias)
    elif rest == 2:
        for panel in range(first, pairs_end, 2):
            _cpu_gemm.tile2x2(a, full, packed, panel, out, bias)
        if pairs_end < end:
            _cpu_gemm.tile2x1(a, full, packed, pairs_end, out, bias)
    elif rest == 3:
        for panel in range(first, end):
            _cpu_gemm.tile3x1(a, full, packed, panel, out, bias)


def _product(a, packed, out, bias):
    """out[:, :N] = a [R, K] @ M [K, N] (+ bias unless None) for M packed by
    ``_cpu_gemm.pack``; out [R, ≥N] C-contiguous, its columns past N get the zero
    padding's products (zeros, plus the bias's padding); bias [≥ out's columns], added
    by the kernel as it stores each tile. Groups of 4 panels (``_product_panels``; the
    parallel variant splits the groups over the threads)."""
    check_product(a, packed, out, bias)  # noqa: F821 - a global of each variant
    panels = packed.shape[0]
    for group in numba.prange((panels + 3) // 4):
        product_panels(a, packed, out, bias, 4 * group, min(panels, 4 * group + 4))  # noqa: F821


def _team(batch, workers, teams, worker, row_parts, product_parts, panels):
    """Worker ``worker``'s team and its share of the work: (team, first_row, end_row,
    row_chunk, panel_chunk, product_chunks, per_step): the last two are how many
    product chunks a step has and how many chunks in all (product and cell). Team k of ``teams`` owns rows k·B//teams up to
    (k+1)·B//teams for all T steps and has the workers w with w % teams == k; its
    members split each phase into about ``row_parts`` cell chunks (blocks of rows) and
    ``product_parts`` product chunks (runs of ``panel_chunk`` panels) per member. A
    product chunk is whole 4-panel groups where there are enough groups, else pairs of
    panels (the 2-panel tiles: 1 row by 2 panels still keeps 4 FMA chains): with one
    group (H = 128 backward, 4 panels of 32 float32) two members would otherwise get
    one chunk, and one of them would wait for the other's whole product."""
    team = worker % teams
    members = workers // teams + (1 if team < workers % teams else 0)
    first_row = team * batch // teams
    end_row = (team + 1) * batch // teams
    row_chunk = max(1, -(-(end_row - first_row) // (row_parts * members)))
    parts = product_parts * members
    unit = 4 if (panels + 3) // 4 >= parts else 2
    units = (panels + unit - 1) // unit
    panel_chunk = unit * max(1, (units + parts - 1) // parts)
    product_chunks = (panels + panel_chunk - 1) // panel_chunk
    per_step = product_chunks + (end_row - first_row + row_chunk - 1) // row_chunk
    return team, first_row, end_row, row_chunk, panel_chunk, product_chunks, per_step


def _forward_persistent(h, packed, z, state, counters, workers, teams, row_parts, product_parts):
    """All T steps of a forward in ONE parallel region (``_cpu_sync``: how the workers
    share the chunks and why it cannot deadlock). h [T+1, B, H] with h[0] set; packed:
    W_hhᵀ packed; z [B, ≥ packed width] scratch; ``state``: the cell's arrays, passed
    to its ``forward_rows(state, z, t, first_row, end_row)``; counters [≥ teams, ...]
    (``_cpu_sync.team_counters``). The batch rows are split into ``teams`` blocks
    (at most one per worker and per row): a row's recurrence never reads another row,
    so each team runs its rows through all T steps on its own counters and never
    waits for another team (``_team``). Per step and team: the product h_t W_hhᵀ of
    its rows in runs of panels, then the cell over its rows in blocks; each element by
    the same code as the serial loop, so the same bits."""
    steps = h.shape[0] - 1
    batch = h.shape[1]
    panels = packed.shape[0]
    used_teams = max(1, min(teams, workers, batch))
    check_product(h[0], packed, z, None)  # noqa: F821 - a global of each variant
    for worker in numba.prange(workers):
        team, first_row, end_row, row_chunk, panel_chunk, product_chunks, per_step = team_share(  # noqa: F821
            batch, workers, used_teams, worker, row_parts, product_parts, panels
        )
        total = steps * per_step
        own = counters[team]
        while True:
            index = _cpu_sync.claim(own)
            if index >= total:
                break
            t = index // per_step
            chunk = index - t * per_step
            if chunk < product_chunks:
                _cpu_sync.wait(own, t * per_step)  # step t-1's cell is done (these rows)
                product_panels(  # noqa: F821
                    h[t][first_row:end_row], packed, z[first_row:end_row], None,
                    chunk * panel_chunk, min(panels, (chunk + 1) * panel_chunk),
                )
            else:
                _cpu_sync.wait(own, t * per_step + product_chunks)  # step t's product is done
                first = first_row + (chunk - product_chunks) * row_chunk
                forward_rows(state, z, t, first, min(end_row, first + row_chunk))  # noqa: F821
            _cpu_sync.finish(own)


def _backward_persistent(grad, packed, out, state, counters, workers, teams, row_parts, product_parts):
    """All T steps of a backward loop in ONE parallel region, steps T-1 down to 0: per
    step the cell's ``backward_rows(state, out, t, first_row, end_row)`` in blocks of
    rows (it reads ``out``, the gradient reaching h_t through W_hh, and writes
    grad[t]), then out = grad[t] @ M with M packed, in runs of panels. grad
    [T, B, K]; out [B, ≥ packed width]. Rows in ``teams`` blocks, each on its own
    counters, as in ``_forward_persistent``."""
    steps = grad.shape[0]
    batch = grad.shape[1]
    panels = packed.shape[0]
    used_teams = max(1, min(teams, workers, batch))
    check_product(grad[0], packed, out, None)  # noqa: F821 - a global of each variant
    for worker in numba.prange(workers):
        team, first_row, end_row, row_chunk, panel_chunk, product_chunks, per_step = team_share(  # noqa: F821
            batch, workers, used_teams, worker, row_parts, product_parts, panels
        )
        row_chunks = per_step - product_chunks  # a step's cell chunks come first here
        total = steps * per_step
        own = counters[team]
        while True:
            index = _cpu_sync.claim(own)
            if index >= total:
                break
            s = index // per_step
            t = steps - 1 - s
            chunk = index - s * per_step
            if chunk < row_chunks:
                _cpu_sync.wait(own, s * per_step)  # step t+1's product is done (these rows)
                first = first_row + chunk * row_chunk
                backward_rows(state, out, t, first, min(end_row, first + row_chunk))  # noqa: F821
            else:
                _cpu_sync.wait(own, s * per_step + row_chunks)  # step t's cell is done
                chunk -= row_chunks
                product_panels(  # noqa: F821
                    grad[t][first_row:end_row], packed, out[first_row:end_row], None,
                    chunk * panel_chunk, min(panels, (chunk + 1) * panel_chunk),
                )
            _cpu_sync.finish(own)


def _project_chunk(x, first, count, first_row, end_row, packed, bias, gates, rows_in):
    """gates[:count·R] = the input projection of steps first:first+count, batch rows
    first_row:end_row (R of them), rows in step order: x [T, B, I] @ the packed W_ihᵀ
    (+ bias unless None), for the cells' inference loops. rows_in [≥ count·R, I]
    scratch, used only when the rows are not the whole batch (then a step's rows of x
    are not adjacent to the next step's)."""
    _, batch, inputs = x.shape
    count_rows = end_row - first_row
    rows = count * count_rows
    if count_rows == batch:
        a = x[first : first + count].reshape(rows, inputs)
    else:
        a = rows_in[:rows]
        for s in range(count):
            a[s * count_rows : (s + 1) * count_rows] = x[first + s, first_row:end_row]
    product(a, packed, gates[:rows], bias)  # noqa: F821 - a global of each variant


def _pack_panels(matrix, packed, first, end):
    """packed[first:end] = panels first:end of ``_cpu_gemm.pack(matrix.T)``:
    packed[p, k, c] = matrix[p·W + c, k], zero past matrix's rows. matrix [N, K]
    C-contiguous (W_ih or W_hh as given: its rows are the product's columns); packed
    [ceil(N/W), K, W]. For the inference split, whose threads pack the weights between
    them before their rows' steps (``cpu._inference_split``); a copy, so the same array
    as ``_cpu_gemm.pack``'s. Each column of a panel is one contiguous row of the
    matrix, written at a stride of W: at 2048 x 512 float32 0.75 ms against NumPy's
    strided copy's 1.43 ms (not quiet), and split over the threads."""
    rows, depth = matrix.shape
    width = packed.shape[2]
    zero = packed.dtype.type(0)
    for panel in range(first, end):
        for column in range(width):
            row = panel * width + column
            if row < rows:
                source = matrix[row]
                for k in range(depth):
                    packed[panel, k, column] = source[k]
            else:
                for k in range(depth):
                    packed[panel, k, column] = zero


def _step_product(a, packed, out):
    """``_product`` without a bias: the per-step product the time loops call (its
    interface unchanged for the cells' loops)."""
    product(a, packed, out, None)  # noqa: F821 - a global of each variant


# Numba's on-disk cache (cache=True) files a compiled function under its qualified name
# and first line, and keys the entry by its signature, its bytecode and a pickle of its
# closure. Two rules follow, and ``compile_function`` keeps both:
# * a closure over a jitted function never hits: the dispatcher pickles with an id that
#   is new in every process, so each process compiled anew and appended two files to
#   the cache. The loops therefore close over nothing; the dtype's activations come in
#   through the generic ``_fastmath.sigmoid``/``tanh``, and a variant's callees through
#   its globals;
# * ``parallel=`` is not part of the key: compiled from one function, the serial and
#   parallel variants shared one entry, and whichever compiled first in a process served
#   both. Each variant is therefore a copy of the function under its own name. The
#   name also carries a digest of _fastmath.py, _cpu_gemm.py and this file (the step
#   product), since Numba checks only the timestamp of the file the function is defined
#   in, and a time loop's cache entry holds its callees' code too.
# dtypes need nothing more: float32 and float64 are two signatures of one dispatcher.
SOURCE_DIGEST = hashlib.sha256(
    b"".join(Path(module.__file__).read_bytes() for module in (_fastmath, _cpu_gemm, _cpu_sync)) + Path(__file__).read_bytes()
).hexdigest()[:12]


def compile_function(py_func, variant, parallel, callees=None, inline=False):
    """``py_func`` compiled as its own cached dispatcher named ``{name}_{variant}``,
    with ``callees`` (name: dispatcher) added to the globals it sees; ``inline``: into
    its callers, at Numba's IR level."""
    name = f"{py_func.__name__}_{variant}"
    func = types.FunctionType(py_func.__code__, dict(py_func.__globals__, **(callees or {})), name)
    # The vector width shapes the generated code but not the source: it is in the name.
    func.__qualname__ = f"{name}_{SOURCE_DIGEST}_v{_cpu_gemm.VECTOR_BYTES}"
    func.__doc__ = py_func.__doc__
    return numba.njit(
        nogil=True,
        cache=True,
        inline="always" if inline else "never",
        parallel=parallel,
        error_model="numpy",  # no zero-division branches: they stop vectorization
        # ``reassoc`` lets the norm sums in backward vectorize; everything else in the
        # cell loops is products, where it changes nothing but the last bit.
        fastmath={"contract", "reassoc"},
    )(func)


_PRODUCT_CALLEES = {
    "check_product": compile_function(_check_product, "serial", False),
    "product_panels": compile_function(_product_panels, "serial", False),
}
_TEAM_SHARE = compile_function(_team, "serial", False)
PRODUCT = {
    parallel: compile_function(_product, "parallel" if parallel else "serial", parallel, _PRODUCT_CALLEES)
    for parallel in (False, True)
}
STEP_PRODUCT = compile_function(_step_product, "serial", False, {"product": PRODUCT[False]})
# Inlined into each cell's inference loop: as a dispatcher of its own, its compiled code
# (the product's, linked in) was optimized once for it and once more for every loop.
PROJECT_CHUNK = compile_function(_project_chunk, "serial", False, {"product": PRODUCT[False]}, inline=True)
PACK_PANELS = compile_function(_pack_panels, "serial", False, inline=True)


def compile_variant(label, cells, loops):
    """The serial variant of a cell: ``cells`` (attribute name: Python function) and
    ``loops`` (the time loops, which call the cells and ``step_product`` through their
    globals), compiled serial. Returns a namespace of dispatchers by attribute name;
    ``label`` ("serial", "tanh_serial" ...) names them in the cache."""
    variant = types.SimpleNamespace()
    callees = {"step_product": STEP_PRODUCT}
    for attribute, py_func in cells.items():
        callees[attribute] = compile_function(py_func, label, False)
    for attribute, py_func in loops.items():
        setattr(variant, attribute, compile_function(py_func, label, False, callees))
    for attribute, dispatcher in callees.items():
        setattr(variant, attribute, dispatcher)
    return variant


def compile_inference(label, serial, steps):
    """A cell's inference loop ``steps`` (all T steps over a block of batch rows, the
    projection a chunk at a time through ``project_chunk``) with the serial variant's
    cell (``serial``: its namespace) and step product. The Python function lives in
    the cell's module, so that Numba's cache, which checks only its file's timestamp,
    sees a change to the cell."""
    return compile_function(
        steps, label, False,
        {"project_chunk": PROJECT_CHUNK, "step_product": STEP_PRODUCT, "cell_forward": serial.cell_forward},
    )


def compile_persistent(label, serial, rows):
    """The persistent variant of a cell: ``_forward_persistent`` and
    ``_backward_persistent`` (one parallel region per call) around the cell's ``rows``
    functions ({"forward_rows": ..., "backward_rows": ...}: one step's cell over a
    block of rows), which call the *serial* variant's cells (``serial``: its
    namespace), so every element comes from the serial loop's code. Returns a
    namespace like ``compile_variant``'s; ``label`` names its dispatchers in the cache."""
    variant = types.SimpleNamespace()
    cells = {name: getattr(serial, name) for name in ("cell_forward", "cell_backward")}
    callees = dict(_PRODUCT_CALLEES, team_share=_TEAM_SHARE)
    for attribute, py_func in rows.items():
        callees[attribute] = compile_function(py_func, label, False, cells)
    for attribute, py_func in (("forward_steps", _forward_persistent), ("backward_steps", _backward_persistent)):
        setattr(variant, attribute, compile_function(py_func, label, True, callees))
    for attribute in rows:
        setattr(variant, attribute, callees[attribute])
    return variant


def compiled_functions(variants):
    """The dispatchers of ``variants`` ({label: namespace}) by name,
    ``{attribute}_{label}``: for tests and profiling (``dispatcher.stats.cache_hits``)."""
    return {
        f"{attribute}_{label}": dispatcher
        for label, variant in variants.items()
        for attribute, dispatcher in vars(variant).items()
    }


def threads():
    """Numba's thread count for the calling thread (numba.set_num_threads may lower it)."""
    return numba.get_num_threads()


def _step_norms(row_sq, dh_norms, dc_norms):
    """dh_norms[t], dc_norms[t] = the square roots of row_sq [T, B, 2]'s column sums
    over the rows of step t: the LSTM's persistent backward, whose cells write each
    step's per-row sums to row_sq[t]. The sums are the serial cell's loop (same order,
    same flags), so the same bits."""
    for t in range(row_sq.shape[0]):
        rows = row_sq[t]
        dh_total = 0.0
        dc_total = 0.0
        for b in range(rows.shape[0]):
            dh_total += rows[b, 0]
            dc_total += rows[b, 1]
        dh_norms[t] = np.sqrt(dh_total)
        dc_norms[t] = np.sqrt(dc_total)


def _step_norm(row_sq, dh_norms):
    """dh_norms[t] = the square root of the sum of row_sq [T, B] over step t's rows:
    the one-norm cells' (GRU, Elman) persistent backward, as ``_step_norms``."""
    for t in range(row_sq.shape[0]):
        rows = row_sq[t]
        dh_total = 0.0
        for b in range(rows.shape[0]):
            dh_total += rows[b]
        dh_norms[t] = np.sqrt(dh_total)


STEP_NORMS = compile_function(_step_norms, "serial", False)
STEP_NORM = compile_function(_step_norm, "serial", False)


def time_loop(batch, hidden, gates, dtype):
    """Which time loop runs steps of B x H for a cell of ``gates`` gates in ``dtype``:
    "serial" or "persistent" (one parallel region per call). Persistent when Numba has
    more than one thread, B·H >= PARALLEL_MIN_UNITS, the step product has at least
    PERSISTENT_MIN_MACS multiply-adds (B·gates·H²), and there is something to share:
    at least PERSISTENT_MIN_GROUPS 4-panel groups of the product (gates·H columns) or
    at least two teams of rows (B >= 2·TEAM_MIN_ROWS, ``persistent_arguments``); the
    module docstring has the measurements. Both loops compute the same bits
    (tests/test_cpu.py and tests/test_cpu_cells.py check it), so the rule decides
    speed only."""
    groups = -(-gates * hidden // (4 * _cpu_gemm.panel_width(dtype)))
    if threads() < 2 or batch * hidden < PARALLEL_MIN_UNITS:
        return "serial"
    if groups < PERSISTENT_MIN_GROUPS and _teams(batch, threads()) < 2:
        return "serial"
    return "persistent" if batch * gates * hidden * hidden >= PERSISTENT_MIN_MACS else "serial"


# Inference (training=False, T > 1; cpu.py's docstring): rows (chunk steps x B rows)
# of input projection per chunk, and the batch rows per thread from which the batch is
# split over the threads (one row block each) instead of the persistent loop.
INFERENCE_CHUNK_ROWS = 64
# Where W_ih's packed panels are over LARGE_WEIGHTS_BYTES (half of the 2 MB L2 of the
# project's Zen 4 cores: they come from L3 on every chunk, the step's W_hh with them),
# the chunk is LARGE_CHUNK_ROWS rows, so that each pass over W_ih serves 4x the rows.
# Whole inference calls, quiet, medians of 30-40 paired ratios (2-core Zen 4 VM,
# float32, /tmp scripts of experiment 13's kind, 2026-12-02 01:18-01:20 UTC), 256 rows
# over 64: (T,B,I=H) = 64,64,512 two threads 0.950 (0.864-1.040), 0.913 (0.757-1.042)
# in a second run, one thread 0.951 (0.923-1.009); 128,16,512 one thread 0.925
# (0.787-0.973), two 0.994 (0.941-1.078); 512 rows within 1% of 256 and 1024 no
# better. Where W_ih fits (I = 256 and below) 256 rows lost or did nothing: 128,16,256
# two threads 1.054 (0.829-1.357), 512,8,128 1.015 (0.872-1.227).
LARGE_WEIGHTS_BYTES = 1 << 20
LARGE_CHUNK_ROWS = 256
SPLIT_MIN_ROWS = 4


def inference_blocks(batch, hidden, gates, dtype):
    """Row blocks an inference forward of a cell of ``gates`` gates splits the batch
    into, one per thread (the cell's parallel inference loop): from two threads and
    2·SPLIT_MIN_ROWS rows; else 1 at one thread or where ``time_loop`` says serial; 0
    where the persistent loop runs instead. Every choice gives the same bits."""
    workers = threads()
    if workers >= 2 and batch >= 2 * SPLIT_MIN_ROWS:
        return min(workers, batch // SPLIT_MIN_ROWS)
    return 1 if workers < 2 or time_loop(batch, hidden, gates, dtype) == "serial" else 0


# Panels per packing chunk of the inference split (``split_packing``): 8 panels of W_hh
# at H = 512 are 512 KB, 0.1 ms of packing, so a thread waits at most about that long
# for the other's last chunk.
PACK_CHUNK_PANELS = 8


def split_packing(w_ih, w_hh):
    """(w_ih, w_hh as C-contiguous arrays, packed_ih, packed_hh (empty: the split's
    threads fill them, ``_pack_panels``), counters) for a cell's inference split.
    Read-only weights (np.load(mmap_mode="r"), np.frombuffer) are copied: the split
    reads them in its compiled region, where a read-only array is another Numba type,
    a second cold compile of the whole split (about 6 s, not quiet) for the same code;
    the copy is one serial pass on the calling thread, for read-only weights only."""
    w_ih, w_hh = (np.ascontiguousarray(w) if w.flags.writeable else np.array(w, order="C") for w in (w_ih, w_hh))
    width = _cpu_gemm.panel_width(w_ih.dtype)
    packed = [np.empty((-(-w.shape[0] // width), w.shape[1], width), w.dtype) for w in (w_ih, w_hh)]
    return w_ih, w_hh, packed[0], packed[1], _cpu_sync.counters()


def inference_scratch(blocks, x, packed_ih, packed_hh):
    """(bounds [blocks+1], z, gates, rows_in) for a cell's inference loops over
    ``blocks`` row blocks of x [T, B, I]: the blocks' bounds, and per block the step
    product's output [R, W_hh's packed width], one chunk's projection [chunk·R, W_ih's
    packed width] and its inputs [chunk·R, I] (empty for one block), R the largest
    block's rows; a chunk is INFERENCE_CHUNK_ROWS rows, LARGE_CHUNK_ROWS where the
    packed W_ih is over LARGE_WEIGHTS_BYTES (whole steps, at least one). Any chunk
    gives the same bits."""
    steps, batch, input_size = x.shape
    rows = -(-batch // blocks)
    chunk_rows = LARGE_CHUNK_ROWS if packed_ih.nbytes > LARGE_WEIGHTS_BYTES else INFERENCE_CHUNK_ROWS
    chunk = max(1, min(steps, chunk_rows // rows))
    bounds = np.array([batch * i // blocks for i in range(blocks + 1)], np.int64)
    z = np.empty((blocks, rows, packed_hh.shape[0] * packed_hh.shape[2]), x.dtype)
    gates = np.empty((blocks, chunk * rows, packed_ih.shape[0] * packed_ih.shape[2]), x.dtype)
    rows_in = np.empty((blocks, chunk * rows if blocks > 1 else 0, input_size), x.dtype)
    return bounds, z, gates, rows_in


def padded_bias(bias, packed, columns, dtype):
    """bias [columns] as the packed width's row (zeros past ``columns``), for the packed
    kernel to add as it stores each tile. Without a bias, -0.0 everywhere: x + (-0.0)
    is x for every x (+0.0 would turn a -0.0 sum into +0.0), so the same bits as no
    addition, and the inference loops need no second specialization (a cold compile
    of one costs seconds)."""
    width = packed.shape[0] * packed.shape[2]
    if bias is None:
        return np.full(width, -0.0, dtype)
    padded = np.zeros(width, dtype)
    padded[:columns] = bias
    return padded


ROW_CHUNKS_PER_WORKER = 1
PRODUCT_CHUNKS_PER_WORKER = 1
# Rows per team at least (``persistent_arguments``): the batch is split into
# min(workers, B // TEAM_MIN_ROWS) teams of rows, at least one.
TEAM_MIN_ROWS = 2


def persistent_arguments(batch, packed):
    """(counters, workers, teams, row_parts, product_parts) for a persistent loop: zeroed
    counters for each team, Numba's thread count, the teams of rows, and the cell and
    product chunks per team member and phase."""
    workers = threads()
    teams = _teams(batch, workers)
    return _cpu_sync.team_counters(teams), workers, teams, ROW_CHUNKS_PER_WORKER, PRODUCT_CHUNKS_PER_WORKER


def _teams(batch, workers):
    """Teams of rows for ``batch`` rows and ``workers`` workers: one per worker while
    each gets TEAM_MIN_ROWS rows or more, at least one."""
    return max(1, min(workers, batch // TEAM_MIN_ROWS))


def project(a, packed, columns, bias=None):
    """a [M, K] @ M_packed (+ bias [columns]) as a new C-contiguous [M, columns] array
    (the packed matrix's first ``columns`` columns): one fork for the whole product,
    parallel when there is more than one thread and at least PARALLEL_MIN_MACS
    multiply-adds. A bias of a's dtype is added by the kernel as it stores each tile
    (no second pass over the output; the same bits as adding it after); one of another
    dtype by NumPy afterwards."""
    rows = a.shape[0]
    width = packed.shape[0] * packed.shape[2]
    parallel = rows * width * a.shape[1] >= PARALLEL_MIN_MACS and threads() > 1
    out = np.empty((rows, width), a.dtype)
    fused = None
    if bias is not None and bias.dtype == a.dtype:
        fused = np.zeros(width, a.dtype)  # the packed width: padding columns get 0
        fused[:columns] = bias
    PRODUCT[parallel](np.ascontiguousarray(a), packed, out, fused)
    out = out if width == columns else np.ascontiguousarray(out[:, :columns])
    if bias is not None and fused is None:
        out += bias
    return out


def check_jit():
    """The cpu backends' ``check_available``: their tiles and atomics are LLVM IR written
    by hand (``numba.extending.intrinsic``), which has no pure-Python form, so they
    cannot run with Numba's compiler off (NUMBA_DISABLE_JIT=1, a debugging switch);
    without this the first call failed deep inside with "<intrinsic tile> is not usable
    in pure-python"."""
    if numba.config.DISABLE_JIT:
        raise RuntimeError(
            "backend 'cpu' runs Numba-compiled code, and NUMBA_DISABLE_JIT=1 turns Numba's compiler off; "
            "unset NUMBA_DISABLE_JIT, or pass backend='reference' (NumPy, float64)"
        )
