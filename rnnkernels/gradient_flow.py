r"""The gradient-flow report: how ‖∂L/∂h_t‖ decays going back through time, for the
Elman RNN (tanh and ReLU), the GRU and the LSTM under several initializations.

    python -m rnnkernels.gradient_flow --json flow.json --plot flow.png
    python -m rnnkernels.gradient_flow --cell gru --backend reference      # one cell
    python -m rnnkernels.gradient_flow --from-json flow.json --plot flow.png   # re-plot

The experiment: one random sequence x [T, B, I] ~ N(0, 1) and a loss on the last step
only, L = Σ dy ⊙ h_{T-1} with dy ~ N(0, 1) [B, H]. Backpropagating it gives
‖∂L/∂h_t‖ for every t; the curve normalized by its value at t = T−1 is how much of the
gradient signal from the last step reaches step t. Every cell runs through the public
API (``_api.cell_forward`` / ``cell_backward(..., return_step_norms=True)``) on the
chosen backend, in float64, so the report reads the norms the backends themselves
compute (the LSTM's CUDA kernels reduce them inside the backward step).

What it shows: the tanh RNN multiplies a Jacobian diag(1 − h_t²)·W_hh per step and its
curve falls geometrically (Bengio, Simard & Frasconi 1994); a ReLU RNN with W_hh = I
(the IRNN of Le, Jaitly & Hinton 2015) copies the gradient of every unit that stays
active; the GRU carries the gradient along z_t ⊙ h_{t−1} scaled by its update gate,
the LSTM along the cell state scaled by its forget gate, and a positive bias on that
gate (plus orthogonal recurrent weights) keeps far more of it.

Each run's ratio ‖∂L/∂h_0‖ / ‖∂L/∂h_{T−1}‖ is in the JSON (``ratios``) beside the full
curves (``runs[*].dh_norms``, and for the LSTM ``dc_norms``, ‖∂L/∂c_t‖). The plot is
drawn from that data, one panel per cell. Exit status: 0 on success, 1 when a run
produced a non-finite norm, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np

from . import init

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
"""The cells of the report, in table and panel order (``rnnkernels.cells`` names)."""

CELL_TITLES = {"rnn_tanh": "Elman RNN, tanh", "rnn_relu": "Elman RNN, ReLU", "gru": "GRU", "lstm": "LSTM"}
GATE_BIAS_NAMES = {"lstm": "forget_bias", "gru": "update_bias"}  # the gate that keeps the state
BACKENDS = ("auto", "cpu", "reference")  # float64 ones; cuda and emulated compute float32


@dataclass(frozen=True)
class Run:
    cell: str  # a CELLS entry
    scheme: str  # an init.CELL_SCHEMES[cell] entry
    gate_bias: float | None  # the LSTM's forget bias, the GRU's update bias
    label: str

    @property
    def key(self) -> str:
        bias = "" if self.gate_bias is None else f"+{GATE_BIAS_NAMES[self.cell]}={self.gate_bias:g}"
        return f"{self.cell}/{self.scheme}{bias}"


def default_runs(forget_bias: float = 1.0, update_bias: float = 1.0, cells=CELLS) -> tuple[Run, ...]:
    """The report's configurations for ``cells``: each cell's torch default, the classic
    alternatives, and the one that keeps the most gradient."""
    runs = {
        "rnn_tanh": (
            Run("rnn_tanh", "pytorch_default", None, "tanh RNN, PyTorch default U(±1/√H)"),
            Run("rnn_tanh", "xavier_uniform", None, "tanh RNN, Glorot uniform"),
            Run("rnn_tanh", "orthogonal", None, "tanh RNN, orthogonal W_hh (gain 1)"),
        ),
        "rnn_relu": (
            Run("rnn_relu", "pytorch_default", None, "ReLU RNN, PyTorch default U(±1/√H)"),
            Run("rnn_relu", "irnn", None, "ReLU RNN, identity W_hh (IRNN, Le et al. 2015)"),
        ),
        "gru": (
            Run("gru", "pytorch_default", None, "GRU, PyTorch default U(±1/√H)"),
            Run("gru", "keras_default", None, "GRU, Keras default (Glorot, orthogonal)"),
            Run("gru", "orthogonal", None, "GRU, orthogonal per gate"),
            Run("gru", "orthogonal", update_bias, f"GRU, orthogonal per gate + update bias {update_bias:g}"),
        ),
        "lstm": (
            Run("lstm", "pytorch_default", None, "LSTM, PyTorch default U(±1/√H)"),
            Run("lstm", "keras_default", 1.0, "LSTM, Keras default (Glorot, orthogonal, forget bias 1)"),
            Run("lstm", "orthogonal", forget_bias, f"LSTM, orthogonal per gate + forget bias {forget_bias:g}"),
        ),
    }
    unknown = [cell for cell in cells if cell not in runs]
    if unknown:
        raise ValueError(f"unknown cell(s) {unknown}; expected some of {', '.join(CELLS)}")
    return tuple(run for cell in CELLS if cell in cells for run in runs[cell])


# ----------------------------------------------------------------------------- running


def resolve_backend(backend: str, cell: str) -> str:
    """The backend a run of ``cell`` uses: ``backend`` itself, or for "auto" the Numba
    cpu backend where it implements the cell and else the float64 reference (a cell's
    cpu backend may land after its reference; the report says which ran)."""
    if backend != "auto":
        return backend
    from . import _api

    try:
        _api.get_backend("cpu", cell)
    except NotImplementedError:  # the cell's cpu module is not written yet
        return "reference"
    return "cpu"


def step_norms(cell: str, x, dy_last, params, backend: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(‖∂L/∂h_t‖, ‖∂L/∂c_t‖ or None) [T] for L = Σ dy_last ⊙ h_{T−1}, from ``cell``'s
    ``backend`` through the public API."""
    from . import _api

    out = _api.cell_forward(cell, x, params["w_ih"], params["w_hh"], params["b_ih"], params["b_hh"], None,
                            backend=backend)
    # The loss reads h_{T-1} only: as the upstream gradient of h_n it is the same as dy
    # on the last step, and no backend needs a [T, B, H] array of zeros for it.
    dstates = (dy_last,) + (None,) * (len(out.states) - 1)
    norms = _api.cell_backward(out, dstates=dstates, return_step_norms=True).step_norms
    return norms[0], norms[1] if len(norms) > 1 else None


def ratio_of(norms) -> float:
    """‖∂L/∂h_0‖ / ‖∂L/∂h_{T−1}‖ (NaN for an empty or zero curve)."""
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size == 0 or norms[-1] == 0:
        return math.nan
    return float(norms[0] / norms[-1])


def run_report(steps=256, batch=8, input_size=32, hidden=64, seed=0, backend="auto", runs=None) -> dict:
    """Run every configuration and return the report as a JSON-ready dict. ``backend``:
    a BACKENDS entry ("auto": see :func:`resolve_backend`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (float64), got {backend!r}")
    runs = default_runs() if runs is None else runs
    data_rng = np.random.default_rng(seed)
    x = data_rng.standard_normal((steps, batch, input_size))
    dy_last = data_rng.standard_normal((batch, hidden))

    results = []
    for run in runs:
        # seeded by the run's key, not its position: a run draws the same weights
        # whichever other runs (--cell) are in the report
        rng = np.random.default_rng((seed, zlib.crc32(run.key.encode())))
        started = time.perf_counter()
        params = init.cell_parameters(run.cell, input_size, hidden, run.scheme, gate_bias=run.gate_bias, rng=rng,
                                      dtype=np.float64)
        used = resolve_backend(backend, run.cell)
        dh_norms, dc_norms = step_norms(run.cell, x, dy_last, params, used)
        seconds = time.perf_counter() - started
        ratio = ratio_of(dh_norms)
        results.append(
            {
                "key": run.key,
                "cell": run.cell,
                "init": run.scheme,
                "gate_bias": run.gate_bias,
                "label": run.label,
                "backend": used,
                "computed_by": f"rnnkernels._api.cell_backward, backend {used!r} (float64)",
                "ratio": _finite_or_none(ratio),
                "decades": _finite_or_none(math.log10(ratio) if ratio > 0 else -math.inf),
                "seconds": round(seconds, 4),
                "dh_norms": [_finite_or_none(v) for v in dh_norms],
                "dc_norms": None if dc_norms is None else [_finite_or_none(v) for v in dc_norms],
            }
        )
    return {
        "what": "‖∂L/∂h_t‖ for a loss on the last step of a sequence; ratio = norm at t=0 "
        "over norm at t=T-1",
        "config": {
            "steps": steps,
            "batch": batch,
            "input_size": input_size,
            "hidden": hidden,
            "seed": seed,
            "backend": backend,
            "cells": sorted({run.cell for run in runs}, key=CELLS.index),
            "dtype": "float64",
            "inputs": "x ~ N(0, 1) [T, B, I]; loss L = sum(dy * h_{T-1}), dy ~ N(0, 1) [B, H]",
        },
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "rnnkernels": _version()},
        "ratios": {result["key"]: result["ratio"] for result in results},
        "runs": results,
    }


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------- output


def _cell_of(run: dict) -> str:
    """A saved run's cell ("model" in reports written before the GRU and ReLU RNN)."""
    return run.get("cell") or run["model"]


# One colour per run within a panel, torch's default first in red; the last run of each
# cell (the one that keeps the most gradient) is always blue.
PANEL_COLORS = ("#d62728", "#ff7f0e", "#2ca02c", "#9467bd")
BEST_COLOR = "#1f77b4"


def plot_report(data: dict, path: str) -> None:
    """The PNG, drawn from the report dict (as saved in the JSON): one panel per cell,
    all on the same log axis so that the cells compare at a glance."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or state touched

    config = data["config"]
    cells = [cell for cell in CELLS if any(_cell_of(run) == cell for run in data["runs"])]
    columns = 1 if len(cells) == 1 else 2
    rows = math.ceil(len(cells) / columns)
    figure = Figure(figsize=(7.5 * columns, 4.2 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, cell in zip(axes, cells):
        cell_runs = [run for run in data["runs"] if _cell_of(run) == cell]
        colors = [*PANEL_COLORS[: len(cell_runs) - 1], BEST_COLOR]
        for color, run in zip(colors, cell_runs):
            norms = np.array([np.nan if v is None else v for v in run["dh_norms"]], dtype=np.float64)
            if norms.size == 0 or not norms[-1]:
                continue
            relative = norms / norms[-1]
            relative[relative <= 0] = np.nan  # an exact zero (underflow) cannot go on a log axis
            ratio = "n/a" if run["ratio"] is None else f"{run['ratio']:.1e}"
            ax.semilogy(np.arange(norms.size), relative, linewidth=2.0, color=color,
                        label=f"{run['label'].split(', ', 1)[-1]}   (t=0: {ratio})")
        used = sorted({run.get("backend", config["backend"]) for run in cell_runs})
        ax.set_title(f"{CELL_TITLES.get(cell, cell)}   (backend {', '.join(used)})", fontsize=11)
        ax.grid(True, which="major", alpha=0.4)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_xlim(0, max(config["steps"] - 1, 1))
    for ax in axes[len(cells):]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * columns:]:
        ax.set_xlabel("time step t   (the loss reads h at t = T−1)")
    for ax in axes[::columns]:
        ax.set_ylabel("‖∂L/∂h_t‖ / ‖∂L/∂h_(T−1)‖")
    figure.suptitle(
        f"Gradient flow back through time: T={config['steps']}, B={config['batch']}, "
        f"I={config['input_size']}, H={config['hidden']}, float64",
        fontsize=11,
    )
    figure.savefig(path, dpi=110)


def print_summary(data: dict, out=None) -> None:
    out = out or sys.stdout
    config = data["config"]
    print(
        f"gradient flow, T={config['steps']} B={config['batch']} I={config['input_size']} "
        f"H={config['hidden']}, float64: ‖∂L/∂h_0‖ / ‖∂L/∂h_(T-1)‖",
        file=out,
    )
    width = max(len(run["label"]) for run in data["runs"])
    for run in data["runs"]:
        ratio = "non-finite" if run["ratio"] is None else f"{run['ratio']:9.2e}"
        decades = "" if run["decades"] is None else f"{run['decades']:7.1f} decades"
        where = run.get("backend", config["backend"])
        print(f"  {run['label']:<{width}}  {ratio}  {decades}  ({where}, {run['seconds']:.2f} s)", file=out)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


CELL_CHOICES = {"all": CELLS, "rnn": ("rnn_tanh", "rnn_relu"), **{cell: (cell,) for cell in CELLS}}


def _cells(text: str) -> tuple[str, ...]:
    """--cell: comma-separated names of CELL_CHOICES, as the cells they stand for."""
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in wanted if part not in CELL_CHOICES]
    if not wanted or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(CELL_CHOICES)} (comma-separated), got {text!r}")
    return tuple(cell for cell in CELLS if any(cell in CELL_CHOICES[part] for part in wanted))


def build_parser(prog=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m rnnkernels.gradient_flow",
        description="Backpropagate a loss on the last step of a long sequence through the Elman RNN "
        "(tanh, ReLU), the GRU and the LSTM under several initializations; report ‖∂L/∂h_t‖ against t.",
    )
    parser.add_argument("--cell", type=_cells, default=CELLS, metavar="CELL[,CELL]",
                        help="cells to run: all (default), lstm, gru, rnn (both Elman RNNs), rnn_tanh, "
                        "rnn_relu; comma-separated")
    parser.add_argument("--steps", "-T", type=_positive_int, default=256, help="sequence length (default 256)")
    parser.add_argument("--batch", type=_positive_int, default=8, help="batch size (default 8)")
    parser.add_argument("--input-size", type=_positive_int, default=32, help="input features I (default 32)")
    parser.add_argument("--hidden", type=_positive_int, default=64, help="hidden units H (default 64)")
    parser.add_argument("--forget-bias", type=float, default=1.0,
                        help="forget bias of the orthogonal LSTM run (default 1)")
    parser.add_argument("--update-bias", type=float, default=1.0,
                        help="update-gate bias of the last GRU run (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="backend of every cell, float64; auto (default): cpu where it implements "
                        "the cell, else reference (the table and JSON say which ran)")
    parser.add_argument("--json", metavar="PATH", help="write config, ratios and curves as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write the PNG (needs matplotlib)")
    parser.add_argument("--from-json", metavar="PATH", help="re-plot a saved report instead of running")
    return parser


def main(argv=None, prog=None) -> int:
    args = build_parser(prog).parse_args(argv)
    name = prog or "gradient_flow"
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"{name}: error: --plot needs matplotlib: pip install rnnkernels[bench]", file=sys.stderr)
            return 2
    for option, value in (("--forget-bias", args.forget_bias), ("--update-bias", args.update_bias)):
        if not math.isfinite(value):
            print(f"{name}: error: {option} must be finite, got {value}", file=sys.stderr)
            return 2
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as file:
            data = json.load(file)
    else:
        data = run_report(args.steps, args.batch, args.input_size, args.hidden, args.seed, args.backend,
                          default_runs(args.forget_bias, args.update_bias, args.cell))
    print_summary(data)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1, allow_nan=False, ensure_ascii=False)
            file.write("\n")
    if args.plot:
        plot_report(data, args.plot)
    if any(run["ratio"] is None for run in data["runs"]):
        print(f"{name}: a run produced a non-finite or zero gradient norm; see the table", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
