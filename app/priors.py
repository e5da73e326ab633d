"""Class-prior shift: move posteriors fitted under one class balance to another, or estimate the new balance.

The tie rate differs a lot between data sets (3% on LMSYS Arena pairs, about 30% elsewhere), and a model
trained on one carries that rate into its posteriors. With p(x|y) unchanged, Bayes' rule gives
p'(y|x) ∝ p(y|x) * pi'(y) / pi(y). Saerens, Latinne & Decaestecker (2002), "Adjusting the outputs of a
classifier to new a priori probabilities", estimate pi' on unlabelled rows by EM. numpy only.
"""

from __future__ import annotations

import warnings

import numpy as np

from app.calibration import check_probabilities

PRIOR_SUM_TOLERANCE = 1e-6


def check_priors(priors: np.ndarray | list[float] | tuple[float, ...], n_classes: int, name: str) -> np.ndarray:
    """Return the priors as a float64 (n_classes,) array, or raise ValueError (shape, non-positive, sum != 1)."""
    values = np.asarray(priors, dtype=np.float64)
    if values.shape != (n_classes,):
        raise ValueError(f"{name} must hold {n_classes} class probabilities (A, B, tie order); got shape "
                         f"{values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{name} must be positive (a zero prior can never be re-weighted); got {values.tolist()}")
    if abs(values.sum() - 1.0) > PRIOR_SUM_TOLERANCE:
        raise ValueError(f"{name} must sum to 1 within {PRIOR_SUM_TOLERANCE}; {values.tolist()} sums to "
                         f"{values.sum():.8g}")
    return values


def class_frequencies(labels: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Share of each class among integer labels, (n_classes,): the train priors of a labelled set."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty (N,) integer array; got {labels.dtype} shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}); got values in [{labels.min()}, {labels.max()}]")
    return np.bincount(labels, minlength=n_classes) / labels.size


def reweight_to_priors(probs: np.ndarray, train_priors: np.ndarray, target_priors: np.ndarray) -> np.ndarray:
    """Bayes re-weighting of posteriors to new class priors: p'(y|x) ∝ p(y|x) * target(y) / train(y), (N, C).

    Args:
        probs: (N, C) posteriors of a model whose training labels had class shares `train_priors`.
        train_priors, target_priors: (C,) positive, summing to 1.
    """
    probs = check_probabilities(probs)
    ratio = check_priors(target_priors, probs.shape[1], "target_priors") / check_priors(
        train_priors, probs.shape[1], "train_priors")
    weighted = probs * ratio  # (N, C)
    totals = weighted.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError("a row of probs is all zeros; it cannot be re-weighted")
    return weighted / totals


def estimate_priors_em(
    probs: np.ndarray, train_priors: np.ndarray, max_iter: int = 100, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, int]:
    """Estimate the class priors of unlabelled rows by EM (Saerens et al., 2002) and adjust their posteriors.

    Starting from the train priors, each step re-weights the posteriors to the current estimate (E) and
    takes their mean as the next estimate (M), until no prior moves by more than `tol`. The posteriors must
    be calibrated under `train_priors` for the estimate to mean anything, and the rows should be many (a whole
    test set, not a single request).

    Returns:
        (priors (C,), adjusted probs (N, C) re-weighted to those priors, iterations run).

    Warns:
        RuntimeWarning when `max_iter` steps end before convergence (the last estimate is returned).
    """
    probs = check_probabilities(probs)
    train = check_priors(train_priors, probs.shape[1], "train_priors")
    if probs.shape[0] == 0:
        raise ValueError("cannot estimate priors on zero rows")
    if max_iter < 1 or not tol > 0:
        raise ValueError(f"need max_iter >= 1 and tol > 0; got max_iter={max_iter}, tol={tol}")
    priors = train
    for n_iter in range(1, max_iter + 1):
        # re-normalise the mean: it sums to 1 up to rounding, and check_priors insists on it
        estimate = reweight_to_priors(probs, train, priors).mean(axis=0)
        estimate = estimate / estimate.sum()
        step = np.max(np.abs(estimate - priors))
        priors = estimate
        if step < tol:
            break
    else:
        warnings.warn(f"prior EM did not converge in {max_iter} iterations (last step {step:.3g} >= tol {tol}); "
                      "raise max_iter or tol", RuntimeWarning, stacklevel=2)
    if np.any(priors <= 0):
        raise ValueError(f"EM drove a class prior to zero ({priors.tolist()}); the rows carry no sign of that "
                         "class, use fixed priors instead")
    return priors, reweight_to_priors(probs, train, priors), n_iter


def shift_priors(probs: np.ndarray, train_priors: np.ndarray | list[float] | tuple[float, ...],
                 priors: str | list[float] | tuple[float, ...]) -> np.ndarray:
    """Posteriors (N, C) moved from the training class shares to `priors`: given shares, or "em" to estimate
    them on these rows (`estimate_priors_em`: pass a whole test set)."""
    if isinstance(priors, str):
        if priors != "em":
            raise ValueError(f'priors must be "em" or class shares; got {priors!r}')
        return estimate_priors_em(probs, np.asarray(train_priors))[1]
    return reweight_to_priors(probs, np.asarray(train_priors), np.asarray(priors))
