"""Driver side of a training run: load and split the rows, tokenize them with Ray Data, run TorchTrainer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from app.classical import fit_classical
from app.config import Config, ConfigError, config_to_dict
from app.data import assign_folds, load_pairs, prompt_group_key
from app.epochs import check_enough_rows
from app.distillation import TEACHER_COLUMNS, attach_teacher, load_teacher
from app.batching import pairs_per_micro_batch
from app.formatting import build_pair_encoder
from app.loop import train_loop_per_worker
from app.metrics import log_loss
from app.modeling import build_tokenizer
from app.priors import class_frequencies
from app.retrieval import BlockBuilder, JudgedPairs, plan_retrieval
from app import storage
from app.synthetic import write_builtin_dataset

ENCODE_BATCH_ROWS = 256
BLOCK_ROWS = 1024  # rows per block of the encoded datasets that training reads
CHECKPOINT_MANAGER_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


@dataclass
class FitResult:
    """What a finished run leaves behind."""

    run_dir: str
    best_checkpoint: str
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    n_rejected: int


def run_directory(config: Config) -> str:
    """Absolute `storage_path/name` (Ray needs an absolute path or a URI)."""
    root = config.run.storage_path
    if not storage.is_uri(root):
        root = os.path.abspath(root)
    return f"{root.rstrip('/')}/{config.run.name}"


def load_training_rows(config: Config, run_dir: str) -> tuple[pd.DataFrame, int]:
    """Validated labelled rows (the built-in set when no train_path) and the count of rejected rows."""
    path = config.data.train_path
    if path is None:
        local_dir = run_dir if "://" not in run_dir else os.path.abspath(os.path.join("runs", "builtin"))
        path = write_builtin_dataset(os.path.join(local_dir, "builtin_data"), n_train=config.data.builtin_rows,
                                     n_test=max(50, config.data.builtin_rows // 4), seed=config.seed)["train"]
    rejects = config.data.rejects_path or f"{run_dir}/rejects.jsonl"
    table = load_pairs(path, require_labels=True, on_bad_rows=config.data.on_bad_rows,
                       rejects_path=rejects if config.data.on_bad_rows == "skip" else None)
    frame = table.frame if config.data.max_rows is None else table.frame.iloc[: config.data.max_rows]
    if table.n_rejected:
        print(f"data: skipped {table.n_rejected} bad rows, written with reasons to {table.rejects_path}", flush=True)
    return frame.reset_index(drop=True), table.n_rejected


def split_train_valid(frame: pd.DataFrame, config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prompt-grouped k-fold split; fold `valid_fold` is held out."""
    folds = assign_folds([prompt_group_key(p) for p in frame["prompt"]], config.data.n_folds, config.fold_seed)
    is_valid = folds == config.data.valid_fold
    return frame[~is_valid].reset_index(drop=True), frame[is_valid].reset_index(drop=True)


class EncodeBatch:
    """Ray Data map_batches callable: rows -> token ids in both A/B orders (tokenizer loaded once per actor),
    and the teacher's (N, 3) probabilities as `teacher_probs` when the rows carry them (`TEACHER_COLUMNS`).

    With `pairs` (retrieval) each row's `neighbours` column (positions into `pairs`) becomes the neighbour block
    in front of it, in both A/B orders (app/retrieval.py)."""

    def __init__(self, config_dict: dict[str, Any], pairs: JudgedPairs | None = None) -> None:
        from app.config import validate_config

        config = validate_config(config_dict, "encode config")
        tokenizer = build_tokenizer(config)
        self.encoder = build_pair_encoder(tokenizer, config)
        self.blocks = None if pairs is None else BlockBuilder(tokenizer, pairs, config.retrieval.max_tokens,
                                                              config.format.head_fraction)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [list(map(list, batch[column])) for column in ("prompt", "response_a", "response_b")]
        contexts = None if self.blocks is None else self.blocks.blocks(np.stack(list(batch["neighbours"])))
        encoded, segments = self.encoder.encode_with_segments(*texts, contexts=contexts)
        swapped, swapped_segments = self.encoder.encode_with_segments(*texts, swap=True, contexts=contexts)
        encoded_rows = {
            "input_ids": _ragged(encoded),
            "segment_ids": _ragged(segments, np.int8),
            "input_ids_swapped": _ragged(swapped),
            "segment_ids_swapped": _ragged(swapped_segments, np.int8),
            "label": batch["label"].astype(np.int64),
            "row_id": batch["row_id"].astype(str),  # the input's id column: what a row log names
            "position": batch["position"].astype(np.int64),  # 0..N-1, what the workers deal out (app/loop.py)
            # tokens of the longer A/B order: what the epochs' length grouping sorts by (app/epochs.py)
            "length": np.array([max(len(a), len(b)) for a, b in zip(encoded, swapped, strict=True)], dtype=np.int32),
        }
        if TEACHER_COLUMNS[0] in batch:
            encoded_rows["teacher_probs"] = np.stack([batch[column] for column in TEACHER_COLUMNS], axis=1)  # (N, 3)
        return encoded_rows


def _ragged(sequences: list[list[int]], dtype: type = np.int32) -> np.ndarray:
    out = np.empty(len(sequences), dtype=object)
    out[:] = [np.asarray(seq, dtype=dtype) for seq in sequences]
    return out


def encode_dataset(frame: pd.DataFrame, config: Config, neighbours: np.ndarray | None = None,
                   pairs: JudgedPairs | None = None) -> tuple[ray.data.Dataset, np.ndarray]:
    """Tokenize rows with Ray Data; the result is held by this driver, in row order, so training workers only read
    blocks, and reads them the same whichever nodes come and go.

    The encoding actor runs on a worker node and its output blocks live in that node's object store: if the node
    is lost, those blocks are gone and cannot be rebuilt (the actor pool is gone too), and a restarted worker group
    would fail on them. So the blocks are fetched here and put back from the driver (the head node, which a
    training run outlives nothing of), sorted by `position`, the row's index in `frame`: the order, and so every
    rank's share of each epoch (app/loop.py `epoch_rows`), does not depend on which actor encoded what first.

    With retrieval, `neighbours` are the rows' (N, k) positions into `pairs` (app/retrieval.py `plan_retrieval`).
    Returns the dataset and each row's token count, by position (what app/epochs.py groups batches by).
    """
    columns = frame[["prompt", "response_a", "response_b", "label",
                     *(column for column in TEACHER_COLUMNS if column in frame)]]
    columns = columns.assign(row_id=frame["id"].astype(str).to_numpy() if "id" in frame else np.arange(len(frame)),
                             position=np.arange(len(frame)))
    if neighbours is not None:
        columns = columns.assign(neighbours=list(neighbours))
    dataset = ray.data.from_pandas(columns)
    dataset = dataset.map_batches(EncodeBatch, fn_constructor_args=(config_to_dict(config),
                                                                    None if pairs is None else pairs.texts_only()),
                                  batch_size=ENCODE_BATCH_ROWS, concurrency=1, num_cpus=1)
    table = pa.concat_tables(ray.get(dataset.materialize().to_arrow_refs()))
    table = table.take(pc.sort_indices(table, [("position", "ascending")]))
    blocks = [table.slice(start, BLOCK_ROWS) for start in range(0, max(len(table), 1), BLOCK_ROWS)]
    return ray.data.from_arrow(blocks), table["length"].to_numpy().astype(np.int32)


def build_trainer(config: Config, train: ray.data.Dataset, valid: ray.data.Dataset, lengths: np.ndarray,
                  callbacks: list | None = None, train_priors: list[float] | None = None,
                  checkpoint_files: dict[str, bytes] | None = None) -> TorchTrainer:
    """The TorchTrainer of one run; `lengths` are the training rows' token counts by position (app/epochs.py),
    `train_priors` (class shares of the training rows) go into every checkpoint's arena.json, where predict's
    class-prior shift reads them, and `checkpoint_files` (relative path -> content, e.g. the retrieval index) into
    every exported checkpoint. With `scaling.num_workers: [min, max]` the worker group is elastic."""
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})
    root = run_directory(config).rsplit("/", 1)[0]
    workers = scaling.worker_range if scaling.elastic else scaling.max_workers
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(config), "lengths": lengths, "run_dir": run_directory(config),
                           "checkpoint_meta": {"train_priors": train_priors},
                           "checkpoint_files": checkpoint_files or {}},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources,
                                               accelerator_type=scaling.accelerator_type,
                                               elastic_resize_monitor_interval_s=scaling.elastic_resize_interval_s),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=root,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints,
                                                         checkpoint_score_attribute="valid_log_loss",
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": train, "valid": valid},
        # Not split by Ray Data (whose split follows block locality, which changes when nodes do): every worker
        # reads the rows and keeps the ones the epoch deals it (app/loop.py `epoch_rows`).
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def fit(config: Config, callbacks: list | None = None) -> FitResult:
    """Train one model on the configured rows and return its best checkpoint (by validation log loss).

    A run whose name already holds checkpoints continues from the latest one (Ray Train restores its
    checkpoint manager from the run folder; app/loop.py restores the rest), unless run.resume is false.
    """
    if config.model.kind == "tfidf_xgb":  # TF-IDF + XGBoost on Ray Train's XGBoostTrainer (app/classical.py)
        return fit_classical(config, callbacks)
    run_dir = run_directory(config)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the job log gets the epochs' own lines
    if storage.exists(storage.join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT)):
        if not config.run.resume:
            raise ConfigError(f"run.name={config.run.name!r} already has checkpoints in {run_dir}; choose another "
                              "run.name, delete that folder, or set run.resume=true to continue it")
        print(f"resuming run {config.run.name!r} from the latest checkpoint in {run_dir}", flush=True)
    frame, n_rejected = load_training_rows(config, run_dir)
    train_frame, valid_frame = split_train_valid(frame, config)
    check_enough_rows(len(train_frame), pairs_per_micro_batch(config.train.batch_size, config.train.swap_mode),
                      config.train.grad_accum_steps * config.scaling.max_workers)  # before encoding: fail early
    if config.distill.teacher is not None:
        train_frame = with_teacher(train_frame, config)
    print(f"data: {len(train_frame)} training rows, {len(valid_frame)} validation rows "
          f"(fold {config.data.valid_fold} of {config.data.n_folds}, grouped by prompt)", flush=True)
    retrieval = None
    if config.retrieval.enabled:
        root = run_dir.rsplit("/", 1)[0]
        cache_dir = None if storage.is_uri(root) else os.path.join(root, "embedding_cache")
        retrieval = plan_retrieval(train_frame, valid_frame, config, cache_dir)
        print(f"retrieval: indexed {len(retrieval.pairs)} training pairs ({config.retrieval.embed} embeddings, "
              f"{config.retrieval.index} index); {config.retrieval.k} neighbours per row", flush=True)
    train, lengths = encode_dataset(train_frame, config,
                                    *((retrieval.train_neighbours, retrieval.pairs) if retrieval else ()))
    valid, _ = encode_dataset(valid_frame, config, *((retrieval.valid_neighbours, retrieval.pairs) if retrieval else ()))
    trainer = build_trainer(
        config, train, valid, lengths, callbacks, class_frequencies(train_frame["label"].to_numpy()).tolist(),
        checkpoint_files=retrieval.pairs.to_files(config.retrieval) if retrieval else None)
    return summarize_run(trainer.fit(), run_dir, n_rejected)


def with_teacher(train_frame: pd.DataFrame, config: Config) -> pd.DataFrame:
    """The training rows with the out-of-fold probabilities of the teacher `distill.teacher` (app/distillation.py).

    Raises:
        TeacherError: the teacher cannot be read, or has no prediction for a training row (named by id).
    """
    teacher = load_teacher(config.distill.teacher)
    frame = attach_teacher(train_frame, teacher)
    teacher_probs = frame[list(TEACHER_COLUMNS)].to_numpy(dtype=np.float64)
    print(f"distill: teacher {teacher.source}, log loss {log_loss(teacher_probs, frame['label'].to_numpy()):.4f} "
          f"out of fold on the {len(frame)} training rows; T={config.distill.temperature}, "
          f"alpha={config.distill.alpha}", flush=True)
    return frame


def summarize_run(result: ray.train.Result, run_dir: str, n_rejected: int) -> FitResult:
    """The best checkpoint by validation log loss of a finished run, also written to <run_dir>/summary.json (on the
    run's storage, an s3:// URI included). The checkpoint is named by a URI every node can read: Ray gives the path
    within its filesystem (`bucket/runs/x/epoch_001`), without the scheme. The summary's `tracking` says, per
    tracker, where rank 0 logged the run and whether the tracker failed it (app/tracking.py)."""
    checkpoint, metrics = min(result.best_checkpoints, key=lambda pair: pair[1]["valid_log_loss"])
    best = storage.uri_of(checkpoint.filesystem, checkpoint.path, like=run_dir)
    returned = result.return_value or {}
    history, tracked = returned.get("history", []), returned.get("tracking", {})
    for name, sink in tracked.items():
        print(f"tracking: {name} " + (f"logged to {sink['target']}" if sink["ok"] else f"FAILED: {sink['reason']}"),
              flush=True)
    summary = {"best_checkpoint": best, "best_metrics": metrics, "history": history, "n_rejected": n_rejected,
               "tracking": tracked}
    storage.write_json(storage.join(run_dir, "summary.json"), summary)
    return FitResult(run_dir, best, dict(metrics), history, n_rejected)
