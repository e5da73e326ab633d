"""Architecture facts of the models the presets name, for planning where their config.json cannot be read.

The memory and checkpoint planners need only a model's shape (layers, widths, heads, vocabulary, tied
embeddings), which its config.json holds. `app.architecture` reads that file from a local folder or the hub
(or the hub's local cache) first; these stored facts are the fallback when the lookup fails (an offline
machine without the file cached, an unreachable hub, a gated model without a token), and the plan says so.

Each entry holds the config.json keys that set a shape, written by the project from the model's published
config.json, and the parameter count published for the pretrained model. tests/test_model_shapes.py builds
each shape as `published_class` on the meta device and checks the count within 1% of the published one.
Keys that do not change a shape (dropout, token ids, initialisation) keep transformers' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class StoredShape:
    """The shape-setting keys of one model's config.json and its published parameter count."""

    model_type: str  # config.json "model_type"
    keys: dict[str, Any]
    published_params: int
    published_class: str  # the transformers class the published count is of (LM head included where it has one)
    source: str  # where the count is published


SHAPES: dict[str, StoredShape] = {
    "meta-llama/Meta-Llama-3-8B": StoredShape(
        "llama",
        {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0,
         "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu"},
        8_030_261_248, "LlamaForCausalLM", "hub safetensors metadata (8.03B)"),
    "google/gemma-2-9b": StoredShape(
        "gemma2",
        {"hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
         "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000, "tie_word_embeddings": True,
         "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
         "final_logit_softcapping": 30.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
         "hidden_activation": "gelu_pytorch_tanh"},
        9_241_705_984, "Gemma2ForCausalLM", "hub safetensors metadata (9.24B)"),
    "Qwen/Qwen2.5-0.5B": StoredShape(
        "qwen2",
        {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
         "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
         "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6},
        494_032_768, "Qwen2ForCausalLM", "hub safetensors metadata; model card: 0.49B, 0.36B non-embedding"),
    "Qwen/Qwen2.5-1.5B-Instruct": StoredShape(  # configs/prompting-fewshot.yaml
        "qwen2",
        {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
         "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
         "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6},
        1_543_714_304, "Qwen2ForCausalLM", "hub safetensors metadata; model card: 1.54B, 1.31B non-embedding"),
    # The model card: "304M backbone parameters with a vocabulary containing 128K tokens which introduces 131M
    # parameters in the Embedding layer", 435M in all. The 304M are the 24 layers and relative-position
    # embeddings (302.8M) plus the checkpoint's pretraining head (dense + LayerNorm + vocabulary bias, 1.2M),
    # so the published total is compared with DebertaV2ForMaskedLM (435.19M; DebertaV2Model is 434.01M).
    "microsoft/deberta-v3-large": StoredShape(
        "deberta-v2",
        {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
         "vocab_size": 128100, "max_position_embeddings": 512, "relative_attention": True, "position_buckets": 256,
         "norm_rel_ebd": "layer_norm", "share_att_key": True, "pos_att_type": ["p2c", "c2p"],
         "position_biased_input": False, "type_vocab_size": 0, "max_relative_positions": -1,
         "layer_norm_eps": 1e-7, "hidden_act": "gelu"},
        435_000_000, "DebertaV2ForMaskedLM", "model card: 304M backbone + 131M embedding"),
    # T5 v1.1 / FLAN-T5: gated-GELU MLP and an lm_head separate from the shared embedding (the 32.9M that make
    # 783.2M rather than 750.3M).
    "google/flan-t5-large": StoredShape(
        "t5",
        {"d_model": 1024, "d_ff": 2816, "num_layers": 24, "num_decoder_layers": 24, "num_heads": 16, "d_kv": 64,
         "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
         "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
         "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1},
        783_150_080, "T5ForConditionalGeneration", "hub safetensors metadata (783M)"),
}


def stored_config(name: str, **kwargs: Any) -> PretrainedConfig:
    """The transformers config of a stored shape; `kwargs` are set as from_pretrained would (e.g. num_labels).

    Raises:
        KeyError: no shape is stored under `name`.
    """
    from transformers import AutoConfig

    if name not in SHAPES:
        raise KeyError(f"no stored shape for {name!r}; app/model_shapes.py has: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    return AutoConfig.for_model(shape.model_type, **shape.keys, **kwargs)
