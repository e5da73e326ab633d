"""Batch prediction over a file with Ray Data: an actor pool of Predictors, submission.csv in input order."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import ray.data
import ray.train

from app.config import PredictConfig
from app.data import load_pairs, write_submission
from app.inference import Predictor
from app.metrics import score

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
    """Ray Data map_batches callable: one Predictor per actor, loaded once."""

    def __init__(self, checkpoint_dir: str, config: dict) -> None:
        predict = PredictConfig.model_validate(config)
        self.tta_swap = predict.tta_swap
        self.predictor = Predictor(checkpoint_dir, predict.tokens_per_batch, num_threads=max(1, int(predict.cpus_per_actor)),
                                   precision=predict.precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [list(map(list, batch[column])) for column in ("prompt", "response_a", "response_b")]
        probs = self.predictor.predict(*texts, tta_swap=self.tta_swap)
        return {"row": batch["row"], "probs": probs}


def predict_file(checkpoint: str, input_uri: str, output_uri: str, config: PredictConfig,
                 on_bad_rows: str = "error", rejects_path: str | None = None) -> PredictionReport:
    """Score every row of a Kaggle test (or train) file and write submission.csv in input id order."""
    started = time.perf_counter()
    table = load_pairs(input_uri, on_bad_rows=on_bad_rows, rejects_path=rejects_path)
    if table.n_rejected:
        print(f"predict: {table.n_rejected} bad rows are NOT in the submission; see {table.rejects_path}", flush=True)
    frame = table.frame.assign(row=np.arange(len(table.frame)))
    checkpoint_dir = local_checkpoint(checkpoint)
    dataset = ray.data.from_pandas(frame[["row", "prompt", "response_a", "response_b"]])
    dataset = dataset.map_batches(PredictBatch, fn_constructor_args=(checkpoint_dir, config.model_dump()),
                                  batch_size=ROWS_PER_TASK, concurrency=config.num_actors,
                                  num_cpus=config.cpus_per_actor)
    rows, parts = [], []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(batch["row"])
        parts.append(np.stack(batch["probs"]))
        print(f"predict: {sum(map(len, rows))}/{len(frame)} rows", flush=True)
    order = np.argsort(np.concatenate(rows))
    probs = np.concatenate(parts)[order]
    write_submission(list(frame["id"]), probs, output_uri)
    metrics = score(probs, frame["label"].to_numpy()) if table.has_labels else {}
    return PredictionReport(output_uri, len(frame), time.perf_counter() - started, metrics, table.n_rejected)
