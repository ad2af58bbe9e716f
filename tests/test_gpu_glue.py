"""The host-side GPU glue that the CPU emulator does not run: how CuPy is asked to
build the kernel modules, which stream and device CuPy works on for torch and CuPy
inputs, the cuDNN baseline's precision, and the GPU test scripts' exit handling.

The tests without a marker run anywhere, with fakes standing in for the GPU; the
``gpu`` ones run the real paths (CuPy arrays and torch CUDA tensors through the public
API and the custom op, on the default and on a side stream) where there is a GPU.
"""

from __future__ import annotations

import ast
import itertools
import math
import os
import re
import stat
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import cupy_or_skip, gpu_skip_as_failure, make_problem, make_upstream, rel_err

import rnnkernels
from rnnkernels import _arrays, _launch, _sources

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- CuPy, faked
class _FakeCupy:
    """Records what the code under test asks of CuPy, in order."""

    def __init__(self, *, from_external=True):
        self.log: list = []
        log = self.log

        @contextmanager
        def device(index):
            log.append(("enter device", index))
            yield
            log.append(("exit device", index))

        class Stream:
            pass

        if from_external:

            @contextmanager
            def from_external_stream(obj):
                log.append(("enter stream", "from_external", obj.__cuda_stream__()[1]))
                yield
                log.append(("exit stream",))

            Stream.from_external = staticmethod(from_external_stream)

        @contextmanager
        def external_stream(ptr, device_id=-1):
            log.append(("enter stream", "ExternalStream", ptr, device_id))
            yield
            log.append(("exit stream",))

        class RawModule:
            def __init__(self, code=None, *, options=(), name_expressions=None, **kwargs):
                assert isinstance(options, tuple), "CuPy's RawModule takes options as a tuple"
                log.append(("RawModule", code, options, tuple(name_expressions)))

            def compile(self):
                log.append(("compile",))

            def get_function(self, name):
                log.append(("get_function", name))
                return name

        self.cuda = types.SimpleNamespace(Device=device, Stream=Stream, ExternalStream=external_stream)
        self.RawModule = RawModule


class _TorchStream:
    def __init__(self, ptr, protocol=True):
        self.cuda_stream = ptr
        if protocol:
            self.__cuda_stream__ = lambda: (0, ptr)


def _fake_torch(stream):
    seen = []

    def current_stream(index):
        seen.append(index)
        return stream

    return types.SimpleNamespace(cuda=types.SimpleNamespace(current_stream=current_stream)), seen


@pytest.mark.parametrize("from_external", [True, False], ids=["cupy14-from_external", "older-ExternalStream"])
def test_cuda_scope_enters_the_device_then_torchs_stream(monkeypatch, from_external):
    cupy = _FakeCupy(from_external=from_external)
    torch, seen = _fake_torch(_TorchStream(0xBEEF))
    monkeypatch.setattr(_arrays, "import_cupy", lambda: cupy)
    monkeypatch.setitem(sys.modules, "torch", torch)
    with _arrays.cuda_scope(1, torch_stream=True):
        cupy.log.append("body")
    stream = ("enter stream", "from_external", 0xBEEF) if from_external else ("enter stream", "ExternalStream", 0xBEEF, 1)
    # The device first: CuPy keeps one current stream per device, and a stream made
    # current must belong to the current device.
    assert cupy.log == [("enter device", 1), stream, "body", ("exit stream",), ("exit device", 1)]
    assert seen == [1], "torch's current stream of the inputs' device, not of torch's current device"


def test_cuda_scope_without_torch_sets_only_the_device(monkeypatch):
    cupy = _FakeCupy()
    monkeypatch.setattr(_arrays, "import_cupy", lambda: cupy)
    with _arrays.cuda_scope(2, torch_stream=False):
        cupy.log.append("body")
    assert cupy.log == [("enter device", 2), "body", ("exit device", 2)]


def test_cuda_scope_for_host_arrays_touches_nothing(monkeypatch):
    monkeypatch.setattr(_arrays, "import_cupy", lambda: pytest.fail("host arrays must not import CuPy"))
    with _arrays.cuda_scope(None, torch_stream=False):
        pass
    assert _arrays.cuda_placement(np.zeros(3)) == (None, False)


def test_torch_stream_without_the_protocol_uses_external_stream_with_its_device():
    cupy = _FakeCupy(from_external=True)
    stream = _arrays.cupy_stream_of_torch(cupy, _TorchStream(7, protocol=False), 3)
    with stream:
        pass
    assert cupy.log[0] == ("enter stream", "ExternalStream", 7, 3)


def test_cupy_module_is_built_from_the_kernel_table_on_its_device(monkeypatch):
    """What _launch asks of cupy.RawModule: the #line-prefixed source, the shared
    options as a tuple, every name expression of the table; compiled on the device
    it is cached for, then kernels looked up by name expression."""
    cupy = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    _launch._cupy_module.cache_clear()
    try:
        source = _launch.FORWARD_SOURCE
        module = _launch._cupy_module(source, _launch.compile_options(), 3)
        assert module.get_function(_launch.STEP_TILES[0].forward_name(True)) == _launch.STEP_TILES[0].forward_name(True)
        assert _launch._cupy_module(source, _launch.compile_options(), 3) is module  # memoized
    finally:
        _launch._cupy_module.cache_clear()
    built = [entry for entry in cupy.log if entry[0] == "RawModule"]
    assert len(built) == 1
    _, code, options, names = built[0]
    assert code == _sources.read_source(source) and code.startswith(f'#line 1 "csrc/{source}"')
    assert options == _launch.compile_options()
    assert names == tuple(_launch.KERNELS[source])
    kinds = [entry[0] if isinstance(entry, tuple) else entry for entry in cupy.log]
    assert kinds[:4] == ["enter device", "RawModule", "compile", "exit device"]
    assert cupy.log[0] == ("enter device", 3)


def test_torch_op_runs_cupy_on_torchs_stream_of_the_tensors_device(monkeypatch):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from rnnkernels.torch import _ops

    calls = []

    @contextmanager
    def scope(index, torch_stream):
        calls.append((index, torch_stream))
        yield

    monkeypatch.setattr(_arrays, "cuda_scope", scope)
    monkeypatch.setattr(_arrays, "import_cupy", lambda: types.SimpleNamespace(from_dlpack=None, ascontiguousarray=None))
    with _ops._backend_arrays(torch.device("cuda", 1)):
        pass
    assert calls == [(1, True)]


# ------------------------------------------------------------ CuPy's real API
def test_cupy_api_the_glue_relies_on():
    """The CuPy calls made on a GPU exist with the arguments we pass (a CuPy upgrade
    that renames one fails here, in CI, not in a GPU session)."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    from cupy.cuda import memory_hook

    source = _launch.FORWARD_SOURCE
    # Building a RawModule compiles nothing (that happens on first use, on a GPU).
    module = cupy.RawModule(
        code=_sources.read_source(source),
        options=_launch.compile_options(),
        name_expressions=tuple(_launch.KERNELS[source]),
    )
    assert tuple(module.name_expressions) == tuple(_launch.KERNELS[source])
    for name in ("compile", "get_function"):
        assert callable(getattr(module, name))
    assert hasattr(cupy.cuda.Stream, "from_external") or hasattr(cupy.cuda, "ExternalStream")
    for name in ("Device", "Event", "get_elapsed_time", "set_allocator", "get_current_stream", "Graph"):
        assert hasattr(cupy.cuda, name), name
    # The graph variant (rnnkernels/_graph.py) and the cuBLAS GEMMs (rnnkernels/_gemm.py).
    for name in ("begin_capture", "end_capture"):
        assert callable(getattr(cupy.cuda.Stream, name)), name
    assert callable(cupy.cuda.Graph.launch)
    assert callable(cupy.cuda.device.get_cublas_handle)
    for name in ("malloc_postprocess", "free_postprocess"):
        assert hasattr(memory_hook.MemoryHook, name), name
    assert callable(cupy.from_dlpack)


# ----------------------------------------------------------- cuDNN precision
def test_cudnn_baseline_runs_in_exact_fp32():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from rnnkernels.bench import impls

    before = torch.backends.cudnn.allow_tf32
    try:
        impls.exact_fp32_cudnn(torch)
        assert torch.backends.cudnn.allow_tf32 is False
        rnn = getattr(torch.backends.cudnn, "rnn", None)
        if hasattr(rnn, "fp32_precision"):  # torch >= 2.9's view of the same setting
            assert rnn.fp32_precision != "tf32"
    finally:
        torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------- GPU test scripts
class _Report:
    def __init__(self, skipped=True, longrepr=("file", 1, "Skipped: no usable GPU"), xfail=False):
        self.skipped = skipped
        self.longrepr = longrepr
        if xfail:
            self.wasxfail = "reason"


class _Item:
    def __init__(self, gpu=True):
        self.gpu = gpu

    def get_closest_marker(self, name):
        return object() if (name == "gpu" and self.gpu) else None


def test_required_gpu_turns_gpu_skips_into_failures(monkeypatch):
    monkeypatch.setenv("RNNKERNELS_REQUIRE_GPU", "1")
    assert "no usable GPU" in gpu_skip_as_failure(_Report(), _Item())
    assert gpu_skip_as_failure(_Report(), _Item(gpu=False)) is None
    assert gpu_skip_as_failure(_Report(skipped=False), _Item()) is None
    assert gpu_skip_as_failure(_Report(xfail=True), _Item()) is None
    monkeypatch.delenv("RNNKERNELS_REQUIRE_GPU")
    assert gpu_skip_as_failure(_Report(), _Item()) is None


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.mark.parametrize("pytest_status, expected", [(0, 0), (1, 1), (5, 5)])
def test_sanitizer_script_fails_when_pytest_does(tmp_path, pytest_status, expected):
    """tests/gpu_sanitizer.sh with a fake compute-sanitizer (runs its program) and a
    fake python (exits with pytest_status): a failing or empty pytest run must fail
    the script, and the tests must run with a GPU required."""
    log = tmp_path / "log"
    sanitizer = _executable(
        tmp_path / "compute-sanitizer",
        f'#!/bin/sh\necho "sanitizer $*" >> {log}\nwhile [ "$1" != "--target-processes" ]; do shift; done\n'
        'shift 2\nexec "$@"\n',
    )
    python = _executable(
        tmp_path / "python",
        f'#!/bin/sh\necho "python require_gpu=$RNNKERNELS_REQUIRE_GPU under=$RNNKERNELS_UNDER_SANITIZER $*" >> {log}\n'
        f"exit {pytest_status}\n",
    )
    env = {**os.environ, "COMPUTE_SANITIZER": str(sanitizer), "PYTHON": str(python)}
    done = subprocess.run(["bash", str(REPO / "tests" / "gpu_sanitizer.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == expected, done.stdout + done.stderr
    lines = log.read_text().splitlines()
    assert lines[0].startswith("sanitizer --tool memcheck --error-exitcode 1")
    assert lines[1].startswith("python require_gpu=1 under=1 -m pytest")
    assert len(lines) == (4 if pytest_status == 0 else 2), "racecheck runs only after a clean memcheck"


def test_gpu_session_script_is_valid_bash():
    script = REPO / "benchmarks" / "gpu_session.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -------------------------------------------------------------------- GPU
def _torch_cuda_or_skip():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    cupy_or_skip()
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} sees no CUDA GPU")
    return torch


T, B, I, H = 7, 5, 6, 33  # H crosses a unit tile; B a batch tile
GPU_TOLERANCE = 1e-5


def _host_results(problem, upstream):
    out = rnnkernels.lstm_forward(**problem, backend="reference")
    grads = rnnkernels.lstm_backward(out, **upstream)
    return out, grads


@pytest.mark.gpu
@pytest.mark.parametrize("batch_first", [False, True])
def test_api_on_cupy_arrays(batch_first):
    cupy = cupy_or_skip()
    problem = make_problem(T, B, I, H, dtype=np.float32, seed=3)
    upstream = make_upstream(T, B, H, dtype=np.float32, seed=4)
    want_out, want_grads = _host_results(problem, upstream)
    if batch_first:
        problem["x"] = np.ascontiguousarray(problem["x"].transpose(1, 0, 2))
        upstream["dy"] = np.ascontiguousarray(upstream["dy"].transpose(1, 0, 2))
    device = {k: cupy.asarray(v) for k, v in problem.items()}
    out = rnnkernels.lstm_forward(**device, batch_first=batch_first)  # "auto": cuda for CuPy arrays
    assert out.backend == "cuda" and isinstance(out.y, cupy.ndarray) and out.y.dtype == np.float32
    grads = rnnkernels.lstm_backward(out, **{k: cupy.asarray(v) for k, v in upstream.items()})
    y = cupy.asnumpy(out.y)
    dx = cupy.asnumpy(grads.dx)
    if batch_first:
        y, dx = y.transpose(1, 0, 2), dx.transpose(1, 0, 2)
    assert rel_err(y, want_out.y) < GPU_TOLERANCE
    assert rel_err(dx, want_grads.dx) < GPU_TOLERANCE
    for name in ("h_n", "c_n"):
        assert rel_err(cupy.asnumpy(getattr(out, name)), getattr(want_out, name)) < GPU_TOLERANCE, name
    for name in ("dw_ih", "dw_hh", "db_ih", "db_hh", "dh0", "dc0"):
        got = getattr(grads, name)
        assert isinstance(got, cupy.ndarray), name
        assert rel_err(cupy.asnumpy(got), getattr(want_grads, name)) < GPU_TOLERANCE, name


@pytest.mark.gpu
def test_api_on_non_contiguous_cupy_inputs_and_missing_state():
    cupy = cupy_or_skip()
    problem = make_problem(T, B, I, H, dtype=np.float32, state=False, seed=5)
    want = rnnkernels.lstm_forward(**problem, backend="reference")
    device = {k: None if v is None else cupy.asarray(v) for k, v in problem.items()}
    # A transposed copy transposed back: same values, Fortran-ordered strides.
    device["w_hh"] = cupy.asfortranarray(device["w_hh"])
    assert not device["w_hh"].flags.c_contiguous
    out = rnnkernels.lstm_forward(**device, backend="cuda")
    assert rel_err(cupy.asnumpy(out.y), want.y) < GPU_TOLERANCE


@pytest.mark.gpu
def test_api_on_torch_cuda_tensors_on_a_side_stream():
    """torch CUDA tensors in, torch CUDA tensors out, on the tensors' device; the work
    runs on torch's current stream, so results read on that stream are complete."""
    torch = _torch_cuda_or_skip()
    problem = make_problem(T, B, I, H, dtype=np.float32, seed=6)
    upstream = make_upstream(T, B, H, dtype=np.float32, seed=7)
    want_out, want_grads = _host_results(problem, upstream)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        tensors = {k: torch.from_numpy(v).cuda() for k, v in problem.items()}
        out = rnnkernels.lstm_forward(**tensors)
        grads = rnnkernels.lstm_backward(out, **{k: torch.from_numpy(v).cuda() for k, v in upstream.items()})
        # Read on the side stream, before any synchronization: ordering, not luck.
        got = {"y": out.y.double().cpu(), "dx": grads.dx.double().cpu(), "dw_hh": grads.dw_hh.double().cpu()}
    assert out.backend == "cuda"
    assert out.y.is_cuda and out.y.device == tensors["x"].device and out.y.dtype == torch.float32
    assert rel_err(got["y"].numpy(), want_out.y) < GPU_TOLERANCE
    assert rel_err(got["dx"].numpy(), want_grads.dx) < GPU_TOLERANCE
    assert rel_err(got["dw_hh"].numpy(), want_grads.dw_hh) < GPU_TOLERANCE


@pytest.mark.gpu
def test_torch_module_on_a_side_stream_matches_the_default_stream():
    torch = _torch_cuda_or_skip()
    from rnnkernels.torch import LSTM

    torch.manual_seed(0)
    lstm = LSTM(I, H, num_layers=2, bidirectional=True).cuda()
    x = torch.randn(T, B, I, device="cuda")

    def run():
        xi = x.clone().requires_grad_()
        y, (h_n, c_n) = lstm(xi, lengths=[7, 3, 7, 1, 5])
        (y.square().sum() + h_n.sum() + c_n.sum()).backward()
        return [y.detach().clone(), xi.grad.clone()] + [p.grad.clone() for p in lstm.parameters()]

    lstm.zero_grad()
    on_default = run()
    torch.cuda.synchronize()
    lstm.zero_grad()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = run()
    torch.cuda.synchronize()
    for a, b in zip(on_default, on_stream):
        assert torch.equal(a, b)


# ------------------------------------------- CuPy's real call signatures, no GPU
# Every CuPy, CUDA-runtime, driver and cuBLAS call of the GPU path, checked against the
# installed CuPy without a GPU: CuPy's Cython functions parse their arguments (count,
# keywords, types: a tuple grid, a size_t that must not be negative) before they touch
# the device, so calling them with null handles where no GPU is present raises CUDA's
# "no driver" errors for a good call and a TypeError for a bad one. The first GPU
# session must not be spent on a TypeError.


def _cupy_modules():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    from cupy_backends.cuda.api import driver, runtime

    return cupy, driver, runtime


def _no_gpu_or_skip(cupy):
    """The null-handle calls below are for machines without a GPU (CI); on a GPU the
    ``gpu`` tests make the same calls for real."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - any CUDA runtime failure: no usable GPU, the case here
        return
    if count > 0:
        pytest.skip("a GPU is present: the gpu tests make these calls for real")


def _reached_the_device(error: BaseException) -> bool:
    """Whether ``error`` is what a correctly-called CuPy function raises where there is
    no GPU or only a null handle: a CUDA runtime, driver or cuBLAS error, or CuPy's
    RuntimeError for a missing libcuda. A TypeError or OverflowError (a bad call) is not."""
    from cupy_backends.cuda.api import driver, runtime
    from cupy_backends.cuda.libs import cublas

    if isinstance(error, (runtime.CUDARuntimeError, driver.CUDADriverError, cublas.CUBLASError)):
        return True
    return type(error) is RuntimeError and "libcuda" in str(error)


class _Checked:
    """A CuPy binding module whose functions are called for real (their argument
    parsing is the check) and, having reached the device, return ``value``; constants
    pass through. ``calls`` lists the names called, in order."""

    def __init__(self, module, value=0):
        self._module = module
        self._value = value
        self.calls: list[str] = []

    def __getattr__(self, name):
        attribute = getattr(self._module, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            self.calls.append(name)
            try:
                attribute(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - classified just below, never dropped
                if not _reached_the_device(error):
                    raise
                return self._value
            raise AssertionError(f"{name}{args} succeeded with a null handle: is there a GPU?")

        return call


class _RecordingFunction:
    """Stands in for ``cupy.cuda.function.Function``: records its calls; ``ptr`` is the
    CUfunction handle the driver calls take."""

    ptr = 0xF00

    def __init__(self):
        self.calls = []

    def __call__(self, grid, block, args, shared_mem=0, stream=None, enable_cooperative_groups=False):
        self.calls.append((grid, block, args, shared_mem, enable_cooperative_groups))


def _fake_module_of_rawkernels(cupy, function):
    """A module whose ``get_function`` returns what CuPy's RawModule returns: a real
    ``cupy.RawKernel`` (its own ``__call__``), whose ``kernel`` is ``function``."""

    class RawKernel(cupy.RawKernel):
        @property
        def kernel(self):
            return function

    class Module:
        def get_function(self, name):
            return RawKernel("", name)

    return Module()


def _fake_device_cupy(cupy):
    """Real CuPy, but ``cuda.Device(i)`` a no-op context (there is no device here)."""

    @contextmanager
    def device(index=None):
        yield

    return types.SimpleNamespace(cuda=types.SimpleNamespace(Device=device), RawKernel=cupy.RawKernel)


def test_cupy_runtime_launches_through_cupy_function(monkeypatch):
    """CupyRuntime's kernels go to ``Function.__call__`` (which takes
    ``enable_cooperative_groups`` per launch), not ``RawKernel.__call__`` (which
    passes its module's own and raises "multiple values" with ours: every launch, not
    only cooperative ones, was a TypeError); the dynamic shared memory opt-in gets the
    Function's handle (a RawKernel has no ``ptr``) before the launch."""
    cupy, driver, _ = _cupy_modules()
    function = _RecordingFunction()
    events = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_device_cupy(cupy))
    monkeypatch.setattr(_launch, "_cupy_module", lambda source, options, device_id: _fake_module_of_rawkernels(
        cupy, function))
    monkeypatch.setattr(driver, "funcSetAttribute", lambda *args: events.append(("funcSetAttribute", *args)))
    rt = _launch.CupyRuntime.__new__(_launch.CupyRuntime)
    rt.xp, rt._device_id = cupy, 0
    name = _launch.STEP_TILES[0].forward_name(True)
    launch = rt.function(_launch.FORWARD_SOURCE, name)
    args = (np.int32(1),)
    launch((3, 1, 1), (128, 1, 1), args)
    launch((2, 1, 1), (256, 1, 1), args, shared_mem=100_000, cooperative=True)
    # Just under 48 KiB opts in too: the 48 KiB without it include the static part.
    launch((2, 1, 1), (256, 1, 1), args, shared_mem=48 * 1024 - 64, cooperative=True)
    assert function.calls == [((3, 1, 1), (128, 1, 1), args, 0, False), ((2, 1, 1), (256, 1, 1), args, 100_000, True),
                              ((2, 1, 1), (256, 1, 1), args, 48 * 1024 - 64, True)]
    attribute = driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    assert events == [("funcSetAttribute", 0xF00, attribute, 100_000), ("funcSetAttribute", 0xF00, attribute,
                                                                          48 * 1024 - 64)]
    assert driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES == 8  # CUfunction_attribute, cuda.h

    # And why not the RawKernel: CuPy's own __call__ refuses the keyword.
    raw = _fake_module_of_rawkernels(cupy, function).get_function(name)
    with pytest.raises(TypeError, match="multiple values"):
        raw((1, 1, 1), (32, 1, 1), args, shared_mem=0, enable_cooperative_groups=False)
    assert not hasattr(raw, "ptr")


def test_cupy_occupancy_query_uses_the_function_handle(monkeypatch):
    cupy, driver, _ = _cupy_modules()
    function = _RecordingFunction()
    events = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_device_cupy(cupy))
    monkeypatch.setattr(_launch, "_cupy_module", lambda source, options, device_id: _fake_module_of_rawkernels(
        cupy, function))
    monkeypatch.setattr(driver, "funcSetAttribute", lambda *args: events.append(("funcSetAttribute", *args)))

    def occupancy(*args):
        events.append(("occupancy", *args))
        return 1

    monkeypatch.setattr(driver, "occupancyMaxActiveBlocksPerMultiprocessor", occupancy)
    _launch._cupy_blocks_per_sm.cache_clear()
    try:
        name = _launch._persistent.TILE.forward_name("float", True, True)
        assert _launch._cupy_blocks_per_sm(0, _launch.FORWARD_SOURCE, name, 256, 100_000) == 1
        assert _launch._cupy_blocks_per_sm(0, _launch.FORWARD_SOURCE, name, 256, 0) == 1
    finally:
        _launch._cupy_blocks_per_sm.cache_clear()
    # The opt-in first: without it the query answers 0 past the default maximum.
    assert events == [("funcSetAttribute", 0xF00, 8, 100_000), ("occupancy", 0xF00, 256, 100_000),
                      ("occupancy", 0xF00, 256, 0)]


def test_cupy_function_call_takes_what_the_launcher_passes():
    """The real ``cupy.cuda.function.Function.__call__`` (on a null function) parses
    exactly the arguments CupyRuntime's launcher passes: tuples of ints for grid and
    block, our argument tuple, shared_mem and enable_cooperative_groups by keyword;
    it then fails at the device, not at the call."""
    cupy, _, _ = _cupy_modules()
    _no_gpu_or_skip(cupy)
    from cupy.cuda.function import Function

    function = Function.__new__(Function)
    args = (np.zeros(4, np.float32), np.int32(3), np.uint32(1), np.int64(5))
    for shared_mem, cooperative in ((0, False), (200_000, True)):
        with pytest.raises(Exception) as raised:
            function((132, 1, 1), (256, 1, 1), args[1:], shared_mem=shared_mem, enable_cooperative_groups=cooperative)
        assert _reached_the_device(raised.value), repr(raised.value)
    with pytest.raises(TypeError):  # a list grid: the typed `tuple grid` refuses it
        function([1, 1, 1], (32, 1, 1), ())
    with pytest.raises(TypeError):
        function((1, 1, 1), (32, 1, 1), (), cooperative=True)


def test_cupy_driver_and_runtime_calls_match_the_binding(monkeypatch):
    """funcSetAttribute, occupancyMaxActiveBlocksPerMultiprocessor and
    deviceGetAttribute as _launch calls them, on the real binding."""
    cupy, driver, runtime = _cupy_modules()
    _no_gpu_or_skip(cupy)
    checked_driver = _Checked(driver, value=1)
    monkeypatch.setattr(driver, "funcSetAttribute", checked_driver.funcSetAttribute)
    monkeypatch.setattr(driver, "occupancyMaxActiveBlocksPerMultiprocessor",
                        checked_driver.occupancyMaxActiveBlocksPerMultiprocessor)
    function = types.SimpleNamespace(ptr=0)
    _launch._cupy_allow_shared(function, 200_000)
    monkeypatch.setitem(sys.modules, "cupy", _fake_device_cupy(cupy))
    monkeypatch.setattr(_launch, "_cupy_function", lambda device_id, source, name: function)
    _launch._cupy_blocks_per_sm.cache_clear()
    try:
        assert _launch._cupy_blocks_per_sm(0, _launch.FORWARD_SOURCE, "unused", 256, 200_000) == 1
    finally:
        _launch._cupy_blocks_per_sm.cache_clear()
    assert checked_driver.calls == ["funcSetAttribute", "funcSetAttribute", "occupancyMaxActiveBlocksPerMultiprocessor"]

    from cupy.cuda import runtime as cupy_runtime

    assert cupy_runtime.deviceGetAttribute is runtime.deviceGetAttribute
    for name in ("cudaDevAttrMaxSharedMemoryPerBlockOptin", "cudaDevAttrCooperativeLaunch"):
        with pytest.raises(Exception) as raised:
            runtime.deviceGetAttribute(getattr(cupy_runtime, name), 0)
        assert _reached_the_device(raised.value), repr(raised.value)


def test_device_attribute_names_exist_with_cudas_values():
    """The attribute names _launch passes to deviceGetAttribute, and the keys the GPU
    path reads from ``Device().attributes`` (CuPy's ``cudaDevAttr*`` names without the
    prefix), are CuPy's, with the values of CUDA's cudaDeviceAttr."""
    _, _, runtime = _cupy_modules()
    assert (runtime.cudaDevAttrMultiProcessorCount, runtime.cudaDevAttrCooperativeLaunch,
            runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, runtime.cudaDevAttrL2CacheSize) == (16, 95, 97, 38)
    source = (REPO / "rnnkernels" / "_launch.py").read_text()
    names = set(re.findall(r'_cupy_attribute\(self\._device_id, "(\w+)"\)', source))
    assert names == {"cudaDevAttrMaxSharedMemoryPerBlockOptin", "cudaDevAttrCooperativeLaunch"}
    keys = set()
    for path in _GPU_PATH_FILES:
        keys.update(re.findall(r'attributes(?:\[|\.get\()"(\w+)"', path.read_text()))
    keys.update(_module_constant(REPO / "benchmarks" / "gpu_session.py", "DEVICE_ATTRIBUTES_READ"))
    assert {"MultiProcessorCount", "L2CacheSize", "MaxSharedMemoryPerBlockOptin"} <= keys
    # cupy.cuda.device._get_attributes makes the dict from cupy.cuda.runtime's names.
    from cupy.cuda import runtime as cupy_runtime

    missing = sorted(key for key in keys if not hasattr(cupy_runtime, "cudaDevAttr" + key))
    assert not missing, f"not CuPy device attributes: {missing}"


def test_torch_stream_reaches_cupy_through_the_stream_protocol():
    """_arrays.cupy_stream_of_torch on the real CuPy: torch's ``__cuda_stream__`` (the
    function itself, on a stand-in holding a handle: making a torch CUDA stream needs a
    GPU) gives a CuPy stream on that handle, with no GPU call."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    torch = pytest.importorskip("torch", reason="torch is not installed")

    class TorchLikeStream:
        cuda_stream = 0x5EED
        __cuda_stream__ = torch.cuda.Stream.__cuda_stream__

    stream = _arrays.cupy_stream_of_torch(cupy, TorchLikeStream(), 0)
    assert isinstance(stream, cupy.cuda.Stream) and stream.ptr == 0x5EED


def test_cublas_calls_match_cupys_binding():
    """cublas_gemm's calls on CuPy's real cuBLAS binding (a null handle: cuBLAS answers
    NOT_INITIALIZED after the binding has parsed the arguments): every call, in order,
    for every transpose, accumulate and dtype case."""
    _no_gpu_or_skip(pytest.importorskip("cupy", reason="CuPy is not installed"))
    from rnnkernels import _gemm

    try:
        cublas = _Checked(_gemm._cublas())
    except ImportError as error:
        pytest.skip(f"the cuBLAS library is not installed: {error}")
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        device=types.SimpleNamespace(get_cublas_handle=lambda: 0),
        get_current_stream=lambda: types.SimpleNamespace(ptr=0)))

    class DeviceArray:
        def __init__(self, array):
            self.array, self.data = array, types.SimpleNamespace(ptr=array.ctypes.data)

        def __getattr__(self, name):
            return getattr(self.array, name)

    for transpose_a, transpose_b, accumulate, dtype in itertools.product((False, True), (False, True),
                                                                          (False, True), ("float32", "float16")):
        a = np.ones((5, 3) if transpose_a else (3, 5), dtype)
        b = np.ones((4, 5) if transpose_b else (5, 4), dtype)
        c = np.ones((3, 4), np.float32)
        cublas.calls.clear()
        _gemm.cublas_gemm(cupy, DeviceArray(a), DeviceArray(b), DeviceArray(c), transpose_a=transpose_a,
                          transpose_b=transpose_b, accumulate=accumulate, cublas=cublas)
        assert cublas.calls == ["getMathMode", "getPointerMode", "setStream", "setMathMode", "setPointerMode",
                                "gemmEx", "setPointerMode", "setMathMode"]


def _doc_parameters(function) -> list[str]:
    """Parameter names of a Cython function or class from the signature CuPy embeds in
    the first line of its docstring (``name(self, a, b=1, *, c=2)``); "*" marks the
    start of keyword-only ones."""
    first = function.__doc__.strip().splitlines()[0]
    inside = first[first.index("(") + 1:first.rindex(")")]
    parts, depth, current = [], 0, ""
    for char in inside:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    names = []
    for part in (p.strip() for p in parts if p.strip()):
        declaration = part.split("=", 1)[0].strip().replace("\\", "")
        names.append("*" if declaration == "*" else declaration.split()[-1].lstrip("*"))
    return [name for name in names if name != "self"]


def test_cupy_signatures_of_the_stream_graph_event_and_module_calls():
    """The parameters of the CuPy calls the GPU path makes by keyword or position,
    read from the installed CuPy's embedded signatures."""
    cupy, driver, runtime = _cupy_modules()
    from cupy.cuda import graph, memory, stream

    expected = {
        # _graph.cupy_capture and 03_microbenchmarks.launch_gap
        stream.Stream.__init__: ["null", "non_blocking", "ptds", "priority"],
        stream.Stream.begin_capture: ["mode"],  # None: cudaStreamCaptureModeRelaxed
        stream.Stream.end_capture: [],
        graph.Graph.launch: ["stream"],
        graph.Graph.upload: ["stream"],
        # timing (gpu_session, 03_microbenchmarks)
        stream.Event.__init__: ["block", "disable_timing", "interprocess"],
        stream.Event.record: ["stream"],
        stream.Event.synchronize: [],
        cupy.cuda.get_elapsed_time: ["start_event", "end_event"],
        # _arrays.cupy_stream_of_torch
        stream.Stream.from_external: ["cls", "obj"],
        stream.ExternalStream.__init__: ["ptr", "device_id"],
        cupy.cuda.get_current_stream: ["device_id"],
        # the sanitizer target (gpu_session) and the gpu fixture of test_cuda_kernels
        memory.set_allocator: ["allocator"],
        # _launch: modules, kernels, device queries
        cupy.RawModule: ["code", "*", "path", "options", "backend", "translate_cucomplex",
                         "enable_cooperative_groups", "name_expressions", "jitify"],
        cupy.RawModule.get_function: ["name"],
        driver.funcSetAttribute: ["f", "attribute", "value"],
        driver.occupancyMaxActiveBlocksPerMultiprocessor: ["func", "blockSize", "dynamicSMemSize"],
        runtime.deviceGetAttribute: ["attrib", "device"],
        runtime.getDeviceProperties: ["device"],
        runtime.getDeviceCount: [],
        cupy.cuda.device.get_cublas_handle: [],
    }
    for function, parameters in expected.items():
        assert _doc_parameters(function) == parameters, function.__qualname__
    assert cupy.cuda.Stream is stream.Stream and cupy.cuda.Graph is graph.Graph
    assert cupy.cuda.set_allocator is memory.set_allocator
    assert runtime.streamCaptureModeRelaxed != runtime.streamCaptureModeGlobal


# The files whose CuPy calls run on a GPU: the library's GPU path and the session
# scripts. Their dotted CuPy names are checked against the installed CuPy below, with
# the bodies of the gpu-marked tests.
_GPU_PATH_FILES = [
    REPO / "rnnkernels" / name
    for name in ("_launch.py", "_gemm.py", "_graph.py", "_persistent.py", "cuda.py", "_arrays.py", "_grad_norm.py",
                 "clip.py", "cost_model.py", "_api.py", "modules.py", "torch/_ops.py", "bench/attention.py",
                 "bench/timing.py", "bench/device_info.py")
] + [REPO / "benchmarks" / "gpu_session.py", REPO / "benchmarks" / "kernels" / "03_microbenchmarks.py"]


def _module_constant(path: Path, name: str):
    """The literal assigned to ``name`` at the top level of ``path`` (without importing it)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} assigns no {name}")


def _dotted(node) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None when the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _is_gpu_test(node) -> bool:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    return any(ast.unparse(d).startswith(("pytest.mark.gpu", "mark.gpu")) for d in node.decorator_list)


def _cupy_names_used(tree, imported: set[str]):
    """(line, dotted name, root object, attribute path) for every attribute chain of
    the GPU path that starts at CuPy: ``cupy.``, ``<x>.cupy.``, ``<x>._cupy.``,
    ``xp.`` / ``<x>.xp.`` (CuPy on a GPU), and the binding modules ``cublas``,
    ``driver``, ``runtime`` where the file imports them from CuPy."""
    import cupy
    from cupy_backends.cuda.api import driver, runtime
    from cupy_backends.cuda.libs import cublas

    bindings = {"cublas": cublas, "driver": driver, "runtime": runtime}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(getattr(node, "_parent", None), ast.Attribute):
            continue
        path = _dotted(node)
        if path is None:
            continue
        for index, part in enumerate(path[:-1]):
            if part in ("cupy", "_cupy", "xp", "cp") and (index > 0 or part in ("cupy", "xp", "cp")):
                yield node.lineno, ".".join(path), cupy, path[index + 1:]
                break
            if index == 0 and part in bindings and part in imported:
                yield node.lineno, ".".join(path), bindings[part], path[1:]
                break


def _binding_imports(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("cupy", "cupy_backends")):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def test_every_cupy_name_on_the_gpu_path_exists():
    """Every dotted CuPy name the GPU path and the gpu-marked tests use exists in the
    installed CuPy (a misspelt or missing constant, such as a cuBLAS math mode CuPy does
    not export, fails here instead of in a GPU session)."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    sources = [(path, ast.parse(path.read_text(), str(path))) for path in _GPU_PATH_FILES]
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        gpu_tests = [node for node in ast.walk(tree) if _is_gpu_test(node)]
        if gpu_tests:
            module = ast.Module(body=gpu_tests, type_ignores=[])
            sources.append((path, module))
            module._imports = _binding_imports(tree)
    missing, checked = [], 0
    for path, tree in sources:
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                child._parent = node
        imported = getattr(tree, "_imports", None) or _binding_imports(tree)
        for line, dotted, root, attributes in _cupy_names_used(tree, imported):
            target = root
            for attribute in attributes:
                if isinstance(target, types.ModuleType) or isinstance(target, type) or target is root:
                    if not hasattr(target, attribute):
                        missing.append(f"{path.relative_to(REPO)}:{line}: {dotted}")
                        break
                    target = getattr(target, attribute)
                else:
                    break  # an instance attribute (an array's .data.ptr): not CuPy's to name
            checked += 1
    assert checked > 100, f"only {checked} CuPy names found: the scan lost its way"
    assert not missing, "names the installed CuPy lacks:\n" + "\n".join(missing)


# ------------------------------------- the launch plans, held to CuPy's launch rules
class _CupyRulesRuntime:
    """A runtime that runs nothing but holds every launch of the plans in _launch,
    _persistent and _grad_norm to what CupyRuntime hands ``Function.__call__`` and the
    driver: grid and block tuples of 1 to 3 ints (CuPy's ``tuple grid``), at most 1024
    threads, C-contiguous arrays and NumPy scalars only (a Python int would go in as
    int64, whatever the kernel takes), dynamic shared memory within the device's opt-in
    limit, cooperative grids that fit the resident blocks; inside ``capture()`` only
    plain launches and no array-module call (an allocation or a copy there would be
    captured, or would break the capture). Arrays are NumPy's; nothing is computed."""

    sm_count = 4
    max_shared_bytes = 64 * 1024
    cooperative_launch = True

    def __init__(self):
        self.capturing = False
        self.launches: list[tuple[str, bool, bool]] = []  # (name, cooperative, captured)
        self.xp = _CaptureWatchingNumpy(self)

    def blocks_per_sm(self, source, name_expression, threads, shared_mem):
        return 1

    def function(self, source, name_expression):
        assert name_expression in _launch.KERNELS[source], name_expression
        kernel = name_expression

        def launch(grid, block, args, shared_mem=0, cooperative=False):
            for what, dims in (("grid", grid), ("block", block)):
                assert type(dims) is tuple and 1 <= len(dims) <= 3, f"{kernel}: {what} {dims!r} is not a tuple"
                assert all(type(d) is int and d >= 1 for d in dims), f"{kernel}: {what} {dims!r}"
            assert math.prod(block) <= 1024, f"{kernel}: block {block}"
            assert isinstance(args, tuple), f"{kernel}: args {type(args).__name__}"
            for index, arg in enumerate(args):
                if isinstance(arg, np.ndarray):
                    assert arg.flags.c_contiguous, f"{kernel}: argument {index} is not contiguous"
                else:
                    assert isinstance(arg, (np.int32, np.uint32, np.int64, np.float32)), \
                        f"{kernel}: argument {index} is {type(arg).__name__}, not an array or a NumPy scalar"
            assert type(shared_mem) is int and 0 <= shared_mem <= self.max_shared_bytes, f"{kernel}: {shared_mem}"
            assert type(cooperative) is bool
            if cooperative:
                assert math.prod(grid) <= self.sm_count * self.blocks_per_sm(source, kernel, math.prod(block),
                                                                             shared_mem)
            if self.capturing:
                assert not cooperative and shared_mem == 0, f"{kernel}: captured launches are plain ones"
            self.launches.append((kernel, cooperative, self.capturing))

        return launch

    def gemm(self, a, b, c, *, transpose_a=False, transpose_b=False, accumulate=False):
        assert not self.capturing, "no GEMM inside a capture"
        from rnnkernels import _gemm

        _gemm.check_operands(a, b, c, transpose_a, transpose_b)

    @contextmanager
    def capture(self):
        from rnnkernels import _graph

        assert not self.capturing
        captured = _graph.Captured()
        self.capturing = True
        try:
            yield captured
        finally:
            self.capturing = False
        captured.graph = types.SimpleNamespace(launch=lambda: None)

    def graph_key(self):
        return ("cupy-rules",)


class _CaptureWatchingNumpy:
    def __init__(self, rt):
        self._rt = rt

    def __getattr__(self, name):
        # Nothing is computed: zeroed workspaces keep the float16 casts of the results quiet.
        attribute = getattr(np, {"empty": "zeros", "empty_like": "zeros_like"}.get(name, name))
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            assert not self._rt.capturing, f"xp.{name} called inside a capture"
            return attribute(*args, **kwargs)

        return call


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_launch_plans_keep_to_cupys_launch_rules(monkeypatch, dtype):
    """Every variant, forward (training and inference) and backward (with and without
    step norms), and the fused norm: every launch as CupyRuntime would make it."""
    from rnnkernels import _graph, _grad_norm

    monkeypatch.setattr(_graph, "CACHE", _graph.GraphCache(_graph.CACHE_SIZE))
    rt = _CupyRulesRuntime()
    steps, batch, input_size, hidden = 3, 5, 6, 12  # H % 4 == 0: the persistent vector loads too
    rng = np.random.default_rng(0)

    def array(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x, w_ih, w_hh, bias = array(steps, batch, input_size), array(4 * hidden, input_size), array(4 * hidden, hidden), \
        array(4 * hidden).astype(np.float32)
    h0, c0, dy, dh_n, dc_n = array(batch, hidden), array(batch, hidden), array(steps, batch, hidden), \
        array(batch, hidden), array(batch, hidden)
    for variant in _launch.VARIANTS:
        for training in (False, True):
            out = _launch.forward(rt, x, w_ih, w_hh, bias, h0, c0, training, variant=variant)
        for norms in (False, True):
            _launch.backward(rt, out[3], dy, dh_n, dc_n, return_step_norms=norms, variant=variant)
    out_sum = np.zeros(1, np.float64)
    _grad_norm.sum_of_squares(rt, [w_hh, w_ih[:, :3], bias.astype(dtype)], out_sum, chunk=256)
    kinds = {(cooperative, captured) for _, cooperative, captured in rt.launches}
    # The run went through the cooperative (persistent), captured (graph) and plain paths.
    assert kinds == {(True, False), (False, True), (False, False)}
    assert any(name.startswith("rnnkernels::grad_norm_partial<") for name, _, _ in rt.launches)


# ----------------------------------------------- the microbenchmarks' GPU modules
@pytest.mark.nvrtc
def test_microbenchmark_modules_compile_with_cupys_options():
    """03_microbenchmarks.py's two GPU modules (the plain one and the cooperative one
    with grid.sync) compile with NVRTC under the options CuPy's RawModule passes on an
    sm_90 device (the CI otherwise runs that .cu only on the emulator's g++): a compile
    error would cost the GPU session its compile, ftz and microbench stages."""
    pytest.importorskip("cupy", reason="CuPy is not installed")
    from rnnkernels import nvrtc_check

    try:
        nvrtc = nvrtc_check.load_nvrtc()
    except RuntimeError as error:
        pytest.skip(f"NVRTC is not available: {error.__cause__ or error}")
    import importlib.util

    path = REPO / "benchmarks" / "kernels" / "03_microbenchmarks.py"
    spec = importlib.util.spec_from_file_location("_glue_microbenchmarks", path)
    micro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(micro)
    for extra, names in (((), micro.NAMES), ((micro.COOPERATIVE_DEFINE,), micro.COOPERATIVE_NAMES)):
        options = list(nvrtc_check.cupy_nvrtc_options(_launch.compile_options() + extra, "sm_90"))
        program = nvrtc.createProgram(micro._source_text(), "03_microbenchmarks.cu", [], [])
        try:
            for name in names:
                nvrtc.addNameExpression(program, name)
            try:
                nvrtc.compileProgram(program, options)
            except nvrtc.NVRTCError:
                pytest.fail(f"{extra or 'plain'} module: {nvrtc.getProgramLog(program)}")
            assert all(nvrtc.getLoweredName(program, name).startswith("_ZN10rnnkernels") for name in names)
        finally:
            nvrtc.destroyProgram(program)


def test_gpus_older_than_volta_are_refused_by_name():
    from rnnkernels import cuda

    class Device:
        id = 1

        def __init__(self, capability):
            self.compute_capability = capability

    cuda._check_compute_capability(Device("70"))
    cuda._check_compute_capability(Device("90"))
    with pytest.raises(RuntimeError, match=r"compute capability 7.0 \(Volta\) or newer; GPU 1 is 6.1"):
        cuda._check_compute_capability(Device("61"))
