"""The worker loop's random streams: one model on every rank, dropout masks of each rank's own."""

import torch

from app.loop import seed_everything, seed_rank


def dropout_mask(size: int = 4096) -> torch.Tensor:
    return torch.nn.functional.dropout(torch.ones(size), p=0.5, training=True) > 0


def test_each_rank_draws_its_own_dropout_masks_and_the_same_ones_again():
    masks = {}
    for rank in (0, 1, 2):
        seed_rank(42, rank)
        masks[rank] = dropout_mask()
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    seed_rank(42, 1)
    assert torch.equal(dropout_mask(), masks[1])  # reproducible per (seed, rank)
    seed_rank(43, 1)
    assert not torch.equal(dropout_mask(), masks[1])


def test_the_model_is_built_from_the_shared_seed_before_ranks_diverge():
    weights = []
    for rank in (0, 1):
        seed_everything(42)  # what train_loop_per_worker does before build_model
        weights.append(torch.nn.Linear(16, 16).weight.detach().clone())
        seed_rank(42, rank)
    torch.testing.assert_close(weights[0], weights[1])
