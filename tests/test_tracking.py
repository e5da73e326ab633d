"""app/tracking.py: MFU against hand-computed numbers, and the sinks for real: a local `mlflow server` (SQLite, on
127.0.0.1), TensorBoard event files read back with tensorboard's own EventAccumulator, W&B offline, and trackers
whose MLflow server stops answering."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tracking_helpers import client_for, logged_steps, mlflow_run, mlflow_server, tensorboard_scalars  # noqa: F401

from app.config import load_config
from app.tracking import (BEST_CHECKPOINT_TAG, FAILURE_BUDGET_S, RUN_DIR_TAG, Record, Tracker, TrackingConfig,
                          config_params, mfu, peak_flops, wandb_run_id)

ROOT = Path(__file__).resolve().parents[1]


# ---- MFU and records: no sinks ----

def test_mfu_is_six_n_tokens_over_the_peak():
    # 1e9 parameters x 6 x 1e4 tokens/s = 6e13 FLOP/s of 8 H100s at 989e12 each (7.912e15)
    assert mfu(10**9, 1e4, 8, accelerator="H100") == pytest.approx(6e13 / 7.912e15)
    assert mfu(10**9, 1e4, 8, accelerator="h100") == mfu(10**9, 1e4, 8, peak_flops_per_device=989e12)
    # an A100 (312e12) at 40% MFU trains 0.4 x 312e12 / (6 x 1.3e8) = 160,000 tokens/s of a 130M model
    assert mfu(130_000_000, 160_000, accelerator="A100") == pytest.approx(0.4)
    assert peak_flops("L4") == 121e12 and peak_flops("A10G") == 70e12


def test_mfu_counts_attention_when_the_shape_is_given():
    # CPU fallback: 1000 params, 2 layers, hidden 4, 8 positions: 6 x 1000 + 12 x 2 x 4 x 8 = 6768 FLOPs per token;
    # x 10 tokens/s over 2 devices of 1e5 FLOP/s = 67680 / 2e5
    assert mfu(1000, 10, 2, peak_flops_per_device=1e5, layers=2, hidden=4, seq_len=8) == pytest.approx(0.3384)
    assert mfu(1000, 10, 2, peak_flops_per_device=1e5) == pytest.approx(0.3)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"accelerator": "H100", "peak_flops_per_device": 1e12}, "exactly one"),
    ({"accelerator": "TPUv9"}, "known: \\['A100', 'A10G', 'H100', 'H200', 'L4'\\]"),
    ({"accelerator": "H100", "layers": 2}, "layers, hidden and seq_len"),
])
def test_mfu_rejects_what_it_cannot_compute(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mfu(1000, 10, **kwargs)


def test_a_record_holds_numbers_at_a_step():
    import numpy as np

    record = Record(np.int64(3), {"loss": np.float32(0.5), "rows": 7}, "eval")
    assert record.step == 3 and record.metrics() == {"eval/loss": 0.5, "eval/rows": 7.0}
    with pytest.raises(TypeError, match="'loss'"):
        Record(1, {"loss": "low"})
    with pytest.raises(ValueError, match="kind"):
        Record(1, {}, "test")
    with pytest.raises(ValueError, match=">= 0"):
        Record(-1, {})


def test_params_are_the_resolved_config_in_dotted_keys():
    params = config_params(load_config(overrides=["train.lr=0.001", "model.label_words=[' a',' b',' t']"]))
    assert params["train.lr"] == "0.001" and params["run.name"] == "arena"
    assert params["model.label_words"] == '[" a", " b", " t"]' and params["train.max_steps"] == "null"


def test_importing_tracking_loads_no_tracker():
    code = ("import app.tracking, sys; loaded = [m for m in ('mlflow', 'wandb', 'tensorboardX', 'torch', 'ray') "
            "if m in sys.modules]; assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ---- real sinks ----

@pytest.fixture(autouse=True)
def quiet_trackers(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(key, raising=False)  # the tracker sets them; undone after each test


def attempt(settings: TrackingConfig, run_dir: str, first_step: int, steps: range, offset: float,
            failed: bool = False) -> Tracker:
    """One attempt of a training run: train/loss = offset + step each step, eval/log_loss every third step."""
    with Tracker(settings, run_dir, first_step=first_step, params={"train.lr": "0.001"}) as tracker:
        for step in steps:
            tracker.log(Record(step, {"loss": offset + step, "lr": 0.001}))
            tracker.log(Record(step, {"loss": -1.0}))  # the same key at the same step again: dropped
            if step % 3 == 0:
                tracker.log(Record(step, {"log_loss": offset - step}, "eval"))
        if failed:
            tracker.close(failed=True)
    return tracker


def test_a_resumed_run_continues_its_mlflow_run_and_logs_no_step_twice(mlflow_server, tmp_path):
    uri, _ = mlflow_server
    run_dir = str(tmp_path / "runs" / "resumed")
    # timeout_s=5: a busy CI machine's server may be slow to answer, and a slow answer would disable MLflow
    settings = TrackingConfig(mlflow_uri=uri, mlflow_experiment="resume", run_group="sweep-a", timeout_s=5)
    first = attempt(settings, run_dir, 0, range(1, 7), offset=0.0, failed=True)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert mlflow_run(uri, "resume", run_dir).info.status == "FAILED"
    # the worker group restarts from the checkpoint of step 4: steps 5 and 6 are trained (and logged) again
    second = attempt(settings, run_dir, 5, range(5, 10), offset=100.0)
    folder = str(tmp_path / "runs" / "resumed" / "tracking" / "tensorboard")
    status = second.status()
    assert first.status()["mlflow"]["ok"] and status["mlflow"]["ok"] and status["mlflow"]["reason"] is None
    assert status["tensorboard"] == {"ok": True, "reason": None, "target": folder} and json.dumps(status)

    run = mlflow_run(uri, "resume", run_dir)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.001"}
    assert run.data.tags["arena.run_group"] == "sweep-a" and run.data.tags["arena.version.torch"].startswith("2.")
    client = client_for(uri)
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    # one value per step; the replayed steps 5 and 6 keep the first attempt's (MLflow cannot delete values)
    assert sorted(history) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 6.0), (7, 107.0), (8, 108.0),
                               (9, 109.0)]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/log_loss")) == [3, 6, 9]

    # TensorBoard purged the first attempt's steps >= 5: the new values stand
    assert tensorboard_scalars(folder, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0),
                                                         (6, 106.0), (7, 107.0), (8, 108.0), (9, 109.0)]
    assert [step for step, _ in tensorboard_scalars(folder, "eval/log_loss")] == [3, 6, 9]


def test_the_summary_and_best_checkpoint_reach_mlflow(mlflow_server, tmp_path):
    uri, _ = mlflow_server
    run_dir = str(tmp_path / "summarised")
    summary = {"best_checkpoint": f"{run_dir}/checkpoint_000002", "best_metrics": {"valid_log_loss": 1.02}}
    with Tracker(TrackingConfig(mlflow_uri=uri, timeout_s=5), run_dir, first_step=0) as tracker:
        tracker.log(Record(10, {"log_loss": 1.02}, "eval"))
        tracker.log_summary(summary)
    run = mlflow_run(uri, "arena", run_dir)
    assert run.data.tags[BEST_CHECKPOINT_TAG] == summary["best_checkpoint"]
    downloaded = client_for(uri).download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(downloaded).read_text()) == summary


def wandb_records(path: Path):
    """The records of W&B's transaction log (run-<id>.wandb, LevelDB log format: 32 KiB blocks of chunks with a
    7-byte header, after the file's own 7-byte header), parsed with W&B's protobuf."""
    from wandb.proto.wandb_internal_pb2 import Record as WandbRecord

    data, position, chunk = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        if (room := 32768 - position % 32768) < 7:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if position + 7 + length > len(data):  # a record still being written
            return
        chunk += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = WandbRecord()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def wandb_item(item) -> tuple[str, object]:
    """(key, value) of a W&B summary / history / config item; W&B sends some keys as a one-part nested key."""
    return item.key or ".".join(item.nested_key), json.loads(item.value_json)


def read_wandb_run(log_file: Path) -> tuple[dict, list[dict], dict, set[str]]:
    """Summary, history rows, config and groups of a W&B offline run's log, once its exit record is written
    (run.finish() can return before W&B's service has written the log out)."""
    deadline = time.monotonic() + 30
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(log_file)):
        assert time.monotonic() < deadline, f"{log_file} has no exit record"
        time.sleep(0.1)
    summary, history, config, groups = {}, [], {}, set()
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update(map(wandb_item, record.summary.update))
        elif kind == "history":
            history.append(dict(map(wandb_item, record.history.item)))
        elif kind == "config":
            config.update(map(wandb_item, record.config.update))
        elif kind == "run":
            groups.add(record.run.run_group)
    return summary, history, config, groups


def test_wandb_offline_gets_the_same_records_and_resumes_by_run_id(tmp_path):
    run_dir = str(tmp_path / "wb")
    settings = TrackingConfig(wandb_project="arena-test", run_group="cv-3")
    first = attempt(settings, run_dir, 0, range(1, 4), offset=0.0)
    second = attempt(settings, run_dir, 3, range(3, 5), offset=100.0)
    assert first.status()["wandb"]["ok"] and second.status()["wandb"]["ok"], second.status()
    # one folder per attempt, both of the run's id (W&B adds -1 to a second folder of the same second)
    runs = sorted((tmp_path / "wb" / "tracking" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all((run / f"run-{wandb_run_id(run_dir)}.wandb").is_file() for run in runs), runs

    summary, history, config, groups = read_wandb_run(runs[-1] / f"run-{wandb_run_id(run_dir)}.wandb")
    assert groups == {"cv-3"} and config["train.lr"] == "0.001"
    assert summary["train/loss"] == 104.0 and summary["eval/log_loss"] == 97.0 and summary[RUN_DIR_TAG] == run_dir
    assert [(row["_step"], row["train/loss"]) for row in history] == [(3, 103.0), (4, 104.0)]


@pytest.fixture
def silent_server():
    """A port that accepts connections (the kernel completes them) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def train_with(tracker_settings: TrackingConfig, run_dir: str) -> tuple[Tracker, float]:
    """Everything a training run asks of its tracker; returns it and the seconds those calls took."""
    started = time.monotonic()
    with Tracker(tracker_settings, run_dir, first_step=0) as tracker:
        for step in range(1, 21):
            tracker.log(Record(step, {"loss": 1.0 / step}))
        tracker.log(Record(20, {"log_loss": 1.0}, "eval"))
        tracker.set_tags({"note": "done"})
        tracker.log_summary({"best_checkpoint": "x"})
    return tracker, time.monotonic() - started


@pytest.mark.parametrize("user_timeout", [None, "30"])
def test_a_tracker_that_never_answers_costs_training_at_most_the_budget(silent_server, tmp_path, monkeypatch, caplog,
                                                                        user_timeout):
    import mlflow  # noqa: F401  (importing it takes seconds on a busy machine, server or no server)

    if user_timeout:  # the user's own, longer HTTP timeout is kept; the budget still bounds the wait
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", user_timeout)
    tracker, seconds = train_with(TrackingConfig(mlflow_uri=silent_server), str(tmp_path / "run"))
    assert seconds < (FAILURE_BUDGET_S if user_timeout is None else FAILURE_BUDGET_S + 1), seconds
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == (user_timeout or "2")
    status = tracker.status()
    # with MLflow's 2 s timeout the first request fails; with the user's 30 s, close() stops waiting for it
    reason = "opening the run failed after 2" if user_timeout is None else "close() gave up on it after waiting 5 s"
    assert not status["mlflow"]["ok"] and status["mlflow"]["reason"].startswith(reason), status
    assert status["tensorboard"]["ok"]
    assert len(tensorboard_scalars(str(tmp_path / "run" / "tracking" / "tensorboard"), "train/loss")) == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([text for text in warnings if "mlflow disabled" in text]) == 1, warnings


def test_an_mlflow_server_that_stops_mid_run_is_dropped_once(mlflow_server, tmp_path, caplog, monkeypatch):
    uri, process = mlflow_server
    run_dir = str(tmp_path / "stopped")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")  # opening on a busy machine: no false alarm
    tracker = Tracker(TrackingConfig(mlflow_uri=uri, mlflow_experiment="stopped"), run_dir, first_step=0)
    tracker.log(Record(1, {"loss": 1.0}))
    deadline = time.monotonic() + 60
    while not logged_steps(uri, "stopped", run_dir) and time.monotonic() < deadline:  # the tracker's thread is ahead
        time.sleep(0.1)
    assert tracker.status()["mlflow"]["ok"] and logged_steps(uri, "stopped", run_dir) == [1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # what the tracker sets when the user sets nothing
    os.killpg(process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        for step in range(2, 12):
            tracker.log(Record(step, {"loss": 1.0}))
        tracker.close()
        seconds = time.monotonic() - started
    finally:
        os.killpg(process.pid, signal.SIGCONT)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # reading back: give the woken server time
    assert seconds < FAILURE_BUDGET_S, seconds
    status = tracker.status()
    assert status["mlflow"]["reason"].startswith("logging step 2 failed") and status["tensorboard"]["ok"]
    assert sum("mlflow disabled" in r.getMessage() for r in caplog.records) == 1
    assert logged_steps(uri, "stopped", run_dir) in ([1], [1, 2])  # step 2's request may land once the server wakes


@pytest.mark.integration
def test_a_ray_worker_builds_its_tracker_from_the_plain_config(ray_session, mlflow_server, tmp_path):
    """Rank 0 receives the config as plain data, as app/loop.py's workers do, and builds its tracker itself."""
    uri, _ = mlflow_server
    run_dir = str(tmp_path / "on-ray")
    plain = TrackingConfig(mlflow_uri=uri, mlflow_experiment="ray", timeout_s=5).model_dump(mode="json")

    @ray_session.remote
    def rank_zero(settings: dict, run_dir: str) -> dict:
        with Tracker(TrackingConfig.model_validate(settings), run_dir, first_step=0) as tracker:
            tracker.log(Record(1, {"loss": 0.5}))
        return tracker.status()

    status = ray_session.get(rank_zero.remote(plain, run_dir))
    assert status["mlflow"]["ok"] and status["tensorboard"]["ok"], status
    assert logged_steps(uri, "ray", run_dir) == [1]


def test_runs_of_one_group_nest_under_one_mlflow_parent(mlflow_server, tmp_path):
    """A sweep's trials and a cv member's folds: MLflow's UI nests the runs of a group under one parent run."""
    from app.tracking import GROUP_RUN_TAG, PARENT_RUN_TAG

    uri, _ = mlflow_server
    settings = TrackingConfig(mlflow_uri=uri, mlflow_experiment="grouped", run_group="sweep-7")
    for trial in ("trial-a", "trial-b"):
        attempt(settings, str(tmp_path / trial), 0, range(1, 3), offset=0.0)
    client = client_for(uri)
    experiment = client.get_experiment_by_name("grouped").experiment_id
    parents = client.search_runs([experiment], f"tags.`{GROUP_RUN_TAG}` = 'sweep-7'")
    assert len(parents) == 1 and parents[0].info.run_name == "sweep-7"
    for trial in ("trial-a", "trial-b"):
        assert mlflow_run(uri, "grouped", str(tmp_path / trial)).data.tags[PARENT_RUN_TAG] == parents[0].info.run_id


# ---- a real training run: 2 Ray Train workers, every tracker at once ----

TINY = ROOT / "configs" / "tiny.yaml"
STEP_KEYS = {"loss", "lr", "grad_norm", "real_tokens_per_s", "padded_tokens_per_s", "rows_per_s", "step_time_s",
             "real_token_share", "host_rss_gib", "host_peak_rss_gib", "mfu"}


@pytest.mark.integration
def test_a_two_worker_run_logs_every_step_to_every_tracker(ray_session, mlflow_server, tmp_path):
    from app.training import fit

    uri, _ = mlflow_server
    config = load_config(TINY, {"run.storage_path": str(tmp_path), "run.name": "watched", "data.builtin_rows": 120,
                                "format.max_length": 64, "train.epochs": 2, "train.log_every_steps": 1,
                                "tracking.mlflow_uri": uri, "tracking.mlflow_experiment": "loop",
                                "tracking.wandb_project": "arena-test", "tracking.peak_tflops_per_device": 0.5})
    result = fit(config)
    steps = list(range(1, int(result.history[-1]["step"]) + 1))
    epoch_ends = [int(row["step"]) for row in result.history]
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    assert all(sink["ok"] for sink in summary["tracking"].values()) and set(summary["tracking"]) == {
        "tensorboard", "mlflow", "wandb"}, summary["tracking"]

    run = mlflow_run(uri, "loop", result.run_dir)
    client = client_for(uri)
    assert {key.split("/", 1)[1] for key in run.data.metrics if key.startswith("train/")} >= STEP_KEYS
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [point.step for point in losses] == steps and all(0 < point.value < 3 for point in losses)
    assert all(0 < point.value < 1 for point in client.get_metric_history(run.info.run_id, "train/mfu"))
    evals = client.get_metric_history(run.info.run_id, "eval/log_loss")
    assert [(point.step, point.value) for point in evals] == [
        (step, pytest.approx(row["valid_log_loss"])) for step, row in zip(epoch_ends, result.history)]
    assert {"eval/accuracy", "eval/ece"} <= set(run.data.metrics)
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.0001"
    assert run.data.params["tracking.mlflow_uri"] == uri and run.data.params["data.builtin_rows"] == "120"
    assert run.data.tags[BEST_CHECKPOINT_TAG] == result.best_checkpoint and "arena.version.torch" in run.data.tags
    downloaded = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "artifact"))
    assert json.loads(Path(downloaded).read_text())["best_checkpoint"] == result.best_checkpoint

    # TensorBoard's reader and W&B's log hold the same points
    events = str(Path(result.run_dir) / "tracking" / "tensorboard")
    assert tensorboard_scalars(events, "train/loss") == [(p.step, pytest.approx(p.value)) for p in losses]
    assert [step for step, _ in tensorboard_scalars(events, "eval/ece")] == epoch_ends
    wandb_logs = list((Path(result.run_dir) / "tracking" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_logs) == 1, wandb_logs
    wandb_summary, history, wandb_config, _ = read_wandb_run(wandb_logs[0])
    assert [row["_step"] for row in history if "train/loss" in row] == steps
    assert {f"train/{key}" for key in STEP_KEYS} | {"eval/log_loss"} <= set(wandb_summary)
    assert wandb_config["train.lr"] == "0.0001"
