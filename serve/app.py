"""The Ray Serve app: one deployment per ensemble member, and a FastAPI ingress that fans out and combines.

    serve run serve/config.yaml                       # the settings in the file; `make serve` for the demo
    serve run serve.app:build_app model=runs/demo/epoch_001

Everything that decides anything is in `app.serving` (validation, batching, responses) and `app.ensemble`
(combining); this module wires it to Serve and HTTP.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures of the Serve ingress class
# at runtime, and string annotations there name types it cannot find.
import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter

from app import serving
from app.config import PredictConfig
from app.data import LABEL_COLUMNS
from app.ensemble import ESTIMATED_PRIORS, EnsembleSpec, apply_spec, apply_spec_to_member_logits

logger = logging.getLogger("ray.serve")
ERROR_RESPONSES = {code: {"model": serving.ErrorOut} for code in (401, 409, 413, 422, 500, 503)}
# A member call that ended with its replica (the actor died, its node went) or found the deployment without one.
REPLICA_LOST = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)
api = FastAPI(title="arena-prefs", version="1",
              description="Probabilities that a person prefers response A, response B, or neither (tie).")


def predicted_class_counter() -> Counter:
    return Counter("arena_predicted_class", description="Pairs by predicted class (argmax), per member and for "
                   "the ensemble.", tag_keys=("member", "predicted_class"))


# Defined before the deployments: `serve.ingress` freezes a copy of `api` (routes, middleware, handlers, and
# the module-level names they use) when it decorates the class.
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        serving.check_size(int(declared), limit, "the body's size in bytes")
    body = bytearray()
    async for piece in request.stream():
        body.extend(piece)
        serving.check_size(len(body), limit, "the body's size in bytes")
    return bytes(body)


@api.exception_handler(serving.RequestError)
async def request_error(request: Request, exc: serving.RequestError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=exc.headers())


@api.exception_handler(RequestValidationError)
async def parameter_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation (the query parameters), in the ErrorOut shape."""
    error = exc.errors()[0]
    where = serving.json_path([part for part in error["loc"] if part not in ("query", "body")])
    return await request_error(request, serving.RequestError(422, error["msg"], where))


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's 404 and 405, in the ErrorOut shape."""
    response = await request_error(request, serving.RequestError(exc.status_code, str(exc.detail)))
    response.headers.update(exc.headers or {})
    return response


@api.middleware("http")
async def log_request(request: Request, call_next: Any) -> Any:
    """One JSON log line per request, without its texts."""
    started = time.perf_counter()
    path = request.url.path.removeprefix(request.scope.get("root_path", "")) or "/"
    response = await call_next(request)
    pairs, ids = getattr(request.state, "counts", (None, None))
    logger.info(serving.request_log_record(request.method, path, response.status_code,
                                           time.perf_counter() - started, pairs, ids))
    return response


@serve.deployment
class Member:
    """One ensemble member: its checkpoint loaded once per replica (a URI is downloaded to the replica's node
    first); calls batched by tokens and count."""

    def __init__(self, name: str, checkpoint: str, predict: PredictConfig, settings: serving.ServeSettings) -> None:
        self.scorer = serving.MemberScorer(name, checkpoint, predict, settings)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.predicted = predicted_class_counter()
        # Batches are encoded and scored on this one thread; the event loop only queues calls.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.window = serving.BatchWindow(settings.batch_wait_timeout_s, settings.max_batch_wait_s)
        self.score_batch.set_max_batch_size(settings.max_batch_requests)

    async def score(self, pairs: serving.PairBatch, tta_swap: bool) -> np.ndarray:
        """(N, 3) logits of the pairs."""
        self.scorer.stats.enter()
        try:
            chunks = self.scorer.chunks(pairs, tta_swap)
            self.score_batch.set_batch_wait_timeout_s(self.window.wait_s(time.monotonic()))
            logits = np.concatenate(await asyncio.gather(*(self.score_batch(chunk) for chunk in chunks)))
        finally:
            self.scorer.stats.leave()
        for column, count in self.scorer.stats.record_classes(logits).items():
            if count:
                self.predicted.inc(count, tags={"member": self.scorer.name, "predicted_class": column})
        return logits

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=serving.batch_size_of)
    async def score_batch(self, chunks: list[serving.Chunk]) -> list[np.ndarray]:
        self.window.started(time.monotonic())
        try:
            return await asyncio.get_running_loop().run_in_executor(self.model_thread, self.scorer.score, chunks)
        finally:
            self.window.finished(time.monotonic())

    def describe(self) -> dict[str, Any]:
        return {**self.scorer.describe(), "replica": self.replica}

    def ready(self) -> bool:
        return True


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP: validates, fans out to every member concurrently, combines with the spec."""

    def __init__(self, spec: EnsembleSpec, predict: PredictConfig, settings: serving.ServeSettings,
                 members: dict[str, DeploymentHandle]) -> None:
        self.spec, self.predict_config, self.settings, self.members = spec, predict, settings, members
        self.api_key = serving.resolve_api_key(settings)
        self.predicted = predicted_class_counter()

    def _authorize(self, request: Request) -> None:
        """401 without the configured X-API-Key (every /v1/* route; probes and the OpenAPI document stay open)."""
        serving.check_api_key(self.api_key, request.headers.get("x-api-key"))

    async def _member_logits(self, pairs: serving.PairBatch, tta_swap: bool) -> dict[str, np.ndarray]:
        names = list(self.members)
        results = await asyncio.gather(*(self._call(name, "score", pairs, tta_swap) for name in names),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return dict(zip(names, results))

    async def _call(self, name: str, method: str, *args: Any) -> Any:
        """Member `name`'s `method(*args)` within `member_timeout_s`, or a RequestError: 503 when the member has no
        live replica that answers in time or its queue is full, 500 when the member itself fails.

        A call cut short by the end of its replica (its node lost) is sent once more: a member's methods are
        idempotent, and Serve routes the retry to another replica, or holds it until the replacement is up.
        """
        timeout_s, retry_after_s = self.settings.member_timeout_s, self.settings.member_retry_after_s
        deadline = time.monotonic() + timeout_s
        lost: BaseException | None = None
        for attempt in range(2):
            response = getattr(self.members[name], method).remote(*args)
            try:
                return await asyncio.wait_for(response, max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                response.cancel()
                why = f"its replica went ({type(lost).__name__}) and none" if lost else "no replica"
                raise serving.RequestError(503, f"member '{name}': {why} answered within {timeout_s:g} s; retry "
                                                "later", retry_after_s=retry_after_s) from None
            except BackPressureError:
                raise serving.RequestError(503, f"member '{name}' is at capacity (its queue is full); retry "
                                                "later") from None
            except REPLICA_LOST as error:
                lost = error
                logger.warning(f"member '{name}': its replica is gone ({type(error).__name__}), "
                               f"{'sending the call again' if attempt == 0 else 'giving up'}")
            except Exception as error:  # the member's own failure (a RayTaskError carrying its exception)
                cause = getattr(error, "cause", None) or error
                logger.error(f"member '{name}' failed: {type(cause).__name__}: {cause}")
                raise serving.RequestError(500, f"member '{name}' failed: {type(cause).__name__}: {cause}") from None
        raise serving.RequestError(503, f"member '{name}' lost its replica twice ({type(lost).__name__}); retry later",
                                   retry_after_s=retry_after_s)

    def _count(self, probs: np.ndarray) -> None:
        for column, count in zip(LABEL_COLUMNS, np.bincount(probs.argmax(axis=1), minlength=3).tolist()):
            if count:
                self.predicted.inc(count, tags={"member": "ensemble", "predicted_class": column})

    @api.post("/v1/predict", response_model=serving.PredictOut, responses=ERROR_RESPONSES,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": serving.predict_request_schema()}}}})
    async def predict(self, request: Request) -> JSONResponse:
        """Probabilities for one pair or a list of pairs."""
        self._authorize(request)
        parsed = serving.parse_predict_request(await read_body(request, self.settings.max_body_bytes), self.settings)
        request.state.counts = (len(parsed.pairs), sum(i is not None for i in parsed.pairs.ids))
        serving.check_online_priors(self.spec)
        tta_swap = self.predict_config.tta_swap if parsed.tta_swap is None else parsed.tta_swap
        member_logits = await self._member_logits(parsed.pairs, tta_swap)
        probs = apply_spec_to_member_logits(self.spec, member_logits)  # as jobs/predict.py combines them
        self._count(probs)
        return JSONResponse(serving.build_predict_response(self.spec, parsed, member_logits, probs, tta_swap))

    @api.post("/v1/predict/batch", response_class=StreamingResponse,
              responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}, **ERROR_RESPONSES},
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"text/csv": {"schema": {"type": "string"}}}}})
    async def predict_file(self, request: Request, tta_swap: bool | None = None) -> StreamingResponse:
        """A Kaggle test.csv in, submission.csv out (streamed in row order; "em" / "calibrated_em" priors over the
        whole file, what was applied in the X-Arena-Prior* headers)."""
        self._authorize(request)
        body = await read_body(request, self.settings.max_file_bytes)
        pairs = await asyncio.to_thread(serving.parse_test_file, body, self.settings)
        request.state.counts = (len(pairs), len(pairs))
        tta_swap = self.predict_config.tta_swap if tta_swap is None else tta_swap
        limit = asyncio.Semaphore(self.settings.file_chunks_in_flight)

        async def score(start: int, stop: int) -> dict[str, np.ndarray]:
            async with limit:
                return await self._member_logits(pairs.rows(start, stop), tta_swap)

        ranges = serving.chunk_ranges(len(pairs), self.settings.file_chunk_rows)
        tasks = [asyncio.ensure_future(score(start, stop)) for start, stop in ranges]
        try:
            if self.spec.priors in ESTIMATED_PRIORS:  # EM needs every row's logits before any row's probabilities
                parts = await asyncio.gather(*tasks)
                first = {name: np.concatenate([part[name] for part in parts]) for name in self.members}
                tasks = []
            else:
                first = await tasks.pop(0)  # a failure here still gets its status code
            # the first chunk (every row under EM) decides the headers; fixed priors are the same for every chunk
            first_probs, prior_shift = apply_spec(self.spec, first)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return StreamingResponse(self._submission(pairs, first_probs, tasks), media_type="text/csv",
                                 headers={"Content-Disposition": 'attachment; filename="submission.csv"',
                                          **serving.prior_shift_headers(prior_shift)})

    async def _submission(self, pairs: serving.PairBatch, first_probs: np.ndarray,
                          rest: list[asyncio.Future]) -> AsyncIterator[str]:
        try:
            yield serving.SUBMISSION_HEADER
            start = 0
            for pending in [None, *rest]:  # rows in order; a failure past the first chunk cuts the stream short
                probs = first_probs if pending is None else apply_spec_to_member_logits(self.spec, await pending)
                self._count(probs)
                yield serving.submission_rows(pairs.ids[start : start + len(probs)], probs)
                start += len(probs)
        finally:
            for task in rest:
                task.cancel()

    @api.get("/v1/models", responses=ERROR_RESPONSES)
    async def models(self, request: Request) -> JSONResponse:
        """Members, weights, temperatures, labels, versions, and each member replica's batching stats."""
        self._authorize(request)
        described = await asyncio.gather(*(self._call(name, "describe") for name in self.members))
        return JSONResponse(serving.describe_service(self.spec, self.predict_config, self.settings, described))

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """200 once every member has a loaded replica that answers, else 503 naming the ones that do not."""
        async def ping(handle: DeploymentHandle) -> str:
            response = handle.ready.remote()
            try:
                await asyncio.wait_for(response, self.settings.ready_timeout_s)
                return "ready"
            except Exception as exc:  # a timeout or a dead replica: not ready, whatever the cause
                response.cancel()
                return f"not ready ({type(exc).__name__})"

        states = dict(zip(self.members, await asyncio.gather(*(ping(h) for h in self.members.values()))))
        ready = all(state == "ready" for state in states.values())
        return JSONResponse({"ready": ready, "members": states}, status_code=200 if ready else 503)


def build_app(args: dict[str, Any] | serving.ServeArgs) -> Application:
    """The application for an ensemble spec (.json) or a checkpoint folder; `args` as in serve/config.yaml."""
    plan = serving.build_serving_plan(args)
    members = {
        member.name: Member.options(name=serving.member_deployment_name(index, member.name),
                                    **plan.settings.member.as_options()).bind(
            member.name, member.checkpoint, plan.predict, plan.settings)
        for index, member in enumerate(plan.spec.members)
    }
    return Ingress.options(**plan.settings.ingress.as_options()).bind(plan.spec, plan.predict, plan.settings, members)

