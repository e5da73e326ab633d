"""Shared by the model tests: tiny configs, encoded synthetic rows, logits and a few optimizer steps."""

import json

import torch

from app.config import Config, load_config
from app.formatting import build_pair_encoder
from app.modeling import build_model, build_tokenizer, forward_batch
from app.synthetic import generate_pairs

CPU = torch.device("cpu")
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def tiny_config(kind: str, name: str, method: str = "full", **overrides) -> Config:
    """fp32, short rows and a small LoRA rank: every model test runs in about a second on a CPU."""
    return load_config(overrides={"model.kind": kind, "model.name_or_path": name, "adapter.method": method,
                                  "model.dtype": "fp32", "adapter.r": 4, "format.max_length": 96, **overrides})


def build(config: Config, seed: int = 0):
    """(model, tokenizer, encoded rows); the seed fixes the fresh head and the LoRA initialisation."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(config)
    return build_model(config), tokenizer, encoded_rows(tokenizer, config)


def encoded_rows(tokenizer, config: Config, n_rows: int = 6) -> tuple[list[list[int]], list[list[int]]]:
    frame = generate_pairs(n_rows, seed=3)
    texts = [[[turn or "" for turn in json.loads(cell)] for cell in frame[column]]
             for column in ("prompt", "response_a", "response_b")]
    return build_pair_encoder(tokenizer, config).encode_with_segments(*texts)


@torch.no_grad()
def logits_of(model, tokenizer, rows, indices=None) -> torch.Tensor:
    """Eval-mode logits of the encoded rows (all, or `indices`) in one padded batch."""
    model.eval()
    sequences, segments = rows
    indices = range(len(sequences)) if indices is None else indices
    logits, _ = forward_batch(model, [sequences[i] for i in indices], [segments[i] for i in indices],
                              tokenizer.pad_token_id, CPU)
    return logits.float()


def eval_loss(model, tokenizer, rows) -> float:
    return torch.nn.functional.cross_entropy(logits_of(model, tokenizer, rows), LABELS).item()


def train_steps(model, tokenizer, rows, steps: int = 8, lr: float = 2e-3) -> None:
    """A few AdamW steps on the whole (tiny) batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        logits, _ = forward_batch(model, rows[0], rows[1], tokenizer.pad_token_id, CPU)
        torch.nn.functional.cross_entropy(logits.float(), LABELS).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
