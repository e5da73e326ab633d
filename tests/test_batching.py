import numpy as np

from app.batching import length_grouped_batches, pad_batch, token_budget_batches
from app.loop import batches_per_epoch


def test_length_grouped_batches_cover_every_row_once_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    batches = length_grouped_batches(lengths, batch_size=16, group_batches=8, rng=rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_padded = sum(len(b) * lengths[b].max() for b in np.array_split(np.arange(1000), len(batches)))
    assert padded < 0.8 * random_padded  # grouping removes most padding
    assert len(batches) == batches_per_epoch(1000, 16, 8)


def test_batch_count_is_the_same_for_equal_row_counts():
    for n in (1, 15, 16, 17, 128, 129, 1000):
        got = len(length_grouped_batches(np.ones(n), 16, 8, np.random.default_rng(n)))
        assert got == batches_per_epoch(n, 16, 8)


def test_token_budget_batches_respect_the_budget():
    lengths = np.array([10, 300, 50, 50, 600, 20, 20, 20])
    batches = token_budget_batches(lengths, tokens_per_batch=200)
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 200
    assert lengths[batches[0][0]] == 600  # longest first


def test_pad_batch_right_pads_with_mask():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
