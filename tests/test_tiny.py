"""Random-weight models built offline: deterministic, cached, race-safe, and shaped like their families."""

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from app import tiny
from app.config import ModelConfig
from app.modeling import resolve_model_path


def digest(folder: str, name: str) -> str:
    with open(os.path.join(folder, name), "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_a_spec_is_built_once_and_identically_in_any_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ARENA_CACHE_DIR", str(tmp_path / "a"))
    first = tiny.random_model_path("random:llama-tiny")
    stamp = os.path.getmtime(os.path.join(first, "model.safetensors"))
    assert tiny.random_model_path("llama-tiny") == first  # cached: not rebuilt
    assert os.path.getmtime(os.path.join(first, "model.safetensors")) == stamp
    monkeypatch.setenv("ARENA_CACHE_DIR", str(tmp_path / "b"))
    torch.manual_seed(99)  # the caller's RNG state must not matter
    second = tiny.random_model_path("random:llama-tiny")
    assert second.startswith(str(tmp_path / "b"))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(first, name) == digest(second, name), name


def test_racing_builders_all_get_one_complete_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ARENA_CACHE_DIR", str(tmp_path))
    barrier = threading.Barrier(3)
    real_build = tiny.build_random_model

    def build_then_wait(spec, directory):
        real_build(spec, directory)
        barrier.wait(timeout=60)  # all three builders finish before any renames: two of them lose the race

    monkeypatch.setattr(tiny, "build_random_model", build_then_wait)
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(tiny.random_model_path, ["t5-tiny"] * 3))
    assert len(set(paths)) == 1
    assert os.listdir(tmp_path) == [os.path.basename(paths[0])]  # no staging folders left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(paths[0]))


@pytest.mark.parametrize("spec, bos, pad", [("llama-tiny", "<s>", None), ("gemma2-tiny", "<bos>", None),
                                            ("qwen2-tiny", None, None), ("t5-tiny", None, "<pad>")])
def test_tokenizers_are_shaped_like_their_family(spec, bos, pad):
    path = resolve_model_path(f"random:{spec}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.bos_token == bos and tokenizer.pad_token == pad and tokenizer.eos_token is not None
    assert 1000 <= len(tokenizer) <= 2000 and AutoConfig.from_pretrained(path).vocab_size == len(tokenizer)
    ids = tokenizer("hello there")["input_ids"]
    plain = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    expected = {"llama-tiny": [tokenizer.bos_token_id, *plain], "gemma2-tiny": [tokenizer.bos_token_id, *plain],
                "qwen2-tiny": plain, "t5-tiny": [*plain, tokenizer.eos_token_id]}[spec]
    assert ids == expected
    for word in ModelConfig().label_words:  # the default label words are single tokens (decoder_lm needs it)
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


def test_an_unknown_spec_names_the_known_ones():
    with pytest.raises(ValueError, match="llama-tiny.*t5-tiny|known specs"):
        tiny.random_model_path("random:llama-7b")


@pytest.mark.parametrize("spec, low, high", [("llama-100m", 90e6, 110e6), ("llama-1b", 0.9e9, 1.1e9)])
def test_benchmark_specs_have_their_advertised_size(spec, low, high):
    definition = tiny.SPECS[spec]
    config = tiny.build_model_config(definition, definition.vocab_size, {"bos_token": 0, "eos_token": 1})
    with torch.device("meta"):  # shapes only: nothing is allocated or built
        model = AutoModelForCausalLM.from_config(config)
    assert low <= sum(p.numel() for p in model.parameters()) <= high
