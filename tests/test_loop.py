"""The worker loop: random streams (one model on every rank, dropout masks of each rank's own), the epochs' data
plan at every world size, and the rows each rank reads."""

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


def plan(n_rows: int = 103, pairs: int = 4, micro_per_step: int = 4, group: int = 8, seed: int = 5):
    from app.epochs import EpochPlan

    lengths = np.random.default_rng(0).integers(10, 500, n_rows)
    return EpochPlan(lengths, pairs, micro_per_step, group, seed)


def test_an_epoch_is_whole_global_batches_of_one_permutation():
    epoch_plan = plan()  # 103 rows, steps of 16: 6 steps, 7 rows sit out
    batches = epoch_plan.micro_batches(0)
    assert (epoch_plan.steps_per_epoch, epoch_plan.sits_out, len(batches)) == (6, 7, 24)
    rows = np.concatenate(batches)
    assert len(rows) == len(set(rows)) == 96 and all(len(batch) == 4 for batch in batches)
    assert not np.array_equal(rows, np.concatenate(epoch_plan.micro_batches(1)))  # a new permutation every epoch
    spread = [np.ptp(epoch_plan.lengths[batch]) for batch in batches]
    ungrouped = plan(group=1)
    assert np.mean(spread) < 0.5 * np.mean([np.ptp(ungrouped.lengths[b]) for b in ungrouped.micro_batches(0)])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_world_size_trains_the_same_micro_batches_in_each_step(world):
    """What an elastic run relies on: the ranks of any world size together compute exactly the plan's micro-batches
    of each step, each once, so a resize between two steps changes who computes, not what is trained."""
    epoch_plan = plan()
    batches = epoch_plan.micro_batches(0)
    shares = [epoch_plan.share(0, rank, world) for rank in range(world)]
    assert {len(share) for share in shares} == {6 * epoch_plan.accumulation(world)}
    for step in range(6):
        computed = sorted(tuple(positions) for share in shares for s, positions in share if s == step)
        assert computed == sorted(tuple(batch) for batch in batches[step * 4:(step + 1) * 4])
    resumed = [epoch_plan.share(0, rank, world, first_step=3) for rank in range(world)]
    assert all(s >= 3 for share in resumed for s, _ in share)
    assert sum(len(share) for share in resumed) == 12
    assert np.array_equal(epoch_plan.swaps(0, 0.5), plan().swaps(0, 0.5))  # the A/B swaps: the plan's, too


def test_a_world_size_that_does_not_split_the_step_is_refused():
    with pytest.raises(ValueError, match="3 workers cannot share a step of 4 micro-batches"):
        plan().share(0, 0, 3)
    with pytest.raises(ValueError, match="fewer than one optimizer step's 16"):
        plan(n_rows=15)


def test_an_elastic_range_whose_sizes_do_not_split_the_batch_is_refused_naming_sizes_that_work():
    from app.config import ConfigError, load_config

    config = load_config(None, ["scaling.num_workers=[1, 4]", "train.grad_accum_steps=3"])
    assert config.scaling.worker_range == (1, 4) and config.scaling.max_workers == 4 and config.scaling.elastic
    with pytest.raises(ConfigError, match=r"the global batch of 4 micro-batches .* cannot be shared evenly by 3 workers"
                                          r"\. World sizes that work: 1, 2, 4; or set train.grad_accum_steps=3 "):
        load_config(None, ["scaling.num_workers=[2, 4]"])
    with pytest.raises(ConfigError, match="1 <= min <= max"):
        load_config(None, ["scaling.num_workers=[3, 2]"])
    with pytest.raises(ConfigError, match="tfidf_xgb trains on a fixed number"):
        load_config(None, ["scaling.num_workers=[1, 2]", "model.kind=tfidf_xgb"])


def test_sized_for_keeps_the_global_batch():
    from app.config import load_config
    from app.loop import sized_for

    config = load_config(None, ["scaling.num_workers=[1, 4]", "train.grad_accum_steps=3", "train.batch_size=8"])
    for world, accum in ((1, 12), (2, 6), (3, 4), (4, 3)):
        sized = sized_for(config, world)
        assert (sized.train.grad_accum_steps, sized.scaling.num_workers) == (accum, world)


def test_epoch_rows_come_in_plan_order_whatever_the_block_order():
    from app.loop import epoch_rows

    positions = np.array([7, 0, 22, 13, 5])
    in_order = epoch_rows(ChunkedRows(23, 4, [0, 1, 2, 3, 4, 5]), positions, 0, 0)
    shuffled = epoch_rows(ChunkedRows(23, 4, [5, 2, 0, 4, 1, 3]), positions, 0, 0)
    assert list(in_order["position"]) == list(positions)
    assert list(in_order["row_id"]) == [f"id{p}" for p in positions] == list(shuffled["row_id"])
    assert [len(ids) for ids in in_order["input_ids"]] == [p % 5 + 1 for p in positions]


def test_epoch_rows_refuse_a_training_set_that_changed():
    from app.loop import epoch_rows

    with pytest.raises(RuntimeError, match="found 3 of its 4 training rows"):
        epoch_rows(ChunkedRows(3, 2, [0, 1]), np.arange(4), 0, 0)


def test_row_accounting_names_lost_repeated_and_unknown_rows():
    from app.rowlog import account

    logs = [{"row_ids": ["a", "b", "b"]}, {"row_ids": ["c", "zz"]}]
    assert account(logs, ["a", "b", "c", "d", "e"], sits_out=1) == {
        "ranks": 2, "expected": 5, "trained": 5, "lost": 1, "sat_out": 1, "repeated": 1, "unknown": 1}
