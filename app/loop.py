"""The training loop that every Ray Train worker runs, top to bottom.

Workers receive the config as a plain dict and rebuild everything they need. Rows arrive already
tokenized (both A/B orders) from Ray Data; every optimizer step of an epoch trains on one global batch that
app/epochs.py plans without regard to the number of workers (one seeded permutation per epoch, length-grouped
micro-batches), and each rank computes its share of the step's micro-batches and logs the rows it trained on
(app/rowlog.py). At `world` workers a rank accumulates `train.grad_accum_steps x max workers / world`
micro-batches per step, so an elastic run (`scaling.num_workers: [min, max]`) keeps its global batch, its
learning-rate schedule (which counts optimizer steps) and its data order at every size. Optimizer steps go
through a `Stepper` (app/engine.py): plain DDP, or a DeepSpeed ZeRO engine. `app.batching.assemble` builds each
micro-batch of `train.batch_size` sequences: rows in a random A/B order (`train.swap_mode=random`) or each pair
in both orders (`symmetric`). With `distill.teacher` the rows carry the teacher's probabilities, swapped with
them, and the loss mixes in the distillation term (app/distillation.py).

Resume: every checkpoint holds, besides the inference export (rank 0), each rank's progress (epoch, optimizer
step, torch RNG, the epoch's running sums and row ids, history) and the stepper's state. A worker that starts
with `ray.train.get_checkpoint()` set (a restarted or resized worker group, or a resubmitted run of the same
name) restores them and goes on at the next step of the plan. At another world size than the checkpoint's, rank
r takes over the progress of the old ranks r, r + world, ...; DDP state is the same on every rank, and DeepSpeed
ZeRO shards are turned into DeepSpeed's universal checkpoint first (app/engine.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch

from app import collectives, rowlog, storage, tracking
from app.calibration import expected_calibration_error
from app.batching import MicroBatch, assemble, pairs_per_micro_batch, token_budget_batches
from app.config import Config, validate_config
from app.engine import Stepper, build_stepper, needs_universal
from app.distillation import distillation_loss
from app.epochs import EpochPlan, accumulation_steps
from app.families import class_loss
from app.metrics import score, softmax
from app.modeling import autocast, build_model, build_tokenizer, forward_batch, save_checkpoint
from app.tracking import BEST_CHECKPOINT_TAG, Record, StepMeter, Tracker

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


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Give each rank random streams of its own (dropout masks): with one seed on every rank, all of them drop
    the same units. Called after the model is built from the shared seed, so initial weights stay identical
    (DDP and DeepSpeed broadcast rank 0's anyway). A rank resumed at another world size has no stream of its own
    to restore: it starts one from the step it resumes at."""
    seed_everything(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def batches_per_epoch(n_rows: int, batch_size: int, group_batches: int) -> int:
    """Micro-batches `app.batching.micro_batches` cuts `n_rows` rows into (length grouping on full windows)."""
    window = batch_size * group_batches
    full, rest = divmod(n_rows, window)
    return full * group_batches + math.ceil(rest / batch_size)


def sized_for(config: Config, world: int) -> Config:
    """`config` as `world` workers run it: each accumulates `train.grad_accum_steps x max workers / world`
    micro-batches per step, so the global batch is the same at every size of an elastic run."""
    accum = accumulation_steps(config.train.grad_accum_steps, config.scaling.max_workers, world)
    return config.model_copy(update={"train": config.train.model_copy(update={"grad_accum_steps": accum}),
                                     "scaling": config.scaling.model_copy(update={"num_workers": world})})


@dataclass
class Progress:
    """Where a worker is in the run; saved in every checkpoint, per rank."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken in the whole run
    epoch_done: bool = False  # the epoch's steps, evaluation and report are done: a resume starts the next one
    world: int = 1  # ranks of the worker group that wrote this progress
    plan: dict[str, int] = field(default_factory=dict)  # the data plan it follows (EpochPlan.describe)
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
        self.epoch, self.epoch_done, self.loss_sum, self.loss_count = epoch, False, 0.0, 0
        self.real_tokens = self.padded_tokens = self.rows_seen = 0
        self.seconds = 0.0
        self.row_ids = []

    def absorb(self, other: Progress) -> None:
        """Take over the running sums and row ids of another rank's progress in the same epoch (a resume at a
        smaller world size: one rank goes on with what several had done)."""
        self.loss_sum, self.loss_count = self.loss_sum + other.loss_sum, self.loss_count + other.loss_count
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens
        self.rows_seen += other.rows_seen
        self.row_ids += other.row_ids


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume), evaluating and reporting every epoch; returns rank 0's per-epoch metrics (`history`) and
    how its trackers fared (`tracking`, app/tracking.py `Tracker.status`)."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = sized_for(validate_config(loop_config["config"], "worker config"), world)
    run_dir: str | None = loop_config.get("run_dir")  # where the row logs go (app/rowlog.py); None = nowhere
    checkpoint_meta: dict[str, Any] = loop_config.get("checkpoint_meta") or {}
    # files every exported checkpoint carries besides the model, e.g. the retrieval index (app/retrieval.py)
    checkpoint_files: dict[str, bytes] = loop_config.get("checkpoint_files") or {}
    if config.deepspeed.enabled:
        from app.deepspeed import deepspeed_env

        os.environ.update(deepspeed_env(config))  # before DeepSpeed picks its accelerator (cpu vs cuda)
    torch.set_num_threads(config.scaling.torch_threads or max(1, int(config.scaling.cpus_per_worker)))
    seed_everything(config.seed)
    device = ray.train.torch.get_device()
    ray.data.DataContext.get_current().enable_progress_bars = False  # bars flood job logs; epochs print their own

    tokenizer = build_tokenizer(config)
    plan = EpochPlan(np.asarray(loop_config["lengths"]), pairs_per_micro_batch(config.train.batch_size,
                                                                                config.train.swap_mode),
                     config.train.grad_accum_steps * world, config.train.length_group_batches, config.seed)
    total_steps = min(config.train.epochs * plan.steps_per_epoch, config.train.max_steps or 10**12)
    progress = Progress(world=world, plan=plan.describe())
    tracker: Tracker | None = None  # rank 0's (app/tracking.py)
    checkpoint = ray.train.get_checkpoint()
    # ZeRO-3: while open, from_pretrained builds each rank's partition only (kept open for the whole run).
    with zero3_loading(config, world):
        with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as directory:
            written_by = checkpoint_world(directory) if directory else world
            stepper = build_stepper(build_model(config), config, total_steps, device, world,
                                    universal=written_by != world and needs_universal(directory),
                                    written_by=written_by)
            try:
                seed_rank(config.seed, rank)  # a resume restores the rank's own stream from its checkpoint instead
                staging = check_staging(config)
                if rank == 0:
                    print(f"checkpoints: staged in {staging}, {upload_mode(config).value.lower()} upload to "
                          f"{config.run.storage_path}; {world} workers, each accumulating "
                          f"{config.train.grad_accum_steps} micro-batches of {config.train.batch_size} sequences "
                          "per step", flush=True)
                if directory is not None:
                    progress = restore(directory, written_by, stepper, rank, world, plan, config.seed)
                    if rank == 0:
                        print(f"resumed at epoch {progress.epoch} step {progress.step}: {written_by} workers wrote "
                              f"the checkpoint, {world} go on", flush=True)
                if rank == 0 and run_dir is not None:
                    tracker = open_tracker(config, run_dir, directory, progress)
            except BaseException:
                stepper.close()
                raise
        try:
            run_epochs(config, stepper, tokenizer.pad_token_id, progress, plan, total_steps, device, rank, world,
                       tokenizer, checkpoint_meta, checkpoint_files, run_dir, tracker)
        except BaseException:
            if tracker is not None:
                tracker.close(failed=True)
            raise
        finally:
            stepper.close()
    tracked = {}
    if tracker is not None:
        summary = None
        if progress.history:
            uri, metrics = best_checkpoint(run_dir, progress.history)
            summary = {"best_checkpoint": uri, "best_metrics": metrics, "history": progress.history}
        tracked = tracker.finish(summary)
    return {"history": progress.history, "tracking": tracked}


def open_tracker(config: Config, run_dir: str, checkpoint_dir: str | None, progress: Progress) -> Tracker:
    """Rank 0's tracker of the run (app/tracking.py): a fresh run's, or on a resume the same tracker runs continued
    from the step after the checkpoint's in `checkpoint_dir`."""
    return Tracker(config.tracking, run_dir, first_step=progress.step + 1 if checkpoint_dir is not None else 0,
                   params=tracking.config_params(config), tags={"arena.model": config.model.name_or_path},
                   resumed_from=checkpoint_dir)


def checkpoint_world(directory: str) -> int:
    """How many ranks wrote the checkpoint in `directory`, as its rank 0 recorded it. Not a count of the progress
    files: a checkpoint's folder is named by epoch and step, so a larger worker group that failed after writing part
    of the same step's checkpoint can have left files of its higher ranks there (seen in the elastic rehearsal)."""
    state = torch.load(os.path.join(directory, PROGRESS_FILE.format(rank=0)), map_location="cpu", weights_only=False)
    recorded = state["progress"].get("world")  # None in checkpoints from before elastic runs: one file per rank
    return int(recorded) if recorded else sum(name.startswith("progress_rank") for name in os.listdir(directory))


def epoch_rows(dataset: ray.data.DataIterator, positions: np.ndarray, rank: int, epoch: int) -> dict[str, np.ndarray]:
    """The rows at `positions` (the `position` column) of the whole training set, in that order (columns as
    encoded). Every worker reads the rows itself and keeps its own: what it gets depends on nothing but the plan.

    Raises:
        RuntimeError: some positions are not in the dataset (the training set changed under the run).
    """
    slot = np.full(int(positions.max(initial=-1)) + 1, -1, dtype=np.int64)
    slot[positions] = np.arange(len(positions))
    parts, slots = [], []
    for chunk in dataset.iter_batches(batch_size=READ_ROWS, batch_format="numpy"):
        inside = chunk["position"] < len(slot)
        where = np.full(len(chunk["position"]), -1, dtype=np.int64)
        where[inside] = slot[chunk["position"][inside]]
        keep = where >= 0
        if keep.any():
            parts.append({key: value[keep] for key, value in chunk.items()})
            slots.append(where[keep])
    found = sum(map(len, slots))
    if not parts or found != len(positions):
        raise RuntimeError(f"rank {rank} found {found} of its {len(positions)} training rows of epoch {epoch}: the "
                           "training set has changed under the run")
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


def run_epochs(config: Config, stepper: Stepper, pad_id: int, progress: Progress, plan: EpochPlan, total_steps: int,
               device: torch.device, rank: int, world: int, tokenizer, checkpoint_meta: dict[str, Any],
               checkpoint_files: dict[str, bytes] | None, run_dir: str | None, tracker: Tracker | None) -> None:
    """Train the epochs left, from `progress` on. Every `train.log_every_steps` steps the ranks sum what they did
    since the last logged step (`StepMeter`) and rank 0 logs it; every epoch ends with an evaluation, logged too,
    and a checkpoint. `tracker` is rank 0's (None on the other ranks)."""
    train_shard = ray.train.get_dataset_shard("train")
    valid_data = ray.train.get_dataset_shard("valid")
    model = stepper.model
    accumulate = plan.accumulation(world)
    every = config.train.checkpoint_every_steps
    steps_per_epoch = plan.steps_per_epoch
    meter = StepMeter(model, config.tracking, device, world)
    for epoch in range(progress.epoch + progress.epoch_done, config.train.epochs):
        if progress.step >= total_steps:
            break
        if epoch != progress.epoch:
            progress.start_epoch(epoch)
        first = progress.step - epoch * steps_per_epoch  # steps of the epoch taken before a resume
        share = plan.share(epoch, rank, world, first)
        rows = epoch_rows(train_shard, np.concatenate([positions for _, positions in share]), rank, epoch) if share else {}
        swaps = plan.swaps(epoch, config.train.swap_prob)
        model.train()
        started = time.perf_counter() - progress.seconds
        meter.restart(progress.step)
        offset = 0
        for index, (_, positions) in enumerate(share):
            if progress.step >= total_steps:
                break
            picked = {key: value[offset:offset + len(positions)] for key, value in rows.items()}
            offset += len(positions)
            batch = assemble(picked, swaps[positions], config.train.swap_mode)
            boundary = (index + 1) % accumulate == 0
            with stepper.accumulate(boundary):
                with autocast(device, stepper.amp_dtype):
                    logits, attention_mask = forward_batch(model, batch.sequences, batch.segments, pad_id, device)
                loss = training_loss(logits.float(), batch, config, device)
                stepper.backward(loss, boundary)
            loss_value, real_tokens = loss.item(), int(attention_mask.sum())
            progress.loss_sum, progress.loss_count = progress.loss_sum + loss_value, progress.loss_count + 1
            progress.real_tokens += real_tokens
            progress.padded_tokens += attention_mask.size
            progress.rows_seen += len(batch.labels)  # sequences: a symmetric batch counts each pair twice
            meter.add(loss_value, real_tokens, attention_mask.size, len(batch.labels))
            if batch.row_ids is not None:
                progress.row_ids.extend(map(str, batch.row_ids))
            if not boundary:
                continue
            stepper.step()
            progress.step += 1
            if progress.step % config.train.log_every_steps == 0:
                record = meter.record(progress.step, stepper.grad_norm(), stepper.lrs())  # every rank: a collective
                if rank == 0:
                    print(f"epoch {epoch} step {progress.step}/{total_steps} "
                          f"loss {progress.loss_sum / progress.loss_count:.4f} lr {stepper.lr():.2e}", flush=True)
                    if tracker is not None:
                        tracker.log(record)
            in_epoch = progress.step - epoch * steps_per_epoch
            if every and progress.step % every == 0 and in_epoch < steps_per_epoch and progress.step < total_steps:
                progress.seconds = time.perf_counter() - started
                metrics = {**train_metrics(progress, world), "valid_log_loss": NOT_EVALUATED}
                report(metrics, stepper, tokenizer, config, progress, rank, export=False, tracker=tracker)
                meter.restart(progress.step)
        progress.seconds = time.perf_counter() - started
        metrics = train_metrics(progress, world)
        valid_metrics = evaluate(model, valid_data, config, device, stepper, pad_id, rank, world)
        metrics.update({f"valid_{name}": value for name, value in valid_metrics.items()})
        progress.history.append(metrics)
        if tracker is not None:
            tracker.log(Record(progress.step, {name: valid_metrics[name] for name in ("log_loss", "accuracy", "ece")},
                               "eval"))
        progress.epoch_done = True
        if run_dir is not None:
            rowlog.write(run_dir, epoch, rank, world, progress.row_ids, node=ray.get_runtime_context().get_node_id(),
                         resumed_from_step=progress.resumed_from_step)
            if rank == 0:
                rowlog.prune(run_dir, epoch, world)  # the logs of ranks a larger, earlier group had
        report(metrics, stepper, tokenizer, config, progress, rank, export=True, meta=checkpoint_meta,
               files=checkpoint_files, tracker=tracker)
        if tracker is not None and run_dir is not None:
            tracker.set_tags({BEST_CHECKPOINT_TAG: best_checkpoint(run_dir, progress.history)[0]})


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
    return {**score(all_probs, all_labels), "ece": expected_calibration_error(all_probs, all_labels),
            "rows": float(len(all_labels))}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper or a DeepSpeed engine."""
    return getattr(model, "module", model)


def best_checkpoint(run_dir: str, history: list[dict[str, float]]) -> tuple[str, dict[str, float]]:
    """The URI and metrics of the epoch checkpoint with the lowest validation log loss so far (the one Ray Train
    keeps as the best: mid-epoch checkpoints report NOT_EVALUATED)."""
    best = min(history, key=lambda row: row["valid_log_loss"])
    return f"{run_dir}/epoch_{int(best['epoch']):03d}", best


def checkpoint_name(progress: Progress, export: bool) -> str:
    """The folder name of a checkpoint: `epoch_001` at an epoch's end (`export`), `epoch_001_step_000120` within."""
    return f"epoch_{progress.epoch:03d}" + ("" if export else f"_step_{progress.step:06d}")


def report(metrics: dict[str, float], stepper: Stepper, tokenizer, config: Config, progress: Progress, rank: int,
           export: bool, meta: dict[str, Any] | None = None, files: dict[str, bytes] | None = None,
           tracker: Tracker | None = None) -> None:
    """Every rank reports a checkpoint holding its progress and stepper state; Ray Train merges them into one
    folder. At the end of an epoch (`export`) rank 0 adds the inference export (weights, tokenizer, arena.json)
    and `files` (relative path -> content). On `s3://` storage rank 0's checkpoints also carry the run's
    TensorBoard events (`tracker`'s), which live on the node's disk until then."""
    name = checkpoint_name(progress, export)
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
        if tracker is not None and storage.is_uri(config.run.storage_path):
            tracking.checkpoint_events(tracker, directory)
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


def restore(directory: str, written_by: int, stepper: Stepper, rank: int, world: int, plan: EpochPlan,
            seed: int) -> Progress:
    """Load this rank's progress and the stepper state (weights, optimizer, scheduler) from the checkpoint in
    `directory`, which `written_by` ranks wrote (`checkpoint_world`). Written by as many ranks as now, each rank
    takes its own progress and random streams back; by another number, rank r takes over the progress of the old ranks r, r + world, ... (their running sums and
    row ids: nothing trained before the checkpoint goes unlogged) and starts fresh random streams.

    Raises:
        RuntimeError: the checkpoint follows another data plan (rows, batch or global batch, seed), in which its
            position would mean other rows.
    """
    states = [torch.load(os.path.join(directory, PROGRESS_FILE.format(rank=old)), map_location="cpu",
                         weights_only=False) for old in range(rank, written_by, world) or [0]]
    known = {item.name for item in fields(Progress)}
    taken = [Progress(**{key: value for key, value in state["progress"].items() if key in known}) for state in states]
    if taken[0].plan != plan.describe():
        raise RuntimeError(f"the checkpoint in {directory} follows the data plan {taken[0].plan}, this run "
                           f"{plan.describe()}: resume with the same data, seed, train.batch_size and global batch "
                           "(train.grad_accum_steps x the most workers), or start a new run.name")
    stepper.load_state(directory)
    progress = taken[0]
    if rank >= written_by:  # a rank the old group did not have: the position and history, none of the sums
        progress = Progress(epoch=progress.epoch, step=progress.step, epoch_done=progress.epoch_done,
                            seconds=progress.seconds, history=progress.history, plan=progress.plan)
    for other in taken[1:]:
        progress.absorb(other)
    if written_by == world:
        torch.set_rng_state(states[0]["torch_rng"])
        if states[0]["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states[0]["cuda_rng"])
    else:
        seed_rank(seed, rank, progress.step)
    progress.world = world
    progress.resumed_from_step = progress.step
    return progress


def zero3_loading(config: Config, world: int) -> contextlib.AbstractContextManager:
    """While open, from_pretrained builds ZeRO-3 partitioned parameters (DeepSpeed stage 3 only)."""
    if not (config.deepspeed.enabled and config.deepspeed.stage == 3):
        return contextlib.nullcontext()
    from app.deepspeed import build_deepspeed_config, zero3_loading as deepspeed_zero3_loading

    return deepspeed_zero3_loading(build_deepspeed_config(config, world))
