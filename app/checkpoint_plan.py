"""What checkpointing costs a run, estimated from the config before it starts: sizes, times and the share of
training time spent blocked on checkpoints.

What a checkpoint holds (app/loop.report, app/engine.py). Every checkpoint holds each rank's resume state;
at the end of an epoch rank 0 adds the inference export; mid-epoch checkpoints (train.checkpoint_every_steps)
have none. Per-rank progress files are a few KB and not counted.
  resume, no DeepSpeed   rank 0's train_state.pt: the trained weights (all, or LoRA + head copy) and torch
                         AdamW's two moments, all fp32 (the masters): 12 bytes per trained parameter.
  resume, DeepSpeed      every rank writes its ZeRO optimizer partition (engine.save_checkpoint ->
                         _save_zero_checkpoint): fp32 master + two fp32 moments, 12 bytes per trained parameter
                         / world size. The module states file (_save_checkpoint) holds the module in the
                         engine's precision (trained parameters only for adapters: exclude_frozen_parameters),
                         written by rank 0 at stages 1-2; under ZeRO-3 every rank writes one, but its
                         partitioned parameters are empty placeholders: counted as 0. At stage 0 rank 0's
                         module file also holds the whole optimizer state (the moments, and in bf16 / fp16 the
                         fp32 master). The files DeepSpeed 0.19 writes hold these counts to within 1%
                         (tests/test_checkpoint_plan.py).
  export                 full: model.safetensors in model.dtype (bf16 on GPUs); lora / qlora: the LoRA
                         matrices and the trained head in their training dtype (fp32; 16-bit under DeepSpeed).
                         Under ZeRO-3 rank 0 first gathers them to host memory (GATHER_BYTES_S).

Times. A rank writes its files at min(LOCAL_WRITER_BYTES_S, the staging disk's rate), and the ranks of a node
share that disk; each worker uploads its files one at a time at S3_WORKER_UPLOAD_BYTES_S, and a node's workers
share its S3 rate (app/hardware.py states all of these as assumptions). The staging disk is `run.staging_dir`: the
node's instance NVMe when it lies under LOCAL_NVME_MOUNT, else the root volume (gp3 baseline). With
`run.checkpoint_upload` async only the local write (and the ZeRO-3 gather) blocks training; with sync the
upload does too.

Step time = 6 x N x tokens per step / (MFU x peak bf16 FLOPS x GPUs): Kaplan et al. 2020's 6 FLOPs per
parameter and token (forward 2, backward 4), with N the matmul weights a token passes through (embeddings are
lookups; a causal LM's head scores one token per row; T5's decoder reads 3 labels x 3 tokens per row, its
cross-attention keys and values the encoder output once per label). LoRA computes no gradients of frozen
weights (4 FLOPs, not 6), but gradient checkpointing recomputes the forward pass (2 more): 6 for all.
Tokens per step = workers x batch_size x
grad_accum_steps x format.max_length: every row padded to the full length, the worst case, so real steps
are shorter and the real checkpoint share is higher than estimated. MFU is one constant: 0.40, the high end
of what Hugging Face models under DDP / DeepSpeed reach (0.3-0.4), so that steps are not overestimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from app.architecture import Architecture, count_trainable_parameters
from app.config import Config
from app.hardware import (
    GATHER_BYTES_S,
    GB,
    INSTANCE_TYPES,
    LOCAL_NVME_MOUNT,
    LOCAL_WRITER_BYTES_S,
    ROOT_VOLUME_WRITE_BYTES_S,
    S3_WORKER_UPLOAD_BYTES_S,
    InstanceType,
    instance_for,
)
from app.memory import DTYPE_BYTES, T5_LABEL_TOKENS, resolve_model_dtype, resolve_train_precision

MFU = 0.40  # model FLOPs utilisation assumed for every GPU (see the module docstring)
KAGGLE_TRAIN_ROWS = 57_477  # rows of the competition's train.csv
OVERHEAD_TARGET = 0.05  # share of training time the presets allow checkpoints to block
LABELS = 3


def planned_device(config: Config) -> torch.device:
    return torch.device("cuda" if config.scaling.use_gpu else "cpu")


def resume_bytes_per_rank(config: Config, total_params: int, trainable_params: int, world: int) -> list[float]:
    """Bytes of one rank's resume state in a checkpoint, for ranks 0..world-1 (the module docstring's rules)."""
    speed = config.deepspeed
    if not speed.enabled:
        return [12.0 * trainable_params] + [0.0] * (world - 1)
    precision = resolve_train_precision(config, planned_device(config))
    module_params = trainable_params if config.adapter.method != "full" else total_params
    module = module_params * DTYPE_BYTES[precision]
    if speed.stage == 0:  # torch AdamW (fp32) or DeepSpeed's 16-bit wrapper, whole, in rank 0's module file
        return [module + (8.0 if precision == "fp32" else 12.0) * trainable_params] + [0.0] * (world - 1)
    partition = 12.0 * trainable_params / world
    return [partition + (module if speed.stage < 3 else 0)] + [partition] * (world - 1)


def export_bytes(config: Config, arch: Architecture) -> float:
    """Bytes of rank 0's inference export (tokenizer and arena.json not counted)."""
    device = planned_device(config)
    if config.adapter.method == "full":
        return float(arch.total_params * DTYPE_BYTES[resolve_model_dtype(config, device)])
    deepspeed_16bit = config.deepspeed.enabled and resolve_train_precision(config, device) != "fp32"
    return float(count_trainable_parameters(arch, config.adapter) * (2 if deepspeed_16bit else 4))


def flops_per_step(config: Config, arch: Architecture) -> float:
    """6 x sum over linear layers of (weights x tokens through the layer) for one optimizer step."""
    rows = config.scaling.max_workers * config.train.batch_size * config.train.grad_accum_steps
    tokens = rows * config.format.max_length
    decoder_tokens = rows * LABELS * T5_LABEL_TOKENS
    total = 0.0
    for layer in arch.linears:
        if arch.kind == "t5" and layer.cross:
            through = LABELS * tokens  # the encoder output, repeated per label
        elif arch.kind == "t5" and (layer.name.startswith("decoder.") or arch.in_head(layer.name)):
            through = decoder_tokens
        elif arch.kind == "decoder_lm" and arch.in_head(layer.name):
            through = rows  # the LM head on each row's last token
        else:
            through = tokens
        total += layer.weight_params * through
    return 6.0 * total


@dataclass(frozen=True)
class StepEstimate:
    """One optimizer step's time on a node type, and the run's length in steps."""

    instance: InstanceType
    gpus: int
    compute_params: float  # matmul weights per token, averaged over the step's tokens
    tokens: int  # per step, padded
    seconds: float
    rows: int  # training rows per epoch
    steps_per_epoch: int
    total_steps: int


@dataclass(frozen=True)
class CheckpointPlan:
    """Checkpoint sizes (bytes) and, on a known node type, times (seconds) and their share of training time."""

    resume_bytes: float  # one checkpoint's resume state, all ranks together
    largest_rank_bytes: float
    largest_node_bytes: float
    export_bytes: float
    mode: Literal["sync", "async"]
    interval_steps: int | None  # train.checkpoint_every_steps
    staging: str = ""
    storage: str = ""
    write_s: float = 0.0  # a mid-epoch checkpoint's local write
    export_write_s: float = 0.0  # an epoch-end checkpoint's local write: resume state and export
    gather_s: float = 0.0  # ZeRO-3: rank 0's host copy of the export, before it writes
    upload_s: float = 0.0
    export_upload_s: float = 0.0
    step: StepEstimate | None = None
    mid_checkpoints: int = 0
    epoch_ends: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def blocking_s(self) -> float:
        """Seconds training waits on checkpoints over the whole run."""
        sync = self.mode == "sync"
        mid = self.write_s + (self.upload_s if sync else 0.0)
        end = self.gather_s + self.export_write_s + (self.export_upload_s if sync else 0.0)
        return self.mid_checkpoints * mid + self.epoch_ends * end

    @property
    def training_s(self) -> float:
        return self.step.total_steps * self.step.seconds if self.step else 0.0

    @property
    def overhead(self) -> float | None:
        """Checkpoint blocking as a share of training time; None where no node type (so no step time) is known."""
        return self.blocking_s / self.training_s if self.step else None

    @property
    def interval_s(self) -> float | None:
        """Training time between two checkpoints (mid-epoch ones, else epochs)."""
        if self.step is None:
            return None
        return (self.interval_steps or self.step.steps_per_epoch) * self.step.seconds

    @property
    def uploads_keep_up(self) -> bool:
        """Async: each upload ends before the next checkpoint. Ray uploads one checkpoint at a time per worker:
        slower uploads queue, and their staged copies pile up on the staging disk."""
        return self.mode == "sync" or self.interval_s is None or self.export_upload_s <= self.interval_s

    def render(self) -> str:
        when = (f"every {self.interval_steps} steps and at each epoch's end" if self.interval_steps
                else "at each epoch's end")
        lines = [f"checkpoints: resume state {when}, where rank 0 adds the inference export",
                 f"  resume state  {self.resume_bytes / GB:8.2f} GB   (largest rank {self.largest_rank_bytes / GB:.2f} "
                 f"GB, largest node {self.largest_node_bytes / GB:.2f} GB)",
                 f"  export        {self.export_bytes / GB:8.2f} GB"]
        if self.step is None:
            lines += [f"  note: {note}" for note in self.notes]
            return "\n".join(lines)
        step, gpu = self.step, self.step.instance.gpu
        gather = f" (ZeRO-3 gather {self.gather_s:.1f} s)" if self.gather_s else ""
        waits = "training waits for it" if self.mode == "sync" else "training goes on"
        interval = f"{self.interval_steps} steps" if self.interval_steps else "one epoch"
        lines += [
            f"  staging       {self.staging}",
            f"  local write   {self.write_s:8.1f} s mid-epoch, {self.gather_s + self.export_write_s:.1f} s at an "
            f"epoch's end{gather}",
            f"  upload        {self.upload_s:8.1f} s mid-epoch, {self.export_upload_s:.1f} s at an epoch's end "
            f"({self.mode}: {waits}), to {self.storage}",
            f"  step time     {step.seconds:8.2f} s = 6 x {step.compute_params / 1e9:.3f}B matmul weights x "
            f"{step.tokens:,} tokens (padded) / ({MFU:.2f} MFU x {gpu.peak_bf16_tflops:g} TFLOPS x {step.gpus} "
            f"{gpu.ray_type}), {step.instance.name}",
            f"  training      {step.steps_per_epoch:,} steps per epoch ({step.rows:,} rows), {step.total_steps:,} "
            f"steps in all: {self.training_s / 60:.1f} min",
            f"  interval      {interval} = {self.interval_s / 60:.1f} min of training (work lost to a preemption)",
            f"  overhead      {self.blocking_s:8.1f} s blocked by {self.mid_checkpoints} mid-epoch and "
            f"{self.epoch_ends} epoch-end checkpoints = {self.overhead:.2%} of training time "
            f"(target < {OVERHEAD_TARGET:.0%})",
        ]
        if self.overhead > OVERHEAD_TARGET:
            fixes = ["raise train.checkpoint_every_steps"]
            if not self.staging.startswith(LOCAL_NVME_MOUNT):
                fixes.append(f"stage on the node's NVMe (run.staging_dir={LOCAL_NVME_MOUNT})")
            if self.mode == "sync":
                fixes.append("upload asynchronously (run.storage_path=s3://..., run.checkpoint_upload)")
            lines.append("  WARNING: over the target: " + ", ".join(fixes))
        if not self.uploads_keep_up:
            lines.append("  WARNING: an upload outlasts the checkpoint interval: uploads queue and their staged copies "
                         "fill the staging disk; raise train.checkpoint_every_steps")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _on_nvme(directory: str | None) -> bool:
    return directory is not None and (directory == LOCAL_NVME_MOUNT or directory.startswith(LOCAL_NVME_MOUNT + "/"))


def _seconds(rank_bytes: list[float], per_rank_rate: float, nodes: list[list[float]], node_rate: float) -> float:
    """Time for every rank to move its bytes: each at most `per_rank_rate`, the ranks of a node sharing its rate."""
    slowest_rank = max(rank_bytes) / per_rank_rate
    slowest_node = max(sum(node) for node in nodes) / node_rate
    return max(slowest_rank, slowest_node)


def plan_checkpoints(config: Config, arch: Architecture, rows: int | None = None,
                     instance_name: str | None = None) -> CheckpointPlan:
    """Sizes of a checkpoint and, for a GPU run on one of cluster.yaml's node types, write and upload times, the
    step time and the share of training time checkpoints block (module docstring).

    Args:
        config: the run's config (model, adapter, deepspeed, train, format, scaling, run and data are read).
        arch: `read_architecture(config.model)`.
        rows: rows of the training file before the validation fold is held out; default KAGGLE_TRAIN_ROWS.
        instance_name: the node type (an INSTANCE_TYPES key); default the smallest with
            scaling.accelerator_type that holds all the workers (`instance_for`).

    Raises:
        ValueError: an unknown instance_name, or one without the GPUs the config asks for.
    """
    world = config.scaling.max_workers
    per_rank = resume_bytes_per_rank(config, arch.total_params, count_trainable_parameters(arch, config.adapter),
                                     world)
    export = export_bytes(config, arch)
    mode = config.run.upload
    every = config.train.checkpoint_every_steps
    sizes = dict(resume_bytes=sum(per_rank), largest_rank_bytes=max(per_rank), export_bytes=export, mode=mode,
                 interval_steps=every)
    instance = _instance(config, instance_name)
    if instance is None:
        return CheckpointPlan(largest_node_bytes=sum(per_rank), **sizes, notes=(
            "times and the step time are estimated for GPU runs on cluster.yaml's node types: set "
            "scaling.use_gpu=true and scaling.accelerator_type (or pass --instance)",))
    notes: list[str] = []
    per_node = max(1, min(world, int(instance.gpus // config.scaling.gpus_per_worker)))
    with_export = [per_rank[0] + export] + per_rank[1:]
    nodes = [per_rank[start:start + per_node] for start in range(0, world, per_node)]
    export_nodes = [with_export[start:start + per_node] for start in range(0, world, per_node)]
    if _on_nvme(config.run.staging_dir) and instance.nvme_devices:
        disk = instance.nvme_write_gb_s * GB
        staging = (f"{config.run.staging_dir}: {instance.nvme_devices}x {instance.nvme_device_gb} GB instance NVMe, "
                   f"{instance.nvme_write_gb_s:g} GB/s assumed")
    else:
        disk = ROOT_VOLUME_WRITE_BYTES_S
        staging = (f"{config.run.staging_dir or 'the system temp folder'} on the root volume (gp3 baseline, "
                   f"{ROOT_VOLUME_WRITE_BYTES_S / GB:.3f} GB/s)")
        if _on_nvme(config.run.staging_dir):
            notes.append(f"{instance.name} has no instance NVMe: {LOCAL_NVME_MOUNT} is a folder of the root volume")
    if "://" in config.run.storage_path:
        worker_rate, node_rate = S3_WORKER_UPLOAD_BYTES_S, instance.s3_upload_gb_s * GB
        storage = (f"{config.run.storage_path} at {S3_WORKER_UPLOAD_BYTES_S / GB:g} GB/s per worker and "
                   f"{instance.s3_upload_gb_s:g} GB/s per node, assumed")
    else:
        worker_rate = node_rate = ROOT_VOLUME_WRITE_BYTES_S
        storage = f"local folder {config.run.storage_path} (a copy to the root volume)"
        notes.append("run.storage_path is a local folder: a cluster run puts it on S3 "
                     "(run.storage_path=s3://bucket/runs, README), which makes checkpoint_upload=auto async")
    write_rate = min(LOCAL_WRITER_BYTES_S, disk)
    zero3 = config.deepspeed.enabled and config.deepspeed.stage == 3
    step = estimate_step(config, arch, instance, rows)
    mids = sum(1 for done in range(every, step.total_steps, every) if done % step.steps_per_epoch) if every else 0
    return CheckpointPlan(
        largest_node_bytes=max(sum(node) for node in nodes), **sizes, staging=staging, storage=storage,
        write_s=_seconds(per_rank, write_rate, nodes, disk),
        export_write_s=_seconds(with_export, write_rate, export_nodes, disk),
        gather_s=export / GATHER_BYTES_S if zero3 else 0.0,
        upload_s=_seconds(per_rank, worker_rate, nodes, node_rate),
        export_upload_s=_seconds(with_export, worker_rate, export_nodes, node_rate),
        step=step, mid_checkpoints=mids, epoch_ends=math.ceil(step.total_steps / step.steps_per_epoch),
        notes=tuple(notes))


def _instance(config: Config, instance_name: str | None) -> InstanceType | None:
    if instance_name is not None:
        instance = INSTANCE_TYPES.get(instance_name)
        if instance is None or instance.gpu is None:
            gpu_types = [name for name, known in INSTANCE_TYPES.items() if known.gpu is not None]
            raise ValueError(f"--instance {instance_name}: not a GPU node type of cluster.yaml; use one of "
                             f"{gpu_types}")
        if config.scaling.accelerator_type not in (None, instance.gpu.ray_type):
            raise ValueError(f"--instance {instance_name} has {instance.gpu.ray_type} GPUs, but "
                             f"scaling.accelerator_type={config.scaling.accelerator_type}")
        return instance
    if not config.scaling.use_gpu or config.scaling.accelerator_type is None:
        return None
    return instance_for(config.scaling.accelerator_type, config.scaling.max_workers, config.scaling.gpus_per_worker)


def estimate_step(config: Config, arch: Architecture, instance: InstanceType, rows: int | None = None) -> StepEstimate:
    """A step's time at MFU on `instance`'s GPUs, and the steps of the run on `rows` (default KAGGLE_TRAIN_ROWS)
    less the validation fold."""
    assert instance.gpu is not None
    gpus = max(1, round(config.scaling.max_workers * config.scaling.gpus_per_worker))
    rows_per_step = config.scaling.max_workers * config.train.batch_size * config.train.grad_accum_steps
    tokens = rows_per_step * config.format.max_length
    flops = flops_per_step(config, arch)
    seconds = flops / (MFU * instance.gpu.peak_bf16_tflops * 1e12 * gpus)
    available = rows or KAGGLE_TRAIN_ROWS
    if config.data.max_rows:
        available = min(available, config.data.max_rows)
    train_rows = available * (config.data.n_folds - 1) // config.data.n_folds
    sequences = train_rows * (2 if config.train.swap_mode == "symmetric" else 1)  # symmetric: each pair twice
    per_epoch = max(1, math.ceil(sequences / rows_per_step))
    total = per_epoch * config.train.epochs
    if config.train.max_steps:
        total = min(total, config.train.max_steps)
    return StepEstimate(instance, gpus, flops / (6 * tokens), tokens, seconds, train_rows, per_epoch, total)
