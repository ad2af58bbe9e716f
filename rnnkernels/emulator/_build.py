"""Compiling emulator modules: the generated translation unit, g++, the on-disk cache.

A module is one shared library built from
  * ``rnnemu_kernels.cpp``, generated here: the shim (``cuda_emulator.h``), an
    ``#include`` of every source, and one ``extern "C"`` entry per name expression;
  * ``runtime.cpp``, the scheduler, shipped beside this file (compiled once per set of
    flags and cached as ``runtime-<key>.o``);
linked with a small linker script that gathers every static ``__shared__`` variable
into the range the runtime poisons (see ``cuda_emulator.h``).

Libraries are cached as ``<cache>/<key>.so``; the key hashes everything that can change
the result: the shim and runtime files, each source and every header beside it and in
the include folders, the name expressions, the defines and flags, and the compiler's
identity. Builds go to a private temporary folder and are renamed into place, so
concurrent processes never see half-written files.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

SHIM_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = SHIM_DIR / "include"

# Bump when the generated code or the build steps change in a way the hashed inputs
# do not show.
_FORMAT_VERSION = "rnnemu-1"

_HEADER_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".hh", ".inl", ".inc")

_KERNELS_OBJECT = "rnnemu_kernels.o"
_LOG_LIMIT = 20000  # characters of compiler output kept in an error message

# Places the static shared memory of the kernel object in one output section. The
# `rnnemu_shared.N` sections come from the __shared__ macro; `.bss._ZZ*` are the
# static locals of templates and inline functions, for which g++ ignores the section
# attribute. Only the kernel object's are taken (the runtime has its own statics).
_LINKER_SCRIPT = f"""\
SECTIONS
{{
  rnnemu_shared_memory : ALIGN(128)
  {{
    PROVIDE_HIDDEN(__rnnemu_shared_begin = .);
    KEEP(*(rnnemu_shared.*))
    *{_KERNELS_OBJECT}(.bss._ZZ*)
    . = ALIGN(16);
    PROVIDE_HIDDEN(__rnnemu_shared_end = .);
  }}
}}
INSERT AFTER .bss;
"""

_BASE_FLAGS = (
    "-std=c++17",
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",  # CUDA code type-puns through reinterpret_cast (float4 loads)
    # Probe every page of a big frame, so that locals larger than a fiber's stack fault on
    # its guard page instead of landing in the stack of the fiber mapped below it.
    "-fstack-clash-protection",
    "-pthread",
    "-Wno-unknown-pragmas",  # #pragma unroll
)
_OPTIMIZE_FLAGS = ("-O2",)
_SANITIZE_FLAGS = ("-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer")


class BuildError(RuntimeError):
    """A compile or link step failed; the message carries the compiler's log."""


def compiler_command() -> list[str]:
    """``$CXX`` split like a shell would (``ccache g++`` works), else ``g++``."""
    return shlex.split(os.environ.get("CXX") or "g++")


@functools.lru_cache(maxsize=None)
def _compiler_identity(command: tuple[str, ...]) -> str | None:
    """Resolved path and ``--version`` / ``-dumpmachine`` output, or None if unusable."""
    if not command or shutil.which(command[0]) is None:
        return None
    try:
        version = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, timeout=60
        )
        machine = subprocess.run(
            [*command, "-dumpmachine"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if version.returncode != 0:
        return None
    return "\n".join(
        [shutil.which(command[0]) or command[0], *command[1:], version.stdout, machine.stdout]
    )


def compiler_identity() -> str | None:
    return _compiler_identity(tuple(compiler_command()))


@functools.lru_cache(maxsize=None)
def _asan_runtime(command: tuple[str, ...]) -> str | None:
    try:
        out = subprocess.run(
            [*command, "-print-file-name=libasan.so"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    path = out.stdout.strip()
    return path if out.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def asan_runtime() -> str | None:
    """Path of the compiler's ``libasan.so``, or None where it has none."""
    if compiler_identity() is None:
        return None
    return _asan_runtime(tuple(compiler_command()))


def cache_dir() -> Path:
    """``$RNNKERNELS_CACHE_DIR/emulator``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache`` + ``rnnkernels/emulator``; a folder in the temporary directory where
    that one cannot be created."""
    root = os.environ.get("RNNKERNELS_CACHE_DIR")
    if root:
        folder = Path(root) / "emulator"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) if xdg else Path.home() / ".cache"
        folder = base / "rnnkernels" / "emulator"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / f"rnnkernels-emulator-{os.getuid()}"
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _shim_files() -> list[Path]:
    # include/ has subfolders with extensionless headers (cuda/atomic): every file.
    files = [*SHIM_DIR.glob("*.h"), *SHIM_DIR.glob("*.cpp"), *(p for p in INCLUDE_DIR.rglob("*") if p.is_file())]
    return sorted(files)


def _headers_in(folder: Path) -> list[Path]:
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p.suffix in _HEADER_SUFFIXES and p.is_file())


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def generate_translation_unit(
    sources: Sequence[Path | str], name_expressions: Sequence[str]
) -> str:
    """The C++ file that includes the shim, the sources, and exports the kernels.

    A source is a path (``#include``d, so its own folder is searched first for quoted
    includes) or the text of a source (pasted in; its includes come from include_dirs).
    """
    lines = [
        "// Generated by rnnkernels.emulator; do not edit.",
        '#include "cuda_emulator.h"',
    ]
    for source in sources:
        if isinstance(source, Path):
            text = str(source)
            if '"' in text or "\n" in text:
                raise BuildError(f"cannot #include a source whose path contains quotes: {text!r}")
            lines.append(f'#include "{text}"')
        else:
            lines.append(source.rstrip("\n"))
    lines.append('#line 1 "rnnemu_kernel_entries"')
    lines.append("namespace {")
    for i, expression in enumerate(name_expressions):
        lines.append(
            f"const ::rnnemu::KernelInfo rnnemu_kernel_info_{i} = "
            f"::rnnemu::describe_kernel(&{expression}, {_c_string(expression)});"
        )
    lines.append("}  // namespace")
    for i in range(len(name_expressions)):
        lines.append(
            f"RNNEMU_EXPORT const ::rnnemu::KernelInfo* rnnemu_kernel_{i}() "
            f"{{ return &rnnemu_kernel_info_{i}; }}"
        )
    lines.append(f"RNNEMU_EXPORT int rnnemu_kernel_count() {{ return {len(name_expressions)}; }}")
    return "\n".join(lines) + "\n"


class BuildPlan:
    """Everything one build needs, and the cache key derived from it."""

    def __init__(
        self,
        sources: Sequence[Path | str],
        name_expressions: Sequence[str],
        include_dirs: Sequence[Path],
        defines: Mapping[str, object],
        sanitize: bool,
    ):
        self.sources = list(sources)
        self.name_expressions = list(name_expressions)
        self.include_dirs = list(include_dirs)
        self.sanitize = sanitize
        self.compiler = compiler_command()
        self.define_flags = [
            f"-D{name}" if value is None else f"-D{name}={value}"
            for name, value in sorted(defines.items())
        ]
        extra = shlex.split(os.environ.get("RNNKERNELS_EMULATOR_CXXFLAGS", ""))
        # runtime.cpp sees neither the kernels' include folders nor their defines, only
        # the RNNEMU_* ones that configure it (RNNEMU_USE_UCONTEXT), so one runtime
        # object serves every module built with the same compiler and options.
        self.runtime_flags = [
            *_BASE_FLAGS,
            *(_SANITIZE_FLAGS if sanitize else _OPTIMIZE_FLAGS),
            *extra,
            *(flag for flag in self.define_flags if flag.startswith("-DRNNEMU_")),
        ]
        self.compile_flags = [
            *_BASE_FLAGS,
            *(_SANITIZE_FLAGS if sanitize else _OPTIMIZE_FLAGS),
            *extra,
            f"-I{SHIM_DIR}",
            f"-I{INCLUDE_DIR}",
            *(f"-I{d}" for d in self.include_dirs),
            *self.define_flags,
        ]
        self.link_flags = ["-shared", "-pthread", *(["-fsanitize=address"] if sanitize else [])]
        self.translation_unit = generate_translation_unit(self.sources, self.name_expressions)

    def key(self) -> str:
        digest = hashlib.sha256()

        def add(label: str, data: bytes) -> None:
            digest.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

        add("format", _FORMAT_VERSION.encode())
        add("compiler", (compiler_identity() or "").encode())
        add("compile", "\0".join(self.compile_flags).encode())
        add("link", "\0".join(self.link_flags).encode())
        add("script", _LINKER_SCRIPT.encode())
        add("unit", self.translation_unit.encode())
        seen: set[Path] = set()
        hashed: list[Path] = [*_shim_files()]
        for source in self.sources:
            if isinstance(source, Path):  # source texts are in the translation unit
                hashed.append(source)
                hashed.extend(_headers_in(source.parent))
        for folder in self.include_dirs:
            hashed.extend(_headers_in(folder))
        for path in hashed:
            if path in seen:
                continue
            seen.add(path)
            add("file:" + str(path), path.read_bytes())
        return digest.hexdigest()[:32]


def _run(command: list[str], what: str, cwd: Path) -> None:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        log = (result.stdout + result.stderr).strip()
        if len(log) > _LOG_LIMIT:
            log = log[:_LOG_LIMIT] + f"\n[... {len(log) - _LOG_LIMIT} more characters of log]"
        raise BuildError(
            f"{what} failed (exit {result.returncode}):\n$ {shlex.join(command)}\n{log}"
        )


def _runtime_object(plan: BuildPlan, cache: Path) -> Path:
    """The compiled runtime.cpp for these flags, built once and shared by all modules."""
    digest = hashlib.sha256()
    for part in (
        _FORMAT_VERSION,
        compiler_identity() or "",
        "\0".join(plan.runtime_flags),
        (SHIM_DIR / "runtime.cpp").read_text(encoding="utf-8"),
        (SHIM_DIR / "runtime.h").read_text(encoding="utf-8"),
    ):
        digest.update(part.encode() + b"\0")
    target = cache / f"runtime-{digest.hexdigest()[:32]}.o"
    if target.exists():
        return target
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
    try:
        command = [
            *plan.compiler,
            *plan.runtime_flags,
            "-c",
            str(SHIM_DIR / "runtime.cpp"),
            "-o",
            "rnnemu_runtime.o",
        ]
        _run(command, "compiling the emulator runtime", work)
        os.replace(work / "rnnemu_runtime.o", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def build(plan: BuildPlan, target: Path) -> None:
    """Compiles and links `plan` into `target` (atomically renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    runtime = _runtime_object(plan, target.parent)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        unit = work / "rnnemu_kernels.cpp"
        unit.write_text(plan.translation_unit, encoding="utf-8")
        (work / "rnnemu_shared.ld").write_text(_LINKER_SCRIPT, encoding="utf-8")
        compile_kernels = [
            *plan.compiler,
            *plan.compile_flags,
            "-c",
            str(unit),
            "-o",
            _KERNELS_OBJECT,
        ]
        _run(compile_kernels, "compiling the kernels for the emulator", work)
        partial = work / "module.so"
        link = [
            *plan.compiler,
            *plan.link_flags,
            "-o",
            str(partial),
            _KERNELS_OBJECT,
            str(runtime),
            "-Wl,-T,rnnemu_shared.ld",
        ]
        _run(link, "linking the emulator module", work)
        os.replace(partial, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_sources(sources: Iterable[os.PathLike | str]) -> list[Path | str]:
    """Paths become absolute Paths; a string with a newline is the text of a source."""
    resolved: list[Path | str] = []
    for source in sources:
        if isinstance(source, str) and "\n" in source:
            resolved.append(source)
            continue
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"emulator source {str(source)!r} does not exist")
        resolved.append(path)
    return resolved


def resolve_folders(folders: Iterable[os.PathLike | str]) -> list[Path]:
    return [Path(folder).expanduser().resolve() for folder in folders]
