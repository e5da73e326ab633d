"""Tests of the built-in synthetic arena dataset: Kaggle format, determinism and a learnable signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from app.synthetic import (
    SUBMISSION_COLUMNS,
    TEST_COLUMNS,
    TRAIN_COLUMNS,
    encode_turns,
    generate_pairs,
    write_builtin_dataset,
)

LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]
TEXT_COLUMNS = ["prompt", "response_a", "response_b"]


@pytest.fixture(scope="module")
def pairs() -> pd.DataFrame:
    return generate_pairs(2000, seed=0)


def _turn_counts(column: pd.Series) -> pd.Series:
    return column.map(lambda cell: len(json.loads(cell)))


def test_columns_ids_and_one_hot_labels(pairs: pd.DataFrame) -> None:
    assert list(pairs.columns) == TRAIN_COLUMNS
    assert len(pairs) == 2000
    assert pairs["id"].dtype == np.int64 and pairs["id"].is_unique
    assert (pairs["id"] >= 10_000).all()
    labels = pairs[LABELS].to_numpy()
    assert set(np.unique(labels)) == {0, 1}
    assert (labels.sum(axis=1) == 1).all()
    assert pairs["model_a"].nunique() >= 6 and (pairs["model_a"] != pairs["model_b"]).all()


def test_class_shares(pairs: pd.DataFrame) -> None:
    shares = pairs[LABELS].mean()
    assert 0.30 <= shares["winner_model_a"] <= 0.40
    assert 0.30 <= shares["winner_model_b"] <= 0.40
    assert 0.25 <= shares["winner_tie"] <= 0.35


def test_cells_use_kaggle_json_encoding(pairs: pd.DataFrame) -> None:
    for column in TEXT_COLUMNS:
        for cell in pairs[column]:
            turns = json.loads(cell)
            assert isinstance(turns, list) and turns
            assert all(turn is None or isinstance(turn, str) for turn in turns)
            assert cell.isascii()
            assert encode_turns(turns) == cell  # compact separators, \uXXXX escapes, '/' as '\/'
    cells = pd.concat([pairs[column] for column in TEXT_COLUMNS])
    assert cells.str.contains(r"\/", regex=False).any()
    assert not cells.str.replace(r"\/", "", regex=False).str.contains("/", regex=False).any()
    assert cells.str.contains(r"\u00", regex=False).any()  # accents
    assert cells.str.contains(r"\ud83d", regex=False).any()  # emoji as a surrogate pair
    assert not cells.str.contains('", "', regex=False).any()


def test_encode_turns_matches_kaggle_example() -> None:
    assert encode_turns(["a/b", "café", None]) == '["a\\/b","caf\\u00e9",null]'


def test_realistic_oddities_present(pairs: pd.DataFrame) -> None:
    responses = pd.concat([pairs["response_a"], pairs["response_b"]], axis=1)
    has_null = responses.apply(lambda row: any(None in json.loads(cell) for cell in row), axis=1)
    assert 0.005 <= has_null.mean() <= 0.05
    unequal = _turn_counts(pairs["response_a"]) != _turn_counts(pairs["response_b"])
    assert 0.002 <= unequal.mean() <= 0.03
    multi_turn = _turn_counts(pairs["prompt"]) > 1
    assert 0.05 <= multi_turn.mean() <= 0.15
    words = responses.map(lambda cell: sum(len((turn or "").split()) for turn in json.loads(cell)))
    long_rows = (words >= 400).any(axis=1)
    assert 0.02 <= long_rows.mean() <= 0.10
    assert words.max().max() <= 1600
    assert 0.0 < pairs["prompt"].duplicated().mean() < 0.10


def test_same_seed_is_identical_and_seeds_differ() -> None:
    first, again, other = generate_pairs(300, seed=3), generate_pairs(300, seed=3), generate_pairs(300, seed=4)
    pd.testing.assert_frame_equal(first, again)
    assert not first["response_a"].equals(other["response_a"])
    assert not first["id"].equals(other["id"])


def test_write_builtin_dataset(tmp_path: Path) -> None:
    paths = write_builtin_dataset(str(tmp_path / "a"), n_train=300, n_test=100, seed=1)
    assert set(paths) == {"train", "test", "sample_submission", "holdout"}
    train, test = pd.read_csv(paths["train"]), pd.read_csv(paths["test"])
    submission, holdout = pd.read_csv(paths["sample_submission"]), pd.read_csv(paths["holdout"])
    assert list(train.columns) == TRAIN_COLUMNS and len(train) == 300
    assert list(test.columns) == TEST_COLUMNS and len(test) == 100
    assert list(submission.columns) == SUBMISSION_COLUMNS
    assert list(holdout.columns) == TRAIN_COLUMNS
    assert (holdout["id"] == test["id"]).all() and (holdout["prompt"] == test["prompt"]).all()
    assert np.allclose(submission[LABELS].to_numpy(), 1 / 3, atol=1e-6)
    assert not set(train["prompt"]) & set(test["prompt"])
    assert not set(train["id"]) & set(test["id"])
    pd.testing.assert_frame_equal(train, generate_pairs(300, seed=1))  # the CSV round-trips losslessly

    again = write_builtin_dataset(str(tmp_path / "b"), n_train=300, n_test=100, seed=1)
    other = write_builtin_dataset(str(tmp_path / "c"), n_train=300, n_test=100, seed=2)
    for name in paths:
        assert Path(paths[name]).read_bytes() == Path(again[name]).read_bytes()
        assert Path(paths[name]).read_bytes() != Path(other[name]).read_bytes()


def test_negative_row_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="n_rows"):
        generate_pairs(-1)


def _joined(column: pd.Series) -> list[str]:
    return [" ".join(turn or "" for turn in json.loads(cell)) for cell in column]


def test_signal_is_learnable_but_noisy() -> None:
    """TF-IDF(A) - TF-IDF(B) plus length difference, logistic regression, 2,000 train / 1,000 held out."""
    pairs = generate_pairs(3000, seed=0)
    response_a, response_b = _joined(pairs["response_a"]), _joined(pairs["response_b"])
    vectorizer = TfidfVectorizer(min_df=3, sublinear_tf=True).fit(response_a[:2000] + response_b[:2000])
    log_words_a = np.log1p([len(text.split()) for text in response_a])
    log_words_b = np.log1p([len(text.split()) for text in response_b])
    length = np.c_[log_words_a - log_words_b, np.abs(log_words_a - log_words_b)]
    features = sparse.hstack(
        [vectorizer.transform(response_a) - vectorizer.transform(response_b), sparse.csr_matrix(length)]
    ).tocsr()
    labels = pairs[LABELS].to_numpy().argmax(axis=1)
    model = LogisticRegression(C=0.3, max_iter=1000).fit(features[:2000], labels[:2000])
    loss = log_loss(labels[2000:], model.predict_proba(features[2000:]), labels=[0, 1, 2])
    print(f"bag-of-words logistic regression held-out log loss: {loss:.4f} (uniform: {np.log(3):.4f})")
    assert 0.5 < loss < 1.0
