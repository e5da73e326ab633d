"""Driver side of a training run: load and split the rows, tokenize them with Ray Data, run TorchTrainer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from app.classical import fit_classical
from app.config import Config, ConfigError, config_to_dict
from app.data import assign_folds, load_pairs, prompt_group_key
from app.formatting import build_pair_encoder
from app.loop import train_loop_per_worker
from app.modeling import build_tokenizer
from app.priors import class_frequencies
from app.synthetic import write_builtin_dataset

ENCODE_BATCH_ROWS = 256
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
    storage = config.run.storage_path
    if "://" not in storage:
        storage = os.path.abspath(storage)
    return f"{storage.rstrip('/')}/{config.run.name}"


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
    folds = assign_folds([prompt_group_key(p) for p in frame["prompt"]], config.data.n_folds, config.seed)
    is_valid = folds == config.data.valid_fold
    return frame[~is_valid].reset_index(drop=True), frame[is_valid].reset_index(drop=True)


class EncodeBatch:
    """Ray Data map_batches callable: rows -> token ids in both A/B orders (tokenizer loaded once per actor)."""

    def __init__(self, config_dict: dict[str, Any]) -> None:
        from app.config import validate_config

        config = validate_config(config_dict, "encode config")
        self.encoder = build_pair_encoder(build_tokenizer(config), config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [list(map(list, batch[column])) for column in ("prompt", "response_a", "response_b")]
        encoded, segments = self.encoder.encode_with_segments(*texts)
        swapped, swapped_segments = self.encoder.encode_with_segments(*texts, swap=True)
        return {
            "input_ids": _ragged(encoded),
            "segment_ids": _ragged(segments, np.int8),
            "input_ids_swapped": _ragged(swapped),
            "segment_ids_swapped": _ragged(swapped_segments, np.int8),
            "label": batch["label"].astype(np.int64),
        }


def _ragged(sequences: list[list[int]], dtype: type = np.int32) -> np.ndarray:
    out = np.empty(len(sequences), dtype=object)
    out[:] = [np.asarray(seq, dtype=dtype) for seq in sequences]
    return out


def encode_dataset(frame: pd.DataFrame, config: Config) -> ray.data.Dataset:
    """Tokenize rows with Ray Data and materialize them, so training workers only read blocks."""
    columns = frame[["prompt", "response_a", "response_b", "label"]]
    dataset = ray.data.from_pandas(columns)
    dataset = dataset.map_batches(EncodeBatch, fn_constructor_args=(config_to_dict(config),),
                                  batch_size=ENCODE_BATCH_ROWS, concurrency=1, num_cpus=1)
    return dataset.materialize()


def build_trainer(config: Config, train: ray.data.Dataset, valid: ray.data.Dataset, rows_per_worker: int,
                  callbacks: list | None = None, train_priors: list[float] | None = None) -> TorchTrainer:
    """The TorchTrainer of one run; `train_priors` (class shares of the training rows) go into every
    checkpoint's arena.json, where predict's class-prior shift reads them."""
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker} | ({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})
    storage = run_directory(config).rsplit("/", 1)[0]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(config), "rows_per_worker": rows_per_worker,
                           "checkpoint_meta": {"train_priors": train_priors}},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources,
                                               accelerator_type=scaling.accelerator_type),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints,
                                                         checkpoint_score_attribute="valid_log_loss",
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": train, "valid": valid},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def fit(config: Config, callbacks: list | None = None) -> FitResult:
    """Train one model on the configured rows and return its best checkpoint (by validation log loss).

    A run whose name already holds checkpoints continues from the latest one (Ray Train restores its
    checkpoint manager from the run folder; app/loop.py restores the rest), unless run.resume is false.
    """
    if config.model.kind == "tfidf_xgb":  # TF-IDF + XGBoost on Ray Train's XGBoostTrainer (app/classical.py)
        return fit_classical(config, callbacks)
    run_dir = run_directory(config)
    snapshot = os.path.join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT)
    if "://" not in run_dir and os.path.exists(snapshot):
        if not config.run.resume:
            raise ConfigError(f"run.name={config.run.name!r} already has checkpoints in {run_dir}; choose another "
                              "run.name, delete that folder, or set run.resume=true to continue it")
        print(f"resuming run {config.run.name!r} from the latest checkpoint in {run_dir}", flush=True)
    frame, n_rejected = load_training_rows(config, run_dir)
    train_frame, valid_frame = split_train_valid(frame, config)
    rows_per_worker = len(train_frame) // config.scaling.num_workers
    if rows_per_worker < config.train.batch_size:
        raise ValueError(f"{len(train_frame)} training rows give {rows_per_worker} per worker, fewer than "
                         f"train.batch_size={config.train.batch_size}; use more rows or fewer workers")
    print(f"data: {len(train_frame)} training rows, {len(valid_frame)} validation rows "
          f"(fold {config.data.valid_fold} of {config.data.n_folds}, grouped by prompt)", flush=True)
    trainer = build_trainer(config, encode_dataset(train_frame, config), encode_dataset(valid_frame, config),
                            rows_per_worker, callbacks, class_frequencies(train_frame["label"].to_numpy()).tolist())
    return summarize_run(trainer.fit(), run_dir, n_rejected)


def summarize_run(result: ray.train.Result, run_dir: str, n_rejected: int) -> FitResult:
    """The best checkpoint by validation log loss of a finished run, also written to <run_dir>/summary.json."""
    checkpoint, metrics = min(result.best_checkpoints, key=lambda pair: pair[1]["valid_log_loss"])
    history = result.return_value or []
    summary = {"best_checkpoint": checkpoint.path, "best_metrics": metrics, "history": history, "n_rejected": n_rejected}
    if "://" not in run_dir:
        with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, default=float)
    return FitResult(run_dir, checkpoint.path, dict(metrics), history, n_rejected)
