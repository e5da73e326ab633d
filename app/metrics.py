"""Scores of 3-class preference predictions, exactly as Kaggle computes them. numpy only."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, computed in float64."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, C) logits, computed in float64."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def combine_views(plain: np.ndarray, swapped_back: np.ndarray, how: str = "logit") -> np.ndarray:
    """(N, C) logits of two test-time views of the same rows (the swapped view's columns already put back).

    how="logit": the mean of the views' log-probabilities (softmax of it is their normalised geometric mean);
    how="prob":  the log of the mean of their probabilities (arithmetic mean, less sharp where views disagree).
    """
    views = np.stack([log_softmax(plain), log_softmax(swapped_back)])  # (2, N, C)
    if how == "logit":
        return views.mean(axis=0)
    if how == "prob":
        return np.log(np.exp(views).mean(axis=0))
    raise ValueError(f"how must be 'logit' or 'prob', got {how!r}")


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class log loss with Kaggle's eps='auto' handling.

    Rows are renormalised to sum to 1, clipped to [eps, 1 - eps] with eps the float64 machine epsilon
    (scikit-learn's eps='auto' for float64 input), renormalised again, and the mean negative log
    probability of the true class is returned.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (N, C) with N = len(labels); got {probs.shape} and {labels.shape}")
    if probs.shape[0] == 0:
        raise ValueError("log loss of zero rows is undefined")
    eps = np.finfo(np.float64).eps
    probs = probs / probs.sum(axis=1, keepdims=True)
    probs = np.clip(probs, eps, 1 - eps)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose most probable class is the label."""
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))


def score(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metrics every job reports: log loss and accuracy."""
    return {"log_loss": log_loss(probs, labels), "accuracy": accuracy(probs, labels)}
