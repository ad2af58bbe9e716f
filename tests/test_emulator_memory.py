"""The emulator's stale memory model: GPU memory ordering bugs fail a test.

A sequentially consistent emulator passes a kernel that forgets a fence or reads data
another block wrote with a plain (L1-cached) load. In memory_model="stale" every block
reads its own stale view of the array arguments unless it reads through L2 after a
fence (rnnkernels/emulator/README.md, "Memory ordering"). The kernels are in
tests/emulator_kernels/memory_ordering.cu: the persistent kernels' exchange contract
written correctly and with one planted bug each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rnnkernels import emulator
from rnnkernels.emulator import EmulatorError

KERNELS = Path(__file__).resolve().parent / "emulator_kernels"
EXPERIMENTS = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels"

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(
        not emulator.compiler_available(),
        reason="the CPU emulator needs a C++ compiler (g++ or $CXX) on PATH",
    ),
]

ORDERINGS = ["correct", "acquire_release", "sleepy_poll", "no_release", "plain_load", "no_wait", "no_acquire"]
NAMES = [f"exchange_with_flags<Ordering::{o}>" for o in ORDERINGS] + [
    "exchange_with_grid_sync",
    "locked_counter<false>",
    "locked_counter<true>",
]
SEEDS = range(8)
BLOCKS, THREADS, SLICE, STEPS = 4, 32, 40, 8
N = BLOCKS * SLICE


@pytest.fixture(scope="module")
def kernels():
    return emulator.load_module([KERNELS / "memory_ordering.cu"], NAMES)


@pytest.fixture(scope="module")
def start():
    return np.random.default_rng(0).integers(0, 2**32, N, dtype=np.uint32)


def expected_history(start: np.ndarray) -> np.ndarray:
    """The kernels' recurrence in NumPy (uint32, wrapping)."""
    i = np.arange(N)
    history = [start.astype(np.uint64)]
    for step in range(1, STEPS + 1):
        previous = history[-1]
        history.append((3 * previous[(i + 1) % N] + previous[(5 * i + 2) % N] + step) % 2**32)
    return np.array(history, dtype=np.uint32)


def run_exchange(kernels, ordering, start, seed, memory_model):
    history = np.zeros((STEPS + 1, N), np.uint32)
    history[0] = start
    ready = np.zeros(BLOCKS, np.uint32)
    kernels.get_function(f"exchange_with_flags<Ordering::{ordering}>")(
        BLOCKS, THREADS, (history, ready, np.int32(STEPS), np.int32(SLICE)),
        cooperative=True, seed=seed, memory_model=memory_model,
    )
    assert np.all(ready == STEPS), ready
    return history


def exact_seeds(kernels, ordering, start, memory_model) -> list[bool]:
    expected = expected_history(start)
    return [np.array_equal(run_exchange(kernels, ordering, start, seed, memory_model), expected) for seed in SEEDS]


@pytest.mark.parametrize("ordering", ["correct", "acquire_release", "sleepy_poll"])
def test_correct_exchange_is_exact_in_both_models(kernels, start, ordering):
    assert all(exact_seeds(kernels, ordering, start, "sequential"))
    assert kernels.last_view_switches == 0
    assert all(exact_seeds(kernels, ordering, start, "stale"))
    assert kernels.last_view_switches > 0  # the model was engaged: blocks had views


@pytest.mark.parametrize("ordering", ["no_release", "plain_load", "no_acquire"])
def test_ordering_bug_passes_sequential_and_fails_stale(kernels, start, ordering):
    # What the model is for: the sequentially consistent emulator passes these bugs.
    assert all(exact_seeds(kernels, ordering, start, "sequential"))
    exact = exact_seeds(kernels, ordering, start, "stale")
    assert not all(exact), f"{ordering}: exact on every seed in the stale model"


def test_consumer_that_does_not_wait_fails_stale_on_every_seed(kernels, start):
    # A plain race: the sequentially consistent emulator sees it too (on the seeds
    # whose order puts a consumer first); the stale model on every seed.
    assert not any(exact_seeds(kernels, "no_wait", start, "stale"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_loads_after_grid_sync_are_exact(kernels, start, seed):
    history = np.zeros((STEPS + 1, N), np.uint32)
    history[0] = start
    kernels.get_function("exchange_with_grid_sync")(
        BLOCKS, THREADS, (history, np.int32(STEPS), np.int32(SLICE)),
        cooperative=True, seed=seed, memory_model="stale",
    )
    np.testing.assert_array_equal(history, expected_history(start))


def test_views_of_one_array_share_its_memory(kernels, start):
    # history and ready are views of one buffer: one region, and the kernel's writes
    # through either view reach the host.
    buffer = np.zeros((STEPS + 2) * N, np.uint32)
    history = buffer[N:].reshape(STEPS + 1, N)
    ready = buffer[:BLOCKS]
    history[0] = start
    kernels.get_function("exchange_with_flags<Ordering::correct>")(
        BLOCKS, THREADS, (history, ready, np.int32(STEPS), np.int32(SLICE)),
        cooperative=True, seed=3, memory_model="stale",
    )
    np.testing.assert_array_equal(history, expected_history(start))
    assert np.all(ready == STEPS)


def locked_count(kernels, plain_read, *, cooperative, memory_model=None, rounds=3):
    lock, counter = np.zeros(1, np.uint32), np.zeros(1, np.uint32)
    kernels.get_function(f"locked_counter<{str(plain_read).lower()}>")(
        BLOCKS, THREADS, (lock, counter, np.int32(rounds)),
        cooperative=cooperative, seed=1, memory_model=memory_model,
    )
    assert lock[0] == 0
    return int(counter[0])


@pytest.mark.parametrize("cooperative", [True, False])
def test_lock_protected_plain_read_sees_a_stale_count(kernels, cooperative):
    # Each block's plain load returns its own view: it counts only its own rounds.
    assert locked_count(kernels, True, cooperative=cooperative, memory_model="stale") == 3
    assert locked_count(kernels, False, cooperative=cooperative, memory_model="stale") == 12
    assert locked_count(kernels, True, cooperative=cooperative, memory_model="sequential") == 12


def test_default_model_is_stale_for_cooperative_launches_only(kernels, monkeypatch):
    monkeypatch.delenv(emulator.MEMORY_ENVIRONMENT_VARIABLE, raising=False)
    assert locked_count(kernels, True, cooperative=True) == 3
    assert locked_count(kernels, True, cooperative=False) == 12
    monkeypatch.setenv(emulator.MEMORY_ENVIRONMENT_VARIABLE, "sequential")
    assert locked_count(kernels, True, cooperative=True) == 12
    monkeypatch.setenv(emulator.MEMORY_ENVIRONMENT_VARIABLE, "stale")
    assert locked_count(kernels, True, cooperative=False) == 3
    # An explicit argument wins over the environment.
    assert locked_count(kernels, True, cooperative=False, memory_model="sequential") == 12


def test_bad_memory_model_is_refused(kernels, monkeypatch):
    monkeypatch.delenv(emulator.MEMORY_ENVIRONMENT_VARIABLE, raising=False)
    with pytest.raises(ValueError, match="memory_model"):
        locked_count(kernels, False, cooperative=True, memory_model="weak")
    monkeypatch.setenv(emulator.MEMORY_ENVIRONMENT_VARIABLE, "relaxed")
    with pytest.raises(EmulatorError, match=emulator.MEMORY_ENVIRONMENT_VARIABLE):
        locked_count(kernels, False, cooperative=True)


def test_a_refused_stale_launch_does_not_configure_the_next(kernels):
    # The memory model is handed to the runtime just before each launch; a launch
    # refused before it runs (wrong argument count) must not leave it to the next one.
    with pytest.raises(EmulatorError, match="argument"):
        kernels.get_function("exchange_with_grid_sync")(
            BLOCKS, THREADS, (np.zeros(4, np.uint32),), cooperative=True, memory_model="stale"
        )
    assert locked_count(kernels, True, cooperative=True, memory_model="sequential") == 12


# ------------------------------------------------------------------------------------
# Experiment 02 (benchmarks/kernels/02_persistent_forward.cu): its own grid barrier
# with fences, h_{t-1} read with __ldcg.
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def persistent():
    from test_experiments import load_experiment

    return load_experiment("02_persistent_forward.py")


def persistent_error(persistent, source_text, seed):
    """Relative error of the persistent forward built from ``source_text`` (T=5, B=3,
    I=6, H=33: 4 blocks) on the emulator, stale model, one tile."""
    from rnnkernels import _sources

    tile = next(t for t in persistent.TILES if t.name == "batch4")
    module = emulator.load_module(
        [source_text], [tile.kernel_name()], include_dirs=(str(_sources.csrc_dir()),)
    )

    def launch(tile, grid, block, args, shared_mem):
        module.get_function(tile.kernel_name())(
            grid, block, args, shared_mem=shared_mem, cooperative=True, seed=seed,
            memory_model="stale",
        )

    shape = (5, 3, 6, 33)
    problem = persistent.make_problem(*shape, seed=sum(shape))
    outputs = persistent.persistent_forward(np, launch, problem, tile, persistent.unit_tile_for(33, persistent.EMULATED_SMS))
    assert module.last_view_switches > 0
    return persistent.max_relative_error([np.array(a) for a in outputs], persistent.reference(problem))


def planted(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in the kernel once: update the planted bug"
    return text.replace(old, new)


def test_02_persistent_forward_is_exact_in_the_stale_model(persistent):
    text = (EXPERIMENTS / "02_persistent_forward.cu").read_text()
    for seed in (0, 1, 2):
        assert persistent_error(persistent, text, seed) < persistent.TOLERANCE


@pytest.mark.parametrize("bug", ["plain load of h_prev", "no release fence in the grid barrier"])
def test_02_persistent_forward_with_a_planted_bug_fails_in_the_stale_model(persistent, bug):
    text = (EXPERIMENTS / "02_persistent_forward.cu").read_text()
    if bug == "plain load of h_prev":
        text = planted(text, "__ldcg(h_prev + (index_t)row * hidden + k)", "h_prev[(index_t)row * hidden + k]")
    else:
        text = planted(text, "        __threadfence();\n        const unsigned before", "        const unsigned before")
    errors = [persistent_error(persistent, text, seed) for seed in range(6)]
    # A stale read may return the NaN the launcher filled h_all with: NaN counts as wrong.
    assert any(not error <= 1e-3 for error in errors), errors


def test_emulator_runtime_takes_a_memory_model():
    from rnnkernels import _launch

    assert _launch.EmulatorRuntime(memory_model="stale").memory_model == "stale"
    assert _launch.EmulatorRuntime().memory_model is None
    with pytest.raises(ValueError, match="memory_model"):
        _launch.EmulatorRuntime(memory_model="weak")


def test_product_kernels_are_exact_in_the_stale_model():
    # Normal launches in the stale model: every block starts from the launch-start
    # contents. The per-step kernels do not communicate between blocks, so nothing
    # changes, bit for bit.
    from test_cuda_kernels import assert_bitwise_equal, make_problem, run_kernels

    from rnnkernels import _launch

    problem = make_problem(3, 3, 5, 33, seed=7)
    stale = _launch.EmulatorRuntime(seed=1, memory_model="stale")
    results = run_kernels(stale, problem)
    modules = [_launch._emulator_module(source, _launch._sources.sources_digest(), False) for source in (_launch.FORWARD_SOURCE, _launch.BACKWARD_SOURCE)]
    assert all(module.last_view_switches > 0 for module in modules)  # their last launches had views
    assert_bitwise_equal(results, run_kernels(_launch.EmulatorRuntime(seed=1), problem))
