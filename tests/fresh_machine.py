"""What the tests that start Ray through its CLI share: the environment of a machine that never ran Ray.

A fresh, empty HOME and no RAY_AUTH_TOKEN* variables, so that a missing set-up step (a token that only exists
because something else created ~/.ray/auth_token) fails here as it would for a new user.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

BIN = Path(sys.executable).parent

# The other ports a head opens: the test session's own Ray may hold their defaults (e.g. the dashboard agent's 52365).
HEAD_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                   "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")


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


def head_ports() -> tuple[int, int, list[str]]:
    """Free ports for a head of its own: (its port, its dashboard's port, `ray start` flags for the other ports)."""
    port, dashboard, *others = free_ports(2 + len(HEAD_PORT_FLAGS))
    return port, dashboard, [f"--{flag}={number}" for flag, number in zip(HEAD_PORT_FLAGS, others, strict=True)]


def torch_extensions_dir() -> str:
    """Where torch (and so DeepSpeed) keeps compiled ops for this process: $TORCH_EXTENSIONS_DIR, else torch's default.

    torch adds the `py311_cpu`-like folder only to its default, so the default is spelled out with it.
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    device = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}"
    return os.path.join(get_default_build_root(), f"{python}_{device}")


def fresh_machine_env(home: Path) -> dict[str, str]:
    """This process's environment as a machine that never ran Ray has it: HOME is `home`, no RAY_AUTH_*.

    RAY_AUTH_MODE goes too (the session's `ray.init()` sets it in this process), and RAY_ADDRESS. The caches a
    real machine keeps between runs are passed explicitly, at the paths this process uses (read before HOME
    changes), so that the suite does not get slower: DeepSpeed's compiled ops (TORCH_EXTENSIONS_DIR) and the
    project's random models (ARENA_CACHE_DIR).
    """
    from app.tiny import cache_directory

    caches = {"TORCH_EXTENSIONS_DIR": torch_extensions_dir(), "ARENA_CACHE_DIR": cache_directory()}
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("RAY_AUTH_") and key != "RAY_ADDRESS"}
    return env | caches | {"HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
                           "RAY_USAGE_STATS_ENABLED": "0"}


def files_under(folder: Path) -> list[str]:
    """Every file and folder under `folder`, relative to it, sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def processes_with_home(home: Path) -> list:
    """Live processes whose environment has HOME=`home` (and that Ray did not rename: see processes_in_sessions)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("HOME") == str(home) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def sessions_of(processes: list) -> set[int]:
    """The session ids of `processes`, other than this process's own session."""
    sessions = set()
    for process in processes:
        try:
            sessions.add(os.getsid(process.pid))
        except OSError:
            continue
    return sessions - {os.getsid(0)}


def processes_in_sessions(sessions: set[int]) -> list:
    """Live processes in one of `sessions`: unlike HOME, a session id survives Ray renaming a worker (which blanks
    what /proc shows of its environment)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in sessions and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):
            continue
    return found


def processes_of(home: Path, sessions: set[int]) -> list:
    """Live processes with HOME=`home` or in one of `sessions`, each once."""
    return list({process.pid: process for process in processes_with_home(home) + processes_in_sessions(sessions)}
                .values())


def values_in_environment(processes: list, key: str) -> set[str]:
    """The values `processes` have for the environment variable `key` (those without it, or gone, give none)."""
    import psutil

    values = set()
    for process in processes:
        try:
            values.add(process.environ()[key])
        except (KeyError, psutil.Error):
            continue
    return values


def describe(processes: list) -> list[str]:
    """Each process's id and command line, for an assertion message."""
    import psutil

    described = []
    for process in processes:
        try:
            described.append(f"{process.pid}: {' '.join(process.cmdline())[:200]}")
        except psutil.Error:
            described.append(f"{process.pid}: (gone)")
    return described


def stop_processes(processes: list) -> None:
    """Terminate `processes`, then kill those still alive after 5 seconds."""
    import psutil

    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        process.kill()
