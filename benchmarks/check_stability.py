"""Check the stability target of issue 14 on this machine: two back-to-back
``rnnkernels-bench --quick`` runs, then the verdict (see rnnkernels/bench/stability.py).

    python benchmarks/check_stability.py              # same as: rnnkernels-bench stability
    python benchmarks/check_stability.py -- --device cpu

Run it on a quiet machine: with other work running, rows are (correctly) flagged noisy
and medians move, and the verdict says NOT STABLE.
"""

import sys

from rnnkernels.bench.stability import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/check_stability.py"))
