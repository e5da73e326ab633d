"""The worker loop's random streams: one model on every rank, dropout masks of each rank's own."""

import numpy as np
import pytest
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


class ChunkedRows:
    """A stand-in for a worker's DataIterator over the whole training set: the rows in chunks, in a given order of
    chunks (as blocks would arrive from different nodes)."""

    def __init__(self, n_rows: int, chunk: int, chunk_order: list[int]):
        ids = np.empty(n_rows, dtype=object)
        ids[:] = [np.arange(position % 5 + 1) for position in range(n_rows)]  # ragged token rows
        self.columns = {"position": np.arange(n_rows), "row_id": np.array([f"id{p}" for p in range(n_rows)]),
                        "input_ids": ids, "label": np.arange(n_rows) % 3}
        self.starts = [start for start in range(0, n_rows, chunk)]
        self.chunk, self.chunk_order = chunk, chunk_order

    def iter_batches(self, batch_size, batch_format):
        for index in self.chunk_order:
            start = self.starts[index]
            yield {key: value[start:start + self.chunk] for key, value in self.columns.items()}


def test_epoch_shares_deal_every_row_once_whatever_the_block_order():
    from app.loop import EpochShares

    n_rows, world = 23, 3  # 7 rows each, 2 sit the epoch out
    shares = [EpochShares(n_rows, 7, world, rank, seed=5) for rank in range(world)]
    positions = np.concatenate([share.positions(0) for share in shares])
    assert len(positions) == len(set(positions)) == 21
    assert not np.array_equal(shares[0].positions(0), shares[0].positions(1))  # a new permutation every epoch
    in_order = ChunkedRows(n_rows, 4, [0, 1, 2, 3, 4, 5])
    shuffled = ChunkedRows(n_rows, 4, [5, 2, 0, 4, 1, 3])
    for share in shares:
        rows = share.rows(in_order, 0)
        assert list(rows["position"]) == list(share.positions(0))  # in training order
        assert list(rows["row_id"]) == [f"id{p}" for p in share.positions(0)]
        assert [len(ids) for ids in rows["input_ids"]] == [p % 5 + 1 for p in share.positions(0)]
        again = share.rows(shuffled, 0)
        assert list(again["row_id"]) == list(rows["row_id"])


def test_epoch_shares_refuse_a_training_set_that_changed():
    from app.loop import EpochShares

    with pytest.raises(RuntimeError, match="found 3 of its 4 training rows"):
        EpochShares(4, 4, 1, 0, seed=1).rows(ChunkedRows(3, 2, [0, 1]), 0)


def test_row_accounting_names_lost_repeated_and_unknown_rows():
    from app.rowlog import account

    logs = [{"row_ids": ["a", "b", "b"]}, {"row_ids": ["c", "zz"]}]
    assert account(logs, ["a", "b", "c", "d", "e"], sits_out=1) == {
        "ranks": 2, "expected": 5, "trained": 5, "lost": 1, "sat_out": 1, "repeated": 1, "unknown": 1}
