"""Experiment 01: which step tile is fastest for which (B, H), launched step by step
or as a replayed CUDA graph? Needs a GPU.

    python benchmarks/kernels/01_step_tiles.py [--json out.json]

For every shape, every tile of rnnkernels._launch.STEP_TILES and both variants of the
per-step path ("step": T launches from Python; "graph": the T launches captured once
per call shape and replayed) it first validates the forward and backward against the
float64 reference (relative error < 1e-5), then times a forward (training) + backward
with CUDA events: warm-up (which also captures the graph), then the median of repeats,
with L2 flushed (a 256 MiB write) before each repeat. It prints what the heuristic
(choose_step_tile) picks beside the fastest, so the table in _launch.py can be tuned
from data. Not run in CI (no GPU there); written without a GPU, so not yet run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_cuda_kernels import assert_matches_reference, make_problem, run_kernels  # noqa: E402

from rnnkernels import _launch  # noqa: E402

# (T, B, I, H); B = 1 at H = 768 is where the k-split batch1 tile must fill the SMs.
SHAPES = [
    (64, 1, 256, 512), (256, 1, 768, 768), (64, 8, 256, 512), (64, 64, 256, 512), (64, 256, 512, 1024),
    (64, 16, 128, 128),
]


def time_tile(cupy, runtime, problem, tile, variant, repeats=20, warmup=3):
    device = {name: None if value is None else cupy.asarray(value) for name, value in vars(problem).items()}
    flush = cupy.empty(256 * 2**20, dtype=cupy.uint8)

    def step():
        _, _, _, saved = _launch.forward(
            runtime, device["x"], device["w_ih"], device["w_hh"], device["bias"], device["h0"], device["c0"],
            True, step_tile=tile, variant=variant,
        )
        _launch.backward(runtime, saved, device["dy"], device["dh_n"], device["dc_n"], variant=variant)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        flush.fill(0)
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        step()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import cupy

    runtime = _launch.CupyRuntime()
    rows = []
    for shape in SHAPES:
        problem = make_problem(*shape, seed=1)
        chosen = _launch.choose_step_tile(shape[1], shape[3], runtime.sm_count)
        for tile in _launch.STEP_TILES:
            for variant in ("step", "graph"):  # the per-step path's two variants
                results = run_kernels(runtime, problem, step_tile=tile, variant=variant, to_device=cupy.asarray,
                                      to_host=cupy.asnumpy)
                assert_matches_reference(results, problem, 1e-5)
                ms = time_tile(cupy, runtime, problem, tile, variant)
                rows.append({"T": shape[0], "B": shape[1], "I": shape[2], "H": shape[3], "tile": tile.name,
                             "variant": variant, "chosen": tile == chosen, "ms_forward_backward": ms})
                print(f"T={shape[0]:4d} B={shape[1]:4d} I={shape[2]:4d} H={shape[3]:5d} {tile.name:8s} {variant:5s}"
                      f" {'*' if tile == chosen else ' '} {ms:9.3f} ms", flush=True)
    if args.json:
        device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        args.json.write_text(json.dumps({"device": device, "cupy": cupy.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
