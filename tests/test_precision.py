"""Which autocast dtype each precision setting resolves to."""

import pytest
import torch

from app import modeling
from app.modeling import autocast_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("choice, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_explicit_choices_are_taken_as_given(choice, dtype):
    assert autocast_dtype(choice, CPU) is dtype
    assert autocast_dtype(choice, CPU, for_training=True) is dtype


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_uses_bf16_for_inference_only_where_native(monkeypatch, native, expected):
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype("auto", CPU) is expected
    assert autocast_dtype("auto", CPU, for_training=True) is None  # training on the CPU stays fp32


def test_autocast_fp32_is_a_no_op():
    with modeling.autocast(CPU, None):
        assert not torch.is_autocast_enabled("cpu")
    with modeling.autocast(CPU, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
