"""The real Serve app on the shared local Ray, called over HTTP on 127.0.0.1.

Three applications run side by side: "ens", a 2-member ensemble (the packaged MiniLM and a tiny random
Llama, a few optimizer steps each) with fixed class priors, small limits and fault injection on; "em", a
one-member spec whose priors are estimated by EM, behind an API key; and "s3", a spec on S3 (moto) whose one
member is the Llama checkpoint uploaded there, which each replica downloads. Both predict in fp32, as the batch
predictions they are compared with, so batch composition cannot move a probability by more than round-off.
"""

import asyncio
import io
import json
import socket
import time

import aiohttp
import numpy as np
import pandas as pd
import pytest
import requests
from modeling_helpers import build, tiny_config, train_steps

from app import storage
from app.config import PACKAGED_MINILM, PredictConfig
from app.data import LABEL_COLUMNS, load_pairs
from app.ensemble import (
    EnsembleMember, EnsembleReport, EnsembleSpec, apply_spec, apply_spec_to_member_logits, save_spec)
from app.inference import Predictor
from app.modeling import save_checkpoint
from app.prediction import predict_file
from app.serving import FAULT_PROMPT, MemberScorer, PairBatch, ServeSettings
from app.synthetic import encode_turns, generate_pairs

pytestmark = pytest.mark.integration

API_KEY = "test-key-0123"
FP32 = PredictConfig(precision="fp32")
ENSEMBLE_SETTINGS = {
    "fault_injection": True, "max_body_bytes": 200_000, "max_pairs_per_request": 40, "file_chunk_rows": 8,
    "max_batch_requests": 16, "batch_wait_timeout_s": 0.05,
    # Serve counts a request as queued until a replica takes it, so a queue bound below a burst refuses part
    # of the burst even when replicas are free: the bounds hold the 16-request bursts below.
    "member": {"num_replicas": 1, "max_ongoing_requests": 16, "max_queued_requests": 32,
               "ray_actor_options": {"num_cpus": 0.5}},
    "ingress": {"num_replicas": 1, "max_ongoing_requests": 32, "max_queued_requests": 24,
                "ray_actor_options": {"num_cpus": 0.1}},
}
EM_SETTINGS = {"api_key": API_KEY,
               "member": {"num_replicas": 1, "max_ongoing_requests": 32, "max_queued_requests": 64,
                          "ray_actor_options": {"num_cpus": 0.5}},
               "ingress": {"num_replicas": 1, "max_ongoing_requests": 32, "max_queued_requests": 64,
                           "ray_actor_options": {"num_cpus": 0.1}}}

S3_SETTINGS = {"member": {"num_replicas": 1, "max_ongoing_requests": 32, "max_queued_requests": 64,
                          "ray_actor_options": {"num_cpus": 0.25}},
               "ingress": {"num_replicas": 1, "max_ongoing_requests": 32, "max_queued_requests": 64,
                           "ray_actor_options": {"num_cpus": 0.1}}}


def report(*names: str) -> EnsembleReport:
    return EnsembleReport(n_rows=6, member_log_loss=dict.fromkeys(names, 1.05), ensemble_log_loss=1.0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, s3):
    """Two small trained checkpoints of different families and tokenizers, and the specs over them (one on S3)."""
    root = tmp_path_factory.mktemp("serve")
    paths = {}
    families = (("minilm", "encoder", PACKAGED_MINILM, 0), ("llama", "decoder", "random:llama-tiny", 1))
    for name, kind, model, seed in families:
        config = tiny_config(kind, model)
        network, tokenizer, rows = build(config, seed)
        train_steps(network, tokenizer, rows, steps=3)
        paths[name] = str(root / name)
        save_checkpoint(paths[name], network, tokenizer, config, {"valid_log_loss": 1.05, "valid_rows": 6.0}, epoch=0)
    # Symmetric priors (pA = pB), so that exchanging A and B exchanges the ensemble's probabilities too.
    ensemble = EnsembleSpec(
        members=(EnsembleMember(name="minilm", checkpoint=paths["minilm"], weight=0.6, temperature=1.3),
                 EnsembleMember(name="llama", checkpoint=paths["llama"], weight=0.4, temperature=0.8)),
        mode="prob", priors=(0.4, 0.4, 0.2), train_priors=(0.35, 0.35, 0.3), report=report("minilm", "llama"))
    em = EnsembleSpec(members=(EnsembleMember(name="minilm", checkpoint=paths["minilm"], weight=1.0, temperature=1.1),),
                      mode="logit", priors="em", train_priors=(0.45, 0.45, 0.1), report=report("minilm"))
    remote = s3()
    storage.upload_dir(paths["llama"], storage.join(remote, "llama"))
    on_s3 = EnsembleSpec(members=(EnsembleMember(name="llama", checkpoint=storage.join(remote, "llama"), weight=1.0,
                                                 temperature=1.0),), mode="prob", report=report("llama"))
    return {"paths": paths, "ensemble": (ensemble, str(save_spec(ensemble, root / "ensemble.json"))),
            "em": (em, str(save_spec(em, root / "em.json"))),
            "s3": (on_s3, save_spec(on_s3, storage.join(remote, "ensemble.json"))), "root": root}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session, checkpoints):
    """The applications on one Serve HTTP proxy at 127.0.0.1:<free port>; Serve (not Ray) shut down after."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    overrides = ["predict.precision=fp32"]
    ensemble = build_app({"model": checkpoints["ensemble"][1], "overrides": overrides, "serving": ENSEMBLE_SETTINGS})
    em = build_app({"model": checkpoints["em"][1], "overrides": overrides, "serving": EM_SETTINGS})
    on_s3 = build_app({"model": checkpoints["s3"][1], "overrides": overrides, "serving": S3_SETTINGS})
    try:
        serve.run_many([serve.RunTarget(target=ensemble, name="ens", route_prefix="/ens"),
                        serve.RunTarget(target=em, name="em", route_prefix="/em"),
                        serve.RunTarget(target=on_s3, name="s3", route_prefix="/s3")])
        yield {"ens": f"http://127.0.0.1:{port}/ens", "em": f"http://127.0.0.1:{port}/em",
               "s3": f"http://127.0.0.1:{port}/s3", "port": port}
    finally:
        serve.shutdown()


def kaggle_rows(n_synthetic: int = 10) -> pd.DataFrame:
    """Kaggle test rows: synthetic ones plus edge cases (null turns, empty texts, a text far over the token
    budget, unequal turn counts, non-ASCII)."""
    frame = generate_pairs(n_synthetic, seed=5)[["id", "prompt", "response_a", "response_b"]].astype({"id": str})
    edge = [
        ("e1", ["Hi", "And then?"], ["Hello!", None], ["Hey.", "More."]),
        ("e2", [""], [""], ["something"]),
        ("e3", ["Summarise this."], ["word " * 4000], ["short"]),
        ("e4", ["one", "two", "three"], ["a1"], ["b1", "b2"]),
        ("e5", ["Grüße 🌍 — 你好?"], ["Ça va ✓"], [None]),
    ]
    extra = pd.DataFrame([{"id": i, "prompt": encode_turns(p), "response_a": encode_turns(a),
                           "response_b": encode_turns(b)} for i, p, a, b in edge])
    return pd.concat([frame, extra], ignore_index=True)


def as_pairs(frame: pd.DataFrame) -> list[dict]:
    """The rows as /v1/predict pairs: the same JSON turn lists, nulls included."""
    return [{"id": row.id, "prompt": json.loads(row.prompt), "response_a": json.loads(row.response_a),
             "response_b": json.loads(row.response_b)} for row in frame.itertuples()]


def probabilities(predictions: list[dict]) -> np.ndarray:
    return np.array([[p[c] for c in LABEL_COLUMNS] for p in predictions])


@pytest.fixture(scope="module")
def rows_file(checkpoints):
    frame = kaggle_rows()
    path = checkpoints["root"] / "test.csv"
    frame.to_csv(path, index=False)
    return frame, path


def post(url: str, **kwargs) -> requests.Response:
    return requests.post(url, timeout=120, **kwargs)


def test_predict_and_batch_equal_what_jobs_predict_writes(served, checkpoints, rows_file, tmp_path):
    frame, path = rows_file
    output = tmp_path / "submission.csv"
    predict_file(checkpoints["ensemble"][1], str(path), str(output), FP32)  # jobs/predict.py's function
    expected = pd.read_csv(output, dtype={"id": str})

    response = post(f"{served['ens']}/v1/predict", json={"pairs": as_pairs(frame)})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["id"] for p in predictions] == list(frame["id"])
    np.testing.assert_allclose(probabilities(predictions), expected[list(LABEL_COLUMNS)].to_numpy(), atol=1e-5)

    streamed = post(f"{served['ens']}/v1/predict/batch", data=path.read_bytes(), headers={"Content-Type": "text/csv"})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/csv")
    assert (streamed.headers["X-Arena-Priors"], streamed.headers["X-Arena-Prior-Applied"]) == (
        "fixed", "0.400000,0.400000,0.200000")
    assert streamed.text.splitlines()[0] == output.read_text().splitlines()[0]
    submission = pd.read_csv(io.StringIO(streamed.text), dtype={"id": str})
    assert list(submission["id"]) == list(expected["id"])
    np.testing.assert_allclose(submission[list(LABEL_COLUMNS)].to_numpy(), expected[list(LABEL_COLUMNS)].to_numpy(),
                               atol=1e-5)


def test_swap_tta_exchanges_a_and_b_and_matches_the_predictor(served, checkpoints, rows_file):
    frame, _ = rows_file
    pairs = as_pairs(frame.iloc[:4])
    swapped = [{**p, "id": f"{p['id']}-swapped", "response_a": p["response_b"], "response_b": p["response_a"]}
               for p in pairs]
    response = post(f"{served['ens']}/v1/predict", json={"pairs": pairs + swapped, "tta_swap": True,
                                                         "return_members": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tta_swap"] is True
    probs = probabilities(body["predictions"])
    original, exchanged = probs[:4], probs[4:]
    np.testing.assert_allclose(exchanged, original[:, [1, 0, 2]], atol=1e-6)
    for name in ("minilm", "llama"):
        members = probabilities([p["members"][name] for p in body["predictions"]])
        np.testing.assert_allclose(members[4:], members[:4, [1, 0, 2]], atol=1e-6)

    spec = checkpoints["ensemble"][0]
    texts = tuple([[turn or "" for turn in p[column]] for p in pairs]
                  for column in ("prompt", "response_a", "response_b"))
    member_logits = {m.name: Predictor(m.checkpoint, precision="fp32").predict_logits(*texts, tta_swap=True)
                     for m in spec.members}
    np.testing.assert_allclose(original, apply_spec_to_member_logits(spec, member_logits), atol=1e-5)


def test_member_batches_equal_the_predictor_and_stay_under_the_token_budget(checkpoints, rows_file):
    """Calls cut into chunks of <= batch_tokens estimated tokens and scored together in one batch give the
    logits of one Predictor.predict_logits call over the rows, with and without TTA."""
    frame, path = rows_file
    table = load_pairs(str(path), require_labels=False).frame
    pairs = PairBatch(list(table["id"]), list(table["prompt"]), list(table["response_a"]), list(table["response_b"]))
    scorer = MemberScorer("minilm", checkpoints["paths"]["minilm"], FP32, ServeSettings(batch_tokens=512,
                                                                                      max_batch_requests=4))
    predictor = Predictor(checkpoints["paths"]["minilm"], precision="fp32")
    for tta_swap in (False, True):
        chunks = scorer.chunks(pairs, tta_swap)
        assert len(chunks) > 1 and all(chunk.tokens <= 512 for chunk in chunks)
        encoded = predictor.encoder.encode(*pairs.texts())  # the estimate over-counts WordPiece lengths
        assert sum(c.tokens for c in chunks) >= (2 if tta_swap else 1) * sum(len(s) for s in encoded)
        logits = np.concatenate(scorer.score(chunks))
        np.testing.assert_allclose(logits, predictor.predict_logits(*pairs.texts(), tta_swap=tta_swap), atol=1e-5)
    with pytest.raises(ValueError, match="batch_tokens=128 cannot hold one pair"):
        MemberScorer("minilm", checkpoints["paths"]["minilm"], FP32,
                     ServeSettings(batch_tokens=128, max_batch_requests=4))


def test_em_priors_apply_over_a_whole_file_and_are_refused_per_request(served, checkpoints, rows_file):
    frame, path = rows_file
    headers = {"X-API-Key": API_KEY}
    refused = post(f"{served['em']}/v1/predict", json={"pairs": as_pairs(frame.iloc[:2])}, headers=headers)
    assert refused.status_code == 409 and "/v1/predict/batch" in refused.json()["error"]["message"]

    streamed = post(f"{served['em']}/v1/predict/batch", data=path.read_bytes(), headers=headers)
    assert streamed.status_code == 200, streamed.text
    submission = pd.read_csv(io.StringIO(streamed.text), dtype={"id": str})
    # What predict_with_spec computes (its member logits, here from the Predictor in process: the Ray Data
    # path is compared in the test above), EM over every row of the file.
    table = load_pairs(str(path), require_labels=False).frame
    spec = checkpoints["em"][0]
    texts = (list(table["prompt"]), list(table["response_a"]), list(table["response_b"]))
    logits = {"minilm": Predictor(checkpoints["paths"]["minilm"], precision="fp32").predict_logits(*texts)}
    expected = apply_spec_to_member_logits(spec, logits)
    np.testing.assert_allclose(submission[list(LABEL_COLUMNS)].to_numpy(), expected, atol=1e-5)
    unshifted = apply_spec_to_member_logits(spec.model_copy(update={"priors": None}), logits)
    assert np.abs(expected - unshifted).max() > 1e-3  # EM did move the probabilities
    # the headers say what was applied: the estimate over the whole file, whether EM converged, no fallback
    record = apply_spec(spec, logits)[1]
    assert streamed.headers["X-Arena-Priors"] == "em" and streamed.headers["X-Arena-Prior-Fallback"] == "false"
    assert streamed.headers["X-Arena-Prior-Estimate"] == ",".join(f"{p:.6f}" for p in record.estimated_priors)
    assert streamed.headers["X-Arena-Prior-Converged"] == str(record.converged).lower()


def test_a_spec_on_s3_is_served_from_checkpoints_downloaded_there(served, checkpoints, rows_file):
    frame, _ = rows_file
    pairs = as_pairs(frame.iloc[:6])
    response = post(f"{served['s3']}/v1/predict", json={"pairs": pairs})
    assert response.status_code == 200, response.text
    texts = tuple([[turn or "" for turn in p[column]] for p in pairs]
                  for column in ("prompt", "response_a", "response_b"))
    expected = Predictor(checkpoints["paths"]["llama"], precision="fp32").predict(*texts)  # the local original
    np.testing.assert_allclose(probabilities(response.json()["predictions"]), expected, atol=1e-5)
    (member,) = requests.get(f"{served['s3']}/v1/models", timeout=30).json()["members"]
    assert member["checkpoint"] == checkpoints["s3"][0].members[0].checkpoint
    assert member["checkpoint"].startswith("s3://")


def test_api_key_is_required_on_the_api_but_not_on_probes(served, rows_file):
    frame, _ = rows_file
    pair = as_pairs(frame.iloc[:1])[0]
    for headers in ({}, {"X-API-Key": "wrong"}):
        response = post(f"{served['em']}/v1/predict", json=pair, headers=headers)
        assert response.status_code == 401 and "X-API-Key" in response.json()["error"]["message"]
    assert requests.get(f"{served['em']}/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{served['em']}/v1/models", headers={"X-API-Key": API_KEY}, timeout=30).status_code == 200
    assert requests.get(f"{served['em']}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{served['ens']}/v1/models", timeout=30).status_code == 200  # "ens" has no key


def test_probes_models_and_openapi(served):
    assert requests.get(f"{served['ens']}/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(f"{served['ens']}/readyz", timeout=30)
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "members": {"minilm": "ready", "llama": "ready"}}
    models = requests.get(f"{served['ens']}/v1/models", timeout=30).json()
    assert models["labels"] == list(LABEL_COLUMNS) and models["priors"] == [0.4, 0.4, 0.2]
    assert [(m["name"], m["weight"], m["temperature"]) for m in models["members"]] == [("minilm", 0.6, 1.3),
                                                                                      ("llama", 0.4, 0.8)]
    assert {m["kind"] for m in models["members"]} == {"encoder", "decoder"}
    assert all(m["versions"]["torch"] and m["replica"] for m in models["members"])
    document = requests.get(f"{served['ens']}/openapi.json", timeout=30).json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/models", "/healthz", "/readyz"} <= set(document["paths"])
    body_schema = document["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "response_a" in json.dumps(body_schema)
    assert requests.get(f"{served['ens']}/docs", timeout=30).status_code == 200


async def post_all(url: str, payloads: list[dict]) -> list[tuple[int, dict]]:
    """Send every payload at once; (status, JSON body) of each."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def one(payload: dict) -> tuple[int, dict]:
            async with session.post(url, json=payload) as response:
                text = await response.text()
                try:
                    return response.status, json.loads(text)
                except json.JSONDecodeError:
                    return response.status, {"text": text}
        return await asyncio.gather(*(one(payload) for payload in payloads))


def member_stats(base: str) -> dict[str, dict]:
    models = requests.get(f"{base}/v1/models", timeout=30).json()
    return {m["name"]: {**m["stats"], "replica": m["replica"]} for m in models["members"]}


def test_concurrent_requests_are_batched(served, rows_file):
    frame, _ = rows_file
    before = member_stats(served["ens"])
    pairs = as_pairs(frame.iloc[:10])
    results = asyncio.run(post_all(f"{served['ens']}/v1/predict", [pairs[i % 10] for i in range(16)]))
    assert [status for status, _ in results] == [200] * 16
    after = member_stats(served["ens"])
    for name in ("minilm", "llama"):
        batches = after[name]["batches"] - before[name]["batches"]
        calls = after[name]["calls"] - before[name]["calls"]
        assert calls == 16 and batches < calls, (name, before[name], after[name])  # some batch held > 1 call
        assert after[name]["max_calls_per_batch"] > 1
    # The same pair gives the same probabilities whichever batch it was in.
    by_id: dict[str, np.ndarray] = {}
    for _, body in results:
        (prediction,) = body["predictions"]
        value = probabilities([prediction])[0]
        np.testing.assert_allclose(by_id.setdefault(prediction["id"], value), value, atol=1e-6)


def test_bad_requests_get_their_status_codes(served, rows_file, tmp_path):
    frame, path = rows_file
    url = f"{served['ens']}/v1/predict"
    pairs = as_pairs(frame.iloc[:4])
    pairs[3] = {**pairs[3], "response_a": ["fine", 7]}
    bad = post(url, json={"pairs": pairs})
    assert bad.status_code == 422 and bad.json()["error"]["path"] == "pairs[3].response_a[1]"
    assert post(url, data=b'{"pairs": [', headers={"Content-Type": "application/json"}).status_code == 422
    missing = post(url, json={"prompt": "p", "response_a": "a"})
    assert missing.status_code == 422 and missing.json()["error"]["path"] == "response_b"

    too_many = post(url, json={"pairs": as_pairs(frame.iloc[:1]) * 41})
    assert too_many.status_code == 413 and "40" in too_many.json()["error"]["message"]
    too_big = post(url, json={"prompt": "p", "response_a": "x" * 250_000, "response_b": "b"})
    assert too_big.status_code == 413

    broken = frame.copy()
    broken.loc[2, "response_b"] = "not json"
    broken.to_csv(tmp_path / "broken.csv", index=False)
    rejected = post(f"{served['ens']}/v1/predict/batch", data=(tmp_path / "broken.csv").read_bytes())
    message = rejected.json()["error"]["message"]
    assert rejected.status_code == 422 and f"row id={broken.loc[2, 'id']}" in message and "column response_b" in message


def test_a_member_fault_is_a_json_500_and_the_replica_keeps_serving(served, rows_file):
    frame, _ = rows_file
    before = member_stats(served["ens"])
    failed = post(f"{served['ens']}/v1/predict", json={"prompt": FAULT_PROMPT, "response_a": "a", "response_b": "b"})
    assert failed.status_code == 500 and "InjectedFault" in failed.json()["error"]["message"]
    assert failed.json()["error"]["message"].startswith("member '")
    ok = post(f"{served['ens']}/v1/predict", json={"pairs": as_pairs(frame.iloc[:2])})
    assert ok.status_code == 200
    after = member_stats(served["ens"])
    assert {name: stats["replica"] for name, stats in after.items()} == {
        name: stats["replica"] for name, stats in before.items()}  # the same replicas answered: none restarted


def test_predicted_classes_are_counted_in_prometheus_metrics(served, ray_session):
    port = ray_session.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + 30
    lines: list[str] = []
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith("ray_arena_predicted_class")]
        if any('member="minilm"' in line for line in lines) and any('member="ensemble"' in line for line in lines):
            break
        time.sleep(1)
    assert any('member="llama"' in line and 'predicted_class="winner_' in line for line in lines), lines[:5]
    assert any('member="ensemble"' in line for line in lines)


def test_overload_gets_503s_not_a_crash(served, rows_file):
    """Past the ingress's bound (32 held + 24 queued) requests are refused with 503 at once."""
    frame, _ = rows_file
    payload = {"pairs": as_pairs(frame.iloc[:1])}
    results = asyncio.run(post_all(f"{served['ens']}/v1/predict", [payload] * 96))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    assert requests.get(f"{served['ens']}/readyz", timeout=30).status_code == 200
    assert post(f"{served['ens']}/v1/predict", json=payload).status_code == 200
