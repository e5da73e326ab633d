"""How much accelerator memory one training worker needs, estimated from the config before any job starts.

The architecture comes from the model's config.json (app/architecture.py builds it on the meta device, so
every parameter is counted exactly; offline, the shape app/model_shapes.py stores for the model). A model
without a network (model.kind=tfidf_xgb) needs no accelerator memory. Per worker, in bytes:

  weights         every parameter in the weight dtype: model.dtype, except that a full finetune without
                  DeepSpeed holds fp32 weights (the master copy) and DeepSpeed's bf16 / fp16 modes cast the
                  module to that precision. QLoRA stores the body's linear weights as 4-bit NF4
                  (`nf4_bytes_per_param`); peft's prepare_model_for_kbit_training upcasts the rest
                  (embeddings, norms, head) to fp32, except under ZeRO-3. ZeRO-3 divides by the world
                  size; parameter offload moves them to the CPU.
  adapter         LoRA A/B matrices (r x (in + out) per targeted layer, exact) and the trained copy of a
                  classifier head that peft's modules_to_save keeps beside the frozen one.
  gradients       trained parameters only, in their dtype; ZeRO-2/3 divide by the world size.
  optimizer       without DeepSpeed every trained parameter is fp32 (full weights, LoRA matrices, the head
                  copy), so torch AdamW's two moments are fp32: 8 bytes per trained parameter. A DeepSpeed
                  ZeRO optimizer keeps fp32 moments plus an fp32 master copy of its 16-bit weights (12 bytes;
                  Rajbhandari et al. 2020, "ZeRO"). ZeRO-1+ divides by the world size; optimizer offload moves
                  them to the CPU.
  optimizer step  the AdamW step's temporaries (foreach on GPUs: one state-sized tensor; per tensor on the
                  CPU), or DeepSpeed's fp32 gradient partition.
  activations     what autograd saves for the backward pass at train.batch_size x format.max_length tokens
                  (every batch padded to the full length, the worst case): `block_activation_bytes`.
  evaluation      the no-grad validation forward pass at train.eval_batch_size rows: `_evaluation_bytes`.
  buffers         DDP gradient buckets, DeepSpeed communication buckets and ZeRO-3 gathered parameters,
                  16-bit copies that autocast makes of fp32 weights, the 4-bit weight being dequantized.
  overhead        CUDA context, cuBLAS workspaces and allocator slack: a fixed 1 GiB on GPUs, 0 on the CPU.

Training peaks at weights + adapter + optimizer + buffers + overhead + max(activations, gradients + step):
with `zero_grad(set_to_none=True)` the backward pass creates gradients as it frees the activations that
made them, so the two do not coexist in full (measured: the peak is at the start of the backward pass when
activations dominate). Under gradient accumulation the earlier micro-batches' gradients stay alive through
the next forward pass, so both count. Validation peaks at the same resident part + evaluation; the plan's
peak is the larger of the two.

The formulas were checked against the measured peak tensor memory of real CPU training steps of the
project's models (tests/test_memory.py: all within a few percent, Gemma-2 and T5 within ~12%). The GPU-only
terms (fused attention kernels, 1-byte dropout masks, foreach temporaries, overhead) follow PyTorch's and
DeepSpeed's documented behaviour but are not measured there.

`check_fits` compares the peak with `scaling.accelerator_memory_gb` less `HEADROOM` (10%), which covers
allocator fragmentation and transients this plan does not itemise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.architecture import (
    Architecture,
    Block,
    LinearLayer,
    count_lora_parameters,
    count_trainable_parameters,
    lora_targets,
    read_architecture,
)
from app.config import Config

GIB = 2**30
HEADROOM = 0.10  # share of the accelerator kept free for fragmentation and unitemised transients
CUDA_OVERHEAD_BYTES = GIB  # CUDA context (~0.5 GiB on H100), cuBLAS workspaces, NCCL, allocator slack
NF4_BLOCK = 64  # bitsandbytes 4-bit block size: one absmax constant per 64 weights
NF4_NESTED_BLOCK = 256  # double quantization: absmax constants quantized to 8 bit, one fp32 per 256 of them
T5_LABEL_TOKENS = 3  # decoder positions per label word (its 1-2 pieces and </s>); all 3 labels are scored
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def nf4_bytes_per_param(double_quant: bool) -> float:
    """bitsandbytes 4-bit storage: 4 bits per weight plus one absmax per 64-weight block, which double
    quantization stores as 8 bits with one fp32 constant per 256 blocks (Dettmers et al. 2023, QLoRA).
    The packed weights' storage dtype (bnb_4bit_quant_storage) does not change their size."""
    constants = (1 + 4 / NF4_NESTED_BLOCK) / NF4_BLOCK if double_quant else 4 / NF4_BLOCK
    return 0.5 + constants


@dataclass(frozen=True)
class Precision:
    """Byte widths the plan uses, resolved for the worker's device."""

    weight: int  # frozen and (full finetuning) trained weights
    trainable: int  # trained parameters, their gradients and torch AdamW's moments
    activation: int  # activations saved for the backward pass
    autocast: bool  # 16-bit torch.autocast over the model (without DeepSpeed): fp32 weights are cast per matmul
    residual: int = 0  # the residual stream's width where it differs from `activation` (0 = the same)

    @property
    def residual_width(self) -> int:
        return self.residual or self.activation


def resolve_model_dtype(config: Config, device: torch.device) -> str:
    """`model.dtype` on `device`: 'auto' = bf16 on GPUs that have it (assumed for a GPU planned from a machine
    without one), else fp32. The dtype frozen weights load in and full-weight exports are written in."""
    if config.model.dtype != "auto":
        return config.model.dtype
    if device.type != "cuda":
        return "fp32"
    return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"


def resolve_train_precision(config: Config, device: torch.device, notes: list[str] | None = None) -> str:
    """`train.precision` on `device` as the planner sees it: for a GPU planned from a machine without one, 'auto'
    is assumed bf16 (said in `notes`); elsewhere the rule training uses (app.deepspeed)."""
    from app.deepspeed import resolve_training_precision

    if device.type == "cuda" and not torch.cuda.is_available():
        if notes is not None:
            notes.append("planned for a GPU from a machine without one: 'auto' dtypes assume bf16 (Ampere or newer)")
        return "bf16" if config.train.precision == "auto" else config.train.precision
    return resolve_training_precision(config.train.precision, device,
                                      bf16_on_cpu=config.train.cpu_bf16 and not config.deepspeed.enabled)


def resolve_precision(config: Config, device: torch.device, notes: list[str]) -> Precision:
    """Weight, trainable and activation dtypes.

    DeepSpeed casts the module to its 16-bit precision and keeps the fp32 masters in its optimizer. Without
    DeepSpeed every trained parameter is fp32 under 16-bit autocast (app/engine.py): a full finetune loads its
    weights in fp32 (the master copy), lora / qlora keep the frozen base in model.dtype with peft's fp32 LoRA
    weights and the trained head copy upcast to fp32.
    """
    train = resolve_train_precision(config, device, notes)
    weight = resolve_model_dtype(config, device)
    deepspeed_16bit = config.deepspeed.enabled and train != "fp32"
    if deepspeed_16bit:
        weight = train  # the engine casts the module; fp32 masters live in the optimizer
    elif config.adapter.method == "full":
        weight = "fp32"  # the master copy (app.modeling.keeps_fp32_masters); autocast computes in train.precision
    weight_bytes, train_bytes = DTYPE_BYTES[weight], DTYPE_BYTES[train]
    # QLoRA outside ZeRO-3: prepare_model_for_kbit_training upcasts the embeddings (and norms) to fp32, so the
    # residual stream is fp32, and bitsandbytes' 4-bit linears return their input's dtype: the MLP's saved
    # tensors and the blocks' inputs are fp32 (measured on an H200, docs/BENCHMARKS.md "GPU ... QLoRA").
    zero3 = config.deepspeed.enabled and config.deepspeed.stage == 3
    fp32_residual = config.adapter.method == "qlora" and not zero3
    activation = min(weight_bytes, train_bytes)
    return Precision(
        weight=weight_bytes,
        trainable=weight_bytes if deepspeed_16bit else 4,
        activation=activation,
        autocast=train_bytes == 2 and not config.deepspeed.enabled,
        residual=4 if fp32_residual and activation < 4 else 0,
    )


def _materialises_scores(arch: Architecture, device: torch.device, training: bool = True) -> bool:
    """Whether attention keeps its (heads x T x T) probabilities: eager attention always; PyTorch's SDPA
    falls back to its math kernel on the CPU when training with attention dropout."""
    implementation = arch.attention_implementation
    if implementation == "eager":
        return True
    return implementation == "sdpa" and device.type == "cpu" and training and arch.attention_dropout > 0


def block_activation_bytes(arch: Architecture, block: Block, tokens: int, seq: int, batch: int,
                           precision: Precision, trains_weights: bool, lora: set[str], lora_r: int,
                           lora_dropout: bool, device: torch.device, encoder_seq: int = 0) -> tuple[int, int]:
    """Bytes autograd saves for one block's backward pass, and the block's largest single activation.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1)
    count s*b*h*(34 + 5*a*s/h) bytes per layer for a 16-bit GPT block with dropout: 4sbh for the inputs
    of the two norms and the two sub-blocks, 11sbh + 5as^2b for attention (Q, K, V, softmax, its dropout
    mask and output, the output projection's input and dropout mask), 19sbh for the 4h MLP. This is that
    count, generalised term by term:
      - linear inputs: saved once per tensor that several projections read, and only when a weight that
        reads it trains (a frozen weight needs no input for its gradient); every LoRA layer with dropout
        saves its own dropped-out copy plus the dropout mask, and its r-wide A output;
      - norms save their input; transformers' python RMSNorm saves it in fp32 and, when the norm weight
        trains, its normalised output as well;
      - attention saves Q, K, V (K and V repeated to every query head, as transformers does for grouped-query
        attention under a padding mask) and either the probabilities (plus dropout mask and output) or,
        for fused kernels, their output, the fp32 log-sum-exp and the padding mask in the activation dtype
        (T5's mask carries its per-head position bias, so it is heads x larger);
      - the MLP saves its activation function's input, and for gated MLPs also both factors of the product;
      - hidden dropout keeps two masks per block.
    Dropout masks are 1 byte (bool) on GPUs, where torch uses its fused dropout kernel, and a full tensor
    in the activation dtype on the CPU (torch multiplies by a float noise tensor there).
    """
    width = precision.activation
    mask_width = 1 if device.type == "cuda" else width
    q_dim, kv_dim = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    fused = not _materialises_scores(arch, device)
    saved = 0
    largest = tokens * max(arch.hidden, arch.intermediate) * width
    groups: dict[str, list[LinearLayer]] = {}
    for layer in block.linears:
        groups.setdefault(layer.group, []).append(layer)
    for group, layers in groups.items():
        features = layers[0].in_features
        targeted = [layer for layer in layers if layer.name in lora]
        group_tokens = batch * encoder_seq if group == "encoder-output" else tokens
        saved += len(targeted) * group_tokens * lora_r * width
        if lora_dropout:
            saved += len(targeted) * group_tokens * features * (width + mask_width)
        # peft's fp32 LoRA weights under 16-bit autocast: each layer casts its input up, and its lora_A product
        # saves its own 16-bit copy of it (measured on an H200 with adapter.dropout=0, docs/BENCHMARKS.md)
        copies_per_layer = bool(targeted) and not lora_dropout and precision.trainable == 4 and width == 2
        if copies_per_layer:
            saved += len(targeted) * group_tokens * features * width
        # the encoder output is counted once by the caller; a fused kernel saves its output itself
        shared_elsewhere = group == "encoder-output" or (fused and layers[0].attention_output)
        if not shared_elsewhere and (trains_weights or (targeted and not lora_dropout and not copies_per_layer)):
            saved += group_tokens * features * width
    norm_bytes = 4 if arch.rms_norm else width
    if arch.rms_norm and trains_weights:
        norm_bytes += width
    saved += block.norms * tokens * arch.hidden * norm_bytes
    attentions = [(tokens, seq, q_dim, kv_dim)]
    if block.cross_attention:
        attentions.append((tokens, encoder_seq, q_dim, q_dim))
    for query_tokens, key_seq, query_dim, key_dim in attentions:
        key_tokens = batch * key_seq
        flash = arch.attention_implementation.startswith("flash")  # flash-attn: GQA native, unpadded, no mask
        expanded_kv = key_dim if flash else query_dim
        saved += (query_tokens * query_dim + 2 * key_tokens * expanded_kv) * width
        score_elements = arch.heads * query_tokens * key_seq
        if fused:
            saved += query_tokens * query_dim * width + arch.heads * query_tokens * 4
            if not flash:  # SDPA converts the (padding) mask per call; T5's also holds per-head position bias
                saved += batch * seq * key_seq * width * (arch.heads if arch.kind == "t5" else 1)
        else:
            upcast = 4 if arch.attention_implementation == "eager" and arch.kind in ("decoder", "decoder_lm") \
                and width == 2 else 0  # decoders' eager softmax runs in fp32, then casts down
            dropout = arch.attention_dropout > 0
            saved += score_elements * (width + upcast + (mask_width + width if dropout else 0))
            largest = max(largest, score_elements * width)
    saved += tokens * arch.intermediate * precision.residual_width * (3 if arch.gated_mlp else 1)
    if arch.hidden_dropout > 0:
        saved += 2 * tokens * arch.hidden * mask_width
    return saved, largest


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated accelerator memory of one training worker, by component (bytes)."""

    components: dict[str, int]
    training_peak_bytes: int  # forward, backward and optimizer step
    evaluation_peak_bytes: int  # the no-grad validation forward pass between epochs
    formula: str
    description: str
    total_params: int
    trainable_params: int
    notes: tuple[str, ...] = field(default=())
    architecture: Architecture | None = field(default=None, repr=False, compare=False)  # what was planned for

    @property
    def peak_bytes(self) -> int:
        return max(self.training_peak_bytes, self.evaluation_peak_bytes)

    @property
    def needs_accelerator(self) -> bool:
        return bool(self.components)

    def fits(self, limit_bytes: float, headroom: float = HEADROOM) -> bool:
        """Whether the peak fits in `limit_bytes` with `headroom` of it left free."""
        return self.peak_bytes <= limit_bytes * (1 - headroom)

    def describe_fit(self, limit_gb: float | None) -> tuple[bool, str]:
        """Whether the plan fits `limit_gb` GiB (None = not checked), and a line that says so."""
        if not self.needs_accelerator:
            return True, "fits: nothing to fit (no accelerator memory needed)"
        if limit_gb is None:
            return True, "fits: not checked (set scaling.accelerator_memory_gb=<GiB per worker>)"
        usable = limit_gb * GIB * (1 - HEADROOM)
        fits = self.fits(limit_gb * GIB)
        return fits, (f"fits: {'yes' if fits else 'NO'} ({self.peak_bytes / GIB:.2f} GiB of {usable / GIB:.2f} GiB "
                      f"usable = {limit_gb} GiB less {HEADROOM:.0%} headroom)")

    def render(self) -> str:
        """A small table in GiB."""
        if not self.needs_accelerator:
            return "\n".join([self.description, *(f"  note: {note}" for note in self.notes)])
        width = max(len("evaluation peak"), *map(len, self.components)) + 2
        lines = [self.description]
        lines += [f"  {name:<{width}}{value / GIB:9.3f} GiB" for name, value in self.components.items()]
        lines.append(f"  {'training peak':<{width}}{self.training_peak_bytes / GIB:9.3f} GiB")
        lines.append(f"  {'evaluation peak':<{width}}{self.evaluation_peak_bytes / GIB:9.3f} GiB")
        lines.append(f"  {'peak':<{width}}{self.peak_bytes / GIB:9.3f} GiB   = {self.formula}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


class MemoryBudgetError(RuntimeError):
    """The planned peak does not fit the configured accelerator memory."""


def _activation_bytes(config: Config, arch: Architecture, precision: Precision, device: torch.device,
                      trains_weights: bool, lora: set[str]) -> int:
    """Saved activations at the end of the forward pass plus the backward pass's largest transients."""
    batch, seq, width = config.train.batch_size, config.format.max_length, precision.activation
    tokens = batch * seq
    lora_dropout = config.adapter.method != "full" and config.adapter.dropout > 0
    common = dict(precision=precision, trains_weights=trains_weights, lora=lora, lora_r=config.adapter.r,
                  lora_dropout=lora_dropout, device=device)
    encoder_block, largest = block_activation_bytes(arch, arch.encoder, tokens, seq, batch, **common)
    stacks = [(arch.encoder, encoder_block, tokens)]
    outer = 0
    if arch.decoder is not None:  # app/families.Seq2SeqClassifier: the decoder scores all 3 labels per row
        rows = 3 * batch
        decoder_tokens = rows * T5_LABEL_TOKENS
        decoder_block, decoder_largest = block_activation_bytes(
            arch, arch.decoder, decoder_tokens, T5_LABEL_TOKENS, rows, encoder_seq=seq, **common)
        stacks.append((arch.decoder, decoder_block, decoder_tokens))
        largest = max(largest, decoder_largest)
        cross_lora = any(layer.cross and layer.name in lora for layer in arch.decoder.linears)
        if trains_weights or (cross_lora and not lora_dropout):
            outer += rows * seq * arch.hidden * width  # the encoder output repeated per label, read by cross-attention
        outer += decoder_tokens * arch.vocab * (width + 4)  # logits and their fp32 log-softmax
    if config.model.gradient_checkpointing:  # each block keeps its input; one block is recomputed at a time
        blocks = sum(block.count * block_tokens * arch.hidden * precision.residual_width
                     for block, _, block_tokens in stacks)
        blocks += max(saved for _, saved, _ in stacks)
    else:
        blocks = sum(block.count * saved for block, saved, _ in stacks)
    norm_bytes = (4 if arch.rms_norm else width) + (width if arch.rms_norm and trains_weights else 0)
    outer += arch.outer_norms * tokens * arch.hidden * norm_bytes
    if arch.hidden_dropout > 0:
        outer += tokens * arch.hidden * (1 if device.type == "cuda" else width)  # the embedding dropout's mask
    if arch.kind == "decoder" and (trains_weights or config.adapter.train_head):
        outer += tokens * arch.hidden * width  # the score head reads every position's final hidden state
    if arch.kind == "decoder_lm":  # app/families.CausalLMClassifier: the LM head on each row's last token only
        outer += batch * arch.vocab * width
    return blocks + outer + 2 * largest  # backward: an incoming and an outgoing gradient of the largest tensor


def _evaluation_bytes(config: Config, arch: Architecture, precision: Precision, device: torch.device) -> int:
    """Working set of the no-grad validation forward pass (train.eval_batch_size x format.max_length tokens):
    the residual stream, its normalised copy and a sub-block's output, plus the larger of one attention
    (Q, K, V, two score-sized tensors when scores are materialised, else the output, and the padding mask)
    and one MLP (its intermediate tensors), plus the vocabulary logits. No KV cache: app/families sets
    use_cache=False."""
    seq, width = config.format.max_length, precision.activation
    batch = config.train.eval_batch_size
    tokens = batch * seq
    q_dim = arch.heads * arch.head_dim
    attention = 4 * tokens * q_dim * width  # Q, K and V repeated to every head, the output
    if _materialises_scores(arch, device, training=False):
        upcast = 4 if arch.attention_implementation == "eager" and arch.kind in ("decoder", "decoder_lm") else 0
        attention = 3 * tokens * q_dim * width + arch.heads * tokens * seq * (2 * width + upcast)
    if not arch.attention_implementation.startswith("flash"):  # the (B, 1, T, T) mask: bool, and as floats
        attention += batch * seq * seq * (width + 1)
    mlp = tokens * arch.intermediate * width * (3 if arch.gated_mlp else 2)
    logits = batch * arch.vocab * width if arch.kind == "decoder_lm" else 0
    if arch.kind == "t5":  # the encoder output repeated per label, and the labels' logits + log-softmax
        logits = 3 * tokens * arch.hidden * width + 3 * batch * T5_LABEL_TOKENS * arch.vocab * (width + 4)
    return 3 * tokens * arch.hidden * width + max(attention, mlp) + logits


def plan_memory(config: Config, world_size: int | None = None, architecture: Architecture | None = None) -> MemoryPlan:
    """Estimate one worker's peak accelerator memory for training `config` on `world_size` workers.

    Args:
        config: the whole config (model, adapter, deepspeed, train, format and scaling are read).
        world_size: data-parallel workers; default `scaling.num_workers`.
        architecture: a pre-read `read_architecture(config.model)` (saves reading it again).
    """
    if config.model.kind == "tfidf_xgb":
        return MemoryPlan({}, 0, 0, "0", "model.kind=tfidf_xgb (TF-IDF features, XGBoost on CPU workers): no "
                          "accelerator memory needed", 0, 0)
    world = world_size or config.scaling.max_workers
    device = torch.device("cuda" if config.scaling.use_gpu else "cpu")
    notes: list[str] = []
    arch = architecture or read_architecture(config.model)
    if arch.stored_shape:
        notes.append(f"shape of {config.model.name_or_path} from the project's stored facts (app/model_shapes.py): "
                     f"its config.json could not be read ({arch.stored_shape})")
    precision = resolve_precision(config, device, notes)
    adapter, speed = config.adapter, config.deepspeed
    stage = speed.stage if speed.enabled else 0
    full = adapter.method == "full"

    lora = {layer.name for layer in lora_targets(arch, adapter.target_modules)} if not full else set()
    if not full and not lora:
        raise ValueError(f"adapter.target_modules={adapter.target_modules!r} matches no linear layer of "
                         f"{config.model.name_or_path}; use 'all-linear' or module names such as q_proj")
    lora_params = count_lora_parameters(arch, adapter.r, adapter.target_modules) if not full else 0
    head_copy = arch.head_params if not full and adapter.train_head else 0
    unquantized_bytes = precision.weight
    if adapter.method == "qlora":
        quantized = sum(layer.weight_params for layer in arch.body_linears)
        if not (speed.enabled and stage == 3):  # peft's prepare_model_for_kbit_training (app/adapters.py)
            unquantized_bytes = 4
            notes.append("qlora: embeddings, norms and head upcast to fp32 for training (not under ZeRO-3)")
        weights = (quantized * nf4_bytes_per_param(adapter.double_quant)
                   + (arch.total_params - quantized) * unquantized_bytes)
        notes.append(f"{quantized / 1e6:.1f}M linear weights in 4-bit {adapter.quant_type}")
    else:
        weights = arch.total_params * precision.weight
    if full:
        adapter_bytes, trained = 0, arch.total_params * precision.weight
    else:
        adapter_bytes = (lora_params + head_copy) * precision.trainable
        trained = adapter_bytes
    trainable_params = count_trainable_parameters(arch, adapter)
    gradients = trained
    if speed.enabled:  # fp32 moments, plus an fp32 master copy in every ZeRO optimizer and for 16-bit weights
        master = stage >= 1 or precision.weight == 2
        optimizer = (12 if master else 8) * trainable_params
    else:
        optimizer = 2 * trained  # torch AdamW: exp_avg and exp_avg_sq like each (fp32) trained parameter
    largest_trained = arch.largest_param if full else max(
        [adapter.r * max(layer.in_features, layer.out_features) for layer in arch.linears if layer.name in lora]
        + [head_copy])
    step = 4 * trainable_params if speed.enabled else (  # DeepSpeed: the fp32 gradient partition
        trained if device.type == "cuda" else 2 * largest_trained * precision.trainable)  # foreach vs per-tensor
    buffers = 0
    if speed.enabled:
        if stage >= 1:
            optimizer, step = optimizer / world, step / world
        if stage >= 2:
            gradients /= world
        bucket = min(speed.bucket_size, trainable_params)  # a bucket never holds more than there is to reduce
        if stage == 3:
            weights, adapter_bytes = weights / world, adapter_bytes / world
            gathered = max(arch.encoder.params, arch.decoder.params if arch.decoder else 0) * precision.weight
            prefetch = min(speed.bucket_size, arch.total_params)
            buffers += (bucket + prefetch) * precision.weight + gathered  # reduce + prefetch buckets, one block
        elif stage >= 1:  # reduce and all-gather buckets; overlap_comm keeps ~4.5x of them (DeepSpeed docs)
            buffers += 2 * bucket * precision.weight * (4.5 if speed.overlap_comm else 1)
        if speed.offload_optimizer:
            optimizer, step = 0, 0
            if stage in (1, 2):
                gradients = 0  # the gradient partition is copied to the CPU bucket by bucket
        if speed.offload_params:
            weights, adapter_bytes = 0, 0
    elif world > 1:
        buffers += trained  # DDP's gradient buckets (a flat copy of the gradients)
    if precision.autocast:  # 16-bit copies of fp32 weights, saved by the matmuls that use them
        fp32_body = precision.weight == 4 and adapter.method != "qlora"
        fp32_head = precision.weight == 4 or unquantized_bytes == 4 or head_copy > 0  # the trained copy is fp32
        cast = [layer for layer in arch.linears if (fp32_head if arch.in_head(layer.name) else fp32_body)]
        buffers += sum(layer.weight_params for layer in cast) * 2
    if adapter.method == "qlora":  # a 4-bit weight is dequantized to the compute dtype for its matmul
        buffers += max(layer.weight_params for layer in arch.body_linears) * precision.activation
    activations = _activation_bytes(config, arch, precision, device, trains_weights=full, lora=lora)
    overhead = CUDA_OVERHEAD_BYTES if device.type == "cuda" else 0

    evaluation = _evaluation_bytes(config, arch, precision, device)

    accumulating = config.train.grad_accum_steps > 1
    resident = weights + adapter_bytes + optimizer + buffers + overhead
    training = resident + max(activations + (gradients if accumulating else 0), gradients + step)
    formula = ("weights + adapter + optimizer + buffers + overhead + max(activations"
               + (" + gradients" if accumulating else "") + ", gradients + optimizer step, evaluation)")
    method = adapter.method if full else f"{adapter.method} r={adapter.r}"
    if speed.enabled:
        zero = f"ZeRO-{stage}" + (" + offload" if speed.offload_optimizer or speed.offload_params else "")
    else:
        zero = "DDP" if world > 1 else "no data parallelism"
    description = (f"{config.model.name_or_path} ({arch.total_params / 1e6:.1f}M params, {method}, "
                   f"{trainable_params / 1e6:.2f}M trained) on {world} x {device.type}, {zero}, "
                   f"batch {config.train.batch_size} x {config.format.max_length} tokens"
                   + (", gradient checkpointing" if config.model.gradient_checkpointing else ""))
    components = {"weights": weights, "adapter": adapter_bytes, "gradients": gradients, "optimizer": optimizer,
                  "optimizer step": step, "activations": activations, "evaluation": evaluation, "buffers": buffers,
                  "overhead": overhead}
    return MemoryPlan({name: int(value) for name, value in components.items()}, int(training),
                      int(resident + evaluation), formula, description, arch.total_params, trainable_params,
                      tuple(notes), arch)


def check_fits(config: Config, world_size: int | None = None) -> MemoryPlan | None:
    """Plan the run and raise if it cannot fit `scaling.accelerator_memory_gb` (less HEADROOM).

    Returns the plan, or None when no accelerator memory is configured (no check).

    Raises:
        MemoryBudgetError: with the plan's table and what to change.
    """
    if config.scaling.accelerator_memory_gb is None:
        return None
    plan = plan_memory(config, world_size)
    limit = config.scaling.accelerator_memory_gb * GIB
    if not plan.fits(limit):
        raise MemoryBudgetError(
            f"planned peak {plan.peak_bytes / GIB:.2f} GiB per worker exceeds {1 - HEADROOM:.0%} of "
            f"scaling.accelerator_memory_gb={config.scaling.accelerator_memory_gb} "
            f"({limit * (1 - HEADROOM) / GIB:.2f} GiB usable):\n{plan.render()}\n"
            "lower train.batch_size or format.max_length, set model.gradient_checkpointing=true, "
            "use adapter.method=lora / qlora, or deepspeed.enabled=true with a higher stage or offload")
    return plan
