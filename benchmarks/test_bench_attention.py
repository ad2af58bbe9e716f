"""pytest-benchmark: the attention implementations of rnnkernels-bench (see conftest.py)."""

import pytest

from _common import validate_and_time

MODEL = "attention"


@pytest.mark.parametrize("mode", ["forward", "training", "decode"])
def test_attention(benchmark, impl_name, mode, seq_len, dtype, device, sizes):
    validate_and_time(benchmark, MODEL, impl_name, mode, seq_len, dtype, device, sizes)
