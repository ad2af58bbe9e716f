#!/usr/bin/env bash
# Thin wrapper: the GPU session is benchmarks/gpu_session.py (its docstring says what it
# runs, in which stages, under which limits). Arguments pass through, e.g.
#   GIT_COMMIT=<commit> bash benchmarks/gpu_session.sh --out "$OUT"
# PYTHON picks the interpreter (default: python3, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$python" benchmarks/gpu_session.py "$@"
