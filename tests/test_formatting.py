"""Formatting: exact token budgets, the truncation policy, and the A/B swap."""

import pytest

from app.config import Config, FormatConfig, ModelConfig
from app.formatting import PairEncoder, build_pair_encoder, keep_head_tail, share_budget, swap_labels
from app.modeling import build_tokenizer
from word_tokenizer import WordTokenizer, words


def encode(config, prompts, a, b, swap=False):
    tokenizer = WordTokenizer()
    encoder = PairEncoder(tokenizer, config)
    return [tokenizer.words(row) for row in encoder.encode(prompts, a, b, swap=swap)]


def test_share_budget_is_max_min_fair():
    assert share_budget([10, 100, 100], 70) == [10, 30, 30]
    assert share_budget([5, 5, 5], 100) == [5, 5, 5]
    assert sum(share_budget([50, 51, 52], 100)) == 100
    assert share_budget([0, 7, 9], 0) == [0, 0, 0]
    a, b = share_budget([10, 99, 99], 51)[1:]
    assert abs(a - b) <= 1


def test_keep_head_tail():
    ids = list(range(100))
    assert keep_head_tail(ids, 11, 0.5, [-1]) == [0, 1, 2, 3, 4, -1, 95, 96, 97, 98, 99]
    assert keep_head_tail(ids, 5, 1.0, [-1]) == [0, 1, 2, 3, -1]
    assert keep_head_tail(ids[:3], 5, 0.5, [-1]) == [0, 1, 2]


def test_short_row_is_kept_whole_with_specials_and_markers():
    out = encode(FormatConfig(max_length=64), [["hi there"]], [["yes"]], [["no"]])[0]
    assert out == ["[CLS]", "Prompt:", "hi", "there", "Response", "A:", "yes", "Response", "B:", "no", "[SEP]"]


def test_long_row_fills_the_budget_exactly_and_keeps_head_and_tail():
    config = FormatConfig(max_length=64, head_fraction=0.5)
    out = encode(config, [[words(4, "p")]], [[words(200, "a")]], [[words(300, "b")]])[0]
    assert len(out) == 64
    # 64 - 2 specials - 5 marker tokens = 57 for texts: prompt keeps its 4, A and B share 53 (26/27).
    a_part = out[out.index("A:") + 1 : out.index("B:") - 1]
    b_part = out[out.index("B:") + 1 : -1]
    assert out[2:6] == ["p0", "p1", "p2", "p3"]
    assert abs(len(a_part) - len(b_part)) <= 1
    assert a_part[0] == "a0" and a_part[-1] == "a199" and "[...]" in a_part
    assert b_part[0] == "b0" and b_part[-1] == "b299"


def test_latest_turns_are_kept_and_older_ones_dropped():
    config = FormatConfig(max_length=40, min_turn_tokens=8)
    prompts = [[words(10, "p_old"), words(3, "p_mid"), words(3, "p_new")]]
    a = [[words(10, "a_old"), words(3, "a_mid"), words(3, "a_new")]]
    b = [[words(10, "b_old"), words(3, "b_mid"), words(3, "b_new")]]
    out = encode(config, prompts, a, b)[0]
    assert "p_new0" in out and "p_mid0" in out
    assert not any(word.startswith("p_old") for word in out)  # 40-2-14-14 = 10 left, < 8+5 markers... dropped
    assert len(out) <= 40


def test_an_older_turn_is_cut_into_the_remaining_room():
    config = FormatConfig(max_length=60, min_turn_tokens=8)
    out = encode(config, [[words(20, "po"), "pn"]], [[words(20, "ao"), "an"]], [[words(20, "bo"), "bn"]])[0]
    assert len(out) == 60 and out.index("po0") < out.index("pn0") if "pn0" in out else True
    assert "pn" in out and "po0" in out  # older turn kept cut: 60-2-8 = 50 left, minus 5 markers = 45 >= 8


def test_the_latest_turn_is_always_kept_even_when_it_alone_overflows():
    out = encode(FormatConfig(max_length=32), [[words(50, "p")]], [[words(50, "a")]], [[words(50, "b")]])[0]
    assert len(out) == 32 and "p0" in out and "a0" in out and "b0" in out


def test_unequal_turn_counts_and_empty_texts():
    out = encode(FormatConfig(max_length=64), [["q1", "q2"]], [["a1"]], [[]])[0]
    assert out == ["[CLS]", "Prompt:", "q1", "Response", "A:", "a1", "Response", "B:",
                   "Prompt:", "q2", "Response", "A:", "Response", "B:", "[SEP]"]


def test_swap_exchanges_responses_and_labels():
    plain = encode(FormatConfig(max_length=64), [["q"]], [["alpha"]], [["beta gamma"]])[0]
    swapped = encode(FormatConfig(max_length=64), [["q"]], [["alpha"]], [["beta gamma"]], swap=True)[0]
    assert plain[plain.index("A:") + 1] == "alpha" and swapped[swapped.index("A:") + 1] == "beta"
    assert swap_labels([0, 1, 2]) == [1, 0, 2]


@pytest.mark.parametrize("max_length", [48, 128, 512])
def test_real_tokenizer_never_exceeds_the_budget(max_length):
    tokenizer = build_tokenizer(Config())
    encoder = PairEncoder(tokenizer, FormatConfig(max_length=max_length))
    long = "The quick brown fox jumps over the lazy dog. " * 200
    rows = encoder.encode([["hi", long], [""]], [["short", long], [long]], [[long, "x"], ["ok"]])
    assert all(len(row) <= max_length for row in rows)
    assert len(rows[0]) == max_length
    assert rows[0][0] == tokenizer.cls_token_id and rows[0][-1] == tokenizer.sep_token_id


CUE = ["Which", "response", "is", "better:", "A,", "B", "or", "tie?", "Answer:"]  # the default cue, word by word


def encode_with_cue(config, prompts, a, b):
    tokenizer = WordTokenizer()
    encoder = PairEncoder(tokenizer, config, with_cue=True)
    ids, segments = encoder.encode_with_segments(prompts, a, b)
    return [tokenizer.words(row) for row in ids], segments


def test_the_answer_cue_ends_the_row_before_the_suffix_with_segment_0():
    rows, segments = encode_with_cue(FormatConfig(max_length=64), [["hi there"]], [["yes"]], [["no"]])
    body = ["Prompt:", "hi", "there", "Response", "A:", "yes", "Response", "B:", "no"]
    assert rows[0] == ["[CLS]", *body, *CUE, "[SEP]"]
    assert segments[0] == [0] * 7 + [1] * 3 + [0] * (len(CUE) + 1)


def test_the_cue_is_kept_whole_and_its_tokens_come_out_of_the_budget():
    config = FormatConfig(max_length=64, head_fraction=0.5)
    row = encode_with_cue(config, [[words(4, "p")]], [[words(200, "a")]], [[words(300, "b")]])[0][0]
    assert len(row) == 64 and row[-len(CUE) - 1 : -1] == CUE and row[-1] == "[SEP]"
    # 64 - 2 specials - 9 cue - 5 marker tokens = 48 for texts: the prompt keeps its 4, A and B get 22 each.
    a_part = row[row.index("A:") + 1 : row.index("B:") - 1]
    b_part = row[row.index("B:") + 1 : -len(CUE) - 1]
    assert row[2:6] == ["p0", "p1", "p2", "p3"]
    assert len(a_part) == len(b_part) == 22
    assert a_part[-1] == "a199" and b_part[-1] == "b299"


def test_a_lone_overflowing_turn_still_leaves_the_cue_intact():
    row = encode_with_cue(FormatConfig(max_length=32), [[words(50, "p")]], [[words(50, "a")]], [[words(50, "b")]])[0][0]
    assert len(row) == 32 and row[-len(CUE) - 1 : -1] == CUE and "a0" in row and "b0" in row


def test_a_max_length_with_no_room_beside_the_cue_is_an_error():
    config = FormatConfig(max_length=32, answer_cue=" ".join(f"w{i}" for i in range(26)))
    with pytest.raises(ValueError, match="26-token answer cue"):
        PairEncoder(WordTokenizer(), config, with_cue=True)
    PairEncoder(WordTokenizer(), config)  # without the cue the same budget is fine


@pytest.mark.parametrize("kind, has_cue", [("encoder", False), ("decoder", True), ("decoder_lm", True), ("t5", True)])
def test_the_model_kind_decides_whether_rows_end_with_the_cue(kind, has_cue):
    encoder = build_pair_encoder(WordTokenizer(), Config(model=ModelConfig(kind=kind)))
    row = encoder.tokenizer.words(encoder.encode([["q"]], [["a"]], [["b"]])[0])
    assert (row[-len(CUE) - 1 : -1] == CUE) is has_cue
    assert row[-1] == "[SEP]" and row[-(len(CUE) if has_cue else 0) - 2] == "b"
