"""TF-IDF + XGBoost preference model (model.kind=tfidf_xgb), trained by Ray Train's XGBoostTrainer.

`fit_classical` is what `app.training.fit` runs for this kind, so jobs/train, jobs/cv and Tune sweeps use it
unchanged. The driver loads and splits the rows as the torch path does and fits the featurizer
(app/features.py) on the training rows only. Each Ray Train worker featurizes its shard of the training rows
in both A/B orders (weights 1 - train.swap_prob and train.swap_prob, 0.5 each with train.swap_mode=symmetric,
so the trees see every pair both ways) and the whole validation fold, then boosts with xgboost's collective,
which Ray Train's XGBoostConfig sets up: the histograms and the validation metrics are reduced over the
workers, so every worker grows the same trees and stops early at the same round. Every
classical.report_every_rounds rounds the workers report valid_log_loss (to Tune too); at the end rank 0 scores
the validation fold with `app.metrics.score` and reports the one checkpoint, cut at the best round:

    model.ubj        the booster (xgboost UBJSON), multi:softprob over A wins, B wins, tie
    featurizer.pkl   the fitted PairFeaturizer (pickled scikit-learn vectorizers; versions in arena.json)
    arena.json       format, kind, labels, metrics, train_priors, features, config, versions
                     (read by app.modeling.read_checkpoint_meta, like every checkpoint of this project)

`ClassicalPredictor` loads that folder and answers like app.inference.Predictor (logits, probabilities,
A/B-swap test-time augmentation).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import ray.data
import ray.train
import scipy.sparse as sp
import xgboost
from ray.train.xgboost import XGBoostConfig, XGBoostTrainer

from app import storage
from app.config import Config, ConfigError, config_to_dict, validate_config
from app.data import LABEL_COLUMNS
from app.features import PairFeaturizer
from app.formatting import SWAPPED_LABEL
from app.metrics import combine_views, score, softmax
from app.priors import class_frequencies
from app.tracking import Record, Tracker, config_params

if TYPE_CHECKING:
    from app.training import FitResult

KIND = "tfidf_xgb"
BOOSTER_FILE = "model.ubj"
FEATURIZER_FILE = "featurizer.pkl"
TEXT_COLUMNS = ("prompt", "response_a", "response_b")
MIN_ROWS_PER_WORKER = 10  # a worker with no rows would leave xgboost's collective waiting
SHARD_BATCH_ROWS = 1024


def classical_versions() -> dict[str, str]:
    """Versions of the libraries that fit and read a tfidf_xgb checkpoint (the pickle needs the same scikit-learn)."""
    versions = {"xgboost": xgboost.__version__}
    for name in ("scikit-learn", "scipy", "numpy", "ray", "arena-prefs"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def booster_params(config: Config) -> dict[str, Any]:
    """xgboost.train parameters from `config.classical`; mlogloss last, so early stopping watches it."""
    settings = config.classical
    return {
        "objective": "multi:softprob",
        "num_class": 3,
        "eval_metric": ["merror", "mlogloss"],
        "tree_method": "hist",
        "eta": settings.learning_rate,
        "max_depth": settings.max_depth,
        "min_child_weight": settings.min_child_weight,
        "subsample": settings.subsample,
        "colsample_bytree": settings.colsample_bytree,
        "max_bin": settings.max_bin,
        "nthread": settings.nthread or max(1, int(config.scaling.cpus_per_worker)),
        "seed": config.seed,
        "verbosity": 1,
    }


def training_matrix(featurizer: PairFeaturizer, rows: dict[str, list], swap_prob: float
                    ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Features, labels and weights of training rows in both A/B orders: the given order weighs
    1 - swap_prob and the swapped one swap_prob (a view of weight 0 is left out)."""
    features = featurizer.transform(*(rows[column] for column in TEXT_COLUMNS))
    labels = np.asarray(rows["label"], dtype=np.int64)
    views = [(features, labels, 1.0 - swap_prob),
             (featurizer.swap(features), np.asarray(SWAPPED_LABEL)[labels], swap_prob)]
    views = [view for view in views if view[2] > 0]
    return (sp.vstack([view[0] for view in views], format="csr"),
            np.concatenate([view[1] for view in views]),
            np.concatenate([np.full(len(view[1]), view[2], dtype=np.float32) for view in views]))


def read_shard(name: str) -> dict[str, list]:
    """This worker's rows of a Ray Train dataset: texts as lists of turns, labels as ints."""
    rows: dict[str, list] = {column: [] for column in (*TEXT_COLUMNS, "label")}
    for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=SHARD_BATCH_ROWS, batch_format="numpy"):
        for column in TEXT_COLUMNS:
            rows[column].extend(list(map(str, cell)) for cell in batch[column])
        rows["label"].extend(int(label) for label in batch["label"])
    return rows


class ReportRounds(xgboost.callback.TrainingCallback):
    """Keeps every boosting round's metrics under the torch path's names (valid_log_loss, ...) and reports
    every `every`-th round to Ray Train. Not every round: a report waits for the Train controller's next
    poll (2 s by default), far longer than a round."""

    def __init__(self, every: int, tracker: Tracker | None = None) -> None:
        super().__init__()
        self.every, self.tracker = every, tracker
        self.history: list[dict[str, float]] = []

    def after_iteration(self, model: xgboost.Booster, epoch: int, evals_log: dict) -> bool:
        metrics = {"epoch": epoch + 1,  # boosting rounds play the part of epochs in reports and summaries
                   "train_log_loss": float(evals_log["train"]["mlogloss"][-1]),
                   "valid_log_loss": float(evals_log["valid"]["mlogloss"][-1]),
                   "valid_accuracy": 1.0 - float(evals_log["valid"]["merror"][-1])}
        self.history.append(metrics)
        if self.tracker is not None:  # every round: a tracker only queues what it is given
            self.tracker.log(Record(epoch + 1, {"log_loss": metrics["train_log_loss"]}))
            self.tracker.log(Record(epoch + 1, {"log_loss": metrics["valid_log_loss"],
                                                "accuracy": metrics["valid_accuracy"]}, "eval"))
        if (epoch + 1) % self.every == 0:  # the same rounds on every worker: reports are collective
            ray.train.report(metrics)
        return False


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Boost on this worker's shard with xgboost's collective; returns the per-round metrics (`history`, rank 0's
    are kept) and how rank 0's trackers fared (`tracking`): train and validation log loss of every round."""
    config = validate_config(loop_config["config"], "worker config")
    rank = ray.train.get_context().get_world_rank()
    tracker = None
    if rank == 0:  # boosting is never resumed midway (fit_classical): a fresh tracker run from round 1
        tracker = Tracker(config.tracking, loop_config["run_dir"], first_step=0, params=config_params(config),
                          tags={"arena.model": KIND})
    try:
        history, kept = boost(loop_config, config, rank, tracker)
    except BaseException:
        if tracker is not None:
            tracker.close(failed=True)
        raise
    if tracker is None:
        return {"history": history, "tracking": {}}
    return {"history": history, "tracking": tracker.finish({
        "best_checkpoint": f"{loop_config['run_dir']}/{checkpoint_name(kept)}", "best_metrics": history[kept - 1],
        "history": history})}


def boost(loop_config: dict[str, Any], config: Config, rank: int,
          tracker: Tracker | None) -> tuple[list[dict[str, float]], int]:
    """Featurize this worker's shard, boost, and report the kept rounds' checkpoint; returns every round's metrics
    and the number of rounds kept."""
    featurizer: PairFeaturizer = loop_config["featurizer"]
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    # swap_mode=symmetric: both orders of every pair weigh the same
    swap_prob = 0.5 if config.train.swap_mode == "symmetric" else config.train.swap_prob
    train_x, train_y, train_w = training_matrix(featurizer, read_shard("train"), swap_prob)
    valid = read_shard("valid")  # the whole fold on every worker: reduced metrics count each row once per worker
    valid_x, valid_y = featurizer.transform(*(valid[column] for column in TEXT_COLUMNS)), np.asarray(valid["label"])
    dtrain = xgboost.DMatrix(train_x, label=train_y, weight=train_w)
    dvalid = xgboost.DMatrix(valid_x, label=valid_y)
    rounds = ReportRounds(config.classical.report_every_rounds, tracker)
    booster = xgboost.train(booster_params(config), dtrain, num_boost_round=config.classical.num_boost_round,
                            evals=[(dtrain, "train"), (dvalid, "valid")],
                            early_stopping_rounds=config.classical.early_stopping_rounds,
                            callbacks=[rounds], verbose_eval=False)
    kept = booster.best_iteration + 1 if config.classical.early_stopping_rounds else booster.num_boosted_rounds()
    booster = booster[:kept]
    valid_metrics = score(booster.predict(dvalid), valid_y)
    metrics = {**rounds.history[kept - 1],
               **{f"valid_{name}": value for name, value in valid_metrics.items()},
               "valid_rows": float(len(valid_y)), "train_rows": float(loop_config["train_rows"]),
               "rounds_run": float(len(rounds.history)),
               "train_seconds": time.perf_counter() - started}
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            write_checkpoint(directory, booster, featurizer, {**loop_config["meta"], "metrics": metrics},
                             loop_config["meta_file"])
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            print(f"boosting done: {kept} of {len(rounds.history)} rounds kept, "
                  + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(kept))
    return rounds.history, kept


def checkpoint_name(rounds: int) -> str:
    """The folder of the checkpoint that keeps the first `rounds` boosting rounds."""
    return f"round_{rounds:04d}"


def write_checkpoint(directory: str, booster: xgboost.Booster, featurizer: PairFeaturizer, meta: dict[str, Any],
                     meta_file: str) -> None:
    """The checkpoint folder: booster, pickled featurizer and the arena.json `meta`."""
    booster.save_model(os.path.join(directory, BOOSTER_FILE))
    with open(os.path.join(directory, FEATURIZER_FILE), "wb") as handle:
        pickle.dump(featurizer, handle, protocol=pickle.HIGHEST_PROTOCOL)
    with open(os.path.join(directory, meta_file), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)


def fit_classical(config: Config, callbacks: list | None = None) -> FitResult:
    """Train a tfidf_xgb model with Ray Train's XGBoostTrainer; returns app.training.FitResult.

    Boosting writes its one checkpoint at the end, so a run folder that has checkpoints holds a finished
    run: with run.resume it is returned as it is (from its summary.json), else refused. The run folder is a local
    path or a URI (`run.storage_path=s3://...`).
    """
    # app.training and app.modeling import torch; the workers import this module and need neither.
    from app.modeling import CHECKPOINT_FORMAT, CHECKPOINT_META
    from app.training import (
        CHECKPOINT_MANAGER_SNAPSHOT, FitResult, load_training_rows, run_directory, split_train_valid, summarize_run)

    run_dir = run_directory(config)
    if storage.exists(storage.join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT)):
        summary = finished_run_summary(config, run_dir, CHECKPOINT_META)
        return FitResult(run_dir, summary["best_checkpoint"], summary["best_metrics"], summary["history"],
                         summary["n_rejected"])
    frame, n_rejected = load_training_rows(config, run_dir)
    train_frame, valid_frame = split_train_valid(frame, config)
    if len(train_frame) // config.scaling.max_workers < MIN_ROWS_PER_WORKER:
        raise ValueError(f"{len(train_frame)} training rows give fewer than {MIN_ROWS_PER_WORKER} per worker with "
                         f"scaling.num_workers={config.scaling.max_workers}; use more rows or fewer workers")
    print(f"data: {len(train_frame)} training rows, {len(valid_frame)} validation rows "
          f"(fold {config.data.valid_fold} of {config.data.n_folds}, grouped by prompt)", flush=True)
    started = time.perf_counter()
    featurizer = PairFeaturizer(config.classical).fit(*(list(train_frame[column]) for column in TEXT_COLUMNS))
    blocks = {name: block.stop - block.start for name, block in featurizer.blocks.items()}
    print(f"features: {featurizer.n_features} columns {blocks}, fitted on the training rows in "
          f"{time.perf_counter() - started:.1f}s", flush=True)
    meta = {"format": CHECKPOINT_FORMAT, "kind": KIND, "adapter": config.adapter.method, "labels": list(LABEL_COLUMNS),
            "train_priors": class_frequencies(train_frame["label"].to_numpy()).tolist(), "features": blocks,
            "config": config_to_dict(config), "versions": classical_versions()}
    trainer = XGBoostTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(config), "featurizer": featurizer, "train_rows": len(train_frame),
                           "meta": meta, "meta_file": CHECKPOINT_META, "run_dir": run_dir},
        xgboost_config=XGBoostConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=config.scaling.max_workers, use_gpu=False,
                                               resources_per_worker={"CPU": config.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=run_dir.rsplit("/", 1)[0],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints,
                                                         checkpoint_score_attribute="valid_log_loss",
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": rows_dataset(train_frame), "valid": rows_dataset(valid_frame)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return summarize_run(trainer.fit(), run_dir, n_rejected)


def rows_dataset(frame: pd.DataFrame) -> ray.data.Dataset:
    """The columns the workers featurize, as a Ray Dataset."""
    return ray.data.from_pandas(frame[[*TEXT_COLUMNS, "label"]])


def finished_run_summary(config: Config, run_dir: str, meta_file: str) -> dict[str, Any]:
    """summary.json of a finished tfidf_xgb run in `run_dir`, or a ConfigError saying what to do."""
    summary_path = storage.join(run_dir, "summary.json")
    if not config.run.resume:
        raise ConfigError(f"run.name={config.run.name!r} already has checkpoints in {run_dir}; choose another "
                          "run.name, delete that folder, or set run.resume=true to reuse the finished run")
    if not storage.exists(summary_path):
        raise ConfigError(f"{run_dir} has checkpoints but no summary.json (the run stopped after boosting); "
                          "delete that folder or choose another run.name")
    summary = storage.read_json(summary_path)
    kind = storage.read_json(storage.join(summary["best_checkpoint"], meta_file)).get("kind")
    if kind != KIND:
        raise ConfigError(f"{run_dir} holds a model.kind={kind} run, not {KIND}; choose another run.name")
    print(f"run {config.run.name!r} is finished (boosting writes one checkpoint at its end): reusing "
          f"{summary['best_checkpoint']}", flush=True)
    return summary


class ClassicalPredictor:
    """A tfidf_xgb checkpoint loaded once; answers like app.inference.Predictor."""

    def __init__(self, checkpoint_dir: str, config: Config, meta: dict[str, Any], num_threads: int | None = None) -> None:
        if meta.get("kind") != KIND:
            raise ValueError(f"{checkpoint_dir} holds a model.kind={meta.get('kind')} checkpoint, not {KIND}")
        self.config, self.meta = config, meta
        with open(os.path.join(checkpoint_dir, FEATURIZER_FILE), "rb") as handle:
            self.featurizer: PairFeaturizer = pickle.load(handle)
        self.booster = xgboost.Booster()
        self.booster.load_model(os.path.join(checkpoint_dir, BOOSTER_FILE))
        if num_threads:
            self.booster.set_param({"nthread": num_threads})

    def _views(self, prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
               responses_b: Sequence[Sequence[str]], tta_swap: bool) -> list[np.ndarray]:
        """(N, 3) margins (class logits) of the rows, then of the rows with A and B exchanged if `tta_swap`."""
        features = self.featurizer.transform(prompts, responses_a, responses_b)
        matrices = [features, self.featurizer.swap(features)] if tta_swap else [features]
        return [np.asarray(self.booster.predict(xgboost.DMatrix(matrix), output_margin=True), dtype=np.float64)
                .reshape(-1, 3) for matrix in matrices]

    def predict_logits(self, prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
                       responses_b: Sequence[Sequence[str]], tta_swap: bool = False,
                       tta_combine: str = "logit") -> np.ndarray:
        """(N, 3) class logits; with `tta_swap`, both views merged by `app.metrics.combine_views` (A/B put back)."""
        views = self._views(prompts, responses_a, responses_b, tta_swap)
        if not tta_swap:
            return views[0]
        return combine_views(views[0], views[1][:, list(SWAPPED_LABEL)], tta_combine)

    def predict(self, prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
                responses_b: Sequence[Sequence[str]], tta_swap: bool = False,
                tta_combine: str = "logit") -> np.ndarray:
        """(N, 3) probabilities of A wins, B wins, tie: softmax of `predict_logits` (one TTA rule everywhere)."""
        return softmax(self.predict_logits(prompts, responses_a, responses_b, tta_swap, tta_combine))
