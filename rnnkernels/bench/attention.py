"""The parallel baseline: one causal self-attention layer, forward and backward by hand.

The layer (d_model = H, ``heads`` heads of head_dim = H / heads; the CLI uses one head,
``--heads`` changes it; no biases, no dropout, no layer norm):

    q, k, v = x·Wq^T, x·Wk^T, x·Wv^T          x [T, B, H] (time-major, like the LSTM)
    per batch and head:
        s = q·k^T                              [T, T]
        p = softmax(s / sqrt(head_dim))        causal: query t sees keys j <= t
        o = p·v                                [T, head_dim]
    y = concat_heads(o)·Wo^T                   [T, B, H]

Backward, with g = dL/dy:
    dWo = g^T·o_cat, do_cat = g·Wo
    dp = do·v^T, dv = p^T·do
    ds = p ∘ (dp − rowsum(p ∘ dp)) / sqrt(head_dim)       (softmax backward; 0 where masked)
    dq = ds·k, dk = ds^T·q
    dx = dq·Wq + dk·Wk + dv·Wv, dWq = dq^T·x (and the same for k, v)

Decode: one new token ``x_new [B, H]`` at context length T. Its key and value are written
at position T of a cache ``[B, heads, T + 1, head_dim]`` whose first T positions hold the
earlier tokens' keys and values; the query attends to all T + 1 positions.

The same code runs on NumPy (CPU) and on CuPy (GPU): the array module ``xp`` does the
products (BLAS on the CPU, cuBLAS GEMMs on the GPU), ``softmax`` is a NumPy function on
the CPU and the RawKernel in ``causal_softmax.cu`` on the GPU. ``torch_*`` below is the
same layer in PyTorch with ``scaled_dot_product_attention`` (autograd gives backward).
"""

from __future__ import annotations

import functools
import math
from importlib import resources
from typing import Any, Callable

import numpy as np

Softmax = Callable[[Any, float], Any]


def head_dim(H: int, heads: int) -> int:
    if heads < 1 or H % heads:
        raise ValueError(f"d_model H={H} is not divisible into {heads} heads")
    return H // heads


def numpy_causal_softmax(scores: np.ndarray, scale: float) -> np.ndarray:
    """softmax(scale * scores) over the last axis, in place, with the causal mask:
    query row t of a [..., Tq, Tk] block sees keys j <= t + (Tk - Tq). Returns ``scores``."""
    queries, keys = scores.shape[-2:]
    hidden = np.arange(keys)[None, :] > np.arange(queries)[:, None] + (keys - queries)
    scores *= scores.dtype.type(scale)
    np.copyto(scores, -np.inf, where=hidden)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _split(a, T: int, B: int, heads: int, xp):
    """[T*B, H] -> [B, heads, T, head_dim], contiguous."""
    return xp.ascontiguousarray(a.reshape(T, B, heads, -1).transpose(1, 2, 0, 3))


def _merge(a, xp):
    """[B, heads, T, head_dim] -> [T*B, H], contiguous."""
    B, heads, T, d = a.shape
    return xp.ascontiguousarray(a.transpose(2, 0, 1, 3)).reshape(T * B, heads * d)


def attention_forward(x, wq, wk, wv, wo, heads: int = 1, *, xp=np,
                      softmax: Softmax = numpy_causal_softmax, training: bool = True):
    """Causal self-attention over ``x [T, B, H]``. Returns ``(y, saved)``; ``saved`` is
    what ``attention_backward`` needs, or None when ``training`` is False."""
    T, B, H = x.shape
    scale = 1.0 / math.sqrt(head_dim(H, heads))
    x2 = x.reshape(T * B, H)
    q = _split(x2 @ wq.T, T, B, heads, xp)
    k = _split(x2 @ wk.T, T, B, heads, xp)
    v = _split(x2 @ wv.T, T, B, heads, xp)
    p = softmax(q @ k.swapaxes(-1, -2), scale)  # [B, heads, T, T]
    o = _merge(p @ v, xp)  # [T*B, H]
    y = (o @ wo.T).reshape(T, B, H)
    saved = (x2, q, k, v, p, o, (wq, wk, wv, wo), scale) if training else None
    return y, saved


def attention_backward(saved, dy, *, xp=np):
    """Gradients ``(dx, dwq, dwk, dwv, dwo)`` of ``attention_forward`` for ``dy [T, B, H]``."""
    x2, q, k, v, p, o, (wq, wk, wv, wo), scale = saved
    T, B, H = dy.shape
    heads = q.shape[1]
    g = dy.reshape(T * B, H)
    dwo = g.T @ o
    do = _split(g @ wo, T, B, heads, xp)
    dp = do @ v.swapaxes(-1, -2)
    dv = p.swapaxes(-1, -2) @ do
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    ds *= ds.dtype.type(scale)
    dq = _merge(ds @ k, xp)
    dk = _merge(ds.swapaxes(-1, -2) @ q, xp)
    dv = _merge(dv, xp)
    dx = (dq @ wq + dk @ wk + dv @ wv).reshape(T, B, H)
    return dx, dq.T @ x2, dk.T @ x2, dv.T @ x2, dwo


def attention_decode(x_new, k_cache, v_cache, wq, wk, wv, wo, *, xp=np,
                     softmax: Softmax = numpy_causal_softmax):
    """One token ``x_new [B, H]`` against caches ``[B, heads, T + 1, head_dim]``: writes its
    key and value at the last position (so repeating the call is idempotent) and returns
    its output ``[B, H]``."""
    B, H = x_new.shape
    heads, d = k_cache.shape[1], k_cache.shape[3]
    scale = 1.0 / math.sqrt(d)
    q = (x_new @ wq.T).reshape(B, heads, 1, d)
    k_cache[:, :, -1, :] = (x_new @ wk.T).reshape(B, heads, d)
    v_cache[:, :, -1, :] = (x_new @ wv.T).reshape(B, heads, d)
    p = softmax(q @ k_cache.swapaxes(-1, -2), scale)  # [B, heads, 1, T + 1]
    o = (p @ v_cache).reshape(B, H)
    return o @ wo.T


# --- CuPy: the softmax RawKernel -------------------------------------------------------

KERNEL_FILE = "causal_softmax.cu"


def kernel_source() -> str:
    """Text of ``causal_softmax.cu`` with a ``#line`` directive for compiler messages."""
    path = resources.files(__package__).joinpath(KERNEL_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"rnnkernels.bench could not find {KERNEL_FILE} next to attention.py; the "
            "installation is incomplete (package data missing), reinstall rnnkernels"
        )
    return f'#line 1 "rnnkernels/bench/{KERNEL_FILE}"\n' + path.read_text(encoding="utf-8")


@functools.cache
def _softmax_module(device_id: int):
    import cupy

    return cupy.RawModule(code=kernel_source(), options=("--std=c++17",))


def cupy_causal_softmax(scores, scale: float):
    """``numpy_causal_softmax`` on the GPU with the RawKernel, in place; float32/float16."""
    import cupy

    names = {np.dtype(np.float32): "causal_softmax_float32",
             np.dtype(np.float16): "causal_softmax_float16"}
    if scores.dtype not in names:
        raise TypeError(f"the CuPy causal softmax supports float32 and float16, not {scores.dtype}")
    if not scores.flags.c_contiguous:
        raise ValueError("the CuPy causal softmax needs C-contiguous scores")
    queries, keys = scores.shape[-2:]
    if keys < queries or keys >= 2**31:
        raise ValueError(f"unsupported score block {queries} x {keys}: need queries <= keys < 2^31")
    rows = scores.size // keys if keys else 0
    if rows == 0:
        return scores
    kernel = _softmax_module(cupy.cuda.Device().id).get_function(names[scores.dtype])
    storage = scores if scores.dtype == np.float32 else scores.view(np.uint16)
    grid = min(rows, 65535 * 32)
    kernel((grid,), (256,), (storage, storage, np.int64(rows), np.int32(queries),
                            np.int32(keys), np.float32(scale)))
    return scores


# --- PyTorch with scaled_dot_product_attention ----------------------------------------

def torch_attention_forward(x, wq, wk, wv, wo, heads: int = 1):
    """The same layer in PyTorch; differentiable with autograd."""
    import torch.nn.functional as F

    T, B, H = x.shape
    d = head_dim(H, heads)

    def split(a):
        return a.reshape(T, B, heads, d).permute(1, 2, 0, 3)

    q, k, v = split(x @ wq.T), split(x @ wk.T), split(x @ wv.T)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.permute(2, 0, 1, 3).reshape(T, B, H) @ wo.T


def torch_attention_decode(x_new, k_cache, v_cache, wq, wk, wv, wo):
    """``attention_decode`` in PyTorch (no mask: the one query sees every cached key)."""
    import torch.nn.functional as F

    B, H = x_new.shape
    heads, d = k_cache.shape[1], k_cache.shape[3]
    q = (x_new @ wq.T).reshape(B, heads, 1, d)
    k_cache[:, :, -1, :] = (x_new @ wk.T).reshape(B, heads, d)
    v_cache[:, :, -1, :] = (x_new @ wv.T).reshape(B, heads, d)
    o = F.scaled_dot_product_attention(q, k_cache, v_cache)
    return o.reshape(B, H) @ wo.T
