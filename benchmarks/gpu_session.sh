#!/usr/bin/env bash
# Everything a GPU session should run, in one device call of at most 10 minutes:
#
#   bash benchmarks/gpu_session.sh                 # all stages, in the order below
#   STAGES="tests bench" bash benchmarks/gpu_session.sh   # a subset (a second call)
#
# Stages (each under its own time limit, so one that hangs cannot eat the others):
#   env        nvidia-smi, python/cupy/torch versions, git commit; installs the repo
#              (pip install --no-deps --no-build-isolation -e .; PYTHONPATH otherwise)
#   nvrtc      python -m rnnkernels.nvrtc_check (sm_80, sm_90)               (<= 60 s)
#   tests      python -m pytest -m gpu tests/ (GPU tests that skip FAIL here) (<= 180 s)
#   sanitizer  bash tests/gpu_sanitizer.sh: memcheck + racecheck             (<= 120 s)
#   bench      rnnkernels-bench --device cuda, default preset, JSON/CSV/PNG  (<= 210 s)
# The limits add up to 570 s, so the whole script fits a device call of timeout_s=600
# even when every stage runs to its limit. If the bench times out, run it alone in a
# second call: STAGES="env bench" BENCH_TIMEOUT=540 bash benchmarks/gpu_session.sh
#
# The device machine gets a copy of the working tree without .git: pass the commit in,
#   GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_session.sh
# (expanded here, before the command is sent), or the log says "unknown".
#
# Everything is written to $OUT/gpu-session.log (OUT is set by the device tool; here it
# defaults to benchmarks/results/gpu-<date>), the bench also writes bench-gpu.{json,csv,png}
# and pytest a JUnit XML. The last lines printed are a summary table of the stages.
# Exit status: 0 only when every stage run passed.
#
# Time limits (seconds) can be changed: NVRTC_TIMEOUT, TESTS_TIMEOUT, SANITIZER_TIMEOUT,
# BENCH_TIMEOUT; PER_TEST_TIMEOUT (pytest-timeout, when installed) bounds one test.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results/gpu-$(date +%F)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu-session.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
# Any GPU test that skips is a failure in this session (tests/conftest.py).
export RNNKERNELS_REQUIRE_GPU=1
STAGES="${STAGES:-env nvrtc tests sanitizer bench}"
started=$(date +%s)
summary=()
status=0

log() { echo "$*" | tee -a "$LOG"; }

# run_stage NAME TIMEOUT COMMAND...: runs the command under `timeout`, output to the
# console and the log, and records its status and duration in the summary.
run_stage() {
    local name="$1" limit="$2"
    shift 2
    log ""
    log "===== [$name] $* (limit ${limit}s, session at $(( $(date +%s) - started ))s)"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local note="ok"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        note="TIMED OUT after ${limit}s"
    elif [[ $rc -ne 0 ]]; then
        note="FAILED (exit $rc)"
    fi
    [[ $rc -ne 0 ]] && status=1
    summary+=("$(printf '%-10s %-24s %5ss' "$name" "$note" "$(( $(date +%s) - t0 ))")")
}

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHON

# ------------------------------------------------------------------ env
if wanted env; then
    log "===== [env] $(date -u +%FT%TZ) on $(hostname)"
    { nvidia-smi || echo "nvidia-smi failed"; } 2>&1 | tee -a "$LOG"
    commit="${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo 'unknown (no .git here; pass GIT_COMMIT)')}"
    log "git commit: $commit"
    log "python: $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("numpy", "numba", "cupy", "torch", "pytest", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')}")
    except Exception as error:  # noqa: BLE001 - report, do not stop the session
        print(f"{name}: NOT IMPORTABLE ({type(error).__name__}: {error})")
try:
    import cupy
    print("cupy: CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "driver", cupy.cuda.runtime.driverGetVersion(),
          "NVRTC", cupy.cuda.nvrtc.getVersion(), "devices", cupy.cuda.runtime.getDeviceCount())
except Exception as error:  # noqa: BLE001
    print(f"cupy runtime: {type(error).__name__}: {error}")
try:
    import torch
    print("torch: CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(),
          "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as error:  # noqa: BLE001
    print(f"torch cuda: {type(error).__name__}: {error}")
EOF
    { command -v compute-sanitizer && compute-sanitizer --version | tail -1; } 2>&1 | tee -a "$LOG" \
        || log "compute-sanitizer: not on PATH"
    # Install without the network: no dependencies, no build isolation.
    if "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
        log "installed rnnkernels (editable)"
    else
        log "pip install -e . failed (see above); using PYTHONPATH=$PWD instead"
    fi
fi
# Whatever pip did, import this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import rnnkernels, sys; print('rnnkernels from', rnnkernels.__file__)" 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------- nvrtc
if wanted nvrtc; then
    run_stage nvrtc "${NVRTC_TIMEOUT:-60}" "$PYTHON" -m rnnkernels.nvrtc_check
fi

# ---------------------------------------------------------------- tests
if wanted tests; then
    timeout_args=()
    if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
        timeout_args=(--timeout "${PER_TEST_TIMEOUT:-120}")
    fi
    # --maxfail instead of -x: one call is all this session gets, and a stop at the
    # first failure would hide every later result. The sanitizer test is deselected:
    # the sanitizer stage below runs the same script once, under its own limit.
    run_stage tests "${TESTS_TIMEOUT:-180}" "$PYTHON" -m pytest -m gpu tests/ -q -ra --maxfail=10 \
        -p no:cacheprovider "${timeout_args[@]}" --junitxml="$OUT/gpu-tests.xml" \
        --deselect tests/test_cuda_kernels.py::test_gpu_compute_sanitizer_clean
fi

# ------------------------------------------------------------ sanitizer
if wanted sanitizer; then
    run_stage sanitizer "${SANITIZER_TIMEOUT:-120}" bash tests/gpu_sanitizer.sh
fi

# ---------------------------------------------------------------- bench
if wanted bench; then
    bench=(rnnkernels-bench)
    command -v rnnkernels-bench >/dev/null || bench=("$PYTHON" -m rnnkernels.bench)
    run_stage bench "${BENCH_TIMEOUT:-210}" "${bench[@]}" --device cuda \
        --json "$OUT/bench-gpu.json" --csv "$OUT/bench-gpu.csv" --plot "$OUT/bench-gpu.png"
fi

log ""
log "===== summary ($(( $(date +%s) - started ))s in all; log and files in $OUT)"
for line in "${summary[@]}"; do
    log "$line"
done
exit "$status"
