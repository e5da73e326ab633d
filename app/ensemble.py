"""Ensembles of finetuned members: simplex weights fitted on out-of-fold logits, a JSON spec, and its application.

`apply_spec` (and `apply_spec_to_member_logits`, its probabilities only) is the one function batch prediction
and the Serve app call: members' logits in, the ensemble's class probabilities (A, B, tie;
`app.data.LABEL_COLUMNS` order) and the record of any class-prior shift out. numpy, scipy and pydantic only (and
app/storage.py for the spec file, a local path or a URI such as s3://...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import scipy
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from scipy.optimize import minimize
from scipy.special import logsumexp

from app.calibration import PriorCalibration, check_logits_and_labels, fit_prior_calibration, fit_temperature
from app.metrics import log_loss, softmax
from app.priors import (
    EMSettings, PriorShift, adapt_priors_calibrated, check_priors, class_frequencies, reweight_to_priors,
    shift_priors_em)

CombineMode = Literal["prob", "logit"]
EstimatedPriors = Literal["em", "calibrated_em"]
ESTIMATED_PRIORS = ("em", "calibrated_em")
N_CLASSES = 3
WEIGHT_SUM_TOLERANCE = 1e-6


def _scaled_member_logits(
    member_logits: Sequence[np.ndarray], temperatures: Sequence[float] | np.ndarray | None
) -> np.ndarray:
    """Stack members' logits divided by their temperatures: (M, N, C) float64."""
    if len(member_logits) == 0:
        raise ValueError("an ensemble needs at least one member's logits")
    shapes = [np.shape(logits) for logits in member_logits]
    if len(set(shapes)) != 1 or len(shapes[0]) != 2:
        raise ValueError(f"every member's logits must be (N, C) with the same N and C; got shapes {shapes}")
    stacked = np.stack([np.asarray(logits, dtype=np.float64) for logits in member_logits])  # (M, N, C)
    if not np.all(np.isfinite(stacked)):
        bad = [i for i in range(len(stacked)) if not np.all(np.isfinite(stacked[i]))]
        raise ValueError(f"logits of member(s) {bad} contain NaN or inf")
    temperatures = np.ones(len(stacked)) if temperatures is None else np.asarray(temperatures, dtype=np.float64)
    if temperatures.shape != (len(stacked),) or not np.all(temperatures > 0):
        raise ValueError(f"need one temperature > 0 per member ({len(stacked)}); "
                         f"got {np.asarray(temperatures).tolist()}")
    return stacked / temperatures[:, None, None]


def _check_weights(weights: Sequence[float] | np.ndarray, n_members: int) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n_members,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"weights must be {n_members} finite non-negative numbers; got {weights.tolist()}")
    if abs(weights.sum() - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"weights must sum to 1 within {WEIGHT_SUM_TOLERANCE}; {weights.tolist()} sums to "
                         f"{weights.sum():.8g}")
    return weights


def _combine_scaled(scaled: np.ndarray, weights: np.ndarray, mode: CombineMode) -> np.ndarray:
    if mode == "prob":
        return np.tensordot(weights, np.stack([softmax(member) for member in scaled]), axes=1)
    if mode == "logit":
        return softmax(np.tensordot(weights, scaled, axes=1))
    raise ValueError(f"mode must be 'prob' or 'logit', got {mode!r}")


def combine(
    member_logits: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    mode: CombineMode,
    temperatures: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Ensemble probabilities (N, C) from members' (N, C) logits.

    mode="prob":  sum_m w_m * softmax(z_m / T_m)   (probability averaging)
    mode="logit": softmax(sum_m w_m * z_m / T_m)   (logit averaging)
    Weights must be non-negative and sum to 1; temperatures default to 1.
    """
    scaled = _scaled_member_logits(member_logits, temperatures)
    return _combine_scaled(scaled, _check_weights(weights, len(scaled)), mode)


def _weights_objective(weights: np.ndarray, scaled: np.ndarray, labels: np.ndarray, mode: CombineMode,
                       true_probs: np.ndarray | None) -> tuple[float, np.ndarray]:
    """Mean NLL of the combined prediction and its gradient in the weights; both modes are convex in them."""
    n_rows = len(labels)
    if mode == "prob":
        mixture = np.maximum(weights @ true_probs, np.finfo(np.float64).tiny)  # (N,) p(true class)
        return float(-np.mean(np.log(mixture))), -(true_probs / mixture).mean(axis=1)
    combined = np.tensordot(weights, scaled, axes=1)  # (N, C)
    loss = np.mean(logsumexp(combined, axis=1) - combined[np.arange(n_rows), labels])
    residual = softmax(combined)
    residual[np.arange(n_rows), labels] -= 1.0
    return float(loss), np.einsum("mnc,nc->m", scaled, residual) / n_rows


def fit_weights(
    member_logits: Sequence[np.ndarray],
    labels: np.ndarray,
    mode: CombineMode,
    temperatures: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Fit the weights (M,) on the simplex that minimise the log loss of `combine(..., mode, temperatures)`.

    Fit on out-of-fold logits. The log loss is convex in the weights in both modes, so SLSQP with the
    simplex constraints, started from equal weights, reaches the global minimum deterministically; members
    that do not help get weight exactly 0.

    Raises:
        ValueError: bad shapes or temperatures. RuntimeError: the optimizer failed (its message is included).
    """
    if mode not in ("prob", "logit"):
        raise ValueError(f"mode must be 'prob' or 'logit', got {mode!r}")
    scaled = _scaled_member_logits(member_logits, temperatures)
    _, labels = check_logits_and_labels(scaled[0], labels)
    n_members = len(scaled)
    if n_members == 1:
        return np.ones(1)
    true_probs = None
    if mode == "prob":
        true_probs = np.stack([softmax(member)[np.arange(len(labels)), labels] for member in scaled])  # (M, N)
    result = minimize(
        _weights_objective, np.full(n_members, 1.0 / n_members), args=(scaled, labels, mode, true_probs),
        jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * n_members,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    if not result.success:
        raise RuntimeError(f"fitting ensemble weights failed: {result.message}")
    # SLSQP leaves round-off (~1e-16, either sign) on members it drops; make those exact zeros
    weights = np.where(result.x > 1e-12, result.x, 0.0)
    return weights / weights.sum()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _validate_priors_value(value: Any, name: str, allow_em: bool) -> Any:
    """None, "em" / "calibrated_em" (where allowed) or three positive class probabilities summing to 1, as a tuple."""
    if value is None or (allow_em and value in ESTIMATED_PRIORS):
        return value
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        allowed = 'null, "em" or [pA, pB, pTie], or "calibrated_em"' if allow_em else "null or [pA, pB, pTie]"
        raise ValueError(f"must be {allowed}; got {value!r}")
    return tuple(float(v) for v in check_priors(value, N_CLASSES, name))


class EnsembleMember(_Strict):
    """One finetuned model of the ensemble."""

    name: str = Field(min_length=1)
    checkpoint: str = Field(min_length=1, description="checkpoint folder or URI the member's logits come from")
    weight: float = Field(ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0, description="the member's logits are divided by this before combining")


class EnsembleReport(_Strict):
    """Log loss on the rows the ensemble was fitted on (out-of-fold), before any class-prior adjustment."""

    n_rows: int = Field(ge=1)
    member_log_loss: dict[str, float] = Field(description="each member at its temperature, by name")
    ensemble_log_loss: float


class EnsembleSpec(_Strict):
    """Everything needed to turn members' logits into ensemble probabilities; saved as JSON beside them."""

    spec_version: Literal[1] = 1
    members: tuple[EnsembleMember, ...] = Field(min_length=1)
    mode: CombineMode
    priors: EstimatedPriors | tuple[float, float, float] | None = Field(
        None, description='class-prior shift after combining: null = none, "em" = estimate on each batch (plain '
                          'EM), "calibrated_em" = calibrate by prior_calibration, estimate with A and B tied, and '
                          'keep the shift only where the data supports it, [pA, pB, pTie] = re-weight to these')
    train_priors: tuple[float, float, float] | None = Field(None, description="class shares of the training labels")
    prior_calibration: PriorCalibration | None = Field(
        None, description="bias-corrected calibration of the combined out-of-fold probabilities, which "
                          "calibrated_em applies before EM (fitted by fit_ensemble)")
    em: EMSettings = Field(EMSettings(), description="EM's stop and calibrated_em's safeguard")
    temperature: float = Field(1.0, gt=0, description="test-time temperature on the combined probabilities, before "
                                                       "the prior shift (members keep their own)")
    smoothing: float = Field(0.0, ge=0, lt=1, description="last: (1 - s) * p + s * prior (priors when fixed, the "
                                                          "estimate under em, else train_priors)")
    member_dirs: dict[str, str] | None = Field(
        None, description="each member's out-of-fold folder (jobs/cv.py), by member name (a fold model's name "
                          "up to '/'): the spec's out-of-fold logits, e.g. for a distillation teacher")
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: AwareDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    report: EnsembleReport

    @field_validator("members")
    @classmethod
    def _weights_and_names(cls, members: tuple[EnsembleMember, ...]) -> tuple[EnsembleMember, ...]:
        names = [member.name for member in members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique; got {names}")
        total = sum(member.weight for member in members)
        if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
            raise ValueError(f"the members' weights must sum to 1 within {WEIGHT_SUM_TOLERANCE}; they sum to {total!r}")
        return members

    @field_validator("priors", mode="before")
    @classmethod
    def _priors(cls, value: Any) -> Any:
        return _validate_priors_value(value, "priors", allow_em=True)

    @field_validator("train_priors", mode="before")
    @classmethod
    def _train_priors(cls, value: Any) -> Any:
        return _validate_priors_value(value, "train_priors", allow_em=False)

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleSpec:
        if self.priors is not None and self.train_priors is None:
            raise ValueError("train_priors: required when priors is set (the class shares the members were trained on)")
        if self.priors == "calibrated_em" and self.prior_calibration is None:
            raise ValueError("prior_calibration: required when priors is calibrated_em; this spec predates it: "
                             "fit the ensemble again with jobs.ensemble (it fits one on the out-of-fold logits)")
        if self.smoothing and self.priors is None and self.train_priors is None:
            raise ValueError("train_priors: required when smoothing is set without fixed priors (the shares to smooth "
                             "toward)")
        names = {member.name for member in self.members}
        if set(self.report.member_log_loss) != names:
            raise ValueError(f"report.member_log_loss: must have one entry per member {sorted(names)}; got "
                             f"{sorted(self.report.member_log_loss)}")
        groups = {member_group(name) for name in names}
        if self.member_dirs is not None and set(self.member_dirs) != groups:
            raise ValueError(f"member_dirs: must have one folder per member {sorted(groups)}; got "
                             f"{sorted(self.member_dirs)}")
        return self


def member_group(name: str) -> str:
    """The out-of-fold member a spec member belongs to: `minilm` for the fold model `minilm/fold0`."""
    return name.split("/")[0]


class EnsembleSpecError(ValueError):
    """An ensemble spec file is invalid; the message names the JSON path of each bad value."""


def _json_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    return path or "(top level)"


def save_spec(spec: EnsembleSpec, path: str | os.PathLike[str]) -> str:
    """Write the spec as indented JSON to a local path or a URI (never seen half-written); returns the path."""
    from app import storage  # pyarrow: imported when a spec is written or read, not with the combining code

    path = os.fspath(path)
    storage.write_text(path, spec.model_dump_json(indent=2) + "\n")
    return path


def load_spec(path: str | os.PathLike[str]) -> EnsembleSpec:
    """Read and validate a spec file (strict JSON types, unknown keys refused).

    Raises:
        EnsembleSpecError: missing file, bad JSON, or invalid values, each named by JSON path
            (e.g. `members[1].weight`).
    """
    from app import storage

    try:
        text = storage.read_text(os.fspath(path))
    except FileNotFoundError:
        raise EnsembleSpecError(f"ensemble spec not found: {path}") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise EnsembleSpecError(f"ensemble spec {path} is not valid JSON: {exc}") from None
    try:
        return EnsembleSpec.model_validate_json(text, strict=True)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key; remove it (see EnsembleSpec for the known keys)"
            lines.append(f"  {_json_path(error['loc'])}: {message}")
        raise EnsembleSpecError(f"invalid ensemble spec {path}:\n" + "\n".join(lines)) from None


def _ordered_member_logits(
    spec: EnsembleSpec, member_logits: Sequence[np.ndarray] | Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    names = [member.name for member in spec.members]
    if isinstance(member_logits, Mapping):
        if set(member_logits) != set(names):
            raise ValueError(f"member logits are for {sorted(member_logits)}; the spec's members are {sorted(names)}")
        return [member_logits[name] for name in names]
    if len(member_logits) != len(names):
        raise ValueError(f"got logits of {len(member_logits)} members; the spec has {len(names)}: {names}")
    return list(member_logits)


def apply_spec(
    spec: EnsembleSpec, member_logits: Sequence[np.ndarray] | Mapping[str, np.ndarray]
) -> tuple[np.ndarray, PriorShift | None]:
    """The ensemble's probabilities (N, 3) for members' (N, 3) logits, and the record of its class-prior shift
    (None without one): combine, then the test-time steps of `finish_probabilities`.

    `member_logits` is a list in the spec's member order or a mapping by member name. Combining uses each
    member's temperature and weight and the spec's mode. Then priors=[pA, pB, pTie] re-weights to those
    priors, and "em" / "calibrated_em" estimate them on these rows (pass a whole test set, not one request).
    """
    ordered = _ordered_member_logits(spec, member_logits)
    probs = combine(ordered, [m.weight for m in spec.members], spec.mode, [m.temperature for m in spec.members])
    return finish_with_record(probs, spec.temperature, spec.priors, spec.train_priors, spec.smoothing,
                              spec.prior_calibration, spec.em)


def apply_spec_to_member_logits(
    spec: EnsembleSpec, member_logits: Sequence[np.ndarray] | Mapping[str, np.ndarray]
) -> np.ndarray:
    """The ensemble's probabilities (N, 3) for members' (N, 3) logits (`apply_spec` without its record)."""
    return apply_spec(spec, member_logits)[0]


def finish_with_record(probs: np.ndarray, temperature: float = 1.0,
                       priors: EstimatedPriors | Sequence[float] | None = None,
                       train_priors: Sequence[float] | None = None, smoothing: float = 0.0,
                       calibration: PriorCalibration | None = None,
                       em: EMSettings = EMSettings()) -> tuple[np.ndarray, PriorShift | None]:
    """The test-time steps after combining, in order: temperature (softmax(log p / T)), class-prior shift
    (to fixed shares; to shares estimated by EM on these rows; or, "calibrated_em", calibrated by `calibration`
    and estimated with the safeguard of `app.priors.adapt_priors_calibrated`), then smoothing toward the prior
    (the fixed priors, the estimate applied, or the training shares). (N, 3) in and out, and the record of
    the prior shift (None without one).

    Raises:
        ValueError: a prior shift or smoothing without the class shares or calibration it needs.
    """
    if temperature != 1.0:
        probs = softmax(np.log(np.maximum(probs, np.finfo(np.float64).tiny)) / temperature)
    record = None
    if priors is not None:
        if train_priors is None:
            raise ValueError("a class-prior shift needs the class shares the model was trained on (train_priors)")
        if priors == "calibrated_em":
            if calibration is None:
                raise ValueError("priors=calibrated_em needs the calibration fitted on out-of-fold logits: use an "
                                 "ensemble spec from jobs.ensemble or a checkpoint from jobs.cv")
            probs, record = adapt_priors_calibrated(probs, calibration, em)
        elif priors == "em":
            probs, record = shift_priors_em(probs, train_priors, em)
        else:
            probs = reweight_to_priors(probs, np.asarray(train_priors), np.asarray(priors))
            record = PriorShift(method="fixed", n_rows=len(probs), train_priors=tuple(map(float, train_priors)),
                                applied_priors=tuple(map(float, priors)), reason="given priors")
    if smoothing:
        if priors == "em":
            target = probs.mean(axis=0)
        else:  # fixed priors, calibrated_em's estimate when applied, else the training shares
            target = train_priors if record is None or record.applied_priors is None else record.applied_priors
        if target is None:
            raise ValueError("smoothing toward the prior needs class shares: give priors or train_priors")
        probs = (1.0 - smoothing) * probs + smoothing * np.asarray(target, dtype=np.float64)
    return probs, record


def finish_probabilities(probs: np.ndarray, temperature: float = 1.0,
                         priors: EstimatedPriors | Sequence[float] | None = None,
                         train_priors: Sequence[float] | None = None, smoothing: float = 0.0,
                         calibration: PriorCalibration | None = None, em: EMSettings = EMSettings()) -> np.ndarray:
    """`finish_with_record`'s probabilities only."""
    return finish_with_record(probs, temperature, priors, train_priors, smoothing, calibration, em)[0]


def fit_ensemble(
    member_logits: Mapping[str, np.ndarray],
    checkpoints: Mapping[str, str],
    labels: np.ndarray,
    mode: CombineMode,
    fit_temperatures: bool = True,
    priors: EstimatedPriors | Sequence[float] | None = None,
    train_priors: Sequence[float] | None = None,
    versions: Mapping[str, str] | None = None,
) -> EnsembleSpec:
    """Build a spec from members' out-of-fold logits: a temperature per member, simplex weights, and the
    calibration of the combined probabilities that priors="calibrated_em" needs.

    Args:
        member_logits: (N, 3) out-of-fold logits by member name, all for the same rows in the same order.
        checkpoints: the checkpoint each member's logits came from, by name.
        labels: (N,) true classes of those rows.
        priors: the spec's class-prior setting (see `apply_spec_to_member_logits`).
        train_priors: class shares of the members' training labels; defaults to those of `labels`.
        versions: package versions to record (numpy's and scipy's are added).
    """
    if set(checkpoints) != set(member_logits):
        raise ValueError(f"checkpoints are given for {sorted(checkpoints)} but logits for {sorted(member_logits)}")
    names = list(member_logits)
    logits = [check_logits_and_labels(member_logits[name], labels)[0] for name in names]
    labels = check_logits_and_labels(logits[0], labels)[1]
    if logits[0].shape[1] != N_CLASSES:
        raise ValueError(f"ensembles are of {N_CLASSES}-class models; got {logits[0].shape[1]} classes")
    temperatures = [1.0] * len(names)
    for index, name in enumerate(names if fit_temperatures else ()):
        try:
            temperatures[index] = fit_temperature(logits[index], labels)
        except ValueError as exc:
            raise ValueError(f"member '{name}': {exc}") from None
    weights = fit_weights(logits, labels, mode, temperatures)
    combined = combine(logits, weights, mode, temperatures)
    report = EnsembleReport(
        n_rows=len(labels),
        member_log_loss={name: log_loss(softmax(z / t), labels) for name, z, t in zip(names, logits, temperatures)},
        ensemble_log_loss=log_loss(combined, labels),
    )
    members = [EnsembleMember(name=name, checkpoint=checkpoints[name], weight=float(w), temperature=t)
               for name, w, t in zip(names, weights, temperatures)]
    return EnsembleSpec(
        members=members, mode=mode, priors=priors,
        prior_calibration=fit_prior_calibration(np.log(np.maximum(combined, np.finfo(np.float64).tiny)), labels),
        train_priors=tuple(train_priors) if train_priors is not None else tuple(class_frequencies(labels).tolist()),
        versions={"numpy": np.__version__, "scipy": scipy.__version__, **(versions or {})},
        report=report,
    )
