"""Every rehearsal scenario (`make rehearsal`; tests/rehearsal.py has the cluster): the product on a head that takes
no work, two worker nodes that share no disk, and S3 for everything.

- ZeRO-2 and ZeRO-3 across the two nodes (one worker per node), predicting from the s3:// checkpoint;
- node loss against an uninterrupted run of the same seed: the metric delta, the rows each rank trained (the same,
  in the same order), the seconds the loss cost;
- S3 that stops answering for 20 s while a checkpoint uploads;
- jobs.cv (2 folds) and jobs.ensemble on s3:// member folders, a 2-trial tuning.sweep, and the Serve app loading
  the s3:// spec.

Each scenario adds what it measured to runs/rehearsal/report.json (docs/RELIABILITY.md quotes it). Not part of
`make test` (marker `rehearsal`); the compact scenario there is tests/test_rehearsal.py.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
from rehearsal import BUCKET, ROOT, Rehearsal
from test_rehearsal import TRAIN, cluster, data, wait_for_checkpoint  # noqa: F401 - fixtures

from app import rowlog

pytestmark = [pytest.mark.integration, pytest.mark.rehearsal]
REPORT = ROOT / "runs" / "rehearsal" / "report.json"
STORAGE = f"s3://{BUCKET}/full"
TOLERANCE = 1e-3  # validation log loss of a resumed run against an uninterrupted one (tests/test_resume.py)


def record(scenario: str, measured: dict) -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report[scenario] = measured | {"recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
    REPORT.write_text(json.dumps(report, indent=2) + "\n")


def row_logs(cluster: Rehearsal, name: str) -> list[dict]:
    return [json.loads(cluster.read(f"s3://{BUCKET}/{key}")) for key in cluster.keys(f"full/{name}/rows/")
            if key.endswith(".json")]


def summary(cluster: Rehearsal, name: str) -> dict:
    return json.loads(cluster.read(f"{STORAGE}/{name}/summary.json"))


def timed_submit(cluster: Rehearsal, entrypoint: str) -> tuple[float, str]:
    started = time.monotonic()
    done = cluster.submit(entrypoint, timeout=1200)
    return time.monotonic() - started, done.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_across_two_nodes(cluster, data, stage):  # noqa: F811 - fixtures
    train, test, train_ids = data
    name = f"zero{stage}"
    seconds, _ = timed_submit(cluster, TRAIN.format(train=train, storage=STORAGE, name=name,
                                                    extra=f"deepspeed.enabled=true deepspeed.stage={stage}"))
    best = summary(cluster, name)["best_checkpoint"]
    assert best.startswith(f"{STORAGE}/{name}/epoch_000"), best
    logs = row_logs(cluster, name)
    accounted = rowlog.account(logs, train_ids, sits_out=len(train_ids) % 2)
    assert accounted | {"lost": 0, "repeated": 0, "unknown": 0, "ranks": 2} == accounted, accounted
    assert len({log["node"] for log in logs}) == 2
    submission = f"s3://{BUCKET}/predictions/{name}.csv"
    cluster.submit(f"python -m jobs.predict --checkpoint {best} --input {test} --output {submission} "
                   "predict.num_actors=2 predict.cpus_per_actor=2")
    assert len(pd.read_csv(io.BytesIO(cluster.read(submission)))) == 60
    record(f"zero{stage}_two_nodes", {"seconds": round(seconds, 1), "best_checkpoint": best,
                                      "valid_log_loss": summary(cluster, name)["best_metrics"]["valid_log_loss"],
                                      "rows": accounted, "nodes": len({log["node"] for log in logs})})


def test_node_loss_against_an_uninterrupted_run(cluster, data, tmp_path):  # noqa: F811 - fixtures
    train, _, train_ids = data
    straight_seconds, _ = timed_submit(cluster, TRAIN.format(train=train, storage=STORAGE, name="straight", extra=""))
    log = tmp_path / "killed.log"
    started = time.monotonic()
    job = cluster.submit_async(TRAIN.format(train=train, storage=STORAGE, name="killed", extra="run.max_failures=1"),
                               log)
    wait_for_checkpoint(cluster, "full/killed/", job, log)
    killed = cluster.kill_node("worker-2" if "worker-2" in cluster.nodes else sorted(cluster.nodes)[-1])
    cluster.add_node(f"worker-{len(cluster.nodes) + 2}", wait=False)
    assert job.wait(timeout=1200) == 0, log.read_text()[-6000:]
    killed_seconds = time.monotonic() - started
    straight, interrupted = summary(cluster, "straight"), summary(cluster, "killed")
    delta = abs(interrupted["best_metrics"]["valid_log_loss"] - straight["best_metrics"]["valid_log_loss"])
    logs, straight_logs = row_logs(cluster, "killed"), row_logs(cluster, "straight")
    accounted = rowlog.account(logs, train_ids, sits_out=len(train_ids) % 2)
    same_rows = [log["row_ids"] for log in logs] == [log["row_ids"] for log in straight_logs]
    resumed = [row.get("resumed_from_step") for row in interrupted["history"]]
    record("node_loss", {"uninterrupted_seconds": round(straight_seconds, 1),
                         "interrupted_seconds": round(killed_seconds, 1),
                         "seconds_lost": round(killed_seconds - straight_seconds, 1), "restarts": 1,
                         "resumed_from_step": resumed, "killed_pids": len(killed["pids"]),
                         "valid_log_loss": [straight["best_metrics"]["valid_log_loss"],
                                            interrupted["best_metrics"]["valid_log_loss"]],
                         "valid_log_loss_delta": delta, "rows": accounted, "same_rows_in_same_order": same_rows})
    assert delta <= TOLERANCE
    assert accounted | {"lost": 0, "repeated": 0, "unknown": 0, "ranks": 2} == accounted, accounted
    assert same_rows
    cluster.wait_for_cpus(4)


def test_s3_outage_while_a_checkpoint_uploads(cluster, data, tmp_path):  # noqa: F811 - fixtures
    """S3 stops answering (the server process is stopped) for 20 s as soon as a mid-epoch checkpoint starts to
    upload. The run retries or fails cleanly; the checkpoint that a resume would pick is complete."""
    train, _, _ = data
    log = tmp_path / "outage.log"
    name = "outage"
    extra = "run.max_failures=2 run.keep_checkpoints=20"  # the folder that was uploading stays, to be looked at
    job = cluster.submit_async(TRAIN.format(train=train, storage=STORAGE, name=name, extra=extra), log)
    deadline = time.monotonic() + 600
    uploading = None
    while time.monotonic() < deadline and uploading is None:
        assert job.poll() is None, log.read_text()[-4000:]
        keys = cluster.keys(f"full/{name}/")
        folders = sorted({key.split("/")[2] for key in keys if "_step_" in key})
        if folders:
            cluster.pause_s3()
            uploading = folders[0]
            at_pause = sorted(key.rsplit("/", 1)[1] for key in keys if f"/{uploading}/" in key and key[-1] != "/")
        else:
            time.sleep(0.05)
    assert uploading is not None, "no checkpoint began to upload"
    partial = None
    time.sleep(20)
    cluster.resume_s3()
    try:
        returncode = job.wait(timeout=1200)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"the run hung after the outage:\n{log.read_text()[-4000:]}") from None
    output = log.read_text()
    snapshot = json.loads(cluster.read(f"{STORAGE}/{name}/checkpoint_manager_snapshot.json"))
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")  # what a resume picks
    if latest is not None:
        files = [key.rsplit("/", 1)[1] for key in cluster.keys(f"full/{name}/{latest}/")]
        partial = not {"progress_rank0.pt", "progress_rank1.pt", "train_state.pt"} <= set(files)
    after = sorted(key.rsplit("/", 1)[1] for key in cluster.keys(f"full/{name}/{uploading}/") if key[-1] != "/")
    record("s3_outage", {"paused_seconds": 20, "job_exit": returncode, "checkpoint_uploading": uploading,
                         "its_files_at_pause": at_pause, "its_files_after": after,
                         "retried": output.count("resumed at epoch"), "latest_checkpoint": latest,
                         "latest_checkpoint_partial": partial,
                         "errors": sorted({line.strip()[:160] for line in output.splitlines()
                                           if "Error" in line and "Traceback" not in line})[:5]})
    assert partial is False, f"the checkpoint a resume would pick is partial: {latest}"
    if returncode == 0:
        assert summary(cluster, name)["best_checkpoint"].startswith(f"{STORAGE}/{name}/")
    else:
        assert "Traceback" in output  # failed, and said why


SWEEP_SPACE = """num_samples: 2
max_concurrent_trials: 1
asha: {grace_period: 1, reduction_factor: 2}
space:
  train.lr: {loguniform: [1.0e-5, 3.0e-4]}
"""
CV_MINILM = ("python -m jobs.cv --config configs/tiny.yaml --test {test} data.train_path={train} data.n_folds=2 "
             "run.storage_path={storage} run.name=minilm scaling.num_workers=2 scaling.cpus_per_worker=2 "
             "scaling.torch_threads=1 format.max_length=64 train.epochs=1 predict.num_actors=2 "
             "predict.cpus_per_actor=2")
CV_XGB = ("python -m jobs.cv --config configs/tfidf-xgb.yaml --test {test} data.train_path={train} data.n_folds=2 "
          "run.storage_path={storage} run.name=xgb scaling.num_workers=2 scaling.cpus_per_worker=2")


MADE: dict[str, str] = {}  # what a scenario made that a later one uses


def test_cv_and_ensemble_on_s3_member_folders(cluster, data):  # noqa: F811 - fixtures
    """jobs.cv (2 folds) of two members, then jobs.ensemble on their s3:// member folders, writing an s3:// spec."""
    train, test, _ = data
    seconds = {}
    for name, command in (("cv_minilm", CV_MINILM), ("cv_xgb", CV_XGB)):
        seconds[name], _ = timed_submit(cluster, command.format(test=test, train=train, storage=STORAGE))
    members = [f"{STORAGE}/minilm", f"{STORAGE}/xgb"]
    for member in members:
        meta = json.loads(cluster.read(f"{member}/member.json"))
        assert all(fold["checkpoint"].startswith(f"{member}-fold") for fold in meta["folds"]), meta["folds"]
    spec_dir = f"{STORAGE}/ensemble"
    seconds["ensemble"], _ = timed_submit(cluster, f"python -m jobs.ensemble --members {' '.join(members)} "
                                                   f"--out {spec_dir}")
    spec = json.loads(cluster.read(f"{spec_dir}/ensemble.json"))
    assert all(member["checkpoint"].startswith(STORAGE) for member in spec["members"]), spec["members"]
    MADE["spec"] = f"{spec_dir}/ensemble.json"
    record("cv_and_ensemble", {"seconds": {key: round(value, 1) for key, value in seconds.items()},
                               "members": members, "spec": MADE["spec"],
                               "spec_members": [member["checkpoint"] for member in spec["members"]]})


def test_sweep_into_s3(cluster, data):  # noqa: F811 - fixtures
    """A 2-trial tuning.sweep whose space file and folder are s3:// URIs; each trial a 2-worker Ray Train run."""
    train, _, _ = data
    cluster.upload_text(SWEEP_SPACE, "full/sweep-space.yaml")
    seconds, output = timed_submit(
        cluster, f"python -m tuning.sweep --config configs/tiny.yaml --space s3://{BUCKET}/full/sweep-space.yaml "
                 f"--out {STORAGE}/sweep data.train_path={train} scaling.num_workers=2 scaling.cpus_per_worker=2 "
                 "scaling.torch_threads=1 format.max_length=64 train.epochs=1")
    results = pd.read_csv(io.BytesIO(cluster.read(f"{STORAGE}/sweep/results.csv")))
    assert len(results) == 2 and results["valid_log_loss"].notna().all(), output[-3000:]
    assert cluster.read(f"{STORAGE}/sweep/best.yaml")
    record("sweep", {"seconds": round(seconds, 1), "trials": len(results),
                     "valid_log_loss": results["valid_log_loss"].round(4).tolist()})


def test_serve_loads_the_s3_spec(cluster, tmp_path):  # noqa: F811 - fixtures
    """The Serve app (serve/config.yaml: proxy on the head only) deployed with `serve deploy` on the s3:// spec."""
    assert "spec" in MADE, "no s3:// spec: test_cv_and_ensemble_on_s3_member_folders failed or did not run first"
    record("serve", serve_spec(cluster, MADE["spec"], tmp_path))


def serve_spec(cluster: Rehearsal, spec: str, tmp_path: Path) -> dict:
    """`serve deploy` serve/config.yaml with `spec` as its model, from a client HOME; the proxy (head only) answers
    /readyz and /v1/predict on the head's 127.0.0.1; `serve shutdown` after."""
    import yaml

    from fresh_machine import free_ports

    port = free_ports(1)[0]
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    assert config["proxy_location"] == "HeadOnly"
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["model"] = spec
    # The rehearsal's worker nodes have 4 CPUs in all: a spec of 4 fold checkpoints at serve/config.yaml's 1 CPU
    # each would leave none for the ingress (a GPU node of cluster.yaml has 8 or more).
    config["applications"][0]["args"]["serving"]["member"]["ray_actor_options"]["num_cpus"] = 0.5
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    home = tmp_path / "client"
    env = cluster.client_env(home)
    started = time.monotonic()
    deploy = subprocess.run(["serve", "deploy", str(path), "--address", cluster.dashboard], env=env,
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    try:
        base = f"http://127.0.0.1:{port}"
        cluster.wait_for_serve(base, env)
        ready = time.monotonic() - started
        pair = {"prompt": ["What is 2+2?"], "response_a": ["4"], "response_b": ["5"]}
        answer = requests.post(f"{base}/v1/predict", json={"pairs": [pair]}, timeout=60)
        assert answer.status_code == 200, answer.text[:2000]
        return {"seconds_to_ready": round(ready, 1), "predict_status": answer.status_code,
                "answer": answer.json()}
    finally:
        subprocess.run(["serve", "shutdown", "-y", "--address", cluster.dashboard], env=env, capture_output=True,
                       timeout=120)
