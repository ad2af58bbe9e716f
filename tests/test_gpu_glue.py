"""The host-side GPU glue that the CPU emulator does not run: how CuPy is asked to
build the kernel modules, which stream and device CuPy works on for torch and CuPy
inputs, the cuDNN baseline's precision, and the GPU test scripts' exit handling.

The tests without a marker run anywhere, with fakes standing in for the GPU; the
``gpu`` ones run the real paths (CuPy arrays and torch CUDA tensors through the public
API and the custom op, on the default and on a side stream) where there is a GPU.
"""

from __future__ import annotations

import os
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
