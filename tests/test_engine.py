"""How workers step: fp32 master weights under 16-bit compute, optimizer groups that survive ZeRO-3's
partitioning, and exports that only the saving rank copies to host memory.

GPU behaviour is simulated at its narrowest: `torch.cuda.is_available` / `is_bf16_supported` answer as a bf16
GPU does (that is what makes `model.dtype=auto` choose bf16), and the compute stays on the CPU under bf16
autocast."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import app.engine
from app.config import load_config
from app.deepspeed import build_deepspeed_config, shutdown_engine, zero3_loading
from app.engine import TorchStepper, build_optimizer
from app.families import model_dtype
from app.modeling import autocast, build_model, build_tokenizer, forward_batch, save_checkpoint
from modeling_helpers import encoded_rows

CPU = torch.device("cpu")
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.fixture
def bf16_gpu(monkeypatch):
    """A process that sees a bf16-capable GPU, as far as dtype choices go; Ray Train's prepare_model is what
    it is for one worker without a process group (the model as it is). peft and bitsandbytes are imported
    first: bitsandbytes picks its kernels at import, and must keep the CPU's."""
    import peft  # noqa: F401  (imports bitsandbytes)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(app.engine.ray.train.torch, "prepare_model", lambda model, *args, **kwargs: model)
    assert model_dtype("auto") == torch.bfloat16


def one_step(config, stepper, tokenizer) -> None:
    sequences, segments = encoded_rows(tokenizer, config)
    stepper.model.train()
    with autocast(CPU, stepper.amp_dtype):
        logits, _ = forward_batch(stepper.model, sequences, segments, tokenizer.pad_token_id, CPU)
    stepper.backward(torch.nn.functional.cross_entropy(logits.float(), LABELS), boundary=True)
    stepper.step()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_trained_weights_and_adamw_state_are_fp32_under_a_bf16_gpu_dtype_choice(bf16_gpu, method, tmp_path):
    """At lr 1e-5 a bf16 weight loses most AdamW updates to rounding (a norm gain at 1.0 moves in steps of
    2^-7): every trained parameter must be an fp32 master, and one step must move every one of them."""
    config = load_config(None, {"model.kind": "decoder", "model.name_or_path": "random:llama-tiny",
                                "adapter.method": method, "adapter.r": 4, "format.max_length": 96,
                                "train.lr": 1e-5, "train.warmup_ratio": 0.0, "train.precision": "bf16"})
    tokenizer = build_tokenizer(config)
    stepper = TorchStepper(build_model(config), config, total_steps=10, device=CPU)
    assert stepper.amp_dtype == torch.bfloat16  # compute in bf16 ...
    trained = {name: param for name, param in stepper.model.named_parameters() if param.requires_grad}
    assert {param.dtype for param in trained.values()} == {torch.float32}  # ... on fp32 masters
    if method == "lora":  # the frozen base stays in the GPU's dtype; the head copy trains in fp32
        frozen = {param.dtype for param in stepper.model.parameters() if not param.requires_grad}
        assert frozen == {torch.bfloat16}
        assert any("modules_to_save" in name for name in trained)
    gains = [name for name, param in trained.items() if "norm" in name and bool((param == 1).all())]
    assert gains or method == "lora"
    before = {name: param.detach().clone() for name, param in trained.items()}

    one_step(config, stepper, tokenizer)

    states = [tensor for state in stepper.optimizer.state.values() for key, tensor in state.items()
              if key in ("exp_avg", "exp_avg_sq")]
    assert len(states) == 2 * len(trained) and {tensor.dtype for tensor in states} == {torch.float32}
    unchanged = [name for name, param in trained.items() if torch.equal(param, before[name])]
    assert not unchanged, f"one step at lr 1e-5 left these unchanged: {unchanged}"

    if method == "full":  # the inference export is written in model.dtype: bf16 here
        save_checkpoint(str(tmp_path), stepper.model, tokenizer, config, {}, epoch=0)
        with safe_open(tmp_path / "model.safetensors", "pt") as handle:
            assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}
        assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def groups_by_name(model, optimizer) -> dict[str, tuple[float, float]]:
    """Parameter name -> (lr, weight decay) of the optimizer group that holds it."""
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(param)]: (group["lr"], group["weight_decay"])
            for group in optimizer.param_groups for param in group["params"]}


def tiny_zero_config(stage: int):
    return load_config(None, {"model.kind": "decoder", "model.name_or_path": "random:llama-tiny",
                              "deepspeed.enabled": True, "deepspeed.stage": stage, "train.precision": "fp32",
                              "train.batch_size": 2, "deepspeed.bucket_size": 1_000_000,
                              "scaling.num_workers": 1})


def test_zero3_optimizer_groups_match_stage_zero(single_rank_group):
    """ZeRO-3 leaves each rank an empty 1-D placeholder per parameter: decay decided by `ndim` put every
    weight in the no-decay group. The groups must be those of the same model unpartitioned."""
    single_rank_group()
    unpartitioned = build_model(tiny_zero_config(0))
    expected = groups_by_name(unpartitioned, build_optimizer(unpartitioned, tiny_zero_config(0)))
    config = tiny_zero_config(3)
    with zero3_loading(build_deepspeed_config(config, world_size=1, device=CPU)):
        partitioned = build_model(config)
    assert all(param.numel() == 0 for param in partitioned.parameters())  # every weight is a placeholder here
    got = groups_by_name(partitioned, build_optimizer(partitioned, config))
    assert got == expected
    assert {decay for _, decay in got.values()} == {0.0, config.train.weight_decay}


def test_only_the_saving_rank_keeps_a_host_copy_of_the_zero3_export(single_rank_group):
    import deepspeed

    from app.engine import DeepSpeedStepper

    single_rank_group()
    config = tiny_zero_config(3)
    ds_config = build_deepspeed_config(config, world_size=1, device=CPU)
    with zero3_loading(ds_config):
        stepper = DeepSpeedStepper(build_model(config), config, total_steps=2, device=CPU, ds_config=ds_config)
    try:
        assert stepper.export_state_dict(keep=False) is None
        state = stepper.export_state_dict(keep=True)
        params = dict(stepper.engine.module.named_parameters())
        assert set(params) <= set(state)
        name = next(name for name in params if name.endswith("q_proj.weight"))
        with deepspeed.zero.GatheredParameters([params[name]]):
            torch.testing.assert_close(state[name], params[name].detach())
        assert state[name].device == CPU and state[name].shape == params[name].ds_shape
    finally:
        shutdown_engine(stepper.engine)


def test_the_export_cast_keeps_tied_weights_tied_and_views_apart():
    """Tied parameters stay one tensor in the bf16 export; two views into one storage (e.g. a fused projection's
    slices) keep their own values."""
    from app.modeling import in_dtype

    fused, tied = torch.arange(8.0), torch.nn.Parameter(torch.ones(4))
    exported = in_dtype({"first": fused[:4], "second": fused[4:], "embed": tied, "lm_head": tied}, torch.bfloat16)
    assert exported["first"].tolist() == [0, 1, 2, 3] and exported["second"].tolist() == [4, 5, 6, 7]
    assert exported["embed"] is exported["lm_head"] and exported["embed"].dtype == torch.bfloat16


def test_shards_of_ranks_beyond_the_checkpoints_writers_are_left_out(tmp_path):
    """A larger worker group that failed while writing step N's checkpoint leaves its higher ranks' shards in the
    folder that the next, smaller group writes step N into: DeepSpeed must see only the writers' own."""
    from app.engine import DEEPSPEED_TAG, own_shards

    folder = tmp_path / "checkpoint" / DEEPSPEED_TAG
    folder.mkdir(parents=True)
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    for name in names:
        (folder / name).write_text(name)
    kept = Path(own_shards(str(tmp_path / "checkpoint"), 1, str(tmp_path / "scratch"))) / DEEPSPEED_TAG
    assert sorted(p.name for p in kept.iterdir()) == names[:2]
    assert (kept / names[1]).read_text() == names[1]
    assert own_shards(str(tmp_path / "checkpoint"), 2, str(tmp_path / "other")) == str(tmp_path / "checkpoint")
