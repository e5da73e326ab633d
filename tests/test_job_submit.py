"""The real path users take: the README's "Submit to an existing cluster" commands, on a machine that never ran Ray.

The commands run as README.md writes them, in a fresh, empty HOME with no RAY_AUTH_TOKEN* (so README and test
cannot drift apart, and a missing set-up step fails here). The test changes only what it must: the head gets
ports and a temporary folder of its own (the test session's Ray may hold the defaults), the client the head's
dashboard port, `make setup` keeps the venv as it is, and the training command is a tiny run instead of the demo
preset.
"""

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from fresh_machine import files_under, fresh_machine_env, head_ports, processes_of, stop_processes

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Submit to an existing cluster"
TINY_RUN = ("--config configs/tiny.yaml run.storage_path={storage} run.name=submitted scaling.num_workers=1 "
            "data.builtin_rows=120 train.max_steps=3")


def readme_commands(heading: str) -> list[str]:
    """The commands of the first bash block under `heading` in README.md: continued lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    assert f"\n{heading}\n" in text, f"README.md has no section {heading!r}"
    block = text.split(f"\n{heading}\n", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in block.replace("\\\n", " ").splitlines())
    return [line for line in lines if line]


def submit_to_own_head(commands: list[str], temp_dir: str, storage: Path) -> tuple[list[str], str]:
    """The README's commands for a head of the test's own: (the set-up commands, the `ray job submit` command)."""
    starts = [index for index, command in enumerate(commands) if command.startswith("ray start --head")]
    submits = [index for index, command in enumerate(commands) if command.startswith("ray job submit")]
    assert len(starts) == 1 and submits == [len(commands) - 1], \
        f"expected one `ray start --head`, then one `ray job submit` last: {commands}"
    port, dashboard, port_flags = head_ports()
    mine = [command.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard}") for command in commands]
    # The venv running the tests is set up (and `make setup` must not reinstall it when pyproject.toml changes).
    mine = [command.replace("make setup", "make -o .venv/.installed setup") for command in mine]
    mine[starts[0]] += (f" --port={port} --dashboard-port={dashboard} {' '.join(port_flags)}"
                        f" --temp-dir={temp_dir}")
    submit = mine.pop()
    assert " -- python -m jobs.train " in submit, f"the README's submission trains no model: {submit}"
    client, _ = submit.split(" -- python -m jobs.train ", 1)
    return mine, f"{client} -- python -m jobs.train {TINY_RUN.format(storage=storage)}"


@pytest.fixture
def readme_head(tmp_path):
    """The README's commands up to the submission, run in a fresh HOME: (the client's environment, the submission)."""
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths have a length limit
    set_up, submit = submit_to_own_head(readme_commands(SECTION), temp_dir, tmp_path / "runs")
    env_file = tmp_path / "client.env"
    script = "set -euo pipefail\n" + "\n".join(set_up) + f"\nenv -0 >{env_file}\n"
    set_up_shell = None
    try:
        # In a session of its own, which the head's processes keep, so that the test can stop them all.
        set_up_shell = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=fresh_machine_env(home), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        _, errors = set_up_shell.communicate(timeout=180)
        assert set_up_shell.returncode == 0, f"the README's set-up failed:\n{script}\n{errors[-3000:]}"
        # The environment the README's exports leave to the commands after them.
        env = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if item)
        deadline = time.monotonic() + 120  # the head's job agent accepts jobs a few seconds after `ray start`
        while True:
            probe = subprocess.run(["ray", "job", "submit", "--no-wait", "--", "true"], env=env, capture_output=True,
                                   text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert "AuthenticationError" not in probe.stderr, f"the head refuses the client: {probe.stderr[-1500:]}"
            assert time.monotonic() < deadline, f"the head never accepted a job: {probe.stderr[-1500:]}"
            time.sleep(2)
        yield env, submit
    finally:
        if set_up_shell is not None:  # the head and all it started; `ray stop` would stop every Ray on the machine
            stop_processes(processes_of(home, {set_up_shell.pid}))
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration
def test_readme_submit_commands_train_on_a_fresh_machine(readme_head, tmp_path):
    env, submit = readme_head
    result = subprocess.run(["bash", "-c", f"set -euo pipefail\n{submit}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, submit + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    summary = json.loads((tmp_path / "runs" / "submitted" / "summary.json").read_text())
    assert Path(summary["best_checkpoint"], "model.safetensors").exists()
    assert summary["best_metrics"]["step"] == 3
    # The README keeps the token where `ray get-auth-token --generate` puts it, and nothing else lands in HOME.
    assert files_under(tmp_path / "home") == [".ray", ".ray/auth_token"]
