"""Batch prediction over a file with Ray Data: an actor pool of Predictors, submission.csv in input order."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.fs
import ray.data

from app import storage
from app.calibration import PriorCalibration
from app.config import PredictConfig
from app.engine import DEEPSPEED_TAG, TORCH_STATE_FILE
from app.loop import PROGRESS_FILE
from app.data import load_pairs, write_submission
from app.ensemble import EnsembleSpec, apply_spec, finish_with_record, load_spec
from app.inference import load_predictor
from app.metrics import score
from app.modeling import CHECKPOINT_META, read_checkpoint_meta
from app.priors import EMSettings, PriorShift

ROWS_PER_TASK = 512  # rows handed to an actor at once; each actor sorts them by length


@dataclass
class PredictionReport:
    """What a prediction run wrote and, when the input had labels, how good it was."""

    output: str
    rows: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    n_rejected: int = 0
    prior_shift: PriorShift | None = None  # what predict.priors did (None without a prior shift)
    record: str | None = None  # the run record written beside the output (with a prior shift)


def local_checkpoint(checkpoint: str) -> str:
    """A local folder for a checkpoint path or URI. A URI (s3://, gs://, ...) is downloaded once per node, into a
    cache in the node's temporary folder that the node's actors and replicas share, without the training state
    (optimizer, DeepSpeed partitions, progress) that prediction does not read. The cache is keyed by the URI and
    its arena.json's modification time, so a checkpoint written again under the same URI is fetched again."""
    if not storage.is_uri(checkpoint):
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"checkpoint folder not found: {checkpoint}")
        return checkpoint
    filesystem, path = storage.resolve(checkpoint)
    meta = filesystem.get_file_info(storage.join(path, CHECKPOINT_META))
    if meta.type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint that predicts: it has no {CHECKPOINT_META} (only "
                                "the end of an epoch exports the model; the run's summary.json names its best one)")
    key = hashlib.sha256(f"{checkpoint.rstrip('/')}@{meta.mtime_ns}".encode()).hexdigest()[:20]
    cache = os.path.join(tempfile.gettempdir(), "arena-checkpoints", key)
    if os.path.isdir(cache):
        return cache
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    partial = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(cache))
    try:
        storage.download_dir(checkpoint, partial, skip=is_training_state)
        os.rename(partial, cache)  # atomic: another process sees all of it or none
    except OSError:
        if not os.path.isdir(cache):  # not another process's download that finished first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return cache


def is_training_state(relative: str) -> bool:
    """A checkpoint file that only resuming a run reads (app/loop.py, app/engine.py), not prediction."""
    top = relative.split("/", 1)[0]
    return top in (TORCH_STATE_FILE, DEEPSPEED_TAG) or top.startswith(PROGRESS_FILE.split("{", 1)[0])


class PredictBatch:
    """Ray Data map_batches callable: one Predictor per actor, loaded once; yields probabilities or logits."""

    def __init__(self, checkpoint: str, config: dict, output: Literal["probs", "logits"] = "probs") -> None:
        predict = PredictConfig.model_validate(config)
        self.tta_swap, self.tta_combine, self.output = predict.tta_swap, predict.tta_combine, output
        # On the actor's node: a URI is fetched there (the driver's copy would be on another machine).
        self.predictor = load_predictor(local_checkpoint(checkpoint), predict.tokens_per_batch, num_threads=max(1, int(predict.cpus_per_actor)),
                                        precision=predict.precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [list(map(list, batch[column])) for column in ("prompt", "response_a", "response_b")]
        score = self.predictor.predict_logits if self.output == "logits" else self.predictor.predict
        return {"row": batch["row"], "values": score(*texts, tta_swap=self.tta_swap, tta_combine=self.tta_combine)}


def score_rows(checkpoint: str, frame: pd.DataFrame, config: PredictConfig,
               output: Literal["probs", "logits"] = "probs") -> np.ndarray:
    """(N, 3) probabilities or logits of a frame of rows (prompt, response_a, response_b), in frame order,
    computed by an actor pool of Predictors over Ray Data, on whichever nodes Ray places them: `checkpoint` is a URI
    every node reads, or a local folder on a shared disk."""
    frame = frame.assign(row=np.arange(len(frame)))
    dataset = ray.data.from_pandas(frame[["row", "prompt", "response_a", "response_b"]])
    dataset = dataset.map_batches(PredictBatch, fn_constructor_args=(checkpoint, config.model_dump(), output),
                                  batch_size=ROWS_PER_TASK, concurrency=config.num_actors,
                                  num_cpus=config.cpus_per_actor)
    rows, parts = [], []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(batch["row"])
        parts.append(np.stack(batch["values"]))
        print(f"predict: {sum(map(len, rows))}/{len(frame)} rows", flush=True)
    return np.concatenate(parts)[np.argsort(np.concatenate(rows))]


def predict_with_spec(spec: EnsembleSpec, frame: pd.DataFrame, config: PredictConfig
                      ) -> tuple[np.ndarray, PriorShift | None]:
    """(N, 3) ensemble probabilities and the record of their class-prior shift: every member's logits, combined
    by the spec (weights, temperatures, mode, class priors) through `app.ensemble.apply_spec`, the function
    the Serve app uses too."""
    member_logits = {member.name: score_rows(member.checkpoint, frame, config, output="logits")
                     for member in spec.members}
    return apply_spec(spec, member_logits)


def needs_train_priors(priors, smoothing: float | None) -> bool:
    """Whether finishing probabilities needs the class shares the model was trained on: a prior shift divides
    them out, and smoothing goes toward them."""
    return priors is not None or bool(smoothing)


EM_KEYS = ("max_iter", "tol", "tie_ab", "safeguard_resamples", "safeguard_alpha", "min_shift")  # predict.em_<key>


def em_settings(config: PredictConfig, base: EMSettings = EMSettings()) -> EMSettings:
    """`base` with the `predict.em_*` settings that are set in place of its own."""
    update = {key: getattr(config, f"em_{key}") for key in EM_KEYS if getattr(config, f"em_{key}") is not None}
    return EMSettings.model_validate({**base.model_dump(), **update}) if update else base


def with_predict_options(spec: EnsembleSpec, config: PredictConfig) -> EnsembleSpec:
    """The spec with the test-time settings of `predict` (priors, train_priors, temperature, smoothing, em_*) in
    place of its own, where they are set; the spec itself when none is."""
    update: dict = {key: getattr(config, key) for key in ("temperature", "smoothing") if getattr(config, key) is not None}
    if config.priors is not None:
        update["priors"] = config.priors
    if em_settings(config, spec.em) != spec.em:
        update["em"] = em_settings(config, spec.em)
    train_priors = config.train_priors or spec.train_priors
    if train_priors is None and needs_train_priors(update.get("priors", spec.priors), config.smoothing):
        raise ValueError("predict.priors / predict.smoothing need the class shares the members were trained on: the "
                         "spec has no train_priors; set predict.train_priors=[pA,pB,pTie]")
    if not update:
        return spec
    if train_priors is not None:
        update["train_priors"] = tuple(train_priors)
    return EnsembleSpec.model_validate({**spec.model_dump(), **update})


def finish_checkpoint_probabilities(probs: np.ndarray, checkpoint_dir: str, config: PredictConfig
                                    ) -> tuple[np.ndarray, PriorShift | None]:
    """`predict.temperature`, `predict.priors` and `predict.smoothing` applied to one checkpoint's probabilities
    (`app.ensemble.finish_with_record`), from the class shares it was trained on (`predict.train_priors`, else
    its arena.json's `train_priors`) and, for calibrated_em, the calibration its arena.json stores (jobs.cv
    writes it); returns them with the record of the prior shift."""
    if config.priors is None and not config.smoothing and config.temperature in (None, 1.0):
        return probs, None
    meta = read_checkpoint_meta(checkpoint_dir)[0]
    train_priors = config.train_priors or meta.get("train_priors")
    if train_priors is None and needs_train_priors(config.priors, config.smoothing):
        raise ValueError(f"predict.priors / predict.smoothing need the class shares {checkpoint_dir} was trained on, "
                         "and its arena.json has none (it predates them); set predict.train_priors=[pA,pB,pTie]")
    calibration = meta.get("prior_calibration")
    if config.priors == "calibrated_em" and calibration is None:
        raise ValueError(f"predict.priors=calibrated_em needs a calibration fitted on held-out logits, and "
                         f"{checkpoint_dir}/arena.json has none: use a fold checkpoint of `python -m jobs.cv` (it "
                         "stores one) or an ensemble spec from `python -m jobs.ensemble`")
    return finish_with_record(probs, config.temperature or 1.0, config.priors, train_priors, config.smoothing or 0.0,
                              None if calibration is None else PriorCalibration.model_validate(calibration),
                              em_settings(config))


def record_path(output_uri: str) -> str:
    """Where a prediction's run record goes: beside the output, `submission.csv` -> `submission.record.json`."""
    return os.path.splitext(output_uri)[0] + ".record.json"


def write_run_record(output_uri: str, record: dict) -> str:
    """Write a run record as JSON beside the output (a local path or a URI); returns its path."""
    path = record_path(output_uri)
    storage.write_json(path, record)
    return path


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
    spec = None
    if is_spec_path(checkpoint):
        spec = with_predict_options(load_spec(checkpoint), config)
        probs, prior_shift = predict_with_spec(spec, table.frame, config)
    else:
        probs, prior_shift = finish_checkpoint_probabilities(score_rows(checkpoint, table.frame, config),
                                                             local_checkpoint(checkpoint), config)
    write_submission(list(table.frame["id"]), probs, output_uri)
    metrics = score(probs, table.frame["label"].to_numpy()) if table.has_labels else {}
    report = PredictionReport(output_uri, len(table.frame), time.perf_counter() - started, metrics, table.n_rejected,
                              prior_shift)
    if prior_shift is not None:  # the record of the run: the spec (or checkpoint settings) as applied, and what
        report.record = write_run_record(output_uri, {  # the prior shift did
            "model": checkpoint, "input": input_uri, "output": output_uri, "rows": report.rows, "metrics": metrics,
            "spec": None if spec is None else spec.model_dump(mode="json"),
            "predict": config.model_dump(mode="json"), "prior_shift": prior_shift.model_dump(mode="json")})
    return report
