"""The launch plan of the CUDA kernels (LSTM, GRU, Elman RNN), written once for two runtimes.

``cell_forward`` and ``cell_backward`` below, one launch plan for every cell (the LSTM's
``forward`` and ``backward`` are they with the LSTM's :class:`CellKernels`), allocate the
workspaces, choose tiles and launch the kernels of ``csrc/`` through a small *runtime*
object with these members:

* ``xp``: the array module (CuPy on a GPU, NumPy for the emulator);
* ``sm_count``: streaming multiprocessors, for the tile heuristic;
* ``function(source, name_expression)``: a launchable kernel,
  ``kernel(grid, block, args, shared_mem=0, cooperative=False)`` with arrays as
  pointers and NumPy scalars (``np.int32``) by value;
* ``max_shared_bytes``, ``cooperative_launch``, ``blocks_per_sm(...)``: what the
  persistent plan needs to know of the device (``rnnkernels/_persistent.py``);
* ``gemm(a, b, c, transpose_a=, transpose_b=, accumulate=)``: the large products
  (``rnnkernels/_gemm.py``: cuBLAS, or NumPy float32 in the emulator);
* ``capture()`` and ``graph_key()``: record a region of launches once and replay it
  (CUDA graphs, or the emulator's recording), for the ``graph`` variant
  (``rnnkernels/_graph.py``).

:class:`CupyRuntime` (``backend="cuda"``) compiles with NVRTC through
``cupy.RawModule`` and launches on the caller's current CuPy stream;
:class:`EmulatorRuntime` (``backend="emulated"``) runs the same kernels, compiled
from the same text, on the CPU emulator (``rnnkernels.emulator``). So every launch
the GPU makes is also made, and checked, in CI.

Variants (:data:`VARIANTS`). "persistent": one cooperative launch per direction runs
all T steps with W_hh's slices in shared memory (``rnnkernels/_persistent.py``);
"graph": the per-step kernels below, their T launches captured once per call shape and
replayed; "step": the same kernels launched one by one from Python. ``variant=None``
takes persistent or graph, whichever the cost model predicts faster among those that
fit the device (:func:`_default_variant`). Every forward variant saves the same arrays
(:class:`CellSaved`), so any forward pairs with any backward.

What differs between cells is in each cell's :class:`CellKernels`: its kernels' names
and flags, its step norms' count, and its :class:`Recurrence`: the states it carries
(the LSTM: h and c) and the arrays its kernels take and give; the plan itself has no
per-cell branch.

Which matrix product, and why. The input projection (x·W_ihᵀ + b over all T·B rows)
and the weight/input gradients after the backward loop (dx, dW_ih, dW_hh, dh0) are large
GEMMs: they run on cuBLAS through CuPy (exact FP32, never TF32; float16 operands with
float32 accumulation; deterministic on one stream), and on NumPy float32 in the
emulator, through the runtime's ``gemm`` method (``rnnkernels/_gemm.py`` says exactly
what is called and why). The emulator therefore checks the plan and our kernels, not
cuBLAS's bits. db stays on our ``column_sum`` kernel: a fixed-order sum, deterministic
by construction (a cuBLAS gemv with a ones vector would be too, on one stream, but
gains nothing for a [T·B, 4H] column sum that reads dz once).

Precision. float32 and float16 problems run the same kernel templates with a storage
type parameter (:data:`STORAGE_TYPES`): inputs are read and outputs written in the
problem's dtype, while every product, sum and activation, and every workspace (gx,
h_all, c_all, gates, dgates, the dc carry), is float32. The recurrence consumes the
float32 h_t, not its float16 rounding; y, h_n, c_n, dc0 and the GEMMs' float32 dx,
dW_ih, dW_hh, dh0 are rounded to float16 (nearest even) by ``astype`` here, db by the
kernel that writes it.
The float32 instances are exactly the float32 kernels (the storage helpers are the
identity for float).

Every kernel instance the launcher can pick is listed in ONE table, :data:`KERNELS`;
the NVRTC check (``rnnkernels/nvrtc_check.py``) compiles exactly those.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import _gemm, _graph, _persistent, _sources

FORWARD_SOURCE = "lstm_forward.cu"
BACKWARD_SOURCE = "lstm_backward.cu"
GRAD_NORM_SOURCE = "grad_norm.cu"
GATES = 4  # i, f, g, o
_INT32_MAX = 2**31 - 1
# Reduction loops step an int by one tile (k0 += k_tile * k_split) past the last index,
# so a size must leave a tile of headroom below 2^31 (64 covers every tile in the table).
_MAX_SIZE = _INT32_MAX - 64


# numpy dtype name -> the kernels' Storage type for it (csrc/common.cuh): the dtypes the
# `cuda` and `emulated` backends accept. float16 is cuda_fp16.h's __half (numpy.float16's
# size and layout).
STORAGE_TYPES = {"float32": "float", "float16": "__half"}


def _storage(dtype_name: str) -> str:
    return STORAGE_TYPES[dtype_name]


# --------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class StepTile:
    """Tile of the per-step kernels (forward and backward share it).

    A block is ``unit_tile x batch_threads x k_split`` threads and owns ``unit_tile``
    hidden units and ``batch_tile = batch_threads * rows_per_thread`` batch rows; the
    reduction dimension (H forward, 4H backward) is staged ``k_tile * k_split`` at a
    time, and with ``k_split > 1`` split across that many thread slices (whole warps
    or parts of one) whose partial sums are added in a fixed order at the end."""

    name: str
    unit_tile: int
    batch_threads: int
    rows_per_thread: int
    k_tile: int
    k_split: int = 1

    @property
    def threads(self) -> int:
        return self.unit_tile * self.batch_threads * self.k_split

    @property
    def batch_tile(self) -> int:
        return self.batch_threads * self.rows_per_thread

    def block(self) -> tuple[int, int, int]:
        return (self.unit_tile, self.batch_threads, self.k_split)

    def grid(self, batch: int, hidden: int) -> tuple[int, int, int]:
        return (_ceil_div(hidden, self.unit_tile), _ceil_div(batch, self.batch_tile), 1)

    def _parameters(self) -> str:
        return f"{self.unit_tile}, {self.batch_threads}, {self.rows_per_thread}, {self.k_tile}, {self.k_split}"

    def forward_name(self, training: bool, dtype: str = "float32") -> str:
        """The LSTM's forward instance of this tile (other cells: :class:`CellKernels`).
        ``dtype``: the problem's numpy dtype name, a key of :data:`STORAGE_TYPES`."""
        return LSTM_KERNELS.forward_name(self, training, dtype)

    def backward_name(self, step_norms: bool = False, dtype: str = "float32") -> str:
        """The LSTM's backward instance; ``step_norms``: the instance that also writes
        the per-block sums of dh_t² and dc_t² for the per-step gradient norms."""
        return LSTM_KERNELS.backward_name(self, step_norms, dtype)


# Ordered from the most to the least work per block. A taller batch tile re-reads W_hh
# (from L2) fewer times per step, since every block column reads all of W_hh's rows of
# its units; a shorter one makes more blocks, which a small batch needs to fill the GPU.
# unit_tile * batch_threads * k_split is a whole number of warps; rows_per_thread * 4
# gate accumulators plus the staged loads of a round (each thread holds all of them in
# registers at once) stay well inside the register budget (see the NVRTC check).
# batch1: at B = 1 a block has one row, so units per block set the block count: 4 units
# make ceil(H/4) blocks (192 at H = 768, more than the 132 SMs of an H100/H200), and the
# H (or 4H) reduction is split over 16 slices of 4 threads (2 warps) so each block still
# has enough threads and loads in flight. Its float32 sums run in another order than
# the other tiles' (partials of 4-column slices added at the end): other last bits.
# (Backward reads W_hh's columns: 4 units are 16-byte pieces of a row, half a 32-byte
# sector; the price of the block count, paid from L2, where W_hh stays.)
STEP_TILES = (
    StepTile("batch16", unit_tile=32, batch_threads=4, rows_per_thread=4, k_tile=32),
    StepTile("batch8", unit_tile=32, batch_threads=4, rows_per_thread=2, k_tile=32),
    StepTile("batch4", unit_tile=16, batch_threads=4, rows_per_thread=1, k_tile=32),
    StepTile("batch1", unit_tile=4, batch_threads=1, rows_per_thread=1, k_tile=4, k_split=16),
)


def choose_step_tile(batch: int, hidden: int, sm_count: int) -> StepTile:
    """Largest tile whose grid still gives every SM a block; if none does, the tile
    with the most blocks. Tiles whose batch tile exceeds the batch rounded up to a
    power of two are skipped: most of their threads would have no row."""
    padded_batch = 1 << max(batch - 1, 0).bit_length()
    fitting = [t for t in STEP_TILES if t.batch_tile <= padded_batch] or [STEP_TILES[-1]]
    for tile in fitting:
        grid = tile.grid(batch, hidden)
        if grid[0] * grid[1] >= sm_count:
            return tile
    return max(fitting, key=lambda t: (_blocks(t, batch, hidden), -STEP_TILES.index(t)))


def _blocks(tile: StepTile, batch: int, hidden: int) -> int:
    grid = tile.grid(batch, hidden)
    return grid[0] * grid[1]


@dataclass(frozen=True)
class ColumnSum:
    """``column_sum<ColumnTile, RowThreads>``: 32 columns (one warp reads 32 consecutive
    words of a row) by 8 row-threads per block."""

    column_tile: int = 32
    row_threads: int = 8

    @property
    def threads(self) -> int:
        return self.column_tile * self.row_threads

    def name(self, dtype: str = "float32") -> str:
        """The instance writing the sums in ``dtype`` (from a float32 matrix)."""
        return f"rnnkernels::column_sum<{_storage(dtype)}, {self.column_tile}, {self.row_threads}>"


COLUMN_SUM = ColumnSum()


@dataclass(frozen=True)
class StepNorms:
    """``step_norms<Threads, Quantities>`` (csrc/reductions.cuh): one thread per (step,
    quantity) pair, the quantities being the cell's state gradients (LSTM: dh and dc,
    the default; GRU and Elman: dh); 128 threads, since a launch has only a few T of
    them and each loops over the step kernel's blocks."""

    threads: int = 128

    def name(self, quantities: int = 2) -> str:
        return f"rnnkernels::step_norms<{self.threads}, {quantities}>"


STEP_NORMS = StepNorms()


@dataclass(frozen=True)
class GradNorm:
    """``grad_norm_partial<T, Threads>`` and ``grad_norm_finish<Threads>``
    (csrc/grad_norm.cu): the fused sum of squares of many arrays of one dtype, used by
    clip_grad_norm; launched by rnnkernels/_grad_norm.py. 256 threads: 8 warps, enough
    loads in flight per block for a streaming read, and the finishing block adds at most
    4 block sums per thread."""

    threads: int = 256

    # numpy dtype name -> the kernel's element type
    ELEMENT_TYPES = {"float16": "__half", "float32": "float", "float64": "double"}

    def partial_name(self, dtype_name: str) -> str:
        return f"rnnkernels::grad_norm_partial<{self.ELEMENT_TYPES[dtype_name]}, {self.threads}>"

    def finish_name(self) -> str:
        return f"rnnkernels::grad_norm_finish<{self.threads}>"


GRAD_NORM = GradNorm()

# ------------------------------------------------------------ each cell's arrays
class Recurrence:
    """What one cell's kernels take and give around the one launch plan
    (:func:`cell_forward` / :func:`cell_backward`): the states it carries (the API's
    contract: rnnkernels/cells.py, _backend.py), the array arguments of its kernels in
    each direction (per-step and persistent signatures, csrc/<cell>_forward.cu and
    _backward.cu), what a training forward saves, and how the backward assembles the
    initial states' and the bias's gradients after the loop. Everything else (input
    projection, h_all, tiles, variants, graphs, persistent plans, step norms, the
    products over all steps) is the plan's, the same for every cell.

    This base is the Elman cell's: the one state h, nothing saved beyond h_all, one
    gradient dz (= da) for both the input and the hidden side, a bias of H."""

    states: tuple[str, ...] = ("h",)

    def saved_layout(self, steps: int, batch: int, hidden: int) -> list[tuple[str, tuple]]:
        """(name, shape) of each float32 array a training forward saves, in the order of
        the backend's ``saved_arrays`` (what rnnkernels/torch/_ops.py carries)."""
        return [("h_all", (steps + 1, batch, hidden))]

    def forward_arrays(self, rt, gx, w_hh, bias, h_all, states0: tuple, training: bool, persistent: bool):
        """``(arrays, outputs, saved, finals)``: the kernel's array arguments (the
        persistent or the per-step signature), the indices of those the steps write
        (the graph variant copies them back out of its workspace, :func:`run_steps`),
        the float32 arrays a training forward saves by name (h_all among them), and a
        function giving the states after h at the last step (float32) once the
        launch is done. ``states0``: the initial states after h0, in the input dtype;
        ``h_all[0]`` already holds h0."""
        return [gx, w_hh, h_all], (2,), {"h_all": h_all}, lambda: ()

    def backward_arrays(self, rt, saved, dy, dstates_n: tuple, dz, step_squares, persistent: bool):
        """``(arrays, outputs, dgi, carry)``: as :meth:`forward_arrays`; ``dz``: the
        gradient of the hidden side's pre-activations (W_hh h), which the plan takes
        dW_hh and dh0 from; ``dgi``: that of gx, for dx and dW_ih; ``carry``: what
        :meth:`initial_gradients` needs of the loop."""
        (dh_n,) = dstates_n
        return [saved.w_hh, saved.arrays["h_all"], dy, dh_n, dz, step_squares], (4, 5), dz, None

    def initial_gradients(self, rt, dz0, w_hh, dtype, carry) -> tuple:
        """``(dh0, *the other initial states' gradients)`` in ``dtype`` from dz_0 [B, gates·H]."""
        return (_product(rt, dz0, w_hh, dtype),)

    def bias_gradient(self, rt, source: str, flat_dz, flat_dgi, dtype: str, hidden: int):
        """db in the layout of the API's folded bias, in ``dtype``."""
        return _column_sum(rt, source, flat_dz, dtype)


class LstmRecurrence(Recurrence):
    """The LSTM: states h and c. A training forward saves the activated gates [T, B, 4H]
    and every c_t (c_all [T+1, B, H]) besides h_all; inference keeps two rows of c and
    alternates between them (the per-step kernel reads c_{t-1} from row t % 2 and writes
    row (t+1) % 2), or the persistent kernel's on-chip c and its final c_out. Backward:
    dz is the gradient of all four gates (input and hidden side alike); the dc carry
    enters as dc_n and leaves as dc0."""

    states = ("h", "c")

    def saved_layout(self, steps, batch, hidden):
        return [("gates", (steps, batch, 4 * hidden)), ("h_all", (steps + 1, batch, hidden)),
                ("c_all", (steps + 1, batch, hidden))]

    def forward_arrays(self, rt, gx, w_hh, bias, h_all, states0, training, persistent):
        xp = rt.xp
        (c0,) = states0
        steps, batch, gate_width = gx.shape
        hidden = h_all.shape[2]
        # Inference saves no gates; the kernels never touch the pointer, pass a valid one.
        gates = xp.empty((steps, batch, gate_width), dtype=np.float32) if training else gx
        # Training: every c_t; per-step inference: two rows; persistent inference: c0 only.
        rows = steps + 1 if training else 1 if persistent else 2
        c_all = xp.empty((rows, batch, hidden), dtype=np.float32)
        c_all[0] = c0  # widened exactly
        saved = {"gates": gates, "h_all": h_all, "c_all": c_all} if training else {}
        if persistent:
            # The persistent kernel keeps c on chip: it reads c_start and writes every
            # c_t to c_out (training: c_all itself) or only the last (inference).
            if training:
                c_start, c_out = c_all[0], c_all
            else:
                c_start, c_out = c_all[0], xp.empty((batch, hidden), dtype=np.float32)
            return ([gx, w_hh, c_start, h_all, c_out, gates], (), saved,
                    lambda: (c_out[steps] if training else c_out,))
        return ([gx, w_hh, h_all, c_all, gates], (2, 3, 4), saved,
                lambda: (c_all[steps if training else steps % 2],))

    def backward_arrays(self, rt, saved, dy, dstates_n, dz, step_squares, persistent):
        dh_n, dc_n = dstates_n
        carry = dc_n.astype(np.float32)  # a float32 copy, read and overwritten every step
        head = [saved.w_hh, saved.arrays["gates"], saved.arrays["c_all"], dy, dh_n]
        if persistent:
            # The persistent kernel keeps the dc carry on chip: dc_n in, dc0 out.
            carry_in, carry = carry, rt.xp.empty(carry.shape, dtype=np.float32)
            return head + [carry_in, carry, dz, step_squares], (), dz, carry
        return head + [carry, dz, step_squares], (5, 6, 7), dz, carry

    def initial_gradients(self, rt, dz0, w_hh, dtype, carry):
        return _product(rt, dz0, w_hh, dtype), carry.astype(dtype, copy=False)  # float32: the carry itself


class GruRecurrence(Recurrence):
    """The GRU (gates r, z, n): state h. gx holds x·W_ihᵀ and the folded bias's first
    3H (b_hn, inside r ⊙ (W_hn h + b_hn), is the kernels' own argument: see
    gru_forward.cu). A training forward saves the activated gates [T, B, 3H] and
    hn = W_hn h_{t-1} + b_hn [T, B, H] besides h_all. Backward: dgi (of gx) and dgh
    (of W_hh h + b) differ on n; the dh·z carry enters as dh_n and adds to dh0."""

    def saved_layout(self, steps, batch, hidden):
        return [("gates", (steps, batch, 3 * hidden)), ("hn", (steps, batch, hidden)),
                ("h_all", (steps + 1, batch, hidden))]

    def forward_arrays(self, rt, gx, w_hh, bias, h_all, states0, training, persistent):
        xp = rt.xp
        steps, batch, gate_width = gx.shape
        hidden = h_all.shape[2]
        b_hn = xp.zeros((hidden,), dtype=np.float32) if bias is None else bias[gate_width:].astype(np.float32)
        saved = {"h_all": h_all}
        if training:
            saved["gates"] = xp.empty((steps, batch, gate_width), dtype=np.float32)
            saved["hn"] = xp.empty((steps, batch, hidden), dtype=np.float32)
        # Inference saves nothing; the kernel never touches those pointers, pass valid ones.
        return ([gx, w_hh, b_hn, h_all, saved.get("gates", gx), saved.get("hn", gx)], (3, 4, 5), saved,
                lambda: ())

    def backward_arrays(self, rt, saved, dy, dstates_n, dz, step_squares, persistent):
        (dh_n,) = dstates_n
        dgi = rt.xp.empty(dz.shape, dtype=np.float32)
        carry = dh_n.astype(np.float32)  # a float32 copy, read and overwritten every step
        head = [saved.w_hh, saved.arrays["gates"], saved.arrays["hn"], saved.arrays["h_all"], dy]
        if persistent:
            # The persistent kernel keeps the carry on chip: dh_n in, the final carry out.
            carry_in, carry = carry, rt.xp.empty(carry.shape, dtype=np.float32)
            return head + [carry_in, carry, dgi, dz, step_squares], (), dgi, carry
        return head + [carry, dgi, dz, step_squares], (5, 6, 7, 8), dgi, carry

    def initial_gradients(self, rt, dz0, w_hh, dtype, carry):
        # dh0 = dh_0·z_0 (the carry) + dgh_0·W_hh, added in float32, rounded once.
        dh0 = _product(rt, dz0, w_hh, np.float32)
        dh0 += carry
        return (dh0.astype(dtype, copy=False),)

    def bias_gradient(self, rt, source, flat_dz, flat_dgi, dtype, hidden):
        # Folded [4H] = [Σ dgh^r, Σ dgh^z, Σ dgi^n, Σ dgh^n] (dgi = dgh on r and z),
        # float32 column sums rounded once.
        sum_gh = _column_sum(rt, source, flat_dz, "float32")
        sum_gi = _column_sum(rt, source, flat_dgi, "float32")
        return rt.xp.concatenate([sum_gh[:2 * hidden], sum_gi[2 * hidden:], sum_gh[2 * hidden:]]).astype(dtype)

# ------------------------------------------------------------ each cell's kernels
@dataclass(frozen=True)
class CellKernels:
    """What the launch plan must know of a cell's per-step kernels: its gate row blocks,
    its two csrc/ files (one per direction), the name of its step kernels and the
    template flags that pick the cell variant, how many state gradients its step norms
    have (the LSTM: dh and dc), and its :class:`Recurrence` (its states and its kernels'
    arrays). The tile loop and its launch shape are step.cuh's, the same for every cell."""

    cell: str  # the cell's name in rnnkernels/cells.py
    gates: int  # row blocks of w_ih / w_hh
    forward_source: str
    backward_source: str
    kernel: str  # step kernels rnnkernels::{kernel}_forward_step / _backward_step
    flags: str = ""  # template arguments after Storage: rnn's Relu
    training_flag: bool = True  # whether the forward has a Training template flag
    state_gradients: int = 1  # quantities of its step norms: ‖dh_t‖ (and the LSTM's ‖dc_t‖)
    # What its kernels take and give; the base Recurrence is the Elman cell's.
    recurrence: Recurrence = field(default_factory=Recurrence)

    def forward_name(self, tile: StepTile, training: bool, dtype: str = "float32") -> str:
        head = ", ".join(filter(None, (_storage(dtype), self.flags, tile._parameters())))
        tail = f", {str(training).lower()}" if self.training_flag else ""
        return f"rnnkernels::{self.kernel}_forward_step<{head}{tail}>"

    def backward_name(self, tile: StepTile, step_norms: bool = False, dtype: str = "float32") -> str:
        head = ", ".join(filter(None, (_storage(dtype), self.flags, tile._parameters())))
        return f"rnnkernels::{self.kernel}_backward_step<{head}, {str(step_norms).lower()}>"

    def instances(self) -> dict[str, dict[str, int]]:
        """This cell's rows of :data:`KERNELS`."""
        forward = {self.forward_name(tile, training, dtype): tile.threads for dtype in STORAGE_TYPES
                   for tile in STEP_TILES for training in ((False, True) if self.training_flag else (True,))}
        backward = {self.backward_name(tile, norms, dtype): tile.threads for dtype in STORAGE_TYPES
                    for tile in STEP_TILES for norms in (False, True)}
        # db: the Elman cell sums in the problem's dtype, the GRU in float32 (two sums
        # assembled into the folded layout, then rounded once).
        sum_dtypes = ("float32",) if self.gates == 3 else tuple(STORAGE_TYPES)
        backward.update({COLUMN_SUM.name(dtype): COLUMN_SUM.threads for dtype in sum_dtypes})
        backward[STEP_NORMS.name(self.state_gradients)] = STEP_NORMS.threads
        return {self.forward_source: forward, self.backward_source: backward}


LSTM_KERNELS = CellKernels("lstm", GATES, FORWARD_SOURCE, BACKWARD_SOURCE, "lstm", state_gradients=2,
                           recurrence=LstmRecurrence())
# The GRU (gates r, z, n) and the Elman RNN, whose nonlinearity is a compile-time flag
# (two cells, as cuDNN's RNN_TANH / RNN_RELU modes). The Elman forward saves nothing
# but h_all, so it has no Training flag: inference runs the training instance.
GRU_KERNELS = CellKernels("gru", 3, "gru_forward.cu", "gru_backward.cu", "gru", recurrence=GruRecurrence())
RNN_TANH_KERNELS = CellKernels("rnn_tanh", 1, "rnn_forward.cu", "rnn_backward.cu", "rnn", flags="false",
                               training_flag=False)
RNN_RELU_KERNELS = CellKernels("rnn_relu", 1, "rnn_forward.cu", "rnn_backward.cu", "rnn", flags="true",
                               training_flag=False)
# THE kernel table: every instance a launcher here can pick, per source file, with its
# threads per block (the NVRTC check holds registers against that launch bound). One
# set per dtype of STORAGE_TYPES, float32 first; each cell's rows from its CellKernels
# and its PersistentCell (the loop below; the LSTM's step rows first, where they have
# always been). The large products are not here: they run on cuBLAS (rnnkernels/_gemm.py).
KERNELS: dict[str, dict[str, int]] = {
    **LSTM_KERNELS.instances(),
    GRAD_NORM_SOURCE: {
        **{GRAD_NORM.partial_name(dtype): GRAD_NORM.threads for dtype in GradNorm.ELEMENT_TYPES},
        GRAD_NORM.finish_name(): GRAD_NORM.threads,
    },
}


def _source_of(name_expression: str) -> str:
    """The csrc/ file whose row of :data:`KERNELS` lists ``name_expression``."""
    return next(source for source, names in KERNELS.items() if name_expression in names)


# ---- proj_size (rnnkernels/_projected.py): the pointwise cells of the projected LSTM,
# whose products run on the GEMM; one instance each (float32 workspaces whatever the
# problem's dtype), in the LSTM's files.
@dataclass(frozen=True)
class ProjectedCell:
    """``lstm_projected_forward_cell<Threads, Training>`` and
    ``lstm_projected_backward_cell<Threads>``: one thread per (row, unit) pair of a
    step; 256 threads (8 warps), a plain elementwise launch."""

    threads: int = 256

    def forward_name(self, training: bool) -> str:
        return f"rnnkernels::lstm_projected_forward_cell<{self.threads}, {str(training).lower()}>"

    def backward_name(self) -> str:
        return f"rnnkernels::lstm_projected_backward_cell<{self.threads}>"


PROJECTED_CELL = ProjectedCell()
KERNELS[FORWARD_SOURCE].update({PROJECTED_CELL.forward_name(t): PROJECTED_CELL.threads for t in (False, True)})
KERNELS[BACKWARD_SOURCE][PROJECTED_CELL.backward_name()] = PROJECTED_CELL.threads
# ---- end of the proj_size block


# The cells with the one state h (the LSTM's second state is its own backend contract).
CELL_KERNELS = {k.cell: k for k in (GRU_KERNELS, RNN_TANH_KERNELS, RNN_RELU_KERNELS)}
# Every cell of the one launch plan, by name (the persistent plan looks its sources up here).
ALL_CELL_KERNELS = {LSTM_KERNELS.cell: LSTM_KERNELS, **CELL_KERNELS}
for _cell in ALL_CELL_KERNELS.values():
    for _source, _names in _cell.instances().items():  # the LSTM's: already first in the table
        KERNELS.setdefault(_source, {}).update(_names)
    # Its persistent instances (rnnkernels/_persistent.py), one tile, per dtype.
    for _dtype in STORAGE_TYPES:
        _forward, _backward = _persistent.CELLS[_cell.cell].names(_persistent.TILE, _storage(_dtype))
        KERNELS[_cell.forward_source].update(dict.fromkeys(_forward, _persistent.TILE.threads))
        KERNELS[_cell.backward_source].update(dict.fromkeys(_backward, _persistent.TILE.threads))

# Kernels that run once per step (or hold a whole sequence): the NVRTC check fails if
# any of them spills.
STEP_KERNEL_PREFIXES = (
    *(f"rnnkernels::{kernel}_{direction}_step<" for kernel in ("lstm", "gru", "rnn")
      for direction in ("forward", "backward")),
    *_persistent.KERNEL_PREFIXES,
    "rnnkernels::lstm_projected_",
)


def compile_options() -> tuple[str, ...]:
    """Our NVRTC options, shared by the runtime loader and the NVRTC check: csrc/, then
    NVIDIA's device header folders (``_sources.cuda_include_dirs``; FileNotFoundError
    naming the pip packages when there are none). CuPy's RawModule adds its own to them,
    -ftz=true and the device's -arch among them; ``nvrtc_check.cupy_nvrtc_options``
    records that full list from CuPy's code, and the check compiles with it. The digest
    define changes CuPy's on-disk cache key whenever any csrc/ file, headers included,
    changes."""
    return (
        f"--include-path={_sources.csrc_dir()}",
        *(f"--include-path={folder}" for folder in _sources.cuda_include_dirs()),
        f"-DRNNKERNELS_SOURCES={_sources.sources_digest()}",
    )


# ------------------------------------------------------------------------ runtimes
class CupyRuntime:
    """Launches through CuPy on the current device and the current CuPy stream."""

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self._device_id = cupy.cuda.Device().id

    @property
    def sm_count(self) -> int:
        return _cupy_sm_count(self._device_id)

    @property
    def max_shared_bytes(self) -> int:
        """Dynamic shared memory one block may opt in to."""
        return _cupy_attribute(self._device_id, "cudaDevAttrMaxSharedMemoryPerBlockOptin")

    @property
    def cooperative_launch(self) -> bool:
        return bool(_cupy_attribute(self._device_id, "cudaDevAttrCooperativeLaunch"))

    def function(self, source: str, name_expression: str) -> Callable[..., Any]:
        function = _cupy_function(self._device_id, source, name_expression)

        def launch(grid, block, args, shared_mem=0, cooperative=False):
            if shared_mem:
                _cupy_allow_shared(function, shared_mem)
            function(grid, block, args, shared_mem=shared_mem, enable_cooperative_groups=cooperative)

        return launch

    def blocks_per_sm(self, source: str, name_expression: str, threads: int, shared_mem: int) -> int:
        """Blocks of the instance resident per SM (the occupancy API: registers, static
        and ``shared_mem`` dynamic shared memory), as a cooperative launch needs."""
        return _cupy_blocks_per_sm(self._device_id, source, name_expression, threads, shared_mem)

    def gemm(self, a, b, c, *, transpose_a: bool = False, transpose_b: bool = False, accumulate: bool = False):
        """C = op(A)·op(B) (+ C) with cuBLAS on the current stream (rnnkernels/_gemm.py)."""
        _gemm.cublas_gemm(self.xp, a, b, c, transpose_a=transpose_a, transpose_b=transpose_b, accumulate=accumulate)

    def capture(self):
        """A context manager that captures the kernel launches made inside it into a CUDA
        graph (rnnkernels/_graph.py); its value's ``graph`` replays them."""
        return _graph.cupy_capture(self.xp)

    def graph_key(self):
        """What a captured graph and its workspaces are tied to: the device, and the
        caller's stream (a workspace shared by two streams would be a race)."""
        return ("cuda", self._device_id, self.xp.cuda.get_current_stream().ptr)


# Without an opt-in (cudaFuncSetAttribute) a block gets 48 KiB of shared memory, static
# and dynamic together, so dynamic sizes just under 48 KiB can fail too: every launch
# (and occupancy query) with dynamic shared memory opts in to its size first, which the
# persistent plan keeps within the device's opt-in maximum less the static part.


def _cupy_function(device_id: int, source: str, name_expression: str):
    """The instance as a ``cupy.cuda.function.Function`` on GPU ``device_id`` (loaded
    here, before any capture begins). Not the ``RawKernel`` that ``get_function`` returns:
    ``RawKernel.__call__`` passes its module's ``enable_cooperative_groups`` itself (a
    second one from us is a TypeError, "multiple values for keyword argument") and a
    RawKernel has no ``ptr`` for the driver calls; its ``kernel`` is the Function, whose
    ``__call__(grid: tuple, block: tuple, args, shared_mem=0, stream=None,
    enable_cooperative_groups=False)`` chooses per launch (cuLaunchCooperativeKernel
    or cuLaunchKernel, on the current stream)."""
    import cupy

    with cupy.cuda.Device(device_id):  # RawKernel.kernel loads for the current device
        return _cupy_module(source, compile_options(), device_id).get_function(name_expression).kernel


def _cupy_allow_shared(function, shared_mem: int) -> None:
    """Opt ``function`` (a ``cupy.cuda.function.Function``) in to ``shared_mem`` bytes of
    dynamic shared memory, which a launch or occupancy query with that much needs first."""
    from cupy_backends.cuda.api import driver

    driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_mem)


@functools.cache
def _cupy_blocks_per_sm(device_id: int, source: str, name_expression: str, threads: int, shared_mem: int) -> int:
    """Memoized: the chooser asks on every call, the answer is fixed per instance."""
    import cupy
    from cupy_backends.cuda.api import driver

    with cupy.cuda.Device(device_id):
        function = _cupy_function(device_id, source, name_expression)
        if shared_mem:
            _cupy_allow_shared(function, shared_mem)
        return driver.occupancyMaxActiveBlocksPerMultiprocessor(function.ptr, threads, shared_mem)


@functools.cache
def _cupy_attribute(device_id: int, name: str) -> int:
    from cupy.cuda import runtime

    return runtime.deviceGetAttribute(getattr(runtime, name), device_id)


@functools.cache
def _cupy_sm_count(device_id: int) -> int:
    import cupy

    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


@functools.cache
def _cupy_module(source: str, options: tuple[str, ...], device_id: int):
    """One NVRTC build per (source, options, device), holding every instance of
    :data:`KERNELS` for that source, cached on disk by CuPy (keyed on the source text and
    the options, which carry the csrc/ digest). CuPy 14.2, the least our extras accept,
    stores modules built with ``name_expressions`` in that cache too (with their mangled
    names: cupy/cuda/compiler.py), so a new process loads them instead of compiling;
    older CuPy skipped the cache for them (cupy/cupy#9667, #9801). That is why we keep
    no disk cache of our own; benchmarks/gpu_session.py records whether it hits."""
    import cupy

    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(
            code=_sources.read_source(source),
            options=options,
            name_expressions=tuple(KERNELS[source]),
        )
        module.compile()
    return module


class _PoisonedNumpy:
    """NumPy for the emulator's launch plans, except that ``empty`` and ``empty_like``
    fill the new array with 0xFF bytes (NaN for floats, -1 for integers), as the
    emulator does for shared memory: a kernel that leaves part of an output or a
    workspace unwritten, or a stale read that finds memory left over from an earlier
    call, then gives NaN instead of passing by luck. (On a GPU, ``cupy.empty`` holds
    whatever the memory pool held last.)"""

    @staticmethod
    def empty(shape, dtype=float, order="C"):
        return _poisoned(np.empty(shape, dtype=dtype, order=order))

    @staticmethod
    def empty_like(prototype, dtype=None, order="K", subok=True, shape=None):
        return _poisoned(np.empty_like(prototype, dtype=dtype, order=order, subok=subok, shape=shape))

    def __getattr__(self, name):
        return getattr(np, name)


def _poisoned(array: np.ndarray) -> np.ndarray:
    # A fresh array is one contiguous block (C or Fortran order).
    ctypes.memset(array.ctypes.data, 0xFF, array.nbytes)
    return array


EMULATOR_ARRAYS = _PoisonedNumpy()


class EmulatorRuntime:
    """Runs the kernels on the CPU emulator; arrays are NumPy arrays."""

    # The emulator runs every CUDA thread on the CPU; the SM count only feeds the tile
    # heuristic and the persistent plan, and a small one picks the tiles with fewer,
    # larger blocks. Its "device" is small (4 SMs, 48 KiB of shared memory per block)
    # so that the persistent plan splits H over blocks and chunks B on small shapes;
    # tests pass smaller limits to force more of both.
    sm_count = 4
    max_shared_bytes = 48 * 1024
    cooperative_launch = True

    def __init__(self, *, sanitize: bool = False, seed: int | None = None, memory_model: str | None = None,
                 sm_count: int | None = None, max_shared_bytes: int | None = None) -> None:
        # memory_model: "sequential", "stale" or None (the emulator's default: stale for
        # cooperative launches); see rnnkernels/emulator/README.md, "Memory ordering".
        from .emulator import memory_model_for

        self.xp = EMULATOR_ARRAYS
        self.sanitize = sanitize
        self.seed = seed
        if memory_model is not None:
            memory_model_for(memory_model, cooperative=False)  # ValueError if unknown
        self.memory_model = memory_model
        self._recorder = _graph.LaunchRecorder()
        if sm_count is not None:
            self.sm_count = sm_count
        if max_shared_bytes is not None:
            self.max_shared_bytes = max_shared_bytes

    def blocks_per_sm(self, source: str, name_expression: str, threads: int, shared_mem: int) -> int:
        """One block per "SM" when it fits the emulated limits (threads, shared memory,
        and the emulator's 65536 threads of a cooperative launch over all SMs)."""
        fits = threads <= 1024 and shared_mem <= self.max_shared_bytes and threads * self.sm_count <= 65536
        return 1 if fits else 0

    def function(self, source: str, name_expression: str) -> Callable[..., Any]:
        kernel = _emulator_module(source, _sources.sources_digest(), self.sanitize).get_function(
            name_expression
        )
        seed = self.seed
        # Only when asked: the sanitizer's helper-process kernels take no memory_model
        # (they follow $RNNKERNELS_EMULATOR_MEMORY).
        options = {} if self.memory_model is None else {"memory_model": self.memory_model}
        recorder = self._recorder

        def run(grid, block, args, shared_mem=0, cooperative=False):
            kernel(grid, block, args, shared_mem=shared_mem, cooperative=cooperative, seed=seed, **options)

        def launch(grid, block, args, shared_mem=0, cooperative=False):
            if recorder.recording:
                # Only the per-step launches are recorded (graph variant): no dynamic
                # shared memory, not cooperative.
                if shared_mem or cooperative:
                    raise ValueError("a recorded launch takes no dynamic shared memory and is not cooperative")
                recorder.record(run, grid, block, args)
            else:
                run(grid, block, args, shared_mem=shared_mem, cooperative=cooperative)

        return launch

    def gemm(self, a, b, c, *, transpose_a: bool = False, transpose_b: bool = False, accumulate: bool = False):
        """C = op(A)·op(B) (+ C) with NumPy in float32 (rnnkernels/_gemm.py). While
        recording (the graph variant of the projected LSTM, rnnkernels/_projected.py,
        captures its per-step GEMMs with its kernels, as CUDA stream capture records
        cuBLAS calls) the product is recorded in launch order instead of run."""
        if self._recorder.recording:
            _gemm.check_operands(a, b, c, transpose_a, transpose_b)  # fail at capture, not at replay
            self._recorder.record(
                lambda grid, block, args: _gemm.numpy_gemm(
                    a, b, c, transpose_a=transpose_a, transpose_b=transpose_b, accumulate=accumulate),
                None, None, ())
            return
        _gemm.numpy_gemm(a, b, c, transpose_a=transpose_a, transpose_b=transpose_b, accumulate=accumulate)

    def capture(self):
        """A context manager that records the kernel launches made inside it instead of
        running them; its value's ``graph`` replays them (rnnkernels/_graph.py)."""
        return self._recorder.capture()

    def graph_key(self):
        """Recorded launches carry the scheduling seed, the build (sanitized or not) and
        the memory model."""
        return ("emulated", self.seed, self.sanitize, self.memory_model)


@functools.cache
def _emulator_module(source: str, digest: str, sanitize: bool):
    from . import emulator

    return emulator.load_module(
        [_sources.read_source(source)],
        tuple(KERNELS[source]),
        include_dirs=(str(_sources.csrc_dir()),),
        defines={"RNNKERNELS_SOURCES": digest},
        sanitize=sanitize,
    )


# ---------------------------------------------------------------------- launch plan
# How the recurrence runs. Every forward variant saves the same arrays (CellSaved), so any
# forward pairs with any backward variant.
#   "step": one launch of the step kernel per time step, from Python.
#   "graph": the same T launches captured once per call shape (a CUDA graph; the
#            emulator records them) and replayed: one launch from Python per call.
#            Same kernels and arguments as "step", so bitwise the same results.
#   "persistent": one cooperative launch for all steps, W_hh stationary in shared
#            memory (rnnkernels/_persistent.py); only where W_hh's slices fit on chip.
# None: "persistent" where it fits the device (forward and backward, _persistent.choose),
# else "graph"; "graph" whenever a step_tile is given.
VARIANTS = ("step", "graph", "persistent")


def _check_variant(variant: str | None) -> str | None:
    """``variant``, checked; None stays None (see :func:`_default_variant`)."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant


def _default_variant(rt, batch: int, hidden: int, dtype: str, step_tile: StepTile | None, direction: str,
                     cell: str = "lstm") -> str:
    """What ``variant=None`` runs. "graph" (the per-step kernels replayed from one CUDA
    graph) when a step_tile is asked for or the persistent kernels do not fit the
    device (``_persistent.choose``: shared memory, cooperative launch, occupancy);
    where both can run, the one the cost model (``rnnkernels/cost_model.py``) predicts
    faster for this problem on this device. ``direction``: "forward_training",
    "forward_inference" or "backward" (forward and backward may choose differently:
    every forward variant saves the same arrays). ``cell``: whose kernels (the LSTM's,
    or a name of :data:`CELL_KERNELS`); the plan and the cost model take its gate count."""
    if step_tile is not None or _persistent.choose(rt, batch, hidden, dtype, cell) != "persistent":
        return "graph"
    from . import cost_model

    problem = cost_model.Problem(batch, hidden, dtype=dtype, cell=cell)
    return cost_model.best_variant(("persistent", "graph"), direction, problem, cost_model.for_runtime(rt))[0]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_sizes(steps: int, batch: int, input_size: int, hidden: int) -> None:
    if hidden < 1:
        raise ValueError(f"the CUDA kernels need hidden_size >= 1, got {hidden}")
    if steps < 1 or batch < 1:
        raise ValueError(f"the CUDA kernels need T >= 1 and B >= 1, got T={steps}, B={batch}")
    # Sizes travel as 32-bit kernel arguments (offsets are computed in 64 bits), and the
    # tiled loops over them need a tile of headroom (_MAX_SIZE).
    for what, value in (("T*B", steps * batch), ("4*hidden_size", GATES * hidden), ("input_size", input_size)):
        if value > _MAX_SIZE:
            raise ValueError(f"{what} = {value} exceeds {_MAX_SIZE}, the largest size the CUDA kernels take")


def _check_grid(grid, kernel: str) -> None:
    # CUDA allows 2^31 - 1 blocks in x but only 65535 in y and z.
    if grid[0] > _INT32_MAX or grid[1] > 65535 or grid[2] > 65535:
        raise ValueError(f"problem too large for {kernel}: grid {grid} exceeds CUDA's limits")


def input_projection(rt, x, w_ih, bias, out=None):
    """gx[T, B, 4H] = x·W_ihᵀ + b (float32) for all T·B rows at once, on the runtime's
    GEMM (cuBLAS or NumPy, rnnkernels/_gemm.py); every forward variant starts with it.
    ``out``: the float32 [T, B, 4H] array to write (a new one when None). The bias is
    folded into the product: ``out`` is filled with it (widened to float32, exactly)
    and the GEMM accumulates onto it (beta = 1), one pass over gx instead of two."""
    steps, batch, input_size = x.shape
    gate_width = w_ih.shape[0]
    gx = rt.xp.empty((steps, batch, gate_width), dtype=np.float32) if out is None else out
    rows = gx.reshape(steps * batch, gate_width)
    if bias is not None:
        rows[...] = bias  # broadcast over rows; float16 -> float32 is exact
    rt.gemm(x.reshape(steps * batch, input_size), w_ih, rows, transpose_b=True, accumulate=bias is not None)
    return gx


def _product(rt, a, b, out_dtype, *, transpose_a=False, transpose_b=False):
    """op(a)·op(b) in float32 on the runtime's GEMM, returned in ``out_dtype``: a
    float16 result is rounded once (to nearest even) from the float32 product. cuBLAS
    multiplies two operands of one type only, so a float16 operand meeting a float32
    one (dz) is widened to float32 first (exact; a temporary copy of it)."""
    xp = rt.xp
    if a.dtype != b.dtype:
        a, b = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    c = xp.empty((m, n), dtype=np.float32)
    rt.gemm(a, b, c, transpose_a=transpose_a, transpose_b=transpose_b)
    return c if out_dtype == np.float32 else c.astype(out_dtype)


def finish_step_norms(rt, step_squares, steps: int, source: str = BACKWARD_SOURCE):
    """norms[Q, T] (float64; the LSTM's Q = 2: ‖dh_t‖, ‖dc_t‖) from the per-block sums
    of squares ``step_squares[blocks, T, Q]`` that a backward step kernel of ``source``
    wrote."""
    quantities = step_squares.shape[2]
    norms = rt.xp.empty((quantities, steps), dtype=np.float64)
    norms_grid = (_ceil_div(quantities * steps, STEP_NORMS.threads), 1, 1)
    _check_grid(norms_grid, STEP_NORMS.name(quantities))
    i32 = np.int32
    rt.function(source, STEP_NORMS.name(quantities))(
        norms_grid, (STEP_NORMS.threads, 1, 1), (step_squares, norms, i32(step_squares.shape[0]), i32(steps))
    )
    return norms


# ------------------------------------------------------------- the launch plan
# One plan for every cell (LSTM, GRU, Elman RNN): the same tiles, GEMMs, reductions and
# variants, through CellKernels and its Recurrence (what differs between cells),
# run_steps (step and graph) and _persistent.launch (persistent).


@dataclass
class CellSaved:
    """What :func:`cell_forward` keeps for :func:`cell_backward` (opaque to the API):
    the inputs and the float32 arrays of the cell's ``Recurrence.saved_layout``, by
    name; those are also attributes (``saved.h_all``; the LSTM's ``saved.gates``,
    ``saved.c_all``)."""

    kernels: CellKernels
    x: Any  # [T, B, I], input dtype, like w_ih and w_hh
    w_ih: Any  # [gates·H, I]
    w_hh: Any  # [gates·H, H]
    has_bias: bool
    arrays: dict  # name -> float32 array; LSTM: gates, h_all, c_all; GRU: gates, hn, h_all; Elman: h_all
    # None (a CellSaved rebuilt from arrays): backward chooses it as forward did.
    step_tile: StepTile | None = None

    def __getattr__(self, name):
        # Only called for names that are not fields: the saved arrays.
        arrays = self.__dict__.get("arrays") or {}
        if name in arrays:
            return arrays[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def cell_saved_layout(kernels: CellKernels, steps: int, batch: int, hidden: int) -> list[tuple[str, tuple]]:
    """(name, shape) of each float32 array a training forward of ``kernels``'s cell
    saves (``Recurrence.saved_layout``)."""
    return kernels.recurrence.saved_layout(steps, batch, hidden)
def run_steps(rt, variant: str, key: tuple, source: str, name: str, grid, block, arrays: list, scalars: tuple,
              steps: int, reverse: bool, outputs: tuple[int, ...]) -> None:
    """Launch ``name`` once per step t (T-1 .. 0 when ``reverse``) with arguments
    ``(*arrays, *scalars, t)``. "step": from Python. "graph": the T launches captured
    once per ``key`` (and runtime, rnnkernels/_graph.py) over workspace arrays shaped
    like ``arrays``; every call copies ``arrays`` in, replays, and copies the arrays
    at the indices ``outputs`` back, so the caller sees what "step" gives (the same
    kernels and arguments: bitwise the same results). The copies are what keeps this
    one function for every cell; each is one pass over an array the steps read or
    write anyway."""
    i32 = np.int32
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    if variant == "step":
        kernel = rt.function(source, name)
        for t in order:
            kernel(grid, block, (*arrays, *scalars, i32(t)))
        return

    # Arguments may alias (one array passed for two parameters, e.g. a buffer the kernel
    # does not touch in this configuration): one workspace per DISTINCT array, shared by
    # its parameters as the caller's array is, so a copy-back cannot overwrite an output
    # with a workspace the kernels never wrote. The aliasing is part of the graph's key.
    first = {}
    slots = tuple(first.setdefault(id(a), i) for i, a in enumerate(arrays))
    distinct = sorted(set(slots))

    def build():
        own = {i: rt.xp.empty_like(arrays[i]) for i in distinct}
        workspace = [own[slot] for slot in slots]
        kernel = rt.function(source, name)  # loaded before capture begins
        with rt.capture() as captured:
            for t in order:
                kernel(grid, block, (*workspace, *scalars, i32(t)))
        return workspace, captured.graph

    shapes = tuple((a.shape, a.dtype.str) for a in arrays)
    workspace, graph = _graph.cached_graph(rt, (source, name, grid, shapes, slots, *key), build)
    for i in distinct:
        workspace[i][...] = arrays[i]
    graph.launch()
    for i in sorted({slots[j] for j in outputs}):
        arrays[i][...] = workspace[i]


def _cell_variant(rt, kernels: CellKernels, variant: str | None, step_tile: StepTile | None, batch: int,
                  hidden: int, dtype: str, direction: str) -> str:
    """``variant``, checked, or what None runs: :func:`_default_variant` for this cell."""
    variant = _check_variant(variant)
    if variant is None:
        return _default_variant(rt, batch, hidden, dtype, step_tile, direction, kernels.cell)
    return variant


def cell_forward(rt, kernels: CellKernels, x, w_ih, w_hh, bias, *state0_and_training, variant: str | None = None,
                 step_tile: StepTile | None = None):
    """The backend contract's forward (rnnkernels/_backend.py) for ``kernels``'s cell on
    runtime ``rt``: ``cell_forward(rt, kernels, x, w_ih, w_hh, bias, *state0, training)
    -> (y, *state_n, saved)``, one [B, H] state per ``Recurrence.states`` (the LSTM: h0,
    c0; the others: h0). All inputs share one dtype of :data:`STORAGE_TYPES`; y and the
    final states come back in it. ``bias``: the API's folded bias (LSTM [4H] = b_ih +
    b_hh; GRU [4H] = [b_r sum, b_z sum, b_in, b_hn]; Elman [H] = b_ih + b_hh) or None.
    ``variant``: one of :data:`VARIANTS`, None for the default; ``step_tile``: the
    per-step kernels' tile (None: :func:`choose_step_tile`)."""
    state0, training = state0_and_training[:-1], state0_and_training[-1]
    if len(state0) != len(kernels.recurrence.states):
        raise TypeError(f"{kernels.cell} forward takes one initial state per state "
                        f"{kernels.recurrence.states} before training, got {len(state0)}")
    xp = rt.xp
    dtype = x.dtype.name
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    _check_sizes(steps, batch, input_size, hidden)
    variant = _cell_variant(rt, kernels, variant, step_tile, batch, hidden, dtype,
                            "forward_training" if training else "forward_inference")
    gate_width = kernels.gates * hidden
    tile = step_tile or choose_step_tile(batch, hidden, rt.sm_count)
    grid, block = tile.grid(batch, hidden), tile.block()
    name = kernels.forward_name(tile, training, dtype)
    _check_grid(grid, name)
    persistent = variant == "persistent"
    if persistent:  # before any work: a ValueError saying why when it does not fit
        plan = _persistent.require(rt, _persistent.FORWARD, batch, hidden, dtype, training, kernels.cell)

    # 1. gx = x·W_ihᵀ + b for all T·B rows (the GRU's b_hn is not in it: see gru_forward.cu).
    gx = input_projection(rt, x, w_ih, None if bias is None else bias[:gate_width])
    # 2. The recurrence on float32 states (the initial states widened exactly).
    h_all = xp.empty((steps + 1, batch, hidden), dtype=np.float32)
    h_all[0] = state0[0]
    arrays, outputs, saved_arrays, finals = kernels.recurrence.forward_arrays(
        rt, gx, w_hh, bias, h_all, state0[1:], training, persistent)
    if persistent:
        # One cooperative launch for all steps: the cell's arrays, then the flags and the plan.
        _persistent.launch(rt, plan, dtype, hidden, training, arrays, (steps, batch, hidden), exchanged=h_all)
    else:
        run_steps(rt, variant, ("forward", kernels.cell, training), kernels.forward_source, name, grid, block, arrays,
                  (np.int32(batch), np.int32(hidden)), steps, False, outputs)

    # y is copied out of the saved h_all so that a caller editing y in place cannot
    # corrupt the gradients; without training nothing is saved and a float32 y is a
    # view. Outputs are rounded to the input dtype here (float32: plain copies).
    y = h_all[1:].astype(x.dtype, copy=training)
    state_n = (h_all[steps].astype(x.dtype), *(state.astype(x.dtype) for state in finals()))
    saved = CellSaved(kernels, x, w_ih, w_hh, bias is not None, saved_arrays, tile) if training else None
    return (y, *state_n, saved)


def cell_backward(rt, saved: CellSaved, dy, *dstate_n, return_step_norms: bool = False, variant: str | None = None,
                  step_tile: StepTile | None = None):
    """The backend contract's backward on runtime ``rt``: ``cell_backward(rt, saved, dy,
    *dstate_n) -> (dx, dw_ih, dw_hh, db, *dstate0)``, one upstream gradient [B, H] per
    state, ``db`` in the folded layout of forward's bias (None without one). With
    ``return_step_norms``, one [T] float64 array per state follows (‖∂L/∂h_t‖, and the
    LSTM's ‖∂L/∂c_t‖, over batch and units), computed inside the step kernels (per-block
    sums of squares) and finished by one small ``step_norms`` launch. Pairs with a
    forward of any variant."""
    kernels = saved.kernels
    cell = kernels.recurrence
    if len(dstate_n) != len(cell.states):
        raise TypeError(f"{kernels.cell} backward takes one upstream gradient per state {cell.states} after dy, "
                        f"got {len(dstate_n)}")
    xp = rt.xp
    x, w_ih, w_hh = saved.x, saved.w_ih, saved.w_hh
    dtype = x.dtype.name  # dy and the state gradients share it (the API converts them)
    steps, batch, input_size = x.shape
    hidden = w_hh.shape[1]
    variant = _cell_variant(rt, kernels, variant, step_tile, batch, hidden, dtype, "backward")
    gate_width = kernels.gates * hidden
    tile = step_tile or saved.step_tile or choose_step_tile(batch, hidden, rt.sm_count)
    grid, block = tile.grid(batch, hidden), tile.block()
    name = kernels.backward_name(tile, return_step_norms, dtype)
    _check_grid(grid, name)
    persistent = variant == "persistent"
    if persistent:
        plan = _persistent.require(rt, _persistent.BACKWARD, batch, hidden, dtype, return_step_norms, kernels.cell)

    # 1. The reverse recurrence. dz: the gradient of W_hh h's pre-activations (LSTM: of
    # all gates; GRU: dgh; Elman: da). One float64 slot per block, step and state for
    # Σ dstate_t² (each block writes its own: no atomics); without norms the kernel
    # never touches the pointer, pass a valid one.
    dz = xp.empty((steps, batch, gate_width), dtype=np.float32)
    blocks = plan.blocks if persistent else grid[0] * grid[1]
    step_squares = (xp.empty((blocks, steps, kernels.state_gradients), dtype=np.float64) if return_step_norms
                    else dz)
    arrays, outputs, dgi, carry = cell.backward_arrays(rt, saved, dy, dstate_n, dz, step_squares, persistent)
    sizes = (np.int32(steps), np.int32(batch), np.int32(hidden))
    if persistent:
        _persistent.launch(rt, plan, dtype, hidden, return_step_norms, arrays, sizes, exchanged=dz)
    else:
        run_steps(rt, variant, ("backward", kernels.cell, return_step_norms), kernels.backward_source, name, grid,
                  block, arrays, sizes, steps, True, outputs)
    norms = finish_step_norms(rt, step_squares, steps, kernels.backward_source) if return_step_norms else None

    # 2. Products over all steps at once: dx and dW_ih from dgi, dW_hh and dh0 from dz.
    rows = steps * batch
    flat_dgi = dgi.reshape(rows, gate_width)
    flat_dz = dz.reshape(rows, gate_width)
    dx = _product(rt, flat_dgi, w_ih, x.dtype).reshape(steps, batch, input_size)
    dw_ih = _product(rt, flat_dgi, x.reshape(rows, input_size), x.dtype, transpose_a=True)
    # h_prev = h_all[0:T] (float32) is the first T·B rows of h_all.
    h_prev = saved.arrays["h_all"].reshape((steps + 1) * batch, hidden)[:rows]
    dw_hh = _product(rt, flat_dz, h_prev, x.dtype, transpose_a=True)
    dstate0 = cell.initial_gradients(rt, flat_dz[:batch], w_hh, x.dtype, carry)
    db = cell.bias_gradient(rt, kernels.backward_source, flat_dz, flat_dgi, dtype, hidden) if saved.has_bias else None
    grads = (dx, dw_ih, dw_hh, db, *dstate0)
    return grads + tuple(norms) if return_step_norms else grads


def forward(rt, x, w_ih, w_hh, bias, h0, c0, training: bool, *, variant: str | None = None,
            step_tile: StepTile | None = None):
    """:func:`cell_forward` for the LSTM: ``(y, h_n, c_n, saved)``."""
    return cell_forward(rt, LSTM_KERNELS, x, w_ih, w_hh, bias, h0, c0, training, variant=variant, step_tile=step_tile)


def backward(rt, saved: CellSaved, dy, dh_n, dc_n, *, return_step_norms: bool = False, variant: str | None = None,
             step_tile: StepTile | None = None):
    """:func:`cell_backward` for the LSTM: ``(dx, dw_ih, dw_hh, db, dh0, dc0)`` (+
    ``dh_norms``, ``dc_norms``)."""
    return cell_backward(rt, saved, dy, dh_n, dc_n, return_step_norms=return_step_norms, variant=variant,
                         step_tile=step_tile)
def _column_sum(rt, source: str, matrix, dtype: str):
    """Σ over the rows of a float32 [rows, cols] matrix, in ``dtype`` (column_sum)."""
    rows, cols = matrix.shape
    out = rt.xp.empty((cols,), dtype=dtype)
    rt.function(source, COLUMN_SUM.name(dtype))(
        (_ceil_div(cols, COLUMN_SUM.column_tile), 1, 1),
        (COLUMN_SUM.column_tile, COLUMN_SUM.row_threads, 1),
        (matrix, out, np.int32(rows), np.int32(cols)),
    )
    return out


def saved_arrays():
    """The LSTM's :class:`CellSaved` as arrays: gates [T, B, 4H], h_all and c_all
    [T+1, B, H], float32 for every input dtype."""
    return cell_saved_arrays(LSTM_KERNELS)


def cell_saved_arrays(kernels: CellKernels):
    """:class:`CellSaved` as arrays (rnnkernels/_backend.py's ``SavedArrays``), in the
    order of :func:`cell_saved_layout`, float32 for every input dtype."""
    from ._backend import SavedArrays

    def layout(steps, batch, input_size, hidden, dtype):
        return [(shape, np.dtype(np.float32)) for _, shape in cell_saved_layout(kernels, steps, batch, hidden)]

    def to_arrays(saved):
        return [saved.arrays[name] for name, _ in cell_saved_layout(kernels, *saved.x.shape[:2],
                                                                     saved.w_hh.shape[1])]

    def from_arrays(x, w_ih, w_hh, has_bias, arrays):
        from . import _arrays

        xp = np if isinstance(x, np.ndarray) else _arrays.import_cupy()
        names = [name for name, _ in cell_saved_layout(kernels, x.shape[0], x.shape[1], w_hh.shape[1])]
        return CellSaved(kernels, *(xp.ascontiguousarray(a) for a in (x, w_ih, w_hh)), has_bias,
                         {n: xp.ascontiguousarray(a, dtype=np.float32) for n, a in zip(names, arrays)})

    return SavedArrays(layout, to_arrays, from_arrays)
