"""Distillation students (`distill.teacher`, app/distillation.py), reported beside their teacher on the same rows.

A student is one run (`app.training.fit`, held-out fold `data.valid_fold`) or an out-of-fold member
(`app.crossval.run_cv`, every fold), so students of different teachers, temperatures or weights compare on
the same held-out rows as the teacher's own out-of-fold predictions of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from app.config import Config, ConfigError
from app.crossval import run_cv
from app.distillation import Teacher, TeacherError, load_teacher
from app.metrics import score
from app.training import fit, load_training_rows, split_train_valid


def train_student(config: Config, cross_validate: bool = False, folds: list[int] | None = None,
                  test_path: str | None = None) -> dict[str, Any]:
    """Train a student of `distill.teacher`; return its scores and the teacher's on the same held-out rows.

    Args:
        cross_validate: train a member folder on every fold (or `folds`) like jobs/cv.py, scoring `test_path`
            with each fold model; else one run validated on fold `data.valid_fold`.

    Raises:
        ConfigError: distill.teacher is not set.
        TeacherError: the teacher cannot be read or misses a training row (before any training starts).
    """
    if config.distill.teacher is None:
        raise ConfigError("a student needs a teacher: set distill.teacher=<member folder or ensemble .json>")
    teacher = load_teacher(config.distill.teacher)  # an unreadable teacher fails here, before Ray starts work
    if cross_validate:
        member = run_cv(config, folds, test_path)
        rows, where = member.oof, "out of fold"
        student = {"member": member.directory, "log_loss": member.meta["oof_log_loss"],
                   "accuracy": member.meta["oof_accuracy"]}
    else:
        result = fit(config)
        _, rows = split_train_valid(load_training_rows(config, result.run_dir)[0], config)
        where = f"validation fold {config.data.valid_fold}"
        student = {"best_checkpoint": result.best_checkpoint, "log_loss": result.best_metrics["valid_log_loss"],
                   "accuracy": result.best_metrics["valid_accuracy"]}
    return {"rows": f"{len(rows)} rows, {where}", "student": student,
            "teacher": {"source": teacher.source, **teacher_scores(teacher, rows)},
            "distill": config.distill.model_dump(mode="json")}


def teacher_scores(teacher: Teacher, rows: pd.DataFrame) -> dict[str, Any]:
    """The teacher's out-of-fold log loss and accuracy on labelled `rows`, or why there are none."""
    try:
        probs = teacher.probs_for(rows["id"].astype(str).tolist())
    except TeacherError as exc:
        return {"log_loss": None, "note": str(exc)}
    return score(probs, rows["label"].to_numpy(dtype=np.int64))
