"""``rnnkernels-bench stability``: are the figures of two back-to-back runs the same?

    rnnkernels-bench stability                      # two --quick runs, then the verdict
    rnnkernels-bench stability -- --device cpu      # words after -- go to both runs
    rnnkernels-bench stability --compare A.json B.json   # judge two saved runs

The target (issue 14): on a quiet machine, two back-to-back ``--quick`` runs agree
within ``AGREEMENT`` (20%) on every median, and every row's p90/p10 is under the noise
limit (1.5) or the row is flagged ``noisy``. The verdict lists every row that misses, and
the rows the benchmark itself flagged (a flagged row is honest, but the run is only
stable when the medians agree as well). Exit status 0 when the target holds, 1 when it
does not, 2 when a run failed or the files cannot be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from .plot import require_matplotlib
from .timing import NOISE_LIMIT

AGREEMENT = 0.2  # largest accepted relative difference between the two medians


def row_key(row: dict) -> tuple:
    return (row["mode"], row["model"], row["impl"], row["T"])


def compare_runs(first: list[dict], second: list[dict], agreement: float = AGREEMENT,
                 noise_limit: float = NOISE_LIMIT) -> dict:
    """The verdict on two runs' result rows: ``stable`` (bool), ``compared`` (rows timed
    in both), ``problems`` (sentences, one per miss) and ``flagged`` (rows the runs
    flagged noisy). The difference of two medians a and b is max(a, b) / min(a, b) - 1,
    symmetric in the two runs."""
    problems: list[str] = []
    flagged: list[str] = []
    runs = [{row_key(row): row for row in rows} for rows in (first, second)]
    for key in sorted(set(runs[0]) | set(runs[1]), key=str):
        where = "{} {} {} T={}".format(*key)
        pair = [run.get(key) for run in runs]
        if None in pair:
            problems.append(f"{where}: only in run {1 if pair[1] is None else 2}")
            continue
        statuses = [row["status"] for row in pair]
        if statuses != ["ok", "ok"]:
            if statuses[0] != statuses[1]:
                problems.append(f"{where}: status {statuses[0]} then {statuses[1]}")
            continue
        for run, row in enumerate(pair, 1):
            if row.get("noisy"):
                flagged.append(f"{where} (run {run}): {row.get('noise_reason')}")
            elif row["p90_ms"] / row["p10_ms"] >= noise_limit:
                problems.append(f"{where} (run {run}): p90/p10 = "
                                f"{row['p90_ms'] / row['p10_ms']:.2f} and not flagged")
        a, b = pair[0]["median_ms"], pair[1]["median_ms"]
        difference = max(a, b) / min(a, b) - 1
        if difference > agreement:
            problems.append(f"{where}: medians {a:.4g} ms then {b:.4g} ms "
                            f"({100 * difference:.0f}% apart)")
    compared = sum(1 for key in set(runs[0]) & set(runs[1])
                   if runs[0][key]["status"] == runs[1][key]["status"] == "ok")
    return {"stable": not problems and compared > 0, "compared": compared,
            "problems": problems, "flagged": flagged}


def format_verdict(verdict: dict, agreement: float = AGREEMENT,
                   noise_limit: float = NOISE_LIMIT) -> str:
    lines = [f"{verdict['compared']} rows timed in both runs; target: medians within "
             f"{100 * agreement:.0f}%, p90/p10 < {noise_limit:g} or flagged noisy"]
    if verdict["flagged"]:
        lines.append(f"{len(verdict['flagged'])} rows flagged noisy by the benchmark:")
        lines += [f"  {text}" for text in verdict["flagged"]]
    if verdict["problems"]:
        lines.append(f"{len(verdict['problems'])} misses:")
        lines += [f"  {text}" for text in verdict["problems"]]
    if verdict["compared"] == 0:
        lines.append("no row was timed in both runs")
    lines.append("verdict: STABLE" if verdict["stable"] else "verdict: NOT STABLE")
    return "\n".join(lines)


def load_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return json.load(file)["results"]


def can_plot() -> bool:
    try:
        require_matplotlib()
    except RuntimeError:
        return False
    return True


def run_twice(folder: str, extra: list[str]) -> list[str] | None:
    """Two ``rnnkernels-bench --quick`` runs (JSON, and a plot to look at where
    matplotlib is installed), one after the other, each in a fresh
    process (so the second does not inherit the first's warm caches or compiled code:
    what a user who runs the command twice sees). The JSON paths, or None if a run failed."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for run in (1, 2):
        stem = os.path.join(folder, f"run{run}")
        command = [sys.executable, "-m", "rnnkernels.bench", "--quick", "--no-save",
                   "--json", stem + ".json", *extra]
        if can_plot():
            command += ["--plot", stem + ".png"]
        print(f"stability: run {run}: {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command)
        if done.returncode != 0:
            print(f"stability: run {run} exited with status {done.returncode}", file=sys.stderr)
            return None
        paths.append(stem + ".json")
    return paths


def main(argv=None, prog: str = "rnnkernels-bench stability") -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    extra: list[str] = []
    if "--" in words:
        extra = words[words.index("--") + 1:]
        words = words[:words.index("--")]
    parser = argparse.ArgumentParser(
        prog=prog, usage=f"{prog} [options] [-- BENCH-OPTIONS]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run rnnkernels-bench --quick twice back to back (BENCH-OPTIONS, after "
        "--, go to both runs)\nand say whether the figures agree: every median within "
        f"{100 * AGREEMENT:.0f}%, every row's p90/p10 under\n{NOISE_LIMIT:g} or the row "
        "flagged noisy. Exit status 0: stable; 1: not; 2: a run failed.")
    parser.add_argument("--runs-dir", default=os.path.join("rnnkernels-results", "stability"),
                        help="where the two runs' JSON go (default ./rnnkernels-results/stability)")
    parser.add_argument("--compare", nargs=2, metavar=("FIRST", "SECOND"),
                        help="judge two saved JSON files instead of running")
    parser.add_argument("--agreement", type=float, default=AGREEMENT,
                        help="largest accepted relative difference of two medians (default 0.2)")
    args = parser.parse_args(words)
    paths = args.compare or run_twice(args.runs_dir, extra)
    if paths is None:
        return 2
    try:
        rows = [load_rows(path) for path in paths]
    except (OSError, KeyError, json.JSONDecodeError) as error:
        print(f"stability: cannot read the runs: {error}", file=sys.stderr)
        return 2
    verdict = compare_runs(*rows, agreement=args.agreement)
    print(format_verdict(verdict, args.agreement))
    return 0 if verdict["stable"] else 1


if __name__ == "__main__":
    sys.exit(main())
