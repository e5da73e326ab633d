"""The shapes the project stores for its presets' models: the published parameter counts, and the order in which
the planner reads a model's shape (a local folder, then the hub or its cache, then the stored facts)."""

import pytest
import torch
import transformers
from transformers import AutoConfig, LlamaConfig

from app.architecture import read_architecture
from app.config import load_config
from app.memory import plan_memory
from app.model_shapes import SHAPES, stored_config

PRESET_MODELS = {"meta-llama/Meta-Llama-3-8B", "google/gemma-2-9b", "Qwen/Qwen2.5-0.5B", "microsoft/deberta-v3-large",
                 "google/flan-t5-large", "Qwen/Qwen2.5-1.5B-Instruct"}
TINY_LLAMA = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}


def test_every_model_a_preset_names_has_a_stored_shape():
    assert PRESET_MODELS <= set(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_stored_shape_has_the_published_parameter_count(name):
    """Built as the class the count is published for, on the meta device, as the planner builds models."""
    from app.architecture import untie_separate_lm_head

    shape = SHAPES[name]
    with torch.device("meta"):
        model = getattr(transformers, shape.published_class)(stored_config(name))
    untie_separate_lm_head(model)
    counted = sum(p.numel() for p in model.parameters())
    published = shape.published_params
    assert abs(counted / published - 1) < 0.01, f"{name}: {counted:,} vs published {published:,}"


def hub_unreachable(monkeypatch):
    """AutoConfig fails for every hub id as it does offline without a cached file (local folders still load)."""
    real = AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        if str(path) in SHAPES:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                          "them in the cached files.")
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(from_pretrained))


def test_an_unreachable_hub_falls_back_to_the_stored_shape_and_the_plan_says_so(monkeypatch):
    hub_unreachable(monkeypatch)
    config = load_config(None, {"model.kind": "t5", "model.name_or_path": "google/flan-t5-large",
                                "model.label_words": ["A", "B", "tie"], "scaling.num_workers": 1})
    arch = read_architecture(config.model)
    assert arch.stored_shape and "couldn't connect" in arch.stored_shape
    assert arch.total_params == SHAPES["google/flan-t5-large"].published_params  # lm_head apart from the embedding
    notes = " ".join(plan_memory(config, architecture=arch).notes)
    assert "app/model_shapes.py" in notes and "google/flan-t5-large" in notes


def test_a_reachable_hub_wins_over_the_stored_shape(monkeypatch):
    monkeypatch.setattr(AutoConfig, "from_pretrained",
                        classmethod(lambda cls, path, **kwargs: LlamaConfig(**TINY_LLAMA, **kwargs)))
    arch = read_architecture(load_config(None, {"model.kind": "decoder",
                                                "model.name_or_path": "meta-llama/Meta-Llama-3-8B"}).model)
    assert arch.stored_shape is None and arch.hidden == 32


def test_a_local_folder_wins_over_the_stored_shape(tmp_path, monkeypatch):
    folder = tmp_path / "meta-llama" / "Meta-Llama-3-8B"
    LlamaConfig(**TINY_LLAMA).save_pretrained(folder)
    monkeypatch.chdir(tmp_path)  # the hub id is now also a relative path to that folder
    arch = read_architecture(load_config(None, {"model.kind": "decoder",
                                                "model.name_or_path": "meta-llama/Meta-Llama-3-8B"}).model)
    assert arch.stored_shape is None and arch.hidden == 32


def test_a_local_folder_without_config_json_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    (tmp_path / "google" / "gemma-2-9b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises((OSError, ValueError), match="gemma-2-9b"):  # transformers: no model_type in that folder
        read_architecture(load_config(None, {"model.kind": "decoder", "model.name_or_path": "google/gemma-2-9b"}).model)


def test_a_model_without_stored_shape_names_the_stored_ones(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"shapes are stored only for .*google/gemma-2-9b"):
        read_architecture(load_config(None, {"model.kind": "decoder",
                                             "model.name_or_path": "someone/unknown-7b"}).model)


def test_an_untied_t5_lm_head_is_counted_as_from_pretrained_loads_it(tmp_path):
    """FLAN-T5 keeps an lm_head apart from the shared embedding. transformers 5's T5Config forces
    tie_word_embeddings=True, so from_config ties them, while from_pretrained keeps both when the checkpoint
    holds two different tensors: the planner's count must follow from_pretrained."""
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    saved = T5ForConditionalGeneration(config)
    saved.lm_head.weight = torch.nn.Parameter(torch.randn_like(saved.lm_head.weight))  # as in the checkpoint
    saved.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    counted = read_architecture(load_config(None, {"model.kind": "t5", "model.name_or_path": str(tmp_path)}).model)
    assert counted.total_params == sum(p.numel() for p in loaded.parameters())
    assert loaded.lm_head.weight is not loaded.shared.weight
