"""Random-weight models built offline from named specs, for tests and benchmarks (`random:<spec>`).

`random_model_path("llama-tiny")` returns a folder holding config.json, safetensors weights and a
tokenizer that `AutoTokenizer` / `AutoModel*.from_pretrained` load like any pretrained checkpoint. The
folder is built the first time, deterministically (fixed seed, tokenizer trained on the project's own
synthetic text), under `$ARENA_CACHE_DIR` (default ~/.cache/arena-prefs/random). It is written to a
temporary folder and renamed into place, so Ray workers that race to build the same spec each end up
with one complete copy.

Tokenizers are small byte-level BPEs (vocab 1536) shaped like their family's: Llama and Gemma-2 put a bos
token in front and have no pad token, Qwen2 adds no specials and has no pad token either (so pad handling
is exercised; transformers loads it as its Qwen2Tokenizer), T5 has pad / eos / unk and appends eos. The
default label words " A", " B", " tie" are single tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from app.config import FormatConfig, ModelConfig
from app.formatting import MARKERS
from app.synthetic import generate_pairs

PREFIX = "random:"
SEED = 1234
BUILD_VERSION = 2  # bump when the build recipe changes: cached folders are keyed by it
CORPUS_ROWS = 400  # synthetic rows whose texts train the tokenizer


@dataclass(frozen=True)
class TokenizerStyle:
    """A family's special tokens: `specials` get ids 0.. in order; `template` frames one text."""

    specials: tuple[str, ...]
    template: str
    roles: dict[str, str]  # bos_token / eos_token / pad_token / unk_token -> special token


STYLES: dict[str, TokenizerStyle] = {
    "llama": TokenizerStyle(("<s>", "</s>"), "<s> $A", {"bos_token": "<s>", "eos_token": "</s>"}),
    "gemma2": TokenizerStyle(("<bos>", "<eos>"), "<bos> $A", {"bos_token": "<bos>", "eos_token": "<eos>"}),
    "qwen2": TokenizerStyle(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "$A", {"eos_token": "<|endoftext|>"}),
    "t5": TokenizerStyle(("<pad>", "</s>", "<unk>"), "$A </s>",
                         {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}),
}

_TINY_DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}


@dataclass(frozen=True)
class RandomSpec:
    """A named architecture: the transformers model type, its config keys, vocab size and saved dtype."""

    model_type: Literal["llama", "gemma2", "qwen2", "t5"]
    sizes: dict[str, Any]
    vocab_size: int = 1536
    dtype: Literal["float32", "bfloat16"] = "float32"
    extra: dict[str, Any] = field(default_factory=dict)


SPECS: dict[str, RandomSpec] = {
    "llama-tiny": RandomSpec("llama", _TINY_DECODER),
    "gemma2-tiny": RandomSpec("gemma2", _TINY_DECODER | {"head_dim": 16, "query_pre_attn_scalar": 16}),
    "qwen2-tiny": RandomSpec("qwen2", _TINY_DECODER),
    "t5-tiny": RandomSpec("t5", {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2,
                                 "num_decoder_layers": 2}, extra={"feed_forward_proj": "gated-gelu"}),
    # ~103M parameters: 16 layers of width 768 (GQA 12/4 heads); for the memory benchmark.
    "llama-100m": RandomSpec("llama", {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 16,
                                       "num_attention_heads": 12, "num_key_value_heads": 4,
                                       "max_position_embeddings": 4096}),
    # ~0.98B parameters, TinyLlama's shape; saved in bf16 (2 GB). GPU benchmarks only, never built in tests.
    "llama-1b": RandomSpec("llama", {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                                     "num_attention_heads": 32, "num_key_value_heads": 4,
                                     "max_position_embeddings": 4096}, dtype="bfloat16"),
}


def is_random_name(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def cache_directory() -> str:
    """Where built models live: $ARENA_CACHE_DIR, else ~/.cache/arena-prefs/random."""
    return os.environ.get("ARENA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "arena-prefs", "random")


def spec_of(name: str) -> RandomSpec:
    """The spec for `llama-tiny` or `random:llama-tiny`; raises ValueError naming the known specs."""
    spec = SPECS.get(name.removeprefix(PREFIX))
    if spec is None:
        raise ValueError(f"unknown random model spec '{name}'; known specs: {', '.join(sorted(SPECS))}")
    return spec


def random_model_path(name: str) -> str:
    """The folder of a random-weight model (`llama-tiny` or `random:llama-tiny`), built on first use."""
    spec_name = name.removeprefix(PREFIX)
    spec = spec_of(spec_name)
    recipe = json.dumps({"spec": asdict(spec), "style": asdict(STYLES[spec.model_type]), "version": BUILD_VERSION,
                         "seed": SEED}, sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    root = cache_directory()
    final = os.path.join(root, f"{spec_name}-{digest}")
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{spec_name}-", dir=root)
    try:
        build_random_model(spec, staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache may be shared
        os.rename(staging, final)  # atomic: readers see no folder or a complete one
    except OSError:
        if not os.path.isdir(final):  # a real failure, not a lost race with another builder
            raise
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return final


def build_random_model(spec: RandomSpec, directory: str) -> None:
    """Write tokenizer, config and seeded random weights of `spec` into `directory`."""
    tokenizer = build_tokenizer(spec.model_type, spec.vocab_size)
    ids = {role: tokenizer.convert_tokens_to_ids(token) for role, token in STYLES[spec.model_type].roles.items()}
    config = build_model_config(spec, len(tokenizer), ids)
    auto_class = AutoModelForSeq2SeqLM if spec.model_type == "t5" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):  # deterministic weights, without touching the caller's RNG
        torch.manual_seed(SEED)
        model = auto_class.from_config(config, dtype=getattr(torch, spec.dtype))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _write_absent_roles(directory, STYLES[spec.model_type].roles)


def _write_absent_roles(directory: str, roles: dict[str, str]) -> None:
    """Write the roles a style lacks as null, so that tokenizer classes with defaults (transformers maps
    model type qwen2 to Qwen2Tokenizer, whose pad defaults to <|endoftext|>) keep them absent."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as handle:
        tokenizer_config = json.load(handle)
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        tokenizer_config.setdefault(role, roles.get(role))
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(tokenizer_config, handle, indent=2)


def build_model_config(spec: RandomSpec, vocab_size: int, token_ids: dict[str, int]) -> PretrainedConfig:
    """The transformers config of `spec`; `token_ids` maps the tokenizer roles (bos_token, ...) to ids."""
    return AutoConfig.for_model(
        spec.model_type,
        vocab_size=vocab_size,
        bos_token_id=token_ids.get("bos_token"),
        eos_token_id=token_ids.get("eos_token"),
        pad_token_id=token_ids.get("pad_token"),  # None for the decoders: real Llama / Qwen2 base models have none
        **({"decoder_start_token_id": token_ids.get("pad_token")} if spec.model_type == "t5" else {}),
        **spec.sizes,
        **spec.extra,
    )


def build_tokenizer(model_type: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the project's synthetic texts, with the family's special tokens."""
    style = STYLES[model_type]
    bpe = Tokenizer(models.BPE(unk_token=style.roles.get("unk_token")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(style.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(training_corpus(), trainer)
    pair_template = style.template.replace("$A", "$A $B")
    bpe.post_processor = processors.TemplateProcessing(
        single=style.template, pair=pair_template,
        special_tokens=[(token, bpe.token_to_id(token)) for token in style.specials if token in style.template])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **style.roles)


def training_corpus() -> list[str]:
    """Deterministic text: synthetic arena rows, plus the format's markers, answer cue and label words
    (repeated so that BPE learns them; the default label words become single tokens)."""
    frame = generate_pairs(CORPUS_ROWS, seed=0)
    texts = [turn for column in ("prompt", "response_a", "response_b") for cell in frame[column]
             for turn in json.loads(cell) if turn]
    format_text = " ".join([*MARKERS.values(), FormatConfig().answer_cue, *ModelConfig().label_words])
    return texts + [format_text] * 50
