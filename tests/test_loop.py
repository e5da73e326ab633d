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


def test_a_staging_folder_that_cannot_be_written_fails_at_start_naming_it(tmp_path):
    """A GPU node without its NVMe mounted, where the container's user may not create /mnt/local_nvme, must fail
    before training, not at the first checkpoint hundreds of steps later."""
    import pytest

    from app.config import load_config
    from app.loop import check_staging

    staging = tmp_path / "nvme" / "staging"
    assert check_staging(load_config(None, {"run.staging_dir": str(staging)})) == str(staging)
    assert staging.is_dir()  # created where it can be
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(RuntimeError, match=r"run.staging_dir=.*not-a-folder/staging cannot hold checkpoints"):
        check_staging(load_config(None, {"run.staging_dir": str(blocker / "staging")}))
