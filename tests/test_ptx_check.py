"""rnnkernels.ptx_check: the memory ordering of a block-to-block exchange, read from the
PTX NVRTC makes. The correct kernels pass; each planted bug fails with a message that
names it. Needs the NVRTC library only, no GPU.

The kernels are the ones the emulator's stale memory model runs
(tests/emulator_kernels/memory_ordering.cu, tests/test_emulator_memory.py), and
experiment 02's persistent forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnkernels import nvrtc_check, ptx_check

pytestmark = pytest.mark.nvrtc

KERNELS = Path(__file__).resolve().parent / "emulator_kernels"
ORDERING = KERNELS / "memory_ordering.cu"
PERSISTENT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels" / "02_persistent_forward.cu"
PERSISTENT_KERNEL = "rnnkernels::lstm_forward_persistent<8, 4, 1>"


@pytest.fixture(scope="module", autouse=True)
def nvrtc():
    try:
        return nvrtc_check.load_nvrtc()
    except RuntimeError as error:
        pytest.skip(f"NVRTC is not available: {error.__cause__ or error}")


def check(ordering: str, arch=ptx_check.DEFAULT_ARCH):
    return ptx_check.check_exchange(
        ORDERING, f"exchange_with_flags<Ordering::{ordering}>", exchanged="history", flags="ready", arch=arch
    )


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("ordering", ["correct", "acquire_release"])
def test_correct_exchange_passes(ordering, arch):
    report = check(ordering, arch)
    assert report.ok, report.explain()
    assert len(report.exchanged_loads) == 2 and len(report.polls) == 1 and len(report.publishes) == 1
    assert all(".cg." in load.opcode + "." for load in report.exchanged_loads)
    if ordering == "acquire_release":  # the poll and the publish carry the ordering themselves
        assert report.fences == []
        assert "acquire" in report.polls[0].opcode and "release" in report.publishes[0].opcode


@pytest.mark.parametrize(
    "ordering, message",
    [
        ("no_release", "without a release"),
        ("plain_load", "ld.global.u32 of the exchanged buffer"),
        ("no_wait", "never reads the flags"),
        ("no_acquire", "without an acquire"),
    ],
)
def test_planted_bug_fails_with_its_reason(ordering, message):
    report = check(ordering)
    assert not report.ok
    assert any(message in problem for problem in report.problems), report.explain()
    assert len(report.problems) <= 2, report.explain()  # the bug, not noise


def test_lock_with_plain_read_is_caught():
    plain = ptx_check.check_exchange(ORDERING, "locked_counter<true>", exchanged="counter", flags="lock")
    assert [p for p in plain.problems if "exchanged buffer" in p], plain.explain()
    through_l2 = ptx_check.check_exchange(ORDERING, "locked_counter<false>", exchanged="counter", flags=0)
    assert through_l2.ok, through_l2.explain()


def test_every_instance_of_experiment_02_passes():
    from test_experiments import load_experiment

    names = [tile.kernel_name() for tile in load_experiment("02_persistent_forward.py").TILES]
    assert PERSISTENT_KERNEL in names
    for report in ptx_check.check_exchanges(PERSISTENT, names, exchanged="h_all", flags="barrier"):
        assert report.ok, report.explain()
        # Its h_{t-1} reads; the plain loads of c_state and the ld.global.nc of w_hh and
        # gx are other buffers, which the check leaves alone.
        assert report.exchanged_loads and all(".cg." in load.opcode for load in report.exchanged_loads)
        assert "ld.global.nc" in report.ptx and "ld.global.f32" in report.ptx


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("__ldcg(h_prev + (index_t)row * hidden + k)", "h_prev[(index_t)row * hidden + k]", "of the exchanged buffer"),
        ("        __threadfence();\n        const unsigned before", "        const unsigned before", "without a release"),
        ("        }\n        __threadfence();\n    }\n    __syncthreads();", "        }\n    }\n    __syncthreads();", "without an acquire"),
    ],
    ids=["plain load of h_prev", "no release fence", "no acquire fence"],
)
def test_persistent_forward_with_a_planted_bug_fails(old, new, message):
    text = PERSISTENT.read_text()
    assert text.count(old) == 1, "the planted bug no longer applies: update it"
    report = ptx_check.check_exchange(text.replace(old, new), PERSISTENT_KERNEL, exchanged="h_all", flags="barrier")
    assert any(message in problem for problem in report.problems), report.explain()


def test_parameters_are_read_from_the_declaration():
    text = PERSISTENT.read_text()
    assert ptx_check.kernel_parameters(text, PERSISTENT_KERNEL) == [
        "gx", "w_hh", "h_all", "c_state", "barrier", "steps", "batch", "hidden", "unit_tile"
    ]
    with pytest.raises(ValueError, match="no parameter 'h'"):
        ptx_check.check_exchange(PERSISTENT, PERSISTENT_KERNEL, exchanged="h", flags="barrier")
    with pytest.raises(ValueError, match="no index 9"):
        ptx_check.check_exchange(PERSISTENT, PERSISTENT_KERNEL, exchanged=9, flags="barrier")
    with pytest.raises(ValueError, match="arch"):
        ptx_check.check_exchange(PERSISTENT, PERSISTENT_KERNEL, exchanged=2, flags=4, arch="90")


def test_every_instance_in_one_compile_and_the_command_line(capsys):
    names = [f"exchange_with_flags<Ordering::{o}>" for o in ("correct", "no_release")]
    reports = ptx_check.check_exchanges(ORDERING, names, exchanged="history", flags="ready")
    assert [r.name_expression for r in reports] == names and [r.ok for r in reports] == [True, False]
    assert ptx_check.main([str(ORDERING), names[0], "--exchanged", "history", "--flags", "ready"]) == 0
    assert ptx_check.main([str(ORDERING), *names, "--exchanged", "history", "--flags", "ready"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "without a release" in out
