"""The typed configuration tree: defaults defined once, YAML presets, `section.key=value` overrides.

Every entrypoint (jobs, tuning, tests) builds its config through `load_config` / `apply_overrides`, so a
key means the same thing on the command line, in a preset and in a Tune search space.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.tracking import TrackingConfig

PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the training rows come from and how they are validated and split."""

    train_path: str | None = Field(None, description="Kaggle train.csv/.parquet (local or URI); None = built-in data")
    builtin_rows: int = Field(2000, ge=50, description="rows of the built-in synthetic set when train_path is None")
    max_rows: int | None = Field(None, ge=10, description="use only the first N rows (quick runs)")
    n_folds: int = Field(5, ge=2)
    valid_fold: int = Field(0, ge=0)
    split_seed: int | None = Field(
        None, description="seed of the fold assignment; None = the run's seed. Fix it to compare (or average) runs "
                          "of different seeds on the same validation rows")
    on_bad_rows: Literal["error", "skip"] = "error"
    rejects_path: str | None = Field(None, description="skip mode: where rejected rows go; default <run dir>/rejects.jsonl")

    @model_validator(mode="after")
    def _fold_in_range(self) -> DataConfig:
        if self.valid_fold >= self.n_folds:
            raise ValueError(f"data.valid_fold={self.valid_fold} must be < data.n_folds={self.n_folds}")
        return self


class FormatConfig(_Section):
    """How a row becomes one token sequence (see app/formatting.py for the truncation policy)."""

    max_length: int = Field(256, ge=32, description="tokens per row: specials, answer cue (if any), prompt, A and B")
    head_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of a cut text's tokens kept from its head")
    min_turn_tokens: int = Field(32, ge=0, description="an older turn is kept cut only if this many tokens remain for it")
    answer_cue: str = Field("\n\nWhich response is better: A, B or tie? Answer:",
                            description="model kinds decoder, decoder_lm and t5 end every input with this text")


class ModelConfig(_Section):
    """Which pretrained weights to finetune, and how the three class logits come out of them.

    kind:
      encoder      AutoModelForSequenceClassification on an encoder (BERT, DeBERTa); [CLS] pooling.
      decoder      AutoModelForSequenceClassification on a decoder-only LM (Llama, Mistral, Gemma-2, Qwen2):
                   a head on the last non-pad token.
      decoder_lm   a causal LM scored on its next token after the answer cue: the class logits are the
                   logits of the three `label_words` tokens (cross-entropy over those three), or with
                   `lm_loss=vocab` instruction tuning: the LM's cross-entropy over its whole vocabulary on
                   the verdict token (predictions renormalise the three label-word probabilities).
      t5           an encoder-decoder (T5, FLAN-T5): each label word's sequence log-probability from the
                   decoder, constrained to the label set.
      tfidf_xgb    no network: TF-IDF and counted features of the texts, a 3-class XGBoost model on them
                   (settings in the `classical` section; app/features.py, app/classical.py).
    name_or_path: a local folder, a hub id, the packaged MiniLM, or `random:<spec>` (a random-weight model
    built offline from a named config, see app/tiny.py; for tests and benchmarks).
    """

    kind: Literal["encoder", "decoder", "decoder_lm", "t5", "tfidf_xgb"] = "encoder"
    name_or_path: str = Field(PACKAGED_MINILM, description="local folder, hub id, packaged MiniLM or random:<spec>")
    classifier_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="weights dtype at load; auto = bf16 on GPUs that have it, else fp32")
    label_words: tuple[str, str, str] = Field(
        (" A", " B", " tie"), description="decoder_lm (one token each) / t5: the words that name A wins, B wins, tie")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (non-reentrant): less memory, ~30% more time")
    attn_implementation: str | None = Field(None, description="sdpa, eager, flash_attention_2; None = library default")
    lm_loss: Literal["labels", "vocab"] = Field(
        "labels", description="decoder_lm: labels = softmax over the three label tokens; vocab = instruction tuning, "
                              "the LM's cross-entropy over the full vocabulary on the verdict token")

    @model_validator(mode="after")
    def _vocab_loss_needs_decoder_lm(self) -> ModelConfig:
        if self.lm_loss == "vocab" and self.kind != "decoder_lm":
            raise ValueError(f"model.lm_loss=vocab trains a causal LM to generate the verdict word, so it needs "
                             f"model.kind=decoder_lm (got {self.kind}); set model.lm_loss=labels")
        return self


class AdapterConfig(_Section):
    """What of the model is trained: all weights, LoRA adapters, or LoRA on a 4-bit quantized base (QLoRA)."""

    method: Literal["full", "lora", "qlora"] = "full"
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or module names, e.g. [q_proj, v_proj]")
    train_head: bool = Field(
        True, description="kinds encoder / decoder: train the new classification head fully, saved beside the "
                          "adapter (lora / qlora require it: a random head could not be restored); "
                          "decoder_lm and t5 have none")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="4-bit matmul dtype; auto = model dtype")
    load_in_8bit_for_inference: bool = Field(
        False, description="prediction loads the base (or full weights) in 8-bit; else qlora adapters go onto a "
                           "4-bit base quantized as in training, and lora / full load in model.dtype")


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO inside each Ray Train worker; the JSON config is generated from these keys (app/deepspeed.py)."""

    enabled: bool = False
    stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 none, 1 optimizer, 2 + gradients, 3 + parameters")
    offload_optimizer: bool = Field(False, description="optimizer states and step on the CPU")
    offload_params: bool = Field(False, description="stage 3 only: parameters live on the CPU")
    overlap_comm: bool = True
    bucket_size: int = Field(50_000_000, ge=1_000_000, description="elements per reduce / all-gather bucket")

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError(f"deepspeed.offload_params needs deepspeed.stage=3, got stage {self.stage}")
        return self


class ClassicalConfig(_Section):
    """model.kind=tfidf_xgb: TF-IDF features of the prompt and both responses (app/features.py) and the XGBoost
    booster trained on them by Ray Train (app/classical.py). Other model kinds ignore this section."""

    word_ngrams: tuple[int, int] = Field((1, 2), description="word n-gram lengths (min, max)")
    char_ngrams: tuple[int, int] = Field((3, 5), description="character n-gram lengths inside word boundaries (min, max)")
    word_max_features: int = Field(3_000, ge=1, description="response word n-grams kept (the most frequent)")
    char_max_features: int = Field(3_000, ge=1, description="response character n-grams kept (the most frequent)")
    prompt_max_features: int = Field(500, ge=1, description="prompt word n-grams kept, and prompt character n-grams")
    min_df: int = Field(2, ge=1, description="an n-gram is kept only if at least this many training texts hold it")
    sublinear_tf: bool = Field(True, description="1 + log(count) in place of raw n-gram counts")
    num_boost_round: int = Field(1000, ge=1, description="boosting rounds at most")
    early_stopping_rounds: int | None = Field(
        50, ge=1, description="stop when the validation log loss has not improved for this many rounds; the "
                              "checkpoint keeps the best round (None = all rounds)")
    learning_rate: float = Field(0.1, gt=0, le=1, description="xgboost eta: shrinkage of each tree")
    max_depth: int = Field(6, ge=1, le=16)
    min_child_weight: float = Field(1.0, ge=0, description="least hessian weight in a leaf")
    subsample: float = Field(0.8, gt=0, le=1, description="share of training rows each tree sees")
    colsample_bytree: float = Field(0.3, gt=0, le=1, description="share of feature columns each tree sees")
    max_bin: int = Field(
        16, ge=2, description="histogram bins per feature: time, memory and the histograms workers exchange grow with it")
    nthread: int | None = Field(None, ge=1, description="xgboost threads per worker; None = scaling.cpus_per_worker")
    report_every_rounds: int = Field(
        25, ge=1, description="report metrics to Ray Train (and Tune) every this many rounds: a report waits for "
                              "the Train controller's poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default)")

    @model_validator(mode="after")
    def _ngram_ranges(self) -> ClassicalConfig:
        for name in ("word_ngrams", "char_ngrams"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"classical.{name} must be [min, max] with 1 <= min <= max; got {[low, high]}")
        return self


class TrainConfig(_Section):
    """The optimisation loop of each Ray Train worker."""

    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (quick runs)")
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch per worker: rows, or with "
                            "swap_mode=symmetric batch_size / 2 pairs in both A/B orders")
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    head_lr_scale: float = Field(10.0, gt=0, description="the new classification head (and pooler) learn this much faster")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cpu_bf16: bool = Field(False, description="precision=auto on a CPU with native bf16 (AMX / AVX512-BF16): train "
                           "under bf16 autocast (DDP only; ~1.4x faster MiniLM steps on the benchmark CPU)")
    swap_prob: float = Field(0.5, ge=0, le=1, description="swap_mode=random: probability of training a row with "
                             "A and B swapped")
    swap_mode: Literal["random", "symmetric"] = Field(
        "random", description="random: each row in one A/B order drawn with swap_prob; symmetric: every "
        "micro-batch holds batch_size / 2 pairs in both orders (an epoch sees each pair twice, so it takes "
        "twice the steps; batch_size must be even)")
    length_group_batches: int = Field(50, ge=1, description="batches per length-sorted buffer (1 = no grouping)")
    eval_batch_size: int = Field(64, ge=1)
    log_every_steps: int = Field(20, ge=1)
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also checkpoint mid-epoch every N optimizer steps (for resume); None = per epoch")

    @model_validator(mode="after")
    def _symmetric_batches_hold_pairs(self) -> TrainConfig:
        if self.swap_mode == "symmetric" and self.batch_size % 2:
            raise ValueError(f"train.swap_mode=symmetric puts each pair in both A/B orders into one micro-batch, so "
                             f"train.batch_size (sequences per micro-batch) must be even; got {self.batch_size}")
        return self


class DistillConfig(_Section):
    """Teacher-student distillation (app/distillation.py): the student also learns the out-of-fold class
    probabilities of a teacher. The loss is alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(label),
    both sides softened by the temperature T; validation stays the plain log loss against the labels."""

    teacher: str | None = Field(
        None, description="an out-of-fold member folder (jobs/cv.py) or an ensemble spec .json (jobs/ensemble.py) "
                          "that scored every training row; None = no distillation")
    temperature: float = Field(2.0, gt=0, description="T: teacher and student logits are divided by it in the KL term")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term; 1 - alpha weighs the hard-label loss")

    @model_validator(mode="after")
    def _teacher_named(self) -> DistillConfig:
        if self.teacher is not None and not self.teacher.strip():
            raise ValueError("distill.teacher is empty: name a member folder or an ensemble .json, or set it to null")
        return self


class ScalingConfig(_Section):
    """Ray Train workers and what each one holds."""

    num_workers: int | tuple[int, int] = Field(
        2, description="training workers: a number, or [min, max] for an elastic run that goes on with as few as min "
                       "while capacity is short and grows back to max (Ray Train's elastic worker group). The global "
                       "batch is train.batch_size x train.grad_accum_steps x max at every size: each worker "
                       "accumulates more micro-batches when there are fewer workers")
    elastic_resize_interval_s: float = Field(
        60.0, ge=0, description="elastic runs: how often a healthy run checks whether more workers fit; it then "
                                "restarts from its latest checkpoint at the larger size")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per worker; None = cpus_per_worker")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type each worker needs, e.g. A100 or H100 (cluster.yaml declares them)")
    accelerator_memory_gb: float | None = Field(
        None, gt=0, description="memory of one worker's accelerator; the planner checks the job fits (None = no check)")


    @model_validator(mode="after")
    def _worker_range(self) -> ScalingConfig:
        low, high = self.worker_range
        if not 1 <= low <= high:
            raise ValueError(f"scaling.num_workers must be a number >= 1 or [min, max] with 1 <= min <= max; got "
                             f"{list(self.num_workers) if isinstance(self.num_workers, tuple) else self.num_workers}")
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; a fixed size n is (n, n)."""
        return self.num_workers if isinstance(self.num_workers, tuple) else (self.num_workers, self.num_workers)

    @property
    def max_workers(self) -> int:
        """The most workers the run trains on: what sizes its global batch, and what plans and benchmarks assume."""
        return self.worker_range[1]

    @property
    def elastic(self) -> bool:
        return self.worker_range[0] != self.worker_range[1]


class RunConfig(_Section):
    """Where results go and how many checkpoints are kept."""

    name: str = Field("arena", min_length=1)
    storage_path: str = Field("runs", description="local folder or URI (s3://...) for checkpoints and results")
    keep_checkpoints: int = Field(2, ge=1, description="best k by validation log loss")
    max_failures: int = Field(0, ge=0, description="worker failures survived by restarting from the last checkpoint")
    resume: bool = Field(True, description="a run whose name already has checkpoints continues from its latest one")
    staging_dir: str | None = Field(
        None, description="local folder on each worker's node where a checkpoint is written before Ray Train uploads "
                          "it to storage_path: the node's fast disk (cluster.yaml mounts instance NVMe at "
                          "/mnt/local_nvme on GPU nodes); None = the system temp folder")
    checkpoint_upload: Literal["auto", "sync", "async"] = Field(
        "auto", description="async: training goes on while a checkpoint uploads (Ray Train's CheckpointUploadMode."
                            "ASYNC; the staged copy is deleted after upload); sync: report waits for the upload; "
                            "auto = async when storage_path is a URI (s3://...), sync for a local or shared folder")

    @property
    def upload(self) -> Literal["sync", "async"]:
        """`checkpoint_upload` resolved: auto = async for URI storage (the upload runs while training goes on, only
        writing the staged copy blocks), sync for a local or shared folder (a copy between local disks)."""
        if self.checkpoint_upload != "auto":
            return self.checkpoint_upload
        return "async" if "://" in self.storage_path else "sync"


class PredictConfig(_Section):
    """Batch prediction."""

    tokens_per_batch: int = Field(8192, ge=64, description="padded tokens per forward pass (length-sorted batches)")
    tta_swap: bool = Field(False, description="average with the A/B-swapped view")
    tta_combine: Literal["logit", "prob"] = Field(
        "logit", description="how the two TTA views merge: logit = mean of log-probabilities (normalised geometric "
        "mean), prob = mean of probabilities")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on GPUs and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32")
    temperature: float | None = Field(
        None, gt=0, description="divide the final log-probabilities by T (>1 softer, <1 sharper); None = the "
        "ensemble spec's (1 for a checkpoint)")
    smoothing: float | None = Field(
        None, ge=0, lt=1, description="(1 - s) * p + s * prior, the prior being predict.priors when given, else the "
        "training class shares; None = the spec's (0 for a checkpoint)")
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    priors: Literal["em", "calibrated_em"] | tuple[float, float, float] | None = Field(
        None, description="re-weight predictions to these class shares [pA, pB, pTie], or estimate them on the rows "
        "predicted: 'calibrated_em' calibrates first (the calibration a jobs.ensemble spec or jobs.cv checkpoint "
        "stores), ties A and B, and falls back to the unadjusted prediction when the shift is within noise; 'em' "
        "is plain EM (Saerens et al., 2002) on the posteriors as they are; overrides an ensemble spec's priors")
    train_priors: tuple[float, float, float] | None = Field(
        None, description="class shares the model was trained on; default: the checkpoint's (arena.json) or spec's")
    em_max_iter: int | None = Field(None, ge=1, description="EM iterations at most (calibrated_em falls back if it "
                                    "stops unconverged); None = the spec's (1000)")
    em_tol: float | None = Field(None, gt=0, description="EM has converged when no prior moves by this much; "
                                 "None = the spec's (1e-6)")
    em_tie_ab: bool | None = Field(None, description="calibrated_em keeps the A and B priors equal; None = the "
                                   "spec's (true)")
    em_safeguard_resamples: int | None = Field(
        None, ge=0, description="calibrated_em: bootstrap resamples of the rows that decide whether the shift is "
        "more than noise (0 = always keep it); None = the spec's (200)")
    em_safeguard_alpha: float | None = Field(
        None, gt=0, lt=0.5, description="calibrated_em keeps the shift when the alpha-quantile of the bootstrapped "
        "log-likelihood gain is above 0; None = the spec's (0.05)")
    em_min_shift: float | Literal["auto"] | None = Field(
        None, description="calibrated_em leaves the prediction unadjusted when the estimated priors are less than "
        "this far (total variation) from the source's: a number in [0, 1] (0 = any shift), or 'auto' = 2 z x the "
        "error calibration + EM makes on held-out source rows (which the calibration stores), z = 1.64 the normal "
        "quantile at 1 - em_safeguard_alpha; None = the spec's ('auto')")

    @model_validator(mode="after")
    def _min_shift(self) -> PredictConfig:
        if isinstance(self.em_min_shift, float) and not 0 <= self.em_min_shift <= 1:
            raise ValueError(f"em_min_shift must be a total variation distance in [0, 1] or 'auto'; got "
                             f"{self.em_min_shift}")
        return self

    @model_validator(mode="after")
    def _shares(self) -> PredictConfig:
        for name in ("priors", "train_priors"):
            value = getattr(self, name)
            if isinstance(value, tuple) and (min(value) <= 0 or abs(sum(value) - 1) > 1e-6):
                raise ValueError(f"{name} must be three positive class shares (A, B, tie) summing to 1; got {list(value)}")
        return self


class PromptingConfig(_Section):
    """Zero- and few-shot prompting without training (app/prompting.py, app/fewshot.py, jobs/prompt.py): an
    instruction, `k` labelled examples, then the query pair and the answer cue; the model (model.kind
    decoder_lm or t5) scores the three label words. Other jobs ignore this section."""

    k: int = Field(4, ge=0, description="labelled examples in each prompt (0 = zero-shot)")
    selection: Literal["random", "retrieved"] = Field(
        "random", description="random draws from the pool, or the k most similar pairs (cosine of the vectors of "
                              "app/retrieval.py, made with the retrieval section's encoder settings)")
    instruction: str = Field(
        "Two AI assistants answered the same user prompt. Decide which response the user preferred: answer A "
        "if response A is better, B if response B is better, or tie.",
        description="the text the prompt starts with, kept whole")
    example_max_tokens: int = Field(
        256, ge=16, description="tokens of one example (texts, markers, cue and verdict); its texts are cut by the "
                                "format truncation policy")
    query_max_tokens: int | None = Field(
        None, ge=16, description="cut the query's texts to this many tokens, leaving room for examples; None = "
                                 "the query keeps all it can (examples are cut and dropped first)")
    seed: int = Field(0, description="random example draws (the folds follow the top-level seed)")


class RetrievalConfig(_Section):
    """Retrieval-augmented classification (app/retrieval.py): the `k` training pairs most similar to a row, with
    their verdicts, are put in front of it, in training and in prediction (the index travels with the checkpoint).
    A row never retrieves itself or a pair of its own prompt group. Other model kinds than tfidf_xgb take it."""

    enabled: bool = False
    k: int = Field(2, ge=1, le=32, description="neighbours shown per row (fewer when the block's room runs out)")
    embed: Literal["prompt", "pair"] = Field(
        "prompt", description="what is embedded: the prompt only, or also the responses (prompt and A + B "
                              "embedded apart and joined; order-free, so both A/B orders find the same pairs)")
    encoder: str = Field(PACKAGED_MINILM, description="sentence encoder (mean pooling, L2 norm): a local folder, "
                                                      "hub id or the packaged MiniLM")
    embed_max_tokens: int = Field(128, ge=8, le=512, description="encoder tokens per embedded text (the rest is cut)")
    embed_batch_size: int = Field(64, ge=1, description="texts per encoder forward pass")
    max_tokens: int = Field(
        96, ge=16, description="model tokens of the neighbour block (header, neighbours' texts, verdicts); the "
                               "query keeps the rest of format.max_length")
    index: Literal["flat", "hnsw"] = Field(
        "flat", description="faiss index: flat = exact inner-product search, hnsw = approximate (large sets)")


class Config(BaseModel):
    """The whole tree. Sections are frozen; build a new one with `apply_overrides`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 42
    data: DataConfig = DataConfig()
    format: FormatConfig = FormatConfig()
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    predict: PredictConfig = PredictConfig()
    classical: ClassicalConfig = ClassicalConfig()
    prompting: PromptingConfig = PromptingConfig()
    distill: DistillConfig = DistillConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def fold_seed(self) -> int:
        """The seed of the fold assignment: `data.split_seed`, or the run's seed."""
        return self.seed if self.data.split_seed is None else self.data.split_seed

    @model_validator(mode="after")
    def _retrieval_block_fits(self) -> Config:
        if not self.retrieval.enabled:
            return self
        if self.model.kind == "tfidf_xgb":
            raise ValueError("retrieval.enabled=true puts neighbour texts into a network's input; model.kind=tfidf_xgb "
                             "has none: set retrieval.enabled=false or choose another model.kind")
        if self.retrieval.max_tokens > self.format.max_length // 2:
            raise ValueError(f"retrieval.max_tokens={self.retrieval.max_tokens} would take more than half of "
                             f"format.max_length={self.format.max_length}; the query keeps at least half: lower "
                             "retrieval.max_tokens or raise format.max_length")
        return self

    @model_validator(mode="after")
    def _elastic_sizes_split_the_batch(self) -> Config:
        """Every world size of an elastic range must split the global batch (batch_size x grad_accum_steps x max
        workers) into whole micro-batches per worker."""
        from app.epochs import world_sizes

        low, high = self.scaling.worker_range
        if low == high:
            return self
        if self.model.kind == "tfidf_xgb":
            raise ValueError(f"scaling.num_workers=[{low}, {high}]: model.kind=tfidf_xgb trains on a fixed number of "
                             "workers (XGBoost's data-parallel boosting): set one number")
        accum = self.train.grad_accum_steps
        fits = world_sizes(accum, high)
        if missing := [world for world in range(low, high + 1) if world not in fits]:
            need = next(a for a in range(accum, accum * math.lcm(*range(low, high + 1)) + 1, accum)
                        if all((a * high) % world == 0 for world in range(low, high + 1)))
            raise ValueError(
                f"scaling.num_workers=[{low}, {high}] with train.grad_accum_steps={accum}: the global batch of "
                f"{accum * high} micro-batches (grad_accum_steps x max workers) cannot be shared evenly by "
                f"{', '.join(map(str, missing))} workers. World sizes that work: {', '.join(map(str, fits))}; or set "
                f"train.grad_accum_steps={need} (a global batch of {need * high} micro-batches, which every size from "
                f"{low} to {high} splits evenly)")
        return self

    @model_validator(mode="after")
    def _tfidf_xgb_has_no_network(self) -> Config:
        if self.model.kind != "tfidf_xgb":
            return self
        conflicts = [message for wrong, message in (
            (self.adapter.method != "full", f"adapter.method={self.adapter.method} (set full)"),
            (self.deepspeed.enabled, "deepspeed.enabled=true (set false)"),
            (self.scaling.use_gpu, "scaling.use_gpu=true (xgboost-cpu trains on CPUs: set false)"),
            (self.distill.teacher is not None, "distill.teacher (a student is a network: set null)"),
        ) if wrong]
        if conflicts:
            raise ValueError("model.kind=tfidf_xgb trains a TF-IDF + XGBoost model, not a network, so it cannot "
                             "take " + "; ".join(conflicts))
        return self


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what to do."""


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _check_key(dotted: str) -> None:
    known = _known_keys(Config)
    if dotted not in known:
        hint = difflib.get_close_matches(dotted, known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(known)}"
        raise ConfigError(f"unknown config key '{dotted}'{suggestion}")


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is read as YAML (numbers, true/false, null, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """Return a copy of the nested `raw` dict with dotted-key overrides set.

    The one override path: the command line passes `["train.lr=1e-4"]`, Tune and tests pass
    `{"train.lr": 1e-4}`. Unknown keys raise ConfigError with the closest known key.
    """
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    result: dict[str, Any] = yaml.safe_load(yaml.safe_dump(dict(raw))) or {}  # deep copy of plain data
    for dotted, value in pairs:
        _check_key(dotted)
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"'{part}' in '{dotted}' is a value, not a section")
            node = child
        node[leaf] = value
    return result


def validate_config(raw: Mapping[str, Any], source: str = "config") -> Config:
    """Build a Config, turning pydantic's errors into messages that name the dotted key."""
    try:
        return Config.model_validate(dict(raw))
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "(top level)"
            if error["type"] == "extra_forbidden":
                hint = difflib.get_close_matches(key, _known_keys(Config), n=1)
                lines.append(f"  {key}: unknown key" + (f"; did you mean '{hint[0]}'?" if hint else ""))
            else:
                got = f" (got {error.get('input')!r})" if error["loc"] else ""  # top level: the input is the whole tree
                lines.append(f"  {key}: {error['msg']}{got}")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


def load_config(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """Load a YAML preset (or the defaults), apply overrides and validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, encoding="utf-8") as handle:
                raw = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    return validate_config(apply_overrides(raw, overrides), source)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain JSON-able dict: what workers receive and checkpoints store."""
    return config.model_dump(mode="json")


def flatten_keys(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict into dotted keys (used to check presets hold only what differs)."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
