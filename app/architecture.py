"""What the memory planner reads about a model: its parameters, linear layers and transformer blocks.

The model of `model.kind` is built on the meta device from its config.json (`build_meta_model`): every
parameter is counted exactly and nothing is allocated. `lora_targets` applies peft's target_modules rules
to the linear layers, so LoRA parameters are counted exactly too.

config.json comes from a local folder, or the hub (or its local cache); when that lookup fails (offline
without the file cached, an unreachable hub, a gated model without a token), the shape the project stored for
the model (app/model_shapes.py) stands in, and `Architecture.stored_shape` says why.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from app.config import AdapterConfig, ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Linear layers that read the same tensor (sibling projections): one saved input serves all of them.
SHARED_INPUT_LEAVES = ({"q_proj", "k_proj", "v_proj"}, {"query", "key", "value"}, {"q", "k", "v"},
                       {"q_lin", "k_lin", "v_lin"}, {"query_proj", "key_proj", "value_proj"},
                       {"gate_proj", "up_proj"}, {"wi_0", "wi_1"}, {"w1", "w3"})
OUTPUT_PROJECTION_LEAVES = {"o_proj", "o", "out_proj", "out_lin"}  # read the attention kernel's output
CROSS_ATTENTION_PARENTS = ("EncDecAttention", "encoder_attn", "crossattention")


@dataclass(frozen=True)
class LinearLayer:
    """One nn.Linear (or transformers Conv1D) of the model."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    group: str  # layers with the same group read the same input tensor
    cross: bool = False  # reads the encoder's output (cross-attention key / value)
    attention_output: bool = False  # the attention's output projection: reads the attention kernel's output

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Block:
    """One transformer block of a stack (all blocks of a stack have the same shape)."""

    linears: tuple[LinearLayer, ...]
    norms: int
    params: int
    count: int  # blocks in the stack
    cross_attention: bool


@dataclass(frozen=True)
class Architecture:
    """What the planner needs to know about a model, read from its config on the meta device."""

    kind: Literal["encoder", "decoder", "decoder_lm", "t5"]
    total_params: int
    linears: tuple[LinearLayer, ...]  # every linear layer, heads included
    head_names: tuple[str, ...]  # the fresh classifier head's modules, or the LM head: not LoRA'd nor quantized
    head_params: int  # the fresh classifier head's parameters (trained fully as peft modules_to_save); 0 for LMs
    encoder: Block
    decoder: Block | None  # t5 only
    outer_norms: int  # norms outside the blocks (embedding norm, final norm)
    hidden: int
    heads: int
    head_dim: int
    kv_heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    rms_norm: bool  # transformers' python RMSNorm (upcasts to fp32, saves its normalised output too)
    attention_dropout: float
    hidden_dropout: float
    attention_implementation: str
    largest_param: int
    stored_shape: str | None = None  # why app/model_shapes.py stood in for config.json; None = config.json read

    def in_head(self, name: str) -> bool:
        return any(name == head or name.startswith(head + ".") for head in self.head_names)

    @property
    def body_linears(self) -> list[LinearLayer]:
        """The linear layers outside the head: what 'all-linear' LoRA targets and QLoRA quantizes."""
        return [layer for layer in self.linears if not self.in_head(layer.name)]


def _first_attribute(config, names: tuple[str, ...], default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """ModuleLists of identical transformer blocks (each holding linear layers and norms)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if any(_linear_shape(m) for m in module[0].modules()) and any(_is_norm(m) for m in module[0].modules()):
                found.append((name, module))
    return found


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 style linear: weight is (in, out)
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return None


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__.endswith(
        ("LayerNorm", "RMSNorm"))


def _input_group(name: str) -> tuple[str, bool]:
    parent, _, leaf = name.rpartition(".")
    cross = parent.endswith(CROSS_ATTENTION_PARENTS) and leaf in {"k", "v", "k_proj", "v_proj", "key", "value"}
    if cross:
        return "encoder-output", True  # every decoder block's cross-attention reads the same encoder output
    for index, leaves in enumerate(SHARED_INPUT_LEAVES):
        if leaf in leaves:
            return f"{parent}#{index}", False
    return name, False


def load_model_config(model_config: ModelConfig, **kwargs: Any) -> tuple[PretrainedConfig, str | None]:
    """The model's config.json (`kwargs` set as in from_pretrained), and None; or, when the lookup fails for a
    model app/model_shapes.py stores, its stored shape and the reason. A local folder always wins.

    Raises:
        OSError: no config.json could be read and no shape is stored for the model.
    """
    from transformers import AutoConfig

    from app.model_shapes import SHAPES, stored_config
    from app.modeling import resolve_model_path

    name = model_config.name_or_path
    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path, **kwargs), None
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if os.path.isdir(path):
            raise
        if name not in SHAPES:
            raise OSError(f"cannot read config.json of {name} ({reason}); shapes are stored only for "
                          f"{', '.join(SHAPES)} (app/model_shapes.py): pass a local folder, or plan where the "
                          "hub (or its cache) has the model") from error
        return stored_config(name, **kwargs), reason


def untie_separate_lm_head(model: torch.nn.Module) -> None:
    """T5 v1.1 / FLAN-T5 keep an lm_head apart from the shared embedding (config.json tie_word_embeddings false).
    transformers 5's T5Config forces tie_word_embeddings=True (the flag survives as scale_decoder_outputs), so
    from_config ties them, while from_pretrained unties them when the checkpoint holds both: count both here."""
    output = model.get_output_embeddings()
    if getattr(model.config, "scale_decoder_outputs", True) is False and output is not None \
            and output.weight is model.get_input_embeddings().weight:
        output.weight = torch.nn.Parameter(torch.empty_like(output.weight))


def build_meta_model(model_config: ModelConfig) -> tuple[torch.nn.Module, str | None]:
    """The transformers model of `model.kind` (with its 3-way head), built on the meta device from config.json
    only (or the stored shape: the second value says why, else None). Call it where no ZeRO-3 config is
    registered (`from_config` would build under zero.Init)."""
    from app.data import LABEL_COLUMNS
    from app.families import AUTO_CLASSES

    if model_config.kind not in AUTO_CLASSES:
        raise ValueError(f"model.kind={model_config.kind} has no network to build; the planner answers for it "
                         "without one (app/memory.plan_memory)")
    extra = {"attn_implementation": model_config.attn_implementation} if model_config.attn_implementation else {}
    hf_config, stored = load_model_config(model_config, num_labels=len(LABEL_COLUMNS), **extra)
    with torch.device("meta"):
        model = AUTO_CLASSES[model_config.kind].from_config(hf_config)
    untie_separate_lm_head(model)
    return model, stored


def read_architecture(model_config: ModelConfig) -> Architecture:
    """Count the parameters and read the shapes the plan needs (no weights are loaded)."""
    from app.families import head_module_names

    model, stored = build_meta_model(model_config)
    config = model.config
    output = model.get_output_embeddings()
    fresh_head = head_module_names(model, model_config.kind)  # the same rule as training's modules_to_save
    lm_head = [name for name, module in model.named_modules() if output is not None and module is output]
    head_names = tuple(fresh_head or lm_head)
    head_params = sum(p.numel() for name in fresh_head for p in model.get_submodule(name).parameters())
    linears = []
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape:
            group, cross = _input_group(name)
            attention_output = name.rpartition(".")[2] in OUTPUT_PROJECTION_LEAVES or name.endswith(
                "attention.output.dense")  # BERT's naming
            linears.append(LinearLayer(name, shape[0], shape[1], getattr(module, "bias", None) is not None,
                                       group, cross, attention_output))
    stacks = []
    for stack_name, stack in _blocks(model):
        prefix = f"{stack_name}.0."
        block_linears = tuple(layer for layer in linears if layer.name.startswith(prefix))
        stacks.append((stack_name, Block(block_linears, sum(_is_norm(m) for m in stack[0].modules()),
                                         sum(p.numel() for p in stack[0].parameters()), len(stack),
                                         any(layer.cross for layer in block_linears))))
    if not stacks:
        raise ValueError(f"cannot find the transformer blocks of {model_config.name_or_path} "
                         f"({type(model).__name__}); the memory planner knows ModuleLists of identical blocks")
    if model_config.kind == "t5":
        encoder = next(block for name, block in stacks if "decoder" not in name)
        decoder = next((block for name, block in stacks if "decoder" in name), None)
    else:
        encoder, decoder = max((block for _, block in stacks), key=lambda block: block.params * block.count), None
    in_blocks = sum(block.norms * block.count for _, block in stacks)
    hidden = _first_attribute(config, ("hidden_size", "d_model", "n_embd", "dim"))
    heads = _first_attribute(config, ("num_attention_heads", "num_heads", "n_head", "n_heads"))
    head_dim = _first_attribute(config, ("head_dim", "d_kv"), hidden // heads)
    leaves = {layer.name.rpartition(".")[2] for layer in encoder.linears}
    return Architecture(
        kind=model_config.kind,
        total_params=sum(p.numel() for p in model.parameters()),
        linears=tuple(linears),
        head_names=head_names,
        head_params=head_params,
        encoder=encoder,
        decoder=decoder,
        outer_norms=sum(_is_norm(m) for m in model.modules()) - in_blocks,
        hidden=hidden,
        heads=heads,
        head_dim=head_dim,
        kv_heads=_first_attribute(config, ("num_key_value_heads",), heads),
        intermediate=_first_attribute(config, ("intermediate_size", "d_ff", "ffn_dim", "n_inner", "hidden_dim"),
                                      4 * hidden),
        vocab=config.vocab_size,
        gated_mlp=bool(leaves & {"gate_proj", "wi_0", "w1"}),
        rms_norm=any("RMSNorm" in type(m).__name__ or type(m).__name__ == "T5LayerNorm" for m in model.modules()),
        attention_dropout=float(_first_attribute(config, ("attention_probs_dropout_prob", "attention_dropout",
                                                          "attn_pdrop", "dropout_rate"), 0.0)),
        hidden_dropout=float(_first_attribute(config, ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop",
                                                       "dropout_rate", "dropout"), 0.0)),
        attention_implementation=config._attn_implementation or "eager",
        largest_param=max(p.numel() for p in model.parameters()),
        stored_shape=stored,
    )


def lora_targets(arch: Architecture, target_modules: str | list[str]) -> list[LinearLayer]:
    """The linear layers peft puts LoRA on: 'all-linear' = every linear layer but the LM / classifier head;
    a list matches a module name or its dotted suffix; another string is a full-match regex (peft's rules)."""
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        return arch.body_linears
    if isinstance(target_modules, str):
        return [layer for layer in arch.linears if re.fullmatch(target_modules, layer.name)]
    return [layer for layer in arch.linears
            if any(layer.name == key or layer.name.endswith("." + key) for key in target_modules)]


def count_lora_parameters(arch: Architecture, r: int, target_modules: str | list[str]) -> int:
    """LoRA A (r x in) and B (out x r) matrices over all targeted layers."""
    return sum(r * (layer.in_features + layer.out_features) for layer in lora_targets(arch, target_modules))


def count_trainable_parameters(arch: Architecture, adapter: AdapterConfig) -> int:
    """Parameters training updates: all of them (full), else the LoRA matrices plus the fresh classifier head
    that peft's modules_to_save trains fully (adapter.train_head)."""
    if adapter.method == "full":
        return arch.total_params
    head_copy = arch.head_params if adapter.train_head else 0
    return count_lora_parameters(arch, adapter.r, adapter.target_modules) + head_copy
