"""AddressSanitizer launches from a process that was not started with ASan.

An ASan-instrumented library can only be loaded into a process whose first library is
the ASan runtime (``LD_PRELOAD``). Where that is not the case, ``load_module(...,
sanitize=True)`` returns a :class:`SanitizedModule`: each launch is sent to one helper
Python process started with the runtime preloaded, which runs the kernel in-process
there (``python -m rnnkernels.emulator._sanitizer``).

Memory. For every array argument the whole allocation it views (its base array's
bytes) is copied to a fresh heap buffer of exactly that size in the helper, so ASan's
redzones sit where they sit in this process; views keep their offsets, so two
arguments that view one workspace still alias. After the launch the buffers come back
and are copied into the writable arrays. An ASan report ends the helper; its text
becomes the EmulatorError, and the next launch starts a new helper.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from . import (
    EmulatorError,
    _build,
    check_launch,
    classify_arguments,
)

_PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent
_REPORT_CHARACTERS = 6000


# ---------------------------------------------------------------------- messages
def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


# ---------------------------------------------------------------------- memory
def _extent(array: np.ndarray) -> tuple[int, int]:
    """[low, high) byte addresses an array's elements occupy."""
    start = array.__array_interface__["data"][0]
    if array.size == 0:
        return start, start
    low = high = start
    for extent, stride in zip(array.shape, array.strides):
        reach = (extent - 1) * stride
        low += min(reach, 0)
        high += max(reach, 0)
    return low, high + array.itemsize


def _allocation(array: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root, _extent(root)


class _Regions:
    """Merged byte ranges of the allocations the array arguments view."""

    def __init__(self, arrays: list[np.ndarray]):
        spans = []
        for array in arrays:
            root, (low, high) = _allocation(array)
            spans.append((low, high, bool(root.flags.writeable)))
        spans.sort()
        self.regions: list[list] = []  # [low, high, writable]
        for low, high, writable in spans:
            if self.regions and low <= self.regions[-1][1]:
                last = self.regions[-1]
                last[1] = max(last[1], high)
                last[2] = last[2] and writable
            else:
                self.regions.append([low, high, writable])

    def locate(self, address: int) -> tuple[int, int]:
        for index, (low, high, _) in enumerate(self.regions):
            if low <= address <= high:
                return index, address - low
        raise AssertionError("an array argument outside every region")  # cannot happen

    def contents(self) -> list[bytes]:
        return [ctypes.string_at(low, high - low) for low, high, _ in self.regions]

    def write_back(self, contents: list[bytes], before: list[bytes]) -> None:
        for (low, high, writable), new, old in zip(self.regions, contents, before):
            if writable and new != old:
                ctypes.memmove(low, new, high - low)


# ---------------------------------------------------------------------- the helper process
class _Helper:
    def __init__(self) -> None:
        libasan = _build.asan_runtime()
        if libasan is None:
            raise EmulatorError(
                "sanitize=True needs AddressSanitizer (libasan.so) from the compiler"
            )
        env = dict(os.environ)
        env["LD_PRELOAD"] = " ".join(p for p in (libasan, env.get("LD_PRELOAD", "")) if p)
        env["ASAN_OPTIONS"] = ":".join(
            p for p in ("detect_leaks=0", env.get("ASAN_OPTIONS", "")) if p
        )
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p
        )
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rnnkernels.emulator._sanitizer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def request(self, message):
        position = self.log.tell()
        try:
            _send(self.process.stdin, message)
            reply = _receive(self.process.stdout)
        except (BrokenPipeError, OSError):
            reply = None
        if reply is not None:
            return reply
        self.process.wait()
        self.log.seek(position)
        text = self.log.read().decode(errors="replace")
        start = text.find("ERROR: AddressSanitizer")
        report = text[max(start - 40, 0) if start >= 0 else 0 :][:_REPORT_CHARACTERS]
        raise EmulatorError(
            f"AddressSanitizer stopped the kernel (helper process exit "
            f"{self.process.returncode}):\n{report.strip()}"
        )

    def close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:  # the helper died with data unread
                pass
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


_helper: _Helper | None = None
_helper_lock = threading.Lock()


@atexit.register
def _close_helper() -> None:
    if _helper is not None:
        try:
            _helper.close()
        except (OSError, subprocess.SubprocessError):
            pass


def _request(message):
    global _helper
    with _helper_lock:
        if _helper is None or not _helper.alive():
            if _helper is not None:
                _helper.close()
            _helper = _Helper()
        return _helper.request(message)


# ---------------------------------------------------------------------- public side
class SanitizedModule:
    """Like EmulatedModule; the kernels run in the ASan helper process."""

    def __init__(self, path, sources, name_expressions, include_dirs, defines):
        self.path = path
        self.sanitize = True
        self.spec = (list(sources), list(name_expressions), list(include_dirs), dict(defines))
        self._names = {e: SanitizedKernel(self, e) for e in name_expressions}

    def get_function(self, name_expression: str) -> "SanitizedKernel":
        from . import _normalise_expression

        for expression, kernel in self._names.items():
            if _normalise_expression(expression) == _normalise_expression(name_expression):
                return kernel
        raise EmulatorError(
            f"{name_expression!r} was not among the name expressions of this module "
            f"({', '.join(self._names)})"
        )

    def __repr__(self) -> str:
        return f"<SanitizedModule {self.path.name} [{', '.join(self._names)}]>"


class SanitizedKernel:
    def __init__(self, module: SanitizedModule, name_expression: str):
        self.module = module
        self.name_expression = name_expression

    def __call__(self, grid, block, args, *, shared_mem=0, cooperative=False, seed=None) -> None:
        check_launch(grid, block, shared_mem)
        classified = classify_arguments(args, self.name_expression)
        arrays = [value for kind, value in classified if kind == "array"]
        regions = _Regions(arrays)
        specs = []
        for kind, value in classified:
            if kind == "array":
                specs.append(("array", *regions.locate(value.__array_interface__["data"][0])))
            elif kind == "null":
                specs.append(("null",))
            else:
                specs.append(("scalar", value))
        before = regions.contents()
        reply = _request(
            (
                "launch",
                self.module.spec,
                self.name_expression,
                dict(grid=grid, block=block, shared_mem=int(shared_mem),
                     cooperative=bool(cooperative), seed=seed),
                before,
                specs,
            )
        )
        if reply[0] == "error":
            _, kind, message = reply
            raise {"TypeError": TypeError, "FileNotFoundError": FileNotFoundError}.get(
                kind, EmulatorError
            )(message)
        regions.write_back(reply[1], before)

    def __repr__(self) -> str:
        return f"<SanitizedKernel {self.name_expression} (AddressSanitizer helper process)>"


# ---------------------------------------------------------------------- helper main
def _serve() -> None:
    from . import load_module

    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # printf from kernels goes to the log, not into the reply stream
    while True:
        message = _receive(requests)
        if message is None:
            return
        _, (sources, names, include_dirs, defines), name, launch, contents, specs = message
        try:
            module = load_module(
                sources, names, include_dirs=include_dirs, defines=defines, sanitize=True
            )
            # Exactly-sized heap buffers, so ASan's redzones border each allocation.
            buffers = []
            for data in contents:
                buffer = np.empty(len(data), np.uint8)
                buffer[:] = np.frombuffer(data, np.uint8)
                buffers.append(buffer)
            args = []
            for spec in specs:
                if spec[0] == "array":
                    buffer = buffers[spec[1]]
                    args.append(np.ndarray((0,), np.uint8, buffer=buffer, offset=spec[2]))
                elif spec[0] == "null":
                    args.append(None)
                else:
                    args.append(spec[1])
            module.get_function(name)(launch["grid"], launch["block"], tuple(args),
                                      shared_mem=launch["shared_mem"],
                                      cooperative=launch["cooperative"], seed=launch["seed"])
            _send(replies, ("ok", [buffer.tobytes() for buffer in buffers]))
        except Exception as error:  # reported to the caller, who raises it
            _send(replies, ("error", type(error).__name__, str(error)))


if __name__ == "__main__":
    _serve()
