"""One builder per model kind, all behind one interface: `model(input_ids, attention_mask).logits` is (B, 3).

    encoder     AutoModelForSequenceClassification on an encoder; the [CLS] head.
    decoder     AutoModelForSequenceClassification on a decoder-only LM. transformers' head scores the
                rightmost token that is not the pad id. Batches are right-padded (app/batching.pad_batch) and
                every row ends with the same closing tokens (answer cue + tokenizer suffix), so a pad id that
                differs from the last closing token (`choose_pad_token`) puts the head on the true last token.
    decoder_lm  `CausalLMClassifier`: the LM's next-token logits at the last real position (right after the
                answer cue) for the three label tokens. With `model.lm_loss=vocab` (instruction tuning) they
                are the label tokens' log-probabilities over the whole vocabulary instead, and `class_loss`
                is their negative log-likelihood: the LM's cross-entropy on the verdict token with every
                prompt token masked. A softmax of either gives the same kind of prediction: the three label
                words' probabilities renormalised.
    t5          `Seq2SeqClassifier`: each label word's sequence log-probability from the decoder, all three
                labels scored in one batched decoder pass.

The wrappers hold the transformers model (or its peft wrapper) as `.model`, so optimizers, DDP and
DeepSpeed see ordinary parameters; their forward goes through the inner model's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from app.config import Config
from app.data import LABEL_COLUMNS

SEQUENCE_CLASSIFIER_KINDS = frozenset({"encoder", "decoder"})  # a fresh classification head on top
AUTO_CLASSES = {"encoder": AutoModelForSequenceClassification, "decoder": AutoModelForSequenceClassification,
                "decoder_lm": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_dtype(choice: str) -> torch.dtype:
    """The weights dtype of a `model.dtype` setting; auto = bf16 on GPUs that have it, else fp32."""
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[choice]


def load_network(config: Config, path: str, tokenizer: Any, dtype: torch.dtype | None = None,
                 **load_kwargs: Any) -> PreTrainedModel:
    """The transformers model of `config.model.kind` from `path` (pretrained weights or a full checkpoint).

    `dtype` overrides `model.dtype` (training loads trained weights as fp32 masters); `load_kwargs` go to
    `from_pretrained` (e.g. quantization_config). Sequence classifiers get 3 labels, and decoders the
    tokenizer's pad id as `config.pad_token_id`.
    """
    model = config.model
    kwargs: dict[str, Any] = {"dtype": dtype or model_dtype(model.dtype)}
    if model.attn_implementation is not None:
        kwargs["attn_implementation"] = model.attn_implementation
    if model.kind in SEQUENCE_CLASSIFIER_KINDS:
        kwargs |= {"num_labels": len(LABEL_COLUMNS), "id2label": dict(enumerate(LABEL_COLUMNS)),
                   "label2id": {name: index for index, name in enumerate(LABEL_COLUMNS)}}
        if model.classifier_dropout is not None:
            kwargs["classifier_dropout"] = model.classifier_dropout
    if model.kind != "encoder":
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    network = AUTO_CLASSES[model.kind].from_pretrained(path, **kwargs, **load_kwargs)
    if model.kind != "encoder":
        network.config.use_cache = False  # we never generate; a KV cache would only cost memory
    return network


def wrap_network(network: torch.nn.Module, config: Config, tokenizer: Any) -> torch.nn.Module:
    """The module the loop calls: the network itself for sequence classifiers, else a scoring wrapper."""
    if config.model.kind == "decoder_lm":
        return CausalLMClassifier(network, label_token_ids(tokenizer, config.model.label_words),
                                  vocab_log_probs=config.model.lm_loss == "vocab")
    if config.model.kind == "t5":
        start = network.config.decoder_start_token_id
        return Seq2SeqClassifier(network, label_token_sequences(tokenizer, config.model.label_words), start,
                                 tokenizer.pad_token_id)
    return network


def unwrap_network(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers (or peft) model inside DDP / a DeepSpeed engine (`.module`) and our scoring wrapper."""
    model = getattr(model, "module", model)
    return model.model if isinstance(model, (CausalLMClassifier, Seq2SeqClassifier)) else model


def head_module_names(network: torch.nn.Module, kind: str) -> list[str]:
    """The freshly initialised head of a sequence classifier: its children outside the pretrained base
    (`score` for Llama-style, `classifier` for BERT, `pre_classifier` + `classifier` for DistilBERT).
    Empty for decoder_lm and t5, which score with the pretrained LM head."""
    if kind not in SEQUENCE_CLASSIFIER_KINDS:
        return []
    return [name for name, child in network.named_children()
            if name != network.base_model_prefix and any(True for _ in child.parameters())]


def planned_head_module_names(path: str, kind: str) -> list[str]:
    """`head_module_names` before loading (e.g. to keep the head out of quantization), from a weightless
    skeleton. The class is instantiated directly: `from_config` would build it under ZeRO-3's zero.Init
    when a DeepSpeed config is registered."""
    if kind not in SEQUENCE_CLASSIFIER_KINDS:
        return []
    model_config = AutoConfig.from_pretrained(path, num_labels=len(LABEL_COLUMNS))
    with torch.device("meta"):
        skeleton = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(model_config)](model_config)
    return head_module_names(skeleton, kind)


def choose_pad_token(tokenizer: Any, last_token_id: int | None) -> None:
    """Give a decoder's tokenizer a pad token that differs from `last_token_id`, the token every row ends with.

    Keeps the tokenizer's own pad token when it has one that qualifies, else takes unk, eos or bos (in that
    order; Llama-style tokenizers have no pad token). The head of a decoder sequence classifier scores the
    rightmost non-pad token, so a pad equal to the last real token would move the head one token left.
    """
    for token in (tokenizer.pad_token, tokenizer.unk_token, tokenizer.eos_token, tokenizer.bos_token):
        if token is not None and tokenizer.convert_tokens_to_ids(token) != last_token_id:
            tokenizer.pad_token = token
            tokenizer.padding_side = "right"  # as app/batching.pad_batch pads
            return
    raise ValueError(f"the tokenizer has no pad, unk, eos or bos token that differs from the last token of every "
                     f"row (id {last_token_id}); add a pad token to the tokenizer")


def label_token_ids(tokenizer: Any, label_words: tuple[str, ...]) -> list[int]:
    """The single token of each label word (decoder_lm); raises ValueError naming a word that is not one token."""
    ids = []
    for word in label_words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise ValueError(f"model.label_words: {word!r} is {len(tokens)} tokens {pieces} for this tokenizer; "
                             f"model.kind=decoder_lm needs each label word to be exactly one token "
                             f"(try a leading space, e.g. ' A', or another word)")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"model.label_words {label_words} do not map to three different tokens: {ids}")
    return ids


def label_token_sequences(tokenizer: Any, label_words: tuple[str, ...]) -> list[list[int]]:
    """Each label word as the decoder target sequence a seq2seq model is trained on (with the tokenizer's
    specials, e.g. T5's closing </s>); raises ValueError if two words give the same sequence."""
    sequences = [tokenizer(word)["input_ids"] for word in label_words]
    if len({tuple(sequence) for sequence in sequences}) != len(sequences) or not all(sequences):
        raise ValueError(f"model.label_words {label_words} do not give three different non-empty token "
                         f"sequences: {sequences}")
    return sequences


def class_loss(logits: torch.Tensor, labels: torch.Tensor, lm_loss: str = "labels") -> torch.Tensor:
    """The training loss of (B, 3) class logits and (B,) labels, averaged over the batch.

    labels: cross-entropy over the three classes. vocab: the logits are log-probabilities over a whole LM
    vocabulary (`CausalLMClassifier(vocab_log_probs=True)`), so the negative log-likelihood of the label's
    column is the LM's cross-entropy over its vocabulary on the verdict token, the loss of instruction tuning
    with the prompt tokens masked (-100).
    """
    if lm_loss == "vocab":
        return torch.nn.functional.nll_loss(logits, labels)
    if lm_loss == "labels":
        return torch.nn.functional.cross_entropy(logits, labels)
    raise ValueError(f"model.lm_loss must be 'labels' or 'vocab', got {lm_loss!r}")


class CausalLMClassifier(torch.nn.Module):
    """Class logits of a causal LM: its next-token logits at each row's last real token, for the label tokens.

    With `vocab_log_probs` the logits are the label tokens' log-probabilities under the softmax over the whole
    vocabulary (instruction tuning, `class_loss(..., "vocab")`); a softmax of the three renormalises them.
    """

    def __init__(self, model: torch.nn.Module, label_ids: list[int], vocab_log_probs: bool = False) -> None:
        super().__init__()
        self.model = model
        self.label_ids = list(label_ids)
        self.vocab_log_probs = vocab_log_probs

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SequenceClassifierOutput:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * attention_mask).argmax(-1)  # (B,) rightmost real token
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        keep[torch.arange(len(last), device=last.device), last] = True  # one position per row: lm_head on B rows only
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                            use_cache=False).logits  # (B, V)
        if self.vocab_log_probs:
            logits = logits.float().log_softmax(-1)  # (B, V), fp32: a bf16 log-softmax over V loses the tail
        return SequenceClassifierOutput(logits=logits[:, self.label_ids])  # (B, 3)


class Seq2SeqClassifier(torch.nn.Module):
    """Class logits of an encoder-decoder: log p(label word | input) of each label's token sequence.

    The input is encoded once; the decoder then scores the three label sequences for every row in one pass
    over 3B rows. A softmax over the three logits is the model's distribution restricted to the label set.
    """

    def __init__(self, model: torch.nn.Module, label_sequences: list[list[int]], decoder_start_id: int,
                 pad_id: int) -> None:
        super().__init__()
        self.model = model
        width = max(len(sequence) for sequence in label_sequences)
        targets = torch.full((len(label_sequences), width), pad_id, dtype=torch.long)
        valid = torch.zeros((len(label_sequences), width), dtype=torch.bool)
        for row, sequence in enumerate(label_sequences):
            targets[row, : len(sequence)] = torch.tensor(sequence)
            valid[row, : len(sequence)] = True
        starts = torch.full((len(label_sequences), 1), decoder_start_id, dtype=torch.long)
        # Plain attributes, not buffers: they stay out of state dicts and checkpoints.
        self.targets, self.valid = targets, valid  # (3, L)
        self.decoder_inputs = torch.cat([starts, targets[:, :-1]], dim=1)  # (3, L) teacher forcing

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SequenceClassifierOutput:
        batch, n_labels = input_ids.shape[0], self.targets.shape[0]
        device = input_ids.device
        hidden = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Label-major rows: label k of row b sits at k * B + b.
        outputs = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat(n_labels, 1, 1)),  # (3B, T, H)
            attention_mask=attention_mask.repeat(n_labels, 1),
            decoder_input_ids=self.decoder_inputs.to(device).repeat_interleave(batch, dim=0),  # (3B, L)
            use_cache=False,
        )
        log_probs = outputs.logits.float().log_softmax(-1)  # (3B, L, V)
        targets = self.targets.to(device).repeat_interleave(batch, dim=0)
        token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (3B, L)
        valid = self.valid.to(device).repeat_interleave(batch, dim=0)
        scores = torch.where(valid, token_log_probs, 0.0).sum(-1)  # (3B,)
        return SequenceClassifierOutput(logits=scores.view(n_labels, batch).T)  # (B, 3)
