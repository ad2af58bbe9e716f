"""Compile every kernel instance of the table with NVRTC and report ptxas's numbers.

    python -m rnnkernels.nvrtc_check [--arch sm_80 sm_90]

needs only the NVRTC library and NVIDIA's device headers (``pip install
rnnkernels[cuda13]``), no GPU and no driver. For each source in
:data:`rnnkernels._launch.KERNELS` and each architecture it compiles all of that
source's instances at once, with exactly the options CuPy's RawModule hands NVRTC at
run time (:func:`cupy_nvrtc_options`: ours, plus CuPy's -ftz=true, C++ standard and
include folders, with ``-arch=<arch>``) and ``-Xptxas=-v``, prints those options, and
one row per kernel: registers, static shared memory, stack frame and spill
stores/loads. Exits 1 if a per-step or persistent kernel spills
(``_launch.STEP_KERNEL_PREFIXES``) or a kernel needs more registers than its launch
bounds allow.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from unittest import mock

from . import _launch, _sources

DEFAULT_ARCHES = ("sm_80", "sm_90")
_REGISTER_FILE = 65536  # 32-bit registers per SM on sm_80 / sm_90
_MAX_REGISTERS_PER_THREAD = 255


@dataclass(frozen=True)
class KernelReport:
    """ptxas's resource usage for one kernel instance on one architecture."""

    name: str  # the name expression, e.g. rnnkernels::lstm_forward_step<32, 4, 4, 32, true>
    arch: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    threads: int  # block size the launcher uses (the kernel's launch bounds)

    @property
    def register_limit(self) -> int:
        """Registers per thread that still let one block of ``threads`` fit an SM."""
        return min(_MAX_REGISTERS_PER_THREAD, _REGISTER_FILE // self.threads)

    @property
    def is_step_kernel(self) -> bool:
        return self.name.startswith(_launch.STEP_KERNEL_PREFIXES)


def block_threads() -> dict[str, int]:
    """Threads per block for every name expression of the kernel table."""
    return {name: threads for table in _launch.KERNELS.values() for name, threads in table.items()}


def load_nvrtc():
    """cupy.cuda.nvrtc, or a RuntimeError saying what to install."""
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as error:  # ImportError, or the library failing to load
        raise RuntimeError(
            "the NVRTC check needs CuPy and the NVRTC library: "
            "pip install rnnkernels[cuda13] (or rnnkernels[cuda12])"
        ) from error
    return nvrtc


class _Recorded(Exception):
    """Raised by :class:`_RecordingProgram` once CuPy hands it the module's options."""

    def __init__(self, options):
        super().__init__("recorded")
        self.options = tuple(options)


class _RecordingProgram:
    """Stands in for CuPy's NVRTC program class (cupy.cuda.compiler._NVRTCProgram): it
    compiles nothing and reports the options CuPy passes to ``compile``."""

    def __init__(self, src, name="default_program", headers=(), include_names=(), name_expressions=None,
                 method="ptx"):
        self.name_expressions = name_expressions

    def compile(self, options=(), log_stream=None):
        raise _Recorded(options)


_ARCH_PLACEHOLDER = "-arch=<device>"
_PROBE_SOURCE = 'extern "C" __global__ void rnnkernels_option_probe() {}\n'
_recording_lock = threading.Lock()


def cupy_nvrtc_options(options, arch: str) -> tuple[str, ...]:
    """The options CuPy's RawModule hands NVRTC for a module built with ``options`` on a
    device of architecture ``arch`` (e.g. "sm_90"), read from CuPy's own code rather
    than copied from it, so the check cannot drift from the runtime. CuPy adds -ftz=true,
    the C++ standard, its include folders and more, depending on its version
    (tests/test_ftz.py pins the set, and checks it against a real RawModule on a GPU).

    How: RawModule compiles through ``cupy._core.core.compile_with_cache`` (see
    cupy/_core/raw.pyx), which assembles CuPy's options and passes them down to
    ``cupy.cuda.compiler``. This runs that very path with four of the compiler module's
    names replaced for the duration, none of which alters the options: the NVRTC
    program class by a recorder that compiles nothing; the device queries (there may be
    no device) by ``arch``'s digits and an -arch placeholder, which becomes
    ``-arch=<arch>`` (sm_: CuPy builds SASS when NVRTC knows the device, as for sm_80
    and sm_90); the empty-program compile that reads NVRTC's version for the cache key
    by an empty string, with CuPy's memo of it restored afterwards. CuPy's kernel cache
    is kept in memory for the call, so nothing is read from or written to disk."""
    return _cupy_nvrtc_options(tuple(options), arch)


@functools.cache  # about a second each; the answer depends only on the arguments
def _cupy_nvrtc_options(options: tuple[str, ...], arch: str) -> tuple[str, ...]:
    from cupy._core import core
    from cupy.cuda import compiler

    if not re.fullmatch(r"sm_\d+", arch):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    digits = arch.removeprefix("sm_")
    with _recording_lock, mock.patch.object(compiler, "_NVRTCProgram", _RecordingProgram), mock.patch.object(
        compiler, "_get_arch", lambda: digits
    ), mock.patch.object(
        compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (_ARCH_PLACEHOLDER, "cubin")
    ), mock.patch.object(compiler, "_preprocess", lambda *args, **kwargs: ""), mock.patch.dict(
        compiler._empty_file_preprocess_cache
    ), mock.patch.dict(os.environ, {"CUPY_CACHE_IN_MEMORY": "1"}):
        try:
            core.compile_with_cache(
                _PROBE_SOURCE, tuple(options), prepend_cupy_headers=False,
                name_expressions=("rnnkernels_option_probe",),
            )
        except _Recorded as recorded:
            found = recorded.options
        else:
            raise RuntimeError("CuPy's compile path never reached NVRTC; cannot read its options")
    if found.count(_ARCH_PLACEHOLDER) != 1:
        raise RuntimeError(f"CuPy's options carry no single -arch where expected: {found}")
    return tuple(f"-arch={arch}" if option == _ARCH_PLACEHOLDER else option for option in found)


def check_options(arch: str) -> tuple[str, ...]:
    """What the check compiles with: the runtime's options as CuPy passes them, plus
    ptxas's report."""
    return (*cupy_nvrtc_options(_launch.compile_options(), arch), "-Xptxas=-v")


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """Mangled kernel name -> {registers, shared_bytes, stack_bytes, spill_stores,
    spill_loads}, from a ``-Xptxas=-v`` log."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            current = kernels.setdefault(match.group(1), {"shared_bytes": 0})
        elif current is None:
            continue
        elif match := _FRAME.search(line):
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = map(int, match.groups())
        elif match := _USAGE.search(line):
            current["registers"] = int(match.group(1))
            if smem := _SMEM.search(line):
                current["shared_bytes"] = int(smem.group(1))
    return kernels


@dataclass(frozen=True)
class Compiled:
    """What one NVRTC compile gave: its log, its PTX ("" unless asked for) and the
    lowered (mangled) name of each name expression."""

    log: str
    ptx: str
    lowered: dict[str, str]


def compile_program(text: str, file_name: str, names, options, arch: str, *, ptx: bool = False) -> Compiled:
    """Compile ``text`` with NVRTC (``options`` as given, the -arch included), with
    ``names`` as name expressions; RuntimeError with NVRTC's log if it fails. The one
    NVRTC call of this check and of ``rnnkernels/ptx_check.py``."""
    nvrtc = load_nvrtc()
    program = nvrtc.createProgram(text, file_name, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, list(options))
        except nvrtc.NVRTCError as error:
            raise RuntimeError(
                f"NVRTC failed to compile {file_name} for {arch}:\n{nvrtc.getProgramLog(program)}"
            ) from error
        code = nvrtc.getPTX(program) if ptx else ""
        if isinstance(code, bytes):
            code = code.decode()
        return Compiled(nvrtc.getProgramLog(program), code.rstrip("\x00"),
                        {name: nvrtc.getLoweredName(program, name) for name in names})
    finally:
        nvrtc.destroyProgram(program)


def compile_source(source: str, arch: str) -> list[KernelReport]:
    """Compile every table instance of ``source`` for ``arch``; one report per instance.
    Raises RuntimeError with the NVRTC log if compilation fails."""
    names = _launch.KERNELS[source]
    compiled = compile_program(_sources.read_source(source), source, names, check_options(arch), arch)
    log = compiled.log
    usage = parse_ptxas_log(log)
    threads = block_threads()
    reports = []
    for name in names:
        lowered = compiled.lowered[name]
        if lowered not in usage:
            raise RuntimeError(f"ptxas reported nothing for {name} ({lowered}) in:\n{log}")
        numbers = usage[lowered]
        reports.append(
            KernelReport(
                name=name,
                arch=arch,
                registers=numbers["registers"],
                shared_bytes=numbers["shared_bytes"],
                stack_bytes=numbers["stack_bytes"],
                spill_stores=numbers["spill_stores"],
                spill_loads=numbers["spill_loads"],
                threads=threads[name],
            )
        )
    return reports


def compile_sources(sources, arch: str, workers: int | None = None) -> list[KernelReport]:
    """:func:`compile_source` for each of ``sources``, reports in that order. The NVRTC
    calls run in up to ``workers`` threads (default: one per CPU): NVRTC is thread safe
    for separate programs and CuPy's binding releases the GIL while it compiles, so on
    the 2-core CI machine the table (LSTM, GRU and Elman files) takes about half the
    wall time of one file after another."""
    sources = list(sources)
    check_options(arch)  # memoized under a lock: read once, before the threads start
    workers = max(1, min(len(sources), workers or os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return [report for reports in pool.map(lambda source: compile_source(source, arch), sources)
                for report in reports]


def check_all(arches=DEFAULT_ARCHES) -> list[KernelReport]:
    """Reports for every source of the kernel table and every architecture."""
    return [report for arch in arches for report in compile_sources(_launch.KERNELS, arch)]


def problems(reports: list[KernelReport]) -> list[str]:
    """Why the reports fail the check: spills in per-step kernels, or more registers
    than the launch bounds allow (empty when all is well)."""
    found = []
    for r in reports:
        if r.is_step_kernel and (r.spill_stores or r.spill_loads):
            found.append(f"{r.name} on {r.arch} spills ({r.spill_stores} B stored, {r.spill_loads} B loaded)")
        if r.registers > r.register_limit:
            found.append(f"{r.name} on {r.arch} uses {r.registers} registers > {r.register_limit}")
    return found


def format_table(reports: list[KernelReport]) -> str:
    header = ("kernel", "arch", "threads", "regs", "smem B", "stack B", "spill st B", "spill ld B")
    rows = [
        (r.name.removeprefix("rnnkernels::"), r.arch, r.threads, r.registers, r.shared_bytes,
         r.stack_bytes, r.spill_stores, r.spill_loads)
        for r in reports
    ]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHES), help="e.g. sm_80 sm_90")
    args = parser.parse_args(argv)
    reports = check_all(args.arch)
    print(f"NVRTC {'.'.join(map(str, load_nvrtc().getVersion()))}, sources {_sources.sources_digest()}")
    for arch in args.arch:
        print(f"options ({arch}, as CuPy's RawModule passes them):", " ".join(check_options(arch)))
    print(format_table(reports))
    found = problems(reports)
    for problem in found:
        print("FAIL:", problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
