"""Which rows each rank trained on, per epoch: written by every rank at the end of each epoch, read back to account
for the data across interruptions (each training row seen exactly once per epoch: none lost, none repeated).

A rank's log is its share of the epoch as the model saw it: the rows of the micro-batches that reached the weights
the run went on from. Rows computed after the last checkpoint by a worker group that then failed are not in it,
since a restart rolls the weights back to that checkpoint and replays from there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from app import storage

FOLDER = "rows"


def path(run_dir: str, epoch: int, rank: int) -> str:
    return storage.join(run_dir, FOLDER, f"epoch_{epoch:03d}_rank{rank:03d}.json")


def write(run_dir: str, epoch: int, rank: int, world: int, row_ids: list[str], **details: Any) -> None:
    storage.write_json(path(run_dir, epoch, rank),
                       {"epoch": epoch, "rank": rank, "world": world, "rows": len(row_ids), **details,
                        "row_ids": row_ids})


def prune(run_dir: str, epoch: int, world: int) -> None:
    """Delete `epoch`'s logs of ranks `world` and above: an elastic run that ends an epoch at fewer workers than an
    earlier attempt of the same epoch had leaves their logs behind, and the rows in them were trained again (their
    steps were past the checkpoint the run went on from)."""
    prefix = f"epoch_{epoch:03d}_rank"
    for name in storage.list_dir(storage.join(run_dir, FOLDER)):
        if name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) >= world:
            storage.delete_file(storage.join(run_dir, FOLDER, name))


def read(run_dir: str, epoch: int) -> list[dict[str, Any]]:
    """Every rank's log of `epoch`, by rank."""
    prefix = f"epoch_{epoch:03d}_rank"
    names = [name for name in storage.list_dir(storage.join(run_dir, FOLDER)) if name.startswith(prefix)]
    return [storage.read_json(storage.join(run_dir, FOLDER, name)) for name in names]


def account(logs: list[dict[str, Any]], expected: Iterable[str], sits_out: int = 0) -> dict[str, Any]:
    """How an epoch's logs cover the `expected` training rows: `lost` (expected, trained by no rank), `repeated`
    (trained more than once, counting each extra time), `unknown` (trained, not expected). `sits_out` rows of each
    epoch are left out by design (rows beyond an equal share per rank); `lost` counts only those beyond them."""
    expected = list(expected)
    seen = Counter(row for log in logs for row in log["row_ids"])
    missing = [row for row in expected if row not in seen]
    return {"ranks": len(logs), "expected": len(expected), "trained": sum(seen.values()),
            "lost": max(0, len(missing) - sits_out), "sat_out": min(len(missing), sits_out),
            "repeated": sum(count - 1 for count in seen.values() if count > 1),
            "unknown": len(set(seen) - set(expected))}
