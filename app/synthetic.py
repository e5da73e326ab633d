"""Deterministic generator of an arena-like preference dataset in Kaggle's exact CSV format.

Each response gets a latent quality from features its text shows (refusals, relevant detail with
diminishing returns, structure, correctness, off-topic content, hedging, missing turns) plus a per-model
bias and hidden noise. The winner is drawn from a Davidson (Bradley-Terry with ties) model on the
quality difference, so the signal is learnable from the text but never certain.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

TRAIN_COLUMNS = ["id", "model_a", "model_b", "prompt", "response_a", "response_b",
                 "winner_model_a", "winner_model_b", "winner_tie"]
TEST_COLUMNS = ["id", "prompt", "response_a", "response_b"]
SUBMISSION_COLUMNS = ["id", "winner_model_a", "winner_model_b", "winner_tie"]

TIE_STRENGTH = 2.2  # Davidson's nu: P(tie) = nu / (e^(d/2) + e^(-d/2) + nu); about 30% ties
NOISE_SD = 0.4  # hidden per-response quality noise that no text feature shows
TEXT_WEIGHT = 2.5  # scale of the quality that the text shows (strong enough for MiniLM to pick up in minutes)
ID_RANGE = (10_000, 4_294_967_295)
T = TypeVar("T")
ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul}

TOPICS = ("photosynthesis|blockchain|black holes|the immune system|compound interest|neural networks|"
          "volcanoes|TCP/IP networking|the French Revolution|vaccines|climate change|quantum computing|"
          "the stock market|plate tectonics|the water cycle|crème brûlée|public-key cryptography|"
          "the Roman Empire|jazz music|electric cars|sleep|inflation|DNA replication|rainbows|GPS|"
          "coffee brewing|meditation|recycling|São Paulo|solar panels|honeybees|input/output buffering|"
          "chess openings|marathon training|origami|the Moon landing|naïve Bayes classifiers|"
          "supply and demand|the printing press|tides").split("|")
NOUNS = ("energy|feedback loops|small incremental changes|the underlying structure|trade-offs|timing|"
         "measurement|the surrounding environment|cost|long-term stability|simple building blocks|"
         "careful planning|pressure|information flow|resource limits|human behaviour|error correction|"
         "scale|repetition|randomness|local rules|the input/output ratio").split("|")
VERBS = "improve|shape|control|limit|accelerate|stabilize|predict|transform|balance|organize".split("|")
ANALOGIES = ("a kitchen recipe|a busy highway|a library catalogue|a relay race|a thermostat|a garden|"
             "a postal system|an orchestra|a savings jar|a row of dominoes").split("|")
DETAIL = ("{T} depends mainly on {n1} and {n2}.|A key idea in {t} is that {n1} affects {n2}.|"
          "In practice, {t} is used to {v} {n1}.|A common misconception about {t} is that it ignores {n1}.|"
          "You can think of {t} like {a}: {n1} drives everything else.|"
          "To understand {t}, start with {n1}, then look at {n2}.|"
          "Researchers study {t} to {v} {n1} more reliably.|The main trade-off in {t} is {n1} versus {n2}.|"
          "{T} works best when {n1} is kept under control.|For example, {t} can {v} {n1} within days.|"
          "Historically, {t} changed how people {v} {n1}.|"
          "Measured carefully, {t} shows a 20/80 split between {n1} and {n2}.").split("|")
VAGUE = ("This is a really interesting area.|There are many factors to consider here.|"
         "It depends on the situation.|Everyone has their own view on this.|"
         "Things can vary quite a lot.|It is a complex topic with many sides.").split("|")
REFUSALS = ("I'm sorry, but I can't help with that.|I'm sorry, but I cannot assist with this request.|"
            "Unfortunately, I am not able to provide that information.|"
            "I apologize, but I won't be able to help with that request.").split("|")
HEDGES = ("As an AI language model, I don't have personal opinions, but|As an AI, I cannot be certain, but|"
          "I'm just an AI language model, so please double-check this, but").split("|")
OPENERS = ("", "", "Sure!", "Great question!", "Certainly.", "Of course!", "Of course! 😊", "Absolutely.",
           "Happy to help!", "Here you go:", "Okay.")
CLOSERS = ("|I hope this helps!|Let me know if you have any other questions.|"
           "Feel free to ask for more details.|Good luck!").split("|")
EXPLAIN = ("Explain how {t} works.|Can you explain {t} in simple terms?|What should a beginner know about {t}?|"
           "Give me an overview of {t}.|Why is {t} important?|What are the pros and cons of {t}?|"
           "Summarize the key ideas behind {t}.|Tell me something surprising about {t}.").split("|")
CAPITAL = ("What is the capital of {c}?|Which city is the capital of {c}?|Name the capital city of {c}.|"
           "Tell me the capital of {c} and one fact about it.|Where is the seat of government of {c}?").split("|")
CODE = ("Write a Python function that {t}.|How do I write Python code that {t}?|"
        "Show me a Python snippet that {t}.|I need a small Python helper that {t}.").split("|")
CODE_NOTES = ("This function makes a single pass over the input.|It uses only the standard library.|"
              "Add type hints if you want stricter checks.|Test it with a few small examples first.|"
              "Edge cases such as empty input deserve a unit test.|You can import it from any module.").split("|")
POEM = "Write a short poem about {t}.|Write a haiku about {t}.|Compose a few lines of verse on {t}.".split("|")
POEM_LINES = ("O {t}, you {v} the quiet dawn,|Through {n1} your patient rhythm flows,|"
              "In {n1} and {n2} you live and breathe,|We watch {t} turn the turning year,|"
              "And still you {v} what no one knows,|Beneath the sky, {t} carries on.").split("|")
PREFIXES = ("", "Hi! ", "Hello. ", "Quick question: ", "Please help: ", "Hey, ", "I'm a student. ",
            "I'm preparing for an exam. ", "My friend asked me this: ", "Curious: ", "For a school project: ",
            "I work in marketing. ")
SUFFIXES = ("", "", " Keep it short.", " Use examples.", " Be detailed.", " Thanks!", " Thank you in advance.",
            " Explain it like I'm five.", " Please be accurate.", " No jargon, please.", " Thanks a lot!",
            " I'd appreciate a clear answer.")
CAPITALS = (("Brazil", "Brasília"), ("Iceland", "Reykjavík"), ("Colombia", "Bogotá"), ("France", "Paris"),
            ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Turkey", "Ankara"),
            ("Vietnam", "Hanoi"), ("Germany", "Berlin"), ("Morocco", "Rabat"), ("Poland", "Warsaw"))
CODE_TASKS = (("reverses a string", "def reverse(text):\n    return text[::-1]"),
              ("computes the average of a list", "def average(xs):\n    return sum(xs) / len(xs)"),
              ("counts the vowels in a word",
               "def count_vowels(word):\n    return sum(c in 'aeiou' for c in word)"),
              ("returns the largest element of a list", "def largest(xs):\n    return max(xs)"),
              ("checks whether a year is a leap year",
               "def is_leap(y):\n    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)"),
              ("converts km/h to m/s", "def kmh_to_ms(speed):\n    return speed / 3.6"),
              ("removes duplicates from a list", "def dedupe(xs):\n    return list(dict.fromkeys(xs))"),
              ("joins a folder and a file name into a path", "def join(folder, name):\n    return folder + '/' + name"))


@dataclass(frozen=True)
class ModelProfile:
    """A fictional chatbot's habits: how it writes, and a hidden quality offset."""

    name: str
    detail: float  # mean count of relevant sentences per answer
    structure: float  # P(bullets or numbered steps)
    refusal: float
    hedge: float
    off_topic: float
    accuracy: float  # P(correct fact, sum or code)
    vague: float  # mean count of content-free filler sentences
    bias: float


MODELS = (
    ModelProfile("atlas-70b", 5.0, 0.55, 0.04, 0.05, 0.02, 0.92, 0.3, 0.1),
    ModelProfile("breeze-7b", 1.5, 0.10, 0.10, 0.15, 0.10, 0.60, 0.8, -0.1),
    ModelProfile("cobalt-13b", 3.0, 0.30, 0.08, 0.10, 0.06, 0.75, 0.5, 0.0),
    ModelProfile("delta-mini", 1.2, 0.15, 0.20, 0.25, 0.08, 0.65, 0.6, -0.1),
    ModelProfile("ember-34b", 4.0, 0.20, 0.06, 0.40, 0.04, 0.85, 0.8, 0.0),
    ModelProfile("fjord-8x7b", 4.5, 0.70, 0.05, 0.05, 0.03, 0.85, 0.3, 0.1),
    ModelProfile("granite-3b", 1.0, 0.05, 0.12, 0.10, 0.15, 0.45, 1.0, -0.1),
    ModelProfile("halo-chat-v2", 3.0, 0.40, 0.30, 0.30, 0.02, 0.88, 0.4, 0.0),
)


@dataclass(frozen=True)
class TurnSpec:
    """One user turn: what kind of question it is, its subject, its text and the correct answer."""

    kind: str
    subject: str
    text: str
    answer: str = ""


def encode_turns(turns: list[str | None]) -> str:
    """Encode turns exactly like Kaggle: compact ASCII JSON with '/' written as '\\/'."""
    return json.dumps(turns, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/")


def _pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    return items[int(rng.integers(len(items)))]


def _draw_turn(rng: np.random.Generator) -> TurnSpec:
    """Draw one user turn: explanations mostly, then code, poems, capitals and arithmetic."""
    kind = str(rng.choice(["explain", "code", "poem", "capital", "math"], p=[0.58, 0.14, 0.10, 0.09, 0.09]))
    prefix, suffix = _pick(rng, PREFIXES), _pick(rng, SUFFIXES)
    if kind == "code":
        task, code = _pick(rng, CODE_TASKS)
        return TurnSpec(kind, task, prefix + _pick(rng, CODE).format(t=task) + suffix, code)
    if kind == "capital":
        country, city = _pick(rng, CAPITALS)
        return TurnSpec(kind, country, prefix + _pick(rng, CAPITAL).format(c=country) + suffix, city)
    if kind == "math":
        a, b, op = int(rng.integers(2, 100)), int(rng.integers(2, 100)), _pick(rng, "+-*")
        expr = f"{a} {op} {b}"
        return TurnSpec(kind, expr, f"{prefix}What is {expr}?", str(ARITHMETIC[op](a, b)))
    topic = _pick(rng, TOPICS)
    template = _pick(rng, EXPLAIN if kind == "explain" else POEM)
    return TurnSpec(kind, topic, prefix + template.format(t=topic) + suffix)


def _detail_sentences(rng: np.random.Generator, topic: str, count: int, templates: Sequence[str]) -> list[str]:
    """`count` sentences about `topic` from random templates and fillers."""
    out = []
    for _ in range(count):
        n1, n2 = rng.choice(len(NOUNS), size=2, replace=False)
        template, verb, analogy = _pick(rng, templates), _pick(rng, VERBS), _pick(rng, ANALOGIES)
        capitalized = topic[:1].upper() + topic[1:]
        out.append(template.format(t=topic, T=capitalized, n1=NOUNS[n1], n2=NOUNS[n2], v=verb, a=analogy))
    return out


def _body(rng: np.random.Generator, spec: TurnSpec, model: ModelProfile, long: bool) -> tuple[list[str], float]:
    """Content sentences of an answer and their quality: relevance, detail, structure, correctness."""
    subject, score = spec.subject, 0.0
    if spec.kind in ("explain", "poem") and rng.random() < model.off_topic:
        subject = _pick(rng, [t for t in TOPICS if t != spec.subject])
        score -= 1.6
    count = int(min(rng.poisson(model.detail), 8))
    if spec.kind == "poem":
        lines = _detail_sentences(rng, subject, max(count, 2), POEM_LINES)
        return ["\n".join(lines)], score + 0.7 * math.log1p(len(lines))
    correct = rng.random() < model.accuracy
    if spec.kind == "capital":
        city = spec.answer if correct else _pick(rng, [c for _, c in CAPITALS if c != spec.answer])
        sentences = [f"The capital of {spec.subject} is {city}."]
        sentences += [f"{city} is known for {NOUNS[int(rng.integers(len(NOUNS)))]}." for _ in range(min(count, 2))]
        return sentences, score + (1.0 if correct else -1.4)
    if spec.kind == "math":
        answer = spec.answer if correct else str(int(spec.answer) + int(_pick(rng, (-10, -2, -1, 1, 2, 10))))
        work = ["Let's work it out step by step."] if count >= 2 else []
        return work + [f"{spec.subject} is {answer}."], score + (1.0 if correct else -1.4) + 0.2 * len(work)
    if spec.kind == "code":
        code = spec.answer if correct else spec.answer.split("\n")[0] + "\n    pass  # TODO: fill this in"
        notes = [str(note) for note in rng.choice(CODE_NOTES, size=min(count, 3), replace=False)]
        return [f"```python\n{code}\n```"] + notes, score + (1.0 if correct else -1.2) + 0.3 * math.log1p(len(notes))
    sentences = _detail_sentences(rng, subject, count, DETAIL)
    if long:  # 400-1400 words, so that truncation matters
        target, words = int(rng.integers(400, 1400)), sum(len(sentence.split()) for sentence in sentences)
        while words < target:
            sentences += _detail_sentences(rng, subject, 1, DETAIL)
            words += len(sentences[-1].split())
    return sentences, score + 1.0 * math.log1p(min(len(sentences), 16))  # diminishing returns, capped


def _respond(rng: np.random.Generator, spec: TurnSpec, model: ModelProfile, long: bool) -> tuple[str, float]:
    """Write one answer turn in the model's style and return it with its text-visible quality."""
    if rng.random() < model.refusal and not long:
        extra = " Is there anything else I can help with?" if rng.random() < 0.5 else ""
        return _pick(rng, REFUSALS) + extra, -2.5
    sentences, score = _body(rng, spec, model, long)
    structured = len(sentences) >= 3 and spec.kind == "explain" and rng.random() < model.structure
    if structured:
        numbered = rng.random() < 0.5
        sentences = [f"{i + 1}. {s}" if numbered else f"- {s}" for i, s in enumerate(sentences)]
        score += 0.5
    n_vague = int(rng.poisson(model.vague))
    for _ in range(n_vague):
        sentences.insert(int(rng.integers(len(sentences) + 1)), _pick(rng, VAGUE))
    score -= 0.15 * n_vague
    head = [_pick(rng, OPENERS)]
    if rng.random() < model.hedge:
        head.append(_pick(rng, HEDGES) + " here is what I can say.")
        score -= 0.5
    parts = head + sentences + [_pick(rng, CLOSERS)]
    joiner = "\n" if structured or spec.kind == "code" else " "
    return joiner.join(p for p in parts if p), score


def _outcome(rng: np.random.Generator, diff: float) -> int:
    """Draw 0 (A wins), 1 (B wins) or 2 (tie) from Davidson's model for quality difference `diff`."""
    weights = np.array([math.exp(diff / 2), math.exp(-diff / 2), TIE_STRENGTH])
    return int(rng.choice(3, p=weights / weights.sum()))


def _draw_ids(rng: np.random.Generator, n: int, exclude: set[int]) -> list[int]:
    ids: list[int] = []
    seen = set(exclude)
    while len(ids) < n:
        for value in rng.integers(ID_RANGE[0], ID_RANGE[1], size=n - len(ids)).tolist():
            if value not in seen:
                seen.add(value)
                ids.append(value)
    return ids


def _answer_turns(
    rng: np.random.Generator, specs: list[TurnSpec], model: ModelProfile
) -> tuple[list[str | None], float]:
    """Write one side's answers to all turns; return them with the side's latent quality."""
    explain_turns = [i for i, spec in enumerate(specs) if spec.kind == "explain"]
    long_turn = _pick(rng, explain_turns) if explain_turns and rng.random() < 0.045 else -1
    answers = [_respond(rng, spec, model, i == long_turn) for i, spec in enumerate(specs)]
    texts: list[str | None] = [text for text, _ in answers]
    scores = [score for _, score in answers]
    if rng.random() < 0.01:  # a lost answer: Kaggle writes it as a JSON null
        missing = int(rng.integers(len(texts)))
        texts[missing], scores[missing] = None, -2.0
    return texts, TEXT_WEIGHT * float(np.mean(scores)) + model.bias + rng.normal(0.0, NOISE_SD)


def _generate(rng: np.random.Generator, n_rows: int, exclude_prompts: frozenset[str] = frozenset(),
              exclude_ids: frozenset[int] = frozenset()) -> pd.DataFrame:
    """Generate battles from one rng stream, never reusing a prompt in `exclude_prompts`."""
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    rows: list[dict[str, object]] = []
    past_specs: list[list[TurnSpec]] = []
    for row_id in _draw_ids(rng, n_rows, set(exclude_ids)):
        while True:
            if past_specs and rng.random() < 0.03:  # duplicated prompts, as in Kaggle's data
                specs = _pick(rng, past_specs)
            else:
                specs = [_draw_turn(rng) for _ in range(int(rng.integers(2, 5)) if rng.random() < 0.10 else 1)]
            prompt = encode_turns([spec.text for spec in specs])
            if prompt not in exclude_prompts:
                break
        past_specs.append(specs)
        model_a, model_b = (MODELS[i] for i in rng.choice(len(MODELS), size=2, replace=False))
        texts_a, quality_a = _answer_turns(rng, specs, model_a)
        texts_b, quality_b = _answer_turns(rng, specs, model_b)
        if rng.random() < 0.01:  # unequal turn counts between the two responses
            texts = texts_a if rng.random() < 0.5 else texts_b
            if len(texts) > 1:
                texts.pop()
            else:
                texts.append(_pick(rng, REFUSALS))
        label = _outcome(rng, quality_a - quality_b)
        rows.append({"id": row_id, "model_a": model_a.name, "model_b": model_b.name, "prompt": prompt,
                     "response_a": encode_turns(texts_a), "response_b": encode_turns(texts_b),
                     "winner_model_a": int(label == 0), "winner_model_b": int(label == 1),
                     "winner_tie": int(label == 2)})
    return pd.DataFrame(rows, columns=TRAIN_COLUMNS).astype({"id": "int64"})


def generate_pairs(n_rows: int, seed: int = 0) -> pd.DataFrame:
    """Generate n_rows arena-like battles in Kaggle's train.csv format (text cells JSON-encoded)."""
    return _generate(np.random.default_rng([seed, 1]), n_rows)


def write_builtin_dataset(out_dir: str, n_train: int = 2000, n_test: int = 500, seed: int = 0) -> dict[str, str]:
    """Write train.csv, test.csv, sample_submission.csv and holdout.csv (test rows with labels) into out_dir.

    Test rows come from a separate rng stream and never repeat a train prompt. Returns paths by name:
    'train', 'test', 'sample_submission', 'holdout'.
    """
    train = generate_pairs(n_train, seed)
    holdout = _generate(np.random.default_rng([seed, 2]), n_test,
                        exclude_prompts=frozenset(train["prompt"]), exclude_ids=frozenset(train["id"].tolist()))
    submission = pd.DataFrame({"id": holdout["id"]})
    for column in SUBMISSION_COLUMNS[1:]:
        submission[column] = "0.333333"
    frames = {"train": train, "test": holdout[TEST_COLUMNS], "sample_submission": submission, "holdout": holdout}
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in frames.items():
        path = directory / f"{name}.csv"
        frame.to_csv(path, index=False, lineterminator="\n")
        paths[name] = str(path)
    return paths

