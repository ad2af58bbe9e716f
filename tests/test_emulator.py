"""The CPU emulator: small kernels give what a GPU gives, planted bugs are caught.

Kernels live in tests/emulator_kernels/*.cu. Each module compiles once per process
(and is cached on disk), so the cost of this file is mostly the first compile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rnnkernels import emulator
from rnnkernels.emulator import EmulatorError, _build

KERNELS = Path(__file__).resolve().parent / "emulator_kernels"
REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(
        not emulator.compiler_available(),
        reason="the CPU emulator needs a C++ compiler (g++ or $CXX) on PATH",
    ),
]

PRIMITIVES = [
    "block_sum<32>",
    "block_sum<128>",
    "shuffles",
    "warp_sum_double",
    "votes",
    "atomics",
    "reverse_chunks",
    "indices",
    "grid_smooth",
    "grid_normalise",
    "arrival_order",
    "scalar_kinds",
    "intrinsics",
    "tile_sums",
    "spin_lock_counter",
    "early_exit_barrier",
]
PLANTED_BUGS = [
    "tree_sum<true>",
    "tree_sum<false>",
    "stencil_unwritten",
    "stencil_unwritten_dynamic",
    "read_never_written",
    "read_never_written_template<3>",
    "write_shifted",
    "barrier_against_shuffle",
    "divergent_barriers",
    "shuffle_after_exit",
    "spin_forever",
    "grid_sync_without_cooperation",
    "calls_trap",
]


@pytest.fixture(scope="module")
def primitives():
    return emulator.load_module([KERNELS / "primitives.cu"], PRIMITIVES)


@pytest.fixture(scope="module")
def bugs():
    return emulator.load_module([KERNELS / "planted_bugs.cu"], PLANTED_BUGS)


@pytest.fixture(scope="module")
def low_precision():
    return emulator.load_module([KERNELS / "low_precision.cu"], ["convert", "arithmetic"])


# ------------------------------------------------------------------------------------
# Barriers, shared memory
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [32, 128])
def test_block_reduction_in_static_shared_memory_of_a_template(primitives, threads):
    rng = np.random.default_rng(threads)
    x = rng.standard_normal((5, 300)).astype(np.float32)
    out = np.full(5, np.nan, np.float32)
    primitives.get_function(f"block_sum<{threads}>")(5, threads, (x, out, np.int32(300)))
    np.testing.assert_allclose(out, x.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-5)
    # Both instantiations' static shared arrays are in the poisoned range.
    assert primitives.static_shared_bytes >= (32 + 128) * 4


def test_exited_threads_leave_the_barrier(primitives):
    out = np.full(64, -1, np.int32)
    primitives.get_function("early_exit_barrier")(1, 64, (out,))
    np.testing.assert_array_equal(out, np.r_[np.arange(47, -1, -1), np.full(16, -1)])


def test_dynamic_shared_memory(primitives):
    n = 77
    x = np.arange(3 * n, dtype=np.float32).reshape(3, n)
    out = np.zeros_like(x)
    primitives.get_function("reverse_chunks")(3, 32, (x, out, np.int32(n)), shared_mem=4 * n)
    np.testing.assert_array_equal(out, x[:, ::-1])


def test_multi_dimensional_grid_and_block_indices(primitives):
    grid, block = (2, 3, 2), (4, 2, 3)
    blocks, threads = int(np.prod(grid)), int(np.prod(block))
    out = np.full((blocks * threads, 12), -1, np.int32)
    primitives.get_function("indices")(grid, block, (out,))
    expected = []
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                for tz in range(block[2]):
                    for ty in range(block[1]):
                        for tx in range(block[0]):
                            expected.append([tx, ty, tz, bx, by, bz, *block, *grid])
    np.testing.assert_array_equal(out, np.array(expected, np.int32))


# ------------------------------------------------------------------------------------
# Warp shuffles and votes
# ------------------------------------------------------------------------------------
def _shuffle_reference(values, kind, argument, width):
    """CUDA's documented semantics, lane by lane."""
    out = np.empty_like(values)
    for t in range(values.size):
        base, lane = t - t % 32, t % 32
        segment = lane - lane % width
        if kind == "idx":
            source = segment + argument % width
        elif kind == "up":
            source = lane - argument if lane - segment >= argument else lane
        elif kind == "down":
            source = lane + argument if lane - segment + argument < width else lane
        else:  # xor: a later segment is out of reach and gives the lane's own value
            source = lane ^ argument
            source = lane if source >= segment + width else source
        out[t] = values[base + source]
    return out


@pytest.mark.parametrize("source, delta, width", [(3, 3, 32), (5, 2, 8), (1, 8, 8), (0, 1, 2)])
def test_each_shuffle_kind(primitives, source, delta, width):
    values = (np.arange(64, dtype=np.int32) * 7 + 3) % 101
    outs = [np.full(64, -1, np.int32) for _ in range(4)]
    primitives.get_function("shuffles")(
        1, 64, (values, *outs, np.int32(source), np.uint32(delta), np.int32(width))
    )
    for out, kind, argument in zip(
        outs, ["idx", "up", "down", "xor"], [source, delta, delta, delta]
    ):
        np.testing.assert_array_equal(
            out, _shuffle_reference(values, kind, argument, width), err_msg=kind
        )


def test_eight_byte_shuffle_reduction(primitives):
    x = np.random.default_rng(1).standard_normal(128)
    out = np.zeros(4)
    primitives.get_function("warp_sum_double")(2, 64, (x, out))
    np.testing.assert_allclose(out, x.reshape(4, 32).sum(axis=1), rtol=1e-13)


def test_votes(primitives):
    rng = np.random.default_rng(2)
    predicate = (rng.random(64) < 0.5).astype(np.int32)
    predicate[32:] = 1  # second warp: all true
    ballot, half_ballot = np.zeros(64, np.uint32), np.zeros(64, np.uint32)
    all_, any_, count = (np.full(64, -1, np.int32) for _ in range(3))
    primitives.get_function("votes")(1, 64, (predicate, ballot, all_, any_, half_ballot, count))
    for warp in range(2):
        lanes = predicate[32 * warp : 32 * warp + 32]
        bits = int(sum(int(p != 0) << lane for lane, p in enumerate(lanes)))
        sl = slice(32 * warp, 32 * warp + 32)
        assert (ballot[sl] == bits).all()
        assert (all_[sl] == int(lanes.all())).all()
        assert (any_[sl] == int(lanes.any())).all()
        assert (half_ballot[32 * warp : 32 * warp + 16] == bits & 0x0000FFFF).all()
        assert (half_ballot[32 * warp + 16 : 32 * warp + 32] == bits & 0xFFFF0000).all()
    assert all_[32:].all() and (count == predicate.sum()).all()


def test_cooperative_groups_tiles(primitives):
    x = np.random.default_rng(10).permutation(64).astype(np.int32)
    sums, ranks = np.zeros(64, np.int32), np.zeros(64, np.int32)
    ballots = np.zeros(64, np.uint32)
    primitives.get_function("tile_sums")(1, 64, (x, sums, ballots, ranks))
    tiles = x.reshape(8, 8)
    np.testing.assert_array_equal(sums, np.repeat(tiles.sum(axis=1), 8))
    np.testing.assert_array_equal(ballots, np.repeat(1 << tiles.argmax(axis=1), 8))
    np.testing.assert_array_equal(ranks, np.arange(64) // 8 * 100 + np.arange(64) % 8)


# ------------------------------------------------------------------------------------
# Atomics
# ------------------------------------------------------------------------------------
def test_atomics_under_contention_from_many_blocks(primitives):
    n, slots = 5000, 37
    values = np.random.default_rng(3).integers(-1000, 1000, n).astype(np.int32)
    counter = np.zeros(1, np.int32)
    total = np.zeros(1, np.uint64)
    float_total = np.zeros(1, np.float32)
    double_total = np.zeros(1, np.float64)
    maximum = np.full(1, np.iinfo(np.int32).min, np.int32)
    minimum = np.full(1, np.iinfo(np.int32).max, np.int32)
    owner = np.full(slots, -1, np.int32)
    won = np.full(n, -1, np.int32)
    primitives.get_function("atomics")(
        (n + 127) // 128,
        128,
        (values, np.int32(n), counter, total, float_total, double_total, maximum, minimum,
         owner, won, np.int32(slots)),
    )
    assert counter[0] == n
    assert int(total[0]) == int(values.astype(np.int64).sum()) % 2**64  # wraps like the GPU
    assert float_total[0] == 0.25 * n  # exact in float32 whatever the order
    assert double_total[0] == values.sum()
    assert maximum[0] == values.max() and minimum[0] == values.min()
    # atomicCAS: exactly one winner per slot, and it is the owner the slot records.
    assert won.sum() == slots
    assert (owner % slots == np.arange(slots)).all()
    assert (won[owner] == 1).all()


@pytest.mark.parametrize("cooperative", [False, True])
def test_spin_lock_makes_progress(primitives, cooperative):
    lock, counter = np.zeros(1, np.int32), np.zeros(1, np.int32)
    primitives.get_function("spin_lock_counter")(4, 32, (lock, counter), cooperative=cooperative)
    assert counter[0] == 128 and lock[0] == 0


# ------------------------------------------------------------------------------------
# Cooperative launches: grid sync
# ------------------------------------------------------------------------------------
def test_grid_sync_between_rounds_of_a_persistent_kernel(primitives):
    n, steps = 1000, 5
    a = np.random.default_rng(4).standard_normal(n).astype(np.float32)
    b = np.zeros_like(a)
    expected = a.copy()
    for _ in range(steps):
        left = np.concatenate([expected[:1], expected[:-1]])
        right = np.concatenate([expected[1:], expected[-1:]])
        expected = (left + expected + right) / np.float32(3)
    primitives.get_function("grid_smooth")(
        4, 64, (a, b, np.int32(n), np.int32(steps)), cooperative=True
    )
    np.testing.assert_array_equal(b if steps % 2 else a, expected)


def test_grid_sync_two_phase_normalisation(primitives):
    n, blocks, threads = 1000, 8, 128
    x = np.random.default_rng(5).random(n).astype(np.float32)
    partial, kept = np.zeros(blocks, np.float32), np.zeros(blocks, np.float32)
    out = np.zeros_like(x)
    primitives.get_function("grid_normalise")(
        blocks, threads, (x, partial, kept, out, np.int32(n)), cooperative=True
    )
    block_sums = [x[b * threads : (b + 1) * threads].astype(np.float64).sum()
                  for b in range(blocks)]
    np.testing.assert_allclose(partial, block_sums, rtol=1e-5)
    np.testing.assert_array_equal(kept, partial)  # each block's shared memory survived
    np.testing.assert_allclose(out, x / x.astype(np.float64).sum(), rtol=1e-5)


def test_grid_sync_needs_a_cooperative_launch(bugs):
    out = np.zeros(1, np.int32)
    with pytest.raises(EmulatorError, match="cooperative"):
        bugs.get_function("grid_sync_without_cooperation")(2, 32, (out,))


# ------------------------------------------------------------------------------------
# Scheduling seeds
# ------------------------------------------------------------------------------------
def test_seeds_change_the_interleaving_not_the_results(primitives, monkeypatch):
    def order(seed):
        counter, out = np.zeros(1, np.int32), np.full(64, -1, np.int32)
        primitives.get_function("arrival_order")(1, 64, (counter, out), seed=seed)
        assert sorted(out) == list(range(64))
        return tuple(out)

    orders = {order(seed) for seed in range(4)}
    assert len(orders) > 1, "different seeds should interleave threads differently"
    assert order(7) == order(7), "a seed should reproduce its interleaving"
    monkeypatch.setenv("RNNKERNELS_EMULATOR_SEED", "7")
    assert order(None) == order(7)

    x = np.random.default_rng(6).standard_normal((3, 200)).astype(np.float32)
    results = set()
    for seed in range(4):
        out = np.zeros(3, np.float32)
        primitives.get_function("block_sum<128>")(3, 128, (x, out, np.int32(200)), seed=seed)
        results.add(out.tobytes())
    assert len(results) == 1, "a correct kernel must give bit-identical results for every seed"


# ------------------------------------------------------------------------------------
# Arguments and launch configuration
# ------------------------------------------------------------------------------------
def _scalar_args(out, **change):
    args = dict(
        out=out, i32=np.int32(-5), u32=np.uint32(4000000000), i64=np.int64(-(2**40)),
        u64=np.uint64(2**50), f32=np.float32(1.5), f64=np.float64(-2.25), flag=np.bool_(True),
        maybe_null=None,
    )
    args.update(change)
    return tuple(args.values())


def test_scalars_are_passed_by_value_with_their_type(primitives):
    kernel = primitives.get_function("scalar_kinds")
    out = np.zeros(8)
    kernel(1, 1, _scalar_args(out))
    np.testing.assert_array_equal(out, [-5, 4000000000, -(2**40), 2**50, 1.5, -2.25, 1, -1])
    kernel(1, 1, _scalar_args(out, maybe_null=np.array([9.5], np.float32)))
    assert out[7] == 9.5
    # Signedness may differ (same bits), as with cuLaunchKernel.
    kernel(1, 1, _scalar_args(out, u32=np.int32(7)))
    assert out[1] == 7
    # A view passes the address of its first element.
    values = np.arange(10, dtype=np.float32)
    kernel(1, 1, _scalar_args(out, maybe_null=values[3:]))
    assert out[7] == 3.0


def test_argument_type_errors_name_the_argument(primitives):
    kernel = primitives.get_function("scalar_kinds")
    out = np.zeros(8)
    with pytest.raises(TypeError, match="argument 1 .*Python"):
        kernel(1, 1, _scalar_args(out, i32=5))
    with pytest.raises(TypeError, match="argument 2"):
        kernel(1, 1, _scalar_args(out, u32=np.int16(5)))
    with pytest.raises(TypeError, match="argument 8"):
        kernel(1, 1, _scalar_args(out, maybe_null=[1.0]))
    with pytest.raises(EmulatorError, match="argument 5 is float64, but the parameter is float32"):
        kernel(1, 1, _scalar_args(out, f32=np.float64(1.5)))
    with pytest.raises(EmulatorError, match="argument 3 is int32, but the parameter is int64"):
        kernel(1, 1, _scalar_args(out, i64=np.int32(1)))
    with pytest.raises(EmulatorError, match="argument 0 is float64, but the parameter is pointer"):
        kernel(1, 1, _scalar_args(np.float64(1.0)))


def test_argument_count_must_match(primitives):
    kernel = primitives.get_function("scalar_kinds")
    with pytest.raises(EmulatorError, match="takes 9 argument"):
        kernel(1, 1, _scalar_args(np.zeros(8))[:-1])
    assert kernel.param_count == 9


def test_bad_launch_configurations(primitives):
    kernel = primitives.get_function("indices")
    out = np.zeros(12 * 2048, np.int32)
    for grid, block in [(1, 1025), (1, (2, 2, 65)), (0, 32), ((1, 70000), 1), (1, -1)]:
        with pytest.raises(EmulatorError, match="invalid launch configuration"):
            kernel(grid, block, (out,))
    with pytest.raises(TypeError):
        kernel((1, 1, 1, 1), 1, (out,))
    with pytest.raises(EmulatorError, match="not among the name expressions"):
        primitives.get_function("no_such_kernel")


def test_name_expressions_ignore_spacing(primitives):
    assert primitives.get_function("block_sum< 32 >") is primitives.get_function("block_sum<32>")


def test_intrinsics(primitives):
    x = np.array([0.5, 2.0], np.float32)
    out = np.zeros(10, np.float32)
    primitives.get_function("intrinsics")(1, 32, (x, out))
    v, w = np.float64(0.5), np.float64(2.0)
    expected = [np.exp(v), v / w, 1 / np.sqrt(w), v, v * w + 1, 0.5 + 4, 5.0,
                np.tanh(v) + 2 + np.exp(w), 8 + 31 + 4, 32]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------
# __half and __nv_bfloat16
# ------------------------------------------------------------------------------------
def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16, to nearest with ties to even, in NumPy."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def _interesting_floats() -> np.ndarray:
    rng = np.random.default_rng(7)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 65504.0, 65519.99, 65520.0,
                1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 2.0**-14 * 0.999, 1e-10,
                3.0e38, -3.4e38, 1.00048828125, 1.0009765625 + 2.0**-12, np.finfo(np.float32).tiny,
                1 + 2.0**-8, 1 + 3 * 2.0**-9, 255.5, 256.5]
    random = np.concatenate([
        rng.standard_normal(300) * 10.0 ** rng.integers(-9, 6, 300),
        # ties of both formats: values exactly halfway between neighbours
        (np.arange(1, 200) * 2 + 1) * 2.0**-11,
        (np.arange(1, 200) * 2 + 1) * 2.0**-8,
    ])
    return np.concatenate([specials, random]).astype(np.float32)


def test_half_and_bfloat16_conversions_round_to_nearest_even(low_precision):
    x = _interesting_floats()
    n = x.size
    half_bits, bf16_bits = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    half_back, bf16_back = np.zeros(n, np.float32), np.zeros(n, np.float32)
    low_precision.get_function("convert")(
        (n + 63) // 64, 64, (x, half_bits, half_back, bf16_bits, bf16_back, np.int32(n))
    )
    nan = np.isnan(x)
    with np.errstate(over="ignore"):  # values beyond 65520 round to infinity, on purpose
        expected_half = x.astype(np.float16)
    np.testing.assert_array_equal(half_bits[~nan], expected_half.view(np.uint16)[~nan])
    np.testing.assert_array_equal(half_back[~nan], expected_half.astype(np.float32)[~nan])
    assert np.isnan(half_back[nan]).all()
    np.testing.assert_array_equal(bf16_bits, _bfloat16_bits(x))
    np.testing.assert_array_equal(
        bf16_back.view(np.uint32), bf16_bits.astype(np.uint32) << 16
    )


def test_half_and_bfloat16_arithmetic_is_correctly_rounded(low_precision):
    rng = np.random.default_rng(8)
    n = 256
    a = (rng.standard_normal(n) * 50).astype(np.float16)
    b = (rng.standard_normal(n) * 50).astype(np.float16)
    c = (rng.standard_normal(n) * 50).astype(np.float32)
    d = (rng.standard_normal(n) * 50).astype(np.float32)
    a16, b16 = _bfloat16_bits(c), _bfloat16_bits(d)
    outs = [np.zeros(n, np.uint16) for _ in range(5)]
    low_precision.get_function("arithmetic")(
        n // 64, 64,
        (a.view(np.uint16), b.view(np.uint16), outs[0], outs[1], outs[2], a16, b16, outs[3],
         outs[4], np.int32(n)),
    )
    np.testing.assert_array_equal(outs[0], (a + b).view(np.uint16))  # NumPy rounds once too
    np.testing.assert_array_equal(outs[1], (a * b).view(np.uint16))
    rotated = np.roll(a.reshape(-1, 32), -1, axis=1).reshape(-1)  # lane i reads lane i + 1
    np.testing.assert_array_equal(outs[2], rotated.view(np.uint16))
    as_float = lambda bits: (bits.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    np.testing.assert_array_equal(outs[3], _bfloat16_bits(as_float(a16) + as_float(b16)))
    np.testing.assert_array_equal(outs[4], _bfloat16_bits(as_float(a16) * as_float(b16)))


# ------------------------------------------------------------------------------------
# Planted bugs, each caught
# ------------------------------------------------------------------------------------
def test_missing_barrier_is_caught(bugs):
    x = np.random.default_rng(9).standard_normal((2, 256)).astype(np.float32)
    expected = x.astype(np.float64).sum(axis=1)

    def run(name, seed):
        out = np.zeros(2, np.float32)
        bugs.get_function(name)(2, 256, (x, out), seed=seed)
        return out

    correct = [run("tree_sum<true>", seed) for seed in range(6)]
    for out in correct:
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert out.tobytes() == correct[0].tobytes()
    buggy = [run("tree_sum<false>", seed) for seed in range(6)]
    wrong = [out for out in buggy if not np.allclose(out, expected, rtol=1e-5, atol=1e-5)]
    assert wrong, "the missing __syncthreads went unnoticed for every seed"
    # The early reads saw the 0xFF poison of unwritten shared memory.
    assert any(np.isnan(out).any() for out in wrong)


@pytest.mark.parametrize("name", ["stencil_unwritten", "stencil_unwritten_dynamic"])
def test_read_of_unwritten_shared_memory_is_poisoned(bugs, name):
    x = np.arange(128, dtype=np.float32)
    out = np.zeros(128, np.float32)
    bugs.get_function(name)(1, 128, (x, out), shared_mem=129 * 4)
    np.testing.assert_array_equal(out[:127], 0.5 * (x[:127] + x[1:]))
    assert np.isnan(out[127]), "the read of the unwritten tile[128] should give NaN"


@pytest.mark.parametrize("name", ["read_never_written", "read_never_written_template<3>"])
def test_shared_memory_nobody_writes_reads_as_poison(bugs, name):
    out = np.zeros(4, np.float32)
    bugs.get_function(name)(1, 4, (out,))
    assert np.isnan(out).all()
    assert (out.view(np.uint32) == 0xFFFFFFFF).all()


def test_out_of_bounds_write_is_caught_by_address_sanitizer(tmp_path):
    libasan = emulator.asan_runtime()
    if libasan is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime (libasan.so)")
    script = tmp_path / "oob.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import numpy as np
            from rnnkernels import emulator
            module = emulator.load_module([{str(KERNELS / "planted_bugs.cu")!r}],
                                          ["write_shifted"], sanitize=True)
            kernel = module.get_function("write_shifted")
            out = np.zeros(1000, np.float32)  # a heap buffer of its own, with redzones
            kernel(1, 1000, (out, np.int32(0)))
            assert out.sum() == 1000
            print("in bounds: fine", flush=True)
            kernel(1, 1000, (out, np.int32(1)))  # thread 999 writes out[1000]
            print("out of bounds: not caught", flush=True)
            """
        )
    )
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=libasan,
        ASAN_OPTIONS="detect_leaks=0",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert "in bounds: fine" in result.stdout, result.stderr[-4000:]
    assert "not caught" not in result.stdout
    assert result.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in result.stderr
    assert "planted_bugs.cu" in result.stderr  # the report points at the kernel's line


def test_sanitized_launches_from_a_plain_process_run_in_a_helper():
    """Without ASan preloaded here, sanitize=True runs each launch in a helper process
    on copies of the arrays' memory: results come back, an overrun becomes an error."""
    if emulator.asan_runtime() is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime (libasan.so)")
    module = emulator.load_module([KERNELS / "planted_bugs.cu"], ["write_shifted"], sanitize=True)
    kernel = module.get_function("write_shifted")
    workspace = np.zeros(1000, np.float32)
    kernel(1, 100, (workspace[10:], np.int32(0)))  # a view: pointer to workspace[10]
    np.testing.assert_array_equal(workspace, np.r_[np.zeros(10), np.ones(100), np.zeros(890)])
    kernel(1, 990, (workspace[10:], np.int32(0)))  # ends exactly at the end: fine
    with pytest.raises(EmulatorError, match="heap-buffer-overflow"):
        kernel(1, 990, (workspace[10:], np.int32(1)))  # one past the end of the allocation
    kernel(1, 10, (workspace, np.int32(0)))  # a new helper takes over after the report


def test_deadlock_raises_instead_of_hanging(bugs):
    out = np.zeros(32, np.int32)
    with pytest.raises(EmulatorError, match="deadlock") as info:
        bugs.get_function("barrier_against_shuffle")(1, 32, (out,))
    message = str(info.value)
    assert "__syncthreads()" in message and "__shfl_xor_sync" in message
    assert "planted_bugs.cu:" in message


def test_barriers_in_divergent_code_are_reported(bugs):
    with pytest.raises(EmulatorError, match="different barriers"):
        bugs.get_function("divergent_barriers")(1, 64, (np.zeros(64, np.int32),))


def test_shuffle_naming_an_exited_lane_is_reported(bugs):
    with pytest.raises(EmulatorError, match="exited"):
        bugs.get_function("shuffle_after_exit")(1, 32, (np.zeros(32, np.int32),))


def test_spin_wait_that_cannot_finish_is_reported(bugs, monkeypatch):
    monkeypatch.setenv("RNNKERNELS_EMULATOR_SPIN_LIMIT", "20000")
    with pytest.raises(EmulatorError, match="livelock"):
        bugs.get_function("spin_forever")(1, 4, (np.zeros(1, np.int32),))


def test_trap_raises(bugs):
    with pytest.raises(EmulatorError, match=r"thread \(3,0,0\).*__trap"):
        bugs.get_function("calls_trap")(1, 8, (np.zeros(8, np.int32),))


def test_exception_escaping_a_kernel_is_reported_and_freed(tmp_path):
    source = tmp_path / "throws.cu"
    source.write_text(
        textwrap.dedent(
            """
            #include <exception>
            #include <stdexcept>
            __global__ void throws(int* out) {
                if (threadIdx.x == 1) throw std::runtime_error("from a kernel");
                out[threadIdx.x] = 1;
            }
            // 1 where this OS thread still holds a caught exception (a leaked handler).
            __global__ void holds_exception(int* out) {
                out[0] = std::current_exception() != nullptr;
            }
            """
        )
    )
    module = emulator.load_module([source], ["throws", "holds_exception"])
    out = np.zeros(4, np.int32)
    with pytest.raises(EmulatorError, match=r"C\+\+ exception escaped the kernel in thread \(1,0,0\)"):
        module.get_function("throws")(1, 4, (out,))
    module.get_function("holds_exception")(1, 1, (out,))
    assert out[0] == 0, "the escaped exception was left open on the launching thread"


def test_module_still_works_after_an_error(bugs):
    x = np.ones((1, 256), np.float32)
    out = np.zeros(1, np.float32)
    with pytest.raises(EmulatorError):
        bugs.get_function("barrier_against_shuffle")(1, 32, (np.zeros(32, np.int32),))
    bugs.get_function("tree_sum<true>")(1, 256, (x, out))
    assert out[0] == 256


def test_a_frame_bigger_than_the_fiber_stack_crashes_instead_of_corrupting(tmp_path):
    """Locals bigger than the stack must hit the guard page, not jump over it into the
    stack of the fiber mapped below (README: "a kernel that needs more crashes")."""
    source = tmp_path / "big_frame.cu"
    source.write_text(
        textwrap.dedent(
            """
            __device__ __noinline__ void touch(volatile char* p) { p[0] = 1; }
            // 24 KiB of locals on a 16 KiB stack: without stack probes, big[0] lands
            // past the 4 KiB guard page, in a neighbouring fiber's stack.
            __device__ __noinline__ int deep() {
                volatile char big[24 * 1024];
                touch(big);
                return big[0];
            }
            __global__ void big_frame(int* out) {
                out[threadIdx.x] = threadIdx.x == 31 ? deep() : 0;
            }
            """
        )
    )
    emulator.load_module([source], ["big_frame"])  # compiled here, run in a new process
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import numpy as np
            from rnnkernels import emulator
            module = emulator.load_module([{str(source)!r}], ["big_frame"])
            module.get_function("big_frame")(1, 64, (np.zeros(64, np.int32),))
            print("ran past the end of its stack", flush=True)
            """
        )
    )
    env = dict(os.environ, RNNKERNELS_EMULATOR_STACK_KB="16")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert "ran past" not in result.stdout
    assert result.returncode == -signal.SIGSEGV, result.stderr[-2000:]


def test_portable_ucontext_fibers():
    """The swapcontext() fallback (used where there is no assembly switch) runs the
    same scheduler."""
    module = emulator.load_module(
        [KERNELS / "planted_bugs.cu"],
        ["tree_sum<true>", "barrier_against_shuffle"],
        defines={"RNNEMU_USE_UCONTEXT": None},
    )
    x = np.random.default_rng(11).standard_normal((2, 256)).astype(np.float32)
    out = np.zeros(2, np.float32)
    module.get_function("tree_sum<true>")(2, 256, (x, out))
    np.testing.assert_allclose(out, x.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(EmulatorError, match="deadlock"):
        module.get_function("barrier_against_shuffle")(1, 32, (np.zeros(32, np.int32),))


# ------------------------------------------------------------------------------------
# Building and caching
# ------------------------------------------------------------------------------------
def test_modules_are_memoised_and_cached_on_disk(primitives):
    again = emulator.load_module([KERNELS / "primitives.cu"], PRIMITIVES)
    assert again is primitives
    assert primitives.path.is_file() and primitives.path.parent == _build.cache_dir()


def test_cache_key_covers_headers_names_and_flags(tmp_path):
    source = tmp_path / "k.cu"
    header = tmp_path / "helper.cuh"
    source.write_text('#include "helper.cuh"\n__global__ void k(float* x) { x[0] = helper(); }\n')
    header.write_text("__device__ inline float helper() { return 1.0f; }\n")

    def key(names=("k",), defines=None):
        return _build.BuildPlan([source], list(names), [], defines or {}, False).key()

    before = key()
    assert key() == before
    header.write_text("__device__ inline float helper() { return 2.0f; }\n")
    assert key() != before
    assert key(names=("k", "k")) != key()
    assert key(defines={"TILE": 4}) != key()


def test_one_runtime_object_serves_modules_with_different_defines(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "k.cu"
    source.write_text("__global__ void k(float* x) { x[0] = TILE; }\n")
    for tile in (1, 2):
        plan = _build.BuildPlan([source], ["k"], [tmp_path], {"TILE": tile}, False)
        _build.build(plan, _build.cache_dir() / f"{plan.key()}.so")
    assert len(list(_build.cache_dir().glob("runtime-*.o"))) == 1
    # The defines that configure the runtime itself still give it its own object.
    ucontext = _build.BuildPlan([source], ["k"], [], {"TILE": 1, "RNNEMU_USE_UCONTEXT": None}, False)
    assert "-DRNNEMU_USE_UCONTEXT" in ucontext.runtime_flags


def test_compile_errors_carry_the_compiler_log(tmp_path):
    source = tmp_path / "broken.cu"
    source.write_text("__global__ void broken(float* x) { x[0] = undeclared_name; }\n")
    with pytest.raises(EmulatorError, match="undeclared_name") as info:
        emulator.load_module([source], ["broken"])
    assert "broken.cu" in str(info.value)
