"""Tests for app.data: reading, validating and writing Kaggle preference files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.data import (
    LABEL_COLUMNS,
    TRAIN_COLUMNS,
    DataValidationError,
    assign_folds,
    load_pairs,
    parse_turns,
    prompt_group_key,
    read_table,
    write_submission,
)


def _row(
    row_id: str, prompt: str = '["Hi"]', a: str = '["Hello"]', b: str = '["Hey"]', label: str = "a"
) -> dict[str, str]:
    """One raw train row, as Kaggle writes it (every cell a string)."""
    one_hot = {"a": ("1", "0", "0"), "b": ("0", "1", "0"), "tie": ("0", "0", "1")}[label]
    return {
        "id": row_id,
        "model_a": "gpt-4",
        "model_b": "llama",
        "prompt": prompt,
        "response_a": a,
        "response_b": b,
        **dict(zip(LABEL_COLUMNS, one_hot)),
    }


def _write_csv(path: Path, rows: list[dict]) -> str:
    pd.DataFrame(rows, dtype=object).to_csv(path, index=False)
    return str(path)


GOOD_ROWS = [
    _row("30192", '["What is 2\\/3?","And 1\\/3?"]', '["0.667"]', '["about 0.67","0.333"]', "a"),
    _row("0053", '["Caf\\u00e9 \\ud83d\\ude00"]', '["Bonjour\\nmonde, \\"quoted\\""]', '[null]', "tie"),
    _row("777", '["x"]', "[]", '["y"]', "b"),
]


# --- parse_turns -------------------------------------------------------------------------------------


def test_parse_turns_decodes_real_looking_cell() -> None:
    cell = '["Is 1\\/2 > 1\\/3?",null,"caf\\u00e9 \\ud83d\\ude00","broken \\ud83d end"]'
    assert parse_turns(cell, "1", "prompt") == ["Is 1/2 > 1/3?", "", "café 😀", "broken \ufffd end"]


def test_parse_turns_empty_list_is_valid() -> None:
    assert parse_turns("[]", "1", "response_a") == []


def test_parse_turns_lone_low_surrogate_replaced() -> None:
    assert parse_turns('["a\\ude00b"]', "1", "prompt") == ["a\ufffdb"]


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ('["unterminated', "not a JSON list"),
        ('"just a string"', "not a JSON list"),
        ('{"a": 1}', "not a JSON list"),
        ('["ok", 3]', "turn 1"),
        ('[["nested"]]', "turn 0"),
        (None, "missing"),
        (float("nan"), "missing"),
        (3, "int"),
        ("", "empty"),
    ],
)
def test_parse_turns_malformed_names_row_and_column(cell: object, expected: str) -> None:
    with pytest.raises(DataValidationError) as info:
        parse_turns(cell, "row-4242", "response_b")
    message = str(info.value)
    assert "row-4242" in message and "response_b" in message and expected in message


# --- load_pairs --------------------------------------------------------------------------------------


def test_load_pairs_train_csv(tmp_path: Path) -> None:
    loaded = load_pairs(_write_csv(tmp_path / "train.csv", GOOD_ROWS))
    frame = loaded.frame
    assert loaded.has_labels and loaded.n_rejected == 0 and loaded.rejects_path is None
    assert frame["id"].tolist() == ["30192", "0053", "777"]  # leading zeros kept: no type guessing
    assert frame["label"].tolist() == [0, 2, 1] and frame["label"].dtype == np.int64
    assert frame["model_a"].tolist() == ["gpt-4"] * 3
    # unequal turn counts are padded with "" to the longest of the three cells
    assert frame.loc[0, "prompt"] == ["What is 2/3?", "And 1/3?"]
    assert frame.loc[0, "response_a"] == ["0.667", ""]
    assert frame.loc[1, "prompt"] == ["Café 😀"]
    assert frame.loc[1, "response_a"] == ['Bonjour\nmonde, "quoted"']
    assert frame.loc[1, "response_b"] == [""]
    assert frame.loc[2, "response_a"] == [""]


def test_load_pairs_test_file_without_labels(tmp_path: Path) -> None:
    rows = [{k: r[k] for k in ("id", "prompt", "response_a", "response_b")} for r in GOOD_ROWS]
    loaded = load_pairs(_write_csv(tmp_path / "test.csv", rows))
    assert not loaded.has_labels
    assert list(loaded.frame.columns) == ["id", "prompt", "response_a", "response_b"]
    with pytest.raises(DataValidationError, match="winner_model_a"):
        load_pairs(str(tmp_path / "test.csv"), require_labels=True)


def test_load_pairs_require_labels_false_ignores_labels(tmp_path: Path) -> None:
    loaded = load_pairs(_write_csv(tmp_path / "train.csv", GOOD_ROWS), require_labels=False)
    assert not loaded.has_labels and "label" not in loaded.frame.columns


def test_load_pairs_partial_label_columns_is_an_error(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "winner_tie"} for r in GOOD_ROWS]
    with pytest.raises(DataValidationError, match="winner_tie"):
        load_pairs(_write_csv(tmp_path / "train.csv", rows))


def test_load_pairs_missing_columns_named(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k not in ("prompt", "response_b")} for r in GOOD_ROWS]
    path = _write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(DataValidationError) as info:
        load_pairs(path, on_bad_rows="skip", rejects_path=str(tmp_path / "rejects.jsonl"))
    message = str(info.value)
    assert "prompt" in message and "response_b" in message and "train.csv" in message
    assert "response_a'" not in message.split("needs")[0]


BAD_ROWS = [
    (_row("11", a='["unterminated'), "11", "response_a", "not a JSON list"),
    (_row("12", prompt='{"not": "a list"}'), "12", "prompt", "not a JSON list"),
    (_row("13", b='["ok", 5]'), "13", "response_b", "turn 1"),
    ({**_row("14"), "winner_tie": "2"}, "14", "winner_tie", "0 or 1"),
    ({**_row("15"), "winner_model_b": "1"}, "15", ",".join(LABEL_COLUMNS), "one-hot"),
    ({**_row("16"), "winner_model_a": "0"}, "16", ",".join(LABEL_COLUMNS), "one-hot"),
    (_row("30192"), "30192", "id", "duplicate"),
    (_row(""), "row 11", "id", "empty"),
]


@pytest.mark.parametrize(("bad", "row_id", "column", "reason"), BAD_ROWS)
def test_load_pairs_error_mode_names_row_and_column(
    tmp_path: Path, bad: dict, row_id: str, column: str, reason: str
) -> None:
    rows = GOOD_ROWS + [_row(str(900 + i)) for i in range(7)] + [bad]  # bad row is data row 11
    with pytest.raises(DataValidationError) as info:
        load_pairs(_write_csv(tmp_path / "train.csv", rows))
    message = str(info.value)
    assert row_id in message and f"column {column}:" in message and reason in message
    assert "on_bad_rows=skip" in message


def test_load_pairs_accepts_float_labels(tmp_path: Path) -> None:
    rows = [{**_row("1"), "winner_model_a": "0.0", "winner_model_b": "1.0", "winner_tie": "0"}]
    assert load_pairs(_write_csv(tmp_path / "train.csv", rows)).frame["label"].tolist() == [1]


def test_load_pairs_skip_mode_writes_rejects_and_keeps_order(tmp_path: Path) -> None:
    bad_rows = [bad for bad, *_ in BAD_ROWS]
    rows = [GOOD_ROWS[0], bad_rows[0], GOOD_ROWS[1], *bad_rows[1:], GOOD_ROWS[2]]
    rejects = tmp_path / "out" / "rejects.jsonl"
    path = _write_csv(tmp_path / "train.csv", rows)
    loaded = load_pairs(path, on_bad_rows="skip", rejects_path=str(rejects))
    assert loaded.frame["id"].tolist() == ["30192", "0053", "777"]
    assert loaded.frame["label"].tolist() == [0, 2, 1]
    assert loaded.n_rejected == len(BAD_ROWS) and loaded.rejects_path == str(rejects)
    records = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert [(r["row_id"], r["column"]) for r in records] == [
        ("11", "response_a"),
        ("12", "prompt"),
        ("13", "response_b"),
        ("14", "winner_tie"),
        ("15", ",".join(LABEL_COLUMNS)),
        ("16", ",".join(LABEL_COLUMNS)),
        ("30192", "id"),
        ("row 10", "id"),
    ]
    for record, (bad, _, _, reason) in zip(records, BAD_ROWS):
        assert reason in record["reason"]
        assert record["row"] == bad  # the original cells, as strings


def test_load_pairs_skip_mode_without_rejects_writes_empty_file(tmp_path: Path) -> None:
    rejects = tmp_path / "rejects.jsonl"
    path = _write_csv(tmp_path / "train.csv", GOOD_ROWS)
    loaded = load_pairs(path, on_bad_rows="skip", rejects_path=str(rejects))
    assert loaded.n_rejected == 0 and rejects.exists() and rejects.read_text() == ""


def test_load_pairs_skip_mode_needs_rejects_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rejects_path"):
        load_pairs(_write_csv(tmp_path / "train.csv", GOOD_ROWS), on_bad_rows="skip")


def test_load_pairs_all_rows_rejected_is_an_error(tmp_path: Path) -> None:
    rejects = tmp_path / "rejects.jsonl"
    path = _write_csv(tmp_path / "train.csv", [_row("1", a="nope"), _row("2", b="nope")])
    with pytest.raises(DataValidationError, match="no valid rows"):
        load_pairs(path, on_bad_rows="skip", rejects_path=str(rejects))
    assert len(rejects.read_text().splitlines()) == 2


# --- read_table --------------------------------------------------------------------------------------


def test_csv_gzip_parquet_and_file_uri_read_identically(tmp_path: Path) -> None:
    frame = pd.DataFrame(GOOD_ROWS, dtype=object)
    csv_path = tmp_path / "train.csv"
    frame.to_csv(csv_path, index=False)
    gz_path = tmp_path / "train.csv.gz"
    gz_path.write_bytes(gzip.compress(csv_path.read_bytes()))
    parquet_path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), parquet_path)

    expected = load_pairs(str(csv_path)).frame
    for uri in (str(gz_path), str(parquet_path), csv_path.as_uri(), parquet_path.as_uri()):
        pd.testing.assert_frame_equal(load_pairs(uri).frame, expected)
    assert list(read_table(str(parquet_path)).columns) == list(TRAIN_COLUMNS)


def test_read_table_parquet_numeric_columns_become_strings(tmp_path: Path) -> None:
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"id": [7, 123456789012345678], "winner_tie": [1.0, 0.0]}), path)
    frame = read_table(str(path))
    assert frame["id"].tolist() == ["7", "123456789012345678"]
    assert frame["winner_tie"].tolist() in (["1", "0"], ["1.0", "0.0"])


def test_read_table_keeps_long_multiline_cells(tmp_path: Path) -> None:
    long_text = json.dumps(["line\n" * 400_000])  # ~2.4 MB cell, bigger than pyarrow's default block
    path = _write_csv(tmp_path / "big.csv", [{"id": "1", "prompt": long_text}])
    assert read_table(path)["prompt"].tolist() == [long_text]


def test_read_table_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_table(str(tmp_path / "missing.csv"))
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DataValidationError, match=r"\.parquet"):
        read_table(str(tmp_path / "data.json"))


# --- folds -------------------------------------------------------------------------------------------


def test_prompt_group_key_normalizes_whitespace_and_case() -> None:
    assert prompt_group_key(["  Hello\tWORLD ", "Again"]) == prompt_group_key(["hello world", "again"])
    assert prompt_group_key(["a b"]) != prompt_group_key(["a", "b"])


def _groups(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, size=300)  # group sizes 1..5, like repeated Arena prompts
    groups = [f"prompt {g}" for g, size in enumerate(sizes) for _ in range(size)]
    return [groups[i] for i in rng.permutation(len(groups))]


def test_assign_folds_keeps_groups_together_and_balances() -> None:
    groups = _groups()
    folds = assign_folds(groups, n_folds=5, seed=13)
    assert folds.shape == (len(groups),) and set(folds.tolist()) == set(range(5))
    fold_of: dict[str, int] = {}
    for group, fold in zip(groups, folds.tolist()):
        assert fold_of.setdefault(group, fold) == fold
    counts = np.bincount(folds, minlength=5)
    # largest groups first, then many singletons fill the gaps: folds end up within one row
    assert counts.max() - counts.min() <= 1


def test_assign_folds_deterministic_per_seed_and_varies_across_seeds() -> None:
    groups = _groups()
    first = assign_folds(groups, n_folds=5, seed=1)
    np.testing.assert_array_equal(first, assign_folds(groups, n_folds=5, seed=1))
    assert not np.array_equal(first, assign_folds(groups, n_folds=5, seed=2))


def test_assign_folds_rejects_bad_fold_counts() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        assign_folds(["a", "b"], n_folds=1, seed=0)
    with pytest.raises(ValueError, match="fewer folds"):
        assign_folds(["a", "a", "b"], n_folds=3, seed=0)


# --- write_submission --------------------------------------------------------------------------------


def test_write_submission_round_trip(tmp_path: Path) -> None:
    ids = ["136060", "211333", "1233961"]
    probs = np.array([[2.0, 1.0, 1.0], [0.2, 0.3, 0.5], [0.0, 0.0, 3.0]])
    path = tmp_path / "sub" / "submission.csv"
    write_submission(ids, probs, str(path))
    assert path.read_text().splitlines()[0] == "id,winner_model_a,winner_model_b,winner_tie"
    written = pd.read_csv(path, dtype={"id": str})
    assert written["id"].tolist() == ids
    values = written[list(LABEL_COLUMNS)].to_numpy()
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-7)
    np.testing.assert_allclose(values[0], [0.5, 0.25, 0.25], atol=1e-8)


def test_write_submission_file_uri(tmp_path: Path) -> None:
    path = tmp_path / "submission.csv"
    write_submission(["1"], np.array([[0.1, 0.2, 0.7]]), path.as_uri())
    assert path.read_text().splitlines()[1] == "1,0.10000000,0.20000000,0.70000000"


@pytest.mark.parametrize(
    ("ids", "probs", "match"),
    [
        (["1", "2"], np.ones((1, 3)), "shape"),
        (["1"], np.ones((1, 2)), "shape"),
        (["1"], np.array([[np.nan, 0.5, 0.5]]), "finite"),
        (["1"], np.array([[-0.1, 0.6, 0.5]]), "non-negative"),
        (["1"], np.zeros((1, 3)), "sums to 0"),
        (["1", "1"], np.ones((2, 3)), "unique"),
    ],
)
def test_write_submission_validates(tmp_path: Path, ids: list[str], probs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_submission(ids, probs, str(tmp_path / "submission.csv"))
    assert not (tmp_path / "submission.csv").exists()


def test_split_holdout_keeps_prompts_on_one_side_and_every_row_unchanged(tmp_path):
    from app.data import split_holdout
    from app.synthetic import generate_pairs

    source = tmp_path / "train.csv"
    raw = generate_pairs(300, seed=11)
    raw.to_csv(source, index=False)
    train_path, holdout_path, n_train, n_holdout = split_holdout(str(source), 0.2, seed=3, out_dir=str(tmp_path / "split"))
    assert n_train + n_holdout == 300 and 0.1 < n_holdout / 300 < 0.3
    train, holdout = load_pairs(train_path).frame, load_pairs(holdout_path).frame
    assert set(train["id"]).isdisjoint(holdout["id"]) and len(train) == n_train and len(holdout) == n_holdout
    assert {prompt_group_key(p) for p in train["prompt"]}.isdisjoint(prompt_group_key(p) for p in holdout["prompt"])
    pd.testing.assert_frame_equal(  # the same cells, as read
        pd.concat([read_table(train_path), read_table(holdout_path)]).set_index("id").sort_index(),
        read_table(str(source)).set_index("id").sort_index())
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(str(source), 0.7, seed=3, out_dir=str(tmp_path / "bad"))
