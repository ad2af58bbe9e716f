"""The launch plan of the persistent, weight-stationary kernels, and the chooser.

``lstm_forward_persistent`` and ``lstm_backward_persistent`` (csrc/lstm_forward.cu,
csrc/lstm_backward.cu, machinery in csrc/persistent.cuh), and the GRU's and Elman
RNN's ``gru_*_persistent`` / ``rnn_*_persistent`` (csrc/gru_*.cu, rnn_*.cu: each a
cell policy handed to persistent.cuh's ``forward_recurrence`` / ``backward_recurrence``;
a :class:`PersistentCell` says each cell's names and shared-memory geometry), run all T
steps of the recurrence in ONE cooperative launch: block b keeps its slice of W_hh in shared memory
for the whole sequence and the blocks hand the state of each step to each other
through per-producer ready flags. They save and read exactly what the per-step
kernels do (``_launch.CellSaved``), so a persistent forward pairs with a per-step
backward and the reverse.

The plan, for a problem (B, H) and a device:

* one block per SM (a cooperative launch needs every block resident; one block of
  256 threads with most of the shared memory is what fits): ``units`` =
  ceil(H / SMs) hidden units per block, ``blocks`` = ceil(H / units);
* the block's shared memory (mirror of ``SharedLayout`` in persistent.cuh,
  :func:`shared_bytes`) holds the weight slice (LSTM forward: 4·units rows of H;
  backward: units rounded up to 4, rows of 4H), ``chunk_rows`` staged rows of the
  exchanged state (h_{t-1}: H floats; dz_{t+1}: 4H), the k-partials of the product
  and the per-cell c (forward) or dc carry (backward) of all B rows. The GRU: 3
  instead of 4, no forward carry (h is re-staged every step), the dh·z carry
  backward; the Elman RNN: rows of four consecutive units both ways, no carry;
* ``chunk_rows``: all B rows (rounded up to the row tile) if they fit, else the
  fewest equal chunks that do;
* no plan (``None``) when even one row tile does not fit next to the slice, or the
  device cannot launch cooperatively, or the compiled instance (its registers and
  shared memory, through the occupancy API on a GPU) cannot keep the blocks resident.

:func:`choose` answers "persistent" when both the forward and the backward plans
exist, else "step" (the per-step kernels, any size; ``_launch`` then runs its per-step
default, "graph", the same kernels replayed from a CUDA graph). Device numbers come from the
runtime (``_launch.CupyRuntime`` / ``EmulatorRuntime``): ``sm_count``,
``max_shared_bytes`` (the opt-in maximum of dynamic shared memory per block),
``cooperative_launch`` and ``blocks_per_sm(source, name, threads, shared_mem)``.
The emulator's device is small (4 SMs, 48 KiB) so the splitting and chunking paths
run on small shapes; tests shrink it further.

Speed: PREDICTIONS from arithmetic, nothing measured (no GPU was lent while this was
written). The product reads 2 bytes of shared memory per FMA (8 LDS.128 per 64 FMA,
see slice_times_state), so it is bound by shared-memory bandwidth (128 B/clock/SM) at
64 FMA/clock/SM, half the FP32 peak. H100/H200 at ~1.75 GHz, per step:
  * B=64, H=512 (4 units a block, 128 blocks, all 64 rows in one chunk): 524,288 FMA
    per block, ~8,200 clocks ~ 4.7 us; the k-partials through shared memory (the
    product's stores, sum_partials's loads) ~500 clocks, conflict-free by persistent.cuh's
    swizzle (~3,000 with the plain layout: 8-way loads, 4-way stores; counted by
    rnnkernels/_shared_banks.py, a cost-model term); staging h (128 KiB per block from
    L2, not yet overlapped with the product) ~1-2 us; handing over through the flags
    ~1 us: ~7 us a step, ~1.8 ms forward for T = 256.
  * B=16, H=768 (6 units, 128 blocks): ~2.6 us product + ~0.5 us staging + ~1 us
    hand-over: ~4 us a step, ~4 ms forward for T = 1024.
  * B=1, H=512: latency-bound: ~0.3 us product, ~0.6 us staging (one L2 round trip),
    ~1-1.5 us hand-over (release, flag propagation, the poll's backoff): 2-2.5 us a
    step against the target of <= 2 us; at risk.
Whether that is <= 1.0x cuDNN is for the first GPU session to measure
(benchmarks/). The levers, in order: double-buffer the staging of chunk c+1 behind
the product of chunk c; keep part of the slice in registers (halves the shared-memory
bytes per FMA); for B <= 4 a tile with k_split 32 and row_tile 1 (no padded rows); tune
the poll's backoff (P pollers per block on P flags: a shorter sleep answers sooner but
loads L2 more). Done already: in every cell's kernels, both directions, each thread's
first pair's pointwise inputs (gx forward; the saved gates, states and dy backward)
are loaded before the wait, off the critical path (cost_model.prefetch_saving: a
PREDICTED ~0.13 us a step on an H200, one L2 round trip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORWARD = "forward"
BACKWARD = "backward"
_FLOAT = 4  # bytes


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(value: int, multiple: int) -> int:
    return _ceil_div(value, multiple) * multiple


@dataclass(frozen=True)
class PersistentTile:
    """Compile-time shape of the persistent kernels (template parameters).

    ``threads`` per block; the product splits k into ``k_split`` interleaved parts
    (consecutive threads, so a quarter warp reads 8 consecutive float4s: no bank
    conflicts) and gives each thread ``row_tile`` state rows times 4 weight rows;
    ``in_flight`` 16-byte loads per thread are issued before any is stored when
    staging."""

    name: str
    threads: int
    k_split: int
    row_tile: int
    in_flight: int

    def _parameters(self) -> str:
        return f"{self.threads}, {self.k_split}, {self.row_tile}, {self.in_flight}"

    def forward_name(self, storage: str, training: bool, vector_loads: bool) -> str:
        """The LSTM's forward instance (other cells: :class:`PersistentCell`);
        ``storage``: the C++ Storage type (``_launch.STORAGE_TYPES``)."""
        return LSTM_CELL.forward_name(self, storage, training, vector_loads)

    def backward_name(self, storage: str, step_norms: bool) -> str:
        return LSTM_CELL.backward_name(self, storage, step_norms, True)

    def forward_names(self, storage: str) -> list[str]:
        return [self.forward_name(storage, t, v) for t in (False, True) for v in (False, True)]

    def backward_names(self, storage: str) -> list[str]:
        return [self.backward_name(storage, n) for n in (False, True)]


# 256 threads (8 warps) per SM-filling block: enough warps to hide the shared-memory
# latency of the product while one block per SM keeps all of the shared memory for the
# slice. k_split 8 x row_tile 4 x 4 weight rows: 16 accumulators per thread, 8 LDS.128
# per 64 FMAs, and at B = 64, H = 512 on 132 SMs (4 units a block) 4·16·8 = 512 work
# units: two per thread.
TILE = PersistentTile("persistent256", threads=256, k_split=8, row_tile=4, in_flight=4)

# Kernels that run once per sequence: the NVRTC check holds them to no spills, like
# the per-step kernels.
KERNEL_PREFIXES = tuple(f"rnnkernels::{kernel}_{direction}_persistent<" for kernel in ("lstm", "gru", "rnn")
                        for direction in ("forward", "backward"))


# Static shared memory of the kernels, which shares the opt-in maximum with the dynamic
# part: block_sum's float64 warp sums in the backward with step norms (2 x 8 warps x 8
# bytes = 128 B, ptxas reports it); 256 B leaves room for it with a margin.
STATIC_SHARED_BYTES = 256


@dataclass(frozen=True)
class Plan:
    """One persistent launch: ``blocks`` blocks of ``tile.threads`` threads, each owning
    ``units`` hidden units and staging ``chunk_rows`` batch rows at a time in
    ``shared_bytes`` of dynamic shared memory."""

    direction: str  # FORWARD or BACKWARD
    tile: PersistentTile
    units: int
    blocks: int
    chunk_rows: int
    shared_bytes: int
    cell: str = "lstm"  # the PersistentCell whose kernels it launches


@dataclass(frozen=True)
class PersistentCell:
    """What the plan must know of a cell's persistent kernels: their names and the
    shared-memory geometry of each direction (mirrors the SharedLayout that
    persistent.cuh's recurrences build from the cell policy's gates, gate_items and
    carry). Forward items are either the ``gates`` rows of one unit (LSTM, GRU:
    ``forward_items_are_gates``) or four consecutive units (the Elman cell, one row a
    unit); backward items are always four consecutive units over K = gates·H.
    ``*_carry``: whether the direction keeps a per-cell value of every batch row in
    shared memory (LSTM: c, dc; GRU backward: the dh·z carry)."""

    cell: str
    gates: int
    kernel: str  # rnnkernels::{kernel}_forward_persistent / _backward_persistent
    flags: str = ""  # template arguments after Storage (the Elman cell's Relu)
    forward_items_are_gates: bool = True
    forward_carry: bool = True
    backward_carry: bool = True
    forward_training_flag: bool = True
    backward_vector_flag: bool = True  # the LSTM's 4H rows are always 16-byte loads: no flag

    def forward_name(self, tile: PersistentTile, storage: str, training: bool, vector_loads: bool) -> str:
        head = ", ".join(filter(None, (storage, self.flags, tile._parameters())))
        tail = f", {str(vector_loads).lower()}" + (f", {str(training).lower()}" if self.forward_training_flag else "")
        return f"rnnkernels::{self.kernel}_forward_persistent<{head}{tail}>"

    def backward_name(self, tile: PersistentTile, storage: str, step_norms: bool, vector_loads: bool) -> str:
        head = ", ".join(filter(None, (storage, self.flags, tile._parameters())))
        vector = f", {str(vector_loads).lower()}" if self.backward_vector_flag else ""
        return f"rnnkernels::{self.kernel}_backward_persistent<{head}{vector}, {str(step_norms).lower()}>"

    def names(self, tile: PersistentTile, storage: str) -> tuple[list[str], list[str]]:
        """Every instance the plan can pick for ``storage``: (forward, backward)."""
        trainings = (False, True) if self.forward_training_flag else (True,)
        vectors = (False, True) if self.backward_vector_flag else (True,)
        return ([self.forward_name(tile, storage, t, v) for t in trainings for v in (False, True)],
                [self.backward_name(tile, storage, n, v) for v in vectors for n in (False, True)])

    def geometry(self, direction: str, units: int, hidden: int) -> tuple[int, int, int, int, bool]:
        """(item_rows, weight_rows, reduction, items, carry) of ``direction``."""
        padded_units = _round_up(units, 4)
        if direction == FORWARD:
            if self.forward_items_are_gates:
                return self.gates, self.gates * units, hidden, units, self.forward_carry
            return 4, padded_units, hidden, padded_units // 4, self.forward_carry
        return 4, padded_units, self.gates * hidden, padded_units // 4, self.backward_carry


LSTM_CELL = PersistentCell("lstm", 4, "lstm", backward_vector_flag=False)
GRU_CELL = PersistentCell("gru", 3, "gru", forward_carry=False)
RNN_TANH_CELL = PersistentCell("rnn_tanh", 1, "rnn", flags="false", forward_items_are_gates=False,
                               forward_carry=False, backward_carry=False, forward_training_flag=False)
RNN_RELU_CELL = PersistentCell("rnn_relu", 1, "rnn", flags="true", forward_items_are_gates=False,
                               forward_carry=False, backward_carry=False, forward_training_flag=False)
CELLS = {c.cell: c for c in (LSTM_CELL, GRU_CELL, RNN_TANH_CELL, RNN_RELU_CELL)}


def _cell(cell) -> PersistentCell:
    return cell if isinstance(cell, PersistentCell) else CELLS[cell]


def shared_bytes(direction: str, tile: PersistentTile, batch: int, hidden: int, units: int, chunk_rows: int,
                 gates: int = 4, cell: PersistentCell | str | None = None) -> int:
    """Dynamic shared memory of one block; the arithmetic of ``SharedLayout`` in
    csrc/persistent.cuh (keep the two in step). ``cell``: a :class:`PersistentCell` or
    its name (default: the LSTM's geometry with ``gates`` gate blocks)."""
    if cell is None:
        cell = LSTM_CELL if gates == 4 else PersistentCell("lstm-like", gates, "lstm")
    item_rows, weight_rows, reduction, items, carry = _cell(cell).geometry(direction, units, hidden)
    k_pad = _round_up(reduction, 4)
    groups = chunk_rows // tile.row_tile
    floats = (
        _round_up(weight_rows * k_pad, 4)
        + _round_up(chunk_rows * k_pad, 4)
        + _round_up(items * groups * item_rows * tile.row_tile * tile.k_split, 4)
        + (_round_up(batch * units, 4) if carry else 0)
    )
    return floats * _FLOAT


def plan(direction: str, batch: int, hidden: int, sm_count: int, max_shared: int, tile: PersistentTile = TILE,
         gates: int = 4, cell: PersistentCell | str | None = None) -> Plan | None:
    """The launch for (B, H) on a device with ``sm_count`` SMs and ``max_shared`` bytes
    of dynamic shared memory per block, or None when W_hh's slices do not fit on chip
    (before asking the compiled kernel's occupancy, see :func:`plan_for`). ``gates``
    and ``cell`` as for :func:`shared_bytes`."""
    if batch < 1 or hidden < 1 or sm_count < 1:
        return None
    units = _ceil_div(hidden, sm_count)
    blocks = _ceil_div(hidden, units)
    all_rows = _round_up(batch, tile.row_tile)

    def fits(rows: int) -> bool:
        return shared_bytes(direction, tile, batch, hidden, units, rows, gates, cell) <= max_shared

    if not fits(tile.row_tile):
        return None
    if fits(all_rows):
        chunk_rows = all_rows
    else:
        # The largest chunk that fits, then the fewest equal chunks of at most that.
        largest = tile.row_tile
        while fits(largest + tile.row_tile) and largest + tile.row_tile < all_rows:
            largest += tile.row_tile
        chunks = _ceil_div(batch, largest)
        chunk_rows = _round_up(_ceil_div(batch, chunks), tile.row_tile)
    return Plan(direction, tile, units, blocks, chunk_rows,
                shared_bytes(direction, tile, batch, hidden, units, chunk_rows, gates, cell),
                "lstm" if cell is None else _cell(cell).cell)


def _instance(plan_: Plan, dtype: str, hidden: int, training_or_norms: bool) -> tuple[str, str]:
    from . import _launch

    storage = _launch.STORAGE_TYPES[dtype]
    # 16-byte staging of the exchanged rows (h, or the GRU's and Elman's dz): H % 4 == 0.
    # (The LSTM's backward always stages its 4H-float dz rows so: no such flag.)
    vector_loads = hidden % 4 == 0
    cell, kernels = CELLS[plan_.cell], _launch.ALL_CELL_KERNELS[plan_.cell]
    if plan_.direction == FORWARD:
        return kernels.forward_source, cell.forward_name(plan_.tile, storage, training_or_norms, vector_loads)
    return kernels.backward_source, cell.backward_name(plan_.tile, storage, training_or_norms, vector_loads)


def plan_for(rt, direction: str, batch: int, hidden: int, dtype: str = "float32", flag: bool = True,
             cell: str = "lstm") -> Plan | None:
    """:func:`plan` on runtime ``rt``'s device, checked against the compiled instance
    (``flag``: training for the forward, step norms for the backward): the device must
    launch cooperatively and keep ``blocks`` blocks resident (occupancy, which counts
    the instance's registers and shared memory), else None."""
    if not getattr(rt, "cooperative_launch", False):
        return None
    found = plan(direction, batch, hidden, rt.sm_count, rt.max_shared_bytes - STATIC_SHARED_BYTES, cell=cell)
    if found is None:
        return None
    source, name = _instance(found, dtype, hidden, flag)
    resident = rt.blocks_per_sm(source, name, found.tile.threads, found.shared_bytes) * rt.sm_count
    return found if found.blocks <= resident else None


def choose(rt, batch: int, hidden: int, dtype: str = "float32", cell: str = "lstm") -> str:
    """"persistent" when the forward and backward persistent kernels both fit the
    device for (B, H), else "step" (the per-step path). ``variant=None`` in ``_launch``
    follows it (with "graph", the per-step path's default, for "step")."""
    if plan_for(rt, FORWARD, batch, hidden, dtype, True, cell) and plan_for(rt, BACKWARD, batch, hidden, dtype, True,
                                                                           cell):
        return "persistent"
    return "step"


def require(rt, direction: str, batch: int, hidden: int, dtype: str, flag: bool, cell: str) -> Plan:
    """The plan of ``cell``'s persistent kernel for ``direction`` (``flag``: training or
    step norms) on ``rt``'s device; a ValueError saying why when it does not fit."""
    found = plan_for(rt, direction, batch, hidden, dtype, flag, cell)
    if found is None:
        raise ValueError(
            f"variant 'persistent' does not fit this device for B={batch}, hidden_size={hidden} "
            f"({rt.sm_count} SMs, {rt.max_shared_bytes} B of shared memory per block, cooperative launch "
            f"{'available' if getattr(rt, 'cooperative_launch', False) else 'unavailable'}): W_hh's slices "
            "must fit in the blocks' shared memory; use variant='step'"
        )
    return found


def launch(rt, plan_: Plan, dtype: str, hidden: int, flag: bool, arrays: list, sizes: tuple,
           exchanged) -> None:
    """One cooperative launch of the instance of ``plan_`` (any cell's: ``_launch.
    cell_forward`` / ``cell_backward`` build the arguments): the kernel's array
    arguments ``arrays`` in order, then a fresh zeroed flags array, ``sizes`` (T, B, H),
    the plan's units and chunk rows. With H % 4 == 0 (and always for a backward
    without the vector-loads flag: the LSTM's 4H rows) the kernels stage the
    ``exchanged`` array's rows (h_all forward, dz / dgh / da backward: our own
    workspaces) with 16-byte loads, so its base must be 16-byte aligned, as every
    float32 array of ours is; the caller's arrays are read with scalar loads and may
    sit anywhere."""
    xp = rt.xp
    always_vector = plan_.direction == BACKWARD and not CELLS[plan_.cell].backward_vector_flag
    if hidden % 4 == 0 or always_vector:
        _require_aligned(exchanged, "exchanged between the blocks")
    flags = xp.zeros((plan_.blocks,), dtype=np.uint32)
    source, name = _instance(plan_, dtype, hidden, flag)
    i32 = np.int32
    rt.function(source, name)(
        (plan_.blocks, 1, 1),
        (plan_.tile.threads, 1, 1),
        (*arrays, flags, *(i32(v) for v in sizes), i32(plan_.units), i32(plan_.chunk_rows)),
        shared_mem=plan_.shared_bytes,
        cooperative=True,
    )


def _address(array) -> int:
    if isinstance(array, np.ndarray):
        return array.ctypes.data
    return int(array.data.ptr)


def _require_aligned(array, what: str) -> None:
    """The kernels read ``array`` with 16-byte loads. Our own allocations always are
    (CuPy's pool: 256 B; NumPy's allocator: 16 B or more); say so if one is not rather
    than let a misaligned vector load fault on the GPU."""
    if _address(array) % 16:
        raise RuntimeError(f"internal error: the workspace {what} is not 16-byte aligned")
