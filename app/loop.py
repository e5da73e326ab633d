"""The training loop that every Ray Train worker runs, top to bottom.

Workers receive the config as a plain dict and rebuild everything they need. Rows arrive already
tokenized (both A/B orders) from Ray Data; each epoch deals them out to the ranks in equal shares
(`EpochShares`: one permutation per epoch, as DistributedSampler does), so every worker takes the same
number of steps, and each rank logs the rows it trained on (app/rowlog.py). Optimizer steps go through
a `Stepper` (app/engine.py): plain DDP, or a DeepSpeed ZeRO engine. `app.batching.micro_batches` cuts each window into micro-batches of
`train.batch_size` sequences: rows in a random A/B order (`train.swap_mode=random`) or each pair in both
orders (`symmetric`). With `distill.teacher` the rows carry the teacher's probabilities, swapped with them,
and the loss mixes in the distillation term (app/distillation.py).

Resume: every checkpoint holds, besides the inference export (rank 0), each rank's progress (epoch,
optimizer step, micro-batches done in the epoch, torch RNG, the epoch's running sums, history) and the
stepper's state. A worker that starts with `ray.train.get_checkpoint()` set (a restarted worker group,
or a resubmitted run of the same name) restores them and replays the epoch's data order up to where the
checkpoint was taken: shuffling, swapping and batching draw from a generator seeded per (seed, rank,
epoch), so the replayed order is the one the interrupted run saw, without running the model.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch

from app import collectives, rowlog
from app.batching import MicroBatch, micro_batches, pairs_per_micro_batch, token_budget_batches
from app.config import Config, validate_config
from app.engine import Stepper, build_stepper
from app.distillation import distillation_loss
from app.families import class_loss
from app.metrics import score, softmax
from app.modeling import autocast, build_model, build_tokenizer, forward_batch, save_checkpoint

VALID_WINDOW_ROWS = 1024  # validation rows per window; windows are dealt round-robin to workers
READ_ROWS = 1024  # training rows per read while a worker collects its share of an epoch
PROGRESS_FILE = "progress_rank{rank}.pt"
# valid_log_loss reported with a mid-epoch checkpoint (not evaluated): never the best, kept while it is the
# latest. Finite, because Ray Train's saved checkpoint records turn inf into null.
NOT_EVALUATED = 1e9


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int) -> None:
    """Give each rank random streams of its own (dropout masks): with one seed on every rank, all of them drop
    the same units. Called after the model is built from the shared seed, so initial weights stay identical
    (DDP and DeepSpeed broadcast rank 0's anyway)."""
    seed_everything(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def batches_per_epoch(n_rows: int, batch_size: int, group_batches: int) -> int:
    """Micro-batches one worker takes per epoch (mirrors `length_grouped_batches` on full windows)."""
    window = batch_size * group_batches
    full, rest = divmod(n_rows, window)
    return full * group_batches + math.ceil(rest / batch_size)


@dataclass
class Progress:
    """Where a worker is in the run; saved in every checkpoint, per rank."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken in the whole run
    micro: int = 0  # micro-batches done in `epoch`
    loss_sum: float = 0.0
    loss_count: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    rows_seen: int = 0
    seconds: float = 0.0  # training time in this epoch before the checkpoint
    row_ids: list[str] = field(default_factory=list)  # rows trained in `epoch` so far (app/rowlog.py)
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int | None = None

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.micro, self.loss_sum, self.loss_count = epoch, 0, 0.0, 0
        self.real_tokens = self.padded_tokens = self.rows_seen = 0
        self.seconds = 0.0
        self.row_ids = []


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, float]]:
    """Train (or resume), evaluating and reporting every epoch; returns rank 0's per-epoch metrics."""
    config = validate_config(loop_config["config"], "worker config")
    rows_per_worker: int = loop_config["rows_per_worker"]
    train_rows: int = loop_config["train_rows"]  # rows of the training set, all ranks together
    run_dir: str | None = loop_config.get("run_dir")  # where the row logs go (app/rowlog.py); None = nowhere
    checkpoint_meta: dict[str, Any] = loop_config.get("checkpoint_meta") or {}
    # files every exported checkpoint carries besides the model, e.g. the retrieval index (app/retrieval.py)
    checkpoint_files: dict[str, bytes] = loop_config.get("checkpoint_files") or {}
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config.deepspeed.enabled:
        from app.deepspeed import deepspeed_env

        os.environ.update(deepspeed_env(config))  # before DeepSpeed picks its accelerator (cpu vs cuda)
    torch.set_num_threads(config.scaling.torch_threads or max(1, int(config.scaling.cpus_per_worker)))
    seed_everything(config.seed)
    device = ray.train.torch.get_device()
    ray.data.DataContext.get_current().enable_progress_bars = False  # bars flood job logs; epochs print their own

    tokenizer = build_tokenizer(config)
    pairs_per_micro = pairs_per_micro_batch(config.train.batch_size, config.train.swap_mode)
    micro_per_epoch = batches_per_epoch(rows_per_worker, pairs_per_micro, config.train.length_group_batches)
    steps_per_epoch = math.ceil(micro_per_epoch / config.train.grad_accum_steps)
    total_steps = min(config.train.epochs * steps_per_epoch, config.train.max_steps or 10**12)
    progress = Progress()
    # ZeRO-3: while open, from_pretrained builds each rank's partition only (kept open for the whole run).
    with zero3_loading(config, world):
        stepper = build_stepper(build_model(config), config, total_steps, device, world)
        seed_rank(config.seed, rank)  # a resume restores the rank's own stream from its checkpoint instead
        try:
            checkpoint = ray.train.get_checkpoint()
            staging = check_staging(config)
            if rank == 0:
                print(f"checkpoints: staged in {staging}, {upload_mode(config).value.lower()} upload to "
                      f"{config.run.storage_path}", flush=True)
            if checkpoint is not None:
                progress = restore(checkpoint, stepper, rank, world)
                if rank == 0:
                    print(f"resumed at epoch {progress.epoch} step {progress.step} "
                          f"(micro-batch {progress.micro} of the epoch)", flush=True)
            shares = EpochShares(train_rows, rows_per_worker, world, rank, config.seed)
            run_epochs(config, stepper, tokenizer.pad_token_id, progress, micro_per_epoch, total_steps, device,
                       rank, world, tokenizer, checkpoint_meta, checkpoint_files, shares, run_dir)
        finally:
            stepper.close()
    return progress.history


@dataclass(frozen=True)
class EpochShares:
    """Which training rows a rank trains on in each epoch, and in what order, as DistributedSampler deals them: one
    permutation of all rows per (seed, epoch), the same on every rank, dealt round-robin. `rows_per_worker * world`
    rows take part; the rest of the permutation (fewer than `world` rows, different ones every epoch) sits the
    epoch out, so that every rank takes the same number of steps.

    The shares depend on nothing but these numbers: not on which node holds which block, nor on how many times the
    worker group was restarted, so a resumed epoch replays exactly the rows the interrupted one had."""

    train_rows: int
    rows_per_worker: int
    world: int
    rank: int
    seed: int

    def positions(self, epoch: int) -> np.ndarray:
        """Positions (0..train_rows-1, the `position` column) of this rank's rows in `epoch`, in training order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.train_rows)
        return order[: self.rows_per_worker * self.world][self.rank::self.world]

    def rows(self, dataset: ray.data.DataIterator, epoch: int) -> dict[str, np.ndarray]:
        """This rank's rows of `epoch` from the whole training set, in training order (columns as encoded)."""
        positions = self.positions(epoch)
        slot = np.full(self.train_rows, -1, dtype=np.int64)
        slot[positions] = np.arange(len(positions))
        parts, slots = [], []
        for chunk in dataset.iter_batches(batch_size=READ_ROWS, batch_format="numpy"):
            where = slot[chunk["position"]]
            keep = where >= 0
            if keep.any():
                parts.append({key: value[keep] for key, value in chunk.items()})
                slots.append(where[keep])
        if not parts or sum(map(len, slots)) != len(positions):
            raise RuntimeError(f"rank {self.rank} found {sum(map(len, slots))} of its {len(positions)} training rows "
                               f"of epoch {epoch}: the training set has changed under the run")
        order = np.argsort(np.concatenate(slots))
        return {key: _concatenate([part[key] for part in parts])[order] for key in parts[0]}


def _concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate a column's chunks; Ray Data hands a chunk of token-id rows that happen to have one length as a
    2-D array and others as 1-D object arrays of rows, so mixed chunks become object arrays of rows."""
    if len({array.shape[1:] for array in arrays}) > 1 or any(array.dtype == object for array in arrays):
        rows = []
        for array in arrays:
            as_objects = np.empty(len(array), dtype=object)
            as_objects[:] = list(array)
            rows.append(as_objects)
        arrays = rows
    return np.concatenate(arrays)


def windows_of(rows: dict[str, np.ndarray], size: int):
    """Consecutive windows of `size` rows (the last may be shorter)."""
    count = len(rows["label"])
    for start in range(0, count, size):
        yield {key: value[start:start + size] for key, value in rows.items()}


def run_epochs(config: Config, stepper: Stepper, pad_id: int, progress: Progress, micro_per_epoch: int,
               total_steps: int, device: torch.device, rank: int, world: int, tokenizer,
               checkpoint_meta: dict[str, Any], checkpoint_files: dict[str, bytes] | None, shares: EpochShares,
               run_dir: str | None) -> None:
    train_shard = ray.train.get_dataset_shard("train")
    valid_data = ray.train.get_dataset_shard("valid")
    model = stepper.model
    pairs_per_micro = pairs_per_micro_batch(config.train.batch_size, config.train.swap_mode)
    window_rows = pairs_per_micro * config.train.length_group_batches  # pairs read per length-grouping window
    every = config.train.checkpoint_every_steps
    for epoch in range(progress.epoch, config.train.epochs):
        if progress.step >= total_steps:
            break
        if epoch != progress.epoch or progress.micro == 0:
            progress.start_epoch(epoch)
        skip = progress.micro  # micro-batches already done before a resume: replayed, not computed
        model.train()
        started = time.perf_counter() - progress.seconds
        rng = np.random.default_rng([config.seed, rank, epoch])  # same draws when an epoch is replayed
        micro = 0
        for window in windows_of(shares.rows(train_shard, epoch), window_rows):
            for batch in micro_batches(window, config.train.batch_size, config.train.length_group_batches,
                                       config.train.swap_mode, config.train.swap_prob, rng):
                micro += 1
                if micro <= skip:
                    continue
                if progress.step >= total_steps:
                    break
                boundary = micro % config.train.grad_accum_steps == 0 or micro == micro_per_epoch
                with stepper.accumulate(boundary):
                    with autocast(device, stepper.amp_dtype):
                        logits, attention_mask = forward_batch(model, batch.sequences, batch.segments, pad_id, device)
                    loss = training_loss(logits.float(), batch, config, device)
                    stepper.backward(loss, boundary)
                progress.micro = micro
                progress.loss_sum, progress.loss_count = progress.loss_sum + loss.item(), progress.loss_count + 1
                progress.real_tokens += int(attention_mask.sum())
                progress.padded_tokens += attention_mask.size
                progress.rows_seen += len(batch.labels)  # sequences: a symmetric batch counts each pair twice
                if batch.row_ids is not None:
                    progress.row_ids.extend(map(str, batch.row_ids))
                if not boundary:
                    continue
                stepper.step()
                progress.step += 1
                if rank == 0 and progress.step % config.train.log_every_steps == 0:
                    print(f"epoch {epoch} step {progress.step}/{total_steps} "
                          f"loss {progress.loss_sum / progress.loss_count:.4f} lr {stepper.lr():.2e}", flush=True)
                if every and progress.step % every == 0 and micro < micro_per_epoch and progress.step < total_steps:
                    progress.seconds = time.perf_counter() - started
                    metrics = {**train_metrics(progress, world), "valid_log_loss": NOT_EVALUATED}
                    report(metrics, stepper, tokenizer, config, progress, rank, export=False)
            if progress.step >= total_steps:
                break  # max_steps reached: stop reading the shard too
        progress.seconds = time.perf_counter() - started
        metrics = train_metrics(progress, world)
        valid_metrics = evaluate(model, valid_data, config, device, stepper, pad_id, rank, world)
        metrics.update({f"valid_{name}": value for name, value in valid_metrics.items()})
        progress.history.append(metrics)
        progress.micro = micro_per_epoch  # the epoch is done: a resume starts the next one
        if run_dir is not None:
            rowlog.write(run_dir, epoch, rank, world, progress.row_ids, node=ray.get_runtime_context().get_node_id(),
                         resumed_from_step=progress.resumed_from_step)
        report(metrics, stepper, tokenizer, config, progress, rank, export=True, meta=checkpoint_meta,
               files=checkpoint_files)
        progress.micro = 0
        progress.epoch = epoch + 1


def training_loss(logits: torch.Tensor, batch: MicroBatch, config: Config, device: torch.device) -> torch.Tensor:
    """The loss of a micro-batch's (B, 3) logits: `class_loss` on its labels, mixed with the distillation term
    on the teacher's probabilities when `distill.teacher` is set."""
    labels = torch.from_numpy(batch.labels).to(device)
    hard_loss = class_loss(logits, labels, config.model.lm_loss)
    if config.distill.teacher is None:
        return hard_loss
    assert batch.soft_labels is not None, "app.training attaches the teacher's probabilities to every training row"
    return distillation_loss(logits, labels, torch.from_numpy(batch.soft_labels).to(device),
                             config.distill.temperature, config.distill.alpha, hard_loss=hard_loss)


def train_metrics(progress: Progress, world: int) -> dict[str, float]:
    elapsed = max(progress.seconds, 1e-9)
    metrics = {
        "epoch": progress.epoch,
        "step": progress.step,
        "train_loss": progress.loss_sum / max(progress.loss_count, 1),
        "train_rows_per_s": progress.rows_seen * world / elapsed,
        "train_real_tokens_per_s": progress.real_tokens * world / elapsed,
        "train_real_token_share": progress.real_tokens / max(progress.padded_tokens, 1),
    }
    if progress.resumed_from_step is not None:
        metrics["resumed_from_step"] = progress.resumed_from_step
    return metrics


@torch.no_grad()
def evaluate(model, valid_data, config: Config, device, stepper: Stepper, pad_id: int, rank: int,
             world: int) -> dict[str, float]:
    """Log loss and accuracy on the whole validation fold; each worker scores every world-th window.

    Under ZeRO-3 every forward pass gathers parameters collectively, so all ranks must run the same
    number of them: ranks with fewer batches run repeats of a one-row batch whose output is discarded.
    """
    model.eval()
    model = unwrap(model)  # DDP's forward would sync buffers: a collective that ranks with fewer windows skip
    jobs = []  # (window index, batch row indices) of this rank
    windows, filler = [], None
    for index, window in enumerate(valid_data.iter_batches(batch_size=VALID_WINDOW_ROWS, batch_format="numpy")):
        filler = filler or {key: value[:1] for key, value in window.items()}
        if index % world != rank:
            continue
        windows.append(window)
        budget = config.train.eval_batch_size * config.format.max_length
        jobs += [(len(windows) - 1, batch) for batch in token_budget_batches([len(s) for s in window["input_ids"]], budget)]
    lockstep = config.deepspeed.enabled and config.deepspeed.stage == 3 and world > 1
    n_forwards = len(jobs)
    if lockstep:
        n_forwards = int(collectives.all_reduce(torch.tensor([len(jobs)]), device, op="max").item())
    probs = [np.zeros((len(window["input_ids"]), 3)) for window in windows]
    for job in range(n_forwards):
        if job < len(jobs):
            window_index, batch = jobs[job]
            window = windows[window_index]
        else:  # a lockstep filler: the fold's first row, output discarded
            window, batch, window_index = filler, [0], None
        with autocast(device, stepper.amp_dtype):
            logits, _ = forward_batch(model, window["input_ids"][batch], window["segment_ids"][batch], pad_id, device)
        if window_index is not None:
            probs[window_index][batch] = softmax(logits.float().cpu().numpy())
    local = (np.concatenate(probs) if probs else np.zeros((0, 3)),
             np.concatenate([window["label"] for window in windows]) if windows else np.zeros(0, int))
    gathered = collectives.all_gather_objects(local, world) if collectives.is_distributed() and world > 1 else [local]
    all_probs = np.concatenate([part[0] for part in gathered])
    all_labels = np.concatenate([part[1] for part in gathered]).astype(np.int64)
    return {**score(all_probs, all_labels), "rows": float(len(all_labels))}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper or a DeepSpeed engine."""
    return getattr(model, "module", model)


def report(metrics: dict[str, float], stepper: Stepper, tokenizer, config: Config, progress: Progress, rank: int,
           export: bool, meta: dict[str, Any] | None = None, files: dict[str, bytes] | None = None) -> None:
    """Every rank reports a checkpoint holding its progress and stepper state; Ray Train merges them into one
    folder. At the end of an epoch (`export`) rank 0 adds the inference export (weights, tokenizer, arena.json)
    and `files` (relative path -> content)."""
    name = f"epoch_{progress.epoch:03d}" + ("" if export else f"_step_{progress.step:06d}")
    # A collective under ZeRO-3: every rank joins the gathers, only rank 0 (which saves) keeps a host copy.
    state_dict = stepper.export_state_dict(keep=rank == 0) if export else None
    directory = staging_directory(config, name, rank)
    try:
        if export and rank == 0:
            save_checkpoint(directory, unwrap(stepper.model), tokenizer, config, metrics, progress.epoch,
                            state_dict=state_dict, meta=meta)
            for relative, content in (files or {}).items():
                os.makedirs(os.path.dirname(os.path.join(directory, relative)), exist_ok=True)
                with open(os.path.join(directory, relative), "wb") as handle:
                    handle.write(content)
        stepper.save_state(directory, rank)
        torch.save({"progress": asdict(progress), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   os.path.join(directory, PROGRESS_FILE.format(rank=rank)))
        # Ray Train uploads the staged folder to run.storage_path (in the background when async) and deletes it.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name,
                         checkpoint_upload_mode=upload_mode(config), delete_local_checkpoint_after_upload=True)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    if rank == 0 and export:
        print(f"epoch {progress.epoch} done: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)


def upload_mode(config: Config) -> ray.train.CheckpointUploadMode:
    """Ray Train's upload mode for `run.checkpoint_upload` (resolved by `RunConfig.upload`)."""
    return ray.train.CheckpointUploadMode.ASYNC if config.run.upload == "async" else ray.train.CheckpointUploadMode.SYNC


def staging_directory(config: Config, name: str, rank: int) -> str:
    """A new folder for one rank's part of checkpoint `name`, under `run.staging_dir` (the node's fast disk; None
    = the system temp folder): everything a checkpoint holds is written here before Ray Train uploads it."""
    return tempfile.mkdtemp(prefix=f"{name}-rank{rank}-", dir=config.run.staging_dir)


def check_staging(config: Config) -> str:
    """Make sure this node can stage checkpoints in `run.staging_dir` (created if missing), at the start of the run
    rather than at its first checkpoint; returns the folder.

    Raises:
        RuntimeError: the folder cannot be created or written, naming it and this node.
    """
    root = config.run.staging_dir or tempfile.gettempdir()
    try:
        os.makedirs(root, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as error:
        raise RuntimeError(f"run.staging_dir={root} cannot hold checkpoints on node {ray.util.get_node_ip_address()} "
                           f"({error}): mount the node's fast disk there (cluster.yaml mounts instance NVMe at "
                           "/mnt/local_nvme on its GPU nodes), or set run.staging_dir to a writable local folder "
                           "(null = the system temp folder)") from error
    return root


def restore(checkpoint: ray.train.Checkpoint, stepper: Stepper, rank: int, world: int) -> Progress:
    """Load this rank's progress and the stepper state (weights, optimizer, scheduler) from a checkpoint."""
    with checkpoint.as_directory() as directory:
        ranks = sorted(name for name in os.listdir(directory) if name.startswith("progress_rank"))
        if len(ranks) != world:
            raise RuntimeError(f"checkpoint {checkpoint.path} was written by {len(ranks)} workers, this run has "
                               f"{world}: resume with the same scaling.num_workers, or start a new run.name")
        state = torch.load(os.path.join(directory, PROGRESS_FILE.format(rank=rank)), map_location="cpu",
                           weights_only=False)
        stepper.load_state(directory)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    progress = Progress(**state["progress"])
    progress.resumed_from_step = progress.step
    return progress


def zero3_loading(config: Config, world: int) -> contextlib.AbstractContextManager:
    """While open, from_pretrained builds ZeRO-3 partitioned parameters (DeepSpeed stage 3 only)."""
    if not (config.deepspeed.enabled and config.deepspeed.stage == 3):
        return contextlib.nullcontext()
    from app.deepspeed import build_deepspeed_config, zero3_loading as deepspeed_zero3_loading

    return deepspeed_zero3_loading(build_deepspeed_config(config, world))
