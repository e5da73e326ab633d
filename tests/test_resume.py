"""Resume and fault tolerance on a real local Ray: a killed worker is replaced and training continues from
the last checkpoint; a failed run resubmitted under the same name continues too. Both end with the metrics
of an uninterrupted run."""

import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from tracking_helpers import client_for, mlflow_run, mlflow_server, tensorboard_scalars  # noqa: F401

from app import rowlog
from app.config import ConfigError, load_config
from app.training import fit, load_training_rows, split_train_valid

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
# Few, short rows: what is tested is the bookkeeping of a resumed run, not learning (6 steps an epoch per worker).
SETTINGS = {"train.checkpoint_every_steps": 5, "run.keep_checkpoints": 1, "data.builtin_rows": 120,
            "format.max_length": 64}
TOLERANCE = 1e-3  # on validation log loss: what a resumed run may differ by from an uninterrupted one


def tiny_config(storage: Path, name: str, **overrides):
    return load_config(TINY, {"run.storage_path": str(storage), "run.name": name, **SETTINGS, **overrides})


def train_workers() -> list[psutil.Process]:
    """The training workers of this test session's own Ray (its local Ray runs under this process), never
    those of another Ray on the machine."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def kill_a_worker_after_checkpoint(run_dir: Path, timeout: float = 300) -> None:
    """Wait until Ray has registered a mid-epoch checkpoint of the run, then SIGKILL one training worker."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if snapshot.exists() and "_step_" in snapshot.read_text():
            workers = train_workers()
            if workers:
                workers[-1].send_signal(signal.SIGKILL)
                return
        time.sleep(0.2)
    raise AssertionError(f"no mid-epoch checkpoint appeared in {run_dir} within {timeout} s")


def fit_while_killing(config, run_dir: Path):
    """Run fit in a thread, kill a worker once a checkpoint exists; return fit's result or exception."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fit(config)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    kill_a_worker_after_checkpoint(run_dir)
    thread.join(timeout=900)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    return outcome


def assert_each_row_once_per_epoch(result, config, like=None) -> None:
    """The row logs of every epoch: each training row trained once (none lost, none repeated), and, given the run
    `like` (uninterrupted, same seed), every rank trained the same rows in the same order as it."""
    frame, _ = load_training_rows(config, result.run_dir)
    train, _ = split_train_valid(frame, config)
    world = config.scaling.max_workers
    step_rows = config.train.batch_size * config.train.grad_accum_steps * world  # one global batch (swap_mode random)
    for epoch in range(len(result.history)):
        logs = rowlog.read(result.run_dir, epoch)
        accounted = rowlog.account(logs, train["id"].astype(str), sits_out=len(train) % step_rows)
        assert accounted | {"lost": 0, "repeated": 0, "unknown": 0, "ranks": world} == accounted, accounted
        if like is not None:
            assert [log["row_ids"] for log in logs] == [log["row_ids"] for log in rowlog.read(like.run_dir, epoch)]


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    return fit(tiny_config(storage, "straight"))


def test_a_killed_worker_is_replaced_and_training_continues(uninterrupted, mlflow_server, tmp_path):
    uri, _ = mlflow_server
    config = tiny_config(tmp_path, "killed", **{"run.max_failures": 1, "train.log_every_steps": 1,
                                                 "tracking.mlflow_uri": uri})
    outcome = fit_while_killing(config, tmp_path / "killed")
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    resumed = [row.get("resumed_from_step") for row in result.history]
    assert any(step is not None and step > 0 for step in resumed)  # restarted from a checkpoint, not step 0
    assert result.history[-1]["step"] == uninterrupted.history[-1]["step"]
    assert result.best_metrics["valid_log_loss"] == pytest.approx(uninterrupted.best_metrics["valid_log_loss"],
                                                                  abs=TOLERANCE)
    assert_each_row_once_per_epoch(result, config, like=uninterrupted)
    # the restarted group continued the same tracker runs: every step once in MLflow and in TensorBoard's reading,
    # though the steps between the checkpoint and the kill were trained (and logged) twice
    steps = list(range(1, int(result.history[-1]["step"]) + 1))
    run = mlflow_run(uri, "arena", result.run_dir)
    for key in ("train/loss", "train/grad_norm"):
        assert [point.step for point in client_for(uri).get_metric_history(run.info.run_id, key)] == steps
    assert [step for step, _ in tensorboard_scalars(str(tmp_path / "killed" / "tracking" / "tensorboard"),
                                                     "train/loss")] == steps


def test_a_failed_run_resubmitted_under_its_name_continues(uninterrupted, tmp_path):
    config = tiny_config(tmp_path, "resubmitted")
    outcome = fit_while_killing(config, tmp_path / "resubmitted")
    assert "error" in outcome  # max_failures=0: the run fails
    with pytest.raises(ConfigError, match="run.resume"):
        fit(tiny_config(tmp_path, "resubmitted", **{"run.resume": False}))
    result = fit(config)  # the same command again
    assert result.history[-1].get("resumed_from_step", 0) > 0
    assert [row["epoch"] for row in result.history] == [row["epoch"] for row in uninterrupted.history]
    assert result.best_metrics["valid_log_loss"] == pytest.approx(uninterrupted.best_metrics["valid_log_loss"],
                                                                  abs=TOLERANCE)
    assert_each_row_once_per_epoch(result, config, like=uninterrupted)
