"""Zero- and few-shot runs: no training, a pretrained causal LM or T5 scores the label words of prompts.

    member = prompt_cv(config)                      # every training row, examples from the other folds
    result = prompt_file(config, "holdout.csv")     # a labelled file, examples from the training rows

The prompts are built by app/prompting.py (`prompting.*` settings) and scored by the model wrappers of
app/families.py (`model.kind` decoder_lm: the next-token logits of the label words after the cue; t5: the
label words' sequence log-probabilities), so a prompt is scored exactly as a finetuned checkpoint of that
kind scores a row. A query row never sees itself, nor any row of its own cross-validation fold (prompt_cv)
or with the same prompt (prompt_file), as an example. `prompting.selection=retrieved` ranks the pool by the
cosine similarity of the vectors app/retrieval.py makes (`embed_rows`, with the `retrieval` section's encoder
settings: retrieval.encoder, retrieval.embed, retrieval.embed_max_tokens; retrieval.enabled need not be set).

`prompt_cv` writes an out-of-fold member folder in the app/crossval.py format (member.json, oof.parquet),
so calibration, ensembles and comparisons read it beside trained members, and one prompting checkpoint per
fold (`<member>/fold<k>/`): arena.json with `"method": "prompting"` and the config, and under `prompting/`
the fold's example pool (the other folds' labelled rows, with their embeddings when examples are retrieved).
`app.inference.load_predictor` gives a `PromptPredictor` for such a folder, so a prompting member goes into
ensemble specs, jobs/predict.py and the Serve app like a trained one; the pretrained weights are loaded from
`model.name_or_path` as the run did.

Scoring runs in this process on one device (the first GPU, else the CPU): prompting trains nothing, so
there is no Ray Train run to distribute.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from app.adapters import keep_4bit_compute_dtype_on_cpu, quantization_config
from app.batching import token_budget_batches
from app.config import Config, config_to_dict
from app.data import assign_folds, load_pairs, prompt_group_key
from app.families import load_network, wrap_network
from app.formatting import SWAPPED_LABEL
from app.members import LOGIT_COLUMNS, OOF_FORMAT, Member, load_member
from app.metrics import combine_views, score, softmax
from app.modeling import (
    PROMPTING_METHOD,
    autocast,
    autocast_dtype,
    build_tokenizer,
    forward_batch,
    library_versions,
    resolve_model_path,
    write_checkpoint_meta,
)
from app.priors import class_frequencies
from app.prompting import BuiltPrompt, PromptBuilder, TokenTurns, select_examples
from app.retrieval import embed_rows

PROMPT_KINDS = ("decoder_lm", "t5")  # kinds that score label words; encoder / decoder heads are untrained
PROMPT_CHUNK_ROWS = 256  # query rows whose prompts are built (and examples tokenized) together
TEXT_COLUMNS = ("prompt", "response_a", "response_b")
PROMPT_DIR = "prompting"  # a prompting checkpoint's example pool: pool.parquet, and vectors.npy when retrieved


# --- Model and scoring --------------------------------------------------------------------------------------

def check_prompting_kind(config: Config) -> None:
    """Raise ValueError unless `model.kind` scores label words with a pretrained LM head (decoder_lm, t5)."""
    if config.model.kind not in PROMPT_KINDS:
        raise ValueError(f"prompting scores label words, which model.kind={config.model.kind} has none of (its "
                         f"head would be untrained); set model.kind to one of {list(PROMPT_KINDS)}")


def load_scoring_model(config: Config, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The pretrained `model.name_or_path` wrapped to score label words (eval mode), and its tokenizer.

    Loaded as prediction loads a base: 8-bit with `adapter.load_in_8bit_for_inference`, 4-bit NF4 with
    `adapter.method=qlora`, else in `model.dtype`. No adapter is applied. Raises ValueError for a kind
    that has no label-word scores.
    """
    check_prompting_kind(config)
    tokenizer = build_tokenizer(config)
    path = resolve_model_path(config.model.name_or_path)
    quantization = quantization_config(config, path, for_inference=True)
    placement = {"quantization_config": quantization, "device_map": {"": str(device)}} if quantization else {}
    model = wrap_network(load_network(config, path, tokenizer, **placement), config, tokenizer)
    if quantization is None:
        model = model.to(device)
    else:
        keep_4bit_compute_dtype_on_cpu(model)
    return model.eval(), tokenizer


@torch.inference_mode()
def score_prompts(model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device,
                  tokens_per_batch: int, amp_dtype: torch.dtype | None) -> np.ndarray:
    """(N, 3) label-word logits of token-id prompts, longest first in batches of <= tokens_per_batch tokens."""
    logits = np.zeros((len(prompts), 3), dtype=np.float32)
    for batch in token_budget_batches([len(p) for p in prompts], tokens_per_batch):
        sequences = [prompts[i] for i in batch]
        with autocast(device, amp_dtype):
            batch_logits, _ = forward_batch(model, sequences, [[0] * len(s) for s in sequences], pad_id, device)
        logits[batch] = batch_logits.float().cpu().numpy()
    return logits


def _texts(frame: pd.DataFrame, rows: Sequence[int]) -> list[list[list[str]]]:
    return [[list(frame[column].iloc[row]) for row in rows] for column in TEXT_COLUMNS]


def needs_embeddings(config: Config) -> bool:
    return config.prompting.selection == "retrieved" and config.prompting.k > 0


def embed_frame(frame: pd.DataFrame, config: Config) -> np.ndarray:
    """The rows' retrieval vectors (`app.retrieval.embed_rows` with the `retrieval` section's settings)."""
    return embed_rows(*_texts(frame, range(len(frame))), config.retrieval)


def score_queries(config: Config, model: torch.nn.Module, tokenizer: Any, queries: pd.DataFrame,
                  pool: pd.DataFrame, query_groups: Sequence[object], pool_groups: Sequence[object],
                  device: torch.device, query_embeddings: np.ndarray | None = None,
                  pool_embeddings: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) logits of the query rows, each prompted with examples from labelled `pool` rows of another group,
    and (N,) how many examples each prompt kept. With `predict.tta_swap` the logits merge both A/B orders of
    the query (`predict.tta_combine`; the examples stay as they are). Retrieved examples use the given
    embeddings, else the rows are embedded here."""
    prompting = config.prompting
    builder = PromptBuilder(tokenizer, config.format, prompting, config.model.label_words)
    embeddings: dict[str, np.ndarray | None] = {"query_embeddings": None, "pool_embeddings": None}
    if needs_embeddings(config):
        embeddings["query_embeddings"] = embed_frame(queries, config) if query_embeddings is None else query_embeddings
        embeddings["pool_embeddings"] = (pool_embeddings if pool_embeddings is not None
                                         else embeddings["query_embeddings"] if pool is queries  # cross-validation
                                         else embed_frame(pool, config))
    chosen = select_examples(prompting.selection, prompting.k, query_groups, pool_groups, prompting.seed,
                             **embeddings)
    labels = pool["label"].to_numpy()
    amp_dtype = autocast_dtype(config.predict.precision, device)
    logits = np.zeros((len(queries), 3), dtype=np.float64)
    kept = np.zeros(len(queries), dtype=np.int64)
    started = time.perf_counter()
    for start in range(0, len(queries), PROMPT_CHUNK_ROWS):
        rows = range(start, min(start + PROMPT_CHUNK_ROWS, len(queries)))
        needed = sorted({int(index) for row in rows for index in chosen[row]})
        pool_tokens = dict(zip(needed, builder.tokenize(*_texts(pool, needed))))
        query_tokens = builder.tokenize(*_texts(queries, rows))

        def prompts_of(pairs: list[TokenTurns]) -> list[BuiltPrompt]:
            return [builder.build(pair, [(pool_tokens[int(p)], int(labels[p])) for p in chosen[row]])
                    for row, pair in zip(rows, pairs)]

        built = prompts_of(query_tokens)
        scores = score_prompts(model, [b.ids for b in built], tokenizer.pad_token_id, device,
                               config.predict.tokens_per_batch, amp_dtype)
        if config.predict.tta_swap:
            swapped = prompts_of([[(p, b, a) for p, a, b in pair] for pair in query_tokens])
            swapped_scores = score_prompts(model, [b.ids for b in swapped], tokenizer.pad_token_id, device,
                                           config.predict.tokens_per_batch, amp_dtype)
            scores = combine_views(scores, swapped_scores[:, list(SWAPPED_LABEL)], config.predict.tta_combine)
        logits[rows.start:rows.stop] = scores
        kept[rows.start:rows.stop] = [b.n_examples for b in built]
        print(f"prompting: {rows.stop}/{len(queries)} rows, {time.perf_counter() - started:.0f} s", flush=True)
    return logits, kept


# --- Runs ---------------------------------------------------------------------------------------------------

@dataclass
class PromptingResult:
    """Logits of scored rows, how many examples each prompt kept, and the metrics when rows are labelled."""

    ids: pd.Series
    logits: np.ndarray
    examples_kept: np.ndarray
    metrics: dict[str, float]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _training_rows(config: Config) -> tuple[pd.DataFrame, str]:
    from app.training import load_training_rows, run_directory  # Ray's import is paid only by runs

    run_dir = run_directory(config)
    frame, _ = load_training_rows(config, run_dir)
    return frame, run_dir


def prompt_file(config: Config, path: str, device: torch.device | None = None) -> PromptingResult:
    """Score every row of a Kaggle file (labels optional) with examples from the training rows
    (`data.train_path`, or the built-in set); a pool row with the same prompt as the query is never shown."""
    check_prompting_kind(config)
    device = device or default_device()
    pool, _ = _training_rows(config)
    queries = load_pairs(path, require_labels=None).frame
    model, tokenizer = load_scoring_model(config, device)
    group = [prompt_group_key(turns) for turns in queries["prompt"]]
    logits, kept = score_queries(config, model, tokenizer, queries, pool, group,
                                 [prompt_group_key(turns) for turns in pool["prompt"]], device)
    metrics = score(softmax(logits), queries["label"].to_numpy()) if "label" in queries else {}
    return PromptingResult(queries["id"], logits, kept, metrics)


def prompt_cv(config: Config, device: torch.device | None = None, folds: Sequence[int] | None = None) -> Member:
    """Score the training rows of `folds` (default: every row) with examples from the other folds
    (`data.n_folds`, grouped by prompt, as every member's folds are) and write the member folder
    `<run.storage_path>/<run.name>/`, with the scoring seconds per 1,000 rows (model loading included)."""
    check_prompting_kind(config)
    started = time.perf_counter()
    device = device or default_device()
    frame, member_dir = _training_rows(config)
    row_folds = assign_folds([prompt_group_key(turns) for turns in frame["prompt"]], config.data.n_folds, config.fold_seed)
    folds = list(range(config.data.n_folds)) if folds is None else list(folds)
    scored = np.isin(row_folds, folds)
    queries = frame if scored.all() else frame[scored].reset_index(drop=True)
    model, tokenizer = load_scoring_model(config, device)
    vectors = embed_frame(frame, config) if needs_embeddings(config) else None
    logits, kept = score_queries(config, model, tokenizer, queries, frame, row_folds[scored], row_folds, device,
                                 query_embeddings=None if vectors is None else vectors[scored],
                                 pool_embeddings=vectors)
    seconds = time.perf_counter() - started
    labels = queries["label"].to_numpy()
    oof = pd.DataFrame(logits, columns=list(LOGIT_COLUMNS))
    oof.insert(0, "fold", row_folds[scored])
    oof.insert(0, "id", queries["id"].astype(str).to_numpy())
    oof["label"] = labels
    fold_meta = []
    for fold in folds:
        rows = oof["fold"].to_numpy() == fold
        others = row_folds != fold
        checkpoint = save_prompt_checkpoint(os.path.join(member_dir, f"fold{fold}"), config, frame[others],
                                            None if vectors is None else vectors[others])
        fold_meta.append({"fold": fold, "checkpoint": checkpoint, "rows": int(rows.sum()),
                          "mean_examples": float(kept[rows].mean()),
                          **{f"valid_{k}": v for k, v in score(softmax(logits[rows]), labels[rows]).items()}})
    overall = score(softmax(logits), labels)
    meta = {"format": OOF_FORMAT, "member": config.run.name, "method": "prompting", "folds": fold_meta,
            "oof_log_loss": overall["log_loss"], "oof_accuracy": overall["accuracy"],
            "mean_examples": float(kept.mean()), "tta_swap": config.predict.tta_swap, "train_seconds": 0.0,
            "predict_seconds_per_1000_rows": 1000.0 * seconds / len(queries),
            "config": config_to_dict(config), "versions": library_versions()}
    os.makedirs(member_dir, exist_ok=True)
    oof.to_parquet(os.path.join(member_dir, "oof.parquet"), index=False)
    with open(os.path.join(member_dir, "member.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    return load_member(member_dir)


# --- Checkpoints ----------------------------------------------------------------------------------------------

def save_prompt_checkpoint(directory: str, config: Config, pool: pd.DataFrame,
                           vectors: np.ndarray | None = None) -> str:
    """Write a prompting checkpoint: arena.json (`"method": "prompting"`, the config, the pool's class shares as
    `train_priors`) and the example pool (labelled rows, and their retrieval vectors when examples are
    retrieved); zero-shot keeps no pool."""
    shown = pool if config.prompting.k > 0 else pool.iloc[:0]
    os.makedirs(os.path.join(directory, PROMPT_DIR), exist_ok=True)
    table = pd.DataFrame({column: [json.dumps(list(cell)) for cell in shown[column]] for column in TEXT_COLUMNS})
    table["label"] = shown["label"].to_numpy(dtype=np.int64)
    table.to_parquet(os.path.join(directory, PROMPT_DIR, "pool.parquet"), index=False)
    if len(shown) and vectors is not None:
        np.save(os.path.join(directory, PROMPT_DIR, "vectors.npy"), vectors.astype(np.float32))
    shares = class_frequencies(pool["label"].to_numpy(dtype=np.int64)).tolist()  # what predict.smoothing uses
    write_checkpoint_meta(directory, config, {"method": PROMPTING_METHOD, "pool_rows": len(table),
                                              "train_priors": shares})
    return directory


class PromptPredictor:
    """A prompting checkpoint as a predictor: the pretrained model scores the label words of each row's prompt,
    with examples from the checkpoint's pool (none of the row's own prompt group). Answers predict_logits /
    predict like `app.inference.Predictor`."""

    def __init__(self, checkpoint_dir: str, config: Config, meta: dict[str, Any], tokens_per_batch: int | None = None,
                 device: str | None = None, precision: str = "auto") -> None:
        predict = {"tokens_per_batch": tokens_per_batch or config.predict.tokens_per_batch}
        if precision != "auto":
            predict["precision"] = precision
        self.config = config.model_copy(update={"predict": config.predict.model_copy(update=predict)})
        self.meta, self.device = meta, torch.device(device) if device else default_device()
        folder = os.path.join(checkpoint_dir, PROMPT_DIR)
        pool = pd.read_parquet(os.path.join(folder, "pool.parquet"))
        for column in TEXT_COLUMNS:
            pool[column] = [json.loads(cell) for cell in pool[column]]
        if len(pool) != meta.get("pool_rows"):
            raise ValueError(f"{folder}/pool.parquet holds {len(pool)} rows, arena.json says {meta.get('pool_rows')}; "
                             "copy the checkpoint again")
        self.pool, self.pool_groups = pool, [prompt_group_key(turns) for turns in pool["prompt"]]
        vectors = os.path.join(folder, "vectors.npy")
        self.pool_vectors = np.load(vectors) if os.path.exists(vectors) else None
        self.model, self.tokenizer = load_scoring_model(self.config, self.device)

    def predict_logits(self, prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
                       responses_b: Sequence[Sequence[str]], tta_swap: bool = False,
                       tta_combine: str = "logit") -> np.ndarray:
        queries = pd.DataFrame({"prompt": [list(p) for p in prompts], "response_a": [list(a) for a in responses_a],
                                "response_b": [list(b) for b in responses_b]})
        config = self.config.model_copy(update={"predict": self.config.predict.model_copy(
            update={"tta_swap": tta_swap, "tta_combine": tta_combine})})
        groups = [prompt_group_key(turns) for turns in queries["prompt"]]
        logits, _ = score_queries(config, self.model, self.tokenizer, queries, self.pool, groups, self.pool_groups,
                                  self.device, pool_embeddings=self.pool_vectors)
        return logits

    def predict(self, prompts, responses_a, responses_b, tta_swap: bool = False,
                tta_combine: str = "logit") -> np.ndarray:
        return softmax(self.predict_logits(prompts, responses_a, responses_b, tta_swap, tta_combine))
