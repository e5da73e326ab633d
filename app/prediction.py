"""Batch prediction over a file with Ray Data: an actor pool of Predictors, submission.csv in input order."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import ray.data
import ray.train

from app.config import PredictConfig
from app.data import load_pairs, write_submission
from app.ensemble import EnsembleSpec, apply_spec_to_member_logits, finish_probabilities, load_spec
from app.inference import load_predictor
from app.metrics import score
from app.modeling import read_checkpoint_meta

ROWS_PER_TASK = 512  # rows handed to an actor at once; each actor sorts them by length


@dataclass
class PredictionReport:
    """What a prediction run wrote and, when the input had labels, how good it was."""

    output: str
    rows: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    n_rejected: int = 0


def local_checkpoint(checkpoint: str) -> str:
    """A local folder for a checkpoint path or URI (s3://, gs://, ... are downloaded once)."""
    if "://" not in checkpoint:
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"checkpoint folder not found: {checkpoint}")
        return checkpoint
    return ray.train.Checkpoint(checkpoint).to_directory()


class PredictBatch:
    """Ray Data map_batches callable: one Predictor per actor, loaded once; yields probabilities or logits."""

    def __init__(self, checkpoint_dir: str, config: dict, output: Literal["probs", "logits"] = "probs") -> None:
        predict = PredictConfig.model_validate(config)
        self.tta_swap, self.tta_combine, self.output = predict.tta_swap, predict.tta_combine, output
        self.predictor = load_predictor(checkpoint_dir, predict.tokens_per_batch, num_threads=max(1, int(predict.cpus_per_actor)),
                                        precision=predict.precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [list(map(list, batch[column])) for column in ("prompt", "response_a", "response_b")]
        score = self.predictor.predict_logits if self.output == "logits" else self.predictor.predict
        return {"row": batch["row"], "values": score(*texts, tta_swap=self.tta_swap, tta_combine=self.tta_combine)}


def score_rows(checkpoint: str, frame: pd.DataFrame, config: PredictConfig,
               output: Literal["probs", "logits"] = "probs") -> np.ndarray:
    """(N, 3) probabilities or logits of a frame of rows (prompt, response_a, response_b), in frame order,
    computed by an actor pool of Predictors over Ray Data."""
    checkpoint_dir = local_checkpoint(checkpoint)
    frame = frame.assign(row=np.arange(len(frame)))
    dataset = ray.data.from_pandas(frame[["row", "prompt", "response_a", "response_b"]])
    dataset = dataset.map_batches(PredictBatch, fn_constructor_args=(checkpoint_dir, config.model_dump(), output),
                                  batch_size=ROWS_PER_TASK, concurrency=config.num_actors,
                                  num_cpus=config.cpus_per_actor)
    rows, parts = [], []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(batch["row"])
        parts.append(np.stack(batch["values"]))
        print(f"predict: {sum(map(len, rows))}/{len(frame)} rows", flush=True)
    return np.concatenate(parts)[np.argsort(np.concatenate(rows))]


def predict_with_spec(spec: EnsembleSpec, frame: pd.DataFrame, config: PredictConfig) -> np.ndarray:
    """(N, 3) ensemble probabilities: every member's logits, combined by the spec (weights, temperatures,
    mode, class priors) through `apply_spec_to_member_logits`, the function the Serve app uses too."""
    member_logits = {member.name: score_rows(member.checkpoint, frame, config, output="logits")
                     for member in spec.members}
    return apply_spec_to_member_logits(spec, member_logits)


def needs_train_priors(priors, smoothing: float | None) -> bool:
    """Whether finishing probabilities needs the class shares the model was trained on: a prior shift divides
    them out, and smoothing goes toward them."""
    return priors is not None or bool(smoothing)


def with_predict_options(spec: EnsembleSpec, config: PredictConfig) -> EnsembleSpec:
    """The spec with the test-time settings of `predict` (priors, train_priors, temperature, smoothing) in place
    of its own, where they are set; the spec itself when none is."""
    update: dict = {key: getattr(config, key) for key in ("temperature", "smoothing") if getattr(config, key) is not None}
    if config.priors is not None:
        update["priors"] = config.priors
    train_priors = config.train_priors or spec.train_priors
    if train_priors is None and needs_train_priors(update.get("priors", spec.priors), config.smoothing):
        raise ValueError("predict.priors / predict.smoothing need the class shares the members were trained on: the "
                         "spec has no train_priors; set predict.train_priors=[pA,pB,pTie]")
    if not update:
        return spec
    if train_priors is not None:
        update["train_priors"] = tuple(train_priors)
    return EnsembleSpec.model_validate({**spec.model_dump(), **update})


def finish_checkpoint_probabilities(probs: np.ndarray, checkpoint_dir: str, config: PredictConfig) -> np.ndarray:
    """`predict.temperature`, `predict.priors` and `predict.smoothing` applied to one checkpoint's probabilities
    (`app.ensemble.finish_probabilities`), from the class shares it was trained on (`predict.train_priors`, else
    its arena.json's `train_priors`)."""
    if config.priors is None and not config.smoothing and config.temperature in (None, 1.0):
        return probs
    train_priors = config.train_priors or read_checkpoint_meta(checkpoint_dir)[0].get("train_priors")
    if train_priors is None and needs_train_priors(config.priors, config.smoothing):
        raise ValueError(f"predict.priors / predict.smoothing need the class shares {checkpoint_dir} was trained on, "
                         "and its arena.json has none (it predates them); set predict.train_priors=[pA,pB,pTie]")
    return finish_probabilities(probs, config.temperature or 1.0, config.priors, train_priors, config.smoothing or 0.0)


def is_spec_path(path: str) -> bool:
    """An ensemble spec is a .json file; a checkpoint is a folder."""
    return path.endswith(".json")


def predict_file(checkpoint: str, input_uri: str, output_uri: str, config: PredictConfig,
                 on_bad_rows: str = "error", rejects_path: str | None = None) -> PredictionReport:
    """Score every row of a Kaggle test (or train) file and write submission.csv in input id order.

    `checkpoint` is a checkpoint folder (or URI), or an ensemble spec (.json, written by jobs/ensemble.py).
    """
    started = time.perf_counter()
    table = load_pairs(input_uri, on_bad_rows=on_bad_rows, rejects_path=rejects_path)
    if table.n_rejected:
        print(f"predict: {table.n_rejected} bad rows are NOT in the submission; see {table.rejects_path}", flush=True)
    if is_spec_path(checkpoint):
        probs = predict_with_spec(with_predict_options(load_spec(checkpoint), config), table.frame, config)
    else:
        probs = finish_checkpoint_probabilities(score_rows(checkpoint, table.frame, config),
                                                local_checkpoint(checkpoint), config)
    write_submission(list(table.frame["id"]), probs, output_uri)
    metrics = score(probs, table.frame["label"].to_numpy()) if table.has_labels else {}
    return PredictionReport(output_uri, len(table.frame), time.perf_counter() - started, metrics, table.n_rejected)
