"""One Ray for the whole session; integration tests share it."""

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# An S3 endpoint for the tests (moto, started by the `s3` fixture on first use). Its address is in the environment
# from the start, so that the session's Ray workers, which copy this process's environment, reach it too.
S3_BUCKET = "arena-test"
for _key, _value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_key] = _value


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from app.cluster import connect

    connect(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """`s3://arena-test/<unique prefix>` on a moto S3 server on 127.0.0.1: a folder URI of the test's own."""
    import uuid

    import boto3
    from moto.server import ThreadedMotoServer

    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=S3_BUCKET)
    yield lambda: f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"
    server.stop()


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
