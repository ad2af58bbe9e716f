"""The examples run and learn (smoke versions, seconds each).

Each runs in a fresh interpreter with one thread per pool: on a small shared CI
machine the per-step GEMMs are tiny, and idle BLAS and torch threads spinning
against each other made the same run twice as slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RUN_SENTIMENT = """
import json, sys
sys.path.insert(0, "examples")
import train_sentiment
print(json.dumps(train_sentiment.main(epochs=2, train_size=1000, test_size=400, quiet=True)))
"""


@pytest.mark.torch
def test_train_sentiment_learns():
    pytest.importorskip("torch", reason="torch is not installed (pip install rnnkernels[torch])")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", RUN_SENTIMENT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    history = json.loads(done.stdout.strip().splitlines()[-1])
    losses, accuracy = history["test_loss"], history["test_accuracy"]
    assert len(losses) == 3
    assert losses[-1] < 0.6 * losses[0], losses
    assert accuracy[-1] > 0.8, accuracy


@pytest.mark.torch
def test_train_sentiment_sets_one_thread_per_library_on_small_machines(monkeypatch):
    pytest.importorskip("torch", reason="torch is not installed (pip install rnnkernels[torch])")
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import train_sentiment

    def policy(argv, cores, **environment):
        for name in train_sentiment.THREAD_VARIABLES:
            # setenv first, so that monkeypatch records the variable's original state
            # (delenv of an unset variable records nothing) and its undo also removes
            # what set_thread_policy writes: a NUMBA_NUM_THREADS left behind breaks
            # every later Numba compilation in this process.
            monkeypatch.setenv(name, "0")
            monkeypatch.delenv(name)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(train_sentiment.os, "cpu_count", lambda: cores)
        train_sentiment.set_thread_policy(argv)
        return [os.environ.get(name) for name in train_sentiment.THREAD_VARIABLES]

    assert policy([], 2) == ["1"] * 4
    assert policy([], 16) == [None] * 4  # a large machine keeps the libraries' defaults
    assert policy([], 2, OMP_NUM_THREADS="2") == ["2", None, None, None]  # the user's choice
    assert policy(["--threads", "3"], 2) == ["3"] * 4
    assert policy(["--epochs", "1", "--threads=2"], 16) == ["2"] * 4
