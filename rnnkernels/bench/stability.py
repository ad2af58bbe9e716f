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

Beside the verdict, a diagnosis: is the disagreement the host's or ours? Each run records
a fixed calibration workload timed inside every CPU cell (``timing.HostDrift``),
/proc/stat's steal time and the CPU time other processes took. The diagnosis compares
the two runs' calibrations (did the machine itself change speed?) and sorts every
median miss:
  * ``host``: the row's calibration (timed in the same repeat rounds) moved the same
    way, at least half as much, and enough that at equal calibration the two medians
    would have agreed (or more than the row did): whatever slowed the machine, the
    hypervisor or other processes, slowed a fixed workload as much, so it is not ours
    (only a diagnosis: no figure is ever corrected);
  * ``load``: not so, but other processes took more than the load limit of the CPU
    during the row (load can hit some calls harder than a short fixed workload);
  * ``ours``: neither: the machine ran at the same speed and nothing else ran, so the
    cause is in the benchmark or the code timed;
  * ``unknown``: a run without calibrations (a GPU run, or saved by an older version).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from .plot import require_matplotlib
from .timing import DRIFT_LIMIT, LOAD_LIMIT, NOISE_LIMIT, relative_gap

AGREEMENT = 0.2  # largest accepted relative difference between the two medians


def row_key(row: dict) -> tuple:
    return (row["mode"], row["model"], row["impl"], row["T"])


def miss_cause(pair: list[dict], agreement: float = AGREEMENT,
               load_limit: float = LOAD_LIMIT) -> tuple[str, str]:
    """Why the medians of one row in two runs missed the agreement (see the module
    docstring): (``host`` | ``load`` | ``ours`` | ``unknown``, a few words)."""
    a, b = pair[0]["median_ms"], pair[1]["median_ms"]
    # Stolen time is the hypervisor's (another guest): not counted as other processes.
    loads = [(row.get("other_load") or 0.0) - (row.get("steal") or 0.0) for row in pair]
    load = (f"; other processes took up to {100 * max(loads):.0f}% of the CPU"
            if max(loads) > load_limit else "")
    calibrations = [row.get("calibration_ms") for row in pair]
    if None in calibrations:
        return "unknown", "no calibration recorded" + load
    moved = calibrations[1] / calibrations[0]
    said = f"calibration {100 * (moved - 1):+.0f}%"
    # Explained: the calibration moved the same way, enough to bring what is left
    # within the agreement (or more than the row: a small dispatch-bound workload can
    # move more than a long call), and at least half as much as the row (a 3% move does
    # not explain a 22% one that happens to sit just past the agreement).
    row_move, calibration_move = math.log(b / a), math.log(moved)
    if (row_move * calibration_move > 0 and abs(calibration_move)
            >= max(0.5 * abs(row_move), abs(row_move) - math.log1p(agreement))):
        return "host", f"{said}: the machine's speed{load}"
    if load:
        return "load", said + load
    return "ours", f"{said}: not the machine"


def compare_runs(first: list[dict], second: list[dict], agreement: float = AGREEMENT,
                 noise_limit: float = NOISE_LIMIT) -> dict:
    """The verdict on two runs' result rows: ``stable`` (bool), ``compared`` (rows timed
    in both), ``problems`` (sentences, one per miss), ``flagged`` (rows the runs
    flagged noisy) and ``causes`` (how many median misses ``miss_cause`` put down to
    the host, to load, to us, or could not tell). The difference of two medians a and
    b is max(a, b) / min(a, b) - 1, symmetric in the two runs."""
    problems: list[str] = []
    flagged: list[str] = []
    causes = dict.fromkeys(("host", "load", "ours", "unknown"), 0)
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
        difference = relative_gap(a, b)
        if difference > agreement:
            cause, why = miss_cause(pair, agreement)
            causes[cause] += 1
            problems.append(f"{where}: medians {a:.4g} ms then {b:.4g} ms "
                            f"({100 * difference:.0f}% apart) [{cause}: {why}]")
    compared = sum(1 for key in set(runs[0]) & set(runs[1])
                   if runs[0][key]["status"] == runs[1][key]["status"] == "ok")
    return {"stable": not problems and compared > 0, "compared": compared,
            "problems": problems, "flagged": flagged, "causes": causes}


def steal_fraction(calibration: dict) -> float | None:
    """The fraction of the machine's CPU time stolen by the hypervisor between a run's
    first and last calibration (None when unknown)."""
    readings = calibration.get("readings") or []
    if len(readings) < 2 or None in (readings[0].get("steal_s"), readings[-1].get("steal_s")):
        return None
    wall = readings[-1]["at_s"] - readings[0]["at_s"]
    if wall <= 0:
        return None
    stolen = readings[-1]["steal_s"] - readings[0]["steal_s"]
    return stolen / (wall * (calibration.get("cpus") or 1))


def host_report(first: dict, second: dict, drift_limit: float = DRIFT_LIMIT) -> list[str]:
    """Lines on the host in the two runs (each a run's whole JSON): its calibration's
    median and range in each, its usual (undisturbed) time and how much of the run it
    was slower than that (runs that record it), whether the two runs differ by more than
    the drift limit (in the usual time where both record it: that is what each run's
    rounds were judged against; else in the median), stolen time, other processes'
    load, the CPU clock if it moved, and each run's wall time."""
    calibrations = [run.get("config", {}).get("calibration") for run in (first, second)]
    if None in calibrations or None in [c.get("median_ms") for c in calibrations]:
        return ["host: no calibration recorded in "
                + " and ".join(f"run {i}" for i, c in enumerate(calibrations, 1)
                               if not c or c.get("median_ms") is None)
                + " (a GPU run, or one saved by an older version): cannot tell the host "
                "from us"]
    lines = []
    for run, (data, calibration) in enumerate(zip((first, second), calibrations), 1):
        values = [reading["ms"] for reading in calibration["readings"]]
        stolen = steal_fraction(calibration)
        loads = [row["other_load"] for row in data["results"]
                 if row.get("status") == "ok" and row.get("other_load") is not None]
        clocks = sorted({reading["cpu_mhz"] for reading in calibration["readings"]
                         if reading.get("cpu_mhz")})
        usual, slow = calibration.get("usual_ms"), calibration.get("slow_fraction")
        wall = data.get("config", {}).get("wall_seconds")
        lines.append(
            f"host, run {run}: calibration median {calibration['median_ms']:.3f} ms "
            f"(attempts from {min(values):.3f} to {max(values):.3f}: "
            f"{100 * relative_gap(min(values), max(values)):.0f}% apart, {len(values)} attempts)"
            + ("" if usual is None or slow is None else
               f"; usual {usual:.3f} ms, over {100 * drift_limit:.0f}% slower than that in "
               f"{100 * slow:.0f}% of the rounds (not kept)")
            + ("" if stolen is None else f"; steal {100 * stolen:.1f}% of the CPU")
            + ("" if not loads else f"; other processes up to {100 * max(loads):.0f}%")
            + ("" if len(clocks) < 2 else f"; CPU clock {clocks[0]:.0f}-{clocks[-1]:.0f} MHz")
            + ("" if wall is None else f"; {wall:.1f} s"))
    usual = [calibration.get("usual_ms") for calibration in calibrations]
    which = "usual calibration time" if None not in usual else "calibration"
    figures = usual if None not in usual else [c["median_ms"] for c in calibrations]
    between = relative_gap(*figures)
    slower = 1 if figures[0] > figures[1] else 2
    if between > drift_limit:
        lines.append(f"host: run {slower}'s {which} was {100 * between:.0f}% slower "
                     f"than run {3 - slower}'s: the machine itself changed speed between the runs")
    else:
        lines.append(f"host: the two runs' {which}s agree within {100 * between:.0f}% "
                     f"(limit {100 * drift_limit:.0f}%): the machine ran at the same speed")
    return lines


def format_verdict(verdict: dict, agreement: float = AGREEMENT,
                   noise_limit: float = NOISE_LIMIT, host_lines: list[str] | None = None) -> str:
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
    lines += host_lines or []
    causes = verdict.get("causes") or {}
    misses = sum(causes.values())
    if misses:
        words = {"host": "moved with the calibration (the machine's speed)",
                 "load": "did not, but ran while other processes took the CPU (load)",
                 "ours": "are not explained by the host or load (ours to find)",
                 "unknown": "cannot be told (no calibration recorded)"}
        lines.append(f"diagnosis of the {misses} median misses: " + "; ".join(
            f"{count} {words[cause]}" for cause, count in causes.items() if count))
    return "\n".join(lines)


def load_run(path: str) -> dict:
    """A saved run's JSON; a KeyError when it has no ``results``."""
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    if "results" not in data:
        raise KeyError(f"{path} has no 'results': not a rnnkernels-bench run")
    return data


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
    what a user who runs the command twice sees), importing the same rnnkernels as this
    process (another copy may be installed). The JSON paths, or None if a run failed."""
    os.makedirs(folder, exist_ok=True)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    paths = []
    for run in (1, 2):
        stem = os.path.join(folder, f"run{run}")
        command = [sys.executable, "-m", "rnnkernels.bench", "--quick", "--no-save",
                   "--json", stem + ".json", *extra]
        if can_plot():
            command += ["--plot", stem + ".png"]
        print(f"stability: run {run}: {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command, env=environment)
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
        "flagged noisy. Then a diagnosis: the two runs' host calibrations, and for each\n"
        "median miss whether the machine's speed (the calibration timed in the row's "
        "rounds moved\nas much), other processes (load) or neither (ours) moved it. "
        "Exit status 0: stable;\n1: not; 2: a run failed.")
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
        runs = [load_run(path) for path in paths]
    except (OSError, KeyError, json.JSONDecodeError) as error:
        print(f"stability: cannot read the runs: {error}", file=sys.stderr)
        return 2
    verdict = compare_runs(*(run["results"] for run in runs), agreement=args.agreement)
    print(format_verdict(verdict, args.agreement, host_lines=host_report(*runs)))
    return 0 if verdict["stable"] else 1


if __name__ == "__main__":
    sys.exit(main())
