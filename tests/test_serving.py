"""The pure parts of the Serve app (app/serving.py): request validation, token-budget batches, responses.

No Ray and no model here; tests/test_serve.py runs the real app over HTTP.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app import storage
from app.config import PredictConfig
from app.data import LABEL_COLUMNS, load_pairs, write_submission
from app.ensemble import EnsembleMember, EnsembleReport, EnsembleSpec, save_spec
from app.serving import (
    FAULT_PROMPT,
    MARKER_TOKENS_PER_TURN,
    BatchWindow,
    Chunk,
    MemberScorer,
    MemberStats,
    PairBatch,
    PredictIn,
    RequestError,
    ServeArgsError,
    ServeSettings,
    batch_size_of,
    build_predict_response,
    build_serving_plan,
    check_api_key,
    check_online_priors,
    chunk_ranges,
    estimate_tokens,
    inline_schema,
    load_serve_args,
    member_deployment_name,
    member_probabilities,
    parse_predict_request,
    parse_test_file,
    predict_request_schema,
    request_log_record,
    spec_for_checkpoint,
    split_by_budget,
    submission_rows,
)
from app.synthetic import generate_pairs

SETTINGS = ServeSettings(max_body_bytes=4096, max_pairs_per_request=4, max_file_bytes=1 << 20, max_file_rows=50)


def body(value) -> bytes:
    return json.dumps(value).encode()


def refused(raw: bytes, settings: ServeSettings = SETTINGS) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_predict_request(raw, settings)
    return caught.value


def test_one_pair_or_many_strings_or_turn_lists():
    single = parse_predict_request(body({"prompt": "hi", "response_a": ["a", None], "response_b": "b",
                                         "tta_swap": True}), SETTINGS)
    assert single.pairs.ids == [None] and single.pairs.prompts == [["hi"]]
    assert single.pairs.responses_a == [["a", ""]]  # a null turn is an empty turn, as in a Kaggle file
    assert single.tta_swap is True and single.return_members is False
    many = parse_predict_request(body({"pairs": [{"id": 7, "prompt": [], "response_a": "", "response_b": ["x"]},
                                                 {"id": "b", "prompt": "p", "response_a": "a", "response_b": "b"}],
                                       "return_members": True}), SETTINGS)
    assert many.pairs.ids == ["7", "b"] and many.tta_swap is None and many.return_members
    assert many.pairs.prompts == [[], ["p"]] and many.pairs.responses_a == [[""], ["a"]]


def test_lone_surrogates_are_repaired_as_in_a_kaggle_file():
    parsed = parse_predict_request(b'{"prompt": "x\\ud800y", "response_a": "a", "response_b": "b"}', SETTINGS)
    assert parsed.pairs.prompts == [["x\ufffdy"]]


@pytest.mark.parametrize(("value", "path", "words"), [
    ({"pairs": [{"prompt": "p", "response_a": "a", "response_b": "b"}] * 3
      + [{"prompt": "p", "response_a": ["a", 5], "response_b": "b"}]}, "pairs[3].response_a[1]", "number"),
    ({"pairs": [{"prompt": "p", "response_a": "a"}]}, "pairs[0].response_b", "required"),
    ({"pairs": [{"prompt": "p", "response_a": "a", "response_b": "b", "winner": 1}]}, "pairs[0].winner", "unknown"),
    ({"pairs": [{"id": True, "prompt": "p", "response_a": "a", "response_b": "b"}]}, "pairs[0].id", "boolean"),
    ({"pairs": ["p"]}, "pairs[0]", "object"),
    ({"pairs": []}, "pairs", "non-empty"),
    ({"pairs": [{"prompt": "p", "response_a": "a", "response_b": "b"}], "extra": 1}, "extra", "unknown"),
    ({"prompt": {"text": "p"}, "response_a": "a", "response_b": "b"}, "prompt", "object"),
    ({"prompt": "p", "response_a": "a", "response_b": [None, ["b"]]}, "response_b[1]", "array"),
    ({"prompt": "p", "response_a": "a", "response_b": "b", "tta_swap": "yes"}, "tta_swap", "true, false"),
    ([1, 2], "(body)", "JSON object"),
])
def test_a_bad_value_is_refused_with_its_json_path(value, path, words):
    error = refused(body(value))
    assert (error.status, error.path) == (422, path) and words in error.message
    assert error.to_json()["error"]["path"] == path


def test_broken_json_and_limits():
    assert refused(b'{"prompt": ').status == 422
    too_many = {"pairs": [{"prompt": "p", "response_a": "a", "response_b": "b"}] * 5}
    assert refused(body(too_many)).status == 413
    assert refused(body({"prompt": "p" * 5000, "response_a": "a", "response_b": "b"})).status == 413


def test_a_test_file_is_read_by_the_kaggle_parser(tmp_path):
    frame = generate_pairs(6, seed=1)[["id", "prompt", "response_a", "response_b"]]
    frame.loc[2, "response_a"] = '["fine", null]'
    path = tmp_path / "test.csv"
    frame.to_csv(path, index=False)
    pairs = parse_test_file(path.read_bytes(), SETTINGS)
    expected = load_pairs(str(path), require_labels=False).frame
    assert pairs.ids == list(expected["id"]) and pairs.responses_a == list(expected["response_a"])
    assert pairs.responses_a[2] == ["fine", ""]

    frame.loc[4, "response_b"] = '["ok", 3]'
    frame.to_csv(path, index=False)
    with pytest.raises(RequestError) as caught:
        parse_test_file(path.read_bytes(), SETTINGS)
    row_id = str(frame.loc[4, "id"])
    assert caught.value.status == 422 and f"row id={row_id}" in caught.value.message
    assert "column response_b" in caught.value.message and str(tmp_path) not in caught.value.message
    assert "on_bad_rows" not in caught.value.message  # the job's skip hint does not apply to a request

    frame.loc[4, "response_b"] = '["ok"]'
    frame.to_csv(path, index=False)
    for limits in ({"max_file_rows": 5}, {"max_file_bytes": path.stat().st_size - 1}):
        with pytest.raises(RequestError) as caught:
            parse_test_file(path.read_bytes(), SETTINGS.model_copy(update=limits))
        assert caught.value.status == 413


def test_split_by_budget_keeps_every_group_under_the_budget():
    costs = [50, 60, 10, 100, 1, 1, 99]
    groups = split_by_budget(costs, 110)
    assert groups == [(0, 2), (2, 4), (4, 7)]  # greedy: each group as full as the budget allows
    assert all(sum(costs[a:b]) <= 110 for a, b in groups) and [a for a, _ in groups][1:] == [b for _, b in groups][:-1]
    with pytest.raises(ValueError, match="row 1 costs 120"):
        split_by_budget([1, 120], 110)
    assert split_by_budget([], 10) == []


def chunk(tokens: int, budget: int = 1000, max_items: int = 4) -> Chunk:
    return Chunk(PairBatch(["1"], [["p"]], [["a"]], [["b"]]), False, tokens, budget, max_items)


def test_a_batch_is_full_at_max_items_or_at_the_token_budget():
    # Serve's max_batch_size is max_items; a batch fits while batch_size_of <= max_items.
    assert batch_size_of([chunk(10)] * 4) == 4 and batch_size_of([chunk(10)] * 5) == 5
    assert batch_size_of([chunk(1000)]) == 4  # one chunk at the budget fills the batch
    assert batch_size_of([chunk(600), chunk(400)]) == 4 and batch_size_of([chunk(600), chunk(401)]) == 5
    assert batch_size_of([chunk(999, max_items=1)]) == 1 and batch_size_of([chunk(1, max_items=1)] * 2) == 2


def test_chunk_ranges_cover_the_rows_in_order():
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)] and chunk_ranges(0, 4) == []


def spec(priors=None, mode="prob") -> EnsembleSpec:
    return EnsembleSpec(
        members=(EnsembleMember(name="x", checkpoint="/x", weight=0.25, temperature=2.0),
                 EnsembleMember(name="y", checkpoint="/y", weight=0.75, temperature=0.5)),
        mode=mode, priors=priors, train_priors=None if priors is None else (0.4, 0.4, 0.2),
        report=EnsembleReport(n_rows=3, member_log_loss={"x": 1.0, "y": 1.0}, ensemble_log_loss=1.0))


def test_em_priors_are_refused_per_request_and_fixed_priors_are_not():
    with pytest.raises(RequestError) as caught:
        check_online_priors(spec("em"))
    assert caught.value.status == 409 and "/v1/predict/batch" in caught.value.message
    check_online_priors(spec((0.3, 0.3, 0.4)))
    check_online_priors(spec())


def test_the_response_holds_the_ensemble_and_each_member_at_its_temperature():
    logits = {"x": np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]), "y": np.array([[0.0, 0.0, 1.0], [3.0, 0.0, 0.0]])}
    request = parse_predict_request(body({"pairs": [{"id": 1, "prompt": "p", "response_a": "a", "response_b": "b"},
                                                    {"prompt": "p", "response_a": "a", "response_b": "b"}],
                                          "return_members": True}), SETTINGS)
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    response = build_predict_response(spec(), request, logits, probs, tta_swap=False)
    first, second = response["predictions"]
    assert first["id"] == "1" and second["id"] is None
    assert [second[c] for c in LABEL_COLUMNS] == [0.6, 0.3, 0.1]
    members = member_probabilities(spec(), logits)
    expected_x = np.exp(logits["x"] / 2.0) / np.exp(logits["x"] / 2.0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(members["x"], expected_x)
    assert [first["members"]["x"][c] for c in LABEL_COLUMNS] == pytest.approx(expected_x[0].tolist())


def test_submission_rows_are_what_write_submission_writes(tmp_path):
    ids = ["1", "2,3", "4"]
    probs = np.array([[0.2, 0.3, 0.5], [1.0, 1.0, 2.0], [1 / 3, 1 / 3, 1 / 3]])
    write_submission(ids, probs, str(tmp_path / "s.csv"))
    assert (tmp_path / "s.csv").read_text() == ",".join(["id", *LABEL_COLUMNS]) + "\n" + submission_rows(ids, probs)
    assert pd.read_csv(tmp_path / "s.csv", dtype={"id": str})["id"].tolist() == ids


def test_api_key():
    check_api_key(None, None)
    check_api_key("secret-key", "secret-key")
    for given in (None, "", "wrong"):
        with pytest.raises(RequestError) as caught:
            check_api_key("secret-key", given)
        assert caught.value.status == 401


def test_member_stats_count_batches_and_classes():
    stats = MemberStats()
    stats.record_batch([chunk(10), chunk(20)])
    stats.record_batch([chunk(5)])
    assert stats.record_classes(np.array([[0.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])) == dict(
        zip(LABEL_COLUMNS, [1, 1, 1]))
    summary = stats.to_dict()
    assert summary["calls_per_batch"] == {"1": 1, "2": 1} and summary["max_calls_per_batch"] == 2
    assert summary["tokens"] == 35 and summary["predicted_class"]["winner_tie"] == 1


def test_request_logs_hold_counts_and_never_texts():
    record = json.loads(request_log_record("POST", "/v1/predict", 200, 0.0123, 3, 2))
    assert record == {"event": "request", "method": "POST", "path": "/v1/predict", "status": 200,
                      "latency_ms": 12.3, "pairs": 3, "ids": 2}


def test_serve_args_are_validated_with_their_paths():
    with pytest.raises(ServeArgsError, match=r"serving\.max_batch_requests: .*greater than or equal to 1"):
        load_serve_args({"model": "x.json", "serving": {"max_batch_requests": 0}})
    with pytest.raises(ServeArgsError, match=r"serving: .*max_ongoing_requests \(8\) must be at least max_batch"):
        load_serve_args({"model": "x.json", "serving": {"max_batch_requests": 16, "member": {
            "max_ongoing_requests": 8, "max_queued_requests": 8}}})
    with pytest.raises(ServeArgsError, match=r"serving\.ingress: .*num_replicas or autoscaling_config"):
        load_serve_args({"model": "x.json", "serving": {"ingress": {
            "num_replicas": 1, "autoscaling_config": {"max_replicas": 2}, "max_ongoing_requests": 8,
            "max_queued_requests": 8}}})
    with pytest.raises(ServeArgsError, match=r"modle: .*[Ee]xtra"):
        load_serve_args({"modle": "x.json"})


def fake_checkpoint(directory, metrics) -> str:
    directory.mkdir()
    (directory / "arena.json").write_text(json.dumps({"format": 2, "labels": list(LABEL_COLUMNS), "config": {},
                                                      "metrics": metrics, "versions": {"torch": "t"}}))
    return str(directory)


def test_a_checkpoint_is_served_as_a_one_member_spec(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "epoch_001", {"valid_log_loss": 0.95, "valid_rows": 400.0})
    plan = build_serving_plan({"model": checkpoint, "overrides": ["predict.tta_swap=true"]})
    (member,) = plan.spec.members
    assert (member.name, member.checkpoint, member.weight, member.temperature) == ("epoch_001", checkpoint, 1.0, 1.0)
    assert plan.spec.priors is None and plan.spec.report.n_rows == 400 and plan.predict.tta_swap
    with pytest.raises(ValueError, match="no validation metrics"):
        spec_for_checkpoint(fake_checkpoint(tmp_path / "bare", {}))
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        build_serving_plan({"model": str(tmp_path / "missing")})


def test_a_spec_and_its_checkpoints_on_s3_make_a_serving_plan(tmp_path, s3):
    root = s3()
    checkpoint = storage.join(root, "epoch_001")
    local = fake_checkpoint(tmp_path / "epoch_001", {"valid_log_loss": 0.95, "valid_rows": 400.0})
    storage.upload_dir(local, checkpoint)
    plan = build_serving_plan({"model": checkpoint})  # its arena.json is read from a download
    (member,) = plan.spec.members
    assert (member.name, member.checkpoint, plan.spec.report.n_rows) == ("epoch_001", checkpoint, 400)
    spec_path = save_spec(plan.spec, storage.join(root, "ensemble.json"))
    assert build_serving_plan({"model": spec_path}).spec == plan.spec
    missing = member.model_copy(update={"checkpoint": storage.join(root, "epoch_009")})
    save_spec(plan.spec.model_copy(update={"members": (missing,)}), spec_path)
    with pytest.raises(FileNotFoundError, match=f"member 'epoch_001': checkpoint folder not found: {root}/epoch_009"):
        build_serving_plan({"model": spec_path})


def test_member_deployment_names_are_unique_and_valid():
    assert member_deployment_name(0, "sharp/fold0") == "member0-sharp_fold0"
    assert member_deployment_name(1, "sharp/fold0") != member_deployment_name(0, "sharp/fold0")


def test_the_openapi_request_schema_has_no_dangling_refs():
    text = json.dumps(predict_request_schema())
    assert "$ref" not in text and "pairs" in text and "response_a" in text
    assert "$ref" not in json.dumps(inline_schema(PredictIn))


def test_fault_injection_is_off_by_default():
    assert ServeSettings().fault_injection is False and FAULT_PROMPT


def test_importing_serving_loads_neither_torch_nor_ray():
    code = "import app.serving, sys; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


class TextModel:
    """A model without tokens (like tfidf_xgb's ClassicalPredictor, which is batched by count): logits from
    the texts' lengths."""

    meta = {"kind": "tfidf_xgb", "versions": {}}
    calls: list[tuple[int, bool]] = []

    def predict_logits(self, prompts, responses_a, responses_b, tta_swap=False, tta_combine="logit"):
        self.calls.append((len(prompts), tta_swap))
        logits = np.array([[len("".join(a)), len("".join(b)), len("".join(p))]
                           for p, a, b in zip(prompts, responses_a, responses_b)], dtype=float)
        return logits + (0.5 if tta_swap else 0.0)


def test_a_batch_is_scored_with_one_predict_logits_call_per_tta_setting():
    settings = ServeSettings(max_batch_requests=4)
    scorer = MemberScorer("xgb", "/unused", PredictConfig(), settings, predictor=TextModel())
    first = PairBatch(["1", "2"], [["p"], ["pp"]], [["a"], ["aaa"]], [["bb"], [""]])
    second = PairBatch(["3"], [["ppp"]], [["aaaa"]], [["b"]])
    chunks = scorer.chunks(first, tta_swap=False) + scorer.chunks(second, tta_swap=True) + scorer.chunks(
        second, tta_swap=False)
    assert [chunk.tokens for chunk in chunks] == [0, 0, 0] and batch_size_of(chunks) == 3
    logits = scorer.score(chunks)
    np.testing.assert_array_equal(logits[0], [[1, 2, 1], [3, 0, 2]])
    np.testing.assert_array_equal(logits[1], [[4.5, 1.5, 3.5]])
    np.testing.assert_array_equal(logits[2], [[4, 1, 3]])
    assert TextModel.calls == [(3, False), (1, True)]  # one call per TTA setting, chunks concatenated
    assert scorer.describe()["kind"] == "tfidf_xgb" and scorer.stats.to_dict()["calls"] == 3


def test_the_serve_config_file_is_a_valid_serve_config_for_build_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.http_options.host == "127.0.0.1"
    (application,) = config.applications
    assert application.import_path == "serve.app:build_app"
    args = load_serve_args(application.args)
    assert args.serving.member.autoscaling_config["max_replicas"] >= args.serving.member.autoscaling_config[
        "min_replicas"] >= 1
    assert args.serving.member.max_queued_requests >= args.serving.member.max_ongoing_requests
    assert "num_gpus" in args.serving.member.ray_actor_options and args.serving.api_key is None


def test_token_estimates_are_capped_at_max_length_and_over_count_english():
    short = estimate_tokens(["What is 2+2?"], ["4"], ["Four."], max_length=256)
    assert 12 <= short < 256
    assert estimate_tokens(["x" * 5000], ["a"], ["b"], max_length=256) == 256
    assert estimate_tokens([], [], [], max_length=256) == MARKER_TOKENS_PER_TURN


def test_the_batch_window_is_short_when_idle_and_lasts_the_running_batch_when_busy():
    window = BatchWindow(base_s=0.005, max_s=0.5)
    assert window.wait_s(now=10.0) == 0.005  # idle: a lone call is not held
    window.started(10.0)
    assert window.wait_s(10.0) == 0.005  # the first batch: its duration is not known yet
    window.finished(10.3)
    window.started(11.0)
    assert window.wait_s(11.1) == pytest.approx(0.2)  # 0.3 s batches, 0.1 s in: wait out the rest
    assert window.wait_s(11.4) == 0.005  # overdue: back to the base wait
    window.finished(12.0)
    window.started(13.0)
    assert window.wait_s(13.0) == 0.5  # capped at max_s
    window.finished(13.1)
    assert window.wait_s(14.0) == 0.005
