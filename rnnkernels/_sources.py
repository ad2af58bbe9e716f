"""Where the shipped CUDA sources are, and how their text is handed to a compiler.

An installed wheel carries ``csrc/`` as ``rnnkernels/csrc/``; a source checkout has it
at the top of the repository. Both the NVRTC loader and the CPU emulator read kernels
through this module, so they always compile the same text.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def csrc_dir() -> Path:
    """The folder holding ``lstm_forward.cu`` and its headers."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / "lstm_forward.cu").is_file():
            return candidate
    raise FileNotFoundError(
        "rnnkernels could not find its CUDA sources (csrc/lstm_forward.cu) next to "
        f"{_PACKAGE_DIR}; the installation is incomplete, reinstall rnnkernels"
    )


def source_path(name: str) -> Path:
    """Path of one file in ``csrc/``, e.g. ``source_path("lstm_forward.cu")``."""
    path = csrc_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"no CUDA source {name!r} in {csrc_dir()}")
    return path


def read_source(name: str) -> str:
    """The text of one ``csrc/`` file, prefixed with a ``#line`` directive so that
    compiler messages point at ``csrc/<name>`` rather than at a temporary file."""
    return f'#line 1 "csrc/{name}"\n' + source_path(name).read_text(encoding="utf-8")


@functools.cache
def sources_digest() -> str:
    """A hash of every ``.cu`` and ``.cuh`` file in ``csrc/``. Compile caches key on it,
    so editing a header rebuilds every kernel that could include it."""
    digest = hashlib.sha256()
    for path in sorted(csrc_dir().glob("*.cu*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
