"""Teacher-student distillation: a teacher's out-of-fold probabilities as soft labels, and the loss.

A teacher is an out-of-fold member folder (jobs/cv.py) or an ensemble spec (jobs/ensemble.py) that records
its members' folders, each a local path or a URI (s3://...): every training row then has a prediction from a model that did not train on that
row, so the soft labels carry what the teacher generalises rather than what it memorised. An ensemble's
out-of-fold probabilities combine its members' out-of-fold logits with the spec's weights, temperatures and
mode (`app.ensemble.combine`); its class-prior shift (`priors`) is a prediction-time adjustment to a test
file and is not applied (set `predict.priors` on the student instead).

The loss of a batch is

    alpha * T^2 * KL(softmax(log p_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE(z_student, label)

(Hinton et al., 2015): T^2 keeps the soft term's gradients the size of the hard term's as T grows.
numpy, pandas and torch only (files through app/storage.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from app import storage
from app.ensemble import EnsembleSpecError, combine, load_spec, member_group
from app.members import load_member, load_members
from app.metrics import softmax

TEACHER_COLUMNS = ("teacher_a", "teacher_b", "teacher_tie")  # a training frame's teacher probabilities


class TeacherError(ValueError):
    """A teacher cannot be read, or does not cover the training rows; the message says what to do."""


@dataclass(frozen=True)
class Teacher:
    """A teacher's out-of-fold class probabilities (A, B, tie), one row per training row it scored."""

    source: str
    ids: np.ndarray  # (N,) str row ids
    probs: np.ndarray  # (N, 3) float64
    labels: np.ndarray  # (N,) int64 true classes, as the member folders recorded them

    def probs_for(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids), 3) probabilities of the rows `ids`, in that order.

        Raises:
            TeacherError: naming the first id the teacher has no prediction for.
        """
        wanted = pd.Index([str(row_id) for row_id in ids])
        positions = pd.Index(self.ids).get_indexer(wanted)
        missing = np.flatnonzero(positions < 0)
        if len(missing):
            raise TeacherError(
                f"training row id={wanted[missing[0]]!r} has no prediction from the teacher {self.source} "
                f"({len(missing)} of {len(wanted)} training rows have none): the teacher must have scored every "
                "training row out of fold; train it with jobs/cv.py on the same data.train_path and data.max_rows")
        return self.probs[positions]


def load_teacher(path: str) -> Teacher:
    """Read a teacher: an out-of-fold member folder, or an ensemble spec .json that records member folders.

    Raises:
        TeacherError: the path is neither, the spec records no member folders, or the ids repeat.
    """
    if path.endswith(".json"):
        teacher = _ensemble_teacher(path)
    elif storage.is_dir(path):
        member = load_member(path)
        teacher = Teacher(path, member.oof["id"].astype(str).to_numpy(), softmax(member.oof_logits),
                          member.oof["label"].to_numpy(dtype=np.int64))
    else:
        raise TeacherError(f"distill.teacher={path!r} is neither a member folder (jobs/cv.py output) nor an "
                           "ensemble spec .json (jobs/ensemble.py output); check the path")
    duplicated = pd.Index(teacher.ids).duplicated()
    if duplicated.any():
        raise TeacherError(f"teacher {path} has several predictions for row id={teacher.ids[duplicated][0]!r}; "
                           "its oof.parquet must hold each training row once (rebuild it with jobs/cv.py)")
    return teacher


def _ensemble_teacher(path: str) -> Teacher:
    """An ensemble spec's out-of-fold probabilities: each member's out-of-fold logits (every row scored by the
    fold model that did not train on it) combined with the member's total weight and its temperature."""
    try:
        spec = load_spec(path)
    except EnsembleSpecError as exc:
        raise TeacherError(f"distill.teacher: {exc}") from None
    if spec.member_dirs is None:
        raise TeacherError(f"ensemble spec {path} does not record its members' out-of-fold folders (member_dirs); "
                           "rebuild it with `python -m jobs.ensemble --members ...`, or use one member folder")
    weights: dict[str, float] = {}
    temperatures: dict[str, set[float]] = {}
    for member in spec.members:
        group = member_group(member.name)
        weights[group] = weights.get(group, 0.0) + member.weight
        temperatures.setdefault(group, set()).add(member.temperature)
    uneven = sorted(group for group, values in temperatures.items() if len(values) > 1)
    if uneven:
        raise TeacherError(f"ensemble spec {path}: the fold models of member(s) {uneven} have different "
                           "temperatures, so their out-of-fold logits cannot be combined as one member")
    members, labels = load_members([spec.member_dirs[group] for group in weights])
    for group, member in zip(weights, members, strict=True):
        if member.name != group:
            raise TeacherError(f"ensemble spec {path} names {spec.member_dirs[group]} as the folder of member "
                               f"{group!r}, but that folder holds member {member.name!r}; rebuild the spec")
    probs = combine([member.oof_logits for member in members], list(weights.values()), spec.mode,
                    [next(iter(temperatures[group])) for group in weights])
    return Teacher(path, members[0].oof["id"].astype(str).to_numpy(), probs, labels.astype(np.int64))


def attach_teacher(frame: pd.DataFrame, teacher: Teacher) -> pd.DataFrame:
    """A copy of training rows `frame` with the teacher's probabilities of each row in `TEACHER_COLUMNS`.

    Raises:
        TeacherError: a row (named by id) that the teacher has no prediction for, or whose label the teacher
            recorded differently (it was trained on another file that reuses the ids).
    """
    ids = frame["id"].astype(str).tolist()
    probs = teacher.probs_for(ids)
    if "label" in frame:
        recorded = teacher.labels[pd.Index(teacher.ids).get_indexer(ids)]
        differs = np.flatnonzero(recorded != frame["label"].to_numpy())
        if len(differs):
            row = differs[0]
            raise TeacherError(f"training row id={ids[row]!r} has label {int(frame['label'].iloc[row])} but the "
                               f"teacher {teacher.source} recorded {int(recorded[row])} for it ({len(differs)} rows "
                               "differ): the teacher was trained on another file; use one trained on data.train_path")
    return frame.assign(**{column: probs[:, index].astype(np.float32) for index, column in enumerate(TEACHER_COLUMNS)})


def soft_label_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over the batch.

    Args:
        logits: (B, 3) student class logits.
        teacher_probs: (B, 3) teacher probabilities at temperature 1; softened as softmax(log p / T).
    """
    log_teacher = torch.log(teacher_probs.float().clamp_min(torch.finfo(torch.float32).tiny))  # (B, 3)
    soft_targets = torch.softmax(log_teacher / temperature, dim=-1)
    log_student = torch.log_softmax(logits.float() / temperature, dim=-1)
    return temperature**2 * torch.nn.functional.kl_div(log_student, soft_targets, reduction="batchmean")


def distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float,
    alpha: float,
    hard_loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * `soft_label_loss` + (1 - alpha) * the hard-label loss, averaged over the batch.

    Args:
        logits: (B, 3) student class logits; labels: (B,) classes; teacher_probs: (B, 3).
        hard_loss: the hard-label loss of these logits when it is not the 3-class cross-entropy (e.g.
            `app.families.class_loss` with model.lm_loss=vocab); default cross-entropy on `labels`.
    """
    if hard_loss is None:
        hard_loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    if alpha == 0:
        return hard_loss
    return alpha * soft_label_loss(logits, teacher_probs, temperature) + (1 - alpha) * hard_loss
