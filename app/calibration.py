"""Post-hoc calibration of class logits: temperature and vector scaling, ECE, reliability diagrams, smoothing.

Everything here fits on held-out (validation or out-of-fold) logits and is numpy/scipy only; matplotlib is
imported inside `reliability_diagram` and nowhere else. Classes are in `app.data.LABEL_COLUMNS` order.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
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
