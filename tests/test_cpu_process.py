"""The cpu backend across processes: the same bits whatever ran before, and a Numba
on-disk cache that hits in a fresh process and does not grow with the process count.

Each case runs child interpreters on a private NUMBA_CACHE_DIR, so what this test
process (or another test) compiled cannot leak in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A child: optionally a small call (the serial loop) first, then a call large
# enough for the persistent loop and the after-loop products' team; prints the
# digests of its outputs and which dispatchers were served from the on-disk cache.
CHILD = r"""
import hashlib, json, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
import rnnkernels
from rnnkernels import _cpu_team, cpu

functions = dict(cpu.compiled_functions())
functions.update({{f"team_products_{{'parallel' if parallel else 'serial'}}": dispatcher
                  for parallel, dispatcher in _cpu_team.PRODUCTS.items()}})

def run(steps, batch, size, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps, batch, size)).astype(dtype)
    w_ih = (rng.standard_normal((4 * size, size)) / size).astype(dtype)
    w_hh = (rng.standard_normal((4 * size, size)) / size).astype(dtype)
    out = rnnkernels.lstm_forward(x, w_ih, w_hh, backend="cpu")
    dy = rng.standard_normal(out.y.shape).astype(dtype)
    g = rnnkernels.lstm_backward(out, dy=dy, return_step_norms=True)
    digest = hashlib.sha256()
    for a in (out.y, g.dx, g.dw_ih, g.dw_hh, g.dh0, g.dc0, g.dh_norms, g.dc_norms):
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()

result = {{}}
if {small_first}:
    result["small"] = run(2, 2, 8, np.float32)
start = time.perf_counter()
result["large"] = run(3, 64, 300, np.float32)
result["first_s"] = time.perf_counter() - start
start = time.perf_counter()
run(3, 64, 300, np.float32)
result["second_s"] = time.perf_counter() - start
result["cache_hits"] = {{
    name: sum(dispatcher.stats.cache_hits.values())
    for name, dispatcher in functions.items()
}}
result["compiled"] = {{
    name: len(dispatcher.signatures) for name, dispatcher in functions.items()
}}
print(json.dumps(result))
"""


def _start(cache_dir, small_first=False):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    # The bits must not depend on the thread count; pin it anyway so that the child's
    # timing is not disturbed by more threads than this machine has.
    env["NUMBA_NUM_THREADS"] = "2"
    code = CHILD.format(repo=str(REPO), small_first=small_first)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(child):
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


def _cache_files(cache_dir):
    return sorted(p.name for p in Path(cache_dir).rglob("*") if p.suffix in (".nbi", ".nbc"))


@pytest.mark.slow
def test_same_bits_in_any_process_and_a_disk_cache_that_hits(tmp_path):
    cache = tmp_path / "cache"
    # The two cold children run at once (each compiles every variant, seconds).
    children = _start(cache, small_first=True), _start(tmp_path / "other cache")
    small_first, fresh = (_result(child) for child in children)
    # Issue 11, defect 3: with the serial and parallel cells sharing one cache key, the
    # process that made a small call first computed the large call with the serial
    # cells, and its dh_norms/dc_norms bits differed from a fresh process's.
    assert small_first["large"] == fresh["large"]

    # The cache: a third process compiles nothing (every dispatcher it used was loaded
    # from disk) and leaves the cache files as they were (no per-process entries).
    files = _cache_files(cache)
    assert files, "nothing was written to the Numba cache"
    again = _result(_start(cache, small_first=True))
    used = {name: n for name, n in again["compiled"].items() if n}
    assert "forward_steps_serial" in used and "backward_steps_persistent" in used, again
    # The after-loop products' team (rnnkernels/_cpu_team.py): the BLAS's address is an
    # argument, never a constant in the code, so it is cached like the rest.
    assert "team_products_parallel" in used, again
    for name, count in used.items():
        assert again["cache_hits"][name] == count, (name, again)
    assert _cache_files(cache) == files
    assert again["large"] == small_first["large"] and again["small"] == small_first["small"]
    # Loose on purpose (the machine may be loaded): a cache hit costs a file read, a
    # miss about a second of compilation per variant.
    assert again["first_s"] - again["second_s"] < 0.3 + 2 * again["second_s"], again


# A child compiled for an AVX2-only CPU (Haswell): the 32-byte tiles without the
# 2-panel blocks, the path of every machine without AVX-512, which this machine's
# own processes (64-byte tiles where the host has AVX-512F) never take.
AVX2_CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import rnnkernels
from rnnkernels import _cpu_gemm
from conftest import make_problem, make_upstream, rel_err, GRAD_OF

errors = {{}}
for shape in ((5, 6, 9, 37), (3, 9, 20, 64)):  # row blocks of 4 plus 1-3; partial panels
    problem = make_problem(*shape, dtype=np.float32, seed=sum(shape))
    upstream = make_upstream(shape[0], shape[1], shape[3], dtype=np.float32)
    got = rnnkernels.lstm_forward(**problem, backend="cpu")
    want = rnnkernels.lstm_forward(**problem, backend="reference")
    g_got = rnnkernels.lstm_backward(got, **upstream)
    g_want = rnnkernels.lstm_backward(want, **upstream)
    errors[str(shape)] = max(
        [rel_err(getattr(got, f), getattr(want, f)) for f in ("y", "h_n", "c_n")]
        + [rel_err(getattr(g_got, f), getattr(g_want, f)) for f in GRAD_OF.values()]
    )
print(json.dumps({{"vector_bytes": _cpu_gemm.VECTOR_BYTES, "two_panel": _cpu_gemm.TWO_PANEL_BLOCKS,
                  "errors": errors}}))
"""


@pytest.mark.slow
def test_avx2_tiles_match_the_reference(tmp_path):
    # NUMBA_CPU_FEATURES="" keeps Haswell's own features (AVX2, FMA), none of the host's
    # AVX-512, so LLVM could not even use 512-bit registers if the tiles asked for them.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBA_NUM_THREADS="1",
               NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="")
    code = AVX2_CHILD.format(repo=str(REPO), tests=str(REPO / "tests"))
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                           check=False)  # the assert below shows its stderr
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["vector_bytes"] == 32 and not result["two_panel"], result
    for shape, error in result["errors"].items():
        assert error < 2e-5, (shape, result)  # tests/test_cpu.py's float32 tolerance


# A child at two threads (every pool, BLAS too): a training call of each cell, then how
# much CPU time the process burns in the 0.2 s after it, while the caller only sleeps.
SPIN_CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
import rnnkernels

rng = np.random.default_rng(0)
steps, batch, hidden = 64, 8, 128  # products well above the size OpenBLAS splits
calls = {{
    "lstm": (rnnkernels.lstm_forward, rnnkernels.lstm_backward, 4, {{}}),
    "gru": (rnnkernels.gru_forward, rnnkernels.gru_backward, 3, {{}}),
    "rnn_tanh": (rnnkernels.rnn_forward, rnnkernels.rnn_backward, 1, {{"nonlinearity": "tanh"}}),
}}
spins = {{}}
for cell, (forward, backward, gates, options) in calls.items():
    x = rng.standard_normal((steps, batch, hidden)).astype(np.float32)
    w_ih, w_hh = ((rng.standard_normal((gates * hidden, hidden)) / hidden).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((steps, batch, hidden)).astype(np.float32)
    spins[cell] = []
    for _ in range(3):
        backward(forward(x, w_ih, w_hh, **options, backend="cpu"), dy=dy)
        start = time.process_time()
        time.sleep(0.2)
        spins[cell].append(time.process_time() - start)
print(json.dumps(spins))
"""


@pytest.mark.slow
def test_no_thread_pool_spins_into_the_callers_code_after_training():
    # cpu.py's threading policy: a training call (T > 1) runs on Numba's pool only. When
    # the weight gradients were NumPy (OpenBLAS) products, its worker spun for about
    # 0.1 s after every backward (0.10-0.11 s of CPU time in this 0.2 s sleep, every
    # cell); Numba's OpenMP workers spin for a few ms (0.004-0.008 s here).
    env = dict(os.environ, **dict.fromkeys(("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"), "2"))
    child = subprocess.run([sys.executable, "-c", SPIN_CHILD.format(repo=str(REPO))], env=env, capture_output=True,
                           text=True, timeout=300, check=False)  # the assert below shows its stderr
    assert child.returncode == 0, child.stderr
    spins = json.loads(child.stdout.strip().splitlines()[-1])
    for cell, seconds in spins.items():
        assert sorted(seconds)[1] < 0.04, (cell, spins)  # the median of three


@pytest.mark.slow
def test_cpu_vs_torch_with_each_library_in_its_own_worker_process(tmp_path):
    # benchmarks/cpu_vs_torch.py --processes separate: the rows come back validated,
    # timed in the workers, through the pipe protocol (the workers' errors re-raised).
    pytest.importorskip("torch", reason="the benchmark compares against torch.nn.LSTM")
    out = tmp_path / "rows.json"
    command = [sys.executable, str(REPO / "benchmarks" / "cpu_vs_torch.py"), "--size", "5,3,8", "--mode", "training",
               "--threads", "1", "--repeats", "2", "--warmup", "1", "--budget", "0", "--processes", "separate",
               "--json", str(out)]
    child = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stdout + child.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["processes"] == "separate" and (row["T"], row["B"], row["H"], row["mode"]) == (5, 3, 8, "training")
    assert all(error["rel_error"] < 1e-3 for error in row["validation"].values()), row["validation"]
    assert len(row["samples_ms"]["rnnkernels-cpu"]) == len(row["samples_ms"]["torch-cpu"]) >= 2
    assert row["ratio"]["median"] > 0
