"""Where the shipped CUDA sources are, and how their text is handed to a compiler.

An installed wheel carries ``csrc/`` as ``rnnkernels/csrc/``; a source checkout has it
at the top of the repository. Both the NVRTC loader and the CPU emulator read kernels
through this module, so they always compile the same text.
"""

from __future__ import annotations

import functools
import hashlib
import os
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


# ------------------------------------------------------------- NVIDIA's device headers
# The kernels include NVIDIA's own device headers (cuda_fp16.h for __half; kernels of
# later work may add cooperative_groups.h and libcu++'s <cuda/atomic>) when NVRTC
# compiles them. NVRTC ships none of them, and CuPy only adds a CUDA toolkit's include
# folder when it finds a toolkit, so rnnkernels finds them itself: first in the pip
# wheels its cuda extras install, then in a toolkit. The CPU emulator never uses these
# folders: its stand-ins for the same headers are in rnnkernels/emulator/include/.
# CuPy puts the folders of its own bundled CCCL before any option of ours, so under CuPy
# <nv/target> and <cuda/atomic> resolve to CuPy's copy first and ours is the fallback;
# the NVRTC check compiles with CuPy's list, so it sees the same order.

# What a folder pair must hold to be used: the device headers (cuda_fp16.h includes
# vector_types.h; cuda_bf16.h and cooperative_groups.h sit beside them) and libcu++
# (cuda_fp16.h includes <nv/target>, cooperative_groups.h includes <cuda/atomic>).
# mma.h (crt/mma.h) is not required: no kernel uses it yet.
DEVICE_HEADERS = ("cuda_fp16.h", "cuda_bf16.h", "vector_types.h", "cooperative_groups.h")
LIBCUDACXX_HEADERS = ("nv/target", "cuda/atomic")

CUDA_HEADER_PACKAGES = {
    "cuda13": ("nvidia-cuda-runtime", "nvidia-cuda-crt", "nvidia-cuda-cccl"),
    "cuda12": ("nvidia-cuda-runtime-cu12", "nvidia-cuda-cccl-cu12"),
}
_DEFAULT_TOOLKIT = Path("/usr/local/cuda")


def _wheel_roots() -> list[Path]:
    """The folders of the ``nvidia`` namespace package the NVIDIA wheels install into
    (one per site-packages that has it), without importing anything from them."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def cuda_header_candidates(wheel_roots=None, environ=None, default_toolkit=_DEFAULT_TOOLKIT):
    """The (label, device header folder, libcu++ folders) places searched, in order:

    1. pip wheels, CUDA 13 layout: ``nvidia/cu13/include`` with libcu++ in its
       ``cccl/`` (nvidia-cuda-runtime, nvidia-cuda-crt, nvidia-cuda-cccl);
    2. pip wheels, CUDA 12 layout: ``nvidia/cuda_runtime/include`` with libcu++ in
       ``nvidia/cuda_cccl/include`` (nvidia-cuda-runtime-cu12, nvidia-cuda-cccl-cu12);
    3. a toolkit at ``$CUDA_PATH``, ``$CUDA_HOME``, then ``/usr/local/cuda``: its
       ``include/`` with libcu++ in ``include/cccl/`` (CUDA 13) or ``include/`` itself
       (CUDA 12).

    The arguments exist for tests: ``wheel_roots`` replaces the ``nvidia`` package
    folders, ``environ`` the environment, ``default_toolkit`` /usr/local/cuda."""
    roots = _wheel_roots() if wheel_roots is None else [Path(r) for r in wheel_roots]
    environ = os.environ if environ is None else environ
    candidates = []
    for root in roots:
        include = root / "cu13" / "include"
        candidates.append((f"pip wheels (CUDA 13) in {root}", include, (include / "cccl",)))
    for root in roots:
        candidates.append(
            (f"pip wheels (CUDA 12) in {root}", root / "cuda_runtime" / "include", (root / "cuda_cccl" / "include",))
        )
    toolkits = [(f"${name}", environ[name]) for name in ("CUDA_PATH", "CUDA_HOME") if environ.get(name)]
    toolkits.append((str(default_toolkit), str(default_toolkit)))
    for label, toolkit in toolkits:
        include = Path(toolkit) / "include"
        candidates.append((f"CUDA toolkit {label} ({toolkit})", include, (include / "cccl", include)))
    return candidates


def find_cuda_include_dirs(wheel_roots=None, environ=None, default_toolkit=_DEFAULT_TOOLKIT) -> tuple[Path, ...]:
    """(device header folder, libcu++ folder) from the first place of
    :func:`cuda_header_candidates` that has every header of :data:`DEVICE_HEADERS` and
    :data:`LIBCUDACXX_HEADERS` (one folder when they coincide, as in a CUDA 12 toolkit).
    Both come from the same place, so the headers always match each other's version.
    Raises FileNotFoundError naming the pip packages to install when no place has them."""
    searched = []
    for label, include, libcudacxx_options in cuda_header_candidates(wheel_roots, environ, default_toolkit):
        missing = [name for name in DEVICE_HEADERS if not (include / name).is_file()]
        libcudacxx = next(
            (folder for folder in libcudacxx_options if all((folder / name).is_file() for name in LIBCUDACXX_HEADERS)),
            None,
        )
        if libcudacxx is None:
            missing += list(LIBCUDACXX_HEADERS)
        if not missing:
            return tuple(dict.fromkeys((include, libcudacxx)))
        searched.append(f"  {label}: {include} lacks {', '.join(missing)}")
    raise FileNotFoundError(
        "rnnkernels' CUDA kernels need NVIDIA's device headers (cuda_fp16.h, libcu++) to compile "
        "with NVRTC, and none were found. Install them with pip install "
        f"{' '.join(CUDA_HEADER_PACKAGES['cuda13'])} (CUDA 13; or "
        f"{' '.join(CUDA_HEADER_PACKAGES['cuda12'])} for CUDA 12), which rnnkernels[cuda13] / "
        "rnnkernels[cuda12] pull in, or point $CUDA_PATH at a CUDA toolkit. Searched:\n" + "\n".join(searched)
    )


@functools.cache
def cuda_include_dirs() -> tuple[Path, ...]:
    """:func:`find_cuda_include_dirs` for this process (searched once)."""
    return find_cuda_include_dirs()
