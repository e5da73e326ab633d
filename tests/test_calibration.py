import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.calibration import (
    apply_temperature,
    apply_vector_scaling,
    expected_calibration_error,
    fit_calibration,
    fit_prior_calibration,
    fit_temperature,
    fit_vector_scaling,
    reliability_curve,
    reliability_diagram,
    smooth_probabilities,
)
from app.metrics import log_loss, softmax

ROOT = Path(__file__).resolve().parents[1]


def sample_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from that row's class probabilities."""
    return (rng.random(len(probs))[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)


def synthetic_logits(n_rows: int, seed: int, scale: float = 2.0) -> tuple[np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return scale * rng.normal(size=(n_rows, 3)), rng


@pytest.mark.parametrize("true_temperature", [2.0, 0.5])
def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with(true_temperature):
    logits, rng = synthetic_logits(20_000, seed=0)
    labels = sample_labels(softmax(logits / true_temperature), rng)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.05)


def test_fit_temperature_is_deterministic_and_minimises_the_log_loss():
    logits, rng = synthetic_logits(3000, seed=1)
    labels = sample_labels(softmax(logits / 1.5), rng)
    fitted = fit_temperature(logits, labels)
    assert fit_temperature(logits, labels) == fitted
    best = log_loss(apply_temperature(logits, fitted), labels)
    for nudge in (0.98, 1.02):
        assert log_loss(apply_temperature(logits, fitted * nudge), labels) > best


def test_fit_temperature_refuses_logits_without_signal():
    with pytest.raises(ValueError, match="search bound"):
        fit_temperature(np.zeros((100, 3)), np.arange(100) % 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vector_scaling_is_never_worse_than_temperature_on_its_rows(seed):
    logits, rng = synthetic_logits(4000, seed=seed)
    # a class-dependent miscalibration that one temperature cannot fix
    labels = sample_labels(softmax(logits * np.array([0.4, 0.8, 0.6]) + np.array([0.3, -0.2, 0.0])), rng)
    temperature_loss = log_loss(apply_temperature(logits, fit_temperature(logits, labels)), labels)
    weights, bias = fit_vector_scaling(logits, labels)
    vector_loss = log_loss(apply_vector_scaling(logits, weights, bias), labels)
    assert vector_loss <= temperature_loss + 1e-12
    assert vector_loss < temperature_loss - 1e-3  # and it helps when the classes are miscalibrated differently


def test_ece_is_small_for_calibrated_probs_and_large_for_overconfident_ones_and_calibration_lowers_it():
    logits, rng = synthetic_logits(50_000, seed=3, scale=1.5)
    labels = sample_labels(softmax(logits), rng)
    assert expected_calibration_error(softmax(logits), labels) < 0.02
    overconfident = 3.0 * logits
    ece_before = expected_calibration_error(softmax(overconfident), labels)
    assert ece_before > 0.1
    report = fit_calibration(overconfident, labels)
    assert report.ece_before == pytest.approx(ece_before)
    assert report.ece_after < 0.02 and report.log_loss_after < report.log_loss_before
    assert report.temperature == pytest.approx(3.0, rel=0.05)
    np.testing.assert_allclose(report.apply(overconfident), apply_temperature(overconfident, report.temperature))


def test_ece_definition_on_a_hand_worked_example():
    # two rows at confidence 0.9 (one right) and two at 0.6 (both right): bins of width 0.5
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 0, 0])
    confidence, accuracy, counts = reliability_curve(probs, labels, n_bins=2)
    np.testing.assert_allclose(confidence, [np.nan, 0.75])
    np.testing.assert_allclose(accuracy, [np.nan, 0.75])
    assert counts.tolist() == [0, 4]
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(expected)


def test_vector_report_records_its_parameters():
    logits, rng = synthetic_logits(2000, seed=4)
    labels = sample_labels(softmax(logits * 0.5), rng)
    report = fit_calibration(logits, labels, method="vector")
    assert report.method == "vector" and len(report.vector_weights) == 3 and len(report.vector_bias) == 3
    assert report.to_dict()["vector_weights"] == report.vector_weights


def test_reliability_diagram_writes_a_png(tmp_path):
    logits, rng = synthetic_logits(2000, seed=5)
    labels = sample_labels(softmax(logits), rng)
    path = reliability_diagram(softmax(3 * logits), softmax(logits), labels, tmp_path / "plots" / "reliability.png")
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoothing_moves_towards_the_prior_and_validates():
    probs = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    prior = np.array([0.5, 0.4, 0.1])
    smoothed = smooth_probabilities(probs, 0.1, prior)
    np.testing.assert_allclose(smoothed[0], [0.95, 0.04, 0.01])
    np.testing.assert_allclose(smoothed.sum(axis=1), 1.0)
    np.testing.assert_array_equal(smooth_probabilities(probs, 0.0, prior), probs)
    with pytest.raises(ValueError, match="alpha"):
        smooth_probabilities(probs, 1.5, prior)
    with pytest.raises(ValueError, match="prior"):
        smooth_probabilities(probs, 0.1, np.array([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="not logits"):
        smooth_probabilities(np.array([[2.0, -1.0, 0.5]]), 0.1, prior)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
        fit_temperature(np.zeros((4, 3)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0, 0]]), np.array([0]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        apply_temperature(np.zeros((1, 3)), 0.0)


def test_calibration_modules_import_no_heavy_dependencies():
    """Pure: numpy/scipy/pydantic only; matplotlib waits until a diagram is drawn."""
    code = ("import sys, app.calibration, app.priors, app.ensemble; "
            "heavy = {'torch', 'ray', 'matplotlib', 'pandas', 'pyarrow', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# Bias-corrected calibration for class-prior adaptation

SWAP = [1, 0, 2]


def biased_logits(n_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of an overconfident model with a tie bias, and labels drawn from the calibrated posteriors
    softmax(logits / 2.5 + [0, 0, 0.8]) (A and B symmetric)."""
    logits, rng = synthetic_logits(n_rows, seed, scale=4.0)
    return logits, sample_labels(softmax(logits / 2.5 + np.array([0.0, 0.0, 0.8])), rng)


def test_bcts_recovers_the_temperature_and_tie_bias_labels_were_drawn_with():
    logits, labels = biased_logits(30_000, seed=10)
    calibration = fit_prior_calibration(logits, labels, method="bcts")
    assert calibration.weights[0] == pytest.approx(1 / 2.5, rel=0.05)
    assert calibration.bias[2] - calibration.bias[0] == pytest.approx(0.8, abs=0.08)
    assert calibration.log_loss_after < calibration.log_loss_before - 0.05
    # a temperature alone cannot remove the tie bias
    temperature_only = log_loss(apply_temperature(logits, fit_temperature(logits, labels)), labels)
    assert calibration.log_loss_after < temperature_only - 0.005


def test_prior_calibration_is_the_same_for_logits_and_their_log_probabilities():
    logits, labels = biased_logits(5000, seed=11)
    offsets = np.random.default_rng(0).normal(size=(len(logits), 1)) * 5  # a per-row shift softmax ignores
    for method in ("bcts", "vector"):
        calibration = fit_prior_calibration(logits, labels, method=method)
        np.testing.assert_allclose(calibration.apply(logits + offsets), calibration.apply(logits), atol=1e-12)
        np.testing.assert_allclose(fit_prior_calibration(logits + offsets, labels, method=method).weights,
                                   calibration.weights, rtol=1e-5)


@pytest.mark.parametrize("method", ["bcts", "vector"])
def test_symmetric_prior_calibration_commutes_with_swapping_a_and_b(method):
    logits, labels = biased_logits(4000, seed=12)
    calibration = fit_prior_calibration(logits, labels, method=method)
    assert calibration.weights[0] == calibration.weights[1] and calibration.bias[0] == calibration.bias[1]
    assert calibration.source_priors[0] == calibration.source_priors[1]
    np.testing.assert_allclose(calibration.apply(logits[:, SWAP]), calibration.apply(logits)[:, SWAP], atol=1e-12)
    swapped = fit_prior_calibration(logits[:, SWAP], np.array(SWAP)[labels], method=method)
    np.testing.assert_allclose(swapped.weights, calibration.weights, rtol=1e-5)
    np.testing.assert_allclose(swapped.bias, calibration.bias, atol=1e-5)
    asymmetric = fit_prior_calibration(logits, labels, method=method, symmetric=False)
    assert asymmetric.bias[0] != asymmetric.bias[1] and asymmetric.log_loss_after <= calibration.log_loss_after


def test_auto_takes_vector_scaling_only_where_it_helps():
    logits, rng = synthetic_logits(20_000, seed=13, scale=3.0)
    # A and B scaled alike, tie scaled apart: only vector scaling can fit it
    labels = sample_labels(softmax(logits * np.array([0.3, 0.3, 0.9]) + np.array([0.0, 0.0, 0.5])), rng)
    assert fit_prior_calibration(logits, labels).method == "vector"
    logits, labels = biased_logits(20_000, seed=14)  # within bias-corrected temperature scaling
    assert fit_prior_calibration(logits, labels).method == "bcts"
