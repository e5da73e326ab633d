"""TF-IDF + XGBoost (model.kind=tfidf_xgb): pure feature checks, then 2 real Ray Train XGBoost workers on the
built-in data, a checkpoint that reloads to the same metric, and Ray Data prediction over it."""

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from app.classical import training_matrix
from app.config import ConfigError, load_config
from app.features import HAND_FEATURES, TEXT_STATS, TFIDF_BLOCKS, PairFeaturizer, hand_features
from app.metrics import log_loss, softmax

PRESET = Path(__file__).resolve().parents[1] / "configs" / "tfidf-xgb.yaml"
UNIFORM_LOG_LOSS = math.log(3)
# Small vocabularies and shallow trees keep the 2-worker run short on 2 shared cores (about 1 s per round).
QUICK = {"data.builtin_rows": 300, "classical.word_max_features": 500, "classical.char_max_features": 1000,
         "classical.prompt_max_features": 100, "classical.max_depth": 3, "classical.learning_rate": 0.15,
         "classical.num_boost_round": 60, "classical.early_stopping_rounds": 20, "classical.report_every_rounds": 10}


def small_settings(**changes):
    return load_config(None, {"model.kind": "tfidf_xgb", "classical.min_df": 1, **changes}).classical


PROMPTS = [["Explain tides."], ["What is 2+2?"], ["Name a colour."], ["Explain tides."]]
RESPONSES_A = [["The Moon pulls the oceans."], ["4"], ["Blue, like the sky."], [""]]
RESPONSES_B = [["Tides are waves."], ["It is **4**.\n- sure"], ["Red?"], ["The Moon's gravity."]]


# --- pure: features ---------------------------------------------------------------------------------------------


def test_hand_features_of_a_known_row_are_exact():
    prompt = ["What is 2+2?", "And 3+3?"]
    a = ["**Answer**: 4\n\n- one\n- two\n\n```py\nx = 1\n```"]
    b = ["", "# Title\n1. first?"]
    # chars, words, non-blank lines, code blocks, list items, headers, bold, ?, digits, turns, empty turns
    stats = {"prompt": [20, 5, 2, 0, 0, 0, 0, 2, 4, 2, 0],
             "a": [43, 11, 6, 1, 2, 0, 1, 0, 2, 1, 0],
             "b": [17, 4, 2, 0, 1, 1, 0, 1, 1, 2, 1]}
    expected = [*stats["prompt"], *stats["a"], *stats["b"], *np.subtract(stats["a"], stats["b"]),
                math.log(44 / 18), math.log(12 / 5), math.log(7 / 3), 0.0]
    row = hand_features([prompt], [a], [b])
    assert row.shape == (1, len(HAND_FEATURES)) == (1, 4 * len(TEXT_STATS) + 4)
    np.testing.assert_allclose(row[0], expected, rtol=1e-12)
    assert hand_features([prompt], [a], [a])[0, HAND_FEATURES.index("same_text")] == 1.0


def test_vectorizers_learn_only_the_training_rows():
    featurizer = PairFeaturizer(small_settings()).fit(PROMPTS[:3], RESPONSES_A[:3], RESPONSES_B[:3])
    vocabulary = featurizer.vectorizers["response_word"].vocabulary_
    assert "moon" in vocabulary and "gravity" not in vocabulary  # "gravity" is only in the held-out row
    assert "tides" in featurizer.vectorizers["prompt_word"].vocabulary_
    held_out = featurizer.transform(PROMPTS[3:], RESPONSES_A[3:], RESPONSES_B[3:])
    assert held_out.shape == (1, featurizer.n_features)


def test_blocks_tile_the_columns():
    featurizer = PairFeaturizer(small_settings()).fit(PROMPTS, RESPONSES_A, RESPONSES_B)
    features = featurizer.transform(PROMPTS, RESPONSES_A, RESPONSES_B)
    blocks = featurizer.blocks
    assert list(blocks) == [*TFIDF_BLOCKS, "hand"]
    assert features.shape == (4, featurizer.n_features) and features.dtype == np.float32
    starts = [block.start for block in blocks.values()]
    assert starts[0] == 0 and all(prev.stop == start for prev, start in zip(blocks.values(), starts[1:]))
    words = len(featurizer.vectorizers["response_word"].vocabulary_)
    assert all(blocks[name].stop - blocks[name].start == words for name in ("a_word", "b_word", "diff_word"))
    assert blocks["hand"].stop - blocks["hand"].start == len(HAND_FEATURES)


def test_swapping_a_and_b_negates_the_difference_and_exchanges_the_responses():
    featurizer = PairFeaturizer(small_settings()).fit(PROMPTS, RESPONSES_A, RESPONSES_B)
    forward = featurizer.transform(PROMPTS, RESPONSES_A, RESPONSES_B).toarray()
    backward = featurizer.transform(PROMPTS, RESPONSES_B, RESPONSES_A).toarray()
    blocks = featurizer.blocks
    for name in ("diff_word", "diff_char"):
        assert np.abs(forward[:, blocks[name]]).sum() > 0
        np.testing.assert_array_equal(backward[:, blocks[name]], -forward[:, blocks[name]])
    np.testing.assert_array_equal(backward[:, blocks["a_char"]], forward[:, blocks["b_char"]])
    np.testing.assert_array_equal(backward[:, blocks["prompt_word"]], forward[:, blocks["prompt_word"]])
    # The column permutation used for swapped training copies and TTA gives exactly the re-transformed rows.
    np.testing.assert_array_equal(featurizer.swap(featurizer.transform(PROMPTS, RESPONSES_A, RESPONSES_B)).toarray(),
                                  backward)


def test_training_rows_appear_in_both_orders_weighted_by_swap_prob():
    featurizer = PairFeaturizer(small_settings()).fit(PROMPTS, RESPONSES_A, RESPONSES_B)
    rows = {"prompt": PROMPTS, "response_a": RESPONSES_A, "response_b": RESPONSES_B, "label": [0, 1, 2, 0]}
    features, labels, weights = training_matrix(featurizer, rows, swap_prob=0.5)
    assert features.shape == (8, featurizer.n_features)
    assert labels.tolist() == [0, 1, 2, 0, 1, 0, 2, 1]  # the swapped copy: A wins <-> B wins, tie stays
    assert weights.tolist() == [0.5] * 8
    np.testing.assert_array_equal(features[4:].toarray(), featurizer.transform(PROMPTS, RESPONSES_B, RESPONSES_A).toarray())
    assert training_matrix(featurizer, rows, swap_prob=0.0)[0].shape[0] == 4


def test_config_refuses_network_settings_for_tfidf_xgb():
    with pytest.raises(ConfigError, match=r"tfidf_xgb .* adapter\.method=lora \(set full\); deepspeed\.enabled"):
        load_config(PRESET, ["adapter.method=lora", "deepspeed.enabled=true"])
    with pytest.raises(ConfigError, match=r"scaling\.use_gpu"):
        load_config(PRESET, ["scaling.use_gpu=true"])
    with pytest.raises(ConfigError, match=r"classical\.char_ngrams must be"):
        load_config(PRESET, ["classical.char_ngrams=[5,3]"])
    assert load_config(None, ["deepspeed.enabled=true"]).model.kind == "encoder"  # other kinds ignore the rule


# --- integration: Ray Train XGBoost workers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xgb_run(ray_session, tmp_path_factory):
    from app.training import fit, load_training_rows, split_train_valid

    config = load_config(PRESET, {"run.storage_path": str(tmp_path_factory.mktemp("runs")), **QUICK})
    started = time.perf_counter()
    result = fit(config)
    seconds = time.perf_counter() - started
    print(f"\ntfidf_xgb on {len(load_training_rows(config, result.run_dir)[0])} built-in rows, 2 workers: valid log "
          f"loss {result.best_metrics['valid_log_loss']:.4f}, accuracy {result.best_metrics['valid_accuracy']:.3f}, "
          f"{result.best_metrics['epoch']} of {len(result.history)} rounds kept, fit {seconds:.1f}s")
    frame, _ = load_training_rows(config, result.run_dir)
    _, valid = split_train_valid(frame, config)
    return config, result, valid


def texts(frame):
    return list(frame["prompt"]), list(frame["response_a"]), list(frame["response_b"])


def test_two_workers_beat_the_uniform_baseline(xgb_run):
    config, result, valid = xgb_run
    metrics = result.best_metrics
    assert metrics["valid_log_loss"] < UNIFORM_LOG_LOSS - 0.15
    assert metrics["valid_rows"] == len(valid) == 60 and metrics["train_rows"] == 240
    assert len(result.history) >= metrics["epoch"]  # every round is kept, the checkpoint stops at the best
    assert result.history[-1]["train_log_loss"] < result.history[0]["train_log_loss"]
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    assert summary["best_checkpoint"] == result.best_checkpoint


def test_every_boosting_round_reaches_tensorboard(xgb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, result, _ = xgb_run
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    assert summary["tracking"]["tensorboard"]["ok"], summary["tracking"]
    events = EventAccumulator(summary["tracking"]["tensorboard"]["target"])
    events.Reload()
    rounds = list(range(1, len(result.history) + 1))
    for key, column in (("train/log_loss", "train_log_loss"), ("eval/log_loss", "valid_log_loss")):
        logged = events.Scalars(key)
        assert [event.step for event in logged] == rounds
        assert [event.value for event in logged] == pytest.approx([row[column] for row in result.history], rel=1e-6)


def test_checkpoint_holds_booster_featurizer_and_meta(xgb_run):
    from app.modeling import read_checkpoint_meta

    config, result, _ = xgb_run
    assert {"model.ubj", "featurizer.pkl", "arena.json"} <= set(os.listdir(result.best_checkpoint))
    meta, stored = read_checkpoint_meta(result.best_checkpoint)
    assert meta["kind"] == "tfidf_xgb" and stored == config
    assert meta["metrics"]["valid_log_loss"] == pytest.approx(result.best_metrics["valid_log_loss"])
    assert sum(meta["train_priors"]) == pytest.approx(1.0)
    assert {"xgboost", "scikit-learn"} <= set(meta["versions"])


def test_checkpoint_reloads_to_the_same_log_loss_and_valid_probabilities(xgb_run):
    from app.inference import load_predictor

    _, result, valid = xgb_run
    probs = load_predictor(result.best_checkpoint, num_threads=1).predict(*texts(valid))
    assert probs.shape == (len(valid), 3)
    assert np.all((probs >= 0) & (probs <= 1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert log_loss(probs, valid["label"].to_numpy()) == pytest.approx(result.best_metrics["valid_log_loss"], abs=1e-6)


def test_swap_tta_exchanges_a_and_b(xgb_run):
    from app.inference import load_predictor

    _, result, valid = xgb_run
    predictor = load_predictor(result.best_checkpoint)
    prompts, a, b = texts(valid.iloc[:20])
    forward = predictor.predict(prompts, a, b, tta_swap=True)
    backward = predictor.predict(prompts, b, a, tta_swap=True)
    np.testing.assert_allclose(forward[:, [1, 0, 2]], backward, atol=1e-6)
    logits = predictor.predict_logits(prompts, a, b, tta_swap=True)
    np.testing.assert_allclose(softmax(logits)[:, [1, 0, 2]], softmax(predictor.predict_logits(prompts, b, a, tta_swap=True)),
                               atol=1e-6)
    # Trained on both orders, the model is nearly symmetric even without TTA.
    plain = predictor.predict(prompts, a, b)
    assert np.abs(plain[:, [1, 0, 2]] - predictor.predict(prompts, b, a)).mean() < 0.1


def test_score_rows_predicts_with_ray_data_like_in_process(xgb_run):
    from app.inference import load_predictor
    from app.prediction import score_rows

    config, result, valid = xgb_run
    logits = score_rows(result.best_checkpoint, valid, config.predict, output="logits")
    expected = load_predictor(result.best_checkpoint).predict_logits(*texts(valid))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert log_loss(softmax(logits), valid["label"].to_numpy()) == pytest.approx(result.best_metrics["valid_log_loss"],
                                                                                  abs=1e-5)


def test_a_finished_run_is_reused_or_refused(xgb_run):
    from app.training import fit

    config, result, _ = xgb_run
    again = fit(config)  # run.resume (default): the finished run comes back without boosting again
    assert again.best_checkpoint == result.best_checkpoint and again.best_metrics == result.best_metrics
    with pytest.raises(ConfigError, match="already has checkpoints"):
        fit(load_config(PRESET, {"run.storage_path": config.run.storage_path, "run.resume": False, **QUICK}))
