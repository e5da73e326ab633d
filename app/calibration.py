"""Post-hoc calibration of class logits: temperature and vector scaling, ECE, reliability diagrams, smoothing,
and the bias-corrected calibration that class-prior adaptation needs (`fit_prior_calibration`), with the error
EM makes on its held-out rows (`held_out_prior_error`).

Everything here fits on held-out (validation or out-of-fold) logits and is numpy/scipy only (pydantic for the
stored `PriorCalibration`); matplotlib is imported inside `reliability_diagram` and nowhere else. Classes are in
`app.data.LABEL_COLUMNS` order.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, logsumexp

from app.metrics import log_loss, softmax

TEMPERATURE_BOUNDS = (1e-2, 1e2)  # T outside this means the logits are degenerate, not miscalibrated
VECTOR_L2 = 1e-4  # pulls vector scaling towards the temperature solution; tiny next to a per-row NLL


def check_logits_and_labels(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return float64 (N, C) logits and int64 (N,) labels, or raise ValueError saying what is wrong."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with C >= 2 classes; got shape {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be (N,) with N = {logits.shape[0]} rows of logits; got shape {labels.shape}")
    if logits.shape[0] == 0:
        raise ValueError("cannot calibrate on zero rows")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or inf; check the model outputs before calibrating")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be integer class indices in [0, {logits.shape[1]}); got {labels.dtype} "
                         f"values in [{labels.min()}, {labels.max()}]")
    return logits, labels.astype(np.int64)


def check_probabilities(probs: np.ndarray, name: str = "probs", atol: float = 1e-3) -> np.ndarray:
    """Return float64 (N, C) probabilities, or raise ValueError (negative, non-finite, rows not summing to 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"{name} must be (N, C) with C >= 2 classes; got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError(f"{name} must be finite and non-negative; pass probabilities, not logits")
    worst = np.max(np.abs(probs.sum(axis=1) - 1.0), initial=0.0)
    if worst > atol:
        raise ValueError(f"{name} rows must sum to 1 (worst row is off by {worst:.3g}); pass probabilities, "
                         "not logits (apply softmax first)")
    return probs


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of integer labels under softmax(logits), unclipped."""
    return float(-np.mean(log_softmax(logits, axis=1)[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fit the temperature T that minimises the log loss of softmax(logits / T).

    The loss is convex in 1/T, hence unimodal in log T, so a bounded Brent search on log T over
    TEMPERATURE_BOUNDS finds the global minimum, deterministically.

    Raises:
        ValueError: bad shapes, or the optimum sits on a bound (logits that carry no signal, or that separate
            the labels perfectly, so no finite temperature is best).
    """
    logits, labels = check_logits_and_labels(logits, labels)
    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: _nll(logits / np.exp(log_t), labels), bounds=(low, high),
                             method="bounded", options={"xatol": 1e-10, "maxiter": 500})
    if min(result.x - low, high - result.x) < 1e-3:
        raise ValueError(f"the best temperature is at the search bound {np.exp(result.x):.3g} of "
                         f"{TEMPERATURE_BOUNDS}: the logits carry no signal about the labels or separate them "
                         "perfectly; calibrate on held-out rows of a trained model")
    return float(np.exp(result.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities softmax(logits / temperature), (N, C)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(np.asarray(logits, dtype=np.float64) / temperature)


def fit_vector_scaling(
    logits: np.ndarray, labels: np.ndarray, l2: float = VECTOR_L2
) -> tuple[np.ndarray, np.ndarray]:
    """Fit per-class scales w (C,) and biases b (C,) minimising the log loss of softmax(logits * w + b).

    The objective adds l2 * (|w - 1/T|^2 + |b|^2), where T is the fitted temperature, and L-BFGS starts from
    (w, b) = (1/T, 0). Starting at and shrinking towards temperature scaling means the fit's log loss on
    these rows is never worse than temperature scaling's, and the penalty on b picks one of the biases that
    differ only by a constant (which softmax ignores).
    """
    logits, labels = check_logits_and_labels(logits, labels)
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    n_rows, n_classes = logits.shape
    one_hot = np.eye(n_classes)[labels]  # (N, C)
    w_start = np.full(n_classes, 1.0 / fit_temperature(logits, labels))

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = params[:n_classes], params[n_classes:]
        scaled = logits * w + b  # (N, C)
        loss = np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(n_rows), labels])
        residual = (softmax(scaled) - one_hot) / n_rows  # d loss / d scaled, (N, C)
        grad_w = (residual * logits).sum(axis=0) + 2 * l2 * (w - w_start)
        grad_b = residual.sum(axis=0) + 2 * l2 * b
        penalty = l2 * (np.sum((w - w_start) ** 2) + np.sum(b**2))
        return float(loss + penalty), np.concatenate([grad_w, grad_b])

    start = np.concatenate([w_start, np.zeros(n_classes)])
    result = minimize(objective, start, jac=True, method="L-BFGS-B",
                      options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10})
    return result.x[:n_classes].copy(), result.x[n_classes:].copy()


def apply_vector_scaling(logits: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Calibrated probabilities softmax(logits * weights + bias), (N, C)."""
    logits = np.asarray(logits, dtype=np.float64)
    weights, bias = np.asarray(weights, dtype=np.float64), np.asarray(bias, dtype=np.float64)
    if logits.ndim != 2 or weights.shape != (logits.shape[1],) or bias.shape != (logits.shape[1],):
        raise ValueError(f"need (N, C) logits with (C,) weights and bias; got {logits.shape}, {weights.shape}, "
                         f"{bias.shape}")
    return softmax(logits * weights + bias)


def reliability_curve(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label reliability per equal-width confidence bin: (mean confidence, accuracy, row count), each (n_bins,).

    A row's confidence is its largest probability and it is correct when that class (the first, on ties) is
    its label. Bin k holds confidences in (k/n_bins, (k+1)/n_bins]; bin 0 also holds 0. Empty bins give NaN
    confidence and accuracy and count 0.
    """
    probs = check_probabilities(probs)
    labels = np.asarray(labels)
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be (N,) with N = {probs.shape[0]}; got shape {labels.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / counts
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / counts
    return mean_confidence, accuracy, counts.astype(np.int64)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins.

    ECE = sum over bins k of (n_k / N) * |accuracy_k - mean confidence_k|, with bins and correctness as in
    `reliability_curve` (confidence = largest probability; 15 bins of width 1/15 by default). 0 is perfect;
    an unbiased-looking model still scores about sqrt(n_bins / N) / 2 from sampling noise alone.
    """
    confidence, accuracy, counts = reliability_curve(probs, labels, n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(accuracy[filled] - confidence[filled])) / counts.sum())


def reliability_diagram(
    probs_before: np.ndarray,
    probs_after: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike[str],
    n_bins: int = 15,
) -> Path:
    """Write a PNG reliability diagram: accuracy against confidence before and after calibration.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch). The legend gives each
    curve's ECE; point sizes follow bin counts. Creates the parent folder; returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0, 5.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for name, probs, color in (("before", probs_before, "tab:red"), ("after", probs_after, "tab:blue")):
        confidence, accuracy, counts = reliability_curve(probs, labels, n_bins)
        filled = counts > 0
        ece = expected_calibration_error(probs, labels, n_bins)
        axes.plot(confidence[filled], accuracy[filled], color=color, marker="o", markersize=3,
                  label=f"{name} (ECE {ece:.4f})")
        axes.scatter(confidence[filled], accuracy[filled], s=8 + 200 * counts[filled] / counts.sum(),
                     color=color, alpha=0.35)
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-label probability)", ylabel="accuracy",
             title=f"Reliability, {len(np.asarray(labels))} rows, {n_bins} bins")
    axes.legend(loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def smooth_probabilities(probs: np.ndarray, alpha: float, prior: np.ndarray) -> np.ndarray:
    """Shrink probabilities towards a prior: (1 - alpha) * probs + alpha * prior, (N, C).

    Raises:
        ValueError: alpha outside [0, 1], or a prior that is not a (C,) probability vector.
    """
    probs = check_probabilities(probs)
    prior = np.asarray(prior, dtype=np.float64)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if prior.shape != (probs.shape[1],) or np.any(prior < 0) or abs(prior.sum() - 1.0) > 1e-6:
        raise ValueError(f"prior must be {probs.shape[1]} non-negative numbers summing to 1; got {prior.tolist()}")
    return (1.0 - alpha) * probs + alpha * prior


@dataclass(frozen=True)
class CalibrationReport:
    """What a calibration fit did to its rows' log loss and top-label ECE, and the fitted parameters."""

    method: Literal["temperature", "vector"]
    n_rows: int
    log_loss_before: float
    log_loss_after: float
    ece_before: float
    ece_after: float
    temperature: float
    vector_weights: tuple[float, ...] | None = None
    vector_bias: tuple[float, ...] | None = None

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of new logits with the fitted parameters, (N, C)."""
        if self.method == "vector":
            assert self.vector_weights is not None and self.vector_bias is not None
            return apply_vector_scaling(logits, np.array(self.vector_weights), np.array(self.vector_bias))
        return apply_temperature(logits, self.temperature)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for results files and Tune reports)."""
        return asdict(self)


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    method: Literal["temperature", "vector"] = "temperature",
    n_bins: int = 15,
) -> CalibrationReport:
    """Fit temperature (and, for method="vector", vector) scaling and report before/after on the same rows.

    The "after" numbers are in-sample; fit on one validation fold and score another for an honest estimate.
    """
    if method not in ("temperature", "vector"):
        raise ValueError(f"method must be 'temperature' or 'vector', got {method!r}")
    logits, labels = check_logits_and_labels(logits, labels)
    before = softmax(logits)
    temperature = fit_temperature(logits, labels)
    weights = bias = None
    if method == "vector":
        weights, bias = fit_vector_scaling(logits, labels)
        after = apply_vector_scaling(logits, weights, bias)
    else:
        after = apply_temperature(logits, temperature)
    return CalibrationReport(
        method=method,
        n_rows=len(labels),
        log_loss_before=log_loss(before, labels),
        log_loss_after=log_loss(after, labels),
        ece_before=expected_calibration_error(before, labels, n_bins),
        ece_after=expected_calibration_error(after, labels, n_bins),
        temperature=temperature,
        vector_weights=None if weights is None else tuple(float(v) for v in weights),
        vector_bias=None if bias is None else tuple(float(v) for v in bias),
    )


# ---------------------------------------------------------------------------------------------------------
# Bias-corrected calibration for class-prior adaptation (app/priors.py, `calibrated_em`)

PriorCalibrationMethod = Literal["bcts", "vector"]
SWAP_AB = (1, 0, 2)  # class order (A, B, tie) with A and B exchanged


def _parameter_maps(method: PriorCalibrationMethod, symmetric: bool, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear maps from the free parameters theta (P,) to per-class scales w = W @ theta and biases b = B @ theta.

    The bias of class 0 is fixed at 0 (softmax ignores a constant added to every bias). "bcts" shares one scale
    (1/T) across classes; "vector" has one per class. `symmetric` ties A's and B's scale and bias, so the
    calibrated posteriors of A/B-swapped logits are the swapped posteriors.
    """
    if symmetric:
        if n_classes != 3:
            raise ValueError(f"symmetric calibration is for the 3 classes (A, B, tie); got {n_classes} classes")
        if method == "bcts":  # theta = (1/T, tie bias)
            return np.array([[1.0, 0.0]] * 3), np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
        # theta = (A and B scale, tie scale, tie bias)
        return (np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
                np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    n_scales = 1 if method == "bcts" else n_classes
    scales = np.ones((n_classes, 1)) if method == "bcts" else np.eye(n_classes)
    biases = np.vstack([np.zeros((1, n_classes - 1)), np.eye(n_classes - 1)])  # (C, C - 1)
    return (np.hstack([scales, np.zeros((n_classes, n_classes - 1))]),
            np.hstack([np.zeros((n_classes, n_scales)), biases]))


def fit_scaled_bias(logits: np.ndarray, labels: np.ndarray, method: PriorCalibrationMethod = "bcts",
                    symmetric: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Fit per-class scales w (C,) and biases b (C,) minimising the log loss of softmax(logits * w + b).

    method="bcts" is bias-corrected temperature scaling (one temperature, a bias per class; Alexandari, Kundaje
    & Shrikumar, ICML 2020), "vector" is vector scaling. The log loss is convex in (w, b), so L-BFGS from
    temperature scaling's solution reaches the minimum. With `symmetric` the parameters of A and B are tied.
    """
    logits, labels = check_logits_and_labels(logits, labels)
    n_rows, n_classes = logits.shape
    scale_map, bias_map = _parameter_maps(method, symmetric, n_classes)
    one_hot = np.eye(n_classes)[labels]  # (N, C)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        scaled = logits * (scale_map @ theta) + bias_map @ theta  # (N, C)
        loss = np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(n_rows), labels])
        residual = (softmax(scaled) - one_hot) / n_rows  # d loss / d scaled, (N, C)
        return float(loss), scale_map.T @ (residual * logits).sum(axis=0) + bias_map.T @ residual.sum(axis=0)

    start = np.zeros(scale_map.shape[1])
    start[scale_map.sum(axis=0) > 0] = 1.0 / fit_temperature(logits, labels)
    result = minimize(objective, start, jac=True, method="L-BFGS-B",
                      options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10})
    return scale_map @ result.x, bias_map @ result.x


class PriorCalibration(BaseModel):
    """Calibration of class logits under the source class shares, for class-prior adaptation.

    EM re-weights posteriors to new priors correctly only when they are calibrated; this is fitted on held-out
    (out-of-fold) logits of the training distribution. probs = softmax(log_softmax(logits) * weights + bias)
    (log-probabilities, so that a logit offset per row, which softmax ignores, cannot change the result where
    the classes' scales differ), and
    `source_priors` are the class shares of the rows it was fitted on (A's and B's averaged when symmetric):
    the priors the calibrated posteriors are calibrated under.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: PriorCalibrationMethod
    symmetric: bool
    weights: tuple[float, ...]
    bias: tuple[float, ...]
    source_priors: tuple[float, ...]
    n_rows: int = Field(ge=1)
    log_loss_before: float = Field(description="softmax(logits) on the rows it was fitted on")
    log_loss_after: float = Field(description="calibrated, on the same rows (in-sample)")
    prior_error: float | None = Field(
        None, ge=0, le=1, description="how far calibration + EM misses the class shares of held-out rows of the "
        "source (`held_out_prior_error`, total variation): what calibrated_em's minimum shift is measured against; "
        "None in calibrations stored before it was measured")

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, C) of logits or log-probabilities (the same: it scales log_softmax)."""
        return apply_vector_scaling(log_softmax(np.asarray(logits, dtype=np.float64), axis=1),
                                    np.array(self.weights), np.array(self.bias))

    def describe(self) -> str:
        """One line: the method and its parameters."""
        kind = f"{self.method}{' symmetric' if self.symmetric else ''}"
        if self.method == "bcts":
            return f"{kind} T={1 / self.weights[0]:.3f} bias={[round(b, 3) for b in self.bias]}"
        return f"{kind} weights={[round(w, 3) for w in self.weights]} bias={[round(b, 3) for b in self.bias]}"


def _held_out_posteriors(logits: np.ndarray, labels: np.ndarray, method: PriorCalibrationMethod, symmetric: bool,
                         held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The `held` rows calibrated by a fit on the other rows, (H, C), and the class shares of those other rows
    (C,) (A's and B's averaged when symmetric): the priors the held-out posteriors are calibrated under."""
    weights, bias = fit_scaled_bias(logits[~held], labels[~held], method, symmetric)
    return apply_vector_scaling(logits[held], weights, bias), _class_shares(labels[~held], logits.shape[1], symmetric)


def _class_shares(labels: np.ndarray, n_classes: int, symmetric: bool) -> np.ndarray:
    shares = np.bincount(labels, minlength=n_classes) / len(labels)
    return (shares + shares[list(SWAP_AB)]) / 2 if symmetric else shares


def _cross_validated_log_loss(logits: np.ndarray, labels: np.ndarray, method: PriorCalibrationMethod,
                              symmetric: bool, folds: np.ndarray) -> float:
    """Log loss of each fold's rows under the calibration fitted on the other folds, over all rows."""
    probs = np.empty_like(logits)
    for fold in np.unique(folds):
        probs[folds == fold] = _held_out_posteriors(logits, labels, method, symmetric, folds == fold)[0]
    return log_loss(probs, labels)


def held_out_prior_error(logits: np.ndarray, labels: np.ndarray, method: PriorCalibrationMethod,
                         symmetric: bool = True, n_folds: int = 5, repeats: int = 4, seed: int = 0) -> float:
    """How far calibration followed by EM misses the class shares of rows it did not see: the root mean square,
    over `repeats` random splits into `n_folds` folds, of the total variation distance between EM's estimate
    on a held-out fold (calibrated by a fit on the other folds, EM started from their shares, A and B tied when
    `symmetric`) and that fold's own class shares (A's and B's averaged when symmetric).

    The fold's labels are known, so every bit of this distance is error: the calibration's, and EM's sampling
    noise on a fold of N / n_folds rows. It does not see a shift of the texts, which the source cannot show.

    Raises:
        ValueError: EM drives a class prior to zero on a fold (a class too rare for these rows).
    """
    from app.priors import run_em  # app.priors imports this module

    logits, labels = check_logits_and_labels(logits, labels)
    logits = log_softmax(logits, axis=1)  # what `PriorCalibration.apply` scales
    rng = np.random.default_rng(seed)
    errors = []
    for _ in range(repeats):
        folds = rng.permutation(len(labels)) % n_folds
        for fold in range(n_folds):
            probs, train_shares = _held_out_posteriors(logits, labels, method, symmetric, folds == fold)
            try:
                estimate = run_em(probs, train_shares, tie_ab=symmetric).priors
            except ValueError as exc:
                raise ValueError(f"cannot measure the prior error of the calibration on held-out folds of "
                                 f"{len(labels)} rows ({exc}); calibrate on more rows") from None
            truth = _class_shares(labels[folds == fold], logits.shape[1], symmetric)
            errors.append(0.5 * np.abs(estimate - truth).sum())
    return float(np.sqrt(np.mean(np.square(errors))))


def fit_prior_calibration(logits: np.ndarray, labels: np.ndarray,
                          method: PriorCalibrationMethod | Literal["auto"] = "auto", symmetric: bool = True,
                          n_folds: int = 5, seed: int = 0, error_repeats: int = 4) -> PriorCalibration:
    """Fit the calibration class-prior adaptation needs on held-out logits (`PriorCalibration`), and measure
    its `prior_error` (`held_out_prior_error`, over `error_repeats` splits into `n_folds` folds).

    method="auto" takes vector scaling only where it helps: when its log loss, cross-validated over `n_folds`
    random folds of these rows, is below bias-corrected temperature scaling's; else "bcts".
    """
    logits, labels = check_logits_and_labels(logits, labels)
    logits = log_softmax(logits, axis=1)  # what `PriorCalibration.apply` scales
    if method not in ("bcts", "vector", "auto"):
        raise ValueError(f"method must be 'bcts', 'vector' or 'auto', got {method!r}")
    if error_repeats < 1 or n_folds < 2:
        raise ValueError(f"need error_repeats >= 1 and n_folds >= 2; got {error_repeats}, {n_folds}")
    if method == "auto":
        folds = np.random.default_rng(seed).permutation(len(labels)) % n_folds
        losses = {name: _cross_validated_log_loss(logits, labels, name, symmetric, folds)
                  for name in ("bcts", "vector")}
        method = "vector" if losses["vector"] < losses["bcts"] else "bcts"
    weights, bias = fit_scaled_bias(logits, labels, method, symmetric)
    return PriorCalibration(
        method=method, symmetric=symmetric, weights=tuple(map(float, weights)), bias=tuple(map(float, bias)),
        source_priors=tuple(map(float, _class_shares(labels, logits.shape[1], symmetric))), n_rows=len(labels),
        log_loss_before=log_loss(softmax(logits), labels),
        log_loss_after=log_loss(apply_vector_scaling(logits, weights, bias), labels),
        prior_error=held_out_prior_error(logits, labels, method, symmetric, n_folds, error_repeats, seed))
