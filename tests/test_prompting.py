"""Zero- and few-shot prompting: prompts within their token budget, examples never from the query's own fold,
and label-word scores of tiny random causal LMs and T5s for every row (no Ray, no training)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from app.config import FormatConfig, PromptingConfig, load_config
from app.data import assign_folds, load_pairs
from app.fewshot import PromptPredictor, load_scoring_model, prompt_cv, prompt_file, score_prompts
from app.formatting import PairEncoder
from app.inference import load_predictor
from app.members import LOGIT_COLUMNS, load_member
from app.metrics import softmax
from app.prompting import PromptBuilder, select_examples, select_random, select_similar
from app.synthetic import generate_pairs
from app.training import load_training_rows, run_directory
from word_tokenizer import WordTokenizer, words


def pair(n, stem):
    return [words(n, f"{stem}p")], [words(n, f"{stem}a")], [words(n, f"{stem}b")]


FORMAT = FormatConfig(max_length=100, answer_cue="Answer:", min_turn_tokens=16)  # per_turn markers: 5 words


def make_builder(fmt=FORMAT, **prompting):
    settings = PromptingConfig(instruction="Judge the pair.", example_max_tokens=40, **prompting)
    tokenizer = WordTokenizer()
    return PromptBuilder(tokenizer, fmt, settings, ("A", "B", "tie")), tokenizer


def tokenized(builder, *pairs):
    return builder.tokenize(*[[p[i] for p in pairs] for i in range(3)])


def test_a_long_query_is_cut_but_never_dropped_and_the_prompt_fits():
    builder, tokenizer = make_builder()
    query, *examples = tokenized(builder, pair(60, "q"), *(pair(30, f"e{i}") for i in range(4)))
    built = builder.build(query, [(example, 0) for example in examples])
    text = tokenizer.words(built.ids)
    assert len(built.ids) <= FORMAT.max_length
    assert built.n_examples == 0 and built.query_tokens == builder.budget  # the query took all the room
    assert text[:4] == ["[CLS]", "Judge", "the", "pair."] and text[-2:] == ["Answer:", "[SEP]"]
    assert text[-3] == "qb59" and "qp0" in text  # the query's head and tail, cut by the truncation policy


def test_examples_are_cut_first_then_the_least_relevant_dropped():
    builder, tokenizer = make_builder(query_max_tokens=40)
    pairs = tokenized(builder, pair(60, "q"), *(pair(30, f"e{i}") for i in range(4)))
    built = builder.build(pairs[0], [(example, 0) for example in pairs[1:]])
    text = tokenizer.words(built.ids)
    assert len(built.ids) <= FORMAT.max_length and built.query_tokens == 40
    # 54 tokens of room after the query: 4 or 3 examples would get 12 or 16 tokens (5 of them markers), 2 get 25.
    assert built.n_examples == 2
    assert "e0p0" in text and "e1p0" in text and not any(word.startswith(("e2", "e3")) for word in text)
    assert text.index("e1p0") < text.index("e0p0") < text.index("qp0")  # the most relevant next to the query

    roomy = make_builder(FormatConfig(max_length=200, answer_cue="Answer:", min_turn_tokens=16),
                         query_max_tokens=40)[0]
    built = roomy.build(pairs[0], [(example, 0) for example in pairs[1:]])
    assert built.n_examples == 4 and len(built.ids) <= 200  # all kept, each cut to its share


def test_zero_shot_is_the_instruction_then_the_row_as_the_pair_encoder_truncates_it():
    builder, tokenizer = make_builder()
    query = pair(60, "q")
    built = builder.build(tokenized(builder, query)[0], [])
    instruction = tokenizer(["Judge the pair."], add_special_tokens=False)["input_ids"][0]
    shorter = FORMAT.model_copy(update={"max_length": FORMAT.max_length - len(instruction)})
    row = PairEncoder(tokenizer, shorter, with_cue=True).encode(*[[part] for part in query])[0]
    assert built.n_examples == 0 and len(built.ids) == FORMAT.max_length
    assert built.ids == row[:1] + instruction + row[1:]


def test_each_example_shows_its_verdict_word_after_the_cue():
    builder, tokenizer = make_builder(FormatConfig(max_length=400, answer_cue="Answer:"))
    query, *examples = tokenized(builder, pair(5, "q"), pair(5, "x"), pair(5, "y"), pair(5, "z"))
    text = tokenizer.words(builder.build(query, list(zip(examples, [0, 1, 2]))).ids)
    verdicts = [text[i + 1] for i, word in enumerate(text) if word == "Answer:"]
    assert verdicts == ["tie", "B", "A", "[SEP]"]  # least relevant (z, tie) first; the query ends the prompt


def test_budgets_that_leave_no_room_for_text_are_refused_with_the_key_to_change():
    with pytest.raises(ValueError, match="raise format.max_length or shorten prompting.instruction"):
        PromptBuilder(WordTokenizer(), FormatConfig(max_length=32, answer_cue="Answer:"),
                      PromptingConfig(instruction=words(30, "i")), ("A", "B", "tie"))
    with pytest.raises(ValueError, match="prompting.example_max_tokens=16"):
        PromptBuilder(WordTokenizer(), FormatConfig(max_length=200, answer_cue=words(12, "c")),
                      PromptingConfig(example_max_tokens=16), ("A", "B", "tie"))


def test_random_examples_never_come_from_the_rows_own_fold():
    groups = [f"prompt {i // 2}" for i in range(60)]  # pairs of rows share a prompt, hence a fold
    folds = assign_folds(groups, 3, seed=0)
    chosen = select_random(folds, folds, k=4, seed=0)
    for row, picks in enumerate(chosen):
        assert len(picks) == len(set(picks)) == 4 and row not in picks
        assert (folds[picks] != folds[row]).all()
    again = select_random(folds, folds, k=4, seed=0)
    assert all((a == b).all() for a, b in zip(chosen, again))
    assert any((a != b).any() for a, b in zip(chosen, select_random(folds, folds, k=4, seed=1)))
    few = select_random(["x"], ["x", "x", "y", "z", "x"], k=4, seed=0)[0]  # only 2 rows are eligible
    assert sorted(few) == [2, 3]


def test_retrieved_examples_are_the_most_similar_rows_of_other_folds():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(40, 8))
    folds = np.arange(40) % 4
    chosen = select_similar(embeddings, embeddings, folds, folds, k=3)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    for row, picks in enumerate(chosen):
        assert row not in picks and (folds[picks] != folds[row]).all()
        others = np.flatnonzero(folds != folds[row])
        expected = others[np.argsort(-similarity[row, others])][:3]
        np.testing.assert_array_equal(picks, expected)  # most similar first
    # A copy of the query in the pool is the nearest row, and is skipped when it shares the query's prompt.
    assert select_similar(embeddings[:1], embeddings[:2], ["p"], ["q", "r"], k=1)[0].tolist() == [0]
    assert select_similar(embeddings[:1], embeddings[:2], ["p"], ["p", "r"], k=1)[0].tolist() == [1]
    assert all(len(p) == 0 for p in select_examples("retrieved", 0, folds, folds, 0))  # k=0: zero-shot
    with pytest.raises(ValueError, match="needs query and pool embeddings"):
        select_examples("retrieved", 2, folds, folds, 0)


def tiny_prompting_config(kind, name, tmp_path, **overrides):
    return load_config(overrides={
        "model.kind": kind, "model.name_or_path": name, "model.dtype": "fp32", "data.builtin_rows": 50,
        "data.max_rows": 30, "data.n_folds": 3, "format.max_length": 320, "prompting.example_max_tokens": 96,
        "prompting.k": 2,
        "predict.precision": "fp32", "run.storage_path": str(tmp_path), "run.name": "prompting", **overrides})


@pytest.mark.parametrize("kind, name, selection, k", [
    ("decoder_lm", "random:qwen2-tiny", "retrieved", 2),
    ("decoder_lm", "random:llama-tiny", "random", 0),
    ("t5", "random:t5-tiny", "random", 2),
])
def test_prompting_writes_a_member_with_valid_probabilities_for_every_row(kind, name, selection, k, tmp_path):
    """Every training row gets finite logits from a prompt with examples of other folds only.

    The models have random weights and nothing is trained, so they cannot beat uniform guessing (ln 3); this
    checks the plumbing and the member format, not that prompting works.
    """
    config = tiny_prompting_config(kind, name, tmp_path, **{"prompting.selection": selection, "prompting.k": k})
    member = prompt_cv(config)
    frame, _ = load_training_rows(config, run_directory(config))
    assert sorted(member.oof["id"]) == sorted(frame["id"].astype(str)) and len(member.oof) == 30
    probs = softmax(member.oof_logits)
    assert np.isfinite(member.oof_logits).all() and np.allclose(probs.sum(1), 1) and (probs > 0).all()
    assert [fold["fold"] for fold in member.meta["folds"]] == [0, 1, 2]
    assert 0 < member.meta["mean_examples"] <= k if k else member.meta["mean_examples"] == 0
    assert load_member(member.directory).meta["oof_log_loss"] == pytest.approx(member.meta["oof_log_loss"])


@pytest.mark.parametrize("selection, k", [("retrieved", 2), ("random", 0)])
def test_a_fold_checkpoint_predicts_what_the_member_scored_out_of_fold(selection, k, tmp_path):
    """Each fold of a prompting member is a checkpoint (its example pool: the other folds' rows) that
    load_predictor serves like a trained one, so ensemble specs, predict and Serve take prompting members."""
    config = tiny_prompting_config("decoder_lm", "random:qwen2-tiny", tmp_path,
                                   **{"prompting.selection": selection, "prompting.k": k})
    member = prompt_cv(config)
    frame, _ = load_training_rows(config, run_directory(config))
    fold = member.meta["folds"][1]
    predictor = load_predictor(fold["checkpoint"], precision="fp32")
    assert isinstance(predictor, PromptPredictor) and len(predictor.pool) == (30 - fold["rows"] if k else 0)
    scored = member.oof[member.oof["fold"] == 1]
    rows = frame.set_index(frame["id"].astype(str)).loc[scored["id"]]
    texts = (list(rows["prompt"]), list(rows["response_a"]), list(rows["response_b"]))
    np.testing.assert_allclose(predictor.predict_logits(*texts), scored[list(LOGIT_COLUMNS)].to_numpy(), atol=1e-4)
    forward = predictor.predict(*texts, tta_swap=True)
    backward = predictor.predict(texts[0], texts[2], texts[1], tta_swap=True)
    np.testing.assert_allclose(forward[:, [1, 0, 2]], backward, atol=1e-5)  # TTA stays equivariant
    meta = json.loads((Path(fold["checkpoint"]) / "arena.json").read_text())
    shares = np.bincount(frame.loc[~frame["id"].astype(str).isin(scored["id"]), "label"], minlength=3)
    np.testing.assert_allclose(meta["train_priors"], shares / shares.sum())  # the other folds' class shares


def test_prompt_scores_are_the_label_token_logits_of_the_causal_lm(tmp_path):
    config = tiny_prompting_config("decoder_lm", "random:qwen2-tiny", tmp_path)
    model, tokenizer = load_scoring_model(config, torch.device("cpu"))
    builder = PromptBuilder(tokenizer, config.format, config.prompting, config.model.label_words)
    frame = generate_pairs(4, seed=3)
    rows = builder.tokenize(*[[json.loads(cell) for cell in frame[column]]
                              for column in ("prompt", "response_a", "response_b")])
    prompts = [builder.build(rows[0], [(rows[1], 0), (rows[2], 2)]).ids, builder.build(rows[3], []).ids]
    logits = score_prompts(model, prompts, tokenizer.pad_token_id, torch.device("cpu"), 10_000, None)
    label_ids = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in config.model.label_words]
    for prompt, row_logits in zip(prompts, logits):
        with torch.no_grad():
            expected = model.model(input_ids=torch.tensor([prompt])).logits[0, -1, label_ids]
        np.testing.assert_allclose(row_logits, expected.numpy(), atol=1e-4)
    assert len(prompts[0]) <= config.format.max_length


def test_swap_tta_makes_file_scores_swap_with_a_and_b(tmp_path):
    config = tiny_prompting_config("t5", "random:t5-tiny", tmp_path, **{"predict.tta_swap": True})
    load_training_rows(config, run_directory(config))  # writes the built-in files, holdout.csv among them
    raw = pd.read_csv(tmp_path / "prompting" / "builtin_data" / "holdout.csv", dtype=str, keep_default_na=False)
    raw = raw.head(20)
    holdout = tmp_path / "plain.csv"
    raw.to_csv(holdout, index=False)
    swapped = raw.rename(columns={"response_a": "response_b", "response_b": "response_a",
                                  "winner_model_a": "winner_model_b", "winner_model_b": "winner_model_a"})
    swapped.to_csv(tmp_path / "swapped.csv", index=False)
    plain, mirrored = prompt_file(config, str(holdout)), prompt_file(config, str(tmp_path / "swapped.csv"))
    assert len(plain.logits) == len(load_pairs(str(holdout)).frame) and set(plain.metrics) == {"log_loss", "accuracy"}
    np.testing.assert_allclose(softmax(mirrored.logits), softmax(plain.logits)[:, [1, 0, 2]], atol=1e-5)
    assert plain.metrics["log_loss"] == pytest.approx(mirrored.metrics["log_loss"], abs=1e-5)
    assert plain.examples_kept.mean() > 1  # k=2; a long query leaves no room for some rows' examples
    assert list(LOGIT_COLUMNS) == ["logit_a", "logit_b", "logit_tie"]


def test_prompt_building_needs_neither_torch_nor_ray():
    import subprocess
    import sys

    code = "import app.prompting, sys; assert not {'torch', 'ray'} & set(sys.modules), 'heavy import'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_model_kind_without_label_words_is_refused_before_any_work(tmp_path):
    config = load_config(overrides={"model.kind": "encoder", "run.storage_path": str(tmp_path)})
    with pytest.raises(ValueError, match=r"set model.kind to one of \['decoder_lm', 't5'\]"):
        prompt_cv(config)
    assert not any(tmp_path.iterdir())  # nothing written
