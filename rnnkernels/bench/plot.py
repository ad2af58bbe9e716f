"""The plot, drawn from saved results (the CLI's JSON), never from a second run.

One panel per mode; time per call against T on log-log axes, one line per
implementation (solid: the recurrent cell, LSTM, GRU or RNN; dashed: attention). The
crossover is where the fastest recurrent implementation and the fastest attention take
equal time, found by linear interpolation in log-log between the two measured lengths
around the sign change; none is drawn next to a length where a row is flagged noisy. Noisy rows are hollow markers; the legend sits below
the panels, outside the data.

    python -m rnnkernels.bench.plot results.json results.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap

from .flops import MODES

MODE_TITLES = {"forward": "forward (inference over the sequence)",
               "training": "training (forward + backward)",
               "decode": "decode (one token at context T)"}


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise RuntimeError("--plot needs matplotlib: pip install rnnkernels[bench]") from error


def crossover_segments(lengths, first, second) -> list[tuple[float, int]]:
    """Lengths where two timing curves cross, interpolated in log-log space, each with
    the index i of the measured length at or after it (the crossing lies in
    lengths[i-1]..lengths[i]; a tie at a measured length has i = its index). ``lengths``
    ascending; ``first`` and ``second`` the times at those lengths."""
    points: list[tuple[float, int]] = []
    diffs = [math.log(a) - math.log(b) for a, b in zip(first, second)]
    for i in range(1, len(lengths)):
        d0, d1 = diffs[i - 1], diffs[i]
        if d0 == 0:
            if not points or points[-1][0] != lengths[i - 1]:
                points.append((float(lengths[i - 1]), i - 1))
        elif d0 * d1 < 0:
            x0, x1 = math.log(lengths[i - 1]), math.log(lengths[i])
            points.append((math.exp(x0 + (x1 - x0) * d0 / (d0 - d1)), i))
    if diffs and diffs[-1] == 0 and (not points or points[-1][0] != lengths[-1]):
        points.append((float(lengths[-1]), len(lengths) - 1))
    return points


def crossovers(lengths, first, second) -> list[float]:
    """Lengths where two timing curves cross (see ``crossover_segments``)."""
    return [x for x, _ in crossover_segments(lengths, first, second)]


def fastest(rows, model: str) -> dict[int, float]:
    """Fastest median time of any implementation of ``model`` at each T."""
    best: dict[int, float] = {}
    for row in rows:
        if row["model"] == model and row["status"] == "ok":
            best[row["T"]] = min(best.get(row["T"], math.inf), row["median_ms"])
    return best


def noisy_lengths(rows) -> set[int]:
    """Lengths at which some timed row is flagged noisy: the fastest curve there is not
    known (a noisy row may be the true fastest, or only look fastest)."""
    return {row["T"] for row in rows if row["status"] == "ok" and row.get("noisy")}


CELL_TITLES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def recurrent_model(rows) -> str:
    """The recurrent model of a run's rows ("lstm" when there is none: older runs)."""
    return next((row["model"] for row in rows if row["model"] != "attention"), "lstm")


def crossover_text(rows) -> tuple[list[float], str]:
    """Crossover lengths of the fastest recurrent cell (LSTM, GRU or RNN) against the
    fastest attention in one mode's rows, and a sentence for the panel. A crossing next
    to a length with a noisy row is not reported: it would be drawn from figures the run
    itself does not trust."""
    model = recurrent_model(rows)
    cell = CELL_TITLES.get(model, model)
    lstm, attention = fastest(rows, model), fastest(rows, "attention")
    common = sorted(set(lstm) & set(attention))
    if len(common) < 2:
        return [], "too few lengths with both models to find a crossover"
    noisy = noisy_lengths(rows)
    found = crossover_segments(common, [lstm[t] for t in common], [attention[t] for t in common])
    points = [x for x, i in found if common[i] not in noisy and common[max(i - 1, 0)] not in noisy]
    withheld = len(found) - len(points)
    note = (f"; {withheld} crossover{'s' if withheld > 1 else ''} withheld (noisy rows)"
            if withheld else "")
    if points:
        where = ", ".join(f"T ≈ {x:.0f}" for x in points)
        return points, f"fastest {cell} = fastest attention at {where}{note}"
    if found:
        return [], "crossover not shown: noisy rows around it"
    if noisy:
        return [], "no crossover shown: some rows are noisy"
    winner = cell if lstm[common[0]] < attention[common[0]] else "attention"
    return [], f"no crossover in T {common[0]}..{common[-1]}: {winner} faster"


def _label_positions(points, low: float, high: float) -> list[tuple[float, str, str, float]]:
    """Where each crossover label goes: (x, horizontal alignment, vertical alignment,
    height in axes fraction). Times grow with T, so the data is low on the left and high
    on the right: a label sits at the top, right of its line, in the left two thirds,
    and at the bottom, left of its line, in the right third (both inside the frame and
    off the data); labels step away from the edge so that close crossovers do not
    print over each other."""
    placed = []
    span = math.log(high) - math.log(low) if high > low else 1.0
    for k, x in enumerate(sorted(points)):
        where = (math.log(x) - math.log(low)) / span
        step = 0.13 * (k % 4)
        placed.append((x, "right", "bottom", 0.04 + step) if where > 0.66
                      else (x, "left", "top", 0.96 - step))
    return placed


def plot_results(data: dict, path: str) -> None:
    """Write the PNG for a results dict (``{"device", "config", "results"}``) to ``path``.
    Hollow markers are rows flagged noisy; the legend sits below the panels."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullLocator

    rows = [row for row in data["results"] if row["status"] == "ok"]
    modes = [mode for mode in MODES if any(row["mode"] == mode for row in rows)]
    if not modes:
        raise ValueError("no successful rows to plot")
    figure = Figure(figsize=(5.2 * len(modes), 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(modes), squeeze=False)[0]
    impls = sorted({(row["model"], row["impl"]) for row in rows})
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    handles = {}
    any_noisy = False
    for ax, mode in zip(axes, modes):
        mode_rows = [row for row in rows if row["mode"] == mode]
        for model, impl in impls:
            line = sorted((row["T"], row["median_ms"], bool(row.get("noisy")))
                          for row in mode_rows if row["impl"] == impl and row["model"] == model)
            if not line:
                continue
            recurrent = model != "attention"
            style = dict(marker="o" if recurrent else "s",
                         linestyle="-" if recurrent else "--", color=colors[(model, impl)])
            handles[(model, impl)] = ax.plot([t for t, _, _ in line], [ms for _, ms, _ in line],
                                             label=f"{model}: {impl}", **style)[0]
            noisy = [(t, ms) for t, ms, flag in line if flag]
            if noisy:
                any_noisy = True
                ax.plot([t for t, _ in noisy], [ms for _, ms in noisy], linestyle="none",
                        marker=style["marker"], markersize=8, markerfacecolor="white",
                        markeredgecolor=style["color"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # Plain numbers (0.2, not 2 x 10^-1); between the decades only 2 and 5 are
        # labelled, and none when the axis spans more than two decades (they collide).
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        times = [row["median_ms"] for row in mode_rows]
        if max(times) / min(times) < 100:
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))
        else:
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        lengths = sorted({row["T"] for row in mode_rows})
        ax.set_xticks(lengths, [str(t) for t in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        # A little room either side so end markers and labels are not cut by the frame.
        ax.set_xlim(lengths[0] / 1.25, lengths[-1] * 1.25)
        points, text = crossover_text(mode_rows)
        for x, align, valign, height in _label_positions(points, *ax.get_xlim()):
            ax.axvline(x, color="0.3", linestyle=":", linewidth=1.2)
            ax.annotate(f"crossover\nT ≈ {x:.0f}", xy=(x, height), xycoords=("data", "axes fraction"),
                        xytext=(4 if align == "left" else -4, 0), textcoords="offset points",
                        ha=align, va=valign, fontsize=9, color="0.2",
                        bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none",
                                  alpha=0.85))
        # No line break inside "T ≈ 320": its spaces become non-breaking for the wrap.
        text = textwrap.fill(text.replace("T ≈ ", "T\u00a0≈\u00a0"), 48)
        ax.set_title(f"{MODE_TITLES.get(mode, mode)}\n{text}", fontsize=10)
        ax.set_xlabel("context length T" if mode == "decode" else "sequence length T")
        ax.set_ylabel("time per call (ms, median)")
        ax.grid(True, which="both", alpha=0.3)
    legend = [handles[key] for key in impls if key in handles]
    if any_noisy:
        legend.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="white",
                             markeredgecolor="0.3", label="hollow: flagged noisy, not trusted"))
    # as many columns as the figure's width holds (about two per panel)
    figure.legend(handles=legend, loc="outside lower center",
                  ncols=min(len(legend), 2 * len(modes) + 1),
                  fontsize=9, frameon=False)
    config = data.get("config", {})
    device = data.get("device", {})
    model = recurrent_model(rows)
    figure.suptitle(f"{CELL_TITLES.get(model, model)} vs causal attention on {device.get('name', '?')} — "
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
