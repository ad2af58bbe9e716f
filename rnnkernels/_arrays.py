"""Array interchange: accept NumPy, CuPy, PyTorch and any DLPack or CUDA-array-interface
array, hand backends NumPy (host) or CuPy (device) arrays, and give results back as the
kind of array that came in. Host arrays are viewed, never copied, when already
contiguous; device arrays cross by DLPack or the CUDA array interface, zero-copy.

CuPy and torch are imported only when an input is one of theirs (or a CUDA backend is
asked for), so ``import rnnkernels`` stays light on machines that have neither.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

_KDL_CPU = 1
_KDL_CUDA = 2
_KDL_CUDA_HOST = 3
_KDL_CUDA_MANAGED = 13


def _module_of(obj) -> str:
    return type(obj).__module__.split(".", 1)[0]


def _is_torch_tensor(obj) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _is_cupy_array(obj) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(obj, cupy.ndarray)


def import_cupy():
    """CuPy, or a RuntimeError that says what to install."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "this needs CuPy for GPU arrays; install it with "
            "`pip install rnnkernels[cuda13]` (CUDA 13) or `rnnkernels[cuda12]` (CUDA 12)"
        ) from exc
    return cupy


@dataclass(frozen=True)
class Kind:
    """Where an input array lives and which library made it, so that results can be
    returned the same way."""

    library: str  # "numpy", "cupy", "torch" or the top-level module of a DLPack array
    device: str  # "cpu" or "cuda"
    torch_device: Any = None  # the torch.device of a torch input


def array_kind(obj, name: str) -> Kind:
    """The :class:`Kind` of ``obj``; a TypeError naming ``name`` if it is not an array."""
    if isinstance(obj, np.ndarray):
        return Kind("numpy", "cpu")
    if _is_cupy_array(obj):
        return Kind("cupy", "cuda")
    if _is_torch_tensor(obj):
        if obj.device.type not in ("cpu", "cuda"):
            # meta, mps, xla, ...: torch's own error ("can't convert meta device type
            # tensor to numpy") would come later and name no argument.
            raise TypeError(
                f"{name} is a torch tensor on device {obj.device.type!r}; rnnkernels takes "
                "CPU and CUDA tensors"
            )
        return Kind("torch", obj.device.type, obj.device)
    if hasattr(obj, "__cuda_array_interface__"):
        return Kind(_module_of(obj), "cuda")
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        device_type = int(obj.__dlpack_device__()[0])
        if device_type == _KDL_CPU:
            return Kind(_module_of(obj), "cpu")
        if device_type in (_KDL_CUDA, _KDL_CUDA_HOST, _KDL_CUDA_MANAGED):
            return Kind(_module_of(obj), "cuda")
        raise TypeError(
            f"{name} lives on DLPack device type {device_type}; rnnkernels takes host "
            "(CPU) and CUDA arrays"
        )
    got = "None" if obj is None else type(obj).__name__
    raise TypeError(
        f"{name} must be an array (NumPy, CuPy, a PyTorch tensor, or any object with "
        f"__dlpack__ or __cuda_array_interface__), got {got}"
    )


def array_dtype(obj) -> np.dtype | None:
    """The NumPy dtype of an input array, or None for a dtype NumPy does not have
    (torch.bfloat16, for example)."""
    if _is_torch_tensor(obj):
        try:
            return np.dtype(dtype_name(obj))
        except TypeError:
            return None
    try:
        return np.dtype(obj.dtype)
    except (TypeError, AttributeError):
        return None


def dtype_name(obj) -> str:
    """A readable dtype name for error messages."""
    return str(getattr(obj, "dtype", type(obj).__name__)).removeprefix("torch.")


def to_backend(obj, device: str):
    """``obj`` as a C-contiguous NumPy (device "cpu") or CuPy (device "cuda") array,
    without a copy where the memory and layout already fit."""
    kind = array_kind(obj, "array")
    if device == "cpu":
        if kind.library == "torch":
            obj = obj.detach()
            obj = obj.cpu() if kind.device == "cuda" else obj
            return np.ascontiguousarray(obj.numpy())
        if kind.device == "cuda":
            cupy = import_cupy()
            return np.ascontiguousarray(cupy.asnumpy(_as_cupy(obj, cupy)))
        if isinstance(obj, np.ndarray):
            if not obj.dtype.isnative:  # ">f4" on x86: Numba (and CuPy) take native order only
                return np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("="))
            return np.ascontiguousarray(obj)
        return np.ascontiguousarray(np.from_dlpack(obj))
    cupy = import_cupy()
    if kind.device == "cpu":
        host = to_backend(obj, "cpu")
        return cupy.asarray(host)
    return cupy.ascontiguousarray(_as_cupy(obj, cupy))


def _as_cupy(obj, cupy):
    if isinstance(obj, cupy.ndarray):
        return obj
    if _is_torch_tensor(obj):
        return cupy.from_dlpack(obj.detach())
    if hasattr(obj, "__cuda_array_interface__"):
        return cupy.asarray(obj)
    return cupy.from_dlpack(obj)


def from_backend(arr, kind: Kind):
    """A backend result (NumPy or CuPy array) as the kind of array ``kind`` describes."""
    if arr is None:
        return None
    on_device = not isinstance(arr, np.ndarray)
    if kind.library == "torch":
        torch = sys.modules["torch"]
        tensor = torch.from_dlpack(arr) if on_device else torch.from_numpy(arr)
        return tensor.to(kind.torch_device)
    if kind.device == "cpu":
        host = import_cupy().asnumpy(arr) if on_device else arr
        if kind.library == "numpy":
            return host
        return _library_from_dlpack(kind.library, host)
    device_arr = arr if on_device else import_cupy().asarray(arr)
    if kind.library == "cupy":
        return device_arr
    return _library_from_dlpack(kind.library, device_arr)


def cupy_stream_of_torch(cupy, torch_stream, device_index: int):
    """torch's CUDA stream ``torch_stream`` (on GPU ``device_index``) as a CuPy stream.

    CuPy 14 deprecates ``cupy.cuda.ExternalStream`` (a DeprecationWarning on every
    call) in favour of ``Stream.from_external``, which reads the CUDA stream protocol
    (``__cuda_stream__``, on torch streams since torch 2.6 or so); older CuPy or torch
    get ``ExternalStream`` with the device named, so CuPy never guesses it."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None and hasattr(torch_stream, "__cuda_stream__"):
        return from_external(torch_stream)
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, device_id=device_index)


@contextlib.contextmanager
def cuda_scope(device_index: int | None, torch_stream: bool):
    """CuPy's current device set to ``device_index`` (unchanged when None) and, with
    ``torch_stream``, torch's current stream of that device made CuPy's current stream.

    Inside it every CuPy allocation and launch lands on the GPU that holds the inputs
    (zeros for a missing state, the bias sum, the kernels), and for torch tensors runs
    on the stream torch is using, so that torch's caching allocator, which only knows
    its own streams, never hands out an input's memory while our kernels still read it.
    """
    if device_index is None:
        yield
        return
    cupy = import_cupy()
    with cupy.cuda.Device(device_index):
        if not torch_stream:
            yield
            return
        torch = sys.modules["torch"]
        with cupy_stream_of_torch(cupy, torch.cuda.current_stream(device_index), device_index):
            yield


def cuda_placement(obj) -> tuple[int | None, bool]:
    """``(device_index, torch_stream)`` for :func:`cuda_scope` from an input array:
    the GPU it lives on (None for host arrays, or when the object does not say) and
    whether it is a torch tensor."""
    kind = array_kind(obj, "array")
    if kind.device != "cuda":
        return None, False
    if kind.library == "torch":
        return obj.device.index, True
    if _is_cupy_array(obj):
        return obj.device.id, False
    if hasattr(obj, "__dlpack_device__"):
        return int(obj.__dlpack_device__()[1]), False
    return None, False


# Libraries whose array type lives in a module other than the one that imports it:
# a JAX array's type is ``jaxlib._jax.ArrayImpl`` (``jaxlib.xla_extension`` in older
# releases), but ``from_dlpack`` is ``jax.numpy.from_dlpack``.
_FROM_DLPACK_HOME = {"jaxlib": "jax"}


def _library_from_dlpack(library: str, arr):
    """Hand ``arr`` to ``library`` through its ``from_dlpack`` (jax.numpy, torch, ...);
    the array itself when the library has none."""
    library = _FROM_DLPACK_HOME.get(library, library)
    for module_name in (library, f"{library}.numpy"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        from_dlpack = getattr(module, "from_dlpack", None)
        if from_dlpack is not None:
            return from_dlpack(arr)
    return arr
