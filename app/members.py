"""Reading out-of-fold member folders (written by `app.crossval.run_cv`): pandas and app/storage.py only.

The folder format is documented in app/crossval.py. This module holds only the reading side, so that pure
consumers of members (ensembles, distillation teachers) need neither Ray nor the training code. A member folder
is a local path or a URI (s3://...), read through app/storage.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from app import storage

OOF_FORMAT = 1
LOGIT_COLUMNS = ("logit_a", "logit_b", "logit_tie")
MEMBER_FILE = "member.json"  # what makes a folder a member


def is_member_dir(directory: str) -> bool:
    return storage.exists(storage.join(directory, MEMBER_FILE))


@dataclass
class Member:
    """One member's out-of-fold (and test) logits, read back from its folder."""

    name: str
    directory: str
    oof: pd.DataFrame
    test: pd.DataFrame | None
    meta: dict

    @property
    def oof_logits(self) -> np.ndarray:
        return self.oof[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64)

    def checkpoints(self) -> list[str]:
        return [fold["checkpoint"] for fold in self.meta["folds"]]


def load_member(directory: str) -> Member:
    """Read a member folder written by `run_cv`."""
    meta_path = storage.join(directory, MEMBER_FILE)
    if not storage.exists(meta_path):
        raise FileNotFoundError(f"{directory} is not an out-of-fold member folder: it has no member.json "
                                "(write one with `python -m jobs.cv`)")
    meta = storage.read_json(meta_path)
    if meta.get("format") != OOF_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')}, this version reads format {OOF_FORMAT}")
    oof = storage.read_parquet(storage.join(directory, "oof.parquet"))
    test_path = storage.join(directory, "test.parquet")
    test = storage.read_parquet(test_path) if storage.exists(test_path) else None
    return Member(meta["member"], directory, oof, test, meta)


def load_members(directories: list[str]) -> tuple[list[Member], np.ndarray]:
    """Members aligned on the same rows (sorted by id) and the labels; raises if their rows or folds differ."""
    members = [load_member(directory) for directory in directories]
    for member in members:
        member.oof = member.oof.sort_values("id", kind="stable").reset_index(drop=True)
    first = members[0].oof
    for member in members[1:]:
        if not (member.oof["id"].equals(first["id"]) and member.oof["fold"].equals(first["fold"])):
            raise ValueError(f"members {members[0].name} and {member.name} were not scored on the same rows and "
                             "folds: train them with the same data.train_path, data.n_folds and seed")
    return members, first["label"].to_numpy()
