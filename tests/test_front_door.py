"""The front door on a machine that never ran Ray: `make demo` as the first command, then `make serve`, then Ctrl-C.

Both run in a fresh, empty HOME with no RAY_AUTH_TOKEN*, and must leave nothing there and no process behind. The
demo is made tiny (DEMO_OVERRIDES) and gets ports and a runs folder of its own (so it never meets a developer's
demo or the test session's Ray); the recipes are otherwise the ones users run.
"""

import csv
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fresh_machine import (describe, files_under, free_ports, fresh_machine_env, head_ports, processes_of,
                           processes_with_home, sessions_of, stop_processes, values_in_environment)

ROOT = Path(__file__).resolve().parents[1]
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]  # the venv running the tests: no set-up step
TINY_DEMO = "data.builtin_rows=120 train.max_steps=3 scaling.num_workers=1 format.max_length=32"
# Runs a command with SIGINT at its default, as a terminal's Ctrl-C finds it (a shell that starts this test in
# the background leaves SIGINT ignored, and children inherit that).
WITH_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                                     "os.execvp(sys.argv[1], sys.argv[1:])"]


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll `url` until it answers 200; fail with the log's tail if `process` ends or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        assert process.poll() is None, f"`make serve` ended ({process.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{url} never answered 200:\n{log.read_text()[-3000:]}"
        time.sleep(2)


@pytest.mark.integration
def test_make_demo_then_make_serve_on_a_fresh_machine(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    runs = tmp_path / "runs"
    env = fresh_machine_env(home)
    port, dashboard, port_flags = head_ports()
    log = tmp_path / "demo.log"
    with open(log, "w") as output:
        demo = subprocess.Popen([*MAKE, "demo", f"DEMO_RUNS={runs}", f"DEMO_RAY_PORT={port}",
                                 f"DEMO_DASHBOARD_PORT={dashboard}", f"DEMO_RAY_FLAGS={' '.join(port_flags)}",
                                 f"DEMO_OVERRIDES={TINY_DEMO}"], cwd=ROOT, env=env, stdout=output,
                                stderr=subprocess.STDOUT)
    # The head's sessions, learnt while it runs from the processes that show their HOME.
    sessions, deadline = set(), time.monotonic() + 900
    while demo.poll() is None and time.monotonic() < deadline:
        sessions |= sessions_of(processes_with_home(home))
        time.sleep(1)
    left = processes_of(home, sessions)
    stop_processes(left)
    if demo.poll() is None:
        demo.kill()
    assert demo.wait() == 0, log.read_text()[-5000:]
    assert "validation log loss" in log.read_text()
    with open(runs / "demo" / "submission.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows and list(rows[0]) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert not left, f"the demo left processes behind: {describe(left)}"
    assert files_under(home) == [], "the demo wrote into HOME"

    serve_port = free_ports(1)[0]
    log = tmp_path / "serve.log"  # `make serve` gets a session of its own, and its Ray with it
    with open(log, "w") as output:
        serve = subprocess.Popen([*WITH_SIGINT, *MAKE, "serve", f"DEMO_RUNS={runs}", f"SERVE_PORT={serve_port}"],
                                 cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{serve_port}/readyz", serve, log)
        # The serve's Ray found its token in a folder of its own, outside HOME.
        token_paths = values_in_environment(processes_with_home(home), "RAY_AUTH_TOKEN_PATH")
        assert len(token_paths) == 1, token_paths
        token_path = Path(token_paths.pop())
        assert token_path.is_file() and not token_path.is_relative_to(home)
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C in the terminal
        serve.wait(timeout=120)
        deadline = time.monotonic() + 30
        while (left := processes_of(home, {serve.pid})) and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        stop_processes(processes_of(home, {serve.pid}))
    assert not left, f"`make serve` left processes behind after Ctrl-C: {describe(left)}"
    assert not token_path.parent.exists(), "`make serve` left its token folder behind"
    assert files_under(home) == [], "`make serve` wrote into HOME"
