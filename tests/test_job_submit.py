"""The real path users take: `ray start --head`, then `ray job submit --working-dir . -- python -m jobs.train`."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: the sockets stay open until all are chosen, so none is handed out twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stop_head(temp_dir: str) -> None:
    """Stop only this head's processes (`ray stop` would also stop the test session's own Ray)."""
    import psutil

    mine = []
    for process in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(process.info["cmdline"] or []):
            mine.append(process)
            process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=5)
    for process in alive:
        process.kill()


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0"}
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    port, dashboard, *ports = free_ports(2 + len(flags))
    # Every port of its own: the test session's Ray already holds the defaults (e.g. the agent's 52365).
    own_ports = [f"--{flag}={number}" for flag, number in zip(flags, ports, strict=True)]
    subprocess.run([BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *own_ports,
                    f"--temp-dir={temp_dir}"], env=env, check=True, capture_output=True, timeout=180)
    env |= {"RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    try:
        deadline = time.monotonic() + 120  # the head's job agent accepts jobs a few seconds after `ray start`
        while True:
            probe = subprocess.run([BIN / "ray", "job", "submit", "--no-wait", "--", "true"], env=env,
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, f"the head never accepted a job: {probe.stderr[-1500:]}"
            time.sleep(2)
        yield env
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_and_writes_a_checkpoint(ray_head, tmp_path):
    storage = tmp_path / "runs"
    command = [BIN / "ray", "job", "submit", "--working-dir", ".", "--", "python", "-m", "jobs.train",
               "--config", "configs/tiny.yaml", f"run.storage_path={storage}", "run.name=submitted",
               "scaling.num_workers=1", "data.builtin_rows=120", "train.max_steps=3"]
    result = subprocess.run(command, cwd=ROOT, env=ray_head, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    summary = json.loads((storage / "submitted" / "summary.json").read_text())
    assert Path(summary["best_checkpoint"], "model.safetensors").exists()
    assert summary["best_metrics"]["step"] == 3
