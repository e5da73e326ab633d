"""K-fold training of one ensemble member and its out-of-fold logits, in the one format later steps read.

A member folder (`<run.storage_path>/<run.name>/`) holds:

    member.json   {"format": 1, "member": name, "folds": [{"fold", "checkpoint", "valid_log_loss",
                   "valid_accuracy", "rows", "train_seconds", "predict_seconds"}], "oof_log_loss",
                   "oof_accuracy", "tta_swap", "train_seconds", "predict_seconds_per_1000_rows",
                   "prior_calibration", "config"}
                  (the timing and calibration keys may be absent in older folders, or null where unknown;
                  prior_calibration is `app.calibration.fit_prior_calibration` on the out-of-fold logits, and
                  each fold checkpoint's arena.json gets the one fitted on its own validation fold,
                  which `predict.priors=calibrated_em` applies)
    oof.parquet   one row per training row: id (str), fold (int), label (int), logit_a, logit_b, logit_tie,
                  scored by the fold model that did not train on it
    test.parquet  (with a test file) every fold model on every test row: id, fold, logit_a, logit_b, logit_tie

Logits are natural-log class scores (softmax gives probabilities); with `predict.tta_swap` they are the mean
of both A/B views' log-probabilities (`predict.tta_combine=prob`: the log of their mean probabilities).
Folds are the prompt-grouped split of app/data.py (`data.n_folds`, `seed`), so members trained with the same data settings share folds row for row, which calibration and
ensemble fitting (app/calibration.py, app/ensemble.py) rely on; `load_members` checks it. Reading a
member folder (`load_member`, `load_members`) lives in app/members.py, which needs no Ray. Member folders,
fold runs and checkpoints are local paths or URIs (s3://...): every file goes through app/storage.py.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Literal

import numpy as np
import pandas as pd

from app import storage
from app.calibration import (
    PriorCalibration, expected_calibration_error, fit_calibration, fit_prior_calibration, reliability_diagram)
from app.config import Config, apply_overrides, config_to_dict, validate_config
from app.data import load_pairs
from app.ensemble import EnsembleMember, EnsembleSpec, apply_spec_to_member_logits, combine, fit_ensemble, save_spec
from app.members import LOGIT_COLUMNS, OOF_FORMAT, Member, load_member, load_members
from app.metrics import score, softmax
from app.modeling import CHECKPOINT_META, library_versions
from app.prediction import score_rows
from app.training import fit, load_training_rows, run_directory, split_train_valid


def run_cv(config: Config, folds: list[int] | None = None, test_path: str | None = None,
           member_dir: str | None = None) -> Member:
    """Train `config` once per fold (run names `<run.name>-fold<k>`), score each held-out fold and the test
    file, and write the member folder (default `<run.storage_path>/<run.name>`; another folder scores the
    same fold runs with other `predict` settings). Returns the member as read back."""
    member_dir = member_dir or run_directory(config)
    folds = list(range(config.data.n_folds)) if folds is None else folds
    test_frame = load_pairs(test_path, require_labels=False).frame if test_path else None
    oof_parts, test_parts, fold_meta = [], [], []
    for fold in folds:
        fold_config = validate_config(apply_overrides(config_to_dict(config), {
            "data.valid_fold": fold, "run.name": f"{config.run.name}-fold{fold}",
            # the folds' tracker runs are grouped under the member (an MLflow parent run, a W&B group)
            "tracking.run_group": config.tracking.run_group or config.run.name}), f"fold {fold} config")
        finished_before = storage.exists(storage.join(run_directory(fold_config), "summary.json"))
        started = time.perf_counter()
        result = fit(fold_config)
        train_seconds = record_train_seconds(result.run_dir, time.perf_counter() - started, finished_before)
        frame, _ = load_training_rows(fold_config, result.run_dir)
        _, valid = split_train_valid(frame, fold_config)
        started = time.perf_counter()
        logits = score_rows(result.best_checkpoint, valid, config.predict, output="logits")
        predict_seconds = time.perf_counter() - started
        oof_parts.append(_logit_frame(valid["id"], fold, logits).assign(label=valid["label"].to_numpy()))
        store_prior_calibration(result.best_checkpoint,
                                fit_member_calibration(logits, valid["label"].to_numpy(), f"fold {fold}"))
        fold_meta.append({"fold": fold, "checkpoint": result.best_checkpoint, "rows": len(valid),
                          "train_seconds": train_seconds, "predict_seconds": predict_seconds,
                          **{f"valid_{k}": v for k, v in score(softmax(logits), valid["label"].to_numpy()).items()}})
        if test_frame is not None:
            test_parts.append(_logit_frame(test_frame["id"], fold, score_rows(result.best_checkpoint, test_frame,
                                                                                config.predict, output="logits")))
        print(f"cv: fold {fold}: valid log loss {fold_meta[-1]['valid_log_loss']:.4f}", flush=True)
    oof = pd.concat(oof_parts, ignore_index=True)
    oof_metrics = score(softmax(oof[list(LOGIT_COLUMNS)].to_numpy()), oof["label"].to_numpy())
    meta = {"format": OOF_FORMAT, "member": config.run.name, "folds": fold_meta,
            "oof_log_loss": oof_metrics["log_loss"], "oof_accuracy": oof_metrics["accuracy"],
            "tta_swap": config.predict.tta_swap, **timing_summary(fold_meta),
            "prior_calibration": _dump(fit_member_calibration(oof[list(LOGIT_COLUMNS)].to_numpy(),
                                                              oof["label"].to_numpy(), "out-of-fold rows")),
            "config": config_to_dict(config)}
    storage.write_parquet(storage.join(member_dir, "oof.parquet"), oof)
    if test_parts:
        storage.write_parquet(storage.join(member_dir, "test.parquet"), pd.concat(test_parts, ignore_index=True))
    storage.write_json(storage.join(member_dir, "member.json"), meta)
    return load_member(member_dir)


def fit_member_calibration(logits: np.ndarray, labels: np.ndarray, rows: str) -> PriorCalibration | None:
    """`fit_prior_calibration` on held-out logits, or None (said so) where they cannot be calibrated (too few
    rows, or logits without signal): CV goes on, and calibrated_em then refuses the checkpoint by name."""
    try:
        return fit_prior_calibration(logits, labels)
    except ValueError as exc:
        print(f"cv: {rows}: no prior calibration stored ({exc})", flush=True)
        return None


def _dump(calibration: PriorCalibration | None) -> dict | None:
    return None if calibration is None else calibration.model_dump(mode="json")


def store_prior_calibration(checkpoint: str, calibration: PriorCalibration | None) -> None:
    """Add `prior_calibration` to a checkpoint's arena.json (a local folder or a URI), rewritten whole."""
    if calibration is None:
        return
    path = storage.join(checkpoint, CHECKPOINT_META)
    storage.write_json(path, {**storage.read_json(path), "prior_calibration": _dump(calibration)})


def record_train_seconds(run_dir: str, seconds: float, finished_before: bool) -> float | None:
    """The wall time of the `fit` call that trained a fold run (Ray start-up, data encoding, training and
    evaluation), kept in <run_dir>/timing.json: a run that had finished before this call is only read back
    (None if it predates timing.json); a resumed, unfinished run counts its last call only."""
    path = storage.join(run_dir, "timing.json")
    if finished_before:
        return float(storage.read_json(path)["train_seconds"]) if storage.exists(path) else None
    storage.write_json(path, {"train_seconds": seconds})
    return seconds


def timing_summary(fold_meta: list[dict]) -> dict[str, float | None]:
    """A member's training seconds over its folds (None if a fold's is unknown) and its out-of-fold scoring
    seconds per 1,000 rows (actor start-up and model loading included, as a user of predict pays them)."""
    train = [fold.get("train_seconds") for fold in fold_meta]
    rows = sum(fold["rows"] for fold in fold_meta)
    predict = sum(fold.get("predict_seconds") or 0.0 for fold in fold_meta)
    return {"train_seconds": None if None in train else float(sum(train)),
            "predict_seconds_per_1000_rows": 1000.0 * predict / rows if rows else None}


def _logit_frame(ids: pd.Series, fold: int, logits: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(logits, columns=list(LOGIT_COLUMNS))
    frame.insert(0, "fold", fold)
    frame.insert(0, "id", ids.astype(str).to_numpy())
    return frame


def build_ensemble(directories: list[str], out_dir: str, mode: Literal["prob", "logit"] = "prob",
                   priors: Literal["em"] | list[float] | None = None) -> tuple[EnsembleSpec, pd.DataFrame]:
    """Calibrate each member on its out-of-fold logits, fit simplex weights, and write the ensemble.

    Writes to `out_dir`: ensemble.json (the spec predict and Serve load), calibration.csv (each member's
    out-of-fold log loss and ECE before / after its temperature, and the ensemble's) and one reliability
    diagram PNG per member. In the spec a member's K fold models stand in for it with weight w/K each and
    its temperature, so test rows are scored by every fold model, as Kaggle ensembles do; each fold model's
    reported log loss is its member's out-of-fold one.
    """
    members, labels = load_members(directories)
    rows = []
    for member in members:
        report = fit_calibration(member.oof_logits, labels)
        write_reliability_diagram(softmax(member.oof_logits), report.apply(member.oof_logits), labels,
                                  storage.join(out_dir, f"reliability_{member.name}.png"))
        rows.append({"member": member.name, "rows": report.n_rows, "temperature": report.temperature,
                     "log_loss_before": report.log_loss_before, "log_loss_after": report.log_loss_after,
                     "ece_before": report.ece_before, "ece_after": report.ece_after})
    fitted = fit_ensemble({m.name: m.oof_logits for m in members}, {m.name: m.directory for m in members},
                          labels, mode, priors=priors, versions=library_versions())
    ensemble_probs = combine([m.oof_logits for m in members], [m.weight for m in fitted.members], mode,
                             [m.temperature for m in fitted.members])
    rows.append({"member": f"ensemble ({mode} averaging)", "rows": len(labels), "temperature": None,
                 "log_loss_before": None, "log_loss_after": fitted.report.ensemble_log_loss,
                 "ece_before": None, "ece_after": expected_calibration_error(ensemble_probs, labels)})
    table = pd.DataFrame(rows).assign(weight=[m.weight for m in fitted.members] + [1.0])
    fold_members, fold_losses = [], {}
    for member, fitted_member in zip(members, fitted.members, strict=True):
        checkpoints = member.checkpoints()
        for fold, checkpoint in zip(member.meta["folds"], checkpoints, strict=True):
            name = f"{member.name}/fold{fold['fold']}"
            fold_members.append(EnsembleMember(name=name, checkpoint=checkpoint,
                                               weight=fitted_member.weight / len(checkpoints),
                                               temperature=fitted_member.temperature))
            fold_losses[name] = fitted.report.member_log_loss[member.name]
    spec = fitted.model_copy(update={
        "members": tuple(fold_members), "member_dirs": {member.name: member.directory for member in members},
        "report": fitted.report.model_copy(update={"member_log_loss": fold_losses})})
    spec = EnsembleSpec.model_validate(spec.model_dump())  # re-check the expanded spec (weights still sum to 1)
    save_spec(spec, storage.join(out_dir, "ensemble.json"))
    storage.write_csv(storage.join(out_dir, "calibration.csv"), table)
    return spec, table


def write_reliability_diagram(probs_before: np.ndarray, probs_after: np.ndarray, labels: np.ndarray,
                              path: str) -> None:
    """`app.calibration.reliability_diagram` to `path`, a local file or a URI (drawn in a scratch folder)."""
    with tempfile.TemporaryDirectory() as scratch:
        drawn = reliability_diagram(probs_before, probs_after, labels, os.path.join(scratch, "reliability.png"))
        storage.write_bytes(path, drawn.read_bytes())


def fold_test_logits(member: Member, ids: pd.Series) -> dict[int, np.ndarray]:
    """Each fold model's (N, 3) test logits in the order of `ids`; raises if the member did not score them."""
    if member.test is None:
        raise ValueError(f"member {member.name} has no test.parquet: run jobs/cv.py with --test <that file>")
    logits = {}
    for fold, rows in member.test.groupby("fold"):
        indexed = rows.set_index("id")
        missing = ~ids.isin(indexed.index)
        if missing.any():
            raise ValueError(f"member {member.name}, fold {fold}: no test logits for id {ids[missing].iloc[0]!r} "
                             f"({int(missing.sum())} ids missing); it scored another test file")
        logits[int(fold)] = indexed.loc[ids, list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64)
    return logits


def score_spec_on_holdout(spec: EnsembleSpec, members: list[Member], holdout: pd.DataFrame) -> pd.DataFrame:
    """Log loss and accuracy on a labelled holdout that every member's fold models scored (jobs/cv.py --test):
    each member as its fold models' mean probabilities, before and after its temperature, and the ensemble
    through `apply_spec_to_member_logits`, the function predict uses, without scoring the rows again; and the
    constant prediction of the training class shares."""
    labels = holdout["label"].to_numpy()
    temperatures = {m.name.split("/")[0]: m.temperature for m in spec.members}
    member_logits, rows = {}, []
    if spec.train_priors is not None:  # the baseline every model must beat
        rows.append({"predictor": "class shares of the training rows",
                     **score(np.tile(spec.train_priors, (len(labels), 1)), labels)})
    for member in members:
        folds = fold_test_logits(member, holdout["id"])
        member_logits.update({f"{member.name}/fold{fold}": logits for fold, logits in folds.items()})
        weights = [1 / len(folds)] * len(folds)
        for label, temperature in (("", 1.0), (" (temperature)", temperatures[member.name])):
            probs = combine(list(folds.values()), weights, "prob", [temperature] * len(folds))
            rows.append({"predictor": f"{member.name}{label}, mean of {len(folds)} fold models",
                         **score(probs, labels)})
    rows.append({"predictor": f"ensemble spec ({spec.mode} averaging{', priors ' + str(spec.priors) if spec.priors else ''})",
                 **score(apply_spec_to_member_logits(spec, member_logits), labels)})
    return pd.DataFrame(rows).rename(columns={"log_loss": "holdout_log_loss", "accuracy": "holdout_accuracy"})
