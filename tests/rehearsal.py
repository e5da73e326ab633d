"""A rehearsal of the cluster topology on one machine: a head that takes no work, worker nodes that see none of each
other's local files, and S3 for everything that must outlive a node.

- **S3:** moto in server mode on 127.0.0.1, reached through `AWS_ENDPOINT_URL` by pyarrow (and so by Ray Train's
  storage, Ray Data and the project's own readers), as an instance role would be, from every node's environment.
- **Head:** `ray start --head --num-cpus=0 --num-gpus=0` (cluster.yaml's head node type), ports and temporary folder
  of its own, a HOME of its own; the job drivers and Ray Train's controller run here.
- **Worker nodes:** `ray start --address` in a mount namespace of their own (`unshare --mount --propagation
  private`) with a tmpfs over `/tmp` and HOME inside it, so no node can read what another wrote locally. The checkout
  and its venv (not under /tmp) stay visible, as a machine image's would, and so do the read-only caches an image
  holds: DeepSpeed's compiled ops and the project's random models. Each node has ports of its own and runs in a
  session of its own (`setsid`): every process of the node (raylet, agents, workers) keeps that session, so
  `kill_node` kills exactly one node, all of it, and nothing else.
- **Clients** submit with `ray job submit --working-dir .` from a fresh HOME that holds only what the README tells a
  user to put there: the cluster's token in `~/.ray/auth_token`.

Everything is stopped by `Rehearsal.stop()` (a context manager), which leaves no process behind.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fresh_machine import BIN, describe, free_ports, processes_in_sessions, stop_processes, torch_extensions_dir

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "arena"
AWS = {"AWS_ACCESS_KEY_ID": "rehearsal", "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}
NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
HEAD_PORT_FLAGS = (*NODE_PORT_FLAGS, "ray-client-server-port")
WORKER_PORT_RANGE = 400  # worker processes' ports per node, a range of its own (Ray's default range is shared)


@dataclass
class Node:
    """One node of the rehearsal: the `ray start` process whose session holds all of the node's processes."""

    name: str
    process: subprocess.Popen
    log: Path
    cpus: float

    @property
    def session(self) -> int:
        return self.process.pid

    def processes(self) -> list:
        return processes_in_sessions({self.session})

    def pids(self) -> list[int]:
        return sorted(process.pid for process in self.processes())


@dataclass
class Rehearsal:
    """The rehearsal cluster; `start()` brings up S3 and the head, `add_node()` a worker node."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    s3: subprocess.Popen | None = None
    head: Node | None = None
    head_address: str = ""
    dashboard: str = ""
    token: str = ""
    next_worker_port: int = 30000

    # ---- bring-up -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls) -> Rehearsal:
        """A rehearsal whose nodes are stopped however this process ends: normally, on an exception, at exit, or on
        SIGTERM (turned into SystemExit, so that `finally` blocks and fixtures run)."""
        # Short: Ray's socket paths under the head's temporary folder have a length limit.
        rehearsal = cls(Path(tempfile.mkdtemp(prefix="arena-rh-", dir="/tmp")))
        atexit.register(rehearsal.stop)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
        return rehearsal

    def start(self, head_env: dict[str, str] | None = None) -> Rehearsal:
        s3_port, head_port, dashboard_port, *head_ports = free_ports(3 + len(HEAD_PORT_FLAGS))
        self.token = os.urandom(32).hex()
        self.head_address = f"127.0.0.1:{head_port}"
        # Every node's processes name their cluster: a Ray process that looks for "the" cluster (Ray Train's
        # placement-group cleaner does) would otherwise find every Ray on this machine, the test session's too.
        self.env = self._node_env(s3_port) | {"RAY_ADDRESS": self.head_address}
        self._start_s3(s3_port)
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        home = self.root / "head-home"
        self._write_token(home)
        flags = [f"--{flag}={port}" for flag, port in zip(HEAD_PORT_FLAGS, head_ports, strict=True)]
        command = ["ray", "start", "--head", "--block", f"--port={head_port}", "--num-cpus=0", "--num-gpus=0",
                   "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                   f"--temp-dir={self.root / 'head'}", "--object-store-memory=200000000", "--disable-usage-stats",
                   *flags]
        log = self.root / "head.log"
        env = self.env | {"HOME": str(home)} | (head_env or {})
        process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=ROOT)
        self.head = Node("head", process, log, 0)
        self._wait_for_jobs()
        return self

    def _node_env(self, s3_port: int) -> dict[str, str]:
        """What every node's processes see: the S3 endpoint and its credentials (an instance role's part), token
        auth, the venv first on PATH, the image's read-only caches; no RAY_ADDRESS or RAY_AUTH_TOKEN*."""
        from app.tiny import cache_directory

        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("RAY_AUTH_", "AWS_")) and key not in ("RAY_ADDRESS", "PYTEST_CURRENT_TEST")}
        return env | AWS | {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "RAY_AUTH_MODE": "token",
            "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "TORCH_EXTENSIONS_DIR": torch_extensions_dir(), "ARENA_CACHE_DIR": cache_directory(),
            "RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    def _write_token(self, home: Path) -> None:
        (home / ".ray").mkdir(parents=True, exist_ok=True)
        path = home / ".ray" / "auth_token"
        path.write_text(self.token)
        path.chmod(0o600)

    def _start_s3(self, port: int) -> None:
        log = self.root / "s3.log"
        self.s3 = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        client = self.s3_client()
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                return
            except Exception as error:  # noqa: BLE001 - the server is still starting
                if time.monotonic() > deadline or self.s3.poll() is not None:
                    raise RuntimeError(f"moto did not start: {error}\n{log.read_text()[-2000:]}") from error
                time.sleep(0.5)

    def add_node(self, name: str, cpus: float = 2, wait: bool = True) -> Node:
        """A worker node `name` with `cpus` CPUs, in a mount namespace of its own with a private /tmp and HOME."""
        ports = free_ports(len(NODE_PORT_FLAGS))
        low = self.next_worker_port
        self.next_worker_port += WORKER_PORT_RANGE
        flags = [f"--{flag}={port}" for flag, port in zip(NODE_PORT_FLAGS, ports, strict=True)]
        start = ["ray", "start", "--block", f"--address={self.head_address}", f"--num-cpus={cpus}", "--num-gpus=0",
                 "--node-ip-address=127.0.0.1", f"--min-worker-port={low}",
                 f"--max-worker-port={low + WORKER_PORT_RANGE - 1}", "--object-store-memory=300000000",
                 "--disable-usage-stats", *flags]
        home = "/tmp/home"
        script = (f"set -e; mount -t tmpfs -o size=8g tmpfs /tmp; mkdir -p {home}/.ray; (umask 077; "
                  f"printf %s \"$NODE_TOKEN\" >{home}/.ray/auth_token); unset NODE_TOKEN; "
                  f"exec {shlex.join(start)}")
        log = self.root / f"{name}.log"
        env = self.env | {"HOME": home, "NODE_TOKEN": self.token}
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", script],
                                   env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=ROOT)
        node = Node(name, process, log, cpus)
        self.nodes[name] = node
        if wait:
            self.wait_for_cpus(sum(n.cpus for n in self.nodes.values() if n.process.poll() is None))
        return node

    def kill_node(self, name: str) -> dict:
        """SIGKILL every process of node `name` (its raylet, agents and workers), as a reclaimed spot instance
        vanishes; returns what was killed."""
        node = self.nodes.pop(name)
        processes = node.processes()
        pids = sorted(process.pid for process in processes)
        for process in processes:
            try:
                process.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        node.process.wait(timeout=30)
        return {"node": name, "pids": pids, "killed_at": time.time()}

    # ---- clients --------------------------------------------------------------------------------------------
    def client_env(self, home: Path) -> dict[str, str]:
        """A client's environment: a fresh HOME holding only the cluster's token (as the README says), the job
        API's address, token auth on; nothing else of the nodes' (no AWS_* : the client reads no S3 itself)."""
        self._write_token(home)
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("RAY_AUTH_", "AWS_")) and key != "RAY_ADDRESS"}
        return env | {"HOME": str(home), "RAY_ADDRESS": self.dashboard, "RAY_AUTH_MODE": "token",
                      "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}

    def submit(self, entrypoint: str, timeout: float = 600, runtime_env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . -- <entrypoint>` from a fresh client HOME; waits for the job's end."""
        home = Path(tempfile.mkdtemp(prefix="client-", dir=self.root))
        command = ["ray", "job", "submit", "--working-dir", "."]
        if runtime_env:
            command += ["--runtime-env-json", json.dumps(runtime_env)]
        command += ["--", *shlex.split(entrypoint)]
        done = subprocess.run(command, cwd=ROOT, env=self.client_env(home), capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"job failed: {entrypoint}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}")
        return done

    def wait_for_serve(self, base: str, env: dict[str, str], timeout: float = 300) -> None:
        """Wait until the Serve app at `base` answers /readyz 200; on timeout fail with `serve status`."""
        import requests

        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                status = subprocess.run(["serve", "status", "--address", self.dashboard], env=env,
                                        capture_output=True, text=True, timeout=60)
                raise AssertionError(f"the app never became ready:\n{status.stdout[-3000:]}")
            time.sleep(2)

    def submit_async(self, entrypoint: str, log: Path) -> subprocess.Popen:
        """`ray job submit` in the background (for scenarios that act while the job runs); output to `log`."""
        home = Path(tempfile.mkdtemp(prefix="client-", dir=self.root))
        command = ["ray", "job", "submit", "--working-dir", ".", "--", *shlex.split(entrypoint)]
        return subprocess.Popen(command, cwd=ROOT, env=self.client_env(home), stdout=log.open("w"),
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def _wait_for_jobs(self, timeout: float = 120) -> None:
        home = Path(tempfile.mkdtemp(prefix="client-", dir=self.root))
        deadline = time.monotonic() + timeout
        while True:
            probe = subprocess.run(["ray", "job", "list"], env=self.client_env(home), capture_output=True, text=True,
                                   timeout=60, cwd=ROOT)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline or self.head.process.poll() is not None:
                raise RuntimeError(f"the head never took jobs: {probe.stderr[-2000:]}\n"
                                   f"{self.head.log.read_text()[-2000:]}")
            time.sleep(2)

    def wait_for_cpus(self, cpus: float, timeout: float = 120) -> None:
        """Wait until the cluster's alive nodes offer `cpus` CPUs in all (a joined node, or a dead one removed)."""
        deadline = time.monotonic() + timeout
        total = None
        while time.monotonic() < deadline:
            total = self.cluster_cpus()
            if total == cpus:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster has {total} CPUs, expected {cpus}\n"
                           + "\n".join(f"{n.name}: {n.log.read_text()[-1500:]}" for n in self.nodes.values()))

    def cluster_cpus(self) -> float | None:
        home = self.root / "head-home"
        probe = subprocess.run(["ray", "status", f"--address={self.head_address}"], capture_output=True, text=True,
                               env=self.env | {"HOME": str(home)}, timeout=60)
        for line in probe.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == "CPU" and "/" in parts[0]:
                return float(parts[0].split("/")[1])
        return None

    # ---- S3 ---------------------------------------------------------------------------------------------------
    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name=AWS["AWS_DEFAULT_REGION"])

    def upload(self, local: Path, key: str) -> str:
        self.s3_client().upload_file(str(local), BUCKET, key)
        return f"s3://{BUCKET}/{key}"

    def upload_text(self, text: str, key: str) -> str:
        self.s3_client().put_object(Bucket=BUCKET, Key=key, Body=text.encode("utf-8"))
        return f"s3://{BUCKET}/{key}"

    def read(self, uri: str) -> bytes:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return self.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def keys(self, prefix: str) -> list[str]:
        """Every key under `s3://arena/<prefix>`."""
        paginator = self.s3_client().get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix)
                for item in page.get("Contents", [])]

    def pause_s3(self) -> None:
        os.kill(self.s3.pid, signal.SIGSTOP)

    def resume_s3(self) -> None:
        os.kill(self.s3.pid, signal.SIGCONT)

    # ---- tear-down --------------------------------------------------------------------------------------------
    def processes(self) -> list:
        sessions = {node.session for node in self.nodes.values()}
        sessions |= {self.head.session} if self.head else set()
        sessions |= {self.s3.pid} if self.s3 else set()
        return processes_in_sessions(sessions)

    def stop(self) -> list[str]:
        """Stop every node, the head and S3; returns the processes that outlived it (empty when all went). Stopping
        twice is harmless."""
        if not self.root.exists():
            return []
        if self.s3 is not None and self.s3.poll() is None:
            self.resume_s3()
        sessions = {node.session for node in self.nodes.values()} | ({self.head.session} if self.head else set())
        sessions |= {self.s3.pid} if self.s3 else set()
        stop_processes(processes_in_sessions(sessions))
        time.sleep(1)
        left = processes_in_sessions(sessions)
        stop_processes(left)
        for process in [*(n.process for n in self.nodes.values()), *(p.process for p in [self.head] if p), self.s3]:
            if process is not None:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        subprocess.run(["rm", "-rf", str(self.root)], check=False)
        return describe(processes_in_sessions(sessions))

    def __enter__(self) -> Rehearsal:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
