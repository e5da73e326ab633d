"""How a worker takes optimizer steps: plain DDP or a DeepSpeed ZeRO engine, behind one small interface.

The training loop calls `backward(loss, boundary)` per micro-batch and `step()` at each accumulation
boundary; it never branches on DeepSpeed itself. Both steppers also save and restore their optimizer,
scheduler and scaler state for resume, and export the full weights for an inference checkpoint.

    stepper = build_stepper(model, config, total_steps, device)
    with stepper.accumulate(boundary):   # DDP skips the all-reduce until the boundary
        loss = ...forward through stepper.model...
        stepper.backward(loss, boundary)
    if boundary:
        stepper.step()
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from typing import Any, Protocol

import ray.train.torch
import torch

from app.config import Config
from app.modeling import autocast_dtype

TORCH_STATE_FILE = "train_state.pt"  # weights, optimizer, scheduler, scaler (rank 0)
DEEPSPEED_TAG = "deepspeed"  # the engine's checkpoint folder inside a Ray checkpoint


class Stepper(Protocol):
    model: torch.nn.Module  # what the forward pass goes through (DDP / DeepSpeed wrapper or the bare model)
    amp_dtype: torch.dtype | None  # autocast dtype for the forward pass; None = fp32 or the engine casts itself

    def accumulate(self, boundary: bool) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor, boundary: bool) -> None: ...
    def step(self) -> None: ...
    def lr(self) -> float: ...
    def lrs(self) -> list[float]: ...  # per parameter group
    def grad_norm(self) -> float | None: ...  # of the last step's gradients, before clipping; None = not known
    def export_state_dict(self, keep: bool) -> dict[str, torch.Tensor] | None: ...
    def save_state(self, directory: str, rank: int) -> None: ...
    def load_state(self, directory: str) -> None: ...
    def close(self) -> None: ...


HEAD_MODULES = {"classifier", "pre_classifier", "pooler", "score"}  # new (not pretrained) heads of HF classifiers


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norms get no weight decay, and the fresh head
    (the classifier, its pooler, a decoder's `score`) learns `head_lr_scale` x the lr. LoRA weights count as body."""
    inner = getattr(model, "module", model)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in inner.named_parameters():
        if param.requires_grad:
            parts = name.split(".")
            is_head = "lora_" not in name and any(part in HEAD_MODULES for part in parts)
            decays = len(parameter_shape(param)) >= 2 and "norm" not in name.lower()
            groups.setdefault((is_head, decays), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "lr": config.train.lr * (config.train.head_lr_scale if is_head else 1.0),
          "weight_decay": config.train.weight_decay if decays else 0.0}
         for (is_head, decays), params in groups.items()],
        lr=config.train.lr, fused=False,
    )


def parameter_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's real shape: under ZeRO-3 each rank holds an empty 1-D placeholder, and DeepSpeed keeps the
    full shape in `ds_shape`."""
    return getattr(param, "ds_shape", param.shape)


def cosine_with_warmup(warmup_steps: int, total_steps: int):
    """The learning-rate multiplier of step n: linear warmup to 1, then half a cosine down to 0. The formula of
    transformers' get_cosine_schedule_with_warmup, which is not imported because its module pulls in the trainer
    stack (peft, bitsandbytes): about 1 s more start-up in every training worker on an idle core, 3 s under load."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, total_steps: int):
    warmup_steps = round(config.train.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup_steps, total_steps))


def training_autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a DDP training step: train.precision, with train.cpu_bf16 deciding 'auto' on a CPU."""
    return autocast_dtype(config.train.precision, device, bf16_on_cpu=config.train.cpu_bf16)


class TorchStepper:
    """DistributedDataParallel (via Ray Train's prepare_model), AdamW, cosine schedule, autocast + GradScaler."""

    def __init__(self, model: torch.nn.Module, config: Config, total_steps: int, device: torch.device) -> None:
        self.config = config
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, total_steps)
        self.amp_dtype = training_autocast_dtype(config, device)
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self._grad_norm: torch.Tensor | None = None  # the last step's, before clipping (a device tensor)

    def accumulate(self, boundary: bool) -> contextlib.AbstractContextManager:
        if boundary or not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.scaler.scale(loss / self.config.train.grad_accum_steps).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        # the norm stays on the device: reading it (a device sync) is left to the steps that log it
        self._grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                         self.config.train.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def lrs(self) -> list[float]:
        return [float(lr) for lr in self.scheduler.get_last_lr()]

    def grad_norm(self) -> float | None:
        return None if self._grad_norm is None else float(self._grad_norm)

    def export_state_dict(self, keep: bool) -> dict[str, torch.Tensor] | None:
        return None  # the unwrapped model holds the full weights on every rank

    def save_state(self, directory: str, rank: int) -> None:
        """Rank 0 writes the trained weights (all, or adapter + head), optimizer, scheduler and scaler state:
        DDP keeps them identical on every rank."""
        if rank != 0:
            return
        inner = getattr(self.model, "module", self.model)
        if self.config.adapter.method == "full":
            weights = inner.state_dict()
        else:
            weights = {name: param.detach() for name, param in inner.named_parameters() if param.requires_grad}
        torch.save({"model": weights, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()},
                   os.path.join(directory, TORCH_STATE_FILE))

    def load_state(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, TORCH_STATE_FILE), map_location="cpu", weights_only=False)
        inner = getattr(self.model, "module", self.model)
        missing, unexpected = inner.load_state_dict(state["model"], strict=False)
        trainable = {name for name, param in inner.named_parameters() if param.requires_grad}
        if unexpected or trainable & set(missing):
            raise RuntimeError(f"checkpoint {directory} does not match this model: missing trained weights "
                               f"{sorted(trainable & set(missing))[:5]}, unexpected {unexpected[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        pass  # Ray Train tears down the process group


class DeepSpeedStepper:
    """A DeepSpeed engine over our AdamW and schedule; ZeRO stage, offload and precision from the config."""

    def __init__(self, model: torch.nn.Module, config: Config, total_steps: int, device: torch.device,
                 ds_config: dict[str, Any], written_by: int | None = None) -> None:
        import deepspeed

        self.config = config
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config, total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.model = self.engine
        self.amp_dtype = None  # the engine holds the weights in bf16 / fp16 itself when configured
        self.zero3 = config.deepspeed.stage == 3
        self.universal = bool(ds_config.get("checkpoint", {}).get("load_universal"))
        self.written_by = written_by

    def accumulate(self, boundary: bool) -> contextlib.AbstractContextManager:
        self.engine.set_gradient_accumulation_boundary(boundary)  # the engine reduces gradients at the boundary
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self) -> None:
        self.engine.step()  # clipping, optimizer, zero_grad and the scheduler

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def lrs(self) -> list[float]:
        return [float(lr) for lr in self.engine.get_lr()]

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()  # the norm the engine clipped by (None before the first step)
        return None if norm is None else float(norm)

    def export_state_dict(self, keep: bool) -> dict[str, torch.Tensor] | None:
        """Under ZeRO-3 gather the trained parameters (all, or adapter + head) one at a time. Every rank must join
        the gathers (collectives); only the rank that saves the export (`keep`) copies them to host memory, the
        others return None. Stages 0-2 hold whole parameters on every rank: None."""
        if not self.zero3:
            return None
        import deepspeed

        module = self.engine.module
        adapter_only = self.config.adapter.method != "full"
        names = [name for name, param in module.named_parameters() if param.requires_grad or not adapter_only]
        params = dict(module.named_parameters())
        state: dict[str, torch.Tensor] = {}
        for name in names:  # one parameter at a time: no rank ever holds the whole model on its device
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=None):
                if keep:
                    state[name] = params[name].detach().to("cpu", copy=True)
        if not keep:
            return None
        if not adapter_only:
            for name, buffer in module.named_buffers():
                state[name] = buffer.detach().to("cpu", copy=True)
        return state

    def save_state(self, directory: str, rank: int) -> None:
        """Every rank writes its own ZeRO shards; Ray Train merges all ranks' files into one checkpoint. The shards
        carry what DeepSpeed's universal-checkpoint converter needs, so that another number of ranks can resume."""
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        self.engine.save_checkpoint(
            directory, tag=DEEPSPEED_TAG, exclude_frozen_parameters=self.config.adapter.method != "full",
            client_state={UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY:
                                                      UNIVERSAL_CHECKPOINT_VERSION_VALUE}})

    def load_state(self, directory: str) -> None:
        """Load the engine state; shards written by another number of ranks are first converted, on this node, to a
        universal checkpoint (per-parameter fp32 weights and optimizer moments), which DeepSpeed re-partitions."""
        groups = [{key: value for key, value in group.items() if key != "params"}
                  for group in self.engine.optimizer.param_groups]  # built from the config: the same as the run's
        with tempfile.TemporaryDirectory(prefix="deepspeed-") as scratch:
            source = own_shards(directory, self.written_by, os.path.join(scratch, "shards"))
            source = to_universal(source, os.path.join(scratch, "universal")) if self.universal else source
            path, _ = self.engine.load_checkpoint(source, tag=DEEPSPEED_TAG,
                                                  load_module_strict=self.config.adapter.method == "full")
        if path is None:
            raise RuntimeError(f"no DeepSpeed engine state under {directory}/{DEEPSPEED_TAG}; "
                               "this checkpoint cannot resume a DeepSpeed run")
        if self.universal:
            restore_param_groups(self.engine.optimizer, groups, self.scheduler.get_last_lr())

    def close(self) -> None:
        from app.deepspeed import shutdown_engine

        shutdown_engine(self.engine)


def restore_param_groups(optimizer: Any, groups: list[dict[str, Any]], lrs: list[float]) -> None:
    """Undo what DeepSpeed 0.19's universal load does to a ZeRO-3 optimizer of several param groups (ours has up to
    four: decay or not, body or head): it gives every group the first group's settings, losing the head's larger lr
    and the no-decay groups' zero weight decay, and one shared `step` tensor to every group's AdamW state, which each
    group's update then advances, so the bias correction runs ahead. Each group gets its own settings back (`groups`,
    from before the load), at the restored schedule's `lrs`, and its own step counter."""
    for group, settings, lr in zip(optimizer.param_groups, groups, lrs, strict=True):
        group.update(settings, lr=lr)
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def own_shards(directory: str, written_by: int | None, scratch: str) -> str:
    """A folder (under `scratch`, of links) holding the engine state in `directory` without the shards of ranks
    `written_by` and above: leftovers of a larger worker group that failed while writing a checkpoint of the same
    name, which DeepSpeed would otherwise count or convert as the checkpoint's own. `directory` itself when there
    are none."""
    folder = os.path.join(directory, DEEPSPEED_TAG)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    stale = {name for name in names if written_by is not None
             and (found := re.search(r"zero_pp_rank_(\d+)_", name)) and int(found.group(1)) >= written_by}
    if not stale:
        return directory
    os.makedirs(os.path.join(scratch, DEEPSPEED_TAG))
    for name in set(names) - stale:
        os.symlink(os.path.join(folder, name), os.path.join(scratch, DEEPSPEED_TAG, name))
    return scratch


def to_universal(directory: str, scratch: str) -> str:
    """DeepSpeed's universal checkpoint of the ZeRO shards in `directory`/deepspeed, written under `scratch`
    (returned: load it with tag `DEEPSPEED_TAG`)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as convert

    convert(argparse.Namespace(input_folder=os.path.join(directory, DEEPSPEED_TAG),
                               output_folder=os.path.join(scratch, DEEPSPEED_TAG), num_extract_workers=1,
                               num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    return scratch


def build_stepper(model: torch.nn.Module, config: Config, total_steps: int, device: torch.device,
                  world_size: int, universal: bool = False, written_by: int | None = None) -> Stepper:
    """The DeepSpeed stepper when `deepspeed.enabled`, else DDP. `universal`: the run resumes from ZeRO shards that
    another number of ranks wrote (see `DeepSpeedStepper.load_state`); `written_by`: how many (shards of higher
    ranks in the folder are a failed larger group's leftovers)."""
    if not config.deepspeed.enabled:
        return TorchStepper(model, config, total_steps, device)
    from app.deepspeed import build_deepspeed_config

    ds_config = build_deepspeed_config(config, world_size)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    return DeepSpeedStepper(model, config, total_steps, device, ds_config, written_by or world_size)


def needs_universal(directory: str) -> bool:
    """Whether the DeepSpeed state in checkpoint `directory` is partitioned by rank (ZeRO optimizer shards, or
    bf16 master weights), so that another number of ranks can load it only as a universal checkpoint. Stage 0 in
    fp32 keeps the whole optimizer in the model states file, which any number of ranks loads as it is."""
    folder = os.path.join(directory, DEEPSPEED_TAG)
    return os.path.isdir(folder) and any(name.endswith("optim_states.pt") for name in os.listdir(folder))
