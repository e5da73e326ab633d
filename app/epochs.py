"""Which rows every optimizer step of an epoch trains on, whatever the number of workers.

An epoch is one seeded permutation of the training rows, cut into optimizer steps of one global batch each:
`micro_per_step` micro-batches of `pairs_per_micro` rows, where `micro_per_step` is `train.grad_accum_steps` x
the run's largest number of workers. Rows are length-grouped inside windows of consecutive steps (sorted by
length, cut into micro-batches, the micro-batches shuffled), so a micro-batch pads little. None of this depends
on the world size: at `world` workers, rank r computes the micro-batches r, r + world, ... of every step and
accumulates `micro_per_step / world` of them. An elastic run that shrinks or grows between two checkpoints goes on
with the very micro-batches the interrupted one would have taken; so does a run resumed at another world size.

The rows past the last full step (fewer than one global batch, different ones every epoch) sit the epoch out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SWAP_STREAM = 1  # the generator of an epoch's A/B swaps: (seed, epoch, SWAP_STREAM), apart from the order's


@dataclass(frozen=True)
class EpochPlan:
    """The global batches of every epoch. `lengths[p]` is the token count of training row p (its `position`)."""

    lengths: np.ndarray
    pairs_per_micro: int
    micro_per_step: int
    group_batches: int  # micro-batches per length-sorted window (`train.length_group_batches`; 1 = no sorting)
    seed: int

    def __post_init__(self) -> None:
        check_enough_rows(self.train_rows, self.pairs_per_micro, self.micro_per_step)

    @property
    def train_rows(self) -> int:
        return len(self.lengths)

    @property
    def rows_per_step(self) -> int:
        return self.pairs_per_micro * self.micro_per_step

    @property
    def steps_per_epoch(self) -> int:
        return self.train_rows // self.rows_per_step

    @property
    def sits_out(self) -> int:
        """Training rows left out of each epoch (the tail of its permutation)."""
        return self.train_rows - self.steps_per_epoch * self.rows_per_step

    def micro_batches(self, epoch: int) -> list[np.ndarray]:
        """The positions of every micro-batch of `epoch`, in training order: step s is micro-batches
        s * micro_per_step ... (s + 1) * micro_per_step - 1."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.train_rows)
        order = order[: self.steps_per_epoch * self.rows_per_step]
        window = self.rows_per_step * max(1, round(self.group_batches / self.micro_per_step))  # whole steps
        batches: list[np.ndarray] = []
        for index, start in enumerate(range(0, len(order), window)):
            rows = order[start:start + window]
            if self.group_batches > 1:
                rows = rows[np.argsort(-self.lengths[rows], kind="stable")]
            cut = [rows[i:i + self.pairs_per_micro] for i in range(0, len(rows), self.pairs_per_micro)]
            batches += [cut[i] for i in np.random.default_rng([self.seed, epoch, 0, index]).permutation(len(cut))]
        return batches

    def swaps(self, epoch: int, swap_prob: float) -> np.ndarray:
        """Per position, whether `epoch` trains the row with A and B swapped (`train.swap_mode=random`)."""
        return np.random.default_rng([self.seed, epoch, SWAP_STREAM]).random(self.train_rows) < swap_prob

    def accumulation(self, world: int) -> int:
        """Micro-batches each of `world` ranks accumulates per optimizer step."""
        return share_of_step(self.micro_per_step, world)

    def share(self, epoch: int, rank: int, world: int, first_step: int = 0) -> list[tuple[int, np.ndarray]]:
        """(step within the epoch, positions) of the micro-batches rank `rank` of `world` computes in `epoch`, from
        step `first_step` on, in order."""
        self.accumulation(world)  # raises when `world` ranks cannot share a step
        batches = self.micro_batches(epoch)
        return [(index // self.micro_per_step, batches[index])
                for index in range(first_step * self.micro_per_step, len(batches))
                if index % self.micro_per_step % world == rank]

    def describe(self) -> dict[str, int]:
        """What a checkpoint's data position means; a resume mid-epoch needs the same (`check_resumable`)."""
        return {"train_rows": self.train_rows, "pairs_per_micro": self.pairs_per_micro,
                "micro_per_step": self.micro_per_step, "seed": self.seed}


def share_of_step(micro_per_step: int, world: int) -> int:
    """Micro-batches each of `world` ranks accumulates in a step of `micro_per_step`."""
    if micro_per_step % world:
        raise ValueError(f"{world} workers cannot share a step of {micro_per_step} micro-batches")
    return micro_per_step // world


def accumulation_steps(grad_accum_steps: int, max_workers: int, world: int) -> int:
    """`train.grad_accum_steps` at `world` workers of a run sized for `max_workers`: the global batch stays
    batch_size x grad_accum_steps x max_workers."""
    return share_of_step(grad_accum_steps * max_workers, world)


def check_enough_rows(train_rows: int, pairs_per_micro: int, micro_per_step: int) -> None:
    """Raises ValueError when `train_rows` do not fill one optimizer step (one global batch)."""
    if train_rows < pairs_per_micro * micro_per_step:
        raise ValueError(f"{train_rows} training rows are fewer than one optimizer step's "
                         f"{pairs_per_micro * micro_per_step} ({micro_per_step} micro-batches of {pairs_per_micro} "
                         "pairs: train.batch_size x train.grad_accum_steps x the most workers); use more rows, a "
                         "smaller batch or fewer workers")


def world_sizes(grad_accum_steps: int, max_workers: int) -> list[int]:
    """The world sizes up to `max_workers` that split the global batch evenly."""
    return [world for world in range(1, max_workers + 1) if grad_accum_steps * max_workers % world == 0]
