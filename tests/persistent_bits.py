"""Digests of the persistent kernels' outputs on the emulator, to show that a change of
csrc/persistent.cuh's shared-memory layout leaves every output bit as it was.

    python tests/persistent_bits.py OUT.json      # from the root of the checkout to test

runs every cell's persistent forward (training and inference) and backward (with and
without step norms), float32 and float16, on devices that split H over several blocks,
stage B in chunks, and (with a 32-thread tile) take several rounds per thread, in the
emulator's stale memory model; writes {case: {array: sha256 of its bytes}}. Run it in
two checkouts and compare the files (``cmp``): equal files mean equal bits. Not a test
(pytest does not collect it): it has nothing to compare against on its own."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_cell_kernels as cells_test  # noqa: E402
import test_cuda_kernels as lstm_test  # noqa: E402
import test_persistent_paths as paths_test  # noqa: E402

from rnnkernels import _launch, _persistent  # noqa: E402


def _digest(results: dict) -> dict:
    return {name: (None if value is None else hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest())
            for name, value in sorted(results.items())}


def _lstm(runtime, shape, dtype, seed):
    problem = lstm_test.make_norm_problem(shape, "all", seed=seed)
    if dtype == "float16":
        problem = lstm_test.to_float16(problem)
    out = {f"kernels.{k}": v for k, v in lstm_test.run_kernels(runtime, problem, variant="persistent").items()}
    out.update({f"norms.{k}": v for k, v in lstm_test.run_step_norms(runtime, problem, variant="persistent").items()})
    return out


def _cell(runtime, cell, shape, dtype, seed):
    p = cells_test.make_problem(cell, *shape, seed=seed)
    out = {f"train.{k}": v for k, v in cells_test.run(runtime, cell, p, dtype, variant="persistent").items()}
    out.update({f"infer.{k}": v for k, v in cells_test.run(runtime, cell, p, dtype, variant="persistent",
                                                            training=False).items()})
    return out


def _run(runtime, cell, shape, dtype):
    seed = sum(shape)
    return _lstm(runtime, shape, dtype, seed) if cell == "lstm" else _cell(runtime, cell, shape, dtype, seed)


def cases():
    """(name, runtime factory, cell, shape, dtype, small tile)."""
    cells = ("lstm", "gru", "rnn_tanh", "rnn_relu")
    for cell in cells:
        for shape, sms in (((3, 9, 4, 7), 3), ((2, 9, 3, 12), 3), ((2, 13, 5, 33), 3), ((2, 6, 3, 24), 2)):
            yield (f"{cell}-forced-{shape}-{sms}", lambda c=cell, s=shape, n=sms: cells_test.forced_runtime(
                c, s, n, memory_model="stale"), cell, shape, "float32", False)
        for shape, sms in (((2, 6, 3, 24), 3), ((3, 5, 7, 33), 16)):
            yield (f"{cell}-wide-{shape}-{sms}", lambda n=sms: _launch.EmulatorRuntime(
                sm_count=n, max_shared_bytes=200 * 1024, memory_model="stale"), cell, shape, "float32", False)
        yield (f"{cell}-default-f16", lambda: _launch.EmulatorRuntime(memory_model="stale"), cell, (3, 5, 4, 12),
               "float16", False)
    for cell in ("lstm", "rnn_tanh", "gru"):
        for shape, sms, chunked in paths_test.CASES:
            yield (f"{cell}-small-{shape}-{sms}", lambda c=cell, s=shape, n=sms, k=chunked: paths_test._runtime(
                c, s, n, k), cell, shape, "float32", True)


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    plan = _persistent.plan
    out = {}
    for name, runtime, cell, shape, dtype, small in cases():
        if small:  # test_persistent_paths' small_tile fixture, by hand
            _persistent.plan_for = (lambda rt, direction, batch, hidden, dtype="float32", flag=True, cell="lstm":
                                    plan(direction, batch, hidden, rt.sm_count,
                                         rt.max_shared_bytes - _persistent.STATIC_SHARED_BYTES,
                                         tile=paths_test.SMALL, cell=cell))
        else:
            _persistent.plan_for = ORIGINAL_PLAN_FOR
        out[name] = _digest(_run(runtime(), cell, shape, dtype))
        print(name, flush=True)
    Path(argv[1]).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return 0


ORIGINAL_PLAN_FOR = _persistent.plan_for

if __name__ == "__main__":
    sys.exit(main(sys.argv))
