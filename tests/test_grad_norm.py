"""The fused sum of squares of many arrays (csrc/grad_norm.cu, rnnkernels/_grad_norm.py)
that clip_grad_norm uses on the GPU.

* marker ``emulated``: the kernels on the CPU emulator against a float64 NumPy sum of
  squares; small sizes (every CUDA thread is a fiber on the CPU).
* marker ``gpu``: clip_grad_norm's CuPy path against NumPy; skipped without a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import cupy_or_skip, emulator_or_skip

from rnnkernels import _grad_norm, _launch, clip

# Sizes that break the tiling: empty arrays (first, inside, last), one element, one
# under, at and over the 256-thread block, and a chunk boundary (chunk=100 below) that
# falls inside arrays, between them and on an empty one.
SIZES = (0, 1, 255, 256, 0, 257, 700, 3, 0)
CHUNKS = (None, 100, 256)  # None: the default rule, here a single block


def _reference(arrays) -> float:
    """Σ x² over all arrays, in float64."""
    return float(sum(np.dot(a.ravel().astype(np.float64), a.ravel().astype(np.float64)) for a in arrays))


def _random_arrays(dtype, seed=0, sizes=SIZES, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(n)).astype(dtype) for n in sizes]


def _fused(rt, arrays, chunk=None) -> float:
    out = np.full(1, -1.0)
    _grad_norm.sum_of_squares(rt, arrays, out, chunk=chunk)
    return float(out[0])


# ------------------------------------------------------------------ the chunk rule
def test_chunk_rule():
    threads = _launch.GRAD_NORM.threads
    for total in (1, 255, 4096, 4097, 10**6, 4 * 10**6 + 1, 10**9, 2**40):
        chunk = _grad_norm.choose_chunk(total)
        assert chunk % threads == 0 and chunk >= _grad_norm.MIN_CHUNK
        assert -(-total // chunk) <= _grad_norm.MAX_BLOCKS
    assert _grad_norm.choose_chunk(1) == _grad_norm.MIN_CHUNK


def test_table_lists_every_instance_the_launcher_picks():
    table = _launch.KERNELS[_launch.GRAD_NORM_SOURCE]
    for dtype in ("float16", "float32", "float64"):
        assert table[_launch.GRAD_NORM.partial_name(dtype)] == _launch.GRAD_NORM.threads
    assert _launch.GRAD_NORM.finish_name() in table


# ---------------------------------------------------------------------- emulated
@pytest.mark.emulated
@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_float64_numpy(emulator, dtype, chunk):
    arrays = _random_arrays(dtype, seed=3)
    assert _fused(emulator, arrays, chunk) == pytest.approx(_reference(arrays), rel=1e-13)


@pytest.mark.emulated
def test_single_arrays_and_shapes(emulator):
    rng = np.random.default_rng(1)
    one = np.array([-3.0], np.float32)
    assert _fused(emulator, [one]) == 9.0
    matrix = rng.standard_normal((7, 33))  # 2-D: read flat
    assert _fused(emulator, [matrix], chunk=50) == pytest.approx(_reference([matrix]), rel=1e-13)
    assert _fused(emulator, [np.zeros(0), np.zeros((0, 4))]) == 0.0  # nothing to launch


@pytest.mark.emulated
def test_views_and_non_contiguous_arrays(emulator):
    base = np.random.default_rng(2).standard_normal((40, 30)).astype(np.float32)
    arrays = [base[3:], base[:, 1::2], base.T, base[5, 7:8], base.reshape(-1)[11:500]]
    assert _fused(emulator, arrays, chunk=300) == pytest.approx(_reference(arrays), rel=1e-13)


@pytest.mark.emulated
def test_float16_widened_exactly(emulator):
    # 300² overflows float16; 65504 is its largest value; 6e-8 and 1e-5 are subnormals.
    special = np.array([300.0, -65504.0, 6e-8, -1e-5, 0.0, -0.0, 1.0], np.float16)
    arrays = [special, *_random_arrays(np.float16, seed=4, sizes=(0, 257, 33), scale=100.0)]
    expected = _reference(arrays)
    assert _fused(emulator, arrays, chunk=100) == pytest.approx(expected, rel=1e-13)
    assert _fused(emulator, [special]) == _reference([special])  # a few exact squares: exact


@pytest.mark.emulated
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nan_and_inf_propagate(emulator, dtype):
    arrays = _random_arrays(dtype, seed=5, sizes=(10, 300, 5))
    arrays[1][200] = -np.inf
    assert _fused(emulator, arrays, chunk=64) == math.inf
    arrays[2][4] = np.nan  # NaN wins over Inf
    assert math.isnan(_fused(emulator, arrays, chunk=64))
    arrays[1][200] = 1.0
    assert math.isnan(_fused(emulator, arrays))


@pytest.mark.emulated
def test_finite_float64_squares_overflow_to_inf(emulator):
    assert _fused(emulator, [np.array([3e200, 4e200])]) == math.inf


@pytest.mark.emulated
def test_bitwise_identical_across_runs_and_schedules():
    emulator_or_skip()
    arrays = _random_arrays(np.float32, seed=6, scale=1e3)
    results = [_fused(_launch.EmulatorRuntime(seed=seed), arrays, chunk=100) for seed in (1, 1, 2, 7)]
    assert len({r.hex() for r in results}) == 1, results


@pytest.mark.emulated
def test_bad_arguments(emulator):
    with pytest.raises(TypeError, match="one dtype"):
        _fused(emulator, [np.ones(3, np.float32), np.ones(3)])
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        _fused(emulator, [np.ones(3, np.int32)])
    with pytest.raises(ValueError, match="at least one"):
        _fused(emulator, [])
    with pytest.raises(ValueError, match="chunk"):
        _fused(emulator, [np.ones(3)], chunk=0)
    with pytest.raises(ValueError, match="float64"):
        _grad_norm.sum_of_squares(emulator, [np.ones(3)], np.empty(1, np.float32))


@pytest.mark.emulated
def test_out_of_process_sanitizer_is_refused_clearly(emulator):
    from rnnkernels import emulator as emu

    if emu._asan_loaded():
        pytest.skip("AddressSanitizer is loaded in-process here, where the sanitized launch works")
    with pytest.raises(RuntimeError, match="LD_PRELOAD"):
        _fused(_launch.EmulatorRuntime(sanitize=True), [np.ones(3)])


@pytest.mark.emulated
def test_clip_path_one_part_per_dtype_and_names_only_on_error(emulator):
    """clip.py's device path (the one CuPy arrays take) on the emulator: one fused part
    per dtype; per-array norms only when a part is not finite."""
    arrays = [
        *_random_arrays(np.float32, seed=7, sizes=(5, 0, 300)),
        *_random_arrays(np.float64, seed=8, sizes=(40,)),
        *_random_arrays(np.float16, seed=9, sizes=(20,)),
    ]
    parts, norms = clip._fused_norms(emulator, arrays)
    assert norms is None and len(parts) == 3
    assert clip._combine(parts) == pytest.approx(math.sqrt(_reference(arrays)), rel=1e-12)

    arrays[2][7] = np.nan
    arrays[3][0] = np.inf
    parts, norms = clip._fused_norms(emulator, arrays)
    assert norms is parts and len(norms) == len(arrays)
    assert [i for i, n in enumerate(norms) if not math.isfinite(n)] == [2, 3]
    assert math.isnan(norms[2]) and norms[3] == math.inf
    assert norms[0] == pytest.approx(math.sqrt(_reference([arrays[0]])), rel=1e-12)
    assert norms[1] == 0.0

    huge = [np.array([3e200, 4e200]), np.array([1.0])]  # finite, but the float64 sum overflows
    parts, norms = clip._fused_norms(emulator, huge)
    assert norms == pytest.approx([5e200, 1.0], rel=1e-12)
    assert clip._combine(parts) == pytest.approx(5e200, rel=1e-12)


# --------------------------------------------------------------------------- gpu
@pytest.mark.gpu
def test_gpu_clip_grad_norm_matches_numpy():
    cupy = cupy_or_skip()
    rng = np.random.default_rng(10)
    host = {
        "w": rng.standard_normal((512, 300)).astype(np.float32),
        "empty": np.zeros(0, np.float32),
        "b": rng.standard_normal(1001),
        "h": (100 * rng.standard_normal(4099)).astype(np.float16),
        "big": rng.standard_normal(3 * 10**6).astype(np.float32),  # several blocks
    }
    device = {k: cupy.asarray(v) for k, v in host.items()}
    device["t"] = cupy.asarray(rng.standard_normal((64, 48)).astype(np.float32)).T  # non-contiguous
    host["t"] = cupy.asnumpy(device["t"])
    expected = clip.global_grad_norm(host)
    first = clip.global_grad_norm(device)
    assert first == pytest.approx(expected, rel=1e-12)
    assert clip.global_grad_norm(device) == first  # bitwise: fixed order, no atomics
    assert clip.clip_grad_norm(device, 1.0) == pytest.approx(expected, rel=1e-12)
    assert clip.global_grad_norm(device) == pytest.approx(1.0, rel=1e-3)  # float16 rounding
    device["b"][17] = cupy.nan
    device["h"][5] = cupy.inf
    with pytest.raises(FloatingPointError, match=r"grads\['b'\].*grads\['h'\]") as info:
        clip.clip_grad_norm(device, 1.0)
    assert "'w'" not in str(info.value) and "'big'" not in str(info.value)

