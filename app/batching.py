"""Batches that waste little compute on padding (length grouping, token budgets, dynamic padding), and the
micro-batches of a training window in their A/B orders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.formatting import SWAPPED_LABEL


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, group_batches: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split row indices (in their given, already shuffled order) into batches of similar lengths.

    Consecutive windows of `group_batches * batch_size` rows are sorted by length and cut into batches,
    and the batches are then shuffled, so the order stays random while padding stays small (the
    "megabatch" scheme). Every row appears exactly once; the batch count is ceil(N / batch_size) per
    window, so workers with equal row counts take equal numbers of steps.
    """
    lengths = np.asarray(lengths)
    window = batch_size * group_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(lengths), window):
        indices = np.arange(start, min(start + window, len(lengths)))
        indices = indices[np.argsort(-lengths[indices], kind="stable")]
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def token_budget_batches(lengths: Sequence[int], tokens_per_batch: int) -> list[np.ndarray]:
    """Sort rows by length (longest first) and pack them so batch rows x longest row <= tokens_per_batch.

    A row longer than the budget gets a batch of its own.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, tokens_per_batch // longest)
        batches.append(order[start : start + size])
        start += size
    return batches


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id sequences to the batch's longest: (B, T) input_ids and attention_mask."""
    width = max(len(seq) for seq in sequences)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


@dataclass(frozen=True)
class MicroBatch:
    """The rows of one forward and backward pass, each in the A/B order it is trained in."""

    sequences: np.ndarray  # (B,) object: 1-D token ids of each row
    segments: np.ndarray  # (B,) object: 1-D segment ids of each row
    labels: np.ndarray  # (B,) int64 classes, A/B-swapped where the row is
    soft_labels: np.ndarray | None  # (B, 3) teacher probabilities in the same order, or None without a teacher
    row_ids: np.ndarray | None = None  # ids of the pairs trained (each once, also in a symmetric batch), when known


def pairs_per_micro_batch(batch_size: int, swap_mode: Literal["random", "symmetric"]) -> int:
    """Pairs (dataset rows) in one micro-batch of `batch_size` sequences: half of it when each pair comes twice."""
    return batch_size // 2 if swap_mode == "symmetric" else batch_size


def choose_rows(swap: np.ndarray, plain: np.ndarray, swapped: np.ndarray) -> np.ndarray:
    """Per row, the swapped encoding where `swap` is set; an object array of 1-D rows (ragged or not)."""
    out = np.empty(len(swap), dtype=object)
    for index, use_swapped in enumerate(swap):
        out[index] = swapped[index] if use_swapped else plain[index]
    return out


def swap_soft_labels(probs: np.ndarray) -> np.ndarray:
    """(N, 3) class probabilities of the A/B-swapped rows: p(A wins) and p(B wins) trade places."""
    return np.asarray(probs)[:, list(SWAPPED_LABEL)]


def micro_batches(
    window: Mapping[str, np.ndarray],
    batch_size: int,
    group_batches: int,
    swap_mode: Literal["random", "symmetric"],
    swap_prob: float,
    rng: np.random.Generator,
) -> list[MicroBatch]:
    """Cut a window of encoded rows (both A/B orders, as `app.training.EncodeBatch` writes them) into
    length-grouped micro-batches of `batch_size` sequences (`assemble` each). Every draw comes from `rng`, so a
    replayed window gives the same batches. (Training plans its batches over the whole epoch: app/epochs.py.)
    """
    n_rows = len(window["label"])
    swap = rng.random(n_rows) < swap_prob if swap_mode == "random" else np.zeros(n_rows, dtype=bool)
    if swap_mode == "random":
        lengths = [len(window["input_ids_swapped"][i] if swap[i] else window["input_ids"][i]) for i in range(n_rows)]
    else:
        lengths = [max(len(plain), len(swapped)) for plain, swapped in zip(window["input_ids"],
                                                                           window["input_ids_swapped"])]
    pairs = pairs_per_micro_batch(batch_size, swap_mode)
    return [assemble({key: value[rows] for key, value in window.items()}, swap[rows], swap_mode)
            for rows in length_grouped_batches(lengths, pairs, group_batches, rng)]


def assemble(rows: Mapping[str, np.ndarray], swap: np.ndarray,
             swap_mode: Literal["random", "symmetric"]) -> MicroBatch:
    """One micro-batch of encoded rows (both A/B orders, as `app.training.EncodeBatch` writes them).

    random: each row in one order, the swapped one where `swap` is set.
    symmetric: the pairs, then the same pairs with A and B swapped (`swap` unused), so every step's gradient treats
    A and B alike.
    Labels, and the teacher's probabilities (`teacher_probs`, when the rows have them), follow each row's order.
    """
    teacher = rows.get("teacher_probs")
    ids = rows.get("row_id")
    if swap_mode == "random":
        labels = np.where(swap, np.take(SWAPPED_LABEL, rows["label"]), rows["label"]).astype(np.int64)
        return MicroBatch(choose_rows(swap, rows["input_ids"], rows["input_ids_swapped"]),
                          choose_rows(swap, rows["segment_ids"], rows["segment_ids_swapped"]), labels,
                          None if teacher is None else np.where(swap[:, None], swap_soft_labels(teacher), teacher),
                          ids)
    n_rows = len(rows["label"])
    no_swap, all_swap = np.zeros(n_rows, dtype=bool), np.ones(n_rows, dtype=bool)
    labels = np.asarray(rows["label"], dtype=np.int64)
    return MicroBatch(
        np.concatenate([choose_rows(no_swap, rows["input_ids"], rows["input_ids_swapped"]),
                        choose_rows(all_swap, rows["input_ids"], rows["input_ids_swapped"])]),
        np.concatenate([choose_rows(no_swap, rows["segment_ids"], rows["segment_ids_swapped"]),
                        choose_rows(all_swap, rows["segment_ids"], rows["segment_ids_swapped"])]),
        np.concatenate([labels, np.take(SWAPPED_LABEL, labels)]),
        None if teacher is None else np.concatenate([teacher, swap_soft_labels(teacher)]), ids)
