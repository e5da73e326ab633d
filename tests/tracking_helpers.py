"""A real `mlflow server` for the tests, and readers of what trackers logged (MLflow's client, TensorBoard's own
event reader)."""

import pytest

from app.tracking import RUN_DIR_TAG
from bench import mlflow_server as server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store (bench/mlflow_server.py); yields (uri, process)."""
    uri, process = server.start(tmp_path_factory.mktemp("mlflow"))
    try:
        yield uri, process
    finally:
        server.stop(process)


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
