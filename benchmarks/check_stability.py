"""Check the stability target of issue 14 on this machine: two back-to-back
``rnnkernels-bench --quick`` runs, then the verdict (see rnnkernels/bench/stability.py).

    python benchmarks/check_stability.py              # same as: rnnkernels-bench stability
    python benchmarks/check_stability.py -- --device cpu

Run it on a quiet machine: with other work running, rows are (correctly) flagged noisy
and medians move, and the verdict says NOT STABLE. Beside the verdict it prints each
run's host calibration and sorts every median miss into host drift, competing load, or
ours (not explained by either): see rnnkernels/bench/stability.py.
"""

import sys
from pathlib import Path

# Check the checkout this script is in, even where another copy of rnnkernels is
# installed (an editable install of another worktree would be imported first); the two
# runs import the same copy (stability.run_twice passes it on).
_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "rnnkernels" / "__init__.py").exists():
    sys.path.insert(0, str(_CHECKOUT))

from rnnkernels.bench.stability import main  # noqa: E402 - after the path above

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/check_stability.py"))
