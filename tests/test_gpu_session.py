"""benchmarks/gpu_session.py: its logic runs end to end on the CPU emulator (so the first
real use cannot break on a typo), a failing or hanging stage does not stop the others,
and the GPU-only pieces that can be exercised without a GPU are (the sanitizer stage
with a stand-in tool, the torch LSTM wrapper on the CPU, the NVRTC compile of the
microbenchmark kernels)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rnnkernels import _launch, emulator, nvrtc_check

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_session.py"
needs_emulator = pytest.mark.skipif(not emulator.compiler_available(),
                                    reason="the CPU emulator needs a C++ compiler (g++ or $CXX) on PATH")


def load_script(path: Path, name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def session():
    return load_script(SCRIPT, "gpu_session_under_test")


def run_session(out: Path, *options: str, timeout: float = 180):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(SCRIPT), "--emulated", "--out", str(out), *options],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return done, time.perf_counter() - start


def stages_of(out: Path) -> dict:
    report = json.loads((out / "session.json").read_text())
    return {s["stage"]: s for s in report["stages"]}, report


@pytest.mark.emulated
@needs_emulator
def test_emulated_session_runs_every_stage_and_writes_the_results(tmp_path):
    done, seconds = run_session(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session.json", "session.jsonl", "session.log", "session.md"]
    stages, report = stages_of(tmp_path)
    assert list(stages) == ["env", "compile", "ftz", "correctness", "sanitizer", "timing", "microbench", "banks"]
    for name, stage in stages.items():
        if name in ("sanitizer", "banks"):
            assert stage["status"] == "skipped" and "needs a GPU" in stage["reason"]
        else:
            assert stage["status"] == "ok", stage
    records = report["records"]
    # Every variant, both dtypes, checked against the reference.
    checked = {(c["variant"], c["dtype"]) for c in records["correctness"] if c["ok"]}
    assert checked == {(v, d) for v in _launch.VARIANTS for d in _launch.STORAGE_TYPES}
    # The correctness stage builds every module first, side by side, and times each check.
    built = {b["source"]: b for b in records["correctness_build"]}
    assert set(built) == set(_launch.KERNELS) | {"all"}
    assert all(b["error"] is None and b["seconds"] >= 0 for b in built.values()), built
    assert all(c["seconds"] >= 0 for c in records["correctness"])
    # So are the GRU and the Elman cells.
    cells = {(c.get("cell", "lstm"), c["variant"], c["dtype"]) for c in records["correctness"] if c["ok"]}
    assert cells >= {(cell, v, d) for cell in _launch.CELL_KERNELS for v in _launch.VARIANTS
                     for d in _launch.STORAGE_TYPES}
    # Every variant timed in every emulated config and mode, with a prediction beside it.
    timed = {(c["config"], c["mode"], c["impl"]) for c in report["comparisons"]}
    for variant in _launch.VARIANTS:
        assert ("emulated B=2 H=8", "forward", variant) in timed and ("emulated B=2 H=8", "training", variant) in timed
    assert all(c["predicted_us"] > 0 for c in report["comparisons"])
    assert any("cuDNN needs a GPU" in (c.get("skipped") or "") for c in records["cudnn"])
    ftz = records["ftz"][0]
    # The emulator flushes float32 denormals as the GPU does under CuPy's -ftz=true,
    # unless told to keep them.
    keep = os.environ.get("RNNKERNELS_EMULATOR_DENORMALS") == "keep"
    assert ftz["conversions_exact"] and ftz["denormals"] == ("ieee" if keep else "ftz"), ftz
    micro = records["microbench"][0]
    assert {"l2_latency_ns", "grid_sync_ns", "grid_sync_cg_ns", "python_launch_us", "l2_gbs", "hbm_gbs"} <= set(micro)
    assert "graph_node_skipped" in micro
    markdown = (tmp_path / "session.md").read_text()
    for heading in ("## Stages", "## Time per step", "## Correctness", "## Device parameters", "## FTZ probe"):
        assert heading in markdown
    # The issue asks for CI's dry run to stay under 40 s; allow slack for a loaded CI box.
    assert seconds < 90, f"the emulated session took {seconds:.0f} s"


@pytest.mark.emulated
@needs_emulator
def test_a_failing_or_hanging_stage_does_not_stop_the_rest(tmp_path):
    done, _ = run_session(tmp_path, "--stages", "ftz,correctness,microbench", "--inject-hang", "ftz",
                          "--limits", "ftz=3", "--inject-failure", "correctness")
    assert done.returncode == 1, done.stdout[-3000:]
    stages, report = stages_of(tmp_path)
    assert stages["ftz"]["status"] == "timeout" and "3 s" in stages["ftz"]["reason"]
    assert stages["correctness"]["status"] == "failed" and "injected failure" in stages["correctness"]["reason"]
    assert stages["microbench"]["status"] == "ok"
    assert report["records"]["microbench"]
    assert "| ftz | timeout |" in (tmp_path / "session.md").read_text()


@pytest.mark.emulated
@needs_emulator
def test_the_budget_skips_what_no_longer_fits(tmp_path):
    done, _ = run_session(tmp_path, "--stages", "ftz,microbench", "--budget", "6")
    stages, _ = stages_of(tmp_path)
    assert stages["microbench"]["status"] == "skipped" and "budget" in stages["microbench"]["reason"]
    assert done.returncode == 0


def test_stage_limits_fit_seven_minutes(session):
    """Every stage but the leftover ones (last: they run on what the others left) gets
    its whole limit within 7 minutes."""
    assert sum(stage.limit_s for stage in session.STAGES if not stage.leftover) <= 420 - 5
    assert [stage.name for stage in session.STAGES if stage.leftover] == ["banks"]
    assert session.STAGES[-1].leftover
    with pytest.raises(SystemExit, match="--limits"):
        session.main(["--emulated", "--out", "/nonexistent-never-written", "--limits", "timing"])


def _fake_sanitizer(tmp_path: Path, exit_status: int) -> Path:
    tool = tmp_path / "compute-sanitizer"
    tool.write_text(f'#!/bin/sh\necho "sanitizer $*" >> {tmp_path / "calls"}\n'
                    f'echo "========= ERROR SUMMARY: {exit_status} errors"\nexit {exit_status}\n')
    tool.chmod(0o755)
    return tool


@pytest.mark.parametrize("exit_status", [0, 1])
def test_sanitizer_stage_runs_memcheck_then_racecheck_on_the_target(session, tmp_path, monkeypatch, exit_status):
    monkeypatch.setenv("COMPUTE_SANITIZER", str(_fake_sanitizer(tmp_path, exit_status)))
    records = []
    args = argparse.Namespace(emulated=False, limit_s=20)

    def record(kind, **data):
        records.append((kind, data))

    if exit_status:
        with pytest.raises(RuntimeError, match="memcheck"):
            session.stage_sanitizer(args, record)
    else:
        session.stage_sanitizer(args, record)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[2] for c in calls] == ["memcheck", "racecheck"]
    assert all(c.endswith("gpu_session.py --sanitizer-target") and "--error-exitcode 1" in c for c in calls)
    assert [r[1]["summary"] for r in records] == [[f"========= ERROR SUMMARY: {exit_status} errors"]] * 2


def test_sanitizer_stage_skips_without_the_tool(session, monkeypatch):
    monkeypatch.delenv("COMPUTE_SANITIZER", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setattr(session.os, "access", lambda *a: False)
    with pytest.raises(session.Skip, match="compute-sanitizer not found"):
        session.stage_sanitizer(argparse.Namespace(emulated=False, limit_s=20), lambda *a, **k: None)


@pytest.mark.torch
def test_cudnn_wrapper_computes_our_lstm_on_the_cpu(session):
    """The torch.nn.LSTM the session times (on the GPU: cuDNN) gets the same weights,
    bias and state as our kernels: checked here on torch's CPU LSTM, forward and the
    training mode's gradients, against the float64 reference."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from rnnkernels import reference

    p = session.make_problem(4, 3, 5, 6, "float32", seed=0)
    lstm = session.CudnnLstm(torch, p, "float32", device="cpu")
    y = lstm("forward")[0].detach().numpy()
    want, _, _, saved = reference.forward(p["x"], p["w_ih"], p["w_hh"], p["bias"], p["h0"], p["c0"], True)
    assert session.relative_error(y, want) < 1e-5
    lstm("training")
    dx = reference.backward(saved, p["dy"], p["dh_n"], p["dc_n"])[0]
    assert session.relative_error(lstm.tensors["x"].grad.numpy(), dx) < 1e-5


@pytest.mark.torch
def test_tf32_is_switched_off(session):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    # The settings are process-wide: put back whatever was there before.
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    new_api = [(obj, "fp32_precision") for obj in (cudnn, getattr(cudnn, "rnn", None), getattr(cudnn, "conv", None),
                                                   matmul) if hasattr(obj, "fp32_precision")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in new_api] or \
        [(obj, "allow_tf32", getattr(obj, "allow_tf32")) for obj in (cudnn, matmul)]
    try:
        how, readings = session.disable_tf32(torch)
        if "ieee" in how:
            assert readings["cudnn.rnn.fp32_precision"] == "ieee", readings
            assert readings["cuda.matmul.fp32_precision"] == "ieee", readings
        else:
            assert readings["cudnn.allow_tf32"] is False and readings["cuda.matmul.allow_tf32"] is False, readings
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def test_jsonable_drops_nan_and_numpy_types(session):
    value = session._jsonable({"a": np.float32(1.5), "b": float("nan"), "c": [np.int64(3), np.bool_(True)],
                               "d": float("inf")})
    assert json.dumps(value, allow_nan=False) == '{"a": 1.5, "b": null, "c": [3, true], "d": null}'


@pytest.mark.nvrtc
def test_microbenchmark_kernels_compile_for_sm_90():
    """Both modules of 03_microbenchmarks.cu, with the options CuPy hands NVRTC at run
    time (nvrtc_check.check_options), without spills."""
    try:
        nvrtc = nvrtc_check.load_nvrtc()
        options = list(nvrtc_check.check_options("sm_90"))
    except (RuntimeError, FileNotFoundError) as error:
        pytest.skip(f"NVRTC or NVIDIA's headers are not available: {error.__cause__ or error}")
    micro = load_script(REPO / "benchmarks" / "kernels" / "03_microbenchmarks.py", "experiment_03_microbenchmarks")
    for names, extra in ((micro.NAMES, []), (micro.COOPERATIVE_NAMES, [micro.COOPERATIVE_DEFINE])):
        program = nvrtc.createProgram(micro._source_text(), "03_microbenchmarks.cu", [], [])
        try:
            for name in names:
                nvrtc.addNameExpression(program, name)
            try:
                nvrtc.compileProgram(program, [*options, *extra])
            except nvrtc.NVRTCError as error:
                raise AssertionError(nvrtc.getProgramLog(program)) from error
            usage = nvrtc_check.parse_ptxas_log(nvrtc.getProgramLog(program))
            for name in names:
                report = usage[nvrtc.getLoweredName(program, name)]
                assert report["spill_stores"] == 0 and report["stack_bytes"] == 0, (name, report)
        finally:
            nvrtc.destroyProgram(program)


def test_wrapper_passes_arguments_through(tmp_path):
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\n')
    python.chmod(0o755)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), "--out", "X", "--emulated"],
                          env={**os.environ, "PYTHON": str(python)}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "args").read_text().split() == ["benchmarks/gpu_session.py", "--out", "X", "--emulated"]


# ------------------------------------------------------------------ banks (ncu)
def _fake_ncu(tmp_path: Path, launches: int) -> Path:
    """An ncu that logs its command line and prints the CSV of ``launches`` persistent
    launches (its real output's shape: the target's lines, ==PROF== lines, then one
    quoted row per launch and metric, values with thousands separators)."""
    session = load_script(SCRIPT, "gpu_session")
    rows = ['"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
            '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"']
    for launch in range(launches):
        kernel = "lstm_forward_persistent" if launch % 2 == 0 else "lstm_backward_persistent"
        for m, metric in enumerate(session.BANK_METRICS):
            rows.append(f'"{launch}","1","python3","host","{kernel}","1","7","(256, 1, 1)","(128, 1, 1)","0","9.0",'
                        f'"Command line profiler metrics","{metric}","","{1000 * launch + m:,}"')
    body = "\n".join(["==PROF== Connected to process 1"] + [r.replace('"', '\\"') for r in rows])
    tool = tmp_path / "ncu"
    tool.write_text(f'#!/bin/sh\necho "ncu $*" >> {tmp_path / "calls"}\necho "the target prints this"\n'
                    f'printf "%s\\n" "{body}"\n')
    tool.chmod(0o755)
    return tool


class _H200Launch:
    sm_count, max_shared_bytes = 132, 232448


class _StubRuntime:
    def __init__(self, emulated):
        self.launch = _H200Launch()


def test_banks_stage_records_ncu_beside_the_predictions(session, tmp_path, monkeypatch):
    from rnnkernels import _persistent, _shared_banks

    monkeypatch.setenv("NCU", str(_fake_ncu(tmp_path, 4)))
    monkeypatch.setattr(session, "Runtime", _StubRuntime)
    records = []
    session.stage_banks(argparse.Namespace(emulated=False, limit_s=20),
                        lambda kind, **data: records.append((kind, data)))
    call = (tmp_path / "calls").read_text()
    assert "--metrics " + ",".join(session.BANK_METRICS) in call and "--kernel-name regex:_persistent" in call
    assert call.strip().endswith("gpu_session.py --banks-target")
    banks = [data for kind, data in records if kind == "banks"]
    assert [(b["config"], b["direction"]) for b in banks] == [
        (f"B={b} H={h} T={session.BANK_STEPS}", d) for b, h in session.BANK_CONFIGS for d in ("forward", "backward")]
    assert banks[3]["measured"][session.BANK_METRICS[5]] == 3005.0  # "3,005"
    plan = _persistent.plan("forward", 64, 512, 132, 232448 - _persistent.STATIC_SHARED_BYTES)
    assert banks[0]["predicted"] == _shared_banks.launch_totals(plan, 64, 512, session.BANK_STEPS)
    assert banks[0]["predicted"]["ld_conflicts"] == 0 < banks[0]["predicted_plain_layout"]["ld_conflicts"]
    out = tmp_path / "out"
    out.mkdir()
    recorder = session.Recorder(out, "banks")
    for kind, data in records:
        recorder(kind, **data)
    markdown = session.render_markdown(session.build_report(out))
    assert "| B=64 H=512 T=4 | forward | 0 | 0 | 917504 | 1 | 0 | 393216 |" in markdown, markdown


def test_banks_stage_fails_when_ncu_profiles_too_few_launches(session, tmp_path, monkeypatch):
    monkeypatch.setenv("NCU", str(_fake_ncu(tmp_path, 3)))
    monkeypatch.setattr(session, "Runtime", _StubRuntime)
    records = []
    with pytest.raises(RuntimeError, match="3 of 4"):
        session.stage_banks(argparse.Namespace(emulated=False, limit_s=20),
                            lambda kind, **data: records.append((kind, data)))
    assert [kind for kind, _ in records].count("banks_predicted") == 4


def test_banks_stage_skips_emulated_and_without_ncu(session, monkeypatch):
    with pytest.raises(session.Skip, match="needs a GPU"):
        session.stage_banks(argparse.Namespace(emulated=True, limit_s=20), lambda *a, **k: None)
    monkeypatch.delenv("NCU", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setattr(session.os, "access", lambda *a: False)
    with pytest.raises(session.Skip, match="ncu .* not found"):
        session.stage_banks(argparse.Namespace(emulated=False, limit_s=20), lambda *a, **k: None)
