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


# ---------------------------------------------------------------------------------------------------------
# Calibrated EM: calibration, A/B symmetry, the safeguard and the record of what was applied

SOURCE_PRIORS = np.array([0.485, 0.485, 0.03])  # about this project's data: ties are rare
TARGET_PRIORS = np.array([0.35, 0.35, 0.30])  # about Kaggle's competition data
SWAP = [1, 0, 2]


def miscalibrated_logits(priors: np.ndarray, n_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn with class shares `priors`, scored by an overconfident model with a tie bias: its logits are
    2.5 x the exact log-posteriors under SOURCE_PRIORS, minus 1 on the tie (a bias-corrected temperature of
    2.5 and a tie bias of +0.4 calibrate them exactly)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n_rows, p=priors)
    features = CLASS_MEANS[labels] + rng.normal(size=(n_rows, 2))
    log_likelihood = -0.5 * ((features[:, None, :] - CLASS_MEANS[None]) ** 2).sum(axis=-1)  # (N, C)
    return 2.5 * (log_likelihood + np.log(SOURCE_PRIORS)) + np.array([0.0, 0.0, -1.0]), labels


@pytest.fixture(scope="module")
def source_calibration():
    from app.calibration import fit_prior_calibration

    logits, labels = miscalibrated_logits(SOURCE_PRIORS, 20_000, seed=20)  # the out-of-fold rows
    return fit_prior_calibration(logits, labels), class_frequencies(labels)


def test_calibration_then_em_recovers_the_priors_that_plain_em_misses(source_calibration):
    from app.priors import adapt_priors_calibrated, run_em

    calibration, train_priors = source_calibration
    logits, labels = miscalibrated_logits(TARGET_PRIORS, 20_000, seed=21)
    probs = softmax(logits)
    plain = run_em(probs, train_priors)
    assert plain.converged and np.max(np.abs(plain.priors - TARGET_PRIORS)) > 0.05
    adapted, record = adapt_priors_calibrated(probs, calibration)
    assert not record.fallback and record.converged and record.method == "calibrated_em"
    np.testing.assert_allclose(record.applied_priors, TARGET_PRIORS, atol=0.02)
    assert log_loss(adapted, labels) < log_loss(reweight_to_priors(probs, train_priors, plain.priors), labels) - 0.1
    assert log_loss(adapted, labels) < log_loss(probs, labels) - 0.1


def test_calibrated_em_is_symmetric_in_a_and_b(source_calibration):
    from app.calibration import fit_prior_calibration
    from app.priors import EMSettings, adapt_priors_calibrated

    calibration, _ = source_calibration
    # a target where A wins more often than B: the tie share must not depend on which response is shown first
    logits, _ = miscalibrated_logits(np.array([0.45, 0.30, 0.25]), 5000, seed=22)
    probs = softmax(logits)
    adapted, record = adapt_priors_calibrated(probs, calibration)
    adapted_swapped, record_swapped = adapt_priors_calibrated(probs[:, SWAP], calibration)
    assert record.applied_priors[0] == record.applied_priors[1]  # A and B tied
    assert record_swapped.estimated_priors[2] == pytest.approx(record.estimated_priors[2], abs=1e-12)
    np.testing.assert_allclose(adapted_swapped, adapted[:, SWAP], atol=1e-12)
    # unless asked otherwise: untied, A gets the larger share (with an untied calibration too)
    untied_calibration = fit_prior_calibration(*miscalibrated_logits(SOURCE_PRIORS, 20_000, seed=20), symmetric=False)
    _, untied = adapt_priors_calibrated(probs, untied_calibration, EMSettings(tie_ab=False))
    assert untied.applied_priors[0] > untied.applied_priors[1] + 0.05


def test_the_safeguard_falls_back_to_the_unadjusted_prediction_when_the_shift_is_noise(source_calibration):
    from app.priors import EMSettings, adapt_priors_calibrated

    calibration, _ = source_calibration
    logits, _ = miscalibrated_logits(SOURCE_PRIORS, 5000, seed=23)  # no shift at all
    probs = softmax(logits)
    # the bootstrap alone (no minimum shift, which would refuse this estimate first)
    bootstrap_only = EMSettings(min_shift=0)
    adapted, record = adapt_priors_calibrated(probs, calibration, bootstrap_only)
    assert record.fallback and record.applied_priors is None and record.converged
    assert record.gain_lower_bound <= 0 < record.log_likelihood_gain and "bootstrap noise" in record.reason
    np.testing.assert_array_equal(adapted, probs)
    assert "unadjusted" in record.summary()
    # without the safeguard the (noise) estimate is applied
    unguarded, record = adapt_priors_calibrated(probs, calibration, EMSettings(safeguard_resamples=0, min_shift=0))
    assert not record.fallback and record.gain_lower_bound is None and np.abs(unguarded - probs).max() > 1e-3
    # too few rows to estimate anything
    few, record = adapt_priors_calibrated(probs[:20], calibration)
    assert record.fallback and "fewer than the 50" in record.reason and record.estimated_priors is None
    np.testing.assert_array_equal(few, probs[:20])


def test_the_calibration_stores_the_prior_error_em_makes_on_held_out_rows(source_calibration):
    from app.calibration import fit_prior_calibration, held_out_prior_error

    calibration, _ = source_calibration
    logits, labels = miscalibrated_logits(SOURCE_PRIORS, 20_000, seed=20)  # the rows it was fitted on
    assert calibration.prior_error == pytest.approx(held_out_prior_error(logits, labels, calibration.method), rel=1e-6)
    assert 0.001 < calibration.prior_error < 0.02  # 4,000-row folds with 3% ties: a few thousandths
    # fewer rows, noisier estimates on their held-out folds: a larger error
    assert fit_prior_calibration(logits[:2000], labels[:2000]).prior_error > 2 * calibration.prior_error


def test_a_small_estimated_shift_is_left_unapplied_even_when_the_bootstrap_finds_it(source_calibration):
    from app.priors import EMSettings, adapt_priors_calibrated, total_variation

    calibration, _ = source_calibration
    # a real but small shift (ties 3% -> 4%) on many rows: significant, but no larger than the calibration's error
    logits, _ = miscalibrated_logits(np.array([0.48, 0.48, 0.04]), 80_000, seed=30)
    probs = softmax(logits)
    adapted, record = adapt_priors_calibrated(probs, calibration)
    assert record.min_shift == pytest.approx(2 * 1.6449 * calibration.prior_error, rel=1e-4)  # alpha 0.05
    assert record.shift == pytest.approx(total_variation(record.estimated_priors, calibration.source_priors))
    assert record.converged and 0 < record.shift < record.min_shift
    assert record.fallback and record.applied_priors is None and "below the minimum" in record.reason
    assert "held-out prior error" in record.reason
    np.testing.assert_array_equal(adapted, probs)
    # the same estimate passes the bootstrap: the minimum shift alone refused it
    _, without_minimum = adapt_priors_calibrated(probs, calibration, EMSettings(min_shift=0))
    assert not without_minimum.fallback and without_minimum.gain_lower_bound > 0
    assert without_minimum.estimated_priors == record.estimated_priors
    # a minimum given as a number is used as given, and named
    _, given = adapt_priors_calibrated(probs, calibration, EMSettings(min_shift=0.05))
    assert given.fallback and given.min_shift == 0.05 and "predict.em_min_shift" in given.reason
    # a stricter safeguard_alpha asks for a larger shift
    assert adapt_priors_calibrated(probs, calibration, EMSettings(safeguard_alpha=0.01))[1].min_shift == \
        pytest.approx(2 * 2.3263 * calibration.prior_error, rel=1e-4)
    assert not adapt_priors_calibrated(probs, calibration, EMSettings(min_shift=record.shift / 2))[1].fallback


def test_a_large_real_shift_is_still_adapted(source_calibration):
    from app.priors import adapt_priors_calibrated

    calibration, _ = source_calibration
    logits, labels = miscalibrated_logits(TARGET_PRIORS, 3000, seed=31)
    probs = softmax(logits)
    adapted, record = adapt_priors_calibrated(probs, calibration)
    assert not record.fallback and record.shift > 5 * record.min_shift > 0
    assert f"shift {record.shift:.3f} >= minimum {record.min_shift:.3f}" in record.reason
    np.testing.assert_allclose(record.applied_priors, TARGET_PRIORS, atol=0.03)
    assert log_loss(adapted, labels) < log_loss(probs, labels) - 0.1


def test_a_calibration_stored_without_its_prior_error_applies_no_minimum_and_says_so(source_calibration):
    from app.priors import EMSettings, adapt_priors_calibrated

    calibration, _ = source_calibration
    old = calibration.model_copy(update={"prior_error": None})  # stored before the error was measured
    probs = softmax(miscalibrated_logits(np.array([0.48, 0.48, 0.04]), 80_000, seed=30)[0])
    _, record = adapt_priors_calibrated(probs, old)
    assert not record.fallback and record.min_shift is None and "no minimum shift" in record.reason
    _, record = adapt_priors_calibrated(probs, old, EMSettings(min_shift=0.05))
    assert record.fallback and record.min_shift == 0.05


def test_predict_em_min_shift_reaches_the_settings():
    from app.config import load_config
    from app.prediction import em_settings
    from app.priors import EMSettings

    assert em_settings(load_config(None, []).predict).min_shift == "auto"
    assert em_settings(load_config(None, ["predict.em_min_shift=0.02"]).predict).min_shift == 0.02
    base = EMSettings(min_shift=0.03)  # a spec's own setting stays unless predict.em_min_shift is set
    assert em_settings(load_config(None, []).predict, base).min_shift == 0.03
    assert em_settings(load_config(None, ["predict.em_min_shift=auto"]).predict, base).min_shift == "auto"
    with pytest.raises(ValueError, match="em_min_shift"):
        load_config(None, ["predict.em_min_shift=1.5"])


def test_non_convergence_is_reported_and_calibrated_em_then_falls_back(source_calibration):
    from app.priors import EMSettings, adapt_priors_calibrated, shift_priors_em

    calibration, train_priors = source_calibration
    probs = softmax(miscalibrated_logits(TARGET_PRIORS, 3000, seed=24)[0])
    adapted, record = adapt_priors_calibrated(probs, calibration, EMSettings(max_iter=3))
    assert record.fallback and record.converged is False and record.n_iter == 3
    assert "did not converge in 3 iterations" in record.reason and record.estimated_priors is not None
    np.testing.assert_array_equal(adapted, probs)
    with pytest.warns(RuntimeWarning, match="did not converge"):  # plain em applies its last estimate, flagged
        _, plain = shift_priors_em(probs, train_priors, EMSettings(max_iter=3))
    assert plain.converged is False and not plain.fallback and plain.applied_priors == plain.estimated_priors
    assert "without converging" in plain.reason


def test_tied_em_is_em_on_the_rows_and_their_swapped_copies():
    from app.priors import run_em

    probs, _ = calibrated_posteriors(np.array([0.5, 0.2, 0.3]), 3000, seed=25)
    tied = run_em(probs, TRAIN_PRIORS, tie_ab=True)
    doubled = run_em(np.vstack([probs, probs[:, SWAP]]), TRAIN_PRIORS)
    np.testing.assert_allclose(tied.priors, doubled.priors, atol=1e-9)
    assert tied.priors[0] == tied.priors[1] and tied.converged and tied.gain > 0


def test_the_bootstrap_bound_is_the_quantile_of_resampled_means():
    from app.priors import bootstrap_lower_bound

    values = np.random.default_rng(0).normal(loc=0.1, scale=1.0, size=4000)
    bound = bootstrap_lower_bound(values, 2000, 0.05, seed=1)
    normal = values.mean() - 1.645 * values.std() / np.sqrt(len(values))  # the normal approximation
    assert bound == pytest.approx(normal, abs=0.003)
    assert bootstrap_lower_bound(values, 2000, 0.05, seed=1) == bound  # deterministic


def test_a_spec_stores_the_calibration_and_applies_calibrated_em_with_its_record(tmp_path, source_calibration):
    from app.config import PredictConfig
    from app.ensemble import apply_spec, fit_ensemble, load_spec, save_spec
    from app.prediction import with_predict_options

    oof_logits, oof_labels = miscalibrated_logits(SOURCE_PRIORS, 6000, seed=26)
    spec = fit_ensemble({"m": oof_logits}, {"m": "/ckpt"}, oof_labels, "prob", priors="calibrated_em")
    assert spec.prior_calibration is not None and spec.prior_calibration.n_rows == 6000
    spec = load_spec(save_spec(spec, tmp_path / "ensemble.json"))  # survives its JSON
    logits, _ = miscalibrated_logits(TARGET_PRIORS, 4000, seed=27)
    probs, record = apply_spec(spec, [logits])
    assert record.method == "calibrated_em" and not record.fallback and record.applied_priors[2] > 0.25
    np.testing.assert_allclose(probs.mean(axis=0)[2], record.applied_priors[2], atol=0.01)
    # predict.em_* settings reach the spec, and so Serve and jobs.predict alike
    tuned = with_predict_options(spec, PredictConfig(em_max_iter=2, em_safeguard_resamples=0))
    assert (tuned.em.max_iter, tuned.em.safeguard_resamples, tuned.em.tie_ab) == (2, 0, True)
    _, record = apply_spec(tuned, [logits])
    assert record.fallback and record.converged is False
    # fixed priors are recorded too; no shift, no record
    assert apply_spec(spec.model_copy(update={"priors": (0.3, 0.3, 0.4)}), [logits])[1].method == "fixed"
    assert apply_spec(spec.model_copy(update={"priors": None}), [logits])[1] is None
    with pytest.raises(ValueError, match="prior_calibration: required when priors is calibrated_em"):
        with_predict_options(spec.model_copy(update={"priors": None, "prior_calibration": None}),
                             PredictConfig(priors="calibrated_em"))


def test_a_checkpoint_applies_the_calibration_its_arena_json_stores(tmp_path, source_calibration):
    import json

    from app.config import PredictConfig
    from app.ensemble import apply_spec
    from app.prediction import finish_checkpoint_probabilities
    from app.serving import spec_for_checkpoint

    calibration, train_priors = source_calibration
    checkpoint = tmp_path / "round_0100"
    checkpoint.mkdir()
    meta = {"format": 2, "labels": ["winner_model_a", "winner_model_b", "winner_tie"], "config": {},
            "train_priors": train_priors.tolist(), "metrics": {"valid_log_loss": 0.5, "valid_rows": 100.0}}
    (checkpoint / "arena.json").write_text(json.dumps(meta))
    logits, _ = miscalibrated_logits(TARGET_PRIORS, 3000, seed=28)
    config = PredictConfig(priors="calibrated_em")
    with pytest.raises(ValueError, match="has none: use a fold checkpoint of `python -m jobs.cv`"):
        finish_checkpoint_probabilities(softmax(logits), str(checkpoint), config)
    (checkpoint / "arena.json").write_text(json.dumps({**meta, "prior_calibration": calibration.model_dump()}))
    probs, record = finish_checkpoint_probabilities(softmax(logits), str(checkpoint), config)
    assert not record.fallback and record.applied_priors[2] > 0.25 and record.calibration.startswith("bcts")
    # Serve's one-member spec of the same checkpoint applies it the same way
    spec = spec_for_checkpoint(str(checkpoint)).model_copy(update={"priors": "calibrated_em"})
    served, served_record = apply_spec(spec, [logits])
    np.testing.assert_allclose(served, probs, atol=1e-12)
    assert served_record == record


def test_serve_headers_say_what_was_applied_and_em_is_refused_per_request(source_calibration):
    from app.ensemble import EnsembleMember, EnsembleReport, EnsembleSpec
    from app.priors import EMSettings, adapt_priors_calibrated
    from app.serving import RequestError, check_online_priors, prior_shift_headers

    calibration, _ = source_calibration
    probs = softmax(miscalibrated_logits(TARGET_PRIORS, 3000, seed=29)[0])
    _, applied = adapt_priors_calibrated(probs, calibration)
    headers = prior_shift_headers(applied)
    assert headers["X-Arena-Priors"] == "calibrated_em" and headers["X-Arena-Prior-Fallback"] == "false"
    assert headers["X-Arena-Prior-Applied"] == headers["X-Arena-Prior-Estimate"] != "none"
    assert headers["X-Arena-Prior-Converged"] == "true" and int(headers["X-Arena-Prior-Iterations"]) > 1
    _, stopped = adapt_priors_calibrated(probs, calibration, EMSettings(max_iter=2))
    headers = prior_shift_headers(stopped)
    assert headers["X-Arena-Prior-Fallback"] == "true" and headers["X-Arena-Prior-Applied"] == "none"
    assert headers["X-Arena-Prior-Converged"] == "false" and "did not converge" in headers["X-Arena-Prior-Reason"]
    assert prior_shift_headers(None) == {"X-Arena-Priors": "none"}
    spec = EnsembleSpec(members=(EnsembleMember(name="m", checkpoint="c", weight=1.0),), mode="prob",
                        priors="calibrated_em", train_priors=(0.485, 0.485, 0.03), prior_calibration=calibration,
                        report=EnsembleReport(n_rows=10, member_log_loss={"m": 1.0}, ensemble_log_loss=1.0))
    with pytest.raises(RequestError, match="calibrated_em"):
        check_online_priors(spec)
