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
    length-grouped micro-batches of `batch_size` sequences.

    random: each row is trained in one order, the swapped one with probability `swap_prob`.
    symmetric: each micro-batch holds `batch_size / 2` pairs and then the same pairs with A and B swapped,
    so every step's gradient treats A and B alike.
    Labels, and the teacher's probabilities (`teacher_probs`, when the window has them), follow each row's
    order. Every draw comes from `rng`, so a replayed window gives the same batches.
    """
    n_rows = len(window["label"])
    teacher = window.get("teacher_probs")
    ids = window.get("row_id")
    if swap_mode == "random":
        swap = rng.random(n_rows) < swap_prob
        sequences = choose_rows(swap, window["input_ids"], window["input_ids_swapped"])
        segments = choose_rows(swap, window["segment_ids"], window["segment_ids_swapped"])
        labels = np.where(swap, np.take(SWAPPED_LABEL, window["label"]), window["label"]).astype(np.int64)
        soft = None if teacher is None else np.where(swap[:, None], swap_soft_labels(teacher), teacher)
        lengths = [len(sequence) for sequence in sequences]
        return [MicroBatch(sequences[rows], segments[rows], labels[rows], None if soft is None else soft[rows],
                           None if ids is None else ids[rows])
                for rows in length_grouped_batches(lengths, batch_size, group_batches, rng)]
    no_swap, all_swap = np.zeros(n_rows, dtype=bool), np.ones(n_rows, dtype=bool)
    plain_ids = choose_rows(no_swap, window["input_ids"], window["input_ids_swapped"])
    swapped_ids = choose_rows(all_swap, window["input_ids"], window["input_ids_swapped"])
    plain_segments = choose_rows(no_swap, window["segment_ids"], window["segment_ids_swapped"])
    swapped_segments = choose_rows(all_swap, window["segment_ids"], window["segment_ids_swapped"])
    labels = np.asarray(window["label"], dtype=np.int64)
    lengths = [max(len(plain), len(swapped)) for plain, swapped in zip(plain_ids, swapped_ids)]
    batches = []
    for rows in length_grouped_batches(lengths, pairs_per_micro_batch(batch_size, "symmetric"), group_batches, rng):
        soft = None if teacher is None else np.concatenate([teacher[rows], swap_soft_labels(teacher[rows])])
        batches.append(MicroBatch(np.concatenate([plain_ids[rows], swapped_ids[rows]]),
                                  np.concatenate([plain_segments[rows], swapped_segments[rows]]),
                                  np.concatenate([labels[rows], np.take(SWAPPED_LABEL, labels[rows])]), soft,
                                  None if ids is None else ids[rows]))
    return batches
