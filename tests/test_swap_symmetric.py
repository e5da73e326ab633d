"""A/B swap in training: the micro-batches of a window in random and symmetric mode (pure), and one real Ray
Train run in symmetric mode with gradient accumulation."""

from pathlib import Path

import numpy as np
import pytest

from app.batching import micro_batches, pairs_per_micro_batch, swap_soft_labels
from app.config import ConfigError, load_config
from app.formatting import SWAPPED_LABEL
from app.epochs import EpochPlan
from app.loop import batches_per_epoch
from app.training import fit, load_training_rows, split_train_valid

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PLAIN, SWAPPED = 0, 1  # token 1 of a fake encoding says which order it is


def fake_window(n_rows: int = 37, seed: int = 0, teacher: bool = True) -> dict[str, np.ndarray]:
    """Encoded rows as app.training.EncodeBatch writes them: token 0 is the row, token 1 its A/B order (segments
    too, so they are int32 here)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, n_rows)

    def ragged(order: int, dtype) -> np.ndarray:
        out = np.empty(n_rows, dtype=object)
        out[:] = [np.array([row, order] + [7] * int(lengths[row]), dtype=dtype) for row in range(n_rows)]
        return out

    window = {"input_ids": ragged(PLAIN, np.int32), "input_ids_swapped": ragged(SWAPPED, np.int32),
              "segment_ids": ragged(PLAIN, np.int32), "segment_ids_swapped": ragged(SWAPPED, np.int32),
              "label": rng.integers(0, 3, n_rows).astype(np.int64)}
    if teacher:
        window["teacher_probs"] = rng.dirichlet(np.ones(3), n_rows).astype(np.float32)
    return window


def check_row(window, sequence, segment, label, soft) -> tuple[int, bool]:
    """Assert a trained row's label and soft labels match its A/B order; return (row, swapped)."""
    row, swapped = int(sequence[0]), bool(sequence[1] == SWAPPED)
    assert segment[0] == row and segment[1] == sequence[1]  # segments follow their sequence
    original, probs = window["label"][row], window["teacher_probs"][row]
    assert label == (SWAPPED_LABEL[original] if swapped else original)
    np.testing.assert_array_equal(soft, swap_soft_labels(probs[None])[0] if swapped else probs)
    return row, swapped


def test_symmetric_batches_hold_each_pair_in_both_orders():
    window = fake_window()
    batches = micro_batches(window, batch_size=8, group_batches=3, swap_mode="symmetric", swap_prob=0.5,
                            rng=np.random.default_rng(1))
    assert len(batches) == batches_per_epoch(37, pairs_per_micro_batch(8, "symmetric"), 3)
    plain_rows = []
    for batch in batches:
        half = len(batch.labels) // 2
        assert len(batch.labels) <= 8 and len(batch.labels) == 2 * half == len(batch.sequences)
        trained = [check_row(window, *parts) for parts in
                   zip(batch.sequences, batch.segments, batch.labels, batch.soft_labels)]
        assert [swapped for _, swapped in trained] == [False] * half + [True] * half
        assert [row for row, _ in trained[:half]] == [row for row, _ in trained[half:]]  # the same pairs, swapped
        plain_rows += [row for row, _ in trained[:half]]
    assert sorted(plain_rows) == list(range(37))  # every pair once per epoch, in both orders


def test_random_mode_swaps_rows_with_their_labels_and_soft_labels_as_drawn():
    window = fake_window(n_rows=200)
    batches = micro_batches(window, batch_size=8, group_batches=4, swap_mode="random", swap_prob=0.3,
                            rng=np.random.default_rng(5))
    trained = dict(check_row(window, *parts) for batch in batches for parts in
                   zip(batch.sequences, batch.segments, batch.labels, batch.soft_labels))
    assert sorted(trained) == list(range(200))
    # the first draws of the generator pick the swapped rows: the data order resumed runs replay
    drawn = np.random.default_rng(5).random(200) < 0.3
    assert [trained[row] for row in range(200)] == drawn.tolist()
    assert len(batches) == batches_per_epoch(200, 8, 4)


@pytest.mark.parametrize("swap_mode", ["random", "symmetric"])
def test_a_replayed_window_gives_the_same_batches(swap_mode):
    window = fake_window(teacher=False)
    first, second = (micro_batches(window, 6, 2, swap_mode, 0.5, np.random.default_rng(9)) for _ in range(2))
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.soft_labels is None and b.soft_labels is None  # no teacher, no soft labels


def test_symmetric_mode_needs_an_even_batch_size():
    assert load_config().train.swap_mode == "random"
    assert pairs_per_micro_batch(8, "symmetric") == 4 and pairs_per_micro_batch(8, "random") == 8
    with pytest.raises(ConfigError, match=r"train\.batch_size \(sequences per micro-batch\) must be even; got 7"):
        load_config(None, ["train.swap_mode=symmetric", "train.batch_size=7"])
    with pytest.raises(ConfigError, match=r"train\.swap_mode"):
        load_config(None, ["train.swap_mode=both"])


def test_symmetric_training_with_accumulation_takes_twice_the_micro_batches(ray_session, tmp_path):
    """Each pair in both orders: the same rows give twice the micro-batches of half as many pairs. (A run this
    small does not reliably beat uniform guessing on validation, so only training and its accounting are
    asserted.)"""
    config = load_config(TINY, {"run.storage_path": str(tmp_path), "run.name": "symmetric", "run.keep_checkpoints": 1,
                                "data.builtin_rows": 200, "format.max_length": 64,
                                "train.swap_mode": "symmetric", "train.grad_accum_steps": 2})
    result = fit(config)

    train, valid = split_train_valid(load_training_rows(config, result.run_dir)[0], config)
    micro_per_step = config.train.grad_accum_steps * config.scaling.max_workers
    symmetric, plain = (EpochPlan(np.ones(len(train), int), pairs_per_micro_batch(config.train.batch_size, mode),
                                  micro_per_step, config.train.length_group_batches, config.seed)
                        for mode in ("symmetric", "random"))
    assert symmetric.steps_per_epoch >= 2 * plain.steps_per_epoch  # half the pairs in each micro-batch
    epochs = [row for row in result.history if "train_loss" in row]
    assert [row["step"] for row in epochs] == [symmetric.steps_per_epoch, 2 * symmetric.steps_per_epoch]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["train_real_token_share"] > 0.9  # a pair and its swap are equally long: little padding
    assert result.best_metrics["valid_rows"] == len(valid) and np.isfinite(result.best_metrics["valid_log_loss"])
