"""A small cost model: predicted microseconds per LSTM step, per variant and direction.

    python -m rnnkernels.cost_model [--device H200] [--markdown]

prints the predictions for the anchor configurations (:data:`ANCHORS`). Every number
it prints is a PREDICTION from the device parameters below, not a measurement;
``benchmarks/gpu_session.py`` measures the same quantities and puts them side by side.

What is predicted. The *marginal* cost of one more time step, the quantity the GPU
session measures as (t(T=256) - t(T=64)) / 192: everything that grows with T, the
sequential recurrence AND each step's share of the big all-steps GEMMs (the input
projection forward; dx, dW_ih, dW_hh backward), but none of the fixed per-call costs.

The model is a handful of counted quantities per step, each turned into time by one
device parameter, combined with ``max`` where work overlaps and ``+`` where it is
serial (each function's docstring writes its formula out):

* launches per step x the launch gap (a Python launch or a CUDA-graph node);
* serial L2 round trips per step x the L2 latency (loads that wait on each other);
* grid-wide synchronisations per step x their cost;
* bytes per step from L2 and from HBM / their bandwidths;
* FP32 FLOPs per step / (the FP32 FMA rate x an efficiency counted from the kernel's
  shared-memory loads per FMA, see :func:`fma_efficiency`).

Variants are the launch plans of ``rnnkernels/_launch.py`` (:data:`MODELS` has one
function per variant; ``_launch.VARIANTS`` lists what is built): "step" (one Python
launch per step), "graph" (the same per-step kernels replayed from a CUDA graph, big
GEMMs on cuBLAS), "persistent" (one cooperative launch for all steps, W_hh stationary
in shared memory, per-producer ready flags between steps).

cuDNN is not modelled: its times come only from measurement (the GPU session times
torch.nn.LSTM beside ours). The chooser hook is :func:`predict` / :func:`best_variant`.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass, field, replace

from . import _launch, _shared_banks

GATES = 4
# Gate row blocks of each cell's W_ih / W_hh (the LSTM's is GATES).
CELL_GATES = {"lstm": GATES, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
DIRECTIONS = ("forward_inference", "forward_training", "backward")


# --------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class Device:
    """The few device parameters the model uses. ``sources`` says where each number
    comes from; ``assumed`` names the parameters taken from another table entry (see
    :func:`from_cupy_attributes`) rather than read off the device."""

    name: str
    sms: int  # streaming multiprocessors
    clock_ghz: float  # SM clock under load (boost)
    fp32_tflops: float  # FP32 FMA rate, non-tensor (2 FLOPs per FMA)
    l2_latency_ns: float  # one dependent load served by L2
    grid_sync_ns: float  # one grid-wide synchronisation of all SMs (flags round trip)
    l2_gbs: float  # L2 read bandwidth, all SMs together
    hbm_gbs: float  # HBM bandwidth
    python_launch_us: float  # CPU cost of one kernel launch from Python (CuPy RawKernel)
    graph_node_us: float  # GPU gap between two dependent kernels (graph node / queued)
    shared_per_block: int  # bytes of shared memory one block may opt into
    l2_bytes: int
    sources: dict = field(default_factory=dict, compare=False, repr=False)
    assumed: tuple = ()

    @property
    def fp32_flops_per_us(self) -> float:
        return self.fp32_tflops * 1e6


# Sources, cited once and referenced in the table below.
_DATASHEET_H100 = "NVIDIA H100 Tensor Core GPU datasheet / Hopper whitepaper (SXM5: 132 SMs, 67 TFLOPS FP32, 3.35 TB/s HBM3, 50 MB L2, 228 KB shared/SM, 227 KB/block)"
_DATASHEET_H200 = "NVIDIA H200 datasheet (same GH100 compute as H100 SXM: 67 TFLOPS FP32; 4.8 TB/s HBM3e); 132 SMs and 60 MB L2 as PyTorch reported on this workplace's H200 (KINDS.md, 2026-10-28)"
_DATASHEET_A100 = "NVIDIA A100 datasheet / Ampere whitepaper (SXM4 80GB: 108 SMs, 1410 MHz, 19.5 TFLOPS FP32, 2.04 TB/s HBM2e, 40 MB L2, 164 KB shared/SM, 163 KB/block)"
_LATENCY_PAPER = ("Luo et al., 'Benchmarking and Dissecting the Nvidia Hopper GPU Architecture', arXiv:2402.13499, "
                  "pointer-chase L2 hit latency on Hopper (H800) and Ampere (A100): about 260 cycles, a value recalled "
                  "from the paper's latency table and NOT re-checked when this was written (same order as the 236 "
                  "cycles github.com/sjfeng1999/gpu-arch-microbenchmark reports for Turing); the GPU session's "
                  "pointer chase replaces it")
_ESTIMATE_SYNC = ("ESTIMATE, not a citation: about 4 serial L2 round trips (release store, arrival, last arrival seen, "
                  "acquire) plus polling slack; the GPU session's flag round trip / grid.sync replace it")
_ESTIMATE_L2_BW = ("ESTIMATE, not a citation: about 2.5x the HBM bandwidth, the ratio public L2 bandwidth tests "
                   "(e.g. chipsandcheese.com, 'Nvidia's H100: Funny L2, and Tons of Bandwidth', 2023) show for "
                   "reads that fit L2; the GPU session's stream read replaces it")
_ESTIMATE_LAUNCH = ("ESTIMATE, not a citation: a CuPy RawKernel launch costs several microseconds of Python and "
                    "driver time; a graph node or a queued dependent kernel about 1-2 us of GPU idle; the GPU "
                    "session's empty-kernel loop and graph replay replace both")

_COMMON_SOURCES = {
    "l2_latency_ns": _LATENCY_PAPER,
    "grid_sync_ns": _ESTIMATE_SYNC,
    "l2_gbs": _ESTIMATE_L2_BW,
    "python_launch_us": _ESTIMATE_LAUNCH,
    "graph_node_us": _ESTIMATE_LAUNCH,
}

def _sources_with(datasheet: str) -> dict:
    """The common sources, with the fields a datasheet gives taken from ``datasheet``."""
    fields = ("sms", "clock_ghz", "fp32_tflops", "hbm_gbs", "shared_per_block", "l2_bytes")
    return {**_COMMON_SOURCES, **dict.fromkeys(fields, datasheet)}


DEVICES: dict[str, Device] = {
    # L2 latency: 260 cycles / 1.98 GHz = 131 ns; grid sync ~ 4 x 131 ns + slack.
    "H100-SXM": Device(
        name="H100-SXM", sms=132, clock_ghz=1.98, fp32_tflops=66.9, l2_latency_ns=131.0, grid_sync_ns=700.0,
        l2_gbs=8400.0, hbm_gbs=3350.0, python_launch_us=6.0, graph_node_us=1.5, shared_per_block=232448,
        l2_bytes=50 * 2**20,
        sources=_sources_with(_DATASHEET_H100),
    ),
    "H200": Device(
        name="H200", sms=132, clock_ghz=1.98, fp32_tflops=66.9, l2_latency_ns=131.0, grid_sync_ns=700.0,
        l2_gbs=12000.0, hbm_gbs=4800.0, python_launch_us=6.0, graph_node_us=1.5, shared_per_block=232448,
        l2_bytes=60 * 2**20,
        sources=_sources_with(_DATASHEET_H200),
    ),
    # 260 cycles / 1.41 GHz = 184 ns.
    "A100-SXM": Device(
        name="A100-SXM", sms=108, clock_ghz=1.41, fp32_tflops=19.5, l2_latency_ns=184.0, grid_sync_ns=950.0,
        l2_gbs=5100.0, hbm_gbs=2039.0, python_launch_us=6.0, graph_node_us=1.5, shared_per_block=166912,
        l2_bytes=40 * 2**20,
        sources=_sources_with(_DATASHEET_A100),
    ),
}

DEFAULT_DEVICE = "H200"  # the device the first GPU session runs on


def device(name: str) -> Device:
    """A table entry by name (case-insensitive), or a ValueError listing them."""
    for key, entry in DEVICES.items():
        if key.lower() == name.lower():
            return entry
    raise ValueError(f"device must be one of {sorted(DEVICES)}, got {name!r}")


def nearest_entry(sms: int, name: str = "") -> Device:
    """The table entry whose name matches ``name`` (H200 before H100: 'H200' contains
    no 'H100'), else the one with the closest SM count."""
    upper = name.upper()
    for key in ("H200", "H100", "A100"):
        if key in upper:
            return next(entry for entry_key, entry in DEVICES.items() if entry_key.startswith(key))
    return min(DEVICES.values(), key=lambda entry: abs(entry.sms - sms))


def from_cupy_attributes(name: str, attributes: dict) -> Device:
    """A Device from a CuPy device's ``attributes`` dict (``cupy.cuda.Device().attributes``)
    and its name. Read off the device: SMs, clock (``ClockRate``, kHz), L2 size, opt-in
    shared memory per block, HBM bandwidth = 2 (double data rate) x ``MemoryClockRate``
    (kHz) x ``GlobalMemoryBusWidth`` / 8 bytes. Everything else (FP32 rate per SM and
    clock, latencies, sync and launch costs, L2 bandwidth per HBM bandwidth) comes from
    the nearest table entry, scaled where it scales, and is listed in ``assumed``."""
    base = nearest_entry(int(attributes["MultiProcessorCount"]), name)
    sms = int(attributes["MultiProcessorCount"])
    clock_ghz = attributes.get("ClockRate", 0) / 1e6 or base.clock_ghz
    # FP32 lanes per SM and clock from the table entry: 128 on sm_80 and sm_90.
    fp32_tflops = base.fp32_tflops * (sms / base.sms) * (clock_ghz / base.clock_ghz)
    memory_khz = attributes.get("MemoryClockRate", 0)
    bus_bits = attributes.get("GlobalMemoryBusWidth", 0)
    hbm_gbs = 2 * memory_khz * 1e3 * bus_bits / 8 / 1e9 if memory_khz and bus_bits else base.hbm_gbs
    assumed = ["l2_latency_ns", "grid_sync_ns", "l2_gbs", "python_launch_us", "graph_node_us",
               "fp32_tflops (per SM and clock)"]
    if not (memory_khz and bus_bits):
        assumed.append("hbm_gbs")
    if not attributes.get("ClockRate"):
        assumed.append("clock_ghz")
    return replace(
        base,
        name=f"{name} (read from the device; rest from {base.name})",
        sms=sms,
        clock_ghz=clock_ghz,
        fp32_tflops=fp32_tflops,
        l2_gbs=base.l2_gbs * hbm_gbs / base.hbm_gbs,
        hbm_gbs=hbm_gbs,
        shared_per_block=int(attributes.get("MaxSharedMemoryPerBlockOptin", base.shared_per_block)),
        l2_bytes=int(attributes.get("L2CacheSize", base.l2_bytes)),
        sources={**base.sources, "read": f"cupy.cuda.Device().attributes of {name}"},
        assumed=tuple(assumed),
    )


def from_cupy(device_id: int | None = None) -> Device:
    """:func:`from_cupy_attributes` for CuPy's current (or given) device."""
    import cupy

    dev = cupy.cuda.Device(device_id) if device_id is not None else cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return from_cupy_attributes(name, dev.attributes)


def with_measurements(base: Device, measured: dict) -> Device:
    """``base`` with the parameters ``measured`` gives (keys: Device field names, e.g.
    from the GPU session's microbenchmarks); they are removed from ``assumed``."""
    unknown = set(measured) - set(Device.__dataclass_fields__)
    if unknown:
        raise ValueError(f"measured has keys that are not Device parameters: {sorted(unknown)}")
    sources = {**base.sources, **{key: "measured by benchmarks/gpu_session.py" for key in measured}}
    assumed = tuple(a for a in base.assumed if a.split(" ")[0] not in measured)
    return replace(base, **measured, sources=sources, assumed=assumed, name=f"{base.name}, measured parameters")


def for_runtime(rt) -> Device:
    """The device a ``_launch`` runtime runs on, for the variant chooser: a GPU's from
    its CuPy attributes (:func:`from_cupy`, memoized per device); the CPU emulator's
    (which has no speed of its own) is the H100 SXM entry with the emulated device's SM
    count and shared memory, so the chooser takes the same decisions there as on a GPU
    of that shape (its rates scaled to its SMs)."""
    device_id = getattr(rt, "_device_id", None)
    if device_id is not None:
        return _cupy_device(device_id)
    base = DEVICES["H100-SXM"]
    share = rt.sm_count / base.sms  # the device-wide rates scale with the SMs
    return replace(base, name=f"emulated ({rt.sm_count} SMs, {rt.max_shared_bytes} B shared)", sms=rt.sm_count,
                   shared_per_block=rt.max_shared_bytes, fp32_tflops=base.fp32_tflops * share,
                   l2_gbs=base.l2_gbs * share, hbm_gbs=base.hbm_gbs * share)


@functools.cache
def _cupy_device(device_id: int) -> Device:
    return from_cupy(device_id)


# --------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """One layer's sizes; ``dtype`` is the storage type ("float32" or "float16":
    float32 math either way); ``cell`` the recurrent cell ("lstm", "gru", "rnn_tanh",
    "rnn_relu"), whose gate count (4, 3, 1) scales the products and the traffic."""

    batch: int
    hidden: int
    input_size: int | None = None  # None: I = H
    dtype: str = "float32"
    cell: str = "lstm"

    def __post_init__(self):
        for what in ("batch", "hidden"):
            value = getattr(self, what)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive int, got {value!r}")
        if self.input_size is not None and (not isinstance(self.input_size, int) or self.input_size < 1):
            raise ValueError(f"input_size must be a positive int or None, got {self.input_size!r}")
        if self.dtype not in _launch.STORAGE_TYPES:
            raise ValueError(f"dtype must be one of {tuple(_launch.STORAGE_TYPES)}, got {self.dtype!r}")
        if self.cell not in CELL_GATES:
            raise ValueError(f"cell must be one of {tuple(CELL_GATES)}, got {self.cell!r}")

    @property
    def gates(self) -> int:
        return CELL_GATES[self.cell]

    @property
    def inputs(self) -> int:
        return self.hidden if self.input_size is None else self.input_size

    @property
    def storage_bytes(self) -> int:
        return 2 if self.dtype == "float16" else 4


@dataclass(frozen=True)
class Anchor:
    """A configuration the issue sets a target for; ``steps`` is the T of the target
    (the prediction is per step, independent of T)."""

    label: str
    problem: Problem
    steps: int
    directions: tuple  # "forward" (inference) and/or "training" (forward + backward)
    target: str


ANCHORS = (
    Anchor("B=64 T=256 H=512", Problem(64, 512), 256, ("forward", "training"),
           "forward and forward+backward <= 1.0x cuDNN fp32 (TF32 off)"),
    Anchor("B=16 T=1024 H=768", Problem(16, 768), 1024, ("forward", "training"),
           "forward and forward+backward <= 1.0x cuDNN fp32 (TF32 off)"),
    Anchor("B=16 T=1024 H=768 fp16", Problem(16, 768, dtype="float16"), 1024, ("forward", "training"),
           "<= 1.0x cuDNN fp16"),
    Anchor("B=1 T=1024 H=512", Problem(1, 512), 1024, ("forward",), "forward <= 2 us per step"),
)


# --------------------------------------------------------------------------- counting
@dataclass
class Breakdown:
    """A prediction with its parts: ``terms`` (us) and the ``counts`` they came from.
    ``us`` is math.inf when the variant cannot run the problem (``reason`` says why)."""

    variant: str
    direction: str
    us: float
    terms: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    reason: str = ""


# Fraction of the FP32 FMA peak assumed for the all-steps GEMMs, which every variant runs
# on cuBLAS (rnnkernels/_gemm.py: FP32 compute, TF32 off): an assumption, to be replaced
# by measurement; cuBLAS SGEMM reaches most of the FP32 peak on large products.
CUBLAS_FP32_EFFICIENCY = 0.70


def gemm_us(m: int, n: int, k: int, dev: Device, efficiency: float) -> float:
    """Time of one M x N x K product at ``efficiency`` of the FP32 peak:
    2·M·N·K / (fp32 rate · efficiency). No tensor cores: float32 and float16 storage
    both do FP32 math on the CUDA cores."""
    return 2.0 * m * n * k / (dev.fp32_flops_per_us * efficiency)


def fma_efficiency(rows: int, weight_rows: int = GATES) -> float:
    """Fraction of the FP32 FMA peak a recurrent-product inner loop can reach when, per
    reduction index, a thread loads 4 gate weights and ``rows`` h values from shared
    memory and does 4·rows FMAs. An SM issues 4 warp-FMAs per clock (128 lanes) but
    serves one warp-wide 4-byte shared load per clock (128 B/clock), so per warp and
    index: (4 + rows) load clocks against 4·rows / 4 = rows FMA clocks, and

        efficiency = rows / (4 + rows)          (0.2 at 1 row, 0.5 at 4, 0.67 at 8)

    The same holds for 16-byte loads (4 clocks each, 4x the FMAs). ``weight_rows``: the
    weights loaded per index, 4 above (the LSTM's gates); a GRU step kernel loads 3, an
    Elman one 1: rows / (weight_rows + rows)."""
    return rows / (weight_rows + rows)


def per_step_gemm_flops(direction: str, p: Problem) -> list[tuple[int, int, int]]:
    """The all-steps products, as (M, N, K) per step (M = B rows of one step):
    forward: gx = x·W_ihᵀ (B x 4H x I); backward: dx = dz·W_ih (B x I x 4H),
    dW_ih = dzᵀ·x (4H x I x B), dW_hh = dzᵀ·h (4H x H x B)."""
    b, h, i = p.batch, p.hidden, p.inputs
    if direction == "backward":
        return [(b, i, p.gates * h), (p.gates * h, i, b), (p.gates * h, h, b)]
    return [(b, p.gates * h, i)]


def hbm_bytes_per_step(direction: str, p: Problem) -> int:
    """Streaming bytes per step (each read or written once; W_hh stays in L2):
    forward: gx read (B·4H·4), h_t written (B·H·4), plus, training, the gates and c_t
    written (B·4H·4 + B·H·4); backward: gates, c_t, c_{t-1} and dy read, dz written
    (2·B·4H·4 + 2·B·H·4 + B·H·s)."""
    b, h, s = p.batch, p.hidden, p.storage_bytes
    if direction == "forward_inference":
        return b * p.gates * h * 4 + b * h * 4
    if direction == "forward_training":
        return 2 * b * p.gates * h * 4 + 2 * b * h * 4
    return 2 * b * p.gates * h * 4 + 2 * b * h * 4 + b * h * s


def _check(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def step_kernel_us(direction: str, p: Problem, dev: Device, tile=None) -> tuple[float, dict, dict]:
    """One launch of the per-step kernel (csrc/lstm_forward.cu / lstm_backward.cu) with
    ``tile`` (a ``_launch.StepTile``; default: the one ``_launch.choose_step_tile``
    picks); returns (us, terms, counts).

    Counts: K = H forward, 4H backward (the reduction); blocks = units/unit_tile x
    B/batch_tile; every block column re-reads the W_hh rows of its units from L2, every
    block row re-reads its batch rows of h (forward) or dz (backward), so

        L2 bytes = batch_blocks · 4H·H·s + unit_blocks · B·K·4
        FLOPs    = 2 · B' · 4H' · H    (B', H' rounded up to whole tiles: executed)
        chain    = waves · ceil(K / (k_tile · k_split)) · L2 latency   (each staging
                   round of k_tile · k_split columns issues all its loads, then waits
                   for L2 once before its FMAs; waves = ceil(blocks / (SMs · resident)))

    and kernel = max(L2 bytes / L2 bandwidth, HBM bytes / HBM bandwidth,
    FLOPs / (FP32 rate · active SMs / SMs · fma_efficiency(rows_per_thread)), chain).
    HBM bytes are :func:`hbm_bytes_per_step`, plus 4H·H·s when W_hh is larger than half
    the L2 (then it does not survive in L2 from one step to the next)."""
    b, h, s = p.batch, p.hidden, p.storage_bytes
    tile = tile or _launch.choose_step_tile(b, h, dev.sms)
    grid = tile.grid(b, h)
    unit_blocks, batch_blocks = grid[0], grid[1]
    blocks = unit_blocks * batch_blocks
    k = h if direction != "backward" else p.gates * h
    resident = max(1, min(32, 2048 // tile.threads))
    rounds = math.ceil(k / (tile.k_tile * tile.k_split))
    waves = math.ceil(blocks / (dev.sms * resident))
    l2_bytes = batch_blocks * p.gates * h * h * s + unit_blocks * b * k * 4
    # Executed FMAs: a partly empty tile still runs its zero-filled rows and units.
    flops = 2.0 * (batch_blocks * tile.batch_tile) * p.gates * (unit_blocks * tile.unit_tile) * h
    active = min(1.0, blocks / dev.sms)
    hbm = hbm_bytes_per_step(direction, p)
    if p.gates * h * h * s > dev.l2_bytes // 2:
        # W_hh does not stay in L2 from one step to the next (it shares L2 with the
        # streaming arrays): each step reads it from HBM once more.
        hbm += p.gates * h * h * s
    terms = {
        "l2_us": l2_bytes / (dev.l2_gbs * 1e3),
        "hbm_us": hbm / (dev.hbm_gbs * 1e3),
        "flops_us": flops / (dev.fp32_flops_per_us * active * fma_efficiency(tile.rows_per_thread, p.gates)),
        "chain_us": waves * rounds * dev.l2_latency_ns / 1e3,
    }
    counts = {"tile": tile.name, "blocks": blocks, "waves": waves, "l2_bytes": l2_bytes, "hbm_bytes": hbm,
              "flops": flops, "serial_l2_round_trips": waves * rounds}
    return max(terms.values()), terms, counts


def best_step_tile(direction: str, p: Problem, dev: Device, tiles=None):
    """(tile, predicted kernel us) of the fastest of ``tiles`` (default
    ``_launch.STEP_TILES``) for the per-step kernel: the tile table's hook. Ties keep
    the table's order."""
    tiles = _launch.STEP_TILES if tiles is None else tiles
    scored = [(tile, step_kernel_us(direction, p, dev, tile)[0]) for tile in tiles]
    return min(scored, key=lambda item: item[1])


def _gemm_share(direction: str, p: Problem, dev: Device, efficiency: float) -> float:
    return sum(gemm_us(m, n, k, dev, efficiency) for m, n, k in per_step_gemm_flops(direction, p))


def model_step(direction: str, p: Problem, dev: Device) -> Breakdown:
    """"step": one Python launch of the per-step kernel per step; cuBLAS GEMMs after/before.
    The CPU issues launches asynchronously, so a step costs the slower of the CPU's
    launch and the GPU's kernel plus the gap between dependent kernels:

        us = max(python_launch, kernel + graph_node_gap) + GEMM share (cuBLAS)"""
    kernel, terms, counts = step_kernel_us(direction, p, dev)
    gemm = _gemm_share(direction, p, dev, CUBLAS_FP32_EFFICIENCY)
    terms = {**terms, "kernel_us": kernel, "launch_us": dev.python_launch_us, "gap_us": dev.graph_node_us,
             "gemm_us": gemm}
    us = max(dev.python_launch_us, kernel + dev.graph_node_us) + gemm
    return Breakdown("step", direction, us, terms, {**counts, "launches": 1})


def model_graph(direction: str, p: Problem, dev: Device) -> Breakdown:
    """"graph": the same per-step kernels replayed from a CUDA graph (no Python per
    step), the big products on cuBLAS:

        us = kernel + graph_node_gap + GEMM share (cuBLAS)"""
    kernel, terms, counts = step_kernel_us(direction, p, dev)
    gemm = _gemm_share(direction, p, dev, CUBLAS_FP32_EFFICIENCY)
    terms = {**terms, "kernel_us": kernel, "gap_us": dev.graph_node_us, "gemm_us": gemm}
    return Breakdown("graph", direction, kernel + dev.graph_node_us + gemm, terms, {**counts, "launches": 1})


def model_persistent(direction: str, p: Problem, dev: Device, *, prefetch: bool = True) -> Breakdown:
    """"persistent": one cooperative launch for all steps, laid out by the launcher's
    own plan (``_persistent.plan``: ``units`` hidden units per block, one block per SM,
    the staged state in ``chunks`` row chunks); each block keeps its slice of W_hh in
    shared memory, and per step

        us = grid_sync                                   (per-producer flags round trip)
           + chunks · L2 latency + B·K·4 / (L2 bandwidth / SMs)
                                                          (each block stages h_{t-1}, or
                                                           dz_{t+1}, with 16-byte loads)
           + max(block FMAs · 2 / (FP32 rate per SM · fma_efficiency(row_tile)),
                 HBM bytes / HBM bandwidth)
           + partials wavefronts / clock                  (the k-partials' stores and
                                                           loads, counted bank by bank)
           + inputs                                       (0 with the prefetch, else
                                                           one L2 latency)
           + GEMM share (cuBLAS)

    with block FMAs = B rounded up to the row tile × the block's weight rows × K (the
    padded rows are computed too): the inner loop reads 4 weight rows and row_tile
    state rows from shared memory per 4·row_tile FMAs (slice_times_state), which bounds
    it at fma_efficiency(row_tile) of the FP32 rate. ``partials``: the product's KSplit
    partials of each output go through shared memory (the product's stores, then
    sum_partials's loads, after a barrier: serial), one wavefront a cycle, the
    wavefronts counted from persistent.cuh's layout for this plan, bank conflicts
    included (``_shared_banks.persistent_partials``, the busiest block). ``inputs``: the pointwise step
    reads each pair's inputs (gx forward; the saved gates, states and dy backward),
    none written in the launch. Every persistent kernel loads its first pair's before
    the wait for the other blocks (``prefetch``), so that round trip overlaps the wait;
    ``prefetch=False`` models a kernel that loads them after the product, one more
    dependent round trip on each step's critical path, counted at the L2 latency (a
    lower bound: the table has no HBM latency, and a saved array larger than the L2
    is read from HBM). Later pairs of a thread (B·units > threads) are not modelled.
    Infeasible (inf) where the plan is: W_hh's slices and one row tile of state do not
    fit the blocks' shared memory."""
    from . import _persistent

    b, h = p.batch, p.hidden
    k = h if direction != "backward" else p.gates * h
    plan_direction = _persistent.BACKWARD if direction == "backward" else _persistent.FORWARD
    found = _persistent.plan(plan_direction, b, h, dev.sms, dev.shared_per_block - _persistent.STATIC_SHARED_BYTES,
                             cell=p.cell)
    weights = p.gates * h * h * p.storage_bytes
    counts = {"w_hh_bytes": weights, "launches": 0, "grid_syncs": 1}
    if found is None:
        return Breakdown("persistent", direction, math.inf, {}, counts,
                         reason=f"W_hh ({weights} B) does not fit the shared memory of {dev.sms} blocks of "
                         f"{dev.shared_per_block} B beside one row tile of state (_persistent.plan)")
    tile = found.tile
    padded_rows = -(-b // tile.row_tile) * tile.row_tile
    item_rows, weight_rows, _, _, _ = _persistent.CELLS[p.cell].geometry(plan_direction, found.units, h)
    block_fmas = padded_rows * weight_rows * k
    chunks = -(-padded_rows // found.chunk_rows)
    hbm = hbm_bytes_per_step(direction, p)
    stage_bytes = b * k * 4
    per_sm_flops_per_us = dev.fp32_flops_per_us / dev.sms
    partials = _shared_banks.persistent_partials(found, b, h, p.cell)
    terms = {
        "sync_us": dev.grid_sync_ns / 1e3,
        "stage_us": chunks * dev.l2_latency_ns / 1e3 + stage_bytes / (dev.l2_gbs * 1e3 / dev.sms),
        "flops_us": 2.0 * block_fmas / (per_sm_flops_per_us * fma_efficiency(tile.row_tile, item_rows)),
        "hbm_us": hbm / (dev.hbm_gbs * 1e3),
        "partials_us": partials.wavefronts / (dev.clock_ghz * 1e3),
        "inputs_us": 0.0 if prefetch else dev.l2_latency_ns / 1e3,
        "gemm_us": _gemm_share(direction, p, dev, CUBLAS_FP32_EFFICIENCY),
    }
    us = (terms["sync_us"] + terms["stage_us"] + max(terms["flops_us"], terms["hbm_us"]) + terms["partials_us"]
          + terms["inputs_us"] + terms["gemm_us"])
    counts.update(blocks=found.blocks, units=found.units, chunks=chunks, block_fmas=block_fmas, hbm_bytes=hbm,
                  l2_bytes=found.blocks * stage_bytes, serial_l2_round_trips=chunks,
                  partials_wavefronts=partials.wavefronts,
                  partials_load_ways=max(partials.loads.worst_ways, partials.last_loads.worst_ways),
                  partials_store_ways=max(partials.stores.worst_ways, partials.last_stores.worst_ways))
    return Breakdown("persistent", direction, us, terms, counts)


def prefetch_saving(direction: str, p: Problem, steps: int, dev: Device | None = None) -> dict:
    """PREDICTED saving of loading each thread's first pair's inputs before the wait
    (:func:`model_persistent` with and without ``prefetch``): microseconds per step,
    per launch of ``steps`` steps (the first step of a launch has no wait to hide the
    loads behind: T - 1 steps gain), and the share of a step. Not a measurement."""
    dev = dev or DEVICES[DEFAULT_DEVICE]
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    with_prefetch = model_persistent(direction, p, dev, prefetch=True)
    without = model_persistent(direction, p, dev, prefetch=False)
    if not math.isfinite(with_prefetch.us):
        return {"us_per_step": 0.0, "us_per_launch": 0.0, "share_of_step": 0.0, "reason": with_prefetch.reason}
    per_step = without.us - with_prefetch.us
    return {"us_per_step": per_step, "us_per_launch": per_step * (steps - 1), "share_of_step": per_step / without.us}


# One function per variant of rnnkernels/_launch.py (built or being built).
MODELS = {"step": model_step, "graph": model_graph, "persistent": model_persistent}


# --------------------------------------------------------------------------- chooser hook
def explain(variant: str, direction: str, problem: Problem, dev: Device | None = None) -> Breakdown:
    """The prediction with its terms and counts (see each model's docstring)."""
    _check(direction)
    if variant not in MODELS:
        raise ValueError(f"variant must be one of {tuple(MODELS)} (the modelled ones), got {variant!r}")
    return MODELS[variant](direction, problem, dev or DEVICES[DEFAULT_DEVICE])


def predict(variant: str, direction: str, problem: Problem, dev: Device | None = None) -> float:
    """Predicted microseconds per step (math.inf when the variant cannot run it).
    ``direction``: "forward_inference", "forward_training" or "backward"."""
    return explain(variant, direction, problem, dev).us


def predict_mode(variant: str, mode: str, problem: Problem, dev: Device | None = None) -> float:
    """The session's modes: "forward" = forward_inference, "training" =
    forward_training + backward."""
    if mode == "forward":
        return predict(variant, "forward_inference", problem, dev)
    if mode == "training":
        return predict(variant, "forward_training", problem, dev) + predict(variant, "backward", problem, dev)
    raise ValueError(f"mode must be 'forward' or 'training', got {mode!r}")


def best_variant(candidates, direction: str, problem: Problem, dev: Device | None = None) -> tuple[str, float]:
    """(variant, predicted us) of the fastest feasible candidate; candidates without a
    model are skipped; ValueError when none is left or none is feasible. Ties keep
    the candidates' order."""
    scored = [(name, predict(name, direction, problem, dev)) for name in candidates if name in MODELS]
    feasible = [(name, us) for name, us in scored if math.isfinite(us)]
    if not feasible:
        raise ValueError(f"no modelled, feasible variant among {tuple(candidates)} for {problem} ({direction})")
    return min(feasible, key=lambda item: item[1])


# --------------------------------------------------------------------------- table
def prediction_rows(dev: Device, variants=None) -> list[dict]:
    """One row per anchor x mode: predicted us per step of every modelled variant."""
    variants = tuple(MODELS) if variants is None else tuple(variants)
    rows = []
    for anchor in ANCHORS:
        for mode in anchor.directions:
            row = {"config": anchor.label, "mode": mode, "target": anchor.target}
            for variant in variants:
                row[variant] = predict_mode(variant, mode, anchor.problem, dev) if variant in MODELS else None
            rows.append(row)
    return rows


def _format_us(value) -> str:
    if value is None:
        return "no model"
    return "does not fit" if math.isinf(value) else f"{value:.2f}"


def markdown_table(dev: Device, variants=None) -> str:
    """The README's table: PREDICTED us per step, the device parameters they assume."""
    variants = tuple(MODELS) if variants is None else tuple(variants)
    lines = [
        f"PREDICTIONS (not measurements) for {dev.name}: {dev.sms} SMs, {dev.clock_ghz:.2f} GHz, "
        f"{dev.fp32_tflops:.1f} TFLOP/s FP32, L2 latency {dev.l2_latency_ns:.0f} ns, grid sync "
        f"{dev.grid_sync_ns:.0f} ns, L2 {dev.l2_gbs / 1e3:.1f} TB/s, HBM {dev.hbm_gbs / 1e3:.2f} TB/s, "
        f"launch {dev.python_launch_us:.1f} us (Python) / {dev.graph_node_us:.1f} us (graph node), "
        f"GEMMs on cuBLAS at {CUBLAS_FP32_EFFICIENCY:.0%} of FP32 peak.",
        "",
        "| config | mode | " + " | ".join(f"{v} (us/step)" for v in variants) + " | target |",
        "|---|---|" + "---:|" * len(variants) + "---|",
    ]
    for row in prediction_rows(dev, variants):
        cells = " | ".join(_format_us(row[v]) for v in variants)
        lines.append(f"| {row['config']} | {row['mode']} | {cells} | {row['target']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=f"one of {sorted(DEVICES)}")
    parser.add_argument("--markdown", action="store_true", help="only the markdown table (the README's)")
    args = parser.parse_args(argv)
    try:
        dev = device(args.device)
    except ValueError as error:
        parser.error(str(error))
    print(markdown_table(dev))
    if not args.markdown:
        print()
        print("Sources of the parameters:")
        for key, source in sorted(dev.sources.items()):
            print(f"  {key}: {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
