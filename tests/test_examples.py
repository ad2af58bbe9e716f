"""The examples run and learn (smoke versions, a few seconds each)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.torch
def test_train_sentiment_learns():
    pytest.importorskip("torch", reason="torch is not installed (pip install rnnkernels[torch])")
    example = _load("train_sentiment")
    history = example.main(epochs=2, train_size=1000, test_size=400, quiet=True)
    losses, accuracy = history["test_loss"], history["test_accuracy"]
    assert len(losses) == 3
    assert losses[-1] < 0.6 * losses[0], losses
    assert accuracy[-1] > 0.8, accuracy
