import numpy as np
import pytest

from app.metrics import log_loss, softmax
from app.priors import class_frequencies, estimate_priors_em, reweight_to_priors, shift_priors

TRAIN_PRIORS = np.array([0.35, 0.35, 0.30])
TEST_PRIORS = np.array([0.49, 0.48, 0.03])
CLASS_MEANS = np.array([[1.5, 0.0], [-1.5, 0.0], [0.0, 1.5]])  # (C, 2) unit-variance Gaussian classes


def calibrated_posteriors(priors: np.ndarray, n_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn with class shares `priors`, and their exact posteriors under TRAIN_PRIORS."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n_rows, p=priors)
    features = CLASS_MEANS[labels] + rng.normal(size=(n_rows, 2))
    log_likelihood = -0.5 * ((features[:, None, :] - CLASS_MEANS[None]) ** 2).sum(axis=-1)  # (N, C)
    return softmax(log_likelihood + np.log(TRAIN_PRIORS)), labels


def test_em_recovers_a_shifted_prior_and_lowers_the_log_loss():
    probs, labels = calibrated_posteriors(TEST_PRIORS, 20_000, seed=0)
    priors, adjusted, n_iter = estimate_priors_em(probs, TRAIN_PRIORS)
    np.testing.assert_allclose(priors, TEST_PRIORS, atol=0.02)
    assert 1 < n_iter < 100
    np.testing.assert_allclose(adjusted, reweight_to_priors(probs, TRAIN_PRIORS, priors))
    assert log_loss(adjusted, labels) < log_loss(probs, labels) - 0.05


def test_em_on_unshifted_rows_stays_near_the_train_priors():
    probs, _ = calibrated_posteriors(TRAIN_PRIORS, 20_000, seed=1)
    priors, _, _ = estimate_priors_em(probs, TRAIN_PRIORS)
    np.testing.assert_allclose(priors, TRAIN_PRIORS, atol=0.02)


def test_em_warns_when_it_runs_out_of_iterations():
    probs, _ = calibrated_posteriors(TEST_PRIORS, 2000, seed=2)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, _, n_iter = estimate_priors_em(probs, TRAIN_PRIORS, max_iter=2)
    assert n_iter == 2


def test_reweighting_with_equal_priors_is_the_identity():
    probs = softmax(np.random.default_rng(3).normal(size=(50, 3)))
    np.testing.assert_allclose(reweight_to_priors(probs, TRAIN_PRIORS, TRAIN_PRIORS), probs, rtol=1e-12)


def test_reweighting_follows_bayes_rule():
    probs = np.array([[0.5, 0.3, 0.2]])
    adjusted = reweight_to_priors(probs, np.array([0.25, 0.25, 0.5]), np.array([0.5, 0.25, 0.25]))
    expected = np.array([0.5 * 2, 0.3 * 1, 0.2 * 0.5])
    np.testing.assert_allclose(adjusted[0], expected / expected.sum())


def test_bad_priors_and_probs_give_clear_errors():
    probs = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="target_priors must sum to 1"):
        reweight_to_priors(probs, TRAIN_PRIORS, np.array([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="train_priors must be positive"):
        reweight_to_priors(probs, np.array([0.5, 0.5, 0.0]), TRAIN_PRIORS)
    with pytest.raises(ValueError, match="train_priors must hold 3"):
        estimate_priors_em(probs, np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="not logits"):
        reweight_to_priors(np.array([[3.0, 1.0, -2.0]]), TRAIN_PRIORS, TRAIN_PRIORS)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        estimate_priors_em(np.array([[0.9, 0.9, 0.9]]), TRAIN_PRIORS)


def test_class_frequencies():
    np.testing.assert_allclose(class_frequencies(np.array([0, 0, 1, 2])), [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        class_frequencies(np.array([0, 3]))


def test_shift_priors_reweights_to_given_shares_or_estimates_them():
    probs, _ = calibrated_posteriors(np.array([0.4, 0.4, 0.2]), 500, seed=5)
    train = np.array([0.45, 0.45, 0.1])
    np.testing.assert_allclose(shift_priors(probs, train, (0.3, 0.3, 0.4)),
                               reweight_to_priors(probs, train, np.array([0.3, 0.3, 0.4])))
    np.testing.assert_allclose(shift_priors(probs, train, "em"), estimate_priors_em(probs, train)[1])
    with pytest.raises(ValueError, match="em"):
        shift_priors(probs, train, "uniform")


def test_predict_priors_need_the_training_shares_and_name_the_setting(tmp_path):
    from app.config import PredictConfig
    from app.ensemble import EnsembleMember, EnsembleReport, EnsembleSpec
    from app.prediction import with_predict_options

    spec = EnsembleSpec(members=(EnsembleMember(name="m", checkpoint="c", weight=1.0, temperature=1.0),), mode="prob",
                        report=EnsembleReport(n_rows=10, member_log_loss={"m": 1.0}, ensemble_log_loss=1.0))
    assert with_predict_options(spec, PredictConfig()) is spec
    with pytest.raises(ValueError, match="predict.train_priors"):
        with_predict_options(spec, PredictConfig(priors="em"))
    shifted = with_predict_options(spec, PredictConfig(priors="em", train_priors=(0.5, 0.4, 0.1)))
    assert shifted.priors == "em" and shifted.train_priors == (0.5, 0.4, 0.1)


def test_test_time_temperature_priors_and_smoothing_apply_in_order():
    from app.ensemble import finish_probabilities
    from app.metrics import softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3)) * 2
    probs = softmax(logits)
    np.testing.assert_allclose(finish_probabilities(probs), probs)
    np.testing.assert_allclose(finish_probabilities(probs, temperature=2.0), softmax(logits / 2.0), atol=1e-12)
    train = np.array([0.45, 0.45, 0.10])
    smoothed = finish_probabilities(probs, smoothing=0.2, train_priors=train)
    np.testing.assert_allclose(smoothed, 0.8 * probs + 0.2 * train)
    target = (0.3, 0.3, 0.4)
    shifted = finish_probabilities(probs, priors=target, train_priors=train, smoothing=0.1)
    np.testing.assert_allclose(shifted, 0.9 * shift_priors(probs, train, target) + 0.1 * np.array(target))
    np.testing.assert_allclose(shifted.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="train_priors"):
        finish_probabilities(probs, smoothing=0.1)


def test_predict_test_time_options_go_into_the_spec(tmp_path):
    from app.config import PredictConfig, load_config
    from app.ensemble import EnsembleMember, EnsembleReport, EnsembleSpec, apply_spec_to_member_logits
    from app.metrics import softmax
    from app.prediction import with_predict_options

    spec = EnsembleSpec(members=(EnsembleMember(name="m", checkpoint="c", weight=1.0, temperature=1.0),), mode="prob",
                        train_priors=(0.4, 0.4, 0.2),
                        report=EnsembleReport(n_rows=10, member_log_loss={"m": 1.0}, ensemble_log_loss=1.0))
    config = load_config(None, ["predict.temperature=1.5", "predict.smoothing=0.05", "predict.tta_combine=prob"]).predict
    tuned = with_predict_options(spec, config)
    assert (tuned.temperature, tuned.smoothing, tuned.priors) == (1.5, 0.05, None)
    logits = np.random.default_rng(1).normal(size=(20, 3))
    expected = 0.95 * softmax(logits / 1.5) + 0.05 * np.array([0.4, 0.4, 0.2])
    np.testing.assert_allclose(apply_spec_to_member_logits(tuned, [logits]), expected, atol=1e-12)
    bare = spec.model_copy(update={"train_priors": None})
    with pytest.raises(ValueError, match="predict.train_priors"):
        with_predict_options(bare, PredictConfig(smoothing=0.1))
    assert with_predict_options(bare, PredictConfig(temperature=2.0)).temperature == 2.0


def test_tta_views_combine_by_logits_or_probabilities():
    from app.metrics import combine_views, softmax

    plain, swapped = np.log([[0.9, 0.05, 0.05]]), np.log([[0.1, 0.45, 0.45]])
    np.testing.assert_allclose(softmax(combine_views(plain, swapped, "prob")), [[0.5, 0.25, 0.25]])
    geometric = np.sqrt([0.9 * 0.1, 0.05 * 0.45, 0.05 * 0.45])
    np.testing.assert_allclose(softmax(combine_views(plain, swapped, "logit")), [geometric / geometric.sum()])
    with pytest.raises(ValueError, match="logit"):
        combine_views(plain, swapped, "mean")
