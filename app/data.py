"""Read, validate and write Kaggle "LLM Classification Finetuning" files.

Text cells hold JSON lists of turns; labels are three one-hot columns. Bad rows either stop the load with an
error naming the row and column, or (``on_bad_rows="skip"``) go to a JSON Lines rejects file; nothing is
dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

LABEL_COLUMNS: tuple[str, str, str] = ("winner_model_a", "winner_model_b", "winner_tie")
CLASS_NAMES: tuple[str, str, str] = ("a", "b", "tie")  # class index 0, 1, 2
TEXT_COLUMNS: tuple[str, str, str] = ("prompt", "response_a", "response_b")
MODEL_COLUMNS: tuple[str, str] = ("model_a", "model_b")
TRAIN_COLUMNS: tuple[str, ...] = ("id", *MODEL_COLUMNS, *TEXT_COLUMNS, *LABEL_COLUMNS)
TEST_COLUMNS: tuple[str, ...] = ("id", *TEXT_COLUMNS)

ONE_HOT_COLUMN = ",".join(LABEL_COLUMNS)
SKIP_HINT = "set data.on_bad_rows=skip to write bad rows to a rejects file instead"

_LABEL_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}
_SURROGATE = re.compile("[\ud800-\udfff]")
# Kaggle responses reach a few hundred KB; a CSV row must fit in one block.
_CSV_BLOCK_BYTES = 64 << 20


class DataValidationError(ValueError):
    """Input data is malformed; the message names the file, row id and column, and how to fix it."""


@dataclass(frozen=True)
class Rejected:
    """One rejected input row: its id (or "row N" when the id is missing), the column at fault and why."""

    row_id: str
    column: str
    reason: str


@dataclass
class LoadedTable:
    """The validated rows of a train or test file, plus what was rejected."""

    frame: pd.DataFrame
    has_labels: bool
    n_rejected: int
    rejects_path: str | None


class _CellError(Exception):
    """A cell failed validation: why, and in which column."""

    def __init__(self, reason: str, column: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.column = column


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem and path for a local path or a pyarrow filesystem URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def read_table(uri: str) -> pd.DataFrame:
    """Read a CSV (.csv, .csv.gz) or Parquet (.parquet) file, every column as string.

    Accepts a local path or any pyarrow filesystem URI (s3://, gs://, file://, ...). No type guessing, so
    ids stay exact. Empty CSV cells read as ""; Parquet nulls read as missing (NaN).

    Raises:
        FileNotFoundError: the file does not exist.
        DataValidationError: unknown extension, or the file cannot be parsed.
    """
    name = uri.lower()
    if not name.endswith((".csv", ".csv.gz", ".parquet")):
        raise DataValidationError(f"{uri}: unsupported file type; use .csv, .csv.gz or .parquet")
    filesystem, path = _resolve(uri)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file; check the path (and the URI scheme for remote files)")
    if info.type != pafs.FileType.File:
        raise DataValidationError(f"{uri}: not a regular file; point to one .csv, .csv.gz or .parquet file")
    try:
        table = _read_parquet(filesystem, path) if name.endswith(".parquet") else _read_csv(filesystem, path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError, csv.Error) as error:
        raise DataValidationError(f"{uri}: cannot be read as a table ({error})") from error
    return table.to_pandas()


def _read_csv(filesystem: pafs.FileSystem, path: str) -> pa.Table:
    # pyarrow has no "infer nothing" switch, so read the header first and type every named column string.
    with filesystem.open_input_stream(path, compression="detect") as stream:
        header = next(csv.reader(io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")), [])
    if len(set(header)) != len(header):
        raise pa.ArrowInvalid(f"duplicate column names in header {header}")
    with filesystem.open_input_stream(path, compression="detect") as stream:
        return pacsv.read_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header}, strings_can_be_null=False
            ),
        )


def _read_parquet(filesystem: pafs.FileSystem, path: str) -> pa.Table:
    # Cast typed columns (int ids, float labels) to text so both formats validate the same way.
    table = pq.read_table(path, filesystem=filesystem)
    return pa.table({name: table.column(name).cast(pa.string()) for name in table.column_names})


def _decode_turns(text: object, column: str) -> list[str]:
    """Decode a JSON list-of-turns cell, or raise _CellError with the reason and column."""
    if _is_missing(text) or (isinstance(text, str) and not text.strip()):
        raise _CellError('cell is empty or missing; expected a JSON list of strings like ["Hello"]', column)
    if not isinstance(text, str):
        raise _CellError(f"cell is a {type(text).__name__}, expected a JSON list of strings", column)
    try:
        turns = json.loads(text)
    except ValueError as error:  # JSONDecodeError, or an integer past Python's digit limit
        raise _CellError(f"not a JSON list of strings ({error})", column) from None
    except RecursionError:
        raise _CellError("not a JSON list of strings (nested too deeply)", column) from None
    if not isinstance(turns, list):
        raise _CellError(f"not a JSON list of strings (got a JSON {type(turns).__name__})", column)
    decoded = []
    for index, turn in enumerate(turns):
        if turn is None:  # Kaggle writes null for a turn the model never answered.
            decoded.append("")
        elif isinstance(turn, str):
            decoded.append(_repair_surrogates(turn))
        else:
            kind = type(turn).__name__
            raise _CellError(f"turn {index} is a JSON {kind}, expected a string or null", column)
    return decoded


def _repair_surrogates(text: str) -> str:
    """Join escaped surrogate pairs into characters and replace lone surrogates with U+FFFD."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def parse_turns(text: object, row_id: str, column: str) -> list[str]:
    """Decode one Kaggle text cell: a JSON-encoded list of strings, one per turn.

    Null turns become "", lone surrogates become U+FFFD, and an empty list gives [].

    Raises:
        DataValidationError: naming row_id and column, if the cell is missing, not JSON, not a list, or
            holds an element that is neither a string nor null.
    """
    try:
        return _decode_turns(text, column)
    except _CellError as error:
        raise DataValidationError(f"row id={row_id}, column {column}: {error.reason}") from None


def _decode_labels(cells: Sequence[object]) -> int:
    """Turn the three one-hot label cells into a class index, or raise _CellError naming the column."""
    values = []
    for column, cell in zip(LABEL_COLUMNS, cells):
        value = None if _is_missing(cell) else _LABEL_VALUES.get(str(cell).strip())
        if value is None:
            raise _CellError(f"label must be 0 or 1, got {cell!r}", column)
        values.append(value)
    if sum(values) != 1:
        raise _CellError(f"labels must be one-hot (exactly one 1), got {values}", ONE_HOT_COLUMN)
    return values.index(1)


def _label_columns(frame: pd.DataFrame, uri: str, require_labels: bool | None) -> bool:
    """Decide whether the file has labels, raising if required labels are missing or only partly present."""
    missing = [column for column in LABEL_COLUMNS if column not in frame.columns]
    if require_labels is False:
        return False
    if missing and (require_labels or len(missing) < len(LABEL_COLUMNS)):
        raise DataValidationError(
            f"{uri}: missing label columns {missing}; add them, or load it as a test file "
            "(require_labels=False)"
        )
    return not missing


def load_pairs(
    uri: str,
    *,
    require_labels: bool | None = None,
    on_bad_rows: Literal["error", "skip"] = "error",
    rejects_path: str | None = None,
) -> LoadedTable:
    """Read and validate a Kaggle train or test file.

    Args:
        uri: local path or pyarrow filesystem URI of a .csv, .csv.gz or .parquet file.
        require_labels: True requires the three label columns, False ignores them, None uses them when
            all three are present (a file with only some of them is an error).
        on_bad_rows: "error" raises on the first bad row; "skip" drops bad rows and writes each one to
            rejects_path as a JSON line {"row_id", "row_number", "column", "reason", "row"}.
        rejects_path: where skip mode writes rejects; always written in skip mode, empty when none.

    Returns:
        The valid rows in input order: id (str), model_a/model_b if present (str), prompt, response_a,
        response_b (list[str], padded with "" to equal length) and label (int64) when has_labels.

    Raises:
        DataValidationError: missing required columns, a bad row in error mode, or no valid rows left.
        ValueError: bad on_bad_rows, or skip mode without rejects_path.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    if on_bad_rows == "skip" and not rejects_path:
        raise ValueError("on_bad_rows='skip' needs rejects_path (set data.rejects_path) to write bad rows to")
    raw = read_table(uri)
    missing = [column for column in TEST_COLUMNS if column not in raw.columns]
    if missing:
        raise DataValidationError(
            f"{uri}: missing required columns {missing}; a Kaggle file needs {list(TEST_COLUMNS)} "
            f"(found {list(raw.columns)})"
        )
    has_labels = _label_columns(raw, uri, require_labels)
    model_columns = [column for column in MODEL_COLUMNS if column in raw.columns]

    ids = raw["id"].tolist()
    texts = [raw[column].tolist() for column in TEXT_COLUMNS]
    labels = [raw[column].tolist() for column in LABEL_COLUMNS] if has_labels else []
    kept: list[int] = []
    kept_turns: list[list[list[str]]] = []
    kept_labels: list[int] = []
    rejects: list[dict[str, object]] = []
    seen: set[str] = set()
    for index, row_id in enumerate(ids):
        id_missing = _is_missing(row_id) or not str(row_id).strip()
        row_id = f"row {index + 1}" if id_missing else str(row_id)
        try:
            if id_missing:
                raise _CellError("id is empty; every row needs a unique id", "id")
            if row_id in seen:
                raise _CellError("duplicate id; an earlier row already uses it", "id")
            seen.add(row_id)
            turns = [_decode_turns(cells[index], column) for column, cells in zip(TEXT_COLUMNS, texts)]
            label = _decode_labels([cells[index] for cells in labels]) if has_labels else -1
        except _CellError as error:
            rejected = Rejected(row_id, error.column, error.reason)
            if on_bad_rows == "error":
                where = row_id if id_missing else f"row id={row_id} (row {index + 1})"
                raise DataValidationError(
                    f"{uri}: {where}, column {error.column}: {error.reason}; fix the row, or {SKIP_HINT}"
                ) from None
            rejects.append(_reject_record(rejected, index, raw))
            continue
        kept.append(index)
        kept_turns.append(_pad(turns))
        kept_labels.append(label)

    if rejects_path is not None and on_bad_rows == "skip":
        _write_text(rejects_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    if not kept:
        where = f"; see {rejects_path}" if rejects else ""
        raise DataValidationError(f"{uri}: no valid rows ({len(rejects)} rejected{where}); check the file")

    frame = pd.DataFrame({"id": [str(ids[index]) for index in kept]})
    for column in model_columns:
        values = raw[column].tolist()
        frame[column] = ["" if _is_missing(values[index]) else str(values[index]) for index in kept]
    for position, column in enumerate(TEXT_COLUMNS):
        frame[column] = pd.Series([row[position] for row in kept_turns], dtype=object)
    if has_labels:
        frame["label"] = np.asarray(kept_labels, dtype=np.int64)
    return LoadedTable(frame, has_labels, len(rejects), rejects_path if on_bad_rows == "skip" else None)


def _reject_record(rejected: Rejected, index: int, raw: pd.DataFrame) -> dict[str, object]:
    """Build one rejects-file line: the problem plus the row's original cells as strings (null if missing)."""
    cells = raw.iloc[index].items()
    return {
        "row_id": rejected.row_id,
        "row_number": index + 1,
        "column": rejected.column,
        "reason": rejected.reason,
        "row": {str(column): None if _is_missing(value) else str(value) for column, value in cells},
    }


def _pad(turns: list[list[str]]) -> list[list[str]]:
    """Pad prompt/response turn lists with "" to the longest, since real rows have unequal counts."""
    length = max(len(cell) for cell in turns)
    return [cell + [""] * (length - len(cell)) for cell in turns]


def prompt_group_key(prompt_turns: list[str]) -> str:
    """The grouping key for k-fold: the prompt turns, whitespace-normalized and lowercased, joined."""
    # Normalized turns hold no newline, so "\n" cannot make two different prompts collide.
    return "\n".join(" ".join(turn.split()).lower() for turn in prompt_turns)


def assign_folds(groups: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """Assign each row to one of n_folds folds so rows that share a group stay in one fold.

    Groups are shuffled with the seed, then placed largest first (ties in shuffled order) into the fold
    with the fewest rows so far, which keeps folds balanced by row count.

    Returns (N,) int64 fold indices in 0..n_folds-1. Raises ValueError if n_folds < 2 or exceeds the groups.
    """
    codes, uniques = pd.factorize(pd.Series(list(groups), dtype=object), sort=True)
    n_groups = len(uniques)
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if n_folds > n_groups:
        raise ValueError(f"n_folds={n_folds} exceeds the {n_groups} distinct groups; use fewer folds")
    sizes = np.bincount(codes, minlength=n_groups)
    shuffled = np.random.default_rng(seed).permutation(n_groups)
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    fold_rows = [0] * n_folds
    for group in order.tolist():
        fold = fold_rows.index(min(fold_rows))
        fold_of_group[group] = fold
        fold_rows[fold] += int(sizes[group])
    return fold_of_group[codes]


def write_submission(ids: Sequence[str], probs: np.ndarray, path: str) -> None:
    """Write Kaggle's submission.csv: id, winner_model_a, winner_model_b, winner_tie, rows in the given order.

    probs is (N, 3) for A wins, B wins, tie; each row is renormalized to sum to 1. path is local (parent
    directories are created) or a pyarrow filesystem URI.

    Raises:
        ValueError: shape mismatch, non-finite or negative values, an all-zero row, or duplicate ids.
    """
    probs = np.asarray(probs, dtype=np.float64)
    ids = [str(row_id) for row_id in ids]
    if probs.ndim != 2 or probs.shape != (len(ids), len(LABEL_COLUMNS)):
        raise ValueError(f"probs must have shape ({len(ids)}, 3) to match ids, got {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative; check the model outputs for NaN/inf")
    totals = probs.sum(axis=1, keepdims=True)  # (N, 1)
    if (totals <= 0).any():
        raise ValueError(f"probs row {int(np.argmin(totals[:, 0]))} sums to 0; cannot renormalize it")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique; Kaggle rejects a submission with repeated ids")
    frame = pd.DataFrame(probs / totals, columns=list(LABEL_COLUMNS))
    frame.insert(0, "id", ids)
    _write_text(path, frame.to_csv(index=False, float_format="%.8f", lineterminator="\n"))


def _write_text(path: str, text: str) -> None:
    """Write UTF-8 text to a local path (creating parent directories) or a pyarrow filesystem URI."""
    filesystem, resolved = _resolve(path)
    if isinstance(filesystem, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(resolved) or ".", exist_ok=True)
    with filesystem.open_output_stream(resolved, compression=None) as stream:
        stream.write(text.encode("utf-8"))


def split_holdout(uri: str, fraction: float, seed: int, out_dir: str) -> tuple[str, str, int, int]:
    """Carve a prompt-grouped, labelled holdout out of a Kaggle train file, as two files of the same format.

    Rows are grouped by prompt (`prompt_group_key`) and the groups of one of round(1 / fraction) balanced
    folds (`assign_folds` with `seed`) form the holdout, so no prompt is on both sides. The rows are written
    as read (every column, unchanged text) to `<out_dir>/train.csv` and `<out_dir>/holdout.csv`; every row
    must be valid, since a silently dropped row would shift both files.

    Returns (train path, holdout path, train rows, holdout rows).
    Raises: ValueError for a fraction outside (0, 0.5]; DataValidationError for a bad row.
    """
    if not 0 < fraction <= 0.5:
        raise ValueError(f"holdout fraction must be in (0, 0.5], got {fraction}")
    raw = read_table(uri)
    table = load_pairs(uri, require_labels=True)  # validates every row; raises naming the first bad one
    folds = assign_folds([prompt_group_key(turns) for turns in table.frame["prompt"]], round(1 / fraction), seed)
    holdout = raw["id"].isin(set(table.frame["id"][folds == 0]))
    paths = (os.path.join(out_dir, "train.csv"), os.path.join(out_dir, "holdout.csv"))
    for path, part in zip(paths, (raw[~holdout], raw[holdout])):
        _write_text(path, part.to_csv(index=False, lineterminator="\n"))
    return paths[0], paths[1], int((~holdout).sum()), int(holdout.sum())
