"""Sparse features of preference rows for gradient boosting: TF-IDF of the prompt and both responses, their
difference, and counted length / structure statistics. numpy, scipy and scikit-learn only.

Columns of `PairFeaturizer.transform` (N rows, one CSR matrix):

    prompt_word | prompt_char | a_word | a_char | b_word | b_char | diff_word | diff_char | hand

a_* and b_* come from the same response vectorizers (fitted on both responses of the training rows, so a
column means the same n-gram in both), diff_* = a_* - b_*, and hand holds `HAND_FEATURES`. Exchanging A
and B is a signed permutation of the columns (`PairFeaturizer.swap`): the A and B blocks trade places,
differences and log ratios change sign, prompt columns and `same_text` stay.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from app.config import ClassicalConfig

Turns = Sequence[str]

# Counted per text (a prompt or a response: all its turns).
TEXT_STATS = ("chars", "words", "lines", "code_blocks", "list_items", "headers", "bold", "question_marks",
              "digits", "turns", "empty_turns")
RATIO_STATS = ("chars", "words", "lines")  # log1p(A) - log1p(B): a ratio whose sign flips when A and B swap
HAND_FEATURES = (
    *(f"prompt_{name}" for name in TEXT_STATS),
    *(f"a_{name}" for name in TEXT_STATS),
    *(f"b_{name}" for name in TEXT_STATS),
    *(f"diff_{name}" for name in TEXT_STATS),
    *(f"log_ratio_{name}" for name in RATIO_STATS),
    "same_text",
)
TFIDF_BLOCKS = ("prompt_word", "prompt_char", "a_word", "a_char", "b_word", "b_char", "diff_word", "diff_char")

_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+•]|\d+[.)])[ \t]+\S", re.MULTILINE)
_HEADER = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+\S", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*")
_DIGIT = re.compile(r"[0-9]")
TURN_SEPARATOR = "\n\n"


def text_stats(turns: Turns) -> np.ndarray:
    """(len(TEXT_STATS),) counts of one text: characters, words, non-blank lines, ``` code blocks, list
    items, markdown headers, **bold** spans, question marks, digits, turns and empty (or null) turns."""
    return np.array([
        sum(len(turn) for turn in turns),
        sum(len(turn.split()) for turn in turns),
        sum(1 for turn in turns for line in turn.splitlines() if line.strip()),
        sum(turn.count("```") // 2 for turn in turns),
        sum(len(_LIST_ITEM.findall(turn)) for turn in turns),
        sum(len(_HEADER.findall(turn)) for turn in turns),
        sum(len(_BOLD.findall(turn)) for turn in turns),
        sum(turn.count("?") for turn in turns),
        sum(len(_DIGIT.findall(turn)) for turn in turns),
        len(turns),
        sum(1 for turn in turns if not turn.strip()),
    ], dtype=np.float64)


def hand_features(prompts: Sequence[Turns], responses_a: Sequence[Turns], responses_b: Sequence[Turns]) -> np.ndarray:
    """(N, len(HAND_FEATURES)) counted features of rows, in `HAND_FEATURES` order."""
    width = len(TEXT_STATS)
    rows = np.zeros((len(prompts), len(HAND_FEATURES)), dtype=np.float64)
    ratio_index = [TEXT_STATS.index(name) for name in RATIO_STATS]
    for row, (prompt, a, b) in enumerate(zip(prompts, responses_a, responses_b, strict=True)):
        stats_a, stats_b = text_stats(a), text_stats(b)
        rows[row, :width] = text_stats(prompt)
        rows[row, width: 2 * width] = stats_a
        rows[row, 2 * width: 3 * width] = stats_b
        rows[row, 3 * width: 4 * width] = stats_a - stats_b
        rows[row, 4 * width: -1] = np.log1p(stats_a[ratio_index]) - np.log1p(stats_b[ratio_index])
        rows[row, -1] = float(list(a) == list(b))
    return rows


def _hand_swap() -> tuple[np.ndarray, np.ndarray]:
    """Column order and signs that turn the hand features of (p, a, b) into those of (p, b, a)."""
    width = len(TEXT_STATS)
    order = np.arange(len(HAND_FEATURES))
    order[width: 2 * width], order[2 * width: 3 * width] = order[2 * width: 3 * width].copy(), order[width: 2 * width].copy()
    signs = np.ones(len(HAND_FEATURES))
    signs[3 * width: -1] = -1.0  # differences and log ratios
    return order, signs


def _joined(texts: Sequence[Turns]) -> list[str]:
    return [TURN_SEPARATOR.join(turns) for turns in texts]


class PairFeaturizer:
    """TF-IDF vectorizers for prompts and responses plus the hand features; fitted on training rows only."""

    def __init__(self, settings: ClassicalConfig) -> None:
        common = {"min_df": settings.min_df, "sublinear_tf": settings.sublinear_tf, "dtype": np.float32}
        word = {"analyzer": "word", "ngram_range": tuple(settings.word_ngrams), "token_pattern": r"(?u)\b\w+\b"}
        char = {"analyzer": "char_wb", "ngram_range": tuple(settings.char_ngrams)}
        self.vectorizers = {
            "prompt_word": TfidfVectorizer(**word, **common, max_features=settings.prompt_max_features),
            "prompt_char": TfidfVectorizer(**char, **common, max_features=settings.prompt_max_features),
            "response_word": TfidfVectorizer(**word, **common, max_features=settings.word_max_features),
            "response_char": TfidfVectorizer(**char, **common, max_features=settings.char_max_features),
        }
        self.min_df = settings.min_df
        self.fitted = False

    def fit(self, prompts: Sequence[Turns], responses_a: Sequence[Turns],
            responses_b: Sequence[Turns]) -> PairFeaturizer:
        """Fit the vectorizers on these (training) rows; the response ones on A and B texts together."""
        texts = {"prompt": _joined(prompts), "response": _joined(responses_a) + _joined(responses_b)}
        for name, vectorizer in self.vectorizers.items():
            try:
                vectorizer.fit(texts[name.split("_")[0]])
            except ValueError as error:  # scikit-learn: "empty vocabulary" or "max_df corresponds to < documents min_df"
                raise ValueError(f"the {name} TF-IDF keeps no n-grams of {len(prompts)} training rows with "
                                 f"classical.min_df={self.min_df} ({error}); lower classical.min_df or use more rows") from None
        self.fitted = True
        return self

    @property
    def blocks(self) -> dict[str, slice]:
        """Column range of each block of `transform`'s output, in order (TFIDF_BLOCKS, then 'hand')."""
        if not self.fitted:
            raise RuntimeError("PairFeaturizer.fit must run before its columns are known")
        widths = {name: len(vectorizer.vocabulary_) for name, vectorizer in self.vectorizers.items()}
        sizes = [widths["prompt_word"], widths["prompt_char"]] + [widths["response_word"], widths["response_char"]] * 3
        sizes.append(len(HAND_FEATURES))
        edges = np.concatenate([[0], np.cumsum(sizes)])
        return {name: slice(int(start), int(stop)) for name, start, stop
                in zip((*TFIDF_BLOCKS, "hand"), edges[:-1], edges[1:], strict=True)}

    @property
    def n_features(self) -> int:
        return self.blocks["hand"].stop

    def transform(self, prompts: Sequence[Turns], responses_a: Sequence[Turns],
                  responses_b: Sequence[Turns]) -> sp.csr_matrix:
        """(N, n_features) float32 CSR features of rows, laid out as in the module docstring.

        Stored zeros are dropped: XGBoost reads an absent CSR entry as missing, so a zero must mean the
        same thing whichever block or orientation it comes from.
        """
        if not self.fitted:
            raise RuntimeError("PairFeaturizer.fit must run before transform")
        prompt_texts, a_texts, b_texts = _joined(prompts), _joined(responses_a), _joined(responses_b)
        prompt = [self.vectorizers[name].transform(prompt_texts) for name in ("prompt_word", "prompt_char")]
        a = [self.vectorizers[name].transform(a_texts) for name in ("response_word", "response_char")]
        b = [self.vectorizers[name].transform(b_texts) for name in ("response_word", "response_char")]
        diff = [a_block - b_block for a_block, b_block in zip(a, b, strict=True)]
        hand = sp.csr_matrix(hand_features(prompts, responses_a, responses_b).astype(np.float32))
        matrix = sp.hstack([*prompt, *a, *b, *diff, hand], format="csr", dtype=np.float32)
        matrix.eliminate_zeros()
        return matrix

    def swap_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, signs): features(p, b, a) == features(p, a, b)[:, order] * signs."""
        blocks = self.blocks
        order = np.arange(self.n_features)
        signs = np.ones(self.n_features, dtype=np.float32)
        for a_name, b_name in (("a_word", "b_word"), ("a_char", "b_char")):
            order[blocks[a_name]], order[blocks[b_name]] = order[blocks[b_name]].copy(), order[blocks[a_name]].copy()
        for name in ("diff_word", "diff_char"):
            signs[blocks[name]] = -1.0
        hand_order, hand_signs = _hand_swap()
        order[blocks["hand"]] = blocks["hand"].start + hand_order
        signs[blocks["hand"]] = hand_signs
        return order, signs

    def swap(self, matrix: sp.csr_matrix) -> sp.csr_matrix:
        """The features of the same rows with A and B exchanged, without transforming the texts again."""
        order, signs = self.swap_columns()
        return sp.csr_matrix(matrix[:, order].multiply(signs.reshape(1, -1)), dtype=np.float32)
