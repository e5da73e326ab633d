"""Online prediction: settings, request validation, token-budget batching of member work, responses.

The Serve app (`serve/app.py`) is a thin adapter over this module. An application is an ensemble spec
(`app.ensemble`); a single checkpoint is served as a one-member spec (weight 1, temperature 1, no prior
shift; `spec_for_checkpoint`). Each member scores pairs into logits (`MemberScorer`), and the ingress
combines them with `app.ensemble.apply_spec_to_member_logits`, the function `jobs/predict.py` uses.

Class priors "em" and "calibrated_em" (estimated on the rows being predicted) need a whole test set:
`/v1/predict/batch` estimates them over the whole uploaded file, as `jobs/predict.py` does, and says what was
applied in its response headers (`prior_shift_headers`); `/v1/predict` refuses a request with 409
(`check_online_priors`): EM on the few pairs of one request would move the probabilities by an amount that
depends on which pairs happen to share the request. As in `jobs/predict.py`, `predict.priors` (config or
overrides) replaces the spec's priors.

Nothing here imports Ray or torch at import time (the ingress never loads torch); `MemberScorer` and the
builders import the model code when they are called.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app import storage
from app.config import PredictConfig, load_config
from app.data import LABEL_COLUMNS, SKIP_HINT, DataValidationError, load_pairs, parse_turns
from app.ensemble import ESTIMATED_PRIORS, EnsembleMember, EnsembleReport, EnsembleSpec, combine, load_spec
from app.priors import PriorShift

CHARS_PER_TOKEN = 3  # English text averages about 4 characters per token; 3 over-counts most text
MARKER_TOKENS_PER_TURN = 12  # "Prompt:", "Response A:", "Response B:" and specials, about
FAULT_PROMPT = "__arena_serve_injected_fault__"  # with `fault_injection` on, a member raises on this prompt
PAIR_KEYS = ("id", "prompt", "response_a", "response_b")
TEXT_KEYS = PAIR_KEYS[1:]
OPTION_KEYS = ("tta_swap", "return_members")
SUBMISSION_HEADER = ",".join(("id", *LABEL_COLUMNS)) + "\n"
MAX_INT_DIGITS = 4300  # Python's default int() digit limit (sys.get_int_max_str_digits)
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_KINDS = {dict: "object", list: "array", int: "number", float: "number", bool: "boolean", str: "string"}


# ---------------------------------------------------------------------------------------------------------
# Settings: what `serve/config.yaml` passes to `build_app` as `args`.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentOptions(_Strict):
    """Ray Serve options of one deployment, passed to `Deployment.options`."""

    num_replicas: int | None = Field(None, ge=1, description="fixed replica count; unset with autoscaling_config")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve's autoscaling_config: min_replicas, max_replicas, target_ongoing_requests, ...")
    max_ongoing_requests: int = Field(ge=1, description="requests one replica holds at once")
    max_queued_requests: int = Field(ge=1, description="requests a caller queues for the replicas; beyond this, 503")
    ray_actor_options: dict[str, Any] = Field(default_factory=dict, description="num_cpus, num_gpus, ... per replica")

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self

    def as_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ServeSettings(_Strict):
    """Limits, batching and access of the online app (model settings come from the predict config)."""

    max_body_bytes: int = Field(8 << 20, ge=1024, description="/v1/predict: larger bodies get 413")
    max_pairs_per_request: int = Field(256, ge=1, description="/v1/predict: more pairs get 413")
    max_file_bytes: int = Field(64 << 20, ge=1024, description="/v1/predict/batch: larger files get 413")
    max_file_rows: int = Field(100_000, ge=1, description="/v1/predict/batch: more rows get 413")
    file_chunk_rows: int = Field(64, ge=1, description="/v1/predict/batch: rows per member call")
    file_chunks_in_flight: int = Field(4, ge=1, description="/v1/predict/batch: member calls in flight per file")
    batch_tokens: int = Field(16384, ge=64, description="most tokens in one member batch (both views with TTA)")
    max_batch_requests: int = Field(32, ge=1, description="most member calls in one batch; 1 turns batching off")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, description="how long a batch waits to fill, model idle")
    max_batch_wait_s: float = Field(0.25, ge=0.0, description="the longest wait, model busy (see BatchWindow)")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per member replica; None = Ray's default")
    api_key: str | None = Field(None, min_length=1, description="when set (or api_key_env is), /v1/* needs X-API-Key")
    api_key_env: str = Field("ARENA_SERVE_API_KEY", description="environment variable read when api_key is unset")
    ready_timeout_s: float = Field(2.0, gt=0.0, description="/readyz: how long each member has to answer")
    member_timeout_s: float = Field(
        45.0, gt=0.0, description="how long the ingress waits for a member's logits, queued and retried included; "
                                  "then 503. Keep it below http_options.request_timeout_s (the proxy's 408)")
    member_retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503 for a member without a live replica")
    fault_injection: bool = Field(False, description="tests only: a member raises on a pair with prompt FAULT_PROMPT")
    member: DeploymentOptions = DeploymentOptions(
        autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 32},
        max_ongoing_requests=64, max_queued_requests=128, ray_actor_options={"num_cpus": 1})
    ingress: DeploymentOptions = DeploymentOptions(
        num_replicas=1, max_ongoing_requests=256, max_queued_requests=512, ray_actor_options={"num_cpus": 0.5})

    @model_validator(mode="after")
    def _members_can_fill_a_batch(self) -> ServeSettings:
        if self.member.max_ongoing_requests < self.max_batch_requests:
            raise ValueError(f"member.max_ongoing_requests ({self.member.max_ongoing_requests}) must be at least "
                             f"max_batch_requests ({self.max_batch_requests}): a replica batches only the calls it "
                             "holds")
        return self


class ServeArgs(_Strict):
    """The application: what to serve, its predict config, and the serving settings."""

    model: str = Field(min_length=1, description="ensemble spec (.json, from jobs/ensemble.py) or checkpoint folder, "
                                                 "a local path or a URI (s3://...)")
    config: str | None = Field(None, description="YAML preset whose predict section applies (tta_swap, precision, ...)")
    overrides: tuple[str, ...] = Field((), description="section.key=value, e.g. predict.tta_swap=true")
    serving: ServeSettings = ServeSettings()


class ServeArgsError(ValueError):
    """The application's arguments are invalid; the message names each bad key by its path."""


def json_path(loc: Sequence[int | str]) -> str:
    """`("pairs", 3, "response_a", 1)` -> `pairs[3].response_a[1]`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    return path or "(top level)"


def load_serve_args(raw: Mapping[str, Any] | ServeArgs) -> ServeArgs:
    """Validate `build_app`'s arguments (a dict from serve/config.yaml or `serve run ... key=value`)."""
    if isinstance(raw, ServeArgs):
        return raw
    try:
        return ServeArgs.model_validate(dict(raw))
    except ValidationError as exc:
        lines = [f"  {json_path(error['loc'])}: {error['msg'].removeprefix('Value error, ')}" for error in exc.errors()]
        raise ServeArgsError("invalid serve app arguments:\n" + "\n".join(lines)) from None


@dataclass(frozen=True)
class ServingPlan:
    """Everything the deployments are built from."""

    spec: EnsembleSpec
    predict: PredictConfig
    settings: ServeSettings


def spec_for_checkpoint(checkpoint: str) -> EnsembleSpec:
    """A one-member spec for a checkpoint: weight 1, temperature 1, no prior shift, so its probabilities are
    softmax(logits), what `app.prediction.score_rows` gives. It carries the checkpoint's training class shares
    and prior calibration (arena.json `train_priors` and `prior_calibration`, when it has them) for
    `predict.priors`, and its validation log loss as report.

    Raises:
        FileNotFoundError / ValueError: not a checkpoint, or one without validation metrics in arena.json.
    """
    from app.modeling import read_checkpoint_meta
    from app.prediction import local_checkpoint

    meta, _ = read_checkpoint_meta(local_checkpoint(checkpoint))
    metrics = meta.get("metrics") or {}
    if "valid_log_loss" not in metrics or "valid_rows" not in metrics:
        raise ValueError(f"checkpoint {checkpoint} has no validation metrics (valid_log_loss, valid_rows) in its "
                         "arena.json; serve it through an ensemble spec from jobs/ensemble.py instead")
    name = os.path.basename(checkpoint.rstrip("/")) or "model"
    log_loss = float(metrics["valid_log_loss"])
    train_priors = meta.get("train_priors")
    return EnsembleSpec(
        members=(EnsembleMember(name=name, checkpoint=checkpoint, weight=1.0, temperature=1.0),), mode="prob",
        priors=None, train_priors=None if train_priors is None else tuple(train_priors),
        prior_calibration=meta.get("prior_calibration"), versions=dict(meta.get("versions") or {}),
        report=EnsembleReport(n_rows=int(metrics["valid_rows"]), member_log_loss={name: log_loss},
                              ensemble_log_loss=log_loss))


def build_serving_plan(raw: Mapping[str, Any] | ServeArgs) -> ServingPlan:
    """Validate the arguments, load the spec (or build one for a checkpoint) and the predict config, whose
    `predict.priors` replace the spec's as they do in `jobs/predict.py`.

    Raises:
        ServeArgsError, ConfigError, EnsembleSpecError, FileNotFoundError: each naming what is wrong.
    """
    from app.prediction import is_spec_path, with_predict_options

    args = load_serve_args(raw)
    predict = load_config(args.config, list(args.overrides)).predict
    spec = load_spec(args.model) if is_spec_path(args.model) else spec_for_checkpoint(args.model)
    spec = with_predict_options(spec, predict)
    for member in spec.members:
        if not storage.is_dir(member.checkpoint):  # a local folder, or a URI each member replica downloads
            raise FileNotFoundError(f"member '{member.name}': checkpoint folder not found: {member.checkpoint}")
    return ServingPlan(spec, predict, args.serving)


def member_deployment_name(index: int, name: str) -> str:
    """A Serve deployment name for a member (names like `sharp/fold0` hold characters Serve refuses)."""
    return f"member{index}-{re.sub(r'[^A-Za-z0-9_-]+', '_', name)}"


# ---------------------------------------------------------------------------------------------------------
# Requests


class RequestError(Exception):
    """A request the app refuses or could not serve: HTTP status, a message, and the JSON path at fault. A 503
    says in `retry_after_s` when to try again (its Retry-After header)."""

    def __init__(self, status: int, message: str, path: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.status, self.message, self.path, self.retry_after_s = status, message, path, retry_after_s

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_s)} if self.status == 503 else None

    def to_json(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "message": self.message, "path": self.path}}


@dataclass(frozen=True)
class PairBatch:
    """Validated pairs, column-wise: turn lists as `app.data.load_pairs` gives them (null turns are "")."""

    ids: list[str | None]
    prompts: list[list[str]]
    responses_a: list[list[str]]
    responses_b: list[list[str]]

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, start: int, stop: int) -> PairBatch:
        return PairBatch(self.ids[start:stop], self.prompts[start:stop], self.responses_a[start:stop],
                         self.responses_b[start:stop])

    def texts(self) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
        return self.prompts, self.responses_a, self.responses_b


@dataclass(frozen=True)
class PredictRequest:
    pairs: PairBatch
    tta_swap: bool | None  # None: the predict config's default
    return_members: bool


def check_size(size: int, limit: int, what: str) -> None:
    """413 past a limit."""
    if size > limit:
        raise RequestError(413, f"{what} is {size}, more than the limit of {limit}; split it into smaller requests")


def _kind(value: object) -> str:
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _parse_text(value: object, path: str, row: str, column: str) -> list[str]:
    if isinstance(value, str):
        turns: list[str | None] = [value]
    elif isinstance(value, list):
        for index, turn in enumerate(value):
            if turn is not None and not isinstance(turn, str):
                raise RequestError(422, f"a turn must be a string or null, got a JSON {_kind(turn)}",
                                   f"{path}[{index}]")
        turns = value
    else:
        raise RequestError(422, f"must be a string or a list of turns (strings or null), got a JSON {_kind(value)}",
                           path)
    # The Kaggle cell parser, so a pair means here what the same row means in a test.csv: null turns become
    # "" and lone surrogates U+FFFD.
    return parse_turns(json.dumps(turns), row, column)


def _parse_pair(value: object, path: str) -> tuple[str | None, list[str], list[str], list[str]]:
    where = path or "(body)"
    if not isinstance(value, dict):
        raise RequestError(422, f"a pair must be a JSON object with {', '.join(TEXT_KEYS)} (and an optional id), "
                                f"got a JSON {_kind(value)}", where)
    for key in value:
        if key not in PAIR_KEYS:
            raise RequestError(422, f"unknown key; a pair has {', '.join(PAIR_KEYS)}", _join(path, key))
    for key in TEXT_KEYS:
        if key not in value:
            raise RequestError(422, "required", _join(path, key))
    row_id = value.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        raise RequestError(422, f"must be a string, an integer or null, got a JSON {_kind(row_id)}", _join(path, "id"))
    if isinstance(row_id, str) and _SURROGATE.search(row_id):  # it is echoed back, and UTF-8 cannot carry it
        raise RequestError(422, "holds a lone surrogate (an unpaired \\ud800-\\udfff escape); send valid Unicode",
                           _join(path, "id"))
    row = where if row_id is None else str(row_id)
    texts = [_parse_text(value[key], _join(path, key), row, key) for key in TEXT_KEYS]
    return (None if row_id is None else str(row_id)), *texts


def _unique_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: a key given twice is refused (parsers differ on which one wins)."""
    data = dict(items)
    if len(data) < len(items):
        seen: set[str] = set()
        key = next(key for key, _ in items if key in seen or seen.add(key))
        raise RequestError(422, f'duplicate key "{key}"; give each key of a JSON object once', "(body)")
    return data


def _parse_int(digits: str) -> int:
    """json.loads' parse_int: a 422 past Python's digit limit for int() (a ValueError that is not a
    JSONDecodeError)."""
    if len(digits) > MAX_INT_DIGITS:
        raise RequestError(422, f"a number of {len(digits)} digits; numbers here have at most {MAX_INT_DIGITS} digits",
                           "(body)")
    return int(digits)


def _parse_flag(data: Mapping[str, object], key: str) -> bool | None:
    value = data.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(422, f"must be true, false or null, got a JSON {_kind(value)}", key)
    return value


def parse_predict_request(body: bytes, settings: ServeSettings) -> PredictRequest:
    """Validate a /v1/predict body: one pair `{id?, prompt, response_a, response_b}` or `{"pairs": [...]}`,
    plus the options `tta_swap` and `return_members`.

    Raises:
        RequestError: 413 past the body or pair limit; 422 naming the JSON path of the bad value, e.g.
            `pairs[3].response_a[1]`.
    """
    check_size(len(body), settings.max_body_bytes, "the body's size in bytes")
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys, parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(422, f"the body is not valid JSON ({exc})", "(body)") from None
    except RecursionError:
        raise RequestError(422, "the body is nested too deeply (a request nests 4 levels at most)", "(body)") from None
    if not isinstance(data, dict):
        raise RequestError(422, 'the body must be a JSON object: one pair, or {"pairs": [...]}', "(body)")
    if "pairs" in data:
        for key in data:
            if key not in ("pairs", *OPTION_KEYS):
                raise RequestError(422, f"unknown key; the body has pairs, {', '.join(OPTION_KEYS)}", key)
        raw_pairs = data["pairs"]
        if not isinstance(raw_pairs, list) or not raw_pairs:
            raise RequestError(422, "must be a non-empty list of pairs", "pairs")
        check_size(len(raw_pairs), settings.max_pairs_per_request, "the number of pairs")
        items = [(f"pairs[{index}]", pair) for index, pair in enumerate(raw_pairs)]
    else:
        items = [("", {key: value for key, value in data.items() if key not in OPTION_KEYS})]
    parsed = [_parse_pair(pair, path) for path, pair in items]
    pairs = PairBatch(*(list(column) for column in zip(*parsed)))
    return PredictRequest(pairs, _parse_flag(data, "tta_swap"), bool(_parse_flag(data, "return_members")))


def parse_test_file(body: bytes, settings: ServeSettings) -> PairBatch:
    """Validate a /v1/predict/batch body, a Kaggle test.csv, with `app.data.load_pairs` (label columns, if
    any, are ignored).

    Raises:
        RequestError: 413 past the size or row limit; 422 naming the row id and column of a bad row.
    """
    check_size(len(body), settings.max_file_bytes, "the file's size in bytes")
    with tempfile.TemporaryDirectory(prefix="arena_serve_") as scratch:
        path = os.path.join(scratch, "body.csv")
        with open(path, "wb") as handle:
            handle.write(body)
        try:
            frame = load_pairs(path, require_labels=False).frame
        except DataValidationError as exc:
            message = str(exc).replace(path, "the uploaded file").replace(f", or {SKIP_HINT}", "")
            raise RequestError(422, message) from None
    check_size(len(frame), settings.max_file_rows, "the number of rows")
    return PairBatch(list(frame["id"]), list(frame["prompt"]), list(frame["response_a"]), list(frame["response_b"]))


def chunk_ranges(n_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    """[start, stop) ranges that cover n_rows in order."""
    return [(start, min(start + rows_per_chunk, n_rows)) for start in range(0, n_rows, rows_per_chunk)]


def check_online_priors(spec: EnsembleSpec) -> None:
    """/v1/predict refuses a spec whose priors are estimated by EM (see the module docstring)."""
    if spec.priors in ESTIMATED_PRIORS:
        raise RequestError(409, f'this ensemble estimates class priors by EM over the rows it predicts ("priors": '
                                f'"{spec.priors}"), which needs a whole test set; post the file to /v1/predict/batch, '
                                "or serve a spec with fixed priors or none")


def prior_shift_headers(record: PriorShift | None) -> dict[str, str]:
    """/v1/predict/batch response headers that say what the class-prior shift did: the method, the priors
    applied ("none" when the output is unadjusted), and for EM the estimate, convergence, fallback and why."""
    if record is None:
        return {"X-Arena-Priors": "none"}
    headers = {"X-Arena-Priors": record.method,
               "X-Arena-Prior-Applied": _shares(record.applied_priors),
               "X-Arena-Prior-Fallback": str(record.fallback).lower()}
    if record.estimated_priors is not None:
        headers.update({"X-Arena-Prior-Estimate": _shares(record.estimated_priors),
                        "X-Arena-Prior-Converged": str(record.converged).lower(),
                        "X-Arena-Prior-Iterations": str(record.n_iter)})
    if record.reason:
        headers["X-Arena-Prior-Reason"] = record.reason.encode("ascii", "replace").decode("ascii")
    return headers


def _shares(values: Sequence[float] | None) -> str:
    return "none" if values is None else ",".join(f"{value:.6f}" for value in values)


def check_api_key(expected: str | None, given: str | None) -> None:
    """401 unless the request carries the key (when one is configured)."""
    if expected is not None and not hmac.compare_digest(expected.encode(), (given or "").encode()):
        raise RequestError(401, "missing or wrong API key; send it in the X-API-Key header")


def resolve_api_key(settings: ServeSettings) -> str | None:
    """The configured key, else the one in $`api_key_env`, else None (no key needed)."""
    return settings.api_key or os.environ.get(settings.api_key_env) or None


# ---------------------------------------------------------------------------------------------------------
# Member side: chunks by estimated tokens, each batch encoded and scored on one thread


class InjectedFault(RuntimeError):
    """Raised by a member on FAULT_PROMPT when `fault_injection` is on (tests of the 500 path)."""


@dataclass
class Chunk:
    """Rows of one call, the unit `@serve.batch` queues, with their estimated token cost (0 for a model
    without tokens, e.g. tfidf_xgb, which is batched by count)."""

    pairs: PairBatch
    tta_swap: bool
    tokens: int
    token_budget: int
    max_items: int


def batch_size_of(chunks: Sequence[Chunk]) -> int:
    """`@serve.batch`'s batch_size_fn, with max_batch_size = max_items: a batch is full at max_items chunks
    or at token_budget tokens, whichever comes first (tokens are scaled so that the budget maps to max_items)."""
    first = chunks[0]
    tokens = sum(chunk.tokens for chunk in chunks)
    return max(len(chunks), -(-tokens * first.max_items // first.token_budget))


def estimate_tokens(prompt: Sequence[str], response_a: Sequence[str], response_b: Sequence[str],
                    max_length: int) -> int:
    """A pair's tokens, from its characters, before encoding: at most max_length (the encoder truncates to
    it), and at least as many as CHARS_PER_TOKEN allows for all but unusual text, plus the turn markers.

    Exact lengths are known only after encoding, which happens inside a batch (one tokenizer call for all
    of it, on the thread that runs the model), so batches are sized by this estimate."""
    n_turns = max(len(prompt), len(response_a), len(response_b), 1)
    chars = sum(len(turn) for turns in (prompt, response_a, response_b) for turn in turns)
    return min(max_length, -(-chars // CHARS_PER_TOKEN) + MARKER_TOKENS_PER_TURN * n_turns)


def split_by_budget(costs: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) groups of rows whose costs sum to at most `budget` each."""
    groups: list[tuple[int, int]] = []
    start, total = 0, 0
    for index, cost in enumerate(costs):
        if cost > budget:
            raise ValueError(f"row {index} costs {cost} tokens, more than the batch budget of {budget}")
        if total + cost > budget:
            groups.append((start, index))
            start, total = index, 0
        total += cost
    if start < len(costs):
        groups.append((start, len(costs)))
    return groups


class BatchWindow:
    """How long `@serve.batch` waits to fill the next batch, set before each call is queued.

    Serve forms the next batch while the current one runs, from the calls that arrive within the wait, and
    queues it behind the running one: with a fixed short wait, a busy model gets many small batches. So
    while a batch runs, the wait is the time left in it (judged by the last batch's duration, at least the
    base wait, at most `max_s`), and the next batch collects every call that arrives meanwhile; while the
    model is idle it is the base wait, so a lone request is not held back. Used from one event loop.
    """

    def __init__(self, base_s: float, max_s: float) -> None:
        self.base_s, self.max_s = base_s, max(base_s, max_s)
        self.running_since: float | None = None
        self.last_s = 0.0

    def wait_s(self, now: float) -> float:
        if self.running_since is None:
            return self.base_s
        return min(self.max_s, max(self.base_s, self.last_s - (now - self.running_since)))

    def started(self, now: float) -> None:
        self.running_since = now

    def finished(self, now: float) -> None:
        if self.running_since is not None:
            self.last_s, self.running_since = now - self.running_since, None


@dataclass
class MemberStats:
    """What one replica has done; /v1/models shows it (batch sizes are the observable effect of batching)."""

    batches: int = 0
    calls: int = 0
    rows: int = 0
    tokens: int = 0
    in_flight: int = 0  # calls this replica holds now (encoding, queued for a batch, or in one)
    max_in_flight: int = 0
    score_seconds: float = 0.0  # batches (encoding and forward passes), summed
    batch_calls: dict[int, int] = field(default_factory=dict)  # chunks per batch -> batches
    predicted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LABEL_COLUMNS, 0))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def record_batch(self, chunks: Sequence[Chunk], seconds: float = 0.0) -> None:
        with self.lock:
            self.score_seconds += seconds
            self.batches += 1
            self.calls += len(chunks)
            self.rows += sum(len(chunk.pairs) for chunk in chunks)
            self.tokens += sum(chunk.tokens for chunk in chunks)  # estimated
            self.batch_calls[len(chunks)] = self.batch_calls.get(len(chunks), 0) + 1

    def record_classes(self, logits: np.ndarray) -> dict[str, int]:
        """Count the predicted class (argmax) of each row; returns this call's counts."""
        counts = np.bincount(np.argmax(logits, axis=1), minlength=len(LABEL_COLUMNS))
        with self.lock:
            for column, count in zip(LABEL_COLUMNS, counts.tolist()):
                self.predicted[column] += count
        return dict(zip(LABEL_COLUMNS, counts.tolist()))

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"batches": self.batches, "calls": self.calls, "rows": self.rows, "tokens": self.tokens,
                    "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                    "score_ms_per_batch": round(1000 * self.score_seconds / max(self.batches, 1), 2),
                    "max_calls_per_batch": max(self.batch_calls, default=0),
                    "calls_per_batch": {str(size): count for size, count in sorted(self.batch_calls.items())},
                    "predicted_class": dict(self.predicted)}


class MemberScorer:
    """One member's checkpoint, loaded once (`app.inference.load_predictor`): cuts calls into chunks and scores
    batches of chunks into (N, 3) logits with the predictor's own `predict_logits` (the training truncation
    policy, length-sorted token-budget forward passes, the A/B swap view merged as in batch prediction).

    A call is cut into chunks of at most `batch_tokens` estimated tokens (`estimate_tokens`, both views with
    TTA). A batch is scored on one thread: every chunk's pairs encoded together and run through the model,
    one `predict_logits` per TTA setting. (Encoding each call on arrival, on another thread, starves under
    the GIL while the model runs, and batches stay small.)
    """

    def __init__(self, name: str, checkpoint: str, predict: PredictConfig, settings: ServeSettings,
                 predictor: Any = None) -> None:
        """`predictor` replaces the one loaded from `checkpoint` (tests)."""
        self.name, self.checkpoint, self.settings = name, checkpoint, settings
        self.tta_combine = predict.tta_combine
        if predictor is None:
            from app.inference import load_predictor
            from app.prediction import local_checkpoint

            predictor = load_predictor(local_checkpoint(checkpoint), predict.tokens_per_batch,
                                       num_threads=settings.torch_threads, precision=predict.precision)
        self.predictor = predictor
        self.max_length = predictor.config.format.max_length if hasattr(predictor, "encoder") else None
        if self.max_length is not None and settings.batch_tokens < 2 * self.max_length:
            raise ValueError(f"serving.batch_tokens={settings.batch_tokens} cannot hold one pair with its swapped view "
                             f"for member '{name}' (2 x format.max_length {self.max_length}); raise it")
        self.stats = MemberStats()

    def chunks(self, pairs: PairBatch, tta_swap: bool) -> list[Chunk]:
        """The call cut into chunks of at most batch_tokens estimated tokens (one chunk for a model without
        tokens)."""
        if self.settings.fault_injection and any(FAULT_PROMPT in turns for turns in pairs.prompts):
            raise InjectedFault(f"member '{self.name}': fault injected on request (serving.fault_injection is on)")
        budget, max_items = self.settings.batch_tokens, self.settings.max_batch_requests
        if self.max_length is None:
            return [Chunk(pairs, tta_swap, 0, budget, max_items)]
        views = 2 if tta_swap else 1
        costs = [views * estimate_tokens(*row, self.max_length) for row in zip(*pairs.texts())]
        return [Chunk(pairs.rows(start, stop), tta_swap, sum(costs[start:stop]), budget, max_items)
                for start, stop in split_by_budget(costs, budget)]

    def score(self, chunks: Sequence[Chunk]) -> list[np.ndarray]:
        """(rows, 3) logits per chunk: one predict_logits call per TTA setting over the chunks' pairs."""
        started = time.perf_counter()
        results: list[np.ndarray] = [np.empty((0, 3))] * len(chunks)
        for tta_swap in (False, True):
            indices = [i for i, chunk in enumerate(chunks) if chunk.tta_swap == tta_swap]
            if not indices:
                continue
            columns = zip(*(chunks[i].pairs.texts() for i in indices))  # per column: each chunk's rows
            logits = self.predictor.predict_logits(*([row for part in column for row in part] for column in columns),
                                                   tta_swap=tta_swap, tta_combine=self.tta_combine)
            cursor = 0
            for i in indices:
                results[i] = logits[cursor : cursor + len(chunks[i].pairs)]
                cursor += len(chunks[i].pairs)
        self.stats.record_batch(chunks, time.perf_counter() - started)
        return results

    def describe(self) -> dict[str, Any]:
        meta = self.predictor.meta
        return {"name": self.name, "checkpoint": self.checkpoint, "base_model": meta.get("base_model"),
                "kind": meta.get("kind"), "adapter": meta.get("adapter"), "max_length": self.max_length,
                "versions": meta.get("versions", {}), "stats": self.stats.to_dict()}


# ---------------------------------------------------------------------------------------------------------
# Ingress side: combine, respond


def member_probabilities(spec: EnsembleSpec, member_logits: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each member's own (N, 3) probabilities at its temperature (what the ensemble combines)."""
    return {m.name: combine([member_logits[m.name]], [1.0], spec.mode, [m.temperature]) for m in spec.members}


def _probabilities(row: np.ndarray) -> dict[str, float]:
    return {column: float(value) for column, value in zip(LABEL_COLUMNS, row)}


def build_predict_response(spec: EnsembleSpec, request: PredictRequest, member_logits: Mapping[str, np.ndarray],
                           probs: np.ndarray, tta_swap: bool) -> dict[str, Any]:
    """The /v1/predict answer: per pair, the ensemble's probabilities `probs` (from
    `apply_spec_to_member_logits`), and each member's when asked."""
    members = member_probabilities(spec, member_logits) if request.return_members else {}
    predictions = []
    for row, row_id in enumerate(request.pairs.ids):
        prediction: dict[str, Any] = {"id": row_id, **_probabilities(probs[row])}
        if request.return_members:
            prediction["members"] = {name: _probabilities(values[row]) for name, values in members.items()}
        predictions.append(prediction)
    return {"predictions": predictions, "tta_swap": tta_swap, "priors": _priors_label(spec)}


def _priors_label(spec: EnsembleSpec) -> str | list[float] | None:
    return list(spec.priors) if isinstance(spec.priors, tuple) else spec.priors


def submission_rows(ids: Sequence[str], probs: np.ndarray) -> str:
    """submission.csv rows (no header) exactly as `app.data.write_submission` writes them: each row
    renormalised to sum to 1, 8 decimals."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")  # quotes as pandas does (ids with commas or quotes)
    writer.writerows([row_id, *(f"{value:.8f}" for value in row)] for row_id, row in zip(ids, probs.tolist()))
    return text.getvalue()


def describe_service(spec: EnsembleSpec, predict: PredictConfig, settings: ServeSettings,
                     members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The /v1/models answer: the spec's members with their weights and temperatures, and each member
    replica's description and stats."""
    by_name = {member["name"]: member for member in members}
    return {
        "labels": list(LABEL_COLUMNS), "mode": spec.mode, "priors": _priors_label(spec),
        "train_priors": None if spec.train_priors is None else list(spec.train_priors),
        "online_priors": ("refused (use /v1/predict/batch)" if spec.priors in ESTIMATED_PRIORS
                          else "applied per request"),
        "tta_swap_default": predict.tta_swap, "precision": predict.precision,
        "batching": {"max_batch_requests": settings.max_batch_requests, "batch_tokens": settings.batch_tokens,
                     "batch_wait_timeout_s": settings.batch_wait_timeout_s},
        "versions": dict(spec.versions), "report": spec.report.model_dump(mode="json"),
        "members": [{"name": m.name, "weight": m.weight, "temperature": m.temperature, "checkpoint": m.checkpoint,
                     **{k: v for k, v in by_name.get(m.name, {}).items() if k not in ("name", "checkpoint")}}
                    for m in spec.members],
    }


def request_log_record(method: str, path: str, status: int, seconds: float, n_pairs: int | None,
                       n_ids: int | None) -> str:
    """One JSON log line per request: counts and timing, never the texts."""
    return json.dumps({"event": "request", "method": method, "path": path, "status": status,
                       "latency_ms": round(seconds * 1000, 2), "pairs": n_pairs, "ids": n_ids}, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# OpenAPI document models (the handlers validate with the functions above, which name JSON paths)

Text = str | list[str | None]


class PairIn(BaseModel):
    id: str | int | None = Field(None, description="echoed back")
    prompt: Text = Field(description="a string, or a list of turns (null turns allowed)")
    response_a: Text
    response_b: Text


class PredictIn(BaseModel):
    pairs: list[PairIn] = Field(min_length=1)
    tta_swap: bool | None = Field(None, description="also score with A and B exchanged; default: predict.tta_swap")
    return_members: bool = Field(False, description="add each member's probabilities")


class Probabilities(BaseModel):
    winner_model_a: float
    winner_model_b: float
    winner_tie: float


class PredictionOut(Probabilities):
    id: str | None
    members: dict[str, Probabilities] | None = None


class PredictOut(BaseModel):
    predictions: list[PredictionOut]
    tta_swap: bool
    priors: str | list[float] | None


class ErrorBody(BaseModel):
    status: int
    message: str
    path: str | None


class ErrorOut(BaseModel):
    error: ErrorBody


def inline_schema(model: type[BaseModel] | Any) -> dict[str, Any]:
    """A model's JSON schema with its $defs inlined, for an OpenAPI requestBody (where #/$defs refs break)."""
    schema = model.model_json_schema() if isinstance(model, type) else model
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


def predict_request_schema() -> dict[str, Any]:
    """/v1/predict's body: {"pairs": [...], options} or one pair with the options beside it."""
    single = inline_schema(PairIn)
    single["properties"].update({key: inline_schema(PredictIn)["properties"][key] for key in OPTION_KEYS})
    return {"anyOf": [inline_schema(PredictIn), single]}

