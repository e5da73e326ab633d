"""The training loop that every Ray Train worker runs, top to bottom.

Workers receive the config as a plain dict and rebuild everything they need. Rows arrive already
tokenized (both A/B orders) from Ray Data, sharded across workers with equal row counts, so every
worker takes the same number of steps.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import get_cosine_schedule_with_warmup

from app.batching import length_grouped_batches, token_budget_batches
from app.config import Config, validate_config
from app.formatting import SWAPPED_LABEL
from app.metrics import score, softmax
from app.modeling import autocast, autocast_dtype, build_model, build_tokenizer, forward_batch, save_checkpoint

VALID_WINDOW_ROWS = 1024  # validation rows per window; windows are dealt round-robin to workers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches_per_epoch(n_rows: int, batch_size: int, group_batches: int) -> int:
    """Micro-batches one worker takes per epoch (mirrors `length_grouped_batches` on full windows)."""
    window = batch_size * group_batches
    full, rest = divmod(n_rows, window)
    return full * group_batches + math.ceil(rest / batch_size)


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights get no weight decay, the fresh head `head_lr_scale` x the lr."""
    inner = getattr(model, "module", model)
    base_prefix = inner.base_model_prefix + "."
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in inner.named_parameters():
        if param.requires_grad:
            is_head = not name.startswith(base_prefix) or ".pooler." in name
            decays = param.ndim >= 2 and "LayerNorm" not in name
            groups.setdefault((is_head, decays), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "lr": config.train.lr * (config.train.head_lr_scale if is_head else 1.0),
          "weight_decay": config.train.weight_decay if decays else 0.0}
         for (is_head, decays), params in groups.items()],
        lr=config.train.lr, fused=False,
    )


def choose_rows(swap: np.ndarray, plain: np.ndarray, swapped: np.ndarray) -> np.ndarray:
    """Per row, the swapped encoding where `swap` is set; an object array of 1-D rows (ragged or not)."""
    out = np.empty(len(swap), dtype=object)
    for index, use_swapped in enumerate(swap):
        out[index] = swapped[index] if use_swapped else plain[index]
    return out


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, float]]:
    """Train, evaluating and reporting every epoch; returns the per-epoch metrics (Ray hands rank 0's back)."""
    config = validate_config(loop_config["config"], "worker config")
    rows_per_worker: int = loop_config["rows_per_worker"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.scaling.torch_threads or max(1, int(config.scaling.cpus_per_worker)))
    seed_everything(config.seed)
    device = ray.train.torch.get_device()
    ray.data.DataContext.get_current().enable_progress_bars = False  # bars flood job logs; epochs print their own

    tokenizer = build_tokenizer(config.model)
    model = ray.train.torch.prepare_model(build_model(config.model))
    optimizer = build_optimizer(model, config)
    micro_per_epoch = batches_per_epoch(rows_per_worker, config.train.batch_size, config.train.length_group_batches)
    steps_per_epoch = math.ceil(micro_per_epoch / config.train.grad_accum_steps)
    total_steps = min(config.train.epochs * steps_per_epoch, config.train.max_steps or 10**12)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.train.warmup_ratio * total_steps), total_steps)
    amp_dtype = autocast_dtype(config.train.precision, device, for_training=True)
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    pad_id = tokenizer.pad_token_id
    rng = np.random.default_rng(config.seed + 1000 * rank)  # per-worker shuffling and swapping

    train_shard = ray.train.get_dataset_shard("train")
    valid_data = ray.train.get_dataset_shard("valid")
    step, history = 0, []
    for epoch in range(config.train.epochs):
        model.train()
        started, real_tokens, padded_tokens, rows_seen = time.perf_counter(), 0, 0, 0
        loss_sum, loss_count, micro = 0.0, 0, 0
        window_rows = config.train.batch_size * config.train.length_group_batches
        windows = train_shard.iter_batches(
            batch_size=window_rows, batch_format="numpy",
            local_shuffle_buffer_size=window_rows, local_shuffle_seed=config.seed + epoch * 7919 + rank,
        )
        for window in windows:
            swap = rng.random(len(window["label"])) < config.train.swap_prob
            sequences = choose_rows(swap, window["input_ids"], window["input_ids_swapped"])
            segments = choose_rows(swap, window["segment_ids"], window["segment_ids_swapped"])
            labels = np.where(swap, np.take(SWAPPED_LABEL, window["label"]), window["label"])
            lengths = [len(s) for s in sequences]
            for batch in length_grouped_batches(lengths, config.train.batch_size, config.train.length_group_batches, rng):
                if step >= total_steps:
                    break
                micro += 1
                last_of_step = micro % config.train.grad_accum_steps == 0 or micro == micro_per_epoch
                sync = contextlib.nullcontext() if last_of_step or world == 1 else model.no_sync()
                with sync:
                    with autocast(device, amp_dtype):
                        logits, attention_mask = forward_batch(model, sequences[batch], segments[batch], pad_id, device)
                    loss = torch.nn.functional.cross_entropy(logits.float(), torch.from_numpy(labels[batch]).to(device))
                    scaler.scale(loss / config.train.grad_accum_steps).backward()
                loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
                real_tokens += int(attention_mask.sum())
                padded_tokens += attention_mask.size
                rows_seen += len(batch)
                if last_of_step:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                    if rank == 0 and step % config.train.log_every_steps == 0:
                        print(f"epoch {epoch} step {step}/{total_steps} loss {loss_sum / loss_count:.4f} "
                              f"lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
            if step >= total_steps:
                break  # max_steps reached: stop reading the shard too
        elapsed = time.perf_counter() - started
        metrics = {
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum / max(loss_count, 1),
            "train_rows_per_s": rows_seen * world / elapsed,
            "train_real_tokens_per_s": real_tokens * world / elapsed,
            "train_real_token_share": real_tokens / max(padded_tokens, 1),
        }
        valid_metrics = evaluate(model, valid_data, config, device, amp_dtype, pad_id, rank, world)
        metrics.update({f"valid_{name}": value for name, value in valid_metrics.items()})
        history.append(metrics)
        report(metrics, model, tokenizer, config, epoch, rank)
        if step >= total_steps:
            break
    return history


@torch.no_grad()
def evaluate(model, valid_data, config: Config, device, amp_dtype, pad_id: int, rank: int, world: int) -> dict[str, float]:
    """Log loss and accuracy on the whole validation fold; each worker scores every world-th window."""
    model.eval()
    model = unwrap(model)  # DDP's forward would sync buffers: a collective that ranks with fewer windows skip
    probs, labels = [], []
    for index, window in enumerate(valid_data.iter_batches(batch_size=VALID_WINDOW_ROWS, batch_format="numpy")):
        if index % world != rank:
            continue
        sequences, segments = window["input_ids"], window["segment_ids"]
        window_probs = np.zeros((len(sequences), 3))
        for batch in token_budget_batches([len(s) for s in sequences], config.train.eval_batch_size * config.format.max_length):
            with autocast(device, amp_dtype):
                logits, _ = forward_batch(model, sequences[batch], segments[batch], pad_id, device)
            window_probs[batch] = softmax(logits.float().cpu().numpy())
        probs.append(window_probs)
        labels.append(window["label"])
    local = (np.concatenate(probs) if probs else np.zeros((0, 3)), np.concatenate(labels) if labels else np.zeros(0, int))
    gathered = [local]
    if dist.is_available() and dist.is_initialized() and world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    all_probs = np.concatenate([part[0] for part in gathered])
    all_labels = np.concatenate([part[1] for part in gathered]).astype(np.int64)
    return {**score(all_probs, all_labels), "rows": float(len(all_labels))}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def report(metrics: dict[str, float], model, tokenizer, config: Config, epoch: int, rank: int) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (weights, tokenizer, config, metrics)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, unwrap(model), tokenizer, config, metrics, epoch)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"epoch_{epoch:03d}")
        print(f"epoch {epoch} done: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
