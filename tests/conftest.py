"""Shared helpers: random LSTM problems and the error measure every test uses."""

from __future__ import annotations

import os

import numpy as np
import pytest

PARAM_NAMES = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ over all elements, computed in float64 (0 when both are empty)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    denom = np.linalg.norm(b)
    if denom == 0.0:
        return float(np.linalg.norm(a))
    return float(np.linalg.norm(a - b) / denom)


def make_problem(steps, batch, input_size, hidden, *, dtype=np.float64, bias=True, state=True, seed=0, scale=1.0):
    """Inputs for lstm_forward as a dict, with torch.nn.LSTM's default weight scale
    U(±1/√H) times ``scale``."""
    rng = np.random.default_rng(seed)
    bound = scale / np.sqrt(hidden)

    def u(*shape):
        return rng.uniform(-bound, bound, shape).astype(dtype)

    problem = {
        "x": rng.standard_normal((steps, batch, input_size)).astype(dtype),
        "w_ih": u(4 * hidden, input_size),
        "w_hh": u(4 * hidden, hidden),
        "b_ih": u(4 * hidden) if bias else None,
        "b_hh": u(4 * hidden) if bias else None,
        "h0": rng.standard_normal((batch, hidden)).astype(dtype) * 0.5 if state else None,
        "c0": rng.standard_normal((batch, hidden)).astype(dtype) * 0.5 if state else None,
    }
    return problem


def make_cell_problem(cell, steps, batch, input_size, hidden, *, dtype=np.float64, bias=True, state=True, seed=0):
    """Inputs for ``cell``'s public forward (a name in rnnkernels.cells.CELLS) as a dict:
    the LSTM's are make_problem's; another cell's weights have its gate rows and its
    states only h0 (the same U(±1/√H) scale, which torch.nn uses for all three)."""
    from rnnkernels import cells

    problem = make_problem(steps, batch, input_size, hidden, dtype=dtype, bias=bias, state=state, seed=seed)
    if cell == "lstm":
        return problem
    rows = cells.get(cell).gates * hidden
    for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
        if problem[name] is not None:
            problem[name] = np.ascontiguousarray(problem[name][:rows])
    del problem["c0"]
    return problem


def make_upstream(steps, batch, hidden, *, dtype=np.float64, seed=1):
    """Random dy, dh_n, dc_n."""
    rng = np.random.default_rng(seed)
    return {
        "dy": rng.standard_normal((steps, batch, hidden)).astype(dtype),
        "dh_n": rng.standard_normal((batch, hidden)).astype(dtype),
        "dc_n": rng.standard_normal((batch, hidden)).astype(dtype),
    }


GRAD_OF = {"x": "dx", "w_ih": "dw_ih", "w_hh": "dw_hh", "b_ih": "db_ih", "b_hh": "db_hh", "h0": "dh0", "c0": "dc0"}


def torch_or_skip():
    return pytest.importorskip("torch", reason="torch is not installed (pip install rnnkernels[torch])")


def cupy_or_skip():
    """CuPy, when it is installed and reaches a GPU; otherwise the test skips, saying why."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy sees no GPU")
    except Exception as error:  # noqa: BLE001 - any CUDA runtime failure means no usable GPU
        from rnnkernels.cuda import nvidia_driver_present

        if not nvidia_driver_present():
            pytest.skip("no NVIDIA GPU: this machine has no NVIDIA driver")
        pytest.skip(f"no usable GPU: {error}")
    return cupy


def cuda_backend_or_skip():
    """CuPy, when ``backend="cuda"`` can run here (``rnnkernels.cuda.check_available``);
    otherwise the test skips with that check's reason. Under compute-sanitizer
    (``RNNKERNELS_UNDER_SANITIZER``) CuPy's pool is switched off: it carves arrays out of
    larger cudaMalloc blocks (sizes rounded up to 512 B), where memcheck cannot see an
    access past an array's end; plain cudaMalloc per array lets it."""
    from rnnkernels import cuda

    try:
        cuda.check_available()
    except RuntimeError as error:
        pytest.skip(f"no usable GPU: {error}")
    import cupy

    if os.environ.get("RNNKERNELS_UNDER_SANITIZER"):
        cupy.cuda.set_allocator(None)
    return cupy


def emulator_or_skip(seed=None):
    """The CPU emulator's runtime for the launch plan (rnnkernels/_launch.py) with the
    scheduling ``seed``; the test skips, saying why, where the emulator cannot run
    (no C++ compiler)."""
    from rnnkernels import _launch, emulated

    try:
        emulated.check_available()
    except RuntimeError as error:
        pytest.skip(f"the CPU emulator cannot run here: {error}")
    return _launch.EmulatorRuntime(seed=seed)


@pytest.fixture(scope="module")
def emulator():
    """:func:`emulator_or_skip` with the default seed, as a fixture."""
    return emulator_or_skip()


_SUMMARY_SECTIONS: list[tuple[str, str]] = []


def add_summary_section(title: str, text: str) -> None:
    """Show ``text`` under ``title`` in pytest's terminal summary (see
    ``pytest_terminal_summary`` for when in full)."""
    _SUMMARY_SECTIONS.append((title, text))


def pytest_addoption(parser):
    parser.addoption("--ptxas-table", action="store_true",
                     help="print the ptxas resource table (registers, spills) of every "
                     "kernel in the summary (also printed with -v)")


def brief_ptxas_summary(text: str) -> str:
    """One line for a ptxas table of nvrtc_check.format_table: how many kernels, the most
    registers, the spill bytes. Read from the right of each row (the last five columns
    are regs, smem, stack, spill stores, spill loads), so kernel names may hold spaces."""
    rows = [line.split() for line in text.splitlines()[2:] if line.strip()]
    if not rows or any(len(row) < 6 or not all(f.isdigit() for f in row[-5:]) for row in rows):
        return f"{len(rows)} lines (not a ptxas table)"
    registers = max(int(row[-5]) for row in rows)
    spills = sum(int(row[-2]) + int(row[-1]) for row in rows)
    spilled = f"{spills} bytes of spill traffic" if spills else "no spills"
    return f"{len(rows)} kernel instances, at most {registers} registers, {spilled}"


def pytest_terminal_summary(terminalreporter, config):
    """The sections (the ptxas tables) in full only when asked, with --ptxas-table or
    -v; in CI (CI=true) as one line each; otherwise not at all: a 98-line table before
    every summary buried the test results."""
    if not _SUMMARY_SECTIONS:
        return
    full = config.getoption("--ptxas-table", default=False) or config.getoption("verbose") > 0
    if full:
        for title, text in _SUMMARY_SECTIONS:
            terminalreporter.write_sep("-", title)
            terminalreporter.write_line(text)
    elif os.environ.get("CI") == "true":
        terminalreporter.write_sep("-", "ptxas resource usage (full table: --ptxas-table or -v)")
        for title, text in _SUMMARY_SECTIONS:
            terminalreporter.write_line(f"{title}: {brief_ptxas_summary(text)}")


# ------------------------------------------------------------------ GPU sessions
REQUIRE_GPU = "RNNKERNELS_REQUIRE_GPU"


def gpu_skip_as_failure(report, item) -> str | None:
    """With RNNKERNELS_REQUIRE_GPU=1 (set by tests/gpu_sanitizer.sh and
    benchmarks/gpu_session.sh, on machines that have a GPU) a ``gpu`` test that skips
    is a failure, not a pass: the reason it gives, or None when nothing changes."""
    if os.environ.get(REQUIRE_GPU) != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return None
    if item.get_closest_marker("gpu") is None:
        return None
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return f"{REQUIRE_GPU}=1, but this GPU test skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    failure = gpu_skip_as_failure(report, item)
    if failure is not None:
        report.outcome = "failed"
        report.longrepr = failure
