"""FLOP counts for the benchmark rows, from the formulas stated here.

Conventions
-----------
* One multiply-add is 2 FLOPs. Only matrix products are counted; pointwise work (gate
  activations and the cell update of an LSTM, the softmax of attention) is left out, as
  flash-attention's benchmarks do. It is small beside the products: per LSTM step about
  10·B·H operations against 16·B·H² in the products when I = H; per attention layer
  about 5 operations per score against 4·H FLOPs of products per score.
* ``T`` is the sequence length, ``B`` the batch, ``H`` the hidden size (LSTM) or
  d_model (attention), ``I`` the LSTM input size (the CLI uses I = H).
* Training counts backward as twice forward: every product ``Y = A·B`` needs ``dA`` and
  ``dB`` in backward, each as large as the forward product.

Recurrent cells (one layer, one direction; G gate blocks: LSTM 4 (i, f, g, o), GRU 3
(r, z, n), Elman RNN 1; the GRU's reset gate scales W_hn·h after the product, which
does not change the product's size)
    forward   = 2·T·B·G·H·(I + H)         input projection plus recurrent product, every
                                            step (the step-0 recurrent product with h0 is
                                            counted: the kernels do it)
    training  = 3 · forward                forward, then dgates·[W_ih W_hh] for dx and dh,
                                            and dgates^T·[x h] for dW_ih and dW_hh
    decode    = 2·B·G·H·(I + H)            one step; independent of the context length T

Attention (one causal self-attention layer, d_model = H, projections Q, K, V, O of
H x H without bias; the head count does not change the count, heads · head_dim = H)
    projections = 4 · 2·T·B·H²
    pairs       = T·(T + 1) / 2            query-key pairs a causal mask keeps, per
                                            sequence; the *useful* work. The dense
                                            implementations here (NumPy, CuPy) compute all
                                            T² scores and mask half, so they do up to
                                            twice the counted work; SDPA kernels with
                                            ``is_causal`` may skip the masked blocks.
    scores      = 2·B·pairs·H              Q·K^T
    weighted    = 2·B·pairs·H              P·V
    forward     = projections + scores + weighted
    training    = 3 · forward
    decode      = 4 · 2·B·H² + 2 · 2·B·(T + 1)·H
                                            one new token attends to its T-token KV cache
                                            plus itself (T + 1 keys)

``sequential_steps`` is the number of steps that must run one after another because
each needs the previous one's result: an LSTM forward walks T steps, training walks T
steps forward then T steps back (2T), one decode step is 1 (any recurrent cell). Attention has no recurrence:
1 for forward and decode, 2 for training (forward, then backward).
"""

from __future__ import annotations

MODES = ("forward", "training", "decode")
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
"""Gate blocks of each recurrent model ("rnn": the Elman RNN, tanh or ReLU alike)."""
RECURRENT = tuple(GATES)
MODELS = ("lstm", "attention", "gru", "rnn")  # appended, not reordered: inputs are seeded by index


def _check(mode: str, T: int, B: int, H: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if min(T, B, H) < 0:
        raise ValueError(f"sizes must be non-negative, got T={T}, B={B}, H={H}")


def recurrent_flops(mode: str, T: int, B: int, H: int, I: int | None = None, gates: int = 4) -> int:
    """Matmul FLOPs of one call of a recurrent cell of ``gates`` gate blocks in ``mode``
    (see the module docstring)."""
    _check(mode, T, B, H)
    I = H if I is None else I
    per_step = 2 * B * gates * H * (I + H)
    if mode == "decode":
        return per_step
    forward = T * per_step
    return forward if mode == "forward" else 3 * forward


def lstm_flops(mode: str, T: int, B: int, H: int, I: int | None = None) -> int:
    """Matmul FLOPs of one LSTM call in ``mode`` (see the module docstring)."""
    return recurrent_flops(mode, T, B, H, I, GATES["lstm"])


def causal_pairs(T: int) -> int:
    """Query-key pairs a causal mask keeps in a length-``T`` sequence."""
    return T * (T + 1) // 2


def attention_flops(mode: str, T: int, B: int, H: int) -> int:
    """Matmul FLOPs of one causal attention layer in ``mode`` (see the module docstring)."""
    _check(mode, T, B, H)
    if mode == "decode":
        return 4 * 2 * B * H * H + 2 * 2 * B * (T + 1) * H
    projections = 4 * 2 * T * B * H * H
    pairs = causal_pairs(T)
    forward = projections + 2 * (2 * B * pairs * H)
    return forward if mode == "forward" else 3 * forward


def flops(model: str, mode: str, T: int, B: int, H: int) -> int:
    """FLOPs of one call of ``model`` (a recurrent model with I = H, or "attention") in
    ``mode``."""
    if model in GATES:
        return recurrent_flops(mode, T, B, H, gates=GATES[model])
    if model == "attention":
        return attention_flops(mode, T, B, H)
    raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")


def sequential_steps(model: str, mode: str, T: int) -> int:
    """Steps that must run one after another (see the module docstring)."""
    _check(mode, T, 0, 0)
    if model in GATES:
        return {"forward": T, "training": 2 * T, "decode": 1}[mode]
    if model == "attention":
        return {"forward": 1, "training": 2, "decode": 1}[mode]
    raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
