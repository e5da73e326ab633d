import numpy as np
import pytest
from sklearn.metrics import log_loss as sklearn_log_loss

from app.metrics import accuracy, log_loss, softmax


def test_log_loss_matches_scikit_learn():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(size=(200, 3)))
    labels = rng.integers(0, 3, 200)
    assert log_loss(probs, labels) == pytest.approx(sklearn_log_loss(labels, probs, labels=[0, 1, 2]), rel=1e-9)


def test_uniform_prediction_scores_ln3():
    assert log_loss(np.full((5, 3), 1 / 3), np.array([0, 1, 2, 0, 1])) == pytest.approx(np.log(3))


def test_zero_probability_is_clipped_not_infinite():
    value = log_loss(np.array([[1.0, 0.0, 0.0]]), np.array([1]))
    assert np.isfinite(value) and value == pytest.approx(-np.log(np.finfo(np.float64).eps), rel=1e-6)


def test_rows_are_renormalised():
    assert log_loss(np.array([[2.0, 1.0, 1.0]]), np.array([0])) == pytest.approx(np.log(2))


def test_accuracy_and_shape_check():
    assert accuracy(np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]), np.array([0, 1])) == 0.5
    with pytest.raises(ValueError):
        log_loss(np.ones((2, 3)), np.array([0]))
