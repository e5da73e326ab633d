"""The compact rehearsal (tests/rehearsal.py): DDP training across two worker nodes that share no disk, everything on
S3, one node killed mid-epoch and replaced, then prediction from the s3:// checkpoint the run reports.

What the run must show: the job completes on the replacement node from its last s3:// checkpoint; its summary and
best checkpoint are found from URIs alone; each training row is trained exactly once per epoch across the
interruption (the ranks' row logs); prediction's Ray Data actors on the worker nodes fetch the checkpoint themselves.
The full set of scenarios is tests/test_rehearsal_full.py (`make rehearsal`).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pandas as pd
import pytest
from rehearsal import BUCKET, Rehearsal
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app import rowlog
from app.config import load_config
from app.data import load_pairs
from app.synthetic import write_builtin_dataset
from app.training import split_train_valid

pytestmark = pytest.mark.integration

# Two workers of 2 CPUs on nodes of 2 CPUs: one worker per node. Few short rows: what is rehearsed is where files
# live and what survives a node, not learning.
TRAIN = ("python -m jobs.train --config configs/tiny.yaml data.train_path={train} run.storage_path={storage} "
         "run.name={name} scaling.num_workers=2 scaling.cpus_per_worker=2 scaling.torch_threads=1 "
         "format.max_length=64 train.epochs=1 train.checkpoint_every_steps=2 run.keep_checkpoints=1 {extra}")
ROWS = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    rehearsal = Rehearsal.create()
    try:
        rehearsal.start(head_env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})
        rehearsal.add_node("worker-1")
        rehearsal.add_node("worker-2")
        yield rehearsal
    finally:
        left = rehearsal.stop()
        assert not left, f"processes outlived the rehearsal: {left}"


@pytest.fixture(scope="module")
def data(cluster, tmp_path_factory):
    """The built-in rows on S3: (train URI, test URI, the ids of the rows jobs.train trains on)."""
    files = write_builtin_dataset(str(tmp_path_factory.mktemp("data")), n_train=ROWS, n_test=60, seed=0)
    train = cluster.upload(Path(files["train"]), "data/train.csv")
    return train, cluster.upload(Path(files["test"]), "data/test.csv"), training_ids(files["train"])


def training_ids(path: str, **overrides: str) -> list[str]:
    """The ids of the rows jobs.train trains on (the validation fold held out), from the local copy of the data."""
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", overrides)
    train, _ = split_train_valid(load_pairs(path, require_labels=True).frame, config)
    return list(train["id"].astype(str))


def wait_for_checkpoint(cluster: Rehearsal, prefix: str, job, log: Path, timeout: float = 600) -> str:
    """The first mid-epoch checkpoint Ray Train has registered under s3://arena/<prefix>: the one a restart resumes
    from. A checkpoint's files on S3 are not enough: they are complete before the controller has gathered every
    rank's report, and a node lost in between restarts the run from scratch (seen in CI). The controller's
    checkpoint_manager_snapshot.json, written after each registration, is what a restarted run reads."""
    snapshot = f"s3://{BUCKET}/{prefix}checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the job ended before a checkpoint:\n{log.read_text()[-4000:]}"
        if f"{prefix}checkpoint_manager_snapshot.json" in cluster.keys(prefix):
            latest = json.loads(cluster.read(snapshot)).get("latest_checkpoint_result") or {}
            if "_step_" in (name := latest.get("checkpoint_dir_name") or ""):
                return f"{prefix}{name}"
        time.sleep(0.5)
    raise AssertionError(f"no mid-epoch checkpoint registered under {prefix} in {timeout} s")


def test_ddp_across_nodes_survives_a_node_loss_and_predicts_from_s3(cluster, data, tmp_path):
    train, test, train_ids = data
    storage = f"s3://{BUCKET}/runs"
    log = tmp_path / "train.log"
    job = cluster.submit_async(TRAIN.format(train=train, storage=storage, name="compact",
                                            extra="run.max_failures=1 train.log_every_steps=1"), log)
    checkpoint = wait_for_checkpoint(cluster, "runs/compact/", job, log)
    killed = cluster.kill_node("worker-2")
    cluster.add_node("worker-3", wait=False)  # the replacement the autoscaler would start
    assert job.wait(timeout=900) == 0, log.read_text()[-6000:]
    output = log.read_text()
    assert f"resumed at epoch 0 step {int(checkpoint.rsplit('_', 1)[1])}" in output, (killed, output[-4000:])
    cluster.wait_for_cpus(4)

    # Every later step finds what it needs from URIs alone.
    summary = json.loads(cluster.read(f"{storage}/compact/summary.json"))
    best = summary["best_checkpoint"]
    assert best.startswith(f"{storage}/compact/epoch_000"), best
    assert f"BEST_CHECKPOINT={best}" in output
    assert any(row.get("resumed_from_step") for row in summary["history"])

    # The TensorBoard events travelled with the checkpoints (rank 0 may have restarted on the new node, whose disk
    # had none) and reached the run folder on S3 at the end: every step once, read with TensorBoard's own reader.
    assert summary["tracking"]["tensorboard"]["ok"], summary["tracking"]
    events = tmp_path / "tensorboard"
    for key in cluster.keys("runs/compact/tracking/tensorboard/"):
        (events / key.rsplit("/", 1)[1]).parent.mkdir(exist_ok=True)
        (events / key.rsplit("/", 1)[1]).write_bytes(cluster.read(f"s3://{BUCKET}/{key}"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    last_step = int(summary["history"][-1]["step"])
    assert [event.step for event in accumulator.Scalars("train/loss")] == list(range(1, last_step + 1))

    # Each training row once in the epoch, across the interruption, and on two nodes.
    logs = [json.loads(cluster.read(f"s3://{BUCKET}/{key}")) for key in cluster.keys("runs/compact/rows/")
            if key.endswith(".json")]
    accounted = rowlog.account(logs, train_ids, sits_out=len(train_ids) % 2)
    assert accounted | {"lost": 0, "repeated": 0, "unknown": 0, "ranks": 2} == accounted, accounted
    assert len({log["node"] for log in logs}) == 2, "the two ranks ran on one node"

    # Prediction: the actors on the worker nodes read the checkpoint from S3 themselves.
    submission = f"s3://{BUCKET}/predictions/compact.csv"
    cluster.submit(f"python -m jobs.predict --checkpoint {best} --input {test} --output {submission} "
                   "predict.num_actors=2 predict.cpus_per_actor=2")
    predicted = pd.read_csv(io.BytesIO(cluster.read(submission)))
    expected = pd.read_csv(io.BytesIO(cluster.read(test)))
    assert list(predicted["id"]) == list(expected["id"])
    assert predicted[["winner_model_a", "winner_model_b", "winner_tie"]].sum(axis=1).round(6).eq(1).all()
    print(json.dumps({"killed": killed, "checkpoint_before_kill": checkpoint, "rows": accounted}))
