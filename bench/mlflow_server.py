"""A real `mlflow server` (the dev extra's mlflow) on 127.0.0.1 with a SQLite store in a folder of its own: what
bench/tracking_overhead.py logs to, and the MLflow of the tests (tests/tracking_helpers.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.serve_load import free_port


def start(folder: str | Path, timeout_s: float = 120) -> tuple[str, subprocess.Popen]:
    """Start the server with its store and artifacts in `folder` (its output in `folder`/server.log) and wait until
    it answers; returns its URI and process (a session of its own, for `stop`).

    Raises:
        RuntimeError: it exited or did not answer within `timeout_s`, with the end of its log.
    """
    folder = Path(folder)
    port = free_port()
    with open(folder / "server.log", "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            return uri, process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop(process)
                raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    """Stop the server's whole session, a stopped (SIGSTOP) one included."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGCONT)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(3)
    except subprocess.TimeoutExpired:  # the `mlflow server` parent can linger after its uvicorn child ended
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
