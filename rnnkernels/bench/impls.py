"""The implementations the suite compares, the problems they solve, and their checks.

A *problem* is one (model, mode, T, B, H, dtype). Its inputs are drawn once in float64
from a seeded generator; every implementation gets them cast to the benchmark dtype,
and its result is compared with a float64 *reference* on the same inputs before it is
timed (``validate``). An implementation whose result is off is not timed.

Recurrent implementations, for each cell the bench runs (``--cell``: model "lstm",
"gru" or "rnn", the tanh Elman RNN; I = H, with biases and initial state):
  rnnkernels-cpu   ``rnnkernels._api.cell_forward(cell, ..., backend="cpu")`` on NumPy
                   arrays (for the LSTM the same path as ``lstm_forward``)
  rnnkernels-cuda  ``backend="cuda"`` on CuPy arrays
  reference        ``backend="reference"`` (NumPy float64; opt-in with --impls)
  torch-cpu        ``torch.nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on the CPU  (baseline on a CPU)
  cudnn            the same modules on the GPU, i.e. cuDNN, TF32 off (baseline on a GPU)
LSTM only:
  onnxruntime      ONNX Runtime's LSTM operator on the CPU, inference only (peer; the
                   ``peers`` extra: onnx, onnxruntime)
  flashrnn         FlashRNN's fused LSTM kernel on the GPU (peer; ``pip install flashrnn``)
Peers that are not installed, or cannot run a problem, are "skipped" rows with the reason.
Attention implementations (``rnnkernels/bench/attention.py``):
  attention-numpy  NumPy, hand-written backward                 (CPU)
  attention-cupy   CuPy: cuBLAS GEMMs and the causal-softmax RawKernel  (GPU)
  attention-sdpa   PyTorch ``scaled_dot_product_attention``, autograd (baseline)

Modes: ``forward`` is inference over the whole sequence (``training=False``, no
autograd for PyTorch); ``training`` is forward then backward with a random upstream
gradient dy for the output sequence; ``decode`` is one new token at context length T
(one recurrent step from a given state; one attention query against a KV cache of T
tokens).

References (float64): PyTorch on the benchmark device when PyTorch is installed (an
implementation independent of the code under test), else ``rnnkernels``' float64
reference backend for the cell and the NumPy attention in float64.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import cells
from . import attention as attn
from .flops import GATES, MODELS, MODES, RECURRENT

# Largest accepted error, max|got - want| / max(max|want|, 1e-3), per output, by dtype.
TOLERANCE = {"float64": 1e-7, "float32": 1e-3, "float16": 3e-2, "bfloat16": 1e-1}
DTYPES = tuple(TOLERANCE)


@dataclass(frozen=True)
class Problem:
    model: str
    mode: str
    T: int
    B: int
    H: int
    dtype: str = "float32"
    heads: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
        if self.T < 1 or self.B < 1 or self.H < 1:
            raise ValueError(f"T, B and H must be positive, got {self.T}, {self.B}, {self.H}")
        if self.model == "attention":
            attn.head_dim(self.H, self.heads)


def make_inputs(p: Problem) -> dict[str, np.ndarray]:
    """float64 inputs of one problem, the same for every implementation."""
    rng = np.random.default_rng(
        [p.seed, p.T, p.B, p.H, p.heads, MODES.index(p.mode), MODELS.index(p.model)])
    bound = 1.0 / math.sqrt(p.H)  # torch's default init range for both layers

    def uniform(*shape):
        return rng.uniform(-bound, bound, size=shape)

    H, B, T = p.H, p.B, p.T
    if p.model in RECURRENT:
        rows = GATES[p.model] * H
        # drawn in this order for every cell (the LSTM's inputs are those of old runs)
        inputs = {"w_ih": uniform(rows, H), "w_hh": uniform(rows, H),
                  "b_ih": uniform(rows), "b_hh": uniform(rows)}
        for state in STATES[p.model]:
            inputs[state] = 0.5 * rng.standard_normal((B, H))
        steps = 1 if p.mode == "decode" else T
        inputs["x"] = rng.standard_normal((steps, B, H))
        if p.mode == "training":
            inputs["dy"] = rng.standard_normal((T, B, H))
        return inputs
    inputs = {name: uniform(H, H) for name in ("wq", "wk", "wv", "wo")}
    if p.mode == "decode":
        d = H // p.heads
        inputs["x"] = rng.standard_normal((B, H))
        inputs["k_cache"] = rng.standard_normal((B, p.heads, T + 1, d))
        inputs["v_cache"] = rng.standard_normal((B, p.heads, T + 1, d))
    else:
        inputs["x"] = rng.standard_normal((T, B, H))
        if p.mode == "training":
            inputs["dy"] = rng.standard_normal((T, B, H))
    return inputs


def to_host(a) -> np.ndarray:
    """Any NumPy, CuPy or PyTorch array as a float64 NumPy array."""
    if isinstance(a, np.ndarray):
        return a.astype(np.float64)
    module = type(a).__module__
    if module.startswith("torch"):
        import torch

        return a.detach().to(device="cpu", dtype=torch.float64).numpy()
    if module.startswith("cupy"):
        return a.get().astype(np.float64)
    raise TypeError(f"cannot bring {type(a)} to the host")


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        raise ValueError(f"shape {got.shape} where {want.shape} was expected")
    if not np.all(np.isfinite(got)):
        return math.inf
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-3)
    return float(np.max(np.abs(got - want), initial=0.0)) / scale


def compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """Relative error of every output the reference has; a missing output is an error."""
    missing = sorted(set(want) - set(got))
    if missing:
        raise KeyError(f"implementation did not return {missing}")
    return {name: relative_error(got[name], want[name]) for name in want}


def validate(prepared: Prepared, want: dict[str, np.ndarray]) -> tuple[str, float]:
    """Run ``prepared`` once and compare its outputs with the reference ``want``: the
    name of the output furthest off and its relative error, to hold against
    ``TOLERANCE[dtype]``."""
    errors = compare(prepared.collect(prepared.run()), want)
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


class Unavailable(Exception):
    """An implementation cannot run here. ``error`` says whether that is a failure (our
    own code is broken or missing) or an expected absence (no PyTorch installed)."""

    def __init__(self, reason: str, error: bool = False):
        super().__init__(reason)
        self.error = error


@dataclass
class Prepared:
    run: Callable[[], Any]  # one call: the thing timed; GPU work is not synchronized
    collect: Callable[[Any], dict[str, np.ndarray]]  # run()'s result as float64 arrays


@dataclass
class Impl:
    name: str
    model: str
    device: str  # "cpu" or "cuda"
    dtypes: tuple[str, ...]
    build: Callable[[Problem, dict[str, np.ndarray]], Prepared]
    timer: str  # "cpu", "cupy" or "torch-cuda"
    peak_method: str | None  # a key of timing.PEAK_METHODS, or None when unknown
    baseline: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)


# --- helpers ----------------------------------------------------------------------------

def _torch():
    try:
        import torch
    except ImportError as error:
        raise Unavailable("PyTorch is not installed (pip install rnnkernels[torch])") from error
    return torch


def _torch_device(device: str):
    torch = _torch()
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable(f"PyTorch {torch.__version__} was built without CUDA or sees no GPU")
    return torch


def _torch_dtype(torch, dtype: str):
    return getattr(torch, dtype)


def _cupy():
    from .timing import require_gpu_cupy

    try:
        return require_gpu_cupy()
    except RuntimeError as error:
        raise Unavailable(str(error), error=True) from error


def _rnnkernels():
    try:
        from rnnkernels import _api
        forward, backward = _api.cell_forward, _api.cell_backward
    except (ImportError, AttributeError) as error:
        raise Unavailable(f"rnnkernels._api.cell_forward is not importable: {error}",
                          error=True) from error
    return forward, backward


# --- recurrent cells ----------------------------------------------------------------------

CELLS = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}
"""The ``rnnkernels.cells`` name of each recurrent model (the bench's "rnn" is the tanh
Elman RNN, torch.nn.RNN's default)."""
STATES = {model: cells.get(name).state_inputs for model, name in CELLS.items()}
"""Initial states of each model, in the cell's order: ("h0", "c0") or ("h0",)."""
TORCH_MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def final_states(model: str) -> tuple[str, ...]:
    """Output names of the final states: ("h_n", "c_n") for the LSTM, ("h_n",) else."""
    return tuple(name[0] + "_n" for name in STATES[model])


def gradient_names(model: str) -> tuple[str, ...]:
    """Gradient output names in cell_backward's and torch.autograd.grad's order here."""
    return ("dx", "dw_ih", "dw_hh", "db_ih", "db_hh") + tuple("d" + name for name in STATES[model])


LSTM_GRADS = gradient_names("lstm")


def _ours_build(backend: str, device: str):
    def build(p: Problem, inputs: dict[str, np.ndarray]) -> Prepared:
        cell_forward, cell_backward = _rnnkernels()
        xp = np if device == "cpu" else _cupy()
        dtype = "float64" if backend == "reference" else p.dtype
        a = {k: xp.asarray(v.astype(dtype)) for k, v in inputs.items()}
        cell = CELLS[p.model]
        args = (cell, a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                tuple(a[name] for name in STATES[p.model]))
        states = final_states(p.model)

        if p.mode == "training":
            def run():
                out = cell_forward(*args, training=True, backend=backend)
                return out, cell_backward(out, dy=a["dy"])

            def collect(result):
                out, grads = result
                got = {"y": to_host(out.y)}
                got.update({name: to_host(state) for name, state in zip(states, out.states)})
                got.update({name: to_host(getattr(grads, name)) for name in gradient_names(p.model)[:5]})
                got.update({name: to_host(d) for name, d in
                            zip(gradient_names(p.model)[5:], grads.dstates)})
                return got
            return Prepared(run, collect)

        def run():
            return cell_forward(*args, training=False, backend=backend)

        def collect(out):
            got = {name: to_host(state) for name, state in zip(states, out.states)}
            if p.mode == "forward":
                got["y"] = to_host(out.y)
            return got
        return Prepared(run, collect)
    return build


def _torch_rnn_build(device: str):
    def build(p: Problem, inputs: dict[str, np.ndarray]) -> Prepared:
        torch = _torch_device(device)
        if device == "cuda" and not torch.backends.cudnn.is_available():
            raise Unavailable("PyTorch has CUDA but no cuDNN", error=True)
        dtype = _torch_dtype(torch, p.dtype)
        return _torch_rnn(torch, p.model, p.mode, inputs, torch.device(device), dtype)
    return build


def exact_fp32_cudnn(torch) -> None:
    """Turn TF32 off for cuDNN, for the rest of the process.

    torch lets cuDNN's RNNs run float32 products as TF32 by default on Ampere and
    later (``torch.backends.cudnn.allow_tf32`` is True; torch >= 2.9 reports it as
    ``torch.backends.cudnn.rnn.fp32_precision == "tf32"``). rnnkernels computes exact
    FP32, so the baseline must too: a TF32 cuDNN is faster for a different precision,
    and its error (~1e-3 relative) sits at the float32 tolerance of ``validate``. The
    legacy flag is set, not ``fp32_precision``: it exists on every torch this supports,
    and setting it keeps the legacy and new settings consistent (mixing the two APIs
    makes a later read of ``allow_tf32`` raise)."""
    torch.backends.cudnn.allow_tf32 = False


def _torch_rnn(torch, model, mode, inputs, device, dtype) -> Prepared:
    """torch.nn.LSTM, GRU or RNN (tanh) with the problem's weights (shared by the impls
    and the reference). Their layouts and gate orders are rnnkernels', so the weights
    load unchanged."""
    H = inputs["w_hh"].shape[1]
    if device.type == "cuda":
        exact_fp32_cudnn(torch)
    layer = getattr(torch.nn, TORCH_MODULES[model])(H, H).to(device=device, dtype=dtype)
    t = {k: torch.tensor(v, device=device, dtype=dtype) for k, v in inputs.items()}
    with torch.no_grad():
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            torch_name = name.replace("w_", "weight_").replace("b_", "bias_") + "_l0"
            getattr(layer, torch_name).copy_(t[name])
    if device.type == "cuda":
        layer.flatten_parameters()
    states0 = [t[name][None] for name in STATES[model]]
    # nn.LSTM takes and returns the pair (h, c); nn.GRU and nn.RNN the tensor h alone
    hidden0 = tuple(states0) if model == "lstm" else states0[0]
    params = [layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0]
    names = final_states(model)

    def states_of(hidden_n):
        return hidden_n if model == "lstm" else (hidden_n,)

    if mode == "training":
        x = t["x"].clone().requires_grad_(True)
        for state in states0:
            state.requires_grad_(True)

        def run():
            y, hidden_n = layer(x, hidden0)
            grads = torch.autograd.grad(y, [x, *params, *states0], grad_outputs=t["dy"])
            return y, states_of(hidden_n), grads

        def collect(result):
            y, finals, grads = result
            got = {"y": to_host(y)}
            got.update({name: to_host(state[0]) for name, state in zip(names, finals)})
            for name, grad in zip(gradient_names(model), grads):
                got[name] = to_host(grad[0] if name in ("dh0", "dc0") else grad)
            return got
        return Prepared(run, collect)

    def run():
        with torch.no_grad():
            return layer(t["x"], hidden0)

    def collect(result):
        y, hidden_n = result
        got = {name: to_host(state[0]) for name, state in zip(names, states_of(hidden_n))}
        if mode == "forward":
            got["y"] = to_host(y)
        return got
    return Prepared(run, collect)


# --- peers: ONNX Runtime (CPU) and FlashRNN (GPU) ------------------------------------------

# ONNX's LSTM operator stacks the gate blocks of W, R and B as i, o, f, c; torch (and
# rnnkernels) as i, f, g, o. Block k of the ONNX weights is block TORCH_TO_ONNX_GATES[k]
# of torch's: i = 0, o = 3, f = 1, c (the cell candidate, torch's g) = 2.
TORCH_TO_ONNX_GATES = (0, 3, 1, 2)


def torch_gates_to_onnx(weights: np.ndarray) -> np.ndarray:
    """Rows of a [4H, ...] torch-ordered weight or bias reordered into ONNX's i, o, f, c."""
    H = weights.shape[0] // 4
    return np.concatenate([weights[k * H:(k + 1) * H] for k in TORCH_TO_ONNX_GATES])


def onnx_lstm_model(inputs: dict[str, np.ndarray], dtype: str):
    """A one-node ONNX graph: the LSTM operator with the problem's weights as
    initializers; graph inputs X [T, B, I], initial_h and initial_c [1, B, H]; outputs
    Y [T, 1, B, H], Y_h and Y_c [1, B, H]. Built with onnx.helper, by hand, because no
    exporter takes our weights without a torch module in between."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as error:
        raise Unavailable("onnx is not installed (pip install rnnkernels[peers])") from error
    H = inputs["w_hh"].shape[1]
    element = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}[dtype]
    # (ONNX Runtime's CPU LSTM kernel takes float32 only; float64 builds, for other runtimes)
    W = torch_gates_to_onnx(inputs["w_ih"])[None].astype(dtype)  # [1, 4H, I]
    R = torch_gates_to_onnx(inputs["w_hh"])[None].astype(dtype)  # [1, 4H, H]
    B = np.concatenate([torch_gates_to_onnx(inputs["b_ih"]),   # [1, 8H]: W's bias, then R's
                        torch_gates_to_onnx(inputs["b_hh"])])[None].astype(dtype)
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "", "initial_h", "initial_c"],
                            ["Y", "Y_h", "Y_c"], hidden_size=H)
    graph = helper.make_graph(
        [node], "rnnkernels_bench_lstm",
        [helper.make_tensor_value_info(name, element, shape) for name, shape in
         (("X", ["T", "B", inputs["x"].shape[2]]), ("initial_h", [1, "B", H]),
          ("initial_c", [1, "B", H]))],
        [helper.make_tensor_value_info(name, element, None) for name in ("Y", "Y_h", "Y_c")],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R"),
         numpy_helper.from_array(B, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what opset 17 needs; newer onnx writes newer than older ORTs read
    return model


def _onnxruntime_build(p: Problem, inputs: dict[str, np.ndarray]) -> Prepared:
    if p.mode == "training":
        raise Unavailable("ONNX Runtime's LSTM operator is inference only")
    try:
        import onnxruntime
    except ImportError as error:
        raise Unavailable("onnxruntime is not installed (pip install rnnkernels[peers])") from error
    options = onnxruntime.SessionOptions()
    # ONNX Runtime's own pool ignores OMP_NUM_THREADS: give it the thread policy's count
    # (0 = its default, one thread per core) like the other libraries.
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        onnx_lstm_model(inputs, p.dtype).SerializeToString(), options,
        providers=["CPUExecutionProvider"])
    feeds = {"X": inputs["x"].astype(p.dtype), "initial_h": inputs["h0"][None].astype(p.dtype),
             "initial_c": inputs["c0"][None].astype(p.dtype)}

    def run():
        return session.run(None, feeds)

    def collect(result):
        y, h_n, c_n = result
        got = {"h_n": h_n[0].astype(np.float64), "c_n": c_n[0].astype(np.float64)}
        if p.mode == "forward":
            got["y"] = y[:, 0].astype(np.float64)
        return got
    return Prepared(run, collect)


def flashrnn_lstm(torch, flashrnn, mode: str, inputs, device, dtype, backend: str,
                  kernel_dtype: str) -> Prepared:
    """The problem through FlashRNN's ``flashrnn(..., function="lstm")``. FlashRNN has no
    input projection: Wx = x W_ih^T is one GEMM here, inside the timed call (as in
    rnnkernels and cuDNN). Its gate order is i, f, z, o, torch's; its recurrent weight
    is R[g, head, d, p] (its default layout "GHDP", d the new hidden unit, p the previous)
    with gate_g[d] = sum_p R[g, head, d, p] h[p]: torch's block W_hh[g H + d, p] as it
    is; one head of size H; states [h, c]; outputs [S, B, T, head, D] ("SBTHD")."""
    H = inputs["w_hh"].shape[1]
    t = {k: torch.tensor(v, device=device, dtype=dtype) for k, v in inputs.items()}
    training = mode == "training"
    names = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")
    if training:
        for name in names:
            t[name].requires_grad_(True)

    def call():
        steps, batch = t["x"].shape[:2]
        Wx = (t["x"] @ t["w_ih"].T).reshape(steps, batch, 4, 1, H).transpose(0, 1)  # [B,T,G,N,D]
        R = t["w_hh"].reshape(4, 1, H, H)                                          # [G,N,D,P]
        b = (t["b_ih"] + t["b_hh"]).reshape(4, 1, H)                               # [G,N,D]
        states = torch.stack([t["h0"], t["c0"]])[:, :, None, None]                 # [S,B,1,N,D]
        out, last = flashrnn(Wx.contiguous(), R.contiguous(), b.contiguous(), states=states,
                             function="lstm", backend=backend, dtype=kernel_dtype)
        # out [S, B, T, N, D], last [S, B, 1, N, D]
        return out[0, :, :, 0].transpose(0, 1), last[0, :, 0, 0], last[1, :, 0, 0]

    if training:
        def run():
            y, h_n, c_n = call()
            grads = torch.autograd.grad(y, [t[name] for name in names], grad_outputs=t["dy"])
            return y, h_n, c_n, grads

        def collect(result):
            y, h_n, c_n, grads = result
            got = {"y": to_host(y), "h_n": to_host(h_n), "c_n": to_host(c_n)}
            got.update({name: to_host(grad) for name, grad in zip(LSTM_GRADS, grads)})
            return got
        return Prepared(run, collect)

    def run():
        with torch.no_grad():
            return call()

    def collect(result):
        y, h_n, c_n = result
        got = {"h_n": to_host(h_n), "c_n": to_host(c_n)}
        if mode == "forward":
            got["y"] = to_host(y)
        return got
    return Prepared(run, collect)


FLASHRNN_BACKEND = "cuda_fused"  # its fused kernel: R in registers and shared memory


def _flashrnn_build(p: Problem, inputs: dict[str, np.ndarray]) -> Prepared:
    torch = _torch_device("cuda")
    try:
        from flashrnn import flashrnn
    except ImportError as error:
        raise Unavailable("flashrnn is not installed (pip install flashrnn; GPU only)") from error
    prepared = flashrnn_lstm(torch, flashrnn, p.mode, inputs, torch.device("cuda"),
                             _torch_dtype(torch, p.dtype), FLASHRNN_BACKEND, p.dtype)
    try:
        prepared.run()  # FlashRNN compiles its kernels here, for this shape and dtype
        torch.cuda.synchronize()
    except Exception as error:  # a peer that cannot run this problem is skipped, saying why
        raise Unavailable(f"flashrnn ({FLASHRNN_BACKEND}) cannot run this problem: "
                          f"{type(error).__name__}: {error}") from error
    return prepared


# --- attention --------------------------------------------------------------------------

ATTENTION_GRADS = ("dx", "dwq", "dwk", "dwv", "dwo")


def _collect_attention_training(result) -> dict:
    """The host arrays to validate from a training call: (y, gradients in
    ATTENTION_GRADS order), for every attention implementation."""
    y, grads = result
    got = {"y": to_host(y)}
    got.update({name: to_host(g) for name, g in zip(ATTENTION_GRADS, grads)})
    return got


def _array_attention_build(device: str):
    def build(p: Problem, inputs: dict[str, np.ndarray]) -> Prepared:
        if device == "cpu":
            xp, softmax = np, attn.numpy_causal_softmax
        else:
            xp, softmax = _cupy(), attn.cupy_causal_softmax
        return _array_attention(xp, softmax, p, inputs)
    return build


def _array_attention(xp, softmax, p: Problem, inputs) -> Prepared:
    a = {k: xp.asarray(v.astype(p.dtype)) for k, v in inputs.items()}
    weights = (a["wq"], a["wk"], a["wv"], a["wo"])
    if p.mode == "decode":
        def run():
            return attn.attention_decode(a["x"], a["k_cache"], a["v_cache"], *weights,
                                         xp=xp, softmax=softmax)
        return Prepared(run, lambda y: {"y": to_host(y)})
    if p.mode == "forward":
        def run():
            return attn.attention_forward(a["x"], *weights, p.heads, xp=xp, softmax=softmax,
                                          training=False)[0]
        return Prepared(run, lambda y: {"y": to_host(y)})

    def run():
        y, saved = attn.attention_forward(a["x"], *weights, p.heads, xp=xp, softmax=softmax)
        return y, attn.attention_backward(saved, a["dy"], xp=xp)

    return Prepared(run, _collect_attention_training)


def _sdpa_build(device: str):
    def build(p: Problem, inputs: dict[str, np.ndarray]) -> Prepared:
        torch = _torch_device(device)
        return _torch_attention(torch, p, inputs, torch.device(device),
                                _torch_dtype(torch, p.dtype))
    return build


def _torch_attention(torch, p: Problem, inputs, device, dtype) -> Prepared:
    t = {k: torch.tensor(v, device=device, dtype=dtype) for k, v in inputs.items()}
    weights = [t["wq"], t["wk"], t["wv"], t["wo"]]
    if p.mode == "decode":
        def run():
            with torch.no_grad():
                return attn.torch_attention_decode(t["x"], t["k_cache"], t["v_cache"], *weights)
        return Prepared(run, lambda y: {"y": to_host(y)})
    if p.mode == "forward":
        def run():
            with torch.no_grad():
                return attn.torch_attention_forward(t["x"], *weights, p.heads)
        return Prepared(run, lambda y: {"y": to_host(y)})

    x = t["x"].requires_grad_(True)
    for w in weights:
        w.requires_grad_(True)

    def run():
        y = attn.torch_attention_forward(x, *weights, p.heads)
        return y, torch.autograd.grad(y, [x, *weights], grad_outputs=t["dy"])

    return Prepared(run, _collect_attention_training)


# --- the registry -----------------------------------------------------------------------

def _recurrent_impls(model: str) -> list[Impl]:
    """Ours and the torch baselines for one recurrent model (the same for every cell)."""
    return [
        Impl("rnnkernels-cpu", model, "cpu", ("float32", "float64"), _ours_build("cpu", "cpu"),
             "cpu", "tracemalloc",
             note="peak memory misses allocations inside Numba code"),
        Impl("rnnkernels-cuda", model, "cuda", ("float32", "float16"),  # as rnnkernels/cuda.py
             _ours_build("cuda", "cuda"), "cupy", "cupy-memory-hook"),
        Impl("reference", model, "cpu", DTYPES, _ours_build("reference", "cpu"), "cpu",
             "tracemalloc", note="computes in float64 whatever the dtype"),
        Impl("torch-cpu", model, "cpu", ("float32", "float64", "float16", "bfloat16"),
             _torch_rnn_build("cpu"), "cpu", None, baseline=True),
        Impl("cudnn", model, "cuda", ("float32", "float64", "float16", "bfloat16"),
             _torch_rnn_build("cuda"), "torch-cuda", "torch.cuda.max_memory_allocated",
             baseline=True, note="TF32 off: exact FP32 like rnnkernels (see exact_fp32_cudnn)"),
    ]


def all_impls() -> list[Impl]:
    """Every implementation, in table order (ours first, then the baselines), for every
    model; an implementation's name may recur with another model."""
    return [
        *_recurrent_impls("lstm"),
        Impl("onnxruntime", "lstm", "cpu", ("float32",), _onnxruntime_build, "cpu",
             None, note="ONNX Runtime's LSTM operator, CPU, inference only"),
        Impl("flashrnn", "lstm", "cuda", ("float32", "bfloat16", "float16"), _flashrnn_build,
             "torch-cuda", "torch.cuda.max_memory_allocated",
             note=f"FlashRNN {FLASHRNN_BACKEND}; x W_ih^T in torch inside the timed call"),
        *_recurrent_impls("gru"),
        *_recurrent_impls("rnn"),
        Impl("attention-numpy", "attention", "cpu", ("float32", "float64"),
             _array_attention_build("cpu"), "cpu", "tracemalloc"),
        Impl("attention-cupy", "attention", "cuda", ("float32", "float16"),
             _array_attention_build("cuda"), "cupy", "cupy-memory-hook"),
        Impl("attention-sdpa", "attention", "cpu", ("float32", "float64", "bfloat16"),
             _sdpa_build("cpu"), "cpu", None, baseline=True),
        Impl("attention-sdpa", "attention", "cuda", ("float32", "float64", "float16", "bfloat16"),
             _sdpa_build("cuda"), "torch-cuda", "torch.cuda.max_memory_allocated",
             baseline=True),
    ]


DEFAULT_IMPLS = {
    "cpu": ("rnnkernels-cpu", "torch-cpu", "onnxruntime", "attention-numpy", "attention-sdpa"),
    "cuda": ("rnnkernels-cuda", "cudnn", "flashrnn", "attention-cupy", "attention-sdpa"),
}
"""The defaults per device; those a cell does not have (the LSTM-only peers for the GRU
and the RNN) are left out for that cell."""


def select_impls(device: str, names: tuple[str, ...] | None = None,
                 cell: str = "lstm") -> list[Impl]:
    """The implementations to run on ``device`` for the recurrent model ``cell`` ("lstm",
    "gru" or "rnn") and attention: the defaults, or ``names``."""
    if cell not in RECURRENT:
        raise ValueError(f"unknown cell {cell!r}; expected one of {', '.join(RECURRENT)}")
    available = {impl.name: impl for impl in all_impls()
                 if impl.device == device and impl.model in (cell, "attention")}
    if names is None:
        return [available[name] for name in DEFAULT_IMPLS[device] if name in available]
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"unknown implementation(s) for device {device} and cell {cell}: {unknown}; "
                         f"choose from {sorted(available)}")
    return [available[name] for name in names]


def baseline_name(model: str, device: str) -> str:
    for impl in all_impls():
        if impl.model == model and impl.device == device and impl.baseline:
            return impl.name
    raise ValueError(f"no baseline for {model} on {device}")


# --- the float64 reference ----------------------------------------------------------------

def reference_outputs(p: Problem, inputs: dict[str, np.ndarray],
                      device: str) -> tuple[dict[str, np.ndarray], str]:
    """float64 outputs for the problem, and the name of what computed them."""
    try:
        torch = _torch_device(device)
    except Unavailable:
        torch = None
    if torch is not None:
        name = f"torch-float64-{device}"
        if p.model in RECURRENT:
            prepared = _torch_rnn(torch, p.model, p.mode, inputs, torch.device(device), torch.float64)
        else:
            prepared = _torch_attention(torch, p, inputs, torch.device(device), torch.float64)
        return prepared.collect(prepared.run()), name
    if p.model in RECURRENT:
        prepared = _ours_build("reference", "cpu")(p, inputs)
        return prepared.collect(prepared.run()), "rnnkernels-reference"
    p64 = Problem(**{**p.__dict__, "dtype": "float64"})
    prepared = _array_attention(np, attn.numpy_causal_softmax, p64, inputs)
    return prepared.collect(prepared.run()), "attention-numpy-float64"
