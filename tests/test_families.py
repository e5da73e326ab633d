"""Every model kind behind one interface: (B, 3) logits that train, ignore padding and reload exactly."""

import gc
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from modeling_helpers import CPU, build, encoded_rows, eval_loss, logits_of, tiny_config, train_steps

from app.config import PACKAGED_MINILM
from app.families import CausalLMClassifier, Seq2SeqClassifier, choose_pad_token, model_dtype
from app.inference import Predictor
from app.metrics import softmax
from app.modeling import build_tokenizer, forward_batch, load_checkpoint, save_checkpoint

KINDS = [
    ("encoder", PACKAGED_MINILM),
    ("decoder", "random:llama-tiny"),
    ("decoder", "random:gemma2-tiny"),
    ("decoder", "random:qwen2-tiny"),
    ("decoder_lm", "random:llama-tiny"),
    ("decoder_lm", "random:qwen2-tiny"),
    ("t5", "random:t5-tiny"),
]


@pytest.mark.parametrize("kind, name", KINDS)
def test_logits_are_b_by_3_padding_invariant_and_reload_identically(kind, name, tmp_path):
    config = tiny_config(kind, name)
    model, tokenizer, rows = build(config)
    batch = logits_of(model, tokenizer, rows)
    assert batch.shape == (6, 3) and torch.isfinite(batch).all()
    assert len(set(map(len, rows[0]))) > 1  # the batch really is padded
    alone = torch.cat([logits_of(model, tokenizer, rows, [i]) for i in range(6)])
    torch.testing.assert_close(alone, batch, atol=1e-5, rtol=0)

    save_checkpoint(str(tmp_path), model, tokenizer, config, {"valid_log_loss": 1.0}, epoch=0)
    loaded = load_checkpoint(str(tmp_path))
    assert loaded.config == config and loaded.meta["kind"] == kind and loaded.meta["adapter"] == "full"
    torch.testing.assert_close(logits_of(loaded.model, loaded.tokenizer, rows), batch, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind, name", KINDS)
def test_a_few_optimizer_steps_lower_the_loss(kind, name):
    pretrained = kind == "encoder"  # MiniLM: 22M real weights, so fewer, shorter steps at a finetuning lr
    model, tokenizer, rows = build(tiny_config(kind, name, **{"format.max_length": 48 if pretrained else 96}))
    before = eval_loss(model, tokenizer, rows)
    train_steps(model, tokenizer, rows, steps=4 if pretrained else 8, lr=3e-4 if pretrained else 2e-3)
    assert eval_loss(model, tokenizer, rows) < before - 0.05


def test_a_decoder_tokenizer_without_pad_gets_one_that_is_not_the_last_token_of_a_row():
    config = tiny_config("decoder", "random:llama-tiny")
    model, tokenizer, rows = build(config)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # llama-tiny has no pad token of its own
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert {row[-1] for row in rows[0]} == {rows[0][0][-1]} != {tokenizer.pad_token_id}  # rows end with the cue


def test_choose_pad_token_skips_candidates_equal_to_the_last_token():
    tokenizer = build_tokenizer(tiny_config("decoder", "random:llama-tiny"))
    tokenizer.pad_token = None
    choose_pad_token(tokenizer, last_token_id=tokenizer.eos_token_id)  # as if the tokenizer appended </s>
    assert tokenizer.pad_token == tokenizer.bos_token
    t5 = build_tokenizer(tiny_config("t5", "random:t5-tiny"))
    assert t5.pad_token == "<pad>"  # a tokenizer's own pad token is kept

    class OnlyEos:
        pad_token = unk_token = bos_token = None
        eos_token = "</s>"

        def convert_tokens_to_ids(self, token):
            return 7

    with pytest.raises(ValueError, match="add a pad token"):
        choose_pad_token(OnlyEos(), last_token_id=7)


def test_the_decoder_head_reads_the_last_real_token_even_with_the_pad_id_inside_a_row():
    config = tiny_config("decoder", "random:llama-tiny")
    model, tokenizer, rows = build(config)
    pad = tokenizer.pad_token_id
    with_pad_inside = rows[0][1][:10] + [pad, pad] + rows[0][1][10:]  # </s> is also ordinary text here
    sequences, segments = [with_pad_inside, rows[0][0]], [[0] * len(with_pad_inside), rows[1][0]]
    batch = logits_of(model, tokenizer, (sequences, segments))
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([with_pad_inside])).last_hidden_state[:, -1]  # (1, H)
        expected = model.score(hidden)
    torch.testing.assert_close(batch[:1], expected, atol=1e-5, rtol=0)


def test_decoder_lm_logits_are_the_next_token_logits_of_the_label_words():
    config = tiny_config("decoder_lm", "random:gemma2-tiny")
    model, tokenizer, rows = build(config)
    assert isinstance(model, CausalLMClassifier)
    label_ids = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in config.model.label_words]
    with torch.no_grad():
        full = model.model(input_ids=torch.tensor([rows[0][2]])).logits[0, -1, label_ids]  # (3,)
    torch.testing.assert_close(logits_of(model, tokenizer, rows)[2], full, atol=1e-5, rtol=0)


def test_a_label_word_of_several_tokens_is_rejected_by_name():
    config = tiny_config("decoder_lm", "random:llama-tiny", **{"model.label_words": [" A", " B", " undecidedness"]})
    with pytest.raises(ValueError, match=r"' undecidedness' is \d+ tokens \['Ġu'"):
        build(config)


def test_t5_logits_are_the_log_probabilities_of_whole_label_sequences():
    config = tiny_config("t5", "random:t5-tiny", **{"model.label_words": [" A", " B", " undecidedness"]})
    model, tokenizer, rows = build(config)  # multi-token label words are fine for t5
    assert isinstance(model, Seq2SeqClassifier)
    logits = logits_of(model, tokenizer, rows)
    input_ids = torch.tensor([rows[0][4]])
    for index, word in enumerate(config.model.label_words):
        target = torch.tensor([tokenizer(word)["input_ids"]])  # ends with </s>
        assert target.shape[1] > 1
        with torch.no_grad():
            mean_nll = model.model(input_ids=input_ids, labels=target).loss  # mean over the target tokens
        torch.testing.assert_close(logits[4, index], -mean_nll * target.shape[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind, name", [("decoder_lm", "random:llama-tiny"), ("t5", "random:t5-tiny")])
def test_forward_batch_goes_through_distributed_data_parallel(kind, name, tmp_path):
    model, tokenizer, rows = build(tiny_config(kind, name))
    expected = logits_of(model, tokenizer, rows)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    wrapped = None
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        logits = logits_of(wrapped, tokenizer, rows)
        wrapped.train()
        train_logits, _ = forward_batch(wrapped, rows[0], rows[1], tokenizer.pad_token_id, CPU)
        torch.nn.functional.cross_entropy(train_logits, torch.zeros(6, dtype=torch.long)).backward()
    finally:
        # DDP's reducer holds the group: free it first. Collected after the group is destroyed, the reducer
        # took gloo's destructor with it into a join that never returned (the suite hung here once).
        del wrapped
        gc.collect()
        dist.destroy_process_group()
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, tokenizer, rows = build(tiny_config("decoder", "random:qwen2-tiny",
                                                   **{"model.gradient_checkpointing": checkpointing}))
        assert model.is_activation_checkpointing == checkpointing
        model.train()
        logits, _ = forward_batch(model, rows[0], rows[1], tokenizer.pad_token_id, CPU)
        torch.nn.functional.cross_entropy(logits, torch.zeros(6, dtype=torch.long)).backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_dtype_and_attention_implementation_reach_the_model(tmp_path):
    """model.dtype is the dtype of frozen weights and of exports; what trains is an fp32 master."""
    assert model_dtype("auto") == torch.float32  # no GPU here
    settings = {"model.dtype": "bf16", "model.attn_implementation": "eager"}
    model, tokenizer, rows = build(tiny_config("decoder_lm", "random:llama-tiny", "lora", **settings))
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model.config._attn_implementation == "eager"
    assert logits_of(model, tokenizer, rows).shape == (6, 3)
    config = tiny_config("decoder_lm", "random:llama-tiny", **settings)
    model, tokenizer, _ = build(config)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    save_checkpoint(str(tmp_path), model, tokenizer, config, {}, epoch=0)
    assert {p.dtype for p in load_checkpoint(str(tmp_path)).model.parameters()} == {torch.bfloat16}


def test_predictor_scores_a_decoder_lm_checkpoint_with_the_answer_cue(tmp_path):
    config = tiny_config("decoder_lm", "random:qwen2-tiny")
    model, tokenizer, rows = build(config)
    save_checkpoint(str(tmp_path), model, tokenizer, config, {}, epoch=0)
    predictor = Predictor(str(tmp_path), tokens_per_batch=200, device="cpu", precision="fp32")
    texts = ([["Which is larger, 7 or 9?"]], [["9 is larger."]], [["7."]])
    probs = predictor.predict(*texts)
    sequences, segments = predictor.encoder.encode_with_segments(*texts)
    assert sequences[0][-len(predictor.encoder.markers.cue):] == predictor.encoder.markers.cue
    expected = softmax(logits_of(model, tokenizer, (sequences, segments)).numpy())
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert encoded_rows(tokenizer, config)[0] == rows[0]  # encoding is deterministic


def test_decoder_lm_needs_rows_that_end_with_the_cue():
    config = tiny_config("decoder_lm", "random:t5-tiny")  # a tokenizer that appends </s> to every text
    with pytest.raises(ValueError, match=r"appends \['</s>'\]"):
        build_tokenizer(config)


def test_a_format_1_checkpoint_still_loads_as_a_full_encoder(tmp_path):
    config = tiny_config("encoder", PACKAGED_MINILM)
    model, tokenizer, rows = build(config)
    save_checkpoint(str(tmp_path), model, tokenizer, config, {}, epoch=0)
    meta_path = tmp_path / "arena.json"
    meta = json.loads(meta_path.read_text())
    old_config = {section: values for section, values in meta["config"].items() if section != "adapter"}
    del old_config["model"]["kind"], old_config["format"]["answer_cue"]
    meta_path.write_text(json.dumps({"format": 1, "labels": meta["labels"], "epoch": 0, "metrics": {},
                                     "config": old_config}))
    loaded = load_checkpoint(str(tmp_path))
    torch.testing.assert_close(logits_of(loaded.model, loaded.tokenizer, rows), logits_of(model, tokenizer, rows),
                               atol=1e-6, rtol=0)
