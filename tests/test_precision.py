"""Which autocast dtype each precision setting resolves to."""

import pytest
import torch

from app import modeling
from app.modeling import autocast_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("choice, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_explicit_choices_are_taken_as_given(choice, dtype):
    assert autocast_dtype(choice, CPU) is dtype
    assert autocast_dtype(choice, CPU, bf16_on_cpu=False) is dtype


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_uses_bf16_only_where_native_and_asked(monkeypatch, native, expected):
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype("auto", CPU) is expected  # inference
    assert autocast_dtype("auto", CPU, bf16_on_cpu=False) is None  # training without train.cpu_bf16


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_cpu_training_autocast_follows_train_cpu_bf16(monkeypatch, cpu_bf16):
    from app.config import load_config
    from app.engine import training_autocast_dtype

    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: True)
    config = load_config(overrides={"train.cpu_bf16": cpu_bf16})
    assert training_autocast_dtype(config, CPU) is (torch.bfloat16 if cpu_bf16 else None)
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: False)
    assert training_autocast_dtype(config, CPU) is None  # never emulated bf16


def test_autocast_fp32_is_a_no_op():
    with modeling.autocast(CPU, None):
        assert not torch.is_autocast_enabled("cpu")
    with modeling.autocast(CPU, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
