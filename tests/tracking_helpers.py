"""A real `mlflow server` for the tests, and readers of what trackers logged (MLflow's client, TensorBoard's own
event reader)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from app.tracking import RUN_DIR_TAG


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store; yields (uri, process)."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-3000:]}")
                time.sleep(0.2)
        yield uri, process
    finally:
        os.killpg(process.pid, signal.SIGCONT)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(3)
        except subprocess.TimeoutExpired:  # the `mlflow server` parent can linger after its uvicorn child ended
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_run(uri: str, experiment: str, run_dir: str):
    client = client_for(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run_dir}'")
    assert len(runs) == 1, [run.info.run_id for run in runs]
    return runs[0]


def logged_steps(uri: str, experiment: str, run_dir: str) -> list[int]:
    """Steps of train/loss in the MLflow run of `run_dir` ([] while it has none)."""
    client = client_for(uri)
    experiment_found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([experiment_found.experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run_dir}'") \
        if experiment_found else []
    return [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] if runs else []


def tensorboard_scalars(folder: str, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(folder)
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(key)]
