"""The benchmark suite behind ``rnnkernels-bench``: a sequential LSTM beside a parallel
causal-attention baseline, for training, inference over a sequence and decoding.

Modules: ``cli`` (the command), ``runner`` (validate, then time, each implementation),
``impls`` (the implementations and the float64 references), ``attention`` (the
NumPy/CuPy attention layer with its hand-written backward, and the PyTorch SDPA
version), ``timing`` (timers and peak-memory probes), ``flops`` (FLOP formulas),
``device_info`` and ``plot``. Importing this package imports neither PyTorch nor CuPy.
"""
