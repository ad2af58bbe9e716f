r"""The gradient-flow report: how ‖∂L/∂h_t‖ decays going back through time, for a plain
tanh RNN and an LSTM under several initializations.

    python -m rnnkernels.gradient_flow --json flow.json --plot flow.png
    python -m rnnkernels.gradient_flow --from-json flow.json --plot flow.png   # re-plot

The experiment: one random sequence x [T, B, I] ~ N(0, 1) and a loss on the last step
only, L = Σ dy ⊙ h_{T-1} with dy ~ N(0, 1) [B, H]. Backpropagating it gives
‖∂L/∂h_t‖ for every t; the curve normalized by its value at t = T−1 is how much of the
gradient signal from the last step reaches step t. The tanh RNN (``rnn_reference``,
float64) multiplies a Jacobian diag(1 − h_t²)·W_hh per step, and its curve falls
geometrically (Bengio, Simard & Frasconi 1994); the LSTM (``lstm_forward`` /
``lstm_backward(..., return_step_norms=True)`` on the chosen backend, float64) also
carries the gradient along the cell state, scaled by the forget gate, and with a
positive forget bias and orthogonal recurrent weights it falls far less.

Each run's ratio ‖∂L/∂h_0‖ / ‖∂L/∂h_{T−1}‖ is in the JSON (``ratios``) beside the full
curves (``runs[*].dh_norms``, and for the LSTM ``dc_norms``, ‖∂L/∂c_t‖). The plot is
drawn from that data. Exit status: 0 on success, 1 when a run produced a non-finite
norm, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import init, rnn_reference


@dataclass(frozen=True)
class Run:
    model: str  # "rnn_tanh" or "lstm"
    scheme: str  # an init.SCHEMES entry
    forget_bias: float | None
    label: str

    @property
    def key(self) -> str:
        bias = "" if self.forget_bias is None else f"+forget_bias={self.forget_bias:g}"
        return f"{self.model}/{self.scheme}{bias}"


def default_runs(forget_bias: float = 1.0) -> tuple[Run, ...]:
    return (
        Run("rnn_tanh", "pytorch_default", None, "tanh RNN, PyTorch default U(±1/√H)"),
        Run("rnn_tanh", "xavier_uniform", None, "tanh RNN, Glorot uniform"),
        Run("rnn_tanh", "orthogonal", None, "tanh RNN, orthogonal W_hh (gain 1)"),
        Run("lstm", "pytorch_default", None, "LSTM, PyTorch default U(±1/√H)"),
        Run("lstm", "keras_default", 1.0, "LSTM, Keras default (Glorot, orthogonal, forget bias 1)"),
        Run("lstm", "orthogonal", forget_bias, f"LSTM, orthogonal per gate + forget bias {forget_bias:g}"),
    )


# ----------------------------------------------------------------------------- running


def _rnn_norms(x, dy_last, params):
    _, _, saved = rnn_reference.forward(x, params["w_ih"], params["w_hh"], params["b_ih"], params["b_hh"],
                                        nonlinearity="tanh")
    *_, dh_norms = rnn_reference.backward(saved, dh_n=dy_last, return_step_norms=True)
    return dh_norms, None


def _lstm_norms(x, dy_last, params, backend):
    from ._api import lstm_backward, lstm_forward

    out = lstm_forward(x, **params, backend=backend)
    grads = lstm_backward(out, dh_n=dy_last, return_step_norms=True)
    return grads.dh_norms, grads.dc_norms


def ratio_of(norms) -> float:
    """‖∂L/∂h_0‖ / ‖∂L/∂h_{T−1}‖ (NaN for an empty or zero curve)."""
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size == 0 or norms[-1] == 0:
        return math.nan
    return float(norms[0] / norms[-1])


def run_report(steps=256, batch=8, input_size=32, hidden=64, seed=0, backend="cpu", runs=None) -> dict:
    """Run every configuration and return the report as a JSON-ready dict."""
    runs = default_runs() if runs is None else runs
    data_rng = np.random.default_rng(seed)
    x = data_rng.standard_normal((steps, batch, input_size))
    # The loss reads h_{T-1} only; as the upstream gradient of h_n it is the same as
    # dy on the last step, and the LSTM backends take it without a [T, B, H] zero array.
    dy_last = data_rng.standard_normal((batch, hidden))

    results = []
    for index, run in enumerate(runs):
        rng = np.random.default_rng((seed, index + 1))
        started = time.perf_counter()
        if run.model == "rnn_tanh":
            params = init.rnn_parameters(input_size, hidden, run.scheme, rng=rng, dtype=np.float64)
            dh_norms, dc_norms = _rnn_norms(x, dy_last, params)
            where = "rnnkernels.rnn_reference (float64)"
        elif run.model == "lstm":
            params = init.lstm_parameters(
                input_size, hidden, run.scheme, forget_bias=run.forget_bias, rng=rng, dtype=np.float64
            )
            dh_norms, dc_norms = _lstm_norms(x, dy_last, params, backend)
            where = f"rnnkernels.lstm_backward, backend {backend!r} (float64)"
        else:
            raise ValueError(f"unknown model {run.model!r}; expected 'rnn_tanh' or 'lstm'")
        seconds = time.perf_counter() - started
        ratio = ratio_of(dh_norms)
        results.append(
            {
                "key": run.key,
                "model": run.model,
                "init": run.scheme,
                "forget_bias": run.forget_bias,
                "label": run.label,
                "computed_by": where,
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


def plot_report(data: dict, path: str) -> None:
    """The PNG, drawn from the report dict (as saved in the JSON)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or state touched

    config = data["config"]
    figure = Figure(figsize=(10, 6), layout="constrained")
    ax = figure.add_subplot()
    rnn_colors = iter(["#d62728", "#ff7f0e", "#8c564b", "#e377c2"])
    lstm_colors = iter(["#1f77b4", "#2ca02c", "#17becf", "#9467bd"])
    for run in data["runs"]:
        norms = np.array([np.nan if v is None else v for v in run["dh_norms"]], dtype=np.float64)
        if norms.size == 0 or not norms[-1]:
            continue
        relative = norms / norms[-1]
        relative[relative <= 0] = np.nan  # an exact zero (underflow) cannot go on a log axis
        is_rnn = run["model"] == "rnn_tanh"
        ratio = "n/a" if run["ratio"] is None else f"{run['ratio']:.1e}"
        ax.semilogy(
            np.arange(norms.size),
            relative,
            linestyle="--" if is_rnn else "-",
            linewidth=1.6 if is_rnn else 2.2,
            color=next(rnn_colors if is_rnn else lstm_colors, None),
            label=f"{run['label']}   (t=0: {ratio})",
        )
    ax.set_xlabel("time step t   (the loss reads h at t = T−1)")
    ax.set_ylabel("‖∂L/∂h_t‖  /  ‖∂L/∂h_(T−1)‖   (log scale)")
    ax.set_title(
        f"Gradient flow back through time: T={config['steps']}, B={config['batch']}, "
        f"I={config['input_size']}, H={config['hidden']}, float64, LSTM on backend "
        f"{config['backend']!r}",
        fontsize=10,
    )
    ax.set_xlim(0, max(config["steps"] - 1, 1))
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(fontsize=8.5, loc="lower right")
    figure.savefig(path, dpi=120)


def print_summary(data: dict, out=None) -> None:
    out = out or sys.stdout
    config = data["config"]
    print(
        f"gradient flow, T={config['steps']} B={config['batch']} I={config['input_size']} "
        f"H={config['hidden']}: ‖∂L/∂h_0‖ / ‖∂L/∂h_(T-1)‖",
        file=out,
    )
    width = max(len(run["label"]) for run in data["runs"])
    for run in data["runs"]:
        ratio = "non-finite" if run["ratio"] is None else f"{run['ratio']:9.2e}"
        decades = "" if run["decades"] is None else f"{run['decades']:7.1f} decades"
        print(f"  {run['label']:<{width}}  {ratio}  {decades}  ({run['seconds']:.2f} s)", file=out)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser(prog=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m rnnkernels.gradient_flow",
        description="Backpropagate a loss on the last step of a long sequence through a tanh "
        "RNN and an LSTM under several initializations; report ‖∂L/∂h_t‖ against t.",
    )
    parser.add_argument("--steps", "-T", type=_positive_int, default=256, help="sequence length (default 256)")
    parser.add_argument("--batch", type=_positive_int, default=8, help="batch size (default 8)")
    parser.add_argument("--input-size", type=_positive_int, default=32, help="input features I (default 32)")
    parser.add_argument("--hidden", type=_positive_int, default=64, help="hidden units H (default 64)")
    parser.add_argument("--forget-bias", type=float, default=1.0,
                        help="forget bias of the orthogonal LSTM run (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("cpu", "reference"), default="cpu",
                        help="LSTM backend (default cpu; the tanh RNN is always the float64 reference)")
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
    if not math.isfinite(args.forget_bias):
        print(f"{name}: error: --forget-bias must be finite, got {args.forget_bias}", file=sys.stderr)
        return 2
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as file:
            data = json.load(file)
    else:
        data = run_report(args.steps, args.batch, args.input_size, args.hidden, args.seed, args.backend,
                          default_runs(args.forget_bias))
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
