"""Class-prior shift: move posteriors fitted under one class balance to another, or estimate the new balance.

The tie rate differs a lot between data sets (3% on LMSYS Arena pairs, about 30% elsewhere), and a model
trained on one carries that rate into its posteriors. With p(x|y) unchanged, Bayes' rule gives
p'(y|x) ∝ p(y|x) * pi'(y) / pi(y). Saerens, Latinne & Decaestecker (2002), "Adjusting the outputs of a
classifier to new a priori probabilities", estimate pi' on unlabelled rows by EM.

EM on posteriors that are not calibrated for the source distribution goes wrong (a model's tie probabilities
are rarely calibrated), so `adapt_priors_calibrated` first applies a bias-corrected calibration fitted on
out-of-fold logits (`app.calibration.fit_prior_calibration`; Alexandari, Kundaje & Shrikumar, ICML 2020), ties
the A and B priors, and keeps the shift only when it is large beside the error calibration + EM makes on held-out
rows of the source (`EMSettings.min_shift`) and a bootstrap over the rows says its likelihood gain is more than
noise; `PriorShift` records what was applied. numpy (and pydantic for the records) only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from statistics import NormalDist
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.calibration import SWAP_AB, PriorCalibration, check_probabilities

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


@dataclass(frozen=True)
class EMResult:
    """Where EM stopped: the estimate, the posteriors re-weighted to it, and how it got there."""

    priors: np.ndarray  # (C,)
    adjusted: np.ndarray  # (N, C) posteriors re-weighted from the train priors to `priors`
    n_iter: int
    converged: bool  # the last step moved no prior by `tol` or more
    last_step: float  # largest change of a prior in the last iteration
    row_gains: np.ndarray  # (N,) log p'(x) / p(x) = log sum_y p(y|x) priors(y) / train(y)

    @property
    def gain(self) -> float:
        """Mean log-likelihood gain per row of the estimate over the train priors (>= 0 at EM's fixed point)."""
        return float(self.row_gains.mean())


def run_em(probs: np.ndarray, train_priors: np.ndarray, max_iter: int = 1000, tol: float = 1e-6,
           tie_ab: bool = False) -> EMResult:
    """Saerens et al.'s EM for the class priors of unlabelled rows, run until no prior moves by `tol` or more
    (converged) or for `max_iter` iterations (not converged: the last estimate is returned, flagged).

    Each step re-weights the posteriors to the current estimate (E) and takes their mean as the next (M). With
    `tie_ab` the M-step keeps the A and B priors equal: their maximum-likelihood value under that constraint
    is the mean of the two, the same as EM on the rows together with their A/B-swapped copies.
    """
    probs = check_probabilities(probs)
    train = check_priors(train_priors, probs.shape[1], "train_priors")
    if probs.shape[0] == 0:
        raise ValueError("cannot estimate priors on zero rows")
    if max_iter < 1 or not tol > 0:
        raise ValueError(f"need max_iter >= 1 and tol > 0; got max_iter={max_iter}, tol={tol}")
    if tie_ab and probs.shape[1] != 3:
        raise ValueError(f"tie_ab is for the 3 classes (A, B, tie); got {probs.shape[1]} classes")
    priors, step, converged = train, np.inf, False
    for n_iter in range(1, max_iter + 1):
        estimate = reweight_to_priors(probs, train, priors).mean(axis=0)
        if tie_ab:
            estimate = (estimate + estimate[list(SWAP_AB)]) / 2
        # re-normalise: the mean sums to 1 up to rounding, and check_priors insists on it
        estimate = estimate / estimate.sum()
        step = float(np.max(np.abs(estimate - priors)))
        priors = estimate
        if step < tol:
            converged = True
            break
    if np.any(priors <= 0):
        raise ValueError(f"EM drove a class prior to zero ({priors.tolist()}); the rows carry no sign of that "
                         "class, use fixed priors instead")
    row_gains = np.log(probs @ (priors / train))  # (N,)
    return EMResult(priors, reweight_to_priors(probs, train, priors), n_iter, converged, step, row_gains)


def estimate_priors_em(
    probs: np.ndarray, train_priors: np.ndarray, max_iter: int = 100, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, int]:
    """Estimate the class priors of unlabelled rows by EM (`run_em`, untied) and adjust their posteriors.

    The posteriors must be calibrated under `train_priors` for the estimate to mean anything, and the rows
    should be many (a whole test set, not a single request).

    Returns:
        (priors (C,), adjusted probs (N, C) re-weighted to those priors, iterations run).

    Warns:
        RuntimeWarning when `max_iter` steps end before convergence (the last estimate is returned).
    """
    result = run_em(probs, train_priors, max_iter, tol)
    if not result.converged:
        warnings.warn(f"prior EM did not converge in {max_iter} iterations (last step {result.last_step:.3g} >= "
                      f"tol {tol}); raise max_iter or tol", RuntimeWarning, stacklevel=2)
    return result.priors, result.adjusted, result.n_iter


class EMSettings(BaseModel):
    """How priors are estimated by EM, and when `calibrated_em` keeps its estimate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_iter: int = Field(1000, ge=1, description="EM stops here if not converged (calibrated_em then falls back)")
    tol: float = Field(1e-6, gt=0, description="converged when no prior moves by this much in an iteration")
    tie_ab: bool = Field(True, description="calibrated_em: keep the A and B priors equal")
    safeguard_resamples: int = Field(
        200, ge=0, description="calibrated_em: bootstrap resamples of the rows behind the fallback; 0 = no safeguard")
    safeguard_alpha: float = Field(0.05, gt=0, lt=0.5, description="the shift is kept when the alpha-quantile of "
                                   "the bootstrapped mean log-likelihood gain is above 0")
    min_rows: int = Field(50, ge=1, description="calibrated_em: fewer rows than this are left unadjusted")
    min_shift: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        "auto", description="calibrated_em: an estimate whose total variation distance from the source priors is "
        "smaller than this is left unapplied (0 = any size); 'auto' = 2 z x the calibration's held-out prior "
        "error, z the standard normal (1 - safeguard_alpha)-quantile (`resolve_min_shift` says why)")
    seed: int = Field(0, description="the bootstrap's random draws")


class PriorShift(BaseModel):
    """What a class-prior shift did to a set of rows: the record predict prints and Serve puts in headers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["fixed", "em", "calibrated_em"]
    n_rows: int
    train_priors: tuple[float, ...] = Field(description="the priors the posteriors were shifted from")
    estimated_priors: tuple[float, ...] | None = Field(None, description="EM's estimate (em, calibrated_em)")
    applied_priors: tuple[float, ...] | None = Field(
        description="the priors the output is shifted to; None when the output is left unadjusted (fallback)")
    converged: bool | None = None
    n_iter: int | None = None
    log_likelihood_gain: float | None = Field(None, description="mean per row, estimate over train priors")
    shift: float | None = Field(None, description="total variation distance of the estimate from train_priors")
    min_shift: float | None = Field(None, description="calibrated_em: the smallest shift it applies (None: no minimum)")
    gain_lower_bound: float | None = Field(None, description="the safeguard's bootstrap alpha-quantile of it")
    fallback: bool = False
    reason: str = Field("", description="why the shift was applied or not, in words")
    calibration: str | None = Field(None, description="the calibration applied before EM")

    def summary(self) -> str:
        """One line for logs and reports."""
        shown = "unadjusted" if self.applied_priors is None else f"priors {_rounded(self.applied_priors)}"
        return f"{self.method}: {shown}" + (f" ({self.reason})" if self.reason else "")


def _rounded(values: tuple[float, ...] | np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in values]


def total_variation(first: np.ndarray | tuple[float, ...], second: np.ndarray | tuple[float, ...]) -> float:
    """Total variation distance between two class distributions: half the sum of absolute differences."""
    return float(0.5 * np.abs(np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)).sum())


def resolve_min_shift(settings: EMSettings, prior_error: float | None) -> float | None:
    """The smallest estimated shift (total variation from the source priors) calibrated_em applies; None = none.

    A number in `settings.min_shift` is used as given. "auto" is 2 z `prior_error`: `prior_error` is the root
    mean square error calibration + EM makes on held-out rows of the source (`app.calibration.
    held_out_prior_error`, stored in the calibration), z the standard normal (1 - safeguard_alpha)-quantile
    (1.64 at the default 0.05), the confidence the bootstrap is held to.

    Why: near the source priors the expected log loss of posteriors re-weighted to priors q is, to second order,
    a quadratic with its minimum at the true priors, so shifting to an estimate beats not shifting only when
    the estimate is nearer the truth than the source priors are. An estimate whose shift is s and whose error
    (towards the shift) is e does so iff e < s / 2 (exact along one direction, the tie share when A and B are
    tied; total variation stands in for the distance otherwise); with errors of standard deviation `prior_error`, that holds
    with probability 1 - alpha iff s >= 2 z `prior_error`. A smaller estimated shift can be the error EM is
    known to make, and adapting to it can lose: it is the size below which even the ideal adaptation gains less
    than the model's miscalibration can cost. The held-out error sees the calibration's error and EM's sampling
    noise on folds of the source, not a shift of the texts, which the source cannot show; so it is a floor,
    and the bootstrap still tests the target rows' own noise.

    Returns None for "auto" with a calibration stored before its prior error was measured (the record says so).
    """
    if settings.min_shift != "auto":
        return float(settings.min_shift)
    if prior_error is None:
        return None
    return 2 * NormalDist().inv_cdf(1 - settings.safeguard_alpha) * prior_error


def bootstrap_lower_bound(values: np.ndarray, resamples: int, alpha: float, seed: int = 0) -> float:
    """The alpha-quantile of the mean of `values` (N,) over `resamples` bootstrap resamples of its rows."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    block = max(1, 2_000_000 // max(len(values), 1))  # resamples drawn at once: bounded memory
    means = np.concatenate([values[rng.integers(0, len(values), size=(min(block, resamples - start), len(values)))]
                            .mean(axis=1) for start in range(0, resamples, block)])
    return float(np.quantile(means, alpha))


def adapt_priors_calibrated(probs: np.ndarray, calibration: PriorCalibration,
                            settings: EMSettings = EMSettings()) -> tuple[np.ndarray, PriorShift]:
    """Calibrate, estimate the priors by EM, and shift to them only where the data supports it.

    The posteriors' logs are calibrated by `calibration` (fitted on out-of-fold logits of the training
    distribution), then `shift_calibrated_posteriors` estimates and applies the priors, or falls back.

    Returns:
        ((N, C) probabilities, the `PriorShift` record of what was done).
    """
    probs = check_probabilities(probs)
    if len(calibration.weights) != probs.shape[1]:
        raise ValueError(f"the calibration is for {len(calibration.weights)} classes; probs have {probs.shape[1]}")
    calibrated = calibration.apply(np.log(np.maximum(probs, np.finfo(np.float64).tiny)))
    return shift_calibrated_posteriors(calibrated, calibration.source_priors, probs, settings, calibration.describe(),
                                       calibration.prior_error)


def shift_calibrated_posteriors(calibrated: np.ndarray, source_priors: np.ndarray | tuple[float, ...],
                                unadjusted: np.ndarray, settings: EMSettings = EMSettings(),
                                calibration: str | None = None, prior_error: float | None = None
                                ) -> tuple[np.ndarray, PriorShift]:
    """EM on calibrated posteriors (A and B tied unless `settings.tie_ab` is off), the safeguard, and the shift.

    EM starts from `source_priors`, the priors the posteriors are calibrated under, and the calibrated
    posteriors are re-weighted to its estimate. `unadjusted` (the prediction without calibration or shift) is
    returned instead (fallback) when the rows are fewer than `settings.min_rows`, EM stops without converging,
    the estimate's total variation distance from `source_priors` is below the minimum shift
    (`resolve_min_shift` of the settings and `prior_error`, the calibration's held-out prior error), or the
    bootstrap lower bound of the mean log-likelihood gain is not above zero.

    Returns:
        ((N, C) probabilities, the `PriorShift` record: estimate, convergence, gain, fallback and why).
    """
    calibrated = check_probabilities(calibrated, "calibrated")
    unadjusted = check_probabilities(unadjusted, "unadjusted")
    if calibrated.shape != unadjusted.shape:
        raise ValueError(f"calibrated {calibrated.shape} and unadjusted {unadjusted.shape} posteriors differ in shape")
    source = check_priors(source_priors, calibrated.shape[1], "source_priors")
    record = {"method": "calibrated_em", "n_rows": len(calibrated), "train_priors": tuple(map(float, source)),
              "calibration": calibration}
    if len(calibrated) < settings.min_rows:
        return unadjusted, PriorShift(**record, applied_priors=None, fallback=True,
                                      reason=f"{len(calibrated)} rows are fewer than the {settings.min_rows} EM needs")
    result = run_em(calibrated, source, settings.max_iter, settings.tol, tie_ab=settings.tie_ab)
    min_shift, shift = resolve_min_shift(settings, prior_error), total_variation(result.priors, source)
    record.update(estimated_priors=tuple(map(float, result.priors)), converged=result.converged,
                  n_iter=result.n_iter, log_likelihood_gain=result.gain, shift=shift, min_shift=min_shift)
    if not result.converged:
        return unadjusted, PriorShift(**record, applied_priors=None, fallback=True,
                                      reason=f"EM did not converge in {settings.max_iter} iterations (last step "
                                             f"{result.last_step:.2g} >= tol {settings.tol:g})")
    if min_shift is not None and shift < min_shift:
        source_of_minimum = ("predict.em_min_shift" if settings.min_shift != "auto" else
                             f"2 x {NormalDist().inv_cdf(1 - settings.safeguard_alpha):.2f} x the calibration's "
                             f"held-out prior error {prior_error:.2g}")
        return unadjusted, PriorShift(**record, applied_priors=None, fallback=True,
                                      reason=f"estimated shift {shift:.3f} (total variation) is below the minimum "
                                             f"{min_shift:.3f} ({source_of_minimum}): too small to tell from "
                                             "the model's miscalibration")
    if settings.safeguard_resamples:
        bound = bootstrap_lower_bound(result.row_gains, settings.safeguard_resamples, settings.safeguard_alpha,
                                      settings.seed)
        record["gain_lower_bound"] = bound
        if not bound > 0:
            return unadjusted, PriorShift(**record, applied_priors=None, fallback=True,
                                          reason=f"likelihood gain {result.gain:.2g}/row is within bootstrap noise "
                                                 f"({settings.safeguard_alpha:g}-quantile {bound:.2g} <= 0)")
    size = (f" >= minimum {min_shift:.3f}" if min_shift is not None else
            "; no minimum shift: the calibration stores no held-out prior error (refit it with jobs.cv or "
            "jobs.ensemble, or set predict.em_min_shift)")
    return result.adjusted, PriorShift(**record, applied_priors=record["estimated_priors"],
                                       reason=f"EM converged in {result.n_iter} iterations, shift {shift:.3f}{size}")


def shift_priors_em(probs: np.ndarray, train_priors: np.ndarray | list[float] | tuple[float, ...],
                    settings: EMSettings = EMSettings()) -> tuple[np.ndarray, PriorShift]:
    """Plain EM (`priors="em"`): untied, on the posteriors as they are, no safeguard; the record says whether
    it converged. Prefer `adapt_priors_calibrated`, which is never worse as far as the data can tell."""
    result = run_em(probs, np.asarray(train_priors), settings.max_iter, settings.tol)
    if not result.converged:
        warnings.warn(f"prior EM did not converge in {settings.max_iter} iterations (last step "
                      f"{result.last_step:.3g} >= tol {settings.tol}); the last estimate is applied",
                      RuntimeWarning, stacklevel=2)
    estimate = tuple(map(float, result.priors))
    return result.adjusted, PriorShift(
        method="em", n_rows=len(result.adjusted), train_priors=tuple(map(float, train_priors)),
        estimated_priors=estimate, applied_priors=estimate, converged=result.converged, n_iter=result.n_iter,
        log_likelihood_gain=result.gain, shift=total_variation(result.priors, train_priors),
        reason=f"EM {'converged' if result.converged else 'stopped without converging'} in {result.n_iter} "
               "iterations")


def shift_priors(probs: np.ndarray, train_priors: np.ndarray | list[float] | tuple[float, ...],
                 priors: str | list[float] | tuple[float, ...]) -> np.ndarray:
    """Posteriors (N, C) moved from the training class shares to `priors`: given shares, or "em" to estimate
    them on these rows (`estimate_priors_em`: pass a whole test set)."""
    if isinstance(priors, str):
        if priors != "em":
            raise ValueError(f'priors must be "em" or class shares; got {priors!r}')
        return estimate_priors_em(probs, np.asarray(train_priors))[1]
    return reweight_to_priors(probs, np.asarray(train_priors), np.asarray(priors))
