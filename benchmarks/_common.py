"""Shared body of the pytest-benchmark tests: validate, then time with pedantic mode."""

from __future__ import annotations

import pytest

from rnnkernels.bench import flops, impls, timing


def _synchronizer(impl: impls.Impl):
    """A function that waits for the implementation's GPU work (nothing on the CPU)."""
    if impl.timer == "cupy":
        cupy = timing.require_gpu_cupy()
        return lambda: cupy.cuda.Device().synchronize()
    if impl.timer == "torch-cuda":
        torch = timing.require_gpu_torch()
        return torch.cuda.synchronize
    return lambda: None


def _l2_flush(impl: impls.Impl):
    """An untimed per-round setup that flushes L2 on the GPU (nothing on the CPU)."""
    if impl.device != "cuda":
        return None
    timer = timing.cupy_event_timer() if impl.timer == "cupy" else timing.torch_event_timer()
    synchronize = _synchronizer(impl)

    def setup():
        timer._flush()
        synchronize()
    return setup


def validate_and_time(benchmark, model, impl_name, mode, seq_len, dtype, device, sizes):
    batch, hidden, rounds = sizes
    impl, = impls.select_impls(device, (impl_name,))
    if dtype not in impl.dtypes:
        pytest.skip(f"{impl_name} does not support {dtype}")
    problem = impls.Problem(model, mode, seq_len, batch, hidden, dtype)
    inputs = impls.make_inputs(problem)
    try:
        prepared = impl.build(problem, inputs)
    except impls.Unavailable as reason:
        if reason.error:
            pytest.fail(f"{impl_name} cannot run: {reason}")
        pytest.skip(str(reason))
    want, validated_against = impls.reference_outputs(problem, inputs, device)
    worst, error = impls.validate(prepared, want)
    tolerance = impls.TOLERANCE[dtype]
    assert error <= tolerance, (
        f"{impl_name} is wrong before timing: {worst} off by {error:.3g} relative "
        f"to {validated_against} (tolerance {tolerance:g})")

    synchronize = _synchronizer(impl)

    def call():
        result = prepared.run()
        synchronize()
        return result

    count = flops.flops(model, mode, seq_len, batch, hidden)
    benchmark.group = f"{mode} {dtype} T={seq_len}"
    benchmark.extra_info.update(model=model, impl=impl_name, mode=mode, T=seq_len, B=batch,
                                H=hidden, dtype=dtype, flops=count,
                                sequential_steps=flops.sequential_steps(model, mode, seq_len),
                                max_rel_err=error, validated_against=validated_against)
    benchmark.pedantic(call, setup=_l2_flush(impl), rounds=rounds, warmup_rounds=2, iterations=1)
    benchmark.extra_info["tflops"] = count / benchmark.stats.stats.median / 1e12
