"""Batches that waste little compute on padding: length grouping, token budgets, dynamic padding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
