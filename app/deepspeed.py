"""DeepSpeed ZeRO inside Ray Train workers: the one place the DeepSpeed JSON is built from the typed config.

What a worker does (app/engine.py holds the real code):

    ds_config = build_deepspeed_config(config, world_size, device)
    with zero3_loading(ds_config):              # ZeRO-3: from_pretrained (and peft) build partitioned
        model = build_model(config)
    optimizer = torch.optim.AdamW(...)          # ours, with our parameter groups
    scheduler = get_cosine_schedule_with_warmup(optimizer, ...)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   lr_scheduler=scheduler, config=ds_config)
    ...  engine(...); engine.backward(loss); engine.step()   # step() clips, steps, zeroes and schedules
    shutdown_engine(engine)

Our own torch AdamW and LR schedule go to `deepspeed.initialize`, so the JSON has no `optimizer` or
`scheduler` block and the same parameter groups (no decay on norms and biases, a faster head) hold with and
without DeepSpeed. torch AdamW is on DeepSpeed's list of ZeRO-tested optimizers. With
`deepspeed.offload_optimizer` the optimizer step runs on the CPU; DeepSpeed would then insist on its own
DeepSpeedCPUAdam, so the JSON sets `"zero_force_ds_cpu_optimizer": false` and torch AdamW steps the CPU
partition (correct, slower than DeepSpeedCPUAdam's compiled kernel; that kernel would need a one-off C++
build into TORCH_EXTENSIONS_DIR and is not required).

The engine owns precision: with bf16 or fp16 it casts the module to that dtype and keeps fp32 master weights
in the ZeRO optimizer, so the forward pass runs without torch.autocast and without a GradScaler (fp16 uses
DeepSpeed's dynamic loss scaling).

On CPU workers DeepSpeed needs `DS_ACCELERATOR=cpu` (see `deepspeed_env`) and the gloo process-group
backend. Its CPU communication op (`deepspeed_shm_comm`) is compiled on the first initialisation in an
environment (about 3 minutes on 2 cores) and cached under TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions); later starts take about a second.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch

from app import collectives
from app.config import Config

NEVER_PRINT_STEPS = 10**9  # DeepSpeed's own step logging; our loop prints its own lines

Precision = Literal["fp32", "bf16", "fp16"]


def default_device(config: Config) -> torch.device:
    """The device a worker trains on: CUDA when `scaling.use_gpu`, else the CPU."""
    return torch.device("cuda" if config.scaling.use_gpu else "cpu")


def resolve_training_precision(choice: str, device: torch.device, bf16_on_cpu: bool = False) -> Precision:
    """`train.precision` resolved for training on `device` (the same rule as app.modeling.autocast_dtype).

    'auto' = bf16 on CUDA GPUs that have it, fp16 on older GPUs; on the CPU fp32, or bf16 with
    `bf16_on_cpu` where the CPU has native bf16 (train.cpu_bf16; DeepSpeed on the CPU always stays fp32).

    Raises:
        ValueError: 'auto' for a CUDA device in a process that sees no GPU (resolve it on the worker, or
            set train.precision explicitly).
    """
    if choice != "auto":
        return choice  # type: ignore[return-value]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.precision=auto cannot be resolved for a GPU from a process that sees no GPU; "
                         "build the DeepSpeed config on the worker, or set train.precision=bf16 / fp16 / fp32")
    from app.modeling import autocast_dtype  # imported late: app.modeling pulls in transformers

    dtype = autocast_dtype(choice, device, bf16_on_cpu=bf16_on_cpu)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def build_deepspeed_config(config: Config, world_size: int, device: torch.device | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for `config.deepspeed` and `config.train` on `world_size` workers.

    Args:
        config: the whole config; `deepspeed`, `train` and `scaling.use_gpu` are read.
        world_size: number of data-parallel workers (`train_batch_size` = micro batch x accumulation x this).
        device: the worker's device, for resolving train.precision='auto'; default from scaling.use_gpu.

    Returns:
        A plain dict for `deepspeed.initialize(config=...)` and `HfDeepSpeedConfig`. It has no optimizer or
        scheduler block: pass our torch AdamW and LR scheduler to `deepspeed.initialize`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    device = device or default_device(config)
    settings, train = config.deepspeed, config.train
    precision = resolve_training_precision(train.precision, device)

    zero: dict[str, Any] = {"stage": settings.stage}
    if settings.stage >= 1:
        zero.update({
            "overlap_comm": settings.overlap_comm,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "reduce_bucket_size": settings.bucket_size,
            "allgather_bucket_size": settings.bucket_size,
        })
    if settings.stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": settings.bucket_size,
            "stage3_gather_16bit_weights_on_model_save": True,  # save_16bit_model / consolidated state dicts
        })
    pin_memory = device.type == "cuda"  # page-locked host buffers speed up GPU <-> CPU copies; moot on a CPU
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}

    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0,  # 0 = dynamic loss scaling
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": NEVER_PRINT_STEPS,
        "wall_clock_breakdown": False,
    }
    if settings.offload_optimizer:
        ds_config["zero_force_ds_cpu_optimizer"] = False  # we pass torch AdamW, not DeepSpeedCPUAdam (see above)
    return ds_config


def deepspeed_env(config: Config) -> dict[str, str]:
    """Environment variables a DeepSpeed worker needs, for Ray's `runtime_env={"env_vars": ...}`.

    DS_ACCELERATOR pins DeepSpeed to the device the workers train on (it would otherwise pick CUDA on any
    machine that has a GPU, even for CPU workers). TORCH_EXTENSIONS_DIR, when the driver sets it, tells the
    workers where DeepSpeed's compiled ops are cached.
    """
    env = {"DS_ACCELERATOR": "cuda" if config.scaling.use_gpu else "cpu"}
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    return env


def process_group_backend(config: Config) -> str:
    """The torch.distributed backend for the workers: NCCL between GPUs, gloo on CPUs."""
    return "nccl" if config.scaling.use_gpu else "gloo"


def is_zero3(ds_config: dict[str, Any]) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage", 0) == 3


@contextlib.contextmanager
def zero3_loading(ds_config: dict[str, Any]) -> Iterator[Any]:
    """Register `ds_config` with transformers while the model is built, so ZeRO-3 loads it partitioned.

    transformers' `from_pretrained` (and peft, when it wraps the model) look for a live
    `transformers.integrations.deepspeed.HfDeepSpeedConfig` through a weak reference; under ZeRO-3 they then
    build the model inside `deepspeed.zero.Init`, so no worker ever holds the full weights. The object is
    kept alive for the whole `with` block and unregistered on exit. For stages 0-2 this does nothing.
    Needs the process group initialised (Ray Train does that before the loop starts).

        with zero3_loading(ds_config):
            model = build_model(config)
    """
    if not is_zero3(ds_config):
        yield None
        return
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if collectives.is_distributed() and not deepspeed.comm.is_initialized():
        # DeepSpeed reads the world size from its own comm layer when it checks the batch sizes: adopt the
        # process group Ray Train started (without this it sees a world of 1 and rejects train_batch_size).
        deepspeed.init_distributed(dist_backend=collectives.backend())
    registration = HfDeepSpeedConfig(ds_config)  # holds the weakref target: must outlive from_pretrained
    try:
        yield registration
    finally:
        unset_hf_deepspeed_config()
        del registration


def shutdown_engine(engine: Any) -> None:
    """Release a DeepSpeed engine, then its process group (through deepspeed.comm, which drops its own
    group references too). Safe when the group is already gone."""
    import deepspeed.comm

    engine.destroy()
    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    else:
        collectives.destroy_process_group()
