"""Row -> token ids: multi-turn interleaving under one shared token budget, and the A/B swap.

Layout of one row (turns in order, each turn interleaved):

    [specials] Prompt: p_1 Response A: a_1 Response B: b_1 ... Prompt: p_n ... Response B: b_n [cue] [specials]

The answer cue (`format.answer_cue`, e.g. "Which response is better: A, B or tie? Answer:") ends the text
for model kinds that read it as a question: decoder, decoder_lm and t5 (see `build_pair_encoder`); an
encoder's [CLS] head needs none. A decoder_lm predicts the label word right after it.

Truncation policy, all counted in tokens of the model's own tokenizer:
0. A context block given with the row (the retrieved neighbours of app/retrieval.py, already cut to its own
   cap, `retrieval.max_tokens`) comes right after the leading specials and is kept whole; the turns get
   the rest of the budget, so the row stays within `max_length` and the query keeps at least
   `max_length - retrieval.max_tokens` (without a context nothing changes).
1. The budget is `max_length` minus the tokenizer's special tokens (e.g. [CLS] ... [SEP]) and minus the
   answer cue when there is one: the cue is always kept whole.
2. Turns are taken from the latest backwards and kept whole while they fit: the latest turns matter most.
3. The first turn that does not fit whole is kept cut when at least `min_turn_tokens` remain for its
   texts (the latest turn is always kept, however little room there is); older turns are dropped.
4. A cut turn shares its room max-min fairly between prompt, response A and response B (water-filling):
   short texts are kept whole and the longer ones get equal shares of what is left, so A and B are
   treated symmetrically.
5. A cut text keeps its head and its tail (`head_fraction` of the kept tokens from the head), joined by
   an ellipsis marker: openings and conclusions of long responses carry most of the signal.

Segment ids mark response B (its marker and text) as segment 1 and everything else as segment 0, the
sentence-pair convention of BERT-style encoders: the model can tell A's tokens from B's directly, which
makes comparing them much easier to learn (models without segment embeddings ignore them).
This module depends on nothing but a tokenizer object and is tested without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from app.config import Config, FormatConfig

CUE_KINDS = frozenset({"decoder", "decoder_lm", "t5"})  # model kinds whose input ends with the answer cue
MARKERS = {"prompt": "Prompt:", "response_a": "Response A:", "response_b": "Response B:", "ellipsis": "[...]"}
SWAPPED_LABEL = (1, 0, 2)  # A wins <-> B wins; a tie stays a tie


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer that formatting uses."""

    def __call__(self, text: list[str], add_special_tokens: bool = ...) -> dict[str, list[list[int]]]: ...



@dataclass(frozen=True)
class Markers:
    """Token ids of the fixed marker strings, tokenized once per tokenizer."""

    prompt: list[int]
    response_a: list[int]
    response_b: list[int]
    ellipsis: list[int]
    prefix: list[int]  # special tokens the tokenizer puts before a text, e.g. [CLS] or <bos>
    suffix: list[int]  # and after it, e.g. [SEP] or </s>
    cue: list[int] = field(default_factory=list)  # the answer cue, between the body and the suffix

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.suffix)

    @property
    def n_reserved(self) -> int:
        """Tokens of every row that are not text or turn markers: specials and the cue."""
        return self.n_special + len(self.cue)

    @property
    def closing(self) -> list[int]:
        """What every encoded row ends with: the cue, then the tokenizer's suffix."""
        return self.cue + self.suffix

    @property
    def per_turn(self) -> int:
        return len(self.prompt) + len(self.response_a) + len(self.response_b)


def build_markers(tokenizer: Tokenizer, answer_cue: str = "") -> Markers:
    """Tokenize the marker strings (and the answer cue, if any) with the model's tokenizer."""
    names = list(MARKERS)
    ids = tokenizer([MARKERS[name] for name in names], add_special_tokens=False)["input_ids"]
    by_name = dict(zip(names, ids))
    # Learn the specials by difference: with = prefix + without + suffix, for BERT, Llama, T5 alike.
    probe = "probe"
    without, with_specials = (tokenizer([probe], add_special_tokens=flag)["input_ids"][0] for flag in (False, True))
    start = next(i for i in range(len(with_specials)) if with_specials[i : i + len(without)] == without)
    prefix, suffix = with_specials[:start], with_specials[start + len(without) :]
    cue = tokenizer([answer_cue], add_special_tokens=False)["input_ids"][0] if answer_cue else []
    return Markers(**by_name, prefix=prefix, suffix=suffix, cue=cue)


def share_budget(lengths: Sequence[int], budget: int) -> list[int]:
    """Split `budget` tokens max-min fairly between texts of the given lengths (water-filling).

    Texts shorter than their fair share keep all their tokens; the rest split what remains equally.
    The result sums to min(budget, sum(lengths)); equal lengths get equal shares up to one token.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if sum(lengths) <= budget:
        return list(lengths)
    shares = [0] * len(lengths)
    remaining = budget
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for rank, index in enumerate(order):
        share = min(lengths[index], remaining // (len(order) - rank))
        shares[index] = share
        remaining -= share
    # Integer division may leave < n tokens unassigned; give them to the longest texts, one each.
    for index in reversed(order):
        if remaining == 0:
            break
        if shares[index] < lengths[index]:
            shares[index] += 1
            remaining -= 1
    return shares


def keep_head_tail(ids: list[int], keep: int, head_fraction: float, ellipsis: list[int]) -> list[int]:
    """Cut `ids` to `keep` tokens, keeping its head and tail joined by the ellipsis marker."""
    if len(ids) <= keep:
        return ids
    if keep <= len(ellipsis):
        return ids[:keep]
    room = keep - len(ellipsis)
    head = round(room * head_fraction)
    tail = room - head
    return ids[:head] + ellipsis + (ids[len(ids) - tail :] if tail else [])


def assemble(
    turns: Sequence[tuple[list[int], list[int], list[int]]],
    markers: Markers,
    config: FormatConfig,
    reserved: int = 0,
) -> tuple[list[int], list[int]]:
    """Interleave tokenized (prompt, response_a, response_b) turns under the budget.

    `reserved` tokens of the budget are held back for a context block placed before the turns.
    Returns the body's token ids and segment ids (1 on response B, 0 elsewhere), without specials or cue.
    """
    budget = config.max_length - markers.n_reserved - reserved
    kept: list[tuple[list[int], list[int]]] = []
    remaining = budget
    for turn_index in range(len(turns) - 1, -1, -1):
        pieces = turns[turn_index]
        cost = markers.per_turn + sum(len(piece) for piece in pieces)
        if cost <= remaining:
            kept.append(_interleave(pieces, markers))
            remaining -= cost
            continue
        room = remaining - markers.per_turn
        if room >= config.min_turn_tokens or not kept:
            shares = share_budget([len(piece) for piece in pieces], max(room, 0))
            cut = [keep_head_tail(p, s, config.head_fraction, markers.ellipsis) for p, s in zip(pieces, shares)]
            kept.append(_interleave(cut, markers))
        break
    body = [token for turn in reversed(kept) for token in turn[0]]
    segments = [segment for turn in reversed(kept) for segment in turn[1]]
    return body[:budget], segments[:budget]  # [:budget] only bites when markers alone overflow a tiny max_length


def _interleave(pieces: Sequence[list[int]], markers: Markers) -> tuple[list[int], list[int]]:
    prompt, response_a, response_b = pieces
    first = markers.prompt + prompt + markers.response_a + response_a
    second = markers.response_b + response_b
    return first + second, [0] * len(first) + [1] * len(second)


class PairEncoder:
    """Encode rows of (prompt, response_a, response_b) turn lists into model inputs.

    With `with_cue` every row ends with `config.answer_cue` (before the tokenizer's suffix).
    """

    def __init__(self, tokenizer: Tokenizer, config: FormatConfig, with_cue: bool = False) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.markers = build_markers(tokenizer, config.answer_cue if with_cue else "")
        if config.max_length - self.markers.n_reserved < self.markers.per_turn:
            cue = f" and the {len(self.markers.cue)}-token answer cue" if with_cue else ""
            raise ValueError(f"format.max_length={config.max_length} leaves no room for text after the "
                             f"{self.markers.n_special} special tokens{cue}; raise it")

    def encode(
        self,
        prompts: Sequence[Sequence[str]],
        responses_a: Sequence[Sequence[str]],
        responses_b: Sequence[Sequence[str]],
        swap: bool = False,
        contexts: Sequence[Sequence[int]] | None = None,
    ) -> list[list[int]]:
        """Token ids per row; `swap=True` encodes each row with A and B exchanged."""
        return self.encode_with_segments(prompts, responses_a, responses_b, swap, contexts)[0]

    def encode_with_segments(
        self,
        prompts: Sequence[Sequence[str]],
        responses_a: Sequence[Sequence[str]],
        responses_b: Sequence[Sequence[str]],
        swap: bool = False,
        contexts: Sequence[Sequence[int]] | None = None,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and segment ids per row (specials get segment 0).

        `contexts` are token ids put before each row's turns as they are (segment 0), e.g. the neighbour block
        of app/retrieval.py; the turns get the budget minus the context's length (rule 0 of the policy).
        """
        if contexts is not None and len(contexts) != len(prompts):
            raise ValueError(f"got {len(contexts)} contexts for {len(prompts)} rows; pass one per row (or None)")
        if swap:
            responses_a, responses_b = responses_b, responses_a
        encoded, segments = [], []
        for row, turns in enumerate(tokenize_turns(self.tokenizer, prompts, responses_a, responses_b)):
            context = list(contexts[row]) if contexts is not None else []
            if self.config.max_length - self.markers.n_reserved - len(context) < self.markers.per_turn:
                raise ValueError(f"row {row}: its {len(context)}-token context leaves no room for its texts within "
                                 f"format.max_length={self.config.max_length}; give the context fewer tokens")
            body, body_segments = assemble(turns, self.markers, self.config, reserved=len(context))
            encoded.append(self.markers.prefix + context + body + self.markers.closing)
            segments.append([0] * (len(self.markers.prefix) + len(context)) + body_segments
                            + [0] * len(self.markers.closing))
        return encoded, segments


def tokenize_turns(tokenizer: Tokenizer, prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
                   responses_b: Sequence[Sequence[str]]) -> list[list[tuple[list[int], list[int], list[int]]]]:
    """Per row, its (prompt, A, B) token ids turn by turn (a missing turn is empty), every text of the batch
    tokenized in one call (fast tokenizers parallelise it), without special tokens."""
    flat: list[str] = []
    shapes: list[int] = []
    for prompt, response_a, response_b in zip(prompts, responses_a, responses_b, strict=True):
        n_turns = max(len(prompt), len(response_a), len(response_b))
        shapes.append(n_turns)
        for turns in (prompt, response_a, response_b):
            flat.extend(turns[t] if t < len(turns) else "" for t in range(n_turns))
    ids = tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"] if flat else []
    rows, cursor = [], 0
    for n_turns in shapes:
        prompt_ids, a_ids, b_ids = (ids[cursor + i * n_turns : cursor + (i + 1) * n_turns] for i in range(3))
        rows.append(list(zip(prompt_ids, a_ids, b_ids)))
        cursor += 3 * n_turns
    return rows


def build_pair_encoder(tokenizer: Tokenizer, config: Config) -> PairEncoder:
    """The encoder for `config.model.kind`: the answer cue for decoder, decoder_lm and t5, none for encoder."""
    return PairEncoder(tokenizer, config.format, with_cue=config.model.kind in CUE_KINDS)


def swap_labels(labels: Sequence[int]) -> list[int]:
    """The labels of the A/B-swapped rows."""
    return [SWAPPED_LABEL[label] for label in labels]
