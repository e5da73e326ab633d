"""LoRA / QLoRA: what trains, what a checkpoint holds, reloading, merging, and 8-bit inference."""

import os

import bitsandbytes as bnb
import pytest
import torch
from modeling_helpers import build, eval_loss, logits_of, tiny_config, train_steps
from safetensors import safe_open

from app.adapters import build_4bit_config, build_lora_config, quantization_config
from app.config import PACKAGED_MINILM
from app.families import unwrap_network
from app.modeling import load_checkpoint, merge_adapter, resolve_model_path, save_checkpoint

HEADS = {"classifier", "score"}  # the fresh heads of BERT and Llama-style sequence classifiers


def perturb_trainable(model) -> None:
    """Move every trainable weight off its initialisation (LoRA B starts at zero) without training."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def expected_trainable(kind: str, name: str, r: int) -> int:
    """LoRA's r * (in + out) for every linear layer of the base (not the LM head), plus the whole new head."""
    network = unwrap_network(build(tiny_config(kind, name))[0])
    total = 0
    for module_name, module in network.named_modules():
        top = module_name.split(".")[0]
        if top in HEADS:
            total += sum(p.numel() for p in module.parameters(recurse=False))
        elif isinstance(module, torch.nn.Linear) and module_name != "lm_head":
            total += r * (module.in_features + module.out_features)
    return total


@pytest.mark.parametrize("kind, name, method", [
    ("encoder", PACKAGED_MINILM, "lora"),
    ("decoder", "random:llama-tiny", "lora"),
    ("decoder_lm", "random:gemma2-tiny", "lora"),
    ("t5", "random:t5-tiny", "lora"),
    ("decoder", "random:qwen2-tiny", "qlora"),
    ("decoder_lm", "random:llama-tiny", "qlora"),
])
def test_only_the_adapter_and_the_new_head_train(kind, name, method):
    model = build(tiny_config(kind, name, method))[0]
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n for n in trainable), sorted(trainable)
    assert any("modules_to_save" in n for n in trainable) == (kind in ("encoder", "decoder"))
    assert sum(trainable.values()) == expected_trainable(kind, name, r=4)


@pytest.mark.parametrize("kind, name, method", [
    ("decoder", "random:llama-tiny", "lora"),
    ("t5", "random:t5-tiny", "lora"),
    ("decoder", "random:qwen2-tiny", "qlora"),
    ("decoder_lm", "random:llama-tiny", "qlora"),
])
def test_a_few_adapter_steps_lower_the_loss(kind, name, method):
    model, tokenizer, rows = build(tiny_config(kind, name, method))
    before = eval_loss(model, tokenizer, rows)
    train_steps(model, tokenizer, rows, lr=5e-3)
    assert eval_loss(model, tokenizer, rows) < before - 0.05


def test_qlora_quantizes_the_base_to_4bit_in_the_model_dtype_and_keeps_the_head():
    model = build(tiny_config("decoder", "random:qwen2-tiny", "qlora"))[0]
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14  # 7 projections x 2 layers
    assert {m.weight.quant_type for m in quantized} == {"nf4"}
    assert {m.weight.dtype for m in quantized} == {torch.float32}  # quant storage = the model dtype
    head = model.base_model.model.score.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.requires_grad


@pytest.mark.parametrize("kind, name, method", [
    ("encoder", PACKAGED_MINILM, "lora"),
    ("decoder", "random:llama-tiny", "lora"),
    ("decoder_lm", "random:gemma2-tiny", "lora"),
    ("t5", "random:t5-tiny", "lora"),
    ("decoder", "random:qwen2-tiny", "qlora"),
])
def test_adapter_checkpoints_hold_adapter_and_head_only_and_reload_identically(kind, name, method, tmp_path):
    config = tiny_config(kind, name, method)
    model, tokenizer, rows = build(config)
    perturb_trainable(model)
    expected = logits_of(model, tokenizer, rows)
    save_checkpoint(str(tmp_path), model, tokenizer, config, {}, epoch=1)
    assert not os.path.exists(tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all("lora_" in key or key.split(".")[2] in HEADS for key in keys), keys
    loaded = load_checkpoint(str(tmp_path))
    assert loaded.meta["adapter"] == method and loaded.tokenizer.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(logits_of(loaded.model, loaded.tokenizer, rows), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind, name, method", [
    ("decoder", "random:llama-tiny", "lora"),
    ("decoder_lm", "random:gemma2-tiny", "lora"),  # tied input / output embeddings
    ("t5", "random:t5-tiny", "lora"),
    ("decoder", "random:qwen2-tiny", "qlora"),
])
def test_a_merged_checkpoint_predicts_like_the_adapter(kind, name, method, tmp_path):
    config = tiny_config(kind, name, method)
    model, tokenizer, rows = build(config)
    perturb_trainable(model)
    save_checkpoint(str(tmp_path / "adapter"), model, tokenizer, config, {"valid_log_loss": 0.9}, epoch=1)
    adapter = load_checkpoint(str(tmp_path / "adapter"))
    merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = load_checkpoint(str(tmp_path / "merged"))
    assert merged.meta["adapter"] == "full" and merged.meta["metrics"] == {"valid_log_loss": 0.9}
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.model.modules())
    torch.testing.assert_close(logits_of(merged.model, merged.tokenizer, rows),
                               logits_of(adapter.model, adapter.tokenizer, rows), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no adapter to merge"):
        merge_adapter(str(tmp_path / "merged"), str(tmp_path / "again"))


def test_8bit_inference_loads_the_base_in_int8_and_keeps_the_head(tmp_path):
    config = tiny_config("decoder", "random:llama-tiny", "lora")
    model, tokenizer, rows = build(config)
    perturb_trainable(model)
    expected = torch.softmax(logits_of(model, tokenizer, rows), -1)
    save_checkpoint(str(tmp_path), model, tokenizer, config, {}, epoch=0)
    loaded = load_checkpoint(str(tmp_path), load_in_8bit=True)
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in loaded.model.modules()) == 14
    assert type(loaded.model.base_model.model.score.modules_to_save["default"]) is torch.nn.Linear
    probs = torch.softmax(logits_of(loaded.model, loaded.tokenizer, rows), -1)
    torch.testing.assert_close(probs, expected, atol=0.05, rtol=0)


def test_8bit_inference_of_a_full_decoder_lm_checkpoint_follows_the_config(tmp_path):
    config = tiny_config("decoder_lm", "random:llama-tiny", **{"adapter.load_in_8bit_for_inference": True})
    model, tokenizer, rows = build(config)
    save_checkpoint(str(tmp_path), model, tokenizer, config, {}, epoch=0)
    loaded = load_checkpoint(str(tmp_path))
    network = unwrap_network(loaded.model)
    assert isinstance(network.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert type(network.lm_head) is torch.nn.Linear  # transformers keeps the LM head out of int8
    torch.testing.assert_close(torch.softmax(logits_of(loaded.model, loaded.tokenizer, rows), -1),
                               torch.softmax(logits_of(model, tokenizer, rows), -1), atol=0.05, rtol=0)


@pytest.mark.parametrize("kind, name, method", [
    ("decoder", "random:llama-tiny", "lora"),
    ("decoder_lm", "random:llama-tiny", "full"),  # our wrapper: names start with "model."
    ("t5", "random:t5-tiny", "full"),
])
def test_save_checkpoint_writes_a_given_state_dict_instead_of_the_model_weights(kind, name, method, tmp_path):
    """What ZeRO-3 does: the model's own parameters are empty shards, the gathered state dict is the truth."""
    config = tiny_config(kind, name, method)
    model, tokenizer, rows = build(config)
    perturb_trainable(model)
    expected = logits_of(model, tokenizer, rows)
    gathered = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or method == "full"}
    if method == "full":
        gathered |= {n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    save_checkpoint(str(tmp_path), model, tokenizer, config, {}, epoch=0, state_dict=gathered)
    loaded = load_checkpoint(str(tmp_path))
    torch.testing.assert_close(logits_of(loaded.model, loaded.tokenizer, rows), expected, atol=1e-6, rtol=0)


def test_lora_without_training_a_new_head_is_rejected():
    with pytest.raises(ValueError, match="adapter.train_head=true"):
        build(tiny_config("decoder", "random:llama-tiny", "lora", **{"adapter.train_head": False}))
    model = build(tiny_config("decoder_lm", "random:llama-tiny", "lora", **{"adapter.train_head": False}))[0]
    assert not any("modules_to_save" in n for n, _ in model.named_parameters())  # no new head to train


def test_peft_and_bitsandbytes_configs_come_from_the_adapter_section():
    config = tiny_config("decoder", "random:llama-tiny", "qlora", **{
        "adapter.quant_type": "fp4", "adapter.double_quant": False, "adapter.compute_dtype": "bf16",
        "adapter.alpha": 8, "adapter.dropout": 0.1, "adapter.target_modules": ["q_proj", "v_proj"]})
    quant = build_4bit_config(config, ["score"])
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "fp4" and not quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16 and quant.bnb_4bit_quant_storage == torch.float32
    assert quant.llm_int8_skip_modules == ["score"]
    lora = build_lora_config(config, ["score"])
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (4, 8, 0.1)
    assert set(lora.target_modules) == {"q_proj", "v_proj"} and lora.modules_to_save == ["score"]
    path = resolve_model_path("random:llama-tiny")
    training = quantization_config(config, path, for_inference=False)
    assert training.load_in_4bit and training.llm_int8_skip_modules == ["score"]  # found from the architecture
    full = tiny_config("decoder", "random:llama-tiny", "full")
    assert quantization_config(full, path, for_inference=True) is None
    eight = tiny_config("decoder", "random:llama-tiny", "qlora", **{"adapter.load_in_8bit_for_inference": True})
    assert quantization_config(eight, path, for_inference=True).load_in_8bit
    assert quantization_config(eight, path, for_inference=False).load_in_4bit


def test_under_deepspeed_fp16_the_4bit_storage_is_fp16(monkeypatch):
    """On a GPU without bf16 (T4, V100) model.dtype=auto is fp32, and DeepSpeed's fp16 mode casts every
    floating-point parameter of the module to fp16: packed 4-bit bytes stored as fp32 would be converted value
    by value. The storage follows the training precision under DeepSpeed (and the model dtype elsewhere)."""
    import peft  # noqa: F401  (bitsandbytes picks its CPU kernels at import, before the GPU is simulated)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    gpu = {"model.dtype": "auto", "scaling.use_gpu": True, "train.precision": "auto"}
    deepspeed = tiny_config("decoder", "random:llama-tiny", "qlora", **gpu, **{"deepspeed.enabled": True})
    assert build_4bit_config(deepspeed, ["score"]).bnb_4bit_quant_storage == torch.float16
    assert build_4bit_config(deepspeed, ["score"], for_training=False).bnb_4bit_quant_storage == torch.float32
    plain = tiny_config("decoder", "random:llama-tiny", "qlora", **gpu)
    assert build_4bit_config(plain, ["score"]).bnb_4bit_quant_storage == torch.float32  # nothing casts it


@pytest.mark.parametrize("storage", [torch.float16, torch.float32])
def test_casting_the_module_to_fp16_keeps_4bit_weights_only_in_fp16_storage(storage):
    """What DeepSpeed's fp16 mode does to a QLoRA base (module.half()), on bitsandbytes' CPU kernels: fp16
    storage is left as it is, and the layer computes what it did; fp32 storage is converted element by element
    and the packed weights are lost (here the layer can no longer even be run)."""
    torch.manual_seed(0)
    weight, inputs = torch.randn(64, 64), torch.randn(5, 64)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", quant_storage=storage)
    layer = layer.to("cpu")
    with torch.no_grad():
        before = layer(inputs)
        layer.half()
        if storage == torch.float32:
            with pytest.raises(RuntimeError):
                layer(inputs.half())
            return
        after = layer(inputs.half()).float()
    torch.testing.assert_close(after, before, atol=0.02, rtol=0.01)  # only the fp16 input's rounding
