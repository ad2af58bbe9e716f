"""CPU emulator for the rnnkernels CUDA sources: a debugging aid, slow and exact.

It compiles the unchanged ``csrc/*.cu`` files with the system C++ compiler against a
small shim (``cuda_emulator.h``) and runs every CUDA thread as a fiber on the CPU, so
all kernels run in CI on machines without a GPU. It is *exact* about what CUDA makes
explicit (barriers, warp exchanges, atomics, grid sync) and hostile where CUDA leaves
things undefined: threads run between synchronisation points in a seeded random order,
shared memory starts as 0xFF bytes (NaN), an AddressSanitizer build catches
out-of-bounds accesses, and a deadlock raises instead of hanging. README.md beside this
file documents what is exact, what is approximate, and which paths are GPU-only.

    from rnnkernels import emulator
    module = emulator.load_module([source_path("my_kernels.cu")],
                                  ["scale", "tiled_sum<32, true>"],
                                  include_dirs=[csrc_dir()])
    kernel = module.get_function("tiled_sum<32, true>")
    kernel(grid, block, (x, out, np.int32(n), None), shared_mem=0)

Arguments follow CuPy's ``RawKernel``: NumPy arrays become pointers to their first
element, NumPy scalars are passed by value with their exact type, ``None`` is a null
pointer.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import _build

__all__ = [
    "EmulatorError",
    "EmulatedKernel",
    "EmulatedModule",
    "asan_runtime",
    "compiler_available",
    "load_module",
]

DEFAULT_SEED = 0
SEED_ENVIRONMENT_VARIABLE = "RNNKERNELS_EMULATOR_SEED"
# Read by runtime.cpp at every launch: unset or "flush" flushes float32 denormals to zero
# as the GPU does under CuPy's -ftz=true (the default); "keep" keeps IEEE denormals.
DENORMALS_ENVIRONMENT_VARIABLE = "RNNKERNELS_EMULATOR_DENORMALS"
# memory_model: "sequential" (every load sees the latest store: a missing fence passes)
# or "stale" (GPU-like weak ordering: each block reads its own stale view of the array
# arguments unless it reads through L2 after a fence; README.md, "Memory ordering").
MEMORY_MODELS = ("sequential", "stale")
MEMORY_ENVIRONMENT_VARIABLE = "RNNKERNELS_EMULATOR_MEMORY"
_ERROR_BUFFER_BYTES = 8192


class EmulatorError(RuntimeError):
    """The emulator could not build or run a kernel: compile failure (with the compiler's
    log), bad launch configuration or arguments, deadlock, a warp exchange whose mask is
    wrong, ``__trap()``."""


def compiler_available() -> bool:
    """Whether a usable C++ compiler (``$CXX``, else ``g++``) is on PATH."""
    return _build.compiler_identity() is not None


def asan_runtime() -> str | None:
    """Path of the compiler's AddressSanitizer runtime (``libasan.so``), or None.

    ``load_module(..., sanitize=True)`` needs it loaded before anything else in the
    process: run Python with ``LD_PRELOAD=<this path> ASAN_OPTIONS=detect_leaks=0``."""
    return _build.asan_runtime()


def _asan_loaded() -> bool:
    return hasattr(ctypes.CDLL(None), "__asan_init")


class _KernelInfo(ctypes.Structure):
    # Mirrors rnnemu::KernelInfo in runtime.h.
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("kernel", ctypes.c_void_p),
        ("invoke", ctypes.c_void_p),
        ("param_count", ctypes.c_int),
        ("param_codes", ctypes.c_char_p),
        ("param_sizes", ctypes.POINTER(ctypes.c_ubyte)),
    ]


def _normalise_expression(expression: str) -> str:
    """``"k<32, 4>"`` and ``"k<32,4>"`` name the same kernel."""
    text = re.sub(r"\s+", " ", expression.strip())
    return re.sub(r"\s*([<>,()*&:\[\]])\s*", r"\1", text)


class EmulatedModule:
    """A compiled emulator library; ``get_function`` returns its kernels."""

    def __init__(self, path: Path, name_expressions: Sequence[str], sanitize: bool):
        self.path = path
        self.sanitize = sanitize
        self._library = ctypes.CDLL(str(path))
        launch = self._library.rnnemu_launch
        launch.restype = ctypes.c_int
        launch.argtypes = [
            ctypes.c_void_p,  # kernel info
            ctypes.POINTER(ctypes.c_uint),  # grid[3]
            ctypes.POINTER(ctypes.c_uint),  # block[3]
            ctypes.c_ulonglong,  # dynamic shared memory bytes
            ctypes.c_int,  # cooperative
            ctypes.c_ulonglong,  # seed
            ctypes.c_int,  # argument count
            ctypes.c_void_p,  # void** args
            ctypes.c_char_p,  # argument type codes
            ctypes.POINTER(ctypes.c_uint),  # argument sizes
            ctypes.c_char_p,  # error buffer
            ctypes.c_ulong,  # its size
        ]
        self._launch = launch  # runtime.cpp serialises launches of one module
        set_memory = self._library.rnnemu_set_memory_model
        set_memory.restype = None
        set_memory.argtypes = [
            ctypes.c_int,  # stale
            ctypes.c_int,  # region count
            ctypes.POINTER(ctypes.c_ulonglong),  # addresses
            ctypes.POINTER(ctypes.c_ulonglong),  # sizes
        ]
        self._set_memory_model = set_memory
        view_switches = self._library.rnnemu_view_switches
        view_switches.restype = ctypes.c_ulonglong
        self._view_switches = view_switches
        # rnnemu_set_memory_model configures the next launch: the pair must not interleave
        # with another thread's launch of this module.
        self._launch_lock = threading.Lock()
        static_bytes = self._library.rnnemu_static_shared_bytes
        static_bytes.restype = ctypes.c_ulonglong
        self.static_shared_bytes = int(static_bytes())
        self._kernels: dict[str, EmulatedKernel] = {}
        for i, expression in enumerate(name_expressions):
            entry = getattr(self._library, f"rnnemu_kernel_{i}")
            entry.restype = ctypes.POINTER(_KernelInfo)
            info = entry()
            self._kernels[_normalise_expression(expression)] = EmulatedKernel(
                self, expression, ctypes.cast(info, ctypes.c_void_p).value, info.contents
            )

    def get_function(self, name_expression: str) -> "EmulatedKernel":
        """The kernel compiled for `name_expression` (spacing does not matter)."""
        try:
            return self._kernels[_normalise_expression(name_expression)]
        except KeyError:
            known = ", ".join(k.name_expression for k in self._kernels.values())
            raise EmulatorError(
                f"{name_expression!r} was not among the name expressions of this module "
                f"({known})"
            ) from None

    @property
    def last_view_switches(self) -> int:
        """How often the last launch of this module put a block's view of the array
        arguments into host memory (a block switch in a cooperative launch, a block start
        in a normal one; each copies the arrays once or twice): the stale model's cost,
        0 for a sequentially consistent launch."""
        return int(self._view_switches())

    def __repr__(self) -> str:
        names = ", ".join(k.name_expression for k in self._kernels.values())
        return f"<EmulatedModule {self.path.name} [{names}]>"


# NumPy scalar (kind, itemsize) -> (ctypes type, type code); the codes match runtime.h.
_SCALAR_TYPES = {
    ("i", 4): (ctypes.c_int32, b"i"),
    ("u", 4): (ctypes.c_uint32, b"u"),
    ("i", 8): (ctypes.c_int64, b"i"),
    ("u", 8): (ctypes.c_uint64, b"u"),
    ("f", 4): (ctypes.c_float, b"f"),
    ("f", 8): (ctypes.c_double, b"f"),
    ("b", 1): (ctypes.c_bool, b"b"),
}


def classify_arguments(args, kernel_name: str) -> list[tuple[str, object]]:
    """("array", ndarray), ("null", None) or ("scalar", numpy scalar) per argument;
    TypeError naming the argument for anything else."""
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple, got {type(args).__name__}")
    classified: list[tuple[str, object]] = []
    for i, arg in enumerate(args):
        if isinstance(arg, np.ndarray):
            classified.append(("array", arg))
        elif arg is None:
            classified.append(("null", None))
        elif isinstance(arg, np.generic) and (arg.dtype.kind, arg.dtype.itemsize) in _SCALAR_TYPES:
            classified.append(("scalar", arg))
        else:
            hint = ""
            if isinstance(arg, (bool, int, float)):
                hint = "; wrap Python numbers in a NumPy scalar such as numpy.int32(...)"
            elif type(arg).__module__.startswith("cupy"):
                hint = "; the emulator runs on NumPy arrays, not CuPy arrays"
            raise TypeError(
                f"argument {i} of {kernel_name}: cannot pass "
                f"{type(arg).__module__}.{type(arg).__qualname__} to a kernel (NumPy "
                f"arrays, NumPy scalars of int32, uint32, int64, uint64, float32, "
                f"float64 or bool, and None are accepted){hint}"
            )
    return classified


def _launch_dims(value, what: str) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        dims = (int(value),)
    elif (
        isinstance(value, (tuple, list))
        and 1 <= len(value) <= 3
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        dims = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    dims = dims + (1,) * (3 - len(dims))
    if any(d < 1 or d >= 2**32 for d in dims):
        raise EmulatorError(f"invalid launch configuration: {what} {dims} (each must be >= 1)")
    return dims  # type: ignore[return-value]


def check_launch(grid, block, shared_mem) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    grid3 = _launch_dims(grid, "grid")
    block3 = _launch_dims(block, "block")
    if not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
        raise EmulatorError(f"shared_mem must be a non-negative int, got {shared_mem!r}")
    return grid3, block3


def memory_model_for(memory_model, cooperative: bool) -> str:
    """The memory model a launch runs in: ``memory_model`` if given, else
    ``$RNNKERNELS_EMULATOR_MEMORY``, else "stale" for cooperative launches (the only ones
    whose blocks can wait for each other) and "sequential" for normal ones."""
    if memory_model is None:
        text = os.environ.get(MEMORY_ENVIRONMENT_VARIABLE, "").strip()
        if not text:
            return "stale" if cooperative else "sequential"
        if text not in MEMORY_MODELS:
            raise EmulatorError(
                f"{MEMORY_ENVIRONMENT_VARIABLE}={text!r} is not one of {MEMORY_MODELS}"
            )
        return text
    if memory_model not in MEMORY_MODELS:
        raise ValueError(f"memory_model must be one of {MEMORY_MODELS} or None, got {memory_model!r}")
    return memory_model


_byte_bounds = getattr(getattr(np.lib, "array_utils", None), "byte_bounds", None) or np.byte_bounds  # NumPy 1


def array_allocation(array: np.ndarray) -> tuple[int, int]:
    """(address, bytes) of the memory behind ``array``: the extent of the outermost NumPy
    array it is a view of, since a kernel may reach past a view into its base."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    low, high = _byte_bounds(array)
    return low, high - low


def _seed(seed) -> int:
    if seed is None:
        text = os.environ.get(SEED_ENVIRONMENT_VARIABLE, "").strip()
        if not text:
            return DEFAULT_SEED
        try:
            seed = int(text, 0)
        except ValueError:
            raise EmulatorError(
                f"{SEED_ENVIRONMENT_VARIABLE}={text!r} is not an integer"
            ) from None
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    return int(seed) & (2**64 - 1)


class EmulatedKernel:
    """One kernel of an :class:`EmulatedModule`; call it like CuPy's ``RawKernel``."""

    def __init__(self, module: EmulatedModule, name_expression: str, address: int, info):
        self.module = module
        self.name_expression = name_expression
        self._address = address
        self.param_count = int(info.param_count)
        self.param_codes = info.param_codes.decode()

    def __call__(self, grid, block, args, *, shared_mem=0, cooperative=False, seed=None,
                 memory_model=None) -> None:
        """Runs the kernel to completion on the CPU.

        grid, block: an int or a tuple of up to 3 ints. args: a tuple; each item is a
        NumPy array (pointer to its first element), a NumPy scalar (by value, exact type)
        or None (null pointer). shared_mem: bytes of dynamic shared memory, see
        ``emulator_dynamic_shared_memory()``. cooperative: run all blocks together so
        that grid sync works. seed: the scheduling seed; None means
        ``$RNNKERNELS_EMULATOR_SEED`` or 0, so runs are reproducible. memory_model:
        "sequential" or "stale" (see :func:`memory_model_for` for the default); in
        "stale" the array arguments' allocations get a GPU's weak memory ordering.
        """
        grid3, block3 = check_launch(grid, block, shared_mem)
        stale = memory_model_for(memory_model, bool(cooperative)) == "stale"
        count = len(args)
        holders = []
        pointers = (ctypes.c_void_p * max(count, 1))()
        sizes = (ctypes.c_uint * max(count, 1))()
        codes = bytearray()
        regions = []
        for i, (kind, value) in enumerate(classify_arguments(args, self.name_expression)):
            if kind == "array":
                if stale:
                    regions.append(array_allocation(value))
                holder = ctypes.c_void_p(value.__array_interface__["data"][0])
                code = b"p"
            elif kind == "null":
                holder = ctypes.c_void_p(None)
                code = b"p"
            else:
                ctype, code = _SCALAR_TYPES[(value.dtype.kind, value.dtype.itemsize)]
                holder = ctype(value.item())
            holders.append(holder)
            pointers[i] = ctypes.addressof(holder)
            sizes[i] = ctypes.sizeof(holder)
            codes += code
        error = ctypes.create_string_buffer(_ERROR_BUFFER_BYTES)
        scheduling_seed = _seed(seed)
        with self.module._launch_lock:
            self.module._set_memory_model(
                1 if stale else 0,
                len(regions),
                (ctypes.c_ulonglong * max(len(regions), 1))(*(address for address, _ in regions)),
                (ctypes.c_ulonglong * max(len(regions), 1))(*(size for _, size in regions)),
            )
            status = self.module._launch(
                self._address,
                (ctypes.c_uint * 3)(*grid3),
                (ctypes.c_uint * 3)(*block3),
                int(shared_mem),
                1 if cooperative else 0,
                scheduling_seed,
                count,
                ctypes.cast(pointers, ctypes.c_void_p),
                bytes(codes),
                sizes,
                error,
                _ERROR_BUFFER_BYTES,
            )
        if status != 0:
            raise EmulatorError(error.value.decode(errors="replace"))

    def __repr__(self) -> str:
        return f"<EmulatedKernel {self.name_expression} ({self.param_count} parameters)>"


_modules: dict[str, EmulatedModule] = {}
_modules_lock = threading.Lock()


def load_module(
    sources: Sequence[os.PathLike | str],
    name_expressions: Sequence[str],
    *,
    include_dirs: Sequence[os.PathLike | str] = (),
    defines: Mapping[str, object] | None = None,
    sanitize: bool = False,
) -> EmulatedModule:
    """Compiles `sources` for the emulator (or takes them from the cache) and loads them.

    sources: paths of ``.cu`` files, included in order into one translation unit; a
    string that contains a newline is taken as the text of a source instead (as
    ``_sources.read_source`` returns it), and its quoted includes come from
    include_dirs.
    name_expressions: kernels to export, e.g. ``"my_kernel"`` or
    ``"lstm_forward_step<32, 4, true>"`` (evaluated in the global namespace, as NVRTC
    does). include_dirs: extra ``-I`` folders. defines: ``{"NAME": value}`` passed as
    ``-DNAME=value`` (``None`` for a bare ``-DNAME``). sanitize: build with
    AddressSanitizer. Where the process was started with the ASan runtime preloaded
    (see :func:`asan_runtime`) the kernels run in it; elsewhere each launch runs in a
    helper process that has it, on copies of the arrays' memory that are copied back,
    and an ASan report becomes an EmulatorError.

    Modules are memoised per process and cached on disk by a hash of the shim, every
    source and header beside it, the name expressions, the flags and the compiler.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if isinstance(name_expressions, str):
        name_expressions = [name_expressions]
    if not name_expressions:
        raise EmulatorError("load_module needs at least one name expression")
    if not compiler_available():
        raise EmulatorError(
            "the CPU emulator needs a C++ compiler: none found as $CXX or g++ on PATH"
        )
    in_helper_process = sanitize and not _asan_loaded()
    if in_helper_process and asan_runtime() is None:
        raise EmulatorError(
            "sanitize=True needs AddressSanitizer, but the C++ compiler has no libasan.so"
        )
    plan = _build.BuildPlan(
        _build.resolve_sources(sources),
        [str(e) for e in name_expressions],
        _build.resolve_folders(include_dirs),
        dict(defines or {}),
        bool(sanitize),
    )
    key = plan.key() + ("-asan" if sanitize else "")
    with _modules_lock:
        module = _modules.get(key)
        if module is not None:
            return module
        target = _build.cache_dir() / f"{key}.so"
        if not target.exists():
            try:
                _build.build(plan, target)
            except _build.BuildError as error:
                raise EmulatorError(str(error)) from None
        if in_helper_process:
            from . import _sanitizer

            module = _sanitizer.SanitizedModule(
                target,
                [str(s) if isinstance(s, Path) else s for s in plan.sources],
                plan.name_expressions,
                [str(d) for d in plan.include_dirs],
                dict(defines or {}),
            )
        else:
            module = EmulatedModule(target, plan.name_expressions, plan.sanitize)
        _modules[key] = module
        return module
