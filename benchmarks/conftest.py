"""pytest-benchmark suite over the same implementations as ``rnnkernels-bench``.

    pytest benchmarks/ --benchmark-autosave          # CPU, or the GPU where one is usable
    pytest benchmarks/ --bench-device cpu --bench-seq-lens 64,256 --bench-dtype float32
    pytest benchmarks/ --benchmark-compare            # against the last saved run

Each test validates its implementation against the float64 reference on the same inputs
(and fails without timing if it is off), then times it with ``benchmark.pedantic``: one
call per round; on a GPU the timed function synchronizes the device and the untimed
setup of every round flushes L2. Tests are grouped by mode, dtype and T, so each group
compares the implementations of one problem.
"""

from __future__ import annotations

import pytest

from rnnkernels.bench.cli import UsageError, resolve_device


def pytest_addoption(parser):
    group = parser.getgroup("rnnkernels-bench")
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"))
    group.addoption("--bench-seq-lens", default="64,256",
                    help="comma-separated lengths (decode: context lengths)")
    group.addoption("--bench-batch", type=int, default=8)
    group.addoption("--bench-hidden", type=int, default=128)
    group.addoption("--bench-dtype", default="float32",
                    help="comma-separated dtypes, e.g. float32,float16")
    group.addoption("--bench-rounds", type=int, default=10)


def bench_device(config) -> str:
    try:
        return resolve_device(config.getoption("--bench-device"), "--bench-device")
    except UsageError as error:
        raise pytest.UsageError(str(error)) from error


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "seq_len" in metafunc.fixturenames:
        lengths = [int(t) for t in config.getoption("--bench-seq-lens").split(",") if t]
        metafunc.parametrize("seq_len", lengths, ids=[f"T{t}" for t in lengths])
    if "dtype" in metafunc.fixturenames:
        dtypes = [d for d in config.getoption("--bench-dtype").split(",") if d]
        metafunc.parametrize("dtype", dtypes)
    if "impl_name" in metafunc.fixturenames:
        from rnnkernels.bench.impls import DEFAULT_IMPLS, all_impls

        model = metafunc.module.MODEL
        device = bench_device(config)
        names = [name for name in DEFAULT_IMPLS[device]
                 if any(i.name == name and i.model == model for i in all_impls())]
        metafunc.parametrize("impl_name", names)


@pytest.fixture
def device(request) -> str:
    return bench_device(request.config)


@pytest.fixture
def sizes(request) -> tuple[int, int, int]:
    """(B, H, rounds)."""
    config = request.config
    return (config.getoption("--bench-batch"), config.getoption("--bench-hidden"),
            config.getoption("--bench-rounds"))
