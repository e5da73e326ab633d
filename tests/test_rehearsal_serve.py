"""Serve when a node goes (`make rehearsal`; tests/rehearsal.py has the cluster): the Serve app under steady load from
16 clients loses the worker node that holds its member's replica.

The app is serve/config.yaml deployed with `serve deploy` on an s3:// spec whose one member is a tiny Llama checkpoint
(a few optimizer steps, built here) on S3. Changed for the rehearsal: the port, 0.5 CPU per member replica (the
worker nodes have 2 CPUs), `member_timeout_s` (see MEMBER_TIMEOUT_S), and the ingress pinned to the head beside the
proxy, so that the node that goes holds the member's replica and not the ingress. (Where the ingress's node goes too,
the proxy answers 500 to the requests in flight there and holds new ones until the ingress is replaced: Ray's proxy
does not resend a request a replica has accepted. docs/RELIABILITY.md has what that measured.)

What the app must do: answer every request with 200, or 503 with Retry-After and the JSON error body (never another
status, never past the client's timeout), and answer 200 again within 60 s of the kill. What it measured goes to
runs/rehearsal/report.json (`serve_node_loss`).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from fresh_machine import free_ports
from rehearsal import ROOT, Rehearsal
from test_rehearsal import cluster  # noqa: F401 - fixture
from test_rehearsal_full import record

pytestmark = pytest.mark.rehearsal

CLIENTS = 16
# The app's wait for a member (serving.member_timeout_s, 45 s in serve/config.yaml), then 503. The tiny member's
# replacement is up in seconds here (a GPU LLM's takes minutes): a wait shorter than that shows the 503s.
MEMBER_TIMEOUT_S = 3.0
CLIENT_TIMEOUT_S = MEMBER_TIMEOUT_S + 10  # a request the app has not answered by then hung
LOAD_BEFORE_KILL_S = 20
RECOVERY_LIMIT_S = 60  # 200 again within this long after the kill
LOAD_AFTER_RECOVERY_S = 15
PAIR = {"prompt": ["Which is larger, 7 or 9?"], "response_a": ["9 is larger."], "response_b": ["7."]}


@pytest.fixture(scope="module")
def spec(cluster, tmp_path_factory) -> str:
    """An s3:// spec of one member, a tiny Llama (3 optimizer steps) whose checkpoint folder is on S3."""
    from modeling_helpers import build, tiny_config, train_steps

    from app.ensemble import EnsembleMember, EnsembleReport, EnsembleSpec
    from app.modeling import save_checkpoint

    folder = tmp_path_factory.mktemp("serve-node-loss") / "llama"
    config = tiny_config("decoder", "random:llama-tiny")
    network, tokenizer, rows = build(config, seed=1)
    train_steps(network, tokenizer, rows, steps=3)
    save_checkpoint(str(folder), network, tokenizer, config, {"valid_log_loss": 1.05, "valid_rows": 6.0}, epoch=0)
    prefix = "serve-node-loss/llama"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        cluster.upload(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
    member = EnsembleMember(name="llama", checkpoint=f"s3://arena/{prefix}", weight=1.0, temperature=1.0)
    report = EnsembleReport(n_rows=6, member_log_loss={"llama": 1.05}, ensemble_log_loss=1.05)
    ensemble = EnsembleSpec(members=(member,), mode="prob", report=report)
    return cluster.upload_text(ensemble.model_dump_json(indent=2) + "\n", "serve-node-loss/ensemble.json")


def state(cluster: Rehearsal, *args: str) -> list[dict]:
    """`ray list <args> --format json` against the rehearsal's head."""
    listed = subprocess.run(["ray", "list", *args, "--format", "json", "--limit", "10000",
                             f"--address={cluster.head_address}"], capture_output=True, text=True, timeout=60,
                            env=cluster.env | {"HOME": str(cluster.root / "head-home")})
    assert listed.returncode == 0, listed.stderr[-2000:]
    return json.loads(listed.stdout)


def replica_nodes(cluster: Rehearsal, deployment: str) -> list[str]:
    """The rehearsal nodes (by name) whose sessions hold a live replica actor of `deployment`."""
    actors = state(cluster, "actors", "--detail", "--filter", "state=ALIVE")
    pids = {actor["pid"] for actor in actors if actor["class_name"].startswith("ServeReplica:arena:")
            and actor["class_name"].endswith(f":{deployment}")}
    nodes = {"head": cluster.head, **cluster.nodes}
    return sorted(name for name, node in nodes.items() if pids & set(node.pids()))


@dataclass
class Answer:
    started: float
    seconds: float
    status: int | None  # None: no HTTP answer (the error says why)
    error: str | None = None
    retry_after: str | None = None
    error_shape: bool = True  # a non-200 answer has the app's {"error": {status, message, path}} body


class Load:
    """`CLIENTS` threads posting to /v1/predict back to back until `stop()`; every answer kept."""

    def __init__(self, url: str) -> None:
        self.url, self.answers, self.lock = url, [], threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=CLIENT_TIMEOUT_S + 10)

    def _client(self) -> None:
        with requests.Session() as session:
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    response = session.post(self.url, json=PAIR, timeout=CLIENT_TIMEOUT_S)
                    answer = Answer(started, time.monotonic() - started, response.status_code,
                                    retry_after=response.headers.get("Retry-After"))
                    if response.status_code != 200:
                        answer.error_shape = has_error_shape(response, response.status_code)
                        answer.error = response.text[:300]
                except requests.Timeout:
                    answer = Answer(started, time.monotonic() - started, None, "timeout")
                except requests.RequestException as error:
                    answer = Answer(started, time.monotonic() - started, None, f"connection: {error}"[:300])
                with self.lock:
                    self.answers.append(answer)

    def snapshot(self) -> list[Answer]:
        with self.lock:
            return list(self.answers)


def has_error_shape(response: requests.Response, status: int) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return error.get("status") == status and isinstance(error.get("message"), str) and "path" in error


def deploy(cluster: Rehearsal, spec: str, head_node_id: str, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """`serve deploy` serve/config.yaml with the rehearsal's changes (module docstring); (base URL, client env)."""
    port = free_ports(1)[0]
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    assert config["proxy_location"] == "HeadOnly"
    config["http_options"]["port"] = port
    application = config["applications"][0]["args"]
    application["model"] = spec
    application["serving"]["member_timeout_s"] = MEMBER_TIMEOUT_S
    application["serving"]["member"]["ray_actor_options"]["num_cpus"] = 0.5
    application["serving"]["ingress"]["ray_actor_options"] = {"num_cpus": 0,
                                                              "label_selector": {"ray.io/node-id": head_node_id}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = cluster.client_env(tmp_path / "client")
    done = subprocess.run(["serve", "deploy", str(path), "--address", cluster.dashboard], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    base = f"http://127.0.0.1:{port}"
    cluster.wait_for_serve(base, env)
    return base, env


def resent_calls(cluster: Rehearsal) -> int:
    """Member calls the ingress sent again because their replica went (its replica logs on the head)."""
    logs = (cluster.root / "head" / "session_latest" / "logs" / "serve").glob("replica_arena_Ingress_*.log")
    return sum(log.read_text(errors="replace").count("sending the call again") for log in logs)


def summarize(answers: list[Answer], killed_at: float) -> dict:
    """What the clients saw: statuses, failures by kind, when 200s came back, the slowest answer."""
    statuses = Counter(str(a.status) for a in answers if a.status is not None)
    failures = Counter(a.error.split(":")[0] for a in answers if a.status is None)
    after = [a for a in answers if a.started >= killed_at]
    back = min((a.started + a.seconds for a in after if a.status == 200), default=None)
    unavailable = [a for a in answers if a.status == 503]
    return {
        "requests": len(answers), "by_status": dict(sorted(statuses.items())), "client_failures": dict(failures),
        "requests_before_kill": sum(a.started < killed_at for a in answers),
        "by_status_after_kill": dict(sorted(Counter(str(a.status) for a in after).items())),
        "seconds_to_200_after_kill": None if back is None else round(back - killed_at, 1),
        "first_503_after_kill_s": round(min(a.started + a.seconds for a in unavailable) - killed_at, 1)
        if unavailable else None,
        "last_503_after_kill_s": round(max(a.started + a.seconds for a in unavailable) - killed_at, 1)
        if unavailable else None,
        "retry_after_values": sorted({a.retry_after for a in unavailable if a.retry_after}),
        "longest_latency_s": round(max(a.seconds for a in answers), 2),
        "longest_latency_200_s": round(max((a.seconds for a in answers if a.status == 200), default=0.0), 2),
        "other_answers": sorted({f"{a.status}: {a.error}" for a in answers
                                 if a.status not in (200, 503) or (a.status == 503 and not a.error_shape)})[:5],
    }


def test_serve_keeps_answering_when_the_node_of_a_member_replica_goes(cluster, spec, tmp_path):
    (head,) = [node for node in state(cluster, "nodes") if node["is_head_node"]]
    base, env = deploy(cluster, spec, head["node_id"], tmp_path)
    try:
        (ingress_node,) = replica_nodes(cluster, "Ingress")
        assert ingress_node == "head", ingress_node
        with Load(f"{base}/v1/predict") as load:
            time.sleep(LOAD_BEFORE_KILL_S)
            member_nodes = replica_nodes(cluster, "member0-llama")  # where the member's replicas are now
            assert member_nodes and "head" not in member_nodes, member_nodes
            member_node = member_nodes[0]
            killed = cluster.kill_node(member_node)
            killed_at = time.monotonic()
            cluster.add_node("worker-3", wait=False)  # the replacement the autoscaler would start
            deadline = killed_at + RECOVERY_LIMIT_S + 30  # past the limit, to measure a slow recovery too
            while time.monotonic() < deadline and summarize(load.snapshot(), killed_at)[
                    "seconds_to_200_after_kill"] is None:
                time.sleep(0.5)
            time.sleep(LOAD_AFTER_RECOVERY_S)
        measured = summarize(load.snapshot(), killed_at)
        ready = requests.get(f"{base}/readyz", timeout=30)
        measured |= {
            "clients": CLIENTS, "member_timeout_s": MEMBER_TIMEOUT_S, "client_timeout_s": CLIENT_TIMEOUT_S,
            "member_replica_nodes_before": member_nodes, "killed_node": member_node,
            "killed_pids": len(killed["pids"]), "ingress_node": ingress_node,
            "member_replica_nodes_after": replica_nodes(cluster, "member0-llama"),
            "readyz_after": ready.status_code, "member_calls_resent": resent_calls(cluster),
            "what_happened": ("503 with Retry-After while the member recovered" if measured["by_status"].get("503")
                              else "every request waited for the member's replacement and got 200"),
        }
        record("serve_node_loss", measured)
        print(json.dumps(measured, indent=2))
    finally:
        subprocess.run(["serve", "shutdown", "-y", "--address", cluster.dashboard], env=env, capture_output=True,
                       timeout=120)
    assert set(measured["by_status"]) <= {"200", "503"}, measured  # never a 500, nor any other status
    assert not measured["client_failures"], measured  # no hang past the client's timeout, no dropped connection
    assert not measured["other_answers"], measured  # every 503 in the app's error shape
    assert all(a.retry_after for a in load.answers if a.status == 503), measured
    assert measured["seconds_to_200_after_kill"] is not None, measured
    assert measured["seconds_to_200_after_kill"] <= RECOVERY_LIMIT_S, measured
    assert measured["requests_before_kill"] >= CLIENTS, measured  # the load ran before the kill
    assert ready.status_code == 200, ready.text
