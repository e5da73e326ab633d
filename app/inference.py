"""In-process inference from a checkpoint: length-sorted token-budget batches, optional A/B swap TTA."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from app.batching import token_budget_batches
from app.formatting import SWAPPED_LABEL, build_pair_encoder
from app.metrics import combine_views, softmax
from app.modeling import (
    PROMPTING_METHOD,
    autocast,
    autocast_dtype,
    forward_batch,
    load_checkpoint,
    read_checkpoint_meta,
)
from app.retrieval import load_augmenter

if TYPE_CHECKING:
    from app.classical import ClassicalPredictor
    from app.fewshot import PromptPredictor


class Predictor:
    """A checkpoint loaded once, predicting class probabilities for batches of rows."""

    def __init__(self, checkpoint_dir: str, tokens_per_batch: int = 8192, device: str | None = None,
                 num_threads: int | None = None, precision: str = "auto") -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loaded = load_checkpoint(checkpoint_dir, self.device)
        self.model, self.config, self.meta = loaded.model, loaded.config, loaded.meta
        self.encoder = build_pair_encoder(loaded.tokenizer, self.config)  # the training truncation policy and cue
        # retrieval.enabled: the neighbour blocks of new rows, from the index in the checkpoint's retrieval/
        self.augmenter = load_augmenter(checkpoint_dir, loaded.tokenizer, self.config)
        self.pad_id = loaded.tokenizer.pad_token_id
        self.tokens_per_batch = tokens_per_batch
        self.amp_dtype = autocast_dtype(precision, self.device)

    @torch.inference_mode()
    def logits_of(self, sequences: Sequence[Sequence[int]], segments: Sequence[Sequence[int]]) -> np.ndarray:
        """(N, 3) logits of encoded rows, computed longest-first in batches of <= tokens_per_batch tokens."""
        logits = np.zeros((len(sequences), 3), dtype=np.float32)
        for batch in token_budget_batches([len(s) for s in sequences], self.tokens_per_batch):
            with autocast(self.device, self.amp_dtype):
                batch_logits, _ = forward_batch(self.model, [sequences[i] for i in batch],
                                                [segments[i] for i in batch], self.pad_id, self.device)
            logits[batch] = batch_logits.float().cpu().numpy()
        return logits

    def predict_logits(self, prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
                       responses_b: Sequence[Sequence[str]], tta_swap: bool = False,
                       tta_combine: str = "logit") -> np.ndarray:
        """(N, 3) class logits (what out-of-fold files and ensembles store).

        With `tta_swap`, both views merged by `app.metrics.combine_views` (A/B columns of the swapped view put
        back): `tta_combine="logit"` averages their log-probabilities, "prob" their probabilities.
        """
        contexts = None if self.augmenter is None else self.augmenter.contexts(prompts, responses_a, responses_b)
        logits = self.logits_of(*self.encoder.encode_with_segments(prompts, responses_a, responses_b,
                                                                   contexts=contexts))
        if not tta_swap:
            return logits
        swapped = self.logits_of(*self.encoder.encode_with_segments(prompts, responses_a, responses_b, swap=True,
                                                                    contexts=contexts))
        return combine_views(logits, swapped[:, list(SWAPPED_LABEL)], tta_combine)

    def predict(self, prompts: Sequence[Sequence[str]], responses_a: Sequence[Sequence[str]],
                responses_b: Sequence[Sequence[str]], tta_swap: bool = False,
                tta_combine: str = "logit") -> np.ndarray:
        """(N, 3) probabilities of A wins, B wins, tie: softmax of `predict_logits`, so single checkpoints,
        ensemble specs and Serve combine the two TTA views by one rule."""
        return softmax(self.predict_logits(prompts, responses_a, responses_b, tta_swap, tta_combine))


def load_predictor(checkpoint_dir: str, tokens_per_batch: int = 8192, device: str | None = None,
                   num_threads: int | None = None, precision: str = "auto") -> Predictor | ClassicalPredictor | PromptPredictor:
    """The predictor of a checkpoint: `Predictor`, for tfidf_xgb `app.classical.ClassicalPredictor` (which has no
    tokens, device or precision), for a prompting checkpoint `app.fewshot.PromptPredictor`. All answer
    predict_logits / predict alike."""
    meta, config = read_checkpoint_meta(checkpoint_dir)
    if meta.get("method") == PROMPTING_METHOD:
        from app.fewshot import PromptPredictor

        if num_threads:
            torch.set_num_threads(num_threads)
        return PromptPredictor(checkpoint_dir, config, meta, tokens_per_batch, device, precision)
    if config.model.kind == "tfidf_xgb":
        from app.classical import ClassicalPredictor  # xgboost is loaded only where a checkpoint needs it

        return ClassicalPredictor(checkpoint_dir, config, meta, num_threads)
    return Predictor(checkpoint_dir, tokens_per_batch, device, num_threads, precision)
