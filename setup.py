"""Packaging for rnnkernels.

The CUDA sources live in the top-level ``csrc/`` folder of the repository. They are
mapped into the wheel as the package ``rnnkernels.csrc`` (``package_dir`` below) so an
installed, non-editable copy finds them next to its Python files; in a source checkout
``rnnkernels/_sources.py`` falls back to the top-level folder. The sdist carries them
through ``MANIFEST.in``.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# NVRTC compiles the kernels; NVIDIA's device headers (cuda_fp16.h, cooperative_groups.h,
# mma.h's crt/, libcu++) come from the runtime, crt and cccl wheels, about 7 MB together.
# rnnkernels/_sources.py finds their folders at run time (else a CUDA toolkit's).
# CUDA 12 has no crt wheel: its runtime wheel carries what the kernels include.
# cuBLAS runs the large GEMMs (rnnkernels/_gemm.py).
CUDA_RUNTIME_13 = [
    "cupy-cuda13x>=14.2",
    "nvidia-cuda-nvrtc>=13.0",
    "nvidia-cuda-runtime>=13.0",
    "nvidia-cuda-crt>=13.0",
    "nvidia-cuda-cccl>=13.0",
    "nvidia-cublas>=13.0",
]
CUDA_RUNTIME_12 = [
    "cupy-cuda12x>=14.2",
    "nvidia-cuda-nvrtc-cu12>=12.4",
    "nvidia-cuda-runtime-cu12>=12.4",
    "nvidia-cuda-cccl-cu12>=12.4",
    "nvidia-cublas-cu12>=12.4",
]
TORCH = ["torch>=2.4"]
BENCH = ["matplotlib>=3.7", "rich>=13"]
# Peers timed beside rnnkernels where installed (skipped, saying why, where not): ONNX
# Runtime's LSTM operator on the CPU. FlashRNN is GPU-only and pulls Triton, so it has
# an extra of its own.
PEERS = ["onnx>=1.14", "onnxruntime>=1.16"]
GPU_PEERS = ["flashrnn>=1.0"]
TEST = ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "build>=1", "setuptools>=64", "wheel"] + TORCH + BENCH + PEERS

setup(
    name="rnnkernels",
    version="0.1.0",
    description="Hand-written CUDA kernels for recurrent networks (LSTM first), "
    "with a float64 reference, a Numba CPU backend and a CPU emulator for the kernels.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8")
    if (HERE / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # csrc/ and the emulator's stub CUDA headers are folders of data, declared as
    # packages so that their files ship as package data.
    packages=find_packages(include=["rnnkernels", "rnnkernels.*"])
    + ["rnnkernels.csrc", "rnnkernels.emulator.include"],
    package_dir={"rnnkernels.csrc": "csrc"},
    package_data={
        "rnnkernels.csrc": ["*.cu", "*.cuh"],
        "rnnkernels.emulator": ["*.h", "*.cpp", "README.md"],
        "rnnkernels.emulator.include": ["*.h", "cuda/*"],
        "rnnkernels.bench": ["*.cu"],
    },
    include_package_data=True,
    # threadpoolctl holds NumPy's BLAS at one thread around the cpu backends' weight
    # gradients (rnnkernels/_cpu_blas.py): a multi-threaded OpenBLAS's worker spins for
    # ~100 ms after each call, taking the core Numba's pool and torch need.
    install_requires=["numpy>=1.24", "numba>=0.59", "threadpoolctl>=3.1"],
    extras_require={
        "cuda13": CUDA_RUNTIME_13,
        "cuda12": CUDA_RUNTIME_12,
        "torch": TORCH,
        "bench": BENCH,
        "peers": PEERS,
        "gpu-peers": GPU_PEERS,
        "test": TEST,
    },
    entry_points={"console_scripts": ["rnnkernels-bench=rnnkernels.bench.cli:main"]},
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
