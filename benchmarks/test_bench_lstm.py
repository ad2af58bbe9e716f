"""pytest-benchmark: the lstm implementations of rnnkernels-bench (see conftest.py)."""

import pytest

from _common import validate_and_time

MODEL = "lstm"


@pytest.mark.parametrize("mode", ["forward", "training", "decode"])
def test_lstm(benchmark, impl_name, mode, seq_len, dtype, device, sizes):
    validate_and_time(benchmark, MODEL, impl_name, mode, seq_len, dtype, device, sizes)
