"""The one place that turns the typed `adapter` config into peft and bitsandbytes objects.

    full   every weight trains; nothing here.
    lora   peft LoRA on `target_modules` ("all-linear" or names); a sequence classifier's fresh head
           (see families.head_module_names) trains fully as peft `modules_to_save`.
    qlora  the base loaded in 4-bit (NF4 / FP4, double quantization, `bnb_4bit_quant_storage` = the model
           dtype so ZeRO-3 can shard the packed weights like any other), prepared for k-bit training,
           then LoRA as above.

Checkpoints of lora / qlora hold the adapter and the head only (peft `save_pretrained`); the base is
reloaded from `model.name_or_path`. At inference a qlora adapter goes back onto a 4-bit base quantized
exactly as in training (the adapter learned to correct that base; a bf16 base would shift predictions),
unless `adapter.load_in_8bit_for_inference` asks for an 8-bit base, as it may for any method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

from app.config import Config
from app.families import DTYPES, model_dtype, planned_head_module_names

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

# peft is imported inside the functions that use it: importing it costs seconds (it loads several model
# families), which full finetuning and full-weight prediction need not pay.


def build_4bit_config(config: Config, skip_modules: list[str], for_training: bool = True) -> BitsAndBytesConfig:
    """QLoRA's 4-bit quantization of the base; `skip_modules` (a fresh head) stay unquantized."""
    adapter = config.adapter
    dtype = model_dtype(config.model.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type,
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=dtype if adapter.compute_dtype == "auto" else DTYPES[adapter.compute_dtype],
        bnb_4bit_quant_storage=quant_storage_dtype(config, for_training),
        llm_int8_skip_modules=skip_modules or None,  # None keeps transformers' default: the LM head
    )


def quant_storage_dtype(config: Config, for_training: bool) -> torch.dtype:
    """The container dtype of the packed 4-bit weights (its size is the same whatever the dtype).

    It must be the dtype the rest of the module ends up in: DeepSpeed's bf16 / fp16 modes cast every floating
    parameter of the module to that dtype (`module.half()`, or zero.Init's dtype under ZeRO-3), and packed
    bytes stored as fp32 would be converted value by value into garbage weights, silently (on a T4 / V100,
    fp16 training with model.dtype=auto gave fp32 storage). So under DeepSpeed training the storage follows
    the training precision; elsewhere the model dtype (ZeRO-3 shards the packed weights like any other only
    if all share one dtype)."""
    if for_training and config.deepspeed.enabled:
        from app.deepspeed import default_device, resolve_training_precision

        precision = resolve_training_precision(config.train.precision, default_device(config))
        if precision != "fp32":
            return DTYPES[precision]
    return model_dtype(config.model.dtype)


def build_8bit_config(skip_modules: list[str]) -> BitsAndBytesConfig:
    """LLM.int8() weights for inference; `skip_modules` (a fresh head) stay unquantized."""
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules or None)


def quantization_config(config: Config, path: str, for_inference: bool) -> BitsAndBytesConfig | None:
    """How the weights at `path` are quantized when loaded: for training 4-bit under qlora; for inference
    8-bit when `adapter.load_in_8bit_for_inference`, else 4-bit under qlora (as trained), else not at all.
    A sequence classifier's new head always stays unquantized."""
    if for_inference and config.adapter.load_in_8bit_for_inference:
        return build_8bit_config(planned_head_module_names(path, config.model.kind))
    if config.adapter.method == "qlora":
        return build_4bit_config(config, planned_head_module_names(path, config.model.kind),
                                 for_training=not for_inference)
    return None


def build_lora_config(config: Config, head_modules: list[str]) -> LoraConfig:
    """peft's LoraConfig from `adapter.*`; the head modules are trained fully and saved with the adapter."""
    from peft import LoraConfig

    adapter = config.adapter
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        modules_to_save=list(head_modules) or None,
        bias="none",
    )


def apply_adapter(network: PreTrainedModel, config: Config, head_modules: list[str]) -> torch.nn.Module:
    """Wrap a freshly loaded network for `adapter.method`; full returns it unchanged.

    Raises ValueError for lora / qlora with `adapter.train_head=false` on a model with a fresh head: the head
    would stay random and, not being part of the adapter, could not be restored from the checkpoint.
    """
    method = config.adapter.method
    if method == "full":
        return network  # peft (and the bitsandbytes it imports: ~3 s) only where an adapter is used
    from peft import get_peft_model, prepare_model_for_kbit_training

    if head_modules and not config.adapter.train_head:
        raise ValueError(f"adapter.train_head=false with adapter.method={method} would leave the new head "
                         f"{head_modules} of model.kind={config.model.kind} random and out of the checkpoint; "
                         "set adapter.train_head=true (or use model.kind=decoder_lm, which needs no new head)")
    if method == "qlora" and not (config.deepspeed.enabled and config.deepspeed.stage == 3):
        # Freezes the base and upcasts its non-quantized weights (norms, embeddings) to fp32 for stable
        # training. Skipped under ZeRO-3, which shards the model only if all its weights share one dtype.
        # Activation checkpointing is set up by the caller from model.gradient_checkpointing.
        network = prepare_model_for_kbit_training(network, use_gradient_checkpointing=False)
    model = get_peft_model(network, build_lora_config(config, head_modules))
    if method == "qlora":
        keep_4bit_compute_dtype_on_cpu(model)
    return model


def keep_4bit_compute_dtype_on_cpu(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on the path that computes in `bnb_4bit_compute_dtype` on the CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weights for a bf16 kernel the first
    time it runs in eval mode without gradients. That kernel ignores the compute dtype (predictions move by
    ~1e-3 in fp32), and the backward pass then fails on layers with a bias (Qwen2's q/k/v), so a model that
    validates and trains again, as every epoch does, would crash. No effect on GPUs.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_adapter(network: PreTrainedModel, directory: str) -> PeftModel:
    """The adapter (and head) saved in `directory` on top of its base network, frozen, for inference."""
    from peft import PeftModel

    return PeftModel.from_pretrained(network, directory, is_trainable=False)


def save_adapter(network: PeftModel, directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json: the LoRA weights and the fully trained head.

    `state_dict` (keys as in `network.state_dict()`, e.g. gathered from ZeRO-3 shards) replaces the
    network's own tensors; only its adapter and head entries are needed.
    """
    network.save_pretrained(directory, state_dict=state_dict)


def merge_adapter_weights(network: PeftModel) -> PreTrainedModel:
    """The base network with the LoRA updates folded into its weights and the trained head in place."""
    return network.merge_and_unload()
