"""Zero- and few-shot prompts: an instruction, k labelled examples and the query, within one token budget.

Layout of one prompt, in token ids of the scoring model's own tokenizer:

    [specials] instruction \\n\\n
    Prompt: ... Response A: ... Response B: ... [cue] verdict \\n\\n      (example k, the least relevant)
    ...
    Prompt: ... Response A: ... Response B: ... [cue] verdict \\n\\n      (example 1, the most relevant)
    Prompt: ... Response A: ... Response B: ... [cue] [specials]         (the query)

Each pair is interleaved turn by turn exactly as app/formatting.py does it, and the verdict is the label word
of the example's class (`model.label_words`), so the model scores the query's three label words where the
examples show theirs. Budget policy (`format.max_length` for the whole prompt):
1. The specials, the instruction and the query's answer cue are always kept whole.
2. The query is never dropped: its texts are cut by the formatting truncation policy only to what is left
   after (1), or to `prompting.query_max_tokens` when set (which leaves room for examples).
3. Each example is cut by the same policy to `prompting.example_max_tokens` tokens (cue and verdict
   included). When the examples still do not fit in the room the query left, they share it max-min fairly
   (`share_budget`: short examples stay whole); an example left with fewer than `format.min_turn_tokens`
   tokens of text beyond its markers is not worth keeping, so the least relevant one is dropped and the
   room shared again.

Example selection is pure numpy: a query row may use only pool rows of another group (its cross-validation
fold, or its prompt), drawn at random or the most similar by cosine of embeddings. This module depends on a
tokenizer object and numpy only, and is tested without models or Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from app.config import FormatConfig, PromptingConfig
from app.formatting import Markers, Tokenizer, assemble, build_markers, share_budget, tokenize_turns

SEPARATOR = "\n\n"  # after the instruction and after each example's verdict
TokenTurns = list[tuple[list[int], list[int], list[int]]]  # one pair: (prompt, A, B) token ids per turn
SIMILARITY_CHUNK_ROWS = 1024  # query rows per (chunk, pool) similarity matrix


@dataclass(frozen=True)
class BuiltPrompt:
    """One prompt's token ids, how many examples it kept and how many tokens its query's texts kept."""

    ids: list[int]
    n_examples: int
    query_tokens: int


class PromptBuilder:
    """Build instruction prompts with in-context examples for one tokenizer and config.

    Args:
        tokenizer: the scoring model's tokenizer (called on lists of texts, as in app/formatting.py).
        format_config: `max_length` (the whole prompt), the answer cue and the truncation policy.
        prompting: the instruction and the example / query budgets.
        label_words: the words of A wins, B wins, tie (`model.label_words`), the examples' verdicts.

    Raises:
        ValueError: `format.max_length` or `prompting.example_max_tokens` leaves no room for a pair's text.
    """

    def __init__(self, tokenizer: Tokenizer, format_config: FormatConfig, prompting: PromptingConfig,
                 label_words: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.format = format_config
        self.prompting = prompting
        self.markers = build_markers(tokenizer, format_config.answer_cue)
        # Pair bodies are assembled without specials or cue; those are placed once around the whole prompt.
        self._bare = dataclasses.replace(self.markers, prefix=[], suffix=[], cue=[])
        pieces = [prompting.instruction + SEPARATOR if prompting.instruction else "", SEPARATOR, *label_words]
        instruction, self.separator, *verdicts = [self._ids(text) for text in pieces]
        self.instruction = instruction
        self.verdicts: list[list[int]] = verdicts
        self.budget = (format_config.max_length - self.markers.n_special - len(self.instruction)
                       - len(self.markers.cue))  # tokens for the query's texts and the examples
        if self.budget < self.markers.per_turn:
            raise ValueError(f"format.max_length={format_config.max_length} leaves {self.budget} tokens after the "
                             f"{self.markers.n_special} special tokens, the {len(self.instruction)}-token instruction "
                             f"and the {len(self.markers.cue)}-token answer cue; raise format.max_length or "
                             "shorten prompting.instruction")
        self.example_floor = self._bare.per_turn + format_config.min_turn_tokens
        shortest_room = prompting.example_max_tokens - max(map(self._overhead, range(len(verdicts))))
        if shortest_room < self._bare.per_turn:
            raise ValueError(f"prompting.example_max_tokens={prompting.example_max_tokens} leaves {shortest_room} "
                             f"tokens for an example's texts after its cue and verdict; raise it")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer([text], add_special_tokens=False)["input_ids"][0] if text else []

    def _overhead(self, label: int) -> int:
        """Tokens of an example that are not its pair: the cue, the verdict and the separator."""
        return len(self.markers.cue) + len(self.verdicts[label]) + len(self.separator)

    def tokenize(self, prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
                 responses_b: Sequence[Sequence[str]]) -> list[TokenTurns]:
        """Each row's turns as token ids, the texts of all rows in one tokenizer call."""
        return tokenize_turns(self.tokenizer, prompts, responses_a, responses_b)

    def body(self, turns: TokenTurns, budget: int) -> list[int]:
        """A pair's interleaved turns cut to `budget` tokens by the formatting truncation policy."""
        limited = self.format.model_copy(update={"max_length": max(budget, 0)})  # markers here reserve nothing
        return assemble(turns, self._bare, limited)[0]

    def build(self, query: TokenTurns, examples: Sequence[tuple[TokenTurns, int]]) -> BuiltPrompt:
        """The prompt of one query with its examples (pairs and labels), the most relevant first.

        Examples are shown in reverse order, so the most relevant one is next to the query.
        """
        query_budget = min(self.budget, self.prompting.query_max_tokens or self.budget)
        query_body = self.body(query, query_budget)
        room = self.budget - len(query_body)
        overheads = [self._overhead(label) for _, label in examples]
        natural = [len(self.body(turns, self.prompting.example_max_tokens - overhead))
                   for (turns, _), overhead in zip(examples, overheads)]
        kept, shares = len(examples), []
        while kept:
            text_room = room - sum(overheads[:kept])
            if text_room >= 0:
                shares = share_budget(natural[:kept], text_room)
                if all(share == length or share >= self.example_floor
                       for share, length in zip(shares, natural[:kept])):
                    break
            kept -= 1  # the least relevant example goes, and the rest share the room again
        rendered: list[int] = []
        for (turns, label), share in reversed(list(zip(examples[:kept], shares))):
            rendered += self.body(turns, share) + self.markers.cue + self.verdicts[label] + self.separator
        ids = (self.markers.prefix + self.instruction + rendered + query_body + self.markers.cue
               + self.markers.suffix)
        assert len(ids) <= self.format.max_length, "the budget arithmetic above keeps every prompt in max_length"
        return BuiltPrompt(ids, kept, len(query_body))


def group_codes(query_groups: Sequence[object], pool_groups: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of query and pool groups (fold numbers, prompt keys, ...), shared across both sides."""
    codes, _ = pd.factorize(pd.Series([*query_groups, *pool_groups], dtype=object))
    return codes[: len(query_groups)], codes[len(query_groups):]


def select_random(query_groups: Sequence[object], pool_groups: Sequence[object], k: int,
                  seed: int) -> list[np.ndarray]:
    """For each query row, up to k distinct pool rows of another group, drawn uniformly without replacement.

    Returns one int array of pool row indices per query row (shorter than k only when fewer pool rows are
    eligible). The draws depend on `seed` and the query order only.
    """
    query_codes, pool_codes = group_codes(query_groups, pool_groups)
    rng = np.random.default_rng(seed)
    counts = np.bincount(pool_codes, minlength=int(max(query_codes.max(initial=0), pool_codes.max(initial=0))) + 1)
    chosen_rows = []
    for code in query_codes:
        eligible = len(pool_codes) - counts[code]
        want = min(k, eligible)
        if want == 0:
            chosen_rows.append(np.zeros(0, dtype=np.int64))
            continue
        if eligible < 4 * want:  # few candidates: draw from the explicit list
            chosen_rows.append(rng.choice(np.flatnonzero(pool_codes != code), size=want, replace=False))
            continue
        chosen: list[int] = []
        while len(chosen) < want:  # rejection sampling: O(k) per row, however large the pool
            for candidate in rng.integers(len(pool_codes), size=2 * want).tolist():
                if pool_codes[candidate] != code and candidate not in chosen and len(chosen) < want:
                    chosen.append(candidate)
        chosen_rows.append(np.asarray(chosen, dtype=np.int64))
    return chosen_rows


def select_similar(query_embeddings: np.ndarray, pool_embeddings: np.ndarray, query_groups: Sequence[object],
                   pool_groups: Sequence[object], k: int) -> list[np.ndarray]:
    """For each query row, the k pool rows of another group with the highest cosine similarity, most similar first.

    Embeddings are (N, D) and (P, D); they are L2-normalised here. Returns one int array per query row.
    """
    if query_embeddings.shape[1] != pool_embeddings.shape[1]:
        raise ValueError(f"query and pool embeddings differ in width: {query_embeddings.shape} vs "
                         f"{pool_embeddings.shape}; embed both with the same model")
    query_codes, pool_codes = group_codes(query_groups, pool_groups)
    queries, pool = (_unit_rows(matrix) for matrix in (query_embeddings, pool_embeddings))
    take = min(k, len(pool))
    chosen_rows: list[np.ndarray] = []
    for start in range(0, len(queries), SIMILARITY_CHUNK_ROWS):
        stop = start + SIMILARITY_CHUNK_ROWS
        similarity = queries[start:stop] @ pool.T  # (chunk, P)
        similarity[query_codes[start:stop, None] == pool_codes[None, :]] = -np.inf  # own group: never an example
        if take == 0:
            chosen_rows += [np.zeros(0, dtype=np.int64)] * len(similarity)
            continue
        top = np.argpartition(-similarity, take - 1, axis=1)[:, :take]  # (chunk, take), unordered
        for row, candidates in zip(similarity, top):
            candidates = candidates[np.argsort(-row[candidates], kind="stable")]
            chosen_rows.append(candidates[np.isfinite(row[candidates])].astype(np.int64))
    return chosen_rows


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def select_examples(selection: Literal["random", "retrieved"], k: int, query_groups: Sequence[object],
                    pool_groups: Sequence[object], seed: int, query_embeddings: np.ndarray | None = None,
                    pool_embeddings: np.ndarray | None = None) -> list[np.ndarray]:
    """The pool rows each query row may show as examples, the most relevant first (`prompting.selection`)."""
    if k == 0:
        return [np.zeros(0, dtype=np.int64) for _ in query_groups]
    if selection == "random":
        return select_random(query_groups, pool_groups, k, seed)
    if selection == "retrieved":
        if query_embeddings is None or pool_embeddings is None:
            raise ValueError("prompting.selection=retrieved needs query and pool embeddings")
        return select_similar(query_embeddings, pool_embeddings, query_groups, pool_groups, k)
    raise ValueError(f"prompting.selection must be 'random' or 'retrieved', got {selection!r}")
