"""Integration: 2 real Ray Train workers finetune the packaged MiniLM; the checkpoint reloads exactly."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import free_port

from app.config import load_config
from app.inference import Predictor
from app.metrics import log_loss
from app.prediction import predict_file
from app.priors import reweight_to_priors
from app.training import fit, load_training_rows, split_train_valid

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    """Checkpoints staged in a folder of their own and uploaded in the background (Ray Train's async upload,
    what s3:// storage gets): the run must find and keep them all the same. Its MLflow server is down."""
    storage, staging = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("staging")
    config = load_config(TINY, {"run.storage_path": str(storage), "run.keep_checkpoints": 1,
                                "run.staging_dir": str(staging), "run.checkpoint_upload": "async",
                                "tracking.mlflow_uri": f"http://127.0.0.1:{free_port()}"})  # nothing listens
    return config, fit(config)


def test_a_tracker_that_is_down_leaves_training_alone_and_says_so(tiny_run):
    config, result = tiny_run
    tracked = json.loads((Path(result.run_dir) / "summary.json").read_text())["tracking"]
    assert not tracked["mlflow"]["ok"] and "opening the run failed" in tracked["mlflow"]["reason"], tracked
    assert tracked["tensorboard"]["ok"] and len(result.history) == 2


def test_checkpoints_are_staged_then_uploaded_and_the_staged_copies_removed(tiny_run):
    config, result = tiny_run
    assert os.listdir(config.run.staging_dir) == []  # each rank's staged folder is deleted after its upload
    progress = sorted(name for name in os.listdir(result.best_checkpoint) if name.startswith("progress_rank"))
    assert progress == ["progress_rank0.pt", "progress_rank1.pt"]  # both ranks' parts merged into one folder


def test_two_workers_train_and_the_loss_goes_down(tiny_run):
    config, result = tiny_run
    epochs = [row for row in result.history if "train_loss" in row]
    assert len(epochs) == 2
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert result.best_metrics["valid_rows"] == 60  # the whole held-out fold, gathered from both workers
    assert result.best_metrics["train_real_token_share"] > 0.9


def test_checkpoint_holds_weights_tokenizer_config_and_metrics(tiny_run):
    _, result = tiny_run
    files = set(os.listdir(result.best_checkpoint))
    assert {"model.safetensors", "config.json", "tokenizer.json", "arena.json"} <= files
    kept = sorted(name for name in os.listdir(result.run_dir) if name.startswith("epoch_"))
    # run.keep_checkpoints=1 keeps the best by validation log loss, plus the latest while it is not the best
    # (Ray Train keeps the latest checkpoint for resume).
    latest = f"epoch_{result.history[-1]['epoch']:03d}"
    assert kept == sorted({os.path.basename(result.best_checkpoint), latest})


def test_checkpoint_reloads_to_identical_predictions(tiny_run):
    """Scoring the validation fold in-process from the reloaded checkpoint reproduces the workers' metric."""
    config, result = tiny_run
    frame, _ = load_training_rows(config, result.run_dir)
    _, valid = split_train_valid(frame, config)
    texts = (list(valid["prompt"]), list(valid["response_a"]), list(valid["response_b"]))
    first = Predictor(result.best_checkpoint, precision="fp32").predict(*texts)
    second = Predictor(result.best_checkpoint, tokens_per_batch=300, precision="fp32").predict(*texts)
    np.testing.assert_allclose(first, second, atol=1e-5)  # batching does not change a prediction
    assert log_loss(first, valid["label"].to_numpy()) == pytest.approx(result.best_metrics["valid_log_loss"], abs=1e-5)
    # bf16 autocast (what precision=auto picks on CPUs with AMX) moves probabilities only slightly.
    bf16 = Predictor(result.best_checkpoint, precision="bf16").predict(*texts)
    np.testing.assert_allclose(bf16, first, atol=2e-2)
    assert log_loss(bf16, valid["label"].to_numpy()) == pytest.approx(log_loss(first, valid["label"].to_numpy()), abs=5e-3)


def test_swap_tta_exchanges_a_and_b(tiny_run):
    _, result = tiny_run
    predictor = Predictor(result.best_checkpoint, precision="fp32")
    prompts, a, b = [["Which is better?"], ["hi"]], [["A long, careful answer."], ["hello!"]], [["No."], [""]]
    forward = predictor.predict(prompts, a, b, tta_swap=True)
    backward = predictor.predict(prompts, b, a, tta_swap=True)
    np.testing.assert_allclose(forward[:, [1, 0, 2]], backward, atol=1e-6)
    np.testing.assert_allclose(forward.sum(axis=1), 1.0, atol=1e-9)
    plain, swapped = predictor.predict(prompts, a, b), predictor.predict(prompts, b, a)[:, [1, 0, 2]]
    np.testing.assert_allclose(predictor.predict(prompts, a, b, tta_swap=True, tta_combine="prob"),
                               (plain + swapped) / 2, atol=1e-6)


def test_predict_file_writes_a_kaggle_submission_in_input_order(tiny_run, tmp_path):
    config, result = tiny_run
    data_dir = Path(result.run_dir) / "builtin_data"
    output = tmp_path / "submission.csv"
    report = predict_file(result.best_checkpoint, str(data_dir / "test.csv"), str(output), config.predict)
    submission = pd.read_csv(output)
    test = pd.read_csv(data_dir / "test.csv")
    assert list(submission.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert submission["id"].tolist() == test["id"].tolist()
    np.testing.assert_allclose(submission.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-6)
    assert report.metrics == {}  # test.csv has no labels


def test_predict_file_scores_labelled_input_with_tta(tiny_run, tmp_path):
    config, result = tiny_run
    holdout = Path(result.run_dir) / "builtin_data" / "holdout.csv"
    report = predict_file(result.best_checkpoint, str(holdout), str(tmp_path / "s.csv"),
                          config.predict.model_copy(update={"tta_swap": True}))
    assert set(report.metrics) == {"log_loss", "accuracy"} and report.rows == len(pd.read_csv(holdout))


def test_the_checkpoint_records_its_class_shares_and_predict_shifts_them(tiny_run, tmp_path):
    config, result = tiny_run
    meta = json.loads((Path(result.best_checkpoint) / "arena.json").read_text())
    frame, _ = load_training_rows(config, result.run_dir)
    train, _ = split_train_valid(frame, config)
    np.testing.assert_allclose(meta["train_priors"], np.bincount(train["label"], minlength=3) / len(train))
    test = str(Path(result.run_dir) / "builtin_data" / "test.csv")
    predict_file(result.best_checkpoint, test, str(tmp_path / "plain.csv"), config.predict)
    shifted = config.predict.model_copy(update={"priors": (0.2, 0.2, 0.6)})
    predict_file(result.best_checkpoint, test, str(tmp_path / "tie.csv"), shifted)
    plain, tie = (pd.read_csv(tmp_path / name).iloc[:, 1:].to_numpy() for name in ("plain.csv", "tie.csv"))
    np.testing.assert_allclose(tie, reweight_to_priors(plain, np.array(meta["train_priors"]), np.array([0.2, 0.2, 0.6])),
                               atol=1e-6)
    assert tie[:, 2].mean() > plain[:, 2].mean()
    tricks = config.predict.model_copy(update={"temperature": 2.0, "smoothing": 0.1})
    predict_file(result.best_checkpoint, test, str(tmp_path / "soft.csv"), tricks)
    soft = pd.read_csv(tmp_path / "soft.csv").iloc[:, 1:].to_numpy()
    flattened = np.sqrt(plain) / np.sqrt(plain).sum(axis=1, keepdims=True)  # softmax(log p / 2)
    np.testing.assert_allclose(soft, 0.9 * flattened + 0.1 * np.array(meta["train_priors"]), atol=1e-6)
