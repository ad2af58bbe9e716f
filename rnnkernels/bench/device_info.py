"""What the results were measured on: the CPU or GPU model, driver and library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from .timing import require_gpu_cupy, require_gpu_torch

PACKAGES = ("rnnkernels", "numpy", "numba", "torch", "cupy-cuda12x", "cupy-cuda13x",
            "matplotlib", "rich", "onnx", "onnxruntime", "flashrnn")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    # A source checkout that is not installed has no metadata; ask the modules.
    for name in ("rnnkernels", "torch"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    return versions


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine skews CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def gpu_present() -> tuple[bool, str]:
    """Whether a GPU is usable here (through CuPy, else PyTorch), and a sentence saying
    why (not): the checks of ``timing.require_gpu_cupy`` and ``require_gpu_torch``."""
    reasons = []
    for library, require in (("CuPy", require_gpu_cupy), ("PyTorch", require_gpu_torch)):
        try:
            require()
        except RuntimeError as error:
            reasons.append(str(error))
        else:
            return True, f"{library} sees a GPU"
    return False, "; ".join(reasons)


def _threads() -> dict[str, int | None]:
    threads: dict[str, int | None] = {"cpu_count": os.cpu_count()}
    try:
        import numba

        threads["numba"] = numba.get_num_threads()
    except ImportError:
        threads["numba"] = None
    try:
        import torch

        threads["torch"] = torch.get_num_threads()
    except ImportError:
        threads["torch"] = None
    return threads


def _gpu() -> dict:
    info: dict = {}
    try:
        import cupy

        device = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(device.id)
        name = props["name"]
        info.update({
            "name": name.decode() if isinstance(name, bytes) else name,
            "compute_capability": device.compute_capability,
            "memory_bytes": int(props["totalGlobalMem"]),
            "l2_cache_bytes": int(device.attributes["L2CacheSize"]),
            "multiprocessors": int(device.attributes["MultiProcessorCount"]),
            "driver_version": cupy.cuda.runtime.driverGetVersion(),
            "cuda_runtime_version": cupy.cuda.runtime.runtimeGetVersion(),
            "cupy": cupy.__version__,
        })
    except Exception as error:
        info["cupy_error"] = f"{type(error).__name__}: {error}"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            info.setdefault("name", props.name)
            info["torch_cuda"] = torch.version.cuda
            info["cudnn_version"] = torch.backends.cudnn.version()
    except ImportError:
        pass
    return info


def device_info(device: str) -> dict:
    """The ``device`` section of the JSON output."""
    info = {
        "kind": device,
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "threads": _threads(),
        "versions": package_versions(),
    }
    if device == "cuda":
        info["gpu"] = _gpu()
    info["name"] = info["gpu"].get("name", "unknown GPU") if device == "cuda" else info["cpu"]
    return info
