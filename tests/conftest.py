"""One Ray for the whole session; integration tests share it."""

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from app.cluster import connect

    connect(num_cpus=4)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def single_rank_group(monkeypatch):
    """A world of one on gloo, as Ray Train sets it up on a CPU worker; call the fixture's value to start it."""
    import torch

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                       "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)

    def start():
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)

    yield start
    if torch.distributed.is_initialized():  # a failed test must not leave a group to the next one
        torch.distributed.destroy_process_group()
