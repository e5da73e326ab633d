"""The DeepSpeed JSON built from the typed config, and one real single-rank DeepSpeed run on the CPU."""


import pytest
import torch

from app.config import load_config
from app.deepspeed import (
    build_deepspeed_config,
    deepspeed_env,
    process_group_backend,
    resolve_training_precision,
    shutdown_engine,
    zero3_loading,
)

CPU = torch.device("cpu")


def ds_config(overrides, world_size=2, device=CPU):
    return build_deepspeed_config(load_config(None, {"deepspeed.enabled": True, **overrides}), world_size, device)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_batch_sizes_clipping_and_stage(stage):
    built = ds_config({"deepspeed.stage": stage, "train.batch_size": 4, "train.grad_accum_steps": 3,
                       "train.max_grad_norm": 0.5}, world_size=5)
    assert built["train_micro_batch_size_per_gpu"] == 4
    assert built["gradient_accumulation_steps"] == 3
    assert built["train_batch_size"] == 4 * 3 * 5
    assert built["gradient_clipping"] == 0.5
    assert built["zero_optimization"]["stage"] == stage
    assert "optimizer" not in built and "scheduler" not in built  # ours go to deepspeed.initialize


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_buckets_and_overlap_follow_the_config(stage):
    zero = ds_config({"deepspeed.stage": stage, "deepspeed.bucket_size": 7_000_000,
                      "deepspeed.overlap_comm": False})["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 7_000_000
    assert zero["overlap_comm"] is False
    assert ("stage3_prefetch_bucket_size" in zero) == (stage == 3)
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)


def test_stage_zero_has_no_zero_settings():
    assert ds_config({"deepspeed.stage": 0})["zero_optimization"] == {"stage": 0}


def test_no_offload_by_default():
    built = ds_config({"deepspeed.stage": 3})
    assert "offload_optimizer" not in built["zero_optimization"]
    assert "offload_param" not in built["zero_optimization"]
    assert "zero_force_ds_cpu_optimizer" not in built


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_offload_accepts_our_torch_adamw(stage):
    built = ds_config({"deepspeed.stage": stage, "deepspeed.offload_optimizer": True})
    assert built["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert built["zero_force_ds_cpu_optimizer"] is False
    assert "offload_param" not in built["zero_optimization"]


def test_param_offload_in_stage3_and_pinned_memory_only_for_gpus():
    overrides = {"deepspeed.stage": 3, "deepspeed.offload_optimizer": True, "deepspeed.offload_params": True,
                 "train.precision": "bf16"}
    on_cpu = ds_config(overrides)["zero_optimization"]
    on_gpu = ds_config(overrides, device=torch.device("cuda"))["zero_optimization"]
    assert on_cpu["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert on_gpu["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert on_gpu["offload_optimizer"]["pin_memory"] is True


@pytest.mark.parametrize("precision, bf16, fp16", [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)])
def test_explicit_precision(precision, bf16, fp16):
    built = ds_config({"train.precision": precision})
    assert built["bf16"]["enabled"] is bf16
    assert built["fp16"]["enabled"] is fp16
    if fp16:
        assert built["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_auto_precision_is_fp32_for_cpu_training():
    built = ds_config({"train.precision": "auto"})
    assert not built["bf16"]["enabled"] and not built["fp16"]["enabled"]


def test_auto_precision_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_training_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_training_precision("auto", torch.device("cuda")) == "fp16"


def test_auto_precision_for_a_gpu_needs_the_worker(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="train.precision"):
        build_deepspeed_config(load_config(None, {"scaling.use_gpu": True}), 2)


def test_world_size_must_be_positive():
    with pytest.raises(ValueError, match="world_size"):
        ds_config({}, world_size=0)


def test_worker_environment_and_backend():
    cpu_config = load_config(None, {"scaling.use_gpu": False})
    gpu_config = load_config(None, {"scaling.use_gpu": True})
    assert deepspeed_env(cpu_config)["DS_ACCELERATOR"] == "cpu"
    assert deepspeed_env(gpu_config)["DS_ACCELERATOR"] == "cuda"
    assert process_group_backend(cpu_config) == "gloo"
    assert process_group_backend(gpu_config) == "nccl"


def test_zero3_loading_registers_only_for_stage3():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    with zero3_loading(ds_config({"deepspeed.stage": 2})) as registration:
        assert registration is None and not is_deepspeed_zero3_enabled()
    with zero3_loading(ds_config({"deepspeed.stage": 3})):
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()  # unregistered on exit


@pytest.mark.parametrize("overrides", [
    {"deepspeed.stage": 2},
    {"deepspeed.stage": 3},
    {"deepspeed.stage": 2, "deepspeed.offload_optimizer": True},
    {"deepspeed.stage": 3, "deepspeed.offload_optimizer": True, "deepspeed.offload_params": True},
    {"deepspeed.stage": 3, "train.precision": "bf16"},
], ids=["zero2", "zero3", "zero2-offload", "zero3-offload", "zero3-bf16"])
def test_deepspeed_trains_a_tiny_model_on_one_cpu_rank(single_rank_group, overrides):
    """The generated JSON drives a real engine over our AdamW and schedule (ZeRO-2 / ZeRO-3, CPU offload
    with torch AdamW, bf16): the loss goes down over 3 steps, and shutdown leaves no process group behind.

    The first DeepSpeed start in a fresh environment compiles its CPU comm op (~3 min, cached after)."""
    import deepspeed

    single_rank_group()
    config = load_config(None, {"deepspeed.enabled": True, "train.batch_size": 16, "train.precision": "fp32",
                                "deepspeed.bucket_size": 1_000_000, **overrides})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(config, world_size=1, device=CPU))
    inputs, labels = torch.randn(16, 8), torch.randint(0, 3, (16,))
    expected_dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    assert engine.module[0].weight.dtype == expected_dtype  # the engine casts the module itself
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(engine(inputs.to(expected_dtype)).float(), labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert engine.global_steps == 3
    assert losses[-1] < losses[0], losses
    shutdown_engine(engine)
    assert not torch.distributed.is_initialized()


def test_zero3_loading_makes_from_pretrained_load_partitioned(single_rank_group, tmp_path):
    """Under zero3_loading, transformers builds the model inside deepspeed.zero.Init: parameters are
    partitioned at load, hold the saved values when gathered, and the engine trains them."""
    import deepspeed
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    architecture = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=3)
    saved = LlamaForSequenceClassification(architecture)
    saved.save_pretrained(tmp_path)
    single_rank_group()
    config = load_config(None, {"deepspeed.enabled": True, "deepspeed.stage": 3, "train.batch_size": 8,
                                "train.precision": "fp32", "deepspeed.bucket_size": 1_000_000})
    built = build_deepspeed_config(config, world_size=1, device=CPU)
    with zero3_loading(built):
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.numel() == 0 and weight.ds_numel == 64 * 64  # this rank holds a (here empty) partition
    with deepspeed.zero.GatheredParameters([weight]):
        torch.testing.assert_close(weight.data, saved.model.layers[0].self_attn.q_proj.weight.data)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=built)
    input_ids, labels = torch.randint(1, 128, (8, 16)), torch.randint(0, 3, (8,))
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(engine(input_ids=input_ids).logits, labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    shutdown_engine(engine)
