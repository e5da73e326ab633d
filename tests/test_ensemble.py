import json

import numpy as np
import pytest

from app import storage
from app.ensemble import (
    EnsembleSpec,
    EnsembleSpecError,
    apply_spec_to_member_logits,
    combine,
    fit_ensemble,
    fit_weights,
    load_spec,
    save_spec,
)
from app.metrics import log_loss, softmax
from app.priors import estimate_priors_em, reweight_to_priors


def members_and_labels(n_rows: int = 5000, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A good member (true logits + small noise), a poor one (heavy noise) and a weak one."""
    rng = np.random.default_rng(seed)
    true_logits = 2.0 * rng.normal(size=(n_rows, 3))
    labels = (rng.random(n_rows)[:, None] > np.cumsum(softmax(true_logits), axis=1)).sum(axis=1)
    members = {
        "good": true_logits + 0.1 * rng.normal(size=true_logits.shape),
        "noisy": true_logits + 3.0 * rng.normal(size=true_logits.shape),
        "weak": 0.3 * true_logits + rng.normal(size=true_logits.shape),
    }
    return members, labels


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_fitted_weights_favour_the_better_member(mode):
    members, labels = members_and_labels()
    weights = fit_weights([members["good"], members["noisy"]], labels, mode)
    assert weights[0] > 0.8 and weights.sum() == pytest.approx(1.0) and np.all(weights >= 0)
    weights = fit_weights([members["noisy"], members["weak"], members["good"]], labels, mode, [1.0, 2.0, 1.0])
    assert weights[2] > 0.8


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_fitted_weights_are_deterministic_and_beat_any_other_point_of_the_simplex(mode):
    members, labels = members_and_labels(2000, seed=1)
    logits = [members["good"], members["noisy"] * 0.5, members["weak"]]
    weights = fit_weights(logits, labels, mode)
    np.testing.assert_array_equal(fit_weights(logits, labels, mode), weights)
    best = log_loss(combine(logits, weights, mode), labels)
    for other in np.random.default_rng(2).dirichlet(np.ones(3), size=20):
        assert log_loss(combine(logits, other, mode), labels) >= best - 1e-9


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_combine_with_one_hot_weights_is_that_member(mode):
    members, _ = members_and_labels(200)
    logits = list(members.values())
    np.testing.assert_allclose(combine(logits, [0.0, 1.0, 0.0], mode, [1.0, 0.7, 3.0]),
                               softmax(logits[1] / 0.7), rtol=1e-12)


def test_combine_averages_probabilities_or_logits():
    first, second = np.array([[2.0, 0.0, 0.0]]), np.array([[0.0, 2.0, 0.0]])
    np.testing.assert_allclose(combine([first, second], [0.25, 0.75], "prob", [2.0, 1.0]),
                               0.25 * softmax(first / 2.0) + 0.75 * softmax(second))
    np.testing.assert_allclose(combine([first, second], [0.25, 0.75], "logit", [2.0, 1.0]),
                               softmax(0.25 * first / 2.0 + 0.75 * second))


def test_combine_rejects_bad_weights_temperatures_and_shapes():
    logits = [np.zeros((4, 3)), np.zeros((4, 3))]
    with pytest.raises(ValueError, match="sum to 1"):
        combine(logits, [0.5, 0.6], "prob")
    with pytest.raises(ValueError, match="non-negative"):
        combine(logits, [1.5, -0.5], "prob")
    with pytest.raises(ValueError, match="temperature > 0"):
        combine(logits, [0.5, 0.5], "prob", [1.0, 0.0])
    with pytest.raises(ValueError, match="same N and C"):
        combine([np.zeros((4, 3)), np.zeros((5, 3))], [0.5, 0.5], "logit")
    with pytest.raises(ValueError, match="mode"):
        combine(logits, [0.5, 0.5], "median")


def fitted_spec(mode="logit", **kwargs) -> tuple[EnsembleSpec, dict[str, np.ndarray], np.ndarray]:
    members, labels = members_and_labels(3000, seed=4)
    checkpoints = {name: f"runs/{name}/checkpoint_000001" for name in members}
    spec = fit_ensemble(members, checkpoints, labels, mode, versions={"arena-prefs": "0.1.0"}, **kwargs)
    return spec, members, labels


def test_fit_ensemble_builds_a_spec_that_reports_an_ensemble_no_worse_than_its_best_member():
    spec, members, labels = fitted_spec()
    assert [m.name for m in spec.members] == list(members)
    assert spec.members[0].weight > 0.8
    assert spec.report.ensemble_log_loss <= min(spec.report.member_log_loss.values()) + 1e-9
    np.testing.assert_allclose(spec.train_priors, np.bincount(labels) / len(labels))
    assert spec.versions["arena-prefs"] == "0.1.0" and "numpy" in spec.versions
    probs = apply_spec_to_member_logits(spec, members)
    assert log_loss(probs, labels) == pytest.approx(spec.report.ensemble_log_loss)


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3")()


def test_spec_round_trips_exactly(folder):
    spec, _, _ = fitted_spec(priors=[0.49, 0.48, 0.03])
    path = save_spec(spec, storage.join(folder, "ensemble", "spec.json"))
    loaded = load_spec(path)
    assert loaded == spec
    assert [m.weight for m in loaded.members] == [m.weight for m in spec.members]  # bit-exact floats
    assert loaded.created_at == spec.created_at and loaded.created_at.tzinfo is not None
    assert storage.read_text(save_spec(loaded, storage.join(folder, "again.json"))) == storage.read_text(path)
    with pytest.raises(EnsembleSpecError, match=f"ensemble spec not found: {storage.join(folder, 'missing.json')}"):
        load_spec(storage.join(folder, "missing.json"))


def test_apply_spec_shifts_class_priors_as_configured():
    spec, members, _ = fitted_spec(mode="prob")
    combined = apply_spec_to_member_logits(spec, list(members.values()))
    np.testing.assert_allclose(combined, combine(list(members.values()), [m.weight for m in spec.members], "prob",
                                                 [m.temperature for m in spec.members]))
    train = np.array(spec.train_priors)
    fixed = spec.model_copy(update={"priors": (0.49, 0.48, 0.03)})
    np.testing.assert_allclose(apply_spec_to_member_logits(fixed, members),
                               reweight_to_priors(combined, train, np.array([0.49, 0.48, 0.03])))
    estimated = spec.model_copy(update={"priors": "em"})
    np.testing.assert_allclose(apply_spec_to_member_logits(estimated, members), estimate_priors_em(combined, train)[1])


def test_fit_ensemble_names_a_member_without_signal():
    members, labels = members_and_labels(1000)
    members["blind"] = np.zeros_like(members["good"])
    with pytest.raises(ValueError, match="member 'blind': the best temperature is at the search bound"):
        fit_ensemble(members, {name: "ckpt" for name in members}, labels, "prob")


def test_apply_spec_checks_the_members_it_is_given():
    spec, members, _ = fitted_spec()
    with pytest.raises(ValueError, match="spec's members"):
        apply_spec_to_member_logits(spec, {"good": members["good"], "other": members["noisy"]})
    with pytest.raises(ValueError, match="logits of 2 members; the spec has 3"):
        apply_spec_to_member_logits(spec, [members["good"], members["noisy"]])


def write_spec(tmp_path, edit) -> str:
    spec, _, _ = fitted_spec()
    raw = json.loads(spec.model_dump_json())
    edit(raw)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(raw))
    return str(path)


def set_weights(raw, weights):
    for member, weight in zip(raw["members"], weights):
        member["weight"] = weight


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda raw: set_weights(raw, [1.2, -0.2, 0.0]), r"members\[1\]\.weight: Input should be greater than or equal"),
    (lambda raw: set_weights(raw, [0.5, 0.3, 0.1]), r"members: .*weights must sum to 1"),
    (lambda raw: raw["members"][2].update(temperature=0.0), r"members\[2\]\.temperature: Input should be greater"),
    (lambda raw: raw["members"][0].update(colour="red"), r"members\[0\]\.colour: unknown key"),
    (lambda raw: raw.update(combine="prob"), r"combine: unknown key"),
    (lambda raw: raw["members"][1].update(weight="0.1"), r"members\[1\]\.weight: Input should be a valid number"),
    (lambda raw: raw.update(mode="median"), r"mode: Input should be 'prob' or 'logit'"),
    (lambda raw: raw.update(priors=[0.5, 0.5, 0.5]), r"priors: priors must sum to 1"),
    (lambda raw: raw.update(priors="auto"), r'priors: must be null, "em" or \[pA, pB, pTie\]'),
    (lambda raw: raw.update(priors="em", train_priors=None), r"train_priors: required when priors is set"),
    (lambda raw: raw.update(train_priors=[0.5, 0.5, 0.0]), r"train_priors: train_priors must be positive"),
    (lambda raw: raw["members"][1].update(name="good"), r"members: member names must be unique"),
    (lambda raw: raw["report"]["member_log_loss"].pop("weak"), r"report\.member_log_loss: must have one entry"),
    (lambda raw: raw.update(created_at="2025-01-01T00:00:00"), r"created_at: Input should have timezone info"),
])
def test_bad_specs_name_the_json_path(tmp_path, edit, expected):
    path = write_spec(tmp_path, edit)
    with pytest.raises(EnsembleSpecError, match=expected):
        load_spec(path)


def test_unreadable_spec_files(tmp_path):
    with pytest.raises(EnsembleSpecError, match="not found"):
        load_spec(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"members": [')
    with pytest.raises(EnsembleSpecError, match="not valid JSON"):
        load_spec(tmp_path / "broken.json")
