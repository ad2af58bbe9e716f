"""Tests of the benchmark suite (rnnkernels/bench): argument parsing, FLOP formulas, the
NumPy attention layer and its hand-written backward, timing logic, validation before
timing, the JSON/CSV schema, and a smoke run of the CLI with tiny sizes."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from conftest import cupy_or_skip

from rnnkernels.bench import attention as attn
from rnnkernels.bench import cli, flops, impls, plot, runner, timing

# --- argument parsing ----------------------------------------------------------------------


def test_parser_defaults():
    args = cli.build_parser().parse_args([])
    assert (args.quick, args.full, args.device, args.mode, args.dtype) == (
        False, False, "auto", "all", "float32")
    assert args.seq_lens is None and args.json is None and args.plot is None


def test_parser_seq_lens_sorted_unique():
    args = cli.build_parser().parse_args(["--seq-lens", "256,64,64,1024", "--batch", "3"])
    assert args.seq_lens == (64, 256, 1024) and args.batch == 3


@pytest.mark.parametrize("argv", [["--quick", "--full"], ["--seq-lens", "64,x"],
                                  ["--seq-lens", "0,4"], ["--batch", "0"],
                                  ["--dtype", "int8"], ["--device", "tpu"],
                                  ["--mode", "sideways"]])
def test_parser_rejects(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cuda_without_gpu_is_a_clear_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "gpu_present", lambda: (False, "CuPy sees no GPU"))
    assert cli.main(["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "no GPU" in err


def test_threads_from_python_needs_the_environment(monkeypatch):
    for name in cli.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(cli.UsageError, match="OPENBLAS_NUM_THREADS"):
        cli.apply_threads(1, ["--threads", "1"])
    for name in cli.THREAD_VARIABLES:
        monkeypatch.setenv(name, "1")
    cli.apply_threads(1, ["--threads", "1"])  # already set: nothing to do
    cli.apply_threads(None, [])


def test_threads_from_the_shell_restart_the_command_with_the_variables(monkeypatch):
    for name in cli.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli.sys, "argv", ["rnnkernels-bench", "--quick", "--threads", "2"])
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda *args: calls.append(args))
    cli.apply_threads(2, None)
    (executable, command, env), = calls
    assert command == [executable, "-m", "rnnkernels.bench", "--quick", "--threads", "2"]
    assert all(env[name] == "2" for name in cli.THREAD_VARIABLES)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert not cli.threads_in_effect(2)
    for name in cli.THREAD_VARIABLES:
        monkeypatch.setenv(name, "2")
    assert cli.threads_in_effect(2) and cli.threads_in_effect(None)


def test_gpu_present_asks_cupy_then_torch(monkeypatch):
    from rnnkernels.bench import device_info

    def missing(what):
        def require():
            raise RuntimeError(what)
        return require

    monkeypatch.setattr(device_info, "require_gpu_cupy", missing("CuPy sees no GPU"))
    monkeypatch.setattr(device_info, "require_gpu_torch", missing("PyTorch has no CUDA"))
    assert device_info.gpu_present() == (False, "CuPy sees no GPU; PyTorch has no CUDA")
    monkeypatch.setattr(device_info, "require_gpu_torch", lambda: None)
    assert device_info.gpu_present() == (True, "PyTorch sees a GPU")


def test_auto_device_follows_gpu_presence(monkeypatch):
    monkeypatch.setattr(cli, "gpu_present", lambda: (False, "none"))
    assert cli.resolve_device("auto") == "cpu"
    monkeypatch.setattr(cli, "gpu_present", lambda: (True, "one"))
    assert cli.resolve_device("auto") == "cuda"
    assert cli.resolve_device("cpu") == "cpu"


def test_settings_from_presets_and_overrides():
    parser = cli.build_parser()
    quick = cli.make_settings(parser.parse_args(["--quick"]), "cpu")
    assert quick.seq_lens == cli.PRESETS[("cpu", "quick")].seq_lens
    assert len(quick.seq_lens) >= 3 and quick.modes == flops.MODES
    custom = cli.make_settings(parser.parse_args(
        ["--full", "--mode", "decode", "--seq-lens", "8,16", "--hidden", "32", "--repeats", "3"]),
        "cuda")
    assert custom.modes == ("decode",) and custom.seq_lens == (8, 16) and custom.hidden == 32
    assert custom.schedule.min_repeats == 3 and custom.schedule.retries == 1
    assert cli.make_settings(parser.parse_args(["--retries", "0"]), "cpu").schedule.retries == 0
    with pytest.raises(cli.UsageError, match="--retries"):
        cli.make_settings(parser.parse_args(["--retries", "-1"]), "cpu")
    assert [i.name for i in custom.impls] == list(impls.DEFAULT_IMPLS["cuda"])
    with pytest.raises(cli.UsageError, match="heads"):
        cli.make_settings(parser.parse_args(["--hidden", "30", "--heads", "4"]), "cpu")
    with pytest.raises(cli.UsageError, match="unknown implementation"):
        cli.make_settings(parser.parse_args(["--impls", "cudnn"]), "cpu")


# --- FLOP formulas ----------------------------------------------------------------------


def test_lstm_flops():
    T, B, H = 5, 3, 4
    per_step = 2 * B * 4 * H * (H + H)
    assert flops.lstm_flops("forward", T, B, H) == T * per_step == 5 * 2 * 3 * 16 * 8
    assert flops.lstm_flops("training", T, B, H) == 3 * T * per_step
    assert flops.lstm_flops("decode", 1, B, H) == flops.lstm_flops("decode", 999, B, H) == per_step
    assert flops.lstm_flops("forward", T, B, H, I=7) == 2 * T * B * 4 * H * (7 + H)


def test_attention_flops_count_causal_pairs():
    T, B, H = 6, 2, 8
    mask = np.tril(np.ones((T, T), dtype=bool))
    assert flops.causal_pairs(T) == mask.sum() == 21
    projections = 4 * 2 * T * B * H * H
    forward = projections + 2 * 2 * B * int(mask.sum()) * H
    assert flops.attention_flops("forward", T, B, H) == forward
    assert flops.attention_flops("training", T, B, H) == 3 * forward
    assert flops.attention_flops("decode", T, B, H) == 8 * B * H * H + 4 * B * (T + 1) * H


def test_sequential_steps_and_bad_arguments():
    assert [flops.sequential_steps("lstm", m, 50) for m in flops.MODES] == [50, 100, 1]
    assert [flops.sequential_steps("attention", m, 50) for m in flops.MODES] == [1, 2, 1]
    with pytest.raises(ValueError):
        flops.flops("mamba", "forward", 1, 1, 1)
    with pytest.raises(ValueError):
        flops.lstm_flops("backward", 1, 1, 1)


# --- the attention layer ------------------------------------------------------------------


def naive_attention(x, wq, wk, wv, wo, heads):
    """Loops over batch, head and query position, in float64: the layer's definition."""
    T, B, H = x.shape
    d = H // heads
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    o = np.zeros((T, B, H))
    for b in range(B):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for t in range(T):
                scores = np.array([q[t, b, cols] @ k[j, b, cols] for j in range(t + 1)])
                scores /= math.sqrt(d)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                o[t, b, cols] = sum(weights[j] * v[j, b, cols] for j in range(t + 1))
    return o @ wo.T


def random_layer(T, B, H, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, H))
    weights = [rng.uniform(-1, 1, (H, H)) / math.sqrt(H) for _ in range(4)]
    return x.astype(dtype), [w.astype(dtype) for w in weights]


@pytest.mark.parametrize("T,B,H,heads", [(1, 1, 4, 1), (5, 3, 6, 1), (7, 2, 8, 2), (4, 1, 12, 3)])
def test_attention_forward_matches_definition(T, B, H, heads):
    x, w = random_layer(T, B, H)
    y, saved = attn.attention_forward(x, *w, heads)
    np.testing.assert_allclose(y, naive_attention(x, *w, heads), rtol=1e-12, atol=1e-12)
    assert saved is not None
    assert attn.attention_forward(x, *w, heads, training=False)[1] is None


def test_attention_float32_close_to_float64():
    x, w = random_layer(64, 3, 32)
    want = attn.attention_forward(x, *w)[0]
    got = attn.attention_forward(x.astype(np.float32), *[a.astype(np.float32) for a in w])[0]
    assert got.dtype == np.float32
    assert impls.relative_error(got.astype(np.float64), want) < 1e-5


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_backward_matches_finite_differences(heads):
    T, B, H = 4, 2, 4
    x, w = random_layer(T, B, H, seed=1)
    dy = np.random.default_rng(2).standard_normal((T, B, H))
    _, saved = attn.attention_forward(x, *w, heads)
    grads = attn.attention_backward(saved, dy)
    params = [x, *w]

    def loss():
        return float(np.sum(attn.attention_forward(x, *w, heads, training=False)[0] * dy))

    eps = 1e-6
    for param, grad in zip(params, grads):
        numeric = np.zeros_like(param)
        for index in np.ndindex(param.shape):
            original = param[index]
            param[index] = original + eps
            plus = loss()
            param[index] = original - eps
            minus = loss()
            param[index] = original
            numeric[index] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.torch
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_matches_torch_sdpa_and_autograd(heads):
    torch = pytest.importorskip("torch")
    T, B, H = 33, 3, 16
    x, w = random_layer(T, B, H, seed=3)
    dy = np.random.default_rng(4).standard_normal((T, B, H))
    y, saved = attn.attention_forward(x, *w, heads)
    grads = attn.attention_backward(saved, dy)
    tx = torch.tensor(x, requires_grad=True)
    tw = [torch.tensor(a, requires_grad=True) for a in w]
    ty = attn.torch_attention_forward(tx, *tw, heads)
    tgrads = torch.autograd.grad(ty, [tx, *tw], grad_outputs=torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, tgrads):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("heads", [1, 2])
def test_decode_equals_last_position_of_full_forward(heads):
    T, B, H = 9, 2, 8
    x, w = random_layer(T + 1, B, H, seed=5)
    full = attn.attention_forward(x, *w, heads)[0]
    d = H // heads

    def cache(weight):  # keys/values of the first T tokens, [B, heads, T + 1, d]
        values = (x.reshape(-1, H) @ weight.T).reshape(T + 1, B, heads, d).transpose(1, 2, 0, 3)
        out = np.ascontiguousarray(values)
        out[:, :, -1] = 0  # the new token's slot: decode must write it
        return out

    k_cache, v_cache = cache(w[1]), cache(w[2])
    y = attn.attention_decode(x[-1], k_cache, v_cache, *w)
    np.testing.assert_allclose(y, full[-1], rtol=1e-12, atol=1e-12)
    again = attn.attention_decode(x[-1], k_cache, v_cache, *w)  # repeating is idempotent
    np.testing.assert_array_equal(y, again)


@pytest.mark.torch
def test_torch_decode_matches_numpy_decode():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    B, H, heads, T = 2, 8, 2, 5
    x_new = rng.standard_normal((B, H))
    caches = [rng.standard_normal((B, heads, T + 1, H // heads)) for _ in range(2)]
    w = [rng.standard_normal((H, H)) for _ in range(4)]
    want = attn.attention_decode(x_new, *[c.copy() for c in caches], *w)
    got = attn.torch_attention_decode(torch.tensor(x_new), *[torch.tensor(c) for c in caches],
                                      *[torch.tensor(a) for a in w])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_numpy_causal_softmax_mask_and_rows():
    scores = np.random.default_rng(7).standard_normal((2, 5, 5))
    p = attn.numpy_causal_softmax(scores.copy(), 0.5)
    np.testing.assert_allclose(p.sum(-1), 1.0)
    assert np.all(p[:, np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0)
    np.testing.assert_allclose(p[:, 0, 0], 1.0)
    rectangular = attn.numpy_causal_softmax(scores[:, 3:, :].copy(), 0.5)  # 2 queries, 5 keys
    np.testing.assert_allclose(rectangular, p[:, 3:, :])


def test_head_dim_must_divide():
    with pytest.raises(ValueError, match="heads"):
        attn.head_dim(10, 3)


def test_kernel_source_is_package_data():
    source = attn.kernel_source()
    assert source.startswith('#line 1 "rnnkernels/bench/causal_softmax.cu"')
    assert "causal_softmax_float32" in source and "causal_softmax_float16" in source


@pytest.mark.nvrtc
def test_causal_softmax_kernel_compiles_with_nvrtc():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as error:  # no CuPy or no NVRTC library
        pytest.skip(f"NVRTC unavailable: {error}")
    program = nvrtc.createProgram(attn.kernel_source(), "causal_softmax.cu", (), ())
    try:
        nvrtc.compileProgram(program, ("--gpu-architecture=compute_80", "--std=c++17"))
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(program))
    ptx = nvrtc.getPTX(program)
    assert b"causal_softmax_float32" in ptx and b"causal_softmax_float16" in ptx


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float16, 2e-3)])
@pytest.mark.parametrize("queries,keys", [(1, 1), (7, 7), (300, 300), (1, 1000), (3, 9)])
def test_cupy_causal_softmax_matches_numpy(dtype, tol, queries, keys):
    cupy = cupy_or_skip()
    scores = np.random.default_rng(8).standard_normal((2, 3, queries, keys))
    want = attn.numpy_causal_softmax(scores.copy(), 0.3)
    got = attn.cupy_causal_softmax(cupy.asarray(scores.astype(dtype)), 0.3).get()
    np.testing.assert_allclose(got.astype(np.float64), want, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", flops.MODES)
def test_cupy_attention_matches_numpy(mode):
    cupy_or_skip()
    p = impls.Problem("attention", mode, 70, 3, 32, "float32", heads=2)
    inputs = impls.make_inputs(p)
    cpu = next(i for i in impls.all_impls() if i.name == "attention-numpy").build(p, inputs)
    gpu = next(i for i in impls.all_impls() if i.name == "attention-cupy").build(p, inputs)
    errors = impls.compare(gpu.collect(gpu.run()), cpu.collect(cpu.run()))
    assert max(errors.values()) < 1e-4


# --- timing ------------------------------------------------------------------------------


def test_summarize_and_paired_ratio():
    stats = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats["median_ms"] == 3.0 and stats["repeats"] == 5
    assert stats["p10_ms"] == pytest.approx(1.4) and stats["p90_ms"] == pytest.approx(4.6)
    ratio = timing.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert ratio["median"] == 2.0
    with pytest.raises(ValueError):
        timing.paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        timing.summarize([])


class FakeTimer:
    method = "fake"

    def __init__(self, log, name):
        self.log, self.name = log, name

    def time_ms(self, fn):
        fn()
        self.log.append(self.name)
        return float(len(self.log))


def test_measure_interleaved_rotates_and_respects_schedule():
    log: list[str] = []
    calls = {name: (lambda: None) for name in "abc"}
    timers = {name: FakeTimer(log, name) for name in "abc"}
    ticks = iter(range(1000))
    samples = timing.measure_interleaved(calls, timers, timing.Schedule(1, 4, 10, 1e9),
                                         clock=lambda: next(ticks) * 0.0)
    assert {len(v) for v in samples.values()} == {10}  # budget never runs out: max repeats
    assert log[:3] == ["a", "b", "c"]  # warm-up
    assert log[3:12] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotating order
    log.clear()
    clock = iter(range(1000))
    samples = timing.measure_interleaved(calls, timers, timing.Schedule(0, 4, 10, 0.5),
                                         clock=lambda: float(next(clock)))
    assert {len(v) for v in samples.values()} == {4}  # budget spent: stop at min repeats
    with pytest.raises(ValueError):
        timing.Schedule(0, 5, 4, 1.0)


def test_cuda_event_timer_flushes_then_brackets_the_call():
    log = []

    class Event:
        def __init__(self):
            self.id = len([e for e in log if e.startswith("new")])
            log.append(f"new{self.id}")

        def record(self):
            log.append(f"record{self.id}")

        def synchronize(self):
            log.append(f"sync{self.id}")

    timer = timing.CudaEventTimer("fake-events", Event, lambda start, end: 1.25,
                                  lambda: log.append("flush"))
    assert timer.time_ms(lambda: log.append("work")) == 1.25
    assert log == ["flush", "new0", "new1", "record0", "work", "record1", "sync1"]


def test_l2_flush_size():
    assert timing.l2_flush_bytes(50 << 20) == 100 << 20
    assert timing.l2_flush_bytes(1 << 20) == 8 << 20
    with pytest.raises(ValueError):
        timing.l2_flush_bytes(-1)


def test_tracemalloc_peak_sees_numpy_temporaries():
    def work():
        temporary = np.ones(1_000_000)  # 8 MB, freed before returning
        return float(temporary.sum())

    peak = timing.tracemalloc_peak_bytes(work)
    assert 8_000_000 <= peak < 9_000_000


# --- validation, rows, outputs -------------------------------------------------------------


def fake_host(workload_ms=1.0):
    """A HostDrift whose calibration "takes" ``workload_ms`` at once, with a clock that
    advances 1 s a reading and no /proc of this machine in it."""
    clock = iter(float(t) for t in range(10**6))
    return timing.HostDrift(lambda: workload_ms, clock=lambda: next(clock),
                            read_mhz=lambda: 2600.0, read_steal=lambda: 0.0)


def tiny_settings(impl_list, modes=("forward",), seq_lens=(4, 8), dtype="float32"):
    return runner.Settings(device="cpu", modes=modes, seq_lens=seq_lens, batch=2, hidden=8,
                           dtype=dtype, heads=1, schedule=timing.Schedule(0, 2, 2, 0.0),
                           impls=impl_list, host=fake_host())


def numpy_attention_impl(name="attention-numpy", wrong=False):
    base = next(i for i in impls.all_impls() if i.name == "attention-numpy")

    def build(p, inputs):
        prepared = base.build(p, inputs)
        if not wrong:
            return prepared
        return impls.Prepared(lambda: prepared.run() * 1.01, prepared.collect)

    return impls.Impl(name, "attention", "cpu", base.dtypes, build, "cpu", "tracemalloc")


def test_wrong_result_is_an_error_row_and_not_timed():
    rows = runner.run_suite(tiny_settings([numpy_attention_impl(wrong=True)]))
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "error" and row["median_ms"] is None
        assert "wrong result" in row["note"] and row["max_rel_err"] > 1e-3


def test_unsupported_dtype_is_a_skipped_row():
    rows = runner.run_suite(tiny_settings([numpy_attention_impl()], dtype="bfloat16"))
    assert all(row["status"] == "skipped" and "bfloat16" in row["note"] for row in rows)


def test_exceptions_become_error_rows():
    def build(p, inputs):
        raise RuntimeError("kernel exploded")

    broken = impls.Impl("broken", "attention", "cpu", ("float32",), build, "cpu", None)
    rows = runner.run_suite(tiny_settings([broken, numpy_attention_impl()]))
    assert [r["status"] for r in rows if r["impl"] == "broken"] == ["error", "error"]
    assert all("kernel exploded" in r["note"] for r in rows if r["impl"] == "broken")
    assert all(r["status"] == "ok" for r in rows if r["impl"] == "attention-numpy")


def test_ok_rows_carry_every_field():
    rows = runner.run_suite(tiny_settings([numpy_attention_impl()], modes=flops.MODES))
    assert len(rows) == 6
    for row in rows:
        assert tuple(row) == runner.ROW_FIELDS
        assert row["status"] == "ok" and row["repeats"] == 2
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["flops"] == flops.attention_flops(row["mode"], row["T"], 2, 8)
        assert row["tflops"] == pytest.approx(row["flops"] / row["median_ms"] / 1e9)
        assert row["peak_mem_method"] == "tracemalloc" and row["peak_mem_bytes"] > 0
        assert row["validated_against"]


def test_json_and_csv_writers(tmp_path):
    rows = runner.run_suite(tiny_settings([numpy_attention_impl()]))
    cli.write_csv(tmp_path / "r.csv", rows)
    with open(tmp_path / "r.csv", newline="") as file:
        read = list(csv.DictReader(file))
    assert len(read) == len(rows) and tuple(read[0]) == runner.ROW_FIELDS
    assert float(read[0]["median_ms"]) == pytest.approx(rows[0]["median_ms"])
    cli.write_json(tmp_path / "r.json", {"device": {}, "config": {}, "results": rows})
    assert json.loads((tmp_path / "r.json").read_text())["results"] == rows


def test_crossovers():
    assert plot.crossovers([1, 4], [1.0, 4.0], [2.0, 2.0]) == [pytest.approx(2.0)]
    assert plot.crossovers([1, 2, 4], [1.0, 1.0, 1.0], [2.0, 3.0, 4.0]) == []
    assert plot.crossovers([1, 2, 4], [1.0, 3.0, 1.0], [2.0, 2.0, 2.0]) == [
        pytest.approx(2 ** (math.log(2) / math.log(3))), pytest.approx(2 * 2 ** (math.log(1.5) / math.log(3)))]


# --- the command, end to end ---------------------------------------------------------------

REQUIRED = ("model", "impl", "mode", "T", "B", "H", "dtype", "median_ms", "p10_ms", "p90_ms",
            "flops", "tflops", "sequential_steps", "peak_mem_bytes")


@pytest.mark.torch
@pytest.mark.slow
def test_cli_smoke_run(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    paths = {ext: tmp_path / f"r.{ext}" for ext in ("json", "csv", "png")}
    status = cli.main(["--quick", "--device", "cpu", "--seq-lens", "8,16", "--batch", "2",
                       "--hidden", "16", "--repeats", "2", "--retries", "0",
                       "--json", str(paths["json"]),
                       "--csv", str(paths["csv"]), "--plot", str(paths["png"])])
    out = capsys.readouterr().out
    assert status == 0, out
    data = json.loads(paths["json"].read_text())
    assert set(data) >= {"run", "device", "config", "results"}
    assert data["run"]["command"].startswith("rnnkernels-bench --quick --device cpu")
    assert data["run"]["date"].endswith("+00:00")
    assert "commit" in data["run"]  # None outside a git checkout
    assert data["device"]["kind"] == "cpu" and data["device"]["cpu"]
    assert data["device"]["versions"]["numpy"] == np.__version__
    assert data["config"]["seq_lens"] == [8, 16] and data["config"]["batch"] == 2
    rows = data["results"]
    assert {r["impl"] for r in rows} == set(impls.DEFAULT_IMPLS["cpu"])
    for model in ("lstm", "attention"):
        for mode in flops.MODES:
            assert {r["T"] for r in rows if r["model"] == model and r["mode"] == mode
                    and r["status"] == "ok"} == {8, 16}
    assert set(data["columns"]) >= {"ratio_to_baseline", "ratio_p10", "noisy", "other_load"}
    assert "ratio of medians" in data["columns"]["ratio_to_baseline"]
    assert data["config"]["thread_policy"]
    for row in rows:
        assert set(REQUIRED) <= set(row)
        if row["impl"] == "onnxruntime" and (row["mode"] == "training" or row["status"] == "skipped"):
            # inference only; absent without the peers extra: skipped, saying why
            assert row["status"] == "skipped" and row["note"]
            continue
        assert row["status"] == "ok"
        assert row["ratio_to_baseline"] > 0 and row["baseline"] in ("torch-cpu", "attention-sdpa")
        assert row["ratio_p10"] <= row["ratio_p90"] and isinstance(row["noisy"], bool)
        assert row["spread"] == pytest.approx(row["p90_ms"] / row["p10_ms"])
    assert all(r["peak_mem_bytes"] is None for r in rows if r["impl"] == "torch-cpu")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(csv.DictReader(paths["csv"].open()))) == len(rows)
    assert "rnnkernels-cpu" in out and "attention-numpy" in out
    assert "ratio of medians" in out and "paired p10-p90" in out  # the header defines them


def test_plot_from_saved_json(tmp_path):
    pytest.importorskip("matplotlib")
    rows = runner.run_suite(tiny_settings([numpy_attention_impl()], seq_lens=(4, 8, 16)))
    path = tmp_path / "r.json"
    cli.write_json(path, {"device": {"name": "test"}, "config": {}, "results": rows})
    assert plot.main([str(path), str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_bfloat16_on_cpu_skips_numpy_code_with_a_note():
    settings = tiny_settings([i for i in impls.select_impls("cpu")
                              if i.name in ("rnnkernels-cpu", "attention-numpy")],
                             dtype="bfloat16")
    rows = runner.run_suite(settings)
    assert rows and all(r["status"] == "skipped" and "bfloat16" in r["note"] for r in rows)


# --- trust: ratio columns, noise and load checks, thread policy ---------------------------


def test_ratio_of_medians_is_the_headline_and_the_paired_range_beside_it():
    # The median of paired ratios can contradict the medians (issue 14: 7.86x where the
    # medians gave 2.07x). Here both medians are 2 ms, the paired ratios 1/3, 2 and 1.5.
    ours, base = [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]
    assert timing.paired_ratio(ours, base)["median"] == pytest.approx(1.5)
    columns = timing.ratio_columns(ours, base)
    assert columns["ratio_to_baseline"] == 1.0  # agrees with the medians beside it
    assert columns["ratio_p10"] == pytest.approx(1 / 3 + 0.2 * (1.5 - 1 / 3))
    assert columns["ratio_p90"] == pytest.approx(1.5 + 0.8 * 0.5)
    with pytest.raises(ValueError):
        timing.ratio_columns([1.0], [0.0])
    assert timing.spread([1.0, 1.0, 1.0]) == 1.0
    assert timing.spread([1.0] * 5 + [3.0] * 5) == pytest.approx(3.0)


def test_read_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    ticks = __import__("os").sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  {ticks} 0 {ticks} 999999 5 0 0 {2 * ticks} 0 0\ncpu0 1 2 3\n")
    assert timing.read_proc_stat(str(stat)) == pytest.approx(4.0)  # user + system + steal
    assert timing.read_proc_stat(str(tmp_path / "missing")) is None
    stat.write_text("intr 1 2 3\n")
    assert timing.read_proc_stat(str(stat)) is None
    assert timing.read_proc_stat() is None or timing.read_proc_stat() > 0  # this machine


def fake_probe(busy_per_call, own_per_call, cpus=2, wall_per_call=1.0, steal_per_call=0.0):
    """A LoadProbe whose readings advance by fixed amounts per snapshot."""
    state = {"busy": 0.0, "own": 0.0, "wall": 0.0, "steal": 0.0}

    def advance(key, step):
        def read():
            value = state[key]
            state[key] += step
            return value
        return read

    return timing.LoadProbe(cpus, advance("busy", busy_per_call), advance("own", own_per_call),
                            advance("wall", wall_per_call), advance("steal", steal_per_call))


def test_load_probe_counts_other_processes_not_ours():
    # 1 s of wall time on 2 cores: the machine was busy 1.6 CPU-s, 1.0 of them ours.
    probe = fake_probe(1.6, 1.0)
    before = probe.snapshot()
    assert probe.other_fraction(before, probe.snapshot()) == pytest.approx(0.3)
    quiet = fake_probe(1.0, 1.0)
    before = quiet.snapshot()
    assert quiet.other_fraction(before, quiet.snapshot()) == 0.0
    unknown = timing.LoadProbe(2, lambda: None, lambda: 0.0, iter([0.0, 1.0]).__next__)
    assert unknown.other_fraction(unknown.snapshot(), unknown.snapshot()) is None


def scripted_measure(attempts):
    """A stand-in for measure_interleaved returning the given samples, one dict a call."""
    script = iter(attempts)
    return lambda calls, timers, schedule, **options: next(script)


STEADY = [1.0, 1.0, 1.1, 1.0, 1.05]
WILD = [1.0, 1.0, 3.0, 5.0, 1.0]


def test_measure_checked_reruns_a_noisy_cell_and_keeps_the_calm_attempt():
    checked = timing.measure_checked({"a": None, "b": None}, {}, timing.Schedule(0, 5, 5, 0, retries=2),
                                     probe=fake_probe(1.0, 1.0),
                                     measure=scripted_measure([{"a": WILD, "b": STEADY},
                                                               {"a": STEADY, "b": STEADY}]))
    assert checked.attempts == 2 and not checked.noisy
    assert checked.samples["a"] == STEADY and checked.other_load == 0.0


def test_measure_checked_flags_what_stays_noisy_with_the_reason():
    wilder = [1.0, 1.0, 9.0, 9.0, 1.0]
    checked = timing.measure_checked({"a": None, "b": None}, {}, timing.Schedule(0, 5, 5, 0, retries=1),
                                     probe=fake_probe(1.0, 1.0),
                                     measure=scripted_measure([{"a": wilder, "b": STEADY},
                                                               {"a": WILD, "b": STEADY}]))
    assert checked.attempts == 2 and set(checked.noisy) == {"a"}
    assert checked.samples["a"] == WILD  # the calmer of the two attempts
    assert checked.noisy["a"].startswith("p90/p10 = ") and "> 1.5" in checked.noisy["a"]


def test_measure_checked_flags_competing_load_even_when_the_spread_looks_fine():
    # Another process held one of two cores (other = 0.5 of the machine) the whole time.
    checked = timing.measure_checked({"a": None}, {}, timing.Schedule(0, 5, 5, 0, retries=1),
                                     probe=fake_probe(2.0, 1.0),
                                     measure=scripted_measure([{"a": STEADY}, {"a": STEADY}]))
    assert checked.attempts == 2 and checked.other_load == pytest.approx(0.5)
    assert "other processes took 50% of the CPU" in checked.noisy["a"]


def test_warmup_runs_for_a_minimum_time_as_well_as_a_count():
    log: list[str] = []
    clock = iter(float(t) for t in range(1000))
    timing.measure_interleaved({"a": lambda: None}, {"a": FakeTimer(log, "a")},
                               timing.Schedule(1, 2, 20, 0.0, warmup_s=5.0),
                               clock=lambda: next(clock))
    # the clock reads 0 at the start and 1 more at every check: warm-up rounds until it
    # reads 5 (five rounds), then the two repeats
    assert len(log) == 5 + 2
    log.clear()
    clock = iter(float(t) for t in range(1000))
    timing.measure_interleaved({"a": lambda: None}, {"a": FakeTimer(log, "a")},
                               timing.Schedule(1, 2, 3, 0.0, warmup_s=50.0),
                               clock=lambda: next(clock))
    assert len(log) == 3 + 2  # warm-up capped at max_repeats rounds
    with pytest.raises(ValueError):
        timing.Schedule(0, 1, 1, 0.0, warmup_s=-1.0)


def test_rows_carry_the_checks_and_a_loaded_machine_flags_them(monkeypatch):
    settings = tiny_settings([numpy_attention_impl()], seq_lens=(4,))
    settings.probe = fake_probe(2.0, 0.5)  # others: 1.5 of 2 cores
    row, = runner.run_suite(settings)
    assert row["noisy"] is True and "other processes took 75% of the CPU" in row["noise_reason"]
    assert row["other_load"] == pytest.approx(0.75) and row["attempts"] == 1
    assert row["spread"] == pytest.approx(row["p90_ms"] / row["p10_ms"])
    settings.probe = fake_probe(1.0, 1.0)
    settings.schedule = timing.Schedule(0, 3, 3, 0.0)
    monkeypatch.setattr(timing, "measure_interleaved", scripted_measure(
        [{"attention-numpy": STEADY}]))
    row, = runner.run_suite(settings)
    assert row["noisy"] is False and row["noise_reason"] is None and row["other_load"] == 0.0
    assert set(runner.ROW_DOCS) <= set(runner.ROW_FIELDS)


def test_thread_policy():
    assert cli.thread_policy(3, 64, {})[0] == 3
    threads, why = cli.thread_policy(None, 2, {})
    assert threads == 1 and "2-core" in why
    assert cli.thread_policy(None, 4, {})[0] == 1
    assert cli.thread_policy(None, 16, {})[0] is None
    threads, why = cli.thread_policy(None, 2, {"OMP_NUM_THREADS": "2"})
    assert threads is None and "OMP_NUM_THREADS=2" in why
    restarted = {"OMP_NUM_THREADS": "1", cli.POLICY_VARIABLE: "the default on a 2-core machine"}
    assert cli.thread_policy(None, 2, restarted) == (1, "the default on a 2-core machine")


def test_default_policy_restarts_from_the_shell_and_not_from_python(monkeypatch):
    for name in cli.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cli.apply_threads(1, ["--quick"], explicit=False) is False  # Python: no restart
    monkeypatch.setattr(cli.sys, "argv", ["rnnkernels-bench", "--quick"])
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda *args: calls.append(args))
    cli.apply_threads(1, None, explicit=False, reason="why")
    (_, _, env), = calls
    assert env["OMP_NUM_THREADS"] == "1" and env[cli.POLICY_VARIABLE] == "why"


def test_help_lists_every_subcommand_and_defines_the_columns(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in ("gradient-flow", "stability"):
        assert f"\n  {name} " in text
    assert "ratio of medians" in text and "paired p10-p90" in text and "noisy" in text
    assert "rnnkernels-results" in text


def test_outputs_go_to_the_results_folder_unless_paths_are_given():
    parser = cli.build_parser()
    paths = cli.output_paths(parser.parse_args(["--quick"]), "cpu")
    assert paths["json"] == "rnnkernels-results/bench-cpu-quick.json"
    assert paths["csv"] == "rnnkernels-results/bench-cpu-quick.csv"
    explicit = cli.output_paths(parser.parse_args(["--json", "a.json", "--out-dir", "o"]), "cuda")
    assert explicit["json"] == "a.json" and explicit["csv"] == "o/bench-cuda-default.csv"
    assert cli.output_paths(parser.parse_args(["--no-save"]), "cpu") == {
        "json": None, "csv": None, "plot": None}


def test_no_crossover_from_noisy_rows():
    def rows(noisy_at=()):
        out = []
        for T, lstm_ms, attention_ms in ((32, 2.0, 1.0), (64, 4.0, 4.0 * 1.5), (128, 8.0, 20.0)):
            out.append(dict(model="lstm", impl="l", T=T, status="ok", median_ms=lstm_ms,
                            noisy=T in noisy_at))
            out.append(dict(model="attention", impl="a", T=T, status="ok",
                            median_ms=attention_ms, noisy=False))
        return out

    points, text = plot.crossover_text(rows())
    assert len(points) == 1 and 32 < points[0] < 64 and "T ≈" in text
    points, text = plot.crossover_text(rows(noisy_at=(64,)))
    assert points == [] and "not shown" in text
    points, text = plot.crossover_text(rows(noisy_at=(128,)))  # far from the crossing
    assert len(points) == 1


def test_crossover_labels_stay_inside_and_apart():
    placed = plot._label_positions([300.0, 330.0, 900.0, 1000.0], 25.0, 1280.0)
    assert [align for _, align, _, _ in placed] == ["left", "left", "right", "right"]
    heights = [(valign, height) for _, _, valign, height in placed]
    assert len(set(heights)) == 4 and all(0 < h < 1 for _, h in heights)


def test_plot_with_noisy_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = runner.run_suite(tiny_settings([numpy_attention_impl()], seq_lens=(4, 8)))
    for row, noisy in zip(rows, (True, False)):
        row.update(noisy=noisy, noise_reason="p90/p10 = 2.00 > 1.5" if noisy else None,
                   other_load=0.0)
    data = {"device": {"name": "test"}, "config": {}, "results": rows}
    plot.plot_results(data, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "1 of 2 timed rows are flagged noisy" in cli.noise_summary(rows)
    rows[0]["noisy"] = False
    assert cli.noise_summary(rows) is None


# --- the stability check ------------------------------------------------------------------


def stability_row(impl, T, median, p10=None, p90=None, noisy=False, status="ok"):
    return dict(mode="forward", model="lstm", impl=impl, T=T, status=status, median_ms=median,
                p10_ms=p10 or median * 0.9, p90_ms=p90 or median * 1.1, noisy=noisy,
                noise_reason="p90/p10 = 3.00 > 1.5" if noisy else None)


def test_stability_verdicts():
    from rnnkernels.bench import stability

    first = [stability_row("a", 32, 1.0), stability_row("b", 32, 2.0)]
    verdict = stability.compare_runs(first, [stability_row("a", 32, 1.15), stability_row("b", 32, 1.8)])
    assert verdict["stable"] and verdict["compared"] == 2 and not verdict["problems"]
    verdict = stability.compare_runs(first, [stability_row("a", 32, 1.3), stability_row("b", 32, 2.0)])
    assert not verdict["stable"] and "30% apart" in verdict["problems"][0]
    # a wide spread is fine when flagged, a miss when not
    wide = [stability_row("a", 32, 1.0, 0.5, 1.5, noisy=True), stability_row("b", 32, 2.0)]
    verdict = stability.compare_runs(wide, first)
    assert verdict["stable"] and len(verdict["flagged"]) == 1
    wide[0]["noisy"] = False
    verdict = stability.compare_runs(wide, first)
    assert not verdict["stable"] and "not flagged" in verdict["problems"][0]
    verdict = stability.compare_runs(first, first[:1])
    assert not verdict["stable"] and "only in run 1" in verdict["problems"][0]
    assert "verdict: NOT STABLE" in stability.format_verdict(verdict)
    assert not stability.compare_runs([], [])["stable"]  # nothing compared proves nothing


def test_stability_command_compares_saved_runs(tmp_path, capsys):
    paths = []
    for run, median in enumerate((1.0, 1.1)):
        path = tmp_path / f"run{run}.json"
        cli.write_json(path, {"results": [stability_row("a", 32, median)]})
        paths.append(str(path))
    assert cli.main(["stability", "--compare", *paths]) == 0
    assert "verdict: STABLE" in capsys.readouterr().out
    assert cli.main(["stability", "--compare", *paths, "--agreement", "0.05"]) == 1
    assert cli.main(["stability", "--compare", paths[0], str(tmp_path / "missing.json")]) == 2


# --- peers: ONNX Runtime on the CPU, FlashRNN on a GPU ----------------------------------------


def test_torch_gate_order_to_onnx():
    H = 3
    blocks = np.repeat(np.arange(4.0), H)[:, None] * np.ones((1, 2))  # torch block k holds k
    assert impls.torch_gates_to_onnx(blocks)[:, 0].tolist() == [0] * H + [3] * H + [1] * H + [2] * H
    bias = np.arange(8.0)  # H = 2, a 1-D bias
    assert impls.torch_gates_to_onnx(bias).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]


def lstm_reference(p, inputs):
    prepared = impls._ours_build("reference", "cpu")(p, inputs)
    return prepared.collect(prepared.run())


def onnxruntime_or_skip():
    pytest.importorskip("onnx", reason="onnx is not installed (pip install rnnkernels[peers])")
    return pytest.importorskip("onnxruntime",
                               reason="onnxruntime is not installed (pip install rnnkernels[peers])")


@pytest.mark.parametrize("mode", ["forward", "decode"])
def test_onnxruntime_lstm_matches_the_reference(mode):
    onnxruntime_or_skip()  # its CPU LSTM kernel is float32 only
    p = impls.Problem("lstm", mode, 7, 3, 5, "float32")
    inputs = impls.make_inputs(p)
    impl, = impls.select_impls("cpu", ("onnxruntime",))
    errors = impls.compare(*(lambda prepared: (prepared.collect(prepared.run()),))(
        impl.build(p, inputs)), lstm_reference(p, inputs))
    assert set(errors) == ({"y", "h_n", "c_n"} if mode == "forward" else {"h_n", "c_n"})
    assert max(errors.values()) < 1e-5, errors


def test_a_wrong_onnx_gate_order_is_caught(monkeypatch):
    onnxruntime_or_skip()
    monkeypatch.setattr(impls, "TORCH_TO_ONNX_GATES", (0, 1, 2, 3))  # torch's order, unmapped
    p = impls.Problem("lstm", "forward", 7, 3, 5, "float32")
    inputs = impls.make_inputs(p)
    impl, = impls.select_impls("cpu", ("onnxruntime",))
    prepared = impl.build(p, inputs)
    errors = impls.compare(prepared.collect(prepared.run()), lstm_reference(p, inputs))
    assert max(errors.values()) > 1e-2


def test_onnxruntime_training_is_a_skipped_row_with_the_reason():
    impl, = impls.select_impls("cpu", ("onnxruntime",))
    rows = runner.run_suite(tiny_settings([impl], modes=("training",), seq_lens=(4,)))
    assert [r["status"] for r in rows] == ["skipped"] and "inference only" in rows[0]["note"]


@pytest.mark.torch
@pytest.mark.parametrize("mode", flops.MODES)
def test_flashrnn_weight_mapping_on_its_cpu_backend(mode):
    """The same mapping the GPU peer uses, run through FlashRNN's pure-PyTorch 'vanilla'
    backend, which runs on the CPU: checks the gate order and the layout of R."""
    torch = pytest.importorskip("torch")
    flashrnn = pytest.importorskip("flashrnn", reason="flashrnn is not installed (a GPU peer: "
                                   "pip install flashrnn)")
    p = impls.Problem("lstm", mode, 6, 2, 8, "float64")
    inputs = impls.make_inputs(p)
    prepared = impls.flashrnn_lstm(torch, flashrnn.flashrnn, mode, inputs, torch.device("cpu"),
                                   torch.float64, "vanilla", "float64")
    errors = impls.compare(prepared.collect(prepared.run()), lstm_reference(p, inputs))
    assert max(errors.values()) < 1e-10, errors


def test_flashrnn_without_a_gpu_is_skipped_with_the_reason():
    p = impls.Problem("lstm", "forward", 4, 2, 8)
    with pytest.raises(impls.Unavailable) as info:
        impls._flashrnn_build(p, impls.make_inputs(p))
    assert not info.value.error and str(info.value)


def test_short_calls_are_batched_per_sample_and_reported_per_call():
    assert timing.calls_per_sample(0.04, 1.0) == 25
    assert timing.calls_per_sample(2.0, 1.0) == 1 and timing.calls_per_sample(0.04, 0.0) == 1
    assert timing.calls_per_sample(0.0, 1.0) == 1000  # capped

    class StepTimer:  # every call of the function "takes" 0.1 ms
        method = "fake"

        def time_ms(self, fn):
            before = len(log)
            fn()
            return 0.1 * (len(log) - before)

    log: list[int] = []
    batches: dict[str, int] = {}
    samples = timing.measure_interleaved({"a": lambda: log.append(1)}, {"a": StepTimer()},
                                         timing.Schedule(1, 3, 3, 0.0, min_sample_s=0.001),
                                         batches=batches)
    assert batches == {"a": 10} and samples["a"] == [pytest.approx(0.1)] * 3
    # one warm-up call, then three samples of ten, each after one untimed priming call
    assert len(log) == 1 + 3 * (1 + 10)


def test_short_cpu_calls_are_primed_so_every_timed_call_is_warm():
    order: list[str] = []

    class Timer:  # "a" takes 2 ms a call, "b" 20 ms; records what ran timed
        method = "fake"

        def time_ms(self, fn):
            order.append("timed:")
            fn()
            return 2.0 if order[-1] == "a" else 20.0

    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    timing.measure_interleaved(calls, {"a": Timer(), "b": Timer()},
                               timing.Schedule(1, 2, 2, 0.0, min_sample_s=0.001))
    # warm-up, then: "a" (2 ms, under PRIME_BELOW_MS) after an untimed call of its own;
    # "b" (20 ms) as it is
    assert order[4:] == ["a", "timed:", "a", "timed:", "b", "timed:", "b", "a", "timed:", "a"]
    order.clear()  # no priming without a minimum sample time (GPU presets: L2 flushed)
    timing.measure_interleaved(calls, {"a": Timer(), "b": Timer()}, timing.Schedule(1, 1, 1, 0.0))
    assert order == ["timed:", "a", "timed:", "b", "timed:", "a", "timed:", "b"]


# --- --cell: the GRU and the Elman RNN against attention -------------------------------------


def test_recurrent_flops_scale_with_the_gate_count():
    T, B, H = 5, 3, 8
    for model, gates in (("lstm", 4), ("gru", 3), ("rnn", 1)):
        for mode in flops.MODES:
            assert flops.flops(model, mode, T, B, H) == flops.recurrent_flops(mode, T, B, H, gates=gates)
            assert flops.sequential_steps(model, mode, T) == flops.sequential_steps("lstm", mode, T)
    assert flops.flops("gru", "training", T, B, H) * 4 == flops.flops("lstm", "training", T, B, H) * 3
    assert flops.recurrent_flops("forward", T, B, H, I=7, gates=1) == 2 * T * B * H * (7 + H)
    from rnnkernels import cells

    for model, name in impls.CELLS.items():  # the bench's table agrees with the registry
        assert flops.GATES[model] == cells.get(name).gates


def test_inputs_of_each_cell_and_the_lstm_ones_unchanged():
    lstm = impls.make_inputs(impls.Problem("lstm", "training", 4, 2, 3))
    gru = impls.make_inputs(impls.Problem("gru", "training", 4, 2, 3))
    rnn = impls.make_inputs(impls.Problem("rnn", "decode", 4, 2, 3))
    assert {k: v.shape for k, v in gru.items()} == {
        "w_ih": (9, 3), "w_hh": (9, 3), "b_ih": (9,), "b_hh": (9,), "h0": (2, 3), "x": (4, 2, 3), "dy": (4, 2, 3)}
    assert {k: v.shape for k, v in rnn.items()} == {
        "w_ih": (3, 3), "w_hh": (3, 3), "b_ih": (3,), "b_hh": (3,), "h0": (2, 3), "x": (1, 2, 3)}
    assert set(lstm) == {"w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0", "x", "dy"} and lstm["w_ih"].shape == (12, 3)
    # the LSTM's draws in their old order from the old seed (the model's index in MODELS)
    rng = np.random.default_rng([0, 4, 2, 3, 1, flops.MODES.index("training"), 0])
    np.testing.assert_array_equal(lstm["w_ih"], rng.uniform(-1 / math.sqrt(3), 1 / math.sqrt(3), (12, 3)))


def test_select_impls_per_cell():
    def names(device, cell):
        return [i.name for i in impls.select_impls(device, cell=cell)]

    assert names("cpu", "lstm") == list(impls.DEFAULT_IMPLS["cpu"])
    assert names("cpu", "gru") == ["rnnkernels-cpu", "torch-cpu", "attention-numpy", "attention-sdpa"]
    assert names("cuda", "rnn") == ["rnnkernels-cuda", "cudnn", "attention-cupy", "attention-sdpa"]
    assert {i.model for i in impls.select_impls("cpu", cell="gru")} == {"gru", "attention"}
    with pytest.raises(ValueError, match="cell gru"):
        impls.select_impls("cpu", ("onnxruntime",), cell="gru")
    with pytest.raises(ValueError, match="unknown cell"):
        impls.select_impls("cpu", cell="transformer")
    assert impls.baseline_name("gru", "cpu") == "torch-cpu" and impls.baseline_name("rnn", "cuda") == "cudnn"
    parser = cli.build_parser()
    settings = cli.make_settings(parser.parse_args(["--cell", "rnn", "--impls", "reference,torch-cpu"]), "cpu")
    assert [(i.name, i.model) for i in settings.impls] == [("reference", "rnn"), ("torch-cpu", "rnn")]
    assert cli.config_dict(settings, "quick")["cell"] == "rnn"
    assert cli.config_dict(settings, "quick")["cell_name"] == "rnn_tanh"
    with pytest.raises(SystemExit):
        parser.parse_args(["--cell", "transformer"])


@pytest.mark.torch
@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_cells_validate_against_torch_before_timing(cell):
    """Our reference backend of the cell and torch.nn.GRU / nn.RNN, every mode, each
    checked against torch's float64 run of the same inputs and then timed; the rows
    carry the cell as their model, with its FLOPs."""
    pytest.importorskip("torch")
    chosen = impls.select_impls("cpu", ("reference", "torch-cpu"), cell=cell)
    rows = runner.run_suite(tiny_settings(chosen, modes=flops.MODES, seq_lens=(3,)))
    assert len(rows) == 2 * len(flops.MODES)
    for row in rows:
        assert row["status"] == "ok", row["note"]
        assert row["model"] == cell and row["validated_against"] == "torch-float64-cpu"
        assert row["max_rel_err"] < impls.TOLERANCE["float32"]
        assert row["flops"] == flops.flops(cell, row["mode"], 3, 2, 8)
        assert row["baseline"] == "torch-cpu" and row["median_ms"] > 0
    # the reference computes float64 from float32 inputs: closer to torch's float64 than torch's float32
    training = {r["impl"]: r["max_rel_err"] for r in rows if r["mode"] == "training"}
    assert training["reference"] < 1e-12 < training["torch-cpu"]


@pytest.mark.torch
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_wrong_cell_is_caught(cell):
    """validate() sees a perturbed weight gradient of every cell: the gradient names of
    the GRU and the RNN (dh0 only, no c0) are all compared."""
    pytest.importorskip("torch")
    p = impls.Problem(cell, "training", 4, 2, 5, "float64")
    inputs = impls.make_inputs(p)
    want, _ = impls.reference_outputs(p, inputs, "cpu")
    assert set(want) == {"y", *impls.final_states(cell), *impls.gradient_names(cell)}
    torch_impl, = impls.select_impls("cpu", ("torch-cpu",), cell=cell)
    prepared = torch_impl.build(p, inputs)
    assert impls.validate(prepared, want)[1] < 1e-12
    broken = impls.Prepared(prepared.run, lambda r: {**prepared.collect(r),
                                                     "dw_hh": prepared.collect(r)["dw_hh"] * 1.001})
    assert impls.validate(broken, want) == ("dw_hh", pytest.approx(1e-3, rel=0.5))


def test_plot_names_the_cell():
    rows = [{"model": model, "impl": "x", "T": T, "status": "ok", "median_ms": ms, "noisy": False}
            for model, T, ms in (("gru", 8, 1.0), ("gru", 16, 4.0), ("attention", 8, 2.0), ("attention", 16, 3.0))]
    points, text = plot.crossover_text(rows)
    assert len(points) == 1 and text.startswith("fastest GRU = fastest attention")
    assert plot.recurrent_model(rows[2:]) == "lstm"


# --- host drift: calibration, steal, and what the stability check makes of them -----------

def test_host_drift_judges_rounds_against_the_hosts_usual_speed():
    ms = timing.calibration_workload()()
    assert 0 < ms < 1000  # ten small LSTM steps: about 0.3 ms on a 2.6 GHz core
    host = fake_host()
    assert host.usual_ms() is None and host.counts(5.0) and host.drift(1.0) is None
    for value in [1.0] * 19 + [1.8]:
        host.observe(value)
    assert host.usual_ms() == pytest.approx(1.0)
    # up to 10% slower than usual counts, and faster always does; 20% slower does not
    assert host.counts(1.09) and host.counts(0.5) and not host.counts(1.2)
    assert host.judge_round(1.5) is False and len(host.samples) == 21  # observed, then judged
    assert host.drift(1.3) == pytest.approx(0.3)
    # a run the host spent mostly slow: its usual speed is still that of its calm rounds
    for value in [2.0] * 300:
        host.observe(value)
    assert host.usual_ms() == pytest.approx(1.0)
    for where, samples in (("a", [1.0, 1.2, 1.0]), ("b", [1.1]), ("c", [1.3, 1.3])):
        host.record(samples, where, rounds=len(samples))
    assert [r["ms"] for r in host.readings] == [1.0, 1.1, 1.3] and host.reference_ms() == 1.1
    summary = host.summary()
    assert summary["median_ms"] == 1.1 and summary["usual_ms"] == pytest.approx(1.0)
    assert summary["slow_fraction"] == pytest.approx(302 / 321, abs=1e-3)
    assert summary["fastest_ms"] == 1.0 and summary["slowest_ms"] == 1.3
    assert host.spent_s == pytest.approx(2 * 6.9e-3)  # every calibration runs twice (primed)
    assert summary["readings"][1]["at_s"] == 1.0 and summary["readings"][0]["cpu_mhz"] == 2600.0
    assert summary["readings"][0]["samples"] == 3 and summary["readings"][0]["rounds"] == 3
    with pytest.raises(ValueError):
        host.record([])
    settled = timing.HostDrift(lambda: 0.5)
    settled.settle(10)
    assert settled.samples == [0.5] * 10 and settled.usual_ms() == 0.5
    assert timing.drift_reason(3, 20) == ("host drift: the host ran over 10% slower than its "
                                          "usual speed in 3 of 20 rounds")


def test_calibration_brackets_every_sample_and_rounds_the_host_slowed_are_timed_again():
    log: list[str] = []
    readings = iter([1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0])

    def calibration():
        log.append("cal")
        return next(readings)

    calibrations: list[float] = []
    timing.measure_interleaved({"a": lambda: None, "b": lambda: None},
                               {"a": FakeTimer(log, "a"), "b": FakeTimer(log, "b")},
                               timing.Schedule(1, 2, 2, 0.0), calibration=calibration,
                               calibration_samples=calibrations)
    # one warm-up round without it; then a reading (primed: run twice, the second kept)
    # before the first round and after every sample, the implementations rotating
    assert log == ["a", "b", "cal", "cal", "a", "cal", "cal", "b", "cal", "cal",
                   "b", "cal", "cal", "a", "cal", "cal"]
    # each round is as slow as the slowest reading around its samples: the slow reading
    # (3.0, after round 1's last sample) is also the one before round 2's first
    assert calibrations == [3.0, 3.0]
    # rounds that do not count are timed again, until min_repeats count; a round counts
    # when it and the round before it ran at the usual speed
    verdicts = iter([False, True, True, False, True, True])
    calibrations.clear()
    samples = timing.measure_interleaved({"a": lambda: None}, {"a": FakeTimer([], "a")},
                                         timing.Schedule(0, 2, 10, 0.0), clock=lambda: 0.0,
                                         calibration=lambda: 1.0,
                                         calibration_samples=calibrations,
                                         counts=lambda ms: next(verdicts))
    assert len(samples["a"]) == 6 and calibrations == [1.0] * 6
    # ... for at most HOST_WAIT times the budget, then the cell is left short
    clock = iter(range(1000))
    samples = timing.measure_interleaved({"a": lambda: None}, {"a": FakeTimer([], "a")},
                                         timing.Schedule(0, 2, 10, 1.0),
                                         clock=lambda: float(next(clock)),
                                         calibration=lambda: 1.0, counts=lambda ms: False)
    # the clock reads 2 when the rounds start and 1 more at every check from the third
    # round on: it stops when more than 4 s (HOST_WAIT x 1 s) have passed
    assert timing.HOST_WAIT == 4 and len(samples["a"]) == 6


def test_read_steal_and_cpu_clock(tmp_path):
    stat = tmp_path / "stat"
    ticks = __import__("os").sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  {ticks} 0 {ticks} 999999 5 0 0 {3 * ticks} 0 0\n")
    assert timing.read_proc_steal(str(stat)) == pytest.approx(3.0)
    assert timing.read_proc_steal(str(tmp_path / "missing")) is None
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2000.0\nprocessor\t: 1\ncpu MHz\t\t: 3000.0\n")
    assert timing.read_cpu_mhz(str(info)) == pytest.approx(2500.0)
    info.write_text("processor\t: 0\n")
    assert timing.read_cpu_mhz(str(info)) is None
    assert timing.read_cpu_mhz(str(tmp_path / "missing")) is None
    # 1 s on 2 cores, 0.2 CPU-s stolen: 10% of the machine, also counted in other_load
    probe = fake_probe(1.2, 1.0, steal_per_call=0.2)
    before = probe.snapshot()
    after = probe.snapshot()
    assert probe.steal_fraction(before, after) == pytest.approx(0.1)
    assert probe.other_fraction(before, after) == pytest.approx(0.1)


def rounds_measure(attempts):
    """A stand-in for measure_interleaved: each call hands out the next attempt's
    (samples, one calibration per round), judging the calibrations as the real one does."""
    script = iter(attempts)

    def measure(calls, timers, schedule, calibration_samples=None, counts=None, **options):
        samples, calibrations = next(script)
        for ms in calibrations:
            calibration_samples.append(ms)
            if counts:
                counts(ms)
        return samples
    return measure


def usual_host(usual_ms=1.0):
    """A fake host whose run so far ran at ``usual_ms``."""
    host = fake_host()
    for _ in range(50):
        host.observe(usual_ms)
    return host


def time_cell(cell, attempt, probe=None):
    cell.time({"a": None}, {}, timing.Schedule(0, 4, 4, 0.0), probe or fake_probe(1.0, 1.0),
              f"cell attempt {len(cell.attempts) + 1}", measure=rounds_measure([attempt]))


def test_a_cell_keeps_the_rounds_that_ran_at_the_hosts_usual_speed():
    host = usual_host()
    cell = timing.CellTiming(4, host)
    # seven rounds; the host slow (1.5x) in the third and fourth, and the samples with
    # it; the fifth's readings look usual, but it follows a slow round (and was slowed)
    time_cell(cell, ({"a": [1.0, 1.05, 2.0, 2.1, 1.5, 1.0, 1.02]},
                     [1.0, 1.0, 1.5, 1.5, 1.0, 1.02, 1.0]))
    checked = cell.checked()
    assert not cell.short() and not cell.noisy() and not checked.noisy
    assert checked.samples["a"] == [1.0, 1.05, 1.0, 1.02] and checked.dropped == 3
    assert checked.calibration_ms == pytest.approx(1.0) and checked.drift == pytest.approx(0.0)
    assert host.readings[-1]["where"] == "cell attempt 1" and host.readings[-1]["rounds"] == 7


def test_a_cell_the_host_left_short_is_flagged_until_timed_again_at_its_usual_speed():
    host = usual_host()
    cell = timing.CellTiming(4, host)
    time_cell(cell, ({"a": [2.0] * 6}, [1.6] * 6))
    assert cell.short()
    checked = cell.checked()
    # fewer than half the minimum repeats kept: the row's figures from all its rounds,
    # as measured, flagged
    assert cell.enough == 2
    assert checked.samples["a"] == [2.0] * 6 and checked.drift == pytest.approx(0.6)
    assert checked.noisy["a"] == ("host drift: the host ran over 10% slower than its usual "
                                  "speed in 6 of 6 rounds")
    time_cell(cell, ({"a": [1.0] * 3}, [1.0] * 3))  # later, the host back to its usual speed
    checked = cell.checked()
    # three of four kept: short (timed again while retries are left), but enough to trust
    assert cell.short() and not checked.noisy and checked.attempts == 2
    assert checked.samples["a"] == [1.0] * 3 and checked.dropped == 6


def test_a_flagged_cell_keeps_its_figures_from_the_few_rounds_at_the_usual_speed():
    cell = timing.CellTiming(8, usual_host())  # enough: 4
    time_cell(cell, ({"a": [1.0, 1.01, 1.02, 2.0, 2.0, 2.0, 2.0]},
                     [1.0, 1.0, 1.0, 1.5, 1.5, 1.5, 1.5]))
    checked = cell.checked()
    assert checked.samples["a"] == [1.0, 1.01, 1.02] and checked.dropped == 4
    assert checked.noisy["a"] == ("host drift: the host ran over 10% slower than its usual "
                                  "speed in 4 of 7 rounds")


def test_rounds_under_competing_load_do_not_count_and_a_spread_cell_is_noisy():
    cell = timing.CellTiming(4)  # no host: load alone
    # another process held one of two cores (0.5 of the machine) the whole attempt
    time_cell(cell, ({"a": STEADY}, []), fake_probe(2.0, 1.0))
    assert cell.short() and cell.checked().noisy["a"] == "other processes took 50% of the CPU"
    time_cell(cell, ({"a": STEADY}, []))
    checked = cell.checked()
    assert not checked.noisy and checked.samples["a"] == STEADY
    assert checked.other_load == pytest.approx(0.25)  # over both attempts' time
    cell = timing.CellTiming(4)
    time_cell(cell, ({"a": WILD}, []))
    assert not cell.short() and cell.noisy()
    assert cell.checked().noisy["a"].startswith("p90/p10 = ")


def test_rows_carry_the_calibration_and_a_cell_the_host_slowed_is_timed_again_at_the_end(
        monkeypatch):
    # three cells; the host 1.5x slower while the second is timed
    settings = tiny_settings([numpy_attention_impl()], seq_lens=(4, 8, 16))
    settings.probe = fake_probe(1.0, 1.0)
    settings.schedule = timing.Schedule(0, 3, 3, 0.0, retries=1)
    first = [({"attention-numpy": STEADY}, [1.0] * 5), ({"attention-numpy": [2.0] * 5}, [1.5] * 5),
             ({"attention-numpy": STEADY}, [1.0] * 5)]
    monkeypatch.setattr(timing, "measure_interleaved", rounds_measure(
        first + [({"attention-numpy": [1.0] * 5}, [1.05] * 5)]))
    rows = runner.run_suite(settings)
    assert [r["where"] for r in settings.host.readings] == [
        "forward attention T=4 attempt 1", "forward attention T=8 attempt 1",
        "forward attention T=16 attempt 1", "forward attention T=8 attempt 2"]
    assert [row["attempts"] for row in rows] == [1, 2, 1]
    assert [row["noisy"] for row in rows] == [False] * 3
    assert rows[1]["median_ms"] == 1.0 and rows[1]["dropped_rounds"] == 5
    assert rows[1]["calibration_ms"] == 1.05 and rows[1]["host_drift"] == pytest.approx(0.05)
    # with no retry left it is flagged, its figures as measured (never divided by the
    # calibration)
    settings.host = fake_host()
    settings.schedule = timing.Schedule(0, 3, 3, 0.0)
    monkeypatch.setattr(timing, "measure_interleaved", rounds_measure(first))
    rows = runner.run_suite(settings)
    assert [row["noisy"] for row in rows] == [False, True, False]
    assert rows[1]["noise_reason"] == ("host drift: the host ran over 10% slower than its "
                                       "usual speed in 5 of 5 rounds")
    assert rows[1]["median_ms"] == 2.0 and rows[0]["steal"] == 0.0


def test_garbage_collection_is_off_while_a_cell_is_timed():
    import gc

    seen = []
    timing.measure_interleaved({"a": lambda: seen.append(gc.isenabled())},
                               {"a": timing.CpuTimer()}, timing.Schedule(1, 2, 2, 0.0))
    assert seen == [False] * 3 and gc.isenabled()


def test_calls_per_sample_come_from_the_median_warmup_not_the_last_call():
    class ScriptedTimer:  # warm-up: 0.1 ms, 0.1 ms, then one interrupted call of 5 ms
        method = "fake"

        def __init__(self):
            self.times = iter([0.1, 0.1, 5.0] + [1.0] * 10)

        def time_ms(self, fn):
            return next(self.times)

    batches: dict[str, int] = {}
    timing.measure_interleaved({"a": lambda: None}, {"a": ScriptedTimer()},
                               timing.Schedule(3, 2, 2, 0.0, min_sample_s=0.001), batches=batches)
    assert batches == {"a": 10}  # from the median, 0.1 ms; the last call alone says 1


def drifted_row(impl, median, calibration, other_load=0.0, steal=0.0):
    return {**stability_row(impl, 32, median), "calibration_ms": calibration,
            "other_load": other_load, "steal": steal}


def test_stability_diagnosis_tells_the_host_from_load_and_from_us():
    from rnnkernels.bench import stability

    first = [drifted_row("host", 1.0, 1.0), drifted_row("load", 1.0, 1.0),
             drifted_row("ours", 1.0, 1.0), drifted_row("stolen", 1.0, 1.0)]
    first += [drifted_row("small", 1.0, 1.0), drifted_row("overshoot", 1.0, 1.0)]
    second = [drifted_row("host", 1.3, 1.25),  # the calibration moved as much: the machine
              drifted_row("load", 1.5, 1.05, other_load=0.5),  # another process held a core
              drifted_row("ours", 1.5, 1.01),  # the machine ran as fast: ours
              drifted_row("stolen", 1.3, 1.3, other_load=0.3, steal=0.3),  # another guest
              # within 20% at equal calibration, but the calibration moved a seventh as
              # much: that does not explain it
              drifted_row("small", 1.22, 1.03),
              # the calibration moved more than a long call did: the machine still
              drifted_row("overshoot", 1.25, 1.5)]
    verdict = stability.compare_runs(first, second)
    assert not verdict["stable"]
    assert verdict["causes"] == {"host": 3, "load": 1, "ours": 2, "unknown": 0}
    text = "\n".join(verdict["problems"])
    assert "[ours: calibration +1%: not the machine]" in text
    assert "[host: calibration +25%: the machine's speed]" in text
    assert "[load: calibration +5%; other processes took up to 50% of the CPU]" in text
    assert "[host: calibration +30%: the machine's speed]" in text  # steal is not load
    old = [stability_row("x", 32, 1.0)], [stability_row("x", 32, 2.0)]
    assert stability.compare_runs(*old)["causes"]["unknown"] == 1

    def run(median_ms, steal_per_s):
        readings = [{"where": "", "at_s": float(t), "ms": median_ms, "cpu_mhz": 2596.0,
                     "steal_s": steal_per_s * t} for t in range(3)]
        return {"config": {"calibration": {"median_ms": median_ms, "cpus": 2,
                                           "readings": readings}}, "results": first}
    lines = stability.host_report(run(1.0, 0.0), run(1.22, 0.1))
    assert "run 2's calibration was 22% slower than run 1's" in lines[-1]
    assert "steal 5.0% of the CPU" in lines[1] and "steal 0.0%" in lines[0]
    assert "agree within 2%" in stability.host_report(run(1.0, 0.0), run(1.02, 0.0))[-1]
    assert "cannot tell the host from us" in stability.host_report({"results": []}, run(1.0, 0))[0]

    def judged_run(usual_ms, slow_fraction):  # a run that judged its rounds: usual speed
        data = run(1.0, 0.0)
        data["config"].update(wall_seconds=14.0)
        data["config"]["calibration"].update(usual_ms=usual_ms, slow_fraction=slow_fraction)
        return data
    judged = stability.host_report(judged_run(0.28, 0.5), judged_run(0.31, 0.2))
    assert "usual 0.280 ms, over 10% slower than that in 50% of the rounds" in judged[0]
    assert judged[0].endswith("; 14.0 s")
    assert "run 2's usual calibration time was 11% slower than run 1's" in judged[-1]
    shown = stability.format_verdict(verdict, host_lines=lines)
    assert shown.index("verdict: NOT STABLE") < shown.index("run 2's calibration")
    assert "diagnosis of the 6 median misses: 3 moved with the calibration" in shown
    assert "2 are not explained by the host or load (ours to find)" in shown


def test_stability_runs_import_the_same_rnnkernels_as_the_check(tmp_path, monkeypatch):
    import os
    import subprocess

    import rnnkernels
    from rnnkernels.bench import stability

    seen = []

    def fake_run(command, env):
        seen.append((command, env))
        cli.write_json(command[command.index("--json") + 1], {"results": []})
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(stability.subprocess, "run", fake_run)
    paths = stability.run_twice(str(tmp_path), ["--device", "cpu"])
    assert paths == [str(tmp_path / "run1.json"), str(tmp_path / "run2.json")]
    root = os.path.dirname(os.path.dirname(rnnkernels.__file__))
    for command, env in seen:
        assert command[1:4] == ["-m", "rnnkernels.bench", "--quick"]
        assert env["PYTHONPATH"].split(os.pathsep)[0] == root
        assert "--device" in command


def test_cpu_cells_are_timed_in_passes_over_the_run(monkeypatch):
    schedule = timing.Schedule(3, 15, 60, 0.3, 0.1, 2, 0.001, passes=3)
    first, later, retry = schedule.one_pass(True), schedule.one_pass(False), schedule.retry()
    assert (first.warmup, first.warmup_s, first.min_repeats, first.max_repeats) == (3, 0.1, 5, 20)
    assert first.budget_s == pytest.approx(0.1) and first.passes == 1
    assert (later.warmup, later.warmup_s, later.min_repeats) == (1, 0.0, 5)
    assert (retry.warmup, retry.min_repeats, retry.budget_s) == (1, 5, 0.3)
    assert timing.Schedule().one_pass(True) == timing.Schedule()
    with pytest.raises(ValueError):
        timing.Schedule(passes=0)
    # two cells, three passes: every cell once a pass, in run order; the rows from the
    # rounds of all three
    settings = tiny_settings([numpy_attention_impl()], seq_lens=(4, 8))
    settings.probe = fake_probe(1.0, 1.0)
    settings.schedule = timing.Schedule(0, 3, 3, 0.0, passes=3)
    shares = []

    def measure(calls, timers, schedule, calibration_samples=None, counts=None, **options):
        shares.append(schedule.min_repeats)
        calibration_samples.append(1.0)
        return {"attention-numpy": [1.0 + 0.01 * len(shares)]}
    monkeypatch.setattr(timing, "measure_interleaved", measure)
    started = []
    rows = runner.run_suite(settings, on_cell_start=lambda *cell: started.append(cell[2]))
    assert runner.steps(settings) == 6 and started == [4, 8] * 3 and shares == [1] * 6
    assert [r["where"] for r in settings.host.readings] == [
        f"forward attention T={T} attempt {n}" for n in (1, 2, 3) for T in (4, 8)]
    assert [row["attempts"] for row in rows] == [3, 3]
    assert [row["repeats"] for row in rows] == [3, 3] and not any(row["noisy"] for row in rows)
    assert [row["median_ms"] for row in rows] == [pytest.approx(1.03), pytest.approx(1.04)]


def test_table_notes_one_line_per_note_and_a_flagged_row_says_noisy():
    # Implementations of one cell share its noise reason: one line names them all
    # (the new-user pass read 42 lines where 14 said everything), and a flagged row's
    # status says "noisy", not "ok, noisy".
    import io

    reason = "host drift: the host ran over 10% slower than its usual speed in 9 of 10 rounds"
    base = {"model": "lstm", "median_ms": 1.0, "p10_ms": 0.9, "p90_ms": 1.1, "spread": 1.2,
            "tflops": None, "peak_mem_bytes": None, "ratio_to_baseline": None, "ratio_p10": None,
            "ratio_p90": None, "status": "ok", "note": None}
    rows = [dict(base, impl=impl, mode="forward", T=512, noisy=True, noise_reason=reason)
            for impl in ("rnnkernels-cpu", "torch-cpu")]
    rows.append(dict(base, impl="torch-cpu", mode="decode", T=64, noisy=True, noise_reason="p90/p10 = 1.54 > 1.5"))
    rows.append(dict(base, impl="rnnkernels-cpu", mode="decode", T=64, noisy=False, noise_reason=None))
    assert [cli.table_cells(row)[-1] for row in rows] == ["noisy", "noisy", "noisy", "ok"]
    out = io.StringIO()
    cli.print_table(rows, "title", out=out)
    notes = [line.strip() for line in out.getvalue().splitlines() if line.startswith("  ") and "noisy:" in line]
    assert notes == [f"rnnkernels-cpu, torch-cpu (forward T=512): noisy: {reason}",
                     "torch-cpu (decode T=64): noisy: p90/p10 = 1.54 > 1.5"]
