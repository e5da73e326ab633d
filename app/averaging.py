"""Fold-adapter averaging: K LoRA / QLoRA checkpoints of one recipe (one per fold) into one adapter.

The trick of the LMSYS competition's winning solution: instead of running K fold models at inference time,
average their adapter weights (LoRA A and B matrices and the trained head) element-wise into one adapter
and run that. It works because every fold starts from the same base weights and the same seeded adapter
initialisation, so the K solutions stay close in weight space. It is an approximation: the mean of the
B @ A products is not the product of the means, which is why `bench/adapter_averaging.py` measures the
averaged adapter against the K-model ensemble it replaces.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file

from app.modeling import CHECKPOINT_META, read_checkpoint_meta

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Settings that must agree for an element-wise average to mean anything.
SAME_ADAPTER_KEYS = ("method", "r", "alpha", "target_modules", "train_head", "quant_type", "double_quant")


def _recipe(config) -> dict:
    adapter = config.adapter.model_dump(mode="json")
    return {"kind": config.model.kind, "base_model": config.model.name_or_path,
            "label_words": list(config.model.label_words), **{key: adapter[key] for key in SAME_ADAPTER_KEYS}}


def average_adapters(checkpoints: Sequence[str], out_dir: str, weights: Sequence[float] | None = None) -> str:
    """Write the (weighted) element-wise mean of the checkpoints' adapter and head weights to `out_dir`.

    `out_dir` becomes a checkpoint like the first one (its adapter config, tokenizer and arena.json, with
    `averaged_from` listing the sources) that `app.modeling.load_checkpoint`, predict and Serve read.
    `weights` default to equal; they are normalised to sum to 1.

    Raises:
        ValueError: fewer than two checkpoints, a full-weights checkpoint, or checkpoints whose recipe
            (base model, kind, adapter settings) or tensor names and shapes differ; the message names the
            checkpoint and the first difference.
    """
    if len(checkpoints) < 2:
        raise ValueError(f"averaging needs at least two adapter checkpoints, got {len(checkpoints)}")
    weights = [1.0] * len(checkpoints) if weights is None else list(weights)
    if len(weights) != len(checkpoints) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"weights must be {len(checkpoints)} non-negative numbers with a positive sum, got {weights}")
    first_meta, first_config = read_checkpoint_meta(checkpoints[0])
    recipe = _recipe(first_config)
    if recipe["method"] == "full":
        raise ValueError(f"{checkpoints[0]} holds full weights (adapter.method=full): only adapters are averaged")
    total: dict[str, torch.Tensor] = {}
    for checkpoint, weight in zip(checkpoints, weights):
        _, config = read_checkpoint_meta(checkpoint)
        differing = {key: (recipe[key], value) for key, value in _recipe(config).items() if recipe[key] != value}
        if differing:
            key, (expected, found) = next(iter(differing.items()))
            raise ValueError(f"{checkpoint}: {key} is {found!r}, but {checkpoints[0]} has {expected!r}; "
                             "only checkpoints of one recipe (e.g. the folds of one jobs/cv.py member) average")
        path = os.path.join(checkpoint, ADAPTER_WEIGHTS)
        if not os.path.exists(path):
            raise ValueError(f"{checkpoint} has no {ADAPTER_WEIGHTS}: not an adapter checkpoint of this project")
        tensors = load_file(path)
        if total and set(tensors) != set(total):
            name = sorted(set(tensors) ^ set(total))[0]
            raise ValueError(f"{checkpoint}: adapter tensor {name} is in only some of the checkpoints")
        for name, tensor in tensors.items():
            if name in total and total[name].shape != tensor.shape:
                raise ValueError(f"{checkpoint}: adapter tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(total[name].shape)}")
            scaled = tensor.double() * (weight / sum(weights))
            total[name] = total[name] + scaled if name in total else scaled
    dtypes = load_file(os.path.join(checkpoints[0], ADAPTER_WEIGHTS))
    shutil.copytree(checkpoints[0], out_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(ADAPTER_WEIGHTS, "*.pt", "progress_*", "deepspeed"))
    save_file({name: tensor.to(dtypes[name].dtype).contiguous() for name, tensor in total.items()},
              os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    meta = {**first_meta, "metrics": None, "epoch": None,
            "averaged_from": [os.path.abspath(checkpoint) for checkpoint in checkpoints],
            "averaging_weights": [weight / sum(weights) for weight in weights]}
    with open(os.path.join(out_dir, CHECKPOINT_META), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    return out_dir
