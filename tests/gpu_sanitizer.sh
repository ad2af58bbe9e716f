#!/usr/bin/env bash
# Runs the fast GPU tests of tests/test_cuda_kernels.py and tests/test_grad_norm.py
# (every kernel in csrc/) under compute-sanitizer's
# memcheck (out-of-bounds / misaligned global and shared accesses) and racecheck
# (shared-memory hazards). Exits non-zero on the first error report, on a failing
# test, and when the GPU tests skip (RNNKERNELS_REQUIRE_GPU) or none are collected
# (pytest's exit status 5).
#
#   bash tests/gpu_sanitizer.sh            # needs a GPU, CuPy and compute-sanitizer
#   COMPUTE_SANITIZER=/path/to/compute-sanitizer bash tests/gpu_sanitizer.sh
set -euo pipefail
cd "$(dirname "$0")/.."

sanitizer="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}"
for root in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [[ -z "$sanitizer" && -n "$root" && -x "$root/bin/compute-sanitizer" ]]; then
        sanitizer="$root/bin/compute-sanitizer"
    fi
done
if [[ -z "$sanitizer" ]]; then
    echo "compute-sanitizer not found: put it on PATH or set COMPUTE_SANITIZER" >&2
    exit 2
fi

export RNNKERNELS_UNDER_SANITIZER=1
# A GPU test that skips (CuPy not seeing the device under the sanitizer, say) fails
# the run instead of passing it (tests/conftest.py).
export RNNKERNELS_REQUIRE_GPU=1
python="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [[ -z "$python" ]]; then
    echo "no python or python3 on PATH: set PYTHON" >&2
    exit 2
fi
# The slow tests (large shapes, T = 4096) add nothing the small ones do not cover
# here and would take far longer under instrumentation.
for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    "$sanitizer" --tool "$tool" --error-exitcode 1 --target-processes all \
        "$python" -m pytest -q -p no:cacheprovider -m "gpu and not slow" tests/test_cuda_kernels.py tests/test_grad_norm.py
done
echo "compute-sanitizer: memcheck and racecheck clean"
