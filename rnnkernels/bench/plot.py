"""The plot, drawn from saved results (the CLI's JSON), never from a second run.

One panel per mode; time per call against T on log-log axes, one line per
implementation (solid: LSTM, dashed: attention). The crossover is where the fastest LSTM
and the fastest attention take equal time, found by linear interpolation in log-log
between the two measured lengths around the sign change.

    python -m rnnkernels.bench.plot results.json results.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .flops import MODES

MODE_TITLES = {"forward": "forward (inference over the sequence)",
               "training": "training (forward + backward)",
               "decode": "decode (one token at context T)"}


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise RuntimeError("--plot needs matplotlib: pip install rnnkernels[bench]") from error


def crossovers(lengths, first, second) -> list[float]:
    """Lengths where two timing curves cross, interpolated in log-log space.
    ``lengths`` ascending; ``first`` and ``second`` the times at those lengths."""
    points = []
    diffs = [math.log(a) - math.log(b) for a, b in zip(first, second)]
    for i in range(1, len(lengths)):
        d0, d1 = diffs[i - 1], diffs[i]
        if d0 == 0:
            if not points or points[-1] != lengths[i - 1]:
                points.append(float(lengths[i - 1]))
        elif d0 * d1 < 0:
            x0, x1 = math.log(lengths[i - 1]), math.log(lengths[i])
            points.append(math.exp(x0 + (x1 - x0) * d0 / (d0 - d1)))
    if diffs and diffs[-1] == 0 and (not points or points[-1] != lengths[-1]):
        points.append(float(lengths[-1]))
    return points


def fastest(rows, model: str) -> dict[int, float]:
    """Fastest median time of any implementation of ``model`` at each T."""
    best: dict[int, float] = {}
    for row in rows:
        if row["model"] == model and row["status"] == "ok":
            best[row["T"]] = min(best.get(row["T"], math.inf), row["median_ms"])
    return best


def crossover_text(rows) -> tuple[list[float], str]:
    """Crossover lengths of the fastest LSTM against the fastest attention in one mode's
    rows, and a sentence for the panel."""
    lstm, attention = fastest(rows, "lstm"), fastest(rows, "attention")
    common = sorted(set(lstm) & set(attention))
    if len(common) < 2:
        return [], "too few lengths with both models to find a crossover"
    points = crossovers(common, [lstm[t] for t in common], [attention[t] for t in common])
    if points:
        where = ", ".join(f"T ≈ {x:.0f}" for x in points)
        return points, f"fastest LSTM = fastest attention at {where}"
    winner = "LSTM" if lstm[common[0]] < attention[common[0]] else "attention"
    return [], f"no crossover in T {common[0]}..{common[-1]}: {winner} faster"


def plot_results(data: dict, path: str) -> None:
    """Write the PNG for a results dict (``{"device", "config", "results"}``) to ``path``."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    rows = [row for row in data["results"] if row["status"] == "ok"]
    modes = [mode for mode in MODES if any(row["mode"] == mode for row in rows)]
    if not modes:
        raise ValueError("no successful rows to plot")
    figure = Figure(figsize=(5.2 * len(modes), 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(modes), squeeze=False)[0]
    impls = sorted({(row["model"], row["impl"]) for row in rows})
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    for ax, mode in zip(axes, modes):
        mode_rows = [row for row in rows if row["mode"] == mode]
        for model, impl in impls:
            line = sorted((row["T"], row["median_ms"]) for row in mode_rows
                          if row["impl"] == impl and row["model"] == model)
            if not line:
                continue
            ax.plot([t for t, _ in line], [ms for _, ms in line], marker="o" if model == "lstm"
                    else "s", linestyle="-" if model == "lstm" else "--",
                    color=colors[(model, impl)], label=f"{model}: {impl}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        lengths = sorted({row["T"] for row in mode_rows})
        ax.set_xticks(lengths, [str(t) for t in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        points, text = crossover_text(mode_rows)
        for x in points:
            ax.axvline(x, color="0.3", linestyle=":", linewidth=1.2)
            ax.annotate(f"crossover\nT ≈ {x:.0f}", xy=(x, 0.5), xycoords=("data", "axes fraction"),
                        xytext=(4, 0), textcoords="offset points", fontsize=9, color="0.2")
        ax.set_title(f"{MODE_TITLES.get(mode, mode)}\n{text}", fontsize=10)
        ax.set_xlabel("context length T" if mode == "decode" else "sequence length T")
        ax.set_ylabel("time per call (ms, median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    config = data.get("config", {})
    device = data.get("device", {})
    figure.suptitle(f"LSTM vs causal attention on {device.get('name', '?')} — "
                    f"B={config.get('batch')}, H={config.get('hidden')}, "
                    f"{config.get('dtype')}", fontsize=12)
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnkernels.bench.plot",
                                     description="Plot saved rnnkernels-bench JSON results.")
    parser.add_argument("json_path")
    parser.add_argument("png_path")
    args = parser.parse_args(argv)
    with open(args.json_path, encoding="utf-8") as file:
        data = json.load(file)
    try:
        plot_results(data, args.png_path)
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
